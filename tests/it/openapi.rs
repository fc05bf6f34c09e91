//! `docs/openapi.yaml` lists exactly the endpoints the node serves, and each one answers.

use crate::harness::{Merger, TempDir};

fn documented_paths() -> Vec<String> {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.yaml"),
    )
    .expect("openapi.yaml");
    let mut in_paths = false;
    let mut out = Vec::new();
    for line in doc.lines() {
        if line == "paths:" {
            in_paths = true;
        } else if !line.starts_with(' ') && !line.is_empty() {
            in_paths = false;
        } else if in_paths
            && line.starts_with("  /")
            && line.ends_with(':')
            && !line.starts_with("   ")
        {
            out.push(line.trim().trim_end_matches(':').to_string());
        }
    }
    out
}

#[test]
fn openapi_paths_are_the_served_ones() {
    let paths = documented_paths();
    let want = [
        "/v1/aggregate",
        "/v1/window",
        "/v1/topk",
        "/v1/totals",
        "/v1/series",
        "/v1/events",
        "/v1/batches",
        "/v1/webtransport",
        "/v1/topology",
        "/v1/status",
        "/api/v1/read",
        "/healthz",
        "/readyz",
        "/metrics",
    ];
    assert_eq!(paths, want);
    let dir = TempDir::new("openapi");
    let m = Merger::start(&dir.0, &[]);
    for p in paths {
        let (status, body) = m.get(&p);
        // Served: never the fallback (POST-only routes answer GET with 405; `/v1/topology`
        // answers 404 `no_topology` on a node outside a shard-group cluster).
        assert_ne!(
            body["error"].as_str(),
            Some("not_found"),
            "{p}: {status} {body}"
        );
        assert!(status != 404 || p == "/v1/topology", "{p}: {body}");
    }
}
