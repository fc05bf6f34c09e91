//! `edgetally send`: feeds JSON or NDJSON events through the native SDK (the sans-IO producer
//! over QUIC), with `--map` for other shapes.

use anyhow::{bail, Context, Result};
use edgetally_core::RejectCode;
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
    /// A merger's QUIC address, ip:port or host:port (repeatable; producers fail over in
    /// rendezvous order).
    #[arg(long = "endpoint", required = true, value_parser = crate::args::addr)]
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
    /// Give up waiting for acknowledgements after this many seconds. A run whose endpoints
    /// all fail to connect (wrong certificate, nothing listening, refused) stops sooner,
    /// naming each endpoint's cause.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Exit 0 even if some events were invalid (they are still counted and listed).
    #[arg(long)]
    allow_invalid: bool,
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

/// One event read from the input: (ts_ms, category, entity, value).
pub type Parsed = (i64, String, Option<String>, f64);

/// What a JSON value is, for messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads one event with the mapping; on failure, its reason code and a message. The rules
/// are `POST /v1/events`'s: a missing value counts the event (1.0), any value that is not a
/// number is refused (SPEC §2: rejected with a reason, never coerced).
pub fn parse_event(v: &Value, m: &Mapping) -> Result<Parsed, (RejectCode, String)> {
    use RejectCode::*;
    let category = match field(v, &m.category) {
        Some(Value::String(s)) => s.clone(),
        Some(o) => {
            return Err((
                InvalidCategory,
                format!("{} is {}, not a string", m.category, kind(o)),
            ))
        }
        None => return Err((InvalidEvent, format!("{} is missing", m.category))),
    };
    let entity = match m.entity.as_deref().map(|f| (f, field(v, f))) {
        None | Some((_, None | Some(Value::Null))) => None,
        Some((_, Some(Value::String(s)))) => Some(s.clone()),
        Some((_, Some(Value::Number(n)))) => Some(n.to_string()),
        Some((f, Some(o))) => {
            return Err((InvalidEntity, format!("{f} is {}, not a string", kind(o))))
        }
    };
    let ts = match field(v, &m.ts) {
        Some(Value::Number(n)) if m.ts_seconds => n
            .as_f64()
            .map(|s| (s * 1000.0).round())
            .filter(|ms| ms.abs() < 9.0e15)
            .map(|ms| ms as i64)
            .ok_or((InvalidTimestamp, format!("{} is out of range", m.ts)))?,
        Some(Value::Number(n)) => n.as_i64().ok_or((
            InvalidTimestamp,
            format!("{} must be an integer number of milliseconds", m.ts),
        ))?,
        Some(o) => {
            return Err((
                InvalidTimestamp,
                format!("{} is {}, not a number", m.ts, kind(o)),
            ))
        }
        None => return Err((InvalidEvent, format!("{} is missing", m.ts))),
    };
    let value = match m.value.as_deref().map(|f| (f, field(v, f))) {
        None | Some((_, None)) => 1.0,
        Some((_, Some(Value::Number(n)))) => n.as_f64().unwrap_or(f64::NAN),
        Some((f, Some(o))) => {
            return Err((InvalidValue, format!("{f} is {}, not a number", kind(o))))
        }
    };
    Ok((ts, category, entity, value))
}

/// Why no endpoint could be reached, once every endpoint has failed without ever connecting
/// (a wrong certificate hash, nothing listening, a refusal); `None` while any may still work.
fn unreachable(links: &[edgetally_net::LinkStatus]) -> Option<String> {
    use edgetally_net::LinkError::{CertificateMismatch, Refused, Unreachable};
    // Only failures to connect count: a stream that failed on an open connection (a slow
    // reply) is a merger that is there, and is waited for until --timeout-secs.
    let connect_failed = |l: &edgetally_net::LinkStatus| {
        !l.connected
            && matches!(
                l.last_error,
                Some(CertificateMismatch { .. } | Unreachable(_) | Refused(_))
            )
    };
    if !links.iter().all(connect_failed) {
        return None;
    }
    let lines: Vec<String> = links
        .iter()
        .filter_map(|l| {
            let e = l.last_error.as_ref()?;
            let hint = match e {
                edgetally_net::LinkError::CertificateMismatch { .. } => {
                    " — --cert-sha256 must be the hash the merger prints at start-up (also in its GET /v1/status)"
                }
                _ => "",
            };
            Some(format!("  {}: {e}{hint}", l.addr))
        })
        .collect();
    Some(lines.join("\n"))
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

/// One input item: an event's JSON, or why its line is not JSON.
type Item = Result<Value, String>;

/// Reads the input on a thread of its own and hands its events over as they come: a JSON
/// array (the input's first non-blank byte is `[`) is read whole, anything else as NDJSON,
/// line by line, so a stream that stays open is recorded as it is written. A UTF-8 byte-order
/// mark and CR or CRLF line ends are accepted, as `POST /v1/events` accepts them.
fn read_events(
    mut input: Box<dyn std::io::BufRead + Send>,
) -> tokio::sync::mpsc::Receiver<Result<Item>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Item>>(1024);
    std::thread::spawn(move || {
        let first = (|| -> std::io::Result<Option<u8>> {
            loop {
                let buf = input.fill_buf()?;
                let Some(&b) = buf.first() else {
                    return Ok(None);
                };
                let bom = buf.starts_with(&[0xef, 0xbb, 0xbf]);
                if bom || b.is_ascii_whitespace() {
                    input.consume(if bom { 3 } else { 1 });
                    continue;
                }
                return Ok(Some(b));
            }
        })();
        let send = |item| tx.blocking_send(item).is_ok();
        match first {
            Err(e) => {
                send(Err(anyhow::Error::new(e).context("reading the input")));
            }
            Ok(None) => {}
            Ok(Some(b'[')) => {
                let mut text = String::new();
                let parsed = input
                    .read_to_string(&mut text)
                    .context("reading the input")
                    .and_then(|_| {
                        serde_json::from_str::<Vec<Value>>(&text)
                            .context("the input is not a JSON array")
                    });
                match parsed {
                    Ok(events) => {
                        for v in events {
                            if !send(Ok(Ok(v))) {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        send(Err(e));
                    }
                }
            }
            Ok(Some(_)) => {
                let (mut line, mut after_cr) = (Vec::new(), false);
                loop {
                    line.clear();
                    match read_line(&mut input, &mut line, &mut after_cr) {
                        Err(e) => {
                            send(Err(anyhow::Error::new(e).context("reading the input")));
                            return;
                        }
                        Ok(0) => return,
                        Ok(_) => {}
                    }
                    let Ok(text) = std::str::from_utf8(&line) else {
                        if !send(Ok(Err("line is not UTF-8".into()))) {
                            return;
                        }
                        continue;
                    };
                    if text.trim().is_empty() {
                        continue;
                    }
                    let item = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"));
                    if !send(Ok(item)) {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Reads one line ended by LF, CR or CRLF (or the input's end) into `line`, without its end;
/// the number of bytes consumed, 0 at the end of the input. `after_cr` carries whether the
/// last line ended in CR, so the LF of a CRLF is skipped when it comes — without waiting for
/// the byte after a CR, which on a live stream may be long in coming.
fn read_line(
    input: &mut dyn std::io::BufRead,
    line: &mut Vec<u8>,
    after_cr: &mut bool,
) -> std::io::Result<usize> {
    let mut consumed = 0;
    loop {
        let buf = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(consumed);
        }
        if std::mem::take(after_cr) && buf[0] == b'\n' {
            input.consume(1);
            consumed += 1;
            continue;
        }
        if let Some(i) = buf.iter().position(|&b| b == b'\n' || b == b'\r') {
            line.extend_from_slice(&buf[..i]);
            *after_cr = buf[i] == b'\r';
            input.consume(i + 1);
            return Ok(consumed + i + 1);
        }
        let n = buf.len();
        line.extend_from_slice(buf);
        input.consume(n);
        consumed += n;
    }
}

// Long by design: `edgetally send` in order (input, producer, records, flush with its deadline,
// the report).
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
    let input: Box<dyn std::io::BufRead + Send> = match &a.input {
        Some(p) if p.as_os_str() != "-" => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("reading {}", p.display()))?,
        )),
        _ => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let config = ProducerConfig {
            bucket_ms: a.bucket_ms,
            ..ProducerConfig::default()
        };
        let p = NativeProducer::start(config, endpoints, a.state_dir.as_deref())?;
        if let Some(t) = topology {
            p.set_topology(Some(t));
        }
        eprintln!("producer key: {}", p.producer_key().to_hex());
        if let Some(c) = &a.credential {
            let bytes = edgetally_net::tls::unhex(c).context("--credential: not hex")?;
            p.set_credential(bytes);
        }
        let mut invalid = BTreeMap::<&'static str, u64>::new();
        let tty = std::io::stderr().is_terminal();
        // Events are recorded as they are read: a stream that stays open (`tail -f | send`)
        // is delivered live, each batch within the flush interval, not when the input ends.
        let mut items = read_events(input);
        let mut read = 0usize;
        while let Some(item) = items.recv().await {
            let i = read;
            read += 1;
            let parsed = item?
                .map_err(|e| (RejectCode::InvalidEvent, e))
                .and_then(|v| parse_event(&v, &map))
                .and_then(|(ts, c, e, v)| {
                    p.record(&c, e.as_deref(), v, Some(ts)).map_err(|code| {
                        (code, edgetally_merger::http::event_reason(code).to_string())
                    })
                });
            if let Err((code, why)) = parsed {
                if invalid.values().sum::<u64>() < 20 {
                    eprintln!("event #{i}: {}: {why}", code.as_str());
                }
                *invalid.entry(code.as_str()).or_default() += 1;
            }
            if tty && i.is_multiple_of(10_000) {
                let s = p.stats();
                eprint!(
                    "\rread {read}, recorded {}, acked {} records",
                    s.recorded, s.acked_records
                );
                let _ = std::io::stderr().flush();
            }
        }
        // Wait for the acks, but stop early, naming the causes, when no endpoint can be
        // reached at all.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(a.timeout_secs);
        let mut flushed = false;
        let mut cause = None;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if p.flush(left.min(Duration::from_millis(250))).await {
                flushed = true;
                break;
            }
            cause = unreachable(&p.links());
            if cause.is_some() || left.is_zero() {
                break;
            }
        }
        if tty {
            eprintln!();
        }
        let s = p.stats();
        p.close();
        let n_invalid = invalid.values().sum::<u64>();
        out!(
            "events: {} read, {} recorded, {} invalid{}",
            read,
            s.recorded,
            n_invalid,
            if invalid.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    invalid
                        .iter()
                        .map(|(k, n)| format!("{k}: {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        out!(
            "batches: {} acked ({} records), {} rejected, {} dropped, {} retries, {} bytes sent",
            s.acked,
            s.acked_records,
            s.rejected.total(),
            s.dropped,
            s.retried,
            s.bytes_sent
        );
        for (reason, n) in s.rejected.iter() {
            out!("  rejected {reason}: {n}");
        }
        let kept = if a.state_dir.is_some() {
            "they are kept in --state-dir and resent by the next run"
        } else {
            "without --state-dir they are lost"
        };
        if let Some(cause) = cause {
            bail!(
                "no merger could be reached ({} batches not sent; {kept}):\n{cause}",
                s.queued + s.in_flight
            );
        }
        if !flushed {
            let links: Vec<String> = p
                .links()
                .iter()
                .filter_map(|l| Some(format!("\n  {}: {}", l.addr, l.last_error.as_ref()?)))
                .collect();
            bail!(
                "not everything was acknowledged within {} s ({} batches still queued; {kept}){}",
                a.timeout_secs,
                s.queued + s.in_flight,
                links.concat()
            );
        }
        if !s.rejected.is_empty() || s.dropped > 0 {
            bail!("some batches were rejected or dropped");
        }
        if n_invalid > 0 && !a.allow_invalid {
            bail!(
                "{n_invalid} of {} events were invalid and not sent (every valid one was \
                 acknowledged); --allow-invalid exits 0 regardless",
                read
            );
        }
        anyhow::Ok(())
    })
}
