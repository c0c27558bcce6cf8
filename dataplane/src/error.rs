use std::{io, net::SocketAddr, path::PathBuf};

/// Everything the dataplane can fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A netlink change made through iproute2 failed.
    #[error("`{command}` failed: {stderr}")]
    Netlink {
        /// The command line that ran.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// iproute2 or util-linux could not be started at all.
    #[error("could not run `{program}` ({source}); install iproute2 and util-linux (`make bootstrap`)")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A published port could not be bound.
    #[error(
        "cannot listen on {addr}: {source}; another process holds the port — stop it or publish another port"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The network namespace handed to attach does not exist.
    #[error(
        "network namespace {path:?} does not exist; create it (`ip netns add NAME`) and pass /run/netns/NAME"
    )]
    NoNetns {
        /// The path given.
        path: PathBuf,
    },
    /// The cgroup directory for the socket programs could not be opened.
    #[error("cannot open cgroup {path:?}: {source}; pass a directory of the cgroup2 mount with --cgroup")]
    Cgroup {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Loading or attaching a kernel program failed.
    #[error("eBPF program {program}: {message}")]
    Ebpf {
        /// Which program.
        program: &'static str,
        /// What went wrong.
        message: String,
    },
    /// A setting of the dataplane's configuration is out of range.
    #[error("invalid {setting}: {message}")]
    Config {
        /// The setting, as its flag is spelled.
        setting: &'static str,
        /// What is wrong and what to use instead.
        message: String,
    },
}

/// The dataplane's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
