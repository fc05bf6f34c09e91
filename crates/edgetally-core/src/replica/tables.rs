//! The tables a replica keeps its totals in: a tier of one series (a ring buffer of buckets),
//! the series, and the per-producer rollups (one large table per category).

use super::*;

/// One tier of a series: (bucket start ms, totals), ascending by start, unique.
///
/// A ring buffer rather than a B-tree: buckets arrive mostly in time order, so the common
/// update is to the newest entry (one memory access, where a B-tree walks a node of its own
/// per series and tier — the cache misses that bounded apply on a large key space), a late
/// bucket is a binary search and a short shift, and retention removes from the front.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tier(VecDeque<(i64, Total)>);

impl Tier {
    /// The totals of bucket `start`, created empty if absent (then `created` is bumped).
    #[inline]
    pub(super) fn entry(&mut self, start: i64, created: &mut u64) -> &mut Total {
        let n = self.0.len();
        if self.0.capacity() == 0 {
            // Most series of a large key space (one entity, one producer) hold one bucket per
            // tier: room for exactly one, where the first push would make room for four
            // (224 bytes, three of them never used). Growth from there doubles as usual.
            self.0.reserve_exact(1);
        }
        let i = match self.0.back() {
            Some(&(last, _)) if last == start => n - 1,
            Some(&(last, _)) if last > start => {
                let i = self.0.partition_point(|&(k, _)| k < start);
                if self.0.get(i).map(|e| e.0) != Some(start) {
                    self.0.insert(i, (start, Total::EMPTY));
                    *created += 1;
                }
                i
            }
            _ => {
                self.0.push_back((start, Total::EMPTY));
                *created += 1;
                n
            }
        };
        &mut self.0[i].1
    }

    /// Entries with `from <= start < to`, ascending.
    pub(crate) fn range(&self, from: i64, to: i64) -> impl Iterator<Item = &(i64, Total)> {
        let i = self.0.partition_point(|&(k, _)| k < from);
        let j = self.0.partition_point(|&(k, _)| k < to).max(i);
        self.0.range(i..j)
    }

    /// Drops the entries before `cutoff`; returns how many.
    pub(super) fn drop_before(&mut self, cutoff: i64) -> usize {
        let i = self.0.partition_point(|&(k, _)| k < cutoff);
        self.0.drain(..i);
        i
    }

    /// All entries, ascending.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &(i64, Total)> {
        self.0.iter()
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// A tier of `entries`, which must be strictly ascending by start.
    pub(super) fn from_sorted(entries: Vec<(i64, Total)>) -> Option<Tier> {
        entries
            .windows(2)
            .all(|w| w[0].0 < w[1].0)
            .then(|| Tier(entries.into()))
    }
}

/// The stored series of one key: per tier, bucket start (ms) → totals.
#[derive(Clone, Debug, Default)]
pub(crate) struct Series {
    pub(crate) tiers: [Tier; 3],
}

impl Series {
    pub(super) fn add_total(
        &mut self,
        start_ms: i64,
        first_tier: usize,
        t: &Total,
        created: &mut u64,
    ) {
        for (tier, res) in self.tiers.iter_mut().zip(TIER_MS).skip(first_tier) {
            let b = start_ms.div_euclid(res) * res;
            tier.entry(b, created).merge(t);
        }
    }

    #[inline]
    pub(super) fn add(
        &mut self,
        start_ms: i64,
        first_tier: usize,
        s: &crate::summary::Summary,
        created: &mut u64,
    ) {
        for (tier, res) in self.tiers.iter_mut().zip(TIER_MS).skip(first_tier) {
            let b = start_ms.div_euclid(res) * res;
            tier.entry(b, created).add(s);
        }
    }
}

/// One bucket's per-producer totals: a short list while few producers wrote in the bucket
/// (the common case for long-lived producers: one or a few per category and minute), an
/// indexed list once there are many (ephemeral producers: thousands per minute).
#[derive(Clone, Debug)]
pub(crate) enum Table {
    /// Up to [`Table::SMALL`] entries, unordered.
    Small(Vec<(u32, Total)>),
    /// More.
    Large(Box<LargeTable>),
}

/// Many producers' totals: dense columns and a table of positions into them. Against a map
/// of (producer, totals) slots — 56 bytes each at 44–88 % fill — a closed bucket
/// ([`Table::shrink`]) costs 52 bytes per producer plus 4-byte index slots: what took an idle
/// producer from 210 to 177 bytes (`cargo xtask bench figures`).
#[derive(Clone, Debug, Default)]
pub(crate) struct LargeTable {
    /// Positions into `pids` and `totals`, hashed by producer id.
    index: hashbrown::HashTable<u32>,
    pids: Vec<u32>,
    totals: Vec<Total>,
}

/// Producer ids are dense and assigned by the replica (not chosen by the network): a
/// multiplicative hash spreads them.
pub(super) fn pid_hash(pid: u32) -> u64 {
    u64::from(pid).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl LargeTable {
    pub(super) fn add(&mut self, pid: u32, t: &Total) -> bool {
        let LargeTable {
            index,
            pids,
            totals,
        } = self;
        let h = pid_hash(pid);
        if let Some(&i) = index.find(h, |&i| pids[i as usize] == pid) {
            totals[i as usize].merge(t);
            return false;
        }
        index.insert_unique(h, pids.len() as u32, |&i| pid_hash(pids[i as usize]));
        crate::intern::grow_gently(pids);
        crate::intern::grow_gently(totals);
        pids.push(pid);
        totals.push(*t);
        true
    }
}

impl Table {
    const SMALL: usize = 16;

    pub(super) fn new() -> Table {
        Table::Small(Vec::new())
    }

    /// Merges `t` into producer `pid`'s totals; returns whether the entry is new.
    pub(super) fn add(&mut self, pid: u32, t: &Total) -> bool {
        match self {
            Table::Small(v) => {
                if let Some((_, x)) = v.iter_mut().find(|(p, _)| *p == pid) {
                    x.merge(t);
                    return false;
                }
                if v.len() < Self::SMALL {
                    if v.capacity() == 0 {
                        v.reserve_exact(1);
                    }
                    v.push((pid, *t));
                } else {
                    let mut l = LargeTable::default();
                    for (p, x) in v.drain(..) {
                        l.add(p, &x);
                    }
                    l.add(pid, t);
                    *self = Table::Large(Box::new(l));
                }
                true
            }
            Table::Large(l) => l.add(pid, t),
        }
    }

    /// Gives back spare capacity, for a bucket that no longer grows (closed past the
    /// lateness horizon). Adding to it later is still correct, only slower.
    pub(super) fn shrink(&mut self) {
        match self {
            Table::Small(v) => v.shrink_to_fit(),
            Table::Large(l) => {
                let LargeTable {
                    index,
                    pids,
                    totals,
                } = &mut **l;
                pids.shrink_to_fit();
                totals.shrink_to_fit();
                index.shrink_to_fit(|&i| pid_hash(pids[i as usize]));
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Table::Small(v) => v.len(),
            Table::Large(l) => l.pids.len(),
        }
    }

    /// Every (producer, totals), in no particular order.
    pub(crate) fn iter(&self) -> Box<dyn Iterator<Item = (u32, &Total)> + '_> {
        match self {
            Table::Small(v) => Box::new(v.iter().map(|(p, t)| (*p, t))),
            Table::Large(l) => Box::new(l.pids.iter().copied().zip(l.totals.iter())),
        }
    }
}

/// The per-producer rollups of one category (what top-k by producer reads), minute and hour
/// tiers: per bucket, ascending, each producer's totals in that bucket.
///
/// One table per bucket rather than a series per (category, producer): browsers make
/// producers ephemeral (a key per page view), and a producer seen once then costs two table
/// entries instead of a series header, two tier buffers and three index entries. Top-k over a
/// window reads the buckets it covers and sums per producer, as it summed per series before.
#[derive(Clone, Debug, Default)]
pub(crate) struct Rollups {
    /// Tier 1 (minutes) and tier 2 (hours).
    pub(crate) tiers: [VecDeque<(i64, Table)>; 2],
}

impl Rollups {
    /// The producer table of bucket `start` in `tier` (0: minutes, 1: hours), created empty.
    pub(super) fn bucket(tier: &mut VecDeque<(i64, Table)>, start: i64) -> &mut Table {
        if tier.capacity() == 0 {
            tier.reserve_exact(1);
        }
        let i = match tier.back() {
            Some(&(last, _)) if last == start => tier.len() - 1,
            Some(&(last, _)) if last > start => {
                let i = tier.partition_point(|(k, _)| *k < start);
                if tier.get(i).map(|e| e.0) != Some(start) {
                    tier.insert(i, (start, Table::new()));
                }
                i
            }
            _ => {
                tier.push_back((start, Table::new()));
                tier.len() - 1
            }
        };
        &mut tier[i].1
    }

    /// Adds `t` to producer `pid`'s totals of the minute and hour holding `start_ms`.
    pub(super) fn add(&mut self, start_ms: i64, pid: u32, t: &Total, created: &mut u64) {
        for (tier, res) in self.tiers.iter_mut().zip([TIER_MS[1], TIER_MS[2]]) {
            let b = start_ms.div_euclid(res) * res;
            if Self::bucket(tier, b).add(pid, t) {
                *created += 1;
            }
        }
    }

    /// Drops the buckets of `tier` (1 or 2) before `cutoff`; returns how many entries.
    pub(super) fn drop_before(&mut self, tier: usize, cutoff: i64) -> usize {
        let t = &mut self.tiers[tier - 1];
        let i = t.partition_point(|(k, _)| *k < cutoff);
        t.drain(..i).map(|(_, m)| m.len()).sum()
    }

    /// Buckets of `tier` (1 or 2) with `from <= start < to`, ascending.
    pub(crate) fn range(
        &self,
        tier: usize,
        from: i64,
        to: i64,
    ) -> impl Iterator<Item = &(i64, Table)> {
        let t = &self.tiers[tier.clamp(1, 2) - 1];
        let i = t.partition_point(|(k, _)| *k < from);
        let j = t.partition_point(|(k, _)| *k < to).max(i);
        t.range(i..j)
    }

    pub(super) fn entries(&self) -> usize {
        self.tiers.iter().flatten().map(|(_, m)| m.len()).sum()
    }
}
