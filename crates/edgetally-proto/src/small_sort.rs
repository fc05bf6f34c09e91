//! An in-place heapsort for the producer's seal.
//!
//! `slice::sort_unstable*` (and `sort*`) are fast, but each element type monomorphises a
//! pattern-defeating quicksort with its small-sort networks: ~2 KiB of wasm apiece, and the
//! seal sorts three types — 11 KB raw, 4.1 KB gzipped of the npm package's module, for a step
//! that runs once per batch. std has no size-optimised sort on stable Rust (its
//! `optimize_for_size` needs a rebuilt std), and no crate is made for this, so this one is
//! written out: O(n log n) worst case, no allocation, a few hundred bytes per instantiation.
//! Not stable; the seal's keys are unique after it merges repeats, and merging is
//! order-independent.

/// Sorts `v` ascending by `key`.
pub(crate) fn sort_by_key<T, K: Ord>(v: &mut [T], key: impl Fn(&T) -> K) {
    let less = |v: &[T], a: usize, b: usize| key(&v[a]) < key(&v[b]);
    // Sift the element at `root` down the max-heap held in v[..end].
    let sift = |v: &mut [T], mut root: usize, end: usize| loop {
        let mut child = 2 * root + 1;
        if child >= end {
            return;
        }
        if child + 1 < end && less(v, child, child + 1) {
            child += 1;
        }
        if !less(v, root, child) {
            return;
        }
        v.swap(root, child);
        root = child;
    };
    let n = v.len();
    for i in (0..n / 2).rev() {
        sift(v, i, n);
    }
    for end in (1..n).rev() {
        v.swap(0, end);
        sift(v, 0, end);
    }
}

#[cfg(test)]
mod tests {
    use super::sort_by_key;
    use proptest::prelude::*;

    proptest! {
        /// The same order as std's sort, for any input (duplicates included).
        #[test]
        fn sorts_like_std(mut v in proptest::collection::vec((0u8..8, any::<i64>()), 0..200)) {
            let mut expected = v.clone();
            expected.sort_unstable();
            sort_by_key(&mut v, |e| *e);
            prop_assert_eq!(v, expected);
        }

        /// By a key that ignores part of the element: a permutation whose keys are sorted.
        #[test]
        fn sorts_by_the_key_only(v in proptest::collection::vec((0u8..4, any::<u16>()), 0..100)) {
            let mut s = v.clone();
            sort_by_key(&mut s, |e| e.0);
            prop_assert!(s.windows(2).all(|w| w[0].0 <= w[1].0));
            let (mut a, mut b) = (v.clone(), s.clone());
            a.sort_unstable();
            b.sort_unstable();
            prop_assert_eq!(a, b);
        }
    }
}
