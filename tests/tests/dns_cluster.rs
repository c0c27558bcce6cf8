//! The embedded resolver as meshd runs it: a netns cluster of real meshd processes,
//! containers attached with the real meshctl, and the real `dig` asking 127.0.0.11
//! inside a container. Every name form, forwarding to a real dnsmasq in the node's
//! namespace (UDP and TCP), churn on other nodes, a dead node, and `kill -9` of meshd.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use meshd_tests::{
    dnslab::{parse_dig, Dig},
    poll, Cluster, StartOptions,
};

/// `dig +time=1 +tries=1 @127.0.0.11 ARGS` inside the container namespace `netns`.
fn dig(netns: &Path, args: &[&str]) -> Result<Dig> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["--", "dig", "+time=1", "+tries=1", "@127.0.0.11"])
        .args(args)
        .output()
        .context("running dig; install it with `apt-get install dnsutils` (`make bootstrap`)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_dig(&text).with_context(|| format!("dig {}: no answer:\n{text}", args.join(" ")))
}

/// `meshctl ARGS` on node `node`; a failure carries the last lines of every node's log.
fn ok(cluster: &Cluster, node: usize, args: &[&str]) -> Result<String> {
    cluster.meshctl_ok(node, args).map_err(|e| {
        let logs: Vec<String> = (1..=cluster.nodes.len()).map(|i| cluster.log_tail(i, 15)).collect();
        e.context(logs.join("\n"))
    })
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Creates an empty namespace and attaches it to `service` on node `node` as `task`
/// with the real meshctl; returns the namespace and the attach reply.
fn attach(cluster: &Cluster, node: usize, service: &str, task: &str) -> Result<(PathBuf, serde_json::Value)> {
    cluster.wait_for_service(node, service)?;
    let netns = cluster.add_netns(task)?;
    let path = netns.to_string_lossy().into_owned();
    let reply = cluster.meshctl_json(node, &["attach", service, "--netns", &path, "--name", task])?;
    Ok((netns, reply))
}

fn ip_of(reply: &serde_json::Value) -> Result<String> {
    reply["ip"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("attach returned no ip: {reply}"))
}

/// A dnsmasq in node `node`'s namespace on 127.0.0.1:53, killed by PID on drop.
struct Dnsmasq(Child);

impl Dnsmasq {
    fn start(cluster: &Cluster, node: usize, args: &[&str]) -> Result<Dnsmasq> {
        let pid_file = cluster.dir.join(format!("dnsmasq-n{node}.pid"));
        let child = meshd_tests::dnslab::spawn_dnsmasq(
            &cluster.nodes[node - 1].netns(),
            "127.0.0.1",
            &pid_file,
            args,
        )?;
        Ok(Dnsmasq(child))
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Three nodes whose resolvers forward to 127.0.0.1:53 of their own namespace.
fn cluster() -> Result<Cluster> {
    Cluster::start_with(
        3,
        StartOptions {
            meshd_args: ["--dns-upstream", "127.0.0.1:53", "--dns-upstream-timeout-ms", "500"]
                .map(String::from)
                .to_vec(),
            ..StartOptions::default()
        },
    )
}

#[test]
fn every_name_form_from_a_container_and_forwarding_to_dnsmasq() -> Result<()> {
    let cluster = cluster()?;
    ok(&cluster, 1, &["network", "create", "appnet", "--subnet", "10.0.1.0/24"])?;
    ok(&cluster, 1, &["network", "create", "other", "--subnet", "10.0.2.0/24"])?;
    ok(&cluster, 1, &["service", "create", "mvcapp", "--network", "appnet"])?;
    cluster
        .meshctl_ok(1, &["service", "create", "mysql", "--network", "appnet", "--endpoint-mode", "dnsrr"])?;
    ok(&cluster, 1, &["service", "create", "secret", "--network", "other"])?;
    let (_, web1) = attach(&cluster, 1, "mvcapp", "mvcapp.1")?;
    let (_, db1) = attach(&cluster, 1, "mysql", "mysql.1")?;
    let (_, db2) = attach(&cluster, 2, "mysql", "mysql.2")?;
    let (_, secret) = attach(&cluster, 2, "secret", "secret.1")?;
    // A task of `other` on n3 too: n3 holds that network's names, and still the
    // container on `appnet` must not see them.
    let (_, secret2) = attach(&cluster, 3, "secret", "secret.2")?;
    let (client, mine) = attach(&cluster, 3, "mvcapp", "mvcapp.2")?;
    // attach answers once the resolver in the namespace serves.
    ensure!(mine["resolver"] == "127.0.0.11:53", "attach reply: {mine}");
    let (web1, db1, db2, me) = (ip_of(&web1)?, ip_of(&db1)?, ip_of(&db2)?, ip_of(&mine)?);
    let secret_ip = ip_of(&secret)?;
    let status = cluster.meshctl_json(3, &["status"])?;
    ensure!(status["dns"]["running"] == 2, "status: {}", status["dns"]);
    ensure!(secret2["resolver"] == "127.0.0.11:53", "attach reply: {secret2}");

    // The other nodes' tasks reach n3 by gossip: wait for the last one.
    poll("tasks.mysql shows both tasks on n3", Duration::from_secs(10), || {
        let d = dig(&client, &["tasks.mysql"])?;
        ensure!(sorted(d.answers.clone()) == sorted(vec![db1.clone(), db2.clone()]), "{d:?}");
        Ok(())
    })?;
    // tasks.SERVICE, with and without the network, any case.
    for name in ["tasks.mvcapp", "tasks.mvcapp.appnet", "TASKS.MvcApp."] {
        let d = dig(&client, &[name])?;
        ensure!(
            d.status == "NOERROR" && sorted(d.answers.clone()) == sorted(vec![web1.clone(), me.clone()]),
            "{name}: {d:?}"
        );
        ensure!(d.flags.contains(&"aa".to_owned()), "{name}: {d:?}");
    }
    // dnsrr: every task, in varying order.
    let mut orders = BTreeSet::new();
    for _ in 0..20 {
        let d = dig(&client, &["mysql"])?;
        ensure!(sorted(d.answers.clone()) == sorted(vec![db1.clone(), db2.clone()]), "mysql: {d:?}");
        orders.insert(d.answers);
    }
    ensure!(orders.len() == 2, "dnsrr answers never changed order in 20 queries: {orders:?}");
    ensure!(dig(&client, &["mysql.appnet"])?.answers.len() == 2);
    // Task names, with and without the network.
    ensure!(dig(&client, &["mysql.2"])?.answers == [db2.as_str()]);
    ensure!(dig(&client, &["mysql.2.appnet"])?.answers == [db2.as_str()]);
    // PTR of a task address.
    let reverse = |ip: &str| {
        let mut o: Vec<&str> = ip.split('.').collect();
        o.reverse();
        format!("{}.in-addr.arpa", o.join("."))
    };
    let d = dig(&client, &["-x", &db2])?;
    ensure!(d.status == "NOERROR" && d.answers == ["mysql.2.appnet."], "PTR {db2}: {d:?}");
    // AAAA: the names are IPv4-only: empty NOERROR.
    let d = dig(&client, &["AAAA", "mysql.1"])?;
    ensure!(d.status == "NOERROR" && d.answers.is_empty(), "AAAA: {d:?}");
    // Another network's names: not visible from here.
    for name in ["secret", "tasks.secret", "secret.1", "secret.2", "secret.other", "secret.1.other"] {
        let d = dig(&client, &[name])?;
        ensure!(d.status == "NXDOMAIN" && d.answers.is_empty(), "{name}: {d:?}");
    }
    let d = dig(&client, &["PTR", &reverse(&secret_ip)])?;
    ensure!(!d.answers.iter().any(|a| a.contains("secret")), "PTR of another network's task: {d:?}");

    // The vip-mode name answers the VIP `service inspect` shows.
    let inspect = cluster.meshctl_json(3, &["service", "inspect", "mvcapp"])?;
    match inspect["service"]["vip"].as_str() {
        Some(vip) => {
            let d = dig(&client, &["mvcapp"])?;
            ensure!(d.answers == [vip], "mvcapp: {d:?} (VIP {vip})");
            ensure!(dig(&client, &["mvcapp.appnet"])?.answers == [vip]);
            let d = dig(&client, &["-x", vip])?;
            ensure!(d.answers == ["mvcapp.appnet."], "PTR of the VIP: {d:?}");
        }
        // VIP allocation is another branch (helper A); until it is merged no service
        // has a VIP and this part has nothing to check.
        None => eprintln!(
            "note: service mvcapp has no VIP yet (VIP allocation not merged); VIP answers unchecked"
        ),
    }

    // Forwarding: dnsmasq in n3's own namespace on 127.0.0.1 (a node-local resolver,
    // reached because forwards leave from meshd's namespace), over UDP and TCP.
    let txt: Vec<String> = (b'a'..=b'h')
        .map(|c| format!("--txt-record=big.txt.test,{}", String::from(c as char).repeat(200)))
        .collect();
    let mut args: Vec<&str> = txt.iter().map(String::as_str).collect();
    args.push("--address=/example.test/192.0.2.1");
    let _dnsmasq = Dnsmasq::start(&cluster, 3, &args)?;
    poll("the forwarded name answers", Duration::from_secs(5), || {
        let d = dig(&client, &["www.example.test"])?;
        ensure!(d.status == "NOERROR" && d.answers == ["192.0.2.1"], "{d:?}");
        Ok(())
    })?;
    let d = dig(&client, &["+tcp", "www.example.test"])?;
    ensure!(d.answers == ["192.0.2.1"], "over TCP: {d:?}");
    let d = dig(&client, &["+tcp", "TXT", "big.txt.test"])?;
    ensure!(d.answers.len() == 8 && !d.flags.contains(&"tc".to_owned()), "large answer over TCP: {d:?}");
    let d = dig(&client, &["+ignore", "TXT", "big.txt.test"])?;
    ensure!(d.flags.contains(&"tc".to_owned()), "large answer over UDP: {d:?}");

    // A container whose 127.0.0.11:53 is taken: attached all the same, the reply and
    // `meshctl status` say why it has no resolver, and it gets one once the port is free.
    let busy = cluster.add_netns("busy")?;
    let name = busy.file_name().and_then(|n| n.to_str()).context("namespace name")?.to_owned();
    meshd_tests::sh("ip", &["-n", &name, "link", "set", "lo", "up"])?;
    let squatter = meshd_tests::in_netns(&busy, || std::net::UdpSocket::bind("127.0.0.11:53"))??;
    let path = busy.to_string_lossy().into_owned();
    let reply = cluster.meshctl_json(3, &["attach", "mvcapp", "--netns", &path, "--name", "mvcapp.busy"])?;
    ensure!(reply["resolver"].is_null(), "attach reply: {reply}");
    let why = reply["resolver_error"].as_str().unwrap_or_default();
    ensure!(why.starts_with("cannot serve DNS on 127.0.0.11:53"), "attach reply: {reply}");
    let status = cluster.meshctl_json(3, &["status"])?;
    let key = format!("resolver in {path}");
    ensure!(status["dns"]["errors"][&key].is_string(), "status: {}", status["dns"]);
    ensure!(status["errors"][&key].is_string(), "status errors: {}", status["errors"]);
    drop(squatter);
    poll("the freed container gets its resolver", Duration::from_secs(5), || {
        let d = dig(&busy, &["tasks.mysql"])?;
        ensure!(d.answers.len() == 2, "{d:?}");
        let status = cluster.meshctl_json(3, &["status"])?;
        ensure!(
            status["dns"]["running"] == 3
                && status["dns"]["errors"].as_object().is_some_and(|e| e.is_empty()),
            "{}",
            status["dns"]
        );
        Ok(())
    })?;
    Ok(())
}

/// Asks `name` in `client` until `until`. Returns when the last answer that had `ip`
/// (`present`: lacked it) was asked, and when the first one without it (`present`:
/// with it) came back.
fn watch(
    client: &Path,
    name: &str,
    ip: &str,
    present: bool,
    until: Instant,
) -> Result<(Option<Instant>, Option<Instant>)> {
    let mut last_wrong = None;
    let mut first_right = None;
    let mut answered = 0;
    while Instant::now() < until {
        let asked = Instant::now();
        let Ok(d) = dig(client, &[name]) else { continue };
        answered += 1;
        if d.answers.iter().any(|a| a == ip) != present {
            last_wrong = Some(asked);
        } else if first_right.is_none() {
            first_right = Some(Instant::now());
        }
    }
    ensure!(answered >= 10, "only {answered} answers while watching {name}");
    Ok((last_wrong, first_right))
}

#[test]
fn churn_on_other_nodes_shows_within_a_second() -> Result<()> {
    let cluster = cluster()?;
    ok(&cluster, 1, &["network", "create", "appnet", "--subnet", "10.0.1.0/24"])?;
    ok(&cluster, 1, &["service", "create", "mvcapp", "--network", "appnet"])?;
    ok(&cluster, 1, &["service", "create", "probe", "--network", "appnet"])?;
    let (client, _) = attach(&cluster, 3, "probe", "probe.1")?;
    let mut worst_attach = Duration::ZERO;
    let mut worst_detach = Duration::ZERO;
    for round in 0..4 {
        let node = 1 + round % 2;
        let task = format!("mvcapp.r{round}");
        let (task_ns, reply) = attach(&cluster, node, "mvcapp", &task)?;
        ensure!(reply["resolver"] == "127.0.0.11:53", "attach reply: {reply}");
        let ip = ip_of(&reply)?;
        // From the moment `service ps` on the querying node shows it...
        let shown = poll(&format!("n3 lists {task}"), Duration::from_secs(10), || {
            let rows = cluster.meshctl_json(3, &["service", "ps", "mvcapp"])?;
            let listed = rows.as_array().into_iter().flatten().any(|r| r["task"] == task.as_str());
            listed.then(Instant::now).ok_or_else(|| anyhow!("not yet: {rows}"))
        })?;
        // ...the name answers with it within a second.
        let found = poll(&format!("tasks.mvcapp has {ip}"), Duration::from_secs(5), || {
            let d = dig(&client, &["tasks.mvcapp"])?;
            d.answers.contains(&ip).then(Instant::now).ok_or_else(|| anyhow!("{d:?}"))
        })?;
        let took = found.saturating_duration_since(shown);
        worst_attach = worst_attach.max(took);
        ensure!(took <= Duration::from_secs(1), "{task} answered {took:?} after n3 listed it");

        let detached = Instant::now();
        cluster.meshctl_ok(node, &["detach", &task])?;
        // Query for 2 s: no answer asked more than 1 s after the detach has the IP.
        let (last, clean) = watch(&client, "tasks.mvcapp", &ip, false, detached + Duration::from_secs(2))?;
        if let Some(last) = last {
            let after = last.saturating_duration_since(detached);
            worst_detach = worst_detach.max(after);
            ensure!(
                after <= Duration::from_secs(1),
                "{task} ({ip}) still answered {after:?} after its detach"
            );
        }
        // The detached container's own resolver is shut down with it.
        poll(&format!("{task}'s resolver stops"), Duration::from_secs(3), || {
            match dig(&task_ns, &["tasks.mvcapp"]) {
                Ok(d) => bail!("still answers: {d:?}"),
                Err(_) => Ok(()),
            }
        })?;
        eprintln!(
            "round {round}: attach: listed->answered {took:?}; detach: command started->last answer with it {:?}, ->first answer without it {:?}",
            last.map(|l| l.saturating_duration_since(detached)),
            clean.map(|l| l.saturating_duration_since(detached))
        );
    }
    eprintln!("worst: attach {worst_attach:?}, detach {worst_detach:?}");
    Ok(())
}

#[test]
fn a_dead_nodes_tasks_vanish_and_return_with_it() -> Result<()> {
    let mut cluster = cluster()?;
    ok(&cluster, 1, &["network", "create", "appnet", "--subnet", "10.0.1.0/24"])?;
    ok(&cluster, 1, &["service", "create", "mvcapp", "--network", "appnet"])?;
    let (_, one) = attach(&cluster, 1, "mvcapp", "mvcapp.1")?;
    let (_, two) = attach(&cluster, 2, "mvcapp", "mvcapp.2")?;
    let (client, _) = attach(&cluster, 3, "mvcapp", "mvcapp.3")?;
    let (one, two) = (ip_of(&one)?, ip_of(&two)?);
    poll("tasks.mvcapp has n2's task", Duration::from_secs(10), || {
        let d = dig(&client, &["tasks.mvcapp"])?;
        ensure!(d.answers.contains(&two) && d.answers.contains(&one), "{d:?}");
        Ok(())
    })?;

    cluster.kill_node(2)?;
    let dead = poll("n3 declares n2 dead", Duration::from_secs(30), || {
        let state = cluster.member_state(3, 2)?;
        (state == "dead").then(Instant::now).ok_or_else(|| anyhow!("n2 is {state}"))
    })?;
    let gone = poll("n2's task leaves tasks.mvcapp", Duration::from_secs(5), || {
        let d = dig(&client, &["tasks.mvcapp"])?;
        ensure!(!d.answers.contains(&two) && d.answers.contains(&one), "{d:?}");
        Ok(Instant::now())
    })?;
    let took = gone.saturating_duration_since(dead);
    eprintln!("n2's task left the answers {took:?} after n3 saw n2 dead");
    ensure!(took <= Duration::from_secs(2), "n2's task left the answers {took:?} after n2 was dead");
    ensure!(!dig(&client, &["mvcapp.2"])?.status.is_empty());
    let d = dig(&client, &["mvcapp.2"])?;
    ensure!(d.answers.is_empty(), "a suspended task's name: {d:?}");

    cluster.restart_node(2)?;
    poll("n2's task returns to tasks.mvcapp", Duration::from_secs(30), || {
        let d = dig(&client, &["tasks.mvcapp"])?;
        ensure!(d.answers.contains(&two), "{d:?}");
        Ok(())
    })?;
    ensure!(dig(&client, &["mvcapp.2"])?.answers == [two]);
    Ok(())
}

#[test]
fn a_resolver_answers_again_after_meshd_is_killed_and_restarted() -> Result<()> {
    let mut cluster = cluster()?;
    ok(&cluster, 1, &["network", "create", "appnet", "--subnet", "10.0.1.0/24"])?;
    ok(&cluster, 1, &["service", "create", "mvcapp", "--network", "appnet"])?;
    let (_, one) = attach(&cluster, 1, "mvcapp", "mvcapp.1")?;
    let (client, _) = attach(&cluster, 3, "mvcapp", "mvcapp.3")?;
    let one = ip_of(&one)?;
    poll("tasks.mvcapp answers on n3", Duration::from_secs(10), || {
        let d = dig(&client, &["tasks.mvcapp"])?;
        ensure!(d.answers.contains(&one), "{d:?}");
        Ok(())
    })?;

    let killed = Instant::now();
    cluster.kill_node(3)?;
    // The sockets died with the process: nothing answers until meshd is back.
    if let Ok(d) = dig(&client, &["tasks.mvcapp"]) {
        bail!("answered with meshd killed: {d:?}");
    }
    let restarted = Instant::now();
    cluster.restart_node(3)?;
    let back = poll("the resolver answers after the restart", Duration::from_secs(20), || {
        let d = dig(&client, &["tasks.mvcapp"])?;
        ensure!(d.answers.contains(&one), "{d:?}");
        Ok(Instant::now())
    })
    .map_err(|e| e.context(cluster.log_tail(3, 40)))?;
    eprintln!(
        "DNS down for {:?} in total; answering {:?} after meshd was started again",
        back - killed,
        back - restarted
    );
    let status = cluster.meshctl_json(3, &["status"])?;
    ensure!(status["dns"]["running"] == 1, "status: {}", status["dns"]);

    // The container goes away (`ip netns del`): the resolver's sockets must not keep
    // its namespace, and so the task, alive.
    let ns = client.file_name().and_then(|n| n.to_str()).context("namespace name")?.to_owned();
    meshd_tests::sh("ip", &["netns", "del", &ns])?;
    poll("the deleted container's task and resolver are gone", Duration::from_secs(10), || {
        let status = cluster.meshctl_json(3, &["status"])?;
        let rows = cluster.meshctl_json(3, &["service", "ps", "mvcapp"])?;
        let listed = rows.as_array().into_iter().flatten().any(|r| r["task"] == "mvcapp.3");
        ensure!(status["dns"]["running"] == 0 && !listed, "{} {rows}", status["dns"]);
        Ok(())
    })?;
    Ok(())
}

#[test]
fn a_bad_dns_flag_is_refused_before_anything_is_created() -> Result<()> {
    let dir = PathBuf::from(meshd_tests::RUN_DIR).join(format!("mt{}x-dnsflags", std::process::id()));
    for (flag, value, says) in [
        ("--dns-upstream", "nameserver", "invalid --dns-upstream \"nameserver\": use IP or IP:PORT"),
        ("--dns-ttl", "100000", "invalid --dns-ttl 100000: use 0 to 86400 seconds"),
        ("--dns-upstream-timeout-ms", "0", "invalid --dns-upstream-timeout-ms 0: use 1 to 60000"),
        ("--dns-max-forwards", "0", "invalid --dns-max-forwards 0: use 1 to 32768"),
    ] {
        meshd_tests::assert_flag_refused(&dir, flag, value, says)?;
    }
    Ok(())
}
