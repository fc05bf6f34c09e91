//! `Replica::novelty` predicts exactly what `apply` adds (the merger's quotas rely on it).

use edgetally_core::{BatchId, LogEntry, Replica};
use edgetally_proto::{BatchBuilder, Signer};
use proptest::prelude::*;
use std::sync::Arc;

const NOW: i64 = 1_700_000_000_000;

/// Counts (categories, entity series) the way a query would see them.
fn shape(r: &Replica, cats: &[&str]) -> (usize, usize) {
    let c = r.categories().len();
    let mut e = 0;
    for cat in cats {
        let rows = r.topk(cat, i64::MIN, i64::MAX, 10_000, edgetally_core::TopBy::Entity);
        e += rows.rows.len();
    }
    (c, e)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn novelty_is_what_apply_adds(batches in proptest::collection::vec(
        (0u8..3, proptest::collection::vec((0usize..4, proptest::option::of(0usize..5), 0i64..5_000), 1..12)),
        1..8,
    )) {
        const CATS: [&str; 4] = ["a", "b", "c", "d"];
        const ENTS: [&str; 5] = ["e0", "e1", "e2", "e3", "e4"];
        let mut r = Replica::new();
        for (seq, (who, recs)) in batches.into_iter().enumerate() {
            let s = Signer::from_seed([who + 1; 32]);
            let mut b = BatchBuilder::new(1000).expect("width");
            for (c, e, t) in recs {
                b.record(CATS[c], e.map(|e| ENTS[e]), NOW - t, 1.0).expect("record");
            }
            let batch = b.finish(BatchId { producer: s.producer(), epoch: 1, seq: seq as u64 }, NOW);
            let n = r.novelty(&batch);
            let (series, (cats, ents)) = (r.series_count(), shape(&r, &CATS));
            r.apply(LogEntry { batch: Arc::new(batch), raw: Arc::from(&[][..]) }).expect("apply");
            let (cats2, ents2) = shape(&r, &CATS);
            prop_assert_eq!(r.series_count() - series, n.series as usize);
            prop_assert_eq!(cats2 - cats, n.categories as usize);
            prop_assert_eq!(ents2 - ents, n.entities as usize);
        }
    }
}
