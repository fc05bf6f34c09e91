//! Prometheus remote read, with a real Prometheus server (Debian's package) started here and
//! configured with `remote_read` against a real node: PromQL range queries over
//! `edgetally_count`/`_sum`/`_min`/`_max` equal the node's own `/v1/series`.

use crate::harness::{agent, now_ms, tool_present, Merger, TempDir};
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's Prometheus, if installed (see [`tool_present`]).
fn prometheus_binary() -> Option<&'static str> {
    let bin = "/usr/bin/prometheus";
    tool_present(Path::new(bin).exists(), "prometheus", "remote read").then_some(bin)
}

struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(bin: &str, dir: &Path, read_url: &str) -> Prometheus {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1h\nremote_read:\n  - url: {read_url}\n    read_recent: true\n"),
    )
    .expect("config");
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log"))
        .spawn()
        .expect("start prometheus");
    let p = Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let until = Instant::now() + Duration::from_secs(60);
    while agent()
        .get(&format!("{}/-/ready", p.url))
        .call()
        .map_or(true, |r| r.status().as_u16() != 200)
    {
        assert!(
            Instant::now() < until,
            "prometheus not ready: {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    p
}

/// A PromQL range query: the series' label sets and their (time s, value) points.
fn query_range(
    p: &Prometheus,
    q: &str,
    start_s: i64,
    end_s: i64,
    step_s: i64,
) -> Vec<(Value, Vec<(i64, f64)>)> {
    let mut res = agent()
        .get(&format!("{}/api/v1/query_range", p.url))
        .query("query", q)
        .query("start", start_s.to_string())
        .query("end", end_s.to_string())
        .query("step", step_s.to_string())
        .call()
        .expect("query_range");
    let v: Value =
        serde_json::from_str(&res.body_mut().read_to_string().expect("body")).expect("json");
    assert_eq!(v["status"], "success", "{q}: {v}");
    v["data"]["result"]
        .as_array()
        .expect("result")
        .iter()
        .map(|s| {
            let points = s["values"]
                .as_array()
                .expect("values")
                .iter()
                .map(|p| {
                    (
                        p[0].as_f64().expect("time") as i64,
                        p[1].as_str().expect("value").parse().expect("number"),
                    )
                })
                .collect();
            (s["metric"].clone(), points)
        })
        .collect()
}

#[test]
fn promql_over_remote_read_equals_the_series_api() {
    let Some(bin) = prometheus_binary() else {
        return;
    };
    let dir = TempDir::new("prometheus");
    let m = Merger::start(&dir.0.join("node"), &[]);
    // Events over the last four minutes, with gaps: several entities, values with fractions.
    let now = now_ms();
    let step_s = 10;
    let start_s = (now / 1000 - 240) / step_s * step_s;
    let end_s = start_s + 200;
    let mut events = Vec::new();
    for i in 0..400i64 {
        let ts = start_s * 1000 + (i * 613) % 200_000;
        if (ts / 10_000) % 4 == 3 {
            continue; // every fourth step is empty
        }
        events.push(format!(
            r#"{{"ts_ms":{ts},"category":"cpu","entity":"d{}","value":{}}}"#,
            i % 3,
            (i % 17) as f64 * 0.25 - 1.0
        ));
        if i % 5 == 0 {
            events.push(format!(r#"{{"ts_ms":{ts},"category":"other","value":1}}"#));
        }
    }
    let (st, v, _) = m.post(
        "/v1/events",
        "application/json",
        format!("[{}]", events.join(",")).as_bytes(),
    );
    assert_eq!(st, 200, "{v}");
    let p = start_prometheus(bin, &dir.0, &format!("{}/api/v1/read", m.http));

    // The node's own answer for the same steps.
    let (_, series) = m.get(&format!(
        "/v1/series?category=cpu&start={}&end={}&step_ms={}",
        start_s * 1000,
        end_s * 1000 + 1,
        step_s * 1000
    ));
    let points = series["points"].as_array().expect("points");
    assert_eq!(points.len() as i64, (end_s - start_s) / step_s + 1);
    let want = |field: &str| -> Vec<(i64, f64)> {
        points
            .iter()
            .filter(|pt| !pt[field].is_null())
            .map(|pt| {
                (
                    pt["time_window_start"].as_i64().expect("start") / 1000,
                    pt[field].as_f64().expect("number"),
                )
            })
            .collect()
    };
    for (metric, field) in [
        ("edgetally_count", "count"),
        ("edgetally_sum", "sum"),
        ("edgetally_min", "min"),
        ("edgetally_max", "max"),
    ] {
        let got = query_range(
            &p,
            &format!("{metric}{{category=\"cpu\"}}"),
            start_s,
            end_s,
            step_s,
        );
        assert_eq!(
            got.len(),
            1,
            "{metric}: one series, the category's total: {got:?}"
        );
        assert_eq!(
            got[0].0,
            serde_json::json!({"__name__": metric, "category": "cpu"}),
        );
        assert_eq!(got[0].1, want(field), "{metric}");
    }
    // Empty steps exist, and min/max leave them out (not the previous step's value).
    assert!(want("min").len() < want("count").len());
    assert!(want("count").iter().any(|(_, c)| *c == 0.0));

    // Per-entity series add up to the total; `other` has no entities.
    let per = query_range(
        &p,
        r#"sum(edgetally_count{category="cpu",entity=~".+"})"#,
        start_s,
        end_s,
        step_s,
    );
    assert_eq!(per.len(), 1);
    assert_eq!(per[0].1, want("count"));
    let entities = query_range(
        &p,
        r#"edgetally_count{entity=~"d.*"}"#,
        start_s,
        end_s,
        step_s,
    );
    let names: Vec<&str> = entities
        .iter()
        .map(|(l, _)| l["entity"].as_str().expect("entity"))
        .collect();
    assert_eq!(names, ["d0", "d1", "d2"]);
    // A regex over categories and names; PromQL functions run over the samples.
    let cats = query_range(
        &p,
        r#"count by (category) ({__name__=~"edgetally_(count|sum)"})"#,
        start_s,
        end_s,
        step_s,
    );
    assert_eq!(cats.len(), 2, "{cats:?}");
    let total = query_range(
        &p,
        &format!(
            "sum_over_time(edgetally_count{{category=\"cpu\"}}[{}s])",
            end_s - start_s + step_s
        ),
        end_s,
        end_s,
        step_s,
    );
    let sum: f64 = want("count").iter().map(|(_, c)| c).sum();
    assert_eq!(total[0].1, [(end_s, sum)]);
    assert!(m.metric("edgetally_http_requests_total") > 0.0);
}

/// `edgetally_distinct` and `edgetally_quantile{quantile=…}` over remote read equal the
/// distinct and quantile parts of the node's own `/v1/series` (per minute: sketches are
/// kept per minute).
#[test]
fn distinct_and_quantiles_over_remote_read_equal_the_series_api() {
    let Some(bin) = prometheus_binary() else {
        return;
    };
    let dir = TempDir::new("prometheus-sketches");
    let m = Merger::start_with_env(
        &dir.0.join("node"),
        &[],
        &[("EDGETALLY_QUANTILE_CATEGORIES", "latency")],
    );
    let now = now_ms();
    let start_s = (now / 1000 - 300) / 60 * 60;
    let end_s = start_s + 240;
    let mut events = Vec::new();
    for i in 0..800i64 {
        let ts = start_s * 1000 + (i * 613) % 240_000;
        events.push(format!(
            r#"{{"ts_ms":{ts},"category":"latency","value":{},"subject":"u{}"}}"#,
            1 + (i * 37) % 400,
            (i * 7) % (50 + 40 * (ts / 60_000 % 4))
        ));
    }
    let (st, v, _) = m.post(
        "/v1/events",
        "application/json",
        format!("[{}]", events.join(",")).as_bytes(),
    );
    assert_eq!(st, 200, "{v}");
    let p = start_prometheus(bin, &dir.0, &format!("{}/api/v1/read", m.http));
    let (_, series) = m.get(&format!(
        "/v1/series?category=latency&start={}&end={}&step_ms=60000&quantiles=0.5,0.99",
        start_s * 1000,
        end_s * 1000 + 1
    ));
    let points = series["points"].as_array().expect("points");
    let want = |f: &dyn Fn(&Value) -> Option<f64>| -> Vec<(i64, f64)> {
        points
            .iter()
            .filter_map(|pt| Some((pt["time_window_start"].as_i64()? / 1000, f(pt)?)))
            .collect()
    };
    let close = |a: &[(i64, f64)], b: &[(i64, f64)]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.0 == y.0 && x.1.to_bits().abs_diff(y.1.to_bits()) <= 1)
    };
    let distinct = query_range(
        &p,
        r#"edgetally_distinct{category="latency"}"#,
        start_s,
        end_s,
        60,
    );
    assert_eq!(distinct.len(), 1, "{distinct:?}");
    let want_d = want(&|pt| pt["distinct"]["estimate"].as_f64());
    assert_eq!(want_d.len(), 4, "four minutes with subjects");
    assert!(
        close(&distinct[0].1, &want_d),
        "{:?} vs {want_d:?}",
        distinct[0].1
    );
    for (i, q) in ["0.5", "0.99"].into_iter().enumerate() {
        let got = query_range(
            &p,
            &format!(r#"edgetally_quantile{{category="latency",quantile="{q}"}}"#),
            start_s,
            end_s,
            60,
        );
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0["quantile"], q);
        let want_q = want(&|pt| pt["quantiles"]["values"][i]["value"].as_f64());
        assert!(
            close(&got[0].1, &want_q),
            "p{q}: {:?} vs {want_q:?}",
            got[0].1
        );
    }
    // All three quantile series, and none for a quantile not kept.
    let all = query_range(
        &p,
        r#"edgetally_quantile{category="latency"}"#,
        start_s,
        end_s,
        60,
    );
    assert_eq!(all.len(), 3);
    let none = query_range(
        &p,
        r#"edgetally_quantile{quantile="0.75"}"#,
        start_s,
        end_s,
        60,
    );
    assert!(none.is_empty(), "{none:?}");
    // The totals' series do not carry a quantile label.
    let counts = query_range(&p, r#"edgetally_count{quantile="0.5"}"#, start_s, end_s, 60);
    assert!(counts.is_empty(), "{counts:?}");
}
