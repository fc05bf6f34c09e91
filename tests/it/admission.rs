//! Admission and quotas through the real binary: the producer policies (allowlist re-read
//! while running, enrolment credentials over HTTP, QUIC and the native SDK), rate limits
//! answered with Retry, hourly novelty quotas, the series cap and value bounds — each with
//! its reason code and metric — then a restart, with totals checked against a model of
//! exactly the batches that were acknowledged. And the HTTP API's TLS, tokens and CORS.

use crate::harness::{now_ms, run_cli, Merger, TempDir};
use edgetally_core::BatchId;
use edgetally_proto::{BatchBuilder, Reply, Signer};
use edgetally_tests::signer;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// A batch of one event per (category, entity) pair, value 1.
fn batch(s: &Signer, seq: u64, keys: &[(&str, Option<&str>)], ts: i64) -> Vec<u8> {
    let mut b = BatchBuilder::new(1000).expect("width");
    for (c, e) in keys {
        b.record(c, *e, ts, 1.0).expect("record");
    }
    let id = BatchId {
        producer: s.producer(),
        epoch: 1,
        seq,
    };
    s.seal(&b.finish(id, ts)).expect("seal")
}

/// POSTs a batch; returns (status, error code or "ack"/"retry").
fn post(m: &Merger, raw: &[u8], credential: Option<&str>) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.post(&format!("{}/v1/batches", m.http));
    if let Some(c) = credential {
        req = req.header("edgetally-credential", c);
    }
    let mut res = req.send(raw).expect("POST");
    let status = res.status().as_u16();
    let v: Value =
        serde_json::from_str(&res.body_mut().read_to_string().expect("body")).expect("json reply");
    let what = v["error"]
        .as_str()
        .or(v["result"].as_str())
        .unwrap_or("?")
        .to_string();
    (status, what)
}

/// Counts per category, from the node.
fn count(m: &Merger, cat: &str, base: i64) -> u64 {
    let (st, v) = m.get(&format!(
        "/v1/aggregate?category={cat}&start={}&end={}",
        base - 3_600_000,
        base + 1000
    ));
    assert_eq!(st, 200, "{v}");
    v["count"].as_u64().unwrap_or(0)
}

fn assert_model(m: &Merger, model: &BTreeMap<String, u64>, base: i64, what: &str) {
    for (cat, n) in model {
        assert_eq!(count(m, cat, base), *n, "{what}: category {cat}");
    }
}

fn add(model: &mut BTreeMap<String, u64>, keys: &[(&str, Option<&str>)]) {
    for (c, _) in keys {
        *model.entry(c.to_string()).or_default() += 1;
    }
}

#[test]
fn allowlist_is_enforced_and_reread_while_running() {
    let dir = TempDir::new("allowlist");
    let list = dir.0.join("producers.txt");
    let (a, b) = (signer(501), signer(502));
    std::fs::write(&list, format!("# site A\n{}\n", a.producer().to_hex())).expect("write");
    let env = [
        ("EDGETALLY_PRODUCER_POLICY", "allowlist"),
        (
            "EDGETALLY_PRODUCER_ALLOWLIST",
            list.to_str().expect("utf-8"),
        ),
    ];
    let data = dir.0.join("data");
    let m = Merger::start_with_env(&data, &[], &env);
    let base = now_ms();
    let mut model = BTreeMap::new();
    let k = [("al", None)];
    assert_eq!(post(&m, &batch(&a, 0, &k, base), None), (200, "ack".into()));
    add(&mut model, &k);
    assert_eq!(
        post(&m, &batch(&b, 0, &k, base), None),
        (422, "not_admitted".into())
    );
    // B is added, A removed: within a few seconds the node follows the file.
    std::fs::write(&list, format!("{}\n", b.producer().to_hex())).expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seq = 1;
    loop {
        let r = post(&m, &batch(&b, seq, &k, base), None);
        seq += 1;
        if r.0 == 200 {
            add(&mut model, &k);
            break;
        }
        assert_eq!(r, (422, "not_admitted".into()));
        assert!(Instant::now() < deadline, "the allowlist was not re-read");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        post(&m, &batch(&a, 1, &k, base), None),
        (422, "not_admitted".into())
    );
    // A file that does not parse leaves the list in force and is counted.
    std::fs::write(&list, "not a key\n").expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.metric("edgetally_allowlist_load_errors_total") < 1.0 {
        assert!(Instant::now() < deadline, "a bad allowlist went unnoticed");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(post(&m, &batch(&b, seq, &k, base), None).0, 200);
    add(&mut model, &k);
    assert!(m.metric("edgetally_batches_rejected_total{reason=\"not_admitted\"}") >= 3.0);
    assert_model(&m, &model, base, "before restart");
    assert!(m.terminate(), "graceful stop");
    std::fs::write(&list, format!("{}\n", b.producer().to_hex())).expect("write");
    let m = Merger::start_with_env(&data, &[], &env);
    assert_model(&m, &model, base, "after restart");
}

#[test]
fn enrolment_credentials_admit_over_http_quic_and_the_native_sdk() {
    let dir = TempDir::new("enrol");
    let issuer = dir.0.join("issuer.key");
    let (ok, out, err) = run_cli(&["keygen", "--out", issuer.to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    let issuer_pub = out
        .lines()
        .find_map(|l| l.strip_prefix("public key: "))
        .expect("public key printed")
        .to_string();
    let other = dir.0.join("other.key");
    assert!(run_cli(&["keygen", "--out", other.to_str().expect("utf-8")]).0);
    let enroll = |key: &std::path::Path, producer: &Signer, ttl: &str| -> String {
        let (ok, out, err) = run_cli(&[
            "enroll",
            "--issuer-key",
            key.to_str().expect("utf-8"),
            "--producer",
            &producer.producer().to_hex(),
            "--ttl-secs",
            ttl,
        ]);
        assert!(ok, "{err}");
        out.trim().to_string()
    };
    let env = [
        ("EDGETALLY_PRODUCER_POLICY", "enrolled"),
        ("EDGETALLY_ISSUER_KEYS", issuer_pub.as_str()),
    ];
    let data = dir.0.join("data");
    let m = Merger::start_with_env(&data, &[], &env);
    let base = now_ms();
    let mut model = BTreeMap::new();
    let k = [("en", None)];

    // HTTP: refused without a credential, refused with a tampered, expired or foreign one,
    // admitted with a good one (and afterwards without it).
    let c = signer(601);
    assert_eq!(post(&m, &batch(&c, 0, &k, base), None).1, "not_admitted");
    let good = enroll(&issuer, &c, "3600");
    let mut tampered = good.clone().into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    for bad in [
        tampered.as_str(),
        &enroll(&issuer, &c, "0"),
        &enroll(&other, &c, "3600"),
        "zz",
    ] {
        let r = post(&m, &batch(&c, 0, &k, base), Some(bad));
        assert_eq!(r.0, 422, "{bad}: {r:?}");
        assert!(r.1 == "not_admitted" || r.1 == "malformed", "{r:?}");
    }
    assert_eq!(post(&m, &batch(&c, 0, &k, base), Some(&good)).0, 200);
    add(&mut model, &k);
    assert_eq!(post(&m, &batch(&c, 1, &k, base), None).0, 200);
    add(&mut model, &k);
    // A credential for one key admits nobody else.
    let d = signer(602);
    assert_eq!(
        post(&m, &batch(&d, 0, &k, base), Some(&good)).1,
        "not_admitted"
    );

    // QUIC: the credential is one stream, the batches follow.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let e = signer(603);
    let cred_e = edgetally_net::tls::unhex(&enroll(&issuer, &e, "3600")).expect("hex");
    rt.block_on(async {
        let cl = edgetally_net::Client::connect(m.quic, vec![m.cert])
            .await
            .expect("connect");
        assert_eq!(
            cl.send(&batch(&e, 0, &k, base))
                .await
                .expect("send")
                .reason(),
            Some(edgetally_core::RejectCode::NotAdmitted)
        );
        assert_eq!(cl.send(&cred_e).await.expect("send"), Reply::Ack);
        assert_eq!(
            cl.send(&batch(&e, 0, &k, base)).await.expect("send"),
            Reply::Ack
        );
        cl.close().await;
    });
    add(&mut model, &k);

    // The native SDK through `edgetally send --credential`: the key is the state directory's.
    let state = dir.0.join("sdk-state");
    std::fs::create_dir_all(&state).expect("mkdir");
    let seed = [0x5a; 32];
    std::fs::write(state.join("key"), edgetally_net::tls::hex(&seed)).expect("write");
    let sdk = Signer::from_seed(seed);
    let cred = enroll(&issuer, &sdk, "3600");
    let events = dir.0.join("events.ndjson");
    let lines: String = (0..20)
        .map(|i| {
            format!(
                "{{\"ts_ms\":{},\"category\":\"sdk\",\"value\":1}}\n",
                base - i
            )
        })
        .collect();
    std::fs::write(&events, lines).expect("write");
    let (ok, _, err) = run_cli(&[
        "send",
        "--endpoint",
        &m.quic.to_string(),
        "--cert-sha256",
        &edgetally_net::tls::hex(&m.cert),
        "--state-dir",
        state.to_str().expect("utf-8"),
        "--credential",
        &cred,
        "--input",
        events.to_str().expect("utf-8"),
        "--timeout-secs",
        "20",
    ]);
    assert!(ok, "send with a credential: {err}");
    assert!(err.contains(&sdk.producer().to_hex()), "{err}");
    model.insert("sdk".into(), 20);
    assert!(m.metric("edgetally_credentials_total{result=\"accepted\"}") >= 3.0);
    assert!(m.metric("edgetally_credentials_total{result=\"refused\"}") >= 3.0);
    assert_model(&m, &model, base, "before restart");
    m.kill9();
    let m = Merger::start_with_env(&data, &[], &env);
    assert_model(&m, &model, base, "after kill -9");
}

/// Checking a credential costs a signature verification: a client posting forged ones is held
/// to its address's rate like any other, before anything is verified.
#[test]
fn forged_credentials_are_held_to_the_source_rate() {
    let dir = TempDir::new("cred-flood");
    let issuer = edgetally_proto::credential::issuer_public(&[3; 32]);
    let issuer_hex = edgetally_net::tls::hex(&issuer);
    let env = [
        ("EDGETALLY_PRODUCER_POLICY", "enrolled"),
        ("EDGETALLY_ISSUER_KEYS", issuer_hex.as_str()),
        ("EDGETALLY_SOURCE_BATCHES_PER_SEC", "5"),
    ];
    let m = Merger::start_with_env(&dir.0, &[], &env);
    let s = signer(650);
    // Signed by another issuer: well formed, verified, refused.
    let forged = edgetally_net::tls::hex(&edgetally_proto::credential::issue(
        &[4; 32],
        &s.producer(),
        now_ms() + 3_600_000,
    ));
    let raw = batch(&s, 0, &[("fl", None)], now_ms());
    let started = Instant::now();
    let (mut refused, mut retried) = (0u64, 0u64);
    for _ in 0..40 {
        match post(&m, &raw, Some(&forged)) {
            (422, code) => {
                assert_eq!(code, "not_admitted");
                refused += 1;
            }
            (503, _) => retried += 1,
            other => panic!("{other:?}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(retried > 0, "no forged credential was held back");
    assert!(
        (refused as f64) <= 11.0 + elapsed * 5.0 + 1.0,
        "{refused} credentials checked in {elapsed:.2} s at 5/s"
    );
    let checked = m.metric("edgetally_credentials_total{result=\"refused\"}");
    assert_eq!(
        checked, refused as f64,
        "only admitted requests cost a verification"
    );
}

#[test]
fn rate_limits_quotas_series_cap_and_bounds_each_answer_with_their_code() {
    let dir = TempDir::new("quotas");
    let env = [
        ("EDGETALLY_PRODUCER_BATCHES_PER_SEC", "5"),
        ("EDGETALLY_NEW_CATEGORIES_PER_HOUR", "3"),
        ("EDGETALLY_NEW_ENTITIES_PER_HOUR", "4"),
        ("EDGETALLY_MAX_SERIES", "40"),
        ("EDGETALLY_VALUE_BOUNDS", "{ temp = [-50, 60] }"),
    ];
    let data = dir.0.join("data");
    let m = Merger::start_with_env(&data, &[], &env);
    let base = now_ms();
    let mut model: BTreeMap<String, u64> = BTreeMap::new();

    // Rate: a burst of 2 s at 5/s (10, plus one in debt), then Retry with Retry-After.
    let p = signer(701);
    let k = [("rate", None)];
    let started = Instant::now();
    let (mut acked, mut retried, mut first_acked) = (0u64, 0u64, None);
    for seq in 0..30 {
        let raw = batch(&p, seq, &k, base);
        match post(&m, &raw, None) {
            (200, _) => {
                acked += 1;
                first_acked.get_or_insert(raw);
            }
            (503, what) => {
                assert_eq!(what, "retry");
                retried += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(acked >= 10, "the burst is admitted: {acked}");
    assert!(
        (acked as f64) <= 11.0 + elapsed * 5.0 + 1.0,
        "{acked} acked in {elapsed:.2} s at 5/s"
    );
    assert_eq!(acked + retried, 30);
    model.insert("rate".into(), acked);
    // A resent batch is acknowledged even while its producer is throttled.
    assert_eq!(post(&m, &first_acked.expect("one acked"), None).0, 200);
    assert!(m.metric("edgetally_throttled_total{scope=\"producer\"}") >= retried as f64);

    // New categories: 3 per producer per hour; a category another producer made is not new.
    let q = signer(702);
    for (i, cat) in ["c1", "c2", "c3"].iter().enumerate() {
        let k = [(*cat, None)];
        assert_eq!(post(&m, &batch(&q, i as u64, &k, base), None).0, 200);
        add(&mut model, &k);
    }
    assert_eq!(
        post(&m, &batch(&q, 3, &[("c4", None)], base), None),
        (422, "category_quota".into())
    );
    let k = [("rate", None)];
    assert_eq!(post(&m, &batch(&q, 4, &k, base), None).0, 200);
    add(&mut model, &k);

    // New entities: 4 per producer per hour.
    let r = signer(703);
    let k = [
        ("rate", Some("e1")),
        ("rate", Some("e2")),
        ("rate", Some("e3")),
    ];
    assert_eq!(post(&m, &batch(&r, 0, &k, base), None).0, 200);
    add(&mut model, &k);
    assert_eq!(
        post(
            &m,
            &batch(&r, 1, &[("rate", Some("e4")), ("rate", Some("e5"))], base),
            None
        ),
        (422, "entity_quota".into())
    );
    let k = [("rate", Some("e4"))];
    assert_eq!(post(&m, &batch(&r, 2, &k, base), None).0, 200);
    add(&mut model, &k);

    // Value bounds: a batch with one value out of bounds is refused whole; through
    // /v1/events only that event is.
    let t = signer(704);
    let mut b = BatchBuilder::new(1000).expect("width");
    b.record("temp", None, base, 20.0).expect("record");
    b.record("temp", None, base - 1000, 61.0).expect("record");
    let id = BatchId {
        producer: t.producer(),
        epoch: 1,
        seq: 0,
    };
    let raw = t.seal(&b.finish(id, base)).expect("seal");
    assert_eq!(post(&m, &raw, None), (422, "value_out_of_bounds".into()));
    let body = format!(
        "{{\"ts_ms\":{base},\"category\":\"temp\",\"value\":20}}\n{{\"ts_ms\":{base},\"category\":\"temp\",\"value\":-51}}\n"
    );
    let (st, v, _) = m.post("/v1/events", "application/x-ndjson", body.as_bytes());
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["accepted"], 1, "{v}");
    assert_eq!(v["rejected"][0]["error"], "value_out_of_bounds", "{v}");
    model.insert("temp".into(), 1);

    // A producer the state holds before the cap fills up.
    let known = signer(705);
    let k = [("rate", None)];
    assert_eq!(post(&m, &batch(&known, 0, &k, base), None).0, 200);
    add(&mut model, &k);

    // The series cap (40): fresh producers (keys minted to fill it) each add a category;
    // refused once the node holds nine tenths of the cap — the last tenth is kept for
    // producers the state already holds.
    let mut refused = 0;
    for i in 0..40u64 {
        let s = signer(800 + i);
        let cat = format!("s{i}");
        let k = [(cat.as_str(), None)];
        match post(&m, &batch(&s, 0, &k, base), None) {
            (200, _) => add(&mut model, &k),
            (422, what) => {
                assert_eq!(what, "series_limit");
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(refused > 0, "the cap was never reached");
    let series_of = |m: &Merger| {
        let (_, status) = m.get("/v1/status");
        status["admission"]["series"].as_u64().expect("series")
    };
    let series = series_of(&m);
    assert!(
        series <= 36,
        "{series} series held by fresh keys, over 9/10 of 40"
    );
    assert!(series >= 32, "the cap refused too early: {series}");
    // A fresh key is refused even into a category that exists (it would add its own
    // per-producer series); the known producer still adds series, within its quotas.
    let k = [("rate", None)];
    let mut fresh = 0;
    loop {
        match post(&m, &batch(&signer(1100 + fresh), 0, &k, base), None) {
            (200, _) => add(&mut model, &k),
            (422, what) => {
                assert_eq!(what, "series_limit");
                break;
            }
            other => panic!("{other:?}"),
        }
        fresh += 1;
        assert!(fresh < 10, "fresh keys passed nine tenths of the cap");
    }
    assert!(series_of(&m) <= 36);
    let k = [("kept", None)];
    assert_eq!(post(&m, &batch(&known, 1, &k, base), None).0, 200);
    add(&mut model, &k);
    let series = series_of(&m);
    assert!((37..=40).contains(&series), "{series} series");
    for code in [
        "category_quota",
        "entity_quota",
        "series_limit",
        "value_out_of_bounds",
    ] {
        assert!(
            m.metric(&format!(
                "edgetally_batches_rejected_total{{reason=\"{code}\"}}"
            )) >= 1.0,
            "{code} counted"
        );
    }
    assert_model(&m, &model, base, "before restart");
    m.kill9();
    let m = Merger::start_with_env(&data, &[], &env);
    assert_model(&m, &model, base, "after kill -9");
}

/// POSTs a batch over plain HTTP from the loopback address `from` (say 127.0.0.2): a second
/// source on one machine. Returns (status, error code or "ack"/"retry").
fn post_from(m: &Merger, from: &str, raw: &[u8]) -> (u16, String) {
    let addr: std::net::SocketAddr = m
        .http
        .trim_start_matches("http://")
        .parse()
        .expect("http addr");
    crate::harness::runtime().block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(format!("{from}:0").parse().expect("from"))
            .expect("bind");
        let mut s = sock.connect(addr).await.expect("connect");
        let head = format!(
            "POST /v1/batches HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            raw.len()
        );
        s.write_all(head.as_bytes()).await.expect("write");
        s.write_all(raw).await.expect("write");
        let mut text = String::new();
        s.read_to_string(&mut text).await.expect("read");
        let status: u16 = text[9..12].parse().expect("status");
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        let what = v["error"].as_str().or(v["result"].as_str()).unwrap_or("?");
        (status, what.to_string())
    })
}

/// Issue 28, finding 9: keys are free to mint, addresses are not. One source minting a fresh
/// key per batch stops at `source_new_series_per_hour` new series (`source_quota`), while
/// another source still adds series and the first still adds to series that exist.
#[test]
fn one_source_minting_keys_gets_its_share_of_new_series_not_the_cap() {
    let dir = TempDir::new("source-quota");
    let env = [
        ("EDGETALLY_SOURCE_NEW_SERIES_PER_HOUR", "30"),
        ("EDGETALLY_PRODUCER_BATCHES_PER_SEC", "0"),
    ];
    let m = Merger::start_with_env(&dir.0, &[], &env);
    let base = now_ms();
    let mut model: BTreeMap<String, u64> = BTreeMap::new();
    let (mut acked, mut refused) = (0, 0);
    for i in 0..40u64 {
        let cat = format!("m{i}");
        let k = [(cat.as_str(), None)];
        match post(&m, &batch(&signer(3000 + i), 0, &k, base), None) {
            (200, _) => {
                acked += 1;
                add(&mut model, &k);
            }
            (422, what) => {
                assert_eq!(what, "source_quota");
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    let (_, status) = m.get("/v1/status");
    let series = status["admission"]["series"].as_u64().expect("series");
    assert!(refused > 0 && acked > 0, "{acked} acked, {refused} refused");
    assert!(
        (24..=30).contains(&series),
        "{series} series from one source with a share of 30"
    );
    // Into series that exist (a key already known, a category it already wrote): still
    // taken from the same source. A fresh key is not: it adds its own per-producer series.
    let k = [("m0", None)];
    assert_eq!(post(&m, &batch(&signer(3000), 1, &k, base), None).0, 200);
    add(&mut model, &k);
    assert_eq!(
        post(&m, &batch(&signer(3100), 0, &k, base), None),
        (422, "source_quota".into())
    );
    // Another source adds series of its own.
    let k = [("other-source", None)];
    assert_eq!(
        post_from(&m, "127.0.0.2", &batch(&signer(3101), 0, &k, base)).0,
        200
    );
    add(&mut model, &k);
    assert!(m.metric("edgetally_batches_rejected_total{reason=\"source_quota\"}") >= 1.0);
    assert_model(&m, &model, base, "after the source's share ran out");
}

/// One HTTP/1.1 request over TLS to a node whose certificate hash is `pin`; returns the
/// status and the whole response text.
fn https(addr: &str, pin: [u8; 32], request: &str) -> Result<(u16, String), String> {
    let cfg = edgetally_net::tls::tcp_client_config(vec![pin]).map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).map_err(|e| e.to_string())?;
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP response: {text:?}"))?;
    Ok((status, text))
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r
}

#[test]
fn http_tls_tokens_and_cors_guard_the_api() {
    let dir = TempDir::new("tokens");
    let env = [
        ("EDGETALLY_HTTP_TLS", "true"),
        ("EDGETALLY_READ_TOKENS", "reader-token-1"),
        ("EDGETALLY_WRITE_TOKENS", "writer-token-1"),
        ("EDGETALLY_CORS_ORIGINS", "https://app.example"),
    ];
    let m = Merger::start_with_env(&dir.0, &[], &env);
    let addr = m
        .http
        .strip_prefix("https://")
        .expect("the node announces https")
        .to_string();
    let pin = m.cert;
    let get = |path: &str, h: &[(&str, &str)]| {
        https(&addr, pin, &request("GET", path, h, "")).expect("https")
    };
    assert_eq!(get("/healthz", &[]).0, 200);
    let (st, text) = get("/v1/status", &[]);
    assert_eq!(st, 401, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{text}"
    );
    assert_eq!(
        get("/v1/status", &[("Authorization", "Bearer writer-token-1")]).0,
        403
    );
    assert_eq!(
        get("/v1/status", &[("Authorization", "Bearer reader-token-2")]).0,
        401
    );
    assert_eq!(
        get("/v1/status", &[("Authorization", "Bearer reader-token-1")]).0,
        200
    );
    assert_eq!(get("/metrics", &[]).0, 401);
    let body = format!(
        "{{\"ts_ms\":{},\"category\":\"tok\",\"value\":2}}\n",
        now_ms()
    );
    let post = |token: &str| {
        https(
            &addr,
            pin,
            &request(
                "POST",
                "/v1/events",
                &[
                    ("Authorization", token),
                    ("Content-Type", "application/x-ndjson"),
                ],
                &body,
            ),
        )
        .expect("https")
    };
    assert_eq!(post("Bearer reader-token-1").0, 403);
    let (st, text) = post("Bearer writer-token-1");
    assert_eq!(st, 200, "{text}");
    assert!(text.contains("\"accepted\":1"), "{text}");
    // CORS: the listed origin is allowed, another is not (and a preflight needs no token).
    let pre = |origin: &str| get_with(&addr, pin, "OPTIONS", origin);
    let ok = pre("https://app.example");
    assert!(
        ok.to_ascii_lowercase()
            .contains("access-control-allow-origin: https://app.example"),
        "{ok}"
    );
    let no = pre("https://evil.example");
    assert!(
        !no.to_ascii_lowercase()
            .contains("access-control-allow-origin"),
        "{no}"
    );
    // Plain HTTP on the TLS port gets no answer; a wrong pin fails the handshake.
    let plain = ureq::get(&format!("http://{addr}/healthz"))
        .config()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .call();
    assert!(plain.is_err(), "plain HTTP answered on the TLS port");
    assert!(https(&addr, [0u8; 32], &request("GET", "/healthz", &[], "")).is_err());
}

fn get_with(addr: &str, pin: [u8; 32], method: &str, origin: &str) -> String {
    https(
        addr,
        pin,
        &request(
            method,
            "/v1/status",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "GET"),
                ("Access-Control-Request-Headers", "authorization"),
            ],
            "",
        ),
    )
    .expect("https")
    .1
}
