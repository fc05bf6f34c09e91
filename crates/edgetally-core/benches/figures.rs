//! Figures criterion does not give: memory per live key and per producer seen-set (counted by a
//! global allocator), and the latency distribution (p50/p99) of a 30-day range query, and of
//! distinct counts and percentiles over 1 hour and 30 days.
//! Run: `cargo xtask bench figures`.

mod common;

use common::{iot_batch, T0};
use edgetally_core::{Replica, Retention};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The highest `LIVE` since it was last reset (`PEAK.store(LIVE)`).
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        // Old and new blocks both live during the copy.
        PEAK.fetch_max(LIVE.load(Ordering::Relaxed) + n, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        LIVE.fetch_add(n, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// A replica to which `n` producers sent one batch each (one summary, one category), its log
/// pruned: the state, not the replication backlog.
fn one_batch_producers(n: u32) -> Replica {
    let mut r = Replica::new();
    for p in 0..n {
        let mut e = iot_batch(0, 3, 1, 0);
        let b = std::sync::Arc::make_mut(&mut e.batch);
        b.id.producer.0[..4].copy_from_slice(&p.to_le_bytes());
        r.apply(e).expect("apply");
    }
    r.prune_log();
    r
}

/// A compaction's extra heap and time under the replica's lock: the snapshot built as a value
/// and encoded (before) against streamed from the tables (`write_snapshot`, into a buffered
/// sink standing in for the file). Medians of 5.
fn snapshot_cost(what: &str, r: &Replica, state: usize) {
    let mut built = Vec::new();
    let mut streamed = Vec::new();
    let (mut built_peak, mut streamed_peak, mut size) = (0, 0, 0);
    for _ in 0..5 {
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let t = Instant::now();
        let bytes = r.snapshot().encode();
        built.push(t.elapsed().as_secs_f64() * 1e3);
        built_peak = PEAK.load(Ordering::Relaxed) - base;
        size = bytes.len();
        drop(bytes);
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let t = Instant::now();
        let sink = std::io::BufWriter::with_capacity(256 << 10, std::io::sink());
        r.write_snapshot(sink).expect("write");
        streamed.push(t.elapsed().as_secs_f64() * 1e3);
        streamed_peak = PEAK.load(Ordering::Relaxed) - base;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "snapshot of {what} (state {:.1} MB, encoded {:.1} MB): built then encoded {:.1} ms, +{:.1} MB heap; streamed {:.1} ms, +{:.1} MB heap",
        state as f64 / 1e6,
        size as f64 / 1e6,
        median(&mut built),
        built_peak as f64 / 1e6,
        median(&mut streamed),
        streamed_peak as f64 / 1e6
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo test/bench discovery
    }
    // Memory per live key: 1,000 devices × 600 seconds = 600,000 (category, entity, second) keys.
    let before = LIVE.load(Ordering::Relaxed);
    let mut r = Replica::new();
    for s in 0..600u64 {
        r.apply(iot_batch(0, s, 1000, s as i64)).expect("apply");
    }
    r.set_peers(Vec::<String>::new());
    r.prune_log(); // count the state, not the replication backlog
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    let keys = 1000 * 600;
    println!("memory: {keys} live keys (1 s buckets, 1,000 entities, 1 category): {bytes} bytes, {:.1} bytes/key (all tiers and rollups included; {} tier entries)", bytes as f64 / keys as f64, r.entry_count());
    snapshot_cost("600,000 live keys", &r, bytes);
    drop(r);

    // Memory per producer seen-set: 100,000 producers with one epoch each, in-order seqs.
    let before = LIVE.load(Ordering::Relaxed);
    let r = one_batch_producers(100_000);
    let with_state = LIVE.load(Ordering::Relaxed) - before;
    let before = LIVE.load(Ordering::Relaxed);
    let digest = r.digest();
    let seen_only = LIVE.load(Ordering::Relaxed) - before;
    println!("memory: seen-sets alone (the digest of 100,000 (producer, epoch) pairs): {:.1} bytes/producer", seen_only as f64 / digest.epochs.len() as f64);
    drop(digest);
    println!("memory: 100,000 producers, one epoch each: {with_state} bytes in all, {:.1} bytes/producer (seen-set, producer index, per-producer minute/hour series of one key)", with_state as f64 / 100_000.0);
    drop(r);

    // Per new entity series: 100,000 entities of one category, one summary each (one batch
    // of 1,000 per second), so every tier entry and series header is a new one.
    let before = LIVE.load(Ordering::Relaxed);
    let mut r = Replica::new();
    for s in 0..100u64 {
        let mut e = iot_batch(0, s, 1000, 0);
        let b = std::sync::Arc::make_mut(&mut e.batch);
        b.strings = std::iter::once("temperature".to_string())
            .chain((0..1000).map(|i| format!("device-{:07}", s * 1000 + i)))
            .collect();
        r.apply(e).expect("apply");
    }
    r.prune_log();
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    println!("memory: per new entity series (100,000 entities, one summary each): {:.1} bytes/entity (series header, its 1 s/1 min/1 h entries, index, string)", bytes as f64 / 100_000.0);
    drop(r);

    // Per new category: 20,000 categories, one summary each (no entity).
    let before = LIVE.load(Ordering::Relaxed);
    let mut r = Replica::new();
    for s in 0..20u64 {
        let mut e = iot_batch(0, s, 1000, 0);
        let b = std::sync::Arc::make_mut(&mut e.batch);
        b.strings = (0..1000)
            .map(|i| format!("category-{:07}", s * 1000 + i))
            .collect();
        for (i, x) in b.summaries.iter_mut().enumerate() {
            x.category = i as u32;
            x.entity = edgetally_core::NO_ENTITY;
        }
        r.apply(e).expect("apply");
    }
    r.prune_log();
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    println!("memory: per new category (20,000 categories, one summary each, no entity): {:.1} bytes/category (its all, no-entity and producer series, index, string)", bytes as f64 / 20_000.0);
    drop(r);

    // Per idle producer: 100,000 producers sent one batch each, then fell silent; their
    // seen-sets expired. What stays: the key, its index, its minute/hour rollup entries.
    let before = LIVE.load(Ordering::Relaxed);
    let mut r = one_batch_producers(100_000);
    r.expire(i64::MAX - 1);
    let after_expiry = LIVE.load(Ordering::Relaxed) - before;
    println!("memory: per idle producer (100,000 producers, one batch each, seen-sets expired): {:.1} bytes/producer (key, index, per-producer minute/hour rollups of one category)", after_expiry as f64 / 100_000.0);
    snapshot_cost("100,000 idle producers", &r, after_expiry);
    drop(r);

    // Ephemeral producers over simulated time: 1,000,000 fresh keys, 100,000 a simulated day
    // for 10 days, one batch each; seen-sets expire at each simulated hour past a 1-day
    // lateness horizon; retention keeps minutes 2 days and hours 5 days. Heap counted by the
    // allocator; the replica's own estimate by kind beside it.
    let before = LIVE.load(Ordering::Relaxed);
    let mut r = Replica::new();
    let retention = Retention {
        tiers: [Some(86_400_000), Some(2 * 86_400_000), Some(5 * 86_400_000)],
    };
    let per_hour = 100_000 / 24 + 1;
    let mut p = 0u32;
    for hour in 0..240i64 {
        for _ in 0..per_hour {
            let mut e = iot_batch(0, 3, 1, hour * 3600 + (p % 3600) as i64);
            let b = std::sync::Arc::make_mut(&mut e.batch);
            b.id.producer.0[..4].copy_from_slice(&p.to_le_bytes());
            b.id.producer.0[4] = 0xe5;
            r.apply(e).expect("apply");
            p += 1;
        }
        r.prune_log();
        let now = T0 + (hour + 1) * 3_600_000;
        r.expire(now - 86_400_000);
        r.prune_tiers(now, &retention);
        if (hour + 1) % 48 == 0 {
            let m = r.memory();
            println!(
                "memory: ephemeral producers, day {:>2}: {:>7} producers so far, {:>6} live epochs, {:>6} keys held, heap {:.1} MB (estimate by kind, MB: seen {:.1}, producers {:.1}, series {:.1}, entries {:.1})",
                (hour + 1) / 24, p, r.epoch_count(), r.producers_held(),
                (LIVE.load(Ordering::Relaxed) - before) as f64 / 1e6,
                m.seen as f64 / 1e6, m.producers as f64 / 1e6, m.series as f64 / 1e6, m.entries as f64 / 1e6
            );
        }
    }
    drop(r);

    // p50/p99 of a 30-day aggregate over realistic data.
    let mut r = Replica::new();
    for (seq, minute) in (0..30 * 24 * 60i64).enumerate() {
        r.apply(iot_batch(9, seq as u64, 20, -minute * 60))
            .expect("apply");
    }
    r.prune_tiers(T0, &Retention::default());
    r.prune_log();
    let mut lat = Vec::with_capacity(20_000);
    let mut x = 0u64;
    for i in 0..20_000i64 {
        let start = T0 - 30 * 86_400_000 + (i * 7919) % 3_600_000;
        let t = Instant::now();
        let a = r.aggregate(
            "temperature",
            if i % 2 == 0 {
                None
            } else {
                Some("device-00003")
            },
            start,
            T0 + 1000,
        );
        lat.push(t.elapsed().as_nanos() as u64);
        x = x.wrapping_add(a.total.count);
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    println!("query: 30-day aggregate over 864,000 summaries (20 entities, 1-min data): p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs (checksum {x})", pct(0.5), pct(0.99), pct(1.0));
    drop(r);
    sketch_queries();
}

/// p50/p99 of a distinct count and of three quantiles over 1 hour and over 30 days: 30 days
/// of minute batches, 20 devices each with 4 of 20,000 subjects and 4 latency values per
/// summary, pruned to the default sketch retention (minutes 2 days, hours 400 days), as a
/// node holds them.
/// 30 days of minute batches (20 devices, 4 records each a minute), with sketches on every
/// summary if `sketched`: 4 of 20,000 subjects and the 4 values; pruned to the default
/// retention of totals and sketches, as a node holds them.
fn thirty_days(sketched: bool) -> Replica {
    use edgetally_core::sketches::Sketches;
    let mut r = Replica::new();
    let mut subject = 0u64;
    for (seq, minute) in (0..30 * 24 * 60i64).enumerate() {
        let mut e = iot_batch(9, seq as u64, 20, -minute * 60);
        let b = std::sync::Arc::make_mut(&mut e.batch);
        if sketched {
            b.sketches = (0..b.summaries.len() as u32)
                .map(|i| {
                    let mut k = Sketches::default();
                    for j in 0..4 {
                        subject += 1;
                        let name = format!("user-{}", subject % 20_000);
                        k.insert_subject(edgetally_core::sketches::subject_hash(&name, None), 14);
                        let v = (seq as u64 + u64::from(i) * 7 + j) % 400;
                        k.insert_value(20.0 + v as f64, 1);
                    }
                    (i, k)
                })
                .collect();
        }
        r.apply(e).expect("apply");
    }
    r.prune_tiers(T0, &Retention::default());
    r.prune_sketch_tiers(T0, [Some(2 * 86_400_000), Some(400 * 86_400_000)]);
    r.prune_log();
    r
}

/// p50/p99 of a distinct count and of three quantiles over 1 hour and over 30 days
/// ([`thirty_days`]), and what the sketches cost in heap against the replica's estimate.
fn sketch_queries() {
    let before = LIVE.load(Ordering::Relaxed);
    let plain = thirty_days(false);
    let plain_heap = LIVE.load(Ordering::Relaxed) - before;
    let plain_est = plain.memory().total();
    drop(plain);
    let before = LIVE.load(Ordering::Relaxed);
    let r = thirty_days(true);
    let heap = LIVE.load(Ordering::Relaxed) - before;
    let m = r.memory();
    println!(
        "memory: 30 days, 21 series (sketches: 2 days of minutes, 720 hours): heap {:.1} MB without sketches, {:.1} MB with; the sketches' heap {:.1} MB against their estimate {:.1} MB (the whole estimate {:.1} MB without, {:.1} MB with)",
        plain_heap as f64 / 1e6,
        heap as f64 / 1e6,
        (heap - plain_heap) as f64 / 1e6,
        m.sketches as f64 / 1e6,
        plain_est as f64 / 1e6,
        m.total() as f64 / 1e6,
    );
    for (label, span) in [("1 hour", 3_600_000i64), ("30 days", 30 * 86_400_000)] {
        for entity in [None, Some("device-00003")] {
            let mut lat = Vec::with_capacity(2_000);
            let mut x = 0f64;
            for i in 0..2_000i64 {
                let start = T0 - span + (i * 7919) % 3_600_000;
                let t = Instant::now();
                let a = r.sketches("temperature", entity, start, T0 + 1000);
                let d = a.sketches.distinct.as_ref().map_or(0.0, |h| h.estimate());
                let q = a.sketches.quantiles.as_ref().map_or(0.0, |q| {
                    [0.5, 0.9, 0.99]
                        .iter()
                        .map(|&p| q.quantile(p).unwrap_or(0.0))
                        .sum()
                });
                lat.push(t.elapsed().as_nanos() as u64);
                x += d + q;
            }
            lat.sort_unstable();
            let pct =
                |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
            println!(
                "query: distinct + p50/p90/p99 over {label}, {}: p50 {:.1} µs, p99 {:.1} µs (checksum {x:.0})",
                if entity.is_some() { "one entity" } else { "all 20 entities" },
                pct(0.5),
                pct(0.99)
            );
        }
    }
}
