//! Summaries: count, exact sum, min and max of the values of one key.

use crate::code::RejectCode;
use crate::value::{quantize, validate_value, Sum192};
use serde::{Deserialize, Serialize};

/// The summary a producer ships: the aggregate of the records of one key in one batch.
/// `sum` is in nano-units (see [`crate::value`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Number of records, ≥ 1.
    pub count: u64,
    /// Exact sum in nano-units.
    pub sum: i128,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl Summary {
    /// The summary of one value.
    pub fn of(value: f64) -> Result<Summary, RejectCode> {
        let v = validate_value(value)?;
        Ok(Summary {
            count: 1,
            sum: quantize(v)?,
            min: v,
            max: v,
        })
    }

    /// Folds in another summary of the same key. On error (overflow) it is unchanged.
    pub fn merge(&mut self, o: &Summary) -> Result<(), RejectCode> {
        let count = self
            .count
            .checked_add(o.count)
            .ok_or(RejectCode::InvalidSummary)?;
        let sum = self
            .sum
            .checked_add(o.sum)
            .ok_or(RejectCode::InvalidSummary)?;
        self.count = count;
        self.sum = sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        Ok(())
    }

    /// Normalises `-0.0` and checks the summary is one that real values could produce:
    /// count ≥ 1, valid min ≤ max (equal when count is 1), and
    /// `count·q(min) ≤ sum ≤ count·q(max)` exactly.
    pub fn validate(&mut self) -> Result<(), RejectCode> {
        self.min = validate_value(self.min)?;
        self.max = validate_value(self.max)?;
        if self.count == 0 || self.min > self.max || (self.count == 1 && self.min != self.max) {
            return Err(RejectCode::InvalidSummary);
        }
        if self.count == 1 {
            return if self.sum == quantize(self.min)? {
                Ok(())
            } else {
                Err(RejectCode::InvalidSummary)
            };
        }
        // Fast path: when the sum lies well inside count·[min, max] in float arithmetic (with a
        // margin far above its rounding error), the exact bounds cannot exclude it.
        let (n, s) = (self.count as f64, self.sum as f64);
        let (lo, hi) = (n * self.min * 1e9, n * self.max * 1e9);
        let margin = |x: f64| x.abs() * 1e-9 + 4.0;
        if s - lo > margin(lo) && hi - s > margin(hi) {
            return Ok(());
        }
        let n = self.count as i128;
        let lo = n.checked_mul(quantize(self.min)?);
        let hi = n.checked_mul(quantize(self.max)?);
        match (lo, hi) {
            (Some(lo), Some(hi)) if lo <= self.sum && self.sum <= hi => Ok(()),
            // One side overflowing i128 means that bound is beyond any i128 sum: only the
            // other side constrains.
            (None, Some(hi)) if self.min < 0.0 && self.sum <= hi => Ok(()),
            (Some(lo), None) if self.max > 0.0 && lo <= self.sum => Ok(()),
            (None, None) if self.min < 0.0 && self.max > 0.0 => Ok(()),
            _ => Err(RejectCode::InvalidSummary),
        }
    }
}

/// Accumulated totals of one key across any number of batches. Every field merges
/// associatively and commutatively: saturating count, 192-bit exact sum, float min/max.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Total {
    /// Records counted (saturates at `u64::MAX`).
    pub count: u64,
    /// Exact sum in nano-units.
    pub sum: Sum192,
    /// Smallest value (`+∞` when empty).
    pub min: f64,
    /// Largest value (`-∞` when empty).
    pub max: f64,
}

impl Default for Total {
    fn default() -> Self {
        Total::EMPTY
    }
}

impl Total {
    /// No records.
    pub const EMPTY: Total = Total {
        count: 0,
        sum: Sum192::ZERO,
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
    };

    /// Adds a (validated) summary.
    #[inline]
    pub fn add(&mut self, s: &Summary) {
        self.count = self.count.saturating_add(s.count);
        self.sum.add_i128(s.sum);
        self.min = self.min.min(s.min);
        self.max = self.max.max(s.max);
    }

    /// Merges another total.
    #[inline]
    pub fn merge(&mut self, o: &Total) {
        self.count = self.count.saturating_add(o.count);
        self.sum.add(&o.sum);
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    /// True when no record is counted.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_rejects_impossible_summaries() {
        let ok = Summary::of(2.0).unwrap_or_else(|e| panic!("{e}"));
        let cases = [
            Summary { count: 0, ..ok },
            Summary { min: 3.0, ..ok },
            Summary {
                count: 2,
                min: 3.0,
                max: 1.0,
                ..ok
            },
            Summary {
                sum: ok.sum + 1,
                ..ok
            },
            Summary {
                count: 2,
                sum: 5_000_000_000,
                max: 2.4,
                ..ok
            },
            Summary {
                max: f64::NAN,
                ..ok
            },
        ];
        for mut s in cases {
            let before = s;
            assert!(s.validate().is_err(), "{before:?}");
        }
        let mut two = Summary {
            count: 2,
            sum: 3_000_000_000,
            min: 1.0,
            max: 2.0,
        };
        assert_eq!(two.validate(), Ok(()));
        let mut neg_zero = Summary {
            count: 1,
            sum: 0,
            min: -0.0,
            max: -0.0,
        };
        assert_eq!(neg_zero.validate(), Ok(()));
        assert_eq!(neg_zero.min.to_bits(), 0.0f64.to_bits());
    }

    #[test]
    fn merge_overflow_leaves_summary_unchanged() {
        let mut a = Summary {
            count: u64::MAX,
            sum: 0,
            min: 0.0,
            max: 0.0,
        };
        let before = a;
        assert_eq!(
            a.merge(&Summary {
                count: 1,
                sum: 0,
                min: 0.0,
                max: 0.0
            }),
            Err(RejectCode::InvalidSummary)
        );
        assert_eq!(a, before);
    }
}
