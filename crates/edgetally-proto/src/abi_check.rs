//! A minimal C ABI, compiled only for wasm32 with the `wasm-abi-check` feature. `cargo xtask`
//! builds it as a cdylib so that the decode → verify → apply path is linked into a real wasm
//! module, then fails if that module imports anything from "env" (which would mean some
//! dependency reaches for a platform the browser does not have).

#![allow(unsafe_code)]

use edgetally_core::{Limits, LogEntry, Replica};
use std::sync::Arc;

/// Allocates `len` bytes for the host to write an input into.
#[no_mangle]
pub extern "C" fn et_alloc(len: usize) -> *mut u8 {
    let mut v = Vec::<u8>::with_capacity(len);
    let p = v.as_mut_ptr();
    core::mem::forget(v);
    p
}

/// Decodes, verifies and applies one batch to a fresh replica; returns the reason code on
/// rejection, or 1000 + the number of records counted for "cpu" on success.
///
/// # Safety
/// `ptr..ptr+len` must be memory returned by [`et_alloc`] and initialised by the host.
#[no_mangle]
pub unsafe extern "C" fn et_apply(ptr: *const u8, len: usize, now_ms: i64) -> u32 {
    let bytes = unsafe { core::slice::from_raw_parts(ptr, len) };
    let batch = match crate::open(bytes, &Limits::default(), now_ms) {
        Ok(b) => b,
        Err(e) => return e.code.as_u16() as u32,
    };
    let mut r = Replica::new();
    match r.apply(LogEntry {
        batch: Arc::new(batch),
        raw: Arc::from(bytes),
    }) {
        Ok(_) => 1000 + r.aggregate("cpu", None, 0, now_ms).total.count.min(1 << 20) as u32,
        Err(c) => c.as_u16() as u32,
    }
}

/// The signature rule on `key (32) ‖ signature (64) ‖ message` at `ptr..ptr+len`: 1 if
/// valid, 0 if not (the host compares the wasm verdicts with the native ones).
///
/// # Safety
/// As for [`et_apply`].
#[no_mangle]
pub unsafe extern "C" fn et_verify(ptr: *const u8, len: usize) -> u32 {
    let bytes = unsafe { core::slice::from_raw_parts(ptr, len) };
    let (Some(key), Some(sig), Some(msg)) = (
        bytes.get(..32).and_then(|b| <[u8; 32]>::try_from(b).ok()),
        bytes.get(32..96).and_then(|b| <[u8; 64]>::try_from(b).ok()),
        bytes.get(96..),
    ) else {
        return 0;
    };
    u32::from(crate::verify_signature(&key, msg, &sig))
}

/// Runs the sans-IO producer once (record, seal, transmit, ack) so it is linked into the
/// module too; returns the size of the batch it produced.
#[no_mangle]
pub extern "C" fn et_producer(now_ms: i64, value: f64) -> u32 {
    let cfg = crate::ProducerConfig::default();
    let Ok(mut p) = crate::Producer::new(cfg, [7; 32], 1, &["m".into()], 3) else {
        return 0;
    };
    if p.record(now_ms, "cpu", Some("d1"), value, None).is_err() {
        return 0;
    }
    let h = p.handle("cpu", None);
    if let Ok(h) = h {
        p.record_many(now_ms, h, &[value, value], None);
    }
    p.flush(now_ms);
    match p.poll_transmit(now_ms) {
        Some(t) => {
            p.handle_reply(now_ms, t.seq, crate::Reply::Ack);
            t.bytes.len() as u32
        }
        None => 0,
    }
}

/// Builds the sketches of a corpus and returns their canonical bytes, so that the host can
/// compare them with the native build's: a pointer to `len: u32 LE | bytes`, where the bytes
/// are the distinct-count sketch (precision 14) of every subject, then the quantile sketch
/// (1 %) of every value, each preceded by its length (u32 LE). Corpus records: `0 | f64 LE`
/// (a value) or `1 | len: u16 LE | UTF-8` (a subject). Null on a malformed corpus.
///
/// # Safety
/// `ptr..ptr+len` must be memory returned by [`et_alloc`] and initialised by the host.
#[no_mangle]
pub unsafe extern "C" fn et_sketch(ptr: *const u8, len: usize) -> *const u8 {
    use edgetally_sketch::{subject_hash, Hll, Quantiles};
    let mut rest = unsafe { core::slice::from_raw_parts(ptr, len) };
    let (Ok(mut hll), Ok(mut q)) = (Hll::new(14), Quantiles::new(100)) else {
        return core::ptr::null();
    };
    while let Some((&tag, r)) = rest.split_first() {
        match tag {
            0 => {
                let Some((v, r)) = r.split_first_chunk::<8>() else {
                    return core::ptr::null();
                };
                q.insert(f64::from_le_bytes(*v), 1);
                rest = r;
            }
            1 => {
                let Some((n, r)) = r.split_first_chunk::<2>() else {
                    return core::ptr::null();
                };
                let n = usize::from(u16::from_le_bytes(*n));
                let Some((s, r)) = r.split_at_checked(n) else {
                    return core::ptr::null();
                };
                let Ok(s) = core::str::from_utf8(s) else {
                    return core::ptr::null();
                };
                hll.insert_hash(subject_hash(s, None));
                rest = r;
            }
            _ => return core::ptr::null(),
        }
    }
    let mut body = Vec::new();
    for part in [hll.encode(), q.encode()] {
        body.extend_from_slice(&(part.len() as u32).to_le_bytes());
        body.extend_from_slice(&part);
    }
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    let p = out.as_ptr();
    core::mem::forget(out);
    p
}
