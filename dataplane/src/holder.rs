//! Who holds a port: when a published port cannot be bound, the error names the
//! process that has it, so the user knows what to stop without hunting for it.
//!
//! Reads this network namespace's socket tables (`/proc/net/{tcp,tcp6,udp,udp6}`) for
//! a listening TCP socket or a bound UDP socket on the port, then finds the processes
//! whose descriptors point at that socket's inode (`/proc/PID/fd`). Socket inodes are
//! unique on the host, so a holder in another namespace sharing ours is found too.

use std::collections::BTreeSet;

use procfs::{
    net::TcpState,
    process::{all_processes, FDTarget},
};

use crate::proxy::Proto;

/// The processes that hold `port` for `proto` in this namespace, as `comm (pid N)`,
/// sorted; empty when the holder cannot be seen (not in /proc, or the port was freed
/// meanwhile). Costs a walk of /proc: called on a failed bind only.
pub fn port_holders(proto: Proto, port: u16) -> Vec<String> {
    let inodes = socket_inodes(proto, port);
    if inodes.is_empty() {
        return Vec::new();
    }
    let Ok(processes) = all_processes() else { return Vec::new() };
    let mut holders = BTreeSet::new();
    for process in processes.flatten() {
        let Ok(fds) = process.fd() else { continue };
        let holds =
            fds.flatten().any(|fd| matches!(fd.target, FDTarget::Socket(inode) if inodes.contains(&inode)));
        if holds {
            let comm = process.stat().map(|s| s.comm).unwrap_or_else(|_| "?".into());
            holders.insert((process.pid(), comm));
        }
    }
    holders.into_iter().map(|(pid, comm)| format!("{comm} (pid {pid})")).collect()
}

/// Inodes of the sockets bound to `port` that keep it from being bound again: TCP
/// listeners, and UDP sockets bound to it.
fn socket_inodes(proto: Proto, port: u16) -> BTreeSet<u64> {
    match proto {
        Proto::Tcp => [procfs::net::tcp(), procfs::net::tcp6()]
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.state == TcpState::Listen && e.local_address.port() == port)
            .map(|e| e.inode)
            .collect(),
        Proto::Udp => [procfs::net::udp(), procfs::net::udp6()]
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.local_address.port() == port)
            .map(|e| e.inode)
            .collect(),
    }
}

/// How a bind error names the holders: `, held by nginx (pid 12)`, or nothing.
pub fn held_by(holders: &[String]) -> String {
    match holders {
        [] => String::new(),
        list => format!(", held by {}", list.join(" and ")),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, UdpSocket};

    use super::*;

    #[test]
    fn finds_this_process_holding_a_tcp_listener_and_a_udp_socket() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let me = format!("(pid {})", std::process::id());
        let held = port_holders(Proto::Tcp, tcp.local_addr().unwrap().port());
        assert!(held.iter().any(|h| h.ends_with(&me)), "{held:?}");
        let held = port_holders(Proto::Udp, udp.local_addr().unwrap().port());
        assert!(held.iter().any(|h| h.ends_with(&me)), "{held:?}");
    }

    #[test]
    fn a_free_port_has_no_holder() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // Dropped: nothing listens there now.
        assert_eq!(port_holders(Proto::Tcp, port), Vec::<String>::new());
    }

    #[test]
    fn names_the_holders_in_the_message() {
        assert_eq!(held_by(&[]), "");
        assert_eq!(held_by(&["nginx (pid 12)".into()]), ", held by nginx (pid 12)");
    }
}
