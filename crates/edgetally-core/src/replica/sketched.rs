//! The sketches a replica keeps (distinct counts and quantiles, batch format v2): per series
//! of a category (every record, no entity, each entity), at minute and hour resolution.
//!
//! Not per second: a dense HyperLogLog is 16 KiB, and a second's worth of one would cost
//! sixty times the minute's memory for answers a minute already gives to within its widening
//! (the answer reports the window it covered). Like the totals, every sketch of a bucket is
//! the merge of the sketches of the batches applied, so two replicas holding the same batches
//! hold identical sketch bytes.

use super::*;
use crate::sketches::Sketches;
use std::collections::btree_map::Entry;

/// The finest tier that keeps sketches (the minute).
pub const SKETCH_FIRST_TIER: usize = 1;

/// One series' sketches: per tier from [`SKETCH_FIRST_TIER`], bucket start → sketches.
#[derive(Clone, Debug, Default)]
pub(crate) struct SeriesSketches {
    pub(crate) tiers: [BTreeMap<i64, Sketches>; 2],
}

/// The sketches of a category (or one of its entities) over a window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SketchAnswer {
    /// Covered window start (ms): the query's, widened to whole minutes.
    pub start: i64,
    /// Covered window end (ms, exclusive).
    pub end: i64,
    /// The union of every bucket's sketches in the window.
    pub sketches: Sketches,
}

/// What one sketch bucket holds: its sketches' heap, and the bucket itself — its key and
/// value in a B-tree node (nodes run about two-thirds full) and an allocator header for each
/// of its up to three allocations (measured: `cargo xtask bench figures`, heap against this
/// estimate).
fn held(k: &Sketches) -> usize {
    const BUCKET: usize = (core::mem::size_of::<(i64, Sketches)>() * 3).div_ceil(2) + 3 * 16;
    k.heap_bytes() + BUCKET
}

impl Replica {
    /// Merges a summary's sketches into series `series`'s minute and hour buckets holding
    /// `start_ms`.
    pub(super) fn add_sketches(&mut self, series: u32, start_ms: i64, k: &Sketches) {
        let entry = self.sketches.entry(series).or_default();
        let mut grown: i64 = 0;
        for (t, tier) in entry.tiers.iter_mut().enumerate() {
            let res = TIER_MS[t + SKETCH_FIRST_TIER];
            let (slot, before) = match tier.entry(start_ms.div_euclid(res) * res) {
                Entry::Occupied(o) => {
                    let slot = o.into_mut();
                    let before = held(slot) as i64;
                    (slot, before)
                }
                Entry::Vacant(v) => (v.insert(Sketches::default()), 0),
            };
            // Batches are checked before they are applied (one quantile accuracy), so the
            // merge cannot fail; if it did, the bucket would be left as it was.
            let _ = slot.merge(k);
            grown += held(slot) as i64 - before;
        }
        self.sketch_bytes = self.sketch_bytes.saturating_add_signed(grown);
    }

    /// Drops the sketch buckets of tier `tier` before `cutoff` (and raises its horizon).
    pub(super) fn prune_sketches(&mut self, tier: usize, cutoff: i64) {
        let Some(t) = tier.checked_sub(SKETCH_FIRST_TIER) else {
            return;
        };
        if cutoff <= self.sketch_horizons[t] {
            return;
        }
        self.sketch_horizons[t] = cutoff;
        let mut freed = 0u64;
        self.sketches.retain(|_, s| {
            let keep = s.tiers[t].split_off(&cutoff);
            freed += s.tiers[t].values().map(|k| held(k) as u64).sum::<u64>();
            s.tiers[t] = keep;
            s.tiers.iter().any(|x| !x.is_empty())
        });
        self.sketch_bytes = self.sketch_bytes.saturating_sub(freed);
    }

    /// Removes sketch buckets older than `retention` allows at `now_ms` (per sketch tier,
    /// minute then hour, in ms; `None` keeps them as long as the totals' tier): sketches
    /// can be kept shorter than totals (a dense HyperLogLog is 16 KiB a bucket). Cutoffs are
    /// aligned to the hour, as the totals' are, so a query can switch tiers at a horizon.
    pub fn prune_sketch_tiers(&mut self, now_ms: i64, retention: [Option<i64>; 2]) {
        let hour = TIER_MS[2];
        for (t, keep) in retention.into_iter().enumerate() {
            if let Some(keep) = keep {
                let cutoff = now_ms.saturating_sub(keep).div_euclid(hour) * hour;
                self.prune_sketches(t + SKETCH_FIRST_TIER, cutoff);
            }
        }
    }

    /// The horizons a sketch query plans with: the totals' second tier's (unused: sketches
    /// start at the minute), then the sketch tiers'.
    fn sketch_plan_horizons(&self) -> [i64; 3] {
        [
            self.horizons[0],
            self.sketch_horizons[0],
            self.sketch_horizons[1],
        ]
    }

    /// Estimated heap bytes of the sketches held.
    pub fn sketch_bytes(&self) -> u64 {
        self.sketch_bytes
    }

    /// One export key's sketches: those of the records of `category` with `entity` (`None`:
    /// the records without an entity) in the bucket of tier `tier` (1 minute, 2 hour) starting
    /// at `start`; `None` when it holds none (or they were pruned).
    pub fn bucket_sketches(
        &self,
        category: &str,
        entity: Option<&str>,
        tier: usize,
        start: i64,
    ) -> Option<&Sketches> {
        let cat = self.string_id(category)?;
        let dim = match entity {
            None => Dim::NoEntity,
            Some(e) => Dim::Entity(self.string_id(e)?),
        };
        let idx = self.series_ids.get(&(cat, dim))?;
        self.sketches
            .get(idx)?
            .tiers
            .get(tier.checked_sub(SKETCH_FIRST_TIER)?)?
            .get(&start)
    }

    /// The union of the sketches of `category` (and `entity`, if given; else every record of
    /// the category) over `[start, end)`, widened to whole minutes.
    pub fn sketches(
        &self,
        category: &str,
        entity: Option<&str>,
        start: i64,
        end: i64,
    ) -> SketchAnswer {
        let plan = crate::query::plan(start, end, self.sketch_plan_horizons(), SKETCH_FIRST_TIER);
        let series = self.string_id(category).and_then(|cat| {
            let dim = match entity {
                None => Dim::All,
                Some(e) => Dim::Entity(self.string_id(e)?),
            };
            self.series_ids.get(&(cat, dim)).copied()
        });
        let mut out = Sketches::default();
        if let Some(s) = series.and_then(|i| self.sketches.get(&i)) {
            for &(tier, from, to) in &plan.pieces {
                if let Some(t) = tier.checked_sub(SKETCH_FIRST_TIER) {
                    for (_, k) in s.tiers[t].range(from..to) {
                        let _ = out.merge(k);
                    }
                }
            }
        }
        SketchAnswer {
            start: plan.start,
            end: plan.end,
            sketches: out,
        }
    }

    /// One [`Replica::sketches`] per step of `step_ms` from `start` (aligned down to the
    /// step) to `end`; empty if the step is not positive or there would be over `max_points`.
    pub fn sketch_series(
        &self,
        category: &str,
        entity: Option<&str>,
        start: i64,
        end: i64,
        step_ms: i64,
        max_points: usize,
    ) -> Vec<SketchAnswer> {
        crate::query::steps(start, end, step_ms, max_points)
            .map(|(s, e)| self.sketches(category, entity, s, e))
            .collect()
    }

    /// The union of sketches over `[start, end)` (widened to whole minutes), grouped as
    /// [`Replica::totals`] groups (of `category` only, if given): one row for everything, one
    /// per category, or one per entity (`None`: records without an entity). Rows without
    /// sketches are left out; sorted by name. Returns the covered window and the rows.
    pub fn sketch_rows(
        &self,
        category: Option<&str>,
        start: i64,
        end: i64,
        group_by: crate::query::GroupBy,
    ) -> (i64, i64, Vec<(Option<String>, Sketches)>) {
        use crate::query::GroupBy;
        let plan = crate::query::plan(start, end, self.sketch_plan_horizons(), SKETCH_FIRST_TIER);
        let only = match category {
            Some(c) => match self.string_id(c) {
                Some(id) => Some(id),
                None => return (plan.start, plan.end, Vec::new()),
            },
            None => None,
        };
        let mut groups: BTreeMap<Option<String>, Sketches> = BTreeMap::new();
        for (&(cat, dim), idx) in &self.series_ids {
            if only.is_some_and(|c| c != cat) {
                continue;
            }
            let key = match (group_by, dim) {
                (GroupBy::None, Dim::All) => None,
                (GroupBy::Category, Dim::All) => Some(self.strings.get(cat).to_string()),
                (GroupBy::Entity, Dim::Entity(e)) => Some(self.strings.get(e).to_string()),
                (GroupBy::Entity, Dim::NoEntity) => None,
                _ => continue,
            };
            let Some(s) = self.sketches.get(idx) else {
                continue;
            };
            for &(tier, from, to) in &plan.pieces {
                if let Some(t) = tier.checked_sub(SKETCH_FIRST_TIER) {
                    for (_, k) in s.tiers[t].range(from..to) {
                        let _ = groups.entry(key.clone()).or_default().merge(k);
                    }
                }
            }
        }
        (plan.start, plan.end, groups.into_iter().collect())
    }

    /// Every sketch bucket in canonical form: (category, dimension) in the snapshot's ids,
    /// tier, bucket start, sketches — sorted.
    pub(super) fn sketch_snapshot(&self, canon: &encode::Canon) -> Vec<SketchSnapshot> {
        let mut out = Vec::new();
        for (&(cat, dim), idx) in &self.series_ids {
            let Some(s) = self.sketches.get(idx) else {
                continue;
            };
            for (t, tier) in s.tiers.iter().enumerate() {
                for (&start, k) in tier {
                    out.push(SketchSnapshot {
                        category: canon.remap[cat as usize],
                        dim: canon.dim(dim),
                        tier: (t + SKETCH_FIRST_TIER) as u8,
                        start,
                        distinct: k.distinct.as_ref().map(|h| h.encode()),
                        quantiles: k.quantiles.as_ref().map(|q| q.encode()),
                    });
                }
            }
        }
        out.sort_by_key(|s| (s.category, s.dim, s.tier, s.start));
        out
    }

    /// Restores the sketch buckets of a snapshot (whose strings are interned already, in
    /// snapshot order).
    pub(super) fn restore_sketches(
        &mut self,
        list: Vec<SketchSnapshot>,
    ) -> Result<(), RestoreError> {
        let ns = self.strings.len() as u32;
        for s in list {
            let ok = s.category < ns
                && match s.dim {
                    Dim::Entity(e) => e < ns,
                    Dim::Producer(_) => false,
                    _ => true,
                }
                && (SKETCH_FIRST_TIER..3).contains(&usize::from(s.tier));
            if !ok {
                return Err(RestoreError::Inconsistent("sketch index out of range"));
            }
            let k = s
                .sketches()
                .ok_or(RestoreError::Inconsistent("sketch bytes malformed"))?;
            let idx = self.series_index(s.category, s.dim);
            let tier = &mut self.sketches.entry(idx).or_default().tiers
                [usize::from(s.tier) - SKETCH_FIRST_TIER];
            if tier.keys().next_back().is_some_and(|&last| last >= s.start) {
                return Err(RestoreError::Inconsistent("sketch entries not ascending"));
            }
            self.sketch_bytes += held(&k) as u64;
            tier.insert(s.start, k);
        }
        Ok(())
    }
}

/// Adds a batch's sketches (their canonical bytes, by summary index) to its
/// [`content_digest`].
pub(super) fn digest_sketches(h: &mut sha2::Sha256, batch: &Batch) {
    use sha2::Digest as _;
    if batch.sketches.is_empty() {
        return;
    }
    h.update((batch.sketches.len() as u64).to_le_bytes());
    for (i, k) in &batch.sketches {
        h.update(i.to_le_bytes());
        for part in [
            k.distinct.as_ref().map(|x| x.encode()),
            k.quantiles.as_ref().map(|x| x.encode()),
        ] {
            match part {
                None => h.update([0u8]),
                Some(bytes) => {
                    h.update([1u8]);
                    h.update((bytes.len() as u64).to_le_bytes());
                    h.update(&bytes);
                }
            }
        }
    }
}

/// One bucket's sketches in a [`Snapshot`] (format 6 on).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SketchSnapshot {
    /// Category string index.
    pub category: u32,
    /// Dimension (never a producer), with ids into the snapshot's tables.
    pub dim: Dim,
    /// Tier (1 minute, 2 hour).
    pub tier: u8,
    /// Bucket start (ms).
    pub start: i64,
    /// The HyperLogLog's canonical bytes.
    pub distinct: Option<Vec<u8>>,
    /// The quantile sketch's canonical bytes.
    pub quantiles: Option<Vec<u8>>,
}

impl SketchSnapshot {
    /// The decoded sketches; `None` if either is malformed or both are absent.
    pub fn sketches(&self) -> Option<Sketches> {
        let k = Sketches {
            distinct: match &self.distinct {
                Some(b) => Some(crate::sketches::Hll::decode(b).ok()?),
                None => None,
            },
            quantiles: match &self.quantiles {
                Some(b) => Some(crate::sketches::Quantiles::decode(b).ok()?),
                None => None,
            },
        };
        (!k.is_empty()).then_some(k)
    }
}
