//! Bounded inputs against the real binaries: meshd started under systemd's default
//! open-files soft limit still serves thousands of concurrent clients through a
//! published port; a too-low hard limit is reported; the API socket cuts clients that
//! send nothing, and a pile of them does not lock meshctl out; meshctl gives up on a
//! daemon that does not answer and says which one.

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    os::unix::net::{UnixListener, UnixStream},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use meshd_tests::{bin_path, in_netns, node_addr, poll, Cluster, NofileLimit, StartOptions};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
};

/// Concurrent clients driven through the published port.
const CLIENTS: usize = 3000;

/// Raises this test process's open-files soft limit to its hard limit: it holds every
/// client socket, and the task's server it starts inherits the limit.
fn raise_own_nofile(needed: u64) -> Result<()> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    ensure!(
        hard >= needed,
        "the test needs {needed} open files but the hard limit is {hard}; run it with a higher one (`ulimit -Hn 65536`)"
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}

/// Number of descriptors process `pid` holds.
fn fds_of(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// One client: connect, send a keep-alive request, read the whole answer, and keep the
/// connection open (returned).
async fn one_client(addr: SocketAddr) -> Result<TcpStream> {
    let mut stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connect timed out"))??;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n").await?;
    let mut got = Vec::new();
    let mut chunk = [0u8; 512];
    // The answer ends with the task's name and a newline (meshd-testsrv).
    while !got.ends_with(b"web.1\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .map_err(|_| anyhow!("no answer within 10 s"))??;
        ensure!(n > 0, "closed after {} bytes: {:?}", got.len(), String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    Ok(stream)
}

/// Opens `CLIENTS` connections to `addr` (at most 256 handshakes in flight), each
/// answered, all held open at once; returns the held streams and the errors.
async fn drive(addr: SocketAddr) -> (Vec<TcpStream>, Vec<String>) {
    let gate = Arc::new(Semaphore::new(256));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let gate = gate.clone();
        clients.spawn(async move {
            let _turn = gate.acquire_owned().await.expect("never closed");
            one_client(addr).await
        });
    }
    let (mut held, mut errors) = (Vec::new(), Vec::new());
    while let Some(done) = clients.join_next().await {
        match done.expect("client task") {
            Ok(stream) => held.push(stream),
            Err(error) => errors.push(format!("{error:#}")),
        }
    }
    (held, errors)
}

#[test]
fn three_thousand_concurrent_clients_are_served_under_a_1024_soft_limit() -> Result<()> {
    raise_own_nofile(2 * CLIENTS as u64 + 1000)?;
    // The proxy's descriptors are under test: external clients must reach it, not the
    // kernel ingress path (#6), which would serve them without a descriptor.
    let mut cluster = Cluster::start_with(
        1,
        StartOptions {
            nofile: Some(NofileLimit { soft: 1024, hard: None }),
            meshd_args: vec!["--xdp".into(), "off".into()],
            ..Default::default()
        },
    )?;
    let pid = cluster.meshd_pid(1).context("meshd runs")?;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or_default().to_owned();
    let fields: Vec<u64> = open_files.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    ensure!(
        fields.len() == 2 && fields[0] == fields[1] && fields[0] >= 2 * CLIENTS as u64 + 1000,
        "meshd did not raise its soft limit to the hard one: {open_files:?}"
    );
    let status = cluster.meshctl_json(1, &["status"])?;
    ensure!(
        status["open_files"]["soft_limit"] == status["open_files"]["hard_limit"]
            && status["open_files"]["soft_limit"].as_u64() == Some(fields[0]),
        "status shows {}",
        status["open_files"]
    );
    let log = std::fs::read_to_string(&cluster.nodes[0].log)?;
    ensure!(
        log.lines().any(|l| l.contains("open-files limit set to the hard limit") && l.contains("was=1024")),
        "meshd did not log the raise: {}",
        cluster.log_tail(1, 20)
    );

    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    cluster.add_container(1, "web", "web.1")?;
    cluster.meshctl_ok(1, &["publish", "3000:80", "web"])?;
    let addr = SocketAddr::from((node_addr(1), 3000));

    let started = Instant::now();
    let (held, errors) = in_netns(&cluster.client_netns(), move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        // Bounded: every step of every client has its own timeout; the whole run too.
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(120), drive(addr))
                .await
                .map_err(|_| anyhow!("{CLIENTS} clients did not finish within 120 s"))
        })
    })??;
    let elapsed = started.elapsed();
    let mut distinct = errors.clone();
    distinct.sort();
    distinct.dedup();
    ensure!(
        errors.is_empty(),
        "{} of {CLIENTS} clients failed in {elapsed:?}; kinds: {:?}\n{}",
        errors.len(),
        &distinct[..distinct.len().min(5)],
        cluster.log_tail(1, 10)
    );
    ensure!(held.len() == CLIENTS);
    // All held open at once: the proxy relays every one of them now.
    let counters = cluster.meshctl_json(1, &["status"])?["proxy"]["counters"].clone();
    ensure!(counters["tcp_active"] == CLIENTS, "proxy counters while all are open: {counters}");
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    eprintln!(
        "{CLIENTS} concurrent clients answered and held in {elapsed:?}; meshd holds {} fds, RSS {rss}",
        fds_of(pid)?
    );
    drop(held);
    poll("the proxy's connections close", Duration::from_secs(20), || {
        let active = cluster.meshctl_json(1, &["status"])?["proxy"]["counters"]["tcp_active"].clone();
        (active == 0).then_some(()).ok_or_else(|| anyhow!("tcp_active {active}"))
    })?;
    ensure!(!log_has(&cluster, "Too many open files")?, "meshd ran out of descriptors");
    Ok(())
}

fn log_has(cluster: &Cluster, text: &str) -> Result<bool> {
    Ok(std::fs::read_to_string(&cluster.nodes[0].log)?.contains(text))
}

/// Reads what meshd sends an idle API client until it closes; fails after `limit`.
fn read_until_closed(mut stream: UnixStream, limit: Duration) -> Result<(String, Duration)> {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit))?;
    let mut got = String::new();
    stream.read_to_string(&mut got).map_err(|e| anyhow!("not closed within {limit:?}: {e}"))?;
    Ok((got, started.elapsed()))
}

#[test]
fn api_clients_that_send_nothing_are_cut_and_cannot_lock_meshctl_out() -> Result<()> {
    raise_own_nofile(2000)?;
    // A hard limit of 1024 too: the warning case, on the same node.
    let cluster = Cluster::start_with(
        1,
        StartOptions { nofile: Some(NofileLimit { soft: 1024, hard: Some(1024) }), ..Default::default() },
    )?;
    let status = cluster.meshctl_json(1, &["status"])?;
    let warning = status["open_files"]["warning"].as_str().unwrap_or_default();
    ensure!(
        warning.starts_with("open-files limit 1024 (hard 1024) is below the")
            && warning.contains("LimitNOFILE="),
        "status shows no warning for a 1024 hard limit: {}",
        status["open_files"]
    );
    ensure!(
        log_has(&cluster, "open-files limit 1024 (hard 1024) is below the")?,
        "{}",
        cluster.log_tail(1, 20)
    );

    let socket = cluster.nodes[0].socket.clone();
    let pid = cluster.meshd_pid(1).context("meshd runs")?;
    let fds_before = fds_of(pid)?;

    // One client that connects and sends nothing: cut after the read timeout (5 s),
    // with one error line, while real meshctl calls are served meanwhile.
    let idle = UnixStream::connect(&socket)?;
    let cut = std::thread::spawn(move || read_until_closed(idle, Duration::from_secs(15)));
    let calls_started = Instant::now();
    let mut calls = 0;
    while !cut.is_finished() && calls_started.elapsed() < Duration::from_secs(15) {
        cluster.meshctl_ok(1, &["--timeout", "5", "status"])?;
        calls += 1;
    }
    let (said, after) = cut.join().map_err(|_| anyhow!("reader panicked"))??;
    ensure!(
        after >= Duration::from_secs(4) && after < Duration::from_secs(10),
        "idle client cut after {after:?}"
    );
    ensure!(said.contains("no request line within 5 s") && said.lines().count() == 1, "meshd said {said:?}");
    ensure!(calls >= 3, "only {calls} meshctl calls served while the idle client waited");

    // A flood of idle connections: meshd holds at most its cap of them, and meshctl is
    // still answered at once.
    let flood: Vec<UnixStream> = (0..300).map(|_| UnixStream::connect(&socket)).collect::<Result<_, _>>()?;
    let started = Instant::now();
    let status = cluster.meshctl_json(1, &["--timeout", "5", "status"])?;
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "meshctl took {:?} during the flood",
        started.elapsed()
    );
    let evicted = status["api"]["evicted_idle"].as_u64().unwrap_or(0);
    ensure!(evicted >= 300 - 64, "only {evicted} idle clients were closed for newcomers: {}", status["api"]);
    let fds_during = fds_of(pid)?;
    ensure!(
        fds_during <= fds_before + 64 + 8,
        "meshd holds {fds_during} descriptors with 300 idle clients (it held {fds_before} before)"
    );
    drop(flood);
    Ok(())
}

#[test]
fn meshctl_gives_up_on_a_daemon_that_never_answers_and_names_its_socket() -> Result<()> {
    let dir = tempdir()?;
    let path = dir.join("silent.sock");
    let listener = UnixListener::bind(&path)?;
    // Accepts and holds connections, never answering; ends with the test process.
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(4).collect();
        std::thread::sleep(Duration::from_secs(60));
        drop(held);
    });
    let started = Instant::now();
    let mut child = Command::new(bin_path("meshctl")?)
        .arg("--socket")
        .arg(&path)
        .args(["--timeout", "2", "status"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            child.kill()?;
            child.wait()?;
            bail!("meshctl --timeout 2 still waiting after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    let mut stderr = String::new();
    child.stderr.take().context("stderr")?.read_to_string(&mut stderr)?;
    ensure!(!status.success(), "meshctl succeeded against a silent daemon");
    ensure!(
        elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(5),
        "gave up after {elapsed:?}"
    );
    let line = BufReader::new(stderr.as_bytes()).lines().collect::<Result<Vec<_>, _>>()?;
    ensure!(line.len() == 1, "one line expected: {stderr:?}");
    ensure!(
        line[0].starts_with(&format!("meshctl: meshd at {} did not answer within 2s", path.display()))
            && line[0].contains("--timeout"),
        "{stderr:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A fresh directory for this test's socket.
fn tempdir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("meshd-limits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[test]
fn a_relayed_connection_to_a_task_on_a_node_that_vanished_is_closed_by_keepalive() -> Result<()> {
    // The proxies probe after 1 s of silence, every second, twice: a dead peer is found
    // within 3 s (the default finds it within 60 s).
    let keepalive = ["--proxy-tcp-keepalive-secs", "1", "--proxy-tcp-keepalive-interval-secs", "1"];
    // `--xdp off`: the proxy's relay is under test, not the kernel ingress path (#6).
    let meshd_args = keepalive
        .iter()
        .chain(&["--proxy-tcp-keepalive-probes", "2", "--xdp", "off"])
        .map(|a| a.to_string())
        .collect();
    let mut cluster = Cluster::start_with(2, StartOptions { meshd_args, ..Default::default() })?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    cluster.add_container(2, "web", "web.1")?;
    cluster.meshctl_ok(1, &["publish", "3000:80", "web"])?;
    let addr = SocketAddr::from((node_addr(1), 3000));
    let connected = in_netns(&cluster.client_netns(), move || -> Result<std::net::TcpStream> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let stream = poll("the published port answers", Duration::from_secs(10), || {
            runtime.block_on(one_client(addr))
        })?;
        Ok(stream.into_std()?)
    })?
    .map_err(|e| e.context(cluster.log_tail(1, 30)))?;
    // Node 2 vanishes from the underlay (as if it lost power): no FIN, no RST.
    cluster.partition(&[2])?;
    let started = Instant::now();
    connected.set_nonblocking(false)?;
    let (said, after) = {
        let mut stream = connected;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut rest = Vec::new();
        let outcome = stream.read_to_end(&mut rest);
        (outcome.map(|_| ()).map_err(|e| e.kind()), started.elapsed())
    };
    ensure!(
        !matches!(said, Err(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "the relayed connection to the vanished node is still open after {after:?}"
    );
    ensure!(after < Duration::from_secs(10), "closed only after {after:?}");
    eprintln!("relay to the vanished node closed {after:?} after the partition ({said:?})");
    Ok(())
}

#[test]
fn an_out_of_range_proxy_flag_is_refused_before_anything_is_created() -> Result<()> {
    let dir = tempdir()?.join("flags");
    for (flag, value, says) in [
        ("--proxy-udp-max-flows", "0", "invalid --proxy-udp-max-flows: 0 would drop every datagram"),
        ("--proxy-tcp-max-connections", "0", "invalid --proxy-tcp-max-connections: 0 would refuse every"),
        ("--proxy-tcp-keepalive-interval-secs", "0", "invalid --proxy-tcp-keepalive-secs: keepalive needs"),
        ("--proxy-workers", "300", "invalid --proxy-workers: is more than 256 threads"),
    ] {
        meshd_tests::assert_flag_refused(&dir, flag, value, says)?;
    }
    Ok(())
}

/// meshd's resident memory, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or_else(|| anyhow!("no VmRSS"))?;
    Ok(line.split_whitespace().nth(1).ok_or_else(|| anyhow!("bad VmRSS line {line:?}"))?.parse()?)
}

/// The proxy's counters from `meshctl status` on node 1.
fn proxy_counters(cluster: &Cluster) -> Result<serde_json::Value> {
    Ok(cluster.meshctl_json(1, &["status"])?["proxy"]["counters"].clone())
}

/// Slowloris-style clients (connect, then send nothing) cannot grow the proxy without
/// bound: it holds at most `--proxy-tcp-max-connections` of them; each one beyond is
/// closed at once (the client reads the end instead of hanging) and leaves nothing
/// behind; the idle timeout closes the held ones, freeing their slots, and the port
/// then serves a real client again.
#[test]
fn idle_clients_are_held_to_the_cap_and_cut_by_the_idle_timeout_with_bounded_memory() -> Result<()> {
    const CAP: usize = 200;
    const BEYOND: usize = 3 * CAP;
    raise_own_nofile((CAP + BEYOND + 64) as u64)?;
    let meshd_args =
        ["--xdp", "off", "--proxy-tcp-max-connections", "200", "--proxy-tcp-idle-timeout-secs", "5"]
            .map(String::from)
            .to_vec();
    let mut cluster = Cluster::start_with(1, StartOptions { meshd_args, ..Default::default() })?;
    cluster.publish_web(1)?;
    let pid = cluster.meshd_pid(1).ok_or_else(|| anyhow!("meshd is not running"))?;
    let addr = SocketAddr::from((node_addr(1), 3000));
    let client = cluster.client_netns();

    let connect = move |n: usize| -> std::io::Result<Vec<std::net::TcpStream>> {
        (0..n).map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))).collect()
    };
    let held = in_netns(&client, move || connect(CAP))??;
    let active = poll("the proxy holds every idle client", Duration::from_secs(10), || {
        let counters = proxy_counters(&cluster)?;
        ensure!(counters["tcp_active"] == CAP, "{counters}");
        Ok(counters)
    })?;
    let at_cap = rss_kib(pid)?;

    // Beyond the cap: each is accepted by the kernel and closed by the proxy at once.
    let ends = in_netns(&client, move || -> std::io::Result<Vec<std::io::Result<usize>>> {
        let streams = connect(BEYOND)?;
        Ok(streams
            .into_iter()
            .map(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.read(&mut [0u8; 1])
            })
            .collect())
    })??;
    let hung =
        ends.iter().filter(|e| matches!(e, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)).count();
    ensure!(hung == 0, "{hung} of {BEYOND} connections beyond the cap were left hanging");
    ensure!(ends.iter().all(|e| matches!(e, Ok(0) | Err(_))), "a connection beyond the cap got data");
    let counters = proxy_counters(&cluster)?;
    let refused = counters["tcp_refused_at_cap"].as_u64().unwrap_or(0)
        - active["tcp_refused_at_cap"].as_u64().unwrap_or(0);
    ensure!(refused as usize == BEYOND && counters["tcp_active"] == CAP, "{counters}");
    let beyond = rss_kib(pid)?;
    // Nothing kept per refused connection (1 KiB each would be 600 KiB).
    ensure!(
        beyond.saturating_sub(at_cap) < 512,
        "meshd grew from {at_cap} KiB to {beyond} KiB over {BEYOND} refused connections"
    );

    // The idle timeout frees the slots; the clients read the end.
    poll("the idle timeout closes the idle clients", Duration::from_secs(15), || {
        let counters = proxy_counters(&cluster)?;
        ensure!(counters["tcp_active"] == 0 && counters["tcp_idle_closed"] == CAP, "{counters}");
        Ok(())
    })?;
    for mut stream in held {
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        ensure!(stream.read(&mut [0u8; 1])? == 0, "an idle client was not closed");
    }
    let body = meshd_tests::http_get(&client, addr)?;
    ensure!(body == "web.1", "after the idle clients: {body:?}");
    eprintln!(
        "meshd RSS: {at_cap} KiB holding {CAP} idle clients, {beyond} KiB after {BEYOND} more were refused"
    );
    Ok(())
}

/// Half-open connections — clients that vanished without a FIN or a reset (power lost,
/// cable pulled) — are found by the proxy's keepalive and closed, so they do not pile
/// up: here 100 of them, gone within the configured 1 s + 2 × 1 s, under an idle
/// timeout of an hour that would otherwise keep them.
#[test]
fn half_open_connections_of_vanished_clients_are_closed_by_keepalive() -> Result<()> {
    const CLIENTS: usize = 100;
    let meshd_args = [
        "--xdp",
        "off",
        "--proxy-tcp-keepalive-secs",
        "1",
        "--proxy-tcp-keepalive-interval-secs",
        "1",
        "--proxy-tcp-keepalive-probes",
        "2",
    ]
    .map(String::from)
    .to_vec();
    let mut cluster = Cluster::start_with(1, StartOptions { meshd_args, ..Default::default() })?;
    cluster.publish_web(1)?;
    let addr = SocketAddr::from((node_addr(1), 3000));
    let ghost = cluster.add_underlay_host("ghost", std::net::Ipv4Addr::new(198, 18, 0, 250))?;
    let held = in_netns(&ghost, move || -> std::io::Result<Vec<std::net::TcpStream>> {
        (0..CLIENTS).map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))).collect()
    })??;
    poll("the proxy relays every client", Duration::from_secs(10), || {
        let counters = proxy_counters(&cluster)?;
        ensure!(counters["tcp_active"] == CLIENTS, "{counters}");
        Ok(())
    })?;
    // The clients' host drops off the network: its link goes down, nothing is sent.
    let ns = ghost.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    meshd_tests::sh("ip", &["-n", &ns, "link", "set", "eth0", "down"])?;
    let started = Instant::now();
    poll("keepalive closes the half-open connections", Duration::from_secs(15), || {
        let counters = proxy_counters(&cluster)?;
        ensure!(counters["tcp_active"] == 0, "{counters}");
        Ok(())
    })?;
    let counters = proxy_counters(&cluster)?;
    ensure!(counters["tcp_idle_closed"] == 0, "closed by the idle timeout, not keepalive: {counters}");
    eprintln!("{CLIENTS} half-open connections closed {:?} after their clients vanished", started.elapsed());
    drop(held);
    Ok(())
}
