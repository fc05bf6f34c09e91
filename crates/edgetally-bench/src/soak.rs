//! `edgetally-bench soak`: a merger under mixed valid load and abusive clients for a while, then a
//! check that nothing acknowledged was lost (before and after `kill -9`) and that memory
//! stayed flat.
//!
//! Running together, for `--secs` seconds:
//! - **valid load**: `--producers` producers over QUIC, each sending a 40-summary batch every
//!   `--interval-ms` (waiting out any Retry); every Ack is added to the expected totals;
//! - **quota breakers**: one key sending as fast as it can (per-producer rate limit), one
//!   key inventing a category per batch (new-category quota), one inventing entities
//!   (new-entity quota);
//!   (See [`SOAK_ENV`] for the two settings that differ from the defaults.)
//! - **hoarded sockets**: 200 idle and 50 slowloris HTTP connections, reopened whenever the
//!   merger closes them;
//! - **unfinished streams**: QUIC streams that send part of a batch and never finish.
//!
//! RSS is sampled every second; the figures compare the mean of the last tenth of the run
//! with the mean of the tenth that follows a warm-up (the first fifth), and give the spread
//! over the second half (by then the entity inventor has met its quota and the store's
//! page cache is full).

use anyhow::{bail, Context, Result};
use edgetally_bench::launcher::Merger;
use edgetally_core::BatchId;
use edgetally_proto::{BatchBuilder, Reply, Signer};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// How long the load runs, seconds.
    #[arg(long, default_value_t = 1800)]
    secs: u64,
    /// Valid producers.
    #[arg(long, default_value_t = 16)]
    producers: usize,
    /// Each valid producer's pause between batches, ms.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Abuse to leave out (comma-separated: quota, streams, sockets), to tell which one a
    /// figure comes from.
    #[arg(long, value_delimiter = ',')]
    without: Vec<String>,
}

/// The merger's settings: the per-second tier kept two minutes (so a steady load reaches a
/// steady state within the warm-up instead of growing the state for an hour, as the default
/// retention rightly lets it) and a new-entity quota the entity inventor reaches within the
/// warm-up. Every other setting is the default (rate limits included).
const SOAK_ENV: [(&str, &str); 2] = [
    ("EDGETALLY_RETENTION_SECONDS_TIER_MS", "120000"),
    ("EDGETALLY_NEW_ENTITIES_PER_HOUR", "20000"),
];

pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Expected count per category (every acknowledged valid event).
pub(crate) type Expected = Arc<Mutex<BTreeMap<String, u64>>>;

/// Counts an acknowledged batch: its `events` join the ground truth of `cat`, and `acked`.
pub(crate) fn credit(expected: &Expected, acked: &AtomicU64, cat: &str, events: u64) {
    *expected
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(cat.to_string())
        .or_default() += events;
    acked.fetch_add(1, Relaxed);
}

fn valid_batch(s: &Signer, p: usize, seq: u64, now: i64) -> (Vec<u8>, String) {
    let cat = format!("soak-{}", p % 4);
    let mut b = BatchBuilder::new(1000).expect("1000 ms is a valid width");
    for e in 0..40u64 {
        // Entities repeat (a fixed pool of 50 per category): the key space stays bounded.
        let ent = format!("dev-{}", (seq * 40 + e) % 50);
        let _ = b.record(&cat, Some(&ent), now, 1.0);
    }
    let id = BatchId {
        producer: s.producer(),
        epoch: 1,
        seq,
    };
    (s.seal(&b.finish(id, now)).unwrap_or_default(), cat)
}

/// Sends one batch on `client` (connecting it when needed) until it gets `Ack` or `Nack`,
/// waiting out `Retry` and reconnecting after a transport error (`on_retry(true)`; a `Retry`
/// is `on_retry(false)`), until `deadline` if one is given: the final reply, or `None` if it
/// gave up at the deadline.
pub(crate) async fn deliver(
    client: &mut Option<edgetally_net::Client>,
    quic: std::net::SocketAddr,
    cert: [u8; 32],
    raw: &[u8],
    deadline: Option<Instant>,
    mut on_retry: impl FnMut(bool),
) -> Option<Reply> {
    while deadline.is_none_or(|d| Instant::now() < d) {
        if client.is_none() {
            *client = edgetally_net::Client::connect(quic, vec![cert]).await.ok();
        }
        let Some(c) = client.clone() else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        match tokio::time::timeout(Duration::from_secs(10), c.send(raw)).await {
            Ok(Ok(Reply::Retry { after_ms })) => {
                on_retry(false);
                tokio::time::sleep(Duration::from_millis(after_ms.into())).await;
            }
            Ok(Ok(reply)) => return Some(reply),
            _ => {
                on_retry(true);
                *client = None;
            }
        }
    }
    None
}

/// Whether every category's count over all time on `m` equals what was acknowledged.
pub(crate) fn counts_match(m: &Merger, expected: &BTreeMap<String, u64>, when: &str) -> Result<()> {
    for (cat, n) in expected {
        let v = edgetally_bench::launcher::get_json(
            &m.http,
            &format!("/v1/aggregate?category={cat}&start=0&end=9999999999999"),
        )?;
        let got = v["count"].as_u64().context("count")?;
        if got != *n {
            bail!("{when}: category {cat}: {got} counted, {n} acknowledged");
        }
    }
    Ok(())
}

/// `kill -9`s `m`, restarts it on the same data and checks [`counts_match`] again.
pub(crate) fn restart_and_check(
    m: Merger,
    args: &[std::ffi::OsString],
    env: &[(&str, &str)],
    expected: &BTreeMap<String, u64>,
) -> Result<()> {
    m.kill9();
    let m = Merger::start_with_env(args, None, env)?;
    let r = counts_match(&m, expected, "after kill -9 and restart");
    if r.is_ok() {
        println!("  after kill -9 and restart: every acknowledged event still counted");
    }
    m.stop();
    r
}

pub fn run(a: SoakArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("edgetally-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let args = edgetally_bench::launcher::loopback_args(&dir);
    let m = Merger::start_with_env(&args, None, &SOAK_ENV)?;
    let pid = m.pid();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let expected: Expected = Arc::default();
    let acked = Arc::new(AtomicU64::new(0));
    let stats: Arc<Mutex<BTreeMap<&'static str, u64>>> = Arc::default();
    let count = |stats: &Arc<Mutex<BTreeMap<&'static str, u64>>>, k: &'static str| {
        *stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(k)
            .or_default() += 1;
    };
    let http_addr = m
        .http
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let started = Instant::now();
    let mut rss: Vec<(f64, u64)> = Vec::new();
    rt.block_on(async {
        let mut tasks = Vec::new();
        // Valid producers.
        for p in 0..a.producers {
            let (stop, expected, acked, stats) =
                (stop.clone(), expected.clone(), acked.clone(), stats.clone());
            let (quic, cert, interval) = (m.quic, m.cert, a.interval_ms);
            tasks.push(tokio::spawn(async move {
                let s = Signer::from_seed([p as u8 + 1; 32]);
                let mut client = None;
                let mut seq = 0u64;
                while !stop.load(Relaxed) {
                    let (raw, cat) = valid_batch(&s, p, seq, edgetally_net::now_ms());
                    let reply = deliver(&mut client, quic, cert, &raw, None, |transport| {
                        count(
                            &stats,
                            if transport {
                                "valid_transport_error"
                            } else {
                                "valid_retry"
                            },
                        )
                    })
                    .await;
                    match reply {
                        Some(Reply::Ack) => credit(&expected, &acked, &cat, 40),
                        Some(Reply::Nack(n)) => {
                            count(&stats, "valid_nack");
                            eprintln!("soak: a valid batch was refused: code {n}");
                        }
                        _ => {}
                    }
                    seq += 1;
                    tokio::time::sleep(Duration::from_millis(interval)).await;
                }
            }));
        }
        let with = |what: &str| !a.without.iter().any(|w| w == what);
        // Quota breakers: 0 floods, 1 invents categories, 2 invents entities.
        for kind in (0..3u8).filter(|_| with("quota")) {
            let (stop, stats) = (stop.clone(), stats.clone());
            let (quic, cert) = (m.quic, m.cert);
            tasks.push(tokio::spawn(async move {
                let s = Signer::from_seed([200 + kind; 32]);
                let Ok(c) = edgetally_net::Client::connect(quic, vec![cert]).await else {
                    return;
                };
                let mut seq = 0u64;
                while !stop.load(Relaxed) {
                    let now = edgetally_net::now_ms();
                    let mut b = BatchBuilder::new(1000).expect("width");
                    let (cat, ent) = match kind {
                        0 => ("flood".to_string(), None),
                        1 => (format!("spam-cat-{seq}"), None),
                        _ => ("spam-ent".to_string(), Some(format!("e{seq}"))),
                    };
                    let _ = b.record(&cat, ent.as_deref(), now, 1.0);
                    let id = BatchId {
                        producer: s.producer(),
                        epoch: 1,
                        seq,
                    };
                    let raw = s.seal(&b.finish(id, now)).unwrap_or_default();
                    seq += 1;
                    match c.send(&raw).await {
                        Ok(Reply::Ack) => count(&stats, "abuser_ack"),
                        Ok(Reply::Retry { .. }) => count(&stats, "abuser_retry"),
                        Ok(Reply::Nack(n)) => count(
                            &stats,
                            match edgetally_core::RejectCode::from_u16(n) {
                                Some(edgetally_core::RejectCode::CategoryQuota) => "category_quota",
                                Some(edgetally_core::RejectCode::EntityQuota) => "entity_quota",
                                _ => "abuser_other_nack",
                            },
                        ),
                        Err(_) => break,
                    }
                    if kind != 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }));
        }
        // Unfinished QUIC streams: part of a batch, never finished.
        if with("streams") {
            let (stop, stats) = (stop.clone(), stats.clone());
            let (quic, cert) = (m.quic, m.cert);
            tasks.push(tokio::spawn(async move {
                while !stop.load(Relaxed) {
                    let Ok(c) = edgetally_net::Client::connect(quic, vec![cert]).await else {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    };
                    let mut held = Vec::new();
                    for _ in 0..64 {
                        if let Ok((mut send, recv)) = c.connection().open_bi().await {
                            let _ = send.write_all(&[1u8; 60_000]).await;
                            held.push((send, recv));
                            count(&stats, "unfinished_stream");
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(12)).await;
                    drop(held);
                    c.close().await;
                }
            }));
        }
        // Hoarded sockets: idle and slowloris, reopened when closed.
        if with("sockets") {
            let (stop, stats, addr) = (stop.clone(), stats.clone(), http_addr.clone());
            tasks.push(tokio::spawn(async move {
                let mut socks: Vec<(tokio::net::TcpStream, bool)> = Vec::new();
                while !stop.load(Relaxed) {
                    socks.retain(|(s, _)| s.peer_addr().is_ok());
                    while socks.len() < 250 {
                        match tokio::net::TcpStream::connect(&addr).await {
                            Ok(s) => {
                                count(&stats, "hoarded_socket");
                                socks.push((s, socks.len().is_multiple_of(5)));
                            }
                            Err(_) => break,
                        }
                    }
                    for (s, slow) in &mut socks {
                        if *slow {
                            use tokio::io::AsyncWriteExt;
                            let _ = s.write_all(b"X").await;
                        }
                    }
                    // A closed socket shows as readable with 0 bytes.
                    let mut open = Vec::new();
                    for (s, slow) in socks.drain(..) {
                        let mut buf = [0u8; 1];
                        match s.try_read(&mut buf) {
                            Ok(0) => {}
                            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {}
                            _ => open.push((s, slow)),
                        }
                    }
                    socks = open;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }));
        }
        // RSS every second.
        let total = Duration::from_secs(a.secs);
        while started.elapsed() < total {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Some(k) = rss_kib(pid) {
                rss.push((started.elapsed().as_secs_f64(), k));
            }
            let t = started.elapsed().as_secs();
            if t.is_multiple_of(60) {
                eprint!(
                    "\rsoak: {t} s, {} batches acked, RSS {:.1} MiB   ",
                    acked.load(Relaxed),
                    rss.last().map_or(0.0, |r| r.1 as f64 / 1024.0)
                );
                let _ = std::io::stderr().flush();
            }
        }
        stop.store(true, Relaxed);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    });
    eprintln!();
    let expected = expected.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let result = (|| -> Result<()> {
        counts_match(&m, &expected, "after the soak")?;
        let n = rss.len();
        let window = |from: usize, len: usize| -> f64 {
            let s = &rss[from.min(n)..(from + len).min(n)];
            s.iter().map(|r| r.1 as f64).sum::<f64>() / s.len().max(1) as f64
        };
        let tenth = (n / 10).max(1);
        let (early, late) = (window(n / 5, tenth), window(n.saturating_sub(tenth), tenth));
        let peak = rss.iter().map(|r| r.1).max().unwrap_or(0);
        // The second half: the state has met its quotas and the caches are full by then.
        let half = &rss[n / 2..];
        let mean = half.iter().map(|r| r.1 as f64).sum::<f64>() / half.len().max(1) as f64;
        let (lo, hi) = half
            .iter()
            .fold((u64::MAX, 0), |(l, h), r| (l.min(r.1), h.max(r.1)));
        let stats = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        println!(
            "soak: {} s, {} valid batches acked ({} events), nothing acknowledged lost",
            a.secs,
            acked.load(Relaxed),
            expected.values().sum::<u64>()
        );
        println!(
            "  RSS after warm-up {:.1} MiB, at the end {:.1} MiB ({:+.1} %), peak {:.1} MiB",
            early / 1024.0,
            late / 1024.0,
            (late / early - 1.0) * 100.0,
            peak as f64 / 1024.0
        );
        println!(
            "  RSS over the second half: mean {:.1} MiB, from {:.1} to {:.1} MiB ({:+.1} % / {:+.1} % of the mean)",
            mean / 1024.0,
            lo as f64 / 1024.0,
            hi as f64 / 1024.0,
            (lo as f64 / mean - 1.0) * 100.0,
            (hi as f64 / mean - 1.0) * 100.0
        );
        println!("  abuse and shedding: {stats:?}");
        Ok(())
    })();
    // Then kill -9 and restart on the same data: still every acknowledged event.
    let result = result.and_then(|()| restart_and_check(m, &args, &SOAK_ENV, &expected));
    let _ = std::fs::remove_dir_all(&dir);
    result
}
