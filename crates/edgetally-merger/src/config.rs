//! Node configuration: embedded defaults, overridden by a TOML file, then `EDGETALLY_*`
//! environment variables, then command-line flags (the binary applies those last).

use edgetally_core::{Limits, Retention};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything a merger needs to run. `Config::default()` is a working loopback node; each
/// setting's meaning is written once, in the settings table (`settings!` below, [`settings`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The `data_dir` setting (see [`settings`]).
    pub data_dir: PathBuf,
    /// The `http_addr` setting (see [`settings`]).
    pub http_addr: SocketAddr,
    /// The `quic_addr` setting (see [`settings`]).
    pub quic_addr: SocketAddr,
    /// The `tls_cert` setting (see [`settings`]).
    pub tls_cert: Option<PathBuf>,
    /// The `tls_key` setting (see [`settings`]).
    pub tls_key: Option<PathBuf>,
    /// Batch limits.
    pub limits: Limits,
    /// Tier retention.
    pub retention: Retention,
    /// The `queue_depth` setting (see [`settings`]).
    pub queue_depth: usize,
    /// The `max_group` setting (see [`settings`]).
    pub max_group: usize,
    /// The `verify_threads` setting (see [`settings`]).
    pub verify_threads: usize,
    /// The `snapshot_interval_secs` setting (see [`settings`]).
    pub snapshot_interval_secs: u64,
    /// The `peers` setting (see [`settings`]).
    pub peers: Vec<SocketAddr>,
    /// The `cluster_secret` setting (see [`settings`]).
    pub cluster_secret: Option<String>,
    /// The `peer_keys` setting (see [`settings`]).
    pub peer_keys: Vec<String>,
    /// The `sync_interval_ms` setting (see [`settings`]).
    pub sync_interval_ms: u64,
    /// The `peer_horizon_secs` setting (see [`settings`]).
    pub peer_horizon_secs: u64,
    /// The `seen_expiry_margin_ms` setting (see [`settings`]).
    pub seen_expiry_margin_ms: i64,
    /// The `store_cache_mb` setting (see [`settings`]).
    pub store_cache_mb: usize,
    /// The `producer_policy` setting (see [`settings`]).
    pub producer_policy: ProducerPolicy,
    /// The `producer_allowlist` setting (see [`settings`]).
    pub producer_allowlist: Option<PathBuf>,
    /// The `issuer_keys` setting (see [`settings`]).
    pub issuer_keys: Vec<String>,
    /// The `producer_batches_per_sec` setting (see [`settings`]).
    pub producer_batches_per_sec: f64,
    /// The `producer_summaries_per_sec` setting (see [`settings`]).
    pub producer_summaries_per_sec: f64,
    /// The `source_batches_per_sec` setting (see [`settings`]).
    pub source_batches_per_sec: f64,
    /// The `new_categories_per_hour` setting (see [`settings`]).
    pub new_categories_per_hour: u32,
    /// The `new_entities_per_hour` setting (see [`settings`]).
    pub new_entities_per_hour: u32,
    /// The `source_new_series_per_hour` setting (see [`settings`]).
    pub source_new_series_per_hour: u32,
    /// The `max_series` setting (see [`settings`]).
    pub max_series: u64,
    /// The `max_idempotency_keys` setting (see [`settings`]).
    pub max_idempotency_keys: u64,
    /// The `value_bounds` setting (see [`settings`]).
    pub value_bounds: BTreeMap<String, [f64; 2]>,
    /// The `sketch_max_precision` setting (see [`settings`]).
    pub sketch_max_precision: BTreeMap<String, u32>,
    /// The `max_sketch_bytes` setting (see [`settings`]).
    pub max_sketch_bytes: u64,
    /// The `retention_sketch_minutes_ms` and `retention_sketch_hours_ms` settings (see
    /// [`settings`]): per sketch tier, how long its buckets are kept (`None`: as long as the
    /// totals').
    pub sketch_retention: [Option<i64>; 2],
    /// The `quantile_categories` setting (see [`settings`]).
    pub quantile_categories: Vec<String>,
    /// The `subject_key` setting (see [`settings`]).
    pub subject_key: Option<String>,
    /// The `refuse_equivocators` setting (see [`settings`]).
    pub refuse_equivocators: bool,
    /// The `http_tls` setting (see [`settings`]).
    pub http_tls: bool,
    /// The `read_tokens` setting (see [`settings`]).
    pub read_tokens: Vec<String>,
    /// The `write_tokens` setting (see [`settings`]).
    pub write_tokens: Vec<String>,
    /// The `cors_origins` setting (see [`settings`]).
    pub cors_origins: Vec<String>,
    /// The `topology_file` setting (see [`settings`]).
    pub topology_file: Option<PathBuf>,
    /// The `group` setting (see [`settings`]).
    pub group: Option<String>,
    /// The `snapshot_catch_up_batches` setting (see [`settings`]).
    pub snapshot_catch_up_batches: u64,
    /// The `query_deadline_ms` setting (see [`settings`]).
    pub query_deadline_ms: u64,
    /// The `export_postgres_url` setting (see [`settings`]).
    pub export_postgres_url: Option<String>,
    /// The `export_postgres_ca` setting (see [`settings`]).
    pub export_postgres_ca: Option<PathBuf>,
    /// The `export_table` setting (see [`settings`]).
    pub export_table: String,
    /// The `export_bucket_ms` setting (see [`settings`]).
    pub export_bucket_ms: i64,
    /// The `export_delay_ms` setting (see [`settings`]).
    pub export_delay_ms: i64,
    /// The `export_interval_ms` setting (see [`settings`]).
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
            verify_threads: 0,
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
            sketch_max_precision: BTreeMap::new(),
            max_sketch_bytes: 1 << 30,
            sketch_retention: [Some(2 * 86_400_000), Some(400 * 86_400_000)],
            quantile_categories: Vec::new(),
            subject_key: None,
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

/// The settings, each defined once: its TOML key (upper-cased after `EDGETALLY_`, its
/// environment variable), the form it is read in (the field type: [`Ms`], [`Secs`], [`Addr`]
/// … or the value's own type), the key without its unit a duration also takes, where it goes
/// in [`Config`] (whose `Default` holds the defaults), and its help text. From this one table
/// come [`FileConfig`], [`FileConfig::KEYS`], [`FileConfig::DURATION_ALIASES`], the
/// environment's parsing, [`Config::apply`] and [`settings`] (the README's settings table is
/// checked against it). The command line's flags are checked against it too
/// (`crates/edgetally`).
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])+
        $key:ident: $ty:ty $(, alias $alias:literal)? => $how:ident($($dst:tt)+);
    )+) => {
        /// The TOML file's shape (and the environment's, one key at a time). Every key is
        /// optional. A duration is a number in the unit its key names
        /// (`max_lateness_ms = 604800000`) or text with units, under that key or the key
        /// without its unit (`max_lateness = "7d"`, `sync_interval = "500ms"`, `"1h 30m"`).
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct FileConfig {
            $(
                $(#[doc = $doc])+
                #[serde(default $(, alias = $alias)?)]
                pub $key: Option<$ty>,
            )+
        }

        impl FileConfig {
            /// Every key of the file (and, upper-cased after `EDGETALLY_`, of the environment).
            pub const KEYS: &'static [&'static str] = &[$(stringify!($key),)+];
            /// The duration keys' names without their unit (`max_lateness = "7d"`).
            pub const DURATION_ALIASES: &'static [&'static str] = &[$($($alias,)?)+];

            /// How the environment's value for `key` is read.
            fn env_form(key: &str) -> Option<EnvForm> {
                match key {
                    $(stringify!($key) $(| $alias)? => Some(<$ty as Setting>::ENV),)+
                    _ => None,
                }
            }
        }

        impl Config {
            fn apply(&mut self, f: FileConfig) {
                $( if let Some(v) = f.$key { settings!(@set self, Setting::value(v), $how($($dst)+)); } )+
            }
        }

        /// Every setting with its default (as [`Config::default`] holds it), unit and help.
        pub fn settings() -> Vec<SettingDoc> {
            let c = Config::default();
            vec![$(SettingDoc {
                key: stringify!($key),
                alias: settings!(@alias $($alias)?),
                unit: <$ty as Setting>::UNIT,
                default: settings!(@get c, $how($($dst)+)),
                help: concat!($($doc, "\n"),+),
            },)+]
        }
    };
    (@set $c:ident, $v:expr, set($($f:ident).+)) => { $c.$($f).+ = $v };
    (@set $c:ident, $v:expr, some($($f:ident).+)) => { $c.$($f).+ = Some($v) };
    // A retention tier: 0 keeps forever.
    (@set $c:ident, $v:expr, tier($i:literal)) => {{
        let v: i64 = $v;
        $c.retention.tiers[$i] = if v == 0 { None } else { Some(v) };
    }};
    (@get $c:ident, set($($f:ident).+)) => { Show::show(&$c.$($f).+) };
    (@get $c:ident, some($($f:ident).+)) => { Show::show(&$c.$($f).+) };
    (@get $c:ident, tier($i:literal)) => { Show::show(&$c.retention.tiers[$i].unwrap_or(0)) };
    // A sketch retention tier: 0 keeps as long as the totals.
    (@set $c:ident, $v:expr, sketch_tier($i:literal)) => {{
        let v: i64 = $v;
        $c.sketch_retention[$i] = if v == 0 { None } else { Some(v) };
    }};
    (@get $c:ident, sketch_tier($i:literal)) => { Show::show(&$c.sketch_retention[$i].unwrap_or(0)) };
    (@alias) => { None };
    (@alias $a:literal) => { Some($a) };
}

settings! {
    /// Where the store, node key and certificate live.
    data_dir: PathBuf => set(data_dir);
    /// The HTTP API's address (`ip:port` or `host:port`).
    http_addr: Addr => set(http_addr);
    /// The QUIC address: batches, WebTransport and peers (`ip:port` or `host:port`).
    quic_addr: Addr => set(quic_addr);
    /// A certificate chain (PEM) replacing the generated one; with `tls_key`.
    tls_cert: PathBuf => some(tls_cert);
    /// The private key (PEM) for `tls_cert`.
    tls_key: PathBuf => some(tls_key);
    /// The largest batch payload a producer may send, bytes.
    max_payload_bytes: usize => set(limits.max_payload_bytes);
    /// Most summaries in one batch.
    max_summaries: usize => set(limits.max_summaries);
    /// Most distinct categories in one batch.
    max_categories: usize => set(limits.max_categories);
    /// Most distinct entities in one batch.
    max_entities: usize => set(limits.max_entities);
    /// How long after its bucket's end a summary is still taken (`bucket_too_old` past it).
    max_lateness_ms: Ms, alias "max_lateness" => set(limits.max_lateness_ms);
    /// How far ahead of this node's clock a bucket may start (`future_timestamp` past it).
    max_future_skew_ms: Ms, alias "max_future_skew" => set(limits.max_future_skew_ms);
    /// How long one-second buckets are kept before they roll up into minutes; 0 keeps them.
    /// A coarser tier must be kept at least as long as a finer one, or `serve` refuses to
    /// start.
    retention_seconds_tier_ms: Ms, alias "retention_seconds_tier" => tier(0);
    /// How long minute buckets are kept before they roll up into hours (whole hours); 0
    /// keeps them.
    retention_minutes_tier_ms: Ms, alias "retention_minutes_tier" => tier(1);
    /// How long hour buckets are kept (whole hours); 0 keeps them forever.
    retention_hours_tier_ms: Ms, alias "retention_hours_tier" => tier(2);
    /// Batches waiting for the pipeline before new ones get `Retry`.
    queue_depth: usize => set(queue_depth);
    /// Most batches per group commit (one fsync).
    max_group: usize => set(max_group);
    /// Threads that decode and verify batches at once; 0: one per core the node may run on
    /// (`available_parallelism`, which honours CPU affinity and cgroup quotas).
    verify_threads: usize => set(verify_threads);
    /// How often the state is snapshotted and the batch log compacted.
    snapshot_interval_secs: Secs, alias "snapshot_interval" => set(snapshot_interval_secs);
    /// Peers' QUIC addresses: this node pulls from and pushes to each of them.
    peers: Addrs => set(peers);
    /// A secret the cluster shares: peers prove they know it (an HMAC over the TLS session's
    /// exported keying material). Peers need this or `peer_keys`.
    cluster_secret: String => some(cluster_secret);
    /// Node public keys (hex, as printed at `node:`) allowed to connect as peers; each proves
    /// its key by signing the TLS session's exported keying material.
    peer_keys: Vec<String> => set(peer_keys);
    /// How often each peer is asked for what this node lacks.
    sync_interval_ms: MsU, alias "sync_interval" => set(sync_interval_ms);
    /// A peer unreachable for longer than this stops holding back log pruning; when it
    /// returns it catches up from a snapshot.
    peer_horizon_secs: Secs, alias "peer_horizon" => set(peer_horizon_secs);
    /// How far past `max_lateness` an epoch's seen-set is kept before it expires: the margin
    /// that covers clock steps and a batch's time between its time check and its apply
    /// (docs/design/replication.md, "Seen-set expiry").
    seen_expiry_margin_ms: Ms, alias "seen_expiry_margin" => set(seen_expiry_margin_ms);
    /// The snapshot database's page cache (redb), MiB.
    store_cache_mb: usize => set(store_cache_mb);
    /// Which producers may send batches: `open`, `allowlist` or `enrolled`.
    producer_policy: ProducerPolicy => set(producer_policy);
    /// The allowlist file (one producer key per line), re-read when it changes.
    producer_allowlist: PathBuf => some(producer_allowlist);
    /// Issuer public keys (hex) whose credentials enrol producers.
    issuer_keys: Vec<String> => set(issuer_keys);
    /// Batches per second per producer key; 0: unlimited.
    producer_batches_per_sec: f64 => set(producer_batches_per_sec);
    /// Summaries per second per producer key; 0: unlimited.
    producer_summaries_per_sec: f64 => set(producer_summaries_per_sec);
    /// Batches per second per source address (IPv6: per /64); 0: unlimited.
    source_batches_per_sec: f64 => set(source_batches_per_sec);
    /// New categories one producer may introduce per hour; 0: unlimited.
    new_categories_per_hour: u32 => set(new_categories_per_hour);
    /// New (category, entity) series one producer may introduce per hour; 0: unlimited.
    new_entities_per_hour: u32 => set(new_entities_per_hour);
    /// New series of every kind one source address (IPv6: per /64) may introduce per hour,
    /// whatever keys it signs with; 0: unlimited.
    source_new_series_per_hour: u32 => set(source_new_series_per_hour);
    /// Most series the node holds (the last tenth kept for producers it already holds); 0:
    /// unlimited.
    max_series: u64 => set(max_series);
    /// Most `Idempotency-Key` requests remembered at once; new keyed requests past it get 429
    /// `idempotency_keys_full`. 0: unlimited.
    max_idempotency_keys: u64 => set(max_idempotency_keys);
    /// Per-category `[min, max]` bounds on values (`"*"`: every category without its own).
    value_bounds: BTreeMap<String, [f64; 2]> => set(value_bounds);
    /// Per-category cap on the precision (4–16) of the distinct-count sketches producers
    /// send (`"*"`: every category without its own); a batch with a finer one is refused with
    /// `sketch_limit`. Unset: 16, the format's largest.
    sketch_max_precision: BTreeMap<String, u32> => set(sketch_max_precision);
    /// Most bytes of sketches (distinct counts, quantiles) the node holds; past it, batches
    /// from producers that carry sketches are refused with `sketch_limit` (others are not).
    /// 0: unlimited.
    max_sketch_bytes: u64 => set(max_sketch_bytes);
    /// How long the minute buckets of sketches (distinct counts, quantiles) are kept, at most
    /// as long as the minute totals; longer ranges read the hour buckets. 0: as the totals.
    retention_sketch_minutes_ms: Ms, alias "retention_sketch_minutes" => sketch_tier(0);
    /// How long the hour buckets of sketches are kept (at least as long as their minute
    /// buckets); 0: as the totals.
    retention_sketch_hours_ms: Ms, alias "retention_sketch_hours" => sketch_tier(1);
    /// Categories whose `POST /v1/events` values also go into quantile sketches (`"*"`:
    /// every category), for `quantiles=` in queries.
    quantile_categories: Vec<String> => set(quantile_categories);
    /// The site secret keying the subject hash of `POST /v1/events` (32 hex digits; the SDKs'
    /// `subjectKey`); none: unkeyed. Producers and nodes of one site must use the same.
    subject_key: String => some(subject_key);
    /// Refuse batches from producers found equivocating (two contents under one batch id)
    /// with `Nack equivocated`.
    refuse_equivocators: bool => set(refuse_equivocators);
    /// Serve the HTTP API over TLS (the node's certificate, or `tls_cert` and `tls_key`).
    http_tls: bool => set(http_tls);
    /// Bearer tokens that may read (queries, status, metrics); none listed: reads are open.
    read_tokens: Vec<String> => set(read_tokens);
    /// Bearer tokens that may write (`POST /v1/events`); none listed: writes are open.
    write_tokens: Vec<String> => set(write_tokens);
    /// Origins browsers may call the API from (CORS); `*`: any.
    cors_origins: Vec<String> => set(cors_origins);
    /// The shard-group topology file (TOML), re-read when it changes or on SIGHUP; none:
    /// this node is the whole cluster.
    topology_file: PathBuf => some(topology_file);
    /// This node's group in the topology (required with `topology_file`).
    group: String => some(group);
    /// How long a cluster-wide query waits for the other groups; one that has not answered by
    /// then is reported missing and the answer marked partial.
    query_deadline_ms: MsU, alias "query_deadline" => set(query_deadline_ms);
    /// A node lacking more batches than this from a peer after a pull round catches up from
    /// the peer's snapshot instead of verifying every missing batch.
    snapshot_catch_up_batches: u64 => set(snapshot_catch_up_batches);
    /// Export closed buckets to this PostgreSQL database (`postgresql://user@host:port/db`).
    export_postgres_url: String => some(export_postgres_url);
    /// Verify the export database's certificate (chain and host name) against these root
    /// certificates (PEM).
    export_postgres_ca: PathBuf => some(export_postgres_ca);
    /// The table the export writes (created if missing).
    export_table: String => set(export_table);
    /// The exported bucket width: 1 minute or 1 hour.
    export_bucket_ms: Ms, alias "export_bucket" => set(export_bucket_ms);
    /// How long after a bucket's end it is first exported.
    export_delay_ms: Ms, alias "export_delay" => set(export_delay_ms);
    /// How often the exporter runs.
    export_interval_ms: MsU, alias "export_interval" => set(export_interval_ms);
}

/// The README's settings table (between `<!-- settings -->` and `<!-- /settings -->`),
/// generated from [`settings`]; a test keeps the README equal to it.
pub fn settings_table() -> String {
    let mut t = String::from(
        "| Setting (TOML key; environment `EDGETALLY_<KEY>`) | Default | What it does |\n|---|---|---|\n",
    );
    for d in settings() {
        let key = match d.alias {
            Some(a) => format!("`{}` or `{a}`", d.key),
            None => format!("`{}`", d.key),
        };
        let default = match (d.unit, d.default.parse::<u64>()) {
            ("ms", Ok(v)) if v > 0 => format!("{v} ({})", human_ms(v)),
            ("s", Ok(v)) if v > 0 => format!("{v} ({})", human_ms(v.saturating_mul(1000))),
            _ => d.default.clone(),
        };
        let help = d.help.split_whitespace().collect::<Vec<_>>().join(" ");
        t.push_str(&format!(
            "| {key} | `{}` | {} |\n",
            default.replace('|', "\\|"),
            help.replace('|', "\\|")
        ));
    }
    t
}

/// A duration in the largest unit that divides it: `7d`, `90d`, `10m`, `500ms`.
fn human_ms(ms: u64) -> String {
    [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1000, "s"),
    ]
    .into_iter()
    .find(|(u, _)| ms.is_multiple_of(*u))
    .map_or_else(
        || format!("{ms}ms"),
        |(u, name)| format!("{}{name}", ms / u),
    )
}

/// One setting as [`settings`] describes it.
#[derive(Clone, Debug)]
pub struct SettingDoc {
    /// The TOML key (`EDGETALLY_<KEY>` in the environment).
    pub key: &'static str,
    /// The duration key without its unit, if it has one.
    pub alias: Option<&'static str>,
    /// `ms`, `s` or empty.
    pub unit: &'static str,
    /// The default, as a TOML value would write it (`[]` for an empty list, `-` for none).
    pub default: String,
    /// What it does.
    pub help: &'static str,
}

/// How an environment variable's text is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnvForm {
    /// As it is.
    Text,
    /// Comma-separated.
    List,
    /// As a TOML value (a number, a boolean, a table), else as text.
    Toml,
}

/// A setting's value as read (the field type of [`FileConfig`]) and what it gives.
pub trait Setting {
    /// The value [`Config`] holds.
    type Value;
    /// How the environment's text is read.
    const ENV: EnvForm;
    /// The unit a number is in.
    const UNIT: &'static str = "";
    /// The value.
    fn value(self) -> Self::Value;
}

macro_rules! plain_setting {
    ($($t:ty => $env:ident),* $(,)?) => {$(
        impl Setting for $t {
            type Value = $t;
            const ENV: EnvForm = EnvForm::$env;
            fn value(self) -> $t { self }
        }
    )*};
}

plain_setting! {
    usize => Toml, u32 => Toml, u64 => Toml, f64 => Toml, bool => Toml,
    ProducerPolicy => Toml, BTreeMap<String, [f64; 2]> => Toml, BTreeMap<String, u32> => Toml,
    String => Text, PathBuf => Text, Vec<String> => List,
}

/// A duration in milliseconds: a number of them, or text with units (`"7d"`, `"250ms"`).
#[derive(Clone, Copy, Debug)]
pub struct Ms(pub i64);
/// A non-negative duration in milliseconds (see [`Ms`]).
#[derive(Clone, Copy, Debug)]
pub struct MsU(pub u64);
/// A non-negative duration in whole seconds: a number of them, or text with units.
#[derive(Clone, Copy, Debug)]
pub struct Secs(pub u64);
/// An address, `ip:port` or `host:port` ([`resolve_addr`]).
#[derive(Clone, Copy, Debug)]
pub struct Addr(pub SocketAddr);
/// A list of addresses (see [`Addr`]).
#[derive(Clone, Debug)]
pub struct Addrs(pub Vec<SocketAddr>);

macro_rules! wrapped_setting {
    ($($t:ident: $v:ty, $env:ident, $unit:literal, $de:path;)*) => {$(
        impl Setting for $t {
            type Value = $v;
            const ENV: EnvForm = EnvForm::$env;
            const UNIT: &'static str = $unit;
            fn value(self) -> $v { self.0 }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                $de(d).map($t)
            }
        }
    )*};
}

wrapped_setting! {
    Ms: i64, Toml, "ms", duration::ms;
    MsU: u64, Toml, "ms", duration::ms_u;
    Secs: u64, Toml, "s", duration::secs;
    Addr: SocketAddr, Text, "", address::one;
    Addrs: Vec<SocketAddr>, List, "", address::list;
}

/// A default as the settings table shows it.
trait Show {
    fn show(&self) -> String;
}

macro_rules! show_display {
    ($($t:ty),*) => {$(
        impl Show for $t {
            fn show(&self) -> String { self.to_string() }
        }
    )*};
}

show_display!(usize, u32, u64, i64, f64, bool, String, SocketAddr);

impl Show for PathBuf {
    fn show(&self) -> String {
        self.display().to_string()
    }
}

impl Show for ProducerPolicy {
    fn show(&self) -> String {
        self.as_str().to_string()
    }
}

impl<T: Show> Show for Option<T> {
    fn show(&self) -> String {
        self.as_ref().map_or_else(|| "-".to_string(), Show::show)
    }
}

impl<T: Show> Show for Vec<T> {
    fn show(&self) -> String {
        let items: Vec<String> = self.iter().map(|x| format!("{:?}", x.show())).collect();
        format!("[{}]", items.join(", "))
    }
}

impl Show for BTreeMap<String, u32> {
    fn show(&self) -> String {
        let items: Vec<String> = self.iter().map(|(k, v)| format!("{k:?} = {v}")).collect();
        format!("{{{}}}", items.join(", "))
    }
}

impl Show for BTreeMap<String, [f64; 2]> {
    fn show(&self) -> String {
        let items: Vec<String> = self
            .iter()
            .map(|(k, [lo, hi])| format!("{k:?} = [{lo}, {hi}]"))
            .collect();
        format!("{{{}}}", items.join(", "))
    }
}

/// A configuration error, naming the source (the file, a variable, a flag) and the key;
/// the parser's error is kept as the source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file does not parse, names no setting, or gives one a value of the wrong
    /// type or range (the message says which line and key).
    #[error("config file: {0}")]
    File(#[source] toml::de::Error),
    /// A variable or flag (`label`, as given) names no setting.
    #[error("{label}: {key} is not a setting")]
    UnknownKey {
        /// The variable or flag as given.
        label: String,
        /// The key it names.
        key: String,
    },
    /// A variable's or flag's value (`label`, as given) is not of its setting's type or range.
    #[error("{label}: {source}")]
    Value {
        /// The variable or flag as given.
        label: String,
        /// Why the value was refused.
        #[source]
        source: toml::de::Error,
    },
}

impl Config {
    /// `EDGETALLY_*` variables that are not settings: the config file's path, the log
    /// filter and format, the query tool's node and token, and the binary the demo and the
    /// benchmarks start.
    pub const OTHER_VARIABLES: &'static [&'static str] =
        &["CONFIG", "LOG", "NODE", "TOKEN", "LOG_FORMAT", "BIN"];
}

impl Config {
    /// Applies a TOML document.
    pub fn apply_toml(&mut self, text: &str) -> Result<(), ConfigError> {
        let f: FileConfig = toml::from_str(text).map_err(ConfigError::File)?;
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
            self.apply_text(&key, &v, &format!("{k}={v:?}"))?;
        }
        Ok(warnings)
    }

    /// Applies settings given as text, by key (the command line's flags: `data_dir`,
    /// `peers` …), read as the environment's values are.
    pub fn apply_flags<'a>(
        &mut self,
        flags: impl IntoIterator<Item = (&'a str, String)>,
    ) -> Result<(), ConfigError> {
        for (key, v) in flags {
            let flag = format!("--{}={v:?}", key.replace('_', "-"));
            self.apply_text(key, &v, &flag)?;
        }
        Ok(())
    }

    /// Applies one setting's text (`label` names it in an error).
    fn apply_text(&mut self, key: &str, v: &str, label: &str) -> Result<(), ConfigError> {
        use toml::Value;
        let value = match FileConfig::env_form(key) {
            None => {
                return Err(ConfigError::UnknownKey {
                    label: label.to_string(),
                    key: key.to_string(),
                })
            }
            Some(EnvForm::Text) => Value::String(v.to_string()),
            Some(EnvForm::List) => Value::Array(
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.into()))
                    .collect(),
            ),
            // A number, a boolean, a table: read as TOML; anything else as a string, so
            // `7d` is a duration and `many` a type error rather than a syntax error.
            Some(EnvForm::Toml) => toml::from_str::<toml::Table>(&format!("x = {v}"))
                .ok()
                .and_then(|mut t| t.remove("x"))
                .unwrap_or_else(|| Value::String(v.to_string())),
        };
        let f = FileConfig::deserialize(Value::Table(
            [(key.to_string(), value)].into_iter().collect(),
        ))
        .map_err(|source| ConfigError::Value {
            label: label.to_string(),
            source,
        })?;
        self.apply(f);
        Ok(())
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

mod address;

mod duration;

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
        assert!(matches!(
            c.apply_toml("nonsense = 1"),
            Err(ConfigError::File(_))
        ));
        let err = c
            .apply_env([("EDGETALLY_QUEUE_DEPTH".to_string(), "many".to_string())].into_iter())
            .expect_err("not a number");
        assert!(
            matches!(&err, ConfigError::Value { label, .. } if label == "EDGETALLY_QUEUE_DEPTH=\"many\""),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("EDGETALLY_QUEUE_DEPTH=\"many\": invalid type"),
            "{err}"
        );
        let unknown = c
            .apply_flags([("no_such_setting", "1".to_string())])
            .expect_err("unknown");
        assert!(
            matches!(&unknown, ConfigError::UnknownKey { key, .. } if key == "no_such_setting"),
            "{unknown:?}"
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

    /// The README's settings table is the one [`settings_table`] generates from the settings
    /// table (`EDGETALLY_BLESS=1` rewrites it), and the example file in `deploy/` names every
    /// setting (set or commented).
    #[test]
    fn the_readme_table_and_the_deploy_example_follow_the_settings() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
        let readme = std::fs::read_to_string(path).expect("README.md");
        let (open, close) = ("<!-- settings -->\n", "<!-- /settings -->");
        let start = readme.find(open).expect("settings marker") + open.len();
        let end = readme.find(close).expect("settings end marker");
        let want = settings_table();
        if readme[start..end] != want {
            if std::env::var_os("EDGETALLY_BLESS").is_some() {
                let new = format!("{}{want}{}", &readme[..start], &readme[end..]);
                std::fs::write(path, new).expect("write README.md");
            } else {
                panic!(
                    "README.md's settings table differs from the settings (rerun with \
                     EDGETALLY_BLESS=1 to regenerate it):\n{want}"
                );
            }
        }
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/edgetally.toml");
        let deploy = std::fs::read_to_string(path).expect("deploy/edgetally.toml");
        let missing: Vec<&str> = settings()
            .iter()
            .filter(|d| {
                !deploy.lines().any(|l| {
                    let l = l.trim_start_matches('#').trim_start();
                    l.starts_with(&format!("{} =", d.key))
                        || d.alias.is_some_and(|a| l.starts_with(&format!("{a} =")))
                })
            })
            .map(|d| d.key)
            .collect();
        assert!(
            missing.is_empty(),
            "deploy/edgetally.toml lacks {missing:?}"
        );
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
