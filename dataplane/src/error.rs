use std::{io, net::SocketAddr, path::PathBuf};

/// Everything the dataplane can fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel refused a netlink request.
    #[error("`{command}` failed: {message}")]
    Netlink {
        /// The equivalent iproute2 command line.
        command: String,
        /// What the kernel answered.
        message: String,
    },
    /// A netlink request got no answer within its time limit.
    #[error(
        "`{command}` got no answer from the kernel within 5 s; the netlink socket is wedged — restart meshd"
    )]
    Timeout {
        /// The equivalent iproute2 command line.
        command: String,
    },
    /// A system call around netlink failed (socket, namespace).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
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
    /// A published port could not be bound by the proxy; names what holds it.
    #[error(
        "cannot listen on {addr} ({proto}): {source}{held}; stop what holds the port or publish another port"
    )]
    Listen {
        /// The protocol.
        proto: crate::proxy::Proto,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
        /// `, held by nginx (pid 12)`, when the port is in use and its holder is seen.
        held: String,
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

impl Error {
    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>, source: io::Error) -> Error {
        Error::Io { what: what.into(), source }
    }
}

/// The dataplane's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The proxy could not bind `addr`: when the port is in use, find who holds it.
    pub fn listen(proto: crate::proxy::Proto, addr: SocketAddr, source: io::Error) -> Error {
        let held = match source.kind() {
            io::ErrorKind::AddrInUse => {
                crate::holder::held_by(&crate::holder::port_holders(proto, addr.port()))
            }
            _ => String::new(),
        };
        Error::Listen { proto, addr, source, held }
    }
}
