//! [`Replica::encode_snapshot`]: the bytes of `postcard(replica.snapshot())`, written straight
//! from the replica's own tables.
//!
//! Building the [`Snapshot`](super::Snapshot) value first copies every total into a
//! `SeriesSnapshot` (three vectors per series, one series per (category, producer) rollup
//! pair), and encoding it makes a second copy: at each compaction a merger briefly held about
//! three times its state (measured by the churn soak). Here only the canonical order is built
//! — string and producer permutations, one 24-byte descriptor per series, one 32-byte index
//! entry per rollup total — and the encoding is the one copy. postcard is not
//! self-describing, so a value that serialises the same fields in the same order, with the
//! same lengths, gives the same bytes; the test `encode_snapshot_equals_encoding_the_snapshot`
//! holds this to the byte against `Snapshot::encode`.

use super::{Dim, EpochSeen, Replica, Total, SNAPSHOT_FORMAT};
use crate::batch::ProducerKey;
use serde::ser::{Error as _, SerializeSeq, SerializeStruct, SerializeTuple};
use serde::{Serialize, Serializer};

/// The canonical order of a replica's strings and producers: the order a snapshot lists them
/// in (sorted), and each id's position in it.
pub(super) struct Canon {
    /// String ids, sorted by string.
    pub(super) order: Vec<u32>,
    /// String id → rank.
    pub(super) remap: Vec<u32>,
    /// Live producer ids, sorted by key.
    pub(super) porder: Vec<u32>,
    /// Producer id → rank (live producers only).
    pub(super) premap: Vec<u32>,
}

impl Canon {
    pub(super) fn of(r: &Replica) -> Canon {
        let mut order: Vec<u32> = (0..r.strings.len() as u32).collect();
        order.sort_by(|&a, &b| r.strings.get(a).cmp(r.strings.get(b)));
        let mut remap = vec![0u32; order.len()];
        for (new, &old) in order.iter().enumerate() {
            remap[old as usize] = new as u32;
        }
        let mut porder: Vec<u32> = (0..r.producers.len() as u32)
            .filter(|&p| r.producers.is_live(p))
            .collect();
        porder.sort_by_key(|&p| r.producers.get(p));
        let mut premap = vec![0u32; r.producers.len()];
        for (new, &old) in porder.iter().enumerate() {
            premap[old as usize] = new as u32;
        }
        Canon {
            order,
            remap,
            porder,
            premap,
        }
    }

    /// A dimension with its ids replaced by their ranks.
    pub(super) fn dim(&self, dim: Dim) -> Dim {
        match dim {
            Dim::Entity(e) => Dim::Entity(self.remap[e as usize]),
            Dim::Producer(p) => Dim::Producer(self.premap[p as usize]),
            d => d,
        }
    }
}

/// Where a series' totals are.
#[derive(Clone, Copy)]
enum Source {
    /// `Replica::series[i]`.
    Series(u32),
    /// A rollup pair: `Encoder::rollup[lo..hi]`, minute tier first.
    Pair(u32, u32),
}

/// One total of a rollup, sortable into a pair's series.
struct RollupTotal<'a> {
    /// (category rank, producer rank, tier) — the series and its tier.
    key: (u32, u32, u8),
    start: i64,
    total: &'a Total,
}

struct Encoder<'a> {
    r: &'a Replica,
    canon: Canon,
    /// (category rank, dimension with ranks, source), sorted as the snapshot lists series.
    series: Vec<(u32, Dim, Source)>,
    rollup: Vec<RollupTotal<'a>>,
}

impl<'a> Encoder<'a> {
    fn new(r: &'a Replica) -> Encoder<'a> {
        let canon = Canon::of(r);
        let mut series: Vec<(u32, Dim, Source)> =
            Vec::with_capacity(r.series_ids.len() + r.producer_pairs.len());
        for (&(cat, dim), &idx) in &r.series_ids {
            series.push((
                canon.remap[cat as usize],
                canon.dim(dim),
                Source::Series(idx),
            ));
        }
        for &pair in &r.producer_pairs {
            let (cat, pid) = ((pair >> 32) as u32, pair as u32);
            series.push((
                canon.remap[cat as usize],
                Dim::Producer(canon.premap[pid as usize]),
                Source::Pair(0, 0),
            ));
        }
        // Stable, as `Replica::snapshot` sorts (no two series share a key).
        series.sort_by_key(|&(c, d, _)| (c, d));
        // Sized up front: growing it by doubling would briefly hold it twice.
        let totals: usize = r
            .rollups
            .values()
            .flat_map(|ro| ro.tiers.iter().flatten())
            .map(|(_, table)| table.len())
            .sum();
        let mut rollup = Vec::with_capacity(totals);
        for (&cat, ro) in &r.rollups {
            for (t, tier) in ro.tiers.iter().enumerate() {
                for (start, table) in tier {
                    for (pid, total) in table.iter() {
                        if r.producer_pairs
                            .contains(&((cat as u64) << 32 | pid as u64))
                        {
                            rollup.push(RollupTotal {
                                key: (
                                    canon.remap[cat as usize],
                                    canon.premap[pid as usize],
                                    t as u8 + 1,
                                ),
                                start: *start,
                                total,
                            });
                        }
                    }
                }
            }
        }
        rollup.sort_unstable_by_key(|e| (e.key, e.start));
        // Each pair's totals are one run of `rollup`, in the same order as the pairs.
        let mut at = 0usize;
        for (c, d, src) in &mut series {
            if let (Source::Pair(lo, hi), Dim::Producer(p)) = (src, *d) {
                while rollup.get(at).is_some_and(|e| (e.key.0, e.key.1) < (*c, p)) {
                    at += 1;
                }
                *lo = at as u32;
                while rollup
                    .get(at)
                    .is_some_and(|e| (e.key.0, e.key.1) == (*c, p))
                {
                    at += 1;
                }
                *hi = at as u32;
            }
        }
        Encoder {
            r,
            canon,
            series,
            rollup,
        }
    }
}

/// A sequence of exactly `len` items (postcard writes the length first; a miscount is an
/// error, never a corrupt encoding).
struct Seq<F>(usize, F);

impl<F, I> Serialize for Seq<F>
where
    F: Fn() -> I,
    I: Iterator,
    I::Item: Serialize,
{
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0))?;
        let mut n = 0usize;
        for x in (self.1)() {
            seq.serialize_element(&x)?;
            n += 1;
        }
        if n != self.0 {
            return Err(S::Error::custom("snapshot sequence length miscounted"));
        }
        seq.end()
    }
}

/// Serialises as a `SeriesSnapshot`.
struct SeriesView<'e, 'a>(&'e Encoder<'a>, u32, Dim, Source);

impl Serialize for SeriesView<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let SeriesView(enc, category, dim, src) = *self;
        let mut st = s.serialize_struct("SeriesSnapshot", 3)?;
        st.serialize_field("category", &category)?;
        st.serialize_field("dim", &dim)?;
        st.serialize_field("tiers", &TiersView(enc, src))?;
        st.end()
    }
}

/// Serialises as `[Vec<(i64, Total)>; 3]`.
struct TiersView<'e, 'a>(&'e Encoder<'a>, Source);

impl Serialize for TiersView<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut tup = s.serialize_tuple(3)?;
        match self.1 {
            Source::Series(i) => {
                let series = &self.0.r.series[i as usize];
                for tier in &series.tiers {
                    tup.serialize_element(&Seq(tier.len(), || tier.iter()))?;
                }
            }
            Source::Pair(lo, hi) => {
                let run = &self.0.rollup[lo as usize..hi as usize];
                let minutes = run.partition_point(|e| e.key.2 < 2);
                tup.serialize_element(&Seq(0, std::iter::empty::<(i64, &Total)>))?;
                for part in [&run[..minutes], &run[minutes..]] {
                    tup.serialize_element(&Seq(part.len(), || {
                        part.iter().map(|e| (e.start, e.total))
                    }))?;
                }
            }
        }
        tup.end()
    }
}

impl Serialize for Encoder<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (r, c) = (self.r, &self.canon);
        let mut st = s.serialize_struct("Snapshot", 12)?;
        st.serialize_field("format", &SNAPSHOT_FORMAT)?;
        st.serialize_field(
            "strings",
            &Seq(c.order.len(), || c.order.iter().map(|&i| r.strings.get(i))),
        )?;
        st.serialize_field(
            "producers",
            &Seq(c.porder.len(), || {
                c.porder.iter().map(|&i| r.producers.get(i))
            }),
        )?;
        st.serialize_field(
            "series",
            &Seq(self.series.len(), || {
                self.series
                    .iter()
                    .map(|&(cat, dim, src)| SeriesView(self, cat, dim, src))
            }),
        )?;
        st.serialize_field(
            "seen",
            &Seq(r.seen.len(), || {
                r.seen
                    .iter()
                    .map(|(&(p, e), s)| -> (ProducerKey, u64, &EpochSeen) { (p, e, s) })
            }),
        )?;
        st.serialize_field("horizons", &r.horizons)?;
        st.serialize_field("batches_hash", &r.batches_hash)?;
        st.serialize_field("batches", &r.hashed_batches)?;
        st.serialize_field("absorbed", &r.absorbed)?;
        st.serialize_field("sketches", &r.sketch_snapshot(c))?;
        st.serialize_field("sketch_horizons", &r.sketch_horizons)?;
        st.end()
    }
}

impl Replica {
    /// Appends to `out` the encoding of [`Replica::snapshot`] (the bytes of
    /// [`Snapshot::encode`](super::Snapshot::encode)) without building the snapshot: the
    /// extra memory is the canonical order (about 24 bytes per series and 32 per rollup
    /// total) and the encoding itself.
    pub fn encode_snapshot_into(&self, out: Vec<u8>) -> Result<Vec<u8>, String> {
        postcard::to_extend(&Encoder::new(self), out).map_err(|e| format!("snapshot: {e}"))
    }

    /// Writes the encoding of [`Replica::snapshot`] to `w` (a file, through a buffer) without
    /// building the snapshot; see [`Replica::encode_snapshot_into`]. Returns `w`.
    pub fn write_snapshot<W: std::io::Write>(&self, w: W) -> Result<W, String> {
        postcard::to_io(&Encoder::new(self), w).map_err(|e| format!("snapshot: {e}"))
    }

    /// The encoding of [`Replica::snapshot`]; see [`Replica::encode_snapshot_into`].
    pub fn encode_snapshot(&self) -> Result<Vec<u8>, String> {
        self.encode_snapshot_into(Vec::new())
    }
}
