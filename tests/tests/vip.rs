//! Service VIPs end to end: allocation by the real meshd (ls, inspect, concurrent
//! creates, dnsrr, restarts, rm), and the pinned socket load balancer the agent runs —
//! real client processes in a node's cgroup reaching tasks on other nodes through the
//! VIP, across a `kill -9` of meshd, and losing a dead node's task within a second.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Context as _, Result};
use meshd_tests::{poll, Cluster};
use serde_json::{json, Value};

const ECONNREFUSED: i64 = 111;

/// Steps: `["http", addr, port, n]` connects n times, records getpeername and the
/// body of `GET /` (the task's name); `["udp", addr, port, n]` sends n datagrams from
/// one unconnected socket and records each answer's sender (recvfrom);
/// `["udpc", addr, port, n]` the same with connected sockets (getpeername). Errors are
/// recorded as errnos (`"timeout"` for a timeout).
const CLIENT: &str = r#"
import json, socket, sys
sys.stdin.readline()
out = []
for kind, addr, port, n in json.loads(sys.argv[1]):
    for i in range(n):
        try:
            if kind == "http":
                s = socket.socket()
                s.settimeout(1)
                s.connect((addr, port))
                peer = s.getpeername()
                s.sendall(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                body = data.split(b"\r\n\r\n", 1)[-1].decode().strip()
            else:
                if kind == "udp" and i == 0 or kind == "udpc":
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.settimeout(1)
                if kind == "udpc":
                    s.connect((addr, port))
                    s.send(b"x")
                    peer = s.getpeername()
                    body = s.recv(64).decode()
                else:
                    s.sendto(b"x", (addr, port))
                    data, peer = s.recvfrom(64)
                    body = data.decode()
            out.append({"peer": "%s:%d" % peer, "data": body})
        except socket.timeout:
            out.append({"err": "timeout"})
        except OSError as e:
            out.append({"err": e.errno})
        if kind != "udp":
            s.close()
print(json.dumps(out))
"#;

/// Connects to `VIP:80` in a loop until told to stop (a line on stdin), for at most
/// 15 s and 100,000 attempts; counts every attempt, and says `up` after the first
/// connect succeeded.
const LOOP_CLIENT: &str = r#"
import json, select, socket, sys, time
addr = sys.argv[1]
sys.stdin.readline()
ok = failed = 0
errors = {}
why = "bound"
start = time.monotonic()
while ok + failed < 100000 and time.monotonic() < start + 15:
    if select.select([sys.stdin], [], [], 0)[0]:
        why = sys.stdin.readline()
        break
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((addr, 80))
        ok += 1
        if ok == 1:
            print("up", flush=True)
    except OSError as e:
        failed += 1
        errors[str(e.errno)] = errors.get(str(e.errno), 0) + 1
    s.close()
print(json.dumps({"ok": ok, "failed": failed, "errors": errors, "secs": time.monotonic() - start, "why": why}))
"#;

/// A UDP server answering every datagram with its name.
const UDP_ECHO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(64)
    s.sendto(sys.argv[1].encode(), peer)
"#;

/// Starts a python3 client in `netns`, placed in `cgroup` (if any) before it acts.
fn spawn_python(netns: &Path, cgroup: Option<&Path>, script: &str, arg: &str) -> Result<Child> {
    let child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["--", "python3", "-c", script, arg])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nsenter and python3; install them with `apt-get install util-linux python3`")?;
    if let Some(cgroup) = cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string())?;
    }
    Ok(child)
}

/// Runs the [`CLIENT`] steps in node `node`'s namespace (in its cgroup if `in_cgroup`).
fn client(cluster: &Cluster, node: usize, in_cgroup: bool, steps: Value) -> Result<Vec<Value>> {
    let n = &cluster.nodes[node - 1];
    let cgroup = in_cgroup.then_some(n.cgroup.as_path());
    let mut child = spawn_python(&n.netns(), cgroup, CLIENT, &steps.to_string())?;
    child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?.write_all(b"go\n")?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).with_context(|| format!("client output {out:?}"))
}

/// Starts [`UDP_ECHO`] named `name` on `port` in `netns`.
fn udp_echo(netns: &Path, name: &str, port: u16) -> Result<Child> {
    let script = UDP_ECHO.replace("int(sys.argv[2])", &port.to_string());
    spawn_python(netns, None, &script, name)
}

/// Every attempt answered with `peer` as its peer; the set of task names reached.
fn reached(results: &[Value], peer: &str) -> Result<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    for r in results {
        ensure!(r["peer"] == peer, "peer should be {peer}: {r} (all: {results:?})");
        seen.insert(r["data"].as_str().unwrap_or_default().to_owned());
    }
    Ok(seen)
}

fn vip_of(cluster: &Cluster, node: usize, service: &str) -> Result<Option<Ipv4Addr>> {
    let inspect = cluster.meshctl_json(node, &["service", "inspect", service])?;
    match &inspect["service"]["vip"] {
        Value::Null => Ok(None),
        v => Ok(Some(v.as_str().ok_or_else(|| anyhow!("vip {v}"))?.parse()?)),
    }
}

/// The backends node `node`'s socket load balancer holds for `vip` (read back from the
/// kernel maps by meshd), per `meshctl status`.
fn vip_backends(cluster: &Cluster, node: usize, vip: Ipv4Addr) -> Result<Vec<String>> {
    let status = cluster.meshctl_json(node, &["status"])?;
    let row = status["vips"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["vip"] == vip.to_string())
        .ok_or_else(|| anyhow!("no VIP {vip} in status: {}", status["vips"]))?;
    ensure!(row["path"] == "socket-lb", "VIP {vip} not served by the socket LB: {row}");
    Ok(row["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| b.as_str().unwrap_or("").to_owned())
        .collect())
}

/// The program ids meshd reports, in hook order.
fn program_ids(cluster: &Cluster, node: usize) -> Result<Vec<u64>> {
    let status = cluster.meshctl_json(node, &["status"])?;
    Ok(status["ebpf"].as_array().into_iter().flatten().filter_map(|p| p["id"].as_u64()).collect())
}

/// The program ids bpftool sees attached to `cgroup`.
fn attached_ids(cgroup: &Path) -> Result<BTreeSet<u64>> {
    let out = meshd_tests::sh("bpftool", &["cgroup", "show", &cgroup.to_string_lossy()])
        .context("bpftool (install with `apt-get install bpftool`)")?;
    Ok(out.lines().skip(1).filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect())
}

#[test]
fn vips_are_allocated_distinct_shown_kept_across_restarts_and_freed_on_rm() -> Result<()> {
    let mut cluster = Cluster::start(3)?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    for i in 2..=3 {
        poll(&format!("n{i} knows the network"), Duration::from_secs(10), || {
            let nets = cluster.meshctl_json(i, &["network", "ls"])?;
            ensure!(nets.as_array().is_some_and(|a| a.len() == 1), "{nets}");
            Ok(())
        })?;
    }
    // Two nodes create a service on one network at the same moment.
    let create = |node: usize, name: &'static str| {
        let meshctl = meshd_tests::bin_path("meshctl").expect("meshctl built");
        let socket = cluster.nodes[node - 1].socket.clone();
        std::thread::spawn(move || {
            Command::new(meshctl)
                .arg("--socket")
                .arg(socket)
                .args(["service", "create", name, "--network", "backend"])
                .output()
        })
    };
    let (a, b) = (create(1, "alpha"), create(2, "beta"));
    for (name, out) in [("alpha", a.join().expect("thread")?), ("beta", b.join().expect("thread")?)] {
        ensure!(out.status.success(), "create {name}: {}", String::from_utf8_lossy(&out.stderr));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("with VIP 10.0.0."), "{said}");
    }
    cluster
        .meshctl_ok(1, &["service", "create", "names", "--network", "backend", "--endpoint-mode", "dnsrr"])
        .map_err(|e| e.context(cluster.log_tail(2, 30)))?;
    let alpha = vip_of(&cluster, 1, "alpha")?.ok_or_else(|| anyhow!("alpha has no VIP"))?;
    let beta = vip_of(&cluster, 1, "beta")?.ok_or_else(|| anyhow!("beta has no VIP"))?;
    assert_ne!(alpha, beta, "concurrent creates got the same VIP");
    let in_subnet = |ip: Ipv4Addr| ip.octets()[..3] == [10, 0, 0] && !matches!(ip.octets()[3], 0 | 255);
    assert!(in_subnet(alpha) && in_subnet(beta), "{alpha} {beta}");
    assert_eq!(vip_of(&cluster, 1, "names")?, None, "dnsrr has no VIP");

    // ls: the VIP column, `-` for dnsrr; the same on every node.
    let table = cluster.meshctl_ok(1, &["service", "ls"])?;
    assert!(table.lines().next().unwrap_or("").contains("VIP"), "{table}");
    let names_row = table.lines().find(|l| l.starts_with("names")).unwrap_or("");
    assert!(names_row.split_whitespace().any(|c| c == "-"), "{table}");
    let before = vips(&cluster, 1)?;
    assert_eq!(
        before,
        [
            ("alpha".into(), alpha.to_string()),
            ("beta".into(), beta.to_string()),
            ("names".into(), "-".into())
        ]
    );
    for i in 2..=3 {
        poll(&format!("n{i} lists the VIPs"), Duration::from_secs(10), || {
            let got = vips(&cluster, i)?;
            ensure!(got == before, "{got:?}");
            Ok(())
        })?;
    }
    // A VIP is an address in use: a task cannot ask for it.
    let ns = cluster.add_netns("ask")?;
    let out = cluster
        .meshctl(1, &["attach", "alpha", "--netns", &ns.to_string_lossy(), "--ip", &alpha.to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is the VIP of service alpha"), "{err}");

    // Restart every node: the VIPs stay.
    for i in 1..=3 {
        cluster.stop_node(i)?;
    }
    for i in 1..=3 {
        cluster.restart_node(i)?;
    }
    for i in 1..=3 {
        assert_eq!(vips(&cluster, i)?, before, "n{i} after restarting every node");
    }

    // rm frees the VIP: a task may now take that very address.
    cluster.meshctl_ok(1, &["service", "rm", "alpha"])?;
    let attached = cluster.meshctl_json(
        1,
        &["attach", "beta", "--netns", &ns.to_string_lossy(), "--name", "beta.1", "--ip", &alpha.to_string()],
    )?;
    assert_eq!(attached["ip"], alpha.to_string(), "{attached}");
    Ok(())
}

/// `(name, VIP or "-")` of every service, as `meshctl service ls` on `node` shows them.
fn vips(cluster: &Cluster, node: usize) -> Result<Vec<(String, String)>> {
    let rows = cluster.meshctl_json(node, &["service", "ls"])?;
    Ok(rows
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| (r["name"].as_str().unwrap_or("").into(), r["vip"].as_str().unwrap_or("").into()))
        .collect())
}

/// Three nodes; `web` has tasks on n2 and n3 (HTTP on 80, UDP echo on 5300) and
/// publishes 3000:80, so n1 takes part in its network.
fn web_cluster() -> Result<(Cluster, Ipv4Addr, Vec<Child>)> {
    let mut cluster = Cluster::start(3)?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    let vip = vip_of(&cluster, 1, "web")?.ok_or_else(|| anyhow!("web has no VIP"))?;
    let mut echoes = Vec::new();
    for (node, task) in [(2, "web.2"), (3, "web.3")] {
        let netns = cluster.add_container(node, "web", task)?.netns();
        echoes.push(udp_echo(&netns, task, 5300)?);
    }
    cluster.meshctl_ok(1, &["publish", "3000:80", "web"])?;
    poll("n1's socket LB holds both tasks for the VIP", Duration::from_secs(10), || {
        let backends = vip_backends(&cluster, 1, vip)?;
        ensure!(backends.len() == 2, "{backends:?}");
        Ok(())
    })?;
    Ok((cluster, vip, echoes))
}

#[test]
fn a_vip_reaches_every_task_from_the_nodes_cgroup_only_and_refuses_what_nobody_serves() -> Result<()> {
    let (cluster, vip, mut echoes) = web_cluster()?;
    cluster.meshctl_ok(1, &["service", "create", "empty", "--network", "backend"])?;
    let empty = vip_of(&cluster, 1, "empty")?.ok_or_else(|| anyhow!("empty has no VIP"))?;
    let both: BTreeSet<String> = ["web.2".into(), "web.3".into()].into();

    // The four programs are attached to n1's cgroup, with the ids meshd reports.
    let ids = program_ids(&cluster, 1)?;
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(attached_ids(&cluster.nodes[0].cgroup)?, ids.iter().copied().collect());

    let steps = json!([
        ["http", vip.to_string(), 80, 12],
        ["http", "127.0.0.1", 3000, 12],
        ["udp", vip.to_string(), 5300, 12],
        ["udpc", vip.to_string(), 5300, 4],
        ["http", vip.to_string(), 81, 1],
    ]);
    let results = client(&cluster, 1, true, steps)?;
    let spread = reached(&results[..12], &format!("{vip}:80"))?;
    assert_eq!(spread, both, "TCP to the VIP reaches every task");
    let spread = reached(&results[12..24], "127.0.0.1:3000")?;
    assert_eq!(spread, both, "a local client of the published port reaches every task");
    let spread = reached(&results[24..36], &format!("{vip}:5300"))?;
    assert_eq!(spread, both, "UDP answers come from the VIP (recvfrom)");
    reached(&results[36..40], &format!("{vip}:5300"))?;
    assert_eq!(results[40]["err"], ECONNREFUSED, "a port no task listens on: the task's RST");

    // A service without tasks refuses at once.
    let started = Instant::now();
    let results = client(&cluster, 1, true, json!([["http", empty.to_string(), 80, 1]]))?;
    assert_eq!(results[0]["err"], ECONNREFUSED, "{results:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once: {:?}", started.elapsed());

    // A process outside the cgroup is untouched: nothing answers on the VIP itself.
    let results = client(&cluster, 1, false, json!([["http", vip.to_string(), 80, 1]]))?;
    assert!(results[0]["err"].is_number() || results[0]["err"] == "timeout", "{results:?}");

    for echo in &mut echoes {
        echo.kill()?;
        echo.wait()?;
    }
    Ok(())
}

#[test]
fn kill_9_keeps_vip_connects_working_and_the_restart_adopts_the_pins() -> Result<()> {
    let (mut cluster, vip, mut echoes) = web_cluster()?;
    let ids = program_ids(&cluster, 1)?;
    let node = &cluster.nodes[0];
    let mut child = spawn_python(&node.netns(), Some(&node.cgroup), LOOP_CLIENT, &vip.to_string())?;
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    stdin.write_all(b"go\n")?;
    stdin.flush()?;
    let mut stdout = std::io::BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?);
    let mut up = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut up)?;
    ensure!(up.trim() == "up", "the client did not connect: {up:?}");
    // meshd dies while connects are under way, and stays down until the restart.
    cluster.kill_node(1)?;
    cluster.restart_node(1)?;
    // The restarted meshd adopted the pinned links: the same programs, attached once.
    assert_eq!(program_ids(&cluster, 1)?, ids, "program ids after the restart");
    assert_eq!(attached_ids(&cluster.nodes[0].cgroup)?, ids.iter().copied().collect());
    // Connects go on through the adopted programs (their counter keeps rising).
    let rewritten = |cluster: &Cluster| -> Result<u64> {
        Ok(cluster.meshctl_json(1, &["status"])?["ebpf"][0]["rewritten"].as_u64().unwrap_or(0))
    };
    let after_restart = rewritten(&cluster)?;
    poll("connects continue after the restart", Duration::from_secs(10), || {
        let n = rewritten(&cluster)? - after_restart;
        ensure!(n >= 1000, "{n} connects rewritten since the restart");
        Ok(())
    })?;
    // The client may have ended on its own bound already: then its pipe is closed.
    let _ = stdin.write_all(b"stop\n");
    drop(stdin);
    let mut out = String::new();
    stdout.read_to_string(&mut out)?;
    child.wait()?;
    let counts: Value = serde_json::from_str(&out).with_context(|| format!("loop client said {out:?}"))?;
    println!("connects to the VIP across kill -9 and restart: {counts}");
    assert_eq!(counts["failed"], 0, "no connect failed: {counts}");
    let rate = counts["ok"].as_f64().unwrap_or(0.0) / counts["secs"].as_f64().unwrap_or(1.0);
    assert!(rate >= 500.0, "at least 500 connects/s: {rate:.0}/s ({counts})");
    for echo in &mut echoes {
        echo.kill()?;
        echo.wait()?;
    }
    Ok(())
}

#[test]
fn a_dead_nodes_task_leaves_the_vip_within_a_second_of_it_being_declared_dead() -> Result<()> {
    let (mut cluster, vip, mut echoes) = web_cluster()?;
    let on3 = cluster.containers.iter().find(|c| c.node == 3).ok_or_else(|| anyhow!("no task on n3"))?.ip;
    cluster.kill_node(3)?;
    let dead = poll("n1 declares n3 dead", Duration::from_secs(20), || {
        let state = cluster.member_state(1, 3)?;
        ensure!(state == "dead", "n3 is {state}");
        Ok(Instant::now())
    })?;
    poll("n1's map drops n3's task", Duration::from_secs(5), || {
        let backends = vip_backends(&cluster, 1, vip)?;
        ensure!(!backends.contains(&on3.to_string()), "{backends:?}");
        Ok(())
    })?;
    let took = dead.elapsed();
    println!("n3's task left n1's map {took:?} after n1 showed n3 dead");
    assert!(took <= Duration::from_secs(1), "took {took:?} after n3 was seen dead");
    // And the client only reaches n2's task now.
    let results = client(&cluster, 1, true, json!([["http", vip.to_string(), 80, 6]]))?;
    assert_eq!(reached(&results, &format!("{vip}:80"))?, ["web.2".to_owned()].into());
    for echo in &mut echoes {
        echo.kill()?;
        echo.wait()?;
    }
    Ok(())
}

#[test]
fn socket_lb_off_says_once_that_nftables_serves_vips_and_a_bogus_mode_is_refused() -> Result<()> {
    let meshd = meshd_tests::bin_path("meshd")?;
    let out = Command::new(&meshd)
        .args(["--socket-lb", "bogus", "--node-name", "x", "--advertise-addr", "198.18.0.1"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("invalid value 'bogus' for '--socket-lb"), "{err}");

    let cluster = Cluster::start_with_args(1, &["--socket-lb", "off"])?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    let status = cluster.meshctl_json(1, &["status"])?;
    assert_eq!(status["ebpf"], json!([]), "no programs: {status}");
    assert!(attached_ids(&cluster.nodes[0].cgroup)?.is_empty());
    // It says once what is missing and which path serves VIPs instead.
    assert_eq!(status["vips"][0]["path"], "nftables", "{status}");
    assert_eq!(status["published_paths"], json!([]), "{status}");
    let log = cluster.log_tail(1, 200);
    let says = log.matches("--socket-lb off): VIPs are served by nftables DNAT").count();
    assert_eq!(says, 1, "said once: {log}");
    Ok(())
}

#[test]
fn a_vip_handed_out_again_during_a_partition_is_resolved_after_the_heal() -> Result<()> {
    let mut cluster = Cluster::start(3)?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    cluster.wait_for_service(3, "web")?;
    cluster.partition(&[3])?;
    for (observer, node) in [(1, 3), (3, 1)] {
        poll(&format!("n{observer} declares n{node} dead"), Duration::from_secs(30), || {
            let state = cluster.member_state(observer, node)?;
            ensure!(state == "dead", "{state}");
            Ok(())
        })?;
    }
    // n1's side creates two services: the first takes n1's spare (known to n3), the
    // second a claim made during the partition. n3, which cannot know, gives the
    // second's VIP to a task.
    cluster.meshctl_ok(1, &["service", "create", "first", "--network", "backend"])?;
    cluster.meshctl_ok(1, &["service", "create", "api", "--network", "backend"])?;
    let taken = vip_of(&cluster, 1, "api")?.ok_or_else(|| anyhow!("api has no VIP"))?;
    cluster.add_task_with(3, "web", "web.3", 80, &["--ip", &taken.to_string()])?;
    cluster.heal()?;
    let started = Instant::now();
    // Every node agrees on the VIP, and the task (whose table reaches only n3, the node
    // taking part in the network) ends up on another address.
    let (vip, task) =
        poll("the VIP and the task no longer share an address", Duration::from_secs(40), || {
            let vips: Vec<_> = (1..=3).map(|i| vip_of(&cluster, i, "api")).collect::<Result<_>>()?;
            ensure!(vips.iter().all(|v| *v == vips[0]), "nodes disagree on the VIP: {vips:?}");
            let vip = vips[0].ok_or_else(|| anyhow!("api lost its VIP"))?;
            let ps = cluster.meshctl_json(3, &["service", "ps", "web"])?;
            let task: Ipv4Addr = ps[0]["ip"].as_str().ok_or_else(|| anyhow!("no task: {ps}"))?.parse()?;
            ensure!(vip != task, "still shared: VIP {vip}, task {task}");
            Ok((vip, task))
        })?;
    println!("resolved {:?} after the heal: VIP {vip}, task {task} (both had {taken})", started.elapsed());
    // Exactly one of them moved, and a node reports the move.
    let moved_vip = vip != taken;
    assert!(moved_vip != (task != taken), "exactly one moves: VIP {vip}, task {task}");
    let what = if moved_vip { "the VIP of service api" } else { "web.3" };
    let reports: Vec<String> = (1..=3)
        .map(|i| Ok(cluster.meshctl_json(i, &["status"])?["ipam"]["recent_readdresses"].to_string()))
        .collect::<Result<_>>()?;
    let expected = format!("{what} on network backend moved from {taken}");
    assert!(reports.iter().any(|r| r.contains(&expected)), "{expected}: {reports:?}");
    Ok(())
}

#[test]
fn a_vip_service_stored_without_a_vip_gets_one_after_the_upgrade() -> Result<()> {
    let mut cluster = Cluster::start(1)?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    let vip = vip_of(&cluster, 1, "web")?.ok_or_else(|| anyhow!("web has no VIP"))?;
    cluster.stop_node(1)?;
    // The store as a meshd from before VIPs wrote it: the service without one.
    let path = cluster.nodes[0].state_dir.join("store.json");
    let text = std::fs::read_to_string(&path)?;
    let old = text.replace(&format!("\"vip\":\"{vip}\""), "\"vip\":null");
    ensure!(old != text, "store.json holds no \"vip\":\"{vip}\"");
    std::fs::write(&path, old)?;
    cluster.restart_node(1)?;
    let given = poll("web gets a VIP again", Duration::from_secs(10), || {
        vip_of(&cluster, 1, "web")?.ok_or_else(|| anyhow!("no VIP yet"))
    })?;
    ensure!(given.octets()[..3] == [10, 0, 0], "{given} is outside the network 10.0.0.0/24");
    Ok(())
}

#[test]
fn a_node_address_deleted_from_the_pinned_map_by_hand_comes_back() -> Result<()> {
    let (cluster, _vip, _echoes) = web_cluster()?;
    let map = cluster.nodes[0].pin_dir.join("LB_LOCAL_ADDRS");
    let map = map.to_string_lossy().into_owned();
    let key: Vec<String> = meshd_tests::node_addr(1).octets().iter().map(|b| format!("{b:02x}")).collect();
    let lookup = |what: &str| -> Result<bool> {
        let mut args = vec!["map", what, "pinned", map.as_str(), "key", "hex"];
        args.extend(key.iter().map(String::as_str));
        Ok(Command::new("bpftool").args(&args).output()?.status.success())
    };
    ensure!(lookup("lookup")?, "n1's address is not in {map}");
    ensure!(lookup("delete")?, "bpftool could not delete it");
    ensure!(!lookup("lookup")?, "still there after the delete");
    let started = Instant::now();
    poll("the reconciler writes n1's address back", Duration::from_secs(3), || {
        ensure!(lookup("lookup")?, "not yet");
        Ok(())
    })?;
    println!("n1's address was back in the map {:?} after the delete", started.elapsed());
    Ok(())
}
