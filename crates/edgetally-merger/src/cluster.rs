//! Shard groups (docs/design/shard-groups.md): the topology this node routes by, the
//! forwarding of batches that belong to another group, and cluster-wide queries gathered
//! from every group.
//!
//! - **Routing.** A batch belongs to the group that owns its producer under the map in force
//!   at the batch's creation time ([`Topology::owner`]). A node that receives a producer's
//!   batch for another group *forwards* it there over an authenticated peer connection and
//!   relays the owner's reply: the producer gets Ack only once the owner has the batch
//!   durably, needs one seed endpoint, and browsers (which cannot follow a redirect to a
//!   QUIC endpoint whose certificate hash they were not given) keep working.
//! - **Topology.** Read from `topology_file`; re-read when the file changes (checked every
//!   second) and on SIGHUP. A reload must raise the version; one that re-routes creation
//!   times already past is applied but warned about and counted.
//! - **Versions agree in-band.** Every second each node asks every node of the topology for
//!   its topology: a newer one is adopted (and kept in the data directory, so a restart with
//!   an older file keeps it), an older one is handed the newer. Changing the topology waits
//!   until no batch routed by the old one is still on its way (the routing lock).
//! - **Hand-offs** ([`Handoffs`]): a batch that an earlier map gave to another group is taken
//!   only once every replica of that group has adopted this node's version and answered with
//!   what it applied of this group's producers; those batch ids are acknowledged and never
//!   applied here. So a batch is applied in one group whatever order a change reaches the
//!   nodes in, and answers are marked incomplete while versions differ or a hand-off waits.
//! - **Queries.** Any node answers by asking one replica of every other group for its part
//!   ([`Query`] → [`Part`]) and merging: groups hold disjoint sets of batches, so counts and
//!   exact sums add, min/max combine, and top-k is exact because each part carries every row
//!   (the entry node ranks and cuts). A group that does not answer within the deadline is
//!   listed as missing and the answer is marked incomplete: it may lack that group's
//!   batches, but never counts anything twice.

use crate::peer::Auth;
pub use crate::scatter::{combine, Answer, DrainState, GroupAnswer, Part, Query};
use edgetally_core::Limits;
use edgetally_net::now_ms;
use edgetally_proto::topology::{Decision, Group, Handoffs, Topology, TopologyError};
use edgetally_proto::Reply;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use tracing::{debug, info, warn};

mod agreement;
mod forward;
pub(crate) mod topk;

/// Counters of the cluster layer (exported in `/metrics`).
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    /// Batches forwarded to their owner group, by outcome.
    pub forwarded_ok: AtomicU64,
    /// Forwards that found no replica of the owner (the producer got Retry).
    pub forward_failed: AtomicU64,
    /// Forward attempts to one replica that failed (another replica may have answered).
    pub forward_replica_failed: AtomicU64,
    /// Batches received from another group's node.
    pub received_forwarded: AtomicU64,
    /// Topology reloads applied.
    pub reloads: AtomicU64,
    /// Topology reloads refused (unreadable, invalid, stale).
    pub reloads_refused: AtomicU64,
    /// Reloads that re-routed creation times already past.
    pub past_reroutes: AtomicU64,
    /// Query parts asked of other groups that did not arrive in time.
    pub parts_missing: AtomicU64,
    /// Newer topologies adopted from another node.
    pub adoptions: AtomicU64,
    /// Producer batches acknowledged without applying: another group applied them before
    /// handing over.
    pub applied_elsewhere: AtomicU64,
}

/// What a node does with a producer's batch ([`Cluster::route`]).
#[derive(Debug)]
pub enum Route {
    /// Check and apply it here; the guard travels with the batch until it is applied or
    /// refused, so that no topology change happens meanwhile.
    Take(tokio::sync::OwnedRwLockReadGuard<()>),
    /// Forward it to its owner group.
    Forward(Group),
    /// Answer Retry (the owner waits for a drained group's state or for a hand-off).
    Retry {
        /// Suggested delay.
        after_ms: u32,
    },
    /// Another group applied it before handing over: acknowledge it, do not apply it.
    AppliedElsewhere,
}

/// How long a producer is asked to wait while a hand-off to its batch's group is pending.
const HANDOFF_RETRY_MS: u32 = 500;

/// The cluster layer of a node in a shard-group topology.
#[derive(Debug)]
pub struct Cluster {
    /// This node's group.
    pub group: String,
    path: PathBuf,
    topology: RwLock<Arc<Topology>>,
    modified: Mutex<Option<SystemTime>>,
    endpoint: quinn::Endpoint,
    auth: Auth,
    /// Open connections to other nodes, with each one's node key.
    conns: Mutex<HashMap<SocketAddr, (quinn::Connection, [u8; 32])>>,
    /// Replicas of other groups that failed a forward and have not answered since.
    down: Mutex<std::collections::HashSet<String>>,
    deadline: Duration,
    limits: Limits,
    next: AtomicU64,
    draining_since: Mutex<Option<i64>>,
    /// Drained groups some answer showed absorbed by their heir: not asked any more (their
    /// state is in the heir's part; a group gone for good would cost every query the
    /// deadline).
    absorbed_seen: Mutex<std::collections::BTreeSet<String>>,
    /// Held (read) by every producer batch from its routing until it is applied or refused;
    /// taken (write) to change the topology.
    routing: Arc<tokio::sync::RwLock<()>>,
    /// Where the adopted topology and the hand-offs are kept (the data directory).
    dir: PathBuf,
    handoffs: RwLock<Handoffs>,
    /// Every other node's topology version, as last heard (by QUIC address).
    versions: Mutex<BTreeMap<String, u64>>,
    /// A node that routes by another topology of this node's version.
    conflict: Mutex<Option<String>>,
    /// Wakes the version round early (a forward from a node of a newer version).
    pub(crate) versions_now: tokio::sync::Notify,
    /// Counters.
    pub metrics: ClusterMetrics,
}

/// The adopted topology, kept in the data directory.
const ADOPTED_FILE: &str = "topology.adopted.json";
/// The hand-offs received, kept in the data directory.
const HANDOFFS_FILE: &str = "handoffs.postcard";

/// Writes `bytes` to `dir/name` durably: a temporary file, fsync, rename, fsync of the dir.
fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Reads and checks a topology file.
pub fn load(path: &Path) -> Result<Topology, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let t: Topology = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    t.check().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(t)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// How long one forward may wait for the owner's reply (it replies once durable).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a forward waits for one replica before racing the next one against it.
const FORWARD_HEDGE: Duration = Duration::from_millis(300);
/// How long connecting to another group's node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl Cluster {
    /// Loads the topology (the file's, or the one adopted from another node and kept in
    /// `dir`, whichever is newer) and the hand-offs kept in `dir`; checks that the topology
    /// names this node's group.
    pub fn new(
        path: &Path,
        dir: &Path,
        group: &str,
        endpoint: quinn::Endpoint,
        auth: Auth,
        deadline: Duration,
        limits: Limits,
    ) -> Result<Cluster, String> {
        let mut t = load(path)?;
        let adopted_path = dir.join(ADOPTED_FILE);
        match std::fs::read(&adopted_path) {
            Ok(raw) => {
                let adopted: Topology = serde_json::from_slice(&raw)
                    .map_err(|e| format!("{}: {e}", adopted_path.display()))?;
                adopted
                    .check()
                    .map_err(|e| format!("{}: {e}", adopted_path.display()))?;
                if adopted.version > t.version {
                    info!(
                        version = adopted.version,
                        file_version = t.version,
                        "routing by the topology adopted from another node (newer than the file)"
                    );
                    t = adopted;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", adopted_path.display())),
        }
        let handoffs_path = dir.join(HANDOFFS_FILE);
        let handoffs = match std::fs::read(&handoffs_path) {
            Ok(raw) => postcard::from_bytes(&raw)
                .map_err(|e| format!("{}: {e}", handoffs_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Handoffs::default(),
            Err(e) => return Err(format!("{}: {e}", handoffs_path.display())),
        };
        if !t.all_groups().iter().any(|g| g.name == group) {
            return Err(format!(
                "{}: no group is named {group:?} (this node's `group`)",
                path.display()
            ));
        }
        let c = Cluster {
            group: group.to_string(),
            modified: Mutex::new(modified(path)),
            path: path.to_path_buf(),
            topology: RwLock::new(Arc::new(t)),
            endpoint,
            auth,
            conns: Mutex::new(HashMap::new()),
            down: Mutex::default(),
            deadline,
            limits,
            next: AtomicU64::new(0),
            draining_since: Mutex::new(None),
            absorbed_seen: Mutex::new(Default::default()),
            routing: Arc::default(),
            dir: dir.to_path_buf(),
            handoffs: RwLock::new(handoffs),
            versions: Mutex::default(),
            conflict: Mutex::default(),
            versions_now: tokio::sync::Notify::new(),
            metrics: ClusterMetrics::default(),
        };
        c.note_drain(edgetally_net::now_ms());
        c.auth
            .facts
            .topology_version
            .store(c.topology().version, Relaxed);
        Ok(c)
    }

    /// Whether the topology lists `quic` among this node's group's replicas (by address, a
    /// host name resolved; an unspecified IP matches any listed address on its port).
    pub fn lists_quic(&self, quic: std::net::SocketAddr) -> bool {
        let t = self.topology();
        t.all_groups()
            .iter()
            .filter(|g| g.name == self.group)
            .flat_map(|g| &g.quic)
            .filter_map(|a| crate::config::resolve_addr(a).ok())
            .any(|a| a == quic || (quic.ip().is_unspecified() && a.port() == quic.port()))
    }

    /// Since when this node's group is drained (it takes no producer batch since then).
    pub fn draining_since(&self) -> Option<i64> {
        *self
            .draining_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The group this node's group is drained into, if it is.
    pub fn drained_into(&self) -> Option<String> {
        self.topology().drains.get(&self.group).cloned()
    }

    /// Notes when this node's group became drained (`now_ms`), once.
    fn note_drain(&self, now_ms: i64) {
        let drained = self.topology().drains.contains_key(&self.group);
        let mut since = self
            .draining_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match (drained, *since) {
            (true, None) => *since = Some(now_ms),
            (false, Some(_)) => *since = None,
            _ => {}
        }
    }

    /// The topology in force.
    pub fn topology(&self) -> Arc<Topology> {
        self.topology
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the file if it changed (or if `force`); applies it if it may follow the one
    /// in force. Returns whether a new topology took effect.
    pub async fn reload(&self, force: bool) -> bool {
        let m = modified(&self.path);
        {
            let mut last = self.modified.lock().unwrap_or_else(|e| e.into_inner());
            if !force && m == *last {
                return false;
            }
            *last = m;
        }
        let new = match load(&self.path) {
            Ok(t) => t,
            Err(e) => {
                warn!("topology not reloaded: {e}");
                self.metrics.reloads_refused.fetch_add(1, Relaxed);
                return false;
            }
        };
        match self.install(new).await {
            Ok(changed) => {
                if changed {
                    self.metrics.reloads.fetch_add(1, Relaxed);
                }
                changed
            }
            Err(e) => {
                warn!("topology not reloaded: {e}");
                self.metrics.reloads_refused.fetch_add(1, Relaxed);
                false
            }
        }
    }

    /// Puts `new` in force if it may follow the topology in force (a higher version, or the
    /// same content: then `false`): waits until no batch routed by the old one is on its way,
    /// keeps it in the data directory (a restart with an older file keeps it), then routes by
    /// it. The same version with another content is a conflict (reported, never applied).
    pub async fn install(&self, new: Topology) -> Result<bool, String> {
        new.check().map_err(|e| e.to_string())?;
        let old = self.topology();
        match new.follows(&old, now_ms()) {
            Ok(_) if new == *old => return Ok(false),
            Ok(_) => {}
            Err(TopologyError::StaleVersion(a, b)) if a == b => {
                let why = format!("two topologies of version {a} with different content");
                *self.conflict.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
                return Err(why);
            }
            Err(e) => return Err(e.to_string()),
        }
        let _barrier = self.routing.write().await;
        let old = self.topology();
        if new.version <= old.version {
            return Ok(false);
        }
        let past = new.follows(&old, now_ms()).unwrap_or_default();
        if !past.is_empty() {
            warn!(
                from_ms = ?past,
                "the new topology re-routes batches created before now: a resend of \
                 one merged under the old map may now count in two groups (write maps \
                 with a from_ms ahead of the reload)"
            );
            self.metrics.past_reroutes.fetch_add(1, Relaxed);
        }
        if !new.all_groups().iter().any(|g| g.name == self.group) {
            warn!(group = %self.group, "the new topology no longer lists this node's group");
        }
        let json = serde_json::to_vec_pretty(&new).map_err(|e| e.to_string())?;
        write_durably(&self.dir, ADOPTED_FILE, &json)
            .map_err(|e| format!("keeping the topology in the data directory: {e}"))?;
        info!(
            version = new.version,
            groups = new.all_groups().len(),
            "topology in force"
        );
        self.auth.facts.topology_version.store(new.version, Relaxed);
        *self.topology.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        *self.conflict.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.note_drain(now_ms());
        Ok(true)
    }

    /// What this node does with a producer's batch ([`Topology::decide`], then the
    /// hand-offs). [`Route::Take`] too when even its id does not decode: then this node
    /// refuses it with the reason any node would give.
    pub async fn route(&self, raw: &[u8], has_absorbed: impl FnOnce(&str) -> bool) -> Route {
        let guard = self.routing.clone().read_owned().await;
        let Some((id, created_ms)) = edgetally_proto::peek(raw, &self.limits) else {
            return Route::Take(guard);
        };
        let t = self.topology();
        let h = self.handoffs.read().unwrap_or_else(|e| e.into_inner());
        match t.decide(&self.group, &id.producer, created_ms, has_absorbed, |g| {
            h.is_done(g, t.version)
        }) {
            Decision::Forward(g) => Route::Forward(g),
            Decision::AwaitAbsorb(_) => Route::Retry {
                after_ms: crate::node::DRAIN_RETRY_MS,
            },
            Decision::AwaitHandoff(_) => Route::Retry {
                after_ms: HANDOFF_RETRY_MS,
            },
            Decision::Take if h.applied_elsewhere(&id) => {
                self.metrics.applied_elsewhere.fetch_add(1, Relaxed);
                Route::AppliedElsewhere
            }
            Decision::Take => Route::Take(guard),
        }
    }

    /// The groups whose hand-off to this node's group at the version in force is pending.
    pub fn handoffs_pending(&self) -> Vec<String> {
        let t = self.topology();
        let h = self.handoffs.read().unwrap_or_else(|e| e.into_inner());
        t.handoff_sources(&self.group)
            .into_iter()
            .filter(|g| !h.is_done(&g.name, t.version))
            .map(|g| g.name.clone())
            .collect()
    }

    /// Every other node's topology version, as last heard.
    pub fn versions(&self) -> BTreeMap<String, u64> {
        self.versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A conflict between this node's topology and another's of the same version.
    pub fn conflict(&self) -> Option<String> {
        self.conflict
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether this node's routing is settled: every node heard from routes by its version,
    /// no conflict, no hand-off pending. Answers are incomplete while it is not.
    pub fn settled(&self) -> bool {
        let v = self.topology().version;
        self.conflict().is_none()
            && self.versions().values().all(|&x| x == v)
            && self.handoffs_pending().is_empty()
    }

    /// What this node applied of producers some map gives to `to` (a hand-off's answer).
    pub(crate) fn seen_for(
        &self,
        replica: &edgetally_core::Replica,
        to: &str,
    ) -> crate::peer::HandoffReply {
        let t = self.topology();
        crate::peer::HandoffReply {
            version: t.version,
            seen: replica.seen_where(|p| t.could_own(p, to)),
        }
    }

    /// Notes drained groups this node's own state absorbed (not asked of others any more).
    pub fn note_absorbed(&self, absorbed: &[String]) {
        let t = self.topology();
        let mut seen = self.absorbed_seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.extend(
            absorbed
                .iter()
                .filter(|g| t.drains.contains_key(*g))
                .cloned(),
        );
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = addr.parse() {
        return Ok(sa);
    }
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))
}
