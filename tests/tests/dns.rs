//! The embedded resolver served in a real network namespace on 127.0.0.11:53 and asked
//! by the real `dig`: every name form, TCP, truncation, table swaps, forwarding to a
//! real dnsmasq with failover, a silent upstream, a forwarding loop, a stalled TCP client.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use meshd_dataplane::dns::{
    open_in_netns, EndpointMode, NameTable, Resolver, ResolverConfig, ServiceNames, TableHandle,
    RESOLVER_ADDR,
};
use meshd_tests::{dnslab::DnsLab, in_netns, poll};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// The shared sample (see `dnslab::sample_table`) with 60 tasks in `big`. The
/// container is on `front` only.
fn table() -> NameTable {
    meshd_tests::dnslab::sample_table(60)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Starts a resolver in `lab`'s namespace with `config`.
fn serve(
    rt: &tokio::runtime::Runtime,
    lab: &DnsLab,
    table: &TableHandle,
    config: ResolverConfig,
) -> Result<Resolver> {
    serve_on(rt, lab, table, config, &["front"])
}

/// Starts a resolver in `lab`'s namespace for a container on `networks`.
fn serve_on(
    rt: &tokio::runtime::Runtime,
    lab: &DnsLab,
    table: &TableHandle,
    config: ResolverConfig,
    networks: &[&str],
) -> Result<Resolver> {
    let sockets = open_in_netns(&lab.netns(), RESOLVER_ADDR, None)?;
    let _guard = rt.enter();
    let networks = networks.iter().map(|n| n.to_string()).collect();
    Ok(Resolver::start(&lab.netns(), sockets, table.clone(), networks, config)?)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn names_are_answered_from_the_table() -> Result<()> {
    let lab = DnsLab::new(&[])?;
    let rt = runtime();
    let table = TableHandle::new(&table());
    let _resolver = serve(&rt, &lab, &table, ResolverConfig::default())?;
    let dig = |args: &[&str]| lab.dig(&[&["@127.0.0.11"][..], args].concat());

    // vip service, bare and qualified with its network, any case.
    for name in ["web", "web.front", "WEB.Front."] {
        let d = dig(&[name])?;
        ensure!(d.status == "NOERROR" && d.answers == ["10.0.1.2"], "{name}: {d:?}");
        ensure!(d.flags.contains(&"aa".to_owned()), "{name}: {d:?}");
    }
    // dnsrr service: every task; tasks.SERVICE: every task; task names: their IP.
    let all_api = vec!["10.0.1.20".to_owned(), "10.0.1.21".into(), "10.0.1.22".into()];
    ensure!(sorted(dig(&["api"])?.answers) == all_api);
    ensure!(sorted(dig(&["tasks.api.front"])?.answers) == all_api);
    ensure!(dig(&["tasks.web"])?.answers == ["10.0.1.10", "10.0.1.11"]);
    ensure!(dig(&["web.2"])?.answers == ["10.0.1.11"]);
    // AAAA of an IPv4-only name: empty NOERROR.
    let d = dig(&["web", "AAAA"])?;
    ensure!(d.status == "NOERROR" && d.answers.is_empty(), "AAAA: {d:?}");
    // PTR for a task IP and a VIP.
    ensure!(dig(&["-x", "10.0.1.10"])?.answers == ["web.1.front."]);
    ensure!(dig(&["-x", "10.0.1.2"])?.answers == ["web.front."]);
    // Names of a network the container is not on: NXDOMAIN.
    for name in ["db", "db.back", "tasks.db", "db.1"] {
        let d = dig(&[name])?;
        ensure!(d.status == "NXDOMAIN" && d.answers.is_empty(), "{name}: {d:?}");
    }
    // TCP.
    let d = dig(&["+tcp", "web"])?;
    ensure!(d.answers == ["10.0.1.2"], "tcp: {d:?}");
    // 60 tasks do not fit 512 bytes: TC over UDP (dig told not to retry), all over TCP.
    let d = dig(&["+noedns", "+ignore", "big"])?;
    ensure!(d.flags.contains(&"tc".to_owned()) && d.answers.len() < 60, "udp 512: {d:?}");
    let d = dig(&["+tcp", "big"])?;
    ensure!(d.answers.len() == 60 && !d.flags.contains(&"tc".to_owned()), "tcp: {d:?}");
    // A plain dig retries over TCP by itself on TC and gets everything.
    ensure!(dig(&["+noedns", "big"])?.answers.len() == 60);

    // A table swap is visible in the next answer: web moves to a new VIP, db joins front.
    let mut next = self::table();
    let front = next.networks.get_mut("front").unwrap();
    front.services.get_mut("web").unwrap().vip = Some(ip("10.0.1.99"));
    front.services.insert(
        "db".into(),
        ServiceNames { mode: EndpointMode::Vip, vip: Some(ip("10.0.1.50")), task_ips: vec![] },
    );
    table.update(&next);
    ensure!(dig(&["web"])?.answers == ["10.0.1.99"]);
    ensure!(dig(&["db"])?.answers == ["10.0.1.50"]);
    Ok(())
}

#[test]
fn unknown_names_are_forwarded_to_dnsmasq_with_failover_and_no_loop() -> Result<()> {
    let mut lab = DnsLab::new(&["127.0.0.53", "127.0.0.54"])?;
    lab.start_dnsmasq(
        "127.0.0.53",
        &["--address=/example.test/192.0.2.1", "--server=/loop.test/127.0.0.11"],
        "example.test",
    )?;
    // 127.0.0.54:53 is bound and never read: an upstream that never answers, over UDP
    // and over TCP (the kernel completes the handshake; nothing reads the question).
    let _silent = in_netns(&lab.netns(), || std::net::UdpSocket::bind("127.0.0.54:53"))??;
    let _silent_tcp = in_netns(&lab.netns(), || std::net::TcpListener::bind("127.0.0.54:53"))??;
    let rt = runtime();
    let table = TableHandle::new(&table());
    let config = ResolverConfig {
        upstreams: vec![
            SocketAddr::from(RESOLVER_ADDR), // ourselves: must be skipped
            "127.0.0.54:53".parse()?,
            "127.0.0.53:53".parse()?,
        ],
        upstream_timeout: Duration::from_millis(300),
        ..ResolverConfig::default()
    };
    let _resolver = serve(&rt, &lab, &table, config)?;

    // The silent upstream costs one timeout, then dnsmasq answers.
    let started = Instant::now();
    let d = lab.dig(&["@127.0.0.11", "www.example.test"])?;
    ensure!(d.status == "NOERROR" && d.answers == ["192.0.2.1"], "forwarded: {d:?}");
    ensure!(started.elapsed() < Duration::from_secs(2), "failover took {:?}", started.elapsed());
    // Over TCP from the client too: forwarded over TCP, the silent upstream costs one
    // timeout there as well.
    let started = Instant::now();
    ensure!(lab.dig(&["@127.0.0.11", "+tcp", "example.test"])?.answers == ["192.0.2.1"]);
    ensure!(started.elapsed() < Duration::from_secs(2), "TCP failover took {:?}", started.elapsed());
    // Table names are still ours, not the upstream's.
    ensure!(lab.dig(&["@127.0.0.11", "web"])?.answers == ["10.0.1.2"]);

    // dnsmasq sends loop.test back to 127.0.0.11: the hop marker stops the second round,
    // the client gets an error at once, and the resolver keeps serving.
    let started = Instant::now();
    let d = lab.dig(&["@127.0.0.11", "x.loop.test"])?;
    // REFUSED is the hop guard's answer to dnsmasq, passed back (without the guard the
    // query goes round again and dnsmasq ends it with SERVFAIL).
    ensure!(d.status == "REFUSED", "loop: {d:?}");
    ensure!(d.answers.is_empty());
    ensure!(started.elapsed() < Duration::from_secs(2), "loop answered after {:?}", started.elapsed());
    ensure!(lab.dig(&["@127.0.0.11", "web"])?.answers == ["10.0.1.2"]);
    Ok(())
}

#[test]
fn tcp_clients_are_forwarded_over_tcp_and_udp_clients_get_tc() -> Result<()> {
    let mut lab = DnsLab::new(&["127.0.0.53"])?;
    // Eight 200-byte TXT strings: about 1.7 kB, more than any UDP answer we relay.
    let records: Vec<String> = (b'a'..=b'h')
        .map(|c| format!("--txt-record=big.txt.test,{}", String::from(c as char).repeat(200)))
        .collect();
    let mut args: Vec<&str> = records.iter().map(String::as_str).collect();
    args.push("--address=/example.test/192.0.2.1");
    lab.start_dnsmasq("127.0.0.53", &args, "example.test")?;
    let rt = runtime();
    let table = TableHandle::new(&table());
    let config = ResolverConfig { upstreams: vec!["127.0.0.53:53".parse()?], ..ResolverConfig::default() };
    let _resolver = serve(&rt, &lab, &table, config)?;

    // A UDP client gets the truncated answer with TC (and would retry over TCP itself).
    let d = lab.dig(&["@127.0.0.11", "+ignore", "+notcp", "TXT", "big.txt.test"])?;
    ensure!(d.flags.contains(&"tc".to_owned()) && d.answers.len() < 8, "udp: {d:?}");
    // A TCP client gets every record: its question went upstream over TCP.
    let d = lab.dig(&["@127.0.0.11", "+tcp", "TXT", "big.txt.test"])?;
    ensure!(d.status == "NOERROR", "tcp: {d:?}");
    ensure!(d.answers.len() == 8 && !d.flags.contains(&"tc".to_owned()), "tcp: {d:?}");
    // dig's own fallback: UDP first, TC, then TCP: the whole set.
    let d = lab.dig(&["@127.0.0.11", "TXT", "big.txt.test"])?;
    ensure!(d.answers.len() == 8, "fallback: {d:?}");
    Ok(())
}

#[test]
fn silent_upstream_gives_servfail_and_stalled_tcp_clients_are_cut() -> Result<()> {
    let lab = DnsLab::new(&["127.0.0.54"])?;
    let _silent = in_netns(&lab.netns(), || std::net::UdpSocket::bind("127.0.0.54:53"))??;
    let rt = runtime();
    let table = TableHandle::new(&table());
    let config = ResolverConfig {
        upstreams: vec!["127.0.0.54:53".parse()?],
        upstream_timeout: Duration::from_millis(500),
        tcp_idle_timeout: Duration::from_millis(500),
        ..ResolverConfig::default()
    };
    let resolver = serve(&rt, &lab, &table, config)?;

    let started = Instant::now();
    let d = lab.dig(&["@127.0.0.11", "nothing.example"])?;
    ensure!(d.status == "SERVFAIL", "silent upstream: {d:?}");
    ensure!(started.elapsed() < Duration::from_millis(1500), "SERVFAIL after {:?}", started.elapsed());

    // A TCP client that sends a length prefix and stalls is closed after the timeout.
    let closed_after = in_netns(&lab.netns(), || -> std::io::Result<Duration> {
        let mut s = TcpStream::connect(SocketAddr::from(RESOLVER_ADDR))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(&[0, 40, 0x12])?;
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let n = s
            .read(&mut buf)
            .map_err(|e| std::io::Error::other(format!("stalled TCP client still open after 5 s ({e})")))?;
        if n != 0 {
            return Err(std::io::Error::other(format!("got {n} bytes instead of a close")));
        }
        Ok(started.elapsed())
    })??;
    ensure!(closed_after < Duration::from_secs(2), "stalled client cut after {closed_after:?}");
    // And the resolver still answers.
    ensure!(lab.dig(&["@127.0.0.11", "web"])?.answers == ["10.0.1.2"]);

    // Shut down: the port is free again (a new resolver can take it).
    rt.block_on(resolver.shutdown());
    poll("127.0.0.11:53 is free after shutdown", Duration::from_secs(2), || {
        Ok(open_in_netns(&lab.netns(), RESOLVER_ADDR, None)?)
    })?;
    Ok(())
}

#[test]
fn one_process_serves_many_namespaces_each_seeing_its_own_networks() -> Result<()> {
    let front = DnsLab::new(&[])?;
    let back = DnsLab::new(&[])?;
    let rt = runtime();
    let table = TableHandle::new(&table());
    let _front = serve_on(&rt, &front, &table, ResolverConfig::default(), &["front"])?;
    let back_resolver = serve_on(&rt, &back, &table, ResolverConfig::default(), &["back"])?;
    let ask = |lab: &DnsLab, name: &str| lab.dig(&["@127.0.0.11", name]);

    ensure!(ask(&front, "web")?.answers == ["10.0.1.2"]);
    ensure!(ask(&front, "db")?.status == "NXDOMAIN");
    ensure!(ask(&back, "db")?.answers == ["10.0.2.2"]);
    ensure!(ask(&back, "web")?.status == "NXDOMAIN");
    // The back container joins front too: both networks' names, at once.
    back_resolver.set_networks(vec!["back".into(), "front".into()]);
    ensure!(ask(&back, "web")?.answers == ["10.0.1.2"]);
    ensure!(ask(&back, "db.back")?.answers == ["10.0.2.2"]);
    // One table update reaches every namespace.
    let mut next = self::table();
    next.networks.get_mut("front").unwrap().services.get_mut("web").unwrap().vip = Some(ip("10.0.1.77"));
    table.update(&next);
    ensure!(ask(&front, "web")?.answers == ["10.0.1.77"]);
    ensure!(ask(&back, "web")?.answers == ["10.0.1.77"]);
    Ok(())
}
