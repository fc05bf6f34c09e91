//! # edgetally-core
//!
//! Records, buckets, exact summaries, the CRDT replica state and its merge, and query
//! evaluation. Pure: no I/O, no clock, no RNG, no async — time and inputs are arguments,
//! so the same calls give the same state everywhere (and the crate builds for wasm32).

#![forbid(unsafe_code)]

pub mod batch;
pub mod code;
mod intern;
pub mod query;
pub mod record;
pub mod replica;
pub mod seen;
pub mod sketches;
pub mod strings;
pub mod summary;
pub mod sync;
pub mod value;

pub use batch::{Batch, BatchId, BatchSummary, Limits, ProducerKey, NO_ENTITY};
pub use code::RejectCode;
pub use query::{Aggregate, GroupBy, Plan, Rows, TopBy, TopSelect};
pub use record::Record;
pub use replica::{
    batch_digest, content_digest, Applied, Digest, Divergence, EpochSeen, LogEntry, Memory,
    Novelty, Replica, Retention, SetHash, Snapshot, HORIZON_UNKNOWN,
};
pub use seen::SeenSet;
pub use sketches::Sketches;
pub use strings::StringTable;
pub use summary::{Summary, Total};
pub use sync::{
    answer_round, Adopt, LinkCounters, PeerStatus, PeerSync, RoundAnswer, RoundOutcome,
    RoundRequest, RoundResult, SyncConfig, Transmit,
};
pub use value::Sum192;
