//! `edgetally-bench demo` (`cargo xtask demo`): starts a merger on the embedded default addresses (with a fresh data
//! directory, so the expectations below are exact), feeds it a few thousand events of two
//! shapes — an IoT metric stream through the native SDK over QUIC, user activity through the
//! wasm SDK in Node.js (when given its script) and over `POST /v1/events` — including late,
//! out-of-order and invalid ones, then prints each query
//! kind's answer next to an expectation computed here independently, and stops the merger.

use anyhow::{bail, Result};
use edgetally_bench::launcher as child;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// One event; values are whole hundredths (`cents`), so expected sums are exact integers.
struct Ev {
    ts: i64,
    category: &'static str,
    entity: String,
    cents: i64,
}

/// Deterministic generator (SplitMix64) so every run feeds the same shapes.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default, Clone, Copy)]
struct Exp {
    count: u64,
    cents: i128,
    min: i64,
    max: i64,
}

impl Exp {
    fn add(&mut self, c: i64) {
        if self.count == 0 {
            self.min = c;
            self.max = c;
        }
        self.count += 1;
        self.cents += c as i128;
        self.min = self.min.min(c);
        self.max = self.max.max(c);
    }
    fn sum_text(&self) -> String {
        let neg = self.cents < 0;
        let a = self.cents.unsigned_abs();
        let frac = format!("{:02}", a % 100);
        let frac = frac.trim_end_matches('0');
        format!(
            "{}{}{}{}",
            if neg { "-" } else { "" },
            a / 100,
            if frac.is_empty() { "" } else { "." },
            frac
        )
    }
}

use edgetally_net::now_ms;

pub fn run(cluster: bool, groups: usize, node_script: Option<&std::path::Path>) -> Result<()> {
    if cluster {
        return crate::cluster_demo::run(groups);
    }
    let dir = std::env::temp_dir().join(format!("edgetally-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "starting `edgetally serve` on the default addresses (data in {})",
        dir.display()
    );
    let merger = child::Merger::start(
        &["--data-dir".into(), dir.clone().into_os_string()],
        Some("  merger> "),
    )?;
    let result = feed_and_check(&merger.http, merger.quic, merger.cert, node_script);
    merger.stop();
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(true) => {
            println!("\nall answers match; merger stopped");
            Ok(())
        }
        Ok(false) => bail!("some answers differ from the expectation"),
        Err(e) => Err(e),
    }
}

/// One event as the NDJSON line `POST /v1/events` and examples/node/ingest.mjs read.
fn ndjson(e: &Ev) -> String {
    format!(
        "{{\"ts_ms\":{},\"category\":\"{}\",\"entity\":\"{}\",\"value\":{}}}\n",
        e.ts,
        e.category,
        e.entity,
        e.cents as f64 / 100.0
    )
}

/// Records `events` with the wasm SDK in Node (the script prints its producer's stats).
fn through_node(script: &std::path::Path, http: &str, events: &[&Ev]) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("node")
        .arg(script)
        .arg(http)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting node {}: {e}", script.display()))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("node stdin"))?;
    let body: String = events.iter().map(|e| ndjson(e)).collect();
    stdin.write_all(body.as_bytes())?;
    drop(stdin);
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{} failed: {}", script.display(), out.status);
    }
    let stats: Value = serde_json::from_slice(&out.stdout)?;
    println!(
        "recorded {} user events through the wasm SDK in Node.js ({}): {} batches over HTTP, {} events acknowledged",
        events.len(),
        stats["runtime"].as_str().unwrap_or("node"),
        stats["acked"],
        stats["ackedRecords"]
    );
    if stats["ackedRecords"].as_u64() != Some(events.len() as u64) {
        bail!("the Node.js producer did not get every event acknowledged: {stats}");
    }
    Ok(())
}

fn feed_and_check(
    http: &str,
    quic: std::net::SocketAddr,
    cert: [u8; 32],
    node_script: Option<&std::path::Path>,
) -> Result<bool> {
    let now = now_ms();
    let mut rng = Rng(2024);
    // IoT: 20 devices, temperature and humidity, one reading every ~5 s over the last 30 min,
    // some of them delivered late (up to 20 min behind) and shuffled.
    let mut iot: Vec<Ev> = Vec::new();
    for d in 0..20 {
        for i in 0..180 {
            let ts = now - 1_800_000 + i * 10_000 + rng.below(5000) as i64;
            iot.push(Ev {
                ts,
                category: "temperature",
                entity: format!("device-{d:02}"),
                cents: 1800 + rng.below(900) as i64,
            });
            iot.push(Ev {
                ts,
                category: "humidity",
                entity: format!("device-{d:02}"),
                cents: 3000 + rng.below(4000) as i64,
            });
        }
    }
    for i in (0..iot.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        iot.swap(i, j);
    }
    // User activity: page views, clicks (value 1) and purchases (amounts), over the last hour.
    let mut users: Vec<Ev> = Vec::new();
    for _ in 0..1500 {
        let u = format!("user-{}", rng.below(50));
        let ts = now - rng.below(3_600_000) as i64;
        let (category, cents) = match rng.below(10) {
            0 => ("purchase", 100 + rng.below(20000) as i64),
            1..=3 => ("click", 100),
            _ => ("page_view", 100),
        };
        users.push(Ev {
            ts,
            category,
            entity: u,
            cents,
        });
    }

    // IoT over QUIC through the native SDK: three gateway producers, each recording its share
    // of the readings (aggregated per device and second, sealed, signed, sent, acked).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (batches, acked) = rt.block_on(async {
        let endpoint = edgetally_net::Endpoint { addr: quic, cert };
        let gateways: Vec<_> = (0..3)
            .map(|_| {
                edgetally_net::NativeProducer::start(
                    edgetally_proto::ProducerConfig::default(),
                    vec![endpoint.clone()],
                    None,
                )
            })
            .collect::<Result<_, _>>()?;
        for (i, e) in iot.iter().enumerate() {
            gateways[i % 3].record(
                e.category,
                Some(&e.entity),
                e.cents as f64 / 100.0,
                Some(e.ts),
            )?;
        }
        let (mut batches, mut acked) = (0, 0);
        for g in &gateways {
            if !g.flush(Duration::from_secs(30)).await {
                bail!("a gateway's batches were not acknowledged in 30 s");
            }
            let s = g.stats();
            if !s.rejected.is_empty() || s.dropped > 0 {
                bail!("unexpected producer stats: {s:?}");
            }
            batches += s.acked;
            acked += s.acked_records;
            g.close();
        }
        anyhow::Ok((batches, acked))
    })?;
    println!("sent {} IoT readings through the native SDK from 3 producers: {batches} signed batches over QUIC, {acked} readings acknowledged", iot.len());
    if acked != iot.len() as u64 {
        bail!("only {acked} of {} readings were acknowledged", iot.len());
    }

    // User activity: half through the wasm SDK in Node.js (when the demo has its script),
    // the rest over HTTP as NDJSON with a few invalid events mixed in.
    let (via_node, via_http): (Vec<&Ev>, Vec<&Ev>) = match node_script {
        Some(script) => {
            let (a, b): (Vec<_>, Vec<_>) = users.iter().enumerate().partition(|(i, _)| i % 2 == 0);
            let a: Vec<&Ev> = a.into_iter().map(|(_, e)| e).collect();
            through_node(script, http, &a)?;
            (a, b.into_iter().map(|(_, e)| e).collect())
        }
        None => {
            println!("(no --node-script: all user events go over HTTP; `cargo xtask demo` runs the wasm SDK too)");
            (Vec::new(), users.iter().collect())
        }
    };
    debug_assert_eq!(via_node.len() + via_http.len(), users.len());
    let mut body: String = via_http.iter().map(|e| ndjson(e)).collect();
    body.push_str(&format!("{{\"ts_ms\":{now},\"category\":\"\"}}\n"));
    body.push_str(&format!(
        "{{\"ts_ms\":{now},\"category\":\"click\",\"value\":\"abc\"}}\n"
    ));
    body.push_str(&format!(
        "{{\"ts_ms\":{},\"category\":\"click\"}}\n",
        now + 3_600_000
    ));
    body.push_str("{not json}\n");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let text = agent
        .post(&format!("{http}/v1/events"))
        .header("content-type", "application/x-ndjson")
        .send(body.as_bytes())?
        .body_mut()
        .read_to_string()?;
    let v: Value = serde_json::from_str(&text)?;
    println!(
        "posted {} user events + 4 invalid ones as NDJSON: accepted {}, rejected {}:",
        via_http.len(),
        v["accepted"],
        v["rejected"].as_array().map_or(0, Vec::len)
    );
    for r in v["rejected"].as_array().into_iter().flatten() {
        println!(
            "    event #{}: {} ({})",
            r["index"],
            r["error"].as_str().unwrap_or(""),
            r["message"].as_str().unwrap_or("")
        );
    }
    let mut ok = v["accepted"].as_u64() == Some(via_http.len() as u64)
        && v["rejected"].as_array().map_or(0, Vec::len) == 4;

    let get = |path: String| child::get_json(http, &path);
    let all: Vec<&Ev> = iot.iter().chain(&users).collect();
    let exp = |f: &dyn Fn(&Ev) -> bool| {
        let mut x = Exp::default();
        all.iter().filter(|e| f(e)).for_each(|e| x.add(e.cents));
        x
    };
    let mut check = |label: String, got: &Value, want: Exp| {
        let g = (
            got["count"].as_u64().unwrap_or(0),
            got["sum_exact"].as_str().unwrap_or("").to_string(),
        );
        let w = (want.count, want.sum_text());
        let minmax_ok = want.count == 0
            || (got["min"].as_f64() == Some(want.min as f64 / 100.0)
                && got["max"].as_f64() == Some(want.max as f64 / 100.0));
        let good = g == w && minmax_ok;
        ok &= good;
        println!(
            "  {:<46} count {:>6} sum {:>12}   expected count {:>6} sum {:>12}   {}",
            label,
            g.0,
            g.1,
            w.0,
            w.1,
            if good { "ok" } else { "MISMATCH" }
        );
    };
    let (start, end) = (now - 2 * 3_600_000, now + 1000);
    let (s_al, e_al) = (
        (start + 999).div_euclid(1000) * 1000,
        (end + 999).div_euclid(1000) * 1000,
    );
    let in_w = |e: &Ev| e.ts >= s_al && e.ts < e_al;
    println!("\nqueries (window [{start}, {end}) ms):");
    for c in ["temperature", "humidity", "page_view", "click", "purchase"] {
        let v = get(format!(
            "/v1/aggregate?category={c}&start={start}&end={end}"
        ))?;
        check(
            format!("aggregate {c}"),
            &v,
            exp(&|e| e.category == c && in_w(e)),
        );
    }
    let v = get(format!(
        "/v1/aggregate?category=temperature&entity=device-07&start={start}&end={end}"
    ))?;
    check(
        "aggregate temperature, entity device-07".into(),
        &v,
        exp(&|e| e.category == "temperature" && e.entity == "device-07" && in_w(e)),
    );
    let v = get("/v1/window?category=temperature&width_ms=600000".to_string())?;
    let (ws, we) = (
        v["time_window_start"].as_i64().unwrap_or(0),
        v["time_window_end"].as_i64().unwrap_or(0),
    );
    check(
        "window temperature, last 10 minutes".into(),
        &v,
        exp(&|e| e.category == "temperature" && e.ts >= ws && e.ts < we),
    );
    let v = get(format!(
        "/v1/topk?category=purchase&start={start}&end={end}&k=3"
    ))?;
    let mut per_user: BTreeMap<&str, u64> = BTreeMap::new();
    users
        .iter()
        .filter(|e| e.category == "purchase")
        .for_each(|e| *per_user.entry(&e.entity).or_default() += 1);
    let mut want: Vec<(u64, &str)> = per_user.iter().map(|(u, n)| (*n, *u)).collect();
    want.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    for (i, item) in v["items"].as_array().into_iter().flatten().enumerate() {
        let key = item["key"].as_str().unwrap_or("");
        let rank_ok = want.get(i).map(|w| w.1) == Some(key);
        let mut expected = exp(&|e| e.category == "purchase" && e.entity == key);
        if !rank_ok {
            expected.count = u64::MAX; // forces a mismatch line for a wrong ranking
        }
        check(
            format!(
                "topk purchase #{} ({key}; expected {})",
                i + 1,
                want.get(i).map_or("-", |w| w.1)
            ),
            item,
            expected,
        );
    }
    let v = get(format!(
        "/v1/totals?start={start}&end={end}&group_by=category"
    ))?;
    for g in v["groups"].as_array().into_iter().flatten() {
        let c = g["key"].as_str().unwrap_or("").to_string();
        check(
            format!("totals group {c}"),
            g,
            exp(&|e| e.category == c && in_w(e)),
        );
    }
    let h = 600_000;
    let (s0, s1) = (
        (now - 3_600_000).div_euclid(h) * h,
        (now + h).div_euclid(h) * h,
    );
    let v = get(format!(
        "/v1/series?category=click&start={s0}&end={s1}&step_ms={h}"
    ))?;
    for p in v["points"].as_array().into_iter().flatten() {
        let (a, b) = (
            p["time_window_start"].as_i64().unwrap_or(0),
            p["time_window_end"].as_i64().unwrap_or(0),
        );
        check(
            format!("series click [{a}, +10 min)"),
            p,
            exp(&|e| e.category == "click" && e.ts >= a && e.ts < b),
        );
    }
    Ok(ok)
}
