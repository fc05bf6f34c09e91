//! `cargo xtask`: the project's build and test entry points.
//!
//! - `cargo xtask test`  — everything CI checks: toolchain prerequisites, formatting, clippy with
//!   warnings denied, the wasm32 build of the pure crates with its import check, and all tests.
//! - `cargo xtask wasm-check` — only the wasm32 build and import check.
//! - `cargo xtask bench [core|wire|figures]` — the benchmarks (not run by `test`).

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
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
        Some("bench") => bench(args.get(1).map(String::as_str).unwrap_or("all")),
        Some("demo") => demo(&root, &args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <test|wasm-check|bench [core|wire|figures]>");
            std::process::exit(2)
        }
    }
}

fn root() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(dir.parent().context("xtask has a parent")?.to_path_buf())
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
    let (passed, failed) = run_tests(cargo().args(["test", "--workspace", "--locked"]))?;
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

/// Builds the binary and runs `edgetally demo` (which starts and stops its own merger).
fn demo(root: &Path, rest: &[String]) -> Result<()> {
    run(cargo().args(["build", "-p", "edgetally", "--bin", "edgetally"]))?;
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    run(Command::new(target_dir.join("debug").join("edgetally"))
        .arg("demo")
        .args(rest))
}

/// The merger benchmark needs redis-server (Debian's package) and a release build.
fn bench_merger(root: &Path) -> Result<()> {
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get").args(["install", "-y", "redis-server"]))?;
    }
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "edgetally",
        "--bin",
        "edgetally",
    ]))?;
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    run(Command::new(target_dir.join("release").join("edgetally")).arg("loadgen"))
}

fn bench(which: &str) -> Result<()> {
    if which == "merger" {
        return bench_merger(&root()?);
    }
    let benches: &[(&str, &str)] = &[
        ("core", "edgetally-core"),
        ("figures", "edgetally-core"),
        ("wire", "edgetally-proto"),
    ];
    let mut ran = false;
    for (name, pkg) in benches {
        if which == "all" || which == *name {
            run(cargo().args(["bench", "-p", pkg, "--bench", name]))?;
            ran = true;
        }
    }
    if !ran {
        bail!("unknown benchmark {which}");
    }
    Ok(())
}

/// The `[abi-check]` section of `wasm-pack.toml`.
struct WasmSpec {
    target: String,
    crates: Vec<String>,
    features: Vec<String>,
    forbidden: Vec<String>,
}

impl WasmSpec {
    fn load() -> Result<WasmSpec> {
        let text = std::fs::read_to_string(root()?.join("wasm-pack.toml"))
            .context("reading wasm-pack.toml")?;
        let t = parse_simple_toml(&text)?;
        let get = |k: &str| {
            t.get(&format!("abi-check.{k}"))
                .cloned()
                .with_context(|| format!("wasm-pack.toml lacks abi-check.{k}"))
        };
        Ok(WasmSpec {
            target: get("target")?.into_iter().next().context("target")?,
            crates: get("crates")?,
            features: get("features")?,
            forbidden: get("forbidden-import-modules")?,
        })
    }
}

/// Reads the subset of TOML our build spec uses: `[section]`, `key = "s"`, `key = ["a", "b"]`.
/// (A full TOML parser would be the only reason for the xtask to pull in a dependency tree.)
fn parse_simple_toml(text: &str) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out = BTreeMap::new();
    let mut section = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.trim().to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .with_context(|| format!("wasm-pack.toml:{}: expected key = value", n + 1))?;
        let v = v.trim();
        let items: Vec<String> = match v.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            Some(list) => list
                .split(',')
                .map(|s| s.trim().trim_matches('"').to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            None => vec![v.trim_matches('"').to_string()],
        };
        out.insert(format!("{section}.{}", k.trim()), items);
    }
    Ok(out)
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
        let target_dir =
            std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
        let file = target_dir
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
