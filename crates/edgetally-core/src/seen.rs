//! The compact set of sequence numbers applied for one (producer, epoch).

use serde::{Deserialize, Serialize};

/// A set of `u64` sequence numbers stored as a contiguous watermark (every seq below `next`)
/// plus sorted, disjoint, non-adjacent half-open ranges above it. Producers number batches
/// 0, 1, 2, … and deliver mostly in order, so this is usually just the watermark.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SeenSet {
    next: u64,
    /// `(start, end)` half-open, `next < start`, sorted, with gaps between them.
    ranges: Ranges,
}

/// The ranges above a watermark: one pointer, null while there are none (most sets). A set
/// lives in every (producer, epoch) entry of a replica's seen-sets, so its size is paid once
/// per producer: 16 bytes here against 32 with an inline `Vec`. Serialized as a sequence,
/// byte for byte as the `Vec` it replaced.
// The box is the point: a `Vec` inline is three words in every entry, most of them empty.
#[allow(clippy::box_collection)]
#[derive(Clone, Debug, Default)]
struct Ranges(Option<Box<Vec<(u64, u64)>>>);

impl std::ops::Deref for Ranges {
    type Target = [(u64, u64)];
    fn deref(&self) -> &[(u64, u64)] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
}

impl Ranges {
    /// The ranges to change (allocated with room for one range when there are none).
    fn vec(&mut self) -> &mut Vec<(u64, u64)> {
        self.0
            .get_or_insert_with(|| Box::new(Vec::with_capacity(1)))
    }

    /// Frees the ranges once there are none left.
    fn tidy(&mut self) {
        if self.0.as_ref().is_some_and(|v| v.is_empty()) {
            self.0 = None;
        }
    }
}

impl PartialEq for Ranges {
    fn eq(&self, other: &Ranges) -> bool {
        self[..] == other[..]
    }
}

impl Eq for Ranges {}

impl std::hash::Hash for Ranges {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self[..].hash(state)
    }
}

impl Serialize for Ranges {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Ranges {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Ranges, D::Error> {
        let v = Vec::<(u64, u64)>::deserialize(d)?;
        Ok(Ranges((!v.is_empty()).then(|| Box::new(v))))
    }
}

impl SeenSet {
    /// The empty set.
    pub const fn new() -> SeenSet {
        SeenSet {
            next: 0,
            ranges: Ranges(None),
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
        if s <= self.next {
            // It joins the watermark (the common case: seqs in order), with the ranges it
            // covers (then the first ones); nothing is allocated for it.
            if lo < hi {
                self.ranges.vec().drain(lo..hi);
                self.ranges.tidy();
            }
            self.next = e;
            return;
        }
        // A set with one range above its watermark is common (a keyed `/v1/events` request's
        // epoch holds one seq, far from 0): room for one range, not the four a first push
        // reserves.
        self.ranges.vec().splice(lo..hi, [(s, e)]);
    }

    /// Adds every element of `other`.
    pub fn union(&mut self, other: &SeenSet) {
        self.insert_range(0, other.next);
        for &(s, e) in other.ranges.iter() {
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
        for &(s, e) in self.ranges.iter() {
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

    /// A seen-set is in every (producer, epoch) entry: its size is paid per producer.
    #[test]
    fn a_seen_set_is_two_words() {
        assert_eq!(std::mem::size_of::<SeenSet>(), 16);
        let mut s = SeenSet::new();
        s.insert(5);
        assert_eq!(s.sparse_ranges(), 1);
        (0..5).for_each(|x| {
            s.insert(x);
        });
        // The ranges are freed once the watermark has caught up with them.
        assert!(s.ranges.0.is_none());
        assert_eq!((s.watermark(), s.sparse_ranges()), (6, 0));
    }

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
            // The wire and snapshot form is still the watermark and a `Vec` of the ranges,
            // built here from the model, and it reads back as an equal set.
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for &x in model.iter().filter(|&&x| x > w) {
                match ranges.last_mut() {
                    Some((_, e)) if *e == x => *e += 1,
                    _ => ranges.push((x, x + 1)),
                }
            }
            let bytes = postcard::to_allocvec(&s).expect("encode");
            prop_assert_eq!(&bytes, &postcard::to_allocvec(&(w, &ranges)).expect("encode"));
            let back: SeenSet = postcard::from_bytes(&bytes).expect("decode");
            prop_assert_eq!(&back, &s);
            prop_assert_eq!(back.sparse_ranges(), ranges.len());
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
