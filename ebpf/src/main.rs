//! meshd's kernel programs. Each entry point is thin: it reads its context, asks
//! `meshd_common` what to do and does it. The host build is an empty `main` so the
//! workspace still tests and lints on the host.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
        macros::{cgroup_sock_addr, map},
        maps::{Array, HashMap, LruHashMap, PerCpuArray},
        programs::SockAddrContext,
        EbpfContext as _,
    };
    use meshd_common::{
        choose_slot, local_form_applies, port_from_user, resolve_frontend, reverse_write_needed,
        socket_proto, BackendKey, BackendValue, Forward, FrontendKey, LbConfig, ReverseKey, ReverseValue,
        ServiceValue, SockStats, ECONNREFUSED, MAX_BACKEND_SLOTS, MAX_LOCAL_ADDRS, MAX_REVERSE, MAX_SERVICES,
        SOCK_ADDR_ALLOW, SOCK_ADDR_DENY, STATS_CONNECT4, STATS_ENTRIES, STATS_GETPEERNAME4, STATS_RECVMSG4,
        STATS_SENDMSG4,
    };

    /// Per-CPU counters of the socket-address hooks, indexed by `STATS_*`.
    #[map(name = "SOCK_STATS")]
    static SOCK_STATS: PerCpuArray<SockStats> = PerCpuArray::with_max_entries(STATS_ENTRIES, 0);

    /// Service frontends (`meshd_common::SERVICES_MAP`).
    #[map(name = "LB_SERVICES")]
    static LB_SERVICES: HashMap<FrontendKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);

    /// Backend slots (`meshd_common::BACKENDS_MAP`).
    #[map(name = "LB_BACKENDS")]
    static LB_BACKENDS: HashMap<BackendKey, BackendValue> = HashMap::with_max_entries(MAX_BACKEND_SLOTS, 0);

    /// Reverse translations (`meshd_common::REVERSE_MAP`).
    #[map(name = "LB_REVERSE")]
    static LB_REVERSE: LruHashMap<ReverseKey, ReverseValue> = LruHashMap::with_max_entries(MAX_REVERSE, 0);

    /// The node's own addresses (`meshd_common::LOCAL_ADDRS_MAP`).
    #[map(name = "LB_LOCAL_ADDRS")]
    static LB_LOCAL_ADDRS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

    /// The loader's settings (`meshd_common::CONFIG_MAP`, index 0).
    #[map(name = "LB_CONFIG")]
    static LB_CONFIG: Array<LbConfig> = Array::with_max_entries(1, 0);

    /// cgroup `connect4`: a `connect()` to a frontend goes to one of its backends.
    #[cgroup_sock_addr(connect4)]
    pub fn connect4(ctx: SockAddrContext) -> i32 {
        try_forward(&ctx, STATS_CONNECT4)
    }

    /// cgroup `sendmsg4`: a datagram sent to a frontend goes to one of its backends.
    #[cgroup_sock_addr(sendmsg4)]
    pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
        try_forward(&ctx, STATS_SENDMSG4)
    }

    /// cgroup `recvmsg4`: a datagram from a backend shows the frontend as its sender.
    #[cgroup_sock_addr(recvmsg4)]
    pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
        try_reverse(&ctx, STATS_RECVMSG4)
    }

    /// cgroup `getpeername4`: a socket connected through a frontend names the frontend.
    #[cgroup_sock_addr(getpeername4)]
    pub fn getpeername4(ctx: SockAddrContext) -> i32 {
        try_reverse(&ctx, STATS_GETPEERNAME4)
    }

    fn count(index: u32, rewritten: bool) {
        if let Some(stats) = SOCK_STATS.get_ptr_mut(index) {
            // SAFETY: the pointer comes from the map lookup and is this CPU's slot.
            unsafe {
                (*stats).seen += 1;
                if rewritten {
                    (*stats).rewritten += 1;
                }
            }
        }
    }

    fn try_forward(ctx: &SockAddrContext, stats: u32) -> i32 {
        // SAFETY: the kernel hands the program a valid bpf_sock_addr.
        let sa = unsafe { &mut *ctx.sock_addr };
        let addr_raw = sa.user_ip4;
        let port_raw = port_from_user(sa.user_port);
        let proto = socket_proto(sa.protocol, sa.type_);
        // SAFETY (first two closures): read-only lookups of hash maps; values are copied out.
        let forward = resolve_frontend(
            addr_raw,
            port_raw,
            proto,
            |key| unsafe { LB_SERVICES.get(key) }.copied(),
            |addr| unsafe { LB_LOCAL_ADDRS.get(addr) }.is_some(),
            || {
                let config = LB_CONFIG.get(0).copied().unwrap_or_default();
                // SAFETY: sock_addr programs may call this helper with their context.
                local_form_applies(&config, unsafe { bpf_get_netns_cookie(ctx.as_ptr()) })
            },
        );
        match forward {
            Forward::Pass => {
                count(stats, false);
                SOCK_ADDR_ALLOW
            }
            Forward::Refuse => {
                count(stats, false);
                refuse()
            }
            Forward::Balance { service_id, count: backends } => {
                // SAFETY: helper without preconditions.
                let slot = choose_slot(unsafe { bpf_get_prandom_u32() }, backends);
                let key = BackendKey { service_id, slot };
                // SAFETY: read-only lookup, copied out.
                let Some(backend) = (unsafe { LB_BACKENDS.get(key) }).copied() else {
                    // A slot below the count is always written first; a miss means the
                    // maps are being torn down. Refusing beats leaving for a VIP nobody holds.
                    count(stats, false);
                    return refuse();
                };
                // SAFETY: sock_addr programs may call this helper with their context.
                let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
                let (to_addr, to_port) = backend.destination(port_raw);
                let reverse = ReverseValue { addr_raw, port_raw, pad: 0 };
                let reverse_key = ReverseKey::new(cookie, to_addr, to_port);
                // A connect is a fresh translation; a datagram often repeats the last one.
                // SAFETY: read-only lookup, copied out.
                let write = stats != STATS_SENDMSG4
                    || reverse_write_needed(unsafe { LB_REVERSE.get(reverse_key) }.copied(), reverse);
                if write {
                    // Best effort: with the LRU full the oldest entry goes; a failure only
                    // costs the frontend's name in getpeername/recvmsg, not the connection.
                    let _ = LB_REVERSE.insert(reverse_key, reverse, 0);
                }
                sa.user_ip4 = to_addr;
                sa.user_port = u32::from(to_port);
                count(stats, true);
                SOCK_ADDR_ALLOW
            }
        }
    }

    fn refuse() -> i32 {
        // SAFETY: helper without preconditions; connect4/sendmsg4 may set the return
        // value, so the syscall fails with ECONNREFUSED instead of EPERM.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        SOCK_ADDR_DENY
    }

    fn try_reverse(ctx: &SockAddrContext, stats: u32) -> i32 {
        // SAFETY: the kernel hands the program a valid bpf_sock_addr.
        let sa = unsafe { &mut *ctx.sock_addr };
        // SAFETY: sock_addr programs may call this helper with their context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let key = ReverseKey::new(cookie, sa.user_ip4, port_from_user(sa.user_port));
        // SAFETY: read-only lookup, copied out.
        match unsafe { LB_REVERSE.get(key) }.copied() {
            Some(frontend) => {
                sa.user_ip4 = frontend.addr_raw;
                sa.user_port = u32::from(frontend.port_raw);
                count(stats, true);
            }
            None => count(stats, false),
        }
        // recvmsg4/getpeername4 must return 1.
        SOCK_ADDR_ALLOW
    }

    mod ingress;

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
