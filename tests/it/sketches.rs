//! Distinct counts and percentiles through the real binary: `POST /v1/events` with subjects
//! and a quantile category, native producers with subjects, and every query surface
//! (aggregate, window, series, totals, top-k by distinct) against sketches built here from the
//! same records — the independent reference. Caps refuse with `sketch_limit`.

use crate::harness::{now_ms, runtime, Merger, TempDir};
use edgetally_core::sketches::{subject_hash, Hll, Quantiles};
use edgetally_tests::Rng;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

fn reference_hll<'a>(subjects: impl IntoIterator<Item = &'a String>) -> Hll {
    let mut h = Hll::new(14).expect("precision");
    for s in subjects {
        h.insert_hash(subject_hash(s, None));
    }
    h
}

fn ulp_close(a: Option<f64>, b: Option<f64>) -> bool {
    // serde_json's default float parsing may land one ulp off what the node wrote.
    match (a, b) {
        (Some(a), Some(b)) => a.to_bits().abs_diff(b.to_bits()) <= 1,
        (None, None) => true,
        _ => false,
    }
}

#[test]
// Long by design: one scenario walked through every query surface in turn, each against the
// reference built once.
fn events_with_subjects_answer_distinct_and_quantiles_everywhere() {
    let dir = TempDir::new("sketches-http");
    let m = Merger::start_with_env(&dir.0, &[], &[("EDGETALLY_QUANTILE_CATEGORIES", "latency")]);
    let mut rng = Rng::new(30);
    // One minute, well in the past of the node's clock and inside the lateness window.
    let minute = (now_ms() - 180_000).div_euclid(60_000) * 60_000;
    let mut subjects: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut latencies: Vec<f64> = Vec::new();
    let mut lines = String::new();
    for i in 0..3000 {
        let cat = if i % 3 == 0 { "latency" } else { "page" };
        let ent = ["home", "cart", "pay"][rng.below(3) as usize];
        let subject = format!("user-{}", rng.below(if ent == "home" { 900 } else { 300 }));
        // Heavy-tailed latencies with repeats and an outlier.
        let value = match rng.below(10) {
            0 => 1e12,
            1..=3 => 42.0,
            _ => (rng.below(1_000_000) as f64 / 1000.0).powi(2),
        };
        let v = if cat == "latency" { value } else { 1.0 };
        if cat == "latency" {
            latencies.push(v);
        }
        subjects
            .entry((cat.to_string(), ent.to_string()))
            .or_default()
            .push(subject.clone());
        lines.push_str(&format!(
            "{{\"ts_ms\":{},\"category\":\"{cat}\",\"entity\":\"{ent}\",\"value\":{v},\"subject\":\"{subject}\"}}\n",
            minute + rng.below(60_000) as i64
        ));
        if i % 500 == 499 {
            let (code, body, _) = m.post_events(None, &lines);
            assert_eq!(code, 200, "{body}");
            assert_eq!(body["accepted"], 500, "{body}");
            lines.clear();
        }
    }
    let (start, end) = (minute, minute + 60_000);
    let all = |cat: &str| -> Hll {
        reference_hll(
            subjects
                .iter()
                .filter(|((c, _), _)| c == cat)
                .flat_map(|(_, v)| v),
        )
    };
    let mut q = Quantiles::default();
    for v in &latencies {
        q.insert(*v, 1);
    }

    // Aggregate: the union over entities, with its standard error, and the quantiles.
    let (code, v) = m.get(&format!(
        "/v1/aggregate?category=latency&start={start}&end={end}&quantiles=0,0.5,0.9,0.99,1"
    ));
    assert_eq!(code, 200, "{v}");
    let h = all("latency");
    assert_eq!(
        v["distinct"]["estimate"].as_f64(),
        Some(h.estimate().round())
    );
    assert_eq!(v["distinct"]["precision"], 14);
    assert_eq!(
        v["distinct"]["relative_standard_error"].as_f64(),
        Some(h.standard_error())
    );
    let exact_subjects: std::collections::BTreeSet<&String> = subjects
        .iter()
        .filter(|((c, _), _)| c == "latency")
        .flat_map(|(_, v)| v)
        .collect();
    let err = (h.estimate() - exact_subjects.len() as f64).abs() / exact_subjects.len() as f64;
    assert!(err < 3.0 * h.standard_error(), "distinct off by {err}");
    assert_eq!(v["quantiles"]["count"], latencies.len());
    assert_eq!(v["quantiles"]["relative_accuracy"], 0.01);
    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    for (i, p) in [0.0, 0.5, 0.9, 0.99, 1.0].into_iter().enumerate() {
        let got = v["quantiles"]["values"][i]["value"].as_f64();
        assert!(ulp_close(got, q.quantile(p)), "p{p}: {got:?}");
        // Within 1 % of the exact quantile (rank ⌊p·(n−1)⌋).
        let exact = sorted[(p * (sorted.len() - 1) as f64).floor() as usize];
        let got = got.expect("value");
        assert!(
            (got - exact).abs() <= 0.01 * exact.abs() + 1e-12,
            "p{p}: {got} vs {exact}"
        );
    }
    // `page` keeps no quantiles here; asked anyway, the answer says so.
    let (_, v) = m.get(&format!(
        "/v1/aggregate?category=page&entity=cart&start={start}&end={end}&quantiles=0.5"
    ));
    assert!(v["quantiles"].is_null(), "{v}");
    let cart = reference_hll(&subjects[&("page".to_string(), "cart".to_string())]);
    assert_eq!(
        v["distinct"]["estimate"].as_f64(),
        Some(cart.estimate().round())
    );

    // Series: one distinct per step; the minute step holds everything.
    let (_, v) = m.get(&format!(
        "/v1/series?category=page&start={}&end={}&step_ms=60000",
        start - 60_000,
        end
    ));
    let pts = v["points"].as_array().expect("points");
    assert_eq!(pts.len(), 2);
    assert!(pts[0]["distinct"].is_null(), "{v}");
    assert_eq!(
        pts[1]["distinct"]["estimate"].as_f64(),
        Some(all("page").estimate().round())
    );

    // Totals by entity: each entity's subjects over both categories.
    let (_, v) = m.get(&format!(
        "/v1/totals?start={start}&end={end}&group_by=entity"
    ));
    for g in v["groups"].as_array().expect("groups") {
        let ent = g["key"].as_str().expect("entity");
        let h = reference_hll(
            subjects
                .iter()
                .filter(|((_, e), _)| e == ent)
                .flat_map(|(_, v)| v),
        );
        assert_eq!(
            g["distinct"]["estimate"].as_f64(),
            Some(h.estimate().round()),
            "{ent}"
        );
    }

    // Top-k by distinct: home (900 possible users) first.
    let (code, v) = m.get(&format!(
        "/v1/topk?category=page&start={start}&end={end}&rank=distinct&k=2"
    ));
    assert_eq!(code, 200, "{v}");
    let items = v["items"].as_array().expect("items");
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["key"], "home");
    let mut ranked: Vec<(String, f64)> = ["home", "cart", "pay"]
        .iter()
        .map(|e| {
            let h = reference_hll(&subjects[&("page".to_string(), e.to_string())]);
            (e.to_string(), h.estimate().round())
        })
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    assert_eq!(items[1]["key"], Value::String(ranked[1].0.clone()));
    let (code, v) = m.get(&format!(
        "/v1/topk?category=page&start={start}&end={end}&rank=distinct&by=producer"
    ));
    assert_eq!((code, v["error"].as_str()), (400, Some("bad_parameter")));

    // A subject of the wrong type is refused with its reason; its neighbours are kept.
    let (code, body, _) = m.post_events(
        None,
        &format!(
            "{{\"ts_ms\":{start},\"category\":\"page\",\"subject\":7}}\n{{\"ts_ms\":{start},\"category\":\"page\",\"subject\":\"\"}}\n{{\"ts_ms\":{start},\"category\":\"page\",\"subject\":\"ok\"}}\n"
        ),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["accepted"], 1, "{body}");
    assert_eq!(body["rejected"][0]["error"], "invalid_event", "{body}");
    assert_eq!(
        body["rejected"][0]["message"],
        "subject must be a string, not a number"
    );
    let (code, v) = m.get(&format!(
        "/v1/aggregate?category=page&start={start}&end={end}&quantiles=2"
    ));
    assert_eq!((code, v["error"].as_str()), (400, Some("bad_parameter")));
    assert!(m.terminate());
}

/// A producer whose sketches are finer than the node's cap for the category gets
/// `sketch_limit` (the batch is refused whole, never altered); one within the cap is applied.
#[test]
fn sketches_finer_than_the_cap_are_refused() {
    let dir = TempDir::new("sketches-cap");
    let m = Merger::start_with_env(
        &dir.0,
        &[],
        &[("EDGETALLY_SKETCH_MAX_PRECISION", "{ \"*\" = 12 }")],
    );
    let rt = runtime();
    let endpoints = vec![edgetally_net::Endpoint {
        addr: m.quic,
        cert: m.cert,
    }];
    let send = |precision: u8| {
        let config = edgetally_proto::ProducerConfig {
            distinct_precision: precision,
            backoff_base_ms: 20,
            ..Default::default()
        };
        let p = rt.block_on(async {
            edgetally_net::NativeProducer::start(config, endpoints.clone(), None).expect("producer")
        });
        p.record_subject("visits", None, 1.0, None, "user-1")
            .expect("valid");
        assert!(rt.block_on(p.flush(Duration::from_secs(20))));
        let stats = p.stats();
        p.close();
        stats
    };
    let fine = send(14);
    assert_eq!(
        fine.rejected.get(edgetally_core::RejectCode::SketchLimit),
        1,
        "{fine:?}"
    );
    let ok = send(12);
    assert!(ok.rejected.is_empty(), "{ok:?}");
    let (_, v) = m.get("/v1/window?category=visits&width_ms=600000");
    assert_eq!(v["count"], 1, "only the batch within the cap: {v}");
    assert_eq!(v["distinct"]["estimate"], 1.0);
    assert_eq!(v["distinct"]["precision"], 12);
    assert!(m.terminate());
}
