//! Addresses at scale and after a partition, and commands that return when what they
//! report is true — against real meshd nodes in network namespaces.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use meshd_tests::{http_get, node_addr, poll, Cluster};

/// `free` of network `name` in node `i`'s `network ls`.
fn free_addresses(cluster: &Cluster, i: usize, name: &str) -> Result<u64> {
    let rows = cluster.meshctl_json(i, &["network", "ls"])?;
    rows.as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == name)
        .and_then(|r| r["free"].as_u64())
        .ok_or_else(|| anyhow!("n{i} does not list network {name}: {rows}"))
}

/// Task name → address, from `service ps` on node `i`.
fn task_ips(cluster: &Cluster, i: usize, service: &str) -> Result<BTreeMap<String, Ipv4Addr>> {
    let rows = cluster.meshctl_json(i, &["service", "ps", service])?;
    rows.as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let ip = r["ip"].as_str().ok_or_else(|| anyhow!("no ip in {r}"))?.parse()?;
            Ok((r["task"].as_str().unwrap_or_default().to_owned(), ip))
        })
        .collect()
}

#[test]
fn a_slash_24_serves_a_published_port_on_all_20_nodes() -> Result<()> {
    let n = 20;
    let mut cluster = Cluster::start(n)?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    cluster.add_container(2, "web", "web.1")?;
    cluster.add_container(3, "web", "web.2")?;
    // Every node alive again right before the publish: on 2 cores, twenty meshd
    // verifying and attaching their programs at once can get one briefly suspected,
    // and publish then (truthfully) counts only the alive ones.
    cluster.wait_all_alive(1)?;
    let out = cluster.meshctl_ok(1, &["publish", "3000:80", "web"])?;
    assert_eq!(out.trim(), format!("published 3000:80/tcp for service web: served on all {n} nodes"));

    // publish returned: every node answers now, from the external client.
    let client = cluster.client_netns();
    for i in 1..=n {
        let body = http_get(&client, SocketAddr::from((node_addr(i), 3000)))
            .map_err(|e| e.context(cluster.log_tail(i, 30)))?;
        assert!(body == "web.1" || body == "web.2", "n{i} answered {body:?}");
    }
    // Every node holds its own address on the network, all distinct, none in error.
    let mut node_ips = BTreeMap::new();
    for i in 1..=n {
        let status = cluster.meshctl_json(i, &["status"])?;
        assert_eq!(status["errors"], serde_json::json!({}), "n{i}: {status}");
        assert_eq!(status["published_ports"], serde_json::json!(["3000/tcp"]), "n{i}: {status}");
        // The task table reaches a node that joined for the port shortly after.
        poll(&format!("n{i} sees both tasks"), Duration::from_secs(5), || {
            let ps = task_ips(&cluster, i, "web")?;
            (ps.len() == 2).then_some(()).ok_or_else(|| {
                let status = cluster.meshctl_json(i, &["status"]).unwrap_or_default();
                anyhow!("{ps:?}; gossip counters: {}", status["gossip"]["counters"])
            })
        })?;
        node_ips.insert(i, free_addresses(&cluster, i, "backend")?);
    }
    // 20 node addresses, 2 tasks and web's VIP, plus at most one spare per node, are claimed.
    for (i, free) in node_ips {
        assert!((254 - 23 - 20..=254 - 23).contains(&free), "n{i}: {free} free addresses");
    }
    Ok(())
}

#[test]
fn a_full_network_is_reported_by_attach_and_in_status() -> Result<()> {
    let mut cluster = Cluster::start(2)?;
    cluster.wait_all_alive(1)?;
    // A /29 has 6 usable addresses: VIPs, node addresses and tasks share them.
    cluster.meshctl_ok(1, &["network", "create", "tiny", "--subnet", "10.0.7.0/29"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "tiny"])?;
    // web's VIP, n1's address and four tasks fill it.
    for t in 1..=4 {
        cluster.add_container(1, "web", &format!("web.{t}"))?;
    }
    assert_eq!(free_addresses(&cluster, 1, "tiny")?, 0);
    let ns = cluster.add_netns("extra")?;
    let out = cluster.meshctl(1, &["attach", "web", "--netns", &ns.to_string_lossy(), "--name", "web.6"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attach to a full network must fail");
    assert!(
        stderr.contains("network tiny (10.0.7.0/29) is full: all 6 addresses are taken")
            && stderr.contains("detach tasks or create a network with a larger subnet"),
        "{stderr}"
    );
    // A published port needs n2 on the network: it cannot get an address and says so,
    // in its status and in publish's answer.
    let out = cluster.meshctl(1, &["publish", "3000:80", "web"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "publish must fail: n2 cannot serve");
    assert!(
        stderr.contains("published 3000:80/tcp for service web, but after 10s it is not served on node n2")
            && stderr.contains("network tiny (10.0.7.0/29) is full"),
        "{stderr}"
    );
    let status = cluster.meshctl_json(2, &["status"])?;
    let error = status["errors"]["address on tiny"].as_str().unwrap_or_default();
    assert!(
        error.contains("cannot take part in network tiny for published port 3000/tcp")
            && error.contains("is full"),
        "{status}"
    );
    // Detaching a task frees an address: n2 joins and serves.
    cluster.meshctl_ok(1, &["detach", "web.4"])?;
    poll("n2 serves 3000", Duration::from_secs(10), || {
        let body = http_get(&cluster.client_netns(), SocketAddr::from((node_addr(2), 3000)))?;
        body.starts_with("web.").then_some(()).ok_or_else(|| anyhow!("answered {body}"))
    })?;
    let status = cluster.meshctl_json(2, &["status"])?;
    assert_eq!(status["errors"], serde_json::json!({}), "{status}");
    Ok(())
}

#[test]
fn a_duplicate_address_after_a_partition_is_readdressed() -> Result<()> {
    let mut cluster = Cluster::start(3)?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.9.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    // A watcher on n2, on n1's side of the partition to come.
    cluster.add_container(2, "web", "web.2")?;
    // Before the partition every node knows every claim: web's VIP, the spares of n1
    // and n3, and n2's address, task and spare.
    for i in 1..=3 {
        poll(&format!("n{i} sees every claim"), Duration::from_secs(10), || {
            let free = free_addresses(&cluster, i, "backend")?;
            (free == 248).then_some(()).ok_or_else(|| anyhow!("{free} free"))
        })?;
    }
    cluster.partition(&[3])?;
    for (observer, node) in [(1, 3), (3, 1)] {
        poll(&format!("n{observer} declares n{node} dead"), Duration::from_secs(30), || {
            let state = cluster.member_state(observer, node)?;
            (state == "dead").then_some(()).ok_or_else(|| anyhow!("{state}"))
        })?;
    }
    // n1 attaches a task from an address claimed during the partition (its spare went
    // to its own node address); n3, which cannot know, is asked for the same address.
    cluster.add_container(1, "web", "web.1")?;
    let taken = cluster.containers[1].ip;
    cluster.add_task_with(3, "web", "web.3", 80, &["--ip", &taken.to_string()])?;
    assert_eq!(cluster.containers[2].ip, taken, "both sides handed out {taken}");

    cluster.heal()?;
    // Within a bounded time: no duplicate, both answer at their final addresses, from
    // a container on n2.
    let watcher = cluster.containers[0].netns();
    let started = Instant::now();
    let finals = poll("the duplicate is resolved", Duration::from_secs(40), || {
        let mut views = Vec::new();
        for i in 1..=3 {
            views.push(task_ips(&cluster, i, "web")?);
        }
        let ips = &views[0];
        if views[1..].iter().any(|v| v != ips) || ips.len() != 3 {
            bail!("nodes disagree or miss tasks: {views:?}");
        }
        let distinct: std::collections::BTreeSet<_> = ips.values().collect();
        if distinct.len() != 3 {
            bail!("duplicate remains: {ips:?}");
        }
        for task in ["web.1", "web.3"] {
            let body = http_get(&watcher, SocketAddr::from((ips[task], 80)))?;
            if body != task {
                bail!("{} answered {body:?}, not {task}", ips[task]);
            }
        }
        Ok(ips.clone())
    })?;
    eprintln!("duplicate resolved {:?} after the heal: {finals:?}", started.elapsed());
    // Exactly one moved; the older keeps the address; its node reports the move.
    let moved: Vec<&str> = ["web.1", "web.3"].into_iter().filter(|t| finals[*t] != taken).collect();
    assert_eq!(moved.len(), 1, "exactly one task moves: {finals:?}");
    let node = if moved[0] == "web.1" { 1 } else { 3 };
    let status = cluster.meshctl_json(node, &["status"])?;
    assert_eq!(status["ipam"]["readdressed"], 1, "{status}");
    let recent = status["ipam"]["recent_readdresses"][0].as_str().unwrap_or_default();
    assert!(
        recent.starts_with(&format!(
            "{} on network backend moved from {taken} to {}",
            moved[0], finals[moved[0]]
        )),
        "{status}"
    );
    let other = 4 - node;
    assert_eq!(cluster.meshctl_json(other, &["status"])?["ipam"]["readdressed"], 0);
    Ok(())
}

#[test]
fn create_and_publish_return_once_every_node_knows_and_serves() -> Result<()> {
    let n = 4;
    let cluster = Cluster::start(n)?;
    cluster.wait_all_alive(1)?;
    let out = cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    assert_eq!(
        out.trim(),
        format!("network backend created (subnet 10.0.0.0/24, vni 4096): known to all {n} nodes")
    );
    let out = cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    assert!(
        out.trim().starts_with("service web created with VIP 10.0.0.")
            && out.trim().ends_with(&format!(": known to all {n} nodes")),
        "{out}"
    );
    // Any node can be used next: attach on n3 right away.
    let ns = cluster.add_netns("t1")?;
    cluster.meshctl_ok(3, &["attach", "web", "--netns", &ns.to_string_lossy(), "--name", "web.1"])?;
    let server = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .arg("--")
        .arg(meshd_tests::bin_path("meshd-testsrv")?)
        .args(["--name", "web.1", "--listen", "0.0.0.0:80"])
        .stdin(std::process::Stdio::null())
        .spawn()?;
    let mut server = Guard(server);
    let ip: Ipv4Addr = task_ips(&cluster, 3, "web")?["web.1"];
    poll("web.1 serves HTTP", Duration::from_secs(10), || {
        let body = http_get(&ns, SocketAddr::from((ip, 80)))?;
        (body == "web.1").then_some(()).ok_or_else(|| anyhow!("{body}"))
    })?;

    // A service without tasks: every node listens, and the answer says so.
    cluster.meshctl_ok(1, &["service", "create", "idle", "--network", "backend"])?;
    let out = cluster.meshctl_ok(1, &["publish", "3002:80", "idle"])?;
    assert_eq!(
        out.trim(),
        format!("published 3002:80/tcp for service idle: listening on all {n} nodes; idle has no running task yet")
    );

    // --detach returns at once and says it did not wait.
    let out = cluster.meshctl_ok(2, &["publish", "3001:80", "web", "--detach"])?;
    assert!(out.contains("not waiting for the nodes to serve it (--detach)"), "{out}");

    let out = cluster.meshctl_ok(1, &["publish", "3000:80", "web"])?;
    assert_eq!(out.trim(), format!("published 3000:80/tcp for service web: served on all {n} nodes"));
    let client = cluster.client_netns();
    for i in 1..=n {
        assert_eq!(http_get(&client, SocketAddr::from((node_addr(i), 3000)))?, "web.1", "n{i}");
    }

    // A node where another process holds the port: publish fails as soon as that node
    // reports it, names the node and the holder, and is rolled back
    // (tests/publish_conflict.rs checks that nothing stays published).
    let holder =
        meshd_tests::in_netns(&cluster.nodes[3].netns(), || std::net::TcpListener::bind("0.0.0.0:3005"))??;
    let out = cluster.meshctl(1, &["publish", "3005:80", "web"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "publish must fail while n4 cannot listen");
    assert!(
        stderr.contains(
            "cannot publish 3005:80/tcp for service web: on node n4, cannot listen on 0.0.0.0:3005 (tcp)"
        ) && stderr.contains("held by")
            && stderr.contains("nothing was published"),
        "{stderr}"
    );
    drop(holder);
    server.0.kill()?;
    server.0.wait()?;
    Ok(())
}

/// Kills the wrapped process on drop (a failed assertion must not leave it running).
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
