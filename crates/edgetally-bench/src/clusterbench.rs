//! `edgetally-bench clusterbench`: what replication costs and how fast a cluster heals, in one run.
//!
//! 1. Replication overhead: the same pre-signed batches pushed over QUIC to a single merger,
//!    then to one node of a three-node cluster (which pushes every batch to both peers, each
//!    of which verifies, stores and applies it); reported: ingest batches/s at the receiving
//!    node, and the time until all three hold identical states.
//! 2. Convergence after a partition: one node of the cluster is frozen (SIGSTOP), a backlog
//!    of batches goes to the others, the node is thawed; reported: the time from thaw until
//!    its state hash equals the others'.
//!
//! All processes share this machine's cores, so a three-node cluster here has a third of the
//! CPU per node that a real one would.

use crate::loadgen::{cpu_secs, make_batch, push_all};
use anyhow::{bail, Result};
use edgetally_bench::launcher::{free_udp, Merger};
use edgetally_net::now_ms;
use edgetally_proto::Signer;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct ClusterBenchArgs {
    /// Batches for the overhead comparison.
    #[arg(long, default_value_t = 20_000)]
    batches: usize,
    /// Batches in the backlog a partitioned node must catch up on.
    #[arg(long, default_value_t = 100_000)]
    backlog: usize,
    /// Summaries per batch.
    #[arg(long, default_value_t = 20)]
    summaries: u32,
    /// Shard-group counts to measure (per-node CPU per batch, RSS, query latency).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    groups: Vec<usize>,
    /// Replicas per shard group.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Batches for each shard-group run.
    #[arg(long, default_value_t = 40_000)]
    group_batches: usize,
    /// Only the shard-group runs.
    #[arg(long)]
    only_groups: bool,
}

fn start(dir: &Path, quic: SocketAddr, peers: &[SocketAddr]) -> Result<Merger> {
    edgetally_bench::launcher::start_node(dir, quic, peers, Vec::new())
}

fn state_hash(http: &str) -> String {
    edgetally_bench::launcher::get_json(http, "/v1/status")
        .ok()
        .and_then(|v| v["state_sha256"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Waits until every node reports the same state hash.
fn wait_converged(https: &[String], limit: Duration) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let h: Vec<String> = https.iter().map(|u| state_hash(u)).collect();
        if !h[0].is_empty() && h.iter().all(|x| *x == h[0]) {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            bail!("not converged within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sealed(n: usize, summaries: u32, salt: u8) -> Result<Arc<Vec<Vec<u8>>>> {
    let now = now_ms();
    let signers: Vec<Signer> = (0..8u8)
        .map(|i| Signer::from_seed([i + salt; 32]))
        .collect();
    let v = (0..n)
        .map(|i| {
            let s = &signers[i % signers.len()];
            s.seal(&make_batch(
                s,
                i % signers.len(),
                (i / signers.len()) as u64,
                summaries,
                now,
            ))
            .map_err(|e| anyhow::anyhow!("{e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Arc::new(v))
}

pub fn run(a: ClusterBenchArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("edgetally-clusterbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "machine: {} cores; batches of {} summaries",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        a.summaries
    );
    let result = (|| -> Result<()> {
        if !a.only_groups {
            replication(&rt, &dir, &a)?;
        }
        crate::groupbench::run(
            &rt,
            &dir,
            &a.groups,
            a.replicas.max(1),
            a.group_batches,
            a.summaries,
        )
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Replication overhead (a single node vs a three-node cluster) and the catch-up of a node
/// partitioned while a backlog arrived.
fn replication(rt: &tokio::runtime::Runtime, dir: &Path, a: &ClusterBenchArgs) -> Result<()> {
    // 1. Single node.
    let batches = sealed(a.batches, a.summaries, 60)?;
    let single = start(&dir.join("single"), free_udp()?, &[])?;
    let c0 = cpu_secs(single.pid()).unwrap_or(0.0);
    let (t1, _, _) = rt.block_on(push_all(single.quic, single.cert, batches.clone(), 256, 4))?;
    let single_cpu = (cpu_secs(single.pid()).unwrap_or(0.0) - c0) / batches.len() as f64;
    single.stop();
    let single_rate = batches.len() as f64 / t1;
    println!(
            "\nsingle merger: {} batches in {t1:.2} s = {single_rate:.0} batches/s; {:.1} µs CPU per acked batch",
            batches.len(),
            single_cpu * 1e6
        );

    // 2. Three-node cluster, everything sent to node 0.
    let quics: Vec<SocketAddr> = (0..3).map(|_| free_udp()).collect::<Result<_>>()?;
    let mut nodes: Vec<Option<Merger>> = Vec::new();
    for i in 0..3 {
        let peers: Vec<SocketAddr> = quics
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, q)| *q)
            .collect();
        nodes.push(Some(start(
            &dir.join(format!("node-{i}")),
            quics[i],
            &peers,
        )?));
    }
    let https: Vec<String> = nodes.iter().flatten().map(|m| m.http.clone()).collect();
    let n0 = nodes[0].as_ref().map(|m| (m.quic, m.cert));
    let Some((q0, c0)) = n0 else { bail!("node 0") };
    let pids: Vec<u32> = nodes.iter().flatten().map(Merger::pid).collect();
    let cpu_before: Vec<f64> = pids.iter().map(|p| cpu_secs(*p).unwrap_or(0.0)).collect();
    let (t2, _, _) = rt.block_on(push_all(q0, c0, batches.clone(), 256, 4))?;
    let all = wait_converged(&https, Duration::from_secs(600))?;
    let cluster_rate = batches.len() as f64 / t2;
    println!(
            "3-node cluster, all sent to node 0: {cluster_rate:.0} batches/s acknowledged at node 0 ({:.0} % of the single node); all 3 identical {:.2} s after the last ack ({:.0} batches/s replicated end to end)",
            100.0 * cluster_rate / single_rate,
            all.as_secs_f64(),
            batches.len() as f64 / (t2 + all.as_secs_f64())
        );
    // Let the pull rounds that follow convergence settle before reading the CPU clocks.
    std::thread::sleep(Duration::from_millis(1500));
    for (i, pid) in pids.iter().enumerate() {
        let per = (cpu_secs(*pid).unwrap_or(0.0) - cpu_before[i]) / batches.len() as f64;
        let st = edgetally_bench::launcher::get_json(&https[i], "/v1/status")?;
        println!(
                "  node {i} ({}): {:.1} µs CPU per acked batch = {:.2}x the single node ({} applied, {} duplicates, {} pulled)",
                if i == 0 { "entry" } else { "replica" },
                per * 1e6,
                per / single_cpu,
                st["batches_applied"],
                st["batches_duplicate"],
                st["batches_pulled"]
            );
    }

    // 3. Partition node 2, push a backlog to node 0, heal, time the catch-up.
    let backlog = sealed(a.backlog, a.summaries, 90)?;
    if let Some(m) = &nodes[2] {
        pause(m.pid(), true);
    }
    let (t3, _, _) = rt.block_on(push_all(q0, c0, backlog.clone(), 256, 4))?;
    // Nodes 0 and 1 first agree on the backlog (node 1 gets it by push and pull).
    let pair = wait_converged(&https[..2], Duration::from_secs(600))?;
    println!(
            "\npartition: node 2 frozen; {} batches sent to node 0 in {t3:.1} s; nodes 0 and 1 identical {:.2} s later",
            backlog.len(),
            pair.as_secs_f64()
        );
    if let Some(m) = &nodes[2] {
        pause(m.pid(), false);
    }
    let heal = wait_converged(&https, Duration::from_secs(900))?;
    println!(
        "healed: node 2 caught up on a backlog of {} batches in {:.2} s ({:.0} batches/s)",
        backlog.len(),
        heal.as_secs_f64(),
        backlog.len() as f64 / heal.as_secs_f64()
    );
    for m in nodes.into_iter().flatten() {
        m.stop();
    }
    Ok(())
}

fn pause(pid: u32, stop: bool) {
    let _ = std::process::Command::new("kill")
        .arg(if stop { "-STOP" } else { "-CONT" })
        .arg(pid.to_string())
        .status();
}
