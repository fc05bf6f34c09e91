//! `deploy/`: the systemd unit passes `systemd-analyze verify` (where systemd is installed),
//! and the settings the unit and the container image give the binary are settings it knows:
//! started with exactly them (addresses moved to loopback ephemeral ports), it warns about
//! nothing and becomes ready.

use crate::harness::{agent, binary, free_udp, TempDir};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

/// Starts `edgetally` with `args` and `env` (plus loopback addresses by flag), waits for
/// `/readyz` to answer 200, stops it, and returns its stderr.
fn ready_with(dir: &Path, args: &[String], env: &[(String, String)]) -> String {
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let quic = free_udp();
    let log = dir.join("stderr.log");
    let mut child = Command::new(binary())
        .args(args)
        .args([
            "--http-addr",
            &http.to_string(),
            "--quic-addr",
            &quic.to_string(),
        ])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start");
    let url = format!("http://{http}/readyz");
    let until = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let status = agent().get(&url).call().map(|r| r.status().as_u16());
        if status.as_ref().is_ok_and(|s| *s == 200) || Instant::now() > until {
            break status.ok();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(ready, Some(200), "{stderr}");
    stderr
}

#[test]
fn the_systemd_unit_verifies_and_its_settings_are_known() {
    let unit = std::fs::read_to_string(deploy("edgetally.service")).expect("unit");
    let dir = TempDir::new("deploy-unit");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let mut words = exec.split_whitespace();
    let program = words.next().expect("program");
    assert_eq!(program, "/usr/local/bin/edgetally");
    // The config file the unit names is the example in deploy/.
    let mut args: Vec<String> = words.map(String::from).collect();
    let at = args.iter().position(|a| a == "--config").expect("--config") + 1;
    assert_eq!(args[at], "/etc/edgetally/edgetally.toml");
    args[at] = deploy("edgetally.toml").display().to_string();
    let mut env: Vec<(String, String)> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // The state directory stands in for /var/lib/edgetally.
    for (k, v) in &mut env {
        if k == "EDGETALLY_DATA_DIR" {
            *v = dir.0.join("state").display().to_string();
        }
    }
    let stderr = ready_with(&dir.0, &args, &env);
    assert!(!stderr.contains("WARN"), "{stderr}");
    // JSON logs, as the unit asks.
    let first = stderr.lines().next().unwrap_or("");
    assert!(
        serde_json::from_str::<serde_json::Value>(first).is_ok_and(|v| v["level"].is_string()),
        "{stderr}"
    );
    assert!(dir.0.join("state").join("edgetally.redb").exists());

    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => {
            eprintln!("systemd-analyze is not installed: unit not verified");
            return;
        }
    }
    // verify wants the executable to exist: point it at the binary under test.
    let copy = dir.0.join("edgetally.service");
    std::fs::write(
        &copy,
        unit.replace(program, &binary().display().to_string()),
    )
    .expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze");
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "{complaints}"
    );
}

#[test]
fn the_container_image_settings_are_known() {
    let file = std::fs::read_to_string(deploy("Dockerfile")).expect("Dockerfile");
    // The runtime stage's ENV (one instruction, continued over lines) and CMD.
    let runtime = file.rsplit("\nFROM ").next().expect("stage");
    let joined = runtime.replace("\\\n", " ");
    let env_line = joined
        .lines()
        .find_map(|l| l.strip_prefix("ENV "))
        .expect("ENV");
    let mut env: Vec<(String, String)> = env_line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let exposed: Vec<&str> = joined
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .expect("EXPOSE")
        .split_whitespace()
        .collect();
    let port = |key: &str| {
        env.iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.rsplit(':').next())
            .expect(key)
            .to_string()
    };
    assert_eq!(
        exposed,
        [
            format!("{}/tcp", port("EDGETALLY_HTTP_ADDR")),
            format!("{}/udp", port("EDGETALLY_QUIC_ADDR"))
        ]
    );
    let cmd: Vec<String> = joined
        .lines()
        .find_map(|l| l.strip_prefix("CMD "))
        .and_then(|c| serde_json::from_str(c).ok())
        .expect("CMD as a JSON array");
    let dir = TempDir::new("deploy-image");
    for (k, v) in &mut env {
        if k == "EDGETALLY_DATA_DIR" {
            *v = dir.0.join("data").display().to_string();
        }
    }
    let stderr = ready_with(&dir.0, &cmd, &env);
    assert!(!stderr.contains("WARN"), "{stderr}");
    assert!(dir.0.join("data").join("edgetally.redb").exists());
}
