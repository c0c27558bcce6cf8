//! Socket-level load balancing: the maps the cgroup `sock_addr` programs read and the
//! decisions they take.
//!
//! The user side writes, per service frontend, a [`ServiceValue`] into
//! [`SERVICES_MAP`] and `count` [`BackendValue`]s into [`BACKENDS_MAP`] at slots
//! `0..count`. `connect4`/`sendmsg4` look the destination up ([`resolve_frontend`]),
//! pick a slot ([`choose_slot`]) and rewrite the address; they remember the
//! translation in [`REVERSE_MAP`] under the socket's cookie and the backend, so that
//! `recvmsg4`/`getpeername4` can show the frontend again.
//!
//! Three frontend forms share [`FrontendKey`]:
//! - `addr:port/proto` — a service VIP port (or any exact address);
//! - `addr:0/proto` — every other port of the VIP `addr` (Docker's VIP semantics: a
//!   VIP forwards every port). With backends, a connection to `addr:P` goes to a
//!   backend; a backend whose port is 0 keeps `P` ([`BackendValue::destination`]),
//!   so `VIP:3306` reaches `task:3306`. With `count == 0` it marks `addr` as a VIP
//!   whose other ports are refused (`ECONNREFUSED`) instead of leaving for a network
//!   that holds no such address. An exact `addr:port` frontend always wins;
//! - `0.0.0.0:port/proto` — a published port, reached at any loopback address or any
//!   address listed in [`LOCAL_ADDRS_MAP`] (the node's own addresses), and only from
//!   sockets in the network namespace the loader runs in ([`LbConfig::host_netns_cookie`],
//!   [`local_form_applies`]). In production the programs sit on the cgroup2 root and
//!   so see every container: a container's own `127.0.0.1:port` is its own business.
//!   The VIP forms apply in every namespace.
//!
//! The reverse entry records the port the application used, so `getpeername`/`recvmsg`
//! show `VIP:3306` also through the wildcard form.

/// Name of the hash map frontend → [`ServiceValue`].
pub const SERVICES_MAP: &str = "LB_SERVICES";
/// Name of the hash map (service id, slot) → [`BackendValue`].
pub const BACKENDS_MAP: &str = "LB_BACKENDS";
/// Name of the LRU map (socket cookie, backend) → [`ReverseValue`].
pub const REVERSE_MAP: &str = "LB_REVERSE";
/// Name of the hash map of the node's own addresses (`addr_raw` → [`LOCAL_ADDR_PRESENT`]).
pub const LOCAL_ADDRS_MAP: &str = "LB_LOCAL_ADDRS";
/// Name of the one-entry array holding the [`LbConfig`] (index 0).
pub const CONFIG_MAP: &str = "LB_CONFIG";

/// Capacity of [`SERVICES_MAP`].
pub const MAX_SERVICES: u32 = 16_384;
/// Capacity of [`BACKENDS_MAP`].
pub const MAX_BACKEND_SLOTS: u32 = 262_144;
/// Capacity of [`REVERSE_MAP`] (least recently used entries go first).
pub const MAX_REVERSE: u32 = 262_144;
/// Capacity of [`LOCAL_ADDRS_MAP`].
pub const MAX_LOCAL_ADDRS: u32 = 256;
/// Most backends one frontend may have.
pub const MAX_BACKENDS_PER_SERVICE: u16 = 4096;

/// Value stored in [`LOCAL_ADDRS_MAP`] for a present address.
pub const LOCAL_ADDR_PRESENT: u32 = 1;

/// `IPPROTO_TCP`.
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const PROTO_UDP: u8 = 17;

/// `ECONNREFUSED`, what a refused frontend's `connect()` fails with.
pub const ECONNREFUSED: i32 = 111;

/// [`ServiceValue::flags`]: none set.
pub const SERVICE_FLAGS_NONE: u16 = 0;

/// An IPv4 address as `bpf_sock_addr.user_ip4` holds it: the octets in network order.
pub const fn ip4_raw(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// The octets of an address held as [`ip4_raw`] makes it.
pub const fn ip4_octets(raw: u32) -> [u8; 4] {
    raw.to_ne_bytes()
}

/// A port as `bpf_sock_addr.user_port` holds it: network order.
pub const fn port_raw(port: u16) -> u16 {
    port.to_be()
}

/// The host-order port of a value [`port_raw`] made.
pub const fn port_host(raw: u16) -> u16 {
    u16::from_be(raw)
}

/// The port part of `bpf_sock_addr.user_port` (a network-order `u16` zero-extended).
pub const fn port_from_user(user_port: u32) -> u16 {
    user_port as u16
}

/// Whether an address is in 127.0.0.0/8.
pub const fn is_loopback(addr_raw: u32) -> bool {
    ip4_octets(addr_raw)[0] == 127
}

/// Key of [`SERVICES_MAP`]: one service frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    /// The address (see [`ip4_raw`]); 0 for the "any local address" form.
    pub addr_raw: u32,
    /// The port (see [`port_raw`]); 0 for the wildcard form (every other port of `addr`).
    pub port_raw: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// Always 0.
    pub pad: u8,
}

const _: () = assert!(core::mem::size_of::<FrontendKey>() == 8);

impl FrontendKey {
    /// The key for `octets:port/proto` (host-order port).
    pub const fn new(octets: [u8; 4], port: u16, proto: u8) -> Self {
        FrontendKey { addr_raw: ip4_raw(octets), port_raw: port_raw(port), proto, pad: 0 }
    }

    /// The key as the kernel sees a destination (raw address and port).
    pub const fn from_raw(addr_raw: u32, port_raw: u16, proto: u8) -> Self {
        FrontendKey { addr_raw, port_raw, proto, pad: 0 }
    }
}

/// The loader's settings the programs read, at index 0 of [`CONFIG_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// Network namespace cookie (`SO_NETNS_COOKIE`) of the namespace the loader runs
    /// in: the only one where the "any local address" form applies. 0 (never a real
    /// cookie) until the loader writes it: the form then applies nowhere.
    pub host_netns_cookie: u64,
}

const _: () = assert!(core::mem::size_of::<LbConfig>() == 8);

/// Whether the "any local address" (`0.0.0.0:port`) form applies to a socket in the
/// namespace with cookie `socket_netns_cookie`, under `config`.
pub const fn local_form_applies(config: &LbConfig, socket_netns_cookie: u64) -> bool {
    config.host_netns_cookie != 0 && config.host_netns_cookie == socket_netns_cookie
}

/// Value of [`SERVICES_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Backends in slots `0..count` of this service; 0 refuses connections.
    pub count: u16,
    /// `SERVICE_FLAGS_*` bits; none defined yet, always 0.
    pub flags: u16,
    /// The id the backend slots are keyed by (chosen by the user side, unique per frontend).
    pub service_id: u32,
}

const _: () = assert!(core::mem::size_of::<ServiceValue>() == 8);

/// Key of [`BACKENDS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    /// [`ServiceValue::service_id`] of the service.
    pub service_id: u32,
    /// Slot, below the service's count.
    pub slot: u32,
}

const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);

/// Value of [`BACKENDS_MAP`]: where connections are rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendValue {
    /// The backend's address (see [`ip4_raw`]).
    pub addr_raw: u32,
    /// The backend's port (see [`port_raw`]); 0 keeps the port the application asked
    /// for (only behind a wildcard `addr:0` frontend).
    pub port_raw: u16,
    /// Always 0.
    pub pad: u16,
}

const _: () = assert!(core::mem::size_of::<BackendValue>() == 8);

impl BackendValue {
    /// The backend `octets:port` (host-order port).
    pub const fn new(octets: [u8; 4], port: u16) -> Self {
        BackendValue { addr_raw: ip4_raw(octets), port_raw: port_raw(port), pad: 0 }
    }

    /// The raw address and port a destination port `dst_port_raw` is rewritten to on
    /// this backend: its own port, or `dst_port_raw` when that is 0.
    pub const fn destination(&self, dst_port_raw: u16) -> (u32, u16) {
        let port = if self.port_raw == 0 { dst_port_raw } else { self.port_raw };
        (self.addr_raw, port)
    }
}

/// Key of [`REVERSE_MAP`]. The backend is part of the key because one unconnected UDP
/// socket may talk to several frontends (and backends) at once; the cookie alone would
/// keep only the last.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReverseKey {
    /// `bpf_get_socket_cookie` of the socket.
    pub cookie: u64,
    /// The backend's address (see [`ip4_raw`]).
    pub backend_addr_raw: u32,
    /// The backend's port (see [`port_raw`]).
    pub backend_port_raw: u16,
    /// Always 0.
    pub pad: u16,
}

const _: () = assert!(core::mem::size_of::<ReverseKey>() == 16);

impl ReverseKey {
    /// The key for `cookie` talking to the raw address and port.
    pub const fn new(cookie: u64, addr_raw: u32, port_raw: u16) -> Self {
        ReverseKey { cookie, backend_addr_raw: addr_raw, backend_port_raw: port_raw, pad: 0 }
    }
}

/// Value of [`REVERSE_MAP`]: the frontend the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReverseValue {
    /// The frontend's address (see [`ip4_raw`]); the real destination address for the
    /// "any local address" form.
    pub addr_raw: u32,
    /// The frontend's port (see [`port_raw`]).
    pub port_raw: u16,
    /// Always 0.
    pub pad: u16,
}

const _: () = assert!(core::mem::size_of::<ReverseValue>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all seven): `repr(C)`, fixed-width integer fields, no implicit padding
    // (sizes asserted above), and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::FrontendKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::BackendKey {}
    unsafe impl aya::Pod for super::BackendValue {}
    unsafe impl aya::Pod for super::ReverseKey {}
    unsafe impl aya::Pod for super::ReverseValue {}
    unsafe impl aya::Pod for super::LbConfig {}
}

/// What `connect4`/`sendmsg4` do with a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    /// Not a frontend: leave the call alone.
    Pass,
    /// A frontend without backends, or a port of a VIP whose wildcard form has no
    /// backends: fail the call.
    Refuse,
    /// A frontend with backends: pick one of `count` slots of `service_id`.
    Balance {
        /// The service's id.
        service_id: u32,
        /// Backends in slots `0..count` (at least 1).
        count: u16,
    },
}

/// Decides what a `connect()`/`sendmsg()` to `addr_raw:port_raw/proto` is.
///
/// `lookup` reads [`SERVICES_MAP`], `is_local` [`LOCAL_ADDRS_MAP`], `in_host_netns`
/// says whether the socket is in the loader's namespace ([`local_form_applies`]); each
/// is called only as far as the decision needs (an exact frontend wins, then the VIP's
/// wildcard `addr:0` form, then — in the loader's namespace only — the "any local
/// address" form for loopback and local destinations).
pub fn resolve_frontend(
    addr_raw: u32,
    port_raw: u16,
    proto: u8,
    lookup: impl Fn(&FrontendKey) -> Option<ServiceValue>,
    is_local: impl Fn(u32) -> bool,
    in_host_netns: impl Fn() -> bool,
) -> Forward {
    if port_raw == 0 || addr_raw == 0 {
        // Port 0 and 0.0.0.0 are the map's wildcard forms, never a real destination.
        return Forward::Pass;
    }
    if let Some(service) = lookup(&FrontendKey::from_raw(addr_raw, port_raw, proto)) {
        return by_count(service);
    }
    if let Some(wildcard) = lookup(&FrontendKey::from_raw(addr_raw, 0, proto)) {
        return by_count(wildcard);
    }
    if (is_loopback(addr_raw) || is_local(addr_raw)) && in_host_netns() {
        if let Some(service) = lookup(&FrontendKey::from_raw(0, port_raw, proto)) {
            return by_count(service);
        }
    }
    Forward::Pass
}

fn by_count(service: ServiceValue) -> Forward {
    match service.count {
        0 => Forward::Refuse,
        count => Forward::Balance { service_id: service.service_id, count },
    }
}

/// Whether `sendmsg4` must write the reverse entry `want` when the map holds
/// `existing` under the same key. An unconnected UDP socket sends many datagrams to
/// the same backend; writing the LRU entry for each takes the bucket lock and
/// replaces the element, where a lookup is lock-free and also marks it recently used.
pub fn reverse_write_needed(existing: Option<ReverseValue>, want: ReverseValue) -> bool {
    existing != Some(want)
}

/// The slot a connection goes to: maps a uniformly random `u32` onto `0..count`
/// without a division (multiply-shift), so every slot gets an equal share.
/// `count` 0 gives slot 0 (callers refuse such frontends before asking).
pub const fn choose_slot(random: u32, count: u16) -> u32 {
    ((random as u64 * count as u64) >> 32) as u32
}

/// The protocol of a socket as the program sees it: `bpf_sock_addr.protocol`, or, when
/// the application passed 0 and the kernel did not fill it, derived from the type.
pub const fn socket_proto(protocol: u32, sock_type: u32) -> u8 {
    const SOCK_STREAM: u32 = 1;
    const SOCK_DGRAM: u32 = 2;
    match (protocol, sock_type) {
        (0, SOCK_STREAM) => PROTO_TCP,
        (0, SOCK_DGRAM) => PROTO_UDP,
        (p, _) => p as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    extern crate std;
    use std::collections::BTreeMap;

    const VIP: [u8; 4] = [10, 99, 0, 1];

    fn services(entries: &[(FrontendKey, u16)]) -> BTreeMap<FrontendKey, ServiceValue> {
        entries
            .iter()
            .enumerate()
            .map(|(i, (k, count))| (*k, ServiceValue { count: *count, flags: 0, service_id: i as u32 + 1 }))
            .collect()
    }

    fn resolve(map: &BTreeMap<FrontendKey, ServiceValue>, dst: FrontendKey, local: &[[u8; 4]]) -> Forward {
        resolve_in(map, dst, local, true)
    }

    fn resolve_in(
        map: &BTreeMap<FrontendKey, ServiceValue>,
        dst: FrontendKey,
        local: &[[u8; 4]],
        host_netns: bool,
    ) -> Forward {
        resolve_frontend(
            dst.addr_raw,
            dst.port_raw,
            dst.proto,
            |k| map.get(k).copied(),
            |a| local.iter().any(|l| ip4_raw(*l) == a),
            || host_netns,
        )
    }

    #[test]
    fn local_form_only_in_the_loaders_namespace() {
        let map = services(&[
            (FrontendKey::new([0; 4], 3000, PROTO_TCP), 2),
            (FrontendKey::new(VIP, 80, PROTO_TCP), 1),
            (FrontendKey::new(VIP, 0, PROTO_TCP), 0),
        ]);
        let node = [198, 18, 0, 11];
        // Another namespace (a container): its own loopback and addresses are untouched...
        for dst in [[127, 0, 0, 1], node] {
            assert_eq!(
                resolve_in(&map, FrontendKey::new(dst, 3000, PROTO_TCP), &[node], false),
                Forward::Pass
            );
        }
        // ...while VIPs, exact and wildcard, apply in every namespace.
        assert_eq!(
            resolve_in(&map, FrontendKey::new(VIP, 80, PROTO_TCP), &[node], false),
            Forward::Balance { service_id: 2, count: 1 }
        );
        assert_eq!(resolve_in(&map, FrontendKey::new(VIP, 81, PROTO_TCP), &[node], false), Forward::Refuse);
        assert_eq!(
            resolve_in(&map, FrontendKey::new([127, 0, 0, 1], 3000, PROTO_TCP), &[node], true),
            Forward::Balance { service_id: 1, count: 2 }
        );
    }

    #[test]
    fn the_namespace_check_matches_the_written_cookie_only() {
        let config = LbConfig { host_netns_cookie: 4096 };
        assert!(local_form_applies(&config, 4096));
        assert!(!local_form_applies(&config, 4097));
        // Not yet written: no socket's namespace matches, not even a zero cookie.
        assert!(!local_form_applies(&LbConfig::default(), 0));
        assert!(!local_form_applies(&LbConfig::default(), 4096));
    }

    #[test]
    fn byte_orders_match_the_kernel_layout() {
        // In memory, user_ip4 holds the octets in order and user_port the port big-endian.
        assert_eq!(ip4_raw(VIP).to_ne_bytes(), VIP);
        assert_eq!(port_raw(80).to_ne_bytes(), [0, 80]);
        assert_eq!(port_raw(0x1234).to_ne_bytes(), [0x12, 0x34]);
        assert_eq!(port_host(port_raw(3306)), 3306);
        assert_eq!(ip4_octets(ip4_raw(VIP)), VIP);
        // user_port is the raw u16 zero-extended.
        assert_eq!(port_from_user(u32::from(port_raw(8080))), port_raw(8080));
        let key = FrontendKey::new(VIP, 80, PROTO_TCP);
        // SAFETY: FrontendKey is repr(C), 8 bytes, no implicit padding.
        let bytes: [u8; 8] = unsafe { core::mem::transmute(key) };
        assert_eq!(bytes, [10, 99, 0, 1, 0, 80, PROTO_TCP, 0]);
    }

    #[test]
    fn loopback_is_127_slash_8() {
        assert!(is_loopback(ip4_raw([127, 0, 0, 1])));
        assert!(is_loopback(ip4_raw([127, 200, 3, 4])));
        assert!(!is_loopback(ip4_raw([10, 127, 0, 1])));
        assert!(!is_loopback(ip4_raw([1, 0, 0, 127])));
    }

    #[test]
    fn exact_frontend_with_backends_is_balanced() {
        let map = services(&[(FrontendKey::new(VIP, 80, PROTO_TCP), 3)]);
        assert_eq!(
            resolve(&map, FrontendKey::new(VIP, 80, PROTO_TCP), &[]),
            Forward::Balance { service_id: 1, count: 3 }
        );
        // Another protocol, port or address is not this frontend.
        assert_eq!(resolve(&map, FrontendKey::new(VIP, 80, PROTO_UDP), &[]), Forward::Pass);
        assert_eq!(resolve(&map, FrontendKey::new(VIP, 81, PROTO_TCP), &[]), Forward::Pass);
        assert_eq!(resolve(&map, FrontendKey::new([10, 99, 0, 2], 80, PROTO_TCP), &[]), Forward::Pass);
    }

    #[test]
    fn frontend_without_backends_refuses() {
        let map = services(&[(FrontendKey::new(VIP, 80, PROTO_TCP), 0)]);
        assert_eq!(resolve(&map, FrontendKey::new(VIP, 80, PROTO_TCP), &[]), Forward::Refuse);
    }

    #[test]
    fn an_empty_wildcard_refuses_ports_the_service_does_not_serve() {
        let map =
            services(&[(FrontendKey::new(VIP, 80, PROTO_TCP), 2), (FrontendKey::new(VIP, 0, PROTO_TCP), 0)]);
        assert_eq!(
            resolve(&map, FrontendKey::new(VIP, 80, PROTO_TCP), &[]),
            Forward::Balance { service_id: 1, count: 2 }
        );
        assert_eq!(resolve(&map, FrontendKey::new(VIP, 81, PROTO_TCP), &[]), Forward::Refuse);
        // The wildcard is per protocol.
        assert_eq!(resolve(&map, FrontendKey::new(VIP, 81, PROTO_UDP), &[]), Forward::Pass);
    }

    #[test]
    fn wildcard_with_backends_balances_every_other_port() {
        let map =
            services(&[(FrontendKey::new(VIP, 80, PROTO_TCP), 2), (FrontendKey::new(VIP, 0, PROTO_TCP), 3)]);
        // The exact frontend wins for its port; every other port takes the wildcard.
        assert_eq!(
            resolve(&map, FrontendKey::new(VIP, 80, PROTO_TCP), &[]),
            Forward::Balance { service_id: 1, count: 2 }
        );
        for port in [1, 81, 3306, u16::MAX] {
            assert_eq!(
                resolve(&map, FrontendKey::new(VIP, port, PROTO_TCP), &[]),
                Forward::Balance { service_id: 2, count: 3 }
            );
        }
        // Per protocol and per address.
        assert_eq!(resolve(&map, FrontendKey::new(VIP, 3306, PROTO_UDP), &[]), Forward::Pass);
        assert_eq!(resolve(&map, FrontendKey::new([10, 99, 0, 2], 3306, PROTO_TCP), &[]), Forward::Pass);
    }

    #[test]
    fn exact_frontend_without_backends_refuses_despite_a_wildcard() {
        let map =
            services(&[(FrontendKey::new(VIP, 80, PROTO_TCP), 0), (FrontendKey::new(VIP, 0, PROTO_TCP), 3)]);
        assert_eq!(resolve(&map, FrontendKey::new(VIP, 80, PROTO_TCP), &[]), Forward::Refuse);
        assert_eq!(
            resolve(&map, FrontendKey::new(VIP, 81, PROTO_TCP), &[]),
            Forward::Balance { service_id: 2, count: 3 }
        );
    }

    #[test]
    fn wildcard_wins_over_the_local_form_for_a_vip() {
        // A VIP that is also listed as a local address: its own forms decide.
        let map = services(&[
            (FrontendKey::new(VIP, 0, PROTO_TCP), 0),
            (FrontendKey::new([0; 4], 3000, PROTO_TCP), 2),
        ]);
        assert_eq!(resolve(&map, FrontendKey::new(VIP, 3000, PROTO_TCP), &[VIP]), Forward::Refuse);
    }

    #[test]
    fn a_port_zero_backend_keeps_the_destination_port() {
        let keep = BackendValue::new([10, 0, 0, 7], 0);
        assert_eq!(keep.destination(port_raw(3306)), (ip4_raw([10, 0, 0, 7]), port_raw(3306)));
        assert_eq!(keep.destination(port_raw(1)), (ip4_raw([10, 0, 0, 7]), port_raw(1)));
        let fixed = BackendValue::new([10, 0, 0, 7], 8080);
        assert_eq!(fixed.destination(port_raw(3306)), (ip4_raw([10, 0, 0, 7]), port_raw(8080)));
    }

    #[test]
    fn any_local_form_serves_loopback_and_local_addresses_only() {
        let map = services(&[(FrontendKey::new([0, 0, 0, 0], 3000, PROTO_TCP), 2)]);
        let node = [198, 18, 0, 11];
        let balanced = Forward::Balance { service_id: 1, count: 2 };
        assert_eq!(resolve(&map, FrontendKey::new([127, 0, 0, 1], 3000, PROTO_TCP), &[node]), balanced);
        assert_eq!(resolve(&map, FrontendKey::new(node, 3000, PROTO_TCP), &[node]), balanced);
        assert_eq!(
            resolve(&map, FrontendKey::new([198, 18, 0, 12], 3000, PROTO_TCP), &[node]),
            Forward::Pass
        );
        assert_eq!(resolve(&map, FrontendKey::new(node, 3001, PROTO_TCP), &[node]), Forward::Pass);
    }

    #[test]
    fn wildcard_destinations_are_never_frontends() {
        let map = services(&[
            (FrontendKey::new(VIP, 0, PROTO_TCP), 0),
            (FrontendKey::new([0; 4], 80, PROTO_TCP), 1),
        ]);
        assert_eq!(resolve(&map, FrontendKey::new(VIP, 0, PROTO_TCP), &[]), Forward::Pass);
        assert_eq!(resolve(&map, FrontendKey::new([0; 4], 80, PROTO_TCP), &[]), Forward::Pass);
    }

    #[test]
    fn exact_frontend_wins_over_the_local_form() {
        let map = services(&[
            (FrontendKey::new([0; 4], 3000, PROTO_TCP), 2),
            (FrontendKey::new([127, 0, 0, 1], 3000, PROTO_TCP), 0),
        ]);
        assert_eq!(resolve(&map, FrontendKey::new([127, 0, 0, 1], 3000, PROTO_TCP), &[]), Forward::Refuse);
    }

    #[test]
    fn the_reverse_entry_is_written_only_when_it_differs() {
        let want = ReverseValue { addr_raw: ip4_raw(VIP), port_raw: port_raw(53), pad: 0 };
        assert!(reverse_write_needed(None, want));
        assert!(!reverse_write_needed(Some(want), want));
        let other_port = ReverseValue { port_raw: port_raw(54), ..want };
        assert!(reverse_write_needed(Some(other_port), want));
        let other_vip = ReverseValue { addr_raw: ip4_raw([10, 99, 0, 2]), ..want };
        assert!(reverse_write_needed(Some(other_vip), want));
    }

    #[test]
    fn slots_cover_the_range_evenly() {
        assert_eq!(choose_slot(0, 3), 0);
        assert_eq!(choose_slot(u32::MAX, 3), 2);
        assert_eq!(choose_slot(u32::MAX, 1), 0);
        assert_eq!(choose_slot(12345, 0), 0);
        let mut hits = [0u32; 3];
        // Evenly spaced inputs stand in for a uniform random source.
        for i in 0..3000u64 {
            let random = (i * (u64::from(u32::MAX) + 1) / 3000) as u32;
            hits[choose_slot(random, 3) as usize] += 1;
        }
        assert!(hits.iter().all(|h| (999..=1001).contains(h)), "{hits:?}");
        for count in 1..=MAX_BACKENDS_PER_SERVICE {
            assert!(choose_slot(u32::MAX, count) < u32::from(count));
        }
    }

    #[test]
    fn protocol_falls_back_to_the_socket_type() {
        assert_eq!(socket_proto(6, 1), PROTO_TCP);
        assert_eq!(socket_proto(17, 2), PROTO_UDP);
        assert_eq!(socket_proto(0, 1), PROTO_TCP);
        assert_eq!(socket_proto(0, 2), PROTO_UDP);
    }
}
