//! Peer sync (anti-entropy between the replicas of one group) as a sans-IO state machine.
//!
//! [`PeerSync`] holds what one node knows of its peers and makes every decision of a pull
//! round: what to ask for ([`PeerSync::poll_round`]), what a round's result means (pull
//! more, adopt the peer's snapshot to close a gap, catch up from it when far behind, repair
//! a divergence: [`PeerSync::handle_round`]), and when an away peer stops holding back the
//! pruning of the retained log ([`PeerSync::poll_horizon`]). It does no I/O and reads no
//! clock: time is an argument. The merger drives it over authenticated QUIC links
//! (`edgetally_merger::replication`); the seeded cluster simulation drives the very same
//! code over a simulated network with drops, duplicates, partitions and crashes.
//! [`answer_round`] is the responder's side of a round.
//!
//! **Who may stop retaining for an away peer.** A batch leaves a node's retained log once
//! every peer that gates pruning holds it. A peer without a completed round for the horizon
//! stops gating — but only while this node completes rounds with a strict majority of the
//! group (itself included). Two sides of a partition can then never both prune batches the
//! other lacks: any two majorities share a node, which holds everything both pruned, so
//! each side can adopt that node's snapshot (with its own retained batches on top) once
//! links work again. Without the rule a long partition with producers writing on both
//! sides left two states neither could adopt, for ever. A group of two replicas therefore
//! retains for an away peer until it returns or leaves the configuration.

use crate::replica::{Digest, Divergence, LogEntry, Replica};
use std::collections::{BTreeMap, VecDeque};

mod link;
pub use link::{LinkCounters, Transmit};

/// How one node syncs with its peers.
#[derive(Clone, Copy, Debug)]
pub struct SyncConfig {
    /// Pull interval, ms: a peer whose last completed round is older than three of these (at
    /// least 2 s) does not count as reachable.
    pub interval_ms: i64,
    /// A peer without a completed round for this long may stop gating pruning, ms.
    pub horizon_ms: i64,
    /// After a round, lacking more of the peer's batches than this: adopt its snapshot.
    pub catch_up_batches: u64,
    /// Most batches one round may bring.
    pub round_max: u32,
    /// A connection attempt (login included) not done within this is given up, ms.
    pub connect_timeout_ms: i64,
    /// A pull round, the snapshot transfer it calls for, or a push not answered within this
    /// is given up (and with a round, the link), ms.
    pub round_timeout_ms: i64,
    /// The longest wait between connection attempts (the backoff starts at the interval and
    /// doubles), ms.
    pub backoff_max_ms: i64,
    /// Pushes in flight per peer.
    pub push_window: u32,
    /// Pushes waiting per peer beyond the window (the oldest is dropped past it: the next
    /// pull round brings it).
    pub push_queue: usize,
}

impl Default for SyncConfig {
    /// The merger's: a round every 500 ms, a 10-minute horizon, snapshot catch-up beyond
    /// 10,000 batches, 2,000 batches per round, 5 s to connect, 10 s per round, backoff up to
    /// 5 s, 256 pushes in flight and 4,096 waiting per peer.
    fn default() -> Self {
        SyncConfig {
            interval_ms: 500,
            horizon_ms: 600_000,
            catch_up_batches: 10_000,
            round_max: 2000,
            connect_timeout_ms: 5_000,
            round_timeout_ms: 10_000,
            backoff_max_ms: 5_000,
            push_window: 256,
            push_queue: 4096,
        }
    }
}

/// What this node knows of one peer (for status, metrics and query completeness).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStatus {
    /// Its node key, once a link authenticated.
    pub node: Option<[u8; 32]>,
    /// A link is up and a pull round completed recently.
    pub reachable: bool,
    /// When the last pull round completed, ms (0: never).
    pub last_sync_ms: i64,
    /// The last error, if the link is down.
    pub last_error: Option<String>,
    /// Batches its last digest covered.
    pub digest_batches: u64,
    /// Batches pulled from it.
    pub pulled: u64,
    /// Batches pushed to it and acknowledged.
    pub pushed: u64,
    /// Rounds that found it holding the same batch ids as this node with another state.
    pub divergences: u64,
    /// The last round found a divergence not yet repaired: answers are not complete.
    pub diverged: bool,
    /// It stopped gating pruning (away longer than the horizon); it catches up from a
    /// snapshot when it returns.
    pub excluded: bool,
    /// Its last settled round found it holding batches this node lacks and can no longer
    /// pull (pruned while this node was excluded): until this node has adopted its snapshot,
    /// the two are not one side of the group and it does not count towards a majority.
    pub gap: bool,
}

/// A pull round's request: this node's digest (epochs past the lateness horizon left out)
/// and the most batches the reply may carry.
#[derive(Clone, Debug)]
pub struct RoundRequest {
    /// What this node holds.
    pub digest: Digest,
    /// Most batches to send back.
    pub max: u32,
}

/// The responder's answer to a round: the retained batches the request lacks, at most its
/// `max`, and the responder's digest and state hash.
#[derive(Clone, Debug)]
pub struct RoundAnswer {
    /// Batches, as their producers signed them.
    pub batches: Vec<LogEntry>,
    /// More are waiting.
    pub more: bool,
    /// The responder's digest.
    pub digest: Digest,
    /// The responder's state hash.
    pub state_hash: [u8; 32],
}

/// What a round brought, once the pulled batches went through this node's ingest.
#[derive(Clone, Debug)]
pub struct RoundResult {
    /// The peer's digest.
    pub theirs: Digest,
    /// The peer said more batches were waiting.
    pub more: bool,
    /// The peer's state hash.
    pub their_hash: [u8; 32],
    /// Pulled batches acknowledged here.
    pub pulled: u64,
    /// Some pulled batch got Retry (a full queue): the round is not settled.
    pub retried: bool,
    /// Some pulled batch was refused by this node's limits: the round is not settled.
    pub refused: bool,
}

/// Why a node adopts its peer's snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adopt {
    /// The peer holds batches it no longer sends (pruned while this node was away).
    Gap,
    /// This node lacks more than `catch_up_batches` of the peer's batches.
    FarBehind,
    /// The two diverge and this node yields (PROTOCOL.md §9).
    Repair,
}

/// What a round's result calls for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundOutcome {
    /// The peer's snapshot is to be adopted: a [`Transmit::Snapshot`] follows.
    pub adopt: Option<Adopt>,
    /// The first epoch both hold with the same seqs and other contents (an equivocation).
    pub split: Option<Divergence>,
    /// The states diverge (an epoch, or the whole state under equal digests).
    pub diverged: bool,
    /// Run the next round now: more is waiting, or a pulled batch got Retry.
    pub again: bool,
}

/// The responder's side of a round: the retained batches `digest` lacks, at most `max`
/// (clamped to 1..=`limit`).
pub fn answer_round(replica: &Replica, digest: &Digest, max: u32, limit: u32) -> RoundAnswer {
    let missing = replica.missing_for(digest);
    let max = max.clamp(1, limit.max(1)) as usize;
    let more = missing.len() > max;
    RoundAnswer {
        batches: missing.into_iter().take(max).collect(),
        more,
        digest: replica.digest(),
        state_hash: replica.state_hash(),
    }
}

/// One node's view of its peers, keyed by `K` (an address, or a name in a simulation).
#[derive(Clone, Debug)]
pub struct PeerSync<K: Ord> {
    config: SyncConfig,
    started_ms: i64,
    peers: BTreeMap<K, PeerStatus>,
    /// Each peer's link ([`link`]).
    links: BTreeMap<K, link::Link>,
    /// What the driver is to do next.
    out: VecDeque<Transmit<K>>,
    /// The last token handed out.
    token: u64,
    counters: LinkCounters,
}

impl<K: Ord + Clone + ToString> PeerSync<K> {
    /// A node started at `now_ms` with these peers (a peer never heard from counts as away
    /// since then).
    pub fn new(config: SyncConfig, peers: impl IntoIterator<Item = K>, now_ms: i64) -> Self {
        let peers: BTreeMap<K, PeerStatus> = peers
            .into_iter()
            .map(|k| (k, PeerStatus::default()))
            .collect();
        PeerSync {
            config,
            started_ms: now_ms,
            // Every link's first attempt at once.
            links: peers
                .keys()
                .map(|k| (k.clone(), link::Link::new(now_ms)))
                .collect(),
            peers,
            out: VecDeque::new(),
            token: 0,
            counters: LinkCounters::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> SyncConfig {
        self.config
    }

    /// The peers are now these (a configuration change): new ones start unknown (their
    /// first connection attempt at the next [`PeerSync::handle_timeout`]), gone ones are
    /// forgotten (their links closed). Call [`PeerSync::declare`] after.
    pub fn set_peers(&mut self, peers: impl IntoIterator<Item = K>) {
        let mut next = BTreeMap::new();
        let mut links = BTreeMap::new();
        for k in peers {
            let s = self.peers.remove(&k).unwrap_or_default();
            let l = self
                .links
                .remove(&k)
                .unwrap_or_else(|| link::Link::new(i64::MIN));
            links.insert(k.clone(), l);
            next.insert(k, s);
        }
        for (peer, l) in std::mem::replace(&mut self.links, links) {
            if !matches!(
                l.state,
                link::State::Down { .. } | link::State::Connecting { .. }
            ) {
                self.out.push_back(Transmit::Close {
                    peer,
                    reason: "no longer a peer".into(),
                });
            }
        }
        self.peers = next;
    }

    /// Tells `replica` which peers gate pruning (all but the excluded), and prunes.
    pub fn declare(&self, replica: &mut Replica) {
        replica.set_peers(
            self.peers
                .iter()
                .filter(|(_, s)| !s.excluded)
                .map(|(k, _)| k.to_string()),
        );
        replica.prune_log();
    }

    /// The request of a round with `peer`, from this node's state; `cutoff_ms` is the
    /// lateness horizon's cutoff (epochs at or before it are left out on both sides: one
    /// node expiring an epoch before the other is not a gap).
    pub fn poll_round(&self, replica: &Replica, cutoff_ms: i64) -> RoundRequest {
        let mut digest = replica.digest();
        digest.retain_live(cutoff_ms);
        RoundRequest {
            digest,
            // Never more per round than the gap that makes a snapshot the better catch-up.
            max: self
                .config
                .round_max
                .min(u32::try_from(self.config.catch_up_batches.max(1)).unwrap_or(u32::MAX)),
        }
    }

    /// The link to `peer` failed or a round did not complete.
    fn handle_down(&mut self, peer: &K, why: String) {
        if let Some(s) = self.peers.get_mut(peer) {
            s.reachable = false;
            s.last_error = Some(why);
        }
    }

    /// Whether `peer` has been away longer than the horizon and this node may stop
    /// retaining batches for it (this node completes rounds with a strict majority of the
    /// group): if so it is excluded now and `true` is returned — call
    /// [`PeerSync::declare`]. Called whenever a link to it is (re)attempted.
    fn poll_horizon(&mut self, peer: &K, now_ms: i64) -> bool {
        let Some(s) = self.peers.get(peer) else {
            return false;
        };
        let since = if s.last_sync_ms > 0 {
            s.last_sync_ms
        } else {
            self.started_ms
        };
        if s.excluded
            || now_ms - since <= self.config.horizon_ms
            || !self.majority_without(peer, now_ms)
        {
            return false;
        }
        if let Some(s) = self.peers.get_mut(peer) {
            s.excluded = true;
        }
        true
    }

    /// Whether this node, with the peers it completed rounds with recently, is a strict
    /// majority of the group.
    pub fn in_majority(&self, now_ms: i64) -> bool {
        let seen = self
            .peers
            .values()
            .filter(|s| self.fresh(s, now_ms))
            .count();
        2 * (seen + 1) > self.peers.len() + 1
    }

    /// A strict majority without counting `peer`, of peers whose last round is more recent
    /// than the horizon too (a peer that could itself be excluded never makes a majority),
    /// and that hold nothing this node lacks for good (a peer with a gap is not on this
    /// node's side yet: see below).
    ///
    /// Why the gap matters: the rule that two sides never both prune what the other lacks
    /// rests on any two majorities sharing a node that holds everything both pruned. Over
    /// time three majorities can form — {a,b}, then {b,c}, then {a,c} — and the third
    /// shares with each earlier one only the node it excludes. If a and c count each other
    /// while each holds batches the other lacks for good, they prune for b what b lacks, and
    /// no node holds everything any more: no snapshot covers another, and the group never
    /// converges (seed 11363 of the simulation, run 20× wider than CI). Counting only peers
    /// without a gap keeps the shared node in every majority until the gap is closed by
    /// adopting its snapshot.
    fn majority_without(&self, peer: &K, now_ms: i64) -> bool {
        let seen = self
            .peers
            .iter()
            .filter(|(k, s)| {
                *k != peer
                    && !s.gap
                    && self.fresh(s, now_ms)
                    && now_ms - s.last_sync_ms <= self.config.horizon_ms
            })
            .count();
        2 * (seen + 1) > self.peers.len() + 1
    }

    fn fresh(&self, s: &PeerStatus, now_ms: i64) -> bool {
        s.reachable && now_ms - s.last_sync_ms <= (3 * self.config.interval_ms).max(2000)
    }

    /// A round with `peer` completed with `result` (its batches already through ingest):
    /// records the peer's digest in `replica` (which may prune), readmits the peer if it
    /// was excluded, and decides what follows.
    fn handle_round(
        &mut self,
        peer: &K,
        now_ms: i64,
        cutoff_ms: i64,
        result: RoundResult,
        replica: &mut Replica,
    ) -> RoundOutcome {
        let RoundResult {
            mut theirs,
            more,
            their_hash,
            pulled,
            retried,
            refused,
        } = result;
        theirs.retain_live(cutoff_ms);
        let count = theirs.batches();
        let mut mine = replica.digest();
        mine.retain_live(cutoff_ms);
        let my_hash = replica.state_hash();
        let settled = !more && !retried && !refused;
        // The peer holds batches it did not send (it pruned them while this node was away
        // longer than its horizon, or dropped them adopting a snapshot).
        let gap = settled && !mine.covers(&theirs);
        // An epoch both hold with the same seqs and different contents: its producer signed
        // two contents under one batch id, or a state was damaged (PROTOCOL.md §9).
        let split = mine.diverging(&theirs);
        // Equal digests and different states: damage, or epochs whose hashes are unknown.
        let whole = split.is_none() && settled && mine == theirs && my_hash != their_hash;
        let diverged = split.is_some() || whole;
        let yields = split.map_or(my_hash > their_hash, |d| d.mine_yields());
        let far_behind =
            more && theirs.batches().saturating_sub(mine.batches()) > self.config.catch_up_batches;
        let adopt = if diverged && yields {
            Some(Adopt::Repair)
        } else if gap {
            Some(Adopt::Gap)
        } else if far_behind {
            Some(Adopt::FarBehind)
        } else {
            None
        };
        let readmitted = match self.peers.get_mut(peer) {
            Some(s) => {
                s.reachable = true;
                s.last_sync_ms = now_ms;
                s.last_error = None;
                s.digest_batches = count;
                s.pulled += pulled;
                s.diverged = diverged;
                if diverged {
                    s.divergences += 1;
                }
                if settled {
                    s.gap = gap;
                }
                std::mem::replace(&mut s.excluded, false)
            }
            None => false,
        };
        if readmitted {
            self.declare(replica);
        }
        replica.observe_peer(&peer.to_string(), theirs);
        replica.prune_log();
        RoundOutcome {
            adopt,
            split,
            diverged,
            again: more || retried,
        }
    }

    /// The snapshot asked for after a round was adopted (`adopted`) or not (it no longer
    /// covered this node; the next round tries again). A repaired divergence clears.
    fn handle_adopted(&mut self, peer: &K, adopted: bool) {
        if let Some(s) = self.peers.get_mut(peer) {
            if adopted {
                s.diverged = false;
                s.gap = false;
            }
        }
    }

    /// The node key of `peer`, once a link to it authenticated.
    pub fn node_of(&self, peer: &K) -> Option<[u8; 32]> {
        self.peers.get(peer).and_then(|s| s.node)
    }

    /// Every peer's status, `reachable` only if its last round is recent.
    pub fn status(&self, now_ms: i64) -> BTreeMap<K, PeerStatus> {
        self.peers
            .iter()
            .map(|(k, s)| {
                let mut s = s.clone();
                s.reachable = self.fresh(&s, now_ms);
                (k.clone(), s)
            })
            .collect()
    }

    /// Whether every peer is reachable now with no divergence unrepaired.
    pub fn sees_all(&self, now_ms: i64) -> bool {
        self.peers
            .values()
            .all(|s| self.fresh(s, now_ms) && !s.diverged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SyncConfig {
        SyncConfig {
            interval_ms: 100,
            horizon_ms: 5_000,
            catch_up_batches: 10,
            ..SyncConfig::default()
        }
    }

    fn done(peer: &mut PeerSync<&'static str>, k: &'static str, now: i64, r: &mut Replica) {
        let theirs = Replica::new();
        peer.handle_round(
            &k,
            now,
            i64::MIN,
            RoundResult {
                theirs: theirs.digest(),
                more: false,
                their_hash: theirs.state_hash(),
                pulled: 0,
                retried: false,
                refused: false,
            },
            r,
        );
    }

    #[test]
    fn an_away_peer_is_excluded_only_from_a_majority() {
        let mut r = Replica::new();
        // Three replicas: this node and b reach each other, c is away.
        let mut s = PeerSync::new(cfg(), ["b", "c"], 0);
        assert!(!s.poll_horizon(&"c", 4_000), "within the horizon");
        assert!(!s.poll_horizon(&"c", 6_000), "alone: no majority");
        done(&mut s, "b", 6_000, &mut r);
        assert!(s.in_majority(6_100));
        assert!(s.poll_horizon(&"c", 6_100));
        assert!(!s.poll_horizon(&"c", 6_200), "excluded once");
        assert!(s.status(6_200)[&"c"].excluded);
        // c returns: readmitted by its first completed round.
        done(&mut s, "c", 7_000, &mut r);
        assert!(!s.status(7_000)[&"c"].excluded);
        // The away peer itself never makes the majority, even while its last round is
        // within the reachability window (a window longer than the horizon here).
        let wide = SyncConfig {
            horizon_ms: 1_000,
            ..cfg()
        };
        let mut s = PeerSync::new(wide, ["b", "c"], 0);
        done(&mut s, "b", 100, &mut r);
        assert!(!s.poll_horizon(&"b", 1_200), "b is the only peer seen");
        // Two replicas: never a strict majority alone, so never excluded.
        let mut two = PeerSync::new(cfg(), ["b"], 0);
        assert!(!two.poll_horizon(&"b", 1_000_000));
        // Four: two of four is not a majority.
        let mut four = PeerSync::new(cfg(), ["b", "c", "d"], 0);
        done(&mut four, "b", 9_000, &mut r);
        assert!(!four.poll_horizon(&"c", 9_000));
        done(&mut four, "d", 9_000, &mut r);
        assert!(four.poll_horizon(&"c", 9_000));
    }

    #[test]
    fn a_round_is_not_reachable_forever() {
        let mut r = Replica::new();
        let mut s = PeerSync::new(cfg(), ["b"], 0);
        assert!(!s.sees_all(0));
        done(&mut s, "b", 1_000, &mut r);
        assert!(s.sees_all(2_000));
        assert!(!s.sees_all(3_001), "older than max(3 intervals, 2 s)");
        s.handle_down(&"b", "gone".into());
        assert!(!s.sees_all(1_000));
        assert_eq!(s.status(1_000)[&"b"].last_error.as_deref(), Some("gone"));
    }

    #[test]
    fn rounds_are_capped_by_the_catch_up_gap() {
        let r = Replica::new();
        let s = PeerSync::new(cfg(), ["b"], 0);
        assert_eq!(s.poll_round(&r, i64::MIN).max, 10);
        let a = answer_round(&r, &r.digest(), 0, 5);
        assert!(a.batches.is_empty() && !a.more);
    }
}
