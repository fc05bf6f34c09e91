//! The merger's QUIC listener: one bidirectional stream per batch, many in flight per
//! connection, over raw QUIC (ALPN `edgetally/1`) or inside a WebTransport session (ALPN `h3`,
//! what browsers speak; the session's URL path must be [`WEBTRANSPORT_PATH`]). Both carry the
//! same bytes: the batch envelope, finished; the bare reply, finished. The node logic sits
//! behind [`BatchSink`].

use crate::tls::{ALPN_BATCHES, ALPN_H3, ALPN_PEER, ALPN_PEER_EARLIER};
use edgetally_core::RejectCode;
use edgetally_proto::Reply;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

/// The URL path of the WebTransport session a browser opens for batches
/// (`https://<quic addr>/v1/webtransport`).
pub const WEBTRANSPORT_PATH: &str = "/v1/webtransport";

/// How a batch arrived on the QUIC port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Raw QUIC, ALPN `edgetally/1`.
    Quic,
    /// A WebTransport session (HTTP/3).
    WebTransport,
}

impl Transport {
    /// The label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::WebTransport => "webtransport",
        }
    }
}

/// Where received batches go: the merger's ingest pipeline.
pub trait BatchSink: Send + Sync + 'static {
    /// Handles one stream's message (the exact bytes received: a batch, or an enrolment
    /// credential) from `source` over `transport`, and says what to reply.
    fn submit(
        &self,
        raw: Vec<u8>,
        source: IpAddr,
        transport: Transport,
    ) -> impl Future<Output = Reply> + Send;
    /// The largest batch accepted, bytes (longer streams are refused unread).
    fn max_batch_bytes(&self) -> usize;
    /// Told of a batch the listener refused itself (a stream longer than the limit).
    fn refused(&self, code: RejectCode);
    /// Serves a connection that negotiated the peer ALPN (merger-to-merger replication).
    /// Without replication, the connection is refused.
    fn peer(self: Arc<Self>, conn: quinn::Connection) -> impl Future<Output = ()> + Send {
        async move { conn.close(1u32.into(), b"no replication here") }
    }
    /// A connection that negotiated the peer ALPN of an earlier release (`alpn`): the two
    /// nodes cannot replicate. Refused; a merger reports it.
    fn earlier_peer(&self, conn: quinn::Connection, alpn: &[u8]) {
        let _ = alpn;
        conn.close(3u32.into(), b"a later peer protocol: upgrade this node");
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
        Some(a) if ALPN_PEER_EARLIER.contains(&a) => return sink.earlier_peer(conn, a),
        Some(ALPN_H3) => return webtransport(conn, sink, budget).await,
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
            Ok(pair) => {
                let sink = sink.clone();
                let budgets = [budget.clone(), mine.clone()];
                tokio::spawn(stream(pair, sink, budgets, source, Transport::Quic));
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

/// A browser's connection: the HTTP/3 handshake and the CONNECT request (within
/// [`STREAM_DEADLINE`]), then one batch per bidirectional stream of the session, as on raw QUIC.
async fn webtransport<S: BatchSink>(conn: quinn::Connection, sink: Arc<S>, budget: Arc<Semaphore>) {
    let source = conn.remote_address().ip();
    let request = match tokio::time::timeout(
        STREAM_DEADLINE,
        web_transport_quinn::Request::accept(conn.clone()),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            debug!(%source, "webtransport handshake failed: {e}");
            return conn.close(1u32.into(), b"webtransport handshake failed");
        }
        Err(_) => return conn.close(1u32.into(), b"webtransport handshake timed out"),
    };
    if request.url.path() != WEBTRANSPORT_PATH {
        let _ = request
            .reject(web_transport_quinn::http::StatusCode::NOT_FOUND)
            .await;
        return;
    }
    let session = match request.ok().await {
        Ok(s) => s,
        Err(e) => return debug!(%source, "webtransport session not accepted: {e}"),
    };
    debug!(%source, "webtransport session opened");
    let mine = Arc::new(Semaphore::new(CONNECTION_BUFFER_BUDGET));
    loop {
        match session.accept_bi().await {
            Ok(pair) => {
                let sink = sink.clone();
                let budgets = [budget.clone(), mine.clone()];
                tokio::spawn(stream(pair, sink, budgets, source, Transport::WebTransport));
            }
            Err(e) => {
                debug!("webtransport session ended: {e}");
                break;
            }
        }
    }
}

/// One bidirectional stream, raw QUIC or WebTransport: what [`stream`] needs of it.
trait Duplex: Send + 'static {
    /// The next chunk of the request, `None` at its end.
    fn chunk(
        &mut self,
        max: usize,
    ) -> impl Future<Output = Result<Option<quinn::Chunk>, String>> + Send;
    /// Asks the client to stop sending (the request was refused unread).
    fn stop(&mut self);
    /// Writes the reply and finishes the stream.
    fn reply(&mut self, bytes: &[u8]) -> impl Future<Output = Result<(), String>> + Send;
}

impl Duplex for (quinn::SendStream, quinn::RecvStream) {
    async fn chunk(&mut self, max: usize) -> Result<Option<quinn::Chunk>, String> {
        self.1
            .read_chunk(max, true)
            .await
            .map_err(|e| e.to_string())
    }
    fn stop(&mut self) {
        let _ = self.1.stop(0u32.into());
    }
    async fn reply(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.0.write_all(bytes).await.map_err(|e| e.to_string())?;
        let _ = self.0.finish();
        Ok(())
    }
}

impl Duplex
    for (
        web_transport_quinn::SendStream,
        web_transport_quinn::RecvStream,
    )
{
    async fn chunk(&mut self, max: usize) -> Result<Option<quinn::Chunk>, String> {
        self.1
            .read_chunk(max, true)
            .await
            .map_err(|e| e.to_string())
    }
    fn stop(&mut self) {
        let _ = self.1.stop(0);
    }
    async fn reply(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.0.write_all(bytes).await.map_err(|e| e.to_string())?;
        let _ = self.0.finish();
        Ok(())
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
async fn read_budgeted<D: Duplex>(
    io: &mut D,
    max: usize,
    budgets: &[Arc<Semaphore>; 2],
) -> Result<(Vec<u8>, Vec<OwnedSemaphorePermit>), ReadEnd> {
    let mut buf = Vec::new();
    let mut permits = Vec::new();
    loop {
        match io.chunk(64 << 10).await {
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
            Err(e) => return Err(ReadEnd::Failed(e)),
        }
    }
}

async fn stream<S: BatchSink, D: Duplex>(
    mut io: D,
    sink: Arc<S>,
    budgets: [Arc<Semaphore>; 2],
    source: IpAddr,
    transport: Transport,
) {
    // A batch is one stream: the client writes its bytes and finishes; we reply and finish.
    let max = sink.max_batch_bytes();
    let read = tokio::time::timeout(STREAM_DEADLINE, read_budgeted(&mut io, max, &budgets))
        .await
        .unwrap_or_else(|_| Err(ReadEnd::Failed("not finished within the deadline".into())));
    let reply = match read {
        Ok((raw, _permits)) => sink.submit(raw, source, transport).await,
        Err(ReadEnd::TooLong) => {
            io.stop();
            sink.refused(RejectCode::PayloadTooLarge);
            Reply::nack(RejectCode::PayloadTooLarge)
        }
        Err(ReadEnd::OverBudget) => {
            io.stop();
            Reply::Retry {
                after_ms: BUSY_RETRY_MS,
            }
        }
        Err(ReadEnd::Failed(e)) => {
            debug!("stream read failed: {e}");
            io.stop();
            return;
        }
    };
    if let Err(e) = io.reply(&reply.encode()).await {
        warn!("reply not sent: {e}");
    }
}
