//! Secrets, durable state and bounded inputs, end to end: real meshd nodes in
//! namespaces, their files on disk, their logs, and an attacker in the external
//! client's namespace.

use std::{
    io::Write,
    net::{SocketAddr, TcpStream, UdpSocket},
    os::unix::fs::PermissionsExt,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Context as _, Result};
use meshd_control::gossip::{
    seal::{Key, Keyring},
    wire::{encode, Msg, Packet, Update},
};
use meshd_tests::{in_netns, node_addr, poll, Cluster, CLIENT_ADDR};

fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.permissions().mode()
        & 0o777)
}

fn keyring_of(path: &Path) -> Result<Keyring> {
    Keyring::parse(&std::fs::read_to_string(path)?).map_err(|e| anyhow!("{}: {e}", path.display()))
}

fn counters(cluster: &Cluster, node: usize) -> Result<serde_json::Value> {
    Ok(cluster.meshctl_json(node, &["status"])?["gossip"]["counters"].clone())
}

fn counter(c: &serde_json::Value, name: &str) -> u64 {
    c[name].as_u64().unwrap_or(0)
}

fn everyone_alive(cluster: &Cluster, n: usize) -> Result<()> {
    for i in 1..=n {
        poll(&format!("n{i} sees every member alive"), Duration::from_secs(10), || {
            for j in (1..=n).filter(|j| *j != i) {
                let state = cluster.member_state(i, j)?;
                ensure!(state == "alive", "n{i} sees n{j} {state}");
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// A write on `from` reaches `to` (gossip works).
fn write_reaches(cluster: &Cluster, from: usize, to: usize, network: &str, subnet: &str) -> Result<()> {
    cluster.meshctl_ok(from, &["network", "create", network, "--subnet", subnet])?;
    poll(&format!("n{to} learns network {network} written on n{from}"), Duration::from_secs(10), || {
        ensure!(cluster.meshctl_ok(to, &["network", "ls"])?.contains(network));
        Ok(())
    })
}

#[test]
fn keys_on_disk_are_private_and_never_printed() -> Result<()> {
    let mut cluster = Cluster::start_with_own_keyrings(3)?;
    everyone_alive(&cluster, 3)?;
    cluster.meshctl_ok(1, &["key", "rotate"])?;
    let new_key = keyring_of(&cluster.nodes[0].keyring)?.primary().to_hex();
    for node in &cluster.nodes {
        let store = node.state_dir.join("store.json");
        poll(
            &format!("{} saved the rotated keyring in its store", node.name),
            Duration::from_secs(5),
            || {
                ensure!(std::fs::read_to_string(&store)?.contains(&new_key));
                Ok(())
            },
        )?;
        ensure!(
            mode(&node.state_dir)? == 0o700,
            "{}: state dir mode {:o}",
            node.name,
            mode(&node.state_dir)?
        );
        ensure!(mode(&store)? == 0o600, "{}: store.json mode {:o}", node.name, mode(&store)?);
        ensure!(mode(&node.keyring)? == 0o600, "{}: keyring mode {:o}", node.name, mode(&node.keyring)?);
    }
    // Nothing meshd prints carries a key: status, listings, inspect, logs.
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    for i in 1..=3 {
        cluster.wait_for_service(i, "web")?;
        for args in [
            &["--format", "json", "status"][..],
            &["--format", "json", "key", "ls"],
            &["--format", "json", "node", "ls"],
            &["--format", "json", "network", "ls"],
            &["service", "inspect", "web"],
        ] {
            let out = cluster.meshctl_ok(i, args)?;
            ensure!(!out.contains(&new_key), "`meshctl {}` on n{i} printed the key", args.join(" "));
        }
        let log = std::fs::read_to_string(&cluster.nodes[i - 1].log)?;
        ensure!(!log.contains(&new_key), "n{i}'s log holds the key");
    }

    // Files made readable by others (an old meshd, a careless copy) are tightened at
    // start, with a warning naming the file.
    cluster.stop_node(3)?;
    let n3 = &cluster.nodes[2];
    let store = n3.state_dir.join("store.json");
    for (path, m) in [(&n3.state_dir, 0o755), (&store, 0o644), (&n3.keyring, 0o644)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m))?;
    }
    let (state_dir, keyring, log) = (n3.state_dir.clone(), n3.keyring.clone(), n3.log.clone());
    cluster.restart_node(3)?;
    ensure!(mode(&state_dir)? == 0o700 && mode(&store)? == 0o600 && mode(&keyring)? == 0o600);
    let log = std::fs::read_to_string(log)?;
    for path in [&store, &keyring] {
        ensure!(
            log.contains(&format!("{} was mode 644", path.display())),
            "no warning about {}",
            path.display()
        );
    }
    Ok(())
}

#[test]
fn a_corrupt_store_is_moved_aside_and_rebuilt_from_the_cluster() -> Result<()> {
    let mut cluster = Cluster::start(3)?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    cluster.meshctl_ok(1, &["service", "create", "web", "--network", "backend"])?;
    cluster.wait_for_service(3, "web")?;
    let store = cluster.nodes[2].state_dir.join("store.json");
    poll("n3 saved the service", Duration::from_secs(5), || {
        ensure!(std::fs::read_to_string(&store)?.contains("web"));
        Ok(())
    })?;
    cluster.stop_node(3)?;
    let garbage = b"{\"saved_at_ms\": 1, \"store\": {\"entries\": [garbage\x00\xff";
    std::fs::write(&store, garbage)?;
    cluster.restart_node(3)?;

    let status = cluster.meshctl_json(3, &["status"])?;
    let recovered = status["store"]["recovered"].as_str().unwrap_or_default().to_owned();
    ensure!(recovered.contains("store.json.corrupt-"), "status does not report the corrupt store: {status}");
    let aside = std::fs::read_dir(&cluster.nodes[2].state_dir)?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("store.json.corrupt-"))
        .ok_or_else(|| anyhow!("no store.json.corrupt-* next to the store"))?;
    ensure!(std::fs::read(aside.path())? == garbage, "the corrupt store was not kept as it was");
    ensure!(recovered.contains(&aside.path().display().to_string()), "{recovered}");
    let log = std::fs::read_to_string(&cluster.nodes[2].log)?;
    ensure!(
        log.contains(&format!("store {} was corrupt", store.display())),
        "the log does not name the store"
    );
    // Rebuilt from the cluster by push-pull.
    cluster.wait_for_service(3, "web")?;
    ensure!(cluster.meshctl_ok(3, &["network", "ls"])?.contains("backend"));
    poll("n3 saved the rebuilt store", Duration::from_secs(5), || {
        ensure!(std::fs::read_to_string(&store)?.contains("web"));
        Ok(())
    })?;
    Ok(())
}

#[test]
fn key_install_replaces_a_compromised_key_and_locks_the_old_one_out() -> Result<()> {
    let mut cluster = Cluster::start_with_own_keyrings(3)?;
    everyone_alive(&cluster, 3)?;
    // A rotation first, so the store holds a distributed keyring record (which holds
    // the key that is now to be considered leaked).
    cluster.meshctl_ok(1, &["key", "rotate"])?;
    let leaked = std::fs::read_to_string(&cluster.nodes[0].keyring)?;
    let fresh = Keyring::single(Key::generate());
    let file = cluster.dir.join("fresh-keyring");
    std::fs::write(&file, fresh.render())?;
    let hint = format!("{:08x}", fresh.primary().hint());
    for i in 1..=3 {
        let out = cluster.meshctl_ok(i, &["key", "install", "--file", &file.to_string_lossy()])?;
        ensure!(out.contains(&hint), "{out}");
    }
    for node in &cluster.nodes {
        ensure!(keyring_of(&node.keyring)? == fresh, "{} did not persist the installed keyring", node.name);
        ensure!(mode(&node.keyring)? == 0o600);
    }
    for i in 1..=3 {
        let keys = cluster.meshctl_json(i, &["key", "ls"])?;
        ensure!(keys.as_array().map(Vec::len) == Some(1) && keys[0]["key"] == hint.as_str(), "n{i}: {keys}");
    }
    everyone_alive(&cluster, 3)?;
    write_reaches(&cluster, 3, 1, "after", "10.9.0.0/24")?;
    // The leaked key is gone from the stores too (no restart can bring it back).
    let leaked_key = Keyring::parse(&leaked).map_err(|e| anyhow!(e))?.primary().to_hex();
    for node in &cluster.nodes {
        let store = node.state_dir.join("store.json");
        poll(
            &format!("{} dropped the leaked key from its store", node.name),
            Duration::from_secs(5),
            || {
                ensure!(!std::fs::read_to_string(&store)?.contains(&leaked_key));
                Ok(())
            },
        )?;
    }
    cluster.stop_node(2)?;
    cluster.restart_node(2)?;
    let keys = cluster.meshctl_json(2, &["key", "ls"])?;
    ensure!(keys[0]["key"] == hint.as_str(), "after a restart n2 runs {keys}");

    // Whoever holds only the leaked key can neither inject nor join.
    let before = counter(&counters(&cluster, 1)?, "dropped_auth");
    let old = Keyring::parse(&leaked).map_err(|e| anyhow!(e))?;
    let forged = old.seal(&encode(&Packet {
        from: "intruder".into(),
        from_addr: SocketAddr::from((CLIENT_ADDR, 7946)),
        epoch: 1,
        seq: 1,
        msg: Msg::Gossip,
        updates: vec![Update::Alive {
            node: "intruder".into(),
            addr: SocketAddr::from((CLIENT_ADDR, 7946)),
            incarnation: 1,
        }],
    }));
    let target = SocketAddr::from((node_addr(1), 7946));
    in_netns(&cluster.client_netns(), move || UdpSocket::bind((CLIENT_ADDR, 0))?.send_to(&forged, target))??;
    let stale = cluster.dir.join("leaked-keyring");
    std::fs::write(&stale, &leaked)?;
    let outsider = cluster.add_node_with_keyring(&stale)?;
    poll("n1 refuses the forged packet and the outsider's join twice", Duration::from_secs(10), || {
        let c = counters(&cluster, 1)?;
        ensure!(counter(&c, "dropped_auth") >= before + 3, "{c}");
        Ok(())
    })?;
    let members = cluster.meshctl_json(1, &["node", "ls"])?;
    ensure!(!members.to_string().contains("intruder"), "the forged member got in: {members}");
    ensure!(cluster.member_state(1, outsider)? == "unknown", "a node with the leaked key joined");
    Ok(())
}

#[test]
fn two_rotations_started_at_once_never_split_the_keyring() -> Result<()> {
    let cluster = Cluster::start_with_own_keyrings(3)?;
    everyone_alive(&cluster, 3)?;
    let (a, b) = std::thread::scope(|s| {
        let one = s.spawn(|| cluster.meshctl(1, &["key", "rotate"]));
        let two = s.spawn(|| cluster.meshctl(2, &["key", "rotate"]));
        (one.join().expect("rotation thread"), two.join().expect("rotation thread"))
    });
    let outcome = |o: &std::process::Output| {
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    };
    let (won, lost) = match (a.status.success(), b.status.success()) {
        (true, false) => (outcome(&a), outcome(&b)),
        (false, true) => (outcome(&b), outcome(&a)),
        _ => {
            return Err(anyhow!(
                "expected exactly one rotation to succeed:\nn1: {}\nn2: {}",
                outcome(&a),
                outcome(&b)
            ))
        }
    };
    ensure!(won.contains("rotated"), "{won}");
    ensure!(
        lost.contains("concurrent `meshctl key rotate`") && lost.contains("run `meshctl key rotate` again"),
        "the losing rotation's message does not say what happened and what to do: {lost}"
    );
    let mut hints = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let keys = cluster.meshctl_json(i + 1, &["key", "ls"])?;
        ensure!(keys.as_array().map(Vec::len) == Some(1), "n{} keys: {keys}", i + 1);
        let hint = keys[0]["key"].as_str().unwrap_or_default().to_owned();
        ensure!(
            format!("{:08x}", keyring_of(&node.keyring)?.primary().hint()) == hint,
            "{} did not persist the key it runs",
            node.name
        );
        hints.push(hint);
    }
    ensure!(hints.iter().all(|h| *h == hints[0]), "the nodes disagree on the key: {hints:?}");
    ensure!(won.contains(&hints[0]), "the winner's key is not the one installed: {won} vs {hints:?}");
    everyone_alive(&cluster, 3)?;
    write_reaches(&cluster, 1, 3, "after", "10.9.0.0/24")?;
    Ok(())
}

/// Resident and peak memory of a process, in KiB.
fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

#[test]
fn a_push_pull_flood_without_the_key_stays_bounded() -> Result<()> {
    let cluster = Cluster::start(2)?;
    everyone_alive(&cluster, 2)?;
    let pid = cluster.nodes[0].meshd_pid().ok_or_else(|| anyhow!("n1's meshd is not running"))?;
    let (rss_before, _) = memory_kib(pid)?;
    let before = counters(&cluster, 1)?;
    let log_lines =
        || -> Result<usize> { Ok(std::fs::read_to_string(&cluster.nodes[0].log)?.lines().count()) };
    let lines_before = log_lines()?;

    // The measured attack: 20 connections, each announcing 60 MiB and streaming up to
    // 16 MiB; then 20 more announcing just under the frame cap (4 MiB) and streaming
    // it. Bounded in time: every socket has a 10 s write timeout and each wave stops
    // sending after 20 s.
    let target = SocketAddr::from((node_addr(1), 7946));
    let wave = |announce: u32, total: usize| -> Result<u64> {
        in_netns(&cluster.client_netns(), move || -> u64 {
            let started = Instant::now();
            let threads: Vec<_> = (0..20)
                .map(|_| {
                    std::thread::spawn(move || -> u64 {
                        let blob = vec![0x5au8; 1 << 20];
                        let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
                            return 0;
                        };
                        let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
                        if s.write_all(&announce.to_be_bytes()).is_err() {
                            return 0;
                        }
                        let mut sent = 0usize;
                        while sent < total && started.elapsed() < Duration::from_secs(20) {
                            match s.write(&blob[..blob.len().min(total - sent)]) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => sent += n,
                            }
                        }
                        sent as u64
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap_or(0)).sum()
        })
    };
    let sent_big = wave(60 << 20, 16 << 20)?;
    let mid = counters(&cluster, 1)?;
    let sent_cap = wave((4 << 20) - 1, (4 << 20) - 1)?;
    let (rss_after, peak) = memory_kib(pid)?;
    let grown_mib = rss_after.saturating_sub(rss_before) / 1024;
    let peak_mib = peak.saturating_sub(rss_before) / 1024;
    println!(
        "attackers sent {} MiB + {} MiB; n1 meshd RSS {rss_before} -> {rss_after} KiB (+{grown_mib} MiB), peak +{peak_mib} MiB",
        sent_big >> 20,
        sent_cap >> 20,
    );
    // Bound: 4 concurrent push-pulls x a 4 MiB frame (x2 while the buffer grows) =
    // 32 MiB of buffers at worst.
    ensure!(peak_mib < 32, "meshd grew by {peak_mib} MiB at peak under the flood");

    // Every connection of the second wave is accounted for once meshd has read it.
    let after = poll("n1 counted every connection of the second wave", Duration::from_secs(10), || {
        let after = counters(&cluster, 1)?;
        let n: u64 = ["dropped_busy", "timed_out", "dropped_auth"]
            .iter()
            .map(|name| counter(&after, name) - counter(&mid, name))
            .sum();
        ensure!(n >= 20, "{after}");
        Ok(after)
    })?;
    let rose = |from: &serde_json::Value, to: &serde_json::Value, name: &str| {
        counter(to, name) - counter(from, name)
    };
    let refused_big = rose(&before, &mid, "dropped_oversized") + rose(&before, &mid, "dropped_busy");
    ensure!(
        rose(&before, &mid, "dropped_oversized") >= 1 && refused_big >= 20,
        "60 MiB announcements: {mid}"
    );
    let dropped_cap =
        ["dropped_busy", "timed_out", "dropped_auth"].iter().map(|n| rose(&mid, &after, n)).sum::<u64>();
    ensure!(dropped_cap >= 20, "frames at the cap were not all dropped: {after}");
    ensure!(rose(&mid, &after, "dropped_busy") >= 1, "the connection cap never applied: {after}");
    let new_lines = log_lines()? - lines_before;
    ensure!(new_lines <= 12, "{new_lines} log lines for one flood: {}", cluster.log_tail(1, 20));
    // The cluster still works.
    everyone_alive(&cluster, 2)?;
    write_reaches(&cluster, 2, 1, "after", "10.9.0.0/24")?;
    Ok(())
}

/// User + system CPU time of a process, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based).
    let at =
        |i: usize| -> Result<u64> { Ok(fields.get(i - 3).ok_or_else(|| anyhow!("short stat"))?.parse()?) };
    Ok(at(14)? + at(15)?)
}

#[test]
fn running_out_of_file_descriptors_does_not_spin_the_accept_loop() -> Result<()> {
    let cluster = Cluster::start(1)?;
    let pid = cluster.nodes[0].meshd_pid().ok_or_else(|| anyhow!("n1's meshd is not running"))?;
    let before = counters(&cluster, 1)?;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let (soft, hard) = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.get(3)?.to_string(), f.get(4)?.to_string()))
        })
        .ok_or_else(|| anyhow!("no open-files limit in /proc/{pid}/limits"))?;
    let log = &cluster.nodes[0].log;
    let lines_before = std::fs::read_to_string(log)?.lines().count();
    // No descriptor left (a soft limit below what is already open): every accept of
    // the connection below fails with EMFILE while the connection waits in the backlog
    // (readable again at once: the old loop spun).
    meshd_tests::sh("prlimit", &["--pid", &pid.to_string(), &format!("--nofile=3:{hard}")])
        .context("prlimit comes with util-linux: `apt-get install util-linux`")?;
    let cpu_before = cpu_ticks(pid)?;
    let target = SocketAddr::from((node_addr(1), 7946));
    // The measurement window: 3 s with a connection pending.
    let held = in_netns(&cluster.client_netns(), move || -> std::io::Result<()> {
        let _pending = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        std::thread::sleep(Duration::from_secs(3));
        Ok(())
    })?;
    let cpu = cpu_ticks(pid)? - cpu_before;
    meshd_tests::sh("prlimit", &["--pid", &pid.to_string(), &format!("--nofile={soft}:{hard}")])?;
    held?;
    let after = counters(&cluster, 1)?;
    let errors = counter(&after, "socket_errors") - counter(&before, "socket_errors");
    println!("3 s out of descriptors: {errors} failed accepts, {cpu} CPU ticks");
    ensure!(errors >= 1, "no failed accept was counted: {after}");
    // Backoff doubling from 10 ms to 1 s: about a dozen tries in 3 s, not millions.
    ensure!(errors <= 30, "{errors} accept attempts in 3 s: the loop does not back off");
    ensure!(cpu <= 60, "meshd used {cpu} ticks of CPU in 3 s while out of descriptors");
    let warnings = std::fs::read_to_string(log)?
        .lines()
        .skip(lines_before)
        .filter(|l| l.contains("accepting a push-pull failed"))
        .count();
    ensure!(warnings <= 1, "{warnings} accept warnings in 3 s (rate limit: one per 10 s)");
    // Descriptors back: push-pulls work again.
    poll("the accept loop serves again", Duration::from_secs(5), || {
        let dropped = |c: &serde_json::Value| counter(c, "dropped_malformed") + counter(c, "dropped_auth");
        let pushes = dropped(&counters(&cluster, 1)?);
        in_netns(&cluster.client_netns(), move || -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
            s.write_all(&64u32.to_be_bytes())?;
            s.write_all(&[0u8; 64])
        })??;
        poll("the junk frame is counted", Duration::from_secs(2), || {
            ensure!(
                counter(&counters(&cluster, 1)?, "dropped_malformed")
                    + counter(&counters(&cluster, 1)?, "dropped_auth")
                    > pushes
            );
            Ok(())
        })
    })?;
    Ok(())
}

#[test]
fn a_node_back_after_the_tombstone_ttl_does_not_resurrect_a_deleted_service() -> Result<()> {
    let mut cluster = Cluster::start_with_args(3, &["--tombstone-ttl-secs", "4"])?;
    cluster.meshctl_ok(1, &["network", "create", "backend", "--subnet", "10.0.0.0/24"])?;
    for svc in ["gone", "kept"] {
        cluster.meshctl_ok(1, &["service", "create", svc, "--network", "backend"])?;
    }
    let stores: Vec<std::path::PathBuf> =
        cluster.nodes.iter().map(|n| n.state_dir.join("store.json")).collect();
    let store_of = |i: usize| stores[i - 1].clone();
    poll("n3 saved both services", Duration::from_secs(10), || {
        let store = std::fs::read_to_string(store_of(3))?;
        ensure!(store.contains("service/gone") && store.contains("service/kept"));
        Ok(())
    })?;
    cluster.stop_node(3)?;
    cluster.meshctl_ok(1, &["service", "rm", "gone"])?;
    // n1 and n2 reap the tombstone after the TTL (and save the store without it).
    for i in 1..=2 {
        poll(&format!("n{i} forgot the deletion"), Duration::from_secs(15), || {
            ensure!(!std::fs::read_to_string(store_of(i))?.contains("service/gone"));
            Ok(())
        })?;
    }
    cluster.restart_node(3)?;
    poll("n3 finished its resync", Duration::from_secs(10), || {
        let status = cluster.meshctl_json(3, &["status"])?;
        ensure!(status["store"]["resyncing"] == false, "{}", status["store"]);
        Ok(())
    })?;
    // A write made on n3 after its return reaching n1 marks the moment a resurrected
    // entry from n3 would have reached it too.
    cluster.meshctl_ok(3, &["service", "create", "marker", "--network", "backend"])?;
    cluster.wait_for_service(1, "marker")?;
    cluster.wait_for_service(2, "marker")?;
    for i in 1..=3 {
        ensure!(
            cluster.meshctl(i, &["service", "ps", "gone"]).status.code() == Some(1),
            "n{i} has gone back"
        );
        cluster.wait_for_service(i, "kept")?;
    }
    let log = std::fs::read_to_string(&cluster.nodes[2].log)?;
    ensure!(
        log.contains("saved longer ago than the tombstone TTL"),
        "n3 did not notice it was away too long"
    );
    Ok(())
}
