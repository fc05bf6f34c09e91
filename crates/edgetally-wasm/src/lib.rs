//! JavaScript bindings of the sans-IO producer ([`edgetally_proto::producer::Producer`]).
//!
//! This is the thin, number-typed layer under the npm package in `web/`: the TypeScript API
//! there owns the clock, the timers and the transport (`fetch`), and calls in here to record,
//! seal, pick the next batch to send and take replies. Nothing here throws on the hot paths:
//! errors come back as reason codes (`RejectCode` numbers, named by [`reason_name`]) and the
//! TypeScript layer turns them into typed `EdgetallyError`s.
//!
//! Times cross the boundary as `f64` milliseconds (JavaScript numbers); a timestamp of `NaN`
//! means "now". Sequence numbers are `f64` too (exact below 2⁵³, i.e. forever at any rate).

use edgetally_core::RejectCode;
use edgetally_proto::producer::{ByReason, Handle, PersistOp, Producer, ProducerConfig, Stats};
use edgetally_proto::Reply;
use js_sys::{Object, Reflect};
use wasm_bindgen::prelude::*;

/// The name of a reason code (`"invalid_value"`, …), or `"unknown"`.
#[wasm_bindgen(js_name = reasonName)]
pub fn reason_name(code: u32) -> String {
    u16::try_from(code)
        .ok()
        .and_then(RejectCode::from_u16)
        .map_or("unknown", RejectCode::as_str)
        .to_string()
}

fn code(c: RejectCode) -> u32 {
    u32::from(c.as_u16())
}

/// A whole-millisecond timestamp, or `None` for NaN ("now"); other non-integers round down.
fn ts(ts_ms: f64) -> Option<Result<i64, RejectCode>> {
    if ts_ms.is_nan() {
        None
    } else if ts_ms.is_finite() && ts_ms.abs() < 9.0e15 {
        Some(Ok(ts_ms.floor() as i64))
    } else {
        Some(Err(RejectCode::InvalidTimestamp))
    }
}

/// What the core hands out, one type for three uses (each exported class costs the npm
/// package glue code): from `pollTransmit` a batch to send (`tag` = endpoint index, `bytes`
/// = the signed batch); from `pollSign` one to sign (`bytes` = its signing message,
/// `"edgetally/batch/v1\0"` ‖ payload; answer with `handleSignature`); from `pollPersist`
/// something to store (`tag` 0 — the epoch's next seq is `seq`; 1 — batch `seq` with
/// `bytes` entered the outbox, or got its signature; 2 — batch `seq` left it).
#[wasm_bindgen]
#[derive(Debug)]
pub struct Item {
    tag: u32,
    seq: f64,
    bytes: Option<Vec<u8>>,
}

#[wasm_bindgen]
impl Item {
    /// The endpoint (`pollTransmit`) or the kind (`pollPersist`).
    #[wasm_bindgen(getter)]
    pub fn tag(&self) -> u32 {
        self.tag
    }
    /// The batch's seq (the next seq for kind 0).
    #[wasm_bindgen(getter)]
    pub fn seq(&self) -> f64 {
        self.seq
    }
    /// The bytes (taken: a second read gives none).
    #[wasm_bindgen(getter)]
    pub fn bytes(&mut self) -> Option<Vec<u8>> {
        self.bytes.take()
    }
}

fn item(tag: u32, seq: u64, bytes: Option<Vec<u8>>) -> Item {
    Item {
        tag,
        seq: seq as f64,
        bytes,
    }
}

/// The producer's defaults and the limits it seals within, for the TypeScript layer (one
/// home for each rule): `{bucketMs, flushIntervalMs, maxBatchSummaries, maxBatchBytes,
/// maxOutboxBytes, maxInFlight}` and the merger's default limits `{maxSummariesLimit,
/// maxPayloadBytes}`.
#[wasm_bindgen]
pub fn defaults() -> Object {
    let c = ProducerConfig::default();
    let o = Object::new();
    set(&o, "bucketMs", f64::from(c.bucket_ms));
    set(&o, "flushIntervalMs", c.flush_interval_ms as f64);
    set(&o, "maxBatchSummaries", c.max_batch_summaries as f64);
    set(&o, "maxBatchBytes", c.max_batch_bytes as f64);
    set(&o, "maxOutboxBytes", c.max_outbox_bytes as f64);
    set(&o, "maxInFlight", c.max_in_flight as f64);
    set(&o, "maxSummariesLimit", c.limits.max_summaries as f64);
    set(&o, "maxPayloadBytes", c.limits.max_payload_bytes as f64);
    set(&o, "distinctPrecision", f64::from(c.distinct_precision));
    o
}

/// The producer state machine, for JavaScript.
#[wasm_bindgen]
#[derive(Debug)]
pub struct Core {
    p: Producer,
}

#[wasm_bindgen]
impl Core {
    /// `seed`: 48 bytes — the ed25519 public key (32; the secret key stays in WebCrypto,
    /// which signs what `pollSign` hands out), the epoch (8, little-endian) and the backoff
    /// jitter seed (8). `endpoints`: the merger URLs, one per line (a string crosses into
    /// wasm with less glue than an array of them). `next_seq`: 0 for a fresh epoch, else the
    /// stored one (a tab draining a closed tab's epoch). `persist`: queue what to store for `pollPersist`. Throws the reason code
    /// (a number) for an unusable configuration.
    #[wasm_bindgen(constructor)]
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        seed: &[u8],
        endpoints: &str,
        bucket_ms: u32,
        flush_interval_ms: f64,
        max_batch_summaries: u32,
        max_batch_bytes: u32,
        max_outbox_bytes: f64,
        max_in_flight: u32,
        next_seq: f64,
        persist: bool,
    ) -> Result<Core, JsValue> {
        let bad = || JsValue::from(code(RejectCode::InvalidEvent));
        let (key, rest) = seed.split_first_chunk::<32>().ok_or_else(bad)?;
        let (epoch, rest) = rest.split_first_chunk::<8>().ok_or_else(bad)?;
        let (jitter, _) = rest.split_first_chunk::<8>().ok_or_else(bad)?;
        let whole = |x: f64| x.is_finite() && x >= 1.0 && x.fract() == 0.0;
        if !whole(flush_interval_ms)
            || !whole(max_outbox_bytes)
            || max_in_flight == 0
            || !(next_seq == 0.0 || whole(next_seq))
        {
            return Err(bad());
        }
        let config = ProducerConfig {
            bucket_ms,
            flush_interval_ms: flush_interval_ms as i64,
            max_batch_summaries: max_batch_summaries.max(1) as usize,
            max_batch_bytes: max_batch_bytes.max(1) as usize,
            max_outbox_bytes: max_outbox_bytes as usize,
            max_in_flight: max_in_flight as usize,
            persist,
            ..ProducerConfig::default()
        };
        Producer::resume_unsigned(
            config,
            edgetally_core::ProducerKey(*key),
            u64::from_le_bytes(*epoch),
            next_seq as u64,
            &endpoints.split('\n').map(String::from).collect::<Vec<_>>(),
            u64::from_le_bytes(*jitter),
        )
        .map(|p| Core { p })
        .map_err(|c| JsValue::from(code(c)))
    }

    /// The producer's public key, hex.
    #[wasm_bindgen(getter, js_name = producerKey)]
    pub fn producer_key(&self) -> String {
        self.p.producer_key().to_hex()
    }

    /// The epoch, as a decimal string (it is a u64).
    #[wasm_bindgen(getter)]
    pub fn epoch(&self) -> String {
        // By hand, not `to_string`: the module then carries no formatting machinery.
        let mut n = self.p.epoch();
        let mut digits = Vec::with_capacity(20);
        loop {
            digits.push(b'0' + (n % 10) as u8);
            n /= 10;
            if n == 0 {
                break;
            }
        }
        digits.iter().rev().map(|d| *d as char).collect()
    }

    /// The handle of (category, entity): ≥ 0, or the negated reason code.
    pub fn handle(&mut self, category: &str, entity: Option<String>) -> i32 {
        match self.p.handle(category, entity.as_deref()) {
            Ok(h) => h.0 as i32,
            Err(c) => -(code(c) as i32),
        }
    }

    /// Records one event by name. Returns its handle (≥ 0, for the caller to cache) or the
    /// negated reason code; an invalid event is counted under `invalid`.
    #[wasm_bindgen(js_name = recordNamed)]
    pub fn record_named(
        &mut self,
        now_ms: f64,
        category: &str,
        entity: Option<String>,
        value: f64,
        ts_ms: f64,
    ) -> i32 {
        let h = match self.p.handle(category, entity.as_deref()) {
            Ok(h) => h,
            Err(c) => return -(self.refused(c) as i32),
        };
        match self.record(now_ms, h.0, value, ts_ms) {
            0 => h.0 as i32,
            c => -(c as i32),
        }
    }

    /// Records one event through a handle: 0, or the reason code.
    pub fn record(&mut self, now_ms: f64, handle: u32, value: f64, ts_ms: f64) -> u32 {
        self.record_at(now_ms as i64, Handle(handle), value, ts_ms, None)
            .map_or_else(code, |()| 0)
    }

    /// Records one event of a subject through a handle: its value, and the subject's hash
    /// (SipHash-2-4, keyed by `setSketches`' key) into the bucket's distinct-count sketch.
    /// 0, or the reason code.
    #[wasm_bindgen(js_name = recordSubject)]
    pub fn record_subject(
        &mut self,
        now_ms: f64,
        handle: u32,
        value: f64,
        ts_ms: f64,
        subject: &str,
    ) -> u32 {
        self.record_at(now_ms as i64, Handle(handle), value, ts_ms, Some(subject))
            .map_or_else(code, |()| 0)
    }

    /// The distinct-count settings: the precision (4–16) and the subject key (16 bytes, or
    /// none). 0, or the reason code.
    #[wasm_bindgen(js_name = setDistinct)]
    pub fn set_distinct(&mut self, distinct_precision: u32, subject_key: &[u8]) -> u32 {
        let key = match subject_key.len() {
            0 => None,
            _ => match <[u8; 16]>::try_from(subject_key) {
                Ok(k) => Some(k),
                Err(_) => return code(RejectCode::InvalidSketch),
            },
        };
        let p = u8::try_from(distinct_precision).unwrap_or(0);
        self.p.set_distinct(p, key).map_or_else(code, |()| 0)
    }

    /// Makes a handle keep quantiles (before its first record). 0, or the reason code.
    #[wasm_bindgen(js_name = keepQuantiles)]
    pub fn keep_quantiles(&mut self, handle: u32) -> u32 {
        self.p
            .keep_quantiles(Handle(handle))
            .map_or_else(code, |()| 0)
    }

    /// Records events the caller aggregated itself: `count` values with exact sum `sum_nanos`
    /// (an integer below 2⁵³ in magnitude, in nano-units), `min` and `max`, in the bucket of
    /// `ts_ms`. 0, or the reason code (the `count` records are then counted as invalid).
    #[wasm_bindgen(js_name = recordSummary)]
    #[allow(clippy::too_many_arguments)]
    pub fn record_summary(
        &mut self,
        now_ms: f64,
        handle: u32,
        ts_ms: f64,
        count: f64,
        sum_nanos: f64,
        min: f64,
        max: f64,
    ) -> u32 {
        let exact = |x: f64| x.fract() == 0.0 && x.abs() < 9_007_199_254_740_992.0;
        if !exact(count) || count < 1.0 || !exact(sum_nanos) {
            return self.refused(RejectCode::InvalidSummary);
        }
        let t = match ts(ts_ms) {
            Some(Ok(t)) => t,
            _ => return self.refused(RejectCode::InvalidTimestamp),
        };
        let summary = edgetally_core::Summary {
            count: count as u64,
            sum: sum_nanos as i128,
            min,
            max,
        };
        match self
            .p
            .record_summary(now_ms as i64, Handle(handle), t, summary)
        {
            Ok(()) => 0,
            Err(c) => code(c),
        }
    }

    /// Records `values[i]` for handle `handles[i]` (or `handles[0]` for all when it has one
    /// element) at `ts_ms[i]` (or now when `ts_ms` is empty). Returns how many were accepted;
    /// the others are counted under `invalid`.
    #[wasm_bindgen(js_name = recordMany)]
    pub fn record_many(
        &mut self,
        now_ms: f64,
        handles: &[u32],
        values: &[f64],
        ts_ms: &[f64],
    ) -> u32 {
        let now = now_ms as i64;
        let mut ok = 0u32;
        let times = !ts_ms.is_empty();
        if (handles.len() != 1 && handles.len() != values.len())
            || (times && ts_ms.len() != values.len())
        {
            for _ in values {
                let _ = self.p.refuse(RejectCode::InvalidEvent);
            }
            return 0;
        }
        for (i, v) in values.iter().enumerate() {
            let h = Handle(if handles.len() == 1 {
                handles[0]
            } else {
                handles[i]
            });
            let t = if times { ts_ms[i] } else { f64::NAN };
            ok += u32::from(self.record_at(now, h, *v, t, None).is_ok());
        }
        ok
    }

    /// Seals what is pending; returns a token for `flushed`.
    pub fn flush(&mut self, now_ms: f64) -> f64 {
        self.p.flush(now_ms as i64) as f64
    }

    /// Whether every batch sealed before the `flush` that returned `token` was answered.
    pub fn flushed(&self, token: f64) -> bool {
        self.p.flushed(token as u64)
    }

    /// The next batch to send now, if any.
    #[wasm_bindgen(js_name = pollTransmit)]
    pub fn poll_transmit(&mut self, now_ms: f64) -> Option<Item> {
        self.p
            .poll_transmit(now_ms as i64)
            .map(|t| item(t.endpoint as u32, t.seq, Some(t.bytes.to_vec())))
    }

    /// When to call `pollTransmit` again at the latest (ms), or NaN when nothing is due.
    #[wasm_bindgen(js_name = pollTimeout)]
    pub fn poll_timeout(&self) -> f64 {
        self.p.poll_timeout().map_or(f64::NAN, |t| t as f64)
    }

    /// The merger's reply frame for batch `seq` (the `frame` of an HTTP reply, or the bytes
    /// of a QUIC reply). Returns false when the frame does not decode (the caller then
    /// reports a transport error).
    #[wasm_bindgen(js_name = handleReply)]
    pub fn handle_reply(&mut self, now_ms: f64, seq: f64, frame: &[u8]) -> bool {
        match Reply::decode(frame) {
            Ok(r) => {
                self.p.handle_reply(now_ms as i64, seq as u64, r);
                true
            }
            Err(_) => false,
        }
    }

    /// Sending batch `seq` to endpoint `endpoint` failed in transport.
    #[wasm_bindgen(js_name = transportError)]
    pub fn transport_error(&mut self, now_ms: f64, seq: f64, endpoint: u32) {
        self.p
            .handle_transport_error(now_ms as i64, seq as u64, endpoint as usize);
    }

    /// The `[start, end)` bucket bounds handle `handle` has open, as a two-element array,
    /// or an empty one.
    #[wasm_bindgen(js_name = openBucket)]
    pub fn open_bucket(&self, handle: u32) -> Vec<f64> {
        self.p
            .open_bucket(Handle(handle))
            .map_or_else(Vec::new, |(a, b)| vec![a as f64, b as f64])
    }

    /// Seals what is pending into batches of at most about `max_bytes` each; returns a
    /// token for `flushed`.
    #[wasm_bindgen(js_name = sealWithin)]
    pub fn seal_within(&mut self, now_ms: f64, max_bytes: u32) -> f64 {
        self.p.seal_within(now_ms as i64, max_bytes as usize);
        self.p.flush(now_ms as i64) as f64
    }

    /// Puts a stored batch back into the outbox (not persisted again).
    pub fn restore(&mut self, seq: f64, bytes: Vec<u8>) {
        self.p.restore(seq as u64, bytes);
    }

    /// Drops the oldest waiting batch other than `keep` (counted as dropped); its seq, or
    /// -1 when none waits.
    #[wasm_bindgen(js_name = dropOldest)]
    pub fn drop_oldest(&mut self, keep: f64) -> f64 {
        self.p.drop_oldest(keep as u64).map_or(-1.0, |s| s as f64)
    }

    /// Seals what is pending if its flush interval is over, sending nothing (offline);
    /// returns the next flush deadline, or NaN.
    #[wasm_bindgen(js_name = pollSeal)]
    pub fn poll_seal(&mut self, now_ms: f64) -> f64 {
        self.p
            .poll_seal(now_ms as i64)
            .map_or(f64::NAN, |t| t as f64)
    }

    /// Every waiting batch is due now (the network is back).
    pub fn wake(&mut self, now_ms: f64) {
        self.p.wake(now_ms as i64);
    }

    /// Batch `seq` went out without a reply to wait for (a beacon): send it again after
    /// `after_ms` unless an Ack comes first — it stays in the outbox until acked.
    #[wasm_bindgen(js_name = retryAfter)]
    pub fn retry_after(&mut self, now_ms: f64, seq: f64, after_ms: u32) {
        self.p
            .handle_reply(now_ms as i64, seq as u64, Reply::Retry { after_ms });
    }

    /// The next batch to sign, if any (each is handed out once).
    #[wasm_bindgen(js_name = pollSign)]
    pub fn poll_sign(&mut self) -> Option<Item> {
        self.p
            .poll_sign()
            .map(|(seq, message)| item(0, seq, Some(message)))
    }

    /// The 64-byte signature of batch `seq`: it becomes sendable (and is stored again).
    /// False when `seq` waits for none, or the signature is not 64 bytes.
    #[wasm_bindgen(js_name = handleSignature)]
    pub fn handle_signature(&mut self, seq: f64, signature: &[u8]) -> bool {
        <&[u8; 64]>::try_from(signature).is_ok_and(|s| self.p.handle_signature(seq as u64, s))
    }

    /// Signing batch `seq` failed: `pollSign` hands it out again.
    #[wasm_bindgen(js_name = signFailed)]
    pub fn sign_failed(&mut self, seq: f64) {
        self.p.sign_failed(seq as u64);
    }

    /// The next thing to store, if any (only with `persist`).
    #[wasm_bindgen(js_name = pollPersist)]
    pub fn poll_persist(&mut self) -> Option<Item> {
        self.p.poll_persist().map(|op| match op {
            PersistOp::Identity { next_seq, .. } => item(0, next_seq, None),
            PersistOp::Put { seq, bytes } => item(1, seq, Some(bytes.to_vec())),
            PersistOp::Remove { seq } => item(2, seq, None),
        })
    }

    /// The counters (see the TypeScript `Stats` type).
    pub fn stats(&self) -> Object {
        stats_object(&self.p.stats())
    }
}

impl Core {
    /// Records at `ts_ms` (NaN: now); a timestamp that is no usable number is counted as
    /// invalid like any other refusal.
    fn record_at(
        &mut self,
        now: i64,
        h: Handle,
        value: f64,
        ts_ms: f64,
        subject: Option<&str>,
    ) -> Result<(), RejectCode> {
        let t = match ts(ts_ms) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(c)) => return self.p.refuse(c),
        };
        match subject {
            None => self.p.record_handle(now, h, value, t),
            Some(s) => self.p.record_subject(now, h, value, t, s),
        }
    }

    /// Counts a refusal made here (before the producer saw the event); returns its code.
    fn refused(&mut self, c: RejectCode) -> u32 {
        let _ = self.p.refuse(c);
        code(c)
    }
}

fn set(o: &Object, k: &str, v: impl Into<JsValue>) {
    let _ = Reflect::set(o, &JsValue::from_str(k), &v.into());
}

fn by_reason(m: &ByReason) -> Object {
    let o = Object::new();
    for (c, n) in m.iter() {
        set(&o, c.as_str(), n as f64);
    }
    o
}

fn stats_object(s: &Stats) -> Object {
    let o = Object::new();
    let n = |x: u64| x as f64;
    set(&o, "recorded", n(s.recorded));
    set(&o, "invalid", n(s.invalid.total()));
    set(&o, "invalidByReason", by_reason(&s.invalid));
    set(&o, "pending", n(s.pending));
    set(&o, "queued", n(s.queued));
    set(&o, "inFlight", n(s.in_flight));
    set(&o, "acked", n(s.acked));
    set(&o, "ackedRecords", n(s.acked_records));
    set(&o, "retried", n(s.retried));
    set(&o, "rejected", n(s.rejected.total()));
    set(&o, "rejectedByReason", by_reason(&s.rejected));
    set(&o, "rejectedRecords", n(s.rejected_records));
    set(&o, "dropped", n(s.dropped));
    set(&o, "droppedRecords", n(s.dropped_records));
    set(&o, "bytesSent", n(s.bytes_sent));
    set(&o, "outboxBytes", n(s.outbox_bytes));
    o
}
/// Talc instead of Rust's default wasm allocator (dlmalloc): 2.6 KB less gzipped module for
/// the same single-threaded use (`cargo xtask web` prints the size).
#[cfg(all(not(target_feature = "atomics"), target_family = "wasm"))]
#[global_allocator]
static TALC: talc::wasm::WasmDynamicTalc = talc::wasm::new_wasm_dynamic_allocator();
