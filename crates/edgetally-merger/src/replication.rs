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
use crate::peer::{request, Request, SyncItem, HELLO_DEADLINE, MAX_MESSAGE};
pub use crate::peer::{PeerStatus, Replication, SYNC_BATCH};
use edgetally_core::{answer_round, Adopt, RoundResult, Snapshot};
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
        crate::peer::accept_hello(&repl.auth, &conn, remote),
    )
    .await
    .unwrap_or_else(|_| Err("no Hello within the deadline".to_string()));
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
        tokio::spawn(async move {
            if let Err(e) = answer(node, send, recv).await {
                debug!("peer request failed: {e}");
            }
        });
    }
}

async fn answer(
    node: Arc<Node>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), String> {
    let raw = recv
        .read_to_end(MAX_MESSAGE)
        .await
        .map_err(|e| e.to_string())?;
    let (req, rest): (Request, &[u8]) =
        postcard::take_from_bytes(&raw).map_err(|_| "bad request".to_string())?;
    match req {
        Request::Push { batch } => {
            let reply = node.ingest.submit_from_peer(batch).await;
            send.write_all(&reply.encode())
                .await
                .map_err(|e| e.to_string())?;
        }
        Request::Sync { digest, max } => {
            let answer = answer_round(&node.state(), &digest, max, SYNC_BATCH);
            for e in answer.batches {
                let item = postcard::to_allocvec(&SyncItem::Batch(e.raw.to_vec()))
                    .map_err(|e| e.to_string())?;
                send.write_all(&edgetally_proto::encode_frame(&item))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let mut done = postcard::to_allocvec(&SyncItem::Done {
                digest: answer.digest,
                more: answer.more,
                state_hash: answer.state_hash,
            })
            .map_err(|e| e.to_string())?;
            // This node's facts after the `Done` (nodes of an earlier release stop reading at
            // its end): its topology version and settings, current at every round.
            done.extend(
                node.replication
                    .as_ref()
                    .map_or_else(Vec::new, |r| r.auth.facts.ext_bytes()),
            );
            send.write_all(&edgetally_proto::encode_frame(&done))
                .await
                .map_err(|e| e.to_string())?;
        }
        Request::Snapshot => {
            // Encoded straight from the state: no snapshot value beside it.
            let bytes = node.state().encode_snapshot()?;
            send.write_all(&bytes).await.map_err(|e| e.to_string())?;
        }
        Request::Forward { batch, version } => {
            // From a node of an earlier release: nothing follows.
            let ext: crate::peer::ForwardExt = postcard::from_bytes(rest).unwrap_or_default();
            let reply = node.forwarded(batch, version, ext.source).await;
            send.write_all(&reply.encode())
                .await
                .map_err(|e| e.to_string())?;
        }
        Request::Query(q) => {
            let part = node.part(&q);
            let bytes = postcard::to_allocvec(&part).map_err(|e| e.to_string())?;
            send.write_all(&bytes).await.map_err(|e| e.to_string())?;
        }
        Request::Topology => {
            let json = match &node.cluster {
                Some(c) => serde_json::to_vec(&*c.topology()).map_err(|e| e.to_string())?,
                None => return Err("no topology here".into()),
            };
            send.write_all(&json).await.map_err(|e| e.to_string())?;
        }
        Request::Adopt(json) => {
            let Some(c) = &node.cluster else {
                return Err("no topology here".into());
            };
            adopt_from_peer(c, &json).await;
            let v = postcard::to_allocvec(&c.topology().version).map_err(|e| e.to_string())?;
            send.write_all(&v).await.map_err(|e| e.to_string())?;
        }
        Request::Handoff { topology, to } => {
            let Some(c) = &node.cluster else {
                return Err("no topology here".into());
            };
            // Adopting waits until every batch routed by the older topology is applied: the
            // seen-sets below then hold all this node will ever take of `to`'s producers.
            adopt_from_peer(c, &topology).await;
            let reply = {
                let r = node.state();
                c.seen_for(&r, &to)
            };
            let bytes = postcard::to_allocvec(&reply).map_err(|e| e.to_string())?;
            send.write_all(&bytes).await.map_err(|e| e.to_string())?;
        }
        Request::DrainState => {
            let st = node.drain_state();
            let bytes = postcard::to_allocvec(&st).map_err(|e| e.to_string())?;
            send.write_all(&bytes).await.map_err(|e| e.to_string())?;
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

/// Runs the links to every configured peer until `stop`.
pub fn spawn_links(
    node: Arc<Node>,
    endpoint: quinn::Endpoint,
    stop: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    node.config
        .peers
        .iter()
        .map(|&addr| tokio::spawn(link(node.clone(), endpoint.clone(), addr, stop.clone())))
        .collect()
}

/// One peer: (re)connect, then pull every interval and push what producers bring.
async fn link(
    node: Arc<Node>,
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let Some(repl) = node.replication.clone() else {
        return;
    };
    let every = Duration::from_millis(node.config.sync_interval_ms.max(10));
    let mut pushes = repl.applied.subscribe();
    let mut backoff = every;
    loop {
        if *stop.borrow() {
            break;
        }
        // Every (re)connection attempt follows a failure or start-up: the moment to ask
        // whether the peer has been away too long.
        repl.check_horizon(&node.replica, addr);
        let conn = match tokio::time::timeout(
            Duration::from_secs(5),
            crate::peer::connect(&endpoint, addr, &repl.auth),
        )
        .await
        {
            Ok(Ok((conn, key))) => {
                info!(%addr, "peer link up");
                repl.sync().handle_connected(&addr, key);
                backoff = every;
                conn
            }
            other => {
                let why = match other {
                    Ok(Err(e)) => e,
                    _ => "connect timed out".to_string(),
                };
                if why.starts_with(crate::peer::PROTOCOL_MISMATCH) {
                    warn!(%addr, "peer link down: {why}");
                } else {
                    debug!(%addr, "peer link down: {why}");
                }
                repl.sync().handle_down(&addr, why);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                // Pushes that piled up meanwhile are pulled later; do not replay them.
                pushes = pushes.resubscribe();
                continue;
            }
        };
        // Pull rounds and pushes share the connection until it fails.
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let inflight = Arc::new(tokio::sync::Semaphore::new(256));
        let failed = loop {
            tokio::select! {
                _ = stop.changed() => { if *stop.borrow() { break None; } }
                _ = tick.tick() => {
                    // A peer that stops answering (paused, partitioned) must not hold the
                    // link: give up on the round and reconnect.
                    match tokio::time::timeout(Duration::from_secs(10), pull(&node, &repl, &conn, addr)).await {
                        Ok(Ok(true)) => tick.reset_immediately(),
                        Ok(Ok(false)) => {}
                        Ok(Err(e)) => break Some(e),
                        Err(_) => break Some("pull round timed out".into()),
                    }
                }
                got = pushes.recv() => match got {
                    Ok(raw) => {
                        let Ok(permit) = inflight.clone().acquire_owned().await else { break None };
                        let conn = conn.clone();
                        let repl = repl.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            if push(&conn, &raw).await {
                                repl.sync().handle_pushed(&addr);
                            }
                        });
                    }
                    // Missed some: the next pull round brings them.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break None,
                },
            }
        };
        match failed {
            None => {
                conn.close(0u32.into(), b"shutting down");
                break;
            }
            Some(e) => {
                warn!(%addr, "peer link lost: {e}");
                repl.sync().handle_down(&addr, e);
                conn.close(0u32.into(), b"resync");
            }
        }
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

/// One pull round; `Ok(true)` when the next should follow at once. The decisions are the
/// state machine's ([`PeerSync::poll_round`], [`PeerSync::handle_round`]); this is its I/O.
async fn pull(
    node: &Arc<Node>,
    repl: &Arc<Replication>,
    conn: &quinn::Connection,
    addr: SocketAddr,
) -> Result<bool, String> {
    // Epochs past the lateness horizon are left out on both sides, by this node's clock: one
    // node expiring an epoch before the other (their clocks and sweeps differ) is not a gap.
    let cutoff = node.expiry_cutoff(now_ms());
    let req = repl.sync().poll_round(&node.state(), cutoff);
    let body = postcard::to_allocvec(&Request::Sync {
        digest: req.digest,
        max: req.max,
    })
    .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&body).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    let mut frames = edgetally_proto::FrameDecoder::new(MAX_MESSAGE);
    let mut submitted = tokio::task::JoinSet::new();
    let room = Arc::new(tokio::sync::Semaphore::new(256));
    let mut buf = vec![0u8; 64 << 10];
    let done = 'read: loop {
        while let Some(frame) = frames.next_frame().map_err(|e| e.to_string())? {
            let (item, rest) =
                postcard::take_from_bytes::<SyncItem>(&frame).map_err(|_| "bad sync item")?;
            match item {
                SyncItem::Batch(raw) => {
                    // Bounded: at most 256 pulled batches wait for the pipeline at once; the
                    // QUIC stream's flow control holds the rest at the peer.
                    let permit = room
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|e| e.to_string())?;
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
                        repl.auth.facts.refresh(key, crate::peer::read_ext(rest));
                    }
                    break 'read (digest, more, state_hash);
                }
            }
        }
        match recv.read(&mut buf).await.map_err(|e| e.to_string())? {
            Some(n) => frames.push(&buf[..n]),
            None => return Err("sync reply ended early".into()),
        }
    };
    let mut pulled = 0u64;
    let mut retried = false;
    let mut refused = false;
    while let Some(r) = submitted.join_next().await {
        match r {
            Ok(Reply::Ack) => pulled += 1,
            Ok(Reply::Retry { .. }) => retried = true,
            // A batch our limits refuse (a lower max_lateness here, say) is left out, counted
            // in the rejection metrics; it would be refused from a producer too.
            Ok(Reply::Nack(_)) => refused = true,
            Err(e) => return Err(e.to_string()),
        }
    }
    let (theirs, more, their_hash) = done;
    let outcome = {
        let mut sync = repl.sync();
        let mut r = node.replica.write().unwrap_or_else(|e| e.into_inner());
        let my_hash = r.state_hash();
        let outcome = sync.handle_round(
            &addr,
            now_ms(),
            cutoff,
            RoundResult {
                theirs,
                more,
                their_hash,
                pulled,
                retried,
                refused,
            },
            &mut r,
        );
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
    if let Some(why) = outcome.adopt {
        let body = postcard::to_allocvec(&Request::Snapshot).map_err(|e| e.to_string())?;
        let raw = request(conn, &body, MAX_MESSAGE).await?;
        let snap: Snapshot = Snapshot::decode(&raw).map_err(|_| "bad snapshot".to_string())?;
        let n = node.clone();
        let adopted = match tokio::task::spawn_blocking(move || n.adopt(snap)).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                warn!(%addr, "adopting the peer's snapshot failed: {e}");
                false
            }
            Err(e) => {
                warn!(%addr, "adopting the peer's snapshot failed: {e}");
                false
            }
        };
        repl.sync().handle_adopted(&addr, adopted);
        match (adopted, why) {
            (true, Adopt::Repair) => {
                node.metrics.divergence_repairs.fetch_add(1, Relaxed);
                info!(%addr, "divergence repaired from the peer's snapshot");
            }
            (true, _) => info!(%addr, reason = ?why, "caught up from the peer's snapshot"),
            (false, _) => debug!(%addr, "snapshot no longer covers this node; next round"),
        }
    }
    Ok(outcome.again)
}
