//! Seen-set expiry (`Replica::expire`): what it forgets is exactly the epochs past the
//! lateness horizon, every batch it forgets is one the time check refuses from then on (so no
//! batch can count twice), and the totals, the state hash and the snapshot round trip are
//! unchanged by it.

mod common;

use common::entry;
use edgetally_core::{Batch, BatchId, Limits, RejectCode, Replica, Snapshot, HORIZON_UNKNOWN};
use edgetally_proto::{BatchBuilder, Signer};
use proptest::prelude::*;
use std::collections::BTreeMap;

const NOW: i64 = 1_700_000_000_000;
const HOUR: i64 = 3_600_000;

/// Batches of a few producers and epochs, each with records `ago` ms before `NOW`.
fn batches(spec: &[(u8, u8, Vec<i64>)]) -> Vec<Batch> {
    let mut seq: BTreeMap<(u8, u8), u64> = BTreeMap::new();
    spec.iter()
        .map(|(p, e, agos)| {
            let s = Signer::from_seed([p + 1; 32]);
            let mut b = BatchBuilder::new(60_000).expect("width");
            for (i, &ago) in agos.iter().enumerate() {
                b.record(["a", "b"][i % 2], None, NOW - ago, 1.0)
                    .expect("record");
            }
            let n = seq.entry((*p, *e)).or_default();
            *n += 1;
            b.finish(
                BatchId {
                    producer: s.producer(),
                    epoch: *e as u64,
                    seq: *n - 1,
                },
                NOW,
            )
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn expiry_forgets_exactly_the_epochs_past_the_horizon_and_nothing_can_count_twice(
        spec in proptest::collection::vec(
            (0u8..3, 0u8..3, proptest::collection::vec(0i64..48 * HOUR, 1..4)), 1..24),
        cut_hours in 0i64..48,
    ) {
        let all = batches(&spec);
        let mut r = Replica::new();
        for b in &all {
            r.apply(entry(b)).expect("apply");
        }
        let before = r.snapshot();
        let (hash, batches_before) = (r.state_hash(), r.digest_batches());
        let cutoff = NOW - cut_hours * HOUR;
        // The model: an epoch expires when every one of its batches has a bucket ending at
        // or before the cutoff.
        let mut newest_oldest: BTreeMap<_, i64> = BTreeMap::new();
        for b in &all {
            let oldest = b.summaries.iter()
                .map(|s| (s.bucket + 1) * b.bucket_ms as i64)
                .min().expect("summaries");
            let e = newest_oldest.entry((b.id.producer, b.id.epoch)).or_insert(i64::MIN);
            *e = (*e).max(oldest);
        }
        let expected: Vec<_> = newest_oldest.iter()
            .filter(|(_, &h)| h <= cutoff).map(|(k, _)| *k).collect();
        let gone: Vec<_> = r.expire(cutoff).into_iter().map(|(k, _)| k).collect();
        prop_assert_eq!(&gone, &expected);
        prop_assert_eq!(r.expired_epochs(), expected.len() as u64);
        // Totals and the state hash are what they were; the digest lost exactly those epochs.
        let after = r.snapshot();
        prop_assert_eq!(&after.series, &before.series);
        prop_assert_eq!(r.state_hash(), hash);
        let forgotten: Vec<&Batch> = all.iter()
            .filter(|b| gone.contains(&(b.id.producer, b.id.epoch))).collect();
        prop_assert_eq!(r.digest_batches(), batches_before - forgotten.len() as u64);
        // The safety argument: a merger expires at cutoff = now - max_lateness (- margin), so
        // at that clock and any later one every forgotten batch is refused by the time check.
        let limits = Limits { max_lateness_ms: 6 * HOUR, ..Limits::default() };
        for b in &forgotten {
            for later in [0, 1, 3 * HOUR, 60 * HOUR] {
                let now = cutoff + limits.max_lateness_ms + later;
                // (A clock before the batch's creation refuses it as from the future first.)
                let expect = if b.created_ms > now + limits.max_future_skew_ms {
                    RejectCode::FutureTimestamp
                } else {
                    RejectCode::BucketTooOld
                };
                prop_assert_eq!(b.check_time(now, &limits), Err(expect));
            }
        }
        // ... while the batches of epochs kept may still be accepted there (some of them).
        for b in all.iter().filter(|b| !gone.contains(&(b.id.producer, b.id.epoch))) {
            prop_assert!(r.has_applied(&b.id));
        }
        // A snapshot round trip keeps horizons, the state hash and the digest.
        let c = Replica::restore(Snapshot::decode(&after.encode()).expect("decode")).expect("restore");
        prop_assert_eq!(c.state_hash(), r.state_hash());
        prop_assert_eq!(c.digest(), r.digest());
        // A peer digest filtered with the same cutoff holds only live epochs.
        let mut d = before_digest(&all);
        d.retain_live(cutoff);
        prop_assert_eq!(d, r.digest());
    }
}

fn before_digest(all: &[Batch]) -> edgetally_core::Digest {
    let mut r = Replica::new();
    for b in all {
        r.apply(entry(b)).expect("apply");
    }
    r.digest()
}

#[test]
fn expiry_drops_the_retained_batches_of_expired_epochs_and_frees_their_memory() {
    let all = batches(&[(0, 0, vec![30 * HOUR]), (1, 0, vec![HOUR])]);
    let mut r = Replica::new();
    r.set_peers(["peer".to_string()]);
    let empty = r.memory();
    for b in &all {
        r.apply(entry(b)).expect("apply");
    }
    let full = r.memory();
    assert_eq!(r.log_len(), 2);
    assert!(full.seen > empty.seen && full.log > empty.log && full.entries > 0);
    let gone = r.expire(NOW - 24 * HOUR);
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].0, (all[0].id.producer, 0));
    assert!(gone[0].1.contains(0) && gone[0].1.len() == 1);
    assert_eq!(
        r.log().map(|e| e.batch.id).collect::<Vec<_>>(),
        vec![all[1].id]
    );
    let less = r.memory();
    assert!(less.seen < full.seen && less.log < full.log);
    assert_eq!(less.entries, full.entries, "totals stay");
    r.expire(NOW);
    assert_eq!((r.memory().seen, r.memory().log), (0, 0));
}

/// A format 3 snapshot (before epochs kept their horizon) restores with unknown horizons:
/// nothing expires until the merger bounds them.
#[test]
fn format_3_snapshots_restore_with_unknown_horizons() {
    use edgetally_core::{ProducerKey, SeenSet, SetHash};
    #[derive(serde::Serialize)]
    struct Seen3 {
        seqs: SeenSet,
        hash: Option<[u8; 16]>,
    }
    #[derive(serde::Serialize)]
    struct V3<'a> {
        format: u32,
        strings: &'a Vec<String>,
        producers: &'a Vec<ProducerKey>,
        series: &'a Vec<edgetally_core::replica::SeriesSnapshot>,
        seen: Vec<(ProducerKey, u64, Seen3)>,
        horizons: [i64; 3],
        batches_hash: SetHash,
    }
    let all = batches(&[(0, 0, vec![30 * HOUR]), (0, 0, vec![HOUR]), (2, 1, vec![0])]);
    let mut r = Replica::new();
    for b in &all {
        r.apply(entry(b)).expect("apply");
    }
    let s = r.snapshot();
    let v3 = postcard::to_allocvec(&V3 {
        format: 3,
        strings: &s.strings,
        producers: &s.producers,
        series: &s.series,
        seen: s
            .seen
            .iter()
            .map(|(p, e, x)| {
                (
                    *p,
                    *e,
                    Seen3 {
                        seqs: x.seqs.clone(),
                        hash: x.hash,
                    },
                )
            })
            .collect(),
        horizons: s.horizons,
        batches_hash: s.batches_hash,
    })
    .expect("encode");
    let mut old = Replica::restore(Snapshot::decode(&v3).expect("v3")).expect("restore");
    assert_eq!(old.state_hash(), r.state_hash());
    assert!(old
        .digest()
        .epochs
        .values()
        .all(|e| e.horizon_ms == HORIZON_UNKNOWN));
    assert!(
        old.expire(NOW + 1000 * HOUR).is_empty(),
        "unknown horizons never expire"
    );
    assert_eq!(old.bound_unknown_horizons(NOW + HOUR), 2);
    assert_eq!(old.expire(NOW).len(), 0);
    assert_eq!(old.expire(NOW + HOUR).len(), 2);
    assert_eq!(old.state_hash(), r.state_hash());
}
