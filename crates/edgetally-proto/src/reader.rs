//! A bounds-checked reader for postcard's primitive encodings. Every read returns
//! `Err(Malformed)` instead of panicking, whatever the input.

use edgetally_core::RejectCode;

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

type R<T> = Result<T, RejectCode>;

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn u8(&mut self) -> R<u8> {
        let b = *self.buf.get(self.pos).ok_or(RejectCode::Malformed)?;
        self.pos += 1;
        Ok(b)
    }

    pub(crate) fn bytes(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or(RejectCode::Malformed)?;
        let s = self.buf.get(self.pos..end).ok_or(RejectCode::Malformed)?;
        self.pos = end;
        Ok(s)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> R<[u8; N]> {
        let s = self.bytes(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// An unsigned LEB128 varint of at most `max_bytes`, whose value fits `bits`.
    #[inline]
    fn varint(&mut self, bits: u32) -> R<u128> {
        let max_bytes = bits.div_ceil(7);
        let mut v: u128 = 0;
        for i in 0..max_bytes {
            let b = self.u8()?;
            v |= ((b & 0x7f) as u128) << (7 * i);
            if b & 0x80 == 0 {
                if bits < 128 && v >> bits != 0 {
                    return Err(RejectCode::Malformed);
                }
                if bits == 128 && i == max_bytes - 1 && b > 0x03 {
                    return Err(RejectCode::Malformed);
                }
                return Ok(v);
            }
        }
        Err(RejectCode::Malformed)
    }

    /// The next byte if it is a complete one-byte varint (the common case on the wire).
    #[inline]
    fn small(&mut self) -> Option<u8> {
        match self.buf.get(self.pos) {
            Some(&b) if b < 0x80 => {
                self.pos += 1;
                Some(b)
            }
            _ => None,
        }
    }

    /// A varint of at most 64 bits, accumulated in a u64 (the hot path for buckets and counts).
    #[inline]
    fn varint64(&mut self, bits: u32) -> R<u64> {
        let max_bytes = bits.div_ceil(7);
        let mut v: u64 = 0;
        for i in 0..max_bytes {
            let b = *self.buf.get(self.pos).ok_or(RejectCode::Malformed)?;
            self.pos += 1;
            let part = (b & 0x7f) as u64;
            if i == 9 && part > 1 {
                return Err(RejectCode::Malformed);
            }
            v |= part << (7 * i);
            if b & 0x80 == 0 {
                if bits < 64 && v >> bits != 0 {
                    return Err(RejectCode::Malformed);
                }
                return Ok(v);
            }
        }
        Err(RejectCode::Malformed)
    }

    #[inline]
    pub(crate) fn u32(&mut self) -> R<u32> {
        if let Some(b) = self.small() {
            return Ok(b as u32);
        }
        Ok(self.varint64(32)? as u32)
    }

    #[inline]
    pub(crate) fn u64(&mut self) -> R<u64> {
        if let Some(b) = self.small() {
            return Ok(b as u64);
        }
        self.varint64(64)
    }

    #[inline]
    pub(crate) fn i64(&mut self) -> R<i64> {
        let z = self.varint64(64)?;
        Ok((z >> 1) as i64 ^ -((z & 1) as i64))
    }

    #[inline]
    pub(crate) fn i128(&mut self) -> R<i128> {
        let z = match self.small() {
            Some(b) => b as u128,
            None => self.varint(128)?,
        };
        Ok((z >> 1) as i128 ^ -((z & 1) as i128))
    }

    #[inline]
    pub(crate) fn f64(&mut self) -> R<f64> {
        Ok(f64::from_le_bytes(self.array::<8>()?))
    }

    pub(crate) fn str(&mut self) -> R<&'a str> {
        let n = self.u32()? as usize;
        core::str::from_utf8(self.bytes(n)?).map_err(|_| RejectCode::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn agrees_with_postcard(a: u32, b: u64, c: i64, d: i128, e: f64, s in ".{0,20}") {
            let bytes = postcard::to_allocvec(&(a, b, c, d, e, s.as_str())).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut r = Reader::new(&bytes);
            prop_assert_eq!(r.u32()?, a);
            prop_assert_eq!(r.u64()?, b);
            prop_assert_eq!(r.i64()?, c);
            prop_assert_eq!(r.i128()?, d);
            prop_assert_eq!(r.f64()?.to_bits(), e.to_bits());
            prop_assert_eq!(r.str()?, s.as_str());
            prop_assert_eq!(r.remaining(), 0);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut r = Reader::new(&bytes);
            let _ = (r.u32(), r.u64(), r.i64(), r.i128(), r.f64(), r.str());
        }
    }

    #[test]
    fn rejects_overlong_and_overflowing_varints() {
        assert_eq!(
            Reader::new(&[0xff, 0xff, 0xff, 0xff, 0x10]).u32(),
            Err(RejectCode::Malformed)
        );
        assert_eq!(
            Reader::new(&[0xff, 0xff, 0xff, 0xff, 0x0f]).u32(),
            Ok(u32::MAX)
        );
        assert_eq!(Reader::new(&[0x80; 11]).u64(), Err(RejectCode::Malformed));
        assert_eq!(Reader::new(&[0x80]).u64(), Err(RejectCode::Malformed));
    }
}
