//! `edgetally-bench exportbench`: the PostgreSQL export against a real server it starts
//! (Debian's `postgresql`, default settings: fsync and synchronous commit on).
//!
//! Per round, on a fresh merger and table: posts `--entities` × `--minutes` × 2 events (all
//! in closed minutes), then reports how long after the last post every row is written; then
//! `kill -9` and a restart — the start-up rescan rewrites every row, timed; then SIGTERM and
//! a restart — after a clean stop the start-up round rewrites nothing. Medians over
//! `--rounds`.

use anyhow::{bail, Context, Result};
use edgetally_bench::launcher::{get_text, loopback_args, metric_value, Merger, BENCH_ENV};
use edgetally_net::now_ms;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct ExportBenchArgs {
    /// Entities per round (one row per entity and minute).
    #[arg(long, default_value_t = 1_000)]
    entities: u64,
    /// Closed minutes the events fall in.
    #[arg(long, default_value_t = 60)]
    minutes: i64,
    /// Rounds (each with a fresh merger and table); medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// A PostgreSQL server on a loopback port, run as the `postgres` user.
struct Postgres {
    child: Child,
    port: u16,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Fast shutdown (SIGINT), then wait.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn as_postgres(program: &Path) -> Result<Command> {
    use std::os::unix::process::CommandExt;
    let id = |flag: &str| -> Result<u32> {
        let o = Command::new("id").args([flag, "postgres"]).output()?;
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .context("a postgres user (apt-get install postgresql)")
    };
    let mut c = Command::new(program);
    c.uid(id("-u")?).gid(id("-g")?).env("HOME", "/tmp");
    Ok(c)
}

fn start_postgres(dir: &Path) -> Result<Postgres> {
    let bin: PathBuf = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL's server (apt-get install postgresql)")?
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("postgres").exists())
        .max()
        .context("no /usr/lib/postgresql/*/bin/postgres")?;
    std::fs::create_dir_all(dir)?;
    Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .status()?;
    let data = dir.join("data");
    let init = as_postgres(&bin.join("initdb"))?
        .arg("-D")
        .arg(&data)
        .args(["-A", "trust", "-U", "edgetally", "--no-sync"])
        .output()?;
    if !init.status.success() {
        bail!("initdb: {}", String::from_utf8_lossy(&init.stderr));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = as_postgres(&bin.join("postgres"))?
        .arg("-D")
        .arg(&data)
        .args([
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-k",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pg = Postgres { child, port };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("PostgreSQL did not start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Accepting connections is not yet accepting queries: a second for the start-up.
    std::thread::sleep(Duration::from_secs(1));
    Ok(pg)
}

fn metric(m: &Merger, name: &str) -> f64 {
    get_text(&m.http, "/metrics")
        .ok()
        .and_then(|t| metric_value(&t, name))
        .unwrap_or(0.0)
}

/// Waits until `f` holds (polling every 20 ms, 120 s at most); the time it took.
fn until(what: &str, mut f: impl FnMut() -> bool) -> Result<f64> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("{what}: not within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(t.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn run(a: ExportBenchArgs) -> Result<()> {
    let root = std::env::temp_dir().join(format!("edgetally-exportbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let result = rounds(&a, &root);
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn rounds(a: &ExportBenchArgs, root: &Path) -> Result<()> {
    let pg = start_postgres(&root.join("pg"))?;
    let url = format!("postgresql://edgetally@127.0.0.1:{}/postgres", pg.port);
    let rows = (a.entities * a.minutes as u64) as f64;
    let (mut live, mut rescan, mut clean) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..a.rounds {
        let dir = root.join(format!("node-{round}"));
        let table = format!("bench_{round}");
        let mut env: Vec<(&str, &str)> = BENCH_ENV.to_vec();
        env.extend([
            ("EDGETALLY_EXPORT_POSTGRES_URL", url.as_str()),
            ("EDGETALLY_EXPORT_TABLE", table.as_str()),
            ("EDGETALLY_EXPORT_DELAY", "1s"),
            ("EDGETALLY_EXPORT_INTERVAL", "1s"),
        ]);
        let args = loopback_args(&dir);
        let m = Merger::start_with_env(&args, None, &env)?;
        // Two events per (entity, minute), in the closed minutes before the current one.
        let first = (now_ms() / 60_000 - a.minutes - 1) * 60_000;
        let lines: Vec<String> = (0..a.minutes)
            .flat_map(|k| (0..a.entities).flat_map(move |e| [(k, e, 0), (k, e, 1)]))
            .map(|(k, e, j)| {
                let ts = first + k * 60_000 + ((e * 7_919 + j * 30_011) % 60_000) as i64;
                format!(r#"{{"ts_ms":{ts},"category":"load","entity":"dev-{e}","value":{j}.5}}"#)
            })
            .collect();
        let agent = ureq::Agent::new_with_defaults();
        for chunk in lines.chunks(5_000) {
            let status = agent
                .post(&format!("{}/v1/events", m.http))
                .header("content-type", "application/x-ndjson")
                .send(chunk.join("\n"))?
                .status();
            if status != 200 {
                bail!("POST /v1/events: {status}");
            }
        }
        live.push(until("every row written", || {
            metric(&m, "edgetally_export_rows_total") >= rows
                && metric(&m, "edgetally_export_pending_keys") == 0.0
        })?);
        m.kill9();
        let t = Instant::now();
        let m = Merger::start_with_env(&args, None, &env)?;
        until("the rescan after kill -9", || {
            metric(&m, "edgetally_export_rows_total") >= rows
        })?;
        rescan.push(t.elapsed().as_secs_f64());
        if !m.terminate() {
            bail!("the merger did not stop cleanly");
        }
        let m = Merger::start_with_env(&args, None, &env)?;
        let started = now_ms();
        let mark = dir.join(format!("export-{table}.mark"));
        until("the start-up round after a clean stop", || {
            std::fs::read_to_string(&mark)
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<i64>().ok())
                .is_some_and(|cutoff| cutoff > started - 1_000)
        })?;
        clean.push(metric(&m, "edgetally_export_rows_total"));
        m.stop();
    }
    println!(
        "export to PostgreSQL ({} rows per round: {} entities x {} minutes, 2 events each; medians of {} rounds):",
        rows, a.entities, a.minutes, a.rounds
    );
    let live = median(live);
    println!("  all rows written {live:.2} s after the last post (export_interval 1 s, export_delay 1 s)");
    let rescan = median(rescan);
    println!(
        "  after kill -9: start to every row rewritten {rescan:.2} s ({:.0} rows/s, start-up included)",
        rows / rescan
    );
    println!(
        "  after a clean stop: rows the start-up round rewrote: {}",
        median(clean)
    );
    Ok(())
}
