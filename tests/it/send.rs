//! `edgetally send`: events of the seeds' shapes through the native SDK to a real merger, and
//! a producer that outlives a merger outage through its state directory.

use crate::harness::{now_ms, run_cli, Merger, TempDir};
use edgetally_net::tls::hex;
use edgetally_tests::{decimal, Rng};

fn send(m_quic: &str, cert: &[u8; 32], args: &[&str]) -> (bool, String, String) {
    let hash = hex(cert);
    let mut all = vec![
        "send",
        "--endpoint",
        m_quic,
        "--cert-sha256",
        &hash,
        "--timeout-secs",
        "20",
    ];
    all.extend_from_slice(args);
    run_cli(&all)
}

#[test]
fn iot_and_activity_shapes_arrive_exactly() {
    let dir = TempDir::new("send");
    let m = Merger::start(&dir.0, &[]);
    let now_s = now_ms() / 1000;
    let mut rng = Rng::new(11);
    let mut iot = String::new();
    let (mut count, mut nanos, mut lowest) = (0u64, 0i128, i64::MAX);
    for i in 0..3000 {
        let eighths = rng.below(2000) as i64 - 500;
        let ts = (now_s - rng.below(1800) as i64) as f64 + 0.25; // seconds, fractional
        iot.push_str(&format!("{{\"device_id\":\"dev-{}\",\"timestamp\":{ts},\"metric_name\":\"temperature\",\"metric_value\":{}}}\n", i % 40, eighths as f64 / 8.0));
        count += 1;
        nanos += eighths as i128 * 125_000_000;
        lowest = lowest.min(eighths);
    }
    iot.push_str(&format!("{{\"device_id\":\"dev-x\",\"timestamp\":{now_s},\"metric_name\":\"temperature\",\"metric_value\":\"n/a\"}}\n"));
    iot.push_str("{\"device_id\":\"dev-y\",\"metric_name\":\"temperature\",\"metric_value\":1}\n");
    let path = dir.0.join("iot.ndjson");
    std::fs::write(&path, iot).expect("write input");
    let (ok, out, err) = send(
        &m.quic.to_string(),
        &m.cert,
        &["--map", "iot", "--input", path.to_str().expect("utf8")],
    );
    // Two invalid events: the run fails, saying why, after the valid ones were acknowledged.
    assert!(!ok, "{out}\n{err}");
    assert!(
        out.contains("3002 read, 3000 recorded, 2 invalid (invalid_event: 1, invalid_value: 1)"),
        "{out}"
    );
    assert!(out.contains("0 rejected, 0 dropped"), "{out}");
    assert!(
        err.contains("event #3000: invalid_value: metric_value is a string, not a number"),
        "{err}"
    );
    assert!(
        err.contains("event #3001: invalid_event: timestamp is missing"),
        "{err}"
    );
    assert!(err.contains("2 of 3002 events were invalid"), "{err}");
    let (start, end) = ((now_s - 3600) * 1000, (now_s + 10) * 1000);
    let (_, v) = m.get(&format!(
        "/v1/aggregate?category=temperature&start={start}&end={end}"
    ));
    // The non-numeric reading is refused, not counted (SPEC §2): exactly the valid ones.
    assert_eq!(v["count"].as_u64(), Some(count), "{v}");
    assert_eq!(
        v["sum_exact"].as_str(),
        Some(decimal(nanos).as_str()),
        "{v}"
    );
    assert_eq!(v["min"].as_f64(), Some(lowest as f64 / 8.0), "{v}");

    let activity = format!(
        "[{{\"user_id\":\"u1\",\"event_type\":\"purchase\",\"timestamp\":{now_s},\"attributes\":{{\"value\":12.5}}}},\
          {{\"user_id\":\"u2\",\"event_type\":\"purchase\",\"timestamp\":{now_s},\"attributes\":{{}}}},\
          {{\"user_id\":\"u1\",\"event_type\":\"click\",\"timestamp\":{now_s}}}]"
    );
    let path = dir.0.join("activity.json");
    std::fs::write(&path, activity).expect("write input");
    // A host name as the endpoint, and --allow-invalid (no event is invalid here).
    let (ok, out, err) = send(
        &format!("localhost:{}", m.quic.port()),
        &m.cert,
        &[
            "--map",
            "activity",
            "--allow-invalid",
            "--input",
            path.to_str().expect("utf8"),
        ],
    );
    assert!(ok, "{out}\n{err}");
    let (_, v) = m.get(&format!(
        "/v1/aggregate?category=purchase&start={start}&end={end}"
    ));
    assert_eq!(
        (v["count"].as_u64(), v["sum_exact"].as_str()),
        (Some(2), Some("13.5")),
        "{v}"
    );
    let (_, v) = m.get(&format!(
        "/v1/topk?category=purchase&start={start}&end={end}&by=producer"
    ));
    assert_eq!(
        v["items"].as_array().map(Vec::len),
        Some(1),
        "one producer key per send run: {v}"
    );
}

#[test]
fn a_producer_outlives_a_merger_outage_through_its_state_dir() {
    let dir = TempDir::new("outage");
    let state = dir.0.join("producer");
    let state_s = state.to_str().expect("utf8").to_string();
    let now = now_ms();
    let mut body = String::new();
    for i in 0..500 {
        body.push_str(&format!(
            "{{\"ts_ms\":{},\"category\":\"c\",\"entity\":\"e{}\",\"value\":{}}}\n",
            now - i * 10,
            i % 7,
            i % 5
        ));
    }
    let input = dir.0.join("in.ndjson");
    std::fs::write(&input, &body).expect("write");
    // No merger listens here yet: the events stay queued in the state directory.
    let nobody = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let dead = nobody.local_addr().expect("addr").to_string();
    drop(nobody);
    let zeros = "00".repeat(32);
    let (ok, _, _) = run_cli(&[
        "send",
        "--endpoint",
        &dead,
        "--cert-sha256",
        &zeros,
        "--timeout-secs",
        "2",
        "--state-dir",
        &state_s,
        "--input",
        input.to_str().expect("utf8"),
    ]);
    assert!(!ok, "nothing can be acked without a merger");
    let queued = std::fs::read_dir(state.join("outbox"))
        .expect("outbox")
        .count();
    assert!(queued >= 1, "batches kept on disk");
    // The merger comes up; a rerun with no new input resends the outbox under the same ids.
    let m = Merger::start(&dir.0.join("merger"), &[]);
    let empty = dir.0.join("empty.ndjson");
    std::fs::write(&empty, "").expect("write");
    for _ in 0..2 {
        let (ok, out, err) = send(
            &m.quic.to_string(),
            &m.cert,
            &[
                "--state-dir",
                &state_s,
                "--input",
                empty.to_str().expect("utf8"),
            ],
        );
        assert!(ok, "{out}\n{err}");
    }
    assert_eq!(
        std::fs::read_dir(state.join("outbox"))
            .expect("outbox")
            .count(),
        0
    );
    let (_, v) = m.get(&format!(
        "/v1/aggregate?category=c&start={}&end={}",
        now - 60_000,
        now + 1000
    ));
    let want_sum: i64 = (0..500).map(|i| i % 5).sum();
    assert_eq!(
        (v["count"].as_u64(), v["sum_exact"].as_str()),
        (Some(500), Some(want_sum.to_string().as_str())),
        "{v}"
    );
}

/// A wrong certificate hash and a dead endpoint each end the run within seconds, naming the
/// cause (not "not acknowledged within 60 s"); a merger that comes back later still gets
/// what the state directory kept.
#[test]
fn an_unreachable_merger_is_named_within_seconds() {
    let dir = TempDir::new("send-cause");
    let m = Merger::start(&dir.0, &[]);
    let input = dir.0.join("in.ndjson");
    std::fs::write(
        &input,
        format!(
            "{{\"ts_ms\":{},\"category\":\"c\",\"value\":2}}\n",
            now_ms()
        ),
    )
    .expect("write");
    let input = input.to_str().expect("utf8");
    let wrong = [7u8; 32];
    let t = std::time::Instant::now();
    let (ok, out, err) = send(&m.quic.to_string(), &wrong, &["--input", input]);
    assert!(!ok, "{out}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        t.elapsed()
    );
    let want = format!(
        "{}: its certificate (sha256 {}) is not the pinned one",
        m.quic,
        hex(&m.cert)
    );
    assert!(
        err.contains("no merger could be reached") && err.contains(&want),
        "{err}"
    );

    // Nothing listens on this port.
    let nobody = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let dead = nobody.local_addr().expect("addr").to_string();
    drop(nobody);
    let state = dir.0.join("producer");
    let t = std::time::Instant::now();
    let (ok, _, err) = send(
        &dead,
        &m.cert,
        &[
            "--input",
            input,
            "--state-dir",
            state.to_str().expect("utf8"),
        ],
    );
    assert!(!ok);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        t.elapsed()
    );
    assert!(
        err.contains(&format!("{dead}: no answer to the QUIC handshake"))
            && err.contains("kept in --state-dir"),
        "{err}"
    );
    // The kept batch reaches the merger on the next run (no new input).
    let empty = dir.0.join("empty.ndjson");
    std::fs::write(&empty, "").expect("write");
    let (ok, out, err) = send(
        &m.quic.to_string(),
        &m.cert,
        &[
            "--input",
            empty.to_str().expect("utf8"),
            "--state-dir",
            state.to_str().expect("utf8"),
        ],
    );
    assert!(ok, "{out}\n{err}");
    let now = now_ms();
    let (_, v) = m.get(&format!(
        "/v1/aggregate?category=c&start={}&end={}",
        now - 60_000,
        now + 1000
    ));
    assert_eq!(
        (v["count"].as_u64(), v["sum_exact"].as_str()),
        (Some(1), Some("2")),
        "{v}"
    );
}

/// A QUIC server that answers but refuses edgetally's ALPN: `send` says it refused the
/// connection (not "unreachable", not a certificate problem), within seconds.
#[test]
fn a_refusing_server_is_named_as_refusing() {
    let rt = crate::harness::runtime();
    let id = edgetally_net::Identity::self_signed(now_ms() / 1000, &[]).expect("identity");
    let hash = id.cert_hash();
    let cfg = edgetally_net::tls::server_config(&id, &[b"something-else"]).expect("config");
    let endpoint = rt
        .block_on(async { quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().expect("addr")) })
        .expect("endpoint");
    let addr = endpoint.local_addr().expect("addr");
    let server = endpoint.clone();
    rt.spawn(async move {
        while let Some(incoming) = server.accept().await {
            let _ = incoming.await;
        }
    });
    let dir = TempDir::new("send-refused");
    let input = dir.0.join("in.ndjson");
    std::fs::write(
        &input,
        format!("{{\"ts_ms\":{},\"category\":\"c\"}}\n", now_ms()),
    )
    .expect("write");
    let t = std::time::Instant::now();
    let (ok, _, err) = send(
        &addr.to_string(),
        &hash,
        &["--input", input.to_str().expect("utf8")],
    );
    assert!(!ok);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        t.elapsed()
    );
    assert!(
        err.contains(&format!("{addr}: it refused the connection")),
        "{err}"
    );
    endpoint.close(0u32.into(), b"done");
}

/// Counts `category` events in the last hour on merger `m` (0 when none).
fn count_of(m: &Merger, category: &str) -> u64 {
    let now = now_ms();
    let (_, v) = m.get(&format!(
        "/v1/aggregate?category={category}&start={}&end={}",
        now - 3_600_000,
        now + 60_000
    ));
    v["count"].as_u64().unwrap_or(0)
}

/// Waits up to `secs` for `category` to reach `want` on `m`; the count last seen.
fn wait_count(m: &Merger, category: &str, want: u64, secs: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let n = count_of(m, category);
        if n >= want || std::time::Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A `tail -f`-style stream: events written to `send`'s stdin, which stays open, arrive
/// within the flush interval (1 s) plus the network, not when the pipe closes (issue 28,
/// finding 5: 0 arrived until the end, then all in one batch). Lines end in LF, CRLF and a
/// lone CR, after a byte-order mark, as `POST /v1/events` takes them.
#[test]
fn a_stream_that_stays_open_is_delivered_as_it_is_written() {
    use std::io::Write as _;
    let dir = TempDir::new("send-live");
    let m = Merger::start(&dir.0, &[]);
    let mut child = std::process::Command::new(crate::harness::binary())
        .args([
            "send",
            "--endpoint",
            &m.quic.to_string(),
            "--cert-sha256",
            &hex(&m.cert),
            "--timeout-secs",
            "20",
        ])
        .env("EDGETALLY_LOG", "error")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start send");
    let mut stdin = child.stdin.take().expect("stdin");
    let ends = ["\n", "\r\n", "\r"];
    let mut first = b"\xef\xbb\xbf".to_vec();
    for i in 0..10 {
        first.extend_from_slice(
            format!(
                "{{\"ts_ms\":{},\"category\":\"live\",\"value\":{i}}}{}",
                now_ms(),
                ends[i % 3]
            )
            .as_bytes(),
        );
    }
    stdin.write_all(&first).expect("write");
    stdin.flush().expect("flush");
    // The pipe stays open: the events must arrive meanwhile.
    let seen = wait_count(&m, "live", 10, 10);
    assert_eq!(
        seen, 10,
        "events written to an open pipe were not delivered"
    );
    // More later, on the same open pipe, arrive too.
    stdin
        .write_all(format!("{{\"ts_ms\":{},\"category\":\"live\"}}\n", now_ms()).as_bytes())
        .expect("write");
    stdin.flush().expect("flush");
    assert_eq!(wait_count(&m, "live", 11, 10), 11);
    drop(stdin);
    let out = child.wait_with_output().expect("send exits");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("11 read, 11 recorded, 0 invalid"),
        "{stdout}"
    );
    assert_eq!(count_of(&m, "live"), 11, "nothing counted twice");
}

/// The native SDK: a producer that records once and makes no further call delivers within
/// the flush interval plus the network (SPEC §4 "Live").
#[test]
fn a_native_producer_that_records_once_and_goes_quiet_delivers() {
    let dir = TempDir::new("native-live");
    let m = Merger::start(&dir.0, &[]);
    let rt = crate::harness::runtime();
    let p = rt.block_on(async {
        let config = edgetally_proto::ProducerConfig {
            flush_interval_ms: 2000,
            ..Default::default()
        };
        let endpoints = vec![edgetally_net::Endpoint {
            addr: m.quic,
            cert: m.cert,
        }];
        let p = edgetally_net::NativeProducer::start(config, endpoints, None).expect("producer");
        for i in 0..200 {
            p.record("quiet", None, f64::from(i), None).expect("record");
        }
        p
    });
    // No flush, no further record: the driver alone must send it.
    assert_eq!(wait_count(&m, "quiet", 200, 10), 200);
    assert_eq!(p.stats().acked_records, 200);
    p.close();
}
