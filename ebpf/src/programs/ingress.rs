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
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup as FibParams, bpf_redir_neigh, xdp_action,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_F_ADJ_ROOM_DECAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, BPF_NOEXIST, TC_ACT_OK,
        TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
    bpf_f_adj_room_encap_l2,
    helpers::{
        bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh,
        bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
    EbpfContext,
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
/// Bytes of a plain TCP/UDP packet the path reads: Ethernet, IPv4 and the transport
/// header up to TCP's checksum.
const PLAIN_HEADERS: usize = L4_OFF + TCP_LEN;
/// Bytes of an encapsulated TCP packet the path reads: its headers up to the inner
/// TCP header.
const VXLAN_HEADERS: usize = INNER_OFF + ETH_LEN + IPV4_LEN + TCP_LEN;
/// Bytes of an ICMP error the path reads: up to the quoted transport header's first
/// 8 bytes.
const ICMP_HEADERS: usize = L4_OFF + ICMP_LEN + IPV4_LEN + 8;

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

/// What the forward path needs of a packet, in its two hooks: XDP (bare bytes) and tc
/// (an skb, whose GSO super-packets pass as one and whose checksum state the kernel's
/// helpers keep right). Everything else — parsing, lookups, decisions, the bytes
/// written — is shared.
trait Frame: EbpfContext {
    type Action: Copy;
    /// Hand the packet to the stack.
    const PASS: Self::Action;
    /// Drop it.
    const DROP: Self::Action;

    /// The directly readable bytes `[start, end)`.
    fn bounds(&self) -> (usize, usize);

    /// The packet's length (an skb may hold more than its linear part).
    fn packet_len(&self) -> usize;

    /// Makes the first `len` bytes (or the whole packet, if shorter) directly
    /// readable; `false` if that failed. A no-op for XDP, whose frame is one buffer;
    /// an skb may hold only part of its headers in its linear part, and pulling more
    /// costs a copy, so it is asked for only as far as a path reads.
    fn reach(&self, _len: usize) -> bool {
        true
    }

    /// Reads a `T` at `off`, bounds-checked against the current data pointers.
    #[inline(always)]
    fn get<T: Copy>(&self, off: usize) -> Option<T> {
        let (start, end) = self.bounds();
        read(start, end, off)
    }

    /// Writes a `T` at `off` (tc: keeping a complete checksum of the skb right).
    fn put<T>(&self, off: usize, v: T) -> Option<()>;

    /// Rewrites the addresses and ports of the IPv4 TCP/UDP packet whose IPv4 header is
    /// at `ip_off` from `old` to `new`, with both checksums updated.
    fn rewrite(&self, ip_off: usize, proto: u8, old: &Tuple, new: &Tuple) -> Option<()>;

    /// Cuts anything after the first `frame_len` bytes (Ethernet padding) and makes
    /// room for the outer headers: afterwards bytes `0..OUTER_LEN` are to be written
    /// and the inner IPv4 header is at `INNER_OFF + ETH_LEN`.
    fn push_outer(&self, frame_len: usize) -> Option<()>;

    /// Removes the outer headers and the inner Ethernet header's place: afterwards
    /// the inner IPv4 header is at `IP_OFF`, behind 14 bytes for an Ethernet header
    /// (to be written: its addresses are stale, its EtherType is IPv4).
    fn pop_outer(&self) -> Option<()>;

    /// Sends the packet out of `ifindex` (the next hop's interface, or a local
    /// task's host veth).
    fn transmit(&self, ifindex: u32) -> Self::Action;
}

impl Frame for XdpContext {
    type Action = u32;
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;

    #[inline(always)]
    fn bounds(&self) -> (usize, usize) {
        (self.data(), self.data_end())
    }

    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.data_end() - self.data()
    }

    #[inline(always)]
    fn put<T>(&self, off: usize, v: T) -> Option<()> {
        let (start, end) = self.bounds();
        write(start, end, off, v)
    }

    #[inline(always)]
    fn rewrite(&self, ip_off: usize, proto: u8, old: &Tuple, new: &Tuple) -> Option<()> {
        let (start, end) = self.bounds();
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

    #[inline(always)]
    fn push_outer(&self, frame_len: usize) -> Option<()> {
        let excess = self.packet_len() as i64 - frame_len as i64;
        // SAFETY (both helpers): called with the program's own context.
        if excess > 0 && unsafe { bpf_xdp_adjust_tail(self.ctx, -(excess as i32)) } != 0 {
            return None;
        }
        (unsafe { bpf_xdp_adjust_head(self.ctx, -(VXLAN_OVERHEAD as i32)) } == 0).then_some(())
    }

    #[inline(always)]
    fn pop_outer(&self) -> Option<()> {
        // SAFETY: called with the program's own context.
        (unsafe { bpf_xdp_adjust_head(self.ctx, VXLAN_OVERHEAD as i32) } == 0).then_some(())
    }

    /// A redirect, also when that is the interface the frame came in on. Not XDP_TX:
    /// on a veth in native mode (kernel 6.18) an XDP_TX frame is counted as sent
    /// (`xdp_tx`) but the peer drops it (`rx dropped`), while a redirect to the same
    /// device is delivered; on NICs a redirect to the receiving device costs about
    /// what XDP_TX does.
    #[inline(always)]
    fn transmit(&self, ifindex: u32) -> u32 {
        // SAFETY: helper without preconditions; it returns XDP_REDIRECT or XDP_ABORTED.
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}

impl Frame for TcContext {
    type Action = i32;
    const PASS: i32 = TC_ACT_OK;
    const DROP: i32 = TC_ACT_SHOT;

    #[inline(always)]
    fn bounds(&self) -> (usize, usize) {
        (self.data(), self.data_end())
    }

    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.len() as usize
    }

    #[inline(always)]
    fn reach(&self, len: usize) -> bool {
        let want = len.min(self.packet_len());
        self.data_end() - self.data() >= want || self.pull_data(want as u32).is_ok()
    }

    #[inline(always)]
    fn put<T>(&self, off: usize, v: T) -> Option<()> {
        self.store(off, &v, BPF_F_RECOMPUTE_CSUM as u64).ok()
    }

    /// With the kernel's checksum helpers, which also handle the partial checksums of
    /// GSO packets and a task's own packets (`CHECKSUM_PARTIAL`: only the
    /// pseudo-header's part changes) and keep a complete one right.
    #[inline(always)]
    fn rewrite(&self, ip_off: usize, proto: u8, old: &Tuple, new: &Tuple) -> Option<()> {
        let l4 = ip_off + IPV4_LEN;
        let csum = if proto == IPPROTO_TCP { l4 + 16 } else { l4 + 6 };
        // UDP: a zero checksum means none and stays zero; a computed zero becomes 0xffff.
        let mangled = if proto == IPPROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled;
        self.l4_csum_replace(csum, old.src_raw as u64, new.src_raw as u64, pseudo | 4).ok()?;
        self.l4_csum_replace(csum, old.dst_raw as u64, new.dst_raw as u64, pseudo | 4).ok()?;
        self.l4_csum_replace(csum, old.sport_raw as u64, new.sport_raw as u64, mangled | 2).ok()?;
        self.l4_csum_replace(csum, old.dport_raw as u64, new.dport_raw as u64, mangled | 2).ok()?;
        self.l3_csum_replace(ip_off + 10, old.src_raw as u64, new.src_raw as u64, 4).ok()?;
        self.l3_csum_replace(ip_off + 10, old.dst_raw as u64, new.dst_raw as u64, 4).ok()?;
        self.store(ip_off + 12, &new.src_raw, 0).ok()?;
        self.store(ip_off + 16, &new.dst_raw, 0).ok()?;
        self.store(l4, &new.sport_raw, 0).ok()?;
        self.store(l4 + 2, &new.dport_raw, 0).ok()
    }

    /// Room after the Ethernet header, marked as a VXLAN (UDP, Ethernet-in) tunnel so
    /// a GSO packet is segmented as one with its MSS lowered by the 50 bytes.
    #[inline(always)]
    fn push_outer(&self, frame_len: usize) -> Option<()> {
        if self.packet_len() > frame_len {
            // SAFETY: called with the program's own context.
            if unsafe { bpf_skb_change_tail(self.as_ptr() as *mut _, frame_len as u32, 0) } != 0 {
                return None;
            }
        }
        let flags = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH)
            as u64
            | bpf_f_adj_room_encap_l2(ETH_LEN as u64);
        self.adjust_room(VXLAN_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, flags).ok()
    }

    #[inline(always)]
    fn pop_outer(&self) -> Option<()> {
        self.adjust_room(-(VXLAN_OVERHEAD as i32), BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_DECAP_L3_IPV4 as u64).ok()
    }

    #[inline(always)]
    fn transmit(&self, ifindex: u32) -> i32 {
        // SAFETY: helper without preconditions; it returns TC_ACT_REDIRECT or TC_ACT_SHOT.
        unsafe { bpf_redirect(ifindex, 0) as i32 }
    }
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
    /// neighbour subsystem (`bpf_redirect_neigh`); the forward path leaves it to the
    /// stack.
    Unresolved(FibParams),
}

/// The next hop toward `dst_raw` with its neighbour resolved (the forward path).
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
fn parse<C: Frame>(ctx: &C, ip_off: usize) -> Result<Parsed, Outcome<C::Action>> {
    let pass = (C::PASS, IN_STAT_PASS);
    let (start, end) = ctx.bounds();
    let eth_type: [u8; 2] = read(start, end, ip_off - 2).ok_or(pass)?;
    if eth_type != ETH_P_IP_BYTES {
        return Err(pass);
    }
    // The EtherType promised IPv4 but the header is cut short: nobody can use it.
    let hdr: [u8; IPV4_LEN] = read(start, end, ip_off).ok_or((C::DROP, IN_STAT_DROP_MALFORMED))?;
    let (proto, tot_len) = match check_ipv4(&hdr, ctx.packet_len().saturating_sub(ip_off)) {
        Ipv4Verdict::Plain { proto, tot_len } => (proto, tot_len),
        Ipv4Verdict::Pass => return Err(pass),
        Ipv4Verdict::Malformed => return Err((C::DROP, IN_STAT_DROP_MALFORMED)),
    };
    let l4 = ip_off + IPV4_LEN;
    let l4_len = tot_len as usize - IPV4_LEN;
    let flags = match proto {
        IPPROTO_TCP => {
            if l4_len < TCP_LEN {
                return Err(pass);
            }
            let off_flags: [u8; 2] = read(start, end, l4 + 12).ok_or(pass)?;
            if !tcp_doff_valid(off_flags[0]) {
                return Err(pass);
            }
            // The checksum field must be inside the packet for a rewrite.
            read::<u16>(start, end, l4 + 16).ok_or(pass)?;
            off_flags[1]
        }
        IPPROTO_UDP => {
            if l4_len < UDP_LEN {
                return Err(pass);
            }
            read::<u16>(start, end, l4 + 6).ok_or(pass)?;
            0
        }
        // Its "ports" are type, code and checksum: only `handle_icmp` looks at it.
        IPPROTO_ICMP => 0,
        _ => return Err(pass),
    };
    let ports: [u16; 2] = read(start, end, l4).ok_or(pass)?;
    Ok(Parsed { tuple: Tuple::of_ipv4(&hdr, ports), proto, tot_len, flags })
}

/// XDP on the underlay interface: published-port traffic in, snat replies back.
#[xdp]
pub fn ingress_xdp(ctx: XdpContext) -> u32 {
    let (action, stat) = try_underlay(&ctx);
    count(stat);
    action
}

/// tc (TCX ingress) on the underlay interface: the same path as [`ingress_xdp`], on
/// skbs. Where XDP costs more than it saves (a veth: its native XDP turns every GRO
/// or GSO super-packet into MTU-sized frames and copies them), this keeps them whole.
#[classifier]
pub fn ingress_tc(ctx: TcContext) -> i32 {
    let (action, stat) = try_underlay(&ctx);
    count(stat);
    action
}

fn try_underlay<C: Frame>(ctx: &C) -> Outcome<C::Action> {
    // The headers of a plain packet are in an skb's linear part as a rule (a pull,
    // a copy, only where they are not).
    if !ctx.reach(PLAIN_HEADERS) {
        return (C::PASS, IN_STAT_PASS);
    }
    let p = match parse(ctx, IP_OFF) {
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
        return (C::PASS, IN_STAT_PASS);
    };
    handle_frontend(ctx, &fe, &p)
}

/// Why a new flow gets no backend (the caller's action is always "pass").
type NoBackend = u32;

/// The backend id for this packet's flow, its NAT port, and whether the flow is new
/// (to be recorded). Its own BPF function: its stack frame is gone by the time the
/// handlers (which need theirs) run.
#[inline(never)]
fn choose_backend(
    fe: &IngressFrontend,
    key: &FlowKey,
    hash: u32,
    opens: bool,
) -> Result<(u32, u16, bool), NoBackend> {
    // SAFETY: read-only lookups, copied out.
    let flow = unsafe { IN_FLOWS.get(key) }.copied();
    let flow_backend = flow.and_then(|f| IN_BACKENDS.get(f.backend).copied());
    match flow_choice(flow, flow_backend, opens) {
        FlowChoice::Pass => Err(IN_STAT_PASS),
        // `flow_choice` keeps only a flow whose backend it was given.
        FlowChoice::Keep { backend, nat_port_raw } => Ok((backend, nat_port_raw, false)),
        FlowChoice::Balance => {
            if fe.count == 0 {
                return Err(IN_STAT_NO_BACKEND);
            }
            let id = *IN_MAGLEV.get(maglev_slot(fe, hash)).ok_or(IN_STAT_NO_BACKEND)?;
            let b = IN_BACKENDS.get(id).ok_or(IN_STAT_NO_BACKEND)?;
            if b.flags & BACKEND_LIVE == 0 {
                return Err(IN_STAT_NO_BACKEND);
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

fn handle_frontend<C: Frame>(ctx: &C, fe: &IngressFrontend, p: &Parsed) -> Outcome<C::Action> {
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
        Err(stat) => return (C::PASS, stat),
    };
    let Some(b) = IN_BACKENDS.get(id) else { return (C::PASS, IN_STAT_NO_BACKEND) };
    let local = b.flags & BACKEND_LOCAL != 0;
    let syn = p.proto == IPPROTO_TCP && opens;
    let job = Job { key, hash, id, nat_port_raw, new, dsr: fe.mode == MODE_DSR, icmp: false, syn };
    if local {
        return handle_local(ctx, p, &job);
    }
    let mut hop = Hop::default();
    if prepare_remote(ctx, p, &job, &mut hop).is_none() {
        return (C::PASS, IN_STAT_UNROUTED);
    }
    encap_remote(ctx, p, &job, &hop)
}

/// Local backend: DNAT to the task, redirect into its host veth.
#[inline(never)]
fn handle_local<C: Frame>(ctx: &C, p: &Parsed, job: &Job) -> Outcome<C::Action> {
    // The map value itself, not a copy: no stack.
    let Some(b) = IN_BACKENDS.get(job.id) else { return (C::PASS, IN_STAT_NO_BACKEND) };
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
            return (C::PASS, IN_STAT_UNROUTED);
        }
    }
    if ctx.rewrite(IP_OFF, p.proto, t, &to).is_none()
        || ctx.put(0, b.mac).is_none()
        || ctx.put(6, b.gw_mac).is_none()
    {
        return (C::DROP, IN_STAT_DROP_MALFORMED);
    }
    // Out of the host veth on both hooks: the task's `eth0` receives it through its
    // NAPI and GRO (meshd turns GRO on there). tc's `bpf_redirect_peer` (straight into
    // the task's namespace, no GRO) measured no better: iperf3 to a local task 0.65× of
    // direct with it, 0.61× and 0.68× without (`make bench ONLY=ingress`, 2026-11-22).
    (ctx.transmit(b.ifindex), IN_STAT_LOCAL)
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
fn prepare_remote<C: Frame>(ctx: &C, p: &Parsed, job: &Job, hop: &mut Hop) -> Option<()> {
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
fn encap_remote<C: Frame>(ctx: &C, p: &Parsed, job: &Job, hop: &Hop) -> Outcome<C::Action> {
    let bad = (C::DROP, IN_STAT_DROP_MALFORMED);
    let Some(b) = IN_BACKENDS.get(job.id) else { return (C::PASS, IN_STAT_NO_BACKEND) };
    let Some(cfg) = IN_CONFIG.get(0) else { return (C::PASS, IN_STAT_UNROUTED) };
    let t = &p.tuple;
    let to = if job.dsr {
        Tuple { src_raw: t.src_raw, dst_raw: b.addr_raw, sport_raw: t.sport_raw, dport_raw: b.port_raw }
    } else {
        Tuple { src_raw: b.gw_raw, dst_raw: b.addr_raw, sport_raw: hop.nat_port_raw, dport_raw: b.port_raw }
    };
    if !job.icmp && ctx.rewrite(IP_OFF, p.proto, t, &to).is_none() {
        return bad;
    }
    let inner_len = (ETH_LEN + p.tot_len as usize) as u16;
    if ctx.push_outer(inner_len as usize).is_none() {
        return bad;
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
    let (start, end) = ctx.bounds();
    let Some(h) = at::<[u8; OUTER_LEN]>(start, end, 0) else { return bad };
    // SAFETY: `at` checked the 50 bytes lie inside the packet.
    write_outer_headers(unsafe { &mut *h }, &outer);
    // The inner Ethernet header, toward the task from its network's gateway (tc's
    // room is blank: the EtherType too).
    if write(start, end, INNER_OFF, b.mac).is_none()
        || write(start, end, INNER_OFF + 6, b.gw_mac).is_none()
        || write(start, end, INNER_OFF + 12, ETH_P_IP_BYTES).is_none()
    {
        return bad;
    }
    (ctx.transmit(hop.ifindex), IN_STAT_ENCAP)
}

#[inline(never)]
/// VXLAN on the underlay: a DSR-marked packet for a local task (record, unmark, let
/// the kernel decapsulate), or an snat reply to decapsulate and send to the client.
fn handle_vxlan<C: Frame>(ctx: &C, outer: &Parsed) -> Outcome<C::Action> {
    let pass = (C::PASS, IN_STAT_PASS);
    if !ctx.reach(VXLAN_HEADERS) {
        return pass;
    }
    let Some(vx) = ctx.get::<[u8; VXLAN_LEN]>(VXLAN_OFF) else { return pass };
    // The inner frame is the kernel VXLAN device's business unless it is a plain
    // TCP/UDP packet; a malformed inner frame is passed, not dropped, for the same reason.
    let inner = match parse(ctx, INNER_OFF + ETH_LEN) {
        Ok(p) => p,
        Err(_) => return pass,
    };
    if inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP {
        return pass;
    }
    let t = &inner.tuple;
    if let Some(published_raw) = vxlan_dsr_port(&vx) {
        // Only a DSR packet addressed to this node may program its replies (with
        // forwarding on, packets in transit cross this program too).
        match IN_CONFIG.get(0) {
            Some(cfg) if cfg.node_raw == outer.tuple.dst_raw => {}
            _ => return pass,
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
                return (C::PASS, IN_STAT_UNROUTED);
            }
        }
        // The kernel's VXLAN device drops frames with reserved bits set: clear the
        // mark. Our encapsulation sends UDP checksum 0; a sender that set one gets
        // it cleared (0 is valid for UDP over IPv4) rather than recomputed.
        if ctx.put(VXLAN_OFF + 1, [0u8; 3]).is_none() || ctx.put(L4_OFF + 6, 0u16).is_none() {
            return pass;
        }
        return (C::PASS, IN_STAT_DSR_RECORDED);
    }
    let key = FlowKey {
        src_raw: t.src_raw,
        dst_raw: t.dst_raw,
        sport_raw: t.sport_raw,
        dport_raw: t.dport_raw,
        proto: inner.proto,
        pad: [0; 3],
    };
    let Some(entry) = IN_NAT.get_ptr_mut(key) else { return pass };
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
        return (C::PASS, IN_STAT_UNROUTED);
    };
    let bad = (C::DROP, IN_STAT_DROP_MALFORMED);
    if ctx.rewrite(INNER_OFF + ETH_LEN, inner.proto, t, &to).is_none() || ctx.pop_outer().is_none() {
        return bad;
    }
    if ctx.put(0, next.dmac).is_none() || ctx.put(6, next.smac).is_none() {
        return bad;
    }
    (ctx.transmit(next.ifindex), IN_STAT_REPLY_XDP)
}

/// Where the packet an ICMP error quotes starts (its IPv4 header).
const QUOTE_OFF: usize = L4_OFF + ICMP_LEN;

/// An ICMP error (destination unreachable, e.g. fragmentation needed; time exceeded)
/// about a reply this node sent for a flow (`NODE:published → client:cport`) goes to
/// the flow's backend, whose socket it concerns: rewritten as if it quoted the
/// backend's own packet, redirected to a local task or encapsulated to a remote one.
/// Anything else passes.
#[inline(always)]
fn handle_icmp<C: Frame>(ctx: &C, p: &Parsed) -> Outcome<C::Action> {
    let bad = (C::DROP, IN_STAT_DROP_MALFORMED);
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
        Err(()) => return (C::PASS, IN_STAT_PASS),
    };
    if local {
        if icmp_rewrite(ctx, p, &job, false).is_none() {
            return bad;
        }
        let Some(b) = IN_BACKENDS.get(job.id) else { return bad };
        return (ctx.transmit(b.ifindex), IN_STAT_LOCAL);
    }
    let mut hop = Hop::default();
    if prepare_remote(ctx, p, &job, &mut hop).is_none() {
        return (C::PASS, IN_STAT_UNROUTED);
    }
    job.nat_port_raw = hop.nat_port_raw;
    if icmp_rewrite(ctx, p, &job, true).is_none() {
        return bad;
    }
    encap_remote(ctx, p, &job, &hop)
}

/// The flow an ICMP error is about, into `job`; whether its backend is local. `Err`:
/// not about a flow of ours (pass).
#[inline(always)]
fn icmp_lookup<C: Frame>(ctx: &C, p: &Parsed, job: &mut Job) -> Result<bool, ()> {
    if !ctx.reach(ICMP_HEADERS) {
        return Err(());
    }
    let icmp: [u8; ICMP_LEN] = ctx.get(L4_OFF).ok_or(())?;
    if !icmp_is_flow_error(icmp[0]) {
        return Err(());
    }
    let q: [u8; IPV4_LEN] = ctx.get(QUOTE_OFF).ok_or(())?;
    let proto = q[9];
    if q[0] != 0x45 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return Err(());
    }
    // The quoted transport header's first 8 bytes (ports; UDP's checksum).
    let ports: [u16; 4] = ctx.get(QUOTE_OFF + IPV4_LEN).ok_or(())?;
    let Tuple { src_raw: q_src, dst_raw: q_dst, .. } = Tuple::of_ipv4(&q, [ports[0], ports[1]]);
    // Only errors about a packet this address sent.
    if q_src != p.tuple.dst_raw {
        return Err(());
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
    let flow = unsafe { IN_FLOWS.get(key) }.copied().ok_or(())?;
    let b = IN_BACKENDS.get(flow.backend).ok_or(())?;
    if b.flags & BACKEND_LIVE == 0 || b.gen != flow.gen {
        return Err(());
    }
    // SAFETY: read-only lookup.
    let fe = unsafe { IN_FRONTENDS.get(frontend_key(q_src, ports[0], proto)) }.ok_or(())?;
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
fn icmp_rewrite<C: Frame>(ctx: &C, p: &Parsed, job: &Job, remote: bool) -> Option<()> {
    let b = IN_BACKENDS.get(job.id)?;
    let q: [u8; IPV4_LEN] = ctx.get(QUOTE_OFF)?;
    let ports: [u16; 4] = ctx.get(QUOTE_OFF + IPV4_LEN)?;
    let icmp_check: u16 = ctx.get(L4_OFF + 2)?;
    let outer_check: u16 = ctx.get(IP_OFF + 10)?;
    let old = Tuple::of_ipv4(&q, [ports[0], ports[1]]);
    let new = if remote && !job.dsr {
        Tuple { src_raw: b.addr_raw, dst_raw: b.gw_raw, sport_raw: b.port_raw, dport_raw: job.nat_port_raw }
    } else {
        Tuple { src_raw: b.addr_raw, dst_raw: old.dst_raw, sport_raw: b.port_raw, dport_raw: old.dport_raw }
    };
    let ip_check = u16::from_ne_bytes([q[10], q[11]]);
    let checks = quote_checks_after(icmp_check, ip_check, ports[3], q[9], &old, &new);
    // The outer header: only the destination changes (ICMP has no pseudo-header).
    let outer_old = Tuple { src_raw: p.tuple.src_raw, dst_raw: p.tuple.dst_raw, sport_raw: 0, dport_raw: 0 };
    let outer_new = Tuple { dst_raw: b.addr_raw, ..outer_old };
    ctx.put(L4_OFF + 2, checks.icmp_raw)?;
    ctx.put(QUOTE_OFF + 10, checks.ip_raw)?;
    ctx.put(QUOTE_OFF + 12, new.src_raw)?;
    ctx.put(QUOTE_OFF + 16, new.dst_raw)?;
    ctx.put(QUOTE_OFF + IPV4_LEN, [new.sport_raw, new.dport_raw, ports[2], checks.l4_raw])?;
    ctx.put(IP_OFF + 10, ipv4_check_after(outer_check, &outer_old, &outer_new))?;
    ctx.put(IP_OFF + 16, b.addr_raw)?;
    ctx.put(0, b.mac)?;
    ctx.put(6, b.gw_mac)
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
    let Some(eth_type) = ctx.get::<[u8; 2]>(12) else { return OK };
    if eth_type != ETH_P_IP_BYTES {
        return OK;
    }
    let Some(hdr) = ctx.get::<[u8; IPV4_LEN]>(IP_OFF) else { return OK };
    // The skb's length, not the linear part: a task's TCP reply may be a GSO packet.
    let avail = ctx.packet_len().saturating_sub(ETH_LEN);
    let proto = match check_ipv4(&hdr, avail) {
        Ipv4Verdict::Plain { proto, .. } if proto == IPPROTO_TCP || proto == IPPROTO_UDP => proto,
        _ => return OK,
    };
    let Some(ports) = ctx.get::<[u16; 2]>(L4_OFF) else { return OK };
    let t = Tuple::of_ipv4(&hdr, ports);
    let key = reply_key(t.src_raw, t.sport_raw, t.dst_raw, t.dport_raw, proto);
    // SAFETY: read-only lookup, copied out.
    let Some(nat) = (unsafe { IN_NAT.get(key) }).copied() else { return OK };
    // tot_len 0: the kernel checks the skb against the MTU itself (GSO-aware).
    let Some(next) = fib(ctx.as_ptr(), nat.src_raw, nat.dst_raw, proto, 0) else {
        return (TC_ACT_OK, IN_STAT_UNROUTED);
    };
    let to = Tuple {
        src_raw: nat.src_raw,
        dst_raw: nat.dst_raw,
        sport_raw: nat.sport_raw,
        dport_raw: nat.dport_raw,
    };
    if ctx.rewrite(IP_OFF, proto, &t, &to).is_none() {
        return (TC_ACT_OK, IN_STAT_UNROUTED);
    }
    match next {
        NextHop::Resolved(p) => {
            if ctx.put(0, p.dmac).is_none() || ctx.put(6, p.smac).is_none() {
                return (TC_ACT_OK, IN_STAT_UNROUTED);
            }
            (ctx.transmit(p.ifindex), IN_STAT_REPLY_TC)
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
            (TC_ACT_REDIRECT, IN_STAT_REPLY_TC)
        }
    }
}
