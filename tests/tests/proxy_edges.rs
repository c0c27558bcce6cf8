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
use meshd_tests::{in_netns, node_addr, Cluster};

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
