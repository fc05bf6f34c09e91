//! Shard groups with real binaries on loopback: two groups of two replicas, native producers
//! that know every node (so most batches reach a node of the wrong group and are forwarded).
//! One replica of each group is `kill -9`'d mid-run and restarted; a third group is added by a
//! new map taking effect a few seconds ahead, while producers keep recording across the
//! change. Once flushed, every query on every node equals the ground truth (aggregates per
//! key, totals by category, top-k by entity and by producer), each group holds only its own
//! producers, and with a whole group down the answers are marked incomplete and never exceed
//! the truth.

use crate::harness::{agent, free_udp, keyed_until_applied, now_ms, runtime, Merger, TempDir};
use edgetally_net::{Endpoint, NativeProducer};
use edgetally_proto::ProducerConfig;
use edgetally_tests::{decimal, Rng};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const ENV: &[(&str, &str)] = &[
    ("EDGETALLY_SYNC_INTERVAL_MS", "200"),
    ("EDGETALLY_SNAPSHOT_INTERVAL_SECS", "2"),
    ("EDGETALLY_CLUSTER_SECRET", "groups-test-secret"),
    // Forwarded batches all come from 127.0.0.1: no per-source limit in this test.
    ("EDGETALLY_SOURCE_BATCHES_PER_SEC", "0"),
    ("EDGETALLY_PRODUCER_BATCHES_PER_SEC", "0"),
    ("EDGETALLY_QUERY_DEADLINE_MS", "1500"),
];

struct Node {
    dir: TempDir,
    quic: SocketAddr,
    group: &'static str,
    peers: Vec<SocketAddr>,
    proc: Option<Merger>,
}

impl Node {
    fn start(&mut self, topology: &Path) {
        self.start_with(topology, &[]);
    }

    /// Starts the node with variables beyond [`ENV`] (a setting being rolled out).
    fn start_with(&mut self, topology: &Path, env: &[(&str, &str)]) {
        let mut extra: Vec<String> = vec![
            "--topology".into(),
            topology.display().to_string(),
            "--group".into(),
            self.group.into(),
        ];
        for p in &self.peers {
            extra.push("--peer".into());
            extra.push(p.to_string());
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut all_env = ENV.to_vec();
        all_env.extend_from_slice(env);
        self.proc = Some(Merger::start_at(
            &self.dir.0,
            &self.quic.to_string(),
            &extra,
            &all_env,
        ));
    }
    fn m(&self) -> &Merger {
        self.proc.as_ref().expect("running")
    }
}

/// A group: its name and replicas.
type GroupDef = (&'static str, Vec<SocketAddr>);

/// A TOML topology: `maps` of (from_ms, groups).
fn topology(version: u64, maps: &[(i64, Vec<GroupDef>)]) -> String {
    let mut s = format!("version = {version}\n");
    for (from, groups) in maps {
        s.push_str(&format!("[[maps]]\nfrom_ms = {from}\n"));
        for (name, quic) in groups {
            let q: Vec<String> = quic.iter().map(|a| format!("\"{a}\"")).collect();
            s.push_str(&format!(
                "[[maps.groups]]\nname = \"{name}\"\nquic = [{}]\n",
                q.join(", ")
            ));
        }
    }
    s
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write topology");
    std::fs::rename(&tmp, path).expect("rename topology");
}

#[derive(Default)]
struct Truth {
    /// (category, entity) → (count, exact sum in nano-units).
    keys: BTreeMap<(String, String), (u64, i128)>,
    /// (category, producer key hex) → count.
    producers: BTreeMap<(String, String), u64>,
}

fn record(
    rt: &tokio::runtime::Runtime,
    producers: &[NativeProducer],
    rng: &mut Rng,
    truth: &mut Truth,
    n: usize,
) {
    let now = now_ms();
    for i in 0..n {
        let cat = ["clicks", "latency"][rng.below(2) as usize];
        let ent = format!("e{}", rng.below(8));
        let eighths = rng.below(2001) as i64 - 1000;
        let p = &producers[rng.below(producers.len() as u64) as usize];
        let ts = now - rng.below(20_000) as i64;
        p.record(cat, Some(&ent), eighths as f64 / 8.0, Some(ts))
            .expect("valid event");
        let t = truth.keys.entry((cat.to_string(), ent)).or_default();
        t.0 += 1;
        t.1 += eighths as i128 * 125_000_000;
        *truth
            .producers
            .entry((cat.to_string(), p.producer_key().to_hex()))
            .or_default() += 1;
        if i % 50 == 49 {
            rt.block_on(tokio::time::sleep(Duration::from_millis(10)));
        }
    }
}

/// Every answer of `m` against the truth; the mismatches.
fn mismatches(m: &Merger, truth: &Truth, start: i64, end: i64) -> Vec<String> {
    let mut bad = Vec::new();
    let w = format!("start={start}&end={end}");
    for ((cat, ent), (count, sum)) in &truth.keys {
        let (_, v) = m.get(&format!("/v1/aggregate?category={cat}&entity={ent}&{w}"));
        if v["count"].as_u64() != Some(*count) || v["sum_exact"].as_str() != Some(&decimal(*sum)) {
            bad.push(format!("{cat}/{ent}: {} {}", v["count"], v["sum_exact"]));
        }
    }
    // Totals by category: the sum over the truth's keys.
    let mut by_cat: BTreeMap<&str, (u64, i128)> = BTreeMap::new();
    for ((cat, _), (c, s)) in &truth.keys {
        let e = by_cat.entry(cat).or_default();
        e.0 += c;
        e.1 += s;
    }
    let (_, v) = m.get(&format!("/v1/totals?group_by=category&{w}"));
    let got: BTreeMap<String, (u64, String)> = v["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            (
                g["key"].as_str().unwrap_or("").to_string(),
                (
                    g["count"].as_u64().unwrap_or(0),
                    g["sum_exact"].as_str().unwrap_or("").to_string(),
                ),
            )
        })
        .collect();
    let want: BTreeMap<String, (u64, String)> = by_cat
        .iter()
        .map(|(c, (n, s))| (c.to_string(), (*n, decimal(*s))))
        .collect();
    if got != want {
        bad.push(format!("totals: {got:?} != {want:?}"));
    }
    // Top-k, exact across groups: the truth ranked by count, ties by name.
    for cat in by_cat.keys() {
        for (by, rows) in [
            (
                "entity",
                truth
                    .keys
                    .iter()
                    .filter(|((c, _), _)| c == cat)
                    .map(|((_, e), (n, _))| (e.clone(), *n))
                    .collect::<Vec<_>>(),
            ),
            (
                "producer",
                truth
                    .producers
                    .iter()
                    .filter(|((c, _), _)| c == cat)
                    .map(|((_, p), n)| (p.clone(), *n))
                    .collect(),
            ),
        ] {
            let mut want = rows;
            want.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            want.truncate(5);
            let (_, v) = m.get(&format!("/v1/topk?category={cat}&k=5&by={by}&{w}"));
            let got: Vec<(String, u64)> = v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    (
                        r["key"].as_str().unwrap_or("").to_string(),
                        r["count"].as_u64().unwrap_or(0),
                    )
                })
                .collect();
            if got != want {
                bad.push(format!("topk {cat} by {by}: {got:?} != {want:?}"));
            }
        }
    }
    bad
}

/// Waits (bounded) until every running node's answers equal the truth, complete, from
/// `groups` shard groups.
fn all_match(nodes: &[Node], truth: &Truth, start: i64, end: i64, groups: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, n) in nodes.iter().enumerate() {
        let Some(m) = &n.proc else { continue };
        loop {
            let bad = mismatches(m, truth, start, end);
            if bad.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} ({}) never matched the truth: {} mismatches, first {:?}",
                n.group,
                bad.len(),
                bad.first()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let (_, v) = m.get(&format!("/v1/totals?start={start}&end={end}"));
        assert_eq!(v["complete"], true, "node {i}: {v}");
        assert_eq!(
            v["shard_groups"].as_array().map(Vec::len),
            Some(groups),
            "node {i}: {v}"
        );
    }
}

/// The nodes as a native producer's endpoints.
fn endpoints_of(nodes: &[Node]) -> Vec<Endpoint> {
    nodes
        .iter()
        .map(|n| Endpoint {
            addr: n.quic,
            cert: n.m().cert,
        })
        .collect()
}

/// `n` native producers with fresh keys, each knowing `endpoints`.
pub(crate) fn start_producers(
    rt: &tokio::runtime::Runtime,
    config: &ProducerConfig,
    endpoints: &[Endpoint],
    n: usize,
) -> Vec<NativeProducer> {
    rt.block_on(async {
        (0..n)
            .map(|_| NativeProducer::start(config.clone(), endpoints.to_vec(), None))
            .collect::<Result<_, _>>()
    })
    .expect("producers")
}

/// Waits until every producer's batches are acknowledged; none refused or dropped.
pub(crate) fn flush(rt: &tokio::runtime::Runtime, producers: &[NativeProducer]) {
    for (i, p) in producers.iter().enumerate() {
        assert!(
            rt.block_on(p.flush(Duration::from_secs(60))),
            "producer {i} not flushed: {:?}",
            p.stats()
        );
        let s = p.stats();
        assert!(
            s.rejected.is_empty() && s.dropped == 0,
            "producer {i}: {s:?}"
        );
    }
}

fn epochs(m: &Merger) -> u64 {
    m.get("/v1/status").1["producer_epochs"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn shard_groups_split_producers_and_answer_exactly_through_kills_and_a_new_group() {
    let mut rng = Rng::new(13);
    let q: Vec<SocketAddr> = (0..5).map(|_| free_udp()).collect();
    let topo_dir = TempDir::new("groups-topology");
    let topo = topo_dir.0.join("topology.toml");
    let g0 = ("g0", vec![q[0], q[1]]);
    let g1 = ("g1", vec![q[2], q[3]]);
    write_atomic(&topo, &topology(1, &[(0, vec![g0.clone(), g1.clone()])]));
    let mut nodes: Vec<Node> = [
        ("g0", 0, 1),
        ("g0", 1, 0),
        ("g1", 2, 3),
        ("g1", 3, 2),
        ("g2", 4, 4),
    ]
    .into_iter()
    .map(|(group, i, peer)| Node {
        dir: TempDir::new(&format!("groups-{i}")),
        quic: q[i],
        group,
        peers: if peer == i { vec![] } else { vec![q[peer]] },
        proc: None,
    })
    .collect();
    for n in nodes.iter_mut().take(4) {
        n.start(&topo);
    }
    let rt = runtime();
    let _guard = rt.enter();
    let config = ProducerConfig {
        flush_interval_ms: 50,
        max_batch_summaries: 40,
        backoff_base_ms: 50,
        backoff_max_ms: 1000,
        ..ProducerConfig::default()
    };
    // Producers know every node of the first two groups, not the third: it is reached only
    // through forwarding.
    let endpoints = endpoints_of(&nodes[..4]);
    let producers: Vec<NativeProducer> = start_producers(&rt, &config, &endpoints, 16);
    let start = now_ms() - 60_000;
    let mut truth = Truth::default();

    // 1. All up.
    record(&rt, &producers, &mut rng, &mut truth, 1500);
    // One verdict per batch: a batch of g1's with a broken signature, sent to a node of g0,
    // is forwarded and gets the owner's Nack (bad_signature), as it would at the owner; the
    // same batch intact is acknowledged through the same node and counted.
    let v1 = edgetally_proto::topology::Topology::single(
        1,
        ["g0", "g1"]
            .iter()
            .map(|n| edgetally_proto::topology::Group {
                name: n.to_string(),
                quic: vec![n.to_string()],
                http: Vec::new(),
            })
            .collect(),
    );
    let now = now_ms();
    let s = (0..)
        .map(edgetally_tests::signer)
        .find(|s| v1.owner(&s.producer(), now).map(|g| g.name.as_str()) == Some("g1"))
        .expect("a producer of g1");
    let ev = edgetally_tests::Event {
        category: "forwarded".into(),
        entity: Some("e".into()),
        ts_ms: now,
        eighths: 8,
    };
    let id = edgetally_core::BatchId {
        producer: s.producer(),
        epoch: 1,
        seq: 0,
    };
    let good = s
        .seal(&edgetally_tests::build_at(id, &[ev], now))
        .expect("seal");
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let client = rt
        .block_on(edgetally_net::Client::connect(
            nodes[0].quic,
            vec![nodes[0].m().cert],
        ))
        .expect("connect");
    assert_eq!(
        rt.block_on(client.send(&bad)).expect("reply"),
        edgetally_proto::Reply::Nack(edgetally_core::RejectCode::BadSignature as u16)
    );
    assert_eq!(
        rt.block_on(client.send(&good)).expect("reply"),
        edgetally_proto::Reply::Ack
    );
    truth
        .keys
        .entry(("forwarded".into(), "e".into()))
        .or_default()
        .0 += 1;
    truth
        .keys
        .entry(("forwarded".into(), "e".into()))
        .or_default()
        .1 += 1_000_000_000;
    *truth
        .producers
        .entry(("forwarded".into(), s.producer().to_hex()))
        .or_default() += 1;
    // 2. kill -9 a replica of each group, keep recording, restart them on their data.
    for i in [1, 3] {
        if let Some(m) = nodes[i].proc.take() {
            m.kill9();
        }
    }
    record(&rt, &producers, &mut rng, &mut truth, 1500);
    for i in [1, 3] {
        nodes[i].start(&topo);
    }
    // 3. A third group, in force 3 s from now; the nodes reload the file within a second.
    let change = now_ms() + 3_000;
    let g2_from = change;
    let g2 = ("g2", vec![q[4]]);
    write_atomic(
        &topo,
        &topology(
            2,
            &[
                (0, vec![g0.clone(), g1.clone()]),
                (change, vec![g0.clone(), g1.clone(), g2.clone()]),
            ],
        ),
    );
    nodes[4].start(&topo);
    // Recording across the change: batches created before it keep their old owner, even
    // when resent after it.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        record(&rt, &producers, &mut rng, &mut truth, 200);
    }
    flush(&rt, &producers);
    let end = now_ms() + 60_000;

    // Every node answers for the whole cluster, exactly, once the groups' replicas converge.
    all_match(&nodes, &truth, start, end, 3);
    // The state is split: each group holds its own producers' epochs, replicas agree within a
    // group, and the new group took a share of the batches created after the change.
    let (e0, e1, e2) = (
        epochs(nodes[0].m()),
        epochs(nodes[2].m()),
        epochs(nodes[4].m()),
    );
    assert_eq!(epochs(nodes[1].m()), e0);
    assert_eq!(epochs(nodes[3].m()), e1);
    assert!(
        e0 > 0 && e1 > 0 && e2 > 0,
        "epochs per group {e0} {e1} {e2}"
    );
    // Every producer recorded before the change, under a map of g0 and g1: each is in exactly
    // one of them (unforwarded, most would be in both) — the 16 producers and the one whose
    // batch was sent through g0 above.
    assert_eq!(e0 + e1, 17, "epochs per group {e0} {e1} {e2}");
    let forwarded: f64 = nodes
        .iter()
        .map(|n| n.m().metric("edgetally_forwarded_total{outcome=\"sent\"}"))
        .sum();
    assert!(forwarded > 0.0, "nothing was forwarded");
    assert!(nodes[0].m().metric("edgetally_topology_version") == 2.0);

    // 4. Drain g2 into g0 (and, for batches created from a few seconds on, a map without it),
    //    recording all along; once g0's replicas absorbed g2's state, g2 goes away for good.
    let change = now_ms() + 3_000;
    let mut v3 = topology(
        3,
        &[
            (0, vec![g0.clone(), g1.clone()]),
            (g2_from, vec![g0.clone(), g1.clone(), g2.clone()]),
            (change, vec![g0.clone(), g1.clone()]),
        ],
    );
    v3.push_str("[drains]\ng2 = \"g0\"\n");
    write_atomic(&topo, &v3);
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        record(&rt, &producers, &mut rng, &mut truth, 200);
    }
    flush(&rt, &producers);
    let absorbed_within = Instant::now() + Duration::from_secs(60);
    for i in [0, 1] {
        while nodes[i].m().get("/v1/status").1["topology"]["absorbed"] != serde_json::json!(["g2"])
        {
            assert!(
                Instant::now() < absorbed_within,
                "node {i} never absorbed g2"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // g2 still answers, and its state is in g0's answer too: left out, not counted twice.
    all_match(&nodes, &truth, start, end, 3);
    if let Some(m) = nodes[4].proc.take() {
        m.kill9();
    }
    all_match(&nodes, &truth, start, end, 3);
    let (_, v) = nodes[2]
        .m()
        .get(&format!("/v1/totals?start={start}&end={end}"));
    let g2_part = v["shard_groups"]
        .as_array()
        .and_then(|a| a.iter().find(|g| g["name"] == "g2"))
        .cloned()
        .expect("g2 listed");
    assert_eq!(
        (&g2_part["answered"], &g2_part["absorbed_by"]),
        (&Value::Bool(false), &Value::from("g0")),
        "{v}"
    );

    // 5. A whole group down: answers are marked incomplete and never exceed the truth.
    for i in [2, 3] {
        if let Some(m) = nodes[i].proc.take() {
            m.kill9();
        }
    }
    let total: u64 = truth.keys.values().map(|t| t.0).sum();
    let (_, v) = nodes[0]
        .m()
        .get(&format!("/v1/totals?start={start}&end={end}"));
    assert_eq!(v["complete"], false, "{v}");
    let missing: Vec<&Value> = v["shard_groups"]
        .as_array()
        .expect("shard_groups")
        .iter()
        .filter(|g| g["answered"] == false && g["absorbed_by"].is_null())
        .collect();
    assert_eq!(missing.len(), 1, "{v}");
    assert_eq!(missing[0]["name"], "g1");
    let partial = v["groups"][0]["count"].as_u64().expect("count");
    assert!(
        0 < partial && partial < total,
        "partial {partial} of {total}"
    );
    for p in &producers {
        p.close();
    }
}

/// Producers that read the topology from `GET /v1/topology` send each batch to its owner
/// group: with every node listed as an endpoint, nothing is forwarded — where producers
/// without it have part of their batches forwarded — and every answer is exact.
#[test]
fn producers_that_know_the_topology_send_to_their_owner_and_nothing_is_forwarded() {
    let mut rng = Rng::new(14);
    let q: Vec<SocketAddr> = (0..2).map(|_| free_udp()).collect();
    let topo_dir = TempDir::new("groups-routed-topology");
    let topo = topo_dir.0.join("topology.toml");
    write_atomic(
        &topo,
        &topology(1, &[(0, vec![("g0", vec![q[0]]), ("g1", vec![q[1]])])]),
    );
    let mut nodes: Vec<Node> = (0..2)
        .map(|i| Node {
            dir: TempDir::new(&format!("groups-routed-{i}")),
            quic: q[i],
            group: ["g0", "g1"][i],
            peers: vec![],
            proc: None,
        })
        .collect();
    for n in nodes.iter_mut() {
        n.start(&topo);
    }
    let rt = runtime();
    let _guard = rt.enter();
    let config = ProducerConfig {
        flush_interval_ms: 50,
        ..ProducerConfig::default()
    };
    let endpoints = endpoints_of(&nodes);
    let forwarded = |nodes: &[Node]| -> f64 {
        nodes
            .iter()
            .map(|n| n.m().metric("edgetally_forwarded_total{outcome=\"sent\"}"))
            .sum()
    };
    // The topology as a producer reads it: open (no token), from any node.
    let (status, body) = nodes[1].m().get("/v1/topology");
    assert_eq!(status, 200, "{body}");
    let served: edgetally_proto::topology::Topology =
        serde_json::from_value(body).expect("a topology");
    assert_eq!(served.version, 1);
    let start = now_ms() - 60_000;
    let mut truth = Truth::default();
    // Without the topology: each producer's rendezvous order over the two nodes, so about half
    // of them write to the other group's node, which forwards.
    let blind: Vec<NativeProducer> = start_producers(&rt, &config, &endpoints, 12);
    record(&rt, &blind, &mut rng, &mut truth, 400);
    flush(&rt, &blind);
    let before = forwarded(&nodes);
    assert!(
        before > 0.0,
        "producers without the topology had nothing forwarded"
    );
    // With it: nothing more is forwarded.
    let routed: Vec<NativeProducer> = start_producers(&rt, &config, &endpoints, 12);
    for p in &routed {
        p.set_topology(Some(served.clone()));
    }
    record(&rt, &routed, &mut rng, &mut truth, 400);
    flush(&rt, &routed);
    assert_eq!(
        forwarded(&nodes),
        before,
        "a routed producer's batch was forwarded"
    );
    let end = now_ms() + 60_000;
    for n in &nodes {
        let bad = mismatches(n.m(), &truth, start, end);
        assert!(bad.is_empty(), "{bad:?}");
    }
    // Both groups took some of the routed producers' batches directly.
    let (e0, e1) = (epochs(nodes[0].m()), epochs(nodes[1].m()));
    assert_eq!(
        e0 + e1,
        24,
        "every producer in exactly one group: {e0} + {e1}"
    );
    assert!(e0 > 0 && e1 > 0);
    // A node outside a shard-group cluster says so.
    let lone = TempDir::new("groups-routed-lone");
    let (status, body) = Merger::start(&lone.0, &[]).get("/v1/topology");
    assert_eq!((status, body["error"].as_str()), (404, Some("no_topology")));
}

/// A client retries a keyed `POST /v1/events` at another node (a load balancer, a failover):
/// the retry is the same batch wherever it lands — signed by the cluster's events key, not
/// the receiving node's — so it counts once, within a group (two replicas) and across shard
/// groups (routed to the events key's owner group).
/// Starts one node per (group, peers) on the QUIC addresses `q`, in data directories named
/// after `name`, all reading the topology file `topo`.
fn start_nodes<const N: usize>(
    name: &str,
    q: &[SocketAddr],
    defs: [(&'static str, Vec<SocketAddr>); N],
    topo: &Path,
) -> Vec<Node> {
    let mut nodes: Vec<Node> = defs
        .into_iter()
        .enumerate()
        .map(|(i, (group, peers))| Node {
            dir: TempDir::new(&format!("{name}-{i}")),
            quic: q[i],
            group,
            peers,
            proc: None,
        })
        .collect();
    for n in nodes.iter_mut() {
        n.start(topo);
    }
    nodes
}

#[test]
fn a_keyed_events_retry_at_another_node_counts_once() {
    let q: Vec<SocketAddr> = (0..3).map(|_| free_udp()).collect();
    let topo_dir = TempDir::new("groups-keyed-topology");
    let topo = topo_dir.0.join("topology.toml");
    write_atomic(
        &topo,
        &topology(
            1,
            &[(0, vec![("g0", vec![q[0], q[1]]), ("g1", vec![q[2]])])],
        ),
    );
    let nodes = start_nodes(
        "groups-keyed",
        &q,
        [("g0", vec![q[1]]), ("g0", vec![q[0]]), ("g1", vec![])],
        &topo,
    );
    let ts = now_ms() - 1_000;
    let body = format!(r#"[{{"ts_ms":{ts},"category":"orders","value":5}}]"#);
    let post = |m: &Merger, key: &str| {
        let res = agent()
            .post(&format!("{}/v1/events", m.http))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .send(body.as_bytes())
            .expect("POST");
        res.status().as_u16()
    };
    // The same keyed request at every node, twice; another key once.
    for n in &nodes {
        assert_eq!(post(n.m(), "order-17"), 200);
        assert_eq!(post(n.m(), "order-17"), 200);
    }
    assert_eq!(post(nodes[2].m(), "order-18"), 200);
    let w = format!("start={}&end={}", ts - 60_000, ts + 60_000);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts: Vec<Value> = nodes
            .iter()
            .map(|n| n.m().get(&format!("/v1/aggregate?category=orders&{w}")).1)
            .collect();
        let done = counts
            .iter()
            .all(|v| v["count"].as_u64() == Some(2) && v["complete"] == Value::Bool(true));
        if done {
            for v in &counts {
                assert_eq!(v["sum_exact"].as_str(), Some("10"), "{v}");
            }
            break;
        }
        assert!(
            counts.iter().all(|v| v["count"].as_u64().unwrap_or(0) <= 2),
            "a retry counted twice: {counts:?}"
        );
        assert!(Instant::now() < deadline, "not converged: {counts:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Issue 28, finding 6: one replica of the owner group is `kill -9`'d. Once that is noticed,
/// forwards go to the live replica in about the time of a direct send — they used to wait 10 s
/// right after the crash and then about half paid 2 s more for as long as the replica stayed
/// down — the failures are counted, and the dead replica is remembered (and probed in the
/// background) until it is back. Every forwarded batch is counted once.
#[test]
fn forwarding_goes_straight_to_a_live_replica_while_one_is_down() {
    use edgetally_core::BatchId;
    use edgetally_proto::BatchBuilder;
    let q: Vec<SocketAddr> = (0..3).map(|_| free_udp()).collect();
    let topo_dir = TempDir::new("groups-forward-topology");
    let topo = topo_dir.0.join("topology.toml");
    write_atomic(
        &topo,
        &topology(
            1,
            &[(0, vec![("g0", vec![q[0]]), ("g1", vec![q[1], q[2]])])],
        ),
    );
    let mut nodes = start_nodes(
        "groups-forward",
        &q,
        [("g0", vec![]), ("g1", vec![q[2]]), ("g1", vec![q[1]])],
        &topo,
    );
    // Producers owned by g1, so every batch posted to g0's node is forwarded.
    let owned: Vec<edgetally_proto::Signer> = (1..400u64)
        .map(edgetally_tests::signer)
        .filter(|s| edgetally_proto::topology::heaviest(&s.producer(), ["g0", "g1"]) == Some(1))
        .take(60)
        .collect();
    let now = now_ms();
    let send = |m: &Merger, i: usize| {
        let s = &owned[i];
        let mut b = BatchBuilder::new(1000).expect("width");
        b.record("fwd", None, now, 1.0).expect("record");
        let raw = s
            .seal(&b.finish(
                BatchId {
                    producer: s.producer(),
                    epoch: 1,
                    seq: 0,
                },
                now,
            ))
            .expect("seal");
        let t = Instant::now();
        let (st, v, _) = m.post("/v1/batches", "application/octet-stream", &raw);
        (st, v, t.elapsed())
    };
    for i in 0..10 {
        let (st, v, _) = send(nodes[0].m(), i);
        assert_eq!(st, 200, "{v}");
    }
    nodes[1].proc.take().expect("running").kill9();
    // The crash is noticed by the first forwards that try the dead replica.
    for i in 10..20 {
        let (st, v, _) = send(nodes[0].m(), i);
        assert!(st == 200 || st == 503, "{st} {v}");
    }
    let (mut slow, mut times) = (Vec::new(), Vec::new());
    for i in 20..60 {
        let (st, v, took) = send(nodes[0].m(), i);
        assert_eq!(st, 200, "{v}");
        times.push(took);
        if took > Duration::from_millis(1000) {
            slow.push((i, took));
        }
    }
    times.sort_unstable();
    eprintln!(
        "forwards with one replica down: median {:?}, max {:?} (40 batches)",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    assert!(
        slow.is_empty(),
        "forwards slower than 1 s with a live replica: {slow:?}"
    );
    let m = nodes[0].m();
    assert!(m.metric("edgetally_forward_replica_failures_total") >= 1.0);
    assert_eq!(m.metric("edgetally_forward_replicas_down"), 1.0);
    // Every batch acknowledged is counted once (a 503 was resent below, as a producer would).
    for i in 10..20 {
        let deadline = Instant::now() + Duration::from_secs(20);
        while send(nodes[0].m(), i).0 != 200 {
            assert!(Instant::now() < deadline, "batch {i} never acknowledged");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The replica comes back: forgotten as down once the background probe reaches it.
    nodes[1].start(&topo);
    let deadline = Instant::now() + Duration::from_secs(40);
    while nodes[0].m().metric("edgetally_forward_replicas_down") != 0.0 {
        assert!(Instant::now() < deadline, "the replica stayed marked down");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every acknowledged batch counted once, on every node (those the killed replica alone
    // had acknowledged reach its peer once it is back).
    let w = format!("start={}&end={}", now - 60_000, now + 60_000);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts: Vec<Option<u64>> = nodes
            .iter()
            .map(|n| n.m().get(&format!("/v1/aggregate?category=fwd&{w}")).1["count"].as_u64())
            .collect();
        assert!(
            counts.iter().all(|c| c.unwrap_or(0) <= 60),
            "counted twice: {counts:?}"
        );
        if counts.iter().all(|c| *c == Some(60)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every batch counted: {counts:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Issue 28, finding 3: a topology change reaches the nodes at different moments. g0's node
/// reads version 2 (a map from `T` on that lists g0 alone, and g1 drained into g0) while g1's
/// node still reads version 1. Batches g1 owns under the first map, created after `T`, are
/// sent to g1's node (which takes them: version 1 says they are g1's) and then resent to g0's
/// node, as a producer whose acks were lost and that fails over would (version 2 says they
/// are g0's; the producers' clocks run ahead, within `max_future_skew`, so the batches exist
/// before the change reaches any node). They used to be counted in both groups (16 of 8).
///
/// Now g0's node takes no batch that an earlier map gave to another group until every
/// replica of that group has adopted its version (it hands the topology over, in-band) and
/// handed back what it took meanwhile; the resends count once. g1's node keeps the adopted
/// version through a `kill -9` and a restart with its old file, and every node answers
/// exactly 8 — never more — and `complete: true` only once the versions agree.
#[test]
fn a_topology_change_reaching_nodes_at_different_moments_counts_once() {
    use edgetally_core::BatchId;
    use edgetally_proto::BatchBuilder;
    let q: Vec<SocketAddr> = (0..2).map(|_| free_udp()).collect();
    let topo_dir = TempDir::new("groups-skew-topology");
    let (topo_a, topo_b) = (topo_dir.0.join("a.toml"), topo_dir.0.join("b.toml"));
    let v1 = topology(1, &[(0, vec![("g0", vec![q[0]]), ("g1", vec![q[1]])])]);
    write_atomic(&topo_a, &v1);
    write_atomic(&topo_b, &v1);
    let mut nodes: Vec<Node> = [("g0", &topo_a), ("g1", &topo_b)]
        .into_iter()
        .enumerate()
        .map(|(i, (group, topo))| {
            let mut n = Node {
                dir: TempDir::new(&format!("groups-skew-{i}")),
                quic: q[i],
                group,
                peers: vec![],
                proc: None,
            };
            n.start(topo);
            n
        })
        .collect();
    // Producers that version 1 gives to g1, with clocks a minute ahead (within
    // `max_future_skew`): their batches are created after T, when version 2 gives them to g0.
    let t = now_ms() + 30_000;
    let created = t + 30_000;
    let owned: Vec<edgetally_proto::Signer> = (1..200u64)
        .map(edgetally_tests::signer)
        .filter(|s| edgetally_proto::topology::heaviest(&s.producer(), ["g0", "g1"]) == Some(1))
        .take(8)
        .collect();
    let batches: Vec<Vec<u8>> = owned
        .iter()
        .map(|s| {
            let mut b = BatchBuilder::new(1000).expect("width");
            b.record("moved", None, created, 1.0).expect("record");
            s.seal(&b.finish(
                BatchId {
                    producer: s.producer(),
                    epoch: 1,
                    seq: 0,
                },
                created,
            ))
            .expect("seal")
        })
        .collect();
    let now = created;
    // Taken by g1's node, which reads version 1.
    for raw in &batches {
        let (st, v, _) = nodes[1]
            .m()
            .post("/v1/batches", "application/octet-stream", raw);
        assert_eq!(st, 200, "{v}");
    }
    // Version 2, on g0's node only: from T on, g0 alone; g1 drained into g0.
    let v2 = format!(
        "{}[drains]\ng1 = \"g0\"\n",
        topology(
            2,
            &[
                (0, vec![("g0", vec![q[0]]), ("g1", vec![q[1]])]),
                (t, vec![("g0", vec![q[0]])]),
            ],
        )
    );
    write_atomic(&topo_a, &v2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while nodes[0].m().get("/v1/status").1["topology"]["version"] != 2 {
        assert!(Instant::now() < deadline, "g0's node never read version 2");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Each resent at g0's node (its ack lost), as a producer failing over would; a Retry is
    // resent until it is acknowledged.
    let send = |m: &Merger, raw: &[u8]| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (st, v, _) = m.post("/v1/batches", "application/octet-stream", raw);
            if st == 200 {
                return;
            }
            assert_eq!(st, 503, "{v}");
            assert!(Instant::now() < deadline, "never acknowledged: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    for raw in &batches {
        send(nodes[0].m(), raw);
    }
    // g1's node learnt version 2 from g0's, and keeps it through a crash and a restart with
    // its old file.
    let deadline = Instant::now() + Duration::from_secs(20);
    while nodes[1].m().get("/v1/status").1["topology"]["version"] != 2 {
        assert!(
            Instant::now() < deadline,
            "g1's node never adopted version 2"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    nodes[1].proc.take().expect("running").kill9();
    nodes[1].start(&topo_b);
    assert_eq!(
        nodes[1].m().get("/v1/status").1["topology"]["version"],
        2,
        "the adopted version was lost in a restart"
    );
    for raw in &batches {
        send(nodes[1].m(), raw);
    }
    let w = format!("start={}&end={}", now - 60_000, now + 60_000);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let answers: Vec<Value> = nodes
            .iter()
            .map(|n| n.m().get(&format!("/v1/aggregate?category=moved&{w}")).1)
            .collect();
        for a in &answers {
            assert!(
                a["count"].as_u64().unwrap_or(0) <= 8,
                "a batch counted in two groups: {answers:?}"
            );
        }
        if answers
            .iter()
            .all(|a| a["count"] == 8 && a["complete"] == true)
        {
            break;
        }
        assert!(Instant::now() < deadline, "not exact: {answers:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The nemesis across shard groups (issue 28): two groups of two replicas, each node reading
/// its own topology file. While native producers that know the first four nodes record and
/// fail over, and keyed `/v1/events` requests are retried at another node whenever an answer
/// is lost (and every answered one is sent again through another node, as a load balancer
/// would), the operator rolls out a third group (version 2, a map a few seconds ahead) file
/// by file — most nodes learn it in-band first — and a setting (`value_bounds`) node by node,
/// and nodes are `kill -9`'d and restarted, some with their old topology file. Judged
/// against a ground truth: every keyed request counted as its answer said, every acknowledged
/// record once, on every node, and `complete: true` only with those exact totals.
#[test]
fn shard_groups_stay_exact_through_a_rolling_topology_and_settings_change_and_kill_9() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    use std::sync::{Arc, Mutex};
    let q: Vec<SocketAddr> = (0..5).map(|_| free_udp()).collect();
    let topo_dir = TempDir::new("groups-nemesis-topology");
    let files: Vec<std::path::PathBuf> = (0..5)
        .map(|i| topo_dir.0.join(format!("node{i}.toml")))
        .collect();
    let v1 = topology(
        1,
        &[(0, vec![("g0", vec![q[0], q[1]]), ("g1", vec![q[2], q[3]])])],
    );
    for f in &files[..4] {
        write_atomic(f, &v1);
    }
    let defs: [(&'static str, Vec<SocketAddr>); 5] = [
        ("g0", vec![q[1]]),
        ("g0", vec![q[0]]),
        ("g1", vec![q[3]]),
        ("g1", vec![q[2]]),
        ("g2", vec![]),
    ];
    let mut nodes: Vec<Node> = defs
        .into_iter()
        .enumerate()
        .map(|(i, (group, peers))| Node {
            dir: TempDir::new(&format!("groups-nemesis-{i}")),
            quic: q[i],
            group,
            peers,
            proc: None,
        })
        .collect();
    // A cluster secret whose events key (the keyed requests' producer) moves from its first
    // owner to g2 with version 2, so keyed retries cross the change.
    let secret = (0..100)
        .map(|i| format!("groups-nemesis-secret-{i}"))
        .find(|s| {
            let config = edgetally_merger::config::Config {
                cluster_secret: Some(s.clone()),
                ..Default::default()
            };
            let key = edgetally_proto::Signer::from_seed(edgetally_merger::node::events_seed(
                &config, [0; 32],
            ))
            .producer();
            edgetally_proto::topology::heaviest(&key, ["g0", "g1", "g2"]) == Some(2)
        })
        .expect("a secret");
    let secret_env = [("EDGETALLY_CLUSTER_SECRET", secret.as_str())];
    let bounds = [
        ("EDGETALLY_CLUSTER_SECRET", secret.as_str()),
        ("EDGETALLY_VALUE_BOUNDS", "{ \"*\" = [-1000000, 1000000] }"),
    ];
    for (n, f) in nodes.iter_mut().zip(&files).take(4) {
        n.start_with(f, &secret_env);
    }
    let urls: Arc<Mutex<Vec<Option<String>>>> = Arc::new(Mutex::new(
        nodes
            .iter()
            .map(|n| n.proc.as_ref().map(|m| m.http.clone()))
            .collect(),
    ));
    let rt = runtime();
    let endpoints = endpoints_of(&nodes[..4]);
    let config = ProducerConfig {
        flush_interval_ms: 100,
        ..Default::default()
    };
    let producers = start_producers(&rt, &config, &endpoints, 3);
    let now = now_ms();
    let stop = AtomicBool::new(false);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .into();
    // Keyed request `i` (its events 20 s ahead, within max_future_skew: created after the
    // change) at node `at`; (status, body) if answered.
    let keyed_body = |i: u64| -> String {
        (0..3)
            .map(|j| {
                format!(
                    "{{\"ts_ms\":{},\"category\":\"gn_keyed\",\"entity\":\"e{}\",\"value\":{}}}\n",
                    now + 20_000 - j,
                    i % 5,
                    i % 7
                )
            })
            .collect()
    };
    let send_keyed = |i: u64, at: usize| -> Option<(u16, Value)> {
        let url = urls.lock().expect("urls")[at].clone()?;
        let mut r = agent
            .post(&format!("{url}/v1/events"))
            .header("idempotency-key", &format!("gn-{i}"))
            .send(keyed_body(i).as_bytes())
            .ok()?;
        let st = r.status().as_u16();
        let v: Value = serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()?;
        Some((st, v))
    };
    let answers: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());
    let (keyed_truth, produced) = std::thread::scope(|s| {
        let keyed = s.spawn(|| {
            let mut rng = Rng::new(28);
            let (mut truth, mut retried) = (0u64, 0u64);
            for i in 0..120u64 {
                std::thread::sleep(Duration::from_millis(80));
                let send = |at: usize| send_keyed(i, at);
                let n = urls.lock().expect("urls").len() as u64;
                let first = rng.below(n) as usize;
                let (accepted, retries) = keyed_until_applied(i, first, send, |at| {
                    (at + 1 + rng.below(n - 1) as usize) % n as usize
                });
                truth += accepted;
                retried += retries;
                answers.lock().expect("answers").push((i, accepted));
            }
            assert!(retried > 0, "the nemesis never caught a keyed request");
            truth
        });
        let recording = s.spawn(|| {
            let mut n = 0u64;
            let mut i = 0u64;
            while !stop.load(Relaxed) && n < 4000 {
                for p in &producers {
                    let e = format!("e{}", i % 9);
                    p.record("gn_sdk", Some(&e), 1.0, None).expect("record");
                    n += 1;
                    i += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            n
        });
        let restart = |nodes: &mut Vec<Node>, i: usize, env: &[(&str, &str)]| {
            urls.lock().expect("urls")[i] = None;
            if let Some(m) = nodes[i].proc.take() {
                m.kill9();
            }
            std::thread::sleep(Duration::from_millis(600));
            nodes[i].start_with(&files[i], env);
            urls.lock().expect("urls")[i] = nodes[i].proc.as_ref().map(|m| m.http.clone());
        };
        // Version 2: a third group from a few seconds ahead, on its own node's file and on
        // node 0's; the others learn it in-band.
        std::thread::sleep(Duration::from_millis(1500));
        let v2 = topology(
            2,
            &[
                (0, vec![("g0", vec![q[0], q[1]]), ("g1", vec![q[2], q[3]])]),
                (
                    now_ms() + 4_000,
                    vec![
                        ("g0", vec![q[0], q[1]]),
                        ("g1", vec![q[2], q[3]]),
                        ("g2", vec![q[4]]),
                    ],
                ),
            ],
        );
        write_atomic(&files[4], &v2);
        write_atomic(&files[0], &v2);
        nodes[4].start_with(&files[4], &secret_env);
        urls.lock().expect("urls")[4] = nodes[4].proc.as_ref().map(|m| m.http.clone());
        // A replica killed and restarted with its old file.
        std::thread::sleep(Duration::from_millis(1500));
        restart(&mut nodes, 2, &secret_env);
        // The setting rolled out in g0, one replica at a time.
        std::thread::sleep(Duration::from_millis(1500));
        restart(&mut nodes, 1, &bounds);
        // The operator catches up with the files; another replica killed meanwhile.
        std::thread::sleep(Duration::from_millis(1500));
        for f in &files[1..4] {
            write_atomic(f, &v2);
        }
        restart(&mut nodes, 3, &secret_env);
        std::thread::sleep(Duration::from_millis(1500));
        restart(&mut nodes, 0, &bounds);
        let keyed_truth = keyed.join().expect("keyed client");
        stop.store(true, Relaxed);
        (keyed_truth, recording.join().expect("recorder"))
    });
    flush(&rt, &producers);
    let acked: u64 = producers.iter().map(|p| p.stats().acked_records).sum();
    assert_eq!(acked, produced, "every record acknowledged");
    // A client that lost its answers retries every keyed request, at any node, once the
    // change is everywhere: each is answered as it was first, and counts once.
    let mut rng = Rng::new(29);
    for &(i, accepted) in answers.lock().expect("answers").iter() {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let at = rng.below(5) as usize;
            match send_keyed(i, at) {
                Some((200, v)) => {
                    assert_eq!(v["accepted"].as_u64(), Some(accepted), "request {i}: {v}");
                    break;
                }
                Some((503, _)) | None => {}
                Some((st, v)) => panic!("retry of request {i}: {st} {v}"),
            }
            assert!(
                Instant::now() < deadline,
                "retry of request {i} never answered"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen: Vec<(u64, u64, Value, Value)> = nodes
            .iter()
            .map(|n| {
                let m = n.m();
                let (_, k) = m.get("/v1/aggregate?category=gn_keyed&start=0&end=9999999999999");
                let (_, p) = m.get("/v1/aggregate?category=gn_sdk&start=0&end=9999999999999");
                (
                    k["count"].as_u64().unwrap_or(0),
                    p["count"].as_u64().unwrap_or(0),
                    k["complete"].clone(),
                    p["complete"].clone(),
                )
            })
            .collect();
        for (k, p, _, _) in &seen {
            assert!(
                *k <= keyed_truth && *p <= produced,
                "counted twice: {seen:?} (truth {keyed_truth}, {produced})"
            );
        }
        if seen
            .iter()
            .all(|(k, p, kc, pc)| (*k, *p) == (keyed_truth, produced) && *kc == true && *pc == true)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not exact: {seen:?}, truth keyed {keyed_truth} sdk {produced}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    for n in &nodes {
        let (_, st) = n.m().get("/v1/status");
        assert_eq!(st["topology"]["version"], 2, "{}", st["topology"]);
        assert_eq!(st["topology"]["settled"], true, "{}", st["topology"]);
    }
    // g2 took over the events key's batches created after the change (all of them that no
    // node took under version 1).
    let (_, g2) = nodes[4].m().get("/v1/status");
    assert!(
        g2["digest_batches"].as_u64().unwrap_or(0) > 0,
        "g2 took nothing: {g2}"
    );
    for p in &producers {
        p.close();
    }
}

/// Two topologies written under one version (an operator's mistake) are a conflict, never
/// applied over each other: both nodes report it and answer `complete: false`, until a
/// higher version — written on one node only — replaces both everywhere.
#[test]
fn two_topologies_of_one_version_are_a_conflict_until_a_higher_one() {
    let q: Vec<SocketAddr> = (0..2).map(|_| free_udp()).collect();
    let topo_dir = TempDir::new("groups-conflict-topology");
    let files = [topo_dir.0.join("a.toml"), topo_dir.0.join("b.toml")];
    let base = vec![("g0", vec![q[0]]), ("g1", vec![q[1]])];
    write_atomic(&files[0], &topology(1, &[(0, base.clone())]));
    write_atomic(
        &files[1],
        &topology(
            1,
            &[
                (0, base.clone()),
                (now_ms() + 600_000, vec![("g0", vec![q[0]])]),
            ],
        ),
    );
    let mut nodes: Vec<Node> = [("g0", 0), ("g1", 1)]
        .into_iter()
        .map(|(group, i)| {
            let mut n = Node {
                dir: TempDir::new(&format!("groups-conflict-{i}")),
                quic: q[i],
                group,
                peers: vec![],
                proc: None,
            };
            n.start(&files[i]);
            n
        })
        .collect();
    let status = |n: &Node| n.m().get("/v1/status").1;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !nodes
        .iter()
        .all(|n| status(n)["topology"]["conflict"].is_string())
    {
        assert!(Instant::now() < deadline, "no conflict reported");
        std::thread::sleep(Duration::from_millis(100));
    }
    for n in &nodes {
        let st = status(n);
        assert_eq!(st["complete"], false, "{}", st["topology"]);
        assert_eq!(st["topology"]["version"], 1, "{}", st["topology"]);
        let (_, a) = n
            .m()
            .get("/v1/aggregate?category=x&start=0&end=9999999999999");
        assert_eq!(a["complete"], false, "{a}");
    }
    write_atomic(&files[0], &topology(2, &[(0, base)]));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sts: Vec<Value> = nodes.iter().map(status).collect();
        if sts.iter().all(|s| {
            s["topology"]["version"] == 2
                && s["topology"]["conflict"].is_null()
                && s["complete"] == true
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "still in conflict: {sts:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    nodes.clear();
}
