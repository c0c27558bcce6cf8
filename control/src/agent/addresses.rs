//! This node's addresses on the overlay networks: which networks it takes part in, the
//! address blocks it claims, and the addresses it hands to tasks. Policy lives in
//! [`crate::ipam`]; this is the bookkeeping around the store.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use super::Agent;
use crate::{
    ipam,
    model::{BlockClaim, Endpoint, Key, Network, Object},
    Error, Result,
};

/// A block claim is used only after this long without a conflicting claim arriving:
/// gossip reaches every node of a thousand well within it.
pub const CLAIM_SETTLE: Duration = Duration::from_millis(1500);

/// This node's address bookkeeping (held briefly, never across an await).
#[derive(Default)]
pub(super) struct Alloc {
    /// When this node made each of its block claims, by store key.
    pub(super) claimed_at: HashMap<String, Instant>,
    /// Addresses handed out by an attach in progress, not yet in the store.
    pub(super) reserved: HashSet<Ipv4Addr>,
    /// Networks an attach in progress needs this node to take part in.
    pub(super) wanted: HashSet<String>,
}

impl Agent {
    /// Gives this node an address on every network it does not have one on yet.
    ///
    /// A node takes part in a network — holds an address and an overlay on it, and
    /// receives its task table — while it has a local task there (or an attach is on
    /// its way), or while the network carries a published port (the routing mesh needs
    /// every node). Otherwise it leaves the network.
    pub(super) fn ensure_node_addresses(&self) {
        let me = self.cfg.node_name.clone();
        let wanted = self.alloc().wanted.clone();
        let (join, leave): (Vec<Network>, Vec<String>) = {
            let gossip = self.gossip();
            let store = gossip.store();
            let needed = |net: &Network| {
                wanted.contains(&net.name)
                    || store.endpoints().any(|e| e.node == me && e.network == net.name && e.service.is_some())
                    || store
                        .published()
                        .any(|p| store.service(&p.service).is_some_and(|s| s.network == net.name))
            };
            let has = |net: &Network| store.get(&Key::endpoint(&Endpoint::node_id(&me, &net.name))).is_some();
            (
                store.networks().filter(|n| needed(n) && !has(n)).cloned().collect(),
                store.networks().filter(|n| !needed(n) && has(n)).map(|n| n.name.clone()).collect(),
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
        for net in join {
            let id = Endpoint::node_id(&me, &net.name);
            if let Ok(Some(ip)) = self.allocate(&net) {
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
                };
                self.write(|g, now| g.put(Object::Endpoint(endpoint), now));
                self.alloc().reserved.remove(&ip);
            }
        }
    }

    /// Reserves a free address on `net` from a confirmed block of this node's, claiming
    /// a new block when needed. `Ok(None)`: a claim is waiting for confirmation.
    pub(super) fn allocate(&self, net: &Network) -> Result<Option<Ipv4Addr>> {
        let me = &self.cfg.node_name;
        let mut gossip = self.gossip();
        let mut alloc = self.alloc();
        let now = Instant::now();
        let settled = |key: &str, alloc: &Alloc| {
            alloc.claimed_at.get(key).is_none_or(|at| now.duration_since(*at) >= CLAIM_SETTLE)
        };
        let store = gossip.store();
        let mine: Vec<&BlockClaim> =
            store.claims().filter(|c| c.network == net.name && &c.node == me).collect();
        let owned: Vec<u32> = mine
            .iter()
            .filter(|c| settled(&Key::block(&c.network, c.index), &alloc))
            .map(|c| c.index)
            .collect();
        let pending = owned.len() < mine.len();
        let used: HashSet<Ipv4Addr> = store
            .endpoints()
            .filter(|e| e.network == net.name)
            .map(|e| e.ip)
            .chain(alloc.reserved.iter().copied())
            .collect();
        if let Some(ip) = ipam::allocate(net.subnet, &owned, &used) {
            alloc.reserved.insert(ip);
            return Ok(Some(ip));
        }
        if pending {
            return Ok(None);
        }
        let claimed: HashSet<u32> =
            store.claims().filter(|c| c.network == net.name).map(|c| c.index).collect();
        let Some(index) = ipam::next_free_block(me, ipam::block_count(net.subnet), &claimed) else {
            return Err(Error::invalid(format!(
                "network {} ({}) has no free addresses left; detach tasks or create a network with a larger subnet",
                net.name, net.subnet
            )));
        };
        let claim = BlockClaim { network: net.name.clone(), index, node: me.clone() };
        alloc.claimed_at.insert(Key::block(&net.name, index), now);
        gossip.put_claim(claim, self.shared.now());
        drop((gossip, alloc));
        self.changed();
        Ok(None)
    }
}
