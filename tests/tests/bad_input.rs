//! Bad input gets a one-line error naming the problem and the fix, a non-zero exit,
//! and changes nothing: every case runs against a real meshd, and the cluster state
//! and the node's links are compared before and after.

use std::{io::Write, net::TcpStream, time::Duration};

use anyhow::{anyhow, Result};
use meshd_tests::{in_netns, node_addr, sh, Cluster};

/// Runs meshctl on n1, expects failure, and returns its one-line stderr.
fn fails(cluster: &Cluster, args: &[&str]) -> String {
    let out = cluster.meshctl(1, args);
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert!(!out.status.success(), "meshctl {} should fail but printed {:?}", args.join(" "), out.stdout);
    assert_eq!(stderr.lines().count(), 1, "one-line error for {args:?}: {stderr}");
    assert!(stderr.starts_with("meshctl: "), "{stderr}");
    stderr
}

fn snapshot(cluster: &Cluster) -> Result<String> {
    let node_links = sh("ip", &["-n", &cluster.nodes[0].ns, "-o", "link"])?;
    let links: Vec<&str> = node_links.lines().map(|l| l.split(':').nth(1).unwrap_or("").trim()).collect();
    Ok(format!(
        "{}\n{}\n{}\n{:?}",
        cluster.meshctl_ok(1, &["--format", "json", "network", "ls"])?,
        cluster.meshctl_ok(1, &["--format", "json", "service", "ls"])?,
        cluster.meshctl_ok(1, &["--format", "json", "service", "ps", "web"])?,
        links
    ))
}

#[test]
fn bad_input_is_refused_clearly_and_changes_nothing() -> Result<()> {
    let mut cluster = Cluster::start(1)?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    cluster.add_container(1, "web", "web.1")?;
    cluster.meshctl_ok(1, &["publish", "3000:80", "web"])?;
    // A process of the node (not meshd) holds port 3001.
    let holder = in_netns(&cluster.nodes[0].netns(), || std::net::TcpListener::bind("0.0.0.0:3001"))??;
    let before = snapshot(&cluster)?;

    let task_ns = cluster.containers[0].netns().to_string_lossy().into_owned();
    let task_ip = cluster.containers[0].ip.to_string();
    let free_ns = cluster.add_netns("free")?.to_string_lossy().into_owned();
    let cases: &[(&[&str], &str)] = &[
        (&["publish", "3000", "web"], "invalid port spec \"3000\": expected PUBLISHED:TARGET"),
        (&["publish", "abc:80", "web"], "published port \"abc\" is not a number"),
        (&["publish", "3002:80/sctp", "web"], "protocol \"sctp\" is not tcp or udp"),
        (&["publish", "3002:80", "nosuch"], "service nosuch does not exist"),
        (
            &["publish", "3000:8080", "web"],
            "port 3000/tcp is already published for service web; unpublish it first",
        ),
        (
            &["publish", "3001:80", "web"],
            "on node n1, cannot listen on 0.0.0.0:3001 (tcp): Address already in use (os error 98), held by",
        ),
        (
            &["publish", "3002:80", "web", "--lb", "fastest"],
            "unknown load-balancing policy \"fastest\": use rr, leastconn, p2c or maglev",
        ),
        (&["unpublish", "3999"], "port 3999/tcp is not published"),
        (&["unpublish", "3000", "other"], "published for service web, not other"),
        (&["service", "create", "api", "--network", "nosuch"], "network nosuch does not exist; create it"),
        (&["service", "create", "web", "--network", "backend"], "service web already exists"),
        (&["service", "create", "bad name", "--network", "backend"], "invalid service name"),
        (
            &["service", "create", "api", "--network", "backend", "--endpoint-mode", "x"],
            "unknown endpoint mode",
        ),
        (&["service", "ps", "nosuch"], "service nosuch does not exist"),
        (&["service", "rm", "nosuch"], "service nosuch does not exist"),
        (&["network", "create", "other", "--subnet", "10.0.0.128/25"], "overlaps network backend"),
        (&["network", "create", "other", "--subnet", "10.1.0.0/33"], "invalid subnet"),
        (&["network", "create", "backend", "--subnet", "10.9.0.0/24"], "network backend already exists"),
        (
            &["network", "create", "jumbo", "--subnet", "10.9.0.0/24", "--mtu", "9000"],
            "MTU 9000 for network jumbo is out of range",
        ),
        (
            &["attach", "web", "--netns", "/run/netns/does-not-exist"],
            "does not exist; create it (`ip netns add NAME`)",
        ),
        (&["attach", "nosuch", "--netns", "/run/netns/does-not-exist"], "service nosuch does not exist"),
        (&["attach", "web", "--netns", &task_ns, "--name", "web.2"], "is already a task"),
        (&["detach", "nosuch"], "task nosuch does not exist"),
        (
            &["attach", "web", "--netns", &free_ns, "--ip", "10.9.9.9"],
            "address 10.9.9.9 is not a usable address of network backend (10.0.0.0/24)",
        ),
        (
            &["attach", "web", "--netns", &free_ns, "--ip", "10.0.0.255"],
            "not its network or broadcast address",
        ),
        (
            &["attach", "web", "--netns", &free_ns, "--ip", &task_ip],
            "is used by web.1 on node n1; pick another address or omit --ip",
        ),
    ];
    for (args, expected) in cases {
        let stderr = fails(&cluster, args);
        assert!(stderr.contains(expected), "meshctl {}: expected {expected:?} in {stderr:?}", args.join(" "));
    }

    // meshd not running: the socket path names the problem and the fix.
    let out = std::process::Command::new(meshd_tests::bin_path("meshctl")?)
        .args(["--socket", "/nonexistent/meshd.sock", "status"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot reach meshd at /nonexistent/meshd.sock")
            && stderr.contains("is meshd running"),
        "{stderr}"
    );

    // Garbage on the TCP gossip port: dropped, meshd keeps serving.
    in_netns(&cluster.client_netns(), || -> std::io::Result<()> {
        let addr = (node_addr(1), 7946).into();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.write_all(&u32::MAX.to_be_bytes())?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.write_all(&[0, 0, 0, 5, b'{', b'x', b'}', 0, 0])?;
        Ok(())
    })??;

    drop(holder);
    assert_eq!(snapshot(&cluster)?, before, "refused requests changed the state");
    let log = std::fs::read_to_string(&cluster.nodes[0].log)?;
    meshd_tests::poll("meshd logs the dropped exchanges", Duration::from_secs(5), || {
        let log = std::fs::read_to_string(&cluster.nodes[0].log)?;
        (log.matches("dropped a bad push-pull").count() >= 2).then_some(()).ok_or_else(|| anyhow!("{log}"))
    })
    .map_err(|e| e.context(log))?;
    Ok(())
}
