//! # edgetally-net
//!
//! quinn + tokio drivers: the merger's QUIC server ([`server`]), a native client for sending
//! sealed batches ([`client`]), and certificate generation and pinning ([`tls`]). The
//! protocol itself (what the bytes mean) lives in `edgetally-proto`; this crate only moves
//! them.

pub mod client;
pub mod producer;
pub mod server;
pub mod tls;

pub use client::{Client, SendError};
pub use producer::{Endpoint, NativeProducer};
pub use server::{serve, BatchSink};
pub use tls::{Identity, ALPN_BATCHES};
