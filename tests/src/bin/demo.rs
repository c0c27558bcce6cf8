//! `make demo`: a three-node meshd cluster in network namespaces, with services
//! `mvcapp` (5 tasks) and `mysql` (a real MariaDB server as task `mysql.1`),
//! `meshctl publish 3000:80 mvcapp`, a handful of requests from an external client
//! landing on different tasks through the XDP path, the same service published in
//! `dsr` mode (the tasks see the client's own address), and the real `mariadb` client in an `mvcapp` container
//! querying `mysql:3306` by name (embedded DNS + socket load balancing).
//! Everything is torn down on exit or Ctrl-C.

use std::{
    io::IsTerminal,
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{bail, Result};
use meshd_tests::{http_get, mariadb, node_addr, remove_prefix, Cluster, CLIENT_ADDR};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

const PREFIX: &str = "meshdemo";

fn step(text: &str) {
    println!("\n\x1b[1m==> {text}\x1b[0m");
}

fn show(cluster: &Cluster, node: usize, args: &[&str]) -> Result<()> {
    println!("$ meshctl {}   # on n{node}", args.join(" "));
    print!("{}", cluster.meshctl_ok(node, args)?);
    Ok(())
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

/// Fails once Ctrl-C was pressed, so `?` unwinds into the cluster's teardown.
fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted; cluster torn down");
    }
    Ok(())
}

fn main() -> Result<()> {
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action)? };
    }
    remove_prefix(PREFIX);

    step("starting 3 meshd nodes on the underlay 198.18.0.0/24 (namespaces meshdemo-n1..n3)");
    let mut cluster = Cluster::start_with_prefix(3, PREFIX)?;
    show(&cluster, 1, &["node", "ls"])?;
    check_stop()?;

    step("creating overlay network `backend` and services `mvcapp`, `mysql`");
    show(&cluster, 1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    show(&cluster, 1, &["service", "create", "mvcapp", "--network", "backend"])?;
    show(&cluster, 1, &["service", "create", "mysql", "--network", "backend"])?;

    step("attaching 5 mvcapp tasks on n2 and n3, and mysql.1 (a real MariaDB server) on n2");
    for (node, task) in [(2, "mvcapp.1"), (3, "mvcapp.2"), (2, "mvcapp.3"), (3, "mvcapp.4"), (2, "mvcapp.5")]
    {
        let c = cluster.add_container(node, "mvcapp", task)?;
        println!("  {task:<9} on n{node}  {}", c.ip);
    }
    let mysql = cluster.add_empty_container(2, "mysql", "mysql.1")?;
    let (mysql_ns, mysql_ip) = (mysql.netns(), mysql.ip);
    let _mariadb = mariadb::MariaDb::start(&mysql_ns, &cluster.nodes[1].cgroup, &cluster.dir, "mysql.1")?;
    println!("  mysql.1   on n2  {mysql_ip}:3306  (mariadbd)");
    check_stop()?;
    meshd_tests::poll("n2 sees all five mvcapp tasks", Duration::from_secs(10), || {
        let tasks = cluster.meshctl_json(2, &["service", "ps", "mvcapp"])?;
        anyhow::ensure!(tasks.as_array().map_or(0, Vec::len) == 5, "not yet");
        Ok(())
    })?;
    show(&cluster, 2, &["service", "ps", "mvcapp"])?;

    step("publishing: meshctl publish 3000:80 mvcapp");
    show(&cluster, 1, &["publish", "3000:80", "mvcapp"])?;
    let client = cluster.client_netns();
    for i in 1..=3 {
        meshd_tests::poll("port 3000 answers", Duration::from_secs(10), || {
            http_get(&client, SocketAddr::from((node_addr(i), 3000))).map(drop)
        })?;
    }

    check_stop()?;
    step(&format!("requests from the external client {CLIENT_ADDR} to port 3000 of every node"));
    for i in 1..=3 {
        let mut answers = Vec::new();
        for _ in 0..5 {
            answers.push(http_get(&client, SocketAddr::from((node_addr(i), 3000)))?);
        }
        println!("  curl http://{}:3000/  x5  ->  {}", node_addr(i), answers.join(" "));
    }
    show(&cluster, 2, &["service", "ls"])?;
    for i in 1..=3 {
        let status = cluster.meshctl_json(i, &["status"])?;
        let port = &status["published_paths"][0];
        let counters = &status["ingress"]["counters"];
        println!(
            "  n{i}: remote clients of {} served by {} (XDP counters: local {}, encapsulated {}, replies {})",
            port["port"].as_str().unwrap_or("?"),
            port["remote_clients"].as_str().unwrap_or("?"),
            counters["local"],
            counters["encap"],
            counters["reply_xdp"].as_u64().unwrap_or(0) + counters["reply_tc"].as_u64().unwrap_or(0),
        );
    }

    check_stop()?;
    step("direct server return: meshctl publish 3001:80 mvcapp --mode dsr");
    show(&cluster, 1, &["publish", "3001:80", "mvcapp", "--mode", "dsr"])?;
    let enter = format!("--net={}", client.display());
    for i in 1..=3 {
        let url = format!("http://{}:3001/peer", node_addr(i));
        let answer = meshd_tests::poll("port 3001 answers", Duration::from_secs(10), || {
            meshd_tests::sh("nsenter", &[&enter, "--", "curl", "-sf", "--max-time", "2", &url])
        })?;
        println!("  curl {url}  ->  {}   (task, and the client address it saw)", answer.trim());
    }

    check_stop()?;
    step("from mvcapp.2's container on n3: `mariadb -h mysql -P 3306` (resolved by meshd on 127.0.0.11, balanced by eBPF)");
    let app_ns = cluster.containers.iter().find(|c| c.task == "mvcapp.2").expect("attached above").ns.clone();
    mariadb::use_embedded_resolver(&app_ns)?;
    let vip = meshd_tests::poll("mysql resolves", Duration::from_secs(10), || {
        let out =
            meshd_tests::sh("ip", &["netns", "exec", &app_ns, "dig", "+short", "@127.0.0.11", "mysql"])?;
        anyhow::ensure!(!out.trim().is_empty(), "no answer yet");
        Ok(out.trim().to_owned())
    })?;
    println!("  dig +short @127.0.0.11 mysql          ->  {vip}   (the service VIP)");
    let node3 = cluster.nodes[2].cgroup.clone();
    let row = meshd_tests::poll("mariadb answers", Duration::from_secs(15), || {
        mariadb::query(&app_ns, &node3, "mysql", "SELECT name FROM tasks")
    })?;
    println!("  mariadb -h mysql -e 'SELECT name FROM tasks'  ->  {row}");
    let peer = mariadb::query(&app_ns, &node3, "mysql", "SELECT SUBSTRING_INDEX(USER(), '@', -1)")?;
    println!("  the server saw the client as {peer} (the container itself: no proxy hop)");

    let meshctl = meshd_tests::bin_path("meshctl")?;
    step("try it yourself");
    println!("  sudo ip netns exec {PREFIX}-ext curl -s http://198.18.0.12:3000/");
    println!("  sudo {} --socket {} service ps mvcapp", meshctl.display(), cluster.nodes[0].socket.display());
    println!("  sudo {} --socket {} node ls", meshctl.display(), cluster.nodes[2].socket.display());
    println!("  sudo {} --socket {} status", meshctl.display(), cluster.nodes[1].socket.display());

    if std::io::stdin().is_terminal() && std::env::var_os("CI").is_none() {
        println!("\nThe cluster runs until you press Ctrl-C.");
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    step("tearing down");
    drop(cluster);
    println!("done");
    Ok(())
}
