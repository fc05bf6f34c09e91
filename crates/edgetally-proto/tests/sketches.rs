//! Batch format v2 end to end in one process: sealed by producers, decoded and verified,
//! applied in any order and with duplicates, snapshotted and restored — the sketches a
//! replica holds are a function of the set of batches, byte for byte, and equal to sketches
//! built directly from every record (the independent reference).

use edgetally_core::sketches::{subject_hash, Hll, Quantiles};
use edgetally_core::{BatchId, Limits, LogEntry, RejectCode, Replica, Snapshot};
use edgetally_proto as envelope;
use edgetally_proto::{BatchBuilder, Signer, SketchOpts};
use proptest::prelude::*;
use std::sync::Arc;

const NOW: i64 = 1_700_000_040_000;
const CATS: [&str; 2] = ["page", "latency"];
const ENTS: [&str; 3] = ["home", "cart", "pay"];

/// (producer, [(category, entity, ms ago, value, subject)]).
type Plan = Vec<(u8, Vec<(usize, Option<usize>, i64, f64, Option<u32>)>)>;

fn sealed(plan: &Plan) -> Vec<Vec<u8>> {
    plan.iter()
        .enumerate()
        .map(|(seq, (who, recs))| {
            let s = Signer::from_seed([*who + 1; 32]);
            let mut b = BatchBuilder::new(1000).expect("width");
            for &(c, e, ago, v, subj) in recs {
                let opts = SketchOpts {
                    subject: subj.map(|x| (subject_hash(&format!("user-{x}"), None), 14)),
                    quantiles: c == 1,
                };
                b.record_with(CATS[c], e.map(|e| ENTS[e]), NOW - ago, v, opts)
                    .expect("record");
            }
            let id = BatchId {
                producer: s.producer(),
                epoch: 1,
                seq: seq as u64,
            };
            s.seal(&b.finish(id, NOW)).expect("seal")
        })
        .collect()
}

fn apply(order: &[Vec<u8>]) -> Replica {
    let mut r = Replica::new();
    for raw in order {
        let batch = envelope::open(raw, &Limits::default(), NOW).expect("open");
        r.apply(LogEntry {
            batch: Arc::new(batch),
            raw: Arc::from(&raw[..]),
        })
        .expect("apply");
    }
    r
}

fn records() -> impl Strategy<Value = Plan> {
    proptest::collection::vec(
        (
            0u8..3,
            proptest::collection::vec(
                (
                    0usize..2,
                    proptest::option::of(0usize..3),
                    0i64..200_000,
                    prop_oneof![
                        Just(0.0),
                        Just(-0.0),
                        Just(1e15),
                        Just(5e-324),
                        -1e6f64..1e6,
                        (1u32..100).prop_map(f64::from),
                    ],
                    proptest::option::of(0u32..400),
                ),
                1..40,
            ),
        ),
        1..10,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn replicas_hold_the_same_sketch_bytes_whatever_the_order(plan in records(), seed in any::<u64>()) {
        let batches = sealed(&plan);
        let a = apply(&batches);
        // Reversed, rotated and with every batch twice.
        let mut shuffled: Vec<Vec<u8>> = batches.iter().rev().cloned().collect();
        let n = shuffled.len();
        shuffled.rotate_left((seed as usize) % n);
        shuffled.extend(batches.iter().cloned());
        let b = apply(&shuffled);
        prop_assert_eq!(a.snapshot().encode(), b.snapshot().encode());
        prop_assert_eq!(a.state_hash(), b.state_hash());
        // The streaming encoder writes what the snapshot encodes, and a restore keeps it.
        prop_assert_eq!(a.encode_snapshot().expect("encode"), a.snapshot().encode());
        let c = Replica::restore(Snapshot::decode(&a.snapshot().encode()).expect("decode")).expect("restore");
        prop_assert_eq!(c.snapshot().encode(), a.snapshot().encode());

        // Against sketches built straight from the records of the window.
        for (ci, cat) in CATS.iter().enumerate() {
            for ent in [None, Some(0usize), Some(1), Some(2)] {
                let got = a.sketches(cat, ent.map(|e| ENTS[e]), NOW - 3_600_000, NOW + 60_000);
                let mut hll = Hll::new(14).expect("p");
                let mut q = Quantiles::default();
                let mut any_q = false;
                for (_, recs) in &plan {
                    for &(c, e, _, v, subj) in recs {
                        if c != ci || (ent.is_some() && e != ent) {
                            continue;
                        }
                        if let Some(x) = subj {
                            hll.insert_hash(subject_hash(&format!("user-{x}"), None));
                        }
                        if c == 1 {
                            q.insert(v + 0.0, 1);
                            any_q = true;
                        }
                    }
                }
                let want_hll = (!hll.is_empty()).then(|| hll.encode());
                prop_assert_eq!(got.sketches.distinct.as_ref().map(Hll::encode), want_hll);
                let want_q = any_q.then(|| q.encode());
                prop_assert_eq!(got.sketches.quantiles.as_ref().map(Quantiles::encode), want_q);
            }
        }
    }
}

/// A summary with sketches is sealed as v2 (its own signature domain), one without as v1,
/// byte for byte what earlier releases wrote.
#[test]
fn only_batches_with_sketches_are_v2() {
    let s = Signer::from_seed([9; 32]);
    let id = BatchId {
        producer: s.producer(),
        epoch: 7,
        seq: 0,
    };
    let mut plain = BatchBuilder::new(1000).expect("width");
    plain.record("page", None, NOW, 1.0).expect("record");
    let plain = s.seal(&plain.finish(id, NOW)).expect("seal");
    assert_eq!(plain[0], envelope::VERSION);
    let mut with = BatchBuilder::new(1000).expect("width");
    with.record_with(
        "page",
        None,
        NOW,
        1.0,
        SketchOpts {
            subject: Some((subject_hash("u", None), 14)),
            quantiles: true,
        },
    )
    .expect("record");
    let v2 = s.seal(&with.finish(id, NOW)).expect("seal");
    assert_eq!(v2[0], envelope::VERSION_V2);
    let batch = envelope::open(&v2, &Limits::default(), NOW).expect("open");
    assert_eq!(batch.sketches.len(), 1);
    // The same payload under the v1 domain does not verify: the version is signed.
    let mut relabelled = v2.clone();
    relabelled[0] = envelope::VERSION;
    assert!(envelope::open(&relabelled, &Limits::default(), NOW).is_err());
}

/// Every way a v2 sketch section can lie is refused with `invalid_sketch` (or a framing
/// code), never a panic.
#[test]
fn inconsistent_sketches_are_refused() {
    let s = Signer::from_seed([4; 32]);
    let id = BatchId {
        producer: s.producer(),
        epoch: 1,
        seq: 0,
    };
    let mut b = BatchBuilder::new(1000).expect("width");
    for v in [1.0, 2.0, 3.0] {
        b.record_with(
            "latency",
            None,
            NOW,
            v,
            SketchOpts {
                subject: None,
                quantiles: true,
            },
        )
        .expect("record");
    }
    let good = b.finish(id, NOW);
    let limits = Limits::default();
    let code = |batch: &edgetally_core::Batch| {
        let raw = s.seal(batch).expect("seal");
        envelope::open(&raw, &limits, NOW)
            .map(|_| ())
            .map_err(|e| e.code)
    };
    assert_eq!(code(&good), Ok(()));
    let mut wrong_count = good.clone();
    if let Some(q) = &mut wrong_count.sketches[0].1.quantiles {
        q.insert(4.0, 1);
    }
    assert_eq!(code(&wrong_count), Err(RejectCode::InvalidSketch));
    let mut out_of_range = good.clone();
    out_of_range.sketches[0].0 = 1;
    assert_eq!(code(&out_of_range), Err(RejectCode::InvalidSketch));
    let mut empty = good.clone();
    empty.sketches[0].1.quantiles = None;
    assert_eq!(code(&empty), Err(RejectCode::InvalidSketch));
    let mut empty_hll = good.clone();
    empty_hll.sketches[0].1.distinct = Hll::new(12).ok();
    assert_eq!(code(&empty_hll), Err(RejectCode::InvalidSketch));
    // Every truncation and every single-byte change of the sealed bytes: an error, no panic.
    let raw = s.seal(&good).expect("seal");
    for n in 0..raw.len() {
        assert!(envelope::open(&raw[..n], &limits, NOW).is_err());
    }
    for i in 0..raw.len() {
        let mut m = raw.clone();
        m[i] ^= 0x41;
        assert!(envelope::open(&m, &limits, NOW).is_err(), "byte {i}");
    }
}

/// Sketch retention: minute buckets pruned before the totals' are answered from the hour
/// buckets, the covered window widened to whole hours and the sketch the union of exactly the
/// records in it; snapshots carry the sketch horizons.
#[test]
fn pruned_minute_sketches_are_answered_from_the_hour_buckets() {
    let hour = 3_600_000;
    let base = (NOW / hour) * hour - 3 * hour;
    let s = Signer::from_seed([5; 32]);
    let mut r = Replica::new();
    // One subject per 10 minutes over three hours, one batch each.
    let mut at = Vec::new();
    for i in 0..18u64 {
        let t = base + i as i64 * 600_000 + 1_000;
        at.push((t, format!("user-{i}")));
        let mut b = BatchBuilder::new(1000).expect("width");
        b.record_with(
            "visits",
            None,
            t,
            1.0,
            SketchOpts {
                subject: Some((subject_hash(&format!("user-{i}"), None), 12)),
                quantiles: false,
            },
        )
        .expect("record");
        let id = BatchId {
            producer: s.producer(),
            epoch: 1,
            seq: i,
        };
        let raw = s.seal(&b.finish(id, t)).expect("seal");
        let batch = envelope::open(&raw, &Limits::default(), NOW).expect("open");
        r.apply(LogEntry {
            batch: Arc::new(batch),
            raw: Arc::from(&raw[..]),
        })
        .expect("apply");
    }
    let (from, to) = (base + 30 * 60_000, base + 3 * hour);
    let before = r.sketches("visits", None, from, to);
    assert_eq!((before.start, before.end), (from, to), "minute-aligned");
    // Keep minute sketches for one hour from the end: the first two hours go.
    r.prune_sketch_tiers(base + 3 * hour, [Some(hour), None]);
    let after = r.sketches("visits", None, from, to);
    assert_eq!((after.start, after.end), (base, to), "widened to the hour");
    let mut want = Hll::new(12).expect("p");
    for (t, who) in &at {
        if (after.start..after.end).contains(t) {
            want.insert_hash(subject_hash(who, None));
        }
    }
    assert_eq!(
        after.sketches.distinct.as_ref().map(Hll::encode),
        Some(want.encode())
    );
    // Totals are untouched by the sketches' retention.
    assert_eq!(r.aggregate("visits", None, from, to).start, from);
    let back = Replica::restore(Snapshot::decode(&r.snapshot().encode()).expect("decode"))
        .expect("restore");
    assert_eq!(back.sketches("visits", None, from, to), after);
}

/// A v2 batch refused for its version alone (`unsupported_version`: a node of an earlier
/// release, mid rolling upgrade) is kept and tried at the next endpoint, never dropped; a v1
/// batch so refused is at fault itself and is dropped, counted by reason.
#[test]
fn a_v2_batch_an_earlier_release_refuses_fails_over() {
    use edgetally_proto::{Producer, ProducerConfig, Reply};
    let endpoints = ["old".to_string(), "new".to_string()];
    let config = ProducerConfig {
        flush_interval_ms: 0,
        ..ProducerConfig::default()
    };
    let mut p = Producer::new(config, [5; 32], 1, &endpoints, 7).expect("config");
    let h = p.handle("page", Some("home")).expect("handle");
    p.record_subject(NOW, h, 1.0, Some(NOW), "user-1")
        .expect("record");
    let mut now = NOW;
    let first = p.poll_transmit(now).expect("a batch");
    assert_eq!(first.bytes[0], envelope::VERSION_V2);
    let code = RejectCode::UnsupportedVersion as u16;
    p.handle_reply(now, first.seq, Reply::Nack(code));
    let s = p.stats();
    assert!(s.rejected.is_empty(), "not dropped: {s:?}");
    assert_eq!((s.queued, s.retried), (1, 1), "{s:?}");
    // Tried again, at the other endpoint, once its backoff has passed.
    let again = loop {
        now += 50;
        if let Some(t) = p.poll_transmit(now) {
            break t;
        }
        assert!(now < NOW + 120_000, "never retried");
    };
    assert_eq!(again.seq, first.seq);
    assert_ne!(again.endpoint, first.endpoint, "failed over");
    p.handle_reply(now, again.seq, Reply::Ack);
    assert_eq!((p.stats().acked, p.stats().queued), (1, 0));

    // A v1 batch refused as unsupported_version is dropped (no honest node refuses v1).
    p.record(now, "page", Some("home"), 2.0, Some(now))
        .expect("record");
    let v1 = p.poll_transmit(now).expect("a batch");
    assert_eq!(v1.bytes[0], envelope::VERSION);
    p.handle_reply(now, v1.seq, Reply::Nack(code));
    let s = p.stats();
    assert_eq!(
        (s.queued, s.rejected.get(RejectCode::UnsupportedVersion)),
        (0, 1),
        "{s:?}"
    );
}
