//! Counters for everything the node counts, rendered in the Prometheus text format.

use edgetally_core::RejectCode;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const CODES: usize = RejectCode::TABLE_SIZE;
/// Upper bounds (seconds) of the ack-latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
];

/// All of the node's counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Batches applied (new).
    pub applied: AtomicU64,
    /// Batches pulled from peers and acknowledged here (including ones a push had brought).
    pub pulled: AtomicU64,
    /// Peer connections refused at authentication.
    pub peer_refused: AtomicU64,
    /// Peer snapshots adopted to catch up (after being away longer than the peers' horizon).
    pub snapshots_adopted: AtomicU64,
    /// Pull rounds that found a peer with the same batch ids and another state.
    pub divergences: AtomicU64,
    /// Divergences repaired by adopting the peer's snapshot.
    pub divergence_repairs: AtomicU64,
    /// Producers found equivocating (two contents under one batch id).
    pub equivocations: AtomicU64,
    /// Summaries in applied batches.
    pub summaries: AtomicU64,
    /// Batches received again after being applied.
    pub duplicates: AtomicU64,
    /// Batches answered with Retry.
    pub retried: AtomicU64,
    /// Batch bytes received (QUIC and HTTP).
    pub bytes_received: AtomicU64,
    /// Producer messages (batches, credentials) received, by transport: raw QUIC,
    /// WebTransport, HTTP (`POST /v1/batches`).
    pub received_by_transport: [AtomicU64; 3],
    /// Group commits written.
    pub group_commits: AtomicU64,
    /// Group commits that failed (full disk, I/O error): their batches were answered Retry.
    pub commit_failures: AtomicU64,
    /// Why the last group commit failed, while no commit has succeeded since (`/readyz`).
    pub store_error: std::sync::Mutex<Option<String>>,
    /// The exporter's counters.
    pub export: std::sync::Arc<edgetally_export::ExportMetrics>,
    /// Whether `store_error` is set (so a successful commit takes no lock to clear it).
    pub store_failing: std::sync::atomic::AtomicBool,
    /// Total time spent in group commits, microseconds.
    pub commit_micros: AtomicU64,
    /// Jobs waiting for the pipeline.
    pub queue_depth: AtomicU64,
    /// Events accepted by `POST /v1/events`.
    pub events_accepted: AtomicU64,
    /// Snapshots written.
    pub snapshots: AtomicU64,
    /// Time the replica's read lock was held streaming snapshots (ingest waits meanwhile),
    /// microseconds.
    pub snapshot_lock_micros: AtomicU64,
    /// Size of the last snapshot file written, bytes.
    pub snapshot_bytes: AtomicU64,
    /// (Producer, epoch) seen-sets expired past the lateness horizon.
    pub epochs_expired: AtomicU64,
    /// HTTP requests answered with 4xx.
    pub http_client_errors: AtomicU64,
    /// HTTP requests.
    pub http_requests: AtomicU64,
    rejected: [AtomicU64; CODES],
    events_rejected: [AtomicU64; CODES],
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_micros: AtomicU64,
}

/// The transports of `edgetally_batches_received_total`, in `received_by_transport` order.
pub const TRANSPORTS: [&str; 3] = ["quic", "webtransport", "http"];

impl Metrics {
    /// Counts a producer message received over `transport` (one of [`TRANSPORTS`]).
    pub fn received(&self, transport: &str) {
        if let Some(i) = TRANSPORTS.iter().position(|t| *t == transport) {
            self.received_by_transport[i].fetch_add(1, Relaxed);
        }
    }

    /// Counts a rejected batch.
    pub fn reject(&self, code: RejectCode) {
        if let Some(c) = self.rejected.get(code.as_u16() as usize) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Counts a rejected event.
    pub fn reject_event(&self, code: RejectCode) {
        self.reject_events(code, 1);
    }

    /// Counts `n` events rejected for `code`.
    pub fn reject_events(&self, code: RejectCode, n: u64) {
        if let Some(c) = self.events_rejected.get(code.as_u16() as usize) {
            c.fetch_add(n, Relaxed);
        }
    }

    /// Batches rejected for `code` so far.
    pub fn rejected(&self, code: RejectCode) -> u64 {
        self.rejected
            .get(code.as_u16() as usize)
            .map_or(0, |c| c.load(Relaxed))
    }

    /// Records the time from receiving a batch to answering it.
    pub fn observe_latency(&self, secs: f64) {
        for (b, c) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            if secs <= *b {
                c.fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_micros.fetch_add((secs * 1e6) as u64, Relaxed);
    }

    /// The Prometheus exposition text; `gauges` are extra (name, help, value) lines.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut s = String::new();
        let counter = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            &mut s,
            "edgetally_batches_applied_total",
            "Batches applied (first delivery).",
            self.applied.load(Relaxed),
        );
        counter(
            &mut s,
            "edgetally_batches_pulled_total",
            "Batches pulled from peers (anti-entropy) and acknowledged here, including ones a push had already brought.",
            self.pulled.load(Relaxed),
        );
        counter(
            &mut s,
            "edgetally_snapshots_adopted_total",
            "Peer snapshots adopted to catch up on batches the peers no longer retained.",
            self.snapshots_adopted.load(Relaxed),
        );
        counter(
            &mut s,
            "edgetally_divergences_total",
            "Pull rounds that found a peer holding the same batch ids with a different state (an equivocating producer, or damage).",
            self.divergences.load(Relaxed),
        );
        counter(
            &mut s,
            "edgetally_divergence_repairs_total",
            "Divergences repaired here by adopting the peer's snapshot (the node with the greater hash of the first diverging epoch adopts).",
            self.divergence_repairs.load(Relaxed),
        );
        counter(
            &mut s,
            "edgetally_equivocations_total",
            "Producers found equivocating (two signed contents under one batch id, PROTOCOL.md §9) since start.",
            self.equivocations.load(Relaxed),
        );
        counter(
            &mut s,
            "edgetally_peer_refused_total",
            "Peer connections refused at authentication.",
            self.peer_refused.load(Relaxed),
        );
        counter(
            &mut s,
            "edgetally_summaries_applied_total",
            "Summaries in applied batches.",
            self.summaries.load(Relaxed),
        );
        counter(
            &mut s,
            "edgetally_batches_duplicate_total",
            "Batches received again after being applied (acked, not re-applied).",
            self.duplicates.load(Relaxed),
        );
        counter(
            &mut s,
            "edgetally_batches_retried_total",
            "Batches answered with Retry (overload or transient fault).",
            self.retried.load(Relaxed),
        );
        counter(
            &mut s,
            "edgetally_batch_bytes_received_total",
            "Bytes of batches received.",
            self.bytes_received.load(Relaxed),
        );
        counter(
            &mut s,
            "edgetally_group_commits_total",
            "Durable group commits.",
            self.group_commits.load(Relaxed),
        );
        counter(
            &mut s,
            "edgetally_commit_failures_total",
            "Group commits that failed (full disk, I/O error); their batches were answered Retry.",
            self.commit_failures.load(Relaxed),
        );
        counter(
            &mut s,
            "edgetally_events_accepted_total",
            "Events accepted by POST /v1/events.",
            self.events_accepted.load(Relaxed),
        );
        counter(
            &mut s,
            "edgetally_snapshots_total",
            "State snapshots written.",
            self.snapshots.load(Relaxed),
        );
        counter(
            &mut s,
            "edgetally_epochs_expired_total",
            "(Producer, epoch) seen-sets expired past the lateness horizon (max_lateness + seen_expiry_margin_ms after their newest batch's oldest bucket).",
            self.epochs_expired.load(Relaxed),
        );
        counter(
            &mut s,
            "edgetally_http_requests_total",
            "HTTP requests served.",
            self.http_requests.load(Relaxed),
        );
        counter(
            &mut s,
            "edgetally_http_client_errors_total",
            "HTTP requests answered with a 4xx status.",
            self.http_client_errors.load(Relaxed),
        );
        let _ = writeln!(s, "# HELP edgetally_batches_received_total Producer batches (and credentials) received, by transport.\n# TYPE edgetally_batches_received_total counter");
        for (t, c) in TRANSPORTS.iter().zip(&self.received_by_transport) {
            let _ = writeln!(
                s,
                "edgetally_batches_received_total{{transport=\"{t}\"}} {}",
                c.load(Relaxed)
            );
        }
        let _ = writeln!(s, "# HELP edgetally_commit_seconds_total Time spent in durable group commits.\n# TYPE edgetally_commit_seconds_total counter\nedgetally_commit_seconds_total {}", self.commit_micros.load(Relaxed) as f64 / 1e6);
        for (name, help, arr) in [
            (
                "edgetally_batches_rejected_total",
                "Batches rejected, by reason.",
                &self.rejected,
            ),
            (
                "edgetally_events_rejected_total",
                "Events rejected by POST /v1/events, by reason.",
                &self.events_rejected,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            for code in RejectCode::ALL {
                let v = arr
                    .get(code.as_u16() as usize)
                    .map_or(0, |c| c.load(Relaxed));
                let _ = writeln!(s, "{name}{{reason=\"{code}\"}} {v}");
            }
        }
        let _ = writeln!(s, "# HELP edgetally_ack_latency_seconds Time from receiving a batch to its reply.\n# TYPE edgetally_ack_latency_seconds histogram");
        for (b, c) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            let _ = writeln!(
                s,
                "edgetally_ack_latency_seconds_bucket{{le=\"{b}\"}} {}",
                c.load(Relaxed)
            );
        }
        let n = self.latency_count.load(Relaxed);
        let _ = writeln!(s, "edgetally_ack_latency_seconds_bucket{{le=\"+Inf\"}} {n}\nedgetally_ack_latency_seconds_sum {}\nedgetally_ack_latency_seconds_count {n}", self.latency_micros.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(s, "# HELP edgetally_snapshot_lock_seconds_total Time the replica's read lock was held streaming snapshots into their files (applies wait meanwhile).\n# TYPE edgetally_snapshot_lock_seconds_total counter\nedgetally_snapshot_lock_seconds_total {}", self.snapshot_lock_micros.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(s, "# HELP edgetally_snapshot_bytes Size of the last snapshot file written.\n# TYPE edgetally_snapshot_bytes gauge\nedgetally_snapshot_bytes {}", self.snapshot_bytes.load(Relaxed));
        let _ = writeln!(s, "# HELP edgetally_ingest_queue_depth Batches waiting for the ingest pipeline.\n# TYPE edgetally_ingest_queue_depth gauge\nedgetally_ingest_queue_depth {}", self.queue_depth.load(Relaxed));
        for (name, help, v) in gauges {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let _ = writeln!(s, "# HELP edgetally_build_info The running build: 1, labelled with its version.\n# TYPE edgetally_build_info gauge\nedgetally_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        let mark = self.export.mark_ms.load(Relaxed);
        if self.export.enabled.load(Relaxed) {
            // No round complete yet (and no mark from an earlier run): behind since the epoch.
            let lag = (edgetally_net::now_ms() - mark).max(0) as f64 / 1000.0;
            let _ = writeln!(s, "# HELP edgetally_export_lag_seconds How far behind now the export is complete: every bucket that ended before now minus this is written (export_delay included).\n# TYPE edgetally_export_lag_seconds gauge\nedgetally_export_lag_seconds {lag}");
            let _ = writeln!(s, "# HELP edgetally_export_rows_total Rows written to the export sink.\n# TYPE edgetally_export_rows_total counter\nedgetally_export_rows_total {}", self.export.rows.load(Relaxed));
            let _ = writeln!(s, "# HELP edgetally_export_errors_total Export rounds whose write failed (their rows are written by a later round).\n# TYPE edgetally_export_errors_total counter\nedgetally_export_errors_total {}", self.export.errors.load(Relaxed));
            let _ = writeln!(s, "# HELP edgetally_export_quarantined_total Rows the export sink refused for what they hold (a data or constraint error), kept aside in export-<table>.quarantine in the data directory; every other row is written.\n# TYPE edgetally_export_quarantined_total counter\nedgetally_export_quarantined_total {}", self.export.quarantined.load(Relaxed));
            let _ = writeln!(s, "# HELP edgetally_export_pending_keys Changed (category, entity, bucket) keys not yet written.\n# TYPE edgetally_export_pending_keys gauge\nedgetally_export_pending_keys {}", self.export.pending.load(Relaxed));
        }
        process_families(&mut s);
        s
    }
}

/// The standard `process_*` families (as Prometheus client libraries export them), read from
/// `/proc/self` — on other systems they are left out. Written here rather than taken from a
/// client library: six values from two files, against a library's registry and collectors.
fn process_families(s: &mut String) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    // Field n of proc(5) is fields[n - 3]: utime 14, stime 15, starttime 22, vsize 23, rss 24.
    let num = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let ticks = 100.0; // USER_HZ, 100 on every Linux target
    let page = 4096.0;
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as f64)
        .ok();
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<f64>().ok())
        });
    let families = [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            num(14).zip(num(15)).map(|(u, k)| (u + k) / ticks),
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            num(24).map(|p| p * page),
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            num(23),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            num(22).zip(boot).map(|(t, b)| b + t / ticks),
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            open_fds,
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max_fds,
        ),
    ];
    for (name, kind, help, v) in families {
        if let Some(v) = v {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
    }
}
