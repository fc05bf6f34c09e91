//! `edgetally-bench clusterbench --groups 1,2,4`: what shard groups buy. For each S, a cluster of S
//! groups of R replicas on loopback; pre-signed batches of many producers sent round-robin to
//! every node (as producers holding the whole seed list would: a node forwards what another
//! group owns); reported per node: CPU-seconds per ingested batch (of the whole run's batches)
//! and RSS, which fall as ~1/S when the groups split the work; the query latency (p50/p99) of
//! each query kind gathered across the groups; and, for the largest S, the time a group added
//! by a new map takes to be routed to (every node reloaded) and the share of new batches it
//! then takes.
//!
//! All processes share this machine's cores: CPU-seconds per batch, not batches per second,
//! is what measures the design here.

use crate::loadgen::{cpu_secs, percentile, push_all};
use anyhow::{bail, Result};
use edgetally_bench::launcher::{free_udp, get_json, get_text, Merger};
use edgetally_net::now_ms;
use edgetally_proto::Signer;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A batch of producer `p`: `n` summaries, each of one of the producer's own 200 devices, so
/// series split with producers (a fleet of devices per producer).
fn batch(signer: &Signer, p: usize, seq: u64, n: u32, now: i64) -> Result<edgetally_core::Batch> {
    let e = |c: edgetally_core::RejectCode| anyhow::anyhow!("{c}");
    let mut b = edgetally_proto::BatchBuilder::new(1000).map_err(e)?;
    for i in 0..n {
        let device = format!("p{p}-d{:03}", (seq as u32 * n + i) % 200);
        b.record(
            &format!("metric-{}", p % 4),
            Some(&device),
            now,
            20.0 + f64::from(i % 5) / 2.0,
        )
        .map_err(e)?;
    }
    Ok(b.finish(
        edgetally_core::BatchId {
            producer: signer.producer(),
            epoch: now as u64,
            seq,
        },
        now,
    ))
}

/// `n` batches of `summaries` summaries from `producers` keys, created now.
fn sealed(n: usize, summaries: u32, producers: usize, salt: u32) -> Result<Arc<Vec<Vec<u8>>>> {
    let now = now_ms();
    let signers: Vec<Signer> = (0..producers)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..4].copy_from_slice(&(i as u32).to_le_bytes());
            seed[4..8].copy_from_slice(&salt.to_le_bytes());
            Signer::from_seed(seed)
        })
        .collect();
    let v = (0..n)
        .map(|i| {
            let s = &signers[i % producers];
            s.seal(&batch(
                s,
                i % producers,
                (i / producers) as u64,
                summaries,
                now,
            )?)
            .map_err(|e| anyhow::anyhow!("{e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Arc::new(v))
}

/// Page views for the skewed top-k: `n` batches from 512 producers of their own (so they
/// spread over every group), each of 50 views of pages drawn from a Zipf law (s = 1) over
/// 20,000 pages every producer shares — the top-k users ask for, where a page's count is
/// the sum of every group's.
fn page_views(n: usize) -> Result<Arc<Vec<Vec<u8>>>> {
    let now = now_ms();
    let e = |c: edgetally_core::RejectCode| anyhow::anyhow!("{c}");
    let mut cdf = Vec::with_capacity(20_000);
    let mut acc = 0.0;
    for rank in 1..=20_000u32 {
        acc += 1.0 / f64::from(rank);
        cdf.push(acc);
    }
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut draw = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let u = (x >> 11) as f64 / (1u64 << 53) as f64 * acc;
        cdf.partition_point(|&c| c < u)
    };
    let signers: Vec<Signer> = (0..512u32)
        .map(|i| {
            let mut seed = [0x5a; 32];
            seed[..4].copy_from_slice(&i.to_le_bytes());
            Signer::from_seed(seed)
        })
        .collect();
    (0..n)
        .map(|i| {
            let s = &signers[i % 512];
            let mut b = edgetally_proto::BatchBuilder::new(1000).map_err(e)?;
            for _ in 0..50 {
                b.record("page-views", Some(&format!("page-{:05}", draw())), now, 1.0)
                    .map_err(e)?;
            }
            let id = edgetally_core::BatchId {
                producer: s.producer(),
                epoch: now as u64,
                seq: (i / 512) as u64,
            };
            s.seal(&b.finish(id, now))
                .map_err(|e| anyhow::anyhow!("{e}"))
        })
        .collect::<Result<Vec<_>>>()
        .map(Arc::new)
}

/// A topology file's text: one map from 0, optionally a second from `later`.
fn topology(
    version: u64,
    groups: &[Vec<SocketAddr>],
    later: Option<(i64, &[Vec<SocketAddr>])>,
) -> String {
    let map = |from: i64, gs: &[Vec<SocketAddr>]| {
        let mut s = format!("[[maps]]\nfrom_ms = {from}\n");
        for (g, quic) in gs.iter().enumerate() {
            let q: Vec<String> = quic.iter().map(|a| format!("\"{a}\"")).collect();
            s.push_str(&format!(
                "[[maps.groups]]\nname = \"g{g}\"\nquic = [{}]\n",
                q.join(", ")
            ));
        }
        s
    };
    let mut s = format!("version = {version}\n{}", map(0, groups));
    if let Some((from, gs)) = later {
        s.push_str(&map(from, gs));
    }
    s
}

fn start(
    dir: &Path,
    quic: SocketAddr,
    peers: &[SocketAddr],
    topo: &Path,
    group: usize,
) -> Result<Merger> {
    let extra: Vec<OsString> = vec![
        "--topology".into(),
        topo.into(),
        "--group".into(),
        format!("g{group}").into(),
    ];
    edgetally_bench::launcher::start_node(dir, quic, peers, extra)
}

fn status_u64(http: &str, key: &str) -> u64 {
    get_json(http, "/v1/status")
        .ok()
        .and_then(|v| v[key].as_u64())
        .unwrap_or(0)
}

/// Pushes `batches` round-robin over `nodes`, all at once; the wall time.
fn push_round_robin(
    rt: &tokio::runtime::Runtime,
    nodes: &[&Merger],
    batches: &Arc<Vec<Vec<u8>>>,
) -> Result<f64> {
    let shares: Vec<Arc<Vec<Vec<u8>>>> = (0..nodes.len())
        .map(|k| {
            Arc::new(
                batches
                    .iter()
                    .skip(k)
                    .step_by(nodes.len())
                    .cloned()
                    .collect(),
            )
        })
        .collect();
    let t = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (m, share) in nodes.iter().zip(shares) {
            let (q, c) = (m.quic, m.cert);
            tasks.push(tokio::spawn(push_all(q, c, share, 128, 2)));
        }
        for t in tasks {
            t.await??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(t.elapsed().as_secs_f64())
}

/// Pushes each batch to a replica of the group that owns it (what a producer that knows the
/// topology would do: nothing is forwarded), all at once; the wall time.
fn push_to_owners(
    rt: &tokio::runtime::Runtime,
    groups: &[Vec<&Merger>],
    topo: &Path,
    batches: &Arc<Vec<Vec<u8>>>,
) -> Result<f64> {
    let t = edgetally_merger::cluster::load(topo).map_err(|e| anyhow::anyhow!(e))?;
    let limits = edgetally_core::Limits::default();
    let mut shares: Vec<Vec<Vec<Vec<u8>>>> =
        groups.iter().map(|g| vec![Vec::new(); g.len()]).collect();
    for (i, b) in batches.iter().enumerate() {
        let Some((id, created)) = edgetally_proto::peek(b, &limits) else {
            bail!("batch {i}")
        };
        let Some(owner) = t.owner(&id.producer, created) else {
            bail!("no owner")
        };
        let g: usize = owner.name.trim_start_matches('g').parse()?;
        let r = i % groups[g].len();
        shares[g][r].push(b.clone());
    }
    let started = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (g, per) in shares.into_iter().enumerate() {
            for (r, share) in per.into_iter().enumerate() {
                let m = groups[g][r];
                tasks.push(tokio::spawn(push_all(
                    m.quic,
                    m.cert,
                    Arc::new(share),
                    128,
                    2,
                )));
            }
        }
        for t in tasks {
            t.await??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(started.elapsed().as_secs_f64())
}

/// The node's estimate of its state's heap bytes (`edgetally_memory_bytes`, all kinds).
fn state_bytes(http: &str) -> f64 {
    get_text(http, "/metrics")
        .map(|t| {
            t.lines()
                .filter(|l| l.starts_with("edgetally_memory_bytes{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0)
}

/// Waits until the nodes' `batches_in_replica` sum to `want` (each group holds its share
/// once, each replica of it a copy: `replicas` copies of every batch in all).
fn wait_applied(nodes: &[&Merger], want: u64, limit: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        let n: u64 = nodes
            .iter()
            .map(|m| status_u64(&m.http, "batches_in_replica"))
            .sum();
        if n >= want {
            return Ok(());
        }
        if t.elapsed() > limit {
            bail!("only {n} of {want} batch copies applied within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// p50 and p99 of `n` runs of `GET path` at `http`, ms.
fn latency(http: &str, path: &str, n: usize) -> Result<(f64, f64)> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        get_text(http, path)?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    v.sort_by(f64::total_cmp);
    Ok((percentile(&v, 0.5), percentile(&v, 0.99)))
}

/// One measured cluster.
struct Run {
    /// Groups.
    s: usize,
    /// Replicas per group.
    replicas: usize,
    /// Batches sent to their owner group (else round-robin over every node, forwarded).
    routed: bool,
    /// Then add a group by a timed map.
    grow: bool,
}

/// One S: start the groups, push, measure; for `grow`, then add a group by a timed map.
fn one(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    batches: &Arc<Vec<Vec<u8>>>,
    summaries: u32,
    run: Run,
) -> Result<()> {
    let Run {
        s,
        replicas,
        routed,
        grow,
    } = run;
    let quics: Vec<Vec<SocketAddr>> = (0..s)
        .map(|_| (0..replicas).map(|_| free_udp()).collect::<Result<_>>())
        .collect::<Result<_>>()?;
    let topo = dir.join(format!("topology-{s}-{routed}.toml"));
    std::fs::write(&topo, topology(1, &quics, None))?;
    let mut nodes = Vec::new();
    for (g, group) in quics.iter().enumerate() {
        for (r, q) in group.iter().enumerate() {
            let peers: Vec<SocketAddr> = group.iter().filter(|p| *p != q).copied().collect();
            nodes.push(start(
                &dir.join(format!("s{s}-{routed}-g{g}-r{r}")),
                *q,
                &peers,
                &topo,
                g,
            )?);
        }
    }
    let refs: Vec<&Merger> = nodes.iter().collect();
    let cpu0: Vec<f64> = refs
        .iter()
        .map(|m| cpu_secs(m.pid()).unwrap_or(0.0))
        .collect();
    let state0: Vec<f64> = refs.iter().map(|m| state_bytes(&m.http)).collect();
    let wall = if routed {
        let groups: Vec<Vec<&Merger>> = refs.chunks(replicas).map(<[&Merger]>::to_vec).collect();
        push_to_owners(rt, &groups, &topo, batches)?
    } else {
        push_round_robin(rt, &refs, batches)?
    };
    wait_applied(
        &refs,
        (batches.len() * replicas) as u64,
        Duration::from_secs(600),
    )?;
    let n = batches.len() as f64;
    let mut per_node = Vec::new();
    for (i, m) in refs.iter().enumerate() {
        let cpu = cpu_secs(m.pid()).unwrap_or(0.0) - cpu0[i];
        let rss = crate::soak::rss_kib(m.pid()).unwrap_or(0);
        let state = state_bytes(&m.http) - state0[i];
        let st = get_json(&m.http, "/v1/status")?;
        per_node.push((cpu, rss, state));
        println!(
            "  node g{}-r{}: {:>7.1} µs CPU per ingested batch, state {:>6.2} MiB, RSS {:>6.1} MiB; {} batches, {} producers, {} series",
            i / replicas,
            i % replicas,
            cpu / n * 1e6,
            state / 1048576.0,
            rss as f64 / 1024.0,
            st["batches_in_replica"],
            st["producer_epochs"],
            st["admission"]["series"]
        );
    }
    let mean = |f: fn(&(f64, u64, f64)) -> f64| {
        per_node.iter().map(f).sum::<f64>() / per_node.len() as f64
    };
    println!(
        "S={s} R={replicas}, {}: {} batches of {summaries} summaries in {wall:.1} s wall; per node (mean): {:.1} µs CPU per ingested batch, state {:.2} MiB, RSS {:.1} MiB",
        if routed { "sent to the owner group" } else { "sent round-robin (forwarded)" },
        batches.len(),
        mean(|p| p.0) / n * 1e6,
        mean(|p| p.2) / 1048576.0,
        mean(|p| p.1 as f64) / 1024.0
    );
    // Page views (not in the figures above) for the skewed top-k.
    let pages = page_views(4_096)?;
    push_round_robin(rt, &refs, &pages)?;
    wait_applied(
        &refs,
        ((batches.len() + pages.len()) * replicas) as u64,
        Duration::from_secs(600),
    )?;
    // Query latency at the first node, each kind gathered across the groups.
    let (from, until) = (now_ms() - 600_000, now_ms() + 60_000);
    let w = format!("start={from}&end={until}");
    let series_start = now_ms() - 60_000;
    for (kind, path) in [
        ("aggregate", format!("/v1/aggregate?category=metric-0&{w}")),
        (
            "aggregate entity",
            format!("/v1/aggregate?category=metric-0&entity=device-00042&{w}"),
        ),
        (
            "series 60 steps",
            format!(
                "/v1/series?category=metric-0&start={series_start}&end={}&step_ms=1000",
                series_start + 60_000
            ),
        ),
        (
            "topk entity",
            format!("/v1/topk?category=metric-0&k=10&{w}"),
        ),
        (
            "topk entity skewed",
            format!("/v1/topk?category=page-views&k=10&{w}"),
        ),
        (
            "topk producer",
            format!("/v1/topk?category=metric-0&k=10&by=producer&{w}"),
        ),
        (
            "totals category",
            format!("/v1/totals?group_by=category&{w}"),
        ),
    ] {
        let (p50, p99) = latency(&refs[0].http, &path, 200)?;
        println!("  query {kind:<18} p50 {p50:>6.2} ms  p99 {p99:>6.2} ms");
    }
    if grow {
        // A new group, in force 2 s after the file is written.
        let q = free_udp()?;
        let mut grown = quics.clone();
        grown.push(vec![q]);
        let from = now_ms() + 2_000;
        let written = Instant::now();
        std::fs::write(&topo, topology(2, &quics, Some((from, &grown))))?;
        let extra = start(&dir.join(format!("s{s}-new")), q, &[], &topo, s)?;
        let mut all: Vec<&Merger> = refs.clone();
        all.push(&extra);
        let reloaded = loop {
            let versions: Vec<u64> = all
                .iter()
                .map(|m| {
                    get_json(&m.http, "/v1/status")
                        .ok()
                        .and_then(|v| v["topology"]["version"].as_u64())
                        .unwrap_or(0)
                })
                .collect();
            if versions.iter().all(|v| *v == 2) {
                break written.elapsed();
            }
            if written.elapsed() > Duration::from_secs(30) {
                bail!("not every node reloaded the topology: {versions:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while now_ms() < from {
            std::thread::sleep(Duration::from_millis(20));
        }
        let fresh = sealed(batches.len() / 4, summaries, 512, 0xfeed)?;
        let before: u64 = status_u64(&extra.http, "batches_in_replica");
        // Every batch is acknowledged once its owner applied it: the count is final here.
        push_round_robin(rt, &all[..all.len() - 1], &fresh)?;
        let took = status_u64(&extra.http, "batches_in_replica") - before;
        println!(
            "  a group added by a map in force 2 s ahead: every node routed by it {:.2} s after the file was written (reloads are checked every second); it took {took} of {} batches created since ({:.1} %, its fair share {:.1} %)",
            reloaded.as_secs_f64(),
            fresh.len(),
            100.0 * took as f64 / fresh.len() as f64,
            100.0 / (s + 1) as f64
        );
        extra.stop();
    }
    for m in nodes {
        m.stop();
    }
    Ok(())
}

/// Runs the shard-group scaling measurements for each S in `groups`.
pub fn run(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    groups: &[usize],
    replicas: usize,
    n: usize,
    summaries: u32,
) -> Result<()> {
    println!(
        "\nshard groups: {n} batches of {summaries} summaries from 512 producers (200 devices each); R = {replicas}"
    );
    std::fs::create_dir_all(dir)?;
    let batches = sealed(n, summaries, 512, 7)?;
    let last = groups.iter().copied().max().unwrap_or(1);
    for &s in groups {
        for routed in [true, false] {
            let run = Run {
                s,
                replicas,
                routed,
                grow: !routed && s == last,
            };
            one(rt, dir, &batches, summaries, run)?;
        }
    }
    Ok(())
}
