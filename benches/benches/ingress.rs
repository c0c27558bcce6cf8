//! Ingress benchmark (#6): an external client reaching a published port through
//!
//! - **direct**: servers on a node's own underlay address, on n3 (no program there:
//!   the nearest thing to "a backend" an external client can reach without a mesh, one
//!   veth hop from the client like the ingress node, no program on the way);
//! - **tc snat / tc dsr**: n1's published ports (`--xdp tc`),
//!   VXLAN to the task on n2 (snat: replies come back through n1; dsr: n2 answers the
//!   client straight from the published address); **tc local**: n2's published port
//!   of another service, its task on n2 itself (DNAT and redirect to its veth);
//! - **XDP (native) snat / dsr / local**: the same rows through n4, started with
//!   `--xdp native` (its remote rows reach their own task on n2, its local row a task
//!   on n4), so both hooks are compared in one run;
//! - **userspace proxy**: the same published port on n3, whose meshd runs with
//!   `--xdp off` (the fallback every node keeps).
//!
//! Four measurements, each repeated and interleaved (every round starts at the next
//! path, so drifting load hits them alike; medians and the median per-round ratio):
//! TCP throughput (iperf3), new connections per second (wrk, `Connection: close`),
//! the forwarding rate in packets per second (trafgen from the client, a fixed UDP
//! flow: into a published UDP port with its task on the ingress node, n1 for tc and
//! n4 for XDP, vs the same generator into a bare host on the switch (no program) vs
//! through a router namespace with `ip_forward=1` (the kernel's own forwarding), rx
//! packets counted at each receiver), and non-matching traffic (iperf3 to a port
//! nothing publishes) on n1 (tc) and n4 (native XDP) vs n3 (no program).
//!
//! The kernel rows are checked to have gone through the kernel path: the `ingress`
//! counters of n1, n2 and n4 moved and their proxies accepted no connection.
//!
//! `make bench ONLY=ingress` writes `benches/results/ingress.md` and its README
//! section. About 4–5 minutes.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Context as _, Result};
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
/// The XDP node's remote rows (service `web4`, its task on n2).
const HTTP_SNAT4: u16 = 3010;
const HTTP_DSR4: u16 = 3011;
const IPERF_SNAT4: u16 = 5210;
const IPERF_DSR4: u16 = 5211;
/// The same for the XDP node's local row (service `near4`, its task on n4), and its
/// UDP port for trafgen (service `sink4`, task on n4).
const HTTP_LOCAL4: u16 = 3004;
const IPERF_LOCAL4: u16 = 5206;
const UDP_SINK4: u16 = 7004;
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
    // n1 and n2: the tc twin (`--xdp tc`); n3: no kernel path (the proxy's row, direct
    // and non-matching baselines); n4: native XDP (`auto`'s first choice), the same rows
    // through the XDP program.
    let flag = |mode: &str| vec!["--xdp".to_owned(), mode.to_owned()];
    let node_args = vec![(1, flag("tc")), (2, flag("tc")), (3, flag("off")), (4, flag("native"))];
    let mut cluster = Cluster::start_with(4, StartOptions { node_args, ..StartOptions::default() })?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "benchnet", "--subnet", "10.0.0.0/24"])?;
    // `web4`: the XDP node's remote task, its own (on n2 too) because the dsr rows
    // show the task the client's own address and port, and a shared task would meet
    // one row's client ports in the other's TIME_WAIT (measured: the second dsr row
    // fell to 0.23× with one task for both).
    for service in ["web", "web4", "sink", "sink4", "near", "near4"] {
        cluster.meshctl_ok(1, &["service", "create", service, "--network", "benchnet"])?;
    }
    let web = cluster.add_container(2, "web", "web.1")?.netns();
    let web4 = cluster.add_container(2, "web4", "web4.1")?.netns();
    let near = cluster.add_container(2, "near", "near.1")?.netns();
    let near4 = cluster.add_container(4, "near4", "near4.1")?.netns();
    let sink_task = cluster.add_container(1, "sink", "sink.1")?.netns();
    let sink4_task = cluster.add_container(4, "sink4", "sink4.1")?.netns();
    let testsrv = meshd_tests::bin_path("meshd-testsrv")?;
    let testsrv = testsrv.to_string_lossy();
    let (n1, n3, n4) = (cluster.nodes[0].netns(), cluster.nodes[2].netns(), cluster.nodes[3].netns());
    let client = cluster.client_netns();
    let mut servers = vec![
        spawn_in(&web, "iperf3", &["-s", "-p", &DIRECT_IPERF.to_string()])?,
        spawn_in(&web4, "iperf3", &["-s", "-p", &DIRECT_IPERF.to_string()])?,
        spawn_in(&near, "iperf3", &["-s", "-p", &DIRECT_IPERF.to_string()])?,
        spawn_in(&near4, "iperf3", &["-s", "-p", &DIRECT_IPERF.to_string()])?,
        spawn_in(&n3, "iperf3", &["-s", "-p", &DIRECT_IPERF.to_string()])?,
        spawn_in(&n3, &testsrv, &["--name", "n3", "--listen", &format!("0.0.0.0:{DIRECT_HTTP}")])?,
    ];
    for node in [&n1, &n3, &n4] {
        servers.push(spawn_in(node, "iperf3", &["-s", "-p", &UNPUBLISHED_IPERF.to_string()])?);
    }
    for (i, hook) in [(1, "tc"), (2, "tc"), (4, "xdp-native")] {
        let got = cluster.meshctl_json(i, &["status"])?["ingress"]["hook"].clone();
        ensure!(got == hook, "n{i} should serve through {hook} but reports {got}");
    }

    for (spec, service, m) in [
        (format!("{HTTP_SNAT}:80"), "web", "snat"),
        (format!("{IPERF_SNAT}:{DIRECT_IPERF}"), "web", "snat"),
        (format!("{HTTP_DSR}:80"), "web", "dsr"),
        (format!("{IPERF_DSR}:{DIRECT_IPERF}"), "web", "dsr"),
        (format!("{HTTP_SNAT4}:80"), "web4", "snat"),
        (format!("{IPERF_SNAT4}:{DIRECT_IPERF}"), "web4", "snat"),
        (format!("{HTTP_DSR4}:80"), "web4", "dsr"),
        (format!("{IPERF_DSR4}:{DIRECT_IPERF}"), "web4", "dsr"),
        (format!("{HTTP_LOCAL}:80"), "near", "snat"),
        (format!("{IPERF_LOCAL}:{DIRECT_IPERF}"), "near", "snat"),
        (format!("{HTTP_LOCAL4}:80"), "near4", "snat"),
        (format!("{IPERF_LOCAL4}:{DIRECT_IPERF}"), "near4", "snat"),
        (format!("{UDP_SINK}:{UDP_SINK}/udp"), "sink", "snat"),
        (format!("{UDP_SINK4}:{UDP_SINK}/udp"), "sink4", "snat"),
    ] {
        cluster.meshctl_ok(1, &["publish", spec.as_str(), service, "--mode", m])?;
    }
    // The client's ephemeral ports: every path shares the client's 4-tuple space.
    meshd_tests::in_netns(&client, || fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535"))?
        .context("widening the client namespace's ephemeral port range")?;

    let (n1a, n2a, n3a, n4a) = (node_addr(1), node_addr(2), node_addr(3), node_addr(4));
    let remote = [HTTP_SNAT, HTTP_DSR, IPERF_SNAT, IPERF_DSR];
    wait_kernel_paths(&cluster, 1, &[&remote[..], &[UDP_SINK]].concat(), "tc")?;
    wait_kernel_paths(&cluster, 2, &[HTTP_LOCAL, IPERF_LOCAL], "tc")?;
    let remote4 = [HTTP_SNAT4, HTTP_DSR4, IPERF_SNAT4, IPERF_DSR4, HTTP_LOCAL4, IPERF_LOCAL4, UDP_SINK4];
    wait_kernel_paths(&cluster, 4, &remote4, "xdp-native")?;
    let route = |name: &str, addr: Ipv4Addr, http: u16, iperf: u16| Route {
        name: name.into(),
        http: (addr, http).into(),
        iperf: (addr, iperf).into(),
        baseline: false,
    };
    let routes = vec![
        Route {
            baseline: true,
            ..route("direct to a server on n3's address (no program)", n3a, DIRECT_HTTP, DIRECT_IPERF)
        },
        route("tc snat via n1 → task on n2 (goal ≥ 0.9×)", n1a, HTTP_SNAT, IPERF_SNAT),
        route("tc dsr via n1 → task on n2 (goal ≥ 0.9×)", n1a, HTTP_DSR, IPERF_DSR),
        route("tc snat via n2 → task on n2 (local: DNAT + redirect, no VXLAN)", n2a, HTTP_LOCAL, IPERF_LOCAL),
        route("XDP (native) snat via n4 → task on n2", n4a, HTTP_SNAT4, IPERF_SNAT4),
        route("XDP (native) dsr via n4 → task on n2", n4a, HTTP_DSR4, IPERF_DSR4),
        route("XDP (native) snat via n4 → task on n4 (local)", n4a, HTTP_LOCAL4, IPERF_LOCAL4),
        route("userspace proxy via n3 (--xdp off) → task on n2", n3a, HTTP_SNAT, IPERF_SNAT),
    ];
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

    // Non-matching traffic: a port nothing publishes, on nodes with each hook and on
    // one without a program.
    let plain = vec![
        Route { baseline: true, ..route("n3, no program", n3a, 0, UNPUBLISHED_IPERF) },
        route("n1, tc program attached (goal ≥ 0.95×)", n1a, 0, UNPUBLISHED_IPERF),
        route("n4, XDP program attached natively", n4a, 0, UNPUBLISHED_IPERF),
    ];
    let group = "Non-matching TCP through the node (iperf3 to an unpublished port, 2 s)";
    let samples = interleaved(&plain, IPERF_ROUNDS, |round, route| {
        let mbps = iperf3(&client_ns, route.iperf).with_context(|| route.name.clone())?;
        println!("{group}: {:<50} round {round}: {mbps:>8.0} Mbit/s", route.name);
        Ok((mbps, String::new()))
    })?;
    push_rows(&mut rows, group, "Mbit/s", plain.iter().map(|r| (r.name.as_str(), r.baseline)), samples);

    // Forwarding rate: a bare receiver and a router on the switch, beside n1 and n4.
    let sink = cluster.add_underlay_host("sink", SINK_ADDR)?;
    let router = cluster.add_underlay_host("rtr", ROUTER_ADDR)?;
    let routed = cluster.add_netns("routed")?;
    build_router(&router, &routed)?;
    sh("ip", &["-n", &client_ns, "route", "add", ROUTED_NET, "via", &ROUTER_ADDR.to_string()])?;
    // The router resolves the receiver before the generator starts (its first
    // packets would otherwise wait on ARP).
    in_ns(&ns_name(&router), "ping", &["-c1", "-W2", &ROUTED_ADDR.to_string()])?;
    let pps_paths = vec![
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
        PpsPath {
            name: "tc: n1's published UDP port → DNAT + redirect to the task (goal ≥ 0.8× bare, ≥ 2× kernel forwarding)"
                .into(),
            dst_mac: mac_of(&n1, "eth0")?,
            dst: (n1a, UDP_SINK).into(),
            receiver: (ns_name(&sink_task), "eth0".into()),
            baseline: false,
        },
        PpsPath {
            name: "XDP (native): n4's published UDP port → DNAT + redirect to the task's veth".into(),
            dst_mac: mac_of(&n4, "eth0")?,
            dst: (n4a, UDP_SINK4).into(),
            receiver: (ns_name(&sink4_task), "eth0".into()),
            baseline: false,
        },
    ];
    let trafgen_conf = cluster.dir.join("trafgen");
    fs::create_dir_all(&trafgen_conf)?;
    let client_mac = mac_of(&client, "eth0")?;
    let group = "Forwarding rate (trafgen, one UDP flow of 64-byte frames, rx at the receiver)";
    let samples = interleaved_pps(&pps_paths, PPS_ROUNDS, |round, path| {
        let conf = trafgen_conf.join(format!("{}-{}.cfg", path.dst.ip(), path.dst.port()));
        fs::write(&conf, trafgen_frame(&path.dst_mac, &client_mac, CLIENT_ADDR, path.dst))?;
        let (pps, offered) = forwarding_rate(&client, &conf, &path.receiver)?;
        println!("{group}: {:<50} round {round}: {pps:>10.0} pps (offered {offered:.0})", path.name);
        Ok((pps, format!("offered {offered:.0} pps")))
    })?;
    // The goal's second ratio: each program against the kernel's own forwarding,
    // paired by round.
    let vs_kernel: Vec<f64> = samples[2..]
        .iter()
        .map(|program| {
            let mut r: Vec<(f64, String)> =
                program.iter().zip(&samples[1]).map(|(x, k)| (x.0 / k.0, String::new())).collect();
            median(&mut r).0
        })
        .collect();
    push_rows(&mut rows, group, "pps", pps_paths.iter().map(|p| (p.name.as_str(), p.baseline)), samples);
    let n = rows.len();
    for (row, ratio) in rows[n - 2..].iter_mut().zip(vs_kernel) {
        row.detail.push_str(&format!("; per-round ratio to kernel forwarding: median {ratio:.2}×"));
    }
    let after = Counters::read(&cluster)?;

    let note = after_tcp.kernel_path_note(&before)?;
    for row in
        rows.iter_mut().filter(|r| (r.path.starts_with("tc") || r.path.starts_with("XDP")) && r.unit != "pps")
    {
        row.detail.push_str(&format!("; {note}"));
    }
    for (now, then, i, which) in [(&after.n1, &after_tcp.n1, 0, "tc"), (&after.n4, &after_tcp.n4, 3, "XDP")] {
        let local = now["local"].as_u64().unwrap_or(0) - then["local"].as_u64().unwrap_or(0);
        ensure!(
            local > 0,
            "n{}'s program redirected no packet to the local task: the {which} pps row did not go through it",
            i + 1
        );
        if let Some(row) = rows.iter_mut().find(|r| r.path.starts_with(which) && r.unit == "pps") {
            row.detail.push_str(&format!("; n{} local +{local}", i + 1));
        }
    }
    drop(servers.drain(..));
    let text = write_results(
        "ingress",
        "Ingress: tc and XDP vs direct, the proxy, a bare veth and kernel forwarding",
        &rows,
    )?;
    println!("\n{text}");
    Ok(())
}

/// The ingress and proxy counters of n1, n2 and n4 at one moment.
struct Counters {
    n1: Value,
    n2: Value,
    n4: Value,
    /// Connections the proxies of n1, n2 and n4 accepted.
    proxy_accepted: u64,
}

impl Counters {
    fn read(cluster: &Cluster) -> Result<Counters> {
        let mut status = Vec::new();
        for i in [1, 2, 4] {
            status.push(cluster.meshctl_json(i, &["status"])?);
        }
        let proxy_accepted =
            status.iter().map(|s| s["proxy"]["counters"]["tcp_accepted"].as_u64().unwrap_or(0)).sum();
        Ok(Counters {
            n1: status[0]["ingress"]["counters"].clone(),
            n2: status[1]["ingress"]["counters"].clone(),
            n4: status[2]["ingress"]["counters"].clone(),
            proxy_accepted,
        })
    }

    /// Checks that the TCP rows through n1, n2 and n4 were carried by the kernel path,
    /// and says by how much each counter moved.
    fn kernel_path_note(&self, before: &Counters) -> Result<String> {
        let delta = |now: &Value, then: &Value, k: &str| {
            now[k].as_u64().unwrap_or(0).saturating_sub(then[k].as_u64().unwrap_or(0))
        };
        let moved = |now: &Value, then: &Value| {
            ["encap", "reply_xdp", "local", "dsr_recorded", "reply_tc"].map(|k| delta(now, then, k))
        };
        let [e1, r1, _, _, _] = moved(&self.n1, &before.n1);
        let [e4, r4, l4, _, t4] = moved(&self.n4, &before.n4);
        let [_, _, l2, d2, t2] = moved(&self.n2, &before.n2);
        let proxied = self.proxy_accepted - before.proxy_accepted;
        let text = format!(
            "kernel path over the TCP runs: n1 (tc) encap +{e1}, reply_xdp +{r1}; n2 (tc) local +{l2}, dsr_recorded +{d2}, reply_tc +{t2}; n4 (XDP) encap +{e4}, reply_xdp +{r4}, local +{l4}, reply_tc +{t4}; the proxies of n1, n2 and n4 accepted +{proxied}"
        );
        ensure!(
            [e1, r1, l2, d2, t2, e4, r4, l4, t4].iter().all(|&c| c > 0) && proxied == 0,
            "the kernel rows did not all go through the kernel path: {text}"
        );
        Ok(text)
    }
}

/// Waits until node `i` serves every port in `ports` through `hook` (its
/// `kernel_path`).
fn wait_kernel_paths(cluster: &Cluster, i: usize, ports: &[u16], hook: &str) -> Result<()> {
    poll(&format!("n{i} serves the published ports through {hook}"), Duration::from_secs(20), || {
        let status = cluster.meshctl_json(i, &["status"])?;
        let paths = status["published_paths"].as_array().cloned().unwrap_or_default();
        for port in ports {
            let path = paths
                .iter()
                .find(|p| p["port"].as_str().is_some_and(|s| s.starts_with(&format!("{port}/"))))
                .ok_or_else(|| anyhow!("port {port} not in published_paths: {status}"))?;
            let kernel = path["kernel_path"].as_str().unwrap_or("");
            ensure!(kernel == hook, "port {port} is served by {kernel:?}: {}", status["ingress"]);
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
