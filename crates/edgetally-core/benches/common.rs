// Shared workload builders for the core benchmarks (included with `mod common`).
#![allow(dead_code)]

use edgetally_core::{Batch, BatchId, BatchSummary, LogEntry, ProducerKey, Summary};
use std::sync::Arc;

pub const T0: i64 = 1_700_000_000_000;

/// An IoT-shaped batch: one category, `n` devices, one summary each, in one second.
pub fn iot_batch(producer: u8, seq: u64, n: u32, second: i64) -> LogEntry {
    let mut strings = edgetally_core::StringTable::new();
    strings.push("temperature");
    (0..n).for_each(|i| {
        strings.push(&format!("device-{i:05}"));
    });
    let summaries = (0..n)
        .map(|i| BatchSummary {
            category: 0,
            entity: i + 2,
            bucket: T0 / 1000 + second,
            summary: Summary {
                count: 4,
                sum: 4 * 21_500_000_000,
                min: 20.0,
                max: 23.0,
            },
        })
        .collect();
    entry(producer, seq, strings, summaries)
}

/// A batch shaped like the merger benchmark's (`edgetally-bench loadgen`): 200 of 10,000 devices,
/// starting at a rotating offset, under one of four metric categories — a key space of
/// 40,000 series, too large for the CPU caches, as a busy merger's is.
pub fn wide_batch(producer: u8, seq: u64, n: u32, second: i64) -> LogEntry {
    let first = (seq as u32).wrapping_mul(n) % 10_000;
    let mut devices: Vec<u32> = (0..n).map(|i| (first + i) % 10_000).collect();
    devices.sort_unstable();
    let mut strings = edgetally_core::StringTable::new();
    for d in &devices {
        strings.push(&format!("device-{d:05}"));
    }
    strings.push(&format!("metric-{}", producer % 4));
    let summaries = (0..n)
        .map(|i| BatchSummary {
            category: n,
            entity: i + 1,
            bucket: T0 / 1000 + second,
            summary: Summary {
                count: 5,
                sum: 5 * 21_000_000_000 + i as i128 * 1000,
                min: 20.0,
                max: 22.5,
            },
        })
        .collect();
    entry(producer, seq, strings, summaries)
}

/// A log entry of producer `producer` (epoch 1), 1-second buckets, created at `T0`.
fn entry(
    producer: u8,
    seq: u64,
    strings: edgetally_core::StringTable,
    summaries: Vec<BatchSummary>,
) -> LogEntry {
    let batch = Batch {
        id: BatchId {
            producer: ProducerKey([producer; 32]),
            epoch: 1,
            seq,
        },
        created_ms: T0,
        bucket_ms: 1000,
        strings,
        summaries,
        sketches: Vec::new(),
    };
    LogEntry {
        batch: Arc::new(batch),
        raw: Arc::from(Vec::new()),
    }
}
