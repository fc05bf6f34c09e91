//! Export to PostgreSQL (Debian's server, started here): two peered mergers both export to one
//! table; late updates to exported buckets, a `kill -9` of one merger with changes not yet
//! exported, its restart — and then a query in PostgreSQL equals the mergers' own totals,
//! per (category, entity, minute) and per minute.

use crate::harness::{free_udp, now_ms, tool_present, Merger, TempDir};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's PostgreSQL server binaries, if installed (see [`tool_present`]).
fn postgres_bin() -> Option<PathBuf> {
    let found = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| d.filter_map(Result::ok).map(|e| e.path().join("bin")).max())
        .filter(|b| b.join("postgres").exists() && Path::new("/usr/bin/psql").exists());
    tool_present(found.is_some(), "postgresql", "the export")
        .then_some(found)
        .flatten()
}

/// A PostgreSQL server on a loopback port with its own data directory, run as the `postgres`
/// user when the test runs as root (the server refuses root).
struct Postgres {
    child: Child,
    port: u16,
    bin: PathBuf,
    _dir: TempDir,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `program` run as the `postgres` user when the test runs as root (the server refuses root):
/// the process itself, not a wrapper, so stopping it stops the server.
fn as_server_user(program: &Path) -> Command {
    use std::os::unix::process::CommandExt;
    let id = |flag: &str| -> Option<u32> {
        let o = Command::new("id").args([flag, "postgres"]).output().ok()?;
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    };
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let mut c = Command::new(program);
    if root {
        let (uid, gid) = id("-u").zip(id("-g")).expect("a postgres user");
        c.uid(uid).gid(gid).env("HOME", "/tmp");
    }
    c
}

fn start_postgres(bin: &Path) -> Postgres {
    start_postgres_with(bin, |_| {})
}

/// The same, with `setup` run on the directory (its `data/` initialised) before the start.
fn start_postgres_with(bin: &Path, setup: impl FnOnce(&Path)) -> Postgres {
    let dir = TempDir::new("postgres");
    let data = dir.0.join("data");
    std::fs::create_dir_all(&data).expect("dir");
    let _ = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&dir.0)
        .status();
    let init = as_server_user(&bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-A", "trust", "-U", "edgetally", "--no-sync"])
        .output()
        .expect("initdb");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    setup(&dir.0);
    let _ = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&dir.0)
        .status();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let child = spawn_server(bin, &dir.0, port);
    let pg = Postgres {
        child,
        port,
        bin: bin.to_path_buf(),
        _dir: dir,
    };
    pg.wait_ready();
    pg
}

/// The server on `port` over the data directory in `dir`.
fn spawn_server(bin: &Path, dir: &Path, port: u16) -> Child {
    as_server_user(&bin.join("postgres"))
        .arg("-D")
        .arg(dir.join("data"))
        .args([
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
        ])
        .arg("-k")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("postgres")
}

impl Postgres {
    fn ready(&self) -> bool {
        Command::new("pg_isready")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn wait_ready(&self) {
        wait_until("postgres ready", 30, || self.ready());
    }

    /// Stops the server at once (fast shutdown: SIGINT), and waits for it.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// Takes the database down until [`Postgres::restart`].
    fn kill(&mut self) {
        self.stop();
        wait_until("postgres down", 30, || !self.ready());
    }

    /// Starts the server again on the same port and data.
    fn restart(&mut self) {
        self.child = spawn_server(&self.bin, &self._dir.0, self.port);
        self.wait_ready();
    }

    fn url(&self) -> String {
        format!("postgresql://edgetally@127.0.0.1:{}/postgres", self.port)
    }

    /// Rows of a query, as text (psql, Debian's client).
    fn query(&self, sql: &str) -> Vec<Vec<String>> {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "edgetally",
            ])
            .args(["-d", "postgres", "-At", "-F", "\t", "-c", sql])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split('\t').map(String::from).collect())
            .collect()
    }
}

/// A decimal string ("-12.5", "3", "0.000000001") as nano-units.
fn nanos(d: &str) -> i128 {
    let (neg, d) = d.strip_prefix('-').map_or((false, d), |r| (true, r));
    let (int, frac) = d.split_once('.').unwrap_or((d, ""));
    let mut frac = frac.to_string();
    frac.truncate(9);
    while frac.len() < 9 {
        frac.push('0');
    }
    let v = int.parse::<i128>().expect("int") * 1_000_000_000 + frac.parse::<i128>().expect("frac");
    if neg {
        -v
    } else {
        v
    }
}

/// (category, entity, minute start ms) → (count, nano-sum) as PostgreSQL holds it.
fn exported(pg: &Postgres) -> BTreeMap<(String, String, i64), (u64, i128)> {
    exported_from(pg, "edgetally_buckets")
}

/// The same from `table`.
fn exported_from(pg: &Postgres, table: &str) -> BTreeMap<(String, String, i64), (u64, i128)> {
    if pg.query(&format!("SELECT to_regclass('{table}') IS NULL")) == [["t"]] {
        return BTreeMap::new();
    }
    pg.query(&format!(
        "SELECT category, entity, (extract(epoch from bucket_start) * 1000)::bigint, count, sum \
         FROM {table} WHERE bucket_ms = 60000"
    ))
    .into_iter()
    .map(|r| {
        (
            (r[0].clone(), r[1].clone(), r[2].parse().expect("ms")),
            (r[3].parse().expect("count"), nanos(&r[4])),
        )
    })
    .collect()
}

/// The same from a merger's API: per entity (and "" for no entity) and minute.
fn merged(
    m: &Merger,
    categories: &[&str],
    entities: &[&str],
    minutes: &[i64],
) -> BTreeMap<(String, String, i64), (u64, i128)> {
    let mut out = BTreeMap::new();
    for c in categories {
        for &start in minutes {
            // Per entity.
            for e in entities {
                let (_, v) = m.get(&format!(
                    "/v1/aggregate?category={c}&entity={e}&start={start}&end={}",
                    start + 60_000
                ));
                let n = v["count"].as_u64().expect("count");
                if n > 0 {
                    let s = nanos(v["sum_exact"].as_str().expect("sum"));
                    out.insert((c.to_string(), e.to_string(), start), (n, s));
                }
            }
            // The records without an entity: the category's total minus its entities'.
            let (_, all) = m.get(&format!(
                "/v1/aggregate?category={c}&start={start}&end={}",
                start + 60_000
            ));
            let (mut n, mut s) = (
                all["count"].as_u64().expect("count"),
                nanos(all["sum_exact"].as_str().expect("sum")),
            );
            for e in entities {
                if let Some((en, es)) = out.get(&(c.to_string(), e.to_string(), start)) {
                    n -= en;
                    s -= es;
                }
            }
            if n > 0 {
                out.insert((c.to_string(), String::new(), start), (n, s));
            }
        }
    }
    out
}

/// Events `range` of `category` as JSON: event i at `minutes[i % len]` plus a spread within
/// the minute, entity `d{i % 2}`, value i.
fn spread(category: &str, minutes: &[i64], range: std::ops::Range<i64>) -> Vec<String> {
    range
        .map(|i| {
            let ts = minutes[i as usize % minutes.len()] + (i * 977) % 60_000;
            format!(
                r#"{{"ts_ms":{ts},"category":"{category}","entity":"d{}","value":{i}}}"#,
                i % 2
            )
        })
        .collect()
}

fn post(m: &Merger, events: &[String]) {
    let (st, v, _) = m.post(
        "/v1/events",
        "application/json",
        format!("[{}]", events.join(",")).as_bytes(),
    );
    assert_eq!(st, 200, "{v}");
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < until, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn postgres_holds_the_converged_totals_across_a_kill_9() {
    let Some(bin) = postgres_bin() else {
        return;
    };
    let pg = start_postgres(&bin);
    let dir = TempDir::new("export");
    let q = [free_udp(), free_udp()];
    let url = pg.url();
    let env: Vec<(&str, &str)> = vec![
        ("EDGETALLY_CLUSTER_SECRET", "export-test"),
        ("EDGETALLY_SYNC_INTERVAL_MS", "200"),
        ("EDGETALLY_EXPORT_POSTGRES_URL", &url),
        ("EDGETALLY_EXPORT_DELAY", "1s"),
        ("EDGETALLY_EXPORT_INTERVAL", "300ms"),
    ];
    let start = |i: usize| {
        let peer = q[1 - i].to_string();
        Merger::start_at(
            &dir.0.join(format!("n{i}")),
            &q[i].to_string(),
            &["--peer", &peer],
            &env,
        )
    };
    let (a, b) = (start(0), start(1));
    let now = now_ms();
    let minute = |k: i64| (now / 60_000 - k) * 60_000;
    let minutes: Vec<i64> = (2..=8).rev().map(minute).collect();
    let (cats, ents) = (["cpu", "orders"], ["d0", "d1", "d2"]);
    let event = |i: i64, c: &str| {
        let ts = minutes[(i as usize) % minutes.len()] + (i * 7_919) % 60_000;
        let value = (i % 13) as f64 * 0.125 - 0.5;
        match i % 4 {
            0 => format!(r#"{{"ts_ms":{ts},"category":"{c}","value":{value}}}"#),
            k => format!(
                r#"{{"ts_ms":{ts},"category":"{c}","entity":"d{}","value":{value}}}"#,
                k - 1
            ),
        }
    };
    // Closed minutes, split between the two nodes.
    post(&a, &(0..300).map(|i| event(i, cats[0])).collect::<Vec<_>>());
    post(
        &b,
        &(300..500)
            .map(|i| event(i, cats[(i % 2) as usize]))
            .collect::<Vec<_>>(),
    );
    let converged = |ms: &[&Merger]| {
        let want = merged(ms[0], &cats, &ents, &minutes);
        ms.iter().all(|m| merged(m, &cats, &ents, &minutes) == want) && exported(&pg) == want
    };
    wait_until("the first export", 60, || converged(&[&a, &b]));
    let rows = exported(&pg).len();
    assert!(rows > 20, "{rows} rows");

    // Late updates to exported buckets, then A dies before it can export them (and B may not
    // have pulled them yet: A's restart must export them itself, or B once it has them).
    post(
        &a,
        &(500..700)
            .map(|i| event(i, cats[(i % 2) as usize]))
            .collect::<Vec<_>>(),
    );
    a.kill9();
    post(
        &b,
        &(700..760).map(|i| event(i, cats[0])).collect::<Vec<_>>(),
    );
    let a = start(0);
    wait_until("the export after the restart", 60, || converged(&[&a, &b]));
    // Every row carries the full total, so exporting it again changes nothing: a third,
    // fresh node (a rescan of everything) leaves the table as it is.
    let before = pg.query("SELECT category, entity, bucket_start, count, sum, min, max, exported_at FROM edgetally_buckets ORDER BY 1, 2, 3");
    let c = Merger::start_with_env(&dir.0.join("n2"), &["--peer", &q[0].to_string()], &env);
    wait_until("the third node converges", 60, || {
        merged(&c, &cats, &ents, &minutes) == merged(&a, &cats, &ents, &minutes)
    });
    std::thread::sleep(Duration::from_secs(2));
    let after = pg.query("SELECT category, entity, bucket_start, count, sum, min, max, exported_at FROM edgetally_buckets ORDER BY 1, 2, 3");
    assert_eq!(before, after, "re-exporting the same totals changed rows");
    // A per-minute query in PostgreSQL equals /v1/series.
    let (_, series) = a.get(&format!(
        "/v1/series?category=cpu&start={}&end={}&step_ms=60000",
        minutes[0],
        minutes[minutes.len() - 1] + 60_000
    ));
    let want: Vec<(i64, u64)> = series["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| {
            (
                p["time_window_start"].as_i64().expect("t"),
                p["count"].as_u64().expect("n"),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    let got: Vec<(i64, u64)> = pg
        .query(
            "SELECT (extract(epoch from bucket_start) * 1000)::bigint, sum(count) FROM edgetally_buckets \
             WHERE category = 'cpu' GROUP BY 1 ORDER BY 1",
        )
        .into_iter()
        .map(|r| (r[0].parse().expect("t"), r[1].parse().expect("n")))
        .collect();
    assert_eq!(got, want);
    assert!(a.metric("edgetally_export_rows_total") > 0.0);
    let lag = a.metric("edgetally_export_lag_seconds");
    assert!(lag > 0.5 && lag < 10.0, "export lag {lag} s");
}

/// One node, exporting rarely (every hour, so only its start-up round runs in the test): a
/// late update acknowledged and then lost to `kill -9` before any export is written by the
/// restarted node's first round, which rescans from the durable mark.
#[test]
fn a_restart_exports_what_a_kill_9_left_unexported() {
    let Some(bin) = postgres_bin() else {
        return;
    };
    let pg = start_postgres(&bin);
    let dir = TempDir::new("export-one");
    let url = pg.url();
    let env: Vec<(&str, &str)> = vec![
        ("EDGETALLY_EXPORT_POSTGRES_URL", &url),
        ("EDGETALLY_EXPORT_DELAY", "1s"),
        ("EDGETALLY_EXPORT_INTERVAL", "1h"),
    ];
    let now = now_ms();
    let minutes: Vec<i64> = (2..=4).rev().map(|k| (now / 60_000 - k) * 60_000).collect();
    let events = |from: i64, to: i64| spread("late", &minutes, from..to);
    let m = Merger::start_with_env(&dir.0, &[], &env);
    post(&m, &events(0, 30));
    m.kill9();
    // The start-up round writes the first events (no mark yet: everything).
    let m = Merger::start_with_env(&dir.0, &[], &env);
    let cats = ["late"];
    let ents = ["d0", "d1"];
    wait_until("the start-up export", 30, || {
        exported(&pg) == merged(&m, &cats, &ents, &minutes)
    });
    assert!(dir.0.join("export-edgetally_buckets.mark").exists());
    // Late updates to the same minutes, acknowledged, then kill -9 before any round.
    post(&m, &events(30, 60));
    let stale = exported(&pg);
    assert_ne!(stale, merged(&m, &cats, &ents, &minutes));
    m.kill9();
    let m = Merger::start_with_env(&dir.0, &[], &env);
    wait_until("the export after kill -9", 30, || {
        exported(&pg) == merged(&m, &cats, &ents, &minutes)
    });
    let (_, v) = m.get(&format!(
        "/v1/aggregate?category=late&start={}&end={}",
        minutes[0], now
    ));
    assert_eq!(v["count"].as_u64(), Some(60));
}

/// Distinct counts and quantiles are exported beside the totals: each row's estimate, p50,
/// p90 and p99 equal the node's answer for that (category, entity, minute), and its sketch
/// bytes are the canonical ones the answer was computed from.
#[test]
fn sketches_are_exported_with_their_estimates() {
    let Some(bin) = postgres_bin() else {
        return;
    };
    let pg = start_postgres(&bin);
    let dir = TempDir::new("export-sketches");
    let url = pg.url();
    let env: Vec<(&str, &str)> = vec![
        ("EDGETALLY_EXPORT_POSTGRES_URL", &url),
        ("EDGETALLY_EXPORT_DELAY", "1s"),
        ("EDGETALLY_EXPORT_INTERVAL", "300ms"),
        ("EDGETALLY_QUANTILE_CATEGORIES", "latency"),
    ];
    let m = Merger::start_with_env(&dir.0, &[], &env);
    let now = now_ms();
    let minutes: Vec<i64> = (2..=4).rev().map(|k| (now / 60_000 - k) * 60_000).collect();
    let events: Vec<String> = (0..600i64)
        .map(|i| {
            let ts = minutes[(i % 3) as usize] + (i * 977) % 60_000;
            format!(
                r#"{{"ts_ms":{ts},"category":"latency","entity":"d{}","value":{},"subject":"u{}"}}"#,
                i % 2,
                1 + (i * 37) % 500,
                (i * 13) % 170
            )
        })
        .collect();
    post(&m, &events);
    let rows = || {
        pg.query(
            "SELECT entity, (extract(epoch from bucket_start) * 1000)::bigint, count,              distinct_estimate, p50, p90, p99, length(distinct_sketch), length(quantile_sketch)              FROM edgetally_buckets ORDER BY 1, 2",
        )
    };
    wait_until("the sketches exported", 60, || rows().len() == 6);
    for r in rows() {
        let (ent, start) = (&r[0], r[1].parse::<i64>().expect("start"));
        let (_, v) = m.get(&format!(
            "/v1/aggregate?category=latency&entity={ent}&start={start}&end={}&quantiles=0.5,0.9,0.99",
            start + 60_000
        ));
        assert_eq!(r[2], v["count"].to_string(), "{r:?}");
        let num = |s: &str| s.parse::<f64>().expect("number");
        assert_eq!(
            num(&r[3]),
            v["distinct"]["estimate"].as_f64().expect("estimate")
        );
        for (i, col) in [4, 5, 6].into_iter().enumerate() {
            let want = v["quantiles"]["values"][i]["value"]
                .as_f64()
                .expect("value");
            assert!((num(&r[col]) - want).abs() <= want * 1e-12, "{r:?} vs {v}");
        }
        assert!(num(&r[7]) > 2.0 && num(&r[8]) > 2.0, "{r:?}");
    }
}

/// The database goes down while the node keeps acknowledging late updates: each failed write
/// is counted and kept, and once the database is back the table catches up exactly.
#[test]
fn writes_failed_while_the_database_is_down_are_written_once_it_is_back() {
    let Some(bin) = postgres_bin() else {
        return;
    };
    let mut pg = start_postgres(&bin);
    let dir = TempDir::new("export-down");
    let url = pg.url();
    let env: Vec<(&str, &str)> = vec![
        ("EDGETALLY_EXPORT_POSTGRES_URL", &url),
        ("EDGETALLY_EXPORT_DELAY", "1s"),
        ("EDGETALLY_EXPORT_INTERVAL", "200ms"),
    ];
    let now = now_ms();
    let minutes: Vec<i64> = (2..=4).rev().map(|k| (now / 60_000 - k) * 60_000).collect();
    let events = |from: i64, to: i64| spread("down", &minutes, from..to);
    let (cats, ents) = (["down"], ["d0", "d1"]);
    let m = Merger::start_with_env(&dir.0, &[], &env);
    post(&m, &events(0, 20));
    wait_until("the first export", 30, || {
        exported(&pg) == merged(&m, &cats, &ents, &minutes)
    });
    pg.kill();
    post(&m, &events(20, 50));
    wait_until("failed writes counted", 30, || {
        m.metric("edgetally_export_errors_total") >= 2.0
    });
    assert!(m.metric("edgetally_export_pending_keys") >= 1.0);
    pg.restart();
    wait_until("the export after the outage", 30, || {
        exported(&pg) == merged(&m, &cats, &ents, &minutes)
    });
    let (_, v) = m.get(&format!(
        "/v1/aggregate?category=down&start={}&end={}",
        minutes[0], now
    ));
    assert_eq!(v["count"].as_u64(), Some(50));
}

/// Rows the database refuses for good (here a CHECK constraint the table's owner added; in
/// the issue, U+0000 in a category that an earlier release accepted) are quarantined —
/// counted, logged, kept aside in the data directory — and every other row, late updates
/// included, keeps flowing. Before, one such row failed its whole chunk in every round, for
/// good, on every node.
#[test]
fn rows_the_database_refuses_are_quarantined_and_the_rest_flows() {
    let Some(bin) = postgres_bin() else {
        return;
    };
    let pg = start_postgres(&bin);
    let dir = TempDir::new("export-quarantine");
    let url = pg.url();
    let env: Vec<(&str, &str)> = vec![
        ("EDGETALLY_EXPORT_POSTGRES_URL", &url),
        ("EDGETALLY_EXPORT_DELAY", "1s"),
        ("EDGETALLY_EXPORT_INTERVAL", "200ms"),
    ];
    let m = Merger::start_with_env(&dir.0, &[], &env);
    // The exporter creates its table at start; then the owner adds a rule it cannot know.
    wait_until("the table", 30, || {
        !pg.query("SELECT to_regclass('edgetally_buckets') IS NOT NULL")
            .concat()
            .contains(&"f".to_string())
    });
    pg.query("ALTER TABLE edgetally_buckets ADD CONSTRAINT no_poison CHECK (category <> 'poison')");
    let now = now_ms();
    let minutes: Vec<i64> = (2..=4).rev().map(|k| (now / 60_000 - k) * 60_000).collect();
    let mut events = spread("fine", &minutes, 0..40);
    events.extend(spread("poison", &minutes, 0..40));
    post(&m, &events);
    let (cats, ents) = (["fine"], ["d0", "d1"]);
    wait_until("the rows the database takes", 30, || {
        exported(&pg) == merged(&m, &cats, &ents, &minutes)
    });
    // 3 minutes × 2 entities of "poison", refused one by one.
    wait_until("the refused rows quarantined", 30, || {
        m.metric("edgetally_export_quarantined_total") >= 6.0
    });
    let file = dir.0.join("export-edgetally_buckets.quarantine");
    let text = std::fs::read_to_string(&file).expect("quarantine file");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 6, "{text}");
    for l in &lines {
        assert_eq!(l["category"], "poison", "{l}");
        let why = l["reason"].as_str().unwrap_or("");
        assert!(why.contains("no_poison") && why.contains("23514"), "{why}");
    }
    // Late updates keep flowing, and the quarantined keys are not tried again.
    post(&m, &spread("fine", &minutes, 40..60));
    post(&m, &spread("poison", &minutes, 40..60));
    wait_until("late updates", 30, || {
        exported(&pg) == merged(&m, &cats, &ents, &minutes)
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(m.metric("edgetally_export_quarantined_total"), 6.0);
    assert_eq!(
        std::fs::read_to_string(&file)
            .expect("file")
            .lines()
            .count(),
        6
    );
}

/// The mark file's words: `(cutoff, clean)`.
fn mark_of(dir: &Path) -> (i64, bool) {
    let text = std::fs::read_to_string(dir.join("export-edgetally_buckets.mark")).expect("mark");
    let mut words = text.split_whitespace();
    let cutoff = words.next().expect("cutoff").parse().expect("ms");
    (cutoff, words.next() == Some("clean"))
}

/// A clean stop (SIGTERM) marks its last round clean, and the next start rescans only what
/// had not closed: it writes no row again. A start takes that word back before anything
/// applies: with the database down the restarted node's first round fails, a late update is
/// acknowledged, `kill -9` — and the next start still finds and writes it.
#[test]
fn a_clean_stop_spares_the_next_start_its_rescan_but_a_crash_after_it_does_not() {
    let Some(bin) = postgres_bin() else {
        return;
    };
    let mut pg = start_postgres(&bin);
    let dir = TempDir::new("export-clean");
    let url = pg.url();
    let env: Vec<(&str, &str)> = vec![
        ("EDGETALLY_EXPORT_POSTGRES_URL", &url),
        ("EDGETALLY_EXPORT_DELAY", "1s"),
        ("EDGETALLY_EXPORT_INTERVAL", "200ms"),
    ];
    let now = now_ms();
    let minutes: Vec<i64> = (2..=4).rev().map(|k| (now / 60_000 - k) * 60_000).collect();
    let events = |from: i64, to: i64| spread("clean", &minutes, from..to);
    let (cats, ents) = (["clean"], ["d0", "d1"]);
    let m = Merger::start_with_env(&dir.0, &[], &env);
    post(&m, &events(0, 40));
    wait_until("the first export", 30, || {
        exported(&pg) == merged(&m, &cats, &ents, &minutes)
    });
    let written = m.metric("edgetally_export_rows_total");
    assert!(written >= 6.0, "{written} rows");
    assert!(m.terminate(), "a clean exit");
    let (cutoff, clean) = mark_of(&dir.0);
    assert!(clean, "the last round of a clean stop is marked clean");
    assert!(cutoff > minutes[2] + 60_000);

    // The next start's first round writes nothing: every closed bucket is in the table.
    let restarted = now_ms();
    let m = Merger::start_with_env(&dir.0, &[], &env);
    assert!(!mark_of(&dir.0).1, "the start takes the clean word back");
    wait_until("the start-up round", 30, || {
        mark_of(&dir.0).0 > restarted - 1_000
    });
    assert_eq!(m.metric("edgetally_export_rows_total"), 0.0);
    assert_eq!(exported(&pg), merged(&m, &cats, &ents, &minutes));
    assert!(m.terminate(), "a clean exit");
    assert!(mark_of(&dir.0).1);

    // A clean stop two minutes ago, as if the node had been down since: the mark goes back
    // to the end of the last minute with data, so the start-up round has that minute to
    // write, and fails (the database is down). Late updates to the two minutes before it
    // are acknowledged, then a crash: the next start must not trust the old clean word.
    let stale = exported(&pg);
    std::fs::write(
        dir.0.join("export-edgetally_buckets.mark"),
        format!("{} clean\n", minutes[2] + 60_000),
    )
    .expect("mark");
    pg.kill();
    let m = Merger::start_with_env(&dir.0, &[], &env);
    assert!(!mark_of(&dir.0).1, "the start takes the clean word back");
    wait_until("a failed round", 30, || {
        m.metric("edgetally_export_errors_total") >= 1.0
    });
    post(&m, &spread("clean", &minutes[..2], 40..70));
    m.kill9();
    pg.restart();
    let m = Merger::start_with_env(&dir.0, &[], &env);
    assert_ne!(stale, merged(&m, &cats, &ents, &minutes));
    wait_until("the export after the crash", 30, || {
        exported(&pg) == merged(&m, &cats, &ents, &minutes)
    });
    let (_, v) = m.get(&format!(
        "/v1/aggregate?category=clean&start={}&end={}",
        minutes[0], now
    ));
    assert_eq!(v["count"].as_u64(), Some(70));
}

/// `openssl` (Debian's, which PostgreSQL's packages bring) run in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<name>.pem`, `<name>.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// The export over TLS to a server that refuses unencrypted connections (`hostssl` only):
/// with `export_postgres_ca` the certificate is verified — the CA that signed it lets the
/// rows through, another CA gets nothing written and the failure counted — and without it
/// the connection is encrypted, not authenticated (libpq's `sslmode=require`).
#[test]
fn the_export_speaks_tls_and_verifies_the_database_against_the_ca_given() {
    let Some(bin) = postgres_bin() else {
        return;
    };
    let pg = start_postgres_with(&bin, |dir| {
        make_ca(dir, "ca");
        make_ca(dir, "other");
        std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
                "-out",
                "server.pem",
            ],
        );
        let data = dir.join("data");
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).expect("conf");
        conf.push_str(&format!(
            "\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            dir.join("server.pem").display(),
            dir.join("server.key").display()
        ));
        std::fs::write(data.join("postgresql.conf"), conf).expect("conf");
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .expect("hba");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("key mode");
    });
    let certs = pg._dir.0.clone();
    // Unencrypted connections are refused, so a row written came over TLS.
    let plain = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "edgetally",
        ])
        .args(["-d", "postgres", "-c", "SELECT 1"])
        .env("PGSSLMODE", "disable")
        .output()
        .expect("psql");
    assert!(
        !plain.status.success(),
        "the server takes plain connections"
    );

    let now = now_ms();
    let minute = (now / 60_000 - 2) * 60_000;
    let events: Vec<String> = (0..12)
        .map(|i| {
            format!(
                r#"{{"ts_ms":{},"category":"tls","entity":"d{}","value":{i}}}"#,
                minute + i * 1_000,
                i % 3
            )
        })
        .collect();
    let (cats, ents) = (["tls"], ["d0", "d1", "d2"]);
    let node = |name: &str, table: &str, url: &str, ca: Option<&Path>| {
        let dir = TempDir::new(name);
        let mut env: Vec<(String, String)> = vec![
            ("EDGETALLY_EXPORT_POSTGRES_URL".into(), url.into()),
            ("EDGETALLY_EXPORT_TABLE".into(), table.into()),
            ("EDGETALLY_EXPORT_DELAY".into(), "1s".into()),
            ("EDGETALLY_EXPORT_INTERVAL".into(), "200ms".into()),
        ];
        if let Some(ca) = ca {
            env.push((
                "EDGETALLY_EXPORT_POSTGRES_CA".into(),
                ca.display().to_string(),
            ));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let m = Merger::start_with_env(&dir.0, &[], &env);
        post(&m, &events);
        (m, dir)
    };
    let require = format!("{}?sslmode=require", pg.url());

    // Verified against the CA that signed the server's certificate.
    let (m, _d1) = node(
        "export-tls-ca",
        "verified",
        &require,
        Some(&certs.join("ca.pem")),
    );
    wait_until("the export over verified TLS", 30, || {
        exported_from(&pg, "verified") == merged(&m, &cats, &ents, &[minute])
    });
    assert_eq!(m.metric("edgetally_export_errors_total"), 0.0);

    // Encrypted, unauthenticated: the URL's default sslmode (prefer) and no CA.
    let (u, _d2) = node("export-tls-any", "unverified", &pg.url(), None);
    wait_until("the export over unverified TLS", 30, || {
        exported_from(&pg, "unverified") == merged(&u, &cats, &ents, &[minute])
    });

    // Another CA: refused at every round, nothing written.
    let (w, _d3) = node(
        "export-tls-other",
        "wrong_ca",
        &require,
        Some(&certs.join("other.pem")),
    );
    wait_until("failed rounds", 30, || {
        w.metric("edgetally_export_errors_total") >= 2.0
    });
    assert_eq!(
        pg.query("SELECT to_regclass('wrong_ca') IS NULL"),
        [["t"]],
        "a server the CA did not sign got the table"
    );
    assert!(w.metric("edgetally_export_pending_keys") >= 1.0);
}
