//! A batch's string table, stored in one allocation (decoding a batch of 200 entities would
//! otherwise allocate 200 strings).

use serde::ser::{Serialize, SerializeSeq, Serializer};

/// An append-only list of strings in one buffer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StringTable {
    data: String,
    ends: Vec<u32>,
}

impl StringTable {
    /// An empty table.
    pub fn new() -> StringTable {
        StringTable::default()
    }

    /// An empty table with room for `n` strings of `bytes` bytes in all.
    pub fn with_capacity(n: usize, bytes: usize) -> StringTable {
        StringTable {
            data: String::with_capacity(bytes),
            ends: Vec::with_capacity(n),
        }
    }

    /// Appends a string; returns its index.
    pub fn push(&mut self, s: &str) -> u32 {
        self.data.push_str(s);
        self.ends.push(self.data.len() as u32);
        (self.ends.len() - 1) as u32
    }

    /// String `i`.
    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)? as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.data.get(start..end)
    }

    /// Number of strings.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The strings in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i).unwrap_or(""))
    }
}

impl<S: AsRef<str>> FromIterator<S> for StringTable {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut t = StringTable::new();
        for s in iter {
            t.push(s.as_ref());
        }
        t
    }
}

/// Serialises as a sequence of strings (postcard: count, then each length-prefixed string).
impl Serialize for StringTable {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut seq = ser.serialize_seq(Some(self.len()))?;
        for s in self.iter() {
            seq.serialize_element(s)?;
        }
        seq.end()
    }
}
