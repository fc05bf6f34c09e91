//! The native producer: the sans-IO [`edgetally_proto::Producer`] driven over QUIC, with
//! many batches in flight, reconnects, and optional file-backed state (key, epoch/seq and
//! outbox) so a restarted producer resumes its epoch and resends what was never acked.

use crate::client::{Client, SendError};
use edgetally_core::RejectCode;
use edgetally_proto::{PersistOp, Producer, ProducerConfig, Reply, Stats};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// A merger to send to: its QUIC address and the SHA-256 of its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// QUIC address.
    pub addr: SocketAddr,
    /// Pinned certificate hash.
    pub cert: [u8; 32],
}

/// Why the native producer could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProducerError {
    /// Reading or writing the state directory failed.
    #[error("state {0}: {1}")]
    State(PathBuf, std::io::Error),
    /// The configuration was refused.
    #[error("config: {0}")]
    Config(RejectCode),
}

use crate::{now_ms, random_seed, random_u64};

/// What a state directory holds: seed, epoch, next seq, and the outbox (seq, bytes).
type Saved = ([u8; 32], u64, u64, Vec<(u64, Vec<u8>)>);

/// File-backed state: `key` (seed, hex), `state` ("epoch next_seq"), `outbox/<seq>`.
struct FileState {
    dir: PathBuf,
}

impl FileState {
    fn io<T>(&self, r: std::io::Result<T>) -> Result<T, ProducerError> {
        r.map_err(|e| ProducerError::State(self.dir.clone(), e))
    }

    fn write_atomic(&self, name: &Path, bytes: &[u8]) -> Result<(), ProducerError> {
        let tmp = name.with_extension("tmp");
        self.io(std::fs::write(&tmp, bytes))?;
        self.io(std::fs::File::open(&tmp).and_then(|f| f.sync_all()))?;
        self.io(std::fs::rename(&tmp, name))
    }

    /// (seed, epoch, next_seq, outbox) — a fresh identity and epoch if there is no state.
    fn load(&self) -> Result<Saved, ProducerError> {
        self.io(std::fs::create_dir_all(self.dir.join("outbox")))?;
        let key_path = self.dir.join("key");
        let seed = match std::fs::read_to_string(&key_path) {
            Ok(s) => crate::tls::parse_hash(s.trim()).ok_or_else(|| {
                ProducerError::State(key_path.clone(), std::io::Error::other("not 64 hex digits"))
            })?,
            Err(_) => {
                let seed = random_seed();
                self.write_atomic(&key_path, crate::tls::hex(&seed).as_bytes())?;
                seed
            }
        };
        let (epoch, next_seq) = match std::fs::read_to_string(self.dir.join("state")) {
            Ok(s) => {
                let mut it = s.split_whitespace().map(str::parse::<u64>);
                match (it.next(), it.next()) {
                    (Some(Ok(e)), Some(Ok(n))) => (e, n),
                    _ => (random_u64(), 0),
                }
            }
            Err(_) => (random_u64(), 0),
        };
        let mut outbox = Vec::new();
        for entry in self.io(std::fs::read_dir(self.dir.join("outbox")))? {
            let path = self.io(entry)?.path();
            if let Some(seq) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u64>().ok())
            {
                outbox.push((seq, self.io(std::fs::read(&path))?));
            }
        }
        outbox.sort_by_key(|(s, _)| *s);
        Ok((seed, epoch, next_seq, outbox))
    }

    fn apply(&self, op: PersistOp) -> Result<(), ProducerError> {
        match op {
            PersistOp::Identity {
                epoch, next_seq, ..
            } => self.write_atomic(
                &self.dir.join("state"),
                format!("{epoch} {next_seq}\n").as_bytes(),
            ),
            PersistOp::Put { seq, bytes } => {
                self.write_atomic(&self.dir.join("outbox").join(seq.to_string()), &bytes)
            }
            PersistOp::Remove { seq } => {
                let _ = std::fs::remove_file(self.dir.join("outbox").join(seq.to_string()));
                Ok(())
            }
        }
    }
}

/// What the producer knows of its link to one endpoint ([`NativeProducer::links`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkStatus {
    /// The endpoint's address.
    pub addr: SocketAddr,
    /// Whether a batch sent to it was ever answered (Ack, Nack or Retry).
    pub connected: bool,
    /// Why the last attempt failed, if it did (cleared by the next success).
    pub last_error: Option<LinkError>,
}

/// Why sending to an endpoint failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The endpoint presented a certificate other than the pinned one.
    #[error(
        "its certificate (sha256 {}) is not the pinned one",
        crate::tls::hex(presented)
    )]
    CertificateMismatch {
        /// The SHA-256 of the certificate it presented.
        presented: [u8; 32],
    },
    /// No answer to the handshake within the connect timeout.
    #[error("no answer to the QUIC handshake within {0} s (is a merger listening there?)")]
    Unreachable(u64),
    /// The endpoint refused the connection.
    #[error("it refused the connection: {0}")]
    Refused(String),
    /// Anything else (a stream reset, a timed-out reply…).
    #[error("{0}")]
    Failed(String),
}

/// How long a connection's handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

struct Shared {
    /// Per endpoint, in the order given.
    links: Mutex<Vec<LinkStatus>>,
    producer: Mutex<Producer>,
    wake: Notify,
    state: Option<FileState>,
    closed: std::sync::atomic::AtomicBool,
    /// An enrolment credential to present on every new connection (and its generation, so a
    /// replaced credential is presented again on connections that already exist).
    credential: Mutex<Option<(u64, Arc<[u8]>)>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Producer> {
        self.producer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes the outcome of a send to endpoint `i`.
    fn link(&self, i: usize, error: Option<&LinkError>) {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = links.get_mut(i) {
            match error {
                None => {
                    l.connected = true;
                    l.last_error = None;
                }
                Some(e) => {
                    if l.last_error.as_ref() != Some(e) {
                        tracing::debug!(endpoint = %l.addr, "send failed: {e}");
                    }
                    l.last_error = Some(e.clone());
                }
            }
        }
    }

    fn persist(&self) {
        let Some(state) = &self.state else {
            while self.lock().poll_persist().is_some() {}
            return;
        };
        loop {
            let op = self.lock().poll_persist();
            let Some(op) = op else { break };
            if let Err(e) = state.apply(op) {
                tracing::warn!("producer state not saved: {e}");
            }
        }
    }
}

/// A running native producer. Cheap to clone.
#[derive(Clone)]
pub struct NativeProducer {
    shared: Arc<Shared>,
    driver: Arc<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for NativeProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeProducer").finish_non_exhaustive()
    }
}

impl NativeProducer {
    /// Starts a producer sending to `endpoints` (failover in rendezvous order). With
    /// `state_dir`, the key, epoch/seq and outbox live there and survive restarts; without,
    /// the identity is fresh and the outbox is memory only. Must run inside a tokio runtime.
    pub fn start(
        config: ProducerConfig,
        endpoints: Vec<Endpoint>,
        state_dir: Option<&Path>,
    ) -> Result<NativeProducer, ProducerError> {
        let state = state_dir.map(|d| FileState {
            dir: d.to_path_buf(),
        });
        let (seed, epoch, next_seq, outbox) = match &state {
            Some(s) => s.load()?,
            None => (random_seed(), random_u64(), 0, Vec::new()),
        };
        let names: Vec<String> = endpoints.iter().map(|e| e.addr.to_string()).collect();
        let links = endpoints
            .iter()
            .map(|e| LinkStatus {
                addr: e.addr,
                connected: false,
                last_error: None,
            })
            .collect();
        let producer =
            Producer::resume(config, seed, epoch, next_seq, outbox, &names, random_u64())
                .map_err(ProducerError::Config)?;
        let shared = Arc::new(Shared {
            links: Mutex::new(links),
            producer: Mutex::new(producer),
            wake: Notify::new(),
            state,
            closed: false.into(),
            credential: Mutex::new(None),
        });
        shared.persist();
        let driver = tokio::spawn(drive(shared.clone(), endpoints));
        Ok(NativeProducer {
            shared,
            driver: Arc::new(driver),
        })
    }

    /// Sets the enrolment credential (`edgetally enroll`, docs/PROTOCOL.md §8) that mergers
    /// with the `enrolled` policy require: it is presented on every connection before the
    /// first batch. Set it before recording: a batch a merger refuses as `not_admitted` is
    /// dropped like any other refused batch.
    pub fn set_credential(&self, credential: Vec<u8>) {
        let mut c = self
            .shared
            .credential
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let generation = c.as_ref().map_or(1, |(g, _)| g + 1);
        *c = Some((generation, Arc::from(credential)));
        drop(c);
        self.shared.wake.notify_one();
    }

    /// Routes each batch to its owner shard group's endpoints first
    /// ([`Producer::set_topology`]: the topology from `GET /v1/topology` or the mergers'
    /// topology file), so no merger has to forward it. Endpoints match a group's `quic`
    /// addresses as written (`ip:port`).
    pub fn set_topology(&self, topology: Option<edgetally_proto::topology::Topology>) {
        self.shared
            .producer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_topology(topology);
        self.shared.wake.notify_one();
    }

    /// Records one event (`ts_ms` defaults to now).
    pub fn record(
        &self,
        category: &str,
        entity: Option<&str>,
        value: f64,
        ts_ms: Option<i64>,
    ) -> Result<(), RejectCode> {
        let r = self
            .shared
            .lock()
            .record(now_ms(), category, entity, value, ts_ms);
        self.shared.wake.notify_one();
        r
    }

    /// Records one event of a subject (a user, device or session id): its value, and the
    /// subject's hash into its bucket's distinct-count sketch (`ts_ms` defaults to now).
    pub fn record_subject(
        &self,
        category: &str,
        entity: Option<&str>,
        value: f64,
        ts_ms: Option<i64>,
        subject: &str,
    ) -> Result<(), RejectCode> {
        let r = {
            let mut p = self.shared.lock();
            match p.handle(category, entity) {
                Ok(h) => p.record_subject(now_ms(), h, value, ts_ms, subject),
                Err(code) => p.refuse(code),
            }
        };
        self.shared.wake.notify_one();
        r
    }

    /// The handle of (category, entity) for hot loops.
    pub fn handle(
        &self,
        category: &str,
        entity: Option<&str>,
    ) -> Result<edgetally_proto::Handle, RejectCode> {
        self.shared.lock().handle(category, entity)
    }

    /// Records through a handle.
    pub fn record_handle(
        &self,
        h: edgetally_proto::Handle,
        value: f64,
        ts_ms: Option<i64>,
    ) -> Result<(), RejectCode> {
        let r = self.shared.lock().record_handle(now_ms(), h, value, ts_ms);
        self.shared.wake.notify_one();
        r
    }

    /// Records many values of one handle (at `ts_ms[i]`, or now); returns how many were
    /// accepted, the others are counted as invalid.
    pub fn record_many(
        &self,
        h: edgetally_proto::Handle,
        values: &[f64],
        ts_ms: Option<&[i64]>,
    ) -> usize {
        let n = self.shared.lock().record_many(now_ms(), h, values, ts_ms);
        self.shared.wake.notify_one();
        n
    }

    /// Resolves once everything recorded before the call has been answered (acked, rejected
    /// or dropped), or after `timeout` (returning false).
    pub async fn flush(&self, timeout: Duration) -> bool {
        let token = self.shared.lock().flush(now_ms());
        self.shared.wake.notify_one();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.shared.lock().flushed(token) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The producer's public key (which also decides its endpoint order).
    pub fn producer_key(&self) -> edgetally_core::ProducerKey {
        self.shared.lock().producer_key()
    }

    /// Each endpoint's link: whether it ever connected, and why its last attempt failed.
    pub fn links(&self) -> Vec<LinkStatus> {
        self.shared
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats()
    }

    /// Stops the driver (what is unacked stays in the state directory, if any).
    pub fn close(&self) {
        self.shared
            .closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.wake.notify_one();
        self.driver.abort();
        self.shared.persist();
    }
}

/// Per endpoint: the connection, if open, and the credential generation presented on it.
type Connections = tokio::sync::Mutex<Vec<Option<(Client, u64)>>>;

async fn drive(shared: Arc<Shared>, endpoints: Vec<Endpoint>) {
    let clients: Arc<Connections> = Arc::new(tokio::sync::Mutex::new(vec![None; endpoints.len()]));
    let endpoints = Arc::new(endpoints);
    while !shared.closed.load(std::sync::atomic::Ordering::Relaxed) {
        let now = now_ms();
        let mut sent = false;
        loop {
            let t = shared.lock().poll_transmit(now);
            let Some(t) = t else { break };
            sent = true;
            let (shared, clients, endpoints) = (shared.clone(), clients.clone(), endpoints.clone());
            tokio::spawn(async move {
                let credential = shared
                    .credential
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let result = send(&clients, &endpoints, t.endpoint, &t.bytes, credential).await;
                shared.link(t.endpoint, result.as_ref().err());
                let now = now_ms();
                match result {
                    Ok(reply) => shared.lock().handle_reply(now, t.seq, reply),
                    Err(_) => shared.lock().handle_transport_error(now, t.seq, t.endpoint),
                }
                shared.persist();
                shared.wake.notify_one();
            });
        }
        shared.persist();
        if sent {
            continue;
        }
        let wait = shared
            .lock()
            .poll_timeout()
            .map_or(1000, |t| t.saturating_sub(now).clamp(1, 1000));
        let _ =
            tokio::time::timeout(Duration::from_millis(wait as u64), shared.wake.notified()).await;
    }
}

/// Sends on the endpoint's connection, (re)connecting as needed and presenting the
/// credential on a connection that has not seen it; the reason on transport failure.
async fn send(
    clients: &Connections,
    endpoints: &[Endpoint],
    i: usize,
    bytes: &[u8],
    credential: Option<(u64, Arc<[u8]>)>,
) -> Result<Reply, LinkError> {
    let ep = endpoints
        .get(i)
        .ok_or_else(|| LinkError::Failed("no such endpoint".into()))?;
    let forget = || async {
        if let Some(slot) = clients.lock().await.get_mut(i) {
            *slot = None;
        }
    };
    let (client, presented) = {
        let mut cs = clients.lock().await;
        match cs.get(i).cloned().flatten() {
            Some(c) => c,
            None => {
                let c =
                    tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(ep.addr, vec![ep.cert]))
                        .await
                        .map_err(|_| LinkError::Unreachable(CONNECT_TIMEOUT.as_secs()))?
                        .map_err(|e| match e {
                            SendError::CertificateMismatch { presented } => {
                                LinkError::CertificateMismatch { presented }
                            }
                            SendError::Unreachable => {
                                LinkError::Unreachable(CONNECT_TIMEOUT.as_secs())
                            }
                            SendError::Refused(why) => LinkError::Refused(why),
                            other => LinkError::Failed(other.to_string()),
                        })?;
                if let Some(slot) = cs.get_mut(i) {
                    *slot = Some((c.clone(), 0));
                }
                (c, 0)
            }
        }
    };
    if let Some((generation, cred)) = credential.filter(|(g, _)| *g != presented) {
        match tokio::time::timeout(Duration::from_secs(10), client.send(&cred)).await {
            // Refused or not: the batch's own reply says what the merger thinks of it.
            Ok(Ok(_)) => {
                if let Some(Some(slot)) = clients.lock().await.get_mut(i) {
                    slot.1 = generation;
                }
            }
            Ok(Err(e)) => {
                forget().await;
                return Err(LinkError::Failed(format!("presenting the credential: {e}")));
            }
            Err(_) => {
                forget().await;
                return Err(LinkError::Failed(
                    "no reply to the credential within 10 s".into(),
                ));
            }
        }
    }
    match tokio::time::timeout(Duration::from_secs(10), client.send(bytes)).await {
        Ok(Ok(reply)) => Ok(reply),
        // Forget the connection; the next attempt reconnects.
        Ok(Err(e)) => {
            forget().await;
            Err(LinkError::Failed(e.to_string()))
        }
        Err(_) => {
            forget().await;
            Err(LinkError::Failed("no reply within 10 s".into()))
        }
    }
}
