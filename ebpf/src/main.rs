//! meshd's kernel programs. Each entry point is thin: it reads its context, asks
//! `meshd_common` what to do and does it. The host build is an empty `main` so the
//! workspace still tests and lints on the host.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        macros::{cgroup_sock_addr, map},
        maps::PerCpuArray,
        programs::SockAddrContext,
    };
    use meshd_common::{SockStats, SOCK_ADDR_ALLOW, STATS_CONNECT4, STATS_ENTRIES};

    /// Per-CPU counters of the socket-address hooks, indexed by `STATS_*`.
    #[map(name = "SOCK_STATS")]
    static SOCK_STATS: PerCpuArray<SockStats> = PerCpuArray::with_max_entries(STATS_ENTRIES, 0);

    /// cgroup `connect4`: sees every IPv4 `connect()` of the node's cgroup. For now it
    /// counts and lets the call through; service VIP rewriting plugs in here.
    #[cgroup_sock_addr(connect4)]
    pub fn connect4(ctx: SockAddrContext) -> i32 {
        try_connect4(&ctx)
    }

    fn try_connect4(_ctx: &SockAddrContext) -> i32 {
        if let Some(stats) = SOCK_STATS.get_ptr_mut(STATS_CONNECT4) {
            // SAFETY: the pointer comes from the map lookup and is this CPU's slot.
            unsafe { (*stats).seen += 1 };
        }
        SOCK_ADDR_ALLOW
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
