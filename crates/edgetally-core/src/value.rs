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

/// Nano-units back to the nearest float (ties to even; correct at every magnitude, where
/// `q as f64 / 1e9` would round twice once |q| passes 2⁵³).
pub fn nanos_to_f64(q: i128) -> f64 {
    Sum192::from_i128(q).to_f64()
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

    /// Whether the value is negative, and its magnitude (little-endian limbs).
    fn sign_magnitude(&self) -> (bool, [u64; 3]) {
        let neg = self.limbs[2] >> 63 == 1;
        if !neg {
            return (false, self.limbs);
        }
        // Two's complement: invert and add one.
        let mut m = [!self.limbs[0], !self.limbs[1], !self.limbs[2]];
        for limb in &mut m {
            let (v, overflow) = limb.overflowing_add(1);
            *limb = v;
            if !overflow {
                break;
            }
        }
        (true, m)
    }

    /// The value in value units as the nearest float (ties to even): correctly rounded from
    /// the exact accumulator at every magnitude, never rounded twice.
    pub fn to_f64(&self) -> f64 {
        let (neg, m) = self.sign_magnitude();
        let v = nearest_f64_of_nanos(m);
        if neg {
            -v
        } else {
            v
        }
    }

    /// The exact decimal value in value units ("-12.5", "0.000000001"), at every magnitude.
    pub fn to_decimal(&self) -> String {
        if let Some(v) = self.to_i128() {
            return nanos_to_decimal(v);
        }
        let (neg, m) = self.sign_magnitude();
        let (int, frac) = div_rem_u64(m, SCALE as u64);
        // The integer part, in base 10¹⁹ chunks, most significant first.
        let mut chunks = Vec::new();
        let mut rest = int;
        while rest != [0; 3] {
            let (q, r) = div_rem_u64(rest, 10_000_000_000_000_000_000);
            chunks.push(r);
            rest = q;
        }
        let mut s = String::new();
        if neg {
            s.push('-');
        }
        match chunks.split_last() {
            None => s.push('0'),
            Some((first, others)) => {
                s.push_str(&first.to_string());
                for c in others.iter().rev() {
                    s.push_str(&format!("{c:019}"));
                }
            }
        }
        if frac != 0 {
            let f = format!("{frac:09}");
            s.push('.');
            s.push_str(f.trim_end_matches('0'));
        }
        s
    }
}

/// `(m / d, m % d)` for a 192-bit magnitude and a 64-bit divisor.
fn div_rem_u64(m: [u64; 3], d: u64) -> ([u64; 3], u64) {
    let mut q = [0u64; 3];
    let mut r = 0u128;
    for i in (0..3).rev() {
        let cur = (r << 64) | m[i] as u128;
        q[i] = (cur / d as u128) as u64;
        r = cur % d as u128;
    }
    (q, r as u64)
}

fn bit_length(m: &[u64; 3]) -> u32 {
    for i in (0..3).rev() {
        if m[i] != 0 {
            return 64 * i as u32 + 64 - m[i].leading_zeros();
        }
    }
    0
}

/// The float nearest to `m / 10⁹` (ties to even), `m` a 192-bit magnitude.
fn nearest_f64_of_nanos(m: [u64; 3]) -> f64 {
    const D: u128 = SCALE as u128;
    if m == [0; 3] {
        return 0.0;
    }
    // q in [2⁵³, 2⁵⁴) with value = (q + fraction) · 2^e; `sticky`: the fraction is not zero.
    let (q, e, sticky): (u128, i32, bool) = if bit_length(&m) <= 83 {
        let x = m[0] as u128 | (m[1] as u128) << 64;
        // x · 2^s / D has about bits(x) + s − 29.9 bits: aim at 54 and correct.
        let mut s = 84 - bit_length(&m) as i32;
        loop {
            let shifted = x << s; // s ≥ 0 (it starts ≥ 1 and drops at most once); bits < 90
            let q = shifted / D;
            if q >= 1 << 54 {
                s -= 1;
            } else if q < 1 << 53 {
                s += 1;
            } else {
                break (q, -s, !shifted.is_multiple_of(D));
            }
        }
    } else {
        // At least 2⁸³ nano-units: m / D has at least 54 bits; keep its top 54.
        let (q0, r0) = div_rem_u64(m, D as u64);
        let k = bit_length(&q0) - 54;
        let low_nonzero = (0..k).any(|b| q0[(b / 64) as usize] >> (b % 64) & 1 == 1);
        let mut q = 0u128;
        for b in 0..54 {
            let bit = k + b;
            q |= ((q0[(bit / 64) as usize] >> (bit % 64) & 1) as u128) << b;
        }
        (q, k as i32, r0 != 0 || low_nonzero)
    };
    // 53 significant bits (mant in [2⁵², 2⁵³)), the next one rounds, ties to even.
    let mut mant = (q >> 1) as u64;
    let round = q & 1 == 1;
    if round && (sticky || mant & 1 == 1) {
        mant += 1;
    }
    // mant ≤ 2⁵³ is exact in a float, and so is the power of two (the range is far from
    // the float's limits), so the product is exact.
    mant as f64 * 2f64.powi(e + 1)
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

    /// A decimal string back into nano-units, by schoolbook arithmetic on `Sum192`.
    fn parse_decimal(s: &str) -> Sum192 {
        let (neg, digits) = match s.strip_prefix('-') {
            Some(r) => (true, r),
            None => (false, s),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        let frac = format!("{frac:0<9}");
        let mut acc = Sum192::ZERO;
        for c in int.chars().chain(frac.chars()) {
            // acc = acc * 10 + digit
            let mut ten = Sum192::ZERO;
            for _ in 0..10 {
                ten.add(&acc);
            }
            acc = ten;
            acc.add_i128(c.to_digit(10).expect("digit") as i128);
        }
        if neg {
            let mut m = Sum192::ZERO;
            for (i, l) in acc.limbs.iter().enumerate() {
                m.limbs[i] = !l;
            }
            m.add_i128(1);
            acc = m;
        }
        acc
    }

    #[test]
    fn issue_examples_print_exactly() {
        // Two maximal sums pass the i128 range: no "2e29" any more.
        let mut s = Sum192::from_i128(i128::MAX);
        s.add_i128(i128::MAX);
        assert_eq!(s.to_decimal(), "340282366920938463463374607431.768211454");
        assert_eq!(s.to_decimal().parse::<f64>().ok(), Some(s.to_f64()));
        // A sum whose nano-units pass 2^53: rounded once.
        let q: i128 = 1_700_004_627_056_467_987_654_321;
        assert_eq!(nanos_to_f64(q), 1700004627056467.987654321f64);
        assert_eq!(
            Sum192::from_i128(-q).to_f64(),
            -1700004627056467.987654321f64
        );
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

        /// The decimal is exact (it parses back to the same accumulator, with a parser
        /// written here) and the float is the correctly rounded value of that decimal
        /// (Rust's float parser rounds correctly), across the whole 192-bit range.
        #[test]
        fn sum192_outputs_are_exact_at_every_magnitude(
            parts in proptest::collection::vec(any::<i128>(), 1..8),
            shift in 0u32..127,
            doublings in 0u32..62,
        ) {
            let mut s = Sum192::ZERO;
            for p in &parts {
                s.add_i128(*p >> shift);
            }
            // Up to ±2¹⁹⁰: the accumulator's whole range.
            for _ in 0..doublings {
                let t = s;
                s.add(&t);
            }
            let dec = s.to_decimal();
            prop_assert_eq!(parse_decimal(&dec), s, "{}", dec);
            let want: f64 = dec.parse().expect("a decimal");
            prop_assert_eq!(s.to_f64().to_bits(), want.to_bits(), "{}", dec);
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
