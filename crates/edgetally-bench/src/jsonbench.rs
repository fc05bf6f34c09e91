//! `edgetally-bench jsonbench`: `POST /v1/events` against ClickHouse's pre-aggregating twin,
//! fed the same NDJSON bodies by the same clients.
//!
//! Eight bodies of 50,000 events (10 categories × 100 entities, values in [0, 100), times in
//! the last 5 s, from a fixed seed) are posted over and over by `--clients` threads for
//! `--secs` seconds to each server in turn:
//! - edgetally (`edgetally serve`, defaults: every request folded into one batch, signed and
//!   fsynced before it is answered);
//! - Debian's `clickhouse-server` (started here with its own data directory on loopback): a
//!   `Null` table with a materialized view into a `SummingMergeTree` keyed by (category,
//!   entity, second) holding count and sum — edgetally's summaries less min and max (18.16
//!   has no `SimpleAggregateFunction`), and no fsync.
//!
//! Reported per server: events/s, the server's CPU (cores, from `/proc/PID/stat`), events
//! per server CPU-second, and RSS; then edgetally's ratio on events per CPU-second. Medians
//! over `--rounds`.

use anyhow::{bail, Context, Result};
use edgetally_bench::launcher::{loopback_args, Merger};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct JsonBenchArgs {
    /// Seconds of load per server and round.
    #[arg(long, default_value_t = 20)]
    secs: u64,
    /// Client threads posting at once.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// Eight NDJSON bodies of 50,000 events (a fixed xorshift seed; times in the last 5 s).
fn bodies() -> Vec<Arc<Vec<u8>>> {
    let now = edgetally_net::now_ms();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..8)
        .map(|_| {
            let mut body = String::with_capacity(4 << 20);
            for _ in 0..50_000 {
                let (c, e) = (next() % 10, next() % 100);
                let ts = now - 5_000 + (next() % 5_000) as i64;
                let v = (next() % 100_000) as f64 / 1000.0;
                body.push_str(&format!(
                    "{{\"ts_ms\":{ts},\"category\":\"cat-{c}\",\"entity\":\"dev-{e}\",\"value\":{v}}}\n"
                ));
            }
            Arc::new(body.into_bytes())
        })
        .collect()
}

/// One server's run: (events/s, server cores, events per server CPU-second, RSS MiB).
struct Run {
    rate: f64,
    cores: f64,
    per_cpu: f64,
    rss_mib: f64,
}

/// Posts the bodies to `url` from `clients` threads for `secs`; every answer must be 200.
fn load(url: &str, pid: u32, bodies: &[Arc<Vec<u8>>], clients: usize, secs: u64) -> Result<Run> {
    let cpu0 = crate::loadgen::cpu_secs(pid).unwrap_or(0.0);
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    let threads: Vec<_> = (0..clients.max(1))
        .map(|w| {
            let (url, bodies) = (url.to_string(), bodies.to_vec());
            std::thread::spawn(move || -> Result<u64> {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(60)))
                    .build()
                    .into();
                let mut n = 0u64;
                while Instant::now() < until {
                    let body = &bodies[(w + n as usize) % bodies.len()];
                    let mut res = agent
                        .post(&url)
                        .header("content-type", "application/x-ndjson")
                        .send(body.as_slice())?;
                    let status = res.status().as_u16();
                    let text = res.body_mut().read_to_string()?;
                    if status != 200 {
                        bail!("{url}: {status} {text}");
                    }
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    let mut requests = 0;
    for t in threads {
        requests += t.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = crate::loadgen::cpu_secs(pid).unwrap_or(0.0) - cpu0;
    let events = requests as f64 * 50_000.0;
    Ok(Run {
        rate: events / wall,
        cores: cpu / wall,
        per_cpu: events / cpu.max(1e-9),
        rss_mib: crate::soak::rss_kib(pid).unwrap_or(0) as f64 / 1024.0,
    })
}

/// A free loopback TCP port.
fn free_tcp() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `clickhouse-server` on loopback with its data in `dir`; its HTTP port and the child.
fn clickhouse(dir: &std::path::Path) -> Result<(u16, Child)> {
    let (http, tcp) = (free_tcp()?, free_tcp()?);
    std::fs::create_dir_all(dir)?;
    let d = dir.display();
    std::fs::copy("/etc/clickhouse-server/users.xml", dir.join("users.xml"))
        .context("clickhouse-server's users.xml (apt-get install clickhouse-server)")?;
    std::fs::write(
        dir.join("config.xml"),
        format!(
            "<?xml version=\"1.0\"?><yandex><logger><level>warning</level><log>{d}/server.log</log>\
             <errorlog>{d}/server.err.log</errorlog></logger><http_port>{http}</http_port>\
             <tcp_port>{tcp}</tcp_port><listen_host>127.0.0.1</listen_host><path>{d}/data/</path>\
             <tmp_path>{d}/tmp/</tmp_path><user_files_path>{d}/user_files/</user_files_path>\
             <format_schema_path>{d}/format_schemas/</format_schema_path>\
             <users_config>{d}/users.xml</users_config><default_profile>default</default_profile>\
             <default_database>default</default_database><mark_cache_size>536870912</mark_cache_size>\
             </yandex>"
        ),
    )?;
    let child = Command::new("clickhouse-server")
        .arg(format!("--config-file={d}/config.xml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("clickhouse-server")?;
    let url = format!("http://127.0.0.1:{http}/");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ureq::get(&format!("{url}ping")).call().is_err() {
        if Instant::now() > deadline {
            bail!("clickhouse-server did not answer /ping within 30 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for q in [
        "CREATE TABLE events_in (ts_ms UInt64, category String, entity String, value Float64) ENGINE = Null",
        "CREATE TABLE summaries (category String, entity String, second UInt64, count UInt64, sum Float64) \
         ENGINE = SummingMergeTree() ORDER BY (category, entity, second)",
        "CREATE MATERIALIZED VIEW mv TO summaries AS SELECT category, entity, intDiv(ts_ms, 1000) AS second, \
         count() AS count, sum(value) AS sum FROM events_in GROUP BY category, entity, second",
    ] {
        ureq::post(&url).send(q)?;
    }
    Ok((http, child))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: JsonBenchArgs) -> Result<()> {
    let bodies = bodies();
    let dir = std::env::temp_dir().join(format!("edgetally-jsonbench-{}", std::process::id()));
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 1..=a.rounds.max(1) {
        let _ = std::fs::remove_dir_all(&dir);
        let m = Merger::start(&loopback_args(&dir.join("edgetally")), None)?;
        let url = format!("{}/v1/events", m.http);
        let e = load(&url, m.pid(), &bodies, a.clients, a.secs);
        m.stop();
        let e = e?;
        let (port, mut ch) = clickhouse(&dir.join("clickhouse"))?;
        let url = format!(
            "http://127.0.0.1:{port}/?query=INSERT%20INTO%20events_in%20FORMAT%20JSONEachRow"
        );
        let c = load(&url, ch.id(), &bodies, a.clients, a.secs);
        let _ = ch.kill();
        let _ = ch.wait();
        let c = c?;
        for (name, r) in [("edgetally", &e), ("clickhouse", &c)] {
            println!(
                "round {round}: {name:<10} {:>9.0} events/s, server {:.2} cores, {:>9.0} events per server CPU-second, RSS {:.0} MiB",
                r.rate, r.cores, r.per_cpu, r.rss_mib
            );
        }
        ours.push(e.per_cpu);
        theirs.push(c.per_cpu);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ratios: Vec<f64> = ours.iter().zip(&theirs).map(|(o, t)| o / t).collect();
    println!(
        "medians over {} rounds: edgetally {:.2} M events per server CPU-second, clickhouse (Null → SummingMergeTree) {:.2} M: {:.2}x",
        ours.len(),
        median(ours) / 1e6,
        median(theirs) / 1e6,
        median(ratios)
    );
    Ok(())
}
