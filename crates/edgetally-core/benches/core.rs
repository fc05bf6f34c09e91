//! Criterion benchmarks of the core: apply throughput and query latency.
//! Run: `cargo xtask bench core` (or `cargo bench -p edgetally-core --bench core`).

mod common;

use common::{iot_batch, wide_batch, T0};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use edgetally_core::{Replica, TopBy};
use std::hint::black_box;

fn apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("apply");
    // 500 batches × 200 summaries, spread over 100 seconds, into a fresh replica.
    let batches: Vec<_> = (0..500u64)
        .map(|i| iot_batch((i % 5) as u8, i, 200, (i / 5) as i64))
        .collect();
    g.throughput(Throughput::Elements(500 * 200));
    g.bench_function("100k_summaries_fresh_replica", |b| {
        b.iter_batched(
            Replica::new,
            |mut r| {
                for e in &batches {
                    r.apply(e.clone()).expect("apply");
                }
                r
            },
            BatchSize::LargeInput,
        )
    });
    // The same into a warm replica already holding those keys (steady state: same devices,
    // new seconds).
    let warm: Vec<_> = (0..500u64)
        .map(|i| iot_batch((i % 5) as u8, 1000 + i, 200, 100 + (i / 5) as i64))
        .collect();
    g.bench_function("100k_summaries_warm_replica", |b| {
        b.iter_batched(
            || {
                let mut r = Replica::new();
                for e in &batches {
                    r.apply(e.clone()).expect("apply");
                }
                r
            },
            |mut r| {
                for e in &warm {
                    r.apply(e.clone()).expect("apply");
                }
                r
            },
            BatchSize::LargeInput,
        )
    });
    // A merger's steady state with a key space larger than the caches: 40,000 series
    // (10,000 devices × 4 metrics) already present, 500 batches of 200 into new seconds.
    let wide: Vec<_> = (0..500u64)
        .map(|i| wide_batch((i % 8) as u8, 10_000 + i, 200, 200 + (i / 40) as i64))
        .collect();
    g.bench_function("100k_summaries_40k_series", |b| {
        b.iter_batched(
            || {
                let mut r = Replica::new();
                for i in 0..400u64 {
                    r.apply(wide_batch((i % 8) as u8, i, 200, (i / 40) as i64))
                        .expect("apply");
                }
                r
            },
            |mut r| {
                for e in &wide {
                    r.apply(e.clone()).expect("apply");
                }
                r
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// 30 days of one-minute data for 20 devices (864,000 summaries), seconds pruned beyond 2 days.
pub fn month_replica() -> Replica {
    let mut r = Replica::new();
    for (seq, minute) in (0..30 * 24 * 60i64).enumerate() {
        r.apply(iot_batch(9, seq as u64, 20, -minute * 60))
            .expect("apply");
    }
    r.prune_tiers(T0, &edgetally_core::Retention::default());
    r.prune_log();
    r
}

fn query(c: &mut Criterion) {
    let r = month_replica();
    let mut g = c.benchmark_group("query");
    let start = T0 - 30 * 86_400_000 + 12_345;
    g.bench_function("aggregate_30_days", |b| {
        b.iter(|| r.aggregate(black_box("temperature"), None, start, T0 + 1000))
    });
    g.bench_function("aggregate_30_days_one_entity", |b| {
        b.iter(|| {
            r.aggregate(
                black_box("temperature"),
                Some("device-00007"),
                start,
                T0 + 1000,
            )
        })
    });
    g.bench_function("topk_entity_30_days_20_entities", |b| {
        b.iter(|| r.topk("temperature", start, T0 + 1000, 5, TopBy::Entity))
    });
    g.bench_function("aggregate_last_60s", |b| {
        b.iter(|| r.aggregate("temperature", None, T0 - 60_000, T0 + 1000))
    });
    g.finish();
}

criterion_group!(benches, apply, query);
criterion_main!(benches);
