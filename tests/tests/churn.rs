//! Graceful churn (#7), seen from outside under real load: `meshctl detach --grace`
//! and `meshctl node drain|activate` take tasks out of rotation on every node before
//! anything is removed, so `wrk` (a new connection per request) through a published
//! port on every node sees no failed request, and a long-lived connection to a
//! detached task completes. Both the kernel path (default) and the proxy (`--xdp off`).

use std::{
    collections::BTreeSet,
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU16, Ordering},
    time::Duration,
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use meshd_tests::{in_netns, keepalive_get, node_addr, poll, Cluster, StartOptions};
use socket2::{Domain, Socket, Type};

const SUBNET: &str = "10.77.0.0/24";
const PORT: u16 = 8080;
/// How long each `wrk` runs (it runs once per node, all at once).
const LOAD_SECS: u64 = 8;

/// Three nodes, service `web` published on [`PORT`] with `web.1` on n1 and `web.2`,
/// `web.3` on n2 (n3 runs none), every node serving all three; `--xdp off` when `!xdp`.
fn web_cluster(xdp: bool) -> Result<Cluster> {
    let meshd_args = if xdp { Vec::new() } else { vec!["--xdp".to_owned(), "off".to_owned()] };
    let mut cluster = Cluster::start_with(3, StartOptions { meshd_args, ..StartOptions::default() })?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "net", "--subnet", SUBNET])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "net"])?;
    cluster.add_container(1, "web", "web.1")?;
    cluster.add_container(2, "web", "web.2")?;
    cluster.add_container(2, "web", "web.3")?;
    cluster.meshctl_ok(1, &["publish", &format!("{PORT}:80"), "web"])?;
    for i in 1..=3 {
        let path = cluster.wait_serving(i, &format!("{PORT}/tcp"), 3)?;
        let remote = path["remote_clients"].as_str().unwrap_or_default().to_owned();
        ensure!(xdp == remote.starts_with("xdp"), "n{i} serves remote clients through {remote}: {path}");
    }
    Ok(cluster)
}

/// `wrk` through every node's published port at once, each a new connection per
/// request, for [`LOAD_SECS`].
struct Load(Vec<std::process::Child>);

impl Load {
    fn start(cluster: &Cluster) -> Result<Load> {
        let mut children = Vec::new();
        for i in 1..=3 {
            let child = Command::new("ip")
                .args(["netns", "exec", &cluster.client_ns(), "wrk", "-t1", "-c4"])
                .args(["-d", &format!("{LOAD_SECS}s"), "--timeout", "3s", "-H", "Connection: close"])
                .arg(format!("http://{}:{PORT}/", node_addr(i)))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting wrk; install it with `apt-get install wrk`")?;
            children.push(child);
        }
        Ok(Load(children))
    }

    /// Waits for every `wrk` and fails unless each completed requests with no
    /// non-2xx answer and no socket error; returns their outputs.
    fn finish(mut self) -> Result<Vec<String>> {
        let mut outputs = Vec::new();
        for (n, child) in self.0.drain(..).enumerate() {
            let out: Output = child.wait_with_output()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            eprintln!("wrk via n{}:\n{text}", n + 1);
            ensure!(
                out.status.success(),
                "wrk via n{} failed: {}",
                n + 1,
                String::from_utf8_lossy(&out.stderr)
            );
            let requests: u64 = text
                .lines()
                .find_map(|l| l.trim().split_once(" requests in ").and_then(|(n, _)| n.parse().ok()))
                .ok_or_else(|| anyhow!("no request count in wrk's output:\n{text}"))?;
            ensure!(requests > 100, "wrk via n{} completed only {requests} requests:\n{text}", n + 1);
            // wrk prints these lines only when there was a failure.
            for failure in ["Non-2xx or 3xx responses", "Socket errors"] {
                ensure!(!text.contains(failure), "wrk via n{} saw failed requests:\n{text}", n + 1);
            }
            outputs.push(text);
        }
        Ok(outputs)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // Only on a failed test: our own wrk processes, by PID.
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// TCP sockets on port 80 in the namespace at `netns` (any state but LISTEN): a task
/// has served connections lately.
fn served_sockets(netns: &Path) -> Result<usize> {
    in_netns(netns, || std::fs::read_to_string("/proc/thread-self/net/tcp"))?
        .map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|l| {
                    let mut f = l.split_whitespace();
                    let local = f.nth(1).unwrap_or_default();
                    let state = f.nth(1).unwrap_or_default();
                    local.ends_with(":0050") && state != "0A"
                })
                .count()
        })
        .context("reading the task's TCP table")
}

/// Waits until the load reaches task `task` (its namespace holds served sockets).
fn load_reaches(cluster: &Cluster, task: &str) -> Result<()> {
    let netns = container(cluster, task)?;
    poll(&format!("the load reaches {task}"), Duration::from_secs(5), || {
        let n = served_sockets(&netns)?;
        ensure!(n > 0, "no connection served yet");
        Ok(())
    })
}

fn container(cluster: &Cluster, task: &str) -> Result<std::path::PathBuf> {
    cluster
        .containers
        .iter()
        .find(|c| c.task == task)
        .map(|c| c.netns())
        .ok_or_else(|| anyhow!("no container {task}"))
}

/// The next client source port for [`answering`]: below the ephemeral range `wrk`
/// uses, each used once, so every connection is a 4-tuple the kernel path has never
/// seen (a SYN on a 4-tuple with a flow entry keeps that entry's backend).
static NEXT_PORT: AtomicU16 = AtomicU16::new(20_000);

/// The tasks answering `count` new connections (fresh 4-tuples) through node `i`'s
/// published port.
fn answering(cluster: &Cluster, i: usize, count: usize) -> Result<BTreeSet<String>> {
    let addr = SocketAddr::from((node_addr(i), PORT));
    (0..count)
        .map(|_| {
            let from = SocketAddr::from(([0, 0, 0, 0], NEXT_PORT.fetch_add(1, Ordering::Relaxed)));
            in_netns(&cluster.client_netns(), move || -> std::io::Result<String> {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                socket.set_reuse_address(true)?;
                socket.bind(&from.into())?;
                socket.connect_timeout(&addr.into(), Duration::from_secs(2))?;
                meshd_tests::get_on(socket.into())
            })?
            .with_context(|| format!("GET http://{addr}/ from port {}", from.port()))
        })
        .collect()
}

/// SYNs the namespace at `netns` sent again because no answer came: a connection
/// attempt that met a task gone without notice. On the kernel path such an attempt is
/// sent on once the flow re-balances, so wrk sees latency, not an error.
fn syn_retransmits(netns: &Path) -> Result<u64> {
    let table = in_netns(netns, || std::fs::read_to_string("/proc/thread-self/net/netstat"))??;
    let mut lines = table.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap_or_default(), lines.next().unwrap_or_default());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "TCPSynRetrans")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| anyhow!("no TCPSynRetrans in {table}"))
}

/// `meshctl detach` of a task under load through every node: zero failed requests and
/// no connection attempt lost.
fn detach_under_load(xdp: bool) -> Result<()> {
    let cluster = web_cluster(xdp)?;
    let syn_before = syn_retransmits(&cluster.client_netns())?;
    let load = Load::start(&cluster)?;
    load_reaches(&cluster, "web.1")?;
    let out = cluster.meshctl_ok(1, &["detach", "web.1", "--grace", "5s"])?;
    eprintln!("{out}");
    ensure!(out.contains("no new connections on all 3 nodes") && out.contains("detached"), "{out}");
    load.finish()?;
    let lost = syn_retransmits(&cluster.client_netns())? - syn_before;
    ensure!(lost == 0, "{lost} connection attempts were lost (SYNs sent again) during the detach");
    for i in 1..=3 {
        let tasks = answering(&cluster, i, 12)?;
        ensure!(!tasks.contains("web.1"), "n{i} still sends to the detached web.1: {tasks:?}");
    }
    Ok(())
}

#[test]
fn detach_under_load_fails_no_request_on_the_kernel_path() -> Result<()> {
    detach_under_load(true)
}

#[test]
fn detach_under_load_fails_no_request_through_the_proxy() -> Result<()> {
    detach_under_load(false)
}

/// `meshctl node drain n2` under load: zero failed requests, then n2's tasks take no
/// new connection while n2's own published port keeps answering; `activate` brings
/// them back.
#[test]
fn a_drained_node_keeps_serving_its_port_and_its_tasks_finish_then_rest() -> Result<()> {
    drained_node(true)
}

/// The same through the proxy (`--xdp off`).
#[test]
fn a_drained_node_keeps_serving_through_the_proxy() -> Result<()> {
    drained_node(false)
}

fn drained_node(xdp: bool) -> Result<()> {
    let cluster = web_cluster(xdp)?;
    let load = Load::start(&cluster)?;
    load_reaches(&cluster, "web.2")?;
    let n2 = node_name(&cluster, 2)?;
    let out = cluster.meshctl_ok(3, &["node", "drain", &n2])?;
    eprintln!("{out}");
    ensure!(out.contains("drained: 2 task(s)") && out.contains("all 3 nodes"), "{out}");
    load.finish()?;
    let ls = cluster.meshctl_json(1, &["node", "ls"])?;
    let row = ls.as_array().into_iter().flatten().find(|r| r["name"] == n2.as_str()).cloned();
    ensure!(row.as_ref().is_some_and(|r| r["availability"] == "drain"), "node ls: {ls}");
    // Every node, n2 included, answers with web.1 only.
    for i in 1..=3 {
        let tasks = answering(&cluster, i, 12)?;
        ensure!(
            tasks == BTreeSet::from(["web.1".to_owned()]),
            "n{i} answered with {tasks:?} after the drain"
        );
    }
    let out = cluster.meshctl_ok(3, &["node", "activate", &n2])?;
    ensure!(out.contains("back in rotation"), "{out}");
    poll("web.2 and web.3 answer again through n3", Duration::from_secs(10), || {
        let tasks = answering(&cluster, 3, 30)?;
        ensure!(tasks.len() == 3, "answered by {tasks:?}");
        Ok(())
    })?;
    Ok(())
}

/// The name meshd gave node `i` (from `meshctl node ls` on it: the `self` row).
fn node_name(cluster: &Cluster, i: usize) -> Result<String> {
    let ls = cluster.meshctl_json(i, &["node", "ls"])?;
    ls.as_array()
        .into_iter()
        .flatten()
        .find(|r| r["state"] == "self")
        .and_then(|r| r["name"].as_str().map(str::to_owned))
        .ok_or_else(|| anyhow!("no self row in {ls}"))
}

/// An idle keep-alive connection through n3 (no local task) to a task detached with
/// a grace period keeps working while it drains; closing it ends the drain early.
#[test]
fn a_long_lived_connection_to_a_detached_task_completes() -> Result<()> {
    long_lived_connection_completes(true)
}

/// The same through the proxy: a relay in flight is not cut when its backend leaves
/// the listener's list.
#[test]
fn a_long_lived_relay_to_a_detached_task_completes() -> Result<()> {
    long_lived_connection_completes(false)
}

fn long_lived_connection_completes(xdp: bool) -> Result<()> {
    let cluster = web_cluster(xdp)?;
    let addr = SocketAddr::from((node_addr(3), PORT));
    // Connections until one lands on web.2 (Maglev spreads new source ports).
    let mut stream = poll("a keep-alive connection to web.2 through n3", Duration::from_secs(10), || {
        let mut stream = in_netns(&cluster.client_netns(), move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })??;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let task = keepalive_get(&mut stream)?;
        ensure!(task == "web.2", "landed on {task}");
        Ok(stream)
    })?;
    let socket = cluster.nodes[1].socket.clone();
    let meshctl = meshd_tests::bin_path("meshctl")?;
    let detach = std::thread::spawn(move || {
        Command::new(meshctl)
            .arg("--socket")
            .arg(socket)
            .args(["--format", "json", "detach", "web.2", "--grace", "20s"])
            .output()
    });
    poll("web.2 is out of rotation on every node", Duration::from_secs(10), || {
        for i in 1..=3 {
            let ps = cluster.meshctl_json(i, &["status"])?;
            let path = &ps["published_paths"][0];
            ensure!(
                !path["remote_backends"].to_string().contains(&container_ip(&cluster, "web.2")?),
                "n{i} still balances new connections to web.2: {path}"
            );
        }
        Ok(())
    })?;
    // The detach counts the connection (its progress in n2's status).
    poll("n2's detach counts web.2's open connection", Duration::from_secs(10), || {
        let status = cluster.meshctl_json(2, &["status"])?;
        let open = status["draining_tasks"]["web.2"].as_u64();
        ensure!(open >= Some(1), "draining_tasks: {}", status["draining_tasks"]);
        Ok(())
    })?;
    // The drain is under way and the old connection still works, twice.
    for _ in 0..2 {
        ensure!(keepalive_get(&mut stream)? == "web.2", "the draining connection moved");
    }
    ensure!(!detach.is_finished(), "detach returned while web.2 still had a connection");
    drop(stream);
    let out = detach.join().map_err(|_| anyhow!("detach thread panicked"))??;
    ensure!(out.status.success(), "detach failed: {}", String::from_utf8_lossy(&out.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    eprintln!("{reply}");
    ensure!(reply["connections_at_drain"].as_u64() >= Some(1), "{reply}");
    ensure!(reply["connections_left"] == 0, "the connection was cut: {reply}");
    ensure!(reply["drained_ms"].as_u64() < Some(20_000), "the drain waited the whole grace period: {reply}");
    Ok(())
}

fn container_ip(cluster: &Cluster, task: &str) -> Result<String> {
    cluster
        .containers
        .iter()
        .find(|c| c.task == task)
        .map(|c| format!("{}:", c.ip))
        .ok_or_else(|| anyhow!("no container {task}"))
}

/// Bad input: a clear one-line error, a non-zero exit, nothing changed.
#[test]
fn bad_churn_input_is_refused_and_changes_nothing() -> Result<()> {
    let mut cluster = Cluster::start(1)?;
    cluster.meshctl_ok(1, &["network", "create", "net", "--subnet", SUBNET])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "net"])?;
    cluster.add_container(1, "web", "web.1")?;
    let before = cluster.meshctl_ok(1, &["--format", "json", "service", "ps", "web"])?;
    let nodes_before = cluster.meshctl_ok(1, &["--format", "json", "node", "ls"])?;
    for (args, says) in [
        (&["node", "drain", "nosuch"][..], "node nosuch does not exist; list nodes with `meshctl node ls`"),
        (&["node", "activate", "nosuch"][..], "node nosuch does not exist"),
        (&["detach", "web.1", "--grace", "bogus"][..], "invalid duration \"bogus\""),
        (&["detach", "web.1", "--grace", "10"][..], "invalid duration \"10\""),
        (&["detach", "nosuch"][..], "task nosuch does not exist"),
    ] {
        let out = cluster.meshctl(1, args);
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "meshctl {args:?} succeeded");
        ensure!(err.contains(says), "meshctl {args:?} said {err:?}, not {says:?}");
    }
    ensure!(cluster.meshctl_ok(1, &["--format", "json", "service", "ps", "web"])? == before, "tasks changed");
    let nodes_after = cluster.meshctl_json(1, &["node", "ls"])?;
    let before: serde_json::Value = serde_json::from_str(&nodes_before)?;
    let avail = |v: &serde_json::Value| -> Vec<String> {
        v.as_array().into_iter().flatten().map(|r| r["availability"].to_string()).collect()
    };
    ensure!(avail(&nodes_after) == avail(&before), "availability changed");
    Ok(())
}

/// `meshctl unpublish --grace`, on the proxy (`--xdp off`) and the kernel path: once
/// the command returns, every node refuses new connections; a keep-alive connection
/// opened before (through n3, which runs no task: it stays on the network while the
/// port closes) keeps being served during the grace and is cut when it ends; then the
/// port is gone from the cluster state.
#[test]
fn unpublish_with_a_grace_refuses_new_connections_and_cuts_open_ones_at_its_end() -> Result<()> {
    for xdp in [false, true] {
        unpublish_with_grace(xdp).with_context(|| if xdp { "kernel path" } else { "proxy (--xdp off)" })?;
    }
    Ok(())
}

fn unpublish_with_grace(xdp: bool) -> Result<()> {
    let cluster = web_cluster(xdp)?;
    let client = cluster.client_netns();
    let addr = SocketAddr::from((node_addr(3), PORT));
    let mut stream = in_netns(&client, move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))??;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let task = keepalive_get(&mut stream)?;
    // Bad input: refused, and the port is served as before.
    for (grace, says) in
        [("2h", "duration \"2h\" is longer than 3600s"), ("soon", "invalid duration \"soon\"")]
    {
        let out = cluster.meshctl(1, &["unpublish", &PORT.to_string(), "--grace", grace]);
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success() && err.contains(says), "--grace {grace}: {err}");
    }
    ensure!(keepalive_get(&mut stream)? == task, "a refused unpublish changed the port");
    let grace = Duration::from_secs(4);
    let started = std::time::Instant::now();
    let out = cluster.meshctl_ok(1, &["unpublish", &PORT.to_string(), "web", "--grace", "4s"])?;
    ensure!(
        out.contains("new connections refused on all 3 nodes") && out.contains("may finish for 4.0s"),
        "{out}"
    );
    for i in 1..=3 {
        let addr = SocketAddr::from((node_addr(i), PORT));
        ensure!(
            meshd_tests::refused(&client, addr)?,
            "n{i} accepted a new connection after unpublish returned"
        );
    }
    ensure!(keepalive_get(&mut stream)? == task, "the open connection moved or failed during the grace");
    // Publishing it again waits for the close to finish (or `--grace 0`).
    let out = cluster.meshctl(1, &["publish", &format!("{PORT}:80"), "web"]);
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && err.contains("is being unpublished"), "publish while closing: {err}");
    ensure!(
        started.elapsed() < grace,
        "the checks ran past the grace ({:?}); lengthen it",
        started.elapsed()
    );
    // A request now and then: answered until the grace ends, then cut (the proxy closes
    // it; on the kernel path the flow's next packet meets the stack, which resets it).
    let cut_after =
        poll("the open connection is cut", grace + Duration::from_secs(6), || {
            match keepalive_get(&mut stream) {
                Ok(_) => bail!("still served after {:?}", started.elapsed()),
                Err(_) => Ok(started.elapsed()),
            }
        })?;
    ensure!(cut_after >= grace, "cut after {cut_after:?}, before the {grace:?} grace ended");
    poll("the port is removed", Duration::from_secs(5), || {
        let inspect = cluster.meshctl_json(1, &["service", "inspect", "web"])?;
        ensure!(inspect["published"].as_array().is_some_and(Vec::is_empty), "{}", inspect["published"]);
        Ok(())
    })?;
    Ok(())
}

/// A draining detach waits only for the nodes on the task's network (the others never
/// learn of the task): with no published port, n2 and n3 take no part in `net`.
#[test]
fn detach_waits_only_for_the_nodes_on_the_tasks_network() -> Result<()> {
    let mut cluster = Cluster::start(3)?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "net", "--subnet", SUBNET])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "net"])?;
    cluster.add_container(1, "web", "web.1")?;
    let out = cluster.meshctl_ok(1, &["detach", "web.1", "--grace", "5s"])?;
    ensure!(out.contains("detached"), "{out}");
    let ps = cluster.meshctl_json(1, &["service", "ps", "web"])?;
    ensure!(ps.as_array().is_some_and(Vec::is_empty), "web.1 is still listed: {ps}");
    Ok(())
}
