//! The README's run command must keep working: `edgetally demo` starts a merger on the
//! default addresses, feeds it, and exits 0 only if every answer matches its expectation.

use crate::harness::binary;

#[test]
fn the_demo_runs_and_every_answer_matches() {
    let out = std::process::Command::new(binary())
        .arg("demo")
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all answers match"), "{stdout}");
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
