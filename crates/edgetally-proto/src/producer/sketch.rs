//! Distinct counts and quantiles on the producer (batch format v2): subjects hashed into the
//! open bucket's HyperLogLog, values of quantile categories into its quantile sketch.

use super::*;

impl Producer {
    /// Records one event of a subject (a user, device or session id) through a handle: its
    /// value as [`Producer::record_handle`] does, and the subject's hash into the bucket's
    /// HyperLogLog, for distinct counts. The subject itself never leaves the producer.
    pub fn record_subject(
        &mut self,
        now_ms: i64,
        h: Handle,
        value: f64,
        ts_ms: Option<i64>,
        subject: &str,
    ) -> Result<(), RejectCode> {
        if !edgetally_core::record::name_len_ok(subject) {
            return self.refuse(RejectCode::InvalidEvent);
        }
        let hash =
            edgetally_core::sketches::subject_hash(subject, self.config.subject_key.as_ref());
        self.record_hash(now_ms, h, value, ts_ms, hash)
    }

    /// Sets the distinct-count settings ([`ProducerConfig::distinct_precision`],
    /// [`ProducerConfig::subject_key`]) of a producer made without them (the JavaScript
    /// SDK's). A precision outside 4–16 is refused (`invalid_sketch`) and changes nothing.
    pub fn set_distinct(
        &mut self,
        distinct_precision: u8,
        subject_key: Option<[u8; 16]>,
    ) -> Result<(), RejectCode> {
        use edgetally_core::sketches::{HLL_MAX_PRECISION, HLL_MIN_PRECISION};
        if !(HLL_MIN_PRECISION..=HLL_MAX_PRECISION).contains(&distinct_precision) {
            return Err(RejectCode::InvalidSketch);
        }
        self.config.distinct_precision = distinct_precision;
        self.config.subject_key = subject_key;
        Ok(())
    }

    /// Makes handle `h` keep quantiles, as if its category were one of
    /// [`ProducerConfig::quantile_categories`] (the JavaScript SDK matches its own list, and
    /// marks each handle before its first record). A handle that recorded already is refused
    /// (`invalid_event`): its open bucket's values are not in a sketch.
    pub fn keep_quantiles(&mut self, h: Handle) -> Result<(), RejectCode> {
        match self.handles.get_mut(h.0 as usize) {
            Some(st) if st.current.is_none() => {
                st.quantiles = true;
                Ok(())
            }
            _ => Err(RejectCode::InvalidEvent),
        }
    }

    /// Whether handle `h`'s category keeps quantiles (its values then cannot be summed by a
    /// caller: each goes into the sketch).
    pub fn keeps_quantiles(&self, h: Handle) -> bool {
        self.handles
            .get(h.0 as usize)
            .is_some_and(|st| st.quantiles)
    }

    /// [`Producer::record_subject`] with the subject hashed already (by the caller, with the
    /// same key).
    pub fn record_hash(
        &mut self,
        now_ms: i64,
        h: Handle,
        value: f64,
        ts_ms: Option<i64>,
        subject_hash: u64,
    ) -> Result<(), RejectCode> {
        let ts = ts_ms.unwrap_or(now_ms);
        self.fold_value(now_ms, h, ts, value, Some(subject_hash))
    }
}

impl Current {
    /// Adds a folded record's subject hash (into a HyperLogLog of `precision`, if new) and,
    /// for a quantile category, its summary's values to this bucket's sketches; returns the
    /// wire bytes it may add.
    pub(super) fn add_sketches(
        &mut self,
        subject: Option<u64>,
        quantiles: bool,
        precision: u8,
        summary: &Summary,
    ) -> usize {
        let k = self.sketches.get_or_insert_with(Default::default);
        if quantiles {
            k.insert_value(summary.min, summary.count);
        }
        match subject {
            Some(hash) => {
                k.insert_subject(hash, precision);
                // A sparse register takes about 3 bytes on the wire.
                3
            }
            None => 0,
        }
    }
}
