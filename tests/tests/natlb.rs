//! VIPs without BPF (dataplane `natlb`, no meshd): a "container" namespace and three
//! backend namespaces on a bridge, real servers in the backends, real connects from
//! the container through meshd's nftables table.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Context as _, Result};
use meshd_dataplane::{
    natlb,
    socklb::{Backend, Frontend, Proto},
};

static SETUPS: AtomicUsize = AtomicUsize::new(0);

const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const BACKENDS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)];
/// Every backend serves TCP on both and UDP echo on the first.
const PORTS: [u16; 2] = [7000, 7001];

/// What one test created; dropping it stops the servers and deletes the namespaces.
struct Setup {
    names: Vec<String>,
    container: PathBuf,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
}

impl Setup {
    fn new() -> Result<Setup> {
        natlb::probe().context("nftables VIPs need nft and nf_tables; run `make bootstrap`")?;
        let prefix = format!("mt{}nat{}", std::process::id(), SETUPS.fetch_add(1, Ordering::Relaxed));
        let hub = format!("{prefix}h");
        let client = format!("{prefix}c");
        let mut setup = Setup {
            names: vec![hub.clone()],
            container: PathBuf::from("/run/netns").join(&client),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
        };
        let ip = |ns: &str, args: &[&str]| {
            let mut all = vec!["-n", ns];
            all.extend_from_slice(args);
            meshd_tests::sh("ip", &all)
        };
        meshd_tests::sh("ip", &["netns", "add", &hub])?;
        ip(&hub, &["link", "add", "br0", "type", "bridge"])?;
        ip(&hub, &["link", "set", "br0", "up"])?;
        let mut members: Vec<(String, Ipv4Addr)> = vec![(client.clone(), CLIENT)];
        members.extend(BACKENDS.iter().enumerate().map(|(i, a)| (format!("{prefix}b{i}"), *a)));
        for (n, (ns, addr)) in members.iter().enumerate() {
            meshd_tests::sh("ip", &["netns", "add", ns])?;
            setup.names.push(ns.clone());
            let port = format!("p{n}");
            ip(&hub, &["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
            ip(&hub, &["link", "set", &port, "master", "br0", "up"])?;
            ip(ns, &["link", "set", "lo", "up"])?;
            ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ip(ns, &["link", "set", "eth0", "up"])?;
        }
        // VIPs are routed out of the container like any off-link address; DNAT in the
        // output hook then re-routes the packet to the chosen backend.
        ip(&client, &["route", "add", "10.99.0.0/16", "dev", "eth0"])?;
        for (i, addr) in BACKENDS.iter().enumerate() {
            let ns = PathBuf::from("/run/netns").join(format!("{prefix}b{i}"));
            for port in PORTS {
                setup.servers.push(tcp_server(&ns, *addr, port, setup.stop.clone())?);
            }
            setup.servers.push(udp_server(&ns, *addr, PORTS[0], setup.stop.clone())?);
        }
        Ok(setup)
    }

    fn container(&self) -> &Path {
        &self.container
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for server in self.servers.drain(..) {
            let _ = server.join();
        }
        for ns in self.names.iter().rev() {
            let _ = meshd_tests::sh("ip", &["netns", "del", ns]);
        }
    }
}

/// Runs `f` on a new thread inside `netns` (for servers that outlive the call).
fn spawn_in(netns: &Path, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    let file = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let entered = nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET);
        let ok = entered.is_ok();
        let _ = tx.send(entered);
        if ok {
            f();
        }
    });
    rx.recv()?.with_context(|| format!("entering {}", netns.display()))?;
    Ok(handle)
}

/// A TCP server answering every connection with `addr:port` and closing it.
fn tcp_server(netns: &Path, addr: Ipv4Addr, port: u16, stop: Arc<AtomicBool>) -> Result<JoinHandle<()>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = spawn_in(netns, move || {
        let listener = match TcpListener::bind((addr, port)).and_then(|l| l.set_nonblocking(true).map(|()| l))
        {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let tag = format!("{addr}:{port}");
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    let _ = conn.write_all(tag.as_bytes());
                }
                // Nonblocking so the stop flag is seen; 1 ms keeps accept latency low.
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    })?;
    rx.recv()?.with_context(|| format!("tcp server on {addr}:{port}"))?;
    Ok(handle)
}

/// A UDP server answering every datagram with `addr:port`.
fn udp_server(netns: &Path, addr: Ipv4Addr, port: u16, stop: Arc<AtomicBool>) -> Result<JoinHandle<()>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = spawn_in(netns, move || {
        let socket = match UdpSocket::bind((addr, port))
            .and_then(|s| s.set_read_timeout(Some(Duration::from_millis(50))).map(|()| s))
        {
            Ok(s) => {
                let _ = tx.send(Ok(()));
                s
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let tag = format!("{addr}:{port}");
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(tag.as_bytes(), peer);
            }
        }
    })?;
    rx.recv()?.with_context(|| format!("udp server on {addr}:{port}"))?;
    Ok(handle)
}

/// EPERM, what a send the output hook rejected returns.
fn libc_eperm() -> i32 {
    nix::errno::Errno::EPERM as i32
}

fn fe(addr: Ipv4Addr, port: u16, proto: Proto) -> Frontend {
    Frontend { addr, port, proto }
}

fn be(addr: Ipv4Addr, port: u16) -> Backend {
    Backend { addr, port }
}

/// Connects to `addr` (from the current thread's namespace) and returns what the
/// server said.
fn fetch(addr: SocketAddr) -> std::io::Result<String> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut tag = String::new();
    conn.read_to_string(&mut tag)?;
    Ok(tag)
}

/// `count` connects to `addr` from the container; the set of servers that answered.
fn spread(setup: &Setup, addr: SocketAddr, count: usize) -> Result<BTreeSet<String>> {
    meshd_tests::in_netns(setup.container(), move || -> Result<BTreeSet<String>> {
        let mut seen = BTreeSet::new();
        for _ in 0..count {
            seen.insert(fetch(addr).with_context(|| format!("connect to {addr}"))?);
        }
        Ok(seen)
    })?
}

fn tags(addrs: &[Ipv4Addr], port: u16) -> BTreeSet<String> {
    addrs.iter().map(|a| format!("{a}:{port}")).collect()
}

fn sa(addr: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(addr, port))
}

#[test]
fn vip_ports_spread_over_backends_and_rewrite_ports() -> Result<()> {
    let setup = Setup::new()?;
    let mut frontends = BTreeMap::new();
    // Any port of VIP, same port on the backend.
    frontends.insert(fe(VIP, 0, Proto::Tcp), BACKENDS.iter().map(|a| be(*a, 0)).collect());
    // VIP2:80 rewritten to port 7001 on two of them.
    frontends.insert(fe(VIP2, 80, Proto::Tcp), vec![be(BACKENDS[0], 7001), be(BACKENDS[2], 7001)]);
    natlb::apply(setup.container(), &frontends)?;

    for port in PORTS {
        let seen = spread(&setup, sa(VIP, port), 60)?;
        ensure!(seen == tags(&BACKENDS, port), "VIP:{port} reached {seen:?}, want all three backends");
    }
    let seen = spread(&setup, sa(VIP2, 80), 60)?;
    ensure!(seen == tags(&[BACKENDS[0], BACKENDS[2]], 7001), "VIP2:80 reached {seen:?}");

    // The connected socket sees the VIP as its peer (conntrack translates replies).
    let peer = meshd_tests::in_netns(setup.container(), || -> std::io::Result<SocketAddr> {
        TcpStream::connect_timeout(&sa(VIP2, 80), Duration::from_secs(1))?.peer_addr()
    })??;
    ensure!(peer == sa(VIP2, 80), "getpeername showed {peer}, want the VIP");
    Ok(())
}

#[test]
fn udp_echo_through_a_vip_sees_the_vip_as_peer() -> Result<()> {
    let setup = Setup::new()?;
    let mut frontends = BTreeMap::new();
    frontends.insert(fe(VIP, 5353, Proto::Udp), vec![be(BACKENDS[1], PORTS[0])]);
    frontends.insert(fe(VIP2, 0, Proto::Udp), vec![be(BACKENDS[2], 0)]);
    natlb::apply(setup.container(), &frontends)?;
    let replies =
        meshd_tests::in_netns(setup.container(), || -> std::io::Result<Vec<(String, SocketAddr)>> {
            let socket = UdpSocket::bind((CLIENT, 0))?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut out = Vec::new();
            for target in [sa(VIP, 5353), sa(VIP2, PORTS[0])] {
                socket.send_to(b"ping", target)?;
                let mut buf = [0u8; 512];
                let (n, from) = socket.recv_from(&mut buf)?;
                out.push((String::from_utf8_lossy(&buf[..n]).into_owned(), from));
            }
            Ok(out)
        })??;
    ensure!(
        replies
            == vec![
                (format!("{}:{}", BACKENDS[1], PORTS[0]), sa(VIP, 5353)),
                (format!("{}:{}", BACKENDS[2], PORTS[0]), sa(VIP2, PORTS[0])),
            ],
        "replies (server, recvfrom peer): {replies:?}; want each from its VIP"
    );
    Ok(())
}

#[test]
fn no_backends_means_connection_refused() -> Result<()> {
    let setup = Setup::new()?;
    let mut frontends = BTreeMap::new();
    // VIP: port 7000 served, every other port refused.
    frontends.insert(fe(VIP, 0, Proto::Tcp), Vec::new());
    frontends.insert(fe(VIP, 0, Proto::Udp), Vec::new());
    frontends.insert(fe(VIP, 7000, Proto::Tcp), vec![be(BACKENDS[0], 0)]);
    // An exact frontend with no backends.
    frontends.insert(fe(VIP2, 80, Proto::Tcp), Vec::new());
    natlb::apply(setup.container(), &frontends)?;

    let results = meshd_tests::in_netns(setup.container(), || {
        let tcp = |addr: SocketAddr| {
            let started = Instant::now();
            let result =
                TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(|_| ()).map_err(|e| e.kind());
            (addr, result, started.elapsed())
        };
        // The rejected datagram fails its send (EPERM: the output hook dropped it) and
        // the ICMP port-unreachable makes the next recv ECONNREFUSED.
        let udp = || -> std::io::Result<(Option<i32>, std::io::Result<usize>)> {
            let socket = UdpSocket::bind((CLIENT, 0))?;
            socket.connect(sa(VIP, 9999))?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            let sent = socket.send(b"ping").err().and_then(|e| e.raw_os_error());
            Ok((sent, socket.recv(&mut [0u8; 64])))
        };
        (vec![tcp(sa(VIP, 7001)), tcp(sa(VIP2, 80)), tcp(sa(VIP, 7000))], udp())
    })?;
    let (tcp, udp) = results;
    for (addr, result, took) in &tcp[..2] {
        ensure!(
            *result == Err(ErrorKind::ConnectionRefused) && *took < Duration::from_secs(1),
            "connect to {addr}: {result:?} after {took:?}; want ECONNREFUSED at once"
        );
    }
    ensure!(tcp[2].1.is_ok(), "served port {} failed: {:?}", tcp[2].0, tcp[2].1);
    let (sent, received) = udp?;
    ensure!(
        sent == Some(libc_eperm()) && matches!(&received, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
        "connected UDP to an unserved VIP port: send {sent:?}, recv {received:?}; want EPERM then ECONNREFUSED"
    );
    Ok(())
}

#[test]
fn backend_updates_under_load_fail_no_connect() -> Result<()> {
    let setup = Setup::new()?;
    // Rotating pairs: every update removes one backend and adds another.
    let table = |i: usize| {
        let pair = [BACKENDS[i % 3], BACKENDS[(i + 1) % 3]];
        let mut f = BTreeMap::new();
        f.insert(fe(VIP, 80, Proto::Tcp), pair.iter().map(|a| be(*a, PORTS[0])).collect::<Vec<_>>());
        f
    };
    natlb::apply(setup.container(), &table(0))?;
    let done = Arc::new(AtomicBool::new(false));
    let done_flag = done.clone();
    let container = setup.container().to_path_buf();
    // Swaps the backend set every 20 ms (plus the apply itself) while the loop connects.
    let updater = std::thread::spawn(move || -> Result<usize> {
        let mut applies = 0;
        while !done_flag.load(Ordering::Relaxed) && applies < 200 {
            applies += 1;
            natlb::apply(&container, &table(applies))?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(applies)
    });
    let outcome = meshd_tests::in_netns(setup.container(), || {
        let mut ok = 0usize;
        let mut failures = Vec::new();
        let started = Instant::now();
        // Bounded in time (2 s) and count (20 000).
        while started.elapsed() < Duration::from_secs(2) && ok + failures.len() < 20_000 {
            match fetch(sa(VIP, 80)) {
                Ok(tag) if tag.ends_with(":7000") => ok += 1,
                other => failures.push(format!("{other:?}")),
            }
        }
        (ok, failures, started.elapsed())
    });
    done.store(true, Ordering::Relaxed);
    let applies = updater.join().map_err(|_| anyhow!("updater panicked"))??;
    let (ok, failures, took) = outcome?;
    let rate = ok as f64 / took.as_secs_f64();
    eprintln!("natlb under updates: {ok} connects in {took:?} ({rate:.0}/s), {applies} applies");
    ensure!(failures.is_empty(), "{} connects failed during updates, first: {}", failures.len(), failures[0]);
    ensure!(applies >= 5, "only {applies} backend updates happened during the loop");
    ensure!(rate >= 200.0, "only {rate:.0} connects/s; the test needs at least 200/s to mean anything");
    Ok(())
}

#[test]
fn observe_reads_back_apply_and_remove_touches_only_meshd() -> Result<()> {
    let setup = Setup::new()?;
    let ns = setup.container();
    let nft = |args: &[&str]| {
        let mut all =
            vec!["netns", "exec", ns.file_name().and_then(|n| n.to_str()).unwrap_or_default(), "nft"];
        all.extend_from_slice(args);
        meshd_tests::sh("ip", &all)
    };
    // A foreign table, one named like ours in another family, and one with our prefix.
    let foreign =
        std::env::temp_dir().join(format!("{}-foreign.nft", ns.file_name().unwrap().to_string_lossy()));
    std::fs::write(
        &foreign,
        "table inet foreign {\n  set blocked {\n    type ipv4_addr\n    elements = { 192.0.2.7 }\n  }\n  \
         chain out {\n    type filter hook output priority 0; policy accept;\n    ip daddr @blocked drop\n  }\n}\n\
         table inet meshd {\n  chain c {\n  }\n}\ntable ip meshdx {\n  chain c {\n  }\n}\n",
    )?;
    nft(&["-f", foreign.to_str().unwrap_or_default()])?;
    let _ = std::fs::remove_file(&foreign);
    let before = nft(&["list", "ruleset"])?;

    ensure!(natlb::observe(ns)?.is_empty(), "observe on a namespace without meshd's table");
    let mut frontends = BTreeMap::new();
    frontends.insert(fe(VIP, 0, Proto::Tcp), vec![be(BACKENDS[2], 0), be(BACKENDS[0], 0)]);
    frontends.insert(fe(VIP, 0, Proto::Udp), Vec::new());
    frontends.insert(fe(VIP, 53, Proto::Udp), vec![be(BACKENDS[1], 5353)]);
    frontends.insert(fe(VIP2, 80, Proto::Tcp), vec![be(BACKENDS[0], 8080), be(BACKENDS[1], 0)]);
    frontends.insert(fe(VIP2, 81, Proto::Tcp), Vec::new());
    natlb::apply(ns, &frontends)?;
    let observed = natlb::observe(ns)?;
    ensure!(observed == frontends, "observe returned {observed:?}\nafter apply of {frontends:?}");

    // A second apply replaces, never merges.
    frontends.remove(&fe(VIP2, 80, Proto::Tcp));
    natlb::apply(ns, &frontends)?;
    ensure!(natlb::observe(ns)? == frontends, "observe after a smaller apply");

    natlb::remove(ns)?;
    let after = nft(&["list", "ruleset"])?;
    ensure!(after == before, "ruleset changed outside meshd's table:\nbefore:\n{before}\nafter:\n{after}");
    ensure!(!nft(&["list", "tables"])?.contains("table ip meshd\n"), "meshd's table is still there");
    ensure!(natlb::observe(ns)?.is_empty(), "observe after remove");
    natlb::remove(ns).context("remove on a namespace without the table")?;

    // Bad input: a published-port frontend is refused and changes nothing.
    let mut bad = BTreeMap::new();
    bad.insert(fe(Ipv4Addr::UNSPECIFIED, 8080, Proto::Tcp), vec![be(BACKENDS[0], 80)]);
    let err = natlb::apply(ns, &bad).expect_err("0.0.0.0 frontend accepted");
    ensure!(err.to_string().contains("published port"), "unclear error: {err}");
    ensure!(nft(&["list", "ruleset"])? == before, "a refused apply changed the ruleset");
    Ok(())
}

#[test]
fn a_thousand_frontends_apply_in_one_transaction_and_read_back() -> Result<()> {
    let setup = Setup::new()?;
    let ns = setup.container();
    // 1000 VIP ports with 3 backends each: one `nft -f` within its 5 s bound.
    let frontends: BTreeMap<Frontend, Vec<Backend>> = (0..1000u16)
        .map(|i| {
            let vip = Ipv4Addr::new(10, 99, (i / 200) as u8, (i % 200) as u8 + 1);
            (fe(vip, 80, Proto::Tcp), BACKENDS.iter().map(|a| be(*a, 7000 + i % 2)).collect())
        })
        .collect();
    let started = Instant::now();
    natlb::apply(ns, &frontends)?;
    let applied = started.elapsed();
    let started = Instant::now();
    let observed = natlb::observe(ns)?;
    let read = started.elapsed();
    eprintln!("natlb: 1000 frontends x 3 backends: apply {applied:?}, observe {read:?}");
    ensure!(observed == frontends, "observe differs after a 1000-frontend apply");
    // And it serves: one of them, end to end.
    let seen = spread(&setup, sa(Ipv4Addr::new(10, 99, 4, 200), 80), 30)?;
    ensure!(seen == tags(&BACKENDS, 7001), "10.99.4.200:80 reached {seen:?}");
    Ok(())
}
