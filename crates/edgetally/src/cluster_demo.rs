//! `edgetally demo --cluster`: three mergers peered on loopback (HTTP 7070/7072/7074, QUIC
//! 7071/7073/7075, fresh data directories), native SDK producers spread over all three; one
//! merger is killed mid-stream (its producers fail over), restarted, and catches up; then
//! each node's totals are printed beside the expectation computed here, with the time the
//! cluster took to converge.

use crate::child::{get_json as get, Merger};
use anyhow::{bail, Result};
use edgetally_net::{now_ms, Endpoint, NativeProducer};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

fn start(dir: &Path, i: usize) -> Result<Merger> {
    let port = |n: usize| 7070 + n as u16;
    let mut args: Vec<OsString> = vec![
        "--data-dir".into(),
        dir.join(format!("node-{i}")).into(),
        "--http-addr".into(),
        format!("127.0.0.1:{}", port(2 * i)).into(),
        "--quic-addr".into(),
        format!("127.0.0.1:{}", port(2 * i + 1)).into(),
    ];
    for j in (0..3).filter(|j| *j != i) {
        args.push("--peer".into());
        args.push(format!("127.0.0.1:{}", port(2 * j + 1)).into());
    }
    Merger::start_with_env(
        &args,
        None,
        &[("EDGETALLY_CLUSTER_SECRET", crate::child::cluster_secret())],
    )
}

/// Records `n` readings round-robin over the producers; adds them to `want` (category →
/// count, hundredths).
fn record(
    producers: &[NativeProducer],
    n: usize,
    seed: &mut u64,
    want: &mut BTreeMap<String, (u64, i64)>,
) -> Result<()> {
    let now = now_ms();
    for i in 0..n {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let r = *seed >> 33;
        let (cat, cents) = if r.is_multiple_of(2) {
            ("temperature", 1800 + (r % 900) as i64)
        } else {
            ("humidity", 3000 + (r % 4000) as i64)
        };
        let device = format!("device-{:02}", r % 20);
        let ts = now - (r % 600_000) as i64;
        producers[i % producers.len()].record(
            cat,
            Some(&device),
            cents as f64 / 100.0,
            Some(ts),
        )?;
        let w = want.entry(cat.to_string()).or_default();
        w.0 += 1;
        w.1 += cents;
    }
    Ok(())
}

async fn flush_all(producers: &[NativeProducer]) -> Result<()> {
    for p in producers {
        if !p.flush(Duration::from_secs(60)).await {
            bail!("a producer's batches were not acknowledged in 60 s");
        }
    }
    Ok(())
}

fn hundredths(c: i64) -> String {
    let s = format!("{}.{:02}", c / 100, c % 100);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

pub fn run() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("edgetally-cluster-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "starting 3 mergers peered on loopback (data in {})",
        dir.display()
    );
    let mut nodes: Vec<Option<Merger>> = Vec::new();
    for i in 0..3 {
        let m = start(&dir, i)?;
        println!("  node {i}: {} quic {}", m.http, m.quic);
        nodes.push(Some(m));
    }
    let result = drive(&dir, &mut nodes);
    for m in nodes.into_iter().flatten() {
        m.stop();
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn drive(dir: &Path, nodes: &mut [Option<Merger>]) -> Result<()> {
    let endpoints: Vec<Endpoint> = nodes
        .iter()
        .flatten()
        .map(|m| Endpoint {
            addr: m.quic,
            cert: m.cert,
        })
        .collect();
    let https: Vec<String> = nodes.iter().flatten().map(|m| m.http.clone()).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    let config = edgetally_proto::ProducerConfig {
        flush_interval_ms: 100,
        max_batch_summaries: 100,
        backoff_max_ms: 1000,
        ..edgetally_proto::ProducerConfig::default()
    };
    let producers: Vec<NativeProducer> = (0..6)
        .map(|_| NativeProducer::start(config.clone(), endpoints.clone(), None))
        .collect::<Result<_, _>>()?;
    let mut want = BTreeMap::new();
    let mut seed = 7u64;
    record(&producers, 6000, &mut seed, &mut want)?;
    rt.block_on(flush_all(&producers))?;
    // Each producer sends to the node its key prefers (rendezvous hash); pushes and pulls
    // bring every batch to the others within a sync interval or two.
    std::thread::sleep(Duration::from_millis(1500));
    println!("6 producers sent 6000 readings as signed batches, each to the node its key prefers; per node:");
    for (i, h) in https.iter().enumerate() {
        let s = get(h, "/v1/status")?;
        println!(
            "  node {i}: {} batches applied; {} received by pulling from peers (some of those had arrived by push too)",
            s["batches_applied"], s["batches_pulled"]
        );
    }

    // Kill the node most producers prefer (the first in their rendezvous order).
    let names: Vec<String> = endpoints.iter().map(|e| e.addr.to_string()).collect();
    let mut preferred = [0usize; 3];
    for p in &producers {
        let order = edgetally_proto::producer::rendezvous_order(&p.producer_key().0, &names);
        preferred[order[0]] += 1;
    }
    let victim = (0..3).max_by_key(|i| preferred[*i]).unwrap_or(1);
    println!(
        "\nkill -9 node {victim} (preferred by {} of the producers), and keep recording: they fail over to the others",
        preferred[victim]
    );
    if let Some(m) = nodes[victim].take() {
        m.kill9();
    }
    record(&producers, 6000, &mut seed, &mut want)?;
    rt.block_on(flush_all(&producers))?;
    for (k, p) in producers.iter().enumerate() {
        let s = p.stats();
        println!(
            "  producer {k}: {} readings acked, {} retries",
            s.acked_records, s.retried
        );
    }
    println!("\nrestart node {victim} on its data; it catches up from its peers");
    let healed = Instant::now();
    nodes[victim] = Some(start(dir, victim)?);
    for p in &producers {
        p.close();
    }
    let hashes = || -> Vec<String> {
        https
            .iter()
            .map(|h| {
                get(h, "/v1/status")
                    .map(|s| s["state_sha256"].as_str().unwrap_or("").to_string())
                    .unwrap_or_default()
            })
            .collect()
    };
    loop {
        let h = hashes();
        if !h[0].is_empty() && h.iter().all(|x| *x == h[0]) {
            println!(
                "converged {:.1} s after the restart: every node's state hash is {}",
                healed.elapsed().as_secs_f64(),
                &h[0][..16]
            );
            break;
        }
        if healed.elapsed() > Duration::from_secs(60) {
            bail!("the cluster did not converge within 60 s: {h:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let (start, end) = (now_ms() - 3_600_000, now_ms() + 60_000);
    println!("\nper node, totals by category (expected computed here):");
    let mut ok = true;
    for (i, h) in https.iter().enumerate() {
        let v = get(
            h,
            &format!("/v1/totals?start={start}&end={end}&group_by=category"),
        )?;
        for g in v["groups"].as_array().into_iter().flatten() {
            let c = g["key"].as_str().unwrap_or("");
            let (n, cents) = want.get(c).copied().unwrap_or_default();
            let good = g["count"].as_u64() == Some(n)
                && g["sum_exact"].as_str() == Some(hundredths(cents).as_str());
            ok &= good;
            println!(
                "  node {i}  {c:<12} count {:>6} sum {:>12}   expected count {n:>6} sum {:>12}   {}",
                g["count"],
                g["sum_exact"].as_str().unwrap_or(""),
                hundredths(cents),
                if good { "ok" } else { "MISMATCH" }
            );
        }
    }
    if !ok {
        bail!("some answers differ from the expectation");
    }
    println!("\nall nodes agree with the expectation; stopping the cluster");
    Ok(())
}
