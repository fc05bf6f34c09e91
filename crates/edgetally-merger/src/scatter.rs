//! Cluster-wide queries, the pure half (docs/design/shard-groups.md): what one group is
//! asked ([`Query`]), what it answers ([`Part`]), and the exact merge of the parts
//! ([`combine`]). Groups hold disjoint sets of batches, so counts and exact sums add,
//! min/max combine, and top-k is exact because each part carries every row (the entry node
//! ranks and cuts). No I/O: [`crate::cluster`] gathers the parts, the simulation merges
//! them with the same function.

use edgetally_core::{GroupBy, Replica, Sketches, TopBy, Total};
use serde::{Deserialize, Serialize};

pub mod topk;

/// A cluster-wide query: what one group is asked for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Query {
    /// `/v1/aggregate` and `/v1/window`.
    Aggregate {
        /// Category.
        category: String,
        /// Entity, if any.
        entity: Option<String>,
        /// Window start, ms.
        start: i64,
        /// Window end, ms (exclusive).
        end: i64,
    },
    /// `/v1/series`.
    Series {
        /// Category.
        category: String,
        /// Entity, if any.
        entity: Option<String>,
        /// Window start, ms.
        start: i64,
        /// Window end, ms (exclusive).
        end: i64,
        /// Step, ms.
        step_ms: i64,
        /// Most points.
        max_points: u32,
    },
    /// `/v1/topk`: every row (the entry node ranks the merged rows and keeps `k`).
    TopK {
        /// Category.
        category: String,
        /// Window start, ms.
        start: i64,
        /// Window end, ms (exclusive).
        end: i64,
        /// By producer (else by entity).
        by_producer: bool,
    },
    /// `/v1/totals`.
    Totals {
        /// Window start, ms.
        start: i64,
        /// Window end, ms (exclusive).
        end: i64,
        /// 0: none, 1: category, 2: entity.
        group_by: u8,
    },
    /// The sketches (distinct counts, quantiles) of a category or one of its entities, over
    /// one window (`step_ms` 0) or per step: the distinct and quantile halves of
    /// `/v1/aggregate`, `/v1/window` and `/v1/series` (peer feature `sketches`).
    Sketches {
        /// Category.
        category: String,
        /// Entity, if any.
        entity: Option<String>,
        /// Window start, ms.
        start: i64,
        /// Window end, ms (exclusive).
        end: i64,
        /// Step, ms; 0 for one window.
        step_ms: i64,
        /// Most points.
        max_points: u32,
    },
    /// The sketches grouped as `/v1/totals` groups (of one category, for top-k by distinct).
    SketchRows {
        /// Only this category's series, if given.
        category: Option<String>,
        /// Window start, ms.
        start: i64,
        /// Window end, ms (exclusive).
        end: i64,
        /// 0: none, 1: category, 2: entity.
        group_by: u8,
    },
    /// `/v1/topk` by count, one round of the cluster's exact top-k ([`topk::TopKRounds`];
    /// peer feature `topk-rounds`): the rows of `category`'s entities (or producers) over the
    /// window that are among this group's `k` highest counts, or count at least `min_count`,
    /// or are named in `names` (sorted); sorted by name.
    TopKRound {
        /// Category.
        category: String,
        /// Window start, ms.
        start: i64,
        /// Window end, ms (exclusive).
        end: i64,
        /// By producer (else by entity).
        by_producer: bool,
        /// The group's own top `k`.
        k: u32,
        /// Every row with at least this count.
        min_count: Option<u64>,
        /// These rows (sorted by name).
        names: Vec<String>,
    },
}

/// Sketches as they cross between groups: their canonical bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSketches {
    /// The HyperLogLog's bytes.
    pub distinct: Option<Vec<u8>>,
    /// The quantile sketch's bytes.
    pub quantiles: Option<Vec<u8>>,
}

impl WireSketches {
    /// The bytes of `k`.
    pub fn of(k: &Sketches) -> WireSketches {
        WireSketches {
            distinct: k.distinct.as_ref().map(|h| h.encode()),
            quantiles: k.quantiles.as_ref().map(|q| q.encode()),
        }
    }

    /// The sketches (a part that does not decode — from a faulty peer — is left out).
    pub fn decode(&self) -> Sketches {
        use edgetally_core::sketches::{Hll, Quantiles};
        Sketches {
            distinct: self.distinct.as_deref().and_then(|b| Hll::decode(b).ok()),
            quantiles: self
                .quantiles
                .as_deref()
                .and_then(|b| Quantiles::decode(b).ok()),
        }
    }

    fn merge(&mut self, other: &WireSketches) {
        let mut k = self.decode();
        let _ = k.merge(&other.decode());
        *self = WireSketches::of(&k);
    }
}

fn group_of(g: u8) -> GroupBy {
    match g {
        1 => GroupBy::Category,
        2 => GroupBy::Entity,
        _ => GroupBy::None,
    }
}

/// One group's (or the merged) answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Answer {
    /// Aggregates over windows: one for an aggregate, one per step for a series.
    Points(Vec<(i64, i64, Total)>),
    /// Named rows over a window (top-k, totals), sorted by name.
    Rows {
        /// Covered start.
        start: i64,
        /// Covered end.
        end: i64,
        /// (name, totals).
        rows: Vec<(Option<String>, Total)>,
    },
    /// Sketches over windows (one, or one per step).
    Sketches(Vec<(i64, i64, WireSketches)>),
    /// Named sketches over a window, sorted by name.
    SketchRows {
        /// Covered start.
        start: i64,
        /// Covered end.
        end: i64,
        /// (name, sketches).
        rows: Vec<(Option<String>, WireSketches)>,
    },
    /// A group's rows in a round of the top-k ([`Query::TopKRound`]), sorted by name, and
    /// the highest count of a row it left out (0 if none).
    TopRows {
        /// Covered start.
        start: i64,
        /// Covered end.
        end: i64,
        /// (name, totals).
        rows: Vec<(Option<String>, Total)>,
        /// The highest count of a row left out.
        left_out: u64,
    },
}

/// What a group sends back: its answer, whether its replica saw all its peers, and when.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Part {
    /// The answer.
    pub answer: Answer,
    /// Whether the answering node saw every peer of its group.
    pub complete: bool,
    /// When it answered (ms).
    pub as_of_ms: i64,
    /// The drained groups whose state the answer holds (their own parts are left out).
    pub absorbed: Vec<String>,
}

/// Where a node stands in a drain (the reply to a drain-state request).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainState {
    /// Since when its group has been drained here (it takes no producer batch since).
    pub draining_since_ms: Option<i64>,
    /// Whether its ingest pipeline is empty.
    pub queue_empty: bool,
    /// Its state hash.
    pub state_hash: [u8; 32],
    /// The drained groups its state absorbed.
    pub absorbed: Vec<String>,
}

impl Query {
    /// The answer of one replica. Top-k rows come complete and sorted by name.
    pub fn run(&self, r: &Replica) -> Answer {
        let point = |a: edgetally_core::Aggregate| (a.start, a.end, a.total);
        match self {
            Query::Aggregate {
                category,
                entity,
                start,
                end,
            } => Answer::Points(vec![point(r.aggregate(
                category,
                entity.as_deref(),
                *start,
                *end,
            ))]),
            Query::Series {
                category,
                entity,
                start,
                end,
                step_ms,
                max_points,
            } => Answer::Points(
                r.series(
                    category,
                    entity.as_deref(),
                    *start,
                    *end,
                    *step_ms,
                    *max_points as usize,
                )
                .into_iter()
                .map(point)
                .collect(),
            ),
            Query::TopK { .. } | Query::TopKRound { .. } => self.run_top(r),
            Query::Totals {
                start,
                end,
                group_by,
            } => {
                let rows = r.totals(*start, *end, group_of(*group_by));
                Answer::Rows {
                    start: rows.start,
                    end: rows.end,
                    rows: rows.rows,
                }
            }
            Query::Sketches { .. } | Query::SketchRows { .. } => self.run_sketches(r),
        }
    }

    /// The answer of one replica to a top-k query (none for another query): every row, or
    /// a round's rows and the highest count it left out.
    fn run_top(&self, r: &Replica) -> Answer {
        let (category, start, end, by_producer, sel) = match self {
            Query::TopK {
                category,
                start,
                end,
                by_producer,
            } => (
                category,
                *start,
                *end,
                *by_producer,
                edgetally_core::TopSelect::top(usize::MAX),
            ),
            Query::TopKRound {
                category,
                start,
                end,
                by_producer,
                k,
                min_count,
                names,
            } => {
                let sel = edgetally_core::TopSelect {
                    k: *k as usize,
                    min_count: *min_count,
                    names,
                };
                (category, *start, *end, *by_producer, sel)
            }
            _ => return Answer::Sketches(Vec::new()),
        };
        let by = if by_producer {
            TopBy::Producer
        } else {
            TopBy::Entity
        };
        let (rows, left_out) = r.top_select(category, start, end, by, sel);
        let (start, end, rows) = (rows.start, rows.end, rows.rows);
        match self {
            Query::TopKRound { .. } => Answer::TopRows {
                start,
                end,
                rows,
                left_out,
            },
            _ => Answer::Rows { start, end, rows },
        }
    }

    /// The answer of one replica to a sketch query (none for another query).
    fn run_sketches(&self, r: &Replica) -> Answer {
        match self {
            Query::Sketches {
                category,
                entity,
                start,
                end,
                step_ms,
                max_points,
            } => {
                let answers = if *step_ms == 0 {
                    vec![r.sketches(category, entity.as_deref(), *start, *end)]
                } else {
                    r.sketch_series(
                        category,
                        entity.as_deref(),
                        *start,
                        *end,
                        *step_ms,
                        *max_points as usize,
                    )
                };
                Answer::Sketches(
                    answers
                        .iter()
                        .map(|a| (a.start, a.end, WireSketches::of(&a.sketches)))
                        .collect(),
                )
            }
            Query::SketchRows {
                category,
                start,
                end,
                group_by,
            } => {
                let (start, end, rows) =
                    r.sketch_rows(category.as_deref(), *start, *end, group_of(*group_by));
                Answer::SketchRows {
                    start,
                    end,
                    rows: rows
                        .iter()
                        .map(|(n, k)| (n.clone(), WireSketches::of(k)))
                        .collect(),
                }
            }
            _ => Answer::Sketches(Vec::new()),
        }
    }
}

impl Answer {
    /// The points of an aggregate or series answer (none for another answer).
    pub fn into_points(self) -> Vec<(i64, i64, Total)> {
        match self {
            Answer::Points(p) => p,
            _ => Vec::new(),
        }
    }

    /// The points of a sketches answer, decoded (none for another answer).
    pub fn into_sketches(self) -> Vec<(i64, i64, Sketches)> {
        match self {
            Answer::Sketches(p) => p.into_iter().map(|(s, e, k)| (s, e, k.decode())).collect(),
            _ => Vec::new(),
        }
    }

    /// The window and rows of a sketch-rows answer, decoded (empty for another answer).
    pub fn into_sketch_rows(self) -> (i64, i64, Vec<(Option<String>, Sketches)>) {
        match self {
            Answer::SketchRows { start, end, rows } => (
                start,
                end,
                rows.into_iter().map(|(n, k)| (n, k.decode())).collect(),
            ),
            _ => (0, 0, Vec::new()),
        }
    }

    /// The window and rows of a top-k or totals answer (empty for a points answer).
    pub fn into_rows(self) -> edgetally_core::Rows {
        match self {
            Answer::Rows { start, end, rows }
            | Answer::TopRows {
                start, end, rows, ..
            } => edgetally_core::Rows { start, end, rows },
            _ => edgetally_core::Rows {
                start: 0,
                end: 0,
                rows: Vec::new(),
            },
        }
    }

    /// Merges another group's answer to the same query into this one. Groups hold disjoint
    /// batches, so every field merges as the totals of one replica do. The windows reported
    /// are this answer's (the entry node's).
    pub fn merge(&mut self, other: Answer) {
        match (self, other) {
            (Answer::Points(a), Answer::Points(b)) => {
                for (p, q) in a.iter_mut().zip(b) {
                    p.2.merge(&q.2);
                }
            }
            (Answer::Rows { rows: a, .. }, Answer::Rows { rows: b, .. }) => {
                *a = merge_rows(std::mem::take(a), b, |t, u| t.merge(&u));
            }
            (Answer::Sketches(a), Answer::Sketches(b)) => {
                for (p, q) in a.iter_mut().zip(b) {
                    p.2.merge(&q.2);
                }
            }
            (Answer::SketchRows { rows: a, .. }, Answer::SketchRows { rows: b, .. }) => {
                *a = merge_rows(std::mem::take(a), b, |t, u| t.merge(&u));
            }
            // Two kinds of answer to one query cannot happen between nodes of one version;
            // keep ours rather than guess.
            _ => {}
        }
    }
}

/// Two lists of rows sorted by name, merged into one (rows of one name combined by `add`).
pub(crate) fn merge_rows<T>(
    a: Vec<(Option<String>, T)>,
    b: Vec<(Option<String>, T)>,
    add: impl Fn(&mut T, T),
) -> Vec<(Option<String>, T)> {
    let mut out = Vec::with_capacity(a.len().max(b.len()));
    let mut x = a.into_iter().peekable();
    let mut y = b.into_iter().peekable();
    loop {
        let take_x = match (x.peek(), y.peek()) {
            (Some(p), Some(q)) => match p.0.cmp(&q.0) {
                std::cmp::Ordering::Less => Some(true),
                std::cmp::Ordering::Greater => Some(false),
                std::cmp::Ordering::Equal => {
                    if let (Some((name, mut t)), Some((_, u))) = (x.next(), y.next()) {
                        add(&mut t, u);
                        out.push((name, t));
                    }
                    continue;
                }
            },
            (Some(_), None) => Some(true),
            (None, Some(_)) => Some(false),
            (None, None) => None,
        };
        let next = match take_x {
            Some(true) => x.next(),
            Some(false) => y.next(),
            None => break,
        };
        out.extend(next);
    }
    out
}

/// One group's place in a cluster-wide answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupAnswer {
    /// The group's name.
    pub name: String,
    /// Whether it answered in time.
    pub answered: bool,
    /// Whether the node that answered saw all its group's peers.
    pub complete: bool,
    /// When it answered (ms), if it did.
    pub as_of_ms: Option<i64>,
    /// The group whose answer holds this (drained) group's state, if one does: its own part
    /// is then left out, answered or not.
    pub absorbed_by: Option<String>,
    /// Why it did not, if it did not.
    pub error: Option<String>,
}

/// Names in each group's place the group whose part holds its state (a drained group an
/// answering heir absorbed).
pub(crate) fn mark_absorbed(parts: &mut [(GroupAnswer, Option<Part>)]) {
    for i in 0..parts.len() {
        let name = parts[i].0.name.clone();
        let by = parts.iter().find_map(|(g, p)| {
            p.as_ref()
                .filter(|p| p.absorbed.contains(&name))
                .map(|_| g.name.clone())
        });
        parts[i].0.absorbed_by = by;
    }
}

/// Merges every group's part of a query into the cluster's answer: the answer, whether it is
/// complete, and each group's place in it. A drained group's state is in its heir's part once
/// the heir absorbed it: the group's own part is then left out (answered or not) — else it
/// would count twice — and its absence does not make the answer incomplete. Every other group
/// must have answered from a node that saw all its peers for the answer to be complete.
pub fn combine(
    q: &Query,
    mut parts: Vec<(GroupAnswer, Option<Part>)>,
) -> (Answer, bool, Vec<GroupAnswer>) {
    mark_absorbed(&mut parts);
    let mut answer: Option<Answer> = None;
    let mut complete = true;
    let mut groups = Vec::with_capacity(parts.len());
    for (g, p) in parts {
        if g.absorbed_by.is_none() {
            complete &= g.answered && g.complete;
            if let Some(p) = p {
                match &mut answer {
                    Some(a) => a.merge(p.answer),
                    None => answer = Some(p.answer),
                }
            }
        }
        groups.push(g);
    }
    let answer = answer.unwrap_or_else(|| q.run(&Replica::new()));
    (answer, complete, groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgetally_core::Summary;

    fn t(count: u64, v: f64) -> Total {
        let mut t = Total::EMPTY;
        for _ in 0..count {
            t.add(&Summary::of(v).expect("finite"));
        }
        t
    }

    #[test]
    fn rows_merge_by_name_and_points_by_position() {
        let mut a = Answer::Rows {
            start: 0,
            end: 10,
            rows: vec![(None, t(1, 1.0)), (Some("a".into()), t(2, 2.0))],
        };
        a.merge(Answer::Rows {
            start: 0,
            end: 10,
            rows: vec![
                (Some("a".into()), t(3, 5.0)),
                (Some("b".into()), t(1, -1.0)),
            ],
        });
        let mut want_a = t(2, 2.0);
        want_a.merge(&t(3, 5.0));
        assert_eq!(
            a,
            Answer::Rows {
                start: 0,
                end: 10,
                rows: vec![
                    (None, t(1, 1.0)),
                    (Some("a".into()), want_a),
                    (Some("b".into()), t(1, -1.0))
                ]
            }
        );
        let mut p = Answer::Points(vec![(0, 5, t(1, 1.0)), (5, 10, Total::EMPTY)]);
        p.merge(Answer::Points(vec![(0, 5, t(1, 3.0)), (5, 10, t(2, 4.0))]));
        let mut first = t(1, 1.0);
        first.merge(&t(1, 3.0));
        assert_eq!(p, Answer::Points(vec![(0, 5, first), (5, 10, t(2, 4.0))]));
    }
}
