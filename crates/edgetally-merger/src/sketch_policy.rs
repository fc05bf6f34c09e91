//! What a node admits of the sketches producers send (batch format v2), and how it makes
//! its own (`POST /v1/events`): a per-category cap on HyperLogLog precision, a cap on the
//! sketch bytes held, the categories whose event values go into quantile sketches, and the
//! site secret subjects are hashed with.
//!
//! The caps refuse whole batches (`sketch_limit`) and never alter one: a batch is applied as
//! its producer signed it, so the state stays a function of the set of batches, whatever
//! each node's settings. Batches from peers were admitted by the node they came through.

use crate::config::Config;
use edgetally_core::sketches::{HLL_MAX_PRECISION, HLL_MIN_PRECISION};
use edgetally_core::{Batch, RejectCode};
use std::collections::HashMap;

/// The sketch settings of a node, checked.
#[derive(Clone, Debug)]
pub struct SketchPolicy {
    caps: HashMap<String, u8>,
    any_cap: u8,
    max_bytes: u64,
    quantile_categories: Vec<String>,
    subject_key: Option<[u8; 16]>,
}

impl SketchPolicy {
    /// From `sketch_max_precision`, `max_sketch_bytes`, `quantile_categories` and
    /// `subject_key`.
    pub fn new(config: &Config) -> Result<SketchPolicy, String> {
        let mut caps = HashMap::new();
        let mut any_cap = HLL_MAX_PRECISION;
        for (cat, &p) in &config.sketch_max_precision {
            let p = u8::try_from(p)
                .ok()
                .filter(|p| (HLL_MIN_PRECISION..=HLL_MAX_PRECISION).contains(p))
                .ok_or_else(|| {
                    format!(
                        "sketch_max_precision.{cat}: {p} is not in \
                         [{HLL_MIN_PRECISION}, {HLL_MAX_PRECISION}]"
                    )
                })?;
            if cat == "*" {
                any_cap = p;
            } else {
                caps.insert(cat.clone(), p);
            }
        }
        let subject_key = match &config.subject_key {
            None => None,
            Some(hex) => Some(
                parse_key(hex)
                    .ok_or_else(|| "subject_key: not 32 hex digits (16 bytes)".to_string())?,
            ),
        };
        Ok(SketchPolicy {
            caps,
            any_cap,
            max_bytes: config.max_sketch_bytes,
            quantile_categories: config.quantile_categories.clone(),
            subject_key,
        })
    }

    /// The HyperLogLog precision cap of `category`.
    pub fn cap(&self, category: &str) -> u8 {
        self.caps.get(category).copied().unwrap_or(self.any_cap)
    }

    /// Refuses a producer's batch whose sketches break a cap: a HyperLogLog finer than its
    /// category's cap, or any sketch while the node holds `held` sketch bytes, at or past
    /// `max_sketch_bytes`.
    pub fn check(&self, batch: &Batch, held: u64) -> Result<(), RejectCode> {
        if batch.sketches.is_empty() {
            return Ok(());
        }
        if self.max_bytes > 0 && held >= self.max_bytes {
            return Err(RejectCode::SketchLimit);
        }
        for (i, k) in &batch.sketches {
            let (Some(s), Some(h)) = (batch.summaries.get(*i as usize), &k.distinct) else {
                continue;
            };
            if h.precision() > self.cap(batch.category(s)) {
                return Err(RejectCode::SketchLimit);
            }
        }
        Ok(())
    }

    /// Whether `POST /v1/events` puts `category`'s values into quantile sketches.
    pub fn quantiles(&self, category: &str) -> bool {
        self.quantile_categories
            .iter()
            .any(|c| c == "*" || c == category)
    }

    /// The subject hash of `POST /v1/events` (keyed by `subject_key`).
    pub fn subject_hash(&self, subject: &str) -> u64 {
        edgetally_core::sketches::subject_hash(subject, self.subject_key.as_ref())
    }
}

/// Whether the sketch tiers' retention is consistent: the hour buckets kept at least as long
/// as the minute buckets (queries read long ranges from the hour buckets).
pub fn check_retention(config: &Config) -> Result<(), String> {
    let len = |t: usize| config.sketch_retention[t].unwrap_or(i64::MAX);
    if len(1) < len(0) {
        return Err(format!(
            "retention_sketch_hours_ms ({} ms) is shorter than retention_sketch_minutes_ms ({} \
             ms): the hour buckets must be kept at least as long as the minute buckets",
            len(1),
            len(0)
        ));
    }
    Ok(())
}

/// 32 hex digits as 16 bytes.
pub fn parse_key(hex: &str) -> Option<[u8; 16]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 32 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_keys_are_checked() {
        let mut c = Config::default();
        c.sketch_max_precision.insert("page".into(), 12);
        c.sketch_max_precision.insert("*".into(), 15);
        let p = SketchPolicy::new(&c).expect("valid");
        assert_eq!((p.cap("page"), p.cap("other")), (12, 15));
        c.sketch_max_precision.insert("x".into(), 17);
        assert!(SketchPolicy::new(&c).is_err());
        let mut c = Config {
            subject_key: Some("00112233445566778899aabbccddeeff".into()),
            ..Config::default()
        };
        let p = SketchPolicy::new(&c).expect("valid");
        let key: [u8; 16] = core::array::from_fn(|i| (i as u8) * 0x11);
        assert_eq!(
            p.subject_hash("u"),
            edgetally_core::sketches::subject_hash("u", Some(&key))
        );
        c.subject_key = Some("0011".into());
        assert!(SketchPolicy::new(&c).is_err());
    }
}
