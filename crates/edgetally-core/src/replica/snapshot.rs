//! Snapshots: the canonical form of a replica's state (and the formats of earlier releases it
//! still reads), taking one, restoring one and adopting a peer's.

use super::*;

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
    /// Every sketch bucket, sorted by (category, dimension, tier, start) (format 6 on).
    pub sketches: Vec<SketchSnapshot>,
    /// Per sketch tier (minute, hour), the time before which its buckets were pruned (format
    /// 6 on).
    pub sketch_horizons: [i64; 2],
}

/// Format 5 of [`Snapshot`], before it carried sketches.
#[derive(Serialize, Deserialize)]
pub(super) struct SnapshotV5 {
    format: u32,
    strings: Vec<String>,
    producers: Vec<ProducerKey>,
    series: Vec<SeriesSnapshot>,
    seen: Vec<(ProducerKey, u64, EpochSeen)>,
    horizons: [i64; 3],
    batches_hash: SetHash,
    batches: u64,
    absorbed: Vec<String>,
}

/// Format 4 of [`Snapshot`], before it listed the groups it absorbed.
#[derive(Serialize, Deserialize)]
pub(super) struct SnapshotV4 {
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
pub(super) struct EpochSeenV3 {
    seqs: SeenSet,
    hash: Option<[u8; 16]>,
}

/// Format 3 of [`Snapshot`], before epochs kept their lateness horizon.
#[derive(Serialize, Deserialize)]
pub(super) struct SnapshotV3 {
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
pub(super) struct SnapshotV2 {
    format: u32,
    strings: Vec<String>,
    producers: Vec<ProducerKey>,
    series: Vec<SeriesSnapshot>,
    seen: Vec<(ProducerKey, u64, SeenSet)>,
    horizons: [i64; 3],
    batches_hash: SetHash,
}

/// Seen-sets of a format 1 or 2 snapshot: their content hashes are not known.
pub(super) fn unhashed(
    seen: Vec<(ProducerKey, u64, SeenSet)>,
) -> Vec<(ProducerKey, u64, EpochSeen)> {
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
pub(super) fn seen_size(seen: &[(ProducerKey, u64, EpochSeen)]) -> u64 {
    seen.iter()
        .fold(0u64, |n, (_, _, e)| n.saturating_add(e.seqs.len()))
}

/// Format 1 of [`Snapshot`], before it carried `batches_hash`.
#[derive(Serialize, Deserialize)]
pub(super) struct SnapshotV1 {
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

    /// Decodes a snapshot of format 6, 5, 4 (an earlier format has no sketches: their
    /// horizons are the counters' minute and hour horizons), 3, 2 (without per-epoch content hashes: they are not
    /// known, and never compared) or 1 (whose batches' content is not known any more: its set
    /// hash is seeded with the digest of its own canonical bytes, so equal format-1 snapshots
    /// still give equal hashes).
    // Long by design: one arm per snapshot format still read.
    pub fn decode(bytes: &[u8]) -> Result<Snapshot, String> {
        match bytes.first() {
            Some(5) => {
                let v5: SnapshotV5 =
                    postcard::from_bytes(bytes).map_err(|e| format!("snapshot (format 5): {e}"))?;
                Ok(Snapshot {
                    format: SNAPSHOT_FORMAT,
                    strings: v5.strings,
                    producers: v5.producers,
                    series: v5.series,
                    seen: v5.seen,
                    horizons: v5.horizons,
                    batches_hash: v5.batches_hash,
                    batches: v5.batches,
                    absorbed: v5.absorbed,
                    sketches: Vec::new(),
                    sketch_horizons: [v5.horizons[1], v5.horizons[2]],
                })
            }
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
                    sketches: Vec::new(),
                    sketch_horizons: [v4.horizons[1], v4.horizons[2]],
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
                    sketches: Vec::new(),
                    sketch_horizons: [v3.horizons[1], v3.horizons[2]],
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
                    sketches: Vec::new(),
                    sketch_horizons: [v2.horizons[1], v2.horizons[2]],
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
                    sketches: Vec::new(),
                    sketch_horizons: [horizons[1], horizons[2]],
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
    // Long by design: the union field by field (strings, producers, series, rollups,
    // seen-sets), each re-indexed in turn.
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
        let mut sketches: BTreeMap<(u32, Dim, u8, i64), crate::sketches::Sketches> =
            BTreeMap::new();
        let mut absorbed = vec![name.to_string()];
        let horizons = [0, 1, 2].map(|t| self.horizons[t].max(other.horizons[t]));
        let sketch_horizons = [0, 1].map(|t| self.sketch_horizons[t].max(other.sketch_horizons[t]));
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
            for k in snap.sketches {
                let str_at = |i: u32| rs.get(i as usize).copied();
                let cat = str_at(k.category).ok_or("sketch index out of range")?;
                let dim = match k.dim {
                    Dim::Entity(e) => Dim::Entity(str_at(e).ok_or("sketch index out of range")?),
                    Dim::Producer(_) => return Err("sketch of a producer series".into()),
                    d => d,
                };
                let add = k.sketches().ok_or("sketch bytes malformed")?;
                sketches
                    .entry((cat, dim, k.tier, k.start))
                    .or_default()
                    .merge(&add)
                    .map_err(|c| format!("sketches do not merge: {c}"))?;
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
            sketches: sketches
                .into_iter()
                .map(|((category, dim, tier, start), k)| SketchSnapshot {
                    category,
                    dim,
                    tier,
                    start,
                    distinct: k.distinct.as_ref().map(|h| h.encode()),
                    quantiles: k.quantiles.as_ref().map(|q| q.encode()),
                })
                .collect(),
            sketch_horizons,
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

pub(super) const SNAPSHOT_FORMAT: u32 = 6;

impl Replica {
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
        let sketches = self.sketch_snapshot(&canon);
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
            sketches,
            sketch_horizons: self.sketch_horizons,
        }
    }

    /// Rebuilds a replica from a snapshot (its log starts empty).
    // Long by design: each table rebuilt from the snapshot in turn, its indices checked as it
    // goes.
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
        r.restore_sketches(snap.sketches)?;
        r.sketch_horizons = snap.sketch_horizons;
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
}
