//! `edgetally send`: feeds JSON or NDJSON events through the native SDK (the sans-IO producer
//! over QUIC), with `--map` for other shapes.

use anyhow::{bail, Context, Result};
use edgetally_net::{Endpoint, NativeProducer};
use edgetally_proto::ProducerConfig;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct SendArgs {
    /// A merger's QUIC address (repeatable; producers fail over in rendezvous order).
    #[arg(long = "endpoint", required = true)]
    endpoints: Vec<SocketAddr>,
    /// The SHA-256 of each endpoint's certificate, as `serve` prints it (one for all, or one
    /// per --endpoint in the same order).
    #[arg(long = "cert-sha256", required = true)]
    certs: Vec<String>,
    /// Input file (JSON array or NDJSON); `-` or absent reads stdin.
    #[arg(long)]
    input: Option<PathBuf>,
    /// How to read events: `default` ({ts_ms, category, entity?, value?}), `iot`
    /// ({device_id, timestamp (s), metric_name, metric_value}), `activity` ({user_id,
    /// event_type, timestamp (s), attributes.value}), or fields:
    /// `category=FIELD,entity=FIELD,ts=FIELD[:s|:ms],value=FIELD` (dots reach into objects).
    #[arg(long, default_value = "default")]
    map: String,
    /// Keep the producer's key, epoch/seq and outbox here, so a rerun resends what was never
    /// acknowledged instead of losing it.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Bucket width, ms.
    #[arg(long, default_value_t = 1000)]
    bucket_ms: u32,
    /// An enrolment credential (hex, from `edgetally enroll`) for mergers whose policy is
    /// "enrolled"; issue it for the producer key this command prints (use --state-dir to keep
    /// the key from run to run).
    #[arg(long)]
    credential: Option<String>,
    /// A shard-group cluster's topology — a merger's HTTP address (`http://host:port`, read
    /// from its `GET /v1/topology`) or the topology file the mergers read — so each batch goes
    /// straight to its owner group (list every group's nodes as --endpoint); without it any
    /// merger forwards batches to their group.
    #[arg(long)]
    topology: Option<String>,
    /// Give up waiting for acknowledgements after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
}

/// Where each field of an event comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapping {
    category: String,
    entity: Option<String>,
    ts: String,
    ts_seconds: bool,
    value: Option<String>,
}

impl Mapping {
    pub fn parse(spec: &str) -> Result<Mapping> {
        let m = |c: &str, e: Option<&str>, t: &str, s: bool, v: Option<&str>| Mapping {
            category: c.into(),
            entity: e.map(Into::into),
            ts: t.into(),
            ts_seconds: s,
            value: v.map(Into::into),
        };
        Ok(match spec {
            "default" => m("category", Some("entity"), "ts_ms", false, Some("value")),
            "iot" => m(
                "metric_name",
                Some("device_id"),
                "timestamp",
                true,
                Some("metric_value"),
            ),
            "activity" => m(
                "event_type",
                Some("user_id"),
                "timestamp",
                true,
                Some("attributes.value"),
            ),
            custom => {
                let mut map = m("category", None, "ts_ms", false, None);
                for part in custom.split(',') {
                    let (k, v) = part
                        .split_once('=')
                        .with_context(|| format!("--map: expected key=field in {part:?}"))?;
                    match k.trim() {
                        "category" => map.category = v.trim().into(),
                        "entity" => map.entity = Some(v.trim().into()),
                        "value" => map.value = Some(v.trim().into()),
                        "ts" => {
                            let (field, unit) =
                                v.trim().split_once(':').unwrap_or((v.trim(), "ms"));
                            map.ts = field.into();
                            map.ts_seconds = match unit {
                                "s" => true,
                                "ms" => false,
                                u => bail!("--map: time unit must be s or ms, not {u:?}"),
                            };
                        }
                        other => {
                            bail!("--map: unknown key {other:?} (category, entity, ts, value)")
                        }
                    }
                }
                map
            }
        })
    }
}

fn field<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

/// One event read from the input: Ok((ts_ms, category, entity, value, value_was_non_numeric)).
pub type Parsed = (i64, String, Option<String>, f64, bool);

/// Reads one event with the mapping; a reason on failure.
pub fn parse_event(v: &Value, m: &Mapping) -> Result<Parsed, String> {
    let category = match field(v, &m.category) {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(format!("{} is not a string", m.category)),
        None => return Err(format!("{} is missing", m.category)),
    };
    let entity = match m.entity.as_deref().and_then(|f| field(v, f)) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err("entity is not a string".into()),
    };
    let ts = match field(v, &m.ts) {
        Some(Value::Number(n)) if m.ts_seconds => n
            .as_f64()
            .map(|s| (s * 1000.0).round() as i64)
            .ok_or("bad timestamp")?,
        Some(Value::Number(n)) => n.as_i64().ok_or("ts_ms must be an integer")?,
        Some(_) => return Err(format!("{} is not a number", m.ts)),
        None => return Err(format!("{} is missing", m.ts)),
    };
    let (value, non_numeric) = match m.value.as_deref().and_then(|f| field(v, f)) {
        None | Some(Value::Null) => (1.0, false),
        Some(Value::Number(n)) => (n.as_f64().ok_or("value is not finite")?, false),
        // SPEC: a non-numeric value is counted as an event with no value, and reported.
        Some(_) => (1.0, true),
    };
    Ok((ts, category, entity, value, non_numeric))
}

/// A topology from a merger (`http://…`: its `GET /v1/topology`) or a file.
fn load_topology(from: &str) -> Result<edgetally_proto::topology::Topology> {
    if from.starts_with("http://") || from.starts_with("https://") {
        let url = format!("{}/v1/topology", from.trim_end_matches('/'));
        let text = ureq::get(&url)
            .call()
            .with_context(|| format!("--topology: GET {url}"))?
            .body_mut()
            .read_to_string()?;
        return serde_json::from_str(&text)
            .with_context(|| format!("--topology: {url} answered {text}"));
    }
    edgetally_merger::cluster::load(std::path::Path::new(from))
        .map_err(|e| anyhow::anyhow!("--topology {from}: {e}"))
}

pub fn run(a: SendArgs) -> Result<()> {
    let map = Mapping::parse(&a.map)?;
    let certs: Vec<[u8; 32]> = a
        .certs
        .iter()
        .map(|c| {
            edgetally_net::tls::parse_hash(c)
                .with_context(|| format!("--cert-sha256 {c:?} is not 64 hex digits"))
        })
        .collect::<Result<_>>()?;
    if certs.len() != 1 && certs.len() != a.endpoints.len() {
        bail!("give one --cert-sha256 for all endpoints or one per --endpoint");
    }
    let endpoints: Vec<Endpoint> = a
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, addr)| Endpoint {
            addr: *addr,
            cert: certs[i.min(certs.len() - 1)],
        })
        .collect();
    let topology = a.topology.as_deref().map(load_topology).transpose()?;
    let mut text = String::new();
    match &a.input {
        Some(p) if p.as_os_str() != "-" => {
            text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        _ => {
            std::io::stdin().read_to_string(&mut text)?;
        }
    }
    let items: Vec<Result<Value, String>> = if text.trim_start().starts_with('[') {
        serde_json::from_str::<Vec<Value>>(text.trim_start())
            .context("the input is not a JSON array")?
            .into_iter()
            .map(Ok)
            .collect()
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| format!("not JSON: {e}")))
            .collect()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let config = ProducerConfig { bucket_ms: a.bucket_ms, ..ProducerConfig::default() };
        let p = NativeProducer::start(config, endpoints, a.state_dir.as_deref())?;
        if let Some(t) = topology {
            p.set_topology(Some(t));
        }
        eprintln!("producer key: {}", p.producer_key().to_hex());
        if let Some(c) = &a.credential {
            let bytes = edgetally_net::tls::unhex(c).context("--credential: not hex")?;
            p.set_credential(bytes);
        }
        let (mut invalid, mut non_numeric) = (BTreeMap::<String, u64>::new(), 0u64);
        let tty = std::io::stderr().is_terminal();
        for (i, item) in items.iter().enumerate() {
            let parsed = item.as_ref().map_err(Clone::clone).and_then(|v| parse_event(v, &map));
            match parsed.and_then(|(ts, c, e, v, nn)| p.record(&c, e.as_deref(), v, Some(ts)).map(|()| nn).map_err(|code| code.as_str().to_string())) {
                Ok(nn) => non_numeric += nn as u64,
                Err(reason) => {
                    if invalid.values().sum::<u64>() < 20 {
                        eprintln!("event #{i}: {reason}");
                    }
                    *invalid.entry(reason).or_default() += 1;
                }
            }
            if tty && i % 10_000 == 0 {
                let s = p.stats();
                eprint!("\rrecorded {} / {}, acked {} records", s.recorded, items.len(), s.acked_records);
                let _ = std::io::stderr().flush();
            }
        }
        let flushed = p.flush(Duration::from_secs(a.timeout_secs)).await;
        if tty {
            eprintln!();
        }
        let s = p.stats();
        p.close();
        println!(
            "events: {} read, {} recorded ({} with a non-numeric value counted as events), {} invalid",
            items.len(),
            s.recorded,
            non_numeric,
            invalid.values().sum::<u64>()
        );
        println!(
            "batches: {} acked ({} records), {} rejected, {} dropped, {} retries, {} bytes sent",
            s.acked,
            s.acked_records,
            s.rejected.total(),
            s.dropped,
            s.retried,
            s.bytes_sent
        );
        for (reason, n) in s.rejected.iter() {
            println!("  rejected {reason}: {n}");
        }
        if !flushed {
            bail!("not everything was acknowledged within {} s ({} batches still queued; they are kept in --state-dir if given)", a.timeout_secs, s.queued + s.in_flight);
        }
        if !s.rejected.is_empty() || s.dropped > 0 {
            bail!("some batches were rejected or dropped");
        }
        anyhow::Ok(())
    })
}
