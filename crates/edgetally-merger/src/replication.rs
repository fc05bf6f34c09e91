//! Replication between mergers: authenticated QUIC links (ALPN `edgetally-peer/3`, on the
//! same port as ingest), push of newly applied batches, and pull by digest (anti-entropy).
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
//! of pushes, pulls and producer retries changes nothing (ARCHITECTURE.md).

use crate::node::Node;
use edgetally_core::{Digest, Snapshot};
use edgetally_net::now_ms;
use edgetally_proto::Reply;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use tracing::{debug, info, warn};

/// Batches per pull round (the peer says when more are waiting).
pub const SYNC_BATCH: u32 = 2000;
/// Largest request or reply message accepted on a peer stream.
const MAX_MESSAGE: usize = 256 << 20;
const EKM_LABEL: &[u8] = b"EXPORTER-edgetally-peer-auth";
const PROOF_DOMAIN: &[u8] = b"edgetally/peer/v1\0";

/// How long a peer connection may take to authenticate.
pub const HELLO_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Serialize, Deserialize)]
struct Hello {
    node: [u8; 32],
    hmac: Option<Vec<u8>>,
    signature: Option<Vec<u8>>,
}

#[derive(Serialize, Deserialize)]
enum Request {
    /// "Here is what I have; send what I lack."
    Sync { digest: Digest, max: u32 },
    /// One batch, as its producer signed it.
    Push { batch: Vec<u8> },
    /// The whole state, for a node starting empty.
    Snapshot,
    /// A producer's batch that reached a node of another group (`version`: the sender's
    /// topology version); the reply is the bare reply the producer gets.
    Forward { batch: Vec<u8>, version: u64 },
    /// This group's part of a cluster-wide query ([`crate::cluster::Query`]); the reply is a
    /// postcard [`crate::cluster::Part`].
    Query(crate::cluster::Query),
    /// Where this node stands in a drain; the reply is a postcard
    /// [`crate::cluster::DrainState`].
    DrainState,
}

/// Asks a node where it stands in a drain.
pub(crate) async fn drain_state(
    conn: &quinn::Connection,
) -> Result<crate::cluster::DrainState, String> {
    let body = postcard::to_allocvec(&Request::DrainState).map_err(|e| e.to_string())?;
    let raw = request(conn, &body, 1 << 16).await?;
    postcard::from_bytes(&raw).map_err(|_| "bad drain state".to_string())
}

/// Asks a node for its whole state.
pub(crate) async fn snapshot(conn: &quinn::Connection) -> Result<Snapshot, String> {
    let body = postcard::to_allocvec(&Request::Snapshot).map_err(|e| e.to_string())?;
    let raw = request(conn, &body, MAX_MESSAGE).await?;
    Snapshot::decode(&raw).map_err(|_| "bad snapshot".to_string())
}

/// Sends a forwarded batch on an authenticated peer connection; the owner's reply.
pub(crate) async fn forward(
    conn: &quinn::Connection,
    batch: Vec<u8>,
    version: u64,
) -> Result<Reply, String> {
    let body =
        postcard::to_allocvec(&Request::Forward { batch, version }).map_err(|e| e.to_string())?;
    let raw = request(conn, &body, 64).await?;
    Reply::decode(&raw).map_err(|c| format!("bad reply: {c}"))
}

/// Asks a node of another group for its part of a query.
pub(crate) async fn query(
    conn: &quinn::Connection,
    q: &crate::cluster::Query,
) -> Result<crate::cluster::Part, String> {
    let body = postcard::to_allocvec(&Request::Query(q.clone())).map_err(|e| e.to_string())?;
    let raw = request(conn, &body, MAX_MESSAGE).await?;
    postcard::from_bytes(&raw).map_err(|_| "bad query reply".to_string())
}

#[derive(Serialize, Deserialize)]
enum SyncItem {
    Batch(Vec<u8>),
    /// The responder's digest and state hash, taken together under one lock.
    Done {
        digest: Digest,
        more: bool,
        state_hash: [u8; 32],
    },
}

/// How peers prove who they are.
#[derive(Clone)]
pub struct Auth {
    secret: Option<Vec<u8>>,
    keys: Vec<[u8; 32]>,
    signing: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("secret", &self.secret.is_some())
            .field("keys", &self.keys.len())
            .finish()
    }
}

fn message(role: u8, node: &[u8; 32], ekm: &[u8; 32]) -> Vec<u8> {
    let mut m = PROOF_DOMAIN.to_vec();
    m.push(role);
    m.extend_from_slice(node);
    m.extend_from_slice(ekm);
    m
}

impl Auth {
    /// From the configuration; `seed` is the node key's secret.
    pub fn new(secret: Option<&str>, keys: &[String], seed: [u8; 32]) -> Result<Auth, String> {
        let keys = keys
            .iter()
            .map(|k| {
                edgetally_net::tls::parse_hash(k.trim())
                    .ok_or_else(|| format!("peer_keys: {k:?} is not 64 hex digits"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Auth {
            secret: secret.map(|s| s.as_bytes().to_vec()),
            keys,
            signing: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    /// Whether no credential is configured (then no peer is accepted, loopback or not).
    pub fn open_to_loopback_only(&self) -> bool {
        self.secret.is_none() && self.keys.is_empty()
    }

    fn node(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    fn hello(&self, role: u8, ekm: &[u8; 32]) -> Hello {
        let node = self.node();
        let m = message(role, &node, ekm);
        let hmac = self.secret.as_ref().and_then(|s| {
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(s).ok()?;
            mac.update(&m);
            Some(mac.finalize().into_bytes().to_vec())
        });
        let signature = (!self.keys.is_empty()).then(|| {
            use ed25519_dalek::Signer as _;
            self.signing.sign(&m).to_bytes().to_vec()
        });
        Hello {
            node,
            hmac,
            signature,
        }
    }

    fn check(
        &self,
        h: &Hello,
        role: u8,
        ekm: &[u8; 32],
        remote: SocketAddr,
    ) -> Result<(), &'static str> {
        let _ = remote;
        let m = message(role, &h.node, ekm);
        if self.open_to_loopback_only() {
            // A node without credentials refuses to start with peers (Node::start); should
            // this ever be reached, nobody is accepted.
            return Err("no cluster_secret or peer_keys configured");
        }
        if let Some(s) = &self.secret {
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(s).map_err(|_| "bad secret")?;
            mac.update(&m);
            mac.verify_slice(h.hmac.as_deref().unwrap_or(&[]))
                .map_err(|_| "wrong cluster secret")?;
        }
        if !self.keys.is_empty() {
            if !self.keys.contains(&h.node) {
                return Err("node key not in peer_keys");
            }
            let key =
                ed25519_dalek::VerifyingKey::from_bytes(&h.node).map_err(|_| "bad node key")?;
            let sig = h
                .signature
                .as_deref()
                .and_then(|s| ed25519_dalek::Signature::from_slice(s).ok())
                .ok_or("missing signature")?;
            key.verify_strict(&m, &sig).map_err(|_| "bad signature")?;
        }
        Ok(())
    }
}

fn ekm(conn: &quinn::Connection) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EKM_LABEL, b"")
        .map_err(|_| "keying material unavailable".to_string())?;
    Ok(out)
}

async fn request(
    conn: &quinn::Connection,
    body: &[u8],
    max_reply: usize,
) -> Result<Vec<u8>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(body).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    recv.read_to_end(max_reply).await.map_err(|e| e.to_string())
}

const CLIENT: u8 = 0;
const SERVER: u8 = 1;

/// Connects to a peer and authenticates both ways; returns the connection and its node key.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    auth: &Auth,
) -> Result<(quinn::Connection, [u8; 32]), String> {
    let conn = endpoint
        .connect(addr, "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let k = ekm(&conn)?;
    let hello = postcard::to_allocvec(&auth.hello(CLIENT, &k)).map_err(|e| e.to_string())?;
    let reply = request(&conn, &hello, 4096).await?;
    let theirs: Hello = postcard::from_bytes(&reply).map_err(|_| "bad hello".to_string())?;
    if let Err(why) = auth.check(&theirs, SERVER, &k, addr) {
        conn.close(2u32.into(), why.as_bytes());
        return Err(format!("peer refused: {why}"));
    }
    Ok((conn, theirs.node))
}

/// Serves a peer's connection (the server side of [`connect`]).
pub async fn serve_peer(node: Arc<Node>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let Some(repl) = node.replication.clone() else {
        conn.close(1u32.into(), b"no replication");
        return;
    };
    // The first stream is the handshake, and it must come promptly: a connection that never
    // says Hello is not held.
    let authed = tokio::time::timeout(HELLO_DEADLINE, async {
        let k = ekm(&conn)?;
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let raw = recv.read_to_end(4096).await.map_err(|e| e.to_string())?;
        let theirs: Hello = postcard::from_bytes(&raw).map_err(|_| "bad hello".to_string())?;
        repl.auth
            .check(&theirs, CLIENT, &k, remote)
            .map_err(str::to_string)?;
        let mine =
            postcard::to_allocvec(&repl.auth.hello(SERVER, &k)).map_err(|e| e.to_string())?;
        send.write_all(&mine).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        Ok::<_, String>(theirs.node)
    })
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
    let req: Request = postcard::from_bytes(&raw).map_err(|_| "bad request".to_string())?;
    match req {
        Request::Push { batch } => {
            let reply = node.ingest.submit_from_peer(batch).await;
            send.write_all(&reply.encode())
                .await
                .map_err(|e| e.to_string())?;
        }
        Request::Sync { digest, max } => {
            let (missing, mine, state_hash) = {
                let r = node.state();
                (r.missing_for(&digest), r.digest(), r.state_hash())
            };
            let max = max.clamp(1, SYNC_BATCH) as usize;
            let more = missing.len() > max;
            for e in missing.into_iter().take(max) {
                let item = postcard::to_allocvec(&SyncItem::Batch(e.raw.to_vec()))
                    .map_err(|e| e.to_string())?;
                send.write_all(&edgetally_proto::encode_frame(&item))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let done = postcard::to_allocvec(&SyncItem::Done {
                digest: mine,
                more,
                state_hash,
            })
            .map_err(|e| e.to_string())?;
            send.write_all(&edgetally_proto::encode_frame(&done))
                .await
                .map_err(|e| e.to_string())?;
        }
        Request::Snapshot => {
            let snap = node.state().snapshot();
            let bytes = postcard::to_allocvec(&snap).map_err(|e| e.to_string())?;
            send.write_all(&bytes).await.map_err(|e| e.to_string())?;
        }
        Request::Forward { batch, version } => {
            let reply = node.forwarded(batch, version).await;
            send.write_all(&reply.encode())
                .await
                .map_err(|e| e.to_string())?;
        }
        Request::Query(q) => {
            let part = node.part(&q);
            let bytes = postcard::to_allocvec(&part).map_err(|e| e.to_string())?;
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

/// What this node knows of one peer (for `/v1/status`, `/metrics` and query freshness).
#[derive(Clone, Debug, Default)]
pub struct PeerStatus {
    /// Its node key, once a link authenticated.
    pub node: Option<[u8; 32]>,
    /// A link is up and the last pull round succeeded.
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
    /// Pull rounds that found it holding the same batch ids as this node with another state.
    pub divergences: u64,
    /// The last pull round found a divergence not yet repaired: answers are not `complete`.
    pub diverged: bool,
}

/// The replication half of a node.
#[derive(Debug)]
pub struct Replication {
    /// How peers authenticate.
    pub auth: Auth,
    /// The pull interval, ms: a peer whose last round is older than a few of these (at least
    /// 2 s) does not count as seen.
    pub interval_ms: i64,
    /// Per configured peer address.
    pub peers: Mutex<BTreeMap<SocketAddr, PeerStatus>>,
    /// Newly applied batches that came from producers (to push).
    pub applied: broadcast::Sender<Arc<[u8]>>,
    /// Peers away longer than the horizon: they no longer hold back log pruning.
    pub excluded: Mutex<std::collections::BTreeSet<SocketAddr>>,
    /// The horizon, ms.
    pub horizon_ms: i64,
    /// When this node started, ms (a peer never heard from counts as away since then).
    pub started_ms: i64,
    /// A node lacking more batches than this after a pull round catches up from the peer's
    /// snapshot instead of pulling the rest (`snapshot_catch_up_batches`).
    pub catch_up_batches: u64,
}

impl Replication {
    /// The status of every peer (`reachable` means: a pull round completed recently).
    pub fn status(&self) -> BTreeMap<SocketAddr, PeerStatus> {
        let now = now_ms();
        let stale = (3 * self.interval_ms).max(2000);
        let mut m = self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for p in m.values_mut() {
            p.reachable = p.reachable && now - p.last_sync_ms <= stale;
        }
        m
    }

    /// Whether every configured peer is reachable now, with no divergence from it unrepaired.
    pub fn sees_all_peers(&self) -> bool {
        self.status().values().all(|p| p.reachable && !p.diverged)
    }

    /// Declares to the replica the peers whose digests gate pruning (all but the excluded).
    fn declare_peers(&self, node: &Node) {
        let excluded = self
            .excluded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut r = node.replica.write().unwrap_or_else(|e| e.into_inner());
        r.set_peers(
            node.config
                .peers
                .iter()
                .filter(|p| !excluded.contains(p))
                .map(|p| p.to_string()),
        );
        r.prune_log();
    }

    /// A peer away longer than the horizon stops holding back pruning (it will catch up from
    /// a snapshot when it returns).
    fn check_horizon(&self, node: &Node, addr: SocketAddr) {
        let last = self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
            .map_or(0, |s| s.last_sync_ms);
        let since = if last > 0 { last } else { self.started_ms };
        if now_ms() - since > self.horizon_ms
            && self
                .excluded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(addr)
        {
            warn!(%addr, "peer away longer than the horizon: its batches are no longer retained for it; it will catch up from a snapshot");
            self.declare_peers(node);
        }
    }

    /// A peer is back: it gates pruning again.
    fn readmit(&self, node: &Node, addr: SocketAddr) {
        if self
            .excluded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&addr)
        {
            info!(%addr, "peer back within reach");
            self.declare_peers(node);
        }
    }

    fn down(&self, addr: SocketAddr, why: String) {
        self.update(addr, |s| {
            s.reachable = false;
            s.last_error = Some(why);
        });
    }

    fn update(&self, addr: SocketAddr, f: impl FnOnce(&mut PeerStatus)) {
        let mut m = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        f(m.entry(addr).or_default());
    }
}

/// One client endpoint for all outgoing peer links.
pub fn client_endpoint() -> Result<quinn::Endpoint, String> {
    let bind: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut ep = quinn::Endpoint::client(bind).map_err(|e| e.to_string())?;
    ep.set_default_client_config(
        edgetally_net::tls::peer_client_config().map_err(|e| e.to_string())?,
    );
    Ok(ep)
}

/// Asks every peer at once for a snapshot (for a node starting empty) and takes the first
/// that arrives within `wait`; `None` if none does (a cluster starting cold: nobody has
/// anything yet, and the node starts empty and syncs).
pub async fn fetch_snapshot(
    endpoint: &quinn::Endpoint,
    peers: &[SocketAddr],
    auth: &Auth,
    wait: Duration,
) -> Option<(SocketAddr, Snapshot)> {
    let mut asks = tokio::task::JoinSet::new();
    for &addr in peers {
        let (endpoint, auth) = (endpoint.clone(), auth.clone());
        asks.spawn(async move {
            let got = async {
                let (conn, _) = connect(&endpoint, addr, &auth).await?;
                let body = postcard::to_allocvec(&Request::Snapshot).map_err(|e| e.to_string())?;
                let raw = request(&conn, &body, MAX_MESSAGE).await?;
                conn.close(0u32.into(), b"done");
                Snapshot::decode(&raw).map_err(|_| "bad snapshot".to_string())
            }
            .await;
            (addr, got)
        });
    }
    let first = tokio::time::timeout(wait, async {
        while let Some(done) = asks.join_next().await {
            match done {
                Ok((addr, Ok(s))) => return Some((addr, s)),
                Ok((addr, Err(e))) => info!(%addr, "no snapshot from peer: {e}"),
                Err(_) => {}
            }
        }
        None
    })
    .await;
    asks.abort_all();
    first.ok().flatten()
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
        repl.check_horizon(&node, addr);
        let conn = match tokio::time::timeout(
            Duration::from_secs(5),
            connect(&endpoint, addr, &repl.auth),
        )
        .await
        {
            Ok(Ok((conn, key))) => {
                info!(%addr, "peer link up");
                repl.update(addr, |s| {
                    s.node = Some(key);
                    s.last_error = None;
                });
                backoff = every;
                conn
            }
            other => {
                let why = match other {
                    Ok(Err(e)) => e,
                    _ => "connect timed out".to_string(),
                };
                debug!(%addr, "peer link down: {why}");
                repl.down(addr, why);
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
                                repl.update(addr, |s| s.pushed += 1);
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
                repl.down(addr, e);
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

/// One pull round; `Ok(true)` when the peer has more waiting.
async fn pull(
    node: &Arc<Node>,
    repl: &Arc<Replication>,
    conn: &quinn::Connection,
    addr: SocketAddr,
) -> Result<bool, String> {
    // Epochs past the lateness horizon are left out on both sides, by this node's clock: one
    // node expiring an epoch before the other (their clocks and sweeps differ) is not a gap.
    let cutoff = node.expiry_cutoff(now_ms());
    let mut digest = node.state().digest();
    digest.retain_live(cutoff);
    let body = postcard::to_allocvec(&Request::Sync {
        digest,
        // Never more per round than the gap that makes a snapshot the better catch-up.
        max: SYNC_BATCH.min(u32::try_from(repl.catch_up_batches.max(1)).unwrap_or(u32::MAX)),
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
            match postcard::from_bytes::<SyncItem>(&frame).map_err(|_| "bad sync item")? {
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
                } => break 'read (digest, more, state_hash),
            }
        }
        match recv.read(&mut buf).await.map_err(|e| e.to_string())? {
            Some(n) => frames.push(&buf[..n]),
            None => return Err("sync reply ended early".into()),
        }
    };
    let mut pulled = 0u64;
    let mut retry = false;
    let mut refused = false;
    while let Some(r) = submitted.join_next().await {
        match r {
            Ok(Reply::Ack) => pulled += 1,
            Ok(Reply::Retry { .. }) => retry = true,
            // A batch our limits refuse (a lower max_lateness here, say) is left out, counted
            // in the rejection metrics; it would be refused from a producer too.
            Ok(Reply::Nack(_)) => refused = true,
            Err(e) => return Err(e.to_string()),
        }
    }
    let (mut theirs, more, their_hash) = done;
    theirs.retain_live(cutoff);
    let count = theirs.batches();
    repl.readmit(node, addr);
    let settled = !more && !retry && !refused;
    let (mine, my_hash) = {
        let r = node.state();
        let mut d = r.digest();
        d.retain_live(cutoff);
        (d, r.state_hash())
    };
    // The peer holds batches it did not send (it pruned them while this node was away longer
    // than its horizon, or dropped them adopting a snapshot): take its snapshot, with this
    // node's retained batches applied again on top (`Replica::adopt`).
    let gap = settled && !mine.covers(&theirs);
    // An epoch both nodes hold with the same seqs and different contents: its producer signed
    // two contents under one batch id (each node kept the first it saw), or a state was
    // damaged. Found here as soon as that one epoch has settled, whatever ingest does to the
    // others, and repaired deterministically (PROTOCOL.md §9): the node whose hash of the
    // first such epoch is greater adopts the other's snapshot, with its own retained batches
    // the snapshot lacks applied again on top. Versions only move towards the smaller hash,
    // so every node ends with the same contents whatever order anything arrived in.
    let split = mine.diverging(&theirs);
    // Equal digests (epoch hashes included) and different states: damage, or epochs whose
    // hashes are not known (restored from an older snapshot). Repaired by the whole-state
    // hash the same way.
    let whole = split.is_none() && settled && mine == theirs && my_hash != their_hash;
    let diverged = split.is_some() || whole;
    if let Some(d) = &split {
        node.equivocation(d.producer, d.epoch);
    }
    if diverged {
        node.metrics.divergences.fetch_add(1, Relaxed);
        repl.update(addr, |s| s.divergences += 1);
        let yields = split.map_or(my_hash > their_hash, |d| d.mine_yields());
        warn!(
            %addr,
            producer = split.map(|d| edgetally_net::tls::hex(&d.producer.0)),
            epoch = split.map(|d| d.epoch),
            mine = %edgetally_net::tls::hex(&my_hash),
            theirs = %edgetally_net::tls::hex(&their_hash),
            batches = count,
            "the peer holds the same batch ids with different contents{}",
            if yields { ": adopting its snapshot" } else { ": it adopts ours" }
        );
    }
    // Far behind (back from a partition or a long stop): one snapshot from the authenticated
    // peer, with this node's own retained batches applied again on top, instead of
    // verifying and storing every missing batch one by one.
    let far_behind =
        more && theirs.batches().saturating_sub(mine.batches()) > repl.catch_up_batches;
    let adopt =
        gap || far_behind || (diverged && split.map_or(my_hash > their_hash, |d| d.mine_yields()));
    {
        let mut r = node.replica.write().unwrap_or_else(|e| e.into_inner());
        r.observe_peer(&addr.to_string(), theirs);
        r.prune_log();
    }
    let mut repaired = false;
    if adopt {
        let body = postcard::to_allocvec(&Request::Snapshot).map_err(|e| e.to_string())?;
        let raw = request(conn, &body, MAX_MESSAGE).await?;
        let snap: Snapshot = Snapshot::decode(&raw).map_err(|_| "bad snapshot".to_string())?;
        let n = node.clone();
        match tokio::task::spawn_blocking(move || n.adopt(snap)).await {
            Ok(Ok(true)) if diverged => {
                repaired = true;
                node.metrics.divergence_repairs.fetch_add(1, Relaxed);
                info!(%addr, "divergence repaired from the peer's snapshot");
            }
            Ok(Ok(true)) => info!(%addr, far_behind, "caught up from the peer's snapshot"),
            Ok(Ok(false)) => debug!(%addr, "snapshot no longer covers this node; next round"),
            Ok(Err(e)) => warn!(%addr, "adopting the peer's snapshot failed: {e}"),
            Err(e) => warn!(%addr, "adopting the peer's snapshot failed: {e}"),
        }
    }
    repl.update(addr, |s| {
        s.reachable = true;
        s.diverged = diverged && !repaired;
        s.last_sync_ms = now_ms();
        s.last_error = None;
        s.digest_batches = count;
        s.pulled += pulled;
    });
    node.metrics.pulled.fetch_add(pulled, Relaxed);
    Ok(more || retry)
}
