//! The HTTP listener's connection hygiene: a header-read deadline that also bounds how long
//! an idle keep-alive connection is held, a cap on open connections derived from the file
//! descriptor limit (so hoarded sockets can never starve the store, QUIC or compaction of
//! descriptors), and an accept loop that backs off instead of spinning when descriptors run
//! out. `axum::serve` has none of these knobs; hyper's connection builder has them.

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn};

/// How long a client has to send a request's headers — and, on a kept-alive connection, to
/// start its next request — before the connection is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// File descriptors kept for everything but HTTP connections (store, QUIC, peers, logs).
const FD_RESERVE: u64 = 128;
/// Most HTTP connections open at once, whatever the descriptor limit.
pub const MAX_HTTP_CONNECTIONS: usize = 4096;

/// The soft limit on open files, read from `/proc/self/limits` (no `unsafe` needed).
fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Most HTTP connections this process may hold: half of what the descriptor limit leaves
/// after the reserve, at most [`MAX_HTTP_CONNECTIONS`], at least 16.
pub fn connection_cap() -> usize {
    let cap = open_files_limit().map_or(MAX_HTTP_CONNECTIONS as u64, |n| {
        n.saturating_sub(FD_RESERVE) / 2
    });
    (cap as usize).clamp(16, MAX_HTTP_CONNECTIONS)
}

/// The TLS configuration of the HTTP listener, swapped when the certificate rotates (each
/// new connection takes the current one).
pub type TlsSlot = Arc<RwLock<Arc<rustls::ServerConfig>>>;

/// Serves `app` on `listener` (over TLS when `tls` is given) until `stop` turns true; then
/// lets requests in flight finish (at most 10 s). Handlers see the client's address as
/// `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsSlot>,
    mut stop: watch::Receiver<bool>,
) {
    let cap = connection_cap();
    let slots = Arc::new(Semaphore::new(cap));
    debug!(cap, "http connection cap");
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => {
                if *stop.borrow() { break; } else { continue; }
            }
        };
        let (tcp, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors (or a connection reset before accept): wait, never spin.
                warn!("http accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%remote, "http connection cap reached: refused");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let stop = stop.clone();
        let tls = tls
            .as_ref()
            .map(|t| t.read().unwrap_or_else(|e| e.into_inner()).clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => connection(tcp, remote, app, stop).await,
                Some(cfg) => {
                    // The handshake gets the same deadline as a request's headers.
                    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                    match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => connection(stream, remote, app, stop).await,
                        Ok(Err(e)) => debug!(%remote, "tls handshake failed: {e}"),
                        Err(_) => debug!(%remote, "tls handshake timed out"),
                    }
                }
            }
        });
    }
    // Requests in flight finish (each connection task holds a slot until it ends).
    let _ = tokio::time::timeout(Duration::from_secs(10), slots.acquire_many(cap as u32)).await;
}

/// Serves one connection (plain or TLS) until it ends or `stop` turns true.
async fn connection<IO>(io: IO, remote: SocketAddr, app: Router, mut stop: watch::Receiver<bool>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt as _;
    let svc = TowerToHyperService::new(app.map_request(
        move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(remote));
            req
        },
    ));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => { if let Err(e) = r { debug!(%remote, "http connection: {e}"); } }
        _ = async { while stop.changed().await.is_ok() { if *stop.borrow() { break; } } } => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
        }
    }
}
