//! Starting and stopping real `edgetally serve` processes for the tests.

use edgetally_bench::launcher::Merger as Launched;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The `edgetally` binary under test: `EDGETALLY_BIN` when set (`cargo xtask test` builds it
/// before the tests start, so no test waits on a build), else this build's, built on first use
/// (so that running only this test package still tests the current code).
/// The `edgetally-bench` binary (the demo, the benchmarks) beside [`binary`], built first if
/// it is not there.
pub fn bench_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let path = binary().with_file_name("edgetally-bench");
        if !path.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args([
                "build",
                "-q",
                "-p",
                "edgetally-bench",
                "--bin",
                "edgetally-bench",
            ]);
            if path.parent().is_some_and(|d| d.ends_with("release")) {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("cargo build");
            assert!(status.success(), "building edgetally-bench failed");
        }
        path
    })
    .clone()
}

pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("EDGETALLY_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("test exe");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let profile_release = dir.ends_with("release");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "edgetally", "--bin", "edgetally"]);
        if profile_release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo build");
        assert!(status.success(), "building edgetally failed");
        dir.join("edgetally")
    })
    .clone()
}

/// Runs `edgetally ARGS…` to completion: (success, stdout, stderr).
pub fn run_cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String, String) {
    let out = Command::new(binary())
        .args(args)
        .env("EDGETALLY_LOG", "error")
        .output()
        .expect("run edgetally");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A two-thread tokio runtime, for native producers and async clients in a test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// An HTTP client that returns error statuses as answers (the tests check them).
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// A free UDP port on loopback (a QUIC address peers must know before the node starts).
pub fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("udp port")
}

/// A running merger process: the one launcher (`edgetally_bench::launcher::Merger`, which the
/// demo and the benchmarks use too — fields `http`, `quic`, `cert`, `recovered`, and `pid`,
/// `pause`, `kill9`, `terminate`), with the tests' HTTP helpers.
pub struct Merger(Launched);

impl std::ops::Deref for Merger {
    type Target = Launched;
    fn deref(&self) -> &Launched {
        &self.0
    }
}

impl Merger {
    /// Starts `edgetally serve` on ephemeral loopback ports in `dir`.
    pub fn start(dir: &Path, extra: &[&str]) -> Merger {
        Self::start_with_env(dir, extra, &[])
    }

    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Merger {
        Self::start_at(dir, "127.0.0.1:0", extra, env)
    }

    /// Starts `edgetally serve` with its QUIC address fixed (peers must know it in advance).
    /// EDGETALLY_TEST_LOG (say `edgetally_merger=debug`) shows the nodes' logs when debugging.
    pub fn start_at(dir: &Path, quic: &str, extra: &[&str], env: &[(&str, &str)]) -> Merger {
        Self::start_bin(&binary(), dir, quic, extra, env)
    }

    /// [`Merger::start_at`] with another `edgetally` binary (an earlier release, say).
    pub fn start_bin(
        bin: &Path,
        dir: &Path,
        quic: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Merger {
        let mut args: Vec<std::ffi::OsString> = vec![
            "--data-dir".into(),
            dir.into(),
            "--http-addr".into(),
            "127.0.0.1:0".into(),
            "--quic-addr".into(),
            quic.into(),
        ];
        args.extend(extra.iter().map(Into::into));
        let log = std::env::var("EDGETALLY_TEST_LOG").unwrap_or_else(|_| "warn".into());
        let mut env = env.to_vec();
        env.insert(0, ("EDGETALLY_LOG", &log));
        Merger(Launched::spawn(bin, &args, None, &env).expect("start edgetally serve"))
    }

    /// `kill -9`.
    pub fn kill9(self) {
        self.0.kill9()
    }

    /// SIGTERM, then wait; returns whether it exited successfully.
    pub fn terminate(self) -> bool {
        self.0.terminate()
    }

    pub fn get(&self, path_and_query: &str) -> (u16, Value) {
        let agent = agent();
        let mut res = agent
            .get(&format!("{}{path_and_query}", self.http))
            .call()
            .expect("GET");
        let status = res.status().as_u16();
        let text = res.body_mut().read_to_string().expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn post(
        &self,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> (u16, Value, Vec<(String, String)>) {
        let agent = agent();
        let mut res = agent
            .post(&format!("{}{path}", self.http))
            .header("content-type", content_type)
            .header("origin", "http://example.test")
            .send(body)
            .expect("POST");
        let status = res.status().as_u16();
        let headers = res
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let text = res.body_mut().read_to_string().expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            headers,
        )
    }

    /// `POST /v1/events` (NDJSON or a JSON array) with an optional Idempotency-Key: (status,
    /// body, whether the answer says it is a replay of an applied request).
    pub fn post_events(&self, key: Option<&str>, body: &str) -> (u16, Value, bool) {
        let mut req = agent()
            .post(&format!("{}/v1/events", self.http))
            .header("content-type", "application/x-ndjson");
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let mut res = req.send(body.as_bytes()).expect("POST /v1/events");
        let status = res.status().as_u16();
        let replayed = res
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        let text = res.body_mut().read_to_string().expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            replayed,
        )
    }

    pub fn metric(&self, name: &str) -> f64 {
        let agent = agent();
        let text = agent
            .get(&format!("{}/metrics", self.http))
            .call()
            .expect("metrics")
            .body_mut()
            .read_to_string()
            .expect("body");
        check_exposition(&text);
        edgetally_bench::launcher::metric_value(&text, name).unwrap_or(0.0)
    }
}

/// Every scrape a test makes is checked against the registry: each family declared in
/// `edgetally_merger::metrics::FAMILIES`, once, with its help and kind, and every sample under
/// the family declared last (a histogram's `_bucket`, `_sum` and `_count` included).
pub fn check_exposition(text: &str) {
    use edgetally_merger::metrics::{Kind, FAMILIES};
    let mut seen: Vec<&str> = Vec::new();
    let mut current: Option<&edgetally_merger::metrics::Family> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("help text");
            let f = FAMILIES
                .iter()
                .find(|f| f.name == name)
                .unwrap_or_else(|| panic!("{name} is not in the registry"));
            assert_eq!(help, f.help, "{name}'s help");
            assert!(!seen.contains(&name), "{name} written twice");
            seen.push(name);
            current = Some(f);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let f = current.expect("TYPE after HELP");
            let kind = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            assert_eq!(rest, format!("{} {kind}", f.name));
        } else if !line.is_empty() {
            let f = current.expect("a sample after its family");
            let series = line.split(['{', ' ']).next().unwrap_or_default();
            let ok = series == f.name
                || (f.kind == Kind::Histogram
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| series == format!("{}{s}", f.name)));
            assert!(ok, "sample {line:?} under family {}", f.name);
        }
    }
}

/// A fresh temporary directory under the target dir, removed by the caller's `TempDir` drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let base = std::env::temp_dir().join(format!(
            "edgetally-test-{}-{name}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&base).expect("mkdir");
        TempDir(base)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (std::process::id() as u64) << 32
}

pub use edgetally_net::now_ms;

/// Whether a real component the test starts (a Debian package) is installed. Where it is not,
/// the test is skipped with a note — unless the CI asks for every tool
/// (`EDGETALLY_REQUIRE_TOOLS`, set by `cargo xtask test` after installing them), which
/// makes a missing one a failure.
pub fn tool_present(present: bool, package: &str, what: &str) -> bool {
    if !present {
        assert!(
            std::env::var_os("EDGETALLY_REQUIRE_TOOLS").is_none(),
            "{package} is missing (apt-get install {package})"
        );
        eprintln!("{package} is not installed: {what} not tested");
    }
    present
}

/// One keyed request through a nemesis: `send(node)` (None: lost, or the node is down) to
/// `first`, and while the answer is lost or 503 (not applied), the same request to the node
/// `next(at)` after 50 ms, until a 200 (within 60 s; any other status fails the test). The
/// applied answer is confirmed at `next(at)` too — a load balancer's retry after a timeout:
/// the same `accepted`, counted once. Returns (accepted, retries).
pub fn keyed_until_applied(
    request: u64,
    first: usize,
    send: impl Fn(usize) -> Option<(u16, Value)>,
    mut next: impl FnMut(usize) -> usize,
) -> (u64, u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (mut at, mut retries) = (first, 0);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "request {request} never answered"
        );
        match send(at) {
            Some((200, v)) => {
                let accepted = v["accepted"].as_u64().expect("accepted");
                if let Some((200, w)) = send(next(at)) {
                    assert_eq!(w["accepted"].as_u64(), Some(accepted), "{w}");
                }
                return (accepted, retries);
            }
            Some((503, _)) | None => {
                retries += 1;
                at = next(at);
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Some((st, v)) => panic!("request {request}: {st} {v}"),
        }
    }
}
