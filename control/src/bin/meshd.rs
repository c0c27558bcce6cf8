//! `meshd`: the privileged per-node agent.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use anyhow::{bail, Context as _};
use clap::Parser;
use meshd_control::{
    agent::{Agent, AgentConfig},
    api::DEFAULT_SOCKET,
    gossip::{
        self,
        seal::{Key, Keyring},
    },
    source::gossip::PORT,
};

/// meshd — Swarm-style service networking for a cluster of Linux hosts: overlay
/// networks over kernel VXLAN, published ports answered on every node, and the
/// cluster state replicated between nodes on TCP 7946.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// This node's unique name in the cluster.
    #[arg(long, required_unless_present = "cleanup")]
    node_name: Option<String>,
    /// This node's underlay address: peers reach its control port and VXLAN here.
    #[arg(long, required_unless_present = "cleanup")]
    advertise_addr: Option<Ipv4Addr>,
    /// A member to join through, as IP or IP:PORT (repeatable).
    #[arg(long = "join", value_name = "ADDR")]
    join: Vec<String>,
    /// Directory for the persisted cluster store.
    #[arg(long, default_value = "/var/lib/meshd")]
    state_dir: PathBuf,
    /// Path of the local API socket (created with mode 0600).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    api_socket: PathBuf,
    /// cgroup v2 directory the socket programs attach to [default: the cgroup2 mount root].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Port of gossip (UDP) and state sync (TCP) on every node.
    #[arg(long, default_value_t = PORT)]
    control_port: u16,
    /// The cluster keyring: one 64-hex-digit AES-256 key per line, the first seals.
    /// Every node needs the same file. Created with a fresh key if missing
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
    /// Deprecated, does nothing: shutdown always leaves the data path in place now.
    #[arg(long, hide = true)]
    keep_datapath: bool,
    /// Remove everything meshd programmed on this node (task links, overlays with their
    /// FDB and neighbour entries, isolation rules), then exit. Run it with meshd stopped.
    #[arg(long)]
    cleanup: bool,
}

fn parse_join(addr: &str, default_port: u16) -> anyhow::Result<SocketAddr> {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return Ok(sa);
    }
    match addr.parse::<Ipv4Addr>() {
        Ok(ip) => Ok(SocketAddr::from((ip, default_port))),
        Err(_) => bail!("invalid --join address {addr:?}: use IP or IP:PORT, e.g. 198.18.0.11"),
    }
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

/// Reads the keyring file, or creates it (mode 0600) with one fresh key.
fn load_or_create_keyring(path: &std::path::Path) -> anyhow::Result<Keyring> {
    use std::os::unix::fs::OpenOptionsExt;
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
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating keyring {}", path.display()))?;
            std::io::Write::write_all(&mut file, ring.render().as_bytes())?;
            tracing::warn!(
                path = %path.display(),
                "created a new cluster keyring; copy this file to every other node before it joins"
            );
            Ok(ring)
        }
        Err(e) => Err(e).with_context(|| format!("reading keyring {}", path.display())),
    }
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
    if args.cleanup {
        return cleanup(&args.api_socket).await;
    }
    let (Some(node_name), Some(advertise_addr)) = (args.node_name.clone(), args.advertise_addr) else {
        bail!("--node-name and --advertise-addr are required (unless --cleanup)");
    };
    let join = args.join.iter().map(|a| parse_join(a, args.control_port)).collect::<anyhow::Result<_>>()?;
    let cgroup = match args.cgroup {
        Some(path) => path,
        None => cgroup2_root()?,
    };
    let keyring_file = args.keyring_file.clone().unwrap_or_else(|| args.state_dir.join("keyring"));
    let keyring = load_or_create_keyring(&keyring_file)?;
    if args.udp_size < 576 || args.udp_size > 65_507 {
        bail!("--udp-size {} is out of range: use 576 to 65507 bytes", args.udp_size);
    }
    let gossip = gossip::Config {
        probe_interval: args.probe_interval_ms,
        probe_timeout: args.probe_timeout_ms,
        gossip_interval: args.gossip_interval_ms,
        gossip_fanout: args.gossip_fanout,
        push_pull_interval: args.push_pull_interval_ms,
        suspicion_mult: args.suspicion_mult,
        udp_limit: args.udp_size - gossip::seal::OVERHEAD,
        tombstone_ttl: args.tombstone_ttl_secs * 1000,
        ..gossip::Config::default()
    };
    let cfg = AgentConfig {
        node_name,
        advertise_addr,
        join,
        control_port: args.control_port,
        state_dir: args.state_dir,
        api_socket: args.api_socket,
        cgroup,
        keyring,
        keyring_file,
        gossip,
    };
    let agent = Agent::new(cfg).await.context("starting meshd")?;
    agent.run(shutdown_signal()).await.context("running meshd")?;
    Ok(())
}

/// `meshd --cleanup`: removes every object meshd owns in this network namespace.
async fn cleanup(api_socket: &std::path::Path) -> anyhow::Result<()> {
    if tokio::net::UnixStream::connect(api_socket).await.is_ok() {
        bail!(
            "meshd is running here (it answers on {}); stop it first, or it re-creates what --cleanup removes",
            api_socket.display()
        );
    }
    let removed =
        meshd_control::agent::remove_datapath().await.context("removing meshd's links, entries and rules")?;
    eprintln!("meshd: removed {removed} objects meshd had programmed on this node");
    Ok(())
}
