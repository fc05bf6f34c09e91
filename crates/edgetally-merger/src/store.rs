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
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::path::Path;

const BATCHES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("batches");
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
        txn.open_table(BATCHES).map_err(err)?;
        txn.open_table(META).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(Store { db })
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
        let table = txn.open_table(BATCHES).map_err(err)?;
        let mut batches = Vec::new();
        for row in table.iter().map_err(err)? {
            let (_, v) = row.map_err(err)?;
            batches.push(v.value().to_vec());
        }
        Ok(Loaded { snapshot, batches })
    }

    /// Appends batches in one transaction and returns once it is on disk (fsync).
    pub fn append(&self, items: &[(BatchId, &[u8])]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut t = txn.open_table(BATCHES).map_err(err)?;
            for (id, raw) in items {
                t.insert(&batch_key(id)[..], *raw).map_err(err)?;
            }
        }
        txn.commit().map_err(err)
    }

    /// Writes `snapshot` and deletes, in the same transaction, the stored batches for which
    /// `drop` is true (those the snapshot covers and replication no longer needs).
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
            let mut t = txn.open_table(BATCHES).map_err(err)?;
            let mut doomed = Vec::new();
            for row in t.iter().map_err(err)? {
                let (k, _) = row.map_err(err)?;
                if batch_id(k.value()).is_some_and(|id| drop(&id)) {
                    doomed.push(k.value().to_vec());
                }
            }
            for k in doomed {
                t.remove(&k[..]).map_err(err)?;
                removed += 1;
            }
        }
        txn.commit().map_err(err)?;
        Ok(removed)
    }

    /// Number of stored batches.
    pub fn batch_count(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(BATCHES).map_err(err)?;
        t.len().map_err(err)
    }
}
