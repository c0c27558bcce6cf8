//! Load-balancing policies: which backend a new connection goes to. Pure functions
//! over plain data; the proxy applies them.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The index that round-robin picks for the `turn`-th connection over `len` backends.
pub fn round_robin_index(turn: usize, len: usize) -> Option<usize> {
    (len > 0).then(|| turn % len)
}

/// Round-robin over a changing backend list, shared by all connections of a listener.
#[derive(Debug, Default)]
pub struct RoundRobin {
    turn: AtomicUsize,
}

impl RoundRobin {
    /// The order in which to try `backends` for the next connection: the round-robin
    /// pick first, then the others in ring order (used when a backend refuses).
    pub fn order<'a, T>(&self, backends: &'a [T]) -> impl Iterator<Item = &'a T> + 'a {
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let start = round_robin_index(turn, backends.len()).unwrap_or(0);
        (0..backends.len()).map(move |i| &backends[(start + i) % backends.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_cycles_through_every_backend() {
        let rr = RoundRobin::default();
        let backends = ["a", "b", "c"];
        let firsts: Vec<_> = (0..6).map(|_| *rr.order(&backends).next().unwrap()).collect();
        assert_eq!(firsts, ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn order_lists_every_backend_once_for_failover() {
        let rr = RoundRobin::default();
        rr.order(&[1]).for_each(drop);
        let order: Vec<_> = rr.order(&[1, 2, 3]).copied().collect();
        assert_eq!(order, [2, 3, 1]);
    }

    #[test]
    fn no_backends_means_no_pick() {
        assert_eq!(round_robin_index(7, 0), None);
        assert_eq!(RoundRobin::default().order::<u8>(&[]).count(), 0);
    }
}
