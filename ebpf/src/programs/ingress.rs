//! The kernel routing mesh for published ports (#6): XDP `ingress_xdp` on the underlay
//! interface and tc `ingress_reply` on each local task's host veth. The maps and the
//! decisions are `meshd_common::ingress` and `meshd_common::packet`; this file only
//! bounds-checks, reads and writes bytes, and calls helpers.
//!
//! Every header is read at a fixed offset (IPv4 options are passed to the stack), so
//! each access is one explicit bounds check the verifier can follow.
//!
//! ## What the loader must provide (tested in `dataplane/tests/ingress_fixtures.rs`)
//! - `IN_CONFIG[0]`: the node's underlay address and the underlay's ifindex (the tc
//!   program looks next hops up through it), NAT port range. Without it every remote
//!   or reply path passes to the stack, counted as unrouted.
//! - IPv4 forwarding on the loopback (`net.ipv4.conf.lo.forwarding=1`): the next-hop
//!   lookups run as the node's own output lookups through `lo`, and `bpf_fib_lookup`
//!   answers `BPF_FIB_LKUP_RET_FWD_DISABLED` unless the interface it is given forwards.
//!   (Forwarding on `lo` routes nothing that arrives from outside.)
//! - Nothing for neighbours: XDP leaves a packet whose next hop has no resolved
//!   neighbour to the stack (the overlay's own traffic resolves the VTEPs); the tc
//!   reply path hands such a reply to `bpf_redirect_neigh`, which resolves it (a DSR
//!   backend's node has never talked to the client).
//! - `ingress_xdp` on the underlay (native where the driver has it, veth does; generic
//!   works too), `ingress_reply` on each local task's host veth at tc ingress.
//! - On veths: GRO on the task's `eth0` and on the underlay's switch-side peer (a
//!   native-XDP redirect into a veth is dropped unless its peer runs NAPI); and a
//!   veth underlay must carry complete checksums, as a NIC's wire does (`ethtool -K
//!   <dev> tx off` on every underlay end: nodes' `eth0`, clients). A veth sender
//!   leaves TCP/UDP checksums partial, native XDP rewrites bare bytes, and the
//!   redirected frame loses the skb's checksum state: the receiver gets a bad one.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, bpf_redir_neigh, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK,
        TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
    helpers::{
        bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh,
        bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
    EbpfContext as _,
};
use meshd_common::{
    ingress::{
        flow_choice, frontend_key, maglev_slot, nat_needs_refresh, nat_port_candidate, nat_port_usable,
        reply_key, Flow, FlowChoice, FlowKey, IngressBackend, IngressConfig, IngressFrontend, Nat,
        BACKEND_LIVE, BACKEND_LOCAL, DEFAULT_INGRESS_TABLES, IN_STAT_DROP_MALFORMED, IN_STAT_DSR_RECORDED,
        IN_STAT_ENCAP, IN_STAT_ENTRIES, IN_STAT_LOCAL, IN_STAT_NO_BACKEND, IN_STAT_PASS, IN_STAT_REPLY_TC,
        IN_STAT_REPLY_XDP, IN_STAT_UNROUTED, MAX_INGRESS_BACKENDS, MAX_INGRESS_FLOWS, MAX_INGRESS_FRONTENDS,
        MAX_INGRESS_NAT, MODE_DSR, NAT_PORT_PROBES, VXLAN_OVERHEAD, VXLAN_PORT,
    },
    maglev::{flow_hash, MAGLEV_TABLE_SIZE},
    packet::{
        check_ipv4, icmp_is_flow_error, ipv4_check_after, l4_check_after, quote_checks_after, tcp_doff_valid,
        tcp_opens, vxlan_dsr_port, vxlan_src_port, write_outer_headers, Ipv4Verdict, Outer, Tuple, ETH_LEN,
        ETH_P_IP_BYTES, ICMP_LEN, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPV4_LEN, OUTER_LEN, TCP_LEN,
        UDP_LEN, VXLAN_LEN,
    },
    port_raw, FrontendKey,
};

/// Published ports of this node (`meshd_common::ingress::INGRESS_FRONTENDS_MAP`).
#[map(name = "IN_FRONTENDS")]
static IN_FRONTENDS: HashMap<FrontendKey, IngressFrontend> =
    HashMap::with_max_entries(MAX_INGRESS_FRONTENDS, 0);

/// Backends by id (`INGRESS_BACKENDS_MAP`).
#[map(name = "IN_BACKENDS")]
static IN_BACKENDS: Array<IngressBackend> = Array::with_max_entries(MAX_INGRESS_BACKENDS, 0);

/// Maglev tables (`INGRESS_MAGLEV_MAP`).
#[map(name = "IN_MAGLEV")]
static IN_MAGLEV: Array<u32> = Array::with_max_entries(DEFAULT_INGRESS_TABLES * MAGLEV_TABLE_SIZE, 0);

/// Client flows (`INGRESS_FLOWS_MAP`).
#[map(name = "IN_FLOWS")]
static IN_FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(MAX_INGRESS_FLOWS, 0);

/// Reverse translations (`INGRESS_NAT_MAP`).
#[map(name = "IN_NAT")]
static IN_NAT: LruHashMap<FlowKey, Nat> = LruHashMap::with_max_entries(MAX_INGRESS_NAT, 0);

/// The loader's settings (`INGRESS_CONFIG_MAP`, index 0).
#[map(name = "IN_CONFIG")]
static IN_CONFIG: Array<IngressConfig> = Array::with_max_entries(1, 0);

/// Per-CPU outcome counters (`INGRESS_STATS_MAP`).
#[map(name = "IN_STATS")]
static IN_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(IN_STAT_ENTRIES, 0);

/// `AF_INET`, for the FIB lookup.
const AF_INET: u8 = 2;

/// The loopback interface's index (the same in every network namespace).
const LOOPBACK_IFINDEX: u32 = 1;
/// Where the IPv4 header starts in a plain frame.
const IP_OFF: usize = ETH_LEN;
/// Where the transport header starts in a plain frame.
const L4_OFF: usize = ETH_LEN + IPV4_LEN;
/// Where the VXLAN header starts in an encapsulated frame.
const VXLAN_OFF: usize = ETH_LEN + IPV4_LEN + UDP_LEN;
/// Where the inner Ethernet frame starts.
const INNER_OFF: usize = VXLAN_OFF + VXLAN_LEN;

const _: () = assert!(OUTER_LEN == VXLAN_OVERHEAD && INNER_OFF == VXLAN_OVERHEAD);

/// What a program does with a packet, and the counter it bumps.
type Outcome<A> = (A, u32);

fn count(stat: u32) {
    if let Some(c) = IN_STATS.get_ptr_mut(stat) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *c += 1 };
    }
}

/// A pointer to a `T` at `off` bytes into `[start, end)`, or `None` when it does not fit.
#[inline(always)]
fn at<T>(start: usize, end: usize, off: usize) -> Option<*mut T> {
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Reads a `T` at `off`, bounds-checked.
#[inline(always)]
fn read<T: Copy>(start: usize, end: usize, off: usize) -> Option<T> {
    // SAFETY: `at` checked the bytes lie inside the packet.
    at::<T>(start, end, off).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

/// Writes a `T` at `off`, bounds-checked.
#[inline(always)]
fn write<T>(start: usize, end: usize, off: usize, v: T) -> Option<()> {
    // SAFETY: `at` checked the bytes lie inside the packet.
    at::<T>(start, end, off).map(|p| unsafe { core::ptr::write_unaligned(p, v) })
}

/// The next hop toward `dst_raw` from `src_raw`: the route lookup of a packet the
/// node itself sends (input interface the loopback, no output interface forced), so
/// it neither depends on where the packet came in nor needs forwarding on any real
/// interface — `bpf_fib_lookup` checks forwarding only on the interface it is given,
/// and meshd turns it on for `lo` alone. `None`: no route.
#[inline(always)]
fn fib(ctx: *mut core::ffi::c_void, src_raw: u32, dst_raw: u32, proto: u8, tot_len: u16) -> Option<NextHop> {
    // SAFETY: a plain C struct, all-zero is a valid value.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = proto;
    p.ifindex = LOOPBACK_IFINDEX;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.__bindgen_anon_3.ipv4_src = src_raw;
    p.__bindgen_anon_4.ipv4_dst = dst_raw;
    // SAFETY: `p` is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe { bpf_fib_lookup(ctx, &mut p, size_of::<FibParams>() as i32, 0) };
    match rc {
        r if r == BPF_FIB_LKUP_RET_SUCCESS as i64 => Some(NextHop::Resolved(p)),
        // `ifindex` and `ipv4_dst` (the gateway, if any) are filled in before this answer.
        r if r == BPF_FIB_LKUP_RET_NO_NEIGH as i64 => Some(NextHop::Unresolved(p)),
        _ => None,
    }
}

/// What the FIB said about a next hop.
enum NextHop {
    /// Route and neighbour known: `smac`/`dmac` are filled in.
    Resolved(FibParams),
    /// Route known, neighbour not resolved (yet): only tc can hand the packet to the
    /// neighbour subsystem (`bpf_redirect_neigh`); XDP leaves it to the stack.
    Unresolved(FibParams),
}

/// The next hop toward `dst_raw` with its neighbour resolved (the XDP paths).
#[inline(always)]
fn fib_resolved(
    ctx: *mut core::ffi::c_void,
    src_raw: u32,
    dst_raw: u32,
    proto: u8,
    tot_len: u16,
) -> Option<FibParams> {
    match fib(ctx, src_raw, dst_raw, proto, tot_len)? {
        NextHop::Resolved(p) => Some(p),
        NextHop::Unresolved(_) => None,
    }
}

/// Rewrites the addresses and ports of the IPv4 TCP/UDP packet whose IPv4 header is at
/// `ip_off` from `old` to `new`, with both checksums updated incrementally.
#[inline(always)]
fn rewrite(start: usize, end: usize, ip_off: usize, proto: u8, old: &Tuple, new: &Tuple) -> Option<()> {
    let l4 = ip_off + IPV4_LEN;
    let csum_off = if proto == IPPROTO_TCP { l4 + 16 } else { l4 + 6 };
    let l4_check: u16 = read(start, end, csum_off)?;
    let ip_check: u16 = read(start, end, ip_off + 10)?;
    write(start, end, csum_off, l4_check_after(l4_check, proto, old, new))?;
    write(start, end, ip_off + 10, ipv4_check_after(ip_check, old, new))?;
    write(start, end, ip_off + 12, new.src_raw)?;
    write(start, end, ip_off + 16, new.dst_raw)?;
    write(start, end, l4, new.sport_raw)?;
    write(start, end, l4 + 2, new.dport_raw)
}

/// What a plain IPv4 TCP/UDP frame at the start of the packet holds.
struct Parsed {
    tuple: Tuple,
    proto: u8,
    tot_len: u16,
    /// TCP flags (0 for UDP).
    flags: u8,
}

/// Parses Ethernet, IPv4 and the transport ports of the frame whose IPv4 header is at
/// `ip_off`. `Err` carries the outcome for a packet that is not for the fast path.
#[inline(always)]
fn parse(start: usize, end: usize, ip_off: usize) -> Result<Parsed, Outcome<u32>> {
    const PASS: Outcome<u32> = (xdp_action::XDP_PASS, IN_STAT_PASS);
    let eth_type: [u8; 2] = read(start, end, ip_off - 2).ok_or(PASS)?;
    if eth_type != ETH_P_IP_BYTES {
        return Err(PASS);
    }
    // The EtherType promised IPv4 but the header is cut short: nobody can use it.
    let hdr: [u8; IPV4_LEN] =
        read(start, end, ip_off).ok_or((xdp_action::XDP_DROP, IN_STAT_DROP_MALFORMED))?;
    let (proto, tot_len) = match check_ipv4(&hdr, end - start - ip_off) {
        Ipv4Verdict::Plain { proto, tot_len } => (proto, tot_len),
        Ipv4Verdict::Pass => return Err(PASS),
        Ipv4Verdict::Malformed => return Err((xdp_action::XDP_DROP, IN_STAT_DROP_MALFORMED)),
    };
    let l4 = ip_off + IPV4_LEN;
    let l4_len = tot_len as usize - IPV4_LEN;
    let flags = match proto {
        IPPROTO_TCP => {
            if l4_len < TCP_LEN {
                return Err(PASS);
            }
            let off_flags: [u8; 2] = read(start, end, l4 + 12).ok_or(PASS)?;
            if !tcp_doff_valid(off_flags[0]) {
                return Err(PASS);
            }
            // The checksum field must be inside the packet for a rewrite.
            read::<u16>(start, end, l4 + 16).ok_or(PASS)?;
            off_flags[1]
        }
        IPPROTO_UDP => {
            if l4_len < UDP_LEN {
                return Err(PASS);
            }
            read::<u16>(start, end, l4 + 6).ok_or(PASS)?;
            0
        }
        // Its "ports" are type, code and checksum: only `handle_icmp` looks at it.
        IPPROTO_ICMP => 0,
        _ => return Err(PASS),
    };
    let ports: [u16; 2] = read(start, end, l4).ok_or(PASS)?;
    Ok(Parsed { tuple: Tuple::of_ipv4(&hdr, ports), proto, tot_len, flags })
}

/// XDP on the underlay interface: published-port traffic in, snat replies back.
#[xdp]
pub fn ingress_xdp(ctx: XdpContext) -> u32 {
    let (action, stat) = try_ingress_xdp(&ctx);
    count(stat);
    action
}

fn try_ingress_xdp(ctx: &XdpContext) -> Outcome<u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let p = match parse(start, end, IP_OFF) {
        Ok(p) => p,
        Err(outcome) => return outcome,
    };
    if p.proto == IPPROTO_UDP && p.tuple.dport_raw == port_raw(VXLAN_PORT) {
        return handle_vxlan(ctx, &p);
    }
    if p.proto == IPPROTO_ICMP {
        return handle_icmp(ctx, &p);
    }
    // SAFETY: read-only lookup, copied out.
    let Some(fe) =
        (unsafe { IN_FRONTENDS.get(frontend_key(p.tuple.dst_raw, p.tuple.dport_raw, p.proto)) }).copied()
    else {
        return (xdp_action::XDP_PASS, IN_STAT_PASS);
    };
    handle_frontend(ctx, &fe, &p)
}

/// The backend id for this packet's flow, its NAT port, and whether the flow is new
/// (to be recorded). Its own BPF function: its stack frame is gone by the time the
/// handlers (which need theirs) run.
#[inline(never)]
fn choose_backend(
    fe: &IngressFrontend,
    key: &FlowKey,
    hash: u32,
    opens: bool,
) -> Result<(u32, u16, bool), Outcome<u32>> {
    // SAFETY: read-only lookups, copied out.
    let flow = unsafe { IN_FLOWS.get(key) }.copied();
    let flow_backend = flow.and_then(|f| IN_BACKENDS.get(f.backend).copied());
    match flow_choice(flow, flow_backend, opens) {
        FlowChoice::Pass => Err((xdp_action::XDP_PASS, IN_STAT_PASS)),
        // `flow_choice` keeps only a flow whose backend it was given.
        FlowChoice::Keep { backend, nat_port_raw } => Ok((backend, nat_port_raw, false)),
        FlowChoice::Balance => {
            if fe.count == 0 {
                return Err((xdp_action::XDP_PASS, IN_STAT_NO_BACKEND));
            }
            let id =
                *IN_MAGLEV.get(maglev_slot(fe, hash)).ok_or((xdp_action::XDP_PASS, IN_STAT_NO_BACKEND))?;
            let b = IN_BACKENDS.get(id).ok_or((xdp_action::XDP_PASS, IN_STAT_NO_BACKEND))?;
            if b.flags & BACKEND_LIVE == 0 {
                return Err((xdp_action::XDP_PASS, IN_STAT_NO_BACKEND));
            }
            Ok((id, 0, true))
        }
    }
}

/// One packet to a frontend, with the backend chosen for its flow. Small on purpose:
/// it lives in the entry function's frame, which the verifier adds to the handler's
/// (512 bytes for the whole call chain).
struct Job {
    key: FlowKey,
    hash: u32,
    /// Backend id.
    id: u32,
    /// NAT port of an established snat flow (raw).
    nat_port_raw: u16,
    /// The flow is new (or moved): record it.
    new: bool,
    /// The frontend's mode is DSR.
    dsr: bool,
    /// The packet is an ICMP error about the flow (already rewritten by
    /// [`icmp_rewrite`]; encapsulated without a DSR mark).
    icmp: bool,
    /// A TCP SYN: a connection (re)opens on this 5-tuple, so its reply entry is
    /// written again even for a known flow (a client port reused after another
    /// frontend's flow — e.g. a DSR record on this node — took the same reply key).
    syn: bool,
}

fn handle_frontend(ctx: &XdpContext, fe: &IngressFrontend, p: &Parsed) -> Outcome<u32> {
    let t = &p.tuple;
    let key = FlowKey {
        src_raw: t.src_raw,
        dst_raw: t.dst_raw,
        sport_raw: t.sport_raw,
        dport_raw: t.dport_raw,
        proto: p.proto,
        pad: [0; 3],
    };
    let opens = p.proto == IPPROTO_UDP || tcp_opens(p.flags);
    let hash = flow_hash(t.src_raw, t.dst_raw, t.sport_raw, t.dport_raw, p.proto);
    let (id, nat_port_raw, new) = match choose_backend(fe, &key, hash, opens) {
        Ok(c) => c,
        Err(outcome) => return outcome,
    };
    let Some(b) = IN_BACKENDS.get(id) else { return (xdp_action::XDP_PASS, IN_STAT_NO_BACKEND) };
    let local = b.flags & BACKEND_LOCAL != 0;
    let syn = p.proto == IPPROTO_TCP && opens;
    let job = Job { key, hash, id, nat_port_raw, new, dsr: fe.mode == MODE_DSR, icmp: false, syn };
    if local {
        return handle_local(ctx, p, &job);
    }
    let mut hop = Hop::default();
    if prepare_remote(ctx, p, &job, &mut hop).is_none() {
        return (xdp_action::XDP_PASS, IN_STAT_UNROUTED);
    }
    encap_remote(ctx, p, &job, &hop)
}

/// Local backend: DNAT to the task, redirect into its host veth.
#[inline(never)]
fn handle_local(ctx: &XdpContext, p: &Parsed, job: &Job) -> Outcome<u32> {
    // The map value itself, not a copy: no stack.
    let Some(b) = IN_BACKENDS.get(job.id) else { return (xdp_action::XDP_PASS, IN_STAT_NO_BACKEND) };
    let t = &p.tuple;
    let to = Tuple { src_raw: t.src_raw, dst_raw: b.addr_raw, sport_raw: t.sport_raw, dport_raw: b.port_raw };
    if job.new || job.syn {
        // SAFETY: helper without preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        let reply = reply_key(b.addr_raw, b.port_raw, t.src_raw, t.sport_raw, p.proto);
        let nat = Nat {
            src_raw: t.dst_raw,
            dst_raw: t.src_raw,
            sport_raw: t.dport_raw,
            dport_raw: t.sport_raw,
            pad: 0,
            created_ns: now,
        };
        if IN_NAT.insert(reply, nat, 0).is_err()
            || IN_FLOWS
                .insert(job.key, Flow { backend: job.id, gen: b.gen, nat_port_raw: 0, pad: 0 }, 0)
                .is_err()
        {
            return (xdp_action::XDP_PASS, IN_STAT_UNROUTED);
        }
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if rewrite(start, end, IP_OFF, p.proto, t, &to).is_none()
        || write(start, end, 0, b.mac).is_none()
        || write(start, end, 6, b.gw_mac).is_none()
    {
        return (xdp_action::XDP_DROP, IN_STAT_DROP_MALFORMED);
    }
    // SAFETY: helper without preconditions; it returns XDP_REDIRECT or XDP_ABORTED.
    let action = unsafe { bpf_redirect(b.ifindex, 0) } as u32;
    (action, IN_STAT_LOCAL)
}

/// snat to a remote backend: a reply key `task:target → gw:port` that is free (or
/// this client's, or idle) and recorded, trying the client's own port first.
#[inline(always)]
fn claim_nat_port(b: &IngressBackend, p: &Parsed, hash: u32, cfg: &IngressConfig) -> Option<u16> {
    let t = &p.tuple;
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let nat = Nat {
        src_raw: t.dst_raw,
        dst_raw: t.src_raw,
        sport_raw: t.dport_raw,
        dport_raw: t.sport_raw,
        pad: 0,
        created_ns: now,
    };
    let mut port = t.sport_raw;
    let mut attempt = 0;
    loop {
        let reply = reply_key(b.addr_raw, b.port_raw, b.gw_raw, port, p.proto);
        // SAFETY: read-only lookup, copied out.
        let held = unsafe { IN_NAT.get(reply) }.copied();
        // A free key is taken only if it is still free: another CPU may be claiming it
        // for another client's SYN right now (the loser probes on).
        let flags = if held.is_none() { BPF_NOEXIST as u64 } else { 0 };
        if nat_port_usable(held, t.src_raw, t.sport_raw, p.proto, now)
            && IN_NAT.insert(reply, nat, flags).is_ok()
        {
            return Some(port);
        }
        if attempt >= NAT_PORT_PROBES {
            return None;
        }
        port = port_raw(nat_port_candidate(hash, attempt, cfg.nat_port_min, cfg.nat_port_max));
        attempt += 1;
    }
}

/// The next hop of an encapsulated packet and the NAT port of its flow: what
/// [`prepare_remote`] hands [`encap_remote`].
#[derive(Default)]
struct Hop {
    dmac: [u8; 6],
    smac: [u8; 6],
    ifindex: u32,
    nat_port_raw: u16,
}

/// Remote backend: the next hop toward its node, the NAT port (snat), the flow entry.
/// Split from [`encap_remote`] so the two frames never stack up (the verifier allows
/// 512 bytes for a whole call chain).
#[inline(never)]
fn prepare_remote(ctx: &XdpContext, p: &Parsed, job: &Job, hop: &mut Hop) -> Option<()> {
    let b = IN_BACKENDS.get(job.id)?;
    let cfg = IN_CONFIG.get(0)?;
    let outer_len = (ETH_LEN + p.tot_len as usize + IPV4_LEN + UDP_LEN + VXLAN_LEN) as u16;
    let next = fib_resolved(ctx.as_ptr(), cfg.node_raw, b.vtep_raw, IPPROTO_UDP, outer_len)?;
    hop.dmac = next.dmac;
    hop.smac = next.smac;
    hop.ifindex = next.ifindex;
    hop.nat_port_raw = job.nat_port_raw;
    if job.new {
        if !job.dsr {
            hop.nat_port_raw = claim_nat_port(b, p, job.hash, cfg)?;
        }
        let flow = Flow { backend: job.id, gen: b.gen, nat_port_raw: hop.nat_port_raw, pad: 0 };
        IN_FLOWS.insert(job.key, flow, 0).ok()?;
    }
    Some(())
}

/// Remote backend: rewrite, encapsulate toward the backend's node, send back out.
#[inline(never)]
fn encap_remote(ctx: &XdpContext, p: &Parsed, job: &Job, hop: &Hop) -> Outcome<u32> {
    const BAD: Outcome<u32> = (xdp_action::XDP_DROP, IN_STAT_DROP_MALFORMED);
    let Some(b) = IN_BACKENDS.get(job.id) else { return (xdp_action::XDP_PASS, IN_STAT_NO_BACKEND) };
    let Some(cfg) = IN_CONFIG.get(0) else { return (xdp_action::XDP_PASS, IN_STAT_UNROUTED) };
    let t = &p.tuple;
    let to = if job.dsr {
        Tuple { src_raw: t.src_raw, dst_raw: b.addr_raw, sport_raw: t.sport_raw, dport_raw: b.port_raw }
    } else {
        Tuple { src_raw: b.gw_raw, dst_raw: b.addr_raw, sport_raw: hop.nat_port_raw, dport_raw: b.port_raw }
    };
    let (start, end) = (ctx.data(), ctx.data_end());
    if (!job.icmp && rewrite(start, end, IP_OFF, p.proto, t, &to).is_none())
        || write(start, end, 0, b.mac).is_none()
        || write(start, end, 6, b.gw_mac).is_none()
    {
        return BAD;
    }
    let inner_len = (ETH_LEN + p.tot_len as usize) as u16;
    // Ethernet padding after the IPv4 packet would ride inside the tunnel: cut it.
    let excess = (end - start) as i64 - inner_len as i64;
    // SAFETY (both helpers): called with the program's own context.
    if excess > 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -(excess as i32)) } != 0 {
        return BAD;
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(VXLAN_OVERHEAD as i32)) } != 0 {
        return BAD;
    }
    let outer = Outer {
        dmac: hop.dmac,
        smac: hop.smac,
        src_raw: cfg.node_raw,
        dst_raw: b.vtep_raw,
        // SAFETY: helper without preconditions.
        id_raw: unsafe { bpf_get_prandom_u32() } as u16,
        sport: vxlan_src_port(job.hash),
        inner_len,
        vni: b.vni,
        dsr_port_raw: if job.dsr && !job.icmp { Some(t.dport_raw) } else { None },
    };
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(h) = at::<[u8; OUTER_LEN]>(start, end, 0) else { return BAD };
    // SAFETY: `at` checked the 50 bytes lie inside the packet.
    write_outer_headers(unsafe { &mut *h }, &outer);
    (transmit(hop.ifindex), IN_STAT_ENCAP)
}

/// Sends the rewritten frame out of `out_ifindex` (the FIB's answer) by a redirect,
/// also when that is the interface the frame came in on. Not XDP_TX: on a veth in
/// native mode (kernel 6.18) an XDP_TX frame is counted as sent (`xdp_tx`) but the
/// peer drops it (`rx dropped`), while a redirect to the same device is delivered;
/// on NICs a redirect to the receiving device costs about what XDP_TX does.
#[inline(always)]
fn transmit(out_ifindex: u32) -> u32 {
    // SAFETY: helper without preconditions; it returns XDP_REDIRECT or XDP_ABORTED.
    unsafe { bpf_redirect(out_ifindex, 0) as u32 }
}

#[inline(never)]
/// VXLAN on the underlay: a DSR-marked packet for a local task (record, unmark, let
/// the kernel decapsulate), or an snat reply to decapsulate and send to the client.
fn handle_vxlan(ctx: &XdpContext, outer: &Parsed) -> Outcome<u32> {
    const PASS: Outcome<u32> = (xdp_action::XDP_PASS, IN_STAT_PASS);
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(vx) = read::<[u8; VXLAN_LEN]>(start, end, VXLAN_OFF) else { return PASS };
    // The inner frame is the kernel VXLAN device's business unless it is a plain
    // TCP/UDP packet; a malformed inner frame is passed, not dropped, for the same reason.
    let inner = match parse(start, end, INNER_OFF + ETH_LEN) {
        Ok(p) => p,
        Err(_) => return PASS,
    };
    if inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP {
        return PASS;
    }
    let t = &inner.tuple;
    if let Some(published_raw) = vxlan_dsr_port(&vx) {
        // Only a DSR packet addressed to this node may program its replies (with
        // forwarding on, packets in transit cross this program too).
        match IN_CONFIG.get(0) {
            Some(cfg) if cfg.node_raw == outer.tuple.dst_raw => {}
            _ => return PASS,
        }
        let reply = reply_key(t.dst_raw, t.dport_raw, t.src_raw, t.sport_raw, inner.proto);
        let want = Nat {
            src_raw: outer.tuple.src_raw,
            dst_raw: t.src_raw,
            sport_raw: published_raw,
            dport_raw: t.sport_raw,
            pad: 0,
            created_ns: 0,
        };
        // SAFETY: read-only lookup, copied out.
        let held = unsafe { IN_NAT.get(reply) }.copied();
        let same = held.is_some_and(|n| Nat { created_ns: 0, ..n } == want);
        if !same {
            // SAFETY: helper without preconditions.
            let now = unsafe { bpf_ktime_get_ns() };
            if IN_NAT.insert(reply, Nat { created_ns: now, ..want }, 0).is_err() {
                return (xdp_action::XDP_PASS, IN_STAT_UNROUTED);
            }
        }
        // The kernel's VXLAN device drops frames with reserved bits set: clear the
        // mark. Our encapsulation sends UDP checksum 0; a sender that set one gets
        // it cleared (0 is valid for UDP over IPv4) rather than recomputed.
        if write(start, end, VXLAN_OFF + 1, [0u8; 3]).is_none()
            || write(start, end, L4_OFF + 6, 0u16).is_none()
        {
            return PASS;
        }
        return (xdp_action::XDP_PASS, IN_STAT_DSR_RECORDED);
    }
    let key = FlowKey {
        src_raw: t.src_raw,
        dst_raw: t.dst_raw,
        sport_raw: t.sport_raw,
        dport_raw: t.dport_raw,
        proto: inner.proto,
        pad: [0; 3],
    };
    let Some(entry) = IN_NAT.get_ptr_mut(key) else { return PASS };
    // SAFETY: a pointer to the map value from the lookup; copied out.
    let nat = unsafe { *entry };
    // A reply proves the translation in use: keep its NAT port from being taken over
    // as idle (one write per second at most).
    // SAFETY: helper without preconditions; the write goes to the same map value.
    let now = unsafe { bpf_ktime_get_ns() };
    if nat_needs_refresh(nat.created_ns, now) {
        unsafe { (*entry).created_ns = now };
    }
    let to = Tuple {
        src_raw: nat.src_raw,
        dst_raw: nat.dst_raw,
        sport_raw: nat.sport_raw,
        dport_raw: nat.dport_raw,
    };
    let Some(next) = fib_resolved(ctx.as_ptr(), nat.src_raw, nat.dst_raw, inner.proto, inner.tot_len) else {
        return (xdp_action::XDP_PASS, IN_STAT_UNROUTED);
    };
    const BAD: Outcome<u32> = (xdp_action::XDP_DROP, IN_STAT_DROP_MALFORMED);
    if rewrite(start, end, INNER_OFF + ETH_LEN, inner.proto, t, &to).is_none() {
        return BAD;
    }
    // SAFETY: called with the program's own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, VXLAN_OVERHEAD as i32) } != 0 {
        return BAD;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if write(start, end, 0, next.dmac).is_none() || write(start, end, 6, next.smac).is_none() {
        return BAD;
    }
    (transmit(next.ifindex), IN_STAT_REPLY_XDP)
}

/// Where the packet an ICMP error quotes starts (its IPv4 header).
const QUOTE_OFF: usize = L4_OFF + ICMP_LEN;

/// An ICMP error (destination unreachable, e.g. fragmentation needed; time exceeded)
/// about a reply this node sent for a flow (`NODE:published → client:cport`) goes to
/// the flow's backend, whose socket it concerns: rewritten as if it quoted the
/// backend's own packet, redirected to a local task or encapsulated to a remote one.
/// Anything else passes.
#[inline(always)]
fn handle_icmp(ctx: &XdpContext, p: &Parsed) -> Outcome<u32> {
    const BAD: Outcome<u32> = (xdp_action::XDP_DROP, IN_STAT_DROP_MALFORMED);
    let mut job = Job {
        key: FlowKey::default(),
        hash: 0,
        id: 0,
        nat_port_raw: 0,
        new: false,
        dsr: false,
        icmp: true,
        syn: false,
    };
    let local = match icmp_lookup(ctx, p, &mut job) {
        Ok(local) => local,
        Err(outcome) => return outcome,
    };
    if local {
        if icmp_rewrite(ctx, p, &job, false).is_none() {
            return BAD;
        }
        let Some(b) = IN_BACKENDS.get(job.id) else { return BAD };
        return (transmit(b.ifindex), IN_STAT_LOCAL);
    }
    let mut hop = Hop::default();
    if prepare_remote(ctx, p, &job, &mut hop).is_none() {
        return (xdp_action::XDP_PASS, IN_STAT_UNROUTED);
    }
    job.nat_port_raw = hop.nat_port_raw;
    if icmp_rewrite(ctx, p, &job, true).is_none() {
        return BAD;
    }
    encap_remote(ctx, p, &job, &hop)
}

/// The flow an ICMP error is about, into `job`; whether its backend is local.
#[inline(always)]
fn icmp_lookup(ctx: &XdpContext, p: &Parsed, job: &mut Job) -> Result<bool, Outcome<u32>> {
    const PASS: Outcome<u32> = (xdp_action::XDP_PASS, IN_STAT_PASS);
    let (start, end) = (ctx.data(), ctx.data_end());
    let icmp: [u8; ICMP_LEN] = read(start, end, L4_OFF).ok_or(PASS)?;
    if !icmp_is_flow_error(icmp[0]) {
        return Err(PASS);
    }
    let q: [u8; IPV4_LEN] = read(start, end, QUOTE_OFF).ok_or(PASS)?;
    let proto = q[9];
    if q[0] != 0x45 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return Err(PASS);
    }
    // The quoted transport header's first 8 bytes (ports; UDP's checksum).
    let ports: [u16; 4] = read(start, end, QUOTE_OFF + IPV4_LEN).ok_or(PASS)?;
    let Tuple { src_raw: q_src, dst_raw: q_dst, .. } = Tuple::of_ipv4(&q, [ports[0], ports[1]]);
    // Only errors about a packet this address sent.
    if q_src != p.tuple.dst_raw {
        return Err(PASS);
    }
    let key = FlowKey {
        src_raw: q_dst,
        dst_raw: q_src,
        sport_raw: ports[1],
        dport_raw: ports[0],
        proto,
        pad: [0; 3],
    };
    // SAFETY: read-only lookups, copied out.
    let flow = unsafe { IN_FLOWS.get(key) }.copied().ok_or(PASS)?;
    let b = IN_BACKENDS.get(flow.backend).ok_or(PASS)?;
    if b.flags & BACKEND_LIVE == 0 || b.gen != flow.gen {
        return Err(PASS);
    }
    // SAFETY: read-only lookup.
    let fe = unsafe { IN_FRONTENDS.get(frontend_key(q_src, ports[0], proto)) }.ok_or(PASS)?;
    job.key = key;
    job.hash = flow_hash(key.src_raw, key.dst_raw, key.sport_raw, key.dport_raw, proto);
    job.id = flow.backend;
    job.nat_port_raw = flow.nat_port_raw;
    job.dsr = fe.mode == MODE_DSR;
    Ok(b.flags & BACKEND_LOCAL != 0)
}

/// Rewrites an ICMP error for the backend: outer destination the task, the quoted
/// packet as the task sent it (source `task:target`; for a remote snat backend,
/// destination `gw:natport`), all checksums, and the Ethernet header toward the task.
#[inline(never)]
fn icmp_rewrite(ctx: &XdpContext, p: &Parsed, job: &Job, remote: bool) -> Option<()> {
    let b = IN_BACKENDS.get(job.id)?;
    let (start, end) = (ctx.data(), ctx.data_end());
    let q: [u8; IPV4_LEN] = read(start, end, QUOTE_OFF)?;
    let ports: [u16; 4] = read(start, end, QUOTE_OFF + IPV4_LEN)?;
    let old = Tuple::of_ipv4(&q, [ports[0], ports[1]]);
    let new = if remote && !job.dsr {
        Tuple { src_raw: b.addr_raw, dst_raw: b.gw_raw, sport_raw: b.port_raw, dport_raw: job.nat_port_raw }
    } else {
        Tuple { src_raw: b.addr_raw, dst_raw: old.dst_raw, sport_raw: b.port_raw, dport_raw: old.dport_raw }
    };
    let icmp_check: u16 = read(start, end, L4_OFF + 2)?;
    let ip_check = u16::from_ne_bytes([q[10], q[11]]);
    let checks = quote_checks_after(icmp_check, ip_check, ports[3], q[9], &old, &new);
    write(start, end, L4_OFF + 2, checks.icmp_raw)?;
    write(start, end, QUOTE_OFF + 10, checks.ip_raw)?;
    write(start, end, QUOTE_OFF + 12, new.src_raw)?;
    write(start, end, QUOTE_OFF + 16, new.dst_raw)?;
    write(start, end, QUOTE_OFF + IPV4_LEN, [new.sport_raw, new.dport_raw, ports[2], checks.l4_raw])?;
    // The outer header: only the destination changes (ICMP has no pseudo-header).
    let outer_old = Tuple { src_raw: p.tuple.src_raw, dst_raw: p.tuple.dst_raw, sport_raw: 0, dport_raw: 0 };
    let outer_new = Tuple { dst_raw: b.addr_raw, ..outer_old };
    let outer_check: u16 = read(start, end, IP_OFF + 10)?;
    write(start, end, IP_OFF + 10, ipv4_check_after(outer_check, &outer_old, &outer_new))?;
    write(start, end, IP_OFF + 16, b.addr_raw)?;
    write(start, end, 0, b.mac)?;
    write(start, end, 6, b.gw_mac)
}

/// tc ingress on a local task's host veth: the task's replies to ingress clients.
#[classifier]
pub fn ingress_reply(ctx: TcContext) -> i32 {
    let (action, stat) = try_ingress_reply(&ctx);
    count(stat);
    action
}

fn try_ingress_reply(ctx: &TcContext) -> Outcome<i32> {
    const OK: Outcome<i32> = (TC_ACT_OK, IN_STAT_PASS);
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(eth_type) = read::<[u8; 2]>(start, end, 12) else { return OK };
    if eth_type != ETH_P_IP_BYTES {
        return OK;
    }
    let Some(hdr) = read::<[u8; IPV4_LEN]>(start, end, IP_OFF) else { return OK };
    // The skb's length, not the linear part: a task's TCP reply may be a GSO packet.
    let avail = (ctx.len() as usize).saturating_sub(ETH_LEN);
    let proto = match check_ipv4(&hdr, avail) {
        Ipv4Verdict::Plain { proto, .. } if proto == IPPROTO_TCP || proto == IPPROTO_UDP => proto,
        _ => return OK,
    };
    let Some(ports) = read::<[u16; 2]>(start, end, L4_OFF) else { return OK };
    let t = Tuple::of_ipv4(&hdr, ports);
    let key = reply_key(t.src_raw, t.sport_raw, t.dst_raw, t.dport_raw, proto);
    // SAFETY: read-only lookup, copied out.
    let Some(nat) = (unsafe { IN_NAT.get(key) }).copied() else { return OK };
    // tot_len 0: the kernel checks the skb against the MTU itself (GSO-aware).
    let Some(next) = fib(ctx.as_ptr(), nat.src_raw, nat.dst_raw, proto, 0) else {
        return (TC_ACT_OK, IN_STAT_UNROUTED);
    };
    let resolved = match &next {
        NextHop::Resolved(p) => Some(p),
        NextHop::Unresolved(_) => None,
    };
    if reply_rewrite(ctx, proto, &t, &nat, resolved).is_err() {
        return (TC_ACT_OK, IN_STAT_UNROUTED);
    }
    match next {
        NextHop::Resolved(p) => {
            // SAFETY: helper without preconditions.
            unsafe { bpf_redirect(p.ifindex, 0) };
        }
        NextHop::Unresolved(p) => {
            // A DSR reply leaves a node that never talked to the client: let the
            // neighbour subsystem resolve the next hop (queueing this packet meanwhile)
            // and write the Ethernet header, instead of leaving the rewritten reply to
            // the stack.
            let mut nh = bpf_redir_neigh {
                nh_family: AF_INET as u32,
                __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
                    // SAFETY: an IPv4 lookup writes the IPv4 member of the union.
                    ipv4_nh: unsafe { p.__bindgen_anon_4.ipv4_dst },
                },
            };
            // SAFETY: `nh` is a valid bpf_redir_neigh of the size passed.
            let rc =
                unsafe { bpf_redirect_neigh(p.ifindex, &mut nh, size_of::<bpf_redir_neigh>() as i32, 0) };
            if rc != TC_ACT_REDIRECT as i64 {
                return (TC_ACT_SHOT, IN_STAT_UNROUTED);
            }
        }
    }
    (TC_ACT_REDIRECT, IN_STAT_REPLY_TC)
}

/// Rewrites a reply with the kernel's checksum helpers, which also handle the
/// partial checksums a local task's packets carry (`CHECKSUM_PARTIAL`).
#[inline(always)]
fn reply_rewrite(
    ctx: &TcContext,
    proto: u8,
    t: &Tuple,
    nat: &Nat,
    next: Option<&FibParams>,
) -> Result<(), i64> {
    let csum = if proto == IPPROTO_TCP { L4_OFF + 16 } else { L4_OFF + 6 };
    // UDP: a zero checksum means none and stays zero; a computed zero becomes 0xffff.
    let mangled = if proto == IPPROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled;
    ctx.l4_csum_replace(csum, t.src_raw as u64, nat.src_raw as u64, pseudo | 4)?;
    ctx.l4_csum_replace(csum, t.dst_raw as u64, nat.dst_raw as u64, pseudo | 4)?;
    ctx.l4_csum_replace(csum, t.sport_raw as u64, nat.sport_raw as u64, mangled | 2)?;
    ctx.l4_csum_replace(csum, t.dport_raw as u64, nat.dport_raw as u64, mangled | 2)?;
    ctx.l3_csum_replace(IP_OFF + 10, t.src_raw as u64, nat.src_raw as u64, 4)?;
    ctx.l3_csum_replace(IP_OFF + 10, t.dst_raw as u64, nat.dst_raw as u64, 4)?;
    ctx.store(IP_OFF + 12, &nat.src_raw, 0)?;
    ctx.store(IP_OFF + 16, &nat.dst_raw, 0)?;
    ctx.store(L4_OFF, &nat.sport_raw, 0)?;
    ctx.store(L4_OFF + 2, &nat.dport_raw, 0)?;
    // Unresolved: `bpf_redirect_neigh` writes the Ethernet header itself.
    if let Some(next) = next {
        ctx.store(0, &next.dmac, 0)?;
        ctx.store(6, &next.smac, 0)?;
    }
    Ok(())
}
