//! `edgetally query …`: the HTTP query API from the command line.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;

#[derive(Args, Debug)]
pub struct QueryArgs {
    /// The node's HTTP address: http://host:port, https://host:port, or host:port.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:7070",
        env = "EDGETALLY_NODE",
        value_parser = crate::args::node_url
    )]
    node: String,
    /// A read token, for nodes that require one (sent as `Authorization: Bearer …`).
    #[arg(long, global = true, env = "EDGETALLY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the node's JSON answer instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    kind: Kind,
}

/// A time range `[start, end)`. Times are epoch milliseconds, RFC 3339
/// (`2026-12-06T10:00:00Z`), `now`, `now-1h`, or a duration ago (`15m`).
#[derive(Args, Debug)]
struct Range {
    /// Start of the window, inclusive (default: 1h ago).
    #[arg(long, visible_alias = "since", default_value = "1h", value_parser = crate::args::time_ms)]
    start: i64,
    /// End of the window, exclusive (default: now, plus one second so the current one counts).
    #[arg(long, visible_alias = "until", default_value = "now+1s", value_parser = crate::args::time_ms)]
    end: i64,
}

#[derive(Subcommand, Debug)]
enum Kind {
    /// Count, sum, avg, min, max over [start, end).
    Aggregate {
        /// The category (metric or event name).
        #[arg(long)]
        category: String,
        #[command(flatten)]
        range: Range,
        /// Only this entity's records.
        #[arg(long)]
        entity: Option<String>,
    },
    /// The top k entities or producers by count.
    Topk {
        /// The category (metric or event name).
        #[arg(long)]
        category: String,
        #[command(flatten)]
        range: Range,
        /// How many rows, 1–1000.
        #[arg(long, default_value_t = 10)]
        k: u32,
        /// Rank entities or producers.
        #[arg(long, default_value = "entity", value_parser = ["entity", "producer"])]
        by: String,
    },
    /// The aggregate of the sliding window of the given width ending now.
    Window {
        /// The category (metric or event name).
        #[arg(long)]
        category: String,
        /// The window's width: milliseconds or a duration (60s, 5m, 1h).
        #[arg(long = "width", visible_alias = "width-ms", value_parser = crate::args::duration_ms)]
        width_ms: i64,
        /// Only this entity's records.
        #[arg(long)]
        entity: Option<String>,
    },
    /// Counts and sums grouped by none, category or entity.
    Totals {
        #[command(flatten)]
        range: Range,
        /// One row in all, one per category, or one per entity.
        #[arg(long, default_value = "none", value_parser = ["none", "category", "entity"])]
        group_by: String,
    },
    /// One aggregate per step, for charts.
    Series {
        /// The category (metric or event name).
        #[arg(long)]
        category: String,
        #[command(flatten)]
        range: Range,
        /// The step: milliseconds or a duration (1s, 1m, 1h); at least 1 s.
        #[arg(long = "step", visible_alias = "step-ms", value_parser = crate::args::duration_ms)]
        step_ms: i64,
        /// Only this entity's records.
        #[arg(long)]
        entity: Option<String>,
    },
}

// Long by design: one arm per query kind of `edgetally query`, each building its request and
// printing its answer.
pub fn run(a: QueryArgs) -> Result<()> {
    let s = |x: &str| Some(x.to_string());
    let n = |x: i64| Some(x.to_string());
    let range = |r: &Range| [("start", n(r.start)), ("end", n(r.end))];
    let (path, params): (&str, Vec<(&str, Option<String>)>) = match &a.kind {
        Kind::Aggregate {
            category,
            range: r,
            entity,
        } => (
            "aggregate",
            [("category", s(category)), ("entity", entity.clone())]
                .into_iter()
                .chain(range(r))
                .collect(),
        ),
        Kind::Topk {
            category,
            range: r,
            k,
            by,
        } => (
            "topk",
            [
                ("category", s(category)),
                ("k", n(i64::from(*k))),
                ("by", s(by)),
            ]
            .into_iter()
            .chain(range(r))
            .collect(),
        ),
        Kind::Window {
            category,
            width_ms,
            entity,
        } => (
            "window",
            vec![
                ("category", s(category)),
                ("width_ms", n(*width_ms)),
                ("entity", entity.clone()),
            ],
        ),
        Kind::Totals { range: r, group_by } => (
            "totals",
            [("group_by", s(group_by))]
                .into_iter()
                .chain(range(r))
                .collect(),
        ),
        Kind::Series {
            category,
            range: r,
            step_ms,
            entity,
        } => (
            "series",
            [
                ("category", s(category)),
                ("step_ms", n(*step_ms)),
                ("entity", entity.clone()),
            ]
            .into_iter()
            .chain(range(r))
            .collect(),
        ),
    };
    let url = format!("{}/v1/{path}", a.node);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .build()
        .into();
    let mut req = agent
        .get(&url)
        .query_pairs(params.iter().filter_map(|(k, v)| Some((*k, v.as_deref()?))));
    if let Some(t) = &a.token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let mut res = req.call().map_err(|e| match e {
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            anyhow::anyhow!(
                "{}: connection refused (is a merger running there?)",
                a.node
            )
        }
        e => anyhow::anyhow!("GET {url}: {e}"),
    })?;
    let status = res.status();
    let text = res
        .body_mut()
        .read_to_string()
        .context("reading the answer")?;
    let body: Value = serde_json::from_str(&text)
        .with_context(|| format!("{url} answered HTTP {status} that is not JSON: {text:.200}"))?;
    if !status.is_success() {
        bail!(
            "{} (HTTP {}): {}",
            body["error"].as_str().unwrap_or("error"),
            status.as_u16(),
            body["message"].as_str().unwrap_or("")
        );
    }
    if a.json {
        out!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    print_table(path, &body);
    Ok(())
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:>width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
    };
    out!("{}", line(header.iter().map(|s| s.to_string()).collect()));
    for r in rows {
        out!("{}", line(r));
    }
}

const STATS: [&str; 5] = ["count", "sum", "avg", "min", "max"];

fn print_table(kind: &str, b: &Value) {
    let when = |v: &Value| v.as_i64().map_or_else(|| "-".into(), crate::args::rfc3339);
    if kind == "series" {
        out!(
            "series of {} by {} ms",
            b["category"].as_str().unwrap_or("?"),
            b["step_ms"]
        );
    } else {
        out!(
            "window [{}, {})",
            when(&b["time_window_start"]),
            when(&b["time_window_end"])
        );
    }
    match kind {
        "aggregate" | "window" => table(&STATS, vec![STATS.iter().map(|k| cell(&b[*k])).collect()]),
        "topk" | "totals" => {
            let list = if kind == "topk" {
                &b["items"]
            } else {
                &b["groups"]
            };
            let rows = list
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|r| {
                            std::iter::once(cell(&r["key"]))
                                .chain(STATS.iter().map(|k| cell(&r[*k])))
                                .collect()
                        })
                        .collect()
                })
                .unwrap_or_default();
            table(&["key", "count", "sum", "avg", "min", "max"], rows);
        }
        _ => {
            let rows = b["points"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|r| {
                            std::iter::once(cell(&r["time_window_start"]))
                                .chain(STATS.iter().map(|k| cell(&r[*k])))
                                .collect()
                        })
                        .collect()
                })
                .unwrap_or_default();
            table(&["start", "count", "sum", "avg", "min", "max"], rows);
        }
    }
}
