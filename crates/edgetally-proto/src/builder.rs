//! Aggregating records into a batch: the producer-side fold that turns events into one
//! summary per (category, entity, bucket).

use edgetally_core::record::{
    bucket_index, validate_bucket_ms, validate_category, validate_entity,
};
use edgetally_core::{
    Batch, BatchId, BatchSummary, RejectCode, Sketches, StringTable, Summary, NO_ENTITY,
};
use foldhash::fast::RandomState;
use std::collections::HashMap;

/// Folds records into summaries and interns their strings.
///
/// Hash maps, not ordered ones: a record costs two string lookups and one key lookup, none of
/// them a walk of string comparisons (the merger folds `POST /v1/events` bodies with it, a
/// million events a second). The batch is put in canonical order once, by [`Self::finish`].
/// The hasher is foldhash, seeded afresh for every builder (its global seed is random per
/// process): categories, entities and times come from clients, who must not be able to
/// choose colliding keys, and std's SipHash cost the fold 6 % of the merger's CPU.
#[derive(Clone, Debug)]
pub struct BatchBuilder {
    bucket_ms: u32,
    /// The interned strings' bytes, together.
    string_bytes: usize,
    /// Per string: [`CATEGORY`] and [`ENTITY`] bits, set once a record used it so.
    roles: Vec<u8>,
    categories: usize,
    entities: usize,
    string_ids: HashMap<String, u32, RandomState>,
    summaries: HashMap<(u32, u32, i64), (Summary, Sketches), RandomState>,
}

const CATEGORY: u8 = 1;
const ENTITY: u8 = 2;

/// What a record adds to its summary's sketches (batch format v2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SketchOpts {
    /// The subject's hash ([`edgetally_core::sketches::subject_hash`]) and the precision of
    /// the HyperLogLog it goes into.
    pub subject: Option<(u64, u8)>,
    /// Whether the value goes into the summary's quantile sketch.
    pub quantiles: bool,
}

impl BatchBuilder {
    /// A builder for buckets of `bucket_ms`.
    pub fn new(bucket_ms: u32) -> Result<BatchBuilder, RejectCode> {
        validate_bucket_ms(bucket_ms)?;
        Ok(BatchBuilder {
            bucket_ms,
            string_bytes: 0,
            roles: Vec::new(),
            categories: 0,
            entities: 0,
            string_ids: HashMap::default(),
            summaries: HashMap::default(),
        })
    }

    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.string_ids.get(s) {
            return i;
        }
        let i = self.roles.len() as u32;
        self.string_bytes += s.len();
        self.roles.push(0);
        self.string_ids.insert(s.to_owned(), i);
        i
    }

    /// Marks string `i` as used in `role`, counting it the first time.
    fn used_as(&mut self, i: u32, role: u8) {
        let r = &mut self.roles[i as usize];
        if *r & role == 0 {
            *r |= role;
            match role {
                CATEGORY => self.categories += 1,
                _ => self.entities += 1,
            }
        }
    }

    /// Adds one record; an invalid one changes nothing and returns its reason.
    pub fn record(
        &mut self,
        category: &str,
        entity: Option<&str>,
        ts_ms: i64,
        value: f64,
    ) -> Result<(), RejectCode> {
        self.record_with(category, entity, ts_ms, value, SketchOpts::default())
    }

    /// Adds one record and, as `opts` says, its subject and value to the summary's sketches.
    pub fn record_with(
        &mut self,
        category: &str,
        entity: Option<&str>,
        ts_ms: i64,
        value: f64,
        opts: SketchOpts,
    ) -> Result<(), RejectCode> {
        validate_category(category)?;
        if let Some(e) = entity {
            validate_entity(e)?;
        }
        let bucket = bucket_index(ts_ms, self.bucket_ms)?;
        let s = Summary::of(value)?;
        let cat = self.intern(category);
        let ent = entity.map_or(NO_ENTITY, |e| self.intern(e) + 1);
        let sketches = match self.summaries.entry((cat, ent, bucket)) {
            std::collections::hash_map::Entry::Vacant(v) => {
                &mut v.insert((s, Sketches::default())).1
            }
            std::collections::hash_map::Entry::Occupied(o) => {
                let e = o.into_mut();
                e.0.merge(&s)?;
                &mut e.1
            }
        };
        if let Some((hash, precision)) = opts.subject {
            sketches.insert_subject(hash, precision);
        }
        if opts.quantiles {
            sketches.insert_value(s.min, 1);
        }
        self.used_as(cat, CATEGORY);
        if ent != NO_ENTITY {
            self.used_as(ent - 1, ENTITY);
        }
        Ok(())
    }

    /// Distinct categories of the records taken so far.
    pub fn categories(&self) -> usize {
        self.categories
    }

    /// Distinct entities of the records taken so far.
    pub fn entities(&self) -> usize {
        self.entities
    }

    /// Number of distinct keys so far.
    pub fn len(&self) -> usize {
        self.summaries.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.summaries.is_empty()
    }

    /// Ends the batch under `id`, in canonical form: strings sorted, summaries in key order
    /// (which lets receivers check uniqueness in one pass).
    pub fn finish(self, id: BatchId, created_ms: i64) -> Batch {
        // The strings in sorted order, and the new index of each old one.
        let mut sorted: Vec<(&str, u32)> = self
            .string_ids
            .iter()
            .map(|(s, &i)| (s.as_str(), i))
            .collect();
        sorted.sort_unstable();
        let mut remap = vec![0u32; sorted.len()];
        let mut strings = StringTable::with_capacity(sorted.len(), self.string_bytes);
        for (new, &(s, old)) in sorted.iter().enumerate() {
            remap[old as usize] = new as u32;
            strings.push(s);
        }
        let mut keyed: Vec<(BatchSummary, Sketches)> = self
            .summaries
            .into_iter()
            .map(|((category, entity, bucket), (summary, sketches))| {
                let s = BatchSummary {
                    category: remap[category as usize],
                    entity: if entity == NO_ENTITY {
                        NO_ENTITY
                    } else {
                        remap[entity as usize - 1] + 1
                    },
                    bucket,
                    summary,
                };
                (s, sketches)
            })
            .collect();
        keyed.sort_unstable_by_key(|(s, _)| (s.category, s.entity, s.bucket));
        let mut sketches = Vec::new();
        let mut summaries = Vec::with_capacity(keyed.len());
        for (i, (s, k)) in keyed.into_iter().enumerate() {
            if !k.is_empty() {
                sketches.push((i as u32, k));
            }
            summaries.push(s);
        }
        Batch {
            id,
            created_ms,
            bucket_ms: self.bucket_ms,
            strings,
            summaries,
            sketches,
        }
    }
}
