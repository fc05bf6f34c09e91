//! Export to an existing database: closed buckets, and late updates to them, written to a
//! [`Sink`] as rows keyed by (category, entity, bucket) that carry the bucket's full totals.
//!
//! A row replaces any earlier row of its key, so writing it again — after a crash, or from
//! another node of the cluster — changes nothing once the nodes agree. The exporter:
//! - learns which keys changed from the apply stage (every batch applied, from producers and
//!   from peers: a channel of the batches, read off the apply path);
//! - writes a key once its bucket has closed (`export_delay` past its end), reading the
//!   replica's exact totals for it, and again whenever a late batch changes it;
//! - after a start, a snapshot adoption, an absorbed group, or a full channel, rescans the
//!   tier instead: from the durable mark of its last complete round (in the data directory)
//!   back by `max_lateness` and the peers' grace — the oldest bucket a batch accepted since
//!   then can have changed — or, without a mark, everything the tier holds;
//! - after a clean stop (the pipeline empty and nothing submitting, then a last round that
//!   wrote everything closed), the mark says so, and the next start rescans only the
//!   buckets that had not closed: no batch was applied after that round. The start takes the
//!   word back on disk (fsynced) before any batch can apply, so a crash later is a crash;
//! - on a failed write keeps what it had to write and tries again next round — unless the
//!   sink refuses rows for what they hold ([`WriteError::Refused`]: PostgreSQL's data and
//!   constraint errors): then the chunk is split until the refused rows stand alone, those
//!   are quarantined (counted, logged with the server's message, appended to
//!   `export-<table>.quarantine` in the data directory, never written again by this run)
//!   and every other row flows. One row no database can hold never stops the export.
//!
//! The sink is a trait so that other databases (ClickHouse, Kafka) can follow the
//! PostgreSQL one ([`Postgres`], behind the default cargo feature `postgres`).

#[cfg(feature = "postgres")]
mod pgtls;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "postgres")]
pub use postgres::Postgres;

use edgetally_core::{Batch, Replica, Sketches, Total};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// The exporter's counters, read by the node's `/metrics`.
#[derive(Debug, Default)]
pub struct ExportMetrics {
    /// Rows written by the exporter.
    pub rows: AtomicU64,
    /// Exporter rounds whose write failed (kept for the next round).
    pub errors: AtomicU64,
    /// Rows the export sink refused for good (quarantined).
    pub quarantined: AtomicU64,
    /// Keys changed and not yet written (their buckets still open, or a write failed).
    pub pending: AtomicU64,
    /// The cutoff of the exporter's last complete round, ms (0: none yet).
    pub mark_ms: AtomicI64,
    /// An exporter runs: its families are shown, failures included, before any round
    /// completed.
    pub enabled: AtomicBool,
}

/// One exported row: the full totals of (category, entity, bucket).
#[derive(Clone, Debug, PartialEq)]
pub struct ExportRow {
    /// The category.
    pub category: String,
    /// The entity; `None` for the records without one.
    pub entity: Option<String>,
    /// The bucket's start, ms since the epoch.
    pub bucket_start_ms: i64,
    /// The bucket's width, ms.
    pub bucket_ms: i64,
    /// Its totals (count ≥ 1).
    pub total: Total,
    /// Its sketches (distinct counts, quantiles), if its records carried any.
    pub sketches: Option<Sketches>,
}

/// Why a [`Sink::write`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The sink could not take the rows now (connection lost, server restarting, a lock):
    /// all of them are written again by a later round.
    #[error("{0}")]
    Unavailable(String),
    /// The sink refused the rows for what they hold (a value it cannot store, a constraint):
    /// writing them again would fail again. The exporter isolates the refused rows.
    #[error("refused: {0}")]
    Refused(String),
}

/// Where rows go. `write` must be idempotent: a row replaces the row of its key, and
/// writing the same rows twice leaves the same data.
pub trait Sink: Send + Sync + 'static {
    /// A short name, for logs, metrics and the mark file.
    fn name(&self) -> &'static str;
    /// Gets ready before the first round (connects, creates the table), so that a bad
    /// address shows at start-up; an error is logged and the first write tries again.
    fn prepare(&self) -> impl std::future::Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }
    /// Writes the rows (keys are distinct within one call), all or none; an error keeps them
    /// for retry, or for isolating the refused ones ([`WriteError::Refused`]).
    fn write(
        &self,
        rows: &[ExportRow],
    ) -> impl std::future::Future<Output = Result<(), WriteError>> + Send;
}

/// Most batches queued for the exporter before it falls back to a rescan.
const FEED_CAPACITY: usize = 65_536;
/// Rows per write.
const CHUNK: usize = 5_000;
/// How much of the tier one step of a rescan reads, ms.
const SCAN_WINDOW_MS: i64 = 86_400_000;

/// What the apply stage holds to tell the exporter about applied batches.
#[derive(Clone, Debug)]
pub struct ExportFeed {
    tx: mpsc::Sender<Arc<Batch>>,
    rescan: Arc<AtomicBool>,
    /// Set with `rescan` whenever a change may be missing from the feed: the next rescan
    /// goes back by the whole reach, even right after a clean stop.
    wide: Arc<AtomicBool>,
}

impl ExportFeed {
    /// A batch was applied (never blocks: a full queue turns into a rescan).
    pub fn applied(&self, batch: &Arc<Batch>) {
        if self.tx.try_send(batch.clone()).is_err() {
            self.wide.store(true, Relaxed);
            self.rescan.store(true, Relaxed);
        }
    }

    /// The state changed wholesale (snapshot adoption, an absorbed group): rescan.
    pub fn rescan(&self) {
        self.wide.store(true, Relaxed);
        self.rescan.store(true, Relaxed);
    }
}

/// The exporter's settings.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// The replica tier exported: 1 (minute buckets) or 2 (hour buckets).
    pub tier: usize,
    /// How long after a bucket's end it is first written, ms.
    pub delay_ms: i64,
    /// How often a round runs, ms.
    pub interval_ms: u64,
    /// How far back a batch accepted now can reach (max_lateness plus the peers' grace), ms.
    pub reach_ms: i64,
    /// Where the mark of the last complete round is kept.
    pub mark_file: PathBuf,
    /// Where rows the sink refused for good are kept aside (NDJSON, appended).
    pub quarantine_file: PathBuf,
}

/// A dirty key: (category, entity, bucket start).
type Key = (String, Option<String>, i64);

/// The mark of the last complete round: every bucket that ended by `cutoff` is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mark {
    cutoff: i64,
    /// Written by the last round of a clean stop: no batch applied after it.
    clean: bool,
}

impl Mark {
    /// `"<cutoff>\n"` or `"<cutoff> clean\n"`; anything else is no mark (a full rescan).
    fn parse(text: &str) -> Option<Mark> {
        let mut words = text.split_whitespace();
        let cutoff = words.next()?.parse().ok()?;
        let clean = match words.next() {
            None => false,
            Some("clean") => true,
            Some(_) => return None,
        };
        words.next().is_none().then_some(Mark { cutoff, clean })
    }

    /// Replaces the mark file: written to a temporary file, synced, renamed over, and the
    /// directory synced (a clean mark must never outlive its taking back).
    fn save(&self, file: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = file.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        let clean = if self.clean { " clean" } else { "" };
        writeln!(f, "{}{clean}", self.cutoff)?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)?;
        if let Some(dir) = file.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// The exporter task's state.
struct Exporter<S: Sink> {
    sink: S,
    cfg: ExportConfig,
    replica: Arc<RwLock<Replica>>,
    metrics: Arc<ExportMetrics>,
    rx: mpsc::Receiver<Arc<Batch>>,
    rescan: Arc<AtomicBool>,
    wide: Arc<AtomicBool>,
    dirty: HashSet<Key>,
    mark: Option<Mark>,
    /// Keys whose rows the sink refused for good in this run: not written again.
    quarantined: HashSet<Key>,
}

/// The running exporter, for the node's shutdown.
#[derive(Debug)]
pub struct Exporting {
    stop: oneshot::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Longest wait for the last round at shutdown.
const LAST_ROUND_WAIT: Duration = Duration::from_secs(10);

impl Exporting {
    /// Runs a last round and stops. `clean`: the pipeline is empty and nothing submits any
    /// more, so a last round that writes everything closed may mark the stop clean.
    pub async fn finish(self, clean: bool) {
        let _ = self.stop.send(clean);
        if tokio::time::timeout(LAST_ROUND_WAIT, self.task)
            .await
            .is_err()
        {
            warn!("export: the last round did not finish; the next start rescans");
        }
    }
}

/// Starts the exporter; returns the feed for the apply stage and the handle that stops it.
/// Call it before any batch can apply: it takes back a clean stop's word on disk first.
pub fn start<S: Sink>(
    sink: S,
    cfg: ExportConfig,
    replica: Arc<RwLock<Replica>>,
    metrics: Arc<ExportMetrics>,
) -> Result<(ExportFeed, Exporting), String> {
    let (tx, rx) = mpsc::channel(FEED_CAPACITY);
    // A start rescans: whatever changed after the last complete round before a crash.
    let rescan = Arc::new(AtomicBool::new(true));
    let wide = Arc::new(AtomicBool::new(false));
    let mark = std::fs::read_to_string(&cfg.mark_file)
        .ok()
        .and_then(|s| Mark::parse(&s));
    metrics.enabled.store(true, Relaxed);
    if let Some(m) = mark {
        // Complete up to the mark already: the lag and the export's counters show from the
        // start, failed rounds included.
        metrics.mark_ms.store(m.cutoff, Relaxed);
    }
    if let Some(m) = mark.filter(|m| m.clean) {
        // From here on batches apply that the clean mark does not cover.
        Mark {
            cutoff: m.cutoff,
            clean: false,
        }
        .save(&cfg.mark_file)
        .map_err(|e| format!("export mark {}: {e}", cfg.mark_file.display()))?;
    }
    let ex = Exporter {
        sink,
        cfg,
        replica,
        metrics,
        rx,
        rescan: rescan.clone(),
        wide: wide.clone(),
        dirty: HashSet::new(),
        mark,
        quarantined: HashSet::new(),
    };
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(ex.run(stopped));
    Ok((ExportFeed { tx, rescan, wide }, Exporting { stop, task }))
}

impl<S: Sink> Exporter<S> {
    fn width(&self) -> i64 {
        edgetally_core::replica::TIER_MS[self.cfg.tier]
    }

    async fn run(mut self, mut stop: oneshot::Receiver<bool>) {
        info!(sink = self.sink.name(), "export started");
        if let Err(e) = self.sink.prepare().await {
            warn!(sink = self.sink.name(), "export sink not ready: {e}");
        }
        // The first round at once: it rescans what a previous run may not have written.
        self.round(false).await;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(self.cfg.interval_ms)) => {}
                clean = &mut stop => {
                    // A last round for what has closed; the rest is rescanned at the next
                    // start (all of it since the mark, unless this stop is clean).
                    self.round(clean.unwrap_or(false)).await;
                    break;
                }
            }
            self.round(false).await;
        }
    }

    /// Reads the replica on the blocking pool, not on an async worker: a day of a busy tier is
    /// many rows, read under the replica's read lock. `None` if the read panicked (logged).
    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Replica) -> T + Send + 'static,
    ) -> impl std::future::Future<Output = Option<T>> {
        let replica = self.replica.clone();
        let task = tokio::task::spawn_blocking(move || {
            f(&replica.read().unwrap_or_else(|e| e.into_inner()))
        });
        async move {
            task.await
                .map_err(|e| warn!("export: reading the replica failed: {e}"))
                .ok()
        }
    }

    /// Writes rows in chunks; false (logged and counted) if a write failed for want of the
    /// sink. Rows the sink refuses for what they hold are quarantined and count as done.
    async fn write(&mut self, rows: &[ExportRow]) -> bool {
        let rows: Vec<&ExportRow> = rows
            .iter()
            .filter(|r| !self.quarantined.contains(&key_of(r)))
            .collect();
        for chunk in rows.chunks(CHUNK) {
            let chunk: Vec<ExportRow> = chunk.iter().map(|r| (*r).clone()).collect();
            let outcome = write_isolating(&self.sink, chunk).await;
            self.metrics.rows.fetch_add(outcome.written, Relaxed);
            for (row, why) in outcome.refused {
                self.quarantine(row, &why);
            }
            if let Some(e) = outcome.unavailable {
                warn!(
                    sink = self.sink.name(),
                    "export failed, kept for the next round: {e}"
                );
                self.metrics.errors.fetch_add(1, Relaxed);
                return false;
            }
        }
        true
    }

    /// Sets a refused row aside: counted, logged with the sink's reason, appended to the
    /// quarantine file, and not written again by this run.
    fn quarantine(&mut self, row: ExportRow, why: &str) {
        self.metrics.quarantined.fetch_add(1, Relaxed);
        warn!(
            sink = self.sink.name(),
            category = ?row.category,
            entity = ?row.entity,
            bucket_start_ms = row.bucket_start_ms,
            "export: row refused for good, quarantined in {}: {why}",
            self.cfg.quarantine_file.display()
        );
        let line = serde_json::json!({
            "category": row.category,
            "entity": row.entity,
            "bucket_start_ms": row.bucket_start_ms,
            "bucket_ms": row.bucket_ms,
            "count": row.total.count,
            "sum": row.total.sum.to_decimal(),
            "min": row.total.min,
            "max": row.total.max,
            "reason": why,
            "quarantined_at_ms": edgetally_net::now_ms(),
        });
        let appended = (|| {
            use std::io::Write as _;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.cfg.quarantine_file)?;
            writeln!(f, "{line}")?;
            f.sync_data()
        })();
        if let Err(e) = appended {
            warn!("export: quarantine file not written: {e}");
        }
        self.quarantined.insert(key_of(&row));
    }

    /// The batches applied since the last round, as dirty keys.
    fn drain(&mut self) {
        let w = self.width();
        while let Ok(b) = self.rx.try_recv() {
            for s in &b.summaries {
                let start = b.bucket_start_ms(s).div_euclid(w) * w;
                self.dirty.insert((
                    b.category(s).to_string(),
                    b.entity(s).map(str::to_string),
                    start,
                ));
            }
        }
    }

    /// One round; `last_clean`: the last round of a clean stop (see [`Exporting::finish`]).
    // Long by design: one export round in order (mark, changed keys, rows, write with
    // isolation, the new mark); the order is what writes each key exactly once.
    async fn round(&mut self, last_clean: bool) {
        self.drain();
        let now = edgetally_net::now_ms();
        let w = self.width();
        // Buckets ending at or before the cutoff are closed: [.., last_start] with
        // last_start + w <= cutoff.
        let cutoff = now - self.cfg.delay_ms;
        let end = cutoff - w + 1;
        let full = self.rescan.swap(false, Relaxed);
        // A clean stop's mark narrows the start's rescan only: taken here, once.
        let wide = self.wide.swap(false, Relaxed);
        let narrow = !wide && self.mark.is_some_and(|m| m.clean);
        if let Some(m) = &mut self.mark {
            m.clean = false;
        }
        if full {
            // The rescan, a day of buckets at a time: memory bounded by a day's rows, and the
            // replica's read lock let go between days.
            let oldest = self
                .replica
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .oldest_bucket(self.cfg.tier);
            let from = self.mark.map_or(i64::MIN, |m| {
                // After a clean stop every bucket that ended by its cutoff is written and
                // has not changed since; otherwise a batch applied after the mark may have
                // reached back by `reach`.
                let back = if narrow { 0 } else { self.cfg.reach_ms };
                m.cutoff.saturating_sub(back).saturating_sub(w)
            });
            // The keys the feed brought are covered too, however old (batches applied
            // since this start).
            let from = self.dirty.iter().map(|k| k.2).fold(from, i64::min);
            let mut at = from.max(oldest.unwrap_or(end));
            while at < end {
                let to = at.saturating_add(SCAN_WINDOW_MS).min(end);
                let tier = self.cfg.tier;
                let rows = self.read(move |r| {
                    let mut rows = Vec::new();
                    r.each_bucket(tier, at, to, |c, e, start, t| {
                        rows.push(ExportRow {
                            category: c.to_string(),
                            entity: e.map(str::to_string),
                            bucket_start_ms: start,
                            bucket_ms: w,
                            total: *t,
                            sketches: r.bucket_sketches(c, e, tier, start).cloned(),
                        })
                    });
                    rows
                });
                let Some(rows) = rows.await else {
                    self.rescan.store(true, Relaxed);
                    return;
                };
                if !self.write(&rows).await {
                    self.rescan.store(true, Relaxed);
                    // At least the rows of this step are pending, and the feed's keys.
                    self.metrics
                        .pending
                        .store((rows.len() + self.dirty.len()) as u64, Relaxed);
                    return;
                }
                at = to;
            }
            // The rescan covered every closed key.
            self.dirty.retain(|k| k.2 >= end);
        } else {
            let closed: Vec<Key> = self.dirty.iter().filter(|k| k.2 < end).cloned().collect();
            let tier = self.cfg.tier;
            let read = self.read(move |r| {
                let rows: Vec<ExportRow> = closed
                    .iter()
                    .filter_map(|k| {
                        let t = r.bucket_total(&k.0, k.1.as_deref(), tier, k.2)?;
                        Some(ExportRow {
                            category: k.0.clone(),
                            entity: k.1.clone(),
                            bucket_start_ms: k.2,
                            bucket_ms: w,
                            total: t,
                            sketches: r.bucket_sketches(&k.0, k.1.as_deref(), tier, k.2).cloned(),
                        })
                    })
                    .collect();
                (closed, rows)
            });
            // The keys stay dirty until written.
            let Some((closed, rows)) = read.await else {
                return;
            };
            for k in &closed {
                self.dirty.remove(k);
            }
            if !self.write(&rows).await {
                // Keep what is not written, as dirty keys.
                self.dirty.extend(closed);
                self.metrics.pending.store(self.dirty.len() as u64, Relaxed);
                return;
            }
        }
        // Every key closed by the cutoff is written: the mark moves on (the file first, so
        // a crash never leaves a mark past what was written).
        let mark = Mark {
            cutoff,
            clean: last_clean,
        };
        if let Err(e) = mark.save(&self.cfg.mark_file) {
            warn!("export mark not saved: {e}");
        }
        // In memory the mark is never clean: batches may still apply in this run.
        self.mark = Some(Mark {
            cutoff,
            clean: false,
        });
        self.metrics.mark_ms.store(cutoff, Relaxed);
        self.metrics.pending.store(self.dirty.len() as u64, Relaxed);
    }
}

fn key_of(r: &ExportRow) -> Key {
    (r.category.clone(), r.entity.clone(), r.bucket_start_ms)
}

/// What [`write_isolating`] did with a chunk.
#[derive(Debug, Default)]
struct Isolated {
    /// Rows written.
    written: u64,
    /// Rows the sink refused alone, with its reason.
    refused: Vec<(ExportRow, String)>,
    /// Set if the sink was unavailable: the rows not yet written wait for a later round.
    unavailable: Option<String>,
}

/// Writes `rows`; where the sink refuses a set of rows for what they hold, splits it in
/// halves until each refused row stands alone, so that only the rows the sink cannot take
/// are left out (a refused row costs about 2·log₂(chunk) more writes). Stops at the first
/// unavailability.
async fn write_isolating<S: Sink>(sink: &S, rows: Vec<ExportRow>) -> Isolated {
    let mut out = Isolated::default();
    let mut todo = vec![rows];
    while let Some(rows) = todo.pop() {
        if rows.is_empty() {
            continue;
        }
        match sink.write(&rows).await {
            Ok(()) => out.written += rows.len() as u64,
            Err(WriteError::Refused(why)) if rows.len() == 1 => {
                out.refused
                    .extend(rows.into_iter().map(|r| (r, why.clone())));
            }
            Err(WriteError::Refused(_)) => {
                let mut rows = rows;
                let back = rows.split_off(rows.len() / 2);
                todo.push(back);
                todo.push(rows);
            }
            Err(WriteError::Unavailable(e)) => {
                out.unavailable = Some(e);
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{write_isolating, ExportRow, Mark, Sink, WriteError};
    use edgetally_core::Total;
    use std::sync::Mutex;

    /// A sink that refuses any write holding a category with "bad" in it, and records the
    /// rows it wrote; `down` makes it unavailable.
    #[derive(Default)]
    struct Picky {
        written: Mutex<Vec<String>>,
        writes: Mutex<u64>,
        down: bool,
    }

    impl Sink for Picky {
        fn name(&self) -> &'static str {
            "picky"
        }
        async fn write(&self, rows: &[ExportRow]) -> Result<(), WriteError> {
            *self.writes.lock().expect("lock") += 1;
            if self.down {
                return Err(WriteError::Unavailable("down".into()));
            }
            if rows.iter().any(|r| r.category.contains("bad")) {
                return Err(WriteError::Refused("no bad rows".into()));
            }
            let mut w = self.written.lock().expect("lock");
            w.extend(rows.iter().map(|r| r.category.clone()));
            Ok(())
        }
    }

    fn row(category: &str) -> ExportRow {
        ExportRow {
            category: category.into(),
            entity: None,
            bucket_start_ms: 0,
            bucket_ms: 60_000,
            total: Total::default(),
            sketches: None,
        }
    }

    /// Issue 28, finding 8: one row the sink refuses for good no longer stops every other
    /// row; the refused ones stand alone, with the sink's reason.
    #[tokio::test]
    async fn refused_rows_are_isolated_and_every_other_row_is_written() {
        let names: Vec<String> = (0..1000)
            .map(|i| match i {
                3 | 500 | 999 => format!("bad{i}"),
                _ => format!("ok{i}"),
            })
            .collect();
        let sink = Picky::default();
        let out = write_isolating(&sink, names.iter().map(|n| row(n)).collect()).await;
        assert_eq!(out.written, 997);
        assert!(out.unavailable.is_none());
        let mut refused: Vec<&str> = out
            .refused
            .iter()
            .map(|(r, _)| r.category.as_str())
            .collect();
        refused.sort_unstable();
        assert_eq!(refused, ["bad3", "bad500", "bad999"]);
        assert!(out.refused.iter().all(|(_, why)| why == "no bad rows"));
        let mut written = sink.written.lock().expect("lock").clone();
        written.sort_unstable();
        let mut want: Vec<String> = names.into_iter().filter(|n| n.starts_with("ok")).collect();
        want.sort_unstable();
        assert_eq!(written, want);
        // About 2·log₂(1000) writes per refused row, not one per row.
        assert!(*sink.writes.lock().expect("lock") < 80);
        // Unavailable: nothing counted as written or refused, the reason kept.
        let down = Picky {
            down: true,
            ..Picky::default()
        };
        let out = write_isolating(&down, vec![row("ok"), row("bad")]).await;
        assert_eq!((out.written, out.refused.len()), (0, 0));
        assert_eq!(out.unavailable.as_deref(), Some("down"));
    }

    #[test]
    fn marks_parse_in_both_forms_and_nothing_else() {
        let m = |cutoff, clean| Some(Mark { cutoff, clean });
        assert_eq!(Mark::parse("1700000000000\n"), m(1_700_000_000_000, false));
        assert_eq!(Mark::parse("-5 clean\n"), m(-5, true));
        for bad in ["", "clean", "12 dirty", "12 clean extra", "1.5", "12clean"] {
            assert_eq!(Mark::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_saved_mark_reads_back_and_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("et-mark-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("export-t.mark");
        for mark in [
            Mark {
                cutoff: 42,
                clean: true,
            },
            Mark {
                cutoff: 43,
                clean: false,
            },
        ] {
            mark.save(&file).expect("save");
            let text = std::fs::read_to_string(&file).expect("read");
            assert_eq!(Mark::parse(&text), Some(mark));
        }
        assert!(!file.with_extension("tmp").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
