//! `Replica::encode_snapshot` writes the snapshot straight from the replica's tables (no
//! `Snapshot` value in between, so a compaction does not hold the state three times over).
//! Its bytes must be exactly `Snapshot::encode` of `Replica::snapshot` — the stored and the
//! served form — for every shape a replica takes: entities and none, many producers per
//! bucket (the rollups' large tables), expired epochs, pruned tiers, producers released,
//! and a replica rebuilt from a snapshot (another memory layout of the same state).

mod common;

use common::{batches, entry, NOW};
use edgetally_core::{Replica, Retention, Snapshot};
use proptest::prelude::*;

const HOUR: i64 = 3_600_000;

fn same_bytes(r: &Replica, stage: &str) -> Result<(), TestCaseError> {
    let streamed = r.encode_snapshot().map_err(TestCaseError::fail)?;
    let built = r.snapshot();
    prop_assert_eq!(&streamed, &built.encode(), "{}", stage);
    prop_assert_eq!(
        Snapshot::decode(&streamed).map_err(TestCaseError::fail)?,
        built
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn encode_snapshot_equals_encoding_the_snapshot(
        spec in proptest::collection::vec(
            // Up to 24 producers: more than 16 in one bucket makes a rollup table large.
            (0u8..24, 0u8..3, proptest::collection::vec(
                (0u8..3, proptest::option::of(0u8..5), 0i64..50 * HOUR, -1000i32..1000), 1..5)),
            0..60),
        cut_hours in 0i64..50,
        keep_hours in 1i64..60,
    ) {
        let all = batches(&spec);
        let mut r = Replica::new();
        same_bytes(&r, "empty")?;
        for b in &all {
            r.apply(entry(b)).expect("apply");
        }
        same_bytes(&r, "applied")?;
        let restored = Replica::restore(r.snapshot()).expect("restore");
        same_bytes(&restored, "restored")?;
        r.expire(NOW - cut_hours * HOUR);
        same_bytes(&r, "expired")?;
        let keep = keep_hours * HOUR;
        let retention = Retention { tiers: [Some(keep), Some(keep + HOUR), Some(keep + 2 * HOUR)] };
        r.prune_tiers(NOW, &retention);
        same_bytes(&r, "pruned")?;
        let back = Replica::restore(r.snapshot()).expect("restore");
        same_bytes(&back, "pruned and restored")?;
    }
}
