//! Signature verification under two rules, per signature, on messages the size of the merger
//! benchmark's batches (9,000 bytes: 200 summaries): the rule the merger applies
//! (docs/PROTOCOL.md §2, `verify_strict` semantics, one signature at a time) against ZIP 215
//! (ed25519-zebra), one at a time and in batches — with every signature under its own key,
//! and with eight keys (a handful of busy producers, whose same-key signatures the batch
//! verifier coalesces). Medians of 7 rounds of at least 0.3 s each.
//! Run: `cargo bench -p edgetally-proto --bench verify_rules`.

use ed25519_dalek::{Signer as _, SigningKey};
use std::hint::black_box;
use std::time::{Duration, Instant};

const MESSAGE_BYTES: usize = 9_000;

/// `n` (key, message, signature) triples over `keys` distinct keys.
fn signed(n: usize, keys: usize) -> Vec<([u8; 32], Vec<u8>, [u8; 64])> {
    let signers: Vec<SigningKey> = (0..keys)
        .map(|k| {
            let mut seed = [7u8; 32];
            seed[..8].copy_from_slice(&(k as u64).to_le_bytes());
            SigningKey::from_bytes(&seed)
        })
        .collect();
    (0..n)
        .map(|i| {
            let s = &signers[i % keys];
            let msg: Vec<u8> = (0..MESSAGE_BYTES).map(|j| (i * 31 + j * 7) as u8).collect();
            let sig = s.sign(&msg).to_bytes();
            (s.verifying_key().to_bytes(), msg, sig)
        })
        .collect()
}

/// Microseconds per signature: the median of 7 rounds of `f` over `items` signatures.
fn per_signature(items: usize, mut f: impl FnMut() -> bool) -> f64 {
    let mut rounds: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            let mut n = 0usize;
            while t.elapsed() < Duration::from_millis(300) {
                assert!(black_box(f()), "every signature here is valid");
                n += items;
            }
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[rounds.len() / 2]
}

fn zip215_batch(set: &[([u8; 32], Vec<u8>, [u8; 64])]) -> bool {
    let mut v = ed25519_zebra::batch::Verifier::new();
    for (k, m, s) in set {
        v.queue((
            ed25519_zebra::VerificationKeyBytes::from(*k),
            ed25519_zebra::Signature::from_bytes(s),
            m,
        ));
    }
    v.verify(rand_core::OsRng).is_ok()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo test/bench discovery
    }
    let hash = {
        use sha2::Digest as _;
        let m = vec![0u8; MESSAGE_BYTES];
        per_signature(1, || {
            black_box(sha2::Sha512::digest(black_box(&m))).len() == 64
        })
    };
    println!(
        "{MESSAGE_BYTES}-byte messages; SHA-512 of one (a cost every rule pays): {hash:.1} µs"
    );
    println!("{:<44} {:>8} {:>14}", "rule, mode", "µs/sig", "sigs/s/core");
    let line = |what: &str, us: f64| println!("{what:<44} {us:>8.1} {:>14.0}", 1e6 / us);
    let one = signed(64, 64);
    let mut i = 0;
    line(
        "strict (PROTOCOL §2), one at a time",
        per_signature(1, || {
            i = (i + 1) % one.len();
            let (k, m, s) = &one[i];
            edgetally_proto::verify_signature(k, m, s)
        }),
    );
    line(
        "ZIP 215, one at a time",
        per_signature(1, || {
            i = (i + 1) % one.len();
            let (k, m, s) = &one[i];
            ed25519_zebra::VerificationKey::try_from(*k)
                .and_then(|vk| vk.verify(&ed25519_zebra::Signature::from_bytes(s), m))
                .is_ok()
        }),
    );
    for (n, keys) in [(16, 16), (64, 64), (256, 256), (64, 8), (256, 8)] {
        let set = signed(n, keys);
        line(
            &format!("ZIP 215, batches of {n}, {keys} keys"),
            per_signature(n, || zip215_batch(&set)),
        );
    }
}
