//! `/v1/topk` by count across shard groups in rounds, the I/O half: each round asks this
//! node's replica and the other groups ([`Cluster::gather_each`]) for what
//! [`TopKRounds`](crate::scatter::topk::TopKRounds) needs next.

use super::Cluster;
use crate::node::Node;
use crate::scatter::topk::{TopKAsk, TopKRounds};
use crate::scatter::{GroupAnswer, Part, Query};

/// The feature of the peer protocol the rounds need (`handshake::FEATURES`).
pub const TOPK_ROUNDS: &str = "topk-rounds";

impl Node {
    /// One round: the part of every group `ask` has a query for, this node's first.
    async fn round(
        &self,
        c: &std::sync::Arc<Cluster>,
        ask: &(dyn Fn(&str) -> Option<Query> + Sync),
        until: tokio::time::Instant,
    ) -> Vec<(GroupAnswer, Option<Part>)> {
        let mut parts: Vec<_> = ask(&c.group)
            .map(|q| c.own_part(self, &q))
            .into_iter()
            .collect();
        parts.extend(c.gather_each(ask, Some(TOPK_ROUNDS), until).await);
        parts
    }

    /// The exact top `k` by count of `a` across the cluster, in at most three rounds (one
    /// without other groups): the ranked rows, whether the answer is complete, and each
    /// group's place in it (as [`Node::query`] gives them). If a group runs a release without the rounds, every
    /// group is asked for every row, as before them.
    pub async fn topk_by_count(
        &self,
        a: &TopKAsk,
        k: usize,
    ) -> (edgetally_core::Rows, bool, Vec<GroupAnswer>) {
        let Some(c) = &self.cluster else {
            let mine = self.part(&a.round(k, None, Vec::new()));
            let mut rows = mine.answer.into_rows();
            rows.rank(k);
            return (rows, mine.complete, Vec::new());
        };
        // Every round within the one deadline a gathered query has (`query_deadline_ms`).
        let until = tokio::time::Instant::now() + c.deadline;
        let first = self
            .round(c, &|_| Some(a.round(k, None, Vec::new())), until)
            .await;
        let earlier = first.iter().any(|(g, _)| {
            g.error
                .as_deref()
                .is_some_and(|e| Cluster::lacked(e, TOPK_ROUNDS))
        });
        if earlier {
            return self.topk_gathered(a, k).await;
        }
        let mut rounds = TopKRounds::first(k, first);
        if let Some((t, open)) = rounds.second() {
            let second = self
                .round(
                    c,
                    &|g| {
                        open.iter()
                            .any(|o| o == g)
                            .then(|| a.round(0, Some(t), Vec::new()))
                    },
                    until,
                )
                .await;
            rounds.take_second(t, second);
            let asks = rounds.third();
            if !asks.is_empty() {
                let third = self
                    .round(
                        c,
                        &|g| {
                            asks.iter()
                                .find(|(o, _)| o == g)
                                .map(|(_, names)| a.round(0, None, names.clone()))
                        },
                        until,
                    )
                    .await;
                rounds.take_third(third);
            }
        }
        if rounds.absorbed_since() {
            // A drain completed between rounds: one gather, which leaves the absorbed group
            // out exactly.
            return self.topk_gathered(a, k).await;
        }
        rounds.finish()
    }

    /// The top `k` from every row of every group, in one gather (as before the rounds).
    async fn topk_gathered(
        &self,
        a: &TopKAsk,
        k: usize,
    ) -> (edgetally_core::Rows, bool, Vec<GroupAnswer>) {
        let (answer, complete, groups) = self
            .query(Query::TopK {
                category: a.category.clone(),
                start: a.start,
                end: a.end,
                by_producer: a.by_producer,
            })
            .await;
        let mut rows = answer.into_rows();
        rows.rank(k);
        (rows, complete, groups)
    }
}
