//! Records, their validation, and bucketing (SPEC §2).

use crate::code::RejectCode;
use crate::value::validate_value;

/// The longest category or entity, in UTF-8 bytes.
pub const MAX_NAME_BYTES: usize = 200;
/// The default bucket width: one second.
pub const DEFAULT_BUCKET_MS: u32 = 1_000;
/// One day: every bucket width divides it, so buckets align with UTC days.
pub const DAY_MS: u32 = 86_400_000;

/// Whether a name's length is within the rule: 1–200 bytes of UTF-8.
pub fn name_len_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_BYTES
}

/// Whether a name holds a control character, U+0000–U+001F or U+007F (SPEC §2): what no
/// store, log or database downstream is sure to hold (PostgreSQL text refuses U+0000).
pub fn has_control(s: &str) -> bool {
    s.bytes().any(|b| b < 0x20 || b == 0x7f)
}

/// Checks a category name: 1–200 bytes, no control character.
pub fn validate_category(s: &str) -> Result<(), RejectCode> {
    if !name_len_ok(s) || has_control(s) {
        Err(RejectCode::InvalidCategory)
    } else {
        Ok(())
    }
}

/// Checks an entity id: 1–200 bytes, no control character.
pub fn validate_entity(s: &str) -> Result<(), RejectCode> {
    if !name_len_ok(s) || has_control(s) {
        Err(RejectCode::InvalidEntity)
    } else {
        Ok(())
    }
}

/// A bucket width: a whole number of seconds that divides one day.
pub fn validate_bucket_ms(bucket_ms: u32) -> Result<(), RejectCode> {
    if bucket_ms == 0 || !bucket_ms.is_multiple_of(1_000) || !DAY_MS.is_multiple_of(bucket_ms) {
        Err(RejectCode::InvalidBucketWidth)
    } else {
        Ok(())
    }
}

/// The earliest and latest event times accepted: ±2⁵³ ms (about ±285,000 years), which keeps
/// every bucket start representable and exactly convertible to a JSON number.
pub const MIN_TS_MS: i64 = -(1 << 53);
/// See [`MIN_TS_MS`].
pub const MAX_TS_MS: i64 = 1 << 53;

/// The bucket index of an event time: `floor(ts_ms / bucket_ms)`.
pub fn bucket_index(ts_ms: i64, bucket_ms: u32) -> Result<i64, RejectCode> {
    if !(MIN_TS_MS..=MAX_TS_MS).contains(&ts_ms) {
        return Err(RejectCode::InvalidTimestamp);
    }
    Ok(ts_ms.div_euclid(bucket_ms as i64))
}

/// The start (ms) of bucket `index`, if it is within the accepted time range.
pub fn bucket_start(index: i64, bucket_ms: u32) -> Result<i64, RejectCode> {
    index
        .checked_mul(bucket_ms as i64)
        .filter(|t| (MIN_TS_MS - bucket_ms as i64..=MAX_TS_MS).contains(t))
        .ok_or(RejectCode::InvalidTimestamp)
}

/// One event as a producer records it.
#[derive(Clone, Debug, PartialEq)]
pub struct Record<'a> {
    /// Event time, ms since the Unix epoch.
    pub ts_ms: i64,
    /// 1–200 bytes of UTF-8.
    pub category: &'a str,
    /// Optional 1–200 bytes of UTF-8.
    pub entity: Option<&'a str>,
    /// A finite value, |v| ≤ 1e15; a pure count records 1.0.
    pub value: f64,
}

impl Record<'_> {
    /// Validates every field; returns the normalised value.
    pub fn validate(&self) -> Result<f64, RejectCode> {
        validate_category(self.category)?;
        if let Some(e) = self.entity {
            validate_entity(e)?;
        }
        if !(MIN_TS_MS..=MAX_TS_MS).contains(&self.ts_ms) {
            return Err(RejectCode::InvalidTimestamp);
        }
        validate_value(self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucketing_floors_including_negative_times() {
        assert_eq!(bucket_index(0, 1000), Ok(0));
        assert_eq!(bucket_index(999, 1000), Ok(0));
        assert_eq!(bucket_index(1000, 1000), Ok(1));
        assert_eq!(bucket_index(-1, 1000), Ok(-1));
        assert_eq!(bucket_index(59_999, 60_000), Ok(0));
        assert_eq!(
            bucket_index(MAX_TS_MS + 1, 1000),
            Err(RejectCode::InvalidTimestamp)
        );
        assert_eq!(
            bucket_start(i64::MAX, 1000),
            Err(RejectCode::InvalidTimestamp)
        );
    }

    #[test]
    fn names_with_control_characters_are_refused() {
        for bad in ["m\u{0}x", "\t", "a\nb", "\u{1f}", "x\u{7f}"] {
            assert_eq!(
                validate_category(bad),
                Err(RejectCode::InvalidCategory),
                "{bad:?}"
            );
            assert_eq!(
                validate_entity(bad),
                Err(RejectCode::InvalidEntity),
                "{bad:?}"
            );
        }
        // The rest of Unicode is fine, C1 controls and U+2028 included (JSON holds them).
        for ok in ["a b", "é", "\u{80}", "\u{9f}", "\u{2028}", "~"] {
            assert_eq!(validate_category(ok), Ok(()), "{ok:?}");
            assert_eq!(validate_entity(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn bucket_widths() {
        for ok in [1_000, 2_000, 60_000, 3_600_000, DAY_MS] {
            assert_eq!(validate_bucket_ms(ok), Ok(()));
        }
        for bad in [0, 1, 999, 1_500, 7_000, 2 * DAY_MS] {
            assert_eq!(
                validate_bucket_ms(bad),
                Err(RejectCode::InvalidBucketWidth),
                "{bad}"
            );
        }
    }

    #[test]
    fn record_validation_names_each_reason() {
        let ok = Record {
            ts_ms: 1,
            category: "c",
            entity: Some("e"),
            value: -0.0,
        };
        assert_eq!(ok.validate().map(f64::to_bits), Ok(0.0f64.to_bits()));
        let long = "x".repeat(201);
        let cases = [
            (
                Record {
                    category: "",
                    ..ok.clone()
                },
                RejectCode::InvalidCategory,
            ),
            (
                Record {
                    category: &long,
                    ..ok.clone()
                },
                RejectCode::InvalidCategory,
            ),
            (
                Record {
                    entity: Some(""),
                    ..ok.clone()
                },
                RejectCode::InvalidEntity,
            ),
            (
                Record {
                    value: f64::NAN,
                    ..ok.clone()
                },
                RejectCode::InvalidValue,
            ),
            (
                Record {
                    value: 2e15,
                    ..ok.clone()
                },
                RejectCode::InvalidValue,
            ),
            (
                Record {
                    ts_ms: i64::MIN,
                    ..ok.clone()
                },
                RejectCode::InvalidTimestamp,
            ),
        ];
        for (r, code) in cases {
            assert_eq!(r.validate(), Err(code), "{r:?}");
        }
        let exactly = "é".repeat(100); // 200 bytes
        assert!(Record {
            category: &exactly,
            ..ok
        }
        .validate()
        .is_ok());
    }
}
