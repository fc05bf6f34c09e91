//! The HTTP API (SPEC §6): queries, event and batch ingestion, status, health and metrics.
//! Every bad request gets HTTP 400 with `{"error": code, "message": text}`.

use crate::cluster::Query;
use crate::ingest::now_ms;
use crate::node::Node;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use edgetally_core::record::{MAX_TS_MS, MIN_TS_MS};
use edgetally_core::{BatchId, RejectCode, Rows, TopBy, Total};
use edgetally_net::tls::hex;
use edgetally_proto::{BatchBuilder, Reply};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

type Node_ = Arc<Api>;

/// The HTTP layer's state: the node it serves, and what only HTTP uses — the ids of the
/// batches it seals from `POST /v1/events` (this process's epoch, and the next seq).
#[derive(Debug)]
pub struct Api {
    node: Arc<Node>,
    events_epoch: u64,
    events_seq: std::sync::atomic::AtomicU64,
    /// Keyed requests remembered (the events key's epochs in the seen-sets), as last counted,
    /// plus those applied here since; and when it was counted, ms.
    keys_live: std::sync::atomic::AtomicU64,
    keys_counted_ms: std::sync::atomic::AtomicI64,
}

impl Api {
    /// HTTP over `node`, sealing `POST /v1/events` batches under a fresh random epoch.
    pub fn new(node: Arc<Node>) -> Api {
        Api {
            node,
            events_epoch: edgetally_net::random_u64(),
            events_seq: 0.into(),
            keys_live: 0.into(),
            keys_counted_ms: i64::MIN.into(),
        }
    }

    /// How many keyed requests the node remembers: counted in the seen-sets at most once a
    /// second (a count over the events key's epochs), and kept current in between by the
    /// requests applied here. Replicated ones and expiries show at the next count.
    fn keys_live(&self, now: i64) -> u64 {
        let at = self.keys_counted_ms.load(Relaxed);
        if now.saturating_sub(at) >= 1000
            && self
                .keys_counted_ms
                .compare_exchange(at, now, Relaxed, Relaxed)
                .is_ok()
        {
            let n = self.state().epochs_of(&self.events_signer.producer());
            self.keys_live.store(n as u64, Relaxed);
        }
        self.keys_live.load(Relaxed)
    }
}

impl std::ops::Deref for Api {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

/// An error answer: status, stable code, human message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        code,
        message: message.into(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response()
    }
}

/// The router over a node.
pub fn router(node: Arc<Node>) -> Router {
    let node = Arc::new(Api::new(node));
    Router::new()
        .route("/v1/aggregate", get(aggregate))
        .route("/v1/topk", get(topk))
        .route("/v1/window", get(window))
        .route("/v1/totals", get(totals))
        .route("/v1/series", get(series))
        .route("/v1/events", post(events))
        .route("/v1/batches", post(batches))
        .route("/v1/status", get(status))
        .route("/v1/webtransport", get(webtransport))
        .route("/v1/topology", get(topology))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/read", post(prometheus_read))
        .route("/", get(dashboard_page))
        .route("/dashboard/{file}", get(dashboard_asset))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                code: "not_found",
                message: "no such endpoint".into(),
            }
        })
        .layer(DefaultBodyLimit::max(32 << 20))
        // Outside the token check: a browser's preflight carries no token.
        .layer(axum::middleware::from_fn_with_state(
            node.clone(),
            authorize,
        ))
        .layer(cors(&node.config.cors_origins))
        .layer(axum::middleware::from_fn_with_state(
            node.clone(),
            count_requests,
        ))
        .with_state(node)
}

/// The dashboard's files, compiled into the binary (no build step, no CDN).
const DASHBOARD: &[(&str, &str, &str)] = &[
    (
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/dashboard.js"),
    ),
    (
        "dashboard.css",
        "text/css; charset=utf-8",
        include_str!("../assets/dashboard.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/vendor/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("../assets/vendor/uPlot.min.css"),
    ),
];

/// What the dashboard may load and call: its own files and this node's API, nothing else.
const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// `GET /`: the built-in dashboard (categories, live series charts, top entities, ingest
/// rates, cluster and peers), over this node's own API.
async fn dashboard_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        include_str!("../assets/dashboard.html"),
    )
        .into_response()
}

async fn dashboard_asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    match DASHBOARD.iter().find(|(name, _, _)| *name == file) {
        Some((_, kind, body)) => (
            [
                (header::CONTENT_TYPE, *kind),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: "no such file".into(),
        }
        .into_response(),
    }
}

/// Prometheus remote read ([`crate::promread`]): a snappy-compressed protobuf `ReadRequest`
/// in, a `ReadResponse` out (the `SAMPLES` response type). Needs the read scope.
async fn prometheus_read(State(node): State<Node_>, body: Bytes) -> Response {
    match crate::promread::read(&node, &body).await {
        Ok(out) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/x-protobuf"),
                (header::CONTENT_ENCODING, "snappy"),
            ],
            out,
        )
            .into_response(),
        Err(crate::promread::BadRead(code, message)) => bad(code, message).into_response(),
    }
}

/// Whether this node should be sent traffic: 200 when every check passes, else 503; the body
/// says which failed. (`/healthz` only says the process answers.) The checks:
/// - `recovered`: the log was replayed and the snapshot restored (the HTTP port opens only
///   after that, so a node that answers has passed it; reported with its figures);
/// - `store`: the last group commit succeeded (a full disk or I/O error fails it until a
///   commit succeeds again; producers get Retry meanwhile);
/// - `queue`: the ingest queue is below `queue_depth` (at it, new batches get Retry);
/// - `peers`: the first pull round with each configured peer has ended, synced or failed
///   (a node that just started with reachable peers is catching up until then).
///
/// Open to load balancers; the details that say something of the node's insides
/// (the store's error text, peer addresses) are shown only to readers: with `read_tokens`
/// set, a request without a read token sees each check's verdict and nothing more.
async fn readyz(State(node): State<Node_>, headers: axum::http::HeaderMap) -> Response {
    let store_error = node
        .metrics
        .store_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let depth = node.metrics.queue_depth.load(Relaxed);
    let max = node.config.queue_depth as u64;
    let (mut pending, mut reachable, mut total) = (Vec::new(), 0, 0);
    if let Some(repl) = &node.replication {
        for (addr, p) in repl.status() {
            total += 1;
            reachable += usize::from(p.reachable);
            if p.last_sync_ms == 0 && p.last_error.is_none() {
                pending.push(addr.to_string());
            }
        }
    }
    let checks = json!({
        "recovered": {"ok": true, "batches": node.recovered, "quarantined": node.quarantined},
        "store": {"ok": store_error.is_none(), "error": store_error},
        "queue": {"ok": depth < max, "depth": depth, "max": max},
        "peers": {"ok": pending.is_empty(), "reachable": reachable, "total": total, "first_round_pending": pending},
    });
    let ready = checks
        .as_object()
        .is_some_and(|c| c.values().all(|v| v["ok"] == json!(true)));
    let tokens = &node.config.read_tokens;
    let reader = tokens.is_empty() || bearer(&headers).is_some_and(|t| token_listed(tokens, t));
    let checks = if reader {
        checks
    } else {
        let verdicts = checks
            .as_object()
            .map(|c| {
                c.iter()
                    .map(|(k, v)| (k.clone(), json!({"ok": v["ok"]})))
                    .collect::<serde_json::Map<_, _>>()
            })
            .unwrap_or_default();
        Value::Object(verdicts)
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ready, "checks": checks}))).into_response()
}

/// The shard-group topology this node routes by, for producers that route each batch to its
/// owner group themselves (`Producer::set_topology`; no forwarding hop). Open, like
/// `GET /v1/webtransport`: producers read it with no token. 404 `no_topology` on a node
/// outside a shard-group cluster (send anywhere).
async fn topology(State(node): State<Node_>) -> Response {
    match &node.cluster {
        Some(c) => Json(json!(&*c.topology())).into_response(),
        None => ApiError {
            status: StatusCode::NOT_FOUND,
            code: "no_topology",
            message: "this node is not part of a shard-group cluster: any node takes any batch"
                .into(),
        }
        .into_response(),
    }
}

/// Where a browser opens its WebTransport session, and the certificate hashes to pin: the
/// current certificate's and the next one's (generated certificates only; with `tls_cert` the
/// list is empty and the browser checks the certificate as usual). Open, like
/// `POST /v1/batches`: a producer's page reads it before sending.
async fn webtransport(State(node): State<Node_>, headers: axum::http::HeaderMap) -> Response {
    let q = node.quic_addr;
    let host = if q.ip().is_unspecified() {
        // Bound to every address: the host the page reached us by.
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<axum::http::uri::Authority>().ok())
            .map(|a| a.host().to_string())
    } else {
        Some(match q.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        })
    };
    // A next certificate exists exactly when the node generates its own.
    let next = *node
        .next_cert_hash
        .read()
        .unwrap_or_else(|e| e.into_inner());
    let hashes: Vec<String> = next
        .map(|n| vec![hex(&node.cert_hash()), hex(&n)])
        .unwrap_or_default();
    let path = edgetally_net::server::WEBTRANSPORT_PATH;
    Json(json!({
        "url": host.map(|h| format!("https://{h}:{}{path}", q.port())),
        "path": path,
        "port": q.port(),
        "cert_sha256": hashes,
        "cert_not_after_unix": *node.cert_not_after.read().unwrap_or_else(|e| e.into_inner()),
    }))
    .into_response()
}

/// The CORS policy: any origin for `["*"]`, else exactly the listed origins.
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.iter().any(|o| o == "*") {
        return CorsLayer::permissive();
    }
    let list: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(list))
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers(Any)
        .expose_headers([header::RETRY_AFTER])
}

/// What a request needs: nothing (health, producers' signed batches, preflights), the read
/// scope (queries, status, metrics) or the write scope (`POST /v1/events`).
fn scope_of(method: &axum::http::Method, path: &str) -> Option<&'static str> {
    use axum::http::Method;
    // The dashboard's page and files hold no data (the page asks for a token if needed).
    if method == Method::GET && (path == "/" || path.starts_with("/dashboard/")) {
        return None;
    }
    match (method, path) {
        (&Method::OPTIONS, _)
        | (_, "/healthz")
        | (_, "/readyz")
        | (&Method::POST, "/v1/batches")
        | (&Method::GET, "/v1/webtransport")
        | (&Method::GET, "/v1/topology") => None,
        (&Method::POST, "/v1/events") => Some("write"),
        _ => Some("read"),
    }
}

/// Whether `presented` is one of `tokens`. Compared as SHA-256 digests, so the time taken
/// says nothing about how much of a token matched.
fn token_listed(tokens: &[String], presented: &str) -> bool {
    use sha2::{Digest, Sha256};
    let p = Sha256::digest(presented.as_bytes());
    tokens
        .iter()
        .fold(false, |hit, t| hit | (Sha256::digest(t.as_bytes()) == p))
}

/// The token of an `Authorization: Bearer <token>` header. The scheme is case-insensitive
/// (RFC 9110 §11.1): `bearer` and `BEARER` are the same scheme.
fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Bearer tokens (SPEC: README "Tokens"): a scope with no tokens configured is open.
async fn authorize(
    State(node): State<Node_>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let c = &node.config;
    let tokens = match scope_of(req.method(), req.uri().path()) {
        Some("read") => &c.read_tokens,
        Some(_) => &c.write_tokens,
        None => return next.run(req).await,
    };
    if tokens.is_empty() {
        return next.run(req).await;
    }
    match bearer(req.headers()) {
        Some(t) if token_listed(tokens, t) => next.run(req).await,
        Some(t) if token_listed(&c.read_tokens, t) || token_listed(&c.write_tokens, t) => {
            ApiError {
                status: StatusCode::FORBIDDEN,
                code: "forbidden",
                message: "this token does not have the scope this endpoint needs".into(),
            }
            .into_response()
        }
        _ => {
            let mut r = ApiError {
                status: StatusCode::UNAUTHORIZED,
                code: "unauthorized",
                message: "a bearer token is required (Authorization: Bearer <token>)".into(),
            }
            .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

async fn count_requests(
    State(node): State<Node_>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let res = next.run(req).await;
    node.metrics.http_requests.fetch_add(1, Relaxed);
    if res.status().is_client_error() {
        node.metrics.http_client_errors.fetch_add(1, Relaxed);
    }
    res
}

/// Query parameters, checked against the endpoint's list: unknown or repeated ones are errors.
struct Params(BTreeMap<String, String>);

impl Params {
    fn parse(raw: Option<String>, allowed: &[&str]) -> Result<Params, ApiError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
            .map_err(|e| bad("bad_query", e.to_string()))?;
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            if !allowed.contains(&k.as_str()) {
                return Err(bad(
                    "unknown_parameter",
                    format!("unknown parameter {k:?}; allowed: {}", allowed.join(", ")),
                ));
            }
            if map.insert(k.clone(), v).is_some() {
                return Err(bad(
                    "duplicate_parameter",
                    format!("parameter {k:?} given twice"),
                ));
            }
        }
        Ok(Params(map))
    }

    fn opt_str(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    fn name(&self, k: &str, required: bool) -> Result<Option<String>, ApiError> {
        match self.opt_str(k) {
            None if required => Err(bad("missing_parameter", format!("{k} is required"))),
            None => Ok(None),
            Some(s) if s.is_empty() || s.len() > 200 => {
                Err(bad("bad_parameter", format!("{k} must be 1-200 bytes")))
            }
            Some(s) => Ok(Some(s.to_string())),
        }
    }

    fn int(&self, k: &str, lo: i64, hi: i64, default: Option<i64>) -> Result<i64, ApiError> {
        match self.opt_str(k) {
            None => default.ok_or_else(|| bad("missing_parameter", format!("{k} is required"))),
            Some(s) => match s.parse::<i64>() {
                Ok(v) if (lo..=hi).contains(&v) => Ok(v),
                Ok(_) => Err(bad("bad_parameter", format!("{k} must be in [{lo}, {hi}]"))),
                Err(_) => Err(bad("bad_parameter", format!("{k} must be an integer"))),
            },
        }
    }

    fn window(&self) -> Result<(i64, i64), ApiError> {
        let start = self.int("start", MIN_TS_MS, MAX_TS_MS, None)?;
        let end = self.int("end", MIN_TS_MS, MAX_TS_MS, None)?;
        if end <= start {
            return Err(bad("bad_window", "end must be greater than start"));
        }
        Ok((start, end))
    }
}

fn num(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// count, sum, sum_exact, avg, min, max of a total (null where count is 0).
fn stats(t: &Total, obj: &mut Map<String, Value>) {
    let empty = t.count == 0;
    let sum = t.sum.to_f64();
    obj.insert("count".into(), json!(t.count));
    obj.insert("sum".into(), num(sum));
    obj.insert("sum_exact".into(), json!(t.sum.to_decimal()));
    obj.insert(
        "avg".into(),
        if empty {
            Value::Null
        } else {
            num(sum / t.count as f64)
        },
    );
    obj.insert("min".into(), if empty { Value::Null } else { num(t.min) });
    obj.insert("max".into(), if empty { Value::Null } else { num(t.max) });
}

/// `{"key", count, sum, …}` for each (group name, totals) row.
fn rows_json(rows: &Rows) -> Value {
    Value::Array(
        rows.rows
            .iter()
            .map(|(name, t)| {
                let mut o = Map::new();
                o.insert("key".into(), json!(name));
                stats(t, &mut o);
                Value::Object(o)
            })
            .collect(),
    )
}

/// How fresh and complete an answer is: when it was computed, and whether it holds every
/// batch the cluster has, as far as this node can tell — this node sees all its peers and,
/// with shard groups, every group answered in time from a node that sees all of its own
/// (`shard_groups` lists each group's part). An incomplete answer may lack batches held only
/// elsewhere; it never counts one twice.
fn freshness(
    node: &Node,
    complete: bool,
    groups: &[crate::cluster::GroupAnswer],
    obj: &mut Map<String, Value>,
) {
    obj.insert("as_of_ms".into(), json!(now_ms()));
    obj.insert("complete".into(), json!(complete));
    if node.cluster.is_some() {
        obj.insert(
            "shard_groups".into(),
            Value::Array(
                groups
                    .iter()
                    .map(|g| {
                        json!({
                            "name": g.name,
                            "answered": g.answered,
                            "complete": g.complete,
                            "as_of_ms": g.as_of_ms,
                            "absorbed_by": g.absorbed_by,
                            "error": g.error,
                        })
                    })
                    .collect(),
            ),
        );
    }
}

/// Each peer's link, lag and digest, for `/v1/status`.
fn peers_json(node: &Node) -> Value {
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

async fn aggregate_json(
    node: &Node,
    category: String,
    entity: Option<String>,
    start: i64,
    end: i64,
) -> Map<String, Value> {
    let (answer, complete, groups) = node
        .query(Query::Aggregate {
            category: category.clone(),
            entity: entity.clone(),
            start,
            end,
        })
        .await;
    let (start, end, total) =
        answer
            .into_points()
            .into_iter()
            .next()
            .unwrap_or((start, end, Total::EMPTY));
    let mut o = Map::new();
    o.insert("category".into(), json!(category));
    o.insert("entity".into(), json!(entity));
    o.insert("time_window_start".into(), json!(start));
    o.insert("time_window_end".into(), json!(end));
    stats(&total, &mut o);
    freshness(node, complete, &groups, &mut o);
    o
}

async fn aggregate(
    State(node): State<Node_>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let p = Params::parse(q, &["category", "start", "end", "entity"])?;
    let category = p.name("category", true)?.unwrap_or_default();
    let entity = p.name("entity", false)?;
    let (start, end) = p.window()?;
    let o = aggregate_json(&node, category, entity, start, end).await;
    Ok(Json(Value::Object(o)))
}

async fn window(State(node): State<Node_>, RawQuery(q): RawQuery) -> Result<Json<Value>, ApiError> {
    let p = Params::parse(q, &["category", "width_ms", "entity"])?;
    let category = p.name("category", true)?.unwrap_or_default();
    let entity = p.name("entity", false)?;
    let width = p.int("width_ms", 1, 400 * 86_400_000, None)?;
    let now = now_ms();
    let mut o = aggregate_json(&node, category, entity, now - width, now).await;
    o.insert("width_ms".into(), json!(width));
    Ok(Json(Value::Object(o)))
}

async fn topk(State(node): State<Node_>, RawQuery(q): RawQuery) -> Result<Json<Value>, ApiError> {
    let p = Params::parse(q, &["category", "start", "end", "k", "by"])?;
    let category = p.name("category", true)?.unwrap_or_default();
    let (start, end) = p.window()?;
    let k = p.int("k", 1, 1000, Some(10))? as usize;
    let by = match p.opt_str("by").unwrap_or("entity") {
        "entity" => TopBy::Entity,
        "producer" => TopBy::Producer,
        other => {
            return Err(bad(
                "bad_parameter",
                format!("by must be entity or producer, not {other:?}"),
            ))
        }
    };
    let (answer, complete, groups) = node
        .query(Query::TopK {
            category: category.clone(),
            start,
            end,
            by_producer: by == TopBy::Producer,
        })
        .await;
    // Every group sent every row: rank the merged rows here (ties by name), keep k.
    let mut rows = answer.into_rows();
    rows.rank(k);
    let mut o = Map::new();
    o.insert("category".into(), json!(category));
    o.insert(
        "by".into(),
        json!(if by == TopBy::Entity {
            "entity"
        } else {
            "producer"
        }),
    );
    o.insert("k".into(), json!(k));
    o.insert("time_window_start".into(), json!(rows.start));
    o.insert("time_window_end".into(), json!(rows.end));
    o.insert("items".into(), rows_json(&rows));
    freshness(&node, complete, &groups, &mut o);
    Ok(Json(Value::Object(o)))
}

async fn totals(State(node): State<Node_>, RawQuery(q): RawQuery) -> Result<Json<Value>, ApiError> {
    let p = Params::parse(q, &["start", "end", "group_by"])?;
    let (start, end) = p.window()?;
    let (g, label) = match p.opt_str("group_by").unwrap_or("none") {
        "none" => (0, "none"),
        "category" => (1, "category"),
        "entity" => (2, "entity"),
        other => {
            return Err(bad(
                "bad_parameter",
                format!("group_by must be none, category or entity, not {other:?}"),
            ))
        }
    };
    let (answer, complete, groups) = node
        .query(Query::Totals {
            start,
            end,
            group_by: g,
        })
        .await;
    let rows = answer.into_rows();
    let mut o = Map::new();
    o.insert("group_by".into(), json!(label));
    o.insert("time_window_start".into(), json!(rows.start));
    o.insert("time_window_end".into(), json!(rows.end));
    o.insert("groups".into(), rows_json(&rows));
    freshness(&node, complete, &groups, &mut o);
    Ok(Json(Value::Object(o)))
}

/// Most points one series answer may hold.
pub const MAX_SERIES_POINTS: usize = 10_000;

async fn series(State(node): State<Node_>, RawQuery(q): RawQuery) -> Result<Json<Value>, ApiError> {
    let p = Params::parse(q, &["category", "start", "end", "step_ms", "entity"])?;
    let category = p.name("category", true)?.unwrap_or_default();
    let entity = p.name("entity", false)?;
    let (start, end) = p.window()?;
    let step = p.int("step_ms", 1000, 400 * 86_400_000, None)?;
    if (end - start) / step >= MAX_SERIES_POINTS as i64 {
        return Err(bad(
            "too_many_points",
            format!("at most {MAX_SERIES_POINTS} steps per request"),
        ));
    }
    let (answer, complete, groups) = node
        .query(Query::Series {
            category: category.clone(),
            entity: entity.clone(),
            start,
            end,
            step_ms: step,
            max_points: MAX_SERIES_POINTS as u32,
        })
        .await;
    let pts: Vec<Value> = answer
        .into_points()
        .iter()
        .map(|(start, end, total)| {
            let mut o = Map::new();
            o.insert("time_window_start".into(), json!(start));
            o.insert("time_window_end".into(), json!(end));
            stats(total, &mut o);
            Value::Object(o)
        })
        .collect();
    let mut o = Map::new();
    o.insert("category".into(), json!(category));
    o.insert("entity".into(), json!(entity));
    o.insert("step_ms".into(), json!(step));
    o.insert("points".into(), Value::Array(pts));
    freshness(&node, complete, &groups, &mut o);
    Ok(Json(Value::Object(o)))
}

/// An event's fields: ts_ms, category, entity, value.
type EventFields = (i64, String, Option<String>, f64);
/// One event of `POST /v1/events`: its fields, or why it was refused.
type EventResult = Result<EventFields, (RejectCode, String)>;

/// The bucket width of the batches `POST /v1/events` makes.
const EVENTS_BUCKET_MS: i64 = 1000;

/// Most events one `POST /v1/events` request may hold (more: 413 `too_many_events`).
pub const MAX_EVENTS_PER_REQUEST: usize = 100_000;
/// Most rejections listed one by one in a reply; the rest are counted by reason.
pub const MAX_LISTED_REJECTIONS: usize = 100;

/// A JSON scalar as an event field sees it; arrays and objects are skipped unread
/// (`IgnoredAny`), so a hostile field costs no memory.
enum Scalar {
    Int(i64),
    Float(f64),
    Str(String),
    Null,
    Other(&'static str),
}

impl<'de> serde::Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
                Ok(i64::try_from(v).map_or(Scalar::Float(v as f64), Scalar::Int))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar::Str(v))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Scalar, E> {
                Ok(Scalar::Other("a boolean"))
            }
            fn visit_unit<E>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Scalar, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other("an array"))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Scalar, A::Error> {
                while a
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Scalar::Other("an object"))
            }
        }
        d.deserialize_any(V)
    }
}

impl Scalar {
    /// What it is, for messages.
    fn kind(&self) -> &'static str {
        match self {
            Scalar::Int(_) | Scalar::Float(_) => "a number",
            Scalar::Str(_) => "a string",
            Scalar::Null => "null",
            Scalar::Other(k) => k,
        }
    }
}

/// At most `n` characters of attacker-chosen text for a message.
fn clip(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// One element of the events array (or one NDJSON line), read field by field straight from
/// the JSON text: memory per event is its own strings, whatever the element holds.
struct EventItem(EventResult);

impl<'de> serde::Deserialize<'de> for EventItem {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<EventItem, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = EventItem;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an event object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<EventItem, A::Error> {
                let (mut ts, mut cat, mut ent, mut val) = (None, None, None, None);
                let mut problem: Option<(RejectCode, String)> = None;
                while let Some(k) = a.next_key::<std::borrow::Cow<'de, str>>()? {
                    let slot = match &*k {
                        "ts_ms" => &mut ts,
                        "category" => &mut cat,
                        "entity" => &mut ent,
                        "value" => &mut val,
                        other => {
                            problem.get_or_insert((
                                RejectCode::InvalidEvent,
                                format!("unknown field {:?}", clip(other, 40)),
                            ));
                            a.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    let v = a.next_value::<Scalar>()?;
                    if slot.replace(v).is_some() {
                        problem.get_or_insert((
                            RejectCode::InvalidEvent,
                            format!("field {:?} given twice", &*k),
                        ));
                    }
                }
                if let Some(p) = problem {
                    return Ok(EventItem(Err(p)));
                }
                Ok(EventItem(event_fields(ts, cat, ent, val)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<EventItem, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(not_an_object())
            }
            fn visit_i64<E>(self, _: i64) -> Result<EventItem, E> {
                Ok(not_an_object())
            }
            fn visit_u64<E>(self, _: u64) -> Result<EventItem, E> {
                Ok(not_an_object())
            }
            fn visit_f64<E>(self, _: f64) -> Result<EventItem, E> {
                Ok(not_an_object())
            }
            fn visit_str<E>(self, _: &str) -> Result<EventItem, E> {
                Ok(not_an_object())
            }
            fn visit_bool<E>(self, _: bool) -> Result<EventItem, E> {
                Ok(not_an_object())
            }
            fn visit_unit<E>(self) -> Result<EventItem, E> {
                Ok(not_an_object())
            }
        }
        d.deserialize_any(V)
    }
}

fn not_an_object() -> EventItem {
    EventItem(Err((
        RejectCode::InvalidEvent,
        "an event must be a JSON object".to_string(),
    )))
}

/// Checks an event's fields by type (values and ranges are the builder's to check).
fn event_fields(
    ts: Option<Scalar>,
    cat: Option<Scalar>,
    ent: Option<Scalar>,
    val: Option<Scalar>,
) -> EventResult {
    let ts = match ts {
        Some(Scalar::Int(n)) => n,
        Some(Scalar::Float(_)) => {
            return Err((
                RejectCode::InvalidTimestamp,
                "ts_ms must be an integer number of milliseconds".into(),
            ))
        }
        Some(_) => {
            return Err((
                RejectCode::InvalidTimestamp,
                "ts_ms must be a number".into(),
            ))
        }
        None => return Err((RejectCode::InvalidEvent, "ts_ms is required".into())),
    };
    let category = match cat {
        Some(Scalar::Str(s)) => s,
        Some(other) => {
            return Err((
                RejectCode::InvalidCategory,
                format!("category must be a string, not {}", other.kind()),
            ))
        }
        None => return Err((RejectCode::InvalidEvent, "category is required".into())),
    };
    let entity = match ent {
        None | Some(Scalar::Null) => None,
        Some(Scalar::Str(s)) => Some(s),
        Some(other) => {
            return Err((
                RejectCode::InvalidEntity,
                format!("entity must be a string, not {}", other.kind()),
            ))
        }
    };
    let value = match val {
        None => 1.0,
        Some(Scalar::Int(n)) => n as f64,
        Some(Scalar::Float(x)) => x,
        Some(other) => {
            return Err((
                RejectCode::InvalidValue,
                format!("value must be a number, not {}", other.kind()),
            ))
        }
    };
    Ok((ts, category, entity, value))
}

/// Why an event was refused, for a rejection whose code says it (the SDK's `record` checks).
pub fn event_reason(code: RejectCode) -> &'static str {
    match code {
        RejectCode::InvalidCategory => {
            "category must be 1-200 bytes of UTF-8 without control characters"
        }
        RejectCode::InvalidEntity => {
            "entity must be 1-200 bytes of UTF-8 without control characters"
        }
        RejectCode::InvalidValue => "value must be finite with |value| <= 1e15",
        RejectCode::InvalidTimestamp => "ts_ms is outside the representable range",
        RejectCode::BucketTooOld => "ts_ms is older than max_lateness",
        RejectCode::FutureTimestamp => "ts_ms is further ahead than max_future_skew",
        _ => "rejected",
    }
}

fn too_large(code: &'static str, message: String) -> ApiError {
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        code,
        message,
    }
}

/// The pure part of `POST /v1/events`: folds the events of one request, in order, into one
/// batch's worth of summaries and a bounded list of rejections. No I/O, no clock (`now` is
/// given). A request is applied all or nothing, so it must fit one batch.
struct EventsFold {
    limits: edgetally_core::Limits,
    now: i64,
    /// Per-category value bounds (admission), checked per event.
    admission: Arc<crate::admission::Admission>,
    builder: BatchBuilder,
    categories: BTreeSet<String>,
    entities: BTreeSet<String>,
    events: usize,
    accepted: u64,
    max_ts: i64,
    listed: Vec<Value>,
    by_reason: BTreeMap<&'static str, u64>,
    /// Why the whole request is refused, once it is.
    refused: Option<ApiError>,
    /// An `Idempotency-Key` request: what it applies must be a function of its events alone
    /// (never of the clock, the node or its settings), so the events are checked on their
    /// own first and the clock and settings are checked for the request as a whole.
    keyed: bool,
    /// Keyed: the canonical form of the events read (each event's fields, or its rejection's
    /// code), so a body reformatted (whitespace, key order, `1` for `1.0`) is the same request.
    canonical: sha2::Sha256,
    /// Keyed: events valid on their own that the clock or a setting refuses here, now, with
    /// their index (the first [`MAX_LISTED_REJECTIONS`]) and counted by reason. Kept apart from
    /// the events' own rejections: a replay answers with those alone, as the first
    /// application did.
    refused_here: u64,
    here_listed: Vec<Value>,
    here_by_reason: BTreeMap<&'static str, u64>,
}

impl EventsFold {
    fn new(
        limits: edgetally_core::Limits,
        now: i64,
        admission: Arc<crate::admission::Admission>,
    ) -> Result<EventsFold, ApiError> {
        Ok(EventsFold {
            limits,
            now,
            admission,
            builder: BatchBuilder::new(EVENTS_BUCKET_MS as u32)
                .map_err(|_| bad("internal", "bucket width"))?,
            categories: BTreeSet::new(),
            entities: BTreeSet::new(),
            events: 0,
            accepted: 0,
            max_ts: i64::MIN,
            listed: Vec::new(),
            by_reason: BTreeMap::new(),
            refused: None,
            keyed: false,
            canonical: sha2::Digest::new(),
            refused_here: 0,
            here_listed: Vec::new(),
            here_by_reason: BTreeMap::new(),
        })
    }

    /// Adds an event's canonical form to the request's (keyed requests only).
    fn canon(&mut self, event: Result<(i64, &str, Option<&str>, f64), RejectCode>) {
        use sha2::Digest as _;
        if !self.keyed {
            return;
        }
        let h = &mut self.canonical;
        match event {
            Err(code) => {
                h.update([0]);
                h.update((code as u16).to_le_bytes());
            }
            Ok((ts, cat, ent, value)) => {
                h.update([1]);
                h.update(ts.to_le_bytes());
                h.update((cat.len() as u32).to_le_bytes());
                h.update(cat.as_bytes());
                match ent {
                    None => h.update([0]),
                    Some(e) => {
                        h.update([1]);
                        h.update((e.len() as u32).to_le_bytes());
                        h.update(e.as_bytes());
                    }
                }
                h.update(value.to_bits().to_le_bytes());
            }
        }
    }

    /// The clock and setting checks of one event valid on its own: its bucket (of the fold's
    /// 1 s width) within the time window (`Limits::check_bucket_time`, the rule every merger
    /// applies to a batch), its value within the category's bounds.
    fn check_here(&self, ts: i64, cat: &str, value: f64) -> Result<(), RejectCode> {
        let start = ts.div_euclid(EVENTS_BUCKET_MS) * EVENTS_BUCKET_MS;
        self.limits
            .check_bucket_time(start, EVENTS_BUCKET_MS, self.now)?;
        if !self.admission.value_in_bounds(cat, value) {
            return Err(RejectCode::ValueOutOfBounds);
        }
        Ok(())
    }

    fn reject(&mut self, index: usize, code: RejectCode, message: String) {
        *self.by_reason.entry(code.as_str()).or_insert(0) += 1;
        if self.listed.len() < MAX_LISTED_REJECTIONS {
            self.listed
                .push(json!({"index": index, "error": code.as_str(), "message": message}));
        }
    }

    /// Takes the next event; `false` once the request is refused whole.
    fn event(&mut self, item: EventResult) -> bool {
        let index = self.events;
        self.events += 1;
        if self.events > MAX_EVENTS_PER_REQUEST {
            self.refused = Some(too_large(
                "too_many_events",
                format!("at most {MAX_EVENTS_PER_REQUEST} events per request; split it"),
            ));
            return false;
        }
        let (ts, cat, ent, value) = match item {
            Ok(x) => x,
            Err((code, msg)) => {
                self.canon(Err(code));
                self.reject(index, code, msg);
                return true;
            }
        };
        let folded = if self.keyed {
            // The event on its own first: what a keyed request holds depends on its events
            // alone. The clock and the settings are then checked for the whole request.
            let r = self.builder.record(&cat, ent.as_deref(), ts, value);
            self.canon(r.map(|()| (ts, cat.as_str(), ent.as_deref(), value)));
            if let (Ok(()), Err(code)) = (r, self.check_here(ts, &cat, value)) {
                self.refused_here += 1;
                *self.here_by_reason.entry(code.as_str()).or_insert(0) += 1;
                if self.here_listed.len() < MAX_LISTED_REJECTIONS {
                    self.here_listed.push(json!({"index": index, "error": code.as_str(), "message": event_reason(code)}));
                }
            }
            r
        } else {
            self.check_here(ts, &cat, value)
                .and_then(|()| self.builder.record(&cat, ent.as_deref(), ts, value))
        };
        match folded {
            Ok(()) => {
                self.accepted += 1;
                self.max_ts = self.max_ts.max(ts);
                if !self.categories.contains(&cat) {
                    self.categories.insert(cat);
                }
                if let Some(e) = ent {
                    self.entities.insert(e);
                }
                let l = &self.limits;
                if self.builder.len() > l.max_summaries
                    || self.categories.len() > l.max_categories
                    || self.entities.len() > l.max_entities
                {
                    self.refused = Some(too_large(
                        "request_too_large",
                        format!(
                            "a request is applied as one batch: at most {} distinct (category, entity, second), {} categories and {} entities; split it",
                            l.max_summaries, l.max_categories, l.max_entities
                        ),
                    ));
                    return false;
                }
            }
            Err(code) => self.reject(index, code, event_reason(code).to_string()),
        }
        true
    }

    /// Reads a JSON array of events element by element.
    fn array(&mut self, text: &str) -> Result<(), ApiError> {
        struct Each<'a>(&'a mut EventsFold);
        impl<'de> serde::de::Visitor<'de> for Each<'_> {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON array of events")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
                while let Some(EventItem(e)) = a.next_element()? {
                    if !self.0.event(e) {
                        return Err(serde::de::Error::custom("refused"));
                    }
                }
                Ok(())
            }
        }
        use serde::Deserializer as _;
        let mut de = serde_json::Deserializer::from_str(text);
        let read = de.deserialize_seq(Each(self)).and_then(|()| de.end());
        if let Some(e) = self.refused.take() {
            return Err(e);
        }
        read.map_err(|e| {
            bad(
                "malformed",
                format!("body is not a JSON array of events: {e}"),
            )
        })
    }

    /// Reads NDJSON: one event per non-empty line; a line that is not JSON is rejected alone.
    fn ndjson(&mut self, text: &str) -> Result<(), ApiError> {
        // Lines end in LF, CRLF or a lone CR (as some exporters write them).
        for line in text.split(['\n', '\r']).filter(|l| !l.trim().is_empty()) {
            let item = serde_json::from_str::<EventItem>(line)
                .map(|EventItem(e)| e)
                .unwrap_or_else(|e| Err((RejectCode::Malformed, format!("line is not JSON: {e}"))));
            if !self.event(item) {
                break;
            }
        }
        self.refused.take().map_or(Ok(()), Err)
    }
}

/// The batch id of a keyed request: the epoch from the `Idempotency-Key` alone, the seq from
/// the key and the request's canonical events. A retry of the same request carries the same
/// id and counts once, on every node, across restarts (the seen-sets are durable and
/// replicated); the same key with other events is another seq of the same epoch, which is how
/// a reused key is told apart (422 `idempotency_key_reused`) without any state of its own.
fn keyed_batch_id(
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
enum KeyState {
    Fresh,
    Applied,
    Reused,
}

fn key_state(replica: &edgetally_core::Replica, id: &BatchId) -> KeyState {
    match replica.epoch_seqs(&id.producer, id.epoch) {
        Some(s) if s.contains(id.seq) => KeyState::Applied,
        Some(s) if !s.is_empty() => KeyState::Reused,
        _ => KeyState::Fresh,
    }
}

async fn events(
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

fn internal(message: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        code: "internal",
        message,
    }
}

/// Seals the batch of a request's events with the events key and applies it: here, or in a
/// shard-group cluster at the events key's owner group. 413 if it is over the payload limit.
async fn submit_events(
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
fn refused_whole(fold: &EventsFold) -> Response {
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

async fn batches(
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

async fn status(State(node): State<Node_>) -> Json<Value> {
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

async fn metrics(State(node): State<Node_>) -> Response {
    let (entries, epochs) = {
        let r = node.state();
        (r.entry_count(), r.epoch_count())
    };
    let stored = node.store.batch_count().unwrap_or(0);
    let series = node.state().series_count();
    let adm = &node.admission;
    let (tracked_producers, tracked_sources) = adm.tracked();
    let text = node.metrics.render(&[
        (
            "edgetally_series",
            "Series held (per category, entity, no-entity and producer); refused past max_series.",
            series as f64,
        ),
        (
            "edgetally_admission_allowlist_keys",
            "Producer keys on the allowlist in force.",
            adm.allowlist_len() as f64,
        ),
        (
            "edgetally_admission_enrolled_producers",
            "Producer keys enrolled by a credential (expired ones are swept every 30 s).",
            adm.enrolled_len() as f64,
        ),
        (
            "edgetally_admission_tracked_producers",
            "Producers tracked by the rate limits and hourly quotas.",
            tracked_producers as f64,
        ),
        (
            "edgetally_admission_tracked_sources",
            "Source addresses tracked by the per-source rate limit.",
            tracked_sources as f64,
        ),
        (
            "edgetally_tier_entries",
            "Stored tier entries (a measure of state size).",
            entries as f64,
        ),
        (
            "edgetally_producer_epochs",
            "Distinct (producer, epoch) seen-sets.",
            epochs as f64,
        ),
        (
            "edgetally_stored_batches",
            "Batches in the store not yet covered by a snapshot.",
            stored as f64,
        ),
        (
            "edgetally_quarantined_batches",
            "Stored batches set aside at start-up because they could not be replayed (see the data directory's quarantine/).",
            node.quarantined as f64,
        ),
        (
            "edgetally_log_torn_bytes",
            "Bytes of torn log tails found at start-up (commits cut short; kept on disk, never acknowledged).",
            node.store.torn_tails().1 as f64,
        ),
        (
            "edgetally_uptime_seconds",
            "Seconds since start.",
            node.started.elapsed().as_secs_f64(),
        ),
    ]);
    let mut text = text;
    {
        use std::fmt::Write;
        let st = &adm.stats;
        type Labelled<'a> = (
            &'a str,
            &'a str,
            &'a [(&'a str, &'a std::sync::atomic::AtomicU64)],
        );
        let labelled: [Labelled; 2] = [
            (
                "edgetally_throttled_total",
                "Batches answered Retry by a rate limit, by scope.",
                &[
                    ("scope=\"producer\"", &st.throttled_producer),
                    ("scope=\"source\"", &st.throttled_source),
                ],
            ),
            (
                "edgetally_credentials_total",
                "Enrolment credentials presented, by result.",
                &[
                    ("result=\"accepted\"", &st.credentials_accepted),
                    ("result=\"refused\"", &st.credentials_refused),
                ],
            ),
        ];
        for (name, help, series) in labelled {
            let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, v) in series {
                let _ = writeln!(text, "{name}{{{labels}}} {}", v.load(Relaxed));
            }
        }
        let memory = node.state().memory();
        let name = "edgetally_memory_bytes";
        let _ = writeln!(
            text,
            "# HELP {name} Estimated heap bytes of the node's state, by kind (sizes times counts, at typical table fill): seen-sets, producer keys, series headers, tier entries, strings, retained batches, admission state.\n# TYPE {name} gauge"
        );
        for (kind, v) in memory
            .by_kind()
            .into_iter()
            .chain([("admission", adm.memory_bytes())])
        {
            let _ = writeln!(text, "{name}{{kind=\"{kind}\"}} {v}");
        }
        let name = "edgetally_allowlist_load_errors_total";
        let _ = writeln!(
            text,
            "# HELP {name} Allowlist reads that failed (the previous list stays in force).\n# TYPE {name} counter\n{name} {}",
            st.allowlist_errors.load(Relaxed)
        );
    }
    if let Some(c) = &node.cluster {
        use std::fmt::Write;
        let m = &c.metrics;
        let name = "edgetally_forwarded_total";
        let _ = writeln!(
            text,
            "# HELP {name} Producers' batches for another shard group, by outcome (sent: the owner replied; failed: no replica of it did, the producer got Retry; received: forwarded here by another group's node).\n# TYPE {name} counter"
        );
        for (outcome, v) in [
            ("sent", &m.forwarded_ok),
            ("failed", &m.forward_failed),
            ("received", &m.received_forwarded),
        ] {
            let _ = writeln!(text, "{name}{{outcome=\"{outcome}\"}} {}", v.load(Relaxed));
        }
        let name = "edgetally_forward_replica_failures_total";
        let _ = writeln!(
            text,
            "# HELP {name} Forward attempts to one replica of another group that failed (the replica is then remembered as down, tried last and probed in the background).\n# TYPE {name} counter\n{name} {}",
            m.forward_replica_failed.load(Relaxed)
        );
        let name = "edgetally_forward_replicas_down";
        let _ = writeln!(
            text,
            "# HELP {name} Replicas of other groups remembered as down.\n# TYPE {name} gauge\n{name} {}",
            c.replicas_down().len()
        );
        let name = "edgetally_topology_reloads_total";
        let _ = writeln!(
            text,
            "# HELP {name} Topology file reloads, by result (past_reroute: applied, but it re-routed creation times already past).\n# TYPE {name} counter"
        );
        for (result, v) in [
            ("applied", &m.reloads),
            ("refused", &m.reloads_refused),
            ("past_reroute", &m.past_reroutes),
        ] {
            let _ = writeln!(text, "{name}{{result=\"{result}\"}} {}", v.load(Relaxed));
        }
        let name = "edgetally_topology_version";
        let _ = writeln!(
            text,
            "# HELP {name} Version of the topology in force.\n# TYPE {name} gauge\n{name} {}",
            c.topology().version
        );
        let name = "edgetally_topology_adoptions_total";
        let _ = writeln!(
            text,
            "# HELP {name} Newer topologies adopted from another node (in-band).\n# TYPE {name} counter\n{name} {}",
            m.adoptions.load(Relaxed)
        );
        let name = "edgetally_handoffs_pending";
        let _ = writeln!(
            text,
            "# HELP {name} Groups whose hand-off to this node's group at the version in force is pending (batches an earlier map gave them get Retry here).\n# TYPE {name} gauge\n{name} {}",
            c.handoffs_pending().len()
        );
        let name = "edgetally_applied_elsewhere_total";
        let _ = writeln!(
            text,
            "# HELP {name} Producer batches acknowledged without applying: another group applied them before handing over.\n# TYPE {name} counter\n{name} {}",
            m.applied_elsewhere.load(Relaxed)
        );
        let name = "edgetally_topology_settled";
        let _ = writeln!(
            text,
            "# HELP {name} 1 when every node heard from routes by this node's topology version, without conflict or pending hand-off.\n# TYPE {name} gauge\n{name} {}",
            u8::from(c.settled())
        );
        let name = "edgetally_query_parts_missing_total";
        let _ = writeln!(
            text,
            "# HELP {name} Other groups' parts of cluster-wide queries that did not arrive within query_deadline_ms (the answer was marked incomplete).\n# TYPE {name} counter\n{name} {}",
            m.parts_missing.load(Relaxed)
        );
    }
    if let Some(repl) = &node.replication {
        use std::fmt::Write;
        let now = now_ms();
        let status = repl.status();
        let r = node.state();
        for (name, help) in [
            (
                "edgetally_peer_reachable",
                "1 if the link to the peer is up and its last pull round succeeded.",
            ),
            (
                "edgetally_peer_lag_batches",
                "Batches retained here that the peer's last digest lacks.",
            ),
            (
                "edgetally_peer_lag_seconds",
                "Seconds since the last completed pull round from the peer.",
            ),
            (
                "edgetally_peer_digest_batches",
                "Batches the peer's last digest covers.",
            ),
        ] {
            let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (addr, p) in &status {
                let v = match name {
                    "edgetally_peer_reachable" => f64::from(u8::from(p.reachable)),
                    "edgetally_peer_lag_batches" => r.lag_of(&addr.to_string()).unwrap_or(0) as f64,
                    "edgetally_peer_lag_seconds" if p.last_sync_ms > 0 => {
                        (now - p.last_sync_ms) as f64 / 1000.0
                    }
                    "edgetally_peer_lag_seconds" => f64::NAN,
                    _ => p.digest_batches as f64,
                };
                let _ = writeln!(text, "{name}{{peer=\"{addr}\"}} {v}");
            }
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
