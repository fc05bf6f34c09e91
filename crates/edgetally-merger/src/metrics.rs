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

    /// Writes this node's own counters and gauges (every family of [`FAMILIES`] that these
    /// counters hold; the node adds the ones read from its state, `node::Node::metrics_text`).
    // Long by design: one line per family: the list is the content.
    pub fn write(&self, x: &mut Exposition) {
        for (name, v) in [
            ("edgetally_batches_applied_total", &self.applied),
            ("edgetally_batches_pulled_total", &self.pulled),
            ("edgetally_snapshots_adopted_total", &self.snapshots_adopted),
            ("edgetally_divergences_total", &self.divergences),
            (
                "edgetally_divergence_repairs_total",
                &self.divergence_repairs,
            ),
            ("edgetally_equivocations_total", &self.equivocations),
            ("edgetally_peer_refused_total", &self.peer_refused),
            ("edgetally_summaries_applied_total", &self.summaries),
            ("edgetally_batches_duplicate_total", &self.duplicates),
            ("edgetally_batches_retried_total", &self.retried),
            ("edgetally_batch_bytes_received_total", &self.bytes_received),
            ("edgetally_group_commits_total", &self.group_commits),
            ("edgetally_commit_failures_total", &self.commit_failures),
            ("edgetally_events_accepted_total", &self.events_accepted),
            ("edgetally_snapshots_total", &self.snapshots),
            ("edgetally_epochs_expired_total", &self.epochs_expired),
            ("edgetally_http_requests_total", &self.http_requests),
            (
                "edgetally_http_client_errors_total",
                &self.http_client_errors,
            ),
            ("edgetally_snapshot_bytes", &self.snapshot_bytes),
            ("edgetally_ingest_queue_depth", &self.queue_depth),
        ] {
            x.family(name).value(v.load(Relaxed) as f64);
        }
        x.family("edgetally_batches_received_total");
        for (t, c) in TRANSPORTS.iter().zip(&self.received_by_transport) {
            x.labelled(&[("transport", t)], c.load(Relaxed) as f64);
        }
        x.family("edgetally_commit_seconds_total")
            .value(self.commit_micros.load(Relaxed) as f64 / 1e6);
        x.family("edgetally_snapshot_lock_seconds_total")
            .value(self.snapshot_lock_micros.load(Relaxed) as f64 / 1e6);
        for (name, arr) in [
            ("edgetally_batches_rejected_total", &self.rejected),
            ("edgetally_events_rejected_total", &self.events_rejected),
        ] {
            x.family(name);
            for code in RejectCode::ALL {
                let v = arr
                    .get(code.as_u16() as usize)
                    .map_or(0, |c| c.load(Relaxed));
                x.labelled(&[("reason", &code.to_string())], v as f64);
            }
        }
        x.family("edgetally_ack_latency_seconds");
        for (b, c) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            x.sample("_bucket", &[("le", &b.to_string())], c.load(Relaxed) as f64);
        }
        let n = self.latency_count.load(Relaxed) as f64;
        x.sample("_bucket", &[("le", "+Inf")], n);
        x.sample("_sum", &[], self.latency_micros.load(Relaxed) as f64 / 1e6);
        x.sample("_count", &[], n);
        x.family("edgetally_build_info")
            .labelled(&[("version", env!("CARGO_PKG_VERSION"))], 1.0);
        if self.export.enabled.load(Relaxed) {
            // No round complete yet (and no mark from an earlier run): behind since the epoch.
            let mark = self.export.mark_ms.load(Relaxed);
            let lag = (edgetally_net::now_ms() - mark).max(0) as f64 / 1000.0;
            x.family("edgetally_export_lag_seconds").value(lag);
            for (name, v) in [
                ("edgetally_export_rows_total", &self.export.rows),
                ("edgetally_export_errors_total", &self.export.errors),
                (
                    "edgetally_export_quarantined_total",
                    &self.export.quarantined,
                ),
                ("edgetally_export_pending_keys", &self.export.pending),
            ] {
                x.family(name).value(v.load(Relaxed) as f64);
            }
        }
        process_families(x);
    }
}

/// What a family is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (names end in `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Cumulative buckets, a sum and a count.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family: its name, kind and help, written once, here.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    /// The family name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// The `# HELP` text.
    pub help: &'static str,
}

const fn counter(name: &'static str, help: &'static str) -> Family {
    Family {
        name,
        kind: Kind::Counter,
        help,
    }
}

const fn gauge(name: &'static str, help: &'static str) -> Family {
    Family {
        name,
        kind: Kind::Gauge,
        help,
    }
}

/// Every family `/metrics` can show, each defined once: the registry. A family is written
/// only through [`Exposition::family`], which takes its kind and help from here (a name not
/// here is a bug: a debug build panics, a release build writes it without help).
pub const FAMILIES: &[Family] = &[
    // Ingest and storage.
    counter("edgetally_batches_applied_total", "Batches applied (first delivery)."),
    counter("edgetally_summaries_applied_total", "Summaries in applied batches."),
    counter("edgetally_batches_duplicate_total", "Batches received again after being applied (acked, not re-applied)."),
    counter("edgetally_batches_retried_total", "Batches answered with Retry (overload or transient fault)."),
    counter("edgetally_batch_bytes_received_total", "Bytes of batches received."),
    counter("edgetally_batches_received_total", "Producer batches (and credentials) received, by transport."),
    counter("edgetally_batches_rejected_total", "Batches rejected, by reason."),
    counter("edgetally_events_accepted_total", "Events accepted by POST /v1/events."),
    counter("edgetally_events_rejected_total", "Events rejected by POST /v1/events, by reason."),
    counter("edgetally_group_commits_total", "Durable group commits."),
    counter("edgetally_commit_failures_total", "Group commits that failed (full disk, I/O error); their batches were answered Retry."),
    counter("edgetally_commit_seconds_total", "Time spent in durable group commits."),
    Family {
        name: "edgetally_ack_latency_seconds",
        kind: Kind::Histogram,
        help: "Time from receiving a batch to its reply.",
    },
    gauge("edgetally_ingest_queue_depth", "Batches waiting for the ingest pipeline."),
    counter("edgetally_snapshots_total", "State snapshots written."),
    counter("edgetally_snapshot_lock_seconds_total", "Time the replica's read lock was held streaming snapshots into their files (applies wait meanwhile)."),
    gauge("edgetally_snapshot_bytes", "Size of the last snapshot file written."),
    gauge("edgetally_stored_batches", "Batches in the store not yet covered by a snapshot."),
    gauge("edgetally_quarantined_batches", "Stored batches set aside at start-up because they could not be replayed (see the data directory's quarantine/)."),
    gauge("edgetally_log_torn_bytes", "Bytes of torn log tails found at start-up (commits cut short; kept on disk, never acknowledged)."),
    counter("edgetally_epochs_expired_total", "(Producer, epoch) seen-sets expired past the lateness horizon (max_lateness + seen_expiry_margin_ms after their newest batch's oldest bucket)."),
    // State.
    gauge("edgetally_series", "Series held (per category, entity, no-entity and producer); refused past max_series."),
    gauge("edgetally_tier_entries", "Stored tier entries (a measure of state size)."),
    gauge("edgetally_producer_epochs", "Distinct (producer, epoch) seen-sets."),
    gauge("edgetally_memory_bytes", "Estimated heap bytes of the node's state, by kind (sizes times counts, at typical table fill): seen-sets, producer keys, series headers, tier entries, strings, retained batches, admission state."),
    // Admission.
    gauge("edgetally_admission_allowlist_keys", "Producer keys on the allowlist in force."),
    gauge("edgetally_admission_enrolled_producers", "Producer keys enrolled by a credential (expired ones are swept every 30 s)."),
    gauge("edgetally_admission_tracked_producers", "Producers tracked by the rate limits and hourly quotas."),
    gauge("edgetally_admission_tracked_sources", "Source addresses tracked by the per-source rate limit."),
    counter("edgetally_throttled_total", "Batches answered Retry by a rate limit, by scope."),
    counter("edgetally_credentials_total", "Enrolment credentials presented, by result."),
    counter("edgetally_allowlist_load_errors_total", "Allowlist reads that failed (the previous list stays in force)."),
    // Replication.
    counter("edgetally_batches_pulled_total", "Batches pulled from peers (anti-entropy) and acknowledged here, including ones a push had already brought."),
    counter("edgetally_snapshots_adopted_total", "Peer snapshots adopted to catch up on batches the peers no longer retained."),
    counter("edgetally_divergences_total", "Pull rounds that found a peer holding the same batch ids with a different state (an equivocating producer, or damage)."),
    counter("edgetally_divergence_repairs_total", "Divergences repaired here by adopting the peer's snapshot (the node with the greater hash of the first diverging epoch adopts)."),
    counter("edgetally_equivocations_total", "Producers found equivocating (two signed contents under one batch id, PROTOCOL.md §9) since start."),
    counter("edgetally_peer_refused_total", "Peer connections refused at authentication."),
    gauge("edgetally_peer_reachable", "1 if the link to the peer is up and its last pull round succeeded."),
    gauge("edgetally_peer_lag_batches", "Batches retained here that the peer's last digest lacks."),
    gauge("edgetally_peer_lag_seconds", "Seconds since the last completed pull round from the peer."),
    gauge("edgetally_peer_digest_batches", "Batches the peer's last digest covers."),
    counter("edgetally_peer_pushes_dropped_total", "Pushes to peers dropped because a peer's queue was full (the next pull round brings them)."),
    counter("edgetally_peer_pushes_timed_out_total", "Pushes to peers given up without a reply within the round timeout (the next pull round brings them)."),
    // Shard groups.
    counter("edgetally_forwarded_total", "Producers' batches for another shard group, by outcome (sent: the owner replied; failed: no replica of it did, the producer got Retry; received: forwarded here by another group's node)."),
    counter("edgetally_forward_replica_failures_total", "Forward attempts to one replica of another group that failed (the replica is then remembered as down, tried last and probed in the background)."),
    gauge("edgetally_forward_replicas_down", "Replicas of other groups remembered as down."),
    counter("edgetally_topology_reloads_total", "Topology file reloads, by result (past_reroute: applied, but it re-routed creation times already past)."),
    gauge("edgetally_topology_version", "Version of the topology in force."),
    counter("edgetally_topology_adoptions_total", "Newer topologies adopted from another node (in-band)."),
    gauge("edgetally_handoffs_pending", "Groups whose hand-off to this node's group at the version in force is pending (batches an earlier map gave them get Retry here)."),
    counter("edgetally_applied_elsewhere_total", "Producer batches acknowledged without applying: another group applied them before handing over."),
    gauge("edgetally_topology_settled", "1 when every node heard from routes by this node's topology version, without conflict or pending hand-off."),
    counter("edgetally_query_parts_missing_total", "Other groups' parts of cluster-wide queries that did not arrive within query_deadline_ms (the answer was marked incomplete)."),
    // Export.
    gauge("edgetally_export_lag_seconds", "How far behind now the export is complete: every bucket that ended before now minus this is written (export_delay included)."),
    counter("edgetally_export_rows_total", "Rows written to the export sink."),
    counter("edgetally_export_errors_total", "Export rounds whose write failed (their rows are written by a later round)."),
    counter("edgetally_export_quarantined_total", "Rows the export sink refused for what they hold (a data or constraint error), kept aside in export-<table>.quarantine in the data directory; every other row is written."),
    gauge("edgetally_export_pending_keys", "Changed (category, entity, bucket) keys not yet written."),
    // The HTTP API.
    counter("edgetally_http_requests_total", "HTTP requests served."),
    counter("edgetally_http_client_errors_total", "HTTP requests answered with a 4xx status."),
    // The process.
    gauge("edgetally_uptime_seconds", "Seconds since start."),
    gauge("edgetally_build_info", "The running build: 1, labelled with its version."),
    counter("process_cpu_seconds_total", "Total user and system CPU time spent in seconds."),
    gauge("process_resident_memory_bytes", "Resident memory size in bytes."),
    gauge("process_virtual_memory_bytes", "Virtual memory size in bytes."),
    gauge("process_start_time_seconds", "Start time of the process since unix epoch in seconds."),
    gauge("process_open_fds", "Number of open file descriptors."),
    gauge("process_max_fds", "Maximum number of open file descriptors."),
];

/// The Prometheus text exposition being written: a family at a time, its `# HELP` and
/// `# TYPE` from [`FAMILIES`], then its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
    current: &'static str,
}

impl Exposition {
    /// Starts the family `name` (declared in [`FAMILIES`]; one that is not gets its samples
    /// without help or type, never under another family's name).
    pub fn family(&mut self, name: &'static str) -> &mut Self {
        let found = FAMILIES.iter().find(|f| f.name == name);
        debug_assert!(found.is_some(), "metric family {name} is not in FAMILIES");
        if let Some(f) = found {
            let _ = writeln!(
                self.text,
                "# HELP {} {}\n# TYPE {} {}",
                f.name,
                f.help,
                f.name,
                f.kind.as_str()
            );
        }
        self.current = name;
        self
    }

    /// A sample of the current family without labels.
    pub fn value(&mut self, v: f64) -> &mut Self {
        self.sample("", &[], v)
    }

    /// A sample of the current family with `labels`.
    pub fn labelled(&mut self, labels: &[(&str, &str)], v: f64) -> &mut Self {
        self.sample("", labels, v)
    }

    /// A sample of the current family's series `suffix` (a histogram's `_bucket`, `_sum`,
    /// `_count`) with `labels` (values escaped as the text format requires).
    pub fn sample(&mut self, suffix: &str, labels: &[(&str, &str)], v: f64) -> &mut Self {
        let _ = write!(self.text, "{}{suffix}", self.current);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let escaped = val
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.text, "{k}=\"{escaped}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {v}");
        self
    }

    /// The text.
    pub fn finish(self) -> String {
        self.text
    }
}

/// The standard `process_*` families (as Prometheus client libraries export them), read from
/// `/proc/self` — on other systems they are left out. Written here rather than taken from a
/// client library: six values from two files, against a library's registry and collectors.
fn process_families(x: &mut Exposition) {
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
            num(14).zip(num(15)).map(|(u, k)| (u + k) / ticks),
        ),
        ("process_resident_memory_bytes", num(24).map(|p| p * page)),
        ("process_virtual_memory_bytes", num(23)),
        (
            "process_start_time_seconds",
            num(22).zip(boot).map(|(t, b)| b + t / ticks),
        ),
        ("process_open_fds", open_fds),
        ("process_max_fds", max_fds),
    ];
    for (name, v) in families {
        if let Some(v) = v {
            x.family(name).value(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_declared_once_and_named_by_its_kind() {
        let mut names: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "a family declared twice");
        for f in FAMILIES {
            assert!(
                f.name.starts_with("edgetally_") || f.name.starts_with("process_"),
                "{}",
                f.name
            );
            assert_eq!(
                f.kind == Kind::Counter,
                f.name.ends_with("_total"),
                "{}",
                f.name
            );
            assert!(!f.help.is_empty() && !f.help.contains('\n'), "{}", f.name);
        }
    }

    #[test]
    fn the_counters_render_each_family_once_with_its_help() {
        let m = Metrics::default();
        m.export.enabled.store(true, Relaxed);
        m.observe_latency(0.003);
        let mut x = Exposition::default();
        m.write(&mut x);
        let text = x.finish();
        let mut seen = Vec::new();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap_or_default();
            assert!(!seen.contains(&name), "{name} twice");
            seen.push(name);
            let f = FAMILIES.iter().find(|f| f.name == name).expect("declared");
            assert!(text.contains(&format!("# HELP {name} {}\n", f.help)));
        }
        assert!(text.contains("edgetally_ack_latency_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("edgetally_ack_latency_seconds_count 1\n"));
        assert!(text.contains("edgetally_batches_rejected_total{reason=\"bad_signature\"} 0\n"));
        let mut x = Exposition::default();
        x.family("edgetally_build_info")
            .labelled(&[("version", "a\"b\\c")], 1.0);
        assert!(x
            .finish()
            .ends_with("edgetally_build_info{version=\"a\\\"b\\\\c\"} 1\n"));
    }
}
