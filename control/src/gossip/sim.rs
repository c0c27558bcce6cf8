//! A simulated network for [`Gossip`] nodes: real protocol code and real encoding,
//! with a virtual clock, per-packet latency and loss. Unit tests and the
//! dissemination benchmark drive clusters of thousands of nodes with it.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddr},
};

use rand::{rngs::SmallRng, Rng, SeedableRng};

use super::{
    seal,
    wire::{decode, Packet},
    Config, Gossip, Millis, Out,
};
use crate::store::Store;

/// Bytes of IPv4 and UDP headers per datagram, counted in bandwidth figures.
pub const IP_UDP_HEADERS: u64 = 28;

/// A datagram on its way: delivery time, send order (tie-break), destination, bytes.
type InFlight = (Millis, u64, usize, Vec<u8>);

/// The simulated network.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Shortest one-way delay.
    pub min_latency: Millis,
    /// Longest one-way delay.
    pub max_latency: Millis,
    /// Probability a datagram is lost.
    pub loss: f64,
    /// Clock step between ticks.
    pub step: Millis,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig { min_latency: 1, max_latency: 5, loss: 0.0, step: 10 }
    }
}

/// A cluster of gossip nodes on a simulated network.
pub struct Sim {
    /// The nodes; node `i` is named `node-i`.
    pub nodes: Vec<Gossip>,
    /// The virtual clock.
    pub now: Millis,
    /// Bytes each node put on the wire (sealed, with IP/UDP headers).
    pub wire_bytes: Vec<u64>,
    net: NetConfig,
    by_addr: HashMap<SocketAddr, usize>,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    order: u64,
    down: HashSet<usize>,
    sides: Vec<u8>,
    rng: SmallRng,
}

/// The simulated address of node `i`.
pub fn sim_addr(i: usize) -> SocketAddr {
    let ip = u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i as u32;
    SocketAddr::from((Ipv4Addr::from(ip), 7946))
}

impl Sim {
    /// `n` nodes that already know each other (as after their joins settled).
    pub fn new(n: usize, cfg: Config, net: NetConfig, seed: u64) -> Sim {
        let mut nodes: Vec<Gossip> = (0..n)
            .map(|i| {
                Gossip::new(
                    cfg.clone(),
                    format!("node-{i}"),
                    sim_addr(i),
                    1,
                    Store::default(),
                    seed ^ (i as u64) << 20,
                    0,
                )
            })
            .collect();
        for node in &mut nodes {
            for j in 0..n {
                node.learn_member(&format!("node-{j}"), sim_addr(j), 0);
            }
            node.clear_queue();
            node.take_changed();
        }
        Sim {
            by_addr: (0..n).map(|i| (sim_addr(i), i)).collect(),
            wire_bytes: vec![0; n],
            nodes,
            now: 0,
            net,
            in_flight: BinaryHeap::new(),
            order: 0,
            down: HashSet::new(),
            sides: Vec::new(),
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// Splits the network: packets and push-pulls between nodes of different sides
    /// are lost. `side(i)` names node `i`'s side.
    pub fn partition(&mut self, side: impl Fn(usize) -> u8) {
        self.sides = (0..self.nodes.len()).map(side).collect();
    }

    /// Heals a partition.
    pub fn heal(&mut self) {
        self.sides.clear();
    }

    fn cut(&self, a: usize, b: usize) -> bool {
        !self.sides.is_empty() && self.sides[a] != self.sides[b]
    }

    /// Stops node `i`: it neither sends nor receives (a crash).
    pub fn crash(&mut self, i: usize) {
        self.down.insert(i);
    }

    /// Restarts node `i` with empty state, joining through node `seed`.
    pub fn restart(&mut self, i: usize, seed: usize, cfg: Config) {
        self.restart_with_store(i, seed, cfg, Store::default(), false);
    }

    /// Restarts node `i` from `store` (as loaded from its disk), joining through node
    /// `seed`; `resync` as when the store is older than the tombstone TTL.
    pub fn restart_with_store(&mut self, i: usize, seed: usize, cfg: Config, store: Store, resync: bool) {
        self.down.remove(&i);
        let mut node = Gossip::new(
            cfg,
            format!("node-{i}"),
            sim_addr(i),
            self.now,
            store,
            self.now ^ i as u64,
            self.now,
        );
        if resync {
            node.resync_loaded(self.now);
        }
        let outs = node.join(&[sim_addr(seed)]);
        self.nodes[i] = node;
        self.send(i, outs);
    }

    /// Advances the clock one step: ticks every node and delivers what is due.
    pub fn step(&mut self) {
        self.now += self.net.step;
        for i in 0..self.nodes.len() {
            if self.down.contains(&i) {
                continue;
            }
            let outs = self.nodes[i].tick(self.now);
            self.send(i, outs);
        }
        while let Some(Reverse((at, _, _, _))) = self.in_flight.peek() {
            if *at > self.now {
                break;
            }
            let Reverse((_, _, to, bytes)) = self.in_flight.pop().expect("peeked");
            if self.down.contains(&to) {
                continue;
            }
            let packet: Packet = decode(&bytes).expect("simulated packets are well-formed");
            let outs = self.nodes[to].handle_packet(packet, self.now);
            self.send(to, outs);
        }
    }

    fn send(&mut self, from: usize, outs: Vec<Out>) {
        for out in outs {
            match out {
                Out::Udp { to, bytes } => {
                    self.wire_bytes[from] += bytes.len() as u64 + seal::OVERHEAD as u64 + IP_UDP_HEADERS;
                    let Some(&to) = self.by_addr.get(&to) else { continue };
                    if self.cut(from, to) || self.rng.gen_bool(self.net.loss) {
                        continue;
                    }
                    let delay = self.rng.gen_range(self.net.min_latency..=self.net.max_latency);
                    self.order += 1;
                    self.in_flight.push(Reverse((self.now + delay, self.order, to, bytes)));
                }
                Out::PushPull { to, join } => {
                    let Some(&to) = self.by_addr.get(&to) else { continue };
                    if self.down.contains(&to) || self.cut(from, to) {
                        continue;
                    }
                    let mine = self.nodes[from].push_pull(join);
                    let theirs = self.nodes[to].push_pull(false);
                    let size =
                        crate::gossip::wire::encode(&mine).len() + crate::gossip::wire::encode(&theirs).len();
                    self.wire_bytes[from] += size as u64;
                    let (mine_clock, theirs_clock) = (mine.covers, theirs.covers);
                    self.nodes[to].merge_push_pull(mine, self.now);
                    self.nodes[from].merge_push_pull(theirs, self.now);
                    self.nodes[from].note_pushed(mine_clock);
                    self.nodes[to].note_pushed(theirs_clock);
                }
            }
        }
    }

    /// Steps until `done` holds or `limit` ms of virtual time pass; returns whether it held.
    pub fn run_until(&mut self, limit: Millis, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let deadline = self.now + limit;
        while self.now < deadline {
            if done(self) {
                return true;
            }
            self.step();
        }
        done(self)
    }
}

/// A task endpoint of service `web` on network `backend`, hosted by `node-0`: the
/// update the simulations spread.
pub fn task_endpoint(id: &str) -> crate::model::Object {
    let ip = Ipv4Addr::new(10, 0, 0, 9);
    crate::model::Object::Endpoint(crate::model::Endpoint {
        id: id.into(),
        service: Some("web".into()),
        network: "backend".into(),
        node: "node-0".into(),
        ip,
        mac: crate::ipam::mac_for_ip(ip),
        vtep: Ipv4Addr::new(198, 18, 0, 11),
        host_if: None,
        netns: None,
        health: Default::default(),
        draining: false,
    })
}
