//! The signature rule (docs/PROTOCOL.md §2) on hostile signatures built with curve25519-dalek:
//! torsion in R or A, small-order A, non-canonical R and A encodings, S ≥ L, random bytes.
//! Each verdict is a pure function of the bytes: the same alone and inside any group of other
//! batches (valid or not), and the same in the wasm build (`cargo xtask wasm-check` runs these
//! vectors through the wasm module and compares).

use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT as B, EIGHT_TORSION};
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use edgetally_core::{BatchId, Limits, ProducerKey};
use edgetally_proto::{
    decode, encode_payload, verify_many, verify_signature, BatchBuilder, DOMAIN,
};
use edgetally_tests::Rng;
use sha2::{Digest, Sha512};

/// L, the order of the prime subgroup, little-endian.
const L: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

fn h(parts: &[&[u8]]) -> Scalar {
    let mut d = Sha512::new();
    for p in parts {
        d.update(p);
    }
    Scalar::from_hash(d)
}

/// A secret scalar and the public point it makes.
fn keypair(n: u64) -> (Scalar, EdwardsPoint) {
    let a = h(&[b"vector key", &n.to_le_bytes()]);
    (a, a * B)
}

/// Signs `m` as RFC 8032 does, but with `R` and `A` as given for the hash and `r`, `a` for S.
fn sign_with(r: Scalar, r_bytes: [u8; 32], a: Scalar, a_bytes: [u8; 32], m: &[u8]) -> [u8; 64] {
    let k = h(&[&r_bytes, &a_bytes, m]);
    let s = r + k * a;
    let mut sig = [0u8; 64];
    sig[..32].copy_from_slice(&r_bytes);
    sig[32..].copy_from_slice(s.as_bytes());
    sig
}

/// The non-canonical encoding (y + p) of a point with a small y that decodes, if any.
fn non_canonical_point() -> [u8; 32] {
    for y in 2u8..19 {
        let mut b = [0xffu8; 32];
        b[31] = 0x7f;
        b[0] = 0xed + y; // p + y, for y ≤ 18
        if CompressedEdwardsY(b).decompress().is_some() {
            return b;
        }
    }
    panic!("no small y decodes");
}

fn add_l(s: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut carry = 0u16;
    for i in 0..32 {
        let t = s[i] as u16 + L[i] as u16 + carry;
        out[i] = t as u8;
        carry = t >> 8;
    }
    out
}

/// (name, key, message, signature, verdict).
pub type Vector = (&'static str, [u8; 32], Vec<u8>, [u8; 64], bool);

/// The vectors of docs/PROTOCOL.md §2.
pub fn vectors() -> Vec<Vector> {
    let mut out = Vec::new();
    let m = |tag: &str| [DOMAIN, tag.as_bytes()].concat();
    let (a, pa) = keypair(1);
    let ab = pa.compress().to_bytes();
    let r = h(&[b"nonce", b"1"]);
    let rb = (r * B).compress().to_bytes();
    // A valid signature.
    out.push((
        "valid",
        ab,
        m("valid"),
        sign_with(r, rb, a, ab, &m("valid")),
        true,
    ));
    // Torsion in R: R + T8, S recomputed for the new challenge (cofactored rules accept it).
    let rt = (r * B + EIGHT_TORSION[1]).compress().to_bytes();
    out.push((
        "torsion-r",
        ab,
        m("torsion-r"),
        sign_with(r, rt, a, ab, &m("torsion-r")),
        false,
    ));
    // Torsion in A: A + T8 signed with a; valid here only when 8 divides the challenge k.
    let at = (pa + EIGHT_TORSION[1]).compress().to_bytes();
    let mut found = [false, false];
    for i in 0u32.. {
        let msg = m(&format!("torsion-a-{i}"));
        let k = h(&[&rb, &at, &msg]);
        let eight = k.as_bytes()[0].is_multiple_of(8);
        if found[eight as usize] {
            continue;
        }
        found[eight as usize] = true;
        let name = if eight {
            "torsion-a-k-mult-8"
        } else {
            "torsion-a"
        };
        out.push((name, at, msg.clone(), sign_with(r, rb, a, at, &msg), eight));
        if found == [true, true] {
            break;
        }
    }
    // Small-order A: a point of order 8, and the identity.
    for (name, p) in [
        ("small-order-a", EIGHT_TORSION[1]),
        ("identity-a", EIGHT_TORSION[0]),
    ] {
        let pb = p.compress().to_bytes();
        let msg = m(name);
        out.push((
            name,
            pb,
            msg.clone(),
            sign_with(r, rb, Scalar::ZERO, pb, &msg),
            false,
        ));
    }
    // Non-canonical encodings of R and of A.
    let nc = non_canonical_point();
    let msg = m("non-canonical-r");
    out.push((
        "non-canonical-r",
        ab,
        msg.clone(),
        sign_with(r, nc, a, ab, &msg),
        false,
    ));
    let msg = m("non-canonical-a");
    out.push((
        "non-canonical-a",
        nc,
        msg.clone(),
        sign_with(r, rb, a, nc, &msg),
        false,
    ));
    // S + L: the same equation, a non-canonical S.
    let msg = m("s-plus-l");
    let mut sig = sign_with(r, rb, a, ab, &msg);
    let s2 = add_l(&sig[32..]);
    sig[32..].copy_from_slice(&s2);
    out.push(("s-plus-l", ab, msg, sig, false));
    out
}

/// ed25519-dalek's `verify_strict` plus the canonical-key check: the rule as the crate states
/// it, which our verifier (which skips decompressing R) must equal on every input.
fn reference(key: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
    let canonical = CompressedEdwardsY(*key)
        .decompress()
        .is_some_and(|p| p.compress().to_bytes() == *key);
    canonical
        && ed25519_dalek::VerifyingKey::from_bytes(key).is_ok_and(|vk| {
            !vk.is_weak()
                && vk
                    .verify_strict(msg, &ed25519_dalek::Signature::from_bytes(sig))
                    .is_ok()
        })
}

#[test]
fn hostile_signatures_get_the_documented_verdicts() {
    for (name, key, msg, sig, want) in vectors() {
        assert_eq!(verify_signature(&key, &msg, &sig), want, "{name}");
        assert_eq!(reference(&key, &msg, &sig), want, "{name} (reference)");
        // The same signature without its tweak would also differ: the vectors test what they say.
    }
    let names: Vec<&str> = vectors().iter().map(|v| v.0).collect();
    for n in [
        "torsion-r",
        "torsion-a",
        "torsion-a-k-mult-8",
        "small-order-a",
        "non-canonical-r",
        "non-canonical-a",
        "s-plus-l",
    ] {
        assert!(names.contains(&n), "{n}");
    }
}

/// A whole batch signed under a hostile rule: key `kind` picks the tweak. Returns the
/// envelope and its verdict under the rule (checked against an independent reference). Its
/// one event: category "sig", no entity, value 1 at 1 700 000 000 000 ms.
pub(crate) fn hostile_batch(rng: &mut Rng, i: u64) -> (Vec<u8>, bool) {
    hostile_batch_at(rng, i, 1_700_000_000_000)
}

/// [`hostile_batch`] with its event (and creation time) at `ts` ms.
pub(crate) fn hostile_batch_at(rng: &mut Rng, i: u64, ts: i64) -> (Vec<u8>, bool) {
    let (a, pa) = keypair(100 + i);
    let kind = rng.below(7);
    let tors = EIGHT_TORSION[1 + rng.below(7) as usize];
    let key = match kind {
        2 => pa + tors,
        3 => tors,
        _ => pa,
    };
    let key_bytes = match kind {
        5 => non_canonical_point(),
        _ => key.compress().to_bytes(),
    };
    let mut b = BatchBuilder::new(1000).expect("width");
    b.record("sig", None, ts, 1.0).expect("record");
    let id = BatchId {
        producer: ProducerKey(key_bytes),
        epoch: 1,
        seq: i,
    };
    let payload = encode_payload(&b.finish(id, ts)).expect("payload");
    let msg = [DOMAIN, &payload].concat();
    let r = h(&[b"batch nonce", &i.to_le_bytes()]);
    let mut rb = (r * B).compress().to_bytes();
    if kind == 1 {
        rb = (r * B + tors).compress().to_bytes();
    }
    if kind == 4 {
        rb = non_canonical_point();
    }
    let mut sig = sign_with(
        r,
        rb,
        if kind == 3 { Scalar::ZERO } else { a },
        key_bytes,
        &msg,
    );
    if kind == 6 {
        if rng.chance(0.5) {
            let s2 = add_l(&sig[32..]);
            sig[32..].copy_from_slice(&s2);
        } else {
            for x in sig.iter_mut() {
                *x = rng.next_u64() as u8;
            }
        }
    }
    let mut env = vec![1u8];
    let mut n = payload.len();
    while n >= 0x80 {
        env.push((n as u8) | 0x80);
        n >>= 7;
    }
    env.push(n as u8);
    env.extend_from_slice(&payload);
    env.extend_from_slice(&sig);
    let verdict = verify_signature(&key_bytes, &msg, &sig);
    assert_eq!(verdict, reference(&key_bytes, &msg, &sig), "kind {kind}");
    (env, verdict)
}

#[test]
fn a_verdict_is_the_same_alone_and_in_any_group() {
    let limits = Limits::default();
    for seed in 0..6u64 {
        let mut rng = Rng::new(seed);
        let batches: Vec<(Vec<u8>, bool)> = (0..96)
            .map(|i| hostile_batch(&mut rng, seed * 1000 + i))
            .collect();
        let valid = batches.iter().filter(|b| b.1).count();
        assert!(
            valid > 0 && valid < batches.len(),
            "seed {seed}: a mix of verdicts ({valid})"
        );
        // Alone.
        for (i, (env, want)) in batches.iter().enumerate() {
            let alone = decode(env, &limits)
                .map(|u| u.verify().is_ok())
                .unwrap_or(false);
            assert_eq!(alone, *want, "seed {seed} batch {i} alone");
        }
        // In random groups, shuffled, of random sizes.
        for _ in 0..8 {
            let mut order: Vec<usize> = (0..batches.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut at = 0;
            while at < order.len() {
                let n = 1 + rng.below(40) as usize;
                let group: Vec<usize> = order[at..(at + n).min(order.len())].to_vec();
                at += n;
                let items: Vec<_> = group
                    .iter()
                    .filter_map(|&i| decode(&batches[i].0, &limits).ok().map(|u| (i, u)))
                    .collect();
                let (idx, us): (Vec<usize>, Vec<_>) = items.into_iter().unzip();
                for (i, r) in idx.into_iter().zip(verify_many(us)) {
                    assert_eq!(r.is_ok(), batches[i].1, "seed {seed} batch {i} in a group");
                }
            }
        }
    }
}

/// Writes the vectors for the wasm comparison (`key ‖ signature ‖ message` per file, the
/// verdict in the name) — `cargo xtask wasm-check` calls this through `EDGETALLY_WRITE_SIG_VECTORS`.
#[test]
fn write_vectors_for_the_wasm_check() {
    let Ok(dir) = std::env::var("EDGETALLY_WRITE_SIG_VECTORS") else {
        return;
    };
    std::fs::create_dir_all(&dir).expect("mkdir");
    for (name, key, msg, sig, want) in vectors() {
        let bytes = [&key[..], &sig[..], &msg].concat();
        std::fs::write(format!("{dir}/{name}.{}", u8::from(want)), bytes).expect("write");
    }
    // The sketches (issue 30): a corpus of values at the edges of the quantile sketch's
    // buckets and range (subnormals, ±0, 1e15 and just past it, bucket boundaries γ^i and
    // their neighbours, random magnitudes) and 20,000 subjects (a dense distinct-count
    // sketch), with the native build's bytes for them; the wasm build must give the same.
    use edgetally_sketch::{subject_hash, Hll, Quantiles};
    let mut corpus = Vec::new();
    let mut q = Quantiles::new(100).expect("accuracy");
    let mut hll = Hll::new(14).expect("precision");
    let gamma: f64 = 1.01 / 0.99;
    let mut values = vec![
        0.0,
        -0.0,
        f64::MIN_POSITIVE / 8.0,
        1e-9,
        1e15,
        1.000_000_1e15,
        -1e15,
    ];
    for i in -1000..=1000 {
        let edge = gamma.powi(i);
        values.extend([
            edge,
            f64::from_bits(edge.to_bits() + 1),
            f64::from_bits(edge.to_bits() - 1),
            -edge,
        ]);
    }
    let mut rng = Rng::new(30);
    for _ in 0..5000 {
        let e = rng.below(48) as i32 - 24;
        values.push(10f64.powi(e) * (rng.below(1_000_000) as f64 + 0.5) / 1e6);
    }
    for v in values {
        corpus.push(0);
        corpus.extend_from_slice(&v.to_le_bytes());
        q.insert(v, 1);
    }
    for i in 0..20_000 {
        let s = format!("subject-{i}-{}", rng.below(1 << 30));
        corpus.push(1);
        corpus.extend_from_slice(&(s.len() as u16).to_le_bytes());
        corpus.extend_from_slice(s.as_bytes());
        hll.insert_hash(subject_hash(&s, None));
    }
    let mut expected = Vec::new();
    for part in [hll.encode(), q.encode()] {
        expected.extend_from_slice(&(part.len() as u32).to_le_bytes());
        expected.extend_from_slice(&part);
    }
    std::fs::write(format!("{dir}/sketch-corpus"), corpus).expect("write");
    std::fs::write(format!("{dir}/sketch-expected"), expected).expect("write");
    // The v2 vector of docs/PROTOCOL.md §10.1: the wasm build decodes, verifies and applies it.
    for (name, signer, batch) in super::fixtures::fixtures_v2() {
        let bytes = signer.seal(&batch).expect("seal");
        std::fs::write(format!("{dir}/batch-{name}"), bytes).expect("write");
    }
}
