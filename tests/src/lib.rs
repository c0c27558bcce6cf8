//! The netns cluster harness: a whole meshd cluster on one machine, built from real
//! network namespaces, real veths and a real Linux bridge, running the real `meshd`
//! and `meshctl` binaries.
//!
//! Topology (see DESIGN.md): an underlay switch namespace with a bridge; node *i* at
//! `198.18.0.(10+i)/24`; an external client at `198.18.0.100`; containers are further
//! namespaces attached with `meshctl attach`, each running `meshd-testsrv`. Every
//! object carries a prefix unique to the test (`mt<pid>x<n>`); [`Cluster`] removes
//! them on drop — also after a failed assertion — and [`clean_leftovers`] removes
//! those of runs that were killed.

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};

pub mod dnslab;
pub mod mariadb;

/// Directory holding the state dirs, sockets and logs of harness clusters.
pub const RUN_DIR: &str = "/tmp/meshd-harness";

/// The underlay address of node `i` (1-based).
pub fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + i as u8)
}

/// The external client's underlay address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);

/// Polls `probe` every 20 ms until it returns `Some`, or fails after `timeout` with
/// `what` and the last state `probe` reported.
pub fn poll<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(value) => return Ok(value),
            Err(error) if Instant::now() >= deadline => {
                return Err(error.context(format!("{what}: not true after {timeout:?}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Where the project's binaries are: next to the running executable, or one level up
/// (integration tests run from `target/<profile>/deps`).
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent();
    }
    bail!(
        "binary {name} not found next to {}; build it first: `cargo build --workspace --bins`",
        exe.display()
    )
}

/// Runs a command and fails with its stderr if it fails.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}; install it with `make bootstrap`"))?;
    if !out.status.success() {
        bail!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a thread that has entered the network namespace at `netns`.
pub fn in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let file = fs::File::open(netns).with_context(|| format!("opening namespace {}", netns.display()))?;
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map(|()| f())
    })
    .join()
    .map_err(|_| anyhow!("thread in {} panicked", netns.display()))?
    .with_context(|| format!("entering namespace {}", netns.display()))
}

/// Fetches `http://addr/` from inside `netns` and returns the body.
pub fn http_get(netns: &Path, addr: SocketAddr) -> Result<String> {
    in_netns(netns, move || -> std::io::Result<String> {
        get_on(TcpStream::connect_timeout(&addr, Duration::from_secs(2))?)
    })?
    .with_context(|| format!("GET http://{addr}/"))
}

/// Sends `GET /` (HTTP/1.0) on a connected `stream` and returns the body of a 200
/// answer (read to the end, at most 5 s between reads).
pub fn get_on(mut stream: TcpStream) -> std::io::Result<String> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.trim().to_owned()),
        _ => Err(std::io::Error::other(format!("bad response {response:?}"))),
    }
}

/// One HTTP/1.1 keep-alive request on `stream` (left open for the next); the body
/// of the answer (the answering task's name).
pub fn keepalive_get(stream: &mut TcpStream) -> Result<String> {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed after {:?}", String::from_utf8_lossy(&buf));
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            ensure!(head.starts_with("HTTP/1.1 200"), "bad answer {text:?}");
            if body.ends_with('\n') {
                return Ok(body.trim().to_owned());
            }
        }
    }
}

/// Whether a TCP connect to `addr` from inside `netns` is refused right away.
pub fn refused(netns: &Path, addr: SocketAddr) -> Result<bool> {
    in_netns(netns, move || {
        matches!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    })
}

/// The path of the named network namespace `name` (`ip netns` keeps them there).
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// A process a test or bench started; killed (by its own PID) and reaped when dropped.
pub struct Spawned(pub Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `program args` in the network namespace at `netns`, output discarded.
pub fn spawn_in(netns: &Path, program: &str, args: &[&str]) -> Result<Spawned> {
    let child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["--", program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {program}; install it with `make bootstrap`"))?;
    Ok(Spawned(child))
}

/// The cgroup2 mount point, from /proc/mounts.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .and_then(|f| f.get(1).map(PathBuf::from))
        .ok_or_else(|| anyhow!("no cgroup2 mount in /proc/mounts; mount one: `mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified`"))
}

/// One node: a namespace on the underlay running a real meshd.
pub struct Node {
    /// 1-based index.
    pub index: usize,
    /// Node name (`n1`, ...).
    pub name: String,
    /// Namespace name.
    pub ns: String,
    /// Underlay address.
    pub addr: Ipv4Addr,
    /// meshd's API socket.
    pub socket: PathBuf,
    /// meshd's state dir.
    pub state_dir: PathBuf,
    /// The node's cgroup v2 directory.
    pub cgroup: PathBuf,
    /// Where its socket load balancer pins maps and links (`--bpf-pin-dir`), named
    /// after the node's namespace so concurrent test processes never share one.
    pub pin_dir: PathBuf,
    /// meshd's log file.
    pub log: PathBuf,
    /// The keyring file meshd runs with (the cluster's, or the node's own copy).
    pub keyring: PathBuf,
    meshd: Option<Child>,
}

impl Node {
    /// Path of the node's namespace.
    pub fn netns(&self) -> PathBuf {
        netns_path(&self.ns)
    }

    /// The pid of the running meshd (nsenter execs it, so the child is meshd).
    pub fn meshd_pid(&self) -> Option<u32> {
        self.meshd.as_ref().map(Child::id)
    }
}

/// A container: a namespace made a task with `meshctl attach`, serving HTTP on :80.
pub struct Container {
    /// Task name.
    pub task: String,
    /// Namespace name.
    pub ns: String,
    /// The node it runs on (1-based).
    pub node: usize,
    /// Its overlay address.
    pub ip: Ipv4Addr,
    server: Option<Child>,
}

impl Container {
    /// Path of its namespace.
    pub fn netns(&self) -> PathBuf {
        netns_path(&self.ns)
    }
}

static CLUSTERS: AtomicUsize = AtomicUsize::new(0);

/// A whole cluster in namespaces. Dropping it removes everything it created.
pub struct Cluster {
    /// Unique prefix of every object.
    pub prefix: String,
    /// The nodes, `nodes[0]` is `n1`.
    pub nodes: Vec<Node>,
    /// The containers attached so far.
    pub containers: Vec<Container>,
    /// Working directory (state, sockets, logs).
    pub dir: PathBuf,
    meshd: PathBuf,
    meshctl: PathBuf,
    testsrv: PathBuf,
    /// How meshd is started.
    options: StartOptions,
}

/// How [`Cluster::start_with`] starts meshd.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// The open-files limit meshd is started under, as a service manager sets it
    /// (util-linux `prlimit`); `None`: the test's own.
    pub nofile: Option<NofileLimit>,
    /// Extra flags for every meshd.
    pub meshd_args: Vec<String>,
    /// Every node gets its own copy of the cluster keyring (`Node::keyring`), so a
    /// test can see each node rewrite its own file.
    pub own_keyrings: bool,
    /// Extra flags for one node's meshd, after `meshd_args` (node index, 1-based;
    /// e.g. `--xdp off` on one node to compare it with the others).
    pub node_args: Vec<(usize, Vec<String>)>,
}

/// An open-files limit to start meshd under.
#[derive(Clone, Copy, Debug)]
pub struct NofileLimit {
    /// The soft limit.
    pub soft: u64,
    /// The hard limit; `None` keeps the inherited one (as systemd's 1024 soft limit
    /// comes with a much higher hard one).
    pub hard: Option<u64>,
}

fn must_be_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the netns cluster needs root (namespaces, veths, eBPF); run the tests as root");
    }
    Ok(())
}

impl Cluster {
    /// Builds the underlay with `n` nodes and the external client, and starts meshd on
    /// every node (all joining through `n1`).
    pub fn start(n: usize) -> Result<Cluster> {
        Self::start_with_prefix(
            n,
            &format!("mt{}x{}", std::process::id(), CLUSTERS.fetch_add(1, Ordering::Relaxed)),
        )
    }

    /// Like [`Cluster::start`], with every meshd started as `options` say.
    pub fn start_with(n: usize, options: StartOptions) -> Result<Cluster> {
        Self::start_inner(
            n,
            &format!("mt{}x{}", std::process::id(), CLUSTERS.fetch_add(1, Ordering::Relaxed)),
            options,
        )
    }

    /// Like [`Cluster::start`] with a chosen prefix (the demo uses a fixed one).
    pub fn start_with_prefix(n: usize, prefix: &str) -> Result<Cluster> {
        Self::start_inner(n, prefix, StartOptions::default())
    }

    /// Like [`Cluster::start`], with extra meshd flags on every node (e.g. a short
    /// `--tombstone-ttl-secs`).
    pub fn start_with_args(n: usize, args: &[&str]) -> Result<Cluster> {
        let meshd_args = args.iter().map(|a| a.to_string()).collect();
        Self::start_with(n, StartOptions { meshd_args, ..StartOptions::default() })
    }

    /// Like [`Cluster::start`], but every node gets its own copy of the cluster keyring
    /// (`Node::keyring`), so a test can see each node rewrite its own file.
    pub fn start_with_own_keyrings(n: usize) -> Result<Cluster> {
        Self::start_with(n, StartOptions { own_keyrings: true, ..StartOptions::default() })
    }

    fn start_inner(n: usize, prefix: &str, options: StartOptions) -> Result<Cluster> {
        must_be_root()?;
        clean_leftovers();
        let dir = PathBuf::from(RUN_DIR).join(prefix);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let mut cluster = Cluster {
            prefix: prefix.to_owned(),
            nodes: Vec::new(),
            containers: Vec::new(),
            dir,
            meshd: bin_path("meshd")?,
            meshctl: bin_path("meshctl")?,
            testsrv: bin_path("meshd-testsrv")?,
            options,
        };
        cluster.write_keyring()?;
        cluster.build_underlay(n)?;
        for i in 1..=n {
            cluster.start_node(i)?;
        }
        for i in 1..=n {
            cluster.wait_until_answers(i)?;
        }
        Ok(cluster)
    }

    /// The cluster keyring every node is started with.
    pub fn keyring(&self) -> PathBuf {
        self.dir.join("keyring")
    }

    fn write_keyring(&self) -> Result<()> {
        let mut key = [0u8; 32];
        fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        write_private(&self.keyring(), &format!("# test cluster keyring\n{hex}\n"))
    }

    fn switch_ns(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    /// Name of the external client's namespace.
    pub fn client_ns(&self) -> String {
        format!("{}-ext", self.prefix)
    }

    /// Path of the external client's namespace.
    pub fn client_netns(&self) -> PathBuf {
        netns_path(&self.client_ns())
    }

    fn build_underlay(&mut self, n: usize) -> Result<()> {
        let sw = self.switch_ns();
        sh("ip", &["netns", "add", &sw])?;
        for br in ["br0", "br1"] {
            sh("ip", &["-n", &sw, "link", "add", br, "type", "bridge"])?;
            sh("ip", &["-n", &sw, "link", "set", br, "up"])?;
        }
        sh("ip", &["-n", &sw, "link", "set", "lo", "up"])?;
        for i in 1..=n {
            self.add_host(&format!("{}-n{i}", self.prefix), &format!("n{i}"), node_addr(i))?;
        }
        self.add_host(&self.client_ns(), "ext", CLIENT_ADDR)
    }

    fn add_host(&self, ns: &str, port: &str, addr: Ipv4Addr) -> Result<()> {
        let sw = self.switch_ns();
        sh("ip", &["netns", "add", ns])?;
        sh("ip", &["-n", &sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
        sh("ip", &["-n", &sw, "link", "set", port, "master", "br0", "up"])?;
        // The switch ports play the NICs' role for native XDP on the hosts' eth0: a
        // veth delivers an XDP_TX'd or redirected frame only when its peer runs NAPI,
        // which GRO turns on. What GRO merged, the port splits again on its way out;
        // without checksum offload it finishes the segments' checksums, as frames on a
        // wire have them (see below).
        sh("ip", &["netns", "exec", &sw, "ethtool", "-K", port, "gro", "on", "tx", "off"])
            .context("enabling GRO on a switch port (ethtool: `apt-get install ethtool`)")?;
        sh("ip", &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        sh("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        sh("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        // Frames on a real wire carry complete checksums (the NIC fills them in). A veth
        // passes the sender's unfinished ones (CHECKSUM_PARTIAL) with the skb, which an
        // XDP program never sees: a packet it rewrites and redirects would reach its
        // task with a wrong checksum and be dropped. The hosts' eth0 finish them in
        // software, as a NIC would.
        sh("ip", &["netns", "exec", ns, "ethtool", "-K", "eth0", "tx", "off"])
            .context("turning off checksum offload on a host's eth0 (ethtool: `apt-get install ethtool`)")?;
        Ok(())
    }

    /// Adds a namespace `<prefix>-<label>` with `eth0` at `addr` on the underlay switch
    /// (a traffic sink or a router for benchmarks; removed with the cluster), and
    /// returns its path.
    pub fn add_underlay_host(&self, label: &str, addr: Ipv4Addr) -> Result<PathBuf> {
        let ns = format!("{}-{label}", self.prefix);
        self.add_host(&ns, label, addr)?;
        Ok(netns_path(&ns))
    }

    /// Adds node `n<len+1>` to the running cluster, started with `keyring` instead of
    /// the cluster's (to show that a node without the key cannot join).
    pub fn add_node_with_keyring(&mut self, keyring: &Path) -> Result<usize> {
        let i = self.nodes.len() + 1;
        self.add_host(&format!("{}-n{i}", self.prefix), &format!("n{i}"), node_addr(i))?;
        self.start_node_with(i, keyring.to_owned())?;
        self.wait_until_answers(i)?;
        Ok(i)
    }

    /// Waits until node `i`'s meshd answers `meshctl status`; fails with its log.
    pub fn wait_until_answers(&self, i: usize) -> Result<()> {
        poll(&format!("meshd on n{i} answers"), Duration::from_secs(20), || {
            let out = self.meshctl(i, &["status"]);
            out.status
                .success()
                .then_some(())
                .ok_or_else(|| anyhow!("{}", String::from_utf8_lossy(&out.stderr)))
        })
        .map_err(|e| e.context(self.log_tail(i, 60)))
    }

    /// Splits the underlay: the nodes in `side_b` move to a second switch, cut off
    /// from the others (and from the external client).
    pub fn partition(&self, side_b: &[usize]) -> Result<()> {
        for i in side_b {
            sh("ip", &["-n", &self.switch_ns(), "link", "set", &format!("n{i}"), "master", "br1"])?;
        }
        Ok(())
    }

    /// Heals a partition: every node is back on one switch.
    pub fn heal(&self) -> Result<()> {
        for node in &self.nodes {
            sh(
                "ip",
                &["-n", &self.switch_ns(), "link", "set", &format!("n{}", node.index), "master", "br0"],
            )?;
        }
        Ok(())
    }

    /// Kills node `i`'s meshd with SIGKILL (no cleanup, no goodbye).
    pub fn kill_node(&mut self, i: usize) -> Result<()> {
        let mut child =
            self.nodes[i - 1].meshd.take().ok_or_else(|| anyhow!("meshd on n{i} is not running"))?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Starts node `i`'s meshd again with its state dir, and waits until it answers.
    pub fn restart_node(&mut self, i: usize) -> Result<()> {
        if self.nodes[i - 1].meshd.is_some() {
            bail!("meshd on n{i} is still running");
        }
        let child = self.spawn_meshd(&self.nodes[i - 1])?;
        self.nodes[i - 1].meshd = Some(child);
        self.wait_until_answers(i)
    }

    /// Waits until node `observer` sees every other node alive (a command's "every
    /// node" is every node it knows).
    pub fn wait_all_alive(&self, observer: usize) -> Result<()> {
        poll(&format!("n{observer} sees every node alive"), Duration::from_secs(20), || {
            let rows = self.meshctl_json(observer, &["node", "ls"])?;
            let alive = rows.as_array().into_iter().flatten().filter(|r| r["state"] == "alive").count();
            (alive + 1 == self.nodes.len()).then_some(()).ok_or_else(|| anyhow!("{rows}"))
        })
    }

    /// What node `observer` thinks of node `node`: "self", "alive", "suspect", "dead",
    /// "left", or "unknown".
    pub fn member_state(&self, observer: usize, node: usize) -> Result<String> {
        let rows = self.meshctl_json(observer, &["node", "ls"])?;
        let name = format!("n{node}");
        Ok(rows
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["name"] == name.as_str())
            .and_then(|r| r["state"].as_str())
            .unwrap_or("unknown")
            .to_owned())
    }

    /// Creates an empty container namespace (cleaned up with the cluster) and returns
    /// its path.
    pub fn add_netns(&self, label: &str) -> Result<PathBuf> {
        let ns = format!("{}-c{label}", self.prefix);
        sh("ip", &["netns", "add", &ns])?;
        Ok(netns_path(&ns))
    }

    fn start_node(&mut self, i: usize) -> Result<()> {
        let keyring = if self.options.own_keyrings {
            let own = self.dir.join(format!("n{i}.keyring"));
            write_private(&own, &fs::read_to_string(self.keyring())?)?;
            own
        } else {
            self.keyring()
        };
        self.start_node_with(i, keyring)
    }

    fn start_node_with(&mut self, i: usize, keyring: PathBuf) -> Result<()> {
        let name = format!("n{i}");
        let ns = format!("{}-n{i}", self.prefix);
        let cgroup = cgroup2_root()?.join(&ns);
        fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let node_dir = self.dir.join(&name);
        fs::create_dir_all(&node_dir)?;
        let mut node = Node {
            index: i,
            name,
            addr: node_addr(i),
            socket: node_dir.join("meshd.sock"),
            state_dir: node_dir.join("state"),
            cgroup,
            pin_dir: meshd_dataplane::socklb::pin_dir_for(&ns),
            log: node_dir.join("meshd.log"),
            ns,
            keyring,
            meshd: None,
        };
        node.meshd = Some(self.spawn_meshd(&node)?);
        self.nodes.push(node);
        Ok(())
    }

    fn spawn_meshd(&self, node: &Node) -> Result<Child> {
        let log = fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        let mut cmd = match self.options.nofile {
            Some(limit) => {
                let hard = limit.hard.map(|h| h.to_string()).unwrap_or_default();
                let mut prlimit = Command::new("prlimit");
                prlimit.arg(format!("--nofile={}:{hard}", limit.soft)).args(["--", "nsenter"]);
                prlimit
            }
            None => Command::new("nsenter"),
        };
        cmd.arg(format!("--net={}", node.netns().display()))
            .arg("--")
            .arg(&self.meshd)
            .args(["--node-name", &node.name, "--advertise-addr", &node.addr.to_string()])
            .arg("--state-dir")
            .arg(&node.state_dir)
            .arg("--api-socket")
            .arg(&node.socket)
            .arg("--cgroup")
            .arg(&node.cgroup)
            .arg("--bpf-pin-dir")
            .arg(&node.pin_dir)
            .arg("--keyring-file")
            .arg(&node.keyring)
            .env("RUST_LOG", std::env::var("MESHD_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if node.index != 1 {
            cmd.args(["--join", &node_addr(1).to_string()]);
        }
        cmd.args(&self.options.meshd_args);
        for (_, args) in self.options.node_args.iter().filter(|(i, _)| *i == node.index) {
            cmd.args(args);
        }
        cmd.spawn().context(
            "starting meshd (nsenter and prlimit come with util-linux: `apt-get install util-linux`)",
        )
    }

    /// Runs `meshd --cleanup` for node `i` in its namespace (meshd must be stopped):
    /// removes what that node programmed, its pinned programs included.
    pub fn cleanup_node(&self, i: usize) -> Result<String> {
        let node = &self.nodes[i - 1];
        let meshd = bin_path("meshd")?;
        sh(
            "nsenter",
            &[
                &format!("--net={}", node.netns().display()),
                "--",
                &meshd.to_string_lossy(),
                "--cleanup",
                "--api-socket",
                &node.socket.to_string_lossy(),
                "--bpf-pin-dir",
                &node.pin_dir.to_string_lossy(),
            ],
        )
    }

    /// Stops node `i`'s meshd with SIGTERM and waits for it to exit.
    pub fn stop_node(&mut self, i: usize) -> Result<std::process::ExitStatus> {
        let child = self.nodes[i - 1].meshd.take().ok_or_else(|| anyhow!("meshd on n{i} is not running"))?;
        terminate(child, Duration::from_secs(10))
    }

    /// The process id of node `i`'s meshd, while it runs (`prlimit` and `nsenter` exec
    /// it, so the child is meshd itself).
    pub fn meshd_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i - 1].meshd.as_ref().map(Child::id)
    }

    /// Runs the real meshctl against node `i` (1-based).
    pub fn meshctl(&self, i: usize, args: &[&str]) -> Output {
        Command::new(&self.meshctl)
            .arg("--socket")
            .arg(&self.nodes[i - 1].socket)
            .args(args)
            .output()
            .expect("running meshctl")
    }

    /// Runs meshctl against node `i` and returns stdout, failing on a non-zero exit.
    pub fn meshctl_ok(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = self.meshctl(i, args);
        if !out.status.success() {
            bail!(
                "meshctl {} on n{i} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `meshctl --format json ARGS` on node `i`, parsed.
    pub fn meshctl_json(&self, i: usize, args: &[&str]) -> Result<serde_json::Value> {
        let mut full = vec!["--format", "json"];
        full.extend_from_slice(args);
        Ok(serde_json::from_str(&self.meshctl_ok(i, &full)?)?)
    }

    /// Waits until node `i` knows service `name` (state travels between nodes).
    pub fn wait_for_service(&self, i: usize, name: &str) -> Result<()> {
        poll(&format!("n{i} knows service {name}"), Duration::from_secs(10), || {
            self.meshctl_ok(i, &["service", "ps", name]).map(drop)
        })
        .map_err(|e| e.context(self.log_tail(i, 40)))
    }

    /// The common fixture: network `net` (10.0.0.0/24), service `web` with task `web.1`
    /// on node `task_node`, published as 3000:80 and served by node 1; returns the
    /// task's address.
    pub fn publish_web(&mut self, task_node: usize) -> Result<Ipv4Addr> {
        self.meshctl_ok(1, &["network", "create", "net", "--subnet", "10.0.0.0/24"])?;
        self.meshctl_ok(1, &["service", "create", "web", "--network", "net"])?;
        let ip = self.add_container(task_node, "web", "web.1")?.ip;
        self.meshctl_ok(1, &["publish", "3000:80", "web"])?;
        self.wait_serving(1, "3000/tcp", 1)?;
        Ok(ip)
    }

    /// Waits until node `i` has programmed `port` (e.g. `"3000/tcp"`) with `n` backends
    /// for local clients and `n` for remote ones (read back from its dataplane, not
    /// the cluster state); returns the port's `published_paths` entry.
    pub fn wait_serving(&self, i: usize, port: &str, n: usize) -> Result<serde_json::Value> {
        poll(&format!("n{i} serves {port} with {n} backends"), Duration::from_secs(20), || {
            let status = self.meshctl_json(i, &["status"])?;
            let path = status["published_paths"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["port"].as_str() == Some(port))
                .cloned()
                .ok_or_else(|| anyhow!("no {port} in {}", status["published_paths"]))?;
            let count = |key: &str| path[key].as_array().map_or(0, Vec::len);
            // `backends`: the socket LB's, for local clients (none when the proxy takes them).
            let local_ok = path["local_clients"] == "proxy" || count("backends") == n;
            anyhow::ensure!(local_ok && count("remote_backends") == n, "{path}");
            Ok(path)
        })
        .map_err(|e| e.context(self.log_tail(i, 30)))
    }

    /// The last `lines` lines of node `i`'s meshd log, for failure messages.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let log = fs::read_to_string(&self.nodes[i - 1].log).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        format!("last lines of n{i}'s meshd log:\n{}", all[all.len().saturating_sub(lines)..].join("\n"))
    }

    /// Creates a container namespace on node `node`, attaches it to `service` as task
    /// `task` with the real meshctl, and starts the test HTTP server on port 80 in it.
    pub fn add_container(&mut self, node: usize, service: &str, task: &str) -> Result<&Container> {
        self.add_task(node, service, task, 80)
    }

    /// Like [`Cluster::add_container`], with the test server on `port`.
    pub fn add_task(&mut self, node: usize, service: &str, task: &str, port: u16) -> Result<&Container> {
        self.add_task_with(node, service, task, port, &[])
    }

    /// Like [`Cluster::add_task`], passing `extra` arguments to `meshctl attach`
    /// (e.g. `--ip ADDR`).
    pub fn add_task_with(
        &mut self,
        node: usize,
        service: &str,
        task: &str,
        port: u16,
        extra: &[&str],
    ) -> Result<&Container> {
        let mut container = self.attach_new_container(node, service, task, extra)?;
        container.server = Some(self.spawn_server(&container, port)?);
        self.containers.push(container);
        Ok(self.containers.last().expect("just pushed"))
    }

    /// Starts the test HTTP server of `container` on `port` (in its node's cgroup) and
    /// waits until it answers.
    fn spawn_server(&self, container: &Container, port: u16) -> Result<Child> {
        let path = container.netns();
        let task = container.task.as_str();
        let server = Command::new("nsenter")
            .arg(format!("--net={}", path.display()))
            .arg("--")
            .arg(&self.testsrv)
            .args(["--name", task, "--listen", &format!("0.0.0.0:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        let mut server = server;
        let addr = SocketAddr::from((container.ip, port));
        let started =
            fs::write(self.nodes[container.node - 1].cgroup.join("cgroup.procs"), server.id().to_string())
                .map_err(anyhow::Error::from)
                .and_then(|()| {
                    poll(&format!("{task} serves HTTP"), Duration::from_secs(10), || {
                        let body = http_get(&path, addr)?;
                        if body == task {
                            Ok(())
                        } else {
                            Err(anyhow!("answered {body:?}"))
                        }
                    })
                });
        if let Err(error) = started {
            let _ = server.kill();
            let _ = server.wait();
            return Err(error);
        }
        Ok(server)
    }

    /// Stops task `task`'s HTTP server without notice (SIGKILL by its PID): the task
    /// stays attached, its port refuses.
    pub fn kill_server(&mut self, task: &str) -> Result<()> {
        let container =
            self.containers.iter_mut().find(|c| c.task == task).ok_or_else(|| anyhow!("no task {task}"))?;
        if let Some(mut server) = container.server.take() {
            server.kill()?;
            server.wait()?;
        }
        Ok(())
    }

    /// Starts task `task`'s HTTP server again on port 80.
    pub fn restart_server(&mut self, task: &str) -> Result<()> {
        let i =
            self.containers.iter().position(|c| c.task == task).ok_or_else(|| anyhow!("no task {task}"))?;
        let server = self.spawn_server(&self.containers[i], 80)?;
        self.containers[i].server = Some(server);
        Ok(())
    }

    /// Creates a container namespace on node `node` and attaches it to `service` as
    /// task `task`, with nothing running in it yet (the caller starts its server).
    pub fn add_empty_container(&mut self, node: usize, service: &str, task: &str) -> Result<&Container> {
        let container = self.attach_new_container(node, service, task, &[])?;
        self.containers.push(container);
        Ok(self.containers.last().expect("just pushed"))
    }

    fn attach_new_container(
        &mut self,
        node: usize,
        service: &str,
        task: &str,
        extra: &[&str],
    ) -> Result<Container> {
        self.wait_for_service(node, service)?;
        let ns = format!("{}-c{}", self.prefix, self.containers.len() + 1);
        sh("ip", &["netns", "add", &ns])?;
        let path = netns_path(&ns);
        let mut container =
            Container { task: task.into(), ns, node, ip: Ipv4Addr::UNSPECIFIED, server: None };
        let path_arg = path.to_string_lossy().into_owned();
        let mut args = vec!["attach", service, "--netns", &path_arg, "--name", task];
        args.extend_from_slice(extra);
        let attached = self.meshctl_json(node, &args)?;
        container.ip =
            attached["ip"].as_str().ok_or_else(|| anyhow!("attach returned no ip: {attached}"))?.parse()?;
        Ok(container)
    }
}

/// Checks that `meshd FLAG VALUE` (with state dir `dir`) is refused with one line
/// starting `meshd: {says}`, a non-zero exit, and before `dir` is created.
pub fn assert_flag_refused(dir: &Path, flag: &str, value: &str, says: &str) -> Result<()> {
    let out = Command::new(bin_path("meshd")?)
        .args(["--node-name", "x", "--advertise-addr", "198.18.0.250", flag, value])
        .arg("--state-dir")
        .arg(dir)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    ensure!(!out.status.success(), "meshd accepted {flag} {value}");
    ensure!(stderr.lines().count() == 1 && stderr.starts_with(&format!("meshd: {says}")), "{stderr:?}");
    ensure!(!dir.exists(), "meshd created {} before refusing {flag}", dir.display());
    Ok(())
}

/// Writes `text` to `path` with mode 0600 (keyrings).
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

fn terminate(mut child: Child, grace: Duration) -> Result<std::process::ExitStatus> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let status = child.wait()?;
            bail!("process {pid} ignored SIGTERM for {grace:?} and was killed ({status})");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for container in &mut self.containers {
            if let Some(mut server) = container.server.take() {
                let _ = server.kill();
                let _ = server.wait();
            }
        }
        for node in &mut self.nodes {
            if let Some(child) = node.meshd.take() {
                if let Err(error) = terminate(child, Duration::from_secs(10)) {
                    eprintln!("harness: {error}");
                }
            }
        }
        remove_prefix(&self.prefix);
    }
}

/// Removes every namespace, cgroup and run directory carrying `prefix`, ending the
/// processes inside those namespaces first (all started by a harness run).
pub fn remove_prefix(prefix: &str) {
    let names: Vec<String> = fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    for ns in &names {
        if let Ok(pids) = sh("ip", &["netns", "pids", ns]) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    // Containers first, so their veths go before the nodes' bridges.
    for ns in names.iter().filter(|n| n.contains("-c")).chain(names.iter().filter(|n| !n.contains("-c"))) {
        let _ = sh("ip", &["netns", "del", ns]);
    }
    if let Ok(root) = cgroup2_root() {
        for entry in fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{prefix}-")) {
                // Killed processes leave the cgroup once reaped; retry briefly.
                let _ = poll("cgroup empties", Duration::from_secs(2), || Ok(fs::remove_dir(entry.path())?));
            }
        }
    }
    // The nodes' pinned socket load balancers (`Node::pin_dir`): detached and unpinned.
    let pins = meshd_dataplane::socklb::pin_dir_for("");
    for entry in fs::read_dir(&pins).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&format!("{prefix}-")) {
            if let Err(error) = meshd_dataplane::socklb::cleanup_pins(&entry.path()) {
                eprintln!("harness: removing pins {}: {error}", entry.path().display());
            }
        }
    }
    let _ = fs::remove_dir_all(PathBuf::from(RUN_DIR).join(prefix));
    mariadb::remove_resolvers(prefix);
}

/// Removes what harness runs that were killed left behind: objects whose prefix names
/// a process that no longer exists.
pub fn clean_leftovers() {
    let mut prefixes: Vec<String> = fs::read_dir("/run/netns")
        .into_iter()
        .chain(fs::read_dir(meshd_dataplane::socklb::pin_dir_for("")))
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| n.split_once('-').map(|(p, _)| p.to_owned()))
        .chain(
            fs::read_dir(RUN_DIR)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok()),
        )
        .filter(|p| harness_owner(p).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()))
        .collect();
    prefixes.sort();
    prefixes.dedup();
    for prefix in prefixes {
        remove_prefix(&prefix);
    }
}

/// The pid encoded in a harness prefix `mt<pid>x<n>`.
fn harness_owner(prefix: &str) -> Option<u32> {
    let rest = prefix.strip_prefix("mt")?;
    let (pid, n) = rest.split_once('x')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_is_read_from_the_prefix_only() {
        assert_eq!(harness_owner("mt1234x0"), Some(1234));
        assert_eq!(harness_owner("mtdemo"), None);
        assert_eq!(harness_owner("other"), None);
        assert_eq!(harness_owner("mt12x"), None);
    }
}
