//! `Replica::novelty` predicts exactly what `apply` adds (the merger's quotas rely on it).

use edgetally_core::{BatchId, LogEntry, Replica};
use edgetally_proto::{BatchBuilder, Signer};
use proptest::prelude::*;
use std::sync::Arc;

const NOW: i64 = 1_700_000_000_000;

/// Counts (categories, entity series) the way a query would see them.
fn shape(r: &Replica, cats: &[&str]) -> (usize, usize) {
    let c = r.categories().len();
    let mut e = 0;
    for cat in cats {
        let rows = r.topk(
            cat,
            i64::MIN,
            i64::MAX,
            10_000,
            edgetally_core::TopBy::Entity,
        );
        e += rows.rows.len();
    }
    (c, e)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn novelty_is_what_apply_adds(batches in proptest::collection::vec(
        (0u8..3, proptest::collection::vec((0usize..4, proptest::option::of(0usize..5), 0i64..5_000), 1..12)),
        1..8,
    )) {
        const CATS: [&str; 4] = ["a", "b", "c", "d"];
        const ENTS: [&str; 5] = ["e0", "e1", "e2", "e3", "e4"];
        let mut r = Replica::new();
        for (seq, (who, recs)) in batches.into_iter().enumerate() {
            let s = Signer::from_seed([who + 1; 32]);
            let mut b = BatchBuilder::new(1000).expect("width");
            for (c, e, t) in recs {
                b.record(CATS[c], e.map(|e| ENTS[e]), NOW - t, 1.0).expect("record");
            }
            let batch = b.finish(BatchId { producer: s.producer(), epoch: 1, seq: seq as u64 }, NOW);
            let n = r.novelty(&batch);
            let (series, (cats, ents)) = (r.series_count(), shape(&r, &CATS));
            r.apply(LogEntry { batch: Arc::new(batch), raw: Arc::from(&[][..]) }).expect("apply");
            let (cats2, ents2) = shape(&r, &CATS);
            prop_assert_eq!(r.last_novelty(), n);
            prop_assert_eq!(r.series_count() - series, n.series as usize);
            prop_assert_eq!(cats2 - cats, n.categories as usize);
            prop_assert_eq!(ents2 - ents, n.entities as usize);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// The O(1) figures `/v1/status` reads (state hash, batches, tier entries) are what a full
    /// recount gives, the hash depends on the set of batches only (not order), survives a
    /// snapshot round trip, and tells different contents under one id apart.
    #[test]
    fn counters_and_state_hash_follow_the_set_of_batches(
        recs in proptest::collection::vec((0usize..3, proptest::option::of(0usize..3), 0i64..200_000), 1..40),
        order_seed in any::<u64>(),
    ) {
        const CATS: [&str; 3] = ["a", "b", "c"];
        let mut batches = Vec::new();
        for (i, chunk) in recs.chunks(3).enumerate() {
            let s = Signer::from_seed([(i % 4) as u8 + 1; 32]);
            let mut b = BatchBuilder::new(1000).expect("width");
            for &(c, e, t) in chunk {
                b.record(CATS[c], e.map(|e| CATS[e]), NOW - t, 1.5).expect("record");
            }
            batches.push(b.finish(BatchId { producer: s.producer(), epoch: 1, seq: i as u64 }, NOW));
        }
        let apply_all = |order: &[usize]| {
            let mut r = Replica::new();
            for &i in order {
                r.apply(LogEntry { batch: Arc::new(batches[i].clone()), raw: Arc::from(&[][..]) }).expect("apply");
            }
            r
        };
        let fwd: Vec<usize> = (0..batches.len()).collect();
        let mut shuffled = fwd.clone();
        let mut x = order_seed;
        for i in (1..shuffled.len()).rev() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (x >> 33) as usize % (i + 1));
        }
        let (a, b) = (apply_all(&fwd), apply_all(&shuffled));
        prop_assert_eq!(a.state_hash(), b.state_hash());
        prop_assert_eq!(a.entry_count(), a.entry_count_exact());
        prop_assert_eq!(b.entry_count(), b.entry_count_exact());
        prop_assert_eq!(a.digest_batches(), batches.len() as u64);
        // A snapshot round trip keeps every figure.
        let snap = edgetally_core::Snapshot::decode(&a.snapshot().encode()).expect("decode");
        let mut c = Replica::restore(snap).expect("restore");
        prop_assert_eq!(c.state_hash(), a.state_hash());
        prop_assert_eq!(c.entry_count(), a.entry_count_exact());
        prop_assert_eq!(c.digest_batches(), a.digest_batches());
        // Pruning keeps the entry count exact.
        let retention = edgetally_core::Retention { tiers: [Some(60_000), None, None] };
        c.prune_tiers(NOW, &retention);
        prop_assert_eq!(c.entry_count(), c.entry_count_exact());
        // One batch fewer, or one with other content under the same id: another hash.
        if batches.len() > 1 {
            prop_assert_ne!(apply_all(&fwd[1..]).state_hash(), a.state_hash());
        }
        let mut other = batches.clone();
        other[0].summaries[0].summary.count += 1;
        other[0].summaries[0].summary.sum += 1_500_000_000;
        let mut d = Replica::new();
        for bt in &other {
            d.apply(LogEntry { batch: Arc::new(bt.clone()), raw: Arc::from(&[][..]) }).expect("apply");
        }
        prop_assert_ne!(d.state_hash(), a.state_hash());
    }
}

/// Snapshots of formats 1 (before the set hash) and 2 (before per-epoch content hashes)
/// still restore, with the same totals and seqs; their epochs' hashes are unknown and never
/// reported as a divergence; two equal format-1 snapshots give equal state hashes.
#[test]
fn older_snapshot_formats_still_restore() {
    use edgetally_core::{ProducerKey, SeenSet, SetHash, Snapshot};
    #[derive(serde::Serialize)]
    struct V2<'a> {
        format: u32,
        strings: &'a Vec<String>,
        producers: &'a Vec<ProducerKey>,
        series: &'a Vec<edgetally_core::replica::SeriesSnapshot>,
        seen: Vec<(ProducerKey, u64, SeenSet)>,
        horizons: [i64; 3],
        batches_hash: SetHash,
    }
    let s = Signer::from_seed([3; 32]);
    let mut b = BatchBuilder::new(1000).expect("width");
    b.record("cpu", Some("d1"), NOW, 2.5).expect("record");
    let mut r = Replica::new();
    let id = BatchId {
        producer: s.producer(),
        epoch: 1,
        seq: 0,
    };
    r.apply(LogEntry {
        batch: Arc::new(b.finish(id, NOW)),
        raw: Arc::from(&[][..]),
    })
    .expect("apply");
    let now = r.snapshot();
    assert_eq!(now.format, 6);
    assert!(now.seen.iter().all(|(_, _, e)| e.hash.is_some()));
    // Format 5 is format 6 without the trailing sketch list and sketch horizons.
    let mut v5 = now.encode();
    let tail = postcard::to_allocvec(&(&now.sketches, now.sketch_horizons)).expect("tail");
    assert!(
        v5.ends_with(&tail),
        "format 6 ends with the sketches and their horizons"
    );
    v5.truncate(v5.len() - tail.len());
    v5[0] = 5;
    let from_v5 = Replica::restore(Snapshot::decode(&v5).expect("v5")).expect("restore");
    assert_eq!(from_v5.state_hash(), r.state_hash());
    assert_eq!(from_v5.snapshot(), now);
    let v2 = postcard::to_allocvec(&V2 {
        format: 2,
        strings: &now.strings,
        producers: &now.producers,
        series: &now.series,
        seen: now
            .seen
            .iter()
            .map(|(p, e, s)| (*p, *e, s.seqs.clone()))
            .collect(),
        horizons: now.horizons,
        batches_hash: now.batches_hash,
    })
    .expect("encode");
    // Format 1 is format 2 without the trailing set hash.
    let mut v1 = v2[..v2.len() - 32].to_vec();
    v1[0] = 1;
    let from_v2 = Replica::restore(Snapshot::decode(&v2).expect("v2")).expect("restore");
    assert_eq!(
        from_v2.state_hash(),
        r.state_hash(),
        "format 2 keeps the set hash"
    );
    let a = Replica::restore(Snapshot::decode(&v1).expect("v1")).expect("restore");
    let b = Replica::restore(Snapshot::decode(&v1).expect("v1")).expect("restore");
    assert_eq!(a.state_hash(), b.state_hash());
    for old in [&a, &from_v2] {
        let (x, y) = (old.snapshot(), r.snapshot());
        assert_eq!((&x.series, &x.strings), (&y.series, &y.strings));
        let seqs = |s: &Snapshot| -> Vec<_> {
            s.seen
                .iter()
                .map(|(p, e, s)| (*p, *e, s.seqs.clone()))
                .collect()
        };
        assert_eq!(seqs(&x), seqs(&y));
        assert!(x.seen.iter().all(|(_, _, e)| e.hash.is_none()));
        assert_eq!(old.digest().diverging(&r.digest()), None);
    }
    assert!(Snapshot::decode(&v2[..v2.len() - 1]).is_err());
}
