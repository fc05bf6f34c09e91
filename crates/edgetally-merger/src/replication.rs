//! Replication between mergers: authenticated QUIC links (ALPN `edgetally-peer/3`, on the
//! same port as ingest), push of newly applied batches, and pull by digest (anti-entropy).
//! Every decision about peers — what a round asks for, what its result calls for, when an
//! away peer stops gating pruning — is `edgetally_core::PeerSync`'s, a sans-IO state
//! machine the cluster simulation drives too; this module is its I/O.
//!
//! - **Authentication.** After the TLS handshake each side sends a `Hello` with its node key
//!   and a proof bound to this TLS session (its exported keying material, so a proof cannot be
//!   replayed on another connection, and to the side's role, so it cannot be reflected):
//!   HMAC-SHA256 under the shared `cluster_secret`, and/or an ed25519 signature by the node key
//!   when `peer_keys` lists the allowed nodes. A node with peers but neither credential refuses
//!   to start: no peer data (batches, digests, snapshots) is served to or taken from a peer
//!   that has not proved itself on that very connection, loopback or not. An unknown node is
//!   refused and disconnected.
//! - **Pull.** Every `sync_interval_ms` each node sends each peer its `Digest`; the peer answers
//!   with the retained batches the digest lacks (the producers' original signed bytes, at most
//!   `SYNC_BATCH` per round) and its own digest. Pulled batches go through this node's own
//!   ingest pipeline — decoded, time-checked, signature-verified, deduplicated, written and
//!   fsynced, applied — exactly like a producer's, so a peer cannot forge a producer's data.
//!   The peer's digest is recorded (`Replica::observe_peer`): a retained batch is pruned once
//!   every configured peer's digest covers it.
//! - **Push.** Batches a producer (or `POST /v1/events`) brought to this node are pushed to
//!   every peer right after they are applied, for low replication lag; pushes are best-effort
//!   (a lost one is pulled on the next round), and batches that came from a peer are not pushed
//!   on (full mesh: the origin reaches everyone).
//! - **Bootstrap.** A node that starts with an empty store asks its peers for a snapshot first.
//!
//! Convergence: every batch a node applied stays in its retained log until all its peers'
//! digests cover it, and every node pulls from every peer, so each batch applied anywhere
//! reaches every node once the links work; apply is idempotent and commutative, so the order
//! of pushes, pulls and producer retries changes nothing (docs/design/replication.md).

use crate::node::Node;
use crate::peer::{request, PeerError, Request, SyncItem, HELLO_DEADLINE, MAX_MESSAGE};
pub use crate::peer::{PeerStatus, Replication, SYNC_BATCH};
use edgetally_core::{answer_round, Adopt, RoundResult, Snapshot, Transmit};
use edgetally_net::now_ms;
use edgetally_proto::Reply;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use tracing::{debug, info, warn};

pub async fn serve_peer(node: Arc<Node>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let Some(repl) = node.replication.clone() else {
        conn.close(1u32.into(), b"no replication");
        return;
    };
    // The first stream is the handshake, and it must come promptly: a connection that never
    // says Hello is not held.
    let authed = tokio::time::timeout(
        HELLO_DEADLINE,
        crate::handshake::accept_hello(&repl.auth, &conn, remote),
    )
    .await
    .unwrap_or_else(|_| Err(crate::peer::PeerError::Timeout("Hello")));
    let peer_node = match authed {
        Ok(n) => n,
        Err(why) => {
            warn!(%remote, "peer refused: {why}");
            node.metrics.peer_refused.fetch_add(1, Relaxed);
            conn.close(2u32.into(), b"unauthenticated");
            return;
        }
    };
    debug!(%remote, node = %edgetally_net::tls::hex(&peer_node), "peer connected");
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => break,
        };
        let node = node.clone();
        // A peer of an earlier release cannot read batch format v2 nor snapshot format 6:
        // it is not sent them (PROTOCOL.md §9, "Features").
        let sketches = repl.auth.facts.speaks(&peer_node, "sketches");
        tokio::spawn(async move {
            if let Err(e) = answer(node, send, recv, sketches).await {
                debug!("peer request failed: {e}");
            }
        });
    }
}

// Long by design: one arm per peer request kind (a dispatch); each arm is a few lines of I/O.
async fn answer(
    node: Arc<Node>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    sketches: bool,
) -> Result<(), PeerError> {
    let raw = recv
        .read_to_end(MAX_MESSAGE)
        .await
        .map_err(PeerError::from)?;
    let (req, rest): (Request, &[u8]) =
        postcard::take_from_bytes(&raw).map_err(|_| PeerError::Malformed("request"))?;
    match req {
        Request::Push { batch } => {
            let reply = node.ingest.submit_from_peer(batch).await;
            send.write_all(&reply.encode())
                .await
                .map_err(PeerError::from)?;
        }
        Request::Sync { digest, max } => {
            let answer = answer_round(&node.state(), &digest, max, SYNC_BATCH);
            for e in answer.batches {
                if !sketches && crate::peer::is_v2(&e.raw) {
                    continue;
                }
                let item = postcard::to_allocvec(&SyncItem::Batch(e.raw.to_vec()))
                    .map_err(PeerError::from)?;
                send.write_all(&edgetally_proto::encode_frame(&item))
                    .await
                    .map_err(PeerError::from)?;
            }
            let mut done = postcard::to_allocvec(&SyncItem::Done {
                digest: answer.digest,
                more: answer.more,
                state_hash: answer.state_hash,
            })
            .map_err(PeerError::from)?;
            // This node's facts after the `Done` (nodes of an earlier release stop reading at
            // its end): its topology version and settings, current at every round.
            done.extend(
                node.replication
                    .as_ref()
                    .map_or_else(Vec::new, |r| r.auth.facts.ext_bytes()),
            );
            send.write_all(&edgetally_proto::encode_frame(&done))
                .await
                .map_err(PeerError::from)?;
        }
        Request::Snapshot if !sketches => {
            return Err(PeerError::NotServed(
                "snapshot format 6 to a node without the sketches feature",
            ));
        }
        Request::Snapshot => {
            // Encoded straight from the state: no snapshot value beside it.
            let bytes = node.state().encode_snapshot().map_err(PeerError::Local)?;
            send.write_all(&bytes).await.map_err(PeerError::from)?;
        }
        Request::Forward { batch, version } => {
            // From a node of an earlier release: nothing follows.
            let ext: crate::peer::ForwardExt = postcard::from_bytes(rest).unwrap_or_default();
            let reply = node.forwarded(batch, version, ext.source).await;
            send.write_all(&reply.encode())
                .await
                .map_err(PeerError::from)?;
        }
        Request::Query(q) => {
            let part = node.part(&q);
            let bytes = postcard::to_allocvec(&part).map_err(PeerError::from)?;
            send.write_all(&bytes).await.map_err(PeerError::from)?;
        }
        Request::Topology => {
            let json = match &node.cluster {
                Some(c) => serde_json::to_vec(&*c.topology()).map_err(PeerError::from)?,
                None => return Err(PeerError::NotServed("no topology here")),
            };
            send.write_all(&json).await.map_err(PeerError::from)?;
        }
        Request::Adopt(json) => {
            let Some(c) = &node.cluster else {
                return Err(PeerError::NotServed("no topology here"));
            };
            adopt_from_peer(c, &json).await;
            let v = postcard::to_allocvec(&c.topology().version).map_err(PeerError::from)?;
            send.write_all(&v).await.map_err(PeerError::from)?;
        }
        Request::Handoff { topology, to } => {
            let Some(c) = &node.cluster else {
                return Err(PeerError::NotServed("no topology here"));
            };
            // Adopting waits until every batch routed by the older topology is applied: the
            // seen-sets below then hold all this node will ever take of `to`'s producers.
            adopt_from_peer(c, &topology).await;
            let reply = {
                let r = node.state();
                c.seen_for(&r, &to)
            };
            let bytes = postcard::to_allocvec(&reply).map_err(PeerError::from)?;
            send.write_all(&bytes).await.map_err(PeerError::from)?;
        }
        Request::DrainState => {
            let st = node.drain_state();
            let bytes = postcard::to_allocvec(&st).map_err(PeerError::from)?;
            send.write_all(&bytes).await.map_err(PeerError::from)?;
        }
    }
    let _ = send.finish();
    Ok(())
}

/// Adopts a topology (JSON) another node sent, if it is newer.
async fn adopt_from_peer(c: &crate::cluster::Cluster, json: &[u8]) {
    let t = match serde_json::from_slice::<edgetally_proto::topology::Topology>(json) {
        Ok(t) => t,
        Err(e) => {
            warn!("a peer's topology does not parse: {e}");
            return;
        }
    };
    if t.version <= c.topology().version {
        return;
    }
    let v = t.version;
    match c.install(t).await {
        Ok(true) => {
            c.metrics
                .adoptions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            info!(
                version = v,
                "adopted a newer topology handed by another node"
            );
        }
        Ok(false) => {}
        Err(e) => warn!("a newer topology handed by another node not adopted: {e}"),
    }
}

/// Runs the links to every configured peer until `stop`: one task driving the node's
/// [`PeerSync`](edgetally_core::PeerSync) machine.
pub fn spawn_links(
    node: Arc<Node>,
    endpoint: quinn::Endpoint,
    stop: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    if node.config.peers.is_empty() {
        return Vec::new();
    }
    vec![tokio::spawn(drive(node, endpoint, stop))]
}

/// What an I/O task reports back to the driver, with the token of its transmit.
enum Event {
    Connected {
        peer: SocketAddr,
        token: u64,
        got: Result<(quinn::Connection, [u8; 32]), PeerError>,
    },
    Round {
        peer: SocketAddr,
        token: u64,
        cutoff: i64,
        got: Result<RoundResult, PeerError>,
    },
    Adopted {
        peer: SocketAddr,
        token: u64,
        why: Adopt,
        got: Result<bool, PeerError>,
    },
    Pushed {
        peer: SocketAddr,
        token: u64,
        acked: bool,
    },
}

/// The driver: it only moves bytes and time. Every decision — when to connect, when a round
/// is due or late, what a round's result calls for, which pushes go out — is the machine's
/// (`edgetally_core::sync::link`); this loop feeds it the clock and the outcomes of the I/O it
/// asks for, each I/O in its own task.
async fn drive(node: Arc<Node>, endpoint: quinn::Endpoint, mut stop: watch::Receiver<bool>) {
    let Some(repl) = node.replication.clone() else {
        return;
    };
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let mut conns: std::collections::HashMap<SocketAddr, quinn::Connection> = Default::default();
    let mut pushes = repl.applied.subscribe();
    loop {
        let now = now_ms();
        let excluded = repl.sync().handle_timeout(now);
        if !excluded.is_empty() {
            for addr in &excluded {
                warn!(%addr, "peer away longer than the horizon: its batches are no longer retained for it; it will catch up from a snapshot");
            }
            let sync = repl.sync();
            sync.declare(&mut node.replica.write().unwrap_or_else(|e| e.into_inner()));
        }
        loop {
            let next = repl.sync().poll_transmit();
            let Some(t) = next else { break };
            transmit(&node, &repl, &endpoint, &mut conns, &tx, t);
        }
        let wait = repl
            .sync()
            .poll_timeout()
            .map_or(Duration::from_secs(3600), |at| {
                Duration::from_millis(at.saturating_sub(now_ms()).clamp(0, 3_600_000) as u64)
            });
        tokio::select! {
            r = stop.changed() => if r.is_err() || *stop.borrow() { break },
            _ = tokio::time::sleep(wait) => {}
            Some(ev) = events.recv() => handle(&node, &repl, &mut conns, ev),
            got = pushes.recv() => match got {
                Ok(raw) => repl.sync().queue_push(raw, now_ms()),
                // Missed some: the next pull round brings them.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    for conn in conns.values() {
        conn.close(0u32.into(), b"shutting down");
    }
}

/// Whether `peer` can read these batch bytes: a v2 batch only goes to a node whose handshake
/// lists `sketches` (one not yet authenticated is assumed to, as `Facts::speaks` does).
fn readable_by(repl: &Replication, peer: &SocketAddr, raw: &[u8]) -> bool {
    if !crate::peer::is_v2(raw) {
        return true;
    }
    let node = repl.sync().node_of(peer);
    node.is_none_or(|k| repl.auth.facts.speaks(&k, "sketches"))
}

/// Carries out one transmit of the machine, in a task that reports back on `tx`.
fn transmit(
    node: &Arc<Node>,
    repl: &Arc<Replication>,
    endpoint: &quinn::Endpoint,
    conns: &mut std::collections::HashMap<SocketAddr, quinn::Connection>,
    tx: &tokio::sync::mpsc::UnboundedSender<Event>,
    t: Transmit<SocketAddr>,
) {
    let tx = tx.clone();
    match t {
        Transmit::Connect { peer, token } => {
            let (endpoint, auth) = (endpoint.clone(), repl.auth.clone());
            tokio::spawn(async move {
                // The machine has the deadline; this bound only ends the task.
                let got = tokio::time::timeout(
                    Duration::from_secs(30),
                    crate::peer::connect(&endpoint, peer, &auth),
                )
                .await
                .unwrap_or_else(|_| Err(PeerError::Timeout("connect")));
                let _ = tx.send(Event::Connected { peer, token, got });
            });
        }
        Transmit::Round { peer, token } => {
            let Some(conn) = link_conn(repl, conns, peer, token) else {
                return;
            };
            // Epochs past the lateness horizon are left out on both sides, by this node's
            // clock: one node expiring an epoch before the other is not a gap.
            let cutoff = node.expiry_cutoff(now_ms());
            let req = repl.sync().poll_round(&node.state(), cutoff);
            let (node, repl) = (node.clone(), repl.clone());
            tokio::spawn(async move {
                let got = pull(&node, &repl, &conn, peer, req).await;
                let _ = tx.send(Event::Round {
                    peer,
                    token,
                    cutoff,
                    got,
                });
            });
        }
        Transmit::Snapshot { peer, token, why } => {
            let Some(conn) = link_conn(repl, conns, peer, token) else {
                return;
            };
            let node = node.clone();
            tokio::spawn(async move {
                let got = adopt_snapshot(&node, &conn, peer).await;
                let _ = tx.send(Event::Adopted {
                    peer,
                    token,
                    why,
                    got,
                });
            });
        }
        Transmit::Push { peer, token, batch } => {
            // No link: failed. A batch the peer cannot read (an earlier release): settled, as
            // its rounds will not ask for it either.
            let (conn, readable) = (conns.get(&peer).cloned(), readable_by(repl, &peer, &batch));
            let Some(conn) = conn.filter(|_| readable) else {
                repl.sync()
                    .handle_push_reply(&peer, token, !readable, now_ms());
                return;
            };
            tokio::spawn(async move {
                let acked = push(&conn, &batch).await;
                let _ = tx.send(Event::Pushed { peer, token, acked });
            });
        }
        Transmit::Close { peer, reason } => {
            if let Some(conn) = conns.remove(&peer) {
                warn!(addr = %peer, "peer link lost: {reason}");
                conn.close(0u32.into(), b"resync");
            }
        }
    }
}

/// The connection of `peer`'s link for the transmit `token`; if there is none (closed
/// meanwhile), the transmit fails at once.
fn link_conn(
    repl: &Replication,
    conns: &std::collections::HashMap<SocketAddr, quinn::Connection>,
    peer: SocketAddr,
    token: u64,
) -> Option<quinn::Connection> {
    let conn = conns.get(&peer).cloned();
    if conn.is_none() {
        repl.sync()
            .handle_failed(&peer, token, "no connection".into(), now_ms());
    }
    conn
}

/// Feeds one I/O outcome to the machine (and logs and counts what it decided).
fn handle(
    node: &Arc<Node>,
    repl: &Arc<Replication>,
    conns: &mut std::collections::HashMap<SocketAddr, quinn::Connection>,
    ev: Event,
) {
    let now = now_ms();
    match ev {
        Event::Connected { peer, token, got } => match got {
            Ok((conn, key)) => {
                if repl.sync().handle_connected(&peer, token, key, now) {
                    info!(addr = %peer, "peer link up");
                    if let Some(old) = conns.insert(peer, conn) {
                        old.close(0u32.into(), b"resync");
                    }
                } else {
                    conn.close(0u32.into(), b"too late");
                }
            }
            Err(why) => {
                if matches!(why, PeerError::ProtocolMismatch(_)) {
                    warn!(addr = %peer, "peer link down: {why}");
                } else {
                    debug!(addr = %peer, "peer link down: {why}");
                }
                repl.sync()
                    .handle_failed(&peer, token, why.to_string(), now);
            }
        },
        Event::Round {
            peer,
            token,
            cutoff,
            got,
        } => match got {
            Ok(result) => round_done(node, repl, peer, token, cutoff, result),
            Err(why) => repl
                .sync()
                .handle_failed(&peer, token, why.to_string(), now),
        },
        Event::Adopted {
            peer,
            token,
            why,
            got,
        } => match got {
            Ok(adopted) => {
                if !repl.sync().handle_adopted_reply(&peer, token, adopted, now) {
                    return;
                }
                match (adopted, why) {
                    (true, Adopt::Repair) => {
                        node.metrics.divergence_repairs.fetch_add(1, Relaxed);
                        info!(addr = %peer, "divergence repaired from the peer's snapshot");
                    }
                    (true, _) => {
                        info!(addr = %peer, reason = ?why, "caught up from the peer's snapshot")
                    }
                    (false, _) => {
                        debug!(addr = %peer, "snapshot no longer covers this node; next round")
                    }
                }
            }
            Err(e) => repl.sync().handle_failed(&peer, token, e.to_string(), now),
        },
        Event::Pushed { peer, token, acked } => {
            repl.sync().handle_push_reply(&peer, token, acked, now)
        }
    }
}

/// A pull round's result to the machine, under its lock then the replica's.
fn round_done(
    node: &Arc<Node>,
    repl: &Arc<Replication>,
    addr: SocketAddr,
    token: u64,
    cutoff: i64,
    result: RoundResult,
) {
    let (pulled, their_hash) = (result.pulled, result.their_hash);
    let outcome = {
        let mut sync = repl.sync();
        let mut r = node.replica.write().unwrap_or_else(|e| e.into_inner());
        let my_hash = r.state_hash();
        let Some(outcome) = sync.handle_round_reply(&addr, token, now_ms(), cutoff, result, &mut r)
        else {
            return;
        };
        if outcome.diverged {
            warn!(
                %addr,
                producer = outcome.split.map(|d| edgetally_net::tls::hex(&d.producer.0)),
                epoch = outcome.split.map(|d| d.epoch),
                mine = %edgetally_net::tls::hex(&my_hash),
                theirs = %edgetally_net::tls::hex(&their_hash),
                "the peer holds the same batch ids with different contents{}",
                if outcome.adopt == Some(Adopt::Repair) { ": adopting its snapshot" } else { ": it adopts ours" }
            );
        }
        outcome
    };
    node.metrics.pulled.fetch_add(pulled, Relaxed);
    if let Some(d) = &outcome.split {
        node.equivocation(d.producer, d.epoch);
    }
    if outcome.diverged {
        node.metrics.divergences.fetch_add(1, Relaxed);
    }
}

async fn push(conn: &quinn::Connection, raw: &[u8]) -> bool {
    let Ok(body) = postcard::to_allocvec(&Request::Push {
        batch: raw.to_vec(),
    }) else {
        return false;
    };
    matches!(
        request(conn, &body, 64).await.map(|r| Reply::decode(&r)),
        Ok(Ok(Reply::Ack))
    )
}

/// The I/O of one pull round: sends the request, takes every batch of the answer through
/// this node's ingest, and returns what the round brought.
async fn pull(
    node: &Arc<Node>,
    repl: &Arc<Replication>,
    conn: &quinn::Connection,
    addr: SocketAddr,
    req: edgetally_core::RoundRequest,
) -> Result<RoundResult, PeerError> {
    let body = postcard::to_allocvec(&Request::Sync {
        digest: req.digest,
        max: req.max,
    })
    .map_err(PeerError::from)?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(PeerError::from)?;
    send.write_all(&body).await.map_err(PeerError::from)?;
    let _ = send.finish();
    let mut frames = edgetally_proto::FrameDecoder::new(MAX_MESSAGE);
    let mut submitted = tokio::task::JoinSet::new();
    let room = Arc::new(tokio::sync::Semaphore::new(256));
    let mut buf = vec![0u8; 64 << 10];
    let done = 'read: loop {
        while let Some(frame) = frames.next_frame().map_err(PeerError::Frame)? {
            let (item, rest) = postcard::take_from_bytes::<SyncItem>(&frame)
                .map_err(|_| PeerError::Malformed("sync item"))?;
            match item {
                SyncItem::Batch(raw) => {
                    // Bounded: at most 256 pulled batches wait for the pipeline at once; the
                    // QUIC stream's flow control holds the rest at the peer.
                    let permit = room
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| PeerError::NotServed("the pipeline is closed"))?;
                    let ingest = node.ingest.clone();
                    submitted.spawn(async move {
                        let _permit = permit;
                        ingest.submit_from_peer_wait(raw).await
                    });
                }
                SyncItem::Done {
                    digest,
                    more,
                    state_hash,
                } => {
                    if let Some(key) = repl.status().get(&addr).and_then(|p| p.node) {
                        repl.auth
                            .facts
                            .refresh(key, crate::handshake::read_ext(rest));
                    }
                    break 'read (digest, more, state_hash);
                }
            }
        }
        match recv.read(&mut buf).await.map_err(PeerError::from)? {
            Some(n) => frames.push(&buf[..n]),
            None => return Err(PeerError::Truncated("sync reply")),
        }
    };
    let mut result = RoundResult {
        theirs: done.0,
        more: done.1,
        their_hash: done.2,
        pulled: 0,
        retried: false,
        refused: false,
    };
    while let Some(r) = submitted.join_next().await {
        match r {
            Ok(Reply::Ack) => result.pulled += 1,
            Ok(Reply::Retry { .. }) => result.retried = true,
            // A batch our limits refuse (a lower max_lateness here, say) is left out, counted
            // in the rejection metrics; it would be refused from a producer too.
            Ok(Reply::Nack(_)) => result.refused = true,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(result)
}

/// Fetches the peer's snapshot and adopts it; whether it was adopted (`false`: it no longer
/// covered this node, or adopting failed, which is logged).
async fn adopt_snapshot(
    node: &Arc<Node>,
    conn: &quinn::Connection,
    addr: SocketAddr,
) -> Result<bool, PeerError> {
    let body = postcard::to_allocvec(&Request::Snapshot).map_err(PeerError::from)?;
    let raw = request(conn, &body, MAX_MESSAGE).await?;
    let snap: Snapshot = Snapshot::decode(&raw).map_err(|_| PeerError::Malformed("snapshot"))?;
    let n = node.clone();
    match tokio::task::spawn_blocking(move || n.adopt(snap)).await {
        Ok(Ok(a)) => Ok(a),
        Ok(Err(e)) => {
            warn!(%addr, "adopting the peer's snapshot failed: {e}");
            Ok(false)
        }
        Err(e) => {
            warn!(%addr, "adopting the peer's snapshot failed: {e}");
            Ok(false)
        }
    }
}
