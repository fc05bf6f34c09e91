//! `cargo xtask`: the project's build and test entry points.
//!
//! - `cargo xtask test`  — everything CI checks: toolchain prerequisites, formatting, clippy with
//!   warnings denied, the wasm32 build of the pure crates with its import check, and all tests.
//! - `cargo xtask wasm-check` — only the wasm32 build and import check.
//! - `cargo xtask web` — builds the npm package in `web/` (wasm-pack, wasm-opt, tsc), after
//!   installing what it needs (wasm-bindgen-cli at the Cargo.lock version, wasm-pack, the npm
//!   dev dependencies).
//! - `cargo xtask bench [core|wire|sdk|figures|merger|producers|json|cluster|status|export|web]` — the benchmarks (not run by `test`).
//! - `cargo xtask soak [SECONDS]` — the soak (default 1800 s): valid load plus abusive clients
//!   against a release merger; `test` runs 60 s of it on the debug build.
//! - `cargo xtask fuzz [SECONDS]` — every fuzz target for SECONDS each (default 600); `test`
//!   runs them for 30 s each. A crash is copied into `tests/crashers/` and fails the run.
//! - `cargo xtask sketches` — the sketches' accuracy tables (distinct counts to ten million
//!   subjects), release build.
//! - `cargo xtask upgrade [COMMIT]` — builds the previous release (default
//!   [`PREVIOUS_RELEASE`]) from its commit and runs a three-node cluster through a rolling
//!   upgrade to this one, writes throughout, checked against a ground truth
//!   (tests/it/upgrade.rs); `test` runs it too.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = root()?;
    std::env::set_current_dir(&root)?;
    match args.first().map(String::as_str) {
        Some("test") | Some("ci") => test(),
        Some("wasm-check") => {
            ensure_prerequisites()?;
            wasm_check(&root)
        }
        Some("bench") => bench(
            args.get(1).map(String::as_str).unwrap_or("all"),
            args.get(2..).unwrap_or_default(),
        ),
        Some("demo") => demo(&root, &args[1..]),
        Some(soak @ ("soak" | "churn")) => {
            let secs = args.get(1).map_or("1800", String::as_str);
            bench_binary_with(&root, &[soak, "--secs", secs])
        }
        Some("fuzz") => {
            let secs = match args.get(1) {
                Some(s) => s.parse().context("usage: cargo xtask fuzz [SECONDS]")?,
                None => 600,
            };
            fuzz(&root, secs)
        }
        Some("web") => {
            ensure_prerequisites()?;
            web_build(&root)
        }
        Some("sim") => {
            let scale = match args.get(1) {
                Some(s) => s.parse().context("usage: cargo xtask sim [SCALE]")?,
                None => 20u64,
            };
            sim(scale)
        }
        Some("sketches") => run(cargo().args([
            "test",
            "--release",
            "--locked",
            "-p",
            "edgetally-sketch",
            "--lib",
            "--",
            "--ignored",
            "--nocapture",
        ])),
        Some("upgrade") => {
            let commit = args.get(1).map_or(PREVIOUS_RELEASE, String::as_str);
            upgrade(&root, commit)
        }
        Some("openapi") => {
            let secs = match args.get(1) {
                Some(s) => s.parse().context("usage: cargo xtask openapi [SECONDS]")?,
                None => 300,
            };
            build_test_binaries()?;
            openapi(&root, secs)
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <test|wasm-check|web|openapi [SECONDS]|upgrade [COMMIT]|sketches|soak [SECONDS]|churn [SECONDS]|fuzz [SECONDS]|sim [SCALE]|bench [core|wire|sdk|figures|merger|cluster|status|export|web]>"
            );
            std::process::exit(2)
        }
    }
}

/// The seeded simulations — replicas (tests/it/convergence.rs) and shard groups under
/// topology changes and version skew (tests/it/groups_sim.rs) — run `scale` times wider than
/// CI runs them (1,000 scenarios each, times `scale`), in release mode; they print their
/// figures, and a failure prints the seed that reruns it alone (`EDGETALLY_SIM_SEED`,
/// `EDGETALLY_GROUPS_SIM_SEED`).
fn sim(scale: u64) -> Result<()> {
    run(cargo()
        .args([
            "test",
            "--release",
            "--locked",
            "-p",
            "edgetally-tests",
            "--test",
            "it",
            "--",
            "convergence::simulated",
            "groups_sim::simulated",
            "--nocapture",
        ])
        .env("EDGETALLY_SIM_SCALE", scale.to_string())
        .env("EDGETALLY_GROUPS_SIM_SCALE", scale.to_string()))
}

/// The previous release: the commit the last landed change ended on. Nodes of this release
/// must replicate with it (`cargo xtask upgrade`); move it forward when a release lands.
const PREVIOUS_RELEASE: &str = "53efa374ab174baa11d0b53bdd7f09d7d21d67fe";

/// Builds `edgetally` at `commit` (its sources from `git archive`, into the same target
/// directory so that unchanged dependencies are reused; the binary is copied aside) and runs
/// the rolling-upgrade test from it to this tree's binary.
fn upgrade(root: &Path, commit: &str) -> Result<()> {
    let short = &commit[..commit.len().min(12)];
    let aside = target_dir(root).join("previous-release");
    let src = aside.join(format!("src-{short}"));
    let bin = aside.join(format!("edgetally-{short}"));
    if !bin.exists() {
        let known = Command::new("git")
            .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
            .status()
            .context("running git")?
            .success();
        if !known {
            bail!(
                "commit {commit} (the previous release) is not in this clone: fetch the full                  history (git fetch --unshallow) and run again"
            );
        }
        if src.exists() {
            std::fs::remove_dir_all(&src)?;
        }
        std::fs::create_dir_all(&src)?;
        let mut archive = Command::new("git")
            .args(["archive", "--format=tar", commit])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("git archive")?;
        let tar = Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(&src)
            .stdin(archive.stdout.take().context("git archive's output")?)
            .status()
            .context("tar")?;
        if !archive.wait()?.success() || !tar.success() {
            bail!("extracting {commit} failed");
        }
        run(cargo()
            .args(["build", "--locked", "-p", "edgetally", "--bin", "edgetally"])
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", target_dir(root)))?;
        std::fs::copy(target_dir(root).join("debug").join("edgetally"), &bin)
            .context("copying the previous release's binary aside")?;
        std::fs::remove_dir_all(&src)?;
    }
    // This tree's binaries again (the build above wrote its own over them).
    build_test_binaries()?;
    run(cargo()
        .args([
            "test",
            "--locked",
            "-p",
            "edgetally-tests",
            "--test",
            "it",
            "--",
            "--ignored",
            "--nocapture",
            "upgrade::",
        ])
        .env(
            "EDGETALLY_BIN",
            target_dir(root).join("debug").join("edgetally"),
        )
        .env("EDGETALLY_PREVIOUS_BIN", &bin))
}

fn root() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(dir.parent().context("xtask has a parent")?.to_path_buf())
}

/// Where cargo puts build outputs (`CARGO_TARGET_DIR`, else `target/`).
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Installs what a fresh machine lacks: the wasm32 target and the clippy/rustfmt components.
fn ensure_prerequisites() -> Result<()> {
    let spec = WasmSpec::load()?;
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup is required")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == spec.target)
    {
        run(Command::new("rustup").args(["target", "add", &spec.target]))?;
    }
    let comps = Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()?;
    let comps = String::from_utf8_lossy(&comps.stdout);
    for c in ["clippy", "rustfmt"] {
        if !comps.lines().any(|l| l.starts_with(c)) {
            run(Command::new("rustup").args(["component", "add", c]))?;
        }
    }
    Ok(())
}

fn test() -> Result<()> {
    let root = root()?;
    report_free_space(&root);
    ensure_prerequisites()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    wasm_check(&root)?;
    web_build(&root)?;
    // The binaries the tests start, built first: no test then waits on a build (or times out
    // behind one) and every suite runs the same executable.
    build_test_binaries()?;
    ensure_test_tools()?;
    let (mut passed, mut failed) = run_tests(
        cargo()
            .args(["test", "--workspace", "--locked"])
            .env(
                "EDGETALLY_BIN",
                target_dir(&root).join("debug").join("edgetally"),
            )
            .env("EDGETALLY_REQUIRE_TOOLS", "1"),
    )?;
    let (p, f) = web_tests(&root)?;
    passed += p;
    failed += f;
    // Bounded slices of the soaks and of the fuzzing campaign (`cargo xtask soak`,
    // `cargo xtask churn` and `cargo xtask fuzz` run them longer).
    let bench = target_dir(&root).join("debug").join("edgetally-bench");
    run(Command::new(&bench).args(["soak", "--secs", "60"]))?;
    run(Command::new(&bench).args(["churn", "--secs", "45", "--keys-per-sec", "500"]))?;
    fuzz(&root, 30)?;
    openapi(&root, 45)?;
    upgrade(&root, PREVIOUS_RELEASE)?;
    eprintln!("xtask: all checks passed");
    // One closing line for the whole run (cargo prints one per test binary, the last of which
    // is often a doc-test binary with nothing in it).
    println!("tests: {passed} passed, {failed} failed");
    Ok(())
}

/// Runs a `cargo test` command, echoing its output and adding up its `test result:` lines.
fn run_tests(cmd: &mut Command) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let out = child.stdout.take().context("piped stdout")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(label), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n
                    .trim_start_matches(|c: char| !c.is_ascii_digit())
                    .parse()
                    .unwrap_or(0);
                match label {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        println!("tests: {passed} passed, {failed} failed");
        bail!("cargo test failed with {status}");
    }
    Ok((passed, failed))
}

/// The version of a crate in Cargo.lock.
fn locked_version(root: &Path, krate: &str) -> Result<String> {
    let lock = std::fs::read_to_string(root.join("Cargo.lock"))?;
    let mut lines = lock.lines();
    while let Some(l) = lines.next() {
        if l == format!("name = \"{krate}\"") {
            if let Some(v) = lines.next().and_then(|v| v.strip_prefix("version = ")) {
                return Ok(v.trim_matches('"').to_string());
            }
        }
    }
    bail!("{krate} is not in Cargo.lock")
}

fn tool_version(tool: &str) -> Option<String> {
    let out = Command::new(tool).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the JavaScript-side toolchain a fresh machine lacks: wasm-bindgen-cli at exactly
/// the Cargo.lock version (wasm-pack cannot download it here), wasm-pack, and the npm dev
/// dependencies (typescript, binaryen's wasm-opt, the runtimes and the browser driver).
fn ensure_web_tools(root: &Path) -> Result<()> {
    let want = locked_version(root, "wasm-bindgen")?;
    if tool_version("wasm-bindgen").is_none_or(|v| v.split_whitespace().nth(1) != Some(&want)) {
        let version = format!("={want}");
        let locked = cargo()
            .args([
                "install",
                "--locked",
                "wasm-bindgen-cli",
                "--version",
                &version,
            ])
            .status()?;
        if !locked.success() {
            // The local index sometimes lacks a locked dependency; the unlocked build works.
            run(cargo().args([
                "install",
                "--force",
                "wasm-bindgen-cli",
                "--version",
                &version,
            ]))?;
        }
    }
    if tool_version("wasm-pack").is_none() {
        run(cargo().args(["install", "--locked", "wasm-pack", "--version", "=0.15.1"]))?;
    }
    if tool_version("node").is_none() {
        bail!("Node.js ≥ 20 and npm are needed for the npm package and its tests (the machine image has them)");
    }
    let web = root.join("web");
    let stamp = web.join("node_modules").join(".package-lock.json");
    let stale = match (
        std::fs::metadata(&stamp),
        std::fs::metadata(web.join("package-lock.json")),
    ) {
        (Ok(a), Ok(b)) => a.modified()? < b.modified()?,
        _ => true,
    };
    if stale {
        // `npm install` from the committed lock rather than `npm ci`: the registry reachable
        // here lists only the linux builds of deno's and workerd's per-platform optional
        // packages, so the lock has no entries for the others and `npm ci` refuses it as out
        // of sync. `npm install` installs exactly what the lock pins and leaves it unchanged.
        run(Command::new("npm")
            .args(["install", "--no-audit", "--no-fund"])
            .current_dir(&web))?;
    }
    Ok(())
}

/// Installs Debian packages (as root, else through sudo), non-interactively.
fn apt_install(packages: &[&str]) -> Result<()> {
    let apt = |args: &[&str]| {
        let mut c = if is_root() {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(&mut apt(&["update", "-q"]))?;
    run(apt(&["install", "-y", "-q"]).args(packages))
}

/// The real components the Rust tests start (Debian's Prometheus for remote read, its
/// PostgreSQL server for the export), which they then require (`EDGETALLY_REQUIRE_TOOLS`)
/// instead of skipping.
fn ensure_test_tools() -> Result<()> {
    let mut missing = Vec::new();
    if !Path::new("/usr/bin/prometheus").exists() {
        missing.push("prometheus");
    }
    // The server, not only the client: a machine can have psql and libpq without `postgres`.
    let server = std::fs::read_dir("/usr/lib/postgresql").is_ok_and(|versions| {
        versions
            .filter_map(Result::ok)
            .any(|v| v.path().join("bin/postgres").exists())
    });
    if !server || !Path::new("/usr/bin/psql").exists() {
        missing.push("postgresql");
    }
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    Ok(())
}

/// Debian's Chromium, for the browser tests only (the demo and the package build need none).
fn ensure_chromium() -> Result<()> {
    if !Path::new("/usr/bin/chromium").exists() {
        apt_install(&["chromium"])?;
    }
    Ok(())
}

/// Prints the free space where the build goes: a cold run writes several GB there, and a
/// linker dying of SIGBUS is what a full disk looks like from inside the build.
fn report_free_space(root: &Path) {
    let target = target_dir(root);
    let at = if target.exists() {
        target
    } else {
        root.to_path_buf()
    };
    if let Ok(out) = Command::new("df")
        .args(["-h", "--output=avail,target"])
        .arg(&at)
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(line) = text.lines().nth(1) {
            eprintln!("xtask: free space for the build: {}", line.trim());
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Builds the npm package per `wasm-pack.toml`'s `[package]` section.
fn web_build(root: &Path) -> Result<()> {
    ensure_web_tools(root)?;
    let spec = BuildSpec::load()?.package;
    let krate = root.join(&spec.krate);
    let out = root.join(&spec.out_dir);
    run(Command::new("wasm-pack")
        .args([
            "build",
            "--target",
            &spec.target,
            "--profile",
            &spec.profile,
            "--no-pack",
            "--out-dir",
        ])
        .arg(&out)
        .arg(&krate))?;
    // wasm-pack writes a catch-all .gitignore, which would also keep the files out of `npm pack`.
    let _ = std::fs::remove_file(out.join(".gitignore"));
    let module = out.join("edgetally_wasm_bg.wasm");
    let wasm_opt = root.join("web/node_modules/.bin/wasm-opt");
    run(Command::new(&wasm_opt)
        .args(&spec.wasm_opt)
        .arg(&module)
        .arg("-o")
        .arg(&module))?;
    run(Command::new(root.join("web/node_modules/.bin/tsc"))
        .args(["-p", "."])
        .current_dir(root.join("web")))?;
    // The JavaScript examples import "edgetally" as users do; Node finds it here.
    let link = root.join("examples/node_modules/edgetally");
    if std::fs::symlink_metadata(&link).is_err() {
        std::fs::create_dir_all(root.join("examples/node_modules"))?;
        #[cfg(unix)]
        std::os::unix::fs::symlink("../../web", &link)?;
    }
    let bytes = std::fs::read(&module)?;
    eprintln!("xtask: web/pkg wasm module: {} bytes", bytes.len());
    Ok(())
}

/// Builds (debug) the binaries the test suites start: the merger, the benchmarks' binary (for
/// the soak) and the native example producer.
fn build_test_binaries() -> Result<()> {
    build_binaries(
        false,
        &["-p", "edgetally-examples", "--bin", "native-producer"],
    )
}

/// Runs the npm package's tests (Node's test runner drives Node, Deno, workerd and Chromium
/// against real mergers) with the debug binary; returns (passed, failed).
fn web_tests(root: &Path) -> Result<(u64, u64)> {
    ensure_chromium()?;
    build_test_binaries()?;
    let cmd = &mut Command::new("node");
    cmd.args([
        "--test",
        "--test-concurrency=1",
        "--test-reporter=tap",
        "test/",
    ])
    .current_dir(root.join("web"))
    .env(
        "EDGETALLY_BIN",
        target_dir(root).join("debug").join("edgetally"),
    )
    .stdout(std::process::Stdio::piped());
    eprintln!("xtask: {cmd:?}");
    let output = cmd.spawn()?.wait_with_output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    print!("{text}");
    let count = |label: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix(label))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum::<u64>()
    };
    let (passed, failed) = (count("# pass "), count("# fail "));
    if !output.status.success() || failed > 0 || passed == 0 {
        println!("tests: {passed} passed (web), {failed} failed (web)");
        bail!("web tests failed");
    }
    Ok((passed, failed))
}

/// Python tools, pinned, in a virtual environment under the target directory.
const PYTHON_TOOLS: &[&str] = &["openapi-spec-validator==0.9.0", "schemathesis==4.32.5"];

/// The virtual environment's `bin/` with [`PYTHON_TOOLS`] installed (Debian's python3-venv
/// is installed first if `venv` is missing).
fn python_tools(root: &Path) -> Result<PathBuf> {
    let venv = target_dir(root).join("py");
    let bin = venv.join("bin");
    let stamp = venv.join(".installed");
    let want = PYTHON_TOOLS.join(" ");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(bin);
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status();
    if !made.is_ok_and(|s| s.success()) {
        apt_install(&["python3-venv"])?;
        let _ = std::fs::remove_dir_all(&venv);
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(bin.join("pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .args(PYTHON_TOOLS))?;
    std::fs::write(&stamp, want)?;
    Ok(bin)
}

/// Checks docs/openapi.yaml: valid OpenAPI 3.0 (openapi-spec-validator), then a bounded
/// schemathesis run of `secs` seconds against a real node (debug binary, loopback, a fresh
/// data directory with a few events): no 5xx, and every response's status, content type,
/// headers and body match the document.
fn openapi(root: &Path, secs: u64) -> Result<()> {
    let bin = python_tools(root)?;
    let spec = root.join("docs/openapi.yaml");
    run(Command::new(bin.join("openapi-spec-validator")).arg(&spec))?;
    let data = target_dir(root).join("openapi-node");
    let _ = std::fs::remove_dir_all(&data);
    let free = |udp: bool| -> Result<u16> {
        Ok(if udp {
            std::net::UdpSocket::bind("127.0.0.1:0")?
                .local_addr()?
                .port()
        } else {
            std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port()
        })
    };
    let (http, quic) = (free(false)?, free(true)?);
    let mut node = Command::new(target_dir(root).join("debug").join("edgetally"))
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .args(["--quic-addr", &format!("127.0.0.1:{quic}")])
        .env("EDGETALLY_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting the node")?;
    let url = format!("http://127.0.0.1:{http}");
    let result = (|| -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", http)).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("the node did not open {url} within 30 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        // A few events, so queries have something to answer.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis();
        let events: Vec<String> = (0..20)
            .map(|i| {
                format!(
                    r#"{{"ts_ms":{},"category":"cpu","entity":"d{}","value":{}}}"#,
                    now - i * 1000,
                    i % 3,
                    i
                )
            })
            .collect();
        let body = format!("[{}]", events.join(","));
        let request = format!(
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", http))?;
        std::io::Write::write_all(&mut conn, request.as_bytes())?;
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut conn, &mut answer)?;
        if !answer.starts_with("HTTP/1.1 200") {
            bail!("seeding events: {answer}");
        }
        run(Command::new(bin.join("schemathesis"))
            .arg("run")
            .arg(&spec)
            .args(["--url", &url, "--seed", "1", "--max-examples", "25"])
            .args(["--max-time", &secs.to_string()])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,\
                 response_headers_conformance,response_schema_conformance",
            ])
            .env("SCHEMATHESIS_HOOKS", "")
            .current_dir(target_dir(root)))
    })();
    let _ = node.kill();
    let _ = node.wait();
    result
}

/// Builds the binaries and runs the demo (`edgetally-bench demo`, which starts and stops its
/// own mergers from the `edgetally` binary). The single-node demo's user-activity producer in
/// Node.js uses the npm package, so it builds that too; `--cluster` needs none of it.
fn demo(root: &Path, rest: &[String]) -> Result<()> {
    let cluster = rest.iter().any(|a| a == "--cluster");
    if !cluster {
        ensure_prerequisites()?;
        web_build(root)?;
    }
    build_binaries(false, &[])?;
    let bin = target_dir(root).join("debug");
    let mut cmd = Command::new(bin.join("edgetally-bench"));
    cmd.env("EDGETALLY_BIN", bin.join("edgetally")).arg("demo");
    if !cluster {
        cmd.arg("--node-script")
            .arg(root.join("examples/node/ingest.mjs"));
    }
    run(cmd.args(rest))
}

/// Builds `edgetally` and `edgetally-bench` (the demo and the benchmarks start the first),
/// and the binaries `extra` names (`-p <package> --bin <name>` pairs).
fn build_binaries(release: bool, extra: &[&str]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--locked"]);
    if release {
        cmd.arg("--release");
    }
    run(cmd
        .args([
            "-p",
            "edgetally",
            "--bin",
            "edgetally",
            "-p",
            "edgetally-bench",
            "--bin",
            "edgetally-bench",
        ])
        .args(extra))
}

/// Runs `edgetally-bench SUBCOMMAND EXTRA…` after installing Debian's `package` if its
/// `program` is missing (the comparison a benchmark starts beside the merger).
fn bench_against(
    root: &Path,
    program: &str,
    package: &str,
    sub: &str,
    extra: &[String],
) -> Result<()> {
    if Command::new(program).arg("--version").output().is_err() {
        apt_install(&[package])?;
    }
    let mut args = vec![sub];
    args.extend(extra.iter().map(String::as_str));
    bench_binary_with(root, &args)
}

/// Builds the release `edgetally` binary; returns its path.
fn build_release_binary(root: &Path) -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "edgetally",
        "--bin",
        "edgetally",
    ]))?;
    Ok(target_dir(root).join("release").join("edgetally"))
}

/// Builds the release `edgetally` and `edgetally-bench` binaries and runs
/// `edgetally-bench ARGS…` (which starts the `edgetally` beside it).
fn bench_binary_with(root: &Path, args: &[&str]) -> Result<()> {
    build_binaries(true, &[])?;
    run(Command::new(target_dir(root).join("release").join("edgetally-bench")).args(args))
}

/// `cargo xtask bench WHICH [ARGS…]`: ARGS go to `edgetally-bench loadgen` for `merger`
/// (e.g. `--sketches`).
fn bench(which: &str, extra: &[String]) -> Result<()> {
    let root = root()?;
    if which == "merger" {
        return bench_against(&root, "redis-server", "redis-server", "loadgen", extra);
    }
    if which == "cluster" {
        return bench_binary_with(&root, &["clusterbench"]);
    }
    if which == "json" {
        return bench_against(
            &root,
            "clickhouse-server",
            "clickhouse-server",
            "jsonbench",
            extra,
        );
    }
    if which == "producers" {
        let mut args = vec!["producers"];
        args.extend(extra.iter().map(String::as_str));
        return bench_binary_with(&root, &args);
    }
    if which == "status" {
        return bench_binary_with(&root, &["statusbench"]);
    }
    if which == "export" {
        ensure_test_tools()?;
        return bench_binary_with(&root, &["exportbench"]);
    }
    // (name on the command line, bench target, package)
    let benches: &[(&str, &str, &str)] = &[
        ("core", "core", "edgetally-core"),
        ("figures", "figures", "edgetally-core"),
        ("wire", "wire", "edgetally-proto"),
        ("sdk", "sdk", "edgetally-proto"),
        ("sdk", "bytes", "edgetally-proto"),
    ];
    let mut ran = false;
    for (name, target, pkg) in benches {
        if which == "all" || which == *name {
            run(cargo().args(["bench", "-p", pkg, "--bench", target]))?;
            ran = true;
        }
    }
    if which == "web" || which == "all" {
        ensure_prerequisites()?;
        web_build(&root)?;
        run(Command::new("node")
            .arg("bench/otel.mjs")
            .current_dir(root.join("web")))?;
        // The SDK in Chromium against a release merger: WebTransport against fetch.
        run(Command::new("node")
            .arg("bench/browser.mjs")
            .env("EDGETALLY_BIN", build_release_binary(&root)?)
            .current_dir(root.join("web")))?;
        // What a page downloads: the module and the bundled, minified JavaScript, gzipped.
        run(Command::new("node")
            .arg("bench/size.mjs")
            .current_dir(root.join("web")))?;
        ran = true;
    }
    if !ran {
        bail!("unknown benchmark {which}");
    }
    Ok(())
}

/// `wasm-pack.toml`: the wasm build spec.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildSpec {
    #[serde(rename = "abi-check")]
    abi_check: WasmSpec,
    package: PackageSpec,
}

/// The `[abi-check]` section of `wasm-pack.toml`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct WasmSpec {
    target: String,
    crates: Vec<String>,
    features: Vec<String>,
    #[serde(rename = "forbidden-import-modules")]
    forbidden: Vec<String>,
}

/// The `[package]` section of `wasm-pack.toml`: how the npm package's module is built.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PackageSpec {
    #[serde(rename = "crate")]
    krate: String,
    target: String,
    out_dir: String,
    profile: String,
    wasm_opt: Vec<String>,
}

impl BuildSpec {
    fn load() -> Result<BuildSpec> {
        let path = root()?.join("wasm-pack.toml");
        let text = std::fs::read_to_string(&path).context("reading wasm-pack.toml")?;
        toml::from_str(&text).with_context(|| format!("{}", path.display()))
    }
}

impl WasmSpec {
    fn load() -> Result<WasmSpec> {
        Ok(BuildSpec::load()?.abi_check)
    }
}

fn wasm_check(root: &Path) -> Result<()> {
    let spec = WasmSpec::load()?;
    for krate in &spec.crates {
        run(cargo().args([
            "rustc",
            "-p",
            krate,
            "--release",
            "--locked",
            "--target",
            &spec.target,
            "--features",
            &spec.features.join(","),
            "--crate-type",
            "cdylib",
        ]))?;
        let file = target_dir(root)
            .join(&spec.target)
            .join("release")
            .join(format!("{}.wasm", krate.replace('-', "_")));
        let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        let imports =
            wasm_imports(&bytes).with_context(|| format!("parsing {}", file.display()))?;
        let exports_ok = [&b"et_apply"[..], b"et_producer"]
            .iter()
            .all(|name| bytes.windows(name.len()).any(|w| w == *name));
        if !exports_ok {
            bail!("{krate}: the wasm module lacks the et_apply/et_producer exports; the check would be vacuous");
        }
        let bad: Vec<_> = imports
            .iter()
            .filter(|(m, _)| spec.forbidden.contains(m))
            .collect();
        if !bad.is_empty() {
            bail!("{krate}: wasm32 module imports from forbidden modules: {bad:?}");
        }
        eprintln!(
            "xtask: {krate} for {}: {} bytes, imports {:?} — ok",
            spec.target,
            bytes.len(),
            imports
        );
        if bytes.windows(9).any(|w| w == b"et_verify") {
            // The signature rule's verdicts in wasm32 equal the native ones.
            let vectors = target_dir(root).join("sig-vectors");
            let _ = std::fs::remove_dir_all(&vectors);
            run(cargo()
                .args([
                    "test",
                    "--locked",
                    "-p",
                    "edgetally-tests",
                    "--test",
                    "it",
                    "write_vectors_for_the_wasm_check",
                ])
                .env("EDGETALLY_WRITE_SIG_VECTORS", &vectors))?;
            run(Command::new("node")
                .arg(root.join("xtask").join("js").join("verify-vectors.mjs"))
                .arg(&file)
                .arg(&vectors))?;
        }
    }
    Ok(())
}

/// Lists (module, name) of a wasm binary's imports.
fn wasm_imports(b: &[u8]) -> Result<Vec<(String, String)>> {
    if b.len() < 8 || &b[..4] != b"\0asm" {
        bail!("not a wasm module");
    }
    let mut p = 8;
    let mut out = Vec::new();
    while p < b.len() {
        let id = b[p];
        p += 1;
        let size = leb(b, &mut p)? as usize;
        let end = p + size;
        if end > b.len() {
            bail!("section overruns the file");
        }
        if id == 2 {
            let mut q = p;
            let n = leb(b, &mut q)?;
            for _ in 0..n {
                let module = name(b, &mut q)?;
                let field = name(b, &mut q)?;
                let kind = *b.get(q).context("eof")?;
                q += 1;
                match kind {
                    0 => {
                        leb(b, &mut q)?;
                    }
                    1 => {
                        q += 1;
                        limits(b, &mut q)?;
                    }
                    2 => limits(b, &mut q)?,
                    3 => q += 2,
                    4 => {
                        q += 1;
                        leb(b, &mut q)?;
                    }
                    k => bail!("unknown import kind {k}"),
                }
                out.push((module, field));
            }
        }
        p = end;
    }
    Ok(out)
}

fn leb(b: &[u8], p: &mut usize) -> Result<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let x = *b.get(*p).context("eof in leb128")?;
        *p += 1;
        v |= ((x & 0x7f) as u64) << (7 * i);
        if x & 0x80 == 0 {
            return Ok(v);
        }
    }
    bail!("leb128 too long")
}

fn name(b: &[u8], p: &mut usize) -> Result<String> {
    let n = leb(b, p)? as usize;
    let s = b.get(*p..*p + n).context("eof in name")?;
    *p += n;
    Ok(String::from_utf8_lossy(s).into_owned())
}

fn limits(b: &[u8], p: &mut usize) -> Result<()> {
    let flag = *b.get(*p).context("eof")?;
    *p += 1;
    leb(b, p)?;
    if flag & 1 == 1 {
        leb(b, p)?;
    }
    Ok(())
}

/// The fuzz targets (`fuzz/fuzz_targets/`), each given every file of `tests/crashers/` as seeds.
const FUZZ_TARGETS: [&str; 6] = [
    "decode_batch",
    "frames",
    "apply",
    "snapshot",
    "credential",
    "sketch",
];

/// Runs every fuzz target for `secs` seconds (libFuzzer with AddressSanitizer, through
/// cargo-fuzz; `RUSTC_BOOTSTRAP=1` lets the stable toolchain take the sanitizer flags). The
/// corpus grows under the target directory from run to run; a crash is copied into
/// `tests/crashers/` (where a test keeps it an error from then on) and fails the run.
fn fuzz(root: &Path, secs: u64) -> Result<()> {
    let have = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have && run(cargo().args(["install", "cargo-fuzz", "--locked"])).is_err() {
        run(cargo().args(["install", "cargo-fuzz"]))?;
    }
    let seeds = root.join("tests").join("crashers");
    let work = target_dir(root).join("fuzz-work");
    for t in FUZZ_TARGETS {
        let corpus = work.join("corpus").join(t);
        let artifacts = work.join("artifacts").join(t);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        let result = run(cargo()
            .current_dir(root.join("fuzz"))
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", t])
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg(format!("-artifact_prefix={}/", artifacts.display())));
        if let Err(e) = result {
            let mut kept = Vec::new();
            for f in std::fs::read_dir(&artifacts)?.flatten() {
                let name = format!("{t}-{}.bin", f.file_name().to_string_lossy());
                std::fs::copy(f.path(), seeds.join(&name))?;
                kept.push(name);
            }
            bail!("fuzz target {t} failed ({e}); inputs kept in tests/crashers/: {kept:?}");
        }
    }
    Ok(())
}
