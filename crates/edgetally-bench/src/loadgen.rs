//! `edgetally-bench loadgen`: the merger benchmark, both sides in one run on this machine.
//!
//! 1. Starts `edgetally serve` (this binary) on loopback with durability on (every Ack follows
//!    an fsynced group commit), pre-signs batches of 200 summaries, pushes them over QUIC with
//!    many streams in flight, and reports signed batches/s, summaries/s, p50/p99 ack latency
//!    and the merger's peak RSS.
//! 2. Starts a real `redis-server` on loopback and feeds it the same summaries as pipelined
//!    Lua count/sum/min/max updates (one key per summary key), reporting key-updates/s.

use anyhow::{bail, Context, Result};
use edgetally_core::{Batch, BatchId, BatchSummary, StringTable, Summary};
use edgetally_proto::{Reply, Signer};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct LoadgenArgs {
    /// Batches to push (each holds --summaries summaries).
    #[arg(long, default_value_t = 40_000)]
    batches: usize,
    /// Summaries per batch.
    #[arg(long, default_value_t = 200)]
    summaries: u32,
    /// Streams in flight at once.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// QUIC connections to spread them over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Skip the Redis comparison.
    #[arg(long)]
    no_redis: bool,
    /// Rounds (merger run, verify bound, Redis run each); medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Give every summary sketches (batch format v2): a HyperLogLog of its 5 subjects
    /// (precision 14, sparse) and a quantile sketch of its 5 values.
    #[arg(long)]
    sketches: bool,
    /// Pin the merger to these CPUs (a `taskset` list such as `1` or `0-3`) for the scaling
    /// table; unset: it may run on every core.
    #[arg(long)]
    merger_cpus: Option<String>,
    /// Pin the load generator (this process) to these CPUs; unset: every core.
    #[arg(long)]
    loadgen_cpus: Option<String>,
}

/// Pins every thread of process `pid` to the CPUs in `list` (threads it starts later inherit
/// it from the thread that starts them).
fn pin(pid: u32, list: &str) -> Result<()> {
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", list, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .context("taskset (util-linux)")?
        .success();
    if !ok {
        bail!("taskset -c {list} failed for process {pid}");
    }
    Ok(())
}

use edgetally_net::now_ms;

/// The key space: producer p's batch s covers devices (s·n .. s·n+n) mod 10,000 of one
/// category, in the current second, so keys repeat across batches as real traffic does.
pub fn make_batch(signer: &Signer, p: usize, seq: u64, n: u32, now: i64) -> Batch {
    let first = (seq as u32).wrapping_mul(n) % 10_000;
    let mut devices: Vec<u32> = (0..n).map(|i| (first + i) % 10_000).collect();
    devices.sort_unstable();
    let mut strings = StringTable::new();
    for d in &devices {
        strings.push(&format!("device-{d:05}"));
    }
    strings.push(&format!("metric-{}", p % 4));
    let summaries = (0..n)
        .map(|i| BatchSummary {
            category: n,
            entity: i + 1,
            bucket: now / 1000,
            summary: Summary {
                count: 5,
                sum: 5 * 21_000_000_000 + i as i128 * 1000,
                min: 20.0,
                max: 22.5,
            },
        })
        .collect();
    Batch {
        id: BatchId {
            producer: signer.producer(),
            epoch: now as u64,
            seq,
        },
        created_ms: now,
        bucket_ms: 1000,
        strings,
        summaries,
        sketches: Vec::new(),
    }
}

/// `batch` with sketches on every summary: 5 subjects (distinct per summary and batch, as
/// many visitors are) in a HyperLogLog of precision 14, and the 5 values (its min to its max)
/// in a quantile sketch.
pub fn with_sketches(mut batch: Batch) -> Batch {
    use edgetally_core::sketches::Sketches;
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let base = batch.id.seq.wrapping_mul(1 << 20) ^ u64::from(batch.id.producer.0[0]) << 56;
    batch.sketches = (0..batch.summaries.len() as u32)
        .map(|i| {
            let mut k = Sketches::default();
            for j in 0..5u64 {
                k.insert_subject(mix(base.wrapping_add(u64::from(i) * 5 + j)), 14);
            }
            for v in [20.0, 20.5, 21.0, 21.5, 22.5] {
                k.insert_value(v, 1);
            }
            (i, k)
        })
        .collect();
    batch
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

/// CPU seconds (user + system) a process has used.
pub(crate) fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub fn run(a: LoadgenArgs) -> Result<()> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    println!(
        "machine: {} cores, {cpu}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if let Some(list) = &a.loadgen_cpus {
        pin(std::process::id(), list)?;
    }
    let now = now_ms();
    let t = Instant::now();
    let signers: Vec<Signer> = (0..8u8).map(|i| Signer::from_seed([i + 40; 32])).collect();
    let sealed: Vec<Vec<u8>> = (0..a.batches)
        .map(|i| {
            let s = &signers[i % signers.len()];
            let b = make_batch(
                s,
                i % signers.len(),
                (i / signers.len()) as u64,
                a.summaries,
                now,
            );
            s.seal(&if a.sketches { with_sketches(b) } else { b })
                .map_err(|e| anyhow::anyhow!("{e}"))
        })
        .collect::<Result<_>>()?;
    println!(
        "pre-signed {} batches of {} summaries in {:.1} s ({} bytes each)",
        sealed.len(),
        a.summaries,
        t.elapsed().as_secs_f64(),
        sealed[0].len()
    );

    let sealed = Arc::new(sealed);
    let redis_updates = (!a.no_redis).then(|| sealed_summaries(a.batches.min(5000), a.summaries));
    let (mut speed, mut ratio_bound, mut ratio_redis) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=a.rounds.max(1) {
        println!("\n--- round {round} of {}", a.rounds.max(1));
        // The bound is measured just before and just after the merger run (a VM's speed
        // drifts by tens of percent within minutes), and their mean is used.
        let before = single_core_verify_bound(a.sketches)?;
        let (batches_per_s, ours) = merger_round(&a, &sealed)?;
        let after = single_core_verify_bound(a.sketches)?;
        let verify_bound = (before + after) / 2.0;
        println!(
            "  single-core verify bound here: {verify_bound:.0} batches/s (before {before:.0}, after {after:.0}) -> merger reaches {:.0} % of it",
            100.0 * batches_per_s / verify_bound
        );
        speed.push(batches_per_s);
        ratio_bound.push(batches_per_s / verify_bound);
        if let Some(updates) = &redis_updates {
            let redis = redis_baseline(updates)?;
            println!("  redis-server (loopback, pipelined EVALSHA count/sum/min/max, 1,000 per pipeline): {:.0} key-updates/s", redis);
            println!(
                "  ratio: edgetally {:.1}x redis on key-updates/s",
                ours as f64 / redis
            );
            ratio_redis.push(ours as f64 / redis);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    println!(
        "\nmedians over {} rounds: {:.0} signed batches/s ({:.2} M summaries/s), {:.0} % of the single-core verify bound{}",
        speed.len(),
        median(&mut speed),
        median(&mut speed) * a.summaries as f64 / 1e6,
        100.0 * median(&mut ratio_bound),
        if ratio_redis.is_empty() {
            String::new()
        } else {
            format!(", {:.1}x redis", median(&mut ratio_redis))
        }
    );
    Ok(())
}

/// One run of the merger side: a fresh `edgetally serve`, every batch pushed; returns
/// (signed batches/s, summaries/s).
fn merger_round(a: &LoadgenArgs, sealed: &Arc<Vec<Vec<u8>>>) -> Result<(f64, u64)> {
    let dir = std::env::temp_dir().join(format!("edgetally-loadgen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let merger = edgetally_bench::launcher::Merger::start_with_env(
        &edgetally_bench::launcher::loopback_args(&dir),
        None,
        &edgetally_bench::launcher::BENCH_ENV,
    )?;
    let pid = merger.pid();
    if let Some(list) = &a.merger_cpus {
        pin(pid, list)?;
    }
    let result = (|| -> Result<(f64, u64)> {
        let (quic, cert, http) = (merger.quic, merger.cert, Some(merger.http.clone()));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let sealed = sealed.clone();
        let (server_cpu0, client_cpu0) = (
            cpu_secs(pid).unwrap_or(0.0),
            cpu_secs(std::process::id()).unwrap_or(0.0),
        );
        let (elapsed, mut lat, retries) = rt.block_on(push_all(
            quic,
            cert,
            sealed.clone(),
            a.in_flight,
            a.connections,
        ))?;
        let server_cores = (cpu_secs(pid).unwrap_or(0.0) - server_cpu0) / elapsed;
        let client_cores = (cpu_secs(std::process::id()).unwrap_or(0.0) - client_cpu0) / elapsed;
        lat.sort_by(f64::total_cmp);
        let n = sealed.len() as f64;
        let summaries = n * a.summaries as f64;
        println!("\nedgetally merger, QUIC on loopback, fsync per group commit, {} streams over {} connections:", a.in_flight, a.connections);
        println!(
            "  {:.0} signed batches/s, {:.2} M summaries (key-updates)/s over {:.1} s",
            n / elapsed,
            summaries / elapsed / 1e6,
            elapsed
        );
        println!("  CPU: merger {server_cores:.2} cores, load generator {client_cores:.2} cores (the machine has 2)");
        println!(
            "  ack latency p50 {:.2} ms, p99 {:.2} ms ({} Retry replies)",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            retries
        );
        if let Some(k) = peak_rss_kib(pid) {
            println!("  merger peak RSS {:.1} MiB", k as f64 / 1024.0);
        }
        if let Some(http) = http {
            let text = edgetally_bench::launcher::get_text(&http, "/metrics")?;
            let metric =
                |name: &str| edgetally_bench::launcher::metric_value(&text, name).unwrap_or(0.0);
            let (commits, secs) = (
                metric("edgetally_group_commits_total"),
                metric("edgetally_commit_seconds_total"),
            );
            println!(
                "  {commits:.0} group commits, mean {:.1} ms each ({:.0} batches per commit)",
                1000.0 * secs / commits.max(1.0),
                n / commits.max(1.0)
            );
        }
        Ok((n / elapsed, (summaries / elapsed) as u64))
    })();
    merger.stop();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Pushes every batch over QUIC with `in_flight` streams on `connections` connections,
/// resending on Retry; returns (seconds, ack latencies in ms, Retry count).
pub async fn push_all(
    quic: std::net::SocketAddr,
    cert: [u8; 32],
    sealed: Arc<Vec<Vec<u8>>>,
    in_flight: usize,
    connections: usize,
) -> Result<(f64, Vec<f64>, u64)> {
    let mut clients = Vec::new();
    for _ in 0..connections.max(1) {
        clients.push(edgetally_net::Client::connect(quic, vec![cert]).await?);
    }
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let retries = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..in_flight.max(1))
        .map(|w| {
            let (c, sealed, next, retries) = (
                clients[w % clients.len()].clone(),
                sealed.clone(),
                next.clone(),
                retries.clone(),
            );
            tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(b) = sealed.get(i) else { break };
                    loop {
                        let t = Instant::now();
                        match c.send(b).await {
                            Ok(Reply::Ack) => {
                                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                                break;
                            }
                            Ok(Reply::Retry { after_ms }) => {
                                retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(after_ms as u64)).await;
                            }
                            Ok(other) => anyhow::bail!("batch {i} refused: {other:?}"),
                            Err(e) => anyhow::bail!("send failed: {e}"),
                        }
                    }
                }
                anyhow::Ok(lat)
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    for c in clients {
        c.close().await;
    }
    Ok((
        elapsed,
        lat,
        retries.load(std::sync::atomic::Ordering::Relaxed),
    ))
}

/// Batches one core decodes and verifies per second here (single verification of a
/// 200-summary batch): the median of five 0.4 s rounds, since a VM's speed drifts.
fn single_core_verify_bound(sketches: bool) -> Result<f64> {
    let s = Signer::from_seed([99; 32]);
    let b = make_batch(&s, 0, 0, 200, now_ms());
    let b = s
        .seal(&if sketches { with_sketches(b) } else { b })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let limits = edgetally_core::Limits::default();
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let mut n = 0;
        while t.elapsed() < Duration::from_millis(400) {
            edgetally_proto::decode(&b, &limits)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .verify()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            n += 1;
        }
        rounds.push(n as f64 / t.elapsed().as_secs_f64());
    }
    rounds.sort_by(f64::total_cmp);
    Ok(rounds[rounds.len() / 2])
}

/// (key, count, sum, min, max) of the same summaries the merger got.
fn sealed_summaries(batches: usize, n: u32) -> Vec<(String, u64, f64, f64, f64)> {
    let now = now_ms();
    let mut out = Vec::new();
    for i in 0..batches {
        let first = ((i / 8) as u32).wrapping_mul(n) % 10_000;
        for j in 0..n {
            let d = (first + j) % 10_000;
            out.push((
                format!("m{}:device-{d:05}:{}", (i % 8) % 4, now / 1000),
                5,
                105.0 + j as f64 * 1e-6,
                20.0,
                22.5,
            ));
        }
    }
    out
}

const LUA: &str = "local c=redis.call('HINCRBY',KEYS[1],'count',ARGV[1]) \
redis.call('HINCRBYFLOAT',KEYS[1],'sum',ARGV[2]) \
local mn=redis.call('HGET',KEYS[1],'min') if (not mn) or tonumber(ARGV[3])<tonumber(mn) then redis.call('HSET',KEYS[1],'min',ARGV[3]) end \
local mx=redis.call('HGET',KEYS[1],'max') if (not mx) or tonumber(ARGV[4])>tonumber(mx) then redis.call('HSET',KEYS[1],'max',ARGV[4]) end \
return c";

fn resp(args: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    v
}

/// Reads `n` RESP replies, returning the first bulk string seen (for SCRIPT LOAD).
fn read_replies(r: &mut BufReader<std::net::TcpStream>, n: usize) -> Result<Option<String>> {
    let mut first = None;
    let mut line = String::new();
    for _ in 0..n {
        line.clear();
        r.read_line(&mut line)?;
        match line.as_bytes().first() {
            Some(b'-') => bail!("redis error: {}", line.trim()),
            Some(b'$') => {
                let len: usize = line[1..].trim().parse()?;
                let mut buf = vec![0u8; len + 2];
                r.read_exact(&mut buf)?;
                first.get_or_insert_with(|| String::from_utf8_lossy(&buf[..len]).into_owned());
            }
            _ => {}
        }
    }
    Ok(first)
}

fn redis_baseline(updates: &[(String, u64, f64, f64, f64)]) -> Result<f64> {
    let port = 16379u16;
    let mut server = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server (apt-get install redis-server)")?;
    let result = (|| -> Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut w = stream.try_clone()?;
        let mut r = BufReader::new(stream);
        w.write_all(&resp(&["SCRIPT", "LOAD", LUA]))?;
        let sha = read_replies(&mut r, 1)?.context("script sha")?;
        let start = Instant::now();
        for chunk in updates.chunks(1000) {
            let mut buf = Vec::with_capacity(chunk.len() * 120);
            for (k, c, s, mn, mx) in chunk {
                buf.extend_from_slice(&resp(&[
                    "EVALSHA",
                    &sha,
                    "1",
                    k,
                    &c.to_string(),
                    &s.to_string(),
                    &mn.to_string(),
                    &mx.to_string(),
                ]));
            }
            w.write_all(&buf)?;
            read_replies(&mut r, chunk.len())?;
        }
        Ok(updates.len() as f64 / start.elapsed().as_secs_f64())
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}
