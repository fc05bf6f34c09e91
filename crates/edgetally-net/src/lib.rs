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
pub use producer::{Endpoint, LinkError, LinkStatus, NativeProducer};
pub use server::{serve, BatchSink};
pub use tls::{Identity, ALPN_BATCHES, ALPN_H3, ALPN_PEER};

/// Wall-clock milliseconds since the Unix epoch (the drivers' clock; the pure crates take
/// time as an argument).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// 32 bytes from the OS random source (keys, seeds). Failing it is fatal: there is no safe
/// fallback for key material.
pub fn random_seed() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).unwrap_or_else(|e| panic!("no OS randomness: {e}"));
    b
}

/// 64 random bits from the OS random source (epochs, jitter seeds).
pub fn random_u64() -> u64 {
    let s = random_seed();
    u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]])
}
