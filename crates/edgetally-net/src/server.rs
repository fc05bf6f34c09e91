//! The merger's QUIC listener: one bidirectional stream per batch, many in flight per
//! connection. The node logic sits behind [`BatchSink`].

use crate::tls::{ALPN_BATCHES, ALPN_PEER};
use edgetally_core::RejectCode;
use edgetally_proto::Reply;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

/// Where received batches go: the merger's ingest pipeline.
pub trait BatchSink: Send + Sync + 'static {
    /// Handles one stream's message (the exact bytes received: a batch, or an enrolment
    /// credential) from `source`, and says what to reply.
    fn submit(&self, raw: Vec<u8>, source: IpAddr) -> impl Future<Output = Reply> + Send;
    /// The largest batch accepted, bytes (longer streams are refused unread).
    fn max_batch_bytes(&self) -> usize;
    /// Told of a batch the listener refused itself (a stream longer than the limit).
    fn refused(&self, code: RejectCode);
    /// Serves a connection that negotiated the peer ALPN (merger-to-merger replication).
    /// Without replication, the connection is refused.
    fn peer(self: Arc<Self>, conn: quinn::Connection) -> impl Future<Output = ()> + Send {
        async move { conn.close(1u32.into(), b"no replication here") }
    }
}

/// Most QUIC connections open at once; handshakes past it are refused.
pub const MAX_CONNECTIONS: usize = 4096;
/// Bytes of unfinished batches buffered across all connections; a stream that would pass it
/// is answered `Retry` and stopped, so load is shed instead of memory grown.
pub const BUFFER_BUDGET: usize = 256 << 20;
/// The same, per connection.
pub const CONNECTION_BUFFER_BUDGET: usize = 32 << 20;
/// How long one batch's stream may take to arrive whole.
pub const STREAM_DEADLINE: Duration = Duration::from_secs(10);
/// Suggested delay when a budget is exhausted.
const BUSY_RETRY_MS: u32 = 200;

/// Accepts connections until `shutdown` turns true, then closes the endpoint gracefully.
pub async fn serve<S: BatchSink>(
    endpoint: quinn::Endpoint,
    sink: Arc<S>,
    mut shutdown: watch::Receiver<bool>,
) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let budget = Arc::new(Semaphore::new(BUFFER_BUDGET));
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let Ok(slot) = connections.clone().try_acquire_owned() else {
                    debug!("connection cap reached: handshake refused");
                    incoming.refuse();
                    continue;
                };
                let (sink, budget) = (sink.clone(), budget.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match incoming.await {
                        Ok(conn) => connection(conn, sink, budget).await,
                        Err(e) => debug!("handshake failed: {e}"),
                    }
                });
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() { break; }
            }
        }
    }
    endpoint.close(0u32.into(), b"shutting down");
    info!("quic listener closed");
}

async fn connection<S: BatchSink>(conn: quinn::Connection, sink: Arc<S>, budget: Arc<Semaphore>) {
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    match alpn.as_deref() {
        Some(ALPN_BATCHES) => {}
        Some(ALPN_PEER) => return sink.peer(conn).await,
        _ => {
            conn.close(1u32.into(), b"unsupported alpn");
            return;
        }
    }
    let source = conn.remote_address().ip();
    debug!(%source, "producer connected");
    let mine = Arc::new(Semaphore::new(CONNECTION_BUFFER_BUDGET));
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let sink = sink.clone();
                let budgets = [budget.clone(), mine.clone()];
                tokio::spawn(stream(send, recv, sink, budgets, source));
            }
            Err(quinn::ConnectionError::ApplicationClosed(_))
            | Err(quinn::ConnectionError::LocallyClosed) => break,
            Err(e) => {
                debug!("connection ended: {e}");
                break;
            }
        }
    }
}

/// Why a stream's bytes were not read whole.
enum ReadEnd {
    TooLong,
    OverBudget,
    Failed(String),
}

/// Reads a stream to its end, at most `max` bytes, holding budget permits for what it has
/// buffered (released when the permits drop, with the batch handed on or refused).
async fn read_budgeted(
    recv: &mut quinn::RecvStream,
    max: usize,
    budgets: &[Arc<Semaphore>; 2],
) -> Result<(Vec<u8>, Vec<OwnedSemaphorePermit>), ReadEnd> {
    let mut buf = Vec::new();
    let mut permits = Vec::new();
    loop {
        match recv.read_chunk(64 << 10, true).await {
            Ok(Some(chunk)) => {
                let n = chunk.bytes.len();
                if buf.len() + n > max {
                    return Err(ReadEnd::TooLong);
                }
                for b in budgets {
                    match b.clone().try_acquire_many_owned(n as u32) {
                        Ok(p) => permits.push(p),
                        Err(_) => return Err(ReadEnd::OverBudget),
                    }
                }
                buf.extend_from_slice(&chunk.bytes);
            }
            Ok(None) => return Ok((buf, permits)),
            Err(e) => return Err(ReadEnd::Failed(e.to_string())),
        }
    }
}

async fn stream<S: BatchSink>(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    sink: Arc<S>,
    budgets: [Arc<Semaphore>; 2],
    source: IpAddr,
) {
    // A batch is one stream: the client writes its bytes and finishes; we reply and finish.
    let max = sink.max_batch_bytes() + 16;
    let read = tokio::time::timeout(STREAM_DEADLINE, read_budgeted(&mut recv, max, &budgets))
        .await
        .unwrap_or_else(|_| Err(ReadEnd::Failed("not finished within the deadline".into())));
    let reply = match read {
        Ok((raw, _permits)) => sink.submit(raw, source).await,
        Err(ReadEnd::TooLong) => {
            let _ = recv.stop(0u32.into());
            sink.refused(RejectCode::PayloadTooLarge);
            Reply::nack(RejectCode::PayloadTooLarge)
        }
        Err(ReadEnd::OverBudget) => {
            let _ = recv.stop(0u32.into());
            Reply::Retry {
                after_ms: BUSY_RETRY_MS,
            }
        }
        Err(ReadEnd::Failed(e)) => {
            debug!("stream read failed: {e}");
            let _ = recv.stop(0u32.into());
            return;
        }
    };
    if let Err(e) = send.write_all(&reply.encode()).await {
        warn!("reply not sent: {e}");
        return;
    }
    let _ = send.finish();
}
