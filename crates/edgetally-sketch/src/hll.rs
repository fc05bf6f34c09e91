//! HyperLogLog with a sparse form while small and Ertl's improved estimator.

use super::{put_varint, take_varint, SketchError};

/// The default precision: 2¹⁴ registers, a standard error of 1.04 / 128 ≈ 0.81 %, 16 KiB dense.
pub const HLL_DEFAULT_PRECISION: u8 = 14;
/// The smallest precision (16 registers, 26 % standard error).
pub const HLL_MIN_PRECISION: u8 = 4;
/// The largest precision (65,536 registers, 0.41 %, 64 KiB dense).
pub const HLL_MAX_PRECISION: u8 = 16;

const SPARSE: u8 = 0;
const DENSE: u8 = 1;

/// A HyperLogLog sketch of 2^`precision` registers, each the largest rank (leading zeros of the
/// hash's remaining bits, plus one) seen at its index. Sparse — the non-zero registers, sorted
/// by index — while that is smaller than the dense array (3 bytes per register against 1 per
/// register of the whole array), dense past it. Which form is a function of the registers alone,
/// so equal registers are equal sketches, byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hll {
    precision: u8,
    repr: Repr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Repr {
    /// (index, rank), sorted by index, ranks ≥ 1.
    Sparse(Vec<(u16, u8)>),
    /// One rank per register.
    Dense(Box<[u8]>),
}

impl Hll {
    /// An empty sketch of `precision` ([`HLL_MIN_PRECISION`]..=[`HLL_MAX_PRECISION`]).
    pub fn new(precision: u8) -> Result<Hll, SketchError> {
        if !(HLL_MIN_PRECISION..=HLL_MAX_PRECISION).contains(&precision) {
            return Err(SketchError::Parameter);
        }
        Ok(Hll {
            precision,
            repr: Repr::Sparse(Vec::new()),
        })
    }

    /// The precision.
    pub fn precision(&self) -> u8 {
        self.precision
    }

    fn registers(&self) -> usize {
        1 << self.precision
    }

    /// The largest rank a register can hold: all the hash's remaining bits zero, plus one.
    fn max_rank(&self) -> u8 {
        64 - self.precision + 1
    }

    /// Sparse while 3 bytes per non-zero register are fewer than one per register.
    fn sparse_fits(&self, nonzero: usize) -> bool {
        nonzero.saturating_mul(3) < self.registers()
    }

    /// Adds a subject's hash ([`super::subject_hash`]).
    pub fn insert_hash(&mut self, hash: u64) {
        let p = self.precision;
        let index = (hash >> (64 - p)) as u16;
        let rest = hash << p;
        let rank = (rest.leading_zeros() as u8).min(64 - p) + 1;
        self.raise(index, rank);
    }

    /// Sets register `index` to at least `rank`.
    fn raise(&mut self, index: u16, rank: u8) {
        match &mut self.repr {
            Repr::Dense(regs) => {
                if let Some(r) = regs.get_mut(usize::from(index)) {
                    *r = (*r).max(rank);
                }
            }
            Repr::Sparse(entries) => {
                match entries.binary_search_by_key(&index, |e| e.0) {
                    Ok(i) => entries[i].1 = entries[i].1.max(rank),
                    Err(i) => entries.insert(i, (index, rank)),
                }
                let n = entries.len();
                if !self.sparse_fits(n) {
                    self.densify();
                }
            }
        }
    }

    fn densify(&mut self) {
        if let Repr::Sparse(entries) = &self.repr {
            let mut regs = vec![0u8; self.registers()].into_boxed_slice();
            for &(i, r) in entries {
                if let Some(slot) = regs.get_mut(usize::from(i)) {
                    *slot = r;
                }
            }
            self.repr = Repr::Dense(regs);
        }
    }

    /// Every register, dense.
    fn dense_registers(&self) -> Vec<u8> {
        match &self.repr {
            Repr::Dense(regs) => regs.to_vec(),
            Repr::Sparse(entries) => {
                let mut regs = vec![0u8; self.registers()];
                for &(i, r) in entries {
                    regs[usize::from(i)] = r;
                }
                regs
            }
        }
    }

    /// Merges `other` (register-wise maximum). Sketches of different precision are not
    /// merged: reduce the finer one first ([`Hll::reduce`]).
    pub fn merge(&mut self, other: &Hll) -> Result<(), SketchError> {
        if other.precision != self.precision {
            return Err(SketchError::Mismatch);
        }
        match &other.repr {
            Repr::Sparse(entries) => {
                for &(i, r) in entries {
                    self.raise(i, r);
                }
            }
            Repr::Dense(theirs) => {
                self.densify();
                if let Repr::Dense(mine) = &mut self.repr {
                    for (m, t) in mine.iter_mut().zip(theirs.iter()) {
                        *m = (*m).max(*t);
                    }
                }
            }
        }
        Ok(())
    }

    /// The same sketch at a coarser `precision`, as if every hash had been inserted at it
    /// (exactly: a register's index loses its low bits, which become the first bits of the
    /// rest).
    pub fn reduce(&self, precision: u8) -> Result<Hll, SketchError> {
        if !(HLL_MIN_PRECISION..=self.precision).contains(&precision) {
            return Err(SketchError::Parameter);
        }
        let shift = self.precision - precision;
        let mut out = Hll::new(precision)?;
        let regs = self.dense_registers();
        for (i, &r) in regs.iter().enumerate() {
            if r == 0 {
                continue;
            }
            let index = (i >> shift) as u16;
            // The dropped low bits of the index lead the rest of the hash at the coarser
            // precision.
            let dropped = (i as u32) & ((1u32 << shift) - 1);
            let rank = if dropped == 0 {
                shift + r
            } else {
                (dropped.leading_zeros() - (32 - u32::from(shift))) as u8 + 1
            };
            out.raise(index, rank.min(out.max_rank()));
        }
        Ok(out)
    }

    /// Whether nothing was inserted.
    pub fn is_empty(&self) -> bool {
        match &self.repr {
            Repr::Sparse(e) => e.is_empty(),
            Repr::Dense(r) => r.iter().all(|&x| x == 0),
        }
    }

    /// The estimated number of distinct hashes inserted: Ertl's improved raw estimator
    /// ("New cardinality estimation algorithms for HyperLogLog sketches", 2017), unbiased from
    /// one subject to far past 2⁶⁴ / 2^precision without the classic estimator's switch to
    /// linear counting (and its bias near the switch).
    pub fn estimate(&self) -> f64 {
        let q = usize::from(64 - self.precision);
        let m = self.registers() as f64;
        // Histogram of register values 0..=q+1.
        let mut c = vec![0u64; q + 2];
        match &self.repr {
            Repr::Sparse(entries) => {
                c[0] = self.registers() as u64 - entries.len() as u64;
                for &(_, r) in entries {
                    c[usize::from(r).min(q + 1)] += 1;
                }
            }
            Repr::Dense(regs) => {
                for &r in regs.iter() {
                    c[usize::from(r).min(q + 1)] += 1;
                }
            }
        }
        let mut z = m * tau(1.0 - c[q + 1] as f64 / m);
        for k in (1..=q).rev() {
            z = 0.5 * (z + c[k] as f64);
        }
        z += m * sigma(c[0] as f64 / m);
        let alpha_inf = 0.5 / core::f64::consts::LN_2;
        alpha_inf * m * m / z
    }

    /// The relative standard error of [`Hll::estimate`]: 1.04 / √(2^precision).
    pub fn standard_error(&self) -> f64 {
        1.04 / (self.registers() as f64).sqrt()
    }

    /// The canonical bytes: `precision | form | body`. Sparse body: the count of non-zero
    /// registers, then per register the gap to the previous index (varint) and its rank;
    /// dense body: one rank per register.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.precision];
        match &self.repr {
            Repr::Sparse(entries) => {
                out.push(SPARSE);
                put_varint(&mut out, entries.len() as u64);
                let mut prev = 0u16;
                for (n, &(i, r)) in entries.iter().enumerate() {
                    let gap = if n == 0 { i } else { i - prev - 1 };
                    put_varint(&mut out, u64::from(gap));
                    out.push(r);
                    prev = i;
                }
            }
            Repr::Dense(regs) => {
                out.push(DENSE);
                out.extend_from_slice(regs);
            }
        }
        out
    }

    /// Decodes canonical bytes ([`Hll::encode`]); anything else is refused.
    pub fn decode(bytes: &[u8]) -> Result<Hll, SketchError> {
        let (&precision, rest) = bytes.split_first().ok_or(SketchError::Malformed)?;
        let mut h = Hll::new(precision).map_err(|_| SketchError::Malformed)?;
        let (&form, mut rest) = rest.split_first().ok_or(SketchError::Malformed)?;
        let max = h.max_rank();
        match form {
            SPARSE => {
                let n = take_varint(&mut rest)?;
                let n = usize::try_from(n).map_err(|_| SketchError::Malformed)?;
                if !h.sparse_fits(n) {
                    return Err(SketchError::Malformed);
                }
                let mut entries = Vec::with_capacity(n);
                let mut next = 0u64;
                for _ in 0..n {
                    let index = next
                        .checked_add(take_varint(&mut rest)?)
                        .ok_or(SketchError::Malformed)?;
                    let (&rank, r) = rest.split_first().ok_or(SketchError::Malformed)?;
                    rest = r;
                    if index >= h.registers() as u64 || rank == 0 || rank > max {
                        return Err(SketchError::Malformed);
                    }
                    entries.push((index as u16, rank));
                    next = index + 1;
                }
                h.repr = Repr::Sparse(entries);
            }
            DENSE => {
                if rest.len() != h.registers() || rest.iter().any(|&r| r > max) {
                    return Err(SketchError::Malformed);
                }
                let nonzero = rest.iter().filter(|&&r| r != 0).count();
                if h.sparse_fits(nonzero) {
                    return Err(SketchError::Malformed);
                }
                h.repr = Repr::Dense(rest.into());
                rest = &[];
            }
            _ => return Err(SketchError::Malformed),
        }
        if !rest.is_empty() {
            return Err(SketchError::Malformed);
        }
        Ok(h)
    }

    /// Heap bytes held (for memory accounting).
    pub fn heap_bytes(&self) -> usize {
        match &self.repr {
            Repr::Sparse(e) => e.capacity() * core::mem::size_of::<(u16, u8)>(),
            Repr::Dense(r) => r.len(),
        }
    }
}

/// σ(x) of Ertl's estimator (x: the share of registers still zero).
fn sigma(mut x: f64) -> f64 {
    if x == 1.0 {
        return f64::INFINITY;
    }
    let mut y = 1.0;
    let mut z = x;
    loop {
        x *= x;
        let before = z;
        z += x * y;
        y += y;
        if z == before {
            return z;
        }
    }
}

/// τ(x) of Ertl's estimator (x: one minus the share of registers at the largest rank).
fn tau(mut x: f64) -> f64 {
    if x == 0.0 || x == 1.0 {
        return 0.0;
    }
    let mut y = 1.0;
    let mut z = 1.0 - x;
    loop {
        x = x.sqrt();
        let before = z;
        y *= 0.5;
        z -= (1.0 - x) * (1.0 - x) * y;
        if z == before {
            return z / 3.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subject_hash;
    use proptest::prelude::*;

    fn of(p: u8, hashes: &[u64]) -> Hll {
        let mut h = Hll::new(p).expect("precision");
        hashes.iter().for_each(|&x| h.insert_hash(x));
        h
    }

    proptest! {
        /// Any order, grouping and duplication of inserts and merges gives the same bytes.
        #[test]
        fn merges_are_commutative_associative_idempotent(
            a in proptest::collection::vec(any::<u64>(), 0..3000),
            b in proptest::collection::vec(any::<u64>(), 0..3000),
            c in proptest::collection::vec(any::<u64>(), 0..300),
            p in 4u8..=12,
        ) {
            let (ha, hb, hc) = (of(p, &a), of(p, &b), of(p, &c));
            let mut ab_c = ha.clone();
            ab_c.merge(&hb).expect("merge");
            ab_c.merge(&hc).expect("merge");
            let mut bc = hb.clone();
            bc.merge(&hc).expect("merge");
            let mut c_ba = hc.clone();
            c_ba.merge(&bc).expect("merge");
            c_ba.merge(&ha).expect("merge");
            c_ba.merge(&ha).expect("merge"); // again: idempotent
            let mut all: Vec<u64> = a.iter().chain(&b).chain(&c).copied().collect();
            all.reverse();
            let direct = of(p, &all);
            prop_assert_eq!(ab_c.encode(), c_ba.encode());
            prop_assert_eq!(ab_c.encode(), direct.encode());
            prop_assert_eq!(Hll::decode(&direct.encode()), Ok(direct.clone()));
            // Reducing commutes with merging.
            if p > 4 {
                let mut r = ha.reduce(p - 1).expect("reduce");
                r.merge(&hb.reduce(p - 1).expect("reduce")).expect("merge");
                let mut ab = ha.clone();
                ab.merge(&hb).expect("merge");
                prop_assert_eq!(r.encode(), ab.reduce(p - 1).expect("reduce").encode());
            }
        }

        /// Bytes from the network never panic the decoder, and what it accepts re-encodes
        /// to the same bytes (one form per state).
        #[test]
        fn decoding_is_total_and_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(h) = Hll::decode(&bytes) {
                prop_assert_eq!(h.encode(), bytes);
            }
        }
    }

    #[test]
    fn reduce_equals_inserting_at_the_coarser_precision() {
        let hashes: Vec<u64> = (0..20_000u64)
            .map(|i| subject_hash(&i.to_string(), None))
            .collect();
        for p in [14u8, 10, 6] {
            let fine = of(16, &hashes);
            assert_eq!(fine.reduce(p).expect("reduce"), of(p, &hashes), "p = {p}");
        }
    }

    #[test]
    fn the_form_follows_the_registers_and_odd_bytes_are_refused() {
        let mut h = Hll::new(8).expect("p");
        assert!(h.is_empty());
        assert_eq!(h.encode(), vec![8, SPARSE, 0]);
        for i in 0..85u64 {
            h.insert_hash(i << 56);
        }
        assert_eq!(h.encode()[1], SPARSE, "85 registers: 255 bytes < 256");
        h.insert_hash(85 << 56);
        assert_eq!(h.encode()[1], DENSE, "86 registers: dense");
        assert_eq!(h.encode().len(), 2 + 256);
        assert_eq!(Hll::decode(&h.encode()), Ok(h.clone()));
        // Non-canonical: a dense sketch with few registers, a sparse one with unsorted indices,
        // a rank past the largest, a trailing byte, a precision out of range.
        let mut few = vec![8, DENSE];
        few.extend(std::iter::repeat_n(0u8, 256));
        few[2] = 1;
        assert_eq!(Hll::decode(&few), Err(SketchError::Malformed));
        assert!(Hll::decode(&[8, SPARSE, 2, 5, 1, 0, 1]).is_ok());
        assert_eq!(
            Hll::decode(&[8, SPARSE, 1, 5, 58]),
            Err(SketchError::Malformed),
            "rank 58 > 64 - 8 + 1"
        );
        assert_eq!(Hll::decode(&[8, SPARSE, 0, 0]), Err(SketchError::Malformed));
        assert_eq!(Hll::decode(&[3, SPARSE, 0]), Err(SketchError::Malformed));
        // A count of 2⁶³ − 1 registers (found by the fuzzer: it overflowed the size check).
        assert_eq!(
            Hll::decode(&[10, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0, 0x23]),
            Err(SketchError::Malformed)
        );
        assert_eq!(
            Hll::new(12).expect("p").merge(&Hll::new(14).expect("p")),
            Err(SketchError::Mismatch)
        );
    }

    /// Within 3 standard errors at least 99 % of the time, from one subject to a million
    /// (`cargo xtask sketches` goes to ten million in a release build).
    #[test]
    fn estimates_are_within_three_standard_errors() {
        let mut checked = 0u32;
        let mut outside = 0u32;
        for (n, seeds) in [
            (1u64, 100u64),
            (10, 100),
            (100, 100),
            (1_000, 60),
            (10_000, 30),
            (40_000, 20),
            (100_000, 8),
            (1_000_000, 2),
        ] {
            for seed in 0..seeds {
                let mut h = Hll::new(HLL_DEFAULT_PRECISION).expect("p");
                for i in 0..n {
                    h.insert_hash(subject_hash(&format!("s{seed}-{i}"), None));
                }
                let e = h.estimate();
                let err = (e - n as f64).abs() / n as f64;
                checked += 1;
                if err > 3.0 * h.standard_error() {
                    outside += 1;
                }
                assert!(err < 0.05, "n = {n}, seed {seed}: estimate {e}");
            }
        }
        assert!(
            f64::from(outside) <= 0.01 * f64::from(checked),
            "{outside} of {checked} outside 3 standard errors"
        );
    }

    /// The accuracy table of the closing note: from one to ten million subjects, over many
    /// seeds, the share within 1, 2 and 3 standard errors (`cargo xtask sketches`).
    #[test]
    #[ignore = "minutes in a debug build: cargo xtask sketches runs it in release"]
    fn accuracy_table_to_ten_million() {
        println!(
            "subjects  seeds  mean |err|  max |err|  within 1σ  2σ  3σ  (σ = {:.4})",
            1.04 / 128.0
        );
        for (n, seeds) in [
            (1u64, 1000u64),
            (100, 1000),
            (10_000, 300),
            (100_000, 100),
            (1_000_000, 30),
            (10_000_000, 10),
        ] {
            let (mut sum, mut max, mut within) = (0.0f64, 0.0f64, [0u32; 3]);
            for seed in 0..seeds {
                let mut h = Hll::new(HLL_DEFAULT_PRECISION).expect("p");
                let key: [u8; 16] = core::array::from_fn(|i| (seed as u8).wrapping_add(i as u8));
                for i in 0..n {
                    h.insert_hash(subject_hash(&i.to_string(), Some(&key)));
                }
                let err = (h.estimate() - n as f64).abs() / n as f64;
                sum += err;
                max = max.max(err);
                for (k, w) in within.iter_mut().enumerate() {
                    if err <= (k + 1) as f64 * h.standard_error() {
                        *w += 1;
                    }
                }
            }
            let pct = |w: u32| 100.0 * f64::from(w) / seeds as f64;
            println!(
                "{n:>9}  {seeds:>5}  {:>9.4}%  {:>8.4}%  {:>8.1}%  {:>5.1}%  {:>5.1}%",
                100.0 * sum / seeds as f64,
                100.0 * max,
                pct(within[0]),
                pct(within[1]),
                pct(within[2])
            );
            assert!(pct(within[2]) >= 99.0, "n = {n}");
        }
    }
}
