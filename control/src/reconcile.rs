//! The reconciler's policy: from the store, what this node's dataplane should hold
//! ([`desired`]), and the operations that take it from what it actually holds — read
//! back from the kernel and the proxy each period ([`actual`]) — to that ([`plan`]).
//! Pure functions; the agent observes and executes. Because `actual` is observed, not
//! remembered, a hand-deleted entry, a leftover of a `kill -9` and an object that went
//! stale while meshd was down all converge the same way.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
};

use ipnet::Ipv4Net;
use meshd_dataplane::{
    ingress::{IngressBackendSpec, IngressMode, IngressService, IngressSpec},
    lb::Policy,
    overlay::{Observed, OverlaySpec, PeerSpec, TaskLink},
    proxy::{ListenerSpec, Proto},
    socklb::{self, Backend, Frontend},
};

use crate::{
    ipam::mac_for_ip,
    model::{Availability, Endpoint, EndpointMode, Health, LbPolicy, PublishMode, Vni},
    store::Store,
};

/// A frontend table, as the socket load balancer and the nftables fallback take it.
pub type FrontendTable = BTreeMap<Frontend, Vec<Backend>>;

/// What one node's dataplane holds (or should hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dataplane {
    /// Overlay networks, by VNI.
    pub overlays: BTreeMap<Vni, OverlaySpec>,
    /// Remote endpoints reachable through the overlays.
    pub peers: BTreeSet<PeerSpec>,
    /// Local tasks' interfaces, by host-side interface name.
    pub local_tasks: BTreeMap<String, TaskLink>,
    /// Published-port listeners: their backends and policy.
    pub listeners: BTreeMap<(Proto, u16), ListenerSpec>,
    /// Ordered pairs of network subnets kept apart: (from, to).
    pub isolation: BTreeSet<(Ipv4Net, Ipv4Net)>,
    /// The socket load balancer's frontends (service VIPs, published ports for local
    /// clients) and their backends, sorted.
    pub frontends: FrontendTable,
    /// The kernel ingress path (XDP/tc): published ports for external clients, and
    /// the local task veths that get the reply program.
    pub ingress: IngressSpec,
    /// Ports being unpublished with a grace period: no listener, and the connections
    /// the proxy relays for them are cut at this time (Unix milliseconds).
    pub closing: BTreeMap<(Proto, u16), u64>,
}

/// One change to the dataplane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create or complete an overlay network.
    EnsureOverlay(OverlaySpec),
    /// Remove an overlay network.
    RemoveOverlay(Vni),
    /// Program a remote endpoint.
    AddPeer(PeerSpec),
    /// Forget a remote endpoint.
    RemovePeer(PeerSpec),
    /// Create a local task's interface (if it is missing).
    EnsureTask(TaskLink),
    /// Remove a local task's interface.
    DetachTask(String),
    /// Serve a published port with these backends and policy (or update them).
    Listen {
        /// Protocol.
        proto: Proto,
        /// Published port.
        port: u16,
        /// Where connections go, and how each picks one.
        spec: ListenerSpec,
    },
    /// Keep one network's traffic out of another.
    Isolate(Ipv4Net, Ipv4Net),
    /// Drop an isolation rule.
    Unisolate(Ipv4Net, Ipv4Net),
    /// Stop serving a published port: refuse new connections now, cut the relayed
    /// ones at `cut_at` (Unix milliseconds; `None`: now).
    Unlisten {
        /// Protocol.
        proto: Proto,
        /// Published port.
        port: u16,
        /// When the connections relayed already are cut.
        cut_at: Option<u64>,
    },
    /// Make the socket load balancer hold exactly these frontends (one operation for
    /// the whole table: the mechanism writes only the difference, in a safe order).
    Frontends(FrontendTable),
    /// Make the kernel ingress path hold exactly this (one operation, like
    /// `Frontends`: the mechanism writes the difference in a safe order).
    Ingress(IngressSpec),
}

/// What `node`'s dataplane should hold given the cluster `store`; overlay devices get
/// the network's MTU, or `default_mtu`. Endpoints of nodes not in `live` (dead or departed) are suspended: not
/// programmed and not load-balanced to, but kept in the store for their return.
pub fn desired(store: &Store, live: &BTreeSet<String>, node: &str, default_mtu: u32) -> Dataplane {
    let mut out = Dataplane::default();
    let own = |e: &&Endpoint| e.node == node;
    for net in store.networks() {
        let Some(me) = store.endpoints().filter(own).find(|e| e.id == Endpoint::node_id(node, &net.name))
        else {
            continue;
        };
        out.overlays.insert(
            net.vni,
            OverlaySpec {
                vni: net.vni,
                node_ip: me.ip,
                prefix_len: net.subnet.prefix_len(),
                node_mac: mac_for_ip(me.ip),
                mtu: net.mtu.unwrap_or(default_mtu),
            },
        );
    }
    let shadowed = crate::ipam::shadowed(store);
    for ep in store.endpoints().filter(|e| live.contains(&e.node)) {
        let Some(net) = store.network(&ep.network) else { continue };
        if ep.node == node {
            let (Some(host_if), Some(netns), Some(overlay)) =
                (&ep.host_if, &ep.netns, out.overlays.get(&net.vni))
            else {
                continue;
            };
            let link = TaskLink {
                vni: net.vni,
                netns: netns.into(),
                host_if: host_if.clone(),
                ip: ep.ip,
                prefix_len: net.subnet.prefix_len(),
                mac: ep.mac,
                gateway: overlay.node_ip,
                mtu: overlay.mtu,
            };
            out.local_tasks.insert(host_if.clone(), link);
        } else if out.overlays.contains_key(&net.vni) && !shadowed.contains(ep.id.as_str()) {
            out.peers.insert(PeerSpec { vni: net.vni, ip: ep.ip, mac: ep.mac, vtep: ep.vtep });
        }
    }
    let joined: BTreeMap<String, Vni> = store
        .networks()
        .filter(|n| out.overlays.contains_key(&n.vni))
        .map(|n| (n.name.clone(), n.vni))
        .collect();
    out.peers.extend(crate::ipam::spare_peers(store, live, node, &joined));
    let subnets: Vec<Ipv4Net> =
        store.networks().filter(|n| out.overlays.contains_key(&n.vni)).map(|n| n.subnet).collect();
    for a in &subnets {
        for b in subnets.iter().filter(|b| *b != a) {
            out.isolation.insert((*a, *b));
        }
    }
    for port in store.published() {
        if store.service(&port.service).is_none() {
            continue;
        }
        if let Some(at) = port.closing_at {
            out.closing.insert((port.proto, port.published), at);
            continue;
        }
        let mut backends: Vec<SocketAddr> = store
            .tasks_of(&port.service)
            .filter(|t| in_rotation(store, live, t))
            // Reachable only once this node has its own address on the task's network
            // (until then a connect fails at once, and the node must not report the
            // port served).
            .filter(|t| joined.contains_key(&t.network))
            .map(|t| SocketAddr::from((t.ip, port.target)))
            .collect();
        backends.sort();
        let spec = ListenerSpec {
            policy: lb_policy(port.lb),
            backends,
            proxy_protocol: port.proxy_protocol,
            max_connections: port.max_connections as usize,
        };
        out.listeners.insert((port.proto, port.published), spec);
    }
    out.frontends = frontends(store, live, &joined);
    out.ingress = ingress(store, live, node, &out);
    out
}

/// Whether `task` takes new connections on every path (proxy, socket LB, kernel
/// ingress): its node is `live` and not drained, its checker finds it healthy, and it
/// is not draining. The one place that decides rotation.
pub fn in_rotation(store: &Store, live: &BTreeSet<String>, task: &Endpoint) -> bool {
    live.contains(&task.node) && task.health == Health::Healthy && !drained(store, task)
}

/// The proxy's policy of a published port's `--lb`.
pub fn lb_policy(lb: LbPolicy) -> Policy {
    match lb {
        LbPolicy::Rr => Policy::RoundRobin,
        LbPolicy::Leastconn => Policy::LeastConn,
        LbPolicy::P2c => Policy::P2c,
        LbPolicy::Maglev => Policy::Maglev,
    }
}

/// The tasks kept out of new connections by `meshctl detach` (draining) or `meshctl
/// node drain` (their node is drained), sorted: what a node confirms it applied.
pub fn out_of_rotation(store: &Store) -> Vec<String> {
    let mut out: Vec<String> = store
        .endpoints()
        .filter(|t| t.service.is_some() && drained(store, t))
        .map(|t| t.id.clone())
        .collect();
    out.sort();
    out
}

/// Whether `task` is draining or on a drained node.
fn drained(store: &Store, task: &Endpoint) -> bool {
    task.draining || store.node(&task.node).is_some_and(|n| n.availability == Availability::Drain)
}

/// The kernel path's mode of a published port's mode.
pub fn ingress_mode(mode: PublishMode) -> IngressMode {
    match mode {
        PublishMode::Snat => IngressMode::Snat,
        PublishMode::Dsr => IngressMode::Dsr,
    }
}

/// The kernel ingress table of `node`, given what else it should hold (`so_far`: its
/// overlays and local task links): for each published port, its service's tasks on
/// `live` nodes (not shadowed) on a network this node takes part in — the ingress node
/// needs its own address and MAC there (`gw`, the snat source and the inner source
/// MAC). Every node takes part in every network that carries a published port (see
/// `Agent::ensure_node_addresses`), so a task is missing here only while this node's
/// address on its network settles; meanwhile the proxy serves it. A local task is a
/// backend only with its host veth (redirected to, no encapsulation). Every local
/// task's veth gets the reply program.
fn ingress(store: &Store, live: &BTreeSet<String>, node: &str, so_far: &Dataplane) -> IngressSpec {
    let shadowed = crate::ipam::shadowed(store);
    let mut out = IngressSpec::default();
    // A port with PROXY protocol v2 or a connection limit is the proxy's alone: only it
    // writes the header and counts connections.
    for port in store.published().filter(|p| !p.proxy_only()) {
        if store.service(&port.service).is_none() {
            continue;
        }
        // Draining tasks stay, flagged: their established flows keep reaching them. A
        // closing port (unpublish --grace) drains them all: its established flows
        // carry on, a new one finds no backend and meets the stack (no listener: reset).
        let closing = port.closing_at.is_some();
        let mut backends: Vec<IngressBackendSpec> = store
            .tasks_of(&port.service)
            .filter(|t| {
                (in_rotation(store, live, t) || (live.contains(&t.node) && drained(store, t)))
                    && !shadowed.contains(t.id.as_str())
            })
            .filter_map(|t| {
                let net = store.network(&t.network)?;
                let gw = so_far.overlays.get(&net.vni)?;
                let host_if = if t.node == node {
                    Some(t.host_if.clone().filter(|h| so_far.local_tasks.contains_key(h))?)
                } else {
                    None
                };
                Some(IngressBackendSpec {
                    addr: t.ip,
                    port: port.target,
                    mac: t.mac,
                    vtep: t.vtep,
                    gw: gw.node_ip,
                    gw_mac: gw.node_mac,
                    vni: net.vni,
                    host_if,
                    draining: closing || !in_rotation(store, live, t),
                })
            })
            .collect();
        backends.sort();
        out.services.insert(
            (lb_proto(port.proto), port.published),
            IngressService { mode: ingress_mode(port.mode), backends },
        );
    }
    out.tasks =
        so_far.local_tasks.iter().map(|(host_if, link)| (host_if.clone(), link.netns.clone())).collect();
    out
}

/// The socket load balancer's protocol of a published port's protocol.
pub fn lb_proto(proto: Proto) -> socklb::Proto {
    match proto {
        Proto::Tcp => socklb::Proto::Tcp,
        Proto::Udp => socklb::Proto::Udp,
    }
}

/// The socket load balancer's table: for each `vip` service with a VIP on a network
/// this node takes part in (`joined`), `VIP:0` for TCP and UDP with its tasks at port
/// 0 (any port of the VIP reaches a task at the same port; none refuses); for each
/// published port, `0.0.0.0:published` with its tasks at the target port (local
/// clients skip the proxy). Backends are tasks on `live` nodes, sorted.
fn frontends(store: &Store, live: &BTreeSet<String>, joined: &BTreeMap<String, Vni>) -> FrontendTable {
    let shadowed = crate::ipam::shadowed(store);
    let shadowed_vips = crate::ipam::shadowed_keys(store);
    let backends = |service: &str, port: u16| -> Vec<Backend> {
        let mut out: Vec<Backend> = store
            .tasks_of(service)
            .filter(|t| in_rotation(store, live, t) && !shadowed.contains(t.id.as_str()))
            // Reachable from here only once this node is on the task's network.
            .filter(|t| joined.contains_key(&t.network))
            .map(|t| Backend { addr: t.ip, port })
            .collect();
        out.sort();
        out
    };
    let mut out = BTreeMap::new();
    for service in store.services().filter(|s| s.endpoint_mode == EndpointMode::Vip) {
        let Some(vip) = service.vip else { continue };
        // A VIP that lost its address to an older task or VIP waits for its new one.
        if !joined.contains_key(&service.network)
            || shadowed_vips.contains(crate::model::Key::service(&service.name).as_str())
        {
            continue;
        }
        for proto in [socklb::Proto::Tcp, socklb::Proto::Udp] {
            out.insert(Frontend { addr: vip, port: 0, proto }, backends(&service.name, 0));
        }
    }
    // Local clients of a proxy-only port reach the proxy too (see `proxy_only`); a
    // closing port takes no new connection (its established ones never pass here).
    for port in store.published().filter(|p| !p.proxy_only() && p.closing_at.is_none()) {
        if store.service(&port.service).is_none() {
            continue;
        }
        let frontend =
            Frontend { addr: Ipv4Addr::UNSPECIFIED, port: port.published, proto: lb_proto(port.proto) };
        out.insert(frontend, backends(&port.service, port.target));
    }
    out
}

/// The nftables fallback's tables (VIPs without BPF): for each local task's namespace,
/// the VIP frontends of the network its task is on — a container reaches the VIPs of
/// its own networks, as with the socket load balancer. Published ports are not here:
/// without BPF the proxy serves them.
pub fn nat_tables(want: &Dataplane) -> BTreeMap<std::path::PathBuf, FrontendTable> {
    let mut out: BTreeMap<std::path::PathBuf, FrontendTable> = BTreeMap::new();
    for link in want.local_tasks.values() {
        let Ok(subnet) = Ipv4Net::new(link.ip, link.prefix_len).map(|n| n.trunc()) else { continue };
        let table = out.entry(link.netns.clone()).or_default();
        for (frontend, backends) in &want.frontends {
            if !frontend.addr.is_unspecified() && subnet.contains(&frontend.addr) {
                table.insert(*frontend, backends.clone());
            }
        }
    }
    out
}

/// What the node holds: the kernel objects meshd owns (as observed) and the proxy's
/// listeners.
pub fn actual(
    observed: Observed,
    listeners: impl IntoIterator<Item = ((Proto, u16), ListenerSpec)>,
    frontends: FrontendTable,
) -> Dataplane {
    Dataplane {
        overlays: observed.overlays,
        peers: observed.peers,
        local_tasks: observed.tasks,
        listeners: listeners.into_iter().collect(),
        isolation: observed.isolation,
        frontends,
        ingress: IngressSpec::default(),
        closing: BTreeMap::new(),
    }
}

/// The operations that turn `applied` (what the node actually holds) into `desired`:
/// removals first (so a re-used address or port is free again), then additions and
/// repairs. An object that exists but differs from what is wanted (an overlay not fully
/// wired, a task link whose address or route changed) is ensured again.
pub fn plan(applied: &Dataplane, desired: &Dataplane) -> Vec<Op> {
    let mut ops = Vec::new();
    ops.extend(applied.peers.difference(&desired.peers).cloned().map(Op::RemovePeer));
    for host_if in applied.local_tasks.keys() {
        if !desired.local_tasks.contains_key(host_if) {
            ops.push(Op::DetachTask(host_if.clone()));
        }
    }
    for &(proto, port) in applied.listeners.keys() {
        if !desired.listeners.contains_key(&(proto, port)) {
            ops.push(Op::Unlisten { proto, port, cut_at: desired.closing.get(&(proto, port)).copied() });
        }
    }
    for &(a, b) in applied.isolation.difference(&desired.isolation) {
        ops.push(Op::Unisolate(a, b));
    }
    for vni in applied.overlays.keys() {
        if !desired.overlays.contains_key(vni) {
            ops.push(Op::RemoveOverlay(*vni));
        }
    }
    for (vni, spec) in &desired.overlays {
        if applied.overlays.get(vni) != Some(spec) {
            ops.push(Op::EnsureOverlay(spec.clone()));
        }
    }
    for &(a, b) in desired.isolation.difference(&applied.isolation) {
        ops.push(Op::Isolate(a, b));
    }
    ops.extend(desired.peers.difference(&applied.peers).cloned().map(Op::AddPeer));
    for (host_if, link) in &desired.local_tasks {
        if applied.local_tasks.get(host_if) != Some(link) {
            ops.push(Op::EnsureTask(link.clone()));
        }
    }
    for (&(proto, port), spec) in &desired.listeners {
        if applied.listeners.get(&(proto, port)) != Some(spec) {
            ops.push(Op::Listen { proto, port, spec: spec.clone() });
        }
    }
    if applied.frontends != desired.frontends {
        ops.push(Op::Frontends(desired.frontends.clone()));
    }
    // Last: the task veths it attaches to exist by now.
    if applied.ingress != desired.ingress {
        ops.push(Op::Ingress(desired.ingress.clone()));
    }
    ops
}

impl Dataplane {
    /// Records that `op` was applied.
    pub fn record(&mut self, op: &Op) {
        match op {
            Op::EnsureOverlay(spec) => {
                self.overlays.insert(spec.vni, spec.clone());
            }
            Op::RemoveOverlay(vni) => {
                self.overlays.remove(vni);
            }
            Op::AddPeer(peer) => {
                self.peers.insert(peer.clone());
            }
            Op::RemovePeer(peer) => {
                self.peers.remove(peer);
            }
            Op::EnsureTask(link) => {
                self.local_tasks.insert(link.host_if.clone(), link.clone());
            }
            Op::DetachTask(host_if) => {
                self.local_tasks.remove(host_if);
            }
            Op::Listen { proto, port, spec } => {
                self.listeners.insert((*proto, *port), spec.clone());
            }
            Op::Unlisten { proto, port, .. } => {
                self.listeners.remove(&(*proto, *port));
            }
            Op::Isolate(a, b) => {
                self.isolation.insert((*a, *b));
            }
            Op::Unisolate(a, b) => {
                self.isolation.remove(&(*a, *b));
            }
            Op::Frontends(table) => self.frontends = table.clone(),
            Op::Ingress(spec) => self.ingress = spec.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{EndpointMode, Network, Object, PublishMode, PublishedPort, Service};

    fn endpoint(id: &str, service: Option<&str>, node: &str, ip: [u8; 4]) -> Object {
        let ip = Ipv4Addr::from(ip);
        Object::Endpoint(Endpoint {
            id: id.into(),
            service: service.map(Into::into),
            network: "backend".into(),
            node: node.into(),
            ip,
            mac: mac_for_ip(ip),
            vtep: Ipv4Addr::new(198, 18, 0, if node == "n1" { 11 } else { 12 }),
            host_if: service.map(|_| format!("mv{id}")),
            netns: service.map(|_| format!("/run/netns/{id}")),
            health: Default::default(),
            draining: false,
        })
    }

    fn cluster() -> Store {
        let mut s = Store::default();
        s.put(
            "n1",
            Object::Network(Network {
                name: "backend".into(),
                subnet: "10.0.0.0/24".parse().unwrap(),
                vni: 4096,
                mtu: None,
            }),
        );
        s.put(
            "n1",
            Object::Service(Service {
                name: "web".into(),
                network: "backend".into(),
                endpoint_mode: EndpointMode::Vip,
                vip: Some(Ipv4Addr::new(10, 0, 0, 100)),
                health_check: None,
            }),
        );
        s.put("n1", endpoint(&Endpoint::node_id("n1", "backend"), None, "n1", [10, 0, 0, 1]));
        s.put("n2", endpoint(&Endpoint::node_id("n2", "backend"), None, "n2", [10, 0, 0, 17]));
        s.put("n2", endpoint("web.1", Some("web"), "n2", [10, 0, 0, 18]));
        s.put("n1", endpoint("web.2", Some("web"), "n1", [10, 0, 0, 2]));
        s.put(
            "n1",
            Object::Published(PublishedPort {
                published: 3000,
                target: 80,
                proto: Proto::Tcp,
                service: "web".into(),
                mode: crate::model::PublishMode::Snat,
                lb: Default::default(),
                proxy_protocol: false,
                max_connections: 0,
                closing_at: None,
            }),
        );
        s
    }

    fn all() -> BTreeSet<String> {
        ["n1", "n2", "n3"].into_iter().map(String::from).collect()
    }

    #[test]
    fn desired_has_remote_peers_local_tasks_and_all_backends() {
        let d = desired(&cluster(), &all(), "n1", 1450);
        assert_eq!(d.overlays[&4096].node_ip, Ipv4Addr::new(10, 0, 0, 1));
        let peer_ips: Vec<_> = d.peers.iter().map(|p| p.ip).collect();
        assert_eq!(peer_ips, [Ipv4Addr::new(10, 0, 0, 17), Ipv4Addr::new(10, 0, 0, 18)]);
        assert_eq!(d.local_tasks.keys().collect::<Vec<_>>(), ["mvweb.2"]);
        assert_eq!(d.local_tasks["mvweb.2"].gateway, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(
            d.listeners[&(Proto::Tcp, 3000)].backends,
            vec!["10.0.0.2:80".parse().unwrap(), "10.0.0.18:80".parse().unwrap()]
        );
    }

    #[test]
    fn an_unhealthy_draining_or_drained_task_leaves_every_path() {
        let web1_only = |d: &Dataplane| {
            let proxy = &d.listeners[&(Proto::Tcp, 3000)].backends;
            let lb = &d.frontends[&lb([0, 0, 0, 0], 3000, socklb::Proto::Tcp)];
            let kernel = &d.ingress.services[&(socklb::Proto::Tcp, 3000)].backends;
            proxy == &["10.0.0.18:80".parse::<SocketAddr>().unwrap()]
                && lb == &[backend([10, 0, 0, 18], 80)]
                && kernel.iter().filter(|b| !b.draining).map(|b| b.addr).eq([Ipv4Addr::new(10, 0, 0, 18)])
        };
        // The kernel path keeps a draining task, flagged, for its established flows.
        let kernel_draining = |d: &Dataplane| -> Vec<Ipv4Addr> {
            let kernel = &d.ingress.services[&(socklb::Proto::Tcp, 3000)].backends;
            kernel.iter().filter(|b| b.draining).map(|b| b.addr).collect()
        };
        let with_web2 = |change: &dyn Fn(&mut Endpoint)| {
            let mut s = cluster();
            let Object::Endpoint(mut e) = endpoint("web.2", Some("web"), "n1", [10, 0, 0, 2]) else {
                unreachable!()
            };
            change(&mut e);
            s.put("n1", Object::Endpoint(e));
            desired(&s, &all(), "n1", 1450)
        };
        assert!(!web1_only(&with_web2(&|_| ())), "premise: web.2 serves");
        assert!(web1_only(&with_web2(&|e| e.health = Health::Unhealthy)));
        assert!(kernel_draining(&with_web2(&|e| e.health = Health::Unhealthy)).is_empty());
        assert!(web1_only(&with_web2(&|e| e.draining = true)));
        assert_eq!(kernel_draining(&with_web2(&|e| e.draining = true)), [Ipv4Addr::new(10, 0, 0, 2)]);
        let mut s = cluster();
        s.put(
            "n1",
            Object::Node(crate::model::Node {
                name: "n1".into(),
                addr: Ipv4Addr::new(198, 18, 0, 11),
                availability: Availability::Drain,
            }),
        );
        assert!(web1_only(&desired(&s, &all(), "n1", 1450)), "n1 drained: its task leaves rotation");
        assert!(!kernel_draining(&desired(&s, &all(), "n1", 1450)).is_empty(), "its flows stay");
        assert!(!out_of_rotation(&s).is_empty(), "what n1's tasks confirm");
        assert!(out_of_rotation(&cluster()).is_empty());
    }

    fn lb(addr: [u8; 4], port: u16, proto: socklb::Proto) -> Frontend {
        Frontend { addr: Ipv4Addr::from(addr), port, proto }
    }

    fn backend(addr: [u8; 4], port: u16) -> Backend {
        Backend { addr: Ipv4Addr::from(addr), port }
    }

    #[test]
    fn vip_and_published_frontends_list_live_tasks_sorted() {
        let d = desired(&cluster(), &all(), "n1", 1450);
        let tasks = vec![backend([10, 0, 0, 2], 0), backend([10, 0, 0, 18], 0)];
        assert_eq!(d.frontends[&lb([10, 0, 0, 100], 0, socklb::Proto::Tcp)], tasks);
        assert_eq!(d.frontends[&lb([10, 0, 0, 100], 0, socklb::Proto::Udp)], tasks);
        assert_eq!(
            d.frontends[&lb([0, 0, 0, 0], 3000, socklb::Proto::Tcp)],
            vec![backend([10, 0, 0, 2], 80), backend([10, 0, 0, 18], 80)]
        );
        assert_eq!(d.frontends.len(), 3);
        // A dead node's task leaves every frontend.
        let live: BTreeSet<String> = ["n1".to_owned()].into();
        let d = desired(&cluster(), &live, "n1", 1450);
        assert_eq!(d.frontends[&lb([10, 0, 0, 100], 0, socklb::Proto::Tcp)], vec![backend([10, 0, 0, 2], 0)]);
        assert_eq!(
            d.frontends[&lb([0, 0, 0, 0], 3000, socklb::Proto::Tcp)],
            vec![backend([10, 0, 0, 2], 80)]
        );
    }

    #[test]
    fn ingress_lists_live_tasks_with_this_nodes_gateway_and_local_veths() {
        let d = desired(&cluster(), &all(), "n1", 1450);
        let service = &d.ingress.services[&(socklb::Proto::Tcp, 3000)];
        assert_eq!(service.mode, IngressMode::Snat);
        let addrs: Vec<_> = service.backends.iter().map(|b| (b.addr, b.port, b.host_if.clone())).collect();
        assert_eq!(
            addrs,
            [
                (Ipv4Addr::new(10, 0, 0, 2), 80, Some("mvweb.2".to_owned())),
                (Ipv4Addr::new(10, 0, 0, 18), 80, None),
            ]
        );
        for b in &service.backends {
            assert_eq!(b.gw, Ipv4Addr::new(10, 0, 0, 1), "this node's address on the network");
            assert_eq!(b.gw_mac, mac_for_ip(Ipv4Addr::new(10, 0, 0, 1)));
            assert_eq!(b.vni, 4096);
            assert_eq!(b.mac, mac_for_ip(b.addr));
        }
        assert_eq!(service.backends[1].vtep, Ipv4Addr::new(198, 18, 0, 12), "the remote task's node");
        assert_eq!(
            d.ingress.tasks,
            BTreeMap::from([("mvweb.2".to_owned(), std::path::PathBuf::from("/run/netns/web.2"))])
        );
        // A dead node's task is not balanced to.
        let live: BTreeSet<String> = ["n1".to_owned()].into();
        let d = desired(&cluster(), &live, "n1", 1450);
        assert_eq!(d.ingress.services[&(socklb::Proto::Tcp, 3000)].backends.len(), 1);
    }

    #[test]
    fn ingress_carries_the_mode_and_needs_this_node_on_the_network() {
        let mut store = cluster();
        store.put(
            "n1",
            Object::Published(PublishedPort {
                published: 3000,
                target: 80,
                proto: Proto::Tcp,
                service: "web".into(),
                mode: PublishMode::Dsr,
                lb: Default::default(),
                proxy_protocol: false,
                max_connections: 0,
                closing_at: None,
            }),
        );
        let d = desired(&store, &all(), "n2", 1450);
        let service = &d.ingress.services[&(socklb::Proto::Tcp, 3000)];
        assert_eq!(service.mode, IngressMode::Dsr);
        assert_eq!(service.backends.iter().filter(|b| b.host_if.is_some()).count(), 1, "n2's own task");
        // n3 has no address on the network yet: no backend it could reach (the
        // proxy serves), but the port is there, in its mode.
        let d = desired(&store, &all(), "n3", 1450);
        let service = &d.ingress.services[&(socklb::Proto::Tcp, 3000)];
        assert!(service.backends.is_empty());
        assert!(d.ingress.tasks.is_empty());
        // One op for the whole table, after the task links; applying it converges.
        let want = desired(&store, &all(), "n1", 1450);
        let ops = plan(&Dataplane::default(), &want);
        assert!(matches!(ops.last(), Some(Op::Ingress(spec)) if *spec == want.ingress));
        let mut applied = Dataplane::default();
        for op in &ops {
            applied.record(op);
        }
        assert!(plan(&applied, &want).is_empty());
    }

    #[test]
    fn nat_tables_give_each_task_namespace_the_vips_of_its_network_only() {
        let mut d = desired(&cluster(), &all(), "n1", 1450);
        // A VIP of another network (another subnet) is not the container's business.
        d.frontends.insert(lb([10, 9, 0, 5], 0, socklb::Proto::Tcp), vec![backend([10, 9, 0, 6], 0)]);
        let tables = nat_tables(&d);
        let ns = std::path::PathBuf::from("/run/netns/web.2");
        assert_eq!(tables.keys().collect::<Vec<_>>(), [&ns]);
        let tasks = vec![backend([10, 0, 0, 2], 0), backend([10, 0, 0, 18], 0)];
        let want: FrontendTable = [
            (lb([10, 0, 0, 100], 0, socklb::Proto::Tcp), tasks.clone()),
            (lb([10, 0, 0, 100], 0, socklb::Proto::Udp), tasks),
        ]
        .into();
        assert_eq!(tables[&ns], want, "published ports (0.0.0.0) and foreign VIPs left out");
    }

    #[test]
    fn no_vip_frontend_off_the_network_or_for_dnsrr_and_empty_without_tasks() {
        // n3 takes no part in the network: no VIP frontend, the published port stays.
        let d = desired(&cluster(), &all(), "n3", 1450);
        assert_eq!(
            d.frontends.keys().copied().collect::<Vec<_>>(),
            [lb([0, 0, 0, 0], 3000, socklb::Proto::Tcp)]
        );
        let mut store = cluster();
        store.delete("n1", "endpoint/web.2");
        store.delete("n2", "endpoint/web.1");
        store.put(
            "n1",
            Object::Service(Service {
                name: "names".into(),
                network: "backend".into(),
                endpoint_mode: EndpointMode::Dnsrr,
                vip: None,
                health_check: None,
            }),
        );
        let d = desired(&store, &all(), "n1", 1450);
        assert_eq!(d.frontends[&lb([10, 0, 0, 100], 0, socklb::Proto::Tcp)], vec![], "no tasks: refuse");
        assert_eq!(d.frontends.len(), 3, "the dnsrr service has no frontend: {:?}", d.frontends);
    }

    #[test]
    fn a_node_without_its_own_address_programs_no_overlay() {
        let d = desired(&cluster(), &all(), "n3", 1450);
        assert!(d.overlays.is_empty());
        assert!(d.peers.is_empty());
        assert_eq!(d.listeners.len(), 1);
        // Its tasks are out of reach until it has an address there: the port listens
        // (and resets) but is not served, on the proxy and on the socket LB alike.
        assert_eq!(d.listeners[&(Proto::Tcp, 3000)].backends, vec![]);
        assert_eq!(d.frontends[&lb([0, 0, 0, 0], 3000, socklb::Proto::Tcp)], vec![]);
    }

    #[test]
    fn plan_from_empty_builds_overlay_before_peers_and_converges() {
        let want = desired(&cluster(), &all(), "n1", 1450);
        let ops = plan(&Dataplane::default(), &want);
        let first_peer = ops.iter().position(|o| matches!(o, Op::AddPeer(_))).unwrap();
        let overlay = ops.iter().position(|o| matches!(o, Op::EnsureOverlay(_))).unwrap();
        assert!(overlay < first_peer);
        let mut applied = Dataplane::default();
        for op in &ops {
            applied.record(op);
        }
        assert_eq!(applied, want);
        assert!(plan(&applied, &want).is_empty());
    }

    #[test]
    fn a_dead_nodes_tasks_are_suspended_not_forgotten() {
        let store = cluster();
        let live: BTreeSet<String> = ["n1".to_owned()].into();
        let d = desired(&store, &live, "n1", 1450);
        assert!(d.peers.is_empty(), "no FDB entries towards a dead node");
        assert_eq!(
            d.listeners[&(Proto::Tcp, 3000)].backends,
            vec!["10.0.0.2:80".parse::<SocketAddr>().unwrap()]
        );
        // It comes back: everything is there again, nothing was lost.
        assert_eq!(desired(&store, &all(), "n1", 1450).listeners[&(Proto::Tcp, 3000)].backends.len(), 2);
    }

    #[test]
    fn a_closing_port_refuses_new_connections_and_keeps_its_flows_until_the_cut() {
        let mut store = cluster();
        let applied = desired(&store, &all(), "n1", 1450);
        let Some(Object::Published(port)) = store.get("published/tcp/3000").cloned() else { unreachable!() };
        store.put("n1", Object::Published(PublishedPort { closing_at: Some(1_000), ..port }));
        let d = desired(&store, &all(), "n1", 1450);
        // No listener and no socket-LB frontend: a new connection is refused.
        assert!(d.listeners.is_empty());
        assert!(!d.frontends.contains_key(&lb([0, 0, 0, 0], 3000, socklb::Proto::Tcp)));
        // The kernel path keeps every backend, draining: established flows carry on.
        let kernel = &d.ingress.services[&(socklb::Proto::Tcp, 3000)].backends;
        assert!(!kernel.is_empty() && kernel.iter().all(|b| b.draining), "{kernel:?}");
        // The proxy is told when to cut what it relays.
        let ops = plan(&applied, &d);
        assert!(
            ops.contains(&Op::Unlisten { proto: Proto::Tcp, port: 3000, cut_at: Some(1_000) }),
            "{ops:?}"
        );
    }

    #[test]
    fn unpublish_and_detach_become_removals() {
        let mut store = cluster();
        let applied = desired(&store, &all(), "n1", 1450);
        store.delete("n1", "published/tcp/3000");
        store.delete("n1", "endpoint/web.2");
        store.delete("n2", "endpoint/web.1");
        let ops = plan(&applied, &desired(&store, &all(), "n1", 1450));
        assert!(ops.contains(&Op::Unlisten { proto: Proto::Tcp, port: 3000, cut_at: None }));
        assert!(ops.contains(&Op::DetachTask("mvweb.2".into())));
        assert!(ops.iter().any(|o| matches!(o, Op::RemovePeer(p) if p.ip == Ipv4Addr::new(10, 0, 0, 18))));
    }

    #[test]
    fn observed_drift_is_repaired_and_strangers_on_meshds_devices_removed() {
        let want = desired(&cluster(), &all(), "n1", 1450);
        let mut seen = want.clone();
        // An FDB entry deleted by hand: the neighbour alone is observed (vtep 0).
        let lost = want.peers.iter().next().unwrap().clone();
        seen.peers.remove(&lost);
        let half = PeerSpec { vtep: Ipv4Addr::UNSPECIFIED, ..lost.clone() };
        seen.peers.insert(half.clone());
        // A peer that went stale while meshd was down.
        let stale = PeerSpec {
            ip: Ipv4Addr::new(10, 0, 0, 99),
            mac: mac_for_ip(Ipv4Addr::new(10, 0, 0, 99)),
            ..lost.clone()
        };
        seen.peers.insert(stale.clone());
        // A task whose address was removed inside its namespace.
        let task = seen.local_tasks.values_mut().next().unwrap();
        task.ip = Ipv4Addr::UNSPECIFIED;
        let broken = task.host_if.clone();
        // An overlay not fully wired (observe reports MTU 0).
        seen.overlays.get_mut(&4096).unwrap().mtu = 0;

        let ops = plan(&seen, &want);
        assert!(ops.contains(&Op::RemovePeer(half)));
        assert!(ops.contains(&Op::RemovePeer(stale)));
        assert!(ops.contains(&Op::AddPeer(lost)));
        assert!(ops.contains(&Op::EnsureTask(want.local_tasks[&broken].clone())));
        assert!(ops.contains(&Op::EnsureOverlay(want.overlays[&4096].clone())));
        let removals = ops.iter().take_while(|o| matches!(o, Op::RemovePeer(_))).count();
        assert_eq!(removals, 2, "removals come first: {ops:?}");
        for op in &ops {
            seen.record(op);
        }
        assert!(plan(&seen, &want).is_empty(), "one pass converges");
    }
}
