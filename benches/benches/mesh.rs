//! Side-by-side macro benchmarks on a real two-node netns cluster, every baseline in
//! the same run:
//!
//! - HTTP through a published port: the external client → node 1 → a task on node 2,
//!   via meshd's proxy and via HAProxy (same backend, same namespace), against the
//!   direct kernel path from node 1 to the task over the overlay (no proxy).
//! - TCP throughput (iperf3): container to container across nodes over kernel VXLAN,
//!   and client → published port → task, against node to node on the underlay.
//!
//! Writes `benches/results/mesh.md` and its table in README.md (see `write_results`).
//! The 10-node convergence rows are in `convergence.rs`.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};
use meshd_benches::{in_ns, median, parse_iperf3, parse_wrk, write_results, Row};
use meshd_tests::{http_get, node_addr, poll, Cluster};

const WRK_SECONDS: &str = "4s";
const IPERF_SECONDS: &str = "3";

/// How many times each path is measured.
const ROUNDS: usize = 3;

/// How many times each throughput path is measured.
const TPUT_ROUNDS: usize = 5;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_in(ns: &str, program: &str, args: &[&str]) -> Result<Killed> {
    let child = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {program}; install it with `make bootstrap`"))?;
    Ok(Killed(child))
}

fn wrk(ns: &str, url: &str, close: bool) -> Result<(f64, String)> {
    let mut args = vec!["-t2", "-c32", "-d", WRK_SECONDS, "--latency"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    parse_wrk(&in_ns(ns, "wrk", &args)?)
}

fn iperf(ns: &str, server: &str, port: u16) -> Result<f64> {
    let port = port.to_string();
    poll(&format!("iperf3 to {server}:{port}"), Duration::from_secs(10), || {
        parse_iperf3(&in_ns(ns, "iperf3", &["-c", server, "-p", &port, "-t", IPERF_SECONDS, "-J"])?)
    })
}

fn main() -> Result<()> {
    let mut cluster = Cluster::start(2)?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    for svc in ["web", "perf", "client"] {
        cluster.meshctl_ok(1, &["service", "create", svc, "--network", "backend"])?;
    }
    let web = cluster.add_container(2, "web", "web.1")?.ip;
    let perf = cluster.add_task(2, "perf", "perf.1", 8080)?.ip;
    let client_task = cluster.add_task(1, "client", "client.1", 8080)?.ns.clone();
    let perf_ns =
        cluster.containers.iter().find(|c| c.task == "perf.1").map(|c| c.ns.clone()).unwrap_or_default();
    cluster.meshctl_ok(1, &["publish", "3000:80", "web"])?;
    cluster.meshctl_ok(1, &["publish", "5201:5201", "perf"])?;
    let ext = cluster.client_ns();
    let n1 = cluster.nodes[0].ns.clone();
    let n2 = cluster.nodes[1].ns.clone();
    let client_path = cluster.client_netns();
    poll("port 3000 answers", Duration::from_secs(10), || {
        http_get(&client_path, SocketAddr::from((node_addr(1), 3000)))
    })?;

    let haproxy_cfg = cluster.dir.join("haproxy.cfg");
    std::fs::write(
        &haproxy_cfg,
        format!(
            "global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
             frontend f\n  bind 0.0.0.0:3100\n  default_backend b\nbackend b\n  server web1 {web}:80\n"
        ),
    )?;
    let _haproxy = spawn_in(&n1, "haproxy", &["-db", "-f", &haproxy_cfg.to_string_lossy()])?;
    poll("haproxy answers", Duration::from_secs(10), || {
        http_get(&client_path, SocketAddr::from((node_addr(1), 3100)))
    })?;

    // Each path is measured ROUNDS times, interleaved with the others so drifting
    // machine load hits all paths alike; the table shows the median.
    let http_paths = [
        ("direct: node 1 → task over VXLAN", n1.as_str(), format!("http://{web}:80/"), true),
        ("HAProxy 2.6 on node 1 (tcp mode)", ext.as_str(), format!("http://{}:3100/", node_addr(1)), false),
        ("meshd published port on node 1", ext.as_str(), format!("http://{}:3000/", node_addr(1)), false),
    ];
    let mut rows = Vec::new();
    for (close, group) in [(false, "HTTP keep-alive, 32 conns"), (true, "HTTP new conn per request")] {
        let mut samples: Vec<Vec<(f64, String)>> = vec![Vec::new(); http_paths.len()];
        for round in 0..ROUNDS {
            for (i, (path, ns, url, _)) in http_paths.iter().enumerate() {
                let (rps, detail) = wrk(ns, url, close)?;
                println!("{group:<28} {path:<44} round {round}: {rps:>10.0} req/s  {detail}");
                samples[i].push((rps, detail));
            }
        }
        for ((path, _, _, baseline), mut runs) in http_paths.iter().zip(samples) {
            let (value, detail) = median(&mut runs);
            rows.push(Row {
                group: group.into(),
                path: (*path).into(),
                value,
                unit: "req/s".into(),
                detail,
                baseline: *baseline,
            });
        }
    }

    // Port 5201 is published on every node (node 2 included), so the underlay server
    // listens elsewhere.
    let _underlay_server = spawn_in(&n2, "iperf3", &["-s", "-p", "5301"])?;
    let _overlay_server = spawn_in(&perf_ns, "iperf3", &["-s"])?;
    // Node 2's own address on the overlay (its bridge): node-to-node over kernel VXLAN
    // without the containers' veth hop, to tell the two costs apart.
    let n2_overlay = in_ns(&n2, "ip", &["-4", "-o", "addr", "show", "dev", "mbr4096"])?
        .split_whitespace()
        .nth(3)
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_owned)
        .context("node 2 has no address on the overlay bridge")?;
    let group = "TCP throughput (iperf3)";
    let tput_paths = [
        ("underlay: node 1 → node 2", n1.as_str(), node_addr(2).to_string(), 5301, true),
        ("overlay: node 1 → node 2 (kernel VXLAN, no veth)", n1.as_str(), n2_overlay.clone(), 5301, false),
        ("overlay: container on n1 → container on n2", client_task.as_str(), perf.to_string(), 5201, false),
        (
            "published port: client → n1 proxy → task on n2",
            ext.as_str(),
            node_addr(1).to_string(),
            5201,
            false,
        ),
    ];
    let mut samples: Vec<Vec<(f64, String)>> = vec![Vec::new(); tput_paths.len()];
    // Throughput swings ±15 % run to run on this machine: more, shorter rounds.
    for round in 0..TPUT_ROUNDS {
        for (i, (path, ns, server, port, _)) in tput_paths.iter().enumerate() {
            let mbps = iperf(ns, server, *port)? / 1e6;
            println!("{group:<28} {path:<44} round {round}: {mbps:>10.0} Mbit/s");
            samples[i].push((mbps, String::new()));
        }
    }
    for ((path, _, _, _, baseline), mut runs) in tput_paths.iter().zip(samples) {
        let (value, _) = median(&mut runs);
        let spread = runs.iter().map(|r| format!("{:.0}", r.0)).collect::<Vec<_>>().join(" / ");
        rows.push(Row {
            group: group.into(),
            path: (*path).into(),
            value,
            unit: "Mbit/s".into(),
            detail: format!("runs: {spread}"),
            baseline: *baseline,
        });
    }

    drop(cluster);
    let text = write_results("mesh", "Mesh data paths", &rows)?;
    println!("\n{text}");
    Ok(())
}
