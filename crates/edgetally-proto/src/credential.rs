//! Enrolment credentials: an issuer (a site's backend) vouches for one producer key until a
//! deadline, so a merger whose policy is `enrolled` admits browsers of that site without
//! listing each key. See `docs/PROTOCOL.md` §8.
//!
//! ```text
//! credential = 0xEC | version:u8 (=1) | producer:[u8;32] | not_after_ms:i64 LE
//!            | issuer:[u8;32] | signature:[u8;64]                        (138 bytes)
//! signature  = ed25519(issuer key, "edgetally/enroll/v1\0" ‖ producer ‖ not_after_ms LE)
//! ```
//!
//! The first byte, `0xEC`, is never the first byte of a batch envelope (whose version is 1),
//! so a credential travels on the same QUIC streams as batches.

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use edgetally_core::{ProducerKey, RejectCode};

/// The first byte of every credential.
pub const CREDENTIAL_TAG: u8 = 0xEC;
/// The only credential version.
pub const CREDENTIAL_VERSION: u8 = 1;
/// A credential's length in bytes.
pub const CREDENTIAL_LEN: usize = 2 + 32 + 8 + 32 + 64;
/// Prepended to what the issuer signs.
pub const ENROLL_DOMAIN: &[u8] = b"edgetally/enroll/v1\0";

/// A credential whose signature verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credential {
    /// The producer key it admits.
    pub producer: ProducerKey,
    /// Until when (ms since the Unix epoch, exclusive).
    pub not_after_ms: i64,
    /// The issuer that signed it.
    pub issuer: [u8; 32],
}

fn message(producer: &[u8; 32], not_after_ms: i64) -> Vec<u8> {
    let mut m = Vec::with_capacity(ENROLL_DOMAIN.len() + 40);
    m.extend_from_slice(ENROLL_DOMAIN);
    m.extend_from_slice(producer);
    m.extend_from_slice(&not_after_ms.to_le_bytes());
    m
}

/// Issues a credential: the issuer (seed `issuer_seed`) admits `producer` until
/// `not_after_ms`.
pub fn issue(issuer_seed: &[u8; 32], producer: &ProducerKey, not_after_ms: i64) -> Vec<u8> {
    let key = SigningKey::from_bytes(issuer_seed);
    let sig = key.sign(&message(&producer.0, not_after_ms));
    let mut out = Vec::with_capacity(CREDENTIAL_LEN);
    out.push(CREDENTIAL_TAG);
    out.push(CREDENTIAL_VERSION);
    out.extend_from_slice(&producer.0);
    out.extend_from_slice(&not_after_ms.to_le_bytes());
    out.extend_from_slice(key.verifying_key().as_bytes());
    out.extend_from_slice(&sig.to_bytes());
    out
}

/// The public key of an issuer seed (what a merger's `issuer_keys` lists).
pub fn issuer_public(issuer_seed: &[u8; 32]) -> [u8; 32] {
    SigningKey::from_bytes(issuer_seed)
        .verifying_key()
        .to_bytes()
}

/// Whether these bytes are a credential rather than a batch.
pub fn is_credential(bytes: &[u8]) -> bool {
    bytes.first() == Some(&CREDENTIAL_TAG)
}

/// Parses and verifies a credential against the trusted issuers, at time `now_ms`. Every
/// failure is `not_admitted` (a wrong length or tag: `malformed`). Verification is strict
/// (canonical encodings, no small-order keys), so the verdict is a function of the bytes.
pub fn verify(bytes: &[u8], issuers: &[[u8; 32]], now_ms: i64) -> Result<Credential, RejectCode> {
    if bytes.len() != CREDENTIAL_LEN || bytes[0] != CREDENTIAL_TAG {
        return Err(RejectCode::Malformed);
    }
    if bytes[1] != CREDENTIAL_VERSION {
        return Err(RejectCode::UnsupportedVersion);
    }
    let arr = |r: std::ops::Range<usize>| -> Result<[u8; 32], RejectCode> {
        bytes
            .get(r)
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or(RejectCode::Malformed)
    };
    let producer = arr(2..34)?;
    let not_after_ms = bytes
        .get(34..42)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(i64::from_le_bytes)
        .ok_or(RejectCode::Malformed)?;
    let issuer = arr(42..74)?;
    let sig = bytes
        .get(74..138)
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .ok_or(RejectCode::Malformed)?;
    if !issuers.contains(&issuer) || not_after_ms <= now_ms {
        return Err(RejectCode::NotAdmitted);
    }
    let vk = VerifyingKey::from_bytes(&issuer).map_err(|_| RejectCode::NotAdmitted)?;
    vk.verify_strict(
        &message(&producer, not_after_ms),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| RejectCode::NotAdmitted)?;
    Ok(Credential {
        producer: ProducerKey(producer),
        not_after_ms,
        issuer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_credentials_verify_and_every_tampering_is_refused() {
        let seed = [7u8; 32];
        let issuer = issuer_public(&seed);
        let producer = ProducerKey([9u8; 32]);
        let c = issue(&seed, &producer, 10_000);
        assert_eq!(c.len(), CREDENTIAL_LEN);
        assert!(is_credential(&c));
        let ok = verify(&c, &[issuer], 9_999).expect("valid");
        assert_eq!(
            (ok.producer, ok.not_after_ms, ok.issuer),
            (producer, 10_000, issuer)
        );
        // Expired, unknown issuer, wrong length.
        assert_eq!(verify(&c, &[issuer], 10_000), Err(RejectCode::NotAdmitted));
        assert_eq!(verify(&c, &[[1u8; 32]], 0), Err(RejectCode::NotAdmitted));
        assert_eq!(verify(&c[..137], &[issuer], 0), Err(RejectCode::Malformed));
        // Every single-bit flip is refused (or, in the tag/version bytes, named as such).
        for i in 0..c.len() {
            for bit in 0..8 {
                let mut t = c.clone();
                t[i] ^= 1 << bit;
                assert!(verify(&t, &[issuer], 0).is_err(), "byte {i} bit {bit}");
            }
        }
    }
}
