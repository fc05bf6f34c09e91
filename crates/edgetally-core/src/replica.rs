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
mod log;
mod sketched;
mod snapshot;
mod tables;

use log::{keeps_retained, log_entry_bytes};
use sketched::SeriesSketches;
pub use sketched::{SketchAnswer, SketchSnapshot, SKETCH_FIRST_TIER};
use snapshot::SNAPSHOT_FORMAT;
pub use snapshot::{RestoreError, SeriesSnapshot, Snapshot};
use tables::*;

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
    // Batch format v2's sketches, when there are any (a v1 batch's digest is unchanged).
    sketched::digest_sketches(&mut h, batch);
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
    /// Distinct-count and quantile sketches (batch format v2).
    pub sketches: u64,
}

impl Memory {
    /// The sum of every kind.
    pub fn total(&self) -> u64 {
        self.seen
            + self.producers
            + self.series
            + self.entries
            + self.strings
            + self.log
            + self.sketches
    }

    /// `(kind, bytes)` for each kind, in a fixed order (the `/metrics` labels).
    pub fn by_kind(&self) -> [(&'static str, u64); 7] {
        [
            ("seen", self.seen),
            ("producers", self.producers),
            ("series", self.series),
            ("entries", self.entries),
            ("strings", self.strings),
            ("log", self.log),
            ("sketches", self.sketches),
        ]
    }
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
    /// Per series (index), its sketches at minute and hour resolution.
    sketches: FxHashMap<u32, SeriesSketches>,
    /// Estimated heap bytes of `sketches`.
    sketch_bytes: u64,
    /// Per sketch tier (minute, hour), the time before which its buckets were pruned.
    pub(crate) sketch_horizons: [i64; 2],
}

impl Replica {
    /// An empty replica.
    pub fn new() -> Replica {
        Replica {
            horizons: [i64::MIN; 3],
            sketch_horizons: [i64::MIN; 2],
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
    // Long by design: apply's steps with every bound checked first, so that nothing is
    // half-applied.
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
        for (i, k) in &batch.sketches {
            let (Some(s), Some(&idx)) = (batch.summaries.get(*i as usize), series.get(*i as usize))
            else {
                continue;
            };
            let start = s.bucket.saturating_mul(bucket_ms);
            let all = self.series_index(ids[s.category as usize], Dim::All);
            self.add_sketches(idx, start, k);
            self.add_sketches(all, start, k);
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
            sketches: self.sketch_bytes
                + hash(size_of::<(u32, SeriesSketches)>(), self.sketches.len()),
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
