//! The ingest endpoints: `POST /v1/events` (keyed or not: sealed with the events key and
//! applied here or at the owner group) and `POST /v1/batches`, and the HTTP form of a reply.

use super::*;

/// The batch id of a keyed request: the epoch from the `Idempotency-Key` alone, the seq from
/// the key and the request's canonical events. A retry of the same request carries the same
/// id and counts once, on every node, across restarts (the seen-sets are durable and
/// replicated); the same key with other events is another seq of the same epoch, which is how
/// a reused key is told apart (422 `idempotency_key_reused`) without any state of its own.
pub(super) fn keyed_batch_id(
    producer: edgetally_core::ProducerKey,
    key: &str,
    canonical: [u8; 32],
) -> BatchId {
    use sha2::{Digest as _, Sha256};
    let word = |parts: &[&[u8]]| {
        let mut h = Sha256::new();
        for p in parts {
            h.update(p);
        }
        let d = h.finalize();
        let mut w = [0u8; 8];
        w.copy_from_slice(&d[..8]);
        u64::from_le_bytes(w)
    };
    let len = (key.len() as u64).to_le_bytes();
    BatchId {
        producer,
        epoch: word(&[b"edgetally/events/key/v2\0", &len, key.as_bytes()]),
        // Below u64::MAX, which no seen-set holds.
        seq: word(&[
            b"edgetally/events/body/v2\0",
            &len,
            key.as_bytes(),
            &canonical,
        ]) >> 1,
    }
}

/// What a keyed request's id says of it on this node: applied already (a retry), another
/// request applied under the same key, or neither.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum KeyState {
    Fresh,
    Applied,
    Reused,
}

pub(super) fn key_state(replica: &edgetally_core::Replica, id: &BatchId) -> KeyState {
    match replica.epoch_seqs(&id.producer, id.epoch) {
        Some(s) if s.contains(id.seq) => KeyState::Applied,
        Some(s) if !s.is_empty() => KeyState::Reused,
        _ => KeyState::Fresh,
    }
}

// Long by design: POST /v1/events in order (key, body, fold, keyed refusal, seal, submit,
// answer), each step with its HTTP status.
pub(super) async fn events(
    State(node): State<Node_>,
    conn: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let source = conn.map_or(std::net::Ipv4Addr::LOCALHOST.into(), |c| c.0 .0.ip());
    if let Some(heir) = node.cluster.as_ref().and_then(|c| c.drained_into()) {
        // The node's own batches stay in its group, and a drained group takes none.
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "draining",
            message: format!(
                "this node's shard group is drained into {heir:?}: send events to a node of that group"
            ),
        });
    }
    if let Some(after_ms) = node.admission.throttle_source(source, now_ms()) {
        node.metrics.retried.fetch_add(1, Relaxed);
        return Ok(reply_response(Reply::Retry { after_ms }));
    }
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if (1..=255).contains(&k.len()) => Some(k.to_string()),
            _ => {
                return Err(bad(
                    "bad_idempotency_key",
                    "Idempotency-Key must be 1-255 visible ASCII characters",
                ))
            }
        },
    };
    let text = std::str::from_utf8(&body).map_err(|_| bad("malformed", "body is not UTF-8"))?;
    // A byte-order mark is no part of the JSON (RFC 8259 §8.1 lets a parser ignore it).
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let now = now_ms();
    let mut fold = EventsFold::new(node.config.limits, now, node.admission.clone())?;
    fold.keyed = key.is_some();
    if text.trim_start().starts_with('[') {
        fold.array(text)?;
    } else {
        fold.ndjson(text)?;
    }
    for (&code, &n) in &fold.by_reason {
        if let Some(c) = RejectCode::from_name(code) {
            node.metrics.reject_events(c, n);
        }
    }
    let mut batches = 0;
    let mut replayed = false;
    if !fold.builder.is_empty() {
        let id = match key.as_deref() {
            Some(k) => {
                use sha2::Digest as _;
                let canonical = std::mem::take(&mut fold.canonical).finalize().into();
                keyed_batch_id(node.events_signer.producer(), k, canonical)
            }
            None => BatchId {
                producer: node.events_signer.producer(),
                epoch: node.events_epoch,
                seq: node.events_seq.fetch_add(1, Relaxed),
            },
        };
        if key.is_some() {
            match key_state(&node.state(), &id) {
                // Applied before, here or at a peer: answered as it was then, whatever the
                // clock and the settings say now (they were met when it was applied).
                KeyState::Applied => replayed = true,
                KeyState::Reused => {
                    return Err(ApiError {
                        status: StatusCode::UNPROCESSABLE_ENTITY,
                        code: "idempotency_key_reused",
                        message: "this Idempotency-Key was used for a request with other events; \
                                  nothing was applied (use a new key for a new request)"
                            .into(),
                    })
                }
                KeyState::Fresh if fold.refused_here > 0 => {
                    return Ok(refused_whole(&fold));
                }
                KeyState::Fresh => {
                    let cap = node.config.max_idempotency_keys;
                    if cap > 0 && node.keys_live(now) >= cap {
                        return Err(ApiError {
                            status: StatusCode::TOO_MANY_REQUESTS,
                            code: "idempotency_keys_full",
                            message: format!(
                                "nothing was applied: the node remembers {cap} Idempotency-Key \
                                 requests (max_idempotency_keys), each until max_lateness has \
                                 passed; send without the header, or later"
                            ),
                        });
                    }
                }
            }
        }
        // A keyed request's bytes must be the same on a retry: its creation time is the
        // start of the latest accepted event's bucket, not the clock's (the bucket's start,
        // not the event's time, so that the batch passes the future-skew rule exactly when
        // its buckets do).
        let created = if key.is_some() {
            fold.max_ts.div_euclid(EVENTS_BUCKET_MS) * EVENTS_BUCKET_MS
        } else {
            now
        };
        // A replay is answered as applied without sealing again: nothing of this node's
        // settings (its payload limit, its cluster) may change the answer.
        let reply = if replayed {
            Reply::Ack
        } else {
            submit_events(&node, fold.builder.finish(id, created), source).await?
        };
        match reply {
            Reply::Ack => {
                batches = 1;
                if key.is_some() && !replayed {
                    node.keys_live.fetch_add(1, Relaxed);
                }
            }
            Reply::Nack(n) if RejectCode::from_u16(n) == Some(RejectCode::SeriesLimit) => {
                return Err(ApiError {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    code: "series_limit",
                    message: "nothing was applied: the events would add series past the node's max_series".into(),
                })
            }
            Reply::Nack(n) if RejectCode::from_u16(n) == Some(RejectCode::SourceQuota) => {
                return Err(ApiError {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    code: "source_quota",
                    message: "nothing was applied: the events would add more new series than this \
                              client's address may add per hour (source_new_series_per_hour); \
                              events into series that exist are still taken"
                        .into(),
                })
            }
            Reply::Nack(code) => {
                return Err(internal(format!(
                    "the node refused its own batch: {}",
                    RejectCode::from_u16(code).map_or("unknown", |c| c.as_str())
                )))
            }
            Reply::Retry { .. } => {
                return Err(ApiError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    code: "unavailable",
                    message: "nothing was applied: storage is failing or the node is overloaded; retry (with the same Idempotency-Key)".into(),
                });
            }
        }
    }
    node.metrics
        .events_accepted
        .fetch_add(fold.accepted, Relaxed);
    let rejected_count: u64 = fold.by_reason.values().sum();
    let mut r = Json(json!({
        "accepted": fold.accepted,
        "rejected": fold.listed,
        "rejected_count": rejected_count,
        "rejected_by_reason": fold.by_reason,
        "batches": batches,
    }))
    .into_response();
    if replayed {
        r.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(r)
}

pub(super) fn internal(message: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        code: "internal",
        message,
    }
}

/// Seals the batch of a request's events with the events key and applies it: here, or in a
/// shard-group cluster at the events key's owner group. 413 if it is over the payload limit.
pub(super) async fn submit_events(
    node: &Api,
    batch: edgetally_core::Batch,
    source: std::net::IpAddr,
) -> Result<Reply, ApiError> {
    let sealed = node
        .events_signer
        .seal(&batch)
        .map_err(|e| internal(e.to_string()))?;
    if sealed.len() > node.config.limits.max_payload_bytes {
        return Err(too_large(
            "request_too_large",
            format!(
                "the request's events make a batch of {} bytes, over the {}-byte limit; split it",
                sealed.len(),
                node.config.limits.max_payload_bytes
            ),
        ));
    }
    // In a shard-group cluster the events key's batches belong to its owner group, like any
    // producer's: forwarded there (a keyed retry at a node of another group is then still the
    // one batch), the owner's reply relayed. Only with a shared events key (`cluster_secret`):
    // a node's own key is admitted as its own only by itself.
    let shared_key = node.config.cluster_secret.is_some();
    Ok(match shared_key {
        true => node.take_or_forward(sealed, true, Some(source)).await,
        false => {
            node.ingest
                .submit_producer(sealed, None, true, Some(source))
                .await
        }
    })
}

/// A keyed request some of whose events the clock or this node's settings refuse: nothing is
/// applied and the key stays free, so that what a key's batch holds never depends on when or
/// where it was sent. 422 `events_refused`, every rejection listed as usual.
pub(super) fn refused_whole(fold: &EventsFold) -> Response {
    let mut listed: Vec<&Value> = fold.listed.iter().chain(&fold.here_listed).collect();
    listed.sort_by_key(|r| r["index"].as_u64());
    listed.truncate(MAX_LISTED_REJECTIONS);
    let mut by_reason = fold.by_reason.clone();
    for (k, n) in &fold.here_by_reason {
        *by_reason.entry(k).or_insert(0) += n;
    }
    let rejected_count: u64 = by_reason.values().sum();
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({
            "error": "events_refused",
            "message": format!(
                "nothing was applied: {} event(s) valid on their own are refused by this node's \
                 clock or settings (listed); an Idempotency-Key request is applied whole or not \
                 at all — send it again without them (the key is still free)",
                fold.refused_here
            ),
            "accepted": 0,
            "rejected": listed,
            "rejected_count": rejected_count,
            "rejected_by_reason": by_reason,
            "batches": 0,
        })),
    )
        .into_response()
}

pub(super) async fn batches(
    State(node): State<Node_>,
    conn: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let source = conn.map_or(std::net::Ipv4Addr::LOCALHOST.into(), |c| c.0 .0.ip());
    // An enrolment credential may ride along with the batch (browsers cannot open a stream
    // for it first): it is checked, and the key enrolled, before the batch is. Bytes that are
    // not hex are no credential (refused as `malformed`, by length).
    let credential = headers.get("edgetally-credential").map(|v| {
        v.to_str()
            .ok()
            .and_then(edgetally_net::tls::unhex)
            .unwrap_or_default()
    });
    let max = node.config.limits.max_payload_bytes + 16 + edgetally_proto::SIGNATURE_LEN;
    let reply = if body.len() > max {
        node.metrics.reject(RejectCode::PayloadTooLarge);
        Reply::nack(RejectCode::PayloadTooLarge)
    } else {
        node.metrics.received("http");
        node.submit_from(body.to_vec(), source, credential.as_deref())
            .await
    };
    reply_response(reply)
}

/// The HTTP form of a reply: 200 Ack, 422 Nack with the reason, 503 Retry with Retry-After.
/// The body also carries the binary reply frame in hex (`frame`) for SDKs that share code
/// with the QUIC path.
pub fn reply_response(reply: Reply) -> Response {
    let frame = hex(&reply.encode());
    match reply {
        Reply::Ack => (
            StatusCode::OK,
            Json(json!({"result": "ack", "frame": frame})),
        )
            .into_response(),
        Reply::Nack(n) => {
            let code = RejectCode::from_u16(n).map_or("unknown", |c| c.as_str());
            (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"result": "nack", "error": code, "message": format!("batch rejected: {code}"), "frame": frame}))).into_response()
        }
        Reply::Retry { after_ms } => {
            let mut r = (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"result": "retry", "after_ms": after_ms, "frame": frame})),
            )
                .into_response();
            let secs = after_ms.div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
    }
}
