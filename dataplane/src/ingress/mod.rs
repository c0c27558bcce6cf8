//! The kernel routing mesh for published ports (#6), user side: loads the object's
//! `ingress_xdp` (XDP, on the underlay interface) and `ingress_reply` (tc ingress, on
//! every local task's host veth), pins maps and links under `<pin_dir>` (normally
//! `/sys/fs/bpf/meshd/<node>/ingress/`), and writes frontends, backends and Maglev
//! tables from control's [`IngressSpec`]. The map contract is
//! `meshd_common::ingress`; the write order is [`plan`].
//!
//! It owns only what sits in its pin directory: it never detaches a program it did
//! not attach, and never touches another XDP or tc program. Beside the pins it sets one
//! thing: IPv4 forwarding on the loopback (`net.ipv4.conf.lo.forwarding`). The
//! programs look next hops up as the node's own output lookups through `lo`, and
//! `bpf_fib_lookup` refuses every next hop unless the interface it is given forwards.
//! Only `lo`: forwarding on the underlay would let hosts on its segment route through
//! the node into the overlay bridges, and nothing arrives on `lo` from outside. It is
//! kept on (read back each pass) and left on at exit.
//!
//! ## Lifetime
//! - Pinned links outlive the process: a `kill -9` or a SIGTERM of meshd leaves the
//!   programs serving with the maps as they were. The next [`Ingress::open`] adopts a
//!   pinned link running the same program on the same maps and interface; a link
//!   running another program is switched to the new one in place (`BPF_LINK_UPDATE`,
//!   no moment without a program). [`cleanup_pins`] (`meshd --cleanup`, or a start
//!   with `--xdp off`) detaches and removes everything.
//! - tc uses TCX links (Linux 6.6+), pinned as `tc_<host_if>`; they survive a restart
//!   like the XDP link, and the kernel drops them with their veth (the pin is then
//!   removed at the next apply).
//!
//! ## For control
//! - At start: [`Ingress::open`] with the `--xdp` setting (`auto` tries native, then
//!   generic; the outcome and why each mode failed are in [`Ingress::status`]).
//! - Each reconcile: [`Ingress::observe`] (frontends and backends read back, tables
//!   spot-checked), then [`Ingress::apply`] when it differs from the desired spec.
//!   [`Ingress::kernel_path`] says which path serves each published port: XDP only
//!   once the frontend and its whole table were written and read back.
//! - Maglev tables are large (65,521 slots): a changed table is read back in full
//!   once after writing; afterwards each observe re-reads a window of
//!   [`VERIFY_WINDOW`] slots of each table, so a hand-edited slot is found and
//!   repaired within `65521 / VERIFY_WINDOW` passes without re-reading every table
//!   every second.

pub mod plan;
mod sys;

use std::{
    collections::BTreeMap,
    ffi::CString,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapInfo, MapType, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs,
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use meshd_common::{
    ingress::{
        maglev_index, FlowKey, IngressBackend, IngressConfig as KernelConfig, IngressFrontend, Nat,
        BACKEND_DRAINING, BACKEND_LIVE, BACKEND_LOCAL, DEFAULT_INGRESS_TABLES, INGRESS_BACKENDS_MAP,
        INGRESS_CONFIG_MAP, INGRESS_FLOWS_MAP, INGRESS_FRONTENDS_MAP, INGRESS_MAGLEV_MAP, INGRESS_NAT_MAP,
        INGRESS_STATS_MAP, INGRESS_TC_PROGRAM, INGRESS_UNDERLAY_TC_PROGRAM, INGRESS_XDP_PROGRAM,
        IN_STAT_ENTRIES, MAX_INGRESS_BACKENDS, MAX_INGRESS_FLOWS, MAX_INGRESS_FRONTENDS, MAX_INGRESS_NAT,
        MODE_DSR, MODE_SNAT, NAT_PORT_MAX, NAT_PORT_MIN,
    },
    ip4_octets, ip4_raw,
    maglev::MAGLEV_TABLE_SIZE,
    port_host, port_raw, FrontendKey, BACKENDS_MAP, LOCAL_ADDRS_MAP, PROTO_TCP, PROTO_UDP, REVERSE_MAP,
    SERVICES_MAP,
};
pub use plan::{IngressMaps, Plan, WantedFrontend, Write};

use crate::{
    overlay::MacAddr,
    socklb::{chain, drop_incompatible_map, sys as bpf_sys, MapSpec, Proto},
    Error, Result,
};

/// Slots of each Maglev table re-read per [`Ingress::observe`].
pub const VERIFY_WINDOW: u32 = 4096;

/// The pin directory of the ingress path inside a node's pin directory.
pub fn pin_dir_in(node_pin_dir: &Path) -> PathBuf {
    node_pin_dir.join("ingress")
}

/// `--xdp`: which hook the underlay program attaches to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpSetting {
    /// Native XDP, falling back to the tc twin ([`auto_hooks`]), falling back to the
    /// others, else none (the proxy serves).
    #[default]
    Auto,
    /// Native XDP only.
    Native,
    /// Generic XDP (in the stack, any driver) only.
    Generic,
    /// The tc twin (`ingress_tc` at TCX ingress) only.
    Tc,
    /// No kernel ingress path: the proxy serves published ports.
    Off,
}

impl std::str::FromStr for XdpSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "native" => Ok(Self::Native),
            "generic" => Ok(Self::Generic),
            "tc" => Ok(Self::Tc),
            "off" => Ok(Self::Off),
            other => Err(format!("unknown ingress hook {other:?}: use auto, native, generic, tc or off")),
        }
    }
}

/// Where the underlay program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// `ingress_xdp` in the driver (`XDP_FLAGS_DRV_MODE`).
    Native,
    /// `ingress_xdp` in the stack (`XDP_FLAGS_SKB_MODE`).
    Generic,
    /// `ingress_tc` at tc ingress (a TCX link).
    Tc,
}

impl Hook {
    const ALL: [Hook; 3] = [Hook::Native, Hook::Generic, Hook::Tc];

    fn pin_name(self) -> &'static str {
        match self {
            Self::Native => "xdp_native",
            Self::Generic => "xdp_generic",
            Self::Tc => "underlay_tc",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Self::Native | Self::Generic => INGRESS_XDP_PROGRAM,
            Self::Tc => INGRESS_UNDERLAY_TC_PROGRAM,
        }
    }

    /// `xdp-native`, `xdp-generic` or `tc`: what `meshctl status` shows as the
    /// ingress hook and as each kernel-served port's `kernel_path`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Native => "xdp-native",
            Self::Generic => "xdp-generic",
            Self::Tc => "tc",
        }
    }
}

/// The hooks `--xdp auto` tries on `interface`, best first: native XDP, then the tc
/// twin (generic XDP runs where tc does with less to work with: only by `--xdp
/// generic`).
///
/// Measured on veth underlays (`make bench ONLY=ingress`, both hooks in one run,
/// 2026-11-22 19:15 UTC): tc passes non-matching traffic at 0.94× (XDP 0.80×),
/// forwards small packets at 1.04× a bare veth's receive rate (XDP 0.76×), bulk
/// through the overlay at 0.58× of direct (XDP 0.52×), new connections at 0.71–0.83×
/// (XDP 0.69–0.78×); it loses on bulk to a local task (0.68× vs 0.75×: XDP's redirect
/// feeds the task's GRO). But with the previous build (which pulled 104 header bytes
/// into every skb's linear part) one request in ~45,000 through a tc node was reset
/// under `meshctl detach` churn with three loaded nodes (`tests/tests/churn.rs`, in
/// two of two full runs; XDP: none) — plausibly a failed pull passing a mid-flow
/// packet to the stack, where the proxy's listener resets it. Until that churn test
/// runs clean on tc, XDP stays first.
pub fn auto_hooks() -> Vec<Hook> {
    vec![Hook::Native, Hook::Tc]
}

/// The ingress path's settings (`meshd --xdp ... --underlay-if ... --xdp-max-ports ...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressConfig {
    /// How to attach the XDP program; [`XdpSetting::Off`] is refused by `open`.
    pub xdp: XdpSetting,
    /// The underlay interface (the one holding `node_addr`).
    pub interface: String,
    /// This node's underlay address: published ports answer on it.
    pub node_addr: Ipv4Addr,
    /// Published ports the kernel path can serve at once, one Maglev table each
    /// (65,521 slots: 512 KiB of kernel memory, as a BPF array stores each `u32` in
    /// 8 bytes); further ones are left to the proxy.
    pub max_ports: u32,
    /// bpffs directory for maps and links ([`pin_dir_in`]).
    pub pin_dir: PathBuf,
}

impl IngressConfig {
    /// Checks the settings before anything is loaded.
    pub fn validate(&self) -> Result<()> {
        if self.max_ports == 0 || self.max_ports > MAX_INGRESS_FRONTENDS {
            return Err(Error::Config {
                setting: "--xdp-max-ports",
                message: format!("{} is out of range; use 1 to {MAX_INGRESS_FRONTENDS}", self.max_ports),
            });
        }
        if self.interface.is_empty() {
            return Err(Error::Config {
                setting: "--underlay-if",
                message: "empty interface name; give the interface holding the advertise address".into(),
            });
        }
        Ok(())
    }
}

/// Default of [`IngressConfig::max_ports`].
pub const DEFAULT_MAX_PORTS: u32 = DEFAULT_INGRESS_TABLES;

/// Largest [`IngressConfig::max_ports`]: one table per frontend the map can hold.
pub const MAX_PORTS: u32 = MAX_INGRESS_FRONTENDS;

/// A published port's mode on the kernel path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IngressMode {
    /// Replies return through the ingress node.
    #[default]
    Snat,
    /// The backend's node replies straight to the client.
    Dsr,
}

impl IngressMode {
    fn raw(self) -> u8 {
        match self {
            Self::Snat => MODE_SNAT,
            Self::Dsr => MODE_DSR,
        }
    }
}

/// One task behind a published port, as control computes it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IngressBackendSpec {
    /// The task's overlay address.
    pub addr: Ipv4Addr,
    /// The task's port (the published port's target).
    pub port: u16,
    /// The task's MAC.
    pub mac: MacAddr,
    /// Underlay address of the task's node (this node's for a local task).
    pub vtep: Ipv4Addr,
    /// This node's address on the task's network.
    pub gw: Ipv4Addr,
    /// This node's MAC on the task's network.
    pub gw_mac: MacAddr,
    /// The network's VNI.
    pub vni: u32,
    /// The task's host-side veth, if the task runs on this node.
    pub host_if: Option<String>,
    /// Draining (`meshctl detach`, `meshctl node drain`): its established flows keep
    /// reaching it, but it takes no new flow (no Maglev slot).
    pub draining: bool,
}

/// One published port on the kernel path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngressService {
    /// snat or dsr.
    pub mode: IngressMode,
    /// Its backends, sorted (the Maglev table depends on the order).
    pub backends: Vec<IngressBackendSpec>,
}

/// Everything the ingress path should hold on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngressSpec {
    /// Published ports, by protocol and port.
    pub services: BTreeMap<(Proto, u16), IngressService>,
    /// Local tasks' host veths (which get the tc program), with their namespace
    /// (whose `eth0` gets GRO, so a native-XDP redirect into the veth is delivered).
    pub tasks: BTreeMap<String, PathBuf>,
}

/// Which path serves a published port's external clients on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// The underlay program, on this hook.
    Kernel(Hook),
    /// The userspace proxy, and why.
    Proxy(String),
}

/// The kernel programs' counters, summed over CPUs (`IN_STAT_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IngressCounters {
    /// Packets passed untouched.
    pub pass: u64,
    /// Packets redirected to a local task.
    pub local: u64,
    /// Packets encapsulated to a remote backend.
    pub encap: u64,
    /// snat replies decapsulated and sent to the client by the underlay program
    /// (XDP or its tc twin).
    pub reply_xdp: u64,
    /// Replies sent to the client by the tc program on a task veth.
    pub reply_tc: u64,
    /// DSR packets recorded on the backend's node.
    pub dsr_recorded: u64,
    /// New flows to a frontend without live backends.
    pub no_backend: u64,
    /// Packets that could not be forwarded (passed to the stack).
    pub unrouted: u64,
    /// Malformed packets dropped.
    pub drop_malformed: u64,
}

/// What `meshctl status` shows about the ingress path.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IngressStatus {
    /// The underlay program's hook: `xdp-native`, `xdp-generic`, `tc` or `off`.
    pub hook: String,
    /// The underlay interface.
    pub interface: String,
    /// Why this hook and not the first choice (or why off); `None` when the first
    /// choice serves.
    pub reason: Option<String>,
    /// tc links attached on local task veths.
    pub tc_links: usize,
    /// The programs' counters.
    pub counters: IngressCounters,
}

/// A tc link on a task veth.
struct TcLink {
    ifindex: u32,
    /// Kept open so the link is known to be ours while meshd runs (the pin keeps it
    /// attached regardless).
    _link: FdLink,
}

/// The loaded and attached ingress path.
pub struct Ingress {
    ebpf: Ebpf,
    cfg: IngressConfig,
    ifindex: u32,
    attached: Hook,
    reason: Option<String>,
    adopted: bool,
    _underlay_link: FdLink,
    tc_tag: u64,
    map_ids: Vec<u32>,
    tc_links: BTreeMap<String, TcLink>,
    /// Tables as last written and read back in full (verified), by table index.
    verified: BTreeMap<u32, Vec<u32>>,
    /// Frontends the kernel path does not serve, with why, as of the last apply.
    unserved: BTreeMap<FrontendKey, (IngressService, String)>,
    /// Namespaces whose `eth0` got GRO, by host veth and its ifindex.
    gro: BTreeMap<String, (u32, PathBuf)>,
    /// Next window of slots observe re-reads.
    verify_offset: u32,
    /// Backend ids below this may be in use (read back up to here).
    id_high_water: u32,
    /// What the last `observe` read, for the `apply` of the same pass (only the
    /// reconcile loop writes these maps, so the snapshot is exact).
    observed: Option<IngressMaps>,
}

fn ebpf_err(program: &'static str) -> impl Fn(String) -> Error {
    move |message| Error::Ebpf { program, message }
}

fn map_specs(tables: u32) -> [MapSpec; 7] {
    use std::mem::size_of;
    let spec = MapSpec::new;
    [
        spec(
            INGRESS_FRONTENDS_MAP,
            MapType::Hash,
            size_of::<FrontendKey>(),
            size_of::<IngressFrontend>(),
            MAX_INGRESS_FRONTENDS,
        ),
        spec(INGRESS_BACKENDS_MAP, MapType::Array, 4, size_of::<IngressBackend>(), MAX_INGRESS_BACKENDS),
        spec(INGRESS_MAGLEV_MAP, MapType::Array, 4, 4, tables * MAGLEV_TABLE_SIZE),
        spec(
            INGRESS_FLOWS_MAP,
            MapType::LruHash,
            size_of::<FlowKey>(),
            size_of::<meshd_common::ingress::Flow>(),
            MAX_INGRESS_FLOWS,
        ),
        spec(INGRESS_NAT_MAP, MapType::LruHash, size_of::<FlowKey>(), size_of::<Nat>(), MAX_INGRESS_NAT),
        spec(INGRESS_CONFIG_MAP, MapType::Array, 4, size_of::<KernelConfig>(), 1),
        spec(INGRESS_STATS_MAP, MapType::PerCpuArray, 4, 8, IN_STAT_ENTRIES),
    ]
}

/// The interface the programs' next-hop lookups name (see the module doc).
pub const FIB_INTERFACE: &str = "lo";

/// Turns on IPv4 forwarding on interface `name` (this namespace's
/// `net.ipv4.conf.<name>.forwarding`) if it is off; returns whether it was off. The
/// programs' `bpf_fib_lookup` (the next hop of an encapsulated packet or a reply) answers
/// `BPF_FIB_LKUP_RET_FWD_DISABLED` on an interface that does not forward, and every
/// packet would fall back to the stack.
pub fn ensure_forwarding(name: &str) -> Result<bool> {
    let path = Path::new("/proc/sys/net/ipv4/conf").join(name).join("forwarding");
    let held =
        std::fs::read_to_string(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if held.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(&path, "1").map_err(|e| {
        Error::io(
            format!(
                "enabling forwarding on {name} (writing 1 to {}); the kernel ingress path needs it",
                path.display()
            ),
            e,
        )
    })?;
    Ok(true)
}

/// The interface's index, or a clear error.
pub fn ifindex_of(name: &str) -> Result<u32> {
    let c = CString::new(name).map_err(|_| Error::Config {
        setting: "--underlay-if",
        message: format!("{name:?} is not an interface name"),
    })?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(Error::Config {
            setting: "--underlay-if",
            message: format!(
                "no interface {name} in meshd's network namespace; give an existing one (`ip link`)"
            ),
        });
    }
    Ok(index)
}

/// The name of the interface holding `addr` (the underlay), for `--underlay-if`'s default.
pub fn interface_holding(addr: Ipv4Addr) -> Result<String> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| Error::io("listing interface addresses", e.into()))?;
    for ifa in addrs {
        let held = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()).map(|s| s.ip());
        if held == Some(addr) {
            return Ok(ifa.interface_name);
        }
    }
    Err(Error::Config {
        setting: "--underlay-if",
        message: format!("no interface holds {addr}; give the underlay interface with --underlay-if NAME"),
    })
}

/// The pinned link at `path` if its program has `tag`, uses only maps in `map_ids`,
/// and (given `ifindex`) is attached there.
fn adoptable(path: &Path, tag: u64, map_ids: &[u32], ifindex: Option<u32>) -> Option<FdLink> {
    if !path.exists() {
        return None;
    }
    let attached_to = bpf_sys::obj_get(path).and_then(|fd| sys::link_ifindex(&fd)).ok()?;
    if ifindex.is_some_and(|i| i != attached_to) || attached_to == 0 {
        return None;
    }
    let link = FdLink::from(PinnedLink::from_pin(path).ok()?);
    let program_id = link.info().ok()?.program_id();
    let program = loaded_programs().filter_map(|p| p.ok()).find(|p| p.id() == program_id)?;
    let used = program.map_ids().ok()??;
    (program.tag() == tag && used.iter().all(|id| map_ids.binary_search(id).is_ok())).then_some(link)
}

/// The underlay link pinned at `path`, if it is attached to `ifindex`, switched in
/// place to `hook`'s program (which must be loaded); `None` if there is no such link.
fn switch_underlay_link(
    ebpf: &mut Ebpf,
    hook: Hook,
    path: &Path,
    ifindex: u32,
) -> std::result::Result<Option<FdLink>, String> {
    if !path.exists() {
        return Ok(None);
    }
    let here = bpf_sys::obj_get(path).and_then(|fd| sys::link_ifindex(&fd)).is_ok_and(|i| i == ifindex);
    if !here {
        return Ok(None);
    }
    match hook {
        Hook::Native | Hook::Generic => {
            let xdp: &mut Xdp = program(ebpf, INGRESS_XDP_PROGRAM).map_err(|e| e.to_string())?;
            let pinned = PinnedLink::from_pin(path).map_err(|e| e.to_string())?;
            let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string())?;
            let id = xdp.attach_to_link(link).map_err(|e| e.to_string())?;
            let link = xdp.take_link(id).map_err(|e| e.to_string())?;
            FdLink::try_from(link).map(Some).map_err(|e| e.to_string())
        }
        Hook::Tc => {
            let tc: &mut SchedClassifier =
                program(ebpf, INGRESS_UNDERLAY_TC_PROGRAM).map_err(|e| e.to_string())?;
            switch_tc_link(tc, path).map(Some)
        }
    }
}

/// The object's program `name` as its type `T`.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let err = ebpf_err("ingress");
    ebpf.program_mut(name)
        .ok_or_else(|| err(format!("{name} missing from the object")))?
        .try_into()
        .map_err(|e| err(format!("{name}: wrong program type: {e}")))
}

/// Attaches `hook`'s loaded program to `interface` (`ifindex`) and pins the link at
/// `pin`.
fn attach_underlay(
    ebpf: &mut Ebpf,
    hook: Hook,
    interface: &str,
    ifindex: u32,
    pin: &Path,
) -> std::result::Result<FdLink, String> {
    let link = match hook {
        Hook::Native | Hook::Generic => {
            let xdp: &mut Xdp = program(ebpf, INGRESS_XDP_PROGRAM).map_err(|e| e.to_string())?;
            let mode = if hook == Hook::Generic { XdpMode::Skb } else { XdpMode::Driver };
            let id = xdp.attach_to_if_index(ifindex, mode).map_err(|e| chain(&e))?;
            let link = xdp.take_link(id).map_err(|e| e.to_string())?;
            FdLink::try_from(link).map_err(|e| format!("not a bpf_link: {e}"))?
        }
        Hook::Tc => {
            let tc: &mut SchedClassifier =
                program(ebpf, INGRESS_UNDERLAY_TC_PROGRAM).map_err(|e| e.to_string())?;
            let id = tc
                .attach_with_options(
                    interface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| chain(&e))?;
            let link: SchedClassifierLink = tc.take_link(id).map_err(|e| e.to_string())?;
            FdLink::try_from(link).map_err(|e| format!("not a bpf_link (TCX needs Linux 6.6): {e}"))?
        }
    };
    let pinned = link.pin(pin).map_err(|e| format!("pinning: {e}"))?;
    Ok(FdLink::from(pinned))
}

/// The tc link pinned at `path` switched in place to `tc` (which must be loaded).
fn switch_tc_link(tc: &mut SchedClassifier, path: &Path) -> std::result::Result<FdLink, String> {
    let pinned = PinnedLink::from_pin(path).map_err(|e| e.to_string())?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string())?;
    let id = tc.attach_to_link(link).map_err(|e| e.to_string())?;
    let link = tc.take_link(id).map_err(|e| e.to_string())?;
    FdLink::try_from(link).map_err(|e| e.to_string())
}

/// Detaches the link pinned at `path` now and removes the pin; a missing pin is fine.
fn remove_link_pin(path: &Path) -> Result<()> {
    let err = ebpf_err("ingress");
    match bpf_sys::detach_pinned_link(path) {
        Ok(()) => {}
        // A link whose device is gone is detached already.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOLINK) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => return Err(err(format!("detaching {}: {e}", path.display()))),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(format!("removing pin {}: {e}", path.display()))),
    }
}

/// Detaches every link pinned in `pin_dir` and removes its pins and the directory
/// (`meshd --cleanup`, `--xdp off`). Touches only names this module pins.
pub fn cleanup_pins(pin_dir: &Path) -> Result<()> {
    let err = ebpf_err("ingress");
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(format!("reading {}: {e}", pin_dir.display()))),
    };
    let maps: Vec<&str> = map_specs(1).iter().map(|s| s.name).collect();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with("xdp_") || name.starts_with("tc_") || name.starts_with("underlay_") {
            remove_link_pin(&path)?;
        } else if maps.contains(&name.as_str()) {
            std::fs::remove_file(&path).map_err(|e| err(format!("removing pin {}: {e}", path.display())))?;
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(format!("removing {}: {e}; remove what else is pinned there", pin_dir.display()))),
    }
}

fn proto_number(proto: Proto) -> u8 {
    match proto {
        Proto::Tcp => PROTO_TCP,
        Proto::Udp => PROTO_UDP,
    }
}

/// The kernel value of a backend spec (`ifindex` resolved by the caller).
fn backend_value(spec: &IngressBackendSpec, ifindex: u32) -> IngressBackend {
    let local = spec.host_if.is_some();
    IngressBackend {
        addr_raw: ip4_raw(spec.addr.octets()),
        vtep_raw: ip4_raw(spec.vtep.octets()),
        gw_raw: ip4_raw(spec.gw.octets()),
        ifindex,
        vni: spec.vni,
        gen: 0,
        mac: spec.mac.0,
        gw_mac: spec.gw_mac.0,
        port_raw: port_raw(spec.port),
        flags: BACKEND_LIVE | if local { BACKEND_LOCAL } else { 0 },
    }
}

/// The name of interface `ifindex`, or `#<ifindex>` when it has none (gone).
fn ifname(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes the call may write.
    let ret = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if ret.is_null() {
        return format!("#{ifindex}");
    }
    // SAFETY: on success the kernel wrote a NUL-terminated name into `buf`.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

impl Ingress {
    /// Loads the programs and maps (adopting a previous run's pins), writes the
    /// config, attaches XDP to `cfg.interface` per `cfg.xdp`, and adopts the pinned
    /// tc links of task veths. Fails when XDP attaches in no allowed mode (the error
    /// says why for each mode tried).
    pub fn open(cfg: IngressConfig) -> Result<Self> {
        cfg.validate()?;
        let err = ebpf_err("ingress");
        let hooks: Vec<Hook> = match cfg.xdp {
            XdpSetting::Auto => auto_hooks(),
            XdpSetting::Native => vec![Hook::Native],
            XdpSetting::Generic => vec![Hook::Generic],
            XdpSetting::Tc => vec![Hook::Tc],
            XdpSetting::Off => {
                return Err(Error::Config {
                    setting: "--xdp",
                    message: "off: the ingress path is not loaded".into(),
                })
            }
        };
        let ifindex = ifindex_of(&cfg.interface)?;
        if ensure_forwarding(FIB_INTERFACE)? {
            tracing::info!("enabled IPv4 forwarding on lo (the XDP/tc next-hop lookups run through it)");
        }
        crate::socklb::prepare_pin_dir(&cfg.pin_dir)?;
        let specs = map_specs(cfg.max_ports);
        for spec in &specs {
            drop_incompatible_map(&cfg.pin_dir.join(spec.name), spec, "ingress")?;
        }
        let pins: Vec<(&'static str, PathBuf)> =
            specs.iter().map(|s| (s.name, cfg.pin_dir.join(s.name))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        loader.map_max_entries(INGRESS_MAGLEV_MAP, cfg.max_ports * MAGLEV_TABLE_SIZE);
        // The socket load balancer's maps come with the object; this copy never uses them.
        for unused in [SERVICES_MAP, BACKENDS_MAP, REVERSE_MAP, LOCAL_ADDRS_MAP] {
            loader.map_max_entries(unused, 1);
        }
        let mut ebpf = loader
            .load(crate::socklb::OBJECT)
            .map_err(|e| err(format!("loading the object: {}", chain(&e))))?;
        let mut map_ids: Vec<u32> =
            pins.iter().filter_map(|(_, p)| MapInfo::from_pin(p).ok()).map(|m| m.id()).collect();
        map_ids.sort_unstable();
        // Before any program is attached, so none runs with another node's settings.
        let kernel_cfg = KernelConfig {
            node_raw: ip4_raw(cfg.node_addr.octets()),
            ifindex,
            nat_port_min: NAT_PORT_MIN,
            nat_port_max: NAT_PORT_MAX,
            pad: 0,
        };
        {
            let mut map: Array<_, KernelConfig> = Array::try_from(
                ebpf.map_mut(INGRESS_CONFIG_MAP).ok_or_else(|| err("config map missing".into()))?,
            )
            .map_err(|e| err(format!("config map: {e}")))?;
            map.set(0, kernel_cfg, 0).map_err(|e| err(format!("writing the config map: {e}")))?;
        }
        let tc: &mut SchedClassifier = program(&mut ebpf, INGRESS_TC_PROGRAM)?;
        tc.load()
            .map_err(|e| err(format!("{INGRESS_TC_PROGRAM}: the verifier refused it: {}", chain(&e))))?;
        let tc_tag = tc.info().map_err(|e| err(format!("{INGRESS_TC_PROGRAM}: {e}")))?.tag();

        let mut tags = BTreeMap::new();
        for name in [INGRESS_XDP_PROGRAM, INGRESS_UNDERLAY_TC_PROGRAM] {
            let loaded = if name == INGRESS_XDP_PROGRAM {
                let xdp: &mut Xdp = program(&mut ebpf, name)?;
                xdp.load().and_then(|()| xdp.info())
            } else {
                let tc: &mut SchedClassifier = program(&mut ebpf, name)?;
                tc.load().and_then(|()| tc.info())
            };
            let info = loaded.map_err(|e| err(format!("{name}: the verifier refused it: {}", chain(&e))))?;
            tags.insert(name, info.tag());
        }
        let tag = |hook: Hook| tags[hook.program()];

        // Adopt: the first allowed hook whose pinned link runs its program on our maps.
        let mut found = None;
        for &hook in &hooks {
            let pin = cfg.pin_dir.join(hook.pin_name());
            if let Some(link) = adoptable(&pin, tag(hook), &map_ids, Some(ifindex)) {
                found = Some((hook, link));
                break;
            }
        }
        // An upgrade (or maps replaced): a pinned link of an allowed hook on this
        // interface runs another program. Switch it in place (BPF_LINK_UPDATE): no
        // moment without a program, when established flows would meet the stack.
        if found.is_none() {
            for &hook in &hooks {
                let pin = cfg.pin_dir.join(hook.pin_name());
                match switch_underlay_link(&mut ebpf, hook, &pin, ifindex) {
                    Ok(Some(link)) => {
                        found = Some((hook, link));
                        break;
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(hook = hook.as_str(), %error, "switching the pinned underlay link in place failed; re-attaching")
                    }
                }
            }
        }
        let explicit = |hook: Hook| match cfg.xdp {
            XdpSetting::Generic => Some("--xdp generic".to_owned()),
            XdpSetting::Native | XdpSetting::Tc => None,
            _ if hook == hooks[0] => None,
            _ => Some(format!("adopted the {} link of the previous run", hook.as_str())),
        };
        let (attached, link, reason, adopted) = match found {
            Some((hook, link)) => {
                tracing::info!(hook = hook.as_str(), interface = %cfg.interface, "adopted the pinned underlay link");
                // Other hooks' links (a previous run's other setting): ours, gone.
                for other in Hook::ALL.into_iter().filter(|h| h.pin_name() != hook.pin_name()) {
                    remove_link_pin(&cfg.pin_dir.join(other.pin_name()))?;
                }
                (hook, link, explicit(hook), true)
            }
            None => {
                // Links of other hooks or interfaces, or of an older program: ours, replaced.
                for hook in Hook::ALL {
                    remove_link_pin(&cfg.pin_dir.join(hook.pin_name()))?;
                }
                let mut failures = Vec::new();
                let mut done = None;
                for &hook in &hooks {
                    let pin = cfg.pin_dir.join(hook.pin_name());
                    match attach_underlay(&mut ebpf, hook, &cfg.interface, ifindex, &pin) {
                        Ok(link) => {
                            done = Some((hook, link));
                            break;
                        }
                        Err(e) => failures.push(format!("{}: {e}", hook.as_str())),
                    }
                }
                let Some((hook, link)) = done else {
                    return Err(err(format!(
                        "the ingress program could not attach to {} ({})",
                        cfg.interface,
                        failures.join("; ")
                    )));
                };
                let reason = if failures.is_empty() {
                    explicit(hook)
                } else {
                    Some(format!("{} on {}", failures.join("; "), cfg.interface))
                };
                (hook, link, reason, false)
            }
        };
        match &reason {
            Some(why) => tracing::warn!(
                hook = attached.as_str(), interface = %cfg.interface, %why,
                "kernel ingress attached, not on its first-choice hook"
            ),
            None => {
                tracing::info!(hook = attached.as_str(), interface = %cfg.interface, adopted, "kernel ingress attached")
            }
        }
        let mut ingress = Ingress {
            ebpf,
            ifindex,
            attached,
            reason,
            adopted,
            _underlay_link: link,
            tc_tag,
            map_ids,
            tc_links: BTreeMap::new(),
            verified: BTreeMap::new(),
            unserved: BTreeMap::new(),
            gro: BTreeMap::new(),
            verify_offset: 0,
            id_high_water: MAX_INGRESS_BACKENDS,
            observed: None,
            cfg,
        };
        ingress.adopt_tc_links()?;
        Ok(ingress)
    }

    /// Whether the XDP link was adopted from a previous run.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Takes over the pinned tc links that run this program; removes the others.
    fn adopt_tc_links(&mut self) -> Result<()> {
        let err = ebpf_err("ingress");
        let entries = std::fs::read_dir(&self.cfg.pin_dir)
            .map_err(|e| err(format!("reading {}: {e}", self.cfg.pin_dir.display())))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(host_if) = name.strip_prefix("tc_") else { continue };
            let path = entry.path();
            match adoptable(&path, self.tc_tag, &self.map_ids, None) {
                Some(link) => {
                    let ifindex = bpf_sys::obj_get(&path).and_then(|fd| sys::link_ifindex(&fd)).unwrap_or(0);
                    self.tc_links.insert(host_if.to_owned(), TcLink { ifindex, _link: link });
                }
                None => {
                    // Another program (an upgrade): switched in place, or replaced.
                    let tc: &mut SchedClassifier = program(&mut self.ebpf, INGRESS_TC_PROGRAM)?;
                    match switch_tc_link(tc, &path) {
                        Ok(link) => {
                            let ifindex =
                                bpf_sys::obj_get(&path).and_then(|fd| sys::link_ifindex(&fd)).unwrap_or(0);
                            self.tc_links.insert(host_if.to_owned(), TcLink { ifindex, _link: link });
                        }
                        Err(error) => {
                            tracing::warn!(%host_if, %error, "switching the pinned tc link in place failed; replacing it");
                            remove_link_pin(&path)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn key(&self, proto: Proto, port: u16) -> FrontendKey {
        FrontendKey::new(self.cfg.node_addr.octets(), port, proto_number(proto))
    }

    fn read_frontends(&self) -> Result<BTreeMap<FrontendKey, IngressFrontend>> {
        let err = ebpf_err("ingress");
        let map: HashMap<_, FrontendKey, IngressFrontend> = HashMap::try_from(
            self.ebpf.map(INGRESS_FRONTENDS_MAP).ok_or_else(|| err("frontends map missing".into()))?,
        )
        .map_err(|e| err(format!("frontends map: {e}")))?;
        let mut out = BTreeMap::new();
        for entry in map.iter() {
            let (k, v) = entry.map_err(|e| err(format!("reading frontends: {e}")))?;
            out.insert(k, v);
        }
        Ok(out)
    }

    fn read_backends(&mut self) -> Result<BTreeMap<u32, IngressBackend>> {
        let err = ebpf_err("ingress");
        let map: Array<_, IngressBackend> = Array::try_from(
            self.ebpf.map(INGRESS_BACKENDS_MAP).ok_or_else(|| err("backends map missing".into()))?,
        )
        .map_err(|e| err(format!("backends map: {e}")))?;
        let mut out = BTreeMap::new();
        for id in 0..self.id_high_water.min(MAX_INGRESS_BACKENDS) {
            let value = map.get(&id, 0).map_err(|e| err(format!("reading backend {id}: {e}")))?;
            if value != IngressBackend::default() {
                out.insert(id, value);
            }
        }
        self.id_high_water = out.keys().next_back().map_or(1, |id| id + 1);
        Ok(out)
    }

    fn read_slots(&self, table: u32, range: std::ops::Range<u32>) -> Result<Vec<u32>> {
        let err = ebpf_err("ingress");
        let map: Array<_, u32> = Array::try_from(
            self.ebpf.map(INGRESS_MAGLEV_MAP).ok_or_else(|| err("Maglev map missing".into()))?,
        )
        .map_err(|e| err(format!("Maglev map: {e}")))?;
        range
            .map(|slot| {
                map.get(&maglev_index(table, slot), 0)
                    .map_err(|e| err(format!("reading Maglev slot {slot}: {e}")))
            })
            .collect()
    }

    /// What the maps hold: frontends and backends read back in full; the tables of
    /// served frontends from the last verified write, with a window re-read (a
    /// mismatch, or a table never verified by this process, is read in full).
    fn maps(&mut self) -> Result<IngressMaps> {
        let frontends = self.read_frontends()?;
        let backends = self.read_backends()?;
        let mut tables = BTreeMap::new();
        let start = self.verify_offset;
        let end = (start + VERIFY_WINDOW).min(MAGLEV_TABLE_SIZE);
        self.verify_offset = if end >= MAGLEV_TABLE_SIZE { 0 } else { end };
        for f in frontends.values().filter(|f| f.count > 0) {
            if tables.contains_key(&f.table) {
                continue;
            }
            let window_ok = match self.verified.get(&f.table) {
                Some(held) => self.read_slots(f.table, start..end)? == held[start as usize..end as usize],
                None => false,
            };
            if !window_ok {
                let full = self.read_slots(f.table, 0..MAGLEV_TABLE_SIZE)?;
                self.verified.insert(f.table, full);
            }
            tables.insert(f.table, self.verified[&f.table].clone());
        }
        Ok(IngressMaps { frontends, backends, tables })
    }

    /// The spec the kernel holds now, in control's terms: published ports read back
    /// from the maps (ports left to the proxy as last asked), and the task veths
    /// whose tc link is attached (with the namespace given GRO by this process; an
    /// empty path until then, so the next apply checks it).
    pub fn observe(&mut self) -> Result<IngressSpec> {
        // Read back like the maps: a hand-disabled flag is turned on again.
        if ensure_forwarding(FIB_INTERFACE)? {
            tracing::warn!("IPv4 forwarding on lo was turned off; turned it on again (the kernel ingress path's next-hop lookups need it)");
        }
        // And a detached underlay link is attached again.
        if let Some(why) = self.underlay_detached() {
            self.reattach_underlay()?;
            tracing::warn!(interface = %self.cfg.interface, hook = self.attached.as_str(), %why, "attached the ingress program again");
        }
        let maps = self.maps()?;
        let mut spec = IngressSpec::default();
        for (key, f) in &maps.frontends {
            let proto = match key.proto {
                PROTO_TCP => Proto::Tcp,
                PROTO_UDP => Proto::Udp,
                _ => continue,
            };
            if key.addr_raw != ip4_raw(self.cfg.node_addr.octets()) {
                continue;
            }
            let mode = if f.mode == MODE_DSR { IngressMode::Dsr } else { IngressMode::Snat };
            let mut backends: Vec<IngressBackendSpec> = Vec::new();
            if f.count > 0 {
                let ids: std::collections::BTreeSet<u32> =
                    maps.tables.get(&f.table).into_iter().flatten().copied().collect();
                for id in ids {
                    let Some(b) = maps.backends.get(&id).filter(|b| b.flags & BACKEND_LIVE != 0) else {
                        // A slot naming a retired id: not what control wants; differs.
                        backends.push(IngressBackendSpec {
                            addr: Ipv4Addr::UNSPECIFIED,
                            port: 0,
                            mac: MacAddr([0; 6]),
                            vtep: Ipv4Addr::UNSPECIFIED,
                            gw: Ipv4Addr::UNSPECIFIED,
                            gw_mac: MacAddr([0; 6]),
                            vni: 0,
                            host_if: None,
                            draining: false,
                        });
                        continue;
                    };
                    backends.push(IngressBackendSpec {
                        addr: Ipv4Addr::from(ip4_octets(b.addr_raw)),
                        port: port_host(b.port_raw),
                        mac: MacAddr(b.mac),
                        vtep: Ipv4Addr::from(ip4_octets(b.vtep_raw)),
                        gw: Ipv4Addr::from(ip4_octets(b.gw_raw)),
                        gw_mac: MacAddr(b.gw_mac),
                        vni: b.vni,
                        host_if: (b.flags & BACKEND_LOCAL != 0).then(|| ifname(b.ifindex)),
                        draining: false,
                    });
                }
                backends.sort();
            }
            spec.services.insert((proto, port_host(key.port_raw)), IngressService { mode, backends });
        }
        for (key, (service, _)) in &self.unserved {
            let proto = if key.proto == PROTO_UDP { Proto::Udp } else { Proto::Tcp };
            spec.services.entry((proto, port_host(key.port_raw))).or_insert_with(|| service.clone());
        }
        for (host_if, link) in &self.tc_links {
            let alive = bpf_sys::obj_get(&self.cfg.pin_dir.join(format!("tc_{host_if}")))
                .and_then(|fd| sys::link_ifindex(&fd))
                .is_ok_and(|i| i != 0 && i == link.ifindex);
            if !alive {
                continue;
            }
            let netns = match self.gro.get(host_if) {
                Some((ifindex, netns)) if *ifindex == link.ifindex => netns.clone(),
                _ => PathBuf::new(),
            };
            spec.tasks.insert(host_if.clone(), netns);
        }
        self.observed = Some(maps);
        Ok(spec)
    }

    /// Makes the kernel hold `want`: tc links and GRO for the tasks, then the map
    /// writes of [`plan::plan`]; tables written are read back in full. Returns the
    /// number of map writes (slot writes count one per table).
    pub fn apply(&mut self, want: &IngressSpec) -> Result<usize> {
        let mut errors = Vec::new();
        if let Err(e) = self.apply_tasks(&want.tasks) {
            errors.push(e.to_string());
        }
        let mut desired = BTreeMap::new();
        let mut specs = BTreeMap::new();
        for (&(proto, port), service) in &want.services {
            let key = self.key(proto, port);
            let mut backends = Vec::new();
            let mut draining = std::collections::BTreeSet::new();
            for b in &service.backends {
                let ifindex = match &b.host_if {
                    Some(name) => match ifindex_of(name) {
                        Ok(i) => i,
                        // The veth is not there (yet): the task is not reachable locally.
                        Err(_) => continue,
                    },
                    None => 0,
                };
                let mut value = backend_value(b, ifindex);
                let id = plan::maglev_id(value.addr_raw, value.port_raw);
                if b.draining {
                    draining.insert(id);
                    value.flags |= BACKEND_DRAINING;
                }
                backends.push((id, value));
            }
            desired.insert(key, WantedFrontend { mode: service.mode.raw(), backends, draining });
            specs.insert(key, service.clone());
        }
        let maps = match self.observed.take() {
            Some(maps) => maps,
            None => self.maps()?,
        };
        let p = plan::plan(&maps, &desired, self.cfg.max_ports);
        let writes = p.writes.len();
        let started = std::time::Instant::now();
        self.execute(&p.writes)?;
        for (table, slots) in &p.tables {
            if self.verified.get(table) == Some(slots) {
                // Not written by this plan and verified before: nothing to read back.
                continue;
            }
            let held = self.read_slots(*table, 0..MAGLEV_TABLE_SIZE)?;
            if &held != slots {
                self.verified.remove(table);
                return Err(ebpf_err("ingress")(format!(
                    "Maglev table {table} reads back differently from what was written"
                )));
            }
            self.verified.insert(*table, held);
        }
        if writes > 0 {
            let slots: usize =
                p.writes.iter().map(|w| if let Write::PutSlots(_, s) = w { s.len() } else { 0 }).sum();
            tracing::info!(
                writes,
                slots,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "ingress maps written and read back"
            );
        }
        let was = std::mem::take(&mut self.unserved);
        for (key, why) in p.unserved {
            if !was.contains_key(&key) {
                tracing::warn!(port = port_host(key.port_raw), %why, "published port left to the proxy");
            }
            self.unserved.insert(key, (specs[&key].clone(), why));
        }
        if errors.is_empty() {
            Ok(writes)
        } else {
            Err(ebpf_err("ingress")(errors.join("; ")))
        }
    }

    fn execute(&mut self, writes: &[Write]) -> Result<()> {
        let err = ebpf_err("ingress");
        for write in writes {
            match write {
                Write::DeleteFrontend(key) => {
                    let mut map: HashMap<_, FrontendKey, IngressFrontend> = HashMap::try_from(
                        self.ebpf
                            .map_mut(INGRESS_FRONTENDS_MAP)
                            .ok_or_else(|| err("frontends map missing".into()))?,
                    )
                    .map_err(|e| err(format!("frontends map: {e}")))?;
                    map.remove(key).map_err(|e| err(format!("removing a frontend: {e}")))?;
                }
                Write::PutFrontend(key, value) => {
                    let mut map: HashMap<_, FrontendKey, IngressFrontend> = HashMap::try_from(
                        self.ebpf
                            .map_mut(INGRESS_FRONTENDS_MAP)
                            .ok_or_else(|| err("frontends map missing".into()))?,
                    )
                    .map_err(|e| err(format!("frontends map: {e}")))?;
                    map.insert(key, value, 0).map_err(|e| err(format!("writing a frontend: {e}")))?;
                }
                Write::PutBackend(id, value) => {
                    let mut map: Array<_, IngressBackend> = Array::try_from(
                        self.ebpf
                            .map_mut(INGRESS_BACKENDS_MAP)
                            .ok_or_else(|| err("backends map missing".into()))?,
                    )
                    .map_err(|e| err(format!("backends map: {e}")))?;
                    map.set(*id, *value, 0).map_err(|e| err(format!("writing backend {id}: {e}")))?;
                    self.id_high_water = self.id_high_water.max(id + 1);
                }
                Write::PutSlots(table, slots) => {
                    // Until read back, the table is not known to hold what we think.
                    self.verified.remove(table);
                    let mut map: Array<_, u32> = Array::try_from(
                        self.ebpf
                            .map_mut(INGRESS_MAGLEV_MAP)
                            .ok_or_else(|| err("Maglev map missing".into()))?,
                    )
                    .map_err(|e| err(format!("Maglev map: {e}")))?;
                    for (slot, id) in slots {
                        map.set(maglev_index(*table, *slot), *id, 0)
                            .map_err(|e| err(format!("writing Maglev slot {slot} of table {table}: {e}")))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Attaches the tc program to every task veth in `tasks` that lacks it, gives
    /// the task's `eth0` GRO, and detaches (and unpins) links of veths no longer wanted or gone.
    fn apply_tasks(&mut self, tasks: &BTreeMap<String, PathBuf>) -> Result<()> {
        let err = ebpf_err("ingress");
        let mut errors = Vec::new();
        let stale: Vec<String> = self
            .tc_links
            .iter()
            .filter(|(name, link)| !tasks.contains_key(*name) || ifindex_of(name).ok() != Some(link.ifindex))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            self.tc_links.remove(&name);
            self.gro.remove(&name);
            remove_link_pin(&self.cfg.pin_dir.join(format!("tc_{name}")))?;
        }
        for (host_if, netns) in tasks {
            let Ok(ifindex) = ifindex_of(host_if) else {
                errors.push(format!("task veth {host_if} is missing"));
                continue;
            };
            if !self.tc_links.contains_key(host_if) {
                let pin = self.cfg.pin_dir.join(format!("tc_{host_if}"));
                remove_link_pin(&pin)?;
                let tc: &mut SchedClassifier = program(&mut self.ebpf, INGRESS_TC_PROGRAM)?;
                let attached = tc
                    .attach_with_options(
                        host_if,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(|e| format!("attaching tc to {host_if}: {}", chain(&e)))
                    .and_then(|id| tc.take_link(id).map_err(|e| e.to_string()))
                    .and_then(|l: SchedClassifierLink| FdLink::try_from(l).map_err(|e| e.to_string()))
                    .and_then(|l| l.pin(&pin).map_err(|e| format!("pinning {}: {e}", pin.display())));
                match attached {
                    Ok(pinned) => {
                        self.tc_links
                            .insert(host_if.clone(), TcLink { ifindex, _link: FdLink::from(pinned) });
                    }
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                }
            }
            if self.gro.get(host_if) != Some(&(ifindex, netns.clone())) {
                match crate::overlay::enable_task_gro(netns) {
                    Ok(()) => {
                        self.gro.insert(host_if.clone(), (ifindex, netns.clone()));
                    }
                    Err(e) => errors.push(format!("enabling GRO on eth0 of {}: {e}", netns.display())),
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(err(errors.join("; ")))
        }
    }

    /// Attaches the loaded underlay program to the underlay again, on the same hook,
    /// and pins the new link where the old one was (someone detached it, `bpftool link
    /// detach`). If the interface was re-created (another ifindex) the next-hop
    /// settings in the config map point at the old one: that takes a restart, and the
    /// error says so.
    fn reattach_underlay(&mut self) -> Result<()> {
        let err = ebpf_err("ingress");
        let ifindex = ifindex_of(&self.cfg.interface)?;
        if ifindex != self.ifindex {
            return Err(err(format!(
                "{} was re-created (ifindex {} → {ifindex}); restart meshd to attach the kernel path to it",
                self.cfg.interface, self.ifindex
            )));
        }
        let pin = self.cfg.pin_dir.join(self.attached.pin_name());
        remove_link_pin(&pin)?;
        self._underlay_link =
            attach_underlay(&mut self.ebpf, self.attached, &self.cfg.interface, ifindex, &pin).map_err(
                |e| err(format!("attaching {} to {} again: {e}", self.attached.as_str(), self.cfg.interface)),
            )?;
        Ok(())
    }

    /// Why the underlay link no longer serves, if it does not: asked of the kernel
    /// (its interface went away, or someone detached the link).
    fn underlay_detached(&self) -> Option<String> {
        let pin = self.cfg.pin_dir.join(self.attached.pin_name());
        match bpf_sys::obj_get(&pin).and_then(|fd| sys::link_ifindex(&fd)) {
            Ok(ifindex) if ifindex == self.ifindex => None,
            Ok(_) => Some(format!(
                "the {} link left {} (the interface went away or the link was detached)",
                self.attached.as_str(),
                self.cfg.interface
            )),
            Err(e) => Some(format!(
                "the {} link pinned at {} cannot be read ({e}); restart meshd",
                self.attached.as_str(),
                pin.display()
            )),
        }
    }

    /// Which path serves `proto/port`'s external clients: the kernel's once its
    /// frontend is in the map with backends and its table verified; otherwise the
    /// proxy, and why.
    pub fn kernel_path(&self, proto: Proto, port: u16) -> KernelPath {
        if let Some(why) = self.underlay_detached() {
            return KernelPath::Proxy(why);
        }
        let key = self.key(proto, port);
        if let Some((_, why)) = self.unserved.get(&key) {
            return KernelPath::Proxy(why.clone());
        }
        let frontends = match self.read_frontends() {
            Ok(f) => f,
            Err(e) => return KernelPath::Proxy(format!("reading the frontends back failed: {e}")),
        };
        match frontends.get(&key) {
            None => KernelPath::Proxy("not written to the kernel yet".into()),
            Some(f) if f.count == 0 => KernelPath::Proxy("no backend reachable from this node".into()),
            Some(f) if self.verified.contains_key(&f.table) => KernelPath::Kernel(self.attached),
            Some(_) => KernelPath::Proxy("its Maglev table is not verified yet".into()),
        }
    }

    /// The hook, interface, why not the first choice, tc links and counters.
    pub fn status(&self) -> IngressStatus {
        let mut c = [0u64; IN_STAT_ENTRIES as usize];
        if let Some(Ok(map)) = self.ebpf.map(INGRESS_STATS_MAP).map(PerCpuArray::<_, u64>::try_from) {
            for (i, slot) in c.iter_mut().enumerate() {
                if let Ok(per_cpu) = map.get(&(i as u32), 0) {
                    *slot = per_cpu.iter().fold(0u64, |a, v| a.wrapping_add(*v));
                }
            }
        }
        let detached = self.underlay_detached();
        IngressStatus {
            hook: if detached.is_some() { "off".into() } else { self.attached.as_str().into() },
            interface: self.cfg.interface.clone(),
            reason: detached.or_else(|| self.reason.clone()),
            tc_links: self.tc_links.len(),
            counters: IngressCounters {
                pass: c[0],
                local: c[1],
                encap: c[2],
                reply_xdp: c[3],
                reply_tc: c[4],
                dsr_recorded: c[5],
                no_backend: c[6],
                unrouted: c[7],
                drop_malformed: c[8],
            },
        }
    }

    /// The hook in use.
    pub fn attached(&self) -> Hook {
        self.attached
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_settings_parse_and_refuse_unknown_values() {
        assert_eq!("auto".parse::<XdpSetting>(), Ok(XdpSetting::Auto));
        assert_eq!("generic".parse::<XdpSetting>(), Ok(XdpSetting::Generic));
        assert_eq!("tc".parse::<XdpSetting>(), Ok(XdpSetting::Tc));
        let err = "fast".parse::<XdpSetting>().unwrap_err();
        assert!(err.contains("auto, native, generic, tc or off"), "{err}");
    }

    #[test]
    fn backend_values_carry_the_local_flag_and_network_order() {
        let spec = IngressBackendSpec {
            addr: Ipv4Addr::new(10, 0, 0, 2),
            port: 80,
            mac: MacAddr([2, 0, 10, 0, 0, 2]),
            vtep: Ipv4Addr::new(198, 18, 0, 11),
            gw: Ipv4Addr::new(10, 0, 0, 1),
            gw_mac: MacAddr([2, 0, 10, 0, 0, 1]),
            vni: 4096,
            host_if: Some("mvx".into()),
            draining: false,
        };
        let v = backend_value(&spec, 7);
        assert_eq!(v.flags, BACKEND_LIVE | BACKEND_LOCAL);
        assert_eq!(v.port_raw, 80u16.to_be());
        assert_eq!(ip4_octets(v.addr_raw), [10, 0, 0, 2]);
        let remote = backend_value(&IngressBackendSpec { host_if: None, ..spec }, 0);
        assert_eq!(remote.flags, BACKEND_LIVE);
    }

    #[test]
    fn the_underlay_is_the_interface_holding_the_address() {
        assert_eq!(interface_holding(Ipv4Addr::LOCALHOST).unwrap(), "lo");
        // TEST-NET-2: held by no interface here.
        let err = interface_holding(Ipv4Addr::new(198, 51, 100, 77)).unwrap_err().to_string();
        assert!(err.contains("no interface holds 198.51.100.77") && err.contains("--underlay-if"), "{err}");
        let err = ifindex_of("nonexistent0").unwrap_err().to_string();
        assert!(err.contains("no interface nonexistent0"), "{err}");
    }

    #[test]
    fn max_ports_is_range_checked() {
        let cfg = IngressConfig {
            xdp: XdpSetting::Auto,
            interface: "eth0".into(),
            node_addr: Ipv4Addr::new(198, 18, 0, 11),
            max_ports: 0,
            pin_dir: "/sys/fs/bpf/x".into(),
        };
        assert!(cfg.validate().unwrap_err().to_string().contains("--xdp-max-ports"));
        assert!(IngressConfig { max_ports: 16, ..cfg }.validate().is_ok());
    }
}
