//! Programming the kernel: 1,000 remote endpoints (FDB entry + neighbour each) on one
//! node's VXLAN device, and the restart-reconcile of a node that holds them, each with
//! the fork-per-entry path of commit 3cce870 (`bridge fdb replace … self permanent` and
//! `ip neigh replace … nud permanent` per endpoint, run serially) as the baseline in
//! the same run, on the same fresh namespace setup.
//!
//! Every measurement gets its own new network namespace (an underlay veth holding the
//! VTEP address, then the overlay's bridge and VXLAN device); the table shows the median
//! of [`ROUNDS`].

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use meshd_benches::{median, write_results, Row};
use meshd_control::reconcile::{actual, plan, Dataplane};
use meshd_dataplane::overlay::{vxlan_name, KernelVxlan, MacAddr, OverlaySpec, PeerSpec};
use meshd_tests::{in_netns, remove_prefix, sh};

const ENDPOINTS: u32 = 1000;
const ROUNDS: usize = 3;
const VNI: u32 = 4096;
const VTEP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);

/// Removes the benchmark's namespaces however it ends.
struct Namespaces(String);

impl Drop for Namespaces {
    fn drop(&mut self) {
        remove_prefix(&self.0);
    }
}

fn overlay() -> OverlaySpec {
    OverlaySpec { vni: VNI, node_ip: Ipv4Addr::new(10, 0, 0, 1), prefix_len: 16, node_mac: mac(1), mtu: 1450 }
}

fn mac(host: u32) -> MacAddr {
    let [_, _, c, d] = (u32::from(Ipv4Addr::new(10, 0, 0, 0)) + host).to_be_bytes();
    MacAddr([0x02, 0x42, 10, 0, c, d])
}

/// 1,000 endpoints spread over 9 remote VTEPs.
fn peers() -> Vec<PeerSpec> {
    (0..ENDPOINTS)
        .map(|i| {
            let host = 256 + i;
            PeerSpec {
                vni: VNI,
                ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + host),
                mac: mac(host),
                vtep: Ipv4Addr::new(198, 18, 0, 12 + (i % 9) as u8),
            }
        })
        .collect()
}

/// A fresh namespace with an underlay address and the overlay devices, ready for peers.
fn fresh_node(prefix: &str, label: &str) -> Result<PathBuf> {
    let ns = format!("{prefix}-{label}");
    sh("ip", &["netns", "add", &ns])?;
    sh("ip", &["-n", &ns, "link", "add", "u0", "type", "veth", "peer", "name", "u1"])?;
    sh("ip", &["-n", &ns, "addr", "add", &format!("{VTEP}/24"), "dev", "u0"])?;
    sh("ip", &["-n", &ns, "link", "set", "u0", "up"])?;
    sh("ip", &["-n", &ns, "link", "set", "u1", "up"])?;
    let path = PathBuf::from("/run/netns").join(&ns);
    on_node(&path, |vx| async move { Ok(vx.ensure_network(&overlay()).await?) })?;
    Ok(path)
}

/// Runs `f` with a netlink client inside namespace `netns` (a thread that entered it,
/// with its own runtime and socket).
fn on_node<T: Send + 'static, F: std::future::Future<Output = Result<T>>>(
    netns: &std::path::Path,
    f: impl FnOnce(KernelVxlan) -> F + Send + 'static,
) -> Result<T> {
    in_netns(netns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async move { f(KernelVxlan::connect(VTEP)?).await })
    })?
}

/// The fork-per-entry path of 3cce870: two iproute2 processes per endpoint, serially.
fn program_by_forks(netns: &std::path::Path, peers: &[PeerSpec]) -> Result<Duration> {
    let peers = peers.to_vec();
    in_netns(netns, move || -> Result<Duration> {
        let vx = vxlan_name(VNI);
        let started = Instant::now();
        for p in &peers {
            let (mac, ip, vtep) = (p.mac.to_string(), p.ip.to_string(), p.vtep.to_string());
            run("bridge", &["fdb", "replace", &mac, "dev", &vx, "dst", &vtep, "self", "permanent"])?;
            run("ip", &["neigh", "replace", &ip, "lladdr", &mac, "dev", &vx, "nud", "permanent"])?;
        }
        Ok(started.elapsed())
    })?
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// meshd's netlink path: all entries pipelined on one socket.
fn program_by_netlink(netns: &std::path::Path, peers: &[PeerSpec]) -> Result<Duration> {
    let peers = peers.to_vec();
    on_node(netns, move |vx| async move {
        let started = Instant::now();
        for result in vx.add_peers(&peers).await {
            result?;
        }
        Ok(started.elapsed())
    })
}

/// A restart of today's agent: read back, plan against the wanted state, apply what
/// differs (nothing, when the kernel kept everything).
fn restart_reconcile(netns: &std::path::Path, peers: &[PeerSpec]) -> Result<(Duration, usize)> {
    let want = Dataplane {
        overlays: [(VNI, overlay())].into(),
        peers: peers.iter().cloned().collect(),
        ..Dataplane::default()
    };
    on_node(netns, move |vx| async move {
        let started = Instant::now();
        let seen = actual(vx.observe().await?, [], Default::default());
        let ops = plan(&seen, &want);
        let peers_to_add: Vec<PeerSpec> = ops
            .iter()
            .filter_map(|op| match op {
                meshd_control::reconcile::Op::AddPeer(p) => Some(p.clone()),
                _ => None,
            })
            .collect();
        for result in vx.add_peers(&peers_to_add).await {
            result?;
        }
        Ok((started.elapsed(), ops.len()))
    })
}

/// Checks that the namespace holds exactly the wanted entries.
fn check_programmed(netns: &std::path::Path, peers: &[PeerSpec]) -> Result<()> {
    let want: BTreeSet<PeerSpec> = peers.iter().cloned().collect();
    let seen = on_node(netns, |vx| async move { Ok(vx.observe().await?.peers) })?;
    ensure!(
        seen == want,
        "{} of {} endpoints programmed as wanted (seen {}, e.g. {:?}; want e.g. {:?})",
        seen.intersection(&want).count(),
        want.len(),
        seen.len(),
        seen.iter().next(),
        want.iter().next()
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> Result<()> {
    let prefix = format!("mt{}x9000", std::process::id());
    let _cleanup = Namespaces(prefix.clone());
    let peers = peers();
    let (mut fork_prog, mut nl_prog, mut fork_restart, mut nl_restart) = (vec![], vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        // Program from empty: forks, then netlink, each on a fresh namespace.
        let ns = fresh_node(&prefix, &format!("f{round}"))?;
        let forks = program_by_forks(&ns, &peers)?;
        check_programmed(&ns, &peers)?;
        // Restart of the old agent: its `applied` is empty, so it re-programs all.
        let old_restart = program_by_forks(&ns, &peers)?;
        sh("ip", &["netns", "del", &format!("{prefix}-f{round}")])?;

        let ns = fresh_node(&prefix, &format!("n{round}"))?;
        let netlink = program_by_netlink(&ns, &peers)?;
        check_programmed(&ns, &peers)?;
        let (new_restart, ops) = restart_reconcile(&ns, &peers)?;
        ensure!(ops == 0, "a restart over an intact node planned {ops} operations");
        sh("ip", &["netns", "del", &format!("{prefix}-n{round}")])?;

        println!(
            "round {round}: program 1000: forks {:.0} ms, netlink {:.1} ms; restart: forks {:.0} ms, observe+plan {:.1} ms",
            ms(forks),
            ms(netlink),
            ms(old_restart),
            ms(new_restart)
        );
        fork_prog.push((ms(forks), String::new()));
        nl_prog.push((ms(netlink), String::new()));
        fork_restart.push((ms(old_restart), String::new()));
        nl_restart.push((ms(new_restart), String::new()));
    }
    let runs = |v: &[(f64, String)]| v.iter().map(|r| format!("{:.1}", r.0)).collect::<Vec<_>>().join(" / ");
    // Rates (higher is better) so the ratio column reads as "times faster".
    let row = |group: &str, path: &str, samples: &mut Vec<(f64, String)>, baseline: bool| {
        let (median_ms, _) = median(samples);
        Row {
            group: group.into(),
            path: path.into(),
            value: 1000.0 * f64::from(ENDPOINTS) / median_ms,
            unit: "endpoints/s".into(),
            detail: format!("median {median_ms:.1} ms for 1,000; runs (ms): {}", runs(samples)),
            baseline,
        }
    };
    let program = "Program 1,000 remote endpoints (FDB + neighbour)";
    let restart = "Restart-reconcile a node with 1,000 endpoints";
    let rows = vec![
        row(
            program,
            "fork per entry (`bridge fdb replace` + `ip neigh replace`, as at 3cce870)",
            &mut fork_prog,
            true,
        ),
        row(program, "netlink, pipelined on one socket (goal ≥ 20×)", &mut nl_prog, false),
        row(restart, "old start: re-program all by forks", &mut fork_restart, true),
        row(restart, "observe + plan + apply (nothing to do)", &mut nl_restart, false),
    ];
    let text = write_results("netlink", "Kernel programming (netlink)", &rows)?;
    println!("\n{text}");
    Ok(())
}
