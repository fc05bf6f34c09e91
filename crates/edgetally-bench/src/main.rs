//! `edgetally-bench`: the demo, the benchmarks and the soak, against real `edgetally serve`
//! processes it starts (the `edgetally` binary beside it, or `EDGETALLY_BIN`).

mod churn;
mod cluster_demo;
mod clusterbench;
mod demo;
mod exportbench;
mod groupbench;
mod jsonbench;
mod loadgen;
mod producers;
mod soak;
mod statusbench;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "edgetally-bench",
    version,
    about = "edgetally's benchmarks and soak, against mergers it starts"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The merger benchmark: push pre-signed batches over QUIC to a merger it starts, then the
    /// same summaries to a redis-server it starts; print throughput, latency, RSS and ratios.
    Loadgen(loadgen::LoadgenArgs),
    /// The cluster benchmark: replication overhead (a single merger vs a three-node cluster),
    /// the time a partitioned node takes to catch up on a backlog, and shard-group scaling.
    Clusterbench(clusterbench::ClusterBenchArgs),
    /// The status benchmark: `/v1/status` latency on a merger holding many producers, and
    /// ingest latency with and without status pollers.
    Statusbench(statusbench::StatusBenchArgs),
    /// A merger under valid load and abusive clients; nothing acknowledged lost; RSS flat.
    Soak(soak::SoakArgs),
    /// Ephemeral producers (a fresh key every couple of batches) against a merger with a short
    /// lateness horizon: seen-sets level off as epochs expire; nothing acknowledged lost.
    Churn(churn::ChurnArgs),
    /// Memory per fresh producer as RSS counts it: one batch from each of N new keys, RSS
    /// and the node's own estimate read after it settles, for two or more N; the slope.
    Producers(producers::ProducersArgs),
    /// `POST /v1/events` against clickhouse-server's pre-aggregating twin (a Null table into
    /// a SummingMergeTree), the same NDJSON bodies from the same clients: events per server
    /// CPU-second.
    Jsonbench(jsonbench::JsonBenchArgs),
    /// Start a merger, feed it IoT and user-activity events (late, out of order and a few
    /// invalid ones), and print every query kind's answer beside an independent expectation
    /// (`cargo xtask demo`).
    Demo {
        /// Start a three-node cluster instead: producers fail over when a node is killed, and
        /// every node's converged totals are printed.
        #[arg(long)]
        cluster: bool,
        /// With --cluster: this many shard groups of two replicas each (one topology file;
        /// producers spread over the groups by the hash of their key). 1: three peered nodes.
        #[arg(long, default_value_t = 1, requires = "cluster", value_parser = clap::value_parser!(u16).range(1..=8))]
        groups: u16,
        /// A Node.js script that records NDJSON events from stdin with the npm package (the
        /// wasm SDK) — `cargo xtask demo` passes examples/node/ingest.mjs. Half the user
        /// activity then goes through it; without it, all of it is posted as JSON.
        #[arg(long, value_name = "FILE")]
        node_script: Option<std::path::PathBuf>,
    },
    /// The PostgreSQL export against a server it starts: rows written after a load, the
    /// rescan after kill -9, and the rows rewritten after a clean stop.
    Exportbench(exportbench::ExportBenchArgs),
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Loadgen(a) => loadgen::run(a),
        Cmd::Clusterbench(a) => clusterbench::run(a),
        Cmd::Statusbench(a) => statusbench::run(a),
        Cmd::Soak(a) => soak::run(a),
        Cmd::Churn(a) => churn::run(a),
        Cmd::Producers(a) => producers::run(a),
        Cmd::Jsonbench(a) => jsonbench::run(a),
        Cmd::Exportbench(a) => exportbench::run(a),
        Cmd::Demo {
            cluster,
            groups,
            node_script,
        } => demo::run(cluster, usize::from(groups), node_script.as_deref()),
    }
}
