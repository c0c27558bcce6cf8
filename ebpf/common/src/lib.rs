//! The vocabulary shared by meshd's kernel programs and its user side.
//!
//! Everything here is `#![no_std]`, `#[repr(C)]` and made of fixed-width integers, so
//! the same bytes mean the same thing on both sides of a BPF map. Decisions the kernel
//! programs take live here as plain functions, unit-tested on the host.
//!
//! ## Byte orders
//! Addresses and ports in the maps are stored exactly as the kernel's `bpf_sock_addr`
//! holds them, so the programs compare and copy without converting:
//! - an IPv4 address is the four octets in network order, read as a native `u32`
//!   ([`ip4_raw`] / [`ip4_octets`]);
//! - a port is the two bytes in network order, read as a native `u16` ([`port_raw`] /
//!   [`port_host`]); `bpf_sock_addr.user_port` carries that value zero-extended to `u32`.
//!
//! Fields holding such values end in `_raw`.
#![no_std]

pub mod ingress;
pub mod maglev;
pub mod packet;
pub mod socklb;

pub use socklb::*;

/// Name of the per-CPU array the socket programs count into.
pub const SOCK_STATS_MAP: &str = "SOCK_STATS";

/// Index of the `connect4` counters in [`SOCK_STATS_MAP`].
pub const STATS_CONNECT4: u32 = 0;
/// Index of the `sendmsg4` counters in [`SOCK_STATS_MAP`].
pub const STATS_SENDMSG4: u32 = 1;
/// Index of the `recvmsg4` counters in [`SOCK_STATS_MAP`].
pub const STATS_RECVMSG4: u32 = 2;
/// Index of the `getpeername4` counters in [`SOCK_STATS_MAP`].
pub const STATS_GETPEERNAME4: u32 = 3;

/// Number of entries in [`SOCK_STATS_MAP`].
pub const STATS_ENTRIES: u32 = 4;

/// What a cgroup `sock_addr` program returns to let the syscall proceed.
pub const SOCK_ADDR_ALLOW: i32 = 1;

/// What a cgroup `sock_addr` program returns to fail the syscall (with `EPERM`, or the
/// error set by `bpf_set_retval` before returning).
pub const SOCK_ADDR_DENY: i32 = 0;

/// Counters one socket-address hook keeps per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockStats {
    /// Calls the hook saw.
    pub seen: u64,
    /// Calls whose address the hook rewrote (to a backend, or back to the frontend).
    pub rewritten: u64,
}

const _: () = assert!(core::mem::size_of::<SockStats>() == 16);

impl SockStats {
    /// Sums per-CPU counters into one.
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a SockStats>) -> SockStats {
        per_cpu.into_iter().fold(SockStats::default(), |acc, s| SockStats {
            seen: acc.seen.wrapping_add(s.seen),
            rewritten: acc.rewritten.wrapping_add(s.rewritten),
        })
    }
}

#[cfg(feature = "user")]
// SAFETY: `SockStats` is `repr(C)`, has no padding (asserted above) and every bit
// pattern is a valid value.
unsafe impl aya::Pod for SockStats {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_per_cpu_counters() {
        let cpus = [SockStats { seen: 3, rewritten: 1 }, SockStats { seen: 4, rewritten: 0 }];
        assert_eq!(SockStats::sum(&cpus), SockStats { seen: 7, rewritten: 1 });
    }

    #[test]
    fn sum_wraps_instead_of_panicking() {
        let cpus = [SockStats { seen: u64::MAX, rewritten: 0 }, SockStats { seen: 2, rewritten: 0 }];
        assert_eq!(SockStats::sum(&cpus).seen, 1);
    }
}
