//! The peer protocol between mergers, without a node behind it: the authenticated link
//! (ALPN `edgetally-peer/3`: a `Hello` bound to the TLS session, by HMAC under
//! `cluster_secret` and/or a node-key signature), the requests and replies on its streams,
//! the client calls other layers make over it (a snapshot, a forward, a query part, a drain
//! state), and [`Replication`], a node's replication state around `edgetally_core::PeerSync`.
//! [`crate::replication`] serves and drives it for a node; [`crate::cluster`] uses its client
//! calls between groups.

use edgetally_core::{Digest, PeerSync, Snapshot};
use edgetally_net::now_ms;
use edgetally_proto::Reply;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;
use tracing::{info, warn};

/// Batches per pull round (the peer says when more are waiting).
pub const SYNC_BATCH: u32 = 2000;
/// Largest request or reply message accepted on a peer stream.
pub(crate) const MAX_MESSAGE: usize = 256 << 20;
const EKM_LABEL: &[u8] = b"EXPORTER-edgetally-peer-auth";
const PROOF_DOMAIN: &[u8] = b"edgetally/peer/v1\0";

/// How long a peer connection may take to authenticate.
pub const HELLO_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Serialize, Deserialize)]
pub(crate) struct Hello {
    pub(crate) node: [u8; 32],
    hmac: Option<Vec<u8>>,
    signature: Option<Vec<u8>>,
}

#[derive(Serialize, Deserialize)]
pub(crate) enum Request {
    /// "Here is what I have; send what I lack."
    Sync { digest: Digest, max: u32 },
    /// One batch, as its producer signed it.
    Push { batch: Vec<u8> },
    /// The whole state, for a node starting empty.
    Snapshot,
    /// A producer's batch that reached a node of another group (`version`: the sender's
    /// topology version); the reply is the bare reply the producer gets.
    Forward { batch: Vec<u8>, version: u64 },
    /// This group's part of a cluster-wide query ([`crate::scatter::Query`]); the reply is a
    /// postcard [`crate::scatter::Part`].
    Query(crate::scatter::Query),
    /// Where this node stands in a drain; the reply is a postcard
    /// [`crate::scatter::DrainState`].
    DrainState,
    /// The topology this node routes by; the reply is its JSON.
    Topology,
    /// "Route by this topology (JSON) if it is newer than yours"; the reply is the postcard
    /// version the receiver routes by afterwards.
    Adopt(Vec<u8>),
    /// A topology hand-off ([`edgetally_proto::topology::Handoffs`]): the receiver adopts the
    /// topology (JSON) if it is newer, waits until every batch it routed by an older one is
    /// applied, and answers a postcard [`HandoffReply`] for the group `to`.
    Handoff { topology: Vec<u8>, to: String },
}

/// The answer to a hand-off request.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct HandoffReply {
    /// The version the answering node routes by.
    pub(crate) version: u64,
    /// If it is the requester's: every (producer, epoch) seen-set it applied of producers
    /// that some map gives to the requester's group.
    pub(crate) seen: Vec<(edgetally_core::ProducerKey, u64, edgetally_core::SeenSet)>,
}

/// Asks a node for the topology it routes by (its JSON).
pub(crate) async fn topology(conn: &quinn::Connection) -> Result<Vec<u8>, String> {
    let body = postcard::to_allocvec(&Request::Topology).map_err(|e| e.to_string())?;
    request(conn, &body, 1 << 20).await
}

/// Hands a node a topology (JSON) to adopt if newer; the version it routes by afterwards.
pub(crate) async fn adopt(conn: &quinn::Connection, topology: Vec<u8>) -> Result<u64, String> {
    let body = postcard::to_allocvec(&Request::Adopt(topology)).map_err(|e| e.to_string())?;
    let raw = request(conn, &body, 64).await?;
    postcard::from_bytes(&raw).map_err(|_| "bad adopt reply".to_string())
}

/// Asks a node of another group to hand over to the group `to` at the topology (JSON).
pub(crate) async fn handoff(
    conn: &quinn::Connection,
    topology: Vec<u8>,
    to: &str,
) -> Result<HandoffReply, String> {
    let body = postcard::to_allocvec(&Request::Handoff {
        topology,
        to: to.to_string(),
    })
    .map_err(|e| e.to_string())?;
    let raw = request(conn, &body, MAX_MESSAGE).await?;
    postcard::from_bytes(&raw).map_err(|_| "bad hand-off reply".to_string())
}

/// Asks a node where it stands in a drain.
pub(crate) async fn drain_state(
    conn: &quinn::Connection,
) -> Result<crate::scatter::DrainState, String> {
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

/// What follows a `Forward` request's bytes: the address the batch came from (for the
/// owner's per-source quota). Nodes of an earlier release stop reading at the request's end.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct ForwardExt {
    pub(crate) source: Option<std::net::IpAddr>,
}

/// Sends a forwarded batch on an authenticated peer connection; the owner's reply.
pub(crate) async fn forward(
    conn: &quinn::Connection,
    batch: Vec<u8>,
    version: u64,
    source: Option<std::net::IpAddr>,
) -> Result<Reply, String> {
    let mut body =
        postcard::to_allocvec(&Request::Forward { batch, version }).map_err(|e| e.to_string())?;
    body.extend(postcard::to_allocvec(&ForwardExt { source }).map_err(|e| e.to_string())?);
    let raw = request(conn, &body, 64).await?;
    Reply::decode(&raw).map_err(|c| format!("bad reply: {c}"))
}

/// Asks a node of another group for its part of a query.
pub(crate) async fn query(
    conn: &quinn::Connection,
    q: &crate::scatter::Query,
) -> Result<crate::scatter::Part, String> {
    let body = postcard::to_allocvec(&Request::Query(q.clone())).map_err(|e| e.to_string())?;
    let raw = request(conn, &body, MAX_MESSAGE).await?;
    postcard::from_bytes(&raw).map_err(|_| "bad query reply".to_string())
}

#[derive(Serialize, Deserialize)]
pub(crate) enum SyncItem {
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
    /// What this node says of itself in a handshake and what its peers said (shared by every
    /// clone: the replication links, the cluster's links between groups).
    pub facts: Arc<Facts>,
}

/// What a node says of itself after its `Hello`, on the same handshake stream: its clock,
/// its topology version and a digest of the settings replicas must agree on. Appended after
/// the `Hello`'s bytes, so that nodes of the previous release, whose decoder stops at the
/// end of the `Hello`, read it as before (and send none, which is read as "unknown").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HelloExt {
    now_ms: i64,
    topology_version: u64,
    settings: [u8; 32],
}

/// What a peer said of itself in its last handshake with this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerFacts {
    /// Its clock minus this node's, ms (the half round trip taken off where measured).
    pub clock_skew_ms: i64,
    /// Its topology version (0: none).
    pub topology_version: u64,
    /// Whether the settings replicas must agree on are the same as this node's.
    pub settings_match: bool,
}

/// This node's own facts and those its peers sent, by node key.
#[derive(Debug, Default)]
pub struct Facts {
    /// The digest of the settings replicas must agree on ([`settings_digest`]).
    pub settings: [u8; 32],
    /// This node's topology version (0: none), kept current by the cluster layer.
    pub topology_version: std::sync::atomic::AtomicU64,
    peers: Mutex<BTreeMap<[u8; 32], PeerFacts>>,
}

impl Facts {
    /// A node's facts with the digest of its settings ([`settings_digest`]).
    pub fn new(settings: [u8; 32]) -> Facts {
        Facts {
            settings,
            ..Facts::default()
        }
    }

    fn ext(&self) -> HelloExt {
        HelloExt {
            now_ms: now_ms(),
            topology_version: self
                .topology_version
                .load(std::sync::atomic::Ordering::Relaxed),
            settings: self.settings,
        }
    }

    /// Records what peer `node` said; `sent_ms`: when this node's own `Hello` left, if it
    /// asked (the half round trip is then taken off the skew).
    fn record(&self, node: [u8; 32], ext: Option<HelloExt>, sent_ms: Option<i64>) {
        let Some(ext) = ext else {
            // A node of an earlier release: nothing known of it.
            self.peers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&node);
            return;
        };
        let now = now_ms();
        let mid = sent_ms.map_or(now, |t| t + (now - t) / 2);
        let facts = PeerFacts {
            clock_skew_ms: ext.now_ms.saturating_sub(mid),
            topology_version: ext.topology_version,
            settings_match: ext.settings == self.settings,
        };
        if !facts.settings_match {
            warn!(
                node = %edgetally_net::tls::hex(&node),
                "a peer runs with other settings that replicas must agree on (limits, \
                 seen_expiry_margin_ms, retention): answers are not complete until they agree"
            );
        }
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node, facts);
    }

    /// What `node` says of itself after a pull round (appended to the round's `Done`): its
    /// topology version and settings, which change while links stay up; the clock skew stays
    /// the handshake's (a round's reply is timed by the batches it carries).
    pub(crate) fn refresh(&self, node: [u8; 32], ext: Option<HelloExt>) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        match (ext, peers.get_mut(&node)) {
            (Some(ext), Some(p)) => {
                p.topology_version = ext.topology_version;
                p.settings_match = ext.settings == self.settings;
            }
            (Some(_), None) => {
                drop(peers);
                self.record(node, ext, None);
            }
            (None, _) => {
                peers.remove(&node);
            }
        }
    }

    /// This node's facts as bytes to append to a message (see [`HelloExt`]).
    pub(crate) fn ext_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(&self.ext()).unwrap_or_default()
    }

    /// What `node` said in its last handshake, if it said anything.
    pub fn of(&self, node: &[u8; 32]) -> Option<PeerFacts> {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .copied()
    }

    /// Whether one of `nodes` (this node's replication peers: their facts are refreshed at
    /// every pull round) runs other settings that replicas must agree on, or another
    /// topology version.
    pub fn disagreement<'a>(&self, nodes: impl IntoIterator<Item = &'a [u8; 32]>) -> bool {
        let mine = self
            .topology_version
            .load(std::sync::atomic::Ordering::Relaxed);
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        nodes.into_iter().any(|n| {
            peers
                .get(n)
                .is_some_and(|p| !p.settings_match || p.topology_version != mine)
        })
    }
}

/// The digest of the settings whose difference between replicas changes what they hold or
/// answer: the batch limits and lateness (a replicated batch one refuses the other applied),
/// the seen-set expiry margin (how long a resend is known for a duplicate) and the tiers'
/// retention (what a query over a long range reads).
pub fn settings_digest(config: &crate::config::Config) -> [u8; 32] {
    use sha2::Digest as _;
    let l = &config.limits;
    let text = format!(
        "edgetally/settings/v1 max_payload_bytes={} max_summaries={} max_categories={} \
         max_entities={} max_lateness_ms={} seen_expiry_margin_ms={} retention={:?}",
        l.max_payload_bytes,
        l.max_summaries,
        l.max_categories,
        l.max_entities,
        l.max_lateness_ms,
        config.seen_expiry_margin_ms,
        config.retention.tiers
    );
    sha2::Sha256::digest(text.as_bytes()).into()
}

/// A `Hello` with this node's facts after it.
fn hello_bytes(auth: &Auth, role: u8, ekm: &[u8; 32]) -> Result<Vec<u8>, String> {
    let mut out = postcard::to_allocvec(&auth.hello(role, ekm)).map_err(|e| e.to_string())?;
    out.extend(auth.facts.ext_bytes());
    Ok(out)
}

/// The facts appended after a message, if any (a node of an earlier release sends none).
pub(crate) fn read_ext(rest: &[u8]) -> Option<HelloExt> {
    postcard::from_bytes::<HelloExt>(rest).ok()
}

/// A `Hello` and the facts after it, if any (a node of an earlier release sends none).
pub(crate) fn read_hello(raw: &[u8]) -> Result<(Hello, Option<HelloExt>), String> {
    let (hello, rest) =
        postcard::take_from_bytes::<Hello>(raw).map_err(|_| "bad hello".to_string())?;
    Ok((hello, read_ext(rest)))
}

/// The server side of the handshake: reads the client's `Hello`, checks it, answers with
/// this node's; returns the client's node key.
pub(crate) async fn accept_hello(
    auth: &Auth,
    conn: &quinn::Connection,
    remote: SocketAddr,
) -> Result<[u8; 32], String> {
    let k = ekm(conn)?;
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let raw = recv.read_to_end(4096).await.map_err(|e| e.to_string())?;
    let (theirs, ext) = read_hello(&raw)?;
    auth.check(&theirs, CLIENT, &k, remote)
        .map_err(str::to_string)?;
    auth.facts.record(theirs.node, ext, None);
    let mine = hello_bytes(auth, SERVER, &k)?;
    send.write_all(&mine).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    Ok(theirs.node)
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
            facts: Arc::default(),
        })
    }

    /// Whether no credential is configured (then no peer is accepted, loopback or not).
    pub fn open_to_loopback_only(&self) -> bool {
        self.secret.is_none() && self.keys.is_empty()
    }

    fn node(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    pub(crate) fn hello(&self, role: u8, ekm: &[u8; 32]) -> Hello {
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

    pub(crate) fn check(
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

pub(crate) fn ekm(conn: &quinn::Connection) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EKM_LABEL, b"")
        .map_err(|_| "keying material unavailable".to_string())?;
    Ok(out)
}

pub(crate) async fn request(
    conn: &quinn::Connection,
    body: &[u8],
    max_reply: usize,
) -> Result<Vec<u8>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(body).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    recv.read_to_end(max_reply).await.map_err(|e| e.to_string())
}

pub(crate) const CLIENT: u8 = 0;
pub(crate) const SERVER: u8 = 1;

/// Connects to a peer and authenticates both ways; returns the connection and its node key.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    auth: &Auth,
) -> Result<(quinn::Connection, [u8; 32]), String> {
    let conn = match endpoint
        .connect(addr, "localhost")
        .map_err(|e| e.to_string())?
        .await
    {
        Ok(c) => c,
        Err(e) if refused_alpn(&e) => return Err(protocol_mismatch(endpoint, addr).await),
        Err(e) => return Err(e.to_string()),
    };
    let k = ekm(&conn)?;
    let hello = hello_bytes(auth, CLIENT, &k)?;
    let sent = now_ms();
    let reply = request(&conn, &hello, 4096).await?;
    let (theirs, ext) = read_hello(&reply)?;
    if let Err(why) = auth.check(&theirs, SERVER, &k, addr) {
        conn.close(2u32.into(), why.as_bytes());
        return Err(format!("peer refused: {why}"));
    }
    auth.facts.record(theirs.node, ext, Some(sent));
    Ok((conn, theirs.node))
}

/// What starts the reason [`connect`] gives when the peer speaks another peer protocol.
pub const PROTOCOL_MISMATCH: &str = "protocol mismatch: ";

/// Whether a handshake failed because the peer offered none of our ALPNs (TLS alert 120,
/// `no_application_protocol`): it speaks another peer protocol.
fn refused_alpn(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ConnectionClosed(c)
        if c.error_code == quinn::TransportErrorCode::crypto(120))
}

/// Finds which peer protocol the node at `addr` speaks, by offering each earlier one; the
/// reason to report (logged, and in `/v1/status` as the peer's `last_error`).
async fn protocol_mismatch(endpoint: &quinn::Endpoint, addr: SocketAddr) -> String {
    let mine = String::from_utf8_lossy(edgetally_net::tls::ALPN_PEER).to_string();
    for alpn in edgetally_net::tls::ALPN_PEER_EARLIER {
        let Ok(cfg) = edgetally_net::tls::peer_client_config_for(alpn) else {
            continue;
        };
        let Ok(connecting) = endpoint.connect_with(cfg, addr, "localhost") else {
            continue;
        };
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(2), connecting).await {
            c.close(3u32.into(), b"a later peer protocol: upgrade this node");
            let theirs = String::from_utf8_lossy(alpn);
            return format!(
                "{PROTOCOL_MISMATCH}{addr} runs an earlier release (peer protocol {theirs}; this \
                 node speaks {mine}): they cannot replicate — upgrade it"
            );
        }
    }
    format!(
        "{PROTOCOL_MISMATCH}{addr} speaks no peer protocol this node knows ({mine}): it runs a \
         later release — upgrade this node"
    )
}

/// Serves a peer's connection (the server side of [`connect`]).
pub use edgetally_core::PeerStatus;

/// The replication half of a node: peer authentication, the peer-sync state machine
/// ([`PeerSync`], which makes every decision; this module does the I/O), and the feed of
/// newly applied batches to push.
#[derive(Debug)]
pub struct Replication {
    /// How peers authenticate.
    pub auth: Auth,
    /// What this node knows of its peers. Lock order: this, then the replica.
    pub sync: Mutex<PeerSync<SocketAddr>>,
    /// Newly applied batches that came from producers (to push).
    pub applied: broadcast::Sender<Arc<[u8]>>,
}

impl Replication {
    pub(crate) fn sync(&self) -> std::sync::MutexGuard<'_, PeerSync<SocketAddr>> {
        self.sync.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The status of every peer (`reachable` means: a pull round completed recently).
    pub fn status(&self) -> BTreeMap<SocketAddr, PeerStatus> {
        self.sync().status(now_ms())
    }

    /// Whether every configured peer is reachable now, with no divergence from it unrepaired,
    /// and no node this one has shaken hands with disagrees on the settings replicas must
    /// share or on the topology version (an answer is not complete while they differ).
    pub fn sees_all_peers(&self) -> bool {
        let sync = self.sync();
        let now = now_ms();
        let nodes: Vec<[u8; 32]> = sync.status(now).values().filter_map(|p| p.node).collect();
        sync.sees_all(now) && !self.auth.facts.disagreement(&nodes)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The facts ride after the `Hello` and after a round's `Done` without breaking either
    /// release: the previous release's decoder (`postcard::from_bytes`, which stops at the end
    /// of the value) reads the new bytes as before, and this release reads the previous one's
    /// bytes (no facts) as "unknown".
    #[test]
    fn facts_after_a_hello_and_a_done_are_invisible_to_the_previous_release() {
        let auth = Auth::new(Some("s"), &[], [7; 32]).expect("auth");
        let facts = Facts::new([9; 32]);
        facts
            .topology_version
            .store(4, std::sync::atomic::Ordering::Relaxed);
        let auth = Auth {
            facts: Arc::new(facts),
            ..auth
        };
        let ekm = [3; 32];
        let new = hello_bytes(&auth, CLIENT, &ekm).expect("hello");
        let old = postcard::to_allocvec(&auth.hello(CLIENT, &ekm)).expect("old hello");
        assert!(new.len() > old.len() && new.starts_with(&old));
        // The previous release's read of the new bytes.
        let theirs: Hello = postcard::from_bytes(&new).expect("old decoder");
        assert!(auth
            .check(&theirs, CLIENT, &ekm, "127.0.0.1:1".parse().expect("addr"))
            .is_ok());
        // This release's read of both.
        let (_, ext) = read_hello(&new).expect("new decoder");
        let ext = ext.expect("facts");
        assert_eq!((ext.topology_version, ext.settings), (4, [9; 32]));
        assert_eq!(read_hello(&old).expect("old bytes").1, None);
        // After a Done, the same.
        let done = postcard::to_allocvec(&SyncItem::Done {
            digest: Digest::default(),
            more: false,
            state_hash: [1; 32],
        })
        .expect("done");
        let mut with = done.clone();
        with.extend(auth.facts.ext_bytes());
        assert!(
            postcard::from_bytes::<SyncItem>(&with).is_ok(),
            "old decoder"
        );
        let (_, rest) = postcard::take_from_bytes::<SyncItem>(&with).expect("new decoder");
        assert_eq!(read_ext(rest).map(|e| e.topology_version), Some(4));
        let (_, rest) = postcard::take_from_bytes::<SyncItem>(&done).expect("old bytes");
        assert_eq!(read_ext(rest), None);
        // A peer's facts: recorded, refreshed, and judged.
        let me = Facts::new([9; 32]);
        me.record([1; 32], Some(ext), None);
        assert!(me.disagreement(&[[1; 32]]), "topology version 4 against 0");
        me.topology_version
            .store(4, std::sync::atomic::Ordering::Relaxed);
        assert!(!me.disagreement(&[[1; 32]]));
        assert!(!me.disagreement(&[[2; 32]]), "a node never heard from");
        let other = HelloExt {
            settings: [8; 32],
            ..ext
        };
        me.refresh([1; 32], Some(other));
        assert_eq!(me.of(&[1; 32]).map(|f| f.settings_match), Some(false));
        assert!(me.disagreement(&[[1; 32]]));
        // The peer restarted as the previous release: nothing known of it any more.
        me.refresh([1; 32], None);
        assert_eq!(me.of(&[1; 32]), None);
        assert!(!me.disagreement(&[[1; 32]]));
    }
}
