//! Side-by-side macro benchmarks on a real two-node netns cluster, every baseline in
//! the same run:
//!
//! - HTTP through a published port: the external client → node 1 → a task on node 2,
//!   via meshd's proxy and via HAProxy (same backend, same namespace), against the
//!   direct kernel path from node 1 to the task over the overlay (no proxy).
//! - TCP throughput (iperf3): container to container across nodes over kernel VXLAN,
//!   and client → published port → task, against node to node on the underlay.
//!
//! Writes `benches/RESULTS.md` and the table in README.md between its bench markers.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};
use meshd_benches::{in_ns, parse_iperf3, parse_wrk, write_results, Row};
use meshd_tests::{http_get, node_addr, poll, Cluster};

const WRK_SECONDS: &str = "4s";
const IPERF_SECONDS: &str = "3";

/// How many times each path is measured.
const ROUNDS: usize = 3;

/// How many times each throughput path is measured.
const TPUT_ROUNDS: usize = 5;

/// The median sample (by value), sorting `runs` in place.
fn median(runs: &mut [(f64, String)]) -> (f64, String) {
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    runs[runs.len() / 2].clone()
}

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
    rows.extend(fdb_convergence()?);

    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = write_results(&here.join("RESULTS.md"), "Mesh benchmarks", &rows)?;
    println!("\n{text}");
    update_readme(&here.join("../README.md"), &text)
}

/// Ten real nodes: time from `meshctl attach` on one node until every other node has
/// the new task's MAC in its VXLAN FDB (polled with `bridge fdb` in every namespace).
fn fdb_convergence() -> Result<Vec<Row>> {
    const NODES: usize = 10;
    const ROUNDS: usize = 5;
    let cluster = Cluster::start(NODES)?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/22"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    // A published port makes every node take part in the network (the routing mesh),
    // so every node programs the new task's FDB entry.
    cluster.meshctl_ok(1, &["publish", "3000:80", "web"])?;
    for i in 1..=NODES {
        cluster.wait_for_service(i, "web")?;
        poll(&format!("n{i} has the overlay"), Duration::from_secs(10), || {
            in_ns(&cluster.nodes[i - 1].ns, "ip", &["link", "show", "dev", "mvx4096"]).map(drop)
        })?;
    }
    let mut times = Vec::new();
    for round in 0..ROUNDS {
        let origin = 1 + (round * 3) % NODES;
        let ns = cluster.add_netns(&format!("fdb{round}"))?;
        let started = std::time::Instant::now();
        let attached = cluster.meshctl_json(
            origin,
            &["attach", "web", "--netns", &ns.to_string_lossy(), "--name", &format!("web.fdb{round}")],
        )?;
        let mac = attached["mac"].as_str().unwrap_or_default().to_owned();
        let others: Vec<String> =
            cluster.nodes.iter().filter(|n| n.index != origin).map(|n| n.ns.clone()).collect();
        let slowest = std::thread::scope(|s| {
            let pollers: Vec<_> = others
                .iter()
                .map(|ns| {
                    let mac = mac.clone();
                    s.spawn(move || {
                        poll("FDB entry", Duration::from_secs(10), || {
                            let fdb = in_ns(ns, "bridge", &["fdb", "show", "dev", "mvx4096"])?;
                            anyhow::ensure!(fdb.contains(&mac), "not yet");
                            Ok(started.elapsed())
                        })
                    })
                })
                .collect();
            pollers.into_iter().map(|p| p.join().expect("poller panicked")).collect::<Result<Vec<_>>>()
        })?;
        let worst = slowest.into_iter().max().unwrap_or_default();
        println!(
            "FDB convergence round {round}: attach on n{origin} → all {} others in {worst:?}",
            NODES - 1
        );
        times.push((worst.as_secs_f64() * 1000.0, String::new()));
    }
    let (median_ms, _) = median(&mut times);
    let max_ms = times.iter().map(|t| t.0).fold(0.0, f64::max);
    let runs = times.iter().map(|t| format!("{:.0}", t.0)).collect::<Vec<_>>().join(" / ");
    Ok(vec![Row {
        group: "FDB convergence, 10 nodes".into(),
        path: "meshctl attach → FDB entry on all 9 other nodes (goal ≤ 1000 ms)".into(),
        value: median_ms,
        unit: "ms (median)".into(),
        detail: format!("max {max_ms:.0} ms; runs: {runs}"),
        baseline: false,
    }])
}

/// Replaces the table between the bench markers in README.md.
fn update_readme(path: &Path, text: &str) -> Result<()> {
    let readme = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (start, end) = ("<!-- bench:start -->", "<!-- bench:end -->");
    match (readme.find(start), readme.find(end)) {
        (Some(a), Some(b)) if a < b => {
            let updated = format!("{}{start}\n{text}\n{}", &readme[..a], &readme[b..]);
            std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
        }
        _ => anyhow::bail!("{} has no {start} ... {end} markers for the table", path.display()),
    }
}
