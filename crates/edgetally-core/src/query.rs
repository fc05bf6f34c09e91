//! Query evaluation over the tiers (SPEC §6).
//!
//! Every summary counts at its bucket's start time, so a window `[start, end)` covers exactly
//! the buckets whose start lies in it. A query is answered from the coarsest tier that fits:
//! whole hours from the hour tier, whole minutes at the edges from the minute tier, seconds at
//! the very edges. Where a finer tier has been pruned by retention, the window widens to the
//! coarser tier's alignment, and the answer reports the window it actually covered.

use crate::replica::{Dim, Replica, TIER_MS};
use crate::summary::Total;

/// The half-open window a query actually covered, and the pieces it read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Covered window start (ms, inclusive).
    pub start: i64,
    /// Covered window end (ms, exclusive).
    pub end: i64,
    /// (tier, from, to): read tier entries with start in `[from, to)`.
    pub pieces: Vec<(usize, i64, i64)>,
}

fn floor_to(x: i64, r: i64) -> i64 {
    x.div_euclid(r) * r
}

/// The windows `[s, s + step_ms)` of a series from `start` (aligned down to the step) to
/// `end`; none if the step is not positive, the range empty or there would be over
/// `max_points`.
pub(crate) fn steps(
    start: i64,
    end: i64,
    step_ms: i64,
    max_points: usize,
) -> impl Iterator<Item = (i64, i64)> {
    let (first, n) = if step_ms <= 0 || end <= start {
        (0, 0)
    } else {
        let first = floor_to(start, step_ms);
        let n = ((end - first) as i128 + step_ms as i128 - 1) / step_ms as i128;
        (
            first,
            if n as u128 > max_points as u128 {
                0
            } else {
                n as i64
            },
        )
    };
    (0..n).map(move |i| {
        let s = first + i * step_ms;
        (s, s.saturating_add(step_ms))
    })
}

fn ceil_to(x: i64, r: i64) -> i64 {
    floor_to(x.saturating_add(r - 1), r)
}

/// Plans reading `[start, end)` given tier horizons (`horizons[t]`: tier `t` holds nothing
/// before it) and the finest tier the series keeps.
pub fn plan(start: i64, end: i64, horizons: [i64; 3], first_tier: usize) -> Plan {
    let [s_ms, m_ms, h_ms] = TIER_MS;
    let finest_ok = |t: usize, at: i64| t >= first_tier && at >= horizons[t];
    // Left edge: the finest tier that still holds data at that time.
    let mut a = ceil_to(start, s_ms);
    if !finest_ok(0, a) {
        a = if finest_ok(1, floor_to(a, m_ms)) {
            floor_to(a, m_ms)
        } else {
            floor_to(a, h_ms)
        };
    }
    let mut b = ceil_to(end, s_ms).max(a);
    if b % m_ms != 0 && !finest_ok(0, floor_to(b, m_ms)) {
        b = ceil_to(b, m_ms);
    }
    if b % h_ms != 0 && !finest_ok(1, floor_to(b, h_ms)) {
        b = ceil_to(b, h_ms);
    }
    let mut pieces = Vec::new();
    let (m1, m2) = (ceil_to(a, m_ms), floor_to(b, m_ms));
    if m1 >= m2 {
        if a < b {
            pieces.push((0, a, b));
        }
    } else {
        let (h1, h2) = (ceil_to(a, h_ms), floor_to(b, h_ms));
        if a < m1 {
            pieces.push((0, a, m1));
        }
        if h1 < h2 {
            if m1 < h1 {
                pieces.push((1, m1, h1));
            }
            pieces.push((2, h1, h2));
            if h2 < m2 {
                pieces.push((1, h2, m2));
            }
        } else {
            pieces.push((1, m1, m2));
        }
        if m2 < b {
            pieces.push((0, m2, b));
        }
    }
    Plan {
        start: a,
        end: b,
        pieces,
    }
}

/// How top-k ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopBy {
    /// By entity id.
    Entity,
    /// By producer key.
    Producer,
}

/// How totals group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    /// One group.
    None,
    /// One group per category.
    Category,
    /// One group per entity (records without entity form the group `None`).
    Entity,
}

/// An aggregate over a covered window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Aggregate {
    /// Covered window start (ms).
    pub start: i64,
    /// Covered window end (ms, exclusive).
    pub end: i64,
    /// The totals.
    pub total: Total,
}

/// Which rows of a top-k a replica selects ([`Replica::top_select`]): the union of three
/// rules, one per round of the cluster's exact top-k.
#[derive(Clone, Copy, Debug, Default)]
pub struct TopSelect<'a> {
    /// The rows among the `k` highest counts (ties broken by name ascending).
    pub k: usize,
    /// Every row whose count is at least this.
    pub min_count: Option<u64>,
    /// The rows of these names (sorted ascending).
    pub names: &'a [String],
}

impl TopSelect<'_> {
    /// The `k` highest counts only.
    pub fn top(k: usize) -> TopSelect<'static> {
        TopSelect {
            k,
            min_count: None,
            names: &[],
        }
    }
}

/// A ranked or grouped answer: the covered window and (name, totals) rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Rows {
    /// Covered window start (ms).
    pub start: i64,
    /// Covered window end (ms, exclusive).
    pub end: i64,
    /// (group name, totals); `None` names the no-entity group.
    pub rows: Vec<(Option<String>, Total)>,
}

impl Rows {
    /// Keeps the `k` rows with the highest counts, descending; ties broken by name ascending.
    pub fn rank(&mut self, k: usize) {
        self.rows
            .sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(&b.0)));
        self.rows.truncate(k);
    }
}

impl Replica {
    fn read(&self, series: u32, plan: &Plan) -> Total {
        let mut t = Total::EMPTY;
        let s = &self.series[series as usize];
        for &(tier, from, to) in &plan.pieces {
            for (_, v) in s.tiers[tier].range(from, to) {
                t.merge(v);
            }
        }
        t
    }

    fn plan_for(&self, start: i64, end: i64, dim: Dim) -> Plan {
        plan(start, end, self.horizons, dim.first_tier())
    }

    /// Count, sum, min and max of `category` (and `entity`, if given) over `[start, end)`.
    pub fn aggregate(
        &self,
        category: &str,
        entity: Option<&str>,
        start: i64,
        end: i64,
    ) -> Aggregate {
        let dim_probe = Dim::All;
        let plan = self.plan_for(start, end, dim_probe);
        let series = self.string_id(category).and_then(|cat| {
            let dim = match entity {
                None => Dim::All,
                Some(e) => Dim::Entity(self.string_id(e)?),
            };
            self.series_ids.get(&(cat, dim)).copied()
        });
        Aggregate {
            start: plan.start,
            end: plan.end,
            total: series.map_or(Total::EMPTY, |s| self.read(s, &plan)),
        }
    }

    /// One aggregate per step of `step_ms` from `start` (aligned down to the step) to `end`.
    /// Returns an empty list if the step is not positive or there would be over `max_points`.
    pub fn series(
        &self,
        category: &str,
        entity: Option<&str>,
        start: i64,
        end: i64,
        step_ms: i64,
        max_points: usize,
    ) -> Vec<Aggregate> {
        steps(start, end, step_ms, max_points)
            .map(|(s, e)| self.aggregate(category, entity, s, e))
            .collect()
    }

    /// The `k` entities or producers of `category` with the highest counts over
    /// `[start, end)`, descending; ties broken by name ascending.
    pub fn topk(&self, category: &str, start: i64, end: i64, k: usize, by: TopBy) -> Rows {
        let mut rows = self
            .top_select(category, start, end, by, TopSelect::top(k))
            .0;
        rows.rank(k);
        rows
    }

    /// Every non-empty row of `category`'s entities (or producers) over `plan`, names
    /// borrowed where they can be.
    fn top_rows(
        &self,
        category: &str,
        plan: &Plan,
        by: TopBy,
    ) -> Vec<(std::borrow::Cow<'_, str>, Total)> {
        let mut all: Vec<(std::borrow::Cow<'_, str>, Total)> = Vec::new();
        let cat = self.string_id(category);
        match by {
            TopBy::Entity => {
                for &(dim, idx) in cat
                    .and_then(|c| self.by_category.get(&c))
                    .into_iter()
                    .flatten()
                {
                    let Dim::Entity(e) = dim else { continue };
                    let t = self.read(idx, plan);
                    if !t.is_empty() {
                        all.push((self.strings.get(e).into(), t));
                    }
                }
            }
            TopBy::Producer => {
                // Producer plans have no second pieces (their finest tier is the minute).
                let mut sums: rustc_hash::FxHashMap<u32, Total> = Default::default();
                if let Some(r) = cat.and_then(|c| self.rollups.get(&c)) {
                    for &(tier, from, to) in &plan.pieces {
                        for (_, table) in r.range(tier, from, to) {
                            for (pid, t) in table.iter() {
                                sums.entry(pid).or_insert(Total::EMPTY).merge(t);
                            }
                        }
                    }
                }
                all.extend(
                    sums.into_iter()
                        .filter(|(_, t)| !t.is_empty())
                        .map(|(pid, t)| (self.producers.get(pid).to_hex().into(), t)),
                );
            }
        }
        all
    }

    /// The rows of `category`'s entities (or producers) over `[start, end)` that `sel`
    /// selects, sorted by name, and the highest count of a row left out (0 if none): a
    /// replica's part in one round of the cluster's exact top-k. Only the selected rows'
    /// names are copied out.
    pub fn top_select(
        &self,
        category: &str,
        start: i64,
        end: i64,
        by: TopBy,
        sel: TopSelect<'_>,
    ) -> (Rows, u64) {
        let probe = match by {
            TopBy::Entity => Dim::All,
            TopBy::Producer => Dim::Producer(0),
        };
        let plan = self.plan_for(start, end, probe);
        let mut all = self.top_rows(category, &plan, by);
        let mut picked = Vec::new();
        let k = sel.k.min(all.len());
        if k > 0 {
            // The k first by rank (count descending, name ascending), in no order.
            all.select_nth_unstable_by(k - 1, |a, b| {
                b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(&b.0))
            });
            picked.extend(all.drain(..k));
        }
        let mut left_out = 0;
        for (name, t) in all {
            let wanted = sel.min_count.is_some_and(|m| t.count >= m)
                || sel
                    .names
                    .binary_search_by(|n| n.as_str().cmp(&name))
                    .is_ok();
            if wanted {
                picked.push((name, t));
            } else {
                left_out = left_out.max(t.count);
            }
        }
        picked.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let rows = Rows {
            start: plan.start,
            end: plan.end,
            rows: picked
                .into_iter()
                .map(|(name, t)| (Some(name.into_owned()), t))
                .collect(),
        };
        (rows, left_out)
    }

    /// Counts and sums over `[start, end)`, grouped. Groups are sorted by name (`None` first).
    pub fn totals(&self, start: i64, end: i64, group_by: GroupBy) -> Rows {
        let plan = self.plan_for(start, end, Dim::All);
        let mut groups: std::collections::BTreeMap<Option<String>, Total> = Default::default();
        for (&(cat, dim), &idx) in &self.series_ids {
            let key = match (group_by, dim) {
                (GroupBy::None, Dim::All) => None,
                (GroupBy::Category, Dim::All) => Some(self.strings.get(cat).to_string()),
                (GroupBy::Entity, Dim::Entity(e)) => Some(self.strings.get(e).to_string()),
                (GroupBy::Entity, Dim::NoEntity) => None,
                _ => continue,
            };
            let t = self.read(idx, &plan);
            if !t.is_empty() || group_by == GroupBy::None {
                groups.entry(key).or_default().merge(&t);
            }
        }
        if group_by == GroupBy::None && groups.is_empty() {
            groups.insert(None, Total::EMPTY);
        }
        Rows {
            start: plan.start,
            end: plan.end,
            rows: groups.into_iter().collect(),
        }
    }

    /// One export key's totals: the records of `category` with `entity` (`None`: the records
    /// without an entity) in the bucket of tier `tier` (0 second, 1 minute, 2 hour) starting at
    /// `start`; `None` when that bucket holds none (or the tier no longer keeps it).
    pub fn bucket_total(
        &self,
        category: &str,
        entity: Option<&str>,
        tier: usize,
        start: i64,
    ) -> Option<Total> {
        let cat = self.string_id(category)?;
        let dim = match entity {
            None => Dim::NoEntity,
            Some(e) => Dim::Entity(self.string_id(e)?),
        };
        let idx = *self.series_ids.get(&(cat, dim))?;
        let (_, t) = self.series[idx as usize]
            .tiers
            .get(tier)?
            .range(start, start.saturating_add(1))
            .next()?;
        (!t.is_empty()).then_some(*t)
    }

    /// Calls `f(category, entity, bucket start, totals)` for every bucket of tier `tier`
    /// starting in `[from, to)` of every (category, entity) and (category, no entity) series:
    /// the finest keys, whose sums are every other answer.
    pub fn each_bucket(
        &self,
        tier: usize,
        from: i64,
        to: i64,
        mut f: impl FnMut(&str, Option<&str>, i64, &Total),
    ) {
        for (&(cat, dim), &idx) in &self.series_ids {
            let entity = match dim {
                Dim::NoEntity => None,
                Dim::Entity(e) => Some(self.strings.get(e)),
                Dim::All | Dim::Producer(_) => continue,
            };
            let Some(t) = self.series[idx as usize].tiers.get(tier) else {
                continue;
            };
            for (start, total) in t.range(from, to) {
                if !total.is_empty() {
                    f(self.strings.get(cat), entity, *start, total);
                }
            }
        }
    }

    /// The start of the oldest bucket tier `tier` holds, over every series.
    pub fn oldest_bucket(&self, tier: usize) -> Option<i64> {
        self.series
            .iter()
            .filter_map(|s| s.tiers.get(tier)?.iter().next().map(|e| e.0))
            .min()
    }

    /// Every category name, sorted.
    pub fn categories(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .series_ids
            .keys()
            .filter(|(_, d)| *d == Dim::All)
            .map(|(c, _)| self.strings.get(*c).to_string())
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: [i64; 3] = [i64::MIN; 3];

    fn covered(p: &Plan) -> Vec<i64> {
        // Every second the plan reads, expanded: the pieces must tile [start, end) exactly.
        let mut v = Vec::new();
        for &(t, f, to) in &p.pieces {
            assert_eq!(f % TIER_MS[t], 0);
            assert_eq!(to % TIER_MS[t], 0);
            let mut x = f;
            while x < to {
                v.push(x);
                x += 1000;
            }
        }
        v
    }

    #[test]
    fn plans_tile_the_window_exactly() {
        let cases = [
            (0, 1),
            (1, 1000),
            (500, 7_300_000),
            (-5_000, 3_600_000 * 30 + 17),
            (59_000, 61_000),
        ];
        for (s, e) in cases {
            let p = plan(s, e, NONE, 0);
            assert_eq!(p.start, ceil_to(s, 1000));
            assert_eq!(p.end, ceil_to(e, 1000));
            let secs = covered(&p);
            let expect: Vec<i64> = (p.start / 1000..p.end / 1000).map(|x| x * 1000).collect();
            assert_eq!(secs, expect, "{s}..{e}");
        }
    }

    #[test]
    fn thirty_days_reads_few_entries() {
        let p = plan(1_000_000_123, 1_000_000_123 + 30 * 86_400_000, NONE, 0);
        let entries: i64 = p
            .pieces
            .iter()
            .map(|&(t, f, to)| (to - f) / TIER_MS[t])
            .sum();
        assert!(entries < 60 + 60 + 60 + 60 + 721, "{entries}");
    }

    #[test]
    fn pruned_tiers_widen_the_window() {
        // Seconds pruned before hour 10, minutes before hour 5.
        let h = 3_600_000;
        let horizons = [10 * h, 5 * h, i64::MIN];
        let p = plan(7 * h + 61_500, 12 * h + 30_000, horizons, 0);
        assert_eq!(p.start, 7 * h + 60_000); // widened to the minute, since seconds are gone
        assert_eq!(p.end, 12 * h + 30_000);
        let p = plan(2 * h + 5, 3 * h + 5, horizons, 0);
        assert_eq!((p.start, p.end), (2 * h, 4 * h));
        for &(t, f, _) in &p.pieces {
            assert!(f >= horizons[t]);
        }
        // Producer series keep no seconds at all.
        let p = plan(61_500, 200_000, NONE, 1);
        assert_eq!((p.start, p.end), (60_000, 240_000));
    }
}
