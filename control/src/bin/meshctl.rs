//! `meshctl`: the command line for the local meshd.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use meshd_control::{
    api::{call, Request, Response, DEFAULT_CLIENT_TIMEOUT, DEFAULT_SOCKET},
    model::{Availability, EndpointMode, HealthCheck, LbPolicy, PublishMode},
    spec::{PortSpec, PublishedSpec},
};
use serde_json::Value;

/// meshctl — manage networks, services, tasks and published ports through the local meshd.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The local meshd's API socket.
    #[arg(long, global = true, env = "MESHD_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Seconds to wait for meshd's answer before giving up (publish and key rotate wait
    /// for the whole cluster, so keep it above their own limits).
    #[arg(long, global = true, value_name = "SECS", default_value_t = DEFAULT_CLIENT_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// Output format of listings.
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    format: Format,
    #[command(subcommand)]
    command: Command,
}

/// Shells `meshctl completion` writes for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage overlay networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Manage services.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Make an existing network namespace a task of SERVICE.
    Attach {
        /// The service.
        service: String,
        /// Path of the network namespace, e.g. /run/netns/web1.
        #[arg(long)]
        netns: String,
        /// Task name [default: SERVICE.<random>].
        #[arg(long)]
        name: Option<String>,
        /// The task's address on the network [default: a free one].
        #[arg(long)]
        ip: Option<std::net::Ipv4Addr>,
    },
    /// Remove a task from its service and its interface from the namespace.
    Detach {
        /// The task name.
        task: String,
        /// Drain it first: wait until every node stops sending it new connections,
        /// then until its connections finish or this long passes (e.g. 10s, 500ms,
        /// 2m); 0 removes it at once.
        #[arg(long, default_value = "10s", value_parser = meshd_control::spec::parse_duration)]
        grace: Duration,
    },
    /// Answer PUBLISHED on every node and forward to TARGET on a task of SERVICE;
    /// returns once every alive node serves it.
    Publish {
        /// PUBLISHED:TARGET[/tcp|/udp], e.g. 3000:80.
        #[arg(value_parser = clap::value_parser!(String))]
        spec: String,
        /// The service.
        service: String,
        /// Return at once, without waiting for the nodes to serve the port.
        #[arg(long)]
        detach: bool,
        /// How the kernel path returns replies: `snat` (through the node the client
        /// reached) or `dsr` (the task's node replies straight to the client, which
        /// the task sees as the peer).
        #[arg(long, default_value = "snat")]
        mode: String,
        /// How the proxy picks a task for a new connection: `rr` (round robin),
        /// `leastconn` (fewest active connections), `p2c` (the less loaded of two at
        /// random) or `maglev` (by the client's address: a client keeps its task). The
        /// kernel paths always hash the flow (Maglev). Publishing the same port,
        /// target and mode again changes the policy in place.
        #[arg(long, default_value = "rr")]
        lb: String,
        /// `v2`: the proxy sends the task a PROXY protocol v2 header with the client's
        /// address before its bytes (the task must expect it); such a port is served
        /// by the proxy on every node, not the kernel paths.
        #[arg(long, value_name = "v2", value_parser = ["v2"])]
        proxy_protocol: Option<String>,
        /// Most connections the port takes at once on each node; at the limit a new
        /// connection is refused at once and established ones carry on. Such a port is
        /// served by the proxy on every node. 0: no limit but the proxy's global cap.
        #[arg(long, value_name = "N", default_value_t = 0)]
        max_connections: u32,
    },
    /// Stop answering a published port: new connections are refused at once on every
    /// node; connections already open may finish during the grace period, then are cut.
    Unpublish {
        /// PUBLISHED[/tcp|/udp], e.g. 3000.
        port: String,
        /// The service it is published for (checked when given).
        service: Option<String>,
        /// How long open connections may finish (e.g. 10s, 500ms, 2m; at most 1h);
        /// 0 cuts them at once. The command returns once every node refuses new
        /// connections; the port is removed when the grace period ends.
        #[arg(long, default_value = "10s", value_parser = meshd_control::spec::parse_duration)]
        grace: Duration,
    },
    /// Manage nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Manage the cluster keyring that seals all gossip.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Print a shell completion script, e.g.
    /// `meshctl completion bash > /etc/bash_completion.d/meshctl` or
    /// `meshctl completion zsh > "${fpath[1]}/_meshctl"`.
    Completion {
        /// The shell.
        shell: CompletionShell,
    },
    /// Show this node's agent: programs, overlays, published ports, errors.
    Status,
}

#[derive(Debug, Subcommand)]
enum NetworkCmd {
    /// Create an overlay network.
    Create {
        /// Its name.
        name: String,
        /// Its IPv4 subnet, e.g. 10.0.0.0/24.
        #[arg(long)]
        subnet: String,
        /// Interface MTU [default: the underlay MTU minus 50 bytes of VXLAN overhead].
        #[arg(long)]
        mtu: Option<u32>,
    },
    /// List networks.
    Ls,
}

/// An active health check: each task's node probes it; a task that fails
/// `--health-retries` probes in a row leaves rotation on every node and every path, and
/// returns after `--health-passes` passes.
#[derive(Debug, clap::Args)]
struct HealthArgs {
    /// Probe by a TCP connect to this port of the task.
    #[arg(long, value_name = "PORT")]
    health_tcp: Option<u16>,
    /// Probe by an HTTP GET (2xx/3xx passes), e.g. 80:/healthz.
    #[arg(long, value_name = "PORT:/PATH")]
    health_http: Option<String>,
    /// Time between probes.
    #[arg(long, default_value = "1s", value_parser = meshd_control::spec::parse_duration)]
    health_interval: Duration,
    /// A probe not answered within this fails.
    #[arg(long, default_value = "500ms", value_parser = meshd_control::spec::parse_duration)]
    health_timeout: Duration,
    /// Failed probes in a row that take a task out of rotation.
    #[arg(long, default_value_t = meshd_control::health::DEFAULT_RETRIES)]
    health_retries: u32,
    /// Passed probes in a row that bring it back.
    #[arg(long, default_value_t = meshd_control::health::DEFAULT_PASSES)]
    health_passes: u32,
}

impl HealthArgs {
    /// The check these flags describe; `None` when no probe is given.
    fn check(&self) -> Result<Option<HealthCheck>, String> {
        let probe = meshd_control::health::parse_probe(self.health_tcp, self.health_http.as_deref())?;
        probe
            .map(|p| {
                meshd_control::health::check(
                    p,
                    self.health_interval,
                    self.health_timeout,
                    self.health_retries,
                    self.health_passes,
                )
            })
            .transpose()
    }
}

#[derive(Debug, Subcommand)]
enum ServiceCmd {
    /// Create a service on a network.
    Create {
        /// Its name.
        name: String,
        /// The network its tasks attach to.
        #[arg(long)]
        network: String,
        /// vip (one virtual IP) or dnsrr (DNS round-robin).
        #[arg(long, default_value = "vip")]
        endpoint_mode: String,
        #[command(flatten)]
        health: HealthArgs,
    },
    /// Change a service's health check.
    Update {
        /// The service.
        name: String,
        #[command(flatten)]
        health: HealthArgs,
        /// Remove its health check (every task is healthy while its node is live).
        #[arg(long, conflicts_with_all = ["health_tcp", "health_http"])]
        no_health_check: bool,
    },
    /// List services.
    Ls,
    /// List a service's tasks.
    Ps {
        /// The service.
        name: String,
    },
    /// Show a service in full (JSON).
    Inspect {
        /// The service.
        name: String,
    },
    /// Remove a service, its published ports and its tasks.
    Rm {
        /// The service.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum KeyCmd {
    /// Replace the cluster key without downtime: every node accepts the new key before
    /// any node seals with it, then the old key is dropped.
    Rotate,
    /// List the installed keys (fingerprints only).
    Ls,
    /// Replace this node's keyring with the keys in FILE (one 64-hex-digit key per
    /// line, the first seals), out of band: for a compromised key, since a rotation
    /// sends the new key sealed under the old one. Run it on every node; nodes with
    /// different keyrings stop gossiping with each other until all have it.
    Install {
        /// The keyring file to install.
        #[arg(long)]
        file: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// List the cluster's nodes.
    Ls,
    /// Take every task of NODE out of rotation (their connections finish; NODE keeps
    /// serving published ports); returns once every node applied it.
    Drain {
        /// The node.
        node: String,
    },
    /// Bring NODE's tasks back into rotation after `node drain`.
    Activate {
        /// The node.
        node: String,
    },
}

fn request(command: Command) -> Result<Request, String> {
    Ok(match command {
        Command::Network(NetworkCmd::Create { name, subnet, mtu }) => {
            Request::NetworkCreate { name, subnet, mtu }
        }
        Command::Network(NetworkCmd::Ls) => Request::NetworkLs,
        Command::Service(ServiceCmd::Create { name, network, endpoint_mode, health }) => {
            Request::ServiceCreate {
                name,
                network,
                endpoint_mode: endpoint_mode.parse::<EndpointMode>()?,
                health_check: health.check()?,
            }
        }
        Command::Service(ServiceCmd::Update { name, health, no_health_check }) => {
            let health_check = health.check()?;
            if health_check.is_none() && !no_health_check {
                return Err(
                    "give a check (--health-tcp PORT or --health-http PORT:/PATH) or --no-health-check"
                        .into(),
                );
            }
            Request::ServiceUpdate { name, health_check }
        }
        Command::Service(ServiceCmd::Ls) => Request::ServiceLs,
        Command::Service(ServiceCmd::Ps { name }) => Request::ServicePs { name },
        Command::Service(ServiceCmd::Inspect { name }) => Request::ServiceInspect { name },
        Command::Service(ServiceCmd::Rm { name }) => Request::ServiceRm { name },
        Command::Attach { service, netns, name, ip } => Request::Attach { service, netns, name, ip },
        Command::Detach { task, grace } => {
            Request::Detach { name: task, grace_ms: Some(grace.as_millis() as u64) }
        }
        Command::Publish { spec, service, detach, mode, lb, proxy_protocol, max_connections } => {
            Request::Publish {
                spec: spec.parse::<PortSpec>()?,
                service,
                detach,
                mode: mode.parse::<PublishMode>()?,
                lb: lb.parse::<LbPolicy>()?,
                proxy_protocol: proxy_protocol.is_some(),
                max_connections,
            }
        }
        Command::Unpublish { port, service, grace } => {
            let spec: PublishedSpec = port.parse()?;
            let grace_ms = Some(grace.as_millis() as u64);
            Request::Unpublish { published: spec.published, proto: spec.proto, service, grace_ms }
        }
        Command::Node(NodeCmd::Ls) => Request::NodeLs,
        Command::Node(NodeCmd::Drain { node }) => {
            Request::NodeAvailability { name: node, availability: Availability::Drain }
        }
        Command::Node(NodeCmd::Activate { node }) => {
            Request::NodeAvailability { name: node, availability: Availability::Active }
        }
        Command::Completion { .. } => return Err("completion needs no meshd; it is answered locally".into()),
        Command::Key(KeyCmd::Rotate) => Request::KeyRotate,
        Command::Key(KeyCmd::Ls) => Request::KeyLs,
        Command::Key(KeyCmd::Install { file }) => {
            let text = std::fs::read_to_string(&file).map_err(|e| {
                format!("cannot read keyring {}: {e}; pass a readable --file", file.display())
            })?;
            let ring = meshd_control::gossip::seal::Keyring::parse(&text).map_err(|e| {
                format!("keyring {} is invalid: {e}; write one 64-hex-digit key per line", file.display())
            })?;
            // A parsed keyring seals with its first key: the file's order is the order.
            let keys = ring.keys.iter().map(|k| k.to_hex()).collect();
            Request::KeyInstall { keys: meshd_control::api::SecretKeys(keys) }
        }
        Command::Status => Request::Status,
    })
}

/// Renders rows of JSON objects as an aligned table with the given columns.
fn table(rows: &Value, columns: &[&str]) -> String {
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map(str::to_owned).unwrap_or_else(|| x.to_string()))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    };
    let mut grid = vec![columns.iter().map(|c| c.to_uppercase()).collect::<Vec<_>>()];
    for row in rows.as_array().into_iter().flatten() {
        grid.push(columns.iter().map(|c| cell(&row[*c])).collect());
    }
    let widths: Vec<usize> =
        (0..columns.len()).map(|i| grid.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    grid.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn render(request: &Request, result: &Value, format: Format) -> String {
    if format == Format::Json {
        return serde_json::to_string_pretty(result).expect("JSON values serialize");
    }
    match request {
        Request::NetworkLs => table(result, &["name", "subnet", "vni", "mtu", "tasks", "free"]),
        Request::ServiceLs => table(result, &["name", "network", "endpoint_mode", "vip", "tasks", "published"]),
        Request::ServicePs { .. } => table(result, &["task", "node", "ip", "mac", "state", "health"]),
        Request::NodeLs => {
            table(result, &["name", "addr", "state", "availability", "incarnation", "changed_secs_ago"])
        }
        Request::NodeAvailability { name, availability } => format!(
            "node {name} is {}: {} task(s) {}; applied on {}",
            match availability {
                Availability::Drain => "drained",
                Availability::Active => "active",
            },
            result["tasks"],
            match availability {
                Availability::Drain => "take no new connections (their connections finish)",
                Availability::Active => "back in rotation",
            },
            all_nodes(&result["confirmed_by"])
        ),
        Request::NetworkCreate { .. } => format!(
            "network {} created (subnet {}, vni {}): known to {}",
            result["name"].as_str().unwrap_or("?"),
            cell_str(&result["subnet"]),
            result["vni"],
            all_nodes(&result["known_to"])
        ),
        Request::ServiceCreate { name, .. } => {
            let vip = match result["vip"].as_str() {
                Some(vip) => format!(" with VIP {vip}"),
                None => String::new(),
            };
            format!("service {name} created{vip}: known to {}", all_nodes(&result["known_to"]))
        }
        Request::ServiceRm { name } => format!("service {name} removed"),
        Request::ServiceUpdate { name, health_check: Some(_) } => {
            format!("service {name} updated: its tasks' nodes probe them; `meshctl service ps {name}` shows their health")
        }
        Request::ServiceUpdate { name, health_check: None } => format!("service {name} updated: no health check"),
        Request::Attach { .. } => {
            let dns = match (result["resolver"].as_str(), result["resolver_error"].as_str()) {
                (Some(resolver), _) => format!("; DNS on {resolver}"),
                (None, Some(error)) => format!("; no DNS yet: {error}"),
                (None, None) => String::new(),
            };
            format!(
                "task {} attached with {} on node {}{dns}",
                cell_str(&result["id"]),
                cell_str(&result["ip"]),
                cell_str(&result["node"])
            )
        }
        Request::Detach { name, .. } => detached(name, result),
        Request::Publish { spec, service, detach: true, .. } => format!(
            "published {}:{}/{} for service {service}; not waiting for the nodes to serve it (--detach): `meshctl status` on a node lists the ports it serves",
            spec.published, spec.target, spec.proto
        ),
        Request::Publish { spec, service, detach: false, .. } if result["has_tasks"] == false => format!(
            "published {}:{}/{} for service {service}: listening on {}; {service} has no running task yet",
            spec.published,
            spec.target,
            spec.proto,
            all_nodes(&result["served_on"])
        ),
        Request::Publish { spec, service, detach: false, .. } => format!(
            "published {}:{}/{} for service {service}: served on {}",
            spec.published,
            spec.target,
            spec.proto,
            all_nodes(&result["served_on"])
        ),
        Request::Unpublish { published, proto, .. } => match result["grace_ms"].as_u64().unwrap_or(0) {
            0 => format!("unpublished {published}/{proto}"),
            grace => format!(
                "unpublished {published}/{proto}: new connections refused on {}; open connections may finish for {:.1}s, then are cut",
                all_nodes(&result["refused_on"]),
                grace as f64 / 1000.0
            ),
        },
        Request::KeyLs => table(result, &["key", "primary"]),
        Request::KeyRotate => format!(
            "rotated: every node now seals with key {} (generation {})",
            cell_str(&result["primary"]),
            result["generation"]
        ),
        Request::KeyInstall { .. } => format!(
            "installed on node {}: {} key(s), sealing with {}; run it on every other node too",
            cell_str(&result["node"]),
            result["keys"],
            cell_str(&result["primary"])
        ),
        Request::ServiceInspect { .. } | Request::Status => {
            serde_json::to_string_pretty(result).expect("JSON values serialize")
        }
    }
}

/// What `detach` did, honestly: how long the drain took and what it left open.
fn detached(name: &str, result: &Value) -> String {
    let Some(nodes) = result.get("out_of_rotation_on") else {
        return format!("task {name} detached");
    };
    let secs = |key: &str| result[key].as_u64().unwrap_or(0) as f64 / 1000.0;
    let mut out = format!(
        "task {name}: no new connections on {} after {:.1}s",
        all_nodes(nodes),
        secs("out_of_rotation_ms")
    );
    match (result["connections_at_drain"].as_u64(), result["connections_left"].as_u64()) {
        (Some(0), _) => out.push_str("; it had no open connection"),
        (Some(first), Some(0)) => out.push_str(&format!(
            "; its {first} connection(s) finished after {:.1}s",
            secs("drained_ms")
        )),
        (Some(first), Some(left)) => out.push_str(&format!(
            "; {left} of its {first} connection(s) were still open when the {:.1}s grace period ended and are cut",
            result["grace_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
        )),
        _ => {}
    }
    out.push_str("; detached");
    out
}

/// "all N nodes" (or "the only node") from a node count.
fn all_nodes(count: &Value) -> String {
    match count.as_u64() {
        Some(1) => "the only node".to_owned(),
        Some(n) => format!("all {n} nodes"),
        None => "every node".to_owned(),
    }
}

fn cell_str(v: &Value) -> String {
    v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completion { shell } = cli.command {
        let shell = match shell {
            CompletionShell::Bash => clap_complete::Shell::Bash,
            CompletionShell::Zsh => clap_complete::Shell::Zsh,
            CompletionShell::Fish => clap_complete::Shell::Fish,
        };
        clap_complete::generate(
            shell,
            &mut <Cli as clap::CommandFactory>::command(),
            "meshctl",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    let request = match request(cli.command) {
        Ok(r) => r,
        Err(message) => {
            eprintln!("meshctl: {message}");
            return ExitCode::from(2);
        }
    };
    match call(&cli.socket, &request, Duration::from_secs(cli.timeout)).await {
        Ok(Response::Ok { ok }) => {
            println!("{}", render(&request, &ok, cli.format));
            ExitCode::SUCCESS
        }
        Ok(Response::Err { error }) => {
            eprintln!("meshctl: {error}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("meshctl: {error}");
            ExitCode::FAILURE
        }
    }
}
