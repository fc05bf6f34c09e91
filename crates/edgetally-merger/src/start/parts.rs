//! The parts `Node::start` assembles: the replication half, the shard-group layer, the
//! export, the tasks that run for the node's life, and the start-up lines.

use super::*;

/// Spawns what runs for the node's life: the QUIC and HTTP listeners, the peer links, the
/// durability marker, the topology and admission upkeep, and the certificate and snapshot
/// upkeep.
pub(super) fn spawn_tasks(
    node: &Arc<Node>,
    endpoint: &quinn::Endpoint,
    listener: tokio::net::TcpListener,
    peer_endpoint: Option<quinn::Endpoint>,
    id: Identity,
    generated: bool,
    rx: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let quic_addr = node.quic_addr;
    let http_tls = node.http_tls.clone();
    tasks.push(tokio::spawn(edgetally_net::serve(
        endpoint.clone(),
        node.clone(),
        rx.clone(),
    )));
    let app = crate::http::router(node.clone());
    tasks.push(tokio::spawn(crate::serve_http::serve(
        listener,
        app,
        http_tls,
        rx.clone(),
    )));
    if let Some(ep) = peer_endpoint {
        tasks.extend(crate::replication::spawn_links(
            node.clone(),
            ep,
            rx.clone(),
        ));
    }
    tasks.push(tokio::spawn(mark_durable(node.store.clone(), rx.clone())));
    if node.cluster.is_some() {
        tasks.push(tokio::spawn(topology_upkeep(
            node.clone(),
            quic_addr,
            rx.clone(),
        )));
    }
    tasks.push(tokio::spawn(admission_upkeep(
        node.admission.clone(),
        rx.clone(),
    )));
    tasks.push(tokio::spawn(upkeep(
        node.clone(),
        endpoint.clone(),
        id,
        generated,
        rx.clone(),
    )));
    tasks
}

/// The start-up lines on stdout (one `key: value` each; `recovered-batches` is the last) and
/// the log line.
pub(super) fn announce(node: &Node, quic_addr: SocketAddr, http_addr: SocketAddr) {
    let recovered = node.recovered;
    println!("node: {}", node.signer.producer().to_hex());
    println!("quic: {quic_addr}");
    let scheme = if node.http_tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!("http: {scheme}://{http_addr}");
    println!("cert-sha256: {}", hex(&node.cert_hash()));
    println!("recovered-batches: {recovered}");
    info!(%quic_addr, %http_addr, recovered, "merger started");
}

/// The replication half of a node with peers or a topology (`None` without either): how
/// peers authenticate, and the peer protocol's machine ([`edgetally_core::PeerSync`]).
pub(super) fn replication_for(
    config: &Config,
    seed: [u8; 32],
) -> Result<Option<Arc<crate::peer::Replication>>, StartError> {
    Ok(
        if config.peers.is_empty() && config.topology_file.is_none() {
            None
        } else {
            let mut auth =
                crate::peer::Auth::new(config.cluster_secret.as_deref(), &config.peer_keys, seed)
                    .map_err(StartError::Restore)?;
            auth.facts = Arc::new(crate::peer::Facts::new(crate::handshake::settings_digest(
                config,
            )));
            if auth.open_to_loopback_only() {
                // Peer links carry the state, snapshots included: never to or from a stranger,
                // loopback or not.
                return Err(StartError::Config(
                    "peers or a topology are configured but neither cluster_secret nor \
                 peer_keys: peers must authenticate (give every node the same \
                 EDGETALLY_CLUSTER_SECRET, or list their node keys in peer_keys)"
                        .into(),
                ));
            }
            let (tx, _) = tokio::sync::broadcast::channel(4096);
            Some(Arc::new(crate::peer::Replication {
                auth,
                sync: std::sync::Mutex::new(edgetally_core::PeerSync::new(
                    edgetally_core::SyncConfig {
                        interval_ms: config.sync_interval_ms as i64,
                        horizon_ms: (config.peer_horizon_secs as i64).saturating_mul(1000),
                        catch_up_batches: config.snapshot_catch_up_batches,
                        round_max: crate::peer::SYNC_BATCH,
                        ..edgetally_core::SyncConfig::default()
                    },
                    config.peers.iter().copied(),
                    now_ms(),
                )),
                applied: tx,
            }))
        },
    )
}

/// The shard-group layer of a node with a topology.
pub(super) fn cluster_for(
    config: &Config,
    replication: Option<&Arc<crate::peer::Replication>>,
    peer_endpoint: Option<&quinn::Endpoint>,
) -> Result<Option<Arc<crate::cluster::Cluster>>, StartError> {
    Ok(
        match (
            &config.topology_file,
            &config.group,
            &replication,
            &peer_endpoint,
        ) {
            (Some(path), Some(group), Some(repl), Some(ep)) => Some(Arc::new(
                crate::cluster::Cluster::new(
                    path,
                    &config.data_dir,
                    group,
                    (*ep).clone(),
                    repl.auth.clone(),
                    Duration::from_millis(config.query_deadline_ms),
                    config.limits,
                )
                .map_err(StartError::Config)?,
            )),
            _ => None,
        },
    )
}

/// The export of a node with `export_postgres_url`: the feed the pipeline writes changed keys
/// to, and the running exporter.
pub(super) type ExportParts = (
    Option<crate::export::ExportFeed>,
    Option<crate::export::Exporting>,
);

pub(super) fn export_for(
    config: &Config,
    dir: &std::path::Path,
    replica: &Arc<RwLock<edgetally_core::Replica>>,
    metrics: &Arc<Metrics>,
) -> Result<ExportParts, StartError> {
    #[cfg_attr(not(feature = "postgres"), allow(unused_mut))]
    let mut exporting = None;
    let export = match &config.export_postgres_url {
        None => None,
        #[cfg(not(feature = "postgres"))]
        Some(_) => {
            return Err(StartError::Config(
                "export_postgres_url is set, but this build has no PostgreSQL export \
                 (cargo feature `postgres`)"
                    .into(),
            ))
        }
        #[cfg(feature = "postgres")]
        Some(url) => {
            let tier = match config.export_bucket_ms {
                60_000 => 1,
                3_600_000 => 2,
                other => {
                    return Err(StartError::Config(format!(
                        "export_bucket must be 1m or 1h, not {other} ms"
                    )))
                }
            };
            let sink = crate::export::Postgres::new(
                url,
                &config.export_table,
                config.export_postgres_ca.as_deref(),
            )
            .map_err(StartError::Config)?;
            let cfg = crate::export::ExportConfig {
                tier,
                delay_ms: config.export_delay_ms.max(0),
                interval_ms: config.export_interval_ms.max(100),
                reach_ms: config
                    .limits
                    .max_lateness_ms
                    .saturating_add(config.seen_expiry_margin_ms.max(0)),
                mark_file: dir.join(format!("export-{}.mark", config.export_table)),
                quarantine_file: dir.join(format!("export-{}.quarantine", config.export_table)),
            };
            let (feed, handle) =
                crate::export::start(sink, cfg, replica.clone(), metrics.export.clone())
                    .map_err(StartError::Config)?;
            exporting = Some(handle);
            Some(feed)
        }
    };
    Ok((export, exporting))
}
