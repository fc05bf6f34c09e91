//! A rolling upgrade from the previous release. Three replicas of the previous release
//! (`EDGETALLY_PREVIOUS_BIN`, built from its commit by `cargo xtask upgrade`), peered under one
//! secret, take writes from native producers spread over all three. One node at a time is
//! stopped (SIGTERM) and started again on its data directory with this release's binary, the
//! producers writing throughout (failing over while it is down). After each step — two
//! releases side by side — and at the end, every node must hold the same state, equal to the
//! ground truth, and answer complete; a node of this release must list each peer of the
//! previous release with that release's protocol features, lacking only `sketches`. Producers
//! that record subjects and quantiles (batch format v2) start while one node still runs the
//! previous release: the batches it refuses for their version must fail over, none lost, and
//! at the end every node must answer a single node's distinct counts and quantiles.
//!
//! A second test runs two shard groups of the two releases side by side and asks each for a
//! top-k whose counts are sums over both groups (the rounds of this release against every row
//! from the previous one).

use crate::cluster::{
    mismatches, record_phase, record_phase_with, sketch_mismatches, status_hash, SketchTruth,
    Truth, QUANTILE_CATEGORY,
};
use crate::groups::{flush, start_producers};
use crate::harness::{free_udp, now_ms, Merger, TempDir};
use edgetally_net::{Endpoint, NativeProducer};
use edgetally_proto::ProducerConfig;
use edgetally_tests::Rng;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ENV: &[(&str, &str)] = &[
    ("EDGETALLY_SYNC_INTERVAL_MS", "200"),
    ("EDGETALLY_SNAPSHOT_INTERVAL_SECS", "2"),
    ("EDGETALLY_CLUSTER_SECRET", "upgrade-test-secret"),
];

/// The features this release's handshake reports for a node of the previous release (commit
/// 53efa37, which sends its list), and for one of this release (merger::handshake::FEATURES),
/// restated; and what a node of the previous release lacks (batch format v2 and format-6
/// snapshots are not sent to it).
const PREVIOUS_FEATURES: &[&str] = &[
    "facts",
    "forward-source",
    "topology-agreement",
    "handoffs",
    "features",
];
const PREVIOUS_LACKS: &[&str] = &["sketches", "topk-rounds"];
const FEATURES: &[&str] = &[
    "facts",
    "forward-source",
    "topology-agreement",
    "handoffs",
    "features",
    "sketches",
    "topk-rounds",
];

struct Node {
    dir: TempDir,
    quic: SocketAddr,
    peers: Vec<SocketAddr>,
    upgraded: bool,
    proc: Option<Merger>,
}

impl Node {
    fn start(&mut self, bin: &Path) {
        let mut extra: Vec<String> = Vec::new();
        for p in &self.peers {
            extra.push("--peer".into());
            extra.push(p.to_string());
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        self.proc = Some(Merger::start_bin(
            bin,
            &self.dir.0,
            &self.quic.to_string(),
            &extra,
            ENV,
        ));
    }
    fn m(&self) -> &Merger {
        self.proc.as_ref().expect("running")
    }
}

/// Waits (bounded) until every node holds the same state, equal to the truth, and says it
/// sees all its peers.
fn converged(nodes: &[Node], truth: &Truth, start: i64, end: i64) -> Result<Duration, String> {
    let t0 = Instant::now();
    let within = Duration::from_secs(90);
    loop {
        let hashes: Vec<Option<String>> = nodes.iter().map(|n| status_hash(n.m())).collect();
        let same = hashes.iter().all(|h| h.is_some() && *h == hashes[0]);
        let complete = nodes
            .iter()
            .all(|n| n.m().get("/v1/status").1["complete"] == true);
        if same
            && complete
            && nodes
                .iter()
                .all(|n| mismatches(n.m(), truth, start, end).is_empty())
        {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > within {
            let detail: Vec<String> = nodes
                .iter()
                .map(|n| {
                    let bad = mismatches(n.m(), truth, start, end);
                    let (_, st) = n.m().get("/v1/status");
                    format!(
                        "upgraded {}: {} mismatches (first {:?}), complete {}, peers {}",
                        n.upgraded,
                        bad.len(),
                        bad.first(),
                        st["complete"],
                        st["peers"]
                    )
                })
                .collect();
            return Err(format!(
                "not converged within {within:?}: hashes {hashes:?}; {detail:#?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Batches node `n` refused as `unsupported_version` (read from its raw exposition: a node of
/// the previous release has its own metric families).
fn version_refusals(n: &Node) -> f64 {
    let (_, text) = n.m().get("/metrics");
    edgetally_bench::launcher::metric_value(
        text.as_str().unwrap_or_default(),
        "edgetally_batches_rejected_total{reason=\"unsupported_version\"}",
    )
    .unwrap_or(0.0)
}

/// Every node of this release lists each peer with its release's features, lacking only what the previous release lacks.
fn features_seen(nodes: &[Node]) -> Result<(), String> {
    for n in nodes.iter().filter(|n| n.upgraded) {
        let (_, st) = n.m().get("/v1/status");
        for p in st["peers"].as_array().ok_or("no peers")? {
            let addr = p["addr"].as_str().unwrap_or_default();
            let peer = nodes
                .iter()
                .find(|o| o.quic.to_string() == addr)
                .ok_or_else(|| format!("unknown peer {addr}"))?;
            let (want, lacks) = if peer.upgraded {
                (FEATURES, &[][..])
            } else {
                (PREVIOUS_FEATURES, PREVIOUS_LACKS)
            };
            let hs = &p["handshake"];
            if hs["features"] != serde_json::json!(want) || hs["lacks"] != serde_json::json!(lacks)
            {
                return Err(format!(
                    "{} sees {addr} (upgraded: {}) with {hs}",
                    n.quic, peer.upgraded
                ));
            }
        }
    }
    Ok(())
}

/// The previous release's `edgetally` (`EDGETALLY_PREVIOUS_BIN`, set by `cargo xtask upgrade`).
fn previous_release() -> PathBuf {
    PathBuf::from(
        std::env::var_os("EDGETALLY_PREVIOUS_BIN").expect(
            "EDGETALLY_PREVIOUS_BIN: the previous release's edgetally (cargo xtask upgrade)",
        ),
    )
}

#[test]
#[ignore = "needs the previous release's binary: cargo xtask upgrade builds it and runs this"]
fn a_rolling_upgrade_from_the_previous_release_loses_nothing() {
    let previous = previous_release();
    let current = crate::harness::binary();
    let mut rng = Rng::new(29);
    let quics: Vec<SocketAddr> = (0..3).map(|_| free_udp()).collect();
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| Node {
            dir: TempDir::new(&format!("upgrade-{i}")),
            quic: quics[i],
            peers: quics
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, q)| *q)
                .collect(),
            upgraded: false,
            proc: None,
        })
        .collect();
    for n in &mut nodes {
        n.start(&previous);
    }
    let endpoints: Vec<Endpoint> = nodes
        .iter()
        .map(|n| Endpoint {
            addr: n.quic,
            cert: n.m().cert,
        })
        .collect();
    let rt = crate::harness::runtime();
    let _guard = rt.enter();
    let config = ProducerConfig {
        flush_interval_ms: 50,
        max_batch_summaries: 40,
        backoff_base_ms: 50,
        backoff_max_ms: 1000,
        ..ProducerConfig::default()
    };
    let producers = start_producers(&rt, &config, &endpoints, 4);
    let flush = |producers: &[NativeProducer]| flush(&rt, producers);
    let start = now_ms() - 60_000;
    let end = now_ms() + 3_600_000;
    let mut truth = Truth::new();
    record_phase(&rt, &producers, &mut rng, &mut truth, 1000);
    flush(&producers);
    let took =
        converged(&nodes, &truth, start, end).unwrap_or_else(|e| panic!("all previous: {e}"));
    eprintln!("upgrade: three nodes of the previous release converged in {took:?}");
    let sketch_config = ProducerConfig {
        quantile_categories: vec![QUANTILE_CATEGORY.to_string()],
        ..config
    };
    let mut sketching = Vec::new();
    let mut sketched = SketchTruth::default();
    for i in 0..3 {
        // Stop one node cleanly; the producers write on, failing over to the others.
        let m = nodes[i].proc.take().expect("running");
        assert!(m.terminate(), "node {i} did not stop cleanly");
        record_phase(&rt, &producers, &mut rng, &mut truth, 800);
        // Start it again on its data with this release.
        nodes[i].upgraded = true;
        nodes[i].start(&current);
        record_phase(&rt, &producers, &mut rng, &mut truth, 800);
        flush(&producers);
        let took = converged(&nodes, &truth, start, end)
            .unwrap_or_else(|e| panic!("after upgrading node {i}: {e}"));
        features_seen(&nodes).unwrap_or_else(|e| panic!("after upgrading node {i}: {e}"));
        eprintln!(
            "upgrade: node {i} runs this release ({} of 3); {} events so far; converged {took:?} after the writes",
            i + 1,
            truth.values().map(|t| t.0).sum::<u64>()
        );
        if i == 1 {
            // Producers start recording subjects and quantiles (batch format v2) while node
            // 2 still runs the previous release. It refuses their batches for their version
            // (`unsupported_version`); they must keep them and fail over to an upgraded
            // node — `flush` asserts none was refused or dropped. Producers between node 2
            // and node 0 are added until node 2 has refused at least one batch.
            for _ in 0..16 {
                let pair = [endpoints[2].clone(), endpoints[0].clone()];
                let added = start_producers(&rt, &sketch_config, &pair, 1);
                record_phase_with(&rt, &added, &mut rng, &mut truth, Some(&mut sketched), 300);
                flush(&added);
                sketching.extend(added);
                if version_refusals(&nodes[2]) > 0.0 {
                    break;
                }
            }
            let refused = version_refusals(&nodes[2]);
            assert!(
                refused > 0.0,
                "node 2 (previous release) was never sent a v2 batch"
            );
            eprintln!(
                "upgrade: node 2, of the previous release, refused {refused} v2 batches; every one was acked by an upgraded node"
            );
        }
    }
    // Every node runs this release and holds every batch: each must answer a single node's
    // distinct counts and quantiles.
    for n in &nodes {
        let bad = sketch_mismatches(n.m(), &sketched, start, end);
        assert!(bad.is_empty(), "{}: {bad:?}", n.quic);
    }
    for p in producers.iter().chain(&sketching) {
        p.close();
    }
}

/// Two shard groups of two releases: g0 runs this release, g1 the previous one (no
/// `topk-rounds`). Eight producers' batches go to their owner groups, so every entity's count
/// is a sum over both. `/v1/topk` at either node must rank the sums exactly and say so
/// (`complete`): this release falls back to every row for a group that cannot take the
/// rounds, and answers the previous release's query.
#[test]
#[ignore = "needs the previous release's binary: cargo xtask upgrade builds it and runs this"]
fn a_top_k_across_groups_of_two_releases_is_exact() {
    let previous = previous_release();
    let (q0, q1) = (free_udp(), free_udp());
    let dirs = (
        TempDir::new("upgrade-topk-0"),
        TempDir::new("upgrade-topk-1"),
    );
    let topo = dirs.0 .0.join("topology.toml");
    std::fs::write(
        &topo,
        format!(
            "version = 1\n[[maps]]\nfrom_ms = 0\n[[maps.groups]]\nname = \"g0\"\nquic = [\"{q0}\"]\n[[maps.groups]]\nname = \"g1\"\nquic = [\"{q1}\"]\n"
        ),
    )
    .expect("topology");
    let t = topo.display().to_string();
    let new = Merger::start_at(
        &dirs.0 .0,
        &q0.to_string(),
        &["--topology", &t, "--group", "g0"],
        ENV,
    );
    let old = Merger::start_bin(
        &previous,
        &dirs.1 .0,
        &q1.to_string(),
        &["--topology", &t, "--group", "g1"],
        ENV,
    );
    let rt = crate::harness::runtime();
    let _guard = rt.enter();
    let endpoints: Vec<Endpoint> = [(&new, q0), (&old, q1)]
        .iter()
        .map(|(m, addr)| Endpoint {
            addr: *addr,
            cert: m.cert,
        })
        .collect();
    let config = ProducerConfig {
        flush_interval_ms: 50,
        ..ProducerConfig::default()
    };
    let producers = start_producers(&rt, &config, &endpoints, 8);
    let mut truth = Truth::new();
    record_phase(&rt, &producers, &mut Rng::new(31), &mut truth, 1500);
    flush(&rt, &producers);
    for m in [&new, &old] {
        let held = m.get("/v1/status").1["batches_in_replica"].as_u64();
        assert!(held > Some(0), "a group holds no batch: {held:?}");
    }
    let mut want: Vec<(String, u64)> = truth
        .iter()
        .filter(|((c, _), _)| c == "clicks")
        .map(|((_, e), t)| (e.clone(), t.0))
        .collect();
    want.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    want.truncate(3);
    let now = now_ms();
    let (start, end) = (now - 3_600_000, now + 60_000);
    let deadline = Instant::now() + Duration::from_secs(30);
    for (who, node) in [("this release", &new), ("the previous release", &old)] {
        loop {
            let (status, v) = node.get(&format!(
                "/v1/topk?category=clicks&k=3&start={start}&end={end}"
            ));
            let got: Vec<(String, u64)> = v["items"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|r| {
                            let name = r["key"].as_str().unwrap_or_default().to_string();
                            (name, r["count"].as_u64().unwrap_or(0))
                        })
                        .collect()
                })
                .unwrap_or_default();
            if status == 200 && v["complete"] == true && got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "top-k at the node of {who}: {got:?} (complete {}) != {want:?}",
                v["complete"]
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    drop(producers);
    new.terminate();
    old.terminate();
}
