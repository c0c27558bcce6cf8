//! VIPs without BPF: nftables DNAT inside each container's network namespace.
//!
//! Where the socket load balancer cannot run (no cgroup v2, no BPF), the same
//! frontends are served by one nftables table owned by meshd, `table ip meshd`, in the
//! container's namespace — the way kube-proxy's nftables mode serves ClusterIPs. Its
//! `nat output` chain sees the container's own connects; a random backend is chosen
//! with `numgen random mod N` and a verdict map, conntrack keeps each flow on its
//! backend and translates replies, so `getpeername`/`recvfrom` show the VIP.
//!
//! Semantics follow [`crate::socklb`]:
//! - `VIP:port` with backends `addr:port` — connects go to a random backend, port
//!   rewritten (backend port 0 keeps the client's port);
//! - `VIP:0` with backends `addr:0` — any port of the VIP goes to a random backend,
//!   same port; exact `VIP:port` frontends take precedence over it;
//! - a frontend with no backends — the connect is refused (TCP reset, ICMP
//!   port-unreachable for UDP), so clients see `ECONNREFUSED` rather than a timeout;
//!   `VIP:0` with no backends refuses every port of the VIP no exact frontend serves.
//!
//! The `0.0.0.0:port` (published port) form is not served here: without BPF the proxy
//! serves published ports. Unlike the socket LB, unconnected UDP picks a backend per
//! conntrack flow (same 5-tuple), not per datagram.
//!
//! ## For control
//! - At start, when the socket LB cannot open: [`probe`] once; log once what is missing
//!   for BPF and that VIPs are served by this path (or, if `probe` fails too, its error).
//! - Each reconcile, per attached container: `observe(netns)`; when it differs from the
//!   desired frontends for the container's networks, `apply(netns, &desired)` (it
//!   always writes the whole table, so compare first to avoid needless `nft` runs).
//! - Detach needs nothing (the namespace goes away with its table); `meshd --cleanup`
//!   on a namespace that stays: [`remove`].
//! - Caveats: a UDP send to a refused VIP port fails with `EPERM` (the output hook
//!   dropped it) and the next `recv` on a connected socket with `ECONNREFUSED`;
//!   established flows keep their backend after it is removed, until they close or
//!   conntrack forgets them.
//!
//! ## Mechanism
//! Every [`apply`] writes the whole table in one `nft -f -` transaction (create,
//! delete, re-create), so a reader never sees a half-written service and other tables
//! are never touched. `nft` runs in the namespace (spawned from a thread that entered
//! it) and is killed after [`NFT_TIMEOUT`]. [`observe`] reads the table back through
//! `nft -j`. Netlink directly (e.g. the `rustables` crate) would avoid the process,
//! but the whole-table atomic replace with numgen, verdict maps and NAT is what `nft`
//! already does in one batch; a connect never waits on it, only reconciles do.
//!
//! ## Table layout
//! ```text
//! table ip meshd {
//!   map exact { ipv4_addr . inet_proto . inet_service : verdict }  # VIP:port -> goto fe-N
//!   map vips  { ipv4_addr . inet_proto : verdict }                 # VIP:0    -> goto fe-N
//!   map guard_exact / guard_vips                                   # served: accept, empty: goto refuse
//!   chain guard  { type filter hook output priority -110; ... }   # refusals, before NAT
//!   chain output { type nat hook output priority -100; ... }      # exact first, then VIP:0
//!   chain fe-N   { numgen random mod K vmap { 0 : goto be-N-0, ... } }
//!   chain be-N-J { [meta l4proto tcp] dnat to ADDR[:PORT] }
//!   chain refuse { reject with tcp reset; reject }
//! }
//! ```

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    socklb::{Backend, Frontend, Proto},
    Error, Result,
};

/// How long one `nft` call may take before it is killed.
pub const NFT_TIMEOUT: Duration = Duration::from_secs(5);

/// The table meshd owns in each namespace (family `ip`).
pub const TABLE: &str = "meshd";

/// Checks that this node can serve VIPs through nftables: the `nft` binary runs and
/// the kernel accepts a table using everything [`apply`] uses (NAT, numgen, verdict
/// maps, reject). Nothing is changed (`nft --check`).
pub fn probe() -> Result<()> {
    let mut sample = BTreeMap::new();
    let vip = Ipv4Addr::new(192, 0, 2, 1);
    sample.insert(
        Frontend { addr: vip, port: 80, proto: Proto::Tcp },
        vec![Backend { addr: Ipv4Addr::new(192, 0, 2, 2), port: 8080 }],
    );
    sample.insert(Frontend { addr: vip, port: 0, proto: Proto::Udp }, Vec::new());
    let script = render(&sample)?;
    run_nft(None, &["--check", "-f", "-"], Some(&script)).map_err(|e| match e {
        Error::Netlink { message, .. } => Error::Netlink {
            command: "nft --check -f - (meshd's VIP table)".into(),
            message: format!(
                "{message}; the kernel lacks nf_tables NAT support: load the modules \
                 (`modprobe nf_tables nft_chain_nat nft_numgen nft_reject_ipv4`) or use a \
                 kernel built with CONFIG_NF_TABLES, CONFIG_NFT_NAT, CONFIG_NFT_NUMGEN, \
                 CONFIG_NFT_REJECT"
            ),
        },
        other => other,
    })?;
    Ok(())
}

/// Replaces meshd's table in the namespace at `netns` with one serving `frontends`,
/// in one transaction. Other tables are untouched.
pub fn apply(netns: &Path, frontends: &BTreeMap<Frontend, Vec<Backend>>) -> Result<()> {
    let script = render(frontends)?;
    run_nft(Some(netns), &["-f", "-"], Some(&script))?;
    Ok(())
}

/// Reads back what meshd's table in `netns` serves; empty when there is no table.
/// Backends come in the order [`apply`] was given them.
pub fn observe(netns: &Path) -> Result<BTreeMap<Frontend, Vec<Backend>>> {
    // Listing all tables first tells "no table" (empty result) from a failure.
    let tables = run_nft(Some(netns), &["-j", "list", "tables", "ip"], None)?;
    if !has_table(&parse_json(&tables)?) {
        return Ok(BTreeMap::new());
    }
    let json = run_nft(Some(netns), &["-j", "list", "table", "ip", TABLE], None)?;
    parse(&parse_json(&json)?)
}

/// Deletes meshd's table from the namespace at `netns` (nothing else); a namespace
/// without it is left as is.
pub fn remove(netns: &Path) -> Result<()> {
    // Creating it first makes the delete succeed when it is absent, in one batch.
    let script = format!("table ip {TABLE}\ndelete table ip {TABLE}\n");
    run_nft(Some(netns), &["-f", "-"], Some(&script))?;
    Ok(())
}

/// The `nft -f` script that atomically replaces meshd's table with one serving
/// `frontends`. Errors on forms this path does not serve.
pub fn render(frontends: &BTreeMap<Frontend, Vec<Backend>>) -> Result<String> {
    let mut exact = Vec::new();
    let mut vips = Vec::new();
    let mut guard_exact = Vec::new();
    let mut guard_vips = Vec::new();
    let mut chains = String::new();
    for (n, (fe, backends)) in frontends.iter().enumerate() {
        check(fe, backends)?;
        let proto = proto_name(fe.proto);
        let key = if fe.port == 0 {
            format!("{} . {proto}", fe.addr)
        } else {
            format!("{} . {proto} . {}", fe.addr, fe.port)
        };
        let (nat, guard) =
            if fe.port == 0 { (&mut vips, &mut guard_vips) } else { (&mut exact, &mut guard_exact) };
        if backends.is_empty() {
            guard.push(format!("{key} : goto refuse"));
            continue;
        }
        nat.push(format!("{key} : goto fe-{n}"));
        if fe.port != 0 {
            // Lets a served port through even when its VIP's `VIP:0` refuses the rest.
            guard.push(format!("{key} : accept"));
        }
        let picks: Vec<String> = (0..backends.len()).map(|j| format!("{j} : goto be-{n}-{j}")).collect();
        let _ = writeln!(
            chains,
            "  chain fe-{n} {{\n    numgen random mod {} vmap {{ {} }}\n  }}",
            backends.len(),
            picks.join(", ")
        );
        for (j, be) in backends.iter().enumerate() {
            let dnat = if be.port == 0 {
                format!("dnat to {}", be.addr)
            } else {
                format!("meta l4proto {proto} dnat to {}:{}", be.addr, be.port)
            };
            let _ = writeln!(chains, "  chain be-{n}-{j} {{\n    {dnat}\n  }}");
        }
    }
    let map = |name: &str, ty: &str, elements: &[String]| {
        let elements = if elements.is_empty() {
            String::new()
        } else {
            format!("\n    elements = {{ {} }}", elements.join(", "))
        };
        format!("  map {name} {{\n    type {ty} : verdict{elements}\n  }}\n")
    };
    let mut s = String::new();
    // Declaring the table first makes `delete` succeed on a fresh namespace; the
    // three commands are one transaction, so readers see the old or the new table.
    let _ = writeln!(s, "table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{");
    s.push_str(&map("exact", "ipv4_addr . inet_proto . inet_service", &exact));
    s.push_str(&map("vips", "ipv4_addr . inet_proto", &vips));
    s.push_str(&map("guard_exact", "ipv4_addr . inet_proto . inet_service", &guard_exact));
    s.push_str(&map("guard_vips", "ipv4_addr . inet_proto", &guard_vips));
    s.push_str("  chain refuse {\n    meta l4proto tcp reject with tcp reset\n    reject\n  }\n");
    // Priority -110 runs before NAT (-100), so a refusal is decided on the VIP itself.
    s.push_str(
        "  chain guard {\n    type filter hook output priority -110; policy accept;\n    \
         ip daddr . meta l4proto . th dport vmap @guard_exact\n    \
         ip daddr . meta l4proto vmap @guard_vips\n  }\n",
    );
    s.push_str(
        "  chain output {\n    type nat hook output priority -100; policy accept;\n    \
         ip daddr . meta l4proto . th dport vmap @exact\n    \
         ip daddr . meta l4proto vmap @vips\n  }\n",
    );
    s.push_str(&chains);
    s.push_str("}\n");
    Ok(s)
}

/// Rejects frontends the nftables path cannot express.
fn check(fe: &Frontend, backends: &[Backend]) -> Result<()> {
    if fe.addr.is_unspecified() {
        return Err(Error::Config {
            setting: "VIP frontend",
            message: format!(
                "{}:{} ({:?}) is a published port; without BPF the proxy serves published ports, \
                 not the nftables VIP table — do not pass 0.0.0.0 frontends to natlb",
                fe.addr, fe.port, fe.proto
            ),
        });
    }
    if fe.port == 0 {
        if let Some(be) = backends.iter().find(|b| b.port != 0) {
            return Err(Error::Config {
                setting: "VIP frontend",
                message: format!(
                    "{}:0 ({:?}) keeps the client's port, but backend {}:{} names a port; use port 0",
                    fe.addr, fe.proto, be.addr, be.port
                ),
            });
        }
    }
    Ok(())
}

fn proto_name(proto: Proto) -> &'static str {
    match proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

fn proto_from(name: &str) -> Option<Proto> {
    match name {
        "tcp" => Some(Proto::Tcp),
        "udp" => Some(Proto::Udp),
        _ => None,
    }
}

fn parse_json(text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| unreadable(format!("nft -j printed invalid JSON: {e}")))
}

fn unreadable(message: String) -> Error {
    Error::Netlink { command: format!("nft -j list table ip {TABLE}"), message }
}

/// Whether `nft -j list tables ip` output lists meshd's table.
fn has_table(json: &Value) -> bool {
    objects(json).any(|(kind, obj)| kind == "table" && obj["name"] == TABLE && obj["family"] == "ip")
}

/// The `{kind: object}` entries of an `nft -j` listing.
fn objects(json: &Value) -> impl Iterator<Item = (&str, &Value)> {
    json["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.as_object()?.iter().next().map(|(k, v)| (k.as_str(), v)))
}

/// Reads frontends and backends back from `nft -j list table ip meshd` output.
pub fn parse(json: &Value) -> Result<BTreeMap<Frontend, Vec<Backend>>> {
    let mut maps: BTreeMap<&str, &Value> = BTreeMap::new();
    let mut rules: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for (kind, obj) in objects(json) {
        match kind {
            "map" => {
                if let Some(name) = obj["name"].as_str() {
                    maps.insert(name, obj);
                }
            }
            "rule" => {
                if let Some(chain) = obj["chain"].as_str() {
                    rules.entry(chain).or_default().push(&obj["expr"]);
                }
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    for name in ["exact", "vips", "guard_exact", "guard_vips"] {
        let Some(map) = maps.get(name) else { continue };
        for elem in map["elem"].as_array().into_iter().flatten() {
            let fe = frontend_of(&elem[0])
                .ok_or_else(|| unreadable(format!("map {name}: bad key {}", elem[0])))?;
            let target = elem[1]["goto"]["target"].as_str();
            match (name, target) {
                ("guard_exact" | "guard_vips", Some("refuse")) => {
                    out.insert(fe, Vec::new());
                }
                ("exact" | "vips", Some(chain)) => {
                    let backends = backends_of(chain, &rules)?;
                    out.insert(fe, backends);
                }
                // `accept` in the guard map mirrors an entry of `exact`.
                _ => {}
            }
        }
    }
    Ok(out)
}

fn frontend_of(key: &Value) -> Option<Frontend> {
    let parts = key["concat"].as_array()?;
    let addr: Ipv4Addr = parts.first()?.as_str()?.parse().ok()?;
    let proto = proto_from(parts.get(1)?.as_str()?)?;
    let port = match parts.get(2) {
        Some(p) => u16::try_from(p.as_u64()?).ok()?,
        None => 0,
    };
    Some(Frontend { addr, port, proto })
}

/// Follows `fe-N`'s numgen map to its `be-N-J` chains, in pick order.
fn backends_of(chain: &str, rules: &BTreeMap<&str, Vec<&Value>>) -> Result<Vec<Backend>> {
    let bad = |what: &str| unreadable(format!("chain {chain}: {what}"));
    let expr = rules.get(chain).and_then(|r| r.first()).ok_or_else(|| bad("missing"))?;
    let picks = expr
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|e| e["vmap"]["data"]["set"].as_array())
        .ok_or_else(|| bad("no numgen map"))?;
    let mut indexed = Vec::new();
    for pick in picks {
        let index = pick[0].as_u64().ok_or_else(|| bad("bad pick index"))?;
        let target = pick[1]["goto"]["target"].as_str().ok_or_else(|| bad("bad pick target"))?;
        let dnat = rules
            .get(target)
            .and_then(|r| r.first())
            .and_then(|e| e.as_array())
            .into_iter()
            .flatten()
            .find_map(|e| e.get("dnat"))
            .ok_or_else(|| bad("backend chain without dnat"))?;
        let addr: Ipv4Addr =
            dnat["addr"].as_str().and_then(|a| a.parse().ok()).ok_or_else(|| bad("bad dnat address"))?;
        let port = match dnat.get("port") {
            Some(p) => p.as_u64().and_then(|p| u16::try_from(p).ok()).ok_or_else(|| bad("bad dnat port"))?,
            None => 0,
        };
        indexed.push((index, Backend { addr, port }));
    }
    indexed.sort_by_key(|(i, _)| *i);
    Ok(indexed.into_iter().map(|(_, b)| b).collect())
}

/// Runs `nft args` (in `netns` if given) with `stdin`, killed after [`NFT_TIMEOUT`];
/// returns its stdout.
fn run_nft(netns: Option<&Path>, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let command = match netns {
        Some(ns) => format!("nft {} (in {})", args.join(" "), ns.display()),
        None => format!("nft {}", args.join(" ")),
    };
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    // The child inherits the namespace of the thread that forks it; a thread of our
    // own enters it, so the process's other threads stay where they are.
    let outcome = match netns {
        Some(ns) => crate::netns::run_in(ns, || spawn_bounded(&args, stdin))??,
        None => spawn_bounded(&args, stdin)?,
    };
    if !outcome.status.success() {
        return Err(Error::Netlink {
            command,
            message: String::from_utf8_lossy(&outcome.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&outcome.stdout).into_owned())
}

/// Spawns `nft`, feeds it `stdin`, and waits at most [`NFT_TIMEOUT`].
fn spawn_bounded(args: &[String], stdin: Option<&str>) -> Result<std::process::Output> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            let what = if e.kind() == std::io::ErrorKind::NotFound {
                "running nft: not found; install the nftables package (`make bootstrap`)"
            } else {
                "running nft"
            };
            Error::io(what, e)
        })?;
    // The script is written from its own thread too: a large table exceeds a pipe
    // buffer, and a stalled nft must not block the write past the deadline below. A
    // failed write shows up as nft's own error.
    let writer = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => {
            let text = text.to_owned();
            Some(std::thread::spawn(move || {
                let _ = pipe.write_all(text.as_bytes());
            }))
        }
        _ => None,
    };
    // Readers on their own threads: a full stdout pipe must not stall the child.
    let mut out = child.stdout.take().expect("stdout is piped");
    let mut err = child.stderr.take().expect("stderr is piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + NFT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| Error::io("waiting for nft", e))? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::io(
                format!("nft {}", args.join(" ")),
                std::io::Error::other(format!(
                    "no answer within {} s (killed); check `nft list ruleset` by hand",
                    NFT_TIMEOUT.as_secs()
                )),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(std::process::Output { status, stdout, stderr })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fe(addr: [u8; 4], port: u16, proto: Proto) -> Frontend {
        Frontend { addr: Ipv4Addr::from(addr), port, proto }
    }

    fn be(addr: [u8; 4], port: u16) -> Backend {
        Backend { addr: Ipv4Addr::from(addr), port }
    }

    #[test]
    fn render_names_every_form() {
        let mut f = BTreeMap::new();
        f.insert(fe([10, 99, 0, 1], 80, Proto::Tcp), vec![be([10, 0, 0, 1], 8080), be([10, 0, 0, 2], 8080)]);
        f.insert(fe([10, 99, 0, 1], 0, Proto::Tcp), Vec::new());
        f.insert(fe([10, 99, 0, 2], 0, Proto::Udp), vec![be([10, 0, 0, 3], 0)]);
        let s = render(&f).unwrap();
        assert!(s.starts_with("table ip meshd\ndelete table ip meshd\ntable ip meshd {"), "{s}");
        assert!(s.contains("10.99.0.1 . tcp . 80 : goto fe-1"), "{s}");
        assert!(s.contains("10.99.0.1 . tcp . 80 : accept"), "{s}");
        assert!(s.contains("10.99.0.1 . tcp : goto refuse"), "{s}");
        assert!(s.contains("10.99.0.2 . udp : goto fe-2"), "{s}");
        assert!(s.contains("numgen random mod 2 vmap { 0 : goto be-1-0, 1 : goto be-1-1 }"), "{s}");
        assert!(s.contains("meta l4proto tcp dnat to 10.0.0.2:8080"), "{s}");
        assert!(s.contains("dnat to 10.0.0.3\n"), "{s}");
    }

    #[test]
    fn render_refuses_forms_it_cannot_serve() {
        let mut f = BTreeMap::new();
        f.insert(fe([0, 0, 0, 0], 8080, Proto::Tcp), vec![be([10, 0, 0, 1], 80)]);
        assert!(render(&f).unwrap_err().to_string().contains("published port"));
        let mut f = BTreeMap::new();
        f.insert(fe([10, 99, 0, 1], 0, Proto::Tcp), vec![be([10, 0, 0, 1], 80)]);
        assert!(render(&f).unwrap_err().to_string().contains("use port 0"));
    }

    #[test]
    fn parse_reads_nft_json() {
        // Shape as printed by `nft -j list table ip meshd` (nftables 1.0.6).
        let json: Value = serde_json::from_str(
            r#"{"nftables": [
            {"map": {"name": "exact", "elem": [[{"concat": ["10.99.0.1", "tcp", 80]}, {"goto": {"target": "fe-0"}}]]}},
            {"map": {"name": "guard_exact", "elem": [[{"concat": ["10.99.0.1", "tcp", 80]}, {"accept": null}]]}},
            {"map": {"name": "guard_vips", "elem": [[{"concat": ["10.99.0.2", "udp"]}, {"goto": {"target": "refuse"}}]]}},
            {"rule": {"chain": "fe-0", "expr": [{"vmap": {"key": {"numgen": {"mode": "random", "mod": 2}},
                "data": {"set": [[1, {"goto": {"target": "be-0-1"}}], [0, {"goto": {"target": "be-0-0"}}]]}}}]}},
            {"rule": {"chain": "be-0-0", "expr": [{"match": {}}, {"dnat": {"addr": "10.0.0.1", "port": 8080}}]}},
            {"rule": {"chain": "be-0-1", "expr": [{"dnat": {"addr": "10.0.0.2"}}]}}
            ]}"#,
        )
        .unwrap();
        let got = parse(&json).unwrap();
        let mut want = BTreeMap::new();
        want.insert(fe([10, 99, 0, 1], 80, Proto::Tcp), vec![be([10, 0, 0, 1], 8080), be([10, 0, 0, 2], 0)]);
        want.insert(fe([10, 99, 0, 2], 0, Proto::Udp), Vec::new());
        assert_eq!(got, want);
    }
}
