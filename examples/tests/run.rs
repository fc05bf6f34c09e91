//! Runs every example and checks what it prints.

#[test]
fn seal_and_merge_prints_the_expected_totals() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_seal-and-merge"))
        .output()
        .expect("run example");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 2 producers × 3 batches × 10 records; values 20.0 + 0.5·i for i in 0..10, each batch.
    let sum: f64 = 6.0 * (0..10).map(|i| 20.0 + 0.5 * i as f64).sum::<f64>();
    let expect =
        format!("count=60 sum={sum} min=20 max=24.5 window=[1699999940000, 1700000001000)\n");
    assert_eq!(String::from_utf8_lossy(&out.stdout), expect);
}
