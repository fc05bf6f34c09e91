//! The peer handshake: after the TLS handshake each side sends a `Hello` with its node key
//! and a proof bound to this TLS session (its exported keying material, so a proof cannot be
//! replayed on another connection, and to the side's role, so it cannot be reflected):
//! HMAC-SHA256 under the shared `cluster_secret`, and/or an ed25519 signature by the node key
//! when `peer_keys` lists the allowed nodes. After the `Hello`, on the same stream, each side
//! says what it is ([`HelloExt`]: clock, topology version, settings digest; then
//! [`FeaturesExt`]: the features of the peer protocol it speaks), in bytes nodes of earlier
//! releases skip. [`connect`] is the client side, [`accept_hello`] the server's.

use crate::peer::{request, PeerError};
use edgetally_net::now_ms;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::warn;

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

/// The features of the peer protocol (`edgetally-peer/3`) this release speaks, sent after
/// the facts in a `Hello` ([`FeaturesExt`]). The rule for every later change: a node sends a
/// request, or a batch in a format, only to a peer whose features include it, so nodes of
/// two releases replicate what both read; what only one reads is the newer node's to carry
/// (never a silent split: what a peer lacks is logged and shown in `/v1/status`).
///
/// - `facts`: clock, topology version and settings digest after the `Hello` and a round's
///   `Done`;
/// - `forward-source`: a forwarded batch carries the address it came from;
/// - `topology-agreement`: the `Topology` and `Adopt` requests (versions agree in-band);
/// - `handoffs`: the `Handoff` request;
/// - `features`: this list;
/// - `sketches`: batch format v2 and the sketch queries;
/// - `topk-rounds`: the `TopKRound` query (the cluster's top-k by count in rounds).
pub const FEATURES: &[&str] = &[
    "facts",
    "forward-source",
    "topology-agreement",
    "handoffs",
    "features",
    "sketches",
    "topk-rounds",
];

/// The features of a node that sends facts but no feature list: the previous release
/// (commit c747823), which had every feature but the list itself.
pub const PREVIOUS_RELEASE: &[&str] =
    &["facts", "forward-source", "topology-agreement", "handoffs"];

/// The feature list after the facts of a `Hello` (nodes of the previous release stop reading
/// before it and send none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FeaturesExt {
    features: Vec<String>,
}

/// What a peer said of itself in its last handshake with this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerFacts {
    /// The features of the peer protocol it speaks (its list, or [`PREVIOUS_RELEASE`]'s if
    /// it sent none).
    pub features: Vec<String>,
    /// The features of this release it lacks (what it cannot be sent).
    pub lacks: Vec<String>,
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
    fn record(
        &self,
        node: [u8; 32],
        ext: Option<HelloExt>,
        features: Option<FeaturesExt>,
        sent_ms: Option<i64>,
    ) {
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
        let features = features.map_or_else(
            || PREVIOUS_RELEASE.iter().map(|f| f.to_string()).collect(),
            |f| f.features,
        );
        let lacks: Vec<String> = FEATURES
            .iter()
            .filter(|f| **f != "features" && !features.iter().any(|g| g == *f))
            .map(|f| f.to_string())
            .collect();
        if !lacks.is_empty() {
            warn!(
                node = %edgetally_net::tls::hex(&node),
                "a peer speaks an earlier peer protocol, without {}: it is not sent what it                  lacks (upgrade it)",
                lacks.join(", ")
            );
        }
        let facts = PeerFacts {
            features,
            lacks,
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
                self.record(node, ext, None, None);
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
            .cloned()
    }

    /// Whether `node` speaks `feature` of the peer protocol: as far as this node knows (a
    /// node never heard from is assumed to).
    pub fn speaks(&self, node: &[u8; 32], feature: &str) -> bool {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .is_none_or(|p| p.features.iter().any(|f| f == feature))
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
/// retention (what a query over a long range reads); and, when set, the quantile categories
/// and subject key of `POST /v1/events` (what its batches hold).
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
    // What `POST /v1/events` puts in its batches (a keyed retry at another node must build
    // the same batch): named only when set, so nodes without them agree with earlier releases.
    let mut text = text;
    if !config.quantile_categories.is_empty() {
        let mut cats = config.quantile_categories.clone();
        cats.sort_unstable();
        cats.dedup();
        text.push_str(&format!(" quantile_categories={cats:?}"));
    }
    if config.sketch_retention != crate::config::Config::default().sketch_retention {
        text.push_str(&format!(" sketch_retention={:?}", config.sketch_retention));
    }
    if let Some(key) = &config.subject_key {
        let key = crate::sketch_policy::parse_key(key).unwrap_or_default();
        text.push_str(&format!(" subject_key={}", edgetally_net::tls::hex(&key)));
    }
    sha2::Sha256::digest(text.as_bytes()).into()
}

/// A `Hello` with this node's facts and features after it.
fn hello_bytes(auth: &Auth, role: u8, ekm: &[u8; 32]) -> Result<Vec<u8>, PeerError> {
    let mut out = postcard::to_allocvec(&auth.hello(role, ekm)).map_err(PeerError::from)?;
    out.extend(auth.facts.ext_bytes());
    out.extend(
        postcard::to_allocvec(&FeaturesExt {
            features: FEATURES.iter().map(|f| f.to_string()).collect(),
        })
        .map_err(PeerError::from)?,
    );
    Ok(out)
}

/// The facts appended after a message, if any (a node of an earlier release sends none).
pub(crate) fn read_ext(rest: &[u8]) -> Option<HelloExt> {
    postcard::from_bytes::<HelloExt>(rest).ok()
}

/// A `Hello` and the facts after it, if any (a node of an earlier release sends none).
pub(crate) fn read_hello(raw: &[u8]) -> Result<(Hello, Said), PeerError> {
    let (hello, rest) =
        postcard::take_from_bytes::<Hello>(raw).map_err(|_| PeerError::Malformed("hello"))?;
    let (ext, features) = match postcard::take_from_bytes::<HelloExt>(rest) {
        Ok((ext, rest)) => (Some(ext), postcard::from_bytes::<FeaturesExt>(rest).ok()),
        Err(_) => (None, None),
    };
    Ok((hello, Said { ext, features }))
}

/// What a `Hello` says after the proof (nothing, from a node of an earlier release).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Said {
    ext: Option<HelloExt>,
    features: Option<FeaturesExt>,
}

/// The server side of the handshake: reads the client's `Hello`, checks it, answers with
/// this node's; returns the client's node key.
pub(crate) async fn accept_hello(
    auth: &Auth,
    conn: &quinn::Connection,
    remote: SocketAddr,
) -> Result<[u8; 32], PeerError> {
    let k = ekm(conn)?;
    let (mut send, mut recv) = conn.accept_bi().await.map_err(PeerError::from)?;
    let raw = recv.read_to_end(4096).await.map_err(PeerError::from)?;
    let (theirs, ext) = read_hello(&raw)?;
    auth.check(&theirs, CLIENT, &k, remote)
        .map_err(PeerError::Unauthenticated)?;
    auth.facts.record(theirs.node, ext.ext, ext.features, None);
    let mine = hello_bytes(auth, SERVER, &k)?;
    send.write_all(&mine).await.map_err(PeerError::from)?;
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

pub(crate) fn ekm(conn: &quinn::Connection) -> Result<[u8; 32], PeerError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EKM_LABEL, b"")
        .map_err(|_| PeerError::Keying)?;
    Ok(out)
}

pub(crate) const CLIENT: u8 = 0;
pub(crate) const SERVER: u8 = 1;

/// Connects to a peer and authenticates both ways; returns the connection and its node key.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    auth: &Auth,
) -> Result<(quinn::Connection, [u8; 32]), PeerError> {
    let conn = match endpoint
        .connect(addr, "localhost")
        .map_err(PeerError::from)?
        .await
    {
        Ok(c) => c,
        Err(e) if refused_alpn(&e) => {
            return Err(PeerError::ProtocolMismatch(
                protocol_mismatch(endpoint, addr).await,
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let k = ekm(&conn)?;
    let hello = hello_bytes(auth, CLIENT, &k)?;
    let sent = now_ms();
    let reply = request(&conn, &hello, 4096).await?;
    let (theirs, ext) = read_hello(&reply)?;
    if let Err(why) = auth.check(&theirs, SERVER, &k, addr) {
        conn.close(2u32.into(), why.as_bytes());
        return Err(PeerError::Refused(why));
    }
    auth.facts
        .record(theirs.node, ext.ext, ext.features, Some(sent));
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::SyncItem;
    use edgetally_core::Digest;

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
        // The previous release reads the facts after it and stops before the features.
        let (_, rest) = postcard::take_from_bytes::<Hello>(&new).expect("hello");
        assert_eq!(read_ext(rest).map(|e| e.settings), Some([9; 32]));
        // This release's read of both.
        let (_, said) = read_hello(&new).expect("new decoder");
        let ext = said.ext.expect("facts");
        assert_eq!((ext.topology_version, ext.settings), (4, [9; 32]));
        assert_eq!(
            said.features.as_ref().map(|f| f.features.len()),
            Some(FEATURES.len())
        );
        let said_old = read_hello(&old).expect("old bytes").1;
        assert_eq!((said_old.ext, said_old.features), (None, None));
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
        me.record([1; 32], Some(ext), said.features.clone(), None);
        assert_eq!(me.of(&[1; 32]).map(|f| f.lacks), Some(vec![]));
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

    /// Features: a node of the previous release (facts, no list) speaks its list; a node
    /// that lacks a feature is known to lack it, and is not sent what needs it.
    #[test]
    fn features_are_told_or_taken_from_the_previous_release() {
        let me = Facts::new([9; 32]);
        let ext = HelloExt {
            now_ms: now_ms(),
            topology_version: 0,
            settings: [9; 32],
        };
        me.record([1; 32], Some(ext), None, None);
        let prev = me.of(&[1; 32]).expect("recorded");
        assert_eq!(prev.features, PREVIOUS_RELEASE);
        assert_eq!(
            prev.lacks,
            ["sketches", "topk-rounds"],
            "the previous release lacks the sketches and the top-k rounds"
        );
        assert!(me.speaks(&[1; 32], "topology-agreement"));
        assert!(!me.speaks(&[1; 32], "sketches"));
        let older = FeaturesExt {
            features: vec!["facts".into(), "bloom-digests".into()],
        };
        me.record([2; 32], Some(ext), Some(older), None);
        let f = me.of(&[2; 32]).expect("recorded");
        assert_eq!(
            f.lacks,
            [
                "forward-source",
                "topology-agreement",
                "handoffs",
                "sketches",
                "topk-rounds"
            ]
        );
        assert!(!me.speaks(&[2; 32], "topology-agreement"));
        assert!(
            me.speaks(&[2; 32], "bloom-digests"),
            "unknown features are kept"
        );
        assert!(me.speaks(&[3; 32], "handoffs"), "never heard from: assumed");
    }
}
