//! The sans-IO producer against a simulated merger and network: every record ends up counted
//! exactly once (acked) or accounted for (rejected or dropped), batches are always valid, and
//! the merger's totals equal a naive model of what was recorded.

use edgetally_core::{BatchId, Limits, LogEntry, RejectCode, Replica};
use edgetally_proto::producer::rendezvous_order;
use edgetally_proto::{open, PersistOp, Producer, ProducerConfig, Reply};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const T0: i64 = 1_700_000_000_000;

#[derive(Clone, Debug)]
enum Op {
    Record {
        cat: u8,
        ent: Option<u8>,
        eighths: i16,
        back_ms: u16,
    },
    Tick(u16),
    Send {
        outcome: u8,
    },
    /// Storage refused a batch: shed the oldest waiting one (if shedding is on in this case).
    Shed,
    /// The network is back: everything waiting is due now.
    Wake,
    /// A page is being left: seal into batches of at most this many bytes.
    SealWithin(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..3, proptest::option::of(0u8..4), any::<i16>(), 0u16..5000).prop_map(|(cat, ent, eighths, back_ms)| Op::Record { cat, ent, eighths, back_ms }),
        2 => (0u16..3000).prop_map(Op::Tick),
        3 => (0u8..10).prop_map(|outcome| Op::Send { outcome }),
        1 => Just(Op::Shed),
        1 => Just(Op::Wake),
        1 => (60u16..3000).prop_map(Op::SealWithin),
    ]
}

const CATS: [&str; 3] = ["cpu", "page_view", "temp"];
const ENTS: [&str; 4] = ["d1", "d2", "u7", "ü"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn every_record_is_counted_once_or_accounted_for(
        ops in proptest::collection::vec(op(), 1..300),
        max_batch in 1usize..12,
        max_in_flight in 1usize..6,
        small_outbox: bool,
        allow_nack: bool,
        shed: bool,
        seed: u64,
    ) {
        let endpoints: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let config = ProducerConfig {
            max_batch_summaries: max_batch,
            max_in_flight,
            max_outbox_bytes: if small_outbox { 600 } else { 1 << 20 },
            flush_interval_ms: 1000,
            ..ProducerConfig::default()
        };
        let mut p = Producer::new(config.clone(), [9; 32], 77, &endpoints, seed).expect("producer");
        let mut now = T0;
        let mut merger = Replica::new();
        let mut model: BTreeMap<(String, Option<String>, i64), (u64, i128)> = BTreeMap::new();
        let mut in_flight: Vec<edgetally_proto::Transmit> = Vec::new();
        let mut seqs_seen = BTreeSet::new();
        let mut r = seed;
        let mut next = move || { r = r.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (r >> 33) as u8 };
        let deliver = |t: &edgetally_proto::Transmit, merger: &mut Replica, now: i64| -> Result<(), TestCaseError> {
            let b = open(&t.bytes, &Limits::default(), now).map_err(|e| TestCaseError::fail(format!("invalid batch: {e}")))?;
            prop_assert_eq!(b.id.epoch, 77);
            merger.apply(LogEntry { batch: Arc::new(b), raw: t.bytes.clone() }).map_err(|e| TestCaseError::fail(e.to_string()))?;
            Ok(())
        };
        for op in ops {
            match op {
                Op::Record { cat, ent, eighths, back_ms } => {
                    let ts = now - back_ms as i64;
                    let (c, e) = (CATS[cat as usize], ent.map(|e| ENTS[e as usize]));
                    p.record(now, c, e, eighths as f64 / 8.0, Some(ts)).expect("valid record");
                    let k = model.entry((c.to_string(), e.map(str::to_string), ts.div_euclid(1000) * 1000)).or_default();
                    k.0 += 1;
                    k.1 += eighths as i128 * 125_000_000;
                }
                Op::Tick(ms) => now += ms as i64,
                Op::Shed => {
                    if shed {
                        let before = p.stats();
                        if let Some(seq) = p.drop_oldest(u64::MAX) {
                            // The oldest waiting one, and nothing in flight.
                            prop_assert!(in_flight.iter().all(|t| t.seq != seq));
                            prop_assert_eq!(p.stats().dropped, before.dropped + 1);
                        } else {
                            prop_assert_eq!(before.queued, 0);
                        }
                    }
                }
                Op::Wake => {
                    p.wake(now);
                    // Everything waiting is due: nothing to wait for but the in-flight bound.
                    if p.stats().queued > 0 {
                        prop_assert!(p.poll_timeout().is_some_and(|t| t <= now));
                    }
                }
                Op::SealWithin(max) => {
                    p.seal_within(now, max as usize);
                    prop_assert_eq!(p.stats().pending, 0);
                }
                Op::Send { outcome } => {
                    while let Some(t) = p.poll_transmit(now) {
                        prop_assert!(in_flight.len() < max_in_flight);
                        prop_assert!(endpoints.len() > t.endpoint);
                        seqs_seen.insert(t.seq);
                        in_flight.push(t);
                    }
                    if in_flight.is_empty() { continue; }
                    let i = next() as usize % in_flight.len();
                    let t = in_flight.swap_remove(i);
                    match outcome {
                        0..=4 => { deliver(&t, &mut merger, now)?; p.handle_reply(now, t.seq, Reply::Ack); }
                        5 => { deliver(&t, &mut merger, now)?; p.handle_transport_error(now, t.seq, t.endpoint); } // applied, Ack lost
                        6 => p.handle_reply(now, t.seq, Reply::Retry { after_ms: 50 }),
                        7 if allow_nack => {
                            let id = open(&t.bytes, &Limits::default(), now).map(|b| b.id).ok();
                            if id.is_some_and(|id| merger.has_applied(&id)) {
                                p.handle_reply(now, t.seq, Reply::Ack);
                            } else {
                                p.handle_reply(now, t.seq, Reply::nack(RejectCode::BucketTooOld));
                            }
                        }
                        _ => p.handle_transport_error(now, t.seq, t.endpoint),
                    }
                }
            }
            let s = p.stats();
            prop_assert!(s.outbox_bytes as usize <= config.max_outbox_bytes);
        }
        // Heal: answer everything with Ack until the flush completes.
        let token = p.flush(now);
        for _ in 0..10_000 {
            if p.flushed(token) && in_flight.is_empty() { break; }
            for t in in_flight.drain(..) {
                deliver(&t, &mut merger, now)?;
                p.handle_reply(now, t.seq, Reply::Ack);
            }
            while let Some(t) = p.poll_transmit(now) { in_flight.push(t); }
            now = p.poll_timeout().map_or(now + 1, |t| t.max(now + 1));
        }
        prop_assert!(p.flushed(token));
        let s = p.stats();
        let rejected: u64 = s.rejected.total();
        prop_assert_eq!(s.recorded, s.acked_records + s.rejected_records + s.dropped_records, "{:?}", s);
        prop_assert_eq!((s.in_flight, s.queued, s.pending), (0, 0, 0));
        if !small_outbox && !shed && (!allow_nack || rejected == 0) {
            // Nothing lost: the merger holds exactly the model.
            for ((c, e, b), (n, sum)) in &model {
                let got = merger.aggregate(c, e.as_deref(), *b, b + 1000);
                let want_count: u64 = if e.is_some() { *n } else {
                    model.iter().filter(|((c2, _, b2), _)| c2 == c && b2 == b).map(|(_, v)| v.0).sum()
                };
                let want_sum: i128 = if e.is_some() { *sum } else {
                    model.iter().filter(|((c2, _, b2), _)| c2 == c && b2 == b).map(|(_, v)| v.1).sum()
                };
                prop_assert_eq!((got.total.count, got.total.sum.to_i128()), (want_count, Some(want_sum)));
            }
            prop_assert_eq!(s.dropped, 0);
        }
        // Seqs are consecutive from 0 for this epoch.
        let max = seqs_seen.iter().next_back().copied().unwrap_or(0);
        prop_assert!(seqs_seen.len() as u64 <= max + 1);
    }
}

#[test]
fn rendezvous_spreads_producers_and_is_stable() {
    let endpoints: Vec<String> = (0..4)
        .map(|i| format!("https://m{i}.example:7071"))
        .collect();
    let mut first = [0usize; 4];
    for k in 0..400u16 {
        let mut key = [0u8; 32];
        key[..2].copy_from_slice(&k.to_le_bytes());
        let order = rendezvous_order(&key, &endpoints);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2, 3]);
        assert_eq!(order, rendezvous_order(&key, &endpoints));
        first[order[0]] += 1;
        // Removing an endpoint only moves the producers that preferred it.
        let fewer: Vec<String> = endpoints[..3].to_vec();
        let o2 = rendezvous_order(&key, &fewer);
        if order[0] != 3 {
            assert_eq!(o2[0], order[0]);
        }
        // And the others keep their relative order (each endpoint's weight is its own).
        let without: Vec<usize> = order.iter().copied().filter(|&i| i != 3).collect();
        assert_eq!(o2, without);
    }
    assert!(first.iter().all(|&n| n > 60), "{first:?}");
}

#[test]
fn outbox_overflow_drops_the_oldest_and_counts_it() {
    let cfg = ProducerConfig {
        max_batch_summaries: 1,
        max_outbox_bytes: 400,
        ..ProducerConfig::default()
    };
    let mut p = Producer::new(cfg, [3; 32], 1, &["x".to_string()], 1).expect("producer");
    for i in 0..10 {
        p.record(T0, "c", Some(&format!("e{i}")), 1.0, None)
            .expect("record");
    }
    let s = p.stats();
    assert!(s.dropped > 0, "{s:?}");
    assert!(s.outbox_bytes <= 400);
    assert_eq!(s.recorded, 10);
    assert_eq!(s.dropped_records + s.queued, 10); // one record per batch here
                                                  // The survivors are the newest.
    let t = p.poll_transmit(T0).expect("something to send");
    assert!(t.seq >= s.dropped);
}

#[test]
fn retry_backs_off_with_full_jitter_and_fails_over() {
    let cfg = ProducerConfig {
        backoff_base_ms: 100,
        backoff_max_ms: 1000,
        ..ProducerConfig::default()
    };
    let endpoints: Vec<String> = vec!["a".into(), "b".into()];
    let mut p = Producer::new(cfg, [4; 32], 1, &endpoints, 42).expect("producer");
    p.record(T0, "c", None, 1.0, None).expect("record");
    p.flush(T0);
    let t = p.poll_transmit(T0).expect("transmit");
    let first = t.endpoint;
    let mut now = T0;
    p.handle_transport_error(now, t.seq, t.endpoint);
    let mut seen_other = false;
    for attempt in 1..8 {
        let wake = p.poll_timeout().expect("a retry is scheduled");
        let cap = (100i64 << attempt).min(1000);
        assert!(
            wake > now && wake <= now + cap,
            "attempt {attempt}: {} not in (0, {cap}]",
            wake - now
        );
        assert!(p.poll_transmit(wake - 1).is_none(), "not before its time");
        now = wake;
        let t = p.poll_transmit(now).expect("resend");
        seen_other |= t.endpoint != first;
        p.handle_reply(now, t.seq, Reply::Retry { after_ms: 10 });
    }
    assert!(seen_other, "failed over after a transport error");
    let t = p
        .poll_transmit(p.poll_timeout().expect("scheduled"))
        .expect("resend");
    p.handle_reply(now, t.seq, Reply::Ack);
    assert_eq!(p.stats().acked_records, 1);
    assert!(p.stats().retried >= 8);
}

#[test]
fn persisted_state_resumes_the_epoch_and_resends_the_outbox() {
    let cfg = ProducerConfig::default();
    let mut p = Producer::new(cfg.clone(), [5; 32], 9, &["m".to_string()], 1).expect("producer");
    p.record(T0, "c", Some("e"), 2.0, None).expect("record");
    p.flush(T0);
    let mut ident = None;
    let mut stored = BTreeMap::new();
    while let Some(op) = p.poll_persist() {
        match op {
            PersistOp::Identity { epoch, next_seq } => ident = Some(([5; 32], epoch, next_seq)),
            PersistOp::Put { seq, bytes } => {
                stored.insert(seq, bytes.to_vec());
            }
            PersistOp::Remove { seq } => {
                stored.remove(&seq);
            }
        }
    }
    let (seed, epoch, next_seq) = ident.expect("identity persisted");
    assert_eq!((epoch, next_seq, stored.len()), (9, 1, 1));
    // "Restart": the new instance resends the stored batch under the same id.
    let mut q = Producer::resume(
        cfg,
        seed,
        epoch,
        next_seq,
        stored.into_iter().collect(),
        &["m".to_string()],
        2,
    )
    .expect("resume");
    let t = q.poll_transmit(T0 + 10).expect("resend");
    let b = open(&t.bytes, &Limits::default(), T0).expect("valid");
    assert_eq!(
        b.id,
        BatchId {
            producer: q.producer_key(),
            epoch: 9,
            seq: 0
        }
    );
    q.record(T0, "c", None, 1.0, None).expect("record");
    q.flush(T0);
    let t2 = q.poll_transmit(T0 + 10).expect("new batch");
    assert_eq!(t2.seq, 1);
}

/// Seals everything and returns the batches' summaries as (category, entity, bucket) → summary.
fn sealed(p: &mut Producer, now: i64) -> BTreeMap<(String, String, i64), edgetally_core::Summary> {
    p.flush(now);
    let mut out = BTreeMap::new();
    while let Some(t) = p.poll_transmit(now) {
        let b = open(&t.bytes, &Limits::default(), now).expect("valid batch");
        for s in &b.summaries {
            let name = |i: u32| b.strings.get(i as usize).unwrap_or("").to_string();
            let ent = if s.entity == edgetally_core::NO_ENTITY {
                String::new()
            } else {
                name(s.entity - 1)
            };
            let key = (name(s.category), ent, s.bucket);
            out.entry(key)
                .and_modify(|e: &mut edgetally_core::Summary| e.merge(&s.summary).expect("merge"))
                .or_insert(s.summary);
        }
        p.handle_reply(now, t.seq, Reply::Ack);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The fast path (open bucket, fast quantisation), the slow path and `record_summary` (what
    /// the JavaScript handles send) all produce the summaries of recording each value alone.
    #[test]
    fn fast_slow_and_summary_paths_agree(
        values in proptest::collection::vec((any::<f64>(), -2.5e6f64..2.5e6, 0u8..4, 0u16..4000), 1..200),
        split in 1usize..20,
    ) {
        let cfg = ProducerConfig { flush_interval_ms: i64::MAX / 4, ..ProducerConfig::default() };
        let now = T0;
        let mut one = Producer::new(cfg.clone(), [1; 32], 1, &["m".into()], 1).expect("producer");
        let mut fast = Producer::new(cfg.clone(), [1; 32], 1, &["m".into()], 1).expect("producer");
        let mut agg = Producer::new(cfg, [1; 32], 1, &["m".into()], 1).expect("producer");
        let h1 = fast.handle("x", Some("e")).expect("handle");
        let h2 = agg.handle("x", Some("e")).expect("handle");
        let mut pending: Vec<(i64, f64)> = Vec::new();
        // The model: each accepted value's own summary, merged per bucket.
        let mut model: BTreeMap<(String, String, i64), edgetally_core::Summary> = BTreeMap::new();
        for (raw, dec, kind, back) in &values {
            let v = match kind { 0 => *raw, 1 => *dec, 2 => (dec * 1000.0).round() / 1000.0, _ => -0.0 };
            let ts = now - i64::from(*back);
            let r1 = one.record(now, "x", Some("e"), v, Some(ts));
            let r2 = fast.record_handle(now, h1, v, Some(ts));
            prop_assert_eq!(r1, r2);
            prop_assert_eq!(r1.is_ok(), v.is_finite() && v.abs() <= 1e15);
            if r1.is_ok() {
                pending.push((ts, v));
                let s = edgetally_core::Summary::of(v).expect("valid");
                model
                    .entry(("x".into(), "e".into(), ts.div_euclid(1000)))
                    .and_modify(|x| x.merge(&s).expect("merge"))
                    .or_insert(s);
            }
            if pending.len() >= split {
                // The JavaScript SDK's way: summarise per bucket, hand over summaries.
                let mut by_bucket: BTreeMap<i64, edgetally_core::Summary> = BTreeMap::new();
                for (ts, v) in pending.drain(..) {
                    let s = edgetally_core::Summary::of(v).expect("valid");
                    by_bucket.entry(ts.div_euclid(1000)).and_modify(|x| x.merge(&s).expect("merge")).or_insert(s);
                }
                for (b, s) in by_bucket {
                    prop_assert_eq!(agg.record_summary(now, h2, b * 1000, s), Ok(()));
                }
            }
        }
        for (ts, v) in pending.drain(..) {
            let s = edgetally_core::Summary::of(v).expect("valid");
            prop_assert_eq!(agg.record_summary(now, h2, ts, s), Ok(()));
        }
        let (a, b, c) = (one.stats(), fast.stats(), agg.stats());
        prop_assert_eq!(a.recorded, b.recorded);
        prop_assert_eq!(a.recorded, c.recorded);
        prop_assert_eq!(&a.invalid, &b.invalid);
        prop_assert_eq!(&model, &sealed(&mut one, now));
        prop_assert_eq!(&model, &sealed(&mut fast, now));
        prop_assert_eq!(&model, &sealed(&mut agg, now));
    }
}

#[test]
fn stale_and_future_events_are_refused_before_they_can_spoil_a_batch() {
    let cfg = ProducerConfig::default();
    let mut p = Producer::new(cfg.clone(), [2; 32], 1, &["m".into()], 1).expect("producer");
    let now = T0;
    let old = now - cfg.limits.max_lateness_ms - 1000;
    let ahead = now + cfg.limits.max_future_skew_ms + 1000;
    assert_eq!(
        p.record(now, "t", None, 1.0, Some(old)),
        Err(RejectCode::BucketTooOld)
    );
    assert_eq!(
        p.record(now, "t", None, 1.0, Some(ahead)),
        Err(RejectCode::FutureTimestamp)
    );
    let h = p.handle("t", None).expect("handle");
    let s = edgetally_core::Summary::of(2.0).expect("summary");
    let three = edgetally_core::Summary {
        count: 3,
        sum: 6_000_000_000,
        min: 2.0,
        max: 2.0,
    };
    assert_eq!(
        p.record_summary(now, h, old, three),
        Err(RejectCode::BucketTooOld)
    );
    assert_eq!(p.record(now, "t", None, 1.0, Some(now)), Ok(()));
    assert_eq!(p.record_summary(now, h, now, s), Ok(()));
    let st = p.stats();
    assert_eq!(st.recorded, 2);
    // A refused summary counts every record it stood for.
    assert_eq!(st.invalid.get(RejectCode::BucketTooOld), 4);
    assert_eq!(st.invalid.get(RejectCode::FutureTimestamp), 1);
    assert_eq!(st.invalid.total(), 5);
    let batches = sealed(&mut p, now);
    assert_eq!(batches.len(), 1);
    let only = batches.values().next().expect("one summary");
    assert_eq!((only.count, only.sum), (2, 3_000_000_000));
}

#[test]
fn sealing_within_a_byte_bound_splits_batches_and_keeps_every_record() {
    // A page being left seals into batches that fit the 64 KiB keepalive budget.
    let mut p = Producer::new(ProducerConfig::default(), [5; 32], 9, &["x".to_string()], 3)
        .expect("producer");
    let long = "e".repeat(150);
    for i in 0..1200 {
        p.record(T0, "page_view", Some(&format!("{long}{i}")), 1.0, None)
            .expect("record");
    }
    p.seal_within(T0, 16 << 10);
    let mut records = 0u64;
    let mut batches = 0;
    while let Some(t) = p.poll_transmit(T0) {
        assert!(t.bytes.len() <= 16 << 10, "{} bytes", t.bytes.len());
        let b = open(&t.bytes, &Limits::default(), T0).expect("valid batch");
        records += b.summaries.iter().map(|s| s.summary.count).sum::<u64>();
        batches += 1;
        p.handle_reply(T0, t.seq, Reply::Ack);
    }
    assert_eq!(records, 1200);
    assert!(batches >= 12, "{batches} batches");
    assert_eq!(p.stats().acked_records, 1200);
}

#[test]
fn a_restored_outbox_is_sent_and_shedding_counts_what_it_drops() {
    // A tab adopting a closed tab's stored batches: restored, sent, never persisted again.
    let mut a = Producer::new(
        ProducerConfig::default(),
        [6; 32],
        11,
        &["x".to_string()],
        3,
    )
    .expect("producer");
    for i in 0..3 {
        a.record(T0, "c", None, f64::from(i), None).expect("record");
        a.flush(T0 + i64::from(i));
    }
    let mut stored = Vec::new();
    while let Some(op) = a.poll_persist() {
        if let PersistOp::Put { seq, bytes } = op {
            stored.push((seq, bytes.to_vec()));
        }
    }
    assert_eq!(stored.len(), 3);
    let mut b = Producer::resume(
        ProducerConfig::default(),
        [6; 32],
        11,
        3,
        Vec::new(),
        &["x".to_string()],
        4,
    )
    .expect("resume");
    for (seq, bytes) in stored.iter().cloned() {
        b.restore(seq, bytes.clone());
        b.restore(seq, bytes); // twice: kept once
    }
    assert_eq!(b.stats().queued, 3);
    // Shedding keeps the one named and takes the oldest other.
    assert_eq!(b.drop_oldest(0), Some(1));
    let s = b.stats();
    assert_eq!((s.dropped, s.dropped_records, s.queued), (1, 1, 2));
    let sent: Vec<u64> = std::iter::from_fn(|| b.poll_transmit(T0).map(|t| t.seq)).collect();
    assert_eq!(sent, vec![0, 2]);
    // Nothing waits now, so nothing can be shed.
    assert_eq!(b.drop_oldest(u64::MAX), None);
    // Only the identity and the removal are persisted, never the restored batches again.
    let ops: Vec<PersistOp> = std::iter::from_fn(|| b.poll_persist()).collect();
    assert!(
        ops.iter().all(|o| !matches!(o, PersistOp::Put { .. })),
        "{ops:?}"
    );
    assert!(ops.contains(&PersistOp::Remove { seq: 1 }));
}

#[test]
fn an_outbox_restored_out_of_order_is_kept_in_seq_order() {
    // Five sealed batches, as a closed tab stored them.
    let mut a = Producer::new(
        ProducerConfig::default(),
        [7; 32],
        13,
        &["x".to_string()],
        3,
    )
    .expect("producer");
    for i in 0..5 {
        a.record(T0 + i, "c", None, 1.0, None).expect("record");
        a.flush(T0 + i);
    }
    let mut stored = BTreeMap::new();
    while let Some(op) = a.poll_persist() {
        if let PersistOp::Put { seq, bytes } = op {
            stored.insert(seq, bytes.to_vec());
        }
    }
    let seqs: Vec<u64> = stored.keys().copied().collect();
    assert_eq!(seqs.len(), 5);
    // Restored in a scrambled order, one twice: the outbox holds each once, in seq order.
    let mut b = Producer::new(
        ProducerConfig::default(),
        [7; 32],
        13,
        &["x".to_string()],
        3,
    )
    .expect("producer");
    for i in [3, 0, 4, 1, 3, 2] {
        b.restore(seqs[i], stored[&seqs[i]].clone());
    }
    assert_eq!(b.stats().queued, 5);
    assert_eq!(
        b.drop_oldest(seqs[0]),
        Some(seqs[1]),
        "oldest but the kept one"
    );
    let mut sent = Vec::new();
    while let Some(t) = b.poll_transmit(T0 + 10) {
        assert_eq!(&t.bytes[..], &stored[&t.seq][..]);
        sent.push(t.seq);
    }
    assert_eq!(sent, vec![seqs[0], seqs[2], seqs[3], seqs[4]]);
    // Acks out of order: a flush token is answered once every seq below it is.
    b.handle_reply(T0 + 11, seqs[3], Reply::Ack);
    assert!(!b.flushed(seqs[3] + 1));
    b.handle_reply(T0 + 11, seqs[0], Reply::Ack);
    b.handle_reply(T0 + 11, seqs[2], Reply::Ack);
    assert!(b.flushed(seqs[3] + 1));
    assert!(!b.flushed(seqs[4] + 1));
    b.handle_reply(T0 + 11, seqs[4], Reply::Ack);
    assert!(b.flushed(u64::MAX));
    let s = b.stats();
    assert_eq!(
        (s.acked, s.dropped, s.queued, s.in_flight, s.outbox_bytes),
        (4, 1, 0, 0, 0)
    );
}

#[test]
fn a_crafted_stored_batch_cannot_overflow_the_record_counters() {
    // Browser storage is page-writable: a stored "batch" may claim any counts. Restoring one
    // whose counts sum past u64::MAX saturates (it is sent as it is; the merger refuses it).
    let summary = |bucket| edgetally_core::BatchSummary {
        category: 0,
        entity: edgetally_core::NO_ENTITY,
        bucket,
        summary: edgetally_core::Summary {
            count: u64::MAX,
            sum: 0,
            min: 0.0,
            max: 0.0,
        },
    };
    let batch = edgetally_core::Batch {
        id: BatchId {
            producer: edgetally_core::ProducerKey([8; 32]),
            epoch: 1,
            seq: 0,
        },
        created_ms: T0,
        bucket_ms: 1000,
        strings: ["c"].into_iter().collect(),
        summaries: vec![summary(1), summary(2)],
        sketches: Vec::new(),
    };
    let payload = edgetally_proto::encode_payload(&batch).expect("encodes");
    let mut bytes = vec![edgetally_proto::VERSION];
    let mut n = payload.len();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        bytes.push(if n > 0 { b | 0x80 } else { b });
        if n == 0 {
            break;
        }
    }
    bytes.extend_from_slice(&payload);
    bytes.extend_from_slice(&[0; edgetally_proto::SIGNATURE_LEN]);

    let mut p = Producer::new(ProducerConfig::default(), [8; 32], 1, &["x".to_string()], 3)
        .expect("producer");
    // Two of them: each count saturates, and so does the sum of acked records.
    p.restore(0, bytes.clone());
    p.restore(1, bytes);
    while let Some(t) = p.poll_transmit(T0) {
        p.handle_reply(T0, t.seq, Reply::Ack);
    }
    let s = p.stats();
    assert_eq!((s.acked, s.acked_records), (2, u64::MAX));
}

/// The weights spread keys evenly even when keys differ in one byte only (the hard case for
/// a byte-at-a-time hash): 4,000 keys over 4 endpoints, each within 12 % of its share.
#[test]
fn rendezvous_first_choices_are_uniform() {
    let endpoints: Vec<String> = (0..4).map(|i| format!("127.0.0.1:{}", 7071 + i)).collect();
    let mut first = [0usize; 4];
    for k in 0..4000u32 {
        let mut key = [7u8; 32];
        key[31] = k as u8;
        key[0] = (k >> 8) as u8;
        first[rendezvous_order(&key, &endpoints)[0]] += 1;
    }
    assert!(
        first.iter().all(|&n| (880..=1120).contains(&n)),
        "{first:?}"
    );
}

/// A producer whose key signs elsewhere (the browser SDK's WebCrypto) seals unsigned, sends
/// nothing unsigned, and once the signatures are in sends byte for byte what a producer
/// holding the key sends; the merger's checks accept it.
#[test]
fn an_external_signer_sends_what_a_local_key_would() {
    let seed = [9u8; 32];
    let signer = edgetally_proto::Signer::from_seed(seed);
    let endpoints = ["m".to_string()];
    let cfg = ProducerConfig::default();
    let mut local = Producer::new(cfg.clone(), seed, 4, &endpoints, 3).expect("producer");
    let mut ext =
        Producer::resume_unsigned(cfg, signer.producer(), 4, 0, &endpoints, 3).expect("producer");
    assert_eq!(ext.producer_key(), local.producer_key());
    for p in [&mut local, &mut ext] {
        for i in 0..50 {
            p.record(T0, "c", Some(&format!("e{}", i % 7)), f64::from(i), None)
                .expect("record");
        }
        p.flush(T0);
    }
    let want = local.poll_transmit(T0).expect("local batch");
    // Unsigned: stored (so a page being left keeps it), not sent, but due at once for
    // signing: a driver that sleeps until `poll_timeout` must come back for `poll_sign`
    // without another call from the application (issue 28: a sealed batch waited for the
    // next `record()`).
    assert!(ext.poll_transmit(T0).is_none());
    assert!(
        ext.poll_timeout().is_some_and(|t| t <= T0),
        "due now for signing"
    );
    let puts: Vec<Arc<[u8]>> = std::iter::from_fn(|| ext.poll_persist())
        .filter_map(|op| match op {
            PersistOp::Put { bytes, .. } => Some(bytes),
            _ => None,
        })
        .collect();
    assert_eq!(puts.len(), 1);
    assert!(edgetally_proto::is_unsigned(&puts[0]));
    assert!(open(&puts[0], &Limits::default(), T0).is_err());
    let (seq, message) = ext.poll_sign().expect("one to sign");
    assert_eq!(seq, 0);
    assert!(message.starts_with(edgetally_proto::DOMAIN));
    // Handed out once; again only after a failure. While the signer has it, nothing is due.
    assert!(ext.poll_sign().is_none());
    assert_eq!(ext.poll_timeout(), None, "waiting for the signer");
    ext.sign_failed(seq);
    assert!(
        ext.poll_timeout().is_some_and(|t| t <= T0),
        "due again after a failure"
    );
    let (seq, message) = ext.poll_sign().expect("again");
    assert!(!ext.flushed(1));
    assert!(!ext.handle_signature(seq + 1, &[1; 64]), "no such batch");
    assert!(ext.handle_signature(seq, &signer.sign(&message)));
    assert!(!ext.handle_signature(seq, &[1; 64]), "already signed");
    // Stored again, signed.
    match ext.poll_persist() {
        Some(PersistOp::Put { seq: 0, bytes }) => assert_eq!(bytes, want.bytes),
        other => panic!("expected the signed put, got {other:?}"),
    }
    let got = ext.poll_transmit(T0).expect("signed batch");
    assert_eq!(got.bytes, want.bytes);
    assert!(open(&got.bytes, &Limits::default(), T0).is_ok());
    ext.handle_reply(T0, seq, Reply::Ack);
    assert!(ext.flushed(1));
    assert_eq!(ext.stats().acked_records, 50);
}

/// A stored unsigned batch (a page left before WebCrypto answered) is signed when restored:
/// by the producer's key at once if it holds it, else through `poll_sign`.
#[test]
fn a_restored_unsigned_batch_is_signed_before_it_is_sent() {
    let seed = [3u8; 32];
    let signer = edgetally_proto::Signer::from_seed(seed);
    let endpoints = ["m".to_string()];
    let cfg = ProducerConfig::default();
    let mut ext = Producer::resume_unsigned(cfg.clone(), signer.producer(), 8, 0, &endpoints, 1)
        .expect("producer");
    ext.record(T0, "c", None, 2.5, None).expect("record");
    ext.flush(T0);
    let stored: Vec<u8> = std::iter::from_fn(|| ext.poll_persist())
        .find_map(|op| match op {
            PersistOp::Put { bytes, .. } => Some(bytes.to_vec()),
            _ => None,
        })
        .expect("stored unsigned");
    let mut local = Producer::resume(
        cfg.clone(),
        seed,
        8,
        1,
        vec![(0, stored.clone())],
        &endpoints,
        1,
    )
    .expect("resume");
    let t = local.poll_transmit(T0).expect("sent signed");
    let b = open(&t.bytes, &Limits::default(), T0).expect("valid");
    assert_eq!((b.id.epoch, b.id.seq, b.summaries.len()), (8, 0, 1));
    let mut again =
        Producer::resume_unsigned(cfg, signer.producer(), 8, 1, &endpoints, 1).expect("producer");
    again.restore(0, stored);
    assert!(again.poll_transmit(T0).is_none());
    let (seq, m) = again.poll_sign().expect("to sign");
    assert!(again.handle_signature(seq, &signer.sign(&m)));
    assert_eq!(again.poll_transmit(T0).expect("sent").bytes, t.bytes);
}

/// The owner group, computed the naive way: the group whose name weighs most for the key.
fn heaviest(key: &[u8; 32], groups: &[&str]) -> String {
    groups
        .iter()
        .max_by_key(|g| edgetally_proto::producer::rendezvous_weight(key, g.as_bytes()))
        .map(|g| g.to_string())
        .unwrap_or_default()
}

#[test]
fn with_a_topology_each_batch_goes_to_its_owner_group_by_its_creation_time() {
    use edgetally_proto::topology::{Group, Map, Topology};
    let group = |name: &str, n: usize| Group {
        name: name.into(),
        quic: (1..=n).map(|i| format!("{name}-{i}:7071")).collect(),
        http: Vec::new(),
    };
    let switch = T0 + 60_000;
    let topology = Topology {
        version: 2,
        maps: vec![
            Map {
                from_ms: 0,
                groups: vec![group("g0", 2), group("g1", 2)],
            },
            Map {
                from_ms: switch,
                groups: vec![group("g0", 2), group("g1", 2), group("g2", 2)],
            },
        ],
        drains: Default::default(),
    };
    let endpoints: Vec<String> = topology
        .all_groups()
        .iter()
        .flat_map(|g| g.quic.clone())
        .collect();
    let mut moved = 0;
    for seed in 0..40u8 {
        let cfg = ProducerConfig::default();
        let mut p = Producer::new(cfg, [seed; 32], 1, &endpoints, 7).expect("producer");
        let key = p.producer_key().0;
        // Without a topology: the one rendezvous order, whatever the group.
        p.record(T0, "c", None, 1.0, None).expect("record");
        p.flush(T0);
        let t = p.poll_transmit(T0).expect("transmit");
        assert_eq!(t.endpoint, rendezvous_order(&key, &endpoints)[0]);
        p.handle_reply(T0, t.seq, Reply::Ack);
        p.set_topology(Some(topology.clone()));
        for (at, groups) in [
            (T0 + 1_000, &["g0", "g1"][..]),
            (switch + 1_000, &["g0", "g1", "g2"][..]),
        ] {
            let owner = heaviest(&key, groups);
            p.record(at, "c", None, 1.0, None).expect("record");
            p.flush(at);
            let t = p.poll_transmit(at).expect("transmit");
            let name = &endpoints[t.endpoint];
            assert!(
                name.starts_with(&format!("{owner}-")),
                "{name} is not {owner}'s"
            );
            // Its replica down: the other replica of the same group, not another group.
            p.handle_transport_error(at, t.seq, t.endpoint);
            let again = p.poll_timeout().expect("retry");
            let t2 = p.poll_transmit(again).expect("resend");
            let name2 = &endpoints[t2.endpoint];
            assert!(name2.starts_with(&format!("{owner}-")) && name2 != name);
            p.handle_reply(again, t2.seq, Reply::Ack);
        }
        moved += usize::from(heaviest(&key, &["g0", "g1"]) != heaviest(&key, &["g0", "g1", "g2"]));
    }
    // Adding g2 moves about a third of the producers, and only to g2.
    assert!((5..=25).contains(&moved), "{moved} of 40 moved");
}

#[test]
fn a_drained_groups_batches_go_to_its_heir_and_urls_match_host_port() {
    use edgetally_proto::topology::{Group, Map, Topology};
    let group = |name: &str| Group {
        name: name.into(),
        quic: vec![format!("{name}.test:7071")],
        http: vec![format!("{name}.test:7070")],
    };
    let topology = Topology {
        version: 3,
        maps: vec![Map {
            from_ms: 0,
            groups: vec![group("g0"), group("g1")],
        }],
        drains: [("g1".to_string(), "g0".to_string())].into(),
    };
    // A browser's endpoints are URLs: matched to the groups' `http` addresses by host:port.
    let endpoints: Vec<String> = vec![
        "https://g1.test:7070/".into(),
        "https://g0.test:7070/".into(),
    ];
    for seed in 0..16u8 {
        let mut p = Producer::new(ProducerConfig::default(), [seed; 32], 1, &endpoints, 7)
            .expect("producer");
        p.set_topology(Some(topology.clone()));
        p.record(T0, "c", None, 1.0, None).expect("record");
        p.flush(T0);
        let t = p.poll_transmit(T0).expect("transmit");
        assert_eq!(
            t.endpoint, 1,
            "g1 is drained into g0: every batch goes to g0"
        );
    }
}

/// A driver that does nothing but sleep until `poll_timeout` and then serve the machine
/// (`poll_sign`, `poll_transmit`) delivers a burst recorded once, with no further call from
/// the application, within the flush interval — for a local key and for an external signer
/// (the browser's WebCrypto) alike. Issue 28, finding 5: the external signer's sealed batch
/// was not due, so the driver slept until the application called again.
#[test]
fn a_burst_recorded_once_is_delivered_by_a_driver_that_only_sleeps_until_poll_timeout() {
    let seed = [5u8; 32];
    let signer = edgetally_proto::Signer::from_seed(seed);
    let endpoints = ["m".to_string()];
    let cfg = ProducerConfig {
        flush_interval_ms: 2000,
        ..ProducerConfig::default()
    };
    let local = Producer::new(cfg.clone(), seed, 1, &endpoints, 3).expect("producer");
    let ext =
        Producer::resume_unsigned(cfg, signer.producer(), 1, 0, &endpoints, 3).expect("producer");
    for (name, mut p) in [("local", local), ("external", ext)] {
        for i in 0..200 {
            p.record(T0, "burst", None, f64::from(i), None)
                .expect("record");
        }
        let mut now = T0;
        let mut steps = 0;
        while p.stats().acked_records < 200 {
            steps += 1;
            assert!(
                steps < 100,
                "{name}: the driver was never woken for the burst"
            );
            let Some(due) = p.poll_timeout() else {
                panic!("{name}: nothing due while {:?} is unacked", p.stats());
            };
            now = now.max(due);
            while let Some((seq, m)) = p.poll_sign() {
                assert!(p.handle_signature(seq, &signer.sign(&m)));
            }
            while let Some(t) = p.poll_transmit(now) {
                assert!(open(&t.bytes, &Limits::default(), now).is_ok());
                p.handle_reply(now, t.seq, Reply::Ack);
            }
        }
        assert!(
            now - T0 <= 2000,
            "{name}: delivered {} ms after the burst, past the flush interval",
            now - T0
        );
    }
}
