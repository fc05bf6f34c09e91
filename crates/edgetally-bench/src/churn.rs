//! `edgetally-bench churn`: ephemeral producers — a fresh key for every couple of batches, as
//! browsers make one per page view — against a real merger for `--secs` seconds, then a check
//! that memory follows the live producers instead of every key ever seen, and that nothing
//! acknowledged was lost (before and after `kill -9`).
//!
//! The merger runs with a short lateness horizon (`max_lateness` 5 s, expiry margin 2 s,
//! upkeep every 5 s), so an epoch's seen-set expires about 15 s after its last batch
//! (docs/design/replication.md, "Seen-set expiry"). Retention is the default: what stays per idle
//! producer is what retention holds of it (its minute and hour rollup entries and its key,
//! ~200 B), until its minute and hour buckets are cut.
//!
//! Every second it samples the merger's RSS and its `/metrics` memory estimates. It fails if
//! an acknowledged event is missing, if the live seen-sets do not level off (the seen-set
//! estimate over the last fifth of the run may not exceed 1.5× its peak over the second
//! fifth, by when the first epochs have expired), or if fewer than half of the epochs the run
//! created have expired by the end. The long run (`cargo xtask churn SECS`) gives RSS over
//! millions of keys.

use anyhow::{bail, Result};
use edgetally_bench::launcher::{get_text, loopback_args, metric_value, Merger};
use edgetally_core::BatchId;
use edgetally_proto::{BatchBuilder, Reply, Signer};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct ChurnArgs {
    /// How long the load runs, seconds.
    #[arg(long, default_value_t = 1800)]
    secs: u64,
    /// New producer keys per second (each sends `--batches` batches, then is never seen again).
    #[arg(long, default_value_t = 1000)]
    keys_per_sec: u64,
    /// Batches per key.
    #[arg(long, default_value_t = 2)]
    batches: u64,
    /// Concurrent senders (one QUIC connection each; keys take turns on them).
    #[arg(long, default_value_t = 16)]
    senders: u64,
}

/// The merger's settings (see the module header); per-key and per-source rate limits are
/// lifted because every key comes from one loopback address.
const CHURN_ENV: [(&str, &str); 6] = [
    ("EDGETALLY_MAX_LATENESS_MS", "5000"),
    ("EDGETALLY_SEEN_EXPIRY_MARGIN_MS", "2000"),
    ("EDGETALLY_SNAPSHOT_INTERVAL_SECS", "5"),
    ("EDGETALLY_PRODUCER_BATCHES_PER_SEC", "0"),
    ("EDGETALLY_PRODUCER_SUMMARIES_PER_SEC", "0"),
    ("EDGETALLY_SOURCE_BATCHES_PER_SEC", "0"),
];

const CATEGORIES: u64 = 8;
const EVENTS_PER_BATCH: u64 = 5;

/// One second's sample.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    secs: f64,
    keys: u64,
    rss_kib: u64,
    seen: u64,
    producers: u64,
    expired: u64,
}

/// `edgetally_memory_bytes{kind="…"}` and `edgetally_epochs_expired_total` from `/metrics`.
fn metrics(http: &str) -> Option<(u64, u64, u64)> {
    let text = get_text(http, "/metrics").ok()?;
    let value = |name: &str| metric_value(&text, name).map(|v| v as u64);
    Some((
        value("edgetally_memory_bytes{kind=\"seen\"}")?,
        value("edgetally_memory_bytes{kind=\"producers\"}")?,
        value("edgetally_epochs_expired_total")?,
    ))
}

fn seed_of(key: u64) -> [u8; 32] {
    let mut seed = [0x5a; 32];
    seed[..8].copy_from_slice(&key.to_le_bytes());
    seed
}

pub fn run(a: ChurnArgs) -> Result<()> {
    if a.keys_per_sec == 0 || a.senders == 0 || a.batches == 0 {
        bail!("--keys-per-sec, --senders and --batches must be positive");
    }
    let dir = std::env::temp_dir().join(format!("edgetally-churn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let args = loopback_args(&dir);
    let m = Merger::start_with_env(&args, None, &CHURN_ENV)?;
    let pid = m.pid();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let keys = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let expected: crate::soak::Expected = Arc::default();
    let started = Instant::now();
    let total = Duration::from_secs(a.secs);
    let mut samples: Vec<Sample> = Vec::new();
    rt.block_on(async {
        let mut tasks = Vec::new();
        // Sender `s` starts key `s + i·senders` at `i·senders/keys_per_sec` seconds.
        let period = Duration::from_secs_f64(a.senders as f64 / a.keys_per_sec as f64);
        for s in 0..a.senders {
            let (keys, acked, refused, expected) =
                (keys.clone(), acked.clone(), refused.clone(), expected.clone());
            let (quic, cert, batches, senders) = (m.quic, m.cert, a.batches, a.senders);
            tasks.push(tokio::spawn(async move {
                let mut client: Option<edgetally_net::Client> = None;
                let mut tick = tokio::time::interval_at(
                    tokio::time::Instant::now() + period.mul_f64(s as f64 / senders as f64),
                    period,
                );
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut i = 0u64;
                loop {
                    tick.tick().await;
                    if started.elapsed() >= total {
                        break;
                    }
                    let key = s + i * senders;
                    i += 1;
                    let signer = Signer::from_seed(seed_of(key));
                    keys.fetch_add(1, Relaxed);
                    let cat = format!("churn-{}", key % CATEGORIES);
                    for seq in 0..batches {
                        let now = edgetally_net::now_ms();
                        let mut b = BatchBuilder::new(1000).expect("1000 ms is a valid width");
                        for e in 0..EVENTS_PER_BATCH {
                            // Entities from a fixed pool: the series stay few; the keys churn.
                            let ent = format!("page-{}", (key + e) % 64);
                            let _ = b.record(&cat, Some(&ent), now, 1.0);
                        }
                        let id = BatchId {
                            producer: signer.producer(),
                            epoch: 1,
                            seq,
                        };
                        let raw = signer.seal(&b.finish(id, now)).unwrap_or_default();
                        // Retry (backpressure) and transport errors are retried for up to
                        // 10 s; a batch past its lateness is refused (`bucket_too_old`) and
                        // then counts as refused, not lost.
                        let deadline = Instant::now() + Duration::from_secs(10);
                        let reply = crate::soak::deliver(
                            &mut client,
                            quic,
                            cert,
                            &raw,
                            Some(deadline),
                            |_| {},
                        )
                        .await;
                        match reply {
                            Some(Reply::Ack) => {
                                crate::soak::credit(&expected, &acked, &cat, EVENTS_PER_BATCH)
                            }
                            Some(Reply::Nack(_)) => {
                                refused.fetch_add(1, Relaxed);
                            }
                            _ => {}
                        }
                    }
                }
            }));
        }
        while started.elapsed() < total {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let http = m.http.clone();
            let got = tokio::task::spawn_blocking(move || metrics(&http))
                .await
                .ok()
                .flatten();
            if let (Some((seen, producers, expired)), Some(rss)) =
                (got, crate::soak::rss_kib(pid))
            {
                samples.push(Sample {
                    secs: started.elapsed().as_secs_f64(),
                    keys: keys.load(Relaxed),
                    rss_kib: rss,
                    seen,
                    producers,
                    expired,
                });
            }
            let t = started.elapsed().as_secs();
            if t.is_multiple_of(60) {
                if let Some(s) = samples.last() {
                    eprintln!(
                        "churn: {t} s, {} keys, RSS {:.1} MiB, seen-sets {:.1} MiB, producers {:.1} MiB, {} epochs expired",
                        s.keys,
                        s.rss_kib as f64 / 1024.0,
                        s.seen as f64 / 1048576.0,
                        s.producers as f64 / 1048576.0,
                        s.expired
                    );
                }
            }
        }
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    });
    let expected = expected.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let result = (|| -> Result<()> {
        let n = samples.len();
        if n < 10 {
            bail!("only {n} samples: run for at least 10 s");
        }
        crate::soak::counts_match(&m, &expected, "after the run")?;
        let text = get_text(&m.http, "/metrics")?;
        let kinds: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("edgetally_memory_bytes{kind="))
            .collect();
        println!(
            "  memory estimates at the end (bytes): {}",
            kinds.join(", ")
        );
        let metric = |name: &str| metric_value(&text, name).unwrap_or(0.0);
        let snapshots = metric("edgetally_snapshots_total").max(1.0);
        println!(
            "  snapshots: {:.0} written, the last {:.1} MiB; replica lock held {:.1} ms per snapshot on average while streaming",
            metric("edgetally_snapshots_total"),
            metric("edgetally_snapshot_bytes") / (1 << 20) as f64,
            metric("edgetally_snapshot_lock_seconds_total") * 1e3 / snapshots
        );
        let last = samples[n - 1];
        let fifth = |k: usize| &samples[k * n / 5..((k + 1) * n / 5).max(k * n / 5 + 1)];
        let peak_seen = |s: &[Sample]| s.iter().map(|s| s.seen).max().unwrap_or(0);
        let (second, final_) = (peak_seen(fifth(1)), peak_seen(fifth(4)));
        let peak = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
        let seconds = last.secs.max(1.0);
        println!(
            "churn: {:.0} s, {} producer keys ({:.0}/s), {} batches acked, {} refused, nothing acknowledged lost",
            seconds,
            last.keys,
            last.keys as f64 / seconds,
            acked.load(Relaxed),
            refused.load(Relaxed)
        );
        println!(
            "  epochs expired: {} of {} ({:.0} %)",
            last.expired,
            last.keys,
            last.expired as f64 * 100.0 / last.keys.max(1) as f64
        );
        println!(
            "  seen-set estimate: peak {:.2} MiB in the second fifth, {:.2} MiB in the last fifth",
            second as f64 / 1048576.0,
            final_ as f64 / 1048576.0
        );
        println!(
            "  RSS: peak {:.1} MiB, at the end {:.1} MiB; producer estimate at the end {:.1} MiB",
            peak as f64 / 1024.0,
            last.rss_kib as f64 / 1024.0,
            last.producers as f64 / 1048576.0
        );
        // About 30 lines of RSS over the run, for the notes.
        let step = (seconds / 30.0).max(5.0);
        let mut next = 0.0;
        for s in &samples {
            if s.secs >= next {
                println!(
                    "  t={:>5.0} s keys={:>9} rss={:>8.1} MiB seen={:>7.2} MiB producers={:>7.2} MiB expired={}",
                    s.secs,
                    s.keys,
                    s.rss_kib as f64 / 1024.0,
                    s.seen as f64 / 1048576.0,
                    s.producers as f64 / 1048576.0,
                    s.expired
                );
                next += step;
            }
        }
        if final_ as f64 > 1.5 * second as f64 {
            bail!("the live seen-sets did not level off: {second} B in the second fifth, {final_} B in the last");
        }
        if last.expired * 2 < last.keys {
            bail!(
                "only {} of {} epochs expired by the end",
                last.expired,
                last.keys
            );
        }
        Ok(())
    })();
    let result =
        result.and_then(|()| crate::soak::restart_and_check(m, &args, &CHURN_ENV, &expected));
    let _ = std::fs::remove_dir_all(&dir);
    result
}
