//! Batch formats v1 and v2: the signed envelope and its postcard payload (see
//! `docs/PROTOCOL.md`).
//!
//! ```text
//! envelope  = version:u8 (1 or 2) | payload_len:varint | payload | signature:[u8; 64]
//! signature = ed25519(producer key, "edgetally/batch/v<version>\0" ‖ payload)
//! payload   = postcard(PayloadV1)                      (v1)
//!           | postcard(PayloadV1) ‖ sketch section     (v2: some summary carries sketches)
//! ```
//!
//! A batch is sealed as v1 unless it carries sketches, so producers that record no subject
//! and no quantiles write exactly what earlier releases wrote.

use crate::reader::Reader;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use edgetally_core::sketches::{Hll, Quantiles};
use edgetally_core::{
    Batch, BatchId, BatchSummary, Limits, ProducerKey, RejectCode, Sketches, StringTable, Summary,
};
use serde::Serialize;

/// Batch format v1: summaries only.
pub const VERSION: u8 = 1;
/// Batch format v2: summaries, some of them with sketches (distinct counts, quantiles).
pub const VERSION_V2: u8 = 2;
/// Prepended to a v1 payload before signing, so a batch signature can never be mistaken for
/// a signature over anything else.
pub const DOMAIN: &[u8] = b"edgetally/batch/v1\0";
/// The same for a v2 payload (a v1 signature never verifies as v2, nor the reverse).
pub const DOMAIN_V2: &[u8] = b"edgetally/batch/v2\0";
/// Sketch flags of a v2 summary: which sketches follow.
const HAS_DISTINCT: u8 = 1;
const HAS_QUANTILES: u8 = 2;

fn domain(version: u8) -> &'static [u8] {
    if version == VERSION_V2 {
        DOMAIN_V2
    } else {
        DOMAIN
    }
}
/// Signature length.
pub const SIGNATURE_LEN: usize = 64;

/// Why a batch was refused, with a stable reason code and a human detail.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct DecodeError {
    /// The stable reason code.
    pub code: RejectCode,
    /// What exactly was wrong.
    pub detail: &'static str,
}

impl DecodeError {
    fn new(code: RejectCode, detail: &'static str) -> Self {
        DecodeError { code, detail }
    }
}

impl From<RejectCode> for DecodeError {
    fn from(code: RejectCode) -> Self {
        DecodeError { code, detail: "" }
    }
}

#[derive(Serialize)]
struct PayloadV1<'a> {
    producer: [u8; 32],
    epoch: u64,
    seq: u64,
    created_ms: i64,
    bucket_ms: u32,
    strings: &'a StringTable,
    summaries: &'a [BatchSummary],
}

/// A producer's signing identity.
#[derive(Clone, Debug)]
pub struct Signer {
    key: SigningKey,
}

impl Signer {
    /// From a 32-byte secret seed (the caller supplies the randomness).
    pub fn from_seed(seed: [u8; 32]) -> Signer {
        Signer {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// The public key.
    pub fn producer(&self) -> ProducerKey {
        ProducerKey(self.key.verifying_key().to_bytes())
    }

    /// The secret seed (for persisting the identity).
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Encodes and signs a batch. The batch's producer must be this signer's key.
    pub fn seal(&self, batch: &Batch) -> Result<Vec<u8>, SealError> {
        if batch.id.producer != self.producer() {
            return Err(SealError::WrongProducer);
        }
        let mut out = seal_unsigned(batch)?;
        let message = signing_message(&out).ok_or(SealError::Encode)?;
        set_signature(&mut out, &self.sign(&message));
        Ok(out)
    }

    /// The ed25519 signature of `message` (for a batch: its [`signing_message`]).
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.key.sign(message).to_bytes()
    }
}

/// Encodes a batch into an envelope whose signature is 64 zero bytes, for a producer that
/// signs elsewhere (the browser SDK signs with WebCrypto): sign its [`signing_message`] and
/// put the signature in with [`set_signature`]. No honest signature is all zeros (its `R`
/// would encode a point of order 4, and `r·B` never is one), so [`is_unsigned`] tells such
/// an envelope apart.
pub fn seal_unsigned(batch: &Batch) -> Result<Vec<u8>, SealError> {
    let payload = encode_payload(batch)?;
    let mut out = Vec::with_capacity(payload.len() + 6 + SIGNATURE_LEN);
    out.push(version_of(batch));
    push_varint(&mut out, payload.len() as u64);
    out.extend_from_slice(&payload);
    out.resize(out.len() + SIGNATURE_LEN, 0);
    Ok(out)
}

/// `DOMAIN ‖ payload` of an envelope: the message its signature covers (`None` if the
/// framing is broken).
pub fn signing_message(envelope: &[u8]) -> Option<Vec<u8>> {
    let any = Limits {
        max_payload_bytes: usize::MAX,
        ..Limits::default()
    };
    let (version, payload, _) = split(envelope, &any).ok()?;
    Some(signed_message(version, payload))
}

/// The format a batch is sealed in: v2 when it carries sketches, else v1.
pub fn version_of(batch: &Batch) -> u8 {
    if batch.sketches.is_empty() {
        VERSION
    } else {
        VERSION_V2
    }
}

/// Whether an envelope's signature is the all-zero placeholder of [`seal_unsigned`].
pub fn is_unsigned(envelope: &[u8]) -> bool {
    envelope.len() > SIGNATURE_LEN
        && envelope[envelope.len() - SIGNATURE_LEN..]
            .iter()
            .all(|b| *b == 0)
}

/// Puts `signature` into the envelope's signature slot (its last 64 bytes).
pub fn set_signature(envelope: &mut [u8], signature: &[u8; SIGNATURE_LEN]) {
    if let Some(at) = envelope.len().checked_sub(SIGNATURE_LEN) {
        envelope[at..].copy_from_slice(signature);
    }
}

/// Why a batch could not be sealed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The batch names another producer.
    #[error("batch producer is not the signer's key")]
    WrongProducer,
    /// Serialisation failed (it cannot for well-formed batches).
    #[error("encoding failed")]
    Encode,
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The payload of a batch (what is signed, after [`DOMAIN`] or [`DOMAIN_V2`]): postcard of
/// the v1 fields, then, in v2, the sketch section — the number of summaries with sketches,
/// then per such summary (ascending) its index, its flags (1: distinct, 2: quantiles) and
/// each sketch present as a length-prefixed canonical encoding.
pub fn encode_payload(batch: &Batch) -> Result<Vec<u8>, SealError> {
    let mut out = encode_v1_fields(batch)?;
    if !batch.sketches.is_empty() {
        push_varint(&mut out, batch.sketches.len() as u64);
        for (i, k) in &batch.sketches {
            push_varint(&mut out, u64::from(*i));
            let flags = u8::from(k.distinct.is_some()) * HAS_DISTINCT
                + u8::from(k.quantiles.is_some()) * HAS_QUANTILES;
            out.push(flags);
            for bytes in [
                k.distinct.as_ref().map(|h| h.encode()),
                k.quantiles.as_ref().map(|q| q.encode()),
            ]
            .into_iter()
            .flatten()
            {
                push_varint(&mut out, bytes.len() as u64);
                out.extend_from_slice(&bytes);
            }
        }
    }
    Ok(out)
}

fn encode_v1_fields(batch: &Batch) -> Result<Vec<u8>, SealError> {
    postcard::to_allocvec(&PayloadV1 {
        producer: batch.id.producer.0,
        epoch: batch.id.epoch,
        seq: batch.id.seq,
        created_ms: batch.created_ms,
        bucket_ms: batch.bucket_ms,
        strings: &batch.strings,
        summaries: &batch.summaries,
    })
    .map_err(|_| SealError::Encode)
}

fn signed_message(version: u8, payload: &[u8]) -> Vec<u8> {
    let domain = domain(version);
    let mut m = Vec::with_capacity(domain.len() + payload.len());
    m.extend_from_slice(domain);
    m.extend_from_slice(payload);
    m
}

/// A batch that decoded and passed every clock-free check, but whose signature is not yet
/// verified. Verification is separate so a receiver can verify many at once.
#[derive(Clone, Debug)]
pub struct Unverified {
    /// The decoded batch.
    pub batch: Batch,
    /// `DOMAIN ‖ payload`, the signed message.
    message: Vec<u8>,
    signature: [u8; 64],
}

/// Decodes an envelope and checks every limit and clock-free rule while decoding; counts are
/// checked before the items they announce are read, so oversized inputs are refused early.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Unverified, DecodeError> {
    let (version, payload, signature) = split(bytes, limits)?;
    let batch = decode_payload_version(payload, version, limits)?;
    let message = signed_message(version, payload);
    Ok(Unverified {
        batch,
        message,
        signature,
    })
}

/// An envelope's version, payload and signature, its framing checked (not the payload).
fn split<'a>(
    bytes: &'a [u8],
    limits: &Limits,
) -> Result<(u8, &'a [u8], [u8; SIGNATURE_LEN]), DecodeError> {
    let mut r = Reader::new(bytes);
    let version = r.u8().map_err(|c| DecodeError::new(c, "empty input"))?;
    if version != VERSION && version != VERSION_V2 {
        return Err(DecodeError::new(
            RejectCode::UnsupportedVersion,
            "unknown batch version",
        ));
    }
    let len = r
        .u32()
        .map_err(|c| DecodeError::new(c, "bad payload length"))? as usize;
    if len > limits.max_payload_bytes {
        return Err(DecodeError::new(
            RejectCode::PayloadTooLarge,
            "payload exceeds the limit",
        ));
    }
    let payload = r
        .bytes(len)
        .map_err(|c| DecodeError::new(c, "truncated payload"))?;
    let signature = r
        .array::<SIGNATURE_LEN>()
        .map_err(|c| DecodeError::new(c, "truncated signature"))?;
    if r.remaining() != 0 {
        return Err(DecodeError::new(
            RejectCode::TrailingBytes,
            "bytes after the signature",
        ));
    }
    Ok((version, payload, signature))
}

/// The records (summed counts) a sealed envelope carries, read without the batch's semantic
/// checks or its signature: for a producer's own stats about batches it stored itself. The
/// browser SDK restores stored batches this way, so its wasm module carries no validation.
pub fn records_of(bytes: &[u8], limits: &Limits) -> Option<u64> {
    let (_, payload, _) = split(bytes, limits).ok()?;
    // The summaries only (a v2 batch's sketch section is not read: the browser's module then
    // carries no sketch decoder).
    let b = read_summaries(&mut Reader::new(payload), limits).ok()?;
    // Stored bytes are not trusted to be ours: a crafted count saturates instead of overflowing.
    Some(
        b.summaries
            .iter()
            .fold(0u64, |n, s| n.saturating_add(s.summary.count)),
    )
}

/// The id and creation time of an envelope, read from its framing and the payload's first
/// fields only: enough to route it (the group that owns it runs every check). `None` when
/// even these do not decode.
pub fn peek(bytes: &[u8], limits: &Limits) -> Option<(BatchId, i64)> {
    let (_, payload, _) = split(bytes, limits).ok()?;
    let mut r = Reader::new(payload);
    let producer = ProducerKey(r.array::<32>().ok()?);
    let epoch = r.u64().ok()?;
    let seq = r.u64().ok()?;
    let created_ms = r.i64().ok()?;
    Some((
        BatchId {
            producer,
            epoch,
            seq,
        },
        created_ms,
    ))
}

/// Decodes a v1 payload (without the envelope).
pub fn decode_payload(payload: &[u8], limits: &Limits) -> Result<Batch, DecodeError> {
    decode_payload_version(payload, VERSION, limits)
}

/// Decodes a payload of format `version` (without the envelope).
pub fn decode_payload_version(
    payload: &[u8],
    version: u8,
    limits: &Limits,
) -> Result<Batch, DecodeError> {
    let mut batch = read_payload(payload, version, limits)?;
    batch
        .check(limits)
        .map_err(|c| DecodeError::new(c, detail_of(c)))?;
    Ok(batch)
}

/// A payload's fields, bounded by `limits`, not yet checked ([`Batch::check`]).
fn read_payload(payload: &[u8], version: u8, limits: &Limits) -> Result<Batch, DecodeError> {
    let mut r = Reader::new(payload);
    let mut batch = read_summaries(&mut r, limits)?;
    if version == VERSION_V2 {
        batch.sketches = read_sketches(&mut r, batch.summaries.len())?;
    }
    if r.remaining() != 0 {
        return Err(DecodeError::new(
            RejectCode::TrailingBytes,
            "bytes after the last summary",
        ));
    }
    Ok(batch)
}

/// The fields every version's payload starts with (all of v1's), up to the last summary.
fn read_summaries(r: &mut Reader<'_>, limits: &Limits) -> Result<Batch, DecodeError> {
    let m = |c| DecodeError::new(c, "malformed payload");
    let producer = ProducerKey(r.array::<32>().map_err(m)?);
    let epoch = r.u64().map_err(m)?;
    let seq = r.u64().map_err(m)?;
    let created_ms = r.i64().map_err(m)?;
    let bucket_ms = r.u32().map_err(m)?;
    let n_strings = r.u32().map_err(m)? as usize;
    if n_strings > limits.max_categories.saturating_add(limits.max_entities) {
        return Err(DecodeError::new(
            RejectCode::TooManyEntities,
            "string table exceeds the category and entity limits",
        ));
    }
    // Each string takes at least one byte, so the remaining length bounds the allocation.
    let mut strings =
        StringTable::with_capacity(n_strings.min(r.remaining()), r.remaining().min(1 << 16));
    for _ in 0..n_strings {
        strings.push(r.str().map_err(|c| DecodeError::new(c, "bad string"))?);
    }
    let n = r.u32().map_err(m)? as usize;
    if n > limits.max_summaries {
        return Err(DecodeError::new(
            RejectCode::TooManySummaries,
            "more summaries than the limit",
        ));
    }
    // A summary is at least 21 bytes (five 1-byte varints and two f64).
    let mut summaries = Vec::with_capacity(n.min(r.remaining() / 21));
    for _ in 0..n {
        let category = r.u32().map_err(m)?;
        let entity = r.u32().map_err(m)?;
        let bucket = r.i64().map_err(m)?;
        let count = r.u64().map_err(m)?;
        let sum = r.i128().map_err(m)?;
        let min = r.f64().map_err(m)?;
        let max = r.f64().map_err(m)?;
        summaries.push(BatchSummary {
            category,
            entity,
            bucket,
            summary: Summary {
                count,
                sum,
                min,
                max,
            },
        });
    }
    Ok(Batch {
        id: BatchId {
            producer,
            epoch,
            seq,
        },
        created_ms,
        bucket_ms,
        strings,
        summaries,
        sketches: Vec::new(),
    })
}

/// A v2 payload's sketch section: at least one summary with sketches, each index below
/// `summaries` and above the previous one, flags naming at least one sketch, each sketch in
/// its canonical encoding. Consistency with the summaries is [`Batch::check`]'s.
fn read_sketches(
    r: &mut Reader<'_>,
    summaries: usize,
) -> Result<Vec<(u32, Sketches)>, DecodeError> {
    let bad = |detail| DecodeError::new(RejectCode::InvalidSketch, detail);
    let m = |c| DecodeError::new(c, "malformed sketch section");
    let n = r.u32().map_err(m)? as usize;
    if n == 0 || n > summaries {
        return Err(bad(
            "a v2 batch carries sketches for 1 to all of its summaries",
        ));
    }
    let mut out = Vec::with_capacity(n);
    let mut prev: Option<u32> = None;
    for _ in 0..n {
        let i = r.u32().map_err(m)?;
        if i as usize >= summaries || prev.is_some_and(|p| p >= i) {
            return Err(bad("sketch indices must ascend within the summaries"));
        }
        prev = Some(i);
        let flags = r.u8().map_err(m)?;
        if flags == 0 || flags & !(HAS_DISTINCT | HAS_QUANTILES) != 0 {
            return Err(bad("unknown sketch flags"));
        }
        let mut k = Sketches::default();
        if flags & HAS_DISTINCT != 0 {
            let bytes = take(r)?;
            k.distinct =
                Some(Hll::decode(bytes).map_err(|_| bad("distinct sketch is not canonical"))?);
        }
        if flags & HAS_QUANTILES != 0 {
            let bytes = take(r)?;
            k.quantiles = Some(
                Quantiles::decode(bytes).map_err(|_| bad("quantile sketch is not canonical"))?,
            );
        }
        out.push((i, k));
    }
    Ok(out)
}

/// A length-prefixed sketch encoding.
fn take<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], DecodeError> {
    let m = |c| DecodeError::new(c, "malformed sketch section");
    let len = r.u32().map_err(m)? as usize;
    r.bytes(len).map_err(m)
}

fn detail_of(c: RejectCode) -> &'static str {
    match c {
        RejectCode::InvalidBucketWidth => "bucket width must be whole seconds dividing a day",
        RejectCode::TooManySummaries => "more summaries than the limit",
        RejectCode::TooManyCategories => "more distinct categories than the limit",
        RejectCode::TooManyEntities => "more distinct entities than the limit",
        RejectCode::BadStringIndex => "summary refers outside the string table",
        RejectCode::InvalidStringTable => "string table has a duplicate or unused string",
        RejectCode::InvalidCategory => "category must be 1-200 bytes",
        RejectCode::InvalidEntity => "entity must be 1-200 bytes",
        RejectCode::InvalidValue => "min/max must be finite with |v| <= 1e15",
        RejectCode::InvalidSummary => "summary count, sum, min and max are inconsistent",
        RejectCode::InvalidTimestamp => "bucket outside the representable time range",
        RejectCode::DuplicateKey => "the same key appears twice",
        RejectCode::InvalidSketch => "a summary's sketches are inconsistent with it",
        _ => "rejected",
    }
}

/// Whether 32 bytes are the canonical encoding of a field element y (with the sign bit of x):
/// y < p = 2²⁵⁵ − 19. The only non-canonical ones are y ∈ [p, 2²⁵⁵).
fn canonical_y(bytes: &[u8; 32]) -> bool {
    let top = bytes[31] & 0x7f == 0x7f && bytes[1..31].iter().all(|&b| b == 0xff);
    !(top && bytes[0] >= 0xed)
}

fn verifying_key(p: &ProducerKey) -> Result<VerifyingKey, DecodeError> {
    if !canonical_y(&p.0) {
        return Err(DecodeError::new(
            RejectCode::BadSignature,
            "producer key is not a canonical encoding",
        ));
    }
    let vk = VerifyingKey::from_bytes(&p.0).map_err(|_| {
        DecodeError::new(
            RejectCode::BadSignature,
            "producer key is not a curve point",
        )
    })?;
    if vk.is_weak() {
        return Err(DecodeError::new(
            RejectCode::BadSignature,
            "producer key has small order",
        ));
    }
    Ok(vk)
}

/// The canonical encodings of the eight points of small order (the 8-torsion subgroup).
fn small_order_encodings() -> &'static [[u8; 32]; 8] {
    static ENC: std::sync::OnceLock<[[u8; 32]; 8]> = std::sync::OnceLock::new();
    ENC.get_or_init(|| curve25519_dalek::constants::EIGHT_TORSION.map(|p| p.compress().to_bytes()))
}

/// The verification rule (docs/PROTOCOL.md §2): exactly ed25519-dalek's `verify_strict`
/// (S < L; R decodes and is not of small order; the encoding of \[S\]B − \[k\]A equals R's
/// bytes, k = SHA-512(R ‖ A ‖ M)), with A already checked by [`verifying_key`] (canonical,
/// decodes, not of small order). R is never decompressed: a bytes comparison with the
/// recomputed point's canonical encoding refuses any R that does not decode or is not
/// canonical, and the eight small-order points are refused by their encodings — the same
/// verdicts for ~15 % less work. One signature at a time: the verdict is a pure function of
/// the bytes — alone or among others, on any node and platform.
fn check(vk: &VerifyingKey, u: &Unverified) -> Result<(), DecodeError> {
    if strict(vk, &u.message, &u.signature) {
        Ok(())
    } else {
        Err(DecodeError::new(
            RejectCode::BadSignature,
            "signature does not verify",
        ))
    }
}

#[allow(non_snake_case)]
fn strict(vk: &VerifyingKey, message: &[u8], signature: &[u8; 64]) -> bool {
    use curve25519_dalek::{EdwardsPoint, Scalar};
    use sha2::{Digest as _, Sha512};
    let (Ok(R), Ok(s)) = (
        <[u8; 32]>::try_from(&signature[..32]),
        <[u8; 32]>::try_from(&signature[32..]),
    ) else {
        return false;
    };
    if small_order_encodings().contains(&R) {
        return false;
    }
    let Some(S) = Option::<Scalar>::from(Scalar::from_canonical_bytes(s)) else {
        return false;
    };
    let mut h = Sha512::new();
    h.update(R);
    h.update(vk.as_bytes());
    h.update(message);
    let k = Scalar::from_hash(h);
    let minus_A = -vk.to_edwards();
    EdwardsPoint::vartime_double_scalar_mul_basepoint(&k, &minus_A, &S)
        .compress()
        .to_bytes()
        == R
}

/// The verification rule of docs/PROTOCOL.md §2 for any key, message and signature: what
/// every batch signature is judged by (the message being the domain prefix and payload).
pub fn verify_signature(key: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    verifying_key(&ProducerKey(*key)).is_ok_and(|vk| strict(&vk, message, signature))
}

impl Unverified {
    /// Verifies the signature (the rule of docs/PROTOCOL.md §2).
    pub fn verify(self) -> Result<Batch, DecodeError> {
        let vk = verifying_key(&self.batch.id.producer)?;
        check(&vk, &self)?;
        Ok(self.batch)
    }

    /// The signed message length (for accounting).
    pub fn message_len(&self) -> usize {
        self.message.len()
    }
}

/// Verifies many batches, each on its own (so each verdict is exactly [`Unverified::verify`]'s);
/// a producer's key is decoded once per call. Results are in input order.
pub fn verify_many(items: Vec<Unverified>) -> Vec<Result<Batch, DecodeError>> {
    // A producer usually has several batches in a call: its key is decoded once.
    let mut keys: Vec<(ProducerKey, Result<VerifyingKey, DecodeError>)> = Vec::new();
    items
        .into_iter()
        .map(|u| {
            let p = u.batch.id.producer;
            let key = match keys.iter().find(|(k, _)| *k == p) {
                Some((_, v)) => v.clone(),
                None => {
                    let v = verifying_key(&p);
                    if keys.len() < 64 {
                        keys.push((p, v.clone()));
                    }
                    v
                }
            };
            key.and_then(|vk| check(&vk, &u)).map(|()| u.batch)
        })
        .collect()
}

/// Decodes, applies the producer's name rule, checks the clock-dependent limits against
/// `now_ms`, and verifies: the whole acceptance path for one batch from a producer (admission
/// aside), in the order docs/PROTOCOL.md §3 gives.
pub fn open(bytes: &[u8], limits: &Limits, now_ms: i64) -> Result<Batch, DecodeError> {
    let u = decode(bytes, limits)?;
    u.batch
        .check_names()
        .map_err(|c| DecodeError::new(c, "a name holds a control character"))?;
    u.batch
        .check_time(now_ms, limits)
        .map_err(|c| DecodeError::new(c, "bucket outside the accepted time window"))?;
    u.verify()
}
