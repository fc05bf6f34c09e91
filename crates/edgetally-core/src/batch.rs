//! The content of a batch, independent of its encoding (which lives in `edgetally-proto`).

use crate::code::RejectCode;
use crate::record::{bucket_start, has_control, name_len_ok, validate_bucket_ms};
use crate::sketches::Sketches;
use crate::strings::StringTable;
use crate::summary::Summary;
use core::fmt;
use serde::{Deserialize, Serialize};

/// A producer's ed25519 public key, 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProducerKey(pub [u8; 32]);

impl fmt::Debug for ProducerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProducerKey({})", self.to_hex())
    }
}

impl ProducerKey {
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

/// Lower-case hex, without `core::fmt` (the browser SDK's wasm module then carries no
/// formatting machinery for it).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[(b >> 4) as usize], DIGITS[(b & 15) as usize]])
        .map(char::from)
        .collect()
}

/// Identifies a batch: a merger applies each at most once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BatchId {
    /// The producer's key.
    pub producer: ProducerKey,
    /// Fresh for each producer instance without durable state.
    pub epoch: u64,
    /// +1 per batch within an epoch, from 0.
    pub seq: u64,
}

/// Entity reference inside a batch: 0 is "no entity", `i + 1` is string `i`.
pub const NO_ENTITY: u32 = 0;

/// One summary of a batch, with its key as indices into the batch's string table.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchSummary {
    /// Index of the category in the string table.
    pub category: u32,
    /// [`NO_ENTITY`] or index + 1 of the entity in the string table.
    pub entity: u32,
    /// Bucket index: the bucket starts at `bucket × bucket_ms`.
    pub bucket: i64,
    /// The aggregate.
    pub summary: Summary,
}

/// A decoded, verified batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Who sent it and where it stands in their sequence.
    pub id: BatchId,
    /// When the producer sealed it (ms since the epoch, producer's clock).
    pub created_ms: i64,
    /// The bucket width of every summary in it.
    pub bucket_ms: u32,
    /// Interned categories and entities.
    pub strings: StringTable,
    /// The summaries.
    pub summaries: Vec<BatchSummary>,
    /// Sketches of some summaries (batch format v2): (index into `summaries`, its sketches),
    /// strictly ascending by index. Empty in a v1 batch.
    pub sketches: Vec<(u32, Sketches)>,
}

/// Limits a batch must respect (SPEC §3). The time-based ones need the receiver's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Encoded batch size, bytes.
    pub max_payload_bytes: usize,
    /// Summaries per batch.
    pub max_summaries: usize,
    /// Distinct categories per batch.
    pub max_categories: usize,
    /// Distinct entities per batch.
    pub max_entities: usize,
    /// How far behind `now` a bucket may end.
    pub max_lateness_ms: i64,
    /// How far ahead of `now` a bucket may start.
    pub max_future_skew_ms: i64,
}

impl Limits {
    /// The clock-dependent rule for one bucket `[start_ms, start_ms + bucket_ms)` at the
    /// receiver's `now_ms`: it may not start after `now + max_future_skew` nor end before
    /// `now - max_lateness`. Producers apply it when they record, mergers when they accept.
    pub fn check_bucket_time(
        &self,
        start_ms: i64,
        bucket_ms: i64,
        now_ms: i64,
    ) -> Result<(), RejectCode> {
        if start_ms > now_ms.saturating_add(self.max_future_skew_ms) {
            return Err(RejectCode::FutureTimestamp);
        }
        if start_ms.saturating_add(bucket_ms) <= now_ms.saturating_sub(self.max_lateness_ms) {
            return Err(RejectCode::BucketTooOld);
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 1 << 20,
            max_summaries: 10_000,
            max_categories: 1_000,
            max_entities: 10_000,
            max_lateness_ms: 7 * 24 * 3_600_000,
            max_future_skew_ms: 5 * 60_000,
        }
    }
}

impl Batch {
    /// The control-character rule for a batch from a producer (SPEC §2, PROTOCOL.md §3): no
    /// category or entity holds U+0000–U+001F or U+007F. The first offending summary, in wire
    /// order, names the reason (its category first). Not applied to batches from peers nor
    /// on replay: earlier releases accepted such names, and what they acknowledged stays.
    pub fn check_names(&self) -> Result<(), RejectCode> {
        if !self.strings.iter().any(has_control) {
            return Ok(());
        }
        let bad = |i: u32| self.strings.get(i as usize).is_some_and(has_control);
        for s in &self.summaries {
            if bad(s.category) {
                return Err(RejectCode::InvalidCategory);
            }
            if s.entity != NO_ENTITY && bad(s.entity - 1) {
                return Err(RejectCode::InvalidEntity);
            }
        }
        Ok(())
    }

    /// The sketches of summary `i`, if it carries any.
    pub fn sketches_of(&self, i: usize) -> Option<&Sketches> {
        let i = u32::try_from(i).ok()?;
        self.sketches
            .binary_search_by_key(&i, |e| e.0)
            .ok()
            .map(|at| &self.sketches[at].1)
    }

    /// The start (ms) of a summary's bucket.
    pub fn bucket_start_ms(&self, s: &BatchSummary) -> i64 {
        s.bucket.saturating_mul(self.bucket_ms as i64)
    }

    /// The end (ms) of the batch's earliest bucket: a merger whose clock is `max_lateness` or
    /// more past it refuses the batch (`bucket_too_old`, [`Limits::check_bucket_time`]).
    /// `i64::MIN` for a batch without summaries (which [`Batch::check`] refuses).
    pub fn oldest_end_ms(&self) -> i64 {
        let width = self.bucket_ms as i64;
        self.summaries
            .iter()
            .map(|s| self.bucket_start_ms(s).saturating_add(width))
            .min()
            .unwrap_or(i64::MIN)
    }

    /// The category string of a summary (which [`Batch::check`] has bounds-checked).
    pub fn category(&self, s: &BatchSummary) -> &str {
        self.strings.get(s.category as usize).unwrap_or("")
    }

    /// The entity string of a summary, if any.
    pub fn entity(&self, s: &BatchSummary) -> Option<&str> {
        match s.entity {
            NO_ENTITY => None,
            e => self.strings.get(e as usize - 1),
        }
    }

    /// Checks everything that does not depend on the clock: bucket width, string table, every
    /// summary's key and consistency, duplicate keys, and the count limits.
    /// Normalises `-0.0` in min/max.
    // Long by design: every clock-independent rule of SPEC §3 in order, each with its reason
    // code.
    pub fn check(&mut self, limits: &Limits) -> Result<(), RejectCode> {
        // Everything that could make `Replica::apply` refuse a batch is checked here, before
        // the merger writes it: a stored batch must apply on every replay.
        if self.id.seq == u64::MAX {
            return Err(RejectCode::InvalidSeq);
        }
        validate_bucket_ms(self.bucket_ms)?;
        if self.summaries.len() > limits.max_summaries {
            return Err(RejectCode::TooManySummaries);
        }
        // Each string must be used, as a category, an entity or both; none twice.
        let mut role = vec![0u8; self.strings.len()];
        let n = self.strings.len() as u32;
        // Canonical batches list summaries in strictly increasing key order, which proves the
        // keys distinct in one pass; other orders fall back to sorting.
        let mut in_order = true;
        let mut prev: Option<(u32, u32, i64)> = None;
        for s in &mut self.summaries {
            if s.category >= n || s.entity > n {
                return Err(RejectCode::BadStringIndex);
            }
            role[s.category as usize] |= 1;
            if s.entity != NO_ENTITY {
                role[s.entity as usize - 1] |= 2;
            }
            bucket_start(s.bucket, self.bucket_ms)?;
            s.summary.validate()?;
            let key = (s.category, s.entity, s.bucket);
            in_order &= prev.is_none_or(|p| p < key);
            prev = Some(key);
        }
        let mut categories = 0;
        let mut entities = 0;
        let mut strings_in_order = true;
        let mut prev_str: Option<&str> = None;
        for (s, r) in self.strings.iter().zip(&role) {
            if *r == 0 {
                return Err(RejectCode::InvalidStringTable);
            }
            // Lengths only: the control-character rule is a producer admission rule
            // ([`Batch::check_names`]), so batches that mergers of earlier releases accepted
            // still replay from disk and replicate from peers.
            if r & 1 != 0 {
                if !name_len_ok(s) {
                    return Err(RejectCode::InvalidCategory);
                }
                categories += 1;
            }
            if r & 2 != 0 {
                if !name_len_ok(s) {
                    return Err(RejectCode::InvalidEntity);
                }
                entities += 1;
            }
            strings_in_order &= prev_str.is_none_or(|p| p < s);
            prev_str = Some(s);
        }
        if categories > limits.max_categories {
            return Err(RejectCode::TooManyCategories);
        }
        if entities > limits.max_entities {
            return Err(RejectCode::TooManyEntities);
        }
        if !strings_in_order {
            let mut sorted: Vec<&str> = self.strings.iter().collect();
            sorted.sort_unstable();
            if sorted.windows(2).any(|w| w[0] == w[1]) {
                return Err(RejectCode::InvalidStringTable);
            }
        }
        let mut prev_sketch: Option<u32> = None;
        for (i, k) in &self.sketches {
            let summary = self
                .summaries
                .get(*i as usize)
                .ok_or(RejectCode::InvalidSketch)?;
            if prev_sketch.is_some_and(|p| p >= *i) {
                return Err(RejectCode::InvalidSketch);
            }
            prev_sketch = Some(*i);
            k.validate(&summary.summary)?;
        }
        if !in_order {
            let mut keys: Vec<_> = self
                .summaries
                .iter()
                .map(|s| (s.category, s.entity, s.bucket))
                .collect();
            keys.sort_unstable();
            if keys.windows(2).any(|w| w[0] == w[1]) {
                return Err(RejectCode::DuplicateKey);
            }
        }
        Ok(())
    }

    /// Checks the clock-dependent limits against the receiver's `now_ms`: no bucket may end
    /// before `now - max_lateness` nor start after `now + max_future_skew`; nor may the batch
    /// claim to be created in the future.
    pub fn check_time(&self, now_ms: i64, limits: &Limits) -> Result<(), RejectCode> {
        if self.created_ms > now_ms.saturating_add(limits.max_future_skew_ms) {
            return Err(RejectCode::FutureTimestamp);
        }
        for s in &self.summaries {
            limits.check_bucket_time(self.bucket_start_ms(s), self.bucket_ms as i64, now_ms)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_matches_the_formatter() {
        let bytes: Vec<u8> = (0..=255).collect();
        let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(super::hex(&bytes), expected);
        assert_eq!(super::hex(&[]), "");
    }
}
