//! A published port that some node cannot bind (another process holds it there):
//! `meshctl publish` fails naming the node and the process, and nothing stays
//! published on any node. Once the holder is gone, the same publish works.

use std::{
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use meshd_tests::{http_get, in_netns, node_addr, poll, refused, Cluster};

/// Binds `0.0.0.0:port` in node `i`'s namespace from this test process, which then
/// holds it (as another program on the host would).
fn hold_port(cluster: &Cluster, i: usize, port: u16) -> Result<TcpListener> {
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    in_netns(&cluster.nodes[i - 1].netns(), move || TcpListener::bind(addr))?.context("binding the holder")
}

/// Waits until the cluster state has no published port (as every node sees it) and
/// every node but the holder's refuses `port` to the external client.
fn nothing_published(cluster: &Cluster, port: u16, holder: usize) -> Result<()> {
    for i in 1..=cluster.nodes.len() {
        poll(&format!("no published port on n{i}"), Duration::from_secs(10), || {
            let inspect = cluster.meshctl_json(i, &["service", "inspect", "web"])?;
            ensure!(inspect["published"].as_array().is_some_and(Vec::is_empty), "{}", inspect["published"]);
            Ok(())
        })?;
    }
    for i in (1..=cluster.nodes.len()).filter(|&i| i != holder) {
        poll(&format!("n{i}:{port} refuses"), Duration::from_secs(10), || {
            ensure!(
                refused(&cluster.client_netns(), SocketAddr::from((node_addr(i), port)))?,
                "still accepts"
            );
            Ok(())
        })?;
    }
    Ok(())
}

#[test]
fn a_port_held_on_one_node_fails_the_publish_everywhere_naming_node_and_process() -> Result<()> {
    let mut cluster = Cluster::start(3)?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "net", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "net"])?;
    cluster.add_container(3, "web", "web.1")?;
    let me = format!("(pid {})", std::process::id());

    // Held on another node: found by that node's bind, reported by gossip.
    let holder = hold_port(&cluster, 2, 3000)?;
    let out = cluster.meshctl(1, &["publish", "3000:80", "web"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "publish succeeded although n2 holds the port: {stderr}");
    for says in
        ["cannot publish 3000:80/tcp for service web", "on node n2", "held by", &me, "nothing was published"]
    {
        ensure!(stderr.contains(says), "the error does not say {says:?}: {stderr}");
    }
    nothing_published(&cluster, 3000, 2)?;

    // Held on the node that publishes: refused before anything is written.
    let local = hold_port(&cluster, 1, 3001)?;
    let out = cluster.meshctl(1, &["publish", "3001:80", "web"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "publish succeeded although n1 holds the port: {stderr}");
    for says in ["on node n1", "held by", &me, "nothing was published"] {
        ensure!(stderr.contains(says), "the error does not say {says:?}: {stderr}");
    }
    nothing_published(&cluster, 3001, 1)?;
    drop(local);

    // The holder gone, the same publish works on every node.
    drop(holder);
    cluster.meshctl_ok(1, &["publish", "3000:80", "web"])?;
    for i in 1..=3 {
        cluster.wait_serving(i, "3000/tcp", 1)?;
        // Served means served: the node that just joined the network (it left it with
        // the rolled-back publish) answers at once.
        let body = http_get(&cluster.client_netns(), SocketAddr::from((node_addr(i), 3000)))?;
        ensure!(body == "web.1", "n{i} answered {body:?}");
    }
    Ok(())
}
