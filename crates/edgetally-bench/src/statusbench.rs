//! `edgetally-bench statusbench`: what `GET /v1/status` costs on a large state, and what status
//! pollers cost ingest.
//!
//! 1. Fills a fresh merger with `--producers` distinct producer keys (one small batch each).
//! 2. Pushes a load of pre-signed batches over QUIC with no poller, then again with
//!    `--pollers` clients calling `/v1/status` back to back; reports the status latency
//!    (p50/p99) and the ingest ack latency (p50/p99) of both runs.

use crate::loadgen::{make_batch, push_all};
use anyhow::Result;
use edgetally_bench::launcher::Merger;
use edgetally_net::now_ms;
use edgetally_proto::Signer;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct StatusBenchArgs {
    /// Distinct producers to fill the merger with.
    #[arg(long, default_value_t = 100_000)]
    producers: usize,
    /// Batches of load pushed in each ingest run.
    #[arg(long, default_value_t = 10_000)]
    batches: usize,
    /// Concurrent `/v1/status` pollers in the second run.
    #[arg(long, default_value_t = 4)]
    pollers: usize,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}

pub fn run(a: StatusBenchArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("edgetally-statusbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let m = Merger::start_with_env(
        &edgetally_bench::launcher::loopback_args(&dir),
        None,
        &edgetally_bench::launcher::BENCH_ENV,
    )?;
    let result = (|| -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let now = now_ms();
        let t = Instant::now();
        let fill: Vec<Vec<u8>> = (0..a.producers)
            .map(|i| {
                let mut seed = [0u8; 32];
                seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
                seed[31] = 0xa5;
                let s = Signer::from_seed(seed);
                s.seal(&make_batch(&s, i, 0, 4, now))
                    .map_err(|e| anyhow::anyhow!("{e}"))
            })
            .collect::<Result<_>>()?;
        println!(
            "signed {} one-producer batches in {:.1} s",
            fill.len(),
            t.elapsed().as_secs_f64()
        );
        let (secs, _, _) = rt.block_on(push_all(m.quic, m.cert, Arc::new(fill), 256, 4))?;
        println!(
            "filled the merger with {} producers in {secs:.1} s",
            a.producers
        );
        let signers: Vec<Signer> = (0..8u8).map(|i| Signer::from_seed([i + 140; 32])).collect();
        let load = |round: u64| -> Result<Arc<Vec<Vec<u8>>>> {
            Ok(Arc::new(
                (0..a.batches)
                    .map(|i| {
                        let s = &signers[i % signers.len()];
                        let seq = round * 1_000_000 + (i / signers.len()) as u64;
                        s.seal(&make_batch(s, i % signers.len(), seq, 200, now_ms()))
                            .map_err(|e| anyhow::anyhow!("{e}"))
                    })
                    .collect::<Result<_>>()?,
            ))
        };
        for (round, pollers) in [(0u64, 0usize), (1, a.pollers)] {
            let batches = load(round)?;
            let stop = Arc::new(AtomicBool::new(false));
            let threads: Vec<_> = (0..pollers)
                .map(|_| {
                    let (http, stop) = (m.http.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let mut lat = Vec::new();
                        while !stop.load(Relaxed) {
                            let t = Instant::now();
                            if edgetally_bench::launcher::get_text(&http, "/v1/status").is_err() {
                                break;
                            }
                            lat.push(t.elapsed().as_secs_f64() * 1000.0);
                        }
                        lat
                    })
                })
                .collect();
            let (secs, mut ack, _) =
                rt.block_on(push_all(m.quic, m.cert, batches.clone(), 64, 2))?;
            stop.store(true, Relaxed);
            let mut status: Vec<f64> = threads
                .into_iter()
                .flat_map(|t| t.join().unwrap_or_default())
                .collect();
            println!(
                "{pollers} status pollers: ingest {:.0} batches/s, ack p50 {:.2} ms p99 {:.2} ms",
                batches.len() as f64 / secs,
                pct(&mut ack, 0.5),
                pct(&mut ack, 0.99)
            );
            if pollers > 0 {
                println!(
                    "  /v1/status with {} producers: {} calls, p50 {:.2} ms, p99 {:.2} ms",
                    a.producers,
                    status.len(),
                    pct(&mut status, 0.5),
                    pct(&mut status, 0.99)
                );
            }
        }
        Ok(())
    })();
    m.stop();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
