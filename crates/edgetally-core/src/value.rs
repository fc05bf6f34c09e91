//! The exact numeric model.
//!
//! A value is a finite `f64` with `|v| ≤ 1e15`. On entry it is converted, exactly, to an integer
//! count of nano-units: `q = round_half_even(v × 10⁹)`, computed from the float's mantissa and
//! exponent in integer arithmetic, so the conversion is a pure function of the value's bits.
//! Sums are then integer additions, which are associative and commutative: any order of merging
//! yields bit-identical totals. Per summary, sums travel as `i128` nano-units; accumulated totals
//! use a 192-bit two's-complement integer ([`Sum192`]), which cannot overflow in any realistic
//! history (it would take 2⁶³ additions of the largest `i128`). Counts saturate at `u64::MAX`,
//! which is still associative for non-negative additions. `min` and `max` keep the original
//! `f64` (with `-0.0` normalised to `0.0`), whose min/max is order-independent.

use crate::code::RejectCode;
use serde::{Deserialize, Serialize};

/// Nano-units per value unit: sums are exact to 10⁻⁹.
pub const SCALE: i128 = 1_000_000_000;
/// The largest magnitude a single value may have.
pub const MAX_ABS_VALUE: f64 = 1e15;

/// Checks a value and normalises `-0.0` to `0.0`.
pub fn validate_value(v: f64) -> Result<f64, RejectCode> {
    if !v.is_finite() || v.abs() > MAX_ABS_VALUE {
        return Err(RejectCode::InvalidValue);
    }
    Ok(if v == 0.0 { 0.0 } else { v })
}

/// Converts a valid value to nano-units, exactly rounded half-to-even.
pub fn quantize(v: f64) -> Result<i128, RejectCode> {
    let v = validate_value(v)?;
    if v == 0.0 {
        return Ok(0);
    }
    let bits = v.to_bits();
    let negative = bits >> 63 == 1;
    let exp_bits = ((bits >> 52) & 0x7ff) as i32;
    let frac = bits & ((1u64 << 52) - 1);
    // v = mantissa × 2^exp, exactly.
    let (mantissa, exp) = if exp_bits == 0 {
        (frac, -1074)
    } else {
        (frac | (1u64 << 52), exp_bits - 1075)
    };
    let n = mantissa as u128 * SCALE as u128; // < 2^83
    let q = if exp >= 0 {
        // |v| ≤ 1e15 < 2^50 keeps exp ≤ -3 for normal numbers; this branch is defensive.
        n.checked_shl(exp as u32)
            .filter(|r| *r < (1u128 << 126))
            .ok_or(RejectCode::InvalidValue)?
    } else {
        let s = (-exp) as u32;
        if s >= 100 {
            0
        } else {
            let quotient = n >> s;
            let rem = n & ((1u128 << s) - 1);
            let half = 1u128 << (s - 1);
            if rem > half || (rem == half && quotient & 1 == 1) {
                quotient + 1
            } else {
                quotient
            }
        }
    };
    let q = q as i128;
    Ok(if negative { -q } else { q })
}

/// The fast path of [`quantize`]: `Some(q)` exactly when `q = round(v·10⁹)` can be read off the
/// float product: every integer with |v| < 2.25·10⁶ and about 95 % of values with one to nine
/// decimals in that range; `None` means "take [`quantize`]" (which also validates).
///
/// Why it is exact: p = fl(v·10⁹). If |p| < 2⁵¹ then ulp(p) ≤ 2⁻², so the exact product lies
/// within 2⁻³ of p; when p is an integer, that integer is the exact product's nearest, so
/// round-half-even gives p. NaN and infinities fail the magnitude test.
#[inline]
pub fn quantize_fast(v: f64) -> Option<i128> {
    const LIMIT: f64 = (1u64 << 51) as f64;
    let p = v * 1e9;
    if p.abs() < LIMIT {
        let i = p as i64;
        if i as f64 == p {
            return Some(i as i128);
        }
    }
    None
}

/// Nano-units back to a float (deterministic: one correctly rounded division).
pub fn nanos_to_f64(q: i128) -> f64 {
    q as f64 / SCALE as f64
}

/// Formats nano-units as an exact decimal string ("-12.5", "0.000000001").
pub fn nanos_to_decimal(q: i128) -> String {
    let neg = q < 0;
    let a = q.unsigned_abs();
    let int = a / SCALE as u128;
    let frac = a % SCALE as u128;
    let mut s = String::new();
    if neg {
        s.push('-');
    }
    s.push_str(&int.to_string());
    if frac != 0 {
        let f = format!("{frac:09}");
        s.push('.');
        s.push_str(f.trim_end_matches('0'));
    }
    s
}

/// A 192-bit two's-complement accumulator of nano-units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sum192 {
    /// Little-endian 64-bit limbs.
    limbs: [u64; 3],
}

impl Sum192 {
    /// Zero.
    pub const ZERO: Sum192 = Sum192 { limbs: [0; 3] };

    /// The accumulator holding exactly `x`.
    pub const fn from_i128(x: i128) -> Sum192 {
        let ext = if x < 0 { u64::MAX } else { 0 };
        Sum192 {
            limbs: [x as u64, (x >> 64) as u64, ext],
        }
    }

    /// Adds `other` (wrapping only past ±2¹⁹¹, which no history reaches).
    pub fn add(&mut self, other: &Sum192) {
        let mut carry = 0u128;
        for i in 0..3 {
            let s = self.limbs[i] as u128 + other.limbs[i] as u128 + carry;
            self.limbs[i] = s as u64;
            carry = s >> 64;
        }
    }

    /// Adds an `i128`.
    pub fn add_i128(&mut self, x: i128) {
        self.add(&Sum192::from_i128(x));
    }

    /// The value, if it fits an `i128`.
    pub fn to_i128(&self) -> Option<i128> {
        let v = (self.limbs[0] as u128 | (self.limbs[1] as u128) << 64) as i128;
        let ext = if v < 0 { u64::MAX } else { 0 };
        (self.limbs[2] == ext).then_some(v)
    }

    /// The value in value units as a float.
    pub fn to_f64(&self) -> f64 {
        match self.to_i128() {
            Some(v) => nanos_to_f64(v),
            None => {
                let hi = self.limbs[2] as i64 as f64;
                let lo = (self.limbs[0] as u128 | (self.limbs[1] as u128) << 64) as f64;
                (hi * 2f64.powi(128) + lo) / SCALE as f64
            }
        }
    }

    /// The exact decimal value in value units, when it fits; else the float's rendering.
    pub fn to_decimal(&self) -> String {
        match self.to_i128() {
            Some(v) => nanos_to_decimal(v),
            None => format!("{:e}", self.to_f64()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quantize_known_values() {
        let cases: &[(f64, i128)] = &[
            (1.0, 1_000_000_000),
            (0.1, 100_000_000),
            (-2.5, -2_500_000_000),
            (1e-9, 1),
            (0.5e-9 * 2.0, 1),
            (0.125, 125_000_000),
            (1e15, 1_000_000_000_000_000_000_000_000),
            (-0.0, 0),
            (f64::MIN_POSITIVE, 0),
        ];
        for &(v, q) in cases {
            assert_eq!(quantize(v), Ok(q), "{v}");
        }
        assert_eq!(quantize(f64::NAN), Err(RejectCode::InvalidValue));
        assert_eq!(quantize(f64::INFINITY), Err(RejectCode::InvalidValue));
        assert_eq!(quantize(1.0000001e15), Err(RejectCode::InvalidValue));
    }

    #[test]
    fn quantize_fast_takes_common_values() {
        for v in [
            0.0,
            -0.0,
            1.0,
            -3.0,
            0.1,
            23.456,
            1234.5678,
            0.001,
            2_000_000.0,
        ] {
            assert_eq!(quantize_fast(v).map(Ok), Some(quantize(v)), "{v}");
        }
        for v in [f64::NAN, f64::INFINITY, 1e7, 1.0 / 3.0, 1e-300] {
            assert_eq!(quantize_fast(v), None, "{v}");
        }
    }

    #[test]
    fn decimal_rendering() {
        assert_eq!(nanos_to_decimal(1_500_000_000), "1.5");
        assert_eq!(nanos_to_decimal(-1), "-0.000000001");
        assert_eq!(nanos_to_decimal(0), "0");
        assert_eq!(nanos_to_decimal(42 * SCALE), "42");
    }

    #[test]
    fn sum192_carries_across_limbs() {
        let mut s = Sum192::from_i128(i128::MAX);
        s.add_i128(i128::MAX);
        assert_eq!(s.to_i128(), None);
        s.add_i128(-i128::MAX);
        s.add_i128(-i128::MAX);
        assert_eq!(s.to_i128(), Some(0));
    }

    proptest! {
        // The conversion agrees with a decimal model: multiply exactly via the shortest
        // round-trip decimal of small binary fractions, which are exact in both.
        #[test]
        fn quantize_matches_integer_model(k in -(1i64 << 40)..(1i64 << 40), shift in 0u32..20) {
            let v = k as f64 / (1u64 << shift) as f64; // exact in f64
            let num = k as i128 * SCALE;
            let den = 1i128 << shift;
            // round half to even of num/den
            let q = num.div_euclid(den);
            let r = num.rem_euclid(den);
            let expect = if 2 * r > den || (2 * r == den && q & 1 == 1) { q + 1 } else { q };
            prop_assert_eq!(quantize(v), Ok(expect));
        }

        #[test]
        fn quantize_fast_agrees(k in -(1i64 << 50)..(1i64 << 50), scale in 0u32..13, raw in any::<f64>()) {
            // Decimal-looking values (k / 10^scale) and arbitrary bit patterns alike.
            for v in [k as f64 / 10f64.powi(scale as i32), raw] {
                if let Some(q) = quantize_fast(v) {
                    prop_assert_eq!(Ok(q), quantize(v), "v = {:e}", v);
                }
            }
        }

        #[test]
        fn quantize_is_monotone(a in -1e15f64..1e15, b in -1e15f64..1e15) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(quantize(lo)? <= quantize(hi)?);
        }

        #[test]
        fn sum192_is_exact_against_i128(xs in proptest::collection::vec(any::<i64>(), 0..50)) {
            let mut s = Sum192::ZERO;
            let mut t: i128 = 0;
            for x in xs { s.add_i128(x as i128 * 1000); t += x as i128 * 1000; }
            prop_assert_eq!(s.to_i128(), Some(t));
        }
    }
}
