//! The peer protocol between mergers, without a node behind it: the authenticated link
//! (ALPN `edgetally-peer/3`, logged in by [`crate::handshake`]), the requests and replies on
//! its streams,
//! the client calls other layers make over it (a snapshot, a forward, a query part, a drain
//! state), and [`Replication`], a node's replication state around `edgetally_core::PeerSync`.
//! [`crate::replication`] serves and drives it for a node; [`crate::cluster`] uses its client
//! calls between groups.

pub use crate::handshake::{connect, Auth, Facts, PeerFacts, HELLO_DEADLINE, PROTOCOL_MISMATCH};
use edgetally_core::{Digest, PeerSync, Snapshot};
use edgetally_net::now_ms;
use edgetally_proto::Reply;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;
use tracing::info;

/// Batches per pull round (the peer says when more are waiting).
pub const SYNC_BATCH: u32 = 2000;
/// Largest request or reply message accepted on a peer stream.
pub(crate) const MAX_MESSAGE: usize = 256 << 20;

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
pub(crate) async fn topology(conn: &quinn::Connection) -> Result<Vec<u8>, PeerError> {
    let body = postcard::to_allocvec(&Request::Topology).map_err(PeerError::from)?;
    request(conn, &body, 1 << 20).await
}

/// Hands a node a topology (JSON) to adopt if newer; the version it routes by afterwards.
pub(crate) async fn adopt(conn: &quinn::Connection, topology: Vec<u8>) -> Result<u64, PeerError> {
    let body = postcard::to_allocvec(&Request::Adopt(topology)).map_err(PeerError::from)?;
    let raw = request(conn, &body, 64).await?;
    postcard::from_bytes(&raw).map_err(|_| PeerError::Malformed("adopt reply"))
}

/// Asks a node of another group to hand over to the group `to` at the topology (JSON).
pub(crate) async fn handoff(
    conn: &quinn::Connection,
    topology: Vec<u8>,
    to: &str,
) -> Result<HandoffReply, PeerError> {
    let body = postcard::to_allocvec(&Request::Handoff {
        topology,
        to: to.to_string(),
    })
    .map_err(PeerError::from)?;
    let raw = request(conn, &body, MAX_MESSAGE).await?;
    postcard::from_bytes(&raw).map_err(|_| PeerError::Malformed("hand-off reply"))
}

/// Asks a node where it stands in a drain.
pub(crate) async fn drain_state(
    conn: &quinn::Connection,
) -> Result<crate::scatter::DrainState, PeerError> {
    let body = postcard::to_allocvec(&Request::DrainState).map_err(PeerError::from)?;
    let raw = request(conn, &body, 1 << 16).await?;
    postcard::from_bytes(&raw).map_err(|_| PeerError::Malformed("drain state"))
}

/// Asks a node for its whole state.
pub(crate) async fn snapshot(conn: &quinn::Connection) -> Result<Snapshot, PeerError> {
    let body = postcard::to_allocvec(&Request::Snapshot).map_err(PeerError::from)?;
    let raw = request(conn, &body, MAX_MESSAGE).await?;
    Snapshot::decode(&raw).map_err(|_| PeerError::Malformed("snapshot"))
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
) -> Result<Reply, PeerError> {
    let mut body =
        postcard::to_allocvec(&Request::Forward { batch, version }).map_err(PeerError::from)?;
    body.extend(postcard::to_allocvec(&ForwardExt { source }).map_err(PeerError::from)?);
    let raw = request(conn, &body, 64).await?;
    Reply::decode(&raw).map_err(PeerError::BadReply)
}

/// Asks a node of another group for its part of a query.
pub(crate) async fn query(
    conn: &quinn::Connection,
    q: &crate::scatter::Query,
) -> Result<crate::scatter::Part, PeerError> {
    let body = postcard::to_allocvec(&Request::Query(q.clone())).map_err(PeerError::from)?;
    let raw = request(conn, &body, MAX_MESSAGE).await?;
    postcard::from_bytes(&raw).map_err(|_| PeerError::Malformed("query reply"))
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

pub(crate) async fn request(
    conn: &quinn::Connection,
    body: &[u8],
    max_reply: usize,
) -> Result<Vec<u8>, PeerError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(PeerError::from)?;
    send.write_all(body).await.map_err(PeerError::from)?;
    let _ = send.finish();
    recv.read_to_end(max_reply).await.map_err(PeerError::from)
}

pub use edgetally_core::PeerStatus;

/// Why a call on a peer connection failed. The messages are what `/v1/status` shows in
/// `peers[].last_error` and the log says.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Starting a connection failed (no route, a bad address).
    #[error("{0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed.
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing a stream failed.
    #[error("{0}")]
    Write(#[from] quinn::WriteError),
    /// Reading a whole stream failed (or it was longer than allowed).
    #[error("{0}")]
    ReadToEnd(#[from] quinn::ReadToEndError),
    /// Reading a stream failed.
    #[error("{0}")]
    Read(#[from] quinn::ReadError),
    /// A message could not be encoded.
    #[error("encode: {0}")]
    Encode(#[from] postcard::Error),
    /// What the peer sent does not decode (which message).
    #[error("bad {0}")]
    Malformed(&'static str),
    /// A frame of a sync reply broke a rule of the frame format.
    #[error("bad frame: {0}")]
    Frame(edgetally_core::RejectCode),
    /// A forwarded batch's reply does not decode.
    #[error("bad reply: {0}")]
    BadReply(edgetally_core::RejectCode),
    /// The peer's stream ended before its answer did.
    #[error("{0} ended early")]
    Truncated(&'static str),
    /// The peer failed authentication on this connection (client side: its `Hello`).
    #[error("peer refused: {0}")]
    Refused(&'static str),
    /// A connecting node failed authentication (server side).
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The peer speaks another peer protocol: the full reason (starts with
    /// [`PROTOCOL_MISMATCH`]).
    #[error("{0}")]
    ProtocolMismatch(String),
    /// No answer in time (what was waited for).
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// The TLS session exports no keying material.
    #[error("keying material unavailable")]
    Keying,
    /// This node does not serve the request (no topology here, say).
    #[error("{0}")]
    NotServed(&'static str),
    /// A JSON message (a topology) could not be encoded.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// This node could not produce its answer (encoding its snapshot, say).
    #[error("{0}")]
    Local(String),
    /// A task of the exchange failed.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The cluster layer still speaks in messages: a peer error becomes its message.
impl From<PeerError> for String {
    fn from(e: PeerError) -> String {
        e.to_string()
    }
}

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

/// Whether signed batch bytes are batch format v2 (which peers without the `sketches`
/// feature cannot read).
pub fn is_v2(raw: &[u8]) -> bool {
    raw.first() == Some(&edgetally_proto::VERSION_V2)
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
                let body = postcard::to_allocvec(&Request::Snapshot).map_err(PeerError::from)?;
                let raw = request(&conn, &body, MAX_MESSAGE).await?;
                conn.close(0u32.into(), b"done");
                Snapshot::decode(&raw).map_err(|_| PeerError::Malformed("snapshot"))
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
