//! The kernel routing mesh for published ports (#6): the maps the XDP program on the
//! node's underlay interface and the tc program on each local task's host veth share
//! with the user side, and the decisions they take.
//!
//! ## Data flow
//! - **New flow** (TCP SYN without ACK, or any UDP datagram without a flow entry) to
//!   `NODE_IP:PUBLISHED/proto` ([`FrontendKey`] in [`INGRESS_FRONTENDS_MAP`]): the XDP
//!   program hashes the 5-tuple ([`crate::maglev::flow_hash`]), reads the frontend's
//!   Maglev table ([`INGRESS_MAGLEV_MAP`], slot `table * MAGLEV_TABLE_SIZE + hash %
//!   MAGLEV_TABLE_SIZE`) for a backend id, and records the choice in
//!   [`INGRESS_FLOWS_MAP`] under the client's 5-tuple. A TCP segment that is not a SYN
//!   and has no flow entry passes to the stack untouched: it belongs to a connection
//!   the userspace proxy (which keeps listening on every published port) accepted.
//! - **Established flow**: the flow entry's backend is used while that backend is
//!   live and of the same generation ([`IngressBackend::gen`]); otherwise the flow is
//!   re-balanced (removing a backend moves only its flows).
//! - **Local backend** ([`BACKEND_LOCAL`]): destination rewritten to the task
//!   (DNAT only: the client's address is kept in both modes, because the reply always
//!   crosses the task's host veth, where the tc program reverses it), inner Ethernet
//!   set to `gw_mac → mac`, redirected to the host veth `ifindex`. The reverse entry
//!   in [`INGRESS_NAT_MAP`] is keyed by the reply as the task sends it
//!   (`task:target → client:cport`) and rewrites its source to `NODE_IP:PUBLISHED`.
//! - **Remote backend, `snat`** ([`MODE_SNAT`]): source rewritten to this node's
//!   address on the backend's network (`gw_raw`) and a NAT port
//!   ([`nat_port_candidate`]), destination to the task; VXLAN-encapsulated to the
//!   backend's node (`vtep_raw`) on `vni`, the same wire format as the kernel's VXLAN
//!   devices, sent back out the underlay (XDP_TX). The task replies to `gw_raw`, so
//!   the reply comes back over VXLAN to this node, where the XDP program finds the
//!   reverse entry (`task:target → gw:natport`), strips the outer headers, rewrites the
//!   reply to `NODE_IP:PUBLISHED → client:cport` and sends it out (XDP_TX).
//! - **Remote backend, `dsr`** ([`MODE_DSR`]): source kept, destination rewritten to
//!   the task, encapsulated as above with the DSR mark in the VXLAN header's reserved
//!   bytes ([`dsr_mark`]): marker byte and the published port. The backend node's XDP
//!   program sees the mark, records the reverse entry (`task:target → client:cport`
//!   rewrites the source to `OUTER_SRC:PUBLISHED`), clears the mark (the kernel's
//!   VXLAN device drops packets with reserved bits set) and passes the packet to the
//!   kernel, which decapsulates it to the task. The task's reply crosses its host veth,
//!   where the tc program rewrites the source and sends it straight to the client.
//! - Anything else passes untouched.
//!
//! Byte orders as in the crate root: fields ending in `_raw` hold network-order bytes
//! read as native integers.

use crate::FrontendKey;

/// Name of the hash map [`FrontendKey`] (node address, published port) → [`IngressFrontend`].
pub const INGRESS_FRONTENDS_MAP: &str = "IN_FRONTENDS";
/// Name of the array of [`IngressBackend`]s, indexed by backend id.
pub const INGRESS_BACKENDS_MAP: &str = "IN_BACKENDS";
/// Name of the array of Maglev slots (`u32` backend ids), `MAGLEV_TABLE_SIZE` per table.
pub const INGRESS_MAGLEV_MAP: &str = "IN_MAGLEV";
/// Name of the LRU hash map client 5-tuple ([`FlowKey`]) → [`Flow`].
pub const INGRESS_FLOWS_MAP: &str = "IN_FLOWS";
/// Name of the LRU hash map reply 5-tuple ([`FlowKey`]) → [`Nat`].
pub const INGRESS_NAT_MAP: &str = "IN_NAT";
/// Name of the one-entry array holding the [`IngressConfig`].
pub const INGRESS_CONFIG_MAP: &str = "IN_CONFIG";
/// Name of the per-CPU array of `u64` packet counters, indexed by `IN_STAT_*`.
pub const INGRESS_STATS_MAP: &str = "IN_STATS";

/// Name of the XDP program attached to the underlay interface.
pub const INGRESS_XDP_PROGRAM: &str = "ingress_xdp";
/// Name of the tc (ingress hook) program attached to each local task's host veth.
pub const INGRESS_TC_PROGRAM: &str = "ingress_reply";
/// The tc (TCX ingress) flavour of the underlay program, where XDP costs more than it
/// saves (see `dataplane::ingress`).
pub const INGRESS_UNDERLAY_TC_PROGRAM: &str = "ingress_tc";

/// Frontends (published ports) the kernel path can serve at once.
pub const MAX_INGRESS_FRONTENDS: u32 = 1024;
/// Maglev tables compiled into the object; the loader may lower it
/// (`EbpfLoader::set_max_entries` on [`INGRESS_MAGLEV_MAP`]) to `tables *
/// MAGLEV_TABLE_SIZE`. Each table costs 256 KiB of locked memory.
pub const DEFAULT_INGRESS_TABLES: u32 = 16;
/// Backend ids (one per published port and task).
pub const MAX_INGRESS_BACKENDS: u32 = 16_384;
/// Flows remembered (LRU).
pub const MAX_INGRESS_FLOWS: u32 = 262_144;
/// Reverse translations remembered (LRU).
pub const MAX_INGRESS_NAT: u32 = 262_144;

/// `IngressFrontend::mode`: replies return through the ingress node.
pub const MODE_SNAT: u8 = 0;
/// `IngressFrontend::mode`: the backend's node replies straight to the client.
pub const MODE_DSR: u8 = 1;

/// `IngressBackend::flags`: the slot holds a backend that takes flows.
pub const BACKEND_LIVE: u16 = 1;
/// `IngressBackend::flags`: the task runs on this node (redirect, no encapsulation).
pub const BACKEND_LOCAL: u16 = 2;
/// `IngressBackend::flags`: the task is draining (`meshctl detach --grace`, `node
/// drain`): its established flows keep it, but a packet that opens a flow (a SYN on a
/// client 4-tuple reused from an old flow, any UDP datagram) re-balances away from it.
pub const BACKEND_DRAINING: u16 = 4;

/// UDP port of VXLAN (IANA), as the kernel's devices use it.
pub const VXLAN_PORT: u16 = 4789;
/// Bytes the encapsulation adds in front of the inner Ethernet frame:
/// Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8.
pub const VXLAN_OVERHEAD: usize = 50;
/// First byte of the VXLAN header: the I flag (a valid VNI follows).
pub const VXLAN_FLAG_VNI: u8 = 0x08;
/// Value of the VXLAN header's second byte (first reserved byte) that marks a DSR
/// packet; the next two bytes hold the published port (network order).
pub const DSR_MARKER: u8 = 0x4d;

/// NAT ports (host order) the snat mode may pick when the client's own port is taken:
/// above Linux's default ephemeral range (32768–60999), so they never collide with a
/// connection the node itself opens from the same address.
pub const NAT_PORT_MIN: u16 = 61_000;
/// Last NAT port (host order), inclusive.
pub const NAT_PORT_MAX: u16 = 65_535;

/// Index into [`INGRESS_STATS_MAP`]: packets that passed untouched.
pub const IN_STAT_PASS: u32 = 0;
/// Packets redirected to a local task.
pub const IN_STAT_LOCAL: u32 = 1;
/// Packets encapsulated to a remote backend.
pub const IN_STAT_ENCAP: u32 = 2;
/// snat replies decapsulated and sent to the client by the XDP program.
pub const IN_STAT_REPLY_XDP: u32 = 3;
/// Replies rewritten and sent to the client by the tc program.
pub const IN_STAT_REPLY_TC: u32 = 4;
/// DSR packets recorded and unmarked on the backend's node.
pub const IN_STAT_DSR_RECORDED: u32 = 5;
/// New flows to a frontend without live backends (passed to the stack).
pub const IN_STAT_NO_BACKEND: u32 = 6;
/// Packets for a frontend that could not be forwarded (no route or neighbour to the
/// next hop, no NAT port, failed helper): passed to the stack.
pub const IN_STAT_UNROUTED: u32 = 7;
/// Malformed packets dropped (truncated headers, bad lengths).
pub const IN_STAT_DROP_MALFORMED: u32 = 8;
/// Number of entries in [`INGRESS_STATS_MAP`].
pub const IN_STAT_ENTRIES: u32 = 9;

/// Value of [`INGRESS_FRONTENDS_MAP`]: one published port on this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngressFrontend {
    /// Its Maglev table (slots `table * MAGLEV_TABLE_SIZE ..`).
    pub table: u32,
    /// Live backends; 0: new flows pass to the stack (the proxy answers them).
    pub count: u32,
    /// [`MODE_SNAT`] or [`MODE_DSR`].
    pub mode: u8,
    /// Always 0.
    pub pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<IngressFrontend>() == 12);

/// Value of [`INGRESS_BACKENDS_MAP`]: one task behind one published port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngressBackend {
    /// The task's overlay address.
    pub addr_raw: u32,
    /// Underlay address of the task's node (the VXLAN destination); this node's own
    /// for a local task.
    pub vtep_raw: u32,
    /// This node's address on the task's network (its bridge): the snat source.
    pub gw_raw: u32,
    /// Host-side veth of a local task (its ifindex in meshd's namespace); 0 if remote.
    pub ifindex: u32,
    /// The network's VXLAN id.
    pub vni: u32,
    /// Bumped by the user side whenever the id is given to another task, so flows
    /// remembered for the old one re-balance.
    pub gen: u32,
    /// The task's MAC (inner destination).
    pub mac: [u8; 6],
    /// This node's MAC on the task's network (inner source).
    pub gw_mac: [u8; 6],
    /// The task's port (the published port's target).
    pub port_raw: u16,
    /// `BACKEND_*` bits.
    pub flags: u16,
}

const _: () = assert!(core::mem::size_of::<IngressBackend>() == 40);

/// Key of [`INGRESS_FLOWS_MAP`] and [`INGRESS_NAT_MAP`]: a 5-tuple as it appears on
/// the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address.
    pub src_raw: u32,
    /// Destination address.
    pub dst_raw: u32,
    /// Source port.
    pub sport_raw: u16,
    /// Destination port.
    pub dport_raw: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// Always 0.
    pub pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

/// Value of [`INGRESS_FLOWS_MAP`]: where a client's flow goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Backend id.
    pub backend: u32,
    /// [`IngressBackend::gen`] when the flow was balanced.
    pub gen: u32,
    /// snat to a remote backend: the source port used toward it.
    pub nat_port_raw: u16,
    /// Always 0.
    pub pad: u16,
}

const _: () = assert!(core::mem::size_of::<Flow>() == 12);

/// Value of [`INGRESS_NAT_MAP`]: what a reply's addresses become.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Nat {
    /// New source address (the published address).
    pub src_raw: u32,
    /// New destination address (the client).
    pub dst_raw: u32,
    /// New source port (the published port).
    pub sport_raw: u16,
    /// New destination port (the client's).
    pub dport_raw: u16,
    /// Always 0.
    pub pad: u32,
    /// `bpf_ktime_get_ns` when the entry was written, refreshed (at most every
    /// [`NAT_REFRESH_NS`]) by the snat replies that use it: a snat entry of another
    /// client idle for longer than [`NAT_IDLE_NS`] may be taken over.
    pub created_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Nat>() == 24);

/// The loader's settings, index 0 of [`INGRESS_CONFIG_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngressConfig {
    /// The node's underlay address (outer source of the encapsulation).
    pub node_raw: u32,
    /// The underlay interface's ifindex.
    pub ifindex: u32,
    /// First NAT port (host order), normally [`NAT_PORT_MIN`].
    pub nat_port_min: u16,
    /// Last NAT port (host order), normally [`NAT_PORT_MAX`].
    pub nat_port_max: u16,
    /// Always 0.
    pub pad: u32,
}

const _: () = assert!(core::mem::size_of::<IngressConfig>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): `repr(C)`, no padding (sizes asserted above), every bit pattern valid.
    unsafe impl aya::Pod for super::IngressFrontend {}
    unsafe impl aya::Pod for super::IngressBackend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::Nat {}
    unsafe impl aya::Pod for super::IngressConfig {}
}

/// Index of slot `slot` of Maglev table `table` in [`INGRESS_MAGLEV_MAP`].
pub const fn maglev_index(table: u32, slot: u32) -> u32 {
    table * crate::maglev::MAGLEV_TABLE_SIZE + slot
}

/// The frontend key the XDP program looks a packet up with.
pub const fn frontend_key(dst_raw: u32, dport_raw: u16, proto: u8) -> FrontendKey {
    FrontendKey::from_raw(dst_raw, dport_raw, proto)
}

/// How long (ns) a snat entry of one client holds its NAT port against another client
/// whose flow hashes to the same port: past it, the entry may be taken over (the
/// connection it served has been idle that long).
pub const NAT_IDLE_NS: u64 = 60_000_000_000;

/// The same for TCP: an idle established connection is still open (Linux's keepalive
/// probes start after 2 h, then 9 × 75 s), and taking its port over would put two
/// clients on one 4-tuple at the backend, which resets both. The LRU still reclaims
/// the space of entries nobody uses.
pub const NAT_IDLE_TCP_NS: u64 = 7_875_000_000_000;

/// How stale an snat entry's time may get before a reply refreshes it: rare enough
/// that replies do not write the map on every packet, far below [`NAT_IDLE_NS`].
pub const NAT_REFRESH_NS: u64 = 1_000_000_000;

/// Whether a reply at `now_ns` should refresh an snat entry written at `created_ns`.
pub const fn nat_needs_refresh(created_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(created_ns) > NAT_REFRESH_NS
}

/// NAT port candidates tried (after the client's own port) before giving up.
pub const NAT_PORT_PROBES: u32 = 4;

/// The three reserved bytes of the VXLAN header that mark a DSR packet: the marker and
/// the published port (raw).
pub const fn dsr_mark(published_raw: u16) -> [u8; 3] {
    let p = published_raw.to_ne_bytes();
    [DSR_MARKER, p[0], p[1]]
}

/// The `attempt`-th NAT port candidate (host order) for a flow of hash `flow_hash`, in
/// `min..=max` (spread by the hash so two clients rarely probe the same ports). An
/// empty range yields `min`.
pub const fn nat_port_candidate(flow_hash: u32, attempt: u32, min: u16, max: u16) -> u16 {
    if max <= min {
        return min;
    }
    let span = (max - min) as u64 + 1;
    let h = crate::maglev::mix64(((flow_hash as u64) << 32) | attempt as u64);
    min + (h % span) as u16
}

/// Whether a snat reply key already holding `existing` may be (re)written for the
/// client `client_raw:cport_raw` at time `now_ns`: free, the same client's, or idle
/// for longer than [`NAT_IDLE_NS`] ([`NAT_IDLE_TCP_NS`] for TCP).
pub const fn nat_port_usable(
    existing: Option<Nat>,
    client_raw: u32,
    cport_raw: u16,
    proto: u8,
    now_ns: u64,
) -> bool {
    let idle = if proto == crate::PROTO_TCP { NAT_IDLE_TCP_NS } else { NAT_IDLE_NS };
    match existing {
        None => true,
        Some(n) => {
            (n.dst_raw == client_raw && n.dport_raw == cport_raw)
                || now_ns.saturating_sub(n.created_ns) > idle
        }
    }
}

/// What the XDP program does with a packet to a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowChoice {
    /// The flow's backend still serves it: keep it.
    Keep {
        /// Backend id.
        backend: u32,
        /// NAT port recorded for it (snat to a remote backend).
        nat_port_raw: u16,
    },
    /// Choose a backend from the Maglev table and remember it.
    Balance,
    /// Not for the fast path (a TCP segment of a connection it did not see open).
    Pass,
}

/// The choice for a packet whose flow entry is `flow` (with its backend's current
/// value `backend`, if the flow names one), where `opens` says the packet may start a
/// flow (TCP SYN without ACK, any UDP datagram).
pub const fn flow_choice(flow: Option<Flow>, backend: Option<IngressBackend>, opens: bool) -> FlowChoice {
    match flow {
        Some(f) => match backend {
            Some(b)
                if b.flags & BACKEND_LIVE != 0
                    && b.gen == f.gen
                    && !(opens && b.flags & BACKEND_DRAINING != 0) =>
            {
                FlowChoice::Keep { backend: f.backend, nat_port_raw: f.nat_port_raw }
            }
            // Its backend left, its id went to another task, or a new connection
            // reuses the tuple of a flow to a draining task: move the flow.
            _ => FlowChoice::Balance,
        },
        None if opens => FlowChoice::Balance,
        None => FlowChoice::Pass,
    }
}

/// The Maglev slot index (into [`INGRESS_MAGLEV_MAP`]) for a flow of hash `flow_hash`
/// through frontend `fe`.
pub const fn maglev_slot(fe: &IngressFrontend, flow_hash: u32) -> u32 {
    maglev_index(fe.table, flow_hash % crate::maglev::MAGLEV_TABLE_SIZE)
}

/// The reverse key of a reply from `task_raw:tport_raw` to `to_raw:to_port_raw`.
pub const fn reply_key(task_raw: u32, tport_raw: u16, to_raw: u32, to_port_raw: u16, proto: u8) -> FlowKey {
    FlowKey {
        src_raw: task_raw,
        dst_raw: to_raw,
        sport_raw: tport_raw,
        dport_raw: to_port_raw,
        proto,
        pad: [0; 3],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(flags: u16, gen: u32) -> IngressBackend {
        IngressBackend { flags, gen, ..Default::default() }
    }

    #[test]
    fn established_flow_keeps_a_live_backend_of_its_generation() {
        let flow = Flow { backend: 7, gen: 3, nat_port_raw: 99, pad: 0 };
        assert_eq!(
            flow_choice(Some(flow), Some(backend(BACKEND_LIVE, 3)), false),
            FlowChoice::Keep { backend: 7, nat_port_raw: 99 }
        );
        assert_eq!(flow_choice(Some(flow), Some(backend(0, 3)), false), FlowChoice::Balance, "removed");
        assert_eq!(
            flow_choice(Some(flow), Some(backend(BACKEND_LIVE, 4)), false),
            FlowChoice::Balance,
            "reused id"
        );
        assert_eq!(flow_choice(Some(flow), None, true), FlowChoice::Balance, "id out of range");
    }

    #[test]
    fn a_draining_backend_keeps_its_flows_but_not_a_reused_tuples_new_connection() {
        let flow = Flow { backend: 7, gen: 3, nat_port_raw: 0, pad: 0 };
        let draining = backend(BACKEND_LIVE | BACKEND_DRAINING, 3);
        assert_eq!(
            flow_choice(Some(flow), Some(draining), false),
            FlowChoice::Keep { backend: 7, nat_port_raw: 0 }
        );
        assert_eq!(flow_choice(Some(flow), Some(draining), true), FlowChoice::Balance);
    }

    #[test]
    fn only_an_opening_packet_starts_a_flow() {
        assert_eq!(flow_choice(None, None, true), FlowChoice::Balance);
        assert_eq!(flow_choice(None, None, false), FlowChoice::Pass);
    }

    #[test]
    fn nat_candidates_stay_in_range_and_spread() {
        let mut seen = [false; 16];
        for attempt in 0..NAT_PORT_PROBES {
            for h in 0..1000u32 {
                let p =
                    nat_port_candidate(h.wrapping_mul(2_654_435_761), attempt, NAT_PORT_MIN, NAT_PORT_MAX);
                assert!((NAT_PORT_MIN..=NAT_PORT_MAX).contains(&p));
                seen[(p as usize) % 16] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(nat_port_candidate(5, 0, 100, 100), 100);
        assert_eq!(nat_port_candidate(5, 0, 100, 50), 100);
        assert_ne!(
            nat_port_candidate(5, 0, NAT_PORT_MIN, NAT_PORT_MAX),
            nat_port_candidate(5, 1, NAT_PORT_MIN, NAT_PORT_MAX)
        );
    }

    #[test]
    fn nat_port_is_free_ours_or_idle() {
        let n = Nat { dst_raw: 1, dport_raw: 2, created_ns: 10, ..Default::default() };
        let udp = crate::PROTO_UDP;
        assert!(nat_port_usable(None, 1, 2, udp, 0));
        assert!(nat_port_usable(Some(n), 1, 2, udp, 11), "same client");
        assert!(!nat_port_usable(Some(n), 1, 3, udp, 11), "another client's, fresh");
        assert!(nat_port_usable(Some(n), 1, 3, udp, 10 + NAT_IDLE_NS + 1), "another client's, idle");
        let tcp = crate::PROTO_TCP;
        assert!(
            !nat_port_usable(Some(n), 1, 3, tcp, 10 + NAT_IDLE_NS + 1),
            "an idle TCP connection keeps it"
        );
        assert!(nat_port_usable(Some(n), 1, 3, tcp, 10 + NAT_IDLE_TCP_NS + 1), "past keepalive's give-up");
    }

    #[test]
    fn replies_refresh_entries_rarely_and_long_before_they_idle_out() {
        assert!(!nat_needs_refresh(10, 10 + NAT_REFRESH_NS));
        assert!(nat_needs_refresh(10, 11 + NAT_REFRESH_NS));
        assert!(!nat_needs_refresh(100, 5), "a clock behind the entry never refreshes");
        const { assert!(NAT_REFRESH_NS * 10 <= NAT_IDLE_NS) };
    }

    #[test]
    fn dsr_mark_holds_marker_and_port() {
        let port = crate::port_raw(3000);
        let m = dsr_mark(port);
        assert_eq!(m[0], DSR_MARKER);
        assert_eq!(u16::from_be_bytes([m[1], m[2]]), 3000);
    }
}
