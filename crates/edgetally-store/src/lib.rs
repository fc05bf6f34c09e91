//! Crash-safe storage: the batch log — every acked batch, as the producer's signed bytes, until
//! a snapshot covers it — in append-only segment files, and the latest state snapshot together
//! with the log's floor in redb.
//!
//! Why two parts. The batch log is written once per group commit and read only at start-up
//! (or by a compaction that must keep some records for peers), so it is an append-only file:
//! one `write` of the whole group and one `fdatasync` per commit, CRC-checked records, a new
//! segment at each compaction so that whole files are deleted once covered. Kept in redb (one
//! B-tree value per group), the same commit cost 4–6× more disk time and a sixth of the
//! merger's CPU: redb copies a value into freshly zeroed pages of its own cache, then writes
//! them and its allocator state, and a compaction had to rewrite or delete every group.
//! No crate we found offers a group-commit log with whole-file deletion behind a floor.
//!
//! The snapshot and the floor (the first group not covered by it) are one redb transaction:
//! redb is a single-file, pure-Rust B-tree store whose commits are atomic and fsynced, so a
//! crash leaves either the old snapshot with the old floor or the new one with the new floor,
//! never a mix. Segments below the floor are skipped at start-up and deleted.
//!
//! Record format (little-endian): `"ETLG" | len: u32 | group: u64 | crc32: u32 | body`, the CRC
//! over `len | group | body`; the body is the group's batches, each
//! `batch id (48 bytes) | varint length | the batch's signed bytes`. A record that fails its
//! checks ends its segment: that can only be a write that never completed (the process died
//! before its fsync, so it was not acked), because every process appends to a segment of its
//! own and a failed write makes the next commit start a new segment.

use edgetally_core::{BatchId, ProducerKey, Snapshot};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};

pub mod check;
mod segment;
mod snapshot;

use segment::*;
pub use segment::{batch_id, batch_key, Damage, DamageKind, Loaded};
pub(crate) use snapshot::read as read_snapshot;
pub use snapshot::{SnapshotFile, SnapshotWriter};

/// The batch log of versions before the segment log (one value per group); migrated at open.
const LEGACY_GROUPS: TableDefinition<u64, &[u8]> = TableDefinition::new("groups");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const SNAPSHOT_KEY: &str = "snapshot";
const FLOOR_KEY: &str = "log_floor";
/// One past the highest group known durable, written about once a second
/// ([`Store::mark_durable`]): a log that ends below it lost records at its end.
pub(crate) const DURABLE_KEY: &str = "log_durable";

const MAGIC: [u8; 4] = *b"ETLG";
const HEADER: usize = 20;
/// Records start at multiples of this many bytes (zero padding between them): the alignment
/// direct I/O needs of offsets, lengths and buffers.
const ALIGN: usize = 4096;

fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN).saturating_mul(ALIGN)
}
/// A segment takes new groups until it is this long (it is also closed at each compaction).
const SEGMENT_BYTES: u64 = 64 << 20;

/// A storage failure, by kind. Every operation of [`Store`] (and `edgetally check`) returns
/// it; the message names the file and what is wrong, and the source error is kept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file or directory operation failed (the disk is full, a permission, an I/O error).
    #[error("store: {}{error}", at(path))]
    Io {
        /// The file or directory, when known.
        path: Option<PathBuf>,
        /// What the operating system said.
        error: std::io::Error,
    },
    /// The pointer database (redb) failed.
    #[error("store: {}{error}", at(path))]
    Db {
        /// The database file, when known.
        path: Option<PathBuf>,
        /// What redb said.
        error: Box<redb::Error>,
    },
    /// Stored data is damaged or missing: the node does not start without it (the message
    /// says how `edgetally check --repair` salvages what is intact).
    #[error("store: {0}")]
    Damaged(String),
    /// A directory `edgetally check --repair` would overwrite.
    #[error("store: {0}")]
    NotEmpty(String),
    /// A group commit larger than one log record can hold (4 GiB).
    #[error("store: group commit larger than 4 GiB")]
    TooLarge,
}

/// `path: ` when there is one.
fn at(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!("{}: ", p.display()))
        .unwrap_or_default()
}

/// The failures [`err`] turns into a [`StoreError`].
pub(crate) trait Fail {
    fn fail(self) -> StoreError;
}

impl Fail for std::io::Error {
    fn fail(self) -> StoreError {
        StoreError::Io {
            path: None,
            error: self,
        }
    }
}

macro_rules! db_failures {
    ($($t:ty),*) => {$(
        impl Fail for $t {
            fn fail(self) -> StoreError {
                StoreError::Db {
                    path: None,
                    error: Box::new(self.into()),
                }
            }
        }
    )*};
}

db_failures!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub(crate) fn err(e: impl Fail) -> StoreError {
    e.fail()
}

/// An I/O failure on `path`.
pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |error| StoreError::Io {
        path: Some(path.to_path_buf()),
        error,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps a stored batch that does not decode or apply aside, under
/// `quarantine/<sha256 of its bytes>.batch` with the reason beside it in a `.reason` file,
/// so that one bad record never stops a node from starting and nothing is thrown away.
/// Since every check that can refuse a batch runs before it is written, a quarantined batch
/// means a bug or damage that the record checksums did not catch; it is logged and counted
/// (`edgetally_quarantined_batches`, `/v1/status`).
pub fn quarantine(data_dir: &Path, raw: &[u8], reason: &str) -> Result<PathBuf, StoreError> {
    use sha2::{Digest as _, Sha256};
    let dir = data_dir.join("quarantine");
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let name: String = Sha256::digest(raw)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = dir.join(format!("{name}.batch"));
    std::fs::write(&path, raw).map_err(io(&path))?;
    let why = dir.join(format!("{name}.reason"));
    std::fs::write(&why, format!("{reason}\n")).map_err(io(&why))?;
    Ok(path)
}

/// The limits stored batches are replayed with: the configured ones may have been lowered
/// since a batch was acked, and nothing acked may be lost to that.
pub fn replay_limits(limits: &edgetally_core::Limits) -> edgetally_core::Limits {
    edgetally_core::Limits {
        max_payload_bytes: usize::MAX,
        max_summaries: usize::MAX,
        max_categories: usize::MAX,
        max_entities: usize::MAX,
        ..*limits
    }
}

/// The node's storage.
#[derive(Debug)]
pub struct Store {
    db: Database,
    dir: PathBuf,
    log: Mutex<Log>,
    /// Serialises compactions (appends go on meanwhile).
    compaction: Mutex<()>,
    stored: AtomicU64,
    /// What `open` read, handed to the first `load`.
    loaded: Mutex<Option<Vec<Vec<u8>>>>,
    /// Torn tails found at open (reported in `/v1/status` and the metrics).
    torn: Vec<Damage>,
    torn_bytes: u64,
    /// The durable mark last written.
    marked: AtomicU64,
    /// The data directory (snapshot files live there).
    root: PathBuf,
    /// The number the next snapshot file gets.
    next_snapshot: AtomicU64,
    /// The number of the snapshot file redb names (0: none); changed under `compaction`.
    named_snapshot: AtomicU64,
}

impl Store {
    /// Opens (or creates) the store in `dir`: `edgetally.redb` (snapshot, floor) with a page
    /// cache of `cache_bytes` (redb's own default is 1 GiB), and the segments in `dir/log`.
    /// Reads every live record (handed to [`Store::load`]) and starts a new segment.
    // Long by design: start-up's steps in their order (lock, redb, legacy migration, segment
    // scan, damage classification, floor, deletion); the order is the recovery argument of
    // docs/design/storage.md, and each failure names its file.
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<Store, StoreError> {
        let log_dir = dir.join("log");
        let db_path = dir.join("edgetally.redb");
        if !db_path.exists() && list_segments(&log_dir).is_ok_and(|s| !s.is_empty()) {
            // The snapshot and the floor are gone, the log is not: starting would serve the
            // log's batches alone as if they were everything.
            return Err(StoreError::Damaged(format!(
                "{} is missing but {} holds log segments: the snapshot they build on is gone. \
                 Restore the file, or salvage what is left with `edgetally check --data-dir {} --repair OUT`",
                db_path.display(),
                log_dir.display(),
                dir.display()
            )));
        }
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(&db_path)
            .map_err(|e| StoreError::Db {
                path: Some(db_path.clone()),
                error: Box::new(e.into()),
            })?;
        std::fs::create_dir_all(&log_dir).map_err(io(&log_dir))?;
        {
            // Creates the table on a new store, so readers never meet its absence.
            let txn = db.begin_write().map_err(err)?;
            txn.open_table(META).map_err(err)?;
            txn.commit().map_err(err)?;
        }
        let (floor, legacy, has_snapshot, durable, named) = {
            let txn = db.begin_read().map_err(err)?;
            let meta = txn.open_table(META).map_err(err)?;
            let floor = read_floor(&meta, &db_path)?;
            let durable = read_u64(&meta, DURABLE_KEY, &db_path)?;
            // 0: no snapshot file (their numbers start at 1).
            let named = read_u64(&meta, snapshot::FILE_KEY, &db_path)?;
            let has_snapshot = named > 0 || meta.get(SNAPSHOT_KEY).map_err(err)?.is_some();
            let mut legacy = Vec::new();
            match txn.open_table(LEGACY_GROUPS) {
                Ok(t) => {
                    for row in t.iter().map_err(err)? {
                        let (_, v) = row.map_err(err)?;
                        for rec in records(v.value()) {
                            match rec {
                                Ok((id, raw)) => legacy.push((id, raw.to_vec())),
                                Err(e) => tracing::warn!("{e}"),
                            }
                        }
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(err(e)),
            }
            (floor, legacy, has_snapshot, durable, named)
        };
        let mut segments = list_segments(&log_dir)?;
        if !has_snapshot && (floor > 0 || segments.first().is_some_and(|&s| s > 0)) {
            return Err(StoreError::Damaged(format!(
                "{} holds no snapshot, but the log {} starts past group 0 (floor {floor}, first segment {}): \
                 the snapshot that covered the earlier groups is gone. Salvage what is left with \
                 `edgetally check --data-dir {} --repair OUT`",
                db_path.display(),
                log_dir.display(),
                segments.first().copied().unwrap_or(0),
                dir.display()
            )));
        }
        let mut groups = BTreeMap::new();
        let mut batches = Vec::new();
        let found = scan(&log_dir, &segments, floor, |group, body| {
            let mut n = 0;
            for rec in records(body) {
                match rec {
                    Ok((_, raw)) => {
                        batches.push(raw.to_vec());
                        n += 1;
                    }
                    Err(e) => tracing::warn!(group, "{e}"),
                }
            }
            *groups.entry(group).or_insert(0) += n;
        })?;
        if let Some(d) = found.damage.iter().find(|d| d.kind == DamageKind::Corrupt) {
            return Err(StoreError::Damaged(format!(
                "damaged batch log: {d}. Refusing to start without those batches; \
                 `edgetally check --data-dir {} --repair OUT` salvages every intact batch into OUT",
                dir.display()
            )));
        }
        if let Some((from, to)) = first_gap(floor, &groups) {
            return Err(StoreError::Damaged(format!(
                "the batch log in {} lacks groups {from}..{to} (a segment file or record is gone). \
                 `edgetally check --data-dir {} --repair OUT` salvages every intact batch into OUT",
                log_dir.display(),
                dir.display()
            )));
        }
        let ends = found.max.map_or(floor, |m| floor.max(m + 1));
        if ends < durable {
            let newest = segments
                .iter()
                .rev()
                .find(|&&f| found.max.is_none_or(|m| f <= m))
                .map_or_else(|| log_dir.clone(), |&f| segment_path(&log_dir, f));
            return Err(StoreError::Damaged(format!(
                "the batch log ends before group {ends} (last segment {}), but groups up to {} \
                 were durable: records at the end of the log are gone (truncated or deleted). \
                 `edgetally check --data-dir {} --repair OUT` salvages every intact batch into OUT",
                newest.display(),
                durable - 1,
                dir.display()
            )));
        }
        for d in &found.damage {
            tracing::warn!("{d}: ignored, kept on disk");
        }
        // Names stay in group order and no file that holds anything is ever truncated: a
        // segment with no intact record (a first commit cut short) is moved aside, kept.
        for &first in &found.unreadable {
            let from = segment_path(&log_dir, first);
            let to = log_dir.join(format!("{first:020}.seg.torn"));
            std::fs::rename(&from, &to).map_err(io(&from))?;
            segments.retain(|&s| s != first);
        }
        let next_group = found.max.map_or(floor, |m| floor.max(m + 1));
        // A file already named `next_group` is empty (else it held an intact record, and
        // `max` would be at least its name, or it was moved aside above): reused.
        let path = segment_path(&log_dir, next_group);
        let file = create_segment(&path).map_err(io(&path))?;
        segments.retain(|&s| s < next_group);
        segments.push(next_group);
        let stored = groups.values().sum();
        let mut log = Log {
            file,
            current: next_group,
            len: 0,
            poisoned: false,
            next_group,
            floor,
            segments,
            groups,
            scratch: Vec::new(),
        };
        sync_dir(&log_dir)?;
        // Left over from a compaction cut short after its floor was written.
        for first in log.take_covered() {
            let _ = std::fs::remove_file(segment_path(&log_dir, first));
        }
        let torn_bytes = found
            .damage
            .iter()
            .filter(|d| d.kind == DamageKind::TornTail)
            .map(|d| d.len)
            .sum();
        // Snapshot files redb does not name: written but never committed, or replaced.
        let mut newest = named;
        for (n, path) in snapshot::list(dir)? {
            newest = newest.max(n);
            if n != named || path.extension().is_some_and(|e| e == "tmp") {
                let _ = std::fs::remove_file(&path);
            }
        }
        let store = Store {
            root: dir.to_path_buf(),
            next_snapshot: AtomicU64::new(newest + 1),
            named_snapshot: AtomicU64::new(named),
            db,
            dir: log_dir,
            log: Mutex::new(log),
            compaction: Mutex::new(()),
            stored: AtomicU64::new(stored),
            loaded: Mutex::new(Some(batches)),
            torn: found.damage,
            torn_bytes,
            marked: AtomicU64::new(durable),
        };
        if store.legacy_table_exists()? {
            // Written to the log first, then dropped from redb: a crash in between stores
            // them twice, which replay absorbs (the seen-set counts each batch once).
            let items: Vec<(BatchId, &[u8])> = legacy
                .iter()
                .map(|(id, raw)| (*id, raw.as_slice()))
                .collect();
            if !items.is_empty() {
                store.append(&items)?;
            }
            if let Some(l) = lock(&store.loaded).as_mut() {
                l.extend(legacy.into_iter().map(|(_, raw)| raw));
            }
            let txn = store.db.begin_write().map_err(err)?;
            txn.delete_table(LEGACY_GROUPS).map_err(err)?;
            txn.commit().map_err(err)?;
        }
        Ok(store)
    }

    fn legacy_table_exists(&self) -> Result<bool, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        match txn.open_table(LEGACY_GROUPS) {
            Ok(_) => Ok(true),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    /// Reads the snapshot and the stored batches.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let snapshot = self.snapshot()?;
        let batches = match lock(&self.loaded).take() {
            Some(b) => b,
            None => {
                let (segments, floor) = {
                    let log = lock(&self.log);
                    (log.segments.clone(), log.floor)
                };
                let mut batches = Vec::new();
                scan(&self.dir, &segments, floor, |_, body| {
                    batches.extend(
                        records(body)
                            .filter_map(Result::ok)
                            .map(|(_, r)| r.to_vec()),
                    )
                })?;
                batches
            }
        };
        Ok(Loaded { snapshot, batches })
    }

    fn snapshot(&self) -> Result<Option<Snapshot>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let meta = txn.open_table(META).map_err(err)?;
        snapshot::read(&meta, &self.root)?
            .transpose()
            .map_err(StoreError::Damaged)
    }

    /// Where the current snapshot is: its file, or `edgetally.redb` (none yet, or one an
    /// older version kept inline) — for error messages.
    pub fn snapshot_location(&self) -> PathBuf {
        match self.named_snapshot.load(Relaxed) {
            0 => self.root.join("edgetally.redb"),
            n => snapshot::path(&self.root, n),
        }
    }

    /// Starts writing a snapshot file. Call it under the lock that orders the states being
    /// snapshotted (the replica's): numbers are taken in that order, and a compaction never
    /// replaces a snapshot with one of a lower number.
    pub fn begin_snapshot(&self) -> Result<SnapshotWriter, StoreError> {
        SnapshotWriter::create(&self.root, self.next_snapshot.fetch_add(1, Relaxed))
    }

    /// Writes `snapshot` as the store's snapshot, keeping every stored batch.
    pub fn save_snapshot_value(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let mut w = self.begin_snapshot()?;
        w.snapshot(snapshot)?;
        self.save_snapshot(w.finish()?).map(|_| ())
    }

    /// Appends batches as one group record and returns once it is on disk (fdatasync).
    /// Returns the group's number (numbers increase).
    pub fn append(&self, items: &[(BatchId, &[u8])]) -> Result<u64, StoreError> {
        let mut guard = lock(&self.log);
        let log = &mut *guard;
        if log.poisoned || log.len >= SEGMENT_BYTES {
            log.roll(&self.dir)?;
        }
        // The number is used up only once the record is durable: a failed write leaves no
        // gap in the group numbers (the start-up check reads a gap as a lost record).
        let group = log.next_group;
        // The record is built at an ALIGN-aligned offset of the buffer and zero-padded to a
        // multiple of ALIGN, so it can be written with direct I/O as it stands. Room for all of
        // it is reserved first (a varint takes at most 10 bytes), so the buffer stays put.
        let most: usize = items.iter().map(|(_, raw)| 48 + 10 + raw.len()).sum();
        let buf = &mut log.scratch;
        buf.clear();
        buf.reserve(align_up(HEADER + most) + ALIGN);
        let off = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        buf.resize(off + HEADER, 0);
        for (id, raw) in items {
            push_record(buf, id, raw);
        }
        let body_len = buf.len() - off - HEADER;
        let len = u32::try_from(body_len).map_err(|_| StoreError::TooLarge)?;
        let padded = align_up(HEADER + body_len);
        buf.resize(off + padded, 0);
        let rec = &mut buf[off..];
        rec[..4].copy_from_slice(&MAGIC);
        rec[4..8].copy_from_slice(&len.to_le_bytes());
        rec[8..16].copy_from_slice(&group.to_le_bytes());
        let sum = crc(&rec[4..16], &rec[HEADER..HEADER + body_len]);
        rec[16..20].copy_from_slice(&sum.to_le_bytes());
        if let Err(e) = log.file.write_all(rec).and_then(|()| log.file.sync_data()) {
            log.poisoned = true;
            return Err(err(e));
        }
        log.next_group += 1;
        log.len += padded as u64;
        log.groups.insert(group, items.len() as u64);
        // A commit of a few hundred batches: give back an unusually large buffer.
        if buf.capacity() > 64 << 20 {
            *buf = Vec::new();
        }
        self.stored.fetch_add(items.len() as u64, Relaxed);
        Ok(group)
    }

    /// Whether a snapshot file of a later state is already named (call under `compaction`).
    fn superseded(&self, file: &SnapshotFile) -> bool {
        file.n <= self.named_snapshot.load(Relaxed)
    }

    /// Names `file` as the snapshot (and sets `floor`, if given) in one transaction, then
    /// deletes the snapshot files it replaces. Call under `compaction`, after `superseded`.
    fn write_meta(&self, mut file: SnapshotFile, floor: Option<u64>) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut meta = txn.open_table(META).map_err(err)?;
            meta.insert(snapshot::FILE_KEY, &file.n.to_le_bytes()[..])
                .map_err(err)?;
            // Written by an older version: the file replaces it.
            meta.remove(SNAPSHOT_KEY).map_err(err)?;
            if let Some(f) = floor {
                meta.insert(FLOOR_KEY, &f.to_le_bytes()[..]).map_err(err)?;
            }
        }
        txn.commit().map_err(err)?;
        file.named = true;
        self.named_snapshot.store(file.n, Relaxed);
        // Files still being written have higher numbers and are left alone.
        for (n, path) in snapshot::list(&self.root).unwrap_or_default() {
            if n < file.n && path.extension().is_some_and(|e| e == "etsn") {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(())
    }

    /// Raises the floor in memory and deletes the segments it covers.
    fn raise_floor(&self, floor: u64) -> u64 {
        let (gone, doomed) = {
            let mut log = lock(&self.log);
            log.floor = log.floor.max(floor);
            (log.forget_below_floor(), log.take_covered())
        };
        for first in &doomed {
            let _ = std::fs::remove_file(segment_path(&self.dir, *first));
        }
        if !doomed.is_empty() {
            let _ = sync_dir(&self.dir);
        }
        self.stored.fetch_sub(gone, Relaxed);
        gone
    }

    /// Names `snapshot` as the store's snapshot, keeping every stored batch. `false`: a
    /// snapshot of a later state was named meanwhile, and this one is dropped.
    pub fn save_snapshot(&self, snapshot: SnapshotFile) -> Result<bool, StoreError> {
        let _c = lock(&self.compaction);
        if self.superseded(&snapshot) {
            return Ok(false);
        }
        self.write_meta(snapshot, None)?;
        Ok(true)
    }

    /// Writes `snapshot` and drops the stored batches for which `drop` is true (those the
    /// snapshot covers and replication no longer needs); the others are copied into a new
    /// segment first. Returns how many were dropped; `None`: a snapshot of a later state was
    /// named meanwhile, and nothing was done.
    pub fn compact(
        &self,
        snapshot: SnapshotFile,
        drop: impl Fn(u64, &BatchId) -> bool,
    ) -> Result<Option<usize>, StoreError> {
        let _c = lock(&self.compaction);
        if self.superseded(&snapshot) {
            return Ok(None);
        }
        let (old, floor, new_first) = {
            let mut log = lock(&self.log);
            if log.len > 0 || log.poisoned {
                log.roll(&self.dir)?;
            }
            let n = log.segments.len() - 1;
            (log.segments[..n].to_vec(), log.floor, log.current)
        };
        let mut kept: Vec<(BatchId, Vec<u8>)> = Vec::new();
        let mut dropped = 0usize;
        scan(&self.dir, &old, floor, |group, body| {
            for (id, raw) in records(body).filter_map(Result::ok) {
                if drop(group, &id) {
                    dropped += 1;
                } else {
                    kept.push((id, raw.to_vec()));
                }
            }
        })?;
        if !kept.is_empty() {
            let items: Vec<(BatchId, &[u8])> =
                kept.iter().map(|(id, raw)| (*id, raw.as_slice())).collect();
            self.append(&items)?;
        }
        self.write_meta(snapshot, Some(new_first))?;
        self.raise_floor(new_first);
        Ok(Some(dropped))
    }

    /// Writes `snapshot` and drops every group up to and including `through` — for when the
    /// snapshot covers all of them and replication needs none: nothing is read, whole
    /// segments are deleted. Returns how many batches were dropped (`None`: superseded, as
    /// for [`Store::compact`]).
    pub fn compact_through(
        &self,
        snapshot: SnapshotFile,
        through: u64,
    ) -> Result<Option<usize>, StoreError> {
        let _c = lock(&self.compaction);
        if self.superseded(&snapshot) {
            return Ok(None);
        }
        let floor = through.saturating_add(1);
        {
            let mut log = lock(&self.log);
            if log.current < floor && (log.len > 0 || log.poisoned) {
                log.roll(&self.dir)?;
            }
        }
        self.write_meta(snapshot, Some(floor))?;
        Ok(Some(self.raise_floor(floor) as usize))
    }

    /// Whether the store holds nothing yet: no snapshot and no batch.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.snapshot()?.is_none() && lock(&self.log).groups.is_empty())
    }

    /// The number the next group commit will get.
    pub fn next_group(&self) -> u64 {
        lock(&self.log).next_group
    }

    /// Records how far the log is durable (one past the last group written), if that moved
    /// since the last call: one small redb transaction. Called about once a second, so a log
    /// that later ends below the mark — the tail of the newest segment truncated or deleted
    /// — is refused at start-up instead of served short. (Records written in the last
    /// second before such damage are not covered: their loss looks like a crash.)
    pub fn mark_durable(&self) -> Result<(), StoreError> {
        let next = lock(&self.log).next_group;
        if next <= self.marked.load(Relaxed) {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut meta = txn.open_table(META).map_err(err)?;
            meta.insert(DURABLE_KEY, &next.to_le_bytes()[..])
                .map_err(err)?;
        }
        txn.commit().map_err(err)?;
        self.marked.fetch_max(next, Relaxed);
        Ok(())
    }

    /// The torn tails found at open: stretches at the end of segments that hold no intact
    /// record (commits cut short, never acknowledged), kept on disk and reported.
    pub fn torn_tails(&self) -> (&[Damage], u64) {
        (&self.torn, self.torn_bytes)
    }

    /// Number of stored batches (kept as a counter: reading it costs nothing).
    pub fn batch_count(&self) -> Result<u64, StoreError> {
        Ok(self.stored.load(Relaxed))
    }

    /// Number of segment files.
    #[cfg(test)]
    fn segment_count(&self) -> usize {
        lock(&self.log).segments.len()
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

    fn tmp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("edgetally-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    fn empty_snapshot(s: &Store) -> SnapshotFile {
        snapshot_of(s, &edgetally_core::Replica::new())
    }

    fn snapshot_of(s: &Store, r: &edgetally_core::Replica) -> SnapshotFile {
        let mut w = s.begin_snapshot().expect("begin");
        w.replica(r).expect("write");
        w.finish().expect("finish")
    }

    #[test]
    fn groups_round_trip_and_compact_partially() {
        let dir = tmp("roundtrip");
        let big = vec![7u8; 300];
        {
            let s = Store::open(&dir, 1 << 20).expect("open");
            s.append(&[(id(1), b"one"), (id(2), &big)]).expect("append");
            s.append(&[(id(3), b"three")]).expect("append");
            assert_eq!(
                s.compact(empty_snapshot(&s), |_, i| i.seq == 1001 || i.seq == 1003)
                    .expect("compact"),
                Some(2)
            );
            assert_eq!(s.batch_count().expect("count"), 1);
        }
        let s = Store::open(&dir, 1 << 20).expect("reopen");
        let l = s.load().expect("load");
        assert!(l.snapshot.is_some());
        assert_eq!(l.batches, vec![big.clone()]);
        let g = s.append(&[(id(4), b"four")]).expect("append after reopen");
        assert_eq!(
            s.load().expect("load").batches,
            vec![big.clone(), b"four".to_vec()]
        );
        let g2 = s.append(&[(id(5), b"five")]).expect("append");
        assert_eq!(g2, g + 1);
        // Through `g`: every group up to it goes, unread, and whole segments are deleted.
        assert_eq!(
            s.compact_through(empty_snapshot(&s), g).expect("compact"),
            Some(2)
        );
        assert_eq!(s.load().expect("load").batches, vec![b"five".to_vec()]);
        assert_eq!(s.batch_count().expect("count"), 1);
        assert!(s.segment_count() <= 2, "{} segments", s.segment_count());
        drop(s);
        let s = Store::open(&dir, 1 << 20).expect("reopen");
        assert_eq!(s.load().expect("load").batches, vec![b"five".to_vec()]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A commit cut short (the process died between `write` and the end of its fsync) leaves
    /// a partial record: start-up keeps every complete record before it, and new commits go
    /// to a new segment so nothing is ever appended after damage.
    #[test]
    fn a_torn_tail_is_ignored_and_everything_before_it_kept() {
        let dir = tmp("torn");
        let seg = {
            let s = Store::open(&dir, 1 << 20).expect("open");
            s.append(&[(id(1), b"one")]).expect("append");
            s.append(&[(id(2), b"two"), (id(3), b"three")])
                .expect("append");
            let first = lock(&s.log).current;
            segment_path(&dir.join("log"), first)
        };
        let full = std::fs::read(&seg).expect("read");
        // Records start at multiples of ALIGN: the second one at ALIGN, 126 bytes long.
        assert_eq!(full.len(), 2 * ALIGN);
        assert_eq!(full[ALIGN..ALIGN + 4], MAGIC);
        for cut in [ALIGN + 1, ALIGN + 19, ALIGN + 60, ALIGN + 125] {
            std::fs::write(&seg, &full[..cut]).expect("truncate");
            let s = Store::open(&dir, 1 << 20).expect("open after tear");
            assert_eq!(s.load().expect("load").batches, vec![b"one".to_vec()]);
            assert_eq!(s.batch_count().expect("count"), 1);
        }
        // A flipped bit in the body fails the CRC the same way.
        let mut bad = full.clone();
        bad[ALIGN + HEADER + 50] ^= 0x40;
        std::fs::write(&seg, &bad).expect("write");
        let s = Store::open(&dir, 1 << 20).expect("open after flip");
        assert_eq!(s.load().expect("load").batches, vec![b"one".to_vec()]);
        s.append(&[(id(4), b"four")]).expect("append after damage");
        drop(s);
        let s = Store::open(&dir, 1 << 20).expect("reopen");
        assert_eq!(
            s.load().expect("load").batches,
            vec![b"one".to_vec(), b"four".to_vec()]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A compaction that wrote its floor but died before deleting the covered segments: they
    /// are skipped at start-up, then deleted.
    #[test]
    fn segments_below_the_floor_are_skipped_and_removed() {
        let dir = tmp("floor");
        let log_dir = dir.join("log");
        let stale = {
            let s = Store::open(&dir, 1 << 20).expect("open");
            s.append(&[(id(1), b"one")]).expect("append");
            let first = lock(&s.log).current;
            let g = s.append(&[(id(2), b"two")]).expect("append");
            let stale = std::fs::read(segment_path(&log_dir, first)).expect("read");
            s.compact_through(empty_snapshot(&s), g).expect("compact");
            assert!(!segment_path(&log_dir, first).exists());
            s.append(&[(id(3), b"three")]).expect("append");
            (first, stale)
        };
        std::fs::write(segment_path(&log_dir, stale.0), &stale.1).expect("resurrect");
        let s = Store::open(&dir, 1 << 20).expect("reopen");
        assert_eq!(s.load().expect("load").batches, vec![b"three".to_vec()]);
        assert!(!segment_path(&log_dir, stale.0).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Data directories of versions that kept the batch log in redb are migrated at open.
    #[test]
    fn the_legacy_redb_batch_log_is_migrated() {
        let dir = tmp("legacy");
        {
            let db = Database::create(dir.join("edgetally.redb")).expect("db");
            let txn = db.begin_write().expect("txn");
            {
                let mut t = txn.open_table(LEGACY_GROUPS).expect("table");
                let mut v = Vec::new();
                push_record(&mut v, &id(1), b"one");
                push_record(&mut v, &id(2), b"two");
                t.insert(0, &v[..]).expect("insert");
            }
            txn.commit().expect("commit");
        }
        {
            let s = Store::open(&dir, 1 << 20).expect("open");
            assert_eq!(
                s.load().expect("load").batches,
                vec![b"one".to_vec(), b"two".to_vec()]
            );
        }
        let s = Store::open(&dir, 1 << 20).expect("reopen");
        assert_eq!(
            s.load().expect("load").batches,
            vec![b"one".to_vec(), b"two".to_vec()]
        );
        let txn = s.db.begin_read().expect("read");
        assert!(
            txn.open_table(LEGACY_GROUPS).is_err(),
            "legacy table dropped"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn damaged_bodies_never_panic() {
        let mut v = Vec::new();
        push_record(&mut v, &id(1), b"one");
        for cut in 0..v.len() {
            let _ = records(&v[..cut]).count();
        }
        let mut huge = batch_key(&id(1)).to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert!(records(&huge).all(|r| matches!(r, Err(StoreError::Damaged(_)))));
        for cut in 0..40 {
            let mut seg = vec![0u8; cut];
            seg[..cut.min(4)].copy_from_slice(&MAGIC[..cut.min(4)]);
            assert!(parse_segment(&seg).records.is_empty());
        }
    }

    /// Three groups in one segment; returns the segment's path and bytes.
    fn three_groups(dir: &Path) -> (PathBuf, Vec<u8>) {
        let s = Store::open(dir, 1 << 20).expect("open");
        s.append(&[(id(1), b"one")]).expect("append");
        s.append(&[(id(2), b"two")]).expect("append");
        s.append(&[(id(3), b"three")]).expect("append");
        let current = lock(&s.log).current;
        let path = segment_path(&dir.join("log"), current);
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(bytes.len(), 3 * ALIGN);
        (path, bytes)
    }

    /// Damage to a record that intact records follow is damage to acknowledged data: the
    /// store refuses to open and names the file and the offset; the records after it are
    /// still read (a scan resumes at the next aligned offset).
    #[test]
    fn damage_before_intact_records_refuses_to_open_and_names_file_and_offset() {
        for (what, at) in [
            ("flip", ALIGN + HEADER + 50),
            ("magic", ALIGN),
            ("len", ALIGN + 5),
        ] {
            let dir = tmp(&format!("corrupt-{what}"));
            let (seg, mut bytes) = three_groups(&dir);
            bytes[at] ^= 0x40;
            std::fs::write(&seg, &bytes).expect("write");
            let e = Store::open(&dir, 1 << 20).expect_err("must refuse");
            assert!(matches!(e, StoreError::Damaged(_)), "{e:?}");
            let e = e.to_string();
            assert!(e.contains(&seg.display().to_string()), "{e}");
            assert!(e.contains(&format!("offset {ALIGN}")), "{e}");
            let parsed = parse_segment(&bytes);
            let groups: Vec<u64> = parsed.records.iter().map(|r| r.0).collect();
            assert_eq!(
                groups,
                vec![0, 2],
                "{what}: the record after the damage is kept"
            );
            assert_eq!(parsed.corrupt, vec![(ALIGN, 2 * ALIGN)]);
            assert_eq!(parsed.torn_tail, None);
            // Nothing was changed on disk by the refusal.
            assert_eq!(std::fs::read(&seg).expect("read"), bytes);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// A newest segment whose first record is damaged is never truncated: it is moved
    /// aside (kept), reported as a torn tail, and the next commit reuses its group number.
    #[test]
    fn an_unreadable_newest_segment_is_kept_not_truncated() {
        let dir = tmp("unreadable");
        let log_dir = dir.join("log");
        let seg = {
            let s = Store::open(&dir, 1 << 20).expect("open");
            s.append(&[(id(1), b"one")]).expect("append");
            drop(s);
            let s = Store::open(&dir, 1 << 20).expect("reopen");
            s.append(&[(id(2), b"two")]).expect("append");
            let current = lock(&s.log).current;
            segment_path(&log_dir, current)
        };
        let mut bytes = std::fs::read(&seg).expect("read");
        bytes[HEADER + 10] ^= 1;
        std::fs::write(&seg, &bytes).expect("write");
        let s = Store::open(&dir, 1 << 20).expect("a torn newest segment opens");
        assert_eq!(s.load().expect("load").batches, vec![b"one".to_vec()]);
        let (torn, n) = s.torn_tails();
        assert_eq!((torn.len(), n), (1, ALIGN as u64));
        let aside = log_dir.join(format!(
            "{}.torn",
            seg.file_name().expect("name").to_string_lossy()
        ));
        assert_eq!(std::fs::read(&aside).expect("kept aside"), bytes);
        assert_eq!(s.append(&[(id(3), b"three")]).expect("append"), 1);
        drop(s);
        let s = Store::open(&dir, 1 << 20).expect("reopen");
        assert_eq!(
            s.load().expect("load").batches,
            vec![b"one".to_vec(), b"three".to_vec()]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A segment file that is gone (or zero-filled, which reads as no records) leaves a gap
    /// in the group numbers: the store refuses to open.
    #[test]
    fn a_missing_or_zeroed_segment_is_detected() {
        for zero in [false, true] {
            let dir = tmp(&format!("gap-{zero}"));
            let log_dir = dir.join("log");
            let middle = {
                let mut firsts = Vec::new();
                for n in 1..=3u8 {
                    let s = Store::open(&dir, 1 << 20).expect("open");
                    s.append(&[(id(n), b"x")]).expect("append");
                    firsts.push(lock(&s.log).current);
                }
                firsts[1]
            };
            let path = segment_path(&log_dir, middle);
            if zero {
                let len = std::fs::metadata(&path).expect("meta").len();
                std::fs::write(&path, vec![0u8; len as usize]).expect("zero");
            } else {
                std::fs::remove_file(&path).expect("remove");
            }
            let e = Store::open(&dir, 1 << 20).expect_err("a gap");
            assert!(matches!(e, StoreError::Damaged(_)), "{e:?}");
            let e = e.to_string();
            assert!(e.contains("lacks groups 1..2"), "{e}");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// The snapshot is checksummed, and a log without the snapshot it builds on is refused.
    #[test]
    fn a_damaged_or_missing_snapshot_is_detected() {
        let dir = tmp("snapshot");
        {
            let s = Store::open(&dir, 1 << 20).expect("open");
            let g = s.append(&[(id(1), b"one")]).expect("append");
            s.compact_through(empty_snapshot(&s), g).expect("compact");
            s.append(&[(id(2), b"two")]).expect("append");
        }
        // A flipped bit inside the snapshot file (found by its checksum).
        let files = snapshot::list(&dir).expect("list");
        assert_eq!(files.len(), 1, "{files:?}");
        let path = files[0].1.clone();
        let mut v = std::fs::read(&path).expect("read");
        let last = v.len() - 1;
        v[last] ^= 1;
        std::fs::write(&path, &v).expect("write");
        let s = Store::open(&dir, 1 << 20).expect("open");
        let e = s.load().expect_err("checksum");
        assert!(matches!(e, StoreError::Damaged(_)), "{e:?}");
        let e = e.to_string();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        assert!(e.contains("checksum") && e.contains(&name), "{e}");
        drop(s);
        // Zeroed from its start (no magic): refused by name, never read as bare postcard.
        std::fs::write(&path, vec![0u8; v.len()]).expect("zero");
        let s = Store::open(&dir, 1 << 20).expect("open");
        let e = s.load().expect_err("zeroed");
        assert!(matches!(e, StoreError::Damaged(_)), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("header damaged") && e.contains(&name), "{e}");
        drop(s);
        // The file redb names is gone: refused, naming it.
        std::fs::remove_file(&path).expect("remove");
        let s = Store::open(&dir, 1 << 20).expect("open");
        let e = s.load().expect_err("missing file");
        assert!(matches!(e, StoreError::Damaged(_)), "{e:?}");
        let e = e.to_string();
        assert!(e.contains(&name) && e.contains("current snapshot"), "{e}");
        drop(s);
        std::fs::remove_file(dir.join("edgetally.redb")).expect("remove");
        let e = Store::open(&dir, 1 << 20).expect_err("missing");
        assert!(matches!(e, StoreError::Damaged(_)), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("is missing") && e.contains("--repair"), "{e}");
        assert!(!dir.join("edgetally.redb").exists(), "nothing created");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Two compactions racing: the snapshot taken later (a higher number) wins whatever order
    /// they commit in, the loser's file is deleted, and stray files are cleared at open.
    #[test]
    fn a_snapshot_never_replaces_a_later_one() {
        use edgetally_core::{BatchId, LogEntry, Replica};
        let dir = tmp("superseded");
        let s = Store::open(&dir, 1 << 20).expect("open");
        let mut r = Replica::new();
        let older = snapshot_of(&s, &r);
        let mut b = edgetally_proto::BatchBuilder::new(1000).expect("width");
        b.record("c", None, 1_700_000_000_000, 2.5).expect("record");
        let signer = edgetally_proto::Signer::from_seed([3; 32]);
        let batch = b.finish(
            BatchId {
                producer: signer.producer(),
                epoch: 1,
                seq: 0,
            },
            1_700_000_000_000,
        );
        r.apply(LogEntry {
            batch: std::sync::Arc::new(batch),
            raw: std::sync::Arc::from(&[][..]),
        })
        .expect("apply");
        let newer = snapshot_of(&s, &r);
        let (older_path, newer_path) =
            (snapshot::path(&dir, older.n), snapshot::path(&dir, newer.n));
        assert!(s.save_snapshot(newer).expect("save"));
        assert_eq!(s.compact(older, |_, _| true).expect("compact"), None);
        assert!(!older_path.exists() && newer_path.exists());
        assert_eq!(
            s.load().expect("load").snapshot.expect("snapshot"),
            r.snapshot()
        );
        // A crash between writing a file and naming it leaves a stray: cleared at open.
        let stray = s.begin_snapshot().expect("begin");
        std::mem::forget(stray);
        let mut w = s.begin_snapshot().expect("begin");
        w.replica(&Replica::new()).expect("write");
        let unnamed = w.finish().expect("finish");
        let unnamed_path = snapshot::path(&dir, unnamed.n);
        std::mem::forget(unnamed);
        drop(s);
        assert_eq!(snapshot::list(&dir).expect("list").len(), 3);
        let s = Store::open(&dir, 1 << 20).expect("reopen");
        assert_eq!(
            snapshot::list(&dir).expect("list"),
            vec![(snapshot::path_number(&newer_path), newer_path.clone())]
        );
        assert!(!unnamed_path.exists());
        assert_eq!(
            s.load().expect("load").snapshot.expect("snapshot"),
            r.snapshot()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A data directory whose snapshot an older version kept inline in redb still opens; the
    /// next compaction moves it to a file and drops the inline value.
    #[test]
    fn an_inline_snapshot_from_an_older_version_still_loads() {
        let dir = tmp("inline");
        let want = edgetally_core::Replica::new().snapshot();
        {
            let s = Store::open(&dir, 1 << 20).expect("open");
            drop(s);
            let db = Database::create(dir.join("edgetally.redb")).expect("db");
            let txn = db.begin_write().expect("txn");
            {
                let mut meta = txn.open_table(META).expect("meta");
                // The old stored form: "ETSN" | 1 | SHA-256 | postcard.
                let body = want.encode();
                let mut v = b"ETSN\x01".to_vec();
                use sha2::Digest as _;
                v.extend_from_slice(&sha2::Sha256::digest(&body));
                v.extend_from_slice(&body);
                meta.insert(SNAPSHOT_KEY, &v[..]).expect("insert");
            }
            txn.commit().expect("commit");
        }
        let s = Store::open(&dir, 1 << 20).expect("open");
        assert_eq!(s.load().expect("load").snapshot, Some(want.clone()));
        s.save_snapshot(empty_snapshot(&s)).expect("save");
        drop(s);
        let db = Database::create(dir.join("edgetally.redb")).expect("db");
        let txn = db.begin_read().expect("txn");
        let meta = txn.open_table(META).expect("meta");
        assert!(meta.get(SNAPSHOT_KEY).expect("get").is_none());
        assert!(meta.get(snapshot::FILE_KEY).expect("get").is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
