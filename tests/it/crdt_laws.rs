//! Merging replica states is commutative, associative and idempotent.

use edgetally_core::{BatchId, Replica};
use edgetally_tests::{build, entry, events, key, Rng};
use proptest::prelude::*;

fn replica_from(pool: &[edgetally_core::LogEntry], mask: u64) -> Replica {
    let mut r = Replica::new();
    // Apply in an order that depends on the mask too, to vary arrival order.
    let mut idx: Vec<usize> = (0..pool.len()).filter(|i| mask >> i & 1 == 1).collect();
    idx.sort_by_key(|i| (i * 7 + mask as usize) % 13);
    for i in idx {
        r.apply(pool[i].clone()).expect("apply");
    }
    r
}

fn bytes(r: &Replica) -> Vec<u8> {
    postcard::to_allocvec(&r.snapshot()).expect("encode")
}

fn merged(a: &Replica, b: &Replica) -> Replica {
    let mut out = Replica::new();
    out.merge_from(a).expect("merge");
    out.merge_from(b).expect("merge");
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn merge_laws(seed: u64, ma: u64, mb: u64, mc: u64) {
        let mut rng = Rng::new(seed);
        let pool: Vec<_> = (0..12u64)
            .map(|i| {
                let n = 1 + rng.below(6) as usize;
                let ev = events(&mut rng, n, 3 * 3_600_000);
                entry(build(BatchId { producer: key(i % 3), epoch: i % 2, seq: i }, &ev))
            })
            .collect();
        let (a, b, c) = (replica_from(&pool, ma), replica_from(&pool, mb), replica_from(&pool, mc));
        // Commutative.
        prop_assert_eq!(bytes(&merged(&a, &b)), bytes(&merged(&b, &a)));
        // Associative.
        prop_assert_eq!(bytes(&merged(&merged(&a, &b), &c)), bytes(&merged(&a, &merged(&b, &c))));
        // Idempotent.
        let mut aa = replica_from(&pool, ma);
        prop_assert_eq!(aa.merge_from(&a).expect("merge"), 0);
        prop_assert_eq!(bytes(&aa), bytes(&a));
        // And merging is the same as applying the union in any order.
        prop_assert_eq!(bytes(&merged(&a, &b)), bytes(&replica_from(&pool, ma | mb)));
    }
}

#[test]
fn snapshot_restore_round_trips() {
    let mut rng = Rng::new(1);
    let mut r = Replica::new();
    for i in 0..20 {
        let ev = events(&mut rng, 10, 3_600_000);
        r.apply(entry(build(
            BatchId {
                producer: key(i % 4),
                epoch: 0,
                seq: i / 4,
            },
            &ev,
        )))
        .expect("apply");
    }
    let snap = r.snapshot();
    let wire = postcard::to_allocvec(&snap).expect("encode");
    let back: edgetally_core::Snapshot = postcard::from_bytes(&wire).expect("decode");
    let restored = Replica::restore(back).expect("restore");
    assert_eq!(bytes(&restored), wire);
    assert_eq!(restored.digest(), r.digest());
}
