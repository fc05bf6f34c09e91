//! Crash-safe storage on redb: the batch log (every acked batch, as the producer's signed
//! bytes, until a snapshot covers it) and the latest state snapshot.
//!
//! Why redb: a single-file, pure-Rust B-tree store with ACID transactions whose commits are
//! fsynced (`Durability::Immediate`, its default); copy-on-write pages mean a crash at any point
//! leaves the last committed transaction intact. Our write pattern — group commits of
//! many small values, and an occasional large snapshot written atomically together with the
//! deletion of the batches it covers — is exactly one transaction each. fjall (an LSM) would
//! also do; we need neither its write amplification trade-offs nor its background threads.

use edgetally_core::{BatchId, ProducerKey, Snapshot};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Group commits: key = commit number, value = the group's records, each
/// `batch id (48 bytes) | varint length | the batch's signed bytes`. One value per group keeps
/// a commit to one B-tree insert however many batches it holds.
const GROUPS: TableDefinition<u64, &[u8]> = TableDefinition::new("groups");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SNAPSHOT_KEY: &str = "snapshot";

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// The node's database.
#[derive(Debug)]
pub struct Store {
    db: Database,
    next_group: AtomicU64,
    stored: AtomicU64,
    /// The group value being built, kept between commits: a fresh ~1 MB buffer per commit
    /// would be mapped and page-faulted anew each time.
    scratch: std::sync::Mutex<Vec<u8>>,
}

fn push_record(out: &mut Vec<u8>, id: &BatchId, raw: &[u8]) {
    out.extend_from_slice(&batch_key(id));
    let mut n = raw.len() as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.extend_from_slice(raw);
}

/// The records of a group value; a damaged tail ends the iteration (and is reported).
fn records(mut v: &[u8]) -> impl Iterator<Item = Result<(BatchId, &[u8]), StoreError>> {
    std::iter::from_fn(move || {
        if v.is_empty() {
            return None;
        }
        let bad = || Some(Err(StoreError("damaged group record".into())));
        let id = match v.get(..48).and_then(batch_id) {
            Some(id) => id,
            None => {
                v = &[];
                return bad();
            }
        };
        let (mut len, mut shift, mut i) = (0usize, 0u32, 48usize);
        loop {
            let Some(&b) = v.get(i) else {
                v = &[];
                return bad();
            };
            len |= ((b & 0x7f) as usize) << shift;
            i += 1;
            shift += 7;
            if b & 0x80 == 0 || shift > 35 {
                break;
            }
        }
        let Some(raw) = v.get(i..i + len) else {
            v = &[];
            return bad();
        };
        v = &v[i + len..];
        Some(Ok((id, raw)))
    })
}

/// The 48-byte key of a batch: producer, epoch (big-endian), seq (big-endian).
pub fn batch_key(id: &BatchId) -> [u8; 48] {
    let mut k = [0u8; 48];
    k[..32].copy_from_slice(&id.producer.0);
    k[32..40].copy_from_slice(&id.epoch.to_be_bytes());
    k[40..].copy_from_slice(&id.seq.to_be_bytes());
    k
}

/// The id of a 48-byte key.
pub fn batch_id(k: &[u8]) -> Option<BatchId> {
    if k.len() != 48 {
        return None;
    }
    Some(BatchId {
        producer: ProducerKey(k[..32].try_into().ok()?),
        epoch: u64::from_be_bytes(k[32..40].try_into().ok()?),
        seq: u64::from_be_bytes(k[40..].try_into().ok()?),
    })
}

/// What start-up reads back.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The latest snapshot, if any.
    pub snapshot: Option<Snapshot>,
    /// Every stored batch (raw signed bytes), in key order.
    pub batches: Vec<Vec<u8>>,
}

impl Store {
    /// Opens (or creates) the database file with a page cache of `cache_bytes` (redb's own
    /// default is 1 GiB, which would dominate a merger's memory).
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Store, StoreError> {
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(err)?;
        let txn = db.begin_write().map_err(err)?;
        let next = {
            let t = txn.open_table(GROUPS).map_err(err)?;
            txn.open_table(META).map_err(err)?;
            let last = t.last().map_err(err)?.map(|(k, _)| k.value());
            last.map_or(0, |k| k + 1)
        };
        txn.commit().map_err(err)?;
        Ok(Store {
            db,
            next_group: AtomicU64::new(next),
            stored: AtomicU64::new(0),
            scratch: Default::default(),
        })
    }

    /// Reads the snapshot and the batches.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let meta = txn.open_table(META).map_err(err)?;
        let snapshot = match meta.get(SNAPSHOT_KEY).map_err(err)? {
            Some(v) => Some(
                postcard::from_bytes(v.value())
                    .map_err(|e| StoreError(format!("snapshot unreadable: {e}")))?,
            ),
            None => None,
        };
        let table = txn.open_table(GROUPS).map_err(err)?;
        let mut batches = Vec::new();
        for row in table.iter().map_err(err)? {
            let (_, v) = row.map_err(err)?;
            for rec in records(v.value()) {
                match rec {
                    Ok((_, raw)) => batches.push(raw.to_vec()),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        }
        self.stored.store(batches.len() as u64, Relaxed);
        Ok(Loaded { snapshot, batches })
    }

    /// Appends batches as one group record in one transaction, and returns once it is on
    /// disk (fsync).
    /// Returns the group's key (commit numbers increase).
    pub fn append(&self, items: &[(BatchId, &[u8])]) -> Result<u64, StoreError> {
        let mut value = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        value.clear();
        for (id, raw) in items {
            push_record(&mut value, id, raw);
        }
        let key = self.next_group.fetch_add(1, Relaxed);
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut t = txn.open_table(GROUPS).map_err(err)?;
            t.insert(key, &value[..]).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        self.stored.fetch_add(items.len() as u64, Relaxed);
        Ok(key)
    }

    /// Writes `snapshot` and deletes, in the same transaction, the stored batches for which
    /// `drop` is true (those the snapshot covers and replication no longer needs): a group
    /// whose records all go is deleted, one that keeps some is rewritten with those.
    pub fn compact(
        &self,
        snapshot: &Snapshot,
        drop: impl Fn(&BatchId) -> bool,
    ) -> Result<usize, StoreError> {
        let bytes = postcard::to_allocvec(snapshot).map_err(err)?;
        let txn = self.db.begin_write().map_err(err)?;
        let mut removed = 0;
        {
            let mut meta = txn.open_table(META).map_err(err)?;
            meta.insert(SNAPSHOT_KEY, &bytes[..]).map_err(err)?;
            let mut t = txn.open_table(GROUPS).map_err(err)?;
            let mut rewrites: Vec<(u64, Option<Vec<u8>>)> = Vec::new();
            for row in t.iter().map_err(err)? {
                let (k, v) = row.map_err(err)?;
                let mut kept = Vec::new();
                let mut dropped = 0;
                for rec in records(v.value()) {
                    let (id, raw) = rec?;
                    if drop(&id) {
                        dropped += 1;
                    } else {
                        push_record(&mut kept, &id, raw);
                    }
                }
                if dropped > 0 {
                    removed += dropped;
                    rewrites.push((k.value(), (!kept.is_empty()).then_some(kept)));
                }
            }
            for (k, v) in rewrites {
                match v {
                    Some(v) => {
                        t.insert(k, &v[..]).map_err(err)?;
                    }
                    None => {
                        t.remove(k).map_err(err)?;
                    }
                }
            }
        }
        txn.commit().map_err(err)?;
        self.stored.fetch_sub(removed as u64, Relaxed);
        Ok(removed)
    }

    /// Writes `snapshot` and deletes, in the same transaction, every group up to and
    /// including `through` — for when the snapshot covers all of them and replication needs
    /// none: a key-range delete that decodes no batch (it only counts the records it drops).
    pub fn compact_through(&self, snapshot: &Snapshot, through: u64) -> Result<usize, StoreError> {
        let bytes = postcard::to_allocvec(snapshot).map_err(err)?;
        let txn = self.db.begin_write().map_err(err)?;
        let mut removed = 0usize;
        {
            let mut meta = txn.open_table(META).map_err(err)?;
            meta.insert(SNAPSHOT_KEY, &bytes[..]).map_err(err)?;
            let mut t = txn.open_table(GROUPS).map_err(err)?;
            let mut drained = t.extract_from_if(..=through, |_, _| true).map_err(err)?;
            for row in drained.by_ref() {
                let (_, v) = row.map_err(err)?;
                removed += records(v.value()).count();
            }
        }
        txn.commit().map_err(err)?;
        self.stored.fetch_sub(removed as u64, Relaxed);
        Ok(removed)
    }

    /// Whether the store holds nothing yet: no snapshot and no batch.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let meta = txn.open_table(META).map_err(err)?;
        let groups = txn.open_table(GROUPS).map_err(err)?;
        Ok(
            meta.get(SNAPSHOT_KEY).map_err(err)?.is_none()
                && groups.first().map_err(err)?.is_none(),
        )
    }

    /// The key the next group commit will get.
    pub fn next_group(&self) -> u64 {
        self.next_group.load(Relaxed)
    }

    /// Number of stored batches (kept as a counter: reading it costs nothing).
    pub fn batch_count(&self) -> Result<u64, StoreError> {
        Ok(self.stored.load(Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgetally_core::ProducerKey;

    fn id(n: u8) -> BatchId {
        BatchId {
            producer: ProducerKey([n; 32]),
            epoch: n as u64,
            seq: 1000 + n as u64,
        }
    }

    #[test]
    fn groups_round_trip_and_compact_partially() {
        let dir = std::env::temp_dir().join(format!("edgetally-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s.redb");
        let big = vec![7u8; 300];
        {
            let s = Store::open(&path, 1 << 20).expect("open");
            s.append(&[(id(1), b"one"), (id(2), &big)]).expect("append");
            s.append(&[(id(3), b"three")]).expect("append");
            let snap = edgetally_core::Replica::new().snapshot();
            assert_eq!(
                s.compact(&snap, |i| i.seq == 1001 || i.seq == 1003)
                    .expect("compact"),
                2
            );
            assert_eq!(s.batch_count().expect("count"), 1);
        }
        let s = Store::open(&path, 1 << 20).expect("reopen");
        let l = s.load().expect("load");
        assert_eq!(l.batches, vec![big.clone()]);
        let g = s.append(&[(id(4), b"four")]).expect("append after reopen");
        assert_eq!(
            s.load().expect("load").batches,
            vec![big.clone(), b"four".to_vec()]
        );
        let g2 = s.append(&[(id(5), b"five")]).expect("append");
        assert_eq!(g2, g + 1);
        // A key-range compaction through `g` drops every group up to it, unread.
        let snap = edgetally_core::Replica::new().snapshot();
        assert_eq!(s.compact_through(&snap, g).expect("compact"), 2);
        assert_eq!(s.load().expect("load").batches, vec![b"five".to_vec()]);
        assert_eq!(s.batch_count().expect("count"), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
