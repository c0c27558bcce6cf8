//! The per-node agent: owns the store, runs the state source, reconciles the dataplane
//! with the store, and serves the local API. The one place where control meets
//! mechanism: everything it decides comes from [`crate::reconcile`] and
//! [`crate::ipam`]; everything it changes goes through `meshd_dataplane`.

mod addresses;
mod api_server;
mod handlers;
mod keys;
mod persist;

use self::{
    addresses::Alloc,
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
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use parking_lot::{Mutex, MutexGuard};

use meshd_dataplane::{
    ebpf::SocketPrograms,
    overlay::{self, KernelVxlan, VXLAN_OVERHEAD},
    proxy::{Proxy, ProxyConfig},
};
use tokio::net::{TcpListener, UdpSocket, UnixListener};

use crate::{
    gossip::{self as protocol, seal::Keyring, Gossip},
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
    /// Leave links and entries in place on shutdown.
    pub keep_datapath: bool,
    /// The cluster keyring.
    pub keyring: Keyring,
    /// Where the keyring is kept (rewritten when a rotation changes it).
    pub keyring_file: PathBuf,
    /// Gossip tuning.
    pub gossip: protocol::Config,
    /// Limits and timeouts of the published-port proxy.
    pub proxy: ProxyConfig,
}

impl AgentConfig {
    /// Checks what can be checked before anything starts.
    pub fn validate(&self) -> Result<()> {
        handlers::check_name("node", &self.node_name)?;
        if self.advertise_addr.is_unspecified() {
            return Err(Error::invalid("--advertise-addr must be this node's own address, not 0.0.0.0"));
        }
        self.proxy.validate()?;
        Ok(())
    }
}

/// What the dataplane side tracks (guarded by an async mutex: held across netlink calls).
#[derive(Default)]
struct Plane {
    applied: Dataplane,
    proxy: Proxy,
    /// The last error of each failing operation, shown by `meshctl status`.
    errors: BTreeMap<String, String>,
}

/// One node's agent.
pub struct Agent {
    cfg: AgentConfig,
    mtu: u32,
    overlay: KernelVxlan,
    programs: Mutex<Option<SocketPrograms>>,
    shared: Arc<Shared>,
    alloc: Mutex<Alloc>,
    plane: tokio::sync::Mutex<Plane>,
    /// The keyring generation this node runs.
    key_generation: Mutex<u64>,
    /// The change counter at the last successful save of the store.
    saved_generation: Mutex<Option<u64>>,
    /// What the API server turned away.
    api_stats: api_server::ApiStats,
    /// A corrupt store found at start, moved aside (reported by `meshctl status`).
    store_recovered: Option<String>,
}

impl Agent {
    /// Loads the persisted store, loads the kernel programs and prepares the agent.
    pub async fn new(cfg: AgentConfig) -> Result<Arc<Agent>> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(|e| Error::io(format!("creating --state-dir {}", cfg.state_dir.display()), e))?;
        let mut loaded = load_store(&cfg)?;
        let node = Node { name: cfg.node_name.clone(), addr: cfg.advertise_addr };
        let mtu = overlay::underlay_mtu(cfg.advertise_addr).await? - VXLAN_OVERHEAD;
        let programs = SocketPrograms::attach(cfg.cgroup.clone())?;
        let epoch = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
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
        let agent = Agent {
            overlay: KernelVxlan { local_vtep: cfg.advertise_addr },
            mtu,
            programs: Mutex::new(Some(programs)),
            shared,
            alloc: Mutex::default(),
            plane: tokio::sync::Mutex::new(Plane {
                proxy: Proxy::new(cfg.proxy.clone()),
                ..Plane::default()
            }),
            api_stats: Default::default(),
            key_generation: Mutex::new(0),
            saved_generation: Mutex::new(None),
            store_recovered: loaded.recovered,
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
        tracing::info!(node = %self.cfg.node_name, %addr, api = %self.cfg.api_socket.display(), "meshd running");

        let tasks = [
            tokio::spawn(gossip::run(self.shared.clone(), udp.clone(), tcp, self.cfg.join.clone())),
            tokio::spawn(self.clone().reconcile_loop()),
            tokio::spawn(api_server::serve_api(api, self.clone())),
        ];
        shutdown.await;
        tracing::info!("leaving the cluster and shutting down");
        tasks[2].abort();
        let _ = std::fs::remove_file(&self.cfg.api_socket);
        gossip::leave(&self.shared, &udp).await;
        for task in &tasks {
            task.abort();
        }
        self.teardown().await;
        Ok(())
    }

    async fn teardown(&self) {
        let mut plane = self.plane.lock().await;
        let applied = std::mem::take(&mut plane.applied);
        for (proto, port) in applied.listeners.keys() {
            plane.proxy.unpublish(*proto, *port);
        }
        if self.cfg.keep_datapath {
            tracing::info!("keeping overlay links and entries (--keep-datapath)");
        } else {
            for host_if in applied.local_tasks.keys() {
                log_failure("removing task link", self.overlay.detach_task(host_if).await);
            }
            for vni in applied.overlays.keys() {
                log_failure("removing overlay", self.overlay.remove_network(*vni).await);
            }
            for (a, b) in &applied.isolation {
                log_failure("removing isolation rule", self.overlay.unisolate(*a, *b).await);
            }
        }
        // Dropping the programs closes their links: the cgroup hooks detach.
        drop(self.programs.lock().take());
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
            let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
        }
    }

    /// Brings this node's own addresses and the dataplane in line with the store.
    async fn reconcile(&self) {
        self.sync_keyring();
        self.ensure_node_addresses();
        // Read before the store, so a change arriving meanwhile is saved next time.
        let generation = *self.shared.changes.borrow();
        let (store, live) = {
            let g = self.gossip();
            (g.store().clone(), g.live_nodes())
        };
        let want = reconcile::desired(&store, &live, &self.cfg.node_name, self.mtu);
        let mut plane = self.plane.lock().await;
        for op in reconcile::plan(&plane.applied, &want) {
            let key = op_key(&op);
            match self.apply(&mut plane, &op).await {
                Ok(()) => {
                    plane.applied.record(&op);
                    plane.errors.remove(&key);
                }
                Err(error) => {
                    let message = error.to_string();
                    if plane.errors.get(&key) != Some(&message) {
                        tracing::warn!(op = %key, %message, "dataplane operation failed; will retry");
                    }
                    if let (Op::EnsureTask(link), meshd_dataplane::Error::NoNetns { .. }) = (&op, &error) {
                        self.forget_vanished_task(&link.host_if);
                    }
                    plane.errors.insert(key, message);
                }
            }
        }
        self.confirm(&plane);
        drop(plane);
        let mut saved = self.saved_generation.lock();
        if *saved != Some(generation) {
            match save_store(&self.cfg, &store) {
                Ok(()) => *saved = Some(generation),
                Err(error) => tracing::warn!(%error, "could not persist the store"),
            }
        }
    }

    async fn apply(&self, plane: &mut Plane, op: &Op) -> meshd_dataplane::Result<()> {
        match op {
            Op::EnsureOverlay(spec) => self.overlay.ensure_network(spec).await,
            Op::RemoveOverlay(vni) => self.overlay.remove_network(*vni).await,
            Op::AddPeer(peer) => self.overlay.add_peer(peer).await,
            Op::RemovePeer(peer) => self.overlay.remove_peer(peer).await,
            Op::EnsureTask(link) => self.overlay.attach_task(link).await,
            Op::DetachTask(host_if) => self.overlay.detach_task(host_if).await,
            Op::Listen { proto, port, backends } => {
                plane.proxy.publish(*proto, *port, backends.clone()).await
            }
            Op::Unlisten { proto, port } => {
                plane.proxy.unpublish(*proto, *port);
                Ok(())
            }
            Op::Isolate(a, b) => self.overlay.isolate(*a, *b).await,
            Op::Unisolate(a, b) => self.overlay.unisolate(*a, *b).await,
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

fn op_key(op: &Op) -> String {
    match op {
        Op::EnsureOverlay(s) => format!("overlay {}", s.vni),
        Op::RemoveOverlay(vni) => format!("overlay {vni}"),
        Op::AddPeer(p) | Op::RemovePeer(p) => format!("peer {} on {}", p.ip, p.vni),
        Op::EnsureTask(l) => format!("task link {}", l.host_if),
        Op::DetachTask(h) => format!("task link {h}"),
        Op::Listen { proto, port, .. } | Op::Unlisten { proto, port } => {
            format!("published port {port}/{proto}")
        }
        Op::Isolate(a, b) | Op::Unisolate(a, b) => format!("isolation {a} -> {b}"),
    }
}

fn log_failure(what: &str, result: meshd_dataplane::Result<()>) {
    if let Err(error) = result {
        tracing::warn!(%error, "{what}");
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
    fn programs_status(&self) -> Vec<meshd_dataplane::ebpf::ProgramStatus> {
        match self.programs.lock().as_ref().map(SocketPrograms::status) {
            Some(Ok(status)) => status,
            Some(Err(error)) => {
                tracing::warn!(%error, "reading program status");
                Vec::new()
            }
            None => Vec::new(),
        }
    }
}
