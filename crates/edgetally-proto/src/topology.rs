//! The cluster's group map (issue 13's shard groups): S groups of replicas, and which group
//! owns a batch. A producer belongs to one group by rendezvous hashing of its key over the
//! groups' *names* ([`rendezvous_weight`]), so:
//!
//! - every party that holds the same map (the SDK, every merger) computes the same owner, with
//!   no table to share;
//! - the owner does not depend on the order the groups are listed in, nor on their replicas;
//! - adding a group moves to it the producers it now outweighs (about 1/(S+1) of them) and no
//!   other producer; removing a group moves only its own producers.
//!
//! **Maps take effect at a time, and a batch is routed by its own creation time.** A topology
//! is a list of maps, each in force for batches *created* (the signed `created_ms`) from its
//! `from_ms` on. A batch's owner is therefore a pure function of its bytes and the topology:
//! every resend of one batch, before or after a routing change, goes to the same group, so
//! no batch id is ever applied in two groups and the groups' totals add up exactly. A change
//! is written as a new map with `from_ms` a little in the future (time for every node to
//! reload it); earlier maps stay listed as long as batches created under them can arrive
//! (`max_lateness`), and their groups keep answering queries for what they merged.
//!
//! Totals merge, so a routing change never moves merged data: it only decides where
//! *future* batches go.

use crate::rendezvous::rendezvous_weight;
use edgetally_core::{BatchId, ProducerKey, SeenSet};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One shard group: a name (what producers are hashed against: keep it when the replicas
/// change) and the addresses of its replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Stable name, unique in a map.
    pub name: String,
    /// The replicas' QUIC addresses (`host:port`, at least one).
    pub quic: Vec<String>,
    /// The replicas' HTTP API addresses (`host:port`), for producers without QUIC.
    #[serde(default)]
    pub http: Vec<String>,
}

/// The groups in force for batches created from `from_ms` on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Map {
    /// First creation time (ms since the epoch) this map routes; the first map also routes
    /// every earlier batch.
    #[serde(default)]
    pub from_ms: i64,
    /// The groups, in any order.
    pub groups: Vec<Group>,
}

/// A versioned list of maps, oldest first. A node that reloads its topology keeps the higher
/// version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Increases with every change.
    pub version: u64,
    /// The maps, by increasing `from_ms`.
    pub maps: Vec<Map>,
    /// Groups being removed: each drained group → the group that absorbs its state and takes
    /// every batch it owned, past and future (docs/design/shard-groups.md, "Draining a group").
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub drains: BTreeMap<String, String>,
}

/// Why a topology is unusable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// No map, or a map without a group.
    #[error("the topology has no group")]
    Empty,
    /// A group without a name.
    #[error("a group has an empty name")]
    UnnamedGroup,
    /// Two groups with one name in a map (producers could not tell them apart).
    #[error("two groups are named {0:?}")]
    DuplicateName(String),
    /// A group without replicas.
    #[error("group {0:?} has no replica")]
    NoReplica(String),
    /// Maps not listed by strictly increasing `from_ms`.
    #[error("maps must be listed by strictly increasing from_ms")]
    Unordered,
    /// A reload whose version is not above the one in force (with other content).
    #[error("version {0} does not follow version {1}")]
    StaleVersion(u64, u64),
    /// A drain into a group no map lists, or drains that form a cycle.
    #[error("group {0:?} drains into a group no map lists, or into itself through others")]
    BadDrain(String),
}

impl Map {
    fn check(&self) -> Result<(), TopologyError> {
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
        if let Some(g) = self.groups.iter().find(|g| g.quic.is_empty()) {
            return Err(TopologyError::NoReplica(g.name.clone()));
        }
        Ok(())
    }

    /// The index (in `groups`) of the group that owns `producer`'s batches under this map:
    /// the one whose name weighs most for the key (ties, between equal names, to the lower
    /// index). `None` without groups.
    pub fn owner(&self, producer: &ProducerKey) -> Option<usize> {
        heaviest(producer, self.groups.iter().map(|g| g.name.as_str()))
    }

    fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.groups.iter().map(|g| g.name.as_str()).collect();
        v.sort_unstable();
        v
    }
}

/// The index of the name that weighs most for `producer` (rendezvous; ties, between equal
/// names, to the first): the owner rule, shared by [`Map::owner`] and the producer's
/// reduced routes.
pub fn heaviest<'a>(
    producer: &ProducerKey,
    names: impl IntoIterator<Item = &'a str>,
) -> Option<usize> {
    names
        .into_iter()
        .map(|n| rendezvous_weight(&producer.0, n.as_bytes()))
        .enumerate()
        .fold(None, |best: Option<(usize, u64)>, (i, w)| match best {
            Some((_, bw)) if bw >= w => best,
            _ => Some((i, w)),
        })
        .map(|(i, _)| i)
}

/// Of maps listed oldest first, the one in force for a batch created at `created_ms`: the
/// newest whose `from_ms` is not after it, else the first (which routes every earlier
/// batch). Shared by [`Topology::map_at`] and the producer's reduced routes.
pub fn in_force<T>(maps: &[T], from_ms: impl Fn(&T) -> i64, created_ms: i64) -> Option<&T> {
    maps.iter()
        .rev()
        .find(|m| from_ms(m) <= created_ms)
        .or(maps.first())
}

/// What a node does with a producer's batch ([`Topology::decide`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// This node's group owns it: check and apply it here.
    Take,
    /// Another group owns it: forward it there (the owner's reply is the producer's).
    Forward(Group),
    /// This group owns it once it has absorbed the drained group named: answer Retry.
    AwaitAbsorb(String),
    /// This group owns it, but an earlier map gave it to the group named, which has not yet
    /// handed over at this node's version (it might still take such batches): answer Retry.
    AwaitHandoff(String),
}

/// What the groups that earlier maps made owners of this group's producers handed over
/// ([`Topology::handoff_sources`]): at which topology version each finished, and every batch
/// id they had applied of producers this group may own. Such a batch is counted in the group
/// that applied it; this group acknowledges it and never applies it.
///
/// The rule it serves: a node takes a batch that an earlier map gave to another group only
/// once every replica of that group has adopted the node's topology version (so none takes
/// such a batch any more) and answered with what it applied — whatever order the versions
/// reach the nodes in, a batch id is then applied in one group only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoffs {
    /// Source group → the topology version at which its hand-off finished.
    pub done: BTreeMap<String, u64>,
    /// The batch ids the sources had applied, by (producer, epoch).
    pub seen: BTreeMap<(ProducerKey, u64), SeenSet>,
}

impl Handoffs {
    /// Whether `group` handed over at `version` or later.
    pub fn is_done(&self, group: &str, version: u64) -> bool {
        self.done.get(group).is_some_and(|&v| v >= version)
    }

    /// Whether another group applied the batch `id` (before handing over).
    pub fn applied_elsewhere(&self, id: &BatchId) -> bool {
        self.seen
            .get(&(id.producer, id.epoch))
            .is_some_and(|s| s.contains(id.seq))
    }

    /// Adds one replica's answer (what it applied). A malformed seen-set (from the network)
    /// is refused whole: nothing is added.
    pub fn add(&mut self, entries: Vec<(ProducerKey, u64, SeenSet)>) -> Result<(), String> {
        if entries.iter().any(|(_, _, s)| !s.is_well_formed()) {
            return Err("a malformed seen-set in a hand-off".into());
        }
        for (p, e, s) in entries {
            self.seen.entry((p, e)).or_default().union(&s);
        }
        Ok(())
    }

    /// Records that `group` handed over at `version`.
    pub fn finish(&mut self, group: &str, version: u64) {
        let v = self.done.entry(group.to_string()).or_insert(version);
        *v = (*v).max(version);
    }
}

impl Topology {
    /// A topology of one map, in force from the start.
    pub fn single(version: u64, groups: Vec<Group>) -> Topology {
        Topology {
            version,
            maps: vec![Map { from_ms: 0, groups }],
            drains: BTreeMap::new(),
        }
    }

    /// Checks that the topology can route: at least one map, maps by strictly increasing
    /// `from_ms`, each with groups whose names are non-empty and unique and which have a
    /// replica.
    pub fn check(&self) -> Result<(), TopologyError> {
        if self.maps.is_empty() {
            return Err(TopologyError::Empty);
        }
        if self.maps.windows(2).any(|w| w[0].from_ms >= w[1].from_ms) {
            return Err(TopologyError::Unordered);
        }
        self.maps.iter().try_for_each(Map::check)?;
        let listed = self.all_groups();
        for (from, into) in &self.drains {
            if !listed.iter().any(|g| &g.name == into) || self.heir(from).is_none() {
                return Err(TopologyError::BadDrain(from.clone()));
            }
        }
        Ok(())
    }

    /// Where the group `name` ends up through the drains: itself if it is not drained, else
    /// the group that absorbs it (following drains of drains). `None` on a cycle.
    pub fn heir<'a>(&'a self, mut name: &'a str) -> Option<&'a str> {
        for _ in 0..=self.drains.len() {
            match self.drains.get(name) {
                Some(next) => name = next,
                None => return Some(name),
            }
        }
        None
    }

    /// The group that takes the batch `producer` created at `created_ms`, and the group the
    /// map names for it when that one is drained (the taker then waits until it has absorbed
    /// that group's state before applying such batches).
    pub fn route(&self, producer: &ProducerKey, created_ms: i64) -> Option<(&Group, Option<&str>)> {
        let named = self.owner(producer, created_ms)?;
        let heir = self.heir(&named.name)?;
        if heir == named.name {
            return Some((named, None));
        }
        let g = self.all_groups().into_iter().find(|g| g.name == heir)?;
        Some((g, Some(named.name.as_str())))
    }

    /// What a node of group `me` does with the batch `producer` created at `created_ms`
    /// (its signed `created_ms`; see [`crate::peek`]): the one routing rule, shared by the
    /// merger and the simulation. `has_absorbed` says whether this node's state already
    /// holds a drained group's; `handed_off` whether a group finished its hand-off
    /// ([`Handoffs`]) at this topology's version. No owner at all (an empty topology) is
    /// [`Decision::Take`]: the node then answers as any node would.
    pub fn decide(
        &self,
        me: &str,
        producer: &ProducerKey,
        created_ms: i64,
        has_absorbed: impl FnOnce(&str) -> bool,
        handed_off: impl Fn(&str) -> bool,
    ) -> Decision {
        match self.route(producer, created_ms) {
            Some((g, _)) if g.name != me => Decision::Forward(g.clone()),
            // A resend of a batch the drained group merged must not count here before its
            // state does.
            Some((_, Some(drained))) if !has_absorbed(drained) => {
                Decision::AwaitAbsorb(drained.to_string())
            }
            // A node still on a version without the map in force may take it as its own.
            Some(_) => match self
                .earlier_owners(producer, created_ms, me)
                .into_iter()
                .find(|h| !handed_off(h))
            {
                Some(h) => Decision::AwaitHandoff(h.to_string()),
                None => Decision::Take,
            },
            None => Decision::Take,
        }
    }

    /// The groups other than `me` that the maps before the one in force at `created_ms` make
    /// owners of `producer`: a node on a version that ends with one of those maps routes the
    /// batch there.
    pub fn earlier_owners(&self, producer: &ProducerKey, created_ms: i64, me: &str) -> Vec<&str> {
        let at = self
            .maps
            .iter()
            .rposition(|m| m.from_ms <= created_ms)
            .unwrap_or(0);
        let mut v: Vec<&str> = self.maps[..at]
            .iter()
            .filter_map(|m| m.owner(producer).map(|i| m.groups[i].name.as_str()))
            .filter(|n| *n != me)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The groups that must hand over to `me` ([`Handoffs`]): those listed in a map before
    /// one that lists `me`, so that some producer may move from them to `me`. Each as the
    /// newest map that lists it describes it.
    pub fn handoff_sources(&self, me: &str) -> Vec<&Group> {
        let Some(last) = self
            .maps
            .iter()
            .rposition(|m| m.groups.iter().any(|g| g.name == me))
        else {
            return Vec::new();
        };
        let before: std::collections::BTreeSet<&str> = self.maps[..last]
            .iter()
            .flat_map(|m| m.groups.iter().map(|g| g.name.as_str()))
            .filter(|n| *n != me)
            .collect();
        self.all_groups()
            .into_iter()
            .filter(|g| before.contains(g.name.as_str()))
            .collect()
    }

    /// Whether some map makes `group` the owner of `producer` (what a hand-off to `group`
    /// sends is about these producers only).
    pub fn could_own(&self, producer: &ProducerKey, group: &str) -> bool {
        self.maps
            .iter()
            .any(|m| m.owner(producer).is_some_and(|i| m.groups[i].name == group))
    }

    /// The map that routes batches created at `created_ms`.
    pub fn map_at(&self, created_ms: i64) -> Option<&Map> {
        in_force(&self.maps, |m| m.from_ms, created_ms)
    }

    /// The group that owns the batch `producer` created at `created_ms`.
    pub fn owner(&self, producer: &ProducerKey, created_ms: i64) -> Option<&Group> {
        let m = self.map_at(created_ms)?;
        m.owner(producer).map(|i| &m.groups[i])
    }

    /// Every group of every map, once by name, each as the newest map that lists it describes
    /// it (replicas may have changed): the groups a cluster-wide query asks. Sorted by name.
    pub fn all_groups(&self) -> Vec<&Group> {
        let mut v: Vec<&Group> = Vec::new();
        for m in self.maps.iter().rev() {
            for g in &m.groups {
                if !v.iter().any(|h| h.name == g.name) {
                    v.push(g);
                }
            }
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Whether `self` may replace `old` (a reload): a higher version, or the same content.
    /// Returns the creation times at or before `now_ms` whose owner the change alters: a batch
    /// created then may already be merged by its former owner, and a resend of it would now
    /// go to another group (the caller warns: maps must be changed ahead of their `from_ms`).
    pub fn follows(&self, old: &Topology, now_ms: i64) -> Result<Vec<i64>, TopologyError> {
        if self == old {
            return Ok(Vec::new());
        }
        if self.version <= old.version {
            return Err(TopologyError::StaleVersion(self.version, old.version));
        }
        // Every boundary of either list at or before now, and the start: the routing in force
        // between two such times is one map on each side, so comparing the maps' group names
        // at each boundary compares the routing of every past creation time.
        let mut times: Vec<i64> = self
            .maps
            .iter()
            .chain(&old.maps)
            .map(|m| m.from_ms)
            .filter(|&t| t <= now_ms)
            .chain([i64::MIN])
            .collect();
        times.sort_unstable();
        times.dedup();
        Ok(times
            .into_iter()
            .filter(|&t| self.map_at(t).map(Map::names) != old.map_at(t).map(Map::names))
            .collect())
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

    fn groups(names: &[&str]) -> Vec<Group> {
        names
            .iter()
            .map(|n| Group {
                name: n.to_string(),
                quic: vec![format!("{n}.example:7071")],
                http: Vec::new(),
            })
            .collect()
    }

    fn map(names: &[&str]) -> Topology {
        Topology::single(1, groups(names))
    }

    fn owner_name(t: &Topology, k: &ProducerKey, at: i64) -> String {
        t.owner(k, at).expect("owner").name.clone()
    }

    const KEYS: u32 = 20_000;

    #[test]
    fn groups_share_producers_evenly() {
        for s in [2usize, 3, 4, 7] {
            let names: Vec<String> = (0..s).map(|i| format!("g{i}")).collect();
            let t = map(&names.iter().map(String::as_str).collect::<Vec<_>>());
            let mut n = vec![0u32; s];
            for i in 0..KEYS {
                n[t.maps[0].owner(&key(i)).expect("owner")] += 1;
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
        b.maps[0].groups[1].quic.push("east-2.example:7071".into());
        for i in 0..2000 {
            let k = key(i);
            assert_eq!(owner_name(&a, &k, 5), owner_name(&b, &k, 5));
        }
    }

    #[test]
    fn adding_a_group_moves_only_its_share_and_only_to_it() {
        let before = map(&["g0", "g1", "g2"]);
        let after = map(&["g0", "g1", "g2", "g3"]);
        let mut moved = 0u32;
        for i in 0..KEYS {
            let k = key(i);
            let (b, a) = (owner_name(&before, &k, 0), owner_name(&after, &k, 0));
            if b != a {
                moved += 1;
                assert_eq!(a, "g3");
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
            if owner_name(&after, &k, 0) != "g3" {
                assert_eq!(owner_name(&after, &k, 0), owner_name(&before, &k, 0));
            }
        }
    }

    /// A batch's owner is fixed by its creation time: resends of a batch created before a
    /// change go where it first went, whenever they arrive; batches created after go by the
    /// new map.
    #[test]
    fn batches_route_by_the_map_of_their_creation_time() {
        let t = Topology {
            version: 2,
            maps: vec![
                Map {
                    from_ms: 0,
                    groups: groups(&["g0", "g1"]),
                },
                Map {
                    from_ms: 1_000,
                    groups: groups(&["g0", "g1", "g2"]),
                },
            ],
            drains: BTreeMap::new(),
        };
        assert_eq!(t.check(), Ok(()));
        let old = map(&["g0", "g1"]);
        let new = map(&["g0", "g1", "g2"]);
        let mut moved = 0;
        for i in 0..KEYS {
            let k = key(i);
            for at in [-5, 0, 999] {
                assert_eq!(owner_name(&t, &k, at), owner_name(&old, &k, 0));
            }
            for at in [1_000, i64::MAX] {
                assert_eq!(owner_name(&t, &k, at), owner_name(&new, &k, 0));
            }
            moved += usize::from(owner_name(&t, &k, 999) != owner_name(&t, &k, 1_000));
        }
        assert!(moved > 0);
        let names: Vec<&str> = t.all_groups().iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["g0", "g1", "g2"]);
    }

    #[test]
    fn a_batch_an_earlier_map_gave_elsewhere_waits_for_that_groups_hand_off() {
        let t = Topology {
            version: 2,
            maps: vec![
                Map {
                    from_ms: 0,
                    groups: groups(&["g0", "g1"]),
                },
                Map {
                    from_ms: 1_000,
                    groups: groups(&["g0", "g1", "g2"]),
                },
            ],
            drains: BTreeMap::new(),
        };
        let names = |v: Vec<&Group>| v.iter().map(|g| g.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(t.handoff_sources("g2")), ["g0", "g1"]);
        assert_eq!(names(t.handoff_sources("g0")), ["g1"]);
        assert!(map(&["a", "b"]).handoff_sources("a").is_empty());
        let (mut moved, mut stayed) = (0, 0);
        for i in 0..KEYS {
            let k = key(i);
            let before = owner_name(&t, &k, 999);
            let after = owner_name(&t, &k, 1_000);
            assert!(t.could_own(&k, &before) && t.could_own(&k, &after));
            let none = |_: &str| false;
            let all = |_: &str| true;
            // Created under the first map: no earlier map, nothing to wait for.
            assert!(t.earlier_owners(&k, 999, &before).is_empty());
            assert_eq!(t.decide(&before, &k, 999, |_| true, none), Decision::Take);
            if before == after {
                stayed += 1;
                assert_eq!(t.decide(&after, &k, 1_000, |_| true, none), Decision::Take);
            } else {
                moved += 1;
                assert_eq!(t.earlier_owners(&k, 1_000, &after), [before.as_str()]);
                assert_eq!(
                    t.decide(&after, &k, 1_000, |_| true, none),
                    Decision::AwaitHandoff(before.clone())
                );
                assert_eq!(t.decide(&after, &k, 1_000, |_| true, all), Decision::Take);
                let only_other = |g: &str| g != before;
                assert_eq!(
                    t.decide(&after, &k, 5_000, |_| true, only_other),
                    Decision::AwaitHandoff(before.clone())
                );
            }
        }
        assert!(moved > 0 && stayed > 0);
        let mut h = Handoffs::default();
        let id = BatchId {
            producer: key(1),
            epoch: 7,
            seq: 3,
        };
        let mut seen = SeenSet::new();
        seen.insert(3);
        h.add(vec![(key(1), 7, seen)]).expect("well formed");
        assert!(h.applied_elsewhere(&id));
        assert!(!h.applied_elsewhere(&BatchId { seq: 4, ..id }));
        assert!(!h.is_done("g1", 2));
        h.finish("g1", 2);
        assert!(h.is_done("g1", 2) && !h.is_done("g1", 3));
    }

    #[test]
    fn a_reload_must_raise_the_version_and_changes_in_the_past_are_reported() {
        let now = 10_000;
        let v1 = map(&["a", "b"]);
        let mut v2 = v1.clone();
        v2.version = 2;
        v2.maps.push(Map {
            from_ms: now + 60_000,
            groups: groups(&["a", "b", "c"]),
        });
        // Ahead of its time: nothing already routed changes.
        assert_eq!(v2.follows(&v1, now), Ok(vec![]));
        // The same content again is no change; another content needs a higher version.
        assert_eq!(v1.follows(&v1, now), Ok(vec![]));
        let mut same_version = v2.clone();
        same_version.version = 1;
        assert_eq!(
            same_version.follows(&v1, now),
            Err(TopologyError::StaleVersion(1, 1))
        );
        // Replacing a replica changes no owner.
        let mut v3 = v2.clone();
        v3.version = 3;
        v3.maps[0].groups[0].quic = vec!["a-new.example:7071".into()];
        assert_eq!(v3.follows(&v2, now), Ok(vec![]));
        // A map whose time has passed when it is loaded re-routes batches created since.
        let mut late = v1.clone();
        late.version = 4;
        late.maps.push(Map {
            from_ms: now - 5_000,
            groups: groups(&["a", "b", "c"]),
        });
        assert_eq!(late.follows(&v1, now), Ok(vec![now - 5_000]));
        let mut rewritten = map(&["a", "c"]);
        rewritten.version = 5;
        assert_eq!(rewritten.follows(&v1, now), Ok(vec![i64::MIN, 0]));
    }

    /// A drained group's batches, past and future, go to its heir, marked as the drained
    /// group's (the heir waits for its state first); no other batch moves.
    #[test]
    fn a_drained_groups_batches_go_to_its_heir() {
        let plain = map(&["g0", "g1", "g2"]);
        let mut t = plain.clone();
        t.drains.insert("g2".into(), "g0".into());
        assert_eq!(t.check(), Ok(()));
        let mut drained = 0;
        for i in 0..KEYS {
            let k = key(i);
            let (g, via) = t.route(&k, 0).expect("route");
            if owner_name(&plain, &k, 0) == "g2" {
                drained += 1;
                assert_eq!((g.name.as_str(), via), ("g0", Some("g2")));
            } else {
                assert_eq!((g.name.clone(), via), (owner_name(&plain, &k, 0), None));
            }
        }
        assert!(drained > 0);
        // Drains of drains end at the last heir; a cycle or an unknown heir is refused.
        t.drains.insert("g0".into(), "g1".into());
        assert_eq!(t.heir("g2"), Some("g1"));
        assert_eq!(t.check(), Ok(()));
        t.drains.insert("g1".into(), "g2".into());
        assert!(matches!(t.check(), Err(TopologyError::BadDrain(_))));
        let mut u = plain.clone();
        u.drains.insert("g1".into(), "nowhere".into());
        assert_eq!(u.check(), Err(TopologyError::BadDrain("g1".into())));
    }

    #[test]
    fn unusable_topologies_are_refused_with_a_reason() {
        assert_eq!(Topology::default().check(), Err(TopologyError::Empty));
        assert_eq!(map(&[]).check(), Err(TopologyError::Empty));
        assert_eq!(map(&["a", ""]).check(), Err(TopologyError::UnnamedGroup));
        assert_eq!(
            map(&["a", "b", "a"]).check(),
            Err(TopologyError::DuplicateName("a".into()))
        );
        let mut t = map(&["a", "b"]);
        t.maps[0].groups[1].quic.clear();
        assert_eq!(t.check(), Err(TopologyError::NoReplica("b".into())));
        let mut t = map(&["a", "b"]);
        t.maps.push(t.maps[0].clone());
        assert_eq!(t.check(), Err(TopologyError::Unordered));
        assert_eq!(map(&["a", "b"]).check(), Ok(()));
        assert_eq!(Topology::default().owner(&key(1), 0), None);
    }
}
