//! The CLI as a user runs it: `keygen` and `query` (table and `--json`) against a real node,
//! and `serve` refusing a configuration it cannot answer exactly under.

use crate::harness::{now_ms, run_cli, Merger, TempDir};

fn run(args: &[&str]) -> (bool, String, String) {
    run_cli(args)
}

#[test]
fn keygen_writes_a_key_once_and_prints_its_public_half() {
    let dir = TempDir::new("keygen");
    let path = dir.0.join("p.key");
    let p = path.to_str().expect("utf8");
    let (ok, out, err) = run(&["keygen", "--out", p]);
    assert!(ok, "{err}");
    let seed = std::fs::read_to_string(&path).expect("key file");
    let seed = edgetally_net::tls::parse_hash(seed.trim()).expect("64 hex digits");
    let public = edgetally_proto::Signer::from_seed(seed).producer().to_hex();
    assert_eq!(
        out.lines().next(),
        Some(format!("public key: {public}").as_str())
    );
    // Never overwrites a key.
    let (ok, _, err) = run(&["keygen", "--out", p]);
    assert!(!ok && err.contains("exists"), "{err}");
}

#[test]
fn query_prints_the_nodes_answers() {
    let dir = TempDir::new("cli");
    let m = Merger::start(&dir.0, &[]);
    let t = now_ms() - 5000;
    let body = format!("{{\"ts_ms\":{t},\"category\":\"cpu\",\"entity\":\"d1\",\"value\":2.5}}\n{{\"ts_ms\":{t},\"category\":\"cpu\",\"entity\":\"d2\",\"value\":0.5}}\n{{\"ts_ms\":{t},\"category\":\"cpu\",\"entity\":\"d2\",\"value\":1}}\n");
    let (st, v, _) = m.post("/v1/events", "application/x-ndjson", body.as_bytes());
    assert_eq!((st, v["accepted"].as_u64()), (200, Some(3)));
    let (start, end) = ((t - 60_000).to_string(), (t + 10_000).to_string());
    let node = m.http.as_str();
    let (ok, out, err) = run(&[
        "query",
        "--node",
        node,
        "--json",
        "aggregate",
        "--category",
        "cpu",
        "--start",
        &start,
        "--end",
        &end,
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (
            v["count"].as_u64(),
            v["sum_exact"].as_str(),
            v["max"].as_f64()
        ),
        (Some(3), Some("4"), Some(2.5))
    );
    let (ok, out, err) = run(&[
        "query",
        "--node",
        node,
        "topk",
        "--category",
        "cpu",
        "--start",
        &start,
        "--end",
        &end,
        "--k",
        "2",
    ]);
    assert!(ok, "{err}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        vec![
            vec!["d2", "2", "1.5", "0.75", "0.5", "1.0"],
            vec!["d1", "1", "2.5", "2.5", "2.5", "2.5"]
        ],
        "{out}"
    );
    for kind in [
        vec!["window", "--category", "cpu", "--width-ms", "60000"],
        vec![
            "totals",
            "--start",
            &start,
            "--end",
            &end,
            "--group-by",
            "entity",
        ],
        vec![
            "series",
            "--category",
            "cpu",
            "--start",
            &start,
            "--end",
            &end,
            "--step-ms",
            "60000",
        ],
    ] {
        let mut args = vec!["query", "--node", node];
        args.extend(kind.iter().copied());
        let (ok, out, err) = run(&args);
        let head = if kind[0] == "series" {
            "series of cpu by 60000 ms\n"
        } else {
            "window [20"
        };
        assert!(ok && out.starts_with(head), "{args:?}: {out} {err}");
    }
    // The same window written as RFC 3339 times, as a relative time, and with a node address
    // without its scheme: the same answer as epoch milliseconds.
    let rfc = |ms: i64| {
        let d = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .expect("time");
        d.format(&time::format_description::well_known::Rfc3339)
            .expect("format")
    };
    let bare = node.trim_start_matches("http://");
    let want = v.clone();
    let ago = format!("{}s", (now_ms() - (t - 60_000)) / 1000 + 1);
    for (n, s, e) in [
        (bare, rfc(t - 60_000), rfc(t + 10_000)),
        (node, format!("now-{ago}"), "now+10s".to_string()),
    ] {
        let (ok, out, err) = run(&[
            "query",
            "--node",
            n,
            "--json",
            "aggregate",
            "--category",
            "cpu",
            "--since",
            &s,
            "--until",
            &e,
        ]);
        assert!(ok, "{n} {s} {e}: {err}");
        let got: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(
            (&got["count"], &got["sum_exact"], &got["min"]),
            (&want["count"], &want["sum_exact"], &want["min"]),
            "{s} {e}"
        );
    }
    // Epoch seconds where milliseconds are expected: answered, with a warning saying so.
    let secs = (t / 1000).to_string();
    let (ok, _, err) = run(&[
        "query",
        "--node",
        node,
        "aggregate",
        "--category",
        "cpu",
        "--start",
        &secs,
    ]);
    assert!(ok && err.contains("is read as epoch milliseconds"), "{err}");
    // A reader that stops early (`| head`) ends the command quietly, not with a panic.
    let mut child = std::process::Command::new(crate::harness::binary())
        .args([
            "query",
            "--node",
            node,
            "series",
            "--category",
            "cpu",
            "--since",
            "2h",
            "--step",
            "1s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("query");
    let mut first = [0u8; 16];
    std::io::Read::read_exact(child.stdout.as_mut().expect("stdout"), &mut first).expect("read");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("panicked"),
        "{:?} {err}",
        out.status
    );
    // A time that is none of the forms names them.
    let (ok, _, err) = run(&[
        "query",
        "--node",
        node,
        "aggregate",
        "--category",
        "cpu",
        "--start",
        "yesterday",
    ]);
    assert!(!ok && err.contains("RFC 3339"), "{err}");
    // A bad request surfaces the node's error code, with a failing exit status.
    let (ok, _, err) = run(&[
        "query",
        "--node",
        node,
        "aggregate",
        "--category",
        "cpu",
        "--start",
        "5",
        "--end",
        "1",
    ]);
    assert!(!ok && err.contains("bad_window"), "{err}");
}

#[test]
fn serve_refuses_a_coarser_tier_kept_shorter_than_a_finer_one() {
    // Queries read a long range from the coarsest tier: an hour tier cut before the seconds
    // tier would answer "covered" windows without data the node still holds.
    let dir = TempDir::new("retention-order");
    let config = dir.0.join("edgetally.toml");
    std::fs::write(&config, "retention_hours_tier_ms = 60000\n").expect("config");
    let data = dir.0.join("data");
    // Spawned, not run to completion: a node that wrongly starts is killed after 20 s.
    let mut child = std::process::Command::new(crate::harness::binary())
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .args(["--http-addr", "127.0.0.1:0", "--quic-addr", "127.0.0.1:0"])
        .env("EDGETALLY_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    let ok = status.is_none_or(|s| s.success());
    assert!(
        !ok,
        "serve started with hours kept 1 min and minutes 90 days"
    );
    assert!(
        err.contains(
            "retention_hours_tier_ms (60000 ms) is shorter than retention_minutes_tier_ms"
        ),
        "{err}"
    );
    assert!(!data.exists(), "nothing is written before the check");
}
