//! This node's addresses on the overlay networks: which networks it takes part in, the
//! addresses it claims (for itself, its tasks and one spare per network), and the
//! re-addressing of its endpoints that lost a duplicate address after a partition.
//! Policy lives in [`crate::ipam`]; this is the bookkeeping around the store.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use super::Agent;
use crate::{
    ipam,
    model::{BlockClaim, Endpoint, EndpointMode, Key, Network, Object, Service},
    store::Store,
    Error, Result,
};

/// A claim is used only after this long without a conflicting claim arriving:
/// gossip reaches every node of a thousand well within it.
pub const CLAIM_SETTLE: Duration = Duration::from_millis(1500);

/// How many re-addressing reports `meshctl status` keeps.
const RECENT_READDRESSES: usize = 8;

/// This node's address bookkeeping (held briefly, never across an await).
#[derive(Default)]
pub(super) struct Alloc {
    /// When this node made each of its claims, by store key.
    pub(super) claimed_at: HashMap<String, Instant>,
    /// Addresses handed out by an attach in progress, not yet in the store.
    pub(super) reserved: HashSet<Ipv4Addr>,
    /// Networks an attach in progress needs this node to take part in.
    pub(super) wanted: HashSet<String>,
    /// Why this node has no address on a network it needs, by network.
    pub(super) errors: BTreeMap<String, String>,
    /// Endpoints of this node moved to a new address because another held it first.
    pub(super) readdressed: u64,
    /// The latest of those moves, newest last.
    pub(super) recent: VecDeque<String>,
}

/// The host-side interface name of a task at `ip`. The address is part of the name so
/// that a re-addressed task gets a fresh link, which the reconciler creates in place of
/// the old one.
pub(super) fn task_host_if(task: &str, ip: Ipv4Addr) -> String {
    format!("mv{:08x}", crate::hash::fnv1a_32(format!("{task}@{ip}").as_bytes()))
}

/// Indexes (inside `net`'s subnet) that anyone claims or uses, as this node sees them.
/// `in_use` is what [`addresses_in_use`] returned for `net`.
fn taken(store: &Store, net: &Network, in_use: &HashSet<Ipv4Addr>) -> HashSet<u32> {
    let claimed = store.claims().filter(|c| c.network == net.name).map(|c| c.index);
    let used = in_use.iter().filter_map(|&ip| ipam::index_of(net.subnet, ip));
    claimed.chain(used).collect()
}

impl Agent {
    /// Gives this node an address on every network it needs and does not have one on
    /// yet, keeps its spares, and re-addresses its endpoints that lost a duplicate.
    ///
    /// A node takes part in a network — holds an address and an overlay on it, and
    /// receives its task table — while it has a local task there (or an attach is on
    /// its way), or while the network carries a published port (the routing mesh needs
    /// every node). Otherwise it leaves the network.
    pub(super) fn ensure_node_addresses(&self) {
        let me = self.cfg.node_name.clone();
        let wanted = {
            let mut alloc = self.alloc();
            // A claim without a time is settled: forget the times once they are.
            alloc.claimed_at.retain(|_, at| at.elapsed() < CLAIM_SETTLE);
            alloc.wanted.clone()
        };
        let (join, leave, ports): (Vec<Network>, Vec<String>, HashMap<String, Vec<String>>) = {
            let gossip = self.gossip();
            let store = gossip.store();
            let mut ports: HashMap<String, Vec<String>> = HashMap::new();
            for p in store.published() {
                if let Some(s) = store.service(&p.service) {
                    ports.entry(s.network.clone()).or_default().push(format!("{}/{}", p.published, p.proto));
                }
            }
            let hosting: HashSet<&str> = store
                .endpoints()
                .filter(|e| e.node == me && e.service.is_some())
                .map(|e| e.network.as_str())
                .collect();
            let needed = |net: &Network| {
                wanted.contains(&net.name)
                    || hosting.contains(net.name.as_str())
                    || ports.contains_key(&net.name)
            };
            let has = |net: &Network| store.get(&Key::endpoint(&Endpoint::node_id(&me, &net.name))).is_some();
            (
                store.networks().filter(|n| needed(n) && !has(n)).cloned().collect(),
                store.networks().filter(|n| !needed(n) && has(n)).map(|n| n.name.clone()).collect(),
                ports,
            )
        };
        for network in leave {
            self.write(|g, now| g.delete(&Key::endpoint(&Endpoint::node_id(&me, &network)), now));
        }
        // Tasks of a removed service are removed by the node that hosts them.
        let orphans: Vec<String> = {
            let gossip = self.gossip();
            let store = gossip.store();
            store
                .endpoints()
                .filter(|e| e.node == me)
                .filter(|e| e.service.as_ref().is_some_and(|s| store.service(s).is_none()))
                .map(|e| Key::endpoint(&e.id))
                .collect()
        };
        for key in orphans {
            self.write(|g, now| g.delete(&key, now));
        }
        self.resolve_duplicates();
        self.give_missing_vips();
        let joining: HashSet<String> = join.iter().map(|n| n.name.clone()).collect();
        for net in join {
            let id = Endpoint::node_id(&me, &net.name);
            match self.allocate(&net) {
                Ok(Some(ip)) => {
                    let endpoint = Endpoint {
                        id,
                        service: None,
                        network: net.name.clone(),
                        node: me.clone(),
                        ip,
                        mac: ipam::mac_for_ip(ip),
                        vtep: self.cfg.advertise_addr,
                        host_if: None,
                        netns: None,
                        health: Default::default(),
                        draining: false,
                    };
                    self.write(|g, now| g.put(Object::Endpoint(endpoint), now));
                    let mut alloc = self.alloc();
                    alloc.reserved.remove(&ip);
                    alloc.errors.remove(&net.name);
                }
                Ok(None) => {}
                Err(error) => {
                    let why = match ports.get(&net.name) {
                        Some(p) => format!("published port {}", p.join(", ")),
                        None => "a local task".to_owned(),
                    };
                    let message =
                        format!("this node cannot take part in network {} for {why}: {error}", net.name);
                    let mut alloc = self.alloc();
                    if alloc.errors.get(&net.name) != Some(&message) {
                        tracing::warn!(network = %net.name, %message, "no address");
                        alloc.errors.insert(net.name.clone(), message);
                    }
                }
            }
        }
        let known: HashSet<String> = self.gossip().store().networks().map(|n| n.name.clone()).collect();
        let mut alloc = self.alloc();
        // Join failures are keyed by network, duplicate failures by `network/endpoint`.
        alloc.errors.retain(|key, _| key.contains('/') || (joining.contains(key) && known.contains(key)));
        drop(alloc);
        self.keep_spares(&joining);
        self.own_claims();
    }

    /// Reserves a free address on `net` from a settled claim of this node's, claiming
    /// a new address when it has none. `Ok(None)`: a claim is settling (or other nodes
    /// are giving spares back); try again soon. An error: the subnet is full.
    pub(super) fn allocate(&self, net: &Network) -> Result<Option<Ipv4Addr>> {
        let me = &self.cfg.node_name;
        let mut gossip = self.gossip();
        let mut alloc = self.alloc();
        let now = Instant::now();
        let store = gossip.store();
        let in_use = addresses_in_use(store, &alloc.reserved, &net.name);
        let unused: Vec<&BlockClaim> = store
            .claims()
            .filter(|c| c.network == net.name && &c.node == me)
            .filter(|c| !in_use.contains(&ipam::address_at(net.subnet, c.index)))
            .collect();
        let settled = |c: &&&BlockClaim| {
            alloc
                .claimed_at
                .get(&Key::block(&c.network, c.index))
                .is_none_or(|at| now.duration_since(*at) >= CLAIM_SETTLE)
        };
        if let Some(claim) = unused.iter().find(settled) {
            let ip = ipam::address_at(net.subnet, claim.index);
            alloc.reserved.insert(ip);
            return Ok(Some(ip));
        }
        if !unused.is_empty() {
            return Ok(None);
        }
        let taken = taken(store, net, &in_use);
        let Some(index) = ipam::pick(me, net.subnet, &taken) else {
            // Others' spares are given back once the subnet runs short; this node can
            // count them only if it sees the network's tasks (it takes part).
            let participant = store.get(&Key::endpoint(&Endpoint::node_id(me, &net.name))).is_some();
            let spares = store
                .claims()
                .filter(|c| c.network == net.name && !in_use.contains(&ipam::address_at(net.subnet, c.index)))
                .count();
            if participant && spares > 0 {
                return Ok(None);
            }
            let tasks = store.endpoints().filter(|e| e.network == net.name && e.service.is_some()).count();
            return Err(Error::invalid(format!(
                "network {} ({}) is full: all {} addresses are taken ({tasks} tasks, the rest node addresses and spares); detach tasks or create a network with a larger subnet",
                net.name,
                net.subnet,
                ipam::usable(net.subnet)
            )));
        };
        self.claim(&mut gossip, &mut alloc, net, index);
        Ok(None)
    }

    fn claim(&self, gossip: &mut crate::gossip::Gossip, alloc: &mut Alloc, net: &Network, index: u32) {
        let claim = BlockClaim { network: net.name.clone(), index, node: self.cfg.node_name.clone() };
        alloc.claimed_at.insert(Key::block(&net.name, index), Instant::now());
        gossip.put_claim(claim, self.shared.now());
        self.changed();
        // Look again once the claim has settled, whatever else happens meanwhile.
        let shared = self.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CLAIM_SETTLE + Duration::from_millis(10)).await;
            shared.changes.send_modify(|g| *g += 1);
        });
    }

    /// Keeps one spare address on every network while there is room, so that joining
    /// a network (a published port, an attach) needs no settle wait, and gives spares
    /// back when the subnet runs short. Networks this node is joining keep theirs.
    fn keep_spares(&self, joining: &HashSet<String>) {
        let me = &self.cfg.node_name;
        let mut gossip = self.gossip();
        let mut alloc = self.alloc();
        let now = self.shared.now();
        let store = gossip.store();
        let nodes = store.nodes().count() as u32;
        let mut claims = Vec::new();
        let mut releases = Vec::new();
        for net in store.networks() {
            let in_use = addresses_in_use(store, &alloc.reserved, &net.name);
            let claimed = store
                .claims()
                .filter(|c| c.network == net.name && ipam::is_usable(net.subnet, c.index))
                .count() as u32;
            let spares: Vec<u32> = store
                .claims()
                .filter(|c| c.network == net.name && &c.node == me)
                .filter(|c| !in_use.contains(&ipam::address_at(net.subnet, c.index)))
                .map(|c| c.index)
                .collect();
            let unclaimed = ipam::usable(net.subnet).saturating_sub(claimed);
            let change = ipam::spare_change(ipam::usable(net.subnet), unclaimed, nodes, spares.len() as u32);
            if change > 0 {
                if let Some(index) = ipam::pick(me, net.subnet, &taken(store, net, &in_use)) {
                    claims.push((net.clone(), index));
                }
            } else if change < 0 && !joining.contains(&net.name) && !alloc.wanted.contains(&net.name) {
                let settled = |i: &&u32| {
                    alloc
                        .claimed_at
                        .get(&Key::block(&net.name, **i))
                        .is_none_or(|at| at.elapsed() >= CLAIM_SETTLE)
                };
                let give_back = spares.iter().filter(settled).take(change.unsigned_abs() as usize);
                releases.extend(give_back.map(|i| Key::block(&net.name, *i)));
            }
        }
        for (net, index) in claims {
            self.claim(&mut gossip, &mut alloc, &net, index);
        }
        for key in releases {
            alloc.claimed_at.remove(&key);
            if gossip.delete(&key, now) {
                self.changed();
            }
        }
    }

    /// Every address this node's endpoints use is claimed by this node: a claim lost
    /// to a concurrent one (or missing) is written again, as a newer version.
    fn own_claims(&self) {
        let me = &self.cfg.node_name;
        let mut gossip = self.gossip();
        let store = gossip.store();
        let mut rewrite = Vec::new();
        for e in store.endpoints().filter(|e| &e.node == me) {
            let Some(net) = store.network(&e.network) else { continue };
            let Some(index) = ipam::index_of(net.subnet, e.ip) else { continue };
            let key = Key::block(&net.name, index);
            let owner = match store.get(&key) {
                Some(Object::Block(c)) => Some(c.node.as_str()),
                _ => None,
            };
            if owner != Some(me.as_str()) && !Self::has_older_duplicate(store, e) {
                rewrite.push(BlockClaim { network: net.name.clone(), index, node: me.clone() });
            }
        }
        let now = self.shared.now();
        for claim in rewrite {
            if gossip.put(Object::Block(claim), now) {
                self.changed();
            }
        }
    }

    /// Whether another endpoint or VIP of `e`'s network holds `e`'s address and was
    /// written first (see [`ipam::older`]).
    fn has_older_duplicate(store: &Store, e: &Endpoint) -> bool {
        Self::older_holder(store, &Key::endpoint(&e.id), &e.network, e.ip).is_some()
    }

    /// What holds `ip` on `network` and was written before the object at `key`: a
    /// description ("endpoint web.1", "the VIP of service api") and the node that wrote it.
    fn older_holder(store: &Store, key: &str, network: &str, ip: Ipv4Addr) -> Option<(String, String)> {
        let mine = store.entry(key)?.version.clone();
        store.entries().filter(|(k, _)| k.as_str() != key).find_map(|(_, entry)| {
            let (what, node) = match &entry.value {
                Some(Object::Endpoint(o)) if o.network == network && o.ip == ip => {
                    (format!("endpoint {}", o.id), o.node.clone())
                }
                Some(Object::Service(s)) if s.network == network && s.vip == Some(ip) => {
                    (format!("the VIP of service {}", s.name), entry.version.node.clone())
                }
                _ => return None,
            };
            ipam::older(&entry.version, &mine).then_some((what, node))
        })
    }

    /// Moves what lost its address to an older holder (both sides of a partition handed
    /// it out) to a new address: this node's endpoints (the reconciler replaces the
    /// task's link), and any service VIP this node sees lose.
    /// Reported in the log and in `meshctl status`.
    fn resolve_duplicates(&self) {
        let me = &self.cfg.node_name;
        self.alloc().errors.retain(|key, _| !key.contains('/'));
        // (the object, its address, the older holder, its node, the network)
        let losers: Vec<(Object, Ipv4Addr, String, String, Network)> = {
            let gossip = self.gossip();
            let store = gossip.store();
            let shadowed = ipam::shadowed_keys(store);
            shadowed
                .iter()
                .filter_map(|key| {
                    let entry = store.entry(key)?;
                    let (network, ip, mine) = match entry.value.as_ref()? {
                        Object::Endpoint(e) => (&e.network, e.ip, &e.node == me),
                        // Any node that sees a VIP lose moves it: the service's
                        // creator may not see the network's task table (it arrives only
                        // where tasks run). Two nodes moving it at once write two
                        // versions; the later wins everywhere, and the other's claim
                        // stays a spare, given back like any extra one.
                        Object::Service(s) => (&s.network, s.vip?, true),
                        _ => return None,
                    };
                    if !mine {
                        return None;
                    }
                    let (what, node) = Self::older_holder(store, key, network, ip)?;
                    let net = store.network(network)?;
                    Some((entry.value.clone()?, ip, what, node, net.clone()))
                })
                .collect()
        };
        for (object, old_ip, older, older_node, net) in losers {
            let name = match &object {
                Object::Endpoint(e) => e.id.clone(),
                Object::Service(s) => format!("the VIP of service {}", s.name),
                _ => continue,
            };
            let ip = match self.allocate(&net) {
                Ok(Some(ip)) => ip,
                Ok(None) => continue,
                Err(error) => {
                    let message = format!(
                        "{name} shares {old_ip} with {older} (written by node {older_node}) and cannot move: {error}"
                    );
                    tracing::warn!(network = %net.name, %message, "duplicate address");
                    self.alloc().errors.insert(format!("{}/{}", net.name, object.key()), message);
                    continue;
                }
            };
            let moved = match object {
                Object::Endpoint(mut e) => {
                    e.ip = ip;
                    e.mac = ipam::mac_for_ip(ip);
                    if e.host_if.is_some() {
                        e.host_if = Some(task_host_if(&e.id, ip));
                    }
                    Object::Endpoint(e)
                }
                Object::Service(mut s) => {
                    s.vip = Some(ip);
                    Object::Service(s)
                }
                other => other,
            };
            let report = format!(
                "{name} on network {} moved from {old_ip} to {ip}: {older} (node {older_node}) held {old_ip} first",
                net.name
            );
            tracing::warn!(network = %net.name, old = %old_ip, new = %ip, %report, "duplicate address resolved");
            self.write(|g, now| g.put(moved, now));
            let mut alloc = self.alloc();
            alloc.reserved.remove(&ip);
            alloc.readdressed += 1;
            alloc.recent.push_back(report);
            while alloc.recent.len() > RECENT_READDRESSES {
                alloc.recent.pop_front();
            }
        }
    }
}

impl Agent {
    /// Gives a VIP to every `vip` service that has none — one written by a meshd from
    /// before VIPs existed (its store loads them with `vip: None`). One node does it:
    /// the first live node by name, so a cluster upgrade does not make every node
    /// allocate at once (if two do, the later write wins everywhere and the other
    /// claim stays a spare, given back like any extra one).
    fn give_missing_vips(&self) {
        let me = &self.cfg.node_name;
        let missing: Vec<(Service, Network)> = {
            let gossip = self.gossip();
            if gossip.live_nodes().iter().next() != Some(me) {
                return;
            }
            let store = gossip.store();
            store
                .services()
                .filter(|s| s.endpoint_mode == EndpointMode::Vip && s.vip.is_none())
                .filter_map(|s| Some((s.clone(), store.network(&s.network)?.clone())))
                .collect()
        };
        for (mut service, net) in missing {
            // `Ok(None)`: a claim is settling; the next pass tries again.
            match self.allocate(&net) {
                Ok(Some(ip)) => {
                    tracing::info!(service = %service.name, vip = %ip, "gave a VIP to a service created without one");
                    service.vip = Some(ip);
                    self.write(|g, now| g.put(Object::Service(service), now));
                    self.alloc().reserved.remove(&ip);
                }
                Ok(None) => {}
                Err(error) => {
                    let message = format!("service {} has no VIP and cannot get one: {error}", service.name);
                    self.alloc().errors.insert(format!("{}/service/{}", net.name, service.name), message);
                }
            }
        }
    }
}

impl Agent {
    /// Checks that `ip` may be asked for on `net` (inside the subnet, not the network
    /// or broadcast address, not held by another endpoint or node).
    pub(super) fn check_requested_ip(&self, net: &Network, ip: Ipv4Addr) -> Result<()> {
        let index = ipam::index_of(net.subnet, ip).filter(|&i| ipam::is_usable(net.subnet, i));
        let Some(index) = index else {
            return Err(Error::invalid(format!(
                "address {ip} is not a usable address of network {} ({}); pick one inside the subnet, not its network or broadcast address",
                net.name, net.subnet
            )));
        };
        let gossip = self.gossip();
        let store = gossip.store();
        if let Some(e) = store.endpoints().find(|e| e.network == net.name && e.ip == ip) {
            return Err(Error::invalid(format!(
                "address {ip} on network {} is used by {} on node {}; pick another address or omit --ip",
                net.name, e.id, e.node
            )));
        }
        if let Some(s) = store.services().find(|s| s.network == net.name && s.vip == Some(ip)) {
            return Err(Error::invalid(format!(
                "address {ip} on network {} is the VIP of service {}; pick another address or omit --ip",
                net.name, s.name
            )));
        }
        match store.get(&Key::block(&net.name, index)) {
            Some(Object::Block(c)) if c.node != self.cfg.node_name => Err(Error::invalid(format!(
                "address {ip} on network {} is claimed by node {}; pick another address or omit --ip",
                net.name, c.node
            ))),
            _ => Ok(()),
        }
    }

    /// Like [`Agent::allocate`] for one requested address: claims it if nobody does,
    /// and reserves it once the claim has settled. An error: another node won it.
    pub(super) fn allocate_exact(&self, net: &Network, ip: Ipv4Addr) -> Result<Option<Ipv4Addr>> {
        self.check_requested_ip(net, ip)?;
        let index = ipam::index_of(net.subnet, ip).expect("checked above");
        let key = Key::block(&net.name, index);
        let mut gossip = self.gossip();
        let mut alloc = self.alloc();
        if alloc.reserved.contains(&ip) {
            return Err(Error::invalid(format!(
                "address {ip} on network {} is being given to another task; pick another address or omit --ip",
                net.name
            )));
        }
        if gossip.store().get(&key).is_none() {
            self.claim(&mut gossip, &mut alloc, net, index);
            return Ok(None);
        }
        if alloc.claimed_at.get(&key).is_some_and(|at| at.elapsed() < CLAIM_SETTLE) {
            return Ok(None);
        }
        alloc.reserved.insert(ip);
        Ok(Some(ip))
    }
}

/// The addresses of `network` that endpoints and service VIPs hold, plus those an
/// attach or service create in progress has `reserved`.
fn addresses_in_use(store: &Store, reserved: &HashSet<Ipv4Addr>, network: &str) -> HashSet<Ipv4Addr> {
    store
        .endpoints()
        .filter(|e| e.network == network)
        .map(|e| e.ip)
        .chain(store.services().filter(|s| s.network == network).filter_map(|s| s.vip))
        .chain(reserved.iter().copied())
        .collect()
}
