//! Batch envelope: round trips, every rejection reason, signatures, and garbage.

use edgetally_core::{BatchId, Limits, ProducerKey, RejectCode};
use edgetally_proto::{decode, open, peek, verify_many, BatchBuilder, Signer};
use proptest::prelude::*;

const NOW: i64 = 1_700_000_000_000;

fn signer(n: u8) -> Signer {
    Signer::from_seed([n; 32])
}

fn sample(
    s: &Signer,
    seq: u64,
    records: &[(&str, Option<&str>, i64, f64)],
) -> edgetally_core::Batch {
    let mut b = BatchBuilder::new(1000).expect("width");
    for &(c, e, t, v) in records {
        b.record(c, e, t, v).expect("valid record");
    }
    b.finish(
        BatchId {
            producer: s.producer(),
            epoch: 7,
            seq,
        },
        NOW,
    )
}

fn reason(bytes: &[u8]) -> RejectCode {
    match open(bytes, &Limits::default(), NOW) {
        Ok(b) => panic!("accepted: {b:?}"),
        Err(e) => e.code,
    }
}

#[test]
fn round_trip() {
    let s = signer(1);
    let batch = sample(
        &s,
        3,
        &[
            ("cpu", Some("dev-1"), NOW - 10, 0.5),
            ("cpu", None, NOW, 2.0),
            ("cpu", Some("dev-1"), NOW - 10, 1.5),
        ],
    );
    let bytes = s.seal(&batch).expect("seal");
    let got = open(&bytes, &Limits::default(), NOW).expect("open");
    assert_eq!(got, batch);
    assert_eq!(got.summaries.len(), 2);
}

fn tamper(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at] ^= 1;
    b
}

#[test]
fn each_rejection_has_its_reason() {
    let s = signer(2);
    let ok = sample(&s, 0, &[("a", None, NOW, 1.0)]);
    let bytes = s.seal(&ok).expect("seal");
    // Envelope-level faults.
    assert_eq!(reason(&[]), RejectCode::Malformed);
    assert_eq!(reason(&tamper(&bytes, 0)), RejectCode::UnsupportedVersion);
    assert_eq!(reason(&bytes[..bytes.len() - 1]), RejectCode::Malformed);
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(reason(&long), RejectCode::TrailingBytes);
    assert_eq!(
        reason(&tamper(&bytes, bytes.len() - 1)),
        RejectCode::BadSignature
    );
    let small = Limits {
        max_payload_bytes: 10,
        ..Limits::default()
    };
    assert_eq!(
        open(&bytes, &small, NOW).map_err(|e| e.code),
        Err(RejectCode::PayloadTooLarge)
    );

    // Content-level faults, each sealed with a valid signature.
    let seal_with = |f: &dyn Fn(&mut edgetally_core::Batch)| {
        let mut b = ok.clone();
        f(&mut b);
        s.seal(&b).expect("seal")
    };
    type Mutation = Box<dyn Fn(&mut edgetally_core::Batch)>;
    let cases: Vec<(Mutation, RejectCode)> = vec![
        (
            Box::new(|b| b.bucket_ms = 1500),
            RejectCode::InvalidBucketWidth,
        ),
        (
            Box::new(|b| b.summaries[0].summary.count = 0),
            RejectCode::InvalidSummary,
        ),
        (
            Box::new(|b| b.summaries[0].summary.max = f64::INFINITY),
            RejectCode::InvalidValue,
        ),
        (
            Box::new(|b| b.summaries[0].category = 9),
            RejectCode::BadStringIndex,
        ),
        (
            Box::new(|b| {
                b.strings.push("unused");
            }),
            RejectCode::InvalidStringTable,
        ),
        (
            Box::new(|b| b.strings = [""].into_iter().collect()),
            RejectCode::InvalidCategory,
        ),
        (
            Box::new(|b| b.strings = ["a", "a"].into_iter().collect()),
            RejectCode::InvalidStringTable,
        ),
        (
            Box::new(|b| {
                let d = b.summaries[0];
                b.summaries.push(d);
            }),
            RejectCode::DuplicateKey,
        ),
        (
            Box::new(|b| b.summaries[0].bucket = (NOW - 8 * 86_400_000) / 1000),
            RejectCode::BucketTooOld,
        ),
        (
            Box::new(|b| b.summaries[0].bucket = (NOW + 600_000) / 1000),
            RejectCode::FutureTimestamp,
        ),
        (
            Box::new(|b| b.created_ms = NOW + 600_000),
            RejectCode::FutureTimestamp,
        ),
        (
            Box::new(|b| b.summaries[0].bucket = i64::MAX / 2),
            RejectCode::InvalidTimestamp,
        ),
    ];
    for (f, code) in cases {
        assert_eq!(reason(&seal_with(&*f)), code);
    }
    let many = seal_with(&|b| {
        let d = b.summaries[0];
        b.summaries = (0..10_001)
            .map(|i| edgetally_core::BatchSummary {
                bucket: d.bucket - i,
                ..d
            })
            .collect();
    });
    assert_eq!(reason(&many), RejectCode::TooManySummaries);
    let lim = Limits {
        max_categories: 1,
        max_entities: 1,
        ..Limits::default()
    };
    let two_cats = s
        .seal(&sample(
            &s,
            0,
            &[("a", None, NOW, 1.0), ("b", None, NOW, 1.0)],
        ))
        .expect("seal");
    assert_eq!(
        open(&two_cats, &lim, NOW).map_err(|e| e.code),
        Err(RejectCode::TooManyCategories)
    );
    let two_ents = s
        .seal(&sample(
            &s,
            0,
            &[("a", Some("x"), NOW, 1.0), ("a", Some("y"), NOW, 1.0)],
        ))
        .expect("seal");
    assert_eq!(
        open(&two_ents, &lim, NOW).map_err(|e| e.code),
        Err(RejectCode::TooManyEntities)
    );
}

#[test]
fn another_producers_batch_cannot_be_sealed_or_forged() {
    let (a, b) = (signer(3), signer(4));
    let batch = sample(&a, 0, &[("x", None, NOW, 1.0)]);
    assert!(b.seal(&batch).is_err());
    // Forge: b signs a payload naming a's key by swapping the key in after signing.
    let mut forged_batch = batch.clone();
    forged_batch.id.producer = b.producer();
    let mut forged = b.seal(&forged_batch).expect("seal");
    forged[2..34].copy_from_slice(&a.producer().0);
    assert_eq!(reason(&forged), RejectCode::BadSignature);
    // A key that is not on the curve, or of small order.
    let mut weak = forged.clone();
    weak[2..34].copy_from_slice(&[0u8; 32]);
    weak[2] = 1; // the identity point: small order
    assert_eq!(reason(&weak), RejectCode::BadSignature);
}

#[test]
fn verify_many_finds_the_bad_ones() {
    let s = signer(5);
    let mut items = Vec::new();
    let mut expect = Vec::new();
    for seq in 0..37u64 {
        let bytes = s
            .seal(&sample(&s, seq, &[("c", None, NOW, seq as f64)]))
            .expect("seal");
        let bad = seq % 7 == 3;
        let bytes = if bad {
            tamper(&bytes, bytes.len() - 5)
        } else {
            bytes
        };
        items.push(decode(&bytes, &Limits::default()).expect("decode"));
        expect.push(!bad);
    }
    let got: Vec<bool> = verify_many(items).iter().map(Result::is_ok).collect();
    assert_eq!(got, expect);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_valid_batch_round_trips(recs in proptest::collection::vec(
        (0u8..4, proptest::option::of(0u8..5), -100_000i64..100_000, -1e6f64..1e6), 1..40),
        epoch: u64, seq in 0u64..u64::MAX) {
        let s = signer(6);
        let mut b = BatchBuilder::new(1000).expect("width");
        let cats = ["cpu", "mem", "é", "a/b"];
        let ents = ["d1", "d2", "user 3", "x", "日本"];
        for (c, e, t, v) in recs {
            b.record(cats[c as usize], e.map(|e| ents[e as usize]), NOW + t, v).expect("valid");
        }
        let batch = b.finish(BatchId { producer: s.producer(), epoch, seq }, NOW);
        let bytes = s.seal(&batch).expect("seal");
        // What routing reads without decoding the rest is what the full decode finds.
        prop_assert_eq!(peek(&bytes, &Limits::default()), Some((batch.id, batch.created_ms)));
        prop_assert_eq!(open(&bytes, &Limits::default(), NOW).expect("open"), batch);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = open(&bytes, &Limits::default(), NOW);
        let _ = peek(&bytes, &Limits::default());
        let mut v = vec![1u8];
        v.extend_from_slice(&bytes);
        let _ = open(&v, &Limits::default(), NOW);
    }

    #[test]
    fn mutated_valid_batches_never_panic(at in 0usize..200, xor in 1u8..=255) {
        let s = signer(7);
        let bytes = s.seal(&sample(&s, 1, &[("a", Some("e"), NOW, 1.0), ("b", None, NOW - 5000, -3.25)])).expect("seal");
        let mut m = bytes.clone();
        let i = at % m.len();
        m[i] ^= xor;
        prop_assert!(open(&m, &Limits::default(), NOW).is_err());
    }
}

#[test]
fn producer_key_in_payload_is_the_signer() {
    let s = signer(8);
    let bytes = s
        .seal(&sample(&s, 0, &[("a", None, NOW, 1.0)]))
        .expect("seal");
    assert_eq!(
        ProducerKey(bytes[2..34].try_into().expect("32")),
        s.producer()
    );
}
