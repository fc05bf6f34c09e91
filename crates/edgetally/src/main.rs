//! `edgetally`: serve, query, keygen.

/// `println!` for results: a closed stdout (`edgetally query … | head`) ends the process
/// quietly instead of panicking.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($t)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

mod args;
mod query;
mod send;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use edgetally_merger::Config;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "edgetally",
    version,
    about = "Edge aggregation: merger nodes and tools"
)]
struct Cli {
    /// Log format on stderr: `text` for people, `json` (one object per line) for collectors.
    #[arg(long, global = true, env = "EDGETALLY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a merger node. With no options it runs on embedded defaults: ./edgetally-data,
    /// HTTP on 127.0.0.1:7070, QUIC on 127.0.0.1:7071, a generated key and certificate.
    Serve(ServeArgs),
    /// Feed JSON/NDJSON events through the native SDK to mergers over QUIC.
    Send(send::SendArgs),
    /// Ask a node a question (a table by default, --json for scripts).
    Query(query::QueryArgs),
    /// Check a stopped node's data directory: the snapshot's checksum, every log record, the
    /// group sequence and every stored batch's signature; damage is named by file and offset.
    /// Exits 1 if acknowledged data is damaged or missing. With --repair, salvages every
    /// intact batch and the snapshot into a fresh directory (the original is not changed).
    Check {
        /// The data directory to check (the node must be stopped).
        #[arg(long, default_value = "edgetally-data")]
        data_dir: PathBuf,
        /// Write what can be salvaged into this fresh directory.
        #[arg(long, value_name = "OUT")]
        repair: Option<PathBuf>,
    },
    /// Issue an enrolment credential (for mergers whose producer_policy is "enrolled"): the
    /// issuer key (made with `keygen`; its public key goes in the mergers' issuer_keys)
    /// vouches for one producer key until the deadline. Prints the credential in hex.
    Enroll {
        /// The issuer's secret seed file (as `keygen` writes it).
        #[arg(long)]
        issuer_key: PathBuf,
        /// The producer's public key (64 hex digits).
        #[arg(long)]
        producer: String,
        /// How long the credential is valid, seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
    },
    /// Generate an ed25519 key: writes the secret seed (hex) to --out and prints the public key.
    Keygen {
        /// Where to write the secret seed (refuses to overwrite).
        #[arg(long, default_value = "edgetally.key")]
        out: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// TOML configuration file (overridden by EDGETALLY_* variables, then by flags).
    #[arg(long, env = "EDGETALLY_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP API address (ip:port or host:port).
    #[arg(long, value_parser = args::addr_text)]
    http_addr: Option<String>,
    /// QUIC address (batches, WebTransport, peers; ip:port or host:port).
    #[arg(long, value_parser = args::addr_text)]
    quic_addr: Option<String>,
    /// Certificate chain (PEM) replacing the generated one; needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A peer merger's QUIC address, ip:port or host:port (repeatable).
    #[arg(long = "peer", value_parser = args::addr_text)]
    peers: Vec<String>,
    /// Shard-group topology file (TOML; re-read when it changes and on SIGHUP); needs --group.
    #[arg(long, requires = "group")]
    topology: Option<PathBuf>,
    /// This node's group in the --topology file.
    #[arg(long, requires = "topology")]
    group: Option<String>,
}

fn init_logging(format: &str) {
    let filter: tracing_subscriber::filter::Targets = std::env::var("EDGETALLY_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
        });
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    if format == "json" {
        registry
            .with(layer.json().flatten_event(true).with_current_span(false))
            .init();
    } else {
        registry
            .with(layer.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
            .init();
    }
}

fn config(args: &ServeArgs) -> Result<Config> {
    let mut c = Config::default();
    if let Some(path) = &args.config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        c.apply_toml(&text)?;
    }
    for warning in c.apply_env(std::env::vars())? {
        tracing::warn!("{warning}");
    }
    // Flags last, read as settings are (one definition each: the settings table).
    let text = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let flags = [
        ("data_dir", text(&args.data_dir)),
        ("http_addr", args.http_addr.clone()),
        ("quic_addr", args.quic_addr.clone()),
        ("tls_cert", text(&args.tls_cert)),
        ("tls_key", text(&args.tls_key)),
        (
            "peers",
            (!args.peers.is_empty()).then(|| args.peers.join(",")),
        ),
        ("topology_file", text(&args.topology)),
        ("group", args.group.clone()),
    ];
    c.apply_flags(flags.into_iter().filter_map(|(k, v)| Some((k, v?))))?;
    Ok(c)
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line, no backtrace: these are users' errors to read.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

// Long by design: the CLI's dispatch, one arm per subcommand.
fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Serve(args) => {
            init_logging(&cli.log_format);
            let cfg = config(&args)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let signals = edgetally_merger::start::Signals::install();
                let running = edgetally_merger::Node::start(cfg).await?;
                running.run_until_signal(signals).await;
                anyhow::Ok(())
            })
        }
        Cmd::Query(q) => query::run(q),
        Cmd::Send(a) => {
            init_logging(&cli.log_format);
            send::run(a)
        }
        Cmd::Check { data_dir, repair } => {
            init_logging(&cli.log_format);
            match repair {
                None => {
                    let report = edgetally_merger::check::check(&data_dir)?;
                    println!("{report}");
                    if report.lost_data() {
                        std::process::exit(1);
                    }
                }
                Some(out) => {
                    let r = edgetally_merger::check::repair(&data_dir, &out)?;
                    println!("{}", r.report);
                    println!(
                        "repaired into {}: {} batch(es){}; start the node with --data-dir {}",
                        out.display(),
                        r.batches,
                        if r.snapshot {
                            " and the snapshot"
                        } else {
                            ", no snapshot"
                        },
                        out.display()
                    );
                }
            }
            Ok(())
        }
        Cmd::Enroll {
            issuer_key,
            producer,
            ttl_secs,
        } => {
            let text = std::fs::read_to_string(&issuer_key)
                .with_context(|| format!("reading {}", issuer_key.display()))?;
            let seed = edgetally_net::tls::parse_hash(text.trim())
                .with_context(|| format!("{}: not 64 hex digits", issuer_key.display()))?;
            let key = edgetally_net::tls::parse_hash(producer.trim())
                .context("--producer: not a producer key (64 hex digits)")?;
            let ttl_ms = i64::try_from(ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
            let not_after = edgetally_net::now_ms().saturating_add(ttl_ms);
            let cred = edgetally_proto::credential::issue(
                &seed,
                &edgetally_core::ProducerKey(key),
                not_after,
            );
            eprintln!(
                "issuer {} admits {} until {} ms",
                edgetally_net::tls::hex(&edgetally_proto::credential::issuer_public(&seed)),
                producer.trim(),
                not_after
            );
            println!("{}", edgetally_net::tls::hex(&cred));
            Ok(())
        }
        Cmd::Keygen { out } => {
            if out.exists() {
                anyhow::bail!("{} exists; not overwriting a key", out.display());
            }
            let seed = edgetally_merger::node::load_or_create_key(&out)?;
            let signer = edgetally_proto::Signer::from_seed(seed);
            println!("public key: {}", signer.producer().to_hex());
            println!("secret seed written to {}", out.display());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every subcommand and every flag of every subcommand says what it is for in `--help`.
    #[test]
    fn every_flag_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() && path.contains(' ') && cmd.get_name() != "help" {
                missing.push(path.clone());
            }
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && !arg.is_positional() {
                    missing.push(format!("{path} --{}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        walk(&cmd, "", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
