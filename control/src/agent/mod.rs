//! The per-node agent: owns the store, runs the state source, reconciles the dataplane
//! with the store, and serves the local API. The one place where control meets
//! mechanism: everything it decides comes from [`crate::reconcile`] and
//! [`crate::ipam`]; everything it changes goes through `meshd_dataplane`.

mod addresses;
mod api_server;
mod checker;
mod handlers;
mod keys;
mod metrics;
mod natlb;
mod persist;
mod resolvers;

use self::{
    addresses::Alloc,
    natlb::NatFallback,
    persist::{load_store, save_store},
};
pub use self::{
    addresses::CLAIM_SETTLE,
    persist::{secure_dir, secure_key_file, write_keyring, write_private},
};

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::{Mutex, MutexGuard};

use meshd_dataplane::{
    ingress::{self, Ingress, IngressConfig, IngressStatus, KernelPath, XdpSetting},
    overlay::{KernelVxlan, PeerSpec, VXLAN_OVERHEAD},
    proxy::{Proxy, ProxyConfig, ProxyStats},
    socklb::{ProgramStatus, SocketLb, SocketLbConfig},
};
use tokio::{
    net::{TcpListener, UdpSocket, UnixListener},
    task::JoinHandle,
};

use crate::{
    gossip::{self as protocol, seal::Keyring, Gossip, MemberState},
    model::{Key, Node, Object},
    reconcile::{self, Dataplane, Op},
    source::gossip::{self, Shared},
    Error, Result,
};

/// How long attach waits for this node's overlay and address block.
pub const ATTACH_WAIT: Duration = Duration::from_secs(10);

/// The agent's configuration, from `meshd`'s flags.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This node's unique name.
    pub node_name: String,
    /// This node's underlay address: VTEP, and where peers reach its control port.
    pub advertise_addr: Ipv4Addr,
    /// Control-plane addresses of members to join through.
    pub join: Vec<SocketAddr>,
    /// Port of the control plane (state exchange).
    pub control_port: u16,
    /// Where the store is persisted.
    pub state_dir: PathBuf,
    /// Path of the local API socket.
    pub api_socket: PathBuf,
    /// cgroup v2 directory the socket programs attach to.
    pub cgroup: PathBuf,
    /// Whether to run the eBPF socket load balancer (`--socket-lb`).
    pub socket_lb: SocketLbMode,
    /// bpffs directory where the socket load balancer pins its maps and links, so
    /// they outlive the process (`--bpf-pin-dir`; default `/sys/fs/bpf/meshd/<node>`).
    pub pin_dir: PathBuf,
    /// The cluster keyring.
    pub keyring: Keyring,
    /// Where the keyring is kept (rewritten when a rotation changes it).
    pub keyring_file: PathBuf,
    /// Gossip tuning.
    pub gossip: protocol::Config,
    /// Limits and timeouts of the published-port proxy.
    pub proxy: ProxyConfig,
    /// The embedded resolvers' settings: upstreams, TTL, timeouts and bounds.
    pub dns: meshd_dataplane::dns::ResolverConfig,
    /// The kernel ingress path for published ports (XDP/tc).
    pub ingress: IngressSettings,
    /// Where the Prometheus metrics endpoint listens (`None`: off).
    pub metrics_addr: Option<SocketAddr>,
    /// How long the listener keeper holds the published ports' sockets once no meshd
    /// runs (zero: no keeper).
    pub listener_hold: Duration,
}

/// The listener keeper's socket, beside the API socket (`meshd --cleanup` knows only
/// that one).
pub fn keeper_socket(api_socket: &std::path::Path) -> PathBuf {
    api_socket.with_extension("keeper")
}

/// Connects to this node's listener keeper, starting one (this binary with
/// `--listener-keeper`, in its own process group, so signals meant for meshd do not
/// reach it) if none runs.
fn open_keeper(cfg: &AgentConfig) -> std::io::Result<meshd_dataplane::proxy::handover::Keeper> {
    use std::os::unix::process::CommandExt;
    let path = keeper_socket(&cfg.api_socket);
    meshd_dataplane::proxy::handover::Keeper::connect_or_start(&path, || {
        std::process::Command::new(std::env::current_exe()?)
            .arg("--listener-keeper")
            .arg(&path)
            .arg("--listener-hold-secs")
            .arg(cfg.listener_hold.as_secs().to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .map(|_| ())
    })
}

/// The kernel ingress path's settings, from `meshd`'s flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressSettings {
    /// How XDP attaches to the underlay interface (`--xdp`).
    pub xdp: XdpSetting,
    /// The underlay interface (`--underlay-if`); `None`: the one holding the
    /// advertise address.
    pub underlay_if: Option<String>,
    /// Published ports the kernel path serves at once (`--xdp-max-ports`); further
    /// ones are served by the proxy.
    pub max_ports: u32,
}

impl Default for IngressSettings {
    fn default() -> Self {
        IngressSettings { xdp: XdpSetting::Auto, underlay_if: None, max_ports: ingress::DEFAULT_MAX_PORTS }
    }
}

/// Whether the agent runs the eBPF socket load balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketLbMode {
    /// Load it; where the kernel cannot, say why and leave VIPs to the fallback.
    Auto,
    /// Never load it (the fallback's tests, or an operator's choice).
    Off,
}

impl AgentConfig {
    /// Checks what can be checked before anything starts.
    pub fn validate(&self) -> Result<()> {
        handlers::check_name("node", &self.node_name)?;
        if self.advertise_addr.is_unspecified() {
            return Err(Error::invalid("--advertise-addr must be this node's own address, not 0.0.0.0"));
        }
        self.proxy.validate()?;
        self.dns.validate()?;
        if self.ingress.max_ports == 0 || self.ingress.max_ports > ingress::MAX_PORTS {
            return Err(Error::invalid(format!(
                "--xdp-max-ports {} is out of range; use 1 to {}",
                self.ingress.max_ports,
                ingress::MAX_PORTS
            )));
        }
        Ok(())
    }
}

/// How often the reconciler reads the kernel back and repairs drift, when no change
/// wakes it earlier.
pub const RECONCILE_PERIOD: Duration = Duration::from_secs(1);

/// How long a stopping meshd lets the connections it relays finish.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// After a start, how long the reconciler treats every node of the persisted store as
/// alive if the cluster has not answered yet: removing the FDB entries of nodes it has
/// merely not heard from yet would cut the data path that a restart must keep.
pub const ADOPT_GRACE: Duration = Duration::from_secs(10);

/// What the dataplane side changes (guarded by an async mutex: held across netlink
/// calls, each bounded by a timeout).
#[derive(Default)]
struct Plane {
    proxy: Proxy,
}

/// What the last reconcile saw, readable at once by `status` and `attach` (never waits
/// on netlink).
#[derive(Default)]
struct Seen {
    /// The node's dataplane as last observed, with the changes applied since.
    actual: Dataplane,
    /// The last error of each failing operation, shown by `meshctl status`.
    errors: BTreeMap<String, String>,
    /// Tasks the last applied pass kept out of new connections (see
    /// [`reconcile::out_of_rotation`]); confirmed in [`crate::model::NodeState`].
    out_of_rotation: Vec<String>,
    /// Local tasks a `detach --grace` is draining, with the open connections last
    /// counted in each (shown by `meshctl status` while the detach waits).
    draining: BTreeMap<String, usize>,
}

/// One node's agent.
pub struct Agent {
    cfg: AgentConfig,
    mtu: u32,
    overlay: KernelVxlan,
    /// The socket load balancer (pinned); `None` when it is off or could not load.
    socklb: Mutex<Option<SocketLb>>,
    /// The nftables fallback serving VIPs where there is no socket load balancer.
    nat: Option<Mutex<NatFallback>>,
    /// Why there is no socket load balancer, if there is none.
    socklb_missing: Option<String>,
    /// The kernel ingress path (pinned); `None` when it is off or could not attach.
    ingress: Mutex<Option<Ingress>>,
    /// Without an ingress path: the underlay interface (if known) and why.
    ingress_off: Option<(Option<String>, String)>,
    shared: Arc<Shared>,
    alloc: Mutex<Alloc>,
    plane: tokio::sync::Mutex<Plane>,
    seen: Mutex<Seen>,
    /// The keyring generation this node runs.
    key_generation: Mutex<u64>,
    /// The change counter at the last successful save of the store.
    saved_generation: Mutex<Option<u64>>,
    /// What the API server turned away.
    api_stats: api_server::ApiStats,
    /// The proxy's counters, readable without the plane lock.
    proxy_stats: ProxyStats,
    /// A corrupt store found at start, moved aside (reported by `meshctl status`).
    store_recovered: Option<String>,
    /// The embedded resolvers, one per local container namespace.
    resolvers: Mutex<resolvers::Resolvers>,
    /// The listener keeper's hand-over, shared by the proxy and the resolvers.
    handover: Option<Arc<meshd_dataplane::proxy::handover::Handover>>,
}

impl Agent {
    /// Loads the persisted store, loads the kernel programs and prepares the agent.
    pub async fn new(cfg: AgentConfig) -> Result<Arc<Agent>> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(|e| Error::io(format!("creating --state-dir {}", cfg.state_dir.display()), e))?;
        let mut loaded = load_store(&cfg)?;
        // A restart keeps the operator's `node drain`.
        let availability = loaded.store.node(&cfg.node_name).map(|n| n.availability).unwrap_or_default();
        let node = Node { name: cfg.node_name.clone(), addr: cfg.advertise_addr, availability };
        let overlay = KernelVxlan::connect(cfg.advertise_addr)?;
        let underlay = overlay.underlay_mtu(cfg.advertise_addr).await?;
        // 68: the smallest MTU IPv4 allows.
        let mtu = underlay.checked_sub(VXLAN_OVERHEAD).filter(|&m| m >= 68).ok_or_else(|| {
            Error::invalid(format!(
                "the interface holding {} has MTU {underlay}, too small for VXLAN (needs at least {}); raise it",
                cfg.advertise_addr,
                68 + VXLAN_OVERHEAD
            ))
        })?;
        let (socklb, nat, socklb_missing) = open_vip_path(&cfg);
        let (ingress, ingress_off) = open_ingress(&cfg);
        let epoch = crate::wall_clock_ms();
        let gossip_addr = SocketAddr::from((cfg.advertise_addr, cfg.control_port));
        let store = std::mem::take(&mut loaded.store);
        let mut state =
            Gossip::new(cfg.gossip.clone(), cfg.node_name.clone(), gossip_addr, epoch, store, epoch, 0);
        persist::resync_if_stale(&mut state, &loaded, cfg.gossip.tombstone_ttl, 0);
        state.put(Object::Node(node), 0);
        let shared = Arc::new(Shared::new(
            state,
            cfg.keyring.clone(),
            Instant::now(),
            cfg.gossip.udp_limit + protocol::seal::OVERHEAD,
        ));
        let mut proxy = Proxy::new(cfg.proxy.clone());
        if cfg.listener_hold.is_zero() {
            // A keeper a previous run left would share our ports (SO_REUSEPORT) and
            // queue connections nobody accepts: it goes.
            if let Ok(keeper) =
                meshd_dataplane::proxy::handover::Keeper::connect(&keeper_socket(&cfg.api_socket))
            {
                let _ = keeper.quit();
                tracing::info!("ended the listener keeper of a previous run (--listener-hold-secs 0)");
            }
        }
        let handover = if cfg.listener_hold.is_zero() {
            None
        } else {
            match open_keeper(&cfg).and_then(meshd_dataplane::proxy::handover::Handover::new) {
                Ok(handover) => {
                    let adopted = handover.unclaimed();
                    tracing::info!(adopted, hold_secs = cfg.listener_hold.as_secs(), "listener keeper ready");
                    proxy.set_handover(handover.clone());
                    Some(handover)
                }
                Err(error) => {
                    tracing::warn!(%error, "no listener keeper: while meshd restarts, published ports and container resolvers refuse");
                    None
                }
            }
        };
        let mut resolvers = resolvers::Resolvers::new(cfg.dns.clone());
        if let Some(handover) = &handover {
            resolvers.set_handover(handover.clone());
        }
        let agent = Agent {
            overlay,
            mtu,
            socklb: Mutex::new(socklb),
            nat: nat.map(Mutex::new),
            socklb_missing,
            ingress: Mutex::new(ingress),
            ingress_off,
            shared,
            alloc: Mutex::default(),
            proxy_stats: proxy.stats(),
            plane: tokio::sync::Mutex::new(Plane { proxy }),
            api_stats: Default::default(),
            seen: Default::default(),
            key_generation: Mutex::new(0),
            saved_generation: Mutex::new(None),
            store_recovered: loaded.recovered,
            resolvers: Mutex::new(resolvers),
            handover,
            cfg,
        };
        Ok(Arc::new(agent))
    }

    /// Gossips, serves the API and keeps the dataplane reconciled until `shutdown`
    /// resolves; then leaves the cluster and cleans up.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let addr = SocketAddr::from((self.cfg.advertise_addr, self.cfg.control_port));
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("listening on TCP {addr} (is another meshd running here?)"), e))?;
        let udp = Arc::new(
            UdpSocket::bind(addr)
                .await
                .map_err(|e| Error::io(format!("binding UDP {addr} (is another meshd running here?)"), e))?,
        );
        let api = bind_api_socket(&self.cfg.api_socket).await?;
        let metrics = match self.cfg.metrics_addr {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                Error::io(format!("listening for metrics on {addr} (--metrics-addr; `off` turns it off)"), e)
            })?),
            None => None,
        };
        tracing::info!(node = %self.cfg.node_name, %addr, api = %self.cfg.api_socket.display(), "meshd running");

        let loops = vec![
            (
                "gossip",
                tokio::spawn(gossip::run(self.shared.clone(), udp.clone(), tcp, self.cfg.join.clone())),
            ),
            ("reconcile", tokio::spawn(self.clone().reconcile_loop())),
            ("API", tokio::spawn(api_server::serve_api(api, self.clone()))),
            ("health checks", tokio::spawn(self.clone().health_loop())),
        ];
        let mut loops = loops;
        if let Some(listener) = metrics {
            tracing::info!(addr = ?self.cfg.metrics_addr, "serving metrics");
            loops.push(("metrics", tokio::spawn(metrics::serve_metrics(listener, self.clone()))));
        }
        let outcome = supervise(loops, shutdown).await;
        match &outcome {
            Ok(()) => tracing::info!("leaving the cluster and shutting down"),
            Err(error) => tracing::error!(%error, "a background loop stopped; shutting down"),
        }
        let _ = std::fs::remove_file(&self.cfg.api_socket);
        gossip::leave(&self.shared, &udp).await;
        self.teardown().await;
        outcome
    }

    /// Stops serving: the proxy stops accepting; its listening sockets close with this
    /// process unless the listener keeper holds copies for the next meshd.
    /// Links, FDB and neighbour entries, rules and the pinned socket load balancer stay
    /// as they are, so containers and local clients keep working while meshd restarts;
    /// the next start adopts them. `meshd --cleanup` removes them.
    async fn teardown(&self) {
        let mut plane = self.plane.lock().await;
        // The keeper (if any) keeps its copies: the next meshd accepts what queues.
        plane.proxy.stop_accepting();
        // Connections being relayed get a moment to finish (a request in flight is
        // answered) before they are cut with this process.
        let deadline = Instant::now() + SHUTDOWN_DRAIN;
        let mut active = self.proxy_stats.counters().tcp_active;
        while active > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            active = self.proxy_stats.counters().tcp_active;
        }
        if active > 0 {
            tracing::info!(active, "cutting the connections still relayed after {SHUTDOWN_DRAIN:?}");
        }
        tracing::info!(
            "keeping overlay links, entries, rules and the pinned socket load balancer in place (remove them with `meshd --cleanup`)"
        );
        // Pinned links outlive our descriptors: dropping them keeps the hooks attached.
        drop(self.socklb.lock().take());
        drop(self.ingress.lock().take());
        self.stop_resolvers().await;
    }

    /// The gossip state (membership and the replicated store).
    fn gossip(&self) -> MutexGuard<'_, Gossip> {
        self.shared.gossip()
    }

    fn alloc(&self) -> MutexGuard<'_, Alloc> {
        self.alloc.lock()
    }

    /// Signals a local change to the reconciler.
    fn changed(&self) {
        self.shared.changes.send_modify(|g| *g += 1);
    }

    /// Applies `f` to the gossip state (writes spread from there); signals a change if
    /// it returns true.
    fn write(&self, f: impl FnOnce(&mut Gossip, protocol::Millis) -> bool) -> bool {
        let now = self.shared.now();
        let out = f(&mut self.gossip(), now);
        if out {
            self.changed();
        }
        out
    }

    async fn reconcile_loop(self: Arc<Self>) {
        let mut changes = self.shared.changes.subscribe();
        loop {
            self.reconcile().await;
            let _ = tokio::time::timeout(RECONCILE_PERIOD, changes.changed()).await;
        }
    }

    /// Removes the published ports whose unpublish grace is over. Any node may (the
    /// delete is the same on all), so a port is removed even if the node that started
    /// the unpublish went away; a pass runs at least every [`RECONCILE_PERIOD`], so the
    /// kernel path's flows are cut within that of the deadline (the proxy cuts its
    /// relays on its own timer, at the deadline).
    fn remove_closed_ports(&self) {
        let now = crate::wall_clock_ms();
        let over: Vec<String> = self
            .gossip()
            .store()
            .published()
            .filter(|p| p.closing_at.is_some_and(|at| at <= now))
            .map(|p| Key::published(p.proto, p.published))
            .collect();
        if !over.is_empty() {
            self.write(|g, at| over.iter().fold(false, |changed, key| g.delete(key, at) | changed));
        }
    }

    /// Whether membership is known again since the start: every node that has
    /// endpoints in the store is a known member (in any state), or the grace is over.
    fn membership_settled(&self) -> bool {
        if self.shared.started.elapsed() >= ADOPT_GRACE {
            return true;
        }
        let g = self.gossip();
        let known: std::collections::BTreeSet<&str> = g.members().map(|m| m.name.as_str()).collect();
        let settled =
            g.store().endpoints().all(|e| e.node == self.cfg.node_name || known.contains(e.node.as_str()));
        settled
    }

    /// Brings this node's own addresses and the dataplane in line with the store: reads
    /// back what the node holds, plans the difference, applies it.
    async fn reconcile(&self) {
        self.sync_keyring();
        self.remove_closed_ports();
        self.ensure_node_addresses();
        // The plane lock is taken before the store is read and the kernel observed, so an
        // attach (which creates its link and writes its endpoint under this lock) is
        // either wholly before or wholly after this pass: never a link seen without its
        // endpoint.
        let mut plane = self.plane.lock().await;
        // Read before the store, so a change arriving meanwhile is saved next time.
        let generation = *self.shared.changes.borrow();
        let settled = self.membership_settled();
        let (store, live) = {
            let g = self.gossip();
            let mut live = g.live_nodes();
            // A node that left (SIGTERM) kept its data path: its tasks still answer
            // through the kernel, so they stay programmed and load-balanced to. Only a
            // node that stopped answering (dead) is suspended.
            live.extend(g.members().filter(|m| m.state == MemberState::Left).map(|m| m.name.clone()));
            if !settled {
                live.extend(g.store().endpoints().map(|e| e.node.clone()));
            }
            (g.store().clone(), live)
        };
        let mut want = reconcile::desired(&store, &live, &self.cfg.node_name, self.mtu);
        let nat_want = self.nat.is_some().then(|| reconcile::nat_tables(&want));
        let frontends = self.observe_frontends(&mut want);
        let ingress = self.observe_ingress(&mut want);
        match self.overlay.observe().await {
            Ok(observed) => {
                let mut actual = reconcile::actual(observed, plane.proxy.served(), frontends);
                actual.ingress = ingress;
                let ops = reconcile::plan(&actual, &want);
                let errors = self.apply_all(&mut plane, &ops).await;
                for (op, result) in ops.iter().zip(&errors) {
                    if result.is_none() {
                        actual.record(op);
                    }
                }
                let mut seen = self.seen.lock();
                seen.actual = actual;
                seen.out_of_rotation = reconcile::out_of_rotation(&store);
                for (op, error) in ops.iter().zip(errors) {
                    let key = op_key(op);
                    match error {
                        None => {
                            seen.errors.remove(&key);
                        }
                        Some(message) => {
                            if seen.errors.get(&key) != Some(&message) {
                                tracing::warn!(op = %key, %message, "dataplane operation failed; will retry");
                            }
                            seen.errors.insert(key, message);
                        }
                    }
                }
                seen.errors.remove("observe");
                // A port no longer published here has no listener to fail: its error
                // goes (a later publish of the same port must not read it as current).
                let wanted: std::collections::BTreeSet<String> =
                    want.listeners.keys().map(|(p, n)| listen_key(*p, *n)).collect();
                seen.errors.retain(|key, _| !key.starts_with("published port ") || wanted.contains(key));
            }
            Err(error) => {
                let message = error.to_string();
                let mut seen = self.seen.lock();
                if seen.errors.get("observe") != Some(&message) {
                    tracing::warn!(%message, "reading the dataplane back failed; will retry");
                }
                seen.errors.insert("observe".into(), message);
            }
        }
        if let Some(nat_want) = nat_want {
            self.reconcile_nat(nat_want).await;
        }
        // After the task links: a resolver binds on the container's `lo`, which the
        // task link brings up.
        self.reconcile_resolvers(&store, &live).await;
        // Every published port and container has had its sockets by now: what a
        // previous meshd left for something gone is closed.
        if let Some(handover) = &self.handover {
            handover.release_unclaimed();
        }
        self.confirm();
        drop(plane);
        let mut saved = self.saved_generation.lock();
        if *saved != Some(generation) {
            match save_store(&self.cfg, &store) {
                Ok(()) => *saved = Some(generation),
                Err(error) => tracing::warn!(%error, "could not persist the store"),
            }
        }
    }

    /// Applies `ops` in order; runs of peer additions or removals go out as one
    /// pipelined batch. Returns each operation's error, if any.
    async fn apply_all(&self, plane: &mut Plane, ops: &[Op]) -> Vec<Option<String>> {
        let mut out = Vec::with_capacity(ops.len());
        let mut i = 0;
        while i < ops.len() {
            let run: Vec<PeerSpec> = ops[i..]
                .iter()
                .map_while(|op| match (op, &ops[i]) {
                    (Op::AddPeer(p), Op::AddPeer(_)) | (Op::RemovePeer(p), Op::RemovePeer(_)) => {
                        Some(p.clone())
                    }
                    _ => None,
                })
                .collect();
            if run.is_empty() {
                let result = self.apply(plane, &ops[i]).await;
                if let (Op::EnsureTask(link), Err(meshd_dataplane::Error::NoNetns { .. })) =
                    (&ops[i], &result)
                {
                    self.forget_vanished_task(&link.host_if);
                }
                out.push(result.err().map(|e| e.to_string()));
                i += 1;
                continue;
            }
            let results = match ops[i] {
                Op::AddPeer(_) => self.overlay.add_peers(&run).await,
                _ => self.overlay.remove_peers(&run).await,
            };
            out.extend(results.into_iter().map(|r| r.err().map(|e| e.to_string())));
            i += run.len();
        }
        out
    }

    async fn apply(&self, plane: &mut Plane, op: &Op) -> meshd_dataplane::Result<()> {
        match op {
            Op::EnsureOverlay(spec) => self.overlay.ensure_network(spec).await,
            Op::RemoveOverlay(vni) => self.overlay.remove_network(*vni).await,
            Op::AddPeer(peer) => self.overlay.add_peer(peer).await,
            Op::RemovePeer(peer) => self.overlay.remove_peer(peer).await,
            Op::EnsureTask(link) => self.overlay.attach_task(link).await,
            Op::DetachTask(host_if) => self.overlay.detach_task(host_if).await,
            Op::Listen { proto, port, spec } => plane.proxy.publish_spec(*proto, *port, spec.clone()).await,
            Op::Unlisten { proto, port, cut_at } => {
                let grace = cut_at.map_or(Duration::ZERO, |at| {
                    Duration::from_millis(at.saturating_sub(crate::wall_clock_ms()))
                });
                plane.proxy.unpublish(*proto, *port, grace);
                Ok(())
            }
            Op::Isolate(a, b) => self.overlay.isolate(*a, *b).await,
            Op::Unisolate(a, b) => self.overlay.unisolate(*a, *b).await,
            Op::Frontends(table) => match self.socklb.lock().as_mut() {
                Some(lb) => lb.apply(table).map(drop),
                None => Ok(()),
            },
            Op::Ingress(spec) => match self.ingress.lock().as_mut() {
                Some(ingress) => ingress.apply(spec).map(drop),
                None => Ok(()),
            },
        }
    }

    /// Reads the socket load balancer's table back from the kernel, and keeps its list
    /// of this node's addresses (for local clients of published ports) current: the
    /// advertise address and this node's overlay addresses. Without a socket load
    /// balancer, `want` drops its frontends (nothing could serve them).
    fn observe_frontends(&self, want: &mut Dataplane) -> reconcile::FrontendTable {
        let mut addrs: Vec<Ipv4Addr> =
            [self.cfg.advertise_addr].into_iter().chain(want.overlays.values().map(|o| o.node_ip)).collect();
        addrs.sort();
        addrs.dedup();
        // Never hold `seen` and `socklb` at once (status reads them in turn).
        let (set, observed) = {
            let mut guard = self.socklb.lock();
            let Some(lb) = guard.as_mut() else {
                want.frontends.clear();
                return BTreeMap::new();
            };
            // Read back like every other object: a hand-edited map is repaired.
            let set = match lb.local_addrs() {
                Ok(held) if held == addrs => Ok(()),
                _ => lb.set_local_addrs(&addrs),
            };
            (set, lb.observe())
        };
        let mut seen = self.seen.lock();
        match set {
            Ok(()) => {
                seen.errors.remove("socket-lb local addresses");
            }
            Err(error) => {
                seen.errors.insert("socket-lb local addresses".into(), error.to_string());
            }
        }
        match observed {
            Ok(table) => {
                seen.errors.remove("socket-lb observe");
                table
            }
            Err(error) => {
                seen.errors.insert("socket-lb observe".into(), error.to_string());
                BTreeMap::new()
            }
        }
    }

    /// Reads the ingress path back from the kernel. Without one, `want` drops its
    /// ingress table (the proxy serves every published port).
    fn observe_ingress(&self, want: &mut Dataplane) -> meshd_dataplane::ingress::IngressSpec {
        // Never hold `seen` and `ingress` at once (status reads them in turn).
        let observed = {
            let mut guard = self.ingress.lock();
            let Some(ingress) = guard.as_mut() else {
                want.ingress = Default::default();
                return Default::default();
            };
            ingress.observe()
        };
        let mut seen = self.seen.lock();
        match observed {
            Ok(spec) => {
                seen.errors.remove("ingress observe");
                spec
            }
            Err(error) => {
                seen.errors.insert("ingress observe".into(), error.to_string());
                Default::default()
            }
        }
    }

    /// A local task whose namespace disappeared is no task any more.
    fn forget_vanished_task(&self, host_if: &str) {
        let me = self.cfg.node_name.clone();
        self.write(|g, now| {
            let gone: Vec<_> = g
                .store()
                .endpoints()
                .filter(|e| e.node == me && e.host_if.as_deref() == Some(host_if))
                .map(|e| Key::endpoint(&e.id))
                .collect();
            gone.iter().fold(false, |changed, key| g.delete(key, now) | changed)
        });
    }
}

/// The error key of a published port's listener (`meshctl status`, NodeState problems;
/// `publish` looks for it).
fn listen_key(proto: meshd_dataplane::proxy::Proto, port: u16) -> String {
    format!("published port {port}/{proto}")
}

fn op_key(op: &Op) -> String {
    match op {
        Op::EnsureOverlay(s) => format!("overlay {}", s.vni),
        Op::RemoveOverlay(vni) => format!("overlay {vni}"),
        Op::AddPeer(p) | Op::RemovePeer(p) => format!("peer {} on {}", p.ip, p.vni),
        Op::EnsureTask(l) => format!("task link {}", l.host_if),
        Op::DetachTask(h) => format!("task link {h}"),
        Op::Listen { proto, port, .. } | Op::Unlisten { proto, port, .. } => listen_key(*proto, *port),
        Op::Isolate(a, b) | Op::Unisolate(a, b) => format!("isolation {a} -> {b}"),
        Op::Frontends(_) => "socket-lb frontends".into(),
        Op::Ingress(_) => "ingress".into(),
    }
}

/// Opens the pinned socket load balancer (adopting a previous run's pins); where it
/// is off or cannot load, the nftables fallback for VIPs. Says once, clearly, what is
/// missing and which path serves VIPs instead. Returns the load balancer, the
/// fallback, and why there is no load balancer.
fn open_vip_path(cfg: &AgentConfig) -> (Option<SocketLb>, Option<NatFallback>, Option<String>) {
    let why = match cfg.socket_lb {
        SocketLbMode::Off => "the socket load balancer is off (--socket-lb off)".to_owned(),
        SocketLbMode::Auto => {
            let lb_cfg = SocketLbConfig { cgroup: cfg.cgroup.clone(), pin_dir: Some(cfg.pin_dir.clone()) };
            match SocketLb::open(lb_cfg) {
                Ok(lb) => {
                    tracing::info!(adopted = lb.adopted(), pins = %cfg.pin_dir.display(), "socket load balancer ready");
                    return (Some(lb), None, None);
                }
                Err(error) => format!(
                    "the eBPF socket load balancer could not load ({error}); it needs cgroup v2 (--cgroup) and BPF with bpffs at /sys/fs/bpf"
                ),
            }
        }
    };
    match meshd_dataplane::natlb::probe() {
        Ok(()) => {
            tracing::warn!("{why}: VIPs are served by nftables DNAT in each container namespace instead, published ports by the proxy");
            (None, Some(NatFallback::default()), Some(why))
        }
        Err(error) => {
            let why = format!("{why}, and the nftables fallback cannot run either ({error})");
            tracing::error!("{why}: VIPs are not served on this node; published ports are, by the proxy");
            (None, None, Some(why))
        }
    }
}

/// Opens the kernel ingress path (adopting a previous run's pins) unless `--xdp off`;
/// where it is off or cannot attach, removes its pins (a stale program must not keep
/// answering with stale tables) and says once why: the proxy serves published ports.
fn open_ingress(cfg: &AgentConfig) -> (Option<Ingress>, Option<(Option<String>, String)>) {
    let pin_dir = ingress::pin_dir_in(&cfg.pin_dir);
    let interface = match &cfg.ingress.underlay_if {
        Some(name) => Ok(name.clone()),
        None => ingress::interface_holding(cfg.advertise_addr).map_err(|e| e.to_string()),
    };
    let why = match (cfg.ingress.xdp, &interface) {
        (XdpSetting::Off, _) => "the kernel ingress path is off (--xdp off)".to_owned(),
        (_, Err(error)) => error.clone(),
        (xdp, Ok(name)) => {
            let ingress_cfg = IngressConfig {
                xdp,
                interface: name.clone(),
                node_addr: cfg.advertise_addr,
                max_ports: cfg.ingress.max_ports,
                pin_dir: pin_dir.clone(),
            };
            match Ingress::open(ingress_cfg) {
                Ok(ingress) => {
                    tracing::info!(
                        hook = ingress.attached().as_str(), interface = %name, adopted = ingress.adopted(),
                        "kernel ingress path ready"
                    );
                    return (Some(ingress), None);
                }
                Err(error) => format!("the kernel ingress path could not attach ({error})"),
            }
        }
    };
    if let Err(error) = ingress::cleanup_pins(&pin_dir) {
        tracing::warn!(%error, "removing the pins of a previous ingress path");
    }
    tracing::warn!("{why}: published ports are served by the proxy");
    (None, Some((interface.ok(), why)))
}

/// Removes everything meshd owns in this network namespace (`meshd --cleanup`), and
/// the socket load balancer and ingress path pinned in `pin_dir` if given; returns how
/// many network objects it removed.
pub async fn remove_datapath(pin_dir: Option<&std::path::Path>) -> Result<usize> {
    if let Some(dir) = pin_dir {
        ingress::cleanup_pins(&ingress::pin_dir_in(dir))?;
        meshd_dataplane::socklb::cleanup_pins(dir)?;
    }
    let overlay = KernelVxlan::connect(Ipv4Addr::UNSPECIFIED)?;
    Ok(overlay.remove_all().await?)
}

/// Waits for `shutdown`, and meanwhile watches the background loops: none of them may
/// end while the agent runs, so one that returns or panics is an error naming it (an
/// agent that answers on its socket but no longer gossips or reconciles would lie to
/// its operator). Every loop is aborted before this returns.
pub async fn supervise(
    loops: Vec<(&'static str, JoinHandle<()>)>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let aborts: Vec<_> = loops.iter().map(|(_, handle)| handle.abort_handle()).collect();
    let watch = futures_select_first(loops);
    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        (name, result) = watch => Err(Error::invalid(match result {
            Ok(()) => format!("the {name} loop stopped unexpectedly; restart meshd (its log says why)"),
            Err(e) if e.is_panic() => format!("the {name} loop panicked; restart meshd and report the log above"),
            Err(e) => format!("the {name} loop was cancelled ({e}); restart meshd"),
        })),
    };
    for abort in aborts {
        abort.abort();
    }
    outcome
}

/// The first of `loops` to finish, with its name.
async fn futures_select_first(
    loops: Vec<(&'static str, JoinHandle<()>)>,
) -> (&'static str, std::result::Result<(), tokio::task::JoinError>) {
    let mut set = tokio::task::JoinSet::new();
    for (name, handle) in loops {
        set.spawn(async move { (name, handle.await) });
    }
    match set.join_next().await {
        Some(Ok(first)) => first,
        Some(Err(e)) => ("supervisor", Err(e)),
        None => std::future::pending().await,
    }
}

async fn bind_api_socket(path: &std::path::Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(Error::invalid(format!(
                "another meshd already serves {}; stop it or pass another --api-socket",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener =
        UnixListener::bind(path).map_err(|e| Error::io(format!("binding {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod 0600 {}", path.display()), e))?;
    Ok(listener)
}

impl Agent {
    /// `meshctl status`'s `ingress` object.
    fn ingress_status(&self) -> serde_json::Value {
        let status = match (self.ingress.lock().as_ref().map(Ingress::status), &self.ingress_off) {
            (Some(status), _) => status,
            (None, Some((interface, why))) => IngressStatus {
                hook: "off".into(),
                interface: interface.clone().unwrap_or_default(),
                reason: Some(why.clone()),
                tc_links: 0,
                counters: Default::default(),
            },
            (None, None) => IngressStatus {
                hook: "off".into(),
                interface: String::new(),
                reason: Some("the kernel ingress path was not opened".into()),
                tc_links: 0,
                counters: Default::default(),
            },
        };
        serde_json::to_value(status).unwrap_or_default()
    }

    /// Which path serves `proto/port`'s external clients here (`xdp-native`,
    /// `xdp-generic`, `tc` or `proxy`), and why the proxy.
    fn kernel_path(&self, proto: meshd_dataplane::proxy::Proto, port: u16) -> (String, Option<String>) {
        let guard = self.ingress.lock();
        match guard.as_ref().map(|i| i.kernel_path(reconcile::lb_proto(proto), port)) {
            Some(KernelPath::Kernel(hook)) => (hook.as_str().to_owned(), None),
            Some(KernelPath::Proxy(why)) => ("proxy".into(), Some(why)),
            None => (
                "proxy".into(),
                Some(self.ingress_off.as_ref().map_or_else(String::new, |(_, why)| why.clone())),
            ),
        }
    }

    fn programs_status(&self) -> Vec<ProgramStatus> {
        match self.socklb.lock().as_ref().map(SocketLb::status) {
            Some(Ok(status)) => status,
            Some(Err(error)) => {
                tracing::warn!(%error, "reading program status");
                Vec::new()
            }
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forever() -> JoinHandle<()> {
        tokio::spawn(std::future::pending())
    }

    #[tokio::test]
    async fn a_panicking_loop_stops_the_agent_with_its_name() {
        let loops = vec![
            ("gossip", forever()),
            ("reconcile", tokio::spawn(async { panic!("injected failure") })),
            ("API", forever()),
        ];
        let error = supervise(loops, std::future::pending()).await.unwrap_err().to_string();
        assert!(error.contains("reconcile loop panicked"), "{error}");
    }

    #[tokio::test]
    async fn a_loop_that_returns_stops_the_agent_and_the_others_are_aborted() {
        let survivor = forever();
        let abort = survivor.abort_handle();
        let loops = vec![("API", tokio::spawn(async {})), ("gossip", survivor)];
        let error = supervise(loops, std::future::pending()).await.unwrap_err().to_string();
        assert!(error.contains("API loop stopped unexpectedly"), "{error}");
        tokio::task::yield_now().await;
        assert!(abort.is_finished(), "the other loops are aborted");
    }

    #[tokio::test]
    async fn shutdown_is_not_an_error() {
        let loops = vec![("gossip", forever()), ("reconcile", forever())];
        assert!(supervise(loops, async {}).await.is_ok());
    }
}
