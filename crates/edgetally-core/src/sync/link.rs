//! The links half of [`PeerSync`]: connection and login states, timers, pull-round
//! scheduling, snapshot adoption and the push window, as a sans-IO state machine in the
//! shape of quinn-proto's `Connection`.
//!
//! The driver (the merger's tokio task, or the seeded simulation) does four things in a
//! loop, and nothing else:
//!
//! 1. [`PeerSync::handle_timeout`] with the current time (it returns the peers that just
//!    stopped gating pruning: call [`PeerSync::declare`]);
//! 2. drains [`PeerSync::poll_transmit`] and carries each [`Transmit`] out (connect and log
//!    in, run a pull round, push a batch, fetch a snapshot, close a link);
//! 3. reports every outcome back with the transmit's token ([`PeerSync::handle_connected`],
//!    [`PeerSync::handle_round_reply`], [`PeerSync::handle_adopted_reply`],
//!    [`PeerSync::handle_push_reply`], or [`PeerSync::handle_failed`]); an outcome whose token
//!    the machine no longer waits for is stale and ignored (its link timed out meanwhile);
//! 4. waits until [`PeerSync::poll_timeout`], an outcome, or a newly applied batch
//!    ([`PeerSync::queue_push`]).
//!
//! Every wait has a deadline here, not in the driver: a connection attempt
//! (`connect_timeout_ms`, login included), a pull round and the snapshot it may call for
//! (`round_timeout_ms`), each push in flight (`round_timeout_ms`). A missed deadline takes
//! the link down; it is retried after a backoff that starts at the pull interval and
//! doubles up to `backoff_max_ms`. Pushes are best-effort: at most `push_window` in flight
//! per peer and `push_queue` waiting; beyond that the oldest waiting one is dropped (the
//! next pull round brings it), and a link going down forgets its queue for the same reason.

use super::{Adopt, PeerSync, RoundOutcome, RoundResult};
use crate::replica::Replica;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// What the driver is asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transmit<K> {
    /// Connect to `peer` and log in both ways; report with [`PeerSync::handle_connected`]
    /// or [`PeerSync::handle_failed`].
    Connect { peer: K, token: u64 },
    /// Run a pull round with `peer`: send [`PeerSync::poll_round`]'s request, take the
    /// batches of the answer through ingest, report with [`PeerSync::handle_round_reply`].
    Round { peer: K, token: u64 },
    /// Fetch `peer`'s snapshot and adopt it ([`Replica::adopt`]); report with
    /// [`PeerSync::handle_adopted_reply`].
    Snapshot { peer: K, token: u64, why: Adopt },
    /// Push one newly applied batch to `peer`; report with [`PeerSync::handle_push_reply`].
    Push {
        peer: K,
        token: u64,
        batch: Arc<[u8]>,
    },
    /// The link to `peer` is down: close its connection (`reason`: why, for the log).
    Close { peer: K, reason: String },
}

/// Where one link stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// No connection; the next attempt at `retry_at`.
    Down { retry_at: i64 },
    /// Connecting and logging in, until `deadline`.
    Connecting { token: u64, deadline: i64 },
    /// Up; the next pull round at `next_round`.
    Idle { next_round: i64 },
    /// A pull round in flight until `deadline`.
    Round { token: u64, deadline: i64 },
    /// Fetching and adopting the peer's snapshot until `deadline`; `again`: the round that
    /// called for it wanted the next one at once.
    Adopting {
        token: u64,
        deadline: i64,
        again: bool,
    },
}

/// One peer's link.
#[derive(Clone, Debug)]
pub(super) struct Link {
    pub(super) state: State,
    backoff_ms: i64,
    round_started: i64,
    /// Pushes in flight: token → deadline.
    inflight: BTreeMap<u64, i64>,
    /// Pushes waiting for room in the window.
    waiting: VecDeque<Arc<[u8]>>,
}

impl Link {
    pub(super) fn new(retry_at: i64) -> Link {
        Link {
            state: State::Down { retry_at },
            backoff_ms: 0,
            round_started: i64::MIN,
            inflight: BTreeMap::new(),
            waiting: VecDeque::new(),
        }
    }

    fn connected(&self) -> bool {
        matches!(
            self.state,
            State::Idle { .. } | State::Round { .. } | State::Adopting { .. }
        )
    }

    fn deadline(&self) -> i64 {
        let state = match self.state {
            State::Down { retry_at } => retry_at,
            State::Connecting { deadline, .. }
            | State::Round { deadline, .. }
            | State::Adopting { deadline, .. } => deadline,
            State::Idle { next_round } => next_round,
        };
        self.inflight.values().copied().fold(state, i64::min)
    }
}

/// Counters of the links (for metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Pushes dropped because a peer's queue was full (the next pull round brings them).
    pub pushes_dropped: u64,
    /// Pushes whose reply did not come within the round timeout.
    pub pushes_timed_out: u64,
}

impl<K: Ord + Clone + ToString> PeerSync<K> {
    fn next_token(&mut self) -> u64 {
        self.token += 1;
        self.token
    }

    fn link_mut(&mut self, peer: &K) -> Option<&mut Link> {
        self.links.get_mut(peer)
    }

    /// Advances every timer due at `now_ms`: starts connection attempts (first asking
    /// whether the peer has been away past the horizon), starts pull rounds, and takes down
    /// links whose attempt, round, snapshot or push outlived its deadline. Returns the peers
    /// that just stopped gating pruning: call [`PeerSync::declare`] if any.
    pub fn handle_timeout(&mut self, now_ms: i64) -> Vec<K> {
        let mut excluded = Vec::new();
        let peers: Vec<K> = self.links.keys().cloned().collect();
        for peer in peers {
            self.expire_pushes(&peer, now_ms);
            let Some(state) = self.links.get(&peer).map(|l| l.state) else {
                continue;
            };
            match state {
                State::Down { retry_at } if retry_at <= now_ms => {
                    // Every (re)connection attempt follows a failure or the start: the
                    // moment to ask whether the peer has been away too long.
                    if self.poll_horizon(&peer, now_ms) {
                        excluded.push(peer.clone());
                    }
                    let token = self.next_token();
                    let deadline = now_ms.saturating_add(self.config.connect_timeout_ms);
                    if let Some(l) = self.link_mut(&peer) {
                        l.state = State::Connecting { token, deadline };
                    }
                    self.out.push_back(Transmit::Connect { peer, token });
                }
                State::Connecting { deadline, .. } if deadline <= now_ms => {
                    self.down(&peer, "connect timed out".into(), now_ms);
                }
                State::Idle { next_round } if next_round <= now_ms => {
                    let token = self.next_token();
                    let deadline = now_ms.saturating_add(self.config.round_timeout_ms);
                    if let Some(l) = self.link_mut(&peer) {
                        l.state = State::Round { token, deadline };
                        l.round_started = now_ms;
                    }
                    self.out.push_back(Transmit::Round { peer, token });
                }
                State::Round { deadline, .. } if deadline <= now_ms => {
                    // A peer that stops answering (paused, partitioned) must not hold the
                    // link: give up on the round and reconnect.
                    self.down(&peer, "pull round timed out".into(), now_ms);
                }
                State::Adopting { deadline, .. } if deadline <= now_ms => {
                    self.down(&peer, "snapshot transfer timed out".into(), now_ms);
                }
                _ => {}
            }
        }
        excluded
    }

    /// When [`PeerSync::handle_timeout`] next has something to do, ms (`None`: no peers).
    pub fn poll_timeout(&self) -> Option<i64> {
        self.links.values().map(Link::deadline).min()
    }

    /// The next thing to do, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit<K>> {
        self.out.pop_front()
    }

    /// The links' counters.
    pub fn link_counters(&self) -> LinkCounters {
        self.counters
    }

    /// A connection attempt succeeded and `peer` proved to be `node`. `false`: the attempt
    /// is stale (it timed out meanwhile): close that connection.
    pub fn handle_connected(&mut self, peer: &K, token: u64, node: [u8; 32], now_ms: i64) -> bool {
        let interval = self.config.interval_ms.max(1);
        let Some(l) = self.link_mut(peer) else {
            return false;
        };
        if !matches!(l.state, State::Connecting { token: t, .. } if t == token) {
            return false;
        }
        // The first round at once, then every interval.
        l.state = State::Idle { next_round: now_ms };
        l.backoff_ms = interval;
        if let Some(s) = self.peers.get_mut(peer) {
            s.node = Some(node);
            s.last_error = None;
        }
        true
    }

    /// What the transmit `token` for `peer` started (a connection attempt, a round, a
    /// snapshot transfer) failed: the link goes down (a [`Transmit::Close`] follows if it
    /// was up) and is retried after the backoff. A stale token is ignored.
    pub fn handle_failed(&mut self, peer: &K, token: u64, why: String, now_ms: i64) {
        let current = self.links.get(peer).is_some_and(|l| match l.state {
            State::Connecting { token: t, .. }
            | State::Round { token: t, .. }
            | State::Adopting { token: t, .. } => t == token,
            _ => false,
        });
        if current {
            self.down(peer, why, now_ms);
        }
    }

    /// The pull round `token` with `peer` completed with `result` (its batches already
    /// through ingest). `None`: stale, ignored. Otherwise what [`PeerSync::handle_round`]
    /// decided; a snapshot to adopt comes as a [`Transmit::Snapshot`].
    pub fn handle_round_reply(
        &mut self,
        peer: &K,
        token: u64,
        now_ms: i64,
        cutoff_ms: i64,
        result: RoundResult,
        replica: &mut Replica,
    ) -> Option<RoundOutcome> {
        let current = self
            .links
            .get(peer)
            .is_some_and(|l| matches!(l.state, State::Round { token: t, .. } if t == token));
        if !current {
            return None;
        }
        let outcome = self.handle_round(peer, now_ms, cutoff_ms, result, replica);
        match outcome.adopt {
            Some(why) => {
                let token = self.next_token();
                let deadline = now_ms.saturating_add(self.config.round_timeout_ms);
                if let Some(l) = self.link_mut(peer) {
                    l.state = State::Adopting {
                        token,
                        deadline,
                        again: outcome.again,
                    };
                }
                self.out.push_back(Transmit::Snapshot {
                    peer: peer.clone(),
                    token,
                    why,
                });
            }
            None => self.schedule_round(peer, outcome.again, now_ms),
        }
        Some(outcome)
    }

    /// The snapshot transfer `token` with `peer` ended: its snapshot was adopted
    /// (`adopted`), or no longer covered this node (the next round tries again). `false`:
    /// stale, ignored.
    pub fn handle_adopted_reply(
        &mut self,
        peer: &K,
        token: u64,
        adopted: bool,
        now_ms: i64,
    ) -> bool {
        let again = match self.links.get(peer).map(|l| l.state) {
            Some(State::Adopting {
                token: t, again, ..
            }) if t == token => again,
            _ => return false,
        };
        self.handle_adopted(peer, adopted);
        self.schedule_round(peer, again, now_ms);
        true
    }

    fn schedule_round(&mut self, peer: &K, again: bool, now_ms: i64) {
        let interval = self.config.interval_ms.max(1);
        if let Some(l) = self.link_mut(peer) {
            // The next round at once when more is waiting; otherwise an interval after the
            // last one started (at once if the round took longer).
            let next_round = if again {
                now_ms
            } else {
                l.round_started.saturating_add(interval).max(now_ms)
            };
            l.state = State::Idle { next_round };
        }
    }

    /// A batch applied here that its producer brought (not a peer): push it to every peer
    /// whose link is up, within each one's window.
    pub fn queue_push(&mut self, batch: Arc<[u8]>, now_ms: i64) {
        let peers: Vec<K> = self
            .links
            .iter()
            .filter(|(_, l)| l.connected())
            .map(|(k, _)| k.clone())
            .collect();
        let max = self.config.push_queue.max(1);
        for peer in peers {
            let mut dropped = false;
            if let Some(l) = self.link_mut(&peer) {
                l.waiting.push_back(batch.clone());
                if l.waiting.len() > max {
                    l.waiting.pop_front();
                    dropped = true;
                }
            }
            if dropped {
                self.counters.pushes_dropped += 1;
            }
            self.fill_window(&peer, now_ms);
        }
    }

    /// The push `token` to `peer` was answered: acknowledged (`acked`) or not (a lost push
    /// is pulled on the next round).
    pub fn handle_push_reply(&mut self, peer: &K, token: u64, acked: bool, now_ms: i64) {
        let known = self
            .link_mut(peer)
            .is_some_and(|l| l.inflight.remove(&token).is_some());
        if !known {
            return;
        }
        if acked {
            if let Some(s) = self.peers.get_mut(peer) {
                s.pushed += 1;
            }
        }
        self.fill_window(peer, now_ms);
    }

    fn fill_window(&mut self, peer: &K, now_ms: i64) {
        let window = self.config.push_window.max(1) as usize;
        let deadline = now_ms.saturating_add(self.config.round_timeout_ms);
        loop {
            let Some(l) = self.links.get(peer) else {
                return;
            };
            if !l.connected() || l.inflight.len() >= window || l.waiting.is_empty() {
                return;
            }
            let token = self.next_token();
            let Some(l) = self.link_mut(peer) else {
                return;
            };
            let Some(batch) = l.waiting.pop_front() else {
                return;
            };
            l.inflight.insert(token, deadline);
            self.out.push_back(Transmit::Push {
                peer: peer.clone(),
                token,
                batch,
            });
        }
    }

    fn expire_pushes(&mut self, peer: &K, now_ms: i64) {
        let Some(l) = self.link_mut(peer) else {
            return;
        };
        let before = l.inflight.len();
        l.inflight.retain(|_, d| *d > now_ms);
        let expired = (before - l.inflight.len()) as u64;
        if expired > 0 {
            self.counters.pushes_timed_out += expired;
            self.fill_window(peer, now_ms);
        }
    }

    /// Takes the link to `peer` down: closed if it was up, retried after the backoff.
    fn down(&mut self, peer: &K, why: String, now_ms: i64) {
        let (interval, max) = (
            self.config.interval_ms.max(1),
            self.config.backoff_max_ms.max(1),
        );
        let Some(l) = self.link_mut(peer) else {
            return;
        };
        let was_up = l.connected();
        if l.backoff_ms == 0 {
            l.backoff_ms = interval;
        }
        l.state = State::Down {
            retry_at: now_ms.saturating_add(l.backoff_ms),
        };
        l.backoff_ms = l.backoff_ms.saturating_mul(2).min(max.max(interval));
        // What waited to be pushed is pulled on a later round: never replayed.
        l.waiting.clear();
        l.inflight.clear();
        self.handle_down(peer, why.clone());
        if was_up {
            self.out.push_back(Transmit::Close {
                peer: peer.clone(),
                reason: why,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::SyncConfig;

    fn cfg() -> SyncConfig {
        SyncConfig {
            interval_ms: 100,
            connect_timeout_ms: 50,
            round_timeout_ms: 1_000,
            backoff_max_ms: 350,
            push_window: 2,
            push_queue: 3,
            ..SyncConfig::default()
        }
    }

    fn drain(s: &mut PeerSync<&'static str>) -> Vec<Transmit<&'static str>> {
        std::iter::from_fn(|| s.poll_transmit()).collect()
    }

    fn empty_round(r: &Replica) -> RoundResult {
        RoundResult {
            theirs: r.digest(),
            more: false,
            their_hash: r.state_hash(),
            pulled: 0,
            retried: false,
            refused: false,
        }
    }

    /// Brings the link to "b" up at `now`; the token of the first round.
    fn up(s: &mut PeerSync<&'static str>, now: i64) -> u64 {
        s.handle_timeout(now);
        let Some(Transmit::Connect { token, .. }) = drain(s).pop() else {
            panic!("no connect");
        };
        assert!(s.handle_connected(&"b", token, [2; 32], now));
        s.handle_timeout(now);
        match drain(s).as_slice() {
            [Transmit::Round { token, .. }] => *token,
            other => panic!("no round: {other:?}"),
        }
    }

    #[test]
    fn connect_round_schedule_and_timeouts() {
        let mut r = Replica::new();
        let mut s = PeerSync::new(cfg(), ["b"], 1_000);
        assert_eq!(s.poll_timeout(), Some(1_000), "the first attempt at once");
        let round = up(&mut s, 1_000);
        assert_eq!(s.poll_timeout(), Some(2_000), "the round's deadline");
        // A reply: the next round an interval after this one started.
        let out = s.handle_round_reply(&"b", round, 1_030, i64::MIN, empty_round(&r), &mut r);
        assert_eq!(out.map(|o| o.adopt), Some(None));
        assert_eq!(s.poll_timeout(), Some(1_100));
        assert!(
            s.handle_round_reply(&"b", round, 1_040, i64::MIN, empty_round(&r), &mut r)
                .is_none(),
            "a duplicate reply is stale"
        );
        assert!(s.status(1_040)[&"b"].reachable);
        assert_eq!(s.status(1_040)[&"b"].node, Some([2; 32]));
        // The next round is never answered: the link goes down at its deadline and closes.
        s.handle_timeout(1_100);
        assert!(matches!(drain(&mut s).as_slice(), [Transmit::Round { .. }]));
        s.handle_timeout(2_099);
        assert!(drain(&mut s).is_empty());
        s.handle_timeout(2_100);
        assert_eq!(
            drain(&mut s),
            vec![Transmit::Close {
                peer: "b",
                reason: "pull round timed out".into()
            }]
        );
        assert_eq!(
            s.status(2_100)[&"b"].last_error.as_deref(),
            Some("pull round timed out")
        );
        // Retried after the backoff (the interval, then doubling up to 350 ms); attempts
        // that time out do not close anything (nothing was up).
        let mut at = 2_100;
        for wait in [100, 200, 350, 350] {
            assert_eq!(s.poll_timeout(), Some(at + wait));
            at += wait;
            s.handle_timeout(at);
            let [Transmit::Connect { token, .. }] = drain(&mut s)[..] else {
                panic!("no attempt at {at}");
            };
            at += 50;
            s.handle_timeout(at);
            assert!(drain(&mut s).is_empty(), "a failed attempt closes nothing");
            assert!(!s.handle_connected(&"b", token, [2; 32], at), "stale");
        }
        // A success resets the backoff.
        let round = up(&mut s, at + 350);
        s.handle_failed(&"b", round, "reset".into(), at + 400);
        assert_eq!(s.poll_timeout(), Some(at + 500));
    }

    #[test]
    fn pushes_keep_a_window_and_a_bounded_queue() {
        let mut s = PeerSync::new(cfg(), ["b"], 0);
        let batch = |i: u8| -> Arc<[u8]> { vec![i].into() };
        s.queue_push(batch(0), 0);
        assert!(drain(&mut s).is_empty(), "no link: nothing pushed or kept");
        up(&mut s, 0);
        for i in 1..=6 {
            s.queue_push(batch(i), 10);
        }
        let sent = drain(&mut s);
        let tokens: Vec<u64> = sent
            .iter()
            .map(|t| match t {
                Transmit::Push { token, batch, .. } => {
                    assert!(batch[0] <= 2, "the first two go at once");
                    *token
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(tokens.len(), 2);
        // Four waited for a queue of three: the oldest of them (3) was dropped.
        assert_eq!(s.link_counters().pushes_dropped, 1);
        s.handle_push_reply(&"b", tokens[0], true, 20);
        s.handle_push_reply(&"b", tokens[0], true, 20); // a duplicate reply: ignored
        assert_eq!(s.status(20)[&"b"].pushed, 1);
        match drain(&mut s).as_slice() {
            [Transmit::Push { batch, .. }] => assert_eq!(batch[0], 4),
            other => panic!("{other:?}"),
        }
        // Pushes whose reply never comes are given up at the round timeout, freeing room.
        s.handle_timeout(1_010);
        assert_eq!(s.link_counters().pushes_timed_out, 1);
        let next: Vec<u8> = drain(&mut s)
            .into_iter()
            .filter_map(|t| match t {
                Transmit::Push { batch, .. } => Some(batch[0]),
                _ => None,
            })
            .collect();
        assert_eq!(next, vec![5]);
    }

    #[test]
    fn a_round_that_calls_for_a_snapshot_waits_for_it() {
        let mut mine = Replica::new();
        let mut theirs = Replica::new();
        let id = crate::BatchId {
            producer: crate::ProducerKey([1; 32]),
            epoch: 1,
            seq: 0,
        };
        let mut strings = crate::StringTable::default();
        let category = strings.push("c");
        let batch = crate::Batch {
            id,
            created_ms: 0,
            bucket_ms: 1000,
            strings,
            summaries: vec![crate::BatchSummary {
                category,
                entity: crate::NO_ENTITY,
                bucket: 5,
                summary: crate::Summary::of(1.0).expect("summary"),
            }],
            sketches: Vec::new(),
        };
        theirs
            .apply(crate::LogEntry {
                batch: Arc::new(batch),
                raw: vec![0u8].into(),
            })
            .expect("apply");
        let mut s = PeerSync::new(SyncConfig { ..cfg() }, ["b"], 0);
        let round = up(&mut s, 0);
        // b holds a batch it does not send (pruned): a gap, adopt its snapshot.
        let out = s
            .handle_round_reply(&"b", round, 10, i64::MIN, empty_round(&theirs), &mut mine)
            .expect("current");
        assert_eq!(out.adopt, Some(Adopt::Gap));
        let [Transmit::Snapshot { token, why, .. }] = drain(&mut s)[..] else {
            panic!("no snapshot asked");
        };
        assert_eq!(why, Adopt::Gap);
        assert_eq!(s.poll_timeout(), Some(1_010), "the transfer's deadline");
        assert!(s.status(10)[&"b"].gap);
        assert!(s.handle_adopted_reply(&"b", token, true, 50));
        assert!(!s.status(50)[&"b"].gap);
        assert_eq!(s.poll_timeout(), Some(100), "rounds resume on the interval");
        assert!(!s.handle_adopted_reply(&"b", token, true, 60), "stale");
    }

    #[test]
    fn a_peer_removed_is_closed_and_a_new_one_tried_at_once() {
        let mut s = PeerSync::new(cfg(), ["b"], 0);
        up(&mut s, 0);
        s.set_peers(["c"]);
        assert_eq!(
            drain(&mut s),
            vec![Transmit::Close {
                peer: "b",
                reason: "no longer a peer".into()
            }]
        );
        s.handle_timeout(5);
        assert!(matches!(
            drain(&mut s).as_slice(),
            [Transmit::Connect { peer: "c", .. }]
        ));
    }
}
