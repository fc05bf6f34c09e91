//! The replica's string interner: every category and entity string once, with a dense id.
//!
//! The strings live end to end in one buffer and the hash table holds only their ids (4 bytes
//! a slot), so a lookup touches a small table, a span and the bytes — for tens of thousands
//! of strings that fits the CPU caches, where a map of boxed strings (24-byte slots pointing
//! at scattered allocations) took two or three cache misses per lookup on a busy merger.
//!
//! Strings come from the network, so the table must not be floodable by crafted collisions:
//! it hashes with SipHash-2-4 under keys chosen by the caller (the core draws no randomness;
//! a merger passes random keys to [`Interner::set_keys`]).

use crate::batch::ProducerKey;
use hashbrown::HashTable;
use std::hash::Hasher;

#[derive(Clone, Copy, Debug, Default)]
struct Keys {
    k0: u64,
    k1: u64,
}

impl Keys {
    #[allow(deprecated)] // SipHasher is std's only keyed hasher; its algorithm is what we want.
    fn hash(&self, s: &str) -> u64 {
        self.hash_bytes(s.as_bytes())
    }

    #[allow(deprecated)]
    fn hash_bytes(&self, b: &[u8]) -> u64 {
        let mut h = std::hash::SipHasher::new_with_keys(self.k0, self.k1);
        h.write(b);
        h.finish()
    }
}

/// Makes room for one more element in a vector that holds one entry per producer (or per
/// producer and bucket), growing it by a quarter rather than doubling: its spare capacity
/// averages an eighth of its length instead of a third, and the bytes a node holds per
/// producer follow the producers (RSS, not just the estimate). The copies a growth costs
/// stay amortised O(1) — four per element rather than one.
pub(crate) fn grow_gently<T>(v: &mut Vec<T>) {
    if v.len() == v.capacity() {
        v.reserve_exact((v.len() / 4).max(16));
    }
}

/// Producer keys ↔ dense ids (0, 1, 2, … in order of first sight), like [`Interner`]: the keys
/// end to end in one vector, the table holding only ids (about 5 bytes a key, where a B-tree
/// map of keys to ids took ~55), hashed with SipHash under the caller's keys — producer keys
/// are chosen by whoever generates them, so a fixed hash could be flooded.
#[derive(Clone, Debug, Default)]
pub(crate) struct KeyIndex {
    keys: Vec<ProducerKey>,
    table: HashTable<u32>,
    hash: Keys,
    /// Ids released by [`KeyIndex::release`], handed out again before new ones.
    free: Vec<u32>,
}

impl KeyIndex {
    /// The key of `id` (panics on an id not handed out).
    pub(crate) fn get(&self, id: u32) -> ProducerKey {
        self.keys[id as usize]
    }

    /// The id of `k`, if known.
    pub(crate) fn id(&self, k: &ProducerKey) -> Option<u32> {
        let h = self.hash.hash_bytes(&k.0);
        self.table
            .find(h, |&id| self.keys[id as usize] == *k)
            .copied()
    }

    /// The id of `k`, adding it if new.
    pub(crate) fn intern(&mut self, k: ProducerKey) -> u32 {
        if let Some(id) = self.id(&k) {
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.keys[id as usize] = k;
                id
            }
            None => {
                grow_gently(&mut self.keys);
                self.keys.push(k);
                self.keys.len() as u32 - 1
            }
        };
        let (keys, hash) = (&self.keys, self.hash);
        let h = hash.hash_bytes(&k.0);
        self.table
            .insert_unique(h, id, |&i| hash.hash_bytes(&keys[i as usize].0));
        id
    }

    /// One past the highest id handed out (released ids included).
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Number of keys held (not released).
    pub(crate) fn live(&self) -> usize {
        self.keys.len() - self.free.len()
    }

    /// Whether `id` is held (handed out and not released).
    pub(crate) fn is_live(&self, id: u32) -> bool {
        self.keys
            .get(id as usize)
            .is_some_and(|k| self.id(k) == Some(id))
    }

    /// Forgets the key of `id`; the id is handed out again to a later new key. The caller
    /// must hold no reference to `id` any more.
    pub(crate) fn release(&mut self, id: u32) {
        if !self.is_live(id) {
            return;
        }
        let h = self.hash.hash_bytes(&self.keys[id as usize].0);
        if let Ok(e) = self.table.find_entry(h, |&i| i == id) {
            e.remove();
            self.free.push(id);
        }
    }

    /// Heap bytes held.
    pub(crate) fn heap_bytes(&self) -> u64 {
        (self.keys.capacity() * std::mem::size_of::<ProducerKey>()
            + self.table.capacity() * 5
            + self.free.capacity() * 4) as u64
    }

    /// Re-keys the hash (pass random keys).
    pub(crate) fn set_keys(&mut self, k0: u64, k1: u64) {
        self.hash = Keys { k0, k1 };
        let mut table = HashTable::with_capacity(self.keys.len());
        let (keys, hash) = (&self.keys, self.hash);
        let free: std::collections::HashSet<u32> = self.free.iter().copied().collect();
        for (id, k) in keys.iter().enumerate() {
            if free.contains(&(id as u32)) {
                continue;
            }
            table.insert_unique(hash.hash_bytes(&k.0), id as u32, |&i| {
                hash.hash_bytes(&keys[i as usize].0)
            });
        }
        self.table = table;
    }
}

/// Strings ↔ dense ids (0, 1, 2, … in order of first sight).
#[derive(Clone, Debug, Default)]
pub(crate) struct Interner {
    bytes: String,
    /// End offset in `bytes` of each string (its start is the previous end).
    ends: Vec<u32>,
    table: HashTable<u32>,
    keys: Keys,
}

/// String `id` of a buffer and its end offsets (panics on an id not handed out).
fn span<'a>(bytes: &'a str, ends: &[u32], id: u32) -> &'a str {
    let i = id as usize;
    let start = if i == 0 { 0 } else { ends[i - 1] as usize };
    &bytes[start..ends[i] as usize]
}

impl Interner {
    /// String `id` (panics on an id this interner did not hand out).
    pub(crate) fn get(&self, id: u32) -> &str {
        span(&self.bytes, &self.ends, id)
    }

    /// Heap bytes held (string bytes, end offsets, table slots with their control bytes).
    pub(crate) fn heap_bytes(&self) -> u64 {
        (self.bytes.capacity() + self.ends.capacity() * 4 + self.table.capacity() * 5) as u64
    }

    /// The id of `s`, if interned.
    pub(crate) fn id(&self, s: &str) -> Option<u32> {
        let h = self.keys.hash(s);
        self.table.find(h, |&id| self.get(id) == s).copied()
    }

    /// The id of `s`, interning it if new.
    pub(crate) fn intern(&mut self, s: &str) -> u32 {
        let h = self.keys.hash(s);
        let Interner {
            bytes,
            ends,
            table,
            keys,
        } = self;
        if let Some(&id) = table.find(h, |&id| span(bytes, ends, id) == s) {
            return id;
        }
        let id = ends.len() as u32;
        bytes.push_str(s);
        ends.push(bytes.len() as u32);
        let (bytes, ends) = (&*bytes, &*ends);
        table.insert_unique(h, id, |&id| keys.hash(span(bytes, ends, id)));
        id
    }

    /// Number of strings.
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    /// Re-keys the hash (pass random keys).
    pub(crate) fn set_keys(&mut self, k0: u64, k1: u64) {
        self.keys = Keys { k0, k1 };
        let mut table = HashTable::with_capacity(self.len());
        for id in 0..self.len() as u32 {
            let h = self.keys.hash(self.get(id));
            table.insert_unique(h, id, |&i| self.keys.hash(self.get(i)));
        }
        self.table = table;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producer_ids_are_dense_stable_and_survive_rekeying() {
        let mut t = KeyIndex::default();
        let key = |i: u32| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            ProducerKey(k)
        };
        for i in 0..5000 {
            assert_eq!(t.intern(key(i)), i);
        }
        t.set_keys(3, 5);
        for i in 0..5000 {
            assert_eq!(t.id(&key(i)), Some(i));
            assert_eq!(t.intern(key(i)), i);
            assert_eq!(t.get(i), key(i));
        }
        assert_eq!(t.id(&key(5000)), None);
        assert_eq!(t.len(), 5000);
    }

    #[test]
    fn ids_are_dense_stable_and_survive_rekeying() {
        let mut t = Interner::default();
        let words: Vec<String> = (0..5000).map(|i| format!("device-{i:05}")).collect();
        for (i, w) in words.iter().enumerate() {
            assert_eq!(t.intern(w), i as u32);
        }
        assert_eq!(t.intern(""), 5000);
        for (i, w) in words.iter().enumerate() {
            assert_eq!(t.intern(w), i as u32);
            assert_eq!(t.id(w), Some(i as u32));
            assert_eq!(t.get(i as u32), w);
        }
        t.set_keys(7, 11);
        for (i, w) in words.iter().enumerate() {
            assert_eq!(t.id(w), Some(i as u32));
        }
        assert_eq!(t.id("nope"), None);
        assert_eq!(t.get(5000), "");
        assert_eq!(t.len(), 5001);
    }
}
