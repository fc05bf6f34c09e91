//! `edgetally check`: reads a stopped node's data directory without changing it, reports
//! every kind of damage with its file and offset, and (`--repair`) salvages every intact,
//! verified batch and the snapshot into a fresh directory — as `redis-check-aof` does for
//! Redis. A node refuses to start on damage that lost acknowledged batches; this is how an
//! operator sees what is left and starts again from it.

use crate::{
    first_gap, list_segments, parse_segment, read_floor, read_snapshot, read_u64, records,
    segment_path, Damage, DamageKind, Store, StoreError, DURABLE_KEY, META,
};
use crate::{quarantine, replay_limits};
use edgetally_core::{Limits, Snapshot};
use edgetally_proto::decode;
use redb::{ReadOnlyDatabase, ReadableDatabase};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The state of the stored snapshot.
#[derive(Debug)]
pub enum SnapshotState {
    /// Present, checksum and structure intact.
    Intact,
    /// None stored (a node that never compacted).
    Absent,
    /// Stored but unreadable: the reason.
    Damaged(String),
}

/// Everything `check` found.
#[derive(Debug)]
pub struct Report {
    /// The data directory.
    pub dir: PathBuf,
    /// The snapshot.
    pub snapshot: SnapshotState,
    /// The first group the snapshot does not cover.
    pub floor: u64,
    /// Segment files read.
    pub segments: usize,
    /// Intact group records at or above the floor.
    pub groups: usize,
    /// Batches in them that decode and verify.
    pub batches: u64,
    /// Batches that are stored intact but do not decode or verify: (group, reason).
    pub bad_batches: Vec<(u64, String)>,
    /// Damaged stretches of the log.
    pub damage: Vec<Damage>,
    /// Groups missing from the live log, `[from, to)`.
    pub gap: Option<(u64, u64)>,
    /// Problems that make the data directory unusable as it is (each a sentence).
    pub fatal: Vec<String>,
}

impl Report {
    /// Whether acknowledged data may be missing or the node would refuse to start.
    pub fn lost_data(&self) -> bool {
        !self.fatal.is_empty()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "data directory: {}", self.dir.display())?;
        let snap = match &self.snapshot {
            SnapshotState::Intact => "intact (checksum verified)".to_string(),
            SnapshotState::Absent => "none".to_string(),
            SnapshotState::Damaged(why) => format!("DAMAGED: {why}"),
        };
        writeln!(f, "snapshot: {snap}")?;
        writeln!(f, "log floor: group {}", self.floor)?;
        writeln!(
            f,
            "log: {} segment file(s), {} live group record(s), {} batch(es) verified",
            self.segments, self.groups, self.batches
        )?;
        for d in &self.damage {
            let mark = if d.kind == DamageKind::Corrupt {
                "DAMAGE"
            } else {
                "note"
            };
            writeln!(f, "{mark}: {d}")?;
        }
        for (g, why) in &self.bad_batches {
            writeln!(f, "DAMAGE: a batch in group {g} does not replay: {why}")?;
        }
        if let Some((from, to)) = self.gap {
            writeln!(f, "DAMAGE: groups {from}..{to} are missing from the log")?;
        }
        if self.fatal.is_empty() {
            write!(f, "verdict: ok — every acknowledged batch is accounted for")
        } else {
            writeln!(f, "verdict: acknowledged data is damaged or missing:")?;
            for p in &self.fatal {
                writeln!(f, "  - {p}")?;
            }
            write!(
                f,
                "`edgetally check --data-dir {} --repair OUT` salvages every intact batch into OUT",
                self.dir.display()
            )
        }
    }
}

use crate::{err, io};

/// The snapshot's state, the snapshot if intact, the floor and the durable mark.
type Meta = (SnapshotState, Option<Snapshot>, u64, u64);

/// Reads the snapshot and floor of `dir` without writing (a node must not be running on it).
fn read_meta(dir: &Path) -> Result<Meta, StoreError> {
    let path = dir.join("edgetally.redb");
    if !path.exists() {
        return Ok((
            SnapshotState::Damaged(format!("{} is missing", path.display())),
            None,
            0,
            0,
        ));
    }
    let db = match ReadOnlyDatabase::open(&path) {
        Ok(db) => db,
        Err(e) => {
            return Ok((
                SnapshotState::Damaged(format!("{}: {e}", path.display())),
                None,
                0,
                0,
            ))
        }
    };
    let txn = db.begin_read().map_err(err)?;
    let meta = match txn.open_table(META) {
        Ok(m) => m,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            return Ok((SnapshotState::Absent, None, 0, 0));
        }
        Err(e) => {
            return Ok((
                SnapshotState::Damaged(format!("{}: {e}", path.display())),
                None,
                0,
                0,
            ))
        }
    };
    let floor = read_floor(&meta, &path)?;
    let durable = read_u64(&meta, DURABLE_KEY, &path)?;
    Ok(match read_snapshot(&meta, dir)? {
        None => (SnapshotState::Absent, None, floor, durable),
        Some(Ok(s)) => match edgetally_core::Replica::restore(s.clone()) {
            Ok(_) => (SnapshotState::Intact, Some(s), floor, durable),
            Err(e) => (
                SnapshotState::Damaged(format!("inconsistent: {e}")),
                None,
                floor,
                durable,
            ),
        },
        Some(Err(e)) => (SnapshotState::Damaged(e), None, floor, durable),
    })
}

/// Checks one stored batch as replay will, plus its signature (a record found after a
/// damaged stretch could be any bytes).
fn replayable(raw: &[u8], limits: &Limits) -> Result<(), String> {
    let u = decode(raw, limits).map_err(|e| format!("decode: {e}"))?;
    u.verify().map(|_| ()).map_err(|e| format!("verify: {e}"))
}

/// What [`inspect`] read: the report, the snapshot if intact, and every intact stored batch
/// that replays — below the floor too, where files remain — as (group, raw bytes).
type Inspected = (Report, Option<Snapshot>, Vec<(u64, Vec<u8>)>);

// Long by design: one pass over a data directory's parts in the order start-up reads them, each
// reported where it is read.
fn inspect(dir: &Path) -> Result<Inspected, StoreError> {
    let (snapshot, snap, floor, durable) = read_meta(dir)?;
    let log_dir = dir.join("log");
    let firsts = if log_dir.exists() {
        list_segments(&log_dir)?
    } else {
        Vec::new()
    };
    let limits = replay_limits(&Limits::default());
    let mut damage = Vec::new();
    let mut groups: BTreeMap<u64, u64> = BTreeMap::new();
    let mut all = Vec::new();
    let mut bad_batches = Vec::new();
    let mut batches = 0;
    for &first in &firsts {
        let path = segment_path(&log_dir, first);
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let parsed = parse_segment(&bytes);
        damage.extend(parsed.damage(&path, bytes.len()));
        for (group, body, _) in parsed.records {
            let live = group >= floor;
            if live {
                *groups.entry(group).or_insert(0) += 1;
            }
            for rec in records(body) {
                match rec {
                    Ok((_, raw)) => match replayable(raw, &limits) {
                        Ok(()) => {
                            if live {
                                batches += 1;
                            }
                            all.push((group, raw.to_vec()));
                        }
                        Err(why) => bad_batches.push((group, why)),
                    },
                    Err(e) => bad_batches.push((group, e.to_string())),
                }
            }
        }
    }
    let gap = first_gap(floor, &groups);
    let mut fatal = Vec::new();
    match &snapshot {
        SnapshotState::Damaged(why) => fatal.push(format!("the snapshot is unusable: {why}")),
        SnapshotState::Absent if floor > 0 || firsts.first().is_some_and(|&f| f > 0) => fatal.push(
            "no snapshot is stored, but the log starts past group 0: the snapshot that covered the earlier groups is gone"
                .into(),
        ),
        _ => {}
    }
    for d in damage.iter().filter(|d| d.kind == DamageKind::Corrupt) {
        fatal.push(format!("{d}"));
    }
    if let Some((from, to)) = gap {
        fatal.push(format!("groups {from}..{to} are missing from the log"));
    }
    let ends = groups
        .keys()
        .next_back()
        .map_or(floor, |m| floor.max(m + 1));
    if ends < durable {
        fatal.push(format!(
            "the log ends before group {ends}, but groups up to {} were durable: the end of the newest segment is gone",
            durable - 1
        ));
    }
    if !bad_batches.is_empty() {
        fatal.push(format!(
            "{} stored batch(es) do not decode or verify",
            bad_batches.len()
        ));
    }
    let report = Report {
        dir: dir.to_path_buf(),
        snapshot,
        floor,
        segments: firsts.len(),
        groups: groups.len(),
        batches,
        bad_batches,
        damage,
        gap,
        fatal,
    };
    Ok((report, snap, all))
}

/// Checks `dir` (read only).
pub fn check(dir: &Path) -> Result<Report, StoreError> {
    inspect(dir).map(|(r, _, _)| r)
}

/// What a repair wrote.
#[derive(Debug)]
pub struct Repaired {
    /// The check of the source.
    pub report: Report,
    /// Batches written to the new directory.
    pub batches: u64,
    /// Whether the snapshot was carried over.
    pub snapshot: bool,
}

/// Salvages `dir` into `out` (which must not exist or be empty): the snapshot if it is intact,
/// every intact stored batch that decodes and verifies (replay is idempotent, so batches the
/// snapshot already covers change nothing), the node's key and certificate; stored batches
/// that do not replay are kept in `out/quarantine/`. `dir` is not changed.
pub fn repair(dir: &Path, out: &Path) -> Result<Repaired, StoreError> {
    if out.exists() && std::fs::read_dir(out).map_err(io(out))?.next().is_some() {
        return Err(StoreError::NotEmpty(format!(
            "{} is not empty; repair writes into a fresh directory",
            out.display()
        )));
    }
    let (report, snap, all) = inspect(dir)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    for f in ["node.key", "cert.der", "cert.key.der", "cert.not_after"] {
        let from = dir.join(f);
        if from.exists() {
            std::fs::copy(&from, out.join(f)).map_err(io(&from))?;
        }
    }
    let store = Store::open(out, 16 << 20)?;
    if let Some(s) = &snap {
        store.save_snapshot_value(s)?;
    }
    let mut written = 0;
    for chunk in all.chunks(512) {
        let items: Vec<_> = chunk
            .iter()
            .filter_map(|(_, raw)| {
                decode(raw, &replay_limits(&Limits::default()))
                    .ok()
                    .map(|u| (u.batch.id, raw.as_slice()))
            })
            .collect();
        if !items.is_empty() {
            store.append(&items)?;
            written += items.len() as u64;
        }
    }
    // Stored batches that do not replay: kept beside the new store, never dropped silently.
    let log_dir = dir.join("log");
    for &first in &list_segments(&log_dir).unwrap_or_default() {
        let path = segment_path(&log_dir, first);
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        for (_, body, _) in parse_segment(&bytes).records {
            for raw in records(body).filter_map(Result::ok).map(|(_, r)| r) {
                if let Err(why) = replayable(raw, &replay_limits(&Limits::default())) {
                    quarantine(out, raw, &why)?;
                }
            }
        }
    }
    Ok(Repaired {
        report,
        batches: written,
        snapshot: snap.is_some(),
    })
}
