//! What a client sees at the edges of the proxy path (`--xdp off`) and the kernel
//! path: a service with no running task resets the connection at once, and a client
//! that shuts down its write side still receives the whole response.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{ensure, Result};
use meshd_tests::{in_netns, keepalive_get, node_addr, poll, Cluster};

/// Two nodes started with `args`; service `web` published on 3000 (with `task` on n2
/// when given), served by n1.
fn cluster(args: &[&str], task: bool) -> Result<Cluster> {
    let mut cluster = Cluster::start_with_args(2, args)?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "net", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "net"])?;
    if task {
        cluster.add_container(2, "web", "web.1")?;
    }
    cluster.meshctl_ok(1, &["publish", "3000:80", "web"])?;
    cluster.wait_serving(1, "3000/tcp", usize::from(task))?;
    Ok(cluster)
}

/// Sends a request from `netns` to n1:3000, shuts the write side, reads to the end.
fn half_closed_get(netns: &Path) -> Result<std::io::Result<String>> {
    let addr = SocketAddr::from((node_addr(1), 3000));
    in_netns(netns, move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")?;
        stream.shutdown(Shutdown::Write)?;
        let mut response = String::new();
        stream.read_to_string(&mut response).map(|_| response)
    })
}

/// Connects from `netns` to n1:3000 and reads without sending anything.
fn silent_read(netns: &Path) -> Result<std::io::Result<String>> {
    let addr = SocketAddr::from((node_addr(1), 3000));
    in_netns(netns, move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut response = String::new();
        stream.read_to_string(&mut response).map(|_| response)
    })
}

#[test]
fn a_service_without_tasks_resets_the_connection_at_once() -> Result<()> {
    let cluster = cluster(&["--xdp", "off"], false)?;
    // A client that has sent nothing yet (a plain close would read as an empty answer).
    let got = silent_read(&cluster.client_netns())?;
    ensure!(
        matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "expected a reset, got {got:?}"
    );
    Ok(())
}

#[test]
fn a_half_closed_client_gets_the_whole_response_on_both_paths() -> Result<()> {
    for args in [&["--xdp", "off"][..], &[][..]] {
        let cluster = cluster(args, true)?;
        let response = half_closed_get(&cluster.client_netns())??;
        ensure!(
            response.starts_with("HTTP/1.1 200") && response.trim_end().ends_with("web.1"),
            "meshd {args:?}: {response:?}"
        );
    }
    Ok(())
}

/// `GET /peer` from the client to node `i`'s port 3000: what the task says its peer is.
fn peer_seen(cluster: &Cluster, i: usize) -> Result<String> {
    let url = format!("http://{}/peer", SocketAddr::from((node_addr(i), 3000)));
    let ns = cluster.client_ns();
    meshd_tests::sh("ip", &["netns", "exec", &ns, "curl", "-sS", "--max-time", "5", &url])
}

#[test]
fn proxy_protocol_v2_tells_the_task_the_clients_address_through_every_node() -> Result<()> {
    let mut cluster = Cluster::start(2)?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "net", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "net"])?;
    cluster.add_container(2, "web", "web.1")?;
    // Without the header the task sees the proxy's or the snat address, never the client.
    cluster.meshctl_ok(1, &["publish", "3000:80", "web", "--proxy-protocol", "v2"])?;
    for i in 1..=2 {
        let path = cluster.wait_serving(i, "3000/tcp", 1)?;
        ensure!(path["remote_clients"] == "proxy" && path["proxy_protocol"] == "v2", "{path}");
        let said = peer_seen(&cluster, i)?;
        ensure!(
            said.starts_with(&format!("web.1 {}:", meshd_tests::CLIENT_ADDR)),
            "through n{i} the task saw {said:?}, not the client"
        );
    }
    // Bad input: another version is refused, naming the choice.
    let out = cluster.meshctl(1, &["publish", "3001:80", "web", "--proxy-protocol", "v1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && stderr.contains("v2"), "{stderr}");
    Ok(())
}

/// A connection from the client to n1:3000, held open.
fn open(cluster: &Cluster) -> Result<TcpStream> {
    let addr = SocketAddr::from((node_addr(1), 3000));
    let stream = in_netns(&cluster.client_netns(), move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    })??;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

/// n1's status line for port 3000.
fn port_status(cluster: &Cluster) -> Result<serde_json::Value> {
    let status = cluster.meshctl_json(1, &["status"])?;
    let paths = status["published_paths"].as_array().cloned().unwrap_or_default();
    paths
        .into_iter()
        .find(|p| p["port"] == "3000/tcp")
        .ok_or_else(|| anyhow::anyhow!("no 3000/tcp in status"))
}

#[test]
fn a_port_at_its_connection_limit_resets_new_connections_and_keeps_the_held_ones() -> Result<()> {
    // The kernel path is on: a port with a limit is the proxy's all the same.
    let mut cluster = Cluster::start(2)?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "net", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "net"])?;
    cluster.add_container(2, "web", "web.1")?;
    cluster.meshctl_ok(1, &["publish", "3000:80", "web", "--max-connections", "3"])?;
    let path = cluster.wait_serving(1, "3000/tcp", 1)?;
    ensure!(
        path["remote_clients"] == "proxy"
            && path["max_connections"] == 3
            && path["kernel_path_reason"].as_str().is_some_and(|r| r.contains("--max-connections")),
        "{path}"
    );
    let mut held: Vec<TcpStream> = (0..3).map(|_| open(&cluster)).collect::<Result<_>>()?;
    for stream in &mut held {
        ensure!(keepalive_get(stream)? == "web.1");
    }
    // The fourth is reset at once (before it sends anything), and counted. The reset
    // can beat the end of the connect, which then reports it.
    let addr = SocketAddr::from((node_addr(1), 3000));
    let got = in_netns(&cluster.client_netns(), move || {
        let mut fourth = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        fourth.set_read_timeout(Some(Duration::from_secs(5)))?;
        fourth.read(&mut [0u8; 1])
    })?;
    ensure!(
        matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the 4th got {got:?}, not a reset"
    );
    let status = port_status(&cluster)?;
    ensure!(status["proxy"]["active"] == 3 && status["proxy"]["refused_at_limit"] == 1, "{status}");
    // The held ones are unaffected.
    for stream in &mut held {
        ensure!(keepalive_get(stream)? == "web.1", "a held connection broke at the limit");
    }
    // One leaves: a newcomer gets its place.
    drop(held.pop());
    poll("the freed place is given back", Duration::from_secs(5), || {
        ensure!(port_status(&cluster)?["proxy"]["active"] == 2);
        Ok(())
    })?;
    held.push(open(&cluster)?);
    ensure!(keepalive_get(held.last_mut().expect("just pushed"))? == "web.1");
    // Raised in place: a fourth fits now, the three held stay.
    cluster.meshctl_ok(1, &["publish", "3000:80", "web", "--max-connections", "4"])?;
    poll("the new limit is applied", Duration::from_secs(5), || {
        ensure!(port_status(&cluster)?["proxy"]["max_connections"] == 4);
        Ok(())
    })?;
    let mut fourth = open(&cluster)?;
    ensure!(keepalive_get(&mut fourth)? == "web.1");
    for stream in &mut held {
        ensure!(keepalive_get(stream)? == "web.1");
    }
    // Bad input: not a number.
    let out = cluster.meshctl(1, &["publish", "3001:80", "web", "--max-connections", "many"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && stderr.contains("--max-connections"), "{stderr}");
    Ok(())
}

/// One datagram from `socket` (connected to n1's published port, so only replies from
/// that address are received) and its answer.
fn udp_ask(socket: &std::net::UdpSocket) -> std::io::Result<String> {
    socket.send(b"hello")?;
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

#[test]
fn udp_clients_get_sessions_that_answer_from_the_published_address_are_bounded_and_expire() -> Result<()> {
    let args = ["--xdp", "off", "--proxy-udp-max-flows", "2", "--proxy-udp-idle-timeout-secs", "2"];
    let mut cluster = Cluster::start_with_args(2, &args)?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "net", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "net"])?;
    cluster.add_container(2, "web", "web.1")?;
    cluster.meshctl_ok(1, &["publish", "5353:80/udp", "web"])?;
    cluster.wait_serving(1, "5353/udp", 1)?;
    let addr = SocketAddr::from((node_addr(1), 5353));
    let client = cluster.client_netns();
    let open = move || -> std::io::Result<std::net::UdpSocket> {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(socket)
    };
    // Two clients, each its own session: answered by the task, from the published
    // address (the sockets are connected to it; anything else would not be received).
    let sockets = in_netns(&client, move || (0..3).map(|_| open()).collect::<std::io::Result<Vec<_>>>())??;
    for socket in &sockets[..2] {
        let said = udp_ask(socket)?;
        ensure!(said.starts_with("web.1 "), "{said:?}");
        ensure!(udp_ask(socket)? == said, "a session's second datagram went another way");
    }
    let counters = |cluster: &Cluster| -> Result<serde_json::Value> {
        Ok(cluster.meshctl_json(1, &["status"])?["proxy"]["counters"].clone())
    };
    ensure!(counters(&cluster)?["udp_flows_active"] == 2);
    // A third client finds the table full: its datagram is dropped and counted, the
    // two sessions carry on.
    sockets[2].send(b"hello")?;
    poll("the third client's datagram is refused", Duration::from_secs(5), || {
        let c = counters(&cluster)?;
        ensure!(c["udp_flows_refused"] == 1, "{c}");
        Ok(())
    })?;
    ensure!(udp_ask(&sockets[0])?.starts_with("web.1 "), "an existing session broke at the bound");
    // Silent for the idle timeout, the sessions expire; the client is served again.
    poll("idle sessions expire", Duration::from_secs(10), || {
        let c = counters(&cluster)?;
        ensure!(c["udp_flows_active"] == 0 && c["udp_flows_expired"] == 2, "{c}");
        Ok(())
    })?;
    ensure!(udp_ask(&sockets[2])?.starts_with("web.1 "), "no session after the others expired");
    Ok(())
}
