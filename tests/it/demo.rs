//! The README's run command must keep working: the demo (`edgetally-bench demo`, which
//! `cargo xtask demo` runs) starts a merger on the
//! default addresses, feeds it, and exits 0 only if every answer matches its expectation.

use crate::harness::{bench_binary, binary};

/// `edgetally-bench demo`, starting the `edgetally` binary under test.
fn demo() -> std::process::Command {
    let mut cmd = std::process::Command::new(bench_binary());
    cmd.env("EDGETALLY_BIN", binary()).arg("demo");
    cmd
}

fn the_demo_runs_and_every_answer_matches_inner() {
    // `cargo xtask test` builds the npm package first; then the demo also drives the wasm SDK
    // in Node.js, as `cargo xtask demo` does.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let script = root.join("examples/node/ingest.mjs");
    let built = root.join("web/dist/index.js").exists() && root.join("web/pkg").exists();
    let mut cmd = demo();
    if built {
        cmd.arg("--node-script").arg(&script);
    } else {
        eprintln!("web/ is not built: the demo runs without the wasm SDK (run `cargo xtask web`)");
    }
    let out = cmd.output().expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all answers match"), "{stdout}");
    if built {
        assert!(
            stdout.contains("through the wasm SDK in Node.js"),
            "{stdout}"
        );
    }
    assert!(!stdout.contains("MISMATCH"));
    assert!(
        stdout
            .lines()
            .filter(|l| l.trim_end().ends_with(" ok"))
            .count()
            >= 15,
        "{stdout}"
    );
}

/// The cluster demo uses the same default ports, so it runs after the single-node
/// demo in this one test rather than beside it.
#[test]
fn the_single_node_and_cluster_demos_run_one_after_the_other() {
    the_demo_runs_and_every_answer_matches_inner();
    let out = demo()
        .args(["--cluster"])
        .output()
        .expect("run demo --cluster");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cluster demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("converged"), "{stdout}");
    assert!(
        stdout.contains("all nodes agree with the expectation"),
        "{stdout}"
    );
    assert!(!stdout.contains("MISMATCH"));
    // Three nodes × two categories, each checked.
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.trim_end().ends_with(" ok"))
            .count(),
        6,
        "{stdout}"
    );
    // Producers that preferred the killed node failed over (retried elsewhere).
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("retries") && !l.contains(" 0 retries")),
        "{stdout}"
    );
    // The README's 2×2 cluster: two shard groups of two replicas, each node answering for the
    // whole cluster.
    let out = demo()
        .args(["--cluster", "--groups", "2"])
        .output()
        .expect("run demo --cluster --groups 2");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "2x2 cluster demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("MISMATCH"));
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.trim_end().ends_with(" ok"))
            .count(),
        8,
        "{stdout}"
    );
}
