//! Query answers against the naive model, through every tier and after retention pruning.

use edgetally_core::query::{GroupBy, TopBy};
use edgetally_core::{BatchId, Replica, Retention};
use edgetally_tests::{build, entry, events, key, same, Model, Rng, NOW};
use std::collections::BTreeMap;

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

/// Top-k by producer against one naive model per producer, over random windows, after
/// retention pruning, and across a snapshot round trip (the rollups are stored per bucket in
/// memory and per (category, producer) in the snapshot).
#[test]
fn top_producers_match_a_model_per_producer() {
    let mut rng = Rng::new(9);
    let mut r = Replica::new();
    r.set_string_hash_keys(1, 2);
    let mut models: Vec<Model> = (0..7).map(|_| Model::default()).collect();
    for seq in 0..140u64 {
        let p = (seq * 5 + seq / 3) % 7;
        let ev = events(&mut rng, 30, 4 * 86_400_000);
        ev.iter().for_each(|e| models[p as usize].add(e));
        r.apply(entry(build(
            BatchId {
                producer: key(p),
                epoch: 1,
                seq,
            },
            &ev,
        )))
        .expect("apply");
    }
    let check = |r: &Replica, rng: &mut Rng, what: &str| {
        for _ in 0..150 {
            let a = NOW - rng.below(5 * 86_400_000) as i64;
            let b = a + rng.below(3 * 86_400_000) as i64;
            for cat in ["cpu", "temp", "purchase"] {
                let top = r.topk(cat, a, b, 100, TopBy::Producer);
                let mut want: Vec<(String, u64)> = (0..7u64)
                    .filter_map(|p| {
                        let t = models[p as usize]
                            .total(|c, _, t| c == cat && top.start <= t && t < top.end)?;
                        Some((key(p).to_hex(), t.count))
                    })
                    .collect();
                want.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
                let got: Vec<(String, u64)> = top
                    .rows
                    .iter()
                    .map(|(n, t)| (n.clone().unwrap_or_default(), t.count))
                    .collect();
                assert_eq!(got, want, "{what}: {cat} {a}..{b}");
                for (name, t) in &top.rows {
                    let p = (0..7u64)
                        .find(|&p| Some(key(p).to_hex()) == *name)
                        .expect("a known producer");
                    let truth = models[p as usize]
                        .total(|c, _, t| c == cat && top.start <= t && t < top.end);
                    assert!(same(t, truth), "{what}: {cat} producer {p} {a}..{b}");
                }
            }
        }
    };
    check(&r, &mut rng, "fresh");
    let back =
        Replica::restore(edgetally_core::Snapshot::decode(&r.snapshot().encode()).expect("decode"))
            .expect("restore");
    assert_eq!(back.snapshot(), r.snapshot(), "the snapshot is canonical");
    assert_eq!(back.series_count(), r.series_count());
    assert_eq!(back.entry_count(), back.entry_count_exact());
    check(&back, &mut rng, "restored");
    let ret = Retention {
        tiers: [Some(86_400_000), Some(2 * 86_400_000), None],
    };
    assert!(r.prune_tiers(NOW, &ret) > 0);
    assert_eq!(r.entry_count(), r.entry_count_exact());
    check(&r, &mut rng, "pruned");
}

/// Ephemeral producers (30 fresh keys a day, one batch each, for ten days) under retention:
/// once retention has dropped a producer's last rollup entry its key leaves the index and its
/// id is handed to a later producer, so the keys held follow the producers retention still
/// has data of; top-k by producer over the retained days still equals a model per producer
/// (a reused id never mixes two producers), and the snapshot stays canonical.
#[test]
fn producer_ids_are_reclaimed_after_retention_and_reused_without_mixing() {
    const DAY: i64 = 86_400_000;
    let mut rng = Rng::new(21);
    let mut r = Replica::new();
    r.set_string_hash_keys(3, 4);
    let ret = Retention {
        tiers: [Some(DAY / 2), Some(DAY), Some(2 * DAY)],
    };
    // (day, producer number) → its model.
    let mut models: BTreeMap<(i64, u64), Model> = BTreeMap::new();
    for day in 0..10i64 {
        let base = NOW + day * DAY;
        for i in 0..30u64 {
            let p = day as u64 * 1000 + i;
            let ev = edgetally_tests::events_at(&mut rng, 5, DAY / 2, base + DAY / 2);
            let m = models.entry((day, p)).or_default();
            ev.iter().for_each(|e| m.add(e));
            r.apply(entry(edgetally_tests::build_at(
                BatchId {
                    producer: key(p),
                    epoch: 1,
                    seq: 0,
                },
                &ev,
                base + DAY / 2,
            )))
            .expect("apply");
        }
        let now = base + DAY;
        r.prune_tiers(now, &ret);
        assert_eq!(r.entry_count(), r.entry_count_exact());
        // The hour tier keeps two days (cut at a day boundary): at most three days' producers.
        assert!(
            r.producers_held() <= 90,
            "day {day}: {} producer keys held",
            r.producers_held()
        );
        // Top-k by producer over the last day equals the models of that day's producers.
        let (a, b) = (base, now);
        for cat in ["cpu", "temp", "purchase", "page_view"] {
            let top = r.topk(cat, a, b, 1000, TopBy::Producer);
            let mut want: Vec<(String, u64)> = models
                .iter()
                .filter_map(|((_, p), m)| {
                    let t = m.total(|c, _, t| c == cat && top.start <= t && t < top.end)?;
                    Some((key(*p).to_hex(), t.count))
                })
                .collect();
            want.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
            let got: Vec<(String, u64)> = top
                .rows
                .iter()
                .map(|(n, t)| (n.clone().unwrap_or_default(), t.count))
                .collect();
            assert_eq!(got, want, "day {day}: {cat}");
        }
        let snap = r.snapshot();
        assert_eq!(snap.producers.len(), r.producers_held());
        let back = Replica::restore(snap.clone()).expect("restore");
        assert_eq!(
            back.snapshot(),
            snap,
            "day {day}: the snapshot is canonical"
        );
        assert_eq!(back.state_hash(), r.state_hash());
    }
    assert!(r.producers_held() < 100, "{}", r.producers_held());
}
