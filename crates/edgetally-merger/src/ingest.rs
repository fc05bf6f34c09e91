//! The ingest pipeline: decode → verify (each group split over `verify_threads` threads, one
//! per core by default) → dedupe by BatchId → durable group commit → apply → reply. Bounded
//! queues: when full, new batches get `Retry` instead of growing memory.

use crate::admission::Admission;
use crate::metrics::Metrics;
use crate::store::Store;
use edgetally_core::{Applied, Batch, BatchId, Limits, LogEntry, RejectCode, Replica};
use edgetally_proto::{decode, verify_many, DecodeError, Reply, Unverified};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

/// Suggested delay in `Retry` replies.
pub const RETRY_AFTER_MS: u32 = 100;

struct Job {
    raw: Vec<u8>,
    reply: oneshot::Sender<Reply>,
    received: Instant,
    /// Pulled or pushed from a peer (then not pushed on).
    from_peer: bool,
    /// The batch's set-hash digest (`batch_digest`), computed once it verified.
    digest: Option<[u8; 32]>,
    /// Its charge against the producer's hourly quotas, settled once it applied (or not).
    reserved: Option<crate::admission::Reservation>,
    /// A peer's batch whose id was already applied when it was checked: its signature was not
    /// verified (pushes and pulls bring most batches more than once; verifying each copy
    /// was most of a replica's cost). It is only ever acknowledged as a duplicate, never
    /// applied: should its id not be applied by its commit, it gets Retry.
    unverified: bool,
    /// Counts the job in [`Ingest::in_flight`] until it is dropped: after its reply, so after
    /// its batch applied (or was refused).
    _in_flight: InFlight,
    /// The routing guard of a producer's batch ([`crate::cluster::Route::Take`]): held until
    /// the job is dropped, so a topology change waits for it.
    _route: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
    /// The address a producer's batch came from, when known (the per-source series quota).
    source: Option<std::net::IpAddr>,
}

/// The front door of the pipeline; cheap to clone.
#[derive(Clone, Debug)]
pub struct Ingest {
    tx: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    in_flight: Arc<AtomicU64>,
    /// Set by [`Ingest::close`]: every later submission is answered `Retry`, unapplied.
    closed: Arc<AtomicBool>,
}

/// One submitted job, counted while it exists (decremented on drop, whatever path drops it).
#[derive(Debug)]
struct InFlight(Arc<AtomicU64>);

impl InFlight {
    fn new(count: &Arc<AtomicU64>) -> InFlight {
        count.fetch_add(1, SeqCst);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Job({} bytes)", self.raw.len())
    }
}

/// Shared state the pipeline works on.
#[derive(Clone, Debug)]
pub struct Pipeline {
    /// The replica state.
    pub replica: Arc<RwLock<Replica>>,
    /// The store.
    pub store: Arc<Store>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Batch limits.
    pub limits: Limits,
    /// How much later than `max_lateness` a batch from a peer may still be (half the seen-set
    /// expiry margin: a peer's batch that reached it late is not lost to the delay, and is
    /// still refused before any epoch that applied it can have expired here).
    pub peer_grace_ms: i64,
    /// Most batches per group.
    pub max_group: usize,
    /// Checks (decode and verify) running at once, each on a blocking-pool thread.
    pub verify_threads: usize,
    /// One past the last group commit whose batches are all applied (0: none yet).
    pub applied_group: Arc<std::sync::atomic::AtomicU64>,
    /// Where newly applied batches from producers are announced (for pushing to peers).
    pub applied: Option<tokio::sync::broadcast::Sender<Arc<[u8]>>>,
    /// Admission and quotas for batches from producers (never for peers' batches).
    pub admission: Arc<Admission>,
    /// Where applied batches (from producers and peers) are told to the exporter, if any.
    pub export: Option<crate::export::ExportFeed>,
}

pub use edgetally_net::now_ms;

impl Ingest {
    /// Starts the pipeline's two stages; they end when every `Ingest` clone is dropped.
    pub fn start(p: Pipeline, queue_depth: usize) -> (Ingest, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(queue_depth.max(1));
        let (tx_b, rx_b) = mpsc::channel(4);
        let metrics = p.metrics.clone();
        tokio::spawn(verify_stage(rx, tx_b, p.clone()));
        let done = tokio::spawn(commit_stage(rx_b, p));
        (
            Ingest {
                tx,
                metrics,
                in_flight: Arc::default(),
                closed: Arc::default(),
            },
            done,
        )
    }

    /// Closes the pipeline for a shutdown: every later submission gets `Retry` and is never
    /// applied. Then waits until no submitted batch is still in it (each has been applied or
    /// refused, and answered), at most `within`; whether it got there — if so, nothing
    /// applies any more.
    pub async fn close(&self, within: Duration) -> bool {
        // A submission counts itself in flight before it looks at `closed` (both SeqCst):
        // either it sees the pipeline closed, or this wait sees it in flight.
        self.closed.store(true, SeqCst);
        let until = Instant::now() + within;
        loop {
            if self.in_flight.load(SeqCst) == 0 {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn job(&self, raw: Vec<u8>, from_peer: bool) -> (Job, oneshot::Receiver<Reply>) {
        self.metrics
            .bytes_received
            .fetch_add(raw.len() as u64, Relaxed);
        let (reply, rx) = oneshot::channel();
        (
            Job {
                raw,
                reply,
                received: Instant::now(),
                from_peer,
                digest: None,
                reserved: None,
                unverified: false,
                _in_flight: InFlight::new(&self.in_flight),
                _route: None,
                source: None,
            },
            rx,
        )
    }

    /// Submits a batch; answers `Retry` at once if the queue is full.
    pub async fn submit(&self, raw: Vec<u8>) -> Reply {
        self.submit_as(raw, false).await
    }

    /// Submits a producer's batch from `source` (if known), with its routing guard if it
    /// was routed here (held until it is applied or refused); `wait`: for room in the queue,
    /// else `Retry` if it is full.
    pub async fn submit_producer(
        &self,
        raw: Vec<u8>,
        guard: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
        wait: bool,
        source: Option<std::net::IpAddr>,
    ) -> Reply {
        let (mut job, rx) = self.job(raw, false);
        job._route = guard;
        job.source = source;
        match wait {
            true => self.send_wait(job, rx).await,
            false => self.send(job, rx).await,
        }
    }

    /// Submits a batch a peer pushed (it is not pushed on); `Retry` if the queue is full.
    pub async fn submit_from_peer(&self, raw: Vec<u8>) -> Reply {
        self.submit_as(raw, true).await
    }

    /// Submits a batch pulled from a peer, waiting for room in the queue.
    pub async fn submit_from_peer_wait(&self, raw: Vec<u8>) -> Reply {
        self.submit_wait_as(raw, true).await
    }

    async fn submit_as(&self, raw: Vec<u8>, from_peer: bool) -> Reply {
        let (job, rx) = self.job(raw, from_peer);
        self.send(job, rx).await
    }

    async fn send(&self, job: Job, rx: oneshot::Receiver<Reply>) -> Reply {
        if self.closed.load(SeqCst) {
            return Reply::Retry {
                after_ms: RETRY_AFTER_MS,
            };
        }
        match self.tx.try_send(job) {
            Ok(()) => {
                self.metrics.queue_depth.fetch_add(1, Relaxed);
                rx.await.unwrap_or(Reply::Retry {
                    after_ms: RETRY_AFTER_MS,
                })
            }
            Err(_) => {
                self.metrics.retried.fetch_add(1, Relaxed);
                Reply::Retry {
                    after_ms: RETRY_AFTER_MS,
                }
            }
        }
    }

    /// Submits a batch, waiting for room in the queue (for the node's own batches).
    pub async fn submit_wait(&self, raw: Vec<u8>) -> Reply {
        self.submit_wait_as(raw, false).await
    }

    async fn submit_wait_as(&self, raw: Vec<u8>, from_peer: bool) -> Reply {
        let (job, rx) = self.job(raw, from_peer);
        self.send_wait(job, rx).await
    }

    async fn send_wait(&self, job: Job, rx: oneshot::Receiver<Reply>) -> Reply {
        if self.closed.load(SeqCst) || self.tx.send(job).await.is_err() {
            return Reply::Retry {
                after_ms: RETRY_AFTER_MS,
            };
        }
        self.metrics.queue_depth.fetch_add(1, Relaxed);
        rx.await.unwrap_or(Reply::Retry {
            after_ms: RETRY_AFTER_MS,
        })
    }
}

type Checked = Vec<(Job, Result<Batch, DecodeError>)>;
/// What the commit stage hands the apply stage for one group.
struct Written {
    /// The group's number, if anything was written.
    group: Option<u64>,
    /// Batches written to disk, to apply.
    fresh: Vec<(Job, Batch)>,
    /// Copies of a batch in `fresh` that arrived in the same group: they get the reply of
    /// the copy that was written, once it is known (an Ack for a copy is only as good as the
    /// write of the original).
    followers: Vec<(Job, BatchId)>,
    /// Replies already decided.
    done: Vec<(Job, Reply)>,
}

/// Fewest batches per verify thread: a smaller group is split over fewer threads.
const PER_THREAD: usize = 8;

/// The number of verify threads for the `verify_threads` setting: itself, or (0) one per
/// core this process may run on.
pub fn verify_threads(setting: usize) -> usize {
    match setting {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Takes everything queued (up to `max_group`) and decodes and verifies it split evenly over
/// up to `verify_threads` blocking threads (at least 8 batches each), then hands the checked
/// group to the commit stage and takes the next: verifying group k+1 overlaps the commit and
/// apply of group k (the channel between them holds four groups). Measured against chunks
/// each thread took on its own (no barrier), this does better on a busy small machine: one
/// group per commit, and no thread left with most of a group (docs/design/ingest.md).
async fn verify_stage(mut rx: mpsc::Receiver<Job>, tx: mpsc::Sender<Checked>, p: Pipeline) {
    let threads = p.verify_threads.max(1);
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < p.max_group {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        p.metrics.queue_depth.fetch_sub(jobs.len() as u64, Relaxed);
        let (limits, grace, now) = (p.limits, p.peer_grace_ms, now_ms());
        let parts = threads.min(jobs.len() / PER_THREAD).max(1);
        let size = jobs.len().div_ceil(parts);
        let mut running = Vec::with_capacity(parts);
        while !jobs.is_empty() {
            let rest = jobs.split_off(size.min(jobs.len()));
            let part = std::mem::replace(&mut jobs, rest);
            let (adm, replica) = (p.admission.clone(), p.replica.clone());
            running.push(tokio::task::spawn_blocking(move || {
                check_jobs(part, &limits, grace, now, &adm, &replica)
            }));
        }
        let mut checked = Vec::new();
        for part in running {
            match part.await {
                Ok(c) => checked.extend(c),
                // Its jobs went down with it: their senders drop and submitters get Retry.
                Err(e) => error!("verification task failed: {e}"),
            }
        }
        if tx.send(checked).await.is_err() {
            break;
        }
    }
}

/// Decodes, time-checks and (for producers' batches) admits every job, then verifies the
/// signatures of those that passed together — but for peers' batches already applied here,
/// which can only be acknowledged as duplicates (see [`Job::unverified`]).
// Long by design: the check stage in order (decode, time, admission, then one verification pass
// over the jobs that passed); the per-job versus batched split is the point.
fn check_jobs(
    mut jobs: Vec<Job>,
    limits: &Limits,
    peer_grace_ms: i64,
    now: i64,
    admission: &Admission,
    replica: &RwLock<Replica>,
) -> Checked {
    // A batch a peer applied is refused here for no clock reason but the one that keeps
    // apply exact: a bucket past `max_lateness` plus the grace could belong to an epoch whose
    // seen-set has expired here. The future rule is the producer's clock against the first
    // merger's; a peer whose clock runs behind (or whose `max_future_skew` is smaller, a
    // setting being rolled out) refusing what its group holds would split the replicas
    // while both answered `complete: true` (issue 28, finding 4).
    let peer_limits = Limits {
        max_lateness_ms: limits.max_lateness_ms.saturating_add(peer_grace_ms),
        max_future_skew_ms: i64::MAX,
        ..*limits
    };
    let mut results: Vec<Option<Result<Batch, DecodeError>>> = Vec::with_capacity(jobs.len());
    let mut pending: Vec<(usize, Unverified)> = Vec::new();
    // Read-locked per peer job, briefly: decoding must not hold back the apply stage.
    let applied = |id: &BatchId| {
        replica
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .has_applied(id)
    };
    for (i, job) in jobs.iter_mut().enumerate() {
        match decode(&job.raw, limits) {
            Ok(u) if job.from_peer && applied(&u.batch.id) => {
                job.unverified = true;
                results.push(Some(Ok(u.batch)));
            }
            Ok(u) => match (if job.from_peer {
                Ok(())
            } else {
                u.batch.check_names()
            })
            .and_then(|()| {
                u.batch
                    .check_time(now, if job.from_peer { &peer_limits } else { limits })
            })
            .and_then(|()| {
                if job.from_peer {
                    Ok(())
                } else {
                    admission.check_batch(&u.batch, now)
                }
            }) {
                Ok(()) => {
                    results.push(None);
                    pending.push((i, u));
                }
                Err(code) => results.push(Some(Err(DecodeError {
                    code,
                    detail: "refused before verification (names, time window or admission)",
                }))),
            },
            Err(e) => results.push(Some(Err(e))),
        }
    }
    let (idx, items): (Vec<usize>, Vec<Unverified>) = pending.into_iter().unzip();
    let verified = verify_many(items);
    for (i, r) in idx.into_iter().zip(verified) {
        results[i] = Some(r);
    }
    jobs.into_iter()
        .zip(results)
        .map(|(mut j, r)| {
            let r = r.unwrap_or(Err(DecodeError {
                code: RejectCode::Malformed,
                detail: "unchecked",
            }));
            if let (Ok(b), false) = (&r, j.unverified) {
                // From the signed bytes, which the retained log drops when there are no peers.
                j.digest = Some(edgetally_core::batch_digest(b, &j.raw));
            }
            (j, r)
        })
        .collect()
}

// Long by design: the group-commit loop (gather, write and fsync, apply, answer; Retry on
// failure) in one place, so the durability order is visible at once.
async fn commit_stage(mut rx: mpsc::Receiver<Checked>, p: Pipeline) {
    // Appends (fsync) of one group overlap the apply of the previous one; `pending` holds the
    // ids written but not yet applied, so a duplicate arriving in between is not written twice
    // (and were it written, apply's seen-set would still count it once).
    let pending: Arc<std::sync::Mutex<HashSet<BatchId>>> = Arc::default();
    let (tx_apply, rx_apply) = mpsc::channel::<Written>(2);
    let applier = tokio::spawn(apply_stage(rx_apply, p.clone(), pending.clone()));
    while let Some(mut group) = rx.recv().await {
        // Everything verified meanwhile joins this commit: the slower the disk, the larger
        // the group, so one fsync covers more batches.
        while group.len() < p.max_group {
            match rx.try_recv() {
                Ok(more) => group.extend(more),
                Err(_) => break,
            }
        }
        let mut done: Vec<(Job, Reply)> = Vec::with_capacity(group.len());
        let mut fresh: Vec<(Job, Batch)> = Vec::new();
        let mut followers: Vec<(Job, BatchId)> = Vec::new();
        {
            let r = p.replica.read().unwrap_or_else(|e| e.into_inner());
            let pend = pending.lock().unwrap_or_else(|e| e.into_inner());
            let mut in_group: HashSet<BatchId> = HashSet::new();
            let adm = &p.admission;
            let now = now_ms();
            // Series the group's earlier batches may add: the cap counts them before they
            // apply.
            let mut series = r.series_count() as u64;
            for (job, res) in group {
                match res {
                    Err(e) => {
                        p.metrics.reject(e.code);
                        done.push((job, Reply::nack(e.code)));
                    }
                    // Applied, or written by an earlier group (whose apply, and so this
                    // reply, comes before this group's): durable, so acknowledged.
                    Ok(b) if r.has_applied(&b.id) || pend.contains(&b.id) => {
                        p.metrics.duplicates.fetch_add(1, Relaxed);
                        done.push((job, Reply::Ack));
                    }
                    // Never applied unverified (its id was applied when it was checked, so
                    // this does not happen while seen-sets only grow).
                    Ok(_) if job.unverified => {
                        p.metrics.retried.fetch_add(1, Relaxed);
                        done.push((
                            job,
                            Reply::Retry {
                                after_ms: RETRY_AFTER_MS,
                            },
                        ));
                    }
                    // A copy of a batch in this very group: it shares the original's fate.
                    Ok(b) if in_group.contains(&b.id) => followers.push((job, b.id)),
                    Ok(b) if job.from_peer => {
                        in_group.insert(b.id);
                        fresh.push((job, b));
                    }
                    Ok(b) if adm.sketches.check(&b, r.sketch_bytes()).is_err() => {
                        p.metrics.reject(RejectCode::SketchLimit);
                        done.push((job, Reply::nack(RejectCode::SketchLimit)));
                    }
                    Ok(b) => {
                        let mut job = job;
                        let known = || r.epochs_of(&b.id.producer) > 0;
                        match adm.charge(&b, series, now, job.source, || r.novelty(&b), known) {
                            Ok((added, reserved)) => {
                                series += added;
                                job.reserved = reserved;
                                in_group.insert(b.id);
                                fresh.push((job, b));
                            }
                            Err(Ok(after_ms)) => {
                                p.metrics.retried.fetch_add(1, Relaxed);
                                done.push((job, Reply::Retry { after_ms }));
                            }
                            Err(Err(code)) => {
                                p.metrics.reject(code);
                                done.push((job, Reply::nack(code)));
                            }
                        }
                    }
                }
            }
        }
        let mut to_apply = Vec::new();
        let mut written_group = None;
        if !fresh.is_empty() {
            let store = p.store.clone();
            let started = Instant::now();
            let stored = tokio::task::spawn_blocking(move || {
                let items: Vec<(BatchId, &[u8])> = fresh
                    .iter()
                    .map(|(j, b)| (b.id, j.raw.as_slice()))
                    .collect();
                let r = store.append(&items);
                (fresh, r)
            })
            .await;
            match stored {
                Ok((fresh, Ok(group))) => {
                    written_group = Some(group);
                    p.metrics.group_commits.fetch_add(1, Relaxed);
                    if p.metrics.store_failing.swap(false, Relaxed) {
                        p.metrics
                            .store_error
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .take();
                    }
                    p.metrics
                        .commit_micros
                        .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
                    pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(fresh.iter().map(|(_, b)| b.id));
                    to_apply = fresh;
                }
                Ok((fresh, Err(e))) => {
                    warn!("group commit failed, asking producers to retry: {e}");
                    p.metrics.commit_failures.fetch_add(1, Relaxed);
                    *p.metrics
                        .store_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                    p.metrics.store_failing.store(true, Relaxed);
                    for (job, _) in &fresh {
                        if let Some(res) = job.reserved {
                            p.admission.settle(res, Default::default());
                        }
                    }
                    let copies = std::mem::take(&mut followers).into_iter();
                    for job in fresh
                        .into_iter()
                        .map(|(j, _)| j)
                        .chain(copies.map(|(j, _)| j))
                    {
                        p.metrics.retried.fetch_add(1, Relaxed);
                        done.push((
                            job,
                            Reply::Retry {
                                after_ms: RETRY_AFTER_MS,
                            },
                        ));
                    }
                }
                Err(e) => {
                    // The jobs went down with the task: their senders drop, and the waiting
                    // submitters answer Retry. So do the copies of them.
                    error!("commit task failed: {e}");
                    for (job, _) in std::mem::take(&mut followers) {
                        done.push((
                            job,
                            Reply::Retry {
                                after_ms: RETRY_AFTER_MS,
                            },
                        ));
                    }
                }
            }
        }
        let written = Written {
            group: written_group,
            fresh: to_apply,
            followers,
            done,
        };
        if tx_apply.send(written).await.is_err() {
            break;
        }
    }
    drop(tx_apply);
    let _ = applier.await;
}

async fn apply_stage(
    mut rx: mpsc::Receiver<Written>,
    p: Pipeline,
    pending: Arc<std::sync::Mutex<HashSet<BatchId>>>,
) {
    while let Some(written) = rx.recv().await {
        // Applying a group takes a millisecond or more: done off the async workers, which
        // keep serving connections meanwhile.
        let p2 = p.clone();
        let pend2 = pending.clone();
        let done =
            match tokio::task::spawn_blocking(move || apply_group(&p2, &pend2, written)).await {
                Ok(done) => done,
                Err(e) => {
                    error!("apply task failed: {e}");
                    continue;
                }
            };
        for (job, reply) in done {
            p.metrics
                .observe_latency(job.received.elapsed().as_secs_f64());
            let _ = job.reply.send(reply);
        }
    }
}

/// Applies one written group; returns every reply of the group.
// Long by design: apply in order with each reply's bookkeeping (novelty, export feed, pushes)
// beside it.
fn apply_group(
    p: &Pipeline,
    pending: &std::sync::Mutex<HashSet<BatchId>>,
    written: Written,
) -> Vec<(Job, Reply)> {
    let Written {
        group,
        fresh,
        followers,
        mut done,
    } = written;
    let mut outcome: std::collections::HashMap<BatchId, Reply> = Default::default();
    if !fresh.is_empty() {
        let mut r = p.replica.write().unwrap_or_else(|e| e.into_inner());
        let mut ids = Vec::with_capacity(fresh.len());
        for (job, batch) in fresh {
            let n = batch.summaries.len() as u64;
            ids.push(batch.id);
            // The signed bytes are kept (in the replication log) only for peers: a node
            // without peers prunes the entry at once, so it skips the copy.
            let raw: Arc<[u8]> = if p.applied.is_some() {
                Arc::from(job.raw.as_slice())
            } else {
                Arc::from(&[][..])
            };
            let batch = Arc::new(batch);
            let entry = LogEntry {
                batch: batch.clone(),
                raw: raw.clone(),
            };
            let applied = match &job.digest {
                Some(d) => r.apply_with_digest(entry, d),
                None => r.apply(entry),
            };
            if let Some(res) = job.reserved {
                p.admission.settle(res, r.last_novelty());
            }
            let reply = match applied {
                Ok(Applied::New) => {
                    p.metrics.applied.fetch_add(1, Relaxed);
                    p.metrics.summaries.fetch_add(n, Relaxed);
                    if let Some(e) = &p.export {
                        e.applied(&batch);
                    }
                    if !job.from_peer {
                        if let Some(tx) = &p.applied {
                            // No receiver (no peer linked yet) is fine: pulls catch up.
                            let _ = tx.send(raw);
                        }
                    }
                    Reply::Ack
                }
                Ok(Applied::Duplicate) => {
                    p.metrics.duplicates.fetch_add(1, Relaxed);
                    Reply::Ack
                }
                Err(code) => {
                    // Unreachable for a batch that passed `Batch::check` (which covers every
                    // reason apply has); it was written, and replay will quarantine it.
                    error!(?code, "a written batch did not apply");
                    p.metrics.reject(code);
                    Reply::nack(code)
                }
            };
            if !followers.is_empty() {
                outcome.insert(ids[ids.len() - 1], reply);
            }
            done.push((job, reply));
        }
        r.prune_log();
        if let Some(g) = group {
            // Under the write lock: a snapshot taken under the read lock sees every group
            // up to this one applied, and none after it.
            p.applied_group.store(g + 1, Relaxed);
        }
        drop(r);
        let mut pend = pending.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            pend.remove(&id);
        }
    }
    for (job, id) in followers {
        p.metrics.duplicates.fetch_add(1, Relaxed);
        let reply = outcome.get(&id).copied().unwrap_or(Reply::Retry {
            after_ms: RETRY_AFTER_MS,
        });
        done.push((job, reply));
    }
    done
}
