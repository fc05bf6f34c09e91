//! The merger's QUIC listener: one bidirectional stream per batch, many in flight per
//! connection. The node logic sits behind [`BatchSink`].

use crate::tls::{ALPN_BATCHES, ALPN_PEER};
use edgetally_core::RejectCode;
use edgetally_proto::Reply;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Where received batches go: the merger's ingest pipeline.
pub trait BatchSink: Send + Sync + 'static {
    /// Handles one batch (the exact bytes received) and says what to reply.
    fn submit(&self, raw: Vec<u8>) -> impl Future<Output = Reply> + Send;
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

/// Accepts connections until `shutdown` turns true, then closes the endpoint gracefully.
pub async fn serve<S: BatchSink>(
    endpoint: quinn::Endpoint,
    sink: Arc<S>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let sink = sink.clone();
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(conn) => connection(conn, sink).await,
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

async fn connection<S: BatchSink>(conn: quinn::Connection, sink: Arc<S>) {
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
    debug!(remote = %conn.remote_address(), "producer connected");
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let sink = sink.clone();
                tokio::spawn(stream(send, recv, sink));
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

async fn stream<S: BatchSink>(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    sink: Arc<S>,
) {
    // A batch is one stream: the client writes its bytes and finishes; we reply and finish.
    let reply = match recv.read_to_end(sink.max_batch_bytes() + 16).await {
        Ok(raw) => sink.submit(raw).await,
        Err(quinn::ReadToEndError::TooLong) => {
            let _ = recv.stop(0u32.into());
            sink.refused(RejectCode::PayloadTooLarge);
            Reply::nack(RejectCode::PayloadTooLarge)
        }
        Err(e) => {
            debug!("stream read failed: {e}");
            return;
        }
    };
    if let Err(e) = send.write_all(&reply.encode()).await {
        warn!("reply not sent: {e}");
        return;
    }
    let _ = send.finish();
}
