//! The Prometheus endpoint (`meshd --metrics-addr`, default 127.0.0.1:9946 in the node's
//! namespace), scraped with `curl` as Prometheus would: the exposition parses, the
//! proxy's per-port and per-backend counters move by what the client did, a task's
//! health shows, only GET /metrics is served, and `off` or a bad address do what they say.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, process::Command, time::Duration};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use meshd_tests::{http_get, node_addr, poll, Cluster, StartOptions};

/// `curl ARGS http://127.0.0.1:9946/PATH` inside `netns`: (HTTP status, body).
fn curl(netns: &Path, path: &str, args: &[&str]) -> Result<(u16, String)> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["--", "curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}"])
        .args(args)
        .arg(format!("http://127.0.0.1:9946{path}"))
        .output()
        .context("running curl (install it with `make bootstrap`)")?;
    ensure!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let (body, code) = text.rsplit_once('\n').ok_or_else(|| anyhow!("no status from curl"))?;
    Ok((code.trim().parse()?, body.to_owned()))
}

/// Parses an exposition: every line a `#` comment or `NAME[{LABELS}] VALUE`, ending
/// with `# EOF`. Returns the samples, keyed by `NAME{LABELS}` as written.
fn parse(text: &str) -> Result<BTreeMap<String, f64>> {
    ensure!(text.ends_with("# EOF\n"), "the exposition does not end with # EOF");
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| anyhow!("no value in {line:?}"))?;
        let name = series.split('{').next().unwrap_or_default();
        ensure!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        ensure!(series.contains('{') == series.ends_with('}'), "unbalanced labels in {line:?}");
        let value: f64 = value.parse().with_context(|| format!("bad value in {line:?}"))?;
        samples.insert(series.to_owned(), value);
    }
    Ok(samples)
}

fn scrape(cluster: &Cluster, i: usize) -> Result<BTreeMap<String, f64>> {
    let (code, body) = curl(&cluster.nodes[i - 1].netns(), "/metrics", &[])?;
    ensure!(code == 200, "GET /metrics answered {code}: {body}");
    parse(&body)
}

fn sample(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

#[test]
fn curl_gets_a_parseable_exposition_whose_counters_follow_the_traffic_and_health() -> Result<()> {
    let args = ["--xdp", "off"].map(String::from).to_vec();
    let mut cluster = Cluster::start_with(2, StartOptions { meshd_args: args, ..Default::default() })?;
    cluster.wait_all_alive(1)?;
    cluster.meshctl_ok(1, &["network", "create", "net", "--subnet", "10.0.0.0/24"])?;
    let health = ["--health-tcp", "80", "--health-interval", "500ms", "--health-timeout", "200ms"];
    cluster.meshctl_ok(1, &[&["service", "create", "web", "--network", "net"][..], &health].concat())?;
    let ip = cluster.add_container(2, "web", "web.1")?.ip;
    cluster.meshctl_ok(1, &["publish", "3000:80", "web"])?;
    cluster.wait_serving(1, "3000/tcp", 1)?;

    let port = "{port=\"3000/tcp\"}";
    let backend = format!("port=\"3000/tcp\",backend=\"{ip}:80\"");
    let before = scrape(&cluster, 1)?;
    const REQUESTS: usize = 5;
    let mut answered = 0;
    for _ in 0..REQUESTS {
        answered += http_get(&cluster.client_netns(), SocketAddr::from((node_addr(1), 3000)))?.len();
    }
    // Counted when each relay ends; the client may finish first.
    let after = poll("the counters show the requests", Duration::from_secs(5), || {
        let after = scrape(&cluster, 1)?;
        let moved = |series: &str| sample(&after, series) - sample(&before, series);
        let accepted = moved(&format!("meshd_proxy_backend_accepted_total{{{backend}}}"));
        let to_client =
            moved(&format!("meshd_proxy_backend_bytes_total{{{backend},direction=\"to_client\"}}"));
        let to_backend =
            moved(&format!("meshd_proxy_backend_bytes_total{{{backend},direction=\"to_backend\"}}"));
        let port_accepted = moved(&format!("meshd_proxy_port_accepted_total{port}"));
        ensure!(
            accepted == REQUESTS as f64 && port_accepted == REQUESTS as f64,
            "accepted {accepted}, on the port {port_accepted}, not {REQUESTS}"
        );
        // Every answer's body went to the client, and every request to the task.
        ensure!(
            to_client >= answered as f64 && to_backend > 0.0,
            "bytes: to client {to_client}, to the task {to_backend}"
        );
        ensure!(
            sample(&after, &format!("meshd_proxy_backend_connections{{{backend}}}")) == 0.0,
            "active left"
        );
        Ok(after)
    })?;
    ensure!(after.keys().any(|k| k.starts_with("meshd_gossip_")), "no gossip counters");
    ensure!(after.contains_key("meshd_proxy_tcp_accepted_total"), "no proxy totals");
    let healthy = "meshd_task_healthy{task=\"web.1\",service=\"web\",node=\"n2\"}";
    ensure!(sample(&after, healthy) == 1.0, "web.1 is not shown healthy");

    // The task's server stops: its health shows 0 on every node (from the cluster state).
    cluster.kill_server("web.1")?;
    for i in 1..=2 {
        poll(&format!("n{i} shows web.1 unhealthy"), Duration::from_secs(10), || {
            let now = scrape(&cluster, i)?;
            ensure!(now.get(healthy) == Some(&0.0), "{:?}", now.get(healthy));
            Ok(())
        })?;
    }

    // Only GET /metrics.
    let n1 = cluster.nodes[0].netns();
    ensure!(curl(&n1, "/", &[])?.0 == 404, "GET / is not a 404");
    ensure!(curl(&n1, "/metrics", &["-X", "POST", "-d", "x"])?.0 == 405, "POST is not a 405");
    Ok(())
}

#[test]
fn metrics_off_listens_on_nothing_and_a_bad_address_is_refused() -> Result<()> {
    let args = ["--metrics-addr", "off"].map(String::from).to_vec();
    let cluster = Cluster::start_with(1, StartOptions { meshd_args: args, ..Default::default() })?;
    let out = Command::new("nsenter")
        .arg(format!("--net={}", cluster.nodes[0].netns().display()))
        .args(["--", "curl", "-sS", "--max-time", "5", "http://127.0.0.1:9946/metrics"])
        .output()?;
    // curl's exit code 7: it could not connect (refused: nothing listens).
    if out.status.code() != Some(7) {
        bail!("with --metrics-addr off, curl got: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = Command::new(meshd_tests::bin_path("meshd")?)
        .args(["--node-name", "x", "--advertise-addr", "198.18.0.250", "--metrics-addr", "localhost"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && stderr.contains("\"localhost\" is not an address: use IP:PORT (e.g. 127.0.0.1:9946) or off"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn the_kernel_paths_packets_are_counted_by_outcome() -> Result<()> {
    let mut cluster = Cluster::start(2)?;
    cluster.wait_all_alive(1)?;
    cluster.publish_web(2)?;
    let path = cluster.wait_serving(1, "3000/tcp", 1)?;
    ensure!(path["remote_clients"].as_str().is_some_and(|p| p.starts_with("xdp") || p == "tc"), "{path}");
    let encap = "meshd_ingress_packets_total{outcome=\"encap\"}";
    let before = sample(&scrape(&cluster, 1)?, encap);
    for _ in 0..3 {
        ensure!(http_get(&cluster.client_netns(), SocketAddr::from((node_addr(1), 3000)))? == "web.1");
    }
    // Each request's packets to the task on n2 were encapsulated by n1's XDP program.
    let after = sample(&scrape(&cluster, 1)?, encap);
    ensure!(after - before >= 3.0, "encapsulated packets went from {before} to {after}");
    Ok(())
}
