//! `edgetally-bench demo --cluster` (`cargo xtask demo --cluster`): three mergers peered on loopback (HTTP 7070/7072/7074, QUIC
//! 7071/7073/7075, fresh data directories), native SDK producers spread over all three; one
//! merger is killed mid-stream (its producers fail over), restarted, and catches up; then
//! each node's totals are printed beside the expectation computed here, with the time the
//! cluster took to converge.
//!
//! `--groups G` (G ≥ 2): G shard groups of two replicas each (node `i` in group `i / 2`, on
//! ports 7070 + 2i and 7071 + 2i), one topology file; every node answers for the whole
//! cluster, and each group holds only its own producers.

use anyhow::{bail, Result};
use edgetally_bench::launcher::{get_json as get, Merger};
use edgetally_net::{now_ms, Endpoint, NativeProducer};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

/// Which nodes a demo cluster has: `groups` ≤ 1, three peered nodes; else `groups` groups of
/// two replicas.
#[derive(Clone, Copy)]
struct Layout {
    groups: usize,
}

impl Layout {
    fn nodes(self) -> usize {
        if self.groups <= 1 {
            3
        } else {
            2 * self.groups
        }
    }
    /// Node `i`'s group (0 without groups).
    fn group(self, i: usize) -> usize {
        if self.groups <= 1 {
            0
        } else {
            i / 2
        }
    }
    fn quic(i: usize) -> String {
        format!("127.0.0.1:{}", 7071 + 2 * i as u16)
    }
    /// The topology file's text (groups only).
    fn topology(self) -> String {
        let mut s = "version = 1\n[[maps]]\nfrom_ms = 0\n".to_string();
        for g in 0..self.groups {
            s.push_str(&format!(
                "[[maps.groups]]\nname = \"g{g}\"\nquic = [\"{}\", \"{}\"]\n",
                Self::quic(2 * g),
                Self::quic(2 * g + 1)
            ));
        }
        s
    }
}

fn start(dir: &Path, i: usize, layout: Layout) -> Result<Merger> {
    let port = |n: usize| 7070 + n as u16;
    let mut args: Vec<OsString> = vec![
        "--data-dir".into(),
        dir.join(format!("node-{i}")).into(),
        "--http-addr".into(),
        format!("127.0.0.1:{}", port(2 * i)).into(),
        "--quic-addr".into(),
        Layout::quic(i).into(),
    ];
    for j in (0..layout.nodes()).filter(|j| *j != i && layout.group(*j) == layout.group(i)) {
        args.push("--peer".into());
        args.push(Layout::quic(j).into());
    }
    if layout.groups > 1 {
        args.push("--topology".into());
        args.push(dir.join("topology.toml").into());
        args.push("--group".into());
        args.push(format!("g{}", layout.group(i)).into());
    }
    Merger::start_with_env(
        &args,
        None,
        &[(
            "EDGETALLY_CLUSTER_SECRET",
            edgetally_bench::launcher::cluster_secret(),
        )],
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

pub fn run(groups: usize) -> Result<()> {
    let layout = Layout { groups };
    let dir = std::env::temp_dir().join(format!("edgetally-cluster-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    if groups > 1 {
        std::fs::write(dir.join("topology.toml"), layout.topology())?;
        println!(
            "starting {groups} shard groups of 2 mergers on loopback (data and topology.toml in {})",
            dir.display()
        );
    } else {
        println!(
            "starting 3 mergers peered on loopback (data in {})",
            dir.display()
        );
    }
    let mut nodes: Vec<Option<Merger>> = Vec::new();
    for i in 0..layout.nodes() {
        let m = start(&dir, i, layout)?;
        if groups > 1 {
            println!(
                "  node {i} (group g{}): {} quic {}",
                layout.group(i),
                m.http,
                m.quic
            );
        } else {
            println!("  node {i}: {} quic {}", m.http, m.quic);
        }
        nodes.push(Some(m));
    }
    let result = drive(&dir, &mut nodes, layout);
    for m in nodes.into_iter().flatten() {
        m.stop();
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn drive(dir: &Path, nodes: &mut [Option<Merger>], layout: Layout) -> Result<()> {
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
    if layout.groups > 1 {
        println!("6 producers sent 6000 readings as signed batches, each to the node its key prefers, which forwards it to the producer's group unless it is in it; per node:");
    } else {
        println!("6 producers sent 6000 readings as signed batches, each to the node its key prefers; per node:");
    }
    for (i, h) in https.iter().enumerate() {
        let s = get(h, "/v1/status")?;
        println!(
            "  node {i}: {} batches applied, of {} producers; {} received by pulling from peers (some of those had arrived by push too)",
            s["batches_applied"], s["producer_epochs"], s["batches_pulled"]
        );
    }

    // Kill the node most producers prefer (the first in their rendezvous order).
    let names: Vec<String> = endpoints.iter().map(|e| e.addr.to_string()).collect();
    let mut preferred = vec![0usize; names.len()];
    for p in &producers {
        let order = edgetally_proto::producer::rendezvous_order(&p.producer_key().0, &names);
        preferred[order[0]] += 1;
    }
    let victim = (0..names.len()).max_by_key(|i| preferred[*i]).unwrap_or(1);
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
    nodes[victim] = Some(start(dir, victim, layout)?);
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
        // Replicas of one group hold one state; groups hold different producers.
        let same = (0..h.len()).all(|i| {
            !h[i].is_empty()
                && (0..h.len())
                    .filter(|j| layout.group(*j) == layout.group(i))
                    .all(|j| h[j] == h[i])
        });
        if same {
            let mut groups: Vec<&str> = h.iter().map(|x| &x[..16]).collect();
            groups.dedup();
            println!(
                "converged {:.1} s after the restart: state hashes {}",
                healed.elapsed().as_secs_f64(),
                groups.join(", ")
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
