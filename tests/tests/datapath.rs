//! The closed loop between meshd and the kernel: what meshd programmed is read back
//! and repaired (hand-deleted entries, broken task links), what went stale while meshd
//! was down is removed after a restart, a restart of meshd does not interrupt the
//! containers' traffic, and objects meshd does not own are never touched.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use meshd_tests::{in_netns, poll, sh, Cluster};

/// One reconcile period (1 s) plus room for a loaded machine.
const ONE_PERIOD: Duration = Duration::from_secs(3);

/// Runs a command inside the network namespace `ns`.
fn ns_sh(ns: &Path, args: &[&str]) -> Result<String> {
    let net = format!("--net={}", ns.display());
    let mut full = vec![net.as_str(), "--"];
    full.extend_from_slice(args);
    sh("nsenter", &full)
}

/// Creates a network, a service and one container on each of the given nodes.
fn cluster_with_tasks(nodes: usize, placement: &[usize]) -> Result<Cluster> {
    let mut cluster = Cluster::start(nodes)?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    for (i, &node) in placement.iter().enumerate() {
        cluster.add_container(node, "web", &format!("web.{}", i + 1))?;
    }
    Ok(cluster)
}

fn fdb(node_ns: &Path) -> Result<String> {
    ns_sh(node_ns, &["bridge", "fdb", "show", "dev", "mvx4096"])
}

fn neigh(node_ns: &Path) -> Result<String> {
    ns_sh(node_ns, &["ip", "neigh", "show", "dev", "mvx4096"])
}

/// Objects meshd does not own, in a node's namespace: a VXLAN device of another VNI
/// and port with an FDB entry and a neighbour, a veth pair, and a rule with meshd's
/// priority but not its protocol.
fn add_foreign_objects(node_ns: &Path) -> Result<()> {
    ns_sh(
        node_ns,
        &["ip", "link", "add", "fvx9", "type", "vxlan", "id", "9", "dstport", "4790", "local", "198.18.0.11"],
    )?;
    ns_sh(node_ns, &["ip", "link", "set", "fvx9", "up"])?;
    ns_sh(
        node_ns,
        &[
            "bridge",
            "fdb",
            "add",
            "02:42:0a:09:00:05",
            "dev",
            "fvx9",
            "dst",
            "198.18.0.99",
            "self",
            "permanent",
        ],
    )?;
    ns_sh(
        node_ns,
        &["ip", "neigh", "add", "10.9.0.5", "lladdr", "02:42:0a:09:00:05", "dev", "fvx9", "nud", "permanent"],
    )?;
    ns_sh(node_ns, &["ip", "link", "add", "fveth0", "type", "veth", "peer", "name", "fveth1"])?;
    // An operator's veth whose name merely starts like meshd's task veths (`mv` + 8 hex).
    ns_sh(node_ns, &["ip", "link", "add", "mvlan0", "type", "veth", "peer", "name", "mvlan1"])?;
    ns_sh(
        node_ns,
        &["ip", "rule", "add", "from", "10.9.0.0/24", "to", "10.8.0.0/24", "priority", "1000", "prohibit"],
    )?;
    Ok(())
}

fn assert_foreign_objects_intact(node_ns: &Path, when: &str) -> Result<()> {
    let fdb = ns_sh(node_ns, &["bridge", "fdb", "show", "dev", "fvx9"])?;
    assert!(fdb.contains("02:42:0a:09:00:05 dst 198.18.0.99"), "{when}: foreign FDB entry gone: {fdb}");
    let neigh = ns_sh(node_ns, &["ip", "neigh", "show", "dev", "fvx9"])?;
    assert!(neigh.contains("10.9.0.5 lladdr 02:42:0a:09:00:05"), "{when}: foreign neighbour gone: {neigh}");
    let links = ns_sh(node_ns, &["ip", "-o", "link"])?;
    assert!(
        links.contains("fveth0") && links.contains("fvx9") && links.contains("mvlan0"),
        "{when}: foreign link gone: {links}"
    );
    let rules = ns_sh(node_ns, &["ip", "rule", "show"])?;
    assert!(rules.contains("from 10.9.0.0/24 to 10.8.0.0/24 prohibit"), "{when}: foreign rule gone: {rules}");
    Ok(())
}

#[test]
fn hand_deleted_fdb_entry_and_neighbour_come_back_and_foreign_objects_are_never_touched() -> Result<()> {
    // n1 takes part in the network through web.1; web.2 on n2 is its remote peer.
    let mut cluster = cluster_with_tasks(2, &[1, 2])?;
    let node_ns = cluster.nodes[0].netns();
    let task = &cluster.containers[1];
    let (ip, mac) = (task.ip.to_string(), ipam_mac(task.ip));
    poll("n1 programs the FDB entry and neighbour of web.1", Duration::from_secs(10), || {
        let (f, n) = (fdb(&node_ns)?, neigh(&node_ns)?);
        (f.contains(&format!("{mac} dst 198.18.0.12")) && n.contains(&format!("{ip} lladdr {mac}")))
            .then_some(())
            .ok_or_else(|| anyhow!("fdb: {f}\nneigh: {n}"))
    })?;
    add_foreign_objects(&node_ns)?;

    ns_sh(&node_ns, &["bridge", "fdb", "del", &mac, "dev", "mvx4096", "dst", "198.18.0.12", "self"])?;
    ns_sh(&node_ns, &["ip", "neigh", "del", &ip, "dev", "mvx4096"])?;
    let deleted = Instant::now();
    poll("the FDB entry and neighbour come back", ONE_PERIOD, || {
        let (f, n) = (fdb(&node_ns)?, neigh(&node_ns)?);
        (f.contains(&format!("{mac} dst 198.18.0.12 self permanent"))
            && n.contains(&format!("{ip} lladdr {mac} PERMANENT")))
        .then_some(())
        .ok_or_else(|| anyhow!("fdb: {f}\nneigh: {n}"))
    })
    .map_err(|e| e.context(cluster.log_tail(1, 30)))?;
    eprintln!("restored after {:?}", deleted.elapsed());
    // Reconciles ran (the repair is one); nothing foreign was touched by them.
    assert_foreign_objects_intact(&node_ns, "after reconciles")?;

    cluster.stop_node(1)?;
    cluster.restart_node(1)?;
    // Wait for a reconcile after the start to have happened: status reports what it
    // observed. The peers are web.2 and n2's own address, plus n2's spare address if
    // IPAM holds one (it pre-programs spares).
    poll("n1 adopted its peer after the restart", Duration::from_secs(10), || {
        let status = cluster.meshctl_json(1, &["status"])?;
        (status["overlay_peers"].as_u64().is_some_and(|n| n >= 2)
            && status["overlays"] == 1
            && status["local_tasks"] == 1)
            .then_some(())
            .ok_or_else(|| anyhow!("{status}"))
    })?;
    assert_foreign_objects_intact(&node_ns, "after a restart")?;

    // --cleanup removes meshd's own objects and only those.
    cluster.stop_node(1)?;
    let meshd = meshd_tests::bin_path("meshd")?;
    let socket = cluster.nodes[0].socket.to_string_lossy().into_owned();
    ns_sh(&node_ns, &[&meshd.to_string_lossy(), "--cleanup", "--api-socket", &socket])?;
    let links = ns_sh(&node_ns, &["ip", "-o", "link"])?;
    assert!(
        !links.contains("mvx4096") && !links.contains("mbr4096"),
        "--cleanup removes the overlay: {links}"
    );
    let rules = ns_sh(&node_ns, &["ip", "rule", "show"])?;
    assert!(!rules.contains("proto 109"), "--cleanup removes meshd's rules: {rules}");
    assert_foreign_objects_intact(&node_ns, "after --cleanup")?;
    Ok(())
}

/// The MAC meshd gives an overlay address (as `ipam::mac_for_ip`).
fn ipam_mac(ip: std::net::Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("02:42:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

#[test]
fn a_broken_task_link_is_reapplied() -> Result<()> {
    let cluster = cluster_with_tasks(1, &[1])?;
    let task = &cluster.containers[0];
    let (ns, ip) = (task.netns(), task.ip);
    let healthy = || -> Result<()> {
        let addr = ns_sh(&ns, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"])?;
        let route = ns_sh(&ns, &["ip", "route", "show", "default"])?;
        if !addr.contains(&format!("{ip}/24")) || !route.contains("via 10.0.0.") {
            bail!("eth0: {addr} route: {route}");
        }
        // And it carries traffic: the node's overlay address answers a ping.
        let gw = route.split_whitespace().nth(2).unwrap_or_default().to_owned();
        ns_sh(&ns, &["ping", "-c", "1", "-W", "1", &gw]).map(drop)
    };
    healthy()?;

    ns_sh(&ns, &["ip", "addr", "flush", "dev", "eth0"])?;
    poll("eth0's address comes back", ONE_PERIOD, healthy).map_err(|e| e.context(cluster.log_tail(1, 30)))?;

    ns_sh(&ns, &["ip", "link", "del", "eth0"])?;
    poll("eth0 comes back", ONE_PERIOD, healthy).map_err(|e| e.context(cluster.log_tail(1, 30)))?;
    Ok(())
}

#[test]
fn objects_that_went_stale_while_meshd_was_down_are_removed_after_kill_9() -> Result<()> {
    let mut cluster = cluster_with_tasks(2, &[1, 2])?;
    let node_ns = cluster.nodes[1].netns();
    let remote_mac = ipam_mac(cluster.containers[0].ip);
    poll("n2 programs web.1's FDB entry", Duration::from_secs(10), || {
        let f = fdb(&node_ns)?;
        f.contains(&remote_mac).then_some(()).ok_or_else(|| anyhow!("{f}"))
    })?;
    let task_if = |links: &str| {
        links
            .lines()
            .find(|l| l.contains(": mv") && !l.contains("mv0badc0de"))
            .map(|l| l.split(':').next().unwrap_or("").to_owned())
    };
    let veths = || ns_sh(&node_ns, &["ip", "-o", "link", "show", "type", "veth"]);
    let before = task_if(&veths()?).ok_or_else(|| anyhow!("n2 has no task veth"))?;

    cluster.kill_node(2)?;
    // While n2's meshd is down: web.1 is detached on n1, and a veth left half-made by a
    // meshd killed in the middle of an attach lies in n2's namespace.
    cluster.meshctl_ok(1, &["detach", "web.1"])?;
    ns_sh(&node_ns, &["ip", "link", "add", "mv0badc0de", "type", "veth", "peer", "name", "mv0badc0dep"])?;
    cluster.restart_node(2)?;

    poll("web.1's FDB entry and neighbour and the orphan veth are removed", Duration::from_secs(10), || {
        let (f, n) = (fdb(&node_ns)?, neigh(&node_ns)?);
        let links = ns_sh(&node_ns, &["ip", "-o", "link"])?;
        (!f.contains(&remote_mac) && !n.contains(&remote_mac) && !links.contains("mv0badc0de"))
            .then_some(())
            .ok_or_else(|| anyhow!("fdb: {f}\nneigh: {n}\nlinks: {links}"))
    })
    .map_err(|e| e.context(cluster.log_tail(2, 30)))?;
    // web.2's link was adopted, not re-created: same interface index.
    assert_eq!(
        task_if(&veths()?).as_deref(),
        Some(before.as_str()),
        "web.2's veth kept its index across the restart"
    );
    Ok(())
}

/// A TCP stream from namespace `from` to `to` (listening in namespace `to_ns`): one
/// small write every 10 ms until `stop` (at most 120 s); returns the bytes the far side
/// received and the bytes sent.
fn tcp_stream(
    from: &Path,
    to_ns: &Path,
    to: SocketAddr,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<Result<(u64, u64)>>> {
    let listener = in_netns(to_ns, move || TcpListener::bind(to))??;
    let server = std::thread::spawn(move || -> Result<u64> {
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = [0u8; 4096];
        let mut total = 0u64;
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    });
    let from = from.to_owned();
    Ok(std::thread::spawn(move || -> Result<(u64, u64)> {
        let mut conn = in_netns(&from, move || TcpStream::connect_timeout(&to, Duration::from_secs(2)))??;
        conn.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut sent = 0u64;
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            conn.write_all(&[0x5a; 64]).context("writing to the stream")?;
            sent += 64;
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(conn);
        let received = server.join().map_err(|_| anyhow!("server thread panicked"))??;
        Ok((received, sent))
    }))
}

#[test]
fn restarts_of_either_meshd_lose_no_packet_between_containers() -> Result<()> {
    let mut cluster = cluster_with_tasks(2, &[1, 2])?;
    let (a, b) = (cluster.containers[0].netns(), cluster.containers[1].netns());
    let b_ip = cluster.containers[1].ip;
    poll("web.1 reaches web.2", Duration::from_secs(10), || {
        ns_sh(&a, &["ping", "-c", "1", "-W", "1", &b_ip.to_string()])
    })?;

    // 400 pings 50 ms apart (20 s) and a TCP stream run across four restarts.
    let ping = Command::new("nsenter")
        .arg(format!("--net={}", a.display()))
        .args(["--", "ping", "-q", "-i", "0.05", "-c", "400", "-W", "1", &b_ip.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stream = tcp_stream(&a, &b, SocketAddr::from((b_ip, 5001)), stop.clone())?;

    for node in [1, 2] {
        let status = cluster.stop_node(node)?;
        assert!(status.success(), "n{node}'s meshd exits cleanly on SIGTERM: {status}");
        cluster.restart_node(node)?;
        cluster.kill_node(node)?;
        cluster.restart_node(node)?;
    }
    // Let both restarted agents reconcile at least once before the traffic ends.
    poll("both nodes report their peer again", Duration::from_secs(10), || {
        // Peers: the other task and node, plus the other node's spare address if IPAM
        // holds one.
        for i in [1, 2] {
            let status = cluster.meshctl_json(i, &["status"])?;
            if status["overlay_peers"].as_u64().is_none_or(|n| n < 2) || status["local_tasks"] != 1 {
                bail!("n{i}: {status}");
            }
        }
        Ok(())
    })?;
    stop.store(true, Ordering::Relaxed);
    let (received, sent) = stream.join().map_err(|_| anyhow!("stream thread panicked"))??;
    assert_eq!(received, sent, "the TCP stream lost nothing");
    let out = ping.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("400 packets transmitted, 400 received"),
        "ping lost packets across the restarts: {text}"
    );
    Ok(())
}
