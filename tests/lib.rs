//! Shared helpers for the integration tests: a seeded RNG, an independent ground-truth model,
//! and workload generators.

use edgetally_core::sketches::{subject_hash, Hll, Quantiles};
use edgetally_core::{Batch, BatchId, LogEntry, ProducerKey};
use edgetally_proto::{BatchBuilder, Signer, SketchOpts};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A fixed time near which all generated events fall.
pub const NOW: i64 = 1_700_000_000_000;

/// SplitMix64: small, seeded, reproducible.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// One generated event. `eighths` is the value × 8, so every value is an exact binary
/// fraction and its nano-unit equivalent is `eighths × 125_000_000` — computed here without
/// the library's conversion.
#[derive(Clone, Debug)]
pub struct Event {
    /// Category name.
    pub category: String,
    /// Entity, if any.
    pub entity: Option<String>,
    /// Event time.
    pub ts_ms: i64,
    /// Value × 8.
    pub eighths: i64,
}

impl Event {
    /// The value as the SDK records it.
    pub fn value(&self) -> f64 {
        self.eighths as f64 / 8.0
    }

    /// The subject of the event, a function of its fields (so every generated workload
    /// exercises distinct counts): one of 40 visitors for `page_view` and `purchase`, none
    /// for the other categories.
    pub fn subject(&self) -> Option<String> {
        matches!(self.category.as_str(), "page_view" | "purchase")
            .then(|| format!("visitor-{}", self.eighths.rem_euclid(40)))
    }

    /// Whether its category keeps quantiles (`temp`).
    pub fn quantiles(&self) -> bool {
        self.category == "temp"
    }

    /// What the event adds to its summary's sketches.
    pub fn sketch_opts(&self) -> SketchOpts {
        SketchOpts {
            subject: self
                .subject()
                .map(|s| (subject_hash(&s, None), SKETCH_PRECISION)),
            quantiles: self.quantiles(),
        }
    }
}

/// The precision of the generated workloads' distinct-count sketches (small: the
/// simulations hold many).
pub const SKETCH_PRECISION: u8 = 10;

/// The naive model's totals for one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truth {
    /// Records.
    pub count: u64,
    /// Sum in nano-units.
    pub sum_nanos: i128,
    /// Min value × 8.
    pub min8: i64,
    /// Max value × 8.
    pub max8: i64,
}

/// Ground truth: totals per (category, entity, second), computed by plain iteration.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// (category, entity, bucket start ms) → totals.
    pub keys: BTreeMap<(String, Option<String>, i64), Truth>,
    /// Per category, the distinct-count sketch of every subject, built here event by event.
    pub distinct: BTreeMap<String, Hll>,
    /// Per category, the quantile sketch of every value.
    pub quantiles: BTreeMap<String, Quantiles>,
}

impl Model {
    /// Adds one event.
    pub fn add(&mut self, e: &Event) {
        let b = e.ts_ms.div_euclid(1000) * 1000;
        let t = self
            .keys
            .entry((e.category.clone(), e.entity.clone(), b))
            .or_insert(Truth {
                count: 0,
                sum_nanos: 0,
                min8: i64::MAX,
                max8: i64::MIN,
            });
        t.count += 1;
        t.sum_nanos += e.eighths as i128 * 125_000_000;
        t.min8 = t.min8.min(e.eighths);
        t.max8 = t.max8.max(e.eighths);
        if let Some(s) = e.subject() {
            if let Ok(empty) = Hll::new(SKETCH_PRECISION) {
                self.distinct
                    .entry(e.category.clone())
                    .or_insert(empty)
                    .insert_hash(subject_hash(&s, None));
            }
        }
        if e.quantiles() {
            self.quantiles
                .entry(e.category.clone())
                .or_default()
                .insert(e.value() + 0.0, 1);
        }
    }

    /// Totals of the events matching `f`.
    pub fn total(&self, f: impl Fn(&str, Option<&str>, i64) -> bool) -> Option<Truth> {
        let mut acc: Option<Truth> = None;
        for ((c, e, b), t) in &self.keys {
            if f(c, e.as_deref(), *b) {
                let a = acc.get_or_insert(Truth {
                    count: 0,
                    sum_nanos: 0,
                    min8: i64::MAX,
                    max8: i64::MIN,
                });
                a.count += t.count;
                a.sum_nanos += t.sum_nanos;
                a.min8 = a.min8.min(t.min8);
                a.max8 = a.max8.max(t.max8);
            }
        }
        acc
    }
}

/// Exact decimal of nano-units, written independently of the library's formatter.
pub fn decimal(nanos: i128) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let a = nanos.unsigned_abs();
    let frac = format!("{:09}", a % 1_000_000_000);
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        format!("{sign}{}", a / 1_000_000_000)
    } else {
        format!("{sign}{}.{frac}", a / 1_000_000_000)
    }
}

/// Checks a JSON answer's statistics against the model's.
pub fn same_json(v: &serde_json::Value, truth: Option<Truth>) -> bool {
    match truth {
        None => v["count"] == 0 && v["avg"].is_null() && v["min"].is_null() && v["max"].is_null(),
        Some(t) => {
            v["count"].as_u64() == Some(t.count)
                && v["sum_exact"].as_str() == Some(decimal(t.sum_nanos).as_str())
                && v["min"].as_f64() == Some(t.min8 as f64 / 8.0)
                && v["max"].as_f64() == Some(t.max8 as f64 / 8.0)
        }
    }
}

/// Checks a library total against the model's.
pub fn same(total: &edgetally_core::Total, truth: Option<Truth>) -> bool {
    match truth {
        None => total.count == 0,
        Some(t) => {
            total.count == t.count
                && total.sum.to_i128() == Some(t.sum_nanos)
                && total.min == t.min8 as f64 / 8.0
                && total.max == t.max8 as f64 / 8.0
        }
    }
}

/// Random events near [`NOW`] from small category/entity vocabularies.
pub fn events(rng: &mut Rng, n: usize, span_ms: i64) -> Vec<Event> {
    events_at(rng, n, span_ms, NOW)
}

/// Random events in `(base - span_ms, base]`.
pub fn events_at(rng: &mut Rng, n: usize, span_ms: i64, base: i64) -> Vec<Event> {
    const CATS: [&str; 4] = ["cpu", "page_view", "temp", "purchase"];
    const ENTS: [&str; 6] = ["dev-1", "dev-2", "user-7", "user-8", "ü-9", "x"];
    (0..n)
        .map(|_| Event {
            category: CATS[rng.below(CATS.len() as u64) as usize].to_string(),
            entity: if rng.chance(0.7) {
                Some(ENTS[rng.below(ENTS.len() as u64) as usize].to_string())
            } else {
                None
            },
            ts_ms: base - rng.below(span_ms as u64) as i64,
            eighths: rng.below(20_001) as i64 - 10_000,
        })
        .collect()
}

/// Folds events into one batch.
pub fn build(id: BatchId, events: &[Event]) -> Batch {
    build_at(id, events, NOW)
}

/// Folds events into one batch created at `created_ms`.
pub fn build_at(id: BatchId, events: &[Event], created_ms: i64) -> Batch {
    let mut b = BatchBuilder::new(1000).expect("valid width");
    for e in events {
        b.record_with(
            &e.category,
            e.entity.as_deref(),
            e.ts_ms,
            e.value(),
            e.sketch_opts(),
        )
        .expect("valid event");
    }
    b.finish(id, created_ms)
}

/// A log entry for a batch that is never sent over a wire (raw bytes empty).
pub fn entry(batch: Batch) -> LogEntry {
    LogEntry {
        batch: Arc::new(batch),
        raw: Arc::from(Vec::new()),
    }
}

/// A signer from a small number.
pub fn signer(n: u64) -> Signer {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&n.to_le_bytes());
    seed[8] = 0xed;
    Signer::from_seed(seed)
}

/// A producer key from a small number, for tests that do not sign.
pub fn key(n: u64) -> ProducerKey {
    signer(n).producer()
}
