//! The open-files limit meshd runs under, and whether it fits the connection caps.
//!
//! Every relayed connection, UDP flow, API client and gossip push-pull holds a file
//! descriptor; when they run out, `accept` fails for everything at once — gossip
//! included. systemd starts services with a soft limit of 1024 and a much higher hard
//! limit, so meshd raises its soft limit to the hard one at start (as Go's runtime does
//! for every Go program) and says when even that is below what its caps may need.
//! The budget and the warning are pure; reading and raising the limit is mechanism.

use std::io;

use meshd_dataplane::proxy::ProxyConfig;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use serde::Serialize;

use crate::api::MAX_API_CLIENTS;

/// Descriptors gossip may hold: its UDP and TCP sockets plus concurrent push-pull
/// connections, in and out. An estimate: push-pulls served are capped
/// (`--max-push-pulls`); those this node starts are not capped, only bounded by what
/// the state machine emits per tick and by the 5 s exchange timeout.
pub const GOSSIP_FDS: u64 = 128;

/// Descriptors for everything else: the runtime, eBPF programs and maps, netlink
/// sockets, the log, store writes, namespace files during attach, listeners.
pub const BASE_FDS: u64 = 256;

/// The process's `RLIMIT_NOFILE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct NofileLimit {
    /// The limit enforced now.
    pub soft: u64,
    /// The most the soft limit can be raised to without privilege.
    pub hard: u64,
}

/// Reads the open-files limit.
pub fn nofile_limit() -> io::Result<NofileLimit> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    Ok(NofileLimit { soft, hard })
}

/// Raises the soft open-files limit to the hard limit; returns the limit before and
/// after. A no-op when they are equal already.
pub fn raise_nofile_limit() -> io::Result<(NofileLimit, NofileLimit)> {
    let before = nofile_limit()?;
    if before.soft < before.hard {
        setrlimit(Resource::RLIMIT_NOFILE, before.hard, before.hard).map_err(io::Error::from)?;
    }
    Ok((before, nofile_limit()?))
}

/// Descriptors open in this process now (entries of `/proc/self/fd`).
pub fn open_fds() -> Option<u64> {
    // The directory handle read_dir holds is one of the entries; don't count it.
    std::fs::read_dir("/proc/self/fd").ok().map(|d| (d.count() as u64).saturating_sub(1))
}

/// What meshd may need at its configured caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct FdBudget {
    /// The published-port proxy at its caps (two per TCP connection, one per UDP flow,
    /// two per splice pipe).
    pub proxy: u64,
    /// API clients at their cap.
    pub api: u64,
    /// Gossip: [`GOSSIP_FDS`].
    pub gossip: u64,
    /// Everything else: [`BASE_FDS`].
    pub base: u64,
}

impl FdBudget {
    /// The budget for these proxy limits.
    pub fn for_caps(proxy: &ProxyConfig) -> FdBudget {
        FdBudget { proxy: proxy.max_fds(), api: MAX_API_CLIENTS as u64, gossip: GOSSIP_FDS, base: BASE_FDS }
    }

    /// All of it.
    pub fn total(&self) -> u64 {
        self.proxy + self.api + self.gossip + self.base
    }
}

/// The warning to log and show when `soft` is below what the caps may need, naming
/// both fixes.
pub fn nofile_warning(limit: NofileLimit, budget: &FdBudget) -> Option<String> {
    let needed = budget.total();
    (limit.soft < needed).then(|| {
        format!(
            "open-files limit {} (hard {}) is below the {needed} descriptors the connection caps may need \
             (proxy {}, API {}, gossip {}, other {}); raise the hard limit (systemd: LimitNOFILE={needed} or more; \
             shell: ulimit -Hn) or lower --proxy-tcp-max-connections / --proxy-udp-max-flows",
            limit.soft, limit.hard, budget.proxy, budget.api, budget.gossip, budget.base
        )
    })
}

#[cfg(test)]
mod tests {
    use meshd_dataplane::proxy::BulkMode;

    use super::*;

    #[test]
    fn the_budget_adds_the_proxy_caps_to_the_fixed_parts() {
        let proxy = ProxyConfig {
            tcp_max_connections: 1000,
            udp_max_flows: 500,
            bulk: BulkMode::Copy,
            ..ProxyConfig::default()
        };
        let budget = FdBudget::for_caps(&proxy);
        assert_eq!(budget.proxy, 2500);
        assert_eq!(budget.total(), 2500 + MAX_API_CLIENTS as u64 + GOSSIP_FDS + BASE_FDS);
    }

    #[test]
    fn a_low_limit_warns_with_the_numbers_and_the_fixes() {
        let budget = FdBudget::for_caps(&ProxyConfig::default());
        let needed = budget.total();
        let warning = nofile_warning(NofileLimit { soft: 1024, hard: 1024 }, &budget).unwrap();
        assert!(warning.starts_with("open-files limit 1024 (hard 1024) is below the"), "{warning}");
        assert!(warning.contains(&format!("LimitNOFILE={needed}")), "{warning}");
        assert!(warning.contains("--proxy-tcp-max-connections"), "{warning}");
        assert_eq!(nofile_warning(NofileLimit { soft: needed, hard: needed }, &budget), None);
        assert!(nofile_warning(NofileLimit { soft: needed - 1, hard: 1 << 20 }, &budget).is_some());
    }

    #[test]
    fn raising_leaves_the_soft_limit_at_the_hard_one() {
        let (before, after) = raise_nofile_limit().unwrap();
        assert_eq!(after.soft, after.hard);
        assert_eq!(after.hard, before.hard);
        assert!(open_fds().unwrap() >= 3);
    }
}
