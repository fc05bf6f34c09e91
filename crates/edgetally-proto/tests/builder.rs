//! `BatchBuilder` against a model: whatever the order of the records, the finished batch is
//! the canonical one a plain ordered grouping gives (strings sorted and unique, one summary
//! per (category, entity, bucket) in index order, each the fold of its records), and the
//! distinct category and entity counts are those of the records taken.

use edgetally_core::sketches::subject_hash;
use edgetally_core::{Batch, BatchId, BatchSummary, ProducerKey, Sketches, Summary, NO_ENTITY};
use edgetally_proto::{BatchBuilder, SketchOpts};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

/// Names used as categories and as entities alike, so one string can be both.
const NAMES: [&str; 6] = ["a", "ab", "b", "page", "é", "Z"];

/// (category, entity, ts_ms, value in milli-units, subject, quantiles).
type Rec = (usize, Option<usize>, i64, i32, Option<u8>, bool);

fn opts(subject: Option<u8>, quantiles: bool) -> SketchOpts {
    SketchOpts {
        subject: subject.map(|s| (subject_hash(&format!("u{s}"), None), 12)),
        quantiles,
    }
}

/// The batch a plain ordered grouping of `recs` gives, and its distinct categories and
/// entities.
fn model(recs: &[Rec], bucket_ms: i64) -> (Batch, usize, usize) {
    type Key = (String, Option<String>, i64);
    let mut groups: BTreeMap<Key, (Summary, Sketches)> = BTreeMap::new();
    let (mut cats, mut ents) = (BTreeSet::new(), BTreeSet::new());
    for &(c, e, ts, v, subj, q) in recs {
        let s = Summary::of(f64::from(v) / 1000.0).expect("value");
        let key = (
            NAMES[c].to_string(),
            e.map(|e| NAMES[e].to_string()),
            ts.div_euclid(bucket_ms),
        );
        let g = groups.entry(key).or_insert((
            Summary {
                count: 0,
                sum: 0,
                min: f64::INFINITY,
                max: f64::NEG_INFINITY,
            },
            Sketches::default(),
        ));
        g.0.count += 1;
        g.0.sum += s.sum;
        g.0.min = g.0.min.min(s.min);
        g.0.max = g.0.max.max(s.max);
        let o = opts(subj, q);
        if let Some((h, p)) = o.subject {
            g.1.insert_subject(h, p);
        }
        if q {
            g.1.insert_value(s.min, 1);
        }
        cats.insert(NAMES[c]);
        if let Some(e) = e {
            ents.insert(NAMES[e]);
        }
    }
    let strings: Vec<&str> = cats
        .union(&ents)
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let index = |s: &str| strings.iter().position(|x| *x == s).expect("interned") as u32;
    let mut rows: Vec<(BatchSummary, Sketches)> = groups
        .into_iter()
        .map(|((c, e, bucket), (summary, sk))| {
            let s = BatchSummary {
                category: index(&c),
                entity: e.map_or(NO_ENTITY, |e| index(&e) + 1),
                bucket,
                summary,
            };
            (s, sk)
        })
        .collect();
    rows.sort_by_key(|(s, _)| (s.category, s.entity, s.bucket));
    let mut table = edgetally_core::StringTable::new();
    for s in &strings {
        table.push(s);
    }
    let batch = Batch {
        id: id(),
        created_ms: 7,
        bucket_ms: bucket_ms as u32,
        strings: table,
        sketches: rows
            .iter()
            .enumerate()
            .filter(|(_, (_, k))| !k.is_empty())
            .map(|(i, (_, k))| (i as u32, k.clone()))
            .collect(),
        summaries: rows.into_iter().map(|(s, _)| s).collect(),
    };
    (batch, cats.len(), ents.len())
}

fn id() -> BatchId {
    BatchId {
        producer: ProducerKey([3; 32]),
        epoch: 1,
        seq: 9,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_builder_gives_the_canonical_grouping(
        recs in proptest::collection::vec(
            (
                0..NAMES.len(),
                proptest::option::of(0..NAMES.len()),
                -5_000i64..5_000,
                -100_000i32..100_000,
                proptest::option::of(0u8..20),
                any::<bool>(),
            ),
            0..200,
        ),
        bucket_ms in prop_oneof![Just(1000u32), Just(60_000u32)],
    ) {
        let mut b = BatchBuilder::new(bucket_ms).expect("width");
        for &(c, e, ts, v, subj, q) in &recs {
            b.record_with(NAMES[c], e.map(|e| NAMES[e]), ts, f64::from(v) / 1000.0, opts(subj, q))
                .expect("valid record");
        }
        let (want, cats, ents) = model(&recs, i64::from(bucket_ms));
        prop_assert_eq!(b.categories(), cats);
        prop_assert_eq!(b.entities(), ents);
        prop_assert_eq!(b.len(), want.summaries.len());
        let got = b.finish(id(), 7);
        prop_assert_eq!(got.strings.iter().collect::<Vec<_>>(), want.strings.iter().collect::<Vec<_>>());
        prop_assert_eq!(got, want);
    }
}

/// A refused record adds nothing: no summary, no string, no count.
#[test]
fn a_refused_record_leaves_no_trace() {
    let mut b = BatchBuilder::new(1000).expect("width");
    b.record("page", Some("home"), 1_000, 1.0).expect("valid");
    assert!(b.record("other", Some("x"), 1_000, f64::NAN).is_err());
    assert!(b.record("other", Some("\u{1}"), 1_000, 1.0).is_err());
    assert_eq!((b.len(), b.categories(), b.entities()), (1, 1, 1));
    let batch = b.finish(id(), 0);
    assert_eq!(batch.strings.iter().collect::<Vec<_>>(), ["home", "page"]);
}
