//! `/v1/status` and `/metrics`.

use super::*;

/// Each peer's link, lag and digest, for `/v1/status`.
pub(super) fn peers_json(node: &Node) -> Value {
    let Some(repl) = &node.replication else {
        return json!([]);
    };
    let now = now_ms();
    // The peers' status before the replica's read lock (lock order: peer sync, then replica).
    let status = repl.status();
    let r = node.state();
    Value::Array(
        status
            .into_iter()
            .map(|(addr, p)| {
                json!({
                    "addr": addr.to_string(),
                    "node": p.node.map(|k| hex(&k)),
                    "reachable": p.reachable,
                    "last_sync_ms": (p.last_sync_ms > 0).then_some(p.last_sync_ms),
                    "lag_seconds": (p.last_sync_ms > 0).then(|| (now - p.last_sync_ms) as f64 / 1000.0),
                    "lag_batches": r.lag_of(&addr.to_string()),
                    "digest_batches": p.digest_batches,
                    "pulled": p.pulled,
                    "pushed": p.pushed,
                    "divergences": p.divergences,
                    "diverged": p.diverged,
                    "excluded": p.excluded,
                    "last_error": p.last_error,
                    "handshake": p.node.and_then(|k| repl.auth.facts.of(&k)).map(|f| json!({
                        "clock_skew_ms": f.clock_skew_ms,
                        "topology_version": f.topology_version,
                        "settings_match": f.settings_match,
                        "features": f.features,
                        "lacks": f.lacks,
                    })),
                })
            })
            .collect(),
    )
}
// Long by design: the /v1/status document, about one field per line (its shape is the OpenAPI
// document's).
pub(super) async fn status(State(node): State<Node_>) -> Json<Value> {
    // Every figure is O(1): the replica keeps its counters and set hash current as it
    // applies, so pollers cost ingest nothing but a brief read lock.
    let (entries, epochs, applied_since_start, retained, held, series, hash) = {
        let r = node.state();
        (
            r.entry_count(),
            r.epoch_count(),
            r.applied_count(),
            r.log_len(),
            r.digest_batches(),
            r.series_count(),
            r.state_hash(),
        )
    };
    let hash_now = hex(&hash);
    let adm = &node.admission;
    let (tracked_producers, tracked_sources) = adm.tracked();
    let l = node.config.limits;
    let hash = hex(&node.cert_hash());
    Json(json!({
        "node": node.signer.producer().to_hex(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_ms": node.started.elapsed().as_millis() as u64,
        "quic_addr": node.quic_addr.to_string(),
        "http_addr": node.http_addr.read().unwrap_or_else(|e| e.into_inner()).map(|a| a.to_string()),
        "cert_sha256": hash,
        "cert_sha256_next": node.next_cert_hash.read().unwrap_or_else(|e| e.into_inner()).map(|h| hex(&h)),
        "cert_not_after_unix": *node.cert_not_after.read().unwrap_or_else(|e| e.into_inner()),
        "data_dir": node.config.data_dir.display().to_string(),
        "batches_applied": node.metrics.applied.load(Relaxed),
        "batches_duplicate": node.metrics.duplicates.load(Relaxed),
        "batches_pulled": node.metrics.pulled.load(Relaxed),
        "batches_recovered": node.recovered,
        "batches_quarantined": node.quarantined,
        "log_torn_tails": node.store.torn_tails().0.iter().map(|d| json!({
            "file": d.file.display().to_string(), "offset": d.offset, "len": d.len,
        })).collect::<Vec<_>>(),
        "batches_in_replica": applied_since_start,
        "stored_batches": node.store.batch_count().ok(),
        "producer_epochs": epochs,
        "tier_entries": entries,
        "queue_depth": node.metrics.queue_depth.load(Relaxed),
        "limits": {
            "max_payload_bytes": l.max_payload_bytes,
            "max_summaries": l.max_summaries,
            "max_categories": l.max_categories,
            "max_entities": l.max_entities,
            "max_lateness_ms": l.max_lateness_ms,
            "max_future_skew_ms": l.max_future_skew_ms,
        },
        "admission": {
            "producer_policy": adm.policy().as_str(),
            "allowlist_keys": adm.allowlist_len(),
            "enrolled_producers": adm.enrolled_len(),
            "series": series,
            "max_series": node.config.max_series,
            "idempotency_keys": node.keys_live(now_ms()),
            "max_idempotency_keys": node.config.max_idempotency_keys,
            "producer_batches_per_sec": node.config.producer_batches_per_sec,
            "producer_summaries_per_sec": node.config.producer_summaries_per_sec,
            "source_batches_per_sec": node.config.source_batches_per_sec,
            "new_categories_per_hour": node.config.new_categories_per_hour,
            "new_entities_per_hour": node.config.new_entities_per_hour,
            "source_new_series_per_hour": node.config.source_new_series_per_hour,
            "tracked_producers": tracked_producers,
            "tracked_sources": tracked_sources,
            "throttled_producer": adm.stats.throttled_producer.load(Relaxed),
            "throttled_source": adm.stats.throttled_source.load(Relaxed),
        },
        "peers": peers_json(&node),
        // Nodes of an earlier release that tried to peer (they cannot replicate with this one).
        "earlier_release_peers": node
            .earlier_peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(addr, (protocol, at))| json!({
                "addr": addr.to_string(),
                "protocol": protocol,
                "last_seen_ms": at,
            }))
            .collect::<Vec<_>>(),
        "topology": node.cluster.as_ref().map(|c| json!({
            "group": c.group,
            "version": c.topology().version,
            "maps": serde_json::to_value(&c.topology().maps).unwrap_or(Value::Null),
            "drains": c.topology().drains,
            "draining_since_ms": c.draining_since(),
            "absorbed": node.state().absorbed(),
            "nodes": c.versions().into_iter().map(|(addr, version)| json!({
                "quic": addr,
                "version": version,
            })).collect::<Vec<_>>(),
            "handoffs_pending": c.handoffs_pending(),
            "conflict": c.conflict(),
            "settled": c.settled(),
        })),
        "retained_batches": retained,
        // Equal on two nodes iff they hold the same batches with the same content (and so
        // identical totals, local retention aside).
        "state_sha256": hash_now,
        "state_sha256_as_of_ms": now_ms(),
        "digest_batches": held,
        "divergences": node.metrics.divergences.load(Relaxed),
        "divergence_repairs": node.metrics.divergence_repairs.load(Relaxed),
        "equivocations": node.metrics.equivocations.load(Relaxed),
        "refuse_equivocators": node.admission.refuses_equivocators(),
        // The first 100, by key.
        "equivocators": node.admission.equivocators().iter().take(100).map(|(k, e)| json!({
            "producer": edgetally_net::tls::hex(&k.0),
            "epoch": e,
        })).collect::<Vec<_>>(),
        "complete": node.complete(),
        "as_of_ms": now_ms(),
    }))
}

pub(super) async fn metrics(State(node): State<Node_>) -> Response {
    let text = node.metrics_text();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
