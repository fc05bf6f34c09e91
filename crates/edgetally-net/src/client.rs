//! A native QUIC client for sending sealed batches to a merger.

use crate::tls::{client_config, ALPN_BATCHES};
use edgetally_proto::Reply;
use std::net::SocketAddr;

/// Why a send failed (transport-level: the batch may or may not have arrived; resend it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// Could not connect.
    #[error("connect: {0}")]
    Connect(String),
    /// The stream failed.
    #[error("stream: {0}")]
    Stream(String),
    /// The reply was not a valid reply.
    #[error("bad reply")]
    BadReply,
}

/// One QUIC connection to one merger.
#[derive(Debug, Clone)]
pub struct Client {
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
}

impl Client {
    /// Connects to `addr`, accepting only a server certificate whose SHA-256 is in `pins`.
    pub async fn connect(addr: SocketAddr, pins: Vec<[u8; 32]>) -> Result<Client, SendError> {
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .map_err(|_| SendError::Connect("bind".into()))?;
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| SendError::Connect(e.to_string()))?;
        endpoint.set_default_client_config(
            client_config(pins, ALPN_BATCHES).map_err(|e| SendError::Connect(e.to_string()))?,
        );
        let conn = endpoint
            .connect(addr, "localhost")
            .map_err(|e| SendError::Connect(e.to_string()))?
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        Ok(Client { conn, endpoint })
    }

    /// Sends one sealed batch on its own stream and waits for the merger's reply. Many calls
    /// may run concurrently on one client (they are pipelined on separate streams).
    pub async fn send(&self, sealed: &[u8]) -> Result<Reply, SendError> {
        let (mut send, mut recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| SendError::Stream(self.why(e.to_string())))?;
        // A merger that refuses a batch unread (too large) stops our send side but still
        // replies with its reason: read the reply whatever became of the write.
        let wrote = match send.write_all(sealed).await {
            Ok(()) => send
                .finish()
                .map_err(|e| SendError::Stream(self.why(e.to_string()))),
            Err(e) => Err(SendError::Stream(self.why(e.to_string()))),
        };
        match recv.read_to_end(16).await {
            Ok(reply) => Reply::decode(&reply).map_err(|_| SendError::BadReply),
            Err(e) => Err(wrote
                .err()
                .unwrap_or_else(|| SendError::Stream(self.why(e.to_string())))),
        }
    }

    /// A stream error, with the connection's own reason when it is gone ("reset by peer" when
    /// the merger restarted, "timed out" when it vanished).
    fn why(&self, e: String) -> String {
        match self.conn.close_reason() {
            Some(reason) => format!("{e}: {reason}"),
            None => e,
        }
    }

    /// The underlying QUIC connection (for tools that drive streams themselves).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Closes the connection and waits for the endpoint to finish.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}
