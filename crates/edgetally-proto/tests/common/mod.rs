//! Helpers shared by the replica property tests: batches of a few producers and epochs.
#![allow(dead_code)] // each test file uses some of them

use edgetally_core::{Batch, BatchId, LogEntry};
use edgetally_proto::{BatchBuilder, Signer};
use std::sync::Arc;

pub const NOW: i64 = 1_700_000_000_000;

pub fn entry(b: &Batch) -> LogEntry {
    LogEntry {
        batch: Arc::new(b.clone()),
        raw: Arc::from(&[][..]),
    }
}

/// A record: category, entity, age (ms before `NOW`), value in quarters.
pub type Rec = (u8, Option<u8>, i64, i32);

/// Batches of a few producers and epochs (seqs consecutive per epoch), with entities, values
/// and times drawn from `recs`.
pub fn batches(spec: &[(u8, u8, Vec<Rec>)]) -> Vec<Batch> {
    let mut seq = std::collections::BTreeMap::<(u8, u8), u64>::new();
    spec.iter()
        .map(|(p, e, recs)| {
            let s = Signer::from_seed([p + 1; 32]);
            let mut b = BatchBuilder::new(1_000).expect("width");
            for &(c, ent, ago, v) in recs {
                let ent = ent.map(|x| format!("e{x}"));
                b.record(
                    ["a", "b", "c"][c as usize % 3],
                    ent.as_deref(),
                    NOW - ago,
                    f64::from(v) / 4.0,
                )
                .expect("record");
            }
            let n = seq.entry((*p, *e)).or_default();
            *n += 1;
            b.finish(
                BatchId {
                    producer: s.producer(),
                    epoch: u64::from(*e),
                    seq: *n - 1,
                },
                NOW,
            )
        })
        .collect()
}
