//! The eBPF socket load balancer on its own (dataplane library, no meshd): a namespace
//! with backend servers, a cgroup of the test's own, real client processes placed in
//! (or kept out of) that cgroup.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use meshd_dataplane::socklb::{cleanup_pins, Backend, Frontend, Proto, SocketLb, SocketLbConfig};
use serde_json::Value;

static SETUPS: AtomicUsize = AtomicUsize::new(0);

const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const BACKENDS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)];
const ECONNREFUSED: i64 = 111;
const ENETUNREACH: i64 = 101;

/// What one test created; dropping it removes exactly that.
struct Setup {
    netns_name: String,
    netns: PathBuf,
    cgroup: PathBuf,
    pin_dir: PathBuf,
}

impl Setup {
    fn new() -> Result<Setup> {
        let prefix = format!("mt{}lb{}", std::process::id(), SETUPS.fetch_add(1, Ordering::Relaxed));
        let cgroup = meshd_tests::cgroup2_root()?.join(&prefix);
        let setup = Setup {
            netns: PathBuf::from("/run/netns").join(&prefix),
            netns_name: prefix.clone(),
            cgroup,
            pin_dir: PathBuf::from("/sys/fs/bpf/meshd").join(&prefix),
        };
        meshd_tests::sh("ip", &["netns", "add", &setup.netns_name])?;
        let ip = |args: &[&str]| {
            let mut all = vec!["-n", setup.netns_name.as_str()];
            all.extend_from_slice(args);
            meshd_tests::sh("ip", &all)
        };
        ip(&["link", "set", "lo", "up"])?;
        for backend in BACKENDS {
            ip(&["addr", "add", &format!("{backend}/32"), "dev", "lo"])?;
        }
        std::fs::create_dir(&setup.cgroup)
            .with_context(|| format!("creating cgroup {}", setup.cgroup.display()))?;
        Ok(setup)
    }

    fn config(&self) -> SocketLbConfig {
        SocketLbConfig { cgroup: self.cgroup.clone(), pin_dir: Some(self.pin_dir.clone()) }
    }

    /// Opens the load balancer from inside the test's namespace, as meshd does from its
    /// node's: that namespace is the one its "any local address" form serves.
    fn open(&self) -> Result<SocketLb> {
        let config = self.config();
        Ok(meshd_tests::in_netns(&self.netns, move || SocketLb::open(config))??)
    }

    /// TCP servers on BACKENDS:8080 and UDP servers on BACKENDS:5353, each answering
    /// its own index (`b1`..`b3`); they live as long as the test process.
    fn start_backends(&self) -> Result<()> {
        start_servers(&self.netns, &BACKENDS, "b")
    }

    /// Runs the client script in the namespace, inside the test's cgroup when
    /// `in_cgroup`, and returns one result per attempt.
    fn client(&self, in_cgroup: bool, steps: Value) -> Result<Vec<Value>> {
        self.client_in(&self.netns, in_cgroup, steps)
    }

    /// [`Setup::client`] in another namespace `netns` (still this test's cgroup).
    fn client_in(&self, netns: &Path, in_cgroup: bool, steps: Value) -> Result<Vec<Value>> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["--", "python3", "-c", CLIENT, &steps.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nsenter and python3; install util-linux and python3")?;
        if in_cgroup {
            // Placed before it connects: the script waits for a line on stdin.
            std::fs::write(self.cgroup.join("cgroup.procs"), child.id().to_string())?;
        }
        let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        stdin.write_all(b"go\n")?;
        drop(stdin);
        let mut out = String::new();
        child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?.read_to_string(&mut out)?;
        let mut err = String::new();
        child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?.read_to_string(&mut err)?;
        let status = child.wait()?;
        ensure!(status.success(), "client failed: {status}: {err}");
        serde_json::from_str(&out).with_context(|| format!("client output {out:?}"))
    }

    /// The programs bpftool shows on the cgroup: name → how many times.
    fn attached(&self) -> Result<BTreeMap<String, usize>> {
        let out = meshd_tests::sh("bpftool", &["cgroup", "show", &self.cgroup.to_string_lossy()])?;
        let mut names = BTreeMap::new();
        for line in out.lines().skip(1) {
            if let Some(name) = line.split_whitespace().last() {
                *names.entry(name.to_owned()).or_insert(0) += 1;
            }
        }
        Ok(names)
    }
}

/// TCP servers on `addrs`:8080 and UDP servers on `addrs`:5353 inside `netns`, each
/// answering `<tag><index from 1>`; they live as long as the test process.
fn start_servers(netns: &Path, addrs: &[Ipv4Addr], tag: &str) -> Result<()> {
    let addrs = addrs.to_vec();
    let sockets =
        meshd_tests::in_netns(netns, move || -> std::io::Result<Vec<(TcpListener, UdpSocket)>> {
            addrs
                .iter()
                .map(|addr| Ok((TcpListener::bind((*addr, 8080))?, UdpSocket::bind((*addr, 5353))?)))
                .collect()
        })??;
    for (i, (tcp, udp)) in sockets.into_iter().enumerate() {
        let id = format!("{tag}{}", i + 1);
        let tcp_id = id.clone();
        std::thread::spawn(move || {
            for mut stream in tcp.incoming().flatten() {
                let _ = stream.write_all(tcp_id.as_bytes());
            }
        });
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((_, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(id.as_bytes(), from);
            }
        });
    }
    Ok(())
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = cleanup_pins(&self.pin_dir);
        let _ = meshd_tests::sh("ip", &["netns", "del", &self.netns_name]);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// Steps: `["tcp", addr, port, n]` connects n times (reads the backend's id,
/// getpeername); `["udpc", addr, port, n]` the same with connected UDP sockets;
/// `["udp", addr, port, n]` sends n datagrams from one unconnected socket and
/// receives the answers (recvfrom's sender).
const CLIENT: &str = r#"
import json, socket, sys
sys.stdin.readline()
out = []
for kind, addr, port, n in json.loads(sys.argv[1]):
    if kind == "tcp":
        for _ in range(n):
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect((addr, port))
                peer = s.getpeername()
                out.append({"peer": "%s:%d" % peer, "data": s.recv(16).decode()})
            except OSError as e:
                out.append({"err": e.errno})
            s.close()
    elif kind == "udpc":
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(2)
            try:
                s.connect((addr, port))
                peer = s.getpeername()
                s.send(b"x")
                out.append({"peer": "%s:%d" % peer, "data": s.recv(64).decode()})
            except OSError as e:
                out.append({"err": e.errno})
            s.close()
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        for _ in range(n):
            try:
                s.sendto(b"x", (addr, port))
                data, src = s.recvfrom(64)
                out.append({"peer": "%s:%d" % src, "data": data.decode()})
            except OSError as e:
                out.append({"err": e.errno})
        s.close()
print(json.dumps(out))
"#;

fn desired() -> BTreeMap<Frontend, Vec<Backend>> {
    let backends = |port| BACKENDS.iter().map(|addr| Backend { addr: *addr, port }).collect::<Vec<_>>();
    BTreeMap::from([
        (Frontend { addr: VIP, port: 80, proto: Proto::Tcp }, backends(8080)),
        // The empty wildcard: other TCP ports of the VIP are refused.
        (Frontend { addr: VIP, port: 0, proto: Proto::Tcp }, vec![]),
        (Frontend { addr: VIP, port: 53, proto: Proto::Udp }, backends(5353)),
        (Frontend { addr: EMPTY_VIP, port: 80, proto: Proto::Tcp }, vec![]),
        // A published port: any loopback or local address.
        (Frontend { addr: Ipv4Addr::UNSPECIFIED, port: 3000, proto: Proto::Tcp }, backends(8080)),
    ])
}

/// Every attempt succeeded, named the frontend as its peer, and together they
/// reached every backend.
fn check_spread(results: &[Value], frontend: &str) -> Result<()> {
    check_spread_to(results, frontend, "b")
}

/// [`check_spread`] for servers started with `tag`.
fn check_spread_to(results: &[Value], frontend: &str, tag: &str) -> Result<()> {
    let mut seen = BTreeSet::new();
    for r in results {
        ensure!(r["peer"] == frontend, "peer should be the frontend {frontend}: {r}");
        seen.insert(r["data"].as_str().unwrap_or_default().to_owned());
    }
    let want: BTreeSet<String> = (1..=3).map(|i| format!("{tag}{i}")).collect();
    ensure!(seen == want, "backends reached: {seen:?}, want {want:?}");
    Ok(())
}

fn errnos(results: &[Value]) -> Vec<i64> {
    results.iter().map(|r| r["err"].as_i64().unwrap_or(0)).collect()
}

fn all_four(names: &BTreeMap<String, usize>) -> bool {
    ["connect4", "sendmsg4", "recvmsg4", "getpeername4"].iter().all(|n| names.get(*n) == Some(&1))
}

#[test]
fn frontends_balance_restore_the_peer_survive_the_loader_and_clean_up() -> Result<()> {
    let setup = Setup::new()?;
    setup.start_backends()?;
    let mut lb = setup.open()?;
    assert!(!lb.adopted(), "nothing to adopt on a fresh pin directory");
    let writes = lb.apply(&desired())?;
    lb.set_local_addrs(&[BACKENDS[0]])?;
    assert!(writes > 0);
    assert_eq!(lb.observe()?, desired(), "observe reads back what apply wrote");
    assert_eq!(lb.apply(&desired())?, 0, "a second apply writes nothing");

    // Programs seen attached by the kernel's own tool, once each.
    let attached = setup.attached()?;
    assert!(all_four(&attached), "bpftool cgroup show: {attached:?}");
    for pin in [
        "link_connect4",
        "link_sendmsg4",
        "link_recvmsg4",
        "link_getpeername4",
        "LB_SERVICES",
        "LB_BACKENDS",
        "LB_REVERSE",
        "SOCK_STATS",
    ] {
        assert!(setup.pin_dir.join(pin).exists(), "{pin} pinned under {}", setup.pin_dir.display());
    }

    // In the cgroup: TCP spreads over every backend and getpeername names the VIP;
    // UDP answers come from the VIP; an empty frontend and an unserved VIP port refuse.
    let results = setup.client(
        true,
        serde_json::json!([
            ["tcp", "10.99.0.1", 80, 60],
            ["udp", "10.99.0.1", 53, 60],
            ["tcp", "10.99.0.2", 80, 1],
            ["tcp", "10.99.0.1", 81, 1],
            ["tcp", "127.0.0.1", 3000, 60],
            ["tcp", "10.0.0.1", 3000, 60],
            ["tcp", "10.0.0.2", 3000, 1],
            ["udpc", "10.99.0.1", 53, 60]
        ]),
    )?;
    check_spread(&results[0..60], "10.99.0.1:80")?;
    check_spread(&results[60..120], "10.99.0.1:53")?;
    assert_eq!(
        errnos(&results[120..122]),
        vec![ECONNREFUSED, ECONNREFUSED],
        "refused: {:?}",
        &results[120..122]
    );
    // The published port answers at loopback and at the listed local address only.
    check_spread(&results[122..182], "127.0.0.1:3000")?;
    check_spread(&results[182..242], "10.0.0.1:3000")?;
    assert_eq!(
        errnos(&results[242..243]),
        vec![ECONNREFUSED],
        "10.0.0.2 is not listed: {:?}",
        &results[242..243]
    );
    check_spread(&results[243..], "10.99.0.1:53")?;
    let status = lb.status()?;
    assert_eq!(
        status.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["connect4", "sendmsg4", "recvmsg4", "getpeername4"]
    );
    assert!(status[0].rewritten >= 60 && status[3].rewritten >= 60, "{status:?}");

    // Outside the cgroup nothing is rewritten: the VIP has no route here.
    let outside = setup.client(false, serde_json::json!([["tcp", "10.99.0.1", 80, 1]]))?;
    assert_eq!(errnos(&outside), vec![ENETUNREACH], "untouched outside the cgroup: {outside:?}");

    // Dropping the loader without cleanup (as kill -9 would) keeps the data path.
    let ids: Vec<u32> = status.iter().map(|s| s.id).collect();
    drop(lb);
    let after_drop = setup.client(true, serde_json::json!([["tcp", "10.99.0.1", 80, 30]]))?;
    check_spread(&after_drop, "10.99.0.1:80")?;

    // A new loader adopts the pinned links (same programs, no second attachment) and
    // reads back the same frontends.
    let mut lb = setup.open()?;
    assert!(lb.adopted(), "the pins were adopted");
    assert_eq!(lb.status()?.iter().map(|s| s.id).collect::<Vec<_>>(), ids, "the same programs stay attached");
    let attached = setup.attached()?;
    assert!(all_four(&attached), "no duplicate attachments after adoption: {attached:?}");
    assert_eq!(lb.observe()?, desired());
    assert_eq!(lb.apply(&desired())?, 0);

    // Shrinking to one backend: every connect goes there.
    let mut one = desired();
    one.insert(
        Frontend { addr: VIP, port: 80, proto: Proto::Tcp },
        vec![Backend { addr: BACKENDS[1], port: 8080 }],
    );
    lb.apply(&one)?;
    let results = setup.client(true, serde_json::json!([["tcp", "10.99.0.1", 80, 10]]))?;
    assert!(results.iter().all(|r| r["data"] == "b2" && r["peer"] == "10.99.0.1:80"), "{results:?}");

    // Cleanup detaches and unpins.
    lb.cleanup()?;
    let attached = setup.attached()?;
    assert!(attached.is_empty(), "nothing attached after cleanup: {attached:?}");
    assert!(!setup.pin_dir.exists(), "pin directory removed");
    let results = setup.client(true, serde_json::json!([["tcp", "10.99.0.1", 80, 1]]))?;
    assert_eq!(errnos(&results), vec![ENETUNREACH], "no rewrite after cleanup: {results:?}");
    Ok(())
}

#[test]
fn a_wildcard_vip_forwards_every_port_and_keeps_it() -> Result<()> {
    const WILD: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);
    const FIXED: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 4);
    let setup = Setup::new()?;
    setup.start_backends()?;
    let mut lb = setup.open()?;
    let backends = |port| BACKENDS.iter().map(|addr| Backend { addr: *addr, port }).collect::<Vec<_>>();
    let want = BTreeMap::from([
        // Docker's VIP: every port, kept (backends with port 0), TCP and UDP.
        (Frontend { addr: WILD, port: 0, proto: Proto::Tcp }, backends(0)),
        (Frontend { addr: WILD, port: 0, proto: Proto::Udp }, backends(0)),
        // An exact port of the same VIP wins over its wildcard.
        (Frontend { addr: WILD, port: 80, proto: Proto::Tcp }, backends(8080)),
        // A wildcard whose backends name a port: every port goes there.
        (Frontend { addr: FIXED, port: 0, proto: Proto::Tcp }, backends(8080)),
    ]);
    lb.apply(&want)?;
    assert_eq!(lb.observe()?, want, "port-0 backends read back as written");
    let results = setup.client(
        true,
        serde_json::json!([
            ["tcp", "10.99.0.3", 8080, 60],
            ["tcp", "10.99.0.3", 80, 60],
            ["udp", "10.99.0.3", 5353, 60],
            ["udpc", "10.99.0.3", 5353, 60],
            ["tcp", "10.99.0.4", 4444, 60],
            ["tcp", "10.99.0.3", 8081, 1]
        ]),
    )?;
    // The backend saw the port the application used; getpeername/recvfrom name the VIP
    // with that port.
    check_spread(&results[0..60], "10.99.0.3:8080")?;
    // Without the exact frontend port 80 would have gone to the backends' port 80.
    check_spread(&results[60..120], "10.99.0.3:80")?;
    check_spread(&results[120..180], "10.99.0.3:5353")?;
    check_spread(&results[180..240], "10.99.0.3:5353")?;
    check_spread(&results[240..300], "10.99.0.4:4444")?;
    // Port kept: nobody listens on the backends' 8081, the backend's kernel refuses.
    assert_eq!(errnos(&results[300..]), vec![ECONNREFUSED], "{:?}", &results[300..]);

    // Without backends the wildcard refuses every port without an exact frontend.
    let mut empty = want.clone();
    empty.insert(Frontend { addr: WILD, port: 0, proto: Proto::Tcp }, vec![]);
    lb.apply(&empty)?;
    let results = setup
        .client(true, serde_json::json!([["tcp", "10.99.0.3", 8080, 1], ["tcp", "10.99.0.3", 80, 30]]))?;
    assert_eq!(errnos(&results[..1]), vec![ECONNREFUSED], "{:?}", &results[..1]);
    check_spread(&results[1..], "10.99.0.3:80")?;

    // A port-0 backend under an exact port cannot be expressed: refused, maps unchanged.
    let mut bad = empty.clone();
    bad.insert(Frontend { addr: WILD, port: 80, proto: Proto::Tcp }, backends(0));
    let message = lb.apply(&bad).expect_err("a port-0 backend on an exact port").to_string();
    assert!(message.contains("port 0") && message.contains("10.99.0.3:0"), "{message}");
    assert_eq!(lb.observe()?, empty, "nothing written on a refused state");
    lb.cleanup()?;
    Ok(())
}

#[test]
fn the_any_local_form_serves_only_the_loaders_namespace() -> Result<()> {
    let setup = Setup::new()?;
    setup.start_backends()?;
    // A container: its own namespace, in the same cgroup, with its own service on
    // 127.0.0.1:3000 (answering c1) and its own servers at the backend addresses.
    let container = format!("{}c", setup.netns_name);
    meshd_tests::sh("ip", &["netns", "add", &container])?;
    let result = (|| -> Result<()> {
        let netns = PathBuf::from("/run/netns").join(&container);
        meshd_tests::sh("ip", &["-n", &container, "link", "set", "lo", "up"])?;
        for backend in BACKENDS {
            meshd_tests::sh("ip", &["-n", &container, "addr", "add", &format!("{backend}/32"), "dev", "lo"])?;
        }
        start_servers(&netns, &BACKENDS, "o")?;
        let own = meshd_tests::in_netns(&netns, || TcpListener::bind((Ipv4Addr::LOCALHOST, 3000)))??;
        std::thread::spawn(move || {
            for mut stream in own.incoming().flatten() {
                let _ = stream.write_all(b"c1");
            }
        });
        let mut lb = setup.open()?;
        lb.apply(&desired())?;
        lb.set_local_addrs(&[BACKENDS[0]])?;

        let steps = serde_json::json!([
            ["tcp", "127.0.0.1", 3000, 30],
            ["tcp", "10.0.0.1", 3000, 1],
            ["tcp", "10.99.0.1", 80, 30],
            ["tcp", "10.99.0.1", 81, 1]
        ]);
        // In the container: its own loopback port and its own address are untouched...
        let results = setup.client_in(&netns, true, steps.clone())?;
        let hijacked: Vec<&Value> =
            results[..30].iter().filter(|r| r["data"] != "c1" || r["peer"] != "127.0.0.1:3000").collect();
        ensure!(hijacked.is_empty(), "the container's own 127.0.0.1:3000 was not its own: {hijacked:?}");
        ensure!(errnos(&results[30..31]) == [ECONNREFUSED], "nobody listens there: {:?}", &results[30..31]);
        // ...while the VIP forms apply there too (its own servers at the backend addresses).
        check_spread_to(&results[31..61], "10.99.0.1:80", "o")?;
        ensure!(errnos(&results[61..]) == [ECONNREFUSED], "VIP wildcard refuses: {:?}", &results[61..]);
        // In the loader's namespace the published port is balanced.
        let results = setup.client(true, steps)?;
        check_spread(&results[..30], "127.0.0.1:3000")?;
        let local = &results[30];
        ensure!(
            local["peer"] == "10.0.0.1:3000" && local["data"].as_str().is_some_and(|d| d.starts_with('b')),
            "the node's listed address is balanced too: {local}"
        );
        check_spread(&results[31..61], "10.99.0.1:80")?;
        lb.cleanup()?;
        Ok(())
    })();
    // The closure reports failures as errors (no panics), so this always runs.
    let _ = meshd_tests::sh("ip", &["netns", "del", &container]);
    result
}

#[test]
fn a_missing_cgroup_is_a_clear_error() -> Result<()> {
    let missing = Path::new("/sys/fs/cgroup/unified/mt-no-such-cgroup");
    match SocketLb::open(SocketLbConfig { cgroup: missing.into(), pin_dir: None }) {
        Ok(_) => bail!("opened a missing cgroup"),
        Err(e) => {
            let message = e.to_string();
            ensure!(message.contains("mt-no-such-cgroup") && message.contains("--cgroup"), "{message}");
        }
    }
    Ok(())
}

#[test]
fn a_pinned_map_of_another_layout_is_replaced_and_the_links_swapped_without_duplicates() -> Result<()> {
    let setup = Setup::new()?;
    setup.start_backends()?;
    let mut lb = setup.open()?;
    lb.apply(&desired())?;
    let old_ids: Vec<u32> = lb.status()?.iter().map(|s| s.id).collect();
    drop(lb);

    // An older meshd's services map with another layout sits at the pin path.
    let services_pin = setup.pin_dir.join("LB_SERVICES");
    std::fs::remove_file(&services_pin)?;
    let pin = services_pin.to_string_lossy().into_owned();
    meshd_tests::sh(
        "bpftool",
        &[
            "map",
            "create",
            &pin,
            "type",
            "hash",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "16",
            "name",
            "LB_SERVICES",
        ],
    )?;
    // The old programs still serve from the map they hold.
    check_spread(&setup.client(true, serde_json::json!([["tcp", "10.99.0.1", 80, 30]]))?, "10.99.0.1:80")?;

    let mut lb = setup.open()?;
    // connect4/sendmsg4 read the services map: replaced by new programs on the new
    // map. recvmsg4/getpeername4 use only maps that were kept: adopted as they run.
    let new_ids: Vec<u32> = lb.status()?.iter().map(|s| s.id).collect();
    assert!(new_ids[0] != old_ids[0] && new_ids[1] != old_ids[1], "replaced: {old_ids:?} -> {new_ids:?}");
    assert_eq!(new_ids[2..], old_ids[2..], "adopted: {old_ids:?} -> {new_ids:?}");
    assert!(lb.adopted());
    let attached = setup.attached()?;
    assert!(all_four(&attached), "old links detached, new ones attached once: {attached:?}");
    // The fresh services map is empty; the old backend slots are strays until apply.
    assert_eq!(lb.observe()?, BTreeMap::new());
    lb.apply(&desired())?;
    assert_eq!(lb.observe()?, desired());
    check_spread(&setup.client(true, serde_json::json!([["tcp", "10.99.0.1", 80, 30]]))?, "10.99.0.1:80")?;
    lb.cleanup()?;
    assert!(setup.attached()?.is_empty());
    Ok(())
}

/// Connects to the frontend in a loop until a second line arrives on stdin (or 20 s,
/// or 100 000 connects pass), then prints the counts.
const LOOP_CLIENT: &str = r#"
import json, select, socket, sys, time
sys.stdin.readline()
ok = failed = 0
errors = {}
deadline = time.monotonic() + 20
while ok + failed < 100000 and time.monotonic() < deadline:
    if select.select([sys.stdin], [], [], 0)[0]:
        break
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("10.99.0.1", 80))
        if s.recv(16):
            ok += 1
        else:
            failed += 1
    except OSError as e:
        failed += 1
        errors[str(e.errno)] = errors.get(str(e.errno), 0) + 1
    s.close()
print(json.dumps({"ok": ok, "failed": failed, "errors": errors}))
"#;

#[test]
fn connects_never_fail_while_the_loader_is_dropped_and_a_new_one_adopts() -> Result<()> {
    let setup = Setup::new()?;
    setup.start_backends()?;
    let mut lb = setup.open()?;
    lb.apply(&desired())?;
    let rewritten = |lb: &SocketLb| -> Result<u64> { Ok(lb.status()?[0].rewritten) };
    let start = rewritten(&lb)?;

    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", setup.netns.display()))
        .args(["--", "python3", "-c", LOOP_CLIENT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running nsenter and python3; install util-linux and python3")?;
    std::fs::write(setup.cgroup.join("cgroup.procs"), child.id().to_string())?;
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    stdin.write_all(b"go\n")?;
    stdin.flush()?;
    meshd_tests::poll("the client connects through the VIP", Duration::from_secs(10), || {
        let n = rewritten(&lb)? - start;
        ensure!(n >= 300, "{n} rewritten connects");
        Ok(())
    })?;

    // As after kill -9: the loader goes away without cleanup; a new one adopts.
    drop(lb);
    let mut lb = setup.open()?;
    assert!(lb.adopted());
    assert_eq!(lb.apply(&desired())?, 0, "the maps kept every entry");
    let mid = rewritten(&lb)?;
    meshd_tests::poll("connects continue after the new loader adopted", Duration::from_secs(10), || {
        let n = rewritten(&lb)? - mid;
        ensure!(n >= 300, "{n} rewritten connects");
        Ok(())
    })?;
    stdin.write_all(b"stop\n")?;
    drop(stdin);
    let out = child.wait_with_output()?;
    let counts: Value = serde_json::from_slice(&out.stdout).with_context(|| format!("{out:?}"))?;
    assert_eq!(counts["failed"], 0, "no connect failed across the reload: {counts}");
    assert!(counts["ok"].as_u64().unwrap_or(0) >= 600, "{counts}");
    println!("connects across the reload: {counts}");
    lb.cleanup()?;
    Ok(())
}

#[test]
fn a_loader_on_another_cgroup_moves_the_links_there() -> Result<()> {
    let setup = Setup::new()?;
    setup.start_backends()?;
    let mut lb = setup.open()?;
    lb.apply(&desired())?;
    drop(lb);

    // Same pins, another --cgroup: the links move, nothing stays on the old cgroup.
    let other = setup.cgroup.with_extension("b");
    std::fs::create_dir(&other)?;
    let result = (|| -> Result<()> {
        let lb =
            SocketLb::open(SocketLbConfig { cgroup: other.clone(), pin_dir: Some(setup.pin_dir.clone()) })?;
        ensure!(!lb.adopted(), "links on another cgroup are not adopted");
        let attached = setup.attached()?;
        ensure!(attached.is_empty(), "old cgroup left bare: {attached:?}");
        let out = meshd_tests::sh("bpftool", &["cgroup", "show", &other.to_string_lossy()])?;
        for name in ["connect4", "sendmsg4", "recvmsg4", "getpeername4"] {
            ensure!(out.lines().filter(|l| l.split_whitespace().last() == Some(name)).count() == 1, "{out}");
        }
        ensure!(lb.observe()? == desired(), "the maps were kept");
        lb.cleanup().map_err(Into::into)
    })();
    // The closure reports failures as errors (no panics), so this always runs.
    let _ = std::fs::remove_dir(&other);
    result
}
