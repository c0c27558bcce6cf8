//! The end-to-end scenario that defines the walking skeleton: three real meshd nodes,
//! an overlay network, five tasks on nodes 2 and 3, a port published from node 1 and
//! answered on every node.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use anyhow::{anyhow, Result};
use meshd_tests::{http_get, node_addr, poll, refused, Cluster};

#[test]
fn published_port_answers_on_every_node_and_reaches_every_task() -> Result<()> {
    let mut cluster = Cluster::start(3)?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "mvcapp", "--network", "backend"])?;
    let placement = [(2, "mvcapp.1"), (3, "mvcapp.2"), (2, "mvcapp.3"), (3, "mvcapp.4"), (2, "mvcapp.5")];
    for (node, task) in placement {
        cluster.add_container(node, "mvcapp", task)?;
    }
    let tasks: BTreeSet<String> = placement.iter().map(|(_, t)| t.to_string()).collect();

    // Task addresses are unique.
    let ips: BTreeSet<_> = cluster.containers.iter().map(|c| c.ip).collect();
    assert_eq!(
        ips.len(),
        5,
        "duplicate task IPs: {:?}",
        cluster.containers.iter().map(|c| c.ip).collect::<Vec<_>>()
    );

    cluster.meshctl_ok(1, &["publish", "3000:80", "mvcapp"])?;
    let client = cluster.client_netns();

    // From outside: every node answers 3000, and together they reach all five tasks.
    let mut reached = BTreeSet::new();
    for i in 1..=3 {
        let addr = SocketAddr::from((node_addr(i), 3000));
        // The publish reaches nodes 2 and 3 through the control plane: wait until each
        // has programmed all five tasks (the cluster state can be ahead of a node's
        // dataplane by a reconcile pass).
        cluster.wait_serving(i, "3000/tcp", 5)?;
        let mut per_node = BTreeSet::new();
        for n in 0..50 {
            let body = http_get(&client, addr).map_err(|e| e.context(format!("request {n} to n{i}")))?;
            assert!(tasks.contains(&body), "n{i} answered {body:?}, not a task of mvcapp");
            per_node.insert(body);
        }
        assert_eq!(per_node, tasks, "50 requests to n{i} must reach every task (round-robin)");
        reached.extend(per_node);
    }
    assert_eq!(reached, tasks);

    // East-west: a container on node 3 reaches a task on node 2 by its overlay IP.
    let on3 = cluster.containers.iter().find(|c| c.node == 3).expect("a task on n3");
    let on2 = cluster.containers.iter().find(|c| c.node == 2).expect("a task on n2");
    assert_eq!(http_get(&on3.netns(), SocketAddr::from((on2.ip, 80)))?, on2.task);

    // Unpublish on node 1: every node refuses 3000 within a second.
    cluster.meshctl_ok(1, &["unpublish", "3000", "mvcapp"])?;
    for i in 1..=3 {
        poll(&format!("n{i} refuses port 3000"), Duration::from_secs(1), || {
            refused(&client, SocketAddr::from((node_addr(i), 3000)))?
                .then_some(())
                .ok_or_else(|| anyhow!("still accepts"))
        })?;
    }
    Ok(())
}

#[test]
fn status_shows_the_loaded_program_and_paths_sigterm_keeps_the_data_path_and_cleanup_removes_it() -> Result<()>
{
    let mut cluster = Cluster::start(1)?;
    let status = cluster.meshctl_json(1, &["status"])?;
    let program = &status["ebpf"][0];
    // bpftool, the kernel's own tool, sees it attached to the node's cgroup.
    let cgroup_path = cluster.nodes[0].cgroup.to_string_lossy().into_owned();
    let attached = meshd_tests::sh("bpftool", &["cgroup", "show", &cgroup_path])?;
    assert!(attached.contains("connect4") && attached.contains(&program["id"].to_string()), "{attached}");
    assert_eq!(program["name"], "connect4", "{status}");
    assert!(program["id"].as_u64().unwrap_or(0) > 0, "{status}");
    assert_eq!(program["attached_to"], cluster.nodes[0].cgroup.to_string_lossy().as_ref());

    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    let task_ns = cluster.add_container(1, "web", "web.1")?.netns();
    cluster.meshctl_ok(1, &["publish", "3000:80", "web"])?;
    // Which path serves what: the VIP and local clients of 3000 by the socket LB,
    // remote clients of 3000 by the XDP program on the underlay (native on veth).
    poll("status lists the serving paths", std::time::Duration::from_secs(5), || {
        let status = cluster.meshctl_json(1, &["status"])?;
        let vip = &status["vips"][0];
        let port = &status["published_paths"][0];
        let ok = vip["service"] == "web"
            && vip["path"] == "socket-lb"
            && vip["backends"].as_array().is_some_and(|b| b.len() == 1)
            && port["port"] == "3000/tcp"
            && port["local_clients"] == "socket-lb"
            && port["remote_clients"] == "xdp-native";
        ok.then_some(()).ok_or_else(|| anyhow!("{} {}", status["vips"], status["published_paths"]))
    })?;
    let node_ns = cluster.nodes[0].netns();
    let links = |ns: &std::path::Path| {
        meshd_tests::sh("nsenter", &[&format!("--net={}", ns.display()), "--", "ip", "-o", "link"])
    };
    assert!(links(&node_ns)?.contains("mvx4096"), "VXLAN device exists while meshd runs");

    // The program sees connect() calls made from the node's cgroup: run one from a
    // process placed there (to a closed port on the node itself).
    let cgroup = cluster.nodes[0].cgroup.clone();
    let mut probe = std::process::Command::new("nsenter")
        .arg(format!("--net={}", node_ns.display()))
        .args(["--", "bash", "-c", "read _; exec 3<>/dev/tcp/198.18.0.11/9"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::fs::write(cgroup.join("cgroup.procs"), probe.id().to_string())?;
    drop(probe.stdin.take());
    probe.wait()?;
    poll("connect4 counts the probe", std::time::Duration::from_secs(5), || {
        let seen = cluster.meshctl_json(1, &["status"])?["ebpf"][0]["seen"].as_u64().unwrap_or(0);
        (seen >= 1).then_some(()).ok_or_else(|| anyhow!("seen = {seen}"))
    })?;
    let prog_id = program_id(&cluster)?;

    let status = cluster.stop_node(1)?;
    assert!(status.success(), "meshd exits cleanly on SIGTERM: {status}");
    // SIGTERM keeps the data path (a restart must not cut the containers off)...
    let after = links(&node_ns)?;
    assert!(after.contains("mvx4096") && after.contains("mbr4096"), "overlay links kept: {after}");
    assert!(links(&task_ns)?.contains("eth0"), "task interface kept");
    // ...and so are the pinned socket programs (local clients keep reaching VIPs).
    let attached = meshd_tests::sh("bpftool", &["cgroup", "show", &cgroup.to_string_lossy()])?;
    assert!(attached.contains(&prog_id.to_string()), "program still attached: {attached}");

    // `meshd --cleanup` removes what meshd programmed, the node's pins included.
    cluster.cleanup_node(1)?;
    let attached = meshd_tests::sh("bpftool", &["cgroup", "show", &cgroup.to_string_lossy()])?;
    assert!(!attached.contains("connect4"), "program detached from the cgroup: {attached}");
    let loaded = meshd_tests::sh("bpftool", &["prog", "show", "id", &prog_id.to_string()]);
    assert!(loaded.is_err(), "program {prog_id} unloaded, but bpftool shows {loaded:?}");
    assert!(!cluster.nodes[0].pin_dir.exists(), "pins removed");
    let after = links(&node_ns)?;
    assert!(!after.contains("mvx4096") && !after.contains("mbr4096"), "overlay links removed: {after}");
    assert!(!links(&task_ns)?.contains("eth0"), "task interface removed");
    Ok(())
}

fn program_id(cluster: &Cluster) -> Result<u64> {
    cluster.meshctl_json(1, &["status"])?["ebpf"][0]["id"].as_u64().ok_or_else(|| anyhow!("no program id"))
}
