//! End to end against the real `edgetally serve` binary: QUIC ingest, every query endpoint
//! against a naive model, every rejection with its reason, `kill -9` durability, graceful
//! shutdown and configuration.

use crate::harness::{now_ms, runtime as rt, Merger, TempDir};
use edgetally_core::{BatchId, RejectCode};
use edgetally_net::Client;
use edgetally_proto::{Reply, Signer};
use edgetally_tests::{build_at, events_at, same_json, signer, Event, Model, Rng};
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A signed batch of `n` events near `base`, and the events.
fn batch(
    s: &Signer,
    epoch: u64,
    seq: u64,
    rng: &mut Rng,
    n: usize,
    base: i64,
) -> (Vec<u8>, Vec<Event>) {
    let ev = events_at(rng, n, 3_600_000, base);
    let id = BatchId {
        producer: s.producer(),
        epoch,
        seq,
    };
    (s.seal(&build_at(id, &ev, base)).expect("seal"), ev)
}

fn q(m: &Merger, path: &str) -> Value {
    let (status, v) = m.get(path);
    assert_eq!(status, 200, "{path}: {v}");
    v
}

#[test]
fn quic_ingest_answers_every_query_kind_like_the_model() {
    let dir = TempDir::new("e2e");
    let m = Merger::start(&dir.0, &[]);
    let base = now_ms();
    let mut rng = Rng::new(7);
    let mut model = Model::default();
    let mut sealed = Vec::new();
    for p in 0..3u64 {
        let s = signer(100 + p);
        for seq in 0..40 {
            let (b, ev) = batch(&s, 1, seq, &mut rng, 50, base);
            ev.iter().for_each(|e| model.add(e));
            sealed.push(b);
        }
    }
    let rt = rt();
    let dup = sealed[..5].to_vec();
    let replies = rt.block_on(async {
        let c = Client::connect(m.quic, vec![m.cert])
            .await
            .expect("connect");
        // All batches in flight at once, on separate streams of one connection.
        let tasks: Vec<_> = sealed
            .into_iter()
            .chain(dup)
            .map(|b| {
                let c = c.clone();
                tokio::spawn(async move { c.send(&b).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task").expect("send"));
        }
        c.close().await;
        out
    });
    assert!(replies.iter().all(|r| *r == Reply::Ack), "{replies:?}");
    assert_eq!(m.metric("edgetally_batches_applied_total"), 120.0);
    assert_eq!(m.metric("edgetally_batches_duplicate_total"), 5.0);

    let (start, end) = (base - 2 * 3_600_000, base + 1000);
    let cats: BTreeSet<String> = model.keys.keys().map(|k| k.0.clone()).collect();
    for c in &cats {
        let v = q(
            &m,
            &format!("/v1/aggregate?category={c}&start={start}&end={end}"),
        );
        assert_eq!(
            v["time_window_start"],
            (start + 999).div_euclid(1000) * 1000
        );
        assert!(
            same_json(
                &v,
                model.total(|c2, _, t| c2 == c
                    && t >= start
                    && t < v["time_window_end"].as_i64().unwrap_or(0))
            ),
            "{c}: {v}"
        );
        let v = q(
            &m,
            &format!("/v1/aggregate?category={c}&start={start}&end={end}&entity=dev-1"),
        );
        assert!(
            same_json(&v, model.total(|c2, e, _| c2 == c && e == Some("dev-1"))),
            "{c}/dev-1: {v}"
        );
        // Sliding window: every event is within the last 3 hours.
        let v = q(
            &m,
            &format!("/v1/window?category={c}&width_ms={}", 3 * 3_600_000),
        );
        assert!(
            same_json(&v, model.total(|c2, _, _| c2 == c)),
            "window {c}: {v}"
        );
        // Top-k by entity, against the model's ranking.
        let v = q(
            &m,
            &format!("/v1/topk?category={c}&start={start}&end={end}&k=3"),
        );
        let mut want: Vec<(u64, String)> = ["dev-1", "dev-2", "user-7", "user-8", "ü-9", "x"]
            .iter()
            .filter_map(|e| {
                model
                    .total(|c2, e2, _| c2 == c && e2 == Some(e))
                    .map(|t| (t.count, e.to_string()))
            })
            .collect();
        want.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        want.truncate(3);
        let got: Vec<(u64, String)> = v["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| {
                (
                    i["count"].as_u64().unwrap_or(0),
                    i["key"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        assert_eq!(got, want, "topk {c}");
        let v = q(
            &m,
            &format!("/v1/topk?category={c}&start={start}&end={end}&k=10&by=producer"),
        );
        let sum: u64 = v["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| i["count"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(Some(sum), model.total(|c2, _, _| c2 == c).map(|t| t.count));
        // Series: hour steps add up to the whole.
        let h = 3_600_000;
        let (s0, s1) = (start.div_euclid(h) * h, (end + h).div_euclid(h) * h);
        let v = q(
            &m,
            &format!("/v1/series?category={c}&start={s0}&end={s1}&step_ms={h}"),
        );
        let pts = v["points"].as_array().expect("points");
        for p in pts {
            let (a, b) = (
                p["time_window_start"].as_i64().unwrap_or(0),
                p["time_window_end"].as_i64().unwrap_or(0),
            );
            assert!(
                same_json(p, model.total(|c2, _, t| c2 == c && a <= t && t < b)),
                "series point {p}"
            );
        }
    }
    let v = q(
        &m,
        &format!("/v1/totals?start={start}&end={end}&group_by=category"),
    );
    for g in v["groups"].as_array().expect("groups") {
        let c = g["key"].as_str().expect("key");
        assert!(same_json(g, model.total(|c2, _, _| c2 == c)), "totals {c}");
    }
    let v = q(&m, &format!("/v1/totals?start={start}&end={end}"));
    assert!(same_json(&v["groups"][0], model.total(|_, _, _| true)));
    let v = q(
        &m,
        &format!("/v1/totals?start={start}&end={end}&group_by=entity"),
    );
    for g in v["groups"].as_array().expect("groups") {
        let e = g["key"].as_str();
        assert!(
            same_json(g, model.total(|_, e2, _| e2 == e)),
            "totals entity {e:?}"
        );
    }
    let v = q(&m, "/v1/status");
    assert_eq!(
        v["cert_sha256"]
            .as_str()
            .map(edgetally_net::tls::parse_hash),
        Some(Some(m.cert))
    );
    assert!(m.terminate(), "graceful exit");
}

#[test]
fn every_bad_input_gets_its_reason_and_valid_neighbours_are_kept() {
    let dir = TempDir::new("bad");
    let m = Merger::start(&dir.0, &[]);
    let base = now_ms();
    let s = signer(200);
    let mut rng = Rng::new(3);
    let (good, good_ev) = batch(&s, 1, 0, &mut rng, 10, base);
    let mut bad_sig = good.clone();
    let last = bad_sig.len() - 1;
    bad_sig[last] ^= 1;
    let mut wrong_version = good.clone();
    wrong_version[0] = 9;
    let sealed_with = |seq: u64, f: &dyn Fn(&mut edgetally_core::Batch)| {
        let mut b = build_at(
            BatchId {
                producer: s.producer(),
                epoch: 1,
                seq,
            },
            &good_ev,
            base,
        );
        f(&mut b);
        s.seal(&b).expect("seal")
    };
    let too_old = sealed_with(10, &|b| {
        b.summaries[0].bucket = (base - 8 * 86_400_000) / 1000
    });
    let future = sealed_with(11, &|b| b.summaries[0].bucket = (base + 3_600_000) / 1000);
    let nan = sealed_with(12, &|b| b.summaries[0].summary.max = f64::NAN);
    let huge_len = {
        let mut v = vec![1u8, 0x80, 0x80, 0xc0, 0x01]; // declares a 3 MiB payload
        v.extend_from_slice(&[0; 100]);
        v
    };
    let (good2, good2_ev) = batch(&s, 1, 1, &mut rng, 10, base);
    let cases: Vec<(Vec<u8>, Reply)> = vec![
        (
            b"garbage!".to_vec(),
            Reply::nack(RejectCode::UnsupportedVersion),
        ),
        (vec![1, 5, 1, 2], Reply::nack(RejectCode::Malformed)),
        (
            good[..good.len() - 3].to_vec(),
            Reply::nack(RejectCode::Malformed),
        ),
        (huge_len, Reply::nack(RejectCode::PayloadTooLarge)),
        (wrong_version, Reply::nack(RejectCode::UnsupportedVersion)),
        (bad_sig, Reply::nack(RejectCode::BadSignature)),
        (too_old, Reply::nack(RejectCode::BucketTooOld)),
        (future, Reply::nack(RejectCode::FutureTimestamp)),
        (nan, Reply::nack(RejectCode::InvalidValue)),
        (good.clone(), Reply::Ack),
        (good.clone(), Reply::Ack), // replay: acked, counted once
        (good2, Reply::Ack),
        (
            vec![1u8; (1 << 20) + 500],
            Reply::nack(RejectCode::PayloadTooLarge),
        ), // refused unread
    ];
    let rt = rt();
    let got = rt.block_on(async {
        let c = Client::connect(m.quic, vec![m.cert])
            .await
            .expect("connect");
        let tasks: Vec<_> = cases
            .iter()
            .map(|(b, _)| {
                let (c, b) = (c.clone(), b.clone());
                tokio::spawn(async move { c.send(&b).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task").expect("send"));
        }
        // A client pinning another certificate is refused.
        assert!(Client::connect(m.quic, vec![[0u8; 32]]).await.is_err());
        out
    });
    for ((_, want), got) in cases.iter().zip(&got) {
        assert_eq!(got, want);
    }
    assert_eq!(m.metric("edgetally_batches_duplicate_total"), 1.0);
    for (code, n) in [
        ("bad_signature", 1.0),
        ("bucket_too_old", 1.0),
        ("future_timestamp", 1.0),
        ("invalid_value", 1.0),
        ("malformed", 2.0),
        ("unsupported_version", 2.0),
        ("payload_too_large", 2.0),
    ] {
        assert_eq!(
            m.metric(&format!(
                "edgetally_batches_rejected_total{{reason=\"{code}\"}}"
            )),
            n,
            "{code}"
        );
    }
    // Exactly the two valid batches count.
    let mut model = Model::default();
    good_ev.iter().chain(&good2_ev).for_each(|e| model.add(e));
    let (start, end) = (base - 2 * 3_600_000, base + 1000);
    let v = q(&m, &format!("/v1/totals?start={start}&end={end}"));
    assert!(
        same_json(&v["groups"][0], model.total(|_, _, _| true)),
        "{v}"
    );

    // HTTP batches: same replies, CORS for browser pages elsewhere, and an oversized body.
    let (st, v, headers) = m.post("/v1/batches", "application/octet-stream", &good);
    assert_eq!((st, v["result"].as_str()), (200, Some("ack")));
    assert!(
        headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("access-control-allow-origin")),
        "{headers:?}"
    );
    let (st, v, _) = m.post(
        "/v1/batches",
        "application/octet-stream",
        &vec![1u8; (1 << 20) + 200],
    );
    assert_eq!((st, v["error"].as_str()), (422, Some("payload_too_large")));
    let (st, v, _) = m.post("/v1/batches", "application/octet-stream", b"\x01\x02");
    assert_eq!(
        (st, v["error"].as_str(), v["frame"].as_str()),
        (422, Some("malformed"), Some("0101"))
    );

    // Events: each judged on its own; the valid ones are applied, the rest listed by index.
    let t = base - 1000;
    let body = format!(
        "[{{\"ts_ms\":{t},\"category\":\"ev\",\"value\":2}},{{\"ts_ms\":{t},\"category\":\"\"}},{{\"ts_ms\":\"x\",\"category\":\"ev\"}},\
         {{\"ts_ms\":{t},\"category\":\"ev\",\"entity\":\"u1\",\"value\":1e16}},{{\"ts_ms\":{},\"category\":\"ev\"}},{{\"ts_ms\":{},\"category\":\"ev\"}},\
         {{\"ts_ms\":{t},\"category\":\"ev\",\"extra\":1}},{{\"ts_ms\":{t},\"category\":\"ev\",\"entity\":\"u1\",\"value\":-0.5}}, 7]",
        base - 30 * 86_400_000,
        base + 3_600_000
    );
    let (st, v, _) = m.post("/v1/events", "application/json", body.as_bytes());
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["accepted"], 2);
    let reasons: Vec<(u64, String)> = v["rejected"]
        .as_array()
        .expect("rejected")
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap_or(99),
                r["error"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let want: Vec<(u64, String)> = [
        (1, "invalid_category"),
        (2, "invalid_timestamp"),
        (3, "invalid_value"),
        (4, "bucket_too_old"),
        (5, "future_timestamp"),
        (6, "invalid_event"),
        (8, "invalid_event"),
    ]
    .iter()
    .map(|(i, s)| (*i, s.to_string()))
    .collect();
    assert_eq!(reasons, want);
    let ndjson = format!("{{\"ts_ms\":{t},\"category\":\"nd\"}}\nnot json\n\n{{\"ts_ms\":{t},\"category\":\"nd\",\"value\":3}}\n");
    let (st, v, _) = m.post("/v1/events", "application/x-ndjson", ndjson.as_bytes());
    assert_eq!((st, v["accepted"].as_u64()), (200, Some(2)), "{v}");
    assert_eq!(v["rejected"][0]["index"], 1);
    assert_eq!(v["rejected"][0]["error"], "malformed");
    let v = q(
        &m,
        &format!("/v1/aggregate?category=ev&start={}&end={end}", t - 1000),
    );
    assert_eq!(
        (
            v["count"].as_u64(),
            v["sum_exact"].as_str(),
            v["min"].as_f64()
        ),
        (Some(2), Some("1.5"), Some(-0.5)),
        "{v}"
    );
    let v = q(
        &m,
        &format!("/v1/aggregate?category=nd&start={}&end={end}", t - 1000),
    );
    assert_eq!(
        (v["count"].as_u64(), v["sum_exact"].as_str()),
        (Some(2), Some("4"))
    );
    let (st, v, _) = m.post("/v1/events", "application/json", b"[{\"ts_ms\":1");
    assert_eq!((st, v["error"].as_str()), (400, Some("malformed")));

    // Bad query parameters: 400 with a code, never a panic.
    for (path, code) in [
        (
            "/v1/aggregate?category=a&start=1&end=2&color=red",
            "unknown_parameter",
        ),
        ("/v1/aggregate?category=a&start=5&end=2", "bad_window"),
        ("/v1/aggregate?start=1&end=2", "missing_parameter"),
        (
            "/v1/aggregate?category=a&start=1&start=2&end=3",
            "duplicate_parameter",
        ),
        ("/v1/aggregate?category=a&start=1.5&end=3", "bad_parameter"),
        (
            "/v1/aggregate?category=a&start=-99999999999999999999&end=3",
            "bad_parameter",
        ),
        ("/v1/topk?category=a&start=1&end=2&k=0", "bad_parameter"),
        (
            "/v1/topk?category=a&start=1&end=2&by=colour",
            "bad_parameter",
        ),
        ("/v1/totals?start=1&end=2&group_by=x", "bad_parameter"),
        (
            "/v1/series?category=a&start=0&end=100000000000&step_ms=1000",
            "too_many_points",
        ),
        (
            "/v1/series?category=a&start=0&end=10&step_ms=0",
            "bad_parameter",
        ),
        ("/v1/window?category=a", "missing_parameter"),
        ("/v1/window?category=a&width_ms=-5", "bad_parameter"),
        ("/v1/nope", "not_found"),
    ] {
        let (st, v) = m.get(path);
        assert_eq!(
            (st == 400 || st == 404, v["error"].as_str()),
            (true, Some(code)),
            "{path}: {v}"
        );
        assert!(v["message"].is_string());
    }
    // An empty category answers zeros, with nulls where the statistic is undefined.
    let v = q(&m, "/v1/aggregate?category=nothing&start=0&end=1000");
    assert!(same_json(&v, None), "{v}");
    let (st, body) = m.get("/healthz");
    assert_eq!((st, body), (200, Value::String("ok\n".into())));
    let (st, v) = m.get("/readyz");
    assert_eq!((st, &v["ready"]), (200, &Value::Bool(true)), "{v}");
    for check in ["recovered", "store", "queue", "peers"] {
        assert_eq!(v["checks"][check]["ok"], Value::Bool(true), "{check}: {v}");
    }
    assert_eq!(v["checks"]["peers"]["total"], 0, "{v}");
    // The standard process families, against what the kernel says of the process.
    let status = std::fs::read_to_string(format!("/proc/{}/status", m.pid())).expect("status");
    let kib = |field: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect(field)
    };
    let rss = m.metric("process_resident_memory_bytes");
    let kernel_rss = kib("VmRSS:") * 1024.0;
    assert!(
        rss > kernel_rss * 0.5 && rss < kernel_rss * 2.0,
        "{rss} vs {kernel_rss}"
    );
    let vsz = m.metric("process_virtual_memory_bytes");
    let kernel_vsz = kib("VmSize:") * 1024.0;
    assert!(
        vsz > kernel_vsz * 0.5 && vsz < kernel_vsz * 2.0,
        "{vsz} vs {kernel_vsz}"
    );
    let fds = std::fs::read_dir(format!("/proc/{}/fd", m.pid()))
        .expect("fds")
        .count() as f64;
    let open = m.metric("process_open_fds");
    assert!((open - fds).abs() <= 4.0, "{open} vs {fds}");
    let started = m.metric("process_start_time_seconds");
    let now = now_ms() as f64 / 1000.0;
    assert!(
        started <= now + 1.0 && started > now - 600.0,
        "{started} vs {now}"
    );
    assert!(m.metric("process_cpu_seconds_total") > 0.0);
    assert!(m.metric("process_max_fds") >= 64.0);
    // build_info carries the version `/v1/status` reports.
    let (_, status) = m.get("/v1/status");
    let version = status["version"].as_str().expect("version");
    assert_eq!(
        m.metric(&format!("edgetally_build_info{{version=\"{version}\"}}")),
        1.0
    );
}

/// Sends `batches` with `streams` in flight, recording which were acked, until `stop`.
async fn pump(
    c: Client,
    batches: Arc<Vec<(BatchId, Vec<u8>)>>,
    acked: Arc<Mutex<BTreeSet<BatchId>>>,
    streams: usize,
) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let (c, batches, acked, next) =
                (c.clone(), batches.clone(), acked.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((id, b)) = batches.get(i) else { break };
                    // Like a producer: a Retry (the per-producer rate limit) is waited out.
                    let mut tries = 0;
                    loop {
                        match c.send(b).await {
                            Ok(Reply::Ack) => {
                                acked.lock().expect("lock").insert(*id);
                            }
                            Ok(Reply::Retry { after_ms }) if tries < 100 => {
                                tries += 1;
                                tokio::time::sleep(Duration::from_millis(after_ms as u64)).await;
                                continue;
                            }
                            Ok(Reply::Nack(code)) => panic!("batch {id:?} refused: {code}"),
                            Ok(_) => {}
                            Err(_) => return, // the merger died
                        }
                        break;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

#[test]
fn acked_batches_survive_kill_9_and_retries_never_double_count() {
    for round in 0..3u64 {
        let dir = TempDir::new(&format!("kill9-{round}"));
        let m = Merger::start(&dir.0, &[]);
        let base = now_ms();
        let s = signer(300 + round);
        let mut rng = Rng::new(round);
        let mut model = Model::default();
        let batches: Vec<(BatchId, Vec<u8>)> = (0..400)
            .map(|seq| {
                let (b, ev) = batch(&s, 1, seq, &mut rng, 20, base);
                ev.iter().for_each(|e| model.add(e));
                (
                    BatchId {
                        producer: s.producer(),
                        epoch: 1,
                        seq,
                    },
                    b,
                )
            })
            .collect();
        let batches = Arc::new(batches);
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let rt = rt();
        let kill_after = 30 + 60 * round as usize;
        let (quic, cert) = (m.quic, m.cert);
        rt.block_on(async {
            let c = Client::connect(quic, vec![cert]).await.expect("connect");
            let pumping = tokio::spawn(pump(c, batches.clone(), acked.clone(), 8));
            // Kill -9 in the middle of the load.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while acked.lock().expect("lock").len() < kill_after
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            m.kill9();
            // Replies already on the wire arrive within moments; then give up on the rest
            // (the connection would only notice the dead peer at its idle timeout).
            tokio::time::sleep(Duration::from_millis(500)).await;
            pumping.abort();
        });
        let acked_before: BTreeSet<BatchId> = acked.lock().expect("lock").clone();
        assert!(
            acked_before.len() >= kill_after && acked_before.len() < 400,
            "round {round}: {} acked",
            acked_before.len()
        );

        // Restart on the same data: every acked batch is there.
        let m = Merger::start(&dir.0, &[]);
        let (start, end) = (base - 2 * 3_600_000, base + 1000);
        let events_in = |ids: &BTreeSet<BatchId>| -> u64 { ids.len() as u64 * 20 };
        let v = q(&m, &format!("/v1/totals?start={start}&end={end}"));
        let counted = v["groups"][0]["count"].as_u64().unwrap_or(0);
        assert!(
            counted >= events_in(&acked_before),
            "round {round}: {counted} counted, {} acked events",
            events_in(&acked_before)
        );
        // The client retries everything it has no Ack for; nothing may count twice.
        let unacked: Vec<(BatchId, Vec<u8>)> = batches
            .iter()
            .filter(|(id, _)| !acked_before.contains(id))
            .cloned()
            .collect();
        let unacked = Arc::new(unacked);
        // Like a producer, resend whatever has no Ack yet: a send that fails on the wire (a
        // stream reset under a loaded CI machine) is sent again on a fresh connection, so
        // only a refusal, a loss or a double count can fail the test.
        let mut sends = 0;
        for _ in 0..3 {
            let left: Vec<(BatchId, Vec<u8>)> = unacked
                .iter()
                .filter(|(id, _)| !acked.lock().expect("lock").contains(id))
                .cloned()
                .collect();
            if left.is_empty() {
                break;
            }
            sends += left.len();
            rt.block_on(async {
                let c = Client::connect(m.quic, vec![m.cert])
                    .await
                    .expect("connect");
                pump(c.clone(), Arc::new(left), acked.clone(), 8).await;
                c.close().await;
            });
        }
        assert_eq!(
            acked.lock().expect("lock").len(),
            400,
            "round {round}: all acked after retry"
        );
        let v = q(&m, &format!("/v1/totals?start={start}&end={end}"));
        assert!(
            same_json(&v["groups"][0], model.total(|_, _, _| true)),
            "round {round}: {v}"
        );
        // Every resend was answered as applied or as a duplicate; none applied twice.
        let (dups, applied) = (
            m.metric("edgetally_batches_duplicate_total") as u64,
            m.metric("edgetally_batches_applied_total") as u64,
        );
        assert!(
            applied <= unacked.len() as u64,
            "round {round}: {applied} applied"
        );
        assert!(
            dups + applied >= unacked.len() as u64 && dups + applied <= sends as u64,
            "round {round}: {dups} duplicates + {applied} applied for {sends} sends"
        );
    }
}

/// A merger restarted on the same address after `kill -9` answers packets of its previous
/// life's connections with a stateless reset (its reset key derives from the node key), so a
/// producer's old connection fails at once with "reset" and the producer reconnects — instead
/// of hanging until a send timeout or the 30 s idle timeout.
#[test]
fn a_restarted_merger_resets_its_previous_connections() {
    let dir = TempDir::new("reset");
    let m = Merger::start(&dir.0, &[]);
    let (quic, cert) = (m.quic, m.cert);
    let s = signer(77);
    let mut rng = Rng::new(77);
    let base = now_ms();
    let (first, _) = batch(&s, 1, 0, &mut rng, 5, base);
    let (second, _) = batch(&s, 1, 1, &mut rng, 5, base);
    let rt = rt();
    let old = rt.block_on(async {
        let c = Client::connect(quic, vec![cert]).await.expect("connect");
        assert_eq!(c.send(&first).await.expect("send"), Reply::Ack);
        c
    });
    m.kill9();
    let m = Merger::start_at(&dir.0, &quic.to_string(), &[], &[]);
    assert_eq!(m.cert, cert, "same identity after the restart");
    rt.block_on(async {
        // Bounded far below the idle timeout; without a reset this send would hang.
        let got = tokio::time::timeout(Duration::from_secs(8), old.send(&second)).await;
        match got {
            Ok(Err(e)) => assert!(e.to_string().contains("reset"), "{e}"),
            other => panic!("the old connection was not reset: {other:?}"),
        }
        let fresh = Client::connect(quic, vec![cert]).await.expect("reconnect");
        assert_eq!(fresh.send(&second).await.expect("send"), Reply::Ack);
        fresh.close().await;
    });
    let v = q(&m, "/v1/totals?start=0&end=9999999999999");
    assert_eq!(v["groups"][0]["count"], 10, "{v}");
}

#[test]
fn graceful_shutdown_keeps_everything_and_config_sources_apply() {
    let dir = TempDir::new("term");
    let cfg = dir.0.join("edgetally.toml");
    std::fs::write(&cfg, "max_summaries = 3\nsnapshot_interval_secs = 1\n").expect("write config");
    let m = Merger::start_with_env(
        &dir.0,
        &["--config", cfg.to_str().expect("utf8")],
        &[("EDGETALLY_MAX_LATENESS_MS", "60000")],
    );
    let base = now_ms();
    let s = signer(400);
    let ev = |ts: i64, c: &str| Event {
        category: c.into(),
        entity: None,
        ts_ms: ts,
        eighths: 8,
    };
    let ok = s
        .seal(&build_at(
            BatchId {
                producer: s.producer(),
                epoch: 1,
                seq: 0,
            },
            &[ev(base, "a"), ev(base, "b")],
            base,
        ))
        .expect("seal");
    let four = s
        .seal(&build_at(
            BatchId {
                producer: s.producer(),
                epoch: 1,
                seq: 1,
            },
            &[ev(base, "a"), ev(base, "b"), ev(base, "c"), ev(base, "d")],
            base,
        ))
        .expect("seal");
    let late = s
        .seal(&build_at(
            BatchId {
                producer: s.producer(),
                epoch: 1,
                seq: 2,
            },
            &[ev(base - 120_000, "a")],
            base,
        ))
        .expect("seal");
    let replies = rt().block_on(async {
        let c = Client::connect(m.quic, vec![m.cert])
            .await
            .expect("connect");
        let mut out = Vec::new();
        for b in [&ok, &four, &late] {
            out.push(c.send(b).await.expect("send"));
        }
        c.close().await;
        out
    });
    assert_eq!(
        replies,
        vec![
            Reply::Ack,
            Reply::nack(RejectCode::TooManySummaries),
            Reply::nack(RejectCode::BucketTooOld)
        ]
    );
    std::thread::sleep(Duration::from_millis(1500)); // let a snapshot happen
    let before = q(
        &m,
        &format!(
            "/v1/totals?start={}&end={}&group_by=category",
            base - 10_000,
            base + 1000
        ),
    );
    assert!(m.terminate(), "SIGTERM exits cleanly");
    let m = Merger::start(&dir.0, &[]);
    assert_eq!(m.recovered, 0, "the shutdown snapshot covers every batch");
    let after = q(
        &m,
        &format!(
            "/v1/totals?start={}&end={}&group_by=category",
            base - 10_000,
            base + 1000
        ),
    );
    assert_eq!(before["groups"], after["groups"]);
    assert_eq!(after["groups"].as_array().map(Vec::len), Some(2));
    // The node key and certificate persist across restarts.
    let v = q(&m, "/v1/status");
    assert_eq!(
        v["cert_sha256"]
            .as_str()
            .and_then(edgetally_net::tls::parse_hash),
        Some(m.cert)
    );
}
