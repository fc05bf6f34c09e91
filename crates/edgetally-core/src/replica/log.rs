//! The retained log and what prunes it (the peers' digests), seen-set expiry, tier retention
//! and the reclaiming of producers no table refers to any more.

use super::*;

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
pub(super) fn keeps_retained(theirs: Option<&EpochSeen>, mine: Option<&EpochSeen>) -> bool {
    match (theirs, mine) {
        (Some(t), Some(m)) => t.seqs != m.seqs || t.hash == m.hash,
        _ => false,
    }
}

/// Heap bytes of one retained batch, estimated.
pub(super) fn log_entry_bytes(e: &LogEntry) -> u64 {
    use std::mem::size_of;
    let b = &e.batch;
    let strings: usize = b.strings.iter().map(|s| s.len() + 4).sum();
    (e.raw.len()
        + b.summaries.len() * size_of::<crate::batch::BatchSummary>()
        + strings
        + size_of::<Batch>()
        + 2 * size_of::<(BatchId, LogEntry)>()) as u64
}

impl Replica {
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
            self.prune_sketches(t, cutoff);
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
}
