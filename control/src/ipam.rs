//! Address management without a central allocator.
//!
//! Every address of a network is claimed on its own: a claim names one address (by
//! its index inside the subnet) and its owner. A node picks an unclaimed address
//! starting at a point chosen by a stable hash of its name (so nodes rarely race for
//! the same one), claims it, and uses it once every live peer has had time to see the
//! claim. Concurrent claims of one address resolve to the same owner everywhere (see
//! [`crate::store::Store::put_claim`]). Claims cost nothing beyond the addresses they
//! hold, so a `/24` serves 254 endpoints however many nodes share it.
//!
//! To keep the settle wait off the paths that must be quick (a published port on a
//! node that has no task of the service, an attach), a node keeps one claimed but
//! unused address — a *spare* — on every network while the subnet has plenty of room,
//! and gives spares back when it runs short ([`spare_change`]).
//!
//! After a partition both sides may have handed out the same address. The endpoint
//! written first keeps it ([`older`]); the other is re-addressed by its node.
//!
//! All functions here are pure.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet, HashSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use meshd_dataplane::overlay::{MacAddr, PeerSpec};

use crate::{
    model::Object,
    store::{Store, Version},
};

/// How many addresses `subnet` holds, network and broadcast addresses included.
pub fn size(subnet: Ipv4Net) -> u32 {
    1u32 << (32 - subnet.prefix_len())
}

/// Whether the address at `index` may be given out: all but the network and
/// broadcast addresses.
pub fn is_usable(subnet: Ipv4Net, index: u32) -> bool {
    index > 0 && index + 1 < size(subnet)
}

/// How many addresses of `subnet` may be given out.
pub fn usable(subnet: Ipv4Net) -> u32 {
    size(subnet).saturating_sub(2)
}

/// The address at `index` inside `subnet`.
pub fn address_at(subnet: Ipv4Net, index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + index)
}

/// The index of `ip` inside `subnet`, if it is inside.
pub fn index_of(subnet: Ipv4Net, ip: Ipv4Addr) -> Option<u32> {
    subnet.contains(&ip).then(|| u32::from(ip) - u32::from(subnet.network()))
}

/// The address `node` should claim next, given the indexes taken by anyone (claimed,
/// in use, or reserved): the first usable free one at or after the node's preferred
/// starting point, wrapping around. `None`: the subnet is full.
pub fn pick(node: &str, subnet: Ipv4Net, taken: &HashSet<u32>) -> Option<u32> {
    let n = size(subnet);
    let start = (crate::hash::fnv1a_64(node.as_bytes()) % u64::from(n)) as u32;
    (0..n).map(|i| (start + i) % n).find(|&i| is_usable(subnet, i) && !taken.contains(&i))
}

/// How a node should change its spares on one network: `+1` claim one more, `-k`
/// give `k` back, `0` keep what it has.
///
/// `unclaimed` is how many usable addresses nobody claims, `nodes` the cluster's size,
/// `spares` how many claimed but unused addresses this node holds. A node keeps at most
/// one spare; it claims one only while at least half the subnet is unclaimed and there
/// is room for every node to do the same twice over (so all nodes topping up at once
/// cannot push the subnet into shortage), and gives all back once fewer than one
/// sixteenth of the addresses (at least one) are unclaimed — the gap between the two
/// thresholds keeps nodes from claiming and releasing in turn.
pub fn spare_change(usable: u32, unclaimed: u32, nodes: u32, spares: u32) -> i64 {
    let short = unclaimed < (usable / 16).max(1);
    let plenty = unclaimed >= usable / 2 && unclaimed >= 2 * nodes;
    let keep = if short { 0 } else { spares.min(1) };
    let want = if spares == 0 && plenty { 1 } else { keep };
    i64::from(want) - i64::from(spares)
}

/// Between two endpoints holding the same address, whether the one written at `a` is
/// the older (and keeps the address). Store versions are Lamport timestamps made total
/// by the writer's name, so every node that holds both endpoints reaches the same
/// verdict, and a write that causally follows another is always the newer.
pub fn older(a: &Version, b: &Version) -> bool {
    a.cmp(b) == Ordering::Less
}

/// Endpoints whose address an older endpoint of their network holds (both sides of a
/// partition handed it out): until their node re-addresses them, only the older one
/// is programmed, so peers keep reaching the endpoint that keeps the address. An
/// older service VIP on the address shadows an endpoint too (see [`shadowed_keys`]).
pub fn shadowed(store: &Store) -> BTreeSet<&str> {
    shadowed_keys(store).into_iter().filter_map(|key| key.strip_prefix("endpoint/")).collect()
}

/// Store keys of the endpoints and `vip` services whose address — task address or
/// VIP — an older endpoint or service of their network holds. The older write keeps
/// the address, whichever kind it is; the newer one moves (its node re-addresses the
/// endpoint; a node that sees the conflict gives the service a new VIP) and meanwhile is not
/// programmed: a shadowed VIP gets no socket-LB frontend, which would capture
/// connections meant for the task that keeps the address.
pub fn shadowed_keys(store: &Store) -> BTreeSet<&str> {
    let mut oldest: BTreeMap<(&str, Ipv4Addr), (&Version, &str)> = BTreeMap::new();
    let mut shadowed = BTreeSet::new();
    for (key, entry) in store.entries() {
        let (network, ip) = match &entry.value {
            Some(Object::Endpoint(ep)) => (ep.network.as_str(), ep.ip),
            Some(Object::Service(s)) => match s.vip {
                Some(vip) => (s.network.as_str(), vip),
                None => continue,
            },
            _ => continue,
        };
        let here = (&entry.version, key.as_str());
        match oldest.get_mut(&(network, ip)) {
            Some(held) if older(held.0, here.0) => {
                shadowed.insert(here.1);
            }
            Some(held) => {
                shadowed.insert(held.1);
                *held = here;
            }
            None => {
                oldest.insert((network, ip), here);
            }
        }
    }
    shadowed
}

/// FDB and neighbour entries for the addresses other live nodes claim on `networks`
/// (this node's overlays: network name → VNI) without using them yet — their spares —
/// where this node hosts a task. A node that joins a network takes its spare as its own
/// address, so the nodes that host tasks can already answer it: its first connection
/// to a task does not lose its SYN-ACK to a missing neighbour entry (a one-second
/// retransmission). Nodes without tasks there need no such entries.
pub fn spare_peers(
    store: &Store,
    live: &BTreeSet<String>,
    node: &str,
    networks: &BTreeMap<String, u32>,
) -> Vec<PeerSpec> {
    let vteps: BTreeMap<&str, Ipv4Addr> = store.nodes().map(|n| (n.name.as_str(), n.addr)).collect();
    // A VIP is never on the wire: its claim is in use, not a spare to answer for.
    let used: BTreeSet<(&str, Ipv4Addr)> = store
        .endpoints()
        .map(|e| (e.network.as_str(), e.ip))
        .chain(store.services().filter_map(|s| Some((s.network.as_str(), s.vip?))))
        .collect();
    let hosting: BTreeSet<&str> = store
        .endpoints()
        .filter(|e| e.node == node && e.service.is_some())
        .map(|e| e.network.as_str())
        .collect();
    let mut peers = Vec::new();
    for claim in store.claims().filter(|c| c.node != node && live.contains(&c.node)) {
        if !hosting.contains(claim.network.as_str()) {
            continue;
        }
        let (Some(&vni), Some(net), Some(&vtep)) =
            (networks.get(&claim.network), store.network(&claim.network), vteps.get(claim.node.as_str()))
        else {
            continue;
        };
        let ip = address_at(net.subnet, claim.index);
        if is_usable(net.subnet, claim.index) && !used.contains(&(claim.network.as_str(), ip)) {
            peers.push(PeerSpec { vni, ip, mac: mac_for_ip(ip), vtep });
        }
    }
    peers
}

/// The MAC address of an overlay address: `02:42` followed by the IPv4 bytes, as Docker
/// does. Unique on a network because addresses are, and locally administered.
pub fn mac_for_ip(ip: Ipv4Addr) -> MacAddr {
    let [a, b, c, d] = ip.octets();
    MacAddr([0x02, 0x42, a, b, c, d])
}

#[cfg(test)]
mod tests {
    use rand::{rngs::SmallRng, seq::SliceRandom, SeedableRng};

    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    /// A task of service `web` at `10.0.0.LAST` on `network`, hosted by `node`.
    fn task(id: &str, network: &str, node: &str, last: u8) -> Object {
        let ip = Ipv4Addr::new(10, 0, 0, last);
        Object::Endpoint(crate::model::Endpoint {
            id: id.into(),
            service: Some("web".into()),
            network: network.into(),
            node: node.into(),
            ip,
            mac: mac_for_ip(ip),
            vtep: Ipv4Addr::new(198, 18, 0, 11),
            host_if: None,
            netns: None,
            health: Default::default(),
            draining: false,
        })
    }

    #[test]
    fn a_slash_24_has_254_usable_addresses() {
        let subnet = net("10.0.0.0/24");
        assert_eq!(usable(subnet), 254);
        assert!(!is_usable(subnet, 0) && !is_usable(subnet, 255));
        assert!(is_usable(subnet, 1) && is_usable(subnet, 254));
        assert_eq!(address_at(subnet, 5), Ipv4Addr::new(10, 0, 0, 5));
        assert_eq!(index_of(subnet, Ipv4Addr::new(10, 0, 0, 5)), Some(5));
        assert_eq!(index_of(subnet, Ipv4Addr::new(10, 0, 1, 5)), None);
    }

    #[test]
    fn pick_skips_taken_and_wraps_and_reports_full() {
        let subnet = net("10.9.0.0/29");
        let first = pick("n1", subnet, &HashSet::new()).unwrap();
        assert!(is_usable(subnet, first));
        let mut taken: HashSet<u32> = [first].into();
        let second = pick("n1", subnet, &taken).unwrap();
        assert_ne!(second, first);
        taken.extend(1..7);
        assert_eq!(pick("n1", subnet, &taken), None);
    }

    #[test]
    fn spares_are_kept_while_there_is_room_and_returned_when_short() {
        // Plenty of room: claim one, never more.
        assert_eq!(spare_change(254, 250, 10, 0), 1);
        assert_eq!(spare_change(254, 250, 10, 1), 0);
        assert_eq!(spare_change(254, 250, 10, 3), -2);
        // Room, but not for every node twice: keep, do not claim.
        assert_eq!(spare_change(254, 150, 100, 0), 0);
        assert_eq!(spare_change(254, 150, 100, 1), 0);
        // Short: give everything back.
        assert_eq!(spare_change(254, 10, 10, 1), -1);
        assert_eq!(spare_change(2, 0, 2, 1), -1);
    }

    #[test]
    fn older_follows_lamport_order_then_name() {
        let v = |counter, node: &str| Version { counter, node: node.into() };
        assert!(older(&v(3, "b"), &v(4, "a")));
        assert!(older(&v(4, "a"), &v(4, "b")));
        assert!(!older(&v(4, "b"), &v(4, "a")));
    }

    #[test]
    fn the_newer_of_two_endpoints_on_one_address_is_shadowed_everywhere() {
        let ep = |id: &str, node: &str, last: u8| task(id, "backend", node, last);
        // Two sides of a partition each write a task at 10.0.0.5.
        let mut a = Store::default();
        a.put("n1", ep("web.1", "n1", 5));
        a.put("n1", ep("web.9", "n1", 9));
        let mut b = Store::default();
        b.put("n2", ep("filler", "n2", 7));
        b.put("n2", ep("web.2", "n2", 5));
        let mut healed_a = a.clone();
        healed_a.merge(&b);
        let mut healed_b = b.clone();
        healed_b.merge(&a);
        // web.1 was written at counter 1, web.2 at counter 2: web.2 is the newer.
        let expected: BTreeSet<&str> = ["web.2"].into();
        assert_eq!(shadowed(&healed_a), expected);
        assert_eq!(shadowed(&healed_b), expected);
        assert!(shadowed(&a).is_empty());
    }

    #[test]
    fn a_vip_and_a_task_address_handed_out_on_both_sides_go_to_the_older_write() {
        use crate::model::{EndpointMode, Service};
        let task = task("web.1", "backend", "n1", 5);
        let service = |name: &str, vip: u8| {
            Object::Service(Service {
                name: name.into(),
                network: "backend".into(),
                endpoint_mode: EndpointMode::Vip,
                vip: Some(Ipv4Addr::new(10, 0, 0, vip)),
                health_check: None,
            })
        };
        // Side a: a task at .5 (counter 1). Side b: two services, the second's VIP .5
        // (counter 2). Healed, the task keeps .5 and the service moves.
        let mut a = Store::default();
        a.put("n1", task);
        let mut b = Store::default();
        b.put("n2", service("db", 9));
        b.put("n2", service("api", 5));
        a.merge(&b);
        let expected: BTreeSet<&str> = ["service/api"].into();
        assert_eq!(shadowed_keys(&a), expected);
        assert!(shadowed(&a).is_empty(), "the task keeps its address");
        // The other way round: an older VIP keeps the address, the task moves.
        let mut c = Store::default();
        c.put("n2", service("api", 5));
        let mut d = Store::default();
        d.put("n1", service("db", 9));
        d.put("n1", a.get("endpoint/web.1").cloned().unwrap());
        c.merge(&d);
        assert_eq!(shadowed(&c), ["web.1"].into());
        assert!(!shadowed_keys(&c).contains("service/api"));
    }

    #[test]
    fn other_live_nodes_spares_are_programmed_but_used_and_own_addresses_are_not() {
        use crate::model::{BlockClaim, Network, Node};
        let mut store = Store::default();
        let subnet = net("10.0.0.0/24");
        store.put("n1", Object::Network(Network { name: "b".into(), subnet, vni: 4096, mtu: None }));
        for (name, last) in [("n1", 11), ("n2", 12), ("n3", 13)] {
            store.put(
                name,
                Object::Node(Node {
                    name: name.into(),
                    addr: Ipv4Addr::new(198, 18, 0, last),
                    availability: Default::default(),
                }),
            );
        }
        for (node, index) in [("n1", 1), ("n2", 2), ("n2", 3), ("n3", 4)] {
            store.put_claim(BlockClaim { network: "b".into(), index, node: node.into() });
        }
        // n2's address .3 is in use by a task (programmed as an endpoint, not here).
        store.put("n2", task("web.1", "b", "n2", 3));
        let live: BTreeSet<String> = ["n1", "n2"].into_iter().map(String::from).collect();
        let joined: BTreeMap<String, u32> = [("b".to_owned(), 4096)].into();
        // n1 hosts no task on b yet: nothing to answer, no entries.
        assert!(spare_peers(&store, &live, "n1", &joined).is_empty());
        store.put("n1", task("web.0", "b", "n1", 1));
        let peers = spare_peers(&store, &live, "n1", &joined);
        // Only n2's spare .2: not n1's own, not the used .3, not dead n3's .4.
        assert_eq!(peers.len(), 1, "{peers:?}");
        assert_eq!((peers[0].ip, peers[0].vtep), (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(198, 18, 0, 12)));
        assert!(spare_peers(&store, &live, "n1", &BTreeMap::new()).is_empty(), "no overlay, no peers");
    }

    #[test]
    fn mac_embeds_the_address() {
        assert_eq!(mac_for_ip(Ipv4Addr::new(10, 0, 0, 5)).to_string(), "02:42:0a:00:00:05");
    }

    /// Simulates `nodes` nodes sharing `subnet` with the real policy: every node first
    /// wants a node address (the network carries a published port), then one task a
    /// round arrives on a random node while there is room. Each round every node acts
    /// on the claims it saw at the start of the round (so claims race), keeps or
    /// returns spares by [`spare_change`], and uses a claim only once it survived a
    /// round (the settle time); concurrent claims resolve to the greater name, as the
    /// store's merge does. Returns the owner of every used address.
    fn simulate(nodes: usize, subnet: Ipv4Net, seed: u64) -> BTreeMap<u32, String> {
        let names: Vec<String> = (1..=nodes).map(|i| format!("node-{i:03}")).collect();
        let mut rng = SmallRng::seed_from_u64(seed);
        let total = usable(subnet);
        // Claims after each round's merge (index -> owner, round claimed), addresses in use.
        let mut claims: BTreeMap<u32, (String, u32)> = BTreeMap::new();
        let mut used: BTreeMap<u32, String> = BTreeMap::new();
        let mut wants: BTreeMap<String, u32> = names.iter().map(|n| (n.clone(), 1)).collect();
        for round in 1..10_000 {
            let outstanding: u32 = wants.values().sum();
            if used.len() as u32 + outstanding < total {
                *wants.get_mut(names.choose(&mut rng).unwrap()).unwrap() += 1;
            }
            let view = claims.clone();
            let unclaimed = total - view.len() as u32;
            let mut order = names.clone();
            order.shuffle(&mut rng);
            let mut new_claims: Vec<(u32, String)> = Vec::new();
            for node in &order {
                let unused = |used: &BTreeMap<u32, String>, settled: bool| -> Vec<u32> {
                    claims
                        .iter()
                        .filter(|(i, (o, at))| {
                            o == node && !used.contains_key(i) && (!settled || *at < round)
                        })
                        .map(|(i, _)| *i)
                        .collect()
                };
                // Settled claims serve what the node needs.
                for index in unused(&used, true) {
                    let want = wants.get_mut(node).unwrap();
                    if *want == 0 {
                        break;
                    }
                    *want -= 1;
                    used.insert(index, node.clone());
                }
                let spares = unused(&used, false);
                if wants[node] > 0 {
                    if spares.is_empty() {
                        let taken: HashSet<u32> = view.keys().chain(used.keys()).copied().collect();
                        if let Some(index) = pick(node, subnet, &taken) {
                            new_claims.push((index, node.clone()));
                        }
                    }
                    continue;
                }
                match spare_change(total, unclaimed, nodes as u32, spares.len() as u32) {
                    1 => {
                        let taken: HashSet<u32> = view.keys().chain(used.keys()).copied().collect();
                        if let Some(index) = pick(node, subnet, &taken) {
                            new_claims.push((index, node.clone()));
                        }
                    }
                    k if k < 0 => {
                        for index in spares.iter().take(k.unsigned_abs() as usize) {
                            claims.remove(index);
                        }
                    }
                    _ => {}
                }
            }
            // Merge: per address, the greater name wins (counter-0 versions); a claim
            // that lost is not used, and its owner picks again next round.
            for (index, node) in new_claims {
                match claims.get(&index) {
                    Some((owner, _)) if *owner >= node => {}
                    _ => {
                        claims.insert(index, (node, round));
                    }
                }
            }
            if used.len() as u32 == total {
                break;
            }
        }
        used
    }

    #[test]
    fn every_address_of_a_slash_24_is_used_by_100_to_250_nodes_without_duplicates() {
        let subnet = net("10.0.0.0/24");
        for (nodes, seed) in [(100, 1), (150, 2), (200, 3), (250, 4)] {
            let used = simulate(nodes, subnet, seed);
            // Every usable address ends up in use, each by exactly one node (a map
            // cannot hold two owners), and every node got its node address.
            assert_eq!(used.len(), 254, "{nodes} nodes used {} of 254 addresses", used.len());
            assert!(used.keys().all(|&i| is_usable(subnet, i)));
            let owners: HashSet<&String> = used.values().collect();
            assert_eq!(owners.len(), nodes, "every one of {nodes} nodes holds an address");
        }
    }
}
