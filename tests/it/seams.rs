//! Where parts meet (issue 28): keyed `POST /v1/events` retries answered exactly as they were
//! applied, whatever the clock or a node's settings at retry time; replicas with different
//! settings that never split on one keyed request; names a database cannot hold refused at
//! every ingest path; and the small protocol courtesies (bearer scheme case, NDJSON line ends,
//! what `/readyz` tells a stranger).

use crate::harness::{free_udp, keyed_until_applied, now_ms, Merger, TempDir};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Two replicas peered with each other: their QUIC addresses and data directories.
struct Pair {
    q: [std::net::SocketAddr; 2],
    dirs: [TempDir; 2],
}

impl Pair {
    fn new(name: &str) -> Pair {
        Pair {
            q: [free_udp(), free_udp()],
            dirs: [
                TempDir::new(&format!("{name}-a")),
                TempDir::new(&format!("{name}-b")),
            ],
        }
    }

    /// Starts replica `i` (0 or 1), peered with the other, with extra flags and variables.
    fn start(&self, i: usize, args: &[&str], env: &[(&str, &str)]) -> Merger {
        let peer = self.q[1 - i].to_string();
        let mut all = vec!["--peer", peer.as_str()];
        all.extend_from_slice(args);
        let mut e = vec![
            ("EDGETALLY_SYNC_INTERVAL_MS", "200"),
            ("EDGETALLY_CLUSTER_SECRET", "seams-secret"),
        ];
        e.extend_from_slice(env);
        Merger::start_at(&self.dirs[i].0, &self.q[i].to_string(), &all, &e)
    }
}

fn count(m: &Merger, category: &str) -> u64 {
    m.get(&format!(
        "/v1/aggregate?category={category}&start=0&end=9999999999999"
    ))
    .1["count"]
        .as_u64()
        .unwrap_or(0)
}

fn accepted(v: &Value) -> Option<u64> {
    v["accepted"].as_u64()
}

/// Finding 1: the answer to a keyed request is what was applied, at the first try and at
/// every retry, whatever the clock says meanwhile. A request with an event past
/// `max_future_skew` is refused whole (nothing applied, the key free); once the clock has
/// moved on, the same request applies whole and every later retry — reformatted or not — is
/// answered with exactly that. Near `max_lateness` the reverse: a request applied while its
/// event was in the window is still answered as applied once the window has passed.
#[test]
fn a_keyed_retry_is_answered_with_what_was_applied_whatever_the_clock() {
    let dir = TempDir::new("keyed-clock");
    let m = Merger::start_with_env(
        &dir.0,
        &[],
        &[
            ("EDGETALLY_MAX_FUTURE_SKEW_MS", "3000"),
            ("EDGETALLY_MAX_LATENESS_MS", "4000"),
        ],
    );
    let now = now_ms();
    // e2 is 2.5 s past the 3 s skew: refused now, in the window a few seconds later.
    let body = format!(
        "{{\"ts_ms\":{now},\"category\":\"k1\",\"value\":1}}\n{{\"ts_ms\":{},\"category\":\"k1\",\"value\":2}}\n",
        now + 5500
    );
    let (st, v, replayed) = m.post_events(Some("order-1"), &body);
    assert_eq!(
        (st, v["error"].as_str(), accepted(&v)),
        (422, Some("events_refused"), Some(0)),
        "{v}"
    );
    assert!(!replayed);
    assert_eq!(v["rejected"][0]["index"], 1, "{v}");
    assert_eq!(v["rejected"][0]["error"], "future_timestamp", "{v}");
    assert_eq!(count(&m, "k1"), 0, "a refused request applies nothing");
    // The clock moves on; the same request now applies whole.
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        let (st, v, replayed) = m.post_events(Some("order-1"), &body);
        if st == 200 {
            assert!(!replayed, "the first application is no replay");
            break v;
        }
        assert_eq!(v["error"], "events_refused", "{v}");
        assert!(Instant::now() < deadline, "never accepted: {v}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(accepted(&first), Some(2), "{first}");
    assert_eq!(count(&m, "k1"), 2);
    // Every retry: the same answer, marked a replay, nothing counted again — the body
    // reformatted (a JSON array, keys reordered, `2.0` for `2`) included.
    let reformatted = format!(
        "[ {{\"value\": 1, \"category\": \"k1\", \"ts_ms\": {now}}},\n  {{\"category\":\"k1\",\"ts_ms\":{},\"value\":2.0}} ]",
        now + 5500
    );
    for b in [&body, &reformatted] {
        let (st, v, replayed) = m.post_events(Some("order-1"), b);
        assert_eq!((st, accepted(&v)), (200, Some(2)), "{v}");
        assert_eq!(v["rejected_count"], first["rejected_count"]);
        assert!(replayed, "a retry is marked as a replay");
    }
    assert_eq!(count(&m, "k1"), 2, "retries count nothing");
    // The same key with other events is refused, and applies nothing.
    let other = format!("{{\"ts_ms\":{now},\"category\":\"k1\",\"value\":7}}\n");
    let (st, v, _) = m.post_events(Some("order-1"), &other);
    assert_eq!(
        (st, v["error"].as_str()),
        (422, Some("idempotency_key_reused")),
        "{v}"
    );
    assert_eq!(count(&m, "k1"), 2);

    // Near max_lateness (4 s here): applied while in the window, answered as applied after.
    let t = now_ms() - 2500;
    let late =
        format!("{{\"ts_ms\":{t},\"category\":\"k2\"}}\n{{\"ts_ms\":{t},\"category\":\"\"}}\n");
    let (st, v, _) = m.post_events(Some("late-1"), &late);
    assert_eq!((st, accepted(&v)), (200, Some(1)), "{v}");
    std::thread::sleep(Duration::from_millis(3000));
    let (st, v, replayed) = m.post_events(Some("late-1"), &late);
    assert_eq!(
        (st, accepted(&v), v["rejected_count"].as_u64(), replayed),
        (200, Some(1), Some(1), true),
        "{v}"
    );
    // Unkeyed, the same events now are simply too old (the clock is checked first there).
    let (st, v, _) = m.post_events(None, &late);
    assert_eq!((st, accepted(&v)), (200, Some(0)), "{v}");
    assert_eq!(v["rejected_by_reason"]["bucket_too_old"], 2, "{v}");
    assert_eq!(count(&m, "k2"), 1);
}

/// Finding 2: two peered replicas, `value_bounds` on only one (a setting being rolled out),
/// the same keyed request sent to both at once. Whatever each answered, after they converge
/// the count is what an accepting answer said (never an event answered as refused, never an
/// acknowledged one lost), the cluster's events key is no equivocator, and a retry at either
/// node is answered as applied.
#[test]
fn replicas_with_different_settings_never_split_on_a_keyed_request() {
    let pair = Pair::new("skew");
    let cfg = pair.dirs[1].0.join("bounds.toml");
    std::fs::write(&cfg, "value_bounds = { \"*\" = [0, 10] }\n").expect("config");
    let a = pair.start(0, &[], &[]);
    let b = pair.start(1, &["--config", cfg.to_str().expect("utf8")], &[]);
    for round in 0..4 {
        let now = now_ms();
        let cat = format!("split{round}");
        let body = format!(
            "{{\"ts_ms\":{now},\"category\":\"{cat}\",\"value\":5}}\n{{\"ts_ms\":{now},\"category\":\"{cat}\",\"value\":50}}\n"
        );
        let key = format!("both-{round}");
        let (ra, rb) = std::thread::scope(|s| {
            let ha = s.spawn(|| a.post_events(Some(&key), &body));
            let hb = s.spawn(|| b.post_events(Some(&key), &body));
            (ha.join().expect("a"), hb.join().expect("b"))
        });
        // A: no bounds, applies both. B: refuses the request whole (50 > 10) or, if A's
        // batch reached it first, answers it as applied.
        assert_eq!((ra.0, accepted(&ra.1)), (200, Some(2)), "{:?}", ra.1);
        assert!(
            (rb.0, accepted(&rb.1)) == (200, Some(2))
                || (rb.0, rb.1["error"].as_str()) == (422, Some("events_refused")),
            "{:?}",
            rb.1
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while (count(&a, &cat), count(&b, &cat)) != (2, 2) {
            assert!(
                Instant::now() < deadline,
                "round {round}: counts {} and {}",
                count(&a, &cat),
                count(&b, &cat)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // A retry at the node whose settings refuse it: answered as applied.
        let (st, v, replayed) = b.post_events(Some(&key), &body);
        assert_eq!((st, accepted(&v), replayed), (200, Some(2), true), "{v}");
    }
    std::thread::sleep(Duration::from_millis(1000));
    for m in [&a, &b] {
        assert_eq!(
            m.metric("edgetally_equivocations_total"),
            0.0,
            "the cluster's events key was listed as an equivocator"
        );
        let (_, s) = m.get("/v1/status");
        assert_eq!(s["equivocations"], 0, "{s}");
        assert_eq!(s["equivocators"].as_array().map(Vec::len), Some(0), "{s}");
    }
    for round in 0..4 {
        assert_eq!(count(&a, &format!("split{round}")), 2);
    }
}

/// Finding 8: a category or entity with a control character is refused at every ingest
/// path — `POST /v1/events` (the event alone; its neighbours apply), a signed batch over HTTP
/// and over QUIC (Nack `invalid_category` / `invalid_entity`) — so nothing a database cannot
/// hold reaches the store.
#[test]
fn names_with_control_characters_are_refused_at_every_ingest_path() {
    let dir = TempDir::new("control");
    let m = Merger::start(&dir.0, &[]);
    let now = now_ms();
    let body = format!(
        "{{\"ts_ms\":{now},\"category\":\"m\\u0000x\"}}\n{{\"ts_ms\":{now},\"category\":\"ok\",\"entity\":\"a\\tb\"}}\n{{\"ts_ms\":{now},\"category\":\"del\\u007f\"}}\n{{\"ts_ms\":{now},\"category\":\"ok\",\"entity\":\"fine\"}}\n"
    );
    let (st, v, _) = m.post_events(None, &body);
    assert_eq!((st, accepted(&v)), (200, Some(1)), "{v}");
    let codes: Vec<&str> = v["rejected"]
        .as_array()
        .expect("listed")
        .iter()
        .filter_map(|r| r["error"].as_str())
        .collect();
    assert_eq!(
        codes,
        ["invalid_category", "invalid_entity", "invalid_category"]
    );
    // Signed batches from a producer: refused by name.
    let s = edgetally_tests::signer(77);
    for (i, (cat, ent, want)) in [
        ("m\u{0}x", None, "invalid_category"),
        ("fine", Some("a\nb"), "invalid_entity"),
    ]
    .into_iter()
    .enumerate()
    {
        // Built with placeholder names of the same length (the builder refuses control
        // characters itself), which are then swapped in.
        let clean = |x: &str| x.replace(|c: char| c.is_control(), "_");
        let mut b = edgetally_proto::BatchBuilder::new(1000).expect("width");
        b.record(&clean(cat), ent.map(clean).as_deref(), now, 1.0)
            .expect("record");
        let mut batch = b.finish(
            edgetally_core::BatchId {
                producer: s.producer(),
                epoch: 9,
                seq: i as u64,
            },
            now,
        );
        batch.strings = batch
            .strings
            .iter()
            .map(|x| match x {
                x if x == clean(cat) => cat.to_string(),
                x if Some(x.to_string()) == ent.map(clean) => ent.unwrap_or(x).to_string(),
                x => x.to_string(),
            })
            .collect();
        let raw = s.seal(&batch).expect("seal");
        let (st, v, _) = m.post("/v1/batches", "application/octet-stream", &raw);
        assert_eq!((st, v["error"].as_str()), (422, Some(want)), "{v}");
    }
    assert_eq!(count(&m, "ok"), 1);
    assert_eq!(count(&m, "m%00x"), 0);
}

/// Finding 12: the bearer scheme is case-insensitive; NDJSON with a byte-order mark and CR
/// line ends is read; `/readyz` tells a client without a read token only the verdicts.
#[test]
fn small_courtesies_of_the_http_api() {
    let dir = TempDir::new("courtesy");
    let m = Merger::start_with_env(
        &dir.0,
        &[],
        &[
            ("EDGETALLY_READ_TOKENS", "r-token"),
            ("EDGETALLY_WRITE_TOKENS", "w-token"),
        ],
    );
    let agent = crate::harness::agent();
    let now = now_ms();
    let body = format!(
        "\u{feff}{{\"ts_ms\":{now},\"category\":\"cr\"}}\r{{\"ts_ms\":{now},\"category\":\"cr\"}}\r\n{{\"ts_ms\":{now},\"category\":\"cr\"}}"
    );
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let mut res = agent
            .post(&format!("{}/v1/events", m.http))
            .header("authorization", &format!("{scheme} w-token"))
            .send(body.as_bytes())
            .expect("post");
        let text = res.body_mut().read_to_string().expect("body");
        assert_eq!(res.status().as_u16(), 200, "{scheme}: {text}");
        let v: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(
            (accepted(&v), v["rejected_count"].as_u64()),
            (Some(3), Some(0)),
            "{v}"
        );
    }
    let get = |auth: Option<&str>, path: &str| {
        let mut req = agent.get(&format!("{}{path}", m.http));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let mut res = req.call().expect("get");
        let st = res.status().as_u16();
        let v: Value =
            serde_json::from_str(&res.body_mut().read_to_string().expect("body")).expect("json");
        (st, v)
    };
    let (st, v) = get(
        Some("bearer r-token"),
        "/v1/aggregate?category=cr&start=0&end=9999999999999",
    );
    assert_eq!((st, v["count"].as_u64()), (200, Some(9)), "{v}");
    // Readiness: open, but the details only for readers.
    let (st, open) = get(None, "/readyz");
    assert_eq!(st, 200, "{open}");
    assert_eq!(open["ready"], true);
    for check in ["recovered", "store", "queue", "peers"] {
        assert_eq!(
            open["checks"][check],
            serde_json::json!({"ok": true}),
            "{open}"
        );
    }
    let (_, full) = get(Some("Bearer r-token"), "/readyz");
    assert!(full["checks"]["store"].get("error").is_some(), "{full}");
    assert!(full["checks"]["peers"].get("total").is_some(), "{full}");
}

/// Finding 7: remote-read clients sending requests full of costly regex matchers (each
/// pattern new, so no cache helps them) do not hold back ingest: a request is refused past
/// 64 matchers before anything is compiled, and the regexes of one within the cap are compiled
/// on the blocking pool, never on the async workers `POST /v1/events` needs. Two such clients
/// once made an events request wait 17 s; here each one is answered within a few seconds
/// (a liveness bound, far from the failure, not a speed target).
#[test]
fn hostile_remote_reads_do_not_hold_back_ingest() {
    use edgetally_merger::promread::{encode_request, LabelMatcher, PromQuery, ReadRequest};
    let dir = TempDir::new("hostile-read");
    let m = Merger::start(&dir.0, &[]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let reads = std::sync::atomic::AtomicU64::new(0);
    let slowest = std::thread::scope(|s| {
        for client in 0..2u64 {
            let (m, stop, reads) = (&m, &stop, &reads);
            s.spawn(move || {
                let agent = crate::harness::agent();
                let mut n = 0u64;
                let deadline = Instant::now() + Duration::from_secs(30);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline
                {
                    n += 1;
                    // Client 0 sends the reported shape, a 64 KB request of ~4,000
                    // matchers (refused by count before anything is compiled); client 1
                    // the most a request may hold, each pattern new.
                    let k = if client == 0 { 4000 } else { 64 };
                    let matchers = (0..k)
                        .map(|i| LabelMatcher {
                            r#type: 2,
                            name: "category".into(),
                            value: format!(r"\w{{15}}(c{client}n{n}i{i})?"),
                        })
                        .collect();
                    let body = encode_request(&ReadRequest {
                        queries: vec![PromQuery {
                            start_timestamp_ms: 0,
                            end_timestamp_ms: now_ms(),
                            matchers,
                            hints: None,
                        }],
                        accepted_response_types: vec![0],
                    });
                    let _ = agent
                        .post(&format!("{}/api/v1/read", m.http))
                        .send(&body[..]);
                    reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        std::thread::sleep(Duration::from_millis(500));
        let mut slowest = Duration::ZERO;
        for i in 0..10 {
            let t = Instant::now();
            let body = format!(
                "{{\"ts_ms\":{},\"category\":\"ingest\",\"value\":{i}}}\n",
                now_ms()
            );
            let (st, v, _) = m.post_events(None, &body);
            assert_eq!((st, accepted(&v)), (200, Some(1)), "{v}");
            slowest = slowest.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(300));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        slowest
    });
    assert!(
        reads.load(std::sync::atomic::Ordering::Relaxed) >= 2,
        "the hostile reads ran"
    );
    assert!(
        slowest < Duration::from_secs(3),
        "an events request waited {slowest:?} behind remote reads"
    );
    assert_eq!(count(&m, "ingest"), 10);
}

/// Finding 4: a batch one replica accepted is not refused by its peer for the future rule.
/// B's `max_future_skew` is 1 min (as if its clock ran 4 min behind A's, or a smaller setting
/// being rolled out): an event 4 min ahead that A accepted reaches B through replication at
/// once — it used to be refused there until B's clock caught up, both answering
/// `complete: true` with different counts. B still refuses such an event from a client.
#[test]
fn a_peer_does_not_refuse_what_its_group_holds_for_the_future_rule() {
    let pair = Pair::new("skew-clock");
    let a = pair.start(0, &[], &[]);
    let b = pair.start(1, &[], &[("EDGETALLY_MAX_FUTURE_SKEW_MS", "60000")]);
    let ahead = now_ms() + 4 * 60_000;
    let body = format!("{{\"ts_ms\":{ahead},\"category\":\"ahead\"}}\n");
    let (st, v, _) = b.post_events(None, &body);
    assert_eq!(
        (st, v["rejected_by_reason"]["future_timestamp"].as_u64()),
        (200, Some(1)),
        "{v}"
    );
    let (st, v, _) = a.post_events(None, &body);
    assert_eq!((st, accepted(&v)), (200, Some(1)), "{v}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while count(&b, "ahead") != 1 {
        assert!(
            Instant::now() < deadline,
            "B never took A's batch: {}",
            count(&b, "ahead")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(count(&a, "ahead"), 1);
}

/// Finding 10: keyed requests are state the node holds for days, so their number is capped
/// (`max_idempotency_keys`): past it a new key is refused (429, nothing applied) while
/// retries of remembered keys and unkeyed requests go on; `/v1/status` counts them, across a
/// restart too (they live in the seen-sets).
#[test]
fn keyed_requests_are_capped_and_the_cap_spares_retries_and_unkeyed_requests() {
    let dir = TempDir::new("keys-cap");
    let env = [("EDGETALLY_MAX_IDEMPOTENCY_KEYS", "5")];
    let m = Merger::start_with_env(&dir.0, &[], &env);
    let now = now_ms();
    let body = |i: u64| format!("{{\"ts_ms\":{now},\"category\":\"capped\",\"value\":{i}}}\n");
    for i in 0..5 {
        let (st, v, _) = m.post_events(Some(&format!("k{i}")), &body(i));
        assert_eq!((st, accepted(&v)), (200, Some(1)), "{v}");
    }
    let (st, v, _) = m.post_events(Some("k5"), &body(5));
    assert_eq!(
        (st, v["error"].as_str()),
        (429, Some("idempotency_keys_full")),
        "{v}"
    );
    // A retry of a remembered key is answered as applied; unkeyed requests go on.
    let (st, v, replayed) = m.post_events(Some("k3"), &body(3));
    assert_eq!((st, accepted(&v), replayed), (200, Some(1), true), "{v}");
    let (st, v, _) = m.post_events(None, &body(9));
    assert_eq!((st, accepted(&v)), (200, Some(1)), "{v}");
    assert_eq!(count(&m, "capped"), 6);
    let (_, s) = m.get("/v1/status");
    assert_eq!(s["admission"]["max_idempotency_keys"], 5, "{s}");
    m.kill9();
    // After a restart the node still remembers them (the seen-sets are durable).
    let m = Merger::start_with_env(&dir.0, &[], &env);
    let (st, v, _) = m.post_events(Some("k6"), &body(6));
    assert_eq!(st, 429, "{v}");
    let (_, s) = m.get("/v1/status");
    assert!(
        s["admission"]["idempotency_keys"].as_u64() >= Some(5),
        "{s}"
    );
    assert_eq!(count(&m, "capped"), 6);
}

/// Configuration skew: two peered replicas, one with another `max_lateness` (a setting being
/// rolled out that replicas must agree on). Each reports the other's settings as different
/// and its clock skew in `/v1/status`, answers say `complete: false` while it lasts, and the
/// data still replicates; once both run the same settings, answers are complete again.
#[test]
fn replicas_report_settings_that_differ_and_answer_incomplete_meanwhile() {
    let pair = Pair::new("skew-cfg");
    let a = pair.start(0, &[], &[]);
    let b = pair.start(1, &[], &[("EDGETALLY_MAX_LATENESS_MS", "86400000")]);
    let (st, v, _) = a.post_events(
        None,
        &format!("{{\"ts_ms\":{},\"category\":\"cfg\"}}\n", now_ms()),
    );
    assert_eq!(st, 200, "{v}");
    let handshake = |m: &Merger| m.get("/v1/status").1["peers"][0]["handshake"].clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    while handshake(&a)["settings_match"] != false || handshake(&b)["settings_match"] != false {
        assert!(
            Instant::now() < deadline,
            "{} {}",
            handshake(&a),
            handshake(&b)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for m in [&a, &b] {
        let h = handshake(m);
        assert!(
            h["clock_skew_ms"].as_i64().is_some_and(|s| s.abs() < 2000),
            "{h}"
        );
        let (_, v) = m.get("/v1/aggregate?category=cfg&start=0&end=9999999999999");
        assert_eq!(v["complete"], false, "{v}");
    }
    // Replication goes on meanwhile.
    let deadline = Instant::now() + Duration::from_secs(15);
    while count(&b, "cfg") != 1 {
        assert!(Instant::now() < deadline, "not replicated");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The rollout completes: B restarts with A's settings.
    b.terminate();
    let b = pair.start(1, &[], &[]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let complete: Vec<Value> = [&a, &b]
            .iter()
            .map(|m| {
                m.get("/v1/aggregate?category=cfg&start=0&end=9999999999999")
                    .1["complete"]
                    .clone()
            })
            .collect();
        if complete.iter().all(|c| *c == true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still incomplete: {complete:?} {}",
            handshake(&a)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(handshake(&a)["settings_match"], true);
}

/// A nemesis at the seams: two peered replicas, each `kill -9`'d and restarted in turn, while
/// keyed `/v1/events` requests go to one node and — whenever the answer is lost — are retried
/// with the same key at the other, and native producers that know both nodes record and fail
/// over. Judged against a ground truth: every keyed request counted exactly as its final
/// answer said (never twice, though it may have been applied at both replicas), every record
/// a producer had acknowledged counted once, and both replicas identical and complete.
#[test]
fn keyed_retries_and_failing_over_producers_are_exact_through_kill_9() {
    use std::sync::{Arc, Mutex};
    let pair = Pair::new("nemesis");
    let mut nodes = [Some(pair.start(0, &[], &[])), Some(pair.start(1, &[], &[]))];
    let urls = Arc::new(Mutex::new([
        nodes[0].as_ref().map(|m| m.http.clone()),
        nodes[1].as_ref().map(|m| m.http.clone()),
    ]));
    let now = now_ms();
    let rt = crate::harness::runtime();
    let endpoints: Vec<edgetally_net::Endpoint> = (0..2)
        .map(|i| edgetally_net::Endpoint {
            addr: pair.q[i],
            cert: nodes[i].as_ref().expect("up").cert,
        })
        .collect();
    let producers: Vec<edgetally_net::NativeProducer> = (0..2)
        .map(|_| {
            rt.block_on(async {
                let config = edgetally_proto::ProducerConfig {
                    flush_interval_ms: 100,
                    ..Default::default()
                };
                edgetally_net::NativeProducer::start(config, endpoints.clone(), None)
                    .expect("producer")
            })
        })
        .collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (keyed_truth, produced) = std::thread::scope(|s| {
        let keyed = s.spawn(|| {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(3)))
                .build()
                .into();
            let (mut truth, mut retried) = (0u64, 0u64);
            for i in 0..150u64 {
                // Spread over the nemesis' rounds.
                std::thread::sleep(Duration::from_millis(60));
                let body: String = (0..3)
                    .map(|j| {
                        format!(
                            "{{\"ts_ms\":{},\"category\":\"nemesis_keyed\",\"value\":{}}}\n",
                            now - j,
                            i % 7
                        )
                    })
                    .collect();
                let send = |at: usize| {
                    let url = urls.lock().expect("urls")[at].clone();
                    url.and_then(|u| {
                        let mut r = agent
                            .post(&format!("{u}/v1/events"))
                            .header("idempotency-key", &format!("nemesis-{i}"))
                            .send(body.as_bytes())
                            .ok()?;
                        let st = r.status().as_u16();
                        let v: Value =
                            serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()?;
                        Some((st, v))
                    })
                };
                // Lost or not applied: the same key at the other node.
                let (accepted, retries) =
                    keyed_until_applied(i, (i % 2) as usize, send, |at| 1 - at);
                truth += accepted;
                retried += retries;
            }
            assert!(retried > 0, "the nemesis never caught a keyed request");
            truth
        });
        let recording = s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 3000 {
                for p in &producers {
                    p.record("nemesis_sdk", None, 1.0, None).expect("record");
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            n
        });
        // The nemesis: each node in turn killed and brought back, four times.
        for round in 0..4 {
            std::thread::sleep(Duration::from_millis(1500));
            let i = round % 2;
            urls.lock().expect("urls")[i] = None;
            nodes[i].take().expect("up").kill9();
            std::thread::sleep(Duration::from_millis(800));
            let m = pair.start(i, &[], &[]);
            urls.lock().expect("urls")[i] = Some(m.http.clone());
            nodes[i] = Some(m);
        }
        let keyed_truth = keyed.join().expect("keyed client");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (keyed_truth, recording.join().expect("recorder"))
    });
    // Every record is acknowledged once both nodes are back.
    rt.block_on(async {
        for p in &producers {
            assert!(p.flush(Duration::from_secs(60)).await, "{:?}", p.stats());
        }
    });
    let acked: u64 = producers.iter().map(|p| p.stats().acked_records).sum();
    assert_eq!(acked, produced, "every record acknowledged");
    assert!(producers
        .iter()
        .all(|p| p.stats().dropped == 0 && p.stats().rejected.is_empty()));
    let (a, b) = (
        nodes[0].as_ref().expect("up"),
        nodes[1].as_ref().expect("up"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen: Vec<(u64, u64, Value)> = [a, b]
            .iter()
            .map(|m| {
                let (_, v) =
                    m.get("/v1/aggregate?category=nemesis_keyed&start=0&end=9999999999999");
                (
                    v["count"].as_u64().unwrap_or(0),
                    count(m, "nemesis_sdk"),
                    v["complete"].clone(),
                )
            })
            .collect();
        for (keyed, sdk, _) in &seen {
            assert!(
                *keyed <= keyed_truth && *sdk <= produced,
                "counted twice: {seen:?}"
            );
        }
        if seen
            .iter()
            .all(|(k, s, c)| (*k, *s) == (keyed_truth, produced) && *c == true)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not exact: {seen:?}, truth keyed {keyed_truth} sdk {produced}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let hash = |m: &Merger| m.get("/v1/status").1["state_sha256"].clone();
    assert_eq!(hash(a), hash(b), "replicas identical");
    for p in &producers {
        p.close();
    }
}

/// The seam issue 30 left untested: a keyed `POST /v1/events` whose events carry subjects and
/// quantile values, retried at the other replica. Both share `subject_key` and
/// `quantile_categories` (in the settings digest), so the retry rebuilds the same batch: it is
/// answered as a replay of what was applied, counts nothing twice, and leaves both replicas
/// with the same distinct count and quantiles — those of the three events, computed here. The
/// same key with another subject is refused there (`idempotency_key_reused`), applying
/// nothing.
#[test]
fn a_keyed_retry_with_subjects_at_the_other_replica_is_a_replay() {
    let pair = Pair::new("subject-retry");
    let env = [
        ("EDGETALLY_SUBJECT_KEY", "000102030405060708090a0b0c0d0e0f"),
        ("EDGETALLY_QUANTILE_CATEGORIES", "lat"),
    ];
    let a = pair.start(0, &[], &env);
    let b = pair.start(1, &[], &env);
    let now = now_ms();
    let line = |v: u32, subject: &str| {
        format!(
            "{{\"ts_ms\":{now},\"category\":\"lat\",\"value\":{v},\"subject\":\"{subject}\"}}\n"
        )
    };
    let body = [line(10, "ann"), line(20, "bob"), line(30, "ann")].concat();
    let (st, v, replayed) = a.post_events(Some("subj-1"), &body);
    assert_eq!((st, accepted(&v), replayed), (200, Some(3), false), "{v}");
    let query = format!(
        "/v1/aggregate?category=lat&start={}&end={}&quantiles=0.5",
        now - 60_000,
        now + 60_000
    );
    let settled = |m: &Merger| {
        let v = m.get(&query).1;
        (
            v["count"].as_u64(),
            v["distinct"]["estimate"].as_f64(),
            v["quantiles"]["count"].as_u64(),
        )
    };
    // Two subjects, three values: what both replicas must hold, from the events above.
    let want = (Some(3), Some(2.0), Some(3));
    let deadline = Instant::now() + Duration::from_secs(20);
    while settled(&b) != want {
        assert!(Instant::now() < deadline, "b holds {:?}", settled(&b));
        std::thread::sleep(Duration::from_millis(100));
    }
    // The retry at B, as sent and reformatted (a JSON array, fields in another order): a
    // replay of what A applied.
    let array = format!(
        "[{}]",
        [(10, "ann"), (20, "bob"), (30, "ann")]
            .map(|(v, s)| format!(
                "{{\"subject\": \"{s}\", \"value\": {v}.0, \"category\": \"lat\", \"ts_ms\": {now}}}"
            ))
            .join(",\n ")
    );
    for body in [&body, &array] {
        let (st, v, replayed) = b.post_events(Some("subj-1"), body);
        assert_eq!((st, accepted(&v), replayed), (200, Some(3), true), "{v}");
    }
    // Another subject under the same key is another request.
    let changed = [line(10, "ann"), line(20, "cy"), line(30, "ann")].concat();
    for m in [&a, &b] {
        let (st, v, _) = m.post_events(Some("subj-1"), &changed);
        assert_eq!(
            (st, v["error"].as_str()),
            (422, Some("idempotency_key_reused")),
            "{v}"
        );
    }
    std::thread::sleep(Duration::from_millis(1000));
    for m in [&a, &b] {
        assert_eq!(settled(m), want, "a retry or a refused request counted");
        let v = m.get(&query).1;
        let p50 = v["quantiles"]["values"][0]["value"].as_f64().expect("p50");
        assert!(
            (p50 - 20.0).abs() <= 0.2,
            "p50 {p50}, the median of 10, 20, 30 is 20"
        );
    }
    assert_eq!(a.get(&query).1["distinct"], b.get(&query).1["distinct"]);
}
