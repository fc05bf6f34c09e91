//! The sketches a summary may carry (batch format v2): a HyperLogLog of its records'
//! subjects and a quantile sketch of its values. Both merge as CRDTs; this module adds the
//! rules that make them part of a batch — what a valid pair looks like next to its summary,
//! and how two of different HLL precision merge (at the coarser one, which is exact and
//! order-free: reducing commutes with the register-wise maximum).

use crate::code::RejectCode;
use crate::summary::Summary;
pub use edgetally_sketch::{
    subject_hash, Hll, Quantiles, SketchError, HLL_DEFAULT_PRECISION, HLL_MAX_PRECISION,
    HLL_MIN_PRECISION, QUANTILES_DEFAULT_ACCURACY_BP, QUANTILES_MAX, QUANTILES_MIN,
};

/// The relative accuracy of every quantile sketch on the wire, basis points (1 %). One value
/// for the whole protocol: sketches of different accuracies cannot be merged exactly, and a
/// setting that differed between producers or replicas would split them.
pub const WIRE_QUANTILES_ACCURACY_BP: u16 = QUANTILES_DEFAULT_ACCURACY_BP;

/// A summary's sketches; at least one is present in a batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sketches {
    /// The subjects of the summary's records (those recorded with a subject).
    pub distinct: Option<Hll>,
    /// The values of the summary's records (every one, when the category keeps quantiles).
    pub quantiles: Option<Quantiles>,
}

impl Sketches {
    /// Whether neither sketch is present.
    pub fn is_empty(&self) -> bool {
        self.distinct.is_none() && self.quantiles.is_none()
    }

    /// Adds a subject's hash ([`subject_hash`]) at `precision` (used when the sketch is new;
    /// clamped to the format's range).
    pub fn insert_subject(&mut self, hash: u64, precision: u8) {
        if self.distinct.is_none() {
            self.distinct = Hll::new(precision.clamp(HLL_MIN_PRECISION, HLL_MAX_PRECISION)).ok();
        }
        if let Some(h) = &mut self.distinct {
            h.insert_hash(hash);
        }
    }

    /// Adds `count` observations of `value` to the quantile sketch (created at the wire
    /// accuracy if absent).
    pub fn insert_value(&mut self, value: f64, count: u64) {
        self.quantiles
            .get_or_insert_with(Quantiles::default)
            .insert(value, count);
    }

    /// Merges `other` in. HyperLogLogs of different precisions merge at the coarser one;
    /// quantile sketches of different accuracies are refused (`invalid_sketch`) and leave
    /// `self` unchanged.
    pub fn merge(&mut self, other: &Sketches) -> Result<(), RejectCode> {
        if let (Some(a), Some(b)) = (&self.quantiles, &other.quantiles) {
            if a.accuracy_bp() != b.accuracy_bp() {
                return Err(RejectCode::InvalidSketch);
            }
        }
        if let Some(b) = &other.distinct {
            match &mut self.distinct {
                None => self.distinct = Some(b.clone()),
                Some(a) => merge_hll(a, b),
            }
        }
        if let Some(b) = &other.quantiles {
            match &mut self.quantiles {
                None => self.quantiles = Some(b.clone()),
                Some(a) => {
                    a.merge(b).map_err(|_| RejectCode::InvalidSketch)?;
                }
            }
        }
        Ok(())
    }

    /// The rules a batch's sketches obey next to their summary (PROTOCOL.md §3): at least
    /// one sketch; a HyperLogLog that is not empty; a quantile sketch at the wire accuracy
    /// holding exactly the summary's count of values.
    pub fn validate(&self, summary: &Summary) -> Result<(), RejectCode> {
        if self.is_empty() {
            return Err(RejectCode::InvalidSketch);
        }
        if self.distinct.as_ref().is_some_and(Hll::is_empty) {
            return Err(RejectCode::InvalidSketch);
        }
        if let Some(q) = &self.quantiles {
            if q.accuracy_bp() != WIRE_QUANTILES_ACCURACY_BP || q.count() != summary.count {
                return Err(RejectCode::InvalidSketch);
            }
        }
        Ok(())
    }

    /// Heap bytes held (memory accounting).
    pub fn heap_bytes(&self) -> usize {
        self.distinct.as_ref().map_or(0, Hll::heap_bytes)
            + self.quantiles.as_ref().map_or(0, Quantiles::heap_bytes)
    }

    /// Bytes the pair takes on the wire (its encodings), for batch-size estimates.
    pub fn encoded_len(&self) -> usize {
        self.distinct.as_ref().map_or(0, |h| h.encode().len())
            + self.quantiles.as_ref().map_or(0, |q| q.encode().len())
    }

    /// The HyperLogLog reduced to at most `precision` (an admission cap), if it is finer.
    pub fn cap_precision(&mut self, precision: u8) {
        if let Some(h) = &self.distinct {
            if h.precision() > precision {
                if let Ok(r) = h.reduce(precision) {
                    self.distinct = Some(r);
                }
            }
        }
    }
}

/// `a ∪ b` at the coarser of their precisions.
pub fn merge_hll(a: &mut Hll, b: &Hll) {
    use core::cmp::Ordering;
    match a.precision().cmp(&b.precision()) {
        Ordering::Equal => {
            let _ = a.merge(b);
        }
        Ordering::Less => {
            if let Ok(r) = b.reduce(a.precision()) {
                let _ = a.merge(&r);
            }
        }
        Ordering::Greater => {
            if let Ok(mut r) = a.reduce(b.precision()) {
                let _ = r.merge(b);
                *a = r;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hll(p: u8, subjects: core::ops::Range<u32>) -> Hll {
        let mut h = Hll::new(p).unwrap_or_else(|e| panic!("{e}"));
        for s in subjects {
            h.insert_hash(subject_hash(&s.to_string(), None));
        }
        h
    }

    #[test]
    fn precisions_merge_at_the_coarser_in_any_order() {
        let (a, b, c) = (hll(14, 0..500), hll(12, 300..900), hll(16, 800..2000));
        let merged = |order: [&Hll; 3]| {
            let mut x = order[0].clone();
            merge_hll(&mut x, order[1]);
            merge_hll(&mut x, order[2]);
            x.encode()
        };
        let first = merged([&a, &b, &c]);
        for order in [
            [&a, &c, &b],
            [&b, &a, &c],
            [&b, &c, &a],
            [&c, &a, &b],
            [&c, &b, &a],
        ] {
            assert_eq!(merged(order), first);
        }
        // Equal to inserting every subject at precision 12.
        assert_eq!(first, hll(12, 0..2000).encode());
    }

    #[test]
    fn validation_ties_the_quantiles_to_the_summary() {
        let s = Summary::of(3.0).unwrap_or_else(|e| panic!("{e}"));
        let mut k = Sketches::default();
        assert_eq!(k.validate(&s), Err(RejectCode::InvalidSketch), "empty");
        k.insert_value(3.0, 1);
        assert_eq!(k.validate(&s), Ok(()));
        k.insert_value(4.0, 1);
        assert_eq!(k.validate(&s), Err(RejectCode::InvalidSketch), "count");
        let empty_hll = Sketches {
            distinct: Hll::new(14).ok(),
            quantiles: None,
        };
        assert_eq!(empty_hll.validate(&s), Err(RejectCode::InvalidSketch));
        let other_accuracy = Sketches {
            distinct: None,
            quantiles: Quantiles::new(200).ok().map(|mut q| {
                q.insert(3.0, 1);
                q
            }),
        };
        assert_eq!(other_accuracy.validate(&s), Err(RejectCode::InvalidSketch));
        let mut x = Sketches::default();
        x.insert_value(1.0, 1);
        assert_eq!(x.merge(&other_accuracy), Err(RejectCode::InvalidSketch));
        assert_eq!(x.quantiles.as_ref().map(Quantiles::count), Some(1));
    }
}
