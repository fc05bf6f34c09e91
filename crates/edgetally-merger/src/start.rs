//! Starting a node: recovery, the listeners, the replication links and the upkeep tasks
//! wired around a [`Node`]; graceful shutdown and signals. The one module that knows every
//! layer: `node` holds the state and the operations on it, `http`, `replication` and
//! `cluster` use it, and none of them imports this.

use crate::config::Config;
use crate::ingest::{now_ms, Ingest, Pipeline};
use crate::metrics::Metrics;
use crate::node::{
    identity, io, load_or_create_key, next_identity, recover, successor, Expired, Node, Recovered,
    StartError, RENEW_BEFORE_SECS,
};
use crate::store::Store;
use edgetally_core::Replica;
use edgetally_net::tls::{
    hex, server_config, Identity, ALPN_BATCHES, ALPN_H3, ALPN_PEER, ALPN_PEER_EARLIER,
};
use edgetally_proto::{Reply, Signer};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{debug, info, warn};

mod parts;
use parts::*;
/// A started node; `shutdown()` stops it.
#[derive(Debug)]
pub struct Running {
    /// The node.
    pub node: Arc<Node>,
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    /// The commit stage first, then the rest.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    exporting: Option<crate::export::Exporting>,
    endpoint: quinn::Endpoint,
}

impl Node {
    /// Starts a node: recovers state, binds both listeners, spawns upkeep. Prints the
    /// certificate hash and addresses to stdout (one `key: value` per line).
    // Long by design: start-up in its order (checks, key, identity, store, replication,
    // cluster, bootstrap, recovery, admission, export, pipeline, listeners, the node, tasks);
    // each step is a helper call or a field of the node, and split further the order would be
    // spread out.
    pub async fn start(config: Config) -> Result<Running, StartError> {
        config.retention.check().map_err(StartError::Config)?;
        fix_mmap_threshold();
        crate::sketch_policy::check_retention(&config).map_err(StartError::Config)?;
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let seed = load_or_create_key(&dir.join("node.key"))?;
        let signer = Signer::from_seed(seed);
        let events_signer = Signer::from_seed(crate::node::events_seed(&config, seed));
        let (id, generated) = identity(&config)?;
        let store = Arc::new(Store::open(&dir, config.store_cache_mb << 20)?);
        // Replication: authentication, and a snapshot from a peer if this node starts empty.
        // Shard groups talk over the same authenticated links (forwards, query parts).
        if config.topology_file.is_some() != config.group.is_some() {
            return Err(StartError::Config(
                "topology_file and group go together: the topology, and this node's group in it"
                    .into(),
            ));
        }
        let replication = replication_for(&config, seed)?;
        let peer_endpoint = match &replication {
            Some(_) => Some(crate::peer::client_endpoint().map_err(StartError::Tls)?),
            None => None,
        };
        let cluster = cluster_for(&config, replication.as_ref(), peer_endpoint.as_ref())?;
        let mut bootstrap = None;
        if let (Some(repl), Some(ep)) = (&replication, &peer_endpoint) {
            if store.is_empty()? && !config.peers.is_empty() {
                if let Some((from, snap)) = crate::peer::fetch_snapshot(
                    ep,
                    &config.peers,
                    &repl.auth,
                    Duration::from_secs(2),
                )
                .await
                {
                    info!(%from, "bootstrapped from a peer's snapshot");
                    // Keep it: the store then holds what the replica starts from.
                    store.save_snapshot_value(&snap)?;
                    bootstrap = Some(snap);
                }
            }
        }
        let Recovered {
            replica,
            replayed: recovered,
            quarantined,
        } = recover(&store, &dir, &config.limits, &config.peers, bootstrap)?;
        let replica = Arc::new(RwLock::new(replica));
        let metrics = Arc::new(Metrics::default());
        // Every stored group was replayed by `recover`, so the watermark starts past them.
        let applied_group = Arc::new(std::sync::atomic::AtomicU64::new(store.next_group()));
        let admission = Arc::new(
            crate::admission::Admission::new(&config, events_signer.producer())
                .map_err(StartError::Config)?,
        );
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let (export, exporting) = export_for(&config, &dir, &replica, &metrics)?;
        let pipeline = Pipeline {
            export: export.clone(),
            admission: admission.clone(),
            replica: replica.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            limits: config.limits,
            peer_grace_ms: config.seen_expiry_margin_ms.max(0) / 2,
            max_group: config.max_group,
            verify_threads: crate::ingest::verify_threads(config.verify_threads),
            applied_group: applied_group.clone(),
            applied: replication.as_ref().map(|r| r.applied.clone()),
        };
        let (ingest, commit_task) = Ingest::start(pipeline, config.queue_depth);

        let sc = server_config(&id, &alpns()).map_err(|e| StartError::Tls(e.to_string()))?;
        let next_hash = if generated {
            Some(next_identity(&config, &id)?.cert_hash())
        } else {
            None
        };
        let endpoint = edgetally_net::tls::server_endpoint(sc, config.quic_addr, &seed)
            .map_err(|e| StartError::Bind(config.quic_addr, e))?;
        let quic_addr = endpoint
            .local_addr()
            .map_err(|e| StartError::Bind(config.quic_addr, e))?;
        if let Some(c) = &cluster {
            if !c.lists_quic(quic_addr) {
                warn!(
                    group = %c.group,
                    %quic_addr,
                    "this node's QUIC address is not among its group's replicas in the topology: \
                     producers routing by the topology and forwarding nodes will not reach it"
                );
            }
        }
        let http_tls = if config.http_tls {
            let tls = edgetally_net::tls::tcp_server_config(&id, &[b"http/1.1"])
                .map_err(|e| StartError::Tls(e.to_string()))?;
            Some(Arc::new(RwLock::new(Arc::new(tls))))
        } else {
            None
        };
        let listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .map_err(|e| StartError::Bind(config.http_addr, e))?;
        let http_addr = listener
            .local_addr()
            .map_err(|e| StartError::Bind(config.http_addr, e))?;

        let node = Arc::new(Node {
            export,
            signer,
            events_signer,
            cert_hash: RwLock::new(id.cert_hash()),
            cert_not_after: RwLock::new(id.not_after_unix),
            next_cert_hash: RwLock::new(next_hash),
            quic_addr,
            http_addr: RwLock::new(Some(http_addr)),
            started: Instant::now(),
            recovered,
            quarantined,
            admission,
            http_tls: http_tls.clone(),
            expired: Expired::default(),
            cluster,
            earlier_peers: Default::default(),
            applied_group,
            replication,
            config,
            replica,
            store,
            metrics,
            ingest,
        });
        tasks.push(commit_task);
        tasks.extend(spawn_tasks(
            &node,
            &endpoint,
            listener,
            peer_endpoint,
            id,
            generated,
            &rx,
        ));
        announce(&node, quic_addr, http_addr);
        Ok(Running {
            node,
            http_addr,
            shutdown,
            tasks,
            exporting,
            endpoint,
        })
    }
}

/// How long every replica of a drained group must have taken no producer batch, with an empty
/// pipeline, before its heir absorbs its state: far longer than a batch's time between its
/// routing and its apply, so none lands after the state is taken.
const DRAIN_SETTLE_MS: i64 = 3_000;

/// One round of the drains into this node's group: for each group drained directly into it
/// and not yet absorbed, take the state from a peer of this group that absorbed it already
/// (a replica that was away during the drain), else — once every replica of the drained group
/// has been draining for [`DRAIN_SETTLE_MS`] with an empty pipeline and they all hold one
/// state — from one of them, checked against that state's hash.
// Long by design: a drain's steps for each group in order (a source, its snapshot, coverage,
// merge, persist, record); the order is what makes absorbing exactly-once.
async fn absorb_round(node: &Arc<Node>) {
    let Some(c) = &node.cluster else { return };
    let t = c.topology();
    for (drained, heir) in &t.drains {
        if heir != &c.group || node.has_absorbed(drained) {
            continue;
        }
        let mut done = false;
        for peer in &node.config.peers {
            let peer = peer.to_string();
            let Ok(st) = c.drain_state_of(&peer).await else {
                continue;
            };
            if !st.absorbed.contains(drained) {
                continue;
            }
            match c.snapshot_of(&peer).await {
                Ok(snap) if snap.absorbed.contains(drained) => match node.adopt(snap) {
                    Ok(true) => {
                        info!(group = %drained, %peer, "took a drained group's state from a peer");
                        done = true;
                        break;
                    }
                    Ok(false) => {}
                    Err(e) => warn!(group = %drained, %peer, "adopting a peer's state failed: {e}"),
                },
                _ => {}
            }
        }
        if done {
            continue;
        }
        let Some(g) = t
            .all_groups()
            .into_iter()
            .find(|g| &g.name == drained)
            .cloned()
        else {
            continue;
        };
        let now = now_ms();
        let mut hash = None;
        let mut ready = true;
        for addr in &g.quic {
            match c.drain_state_of(addr).await {
                Ok(st)
                    if st.queue_empty
                        && st
                            .draining_since_ms
                            .is_some_and(|s| now - s >= DRAIN_SETTLE_MS)
                        && hash.is_none_or(|h| h == st.state_hash) =>
                {
                    hash = Some(st.state_hash)
                }
                Ok(st) => {
                    debug!(group = %drained, %addr, ?st.draining_since_ms, "drained group not settled yet");
                    ready = false;
                }
                Err(e) => {
                    debug!(group = %drained, %addr, "drained group's replica unreachable: {e}");
                    ready = false;
                }
            }
        }
        let (true, Some(hash)) = (ready, hash) else {
            continue;
        };
        let snap = match c.snapshot_of(&g.quic[0]).await {
            Ok(s) => s,
            Err(e) => {
                debug!(group = %drained, "no snapshot from the drained group: {e}");
                continue;
            }
        };
        let matches = Replica::restore(snap.clone()).is_ok_and(|r| r.state_hash() == hash);
        if !matches {
            debug!(group = %drained, "the drained group's state moved; next round");
            continue;
        }
        let node = node.clone();
        let name = drained.clone();
        match tokio::task::spawn_blocking(move || node.absorb(&name, snap)).await {
            Ok(Ok(true)) => info!(group = %drained, "absorbed a drained group's state"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => warn!(group = %drained, "absorbing a drained group failed: {e}"),
            Err(e) => warn!(group = %drained, "absorbing a drained group failed: {e}"),
        }
    }
}

/// Re-reads the topology file once a second if it changed, and at once on SIGHUP; agrees on
/// the topology version with every other node and runs the hand-offs
/// ([`crate::cluster::Cluster::versions_round`]); runs the drains into this node's group.
async fn topology_upkeep(
    node: Arc<Node>,
    quic: std::net::SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let Some(cluster) = node.cluster.clone() else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let force = tokio::select! {
            _ = tick.tick() => false,
            _ = cluster.versions_now.notified() => false,
            _ = hangup => true,
            _ = stop.changed() => { if *stop.borrow() { break; } else { continue; } }
        };
        cluster.reload(force).await;
        cluster.versions_round(quic).await;
        absorb_round(&node).await;
    }
}

/// The ALPNs the QUIC endpoint offers: batches, the peer protocol, WebTransport, and the
/// earlier peer protocols (only to tell such a node why it cannot replicate).
fn alpns() -> Vec<&'static [u8]> {
    let mut v: Vec<&'static [u8]> = vec![ALPN_BATCHES, ALPN_PEER, ALPN_H3];
    v.extend_from_slice(ALPN_PEER_EARLIER);
    v
}

impl edgetally_net::BatchSink for Node {
    async fn submit(
        &self,
        raw: Vec<u8>,
        source: std::net::IpAddr,
        transport: edgetally_net::server::Transport,
    ) -> Reply {
        self.metrics.received(transport.as_str());
        self.submit_from(raw, source, None).await
    }

    fn max_batch_bytes(&self) -> usize {
        self.config.limits.max_payload_bytes + 16 + edgetally_proto::SIGNATURE_LEN
    }

    fn refused(&self, code: edgetally_core::RejectCode) {
        self.metrics.reject(code);
    }

    async fn peer(self: Arc<Self>, conn: quinn::Connection) {
        crate::replication::serve_peer(self, conn).await
    }

    fn earlier_peer(&self, conn: quinn::Connection, alpn: &[u8]) {
        let remote = conn.remote_address();
        let theirs = String::from_utf8_lossy(alpn).to_string();
        if self.note_earlier_peer(remote, &theirs) {
            warn!(
                %remote,
                "a node of an earlier release (peer protocol {theirs}; this node speaks {}) \
                 connected: they cannot replicate — upgrade it",
                String::from_utf8_lossy(ALPN_PEER)
            );
        }
        self.metrics
            .peer_refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        conn.close(3u32.into(), b"a later peer protocol: upgrade this node");
    }
}

/// Re-reads a changed allowlist once a second; forgets idle rate-limit entries and expired
/// enrolments every 30 s.
async fn admission_upkeep(
    admission: Arc<crate::admission::Admission>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for n in 0u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => { if *stop.borrow() { break; } else { continue; } }
        }
        let a = admission.clone();
        // Idle entries are swept every half minute (a sweep walks every tracked producer).
        let _ = tokio::task::spawn_blocking(move || a.upkeep(now_ms(), n % 30 == 29)).await;
    }
}

/// Writes the store's durable mark about once a second (see [`Store::mark_durable`]).
async fn mark_durable(store: Arc<Store>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => { if *stop.borrow() { break; } else { continue; } }
        }
        let s = store.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.mark_durable()).await {
            warn!("recording the log's durable mark failed: {e}");
        }
    }
}

/// Hands the heap's free pages back to the system. A compaction materialises the whole
/// snapshot beside the state (series, then their encoding, then redb's copy) and frees it;
/// with a growing state each round needs larger blocks than the last, and glibc kept the
/// freed ones resident in its arenas (`edgetally-bench churn`: RSS several times the live
/// heap). `malloc_trim` returns them; it costs a walk of the free lists once per upkeep.
/// One of the merger's two `unsafe` blocks, both libc calls no safe crate wraps.
#[allow(unsafe_code)]
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator that owns it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Fixes glibc's mmap threshold at 1 MiB and its trim threshold at 32 MiB. By default the mmap
/// threshold rises to the size of the largest mapped block freed so far (up to 32 MiB), after
/// which the tables that grow with the producers — the producer keys, the per-producer rollup
/// columns — are reallocated inside the heap, and each growth leaves the last copy as a hole
/// that later small blocks pin: 407 B of RSS per fresh producer against ~320 B with the
/// threshold fixed (`cargo xtask bench producers`), where the live heap is ~300 B. Blocks of
/// 1 MiB and more are then always mapped, and a growing one moves with `mremap`, without a
/// copy. Not lower: at 64 KiB every mid-sized temporary of a `POST /v1/events` request was
/// mapped and faulted in afresh, 17 % more CPU per event. Fixing one threshold fixes the other
/// too (glibc stops adjusting both), and a trim threshold left at 128 KiB gave the heap's top
/// back and faulted it in again on every request; 32 MiB is what glibc itself would reach, and
/// upkeep's `malloc_trim` still returns it. The other of the merger's two `unsafe` blocks.
#[allow(unsafe_code)]
fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a tunable of the allocator; any value is valid for it.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

async fn upkeep(
    node: Arc<Node>,
    endpoint: quinn::Endpoint,
    mut id: Identity,
    generated: bool,
    mut stop: watch::Receiver<bool>,
) {
    let every = Duration::from_secs(node.config.snapshot_interval_secs.max(1));
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => { if *stop.borrow() { break; } else { continue; } }
        }
        let n = node.clone();
        let _ = tokio::task::spawn_blocking(move || {
            {
                let now = now_ms();
                let mut r = n.replica.write().unwrap_or_else(|e| e.into_inner());
                r.prune_tiers(now, &n.config.retention);
                r.prune_sketch_tiers(now, n.config.sketch_retention);
                let gone = r.expire(n.expiry_cutoff(now));
                if !gone.is_empty() {
                    n.metrics
                        .epochs_expired
                        .fetch_add(gone.len() as u64, Relaxed);
                    n.expired.push(n.store.next_group(), gone);
                }
            }
            if let Err(e) = n.compact() {
                warn!("compaction failed: {e}");
            }
            release_free_heap();
        })
        .await;
        if generated && id.not_after_unix - now_ms() / 1000 <= RENEW_BEFORE_SECS {
            match successor(&node.config, &id).and_then(|new| {
                server_config(&new, &alpns())
                    .map(|sc| (new, sc))
                    .map_err(|e| StartError::Tls(e.to_string()))
            }) {
                Ok((new, sc)) => {
                    endpoint.set_server_config(Some(sc));
                    if let Some(slot) = &node.http_tls {
                        match edgetally_net::tls::tcp_server_config(&new, &[b"http/1.1"]) {
                            Ok(tls) => {
                                *slot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tls)
                            }
                            Err(e) => warn!("https certificate not rotated: {e}"),
                        }
                    }
                    *node.cert_hash.write().unwrap_or_else(|e| e.into_inner()) = new.cert_hash();
                    match next_identity(&node.config, &new) {
                        Ok(next) => {
                            *node
                                .next_cert_hash
                                .write()
                                .unwrap_or_else(|e| e.into_inner()) = Some(next.cert_hash())
                        }
                        Err(e) => warn!("next certificate not made: {e}"),
                    }
                    *node
                        .cert_not_after
                        .write()
                        .unwrap_or_else(|e| e.into_inner()) = new.not_after_unix;
                    info!(cert_sha256 = %hex(&new.cert_hash()), "certificate rotated");
                    id = new;
                }
                Err(e) => warn!("certificate rotation failed: {e}"),
            }
        }
    }
}

impl Running {
    /// Stops both listeners (in-flight HTTP requests finish; QUIC connections close, so a
    /// batch not yet acknowledged is resent by its producer and deduplicated), lets the
    /// exporter write a last round, then writes a final snapshot.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.endpoint.close(0u32.into(), b"shutting down");
        let Running {
            node,
            tasks,
            exporting,
            ..
        } = self;
        let mut tasks = tasks.into_iter();
        let commit = tasks.next();
        let mut stopped = true;
        for t in tasks {
            stopped &= tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_ok();
        }
        if let Some(exporting) = exporting {
            // Closed and drained, the pipeline applies nothing after the exporter's last
            // round (every task has ended too, so nothing of the node's own is left half
            // done).
            let quiet = node.ingest.close(Duration::from_secs(5)).await && stopped;
            exporting.finish(quiet).await;
        }
        // The pipeline ends when its last sender is dropped; the node holds one, so bound the
        // wait: everything already accepted has been answered by now or is about to be.
        drop(commit);
        let n = node.clone();
        let _ = tokio::task::spawn_blocking(move || n.compact()).await;
        info!("merger stopped");
    }

    /// Waits for SIGINT or SIGTERM (listened for since `signals` was installed), then shuts
    /// down.
    pub async fn run_until_signal(self, signals: Signals) {
        signals.recv().await;
        info!("signal received, shutting down");
        self.shutdown().await;
    }
}

/// SIGINT/SIGTERM listeners. Install them before [`Node::start`]: the node announces itself
/// on stdout when it is ready, and a supervisor may signal it right after; a signal that
/// arrived before the listeners existed would kill the process instead of stopping it.
pub struct Signals {
    #[cfg(unix)]
    listeners: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl std::fmt::Debug for Signals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signals")
    }
}

impl Signals {
    /// Starts listening (needs a tokio runtime with I/O enabled).
    pub fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listeners = match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                (Ok(a), Ok(b)) => Some((a, b)),
                _ => None,
            };
            Signals { listeners }
        }
        #[cfg(not(unix))]
        {
            Signals {}
        }
    }

    /// Resolves at the first SIGINT or SIGTERM.
    pub async fn recv(self) {
        #[cfg(unix)]
        if let Some((mut a, mut b)) = self.listeners {
            tokio::select! { _ = a.recv() => {}, _ = b.recv() => {} }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Once closed, the pipeline answers `Retry` without looking at a batch (not even to
    /// refuse it as malformed), so nothing can apply after a shutdown's last export round.
    #[test]
    fn a_closed_pipeline_answers_retry_and_applies_nothing() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = std::env::temp_dir().join(format!("et-close-{}", std::process::id()));
        rt.block_on(async {
            let config = Config {
                data_dir: dir.clone(),
                http_addr: "127.0.0.1:0".parse().expect("addr"),
                quic_addr: "127.0.0.1:0".parse().expect("addr"),
                ..Config::default()
            };
            let running = Node::start(config).await.expect("start");
            let ingest = running.node.ingest.clone();
            let garbage = vec![0xff; 40];
            assert!(matches!(
                ingest.submit(garbage.clone()).await,
                Reply::Nack { .. }
            ));
            assert!(ingest.close(Duration::from_secs(5)).await, "drained");
            assert!(matches!(
                ingest.submit(garbage.clone()).await,
                Reply::Retry { .. }
            ));
            assert!(matches!(
                ingest.submit_wait(garbage).await,
                Reply::Retry { .. }
            ));
            running.shutdown().await;
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
