//! # edgetally-merger
//!
//! The merger node: crash-safe storage ([`store`]), the ingest pipeline ([`ingest`]), the
//! HTTP API ([`http`]), metrics ([`metrics`]), configuration ([`config`]) and the running node
//! that ties them together ([`node`]).

pub mod admission;
pub use edgetally_store::check;
pub mod cluster;
pub mod config;
pub use edgetally_export as export;
pub mod handshake;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod node;
mod node_metrics;
pub mod peer;
pub mod promread;
pub mod replication;
pub mod scatter;
pub mod serve_http;
pub mod sketch_policy;
pub mod start;
pub use edgetally_store as store;

pub use config::Config;
pub use node::Node;
pub use start::Running;
