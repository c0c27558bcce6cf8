//! The userspace proxy that serves published ports on a node: it accepts on
//! `0.0.0.0:PUBLISHED` and relays each TCP connection (or UDP flow) to one backend
//! chosen round-robin, trying the next backend when one refuses. Listeners are
//! long-lived; their backend lists are swapped in place as the cluster changes.
//!
//! Everything a client can make it hold is bounded by [`ProxyConfig`]: TCP connections
//! (a cap, an idle timeout, keepalive so a dead peer is noticed) and UDP flows (a
//! bounded table whose entries expire when silent both ways). What the bounds turn away
//! is counted in [`ProxyCounters`], shown by `meshctl status`.
//!
//! TCP runs on the proxy's own worker threads, one per core, each with its own listener
//! per port (`SO_REUSEPORT`, see `workers`); a connection lives on the thread that
//! accepted it. The bytes move through one buffer per thread, or are spliced through a
//! pipe for bulk flows (see `relay`), so an idle connection holds no buffer.

pub mod handover;
pub mod proxy_protocol;
mod relay;
mod workers;

use std::{
    cell::RefCell,
    collections::HashMap,
    fmt, io,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsFd,
    str::FromStr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use parking_lot::{Mutex, RwLock};
pub use relay::{BulkMode, PIPES_PER_THREAD};
use serde::{Deserialize, Serialize};
use socket2::{SockRef, TcpKeepalive};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{watch, OwnedSemaphorePermit, Semaphore},
    task::{JoinHandle, JoinSet},
    time::{sleep_until, timeout, Instant},
};

use crate::{
    backoff::AcceptBackoff,
    lb::{BackendCounters, BackendStats, Balancer, Loads, Policy},
    Error, Result,
};

/// The relay buffer of each worker thread (shared by its connections), and the most a
/// bulk flow splices at once: large enough that bulk transfers move in few syscalls
/// (tokio's default of 8 KiB caps a relayed stream at a fraction of the link).
pub const RELAY_BUFFER: usize = 64 * 1024;

/// Most proxy worker threads (`--proxy-workers`).
const MAX_WORKERS: usize = 256;

/// Largest UDP payload: a datagram is relayed whole or not at all.
const DATAGRAM_MAX: usize = 65_536;

/// TCP keepalive on a relayed socket: after `idle` without traffic, probe every
/// `interval`; after `retries` unanswered probes the peer is dead and the relay closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Silence before the first probe (`TCP_KEEPIDLE`).
    pub idle: Duration,
    /// Time between probes (`TCP_KEEPINTVL`).
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped (`TCP_KEEPCNT`).
    pub retries: u32,
}

impl Keepalive {
    /// How long a dead peer can go unnoticed: the idle time plus every probe. Also used
    /// as `TCP_USER_TIMEOUT`, so data stuck unacknowledged towards a dead peer gives up
    /// in the same time instead of after the kernel's ~15 minutes of retransmissions.
    pub fn dead_after(&self) -> Duration {
        self.idle + self.interval * self.retries
    }
}

/// Limits and timeouts of the published-port proxy (flags `--proxy-*` of meshd).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Most TCP connections relayed at once, over all published ports (each holds two
    /// file descriptors). A connection beyond it is closed right after accept, so the
    /// client learns at once and can try another node; counted as `tcp_refused_at_cap`.
    /// Default 16384.
    pub tcp_max_connections: usize,
    /// A relayed TCP connection that carried no byte in either direction for this long
    /// is closed on both sides (both ends see an orderly close, not a silent drop as
    /// with IPVS's 900 s). `None`: never. Default 1 hour.
    pub tcp_idle_timeout: Option<Duration>,
    /// How long a connect to one backend may take before the next one is tried.
    /// Default 2 s.
    pub tcp_connect_timeout: Duration,
    /// Keepalive on both sockets of a relayed connection, so one whose client or task
    /// died (a node lost power) is closed instead of held forever. `None`: off.
    /// Default: probe after 30 s idle, every 10 s, 3 times (dead within 60 s).
    pub tcp_keepalive: Option<Keepalive>,
    /// Most UDP flows (client address → relay socket) at once, over all published
    /// ports. A datagram from a new client beyond it is dropped and counted as
    /// `udp_flows_refused`; flows that exist keep working (a flood of spoofed sources
    /// cannot evict them). Default 4096.
    pub udp_max_flows: usize,
    /// A UDP flow with no datagram in either direction for this long is removed and
    /// its socket closed; the client's next datagram opens a new one. Default 30 s.
    pub udp_idle_timeout: Duration,
    /// Threads relaying TCP, each with its own runtime and its own listener per port
    /// (`SO_REUSEPORT`); a connection stays on the thread that accepted it. 0: one per
    /// core. Default 0.
    pub workers: usize,
    /// Each worker on its own current-thread runtime (true: a connection never leaves
    /// its thread), or all on one multi-thread runtime that balances tasks between
    /// threads (false). Default true.
    pub per_core: bool,
    /// How bulk flows move: spliced through a pipe (kernel to kernel, no copy through
    /// userspace) or copied through the worker's buffer. Default [`BulkMode::Splice`].
    pub bulk: BulkMode,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            tcp_max_connections: 16_384,
            tcp_idle_timeout: Some(Duration::from_secs(3600)),
            tcp_connect_timeout: Duration::from_secs(2),
            tcp_keepalive: Some(Keepalive {
                idle: Duration::from_secs(30),
                interval: Duration::from_secs(10),
                retries: 3,
            }),
            udp_max_flows: 4096,
            udp_idle_timeout: Duration::from_secs(30),
            workers: 0,
            per_core: true,
            bulk: BulkMode::Splice,
        }
    }
}

impl ProxyConfig {
    /// Checks the settings; the error names the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |setting, message: &str| Err(Error::Config { setting, message: message.into() });
        if self.tcp_max_connections == 0 {
            return bad("--proxy-tcp-max-connections", "0 would refuse every connection; use at least 1");
        }
        if self.tcp_max_connections > Semaphore::MAX_PERMITS {
            return bad("--proxy-tcp-max-connections", "is larger than the process can count");
        }
        if self.tcp_idle_timeout == Some(Duration::ZERO) {
            return bad("--proxy-tcp-idle-timeout-secs", "must be positive (omit it for the default)");
        }
        if self.tcp_connect_timeout.is_zero() {
            return bad("--proxy-connect-timeout-ms", "must be positive, e.g. 2000");
        }
        if let Some(k) = &self.tcp_keepalive {
            if k.idle < Duration::from_secs(1) || k.interval < Duration::from_secs(1) || k.retries == 0 {
                return bad(
                    "--proxy-tcp-keepalive-secs",
                    "keepalive needs at least 1 s idle, 1 s between probes and 1 probe (0 turns it off)",
                );
            }
        }
        if self.udp_max_flows == 0 {
            return bad("--proxy-udp-max-flows", "0 would drop every datagram; use at least 1");
        }
        if self.udp_idle_timeout.is_zero() {
            return bad("--proxy-udp-idle-timeout-secs", "must be positive, e.g. 30");
        }
        if self.workers > MAX_WORKERS {
            return bad("--proxy-workers", "is more than 256 threads; use 0 for one per core");
        }
        Ok(())
    }

    /// Worker threads the proxy runs: `workers`, or one per core.
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            n => n,
        }
    }

    /// File descriptors the proxy may hold at its caps: two per TCP connection, one per
    /// UDP flow, two per splicing pipe (listeners not included: one per published port
    /// and worker).
    pub fn max_fds(&self) -> u64 {
        let pipes = match self.bulk {
            BulkMode::Splice => (PIPES_PER_THREAD * self.worker_threads()) as u64,
            BulkMode::Copy => 0,
        };
        2 * self.tcp_max_connections as u64 + self.udp_max_flows as u64 + 2 * pipes
    }
}

/// What the proxy did, over all published ports since meshd started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyCounters {
    /// TCP connections being relayed now.
    pub tcp_active: u64,
    /// TCP connections accepted and relayed (or tried).
    pub tcp_accepted: u64,
    /// TCP connections closed at once because `tcp_max_connections` were open.
    pub tcp_refused_at_cap: u64,
    /// TCP connections reset at once because their port's own limit
    /// (`meshctl publish --max-connections`) was reached.
    #[serde(default)]
    pub tcp_refused_at_port_limit: u64,
    /// TCP connections closed by the idle timeout.
    pub tcp_idle_closed: u64,
    /// TCP connections closed because no backend accepted them.
    pub tcp_no_backend: u64,
    /// UDP flows open now.
    pub udp_flows_active: u64,
    /// UDP flows opened.
    pub udp_flows_opened: u64,
    /// Datagrams from new clients dropped because `udp_max_flows` flows were open.
    pub udp_flows_refused: u64,
    /// UDP flows removed after being silent both ways for the idle timeout.
    pub udp_flows_expired: u64,
}

/// Live counters; [`ProxyCounters`] is their snapshot.
#[derive(Default)]
struct Counters {
    tcp_accepted: AtomicU64,
    tcp_refused_at_cap: AtomicU64,
    tcp_refused_at_port_limit: AtomicU64,
    tcp_idle_closed: AtomicU64,
    tcp_no_backend: AtomicU64,
    udp_flows_opened: AtomicU64,
    udp_flows_refused: AtomicU64,
    udp_flows_expired: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What every listener of one proxy shares: the settings, the global caps, the counters.
struct Shared {
    config: ProxyConfig,
    /// One permit per TCP connection that may be relayed.
    tcp_slots: Arc<Semaphore>,
    /// UDP flows open now, over all listeners.
    udp_flows: AtomicUsize,
    counters: Counters,
    /// Zero of the millisecond timestamps kept in atomics.
    epoch: Instant,
    /// Each served port's own counters, readable without the proxy's owner.
    ports: RwLock<std::collections::BTreeMap<(Proto, u16), Arc<PortStats>>>,
}

impl Shared {
    fn new(config: ProxyConfig) -> Shared {
        Shared {
            tcp_slots: Arc::new(Semaphore::new(config.tcp_max_connections)),
            udp_flows: AtomicUsize::new(0),
            counters: Counters::default(),
            epoch: Instant::now(),
            ports: RwLock::default(),
            config,
        }
    }

    /// Now, as milliseconds since `epoch` (fits an atomic).
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn instant(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// Takes one of the UDP flow slots, if any is free.
    fn reserve_udp_flow(self: &Arc<Self>) -> Option<UdpFlowSlot> {
        let max = self.config.udp_max_flows;
        self.udp_flows
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| UdpFlowSlot(self.clone()))
    }
}

/// A UDP flow's place in the table's count, given back when the flow ends — also when
/// its task is aborted by an unpublish.
struct UdpFlowSlot(Arc<Shared>);

impl Drop for UdpFlowSlot {
    fn drop(&mut self) {
        self.0.udp_flows.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One published port's limit and counters, shared by its accept loops and the
/// connections (or UDP flows) they hold.
#[derive(Default)]
struct PortStats {
    /// Each backend's counters (kept across backend-list changes).
    loads: Loads,
    /// Most connections (TCP) or flows (UDP) at once; 0: no limit of its own.
    limit: AtomicUsize,
    /// Connections or flows held now.
    active: AtomicUsize,
    /// Connections accepted and relayed (or tried), flows opened.
    accepted: AtomicU64,
    /// Connections reset, or new clients' datagrams dropped, at the limit.
    refused_at_limit: AtomicU64,
}

impl PortStats {
    /// Takes a place under the port's limit, if one is free.
    fn take(self: &Arc<Self>) -> Option<PortSlot> {
        let limit = self.limit.load(Ordering::Relaxed);
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (limit == 0 || n < limit).then_some(n + 1))
            .ok()
            .map(|_| {
                bump(&self.accepted);
                PortSlot(self.clone())
            })
    }

    fn snapshot(&self) -> PortCounters {
        PortCounters {
            backends: self.loads.snapshot(),
            max_connections: self.limit.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed) as u64,
            accepted: self.accepted.load(Ordering::Relaxed),
            refused_at_limit: self.refused_at_limit.load(Ordering::Relaxed),
        }
    }
}

/// A connection's or flow's place under its port's limit, given back when it ends.
struct PortSlot(Arc<PortStats>);

impl Drop for PortSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one published port's listener did since it was published.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PortCounters {
    /// Each backend's counters, by address.
    pub backends: Vec<(SocketAddr, BackendCounters)>,
    /// Its own limit of connections (UDP: flows) at once; 0: none.
    pub max_connections: usize,
    /// Connections (UDP: flows) held now.
    pub active: u64,
    /// Connections accepted (UDP: flows opened).
    pub accepted: u64,
    /// Connections reset (UDP: new clients' datagrams dropped) at its limit.
    pub refused_at_limit: u64,
}

/// Transport protocol of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(format!("unknown protocol {other:?}: use tcp or udp")),
        }
    }
}

/// What one published port's listener serves: its backends, and how a new
/// connection picks one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerSpec {
    /// The load-balancing policy.
    pub policy: Policy,
    /// The backends, in the order the policy indexes them.
    pub backends: Vec<SocketAddr>,
    /// Write a PROXY protocol v2 header to the backend before the client's bytes.
    pub proxy_protocol: bool,
    /// Most connections (UDP: flows) the port holds at once; 0: no limit of its own
    /// (the proxy's global caps still apply).
    pub max_connections: usize,
}

/// One listener's balancer, swapped whole when its backends or policy change.
type Backends = Arc<RwLock<Arc<Balancer>>>;

struct Listener {
    backends: Backends,
    /// The round-robin turn, kept across balancer swaps.
    turn: Arc<AtomicUsize>,
    /// Whether connections start with a PROXY v2 header (read per connection).
    proxy_protocol: Arc<AtomicBool>,
    /// The accept loops: one per worker for TCP, one for UDP.
    tasks: Vec<JoinHandle<()>>,
    /// Set (or dropped) to cut the connections relayed for this port.
    cut: watch::Sender<bool>,
    /// Its limit and counters.
    stats: Arc<PortStats>,
}

impl Listener {
    fn abort(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Resolves when the connections of a listener are to be cut: the flag is set, or
/// its listener is gone without a grace period (the proxy dropped).
async fn cut_signal(mut cut: watch::Receiver<bool>) {
    let _ = cut.wait_for(|cut| *cut).await;
}

/// All published-port listeners of this node.
pub struct Proxy {
    shared: Arc<Shared>,
    listeners: HashMap<(Proto, u16), Listener>,
    /// Started with the first TCP port (a node that publishes nothing runs no threads);
    /// dropped last, which ends the connections still relayed.
    workers: Option<workers::Workers>,
    /// The listener keeper, when listening sockets outlive this process.
    handover: Option<Arc<handover::Handover>>,
}

/// The keeper's key of a published port's `i`-th listening socket.
fn handover_key(proto: Proto, port: u16, i: usize) -> String {
    format!("{}{i}", handover_prefix(proto, port))
}

/// What the keys of a published port's sockets start with.
fn handover_prefix(proto: Proto, port: u16) -> String {
    format!("{proto}/{port}/")
}

/// Reads a [`Proxy`]'s counters from anywhere (see [`Proxy::stats`]).
#[derive(Clone)]
pub struct ProxyStats(Arc<Shared>);

impl ProxyStats {
    /// Each served port's limit and counters.
    pub fn ports(&self) -> Vec<((Proto, u16), PortCounters)> {
        self.0.ports.read().iter().map(|(key, stats)| (*key, stats.snapshot())).collect()
    }

    /// What the proxy has done so far, over all ports.
    pub fn counters(&self) -> ProxyCounters {
        let s = &self.0;
        let c = &s.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyCounters {
            tcp_active: (s.config.tcp_max_connections - s.tcp_slots.available_permits()) as u64,
            tcp_accepted: get(&c.tcp_accepted),
            tcp_refused_at_cap: get(&c.tcp_refused_at_cap),
            tcp_refused_at_port_limit: get(&c.tcp_refused_at_port_limit),
            tcp_idle_closed: get(&c.tcp_idle_closed),
            tcp_no_backend: get(&c.tcp_no_backend),
            udp_flows_active: s.udp_flows.load(Ordering::Relaxed) as u64,
            udp_flows_opened: get(&c.udp_flows_opened),
            udp_flows_refused: get(&c.udp_flows_refused),
            udp_flows_expired: get(&c.udp_flows_expired),
        }
    }
}

impl Default for Proxy {
    fn default() -> Self {
        Proxy::new(ProxyConfig::default())
    }
}

impl Proxy {
    /// A proxy with these limits (checked with [`ProxyConfig::validate`] by the caller).
    pub fn new(config: ProxyConfig) -> Proxy {
        Proxy {
            shared: Arc::new(Shared::new(config)),
            listeners: HashMap::new(),
            workers: None,
            handover: None,
        }
    }

    /// Hands listening sockets over through `handover`: the sockets a previous meshd
    /// left with the keeper are served again by the next publish of their port
    /// (instead of binding anew), and every new listening socket is given to it too.
    pub fn set_handover(&mut self, handover: Arc<handover::Handover>) {
        self.handover = Some(handover);
    }

    /// Stops accepting on every port, leaving the keeper's copies open (shutdown: the
    /// next meshd takes them back).
    pub fn stop_accepting(&mut self) {
        for listener in self.listeners.values() {
            listener.abort();
        }
    }

    /// Starts serving `port` round robin over `backends`, or updates them if it is
    /// served already.
    pub async fn publish(&mut self, proto: Proto, port: u16, backends: Vec<SocketAddr>) -> Result<()> {
        self.publish_spec(
            proto,
            port,
            ListenerSpec { policy: Policy::RoundRobin, backends, proxy_protocol: false, max_connections: 0 },
        )
        .await
    }

    /// Starts serving `port` as `spec` says, or updates its backends and policy if it
    /// is served already (connections in flight keep their backend).
    pub async fn publish_spec(&mut self, proto: Proto, port: u16, spec: ListenerSpec) -> Result<()> {
        if let Some(listener) = self.listeners.get(&(proto, port)) {
            let balancer =
                Balancer::new(spec.policy, spec.backends, &listener.stats.loads, listener.turn.clone());
            *listener.backends.write() = Arc::new(balancer);
            listener.proxy_protocol.store(spec.proxy_protocol, Ordering::Relaxed);
            // Connections above a lowered limit run on; new ones wait for room.
            listener.stats.limit.store(spec.max_connections, Ordering::Relaxed);
            return Ok(());
        }
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let stats = Arc::new(PortStats::default());
        stats.limit.store(spec.max_connections, Ordering::Relaxed);
        let turn = Arc::<AtomicUsize>::default();
        let balancer = Balancer::new(spec.policy, spec.backends, &stats.loads, turn.clone());
        let backends: Backends = Arc::new(RwLock::new(Arc::new(balancer)));
        let shared = self.shared.clone();
        let proxy_protocol = Arc::new(AtomicBool::new(spec.proxy_protocol));
        let (cut, _) = watch::channel(false);
        let mut listener = Listener {
            backends: backends.clone(),
            turn,
            proxy_protocol: proxy_protocol.clone(),
            tasks: Vec::new(),
            cut,
            stats: stats.clone(),
        };
        match proto {
            Proto::Tcp => {
                if self.workers.is_none() {
                    let started =
                        workers::Workers::start(shared.config.worker_threads(), shared.config.per_core)
                            .map_err(|e| Error::io("starting the proxy's worker threads", e))?;
                    self.workers = Some(started);
                }
                let workers = self.workers.as_ref().expect("just started");
                let handles = workers.handles();
                // A previous meshd's sockets for this port first (connections queued in
                // their backlogs are accepted now), then new ones for the other workers;
                // more adopted sockets than workers are shared out (none is dropped:
                // its backlog would be lost).
                let prefix = handover_prefix(proto, port);
                let mut adopted = self.handover.as_ref().map(|h| h.claim(&prefix)).unwrap_or_default();
                let count = handles.len().max(adopted.len());
                for i in 0..count {
                    let key = handover_key(proto, port, i);
                    let keepalive = shared.config.tcp_keepalive.as_ref();
                    let socket = match adopted.remove(&key) {
                        Some(fd) => {
                            let socket = std::net::TcpListener::from(fd);
                            socket.set_nonblocking(true).map(|()| socket)
                        }
                        None => workers::reuseport_listener(addr).inspect(|socket| {
                            if let Some(handover) = &self.handover {
                                handover.put(&key, socket);
                            }
                        }),
                    }
                    .and_then(|socket| {
                        configure_relayed_socket(&socket, keepalive)?;
                        Ok(socket)
                    });
                    match socket {
                        Ok(socket) => listener.tasks.push(handles[i % handles.len()].spawn(serve_tcp(
                            socket,
                            backends.clone(),
                            proxy_protocol.clone(),
                            shared.clone(),
                            stats.clone(),
                            listener.cut.subscribe(),
                        ))),
                        Err(source) => {
                            // Nothing half-published: the workers' listeners so far close.
                            listener.abort();
                            if let Some(handover) = &self.handover {
                                handover.delete(&handover_prefix(proto, port));
                            }
                            return Err(Error::listen(proto, addr, source));
                        }
                    }
                }
            }
            Proto::Udp => {
                let key = handover_key(proto, port, 0);
                let adopted =
                    self.handover.as_ref().and_then(|h| h.claim(&handover_prefix(proto, port)).remove(&key));
                let socket = match adopted {
                    Some(fd) => {
                        let socket = std::net::UdpSocket::from(fd);
                        socket.set_nonblocking(true).and_then(|()| UdpSocket::from_std(socket))
                    }
                    None => UdpSocket::bind(addr).await.inspect(|socket| {
                        if let Some(handover) = &self.handover {
                            handover.put(&key, socket);
                        }
                    }),
                }
                .map_err(|source| Error::listen(proto, addr, source))?;
                listener.tasks.push(tokio::spawn(serve_udp(
                    Arc::new(socket),
                    backends,
                    shared,
                    stats.clone(),
                )));
            }
        }
        tracing::info!(%proto, port, "serving published port");
        self.shared.ports.write().insert((proto, port), stats);
        self.listeners.insert((proto, port), listener);
        Ok(())
    }

    /// Stops serving `port`: new connections are refused at once and its UDP flows end;
    /// TCP connections already relayed run on for `grace` (until either side closes,
    /// or idles out), then are cut. Needs a tokio runtime for the grace timer.
    pub fn unpublish(&mut self, proto: Proto, port: u16, grace: Duration) -> bool {
        let Some(listener) = self.listeners.remove(&(proto, port)) else { return false };
        listener.abort();
        self.shared.ports.write().remove(&(proto, port));
        if let Some(handover) = &self.handover {
            handover.delete(&handover_prefix(proto, port));
        }
        tracing::info!(%proto, port, grace_ms = grace.as_millis() as u64, "stopped serving published port");
        if grace.is_zero() {
            listener.cut.send_replace(true);
        } else {
            let cut = listener.cut;
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                cut.send_replace(true);
            });
        }
        true
    }

    /// The ports served now.
    pub fn ports(&self) -> impl Iterator<Item = (Proto, u16)> + '_ {
        self.listeners.keys().copied()
    }

    /// What the proxy has done so far, over all ports.
    pub fn counters(&self) -> ProxyCounters {
        self.stats().counters()
    }

    /// A handle that reads the counters without going through the proxy's owner (whose
    /// lock may be held across a reconcile pass).
    pub fn stats(&self) -> ProxyStats {
        ProxyStats(self.shared.clone())
    }

    /// The ports served now with their backends and policies: the proxy's side of
    /// what the reconciler observes.
    pub fn served(&self) -> impl Iterator<Item = ((Proto, u16), ListenerSpec)> + '_ {
        self.listeners.iter().map(|(key, listener)| {
            let balancer = listener.backends.read().clone();
            let proxy_protocol = listener.proxy_protocol.load(Ordering::Relaxed);
            (
                *key,
                ListenerSpec {
                    policy: balancer.policy(),
                    backends: balancer.backends().to_vec(),
                    proxy_protocol,
                    max_connections: listener.stats.limit.load(Ordering::Relaxed),
                },
            )
        })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for listener in self.listeners.values() {
            listener.abort();
        }
    }
}

/// One worker's accept loop for a published port; every connection it accepts is relayed
/// on this worker.
async fn serve_tcp(
    listener: std::net::TcpListener,
    backends: Backends,
    proxy_protocol: Arc<AtomicBool>,
    shared: Arc<Shared>,
    stats: Arc<PortStats>,
    cut: watch::Receiver<bool>,
) {
    // Registered here, so with this worker's runtime.
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "cannot serve a published port on a proxy worker");
            return;
        }
    };
    let mut backoff = AcceptBackoff::default();
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff.succeeded();
                accepted
            }
            Err(error) => {
                // Out of descriptors or similar: back off instead of spinning.
                let wait = backoff.failed();
                if backoff.warn_now(std::time::Instant::now()) {
                    tracing::warn!(%error, "accept failed on a published port; backing off");
                } else {
                    tracing::debug!(%error, ?wait, "accept still failing");
                }
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let Some(port_slot) = stats.take() else {
            // At the port's own limit: a reset tells the client at once; the port's
            // established connections are not touched.
            bump(&shared.counters.tcp_refused_at_port_limit);
            bump(&stats.refused_at_limit);
            tracing::debug!(%peer, "port connection limit reached; resetting the new connection");
            let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
            drop(client);
            continue;
        };
        let Ok(slot) = shared.tcp_slots.clone().try_acquire_owned() else {
            // At the cap: closing now tells the client at once (it can try another
            // node), where leaving it in the backlog would stall it for an unknown time.
            bump(&shared.counters.tcp_refused_at_cap);
            tracing::debug!(%peer, "TCP connection cap reached; closing the new connection");
            drop(client);
            continue;
        };
        bump(&shared.counters.tcp_accepted);
        let balancer = backends.read().clone();
        // The address the client reached: this node's, on the published port.
        let header = proxy_protocol
            .load(Ordering::Relaxed)
            .then(|| client.local_addr().ok().map(|local| proxy_protocol::header(peer, local)))
            .flatten();
        let shared = shared.clone();
        let cut = cut.clone();
        tokio::spawn(async move {
            let _port_slot = port_slot;
            let relay = relay_tcp(client, peer, header, &balancer, &shared, slot);
            tokio::select! {
                result = relay => if let Err(error) = result {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                },
                // Unpublished and its grace is over: dropping the relay closes both sides.
                () = cut_signal(cut) => tracing::debug!(%peer, "connection cut: its port was unpublished"),
            }
        });
    }
}

/// Sets what every relayed TCP socket gets: no Nagle delay (the proxy must not add
/// latency to small writes), keepalive and the matching user timeout. Set on a listening
/// socket, the connections it accepts inherit all of it (Linux clones the listener's
/// options into each accepted socket, and starts its keepalive timer).
pub fn configure_relayed_socket(socket: &impl AsFd, keepalive: Option<&Keepalive>) -> io::Result<()> {
    let sock = SockRef::from(socket);
    sock.set_tcp_nodelay(true)?;
    if let Some(k) = keepalive {
        sock.set_tcp_keepalive(
            &TcpKeepalive::new().with_time(k.idle).with_interval(k.interval).with_retries(k.retries),
        )?;
        sock.set_tcp_user_timeout(Some(k.dead_after()))?;
    }
    Ok(())
}

async fn relay_tcp(
    client: TcpStream,
    peer: SocketAddr,
    header: Option<Vec<u8>>,
    balancer: &Balancer,
    shared: &Shared,
    _slot: OwnedSemaphorePermit,
) -> io::Result<()> {
    let config = &shared.config;
    // The client's socket has its options from the listener (configure_relayed_socket
    // there): six setsockopt calls fewer per connection.
    for i in balancer.order(peer.ip()) {
        let backend = balancer.backend(i);
        // Counted from the connect on, so a slow connect already steers leastconn away.
        let _active = balancer.hold(i);
        let stats = balancer.stats(i);
        match timeout(config.tcp_connect_timeout, TcpStream::connect(backend)).await {
            Ok(Ok(mut upstream)) => {
                bump(&stats.connections);
                configure_relayed_socket(&upstream, config.tcp_keepalive.as_ref())?;
                if let Some(header) = &header {
                    upstream.write_all(header).await?;
                }
                return relay_streams(client, upstream, shared, stats).await;
            }
            Ok(Err(error)) => {
                bump(&stats.connect_errors);
                tracing::debug!(%backend, %error, "backend refused; trying the next")
            }
            Err(_) => {
                bump(&stats.connect_errors);
                tracing::debug!(%backend, "backend connect timed out; trying the next")
            }
        }
    }
    // No backend answered: a reset tells the client at once (a plain close would read
    // as an empty answer), so it can retry elsewhere.
    bump(&shared.counters.tcp_no_backend);
    SockRef::from(&client).set_linger(Some(Duration::ZERO))?;
    Ok(())
}

/// Relays both ways until either side closes, an error (a keepalive that found the
/// peer dead), or the idle timeout; dropping the streams closes both sides.
async fn relay_streams(
    mut client: TcpStream,
    mut upstream: TcpStream,
    shared: &Shared,
    stats: &BackendStats,
) -> io::Result<()> {
    let last_active = AtomicU64::new(shared.now_ms());
    let relay = relay::Relay::new(client.split(), upstream.split(), shared.config.bulk, |to_client, n| {
        last_active.store(shared.now_ms(), Ordering::Relaxed);
        let bytes = if to_client { &stats.bytes_to_client } else { &stats.bytes_to_backend };
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    });
    let Some(idle) = shared.config.tcp_idle_timeout else {
        return relay.await;
    };
    tokio::select! {
        result = relay => result,
        () = until_idle(&last_active, idle, shared) => {
            bump(&shared.counters.tcp_idle_closed);
            Ok(())
        }
    }
}

/// Resolves once `last_active` (ms since the proxy's epoch) is `idle` in the past.
async fn until_idle(last_active: &AtomicU64, idle: Duration, shared: &Shared) {
    loop {
        let deadline = shared.instant(last_active.load(Ordering::Relaxed)) + idle;
        if Instant::now() >= deadline {
            return;
        }
        sleep_until(deadline).await;
    }
}

/// One UDP flow: the client's datagrams go out of `upstream`, connected to the backend
/// chosen when the flow opened, and its replies come back from there.
struct UdpFlow {
    upstream: UdpSocket,
    /// When a datagram last passed in either direction (ms since the proxy's epoch).
    last_active: AtomicU64,
    /// Counts the flow on its backend (leastconn, p2c) while it lives.
    load: crate::lb::ActiveGuard,
    /// Its place under the port's limit.
    _port: PortSlot,
}

type UdpFlows = Arc<Mutex<HashMap<SocketAddr, Arc<UdpFlow>>>>;

async fn serve_udp(socket: Arc<UdpSocket>, backends: Backends, shared: Arc<Shared>, stats: Arc<PortStats>) {
    let flows: UdpFlows = Arc::default();
    // The reply tasks belong to this listener: aborting it (unpublish) ends them all,
    // which closes their sockets and frees their slots.
    let mut replies = JoinSet::new();
    // One buffer for the listener; replies use one per worker thread (REPLY_BUFFER).
    let mut buf = vec![0u8; DATAGRAM_MAX];
    loop {
        let (len, client) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                tracing::debug!(%error, "receiving on a published UDP port");
                continue;
            }
        };
        let now = shared.now_ms();
        // Stamped under the table's lock, so an expiry that checks under the same lock
        // never removes a flow this datagram is about to use.
        let existing =
            flows.lock().get(&client).inspect(|f| f.last_active.store(now, Ordering::Relaxed)).cloned();
        let flow = match existing {
            Some(flow) => flow,
            None => {
                let Some(port_slot) = stats.take() else {
                    bump(&shared.counters.udp_flows_refused);
                    bump(&stats.refused_at_limit);
                    continue;
                };
                let Some(slot) = shared.reserve_udp_flow() else {
                    bump(&shared.counters.udp_flows_refused);
                    continue;
                };
                let balancer = backends.read().clone();
                let Some(i) = balancer.order(client.ip()).next() else { continue };
                let backend = balancer.backend(i);
                let upstream = match open_udp_flow(backend) {
                    Ok(upstream) => upstream,
                    Err(error) => {
                        tracing::debug!(%backend, %error, "cannot open UDP flow");
                        continue;
                    }
                };
                bump(&balancer.stats(i).connections);
                let flow = Arc::new(UdpFlow {
                    upstream,
                    last_active: AtomicU64::new(now),
                    load: balancer.hold(i),
                    _port: port_slot,
                });
                flows.lock().insert(client, flow.clone());
                bump(&shared.counters.udp_flows_opened);
                // Reap finished reply tasks only when one is added (not per datagram):
                // the set stays below twice the flow cap.
                while replies.try_join_next().is_some() {}
                replies.spawn(relay_udp_replies(
                    socket.clone(),
                    flow.clone(),
                    client,
                    flows.clone(),
                    shared.clone(),
                    slot,
                ));
                flow
            }
        };
        if flow.upstream.send(&buf[..len]).await.is_ok() {
            flow.load.stats().bytes_to_backend.fetch_add(len as u64, Ordering::Relaxed);
        }
    }
}

fn open_udp_flow(backend: SocketAddr) -> io::Result<UdpSocket> {
    let upstream = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    upstream.connect(backend)?;
    upstream.set_nonblocking(true)?;
    UdpSocket::from_std(upstream)
}

thread_local! {
    /// The receive buffer of every UDP flow's replies on this worker thread: a reply is
    /// read and sent on without an await in between, so flows can share it instead of
    /// holding 64 KiB each.
    static REPLY_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; DATAGRAM_MAX].into_boxed_slice());
}

/// Relays the backend's replies to `client` until the flow has been silent both ways
/// for the idle timeout; then removes it, which closes its socket.
async fn relay_udp_replies(
    socket: Arc<UdpSocket>,
    flow: Arc<UdpFlow>,
    client: SocketAddr,
    flows: UdpFlows,
    shared: Arc<Shared>,
    _slot: UdpFlowSlot,
) {
    let idle = shared.config.udp_idle_timeout;
    loop {
        let deadline = shared.instant(flow.last_active.load(Ordering::Relaxed)) + idle;
        tokio::select! {
            ready = flow.upstream.readable() => {
                if ready.is_err() {
                    break;
                }
                let bytes = relay_ready_replies(&socket, &flow.upstream, client);
                if bytes > 0 {
                    flow.load.stats().bytes_to_client.fetch_add(bytes, Ordering::Relaxed);
                    flow.last_active.store(shared.now_ms(), Ordering::Relaxed);
                }
            }
            () = sleep_until(deadline) => {
                let mut table = flows.lock();
                let last = shared.instant(flow.last_active.load(Ordering::Relaxed));
                if Instant::now() >= last + idle {
                    table.remove(&client);
                    bump(&shared.counters.udp_flows_expired);
                    break;
                }
            }
        }
    }
}

/// Sends every reply waiting on `upstream` to `client`, without blocking; returns
/// how many bytes it sent. A reply the listener cannot send at once is dropped, as the
/// network may drop any datagram.
fn relay_ready_replies(socket: &UdpSocket, upstream: &UdpSocket, client: SocketAddr) -> u64 {
    REPLY_BUFFER.with_borrow_mut(|buf| {
        let mut sent = 0;
        let mut errors = 0;
        loop {
            match upstream.try_recv(buf) {
                Ok(len) => {
                    if socket.try_send_to(&buf[..len], client).is_ok() {
                        sent += len as u64;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return sent,
                // An ICMP error from the backend (port unreachable) surfaces here once;
                // the flow stays, its next datagram may find the backend back. Bounded,
                // so an error that does not clear cannot spin this task.
                Err(_) if errors < 8 => errors += 1,
                Err(_) => return sent,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        sync::mpsc,
    };

    use super::*;

    async fn named_server(name: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.write_all(name.as_bytes()).await;
            }
        });
        addr
    }

    /// A TCP server that echoes every connection until the client closes.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port()
    }

    async fn free_udp_port() -> u16 {
        UdpSocket::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port()
    }

    async fn fetch(port: u16) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// Sends `msg` and reads the echo back (5 s at most).
    async fn echo_round_trip(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
        s.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        timeout(Duration::from_secs(5), s.read_exact(&mut back)).await.map_err(io::Error::other)??;
        assert_eq!(back, msg);
        Ok(())
    }

    /// Waits (2 s at most) until `s` is closed by the other side: EOF or reset.
    async fn closed_by_peer(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 16];
        matches!(timeout(Duration::from_secs(2), s.read(&mut b)).await, Ok(Ok(0) | Err(_)))
    }

    async fn wait_for(proxy: &Proxy, what: &str, ok: impl Fn(&ProxyCounters) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ok(&proxy.counters()) {
            assert!(Instant::now() < deadline, "{what}: counters {:?}", proxy.counters());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A UDP backend that never answers and reports the source of every datagram.
    async fn recording_udp_backend() -> (SocketAddr, mpsc::UnboundedReceiver<(SocketAddr, Vec<u8>)>) {
        let sink = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sink.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            while let Ok((n, from)) = sink.recv_from(&mut buf).await {
                if tx.send((from, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        });
        (addr, rx)
    }

    async fn next_datagram(rx: &mut mpsc::UnboundedReceiver<(SocketAddr, Vec<u8>)>) -> (SocketAddr, Vec<u8>) {
        timeout(Duration::from_secs(5), rx.recv()).await.expect("the backend got no datagram").unwrap()
    }

    async fn udp_client(port: u16) -> UdpSocket {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(("127.0.0.1", port)).await.unwrap();
        client
    }

    fn quick(config: ProxyConfig) -> Proxy {
        config.validate().unwrap();
        Proxy::new(config)
    }

    #[tokio::test]
    async fn relays_round_robin_and_skips_a_dead_backend() {
        let a = named_server("a").await;
        let b = named_server("b").await;
        let dead = SocketAddr::from(([127, 0, 0, 1], free_port().await));
        let port = free_port().await;
        let mut proxy = Proxy::default();
        proxy.publish(Proto::Tcp, port, vec![a, dead, b]).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(fetch(port).await);
        }
        assert!(seen.iter().all(|s| s == "a" || s == "b"), "{seen:?}");
        assert!(seen.contains(&"a".into()) && seen.contains(&"b".into()), "{seen:?}");
    }

    #[tokio::test]
    async fn unpublish_lets_relayed_connections_run_for_the_grace_then_cuts_them() {
        let echo = echo_server().await;
        let port = free_port().await;
        let mut proxy = Proxy::default();
        proxy.publish(Proto::Tcp, port, vec![echo]).await.unwrap();
        let mut relayed = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        echo_round_trip(&mut relayed, b"before").await.unwrap();
        let grace = Duration::from_millis(500);
        let cut_at = Instant::now() + grace;
        assert!(proxy.unpublish(Proto::Tcp, port, grace));
        // During the grace: refused for newcomers (once the aborted accept loops are
        // gone), relayed for the one already in.
        while TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            assert!(Instant::now() < cut_at, "port still accepts");
            tokio::task::yield_now().await;
        }
        echo_round_trip(&mut relayed, b"during").await.unwrap();
        assert!(Instant::now() < cut_at, "the check ran past the grace; lengthen it");
        // At its end: cut (the proxy closes its side; the client reads the end).
        let mut buf = [0u8; 16];
        let read = timeout(Duration::from_secs(5), relayed.read(&mut buf)).await.expect("not cut within 5 s");
        assert!(Instant::now() >= cut_at, "cut before the grace ended");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    #[tokio::test]
    async fn unpublish_refuses_new_connections() {
        let a = named_server("a").await;
        let port = free_port().await;
        let mut proxy = Proxy::default();
        proxy.publish(Proto::Tcp, port, vec![a]).await.unwrap();
        assert_eq!(fetch(port).await, "a");
        assert!(proxy.unpublish(Proto::Tcp, port, Duration::ZERO));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "port still accepts");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_taken_port_is_a_bind_error() {
        let held = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = held.local_addr().unwrap().port();
        let err = Proxy::default().publish(Proto::Tcp, port, vec![]).await.unwrap_err();
        assert!(matches!(err, Error::Listen { .. }), "{err}");
        // This test process holds it, and the message says so.
        let me = format!("(pid {})", std::process::id());
        assert!(err.to_string().contains("held by ") && err.to_string().contains(&me), "{err}");
    }

    #[tokio::test]
    async fn relays_udp_both_ways() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        let port = free_udp_port().await;
        let mut proxy = Proxy::default();
        proxy.publish(Proto::Udp, port, vec![echo_addr]).await.unwrap();
        let client = udp_client(port).await;
        client.send(b"ping").await.unwrap();
        let mut buf = [0u8; 64];
        let n = timeout(Duration::from_secs(5), client.recv(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf[..n], b"ping");
    }

    #[tokio::test]
    async fn a_one_way_udp_flow_outlives_the_idle_timeout_while_the_client_sends() {
        let (backend, mut seen) = recording_udp_backend().await;
        let idle = Duration::from_millis(300);
        let port = free_udp_port().await;
        let mut proxy = quick(ProxyConfig { udp_idle_timeout: idle, ..ProxyConfig::default() });
        proxy.publish(Proto::Udp, port, vec![backend]).await.unwrap();
        let client = udp_client(port).await;
        // Four idle timeouts' worth of datagrams, one every 50 ms, never a reply.
        let mut sources = BTreeSet::new();
        for i in 0..24u8 {
            client.send(&[i]).await.unwrap();
            let (from, data) = next_datagram(&mut seen).await;
            assert_eq!(data, [i]);
            sources.insert(from);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(sources.len(), 1, "the flow was cut and reopened: {sources:?}");
        let c = proxy.counters();
        assert_eq!((c.udp_flows_opened, c.udp_flows_expired, c.udp_flows_active), (1, 0, 1), "{c:?}");
        // Silent both ways: it expires, its socket closes and its slot is free again.
        wait_for(&proxy, "the silent flow expires", |c| c.udp_flows_expired == 1 && c.udp_flows_active == 0)
            .await;
        client.send(b"again").await.unwrap();
        let (from, _) = next_datagram(&mut seen).await;
        assert!(!sources.contains(&from), "a new flow uses a new socket");
    }

    #[tokio::test]
    async fn udp_flows_beyond_the_cap_are_dropped_and_counted_without_evicting_others() {
        let (backend, mut seen) = recording_udp_backend().await;
        let port = free_udp_port().await;
        let mut proxy = quick(ProxyConfig { udp_max_flows: 2, ..ProxyConfig::default() });
        proxy.publish(Proto::Udp, port, vec![backend]).await.unwrap();
        let clients = [udp_client(port).await, udp_client(port).await, udp_client(port).await];
        for (i, client) in clients[..2].iter().enumerate() {
            client.send(&[i as u8]).await.unwrap();
            assert_eq!(next_datagram(&mut seen).await.1, [i as u8]);
        }
        clients[2].send(b"third").await.unwrap();
        wait_for(&proxy, "the third flow is refused", |c| c.udp_flows_refused == 1).await;
        // The flows that exist still pass; the refused datagram never reached the backend.
        clients[0].send(b"first again").await.unwrap();
        assert_eq!(next_datagram(&mut seen).await.1, b"first again");
        let c = proxy.counters();
        assert_eq!((c.udp_flows_opened, c.udp_flows_active), (2, 2), "{c:?}");
    }

    #[tokio::test]
    async fn tcp_connections_beyond_the_cap_are_closed_at_once_and_counted() {
        let echo = echo_server().await;
        let port = free_port().await;
        let mut proxy = quick(ProxyConfig { tcp_max_connections: 2, ..ProxyConfig::default() });
        proxy.publish(Proto::Tcp, port, vec![echo]).await.unwrap();
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            echo_round_trip(&mut s, b"hello").await.unwrap();
            held.push(s);
        }
        let mut third = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let _ = third.write_all(b"hello").await;
        assert!(closed_by_peer(&mut third).await, "the third connection was not closed");
        let c = proxy.counters();
        assert_eq!((c.tcp_active, c.tcp_refused_at_cap, c.tcp_accepted), (2, 1, 2), "{c:?}");
        // A slot frees when a connection ends: the next one is relayed.
        drop(held.pop());
        wait_for(&proxy, "a slot frees", |c| c.tcp_active == 1).await;
        let mut next = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        echo_round_trip(&mut next, b"served").await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_tcp_connection_is_closed_after_the_timeout_and_a_busy_one_is_not() {
        let echo = echo_server().await;
        let port = free_port().await;
        let idle = Duration::from_millis(400);
        let mut proxy = quick(ProxyConfig { tcp_idle_timeout: Some(idle), ..ProxyConfig::default() });
        proxy.publish(Proto::Tcp, port, vec![echo]).await.unwrap();
        let mut quiet = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        echo_round_trip(&mut quiet, b"once").await.unwrap();
        let mut busy = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let started = Instant::now();
        // The busy one talks every 100 ms for three idle timeouts.
        while started.elapsed() < idle * 3 {
            echo_round_trip(&mut busy, b"tick").await.expect("the busy connection was cut");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(closed_by_peer(&mut quiet).await, "the idle connection is still open");
        assert_eq!(proxy.counters().tcp_idle_closed, 1, "{:?}", proxy.counters());
        echo_round_trip(&mut busy, b"still").await.unwrap();
    }

    #[tokio::test]
    async fn relayed_sockets_get_keepalive_and_a_user_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let k = Keepalive { idle: Duration::from_secs(7), interval: Duration::from_secs(3), retries: 4 };
        configure_relayed_socket(&stream, Some(&k)).unwrap();
        let sock = SockRef::from(&stream);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), k.idle);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), k.interval);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(Duration::from_secs(19)));
        assert!(sock.tcp_nodelay().unwrap());
    }

    /// The bytes of a bulk transfer: a pattern that a lost, repeated or reordered chunk
    /// would break.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ (i >> 16) as u8).collect()
    }

    /// Sends `len` patterned bytes through an echo relayed by a proxy in `mode`, reading
    /// the echo slowly (so the relay must hold what the client's socket cannot take yet),
    /// shuts down the client's write side and checks that every byte came back in order
    /// and then an orderly EOF.
    async fn bulk_echo_through(mode: BulkMode, len: usize) {
        let echo = echo_server().await;
        let port = free_port().await;
        let mut proxy = quick(ProxyConfig { bulk: mode, ..ProxyConfig::default() });
        proxy.publish(Proto::Tcp, port, vec![echo]).await.unwrap();
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (mut r, mut w) = stream.into_split();
        let sent = pattern(len);
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            // Half-close: the echo must still come back whole.
            w.shutdown().await.unwrap();
            w
        });
        let mut got = Vec::with_capacity(len);
        let mut chunk = vec![0u8; 7919];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n =
                timeout(deadline - Instant::now(), r.read(&mut chunk)).await.expect("echo stalled").unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            if got.len() % (1 << 20) < n {
                // A slow reader now and then, so the relay's destination fills.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _w = writer.await.unwrap();
        assert_eq!(got.len(), len, "{mode:?}: bytes came back");
        assert!(got == pattern(len), "{mode:?}: the echo differs from what was sent");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_flows_arrive_whole_and_in_order_when_spliced() {
        bulk_echo_through(BulkMode::Splice, 24 << 20).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_flows_arrive_whole_and_in_order_when_copied() {
        bulk_echo_through(BulkMode::Copy, 24 << 20).await;
    }

    #[tokio::test]
    async fn a_request_and_response_smaller_than_a_buffer_are_relayed_after_half_close() {
        let echo = echo_server().await;
        let port = free_port().await;
        let mut proxy = Proxy::default();
        proxy.publish(Proto::Tcp, port, vec![echo]).await.unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        timeout(Duration::from_secs(5), s.read_to_end(&mut back)).await.unwrap().unwrap();
        assert_eq!(back, b"GET / HTTP/1.0\r\n\r\n");
    }

    /// Listening sockets of this network namespace on `port`, from /proc/net/tcp.
    fn listeners_on(port: u16) -> usize {
        let table = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
        let local = format!(":{port:04X}");
        table
            .lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(&local) && f[3] == "0A"
            })
            .count()
    }

    /// The timer column (`tr:when`) of the socket `local_port` ↔ `remote_port` in this
    /// namespace's /proc/net/tcp, if it is established.
    fn established_timer(local_port: u16, remote_port: u16) -> Option<String> {
        let table = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
        let (local, remote) = (format!(":{local_port:04X}"), format!(":{remote_port:04X}"));
        table.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 5 && f[1].ends_with(&local) && f[2].ends_with(&remote) && f[3] == "01")
                .then(|| f[5].to_owned())
        })
    }

    #[tokio::test]
    async fn the_proxys_side_of_a_client_connection_has_its_keepalive_timer_armed() {
        let echo = echo_server().await;
        let port = free_port().await;
        let mut proxy = Proxy::default();
        proxy.publish(Proto::Tcp, port, vec![echo]).await.unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        echo_round_trip(&mut s, b"hello").await.unwrap();
        let client_port = s.local_addr().unwrap().port();
        let timer = established_timer(port, client_port).expect("the proxy's side of the connection");
        // 02: the keepalive timer (sk_timer) is pending — inherited from the listener, as
        // the proxy no longer sets it on each accepted socket.
        assert!(timer.starts_with("02:"), "timer {timer}: no keepalive on the accepted socket");
    }

    #[tokio::test]
    async fn every_worker_listens_on_a_published_port_and_all_go_with_unpublish() {
        let a = named_server("a").await;
        let port = free_port().await;
        let mut proxy = quick(ProxyConfig { workers: 3, ..ProxyConfig::default() });
        proxy.publish(Proto::Tcp, port, vec![a]).await.unwrap();
        assert_eq!(listeners_on(port), 3, "one listener per worker");
        // Whichever listener the kernel picks, the connection is relayed.
        for _ in 0..12 {
            assert_eq!(fetch(port).await, "a");
        }
        assert!(proxy.unpublish(Proto::Tcp, port, Duration::ZERO));
        let deadline = Instant::now() + Duration::from_secs(2);
        while listeners_on(port) > 0 {
            assert!(Instant::now() < deadline, "{} listeners left after unpublish", listeners_on(port));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn workers_sharing_one_runtime_listen_and_relay_as_well() {
        let echo = echo_server().await;
        let port = free_port().await;
        let mut proxy = quick(ProxyConfig { workers: 2, per_core: false, ..ProxyConfig::default() });
        proxy.publish(Proto::Tcp, port, vec![echo]).await.unwrap();
        assert_eq!(listeners_on(port), 2, "one listener per worker");
        for _ in 0..8 {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            echo_round_trip(&mut s, b"shared").await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_port_held_by_another_program_fails_on_every_worker_and_leaves_nothing() {
        let held = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let mut proxy = quick(ProxyConfig { workers: 2, ..ProxyConfig::default() });
        let err = proxy.publish(Proto::Tcp, port, vec![]).await.unwrap_err();
        assert!(matches!(err, Error::Listen { .. }), "{err}");
        assert_eq!(proxy.ports().count(), 0);
        assert_eq!(listeners_on(port), 1, "only the holder listens");
    }

    #[tokio::test]
    async fn a_published_ports_accepted_sockets_have_the_relay_options() {
        // What the proxy relies on to skip configuring each accepted socket: they inherit
        // the listener's options.
        let k = Keepalive { idle: Duration::from_secs(7), interval: Duration::from_secs(3), retries: 4 };
        let listener = workers::reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        configure_relayed_socket(&listener, Some(&k)).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let sock = SockRef::from(&accepted);
        assert!(sock.tcp_nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), k.idle);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), k.interval);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(Duration::from_secs(19)));
    }

    #[test]
    fn the_default_keepalive_finds_a_dead_peer_within_a_minute() {
        let k = ProxyConfig::default().tcp_keepalive.unwrap();
        assert_eq!(k.dead_after(), Duration::from_secs(60));
    }

    #[test]
    fn config_out_of_range_names_the_flag() {
        assert!(ProxyConfig::default().validate().is_ok());
        let cases = [
            (ProxyConfig { tcp_max_connections: 0, ..Default::default() }, "--proxy-tcp-max-connections"),
            (ProxyConfig { udp_max_flows: 0, ..Default::default() }, "--proxy-udp-max-flows"),
            (ProxyConfig { workers: 300, ..Default::default() }, "--proxy-workers"),
            (ProxyConfig { udp_idle_timeout: Duration::ZERO, ..Default::default() }, "--proxy-udp-idle"),
            (
                ProxyConfig { tcp_idle_timeout: Some(Duration::ZERO), ..Default::default() },
                "--proxy-tcp-idle",
            ),
            (
                ProxyConfig {
                    tcp_keepalive: Some(Keepalive {
                        idle: Duration::from_secs(1),
                        interval: Duration::ZERO,
                        retries: 1,
                    }),
                    ..Default::default()
                },
                "--proxy-tcp-keepalive",
            ),
        ];
        for (config, flag) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.starts_with(&format!("invalid {flag}")), "{err}");
        }
    }

    #[test]
    fn fd_budget_counts_two_per_tcp_connection_one_per_udp_flow_and_two_per_pipe() {
        let config = ProxyConfig {
            tcp_max_connections: 100,
            udp_max_flows: 7,
            bulk: BulkMode::Copy,
            ..Default::default()
        };
        assert_eq!(config.max_fds(), 207);
        let splicing = ProxyConfig { workers: 3, bulk: BulkMode::Splice, ..config };
        assert_eq!(splicing.max_fds(), 207 + 2 * 3 * PIPES_PER_THREAD as u64);
    }
}
