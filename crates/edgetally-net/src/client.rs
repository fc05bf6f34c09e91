//! A native QUIC client for sending sealed batches to a merger.

use crate::tls::{pinned_client_config, ALPN_BATCHES};
use edgetally_proto::Reply;
use std::net::SocketAddr;

/// Why a send failed (transport-level: the batch may or may not have arrived; resend it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// Could not connect.
    #[error("connect: {0}")]
    Connect(String),
    /// The server's certificate is not the pinned one (a wrong `--cert-sha256`, or another
    /// server on that port).
    #[error(
        "the server presented certificate sha256 {}, which is not pinned",
        crate::tls::hex(presented)
    )]
    CertificateMismatch {
        /// The SHA-256 of the certificate the server presented.
        presented: [u8; 32],
    },
    /// No answer to the handshake (nothing listening there, or the path drops UDP).
    #[error("no answer to the QUIC handshake (is a merger listening there?)")]
    Unreachable,
    /// The server answered but refused the connection (its connection cap, an unexpected
    /// ALPN, or not an edgetally merger).
    #[error("connection refused: {0}")]
    Refused(String),
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
        let (config, verifier) = pinned_client_config(pins, ALPN_BATCHES)
            .map_err(|e| SendError::Connect(e.to_string()))?;
        endpoint.set_default_client_config(config);
        // The merger does not look at the server name (the pinned hash is the identity).
        let conn = endpoint
            .connect(addr, "localhost")
            .map_err(|e| SendError::Connect(e.to_string()))?
            .await
            .map_err(|e| match (e, verifier.refused()) {
                (_, Some(presented)) => SendError::CertificateMismatch { presented },
                (quinn::ConnectionError::TimedOut, None) => SendError::Unreachable,
                (
                    e @ (quinn::ConnectionError::ConnectionClosed(_)
                    | quinn::ConnectionError::ApplicationClosed(_)
                    | quinn::ConnectionError::TransportError(_)),
                    None,
                ) => SendError::Refused(e.to_string()),
                (e, None) => SendError::Connect(e.to_string()),
            })?;
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
