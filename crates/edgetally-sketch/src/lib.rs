//! # edgetally-sketch
//!
//! Sketches that merge as CRDTs, for the two questions exact summaries cannot answer within
//! bounded memory: how many distinct subjects ([`Hll`], HyperLogLog: registers merge by
//! maximum — commutative, associative, idempotent) and what the p-th percentile is
//! ([`Quantiles`], a relative-error quantile sketch with integer bucket keys: counts merge by
//! addition, which the seen-set makes exactly-once).
//!
//! Both have one canonical byte form: the bytes are a function of the sketch's contents
//! alone, never of the order or grouping of the inserts and merges that built it, so replicas
//! holding the same batches hold identical bytes. Decoders accept only that form (they are
//! fed by the network) and never panic. Everything is integer arithmetic, SipHash and
//! `libm` — the same on every target, wasm32 included.
//!
//! A crate of its own beneath `edgetally-core`: batch format v2 carries these bytes
//! (docs/PROTOCOL.md §10), and the producer, the browser bundle and the merger all link it.

#![forbid(unsafe_code)]

mod hll;
mod quantiles;

pub use hll::{Hll, HLL_DEFAULT_PRECISION, HLL_MAX_PRECISION, HLL_MIN_PRECISION};
pub use quantiles::{Quantiles, QUANTILES_DEFAULT_ACCURACY_BP, QUANTILES_MAX, QUANTILES_MIN};

/// Why sketch bytes were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SketchError {
    /// A precision or accuracy outside what the format allows.
    #[error("sketch parameter out of range")]
    Parameter,
    /// Two sketches of different precision or accuracy cannot be merged exactly.
    #[error("sketches of different parameters")]
    Mismatch,
    /// The bytes end early, run on, or are not the canonical form.
    #[error("sketch bytes are not canonical")]
    Malformed,
}

/// The 64-bit hash of a subject (a user, device or session id) that distinct counts are
/// made of: SipHash-2-4 of its UTF-8 bytes under a 128-bit key. Without a site secret the key
/// is all zeros, and the same subject hashes alike everywhere; with one (`key`, the secret's
/// first 16 bytes), hashes of two sites cannot be joined, and only producers holding the
/// secret can produce a given subject's hash. Changing the secret starts a new space: a
/// union over a period before and after the change counts a subject twice.
pub fn subject_hash(subject: &str, key: Option<&[u8; 16]>) -> u64 {
    use core::hash::Hasher as _;
    let mut h = siphasher::sip::SipHasher24::new_with_key(key.unwrap_or(&[0; 16]));
    h.write(subject.as_bytes());
    h.finish()
}

/// Merges `src` into `dst`, both sorted by key with unique keys, combining the values of
/// equal keys with `combine`. Binary searches, then one backward pass that moves each run of
/// `dst` once: merging a few entries into a large sketch moves its tail once, not once per
/// entry as an insert each would, and allocates nothing but the growth of `dst`.
fn merge_sorted<K: Ord + Copy, V: Copy>(
    dst: &mut Vec<(K, V)>,
    src: &[(K, V)],
    combine: impl Fn(V, V) -> V,
) {
    let mut fresh = 0;
    for &(k, v) in src {
        match dst.binary_search_by(|e| e.0.cmp(&k)) {
            Ok(i) => dst[i].1 = combine(dst[i].1, v),
            Err(_) => fresh += 1,
        }
    }
    let (Some(&filler), true) = (src.first(), fresh > 0) else {
        return;
    };
    let old = dst.len();
    dst.resize(old + fresh, filler);
    // Unmoved entries are `dst[..end]`; `dst[w..]` is final. Keys present before were
    // combined above and are found again (and skipped) among the unmoved ones: every key
    // after them has been placed already.
    let (mut end, mut w) = (old, old + fresh);
    for &(k, v) in src.iter().rev() {
        let Err(p) = dst[..end].binary_search_by(|e| e.0.cmp(&k)) else {
            continue;
        };
        dst.copy_within(p..end, w - (end - p));
        w -= end - p + 1;
        dst[w] = (k, v);
        end = p;
    }
}

/// Appends `v` as a LEB128 varint.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a canonical (shortest-form) LEB128 varint.
fn take_varint(bytes: &mut &[u8]) -> Result<u64, SketchError> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let (&b, rest) = bytes.split_first().ok_or(SketchError::Malformed)?;
        *bytes = rest;
        let bits = u64::from(b & 0x7f);
        if i == 9 && bits > 1 {
            return Err(SketchError::Malformed);
        }
        v |= bits << (7 * i);
        if b & 0x80 == 0 {
            // Shortest form only: a final zero byte after the first is padding.
            if i > 0 && b == 0 {
                return Err(SketchError::Malformed);
            }
            return Ok(v);
        }
    }
    Err(SketchError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subject_hash_is_siphash_2_4_and_keyed_by_the_site_secret() {
        // The reference vector of SipHash-2-4 (Aumasson and Bernstein): key 00..0f, message
        // 00..0e (15 bytes) → a129ca6149be45e5.
        use core::hash::Hasher as _;
        let key: [u8; 16] = core::array::from_fn(|i| i as u8);
        let msg: Vec<u8> = (0..15).collect();
        let mut h = siphasher::sip::SipHasher24::new_with_key(&key);
        h.write(&msg);
        assert_eq!(h.finish(), 0xa129_ca61_49be_45e5);
        assert_eq!(subject_hash("user-1", None), subject_hash("user-1", None));
        assert_ne!(subject_hash("user-1", None), subject_hash("user-2", None));
        assert_ne!(
            subject_hash("user-1", None),
            subject_hash("user-1", Some(&key))
        );
    }

    proptest::proptest! {
        #[test]
        fn merge_sorted_equals_a_map_union(
            a in proptest::collection::btree_map(0u16..200, 1u8..50, 0..80),
            b in proptest::collection::btree_map(0u16..200, 1u8..50, 0..80),
        ) {
            let mut want = a.clone();
            for (k, v) in &b {
                let e = want.entry(*k).or_insert(0);
                *e = (*e).max(*v);
            }
            let mut dst: Vec<(u16, u8)> = a.into_iter().collect();
            let src: Vec<(u16, u8)> = b.into_iter().collect();
            merge_sorted(&mut dst, &src, u8::max);
            proptest::prop_assert_eq!(dst, want.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn varints_are_canonical() {
        for v in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut s = out.as_slice();
            assert_eq!(take_varint(&mut s), Ok(v));
            assert!(s.is_empty());
        }
        assert!(take_varint(&mut &[0x80, 0x00][..]).is_err(), "padded zero");
        assert!(take_varint(&mut &[0x80][..]).is_err(), "cut short");
        assert!(take_varint(&mut &[0xff; 10][..]).is_err(), "over 64 bits");
    }
}
