//! Query answers against the naive model, through every tier and after retention pruning.

use edgetally_core::query::{GroupBy, TopBy};
use edgetally_core::{BatchId, Replica, Retention};
use edgetally_tests::{build, entry, events, key, same, Model, Rng, NOW};

#[test]
fn queries_match_the_model_over_many_windows() {
    let mut rng = Rng::new(42);
    let mut r = Replica::new();
    let mut m = Model::default();
    for seq in 0..200 {
        let ev = events(&mut rng, 50, 5 * 86_400_000);
        ev.iter().for_each(|e| m.add(e));
        r.apply(entry(build(
            BatchId {
                producer: key(seq % 5),
                epoch: 1,
                seq: seq / 5,
            },
            &ev,
        )))
        .expect("apply");
    }
    super::convergence::check_against_model(&r, &m).expect("model");
    // Random windows: the answer covers exactly the seconds in the reported window.
    for _ in 0..300 {
        let a = NOW - rng.below(6 * 86_400_000) as i64;
        let b = a + rng.below(3 * 86_400_000) as i64;
        for cat in ["cpu", "temp"] {
            let got = r.aggregate(cat, None, a, b);
            assert_eq!(got.start, (a + 999).div_euclid(1000) * 1000);
            let want = m.total(|c, _, t| c == cat && got.start <= t && t < got.end);
            assert!(same(&got.total, want), "{cat} {a}..{b}");
            let got = r.aggregate(cat, Some("dev-1"), a, b);
            let want =
                m.total(|c, e, t| c == cat && e == Some("dev-1") && got.start <= t && t < got.end);
            assert!(same(&got.total, want), "{cat}/dev-1 {a}..{b}");
        }
    }
    // Series steps add up to the whole.
    let h0 = NOW.div_euclid(3_600_000) * 3_600_000;
    let s = r.series("cpu", None, h0 - 86_400_000, h0, 3_600_000, 1000);
    assert_eq!(s.len(), 24);
    let sum: u64 = s.iter().map(|a| a.total.count).sum();
    assert_eq!(
        Some(sum),
        m.total(|c, _, t| c == "cpu" && s[0].start <= t && t < s[23].end)
            .map(|t| t.count)
    );
    // Top producers: 5 producers, counts from the model are not per producer, but the total is.
    let top = r.topk("cpu", NOW - 86_400_000 * 6, NOW + 1, 10, TopBy::Producer);
    assert_eq!(top.rows.len(), 5);
    let total: u64 = top.rows.iter().map(|r| r.1.count).sum();
    assert_eq!(
        Some(total),
        m.total(|c, _, t| c == "cpu" && top.start <= t && t < top.end)
            .map(|t| t.count)
    );
    assert!(top.rows.windows(2).all(|w| w[0].1.count >= w[1].1.count));
    let by_cat = r.totals(NOW - 86_400_000 * 6, NOW + 1, GroupBy::Category);
    assert_eq!(by_cat.rows.len(), 4);

    // Retention: seconds kept one day, minutes two. Old windows widen to coarser tiers and
    // stay exact for the window they report.
    let ret = Retention {
        tiers: [Some(86_400_000), Some(2 * 86_400_000), None],
    };
    assert!(r.prune_tiers(NOW, &ret) > 0);
    for _ in 0..300 {
        let a = NOW - rng.below(6 * 86_400_000) as i64;
        let b = a + rng.below(86_400_000) as i64;
        let got = r.aggregate("purchase", None, a, b);
        assert!(got.start <= a.max(got.start) && got.end >= b.min(got.end));
        let want = m.total(|c, _, t| c == "purchase" && got.start <= t && t < got.end);
        assert!(
            same(&got.total, want),
            "after pruning {a}..{b} -> {}..{}",
            got.start,
            got.end
        );
    }
}
