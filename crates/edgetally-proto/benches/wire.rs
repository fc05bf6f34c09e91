//! Criterion benchmarks of the wire: encode, decode, and signature verification (single and
//! batched). Run: `cargo xtask bench wire`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use edgetally_core::{Batch, BatchId, BatchSummary, Limits, Summary};
use edgetally_proto::{decode, encode_payload, verify_many, Signer};
use std::hint::black_box;

const T0: i64 = 1_700_000_000_000;

fn batch(signer: &Signer, seq: u64, n: u32) -> Batch {
    // Canonical form, as the SDK's builder emits it: strings sorted, summaries in key order.
    let mut strings = edgetally_core::StringTable::new();
    (0..n).for_each(|i| {
        strings.push(&format!("device-{i:05}"));
    });
    strings.push("temperature");
    Batch {
        id: BatchId {
            producer: signer.producer(),
            epoch: 1,
            seq,
        },
        created_ms: T0,
        bucket_ms: 1000,
        strings,
        summaries: (0..n)
            .map(|i| BatchSummary {
                category: n,
                entity: i + 1,
                bucket: T0 / 1000,
                summary: Summary {
                    count: 4,
                    sum: 4 * 21_500_000_000 + i as i128,
                    min: 20.0,
                    max: 23.0,
                },
            })
            .collect(),
        sketches: Vec::new(),
    }
}

fn codec(c: &mut Criterion) {
    let s = Signer::from_seed([7; 32]);
    let b = batch(&s, 0, 200);
    let sealed = s.seal(&b).expect("seal");
    let limits = Limits::default();
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(200));
    g.bench_function("encode_payload_200", |x| {
        x.iter(|| encode_payload(black_box(&b)))
    });
    g.bench_function("decode_200", |x| {
        x.iter(|| decode(black_box(&sealed), &limits).expect("decode"))
    });
    g.finish();
    println!(
        "size: a 200-summary batch (200 entities, one category) is {} bytes sealed",
        sealed.len()
    );
}

fn signatures(c: &mut Criterion) {
    let s = Signer::from_seed([8; 32]);
    let limits = Limits::default();
    let sealed: Vec<Vec<u8>> = (0..64)
        .map(|i| s.seal(&batch(&s, i, 1)).expect("seal"))
        .collect();
    let mut g = c.benchmark_group("verify");
    g.throughput(Throughput::Elements(1));
    g.bench_function("single", |x| {
        x.iter_batched(
            || decode(&sealed[0], &limits).expect("decode"),
            |u| u.verify().expect("verify"),
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Elements(64));
    g.bench_function("verify_many_64", |x| {
        x.iter_batched(
            || {
                sealed
                    .iter()
                    .map(|b| decode(b, &limits).expect("decode"))
                    .collect::<Vec<_>>()
            },
            |us| {
                let r = verify_many(us);
                assert!(r.iter().all(Result::is_ok));
                r
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, codec, signatures);
criterion_main!(benches);
