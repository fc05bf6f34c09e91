//! The batch log's segment files: the record format (see the crate's documentation), writing
//! a group, scanning a segment back (stopping at the first record that fails its checks) and
//! what damage a scan reports.

use crate::*;

/// The writable end of the log and what is known about the segments.
#[derive(Debug)]
pub(crate) struct Log {
    pub(crate) file: File,
    /// First group number of the segment being written, and its length.
    pub(crate) current: u64,
    pub(crate) len: u64,
    /// A write or fsync failed: the segment's tail is unknown, so the next commit starts a new one.
    pub(crate) poisoned: bool,
    pub(crate) next_group: u64,
    /// Groups below the floor are covered by the snapshot.
    pub(crate) floor: u64,
    /// First group of every segment on disk, ascending (the last is `current`).
    pub(crate) segments: Vec<u64>,
    /// Live groups (at or above the floor) and how many batches each holds.
    pub(crate) groups: BTreeMap<u64, u64>,
    pub(crate) scratch: Vec<u8>,
}

pub(crate) fn push_record(out: &mut Vec<u8>, id: &BatchId, raw: &[u8]) {
    out.extend_from_slice(&batch_key(id));
    let mut n = raw.len() as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.extend_from_slice(raw);
}

/// The batches of a group body; a damaged tail ends the iteration (and is reported).
pub(crate) fn records(mut v: &[u8]) -> impl Iterator<Item = Result<(BatchId, &[u8]), StoreError>> {
    std::iter::from_fn(move || {
        if v.is_empty() {
            return None;
        }
        let bad = || Some(Err(StoreError::Damaged("damaged batch record".into())));
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
        let Some(raw) = i.checked_add(len).and_then(|end| v.get(i..end)) else {
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

pub(crate) fn crc(len_and_group: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len_and_group);
    h.update(body);
    h.finalize()
}

/// What reading one segment found: its intact records and its damaged stretches.
#[derive(Debug, Default)]
pub(crate) struct Parsed<'a> {
    /// (group, body, offset of the record) for every intact record, in file order.
    pub(crate) records: Vec<(u64, &'a [u8], usize)>,
    /// `[start, end)` byte ranges that hold no intact record, each followed by an intact
    /// record: damage to data that was written (and acknowledged) before what follows it.
    pub(crate) corrupt: Vec<(usize, usize)>,
    /// Where a damaged stretch that runs to the end of the file starts: a write cut short
    /// by a crash or a failed write (never acknowledged) — or damage we cannot tell from one.
    pub(crate) torn_tail: Option<usize>,
}

impl Parsed<'_> {
    /// The damaged stretches of the segment at `file` (`len` bytes long), in file order.
    pub(crate) fn damage(&self, file: &Path, len: usize) -> Vec<Damage> {
        let stretch = |start: usize, end: usize, kind| Damage {
            file: file.to_path_buf(),
            offset: start as u64,
            len: (end - start) as u64,
            kind,
        };
        let corrupt = self
            .corrupt
            .iter()
            .map(|&(start, end)| stretch(start, end, DamageKind::Corrupt));
        let torn = self
            .torn_tail
            .map(|start| stretch(start, len, DamageKind::TornTail));
        corrupt.chain(torn).collect()
    }
}

/// Reads a segment's records. A record that fails its checks does not end the segment:
/// records start at multiples of [`ALIGN`], so reading resumes at the next such offset and
/// every intact record after a damaged one is kept.
pub(crate) fn parse_segment(bytes: &[u8]) -> Parsed<'_> {
    let mut out = Parsed::default();
    let mut at = 0usize;
    let mut bad: Option<usize> = None;
    while at < bytes.len() {
        match record_at(&bytes[at..]) {
            Some((group, body)) => {
                if let Some(start) = bad.take() {
                    out.corrupt.push((start, at));
                }
                out.records.push((group, body, at));
                at = align_up(at + HEADER + body.len());
            }
            None => {
                bad.get_or_insert(at);
                at = align_up(at + 1);
            }
        }
    }
    out.torn_tail = bad;
    out
}

/// The intact record at the start of `rest`, if there is one: (group, body).
pub(crate) fn record_at(rest: &[u8]) -> Option<(u64, &[u8])> {
    let h = rest.get(..HEADER)?;
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    let group = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    let sum = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
    let body = rest.get(HEADER..HEADER.checked_add(len)?)?;
    (h[..4] == MAGIC && crc(&h[4..16], body) == sum).then_some((group, body))
}

pub(crate) fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

/// First group numbers of the segment files in `dir`, ascending.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let name = entry.map_err(io(dir))?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name
            .strip_suffix(".seg")
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Opens a new (or emptied) segment for writing, with direct I/O where the file system has
/// it: a group commit then goes from our buffer to the disk without being copied into the
/// page cache (on this project's VMs that copy, into pages the host backs lazily, cost more
/// CPU than the fsync itself).
pub(crate) fn create_segment(path: &Path) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.create(true).write(true).truncate(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match o.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => return Ok(f),
            // A file system without direct I/O (tmpfs): buffered writes, same format.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    o.open(path)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// What start-up reads back.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The latest snapshot, if any.
    pub snapshot: Option<Snapshot>,
    /// Every stored batch (raw signed bytes), in the order they were written.
    pub batches: Vec<Vec<u8>>,
}

/// A damaged stretch of the batch log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub file: PathBuf,
    /// Where the stretch starts, bytes from the start of the file.
    pub offset: u64,
    /// How long it is, bytes.
    pub len: u64,
    /// What it means for acknowledged data.
    pub kind: DamageKind,
}

/// Whether a damaged stretch can have held acknowledged batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DamageKind {
    /// Intact records follow it in the same segment: it was written, fsynced and acknowledged
    /// before them, so acknowledged batches are lost (unless a peer still holds them).
    Corrupt,
    /// It runs to the end of its segment: a commit cut short by a crash or a failed write,
    /// never acknowledged. (Damage to a segment's last record looks the same; it is reported,
    /// never silently dropped.)
    TornTail,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            DamageKind::Corrupt => "damaged records followed by intact ones (acknowledged data)",
            DamageKind::TornTail => "a torn tail (a commit cut short; never acknowledged)",
        };
        write!(
            f,
            "{} at offset {} ({} bytes): {what}",
            self.file.display(),
            self.offset,
            self.len
        )
    }
}

/// What a scan of the log found besides the records.
#[derive(Debug, Default)]
pub(crate) struct ScanOut {
    /// The highest group number of any intact record.
    pub(crate) max: Option<u64>,
    /// Every damaged stretch, in segment order.
    pub(crate) damage: Vec<Damage>,
    /// Segments that hold no intact record but are not empty.
    pub(crate) unreadable: Vec<u64>,
}

/// Live records of the segments in `firsts` (each read whole and CRC-checked): calls `each`
/// with (group, body) for every intact record at or above `floor`, and reports the damage.
pub(crate) fn scan(
    dir: &Path,
    firsts: &[u64],
    floor: u64,
    mut each: impl FnMut(u64, &[u8]),
) -> Result<ScanOut, StoreError> {
    let mut out = ScanOut::default();
    for &first in firsts {
        let path = segment_path(dir, first);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&path)(e)),
        };
        let parsed = parse_segment(&bytes);
        out.damage.extend(parsed.damage(&path, bytes.len()));
        if parsed.torn_tail.is_some() && parsed.records.is_empty() {
            out.unreadable.push(first);
        }
        for (group, body, _) in parsed.records {
            out.max = out.max.max(Some(group));
            if group >= floor {
                each(group, body);
            }
        }
    }
    Ok(out)
}

/// Groups missing from the live log: every group from the floor up to the highest one is
/// written before any later one is acknowledged (a failed write does not use up its number),
/// so a gap means a record or a segment file is gone. Returns the first gap, `[from, to)`.
pub(crate) fn first_gap(floor: u64, groups: &BTreeMap<u64, u64>) -> Option<(u64, u64)> {
    let mut expect = floor;
    for &g in groups.keys() {
        if g > expect {
            return Some((expect, g));
        }
        expect = g + 1;
    }
    None
}

pub(crate) fn read_floor(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    path: &Path,
) -> Result<u64, StoreError> {
    read_u64(meta, FLOOR_KEY, path)
}

/// A little-endian u64 of `meta` (0 if absent).
pub(crate) fn read_u64(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
    path: &Path,
) -> Result<u64, StoreError> {
    match meta.get(key).map_err(err)? {
        Some(v) => Ok(u64::from_le_bytes(v.value().try_into().map_err(|_| {
            StoreError::Damaged(format!("{}: {key} is unreadable", path.display()))
        })?)),
        None => Ok(0),
    }
}

impl Log {
    /// Starts a new segment, named by the next group number.
    pub(crate) fn roll(&mut self, dir: &Path) -> Result<(), StoreError> {
        let first = self.next_group;
        let path = segment_path(dir, first);
        let file = create_segment(&path).map_err(io(&path))?;
        sync_dir(dir)?;
        self.file = file;
        self.current = first;
        self.len = 0;
        self.poisoned = false;
        if self.segments.last() != Some(&first) {
            self.segments.push(first);
        }
        Ok(())
    }

    /// Segments other than the current one whose groups all lie below the floor.
    pub(crate) fn take_covered(&mut self) -> Vec<u64> {
        let mut doomed = Vec::new();
        let mut i = 0;
        while i + 1 < self.segments.len() && self.segments[i + 1] <= self.floor {
            doomed.push(self.segments[i]);
            i += 1;
        }
        self.segments.drain(..i);
        doomed
    }

    /// Forgets the groups below the floor; returns how many batches they held.
    pub(crate) fn forget_below_floor(&mut self) -> u64 {
        let live = self.groups.split_off(&self.floor);
        let gone = std::mem::replace(&mut self.groups, live);
        gone.values().sum()
    }
}
