//! The one integration-test binary: a module per concern.

mod admission;
mod certs;
mod cli;
mod cluster;
mod convergence;
mod crashers;
mod crdt_laws;
mod demo;
mod deploy;
mod expiry;
mod export;
mod fixtures;
mod groups;
mod groups_sim;
mod harness;
mod hostile;
mod merger;
mod openapi;
mod peers;
mod prometheus;
mod protocol_doc;
mod queries;
mod send;
mod signatures;
mod transport_doc;
mod webtransport;
