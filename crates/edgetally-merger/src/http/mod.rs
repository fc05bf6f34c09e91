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
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

mod events;
mod ingest;
mod query;
mod sketch;
mod status;

use events::*;
use ingest::*;
use query::*;
use sketch::*;
use status::*;

pub use events::event_reason;
pub use ingest::reply_response;

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
        include_str!("../../assets/dashboard.js"),
    ),
    (
        "dashboard.css",
        "text/css; charset=utf-8",
        include_str!("../../assets/dashboard.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/vendor/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("../../assets/vendor/uPlot.min.css"),
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
        include_str!("../../assets/dashboard.html"),
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
