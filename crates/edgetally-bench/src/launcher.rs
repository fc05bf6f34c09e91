//! Running `edgetally serve` as a child process and reading the addresses and certificate
//! hash it prints at start-up: the one merger launcher of the demo (`edgetally-bench demo`), the
//! benchmarks (`edgetally-bench`) and the integration tests (`tests/it/harness.rs` wraps it
//! with HTTP helpers).

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Settings for a benchmark's merger: a handful of load-generator keys on one address send
/// far past the per-producer and per-source rate limits (which real producers never near), and
/// one address brings every new series, so those limits and the per-source new-series quota
/// are lifted; every other admission check (the per-producer novelty quotas, the series cap)
/// still runs on every batch.
pub const BENCH_ENV: [(&str, &str); 4] = [
    ("EDGETALLY_PRODUCER_BATCHES_PER_SEC", "0"),
    ("EDGETALLY_PRODUCER_SUMMARIES_PER_SEC", "0"),
    ("EDGETALLY_SOURCE_BATCHES_PER_SEC", "0"),
    // One client address stands for every producer (the shard-group runs make 102,400
    // series from 127.0.0.1).
    ("EDGETALLY_SOURCE_NEW_SERIES_PER_HOUR", "0"),
];

/// `serve` arguments for a node on ephemeral loopback ports with its data in `dir`.
pub fn loopback_args(dir: &std::path::Path) -> Vec<OsString> {
    vec![
        "--http-addr".into(),
        "127.0.0.1:0".into(),
        "--quic-addr".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.as_os_str().to_os_string(),
    ]
}

/// A cluster secret drawn once per process, for the nodes a demo or benchmark starts (peers
/// must authenticate; the nodes of one run, restarts included, share it).
pub fn cluster_secret() -> &'static str {
    static SECRET: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SECRET.get_or_init(|| edgetally_net::tls::hex(&edgetally_net::random_seed()))
}

/// A free UDP port on loopback (for a QUIC address peers must know in advance).
pub fn free_udp() -> Result<SocketAddr> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

/// Starts a benchmark's cluster node: data in `dir`, QUIC on `quic`, HTTP on an ephemeral
/// port, `peers` as its peers, the shared cluster secret, [`BENCH_ENV`], and `extra` flags.
pub fn start_node(
    dir: &std::path::Path,
    quic: SocketAddr,
    peers: &[SocketAddr],
    extra: Vec<OsString>,
) -> Result<Merger> {
    let mut args: Vec<OsString> = vec![
        "--data-dir".into(),
        dir.into(),
        "--http-addr".into(),
        "127.0.0.1:0".into(),
        "--quic-addr".into(),
        quic.to_string().into(),
    ];
    for p in peers {
        args.push("--peer".into());
        args.push(p.to_string().into());
    }
    args.extend(extra);
    let mut env = BENCH_ENV.to_vec();
    env.push(("EDGETALLY_CLUSTER_SECRET", cluster_secret()));
    Merger::start_with_env(&args, None, &env)
}

/// The `edgetally` binary to start: `EDGETALLY_BIN` when set; else, from `edgetally-bench`, the
/// `edgetally` beside it (cargo builds both into one target directory); else this binary
/// (the demo starts its own binary's `serve`).
pub fn binary() -> Result<std::path::PathBuf> {
    if let Some(b) = std::env::var_os("EDGETALLY_BIN") {
        return Ok(b.into());
    }
    let me = std::env::current_exe()?;
    let bench = me
        .file_stem()
        .is_some_and(|n| n.to_string_lossy().starts_with("edgetally-bench"));
    Ok(if bench {
        me.with_file_name("edgetally")
    } else {
        me
    })
}

/// A merger started by this process; stopped (SIGTERM, then waited for) by [`Merger::stop`],
/// killed if dropped.
#[derive(Debug)]
pub struct Merger {
    child: Child,
    pub http: String,
    pub quic: SocketAddr,
    pub cert: [u8; 32],
    /// Batches it recovered from its store at start-up.
    pub recovered: u64,
}

impl Merger {
    /// Starts `edgetally serve ARGS…` (this same binary) and waits for its start-up lines,
    /// echoing them prefixed with `echo_prefix` if given.
    pub fn start(args: &[OsString], echo_prefix: Option<&str>) -> Result<Merger> {
        Self::start_with_env(args, echo_prefix, &[])
    }

    /// [`Merger::start`] with extra environment variables (settings).
    pub fn start_with_env(
        args: &[OsString],
        echo_prefix: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<Merger> {
        Self::spawn(&binary()?, args, echo_prefix, env)
    }

    /// Starts `BIN serve ARGS…` with `env` and waits for its start-up lines (30 s at most).
    /// Its log level is `warn` unless `env` sets `EDGETALLY_LOG`; its stderr is this
    /// process's.
    pub fn spawn(
        bin: &std::path::Path,
        args: &[OsString],
        echo_prefix: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<Merger> {
        let mut cmd = Command::new(bin);
        // `EDGETALLY_*` variables of this process that are no setting of the merger (a test
        // suite's or a benchmark's own knobs) are not passed on: it would warn about each.
        for (k, _) in std::env::vars_os() {
            let Some(name) = k.to_str().and_then(|k| k.strip_prefix("EDGETALLY_")) else {
                continue;
            };
            let key = name.to_ascii_lowercase();
            let setting = edgetally_merger::config::FileConfig::KEYS.contains(&key.as_str())
                || edgetally_merger::config::FileConfig::DURATION_ALIASES.contains(&key.as_str())
                || edgetally_merger::config::Config::OTHER_VARIABLES.contains(&name);
            if !setting {
                cmd.env_remove(&k);
            }
        }
        let mut child = cmd
            .arg("serve")
            .args(args)
            .env("EDGETALLY_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let (mut http, mut quic, mut cert, mut recovered) = (None, None, None, None);
        let deadline = Instant::now() + Duration::from_secs(30);
        // `recovered-batches` is the last start-up line.
        while recovered.is_none() {
            let line = match lines.next() {
                Some(l) if Instant::now() < deadline => l?,
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("the merger did not start (are its ports taken?)");
                }
            };
            if let Some(p) = echo_prefix {
                println!("{p}{line}");
            }
            if let Some(v) = line.strip_prefix("http: ") {
                http = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("quic: ") {
                quic = v.parse().ok();
            } else if let Some(v) = line.strip_prefix("cert-sha256: ") {
                cert = edgetally_net::tls::parse_hash(v);
            } else if let Some(v) = line.strip_prefix("recovered-batches: ") {
                recovered = v.parse().ok();
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Merger {
            child,
            http: http.context("http address")?,
            quic: quic.context("quic address")?,
            cert: cert.context("certificate hash")?,
            recovered: recovered.unwrap_or(0),
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status();
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): the process stays, frozen — to its peers and
    /// producers, a node cut off the network.
    pub fn pause(&self, stop: bool) {
        self.signal(if stop { "-STOP" } else { "-CONT" });
    }

    /// `kill -9`, then wait.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (graceful shutdown), then wait.
    pub fn stop(mut self) {
        self.signal("-TERM");
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to 20 s; whether it exited successfully in that time (if not,
    /// it is killed).
    pub fn terminate(mut self) -> bool {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Merger {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// GET `{http}{path}` as text, whatever the status.
pub fn get_text(http: &str, path: &str) -> Result<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    Ok(agent
        .get(&format!("{http}{path}"))
        .call()?
        .body_mut()
        .read_to_string()?)
}

/// The value of the sample `name` (the metric name with its labels, exactly) in a
/// Prometheus text exposition, if present.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    })
}

/// GET `{http}{path}` as JSON (any status: error answers are JSON too).
pub fn get_json(http: &str, path: &str) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&get_text(http, path)?)?)
}
