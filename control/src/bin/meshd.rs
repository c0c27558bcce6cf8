//! `meshd`: the privileged per-node agent.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::Parser;
use meshd_control::{
    agent::{secure_dir, secure_key_file, write_keyring, Agent, AgentConfig, IngressSettings, SocketLbMode},
    api::DEFAULT_SOCKET,
    gossip::{
        self,
        seal::{Key, Keyring},
    },
    limits,
    source::gossip::PORT,
};
use meshd_dataplane::{
    dns::{AnswerConfig, ResolverConfig},
    ingress::XdpSetting,
    proxy::{BulkMode, Keepalive, ProxyConfig},
    socklb::pin_dir_for,
};

/// meshd — Swarm-style service networking for a cluster of Linux hosts: overlay
/// networks over kernel VXLAN, published ports answered on every node, and the
/// cluster state replicated between nodes on TCP 7946.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// This node's unique name in the cluster. With --cleanup: also remove this
    /// node's pinned socket load balancer (its default --bpf-pin-dir).
    #[arg(long, required_unless_present_any = ["cleanup", "listener_keeper"])]
    node_name: Option<String>,
    /// This node's underlay address: peers reach its control port and VXLAN here.
    #[arg(long, required_unless_present_any = ["cleanup", "listener_keeper"])]
    advertise_addr: Option<Ipv4Addr>,
    /// A member to join through, as IP or IP:PORT (repeatable).
    #[arg(long = "join", value_name = "ADDR")]
    join: Vec<String>,
    /// Directory for the persisted cluster store. Kept 0700 with store.json 0600 (the
    /// store holds the keys a rotation distributed); looser modes found at start are
    /// tightened, with a warning.
    #[arg(long, default_value = "/var/lib/meshd")]
    state_dir: PathBuf,
    /// Path of the local API socket (created with mode 0600).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    api_socket: PathBuf,
    /// cgroup v2 directory the socket programs attach to [default: the cgroup2 mount root].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// The eBPF socket load balancer (service VIPs, local clients of published ports):
    /// `auto` loads it where the kernel can, `off` never does (VIPs are then left to
    /// the nftables fallback).
    #[arg(long, value_enum, default_value_t = SocketLbArg::Auto)]
    socket_lb: SocketLbArg,
    /// bpffs directory where the socket load balancer pins its maps and links, so the
    /// data path outlives meshd (a restart adopts them) [default:
    /// /sys/fs/bpf/meshd/NODE_NAME]. With --cleanup: the pins to remove.
    #[arg(long)]
    bpf_pin_dir: Option<PathBuf>,
    /// The kernel ingress path for published ports (XDP or its tc twin on the underlay
    /// interface, tc on task veths): `auto` attaches native XDP where the driver can,
    /// else the tc twin, else leaves published ports to the proxy; `native`, `generic`
    /// and `tc` try only that hook; `off` never loads it (and removes a previous run's
    /// pins).
    #[arg(long, value_enum, default_value_t = XdpArg::Auto)]
    xdp: XdpArg,
    /// The underlay interface XDP attaches to [default: the interface holding
    /// --advertise-addr].
    #[arg(long, value_name = "NAME")]
    underlay_if: Option<String>,
    /// Published ports the kernel ingress path serves at once (each takes a 512 KiB
    /// Maglev table); further ports are served by the proxy.
    #[arg(long, default_value_t = meshd_dataplane::ingress::DEFAULT_MAX_PORTS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(meshd_dataplane::ingress::MAX_PORTS)))]
    xdp_max_ports: u32,
    /// Port of gossip (UDP) and state sync (TCP) on every node.
    #[arg(long, default_value_t = PORT)]
    control_port: u16,
    /// The cluster keyring: one 64-hex-digit AES-256 key per line, the first seals.
    /// Every node needs the same file. Created with a fresh key if missing; kept 0600
    /// (a file group or others can read is tightened at start, with a warning)
    /// [default: STATE_DIR/keyring].
    #[arg(long)]
    keyring_file: Option<PathBuf>,
    /// SWIM probe interval, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    probe_interval_ms: u64,
    /// How long a probe waits for a direct ack before asking others, in milliseconds.
    #[arg(long, default_value_t = 500)]
    probe_timeout_ms: u64,
    /// Gossip round interval, in milliseconds.
    #[arg(long, default_value_t = 200)]
    gossip_interval_ms: u64,
    /// Members each gossip round goes to.
    #[arg(long, default_value_t = 3)]
    gossip_fanout: usize,
    /// Full TCP state sync with one random member every this many milliseconds.
    #[arg(long, default_value_t = 30_000)]
    push_pull_interval_ms: u64,
    /// Suspicion timeout multiplier (times max(1, log10(n)) probe intervals).
    #[arg(long, default_value_t = 3)]
    suspicion_mult: u32,
    /// Largest gossip UDP datagram, in bytes (state too large for it goes over TCP).
    #[arg(long, default_value_t = 1400)]
    udp_size: usize,
    /// How long deletions are remembered before they are reaped, in seconds.
    #[arg(long, default_value_t = 3600)]
    tombstone_ttl_secs: u64,
    /// Largest TCP push-pull frame accepted on the control port, in MiB. Checked
    /// before authentication; the sealed cluster state must fit (10,000 task endpoints
    /// take about 1.5 MiB).
    #[arg(long, default_value_t = 4)]
    max_frame_mib: usize,
    /// Most TCP push-pulls served at once; further connections are closed at once and
    /// counted (`dropped_busy` in `meshctl status`; the peer retries later). Buffers
    /// before authentication stay below this times 2 x --max-frame-mib.
    #[arg(long, default_value_t = 4)]
    max_push_pulls: usize,
    /// Deprecated, does nothing: shutdown always leaves the data path in place now.
    #[arg(long, hide = true)]
    keep_datapath: bool,
    /// Remove everything meshd programmed on this node (task links, overlays with their
    /// FDB and neighbour entries, isolation rules, and — given --node-name or
    /// --bpf-pin-dir — its pinned socket load balancer), then exit. Run it with meshd
    /// stopped.
    #[arg(long)]
    cleanup: bool,
    /// Where to serve Prometheus metrics (GET /metrics): the proxy's counters per
    /// published port and backend, task health, gossip counters. `off` turns it off.
    #[arg(long, default_value = "127.0.0.1:9946", value_parser = parse_metrics_addr)]
    metrics_addr: MetricsAddr,
    /// How long the published ports' listening sockets stay open after meshd stops or
    /// dies, held by a small keeper process, so a restart within that time refuses no
    /// connection (they queue and the next meshd accepts them). After it, a stopped
    /// node refuses again. 0: no keeper; sockets close with meshd.
    #[arg(long, default_value_t = 10)]
    listener_hold_secs: u64,
    /// Run as the listener keeper on this socket (started by meshd itself).
    #[arg(long, hide = true)]
    listener_keeper: Option<PathBuf>,
    #[command(flatten)]
    proxy: ProxyArgs,
    #[command(flatten)]
    dns: DnsArgs,
}

/// `--metrics-addr`: an address, or off.
#[derive(Clone, Copy, Debug)]
struct MetricsAddr(Option<std::net::SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    match s {
        "off" => Ok(MetricsAddr(None)),
        _ => s
            .parse()
            .map(|addr| MetricsAddr(Some(addr)))
            .map_err(|_| format!("{s:?} is not an address: use IP:PORT (e.g. 127.0.0.1:9946) or off")),
    }
}

/// The embedded resolvers (127.0.0.11:53 in every attached container).
#[derive(Debug, clap::Args)]
struct DnsArgs {
    /// An upstream resolver for names outside the cluster, as IP or IP:PORT
    /// (repeatable, tried in order) [default: the nameservers of /etc/resolv.conf].
    /// Forwards leave from meshd's own network namespace, so a resolver on the node's
    /// loopback (127.0.0.53, a local dnsmasq) works as well.
    #[arg(long = "dns-upstream", value_name = "ADDR")]
    dns_upstream: Vec<String>,
    /// TTL of the cluster's own answers, in seconds (Docker's 600 keeps clients on
    /// dead tasks for ten minutes).
    #[arg(long, default_value_t = 5)]
    dns_ttl: u32,
    /// How long one upstream gets to answer before the next is tried, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    dns_upstream_timeout_ms: u64,
    /// Forwards in flight at once per container; a question beyond it is answered
    /// REFUSED at once.
    #[arg(long, default_value_t = ResolverConfig::default().max_forwards)]
    dns_max_forwards: usize,
}

impl DnsArgs {
    /// The resolver settings, upstreams parsed (and read from /etc/resolv.conf when
    /// none is given).
    fn config(&self) -> anyhow::Result<ResolverConfig> {
        if self.dns_ttl > 86_400 {
            bail!("invalid --dns-ttl {}: use 0 to 86400 seconds", self.dns_ttl);
        }
        if self.dns_upstream_timeout_ms == 0 || self.dns_upstream_timeout_ms > 60_000 {
            bail!("invalid --dns-upstream-timeout-ms {}: use 1 to 60000", self.dns_upstream_timeout_ms);
        }
        if self.dns_max_forwards == 0 || self.dns_max_forwards > 32_768 {
            bail!(
                "invalid --dns-max-forwards {}: use 1 to 32768 (0 would refuse every forward)",
                self.dns_max_forwards
            );
        }
        let upstreams = if self.dns_upstream.is_empty() {
            match std::fs::read_to_string("/etc/resolv.conf") {
                Ok(text) => resolv_conf_nameservers(&text),
                Err(error) => {
                    tracing::warn!(%error, "reading /etc/resolv.conf; names outside the cluster get SERVFAIL (pass --dns-upstream)");
                    Vec::new()
                }
            }
        } else {
            self.dns_upstream
                .iter()
                .map(|a| {
                    parse_addr(a, 53).map_err(|_| {
                        anyhow::anyhow!("invalid --dns-upstream {a:?}: use IP or IP:PORT, e.g. 198.18.0.1:53")
                    })
                })
                .collect::<anyhow::Result<_>>()?
        };
        if upstreams.is_empty() {
            tracing::warn!("no upstream resolver (none in /etc/resolv.conf): names outside the cluster get SERVFAIL; pass --dns-upstream");
        }
        let defaults = ResolverConfig::default();
        let config = ResolverConfig {
            answer: AnswerConfig { ttl: self.dns_ttl, ..defaults.answer.clone() },
            upstreams,
            upstream_timeout: Duration::from_millis(self.dns_upstream_timeout_ms),
            max_forwards: self.dns_max_forwards,
            ..defaults
        };
        config.validate().map_err(|e| anyhow::anyhow!("{e} (--dns-* flags)"))?;
        Ok(config)
    }
}

/// The `nameserver` addresses of a resolv.conf, on port 53.
fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        // A scoped IPv6 address (fe80::1%eth0) does not parse and is skipped.
        .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// `--xdp`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum XdpArg {
    /// Native, else generic, else none (the proxy serves).
    Auto,
    /// Native only.
    Native,
    /// Generic only.
    Generic,
    /// The tc twin of the program (TCX ingress) only.
    Tc,
    /// No kernel ingress path.
    Off,
}

/// `--socket-lb`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SocketLbArg {
    /// Load the socket load balancer where the kernel can.
    Auto,
    /// Never load it.
    Off,
}

/// The published-port proxy's limits (see `ProxyConfig` for what each one does).
#[derive(Debug, clap::Args)]
struct ProxyArgs {
    /// Most TCP connections the proxy relays at once, over all published ports; one
    /// beyond it is closed at once.
    #[arg(long, default_value_t = ProxyConfig::default().tcp_max_connections)]
    proxy_tcp_max_connections: usize,
    /// Close a relayed TCP connection after this many seconds without a byte either way
    /// (0: never).
    #[arg(long, default_value_t = 3600)]
    proxy_tcp_idle_timeout_secs: u64,
    /// How long a connect to one task may take before the next is tried, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    proxy_connect_timeout_ms: u64,
    /// TCP keepalive on relayed connections: seconds of silence before the first probe
    /// (0: keepalive off).
    #[arg(long, default_value_t = 30)]
    proxy_tcp_keepalive_secs: u64,
    /// Seconds between keepalive probes.
    #[arg(long, default_value_t = 10)]
    proxy_tcp_keepalive_interval_secs: u64,
    /// Unanswered keepalive probes before a relayed connection is closed.
    #[arg(long, default_value_t = 3)]
    proxy_tcp_keepalive_probes: u32,
    /// Most UDP flows (client addresses) at once, over all published ports; datagrams
    /// from new clients beyond it are dropped.
    #[arg(long, default_value_t = ProxyConfig::default().udp_max_flows)]
    proxy_udp_max_flows: usize,
    /// Close a UDP flow after this many seconds without a datagram either way.
    #[arg(long, default_value_t = 30)]
    proxy_udp_idle_timeout_secs: u64,
    /// Threads relaying TCP, each with its own listener per published port (0: one per
    /// core).
    #[arg(long, default_value_t = 0)]
    proxy_workers: usize,
    /// Splice bulk TCP flows through pipes (true) or copy them through userspace (false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    proxy_splice: bool,
    /// Each proxy worker on its own single-threaded runtime, connections never moving
    /// between threads (true), or one work-stealing runtime for all of them (false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    proxy_per_core: bool,
}

impl ProxyArgs {
    fn config(&self) -> ProxyConfig {
        let secs = Duration::from_secs;
        ProxyConfig {
            tcp_max_connections: self.proxy_tcp_max_connections,
            tcp_idle_timeout: (self.proxy_tcp_idle_timeout_secs > 0)
                .then(|| secs(self.proxy_tcp_idle_timeout_secs)),
            tcp_connect_timeout: Duration::from_millis(self.proxy_connect_timeout_ms),
            tcp_keepalive: (self.proxy_tcp_keepalive_secs > 0).then(|| Keepalive {
                idle: secs(self.proxy_tcp_keepalive_secs),
                interval: secs(self.proxy_tcp_keepalive_interval_secs),
                retries: self.proxy_tcp_keepalive_probes,
            }),
            udp_max_flows: self.proxy_udp_max_flows,
            udp_idle_timeout: secs(self.proxy_udp_idle_timeout_secs),
            workers: self.proxy_workers,
            per_core: self.proxy_per_core,
            bulk: if self.proxy_splice { BulkMode::Splice } else { BulkMode::Copy },
        }
    }
}

/// Raises the open-files soft limit to the hard one and says whether that is enough
/// for the connection caps.
fn raise_open_files_limit(proxy: &ProxyConfig) {
    match limits::raise_nofile_limit() {
        Ok((before, after)) => tracing::info!(
            soft = after.soft,
            hard = after.hard,
            was = before.soft,
            "open-files limit set to the hard limit"
        ),
        Err(error) => tracing::warn!(%error, "could not raise the open-files limit"),
    }
    let budget = limits::FdBudget::for_caps(proxy);
    if let Some(warning) = limits::nofile_limit().ok().and_then(|l| limits::nofile_warning(l, &budget)) {
        tracing::warn!("{warning}");
    }
}

fn parse_join(addr: &str, default_port: u16) -> anyhow::Result<SocketAddr> {
    parse_addr(addr, default_port)
        .map_err(|_| anyhow::anyhow!("invalid --join address {addr:?}: use IP or IP:PORT, e.g. 198.18.0.11"))
}

/// `IP:PORT`, or `IP` with `default_port`.
fn parse_addr(addr: &str, default_port: u16) -> Result<SocketAddr, ()> {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return Ok(sa);
    }
    addr.parse::<Ipv4Addr>().map(|ip| SocketAddr::from((ip, default_port))).map_err(drop)
}

/// The cgroup2 mount point, from /proc/mounts.
fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .and_then(|f| f.get(1).map(PathBuf::from))
        .context("no cgroup2 file system is mounted; mount one (`mount -t cgroup2 none /sys/fs/cgroup/unified`) or pass --cgroup")
}

/// Reads the keyring file, or creates it (mode 0600, atomically) with one fresh key.
/// A keyring that group or others can read is tightened to 0600 with a warning.
fn load_or_create_keyring(path: &std::path::Path) -> anyhow::Result<Keyring> {
    if let Some(warning) = secure_key_file(path)? {
        tracing::warn!("{warning}");
    }
    match std::fs::read_to_string(path) {
        Ok(text) => Keyring::parse(&text).map_err(|e| {
            anyhow::anyhow!(
                "keyring {} is invalid: {e}; copy the cluster's keyring file here",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let ring = Keyring::single(Key::generate());
            if let Some(dir) = path.parent() {
                secure_dir(dir)?;
            }
            write_keyring(path, &ring).with_context(|| format!("creating keyring {}", path.display()))?;
            tracing::warn!(
                path = %path.display(),
                "created a new cluster keyring; copy this file to every other node before it joins"
            );
            Ok(ring)
        }
        Err(e) => Err(e).with_context(|| format!("reading keyring {}", path.display())),
    }
}

/// The state dir holds the store, and the store holds the keys a rotation distributed:
/// the directory must be 0700 and the store 0600. Policy: fix with a warning (meshd
/// wrote them; a permissive umask or an older meshd is the usual cause).
fn secure_state_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    for warning in [secure_dir(dir)?, secure_key_file(&dir.join("store.json"))?].into_iter().flatten() {
        tracing::warn!("{warning}");
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn main() -> std::process::ExitCode {
    let runtime = tokio::runtime::Runtime::new().expect("starting the tokio runtime");
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("meshd: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.keep_datapath {
        tracing::warn!("--keep-datapath is deprecated and does nothing: meshd always keeps the data path on shutdown; remove it with `meshd --cleanup`");
    }
    let pin_dir = args.bpf_pin_dir.clone().or_else(|| args.node_name.as_deref().map(pin_dir_for));
    if let Some(name) =
        args.node_name.as_deref().filter(|n| n.is_empty() || n.contains('/') || n.starts_with('.'))
    {
        bail!("invalid --node-name {name:?}: use letters, digits, '-', '_' or '.', starting with a letter or digit");
    }
    if let Some(path) = &args.listener_keeper {
        let hold = std::time::Duration::from_secs(args.listener_hold_secs);
        return meshd_dataplane::proxy::handover::run_keeper(path, hold)
            .with_context(|| format!("keeping listening sockets on {}", path.display()));
    }
    if args.cleanup {
        return cleanup(&args.api_socket, pin_dir.as_deref()).await;
    }
    let (Some(node_name), Some(advertise_addr)) = (args.node_name.clone(), args.advertise_addr) else {
        bail!("--node-name and --advertise-addr are required (unless --cleanup)");
    };
    // Checked before anything is created (the keyring, the state dir).
    let proxy = args.proxy.config();
    proxy.validate()?;
    let dns = args.dns.config()?;
    if args.max_frame_mib == 0 || args.max_frame_mib > 1024 {
        bail!("--max-frame-mib {} is out of range: use 1 to 1024", args.max_frame_mib);
    }
    if args.max_push_pulls == 0 {
        bail!("--max-push-pulls must be at least 1");
    }
    if args.udp_size < 576 || args.udp_size > 65_507 {
        bail!("--udp-size {} is out of range: use 576 to 65507 bytes", args.udp_size);
    }
    if let Some(name) = &args.underlay_if {
        // A name given by hand that is not here is a typo, not a kernel without XDP.
        if meshd_dataplane::ingress::ifindex_of(name).is_err() {
            bail!(
                "invalid --underlay-if {name:?}: no such interface in meshd's network namespace; give the interface holding --advertise-addr (`ip -br addr`)"
            );
        }
    }
    raise_open_files_limit(&proxy);
    let join = args.join.iter().map(|a| parse_join(a, args.control_port)).collect::<anyhow::Result<_>>()?;
    let cgroup = match args.cgroup {
        Some(path) => path,
        None => cgroup2_root()?,
    };
    secure_state_dir(&args.state_dir)?;
    let keyring_file = args.keyring_file.clone().unwrap_or_else(|| args.state_dir.join("keyring"));
    let keyring = load_or_create_keyring(&keyring_file)?;
    let gossip = gossip::Config {
        probe_interval: args.probe_interval_ms,
        probe_timeout: args.probe_timeout_ms,
        gossip_interval: args.gossip_interval_ms,
        gossip_fanout: args.gossip_fanout,
        push_pull_interval: args.push_pull_interval_ms,
        suspicion_mult: args.suspicion_mult,
        udp_limit: args.udp_size - gossip::seal::OVERHEAD,
        tombstone_ttl: args.tombstone_ttl_secs * 1000,
        max_frame: args.max_frame_mib << 20,
        max_push_pulls: args.max_push_pulls,
        ..gossip::Config::default()
    };
    let cfg = AgentConfig {
        node_name: node_name.clone(),
        advertise_addr,
        join,
        control_port: args.control_port,
        state_dir: args.state_dir,
        api_socket: args.api_socket,
        cgroup,
        socket_lb: match args.socket_lb {
            SocketLbArg::Auto => SocketLbMode::Auto,
            SocketLbArg::Off => SocketLbMode::Off,
        },
        pin_dir: pin_dir.unwrap_or_else(|| pin_dir_for(&node_name)),
        keyring,
        keyring_file,
        gossip,
        proxy,
        dns,
        ingress: IngressSettings {
            xdp: match args.xdp {
                XdpArg::Auto => XdpSetting::Auto,
                XdpArg::Native => XdpSetting::Native,
                XdpArg::Generic => XdpSetting::Generic,
                XdpArg::Tc => XdpSetting::Tc,
                XdpArg::Off => XdpSetting::Off,
            },
            underlay_if: args.underlay_if,
            max_ports: args.xdp_max_ports,
        },
        metrics_addr: args.metrics_addr.0,
        listener_hold: std::time::Duration::from_secs(args.listener_hold_secs),
    };
    let agent = Agent::new(cfg).await.context("starting meshd")?;
    agent.run(shutdown_signal()).await.context("running meshd")?;
    Ok(())
}

/// `meshd --cleanup`: removes every object meshd owns in this network namespace, and
/// the node's pinned socket load balancer when its pin directory is known.
async fn cleanup(api_socket: &std::path::Path, pin_dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    if tokio::net::UnixStream::connect(api_socket).await.is_ok() {
        bail!(
            "meshd is running here (it answers on {}); stop it first, or it re-creates what --cleanup removes",
            api_socket.display()
        );
    }
    // A keeper still holding listening sockets for a restart lets them go.
    let keeper = meshd_control::agent::keeper_socket(api_socket);
    if let Ok(keeper) = meshd_dataplane::proxy::handover::Keeper::connect(&keeper) {
        keeper.quit().context("ending the listener keeper")?;
        eprintln!("meshd: closed the published ports' listening sockets the keeper held");
    }
    let removed = meshd_control::agent::remove_datapath(pin_dir)
        .await
        .context("removing meshd's links, entries, rules and pins")?;
    eprintln!("meshd: removed {removed} objects meshd had programmed on this node");
    match pin_dir {
        Some(dir) => eprintln!("meshd: removed the socket load balancer pinned in {}", dir.display()),
        None => eprintln!(
            "meshd: socket load balancer pins not touched; pass --node-name (or --bpf-pin-dir) to remove them"
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_come_from_resolv_conf() {
        let text = "# comment\nsearch example\nnameserver 127.0.0.53\nnameserver  ::1 \nnameserver fe80::1%eth0\noptions edns0\n";
        let got = resolv_conf_nameservers(text);
        assert_eq!(got, ["127.0.0.53:53".parse::<SocketAddr>().unwrap(), "[::1]:53".parse().unwrap()]);
    }
}
