//! Issue #5's seed scenario, end to end with real components: a real MariaDB server is
//! task `mysql.1` of service `mysql` on node 2; from a container of service `mvcapp` on
//! node 3, the real `mariadb` client connects to host `mysql` port 3306 — the name
//! answered by meshd's resolver on 127.0.0.11 inside the container, the connect sent
//! to the service's VIP and rewritten by the socket load balancer to the task — and runs
//! a query.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{ensure, Context, Result};
use meshd_tests::{mariadb, poll, sh, Cluster};

#[test]
fn mvcapp_queries_mysql_by_name_on_another_node() -> Result<()> {
    seed_scenario(&[])
}

/// The same scenario where the socket load balancer is off (as on a host without
/// BPF): the VIP is served by meshd's nftables table in the client's namespace.
#[test]
fn mvcapp_queries_mysql_by_name_without_bpf() -> Result<()> {
    seed_scenario(&["--socket-lb", "off"])
}

fn seed_scenario(meshd_args: &[&str]) -> Result<()> {
    let mut cluster = Cluster::start_with_args(3, meshd_args)?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "mysql", "--network", "backend"])?;
    cluster.meshctl_ok(1, &["service", "create", "mvcapp", "--network", "backend"])?;

    let mysql = cluster.add_empty_container(2, "mysql", "mysql.1")?;
    let (mysql_ns, mysql_ip) = (mysql.netns(), mysql.ip);
    let _server = mariadb::MariaDb::start(&mysql_ns, &cluster.nodes[1].cgroup, &cluster.dir, "mysql.1")?;

    let app = cluster.add_container(3, "mvcapp", "mvcapp.1")?;
    let (app_ns, app_ip) = (app.ns.clone(), app.ip);
    mariadb::use_embedded_resolver(&app_ns)?;

    let inspect = cluster.meshctl_json(3, &["service", "inspect", "mysql"])?;
    let vip: Ipv4Addr = inspect["service"]["vip"]
        .as_str()
        .with_context(|| format!("service inspect shows no VIP: {inspect}"))?
        .parse()?;
    ensure!(vip != mysql_ip, "the VIP {vip} is not the task's own address");

    // The name resolves, inside the container, to the VIP.
    let answer = poll("mysql resolves in the mvcapp container", Duration::from_secs(10), || {
        let out = sh(
            "ip",
            &["netns", "exec", &app_ns, "dig", "+short", "+time=1", "+tries=1", "@127.0.0.11", "mysql"],
        )?;
        ensure!(!out.trim().is_empty(), "no answer yet");
        Ok(out.trim().to_owned())
    })?;
    ensure!(answer == vip.to_string(), "mysql resolved to {answer:?}, not the VIP {vip}");

    // The real client, by name, across nodes: the row names the task that answered.
    let node3 = cluster.nodes[2].cgroup.clone();
    let row = poll("mariadb -h mysql answers from mvcapp.1", Duration::from_secs(15), || {
        mariadb::query(&app_ns, &node3, "mysql", "SELECT name FROM tasks")
    })?;
    ensure!(row == "mysql.1", "the query returned {row:?}");

    // `meshctl attach` says where the new container's resolver serves.
    let extra = cluster.add_netns("extra")?;
    let said = cluster
        .meshctl_ok(3, &["attach", "mvcapp", "--netns", &extra.to_string_lossy(), "--name", "mvcapp.9"])?;
    ensure!(said.contains("on node n3; DNS on 127.0.0.11:53"), "attach said {said:?}");

    // No proxy hop: the server sees the client container's own address.
    let peer = mariadb::query(&app_ns, &node3, "mysql", "SELECT SUBSTRING_INDEX(USER(), '@', -1)")?;
    ensure!(peer == app_ip.to_string(), "the server saw the client as {peer:?}, not {app_ip}");
    Ok(())
}
