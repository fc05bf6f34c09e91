//! Draining a shard group (`Snapshot::merge_disjoint`): the merge of two replicas' snapshots
//! over disjoint sets of batches is the snapshot of one replica that applied them all — same
//! totals in every tier and dimension, same seen-sets, same state hash — whatever the split;
//! it records the drained group, and refuses to count a batch or a group twice.

mod common;

use common::{batches, entry};
use edgetally_core::Replica;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn merging_disjoint_states_equals_applying_every_batch(
        spec in proptest::collection::vec(
            (0u8..4, 0u8..2, proptest::collection::vec(
                (0u8..3, proptest::option::of(0u8..4), 0i64..7_200_000, -1000i32..1000), 1..6)),
            1..30),
        sides in proptest::collection::vec(any::<bool>(), 30),
    ) {
        let all = batches(&spec);
        let (mut a, mut b, mut whole) = (Replica::new(), Replica::new(), Replica::new());
        for (i, batch) in all.iter().enumerate() {
            whole.apply(entry(batch)).expect("apply");
            if sides[i] { a.apply(entry(batch)) } else { b.apply(entry(batch)) }.expect("apply");
        }
        let merged = a.snapshot().merge_disjoint(b.snapshot(), "drained").expect("disjoint");
        prop_assert_eq!(&merged.absorbed, &vec!["drained".to_string()]);
        let restored = Replica::restore(merged.clone()).expect("restore");
        prop_assert_eq!(restored.state_hash(), whole.state_hash());
        let mut want = whole.snapshot();
        want.absorbed = vec!["drained".into()];
        prop_assert_eq!(restored.snapshot(), want);
        // Absorbing the same group again, or the same batches again, is refused.
        prop_assert!(merged.clone().merge_disjoint(Replica::new().snapshot(), "drained").is_err());
        if !all.is_empty() {
            prop_assert!(whole.snapshot().merge_disjoint(whole.snapshot(), "again").is_err());
        }
    }
}

#[test]
fn a_format_4_snapshot_still_restores_with_nothing_absorbed() {
    let mut r = Replica::new();
    for b in batches(&[
        (0, 0, vec![(0, Some(1), 5, 3)]),
        (1, 0, vec![(1, None, 9, -2)]),
    ]) {
        r.apply(entry(&b)).expect("apply");
    }
    let snap = r.snapshot();
    // Format 4 is format 6 without the trailing list of absorbed groups (format 5 on), the
    // sketches and their horizons (format 6 on).
    let mut v4 = snap.encode();
    let tail = postcard::to_allocvec(&(&snap.absorbed, &snap.sketches, snap.sketch_horizons))
        .expect("tail");
    assert_eq!(
        tail[0], 0,
        "no group absorbed: an empty list is one zero byte"
    );
    assert!(v4.ends_with(&tail), "format 6 ends with these three fields");
    v4.truncate(v4.len() - tail.len());
    v4[0] = 4;
    let back = edgetally_core::Snapshot::decode(&v4).expect("format 4 decodes");
    assert_eq!(back, snap);
}
