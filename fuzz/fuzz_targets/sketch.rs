//! Arbitrary bytes decoded as each sketch (issue 30): never a panic; what decodes re-encodes
//! to the same bytes (one form per state), merges with itself as a CRDT should (a
//! distinct-count sketch is unchanged, a quantile sketch's counts double), and answers.
#![no_main]

use edgetally_sketch::{Hll, Quantiles};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Hll::decode(data) {
        assert_eq!(h.encode(), data);
        let mut twice = h.clone();
        twice.merge(&h).expect("same precision");
        assert_eq!(twice, h, "idempotent");
        let e = h.estimate();
        assert!(e >= 0.0 && !e.is_nan());
        if h.precision() > 4 {
            let _ = h.reduce(h.precision() - 1).expect("coarser");
        }
    }
    if let Ok(q) = Quantiles::decode(data) {
        assert_eq!(q.encode(), data);
        let mut twice = q.clone();
        twice.merge(&q).expect("same accuracy");
        if q.count() < u64::MAX / 2 {
            assert_eq!(twice.count(), 2 * q.count(), "counts add");
        }
        for p in [0.0, 0.5, 0.99, 1.0] {
            let _ = q.quantile(p);
        }
    }
});
