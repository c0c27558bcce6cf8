//! Restarting meshd refuses no connection to a published port (#7): a listener keeper
//! holds the listening sockets while no meshd runs (`kill -9` or SIGTERM, then start),
//! the kernel queues new connections in their backlogs, and the next meshd accepts
//! them. Through the proxy (`--xdp off`): the kernel path survives restarts by itself.
//! Without the keeper (`--listener-hold-secs 0`) the same restart refuses connections;
//! a node stopped for good refuses again once the hold time is over, or at once after
//! `meshd --cleanup`. The same keeper holds each container's resolver sockets
//! (`127.0.0.11:53`): a container's DNS queries wait through a restart of its node's
//! meshd instead of meeting a closed port.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use std::process::Command;

use anyhow::{ensure, Result};
use meshd_tests::{http_get, node_addr, poll, refused, Cluster, StartOptions};

/// Four clients asking n1:3000 one request after another until stopped (at most 20 s):
/// what they saw.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<thread::JoinHandle<(usize, Vec<String>)>>,
}

impl Load {
    fn start(cluster: &Cluster) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let addr = SocketAddr::from((node_addr(1), 3000));
        let clients = (0..4)
            .map(|_| {
                let (stop, client) = (stop.clone(), cluster.client_netns());
                thread::spawn(move || {
                    let (mut ok, mut failed) = (0, Vec::new());
                    let deadline = Instant::now() + Duration::from_secs(20);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match http_get(&client, addr) {
                            Ok(body) if body == "web.1" => ok += 1,
                            Ok(body) => failed.push(format!("answer {body:?}")),
                            Err(error) => failed.push(format!("{error:#}")),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        Load { stop, clients }
    }

    /// Stops the clients: (answered, failures).
    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = (0, Vec::new());
        for client in self.clients {
            let (ok, failed) = client.join().expect("a client thread panicked");
            total.0 += ok;
            total.1.extend(failed);
        }
        total
    }
}

fn web_cluster(hold_secs: &str) -> Result<Cluster> {
    let meshd_args = ["--xdp", "off", "--listener-hold-secs", hold_secs].map(String::from).to_vec();
    let mut cluster = Cluster::start_with(2, StartOptions { meshd_args, ..Default::default() })?;
    cluster.wait_all_alive(1)?;
    cluster.publish_web(2)?;
    Ok(cluster)
}

/// Restarts n1 (`kill -9` or SIGTERM, then start) under load; returns (answered during
/// the whole run, failures).
fn restart_under_load(cluster: &mut Cluster, kill: bool) -> Result<(usize, Vec<String>)> {
    let load = Load::start(cluster);
    // Load is flowing before the restart.
    poll("the load is answered", Duration::from_secs(5), || {
        ensure!(http_get(&cluster.client_netns(), SocketAddr::from((node_addr(1), 3000)))? == "web.1");
        Ok(())
    })?;
    if kill {
        cluster.kill_node(1)?;
    } else {
        ensure!(cluster.stop_node(1)?.success(), "meshd did not exit cleanly on SIGTERM");
    }
    cluster.restart_node(1)?;
    cluster.wait_serving(1, "3000/tcp", 1)?;
    // A while of load after the restart too.
    let after = Instant::now();
    poll("requests are answered after the restart", Duration::from_secs(10), || {
        ensure!(after.elapsed() >= Duration::from_millis(500));
        Ok(())
    })?;
    Ok(load.finish())
}

#[test]
fn restarting_meshd_under_load_refuses_no_connection() -> Result<()> {
    let mut cluster = web_cluster("3")?;
    for kill in [true, false] {
        let how = if kill { "kill -9" } else { "SIGTERM" };
        let (answered, failed) = restart_under_load(&mut cluster, kill)?;
        let (refused, cut): (Vec<_>, Vec<_>) = failed.iter().partition(|e| e.contains("Connection refused"));
        eprintln!(
            "{how} then start: {answered} requests answered, {} refused, {} cut in flight",
            refused.len(),
            cut.len()
        );
        ensure!(answered > 0, "no request was answered");
        ensure!(
            refused.is_empty(),
            "{how} then start: {} connections refused: {:?}",
            refused.len(),
            &refused[..1]
        );
        // A SIGTERM lets the relayed requests finish; a `kill -9` cuts those in flight
        // (at most one per client): they were accepted, not refused.
        let cut_allowed = if kill { 4 } else { 0 };
        ensure!(
            cut.len() <= cut_allowed,
            "{how} then start: {} requests cut: {:?}",
            cut.len(),
            &cut[..cut.len().min(4)]
        );
    }
    // Stopped for good: refused again once the 3 s hold is over.
    ensure!(cluster.stop_node(1)?.success());
    let addr = SocketAddr::from((node_addr(1), 3000));
    let stopped = Instant::now();
    poll("n1 refuses once the keeper lets go", Duration::from_secs(10), || {
        ensure!(refused(&cluster.client_netns(), addr)?, "still accepted");
        Ok(())
    })?;
    ensure!(
        stopped.elapsed() >= Duration::from_secs(2),
        "refused after {:?}, before the hold",
        stopped.elapsed()
    );
    // `--cleanup` ends a keeper at once.
    cluster.restart_node(1)?;
    cluster.wait_serving(1, "3000/tcp", 1)?;
    ensure!(cluster.stop_node(1)?.success());
    let said = cluster.cleanup_node(1)?;
    ensure!(refused(&cluster.client_netns(), addr)?, "the port still accepts after --cleanup: {said}");
    Ok(())
}

#[test]
fn without_the_keeper_a_restart_refuses_connections() -> Result<()> {
    let mut cluster = web_cluster("0")?;
    let (answered, failed) = restart_under_load(&mut cluster, true)?;
    eprintln!(
        "without the keeper, kill -9 then start: {answered} requests answered, {} failed",
        failed.len()
    );
    ensure!(!failed.is_empty(), "no request failed without the keeper: the restart test would prove nothing");
    let (answered, failed) = dns_through_restart(&mut cluster)?;
    eprintln!("without the keeper, DNS through a kill -9 and restart: {answered} answered, {failed} failed");
    ensure!(failed > 0, "no DNS query failed without the keeper: the DNS test would prove nothing");
    Ok(())
}

#[test]
fn a_containers_dns_queries_wait_through_a_restart_of_its_nodes_meshd() -> Result<()> {
    let mut cluster = web_cluster("3")?;
    let (answered, failed) = dns_through_restart(&mut cluster)?;
    eprintln!("DNS through a kill -9 and restart: {answered} answered, {failed} failed");
    ensure!(answered > 0 && failed == 0, "{failed} of {} DNS queries failed", answered + failed);
    Ok(())
}

/// `dig web` from web.1's container (on n2) in a loop while n2's meshd is killed and
/// started again: (answered, failed). Each query may take 3 s (one try).
fn dns_through_restart(cluster: &mut Cluster) -> Result<(usize, usize)> {
    let netns = cluster.containers[0].netns();
    let stop = Arc::new(AtomicBool::new(false));
    let asker = {
        let stop = stop.clone();
        thread::spawn(move || {
            let (mut answered, mut failed) = (0, 0);
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let out = Command::new("nsenter")
                    .arg(format!("--net={}", netns.display()))
                    .args(["--", "dig", "+short", "+time=3", "+tries=1", "@127.0.0.11", "web"])
                    .output();
                match out {
                    Ok(o) if o.status.success() && !String::from_utf8_lossy(&o.stdout).trim().is_empty() => {
                        answered += 1
                    }
                    _ => failed += 1,
                }
            }
            (answered, failed)
        })
    };
    cluster.kill_node(2)?;
    cluster.restart_node(2)?;
    // Queries keep going a while after the restart.
    let restarted = Instant::now();
    poll("a while after the restart", Duration::from_secs(5), || {
        ensure!(restarted.elapsed() >= Duration::from_millis(1500));
        Ok(())
    })?;
    stop.store(true, Ordering::Relaxed);
    Ok(asker.join().expect("the DNS client thread panicked"))
}
