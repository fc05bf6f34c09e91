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
    Batch, BatchId, BatchSummary, Limits, RejectCode, StringTable, Summary, NO_ENTITY,
};
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::Arc;

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
        }
    }
}

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
    /// Retries scheduled (Retry replies and transport errors).
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

struct Outgoing {
    bytes: Arc<[u8]>,
    records: u64,
    attempts: u32,
    next_try_ms: i64,
    in_flight: bool,
    /// Sealed without its signature (an external signer's producer): not sent until
    /// [`Producer::handle_signature`] puts it in.
    unsigned: bool,
    /// Handed out by [`Producer::poll_sign`], signature not yet back.
    signing: bool,
    /// Its signed creation time (what the topology routes it by; `i64::MIN` if unreadable).
    created_ms: i64,
}

impl Outgoing {
    fn new(bytes: Arc<[u8]>, records: u64, limits: &edgetally_core::Limits) -> Outgoing {
        Outgoing {
            unsigned: envelope::is_unsigned(&bytes),
            // Read only where batches are routed by a topology (feature `routing`).
            created_ms: if cfg!(feature = "routing") {
                envelope::peek(&bytes, limits).map_or(i64::MIN, |(_, t)| t)
            } else {
                i64::MIN
            },
            bytes,
            records,
            attempts: 0,
            next_try_ms: i64::MIN,
            in_flight: false,
            signing: false,
        }
    }
}

/// Signs a batch's signing message (a local key's signer).
type SignFn = Box<dyn Fn(&[u8]) -> [u8; SIGNATURE_LEN] + Send + Sync>;

/// The outbox, in seq order: a `VecDeque` searched by seq. Seqs arrive in increasing order
/// (sealing) and usually leave from the front (acks), so inserts and removals are cheap; a
/// `BTreeMap` would do the same with ~6 KB more wasm (the browser SDK's module is sized).
#[derive(Default)]
struct Outbox(VecDeque<(u64, Outgoing)>);

impl Outbox {
    fn index(&self, seq: u64) -> Result<usize, usize> {
        self.0.binary_search_by_key(&seq, |e| e.0)
    }

    fn contains_key(&self, seq: &u64) -> bool {
        self.index(*seq).is_ok()
    }

    /// Adds a batch under a seq not yet present (an existing one is left as it is).
    fn insert(&mut self, seq: u64, o: Outgoing) {
        match self.0.back() {
            Some(&(last, _)) if last >= seq => {
                if let Err(i) = self.index(seq) {
                    self.0.insert(i, (seq, o));
                }
            }
            _ => self.0.push_back((seq, o)),
        }
    }

    fn get(&self, seq: &u64) -> Option<&Outgoing> {
        self.index(*seq).ok().map(|i| &self.0[i].1)
    }

    fn get_mut(&mut self, seq: &u64) -> Option<&mut Outgoing> {
        self.index(*seq).ok().map(|i| &mut self.0[i].1)
    }

    fn remove(&mut self, seq: &u64) -> Option<Outgoing> {
        let i = self.index(*seq).ok()?;
        self.0.remove(i).map(|e| e.1)
    }

    /// Whether any batch has a seq below `token`.
    fn any_below(&self, token: u64) -> bool {
        self.0.front().is_some_and(|e| e.0 < token)
    }

    fn iter(&self) -> impl Iterator<Item = (&u64, &Outgoing)> {
        self.0.iter().map(|(s, o)| (s, o))
    }

    fn values(&self) -> impl Iterator<Item = &Outgoing> {
        self.0.iter().map(|e| &e.1)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut Outgoing> {
        self.0.iter_mut().map(|e| &mut e.1)
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

struct HandleState {
    category: Box<str>,
    entity: Option<Box<str>>,
    /// The bucket being filled, and its summary.
    current: Option<Current>,
}

/// A handle's open bucket: `[start, end)` in ms, so the hot path needs no division.
struct Current {
    bucket: i64,
    start: i64,
    end: i64,
    summary: Summary,
}

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
    closed: Vec<(u32, i64, Summary)>,
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
        self.handles.push(HandleState {
            category: category.into(),
            entity: entity.map(Into::into),
            current: None,
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
            current: Some(cur), ..
        }) = self.handles.get_mut(h.0 as usize)
        {
            if ts >= cur.start && ts < cur.end {
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
        self.fold(now_ms, h, ts, 1, || Summary::of(value))
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
        self.fold(now_ms, h, ts_ms, summary.count.max(1), || {
            let mut s = summary;
            s.validate().map(|()| s)
        })
    }

    /// Checks the time, then folds `make()`'s summary into the handle's bucket. A refusal is
    /// counted once per record it stood for.
    fn fold(
        &mut self,
        now_ms: i64,
        h: Handle,
        ts: i64,
        records: u64,
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
        let Some(state) = self.handles.get_mut(h.0 as usize) else {
            return refuse(self, RejectCode::InvalidEvent);
        };
        let folded = match &mut state.current {
            Some(cur) if cur.bucket == bucket => cur.summary.merge(&summary).map(|()| false),
            _ => {
                let prev = state.current.replace(Current {
                    bucket,
                    start,
                    end: start + bucket_ms,
                    summary,
                });
                if let Some(prev) = prev {
                    self.closed.push((h.0, prev.bucket, prev.summary));
                } else {
                    self.active.push(h.0);
                }
                Ok(true)
            }
        };
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

    /// Seals everything pending into batches (canonical, within the limits) and queues them.
    pub fn seal(&mut self, now_ms: i64) {
        self.seal_within(now_ms, self.config.max_batch_bytes);
    }

    /// Seals everything pending into batches of at most about `max_bytes` each (the
    /// per-key estimate bounds the encoding from above): a page being left seals into
    /// batches that fit the browser's 64 KiB keepalive budget.
    pub fn seal_within(&mut self, now_ms: i64, max_bytes: usize) {
        for h in std::mem::take(&mut self.active) {
            if let Some(cur) = self.handles[h as usize].current.take() {
                self.closed.push((h, cur.bucket, cur.summary));
            }
        }
        if self.closed.is_empty() {
            return;
        }
        let mut entries = std::mem::take(&mut self.closed);
        small_sort::sort_by_key(&mut entries, |e| (e.0, e.1));
        // Merge repeats of a key (a handle that went back to an earlier bucket).
        let mut merged: Vec<(u32, i64, Summary)> = Vec::with_capacity(entries.len());
        for (h, b, s) in entries {
            if let Some((h2, b2, s2)) = merged.last_mut() {
                // A key's summaries cannot overflow in practice (2^64 records); if they did,
                // the second part would be refused as a duplicate key rather than wrapped.
                if *h2 == h && *b2 == b && s2.merge(&s).is_ok() {
                    continue;
                }
            }
            merged.push((h, b, s));
        }
        let max = self
            .config
            .max_batch_summaries
            .min(self.config.limits.max_summaries)
            .max(1);
        let mut chunks: Vec<Vec<(u32, i64, Summary)>> = Vec::new();
        let mut bytes = 0;
        for e in merged {
            let size = self.key_bytes(e.0);
            match chunks.last_mut() {
                Some(c) if c.len() < max && bytes + size <= max_bytes => {
                    bytes += size;
                    c.push(e);
                }
                _ => {
                    bytes = size;
                    chunks.push(vec![e]);
                }
            }
        }
        for chunk in chunks {
            for part in self.split_by_names(chunk) {
                self.seal_one(now_ms, part);
            }
        }
        self.stats.pending = 0;
        self.pending_bytes = 0;
        self.first_pending_ms = None;
    }

    /// Splits a chunk so no batch exceeds the distinct category or entity limits.
    fn split_by_names(&self, chunk: Vec<(u32, i64, Summary)>) -> Vec<Vec<(u32, i64, Summary)>> {
        let (mc, me) = (
            self.config.limits.max_categories.max(1),
            self.config.limits.max_entities.max(1),
        );
        let mut parts = Vec::new();
        let mut cur = Vec::new();
        let mut cats: rustc_hash::FxHashSet<&str> = Default::default();
        let mut ents: rustc_hash::FxHashSet<&str> = Default::default();
        for e in chunk {
            let st = &self.handles[e.0 as usize];
            let new_cat = !cats.contains(&*st.category);
            let new_ent = st.entity.as_deref().is_some_and(|x| !ents.contains(x));
            if (new_cat && cats.len() >= mc) || (new_ent && ents.len() >= me) {
                parts.push(std::mem::take(&mut cur));
                cats.clear();
                ents.clear();
            }
            cats.insert(&st.category);
            if let Some(x) = st.entity.as_deref() {
                ents.insert(x);
            }
            cur.push(e);
        }
        if !cur.is_empty() {
            parts.push(cur);
        }
        parts
    }

    fn seal_one(&mut self, now_ms: i64, entries: Vec<(u32, i64, Summary)>) {
        // Every record counted in exactly one summary: the batch holds this many.
        let records: u64 = entries.iter().map(|e| e.2.count).sum();
        // Canonical form: strings sorted, summaries in key order.
        let mut names: Vec<&str> = Vec::new();
        for (h, _, _) in &entries {
            let st = &self.handles[*h as usize];
            names.push(&st.category);
            if let Some(e) = &st.entity {
                names.push(e);
            }
        }
        small_sort::sort_by_key(&mut names, |s| *s);
        names.dedup();
        let index = |s: &str| names.binary_search(&s).map_or(0, |i| i as u32);
        let mut summaries: Vec<BatchSummary> = entries
            .iter()
            .map(|(h, b, s)| {
                let st = &self.handles[*h as usize];
                BatchSummary {
                    category: index(&st.category),
                    entity: st.entity.as_deref().map_or(NO_ENTITY, |e| index(e) + 1),
                    bucket: *b,
                    summary: *s,
                }
            })
            .collect();
        small_sort::sort_by_key(&mut summaries, |s| (s.category, s.entity, s.bucket));
        let strings: StringTable = names.iter().collect();
        let seq = self.next_seq;
        let batch = Batch {
            id: BatchId {
                producer: self.key,
                epoch: self.epoch,
                seq,
            },
            created_ms: now_ms,
            bucket_ms: self.config.bucket_ms,
            strings,
            summaries,
        };
        let Ok(mut bytes) = envelope::seal_unsigned(&batch) else {
            return;
        };
        if let Some(sign) = &self.sign {
            let Some(m) = envelope::signing_message(&bytes) else {
                return;
            };
            envelope::set_signature(&mut bytes, &sign(&m));
        }
        self.next_seq += 1;
        self.persist_op(PersistOp::Identity {
            epoch: self.epoch,
            next_seq: self.next_seq,
        });
        let bytes: Arc<[u8]> = bytes.into();
        self.make_room(bytes.len());
        if self.stats.outbox_bytes as usize + bytes.len() > self.config.max_outbox_bytes {
            // Everything left is in flight: the new batch is the one that cannot fit.
            self.stats.dropped += 1;
            self.stats.dropped_records = self.stats.dropped_records.saturating_add(records);
            return;
        }
        self.stats.outbox_bytes += bytes.len() as u64;
        self.persist_op(PersistOp::Put {
            seq,
            bytes: bytes.clone(),
        });
        self.outbox
            .insert(seq, Outgoing::new(bytes, records, &self.config.limits));
    }

    /// Drops the oldest batches not in flight until `incoming` more bytes fit.
    fn make_room(&mut self, incoming: usize) {
        while self.stats.outbox_bytes as usize + incoming > self.config.max_outbox_bytes {
            if self.drop_oldest(u64::MAX).is_none() {
                return;
            }
        }
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

    /// Routes batches by the cluster's shard-group topology (`GET /v1/topology`, or the
    /// file the mergers read): each batch goes first to the endpoints its owner group lists
    /// — the owner under the map in force at the batch's own creation time, as the mergers
    /// compute it ([`crate::topology::Topology::route`]) — in rendezvous order, then to the
    /// others (which forward it). An endpoint belongs to a group when its name is one of the
    /// group's `quic` or `http` addresses. Without a topology (`None`), or when no endpoint
    /// is the owner's, every batch takes the one rendezvous order, and any merger forwards.
    ///
    /// Needs the feature `routing` (on for the native crates; the npm package's wasm module
    /// leaves it off, to keep its bundle small): without it the topology is ignored.
    pub fn set_topology(&mut self, topology: Option<crate::topology::Topology>) {
        // Reduced here, once, to per map and group the endpoints that take the group's
        // batches (its heir's, when drained): what `Topology::route` computes per batch. The
        // hot path (`order_for`) then links none of the topology code into the wasm module.
        self.routes = topology.map_or_else(Vec::new, |t| {
            let all = t.all_groups();
            let authority = |n: &str| {
                let n = n.split_once("://").map_or(n, |(_, r)| r);
                n.split('/').next().unwrap_or(n).to_string()
            };
            let names: Vec<String> = self.names.iter().map(|n| authority(n)).collect();
            t.maps
                .iter()
                .map(|m| MapRoutes {
                    from_ms: m.from_ms,
                    groups: m
                        .groups
                        .iter()
                        .map(|g| {
                            let takes = t
                                .heir(&g.name)
                                .and_then(|h| all.iter().find(|a| a.name == h));
                            let members = takes.map_or_else(Vec::new, |h| {
                                (0..names.len())
                                    .filter(|&i| {
                                        h.quic
                                            .iter()
                                            .chain(&h.http)
                                            .any(|a| authority(a) == names[i])
                                    })
                                    .collect()
                            });
                            (g.name.clone().into_boxed_str(), members)
                        })
                        .collect(),
                })
                .collect()
        });
    }

    /// The endpoint order for a batch created at `created_ms`: the rendezvous order, the
    /// owner group's endpoints first (as `Topology::route`: the map in force at `created_ms`,
    /// the group whose name weighs most, ties to the first listed).
    fn order_for(&self, created_ms: i64) -> std::borrow::Cow<'_, [usize]> {
        if !cfg!(feature = "routing") {
            return std::borrow::Cow::Borrowed(&self.order);
        }
        let groups = crate::topology::in_force(&self.routes, |m| m.from_ms, created_ms)
            .map_or(&[][..], |m| &m.groups[..]);
        let owner = crate::topology::heaviest(&self.key, groups.iter().map(|(n, _)| &**n));
        match owner.map(|i| &groups[i].1) {
            Some(members) if !members.is_empty() => {
                let (mut first, rest): (Vec<usize>, Vec<usize>) =
                    self.order.iter().partition(|i| members.contains(i));
                first.extend(rest);
                std::borrow::Cow::Owned(first)
            }
            _ => std::borrow::Cow::Borrowed(&self.order),
        }
    }

    fn endpoint(&mut self, now_ms: i64, created_ms: i64) -> usize {
        if let Some(t) = self.failed_over_at {
            if now_ms - t >= self.config.failback_ms {
                self.preferred = 0;
                self.failed_over_at = None;
            }
        }
        let order = self.order_for(created_ms);
        order[self.preferred % order.len()]
    }

    /// Seals what is pending if its flush interval is over, without sending anything (an
    /// offline browser keeps sealing into its stored outbox). Returns when to call again:
    /// the next flush deadline, if anything is pending.
    pub fn poll_seal(&mut self, now_ms: i64) -> Option<i64> {
        if let Some(t) = self.first_pending_ms {
            if now_ms - t >= self.config.flush_interval_ms {
                self.seal(now_ms);
            }
        }
        self.first_pending_ms
            .map(|t| t + self.config.flush_interval_ms)
    }

    /// The next batch to send now, if any (respecting `max_in_flight` and backoff).
    pub fn poll_transmit(&mut self, now_ms: i64) -> Option<Transmit> {
        self.poll_seal(now_ms);
        let in_flight = self.outbox.values().filter(|o| o.in_flight).count();
        if in_flight >= self.config.max_in_flight {
            return None;
        }
        let (seq, created_ms) = self
            .outbox
            .iter()
            .find(|(_, o)| !o.in_flight && !o.unsigned && o.next_try_ms <= now_ms)
            .map(|(s, o)| (*s, o.created_ms))?;
        let endpoint = self.endpoint(now_ms, created_ms);
        let o = self.outbox.get_mut(&seq)?;
        o.in_flight = true;
        self.stats.bytes_sent += o.bytes.len() as u64;
        Some(Transmit {
            seq,
            endpoint,
            bytes: o.bytes.clone(),
        })
    }

    /// When the caller should call in again at the latest (a flush deadline, a retry, or a
    /// batch sealed unsigned that [`Producer::poll_sign`] has not handed out yet); a time in
    /// the past (possibly `i64::MIN`) means "now": compare with saturating arithmetic.
    ///
    /// Every state in which the machine has work for its driver is covered here, so a driver
    /// that only sleeps until this deadline never leaves a sealed batch waiting for the
    /// application's next call.
    pub fn poll_timeout(&self) -> Option<i64> {
        let flush = self
            .first_pending_ms
            .map(|t| t + self.config.flush_interval_ms);
        let retry = self
            .outbox
            .values()
            .filter(|o| !o.in_flight && (!o.unsigned || !o.signing))
            .map(|o| o.next_try_ms)
            .min();
        match (flush, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next thing to persist, if any.
    pub fn poll_persist(&mut self) -> Option<PersistOp> {
        self.persist.pop_front()
    }

    fn backoff(&mut self, attempts: u32) -> i64 {
        let cap = self
            .config
            .backoff_base_ms
            .saturating_mul(1i64 << attempts.min(30))
            .min(self.config.backoff_max_ms);
        1 + self.jitter.below(cap)
    }

    /// The merger's reply to batch `seq`.
    pub fn handle_reply(&mut self, now_ms: i64, seq: u64, reply: Reply) {
        match reply {
            Reply::Ack => {
                if let Some(o) = self.remove(seq) {
                    self.stats.acked += 1;
                    self.stats.acked_records = self.stats.acked_records.saturating_add(o.records);
                }
            }
            Reply::Nack(code) => {
                if let Some(o) = self.remove(seq) {
                    self.stats.rejected.add(
                        RejectCode::from_u16(code).unwrap_or(RejectCode::Malformed),
                        1,
                    );
                    self.stats.rejected_records =
                        self.stats.rejected_records.saturating_add(o.records);
                }
            }
            Reply::Retry { after_ms } => self.retry_later(now_ms, seq, after_ms as i64, false),
        }
    }

    /// Sending batch `seq` failed in transport (connection refused, reset, timed out): retry
    /// it after a backoff on the next endpoint in rendezvous order.
    pub fn handle_transport_error(&mut self, now_ms: i64, seq: u64, endpoint: usize) {
        let created_ms = self.outbox.get(&seq).map_or(i64::MIN, |o| o.created_ms);
        let order = self.order_for(created_ms);
        if order.get(self.preferred % order.len()) == Some(&endpoint) && order.len() > 1 {
            self.preferred = (self.preferred + 1) % self.order.len();
            self.failed_over_at = Some(now_ms);
        }
        self.retry_later(now_ms, seq, 0, true);
    }

    fn retry_later(&mut self, now_ms: i64, seq: u64, at_least_ms: i64, _transport: bool) {
        let Some(attempts) = self
            .outbox
            .get(&seq)
            .filter(|o| o.in_flight)
            .map(|o| o.attempts)
        else {
            return;
        };
        let delay = self.backoff(attempts).max(at_least_ms);
        if let Some(o) = self.outbox.get_mut(&seq) {
            o.in_flight = false;
            o.attempts += 1;
            o.next_try_ms = now_ms.saturating_add(delay);
            self.stats.retried += 1;
        }
    }

    fn remove(&mut self, seq: u64) -> Option<Outgoing> {
        let o = self.outbox.remove(&seq)?;
        self.stats.outbox_bytes -= o.bytes.len() as u64;
        self.persist_op(PersistOp::Remove { seq });
        Some(o)
    }

    /// The counters, with the live gauges filled in.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.in_flight = self.outbox.values().filter(|o| o.in_flight).count() as u64;
        s.queued = self.outbox.len() as u64 - s.in_flight;
        s
    }
}
