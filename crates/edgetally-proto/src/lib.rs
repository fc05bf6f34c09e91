//! # edgetally-proto
//!
//! The wire: batch format v1 (a versioned envelope around a postcard payload, signed with
//! ed25519 over a domain-separation prefix), the Ack / Nack / Retry replies, and the frame
//! codec for streams. Decoders take untrusted bytes and never panic. No I/O, no clock: the
//! receiver's time is an argument. Builds for wasm32.

#![cfg_attr(not(feature = "wasm-abi-check"), forbid(unsafe_code))]

mod builder;
pub mod credential;
mod envelope;
mod frame;
pub mod producer;
mod reader;
mod rendezvous;
mod small_sort;
pub mod topology;

#[cfg(all(target_arch = "wasm32", feature = "wasm-abi-check"))]
mod abi_check;

pub use builder::{BatchBuilder, SketchOpts};
pub use envelope::{
    decode, decode_payload, decode_payload_version, encode_payload, is_unsigned, open, peek,
    seal_unsigned, set_signature, signing_message, verify_many, verify_signature, version_of,
    DecodeError, SealError, Signer, Unverified, DOMAIN, DOMAIN_V2, SIGNATURE_LEN, VERSION,
    VERSION_V2,
};
pub use frame::{encode_frame, FrameDecoder, Reply};
pub use producer::{ByReason, Handle, PersistOp, Producer, ProducerConfig, Stats, Transmit};
