//! The producer's record paths (native): `cargo xtask bench sdk`.
//! Events are timestamped "now" (one bucket), as in a hot loop; values are decimals with up
//! to three places, cycled from a table so the value source costs nothing.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use edgetally_proto::producer::{Producer, ProducerConfig};
use std::hint::black_box;

const N: usize = 1 << 20;
const NOW: i64 = 1_700_000_000_000;

fn producer() -> Producer {
    let config = ProducerConfig {
        flush_interval_ms: i64::MAX / 4,
        ..ProducerConfig::default()
    };
    Producer::new(config, [7; 32], 1, &["a".to_string()], 1).expect("config")
}

fn values() -> Vec<f64> {
    (0..1024)
        .map(|i| f64::from(i * 37 % 1000) / 8.0 + 0.125)
        .collect()
}

fn record(c: &mut Criterion) {
    let vals = values();
    let mut g = c.benchmark_group("record");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("handle", |b| {
        let mut p = producer();
        let h = p.handle("latency_ms", Some("edge-1")).expect("handle");
        b.iter(|| {
            for i in 0..N {
                let _ = p.record_handle(NOW, h, black_box(vals[i & 1023]), None);
            }
        });
    });
    g.bench_function("handle_16_keys", |b| {
        let mut p = producer();
        let hs: Vec<_> = (0..16)
            .map(|i| {
                p.handle("latency_ms", Some(&format!("edge-{i}")))
                    .expect("handle")
            })
            .collect();
        b.iter(|| {
            for i in 0..N {
                let _ = p.record_handle(NOW, hs[i & 15], black_box(vals[i & 1023]), None);
            }
        });
    });
    g.bench_function("record_many", |b| {
        let mut p = producer();
        let h = p.handle("latency_ms", None).expect("handle");
        let big: Vec<f64> = (0..N).map(|i| vals[i & 1023]).collect();
        b.iter(|| p.record_many(NOW, h, black_box(&big), None));
    });
    g.bench_function("string", |b| {
        let mut p = producer();
        b.iter(|| {
            for i in 0..N {
                let _ = p.record(
                    NOW,
                    "latency_ms",
                    Some("edge-1"),
                    black_box(vals[i & 1023]),
                    None,
                );
            }
        });
    });
    g.finish();
}

criterion_group!(benches, record);
criterion_main!(benches);
