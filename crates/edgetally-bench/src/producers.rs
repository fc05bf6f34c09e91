//! `edgetally-bench producers`: memory per fresh producer as RSS counts it.
//!
//! For each key count N (`--keys`, e.g. 20,000 and 200,000) it starts a fresh release merger,
//! sends one small batch (5 events in one of 8 categories) from each of N new producer keys
//! (Retry honoured), waits `--settle-secs` for the node to settle (snapshot, log compaction,
//! allocator trimming), and reads the merger's RSS (`/proc/PID/status`) beside the sum of
//! its own estimate, `edgetally_memory_bytes`, by kind. The figure is the slope between the
//! smallest and largest N: bytes of RSS each further producer costs, startup excluded.
//!
//! Per-key and per-source rate and novelty limits are lifted (every key comes from one
//! loopback address); every other setting is the default.

use anyhow::{bail, Result};
use edgetally_bench::launcher::{get_text, loopback_args, Merger};
use edgetally_core::BatchId;
use edgetally_proto::{BatchBuilder, Reply, Signer};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct ProducersArgs {
    /// Key counts, comma-separated: one fresh merger each.
    #[arg(long, value_delimiter = ',', default_value = "20000,200000")]
    keys: Vec<u64>,
    /// Seconds to wait after the load before reading RSS.
    #[arg(long, default_value_t = 40)]
    settle_secs: u64,
    /// Concurrent senders (one QUIC connection each).
    #[arg(long, default_value_t = 32)]
    senders: u64,
    /// Rounds (each key count once per round); medians are reported.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

const ENV: [(&str, &str); 5] = [
    ("EDGETALLY_PRODUCER_BATCHES_PER_SEC", "0"),
    ("EDGETALLY_PRODUCER_SUMMARIES_PER_SEC", "0"),
    ("EDGETALLY_SOURCE_BATCHES_PER_SEC", "0"),
    ("EDGETALLY_SOURCE_NEW_SERIES_PER_HOUR", "0"),
    ("EDGETALLY_NEW_ENTITIES_PER_HOUR", "0"),
];

/// One run's reading.
struct Reading {
    rss: u64,
    estimate: u64,
    kinds: Vec<(String, u64)>,
}

/// `edgetally_memory_bytes{kind=…}` lines of `/metrics`.
fn estimates(http: &str) -> Result<Vec<(String, u64)>> {
    let text = get_text(http, "/metrics")?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("edgetally_memory_bytes{kind=\""))
        .filter_map(|l| {
            let (kind, rest) = l.split_once("\"}")?;
            Some((kind.to_string(), rest.trim().parse::<f64>().ok()? as u64))
        })
        .collect())
}

fn seed_of(key: u64) -> [u8; 32] {
    let mut seed = [0xa5; 32];
    seed[..8].copy_from_slice(&key.to_le_bytes());
    seed
}

/// Sends one batch from each of `keys` fresh producers; returns how many were acknowledged.
async fn load(m: &Merger, keys: u64, senders: u64) -> Result<u64> {
    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for s in 0..senders {
        let (quic, cert, acked) = (m.quic, m.cert, acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut client: Option<edgetally_net::Client> = None;
            let mut key = s;
            while key < keys {
                let signer = Signer::from_seed(seed_of(key));
                let now = edgetally_net::now_ms();
                let mut b = BatchBuilder::new(1000).expect("1000 ms is a valid width");
                let cat = format!("producers-{}", key % 8);
                for e in 0..5 {
                    let ent = format!("page-{}", (key + e) % 64);
                    let _ = b.record(&cat, Some(&ent), now, 1.0);
                }
                let id = BatchId {
                    producer: signer.producer(),
                    epoch: 1,
                    seq: 0,
                };
                let raw = signer.seal(&b.finish(id, now)).unwrap_or_default();
                let deadline = Some(Instant::now() + Duration::from_secs(30));
                let reply =
                    crate::soak::deliver(&mut client, quic, cert, &raw, deadline, |_| {}).await;
                if reply == Some(Reply::Ack) {
                    acked.fetch_add(1, Relaxed);
                }
                key += senders;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(acked.load(Relaxed))
}

fn one(keys: u64, a: &ProducersArgs) -> Result<Reading> {
    let dir = std::env::temp_dir().join(format!("edgetally-producers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let m = Merger::start_with_env(&loopback_args(&dir), None, &ENV)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let t = Instant::now();
    let acked = rt.block_on(load(&m, keys, a.senders.max(1)))?;
    let secs = t.elapsed().as_secs_f64();
    drop(rt);
    std::thread::sleep(Duration::from_secs(a.settle_secs));
    let rss = crate::soak::rss_kib(m.pid()).unwrap_or(0) * 1024;
    let kinds = estimates(&m.http)?;
    m.stop();
    let _ = std::fs::remove_dir_all(&dir);
    if acked != keys {
        bail!("{acked} of {keys} batches acknowledged");
    }
    let estimate = kinds.iter().map(|(_, v)| v).sum();
    println!(
        "  {keys} producers ({:.0} batches/s): RSS {:.1} MiB, estimate {:.1} MiB ({})",
        keys as f64 / secs,
        rss as f64 / 1048576.0,
        estimate as f64 / 1048576.0,
        kinds
            .iter()
            .map(|(k, v)| format!("{k} {:.1}", *v as f64 / 1048576.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Reading {
        rss,
        estimate,
        kinds,
    })
}

pub fn run(a: ProducersArgs) -> Result<()> {
    let mut keys = a.keys.clone();
    keys.sort_unstable();
    keys.dedup();
    if keys.len() < 2 || keys[0] == 0 {
        bail!("--keys needs two or more positive counts");
    }
    let (lo, hi) = (keys[0], keys[keys.len() - 1]);
    let (mut rss_slopes, mut est_slopes) = (Vec::new(), Vec::new());
    for round in 1..=a.rounds.max(1) {
        println!(
            "round {round}: one batch from each fresh key, RSS read {} s after the load",
            a.settle_secs
        );
        let readings: Vec<Reading> = keys.iter().map(|&k| one(k, &a)).collect::<Result<_>>()?;
        let (first, last) = (&readings[0], &readings[readings.len() - 1]);
        let n = (hi - lo) as f64;
        let rss = (last.rss as f64 - first.rss as f64) / n;
        let est = (last.estimate as f64 - first.estimate as f64) / n;
        println!(
            "  slope {lo} -> {hi}: RSS {rss:.0} B per producer, estimate {est:.0} B per producer"
        );
        for ((kind, v1), (_, v0)) in last.kinds.iter().zip(&first.kinds) {
            println!(
                "    {kind}: {:.0} B per producer",
                (*v1 as f64 - *v0 as f64) / n
            );
        }
        rss_slopes.push(rss);
        est_slopes.push(est);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (rss, est) = (median(&mut rss_slopes), median(&mut est_slopes));
    println!(
        "median over {} rounds: {rss:.0} B of RSS per fresh producer; edgetally_memory_bytes says {est:.0} B ({:+.0} % of RSS)",
        rss_slopes.len(),
        100.0 * (est - rss) / rss
    );
    Ok(())
}
