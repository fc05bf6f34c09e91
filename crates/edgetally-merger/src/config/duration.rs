//! Durations in configuration: a number in the key's unit, or text with units.

use serde::de::{Deserializer, Error, Visitor};

struct Humane(u64);

impl Visitor<'_> for Humane {
    type Value = i64;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = if self.0 == 1 {
            "milliseconds"
        } else {
            "seconds"
        };
        write!(
            f,
            "a number of {unit} or a duration such as \"7d\", \"30s\", \"1h 30m\""
        )
    }
    fn visit_i64<E: Error>(self, v: i64) -> Result<i64, E> {
        Ok(v)
    }
    fn visit_u64<E: Error>(self, v: u64) -> Result<i64, E> {
        i64::try_from(v).map_err(|_| E::custom(format!("{v} is too large")))
    }
    fn visit_str<E: Error>(self, v: &str) -> Result<i64, E> {
        let d = humantime::parse_duration(v.trim()).map_err(|e| {
            E::custom(format!(
                "{v:?} is not a duration ({e}); write e.g. \"7d\", \"30s\", \"1h 30m\", \"250ms\""
            ))
        })?;
        let ms = d.as_millis();
        if ms % u128::from(self.0) != 0 {
            return Err(E::custom(format!("{v:?} is not a whole number of seconds")));
        }
        i64::try_from(ms / u128::from(self.0)).map_err(|_| E::custom(format!("{v:?} is too long")))
    }
}

pub fn ms<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    d.deserialize_any(Humane(1))
}

pub fn ms_u<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    non_negative(d.deserialize_any(Humane(1))?)
}

pub fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    non_negative(d.deserialize_any(Humane(1000))?)
}

fn non_negative<E: Error>(v: i64) -> Result<u64, E> {
    u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative")))
}
