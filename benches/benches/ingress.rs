//! Ingress benchmark (#6): an external client reaching a published port through
//!
//! - **direct**: servers on a node's own underlay address, on n3 (no XDP program there:
//!   the nearest thing to "a backend" an external client can reach without a mesh, one
//!   veth hop from the client like the ingress node, no program on the way);
//! - **XDP snat / XDP dsr**: n1's published ports, served by the XDP program on n1's
//!   underlay interface and VXLAN to the task on n2 (snat: replies come back through
//!   n1; dsr: n2 answers the client straight from the published address);
//! - **XDP snat, local task**: n2's published port of another service, its task on n2
//!   itself (DNAT and redirect to its veth, tc on the way back): the same program
//!   without the overlay;
//! - **userspace proxy**: the same published port on n3, whose meshd runs with
//!   `--xdp off` (the fallback every node keeps).
//!
//! Four measurements, each repeated and interleaved (every round starts at the next
//! path, so drifting load hits them alike; medians and the median per-round ratio):
//! TCP throughput (iperf3), new connections per second (wrk, `Connection: close`),
//! the forwarding rate in packets per second (trafgen from the client, a fixed UDP
//! flow: into n1's published UDP port with the task on n1 (XDP DNAT + redirect to the
//! task's veth) vs the same generator into a bare host on the switch (no program) vs
//! through a router namespace with `ip_forward=1` (the kernel's own forwarding), rx
//! packets counted at each receiver), and non-matching traffic (iperf3 to a port
//! nothing publishes) on n1 (program attached natively) and n4 (`--xdp generic`) vs
//! n3 (no program).
//!
//! The XDP rows are checked to have gone through the kernel path: n1's `ingress`
//! counters (`encap`, `reply_xdp`, `local`) and n2's (`dsr_recorded`, `reply_tc`) moved
//! and n1's proxy accepted no connection.
//!
//! `make bench ONLY=ingress` writes `benches/results/ingress.md` and its README
//! section. About 2–3 minutes.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use meshd_benches::{in_ns, median, parse_iperf3, parse_wrk, write_results, Row};
use meshd_tests::{http_get, node_addr, poll, sh, spawn_in, Cluster, StartOptions, CLIENT_ADDR};
use serde_json::Value;

/// Repeats of each path's connection rate, interleaved.
const WRK_ROUNDS: usize = 3;
/// Repeats of each path's throughput, interleaved.
const IPERF_ROUNDS: usize = 3;
/// Repeats of each forwarding-rate path, interleaved.
const PPS_ROUNDS: usize = 5;
/// Length of one wrk run.
const WRK_SECONDS: &str = "2s";
/// Length of one iperf3 run (seconds).
const IPERF_SECONDS: &str = "2";
/// Generator warm-up before the receiver's counter is read.
const PPS_WARMUP: Duration = Duration::from_millis(500);
/// The window over which the receiver's packets are counted.
const PPS_WINDOW: Duration = Duration::from_millis(1500);
/// Upper bound on the packets one trafgen run sends (it is stopped after the window;
/// this bounds it even if the bench dies first, with `timeout` below).
const PPS_MAX_PACKETS: &str = "30000000";

/// Published ports: HTTP and iperf3 in each mode, and the UDP port for trafgen.
const HTTP_SNAT: u16 = 3000;
const HTTP_DSR: u16 = 3001;
const IPERF_SNAT: u16 = 5202;
const IPERF_DSR: u16 = 5203;
const UDP_SINK: u16 = 7000;
/// Published ports of the local row's own service (a task on n2 reached via n2): its
/// own task, because the dsr and local rows both show the task the client's own
/// address and port, and a shared task would meet each row's client ports in the
/// other's TIME_WAIT.
const HTTP_LOCAL: u16 = 3002;
const IPERF_LOCAL: u16 = 5204;
/// Servers on the nodes' own addresses: direct HTTP, and iperf3 for direct and
/// non-matching traffic (nothing is published on these ports).
const DIRECT_HTTP: u16 = 8080;
const DIRECT_IPERF: u16 = 5201;
const UNPUBLISHED_IPERF: u16 = 5301;

/// The bare receiver and the router on the switch, and the network behind the router.
const SINK_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);
const ROUTER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 201);
const ROUTED_NET: &str = "198.18.1.0/24";
const ROUTER_INNER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const ROUTED_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

fn ns_name(netns: &Path) -> String {
    netns.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// One measured TCP path: where wrk and iperf3 connect.
struct Route {
    name: String,
    http: SocketAddr,
    iperf: SocketAddr,
    baseline: bool,
}

/// One forwarding-rate path: where trafgen sends, and whose `eth0` counts.
struct PpsPath {
    name: String,
    /// The frame's destination MAC (the next hop's).
    dst_mac: String,
    dst: SocketAddr,
    /// Namespace and interface whose rx packets count.
    receiver: (String, String),
    baseline: bool,
}

fn main() -> Result<()> {
    let meshd = meshd_tests::bin_path("meshd")?;
    let help = sh(&meshd.to_string_lossy(), &["--help"])?;
    // Until #6's loader lands the agent has no `--xdp`: the baseline rows still run.
    let has_xdp = help.contains("--xdp");
    // n3 runs without XDP (the proxy's row, direct and non-matching baselines); n4 with
    // XDP in generic mode, for the non-matching row only.
    let flag = |mode: &str| vec!["--xdp".to_owned(), mode.to_owned()];
    let node_args = if has_xdp { vec![(3, flag("off")), (4, flag("generic"))] } else { vec![] };
    let nodes = if has_xdp { 4 } else { 3 };
    let mut cluster = Cluster::start_with(nodes, StartOptions { node_args, ..StartOptions::default() })?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "benchnet", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "benchnet"])?;
    cluster.meshctl_ok(1, &["service", "create", "sink", "--network", "benchnet"])?;
    cluster.meshctl_ok(1, &["service", "create", "near", "--network", "benchnet"])?;
    let web = cluster.add_container(2, "web", "web.1")?.netns();
    let near = cluster.add_container(2, "near", "near.1")?.netns();
    let sink_task = cluster.add_container(1, "sink", "sink.1")?.netns();
    let testsrv = meshd_tests::bin_path("meshd-testsrv")?;
    let testsrv = testsrv.to_string_lossy();
    let (n1, n3) = (cluster.nodes[0].netns(), cluster.nodes[2].netns());
    let client = cluster.client_netns();
    let mut servers = vec![
        spawn_in(&web, "iperf3", &["-s", "-p", &DIRECT_IPERF.to_string()])?,
        spawn_in(&near, "iperf3", &["-s", "-p", &DIRECT_IPERF.to_string()])?,
        spawn_in(&n3, "iperf3", &["-s", "-p", &DIRECT_IPERF.to_string()])?,
        spawn_in(&n3, &testsrv, &["--name", "n3", "--listen", &format!("0.0.0.0:{DIRECT_HTTP}")])?,
        spawn_in(&n1, "iperf3", &["-s", "-p", &UNPUBLISHED_IPERF.to_string()])?,
        spawn_in(&n3, "iperf3", &["-s", "-p", &UNPUBLISHED_IPERF.to_string()])?,
    ];
    if has_xdp {
        let n4 = cluster.nodes[3].netns();
        servers.push(spawn_in(&n4, "iperf3", &["-s", "-p", &UNPUBLISHED_IPERF.to_string()])?);
        let xdp = cluster.meshctl_json(4, &["status"])?["ingress"]["xdp"].clone();
        ensure!(xdp == "generic", "n4 was started with --xdp generic but reports {xdp}");
    }

    let mode = |m: &'static str| if has_xdp { vec!["--mode", m] } else { vec![] };
    for (spec, service, m) in [
        (format!("{HTTP_SNAT}:80"), "web", "snat"),
        (format!("{IPERF_SNAT}:{DIRECT_IPERF}"), "web", "snat"),
        (format!("{UDP_SINK}:{UDP_SINK}/udp"), "sink", "snat"),
    ]
    .into_iter()
    .chain(has_xdp.then(|| (format!("{HTTP_DSR}:80"), "web", "dsr")))
    .chain(has_xdp.then(|| (format!("{IPERF_DSR}:{DIRECT_IPERF}"), "web", "dsr")))
    .chain(has_xdp.then(|| (format!("{HTTP_LOCAL}:80"), "near", "snat")))
    .chain(has_xdp.then(|| (format!("{IPERF_LOCAL}:{DIRECT_IPERF}"), "near", "snat")))
    {
        let mut args = vec!["publish", spec.as_str(), service];
        args.extend(mode(m));
        cluster.meshctl_ok(1, &args)?;
    }
    // The client's ephemeral ports: every path shares the client's 4-tuple space.
    meshd_tests::in_netns(&client, || fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535"))?
        .context("widening the client namespace's ephemeral port range")?;

    let (n1a, n3a) = (node_addr(1), node_addr(3));
    let mut routes = vec![Route {
        name: "direct to a server on n3's address (no program)".into(),
        http: (n3a, DIRECT_HTTP).into(),
        iperf: (n3a, DIRECT_IPERF).into(),
        baseline: true,
    }];
    if has_xdp {
        wait_kernel_paths(
            &cluster,
            &[HTTP_SNAT, HTTP_DSR, IPERF_SNAT, IPERF_DSR, UDP_SINK, HTTP_LOCAL, IPERF_LOCAL],
        )?;
        routes.push(Route {
            name: "XDP snat via n1 → task on n2 (goal ≥ 0.9×)".into(),
            http: (n1a, HTTP_SNAT).into(),
            iperf: (n1a, IPERF_SNAT).into(),
            baseline: false,
        });
        routes.push(Route {
            name: "XDP dsr via n1 → task on n2 (goal ≥ 0.9×)".into(),
            http: (n1a, HTTP_DSR).into(),
            iperf: (n1a, IPERF_DSR).into(),
            baseline: false,
        });
        // The same program without the overlay hop: the task runs on the ingress node.
        routes.push(Route {
            name: "XDP snat via n2 → task on n2 (local: DNAT + redirect, no VXLAN)".into(),
            http: (node_addr(2), HTTP_LOCAL).into(),
            iperf: (node_addr(2), IPERF_LOCAL).into(),
            baseline: false,
        });
    }
    routes.push(Route {
        name: format!(
            "userspace proxy via {} → task on n2",
            if has_xdp { "n3 (--xdp off)" } else { "n3 (no XDP in this build)" }
        ),
        http: (n3a, HTTP_SNAT).into(),
        iperf: (n3a, IPERF_SNAT).into(),
        baseline: false,
    });
    for route in &routes {
        poll(&format!("{} answers", route.name), Duration::from_secs(20), || http_get(&client, route.http))?;
    }
    let client_ns = cluster.client_ns();
    for route in &routes {
        let url = format!("http://{}/", route.http);
        parse_wrk(&in_ns(&client_ns, "wrk", &["-t1", "-c1", "-d1s", "-H", "Connection: close", &url])?)
            .with_context(|| format!("warming up {}", route.name))?;
    }

    let before = Counters::read(&cluster)?;
    let mut rows = Vec::new();
    let group = "New TCP connection per request (wrk -t2 -c32, Connection: close)";
    let samples = interleaved(&routes, WRK_ROUNDS, |round, route| {
        let url = format!("http://{}/", route.http);
        let out = in_ns(
            &client_ns,
            "wrk",
            &["-t2", "-c32", "-d", WRK_SECONDS, "--latency", "-H", "Connection: close", &url],
        )?;
        let (rps, detail) = parse_wrk(&out).with_context(|| route.name.clone())?;
        println!("{group}: {:<50} round {round}: {rps:>8.0} conn/s  {detail}", route.name);
        Ok((rps, detail))
    })?;
    push_rows(&mut rows, group, "conn/s", routes.iter().map(|r| (r.name.as_str(), r.baseline)), samples);

    let group = "TCP throughput (iperf3, one stream, 2 s)";
    let samples = interleaved(&routes, IPERF_ROUNDS, |round, route| {
        let mbps = iperf3(&client_ns, route.iperf).with_context(|| route.name.clone())?;
        println!("{group}: {:<50} round {round}: {mbps:>8.0} Mbit/s", route.name);
        Ok((mbps, String::new()))
    })?;
    push_rows(&mut rows, group, "Mbit/s", routes.iter().map(|r| (r.name.as_str(), r.baseline)), samples);
    let after_tcp = Counters::read(&cluster)?;

    // Non-matching traffic: a port nothing publishes, on a node with the program and on
    // one without.
    let mut plain = vec![
        Route {
            name: "n3, no XDP program".into(),
            http: (n3a, 0).into(),
            iperf: (n3a, UNPUBLISHED_IPERF).into(),
            baseline: true,
        },
        Route {
            name: if has_xdp {
                "n1, XDP program attached natively (goal ≥ 0.95×)".into()
            } else {
                "n1 (no XDP in this build)".into()
            },
            http: (n1a, 0).into(),
            iperf: (n1a, UNPUBLISHED_IPERF).into(),
            baseline: false,
        },
    ];
    if has_xdp {
        plain.push(Route {
            name: "n4, XDP program attached in generic mode (--xdp generic)".into(),
            http: (node_addr(4), 0).into(),
            iperf: (node_addr(4), UNPUBLISHED_IPERF).into(),
            baseline: false,
        });
    }
    let group = "Non-matching TCP through the node (iperf3 to an unpublished port, 2 s)";
    let samples = interleaved(&plain, IPERF_ROUNDS, |round, route| {
        let mbps = iperf3(&client_ns, route.iperf).with_context(|| route.name.clone())?;
        println!("{group}: {:<50} round {round}: {mbps:>8.0} Mbit/s", route.name);
        Ok((mbps, String::new()))
    })?;
    push_rows(&mut rows, group, "Mbit/s", plain.iter().map(|r| (r.name.as_str(), r.baseline)), samples);

    // Forwarding rate: a bare receiver and a router on the switch, beside n1.
    let sink = cluster.add_underlay_host("sink", SINK_ADDR)?;
    let router = cluster.add_underlay_host("rtr", ROUTER_ADDR)?;
    let routed = cluster.add_netns("routed")?;
    build_router(&router, &routed)?;
    sh("ip", &["-n", &client_ns, "route", "add", ROUTED_NET, "via", &ROUTER_ADDR.to_string()])?;
    // The router resolves the receiver before the generator starts (its first
    // packets would otherwise wait on ARP).
    in_ns(&ns_name(&router), "ping", &["-c1", "-W2", &ROUTED_ADDR.to_string()])?;
    let mut pps_paths = vec![
        PpsPath {
            name: "bare veth: a host on the switch, no program".into(),
            dst_mac: mac_of(&sink, "eth0")?,
            dst: (SINK_ADDR, UDP_SINK).into(),
            receiver: (ns_name(&sink), "eth0".into()),
            baseline: true,
        },
        PpsPath {
            name: "kernel forwarding: a router namespace (ip_forward=1)".into(),
            dst_mac: mac_of(&router, "eth0")?,
            dst: (ROUTED_ADDR, UDP_SINK).into(),
            receiver: (ns_name(&routed), "eth0".into()),
            baseline: false,
        },
    ];
    pps_paths.push(PpsPath {
        name: if has_xdp {
            "XDP: n1's published UDP port → DNAT + redirect to the task's veth (goal ≥ 0.8× bare, ≥ 2× kernel forwarding)".into()
        } else {
            "n1's published UDP port (no XDP in this build: the proxy's socket)".into()
        },
        dst_mac: mac_of(&n1, "eth0")?,
        dst: (n1a, UDP_SINK).into(),
        receiver: (ns_name(&sink_task), "eth0".into()),
        baseline: false,
    });
    let trafgen_conf = cluster.dir.join("trafgen");
    fs::create_dir_all(&trafgen_conf)?;
    let client_mac = mac_of(&client, "eth0")?;
    let group = "Forwarding rate (trafgen, one UDP flow of 64-byte frames, rx at the receiver)";
    let samples = interleaved_pps(&pps_paths, PPS_ROUNDS, |round, path| {
        let conf = trafgen_conf.join(format!("{}.cfg", path.dst.port()));
        fs::write(&conf, trafgen_frame(&path.dst_mac, &client_mac, CLIENT_ADDR, path.dst))?;
        let (pps, offered) = forwarding_rate(&client, &conf, &path.receiver)?;
        println!("{group}: {:<50} round {round}: {pps:>10.0} pps (offered {offered:.0})", path.name);
        Ok((pps, format!("offered {offered:.0} pps")))
    })?;
    // The goal's second ratio: XDP against the kernel's own forwarding, paired by round.
    let (kernel, xdp) = (&samples[1], &samples[2]);
    let mut vs_kernel: Vec<(f64, String)> =
        xdp.iter().zip(kernel).map(|(x, k)| (x.0 / k.0, String::new())).collect();
    let (vs_kernel, _) = median(&mut vs_kernel);
    push_rows(&mut rows, group, "pps", pps_paths.iter().map(|p| (p.name.as_str(), p.baseline)), samples);
    if let Some(row) = rows.last_mut() {
        row.detail.push_str(&format!("; per-round ratio to kernel forwarding: median {vs_kernel:.2}×"));
    }
    let after = Counters::read(&cluster)?;

    if has_xdp {
        let note = after_tcp.kernel_path_note(&before)?;
        for row in rows.iter_mut().filter(|r| r.path.starts_with("XDP") && r.unit != "pps") {
            row.detail.push_str(&format!("; {note}"));
        }
        let local = after.n1["local"].as_u64().unwrap_or(0) - after_tcp.n1["local"].as_u64().unwrap_or(0);
        ensure!(
            local > 0,
            "n1's XDP program redirected no packet to the local task: the XDP pps row did not go through it"
        );
        if let Some(row) = rows.iter_mut().find(|r| r.path.starts_with("XDP") && r.unit == "pps") {
            row.detail.push_str(&format!("; n1 local +{local}"));
        }
    }
    drop(servers.drain(..));
    let text = write_results(
        "ingress",
        "Ingress: XDP/tc vs direct, the proxy, a bare veth and kernel forwarding",
        &rows,
    )?;
    println!("\n{text}");
    if !has_xdp {
        bail!("meshd has no --xdp flag: only the baseline rows ran (the XDP rows need #6's loader)");
    }
    Ok(())
}

/// The ingress and proxy counters of n1 and n2 at one moment.
struct Counters {
    n1: Value,
    n2: Value,
    n1_proxy_accepted: u64,
    n2_proxy_accepted: u64,
}

impl Counters {
    fn read(cluster: &Cluster) -> Result<Counters> {
        let s1 = cluster.meshctl_json(1, &["status"])?;
        let s2 = cluster.meshctl_json(2, &["status"])?;
        Ok(Counters {
            n1: s1["ingress"]["counters"].clone(),
            n2: s2["ingress"]["counters"].clone(),
            n1_proxy_accepted: s1["proxy"]["counters"]["tcp_accepted"].as_u64().unwrap_or(0),
            n2_proxy_accepted: s2["proxy"]["counters"]["tcp_accepted"].as_u64().unwrap_or(0),
        })
    }

    /// Checks that the TCP rows through n1 were carried by the kernel path, and says by
    /// how much each counter moved.
    fn kernel_path_note(&self, before: &Counters) -> Result<String> {
        let delta = |now: &Value, then: &Value, k: &str| {
            now[k].as_u64().unwrap_or(0).saturating_sub(then[k].as_u64().unwrap_or(0))
        };
        let encap = delta(&self.n1, &before.n1, "encap");
        let reply_xdp = delta(&self.n1, &before.n1, "reply_xdp");
        let dsr = delta(&self.n2, &before.n2, "dsr_recorded");
        let reply_tc = delta(&self.n2, &before.n2, "reply_tc");
        let local = delta(&self.n2, &before.n2, "local");
        let proxied = (self.n1_proxy_accepted - before.n1_proxy_accepted)
            + (self.n2_proxy_accepted - before.n2_proxy_accepted);
        ensure!(
            encap > 0 && reply_xdp > 0 && dsr > 0 && reply_tc > 0 && local > 0 && proxied == 0,
            "the XDP rows did not all go through the kernel path: n1 encap +{encap}, reply_xdp +{reply_xdp}; n2 local +{local}, dsr_recorded +{dsr}, reply_tc +{reply_tc}; n1's and n2's proxies accepted +{proxied}"
        );
        Ok(format!(
            "kernel path over the TCP runs: n1 encap +{encap}, reply_xdp +{reply_xdp}; n2 local +{local}, dsr_recorded +{dsr}, reply_tc +{reply_tc}; n1's and n2's proxies accepted +0"
        ))
    }
}

/// Waits until n1 serves every port in `ports` through XDP (`kernel_path` `xdp-*`).
fn wait_kernel_paths(cluster: &Cluster, ports: &[u16]) -> Result<()> {
    poll("n1 serves the published ports through XDP", Duration::from_secs(20), || {
        let status = cluster.meshctl_json(1, &["status"])?;
        let paths = status["published_paths"].as_array().cloned().unwrap_or_default();
        for port in ports {
            let path = paths
                .iter()
                .find(|p| p["port"].as_str().is_some_and(|s| s.starts_with(&format!("{port}/"))))
                .ok_or_else(|| anyhow!("port {port} not in published_paths: {status}"))?;
            let kernel = path["kernel_path"].as_str().unwrap_or("");
            ensure!(kernel.starts_with("xdp-"), "port {port} is served by {kernel:?}: {}", status["ingress"]);
        }
        Ok(())
    })
}

/// One bounded iperf3 run from the client; Mbit/s received.
fn iperf3(client_ns: &str, to: SocketAddr) -> Result<f64> {
    let port = to.port().to_string();
    let out = in_ns(
        client_ns,
        "iperf3",
        &["-c", &to.ip().to_string(), "-p", &port, "-t", IPERF_SECONDS, "--connect-timeout", "2000", "-J"],
    )?;
    Ok(parse_iperf3(&out)? / 1e6)
}

/// Makes `router` forward between the switch and `routed` (a veth pair, addresses on
/// 198.18.1.0/24, `ip_forward=1` in the router's namespace only).
fn build_router(router: &Path, routed: &Path) -> Result<()> {
    let (r, d) = (ns_name(router), ns_name(routed));
    sh("ip", &["-n", &r, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", &d])?;
    sh("ip", &["-n", &r, "addr", "add", &format!("{ROUTER_INNER}/24"), "dev", "eth1"])?;
    sh("ip", &["-n", &r, "link", "set", "eth1", "up"])?;
    sh("ip", &["-n", &d, "addr", "add", &format!("{ROUTED_ADDR}/24"), "dev", "eth0"])?;
    sh("ip", &["-n", &d, "link", "set", "eth0", "up"])?;
    sh("ip", &["-n", &d, "link", "set", "lo", "up"])?;
    sh("ip", &["-n", &d, "route", "add", "default", "via", &ROUTER_INNER.to_string()])?;
    meshd_tests::in_netns(router, || fs::write("/proc/sys/net/ipv4/ip_forward", "1"))?
        .context("enabling forwarding in the router namespace")
}

/// The MAC address of `dev` in the namespace at `netns`.
fn mac_of(netns: &Path, dev: &str) -> Result<String> {
    let out = sh("ip", &["-n", &ns_name(netns), "-j", "link", "show", dev])?;
    let v: Value = serde_json::from_str(&out)?;
    v[0]["address"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no MAC for {dev}: {out}"))
}

/// rx packets of `dev` in namespace `ns`.
fn rx_packets(ns: &str, dev: &str) -> Result<u64> {
    let out = sh("ip", &["-n", ns, "-s", "-j", "link", "show", dev])?;
    let v: Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["rx"]["packets"].as_u64().ok_or_else(|| anyhow!("no rx packets for {dev} in {ns}: {out}"))
}

/// tx packets of `dev` in namespace `ns`.
fn tx_packets(ns: &str, dev: &str) -> Result<u64> {
    let out = sh("ip", &["-n", ns, "-s", "-j", "link", "show", dev])?;
    let v: Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["tx"]["packets"].as_u64().ok_or_else(|| anyhow!("no tx packets for {dev} in {ns}: {out}"))
}

/// A trafgen configuration: one 60-byte Ethernet frame (64 on the wire with the FCS
/// trafgen does not send) carrying a UDP datagram `from:40000 → to`, IPv4 header
/// checksum computed by trafgen, UDP checksum 0 (allowed over IPv4).
fn trafgen_frame(dst_mac: &str, src_mac: &str, from: Ipv4Addr, to: SocketAddr) -> String {
    let mac = |m: &str| m.split(':').map(|b| format!("0x{b}")).collect::<Vec<_>>().join(", ");
    let ip = |a: Ipv4Addr| a.octets().map(|o| o.to_string()).join(", ");
    let SocketAddr::V4(to) = to else { unreachable!("IPv4 only") };
    format!(
        "{{\n  {}, {}, c16(0x0800),\n  0x45, 0x00, c16(46), c16(0), c16(0x4000), 64, 17, csumip(14, 33),\n  {}, {},\n  c16(40000), c16({}), c16(26), c16(0),\n  fill(0x41, 18)\n}}\n",
        mac(dst_mac),
        mac(src_mac),
        ip(from),
        ip(*to.ip()),
        to.port()
    )
}

/// Runs trafgen in the client's namespace with `conf`, one CPU, and returns the rate
/// at which `receiver` received packets over [`PPS_WINDOW`] and the rate the client
/// sent over the same window. trafgen is bounded by a packet count and `timeout`, and
/// stopped by its PID right after the window.
fn forwarding_rate(client: &Path, conf: &Path, receiver: &(String, String)) -> Result<(f64, f64)> {
    let conf = conf.to_string_lossy();
    let client_ns = ns_name(client);
    // `--no-sock-mem`/`--notouch-irq`: trafgen must not retune the host's socket
    // memory or IRQ affinity.
    let generator = spawn_in(
        client,
        "timeout",
        &[
            "10",
            "trafgen",
            "--no-sock-mem",
            "--notouch-irq",
            "-C",
            "-P",
            "1",
            "-o",
            "eth0",
            "-i",
            &conf,
            "-n",
            PPS_MAX_PACKETS,
        ],
    )?;
    // The generator is sending once the client's tx counter moves.
    let tx0 = tx_packets(&client_ns, "eth0")?;
    poll("trafgen sends", Duration::from_secs(5), || {
        ensure!(tx_packets(&client_ns, "eth0")? > tx0 + 1000, "trafgen has not started sending");
        Ok(())
    })?;
    std::thread::sleep(PPS_WARMUP);
    let (rx_a, tx_a, t_a) =
        (rx_packets(&receiver.0, &receiver.1)?, tx_packets(&client_ns, "eth0")?, Instant::now());
    std::thread::sleep(PPS_WINDOW);
    let (rx_b, tx_b, t_b) =
        (rx_packets(&receiver.0, &receiver.1)?, tx_packets(&client_ns, "eth0")?, Instant::now());
    drop(generator);
    let secs = (t_b - t_a).as_secs_f64();
    Ok(((rx_b - rx_a) as f64 / secs, (tx_b - tx_a) as f64 / secs))
}

/// Measures every route `rounds` times; each round starts at the next route.
fn interleaved(
    routes: &[Route],
    rounds: usize,
    mut measure: impl FnMut(usize, &Route) -> Result<(f64, String)>,
) -> Result<Vec<Vec<(f64, String)>>> {
    interleave(routes.len(), rounds, |round, i| measure(round, &routes[i]))
}

/// [`interleaved`] for forwarding-rate paths.
fn interleaved_pps(
    paths: &[PpsPath],
    rounds: usize,
    mut measure: impl FnMut(usize, &PpsPath) -> Result<(f64, String)>,
) -> Result<Vec<Vec<(f64, String)>>> {
    interleave(paths.len(), rounds, |round, i| measure(round, &paths[i]))
}

/// `samples[path][round]`; round `r` measures path `(r + k) % n` as its `k`th.
fn interleave(
    n: usize,
    rounds: usize,
    mut measure: impl FnMut(usize, usize) -> Result<(f64, String)>,
) -> Result<Vec<Vec<(f64, String)>>> {
    let mut samples = vec![Vec::with_capacity(rounds); n];
    for round in 0..rounds {
        for k in 0..n {
            let i = (round + k) % n;
            samples[i].push(measure(round, i)?);
        }
    }
    Ok(samples)
}

/// One row per path: the median of its runs, every run, and the median of its
/// per-round ratios to the group's baseline.
fn push_rows<'a>(
    rows: &mut Vec<Row>,
    group: &str,
    unit: &str,
    paths: impl Iterator<Item = (&'a str, bool)>,
    samples: Vec<Vec<(f64, String)>>,
) {
    let paths: Vec<(&str, bool)> = paths.collect();
    let base = paths.iter().position(|p| p.1).and_then(|i| samples.get(i)).cloned();
    for ((name, baseline), mut runs) in paths.into_iter().zip(samples) {
        let all: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.0)).collect();
        let mut detail = format!("median of {}; runs: {}", runs.len(), all.join(" / "));
        if let (Some(base), false) = (&base, baseline) {
            let mut ratios: Vec<(f64, String)> =
                runs.iter().zip(base).map(|(r, b)| (r.0 / b.0, String::new())).collect();
            let (paired, _) = median(&mut ratios);
            let (lo, hi) = (ratios[0].0, ratios[ratios.len() - 1].0);
            detail.push_str(&format!("; per-round ratio to baseline: median {paired:.2}× ({lo:.2}–{hi:.2})"));
        }
        let (value, extra) = median(&mut runs);
        if !extra.is_empty() {
            detail.push_str(&format!("; median run's {extra}"));
        }
        rows.push(Row { group: group.into(), path: name.into(), value, unit: unit.into(), detail, baseline });
    }
}
