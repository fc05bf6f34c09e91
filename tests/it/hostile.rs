//! The merger against hostile clients, full disks and damaged files, through the real binary:
//! every run ends with a restart, and totals are checked against a model computed here.

use crate::harness::{binary, now_ms, run_cli, Merger, TempDir};
use edgetally_core::{BatchId, Summary};
use edgetally_proto::BatchBuilder;
use edgetally_tests::{signer, Rng};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Per category: (count, exact sum in nano-units), saturating counts like the merger.
type Totals = BTreeMap<String, (u64, i128)>;

/// One generated batch: its bytes, its id, what it adds per category, and the verdict the
/// protocol's rules give it (None: accepted; Some(code): refused with that reason).
struct Hostile {
    raw: Vec<u8>,
    id: BatchId,
    adds: Totals,
    verdict: Option<&'static str>,
}

const LIMIT_SUMMARIES: usize = 50;
const LIMIT_CATEGORIES: usize = 5;

/// A seeded mix of valid, invalid and extreme batches: `seq`/`epoch` at their extremes,
/// summary and category counts at each limit −1/0/+1, maximal counts and values.
fn hostile_batches(seed: u64, base: i64) -> Vec<Hostile> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for i in 0..48u64 {
        let s = signer(10_000 + seed * 100 + i);
        let epoch = [0, 1, u64::MAX - 1, u64::MAX][rng.below(4) as usize];
        let kind = rng.below(8);
        let seq = match kind {
            0 => u64::MAX,
            _ => [0, 1, 2, u64::MAX - 1, i][rng.below(5) as usize],
        };
        let (summaries, categories) = match kind {
            1 => (LIMIT_SUMMARIES + 1, 1),
            2 => (LIMIT_SUMMARIES, 2),
            3 => (LIMIT_SUMMARIES - 1, 1),
            4 => (LIMIT_CATEGORIES + 1, LIMIT_CATEGORIES + 1),
            5 => (LIMIT_CATEGORIES, LIMIT_CATEGORIES),
            _ => (1 + rng.below(10) as usize, 1 + rng.below(3) as usize),
        };
        let mut b = BatchBuilder::new(1000).expect("width");
        let mut adds = Totals::new();
        for k in 0..summaries {
            let cat = format!("h{seed}-c{}", k % categories);
            let (value, nanos) = match rng.below(4) {
                0 => (1e15, 1_000_000_000_000_000_000_000_000i128),
                1 => (-1e15, -1_000_000_000_000_000_000_000_000i128),
                2 => (0.125, 125_000_000),
                _ => {
                    let n = rng.below(1000);
                    (n as f64, n as i128 * 1_000_000_000)
                }
            };
            // Distinct buckets keep every summary its own key.
            let ts = base - 1000 * k as i64;
            b.record(&cat, None, ts, value).expect("record");
            let e = adds.entry(cat).or_insert((0, 0));
            e.0 += 1;
            e.1 += nanos;
        }
        let id = BatchId {
            producer: s.producer(),
            epoch,
            seq,
        };
        let mut batch = b.finish(id, base);
        if kind == 6 {
            // A maximal count: one summary claims 2⁶⁴−1 records of 0.
            let first = &mut batch.summaries[0];
            let cat = batch
                .strings
                .get(first.category as usize)
                .expect("cat")
                .to_string();
            let e = adds.get_mut(&cat).expect("cat");
            e.0 = (e.0 - first.summary.count).saturating_add(u64::MAX);
            e.1 -= first.summary.sum;
            first.summary = Summary {
                count: u64::MAX,
                sum: 0,
                min: 0.0,
                max: 0.0,
            };
        }
        let verdict = if summaries > LIMIT_SUMMARIES {
            Some("too_many_summaries")
        } else if seq == u64::MAX {
            Some("invalid_seq")
        } else if categories > LIMIT_CATEGORIES {
            Some("too_many_categories")
        } else {
            None
        };
        out.push(Hostile {
            raw: s.seal(&batch).expect("seal"),
            id,
            adds,
            verdict,
        });
    }
    out
}

fn add(into: &mut Totals, adds: &Totals) {
    for (k, (c, s)) in adds {
        let e = into.entry(k.clone()).or_insert((0, 0));
        e.0 = e.0.saturating_add(*c);
        e.1 += s;
    }
}

fn assert_totals(m: &Merger, want: &Totals, base: i64, what: &str) {
    for (cat, (count, sum)) in want {
        let (st, v) = m.get(&format!(
            "/v1/aggregate?category={cat}&start={}&end={}",
            base - 3_600_000,
            base + 1000
        ));
        assert_eq!(st, 200, "{what}: {v}");
        assert_eq!(v["count"].as_u64(), Some(*count), "{what}: {cat}: {v}");
        assert_eq!(
            v["sum_exact"].as_str(),
            Some(edgetally_tests::decimal(*sum).as_str()),
            "{what}: {cat}: {v}"
        );
    }
}

const LIMIT_ENV: [(&str, &str); 3] = [
    ("EDGETALLY_MAX_SUMMARIES", "50"),
    ("EDGETALLY_MAX_CATEGORIES", "5"),
    ("EDGETALLY_SNAPSHOT_INTERVAL_SECS", "3600"),
];

/// Every batch gets the verdict the rules give it, concurrent duplicates count once, and a
/// restart — `kill -9`, then graceful, with a peer configured so the log is kept — always
/// starts and keeps exactly what was acknowledged. (Once, a `seq = 2⁶⁴−1` batch was
/// written before apply refused it and every later start failed.)
#[test]
fn hostile_batches_never_brick_a_restart_and_totals_match_the_model() {
    for seed in [1u64, 2] {
        let dir = TempDir::new(&format!("hostile-{seed}"));
        // A configured (dead) peer: batches stay in the log for it, so every restart
        // replays them.
        let peer = ["--peer", "127.0.0.1:9"];
        let mut env = LIMIT_ENV.to_vec();
        env.push(("EDGETALLY_CLUSTER_SECRET", "hostile-test"));
        let m = Merger::start_with_env(&dir.0, &peer, &env);
        let base = now_ms() - 5_000;
        let batches = hostile_batches(seed, base);
        let mut want = Totals::new();
        for (i, b) in batches.iter().enumerate() {
            // Every third batch is sent twice at once.
            let copies = if i % 3 == 0 { 2 } else { 1 };
            let replies: Vec<(u16, serde_json::Value)> = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..copies)
                    .map(|_| {
                        sc.spawn(|| {
                            let (st, v, _) =
                                m.post("/v1/batches", "application/octet-stream", &b.raw);
                            (st, v)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().expect("post")).collect()
            });
            for (st, v) in &replies {
                match b.verdict {
                    None => assert_eq!(*st, 200, "seed {seed} batch {i} ({:?}): {v}", b.id),
                    Some(code) => assert_eq!(
                        (*st, v["error"].as_str()),
                        (422, Some(code)),
                        "seed {seed} batch {i}"
                    ),
                }
            }
            if b.verdict.is_none() {
                add(&mut want, &b.adds);
            }
        }
        assert_totals(&m, &want, base, &format!("seed {seed}, live"));
        m.kill9();
        let m = Merger::start_with_env(&dir.0, &peer, &env);
        assert_totals(&m, &want, base, &format!("seed {seed}, after kill -9"));
        assert!(m.terminate(), "seed {seed}: graceful stop");
        let m = Merger::start_with_env(&dir.0, &peer, &env);
        assert_totals(
            &m,
            &want,
            base,
            &format!("seed {seed}, after a graceful restart"),
        );
        let (_, status) = m.get("/v1/status");
        assert_eq!(status["batches_quarantined"], 0, "seed {seed}");
    }
}

/// A tmpfs of `size` mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mkdir");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount")
            .success();
        assert!(ok, "mounting a tmpfs needs root (CI runs as root)");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `dir` (returns the filler's path).
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0u8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    let small = [0u8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
    path
}

/// On a full disk, two copies of one batch sent at once get the same answer: an Ack for
/// either means the batch is durable. (Once, the copy that joined the original's group
/// was acknowledged while the original's write failed, and the batch was never stored.)
/// Once the disk has room again, everything acknowledged survives `kill -9` and the
/// producer's retries make the totals exact.
#[test]
fn on_a_full_disk_an_ack_for_a_duplicate_means_durable() {
    let tmp = TempDir::new("fulldisk");
    let mnt = tmp.0.join("mnt");
    let _fs = Tmpfs::mount(&mnt, "24m");
    let data = mnt.join("data");
    let m = Merger::start_with_env(&data, &[], &LIMIT_ENV);
    let base = now_ms() - 5_000;
    let batches: Vec<Hostile> = hostile_batches(7, base)
        .into_iter()
        .filter(|b| b.verdict.is_none())
        .collect();
    let filler = fill(&mnt);
    let mut acked = vec![false; batches.len()];
    for (i, b) in batches.iter().enumerate() {
        let replies: Vec<u16> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..2)
                .map(|_| sc.spawn(|| m.post("/v1/batches", "application/octet-stream", &b.raw).0))
                .collect();
            hs.into_iter().map(|h| h.join().expect("post")).collect()
        });
        assert!(
            replies.iter().all(|&s| s == 200 || s == 503),
            "batch {i}: {replies:?}"
        );
        assert!(
            replies[0] == replies[1],
            "batch {i}: the two copies were answered {replies:?}"
        );
        acked[i] = replies.contains(&200);
    }
    assert!(
        acked.iter().filter(|&&a| !a).count() > batches.len() / 2,
        "the disk was not full: {acked:?}"
    );
    // The node says it is not ready while its commits fail, and why.
    let (st, v) = m.get("/readyz");
    assert_eq!(
        (st, &v["ready"], &v["checks"]["store"]["ok"]),
        (503, &serde_json::json!(false), &serde_json::json!(false)),
        "{v}"
    );
    assert!(
        v["checks"]["store"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{v}"
    );
    let failures = m.metric("edgetally_commit_failures_total");
    assert!(failures >= 1.0, "{failures}");
    std::fs::remove_file(&filler).expect("free the disk");
    // With room again, the next commit succeeds and the node is ready again.
    let first_refused = acked.iter().position(|a| !a).expect("one was refused");
    let (st, v, _) = m.post(
        "/v1/batches",
        "application/octet-stream",
        &batches[first_refused].raw,
    );
    assert_eq!(st, 200, "{v}");
    acked[first_refused] = true;
    let (st, v) = m.get("/readyz");
    assert_eq!((st, &v["ready"]), (200, &serde_json::json!(true)), "{v}");
    let mut want = Totals::new();
    for (b, _) in batches.iter().zip(&acked).filter(|(_, &a)| a) {
        add(&mut want, &b.adds);
    }
    m.kill9();
    let m = Merger::start_with_env(&data, &[], &LIMIT_ENV);
    assert_totals(&m, &want, base, "acknowledged batches after kill -9");
    // The producer retries what was not acknowledged.
    let mut all = Totals::new();
    for b in &batches {
        let (st, v, _) = m.post("/v1/batches", "application/octet-stream", &b.raw);
        assert_eq!(st, 200, "{v}");
        add(&mut all, &b.adds);
    }
    assert_totals(&m, &all, base, "after retries");
    m.kill9();
}

/// Compactions on a full disk: the snapshot file cannot be written, so the old snapshot stays
/// named, no half-written file is left behind, queries stay exact, and once there is room a
/// compaction succeeds again; everything acknowledged survives `kill -9`.
#[test]
fn a_snapshot_that_cannot_be_written_on_a_full_disk_loses_nothing() {
    let tmp = TempDir::new("fullsnap");
    let mnt = tmp.0.join("mnt");
    let _fs = Tmpfs::mount(&mnt, "24m");
    let data = mnt.join("data");
    let env = [
        LIMIT_ENV[0],
        LIMIT_ENV[1],
        ("EDGETALLY_SNAPSHOT_INTERVAL_SECS", "1"),
    ];
    let m = Merger::start_with_env(&data, &[], &env);
    let base = now_ms() - 5_000;
    let batches: Vec<Hostile> = hostile_batches(9, base)
        .into_iter()
        .filter(|b| b.verdict.is_none())
        .collect();
    let (before, after) = batches.split_at(batches.len() / 2);
    let mut want = Totals::new();
    for b in before {
        let (st, v, _) = m.post("/v1/batches", "application/octet-stream", &b.raw);
        assert_eq!(st, 200, "{v}");
        add(&mut want, &b.adds);
    }
    let wait = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait("a first snapshot", &|| {
        m.metric("edgetally_snapshots_total") >= 1.0
    });
    let filler = fill(&mnt);
    let mut unacked = Vec::new();
    for b in after {
        match m.post("/v1/batches", "application/octet-stream", &b.raw).0 {
            200 => add(&mut want, &b.adds),
            503 => unacked.push(b),
            st => panic!("status {st}"),
        }
    }
    // Several compactions fail meanwhile (one a second).
    let snapshots = m.metric("edgetally_snapshots_total");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        m.metric("edgetally_snapshots_total"),
        snapshots,
        "a snapshot was written on a full disk"
    );
    let files: Vec<String> = std::fs::read_dir(&data)
        .expect("data dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("snapshot-"))
        .collect();
    assert!(
        files.iter().all(|n| n.ends_with(".etsn")) && !files.is_empty(),
        "half-written snapshot files left behind: {files:?}"
    );
    assert_totals(&m, &want, base, "on a full disk");
    std::fs::remove_file(&filler).expect("free the disk");
    wait("a snapshot once there is room", &|| {
        m.metric("edgetally_snapshots_total") > snapshots
    });
    m.kill9();
    let m = Merger::start_with_env(&data, &[], &env);
    assert_totals(&m, &want, base, "acknowledged batches after kill -9");
    for b in unacked {
        let (st, v, _) = m.post("/v1/batches", "application/octet-stream", &b.raw);
        assert_eq!(st, 200, "{v}");
        add(&mut want, &b.adds);
    }
    assert_totals(&m, &want, base, "after retries");
    m.kill9();
}

/// How a start ended: started (the merger), or refused with its stderr.
enum Start {
    Up(Merger),
    Refused(String),
}

fn try_start(dir: &Path) -> Start {
    let mut child = Command::new(binary())
        .arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .args(["--http-addr", "127.0.0.1:0", "--quic-addr", "127.0.0.1:0"])
        .envs(LIMIT_ENV)
        .env("EDGETALLY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = child.stdout.take().expect("stdout");
    let lines: Vec<String> = BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .take_while(|l| !l.starts_with("recovered-batches: "))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return Start::Refused(err);
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.iter().any(|l| l.starts_with("http: ")),
        "neither started nor refused: {lines:?}"
    );
    // It started: start it again under the harness, which keeps it.
    Start::Up(Merger::start_with_env(dir, &[], &LIMIT_ENV))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}

fn count(m: &Merger, cats: &[String], base: i64) -> u64 {
    cats.iter()
        .map(|c| {
            m.get(&format!(
                "/v1/aggregate?category={c}&start={}&end={}",
                base - 3_600_000,
                base + 1000
            ))
            .1["count"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum()
}

/// Damages every kind of file in a data directory at seeded offsets — a flipped bit, a
/// zeroed block, a truncation, a deleted file — and holds each outcome to the rule: the node
/// refuses to start with an error naming the damaged file (and `edgetally check` exits 1,
/// `--repair` salvages a directory that starts and never overcounts), or it starts and
/// counts every acknowledged batch, or it starts, counts less, and reports a torn tail.
#[test]
fn corruption_campaign_every_file_kind_is_refused_or_counted_or_reported() {
    let tmp = TempDir::new("corrupt");
    let pristine = tmp.0.join("pristine");
    let base = now_ms() - 5_000;
    let mut batches: Vec<Hostile> = (1..=3)
        .flat_map(|seed| hostile_batches(100 + seed, base))
        .filter(|b| b.verdict.is_none() && b.adds.values().all(|&(c, _)| c < 1 << 40))
        .collect();
    batches.dedup_by_key(|b| b.id);
    let third = batches.len() / 3;
    let mut sent = std::collections::BTreeSet::new();
    let mut send = |m: &Merger, part: &[Hostile]| {
        for b in part {
            let (st, v, _) = m.post("/v1/batches", "application/octet-stream", &b.raw);
            assert_eq!(st, 200, "{v}");
            sent.insert(b.id);
        }
    };
    // A snapshot (graceful stop), then two segments of log left by kill -9 — each after the
    // node had a second to record how far its log is durable.
    let settle = || std::thread::sleep(Duration::from_millis(1500));
    let m = Merger::start_with_env(&pristine, &[], &LIMIT_ENV);
    send(&m, &batches[..third]);
    assert!(m.terminate());
    let m = Merger::start_with_env(&pristine, &[], &LIMIT_ENV);
    send(&m, &batches[third..2 * third]);
    settle();
    m.kill9();
    let m = Merger::start_with_env(&pristine, &[], &LIMIT_ENV);
    send(&m, &batches[2 * third..]);
    settle();
    m.kill9();
    let mut truth = Totals::new();
    let mut seen = std::collections::BTreeSet::new();
    for b in &batches {
        if seen.insert(b.id) {
            add(&mut truth, &b.adds);
        }
    }
    let cats: Vec<String> = truth.keys().cloned().collect();
    let total: u64 = truth.values().map(|v| v.0).sum();
    let mut files = vec![PathBuf::from("edgetally.redb")];
    // The snapshot file redb names (the graceful stop above compacted), and one a `kill -9`
    // may have cut off before redb named it (damaging that one changes nothing).
    let snaps: Vec<PathBuf> = std::fs::read_dir(&pristine)
        .expect("data dir")
        .map(|e| PathBuf::from(e.expect("entry").file_name()))
        .filter(|p| p.extension().is_some_and(|x| x == "etsn"))
        .collect();
    assert!(!snaps.is_empty(), "no snapshot file");
    files.extend(snaps);
    let mut segs: Vec<PathBuf> = std::fs::read_dir(pristine.join("log"))
        .expect("log")
        .map(|e| PathBuf::from("log").join(e.expect("entry").file_name()))
        .filter(|p| std::fs::metadata(pristine.join(p)).is_ok_and(|m| m.len() > 0))
        .collect();
    segs.sort();
    assert!(segs.len() >= 2, "{segs:?}");
    files.extend(segs);
    let mut rng = Rng::new(42);
    let (mut refused, mut exact, mut reported) = (0, 0, 0);
    for (n, file) in files.iter().enumerate() {
        for op in ["flip", "zero", "truncate", "delete"] {
            let case = tmp.0.join(format!("case-{n}-{op}"));
            copy_dir(&pristine, &case);
            let path = case.join(file);
            let mut bytes = std::fs::read(&path).expect("read");
            let at = rng.below(bytes.len() as u64) as usize;
            match op {
                "flip" => bytes[at] ^= 1 << rng.below(8),
                "zero" => {
                    let start = at / 4096 * 4096;
                    let end = (start + 4096).min(bytes.len());
                    bytes[start..end].fill(0);
                }
                "truncate" => bytes.truncate(at),
                _ => {}
            }
            if op == "delete" {
                std::fs::remove_file(&path).expect("delete");
            } else {
                std::fs::write(&path, &bytes).expect("write");
            }
            let what = format!("{} {op} at {at}", file.display());
            let case_str = case.display().to_string();
            let (checked_ok, report, _) = run_cli(&["check", "--data-dir", &case_str]);
            match try_start(&case) {
                Start::Refused(err) => {
                    refused += 1;
                    let name = file
                        .file_name()
                        .expect("name")
                        .to_string_lossy()
                        .to_string();
                    assert!(
                        // A file gone or cut at a record boundary is named by what is missing.
                        err.contains(&name)
                            || err.contains("lacks groups")
                            || err.contains("were durable"),
                        "{what}: the refusal names no file: {err}"
                    );
                    assert!(
                        !checked_ok,
                        "{what}: check passed a directory the node refuses: {report}"
                    );
                    let out = tmp.0.join(format!("repaired-{n}-{op}"));
                    let out_str = out.display().to_string();
                    let (ok, text, e) =
                        run_cli(&["check", "--data-dir", &case_str, "--repair", &out_str]);
                    assert!(ok, "{what}: repair failed: {text} {e}");
                    let m = Merger::start_with_env(&out, &[], &LIMIT_ENV);
                    let c = count(&m, &cats, base);
                    assert!(
                        c <= total,
                        "{what}: repaired directory overcounts: {c} > {total}"
                    );
                    m.kill9();
                }
                Start::Up(m) => {
                    let c = count(&m, &cats, base);
                    assert!(c <= total, "{what}: overcounts {c} > {total}");
                    if c == total {
                        exact += 1;
                        assert_totals(&m, &truth, base, &what);
                    } else {
                        let (_, status) = m.get("/v1/status");
                        let torn = status["log_torn_tails"].as_array().map_or(0, Vec::len);
                        assert!(
                            torn > 0,
                            "{what}: started with {c} of {total} events and reported nothing: {status}"
                        );
                        reported += 1;
                    }
                    m.kill9();
                }
            }
        }
    }
    eprintln!("corruption campaign: {refused} refused, {exact} exact, {reported} reported");
    assert!(refused > 0 && exact + reported > 0);
    assert_eq!(sent.len(), seen.len());
}

/// Peak memory (VmHWM) of a process, bytes.
fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Hostile `POST /v1/events` bodies cost memory in proportion to the body, not hundreds of
/// times it (once, 2 MB of numbers took a node to 1.5 GiB), and valid events next to bad
/// ones are applied once per Idempotency-Key, across a `kill -9`.
#[test]
fn events_requests_are_bounded_and_idempotent() {
    let dir = TempDir::new("events");
    let m = Merger::start(&dir.0, &[]);
    let before = peak_rss(m.pid());
    let numbers = format!("[{}1]", "1,".repeat(4 << 20));
    let (st, v, _) = m.post("/v1/events", "application/json", numbers.as_bytes());
    assert_eq!(
        (st, v["error"].as_str()),
        (413, Some("too_many_events")),
        "{v}"
    );
    // Under the cap, every event bad, each with a junk field that must not be kept.
    let junk = "x".repeat(40);
    let one = format!("{{\"ts_ms\":1,\"category\":\"c\",\"junk\":[\"{junk}\",[1,2,3]]}}");
    let body = format!("[{}]", vec![one.as_str(); 90_000].join(","));
    let (st, v, _) = m.post("/v1/events", "application/json", body.as_bytes());
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["rejected_count"], 90_000);
    assert_eq!(v["rejected"].as_array().map(Vec::len), Some(100));
    assert_eq!(v["rejected_by_reason"]["invalid_event"], 90_000);
    let grown = peak_rss(m.pid()).saturating_sub(before);
    let largest = numbers.len().max(body.len()) as u64;
    eprintln!(
        "events: peak RSS grew {} KiB for bodies up to {} KiB ({:.2}x)",
        grown >> 10,
        largest >> 10,
        grown as f64 / largest as f64
    );
    assert!(
        grown <= 4 * largest,
        "peak RSS grew {grown} bytes for a {largest}-byte body"
    );

    let t = now_ms() - 1000;
    let body = format!(
        "{{\"ts_ms\":{t},\"category\":\"idem\",\"value\":2}}\n{{\"ts_ms\":{t},\"category\":\"\"}}\n"
    );
    let post = |m: &Merger, key: Option<&str>| {
        let (status, v, _) = m.post_events(key, &body);
        (status, v)
    };
    let count = |m: &Merger| {
        m.get(&format!(
            "/v1/aggregate?category=idem&start={}&end={}",
            t - 5000,
            t + 5000
        ))
        .1["count"]
            .as_u64()
    };
    for _ in 0..3 {
        let (st, v) = post(&m, Some("order-17"));
        assert_eq!(
            (st, v["accepted"].as_u64(), v["rejected_count"].as_u64()),
            (200, Some(1), Some(1))
        );
    }
    assert_eq!(count(&m), Some(1), "three tries with one key count once");
    m.kill9();
    let m = Merger::start(&dir.0, &[]);
    assert_eq!(post(&m, Some("order-17")).0, 200);
    assert_eq!(
        count(&m),
        Some(1),
        "a retry after kill -9 still counts once"
    );
    assert_eq!(post(&m, Some("order-18")).0, 200);
    assert_eq!(post(&m, None).0, 200);
    assert_eq!(count(&m), Some(3), "other keys and unkeyed requests count");
    // A request that does not fit one batch is refused whole: nothing of it is applied.
    let wide: String = (0..12_000)
        .map(|i| format!("{{\"ts_ms\":{},\"category\":\"idem\"}}\n", t - i * 1000))
        .collect();
    let (st, v, _) = m.post("/v1/events", "application/x-ndjson", wide.as_bytes());
    assert_eq!(
        (st, v["error"].as_str()),
        (413, Some("request_too_large")),
        "{v}"
    );
    assert_eq!(count(&m), Some(3));
}

/// Sockets hoarded by clients — idle ones, and slowloris ones that never finish their
/// headers — under a small descriptor limit: the node closes them after its header
/// deadline, stays reachable, keeps writing its store, and shuts down cleanly (its final
/// compaction needs descriptors too). Once, 600 idle sockets made HTTP unreachable under
/// `ulimit -n 512` and compaction failed with "Too many open files".
#[test]
fn hoarded_sockets_neither_starve_the_node_nor_stay_open() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let dir = TempDir::new("sockets");
    // `ulimit -n 256` for the node alone: a shell sets it, then becomes the node.
    let script = format!("ulimit -n 256 && exec {} \"$@\"", binary().display());
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script, "sh", "serve", "--data-dir"])
        .arg(&dir.0)
        .args(["--http-addr", "127.0.0.1:0", "--quic-addr", "127.0.0.1:0"])
        .env("EDGETALLY_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("spawn");
    let out = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(out).lines();
    let mut http = None;
    for l in lines.by_ref().map_while(Result::ok) {
        if let Some(v) = l.strip_prefix("http: http://") {
            http = Some(v.to_string());
        }
        if l.starts_with("recovered-batches: ") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let addr: std::net::SocketAddr = http.expect("http address").parse().expect("addr");
    let pid = child.id();
    let mut hoard = Vec::new();
    for i in 0..400 {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            if i % 2 == 0 {
                // Slowloris: a request line and one header, then nothing more.
                let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
            }
            hoard.push(s);
        }
    }
    let healthz = || -> Option<Duration> {
        let t = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        buf.starts_with("HTTP/1.1 200").then(|| t.elapsed())
    };
    // Within the header deadline (10 s) and a margin, the node answers again.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answered = None;
    while answered.is_none() && Instant::now() < deadline {
        answered = healthz();
        if answered.is_none() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let latency = answered.expect("/healthz unreachable 20 s after 400 sockets were hoarded");
    eprintln!("sockets: /healthz answered in {latency:?} with 400 sockets hoarded");
    // Every hoarded socket has been closed by the node by now (EOF or reset on read).
    let mut open = 0;
    for s in &mut hoard {
        let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
        let mut b = [0u8; 1];
        if let Err(e) = s.read(&mut b) {
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut
            {
                open += 1;
            }
        }
    }
    assert_eq!(open, 0, "{open} hoarded sockets still held open");
    // The store still writes.
    let base = now_ms() - 5_000;
    let b = &hostile_batches(9, base)
        .into_iter()
        .find(|b| b.verdict.is_none())
        .expect("a valid batch");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let st = agent
        .post(&format!("http://{addr}/v1/batches"))
        .send(&b.raw[..])
        .expect("post")
        .status()
        .as_u16();
    assert_eq!(st, 200);
    let rss = peak_rss(pid);
    assert!(rss < 512 << 20, "peak RSS {rss}");
    // A graceful stop writes the final snapshot and compacts: it must succeed.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    assert!(
        status.is_some_and(|s| s.success()),
        "graceful stop: {status:?}"
    );
    drop(hoard);
}
