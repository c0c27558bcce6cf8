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
    source::push,
};

/// meshd — Swarm-style service networking for a cluster of Linux hosts: overlay
/// networks over kernel VXLAN, published ports answered on every node, and the
/// cluster state replicated between nodes on TCP 7946.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// This node's unique name in the cluster.
    #[arg(long)]
    node_name: String,
    /// This node's underlay address: peers reach its control port and VXLAN here.
    #[arg(long)]
    advertise_addr: Ipv4Addr,
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
    /// Port of the control plane on every node.
    #[arg(long, default_value_t = push::PORT)]
    control_port: u16,
    /// On shutdown, leave overlay links, task interfaces and entries in place.
    #[arg(long)]
    keep_datapath: bool,
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
    let join = args.join.iter().map(|a| parse_join(a, args.control_port)).collect::<anyhow::Result<_>>()?;
    let cgroup = match args.cgroup {
        Some(path) => path,
        None => cgroup2_root()?,
    };
    let cfg = AgentConfig {
        node_name: args.node_name,
        advertise_addr: args.advertise_addr,
        join,
        control_port: args.control_port,
        state_dir: args.state_dir,
        api_socket: args.api_socket,
        cgroup,
        keep_datapath: args.keep_datapath,
    };
    let agent = Agent::new(cfg).await.context("starting meshd")?;
    agent.run(shutdown_signal()).await.context("running meshd")?;
    Ok(())
}
