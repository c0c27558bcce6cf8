//! The replicated cluster store: a map from key to the latest version of an object
//! (or a tombstone). Merging two stores keeps, per key, the entry with the higher
//! [`Version`], so any two nodes that have seen the same entries hold the same store,
//! whatever the order they saw them in. Pure data; the state sources move it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{BlockClaim, Endpoint, Network, Node, Object, PublishedPort, Service};

/// A Lamport timestamp made total by the writer's name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Version {
    /// Lamport counter.
    pub counter: u64,
    /// The node that wrote it; breaks ties deterministically.
    pub node: String,
}

/// One key's latest state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// When and by whom it was written.
    pub version: Version,
    /// The object, or `None` for a deletion (tombstone).
    pub value: Option<Object>,
}

/// The whole replicated state of the cluster as one node knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Store {
    entries: BTreeMap<String, Entry>,
    /// Highest counter seen; the next local write uses one more.
    clock: u64,
    /// The highest counter of this node's store that a member received in a complete
    /// push-pull (local bookkeeping: decides what a resync may keep).
    #[serde(default)]
    synced_clock: u64,
}

/// Key of the key-rotation lock (see [`Store::claim_rotation`]).
pub const ROTATION_LOCK: &str = "keyrotation/lock";

impl Store {
    /// Claims the key-rotation lock for rotation `generation` as `node`. The claim's
    /// version is (`generation`, `node`): a later rotation beats an earlier one, and of
    /// two started at once from the same generation, every node keeps the claim of
    /// the greater node name — a deterministic winner without coordination, as with
    /// block claims.
    pub fn claim_rotation(&mut self, node: &str, generation: u64) -> bool {
        let ack = crate::model::KeyAck { node: node.to_owned(), generation };
        let version = Version { counter: generation, node: node.to_owned() };
        self.merge_entry(ROTATION_LOCK.to_owned(), Entry { version, value: Some(Object::KeyAck(ack)) })
    }

    /// Who holds the key-rotation lock, and for which generation.
    pub fn rotation_lock(&self) -> Option<(&str, u64)> {
        match self.get(ROTATION_LOCK) {
            Some(Object::KeyAck(a)) => Some((a.node.as_str(), a.generation)),
            _ => None,
        }
    }

    /// The highest keyring generation anyone acknowledged.
    pub fn max_key_ack(&self) -> u64 {
        self.objects()
            .filter_map(|o| match o {
                Object::KeyAck(a) => Some(a.generation),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// Writes `object` as `node`, returning whether anything changed.
    pub fn put(&mut self, node: &str, object: Object) -> bool {
        let key = object.key();
        if self.get(&key) == Some(&object) {
            return false;
        }
        self.write(node, key, Some(object));
        true
    }

    /// Writes a claim on a free address. Claims carry the counter of what they
    /// replace: 0 for a never-claimed address, one more than the tombstone's for a
    /// released one. So when two nodes claim the same address concurrently (both saw
    /// it free), the merge keeps the claim of the greater node name on every node: a
    /// deterministic winner without coordination; and a claim beats the release it
    /// follows.
    pub fn put_claim(&mut self, claim: BlockClaim) {
        let key = Object::Block(claim.clone()).key();
        let counter = match self.entries.get(&key) {
            Some(Entry { value: None, version }) => version.counter + 1,
            _ => 0,
        };
        let version = Version { counter, node: claim.node.clone() };
        self.merge_entry(key, Entry { version, value: Some(Object::Block(claim)) });
    }

    /// Deletes `key` as `node`, leaving a tombstone; returns whether it existed.
    pub fn delete(&mut self, node: &str, key: &str) -> bool {
        if self.get(key).is_none() {
            return false;
        }
        self.write(node, key.to_owned(), None);
        true
    }

    fn write(&mut self, node: &str, key: String, value: Option<Object>) {
        self.clock += 1;
        let version = Version { counter: self.clock, node: node.to_owned() };
        self.entries.insert(key, Entry { version, value });
    }

    /// Merges another node's store into this one; returns whether anything changed.
    pub fn merge(&mut self, other: &Store) -> bool {
        let mut changed = false;
        for (key, entry) in &other.entries {
            changed |= self.merge_entry(key.clone(), entry.clone());
        }
        self.clock = self.clock.max(other.clock);
        changed
    }

    /// Merges one entry; returns whether it was newer than what this store held.
    pub fn merge_one(&mut self, key: String, entry: Entry) -> bool {
        self.merge_entry(key, entry)
    }

    /// The entry (live or tombstone) under `key`.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Every entry, tombstones included.
    pub fn entries(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.entries.iter()
    }

    /// A copy holding only the entries `keep` accepts.
    pub fn filtered(&self, keep: impl Fn(&str, &Entry) -> bool) -> Store {
        Store {
            entries: self
                .entries
                .iter()
                .filter(|(k, e)| keep(k, e))
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect(),
            clock: self.clock,
            synced_clock: self.synced_clock,
        }
    }

    /// The highest Lamport counter seen.
    pub fn clock(&self) -> u64 {
        self.clock
    }

    /// See [`Store::mark_synced`].
    pub fn synced_clock(&self) -> u64 {
        self.synced_clock
    }

    /// Records that everything up to counter `clock` reached a member.
    pub fn mark_synced(&mut self, clock: u64) {
        self.synced_clock = self.synced_clock.max(clock);
    }

    /// Forgets `key` entirely, leaving no tombstone (a resync found that the cluster no
    /// longer knows it).
    pub fn remove(&mut self, key: &str) {
        self.entries.remove(key);
    }

    /// Forgets `key` if it is a tombstone (after the tombstone TTL).
    pub fn reap(&mut self, key: &str) {
        if self.entries.get(key).is_some_and(|e| e.value.is_none()) {
            self.entries.remove(key);
        }
    }

    fn merge_entry(&mut self, key: String, entry: Entry) -> bool {
        self.clock = self.clock.max(entry.version.counter);
        match self.entries.get(&key) {
            Some(mine) if mine.version >= entry.version => false,
            _ => {
                self.entries.insert(key, entry);
                true
            }
        }
    }

    /// The live object under `key`.
    pub fn get(&self, key: &str) -> Option<&Object> {
        self.entries.get(key).and_then(|e| e.value.as_ref())
    }

    /// All live objects.
    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.entries.values().filter_map(|e| e.value.as_ref())
    }

    /// Live networks, by name.
    pub fn networks(&self) -> impl Iterator<Item = &Network> {
        self.objects().filter_map(|o| match o {
            Object::Network(n) => Some(n),
            _ => None,
        })
    }

    /// Live services, by name.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.objects().filter_map(|o| match o {
            Object::Service(s) => Some(s),
            _ => None,
        })
    }

    /// Live published ports.
    pub fn published(&self) -> impl Iterator<Item = &PublishedPort> {
        self.objects().filter_map(|o| match o {
            Object::Published(p) => Some(p),
            _ => None,
        })
    }

    /// Live endpoints, by id.
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.objects().filter_map(|o| match o {
            Object::Endpoint(e) => Some(e),
            _ => None,
        })
    }

    /// Live nodes, by name.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.objects().filter_map(|o| match o {
            Object::Node(n) => Some(n),
            _ => None,
        })
    }

    /// Live block claims.
    pub fn claims(&self) -> impl Iterator<Item = &BlockClaim> {
        self.objects().filter_map(|o| match o {
            Object::Block(b) => Some(b),
            _ => None,
        })
    }

    /// What `node` last confirmed (see [`crate::model::NodeState`]).
    pub fn node_state(&self, node: &str) -> Option<&crate::model::NodeState> {
        match self.get(&crate::model::Key::node_state(node)) {
            Some(Object::NodeState(s)) => Some(s),
            _ => None,
        }
    }

    /// A digest of the live networks, services and published ports (keys and
    /// versions): two nodes with the same digest hold the same catalog.
    pub fn catalog_digest(&self) -> u64 {
        let mut text = Vec::new();
        for (key, entry) in &self.entries {
            let catalog = ["network/", "service/", "published/"].iter().any(|p| key.starts_with(p));
            if catalog && entry.value.is_some() {
                text.extend_from_slice(key.as_bytes());
                text.extend_from_slice(
                    format!("@{}:{};", entry.version.counter, entry.version.node).as_bytes(),
                );
            }
        }
        crate::hash::fnv1a_64(&text)
    }

    /// The distributed keyring, if a rotation ever ran.
    pub fn keyring(&self) -> Option<&crate::model::KeyringRecord> {
        match self.get(crate::model::Key::KEYRING) {
            Some(Object::Keyring(k)) => Some(k),
            _ => None,
        }
    }

    /// The keyring generation `node` acknowledged.
    pub fn key_ack(&self, node: &str) -> u64 {
        match self.get(&crate::model::Key::key_ack(node)) {
            Some(Object::KeyAck(a)) => a.generation,
            _ => 0,
        }
    }

    /// The network named `name`.
    pub fn network(&self, name: &str) -> Option<&Network> {
        match self.get(&crate::model::Key::network(name)) {
            Some(Object::Network(n)) => Some(n),
            _ => None,
        }
    }

    /// The service named `name`.
    pub fn service(&self, name: &str) -> Option<&Service> {
        match self.get(&crate::model::Key::service(name)) {
            Some(Object::Service(s)) => Some(s),
            _ => None,
        }
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        match self.get(&crate::model::Key::node(name)) {
            Some(Object::Node(n)) => Some(n),
            _ => None,
        }
    }

    /// The task endpoints of service `name`.
    pub fn tasks_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Endpoint> + 'a {
        self.endpoints().filter(move |e| e.service.as_deref() == Some(service))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndpointMode, Key};

    fn service(name: &str, network: &str) -> Object {
        Object::Service(Service {
            name: name.into(),
            network: network.into(),
            endpoint_mode: EndpointMode::Vip,
            vip: None,
            health_check: None,
        })
    }

    #[test]
    fn merge_converges_whatever_the_order() {
        let mut a = Store::default();
        let mut b = Store::default();
        a.put("a", service("web", "front"));
        b.put("b", service("web", "back"));
        b.put("b", service("db", "back"));
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab.entries, ba.entries);
    }

    #[test]
    fn later_write_wins_and_tombstones_replicate() {
        let mut a = Store::default();
        a.put("a", service("web", "front"));
        let mut b = Store::default();
        b.merge(&a);
        assert!(b.delete("b", &Key::service("web")));
        assert!(a.merge(&b));
        assert!(a.service("web").is_none());
        // Merging the older state back changes nothing.
        let old = {
            let mut s = Store::default();
            s.put("a", service("web", "front"));
            s
        };
        assert!(!a.merge(&old));
        assert!(a.service("web").is_none());
    }

    #[test]
    fn rewriting_the_same_value_is_not_a_change() {
        let mut a = Store::default();
        assert!(a.put("a", service("web", "front")));
        assert!(!a.put("a", service("web", "front")));
    }

    #[test]
    fn concurrent_rotation_claims_resolve_to_the_same_holder_and_later_ones_win() {
        let mut a = Store::default();
        let mut b = Store::default();
        a.claim_rotation("node-a", 4);
        b.claim_rotation("node-b", 4);
        let a_before = a.clone();
        a.merge(&b);
        b.merge(&a_before);
        assert_eq!(a.rotation_lock(), Some(("node-b", 4)));
        assert_eq!(b.rotation_lock(), Some(("node-b", 4)));
        a.claim_rotation("node-a", 7);
        b.merge(&a);
        assert_eq!(b.rotation_lock(), Some(("node-a", 7)));
    }

    #[test]
    fn concurrent_block_claims_resolve_to_the_same_owner_everywhere() {
        let claim = |node: &str| BlockClaim { network: "n".into(), index: 0, node: node.into() };
        let mut a = Store::default();
        let mut b = Store::default();
        a.put_claim(claim("node-a"));
        b.put_claim(claim("node-b"));
        let a_before = a.clone();
        a.merge(&b);
        b.merge(&a_before);
        let owner = |s: &Store| s.claims().next().map(|c| c.node.clone());
        assert_eq!(owner(&a), Some("node-b".into()));
        assert_eq!(owner(&b), Some("node-b".into()));
    }

    #[test]
    fn a_claim_on_a_released_address_beats_the_release_and_races_resolve_alike() {
        let claim = |node: &str| BlockClaim { network: "n".into(), index: 3, node: node.into() };
        let mut a = Store::default();
        a.put_claim(claim("node-b"));
        assert!(a.delete("node-b", &Key::block("n", 3)));
        let mut b = a.clone();
        a.put_claim(claim("node-a"));
        b.put_claim(claim("node-c"));
        let a_before = a.clone();
        a.merge(&b);
        b.merge(&a_before);
        let owner = |s: &Store| s.claims().next().map(|c| c.node.clone());
        assert_eq!(owner(&a), Some("node-c".into()));
        assert_eq!(owner(&b), Some("node-c".into()));
    }

    #[test]
    fn the_catalog_digest_follows_networks_services_and_ports_only() {
        let mut a = Store::default();
        let empty = a.catalog_digest();
        a.put("a", service("web", "front"));
        let with_web = a.catalog_digest();
        assert_ne!(empty, with_web);
        a.put_claim(BlockClaim { network: "n".into(), index: 3, node: "a".into() });
        assert_eq!(a.catalog_digest(), with_web);
        let mut b = Store::default();
        b.merge(&a);
        assert_eq!(b.catalog_digest(), with_web);
    }
}
