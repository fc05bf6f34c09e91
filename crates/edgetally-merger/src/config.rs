//! Node configuration: embedded defaults, overridden by a TOML file, then `EDGETALLY_*`
//! environment variables, then command-line flags (the binary applies those last).

use edgetally_core::{Limits, Retention};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything a merger needs to run. `Config::default()` is a working loopback node.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Where the store, node key and certificate live.
    pub data_dir: PathBuf,
    /// The HTTP API's address.
    pub http_addr: SocketAddr,
    /// The QUIC (batches; later WebTransport) address.
    pub quic_addr: SocketAddr,
    /// A user-supplied certificate chain (PEM); with `tls_key`, replaces the generated one.
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Batch limits.
    pub limits: Limits,
    /// Tier retention.
    pub retention: Retention,
    /// Jobs waiting for the pipeline before new ones get `Retry`.
    pub queue_depth: usize,
    /// Most batches per group commit.
    pub max_group: usize,
    /// How often the state is snapshotted and the batch log compacted, seconds.
    pub snapshot_interval_secs: u64,
    /// Peers' QUIC addresses: this node pulls from and pushes to each of them.
    pub peers: Vec<SocketAddr>,
    /// A secret shared by the cluster: peers prove they know it (HMAC over the TLS session's
    /// exported keying material). Peers need this or `peer_keys`.
    pub cluster_secret: Option<String>,
    /// Node public keys (hex, as printed at `node:`) allowed to connect as peers; each proves
    /// its key by signing the TLS session's exported keying material.
    pub peer_keys: Vec<String>,
    /// How often each peer is asked for what this node lacks, ms.
    pub sync_interval_ms: u64,
    /// A peer unreachable for longer than this (seconds) stops holding back log pruning;
    /// when it returns it catches up from a snapshot.
    pub peer_horizon_secs: u64,
    /// How far past `max_lateness` an epoch's seen-set is kept before it expires, ms: the
    /// margin that covers clock steps and a batch's time between its time check and its
    /// apply (ARCHITECTURE.md, "Seen-set expiry").
    pub seen_expiry_margin_ms: i64,
    /// Page cache of the snapshot database (redb), MiB.
    pub store_cache_mb: usize,
    /// Which producers may send batches (see [`crate::admission`]).
    pub producer_policy: ProducerPolicy,
    /// The allowlist file (one producer key per line), re-read when it changes.
    pub producer_allowlist: Option<PathBuf>,
    /// Issuer public keys (hex) whose credentials enrol producers.
    pub issuer_keys: Vec<String>,
    /// Batches per second per producer key; 0: unlimited.
    pub producer_batches_per_sec: f64,
    /// Summaries per second per producer key; 0: unlimited.
    pub producer_summaries_per_sec: f64,
    /// Batches per second per source address (IPv6: per /64); 0: unlimited.
    pub source_batches_per_sec: f64,
    /// New categories one producer may introduce per hour; 0: unlimited.
    pub new_categories_per_hour: u32,
    /// New (category, entity) series one producer may introduce per hour; 0: unlimited.
    pub new_entities_per_hour: u32,
    /// New series of every kind one source address (IPv6: per /64) may introduce per hour,
    /// whatever keys it signs with; 0: unlimited.
    pub source_new_series_per_hour: u32,
    /// Most series the node holds; batches that would add more are refused. 0: unlimited.
    pub max_series: u64,
    /// Most `Idempotency-Key` requests the node remembers at once (each is a seen-set held
    /// until `max_lateness` plus the margin has passed); new keyed requests past it get 429
    /// `idempotency_keys_full`. 0: unlimited.
    pub max_idempotency_keys: u64,
    /// Per-category `[min, max]` bounds on values (`"*"`: every category without its own).
    pub value_bounds: BTreeMap<String, [f64; 2]>,
    /// Refuse batches from producers found equivocating (two contents under one batch id,
    /// PROTOCOL.md §9) with `Nack equivocated`. The list is kept in the data directory.
    pub refuse_equivocators: bool,
    /// Serve the HTTP API over TLS (the node's certificate, or `tls_cert`/`tls_key`).
    pub http_tls: bool,
    /// Bearer tokens that may read (queries, status, metrics). None listed: reads are open.
    pub read_tokens: Vec<String>,
    /// Bearer tokens that may write (`POST /v1/events`). None listed: writes are open.
    pub write_tokens: Vec<String>,
    /// Origins browsers may call the API from (CORS); `["*"]`: any.
    pub cors_origins: Vec<String>,
    /// The shard-group topology file (TOML, [`edgetally_proto::topology::Topology`]),
    /// re-read when it changes or on SIGHUP. None: this node is the whole cluster.
    pub topology_file: Option<PathBuf>,
    /// The name of this node's group in the topology (required with `topology_file`).
    pub group: Option<String>,
    /// A node lacking more batches than this from a peer, after a pull round, catches up from
    /// the peer's snapshot instead of verifying every missing batch.
    pub snapshot_catch_up_batches: u64,
    /// How long a cluster-wide query waits for the other groups, ms; a group that has not
    /// answered by then is reported missing and the answer is marked partial.
    pub query_deadline_ms: u64,
    /// Export closed buckets to this PostgreSQL database (`postgresql://user@host:port/db`).
    pub export_postgres_url: Option<String>,
    /// Verify the export database's certificate (chain and host name) against these root
    /// certificates (PEM). Without it a TLS connection (the URL's `sslmode`, `prefer` by
    /// default) is encrypted but not authenticated, as libpq's `sslmode=require` is.
    pub export_postgres_ca: Option<PathBuf>,
    /// The table the export writes (created if missing).
    pub export_table: String,
    /// The exported bucket width, ms: 60000 (minutes) or 3600000 (hours).
    pub export_bucket_ms: i64,
    /// How long after a bucket's end it is first exported, ms.
    pub export_delay_ms: i64,
    /// How often the exporter runs, ms.
    pub export_interval_ms: u64,
}

/// Which producers a merger admits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProducerPolicy {
    /// Every key (a loopback demo's default).
    #[default]
    Open,
    /// The keys listed in `producer_allowlist`.
    Allowlist,
    /// Keys enrolled by a credential from one of `issuer_keys`.
    Enrolled,
}

impl ProducerPolicy {
    /// The name used in configuration and `/v1/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProducerPolicy::Open => "open",
            ProducerPolicy::Allowlist => "allowlist",
            ProducerPolicy::Enrolled => "enrolled",
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./edgetally-data"),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 7070)),
            quic_addr: SocketAddr::from(([127, 0, 0, 1], 7071)),
            tls_cert: None,
            tls_key: None,
            limits: Limits::default(),
            retention: Retention::default(),
            queue_depth: 8192,
            max_group: 1024,
            snapshot_interval_secs: 30,
            peers: Vec::new(),
            cluster_secret: None,
            peer_keys: Vec::new(),
            sync_interval_ms: 500,
            peer_horizon_secs: 600,
            seen_expiry_margin_ms: 3_600_000,
            store_cache_mb: 64,
            producer_policy: ProducerPolicy::Open,
            producer_allowlist: None,
            issuer_keys: Vec::new(),
            producer_batches_per_sec: 100.0,
            producer_summaries_per_sec: 200_000.0,
            source_batches_per_sec: 1_000.0,
            new_categories_per_hour: 1_000,
            new_entities_per_hour: 100_000,
            source_new_series_per_hour: 100_000,
            max_series: 2_000_000,
            max_idempotency_keys: 500_000,
            value_bounds: BTreeMap::new(),
            refuse_equivocators: true,
            http_tls: false,
            read_tokens: Vec::new(),
            write_tokens: Vec::new(),
            cors_origins: vec!["*".into()],
            topology_file: None,
            group: None,
            query_deadline_ms: 2_000,
            snapshot_catch_up_batches: 10_000,
            export_postgres_url: None,
            export_postgres_ca: None,
            export_table: "edgetally_buckets".into(),
            export_bucket_ms: 60_000,
            export_delay_ms: 10_000,
            export_interval_ms: 5_000,
        }
    }
}

/// The TOML file's shape. Every key is optional. A duration is a number in the unit its key
/// names (`max_lateness_ms = 604800000`) or text with units, under that key or the key
/// without its unit (`max_lateness = "7d"`, `sync_interval = "500ms"`, `"1h 30m"`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Config::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`Config::http_addr`].
    #[serde(default, deserialize_with = "address::one")]
    pub http_addr: Option<SocketAddr>,
    /// See [`Config::quic_addr`].
    #[serde(default, deserialize_with = "address::one")]
    pub quic_addr: Option<SocketAddr>,
    /// See [`Config::tls_cert`].
    pub tls_cert: Option<PathBuf>,
    /// See [`Config::tls_key`].
    pub tls_key: Option<PathBuf>,
    /// Bytes.
    pub max_payload_bytes: Option<usize>,
    /// Per batch.
    pub max_summaries: Option<usize>,
    /// Per batch.
    pub max_categories: Option<usize>,
    /// Per batch.
    pub max_entities: Option<usize>,
    /// Milliseconds.
    #[serde(default, alias = "max_lateness", deserialize_with = "duration::ms")]
    pub max_lateness_ms: Option<i64>,
    /// Milliseconds.
    #[serde(default, alias = "max_future_skew", deserialize_with = "duration::ms")]
    pub max_future_skew_ms: Option<i64>,
    /// Milliseconds; 0 keeps forever.
    #[serde(
        default,
        alias = "retention_seconds_tier",
        deserialize_with = "duration::ms"
    )]
    pub retention_seconds_tier_ms: Option<i64>,
    /// Milliseconds; 0 keeps forever.
    #[serde(
        default,
        alias = "retention_minutes_tier",
        deserialize_with = "duration::ms"
    )]
    pub retention_minutes_tier_ms: Option<i64>,
    /// Milliseconds; 0 keeps forever.
    #[serde(
        default,
        alias = "retention_hours_tier",
        deserialize_with = "duration::ms"
    )]
    pub retention_hours_tier_ms: Option<i64>,
    /// See [`Config::queue_depth`].
    pub queue_depth: Option<usize>,
    /// See [`Config::max_group`].
    pub max_group: Option<usize>,
    /// See [`Config::snapshot_interval_secs`].
    #[serde(
        default,
        alias = "snapshot_interval",
        deserialize_with = "duration::secs"
    )]
    pub snapshot_interval_secs: Option<u64>,
    /// See [`Config::peers`].
    #[serde(default, deserialize_with = "address::list")]
    pub peers: Option<Vec<SocketAddr>>,
    /// See [`Config::cluster_secret`].
    pub cluster_secret: Option<String>,
    /// See [`Config::peer_keys`].
    pub peer_keys: Option<Vec<String>>,
    /// See [`Config::sync_interval_ms`].
    #[serde(default, alias = "sync_interval", deserialize_with = "duration::ms_u")]
    pub sync_interval_ms: Option<u64>,
    /// See [`Config::peer_horizon_secs`].
    #[serde(default, alias = "peer_horizon", deserialize_with = "duration::secs")]
    pub peer_horizon_secs: Option<u64>,
    /// See [`Config::seen_expiry_margin_ms`].
    #[serde(
        default,
        alias = "seen_expiry_margin",
        deserialize_with = "duration::ms"
    )]
    pub seen_expiry_margin_ms: Option<i64>,
    /// See [`Config::store_cache_mb`].
    pub store_cache_mb: Option<usize>,
    /// See [`Config::producer_policy`].
    pub producer_policy: Option<ProducerPolicy>,
    /// See [`Config::producer_allowlist`].
    pub producer_allowlist: Option<PathBuf>,
    /// See [`Config::issuer_keys`].
    pub issuer_keys: Option<Vec<String>>,
    /// See [`Config::producer_batches_per_sec`].
    pub producer_batches_per_sec: Option<f64>,
    /// See [`Config::producer_summaries_per_sec`].
    pub producer_summaries_per_sec: Option<f64>,
    /// See [`Config::source_batches_per_sec`].
    pub source_batches_per_sec: Option<f64>,
    /// See [`Config::new_categories_per_hour`].
    pub new_categories_per_hour: Option<u32>,
    /// See [`Config::new_entities_per_hour`].
    pub new_entities_per_hour: Option<u32>,
    /// See [`Config::source_new_series_per_hour`].
    pub source_new_series_per_hour: Option<u32>,
    /// See [`Config::max_series`].
    pub max_series: Option<u64>,
    /// See [`Config::max_idempotency_keys`].
    pub max_idempotency_keys: Option<u64>,
    /// See [`Config::value_bounds`].
    pub value_bounds: Option<BTreeMap<String, [f64; 2]>>,
    /// See [`Config::refuse_equivocators`].
    pub refuse_equivocators: Option<bool>,
    /// See [`Config::http_tls`].
    pub http_tls: Option<bool>,
    /// See [`Config::read_tokens`].
    pub read_tokens: Option<Vec<String>>,
    /// See [`Config::write_tokens`].
    pub write_tokens: Option<Vec<String>>,
    /// See [`Config::cors_origins`].
    pub cors_origins: Option<Vec<String>>,
    /// See [`Config::topology_file`].
    pub topology_file: Option<PathBuf>,
    /// See [`Config::group`].
    pub group: Option<String>,
    /// See [`Config::query_deadline_ms`].
    #[serde(default, alias = "query_deadline", deserialize_with = "duration::ms_u")]
    pub query_deadline_ms: Option<u64>,
    /// See [`Config::snapshot_catch_up_batches`].
    pub snapshot_catch_up_batches: Option<u64>,
    /// See [`Config::export_postgres_url`].
    pub export_postgres_url: Option<String>,
    /// See [`Config::export_postgres_ca`].
    pub export_postgres_ca: Option<PathBuf>,
    /// See [`Config::export_table`].
    pub export_table: Option<String>,
    /// See [`Config::export_bucket_ms`].
    #[serde(default, alias = "export_bucket", deserialize_with = "duration::ms")]
    pub export_bucket_ms: Option<i64>,
    /// See [`Config::export_delay_ms`].
    #[serde(default, alias = "export_delay", deserialize_with = "duration::ms")]
    pub export_delay_ms: Option<i64>,
    /// See [`Config::export_interval_ms`].
    #[serde(
        default,
        alias = "export_interval",
        deserialize_with = "duration::ms_u"
    )]
    pub export_interval_ms: Option<u64>,
}

/// A configuration error, naming the source and key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// `EDGETALLY_*` variables that are not settings: the config file's path, the log
    /// filter and format, the query tool's node and token, and the test suites' own knobs.
    pub const OTHER_VARIABLES: &'static [&'static str] = &[
        "CONFIG",
        "LOG",
        "NODE",
        "TOKEN",
        "LOG_FORMAT",
        "BIN",
        "REQUIRE_TOOLS",
        "TEST_LOG",
        "SIM_SEED",
        "SIM_SCALE",
        "GROUPS_SIM_SEED",
        "CLUSTER_SEEDS",
        "WRITE_SIG_VECTORS",
        "PRINT_VECTORS",
        "BLESS",
    ];
}

impl FileConfig {
    /// The duration keys' names without their unit (`max_lateness = "7d"`).
    pub const DURATION_ALIASES: &'static [&'static str] = &[
        "max_lateness",
        "max_future_skew",
        "retention_seconds_tier",
        "retention_minutes_tier",
        "retention_hours_tier",
        "snapshot_interval",
        "sync_interval",
        "peer_horizon",
        "seen_expiry_margin",
        "query_deadline",
        "export_bucket",
        "export_delay",
        "export_interval",
    ];

    /// Every key of the file (and, upper-cased after `EDGETALLY_`, of the environment).
    pub const KEYS: &'static [&'static str] = &[
        "data_dir",
        "http_addr",
        "quic_addr",
        "tls_cert",
        "tls_key",
        "max_payload_bytes",
        "max_summaries",
        "max_categories",
        "max_entities",
        "max_lateness_ms",
        "max_future_skew_ms",
        "retention_seconds_tier_ms",
        "retention_minutes_tier_ms",
        "retention_hours_tier_ms",
        "queue_depth",
        "max_group",
        "snapshot_interval_secs",
        "peers",
        "cluster_secret",
        "peer_keys",
        "sync_interval_ms",
        "peer_horizon_secs",
        "seen_expiry_margin_ms",
        "store_cache_mb",
        "producer_policy",
        "producer_allowlist",
        "issuer_keys",
        "producer_batches_per_sec",
        "producer_summaries_per_sec",
        "source_batches_per_sec",
        "new_categories_per_hour",
        "new_entities_per_hour",
        "source_new_series_per_hour",
        "max_series",
        "max_idempotency_keys",
        "value_bounds",
        "refuse_equivocators",
        "http_tls",
        "read_tokens",
        "write_tokens",
        "cors_origins",
        "topology_file",
        "group",
        "query_deadline_ms",
        "snapshot_catch_up_batches",
        "export_postgres_url",
        "export_postgres_ca",
        "export_table",
        "export_bucket_ms",
        "export_delay_ms",
        "export_interval_ms",
    ];
}

impl Config {
    /// Applies a TOML document.
    pub fn apply_toml(&mut self, text: &str) -> Result<(), ConfigError> {
        let f: FileConfig =
            toml::from_str(text).map_err(|e| ConfigError(format!("config file: {e}")))?;
        self.apply(f);
        Ok(())
    }

    /// Applies `EDGETALLY_<KEY>` variables (upper-case TOML keys, durations also without
    /// their unit as in the file; lists are comma-separated). Returns a warning for each
    /// `EDGETALLY_*` variable that is neither a setting nor one of the tools' own
    /// ([`Config::OTHER_VARIABLES`]); an error names the variable.
    pub fn apply_env(
        &mut self,
        vars: impl Iterator<Item = (String, String)>,
    ) -> Result<Vec<String>, ConfigError> {
        let mut warnings = Vec::new();
        for (k, v) in vars {
            let Some(name) = k.strip_prefix("EDGETALLY_") else {
                continue;
            };
            let key = name.to_ascii_lowercase();
            if !FileConfig::KEYS.contains(&key.as_str())
                && !FileConfig::DURATION_ALIASES.contains(&key.as_str())
            {
                if !Config::OTHER_VARIABLES.contains(&name) {
                    let near = FileConfig::KEYS
                        .iter()
                        .chain(FileConfig::DURATION_ALIASES)
                        .min_by_key(|known| strsim::levenshtein(known, &key))
                        .filter(|known| strsim::levenshtein(known, &key) <= 3)
                        .map(|known| {
                            format!(" (did you mean EDGETALLY_{}?)", known.to_ascii_uppercase())
                        })
                        .unwrap_or_default();
                    warnings.push(format!("{k} is not a setting and is ignored{near}"));
                }
                continue;
            }
            use toml::Value;
            let value = match key.as_str() {
                "data_dir"
                | "http_addr"
                | "quic_addr"
                | "tls_cert"
                | "tls_key"
                | "cluster_secret"
                | "producer_policy"
                | "producer_allowlist"
                | "topology_file"
                | "group"
                | "export_postgres_url"
                | "export_postgres_ca"
                | "export_table" => Value::String(v.clone()),
                "peers" | "peer_keys" | "issuer_keys" | "read_tokens" | "write_tokens"
                | "cors_origins" => Value::Array(
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| Value::String(s.into()))
                        .collect(),
                ),
                // A number, a boolean, a table: read as TOML; anything else as a string, so
                // `7d` is a duration and `many` a type error rather than a syntax error.
                _ => toml::from_str::<toml::Table>(&format!("x = {v}"))
                    .ok()
                    .and_then(|mut t| t.remove("x"))
                    .unwrap_or_else(|| Value::String(v.clone())),
            };
            let f = FileConfig::deserialize(Value::Table([(key, value)].into_iter().collect()))
                .map_err(|e| ConfigError(format!("{k}={v:?}: {e}")))?;
            self.apply(f);
        }
        Ok(warnings)
    }

    fn apply(&mut self, f: FileConfig) {
        let keep = |v: i64| if v == 0 { None } else { Some(v) };
        macro_rules! set {
            ($($src:ident => $dst:expr),* $(,)?) => { $( if let Some(v) = f.$src { $dst = v; } )* };
        }
        set! {
            data_dir => self.data_dir,
            http_addr => self.http_addr,
            quic_addr => self.quic_addr,
            max_payload_bytes => self.limits.max_payload_bytes,
            max_summaries => self.limits.max_summaries,
            max_categories => self.limits.max_categories,
            max_entities => self.limits.max_entities,
            max_lateness_ms => self.limits.max_lateness_ms,
            max_future_skew_ms => self.limits.max_future_skew_ms,
            queue_depth => self.queue_depth,
            max_group => self.max_group,
            snapshot_interval_secs => self.snapshot_interval_secs,
            peers => self.peers,
            peer_keys => self.peer_keys,
            sync_interval_ms => self.sync_interval_ms,
            peer_horizon_secs => self.peer_horizon_secs,
            seen_expiry_margin_ms => self.seen_expiry_margin_ms,
            store_cache_mb => self.store_cache_mb,
            producer_policy => self.producer_policy,
            issuer_keys => self.issuer_keys,
            producer_batches_per_sec => self.producer_batches_per_sec,
            producer_summaries_per_sec => self.producer_summaries_per_sec,
            source_batches_per_sec => self.source_batches_per_sec,
            new_categories_per_hour => self.new_categories_per_hour,
            new_entities_per_hour => self.new_entities_per_hour,
            source_new_series_per_hour => self.source_new_series_per_hour,
            max_series => self.max_series,
            max_idempotency_keys => self.max_idempotency_keys,
            value_bounds => self.value_bounds,
            refuse_equivocators => self.refuse_equivocators,
            http_tls => self.http_tls,
            read_tokens => self.read_tokens,
            write_tokens => self.write_tokens,
            cors_origins => self.cors_origins,
            query_deadline_ms => self.query_deadline_ms,
            snapshot_catch_up_batches => self.snapshot_catch_up_batches,
            export_table => self.export_table,
            export_bucket_ms => self.export_bucket_ms,
            export_delay_ms => self.export_delay_ms,
            export_interval_ms => self.export_interval_ms,
        }
        if let Some(v) = f.export_postgres_url {
            self.export_postgres_url = Some(v);
        }
        if let Some(v) = f.export_postgres_ca {
            self.export_postgres_ca = Some(v);
        }
        if let Some(v) = f.topology_file {
            self.topology_file = Some(v);
        }
        if let Some(v) = f.group {
            self.group = Some(v);
        }
        if let Some(v) = f.producer_allowlist {
            self.producer_allowlist = Some(v);
        }
        if let Some(v) = f.cluster_secret {
            self.cluster_secret = Some(v);
        }
        if let Some(v) = f.tls_cert {
            self.tls_cert = Some(v);
        }
        if let Some(v) = f.tls_key {
            self.tls_key = Some(v);
        }
        for (i, v) in [
            f.retention_seconds_tier_ms,
            f.retention_minutes_tier_ms,
            f.retention_hours_tier_ms,
        ]
        .into_iter()
        .enumerate()
        {
            if let Some(v) = v {
                self.retention.tiers[i] = keep(v);
            }
        }
    }
}

/// `ip:port` or `host:port`. A host name resolves to its first IPv4 address if it has one
/// (the loopback defaults are IPv4; `localhost` often lists `::1` first), else to its first
/// address. The command line's address flags take the same.
pub fn resolve_addr(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    if !s.contains(':') {
        return Err(format!(
            "{s:?} has no port: write host:port, e.g. 127.0.0.1:7071"
        ));
    }
    let all: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("{s:?} does not resolve: {e}"))?
        .collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// Addresses in configuration, through [`resolve_addr`].
mod address {
    use serde::de::{Deserialize, Deserializer, Error};
    use std::net::SocketAddr;

    pub fn one<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let s = String::deserialize(d)?;
        super::resolve_addr(&s).map(Some).map_err(D::Error::custom)
    }

    pub fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<SocketAddr>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| super::resolve_addr(s))
            .collect::<Result<_, _>>()
            .map(Some)
            .map_err(D::Error::custom)
    }
}

/// Durations in configuration: a number in the key's unit, or text with units.
mod duration {
    use serde::de::{Deserializer, Error, Visitor};

    struct Humane(u64);

    impl Visitor<'_> for Humane {
        type Value = i64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let unit = if self.0 == 1 {
                "milliseconds"
            } else {
                "seconds"
            };
            write!(
                f,
                "a number of {unit} or a duration such as \"7d\", \"30s\", \"1h 30m\""
            )
        }
        fn visit_i64<E: Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::custom(format!("{v} is too large")))
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<i64, E> {
            let d = humantime::parse_duration(v.trim()).map_err(|e| {
                E::custom(format!(
                    "{v:?} is not a duration ({e}); write e.g. \"7d\", \"30s\", \"1h 30m\", \"250ms\""
                ))
            })?;
            let ms = d.as_millis();
            if ms % u128::from(self.0) != 0 {
                return Err(E::custom(format!("{v:?} is not a whole number of seconds")));
            }
            i64::try_from(ms / u128::from(self.0))
                .map_err(|_| E::custom(format!("{v:?} is too long")))
        }
    }

    pub fn ms<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        d.deserialize_any(Humane(1)).map(Some)
    }

    pub fn ms_u<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        non_negative(d.deserialize_any(Humane(1))?)
    }

    pub fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        non_negative(d.deserialize_any(Humane(1000))?)
    }

    fn non_negative<E: Error>(v: i64) -> Result<Option<u64>, E> {
        u64::try_from(v)
            .map(Some)
            .map_err(|_| E::custom(format!("{v} is negative")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env_override_defaults() {
        let mut c = Config::default();
        c.apply_toml(
            "http_addr = \"127.0.0.1:9000\"\nmax_summaries = 5\nretention_hours_tier_ms = 1000\n",
        )
        .expect("toml");
        c.apply_env(
            [
                (
                    "EDGETALLY_HTTP_ADDR".to_string(),
                    "127.0.0.1:9001".to_string(),
                ),
                ("EDGETALLY_PEERS".into(), "127.0.0.1:1, 127.0.0.1:2".into()),
                ("OTHER".into(), "x".into()),
                // Not a setting: ignored, whatever its value.
                ("EDGETALLY_TEST_LOG".into(), "a::b=debug".into()),
            ]
            .into_iter(),
        )
        .expect("env");
        assert_eq!(c.http_addr, "127.0.0.1:9001".parse().expect("addr"));
        assert_eq!(c.limits.max_summaries, 5);
        assert_eq!(c.retention.tiers[2], Some(1000));
        assert_eq!(c.peers.len(), 2);
        assert!(c.apply_toml("nonsense = 1").is_err());
        let err = c
            .apply_env([("EDGETALLY_QUEUE_DEPTH".to_string(), "many".to_string())].into_iter())
            .expect_err("not a number");
        assert!(
            err.0
                .starts_with("EDGETALLY_QUEUE_DEPTH=\"many\": invalid type"),
            "{err}"
        );
    }

    #[test]
    fn durations_take_units_in_the_file_and_the_environment() {
        let mut c = Config::default();
        c.apply_toml(
            "max_lateness = \"2d 12h\"\nmax_future_skew_ms = \"90s\"\nsync_interval = \"250ms\"\n\
             snapshot_interval_secs = \"2m\"\npeer_horizon = 60\nretention_hours_tier = \"30d\"\n",
        )
        .expect("toml");
        assert_eq!(c.limits.max_lateness_ms, 60 * 3_600_000);
        assert_eq!(c.limits.max_future_skew_ms, 90_000);
        assert_eq!(c.sync_interval_ms, 250);
        assert_eq!(c.snapshot_interval_secs, 120);
        assert_eq!(c.peer_horizon_secs, 60);
        assert_eq!(c.retention.tiers[2], Some(30 * 86_400_000));
        let warnings = c
            .apply_env(
                [
                    ("EDGETALLY_MAX_LATENESS".to_string(), "7d".to_string()),
                    ("EDGETALLY_QUERY_DEADLINE_MS".into(), "1500".into()),
                    ("EDGETALLY_SEEN_EXPIRY_MARGIN".into(), "1h".into()),
                ]
                .into_iter(),
            )
            .expect("env");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(c.limits.max_lateness_ms, 7 * 86_400_000);
        assert_eq!(c.query_deadline_ms, 1500);
        assert_eq!(c.seen_expiry_margin_ms, 3_600_000);
        for (text, why) in [
            (
                "snapshot_interval = \"1500ms\"",
                "not a whole number of seconds",
            ),
            ("max_lateness = \"7 fortnights\"", "is not a duration"),
            ("sync_interval_ms = -5", "is negative"),
            (
                "max_lateness = \"7d\"\nmax_lateness_ms = 5",
                "duplicate field",
            ),
        ] {
            let err = c.apply_toml(text).expect_err(text).to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn addresses_take_host_names() {
        let mut c = Config::default();
        c.apply_toml("quic_addr = \"localhost:9071\"\npeers = [\"localhost:1\", \"[::1]:2\"]\n")
            .expect("toml");
        assert_eq!(c.quic_addr, "127.0.0.1:9071".parse().expect("addr"));
        assert_eq!(
            c.peers,
            [
                "127.0.0.1:1".parse().expect("addr"),
                "[::1]:2".parse().expect("addr")
            ]
        );
        c.apply_env([("EDGETALLY_PEERS".to_string(), "localhost:3".to_string())].into_iter())
            .expect("env");
        assert_eq!(c.peers, ["127.0.0.1:3".parse().expect("addr")]);
        let err = c
            .apply_toml("http_addr = \"localhost\"")
            .expect_err("no port");
        assert!(err.to_string().contains("has no port"), "{err}");
    }

    #[test]
    fn an_unknown_variable_is_a_warning_with_a_suggestion() {
        let mut c = Config::default();
        let warnings = c
            .apply_env(
                [
                    ("EDGETALLY_MAX_LATENES_MS".to_string(), "5".to_string()),
                    ("EDGETALLY_WHATEVER".into(), "1".into()),
                    ("EDGETALLY_LOG".into(), "debug".into()),
                    ("EDGETALLY_NODE".into(), "http://x".into()),
                ]
                .into_iter(),
            )
            .expect("env");
        assert_eq!(
            warnings,
            [
                "EDGETALLY_MAX_LATENES_MS is not a setting and is ignored (did you mean EDGETALLY_MAX_LATENESS_MS?)",
                "EDGETALLY_WHATEVER is not a setting and is ignored",
            ]
        );
        assert_eq!(c, Config::default());
    }

    /// `KEYS` and `DURATION_ALIASES` are exactly the names serde accepts (its unknown-field
    /// error lists them).
    #[test]
    fn keys_are_the_file_fields() {
        let err = toml::from_str::<FileConfig>("zzz = 1")
            .expect_err("unknown key")
            .to_string();
        let mut listed: Vec<&str> = err.split('`').skip(3).step_by(2).collect();
        let mut known: Vec<&str> = [FileConfig::KEYS, FileConfig::DURATION_ALIASES].concat();
        listed.sort_unstable();
        known.sort_unstable();
        assert_eq!(listed, known, "{err}");
    }

    /// The example file in `deploy/` applies as it is and with every commented setting
    /// uncommented (`# key = value` lines): none is misspelt or of the wrong form.
    #[test]
    fn the_deploy_example_and_its_commented_settings_apply() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/edgetally.toml");
        let text = std::fs::read_to_string(path).expect("deploy/edgetally.toml");
        let mut c = Config::default();
        c.apply_toml(&text).expect("as shipped");
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest
                        .split_once(" = ")
                        .is_some_and(|(k, _)| !k.contains(' ')) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert_ne!(uncommented, text, "no commented setting found");
        let mut c = Config::default();
        c.apply_toml(&uncommented)
            .unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        assert!(c.export_postgres_ca.is_some() && c.cluster_secret.is_some());
    }
}
