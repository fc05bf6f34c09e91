//! The cluster's group map (issue 13's shard groups): S groups of replicas, and which group
//! owns a producer. A producer belongs to one group by rendezvous hashing of its key over the
//! groups' *names* ([`rendezvous_weight`]), so:
//!
//! - every party that holds the same map (the SDK, every merger) computes the same owner, with
//!   no table to share;
//! - the owner does not depend on the order the groups are listed in, nor on their replicas;
//! - adding a group moves to it the producers it now outweighs (about 1/(S+1) of them) and no
//!   other producer; removing a group moves only its own producers.
//!
//! Totals merge, so a routing change never moves merged data: it only decides where a
//! producer's *future* batches go. This module is the function both sides agree on; the
//! merger's forwarding, the topology reload and the scatter-gather queries build on it.

use crate::producer::rendezvous_weight;
use edgetally_core::ProducerKey;
use serde::{Deserialize, Serialize};

/// One shard group: a name (what producers are hashed against: keep it when the replicas
/// change) and the endpoints of its replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Stable name, unique in the map.
    pub name: String,
    /// The replicas' endpoints (at least one).
    pub replicas: Vec<String>,
}

/// A versioned group map. A node that reloads its map keeps the higher version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Increases with every change of the map.
    pub version: u64,
    /// The groups, in any order.
    pub groups: Vec<Group>,
}

/// Why a group map is unusable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// No group at all.
    #[error("the topology has no group")]
    Empty,
    /// A group without a name.
    #[error("a group has an empty name")]
    UnnamedGroup,
    /// Two groups with one name (producers could not tell them apart).
    #[error("two groups are named {0:?}")]
    DuplicateName(String),
    /// A group without replicas.
    #[error("group {0:?} has no replica")]
    NoReplica(String),
}

impl Topology {
    /// Checks that the map can route: at least one group, names non-empty and unique, every
    /// group with a replica.
    pub fn check(&self) -> Result<(), TopologyError> {
        if self.groups.is_empty() {
            return Err(TopologyError::Empty);
        }
        let mut names: Vec<&str> = self.groups.iter().map(|g| g.name.as_str()).collect();
        names.sort_unstable();
        if names.first().is_some_and(|n| n.is_empty()) {
            return Err(TopologyError::UnnamedGroup);
        }
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(TopologyError::DuplicateName(w[0].to_string()));
        }
        if let Some(g) = self.groups.iter().find(|g| g.replicas.is_empty()) {
            return Err(TopologyError::NoReplica(g.name.clone()));
        }
        Ok(())
    }

    /// The index (in `groups`) of the group that owns `producer`: the one whose name weighs
    /// most for the key (ties, between equal names, to the lower index). `None` without groups.
    pub fn owner(&self, producer: &ProducerKey) -> Option<usize> {
        self.groups
            .iter()
            .map(|g| rendezvous_weight(&producer.0, g.name.as_bytes()))
            .enumerate()
            .fold(None, |best: Option<(usize, u64)>, (i, w)| match best {
                Some((_, bw)) if bw >= w => best,
                _ => Some((i, w)),
            })
            .map(|(i, _)| i)
    }

    /// The group that owns `producer`.
    pub fn owner_group(&self, producer: &ProducerKey) -> Option<&Group> {
        self.owner(producer).map(|i| &self.groups[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> ProducerKey {
        let mut k = [0x5au8; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        ProducerKey(k)
    }

    fn map(names: &[&str]) -> Topology {
        Topology {
            version: 1,
            groups: names
                .iter()
                .map(|n| Group {
                    name: n.to_string(),
                    replicas: vec![format!("https://{n}.example:7071")],
                })
                .collect(),
        }
    }

    const KEYS: u32 = 20_000;

    #[test]
    fn groups_share_producers_evenly() {
        for s in [2usize, 3, 4, 7] {
            let names: Vec<String> = (0..s).map(|i| format!("g{i}")).collect();
            let t = map(&names.iter().map(String::as_str).collect::<Vec<_>>());
            let mut n = vec![0u32; s];
            for i in 0..KEYS {
                n[t.owner(&key(i)).expect("owner")] += 1;
            }
            let share = f64::from(KEYS) / s as f64;
            assert!(
                n.iter()
                    .all(|&c| (f64::from(c) - share).abs() < 0.08 * share),
                "S={s}: {n:?}"
            );
        }
    }

    #[test]
    fn the_owner_depends_on_names_not_order_or_replicas() {
        let a = map(&["east", "west", "north"]);
        let mut b = map(&["north", "east", "west"]);
        b.groups[1]
            .replicas
            .push("https://east-2.example:7071".into());
        for i in 0..2000 {
            let k = key(i);
            assert_eq!(
                a.owner_group(&k).map(|g| &g.name),
                b.owner_group(&k).map(|g| &g.name)
            );
        }
    }

    #[test]
    fn adding_a_group_moves_only_its_share_and_only_to_it() {
        let before = map(&["g0", "g1", "g2"]);
        let after = map(&["g0", "g1", "g2", "g3"]);
        let mut moved = 0u32;
        for i in 0..KEYS {
            let k = key(i);
            let (b, a) = (before.owner_group(&k), after.owner_group(&k));
            if b != a {
                moved += 1;
                assert_eq!(a.map(|g| g.name.as_str()), Some("g3"));
            }
        }
        let share = f64::from(KEYS) / 4.0;
        assert!(
            (f64::from(moved) - share).abs() < 0.08 * share,
            "{moved} moved"
        );
        // Removing it again moves exactly those producers back, and no other.
        for i in 0..KEYS {
            let k = key(i);
            if after.owner_group(&k).map(|g| g.name.as_str()) != Some("g3") {
                assert_eq!(after.owner_group(&k), before.owner_group(&k));
            }
        }
    }

    #[test]
    fn unusable_maps_are_refused_with_a_reason() {
        assert_eq!(Topology::default().check(), Err(TopologyError::Empty));
        assert_eq!(map(&["a", ""]).check(), Err(TopologyError::UnnamedGroup));
        assert_eq!(
            map(&["a", "b", "a"]).check(),
            Err(TopologyError::DuplicateName("a".into()))
        );
        let mut t = map(&["a", "b"]);
        t.groups[1].replicas.clear();
        assert_eq!(t.check(), Err(TopologyError::NoReplica("b".into())));
        assert_eq!(map(&["a", "b"]).check(), Ok(()));
        assert_eq!(Topology::default().owner(&key(1)), None);
    }
}
