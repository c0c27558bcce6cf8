//! Kernel VXLAN overlays. Per network a node has a bridge `mbr<VNI>` carrying the
//! node's own overlay address, a VXLAN device `mvx<VNI>` (UDP 4789, learning off, ARP
//! proxy on) enslaved to it, one static FDB entry (MAC → remote VTEP) and one
//! permanent neighbour entry (IP → MAC) per remote endpoint: no flooding, no multicast.
//! A task is a veth pair: `mv<hash>` on the bridge, `eth0` in the task's namespace.
//!
//! Everything goes over netlink ([`crate::netlink`]); each change is logged at debug
//! level as the `ip`/`bridge` command that says the same. Everything meshd creates is
//! recognisably its own: links named `mbr*`/`mvx*`/`mv*` (task veths also carry the
//! alias `meshd:<netns>`), FDB and neighbour entries on its own VXLAN devices, and
//! policy rules of priority 1000 with protocol [`MESHD_PROTOCOL`]. [`KernelVxlan::observe`]
//! reads exactly those objects back, and nothing else is ever changed. This module only
//! executes and observes; which objects should exist is decided by the control crate.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    str::FromStr,
};

use ipnet::Ipv4Net;
use rtnetlink::{
    packet_route::{
        address::{AddressAttribute, AddressMessage},
        link::{InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState},
        route::{
            RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
        },
        rule::{RuleAction, RuleAttribute, RuleMessage},
        AddressFamily, RouteNetlinkMessage as Msg,
    },
    LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVxlan,
};
use serde::{Deserialize, Serialize};

use crate::{
    netlink::{is_absent, Change, Mode, Netlink},
    Error, Result,
};

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

/// Priority of the policy-routing rules that isolate networks from each other.
pub const ISOLATION_PRIORITY: u32 = 1000;

/// The routing protocol number meshd stamps on its policy rules (`ip rule ... protocol
/// 109`): how it tells its own rules from an operator's. Unassigned in iproute2's
/// `rt_protos`.
pub const MESHD_PROTOCOL: u8 = 109;

/// Prefix of the alias (`ip link set mvX alias ...`) on a task's host-side veth; the rest
/// is the task's namespace path, so observe() can look inside it after a restart.
const TASK_ALIAS_PREFIX: &str = "meshd:";

/// Name of a task's interface inside its namespace.
const TASK_IF: &str = "eth0";

/// Bytes VXLAN adds on an IPv4 underlay (outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8).
pub const VXLAN_OVERHEAD: u32 = 50;

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(|| format!("MAC {s:?} has fewer than 6 bytes"))?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| format!("MAC {s:?} has a bad byte {part:?}"))?;
        }
        match parts.next() {
            None => Ok(MacAddr(out)),
            Some(_) => Err(format!("MAC {s:?} has more than 6 bytes")),
        }
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One overlay network as this node programs it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct OverlaySpec {
    /// The VXLAN network identifier.
    pub vni: u32,
    /// This node's address on the network (on its bridge).
    pub node_ip: Ipv4Addr,
    /// The network's prefix length.
    pub prefix_len: u8,
    /// This node's MAC on the network.
    pub node_mac: MacAddr,
    /// MTU of the bridge, VXLAN device and task interfaces.
    pub mtu: u32,
}

/// A remote endpoint reachable through the overlay.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerSpec {
    /// The network's VNI.
    pub vni: u32,
    /// The endpoint's overlay address.
    pub ip: Ipv4Addr,
    /// The endpoint's MAC.
    pub mac: MacAddr,
    /// Underlay address of the node hosting it.
    pub vtep: Ipv4Addr,
}

/// A task interface to create in a network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskLink {
    /// The network's VNI (selects the bridge).
    pub vni: u32,
    /// The task's network namespace.
    pub netns: PathBuf,
    /// Name of the host-side veth.
    pub host_if: String,
    /// The task's address.
    pub ip: Ipv4Addr,
    /// The network's prefix length.
    pub prefix_len: u8,
    /// The task's MAC.
    pub mac: MacAddr,
    /// Default gateway inside the task: this node's address on the network.
    pub gateway: Ipv4Addr,
    /// Interface MTU.
    pub mtu: u32,
}

/// Turns GRO on for the task's `eth0` inside `netns` (ethtool `ETHTOOL_SGRO`), if
/// it is off. The ingress path needs it: a native-XDP redirect into the task's host
/// veth reaches the task only when the peer (`eth0`) runs NAPI, which veth enables
/// with GRO.
pub fn enable_task_gro(netns: &std::path::Path) -> Result<()> {
    crate::netns::run_in(netns, || ethtool_gro(TASK_IF, true))?
        .map_err(|e| Error::io(format!("enabling GRO on {TASK_IF} in {}", netns.display()), e))
}

/// Runs one `SIOCETHTOOL` request on interface `name` of the calling thread's
/// namespace; `cmd` is the ethtool structure the kernel reads and writes (its first
/// field the command).
fn ethtool<T>(name: &str, cmd: &mut T) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    /// `struct ifreq` with `ifr_data`: name, then the pointer, padded to 40 bytes.
    #[repr(C)]
    struct IfReq<T> {
        name: [u8; libc::IFNAMSIZ],
        data: *mut T,
        pad: [u8; 16],
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other(format!("interface name {name:?} too long")));
    }
    let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: cmd as *mut T, pad: [0; 16] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req` and the structure it points to live across the call; SIOCETHTOOL
    // reads the name and reads/writes the structure of the command it holds.
    let ret = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL as _, &mut req as *mut IfReq<T>) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads GRO on interface `name` of the calling thread's namespace and turns it on
/// if `on` and it is off.
fn ethtool_gro(name: &str, on: bool) -> std::io::Result<()> {
    const ETHTOOL_GGRO: u32 = 0x2b;
    const ETHTOOL_SGRO: u32 = 0x2c;
    /// `struct ethtool_value`.
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut value = EthtoolValue { cmd: ETHTOOL_GGRO, data: 0 };
    ethtool(name, &mut value)?;
    if value.data == 0 && on {
        ethtool(name, &mut EthtoolValue { cmd: ETHTOOL_SGRO, data: 1 })?;
    }
    Ok(())
}

/// Name of the bridge of network `vni`.
pub fn bridge_name(vni: u32) -> String {
    format!("mbr{vni}")
}

/// Name of the VXLAN device of network `vni`.
pub fn vxlan_name(vni: u32) -> String {
    format!("mvx{vni}")
}

/// What [`KernelVxlan::observe`] found: meshd's own objects in the kernel, in the same
/// shapes the control crate asks for. An object that exists but is incomplete or
/// changed is reported with the fields the kernel holds (an overlay that is not fully
/// wired has `mtu` 0, a task link whose namespace side is broken has the addresses it
/// actually has), so that comparing with what is wanted shows the drift.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Overlay networks (bridge + VXLAN device + address), by VNI.
    pub overlays: BTreeMap<u32, OverlaySpec>,
    /// Remote endpoints programmed on meshd's VXLAN devices. An FDB entry without its
    /// neighbour is reported with `ip` 0.0.0.0, a neighbour without its FDB entry with
    /// `vtep` 0.0.0.0.
    pub peers: BTreeSet<PeerSpec>,
    /// Task interfaces, by host-side name.
    pub tasks: BTreeMap<String, TaskLink>,
    /// Isolation rules: (from, to).
    pub isolation: BTreeSet<(Ipv4Net, Ipv4Net)>,
}

/// Kernel VXLAN overlays on this node, programmed over one netlink socket in the node's
/// namespace (task namespaces get their own short-lived sockets).
#[derive(Clone, Debug)]
pub struct KernelVxlan {
    /// This node's underlay address: source of its VXLAN packets.
    pub local_vtep: Ipv4Addr,
    nl: Netlink,
}

/// The parts of a link that meshd reads.
#[derive(Clone, Debug, Default)]
struct Link {
    index: u32,
    name: String,
    kind: Option<InfoKind>,
    master: Option<u32>,
    mtu: u32,
    mac: Option<MacAddr>,
    up: bool,
    alias: Option<String>,
    vxlan: Vec<InfoVxlan>,
}

impl Link {
    fn parse(message: &LinkMessage) -> Link {
        let mut link = Link {
            index: message.header.index,
            up: message.header.flags.contains(LinkFlags::Up),
            ..Link::default()
        };
        for attr in &message.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name.clone(),
                LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
                LinkAttribute::Controller(master) => link.master = Some(*master),
                LinkAttribute::IfAlias(alias) => link.alias = Some(alias.clone()),
                LinkAttribute::Address(bytes) => {
                    link.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(MacAddr)
                }
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(kind) => link.kind = Some(kind.clone()),
                            LinkInfo::Data(InfoData::Vxlan(data)) => link.vxlan = data.clone(),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    fn vxlan_matches(&self, vni: u32, local: Ipv4Addr) -> bool {
        let has = |want: &InfoVxlan| self.vxlan.contains(want);
        has(&InfoVxlan::Id(vni))
            && has(&InfoVxlan::Local(local))
            && has(&InfoVxlan::Port(VXLAN_PORT))
            && has(&InfoVxlan::Learning(false))
            && has(&InfoVxlan::Proxy(true))
    }
}

/// IPv4 addresses by interface index.
fn ipv4_by_link(messages: Vec<Msg>) -> HashMap<u32, Vec<(Ipv4Addr, u8)>> {
    let mut out: HashMap<u32, Vec<(Ipv4Addr, u8)>> = HashMap::new();
    for message in messages {
        let Msg::NewAddress(a) = message else { continue };
        if a.header.family != AddressFamily::Inet {
            continue;
        }
        let local = a.attributes.iter().find_map(|attr| match attr {
            AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        let address = a.attributes.iter().find_map(|attr| match attr {
            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = local.or(address) {
            out.entry(a.header.index).or_default().push((ip, a.header.prefix_len));
        }
    }
    out
}

fn link_get(name: &str) -> Msg {
    Msg::GetLink(LinkMessageBuilder::<LinkUnspec>::new().name(name.to_owned()).build())
}

fn address_message(index: u32, ip: Ipv4Addr, prefix_len: u8) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.prefix_len = prefix_len;
    message.header.index = index;
    message.attributes.push(AddressAttribute::Local(IpAddr::V4(ip)));
    message.attributes.push(AddressAttribute::Address(IpAddr::V4(ip)));
    message
}

fn rule_message(from: Ipv4Net, to: Ipv4Net) -> RuleMessage {
    let mut rule = RuleMessage::default();
    rule.header.family = AddressFamily::Inet;
    rule.header.src_len = from.prefix_len();
    rule.header.dst_len = to.prefix_len();
    rule.header.action = RuleAction::Prohibit;
    rule.attributes.push(RuleAttribute::Source(IpAddr::V4(from.network())));
    rule.attributes.push(RuleAttribute::Destination(IpAddr::V4(to.network())));
    rule.attributes.push(RuleAttribute::Priority(ISOLATION_PRIORITY));
    rule.attributes.push(RuleAttribute::Protocol(RouteProtocol::from(MESHD_PROTOCOL)));
    rule
}

fn rule_command(verb: &str, from: Ipv4Net, to: Ipv4Net) -> String {
    format!(
        "ip rule {verb} from {from} to {to} priority {ISOLATION_PRIORITY} protocol {MESHD_PROTOCOL} prohibit"
    )
}

fn fdb_message(index: u32, mac: MacAddr, vtep: Ipv4Addr) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Bridge;
    message.header.ifindex = index;
    message.header.state = NeighbourState::Permanent;
    message.header.flags = NeighbourFlags::Own;
    message.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    message.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(vtep)));
    message
}

fn neigh_message(index: u32, ip: Ipv4Addr, mac: Option<MacAddr>) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.ifindex = index;
    message.header.state = NeighbourState::Permanent;
    message.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    if let Some(mac) = mac {
        message.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    }
    message
}

/// The changes that program (or remove) one peer.
fn peer_changes(index: u32, vx: &str, peer: &PeerSpec, add: bool) -> Vec<Change> {
    let mut out = Vec::with_capacity(2);
    let (mac, ip, vtep) = (peer.mac, peer.ip, peer.vtep);
    if add {
        out.push(Change {
            message: Msg::NewNeighbour(fdb_message(index, mac, vtep)),
            mode: Mode::Replace,
            command: format!("bridge fdb replace {mac} dev {vx} dst {vtep} self permanent"),
        });
        out.push(Change {
            message: Msg::NewNeighbour(neigh_message(index, ip, Some(mac))),
            mode: Mode::Replace,
            command: format!("ip neigh replace {ip} lladdr {mac} dev {vx} nud permanent"),
        });
        return out;
    }
    if !vtep.is_unspecified() {
        out.push(Change {
            message: Msg::DelNeighbour(fdb_message(index, mac, vtep)),
            mode: Mode::Change,
            command: format!("bridge fdb del {mac} dev {vx} dst {vtep} self"),
        });
    }
    if !ip.is_unspecified() {
        out.push(Change {
            message: Msg::DelNeighbour(neigh_message(index, ip, None)),
            mode: Mode::Change,
            command: format!("ip neigh del {ip} dev {vx}"),
        });
    }
    out
}

/// How many changes go out on the socket before their acknowledgements are collected:
/// large enough that a batch costs a handful of round trips, small enough that the
/// acknowledgements fit the socket's receive buffer.
const BATCH: usize = 256;

impl KernelVxlan {
    /// Opens a netlink socket in the calling thread's namespace (the node's).
    pub fn connect(local_vtep: Ipv4Addr) -> Result<KernelVxlan> {
        Ok(KernelVxlan { local_vtep, nl: Netlink::connect()? })
    }

    async fn link(&self, name: &str) -> Result<Option<Link>> {
        let found = self.nl.get(link_get(name), &format!("ip link show dev {name}")).await?;
        Ok(found.and_then(|m| match m {
            Msg::NewLink(link) => Some(Link::parse(&link)),
            _ => None,
        }))
    }

    async fn links(nl: &Netlink) -> Result<Vec<Link>> {
        let all = nl.dump(Msg::GetLink(LinkMessage::default()), "ip link show").await?;
        Ok(all
            .iter()
            .filter_map(|m| match m {
                Msg::NewLink(link) => Some(Link::parse(link)),
                _ => None,
            })
            .collect())
    }

    async fn addresses(nl: &Netlink) -> Result<HashMap<u32, Vec<(Ipv4Addr, u8)>>> {
        let mut request = AddressMessage::default();
        request.header.family = AddressFamily::Inet;
        Ok(ipv4_by_link(nl.dump(Msg::GetAddress(request), "ip -4 addr show").await?))
    }

    async fn change(&self, message: Msg, mode: Mode, command: String) -> Result<()> {
        self.nl.apply(Change { message, mode, command }).await
    }

    async fn delete_link(nl: &Netlink, link: &Link) -> Result<()> {
        let message = Msg::DelLink(LinkUnspec::new_with_index(link.index).build());
        let result = nl
            .apply(Change { message, mode: Mode::Change, command: format!("ip link del {}", link.name) })
            .await;
        match result {
            Err(e) if is_absent(&e) => Ok(()),
            other => other,
        }
    }

    /// Creates or repairs the bridge and VXLAN device of a network: names, VNI, local
    /// address, port, MTU, MAC, master, address and state. Idempotent; a VXLAN device
    /// with the wrong VNI or local address is re-created (those cannot be changed).
    pub async fn ensure_network(&self, spec: &OverlaySpec) -> Result<()> {
        let (br, vx) = (bridge_name(spec.vni), vxlan_name(spec.vni));
        let (mtu, mac) = (spec.mtu, spec.node_mac);
        let bridge = match self.link(&br).await? {
            Some(bridge) => bridge,
            None => {
                let message = LinkBridge::new(&br).mtu(mtu).address(mac.0.to_vec()).build();
                let command = format!("ip link add {br} address {mac} mtu {mtu} type bridge");
                self.change(Msg::NewLink(message), Mode::Create, command).await?;
                self.link(&br).await?.ok_or_else(|| Error::Netlink {
                    command: format!("ip link show dev {br}"),
                    message: "the bridge vanished right after it was created".into(),
                })?
            }
        };
        if bridge.mtu != mtu || bridge.mac != Some(mac) {
            let message = LinkUnspec::new_with_index(bridge.index).mtu(mtu).address(mac.0.to_vec()).build();
            self.change(
                Msg::SetLink(message),
                Mode::Change,
                format!("ip link set {br} address {mac} mtu {mtu}"),
            )
            .await?;
        }
        let existing = self.link(&vx).await?;
        if let Some(link) = existing.as_ref().filter(|l| !l.vxlan_matches(spec.vni, self.local_vtep)) {
            Self::delete_link(&self.nl, link).await?;
        }
        if existing.filter(|l| l.vxlan_matches(spec.vni, self.local_vtep)).is_none() {
            let message = LinkVxlan::new(&vx, spec.vni)
                .local(self.local_vtep)
                .port(VXLAN_PORT)
                .learning(false)
                .proxy(true)
                .mtu(mtu)
                .build();
            let command = format!(
                "ip link add {vx} mtu {mtu} type vxlan id {} local {} dstport {VXLAN_PORT} nolearning proxy",
                spec.vni, self.local_vtep
            );
            self.change(Msg::NewLink(message), Mode::Create, command).await?;
        }
        let vx_link = self.link(&vx).await?.ok_or_else(|| Error::Netlink {
            command: format!("ip link show dev {vx}"),
            message: "the VXLAN device vanished right after it was created".into(),
        })?;
        if vx_link.mtu != mtu || vx_link.master != Some(bridge.index) || !vx_link.up {
            let message =
                LinkUnspec::new_with_index(vx_link.index).mtu(mtu).controller(bridge.index).up().build();
            self.change(
                Msg::SetLink(message),
                Mode::Change,
                format!("ip link set {vx} mtu {mtu} master {br} up"),
            )
            .await?;
        }
        let addresses = Self::addresses(&self.nl).await?;
        let on_bridge = addresses.get(&bridge.index).cloned().unwrap_or_default();
        for &(ip, len) in on_bridge.iter().filter(|&&a| a != (spec.node_ip, spec.prefix_len)) {
            let message = Msg::DelAddress(address_message(bridge.index, ip, len));
            self.change(message, Mode::Change, format!("ip addr del {ip}/{len} dev {br}")).await?;
        }
        if !on_bridge.contains(&(spec.node_ip, spec.prefix_len)) {
            let (ip, len) = (spec.node_ip, spec.prefix_len);
            let message = Msg::NewAddress(address_message(bridge.index, ip, len));
            self.change(message, Mode::Replace, format!("ip addr replace {ip}/{len} dev {br}")).await?;
        }
        if !bridge.up {
            let message = LinkUnspec::new_with_index(bridge.index).up().build();
            self.change(Msg::SetLink(message), Mode::Change, format!("ip link set {br} up")).await?;
        }
        Ok(())
    }

    /// Removes a network's bridge and VXLAN device (their entries go with them).
    pub async fn remove_network(&self, vni: u32) -> Result<()> {
        for name in [vxlan_name(vni), bridge_name(vni)] {
            if let Some(link) = self.link(&name).await? {
                Self::delete_link(&self.nl, &link).await?;
            }
        }
        Ok(())
    }

    /// Keeps traffic from `from` (one overlay network's subnet) out of `to` (another's),
    /// even where the node forwards packets between its bridges: a policy-routing rule
    /// answers such packets with ICMP "prohibited". Idempotent.
    pub async fn isolate(&self, from: Ipv4Net, to: Ipv4Net) -> Result<()> {
        let result = self
            .change(Msg::NewRule(rule_message(from, to)), Mode::Create, rule_command("add", from, to))
            .await;
        match result {
            Err(Error::Netlink { message, .. }) if message.contains("File exists") => Ok(()),
            other => other,
        }
    }

    /// Removes an isolation rule (only meshd's: the protocol number must match).
    pub async fn unisolate(&self, from: Ipv4Net, to: Ipv4Net) -> Result<()> {
        let result = self
            .change(Msg::DelRule(rule_message(from, to)), Mode::Change, rule_command("del", from, to))
            .await;
        match result {
            Err(e) if is_absent(&e) => Ok(()),
            other => other,
        }
    }

    /// Programs the FDB and neighbour entries that reach a remote endpoint.
    pub async fn add_peer(&self, peer: &PeerSpec) -> Result<()> {
        self.add_peers(std::slice::from_ref(peer)).await.pop().unwrap_or(Ok(()))
    }

    /// Removes a remote endpoint's entries.
    pub async fn remove_peer(&self, peer: &PeerSpec) -> Result<()> {
        self.remove_peers(std::slice::from_ref(peer)).await.pop().unwrap_or(Ok(()))
    }

    /// Programs many remote endpoints at once, pipelined on one socket. One result per
    /// peer, in order.
    pub async fn add_peers(&self, peers: &[PeerSpec]) -> Vec<Result<()>> {
        self.peer_batch(peers, true).await
    }

    /// Removes many remote endpoints' entries at once. Entries (or a device) already gone
    /// count as removed. One result per peer, in order.
    pub async fn remove_peers(&self, peers: &[PeerSpec]) -> Vec<Result<()>> {
        self.peer_batch(peers, false).await
    }

    async fn peer_batch(&self, peers: &[PeerSpec], add: bool) -> Vec<Result<()>> {
        let mut devices: BTreeMap<u32, Result<Option<u32>>> = BTreeMap::new();
        for vni in peers.iter().map(|p| p.vni).collect::<BTreeSet<_>>() {
            let index = self.link(&vxlan_name(vni)).await.map(|l| l.map(|l| l.index));
            devices.insert(vni, index);
        }
        let mut results: Vec<Result<()>> = Vec::with_capacity(peers.len());
        for chunk in peers.chunks(BATCH) {
            // Which changes belong to which peer of this chunk.
            let mut changes = Vec::new();
            let mut owners = Vec::new();
            let mut chunk_results: Vec<Result<()>> = Vec::with_capacity(chunk.len());
            for (i, peer) in chunk.iter().enumerate() {
                let vx = vxlan_name(peer.vni);
                chunk_results.push(Ok(()));
                match &devices[&peer.vni] {
                    Ok(Some(index)) => {
                        for change in peer_changes(*index, &vx, peer, add) {
                            changes.push(change);
                            owners.push(i);
                        }
                    }
                    Ok(None) if !add => {}
                    Ok(None) => {
                        chunk_results[i] = Err(Error::Netlink {
                            command: format!(
                                "bridge fdb replace {} dev {vx} dst {} self permanent",
                                peer.mac, peer.vtep
                            ),
                            message: format!("device {vx} does not exist (its overlay is not set up yet)"),
                        })
                    }
                    Err(e) => {
                        chunk_results[i] = Err(Error::Netlink {
                            command: format!("ip link show dev {vx}"),
                            message: e.to_string(),
                        })
                    }
                }
            }
            for (owner, result) in owners.into_iter().zip(self.nl.apply_all(changes).await) {
                // The first failure of a peer's changes is its result.
                if let Err(e) = result {
                    if (add || !is_absent(&e)) && chunk_results[owner].is_ok() {
                        chunk_results[owner] = Err(e);
                    }
                }
            }
            results.extend(chunk_results);
        }
        results
    }

    /// Creates a task's interface inside its namespace and plugs it into the bridge, or
    /// repairs one that differs from `task` (eth0 gone, address, MAC, MTU or route
    /// changed, host side detached): a changed link is removed and created anew. On
    /// failure nothing is left behind.
    pub async fn attach_task(&self, task: &TaskLink) -> Result<()> {
        let netns = File::open(&task.netns).map_err(|_| Error::NoNetns { path: task.netns.clone() })?;
        if let Some(host) = self.link(&task.host_if).await? {
            let bridges = self.bridge_vnis().await?;
            if self.observe_task(&host, &bridges).await == *task {
                return Ok(());
            }
            Self::delete_link(&self.nl, &host).await?;
        }
        let result = self.try_attach_task(task, &netns).await;
        if result.is_err() {
            let _ = self.detach_task(&task.host_if).await;
        }
        result
    }

    async fn bridge_vnis(&self) -> Result<HashMap<u32, u32>> {
        Ok(Self::links(&self.nl)
            .await?
            .into_iter()
            .filter(|l| l.kind == Some(InfoKind::Bridge))
            .filter_map(|l| Some((l.index, l.name.strip_prefix("mbr")?.parse().ok()?)))
            .collect())
    }

    async fn try_attach_task(&self, task: &TaskLink, netns: &File) -> Result<()> {
        let (host_if, mtu, mac) = (&task.host_if, task.mtu, task.mac);
        let path = task.netns.display();
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(TASK_IF)
            .address(mac.0.to_vec())
            .mtu(mtu)
            .setns_by_fd(netns.as_raw_fd())
            .build();
        let veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(host_if.clone())
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        let command = format!("ip link add {host_if} mtu {mtu} type veth peer name {TASK_IF} address {mac} mtu {mtu} netns {path}");
        self.change(Msg::NewLink(veth), Mode::Create, command).await?;
        let host = self.link(host_if).await?.ok_or_else(|| Error::Netlink {
            command: format!("ip link show dev {host_if}"),
            message: "the veth vanished right after it was created".into(),
        })?;
        let br = bridge_name(task.vni);
        let bridge = self.link(&br).await?.ok_or_else(|| Error::Netlink {
            command: format!("ip link set {host_if} master {br}"),
            message: format!("bridge {br} does not exist (the network's overlay is not set up yet)"),
        })?;
        let alias = format!("{TASK_ALIAS_PREFIX}{path}");
        let message = LinkUnspec::new_with_index(host.index).alias(alias.clone()).build();
        self.change(Msg::SetLink(message), Mode::Change, format!("ip link set {host_if} alias {alias}"))
            .await?;

        let inside = Netlink::connect_in(&task.netns)?;
        let in_ns = |c: &str| format!("nsenter --net={path} -- {c}");
        let eth0 = inside
            .get(link_get(TASK_IF), &in_ns("ip link show eth0"))
            .await?
            .and_then(|m| match m {
                Msg::NewLink(l) => Some(Link::parse(&l)),
                _ => None,
            })
            .ok_or_else(|| Error::Netlink {
                command: in_ns("ip link show eth0"),
                message: "eth0 is missing right after it was created".into(),
            })?;
        let lo = inside.get(link_get("lo"), &in_ns("ip link show lo")).await?.and_then(|m| match m {
            Msg::NewLink(l) => Some(l.header.index),
            _ => None,
        });
        let (ip, len, gw) = (task.ip, task.prefix_len, task.gateway);
        let mut changes = vec![
            Change {
                message: Msg::NewAddress(address_message(eth0.index, ip, len)),
                mode: Mode::Replace,
                command: in_ns(&format!("ip addr replace {ip}/{len} dev eth0")),
            },
            Change {
                message: Msg::SetLink(LinkUnspec::new_with_index(eth0.index).up().build()),
                mode: Mode::Change,
                command: in_ns("ip link set eth0 up"),
            },
        ];
        if let Some(lo) = lo {
            changes.push(Change {
                message: Msg::SetLink(LinkUnspec::new_with_index(lo).up().build()),
                mode: Mode::Change,
                command: in_ns("ip link set lo up"),
            });
        }
        for result in inside.apply_all(changes).await {
            result?;
        }
        inside
            .apply(Change {
                message: Msg::NewRoute(default_route(eth0.index, gw)),
                mode: Mode::Replace,
                command: in_ns(&format!("ip route replace default via {gw} dev eth0")),
            })
            .await?;
        let message = LinkUnspec::new_with_index(host.index).controller(bridge.index).up().build();
        self.change(Msg::SetLink(message), Mode::Change, format!("ip link set {host_if} master {br} up"))
            .await
    }

    /// Removes a task's interface (its peer inside the namespace goes with it).
    pub async fn detach_task(&self, host_if: &str) -> Result<()> {
        match self.link(host_if).await? {
            Some(link) => Self::delete_link(&self.nl, &link).await,
            None => Ok(()),
        }
    }

    /// Reads back every object meshd owns on this node.
    pub async fn observe(&self) -> Result<Observed> {
        let links = Self::links(&self.nl).await?;
        let addresses = Self::addresses(&self.nl).await?;
        let by_name: HashMap<&str, &Link> = links.iter().map(|l| (l.name.as_str(), l)).collect();
        let mut out = Observed::default();

        // Overlays: a bridge mbr<VNI> and/or a VXLAN device mvx<VNI>.
        let mut vxlans: HashMap<u32, u32> = HashMap::new(); // ifindex -> vni
        let bridges: HashMap<u32, u32> = links
            .iter()
            .filter(|l| l.kind == Some(InfoKind::Bridge))
            .filter_map(|l| Some((l.index, l.name.strip_prefix("mbr")?.parse().ok()?)))
            .collect();
        for link in &links {
            let vni = match (&link.kind, link.name.strip_prefix("mvx"), link.name.strip_prefix("mbr")) {
                (Some(InfoKind::Vxlan), Some(vni), _) | (Some(InfoKind::Bridge), _, Some(vni)) => {
                    match vni.parse::<u32>() {
                        Ok(vni) => vni,
                        Err(_) => continue,
                    }
                }
                _ => continue,
            };
            if link.kind == Some(InfoKind::Vxlan) {
                vxlans.insert(link.index, vni);
            }
            if out.overlays.contains_key(&vni) {
                continue;
            }
            let bridge = by_name.get(bridge_name(vni).as_str()).filter(|b| b.kind == Some(InfoKind::Bridge));
            let vx = by_name.get(vxlan_name(vni).as_str()).filter(|v| v.kind == Some(InfoKind::Vxlan));
            let addrs = bridge.and_then(|b| addresses.get(&b.index)).cloned().unwrap_or_default();
            let (node_ip, prefix_len) = addrs.first().copied().unwrap_or((Ipv4Addr::UNSPECIFIED, 0));
            let whole = match (bridge, vx) {
                (Some(b), Some(v)) => {
                    b.up && v.up
                        && v.master == Some(b.index)
                        && v.mtu == b.mtu
                        && v.vxlan_matches(vni, self.local_vtep)
                        && addrs.len() == 1
                }
                _ => false,
            };
            out.overlays.insert(
                vni,
                OverlaySpec {
                    vni,
                    node_ip,
                    prefix_len,
                    node_mac: bridge.and_then(|b| b.mac).unwrap_or(MacAddr([0; 6])),
                    mtu: if whole { bridge.map_or(0, |b| b.mtu) } else { 0 },
                },
            );
        }

        // Peers: permanent FDB entries and neighbours on meshd's VXLAN devices.
        if !vxlans.is_empty() {
            let mut fdb_request = NeighbourMessage::default();
            fdb_request.header.family = AddressFamily::Bridge;
            let mut neigh_request = NeighbourMessage::default();
            neigh_request.header.family = AddressFamily::Inet;
            let fdb = self.nl.dump(Msg::GetNeighbour(fdb_request), "bridge fdb show").await?;
            let neigh = self.nl.dump(Msg::GetNeighbour(neigh_request), "ip neigh show").await?;
            let mut remotes: BTreeMap<(u32, MacAddr), Ipv4Addr> = BTreeMap::new();
            for m in &fdb {
                let Msg::NewNeighbour(n) = m else { continue };
                let Some(&vni) = vxlans.get(&n.header.ifindex) else { continue };
                if !permanent(n.header.state) || !n.header.flags.contains(NeighbourFlags::Own) {
                    continue;
                }
                if let (Some(mac), Some(vtep)) = (neigh_mac(n), neigh_ip(n)) {
                    remotes.insert((vni, mac), vtep);
                }
            }
            let mut used = BTreeSet::new();
            for m in &neigh {
                let Msg::NewNeighbour(n) = m else { continue };
                let Some(&vni) = vxlans.get(&n.header.ifindex) else { continue };
                if !permanent(n.header.state) {
                    continue;
                }
                let (Some(ip), Some(mac)) = (neigh_ip(n), neigh_mac(n)) else { continue };
                let vtep = remotes.get(&(vni, mac)).copied().unwrap_or(Ipv4Addr::UNSPECIFIED);
                used.insert((vni, mac));
                out.peers.insert(PeerSpec { vni, ip, mac, vtep });
            }
            for ((vni, mac), vtep) in remotes.into_iter().filter(|(k, _)| !used.contains(k)) {
                out.peers.insert(PeerSpec { vni, ip: Ipv4Addr::UNSPECIFIED, mac, vtep });
            }
        }

        // Task links: veths named mv*, with their namespace side.
        for link in links.iter().filter(|l| l.kind == Some(InfoKind::Veth) && is_task_if(&l.name)) {
            out.tasks.insert(link.name.clone(), self.observe_task(link, &bridges).await);
        }

        // Isolation rules: priority 1000, meshd's protocol, prohibit.
        let mut request = RuleMessage::default();
        request.header.family = AddressFamily::Inet;
        for m in self.nl.dump(Msg::GetRule(request), "ip rule show").await? {
            let Msg::NewRule(rule) = m else { continue };
            if rule.header.action != RuleAction::Prohibit {
                continue;
            }
            let mut ours = (false, false);
            let (mut src, mut dst) = (Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED);
            for attr in &rule.attributes {
                match attr {
                    RuleAttribute::Priority(p) => ours.0 = *p == ISOLATION_PRIORITY,
                    RuleAttribute::Protocol(p) => ours.1 = u8::from(*p) == MESHD_PROTOCOL,
                    RuleAttribute::Source(IpAddr::V4(ip)) => src = *ip,
                    RuleAttribute::Destination(IpAddr::V4(ip)) => dst = *ip,
                    _ => {}
                }
            }
            if ours != (true, true) {
                continue;
            }
            if let (Ok(from), Ok(to)) =
                (Ipv4Net::new(src, rule.header.src_len), Ipv4Net::new(dst, rule.header.dst_len))
            {
                out.isolation.insert((from, to));
            }
        }
        Ok(out)
    }

    /// A task link as the kernel holds it: host side from `host`, namespace side read
    /// inside the namespace named by the host veth's alias. Fields that cannot be read
    /// (namespace gone, eth0 missing, no address or route) are zero.
    async fn observe_task(&self, host: &Link, bridges: &HashMap<u32, u32>) -> TaskLink {
        let netns = host.alias.as_deref().and_then(|a| a.strip_prefix(TASK_ALIAS_PREFIX)).unwrap_or("");
        let mut task = TaskLink {
            vni: if host.up { host.master.and_then(|m| bridges.get(&m).copied()).unwrap_or(0) } else { 0 },
            netns: PathBuf::from(netns),
            host_if: host.name.clone(),
            ip: Ipv4Addr::UNSPECIFIED,
            prefix_len: 0,
            mac: MacAddr([0; 6]),
            gateway: Ipv4Addr::UNSPECIFIED,
            mtu: 0,
        };
        if netns.is_empty() {
            return task;
        }
        let Ok(inside) = Netlink::connect_in(Path::new(netns)) else { return task };
        let Ok(Some(Msg::NewLink(eth0))) = inside.get(link_get(TASK_IF), "ip link show eth0").await else {
            return task;
        };
        let eth0 = Link::parse(&eth0);
        if !eth0.up || eth0.mtu != host.mtu {
            return task;
        }
        task.mtu = eth0.mtu;
        task.mac = eth0.mac.unwrap_or(MacAddr([0; 6]));
        if let Ok(addresses) = Self::addresses(&inside).await {
            if let Some(&(ip, len)) = addresses.get(&eth0.index).and_then(|a| a.first()) {
                (task.ip, task.prefix_len) = (ip, len);
            }
        }
        let mut request = RouteMessage::default();
        request.header.address_family = AddressFamily::Inet;
        if let Ok(routes) = inside.dump(Msg::GetRoute(request), "ip route show").await {
            task.gateway = routes
                .iter()
                .filter_map(|m| match m {
                    Msg::NewRoute(r)
                        if r.header.destination_prefix_length == 0
                            && r.header.table == RouteHeader::RT_TABLE_MAIN =>
                    {
                        Some(r)
                    }
                    _ => None,
                })
                .filter(|r| r.attributes.contains(&RouteAttribute::Oif(eth0.index)))
                .find_map(|r| {
                    r.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Gateway(RouteAddress::Inet(gw)) => Some(*gw),
                        _ => None,
                    })
                })
                .unwrap_or(Ipv4Addr::UNSPECIFIED);
        }
        task
    }

    /// Removes everything meshd owns on this node: task links, overlays (their FDB and
    /// neighbour entries go with the devices) and isolation rules. Returns how many
    /// objects it removed.
    pub async fn remove_all(&self) -> Result<usize> {
        let seen = self.observe().await?;
        let mut removed = 0;
        for host_if in seen.tasks.keys() {
            self.detach_task(host_if).await?;
            removed += 1;
        }
        for vni in seen.overlays.keys() {
            self.remove_network(*vni).await?;
            removed += 1;
        }
        for (from, to) in &seen.isolation {
            self.unisolate(*from, *to).await?;
            removed += 1;
        }
        Ok(removed)
    }

    /// The MTU of the interface that holds `addr`, the node's underlay address.
    pub async fn underlay_mtu(&self, addr: Ipv4Addr) -> Result<u32> {
        let addresses = Self::addresses(&self.nl).await?;
        let index = addresses
            .iter()
            .find(|(_, ips)| ips.iter().any(|(ip, _)| *ip == addr))
            .map(|(index, _)| *index)
            .ok_or_else(|| Error::Netlink {
                command: format!("ip -o addr show to {addr}"),
                message: format!("no interface has {addr}; pass this node's own address as --advertise-addr"),
            })?;
        let links = Self::links(&self.nl).await?;
        Ok(links.iter().find(|l| l.index == index).map_or(1500, |l| l.mtu))
    }
}

fn default_route(oif: u32, gateway: Ipv4Addr) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = AddressFamily::Inet;
    route.header.table = RouteHeader::RT_TABLE_MAIN;
    route.header.protocol = RouteProtocol::Boot;
    route.header.scope = RouteScope::Universe;
    route.header.kind = RouteType::Unicast;
    route.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
    route.attributes.push(RouteAttribute::Oif(oif));
    route
}

/// Whether an entry is permanent: iproute2 writes FDB entries as NOARP|PERMANENT, which
/// the parser reports as a raw state, so the PERMANENT bit is what counts.
fn permanent(state: NeighbourState) -> bool {
    const NUD_PERMANENT: u16 = 0x80;
    u16::from(state) & NUD_PERMANENT != 0
}

fn neigh_mac(n: &NeighbourMessage) -> Option<MacAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(bytes) => {
            <[u8; 6]>::try_from(bytes.as_slice()).ok().map(MacAddr)
        }
        _ => None,
    })
}

fn neigh_ip(n: &NeighbourMessage) -> Option<Ipv4Addr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        // FDB entries (family AF_BRIDGE) carry the remote VTEP as raw bytes.
        NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => {
            <[u8; 4]>::try_from(bytes.as_slice()).ok().map(Ipv4Addr::from)
        }
        _ => None,
    })
}

/// Whether `name` is a task veth as meshd names them (`mv` and 8 hex digits, see the
/// control crate's `task_host_if`): an operator's `mvlan0` is not meshd's, and must
/// never be adopted and then deleted.
pub fn is_task_if(name: &str) -> bool {
    name.strip_prefix("mv").is_some_and(|h| h.len() == 8 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_through_text() {
        let mac = MacAddr([0x02, 0x42, 0x0a, 0, 0, 5]);
        assert_eq!(mac.to_string().parse::<MacAddr>(), Ok(mac));
        assert!("02:42:0a".parse::<MacAddr>().is_err());
        assert!("02:42:0a:00:00:05:07".parse::<MacAddr>().is_err());
        assert!("zz:42:0a:00:00:05".parse::<MacAddr>().is_err());
    }

    #[test]
    fn link_names_fit_the_kernel_limit() {
        assert!(bridge_name(16_777_215).len() <= 15);
        assert!(vxlan_name(16_777_215).len() <= 15);
    }
}
