//! A namespace for DNS tests and benchmarks: `lo` up, extra loopback addresses for
//! upstreams, a real `dnsmasq` started and killed by PID, and `dig` run inside.
//! Names carry the harness prefix `mt<pid>x<n>` so [`crate::clean_leftovers`] removes
//! what a killed run left.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::{poll, remove_prefix, sh, RUN_DIR};

/// Counter for lab prefixes, far from the cluster counter so they never meet.
static LABS: AtomicUsize = AtomicUsize::new(1000);

/// One test namespace and the processes started in it.
pub struct DnsLab {
    prefix: String,
    /// The namespace's name (`ip netns exec NAME`).
    pub ns: String,
    dir: PathBuf,
    children: Vec<Child>,
}

/// What `dig` printed, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dig {
    /// The status from the header line: NOERROR, NXDOMAIN, SERVFAIL...
    pub status: String,
    /// The header flags: qr, aa, rd, ra, tc.
    pub flags: Vec<String>,
    /// The answer section's data fields (an address, a PTR target).
    pub answers: Vec<String>,
}

/// Starts dnsmasq in the namespace at `netns`, answering on `listen:53` only, with no
/// configuration but `args` (no resolv.conf, no hosts file) and its pid in `pid_file`.
pub fn spawn_dnsmasq(
    netns: &std::path::Path,
    listen: &str,
    pid_file: &std::path::Path,
    args: &[&str],
) -> Result<Child> {
    Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["--", "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null"])
        .args(["--no-resolv", "--no-hosts", "--bind-interfaces", "--port=53", "--user=root"])
        .arg(format!("--listen-address={listen}"))
        .arg(format!("--pid-file={}", pid_file.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting dnsmasq; install it with `apt-get install dnsmasq` (`make bootstrap`)")
}

impl DnsLab {
    /// Creates the namespace with `lo` up and `extra_loopback` addresses on it.
    pub fn new(extra_loopback: &[&str]) -> Result<DnsLab> {
        crate::clean_leftovers();
        let prefix = format!("mt{}x{}", std::process::id(), LABS.fetch_add(1, Ordering::Relaxed));
        let ns = format!("{prefix}-dns");
        let dir = PathBuf::from(RUN_DIR).join(&prefix);
        fs::create_dir_all(&dir)?;
        sh("ip", &["netns", "add", &ns])?;
        let lab = DnsLab { prefix, ns, dir, children: Vec::new() };
        sh("ip", &["-n", &lab.ns, "link", "set", "lo", "up"])?;
        for addr in extra_loopback {
            sh("ip", &["-n", &lab.ns, "addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
        }
        Ok(lab)
    }

    /// The namespace's path, for setns.
    pub fn netns(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.ns)
    }

    /// Starts dnsmasq on `listen:53` with `args` (e.g. `--address=/example.test/192.0.2.1`)
    /// and waits until it answers `probe` (a name it serves).
    pub fn start_dnsmasq(&mut self, listen: &str, args: &[&str], probe: &str) -> Result<u32> {
        let pid_file = self.dir.join(format!("dnsmasq-{listen}.pid"));
        let child = spawn_dnsmasq(&self.netns(), listen, &pid_file, args)?;
        let pid = child.id();
        self.children.push(child);
        poll(&format!("dnsmasq on {listen} answers {probe}"), Duration::from_secs(5), || {
            let d = self.dig(&[&format!("@{listen}"), probe])?;
            if d.answers.is_empty() {
                bail!("no answer yet: {d:?}");
            }
            Ok(())
        })?;
        Ok(pid)
    }

    /// Runs `dig +time=2 +tries=1 ARGS` in the namespace.
    pub fn dig(&self, args: &[&str]) -> Result<Dig> {
        let out = sh("ip", &[&["netns", "exec", &self.ns, "dig", "+time=2", "+tries=1"][..], args].concat())
            .context("running dig; install it with `apt-get install dnsutils` (`make bootstrap`)")?;
        parse_dig(&out).with_context(|| format!("dig {}: unexpected output:\n{out}", args.join(" ")))
    }
}

/// Parses dig's default output.
pub fn parse_dig(out: &str) -> Result<Dig> {
    let status = out
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .and_then(|s| s.split(',').next())
        .context("no status line")?
        .to_owned();
    let flags = out
        .lines()
        .find_map(|l| l.strip_prefix(";; flags: "))
        .and_then(|l| l.split(';').next())
        .context("no flags line")?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let mut answers = Vec::new();
    let mut in_answer = false;
    for line in out.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            in_answer = true;
        } else if in_answer && (line.trim().is_empty() || line.starts_with(';')) {
            in_answer = false;
        } else if in_answer {
            if let Some(data) = line.split_whitespace().last() {
                answers.push(data.to_owned());
            }
        }
    }
    Ok(Dig { status, flags, answers })
}

impl Drop for DnsLab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_prefix(&self.prefix);
    }
}

/// The name table the DNS tests and the DNS benchmark serve. `front`: `web` (vip
/// 10.0.1.2, tasks web.1 10.0.1.10 and web.2 10.0.1.11), `api` (dnsrr, 10.0.1.20-22),
/// `big` (dnsrr, `big` tasks at 10.0.3.x); `back`: `db` (vip 10.0.2.2, task db.1
/// 10.0.2.10).
pub fn sample_table(big: u8) -> meshd_dataplane::dns::NameTable {
    use meshd_dataplane::dns::{EndpointMode::*, NameTable, NetworkNames};
    let ip = |last: u8, third: u8| std::net::Ipv4Addr::new(10, 0, third, last);
    let front = NetworkNames::default()
        .with_service("web", Vip, Some(ip(2, 1)), vec![ip(10, 1), ip(11, 1)])
        .with_service("api", Dnsrr, None, vec![ip(20, 1), ip(21, 1), ip(22, 1)])
        .with_service("big", Dnsrr, None, (0..big).map(|i| ip(i, 3)).collect())
        .with_task("web.1", ip(10, 1))
        .with_task("web.2", ip(11, 1));
    let back = NetworkNames::default()
        .with_service("db", Vip, Some(ip(2, 2)), vec![ip(10, 2)])
        .with_task("db.1", ip(10, 2));
    NameTable { networks: [("front".into(), front), ("back".into(), back)].into() }
}
