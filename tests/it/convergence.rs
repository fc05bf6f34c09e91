//! A deterministic, seeded simulation of a merger cluster under faults.
//!
//! Replicas (3–5, sometimes a sixth bootstrapped mid-run from a snapshot), many producers
//! (some restarting into fresh epochs), a network that drops, duplicates, delays and reorders
//! every kind of message, partitions that cut replicas off from their peers, and crashes that
//! lose every received-but-not-yet-durable batch. The replicas' peer protocol is the merger's
//! own sans-IO machine, `edgetally_core::PeerSync`, driven here exactly as the merger's tokio
//! driver drives it (`handle_timeout`, `poll_transmit`, the `handle_*` replies by token): its
//! connection attempts and their timeouts and backoff, pull rounds and their deadlines, the
//! push window, gap and far-behind snapshot adoption, divergence repair, and when an away
//! peer stops gating pruning. Nothing of the protocol is re-implemented here: this file only
//! carries the machine's transmits over a simulated network and answers them; half the
//! scenarios run a horizon that partitions outlast, partitions also split the group in two,
//! and a third run small rounds with snapshot catch-up. Batches travel as real signed bytes and are
//! decoded and verified on every hop. After healing, every replica must be bit-identical, equal
//! to a ground truth computed by a naive model from the generated events, and its replication
//! log must be pruned to nothing.
//!
//! Some producers are Byzantine: they sign two contents under one batch id and give one to
//! each of two replicas (an equivocation), replay their batches with bytes altered, record
//! the largest values SPEC allows, and send batches signed under hostile rules (torsion in R
//! or A, small-order A, non-canonical encodings, S ≥ L, random signature bytes). Every replica
//! must still end bit-identical: each hostile signature gets the same verdict on every hop,
//! altered bytes are refused, and for each equivocated id exactly one content counts, the same
//! everywhere — the model adds the contents the replicas' epoch hashes name and must then
//! equal their totals exactly. A failing run prints its seed; rerun one with
//! `EDGETALLY_SIM_SEED=<seed> cargo test -p edgetally-tests --test it convergence`.

use edgetally_core::query::{GroupBy, TopBy};
use edgetally_core::{
    answer_round, batch_digest, Adopt, Applied, BatchId, Digest, Limits, LogEntry, PeerSync,
    Replica, RoundResult, Snapshot, SyncConfig, Transmit,
};
use edgetally_proto::{decode, open, Signer};
use edgetally_tests::{build, events, same, signer, Event, Model, Rng, NOW};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

#[derive(Clone, Debug)]
enum Msg {
    Batch {
        node: usize,
        raw: Arc<[u8]>,
    },
    Ack {
        producer: usize,
        id: BatchId,
    },
    /// A connection attempt and login ([`Transmit::Connect`]). Every message of the peer
    /// protocol carries the token of the transmit it serves and the incarnation of the node
    /// that asked: a reply reaches only the incarnation that asked (a crash ends its
    /// connections, as a process exit ends its QUIC connections).
    Hello {
        from: usize,
        to: usize,
        inc: u64,
        token: u64,
    },
    Welcome {
        from: usize,
        to: usize,
        inc: u64,
        token: u64,
    },
    /// A pull round's request ([`Transmit::Round`], [`PeerSync::poll_round`]).
    DigestReq {
        from: usize,
        to: usize,
        inc: u64,
        token: u64,
        digest: Digest,
        max: u32,
    },
    /// Its answer ([`answer_round`]).
    Entries {
        from: usize,
        to: usize,
        inc: u64,
        token: u64,
        raws: Vec<Arc<[u8]>>,
        more: bool,
        digest: Digest,
        state_hash: [u8; 32],
    },
    /// [`Transmit::Snapshot`]: `from`'s round with `to` ended in [`Adopt`].
    SnapshotReq {
        from: usize,
        to: usize,
        inc: u64,
        token: u64,
    },
    Snapshot {
        from: usize,
        to: usize,
        inc: u64,
        token: u64,
        snap: Box<Snapshot>,
    },
    /// [`Transmit::Push`]: a batch its producer brought to `from`.
    Push {
        from: usize,
        to: usize,
        inc: u64,
        token: u64,
        raw: Arc<[u8]>,
    },
    PushAck {
        from: usize,
        to: usize,
        inc: u64,
        token: u64,
    },
    /// Bytes no honest producer sends, to `node`: a batch signed under a hostile rule (its
    /// verdict `valid` computed by a reference implementation) or an altered replay (never
    /// valid). Nobody acknowledges them to anyone.
    Hostile {
        node: usize,
        raw: Arc<[u8]>,
        valid: bool,
    },
}

/// A Byzantine producer's batch: each content signed under its id (two for an equivocation),
/// with the first 16 bytes of its `batch_digest` and its events.
type Versions = Vec<([u8; 16], Vec<Event>)>;

struct Producer {
    signer: Signer,
    epoch: u64,
    next_seq: u64,
    to_make: usize,
    /// Unacked batches: raw bytes, attempts, next tick to try.
    outbox: BTreeMap<BatchId, (Arc<[u8]>, u32, u64)>,
    /// Replica preference: rendezvous order of this producer's key.
    order: Vec<usize>,
    /// Equivocates, alters replays, records extreme values, signs hostile batches.
    byzantine: bool,
    /// Equivocations still allowed (a few per producer keep the model's choice enumerable).
    equivocations_left: u32,
}

struct Node {
    replica: Replica,
    /// The merger's own peer-sync state machine, driven by this simulation.
    sync: PeerSync<usize>,
    /// Received, verified, not yet durable: lost on a crash.
    pending: Vec<(usize, LogEntry)>,
    down_until: u64,
    /// Its incarnation: +1 at every crash.
    inc: u64,
}

struct Sim {
    rng: Rng,
    tick: u64,
    nodes: Vec<Node>,
    producers: Vec<Producer>,
    queue: Vec<(u64, u64, Msg)>,
    msg_seq: u64,
    isolated: BTreeSet<usize>,
    isolated_until: u64,
    /// Every node's peer-sync configuration.
    sync: SyncConfig,
    faults: bool,
    model: Model,
    limits: Limits,
    /// Every batch of Byzantine producers, by id.
    byzantine: BTreeMap<BatchId, Versions>,
    /// Hostile batches sent so far (each signs under a fresh key).
    hostile_sent: u64,
    /// Ids of valid hostile batches (applied wherever they land, acknowledged to nobody).
    hostile_valid: BTreeSet<BatchId>,
    stats: Stats,
}

/// What a scenario exercised (summed over a run, so a run that stops exercising the Byzantine
/// paths fails instead of passing vacuously).
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    equivocations: u64,
    adoptions: u64,
    /// Snapshots adopted because the peer had pruned batches this node lacked.
    gap_adoptions: u64,
    /// Snapshots adopted because this node was further behind than `catch_up_batches`.
    catch_ups: u64,
    /// Pushes acknowledged.
    pushes: u64,
    /// Links the machine took down while up (a round or snapshot transfer outlived its
    /// deadline).
    links_lost: u64,
    /// Peers that stopped gating pruning (away longer than the horizon).
    exclusions: u64,
    hostile_refused: u64,
    hostile_applied: u64,
}

fn prefix16(d: &[u8; 32]) -> [u8; 16] {
    let mut p = [0u8; 16];
    p.copy_from_slice(&d[..16]);
    p
}

fn rendezvous(key: &[u8; 32], n: usize) -> Vec<usize> {
    let mut v: Vec<(u64, usize)> = (0..n)
        .map(|i| {
            let mut h = Rng::new(
                u64::from_le_bytes(key[..8].try_into().unwrap_or([0; 8])) ^ (i as u64) << 40,
            );
            (h.next_u64(), i)
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, i)| i).collect()
}

impl Sim {
    fn send(&mut self, msg: Msg) {
        let (drop_p, dup_p) = if self.faults { (0.15, 0.1) } else { (0.0, 0.0) };
        if self.rng.chance(drop_p) {
            return;
        }
        let copies = if self.rng.chance(dup_p) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = if self.faults { self.rng.below(6) } else { 0 };
            self.msg_seq += 1;
            self.queue
                .push((self.tick + delay, self.rng.next_u64(), msg.clone()));
        }
    }

    fn node_up(&self, i: usize) -> bool {
        self.nodes[i].down_until <= self.tick
    }

    fn cut(&self, a: usize, b: usize) -> bool {
        self.isolated.contains(&a) != self.isolated.contains(&b)
    }

    /// The peer-sync clock: 100 ms per tick.
    fn now_ms(&self) -> i64 {
        self.tick as i64 * 100
    }

    fn set_peers(&mut self) {
        let n = self.nodes.len();
        for i in 0..n {
            let node = &mut self.nodes[i];
            node.sync.set_peers((0..n).filter(|&p| p != i));
            node.sync.declare(&mut node.replica);
        }
    }

    fn produce(&mut self) {
        for p in 0..self.producers.len() {
            if self.producers[p].to_make > 0 && self.rng.chance(0.3) {
                let n = 1 + self.rng.below(20) as usize;
                let mut ev = events(&mut self.rng, n, 2 * 3_600_000);
                let byzantine = self.producers[p].byzantine;
                if byzantine {
                    // The largest magnitude SPEC §2 allows, either sign.
                    for e in ev.iter_mut() {
                        if self.rng.chance(0.3) {
                            e.eighths =
                                if self.rng.chance(0.5) { 8 } else { -8 } * 1_000_000_000_000_000;
                        }
                    }
                }
                let pr = &mut self.producers[p];
                let id = BatchId {
                    producer: pr.signer.producer(),
                    epoch: pr.epoch,
                    seq: pr.next_seq,
                };
                pr.next_seq += 1;
                pr.to_make -= 1;
                let batch = build(id, &ev);
                let raw: Arc<[u8]> = pr.signer.seal(&batch).expect("seal").into();
                pr.outbox.insert(id, (raw.clone(), 0, self.tick));
                if !byzantine {
                    ev.iter().for_each(|e| self.model.add(e));
                    continue;
                }
                let mut versions: Versions = vec![(prefix16(&batch_digest(&batch, &raw)), ev)];
                if self.producers[p].equivocations_left > 0 && self.rng.chance(0.4) {
                    // A second content under the same id, given once to a random replica.
                    self.producers[p].equivocations_left -= 1;
                    let n2 = 1 + self.rng.below(5) as usize;
                    let ev2 = events(&mut self.rng, n2, 3_600_000);
                    let b2 = build(id, &ev2);
                    let raw2: Arc<[u8]> = self.producers[p].signer.seal(&b2).expect("seal").into();
                    versions.push((prefix16(&batch_digest(&b2, &raw2)), ev2));
                    self.stats.equivocations += 1;
                    let node = self.rng.below(self.nodes.len() as u64) as usize;
                    self.send(Msg::Batch { node, raw: raw2 });
                }
                self.byzantine.insert(id, versions);
                if self.rng.chance(0.3) {
                    // A replay with one byte altered.
                    let mut bad = raw.to_vec();
                    let at = self.rng.below(bad.len() as u64) as usize;
                    bad[at] ^= 1 << self.rng.below(8);
                    let node = self.rng.below(self.nodes.len() as u64) as usize;
                    self.send(Msg::Hostile {
                        node,
                        raw: bad.into(),
                        valid: false,
                    });
                }
                if self.rng.chance(0.3) {
                    let (raw, valid) =
                        crate::signatures::hostile_batch(&mut self.rng, self.hostile_sent);
                    self.hostile_sent += 1;
                    let node = self.rng.below(self.nodes.len() as u64) as usize;
                    self.send(Msg::Hostile {
                        node,
                        raw: raw.into(),
                        valid,
                    });
                }
            }
            if self.faults && self.rng.chance(0.02) {
                // A new instance of the producer: fresh epoch, but its durable outbox survives.
                let e = self.rng.next_u64();
                let pr = &mut self.producers[p];
                pr.epoch = e;
                pr.next_seq = 0;
            }
        }
        let mut sends = Vec::new();
        let n = self.nodes.len();
        for pr in &mut self.producers {
            for (raw, attempts, next) in pr.outbox.values_mut() {
                if *next <= self.tick {
                    let live: Vec<usize> = pr.order.iter().copied().filter(|&i| i < n).collect();
                    let node = live[*attempts as usize % live.len()];
                    *attempts += 1;
                    let cap = 1u64 << (*attempts).min(4);
                    *next = self.tick + 1 + self.rng.below(cap);
                    sends.push(Msg::Batch {
                        node,
                        raw: raw.clone(),
                    });
                }
            }
        }
        for m in sends {
            self.send(m);
        }
    }

    fn deliver(&mut self) -> Result<(), String> {
        let tick = self.tick;
        let mut due: Vec<(u64, u64, Msg)> = Vec::new();
        let mut later = Vec::new();
        for m in self.queue.drain(..) {
            if m.0 <= tick {
                due.push(m)
            } else {
                later.push(m)
            }
        }
        self.queue = later;
        due.sort_by_key(|m| (m.0, m.1)); // random order among the due
        for (_, _, msg) in due {
            match msg {
                Msg::Batch { node, raw } => {
                    if !self.node_up(node) {
                        continue;
                    }
                    let batch = open(&raw, &self.limits, NOW)
                        .map_err(|e| format!("valid batch refused: {e}"))?;
                    let producer = self
                        .producers
                        .iter()
                        .position(|p| p.signer.producer() == batch.id.producer)
                        .ok_or("unknown producer")?;
                    if self.nodes[node].replica.has_applied(&batch.id) {
                        self.send(Msg::Ack {
                            producer,
                            id: batch.id,
                        });
                    } else {
                        self.nodes[node].pending.push((
                            producer,
                            LogEntry {
                                batch: Arc::new(batch),
                                raw,
                            },
                        ));
                    }
                }
                Msg::Ack { producer, id } => {
                    self.producers[producer].outbox.remove(&id);
                }
                Msg::Hostile { node, raw, valid } => {
                    if !self.node_up(node) {
                        continue;
                    }
                    match (open(&raw, &self.limits, NOW), valid) {
                        (Ok(batch), true) => {
                            self.stats.hostile_applied += 1;
                            self.hostile_valid.insert(batch.id);
                            self.nodes[node].pending.push((
                                usize::MAX,
                                LogEntry {
                                    batch: Arc::new(batch),
                                    raw,
                                },
                            ));
                        }
                        (Err(_), false) => self.stats.hostile_refused += 1,
                        (r, _) => {
                            return Err(format!(
                                "hostile bytes got {:?}, the reference says valid = {valid}",
                                r.map(|b| b.id)
                            ))
                        }
                    }
                }
                Msg::Hello {
                    from,
                    to,
                    inc,
                    token,
                } => {
                    if self.serves(from, to) {
                        self.send(Msg::Welcome {
                            from: to,
                            to: from,
                            inc,
                            token,
                        });
                    }
                }
                Msg::Welcome {
                    from,
                    to,
                    inc,
                    token,
                } => {
                    if self.hears(from, to, inc) {
                        let now = self.now_ms();
                        // A node key per replica, as a login proves it.
                        let key = [from as u8; 32];
                        self.nodes[to].sync.handle_connected(&from, token, key, now);
                    }
                }
                Msg::SnapshotReq {
                    from,
                    to,
                    inc,
                    token,
                } => {
                    if !self.serves(from, to) {
                        continue;
                    }
                    // Over the wire and back: what a merger sends.
                    let wire = self.nodes[to].replica.snapshot().encode();
                    let snap = Snapshot::decode(&wire)?;
                    self.send(Msg::Snapshot {
                        from: to,
                        to: from,
                        inc,
                        token,
                        snap: Box::new(snap),
                    });
                }
                Msg::Snapshot {
                    from,
                    to,
                    inc,
                    token,
                    snap,
                } => {
                    if !self.hears(from, to, inc) {
                        continue;
                    }
                    // As the merger's I/O task: adopt, then report by token.
                    let fresh = self.nodes[to]
                        .replica
                        .adopt(*snap)
                        .map_err(|e| e.to_string())?;
                    let now = self.now_ms();
                    let node = &mut self.nodes[to];
                    node.sync
                        .handle_adopted_reply(&from, token, fresh.is_some(), now);
                    if let Some(fresh) = fresh {
                        if !fresh.digest().covers(&node.replica.digest()) {
                            return Err("adopt lost batches".into());
                        }
                        self.stats.adoptions += 1;
                        node.replica = fresh;
                    }
                }
                Msg::DigestReq {
                    from,
                    to,
                    inc,
                    token,
                    digest,
                    max,
                } => {
                    if !self.serves(from, to) {
                        continue;
                    }
                    let a = answer_round(&self.nodes[to].replica, &digest, max, 2000);
                    self.send(Msg::Entries {
                        from: to,
                        to: from,
                        inc,
                        token,
                        raws: a.batches.into_iter().map(|e| e.raw).collect(),
                        more: a.more,
                        digest: a.digest,
                        state_hash: a.state_hash,
                    });
                }
                Msg::Entries {
                    from,
                    to,
                    inc,
                    token,
                    raws,
                    more,
                    digest,
                    state_hash,
                } => {
                    if !self.hears(from, to, inc) {
                        continue;
                    }
                    let pulled = raws.len() as u64;
                    for raw in raws {
                        self.apply_from_peer(to, raw)?;
                    }
                    // The merger's decisions, by the merger's own state machine.
                    let now = self.now_ms();
                    let node = &mut self.nodes[to];
                    let outcome = node.sync.handle_round_reply(
                        &from,
                        token,
                        now,
                        i64::MIN,
                        RoundResult {
                            theirs: digest,
                            more,
                            their_hash: state_hash,
                            pulled,
                            retried: false,
                            refused: false,
                        },
                        &mut node.replica,
                    );
                    match outcome.and_then(|o| o.adopt) {
                        Some(Adopt::Gap) => self.stats.gap_adoptions += 1,
                        Some(Adopt::FarBehind) => self.stats.catch_ups += 1,
                        _ => {}
                    }
                }
                Msg::Push {
                    from,
                    to,
                    inc,
                    token,
                    raw,
                } => {
                    if self.serves(from, to) {
                        self.apply_from_peer(to, raw)?;
                        self.send(Msg::PushAck {
                            from: to,
                            to: from,
                            inc,
                            token,
                        });
                    }
                }
                Msg::PushAck {
                    from,
                    to,
                    inc,
                    token,
                } => {
                    if self.hears(from, to, inc) {
                        let now = self.now_ms();
                        self.nodes[to]
                            .sync
                            .handle_push_reply(&from, token, true, now);
                        self.stats.pushes += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether `to` answers a request `from` sent (up, and not cut off from it).
    fn serves(&self, from: usize, to: usize) -> bool {
        self.node_up(to) && !self.cut(from, to)
    }

    /// Whether `to` hears a reply `from` sent to its incarnation `inc`.
    fn hears(&self, from: usize, to: usize, inc: u64) -> bool {
        self.serves(from, to) && self.nodes[to].inc == inc
    }

    /// A batch a peer sent (pulled or pushed): the producer's own bytes, verified again, no
    /// clock check, applied.
    fn apply_from_peer(&mut self, to: usize, raw: Arc<[u8]>) -> Result<(), String> {
        let batch = decode(&raw, &self.limits)
            .and_then(|u| u.verify())
            .map_err(|e| format!("forwarded batch refused: {e}"))?;
        self.nodes[to]
            .replica
            .apply(LogEntry {
                batch: Arc::new(batch),
                raw,
            })
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    fn flush(&mut self, p: f64) -> Result<(), String> {
        let now = self.now_ms();
        for i in 0..self.nodes.len() {
            if !self.node_up(i) || !self.rng.chance(p) {
                continue;
            }
            let pending = std::mem::take(&mut self.nodes[i].pending);
            for (producer, e) in pending {
                let id = e.batch.id;
                let raw = e.raw.clone();
                match self.nodes[i].replica.apply(e).map_err(|e| e.to_string())? {
                    Applied::New => {
                        // Durable: pushed to the peers (as the merger's ingest feeds its
                        // driver), acknowledged to its producer.
                        self.nodes[i].sync.queue_push(raw, now);
                        if producer != usize::MAX {
                            self.send(Msg::Ack { producer, id });
                        }
                    }
                    Applied::Duplicate if producer != usize::MAX => {
                        self.send(Msg::Ack { producer, id })
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Every node up drives its peer machine as the merger's driver does: timers first, then
    /// every transmit onto the network.
    fn drive(&mut self) {
        let now = self.now_ms();
        for from in 0..self.nodes.len() {
            if !self.node_up(from) {
                continue;
            }
            let node = &mut self.nodes[from];
            let excluded = node.sync.handle_timeout(now);
            if !excluded.is_empty() {
                node.sync.declare(&mut node.replica);
                self.stats.exclusions += excluded.len() as u64;
            }
            let inc = node.inc;
            while let Some(t) = self.nodes[from].sync.poll_transmit() {
                let msg = match t {
                    Transmit::Connect { peer, token } => Msg::Hello {
                        from,
                        to: peer,
                        inc,
                        token,
                    },
                    Transmit::Round { peer, token } => {
                        let node = &self.nodes[from];
                        let req = node.sync.poll_round(&node.replica, i64::MIN);
                        Msg::DigestReq {
                            from,
                            to: peer,
                            inc,
                            token,
                            digest: req.digest,
                            max: req.max,
                        }
                    }
                    Transmit::Snapshot { peer, token, .. } => Msg::SnapshotReq {
                        from,
                        to: peer,
                        inc,
                        token,
                    },
                    Transmit::Push { peer, token, batch } => Msg::Push {
                        from,
                        to: peer,
                        inc,
                        token,
                        raw: batch,
                    },
                    Transmit::Close { .. } => {
                        // No connection object here: requests are answered per message.
                        self.stats.links_lost += 1;
                        continue;
                    }
                };
                self.send(msg);
            }
        }
    }

    fn chaos(&mut self) {
        let n = self.nodes.len();
        if self.rng.chance(0.02) {
            let i = self.rng.below(n as u64) as usize;
            let now = self.now_ms();
            let node = &mut self.nodes[i];
            node.pending.clear(); // un-persisted work is lost
            node.down_until = self.tick + 3 + self.rng.below(15);
            node.inc += 1; // its connections end with it
                           // A restarted merger knows nothing of its peers yet.
            node.sync = PeerSync::new(self.sync, (0..n).filter(|&p| p != i), now);
            node.sync.declare(&mut node.replica);
        }
        if self.isolated.is_empty() && self.rng.chance(0.02) {
            // One node cut off, or the group split in two (2 | 2, 2 | 3, 3 | 3): producers
            // still reach every node, so both sides take writes.
            let k = if n >= 4 && self.rng.chance(0.5) {
                n / 2
            } else {
                1
            };
            while self.isolated.len() < k {
                self.isolated.insert(self.rng.below(n as u64) as usize);
            }
            self.isolated_until = self.tick + 5 + self.rng.below(30);
        } else if self.tick >= self.isolated_until {
            self.isolated.clear();
        }
    }
}

/// How long after healing every replica must be identical, ticks of 100 ms: links down at
/// the heal come back within the backoff (at most 1 s), then a pull round (every 500 ms)
/// brings what pushes did not.
const HEAL_TICKS: u64 = 100;

fn scenario(seed: u64) -> Result<Stats, String> {
    let mut rng = Rng::new(seed);
    let n_nodes = 3 + rng.below(3) as usize;
    let n_prod = 3 + rng.below(6) as usize;
    let producers = (0..n_prod)
        .map(|i| {
            let s = signer(seed.wrapping_mul(31).wrapping_add(i as u64));
            let order = rendezvous(&s.producer().0, n_nodes + 1);
            Producer {
                signer: s,
                epoch: rng.next_u64(),
                next_seq: 0,
                to_make: 2 + rng.below(9) as usize,
                outbox: BTreeMap::new(),
                order,
                // Producer 0 in half the scenarios, any other in one of eight.
                byzantine: if i == 0 {
                    seed.is_multiple_of(2)
                } else {
                    rng.chance(0.125)
                },
                equivocations_left: 3,
            }
        })
        .collect();
    // Peer sync: in half the scenarios a horizon (1.5 s = 15 ticks) that partitions and
    // crashes outlast; in a third, rounds of 4 batches and snapshot catch-up beyond 6.
    let small_rounds = rng.chance(0.33);
    // Deadlines shorter than the merger's, and a push window of 8 with 16 waiting, so that
    // timeouts, backoff and dropped pushes happen within a scenario.
    let sync = SyncConfig {
        interval_ms: 500,
        horizon_ms: if rng.chance(0.5) { 1_500 } else { 600_000 },
        catch_up_batches: if small_rounds { 6 } else { 10_000 },
        round_max: if small_rounds { 4 } else { 2000 },
        connect_timeout_ms: 300,
        round_timeout_ms: 1_000,
        backoff_max_ms: 1_000,
        push_window: 8,
        push_queue: 16,
    };
    let nodes = (0..n_nodes)
        .map(|i| Node {
            sync: PeerSync::new(sync, (0..n_nodes).filter(|&p| p != i), 0),
            replica: Replica::new(),
            pending: Vec::new(),
            down_until: 0,
            inc: 0,
        })
        .collect();
    let mut sim = Sim {
        rng,
        tick: 0,
        nodes,
        producers,
        queue: Vec::new(),
        msg_seq: 0,
        isolated: BTreeSet::new(),
        isolated_until: 0,
        sync,
        faults: true,
        model: Model::default(),
        limits: Limits::default(),
        byzantine: BTreeMap::new(),
        hostile_sent: 0,
        hostile_valid: BTreeSet::new(),
        stats: Stats::default(),
    };
    sim.set_peers();
    let bootstrap_at = if sim.rng.chance(0.4) {
        Some(20 + sim.rng.below(40))
    } else {
        None
    };
    for _ in 0..120 {
        sim.tick += 1;
        sim.produce();
        sim.deliver()?;
        sim.flush(0.5)?;
        sim.drive();
        sim.chaos();
        if Some(sim.tick) == bootstrap_at {
            let src = (0..sim.nodes.len()).find(|&i| sim.node_up(i)).unwrap_or(0);
            let snap = sim.nodes[src].replica.snapshot();
            let wire = postcard::to_allocvec(&snap).map_err(|e| e.to_string())?;
            let snap = postcard::from_bytes(&wire).map_err(|e| e.to_string())?;
            let replica = Replica::restore(snap).map_err(|e| e.to_string())?;
            let (n, now) = (sim.nodes.len(), sim.now_ms());
            sim.nodes.push(Node {
                sync: PeerSync::new(sync, 0..n, now),
                replica,
                pending: Vec::new(),
                down_until: 0,
                inc: 0,
            });
            sim.set_peers();
        }
    }
    // Heal: no more faults; producers finish; everyone exchanges until nothing changes.
    sim.faults = false;
    sim.isolated.clear();
    for node in &mut sim.nodes {
        node.down_until = 0;
    }
    for p in &mut sim.producers {
        p.to_make = 0;
        for v in p.outbox.values_mut() {
            v.2 = 0;
        }
    }
    let mut rounds = 0;
    loop {
        rounds += 1;
        sim.tick += 1;
        sim.produce();
        for _ in 0..3 {
            sim.deliver()?;
            sim.flush(1.0)?;
            sim.drive();
        }
        for _ in 0..3 {
            sim.deliver()?;
        }
        let hash = sim.nodes[0].replica.state_hash();
        let quiet = sim.producers.iter().all(|p| p.outbox.is_empty())
            && sim.queue.is_empty()
            && sim.nodes.iter().all(|n| {
                n.replica.log_len() == 0 && n.pending.is_empty() && n.replica.state_hash() == hash
            });
        if quiet {
            break;
        }
        if rounds > HEAL_TICKS {
            let states: Vec<String> = sim
                .nodes
                .iter()
                .map(|n| {
                    format!(
                        "log {} pending {} hash {:02x?}",
                        n.replica.log_len(),
                        n.pending.len(),
                        &n.replica.state_hash()[..4]
                    )
                })
                .collect();
            for n in &sim.nodes {
                let d = n.replica.digest();
                let d0 = sim.nodes[0].replica.digest();
                for (k, v) in &d.epochs {
                    if d0.epochs.get(k) != Some(v) {
                        eprintln!(
                            "epoch {:?}: {:?} vs n0 {:?}",
                            (&k.0 .0[..2], k.1),
                            v,
                            d0.epochs.get(k)
                        );
                    }
                }
            }
            return Err(format!(
                "did not converge within {HEAL_TICKS} ticks after healing: outboxes {:?}, queue {}, nodes {states:?}",
                sim.producers.iter().map(|p| p.outbox.len()).collect::<Vec<_>>(),
                sim.queue.len()
            ));
        }
    }
    // Bit-identical replicas.
    let snaps: Vec<Vec<u8>> = sim
        .nodes
        .iter()
        .map(|n| postcard::to_allocvec(&n.replica.snapshot()).unwrap_or_default())
        .collect();
    if snaps.iter().any(|s| *s != snaps[0]) {
        return Err("replicas differ after convergence".into());
    }
    let r = &sim.nodes[0].replica;
    for id in &sim.hostile_valid {
        if !r.has_applied(id) {
            // Sent once and lost (dropped, or pending at a crash): never counted anywhere.
            continue;
        }
        // hostile_batch: one event of value 1 in category "sig" at NOW.
        sim.model.add(&Event {
            category: "sig".into(),
            entity: None,
            ts_ms: NOW,
            eighths: 8,
        });
    }
    resolve_equivocations(r, &sim.byzantine, &mut sim.model)?;
    check_against_model(r, &sim.model)?;
    Ok(sim.stats)
}

/// Adds to the model, for each Byzantine epoch, the one combination of contents whose epoch
/// hash is the replica's (every content of a non-equivocated id; one of each equivocated id's
/// two): the outcome the rule defines. None matching means a mix or a double count.
fn resolve_equivocations(
    r: &Replica,
    byzantine: &BTreeMap<BatchId, Versions>,
    model: &mut Model,
) -> Result<(), String> {
    let digest = r.digest();
    let mut epochs: BTreeMap<_, Vec<&Versions>> = BTreeMap::new();
    for (id, v) in byzantine {
        epochs.entry((id.producer, id.epoch)).or_default().push(v);
    }
    for (key, batches) in epochs {
        let seen = digest
            .epochs
            .get(&key)
            .ok_or("a Byzantine epoch is missing")?;
        if seen.seqs.len() != batches.len() as u64 {
            return Err("a Byzantine epoch holds another number of batches".into());
        }
        let split: Vec<usize> = (0..batches.len())
            .filter(|&i| batches[i].len() > 1)
            .collect();
        let mut found = None;
        for mask in 0u32..1 << split.len() {
            let mut sum = 0u128;
            let mut pick = vec![0usize; batches.len()];
            for (bit, &i) in split.iter().enumerate() {
                pick[i] = (mask >> bit & 1) as usize;
            }
            for (i, v) in batches.iter().enumerate() {
                sum = sum.wrapping_add(u128::from_le_bytes(v[pick[i]].0));
            }
            if Some(sum.to_le_bytes()) == seen.hash {
                found = Some(pick);
                break;
            }
        }
        let pick = found.ok_or("no one-content-per-id combination gives the epoch's hash")?;
        for (v, &k) in batches.iter().zip(&pick) {
            v[k].1.iter().for_each(|e| model.add(e));
        }
    }
    Ok(())
}

/// Every key, every category over the whole range (read through the tiers), top-k and totals.
pub(crate) fn check_against_model(r: &Replica, m: &Model) -> Result<(), String> {
    for (c, e, b) in m.keys.keys() {
        let got = r.aggregate(c, e.as_deref(), *b, b + 1000);
        let want = m.total(|c2, e2, b2| c2 == c && b2 == *b && (e.is_none() || e2 == e.as_deref()));
        if !same(&got.total, want) {
            return Err(format!(
                "key ({c}, {e:?}, {b}): got {:?}, want {want:?}",
                got.total
            ));
        }
    }
    let (start, end) = (NOW - 10 * 86_400_000 + 777, NOW + 3_600_000);
    let cats: BTreeSet<&String> = m.keys.keys().map(|k| &k.0).collect();
    for c in &cats {
        let got = r.aggregate(c, None, start, end);
        if (got.start, got.end) != (NOW - 10 * 86_400_000 + 1000, NOW + 3_600_000) {
            return Err(format!("window {:?}", (got.start, got.end)));
        }
        if !same(&got.total, m.total(|c2, _, _| c2 == c.as_str())) {
            return Err(format!("category {c} over the range"));
        }
        let top = r.topk(c, start, end, 3, TopBy::Entity);
        let mut want: Vec<(u64, String)> = BTreeSet::from_iter(
            m.keys
                .keys()
                .filter(|k| k.0 == **c)
                .filter_map(|k| k.1.clone()),
        )
        .into_iter()
        .map(|e| {
            (
                m.total(|c2, e2, _| c2 == c.as_str() && e2 == Some(e.as_str()))
                    .map_or(0, |t| t.count),
                e,
            )
        })
        .collect();
        want.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        want.truncate(3);
        let got: Vec<(u64, String)> = top
            .rows
            .iter()
            .map(|(n, t)| (t.count, n.clone().unwrap_or_default()))
            .collect();
        if got != want {
            return Err(format!("topk {c}: {got:?} vs {want:?}"));
        }
    }
    let all = r.totals(start, end, GroupBy::None);
    if !same(&all.rows[0].1, m.total(|_, _, _| true)) {
        return Err("totals none".into());
    }
    for (name, t) in r.totals(start, end, GroupBy::Entity).rows {
        if !same(&t, m.total(|_, e, _| e == name.as_deref())) {
            return Err(format!("totals entity {name:?}"));
        }
    }
    check_sketches(r, m, start, end)
}

/// Each category's sketches over the whole range, byte for byte the model's (built from
/// every event it counted): the union of whatever batches, in whatever order, reached it.
pub(crate) fn check_sketches(r: &Replica, m: &Model, start: i64, end: i64) -> Result<(), String> {
    let cats: BTreeSet<&String> = m.keys.keys().map(|k| &k.0).collect();
    for c in cats {
        let got = r.sketches(c, None, start, end).sketches;
        let want_d = m.distinct.get(c).map(|h| h.encode());
        let want_q = m.quantiles.get(c).map(|q| q.encode());
        if got.distinct.as_ref().map(|h| h.encode()) != want_d {
            return Err(format!("{c}: distinct sketch differs from the model's"));
        }
        if got.quantiles.as_ref().map(|q| q.encode()) != want_q {
            return Err(format!("{c}: quantile sketch differs from the model's"));
        }
    }
    Ok(())
}

fn run_seeds(range: std::ops::Range<u64>) {
    if let Ok(s) = std::env::var("EDGETALLY_SIM_SEED") {
        let seed: u64 = s.parse().expect("EDGETALLY_SIM_SEED must be a number");
        if range.contains(&seed) || range.start == 0 {
            if let Err(e) = scenario(seed) {
                panic!("simulation seed {seed} failed: {e}");
            }
        }
        return;
    }
    let scale: u64 = std::env::var("EDGETALLY_SIM_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let range = range.start * scale..range.end * scale;
    let mut sum = Stats::default();
    for seed in range.clone() {
        match std::panic::catch_unwind(|| scenario(seed)) {
            Ok(Ok(s)) => {
                sum.equivocations += s.equivocations;
                sum.adoptions += s.adoptions;
                sum.gap_adoptions += s.gap_adoptions;
                sum.catch_ups += s.catch_ups;
                sum.exclusions += s.exclusions;
                sum.pushes += s.pushes;
                sum.links_lost += s.links_lost;
                sum.hostile_refused += s.hostile_refused;
                sum.hostile_applied += s.hostile_applied;
            }
            Ok(Err(e)) => {
                panic!("simulation seed {seed} failed: {e} (rerun: EDGETALLY_SIM_SEED={seed})")
            }
            Err(_) => panic!("simulation seed {seed} panicked (rerun: EDGETALLY_SIM_SEED={seed})"),
        }
    }
    eprintln!("seeds {range:?}: {sum:?}");
    assert!(
        sum.equivocations > 0
            && sum.adoptions > 0
            && sum.gap_adoptions > 0
            && sum.catch_ups > 0
            && sum.exclusions > 0
            && sum.pushes > 0
            && sum.links_lost > 0
            && sum.hostile_refused > 0
            && sum.hostile_applied > 0,
        "the Byzantine or catch-up paths were not exercised: {sum:?}"
    );
}

// 1,000 seeded scenarios per run, split so the test harness spreads them over the cores.
#[test]
fn simulated_cluster_converges_seeds_0_250() {
    run_seeds(0..250);
}
#[test]
fn simulated_cluster_converges_seeds_250_500() {
    run_seeds(250..500);
}
#[test]
fn simulated_cluster_converges_seeds_500_750() {
    run_seeds(500..750);
}
#[test]
fn simulated_cluster_converges_seeds_750_1000() {
    run_seeds(750..1000);
}

/// Seeds that once failed, each for the flaw it found (run 20× wider than CI, 20,000 seeds).
/// 7814: a replica adopting a snapshot that held more of an epoch than it did dropped the
/// retained entries of that epoch, which the snapshot's node had pruned too (for a peer it
/// had excluded): the batches were lost to that peer. 11363: three majorities formed over time
/// ({0,1}, {1,2}, then {0,2} while 0 and 2 each held batches the other had lost for good),
/// so no node held everything and no snapshot could cover another.
#[test]
fn regression_seeds_converge() {
    for seed in [7814, 11363] {
        if let Err(e) = scenario(seed) {
            panic!("simulation seed {seed} failed: {e}");
        }
    }
}

/// A settled round whose peer holds `r` and sent nothing.
fn settled_round(r: &Replica) -> RoundResult {
    RoundResult {
        theirs: r.digest(),
        more: false,
        their_hash: r.state_hash(),
        pulled: 0,
        retried: false,
        refused: false,
    }
}

/// The gap rule of `PeerSync` (what seed 11363 needed): a peer whose last settled round showed
/// it holding batches this node lacks and cannot pull does not count towards the majority
/// that lets this node stop retaining for an away peer — until this node adopts its snapshot.
/// Driven through the machine's own timers and replies, as the merger drives it.
#[test]
fn a_peer_holding_what_this_node_lacks_for_good_makes_no_majority() {
    let cfg = SyncConfig {
        interval_ms: 100,
        horizon_ms: 5_000,
        catch_up_batches: 10,
        connect_timeout_ms: 50,
        ..SyncConfig::default()
    };
    let mut mine = Replica::new();
    let mut theirs = Replica::new();
    let id = BatchId {
        producer: edgetally_tests::key(1),
        epoch: 1,
        seq: 0,
    };
    theirs
        .apply(edgetally_tests::entry(build(
            id,
            &events(&mut Rng::new(1), 3, 1000),
        )))
        .expect("apply");
    let drain =
        |s: &mut PeerSync<usize>| std::iter::from_fn(|| s.poll_transmit()).collect::<Vec<_>>();
    // Peers 0 and 1: 0 answers its login, 1 never does.
    let mut s = PeerSync::new(cfg, [0usize, 1], 0);
    assert!(s.handle_timeout(0).is_empty());
    let login = drain(&mut s)
        .into_iter()
        .find_map(|t| match t {
            Transmit::Connect { peer: 0, token } => Some(token),
            _ => None,
        })
        .expect("a connection attempt to 0");
    assert!(s.handle_connected(&0, login, [0; 32], 0));
    // At 6 s (past the horizon for 1) a round with 0: 0 pruned the batch — it is in 0's
    // digest, and the round brought nothing. A gap: adopt 0's snapshot.
    assert!(s.handle_timeout(6_000).is_empty());
    let round = drain(&mut s)
        .into_iter()
        .find_map(|t| match t {
            Transmit::Round { peer: 0, token } => Some(token),
            _ => None,
        })
        .expect("a round with 0");
    let result = settled_round(&theirs);
    let out = s
        .handle_round_reply(&0, round, 6_000, i64::MIN, result, &mut mine)
        .expect("the current round");
    assert_eq!(out.adopt, Some(Adopt::Gap));
    let snapshot = match drain(&mut s).as_slice() {
        [Transmit::Snapshot { peer: 0, token, .. }] => *token,
        other => panic!("no snapshot asked: {other:?}"),
    };
    assert!(s.status(6_000)[&0].gap);
    // The next attempt to reach 1 asks whether it may stop retaining for it: not with 0.
    assert!(
        s.handle_timeout(6_100).is_empty(),
        "a peer with a gap made a majority with this node"
    );
    assert!(!s.status(6_100)[&1].excluded);
    // Once 0's snapshot is adopted, the two are one side again: the next attempt excludes 1.
    mine = mine
        .adopt(theirs.snapshot())
        .expect("adopt")
        .expect("covers");
    assert!(s.handle_adopted_reply(&0, snapshot, true, 6_150));
    assert!(!s.status(6_150)[&0].gap);
    let next = s.poll_timeout().expect("a timer");
    assert!(next <= 6_400, "the next attempt to reach 1 at {next}");
    let mut excluded = Vec::new();
    for t in (6_150..=6_400).step_by(50) {
        excluded.extend(s.handle_timeout(t));
        // Answer 0's rounds so that it stays reachable.
        for tr in drain(&mut s) {
            if let Transmit::Round { peer: 0, token } = tr {
                let r = settled_round(&mine);
                s.handle_round_reply(&0, token, t, i64::MIN, r, &mut mine);
            }
        }
    }
    assert_eq!(excluded, vec![1]);
    assert!(s.status(6_400)[&1].excluded);
    assert!(mine.has_applied(&id));
}
