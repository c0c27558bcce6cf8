//! Active health checks end to end: each node probes its own tasks; a task whose
//! server dies leaves rotation on every node and every path within two intervals, and
//! comes back when it answers again.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use anyhow::{anyhow, ensure, Result};
use meshd_tests::{http_get, node_addr, poll, Cluster};

/// Tasks reached by `n` new connections from the client to node `i`'s port 3000.
fn reached(cluster: &Cluster, i: usize, n: usize) -> Result<BTreeSet<String>> {
    let addr = SocketAddr::from((node_addr(i), 3000));
    (0..n).map(|_| http_get(&cluster.client_netns(), addr)).collect()
}

/// Task `task`'s health as node `i` sees it.
fn health(cluster: &Cluster, i: usize, task: &str) -> Result<String> {
    let ps = cluster.meshctl_json(i, &["service", "ps", "web"])?;
    ps.as_array()
        .into_iter()
        .flatten()
        .find(|t| t["task"] == task)
        .and_then(|t| t["health"].as_str().map(str::to_owned))
        .ok_or_else(|| anyhow!("no {task} in {ps}"))
}

fn health_checked_port_follows_a_dying_and_returning_task(node_args: &[&str]) -> Result<()> {
    let mut cluster = Cluster::start_with_args(2, node_args)?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "net", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(
        1,
        &[
            "service",
            "create",
            "web",
            "--network",
            "net",
            "--health-http",
            "80:/",
            "--health-interval",
            "500ms",
            "--health-timeout",
            "200ms",
        ],
    )?;
    for task in ["web.1", "web.2"] {
        cluster.add_container(2, "web", task)?;
    }
    cluster.meshctl_ok(1, &["publish", "3000:80", "web"])?;
    cluster.wait_serving(1, "3000/tcp", 2)?;
    ensure!(health(&cluster, 1, "web.1")? == "healthy");

    // web.1's server dies without notice: within two intervals (plus gossip) every
    // node takes it out of every path.
    cluster.kill_server("web.1")?;
    poll("web.1 is unhealthy on n1 and out of its paths", Duration::from_secs(3), || {
        ensure!(health(&cluster, 1, "web.1")? == "unhealthy", "not yet unhealthy");
        cluster.wait_serving(1, "3000/tcp", 1).map(drop)
    })?;
    // From then on no new connection fails or reaches it.
    let got = reached(&cluster, 1, 20)?;
    ensure!(got == BTreeSet::from(["web.2".to_owned()]), "{got:?}");

    // Its server is back: after two passing probes it returns.
    cluster.restart_server("web.1")?;
    poll("web.1 is healthy again on n1", Duration::from_secs(5), || {
        ensure!(health(&cluster, 1, "web.1")? == "healthy", "not yet healthy");
        cluster.wait_serving(1, "3000/tcp", 2).map(drop)
    })?;
    let got = reached(&cluster, 1, 30)?;
    ensure!(got.len() == 2, "both tasks serve again: {got:?}");

    // Without a check, a task is healthy while its node lives.
    cluster.meshctl_ok(1, &["service", "update", "web", "--no-health-check"])?;
    cluster.kill_server("web.2")?;
    cluster.wait_serving(1, "3000/tcp", 2)?;
    ensure!(health(&cluster, 1, "web.2")? == "healthy");
    Ok(())
}

#[test]
fn a_dying_task_leaves_and_returns_on_the_kernel_path() -> Result<()> {
    health_checked_port_follows_a_dying_and_returning_task(&[])
}

#[test]
fn a_dying_task_leaves_and_returns_on_the_proxy() -> Result<()> {
    health_checked_port_follows_a_dying_and_returning_task(&["--xdp", "off"])
}

#[test]
fn bad_health_flags_are_refused_and_change_nothing() -> Result<()> {
    let cluster = Cluster::start(1)?;
    cluster.meshctl_ok(1, &["network", "create", "net", "--subnet", "10.0.0.0/24"])?;
    let cases: &[(&[&str], &str)] = &[
        (&["service", "create", "a", "--network", "net", "--health-http", "80"], "expected PORT:/PATH"),
        (
            &["service", "create", "a", "--network", "net", "--health-tcp", "80", "--health-http", "80:/"],
            "not both",
        ),
        (
            &["service", "create", "a", "--network", "net", "--health-tcp", "80", "--health-interval", "0"],
            "must be positive",
        ),
        (
            &["service", "create", "a", "--network", "net", "--health-tcp", "80", "--health-timeout", "2s"],
            "must be shorter than",
        ),
        (&["service", "update", "nosuch", "--health-tcp", "80"], "service nosuch does not exist"),
        (&["service", "update", "nosuch"], "give a check"),
    ];
    for (args, says) in cases {
        let out = cluster.meshctl(1, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success() && stderr.contains(says), "{args:?}: {stderr}");
    }
    let ls = cluster.meshctl_ok(1, &["service", "ls"])?;
    ensure!(!ls.contains("a "), "nothing was created: {ls}");
    Ok(())
}
