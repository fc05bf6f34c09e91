//! Frozen v1 and v2 wire fixtures: files written once by this build's encoder and committed.
//! They must keep decoding to the batches spelled out here, and re-encoding must reproduce them
//! byte for byte. To write them anew (only when adding a fixture):
//! `EDGETALLY_BLESS=1 cargo test fixtures`.

use edgetally_core::{Batch, BatchId, BatchSummary, Limits, Summary, NO_ENTITY};
use edgetally_proto::{decode, Signer};

pub(crate) fn fixtures() -> Vec<(&'static str, Signer, Batch)> {
    let s1 = Signer::from_seed([1; 32]);
    let s2 = Signer::from_seed([2; 32]);
    let minimal = Batch {
        id: BatchId {
            producer: s1.producer(),
            epoch: 1,
            seq: 0,
        },
        created_ms: 1_700_000_000_000,
        bucket_ms: 1000,
        strings: ["cpu"].into_iter().collect(),
        summaries: vec![BatchSummary {
            category: 0,
            entity: NO_ENTITY,
            bucket: 1_700_000_000,
            summary: Summary {
                count: 1,
                sum: 1_500_000_000,
                min: 1.5,
                max: 1.5,
            },
        }],
        sketches: Vec::new(),
    };
    let entities = Batch {
        id: BatchId {
            producer: s2.producer(),
            epoch: 0x0123_4567_89ab_cdef,
            seq: 300,
        },
        created_ms: 1_700_000_005_123,
        bucket_ms: 1000,
        strings: ["page_view", "user-7", "ü-8"].into_iter().collect(),
        summaries: vec![
            BatchSummary {
                category: 0,
                entity: 2,
                bucket: 1_700_000_004,
                summary: Summary {
                    count: 3,
                    sum: 3_000_000_000,
                    min: 1.0,
                    max: 1.0,
                },
            },
            BatchSummary {
                category: 0,
                entity: 3,
                bucket: 1_700_000_005,
                summary: Summary {
                    count: 2,
                    sum: -250_000_000,
                    min: -0.5,
                    max: 0.25,
                },
            },
            BatchSummary {
                category: 0,
                entity: NO_ENTITY,
                bucket: 1_699_999_990,
                summary: Summary {
                    count: 1,
                    sum: 0,
                    min: 0.0,
                    max: 0.0,
                },
            },
        ],
        sketches: Vec::new(),
    };
    let wide = Batch {
        id: BatchId {
            producer: s1.producer(),
            epoch: u64::MAX - 1,
            seq: 1 << 40,
        },
        created_ms: -5,
        bucket_ms: 60_000,
        strings: ["temp", "dev/1"].into_iter().collect(),
        summaries: vec![BatchSummary {
            category: 0,
            entity: 2,
            bucket: -1,
            summary: Summary {
                count: 1_000_000,
                sum: 21_337_000_000_000_000,
                min: -40.0,
                max: 1e6,
            },
        }],
        sketches: Vec::new(),
    };
    vec![
        ("minimal", s1.clone(), minimal),
        ("entities", s2, entities),
        ("wide", s1, wide),
    ]
}

/// Batch format v2 (docs/PROTOCOL.md §10): seed 32 × 01, epoch 1, seq 1, created at
/// 1,700,000,000,000 ms; `latency` (entity `home`) keeps quantiles and gets subjects —
/// `user-1` with 1.5 twice, `user-2` with 12 — and `cpu` = 1 has no sketch. Built from the
/// records by the builder, so the sketches are the SDK's.
pub(crate) fn fixtures_v2() -> Vec<(&'static str, Signer, Batch)> {
    use edgetally_core::sketches::subject_hash;
    use edgetally_proto::{BatchBuilder, SketchOpts};
    let s1 = Signer::from_seed([1; 32]);
    let at = 1_700_000_000_000;
    let mut b = BatchBuilder::new(1000).expect("width");
    for (v, who) in [(1.5, "user-1"), (12.0, "user-2"), (1.5, "user-1")] {
        let opts = SketchOpts {
            subject: Some((subject_hash(who, None), 14)),
            quantiles: true,
        };
        b.record_with("latency", Some("home"), at, v, opts)
            .expect("record");
    }
    b.record("cpu", None, at, 1.0).expect("record");
    let id = BatchId {
        producer: s1.producer(),
        epoch: 1,
        seq: 1,
    };
    vec![("sketch", s1, b.finish(id, at))]
}

#[test]
fn v1_and_v2_fixtures_still_decode_and_reencode() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let bless = std::env::var("EDGETALLY_BLESS").is_ok();
    let v1 = fixtures().into_iter().map(|f| ("v1", f));
    let v2 = fixtures_v2().into_iter().map(|f| ("v2", f));
    for (version, (name, signer, batch)) in v1.chain(v2) {
        let dir = root.join(version);
        let path = dir.join(format!("{name}.bin"));
        let sealed = signer.seal(&batch).expect("seal");
        assert_eq!(
            sealed[0].to_string(),
            version[1..],
            "{name}: sealed as {version}"
        );
        if bless {
            std::fs::create_dir_all(&dir).expect("fixture dir");
            std::fs::write(&path, &sealed).expect("write fixture");
        }
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let got = decode(&bytes, &Limits::default())
            .and_then(|u| u.verify())
            .expect(name);
        assert_eq!(got, batch, "{name}");
        assert_eq!(sealed, bytes, "{name}: encoder output changed");
    }
}
