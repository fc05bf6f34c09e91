//! `edgetally-bench`: the benchmarks and the soak, against real `edgetally serve` processes
//! it starts (the `edgetally` binary beside it, or `EDGETALLY_BIN`).

mod churn;
mod clusterbench;
mod exportbench;
mod groupbench;
mod loadgen;
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
        Cmd::Exportbench(a) => exportbench::run(a),
    }
}
