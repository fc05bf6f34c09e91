//! A relative-error quantile sketch (DDSketch's logarithmic buckets) with integer keys and no
//! collapsing: merges add counts, so any order of merges gives the same sketch.

use super::{put_varint, take_varint, SketchError};

/// One sign's buckets: (key, count) sorted by key, counts ≥ 1. A sorted vector rather than a
/// B-tree: the key range is bounded (about 2,800 keys per sign at 1 %), inserts mostly hit an
/// existing key, merges are one linear pass — and the browser's wasm module carries no B-tree
/// code (about 4 KB gzipped).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Buckets(Vec<(i32, u64)>);

impl Buckets {
    fn add(&mut self, key: i32, count: u64) {
        match self.0.binary_search_by_key(&key, |e| e.0) {
            Ok(i) => self.0[i].1 = self.0[i].1.saturating_add(count),
            Err(i) => self.0.insert(i, (key, count)),
        }
    }

    fn merge(&mut self, other: &Buckets) {
        super::merge_sorted(&mut self.0, &other.0, u64::saturating_add);
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn values(&self) -> impl DoubleEndedIterator<Item = &u64> {
        self.0.iter().map(|e| &e.1)
    }

    fn iter(&self) -> impl DoubleEndedIterator<Item = (&i32, &u64)> {
        self.0.iter().map(|e| (&e.0, &e.1))
    }
}

impl<'a> IntoIterator for &'a Buckets {
    type Item = (&'a i32, &'a u64);
    type IntoIter =
        core::iter::Map<core::slice::Iter<'a, (i32, u64)>, fn(&(i32, u64)) -> (&i32, &u64)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|e| (&e.0, &e.1))
    }
}

/// The default relative accuracy, in basis points: 1 %.
pub const QUANTILES_DEFAULT_ACCURACY_BP: u16 = 100;
/// The smallest magnitude with a bucket of its own; smaller ones count as zero.
pub const QUANTILES_MIN: f64 = 1e-9;
/// The largest magnitude with a bucket of its own; larger ones count in an overflow bucket
/// (one per sign), which answers report.
pub const QUANTILES_MAX: f64 = 1e15;

/// A quantile sketch: every value's magnitude falls in bucket ⌈log_γ |v|⌉ of its sign, with
/// γ = (1 + α) / (1 − α) for the relative accuracy α; a bucket answers with
/// 2γⁱ / (γ + 1), within α of every value in it. The key range is bounded by
/// [`QUANTILES_MIN`] and [`QUANTILES_MAX`] (about 2,800 buckets per sign at 1 %), so a
/// sketch's size is bounded without ever merging buckets — the merge stays exact and
/// order-free. The logarithm is `libm`'s, the same on every target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quantiles {
    accuracy_bp: u16,
    /// Values whose magnitude is below [`QUANTILES_MIN`] (zeros included).
    zero: u64,
    /// Values below −[`QUANTILES_MAX`] and above it.
    negative_overflow: u64,
    positive_overflow: u64,
    /// Bucket key → count, for negative and positive values, counts ≥ 1.
    negative: Buckets,
    positive: Buckets,
}

impl Default for Quantiles {
    /// An empty sketch at the default accuracy ([`QUANTILES_DEFAULT_ACCURACY_BP`]).
    fn default() -> Quantiles {
        Quantiles {
            accuracy_bp: QUANTILES_DEFAULT_ACCURACY_BP,
            zero: 0,
            negative_overflow: 0,
            positive_overflow: 0,
            negative: Buckets::default(),
            positive: Buckets::default(),
        }
    }
}

impl Quantiles {
    /// An empty sketch of relative accuracy `accuracy_bp` basis points (1..=1000: 0.01 % to
    /// 10 %).
    pub fn new(accuracy_bp: u16) -> Result<Quantiles, SketchError> {
        if !(1..=1000).contains(&accuracy_bp) {
            return Err(SketchError::Parameter);
        }
        Ok(Quantiles {
            accuracy_bp,
            zero: 0,
            negative_overflow: 0,
            positive_overflow: 0,
            negative: Buckets::default(),
            positive: Buckets::default(),
        })
    }

    /// The relative accuracy, basis points.
    pub fn accuracy_bp(&self) -> u16 {
        self.accuracy_bp
    }

    fn alpha(&self) -> f64 {
        f64::from(self.accuracy_bp) / 10_000.0
    }

    fn gamma(&self) -> f64 {
        (1.0 + self.alpha()) / (1.0 - self.alpha())
    }

    fn ln_gamma(&self) -> f64 {
        libm::log(self.gamma())
    }

    /// The bucket key of a magnitude within the tracked range.
    fn key(&self, magnitude: f64) -> i32 {
        libm::ceil(libm::log(magnitude) / self.ln_gamma()) as i32
    }

    /// The largest key a tracked magnitude can have (and the smallest).
    fn key_range(&self) -> (i32, i32) {
        (self.key(QUANTILES_MIN), self.key(QUANTILES_MAX))
    }

    /// The value a bucket answers with.
    fn value(&self, key: i32) -> f64 {
        2.0 * libm::exp(f64::from(key) * self.ln_gamma()) / (self.gamma() + 1.0)
    }

    /// Adds `count` observations of `value` (finite; a non-finite value is ignored — records
    /// are checked before they reach a sketch).
    pub fn insert(&mut self, value: f64, count: u64) {
        if !value.is_finite() || count == 0 {
            return;
        }
        let m = value.abs();
        if m < QUANTILES_MIN {
            self.zero = self.zero.saturating_add(count);
        } else if m > QUANTILES_MAX {
            if value < 0.0 {
                self.negative_overflow = self.negative_overflow.saturating_add(count);
            } else {
                self.positive_overflow = self.positive_overflow.saturating_add(count);
            }
        } else {
            let k = self.key(m);
            let store = if value < 0.0 {
                &mut self.negative
            } else {
                &mut self.positive
            };
            store.add(k, count);
        }
    }

    /// Adds `other`'s counts (same accuracy only).
    pub fn merge(&mut self, other: &Quantiles) -> Result<(), SketchError> {
        if other.accuracy_bp != self.accuracy_bp {
            return Err(SketchError::Mismatch);
        }
        self.zero = self.zero.saturating_add(other.zero);
        self.negative_overflow = self
            .negative_overflow
            .saturating_add(other.negative_overflow);
        self.positive_overflow = self
            .positive_overflow
            .saturating_add(other.positive_overflow);
        self.negative.merge(&other.negative);
        self.positive.merge(&other.positive);
        Ok(())
    }

    /// Observations held.
    /// (Saturating: a hostile sketch's counts cannot overflow it.)
    pub fn count(&self) -> u64 {
        self.negative
            .values()
            .chain(self.positive.values())
            .chain([&self.zero, &self.negative_overflow, &self.positive_overflow])
            .fold(0u64, |a, &c| a.saturating_add(c))
    }

    /// Observations outside the tracked range, (below −[`QUANTILES_MAX`], above it).
    pub fn overflow(&self) -> (u64, u64) {
        (self.negative_overflow, self.positive_overflow)
    }

    /// The `q`-quantile (0 ≤ q ≤ 1): within the relative accuracy of the observation of rank
    /// ⌊q·(n − 1)⌋ in ascending order. A quantile falling in an overflow bucket answers
    /// ±[`QUANTILES_MAX`] (the answer reports the overflow counts); one among the values
    /// smaller than [`QUANTILES_MIN`] answers 0. `None` when empty or `q` is out of range.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = libm::floor(q * (n - 1) as f64) as u64;
        let mut seen = self.negative_overflow;
        if rank < seen {
            return Some(-QUANTILES_MAX);
        }
        // Negative values ascending: the largest magnitudes first.
        for (&k, &c) in self.negative.iter().rev() {
            seen = seen.saturating_add(c);
            if rank < seen {
                return Some(-self.value(k));
            }
        }
        seen = seen.saturating_add(self.zero);
        if rank < seen {
            return Some(0.0);
        }
        for (&k, &c) in &self.positive {
            seen = seen.saturating_add(c);
            if rank < seen {
                return Some(self.value(k));
            }
        }
        Some(QUANTILES_MAX)
    }

    /// The canonical bytes: `accuracy (u16 LE) | zero | negative overflow | positive overflow`
    /// (varints), then per sign (negative first) the number of buckets and, per bucket in
    /// ascending key order, the key's gap to the previous one (the first: zigzag of the key)
    /// and its count.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.accuracy_bp.to_le_bytes().to_vec();
        put_varint(&mut out, self.zero);
        put_varint(&mut out, self.negative_overflow);
        put_varint(&mut out, self.positive_overflow);
        for store in [&self.negative, &self.positive] {
            put_varint(&mut out, store.len() as u64);
            let mut prev: Option<i32> = None;
            for (&k, &c) in store {
                match prev {
                    None => put_varint(&mut out, zigzag(k)),
                    Some(p) => put_varint(&mut out, (i64::from(k) - i64::from(p) - 1) as u64),
                }
                put_varint(&mut out, c);
                prev = Some(k);
            }
        }
        out
    }

    /// Decodes canonical bytes ([`Quantiles::encode`]); anything else is refused.
    pub fn decode(bytes: &[u8]) -> Result<Quantiles, SketchError> {
        let (acc, mut rest) = bytes.split_at_checked(2).ok_or(SketchError::Malformed)?;
        let accuracy_bp = u16::from_le_bytes([acc[0], acc[1]]);
        let mut s = Quantiles::new(accuracy_bp).map_err(|_| SketchError::Malformed)?;
        s.zero = take_varint(&mut rest)?;
        s.negative_overflow = take_varint(&mut rest)?;
        s.positive_overflow = take_varint(&mut rest)?;
        let (lo, hi) = s.key_range();
        for sign in 0..2 {
            let n = take_varint(&mut rest)?;
            // Every bucket takes at least two bytes: a bound before allocating anything.
            if n > (rest.len() / 2) as u64 {
                return Err(SketchError::Malformed);
            }
            let mut store = Buckets(Vec::with_capacity(n as usize));
            let mut prev: Option<i64> = None;
            for _ in 0..n {
                let v = take_varint(&mut rest)?;
                let k = match prev {
                    // Zigzag of an i32 only: a larger varint would name the same key twice.
                    None if v > u64::from(u32::MAX) => return Err(SketchError::Malformed),
                    None => unzigzag(v),
                    Some(p) => p
                        .checked_add(i64::try_from(v).map_err(|_| SketchError::Malformed)?)
                        .and_then(|x| x.checked_add(1))
                        .ok_or(SketchError::Malformed)?,
                };
                let c = take_varint(&mut rest)?;
                if c == 0 || k < i64::from(lo) || k > i64::from(hi) {
                    return Err(SketchError::Malformed);
                }
                store.0.push((k as i32, c));
                prev = Some(k);
            }
            if sign == 0 {
                s.negative = store;
            } else {
                s.positive = store;
            }
        }
        if !rest.is_empty() {
            return Err(SketchError::Malformed);
        }
        Ok(s)
    }

    /// Heap bytes held (for memory accounting).
    pub fn heap_bytes(&self) -> usize {
        (self.negative.0.capacity() + self.positive.0.capacity())
            * core::mem::size_of::<(i32, u64)>()
    }
}

fn zigzag(k: i32) -> u64 {
    u64::from(((k << 1) ^ (k >> 31)) as u32)
}

fn unzigzag(v: u64) -> i64 {
    let v = v as i64;
    (v >> 1) ^ -(v & 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn of(values: &[f64]) -> Quantiles {
        let mut s = Quantiles::new(QUANTILES_DEFAULT_ACCURACY_BP).expect("accuracy");
        values.iter().for_each(|&v| s.insert(v, 1));
        s
    }

    fn value() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>().prop_filter("finite", |v| v.is_finite()),
            -1e6f64..1e6,
            Just(0.0),
            Just(-0.0),
            Just(f64::MIN_POSITIVE / 4.0), // subnormal
            Just(1e15),
            Just(1.000_000_000_000_000_2e15),
        ]
    }

    proptest! {
        /// Any order and grouping of inserts and merges gives the same bytes.
        #[test]
        fn merges_are_commutative_and_associative(
            a in proptest::collection::vec(value(), 0..200),
            b in proptest::collection::vec(value(), 0..200),
            c in proptest::collection::vec(value(), 0..50),
        ) {
            let (qa, qb, qc) = (of(&a), of(&b), of(&c));
            let mut ab_c = qa.clone();
            ab_c.merge(&qb).expect("merge");
            ab_c.merge(&qc).expect("merge");
            let mut cb = qc.clone();
            cb.merge(&qb).expect("merge");
            let mut a_cb = qa.clone();
            a_cb.merge(&cb).expect("merge");
            let mut all: Vec<f64> = c.iter().chain(&a).chain(&b).copied().collect();
            all.reverse();
            prop_assert_eq!(ab_c.encode(), a_cb.encode());
            prop_assert_eq!(ab_c.encode(), of(&all).encode());
            prop_assert_eq!(Quantiles::decode(&ab_c.encode()), Ok(ab_c.clone()));
            prop_assert_eq!(ab_c.count(), (a.len() + b.len() + c.len()) as u64);
        }

        #[test]
        fn decoding_is_total_and_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(s) = Quantiles::decode(&bytes) {
                prop_assert_eq!(s.encode(), bytes);
                let _ = (s.count(), s.quantile(0.5));
            }
        }

        /// Every value's bucket answers within the relative accuracy of it.
        #[test]
        fn a_bucket_answers_within_the_accuracy_of_its_values(v in QUANTILES_MIN..QUANTILES_MAX) {
            let s = of(&[v]);
            let got = s.quantile(0.5).expect("one value");
            prop_assert!((got - v).abs() <= 0.01 * v * (1.0 + 1e-12), "{} for {}", got, v);
            let n = of(&[-v]).quantile(0.5).expect("one value");
            prop_assert!((n + v).abs() <= 0.01 * v * (1.0 + 1e-12));
        }
    }

    /// Every reported quantile within 1 % of the exact one, for heavy tails, discrete values
    /// and outliers.
    #[test]
    fn quantiles_are_within_the_relative_accuracy() {
        let mut rng = Lcg(7);
        let pareto: Vec<f64> = (0..50_000)
            .map(|_| 1.0 / rng.unit().powf(1.0 / 1.2))
            .collect();
        let lognormal: Vec<f64> = (0..50_000)
            .map(|_| {
                let (u, v) = (rng.unit(), rng.unit());
                (0.5 + 2.0 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()).exp()
            })
            .collect();
        let discrete: Vec<f64> = (0..20_000).map(|i| [1.0, 2.0, 5.0, 100.0][i % 4]).collect();
        let mut outliers: Vec<f64> = (0..10_000).map(|_| 20.0 + rng.unit()).collect();
        outliers.extend([1e9, 3e12, -4e7, 0.0, 1e-6]);
        let mixed: Vec<f64> = (0..30_000).map(|_| (rng.unit() - 0.5) * 1e4).collect();
        for (name, data) in [
            ("pareto", pareto),
            ("lognormal", lognormal),
            ("discrete", discrete),
            ("outliers", outliers),
            ("mixed signs", mixed),
        ] {
            let s = of(&data);
            let mut sorted = data.clone();
            sorted.sort_by(f64::total_cmp);
            for q in [0.0, 0.01, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0] {
                let exact = sorted[(q * (sorted.len() - 1) as f64).floor() as usize];
                let got = s.quantile(q).expect("quantile");
                assert!(
                    (got - exact).abs() <= 0.01 * exact.abs() * (1.0 + 1e-9),
                    "{name} q{q}: {got} against {exact}"
                );
            }
        }
    }

    #[test]
    fn the_range_is_bounded_and_reported() {
        let mut s = of(&[1e20, -1e20, 5.0, 1e-12, -0.0]);
        assert_eq!(s.overflow(), (1, 1));
        assert_eq!(s.quantile(0.0), Some(-QUANTILES_MAX));
        assert_eq!(s.quantile(1.0), Some(QUANTILES_MAX));
        assert_eq!(
            s.quantile(0.5),
            Some(0.0),
            "two values under 1e-9 in the middle"
        );
        s.insert(f64::NAN, 1);
        assert_eq!(s.count(), 5);
        let (lo, hi) = s.key_range();
        assert!(hi - lo < 3_000, "{lo}..{hi}");
        assert_eq!(
            Quantiles::new(100)
                .expect("q")
                .merge(&Quantiles::new(50).expect("q")),
            Err(SketchError::Mismatch)
        );
        assert_eq!(Quantiles::new(0), Err(SketchError::Parameter));
        // A bucket key outside the range, a zero count, trailing bytes: refused.
        // Found by the fuzzer: a first key written as a varint past 32 bits (the same key as
        // its short form).
        let long_key = [
            1, 0, 4, 20, 1, 4, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 8, 0x3f,
            0x27, 0, 1, 0, 1, 0,
        ];
        assert_eq!(Quantiles::decode(&long_key), Err(SketchError::Malformed));
        let mut bad = of(&[5.0]).encode();
        bad.push(0);
        assert_eq!(Quantiles::decode(&bad), Err(SketchError::Malformed));
    }

    /// The test data's generator (a 64-bit LCG; the project's `Rng` lives in the test crate).
    pub(super) struct Lcg(pub(super) u64);

    impl Lcg {
        fn unit(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
    }
}
