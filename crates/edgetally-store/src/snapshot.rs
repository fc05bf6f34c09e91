//! The snapshot on disk: one file per snapshot, `snapshot-<n>.etsn` in the data directory,
//! named in redb by its number (`meta["snapshot_file"]`), written by streaming.
//!
//! The snapshot used to be one redb value. Writing it held, at each compaction, the encoded
//! bytes and redb's copy of them (rounded up to a power of two of pages) on the heap beside
//! the state: measured with heaptrack on the churn soak, 16 MB of snapshot cost 33.5 MB of
//! redb pages plus the encoding, and glibc kept much of it resident after. A file written
//! through a 256 KiB buffer costs neither; redb keeps what it is good at — the small
//! transactional pointers (snapshot number, log floor, durable mark).
//!
//! Crash safety: the file is written as `snapshot-<n>.tmp`, fsynced, renamed, and the
//! directory fsynced before redb names it; the previous file is deleted only after redb's
//! commit. A crash leaves either the old name and file or the new ones; stray files are
//! deleted at open. Numbers are taken under the replica's lock, so a higher number is a later
//! state; a commit of a lower number than the one committed is skipped (two compactions racing
//! can never put an older snapshot back).
//!
//! Format: `"ETSN" | 1 | SHA-256 of the body | body` — the same as the redb value of older
//! versions, which [`read`] still accepts.

use super::{err, io, read_u64, sync_dir, StoreError, SNAPSHOT_KEY};
use edgetally_core::Snapshot;
use redb::ReadableTable;
use sha2::{Digest as _, Sha256};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The stored form's first bytes.
pub(crate) const MAGIC: [u8; 4] = *b"ETSN";
const HEADER: usize = MAGIC.len() + 1 + 32;
/// redb key of the current snapshot file's number (u64, little-endian).
pub(crate) const FILE_KEY: &str = "snapshot_file";

/// The path of snapshot file `n` in data directory `root`.
pub(crate) fn path(root: &Path, n: u64) -> PathBuf {
    root.join(format!("snapshot-{n:020}.etsn"))
}

/// The number in a snapshot file's name (0 if it has none).
#[cfg(test)]
pub(crate) fn path_number(p: &Path) -> u64 {
    p.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("snapshot-"))
        .and_then(|n| n.split('.').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The snapshot files (and unfinished `.tmp` ones) in `root`: (number, path).
pub(crate) fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).map_err(err)? {
        let e = e.map_err(err)?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix("snapshot-") else {
            continue;
        };
        let num = rest
            .strip_suffix(".etsn")
            .or_else(|| rest.strip_suffix(".tmp"));
        if let Some(n) = num.and_then(|n| n.parse::<u64>().ok()) {
            out.push((n, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads the snapshot redb names in `meta`: from its file, or (written by an older version)
/// inline. `Ok(None)`: the store has none. The inner error names what is damaged.
pub(crate) fn read(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    root: &Path,
) -> Result<Option<Result<Snapshot, String>>, StoreError> {
    let db = root.join("edgetally.redb");
    let n = match read_u64(meta, FILE_KEY, &db) {
        Ok(n) => n,
        Err(e) => return Ok(Some(Err(e.to_string()))),
    };
    if n > 0 {
        let p = path(root, n);
        return Ok(Some(match std::fs::read(&p) {
            // Files were always written with the header: one without it is damaged (only an
            // older version's inline value may be bare postcard).
            Ok(bytes) if !bytes.starts_with(&MAGIC) => Err(format!(
                "{}: snapshot header damaged (no \"ETSN\" magic)",
                p.display()
            )),
            Ok(bytes) => decode(&bytes).map_err(|e| format!("{}: {e}", p.display())),
            Err(e) => Err(format!(
                "{}: {e} (named by {} as the current snapshot)",
                p.display(),
                db.display()
            )),
        }));
    }
    Ok(meta
        .get(SNAPSHOT_KEY)
        .map_err(err)?
        .map(|v| decode(v.value()).map_err(|e| format!("{}: {e}", db.display()))))
}

/// Decodes a stored snapshot: checksummed, or (written by an older version) bare postcard.
pub(crate) fn decode(v: &[u8]) -> Result<Snapshot, String> {
    let body = match v.strip_prefix(&MAGIC[..]) {
        Some(rest) => {
            let (Some(&1), Some(sum), Some(body)) = (rest.first(), rest.get(1..33), rest.get(33..))
            else {
                return Err("snapshot header damaged".into());
            };
            if Sha256::digest(body).as_slice() != sum {
                return Err("snapshot checksum mismatch: the stored snapshot is damaged".into());
            }
            body
        }
        None => v,
    };
    Snapshot::decode(body).map_err(|e| format!("snapshot unreadable: {e}"))
}

/// The file, hashing what goes through it.
struct HashingFile {
    file: File,
    hash: Sha256,
    len: u64,
}

impl std::fmt::Debug for HashingFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashingFile")
            .field("file", &self.file)
            .finish()
    }
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// A snapshot being written ([`Store::begin_snapshot`](super::Store::begin_snapshot)): write
/// the body with [`SnapshotWriter::replica`] or [`SnapshotWriter::snapshot`], then
/// [`SnapshotWriter::finish`]. Dropped unfinished, it deletes its file.
#[derive(Debug)]
pub struct SnapshotWriter {
    n: u64,
    root: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<HashingFile>>,
    /// Renamed to its final name: the `.tmp` is gone.
    renamed: bool,
}

impl SnapshotWriter {
    pub(crate) fn create(root: &Path, n: u64) -> Result<SnapshotWriter, StoreError> {
        let tmp = root.join(format!("snapshot-{n:020}.tmp"));
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        // The header's checksum is filled in by `finish`.
        let mut header = [0u8; HEADER];
        header[..4].copy_from_slice(&MAGIC);
        header[4] = 1;
        let mut w = SnapshotWriter {
            n,
            root: root.to_path_buf(),
            tmp,
            out: None,
            renamed: false,
        };
        file.write_all(&header).map_err(|e| w.fail(e))?;
        w.out = Some(BufWriter::with_capacity(
            256 << 10,
            HashingFile {
                file,
                hash: Sha256::new(),
                len: 0,
            },
        ));
        Ok(w)
    }

    fn fail(&self, e: std::io::Error) -> StoreError {
        io(&self.tmp)(e)
    }

    fn out(&mut self) -> Result<&mut BufWriter<HashingFile>, StoreError> {
        let tmp = self.tmp.clone();
        self.out
            .as_mut()
            .ok_or_else(|| io(&tmp)(std::io::Error::other("already finished")))
    }

    /// Writes the snapshot of `replica`, straight from its tables
    /// ([`Replica::write_snapshot`](edgetally_core::Replica::write_snapshot)). Hold the
    /// replica's lock for this call only; [`SnapshotWriter::finish`] (the fsync) needs none.
    pub fn replica(&mut self, replica: &edgetally_core::Replica) -> Result<(), StoreError> {
        let out = self.out()?;
        let r = replica.write_snapshot(&mut *out);
        r.map(|_| ())
            .map_err(|e| self.fail(std::io::Error::other(e)))
    }

    /// Writes `snapshot`.
    pub fn snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let out = self.out()?;
        let r = postcard::to_io(snapshot, &mut *out);
        r.map(|_| ())
            .map_err(|e| self.fail(std::io::Error::other(e)))
    }

    /// Makes the file durable under its final name; redb does not name it yet.
    pub fn finish(mut self) -> Result<SnapshotFile, StoreError> {
        let out = self
            .out
            .take()
            .ok_or_else(|| self.fail(std::io::Error::other("already finished")))?;
        let HashingFile {
            mut file,
            hash,
            len,
            ..
        } = out.into_inner().map_err(|e| self.fail(e.into_error()))?;
        let done = file
            .seek(SeekFrom::Start(MAGIC.len() as u64 + 1))
            .and_then(|_| file.write_all(&hash.finalize()))
            .and_then(|()| file.sync_all());
        done.map_err(|e| self.fail(e))?;
        drop(file);
        let to = path(&self.root, self.n);
        std::fs::rename(&self.tmp, &to).map_err(|e| self.fail(e))?;
        self.renamed = true;
        let file = SnapshotFile {
            n: self.n,
            path: to,
            named: false,
            len: HEADER as u64 + len,
        };
        sync_dir(&self.root)?;
        Ok(file)
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A durable snapshot file, to be named in redb by a compaction; dropped unnamed (the commit
/// failed or was superseded), it deletes its file.
#[derive(Debug)]
pub struct SnapshotFile {
    pub(crate) n: u64,
    path: PathBuf,
    pub(crate) named: bool,
    len: u64,
}

impl SnapshotFile {
    /// The file's size, bytes.
    pub fn bytes(&self) -> u64 {
        self.len
    }
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        if !self.named {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
