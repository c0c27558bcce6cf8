//! The kernel routing mesh (#6) end to end: real meshd nodes with the underlay program (XDP, or its tc twin) on
//! their underlay `eth0` and the tc program on their tasks' host veths, an external
//! client (`198.18.0.100`) using real `curl` and `iperf3`, and `meshd-testsrv` tasks
//! that report the address each connection came from (`GET /peer`).
//!
//! What the tests read from meshd (`meshctl status`): `ingress.hook`
//! (`xdp-native`/`xdp-generic`/`tc`/`off`), `ingress.counters` (packets per outcome of the kernel
//! programs), `published_paths[i].kernel_path` and `.mode`, and the proxy's
//! `proxy.counters.tcp_accepted` — which must not move while the kernel path serves.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{anyhow, ensure, Context as _, Result};
use meshd_tests::{in_netns, node_addr, poll, sh, spawn_in, Cluster, CLIENT_ADDR};
use serde_json::Value;

const SUBNET: &str = "10.0.0.0/24";
const SNAT_PORT: u16 = 3000;
const DSR_PORT: u16 = 3001;

/// The task name and the peer address a task reported for one `curl` from the client.
fn curl_peer(cluster: &Cluster, addr: SocketAddr) -> Result<(String, SocketAddr)> {
    let url = format!("http://{addr}/peer");
    let out = sh("ip", &["netns", "exec", &cluster.client_ns(), "curl", "-sS", "--max-time", "3", &url])
        .context("curl from the external client (install curl with `make bootstrap`)")?;
    parse_peer(&out)
}

/// `TASK IP:PORT` as `meshd-testsrv` answers `/peer`.
fn parse_peer(body: &str) -> Result<(String, SocketAddr)> {
    let (task, peer) = body.trim().split_once(' ').ok_or_else(|| anyhow!("not a /peer answer: {body:?}"))?;
    Ok((task.to_owned(), peer.parse().with_context(|| format!("peer in {body:?}"))?))
}

/// Node `i`'s `meshctl status`.
fn status(cluster: &Cluster, i: usize) -> Result<Value> {
    cluster.meshctl_json(i, &["status"])
}

/// One counter of node `i`'s kernel ingress path.
fn counter(status: &Value, name: &str) -> u64 {
    status["ingress"]["counters"][name].as_u64().unwrap_or(0)
}

/// Connections node `i`'s userspace proxy has accepted.
fn proxy_accepted(status: &Value) -> u64 {
    status["proxy"]["counters"]["tcp_accepted"].as_u64().unwrap_or(0)
}

/// Node `i`'s `published_paths` entry for `port`/tcp.
fn published_path(status: &Value, port: u16) -> Option<Value> {
    status["published_paths"]
        .as_array()?
        .iter()
        .find(|p| p["port"].as_str() == Some(&format!("{port}/tcp")))
        .cloned()
}

/// Waits until node `i` serves `port` through the kernel path with `backends` task
/// addresses, in `mode`; returns the kernel path (`xdp-native`, `xdp-generic`, `tc`).
fn wait_kernel_path(cluster: &Cluster, i: usize, port: u16, mode: &str, backends: usize) -> Result<String> {
    poll(
        &format!("n{i} serves {port}/tcp through the kernel ({mode}, {backends} backends)"),
        Duration::from_secs(20),
        || {
            let status = status(cluster, i)?;
            let path = published_path(&status, port).ok_or_else(|| anyhow!("no {port}/tcp in {status}"))?;
            let kernel = path["kernel_path"].as_str().unwrap_or_default().to_owned();
            ensure!(
                kernel.starts_with("xdp-") || kernel == "tc",
                "kernel_path {kernel:?}: {path}; ingress: {}",
                status["ingress"]
            );
            ensure!(path["mode"] == mode, "mode {}: {path}", path["mode"]);
            let count = |key: &str| path[key].as_array().map_or(0, Vec::len);
            ensure!(count("backends") == backends && count("remote_backends") == backends, "{path}");
            Ok(kernel)
        },
    )
    .map_err(|e| e.context(cluster.log_tail(i, 30)))
}

/// Node `i`'s own address on the overlay `SUBNET` (its bridge: the snat source).
fn overlay_addr(cluster: &Cluster, i: usize) -> Result<Ipv4Addr> {
    let ns = &cluster.nodes[i - 1].ns;
    let out = sh("ip", &["-n", ns, "-j", "-4", "addr", "show"])?;
    let links: Value = serde_json::from_str(&out)?;
    links
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str()?.parse::<Ipv4Addr>().ok())
        .find(|a| a.octets()[..3] == [10, 0, 0])
        .ok_or_else(|| anyhow!("n{i} has no address on {SUBNET}: {out}"))
}

/// Sets up three nodes, network `net`, service `web` with `web.1` on n1 and `web.2` on
/// n2 (n3 runs none: every path through it is remote), published on `SNAT_PORT`
/// (snat) and `DSR_PORT` (dsr), served through the underlay program attached by
/// `--xdp hook` on every node.
fn web_cluster(hook: &str) -> Result<Cluster> {
    let mut cluster = Cluster::start_with_args(3, &["--xdp", hook])?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "net", "--subnet", SUBNET])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "net"])?;
    cluster.add_container(1, "web", "web.1")?;
    cluster.add_container(2, "web", "web.2")?;
    cluster.meshctl_ok(1, &["publish", &format!("{SNAT_PORT}:80"), "web"])?;
    cluster.meshctl_ok(1, &["publish", &format!("{DSR_PORT}:80"), "web", "--mode", "dsr"])?;
    for i in 1..=3 {
        wait_kernel_path(&cluster, i, SNAT_PORT, "snat", 2)?;
        wait_kernel_path(&cluster, i, DSR_PORT, "dsr", 2)?;
    }
    Ok(cluster)
}

/// The external client reaches every task of `web` through every node on `port`
/// (published in `mode`) with `curl`, each task seeing the address `mode` promises;
/// every node's kernel path carried it and no proxy accepted a connection.
fn reaches_every_backend_through_every_node(port: u16, mode: &str, hook: &str) -> Result<()> {
    let cluster = web_cluster(hook)?;
    let want = if hook == "tc" { "tc" } else { "xdp-native" };
    let task_node: BTreeMap<String, usize> =
        cluster.containers.iter().map(|c| (c.task.clone(), c.node)).collect();
    let before: Vec<Value> = (1..=3).map(|i| status(&cluster, i)).collect::<Result<_>>()?;
    for (i, s) in before.iter().enumerate() {
        let got = s["ingress"]["hook"].as_str().unwrap_or_default();
        assert_eq!(got, want, "n{}'s hook: {}", i + 1, s["ingress"]);
    }
    for i in 1..=3 {
        let gw = overlay_addr(&cluster, i)?;
        let addr = SocketAddr::from((node_addr(i), port));
        let mut reached = BTreeSet::new();
        // Each curl is a new connection from a new source port, so Maglev spreads
        // them; 2 backends are both reached well within 60 (p(miss) = 2^-59).
        for n in 0..60 {
            let (task, peer) =
                curl_peer(&cluster, addr).with_context(|| format!("curl {n} to n{i}:{port} ({mode})"))?;
            let on = *task_node
                .get(&task)
                .ok_or_else(|| anyhow!("n{i}:{port} answered {task:?}, not a task of web"))?;
            // dsr: every backend sees the client itself. snat: a task on the ingress
            // node sees the client too (DNAT only); a task on another node sees the
            // ingress node's own address on the overlay (its bridge).
            let expected = if mode == "dsr" || on == i { CLIENT_ADDR } else { gw };
            assert_eq!(
                peer.ip(),
                std::net::IpAddr::V4(expected),
                "{mode} via n{i} to {task} on n{on}: the task saw {peer} (expected {expected})"
            );
            reached.insert(task);
            if reached.len() == task_node.len() && n >= 10 {
                break;
            }
        }
        assert_eq!(reached.len(), task_node.len(), "via n{i}:{port} ({mode}) reached only {reached:?}");
    }
    // Every node's kernel path carried its share; no proxy accepted a connection.
    for i in 1..=3 {
        let after = status(&cluster, i)?;
        let moved = |k: &str| counter(&after, k) - counter(&before[i - 1], k);
        let (local, encap, reply_xdp, reply_tc, dsr) =
            (moved("local"), moved("encap"), moved("reply_xdp"), moved("reply_tc"), moved("dsr_recorded"));
        eprintln!(
            "{mode} n{i}: local +{local}, encap +{encap}, reply_xdp +{reply_xdp}, reply_tc +{reply_tc}, dsr_recorded +{dsr}"
        );
        assert!(encap > 0, "n{i} encapsulated nothing to the remote task");
        if mode == "snat" {
            assert!(reply_xdp > 0, "n{i}'s XDP sent back no snat reply from the remote task");
        }
        if i <= 2 {
            // n1 and n2 run a task each: local flows through the redirect and tc; in
            // dsr the remote ingress nodes' flows are recorded here too.
            assert!(
                local > 0 && reply_tc > 0,
                "n{i} redirected {local} packets to its task, tc rewrote {reply_tc} replies"
            );
            if mode == "dsr" {
                assert!(dsr > 0, "n{i} recorded no dsr flow for its task");
            }
        }
        let proxied = proxy_accepted(&after) - proxy_accepted(&before[i - 1]);
        assert_eq!(
            proxied, 0,
            "n{i}'s userspace proxy accepted {proxied} connections: the kernel path did not carry them"
        );
    }
    Ok(())
}

#[test]
fn snat_reaches_every_backend_through_every_node() -> Result<()> {
    reaches_every_backend_through_every_node(SNAT_PORT, "snat", "native")
}

#[test]
fn dsr_reaches_every_backend_through_every_node_and_keeps_the_client_address() -> Result<()> {
    reaches_every_backend_through_every_node(DSR_PORT, "dsr", "native")
}

#[test]
fn snat_reaches_every_backend_through_every_node_on_the_tc_hook() -> Result<()> {
    reaches_every_backend_through_every_node(SNAT_PORT, "snat", "tc")
}

#[test]
fn dsr_reaches_every_backend_through_every_node_and_keeps_the_client_address_on_the_tc_hook() -> Result<()> {
    reaches_every_backend_through_every_node(DSR_PORT, "dsr", "tc")
}

#[test]
fn iperf3_through_one_node_rides_the_kernel_path() -> Result<()> {
    let mut cluster = Cluster::start(2)?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "net", "--subnet", SUBNET])?;
    // One task, so iperf3's control and data connections meet the same server.
    cluster.meshctl_ok(1, &["service", "create", "bulk", "--network", "net"])?;
    let bulk = cluster.add_empty_container(2, "bulk", "bulk.1")?.netns();
    let _iperf = spawn_in(&bulk, "iperf3", &["-s", "-p", "5201"])?;
    cluster.meshctl_ok(1, &["publish", "5202:5201", "bulk"])?;
    wait_kernel_path(&cluster, 1, 5202, "snat", 1)?;
    let before = status(&cluster, 1)?;
    let n1 = node_addr(1).to_string();
    let client = cluster.client_ns();
    let out = poll("iperf3 through n1:5202", Duration::from_secs(10), || {
        let args = ["netns", "exec", &client, "iperf3", "-c", &n1, "-p", "5202", "-t", "2"];
        sh("ip", &[&args[..], &["--connect-timeout", "2000", "-J"]].concat())
    })?;
    let v: Value = serde_json::from_str(&out)?;
    let bytes = v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    let after = status(&cluster, 1)?;
    let encap = counter(&after, "encap") - counter(&before, "encap");
    let reply = counter(&after, "reply_xdp") - counter(&before, "reply_xdp");
    eprintln!("iperf3 via n1: {bytes} bytes, encap +{encap}, reply_xdp +{reply}");
    assert!(bytes > 1_000_000, "iperf3 through n1:5202 moved only {bytes} bytes: {out}");
    // Full-size segments carry at most 1448 bytes each; most of them crossed XDP.
    assert!(
        encap as f64 > bytes as f64 / 1448.0 * 0.5,
        "only {encap} packets encapsulated for {bytes} bytes"
    );
    assert!(reply > 0, "no snat reply went back through XDP");
    let proxied = proxy_accepted(&after) - proxy_accepted(&before);
    assert_eq!(proxied, 0, "n1's proxy accepted {proxied} of the iperf3 connections");
    Ok(())
}

/// A keep-alive HTTP connection from the client, held open; each `ask` is one request.
struct Held {
    stream: BufReader<TcpStream>,
    backend: String,
}

impl Held {
    fn open(cluster: &Cluster, addr: SocketAddr) -> Result<Held> {
        let stream = in_netns(&cluster.client_netns(), move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })?
        .with_context(|| format!("connecting to {addr} from the client"))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut held = Held { stream: BufReader::new(stream), backend: String::new() };
        held.backend = held.ask()?;
        Ok(held)
    }

    /// One request on the held connection; the task that answered.
    fn ask(&mut self) -> Result<String> {
        self.stream.get_mut().write_all(b"GET /peer HTTP/1.1\r\nHost: test\r\n\r\n")?;
        let mut length = None;
        loop {
            let mut line = String::new();
            ensure!(self.stream.read_line(&mut line)? > 0, "connection closed");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = Some(v.trim().parse::<usize>()?);
            }
        }
        let mut body = vec![0; length.ok_or_else(|| anyhow!("no Content-Length"))?];
        self.stream.read_exact(&mut body)?;
        Ok(parse_peer(&String::from_utf8_lossy(&body))?.0)
    }
}

/// New connections via `addr` until one reaches `task` (bounded).
fn reaches(cluster: &Cluster, addr: SocketAddr, task: &str) -> Result<()> {
    poll(&format!("a new connection via {addr} reaches {task}"), Duration::from_secs(20), || {
        let (got, _) = curl_peer(cluster, addr)?;
        ensure!(got == task, "reached {got}");
        Ok(())
    })
}

/// Held connections through n3 (both backends remote) on `port` (published in
/// `mode`) keep their backend while web.3 joins and web.1 leaves; no new connection
/// reaches web.1 once n3's table lost it.
fn flows_keep_their_backend_while_backends_change(port: u16, mode: &str) -> Result<()> {
    // On the tc twin (native XDP has the reach and kill -9 tests; the decisions are
    // shared).
    let mut cluster = web_cluster("tc")?;
    let via = SocketAddr::from((node_addr(3), port));
    let mut held: Vec<Held> = (0..16).map(|_| Held::open(&cluster, via)).collect::<Result<_>>()?;
    let spread: BTreeSet<&str> = held.iter().map(|h| h.backend.as_str()).collect();
    ensure!(spread.len() == 2, "16 held {mode} connections all went to {spread:?}");

    // A third backend joins: once new connections reach it, every held connection
    // still answers from its own backend.
    cluster.add_container(2, "web", "web.3")?;
    wait_kernel_path(&cluster, 3, port, mode, 3)?;
    reaches(&cluster, via, "web.3")?;
    for h in &mut held {
        let now = h.ask().with_context(|| format!("held {mode} connection after web.3 joined"))?;
        assert_eq!(
            now, h.backend,
            "a held {mode} connection moved from {} to {now} when web.3 joined",
            h.backend
        );
    }

    // web.1 leaves: once n3's table no longer has it, held connections to the others
    // keep their backend and no new connection reaches web.1.
    cluster.meshctl_ok(1, &["detach", "web.1"])?;
    wait_kernel_path(&cluster, 3, port, mode, 2)?;
    for h in held.iter_mut().filter(|h| h.backend != "web.1") {
        let now =
            h.ask().with_context(|| format!("held {mode} connection to {} after web.1 left", h.backend))?;
        assert_eq!(
            now, h.backend,
            "a held {mode} connection moved from {} to {now} when web.1 left",
            h.backend
        );
    }
    for n in 0..40 {
        let (task, _) = curl_peer(&cluster, via)?;
        assert_ne!(task, "web.1", "new {mode} connection {n} reached the detached web.1");
    }
    Ok(())
}

#[test]
fn snat_flows_keep_their_backend_while_backends_change() -> Result<()> {
    flows_keep_their_backend_while_backends_change(SNAT_PORT, "snat")
}

#[test]
fn dsr_flows_keep_their_backend_while_backends_change() -> Result<()> {
    flows_keep_their_backend_while_backends_change(DSR_PORT, "dsr")
}

/// The ifindex → name of node `i`'s veths that lead to its tasks (peer in another
/// namespace, not the underlay `eth0`).
fn task_veths(cluster: &Cluster, i: usize) -> Result<Vec<String>> {
    let out = sh("ip", &["-n", &cluster.nodes[i - 1].ns, "-j", "link", "show", "type", "veth"])?;
    let links: Value = serde_json::from_str(&out)?;
    Ok(links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .filter(|n| n != "eth0")
        .collect())
}

/// The names of the BPF programs on `dev`'s tc ingress hook in node `i`'s namespace,
/// asked of the kernel: TCX links (through aya's query) and classic clsact filters.
fn tc_ingress_programs(cluster: &Cluster, i: usize, dev: &str) -> Result<Vec<String>> {
    let ns = cluster.nodes[i - 1].ns.clone();
    let filters = sh("ip", &["netns", "exec", &ns, "tc", "filter", "show", "dev", dev, "ingress"])?;
    let mut names: Vec<String> = filters
        .split_whitespace()
        .filter_map(|w| w.strip_suffix(']').and_then(|w| w.split_once(':')).map(|(n, _)| n.to_owned()))
        .collect();
    let name = dev.to_owned();
    let tcx = in_netns(&cluster.nodes[i - 1].netns(), move || {
        aya::programs::SchedClassifier::query_tcx(&name, aya::programs::tc::TcAttachType::Ingress)
    })?
    .with_context(|| format!("querying the TCX programs of {dev} on n{i}"))?;
    names.extend(tcx.1.iter().filter_map(|p| p.name_as_str().map(str::to_owned)));
    Ok(names)
}

#[test]
fn programs_are_attached_in_the_kernel_and_keep_serving_after_kill_9() -> Result<()> {
    let mut cluster = web_cluster("native")?;
    for i in 1..=3 {
        let link = sh("ip", &["-n", &cluster.nodes[i - 1].ns, "-d", "link", "show", "eth0"])?;
        assert!(link.contains("prog/xdp id"), "n{i}'s eth0 has no native XDP program:\n{link}");
    }
    for i in 1..=2 {
        let veths = task_veths(&cluster, i)?;
        ensure!(!veths.is_empty(), "n{i} has no task veth");
        for dev in &veths {
            let programs = tc_ingress_programs(&cluster, i, dev)?;
            assert!(
                programs.iter().any(|p| p == "ingress_reply"),
                "n{i}'s task veth {dev} has no ingress_reply on its tc ingress hook: {programs:?}"
            );
        }
        let s = status(&cluster, i)?;
        assert_eq!(s["ingress"]["tc_links"].as_u64(), Some(veths.len() as u64), "n{i}: {}", s["ingress"]);
    }

    // meshd on n3 dies without cleanup: its proxy's listeners close with it, so only
    // the pinned XDP program can still answer the published ports there.
    cluster.kill_node(3)?;
    let link = sh("ip", &["-n", &cluster.nodes[2].ns, "-d", "link", "show", "eth0"])?;
    assert!(link.contains("prog/xdp id"), "n3's XDP program went with meshd:\n{link}");
    // (snat: the dsr path has tests of its own above.)
    let addr = SocketAddr::from((node_addr(3), SNAT_PORT));
    let mut reached = BTreeSet::new();
    for n in 0..30 {
        let (task, _) =
            curl_peer(&cluster, addr).with_context(|| format!("curl {n} to {addr} with meshd killed"))?;
        reached.insert(task);
    }
    assert_eq!(reached.len(), 2, "with meshd killed, {addr} reached only {reached:?}");
    // A restarted meshd adopts the programs: still native XDP, counters kept going.
    cluster.restart_node(3)?;
    let s = status(&cluster, 3)?;
    assert_eq!(s["ingress"]["hook"], "xdp-native", "after the restart: {}", s["ingress"]);
    assert!(counter(&s, "encap") > 0, "the restarted meshd reads no encap count: {}", s["ingress"]);
    Ok(())
}

#[test]
fn a_bogus_mode_is_refused_and_publishes_nothing() -> Result<()> {
    let mut cluster = Cluster::start(2)?;
    cluster.meshctl_ok(1, &["network", "create", "net", "--subnet", SUBNET])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "net"])?;
    cluster.add_container(2, "web", "web.1")?;
    let out = cluster.meshctl(1, &["publish", "3000:80", "web", "--mode", "bogus"]);
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert!(!out.status.success(), "--mode bogus was accepted: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(
        stderr.contains("bogus") && stderr.contains("snat") && stderr.contains("dsr"),
        "the error must name the value and the choices: {stderr:?}"
    );
    // A valid publish made after it reaches n2; the refused one never does.
    cluster.meshctl_ok(1, &["publish", "3001:80", "web", "--mode", "dsr"])?;
    wait_kernel_path(&cluster, 2, 3001, "dsr", 1)?;
    for i in 1..=2 {
        let s = status(&cluster, i)?;
        assert!(
            published_path(&s, 3000).is_none(),
            "n{i} serves 3000 after --mode bogus: {}",
            s["published_paths"]
        );
        let ls = cluster.meshctl_ok(i, &["service", "ls"])?;
        assert!(!ls.contains("3000"), "n{i} lists 3000: {ls}");
    }
    Ok(())
}

/// A `/peer` request to `to` from the client's own port `port`; the task that answered.
/// The client reads to the end before closing, so the server closes first and the
/// client's port is free again at once (as a passive closer it keeps no TIME_WAIT;
/// curl closes as soon as it has Content-Length bytes, which races the server's FIN).
fn peer_from_port(cluster: &Cluster, port: u16, to: SocketAddr) -> Result<String> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = in_netns(&cluster.client_netns(), move || -> std::io::Result<Socket> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.bind(&SockAddr::from(SocketAddr::from((CLIENT_ADDR, port))))?;
        socket.connect_timeout(&SockAddr::from(to), Duration::from_secs(3))?;
        Ok(socket)
    })?
    .with_context(|| format!("connecting from client port {port} to {to}"))?;
    let mut stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.write_all(b"GET /peer HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response).with_context(|| format!("reading the answer via {to}"))?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok(parse_peer(body)?.0)
}

#[test]
fn a_client_port_reused_across_frontends_reaches_the_task_each_time() -> Result<()> {
    // One task on n2, published snat (3000) and dsr (3001). The task sees the client's
    // own address and port both through n2:3000 (local DNAT) and through n1:3001
    // (dsr), so both write n2's reverse entry for the same reply key; a load generator
    // reuses client ports across them all the time.
    let mut cluster = Cluster::start(2)?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "net", "--subnet", SUBNET])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "net"])?;
    cluster.add_container(2, "web", "web.1")?;
    cluster.meshctl_ok(1, &["publish", &format!("{SNAT_PORT}:80"), "web"])?;
    cluster.meshctl_ok(1, &["publish", &format!("{DSR_PORT}:80"), "web", "--mode", "dsr"])?;
    for i in 1..=2 {
        wait_kernel_path(&cluster, i, SNAT_PORT, "snat", 1)?;
        wait_kernel_path(&cluster, i, DSR_PORT, "dsr", 1)?;
    }
    let local = SocketAddr::from((node_addr(2), SNAT_PORT));
    let dsr = SocketAddr::from((node_addr(1), DSR_PORT));
    for (step, to) in [local, dsr, local, dsr, local].into_iter().enumerate() {
        let task = peer_from_port(&cluster, 40_000, to).with_context(|| {
            let ss = sh("ip", &["netns", "exec", &cluster.client_ns(), "ss", "-tano"]).unwrap_or_default();
            format!("step {step}; client sockets:\n{ss}")
        })?;
        assert_eq!(task, "web.1", "step {step} via {to}");
    }
    Ok(())
}
