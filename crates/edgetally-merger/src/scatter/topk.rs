//! The cluster's exact top-k by count without gathering every row: a threshold algorithm
//! in at most three rounds (after TPUT, Cao and Wang, PODC 2004), pure. Counts are never
//! negative and a row's count is the sum of its groups' counts, which is all it needs.
//!
//! 1. Every group sends its own top `k`, and the highest count among the rows it left out
//!    (its *bound*: no row it did not send counts more there; 0 when it sent every row).
//!    With a single group that is the answer.
//! 2. τ₁ is the `k`-th highest sum of the counts known so far. Every group not exhausted
//!    sends each row counting at least T = ⌈τ₁ / m⌉ (m such groups), and its bound falls to
//!    the highest count it left out this time (below T).
//! 3. A row's lower bound is the sum of its known counts, its upper bound that plus the bound
//!    of every group that did not send it; τ₂ is the `k`-th highest lower bound. The
//!    candidates are the rows whose upper bound reaches τ₂: every group is asked for the
//!    candidates it did not send, and the candidates, now exact, are ranked.
//!
//! Why it is exact: a row of the true top `k` counts at least the `k`-th true count, which is
//! at least τ₂ (lower bounds never exceed true counts), so its upper bound reaches τ₂. A row
//! never sent counts at most m·(T − 1) < τ₁ ≤ τ₂ in all. Ties are ranked by name among the
//! candidates, all of whose counts are exact.
//!
//! A group that fails a round leaves the answer partial, as a group that does not answer a
//! gathered query does: what it sent before still counts, once.

use super::{GroupAnswer, Part, Query};
use edgetally_core::Total;
use std::collections::BTreeMap;

/// The query of a `/v1/topk` by count, for its rounds.
#[derive(Clone, Debug)]
pub struct TopKAsk {
    /// Category.
    pub category: String,
    /// Window start, ms.
    pub start: i64,
    /// Window end, ms (exclusive).
    pub end: i64,
    /// By producer (else by entity).
    pub by_producer: bool,
}

impl TopKAsk {
    /// One round's query: a group's top `k`, its rows counting at least `min_count`, and the
    /// rows `names`.
    pub fn round(&self, k: usize, min_count: Option<u64>, names: Vec<String>) -> Query {
        Query::TopKRound {
            category: self.category.clone(),
            start: self.start,
            end: self.end,
            by_producer: self.by_producer,
            k: u32::try_from(k).unwrap_or(u32::MAX),
            min_count,
            names,
        }
    }
}

/// What one group has sent.
#[derive(Debug, Default)]
struct Sent {
    /// Sorted by name.
    rows: Vec<(Option<String>, Total)>,
    /// The most a row it did not send may count there.
    bound: u64,
    /// Whether it failed a round (the answer is then partial).
    failed: bool,
}

/// The state of one top-k across the rounds.
#[derive(Debug)]
pub struct TopKRounds {
    k: usize,
    groups: BTreeMap<String, Sent>,
    /// Each group's place in the answer, as the first round found it.
    answers: Vec<GroupAnswer>,
    window: (i64, i64),
    complete: bool,
    candidates: Vec<String>,
    /// A later round's part named as absorbed a group whose own rows the first round took:
    /// its batches would count twice, so the rounds' answer must not be used.
    absorbed_since: bool,
}

/// A round's part: its window, its rows (named rows only: top-k rows always have a name),
/// and the highest count of a row it left out (if it says).
type RoundRows = ((i64, i64), Vec<(Option<String>, Total)>, Option<u64>);

impl Sent {
    /// Whether it sent the row `name`.
    fn has(&self, name: &str) -> bool {
        self.rows
            .binary_search_by(|(n, _)| n.as_deref().cmp(&Some(name)))
            .is_ok()
    }

    /// Adds a round's rows (sorted by name; a row sent again is taken as sent last).
    fn add(&mut self, rows: Vec<(Option<String>, Total)>) {
        self.rows = super::merge_rows(std::mem::take(&mut self.rows), rows, |t, u| *t = u);
    }
}

fn rows_of(p: Part) -> RoundRows {
    let left_out = match &p.answer {
        super::Answer::TopRows { left_out, .. } => Some(*left_out),
        _ => None,
    };
    let r = p.answer.into_rows();
    let mut rows = r.rows;
    rows.retain(|(n, _)| n.is_some());
    ((r.start, r.end), rows, left_out)
}

impl TopKRounds {
    /// Takes the first round's parts (this node's first): every group's top `k`. A drained
    /// group whose state an answering heir absorbed is left out, as [`super::combine`] does.
    pub fn first(k: usize, mut parts: Vec<(GroupAnswer, Option<Part>)>) -> TopKRounds {
        super::mark_absorbed(&mut parts);
        let mut me = TopKRounds {
            k,
            groups: BTreeMap::new(),
            answers: Vec::with_capacity(parts.len()),
            window: (0, 0),
            complete: true,
            candidates: Vec::new(),
            absorbed_since: false,
        };
        let mut first_window = None;
        for (g, p) in parts {
            if g.absorbed_by.is_none() {
                me.complete &= g.answered && g.complete;
                let mut sent = Sent::default();
                match p {
                    Some(p) => {
                        let (window, rows, left_out) = rows_of(p);
                        first_window.get_or_insert(window);
                        sent.bound = match left_out {
                            Some(l) => l,
                            None if rows.len() >= k => {
                                rows.iter().map(|r| r.1.count).min().unwrap_or(0)
                            }
                            None => 0,
                        };
                        sent.add(rows);
                    }
                    None => sent.failed = true,
                }
                me.groups.insert(g.name.clone(), sent);
            }
            me.answers.push(g);
        }
        me.window = first_window.unwrap_or((0, 0));
        me
    }

    /// The groups still to hear from (not exhausted, not failed).
    fn open(&self) -> impl Iterator<Item = (&String, &Sent)> {
        self.groups.iter().filter(|(_, s)| s.bound > 0 && !s.failed)
    }

    /// Per row sent so far: (lower bound, upper bound).
    fn bounds(&self) -> BTreeMap<&str, (u64, u64)> {
        let mut b: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for s in self.groups.values() {
            for (name, t) in &s.rows {
                let e = b.entry(name.as_deref().unwrap_or_default()).or_default();
                e.0 = e.0.saturating_add(t.count);
            }
        }
        for (name, (lower, upper)) in b.iter_mut() {
            *upper = *lower;
            for s in self.groups.values() {
                if !s.has(name) {
                    *upper = upper.saturating_add(s.bound);
                }
            }
        }
        b
    }

    /// The `k`-th highest of `values` (0 if there are fewer).
    fn kth(&self, values: impl Iterator<Item = u64>) -> u64 {
        let mut v: Vec<u64> = values.collect();
        if v.len() < self.k || self.k == 0 {
            return 0;
        }
        let i = self.k - 1;
        *v.select_nth_unstable_by(i, |a, b| b.cmp(a)).1
    }

    /// The second round's threshold T and the groups to ask, or `None` if no group has
    /// more to tell (one group, or every group exhausted).
    pub fn second(&self) -> Option<(u64, Vec<String>)> {
        let open: Vec<String> = self.open().map(|(g, _)| g.clone()).collect();
        if self.groups.len() <= 1 || open.is_empty() {
            return None;
        }
        let tau = self.kth(self.bounds().values().map(|b| b.0));
        let t = tau.div_ceil(open.len() as u64).max(1);
        Some((t, open))
    }

    /// Notes a later round's parts that name as absorbed a group the first round counted.
    fn check_absorbed(&mut self, parts: &[(GroupAnswer, Option<Part>)]) {
        let absorbed = parts.iter().filter_map(|(_, p)| p.as_ref());
        let absorbed = absorbed.flat_map(|p| &p.absorbed);
        self.absorbed_since |= absorbed.into_iter().any(|g| self.groups.contains_key(g));
    }

    /// Whether a group the first round counted was absorbed by its heir since (a drain
    /// completing between rounds): the rounds' rows would count its batches twice, and the
    /// top-k must be asked again in one gather instead.
    pub fn absorbed_since(&self) -> bool {
        self.absorbed_since
    }

    /// Takes the second round's parts (rows counting at least `t`).
    pub fn take_second(&mut self, t: u64, parts: Vec<(GroupAnswer, Option<Part>)>) {
        self.check_absorbed(&parts);
        for (g, p) in parts {
            let Some(s) = self.groups.get_mut(&g.name) else {
                continue;
            };
            match p {
                Some(p) => {
                    let (_, rows, left_out) = rows_of(p);
                    s.add(rows);
                    s.bound = s.bound.min(t - 1).min(left_out.unwrap_or(u64::MAX));
                }
                None => s.failed = true,
            }
        }
    }

    /// The candidates, and per group the candidates it has not sent (only groups with some).
    pub fn third(&mut self) -> Vec<(String, Vec<String>)> {
        if self.open().next().is_none() {
            // Every group sent every row it may hold: the sums are exact.
            return Vec::new();
        }
        let bounds = self.bounds();
        let tau = self.kth(bounds.values().map(|b| b.0));
        self.candidates = bounds
            .into_iter()
            .filter(|(_, (_, upper))| *upper >= tau)
            .map(|(n, _)| n.to_string())
            .collect();
        self.open()
            .map(|(g, s)| {
                let missing = self
                    .candidates
                    .iter()
                    .filter(|n| !s.has(n))
                    .cloned()
                    .collect::<Vec<_>>();
                (g.clone(), missing)
            })
            .filter(|(_, m)| !m.is_empty())
            .collect()
    }

    /// Takes the third round's parts (the candidates each group had not sent; one it does
    /// not send counts nothing there).
    pub fn take_third(&mut self, parts: Vec<(GroupAnswer, Option<Part>)>) {
        self.check_absorbed(&parts);
        for (g, p) in parts {
            let Some(s) = self.groups.get_mut(&g.name) else {
                continue;
            };
            match p {
                Some(p) => s.add(rows_of(p).1),
                None => s.failed = true,
            }
        }
    }

    /// The ranked top `k` (the candidates' totals summed over the groups; every row sent if
    /// there was no third round), whether the answer is complete, and each group's place.
    pub fn finish(mut self) -> (edgetally_core::Rows, bool, Vec<GroupAnswer>) {
        let mut totals = Vec::new();
        for s in self.groups.values_mut() {
            let rows = std::mem::take(&mut s.rows);
            totals = super::merge_rows(totals, rows, |t, u| t.merge(&u));
        }
        if !self.candidates.is_empty() {
            totals.retain(|(n, _)| {
                let n = n.as_deref().unwrap_or_default();
                self.candidates
                    .binary_search_by(|c| c.as_str().cmp(n))
                    .is_ok()
            });
        }
        let mut rows = edgetally_core::Rows {
            start: self.window.0,
            end: self.window.1,
            rows: totals,
        };
        rows.rank(self.k);
        let failed: Vec<&String> = self
            .groups
            .iter()
            .filter(|(_, s)| s.failed)
            .map(|(g, _)| g)
            .collect();
        for a in &mut self.answers {
            if failed.contains(&&a.name) && a.answered {
                a.answered = false;
                a.error = Some("failed a later round of the top-k".into());
            }
        }
        let complete = self.complete && failed.is_empty();
        (rows, complete, self.answers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scatter::Answer;

    /// A group's rows (name → count) answering one round's query, as a replica's
    /// `top_select` does: its top `k` by (count descending, name), the rows counting at
    /// least `min_count`, and the rows named.
    fn answer(rows: &BTreeMap<String, u64>, q: &Query) -> Part {
        let Query::TopKRound {
            k,
            min_count,
            names,
            ..
        } = q
        else {
            panic!("a round's query");
        };
        let mut ranked: Vec<(&String, &u64)> = rows.iter().filter(|r| *r.1 > 0).collect();
        ranked.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        let (picked, left): (Vec<_>, Vec<_>) =
            ranked.iter().enumerate().partition(|(i, (n, c))| {
                *i < *k as usize || min_count.is_some_and(|m| **c >= m) || names.contains(n)
            });
        let picked: BTreeMap<&String, u64> =
            picked.into_iter().map(|(_, (n, c))| (*n, **c)).collect();
        Part {
            answer: Answer::TopRows {
                start: 0,
                end: 10,
                rows: picked
                    .into_iter()
                    .map(|(n, c)| (Some(n.clone()), total(c)))
                    .collect(),
                left_out: left.iter().map(|(_, (_, c))| **c).max().unwrap_or(0),
            },
            complete: true,
            as_of_ms: 0,
            absorbed: Vec::new(),
        }
    }

    fn total(count: u64) -> Total {
        let mut t = Total::EMPTY;
        t.count = count;
        t
    }

    fn place(name: &str) -> GroupAnswer {
        GroupAnswer {
            name: name.into(),
            answered: true,
            complete: true,
            as_of_ms: Some(0),
            absorbed_by: None,
            error: None,
        }
    }

    /// Every group asked a round's query answers it (`down` fails the rounds from `fail_at`).
    fn parts(
        groups: &[BTreeMap<String, u64>],
        ask: impl Fn(&str) -> Option<Query>,
        down: Option<usize>,
    ) -> Vec<(GroupAnswer, Option<Part>)> {
        groups
            .iter()
            .enumerate()
            .filter_map(|(i, rows)| {
                let name = format!("g{i}");
                let q = ask(&name)?;
                Some(match down == Some(i) {
                    true => (
                        GroupAnswer {
                            answered: false,
                            ..place(&name)
                        },
                        None,
                    ),
                    false => (place(&name), Some(answer(rows, &q))),
                })
            })
            .collect()
    }

    /// Three groups of 50 overlapping rows with many ties.
    fn three_groups() -> Vec<BTreeMap<String, u64>> {
        (0..3u64)
            .map(|g| {
                (0..50u64)
                    .map(|i| (format!("e{i}"), (i * 31 + g) % 17))
                    .collect()
            })
            .collect()
    }

    fn ask() -> TopKAsk {
        TopKAsk {
            category: "c".into(),
            start: 0,
            end: 10,
            by_producer: false,
        }
    }

    /// The second round's parts: the `open` groups asked for rows counting at least `t`.
    fn second_round(
        groups: &[BTreeMap<String, u64>],
        a: &TopKAsk,
        t: u64,
        open: &[String],
        down: Option<usize>,
    ) -> Vec<(GroupAnswer, Option<Part>)> {
        parts(
            groups,
            |g| {
                open.iter()
                    .any(|o| o == g)
                    .then(|| a.round(0, Some(t), Vec::new()))
            },
            down,
        )
    }

    /// The rounds' answer, and how many rows crossed between groups.
    fn run(groups: &[BTreeMap<String, u64>], k: usize) -> (Vec<(String, u64)>, usize, bool) {
        let a = ask();
        let mut moved = 0;
        let mut count = |p: &Vec<(GroupAnswer, Option<Part>)>| {
            for (_, part) in p.iter() {
                if let Some(Part {
                    answer: Answer::TopRows { rows, .. },
                    ..
                }) = part
                {
                    moved += rows.len();
                }
            }
        };
        let first = parts(groups, |_| Some(a.round(k, None, Vec::new())), None);
        count(&first);
        let mut r = TopKRounds::first(k, first);
        if let Some((t, open)) = r.second() {
            let second = second_round(groups, &a, t, &open, None);
            count(&second);
            r.take_second(t, second);
            let asks = r.third();
            let third = parts(
                groups,
                |g| {
                    asks.iter()
                        .find(|(o, _)| o == g)
                        .map(|(_, n)| a.round(0, None, n.clone()))
                },
                None,
            );
            count(&third);
            r.take_third(third);
        }
        let (rows, complete, _) = r.finish();
        let got = rows
            .rows
            .into_iter()
            .map(|(n, t)| (n.unwrap_or_default(), t.count))
            .collect();
        (got, moved, complete)
    }

    /// The top `k` of the groups' summed rows, computed directly.
    fn model(groups: &[BTreeMap<String, u64>], k: usize) -> Vec<(String, u64)> {
        let mut sum: BTreeMap<String, u64> = BTreeMap::new();
        for g in groups {
            for (n, c) in g {
                *sum.entry(n.clone()).or_default() += c;
            }
        }
        let mut v: Vec<(String, u64)> = sum.into_iter().filter(|r| r.1 > 0).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(k);
        v
    }

    /// Random groups of overlapping rows (many ties, many zeros, skewed counts), each
    /// ranked by the rounds and directly: always the same top k.
    #[test]
    fn the_rounds_give_the_exact_top_k() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for case in 0..4000 {
            let m = 1 + next(5) as usize;
            let names = 1 + next(40);
            let skew = next(3);
            let groups: Vec<BTreeMap<String, u64>> = (0..m)
                .map(|_| {
                    (0..next(60))
                        .map(|_| {
                            let n = format!("e{}", next(names));
                            let c = match skew {
                                0 => next(4),
                                1 => next(1000),
                                _ => 1 << next(12),
                            };
                            (n, c)
                        })
                        .collect()
                })
                .collect();
            let k = 1 + next(12) as usize;
            let (got, _, complete) = run(&groups, k);
            assert!(complete);
            assert_eq!(
                got,
                model(&groups, k),
                "case {case}: k {k}, groups {groups:?}"
            );
        }
    }

    /// Skewed counts over many rows: the rounds move a small share of the rows.
    #[test]
    fn the_rounds_move_few_rows_when_counts_are_skewed() {
        let groups: Vec<BTreeMap<String, u64>> = (0..4u64)
            .map(|g| {
                (0..5_000u64)
                    .map(|i| (format!("e{i:05}"), 100_000 / (1 + (i * 7 + g * 13) % 5_000)))
                    .collect()
            })
            .collect();
        let (got, moved, _) = run(&groups, 10);
        assert_eq!(got, model(&groups, 10));
        assert!(moved < 2_000, "{moved} of 20,000 rows moved");
    }

    /// A drain completing between rounds (a later part names as absorbed a group the first
    /// round counted) is reported, so the rounds' sums are not used; one named absorbed from
    /// the first round on is simply left out.
    #[test]
    fn a_group_absorbed_between_rounds_is_reported() {
        let (groups, a) = (three_groups(), ask());
        let first = parts(&groups, |_| Some(a.round(3, None, Vec::new())), None);
        let mut r = TopKRounds::first(3, first);
        assert!(!r.absorbed_since());
        let (t, open) = r.second().expect("a second round");
        let mut second = second_round(&groups, &a, t, &open, None);
        // g0 has absorbed g1 by the time it answers the second round.
        if let Some(p) = second[0].1.as_mut() {
            p.absorbed = vec!["g1".into()];
        }
        r.take_second(t, second);
        assert!(r.absorbed_since());

        // Absorbed already in the first round: left out, nothing to report.
        let mut first = parts(&groups, |_| Some(a.round(3, None, Vec::new())), None);
        if let Some(p) = first[0].1.as_mut() {
            p.absorbed = vec!["g1".into()];
        }
        let mut r = TopKRounds::first(3, first);
        if let Some((t, open)) = r.second() {
            let mut second = second_round(&groups, &a, t, &open, None);
            if let Some(p) = second[0].1.as_mut() {
                p.absorbed = vec!["g1".into()];
            }
            r.take_second(t, second);
        }
        assert!(!r.absorbed_since());
        let (_, _, places) = r.finish();
        assert_eq!(
            places
                .iter()
                .find(|p| p.name == "g1")
                .and_then(|p| p.absorbed_by.clone()),
            Some("g0".into())
        );
    }

    /// A group that fails a later round leaves the answer partial, never counted twice.
    #[test]
    fn a_group_failing_a_round_makes_the_answer_partial() {
        let (groups, a) = (three_groups(), ask());
        let first = parts(&groups, |_| Some(a.round(3, None, Vec::new())), None);
        let mut r = TopKRounds::first(3, first);
        let (t, open) = r.second().expect("a second round");
        let second = second_round(&groups, &a, t, &open, Some(1));
        r.take_second(t, second);
        let _ = r.third();
        let (rows, complete, places) = r.finish();
        assert!(!complete);
        assert!(places.iter().any(|p| p.name == "g1" && !p.answered));
        let all = model(&groups, usize::MAX);
        for (n, t) in rows.rows {
            let n = n.expect("named");
            let full = all.iter().find(|r| r.0 == n).map_or(0, |r| r.1);
            assert!(t.count <= full, "{n}: {} > {full}", t.count);
        }
    }
}
