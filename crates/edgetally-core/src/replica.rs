//! The replica state: totals built from applied batches, the seen-sets that make apply
//! idempotent, and the retained log that replication serves from.
//!
//! Convergence argument, in short: a replica's totals are a pure function of the *set* of
//! batches it has applied (each batch is applied at most once, and every field of a total
//! merges with an associative, commutative operation). Replicas exchange digests (their
//! seen-sets) and send each other the batches the other lacks, so after an exchange in both
//! directions they hold the same set, hence bit-identical totals.

use crate::batch::{Batch, BatchId, ProducerKey, NO_ENTITY};
use crate::code::RejectCode;
use crate::intern::{Interner, KeyIndex};
use crate::seen::SeenSet;
use crate::summary::Total;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

mod encode;

/// Resolutions of the stored tiers: 1 s, 1 min, 1 h.
pub const TIER_MS: [i64; 3] = [1_000, 60_000, 3_600_000];

/// How long each tier keeps its entries, measured back from the `now` given to
/// [`Replica::prune_tiers`]. `None` keeps entries forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Per tier, in ms.
    pub tiers: [Option<i64>; 3],
}

impl Retention {
    /// Whether each tier is kept at least as long as the finer one (unset: for ever). Queries
    /// read a long range from the coarsest tier that holds it, so a coarse tier pruned before
    /// a finer one would make them miss data the finer tier still holds.
    pub fn check(&self) -> Result<(), String> {
        let names = ["seconds", "minutes", "hours"];
        let len = |t: usize| self.tiers[t].unwrap_or(i64::MAX);
        for t in 1..3 {
            if len(t) < len(t - 1) {
                return Err(format!(
                    "retention_{}_tier_ms ({} ms) is shorter than retention_{}_tier_ms ({}): \
                     a coarser tier must be kept at least as long as a finer one",
                    names[t],
                    len(t),
                    names[t - 1],
                    self.tiers[t - 1].map_or("for ever".to_string(), |v| format!("{v} ms"))
                ));
            }
        }
        Ok(())
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            tiers: [Some(2 * 86_400_000), Some(90 * 86_400_000), None],
        }
    }
}

/// One retained batch: its decoded form (to apply) and its original signed bytes (to forward,
/// so peers verify the producer's own signature). The core never interprets `raw`.
#[derive(Clone, Debug)]
pub struct LogEntry {
    /// The decoded batch.
    pub batch: Arc<Batch>,
    /// The bytes exactly as the producer signed and sent them.
    pub raw: Arc<[u8]>,
}

/// What applying a batch did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The batch was new and is now counted.
    New,
    /// The batch id was already applied; nothing changed.
    Duplicate,
}

/// What a replica holds of one (producer, epoch): the seqs applied, and a hash of the
/// batches behind them, so two replicas holding the same seqs can tell whether they hold the
/// same contents (a producer can sign two contents under one id: an equivocation).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochSeen {
    /// The seqs applied.
    pub seqs: SeenSet,
    /// The sum, modulo 2¹²⁸, of the first 16 bytes (little-endian) of each applied batch's
    /// [`batch_digest`]; `None` when not known (restored from a snapshot of format 1 or 2,
    /// which did not keep it).
    pub hash: Option<[u8; 16]>,
    /// The epoch's lateness horizon: the latest, over its applied batches, of each batch's
    /// earliest bucket end ([`Batch::oldest_end_ms`]). A merger refuses a batch one of whose
    /// buckets ends `max_lateness` or more before its clock, so once the clock passes
    /// `horizon_ms + max_lateness` no batch applied in this epoch can be accepted again, and
    /// the seen-set can go ([`Replica::expire`]). A function of the batches alone, so
    /// replicas holding the same batches agree on it. [`HORIZON_UNKNOWN`] when not known
    /// (restored from a snapshot of format 3 or older).
    pub horizon_ms: i64,
}

/// [`EpochSeen::horizon_ms`] of an epoch restored from a snapshot that did not keep it: it
/// never expires until the merger bounds it ([`Replica::bound_unknown_horizons`]).
pub const HORIZON_UNKNOWN: i64 = i64::MAX;

impl EpochSeen {
    fn add(&mut self, seq: u64, digest: &[u8; 32], oldest_end_ms: i64) {
        if self.seqs.insert(seq) {
            if self.horizon_ms != HORIZON_UNKNOWN {
                self.horizon_ms = self.horizon_ms.max(oldest_end_ms);
            }
            if let Some(h) = &mut self.hash {
                let mut d = [0u8; 16];
                d.copy_from_slice(&digest[..16]);
                *h = u128::from_le_bytes(*h)
                    .wrapping_add(u128::from_le_bytes(d))
                    .to_le_bytes();
            }
        }
    }
}

/// What a replica holds, by batch id: exchanged between peers so each can send the other
/// what it lacks, and compare what both hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// Seen-set and content hash per (producer, epoch).
    pub epochs: BTreeMap<(ProducerKey, u64), EpochSeen>,
}

/// A (producer, epoch) of which two replicas hold the same seqs with different contents:
/// the producer signed two contents under one batch id (or a state was damaged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Divergence {
    /// The producer.
    pub producer: ProducerKey,
    /// The epoch.
    pub epoch: u64,
    /// This replica's content hash of the epoch.
    pub mine: [u8; 16],
    /// The other replica's.
    pub theirs: [u8; 16],
}

impl Divergence {
    /// Whether this replica is the one that adopts the other's state (PROTOCOL.md §9): the
    /// one whose hash of the first diverging epoch is greater, compared as bytes.
    pub fn mine_yields(&self) -> bool {
        self.mine > self.theirs
    }
}

impl Digest {
    /// Whether the digest covers batch `id`.
    pub fn contains(&self, id: &BatchId) -> bool {
        self.epochs
            .get(&(id.producer, id.epoch))
            .is_some_and(|s| s.seqs.contains(id.seq))
    }

    /// Whether every batch id `other` covers, this digest covers too.
    pub fn covers(&self, other: &Digest) -> bool {
        other.epochs.iter().all(|(k, theirs)| {
            theirs.seqs.is_empty()
                || self
                    .epochs
                    .get(k)
                    .is_some_and(|mine| theirs.seqs.is_subset(&mine.seqs))
        })
    }

    /// Forgets the epochs whose horizon is at or before `cutoff_ms` (those a replica with
    /// that cutoff expires or has expired: see [`Replica::expire`]). Applied to a peer's
    /// digest with this replica's own cutoff, so clocks that differ between the two cannot
    /// make an epoch one of them has expired look like a gap to the other.
    pub fn retain_live(&mut self, cutoff_ms: i64) {
        self.epochs.retain(|_, e| e.horizon_ms > cutoff_ms);
    }

    /// Total number of batch ids covered.
    pub fn batches(&self) -> u64 {
        self.epochs.values().map(|e| e.seqs.len()).sum()
    }

    /// The first (producer, epoch), in key order, of which both digests hold the same
    /// non-empty seqs with different content hashes (both known). Other epochs may differ in
    /// seqs (ingest goes on): the comparison needs only that one epoch to have settled.
    pub fn diverging(&self, theirs: &Digest) -> Option<Divergence> {
        self.epochs.iter().find_map(|(&(producer, epoch), mine)| {
            let other = theirs.epochs.get(&(producer, epoch))?;
            match (mine.hash, other.hash) {
                (Some(a), Some(b))
                    if a != b && mine.seqs == other.seqs && !mine.seqs.is_empty() =>
                {
                    Some(Divergence {
                        producer,
                        epoch,
                        mine: a,
                        theirs: b,
                    })
                }
                _ => None,
            }
        })
    }
}

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
    fn entry(&mut self, start: i64, created: &mut u64) -> &mut Total {
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
    fn drop_before(&mut self, cutoff: i64) -> usize {
        let i = self.0.partition_point(|&(k, _)| k < cutoff);
        self.0.drain(..i);
        i
    }

    /// All entries, ascending.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &(i64, Total)> {
        self.0.iter()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// A tier of `entries`, which must be strictly ascending by start.
    fn from_sorted(entries: Vec<(i64, Total)>) -> Option<Tier> {
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
    fn add_total(&mut self, start_ms: i64, first_tier: usize, t: &Total, created: &mut u64) {
        for (tier, res) in self.tiers.iter_mut().zip(TIER_MS).skip(first_tier) {
            let b = start_ms.div_euclid(res) * res;
            tier.entry(b, created).merge(t);
        }
    }

    #[inline]
    fn add(
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
fn pid_hash(pid: u32) -> u64 {
    u64::from(pid).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl LargeTable {
    fn add(&mut self, pid: u32, t: &Total) -> bool {
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
        pids.push(pid);
        totals.push(*t);
        true
    }
}

impl Table {
    const SMALL: usize = 16;

    fn new() -> Table {
        Table::Small(Vec::new())
    }

    /// Merges `t` into producer `pid`'s totals; returns whether the entry is new.
    fn add(&mut self, pid: u32, t: &Total) -> bool {
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
    fn shrink(&mut self) {
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
    fn bucket(tier: &mut VecDeque<(i64, Table)>, start: i64) -> &mut Table {
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
    fn add(&mut self, start_ms: i64, pid: u32, t: &Total, created: &mut u64) {
        for (tier, res) in self.tiers.iter_mut().zip([TIER_MS[1], TIER_MS[2]]) {
            let b = start_ms.div_euclid(res) * res;
            if Self::bucket(tier, b).add(pid, t) {
                *created += 1;
            }
        }
    }

    /// Drops the buckets of `tier` (1 or 2) before `cutoff`; returns how many entries.
    fn drop_before(&mut self, tier: usize, cutoff: i64) -> usize {
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

    fn entries(&self) -> usize {
        self.tiers.iter().flatten().map(|(_, m)| m.len()).sum()
    }
}

/// An order-independent hash of a set of batches: the sum, modulo 2²⁵⁶, of each batch's
/// digest ([`batch_digest`]). Adding a batch is O(1), so a replica keeps it current
/// as it applies, and two replicas holding the same batches (same ids, same content) hold the
/// same sum whatever order or grouping they applied them in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetHash(pub [u8; 32]);

impl SetHash {
    /// Adds one element (a 256-bit little-endian number) to the sum.
    pub fn add(&mut self, digest: &[u8; 32]) {
        let mut carry = 0u16;
        for (a, b) in self.0.iter_mut().zip(digest) {
            let t = *a as u16 + *b as u16 + carry;
            *a = t as u8;
            carry = t >> 8;
        }
    }
}

/// A batch's element of the [`SetHash`]. With the signed bytes (`raw`: the envelope, whose
/// last 64 bytes are the signature — what every merger holds, from its producer, its store or
/// a peer): SHA-256 over a domain prefix, the id and the signature, which commits to the whole
/// content under the producer's key, for a fraction of a microsecond. Without them (a
/// replica fed decoded batches only, as in simulations): [`content_digest`]. A replica must
/// be fed one way or the other throughout for its hash to compare with another's.
pub fn batch_digest(batch: &Batch, raw: &[u8]) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    let Some(sig) = raw.len().checked_sub(64).and_then(|at| raw.get(at..)) else {
        return content_digest(batch);
    };
    let mut h = Sha256::new();
    h.update(b"edgetally/batch-signature/v1\0");
    h.update(batch.id.producer.0);
    h.update(batch.id.epoch.to_le_bytes());
    h.update(batch.id.seq.to_le_bytes());
    h.update(sig);
    h.finalize().into()
}

/// The SHA-256 of a batch's decoded content in a fixed encoding: its id, creation time,
/// bucket width, string table and every summary. Two batches with the same id and different
/// content (a producer equivocating) have different digests.
pub fn content_digest(batch: &Batch) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    h.update(b"edgetally/batch-content/v1\0");
    h.update(batch.id.producer.0);
    h.update(batch.id.epoch.to_le_bytes());
    h.update(batch.id.seq.to_le_bytes());
    h.update(batch.created_ms.to_le_bytes());
    h.update(batch.bucket_ms.to_le_bytes());
    h.update((batch.strings.len() as u64).to_le_bytes());
    for s in batch.strings.iter() {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    h.update((batch.summaries.len() as u64).to_le_bytes());
    for s in &batch.summaries {
        let mut b = [0u8; 64];
        b[..4].copy_from_slice(&s.category.to_le_bytes());
        b[4..8].copy_from_slice(&s.entity.to_le_bytes());
        b[8..16].copy_from_slice(&s.bucket.to_le_bytes());
        b[16..24].copy_from_slice(&s.summary.count.to_le_bytes());
        b[24..40].copy_from_slice(&s.summary.sum.to_le_bytes());
        b[40..48].copy_from_slice(&s.summary.min.to_bits().to_le_bytes());
        b[48..56].copy_from_slice(&s.summary.max.to_bits().to_le_bytes());
        h.update(&b[..56]);
    }
    h.finalize().into()
}

/// Which dimension a series is kept for, within one category.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Dim {
    /// Every record of the category.
    All,
    /// Records of the category without an entity.
    NoEntity,
    /// Records of the category with this entity (string id).
    Entity(u32),
    /// Records of the category from this producer (producer id); minute and hour tiers only.
    Producer(u32),
}

impl Dim {
    /// The finest tier kept for this dimension.
    pub(crate) fn first_tier(self) -> usize {
        match self {
            Dim::Producer(_) => 1,
            _ => 0,
        }
    }
}

/// A snapshot of a replica's totals and seen-sets, in canonical form (strings and producers
/// sorted), so two replicas holding the same batches have equal snapshots, byte for byte
/// once serialised. An empty replica bootstraps from one with [`Replica::restore`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Snapshot format version.
    pub format: u32,
    /// All category and entity strings, sorted.
    pub strings: Vec<String>,
    /// All producers, sorted.
    pub producers: Vec<ProducerKey>,
    /// Series sorted by (category string, dimension).
    pub series: Vec<SeriesSnapshot>,
    /// Seen-set and content hash per (producer, epoch).
    pub seen: Vec<(ProducerKey, u64, EpochSeen)>,
    /// Per tier, the time before which entries were pruned (`i64::MIN`: never).
    pub horizons: [i64; 3],
    /// The [`SetHash`] of every batch the snapshot covers (format 2 on).
    pub batches_hash: SetHash,
    /// How many batches `batches_hash` sums: every batch applied, including those of epochs
    /// expired since (format 4 on; before, the seen-sets' size).
    pub batches: u64,
    /// The shard groups whose whole state was merged into this one when they were drained
    /// ([`Snapshot::merge_disjoint`]), sorted (format 5 on).
    pub absorbed: Vec<String>,
}

/// Format 4 of [`Snapshot`], before it listed the groups it absorbed.
#[derive(Serialize, Deserialize)]
struct SnapshotV4 {
    format: u32,
    strings: Vec<String>,
    producers: Vec<ProducerKey>,
    series: Vec<SeriesSnapshot>,
    seen: Vec<(ProducerKey, u64, EpochSeen)>,
    horizons: [i64; 3],
    batches_hash: SetHash,
    batches: u64,
}

/// An epoch's seen-set in a format 3 [`Snapshot`], before it kept the lateness horizon.
#[derive(Serialize, Deserialize)]
struct EpochSeenV3 {
    seqs: SeenSet,
    hash: Option<[u8; 16]>,
}

/// Format 3 of [`Snapshot`], before epochs kept their lateness horizon.
#[derive(Serialize, Deserialize)]
struct SnapshotV3 {
    format: u32,
    strings: Vec<String>,
    producers: Vec<ProducerKey>,
    series: Vec<SeriesSnapshot>,
    seen: Vec<(ProducerKey, u64, EpochSeenV3)>,
    horizons: [i64; 3],
    batches_hash: SetHash,
}

/// Format 2 of [`Snapshot`], before it kept a content hash per epoch.
#[derive(Serialize, Deserialize)]
struct SnapshotV2 {
    format: u32,
    strings: Vec<String>,
    producers: Vec<ProducerKey>,
    series: Vec<SeriesSnapshot>,
    seen: Vec<(ProducerKey, u64, SeenSet)>,
    horizons: [i64; 3],
    batches_hash: SetHash,
}

/// Seen-sets of a format 1 or 2 snapshot: their content hashes are not known.
fn unhashed(seen: Vec<(ProducerKey, u64, SeenSet)>) -> Vec<(ProducerKey, u64, EpochSeen)> {
    seen.into_iter()
        .map(|(p, e, seqs)| {
            (
                p,
                e,
                EpochSeen {
                    seqs,
                    hash: None,
                    horizon_ms: HORIZON_UNKNOWN,
                },
            )
        })
        .collect()
}

/// The batches a snapshot of format 3 or older covers: its seen-sets' size (no epoch had
/// expired then).
fn seen_size(seen: &[(ProducerKey, u64, EpochSeen)]) -> u64 {
    seen.iter()
        .fold(0u64, |n, (_, _, e)| n.saturating_add(e.seqs.len()))
}

/// Format 1 of [`Snapshot`], before it carried `batches_hash`.
#[derive(Serialize, Deserialize)]
struct SnapshotV1 {
    format: u32,
    strings: Vec<String>,
    producers: Vec<ProducerKey>,
    series: Vec<SeriesSnapshot>,
    seen: Vec<(ProducerKey, u64, SeenSet)>,
    horizons: [i64; 3],
}

impl Snapshot {
    /// Encodes the snapshot (postcard).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes a snapshot of format 3, 2 (without per-epoch content hashes: they are not
    /// known, and never compared) or 1 (whose batches' content is not known any more: its set
    /// hash is seeded with the digest of its own canonical bytes, so equal format-1 snapshots
    /// still give equal hashes).
    pub fn decode(bytes: &[u8]) -> Result<Snapshot, String> {
        match bytes.first() {
            Some(4) => {
                let v4: SnapshotV4 =
                    postcard::from_bytes(bytes).map_err(|e| format!("snapshot (format 4): {e}"))?;
                Ok(Snapshot {
                    format: SNAPSHOT_FORMAT,
                    strings: v4.strings,
                    producers: v4.producers,
                    series: v4.series,
                    seen: v4.seen,
                    horizons: v4.horizons,
                    batches_hash: v4.batches_hash,
                    batches: v4.batches,
                    absorbed: Vec::new(),
                })
            }
            Some(3) => {
                let v3: SnapshotV3 =
                    postcard::from_bytes(bytes).map_err(|e| format!("snapshot (format 3): {e}"))?;
                let seen: Vec<_> = v3
                    .seen
                    .into_iter()
                    .map(|(p, e, s)| {
                        (
                            p,
                            e,
                            EpochSeen {
                                seqs: s.seqs,
                                hash: s.hash,
                                horizon_ms: HORIZON_UNKNOWN,
                            },
                        )
                    })
                    .collect();
                Ok(Snapshot {
                    format: SNAPSHOT_FORMAT,
                    strings: v3.strings,
                    producers: v3.producers,
                    series: v3.series,
                    batches: seen_size(&seen),
                    seen,
                    horizons: v3.horizons,
                    batches_hash: v3.batches_hash,
                    absorbed: Vec::new(),
                })
            }
            Some(2) => {
                let v2: SnapshotV2 =
                    postcard::from_bytes(bytes).map_err(|e| format!("snapshot (format 2): {e}"))?;
                let seen = unhashed(v2.seen);
                Ok(Snapshot {
                    format: SNAPSHOT_FORMAT,
                    strings: v2.strings,
                    producers: v2.producers,
                    series: v2.series,
                    batches: seen_size(&seen),
                    seen,
                    horizons: v2.horizons,
                    batches_hash: v2.batches_hash,
                    absorbed: Vec::new(),
                })
            }
            Some(1) => {
                let v1: SnapshotV1 =
                    postcard::from_bytes(bytes).map_err(|e| format!("snapshot (format 1): {e}"))?;
                use sha2::{Digest as _, Sha256};
                let mut seed = SetHash::default();
                // Seeded from the canonical bytes without the (local) retention horizons.
                let horizons = v1.horizons;
                let canon = SnapshotV1 {
                    horizons: [i64::MIN; 3],
                    ..v1
                };
                seed.add(&Sha256::digest(postcard::to_allocvec(&canon).unwrap_or_default()).into());
                let seen = unhashed(canon.seen);
                Ok(Snapshot {
                    format: SNAPSHOT_FORMAT,
                    strings: canon.strings,
                    producers: canon.producers,
                    series: canon.series,
                    batches: seen_size(&seen),
                    seen,
                    horizons,
                    batches_hash: seed,
                    absorbed: Vec::new(),
                })
            }
            _ => postcard::from_bytes(bytes).map_err(|e| format!("snapshot: {e}")),
        }
    }
    /// The batch ids the snapshot covers.
    pub fn digest(&self) -> Digest {
        Digest {
            epochs: self
                .seen
                .iter()
                .map(|(p, e, s)| ((*p, *e), s.clone()))
                .collect(),
        }
    }
}

impl Snapshot {
    /// The snapshot of the union of two *disjoint* sets of batches — this snapshot's and
    /// `other`'s, the state of the drained shard group `name` — as if one replica had applied
    /// them all: counts and exact sums add, min/max combine, seen-sets unite, the set hashes
    /// add (so the state hash is the one of the union). Shard groups hold disjoint batches
    /// (a batch belongs to the group that owns it at its creation time), which is what makes
    /// this exact; an epoch holding one seq on both sides, or a group absorbed twice, is
    /// refused rather than counted twice. Retention horizons take the later of the two.
    pub fn merge_disjoint(self, other: Snapshot, name: &str) -> Result<Snapshot, String> {
        if self.format != SNAPSHOT_FORMAT || other.format != SNAPSHOT_FORMAT {
            return Err("snapshot formats differ".into());
        }
        if self
            .absorbed
            .iter()
            .chain(&other.absorbed)
            .any(|g| g == name)
            || self.absorbed.iter().any(|g| other.absorbed.contains(g))
        {
            return Err(format!(
                "group {name:?} (or one it absorbed) is absorbed already"
            ));
        }
        let mut strings: Vec<String> = self.strings.iter().chain(&other.strings).cloned().collect();
        strings.sort_unstable();
        strings.dedup();
        let mut producers: Vec<ProducerKey> = self
            .producers
            .iter()
            .chain(&other.producers)
            .copied()
            .collect();
        producers.sort_unstable();
        producers.dedup();
        let remap = |from: &[String]| -> Vec<u32> {
            from.iter()
                .map(|s| strings.binary_search(s).unwrap_or(0) as u32)
                .collect()
        };
        let premap = |from: &[ProducerKey]| -> Vec<u32> {
            from.iter()
                .map(|p| producers.binary_search(p).unwrap_or(0) as u32)
                .collect()
        };
        type Tiers = [BTreeMap<i64, Total>; 3];
        let mut series: BTreeMap<(u32, Dim), Tiers> = BTreeMap::new();
        let mut seen: BTreeMap<(ProducerKey, u64), EpochSeen> = BTreeMap::new();
        let mut absorbed = vec![name.to_string()];
        let horizons = [0, 1, 2].map(|t| self.horizons[t].max(other.horizons[t]));
        let mut batches_hash = self.batches_hash;
        batches_hash.add(&other.batches_hash.0);
        let batches = self.batches.saturating_add(other.batches);
        for snap in [self, other] {
            let (rs, rp) = (remap(&snap.strings), premap(&snap.producers));
            for s in snap.series {
                let str_at = |i: u32| rs.get(i as usize).copied();
                let cat = str_at(s.category).ok_or("series index out of range")?;
                let dim = match s.dim {
                    Dim::Entity(e) => Dim::Entity(str_at(e).ok_or("series index out of range")?),
                    Dim::Producer(p) => Dim::Producer(
                        rp.get(p as usize)
                            .copied()
                            .ok_or("series index out of range")?,
                    ),
                    d => d,
                };
                let tiers = series.entry((cat, dim)).or_default();
                for (t, entries) in s.tiers.into_iter().enumerate() {
                    for (start, total) in entries {
                        tiers[t].entry(start).or_insert(Total::EMPTY).merge(&total);
                    }
                }
            }
            for (p, e, set) in snap.seen {
                match seen.entry((p, e)) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(set);
                    }
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        let mine = o.get_mut();
                        let n = mine.seqs.len().saturating_add(set.seqs.len());
                        mine.seqs.union(&set.seqs);
                        if mine.seqs.len() != n {
                            return Err("a batch id is in both states".into());
                        }
                        mine.hash = match (mine.hash, set.hash) {
                            (Some(a), Some(b)) => Some(
                                u128::from_le_bytes(a)
                                    .wrapping_add(u128::from_le_bytes(b))
                                    .to_le_bytes(),
                            ),
                            _ => None,
                        };
                        mine.horizon_ms = mine.horizon_ms.max(set.horizon_ms);
                    }
                }
            }
            absorbed.extend(snap.absorbed);
        }
        absorbed.sort_unstable();
        Ok(Snapshot {
            format: SNAPSHOT_FORMAT,
            series: series
                .into_iter()
                .map(|((category, dim), tiers)| SeriesSnapshot {
                    category,
                    dim,
                    tiers: tiers.map(|t| t.into_iter().collect()),
                })
                .collect(),
            seen: seen.into_iter().map(|((p, e), s)| (p, e, s)).collect(),
            strings,
            producers,
            horizons,
            batches_hash,
            batches,
            absorbed,
        })
    }
}

/// One series in a [`Snapshot`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeriesSnapshot {
    /// Category string index.
    pub category: u32,
    /// Dimension, with ids into the snapshot's tables.
    pub dim: Dim,
    /// Per tier: (bucket start ms, totals), ascending.
    pub tiers: [Vec<(i64, Total)>; 3],
}

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RestoreError {
    /// The snapshot format is not one this build reads.
    #[error("unsupported snapshot format {0}")]
    Format(u32),
    /// An index points outside its table, or a table is not sorted and unique.
    #[error("snapshot is inconsistent: {0}")]
    Inconsistent(&'static str),
}

const SNAPSHOT_FORMAT: u32 = 5;

/// What a batch would add to a replica's state (see [`Replica::novelty`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Novelty {
    /// Categories the state does not hold yet.
    pub categories: u32,
    /// (category, entity) series the state does not hold yet.
    pub entities: u32,
    /// Series of every kind the state does not hold yet.
    pub series: u32,
}

/// Estimated heap bytes of a [`Replica`], by kind ([`Replica::memory`]): sizes of what is
/// held times the counts kept current by apply, expiry and pruning, so O(1) to read. Allocator
/// overhead and spare capacity are left out, except hash tables' and B-trees' typical fill.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Seen-sets: one per live (producer, epoch).
    pub seen: u64,
    /// Producer keys and their index.
    pub producers: u64,
    /// Series headers and their indexes (per category, entity, producer).
    pub series: u64,
    /// Tier entries (bucket totals) of every series.
    pub entries: u64,
    /// Category and entity strings.
    pub strings: u64,
    /// Batches retained for peers (decoded and signed bytes).
    pub log: u64,
}

impl Memory {
    /// The sum of every kind.
    pub fn total(&self) -> u64 {
        self.seen + self.producers + self.series + self.entries + self.strings + self.log
    }

    /// `(kind, bytes)` for each kind, in a fixed order (the `/metrics` labels).
    pub fn by_kind(&self) -> [(&'static str, u64); 6] {
        [
            ("seen", self.seen),
            ("producers", self.producers),
            ("series", self.series),
            ("entries", self.entries),
            ("strings", self.strings),
            ("log", self.log),
        ]
    }
}

/// Whether an adopting replica keeps a retained entry the snapshot covers, given how the
/// snapshot (`theirs`) and the replica (`mine`) hold its epoch. Kept unless both hold the same
/// seqs with different contents: then the snapshot counted another content for some batch of
/// the epoch (an equivocation), and this copy may be the one it did not count. When the
/// snapshot holds more seqs of the epoch, the entry is kept: dropping it lost batches for
/// good when the snapshot's node had pruned them too (for peers it had excluded) — replicas
/// then held seen-sets neither of which covered the other, and never converged (seeds 7814
/// and 11363 of the simulation, run 20× wider than CI). A copy whose content the snapshot did
/// not count can only come from an equivocating producer; a peer that applies it diverges
/// from the rest on that epoch, which the round's divergence repair settles.
fn keeps_retained(theirs: Option<&EpochSeen>, mine: Option<&EpochSeen>) -> bool {
    match (theirs, mine) {
        (Some(t), Some(m)) => t.seqs != m.seqs || t.hash == m.hash,
        _ => false,
    }
}

/// Heap bytes of one retained batch, estimated.
fn log_entry_bytes(e: &LogEntry) -> u64 {
    use std::mem::size_of;
    let b = &e.batch;
    let strings: usize = b.strings.iter().map(|s| s.len() + 4).sum();
    (e.raw.len()
        + b.summaries.len() * size_of::<crate::batch::BatchSummary>()
        + strings
        + size_of::<Batch>()
        + 2 * size_of::<(BatchId, LogEntry)>()) as u64
}

/// A merger's state.
#[derive(Debug, Default)]
pub struct Replica {
    pub(crate) strings: Interner,
    pub(crate) producers: KeyIndex,
    pub(crate) series: Vec<Series>,
    pub(crate) series_ids: FxHashMap<(u32, Dim), u32>,
    /// Per category, the series of each dimension other than `All`, for top-k and grouping.
    pub(crate) by_category: FxHashMap<u32, Vec<(Dim, u32)>>,
    /// Per category, the per-producer rollups (the `Dim::Producer` series of a snapshot).
    pub(crate) rollups: FxHashMap<u32, Rollups>,
    /// The (category, producer) pairs the rollups hold, `category << 32 | producer`: each
    /// counts as one series (the series cap, `series_count`).
    producer_pairs: rustc_hash::FxHashSet<u64>,
    seen: BTreeMap<(ProducerKey, u64), EpochSeen>,
    log: BTreeMap<BatchId, LogEntry>,
    peers: BTreeMap<String, Digest>,
    pub(crate) horizons: [i64; 3],
    applied: u64,
    /// The set hash of every batch applied (or covered by the snapshot restored).
    batches_hash: SetHash,
    /// How many batches `batches_hash` sums (expiry does not lower it).
    hashed_batches: u64,
    /// Batches the seen-sets cover.
    seen_batches: u64,
    /// Epochs expired since this replica was created.
    expired_epochs: u64,
    /// Estimated heap bytes of the retained log.
    log_bytes: u64,
    /// Tier entries held.
    entries: u64,
    /// What the last `apply` added (reset at each apply).
    last_novelty: Novelty,
    /// Drained shard groups whose state was merged into this one, sorted.
    absorbed: Vec<String>,
    /// Rollup buckets ending at or before this were shrunk (`shrink_closed_rollups`).
    rollups_shrunk_before: i64,
}

impl Replica {
    /// An empty replica.
    pub fn new() -> Replica {
        Replica {
            horizons: [i64::MIN; 3],
            rollups_shrunk_before: i64::MIN,
            ..Default::default()
        }
    }

    /// Re-keys the hashes of the string and producer-key indexes (pass random keys: both come
    /// from the network, and fixed keys would let crafted collisions flood the tables).
    pub fn set_string_hash_keys(&mut self, k0: u64, k1: u64) {
        self.strings.set_keys(k0, k1);
        self.producers
            .set_keys(k1 ^ 0x9e37_79b9_7f4a_7c15, k0.rotate_left(17));
    }

    pub(crate) fn string_id(&self, s: &str) -> Option<u32> {
        self.strings.id(s)
    }

    fn producer_id(&mut self, p: ProducerKey) -> u32 {
        self.producers.intern(p)
    }

    /// Adds to producer `pid`'s rollups of `cat`, counting a new (category, producer) pair as
    /// a new series.
    fn add_rollup(&mut self, cat: u32, pid: u32, start_ms: i64, t: &Total, created: &mut u64) {
        if self.producer_pairs.insert((cat as u64) << 32 | pid as u64) {
            self.last_novelty.series += 1;
        }
        self.rollups
            .entry(cat)
            .or_default()
            .add(start_ms, pid, t, created);
    }

    fn series_mut(&mut self, cat: u32, dim: Dim) -> &mut Series {
        let idx = self.series_index(cat, dim);
        &mut self.series[idx as usize]
    }

    fn series_index(&mut self, cat: u32, dim: Dim) -> u32 {
        let next = self.series.len() as u32;
        let idx = *self.series_ids.entry((cat, dim)).or_insert(next);
        if idx == next {
            self.series.push(Series::default());
            if dim != Dim::All {
                self.by_category.entry(cat).or_default().push((dim, idx));
            }
            let n = &mut self.last_novelty;
            n.series += 1;
            match dim {
                Dim::All => n.categories += 1,
                Dim::Entity(_) => n.entities += 1,
                _ => {}
            }
        }
        idx
    }

    /// What the last [`Replica::apply`] added to the state (zero if it added nothing: a
    /// duplicate or a refusal): what [`Replica::novelty`] predicted for it.
    pub fn last_novelty(&self) -> Novelty {
        self.last_novelty
    }

    /// Whether batch `id` has been applied.
    pub fn has_applied(&self, id: &BatchId) -> bool {
        self.seen
            .get(&(id.producer, id.epoch))
            .is_some_and(|s| s.seqs.contains(id.seq))
    }

    /// Number of distinct batches applied since this replica was created or restored.
    pub fn applied_count(&self) -> u64 {
        self.applied
    }

    /// Applies a batch that passed [`Batch::check`]: all of its summaries or, on error, none;
    /// at most once per [`BatchId`]. The entry is kept in the replication log.
    pub fn apply(&mut self, entry: LogEntry) -> Result<Applied, RejectCode> {
        if self.has_applied(&entry.batch.id) {
            self.last_novelty = Novelty::default();
            return Ok(Applied::Duplicate);
        }
        let digest = batch_digest(&entry.batch, &entry.raw);
        self.apply_with_digest(entry, &digest)
    }

    /// [`Replica::apply`] with the batch's [`batch_digest`] computed beforehand (the merger
    /// computes it on its verification threads, from the signed bytes, which its retained
    /// log may not keep). Passing any other value corrupts the state hash.
    pub fn apply_with_digest(
        &mut self,
        entry: LogEntry,
        digest: &[u8; 32],
    ) -> Result<Applied, RejectCode> {
        self.last_novelty = Novelty::default();
        let batch = &entry.batch;
        let id = batch.id;
        if self.has_applied(&id) {
            return Ok(Applied::Duplicate);
        }
        if id.seq == u64::MAX {
            return Err(RejectCode::InvalidSeq);
        }
        // Bounds are checked up front so that nothing is half-applied.
        let n = batch.strings.len() as u32;
        if batch
            .summaries
            .iter()
            .any(|s| s.category >= n || s.entity > n)
        {
            return Err(RejectCode::BadStringIndex);
        }
        let ids: Vec<u32> = batch
            .strings
            .iter()
            .map(|s| self.strings.intern(s))
            .collect();
        let pid = self.producer_id(id.producer);
        let bucket_ms = batch.bucket_ms as i64;
        // The per-category and per-producer rollups of a batch are folded first: a batch's
        // summaries share few (category, bucket) pairs, so this turns most rollup updates
        // into one. Folding is exact (every field merges associatively), so the state is the
        // same bit for bit.
        // Every series is found first, then updated: lookups that do not wait on each other
        // overlap their cache misses, which dominate once the key space outgrows the caches.
        let series: Vec<u32> = batch
            .summaries
            .iter()
            .map(|s| {
                let cat = ids[s.category as usize];
                let dim = match s.entity {
                    NO_ENTITY => Dim::NoEntity,
                    e => Dim::Entity(ids[e as usize - 1]),
                };
                self.series_index(cat, dim)
            })
            .collect();
        let mut rollup: FxHashMap<(u32, i64), Total> = FxHashMap::default();
        let mut created = 0u64;
        for (s, &idx) in batch.summaries.iter().zip(&series) {
            let start = s.bucket.saturating_mul(bucket_ms);
            self.series[idx as usize].add(start, 0, &s.summary, &mut created);
            rollup
                .entry((ids[s.category as usize], start))
                .or_insert(Total::EMPTY)
                .add(&s.summary);
        }
        for ((cat, start), total) in rollup {
            self.series_mut(cat, Dim::All)
                .add_total(start, 0, &total, &mut created);
            self.add_rollup(cat, pid, start, &total, &mut created);
        }
        self.seen
            .entry((id.producer, id.epoch))
            .or_insert_with(|| EpochSeen {
                seqs: SeenSet::new(),
                hash: Some([0; 16]),
                horizon_ms: i64::MIN,
            })
            .add(id.seq, digest, batch.oldest_end_ms());
        self.applied += 1;
        self.seen_batches += 1;
        self.hashed_batches += 1;
        self.entries += created;
        self.batches_hash.add(digest);
        self.log_bytes += log_entry_bytes(&entry);
        self.log.insert(id, entry);
        Ok(Applied::New)
    }

    /// The digest of everything applied.
    pub fn digest(&self) -> Digest {
        Digest {
            epochs: self.seen.clone(),
        }
    }

    /// How many batches the digest would cover, without building it (O(1)).
    pub fn digest_batches(&self) -> u64 {
        self.seen_batches
    }

    /// The state hash: SHA-256 of the [`SetHash`] of every batch this replica holds. Equal on
    /// two replicas iff they hold the same batches with the same content — and so identical
    /// totals (retention aside). O(1): kept current by `apply`.
    pub fn state_hash(&self) -> [u8; 32] {
        use sha2::{Digest as _, Sha256};
        let mut h = Sha256::new();
        h.update(b"edgetally/state/v2\0");
        h.update(self.batches_hash.0);
        h.update(self.hashed_batches.to_le_bytes());
        h.finalize().into()
    }

    /// The retained batches that a replica with `digest` lacks, in id order.
    pub fn missing_for(&self, digest: &Digest) -> Vec<LogEntry> {
        self.log
            .iter()
            .filter(|(id, _)| !digest.contains(id))
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Merges another replica's retained batches into this one (state-based merge).
    pub fn merge_from(&mut self, other: &Replica) -> Result<u64, RejectCode> {
        let mut n = 0;
        for e in other.missing_for(&self.digest()) {
            if self.apply(e)? == Applied::New {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Number of batches retained for replication.
    pub fn log_len(&self) -> usize {
        self.log.len()
    }

    /// The retained log, in id order.
    pub fn log(&self) -> impl Iterator<Item = &LogEntry> {
        self.log.values()
    }

    /// Declares the set of peers whose digests gate log pruning. Peers no longer listed are
    /// forgotten; new ones start with an empty digest (so they hold back pruning until heard).
    pub fn set_peers<I: IntoIterator<Item = String>>(&mut self, peers: I) {
        let mut next = BTreeMap::new();
        for p in peers {
            let d = self.peers.remove(&p).unwrap_or_default();
            next.insert(p, d);
        }
        self.peers = next;
    }

    /// Records the latest digest heard from `peer` (ignored if the peer is not declared).
    pub fn observe_peer(&mut self, peer: &str, digest: Digest) {
        if let Some(d) = self.peers.get_mut(peer) {
            *d = digest;
        }
    }

    /// The digest last heard from each declared peer.
    pub fn peer_digests(&self) -> &BTreeMap<String, Digest> {
        &self.peers
    }

    /// How many retained batches `peer` still lacks, by its last digest.
    pub fn lag_of(&self, peer: &str) -> Option<usize> {
        let d = self.peers.get(peer)?;
        Some(self.log.keys().filter(|id| !d.contains(id)).count())
    }

    /// Expires the seen-sets of the epochs whose lateness horizon is at or before `cutoff_ms`
    /// (and drops their retained batches), returning their keys. The merger passes
    /// `now − max_lateness − margin`: every batch those epochs applied is then refused by the
    /// time check before a seen-set is consulted (docs/design/replication.md, "Seen-set expiry"), so
    /// forgetting them cannot count a batch twice. The totals keep what they applied, and the
    /// state hash still covers them. Returned with the seqs they had applied, in key order
    /// (the merger drops exactly those batches from its store at the next compaction).
    pub fn expire(&mut self, cutoff_ms: i64) -> Vec<((ProducerKey, u64), SeenSet)> {
        // In place: the live epochs (nearly all of them, at every sweep) are neither moved nor
        // reallocated under the write lock.
        self.shrink_closed_rollups(cutoff_ms);
        let mut gone = Vec::new();
        self.seen.retain(|&key, e| {
            let live = e.horizon_ms > cutoff_ms;
            if !live {
                gone.push((key, std::mem::take(&mut e.seqs)));
            }
            live
        });
        if !gone.is_empty() {
            let dropped = gone
                .iter()
                .fold(0u64, |n, (_, s)| n.saturating_add(s.len()));
            self.seen_batches = self.seen_batches.saturating_sub(dropped);
            self.expired_epochs += gone.len() as u64;
            // `gone` is in key order (the map's).
            self.retain_log(|id| {
                gone.binary_search_by(|(k, _)| k.cmp(&(id.producer, id.epoch)))
                    .is_err()
            });
        }
        gone
    }

    /// Shrinks the rollup tables of buckets that ended at or before `cutoff_ms` (no batch
    /// adding to them is accepted any more: the lateness argument of [`Replica::expire`]) and
    /// after the previous call's cutoff, so each bucket is shrunk once.
    fn shrink_closed_rollups(&mut self, cutoff_ms: i64) {
        let since = self.rollups_shrunk_before;
        if cutoff_ms <= since {
            return;
        }
        for r in self.rollups.values_mut() {
            for (tier, res) in r.tiers.iter_mut().zip([TIER_MS[1], TIER_MS[2]]) {
                tier.iter_mut()
                    .rev()
                    .skip_while(|(start, _)| start.saturating_add(res) > cutoff_ms)
                    .take_while(|(start, _)| start.saturating_add(res) > since)
                    .for_each(|(_, table)| table.shrink());
            }
        }
        self.rollups_shrunk_before = cutoff_ms;
    }

    /// Keeps the retained batches `keep` says to, keeping the log's byte estimate current.
    fn retain_log(&mut self, keep: impl Fn(&BatchId) -> bool) {
        let mut freed = 0;
        self.log.retain(|id, e| {
            let k = keep(id);
            if !k {
                freed += log_entry_bytes(e);
            }
            k
        });
        self.log_bytes = self.log_bytes.saturating_sub(freed);
    }

    /// Gives every epoch whose horizon is [`HORIZON_UNKNOWN`] (restored from a snapshot that
    /// did not keep it) the horizon `bound_ms`, which must be at least the oldest bucket end
    /// of any batch applied before (the merger passes its clock at start-up plus
    /// `max_future_skew` and the widest bucket, 1 day). Returns how many.
    pub fn bound_unknown_horizons(&mut self, bound_ms: i64) -> usize {
        let mut n = 0;
        for e in self.seen.values_mut() {
            if e.horizon_ms == HORIZON_UNKNOWN {
                e.horizon_ms = bound_ms;
                n += 1;
            }
        }
        n
    }

    /// Epochs expired (by [`Replica::expire`]) since this replica was created or restored.
    pub fn expired_epochs(&self) -> u64 {
        self.expired_epochs
    }

    /// Drops every retained batch that all declared peers hold; returns how many.
    /// With no peers declared, nothing needs retaining and everything is dropped.
    pub fn prune_log(&mut self) -> usize {
        let before = self.log.len();
        let peers = std::mem::take(&mut self.peers);
        self.retain_log(|id| !peers.values().all(|d| d.contains(id)));
        self.peers = peers;
        before - self.log.len()
    }

    /// Removes tier entries older than the retention allows at `now_ms`; returns how many.
    /// Horizons are aligned to the next coarser tier, so a query can always switch tiers at
    /// a horizon (the hour tier's to the hour).
    pub fn prune_tiers(&mut self, now_ms: i64, retention: &Retention) -> usize {
        let mut removed = 0;
        let mut rollups_dropped = false;
        for t in 0..3 {
            let Some(keep) = retention.tiers[t] else {
                continue;
            };
            // The hour tier has no coarser tier: it is cut at its own width.
            let align = TIER_MS[(t + 1).min(2)];
            let cutoff = now_ms.saturating_sub(keep).div_euclid(align) * align;
            if cutoff <= self.horizons[t] {
                continue;
            }
            self.horizons[t] = cutoff;
            for s in &mut self.series {
                removed += s.tiers[t].drop_before(cutoff);
            }
            if t > 0 {
                let before = removed;
                for r in self.rollups.values_mut() {
                    removed += r.drop_before(t, cutoff);
                }
                rollups_dropped |= removed > before;
            }
        }
        self.entries = self.entries.saturating_sub(removed as u64);
        if rollups_dropped {
            self.reclaim_producers();
        }
        removed
    }

    /// Forgets what retention left no data for: (category, producer) pairs with no rollup
    /// entry any more, categories with no rollup bucket, and producer ids no pair uses (their
    /// keys leave the index and the ids are handed out again). Runs after retention dropped
    /// rollup buckets — O(rollup entries), at most once per minute-tier boundary — so memory
    /// for producers follows the producers retention still holds data of, not every producer
    /// ever seen. Totals, seen-sets and the state hash are untouched.
    fn reclaim_producers(&mut self) {
        let mut live: rustc_hash::FxHashSet<u64> = Default::default();
        self.rollups.retain(|&cat, r| {
            for tier in &r.tiers {
                for (_, table) in tier {
                    for (pid, _) in table.iter() {
                        live.insert((cat as u64) << 32 | pid as u64);
                    }
                }
            }
            r.tiers.iter().any(|t| !t.is_empty())
        });
        self.producer_pairs.retain(|p| live.contains(p));
        self.producer_pairs.shrink_to_fit();
        let mut used = vec![false; self.producers.len()];
        for &pair in &self.producer_pairs {
            if let Some(u) = used.get_mut(pair as u32 as usize) {
                *u = true;
            }
        }
        for (pid, used) in used.into_iter().enumerate() {
            if !used {
                self.producers.release(pid as u32);
            }
        }
    }

    /// Producer keys held in the index (those with per-producer data left); for tests and
    /// memory figures.
    pub fn producers_held(&self) -> usize {
        self.producers.live()
    }

    /// A canonical snapshot of totals and seen-sets (not the log).
    pub fn snapshot(&self) -> Snapshot {
        let canon = encode::Canon::of(self);
        let mut series: Vec<SeriesSnapshot> = self
            .series_ids
            .iter()
            .map(|(&(cat, dim), &idx)| {
                let s = &self.series[idx as usize];
                SeriesSnapshot {
                    category: canon.remap[cat as usize],
                    dim: canon.dim(dim),
                    tiers: [0, 1, 2].map(|t| s.tiers[t].iter().copied().collect()),
                }
            })
            .collect();
        let encode::Canon {
            order,
            remap,
            porder,
            premap,
        } = canon;
        // The rollups, as one series per (category, producer) pair: the snapshot's form does
        // not depend on how a replica lays them out in memory.
        let mut pairs: FxHashMap<u64, usize> = FxHashMap::default();
        for &pair in &self.producer_pairs {
            let (cat, pid) = ((pair >> 32) as u32, pair as u32);
            pairs.insert(pair, series.len());
            series.push(SeriesSnapshot {
                category: remap[cat as usize],
                dim: Dim::Producer(premap[pid as usize]),
                tiers: Default::default(),
            });
        }
        for (&cat, r) in &self.rollups {
            for (t, tier) in r.tiers.iter().enumerate() {
                for (start, table) in tier {
                    for (pid, total) in table.iter() {
                        if let Some(&i) = pairs.get(&((cat as u64) << 32 | pid as u64)) {
                            series[i].tiers[t + 1].push((*start, *total));
                        }
                    }
                }
            }
        }
        series.sort_by_key(|s| (s.category, s.dim));
        Snapshot {
            format: SNAPSHOT_FORMAT,
            strings: order
                .iter()
                .map(|&i| self.strings.get(i).to_string())
                .collect(),
            producers: porder.iter().map(|&i| self.producers.get(i)).collect(),
            series,
            seen: self
                .seen
                .iter()
                .map(|(&(p, e), s)| (p, e, s.clone()))
                .collect(),
            horizons: self.horizons,
            batches_hash: self.batches_hash,
            batches: self.hashed_batches,
            absorbed: self.absorbed.clone(),
        }
    }

    /// Rebuilds a replica from a snapshot (its log starts empty).
    pub fn restore(snap: Snapshot) -> Result<Replica, RestoreError> {
        if snap.format != SNAPSHOT_FORMAT {
            return Err(RestoreError::Format(snap.format));
        }
        if snap.strings.windows(2).any(|w| w[0] >= w[1]) {
            return Err(RestoreError::Inconsistent("strings not sorted and unique"));
        }
        if snap.producers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(RestoreError::Inconsistent(
                "producers not sorted and unique",
            ));
        }
        let mut r = Replica::new();
        r.horizons = snap.horizons;
        r.batches_hash = snap.batches_hash;
        r.hashed_batches = snap.batches;
        if snap.absorbed.windows(2).any(|w| w[0] >= w[1]) {
            return Err(RestoreError::Inconsistent(
                "absorbed groups not sorted and unique",
            ));
        }
        r.absorbed = snap.absorbed;
        for s in &snap.strings {
            r.strings.intern(s);
        }
        for &p in &snap.producers {
            r.producer_id(p);
        }
        let ns = snap.strings.len() as u32;
        let np = snap.producers.len() as u32;
        for s in snap.series {
            let ok = s.category < ns
                && match s.dim {
                    Dim::Entity(e) => e < ns,
                    Dim::Producer(p) => p < np,
                    _ => true,
                };
            if !ok {
                return Err(RestoreError::Inconsistent("series index out of range"));
            }
            if let Dim::Producer(p) = s.dim {
                if !r
                    .producer_pairs
                    .insert((s.category as u64) << 32 | p as u64)
                {
                    return Err(RestoreError::Inconsistent("series listed twice"));
                }
                let [seconds, minutes, hours] = s.tiers;
                if !seconds.is_empty() {
                    return Err(RestoreError::Inconsistent(
                        "producer series with second entries",
                    ));
                }
                let rollups = r.rollups.entry(s.category).or_default();
                for (t, entries) in [minutes, hours].into_iter().enumerate() {
                    if entries.windows(2).any(|w| w[0].0 >= w[1].0) {
                        return Err(RestoreError::Inconsistent("tier entries not ascending"));
                    }
                    r.entries += entries.len() as u64;
                    for (start, total) in entries {
                        Rollups::bucket(&mut rollups.tiers[t], start).add(p, &total);
                    }
                }
                continue;
            }
            if r.series_ids.contains_key(&(s.category, s.dim)) {
                return Err(RestoreError::Inconsistent("series listed twice"));
            }
            r.entries += s.tiers.iter().map(|t| t.len() as u64).sum::<u64>();
            let series = r.series_mut(s.category, s.dim);
            for (t, entries) in s.tiers.into_iter().enumerate() {
                series.tiers[t] = Tier::from_sorted(entries)
                    .ok_or(RestoreError::Inconsistent("tier entries not ascending"))?;
            }
        }
        for (p, e, set) in snap.seen {
            if !set.seqs.is_well_formed() {
                return Err(RestoreError::Inconsistent("seen-set malformed"));
            }
            r.seen_batches = r.seen_batches.saturating_add(set.seqs.len());
            r.seen.insert((p, e), set);
        }
        Ok(r)
    }

    /// This replica's state with `snap` adopted in place of what it covers: the snapshot's
    /// totals, plus every retained batch of this replica that the snapshot does not cover,
    /// applied again. Retained batches the snapshot covers stay retained where the snapshot
    /// holds their epoch exactly as this replica does (same seqs and content hash). How a replica repairs a divergence (PROTOCOL.md §9) while ingest goes
    /// on. `None` when the result would lose a batch this replica holds (one the snapshot
    /// does not cover and the log no longer retains): then nothing is adopted.
    /// The peers and their last digests carry over; the string hash keys do not (re-key).
    pub fn adopt(&self, snap: Snapshot) -> Result<Option<Replica>, RestoreError> {
        let covered = snap.digest();
        let mut fresh = Replica::restore(snap)?;
        fresh.peers = self.peers.clone();
        for (id, e) in &self.log {
            let key = (id.producer, id.epoch);
            if !covered.contains(id) {
                if fresh.apply(e.clone()).is_err() {
                    return Ok(None);
                }
            } else if keeps_retained(covered.epochs.get(&key), self.seen.get(&key)) {
                // The snapshot holds the batch too: the entry stays retained for the peers that
                // still lack it (the snapshot's node may have pruned it, excluding them).
                fresh.log_bytes += log_entry_bytes(e);
                fresh.log.insert(*id, e.clone());
            }
        }
        if !fresh.digest().covers(&self.digest()) {
            return Ok(None);
        }
        Ok(Some(fresh))
    }

    /// Tier entries counted one by one (what [`Replica::entry_count`] keeps current; tests
    /// compare the two).
    #[doc(hidden)]
    pub fn entry_count_exact(&self) -> usize {
        self.series
            .iter()
            .map(|s| s.tiers.iter().map(Tier::len).sum::<usize>())
            .sum::<usize>()
            + self.rollups.values().map(Rollups::entries).sum::<usize>()
    }

    /// Number of stored tier entries (a measure of memory); O(1).
    pub fn entry_count(&self) -> usize {
        self.entries as usize
    }

    /// Estimated heap bytes by kind (O(1); see [`Memory`]).
    pub fn memory(&self) -> Memory {
        use std::mem::size_of;
        // B-tree nodes run about 3/4 full; hash tables at most 7/8 (a control byte a slot).
        let btree = |entry: usize, n: usize| (entry * n * 4 / 3) as u64;
        let hash = |entry: usize, n: usize| ((entry + 1) * n * 8 / 7) as u64;
        let n_series = self.series.len();
        Memory {
            seen: btree(
                size_of::<((ProducerKey, u64), EpochSeen)>(),
                self.seen.len(),
            ),
            producers: self.producers.heap_bytes(),
            series: (self.series.capacity() * size_of::<Series>()) as u64
                + hash(size_of::<((u32, Dim), u32)>(), self.series_ids.len())
                + (n_series * size_of::<(Dim, u32)>()) as u64
                + hash(size_of::<(u32, Vec<(Dim, u32)>)>(), self.by_category.len())
                + hash(size_of::<u64>(), self.producer_pairs.len())
                + hash(size_of::<(u32, Rollups)>(), self.rollups.len()),
            // Rollup entries sit in hash tables (a producer id beside the totals); series
            // entries in dense buffers. Counted at the larger size.
            entries: self.entries * (size_of::<(u32, Total)>() as u64 + 1),
            strings: self.strings.heap_bytes(),
            log: self.log_bytes,
        }
    }

    /// The drained shard groups whose state this replica absorbed (sorted).
    pub fn absorbed(&self) -> &[String] {
        &self.absorbed
    }

    /// How many epochs of `producer` the seen-sets hold (O(their number)).
    pub fn epochs_of(&self, producer: &ProducerKey) -> usize {
        self.seen
            .range((*producer, 0)..=(*producer, u64::MAX))
            .count()
    }

    /// Every (producer, epoch) seen-set of the producers `keep` selects: what this replica
    /// applied of them (a topology hand-off sends these to the group that takes them over).
    pub fn seen_where(
        &self,
        mut keep: impl FnMut(&ProducerKey) -> bool,
    ) -> Vec<(ProducerKey, u64, SeenSet)> {
        self.seen
            .iter()
            .filter(|((p, _), _)| keep(p))
            .map(|((p, e), s)| (*p, *e, s.seqs.clone()))
            .collect()
    }

    /// The seqs applied of (producer, epoch), if any were.
    pub fn epoch_seqs(&self, producer: &ProducerKey, epoch: u64) -> Option<&SeenSet> {
        self.seen.get(&(*producer, epoch)).map(|s| &s.seqs)
    }

    /// Number of (producer, epoch) seen-sets.
    pub fn epoch_count(&self) -> usize {
        self.seen.len()
    }

    /// Number of series (one per category, per (category, entity), per category without an
    /// entity, and per (category, producer)): the measure of state the series cap bounds.
    pub fn series_count(&self) -> usize {
        self.series.len() + self.producer_pairs.len()
    }

    /// What applying `batch` would add to this state, without changing it: the merger's
    /// admission checks (quotas on new categories, entities and series) run on this before a
    /// batch is written.
    pub fn novelty(&self, batch: &Batch) -> Novelty {
        let ids: Vec<Option<u32>> = batch.strings.iter().map(|s| self.string_id(s)).collect();
        let id = |i: u32| ids.get(i as usize).copied().flatten();
        let pid = self.producers.id(&batch.id.producer);
        let has = |cat: Option<u32>, dim: Option<Dim>| match (cat, dim) {
            (Some(c), Some(d)) => self.series_ids.contains_key(&(c, d)),
            _ => false,
        };
        let mut n = Novelty::default();
        let mut cats: Vec<u32> = Vec::new();
        let mut keys: Vec<(u32, u32)> = Vec::new();
        for s in &batch.summaries {
            cats.push(s.category);
            keys.push((s.category, s.entity));
        }
        cats.sort_unstable();
        cats.dedup();
        keys.sort_unstable();
        keys.dedup();
        for &c in &cats {
            let cat = id(c);
            if !has(cat, Some(Dim::All)) {
                n.categories += 1;
                n.series += 1;
            }
            let pair = cat
                .zip(pid)
                .is_some_and(|(c, p)| self.producer_pairs.contains(&((c as u64) << 32 | p as u64)));
            if !pair {
                n.series += 1;
            }
        }
        for &(c, e) in &keys {
            let dim = match e {
                NO_ENTITY => Some(Dim::NoEntity),
                e => id(e - 1).map(Dim::Entity),
            };
            if !has(id(c), dim) {
                n.series += 1;
                if e != NO_ENTITY {
                    n.entities += 1;
                }
            }
        }
        n
    }
}

#[cfg(test)]
mod retention_tests {
    use super::Retention;

    #[test]
    fn a_coarser_tier_may_not_be_kept_shorter_than_a_finer_one() {
        let r = |tiers| Retention { tiers }.check();
        assert!(Retention::default().check().is_ok());
        assert!(r([Some(1), Some(1), Some(1)]).is_ok());
        assert!(r([None, None, None]).is_ok());
        assert!(r([Some(5), None, None]).is_ok());
        let e = r([Some(2 * 86_400_000), Some(90 * 86_400_000), Some(1)]).unwrap_err();
        assert!(e.contains("retention_hours_tier_ms (1 ms)"), "{e}");
        assert!(r([Some(10), Some(9), None]).is_err());
        assert!(r([None, Some(9), None]).is_err());
    }
}
