//! The kernel ingress path's loader and control wiring (#6), seen from outside: real
//! meshd nodes attach the XDP program to their underlay interface and the tc program to
//! their local tasks' veths, write published ports into the pinned maps in the mode
//! asked for, report it all in `meshctl status` and `service inspect`, and keep the
//! programs attached across a `kill -9`. (The traffic through the programs is tested in
//! `ingress.rs`.)

use std::{net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use aya::{
    maps::{HashMap, Map, MapData},
    programs::{tc::TcAttachType, SchedClassifier},
};
use meshd_tests::{node_addr, poll, Cluster};
use serde_json::Value;

/// Names and values of the contract in `ebpf/common/src/ingress.rs` (this crate reads
/// the pinned map as bytes: key `addr[4] port_be[2] proto pad`, value `table u32,
/// count u32, mode u8, pad[3]`).
const INGRESS_FRONTENDS_MAP: &str = "IN_FRONTENDS";
const INGRESS_TC_PROGRAM: &str = "ingress_reply";
const MODE_SNAT: u8 = 0;
const MODE_DSR: u8 = 1;

/// A frontend as the pinned map holds it: (address, port, mode, backend count).
type HeldFrontend = (Ipv4Addr, u16, u8, u32);

/// `ip -d link show eth0` in node `i`'s namespace.
fn underlay_link(cluster: &Cluster, i: usize) -> Result<String> {
    let ns = cluster.nodes[i - 1].netns();
    meshd_tests::sh(
        "nsenter",
        &[&format!("--net={}", ns.display()), "--", "ip", "-d", "link", "show", "eth0"],
    )
}

/// The id of the XDP program the kernel runs on node `i`'s eth0 in native (driver)
/// mode, read from `ip -d link` (`xdp` … `prog/xdp id N`).
fn native_xdp_program(cluster: &Cluster, i: usize) -> Result<u64> {
    let link = underlay_link(cluster, i)?;
    // iproute2 flags native mode `xdp`, generic `xdpgeneric`.
    ensure!(link.split_whitespace().any(|w| w == "xdp"), "no native XDP program on n{i}'s eth0:\n{link}");
    let id = link
        .split("prog/xdp id ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| anyhow!("no program id in:\n{link}"))?;
    Ok(id)
}

/// The TCP frontends held in node `i`'s pinned `IN_FRONTENDS` map, by port.
fn pinned_frontends(cluster: &Cluster, i: usize) -> Result<Vec<HeldFrontend>> {
    let pin = cluster.nodes[i - 1].pin_dir.join("ingress").join(INGRESS_FRONTENDS_MAP);
    let map: HashMap<_, [u8; 8], [u8; 12]> = HashMap::try_from(Map::HashMap(MapData::from_pin(&pin)?))?;
    let mut out = Vec::new();
    for entry in map.iter() {
        let (k, v) = entry?;
        ensure!(k[6] == 6, "only TCP frontends were published: {k:?}");
        let addr = Ipv4Addr::new(k[0], k[1], k[2], k[3]);
        let count = u32::from_ne_bytes([v[4], v[5], v[6], v[7]]);
        out.push((addr, u16::from_be_bytes([k[4], k[5]]), v[8], count));
    }
    out.sort_by_key(|f| f.1);
    Ok(out)
}

/// The names of the programs attached by TCX to `host_if`'s ingress in namespace `ns`.
fn tcx_programs(ns: &Path, host_if: &str) -> Result<Vec<String>> {
    let host_if = host_if.to_owned();
    let (_, programs) =
        meshd_tests::in_netns(ns, move || SchedClassifier::query_tcx(&host_if, TcAttachType::Ingress))??;
    Ok(programs.iter().map(|p| p.name_as_str().unwrap_or("?").to_owned()).collect())
}

/// `sysctl -w SETTING` in node `i`'s namespace (`nsenter`: `ip netns exec` would
/// remount /sys, see DESIGN.md; /proc/sys/net follows the network namespace).
fn sysctl(cluster: &Cluster, i: usize, setting: &str) -> Result<String> {
    let ns = cluster.nodes[i - 1].netns();
    meshd_tests::sh("nsenter", &[&format!("--net={}", ns.display()), "--", "sysctl", "-w", setting])
}

/// Node `i`'s `net.ipv4.conf.<dev>.forwarding`.
fn forwarding(cluster: &Cluster, i: usize, dev: &str) -> Result<String> {
    let ns = cluster.nodes[i - 1].netns();
    let setting = format!("net.ipv4.conf.{dev}.forwarding");
    let out =
        meshd_tests::sh("nsenter", &[&format!("--net={}", ns.display()), "--", "sysctl", "-n", &setting])?;
    Ok(out.trim().to_owned())
}

/// The task veths with a pinned tc link on node `i`.
fn tc_pins(cluster: &Cluster, i: usize) -> Result<Vec<String>> {
    let dir = cluster.nodes[i - 1].pin_dir.join("ingress");
    Ok(std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_prefix("tc_").map(str::to_owned))
        .collect())
}

/// The `published_paths` entry of `port` (e.g. `3000/tcp`) in `status`.
fn path_of<'a>(status: &'a Value, port: &str) -> Option<&'a Value> {
    status["published_paths"].as_array()?.iter().find(|p| p["port"] == port)
}

#[test]
fn xdp_and_tc_are_attached_ports_written_in_their_mode_and_status_says_so() -> Result<()> {
    // `--xdp auto` (the default): native XDP on these veths.
    let mut cluster = Cluster::start(2)?;
    // Before anything is published: XDP is attached natively on each node's eth0.
    for i in 1..=2 {
        let status = cluster.meshctl_json(i, &["status"])?;
        let ingress = &status["ingress"];
        ensure!(
            ingress["hook"] == "xdp-native" && ingress["interface"] == "eth0" && ingress["reason"].is_null(),
            "n{i}: {ingress}"
        );
        native_xdp_program(&cluster, i)?;
    }
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    cluster.add_container(1, "web", "web.1")?;
    cluster.meshctl_ok(1, &["publish", "3000:80", "web", "--mode", "dsr"])?;
    cluster.meshctl_ok(1, &["publish", "3001:80", "web"])?;

    // Bad input: an unknown mode is refused, naming it, and publishes nothing; a
    // re-publish in another mode follows the rule of every conflicting re-publish.
    let out = cluster.meshctl(1, &["publish", "3002:80", "web", "--mode", "fast"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("unknown publish mode \"fast\": use snat or dsr"),
        "{stderr}"
    );
    let out = cluster.meshctl(1, &["publish", "3000:80", "web", "--mode", "snat"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("port 3000/tcp is already published for service web"),
        "{stderr}"
    );

    // Both nodes serve both ports on the kernel path, in their modes (n2 encapsulates
    // to n1's task), and say so only once the maps were written and read back.
    for i in 1..=2 {
        poll(&format!("n{i} serves 3000 and 3001 by XDP"), Duration::from_secs(10), || {
            let status = cluster.meshctl_json(i, &["status"])?;
            let ok = |port: &str, mode: &str| {
                path_of(&status, port).is_some_and(|p| p["kernel_path"] == "xdp-native" && p["mode"] == mode)
            };
            if ok("3000/tcp", "dsr") && ok("3001/tcp", "snat") {
                Ok(())
            } else {
                Err(anyhow!("{}", status["published_paths"]))
            }
        })?;
        let held = pinned_frontends(&cluster, i)?;
        ensure!(
            held == [(node_addr(i), 3000, MODE_DSR, 1), (node_addr(i), 3001, MODE_SNAT, 1)],
            "n{i}'s pinned frontends: {held:?}"
        );
    }
    // The programs' next-hop lookups run through lo and need forwarding there: meshd
    // turns it on, and on again after a hand edit. The underlay interface is left as it
    // was (forwarding there would route the underlay segment into the overlays).
    for i in 1..=2 {
        ensure!(forwarding(&cluster, i, "lo")? == "1", "n{i} forwards on lo");
        ensure!(forwarding(&cluster, i, "eth0")? == "0", "n{i} leaves eth0 alone");
    }
    sysctl(&cluster, 2, "net.ipv4.conf.lo.forwarding=0")?;
    poll("n2 turns forwarding on lo on again", Duration::from_secs(5), || {
        let held = forwarding(&cluster, 2, "lo")?;
        if held == "1" {
            Ok(())
        } else {
            Err(anyhow!("forwarding {held}"))
        }
    })?;
    let inspect = cluster.meshctl_json(2, &["service", "inspect", "web"])?;
    let modes: Vec<_> =
        inspect["published"].as_array().into_iter().flatten().map(|p| p["mode"].clone()).collect();
    ensure!(modes == [Value::from("dsr"), Value::from("snat")], "{inspect}");
    let paths = inspect["published_paths"].as_array().cloned().unwrap_or_default();
    ensure!(
        paths.len() == 2 && paths.iter().all(|p| p["kernel_path"] == "xdp-native"),
        "service inspect shows the kernel path: {inspect}"
    );

    // The tc program sits on the local task's veth (n1), and n2 has no local task.
    let veths = tc_pins(&cluster, 1)?;
    ensure!(veths.len() == 1, "one tc link pinned on n1: {veths:?}");
    ensure!(tc_pins(&cluster, 2)?.is_empty(), "none on n2");
    let programs = tcx_programs(&cluster.nodes[0].netns(), &veths[0])?;
    ensure!(programs.iter().any(|p| p == INGRESS_TC_PROGRAM), "TCX ingress of {}: {programs:?}", veths[0]);
    let status = cluster.meshctl_json(1, &["status"])?;
    ensure!(status["ingress"]["tc_links"] == 1, "{}", status["ingress"]);
    for counter in [
        "pass",
        "local",
        "encap",
        "reply_xdp",
        "reply_tc",
        "dsr_recorded",
        "no_backend",
        "unrouted",
        "drop_malformed",
    ] {
        ensure!(status["ingress"]["counters"][counter].is_u64(), "counter {counter}: {}", status["ingress"]);
    }

    // kill -9: the programs stay attached (the pins hold them); the restarted meshd
    // adopts the same XDP program and reports the same paths.
    let before = native_xdp_program(&cluster, 1)?;
    cluster.kill_node(1)?;
    ensure!(native_xdp_program(&cluster, 1)? == before, "XDP kept across kill -9");
    ensure!(tcx_programs(&cluster.nodes[0].netns(), &veths[0])?.iter().any(|p| p == INGRESS_TC_PROGRAM));
    cluster.restart_node(1)?;
    poll("n1 serves 3000 by XDP again", Duration::from_secs(10), || {
        let status = cluster.meshctl_json(1, &["status"])?;
        match path_of(&status, "3000/tcp") {
            Some(p) if p["kernel_path"] == "xdp-native" && status["ingress"]["tc_links"] == 1 => Ok(()),
            _ => Err(anyhow!("{} {}", status["ingress"], status["published_paths"])),
        }
    })?;
    ensure!(native_xdp_program(&cluster, 1)? == before, "the restart adopted the pinned program");
    ensure!(tc_pins(&cluster, 1)? == veths, "the tc link was adopted, not replaced");
    // SIGTERM keeps them as well; `meshd --cleanup` detaches them and removes the pins.
    let status = cluster.stop_node(1)?;
    ensure!(status.success(), "meshd exits cleanly on SIGTERM: {status}");
    ensure!(native_xdp_program(&cluster, 1)? == before, "XDP kept across SIGTERM");
    ensure!(tc_pins(&cluster, 1)? == veths, "tc link kept across SIGTERM");
    cluster.cleanup_node(1)?;
    let link = underlay_link(&cluster, 1)?;
    ensure!(!link.contains("prog/xdp"), "XDP detached by --cleanup:\n{link}");
    ensure!(!cluster.nodes[0].pin_dir.join("ingress").exists(), "ingress pins removed");
    if underlay_link(&cluster, 2)?.contains("xdpgeneric") {
        bail!("n2 attached in generic mode as well");
    }
    Ok(())
}

#[test]
fn xdp_off_leaves_published_ports_to_the_proxy_and_says_why() -> Result<()> {
    let cluster = Cluster::start_with_args(1, &["--xdp", "off"])?;
    let status = cluster.meshctl_json(1, &["status"])?;
    let ingress = &status["ingress"];
    ensure!(ingress["hook"] == "off", "{ingress}");
    ensure!(ingress["reason"].as_str().is_some_and(|r| r.contains("--xdp off")), "{ingress}");
    let link = underlay_link(&cluster, 1)?;
    ensure!(!link.contains("prog/xdp"), "no XDP program with --xdp off:\n{link}");
    ensure!(forwarding(&cluster, 1, "lo")? == "0", "forwarding left as it was with --xdp off");
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    cluster.meshctl_ok(1, &["publish", "3000:80", "web", "--mode", "dsr"])?;
    let status = cluster.meshctl_json(1, &["status"])?;
    let port = path_of(&status, "3000/tcp").ok_or_else(|| anyhow!("{status}"))?;
    ensure!(port["kernel_path"] == "proxy" && port["mode"] == "dsr", "{port}");
    ensure!(port["kernel_path_reason"].as_str().is_some_and(|r| r.contains("--xdp off")), "{port}");
    Ok(())
}

#[test]
fn ports_beyond_the_maglev_tables_are_left_to_the_proxy_with_the_reason() -> Result<()> {
    let mut cluster = Cluster::start_with_args(1, &["--xdp-max-ports", "1", "--xdp", "native"])?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    cluster.add_container(1, "web", "web.1")?;
    cluster.meshctl_ok(1, &["publish", "3000:80", "web"])?;
    cluster.meshctl_ok(1, &["publish", "3001:80", "web"])?;
    poll("one port on XDP, the other on the proxy", Duration::from_secs(10), || {
        let status = cluster.meshctl_json(1, &["status"])?;
        let (Some(first), Some(second)) = (path_of(&status, "3000/tcp"), path_of(&status, "3001/tcp")) else {
            bail!("{}", status["published_paths"]);
        };
        let why = second["kernel_path_reason"].as_str().unwrap_or_default();
        if first["kernel_path"] == "xdp-native"
            && second["kernel_path"] == "proxy"
            && why.contains("--xdp-max-ports")
        {
            Ok(())
        } else {
            Err(anyhow!("{}", status["published_paths"]))
        }
    })?;
    // Unpublishing the first frees its table for the second.
    cluster.meshctl_ok(1, &["unpublish", "3000", "--grace", "0"])?;
    poll("3001 moves to XDP", Duration::from_secs(10), || {
        let status = cluster.meshctl_json(1, &["status"])?;
        match path_of(&status, "3001/tcp") {
            Some(p) if p["kernel_path"] == "xdp-native" => Ok(()),
            _ => Err(anyhow!("{}", status["published_paths"])),
        }
    })?;
    // The XDP link detached behind meshd's back: the closed loop attaches the program
    // again (seen through the kernel: the interface runs it), status says XDP again.
    let pin = cluster.nodes[0].pin_dir.join("ingress").join("xdp_native");
    meshd_tests::sh("bpftool", &["link", "detach", "pinned", &pin.to_string_lossy()])
        .context("detaching the XDP link (bpftool comes with Debian's `bpftool`)")?;
    poll("meshd attaches XDP again", Duration::from_secs(10), || {
        let link = underlay_link(&cluster, 1)?;
        let status = cluster.meshctl_json(1, &["status"])?;
        let port = path_of(&status, "3001/tcp").ok_or_else(|| anyhow!("{status}"))?;
        ensure!(
            link.contains("prog/xdp")
                && status["ingress"]["hook"] == "xdp-native"
                && port["kernel_path"] == "xdp-native",
            "{link}\n{}\n{port}",
            status["ingress"]
        );
        Ok(())
    })?;
    ensure!(
        std::fs::read_to_string(&cluster.nodes[0].log)?.contains("attached the ingress program again"),
        "the repair is not in the log"
    );
    Ok(())
}

#[test]
fn bad_ingress_flags_are_refused_before_anything_is_created() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("meshd-ingress-flags-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A typo in the interface name is refused, not taken for a kernel without XDP.
    meshd_tests::assert_flag_refused(
        &dir,
        "--underlay-if",
        "nosuchif0",
        "invalid --underlay-if \"nosuchif0\": no such interface in meshd's network namespace",
    )?;
    // clap's own errors span several lines (usage, hint): the first one is checked.
    for (flag, value, says) in [
        ("--xdp", "fast", "error: invalid value 'fast' for '--xdp <XDP>'"),
        ("--xdp-max-ports", "0", "error: invalid value '0' for '--xdp-max-ports <XDP_MAX_PORTS>'"),
        ("--xdp-max-ports", "1025", "error: invalid value '1025' for '--xdp-max-ports <XDP_MAX_PORTS>'"),
    ] {
        let out = std::process::Command::new(meshd_tests::bin_path("meshd")?)
            .args(["--node-name", "x", "--advertise-addr", "198.18.0.250", flag, value])
            .arg("--state-dir")
            .arg(&dir)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success() && stderr.starts_with(says), "{flag} {value}: {stderr:?}");
        ensure!(!dir.exists(), "meshd created {} before refusing {flag}", dir.display());
    }
    Ok(())
}

/// One keep-alive request on `stream` (meshd-testsrv's `/peer`); the answer's body.
fn ask_peer(stream: &mut std::io::BufReader<std::net::TcpStream>) -> Result<String> {
    use std::io::{BufRead as _, Read as _, Write as _};
    stream.get_mut().write_all(b"GET /peer HTTP/1.1\r\nHost: test\r\n\r\n")?;
    let mut length = None;
    loop {
        let mut line = String::new();
        ensure!(stream.read_line(&mut line)? > 0, "connection closed");
        let line = line.trim_end().to_ascii_lowercase();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("content-length:") {
            length = Some(v.trim().parse::<usize>()?);
        }
    }
    let mut body = vec![0; length.ok_or_else(|| anyhow!("no Content-Length"))?];
    stream.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The ids of the underlay link pinned for node 1 as `pin` and of the program it runs.
fn pinned_underlay(cluster: &Cluster, pin: &str) -> Result<(u32, u32)> {
    let pin = cluster.nodes[0].pin_dir.join("ingress").join(pin);
    let link = aya::programs::links::FdLink::from(aya::programs::links::PinnedLink::from_pin(&pin)?);
    let info = link.info()?;
    Ok((info.id(), info.program_id()))
}

/// A one-node cluster started with `--xdp hook`, `web.1` published on 3000 and served
/// by the kernel path `path`.
fn one_node_web(hook: &str, path: &'static str) -> Result<Cluster> {
    let cluster = Cluster::start_with_args(1, &["--xdp", hook])?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    let mut cluster = cluster;
    cluster.add_container(1, "web", "web.1")?;
    cluster.meshctl_ok(1, &["publish", "3000:80", "web"])?;
    served_by(&cluster, path)?;
    Ok(cluster)
}

/// Waits until node 1 serves 3000/tcp by `path`.
fn served_by(cluster: &Cluster, path: &str) -> Result<()> {
    poll(&format!("n1 serves 3000 by {path}"), Duration::from_secs(10), || {
        let status = cluster.meshctl_json(1, &["status"])?;
        match path_of(&status, "3000/tcp") {
            Some(p) if p["kernel_path"] == path && status["ingress"]["hook"] == path => Ok(()),
            _ => Err(anyhow!("{} {}", status["ingress"], status["published_paths"])),
        }
    })
}

/// An upgrade switches the program in the pinned link of `hook` in place, and a held
/// connection never notices.
fn new_program_takes_over_in_place(hook: &str, pin: &str, path: &'static str) -> Result<()> {
    let mut cluster = one_node_web(hook, path)?;
    let addr = std::net::SocketAddr::from((node_addr(1), 3000));
    let stream = meshd_tests::in_netns(&cluster.client_netns(), move || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    })?
    .context("connecting from the client")?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut held = std::io::BufReader::new(stream);
    ensure!(ask_peer(&mut held)?.starts_with("web.1 "), "the held connection reaches web.1");
    let (link, program) = pinned_underlay(&cluster, pin)?;

    // What an upgrade looks like to the loader: the pinned link runs a program that is
    // not this meshd's (here: one of its maps was replaced while meshd was down).
    cluster.kill_node(1)?;
    std::fs::remove_file(cluster.nodes[0].pin_dir.join("ingress").join("IN_MAGLEV"))?;
    cluster.restart_node(1)?;
    served_by(&cluster, path)?;
    let (new_link, new_program) = pinned_underlay(&cluster, pin)?;
    ensure!(new_program != program, "the new meshd runs its own program");
    ensure!(new_link == link, "the program was switched in the same link (BPF_LINK_UPDATE), never detached");
    ensure!(ask_peer(&mut held)?.starts_with("web.1 "), "the held connection still works");
    Ok(())
}

#[test]
fn a_new_program_takes_over_the_pinned_link_in_place() -> Result<()> {
    new_program_takes_over_in_place("native", "xdp_native", "xdp-native")
}

#[test]
fn a_new_program_takes_over_the_pinned_tc_link_in_place() -> Result<()> {
    new_program_takes_over_in_place("tc", "underlay_tc", "tc")
}

/// The names of the programs at TCX ingress of node 1's `eth0`, asked of the kernel.
fn underlay_tcx_programs(cluster: &Cluster) -> Result<Vec<String>> {
    let tcx = meshd_tests::in_netns(&cluster.nodes[0].netns(), || {
        aya::programs::SchedClassifier::query_tcx("eth0", aya::programs::tc::TcAttachType::Ingress)
    })?
    .context("querying eth0's TCX ingress programs")?;
    Ok(tcx.1.iter().filter_map(|p| p.name_as_str().map(str::to_owned)).collect())
}

#[test]
fn the_tc_twin_attaches_serves_and_stays_attached() -> Result<()> {
    let mut cluster = Cluster::start_with_args(1, &["--xdp", "tc"])?;
    let status = cluster.meshctl_json(1, &["status"])?;
    ensure!(
        status["ingress"]["hook"] == "tc" && status["ingress"]["reason"].is_null(),
        "--xdp tc: {}",
        status["ingress"]
    );
    ensure!(underlay_tcx_programs(&cluster)? == ["ingress_tc"], "eth0's TCX ingress runs ingress_tc");
    ensure!(!underlay_link(&cluster, 1)?.contains("prog/xdp"), "no XDP program beside it");
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    cluster.add_container(1, "web", "web.1")?;
    cluster.meshctl_ok(1, &["publish", "3000:80", "web"])?;
    served_by(&cluster, "tc")?;
    let addr = std::net::SocketAddr::from((node_addr(1), 3000));
    let before = cluster.meshctl_json(1, &["status"])?["ingress"]["counters"]["local"].as_u64().unwrap_or(0);
    ensure!(meshd_tests::http_get(&cluster.client_netns(), addr)?.contains("web.1"), "3000 reaches web.1");
    let after = cluster.meshctl_json(1, &["status"])?["ingress"]["counters"]["local"].as_u64().unwrap_or(0);
    ensure!(after > before, "the request went through the tc program (local {before} → {after})");

    // Detached behind meshd's back: the closed loop attaches it again.
    let pin = cluster.nodes[0].pin_dir.join("ingress").join("underlay_tc");
    meshd_tests::sh("bpftool", &["link", "detach", "pinned", &pin.to_string_lossy()])
        .context("detaching the tc link (bpftool comes with Debian's `bpftool`)")?;
    poll("meshd attaches tc again", Duration::from_secs(10), || {
        ensure!(underlay_tcx_programs(&cluster)? == ["ingress_tc"], "eth0 runs no ingress_tc");
        Ok(())
    })?;
    served_by(&cluster, "tc")?;

    // kill -9: the pinned link keeps serving; a restart adopts it.
    cluster.kill_node(1)?;
    ensure!(underlay_tcx_programs(&cluster)? == ["ingress_tc"], "the tc program went with meshd");
    ensure!(
        meshd_tests::http_get(&cluster.client_netns(), addr)?.contains("web.1"),
        "served with meshd dead"
    );
    cluster.restart_node(1)?;
    served_by(&cluster, "tc")?;
    ensure!(
        std::fs::read_to_string(&cluster.nodes[0].log)?.contains("adopted the pinned underlay link"),
        "the restart adopted the link"
    );
    Ok(())
}
