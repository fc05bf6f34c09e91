//! The compact set of sequence numbers applied for one (producer, epoch).

use serde::{Deserialize, Serialize};

/// A set of `u64` sequence numbers stored as a contiguous watermark (every seq below `next`)
/// plus sorted, disjoint, non-adjacent half-open ranges above it. Producers number batches
/// 0, 1, 2, … and deliver mostly in order, so this is usually just the watermark.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SeenSet {
    next: u64,
    /// `(start, end)` half-open, `next < start`, sorted, with gaps between them.
    ranges: Vec<(u64, u64)>,
}

impl SeenSet {
    /// The empty set.
    pub const fn new() -> SeenSet {
        SeenSet {
            next: 0,
            ranges: Vec::new(),
        }
    }

    /// Every seq below this is in the set.
    pub fn watermark(&self) -> u64 {
        self.next
    }

    /// Number of ranges above the watermark (a measure of disorder).
    pub fn sparse_ranges(&self) -> usize {
        self.ranges.len()
    }

    /// Whether `seq` is in the set.
    pub fn contains(&self, seq: u64) -> bool {
        if seq < self.next {
            return true;
        }
        let i = self.ranges.partition_point(|&(_, end)| end <= seq);
        self.ranges.get(i).is_some_and(|&(start, _)| start <= seq)
    }

    /// Adds `seq`; returns false if it was already there.
    pub fn insert(&mut self, seq: u64) -> bool {
        if self.contains(seq) {
            return false;
        }
        if seq == u64::MAX {
            // The half-open representation cannot hold u64::MAX; no producer gets there.
            return false;
        }
        self.insert_range(seq, seq + 1);
        true
    }

    fn insert_range(&mut self, start: u64, end: u64) {
        if start >= end || end <= self.next {
            return;
        }
        let start = start.max(self.next);
        // Find ranges overlapping or touching [start, end) and merge them.
        let lo = self.ranges.partition_point(|&(_, e)| e < start);
        let hi = self.ranges.partition_point(|&(s, _)| s <= end);
        let (mut s, mut e) = (start, end);
        if lo < hi {
            s = s.min(self.ranges[lo].0);
            e = e.max(self.ranges[hi - 1].1);
        }
        if self.ranges.capacity() == 0 {
            // A set with one range above its watermark is common (a keyed `/v1/events`
            // request's epoch holds one seq, far from 0): 16 bytes, not the 64 a first push
            // reserves.
            self.ranges.reserve_exact(1);
        }
        self.ranges.splice(lo..hi, [(s, e)]);
        if self.ranges.first().is_some_and(|&(s, _)| s <= self.next) {
            let (_, e) = self.ranges.remove(0);
            self.next = self.next.max(e);
        }
    }

    /// Adds every element of `other`.
    pub fn union(&mut self, other: &SeenSet) {
        self.insert_range(0, other.next);
        for &(s, e) in &other.ranges {
            self.insert_range(s, e);
        }
    }

    /// Whether every element of `self` is in `other`.
    pub fn is_subset(&self, other: &SeenSet) -> bool {
        if self.next > 0 && !other.contains_range(0, self.next) {
            return false;
        }
        self.ranges.iter().all(|&(s, e)| other.contains_range(s, e))
    }

    fn contains_range(&self, s: u64, e: u64) -> bool {
        if e <= self.next {
            return true;
        }
        let s = s.max(self.next);
        let i = self.ranges.partition_point(|&(_, end)| end <= s);
        self.ranges
            .get(i)
            .is_some_and(|&(rs, re)| rs <= s && e <= re)
    }

    /// The number of elements (saturating; on a set not yet checked by
    /// [`SeenSet::is_well_formed`] — one read from a peer or disk — a figure, never a panic).
    pub fn len(&self) -> u64 {
        self.ranges.iter().fold(self.next, |n, &(s, e)| {
            n.saturating_add(e.saturating_sub(s))
        })
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks the representation invariants (for data read from peers or disk).
    pub fn is_well_formed(&self) -> bool {
        let mut prev_end = self.next;
        for &(s, e) in &self.ranges {
            if s <= prev_end || e <= s {
                return false;
            }
            prev_end = e;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #[test]
        fn behaves_like_a_set(ops in proptest::collection::vec(0u64..64, 0..200)) {
            let mut s = SeenSet::new();
            let mut model = BTreeSet::new();
            for x in ops {
                prop_assert_eq!(s.insert(x), model.insert(x));
                prop_assert!(s.is_well_formed());
            }
            for x in 0..70 {
                prop_assert_eq!(s.contains(x), model.contains(&x));
            }
            prop_assert_eq!(s.len(), model.len() as u64);
            let w = (0..).take_while(|x| model.contains(x)).count() as u64;
            prop_assert_eq!(s.watermark(), w);
        }

        #[test]
        fn union_and_subset(a in proptest::collection::btree_set(0u64..64, 0..40),
                            b in proptest::collection::btree_set(0u64..64, 0..40)) {
            let mut sa = SeenSet::new();
            a.iter().for_each(|&x| { sa.insert(x); });
            let mut sb = SeenSet::new();
            b.iter().for_each(|&x| { sb.insert(x); });
            prop_assert_eq!(sa.is_subset(&sb), a.is_subset(&b));
            let mut u = sa.clone();
            u.union(&sb);
            prop_assert!(u.is_well_formed());
            for x in 0..70 {
                prop_assert_eq!(u.contains(x), a.contains(&x) || b.contains(&x));
            }
        }
    }
}
