//! The producer's settings.

use edgetally_core::Limits;

/// How a producer batches and retries. Defaults suit a browser or an edge worker.
#[derive(Clone, Debug, PartialEq)]
pub struct ProducerConfig {
    /// Bucket width (whole seconds dividing a day).
    pub bucket_ms: u32,
    /// Seal what is pending this long after its first record.
    pub flush_interval_ms: i64,
    /// Seal when this many keys are pending (≤ the merger's summary limit).
    pub max_batch_summaries: usize,
    /// Seal when the pending batch would encode to about this many bytes.
    pub max_batch_bytes: usize,
    /// Sealed, unacknowledged batches may hold at most this many bytes; the oldest waiting
    /// ones are dropped (and counted) to make room.
    pub max_outbox_bytes: usize,
    /// Batches sent and not yet answered, at most.
    pub max_in_flight: usize,
    /// First retry delay bound; doubles per attempt (full jitter).
    pub backoff_base_ms: i64,
    /// Largest retry delay bound.
    pub backoff_max_ms: i64,
    /// After failing over, try the preferred endpoint again after this long.
    pub failback_ms: i64,
    /// Limits the merger enforces, so batches are sealed within them.
    pub limits: Limits,
    /// Queue [`PersistOp`]s for `poll_persist`. Off for callers that keep nothing (they
    /// would otherwise have to drain the queue to keep it from growing).
    pub persist: bool,
    /// Categories whose values also go into a quantile sketch (1 % relative accuracy), for
    /// percentiles; `"*"` names every category. Empty: none (quantiles are opt-in).
    pub quantile_categories: Vec<String>,
    /// Precision of the HyperLogLogs that subjects go into (4–16; 14: 0.81 % standard
    /// error). Mergers may cap it per category (`sketch_max_precision`).
    pub distinct_precision: u8,
    /// The site secret's first 16 bytes, keying the subject hash (SipHash-2-4): without it
    /// the key is zero and a subject hashes alike everywhere. See docs/PROTOCOL.md §3.
    pub subject_key: Option<[u8; 16]>,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            bucket_ms: 1000,
            flush_interval_ms: 1000,
            max_batch_summaries: 2000,
            max_batch_bytes: 256 << 10,
            max_outbox_bytes: 8 << 20,
            max_in_flight: 64,
            backoff_base_ms: 100,
            backoff_max_ms: 30_000,
            failback_ms: 30_000,
            limits: Limits::default(),
            persist: true,
            quantile_categories: Vec::new(),
            distinct_precision: edgetally_core::sketches::HLL_DEFAULT_PRECISION,
            subject_key: None,
        }
    }
}
