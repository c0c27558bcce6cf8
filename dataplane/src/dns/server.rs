//! The resolver's I/O shell: sockets opened inside a container's network namespace, a
//! UDP loop and a TCP accept loop around [`answer`], and the forwarder that asks the
//! upstreams for names outside the table. Every client-driven resource is bounded:
//! concurrent forwards (REFUSED beyond), TCP clients (closed beyond), a TCP client's
//! silence (cut after a timeout), each upstream attempt (timeout, then the next one).

use std::{
    collections::HashMap,
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{oneshot, Semaphore},
    task::{JoinHandle, JoinSet},
    time::timeout,
};

use super::{
    answer::{answer, relay_reply, Action, AnswerConfig, Forward, Transport},
    table::{NameIndex, NameTable},
};
use crate::{Error, Result};

/// Where the embedded resolver listens inside every container namespace (Docker's
/// address; on Linux all of 127.0.0.0/8 is local on `lo` once `lo` is up).
pub const RESOLVER_ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 11), 53);

/// Settings of one resolver (the same for every namespace in practice).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolverConfig {
    /// How requests are answered (TTL, search suffixes, request size, hop bound).
    pub answer: AnswerConfig,
    /// Upstream resolvers for names outside the table, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// How long one upstream gets before the next is tried.
    pub upstream_timeout: Duration,
    /// Forwards in flight at once; a request beyond gets REFUSED right away.
    pub max_forwards: usize,
    /// TCP clients served at once; one beyond is closed right after accept.
    pub max_tcp_clients: usize,
    /// How long a TCP client may stay silent (or stall mid-message) before it is cut.
    pub tcp_idle_timeout: Duration,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            answer: AnswerConfig::default(),
            upstreams: Vec::new(),
            upstream_timeout: Duration::from_secs(2),
            max_forwards: 256,
            max_tcp_clients: 64,
            tcp_idle_timeout: Duration::from_secs(5),
        }
    }
}

impl ResolverConfig {
    /// Checks the bounds are usable.
    pub fn validate(&self) -> Result<()> {
        let bad = |setting, message: &str| Err(Error::Config { setting, message: message.to_owned() });
        if self.answer.max_request < 512 || self.answer.max_request > usize::from(u16::MAX) {
            return bad("dns max request", "must be 512 to 65535 bytes");
        }
        if self.max_forwards == 0 || self.max_forwards > 32_768 {
            return bad("dns max forwards", "must be 1 to 32768 (message ids are 16 bits)");
        }
        if self.max_tcp_clients == 0 {
            return bad("dns max tcp clients", "must be at least 1");
        }
        if self.upstream_timeout.is_zero() || self.tcp_idle_timeout.is_zero() {
            return bad("dns timeouts", "must be positive");
        }
        Ok(())
    }
}

/// The upstreams worth asking from a resolver listening on `listen`: the list without
/// `listen` itself (a resolv.conf naming 127.0.0.11 would send every forward back to
/// us) and without duplicates.
pub fn usable_upstreams(upstreams: &[SocketAddr], listen: SocketAddr) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for u in upstreams {
        if *u != listen && !out.contains(u) {
            out.push(*u);
        }
    }
    out
}

/// The name table every resolver of this process reads; updated atomically (a query
/// sees the old or the new table whole).
#[derive(Clone, Debug, Default)]
pub struct TableHandle(Arc<ArcSwap<NameIndex>>);

impl TableHandle {
    /// A handle serving `table`.
    pub fn new(table: &NameTable) -> TableHandle {
        TableHandle(Arc::new(ArcSwap::from_pointee(NameIndex::build(table))))
    }

    /// Replaces the table; the next query anywhere sees it.
    pub fn update(&self, table: &NameTable) {
        self.0.store(Arc::new(NameIndex::build(table)));
    }
}

/// Sockets of one resolver, created in a container's namespace.
#[derive(Debug)]
pub struct ResolverSockets {
    /// `127.0.0.11:53` UDP.
    pub udp: std::net::UdpSocket,
    /// `127.0.0.11:53` TCP.
    pub tcp: std::net::TcpListener,
    /// An ephemeral UDP socket the forwarder asks upstreams from.
    pub forward: std::net::UdpSocket,
    /// The namespace the forwarder's sockets live in (TCP forwards open theirs there).
    pub forward_netns: PathBuf,
}

/// Opens the resolver's sockets inside the namespace at `netns` (a `/run/netns/NAME`
/// or `/proc/PID/ns/net` path): listening on `listen` (normally [`RESOLVER_ADDR`]),
/// and a forwarding socket in `forward_netns` (the container's namespace when `None`;
/// meshd's own, e.g. `/proc/self/ns/net`, when the upstreams are the node's loopback
/// resolvers). The calling thread is untouched: a short-lived thread enters the
/// namespace, binds, and hands the sockets back.
pub fn open_in_netns(
    netns: &Path,
    listen: SocketAddrV4,
    forward_netns: Option<&Path>,
) -> Result<ResolverSockets> {
    for path in [Some(netns), forward_netns].into_iter().flatten() {
        if !path.exists() {
            return Err(Error::NoNetns { path: path.to_owned() });
        }
    }
    let (udp, tcp) = in_netns(netns, move || {
        let udp = std::net::UdpSocket::bind(listen)?;
        let tcp = std::net::TcpListener::bind(listen)?;
        Ok((udp, tcp))
    })
    .map_err(|source| Error::Bind { addr: listen.into(), source })?;
    let forward_ns = forward_netns.unwrap_or(netns);
    let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
    let forward = in_netns(forward_ns, move || std::net::UdpSocket::bind(any))
        .map_err(|source| Error::Bind { addr: any.into(), source })?;
    for s in [&udp, &forward] {
        s.set_nonblocking(true).map_err(|source| Error::Bind { addr: listen.into(), source })?;
    }
    tcp.set_nonblocking(true).map_err(|source| Error::Bind { addr: listen.into(), source })?;
    Ok(ResolverSockets { udp, tcp, forward, forward_netns: forward_ns.to_owned() })
}

/// The resolver's sockets from listening sockets a previous meshd opened (handed over
/// by the listener keeper: queries that arrived meanwhile wait in them), with a new
/// forwarding socket in `forward_netns`.
pub fn adopt_sockets(
    udp: std::os::fd::OwnedFd,
    tcp: std::os::fd::OwnedFd,
    forward_netns: &Path,
) -> Result<ResolverSockets> {
    let (udp, tcp) = (std::net::UdpSocket::from(udp), std::net::TcpListener::from(tcp));
    let listen = udp.local_addr().map_err(|source| Error::Bind { addr: RESOLVER_ADDR.into(), source })?;
    let wrap = |source| Error::Bind { addr: listen, source };
    let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
    let forward = in_netns(forward_netns, move || std::net::UdpSocket::bind(any))
        .map_err(|source| Error::Bind { addr: any.into(), source })?;
    for s in [&udp, &forward] {
        s.set_nonblocking(true).map_err(wrap)?;
    }
    tcp.set_nonblocking(true).map_err(wrap)?;
    Ok(ResolverSockets { udp, tcp, forward, forward_netns: forward_netns.to_owned() })
}

/// Whether the namespace at `netns` is the one this process runs in.
fn same_netns(netns: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (fs::metadata(netns), fs::metadata("/proc/self/ns/net")) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// [`crate::netns::run_in`] for socket work whose errors are I/O errors.
fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> std::io::Result<T> + Send) -> std::io::Result<T> {
    crate::netns::run_in(netns, f).map_err(|e| std::io::Error::other(e.to_string()))?
}

/// One running resolver (one container namespace). Dropping it, or [`Resolver::shutdown`],
/// stops its loops and closes its sockets.
#[derive(Debug)]
pub struct Resolver {
    networks: Arc<ArcSwap<Vec<String>>>,
    tasks: Vec<JoinHandle<()>>,
    /// The namespace served, for logs.
    netns: PathBuf,
}

impl Resolver {
    /// Serves `sockets` (from [`open_in_netns`]) for a container on `networks`,
    /// answering from `table`. Must be called inside a tokio runtime.
    pub fn start(
        netns: &Path,
        sockets: ResolverSockets,
        table: TableHandle,
        networks: Vec<String>,
        config: ResolverConfig,
    ) -> Result<Resolver> {
        config.validate()?;
        let listen =
            sockets.udp.local_addr().map_err(|source| Error::Bind { addr: RESOLVER_ADDR.into(), source })?;
        let wrap = |source| Error::Bind { addr: listen, source };
        let udp = Arc::new(UdpSocket::from_std(sockets.udp).map_err(wrap)?);
        let tcp = TcpListener::from_std(sockets.tcp).map_err(wrap)?;
        let forward = Arc::new(UdpSocket::from_std(sockets.forward).map_err(wrap)?);
        let mut config = config;
        config.upstreams = usable_upstreams(&config.upstreams, listen);
        let shared = Arc::new(Shared {
            table,
            networks: Arc::new(ArcSwap::from_pointee(networks)),
            forwarder: Forwarder {
                socket: forward,
                netns: sockets.forward_netns,
                pending: Mutex::new(HashMap::new()),
                permits: Semaphore::new(config.max_forwards),
            },
            tcp_permits: Arc::new(Semaphore::new(config.max_tcp_clients)),
            config,
        });
        let tasks = vec![
            tokio::spawn(udp_loop(udp, shared.clone())),
            tokio::spawn(tcp_loop(tcp, shared.clone())),
            tokio::spawn(forward_receive_loop(shared.clone())),
        ];
        Ok(Resolver { networks: shared.networks.clone(), tasks, netns: netns.to_owned() })
    }

    /// Changes the networks the container is on (which names it may see).
    pub fn set_networks(&self, networks: Vec<String>) {
        self.networks.store(Arc::new(networks));
    }

    /// The namespace this resolver serves.
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// Stops serving and closes the sockets.
    pub async fn shutdown(mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct Shared {
    table: TableHandle,
    networks: Arc<ArcSwap<Vec<String>>>,
    forwarder: Forwarder,
    tcp_permits: Arc<Semaphore>,
    config: ResolverConfig,
}

impl Shared {
    fn decide(&self, request: &[u8], transport: Transport, rng: &mut SmallRng) -> Action {
        let index = self.table.0.load();
        let networks = self.networks.load();
        answer(&index, &networks, request, transport, &self.config.answer, rng)
    }
}

async fn udp_loop(socket: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut rng = SmallRng::from_entropy();
    // One byte over the bound, so a longer request is seen as too long (FORMERR).
    let mut buf = vec![0u8; shared.config.answer.max_request + 1];
    // Forwards in flight belong to this loop: aborting it (shutdown) aborts them, so no
    // socket of the namespace outlives the resolver.
    let mut forwards = JoinSet::new();
    loop {
        while forwards.try_join_next().is_some() {}
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            // ICMP errors from earlier sends surface here; the socket itself is fine.
            Err(_) => continue,
        };
        match shared.decide(&buf[..len], Transport::Udp, &mut rng) {
            Action::Reply(bytes) => {
                let _ = socket.send_to(&bytes, peer).await;
            }
            Action::Drop => {}
            Action::Forward(forward) => {
                let (socket, shared) = (socket.clone(), shared.clone());
                forwards.spawn(async move {
                    let bytes = shared.forwarder.forward(&forward, &shared.config, Transport::Udp).await;
                    let _ = socket.send_to(&bytes, peer).await;
                });
            }
        }
    }
}

async fn tcp_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Connections belong to this loop, like the UDP loop's forwards.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            // Descriptor exhaustion and the like: wait a little rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = shared.tcp_permits.clone().try_acquire_owned() else {
            drop(stream); // over the cap: closed at once
            continue;
        };
        let shared = shared.clone();
        connections.spawn(async move {
            let _ = serve_tcp(stream, &shared).await;
            drop(permit);
        });
    }
}

async fn serve_tcp(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut rng = SmallRng::from_entropy();
    let idle = shared.config.tcp_idle_timeout;
    loop {
        let mut len = [0u8; 2];
        // One timeout covers the prefix and the body: a client that sends a length and
        // stalls is cut like one that sends nothing.
        let request = timeout(idle, async {
            stream.read_exact(&mut len).await?;
            let len = usize::from(u16::from_be_bytes(len));
            if len < 12 || len > shared.config.answer.max_request {
                return Err(std::io::Error::other("bad length"));
            }
            let mut body = vec![0u8; len];
            stream.read_exact(&mut body).await?;
            Ok(body)
        })
        .await
        .map_err(|_| std::io::Error::other("idle"))??;
        let reply = match shared.decide(&request, Transport::Tcp, &mut rng) {
            Action::Reply(bytes) => bytes,
            Action::Drop => return Ok(()),
            Action::Forward(forward) => {
                shared.forwarder.forward(&forward, &shared.config, Transport::Tcp).await
            }
        };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&u16::try_from(reply.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&reply);
        timeout(idle, stream.write_all(&out)).await.map_err(|_| std::io::Error::other("idle"))??;
    }
}

/// Forwards waiting for a reply: our message id → (the upstream asked, the waiter).
type Pending = HashMap<u16, (SocketAddr, oneshot::Sender<Vec<u8>>)>;

/// Asks upstreams over one UDP socket, matching replies by (upstream, message id), or
/// over a fresh TCP connection per question for a TCP client.
struct Forwarder {
    socket: Arc<UdpSocket>,
    /// Where TCP forwards open their sockets (the UDP socket was opened there too).
    netns: PathBuf,
    pending: Mutex<Pending>,
    permits: Semaphore,
}

impl Forwarder {
    /// The client's reply for `forward`: an upstream's answer, SERVFAIL when all fail
    /// or time out, REFUSED when too many forwards are in flight. A TCP client's
    /// question goes upstream over TCP (the answer may be larger than any datagram); a
    /// UDP client's over UDP, and a truncated answer reaches it with TC set, so it
    /// retries over TCP itself. Both share the bound on forwards in flight and the
    /// per-upstream timeout.
    async fn forward(&self, forward: &Forward, config: &ResolverConfig, transport: Transport) -> Vec<u8> {
        let Ok(_permit) = self.permits.try_acquire() else { return forward.refused.clone() };
        let mut query = forward.query.clone();
        for upstream in &config.upstreams {
            if transport == Transport::Tcp {
                let id: u16 = rand::thread_rng().gen();
                query[..2].copy_from_slice(&id.to_be_bytes());
                let asked = timeout(config.upstream_timeout, self.ask_tcp(*upstream, &query)).await;
                if let Ok(Ok(reply)) = asked {
                    let matches = reply.get(..2) == Some(&id.to_be_bytes()[..]);
                    if matches && !is_servfail(&reply) {
                        if let Some(bytes) = relay_reply(forward, &reply) {
                            return bytes;
                        }
                    }
                }
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let id = {
                let mut pending = self.pending.lock();
                // A fresh random id per attempt: replies are matched on it, and an
                // off-path spoofer must guess it.
                let mut rng = rand::thread_rng();
                let mut id: u16 = rng.gen();
                while pending.contains_key(&id) {
                    id = rng.gen();
                }
                pending.insert(id, (*upstream, tx));
                id
            };
            query[..2].copy_from_slice(&id.to_be_bytes());
            let outcome = match self.socket.send_to(&query, upstream).await {
                Ok(_) => timeout(config.upstream_timeout, rx).await.ok().and_then(|r| r.ok()),
                Err(_) => None,
            };
            self.pending.lock().remove(&id);
            if let Some(reply) = outcome {
                // An upstream's own SERVFAIL means "try another"; anything else is the answer.
                if !is_servfail(&reply) {
                    if let Some(bytes) = relay_reply(forward, &reply) {
                        return bytes;
                    }
                }
            }
        }
        forward.servfail.clone()
    }

    /// One question to `upstream` over a new TCP connection from the forwarder's
    /// namespace; the caller bounds the whole exchange in time.
    async fn ask_tcp(&self, upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut stream = if same_netns(&self.netns) {
            // meshd's own namespace (the agent's setting): an ordinary connect.
            tokio::net::TcpStream::connect(upstream).await?
        } else {
            // The socket is created inside the namespace, by a thread that enters it —
            // off the runtime's workers; connecting it works from any thread.
            let domain = socket2::Domain::for_address(upstream);
            let netns = self.netns.clone();
            let socket = tokio::task::spawn_blocking(move || {
                in_netns(&netns, move || {
                    let socket =
                        socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
                    socket.set_nonblocking(true)?;
                    Ok(std::net::TcpStream::from(socket))
                })
            })
            .await
            .map_err(std::io::Error::other)??;
            tokio::net::TcpSocket::from_std_stream(socket).connect(upstream).await?
        };
        let len = u16::try_from(query.len()).map_err(|_| std::io::Error::other("query too long"))?;
        let mut out = Vec::with_capacity(query.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(query);
        stream.write_all(&out).await?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await?;
        Ok(reply)
    }
}

/// Whether `reply` carries rcode SERVFAIL (the upstream's way of saying "ask another").
fn is_servfail(reply: &[u8]) -> bool {
    reply.get(3).is_some_and(|b| b & 0x0f == 2)
}

async fn forward_receive_loop(shared: Arc<Shared>) {
    let forwarder = &shared.forwarder;
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((len, from)) = forwarder.socket.recv_from(&mut buf).await else { continue };
        let Some(id) = buf[..len].get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else { continue };
        let mut pending = forwarder.pending.lock();
        if pending.get(&id).is_some_and(|(upstream, _)| *upstream == from) {
            if let Some((_, tx)) = pending.remove(&id) {
                let _ = tx.send(buf[..len].to_vec());
            }
        }
    }
}
