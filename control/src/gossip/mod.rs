//! SWIM membership with Lifeguard's local health awareness, and dissemination of the
//! cluster store by piggybacking — as a sans-IO state machine.
//!
//! [`Gossip`] never touches a socket or a clock: the driver (`crate::source::gossip`)
//! hands it decoded packets and the current time in milliseconds and sends what it
//! returns; the simulation benchmark drives thousands of them over a simulated network
//! the same way.
//!
//! - **Failure detection** (SWIM): every probe interval a member pings the next member
//!   of a shuffled round; no ack within the probe timeout → `k` members are asked to
//!   ping it indirectly; no ack by the end of the interval → the member is suspected.
//!   A suspect that does not refute (by raising its incarnation) within the suspicion
//!   timeout is declared dead.
//! - **Lifeguard**: a member that misses acks raises its local health multiplier,
//!   stretching its own probe interval and timeout (it may be the slow one); the
//!   suspicion timeout starts long and shrinks as independent suspicions confirm it.
//! - **Scoping**: a task's endpoint is only sent to nodes taking part in its network
//!   (those holding their own address on it); everything else is cluster-wide. A node
//!   that starts taking part pulls the network's table with a push-pull.
//! - **Dissemination**: membership changes and store entries ride on every packet,
//!   fewest-transmitted first, each retransmitted `retransmit_mult · ⌈log10(n+1)⌉`
//!   times; every `gossip_interval` a few random members get a gossip-only packet.
//!   A periodic TCP push-pull of the full state repairs whatever was missed.

pub mod seal;
pub mod sim;
pub mod wire;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::SocketAddr,
};

use rand::{rngs::SmallRng, seq::SliceRandom, Rng, SeedableRng};

pub use self::wire::MemberState;
use self::wire::{encode_within, MemberRecord, Msg, Packet, PushPull, Update};
use crate::{
    model::{BlockClaim, Object},
    store::{Entry, Store},
};

/// Milliseconds on the driver's clock.
pub type Millis = u64;

/// Shortest time between two push-pulls that pass on news learned by push-pull.
pub const NEWS_PULL_INTERVAL: Millis = 1000;

/// Up to this many entries learned by one push-pull are spread by gossip; more are
/// passed on by push-pull.
pub const NEWS_GOSSIP_MAX: usize = 64;

/// Gossip tuning, defaults in the spirit of memberlist's LAN profile.
#[derive(Clone, Debug)]
pub struct Config {
    /// How often a member probes another.
    pub probe_interval: Millis,
    /// How long to wait for a direct ack before asking others.
    pub probe_timeout: Millis,
    /// How many members are asked to probe indirectly.
    pub indirect_checks: usize,
    /// How often gossip-only packets go out.
    pub gossip_interval: Millis,
    /// To how many members each gossip round goes.
    pub gossip_fanout: usize,
    /// Retransmissions of an update: this times ⌈log10(n+1)⌉.
    pub retransmit_mult: u32,
    /// Suspicion timeout: this times max(1, log10(n)) probe intervals (the minimum).
    pub suspicion_mult: u32,
    /// The suspicion timeout starts at this multiple of the minimum.
    pub suspicion_max_mult: u32,
    /// How often a full TCP push-pull runs with one random member.
    pub push_pull_interval: Millis,
    /// How long dead members still receive gossip (so they learn and refute).
    pub gossip_to_dead: Millis,
    /// How often a push-pull is tried with a random dead member, so a healed
    /// partition finds itself again (Serf's reconnect).
    pub reconnect_interval: Millis,
    /// How long a tombstone is kept before it is reaped.
    pub tombstone_ttl: Millis,
    /// Largest UDP payload before sealing.
    pub udp_limit: usize,
    /// Highest local health multiplier.
    pub max_health: u32,
    /// A node resyncing a stale store with no member in sight keeps its entries after
    /// this long (it is alone: nobody can contradict them).
    pub resync_alone_after: Millis,
    /// Largest TCP push-pull frame accepted (driver limit, checked before
    /// authentication; the cluster state must fit in it).
    pub max_frame: usize,
    /// Most push-pull exchanges served at once (driver limit); more are closed at once.
    pub max_push_pulls: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            probe_interval: 1000,
            probe_timeout: 500,
            indirect_checks: 3,
            gossip_interval: 200,
            gossip_fanout: 3,
            retransmit_mult: 4,
            suspicion_mult: 3,
            suspicion_max_mult: 2,
            push_pull_interval: 30_000,
            gossip_to_dead: 30_000,
            reconnect_interval: 5_000,
            tombstone_ttl: 3_600_000,
            udp_limit: 1400 - seal::OVERHEAD,
            max_health: 8,
            resync_alone_after: 15_000,
            max_frame: 4 << 20,
            max_push_pulls: 4,
        }
    }
}

/// What the state machine wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Out {
    /// Send these encoded packet bytes (seal them first) over UDP.
    Udp {
        /// Destination.
        to: SocketAddr,
        /// Encoded [`Packet`].
        bytes: Vec<u8>,
    },
    /// Run a TCP push-pull with this member.
    PushPull {
        /// Its address.
        to: SocketAddr,
        /// Whether this is our join.
        join: bool,
    },
}

/// A member as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Name.
    pub name: String,
    /// Gossip address.
    pub addr: SocketAddr,
    /// Highest incarnation seen.
    pub incarnation: u64,
    /// State.
    pub state: MemberState,
    /// When the state last changed (driver clock).
    pub since: Millis,
    suspicion: Option<Suspicion>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Suspicion {
    started: Millis,
    confirmations: BTreeSet<String>,
}

#[derive(Clone, Debug)]
struct Probe {
    target: String,
    seq: u32,
    sent: Millis,
    indirect_sent: bool,
}

#[derive(Clone, Debug)]
struct Relay {
    requester: SocketAddr,
    requester_seq: u32,
    expires: Millis,
}

enum MsgKind {
    Gossip,
    Protocol,
}

#[derive(Clone, Debug)]
struct Queued {
    update: Update,
    transmits: u32,
    order: u64,
    /// Members this update was already sent to: the budget never buys a duplicate.
    sent_to: HashSet<SocketAddr>,
}

/// Counters of the protocol's work.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// UDP packets produced.
    pub packets_out: u64,
    /// Encoded bytes produced (before sealing).
    pub bytes_out: u64,
    /// Packets handled.
    pub packets_in: u64,
}

/// One node's gossip state.
pub struct Gossip {
    cfg: Config,
    me: String,
    addr: SocketAddr,
    incarnation: u64,
    epoch: u64,
    packet_seq: u64,
    members: BTreeMap<String, Member>,
    store: Store,
    tombstones_seen: HashMap<String, Millis>,
    queue: BTreeMap<String, Queued>,
    queue_order: u64,
    rng: SmallRng,
    probe: Option<Probe>,
    probe_round: Vec<String>,
    gossip_round: Vec<String>,
    next_probe_at: Millis,
    next_gossip_at: Millis,
    next_push_pull_at: Millis,
    next_reconnect_at: Millis,
    next_seq: u32,
    relays: HashMap<u32, Relay>,
    addr_names: HashMap<SocketAddr, String>,
    live_members: usize,
    suspects: BTreeSet<String>,
    participants: HashMap<String, HashSet<String>>,
    participants_dirty: bool,
    pending_syncs: Vec<String>,
    /// Nodes that just started taking part in a network this node hosts tasks on: each
    /// gets a push-pull from here, so the tasks reach it directly.
    pending_welcomes: BTreeSet<String>,
    /// A push-pull brought entries this node did not have (e.g. a healed partition):
    /// pass them on with one push-pull to another member (not the one they came from),
    /// at most once per [`NEWS_PULL_INTERVAL`], so bulk news spreads in a few rounds
    /// instead of waiting for the periodic push-pull.
    news_from: Option<String>,
    next_news_pull_at: Millis,
    health: u32,
    leaving: bool,
    changed: bool,
    /// While resyncing a stale store: the loaded keys that do not count yet (they are
    /// neither sent nor re-announced until a complete push-pull confirms or drops them).
    unconfirmed: Option<HashSet<String>>,
    resync_started: Millis,
    next_resync_at: Millis,
    /// Work counters.
    pub stats: Stats,
}

impl Gossip {
    /// A node named `me` gossiping at `addr`, whose process started at `epoch` (ms
    /// since the Unix epoch), holding `store`.
    pub fn new(
        cfg: Config,
        me: String,
        addr: SocketAddr,
        epoch: u64,
        store: Store,
        seed: u64,
        now: Millis,
    ) -> Gossip {
        let mut g = Gossip {
            me,
            addr,
            incarnation: 0,
            epoch,
            packet_seq: 0,
            members: BTreeMap::new(),
            store,
            tombstones_seen: HashMap::new(),
            queue: BTreeMap::new(),
            queue_order: 0,
            rng: SmallRng::seed_from_u64(seed),
            probe: None,
            probe_round: Vec::new(),
            gossip_round: Vec::new(),
            next_probe_at: now,
            next_gossip_at: now,
            next_push_pull_at: now + cfg.push_pull_interval,
            next_reconnect_at: now + cfg.reconnect_interval,
            next_seq: 1,
            relays: HashMap::new(),
            addr_names: HashMap::new(),
            live_members: 0,
            suspects: BTreeSet::new(),
            participants: HashMap::new(),
            participants_dirty: true,
            pending_syncs: Vec::new(),
            pending_welcomes: BTreeSet::new(),
            news_from: None,
            next_news_pull_at: 0,
            health: 0,
            leaving: false,
            changed: false,
            unconfirmed: None,
            resync_started: now,
            next_resync_at: now,
            stats: Stats::default(),
            cfg,
        };
        // Tombstones loaded from disk age from now: they are reaped one TTL after the
        // start, like any tombstone learned now (before, they were never reaped).
        let loaded: Vec<String> =
            g.store.entries().filter(|(_, e)| e.value.is_none()).map(|(k, _)| k.clone()).collect();
        for key in loaded {
            g.tombstones_seen.insert(key, now);
        }
        // Start each timer at a random point of its period, as memberlist does, so a
        // cluster started at once does not probe and gossip in lockstep.
        g.next_probe_at = now + g.rng.gen_range(0..g.cfg.probe_interval.max(1));
        g.next_gossip_at = now + g.rng.gen_range(0..g.cfg.gossip_interval.max(1));
        g.next_push_pull_at =
            now + g.cfg.push_pull_interval + g.rng.gen_range(0..g.cfg.push_pull_interval.max(1));
        g.announce();
        g
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.me
    }

    /// The tuning this node runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// This node's process epoch (ms since the Unix epoch at its start).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// This node's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The replicated store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Known members (this node excluded).
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// Names of members whose entries are live: this node and every alive or suspect
    /// member. Entries of dead or departed members are suspended, not deleted.
    pub fn live_nodes(&self) -> BTreeSet<String> {
        let mut live: BTreeSet<String> = self
            .members
            .values()
            .filter(|m| matches!(m.state, MemberState::Alive | MemberState::Suspect))
            .map(|m| m.name.clone())
            .collect();
        live.insert(self.me.clone());
        live
    }

    /// Lifeguard's local health multiplier (0 = healthy).
    pub fn health(&self) -> u32 {
        self.health
    }

    /// Whether membership or the store changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Learns a member without spreading the news (a simulation seeding full
    /// membership, as if every node had just completed a push-pull).
    pub fn learn_member(&mut self, name: &str, addr: SocketAddr, now: Millis) {
        if name != self.me {
            let update = Update::Alive { node: name.to_owned(), addr, incarnation: 0 };
            self.apply_member(&update, now);
        }
    }

    /// Drops every queued update (simulations start from a quiet cluster).
    pub fn clear_queue(&mut self) {
        self.queue.clear();
    }

    /// Updates waiting to be piggybacked.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The loaded store is older than the tombstone TTL: the cluster may have deleted
    /// some of its entries and already forgotten the tombstones. Until a complete
    /// push-pull with a member has been merged, the loaded entries stay local (still
    /// served here, never sent nor re-announced); then an entry the cluster no longer
    /// knows is dropped, unless this node wrote it after its last push-pull (the
    /// cluster cannot have deleted what it never received).
    pub fn resync_loaded(&mut self, now: Millis) {
        self.unconfirmed = Some(self.store.entries().map(|(k, _)| k.clone()).collect());
        self.resync_started = now;
        self.next_resync_at = now;
    }

    /// Whether loaded entries still wait for a resync with the cluster.
    pub fn resyncing(&self) -> bool {
        self.unconfirmed.is_some()
    }

    /// Records that every entry of this node's store up to Lamport counter `clock`
    /// reached a member (a push-pull frame's `covers`; see [`Gossip::resync_loaded`]).
    pub fn note_pushed(&mut self, clock: u64) {
        self.store.mark_synced(clock);
    }

    fn is_unconfirmed(&self, key: &str) -> bool {
        self.unconfirmed.as_ref().is_some_and(|u| u.contains(key))
    }

    /// Ends a resync with `theirs`, a member's complete store (already merged).
    fn finish_resync(&mut self, theirs: &Store) {
        let Some(unconfirmed) = self.unconfirmed.take() else { return };
        let synced = self.store.synced_clock();
        let mut kept = 0;
        let mut dropped = 0;
        for key in unconfirmed {
            if theirs.entry(&key).is_some() {
                continue;
            }
            let Some(entry) = self.store.entry(&key).cloned() else { continue };
            if entry.version.node == self.me && entry.version.counter > synced {
                // Written here after the last push-pull: news to the cluster.
                kept += 1;
                self.enqueue(Update::Entry { key, entry });
            } else {
                dropped += 1;
                self.store.remove(&key);
                self.tombstones_seen.remove(&key);
                self.participants_dirty = true;
            }
        }
        self.changed = true;
        tracing::info!(
            kept,
            dropped,
            "resync with the cluster done: entries it no longer knows were dropped"
        );
    }

    fn tick_resync(&mut self, now: Millis, out: &mut Vec<Out>) {
        if self.unconfirmed.is_none() {
            return;
        }
        if self.members.is_empty() && now >= self.resync_started + self.cfg.resync_alone_after {
            tracing::info!("no member in sight: keeping the loaded store as it is");
            self.unconfirmed = None;
            self.changed = true;
            return;
        }
        if now < self.next_resync_at {
            return;
        }
        self.next_resync_at = now + 1000;
        let alive: Vec<SocketAddr> =
            self.members.values().filter(|m| m.state == MemberState::Alive).map(|m| m.addr).collect();
        if let Some(&to) = alive.choose(&mut self.rng) {
            out.push(Out::PushPull { to, join: true });
        }
    }

    fn announce(&mut self) {
        let update = Update::Alive { node: self.me.clone(), addr: self.addr, incarnation: self.incarnation };
        self.enqueue(update);
    }

    fn enqueue(&mut self, update: Update) {
        self.queue_order += 1;
        let subject = update.subject();
        self.queue.insert(
            subject,
            Queued { update, transmits: 0, order: self.queue_order, sent_to: HashSet::new() },
        );
    }

    fn record_entry(&mut self, key: String, entry: Entry, now: Millis) {
        if let Some(unconfirmed) = &mut self.unconfirmed {
            unconfirmed.remove(&key);
        }
        if key.starts_with("endpoint/node:") {
            self.participants_dirty = true;
        }
        if entry.value.is_none() {
            self.tombstones_seen.entry(key.clone()).or_insert(now);
        } else {
            self.tombstones_seen.remove(&key);
        }
        self.enqueue(Update::Entry { key, entry });
        self.changed = true;
    }

    /// Writes an object locally and spreads it.
    pub fn put(&mut self, object: Object, now: Millis) -> bool {
        let key = object.key();
        if let Object::Endpoint(e) = &object {
            if e.service.is_none() && e.node == self.me && self.store.get(&key).is_none() {
                // We start taking part in this network: fetch its table.
                self.pending_syncs.push(e.network.clone());
            }
        }
        if !self.store.put(&self.me, object) {
            return false;
        }
        let entry = self.store.entry(&key).cloned().expect("just written");
        self.record_entry(key, entry, now);
        self.gossip_soon(now);
        true
    }

    /// Deletes a key locally (tombstone) and spreads it.
    pub fn delete(&mut self, key: &str, now: Millis) -> bool {
        if !self.store.delete(&self.me, key) {
            return false;
        }
        let entry = self.store.entry(key).cloned().expect("just written");
        self.record_entry(key.to_owned(), entry, now);
        self.gossip_soon(now);
        true
    }

    /// A local write, or news received, goes out on the next tick instead of waiting up
    /// to a whole gossip interval: these waits dominated attach → FDB-on-every-node
    /// (one per hop). The update's
    /// transmissions stay bounded by the retransmit limit, so this moves packets
    /// earlier, it does not add any.
    fn gossip_soon(&mut self, now: Millis) {
        self.next_gossip_at = self.next_gossip_at.min(now);
    }

    /// Writes a block claim (see [`Store::put_claim`]) and spreads it.
    pub fn put_claim(&mut self, claim: BlockClaim, now: Millis) {
        let key = Object::Block(claim.clone()).key();
        self.store.put_claim(claim);
        if let Some(entry) = self.store.entry(&key).cloned() {
            self.record_entry(key, entry, now);
        }
    }

    /// Claims the key-rotation lock (see [`Store::claim_rotation`]) and spreads it.
    pub fn claim_rotation(&mut self, generation: u64, now: Millis) {
        let me = self.me.clone();
        if self.store.claim_rotation(&me, generation) {
            let key = crate::store::ROTATION_LOCK.to_owned();
            let entry = self.store.entry(&key).cloned().expect("just written");
            self.record_entry(key, entry, now);
        }
    }

    /// Starts joining through `seeds`.
    pub fn join(&mut self, seeds: &[SocketAddr]) -> Vec<Out> {
        seeds.iter().filter(|s| **s != self.addr).map(|&to| Out::PushPull { to, join: true }).collect()
    }

    /// Starts leaving: announces it and stops probing.
    pub fn leave(&mut self, now: Millis) -> Vec<Out> {
        self.leaving = true;
        self.incarnation += 1;
        self.enqueue(Update::Left { node: self.me.clone(), incarnation: self.incarnation });
        // Tell as many members as possible right away.
        let targets: Vec<SocketAddr> =
            self.members.values().filter(|m| m.state == MemberState::Alive).map(|m| m.addr).collect();
        let mut out = Vec::new();
        for to in targets {
            out.push(self.packet_to(to, Msg::Gossip, now));
        }
        out
    }

    fn cluster_size(&self) -> usize {
        self.live_members + 1
    }

    fn retransmit_limit(&self) -> u32 {
        let n = self.cluster_size() as f64;
        self.cfg.retransmit_mult * ((n + 1.0).log10().ceil() as u32).max(1)
    }

    fn suspicion_bounds(&self) -> (Millis, Millis) {
        let n = self.cluster_size().max(1) as f64;
        let min =
            (self.cfg.suspicion_mult as f64 * n.log10().max(1.0) * self.cfg.probe_interval as f64) as Millis;
        (min, min * self.cfg.suspicion_max_mult as Millis)
    }

    /// Lifeguard: the suspicion timeout shrinks from max towards min as independent
    /// confirmations arrive (expected: `indirect_checks` of them).
    fn suspicion_timeout(&self, confirmations: usize) -> Millis {
        let (min, max) = self.suspicion_bounds();
        let k = self.cfg.indirect_checks.min(self.cluster_size().saturating_sub(2));
        if k == 0 {
            return min;
        }
        let frac = ((confirmations as f64) + 1.0).ln() / ((k as f64) + 1.0).ln();
        let timeout = max as f64 - (max - min) as f64 * frac.min(1.0);
        (timeout as Millis).max(min)
    }

    fn next_packet(&mut self, msg: Msg) -> Packet {
        self.packet_seq += 1;
        Packet {
            from: self.me.clone(),
            from_addr: self.addr,
            epoch: self.epoch,
            seq: self.packet_seq,
            msg,
            updates: vec![],
        }
    }

    /// Builds a packet to `to` with as many queued updates as fit.
    fn packet_to(&mut self, to: SocketAddr, msg: Msg, _now: Millis) -> Out {
        let msg_kind = if msg == Msg::Gossip { MsgKind::Gossip } else { MsgKind::Protocol };
        let packet = self.next_packet(msg);
        // Updates this node has not yet sent to `to`, fewest-transmitted and newest first.
        // Task endpoints go only to members taking part in their network.
        self.refresh_participants();
        let recipient = self.addr_names.get(&to).cloned();
        let out_of_scope: Vec<String> = self
            .queue
            .iter()
            .filter(|(_, q)| !q.sent_to.contains(&to) && !self.in_scope(&q.update, recipient.as_deref()))
            .map(|(s, _)| s.clone())
            .collect();
        for subject in out_of_scope {
            if let Some(q) = self.queue.get_mut(&subject) {
                q.sent_to.insert(to);
            }
        }
        let mut order: Vec<(&String, &Queued)> =
            self.queue.iter().filter(|(_, q)| !q.sent_to.contains(&to)).collect();
        order.sort_by_key(|(_, q)| (q.transmits, std::cmp::Reverse(q.order)));
        let candidates: Vec<&Update> = order.iter().map(|(_, q)| &q.update).collect();
        let (bytes, used) = encode_within(packet, &candidates, self.cfg.udp_limit);
        let used: Vec<String> = used.into_iter().map(|i| order[i].0.clone()).collect();
        // Only gossip rounds spend an update's retransmit budget; probes and acks carry
        // updates for free. Either way an update goes to each member at most once.
        let limit = self.retransmit_limit();
        let others = self.members.len();
        for subject in &used {
            let done = match self.queue.get_mut(subject) {
                Some(q) => {
                    q.sent_to.insert(to);
                    if matches!(msg_kind, MsgKind::Gossip) {
                        q.transmits += 1;
                    }
                    q.transmits >= limit || q.sent_to.len() >= others
                }
                None => false,
            };
            if done {
                self.queue.remove(subject);
            }
        }
        self.stats.packets_out += 1;
        self.stats.bytes_out += bytes.len() as u64;
        Out::Udp { to, bytes }
    }

    /// Another node started taking part in a network: re-announce the tasks this node
    /// hosts there, so they reach it even if they were spread before it joined.
    fn welcome_participant(&mut self, entry: &Entry) {
        let Some(Object::Endpoint(e)) = &entry.value else { return };
        if e.service.is_some() || e.node == self.me {
            return;
        }
        let mine: Vec<(String, Entry)> = self
            .store
            .entries()
            .filter(|(k, en)| {
                matches!(&en.value, Some(Object::Endpoint(t))
                    if t.node == self.me && t.network == e.network && t.service.is_some())
                    && !self.is_unconfirmed(k)
            })
            .map(|(k, en)| (k.clone(), en.clone()))
            .collect();
        if !mine.is_empty() {
            // Gossip alone reaches the newcomer only by chance when many nodes join at
            // once (the retransmit budget goes to whoever is picked); a push-pull to it
            // delivers the tasks at once.
            self.pending_welcomes.insert(e.node.clone());
        }
        for (key, entry) in mine {
            self.enqueue(Update::Entry { key, entry });
        }
    }

    fn refresh_participants(&mut self) {
        if !self.participants_dirty {
            return;
        }
        self.participants_dirty = false;
        self.participants.clear();
        for e in self.store.endpoints().filter(|e| e.service.is_none()) {
            self.participants.entry(e.network.clone()).or_default().insert(e.node.clone());
        }
    }

    /// Whether `update` may go to `recipient`: anything cluster-wide may; a task
    /// endpoint only to a participant of its network (or to anyone while nobody is
    /// known to take part, and to members we cannot name yet).
    fn in_scope(&self, update: &Update, recipient: Option<&str>) -> bool {
        let Update::Entry { entry, .. } = update else { return true };
        let Some(Object::Endpoint(e)) = &entry.value else { return true };
        if e.service.is_none() {
            return true;
        }
        match (recipient, self.participants.get(&e.network)) {
            (Some(name), Some(nodes)) => nodes.contains(name),
            _ => true,
        }
    }

    /// The networks `node` takes part in, judged from the store.
    fn networks_of(&self, node: &str) -> HashSet<String> {
        self.store
            .endpoints()
            .filter(|e| e.service.is_none() && e.node == node)
            .map(|e| e.network.clone())
            .collect()
    }

    fn scaled(&self, interval: Millis) -> Millis {
        interval * (self.health as Millis + 1)
    }

    /// Advances timers: probes, suspicion, gossip rounds, push-pull, reaping.
    pub fn tick(&mut self, now: Millis) -> Vec<Out> {
        let mut out = Vec::new();
        if self.leaving {
            return out;
        }
        self.tick_probe(now, &mut out);
        self.tick_suspicions(now);
        self.tick_resync(now, &mut out);
        if now >= self.next_gossip_at {
            self.next_gossip_at = now + self.cfg.gossip_interval;
            if !self.queue.is_empty() {
                let targets = self.gossip_targets(now);
                for to in targets {
                    out.push(self.packet_to(to, Msg::Gossip, now));
                }
            }
        }
        if now >= self.next_push_pull_at {
            let n = self.cluster_size();
            // memberlist's scaling: beyond 32 members, push-pull less often.
            let scale = if n > 32 { ((n as f64).log2() - 5.0).ceil().max(1.0) as Millis + 1 } else { 1 };
            self.next_push_pull_at = now + self.cfg.push_pull_interval * scale;
            let alive: Vec<SocketAddr> =
                self.members.values().filter(|m| m.state == MemberState::Alive).map(|m| m.addr).collect();
            if let Some(&to) = alive.choose(&mut self.rng) {
                out.push(Out::PushPull { to, join: false });
            }
        }
        if now >= self.next_news_pull_at {
            if let Some(from) = self.news_from.take() {
                self.next_news_pull_at = now + NEWS_PULL_INTERVAL;
                let others: Vec<SocketAddr> = self
                    .members
                    .values()
                    .filter(|m| m.state == MemberState::Alive && m.name != from)
                    .map(|m| m.addr)
                    .collect();
                if let Some(&to) = others.choose(&mut self.rng) {
                    out.push(Out::PushPull { to, join: false });
                }
            }
        }
        for node in std::mem::take(&mut self.pending_welcomes) {
            if let Some(m) = self.members.get(&node).filter(|m| m.state == MemberState::Alive) {
                out.push(Out::PushPull { to: m.addr, join: false });
            }
        }
        for network in std::mem::take(&mut self.pending_syncs) {
            self.refresh_participants();
            // Pull the table from two participants, one hosting tasks there if this node
            // knows one (it certainly holds those): a single random participant may have
            // joined a moment ago with an empty table, and then this node would wait for
            // the periodic push-pull (seen with 20 nodes joining one network at once).
            let hosts: HashSet<&str> = self
                .store
                .endpoints()
                .filter(|e| e.network == network && e.service.is_some())
                .map(|e| e.node.as_str())
                .collect();
            let peers: Vec<(SocketAddr, bool)> = self
                .members
                .values()
                .filter(|m| m.state == MemberState::Alive)
                .filter(|m| self.participants.get(&network).is_some_and(|p| p.contains(&m.name)))
                .map(|m| (m.addr, hosts.contains(m.name.as_str())))
                .collect();
            let host =
                peers.iter().filter(|(_, h)| *h).collect::<Vec<_>>().choose(&mut self.rng).map(|p| p.0);
            let any = peers
                .iter()
                .filter(|p| Some(p.0) != host)
                .collect::<Vec<_>>()
                .choose(&mut self.rng)
                .map(|p| p.0);
            for to in host.into_iter().chain(any) {
                out.push(Out::PushPull { to, join: false });
            }
        }
        if now >= self.next_reconnect_at {
            self.next_reconnect_at = now + self.cfg.reconnect_interval;
            let dead: Vec<SocketAddr> =
                self.members.values().filter(|m| m.state == MemberState::Dead).map(|m| m.addr).collect();
            if let Some(&to) = dead.choose(&mut self.rng) {
                out.push(Out::PushPull { to, join: false });
            }
        }
        self.relays.retain(|_, r| r.expires > now);
        self.reap(now);
        out
    }

    /// The next `gossip_fanout` members of a shuffled round (dead ones only while they
    /// may still refute): successive rounds cover every member before any repeats, so
    /// an update's first transmissions reach distinct members.
    fn gossip_targets(&mut self, now: Millis) -> Vec<SocketAddr> {
        let horizon = self.cfg.gossip_to_dead;
        let eligible = |m: &Member| match m.state {
            MemberState::Alive | MemberState::Suspect => true,
            MemberState::Dead | MemberState::Left => now.saturating_sub(m.since) < horizon,
        };
        let mut targets = Vec::new();
        let mut refilled = false;
        while targets.len() < self.cfg.gossip_fanout {
            let Some(name) = self.gossip_round.pop() else {
                if refilled {
                    break;
                }
                refilled = true;
                let mut round: Vec<String> =
                    self.members.values().filter(|m| eligible(m)).map(|m| m.name.clone()).collect();
                round.shuffle(&mut self.rng);
                self.gossip_round = round;
                continue;
            };
            if let Some(m) = self.members.get(&name).filter(|m| eligible(m)) {
                if !targets.contains(&m.addr) {
                    targets.push(m.addr);
                }
            }
        }
        targets
    }

    fn tick_probe(&mut self, now: Millis, out: &mut Vec<Out>) {
        if let Some(probe) = self.probe.clone() {
            let target = self.members.get(&probe.target).cloned();
            if !probe.indirect_sent && now >= probe.sent + self.scaled(self.cfg.probe_timeout) {
                if let Some(target) = &target {
                    let helpers: Vec<SocketAddr> = self
                        .members
                        .values()
                        .filter(|m| m.state == MemberState::Alive && m.name != target.name)
                        .map(|m| m.addr)
                        .collect::<Vec<_>>()
                        .choose_multiple(&mut self.rng, self.cfg.indirect_checks)
                        .copied()
                        .collect();
                    for to in helpers {
                        let msg = Msg::PingReq {
                            seq: probe.seq,
                            target: target.name.clone(),
                            target_addr: target.addr,
                        };
                        out.push(self.packet_to(to, msg, now));
                    }
                }
                if let Some(p) = self.probe.as_mut() {
                    p.indirect_sent = true;
                }
            }
            if now >= probe.sent + self.scaled(self.cfg.probe_interval) {
                self.probe = None;
                self.health = (self.health + 1).min(self.cfg.max_health);
                if let Some(target) = target {
                    self.suspect(&target.name, target.incarnation, self.me.clone(), now);
                }
            }
            return;
        }
        if now < self.next_probe_at {
            return;
        }
        self.next_probe_at = now + self.scaled(self.cfg.probe_interval);
        let Some(target) = self.next_probe_target() else { return };
        let seq = self.take_seq();
        let addr = self.members[&target].addr;
        self.probe = Some(Probe { target: target.clone(), seq, sent: now, indirect_sent: false });
        out.push(self.packet_to(addr, Msg::Ping { seq, target }, now));
    }

    fn take_seq(&mut self) -> u32 {
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        self.next_seq
    }

    fn next_probe_target(&mut self) -> Option<String> {
        loop {
            let Some(name) = self.probe_round.pop() else {
                let mut round: Vec<String> = self
                    .members
                    .values()
                    .filter(|m| matches!(m.state, MemberState::Alive | MemberState::Suspect))
                    .map(|m| m.name.clone())
                    .collect();
                if round.is_empty() {
                    return None;
                }
                round.shuffle(&mut self.rng);
                self.probe_round = round;
                continue;
            };
            if self
                .members
                .get(&name)
                .is_some_and(|m| matches!(m.state, MemberState::Alive | MemberState::Suspect))
            {
                return Some(name);
            }
        }
    }

    fn tick_suspicions(&mut self, now: Millis) {
        let expired: Vec<(String, u64)> = self
            .suspects
            .iter()
            .filter_map(|name| self.members.get(name))
            .filter_map(|m| {
                let s = m.suspicion.as_ref()?;
                (now >= s.started + self.suspicion_timeout(s.confirmations.len()))
                    .then(|| (m.name.clone(), m.incarnation))
            })
            .collect();
        for (name, incarnation) in expired {
            self.apply(&Update::Dead { node: name, incarnation }, now);
        }
    }

    fn reap(&mut self, now: Millis) {
        let ttl = self.cfg.tombstone_ttl;
        let old: Vec<String> = self
            .tombstones_seen
            .iter()
            .filter(|(_, seen)| now.saturating_sub(**seen) >= ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for key in old {
            self.tombstones_seen.remove(&key);
            self.store.reap(&key);
            // The store changed: persisted again, so a reaped tombstone stays gone.
            self.changed = true;
        }
    }

    fn suspect(&mut self, node: &str, incarnation: u64, from: String, now: Millis) {
        self.apply(&Update::Suspect { node: node.to_owned(), incarnation, from }, now);
    }

    /// Handles a decoded, authenticated packet.
    pub fn handle_packet(&mut self, packet: Packet, now: Millis) -> Vec<Out> {
        self.stats.packets_in += 1;
        let mut out = Vec::new();
        for update in packet.updates {
            let subject = update.subject();
            self.apply(&update, now);
            // What this packet brought, its sender has: never send that back (but do
            // send anything newer on the subject, such as our refutation).
            if let Some(q) = self.queue.get_mut(&subject).filter(|q| q.update == update) {
                q.sent_to.insert(packet.from_addr);
            }
        }
        match packet.msg {
            Msg::Ping { seq, target } => {
                if target == self.me && !self.leaving {
                    out.push(self.packet_to(packet.from_addr, Msg::Ack { seq }, now));
                }
            }
            Msg::PingReq { seq, target, target_addr } => {
                let relay_seq = self.take_seq();
                self.relays.insert(
                    relay_seq,
                    Relay {
                        requester: packet.from_addr,
                        requester_seq: seq,
                        expires: now + self.cfg.probe_interval,
                    },
                );
                out.push(self.packet_to(target_addr, Msg::Ping { seq: relay_seq, target }, now));
            }
            Msg::Ack { seq } => {
                if let Some(relay) = self.relays.remove(&seq) {
                    out.push(self.packet_to(relay.requester, Msg::Ack { seq: relay.requester_seq }, now));
                } else if self.probe.as_ref().is_some_and(|p| p.seq == seq) {
                    self.probe = None;
                    self.health = self.health.saturating_sub(1);
                }
            }
            Msg::Gossip => {}
        }
        out
    }

    /// Applies one update; rebroadcasts it if it was news.
    fn apply(&mut self, update: &Update, now: Millis) {
        match update {
            Update::Entry { key, entry } => {
                if self.store.merge_one(key.clone(), entry.clone()) {
                    self.record_entry(key.clone(), entry.clone(), now);
                    self.welcome_participant(entry);
                    // News is relayed on the next tick too (see `gossip_soon`).
                    self.gossip_soon(now);
                }
                return;
            }
            Update::Alive { node, .. }
            | Update::Suspect { node, .. }
            | Update::Dead { node, .. }
            | Update::Left { node, .. }
                if *node == self.me =>
            {
                self.about_me(update);
                return;
            }
            _ => {}
        }
        if self.apply_member(update, now) {
            self.changed = true;
            self.enqueue(update.clone());
        }
    }

    /// Someone says something about us: refute anything but "alive".
    fn about_me(&mut self, update: &Update) {
        let (incarnation, refute) = match update {
            Update::Alive { incarnation, .. } => (*incarnation, false),
            Update::Suspect { incarnation, .. } | Update::Dead { incarnation, .. } => {
                (*incarnation, !self.leaving)
            }
            Update::Left { incarnation, .. } => (*incarnation, !self.leaving),
            Update::Entry { .. } => return,
        };
        if refute && incarnation >= self.incarnation {
            self.incarnation = incarnation + 1;
            self.announce();
        } else if incarnation > self.incarnation {
            // An older life of ours was further along; continue from there.
            self.incarnation = incarnation;
            self.announce();
        }
    }

    /// Applies a membership update; returns whether it changed anything. Keeps the
    /// live-member count and the suspect set in step, so timers never scan everyone.
    fn apply_member(&mut self, update: &Update, now: Millis) -> bool {
        let node = match update {
            Update::Alive { node, .. }
            | Update::Suspect { node, .. }
            | Update::Dead { node, .. }
            | Update::Left { node, .. } => node.clone(),
            Update::Entry { .. } => return false,
        };
        let before = self.members.get(&node).map(|m| m.state);
        let changed = self.apply_member_state(update, now);
        if changed {
            let after = self.members.get(&node).map(|m| m.state);
            let live = |s: Option<MemberState>| matches!(s, Some(MemberState::Alive | MemberState::Suspect));
            match (live(before), live(after)) {
                (false, true) => self.live_members += 1,
                (true, false) => self.live_members -= 1,
                _ => {}
            }
            if after == Some(MemberState::Suspect) {
                self.suspects.insert(node);
            } else {
                self.suspects.remove(&node);
            }
        }
        changed
    }

    fn apply_member_state(&mut self, update: &Update, now: Millis) -> bool {
        match update {
            Update::Alive { node, addr, incarnation } => match self.members.get_mut(node) {
                None => {
                    self.addr_names.insert(*addr, node.clone());
                    self.members.insert(
                        node.clone(),
                        Member {
                            name: node.clone(),
                            addr: *addr,
                            incarnation: *incarnation,
                            state: MemberState::Alive,
                            since: now,
                            suspicion: None,
                        },
                    );
                    true
                }
                Some(m) => {
                    let newer = *incarnation > m.incarnation;
                    if newer
                        || (*incarnation == m.incarnation && m.state == MemberState::Alive && m.addr != *addr)
                    {
                        if m.state != MemberState::Alive {
                            m.since = now;
                        }
                        m.incarnation = *incarnation;
                        m.addr = *addr;
                        m.state = MemberState::Alive;
                        self.addr_names.insert(*addr, node.clone());
                        m.suspicion = None;
                        true
                    } else {
                        false
                    }
                }
            },
            Update::Suspect { node, incarnation, from } => {
                let Some(m) = self.members.get_mut(node) else { return false };
                if *incarnation < m.incarnation {
                    return false;
                }
                match m.state {
                    MemberState::Alive => {
                        m.incarnation = *incarnation;
                        m.state = MemberState::Suspect;
                        m.since = now;
                        m.suspicion = Some(Suspicion { started: now, confirmations: BTreeSet::new() });
                        true
                    }
                    MemberState::Suspect if *incarnation == m.incarnation => {
                        // Lifeguard: an independent suspicion shortens the timeout.
                        let s = m
                            .suspicion
                            .get_or_insert(Suspicion { started: now, confirmations: BTreeSet::new() });
                        *from != self.me && s.confirmations.insert(from.clone())
                    }
                    MemberState::Suspect => {
                        m.incarnation = *incarnation;
                        m.suspicion = Some(Suspicion { started: now, confirmations: BTreeSet::new() });
                        true
                    }
                    MemberState::Dead | MemberState::Left => false,
                }
            }
            Update::Dead { node, incarnation } | Update::Left { node, incarnation } => {
                let state =
                    if matches!(update, Update::Left { .. }) { MemberState::Left } else { MemberState::Dead };
                let Some(m) = self.members.get_mut(node) else { return false };
                if *incarnation < m.incarnation || matches!(m.state, MemberState::Dead | MemberState::Left) {
                    return false;
                }
                m.incarnation = *incarnation;
                m.state = state;
                m.since = now;
                m.suspicion = None;
                if self.probe.as_ref().is_some_and(|p| p.target == *node) {
                    self.probe = None;
                }
                true
            }
            Update::Entry { .. } => false,
        }
    }

    /// The full state for a TCP push-pull with `peer` (when known): task endpoints of
    /// networks the peer does not take part in are left out.
    pub fn push_pull_for(&self, peer: Option<&str>, join: bool) -> PushPull {
        let mut members: Vec<MemberRecord> = self
            .members
            .values()
            .map(|m| MemberRecord {
                node: m.name.clone(),
                addr: m.addr,
                incarnation: m.incarnation,
                state: m.state,
            })
            .collect();
        members.push(MemberRecord {
            node: self.me.clone(),
            addr: self.addr,
            incarnation: self.incarnation,
            state: if self.leaving { MemberState::Left } else { MemberState::Alive },
        });
        let store = match peer {
            None => self.store.filtered(|k, _| !self.is_unconfirmed(k)),
            Some(peer) => {
                let theirs = self.networks_of(peer);
                let known: HashSet<String> = self
                    .store
                    .endpoints()
                    .filter(|e| e.service.is_none())
                    .map(|e| e.network.clone())
                    .collect();
                self.store.filtered(|key, entry| match &entry.value {
                    _ if self.is_unconfirmed(key) => false,
                    Some(Object::Endpoint(e)) if e.service.is_some() && known.contains(&e.network) => {
                        theirs.contains(&e.network)
                    }
                    _ => true,
                })
            }
        };
        // Everything up to just below the oldest entry left out (other than entries
        // still waiting for a resync) is in the frame.
        let covers = self
            .store
            .entries()
            .filter(|(k, _)| store.entry(k).is_none() && !self.is_unconfirmed(k))
            .map(|(_, e)| e.version.counter)
            .min()
            .map_or(self.store.clock(), |c| c.saturating_sub(1));
        PushPull {
            from: self.me.clone(),
            join,
            complete: peer.is_none(),
            covers,
            epoch: self.epoch,
            seq: 0,
            sent_at_ms: 0,
            members,
            store,
        }
    }

    /// The name of the member at `addr`, if known.
    pub fn name_at(&self, addr: SocketAddr) -> Option<&str> {
        self.addr_names.get(&addr).map(String::as_str)
    }

    /// The full, unfiltered state (for a peer whose name is not known yet).
    pub fn push_pull(&self, join: bool) -> PushPull {
        self.push_pull_for(None, join)
    }

    /// Merges a peer's full state; a complete one ends a resync.
    pub fn merge_push_pull(&mut self, theirs: PushPull, now: Millis) {
        for m in theirs.members {
            let update = match m.state {
                MemberState::Alive => {
                    Update::Alive { node: m.node, addr: m.addr, incarnation: m.incarnation }
                }
                // A suspicion learned in bulk is treated as a fresh local one.
                MemberState::Suspect => {
                    Update::Suspect { node: m.node, incarnation: m.incarnation, from: theirs.from.clone() }
                }
                MemberState::Dead => Update::Dead { node: m.node, incarnation: m.incarnation },
                MemberState::Left => Update::Left { node: m.node, incarnation: m.incarnation },
            };
            self.apply(&update, now);
        }
        let mut fresh = Vec::new();
        for (key, entry) in theirs.store.entries() {
            if let Some(unconfirmed) = &mut self.unconfirmed {
                // The cluster knows this key: merged by version like any other.
                unconfirmed.remove(key);
            }
            if self.store.merge_one(key.clone(), entry.clone()) {
                if key.starts_with("endpoint/node:") {
                    self.participants_dirty = true;
                    self.welcome_participant(entry);
                }
                if entry.value.is_none() {
                    self.tombstones_seen.entry(key.clone()).or_insert(now);
                }
                self.changed = true;
                fresh.push((key, entry));
            }
        }
        // What the push-pull brought is news to this node, and perhaps to others (a
        // healed partition: each side's writes reached one node of the other side).
        // A few entries spread by gossip like local writes; a bulk of them (a join
        // learning the whole cluster) is passed on with one push-pull instead of
        // flooding the gossip queue (see `news_from`).
        if fresh.len() > NEWS_GOSSIP_MAX {
            self.news_from = Some(theirs.from.clone());
        } else if !fresh.is_empty() {
            for (key, entry) in fresh {
                self.enqueue(Update::Entry { key: key.clone(), entry: entry.clone() });
            }
            self.gossip_soon(now);
        }
        if theirs.complete {
            self.finish_resync(&theirs.store);
        }
    }
}

#[cfg(test)]
mod tests;
