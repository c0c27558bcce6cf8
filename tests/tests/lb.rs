//! The proxy's load-balancing policies (`meshctl publish --lb`), end to end: real meshd
//! nodes with the kernel ingress path off (so external clients reach the proxy), three
//! real HTTP tasks on another node, real TCP clients in their own namespaces.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use meshd_tests::{http_get, in_netns, node_addr, poll, Cluster};

const PORT: u16 = 3000;

/// Two nodes without the kernel ingress path; service `web` with three tasks on n2,
/// published on `PORT` with `--lb lb`; returns the cluster once n1 serves all three.
fn web(lb: &str) -> Result<Cluster> {
    let mut cluster = Cluster::start_with_args(2, &["--xdp", "off"])?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "net", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "net"])?;
    for task in ["web.1", "web.2", "web.3"] {
        cluster.add_container(2, "web", task)?;
    }
    cluster.meshctl_ok(1, &["publish", &format!("{PORT}:80"), "web", "--lb", lb])?;
    let path = cluster.wait_serving(1, &format!("{PORT}/tcp"), 3)?;
    ensure!(path["remote_clients"] == "proxy" && path["lb"] == lb, "{path}");
    Ok(cluster)
}

/// Which task answers each of `n` new connections from `netns` to n1's published port.
fn answers(netns: &Path, n: usize) -> Result<Vec<String>> {
    let addr = SocketAddr::from((node_addr(1), PORT));
    (0..n).map(|i| http_get(netns, addr).with_context(|| format!("request {i}"))).collect()
}

fn counts(tasks: &[String]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for t in tasks {
        *out.entry(t.clone()).or_default() += 1;
    }
    out
}

/// A keep-alive connection from `netns` to n1's published port, and the task that
/// answered its first request. The connection stays open (relayed) while held.
fn held_connection(netns: &Path) -> Result<(TcpStream, String)> {
    let addr = SocketAddr::from((node_addr(1), PORT));
    in_netns(netns, move || -> Result<(TcpStream, String)> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")?;
        let mut got = Vec::new();
        let mut chunk = [0u8; 512];
        // One response: headers, then a body that ends with a newline.
        while !(got.windows(4).any(|w| w == b"\r\n\r\n")
            && got.ends_with(b"\n")
            && !got.ends_with(b"\r\n\r\n"))
        {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                bail!("closed after {:?}", String::from_utf8_lossy(&got));
            }
            got.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_owned()).unwrap_or_default();
        Ok((stream, body))
    })?
}

/// Connections the proxy on node `i` relays now.
fn relayed_now(cluster: &Cluster, i: usize) -> Result<u64> {
    let status = cluster.meshctl_json(i, &["status"])?;
    status["proxy"]["counters"]["tcp_active"].as_u64().ok_or_else(|| anyhow!("no proxy counters: {status}"))
}

#[test]
fn round_robin_spreads_new_connections_evenly() -> Result<()> {
    let cluster = web("rr")?;
    let got = counts(&answers(&cluster.client_netns(), 30)?);
    assert_eq!(got.len(), 3, "every task answers: {got:?}");
    let (min, max) = (got.values().min().unwrap(), got.values().max().unwrap());
    assert!(max - min <= 1, "round robin is even within ±1: {got:?}");
    Ok(())
}

#[test]
fn leastconn_sends_new_connections_away_from_the_busy_task() -> Result<()> {
    let cluster = web("leastconn")?;
    let client = cluster.client_netns();
    // Six held connections: with equal loads leastconn takes turns, so two per task.
    let mut held: Vec<(TcpStream, String)> =
        (0..6).map(|_| held_connection(&client)).collect::<Result<_>>()?;
    let per_task = counts(&held.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>());
    assert_eq!(per_task.values().copied().collect::<Vec<_>>(), [2, 2, 2], "{per_task:?}");
    // Keep web.1's two; close the other four and wait until the proxy has seen them go.
    held.retain(|(_, task)| task == "web.1");
    poll("n1's proxy relays only the two held connections", Duration::from_secs(10), || {
        let n = relayed_now(&cluster, 1)?;
        (n == 2).then_some(()).ok_or_else(|| anyhow!("{n} relayed"))
    })?;
    // web.1 holds two connections, the others none: new ones go to web.2 and web.3.
    let got = counts(&answers(&client, 10)?);
    assert!(!got.contains_key("web.1"), "the busy task got new connections: {got:?}");
    assert_eq!(got.len(), 2, "the idle tasks take turns: {got:?}");
    drop(held);
    Ok(())
}

#[test]
fn maglev_keeps_each_client_on_one_task_and_spreads_clients() -> Result<()> {
    let cluster = web("maglev")?;
    let mut reached = BTreeMap::new();
    for c in 0..8u8 {
        let netns = cluster.add_underlay_host(&format!("lbclient{c}"), Ipv4Addr::new(198, 18, 0, 150 + c))?;
        let got = counts(&answers(&netns, 6)?);
        assert_eq!(got.len(), 1, "client {c} keeps its task: {got:?}");
        reached.extend(got);
    }
    assert!(reached.len() >= 2, "eight clients spread over the tasks: {reached:?}");
    Ok(())
}

#[test]
fn p2c_uses_every_task_and_republish_changes_the_policy_in_place() -> Result<()> {
    let cluster = web("rr")?;
    // Same port, target and mode: the policy changes in place, nothing is re-bound.
    cluster.meshctl_ok(1, &["publish", &format!("{PORT}:80"), "web", "--lb", "p2c"])?;
    poll("n1 serves the port with p2c", Duration::from_secs(10), || {
        let path = cluster.wait_serving(1, &format!("{PORT}/tcp"), 3)?;
        (path["lb"] == "p2c").then_some(()).ok_or_else(|| anyhow!("{path}"))
    })?;
    let got = counts(&answers(&cluster.client_netns(), 30)?);
    assert_eq!(got.len(), 3, "p2c starves no task: {got:?}");
    Ok(())
}
