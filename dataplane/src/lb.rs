//! Load-balancing policies: which backend a new connection goes to. The choices are
//! pure functions over plain data (loads, a turn, a hash); [`Balancer`] holds what they
//! read for one listener, and the proxy applies it.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    sync::{
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
};

use meshd_common::maglev::{mix64, populate, MAGLEV_TABLE_SIZE};

/// How a listener picks the backend of a new connection (`meshctl publish --lb`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Policy {
    /// Each backend in turn.
    #[default]
    RoundRobin,
    /// The backend with the fewest active connections (ties: in turn).
    LeastConn,
    /// Power of two choices: the less loaded of two backends picked at random.
    P2c,
    /// Maglev consistent hashing of the client's address: a client keeps its backend
    /// while the backend set stays, and few clients move when it changes.
    Maglev,
}

impl Policy {
    /// The name `meshctl` and the status show.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::RoundRobin => "rr",
            Policy::LeastConn => "leastconn",
            Policy::P2c => "p2c",
            Policy::Maglev => "maglev",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Policy::RoundRobin, Policy::LeastConn, Policy::P2c, Policy::Maglev]
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown load-balancing policy {s:?}: use rr, leastconn, p2c or maglev"))
    }
}

/// The least loaded index of `loads`, looking from `start` round the ring, so equal
/// loads take turns. `None` when empty.
pub fn least_loaded(loads: &[u32], start: usize) -> Option<usize> {
    let n = loads.len();
    (0..n).map(|i| (start + i) % n).min_by_key(|&i| loads[i])
}

/// Power of two choices over `loads` with two random numbers: two distinct indexes
/// (when there are two), the less loaded wins, the first on a tie.
pub fn two_choices(loads: &[u32], r1: u64, r2: u64) -> Option<usize> {
    let n = loads.len();
    match n {
        0 => None,
        1 => Some(0),
        _ => {
            let a = (r1 % n as u64) as usize;
            let b = (a + 1 + (r2 % (n as u64 - 1)) as usize) % n;
            Some(if loads[b] < loads[a] { b } else { a })
        }
    }
}

/// The Maglev hash of a client's address (the port is left out: a client's
/// connections all go to one backend).
pub fn client_hash(client: IpAddr) -> u64 {
    match client {
        IpAddr::V4(v4) => mix64(u64::from(u32::from(v4))),
        IpAddr::V6(v6) => mix64(u128::from(v6) as u64 ^ (u128::from(v6) >> 64) as u64),
    }
}

/// The Maglev table of `backends` (indexes into it), with the same construction and
/// backend identity as the kernel ingress path's tables. Empty when `backends` is.
pub fn maglev_table(backends: &[SocketAddr]) -> Vec<u32> {
    let ids: Vec<u64> = backends
        .iter()
        .map(|b| match b.ip() {
            IpAddr::V4(v4) => u64::from(u32::from(v4)) << 16 | u64::from(b.port()),
            IpAddr::V6(v6) => mix64(u128::from(v6) as u64) << 16 | u64::from(b.port()),
        })
        .collect();
    let mut table = vec![0; MAGLEV_TABLE_SIZE as usize];
    let mut next = vec![0; ids.len()];
    if populate(&ids, &vec![1; ids.len()], &mut table, &mut next) {
        table
    } else {
        Vec::new()
    }
}

/// What one listener did with one backend: the active count the policies read, and
/// what the metrics endpoint shows. Updated with relaxed atomics (no lock) on the
/// relay's path: once per connection, and once per transfer for the bytes.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Connections (UDP: flows) relayed to it now, counted from the connect on.
    pub active: AtomicU32,
    /// Connections it accepted.
    pub connections: AtomicU64,
    /// Connects to it that failed or timed out (the next backend was tried).
    pub connect_errors: AtomicU64,
    /// Bytes relayed from clients to it.
    pub bytes_to_backend: AtomicU64,
    /// Bytes relayed from it to clients.
    pub bytes_to_client: AtomicU64,
}

/// A copy of [`BackendStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BackendCounters {
    /// Connections (UDP: flows) now.
    pub active: u64,
    /// Connections accepted.
    pub connections: u64,
    /// Failed connects.
    pub connect_errors: u64,
    /// Bytes from clients.
    pub bytes_to_backend: u64,
    /// Bytes to clients.
    pub bytes_to_client: u64,
}

impl BackendStats {
    fn snapshot(&self) -> BackendCounters {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BackendCounters {
            active: u64::from(self.active.load(Ordering::Relaxed)),
            connections: get(&self.connections),
            connect_errors: get(&self.connect_errors),
            bytes_to_backend: get(&self.bytes_to_backend),
            bytes_to_client: get(&self.bytes_to_client),
        }
    }
}

/// Each backend address's [`BackendStats`] for one listener, kept across backend-list
/// changes (a connection counts on the address it was relayed to until it ends).
#[derive(Debug, Default)]
pub struct Loads(parking_lot::Mutex<HashMap<SocketAddr, Arc<BackendStats>>>);

impl Loads {
    /// The stats of `backends`, in order: existing ones kept, new ones at 0, and
    /// those of addresses no longer listed dropped from the registry (connections
    /// still holding them update stats nobody reads).
    fn for_backends(&self, backends: &[SocketAddr]) -> Box<[Arc<BackendStats>]> {
        let mut map = self.0.lock();
        map.retain(|addr, _| backends.contains(addr));
        backends.iter().map(|b| map.entry(*b).or_default().clone()).collect()
    }

    /// Every listed backend's counters, sorted by address.
    pub fn snapshot(&self) -> Vec<(SocketAddr, BackendCounters)> {
        let mut out: Vec<_> = self.0.lock().iter().map(|(addr, stats)| (*addr, stats.snapshot())).collect();
        out.sort_by_key(|(addr, _)| *addr);
        out
    }
}

/// Counts one connection on a backend while it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<BackendStats>);

impl ActiveGuard {
    /// The backend's counters.
    pub fn stats(&self) -> &BackendStats {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One listener's backends and what its policy reads, swapped whole when the backends
/// or the policy change. Choosing takes no lock and allocates nothing.
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    backends: Arc<[SocketAddr]>,
    active: Box<[Arc<BackendStats>]>,
    /// Maglev's lookup table (only for [`Policy::Maglev`]).
    table: Vec<u32>,
    /// Shared by every balancer of the listener, so turns continue across swaps.
    turn: Arc<AtomicUsize>,
}

impl Balancer {
    /// A balancer over `backends` with `policy`; `loads` and `turn` are the listener's,
    /// kept from one balancer to the next.
    pub fn new(policy: Policy, backends: Vec<SocketAddr>, loads: &Loads, turn: Arc<AtomicUsize>) -> Balancer {
        let table = if policy == Policy::Maglev { maglev_table(&backends) } else { Vec::new() };
        Balancer { policy, active: loads.for_backends(&backends), backends: backends.into(), table, turn }
    }

    /// Its policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Its backends, in the order they were given.
    pub fn backends(&self) -> &[SocketAddr] {
        &self.backends
    }

    /// The order in which to try the backends for a new connection from `client`: the
    /// policy's pick first, then the others in ring order (tried when one refuses).
    pub fn order(&self, client: IpAddr) -> impl Iterator<Item = usize> + '_ {
        let n = self.backends.len();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let first = match self.policy {
            Policy::RoundRobin => round_robin_index(turn, n),
            Policy::LeastConn => least_loaded(&self.loads(), turn % n.max(1)),
            Policy::P2c => {
                // Two independent draws from the turn: no RNG state to share.
                let r = mix64(turn as u64 ^ 0x7032_6300);
                two_choices(&self.loads(), r, r >> 32)
            }
            Policy::Maglev => {
                self.table.get((client_hash(client) % MAGLEV_TABLE_SIZE as u64) as usize).map(|&i| i as usize)
            }
        }
        .unwrap_or(0);
        (0..n).map(move |i| (first + i) % n)
    }

    /// Backend `i`'s address.
    pub fn backend(&self, i: usize) -> SocketAddr {
        self.backends[i]
    }

    /// Counts a connection on backend `i` until the guard drops.
    pub fn hold(&self, i: usize) -> ActiveGuard {
        let stats = self.active[i].clone();
        stats.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(stats)
    }

    /// Backend `i`'s counters.
    pub fn stats(&self, i: usize) -> &Arc<BackendStats> {
        &self.active[i]
    }

    /// Active connections per backend now, copied without allocating (up to
    /// [`LoadSnapshot`]'s inline size).
    fn loads(&self) -> LoadSnapshot {
        LoadSnapshot::of(&self.active)
    }
}

/// A copy of a listener's load counters: inline for up to 64 backends (the common
/// case: no allocation per connection), on the heap beyond.
#[allow(
    clippy::large_enum_variant,
    reason = "a stack value that lives for one pick; boxing it would allocate"
)]
enum LoadSnapshot {
    Inline([u32; 64], usize),
    Heap(Vec<u32>),
}

impl LoadSnapshot {
    fn of(counters: &[Arc<BackendStats>]) -> LoadSnapshot {
        let mut inline = [0; 64];
        if counters.len() > inline.len() {
            return LoadSnapshot::Heap(counters.iter().map(|c| c.active.load(Ordering::Relaxed)).collect());
        }
        for (out, c) in inline.iter_mut().zip(counters) {
            *out = c.active.load(Ordering::Relaxed);
        }
        LoadSnapshot::Inline(inline, counters.len())
    }
}

impl std::ops::Deref for LoadSnapshot {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        match self {
            LoadSnapshot::Inline(a, n) => &a[..*n],
            LoadSnapshot::Heap(v) => v,
        }
    }
}

/// The index that round-robin picks for the `turn`-th connection over `len` backends.
pub fn round_robin_index(turn: usize, len: usize) -> Option<usize> {
    (len > 0).then(|| turn % len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_cycles_through_every_backend() {
        let b = balancer(Policy::RoundRobin, 3);
        let client = IpAddr::from([198, 18, 0, 100]);
        let firsts: Vec<_> = (0..6).map(|_| b.order(client).next().unwrap()).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
        let order: Vec<_> = b.order(client).collect();
        assert_eq!(order, [0, 1, 2]);
        let order: Vec<_> = b.order(client).collect();
        assert_eq!(order, [1, 2, 0]);
    }

    #[test]
    fn least_loaded_takes_the_minimum_and_rotates_ties() {
        assert_eq!(least_loaded(&[3, 1, 2], 0), Some(1));
        assert_eq!(least_loaded(&[1, 1, 1], 0), Some(0));
        assert_eq!(least_loaded(&[1, 1, 1], 2), Some(2));
        assert_eq!(least_loaded(&[0, 5, 0], 1), Some(2));
        assert_eq!(least_loaded(&[], 3), None);
    }

    #[test]
    fn two_choices_picks_two_distinct_and_keeps_the_lighter() {
        assert_eq!(two_choices(&[], 1, 2), None);
        assert_eq!(two_choices(&[9], 1, 2), Some(0));
        // a = 1 % 3 = 1, b = (1 + 1 + 0 % 2) % 3 = 2: load 5 vs 0.
        assert_eq!(two_choices(&[0, 5, 0], 1, 0), Some(2));
        // The two draws are distinct, so the one loaded backend never wins.
        for r1 in 0..50 {
            for r2 in 0..50 {
                assert_ne!(two_choices(&[0, 100, 0, 0], r1, r2), Some(1));
            }
        }
    }

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n).map(|i| SocketAddr::from(([10, 0, 0, i], 80))).collect()
    }

    fn balancer(policy: Policy, n: u8) -> Balancer {
        Balancer::new(policy, addrs(n), &Loads::default(), Arc::default())
    }

    #[test]
    fn leastconn_sends_new_connections_away_from_busy_backends() {
        let b = balancer(Policy::LeastConn, 3);
        let client = IpAddr::from([198, 18, 0, 100]);
        let _busy: Vec<_> = (0..5).map(|_| b.hold(0)).collect();
        let picks: Vec<usize> = (0..4).map(|_| b.order(client).next().unwrap()).collect();
        assert!(picks.iter().all(|&i| i != 0), "{picks:?}");
        assert!(picks.contains(&1) && picks.contains(&2), "idle backends take turns: {picks:?}");
    }

    #[test]
    fn loads_survive_a_backend_list_change() {
        let loads = Loads::default();
        let turn = Arc::<AtomicUsize>::default();
        let old = Balancer::new(Policy::LeastConn, addrs(2), &loads, turn.clone());
        let _held = old.hold(1);
        let new = Balancer::new(Policy::LeastConn, addrs(3), &loads, turn);
        assert_eq!(&*new.loads(), &[0, 1, 0]);
    }

    #[test]
    fn maglev_keeps_a_client_on_its_backend_and_spreads_clients() {
        let b = balancer(Policy::Maglev, 4);
        let mut seen = std::collections::BTreeSet::new();
        for c in 0..200u32 {
            let client = IpAddr::from(std::net::Ipv4Addr::from(0xc612_0000 + c));
            let first = b.order(client).next().unwrap();
            assert!((0..10).all(|_| b.order(client).next() == Some(first)));
            seen.insert(first);
        }
        assert_eq!(seen.len(), 4, "200 clients reach all 4 backends");
    }

    #[test]
    fn p2c_uses_every_backend() {
        let b = balancer(Policy::P2c, 5);
        let client = IpAddr::from([198, 18, 0, 100]);
        let seen: std::collections::BTreeSet<usize> =
            (0..200).map(|_| b.order(client).next().unwrap()).collect();
        assert_eq!(seen.len(), 5);
    }

    #[test]
    fn every_policy_orders_every_backend_once_for_failover() {
        for policy in [Policy::RoundRobin, Policy::LeastConn, Policy::P2c, Policy::Maglev] {
            let b = balancer(policy, 4);
            let mut order: Vec<usize> = b.order(IpAddr::from([1, 2, 3, 4])).collect();
            order.sort();
            assert_eq!(order, [0, 1, 2, 3], "{policy}");
            assert_eq!(balancer(policy, 0).order(IpAddr::from([1, 2, 3, 4])).count(), 0);
        }
    }

    #[test]
    fn policy_names_round_trip_and_a_bad_one_names_the_choices() {
        for p in [Policy::RoundRobin, Policy::LeastConn, Policy::P2c, Policy::Maglev] {
            assert_eq!(p.as_str().parse::<Policy>(), Ok(p));
        }
        let err = "fastest".parse::<Policy>().unwrap_err();
        assert!(err.contains("rr, leastconn, p2c or maglev"), "{err}");
    }

    #[test]
    fn no_backends_means_no_pick() {
        assert_eq!(round_robin_index(7, 0), None);
    }
}
