//! DNS benchmark: `dnsperf` against meshd's embedded resolver (the dataplane library
//! serving 127.0.0.11:53 in a namespace, on a 2-worker tokio runtime like meshd's) and
//! against dnsmasq serving the same names from a hosts file, in the same namespace,
//! with the same client settings. A closed-loop client (one query outstanding) gives
//! each server's latency percentiles.
//!
//! `make bench ONLY=dns` runs it alone; it writes its table to `benches/results/dns.md`
//! and README.md. `MESHD_DNS_SECONDS` sets the throughput run length (default 5). The
//! resolver is not wired into meshd's control side yet (issue #5): this measures the
//! dataplane library that meshd will run.

use std::{fs, net::Ipv4Addr, path::Path};

use anyhow::{bail, Context as _, Result};
use hickory_proto::{
    op::{Message, Query},
    rr::{Name, RecordType},
};
use hickory_server::{
    net::runtime::Time,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
    Server,
};
use meshd_benches::{in_ns, write_results, Row};
use meshd_dataplane::dns::{
    answer, open_in_netns, Action, AnswerConfig, NameIndex, NameTable, Resolver, ResolverConfig, TableHandle,
    Transport, RESOLVER_ADDR,
};
use meshd_tests::dnslab::DnsLab;

/// Throughput runs per server (alternating).
const ROUNDS: usize = 3;

/// Queries both servers are asked, round-robin (each answered locally by both).
const QUERIES: &str = "web A\napi A\ntasks.web A\nweb.1 A\nweb.front A\nweb AAAA\n";

/// The same names as a hosts file for dnsmasq (`api` and `tasks.web` with every task).
const HOSTS: &str = "10.0.1.2 web web.front\n10.0.1.20 api\n10.0.1.21 api\n10.0.1.22 api\n\
10.0.1.10 tasks.web web.1\n10.0.1.11 tasks.web\n";

/// The DNS tests' sample table (the names in `QUERIES` and `HOSTS` among them).
fn table() -> NameTable {
    meshd_tests::dnslab::sample_table(0)
}

/// dnsperf's summary: queries/s, mean latency (ms), lost queries.
fn throughput(ns: &str, server: &str, data: &Path, seconds: &str) -> Result<(f64, f64, u64)> {
    let out = in_ns(
        ns,
        "dnsperf",
        &["-s", server, "-d", &data.to_string_lossy(), "-l", seconds, "-c", "4", "-q", "100"],
    )?;
    let field = |label: &str| -> Result<String> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("no `{label}` in dnsperf output:\n{out}"))
    };
    let qps: f64 = field("Queries per second:")?.parse()?;
    let mean: f64 = field("Average Latency (s):")?.split_whitespace().next().unwrap_or("0").parse()?;
    let lost: u64 = field("Queries lost:")?.split_whitespace().next().unwrap_or("0").parse()?;
    Ok((qps, mean * 1000.0, lost))
}

/// Closed-loop latency samples per server.
const LATENCY_SAMPLES: usize = 20_000;

/// p50/p99 latency (ms) with one query outstanding: a client inside the namespace sends
/// the benchmark's queries one at a time and times each reply (a stall of the shared
/// machine then delays one sample, not every query sent during it). dnsperf cannot do
/// this: with one query outstanding it waits on a coarse timer between queries.
fn percentiles(netns: &Path, server: Ipv4Addr) -> Result<(f64, f64)> {
    let queries: Vec<Vec<u8>> = QUERIES
        .lines()
        .map(|l| {
            let (name, qtype) = l.split_once(' ').unwrap_or((l, "A"));
            let mut m = Message::query();
            m.metadata.recursion_desired = true;
            let qtype = if qtype == "AAAA" { RecordType::AAAA } else { RecordType::A };
            m.add_query(Query::query(Name::from_ascii(name).expect("bench name"), qtype));
            m.to_vec().expect("bench query encodes")
        })
        .collect();
    let mut samples = meshd_tests::in_netns(netns, move || -> std::io::Result<Vec<f64>> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        socket.connect((server, 53))?;
        socket.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
        let mut buf = [0u8; 1500];
        let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
        for i in 0..LATENCY_SAMPLES {
            let query = &queries[i % queries.len()];
            let started = std::time::Instant::now();
            socket.send(query)?;
            socket.recv(&mut buf)?;
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(samples)
    })??;
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    Ok((at(0.50), at(0.99)))
}

/// The same answers served through hickory-server's request path (its UDP loop, a
/// task per request, its request decoding and response encoding). The handler reuses
/// the resolver's `answer` on the raw request and re-parses the reply into records —
/// one extra parse, small next to what the server path itself costs.
struct HickoryHandler {
    index: NameIndex,
    networks: Vec<String>,
    config: AnswerConfig,
}

#[async_trait::async_trait]
impl RequestHandler for HickoryHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let action = answer(
            &self.index,
            &self.networks,
            request.as_slice(),
            Transport::Udp,
            &self.config,
            &mut rand::thread_rng(),
        );
        let Action::Reply(bytes) = action else { panic!("bench names are all local") };
        let reply = Message::from_vec(&bytes).expect("our reply parses");
        let built = MessageResponseBuilder::from_message_request(request).build(
            reply.metadata,
            reply.answers.iter(),
            [].iter(),
            [].iter(),
            [].iter(),
        );
        response.send_response(built).await.expect("hickory-server sends the reply")
    }
}

fn main() -> Result<()> {
    let seconds = std::env::var("MESHD_DNS_SECONDS").unwrap_or_else(|_| "5".into());
    let mut lab = DnsLab::new(&["127.0.0.53", "127.0.0.12"])?;
    let dir = tempdir(&lab.ns)?;
    let hosts = dir.join("hosts");
    let data = dir.join("queries");
    fs::write(&hosts, HOSTS)?;
    fs::write(&data, QUERIES)?;
    lab.start_dnsmasq(
        "127.0.0.53",
        &[&format!("--addn-hosts={}", hosts.display()), "--local-ttl=5", "--dns-forward-max=1000"],
        "web",
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let sockets = open_in_netns(&lab.netns(), RESOLVER_ADDR, None)?;
    let resolver = {
        let _guard = rt.enter();
        Resolver::start(
            &lab.netns(),
            sockets,
            TableHandle::new(&table()),
            vec!["front".into()],
            ResolverConfig::default(),
        )?
    };
    let hickory_addr = std::net::SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 12), 53);
    let hickory_sockets = open_in_netns(&lab.netns(), hickory_addr, None)?;
    let _hickory = {
        let _guard = rt.enter();
        let handler = HickoryHandler {
            index: NameIndex::build(&table()),
            networks: vec!["front".into()],
            config: AnswerConfig::default(),
        };
        let mut server = Server::new(handler);
        server.register_socket(tokio::net::UdpSocket::from_std(hickory_sockets.udp)?);
        server
    };
    // All must answer the same names before they are compared.
    for server in ["127.0.0.11", "127.0.0.53", "127.0.0.12"] {
        for name in ["web", "api", "tasks.web", "web.1", "web.front"] {
            let d = lab.dig(&[&format!("@{server}"), name])?;
            if d.answers.is_empty() {
                bail!("{server} does not answer {name}: {d:?}");
            }
        }
    }
    // Alternate the servers over several rounds and keep each one's median: the
    // machine is shared, and a burst of other load should hit both alike.
    let servers = [
        ("dnsmasq", "127.0.0.53", true),
        ("meshd resolver", "127.0.0.11", false),
        ("hickory-server, same answers", "127.0.0.12", false),
    ];
    let mut runs: Vec<Vec<(f64, f64, u64)>> = vec![Vec::new(); servers.len()];
    for _ in 0..ROUNDS {
        for (i, (_, server, _)) in servers.iter().enumerate() {
            runs[i].push(throughput(&lab.ns, server, &data, &seconds)?);
        }
    }
    let mut rows = Vec::new();
    for ((path, server, baseline), mut samples) in servers.into_iter().zip(runs) {
        samples.sort_by(|a, b| a.0.total_cmp(&b.0));
        let all: Vec<String> = samples.iter().map(|s| format!("{:.0}", s.0)).collect();
        let (qps, mean, lost) = samples[samples.len() / 2];
        let (p50, p99) = percentiles(&lab.netns(), server.parse()?)?;
        rows.push(Row {
            group: "DNS (dnsperf -c4 -q100)".into(),
            path: path.into(),
            value: qps,
            unit: "q/s".into(),
            detail: format!(
                "median of {ROUNDS} ({}); mean {mean:.3} ms, lost {lost}; one outstanding: p50 {p50:.3} ms, p99 {p99:.3} ms",
                all.join(", ")
            ),
            baseline,
        });
    }
    rt.block_on(resolver.shutdown());
    println!("{}", write_results("dns", "Embedded DNS resolver", &rows)?);
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

fn tempdir(label: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("meshd-dnsbench-{label}"));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}
