//! The core and the wire by hand, no network: two producers record events, seal signed
//! batches; two replicas receive different subsets (one of them twice), exchange what they
//! lack through their digests, and end up with identical answers.
//!
//! Run: `cargo run -p edgetally-examples --bin seal-and-merge`

use edgetally_core::{BatchId, Limits, LogEntry, Replica};
use edgetally_proto::{open, BatchBuilder, Signer};
use std::sync::Arc;

const NOW: i64 = 1_700_000_000_000;

fn main() {
    let producers = [Signer::from_seed([11; 32]), Signer::from_seed([12; 32])];
    let mut sealed = Vec::new();
    for (p, signer) in producers.iter().enumerate() {
        for seq in 0..3u64 {
            let mut b = BatchBuilder::new(1000).expect("1 s buckets");
            for i in 0..10 {
                let device = format!("dev-{}", (i + p) % 4);
                b.record(
                    "temperature",
                    Some(&device),
                    NOW - 1000 * i as i64,
                    20.0 + i as f64 * 0.5,
                )
                .expect("valid record");
            }
            let id = BatchId {
                producer: signer.producer(),
                epoch: 1,
                seq,
            };
            sealed.push(signer.seal(&b.finish(id, NOW)).expect("seal"));
        }
    }
    let receive = |r: &mut Replica, bytes: &[u8]| {
        let batch = open(bytes, &Limits::default(), NOW).expect("valid batch");
        r.apply(LogEntry {
            batch: Arc::new(batch),
            raw: Arc::from(bytes),
        })
        .expect("apply")
    };
    let (mut a, mut b) = (Replica::new(), Replica::new());
    for (i, bytes) in sealed.iter().enumerate() {
        if i % 2 == 0 {
            receive(&mut a, bytes);
            receive(&mut a, bytes); // a duplicate changes nothing
        } else {
            receive(&mut b, bytes);
        }
    }
    // Anti-entropy: each sends the other what its digest lacks.
    for e in a.missing_for(&b.digest()) {
        b.apply(e).expect("apply");
    }
    for e in b.missing_for(&a.digest()) {
        a.apply(e).expect("apply");
    }
    let qa = a.aggregate("temperature", None, NOW - 60_000, NOW + 1000);
    let qb = b.aggregate("temperature", None, NOW - 60_000, NOW + 1000);
    assert_eq!(qa, qb);
    println!(
        "count={} sum={} min={} max={} window=[{}, {})",
        qa.total.count,
        qa.total.sum.to_decimal(),
        qa.total.min,
        qa.total.max,
        qa.start,
        qa.end
    );
}
