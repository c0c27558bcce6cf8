//! The seed scenario's real MySQL: Debian's MariaDB server run as a task inside a
//! container namespace, and the real `mariadb` client run from another container,
//! resolving the service name through meshd's embedded resolver.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{poll, sh};

/// The account the scenario's client uses.
pub const USER: &str = "app";
/// Its password (a test database in a namespace; nothing else can reach it).
pub const PASSWORD: &str = "secret";
/// The database the scenario queries.
pub const DATABASE: &str = "shop";

/// A MariaDB server listening on `0.0.0.0:3306` inside one container namespace.
pub struct MariaDb {
    child: Child,
    dir: PathBuf,
}

fn require(binary: &str) -> Result<()> {
    if which(binary).is_none() {
        bail!("{binary} is missing; install Debian's mariadb-server and mariadb-client (`make bootstrap`)");
    }
    Ok(())
}

fn which(binary: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].iter().map(|d| Path::new(d).join(binary)).find(|p| p.exists())
}

impl MariaDb {
    /// Initialises a data directory under `dir`, starts `mariadbd` inside the
    /// namespace at `netns` (placed in `cgroup`), and creates the scenario's account,
    /// database and a table whose one row names `task`.
    pub fn start(netns: &Path, cgroup: &Path, dir: &Path, task: &str) -> Result<MariaDb> {
        for binary in ["mariadbd", "mariadb-install-db", "mariadb"] {
            require(binary)?;
        }
        let dir = dir.join(format!("mariadb-{task}"));
        let data = dir.join("data");
        fs::create_dir_all(&dir)?;
        let data_arg = format!("--datadir={}", data.display());
        // Its own temporary directory: two servers set up at once (the seed tests run
        // in parallel) once collided on a temporary table in the shared /tmp.
        let tmp = dir.join("tmp");
        fs::create_dir_all(&tmp)?;
        let tmp_arg = format!("--tmpdir={}", tmp.display());
        sh(
            "mariadb-install-db",
            &[
                "--no-defaults",
                "--user=root",
                &data_arg,
                &tmp_arg,
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
            ],
        )
        .context("initialising the MariaDB data directory")?;
        let socket = dir.join("mysqld.sock");
        let log = fs::File::create(dir.join("server.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .arg("--")
            .arg("mariadbd")
            .args(["--no-defaults", "--user=root", &data_arg, &tmp_arg])
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", dir.join("mysqld.pid").display()))
            .args([
                "--port=3306",
                "--bind-address=0.0.0.0",
                "--skip-name-resolve",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=16M",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting mariadbd")?;
        fs::write(cgroup.join("cgroup.procs"), child.id().to_string())?;
        let server = MariaDb { child, dir };
        poll("mariadbd accepts on its socket", Duration::from_secs(30), || {
            if !socket.exists() {
                bail!("no socket yet; {}", server.log_tail());
            }
            Ok(())
        })?;
        let setup = format!(
            "CREATE USER {USER}@'%' IDENTIFIED BY '{PASSWORD}'; CREATE DATABASE {DATABASE}; \
             GRANT ALL ON {DATABASE}.* TO {USER}@'%'; \
             CREATE TABLE {DATABASE}.tasks (name VARCHAR(64)); \
             INSERT INTO {DATABASE}.tasks VALUES ('{task}');"
        );
        let socket_arg = format!("--socket={}", socket.display());
        sh("mariadb", &["--no-defaults", &socket_arg, "-u", "root", "-e", &setup])
            .context("creating the scenario's account and database")?;
        Ok(server)
    }

    /// The server's last log lines, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Makes `ip netns exec NS` give programs in container namespace `ns` a resolv.conf
/// naming meshd's embedded resolver (iproute2 bind-mounts `/etc/netns/NS/resolv.conf`
/// over `/etc/resolv.conf`), as Docker does for its containers.
pub fn use_embedded_resolver(ns: &str) -> Result<()> {
    let dir = Path::new("/etc/netns").join(ns);
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.11\noptions ndots:0 timeout:2 attempts:2\n")?;
    Ok(())
}

/// Removes the resolv.conf directories of namespaces carrying `prefix`.
pub fn remove_resolvers(prefix: &str) {
    for entry in fs::read_dir("/etc/netns").into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&format!("{prefix}-")) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs `sql` with the real `mariadb` client from container namespace `ns` against
/// `host:3306` as the scenario's account, the client process placed in `cgroup` before
/// it opens a socket (so the node's socket load balancer sees its connect). Returns
/// the client's output.
pub fn query(ns: &str, cgroup: &Path, host: &str, sql: &str) -> Result<String> {
    require("mariadb")?;
    // The shell joins the cgroup, then becomes the client: every socket it opens is
    // created inside the cgroup.
    let script = r#"echo $$ > "$1/cgroup.procs" && shift && exec "$@""#;
    let output = Command::new("sh")
        .args(["-c", script, "sh"])
        .arg(cgroup)
        .args(["ip", "netns", "exec", ns, "mariadb", "--no-defaults", "--connect-timeout=5"])
        .args(["-h", host, "-P", "3306", "-u", USER])
        .arg(format!("-p{PASSWORD}"))
        .args(["-N", "-B", "-e", sql, DATABASE])
        .stdin(Stdio::null())
        .output()
        .context("running the mariadb client")?;
    if !output.status.success() {
        return Err(anyhow!(
            "mariadb -h {host} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
