//! A merger node's state and the operations on it: recovery helpers (key, certificate, store
//! replay), producer and forwarded batches routed by the topology, snapshot adoption and
//! absorption, queries. Starting it — listeners, links, upkeep — is [`crate::start`].

use crate::cluster::Route;
use crate::config::Config;
use crate::ingest::{now_ms, Ingest};
use crate::metrics::Metrics;
use crate::store::Store;
use edgetally_core::{BatchId, Limits, LogEntry, ProducerKey, Replica, SeenSet};
use edgetally_net::tls::{hex, Identity};
use edgetally_net::{random_seed, random_u64};
use edgetally_proto::{decode, Reply, Signer};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use tracing::warn;

/// A start-up failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Reading or writing the data directory failed.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// TLS set-up failed.
    #[error("tls: {0}")]
    Tls(String),
    /// Binding a listener failed.
    #[error("bind {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// The stored state could not be restored.
    #[error("restore: {0}")]
    Restore(String),
    /// The configuration is inconsistent.
    #[error("config: {0}")]
    Config(String),
}

/// The shared state of a node, used by the HTTP handlers and the pipeline.
#[derive(Debug)]
pub struct Node {
    /// Configuration in force.
    pub config: Config,
    /// The exporter's feed, when an export sink is configured.
    pub export: Option<crate::export::ExportFeed>,
    /// The replica state.
    pub replica: Arc<RwLock<Replica>>,
    /// Storage.
    pub store: Arc<Store>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The pipeline's front door.
    pub ingest: Ingest,
    /// The node's own signing key (for batches made from `POST /v1/events`).
    pub signer: Signer,
    /// Signs the batches `POST /v1/events` seals: the cluster's events key
    /// ([`events_seed`]), the same on every node that shares `cluster_secret`, so a keyed
    /// request retried at another node is the same batch.
    pub events_signer: Signer,
    /// SHA-256 of the current certificate's DER.
    pub cert_hash: RwLock<[u8; 32]>,
    /// When the current certificate expires (Unix seconds).
    pub cert_not_after: RwLock<i64>,
    /// SHA-256 of the generated certificate that will follow the current one (none with
    /// `tls_cert`): published with it, so browsers pinning both survive a rotation.
    pub next_cert_hash: RwLock<Option<[u8; 32]>>,
    /// The bound QUIC address.
    pub quic_addr: SocketAddr,
    /// The bound HTTP address.
    pub http_addr: RwLock<Option<SocketAddr>>,
    /// Start time.
    pub started: Instant,
    /// Batches replayed from the store at start-up.
    pub recovered: u64,
    /// Stored batches set aside at start-up because they could not be replayed.
    pub quarantined: u64,
    /// One past the last group commit fully applied (groups before it are in the replica).
    pub applied_group: Arc<std::sync::atomic::AtomicU64>,
    /// Replication, when peers are configured.
    pub replication: Option<Arc<crate::peer::Replication>>,
    /// Admission and quotas for producers' batches.
    pub admission: Arc<crate::admission::Admission>,
    /// The HTTP listener's TLS configuration, when `http_tls` is on (swapped on rotation).
    pub http_tls: Option<crate::serve_http::TlsSlot>,
    /// Expired epochs whose stored batches the next compaction drops.
    pub expired: Expired,
    /// The shard-group layer, with a topology (`topology_file`).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Nodes of an earlier release that connected as peers (they cannot replicate with this
    /// one): remote address → (their peer protocol, when last seen, ms).
    pub earlier_peers: Mutex<BTreeMap<SocketAddr, (String, i64)>>,
}

/// Batches of expired epochs that the store may still hold: they are in the totals (and in
/// every snapshot taken since their expiry) but in no seen-set, so the compaction that stores
/// such a snapshot must drop them — replayed over it at start-up they would count twice. Each
/// entry: the store's next group number when the epochs expired (the batches they had applied
/// were all written in earlier groups; a batch written later under a re-used id is another
/// batch and stays), and the seqs each epoch had applied.
#[derive(Debug, Default)]
pub struct Expired(Mutex<Vec<ExpiredEpochs>>);

/// One expiry's epochs (see [`Expired`]).
type ExpiredEpochs = (u64, BTreeMap<(ProducerKey, u64), SeenSet>);

impl Expired {
    pub(crate) fn push(&self, next_group: u64, epochs: Vec<((ProducerKey, u64), SeenSet)>) {
        if !epochs.is_empty() {
            let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
            v.push((next_group, epochs.into_iter().collect()));
        }
    }

    /// Takes every entry (call with the replica lock held, with the snapshot that covers them).
    fn take(&self) -> Vec<ExpiredEpochs> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts back entries whose compaction failed (older first).
    fn put_back(&self, mut taken: Vec<ExpiredEpochs>) {
        if !taken.is_empty() {
            let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
            taken.append(&mut v);
            *v = taken;
        }
    }

    /// Whether the stored batch `id`, written in `group`, is one an expired epoch applied.
    fn covers(taken: &[ExpiredEpochs], group: u64, id: &BatchId) -> bool {
        taken.iter().any(|(before, epochs)| {
            group < *before
                && epochs
                    .get(&(id.producer, id.epoch))
                    .is_some_and(|s| s.contains(id.seq))
        })
    }
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StartError + '_ {
    move |e| StartError::Io(path.to_path_buf(), e)
}

/// The seed of the key that signs `POST /v1/events` batches: derived from `cluster_secret`
/// when set (every node of the cluster signs with the same key, so a request's batch id —
/// derived from its `Idempotency-Key` and body — names the same batch wherever it is
/// retried), else this node's own key (a single node, or a cluster authenticated by
/// `peer_keys` alone).
pub fn events_seed(config: &Config, node_seed: [u8; 32]) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    match &config.cluster_secret {
        Some(s) => {
            let mut h = Sha256::new();
            h.update(b"edgetally/events-key/v1\0");
            h.update(s.as_bytes());
            h.finalize().into()
        }
        None => node_seed,
    }
}

/// Reads a 32-byte key stored as 64 hex digits, creating it if absent.
pub fn load_or_create_key(path: &Path) -> Result<[u8; 32], StartError> {
    match std::fs::read_to_string(path) {
        Ok(s) => edgetally_net::tls::parse_hash(s.trim()).ok_or_else(|| {
            StartError::Io(
                path.to_path_buf(),
                std::io::Error::other("not 64 hex digits"),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let seed = random_seed();
            write_private(path, format!("{}\n", hex(&seed)).as_bytes())?;
            Ok(seed)
        }
        Err(e) => Err(StartError::Io(path.to_path_buf(), e)),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), StartError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Renew generated certificates this long before they expire.
pub(crate) const RENEW_BEFORE_SECS: i64 = 2 * 86_400;

pub(crate) fn identity(config: &Config) -> Result<(Identity, bool), StartError> {
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| StartError::Tls(format!("{}: {e}", cert.display())))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StartError::Tls(format!("{}: {e}", cert.display())))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| StartError::Tls(format!("{}: {e}", key.display())))?;
        return Ok((
            Identity {
                chain,
                key,
                not_after_unix: i64::MAX,
            },
            false,
        ));
    }
    let dir = &config.data_dir;
    let now = now_ms() / 1000;
    if let Some(current) = load_identity(dir, "cert") {
        if current.not_after_unix - now > RENEW_BEFORE_SECS {
            return Ok((current, true));
        }
    }
    // The current certificate is missing or due: the published next one takes over if it is
    // valid now, so pages holding its hash keep working.
    if let Some(next) = load_identity(dir, "next") {
        if valid_from(&next) <= now && next.not_after_unix - now > RENEW_BEFORE_SECS {
            save_identity(dir, "cert", &next)?;
            return Ok((next, true));
        }
    }
    let id = Identity::self_signed(now, &[]).map_err(|e| StartError::Tls(e.to_string()))?;
    save_identity(dir, "cert", &id)?;
    Ok((id, true))
}

/// When a generated certificate becomes valid (Unix seconds): every one is valid for
/// [`edgetally_net::tls::CERT_VALIDITY`].
fn valid_from(id: &Identity) -> i64 {
    id.not_after_unix - edgetally_net::tls::CERT_VALIDITY.as_secs() as i64
}

/// A generated certificate kept in the data directory as `<name>.der`, `<name>.key.der` and
/// `<name>.not_after` (`cert`: the one served; `next`: the one that follows it).
fn load_identity(dir: &std::path::Path, name: &str) -> Option<Identity> {
    let c = std::fs::read(dir.join(format!("{name}.der"))).ok()?;
    let k = std::fs::read(dir.join(format!("{name}.key.der"))).ok()?;
    let m = std::fs::read_to_string(dir.join(format!("{name}.not_after"))).ok()?;
    Some(Identity {
        chain: vec![c.into()],
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(k.into()),
        not_after_unix: m.trim().parse().ok()?,
    })
}

fn save_identity(dir: &std::path::Path, name: &str, id: &Identity) -> Result<(), StartError> {
    let key = match &id.key {
        rustls::pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        _ => return Err(StartError::Tls("unexpected key type".into())),
    };
    write_private(&dir.join(format!("{name}.key.der")), &key)?;
    std::fs::write(dir.join(format!("{name}.der")), id.chain[0].as_ref()).map_err(io(dir))?;
    std::fs::write(
        dir.join(format!("{name}.not_after")),
        format!("{}\n", id.not_after_unix),
    )
    .map_err(io(dir))
}

/// The certificate that follows `current`: valid from an hour before `current` is renewed,
/// for the usual 13 days. Generated once and kept (`next.*`), so its hash — published beside
/// the current one for browsers' `serverCertificateHashes` — is stable until it takes over.
pub(crate) fn next_identity(config: &Config, current: &Identity) -> Result<Identity, StartError> {
    let dir = &config.data_dir;
    if let Some(next) = load_identity(dir, "next") {
        if next.not_after_unix > current.not_after_unix {
            return Ok(next);
        }
    }
    let start = current.not_after_unix - RENEW_BEFORE_SECS - 3600;
    let next =
        Identity::self_signed_from(start, &[]).map_err(|e| StartError::Tls(e.to_string()))?;
    save_identity(dir, "next", &next)?;
    Ok(next)
}

/// At renewal: the next certificate if it is valid by now, else a fresh one.
pub(crate) fn successor(config: &Config, current: &Identity) -> Result<Identity, StartError> {
    let now = now_ms() / 1000;
    let next = next_identity(config, current)?;
    let new = if valid_from(&next) <= now {
        next
    } else {
        Identity::self_signed(now, &[]).map_err(|e| StartError::Tls(e.to_string()))?
    };
    save_identity(&config.data_dir, "cert", &new)?;
    Ok(new)
}

/// What recovery rebuilt.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub(crate) replica: Replica,
    /// Stored batches replayed.
    pub(crate) replayed: u64,
    /// Stored batches set aside (see [`quarantine`]).
    pub(crate) quarantined: u64,
}

pub use edgetally_store::{quarantine, replay_limits};

/// Rebuilds the replica from the snapshot and the stored batches. A stored batch that does
/// not decode or apply is quarantined, never a reason to refuse to start.
pub(crate) fn recover(
    store: &Store,
    data_dir: &Path,
    limits: &Limits,
    peers: &[SocketAddr],
    bootstrap: Option<edgetally_core::Snapshot>,
) -> Result<Recovered, StartError> {
    let loaded = store.load()?;
    let mut replica = match loaded.snapshot.or(bootstrap) {
        Some(s) => Replica::restore(s).map_err(|e| {
            StartError::Restore(format!(
                "the snapshot in {} is inconsistent ({e}); `edgetally check --data-dir {} --repair OUT` salvages the stored batches",
                store.snapshot_location().display(),
                data_dir.display()
            ))
        })?,
        None => Replica::new(),
    };
    // Epochs restored from a snapshot that did not keep their lateness horizon (format 3 or
    // older) get an upper bound of it: every batch applied before now has its oldest bucket
    // ending by now + max_future_skew + the widest bucket (1 day).
    replica.bound_unknown_horizons(
        now_ms()
            .saturating_add(limits.max_future_skew_ms)
            .saturating_add(86_400_000),
    );
    // Batches are retained (in memory and in the store) until every peer's digest covers them.
    replica.set_peers(peers.iter().map(|p| p.to_string()));
    replica.set_string_hash_keys(random_u64(), random_u64());
    // Stored batches were verified before they were acked; decoding re-checks their shape.
    // Limits may have been lowered since: replay with generous ones so nothing acked is lost.
    let replay_limits = replay_limits(limits);
    let (mut replayed, mut quarantined) = (0, 0);
    for raw in loaded.batches {
        let refused = match decode(&raw, &replay_limits) {
            Ok(u) => match replica.apply(LogEntry {
                batch: Arc::new(u.batch),
                raw: raw.as_slice().into(),
            }) {
                Ok(_) => None,
                Err(code) => Some(format!("apply: {code}")),
            },
            Err(e) => Some(format!("decode: {e}")),
        };
        match refused {
            None => replayed += 1,
            Some(reason) => {
                let path = quarantine(data_dir, &raw, &reason)?;
                warn!(path = %path.display(), %reason, "a stored batch could not be replayed: quarantined");
                quarantined += 1;
            }
        }
    }
    replica.prune_log();
    Ok(Recovered {
        replica,
        replayed,
        quarantined,
    })
}

impl Node {
    /// A read view of the replica (queries hold it for microseconds; a panic elsewhere while
    /// writing cannot leave it half-applied, since apply checks before it writes).
    pub fn state(&self) -> std::sync::RwLockReadGuard<'_, Replica> {
        self.replica.read().unwrap_or_else(|e| e.into_inner())
    }

    /// SHA-256 of the current certificate.
    pub fn cert_hash(&self) -> [u8; 32] {
        *self.cert_hash.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces this node's state with a peer's snapshot plus this node's retained batches the
    /// snapshot does not cover ([`Replica::adopt`]), if that loses no batch this node holds:
    /// the catch-up for a node that was away longer than its peers' horizon and lacks batches
    /// they no longer retain, and the repair of a divergence (PROTOCOL.md §9). The snapshot is
    /// stored first (with the stored batches it covers dropped), then swapped in; batches
    /// written but not yet applied are not covered, stay stored, and are applied to the new
    /// state.
    pub fn adopt(&self, snap: edgetally_core::Snapshot) -> Result<bool, String> {
        let mut r = self.replica.write().unwrap_or_else(|e| e.into_inner());
        self.adopt_locked(&mut r, snap)
    }

    /// [`Node::adopt`] with the replica's write lock held.
    fn adopt_locked(
        &self,
        r: &mut Replica,
        snap: edgetally_core::Snapshot,
    ) -> Result<bool, String> {
        let covered = snap.digest();
        let Some(mut fresh) = r.adopt(snap).map_err(|e| e.to_string())? else {
            return Ok(false);
        };
        // The new state's snapshot, numbered under the write lock: after any compaction
        // that read the old state.
        let mut w = self.store.begin_snapshot().map_err(|e| e.to_string())?;
        w.replica(&fresh).map_err(|e| e.to_string())?;
        let stored = w.finish().map_err(|e| e.to_string())?;
        fresh.set_string_hash_keys(random_u64(), random_u64());
        // The stored batches the snapshot covers go, but for those still retained for peers;
        // the others (this node's retained log, applied again on top of the snapshot) stay and
        // are replayed over it at start-up.
        let retained: HashSet<_> = fresh.log().map(|e| e.batch.id).collect();
        // Batches of epochs this node expired are in neither the snapshot's seen-sets nor the
        // new state's log: as in `compact`, the store lets them go with the old state.
        let expired = self.expired.take();
        if let Err(e) = self.store.compact(stored, |group, id| {
            (covered.contains(id) && !retained.contains(id)) || Expired::covers(&expired, group, id)
        }) {
            self.expired.put_back(expired);
            return Err(e.to_string());
        }
        *r = fresh;
        self.metrics.snapshots_adopted.fetch_add(1, Relaxed);
        if let Some(e) = &self.export {
            e.rescan();
        }
        Ok(true)
    }

    /// The lateness horizon at or before which an epoch's seen-set is expired at clock `now`:
    /// `now − max_lateness − seen_expiry_margin_ms`. Every batch such an epoch applied is
    /// refused by the time check from then on, from producers (`max_lateness`) and from peers
    /// (`max_lateness` + half the margin) alike (docs/design/replication.md, "Seen-set expiry").
    pub fn expiry_cutoff(&self, now: i64) -> i64 {
        now.saturating_sub(self.config.limits.max_lateness_ms)
            .saturating_sub(self.config.seen_expiry_margin_ms.max(0))
    }

    /// A peer and this node hold one epoch of `producer` with the same seqs and different
    /// contents: the producer equivocated. Counted and recorded once per producer; with
    /// `refuse_equivocators` its later batches are refused (PROTOCOL.md §9).
    pub fn equivocation(&self, producer: edgetally_core::ProducerKey, epoch: u64) {
        if self.admission.add_equivocator(producer, epoch) {
            self.metrics.equivocations.fetch_add(1, Relaxed);
            tracing::warn!(
                producer = %edgetally_net::tls::hex(&producer.0),
                epoch,
                refused = self.config.refuse_equivocators,
                "a producer signed two contents under one batch id"
            );
        }
    }

    /// Snapshots the state and drops the stored batches the snapshot covers.
    pub fn compact(&self) -> Result<usize, crate::store::StoreError> {
        let (writer, retained, applied_through, expired, covered) = {
            let r = self.state();
            let retained: HashSet<_> = r.log().map(|e| e.batch.id).collect();
            // Taken under the same lock as the snapshot: every expiry the snapshot reflects,
            // and no other.
            let expired = self.expired.take();
            // The batch ids the snapshot covers, wanted only when filtering batch by batch.
            let covered = (!retained.is_empty() || !expired.is_empty()).then(|| r.digest());
            // Streamed from the state into the file: the snapshot is never held in memory
            // beside the state (that was about three times the state at each compaction).
            let started = std::time::Instant::now();
            let written = self.store.begin_snapshot().and_then(|mut w| {
                w.replica(&r)?;
                Ok(w)
            });
            self.metrics
                .snapshot_lock_micros
                .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
            match written {
                Ok(w) => (
                    w,
                    retained,
                    self.applied_group.load(Relaxed),
                    expired,
                    covered,
                ),
                Err(e) => {
                    self.expired.put_back(expired);
                    return Err(e);
                }
            }
        };
        // The fsync, without the lock.
        let snap = match writer.finish() {
            Ok(f) => f,
            Err(e) => {
                self.expired.put_back(expired);
                return Err(e);
            }
        };
        self.metrics.snapshot_bytes.store(snap.bytes(), Relaxed);
        // An expired epoch's batch may sit in a group not yet fully applied, which
        // `compact_through` would keep: filter batch by batch then.
        let done = match covered {
            None => {
                // Every group before `applied_through` is in the snapshot and no peer needs
                // its batches: drop the key range without decoding them. (Groups recovered at
                // start-up count as applied: the watermark starts past them.)
                match applied_through.checked_sub(1) {
                    Some(last) => self.store.compact_through(snap, last)?,
                    None => self.store.save_snapshot(snap)?.then_some(0),
                }
            }
            Some(covered) => match self.store.compact(snap, |group, id| {
                (covered.contains(id) && !retained.contains(id))
                    || Expired::covers(&expired, group, id)
            }) {
                Ok(n) => n,
                Err(e) => {
                    self.expired.put_back(expired);
                    return Err(e);
                }
            },
        };
        let Some(n) = done else {
            // A snapshot of a later state (an adoption) was stored meanwhile; the expired
            // epochs' batches wait for the next compaction.
            self.expired.put_back(expired);
            return Ok(0);
        };
        self.metrics.snapshots.fetch_add(1, Relaxed);
        Ok(n)
    }
}

impl Node {
    /// A producer's message from `source`: a credential (enrolment) or a batch, after the
    /// per-source rate limit.
    /// `credential` is one that rode along with the batch (HTTP's `Edgetally-Credential`): it
    /// is checked after the source's rate limit — a credential costs a signature verification —
    /// and before the batch.
    pub async fn submit_from(
        &self,
        raw: Vec<u8>,
        source: std::net::IpAddr,
        credential: Option<&[u8]>,
    ) -> Reply {
        let now = now_ms();
        if let Some(after_ms) = self.admission.throttle_source(source, now) {
            self.metrics.retried.fetch_add(1, Relaxed);
            return Reply::Retry { after_ms };
        }
        if let Some(c) = credential {
            if let Err(code) = self.admission.enroll(c, now) {
                self.metrics.reject(code);
                return Reply::nack(code);
            }
        }
        if edgetally_proto::credential::is_credential(&raw) {
            return match self.admission.enroll(&raw, now) {
                Ok(_) => Reply::Ack,
                Err(code) => Reply::nack(code),
            };
        }
        self.take_or_forward(raw, false, Some(source)).await
    }

    /// A producer's batch, routed: forwarded to its owner group, answered Retry while its
    /// group waits (a drain, a hand-off), acknowledged if another group applied it before
    /// handing over, else submitted here (`wait`: for room in the queue; `source`: the
    /// address it came from, if known).
    pub(crate) async fn take_or_forward(
        &self,
        raw: Vec<u8>,
        wait: bool,
        source: Option<std::net::IpAddr>,
    ) -> Reply {
        let Some(c) = &self.cluster else {
            return self.ingest.submit_producer(raw, None, wait, source).await;
        };
        self.routed(c, raw, wait, source, true).await
    }

    /// Acts on [`Cluster::route`](crate::cluster::Cluster::route)'s decision for a
    /// producer's batch; `forward`: whether a batch of another group is forwarded there (a
    /// forwarded batch is not forwarded again: the nodes disagree for the moment, Retry).
    async fn routed(
        &self,
        c: &Arc<crate::cluster::Cluster>,
        raw: Vec<u8>,
        wait: bool,
        source: Option<std::net::IpAddr>,
        forward: bool,
    ) -> Reply {
        match c.route(&raw, |g| self.has_absorbed(g)).await {
            Route::Forward(owner) if forward => c.forward(&owner, raw, source).await,
            Route::Forward(_) => Reply::Retry {
                after_ms: crate::ingest::RETRY_AFTER_MS,
            },
            Route::Retry { after_ms } => Reply::Retry { after_ms },
            Route::AppliedElsewhere => Reply::Ack,
            Route::Take(guard) => {
                self.ingest
                    .submit_producer(raw, Some(guard), wait, source)
                    .await
            }
        }
    }

    /// Whether this node's state holds the drained group `name`'s.
    pub fn has_absorbed(&self, name: &str) -> bool {
        self.state().absorbed().iter().any(|g| g == name)
    }

    /// A batch another group's node forwarded here (`version`: its topology version). Taken
    /// like a producer's (admission and every check run here, at the owner) if this node's
    /// topology agrees that its group owns it; else `Retry`, and the topology is re-read if
    /// the sender's is newer: the two nodes disagree for the moment a reload takes, and the
    /// producer resends.
    pub async fn forwarded(
        &self,
        raw: Vec<u8>,
        version: u64,
        source: Option<std::net::IpAddr>,
    ) -> Reply {
        let Some(c) = &self.cluster else {
            return self.ingest.submit_producer(raw, None, false, source).await;
        };
        c.metrics.received_forwarded.fetch_add(1, Relaxed);
        if version > c.topology().version {
            // Learn it now rather than at the next round.
            c.versions_now.notify_one();
        }
        self.routed(c, raw, false, source, false).await
    }

    /// Where this node stands in a drain (for the group that absorbs it, and its peers).
    pub fn drain_state(&self) -> crate::scatter::DrainState {
        let r = self.state();
        crate::scatter::DrainState {
            draining_since_ms: self.cluster.as_ref().and_then(|c| c.draining_since()),
            queue_empty: self.metrics.queue_depth.load(Relaxed) == 0,
            state_hash: r.state_hash(),
            absorbed: r.absorbed().to_vec(),
        }
    }

    /// Merges the state of the drained group `name` (a snapshot of one of its replicas) into
    /// this node's, once: the snapshot stored with the merged state lists the group, so a
    /// restart never absorbs it again. Returns whether it was absorbed now.
    pub fn absorb(&self, name: &str, snap: edgetally_core::Snapshot) -> Result<bool, String> {
        let mut r = self.replica.write().unwrap_or_else(|e| e.into_inner());
        if r.absorbed().iter().any(|g| g == name) {
            return Ok(false);
        }
        let merged = r.snapshot().merge_disjoint(snap, name)?;
        self.adopt_locked(&mut r, merged)
    }

    /// This node's part of a cluster-wide query.
    pub fn part(&self, q: &crate::scatter::Query) -> crate::scatter::Part {
        let (answer, absorbed) = {
            let r = self.state();
            (q.run(&r), r.absorbed().to_vec())
        };
        crate::scatter::Part {
            answer,
            complete: self.complete(),
            as_of_ms: now_ms(),
            absorbed,
        }
    }

    /// Records a connection from a node of an earlier release; whether to log it (the first
    /// time, then at most once a minute per address).
    pub fn note_earlier_peer(&self, remote: SocketAddr, protocol: &str) -> bool {
        let now = now_ms();
        let mut m = self.earlier_peers.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= 1024 && !m.contains_key(&remote) {
            return false;
        }
        let last = m.insert(remote, (protocol.to_string(), now));
        last.is_none_or(|(_, at)| now - at >= 60_000)
    }

    /// Whether this node's answers are complete: it sees every peer of its group, and its
    /// routing is settled ([`crate::cluster::Cluster::settled`]).
    pub fn complete(&self) -> bool {
        self.sees_all_peers() && self.cluster.as_ref().is_none_or(|c| c.settled())
    }

    /// Whether this node currently sees every peer of its group (a single node always does).
    pub fn sees_all_peers(&self) -> bool {
        self.replication.as_ref().is_none_or(|r| r.sees_all_peers())
    }

    /// Answers a query for the whole cluster: this node's part, merged with every other
    /// group's (see [`crate::cluster`]). Returns the answer, whether it is complete, and each
    /// other group's place in it (empty without a topology).
    pub async fn query(
        &self,
        q: crate::scatter::Query,
    ) -> (
        crate::cluster::Answer,
        bool,
        Vec<crate::cluster::GroupAnswer>,
    ) {
        let Some(c) = &self.cluster else {
            let mine = self.part(&q);
            return (mine.answer, mine.complete, Vec::new());
        };
        let mut parts = vec![c.own_part(self, &q)];
        parts.extend(c.gather(&q).await);
        crate::cluster::combine(&q, parts)
    }
}

/// How long a producer is asked to wait while its batch's group is being drained.
pub(crate) const DRAIN_RETRY_MS: u32 = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    /// A browser that pinned the published pair (current, next) keeps working across a
    /// rotation: the certificate served after renewal is the published next one, and the new
    /// next one is another, valid later.
    #[test]
    fn the_published_next_certificate_is_the_one_served_after_renewal() {
        let dir = std::env::temp_dir().join(format!("edgetally-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let config = Config {
            data_dir: dir.clone(),
            ..Config::default()
        };
        let now = now_ms() / 1000;
        // A current certificate one day from expiry: due for renewal.
        let current = Identity::self_signed_from(
            now + 86_400 - edgetally_net::tls::CERT_VALIDITY.as_secs() as i64,
            &[],
        )
        .expect("cert");
        save_identity(&dir, "cert", &current).expect("save");
        let next = next_identity(&config, &current).expect("next");
        assert_ne!(next.cert_hash(), current.cert_hash());
        // Published again, it is the same certificate (kept on disk).
        assert_eq!(
            next_identity(&config, &current).expect("next").cert_hash(),
            next.cert_hash()
        );
        // Renewal serves exactly that one, and publishes a new next.
        let served = successor(&config, &current).expect("successor");
        assert_eq!(served.cert_hash(), next.cert_hash());
        let after = next_identity(&config, &served).expect("next");
        assert_ne!(after.cert_hash(), served.cert_hash());
        assert!(after.not_after_unix > served.not_after_unix);
        // A restart after renewal loads the served one.
        let (loaded, generated) = identity(&config).expect("identity");
        assert!(generated);
        assert_eq!(loaded.cert_hash(), served.cert_hash());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
