//! Convergence on a real 10-node netns cluster:
//!
//! - `meshctl attach` on one node → the new task's FDB entry on all 9 others;
//! - `meshctl publish` on node 1 → the published port answers the external client on
//!   all 10 nodes.
//!
//! Writes `benches/results/convergence.md` and its table in README.md.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Result;
use meshd_benches::{in_ns, median, write_results, Row};
use meshd_tests::{http_get, node_addr, poll, Cluster};

const NODES: usize = 10;
const ROUNDS: usize = 5;

fn main() -> Result<()> {
    let mut cluster = Cluster::start(NODES)?;
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
    let mut rows = fdb_convergence(&cluster)?;
    // A task that answers HTTP, for the published-port rows.
    cluster.add_container(2, "web", "web.http")?;
    rows.extend(publish_to_serving(&mut cluster, false)?);
    rows.extend(publish_to_serving(&mut cluster, true)?);
    let text = write_results("convergence", "Convergence on 10 nodes", &rows)?;
    println!("\n{text}");
    Ok(())
}

/// Ten real nodes: time from `meshctl attach` on one node until every other node has
/// the new task's MAC in its VXLAN FDB (polled with `bridge fdb` in every namespace).
fn fdb_convergence(cluster: &Cluster) -> Result<Vec<Row>> {
    let mut times = Vec::new();
    for round in 0..ROUNDS {
        let origin = 1 + (round * 3) % NODES;
        let ns = cluster.add_netns(&format!("fdb{round}"))?;
        let started = Instant::now();
        let attached = cluster.meshctl_json(
            origin,
            &["attach", "web", "--netns", &ns.to_string_lossy(), "--name", &format!("web.fdb{round}")],
        )?;
        let attach_took = started.elapsed();
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
            "FDB convergence round {round}: attach on n{origin} (returned after {attach_took:?}) → all {} others in {worst:?}",
            NODES - 1
        );
        times.push((worst.as_secs_f64() * 1000.0, String::new()));
    }
    let (median_ms, _) = median(&mut times);
    let max_ms = times.iter().map(|t| t.0).fold(0.0, f64::max);
    let runs = times.iter().map(|t| format!("{:.0}", t.0)).collect::<Vec<_>>().join(" / ");
    Ok(vec![Row {
        group: "FDB convergence, 10 nodes".into(),
        path: "meshctl attach → FDB entry on all 9 other nodes (goal ≤ 250 ms; 352 ms at 3cce870)".into(),
        value: median_ms,
        unit: "ms (median)".into(),
        detail: format!("max {max_ms:.0} ms; runs: {runs}"),
        baseline: false,
    }])
}

/// Time from `meshctl publish` on node 1 until every node's published port answers the
/// external client (polled in parallel, one poller per node). Warm: every node already
/// takes part in the service's network. Cold: a fresh network per round, with one task
/// on node 2, that no other node takes part in yet (they must join it first).
fn publish_to_serving(cluster: &mut Cluster, cold: bool) -> Result<Vec<Row>> {
    let client = cluster.client_netns();
    let mut times = Vec::new();
    let mut failures = Vec::new();
    let rounds = if cold { 3 } else { ROUNDS };
    for round in 0..rounds {
        let (port, service) = if cold {
            let (net, svc) = (format!("cold{round}"), format!("cold{round}"));
            cluster.meshctl_ok(
                1,
                &["network", "create", &net, "--subnet", &format!("10.{}.0.0/24", 10 + round)],
            )?;
            cluster.meshctl_ok(1, &["service", "create", &svc, "--network", &net])?;
            cluster.add_container(2, &svc, &format!("{svc}.1"))?;
            (3200 + round as u16, svc)
        } else {
            (3100 + round as u16, "web".to_owned())
        };
        let started = Instant::now();
        cluster.meshctl_ok(1, &["publish", &format!("{port}:80"), &service])?;
        let slowest: Result<Vec<Duration>> = std::thread::scope(|s| {
            let pollers: Vec<_> = (1..=NODES)
                .map(|i| {
                    let client = client.clone();
                    s.spawn(move || {
                        poll(&format!("n{i} serves {port}"), Duration::from_secs(15), || {
                            http_get(&client, SocketAddr::from((node_addr(i), port)))?;
                            Ok(started.elapsed())
                        })
                    })
                })
                .collect();
            pollers.into_iter().map(|p| p.join().expect("poller panicked")).collect::<Result<Vec<_>>>()
        });
        let slowest = match slowest {
            Ok(slowest) => slowest,
            Err(error) => {
                // Reported, not fatal: the table says how many rounds never converged.
                println!("publish round {round}: port {port} not served everywhere: {error:#}");
                failures.push(format!("round {round}: {}", error.root_cause()));
                continue;
            }
        };
        let worst = slowest.into_iter().max().unwrap_or_default();
        println!(
            "publish ({}) round {round}: port {port} served by all {NODES} nodes in {worst:?}",
            if cold { "cold" } else { "warm" }
        );
        times.push((worst.as_secs_f64() * 1000.0, String::new()));
    }
    let (median_ms, _) = if times.is_empty() { (f64::NAN, String::new()) } else { median(&mut times) };
    let max_ms = times.iter().map(|t| t.0).fold(0.0, f64::max);
    let mut runs = times.iter().map(|t| format!("{:.0}", t.0)).collect::<Vec<_>>().join(" / ");
    if !failures.is_empty() {
        runs = format!(
            "{runs}; {} of {rounds} rounds never served on every node within 15 s ({})",
            failures.len(),
            failures.join("; ")
        );
    }
    let path = if cold {
        "cold: network new to 9 of the nodes; meshctl publish on n1 → port answers on all 10 (goal ≤ 1000 ms)"
    } else {
        "warm: every node on the network; meshctl publish on n1 → port answers on all 10 (goal ≤ 1000 ms)"
    };
    Ok(vec![Row {
        group: "Publish convergence, 10 nodes".into(),
        path: path.into(),
        value: median_ms,
        unit: "ms (median)".into(),
        detail: format!("max {max_ms:.0} ms; runs: {runs}"),
        baseline: false,
    }])
}
