//! Per-producer rollups (what top-k by producer reads) against a model, with many producers
//! in one bucket (a bucket's table turns from a short list into an indexed one past 16), and
//! across `Replica::expire`, which shrinks closed buckets' tables — including a bucket that
//! is added to after it was shrunk.

mod common;

use common::entry;
use edgetally_core::{Batch, BatchId, Replica, TopBy};
use edgetally_proto::{BatchBuilder, Signer};
use proptest::prelude::*;
use std::collections::BTreeMap;

const T0: i64 = 1_700_000_000_000;
const MINUTE: i64 = 60_000;

/// A batch of `n` events of producer `p` in minute `m` (its own epoch `epoch`).
fn batch(p: u8, epoch: u64, m: i64, n: u8) -> Batch {
    let s = Signer::from_seed([p; 32]);
    let mut b = BatchBuilder::new(1_000).expect("width");
    for i in 0..n {
        b.record("page", None, T0 + m * MINUTE + i64::from(i), 1.0)
            .expect("record");
    }
    b.finish(
        BatchId {
            producer: s.producer(),
            epoch,
            seq: 0,
        },
        T0,
    )
}

fn check(r: &Replica, model: &BTreeMap<String, u64>) -> Result<(), TestCaseError> {
    let rows = r.topk(
        "page",
        T0 - 60 * MINUTE,
        T0 + 60 * MINUTE,
        10_000,
        TopBy::Producer,
    );
    let got: BTreeMap<String, u64> = rows
        .rows
        .into_iter()
        .map(|(name, t)| (name.unwrap_or_default(), t.count))
        .collect();
    prop_assert_eq!(&got, model);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn top_producers_match_a_model_across_growth_and_shrinking(
        // (producer, minute, events): up to 60 producers over 3 minutes.
        first in proptest::collection::vec((1u8..61, 0i64..3, 1u8..5), 1..150),
        later in proptest::collection::vec((1u8..61, 0i64..3, 1u8..5), 0..60),
    ) {
        let mut r = Replica::new();
        let mut model: BTreeMap<String, u64> = BTreeMap::new();
        let mut epoch = 0u64;
        let mut apply = |r: &mut Replica, model: &mut BTreeMap<String, u64>, (p, m, n): (u8, i64, u8)| {
            epoch += 1;
            let b = batch(p, epoch, m, n);
            *model.entry(b.id.producer.to_hex()).or_default() += u64::from(n);
            r.apply(entry(&b)).expect("apply");
        };
        for &x in &first {
            apply(&mut r, &mut model, x);
        }
        check(&r, &model)?;
        // Every minute closed: the tables shrink, the totals stay.
        r.expire(T0 + 10 * MINUTE);
        check(&r, &model)?;
        // A late add to a shrunk bucket still counts (and regrows it).
        for &x in &later {
            apply(&mut r, &mut model, x);
        }
        check(&r, &model)?;
        let restored = Replica::restore(r.snapshot()).expect("restore");
        check(&restored, &model)?;
    }
}
