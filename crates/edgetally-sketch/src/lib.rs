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
