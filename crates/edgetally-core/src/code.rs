//! Stable rejection reason codes.
//!
//! Every rejection anywhere in edgetally — the batch decoder, record validation, the merger's
//! QUIC and HTTP replies, metrics labels and the SDK's `stats()` — names one of these codes. The
//! numeric value travels in `Nack` frames; the string is what humans, JSON bodies and metric
//! labels see. Both are frozen: a code may be added, never renumbered or renamed.

use core::fmt;

macro_rules! reject_codes {
    ($( $(#[$doc:meta])* $variant:ident = $num:literal, $text:literal; )*) => {
        /// Why an input was refused. See the module docs for the stability promise.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum RejectCode {
            $( $(#[$doc])* $variant = $num, )*
        }

        impl RejectCode {
            /// Every code, in numeric order.
            pub const ALL: &'static [RejectCode] = &[$(RejectCode::$variant,)*];

            /// One more than the largest code number: the size of a table indexed by code.
            pub const TABLE_SIZE: usize = {
                let mut m = 0u16;
                $( if $num > m { m = $num; } )*
                m as usize + 1
            };

            /// The stable snake_case name used in JSON, metrics and logs.
            pub const fn as_str(self) -> &'static str {
                match self { $(RejectCode::$variant => $text,)* }
            }

            /// The stable number carried in `Nack` frames.
            pub const fn as_u16(self) -> u16 {
                self as u16
            }

            /// The code with this number, if it is one we know.
            pub const fn from_u16(n: u16) -> Option<RejectCode> {
                match n { $($num => Some(RejectCode::$variant),)* _ => None }
            }

            /// The code with this name, if it is one we know.
            pub fn from_name(s: &str) -> Option<RejectCode> {
                match s { $($text => Some(RejectCode::$variant),)* _ => None }
            }
        }
    };
}

reject_codes! {
    /// The bytes are not a well-formed message (bad varint, short read, bad UTF-8, bad tag).
    Malformed = 1, "malformed";
    /// The format version is not one this build understands.
    UnsupportedVersion = 2, "unsupported_version";
    /// The encoded batch is larger than the payload limit.
    PayloadTooLarge = 3, "payload_too_large";
    /// The batch holds more summaries than the limit.
    TooManySummaries = 4, "too_many_summaries";
    /// The batch names more distinct categories than the limit.
    TooManyCategories = 5, "too_many_categories";
    /// The batch names more distinct entities than the limit.
    TooManyEntities = 6, "too_many_entities";
    /// The ed25519 signature does not verify, or the key is weak.
    BadSignature = 7, "bad_signature";
    /// A bucket ends before `now - max_lateness`.
    BucketTooOld = 8, "bucket_too_old";
    /// A timestamp lies after `now + max_future_skew`.
    FutureTimestamp = 9, "future_timestamp";
    /// A category is empty, longer than 200 bytes, or not UTF-8.
    InvalidCategory = 10, "invalid_category";
    /// An entity is empty, longer than 200 bytes, or not UTF-8.
    InvalidEntity = 11, "invalid_entity";
    /// A value is NaN, infinite, or outside the exact range (|v| ≤ 1e15).
    InvalidValue = 12, "invalid_value";
    /// A summary is inconsistent: count 0, min > max, or a sum outside count·[min, max].
    InvalidSummary = 13, "invalid_summary";
    /// The declared bucket width is not a whole number of seconds dividing one day.
    InvalidBucketWidth = 14, "invalid_bucket_width";
    /// The string table holds the same string twice, or a string no summary uses.
    InvalidStringTable = 15, "invalid_string_table";
    /// Bytes follow the end of the message.
    TrailingBytes = 16, "trailing_bytes";
    /// A timestamp is outside the representable range of buckets.
    InvalidTimestamp = 17, "invalid_timestamp";
    /// A summary refers to a string index outside the table.
    BadStringIndex = 18, "bad_string_index";
    /// The same (category, entity, bucket) key appears twice in one batch.
    DuplicateKey = 19, "duplicate_key";
    /// A record or JSON event lacks a required field or has one of the wrong type.
    InvalidEvent = 20, "invalid_event";
    /// A frame is larger than the frame limit.
    FrameTooLarge = 21, "frame_too_large";
    /// The batch's `seq` is 2⁶⁴−1, which is reserved (no producer numbers that far, and the
    /// seen-set's half-open ranges cannot hold it).
    InvalidSeq = 22, "invalid_seq";
    /// The producer is not admitted by this merger's producer policy (not on the allowlist,
    /// or not enrolled by a configured issuer), or its enrolment credential is invalid.
    NotAdmitted = 23, "not_admitted";
    /// The producer introduced more new categories this hour than the merger allows.
    CategoryQuota = 24, "category_quota";
    /// The producer introduced more new (category, entity) series this hour than allowed.
    EntityQuota = 25, "entity_quota";
    /// The merger holds as many series as it is configured to; new series are refused.
    SeriesLimit = 26, "series_limit";
    /// A value lies outside the bounds configured for its category.
    ValueOutOfBounds = 27, "value_out_of_bounds";
    /// The producer signed two different batches under one batch id (found by the mergers
    /// comparing their states, PROTOCOL.md §9); this merger refuses its batches.
    Equivocated = 28, "equivocated";
    /// The batch's source address introduced more new series this hour than the merger
    /// allows one source (`source_new_series_per_hour`).
    SourceQuota = 29, "source_quota";
    /// A summary's sketches (batch format v2) are malformed or inconsistent with it: not
    /// canonical, empty, at another quantile accuracy than the protocol's, or holding another
    /// count of values than the summary.
    InvalidSketch = 30, "invalid_sketch";
    /// A sketch is finer than this merger admits for its category (`sketch_max_precision`),
    /// or the merger holds as many sketch bytes as it is configured to (`max_sketch_bytes`).
    SketchLimit = 31, "sketch_limit";
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for RejectCode {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_by_number_and_name() {
        for &c in RejectCode::ALL {
            assert_eq!(RejectCode::from_u16(c.as_u16()), Some(c));
            assert_eq!(RejectCode::from_name(c.as_str()), Some(c));
        }
        assert_eq!(RejectCode::from_u16(0), None);
        assert_eq!(RejectCode::from_name("nope"), None);
        assert!(RejectCode::ALL
            .iter()
            .all(|c| (c.as_u16() as usize) < RejectCode::TABLE_SIZE));
    }

    #[test]
    fn numbers_are_frozen() {
        // These numbers are on the wire; this table is the promise.
        let frozen = [
            (1, "malformed"),
            (7, "bad_signature"),
            (8, "bucket_too_old"),
            (12, "invalid_value"),
            (21, "frame_too_large"),
            (22, "invalid_seq"),
            (23, "not_admitted"),
            (24, "category_quota"),
            (25, "entity_quota"),
            (26, "series_limit"),
            (27, "value_out_of_bounds"),
            (28, "equivocated"),
            (29, "source_quota"),
        ];
        for (n, s) in frozen {
            assert_eq!(RejectCode::from_u16(n).map(|c| c.as_str()), Some(s));
        }
    }
}
