//! `edgetally query …`: the HTTP query API from the command line.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;

#[derive(Args, Debug)]
pub struct QueryArgs {
    /// The node's HTTP address.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:7070",
        env = "EDGETALLY_NODE"
    )]
    node: String,
    /// Print the node's JSON answer instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    kind: Kind,
}

#[derive(Subcommand, Debug)]
enum Kind {
    /// Count, sum, avg, min, max over [start, end).
    Aggregate {
        #[arg(long)]
        category: String,
        #[arg(long)]
        start: i64,
        #[arg(long)]
        end: i64,
        #[arg(long)]
        entity: Option<String>,
    },
    /// The top k entities or producers by count.
    Topk {
        #[arg(long)]
        category: String,
        #[arg(long)]
        start: i64,
        #[arg(long)]
        end: i64,
        #[arg(long, default_value_t = 10)]
        k: u32,
        /// entity or producer
        #[arg(long, default_value = "entity")]
        by: String,
    },
    /// The aggregate of the sliding window of width_ms ending now.
    Window {
        #[arg(long)]
        category: String,
        #[arg(long)]
        width_ms: i64,
        #[arg(long)]
        entity: Option<String>,
    },
    /// Counts and sums grouped by none, category or entity.
    Totals {
        #[arg(long)]
        start: i64,
        #[arg(long)]
        end: i64,
        #[arg(long, default_value = "none")]
        group_by: String,
    },
    /// One aggregate per step.
    Series {
        #[arg(long)]
        category: String,
        #[arg(long)]
        start: i64,
        #[arg(long)]
        end: i64,
        #[arg(long)]
        step_ms: i64,
        #[arg(long)]
        entity: Option<String>,
    },
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn qs(pairs: &[(&str, Option<String>)]) -> String {
    pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", enc(v))))
        .collect::<Vec<_>>()
        .join("&")
}

pub fn run(a: QueryArgs) -> Result<()> {
    let s = |x: &str| Some(x.to_string());
    let n = |x: i64| Some(x.to_string());
    let (path, q) = match &a.kind {
        Kind::Aggregate {
            category,
            start,
            end,
            entity,
        } => (
            "aggregate",
            qs(&[
                ("category", s(category)),
                ("start", n(*start)),
                ("end", n(*end)),
                ("entity", entity.clone()),
            ]),
        ),
        Kind::Topk {
            category,
            start,
            end,
            k,
            by,
        } => (
            "topk",
            qs(&[
                ("category", s(category)),
                ("start", n(*start)),
                ("end", n(*end)),
                ("k", n(*k as i64)),
                ("by", s(by)),
            ]),
        ),
        Kind::Window {
            category,
            width_ms,
            entity,
        } => (
            "window",
            qs(&[
                ("category", s(category)),
                ("width_ms", n(*width_ms)),
                ("entity", entity.clone()),
            ]),
        ),
        Kind::Totals {
            start,
            end,
            group_by,
        } => (
            "totals",
            qs(&[
                ("start", n(*start)),
                ("end", n(*end)),
                ("group_by", s(group_by)),
            ]),
        ),
        Kind::Series {
            category,
            start,
            end,
            step_ms,
            entity,
        } => (
            "series",
            qs(&[
                ("category", s(category)),
                ("start", n(*start)),
                ("end", n(*end)),
                ("step_ms", n(*step_ms)),
                ("entity", entity.clone()),
            ]),
        ),
    };
    let url = format!("{}/v1/{path}?{q}", a.node.trim_end_matches('/'));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut res = agent
        .get(&url)
        .call()
        .with_context(|| format!("GET {url}"))?;
    let status = res.status();
    let text = res
        .body_mut()
        .read_to_string()
        .context("reading the answer")?;
    let body: Value = serde_json::from_str(&text).context("the answer is not JSON")?;
    if !status.is_success() {
        bail!(
            "{}: {}",
            body["error"].as_str().unwrap_or("error"),
            body["message"].as_str().unwrap_or("")
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
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
    println!("{}", line(header.iter().map(|s| s.to_string()).collect()));
    for r in rows {
        println!("{}", line(r));
    }
}

const STATS: [&str; 5] = ["count", "sum", "avg", "min", "max"];

fn print_table(kind: &str, b: &Value) {
    println!(
        "window [{}, {})",
        b["time_window_start"], b["time_window_end"]
    );
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
