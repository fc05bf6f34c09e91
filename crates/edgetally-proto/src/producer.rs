//! The sans-IO producer: aggregation → sealing → a bounded outbox → transmit schedule with
//! retries, backoff and failover. It does no I/O and reads no clock: callers pass `now_ms` to
//! every call, feed it replies and transport errors (`handle_*`), and pull what to send, what
//! to persist and when to wake up (`poll_*`). The same state machine drives the native QUIC
//! client and the wasm SDK.

use crate::frame::Reply;
use crate::{envelope, small_sort, SIGNATURE_LEN};
use edgetally_core::record::{
    bucket_index, validate_bucket_ms, validate_category, validate_entity,
};
use edgetally_core::{
    Batch, BatchId, BatchSummary, RejectCode, Sketches, StringTable, Summary, NO_ENTITY,
};
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::Arc;

mod config;
mod outbox;
mod schedule;
mod seal;
mod sketch;

pub use config::ProducerConfig;
use outbox::*;

/// Signs a batch's signing message (a local key's signer).
type SignFn = Box<dyn Fn(&[u8]) -> [u8; SIGNATURE_LEN] + Send + Sync>;

/// An interned (category, entity) for hot loops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Handle(pub u32);

/// Counts by rejection reason: a table indexed by code number (reasons with a zero count are
/// absent from iteration). A fixed array rather than a `BTreeMap`: a producer has a few dozen
/// codes at most, and the browser SDK's wasm module is sized.
#[derive(Clone, PartialEq, Eq)]
pub struct ByReason([u64; RejectCode::TABLE_SIZE]);

impl Default for ByReason {
    fn default() -> ByReason {
        ByReason([0; RejectCode::TABLE_SIZE])
    }
}

impl ByReason {
    /// The count for `code` (0 if none).
    pub fn get(&self, code: RejectCode) -> u64 {
        self.0.get(code.as_u16() as usize).copied().unwrap_or(0)
    }

    /// Adds `n` to the count for `code`.
    pub fn add(&mut self, code: RejectCode, n: u64) {
        if let Some(c) = self.0.get_mut(code.as_u16() as usize) {
            *c = c.saturating_add(n);
        }
    }

    /// The sum over every reason.
    pub fn total(&self) -> u64 {
        self.0.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    /// Whether every count is zero.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|c| *c == 0)
    }

    /// The reasons with a nonzero count, in code order.
    pub fn iter(&self) -> impl Iterator<Item = (RejectCode, u64)> + '_ {
        RejectCode::ALL
            .iter()
            .map(|c| (*c, self.get(*c)))
            .filter(|(_, n)| *n > 0)
    }
}

impl std::fmt::Debug for ByReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Counters, all since creation (or resume).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records accepted by `record*`.
    pub recorded: u64,
    /// Records refused by `record*` (invalid), by reason.
    pub invalid: ByReason,
    /// Keys aggregated but not yet sealed.
    pub pending: u64,
    /// Sealed batches waiting to be sent or resent.
    pub queued: u64,
    /// Batches sent and not yet answered.
    pub in_flight: u64,
    /// Batches acknowledged.
    pub acked: u64,
    /// Records in acknowledged batches.
    pub acked_records: u64,
    /// Retries scheduled (Retry replies, transport errors, and batches of format v2 a node of
    /// an earlier release refused as `unsupported_version`).
    pub retried: u64,
    /// Batches permanently rejected (Nack), by reason.
    pub rejected: ByReason,
    /// Records in rejected batches.
    pub rejected_records: u64,
    /// Batches dropped because the outbox was full.
    pub dropped: u64,
    /// Records in dropped batches.
    pub dropped_records: u64,
    /// Bytes handed to the transport (including resends).
    pub bytes_sent: u64,
    /// Bytes in the outbox now.
    pub outbox_bytes: u64,
}

/// A batch to send now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The batch's seq: pass it back with the reply or error.
    pub seq: u64,
    /// Index into the endpoint list.
    pub endpoint: usize,
    /// The sealed batch.
    pub bytes: Arc<[u8]>,
}

/// What the caller should persist so a restarted producer resumes (key, epoch, seq, outbox).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PersistOp {
    /// The epoch and its next seq (the key is the caller's: it passed it in).
    Identity {
        /// Epoch.
        epoch: u64,
        /// Next seq to use.
        next_seq: u64,
    },
    /// A sealed batch entered the outbox, or (same seq, the same bytes but the signature) a
    /// batch sealed unsigned got its signature: store it under its seq, replacing.
    Put {
        /// Its seq.
        seq: u64,
        /// Its bytes.
        bytes: Arc<[u8]>,
    },
    /// A batch left the outbox (acked, rejected or dropped).
    Remove {
        /// Its seq.
        seq: u64,
    },
}

/// One map of a topology, as a producer routes by it ([`Producer::set_topology`]).
struct MapRoutes {
    from_ms: i64,
    /// Per group: its name, and the indices of this producer's endpoints that take its
    /// batches (its own replicas, or its heir's when it is drained).
    groups: Vec<(Box<str>, Vec<usize>)>,
}

struct HandleState {
    category: Box<str>,
    entity: Option<Box<str>>,
    /// The bucket being filled, and its summary.
    current: Option<Current>,
    /// Whether the category keeps quantiles ([`ProducerConfig::quantile_categories`]).
    quantiles: bool,
}

/// A handle's open bucket: `[start, end)` in ms, so the hot path needs no division.
struct Current {
    bucket: i64,
    start: i64,
    end: i64,
    summary: Summary,
    /// Its sketches, once a subject or a quantile value was recorded in it.
    sketches: Option<Box<Sketches>>,
}

/// A filled bucket not yet sealed: (handle, bucket, summary, sketches).
pub(super) type Closed = (u32, i64, Summary, Option<Box<Sketches>>);

/// SplitMix64, for backoff jitter; seeded by the caller.
#[derive(Clone, Debug)]
struct Jitter(u64);

impl Jitter {
    fn below(&mut self, n: i64) -> i64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z % n.max(1) as u64) as i64
    }
}

/// Rendezvous (highest-random-weight) order of `endpoints` for `key`: every producer prefers
/// a different endpoint, and when one fails its producers spread over the others. The weight
/// of an endpoint is [`rendezvous_weight`]`(key, endpoint)`.
pub fn rendezvous_order(key: &[u8; 32], endpoints: &[String]) -> Vec<usize> {
    let mut left: Vec<(u64, usize)> = endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| (rendezvous_weight(key, e.as_bytes()), i))
        .collect();
    // Heaviest first, by selection: a handful of endpoints, and no sort routine in the wasm
    // module for it (ties, between equal endpoint strings, go to the lower index).
    let mut order = Vec::with_capacity(left.len());
    while let Some(best) = (0..left.len()).reduce(|a, b| if left[b].0 > left[a].0 { b } else { a })
    {
        order.push(left.remove(best).1);
    }
    order
}

/// A category's handles: the one without entity, and one per entity.
type CategoryHandles = (Option<u32>, FxHashMap<Box<str>, u32>);

pub use crate::rendezvous::rendezvous_weight;

/// The producer state machine.
pub struct Producer {
    config: ProducerConfig,
    key: edgetally_core::ProducerKey,
    /// Signs at seal time; `None` for an external signer ([`Producer::resume_unsigned`]).
    sign: Option<SignFn>,
    epoch: u64,
    next_seq: u64,
    handles: Vec<HandleState>,
    by_name: FxHashMap<Box<str>, CategoryHandles>,
    /// Filled buckets not yet sealed: (handle, bucket, summary); may repeat a key.
    closed: Vec<Closed>,
    /// Handles with a current bucket.
    active: Vec<u32>,
    pending_bytes: usize,
    first_pending_ms: Option<i64>,
    outbox: Outbox,
    order: Vec<usize>,
    /// The endpoint names (what a topology's group lists are matched against).
    names: Vec<String>,
    /// The shard-group topology reduced to what routing needs, if known: each batch goes
    /// first to its owner group's endpoints ([`Producer::set_topology`]).
    routes: Vec<MapRoutes>,
    preferred: usize,
    failed_over_at: Option<i64>,
    jitter: Jitter,
    persist: VecDeque<PersistOp>,
    stats: Stats,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("producer", &self.key)
            .field("epoch", &self.epoch)
            .field("next_seq", &self.next_seq)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Producer {
    /// A producer with identity `seed`, a fresh `epoch` (random, from the caller), sending to
    /// `endpoints` (names used for the rendezvous order), with `jitter_seed` for backoff.
    #[cfg(feature = "local-key")]
    pub fn new(
        config: ProducerConfig,
        seed: [u8; 32],
        epoch: u64,
        endpoints: &[String],
        jitter_seed: u64,
    ) -> Result<Producer, RejectCode> {
        Self::resume(config, seed, epoch, 0, Vec::new(), endpoints, jitter_seed)
    }

    /// A producer resuming persisted state: same epoch, the next seq, and the outbox.
    #[cfg(feature = "local-key")]
    pub fn resume(
        config: ProducerConfig,
        seed: [u8; 32],
        epoch: u64,
        next_seq: u64,
        outbox: Vec<(u64, Vec<u8>)>,
        endpoints: &[String],
        jitter_seed: u64,
    ) -> Result<Producer, RejectCode> {
        let signer = crate::Signer::from_seed(seed);
        let key = signer.producer();
        let sign: SignFn = Box::new(move |m| signer.sign(m));
        let mut p = Self::build(
            config,
            key,
            Some(sign),
            epoch,
            next_seq,
            endpoints,
            jitter_seed,
        )?;
        for (seq, bytes) in outbox {
            p.restore(seq, bytes);
        }
        Ok(p)
    }

    /// A producer whose key signs elsewhere (the browser SDK signs with WebCrypto): it has
    /// only the public `key`, seals batches unsigned, hands out what to sign with
    /// [`Producer::poll_sign`] and sends a batch once [`Producer::handle_signature`] put its
    /// signature in. `epoch` and `next_seq` as for [`Producer::resume`].
    pub fn resume_unsigned(
        config: ProducerConfig,
        key: edgetally_core::ProducerKey,
        epoch: u64,
        next_seq: u64,
        endpoints: &[String],
        jitter_seed: u64,
    ) -> Result<Producer, RejectCode> {
        Self::build(config, key, None, epoch, next_seq, endpoints, jitter_seed)
    }

    fn build(
        config: ProducerConfig,
        key: edgetally_core::ProducerKey,
        sign: Option<SignFn>,
        epoch: u64,
        next_seq: u64,
        endpoints: &[String],
        jitter_seed: u64,
    ) -> Result<Producer, RejectCode> {
        validate_bucket_ms(config.bucket_ms)?;
        let order = if endpoints.is_empty() {
            vec![0]
        } else {
            rendezvous_order(&key.0, endpoints)
        };
        let mut p = Producer {
            config,
            key,
            sign,
            epoch,
            next_seq,
            handles: Vec::new(),
            by_name: FxHashMap::default(),
            closed: Vec::new(),
            active: Vec::new(),
            pending_bytes: 0,
            first_pending_ms: None,
            outbox: Outbox::default(),
            order,
            names: endpoints.to_vec(),
            routes: Vec::new(),
            preferred: 0,
            failed_over_at: None,
            jitter: Jitter(jitter_seed),
            persist: VecDeque::new(),
            stats: Stats::default(),
        };
        p.persist_op(PersistOp::Identity { epoch, next_seq });
        Ok(p)
    }

    /// Puts a stored batch back into the outbox (a resumed producer's, or one a browser tab
    /// adopts from a closed tab); it is sent like any other and not persisted again. A seq
    /// already in the outbox is left as it is. One stored unsigned (all-zero signature) is
    /// signed first, by this producer's key, like a batch it sealed itself.
    pub fn restore(&mut self, seq: u64, bytes: Vec<u8>) {
        if self.outbox.contains_key(&seq) {
            return;
        }
        // The record count is only for stats; an unreadable stored batch still gets sent
        // (and the merger's Nack will say why).
        let records = crate::envelope::records_of(&bytes, &self.config.limits).unwrap_or(0);
        self.stats.outbox_bytes += bytes.len() as u64;
        let mut o = Outgoing::new(bytes.into(), records, &self.config.limits);
        if o.unsigned {
            if let Some(sign) = &self.sign {
                if let Some(m) = envelope::signing_message(&o.bytes) {
                    let mut b = o.bytes.to_vec();
                    envelope::set_signature(&mut b, &sign(&m));
                    o.bytes = b.into();
                    o.unsigned = false;
                }
            }
        }
        self.outbox.insert(seq, o);
    }

    /// The next batch sealed unsigned to sign: its seq and its signing message
    /// (`"edgetally/batch/v1\0" ‖ payload`, docs/PROTOCOL.md §2). Each is handed out once;
    /// answer with [`Producer::handle_signature`] (or [`Producer::sign_failed`]).
    pub fn poll_sign(&mut self) -> Option<(u64, Vec<u8>)> {
        for (seq, o) in self.outbox.0.iter_mut() {
            if o.unsigned && !o.signing {
                o.signing = true;
                if let Some(m) = envelope::signing_message(&o.bytes) {
                    return Some((*seq, m));
                }
            }
        }
        None
    }

    /// The ed25519 signature of batch `seq`'s signing message: the batch can be sent (and is
    /// stored again, signed). False if `seq` is not waiting for one.
    pub fn handle_signature(&mut self, seq: u64, signature: &[u8; SIGNATURE_LEN]) -> bool {
        let Some(o) = self.outbox.get_mut(&seq).filter(|o| o.unsigned) else {
            return false;
        };
        let mut b = o.bytes.to_vec();
        envelope::set_signature(&mut b, signature);
        o.bytes = b.into();
        o.unsigned = false;
        o.signing = false;
        let bytes = o.bytes.clone();
        self.persist_op(PersistOp::Put { seq, bytes });
        true
    }

    /// Signing batch `seq` failed: [`Producer::poll_sign`] hands it out again.
    pub fn sign_failed(&mut self, seq: u64) {
        if let Some(o) = self.outbox.get_mut(&seq) {
            o.signing = false;
        }
    }

    /// Drops the oldest batch that is waiting (not in flight), other than `keep`, counting it
    /// as `dropped` like an outbox overflow: the browser SDK sheds batches this way when
    /// storage refuses a new one (quota). Returns the seq dropped, if any.
    pub fn drop_oldest(&mut self, keep: u64) -> Option<u64> {
        let seq = self
            .outbox
            .iter()
            .find(|(s, o)| !o.in_flight && **s != keep)
            .map(|(s, _)| *s)?;
        let o = self.remove(seq)?;
        self.stats.dropped += 1;
        self.stats.dropped_records = self.stats.dropped_records.saturating_add(o.records);
        Some(seq)
    }

    /// The `[start, end)` of the bucket handle `h` has open, if any: the JavaScript SDK
    /// aggregates further records of that bucket itself and asks here rather than doing the
    /// bucket arithmetic twice.
    pub fn open_bucket(&self, h: Handle) -> Option<(i64, i64)> {
        let cur = self.handles.get(h.0 as usize)?.current.as_ref()?;
        Some((cur.start, cur.end))
    }

    /// Makes every waiting batch due now, its backoff forgotten (the network is back).
    pub fn wake(&mut self, now_ms: i64) {
        for o in self.outbox.values_mut().filter(|o| !o.in_flight) {
            o.next_try_ms = o.next_try_ms.min(now_ms);
        }
    }

    /// The producer's public key.
    pub fn producer_key(&self) -> edgetally_core::ProducerKey {
        self.key
    }

    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The handle of (category, entity), interning it on first use.
    pub fn handle(&mut self, category: &str, entity: Option<&str>) -> Result<Handle, RejectCode> {
        let entry = self.by_name.get(category);
        let found = match (entry, entity) {
            (Some((none, _)), None) => *none,
            (Some((_, ents)), Some(e)) => ents.get(e).copied(),
            (None, _) => None,
        };
        if let Some(h) = found {
            return Ok(Handle(h));
        }
        validate_category(category)?;
        if let Some(e) = entity {
            validate_entity(e)?;
        }
        let id = self.handles.len() as u32;
        let quantiles = self
            .config
            .quantile_categories
            .iter()
            .any(|c| c == "*" || c == category);
        self.handles.push(HandleState {
            category: category.into(),
            entity: entity.map(Into::into),
            current: None,
            quantiles,
        });
        let slot = self
            .by_name
            .entry(category.into())
            .or_insert_with(|| (None, FxHashMap::default()));
        match entity {
            None => slot.0 = Some(id),
            Some(e) => {
                slot.1.insert(e.into(), id);
            }
        }
        Ok(Handle(id))
    }

    fn persist_op(&mut self, op: PersistOp) {
        if self.config.persist {
            self.persist.push_back(op);
        }
    }

    /// Counts an event the caller refused before it reached `record*` (a binding that cannot
    /// convert an argument, say) under `invalid`, and returns the code as an error.
    pub fn refuse(&mut self, code: RejectCode) -> Result<(), RejectCode> {
        self.stats.invalid.add(code, 1);
        Err(code)
    }

    /// Records one event. An invalid one changes nothing but the `invalid` counter.
    pub fn record(
        &mut self,
        now_ms: i64,
        category: &str,
        entity: Option<&str>,
        value: f64,
        ts_ms: Option<i64>,
    ) -> Result<(), RejectCode> {
        match self.handle(category, entity) {
            Ok(h) => self.record_handle(now_ms, h, value, ts_ms),
            Err(code) => self.refuse(code),
        }
    }

    /// Records one event through a handle (the hot path: a value with a fast quantisation
    /// into the handle's open bucket touches one summary and nothing else).
    #[inline]
    pub fn record_handle(
        &mut self,
        now_ms: i64,
        h: Handle,
        value: f64,
        ts_ms: Option<i64>,
    ) -> Result<(), RejectCode> {
        let ts = ts_ms.unwrap_or(now_ms);
        if let Some(HandleState {
            current: Some(cur),
            quantiles,
            ..
        }) = self.handles.get_mut(h.0 as usize)
        {
            if ts >= cur.start && ts < cur.end && !*quantiles {
                if let Some(q) = edgetally_core::value::quantize_fast(value) {
                    let s = &mut cur.summary;
                    if let (Some(count), Some(sum)) = (s.count.checked_add(1), s.sum.checked_add(q))
                    {
                        // `+ 0.0` turns -0.0 into 0.0, as validation does.
                        let v = value + 0.0;
                        s.count = count;
                        s.sum = sum;
                        s.min = s.min.min(v);
                        s.max = s.max.max(v);
                        self.stats.recorded += 1;
                        return Ok(());
                    }
                }
            }
        }
        self.record_slow(now_ms, h, value, ts)
    }

    fn record_slow(
        &mut self,
        now_ms: i64,
        h: Handle,
        value: f64,
        ts: i64,
    ) -> Result<(), RejectCode> {
        self.fold_value(now_ms, h, ts, value, None)
    }

    /// One value (and subject) folded in: one instantiation of [`Producer::fold`] for both
    /// record paths (the browser's module is sized).
    #[inline(never)]
    fn fold_value(
        &mut self,
        now_ms: i64,
        h: Handle,
        ts: i64,
        value: f64,
        subject: Option<u64>,
    ) -> Result<(), RejectCode> {
        self.fold(now_ms, h, ts, 1, subject, || Summary::of(value))
    }

    /// Records a summary of events a caller aggregated itself (the JavaScript SDK's handles
    /// do, to avoid a call per event) as `summary.count` records in the bucket of `ts_ms`.
    /// The same as recording the values one by one: summaries merge exactly.
    pub fn record_summary(
        &mut self,
        now_ms: i64,
        h: Handle,
        ts_ms: i64,
        summary: Summary,
    ) -> Result<(), RejectCode> {
        // A quantile sketch must hold every value of its summary: a summary of one value,
        // or of copies of one value, says which; any other does not, and is refused.
        let quantiles = self
            .handles
            .get(h.0 as usize)
            .is_some_and(|st| st.quantiles);
        if quantiles && summary.count > 1 && summary.min != summary.max {
            return self.refuse_n(RejectCode::InvalidEvent, summary.count);
        }
        self.fold(now_ms, h, ts_ms, summary.count.max(1), None, || {
            let mut s = summary;
            s.validate().map(|()| s)
        })
    }

    fn refuse_n(&mut self, code: RejectCode, records: u64) -> Result<(), RejectCode> {
        self.stats.invalid.add(code, records);
        Err(code)
    }

    /// Checks the time, then folds `make()`'s summary into the handle's bucket. A refusal is
    /// counted once per record it stood for.
    fn fold(
        &mut self,
        now_ms: i64,
        h: Handle,
        ts: i64,
        records: u64,
        subject: Option<u64>,
        make: impl FnOnce() -> Result<Summary, RejectCode>,
    ) -> Result<(), RejectCode> {
        let refuse = |p: &mut Producer, code: RejectCode| {
            p.stats.invalid.add(code, records);
            Err(code)
        };
        let bucket = match bucket_index(ts, self.config.bucket_ms) {
            Ok(b) => b,
            Err(code) => return refuse(self, code),
        };
        let bucket_ms = i64::from(self.config.bucket_ms);
        // Refuse here what the merger would refuse, so one stale or future event cannot get a
        // whole batch of good ones rejected.
        let start = bucket * bucket_ms;
        if let Err(code) = self
            .config
            .limits
            .check_bucket_time(start, bucket_ms, now_ms)
        {
            return refuse(self, code);
        }
        let summary = match make() {
            Ok(s) => s,
            Err(code) => return refuse(self, code),
        };
        let precision = self.config.distinct_precision;
        let Some(state) = self.handles.get_mut(h.0 as usize) else {
            return refuse(self, RejectCode::InvalidEvent);
        };
        let with_quantiles = state.quantiles;
        let folded = match &mut state.current {
            Some(cur) if cur.bucket == bucket => cur.summary.merge(&summary).map(|()| false),
            _ => {
                let prev = state.current.replace(Current {
                    bucket,
                    start,
                    end: start + bucket_ms,
                    summary,
                    sketches: None,
                });
                if let Some(prev) = prev {
                    self.closed
                        .push((h.0, prev.bucket, prev.summary, prev.sketches));
                } else {
                    self.active.push(h.0);
                }
                Ok(true)
            }
        };
        if folded.is_ok() && (subject.is_some() || with_quantiles) {
            if let Some(cur) = &mut state.current {
                self.pending_bytes +=
                    cur.add_sketches(subject, with_quantiles, precision, &summary);
            }
        }
        match folded {
            Ok(new_key) => {
                self.stats.recorded += summary.count;
                if new_key {
                    self.stats.pending += 1;
                    self.pending_bytes += self.key_bytes(h.0);
                }
                self.first_pending_ms.get_or_insert(now_ms);
                if self.stats.pending as usize >= self.config.max_batch_summaries
                    || self.pending_bytes >= self.config.max_batch_bytes
                {
                    self.seal(now_ms);
                }
                Ok(())
            }
            Err(code) => refuse(self, code),
        }
    }

    /// An upper bound of the bytes one key of handle `h` adds to a batch (its summary and,
    /// at worst, its names).
    fn key_bytes(&self, h: u32) -> usize {
        self.handles.get(h as usize).map_or(0, |st| {
            45 + st.category.len() + st.entity.as_ref().map_or(0, |e| e.len())
        })
    }

    /// [`Producer::key_bytes`] with the key's sketches, if any.
    fn entry_bytes(&self, e: &Closed) -> usize {
        self.key_bytes(e.0) + e.3.as_ref().map_or(0, |k| k.encoded_len() + 8)
    }

    /// Records many events of one handle at once (typed arrays in JavaScript). Returns how
    /// many were accepted; invalid ones are counted and skipped.
    pub fn record_many(
        &mut self,
        now_ms: i64,
        h: Handle,
        values: &[f64],
        ts_ms: Option<&[i64]>,
    ) -> usize {
        let mut ok = 0;
        for (i, v) in values.iter().enumerate() {
            let ts = ts_ms.and_then(|t| t.get(i).copied());
            if self.record_handle(now_ms, h, *v, ts).is_ok() {
                ok += 1;
            }
        }
        ok
    }

    /// Seals pending data and returns a token: `flushed(token)` turns true once every batch
    /// holding data recorded before this call has been answered (acked, rejected or dropped).
    pub fn flush(&mut self, now_ms: i64) -> u64 {
        self.seal(now_ms);
        self.next_seq
    }

    /// See [`Producer::flush`].
    pub fn flushed(&self, token: u64) -> bool {
        !self.outbox.any_below(token)
    }

    /// The counters, with the live gauges filled in.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.in_flight = self.outbox.values().filter(|o| o.in_flight).count() as u64;
        s.queued = self.outbox.len() as u64 - s.in_flight;
        s
    }
}
