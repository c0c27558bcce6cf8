//! The eBPF socket-level load balancer: loads the four cgroup `sock_addr` programs,
//! attaches them to one cgroup v2 directory, pins maps and links under a bpffs
//! directory (`/sys/fs/bpf/meshd/<node-name>/` in production) and writes frontends
//! and backends into the maps.
//!
//! It owns only what sits in its pin directory; it never touches other programs on the
//! cgroup. Pinned, the data path outlives the process (a `kill -9` keeps serving); the
//! next [`SocketLb::open`] adopts the pins, and only [`SocketLb::cleanup`] (or
//! [`cleanup_pins`]) removes them. Unpinned (`pin_dir: None`), dropping the value
//! detaches everything.
//!
//! ## For control
//! - At start: `SocketLb::open(SocketLbConfig { cgroup, pin_dir: Some(pin_dir_for(node)) })`
//!   (mounts bpffs at `/sys/fs/bpf` if absent). Compatible pins are adopted: the same
//!   program on the same maps on the same cgroup keeps running; anything else is
//!   replaced by attach-new, rename the pin over the old one, detach-old.
//! - Each reconcile: `observe()` (read back from the maps), then `apply(&desired)` with
//!   desired = frontend → healthy backends. It writes only the difference and returns
//!   how many writes it made. `set_local_addrs` lists the node's addresses for the
//!   `0.0.0.0:port` (published port) form.
//! - A service VIP forwards every port, as Docker's do: give `VIP:0` the tasks with
//!   port 0 (`task:0` keeps the port, so `VIP:3306` reaches `task:3306`); exact
//!   `VIP:port` frontends (published targets, other port mappings) win over it.
//!   `VIP:0` with no backends refuses every port without an exact frontend.
//! - The `0.0.0.0:port` form serves only sockets in the network namespace that called
//!   `open` (meshd's own); containers' own loopback ports are left alone, VIPs apply
//!   everywhere. Open it from the namespace whose published ports it serves.
//! - `meshd --cleanup`: [`cleanup_pins`]`(&pin_dir_for(node))`, or `SocketLb::cleanup`.
//! - Caveat: a map whose pinned layout differs from this build's (an upgrade that
//!   changed a map type) is recreated empty; VIPs pass through untranslated until the
//!   first `apply`. Compatible upgrades have no such window.
//! - Unconnected UDP `sendmsg` picks a backend per datagram; replies are restored to
//!   the frontend per (socket, backend) in the reverse map.

pub mod plan;
pub(crate) mod sys;

use std::{
    collections::BTreeMap,
    fs::File,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapData, MapInfo, MapType, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs, CgroupAttachMode, CgroupSockAddr,
    },
    Ebpf, EbpfLoader,
};
use meshd_common::{
    ip4_octets, ip4_raw, port_host, BackendKey, BackendValue, FrontendKey, LbConfig, ServiceValue, SockStats,
    BACKENDS_MAP, CONFIG_MAP, LOCAL_ADDRS_MAP, LOCAL_ADDR_PRESENT, MAX_BACKENDS_PER_SERVICE,
    MAX_BACKEND_SLOTS, MAX_LOCAL_ADDRS, MAX_REVERSE, MAX_SERVICES, PROTO_TCP, PROTO_UDP, REVERSE_MAP,
    SERVICES_MAP, SOCK_STATS_MAP, STATS_CONNECT4, STATS_ENTRIES, STATS_GETPEERNAME4, STATS_RECVMSG4,
    STATS_SENDMSG4,
};
pub use plan::{MapState, Write};

use crate::{Error, Result};

/// The compiled kernel object, built by this crate's build script.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshd-ebpf"));

/// The programs, in the order `status()` lists them, with their stats index.
const HOOKS: [(&str, u32); 4] = [
    ("connect4", STATS_CONNECT4),
    ("sendmsg4", STATS_SENDMSG4),
    ("recvmsg4", STATS_RECVMSG4),
    ("getpeername4", STATS_GETPEERNAME4),
];

/// Where bpffs is mounted in production.
pub const BPFFS: &str = "/sys/fs/bpf";

/// The pin directory of node `node_name`: `/sys/fs/bpf/meshd/<node-name>`.
pub fn pin_dir_for(node_name: &str) -> PathBuf {
    Path::new(BPFFS).join("meshd").join(node_name)
}

/// A transport protocol a frontend serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub enum Proto {
    /// TCP (`connect()`).
    Tcp,
    /// UDP (`connect()` or `sendmsg()`).
    Udp,
}

impl Proto {
    fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }
}

/// A service frontend: where applications connect.
///
/// Forms: `addr:port` (a VIP port); `addr:0` — every port of the VIP `addr` that has
/// no exact frontend: with backends, balanced (a backend with port 0 keeps the port the
/// application used), without, refused; `0.0.0.0:port` — a published port reached at
/// any loopback or local address (see [`SocketLb::set_local_addrs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Frontend {
    /// The address; `0.0.0.0` for "any local address".
    pub addr: Ipv4Addr,
    /// The port; 0 for the wildcard form (every port of `addr` without an exact frontend).
    pub port: u16,
    /// The protocol.
    pub proto: Proto,
}

impl Frontend {
    fn key(&self) -> FrontendKey {
        FrontendKey::new(self.addr.octets(), self.port, self.proto.number())
    }

    fn from_key(key: &FrontendKey) -> Option<Self> {
        let proto = match key.proto {
            PROTO_TCP => Proto::Tcp,
            PROTO_UDP => Proto::Udp,
            _ => return None,
        };
        Some(Frontend {
            addr: Ipv4Addr::from(ip4_octets(key.addr_raw)),
            port: port_host(key.port_raw),
            proto,
        })
    }
}

/// A backend a frontend's connections go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Backend {
    /// The backend's address.
    pub addr: Ipv4Addr,
    /// The backend's port; 0 keeps the port the application connected to (only under
    /// a wildcard `addr:0` frontend).
    pub port: u16,
}

impl Backend {
    fn value(&self) -> BackendValue {
        BackendValue::new(self.addr.octets(), self.port)
    }

    fn from_value(value: &BackendValue) -> Self {
        Backend { addr: Ipv4Addr::from(ip4_octets(value.addr_raw)), port: port_host(value.port_raw) }
    }
}

/// Where the socket load balancer attaches and pins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketLbConfig {
    /// The cgroup v2 directory the programs attach to (`--cgroup`).
    pub cgroup: PathBuf,
    /// The bpffs directory for maps and links ([`pin_dir_for`]); `None` keeps
    /// everything tied to this value (dropping it detaches).
    pub pin_dir: Option<PathBuf>,
}

/// What `meshctl status` shows about a loaded program.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProgramStatus {
    /// Program name.
    pub name: String,
    /// Kernel id of the program attached (as `bpftool prog` shows it).
    pub id: u32,
    /// Where it is attached.
    pub attached_to: String,
    /// Calls it has seen.
    pub seen: u64,
    /// Calls whose address it rewrote.
    #[serde(default)]
    pub rewritten: u64,
}

/// How one hook came to be attached.
enum Attachment {
    /// Attached by the object's program (unpinned mode: lives in `Ebpf`).
    Owned,
    /// A pinned link: adopted from a previous run or attached and pinned by this one.
    Pinned(FdLink),
}

/// One attached hook.
struct Hook {
    name: &'static str,
    stats_index: u32,
    program_id: u32,
    attachment: Attachment,
}

/// The loaded and attached socket load balancer.
pub struct SocketLb {
    ebpf: Ebpf,
    cfg: SocketLbConfig,
    hooks: Vec<Hook>,
    adopted: bool,
}

fn ebpf_err(program: &'static str) -> impl Fn(String) -> Error {
    move |message| Error::Ebpf { program, message }
}

impl SocketLb {
    /// Loads the programs and attaches them to `cfg.cgroup`; with a pin directory,
    /// reuses compatible pinned maps and links of a previous run (the data path never
    /// drops), replacing links whose program differs by attach-new-then-detach-old.
    ///
    /// The "any local address" (`0.0.0.0:port`) form will serve only sockets in the
    /// calling thread's network namespace.
    pub fn open(cfg: SocketLbConfig) -> Result<Self> {
        let err = ebpf_err("socket-lb");
        let dir =
            File::open(&cfg.cgroup).map_err(|source| Error::Cgroup { path: cfg.cgroup.clone(), source })?;
        // A pinned link on another cgroup (--cgroup changed) is replaced, not adopted.
        let cgroup_id = std::os::unix::fs::MetadataExt::ino(
            &dir.metadata().map_err(|source| Error::Cgroup { path: cfg.cgroup.clone(), source })?,
        );
        let mut loader = EbpfLoader::new();
        let map_pins: Vec<(&'static str, PathBuf)> = match &cfg.pin_dir {
            Some(pin_dir) => {
                prepare_pin_dir(pin_dir)?;
                let pins =
                    map_specs().into_iter().map(|s| (s.name, pin_dir.join(s.name))).collect::<Vec<_>>();
                for spec in map_specs() {
                    drop_incompatible_map(&pin_dir.join(spec.name), &spec, "socket-lb")?;
                }
                pins
            }
            None => Vec::new(),
        };
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        // The ingress path's maps come with the object; this copy never uses them, and
        // at full size they would lock tens of MiB for nothing.
        for unused in [
            meshd_common::ingress::INGRESS_MAGLEV_MAP,
            meshd_common::ingress::INGRESS_FLOWS_MAP,
            meshd_common::ingress::INGRESS_NAT_MAP,
            meshd_common::ingress::INGRESS_BACKENDS_MAP,
            meshd_common::ingress::INGRESS_FRONTENDS_MAP,
        ] {
            loader.map_max_entries(unused, 1);
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| err(format!("loading the object: {}", chain(&e))))?;
        // Written before any program is attached, so none runs with another namespace's.
        write_config(&mut ebpf)?;
        let mut hooks = Vec::new();
        let mut adopted = false;
        for (name, stats_index) in HOOKS {
            let err = ebpf_err(name);
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| err("missing from the object".into()))?
                .try_into()
                .map_err(|e| err(format!("wrong program type: {e}")))?;
            program.load().map_err(|e| err(format!("the verifier refused it: {}", chain(&e))))?;
            let info = program.info().map_err(|e| err(format!("reading its info: {e}")))?;
            let Some(pin_dir) = &cfg.pin_dir else {
                // Attached as a bpf_link, which always coexists with other programs on
                // the cgroup; the kernel wants the mode flags zero (`Single`) for links.
                program
                    .attach(&dir, CgroupAttachMode::Single)
                    .map_err(|e| err(format!("attaching to {}: {}", cfg.cgroup.display(), chain(&e))))?;
                hooks.push(Hook { name, stats_index, program_id: info.id(), attachment: Attachment::Owned });
                continue;
            };
            let link_pin = pin_dir.join(format!("link_{name}"));
            if let Some((link, old_id)) = adoptable_link(&link_pin, info.tag(), &map_pins, cgroup_id)? {
                // Same program on the same maps: keep the running link, unload ours.
                program.unload().map_err(|e| err(format!("unloading the spare copy: {e}")))?;
                tracing::info!(program = name, id = old_id, "adopted pinned link");
                adopted = true;
                hooks.push(Hook {
                    name,
                    stats_index,
                    program_id: old_id,
                    attachment: Attachment::Pinned(link),
                });
                continue;
            }
            let link_id = program
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|e| err(format!("attaching to {}: {}", cfg.cgroup.display(), chain(&e))))?;
            let link: FdLink = program
                .take_link(link_id)
                .map_err(|e| err(format!("taking the link: {e}")))?
                .try_into()
                .map_err(|e| err(format!("not a bpf_link: {e}")))?;
            // Pin beside the old link, then rename over it: the new program runs before
            // the old one is detached (both rewriting is harmless: the second sees a
            // backend address, not a frontend), and the pin path always names a link.
            let staging = pin_dir.join(format!("link_{name}_new"));
            let _ = std::fs::remove_file(&staging);
            let pinned = link
                .pin(&staging)
                .map_err(|e| err(format!("pinning {}: {}", staging.display(), chain(&e))))?;
            // Held across the rename so the replaced link is detached at once (dropping
            // its last reference would detach it later, from a kernel work queue).
            let replaced = match sys::obj_get(&link_pin) {
                Ok(fd) => Some(fd),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(err(format!("opening the pinned link {}: {e}", link_pin.display()))),
            };
            std::fs::rename(&staging, &link_pin).map_err(|e| {
                err(format!("renaming {} over {}: {e}", staging.display(), link_pin.display()))
            })?;
            if let Some(old) = replaced {
                sys::link_detach(&old).map_err(|e| err(format!("detaching the replaced link: {e}")))?;
            }
            hooks.push(Hook {
                name,
                stats_index,
                program_id: info.id(),
                attachment: Attachment::Pinned(FdLink::from(pinned)),
            });
        }
        tracing::info!(cgroup = %cfg.cgroup.display(), pinned = cfg.pin_dir.is_some(), adopted, "socket load balancer attached");
        Ok(SocketLb { ebpf, cfg, hooks, adopted })
    }

    /// Whether any hook was adopted from pins of a previous run.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &SocketLbConfig {
        &self.cfg
    }

    fn map_state(&self) -> Result<MapState> {
        let err = ebpf_err("socket-lb");
        let services: HashMap<_, FrontendKey, ServiceValue> =
            HashMap::try_from(self.ebpf.map(SERVICES_MAP).ok_or_else(|| err("services map missing".into()))?)
                .map_err(|e| err(format!("services map: {e}")))?;
        let backends: HashMap<_, BackendKey, BackendValue> =
            HashMap::try_from(self.ebpf.map(BACKENDS_MAP).ok_or_else(|| err("backends map missing".into()))?)
                .map_err(|e| err(format!("backends map: {e}")))?;
        let mut state = MapState::default();
        for entry in services.iter() {
            let (k, v) = entry.map_err(|e| err(format!("reading services: {e}")))?;
            state.services.insert(k, v);
        }
        for entry in backends.iter() {
            let (k, v) = entry.map_err(|e| err(format!("reading backends: {e}")))?;
            state.backends.insert(k, v);
        }
        Ok(state)
    }

    /// The frontends and their backends (slot order) the maps hold now — read back
    /// from the kernel, not remembered. A frontend whose slots are incomplete shows the
    /// slots present.
    pub fn observe(&self) -> Result<BTreeMap<Frontend, Vec<Backend>>> {
        let state = self.map_state()?;
        Ok(state
            .services
            .iter()
            .filter_map(|(key, service)| {
                let frontend = Frontend::from_key(key)?;
                let backends = (0..u32::from(service.count))
                    .filter_map(|slot| {
                        state.backends.get(&BackendKey { service_id: service.service_id, slot })
                    })
                    .map(Backend::from_value)
                    .collect();
                Some((frontend, backends))
            })
            .collect())
    }

    /// Makes the maps hold exactly `desired` (frontend → healthy backends, in the
    /// order they take slots), with the fewest writes, in an order that never exposes a
    /// half-written service. Returns the number of writes.
    pub fn apply(&mut self, desired: &BTreeMap<Frontend, Vec<Backend>>) -> Result<usize> {
        check_desired(desired)?;
        let want: BTreeMap<FrontendKey, Vec<BackendValue>> =
            desired.iter().map(|(f, b)| (f.key(), b.iter().map(Backend::value).collect())).collect();
        let writes = plan::plan(&self.map_state()?, &want);
        let err = ebpf_err("socket-lb");
        for write in &writes {
            match *write {
                Write::PutBackend(k, v) => self.backends_mut()?.insert(k, v, 0),
                Write::DeleteBackend(k) => self.backends_mut()?.remove(&k),
                Write::PutService(k, v) => self.services_mut()?.insert(k, v, 0),
                Write::DeleteService(k) => self.services_mut()?.remove(&k),
            }
            .map_err(|e| err(format!("writing {write:?}: {e}")))?;
        }
        Ok(writes.len())
    }

    /// The node's addresses as the map holds them (read back from the kernel), sorted.
    pub fn local_addrs(&self) -> Result<Vec<Ipv4Addr>> {
        let err = ebpf_err("socket-lb");
        let map: HashMap<_, u32, u32> = HashMap::try_from(
            self.ebpf.map(LOCAL_ADDRS_MAP).ok_or_else(|| err("local address map missing".into()))?,
        )
        .map_err(|e| err(format!("local address map: {e}")))?;
        let mut out: Vec<Ipv4Addr> =
            map.keys().filter_map(|k| k.ok()).map(|k| Ipv4Addr::from(ip4_octets(k))).collect();
        out.sort();
        Ok(out)
    }

    /// Sets the node's own addresses, where "any local address" frontends answer
    /// (loopback always does).
    pub fn set_local_addrs(&mut self, addrs: &[Ipv4Addr]) -> Result<()> {
        let err = ebpf_err("socket-lb");
        let mut map: HashMap<_, u32, u32> = HashMap::try_from(
            self.ebpf.map_mut(LOCAL_ADDRS_MAP).ok_or_else(|| err("local address map missing".into()))?,
        )
        .map_err(|e| err(format!("local address map: {e}")))?;
        let want: std::collections::BTreeSet<u32> = addrs.iter().map(|a| ip4_raw(a.octets())).collect();
        if want.len() > MAX_LOCAL_ADDRS as usize {
            return Err(Error::Config {
                setting: "socket-lb local addresses",
                message: format!("{} addresses; at most {MAX_LOCAL_ADDRS} fit the map", want.len()),
            });
        }
        let stale: Vec<u32> = map.keys().filter_map(|k| k.ok()).filter(|k| !want.contains(k)).collect();
        // Stale ones first: a map full of them would refuse the new ones.
        for addr in stale {
            map.remove(&addr).map_err(|e| err(format!("removing a local address: {e}")))?;
        }
        for addr in want {
            map.insert(addr, LOCAL_ADDR_PRESENT, 0)
                .map_err(|e| err(format!("adding a local address: {e}")))?;
        }
        Ok(())
    }

    fn services_mut(&mut self) -> Result<HashMap<&mut MapData, FrontendKey, ServiceValue>> {
        let err = ebpf_err("socket-lb");
        HashMap::try_from(self.ebpf.map_mut(SERVICES_MAP).ok_or_else(|| err("services map missing".into()))?)
            .map_err(|e| err(format!("services map: {e}")))
    }

    fn backends_mut(&mut self) -> Result<HashMap<&mut MapData, BackendKey, BackendValue>> {
        let err = ebpf_err("socket-lb");
        HashMap::try_from(self.ebpf.map_mut(BACKENDS_MAP).ok_or_else(|| err("backends map missing".into()))?)
            .map_err(|e| err(format!("backends map: {e}")))
    }

    /// The attached programs (the id of the program actually attached, adopted or
    /// not) and their counters, `connect4` first.
    pub fn status(&self) -> Result<Vec<ProgramStatus>> {
        let err = ebpf_err("socket-lb");
        let map = self.ebpf.map(SOCK_STATS_MAP).ok_or_else(|| err("stats map missing".into()))?;
        let stats: PerCpuArray<_, SockStats> =
            PerCpuArray::try_from(map).map_err(|e| err(format!("stats map: {e}")))?;
        self.hooks
            .iter()
            .map(|hook| {
                let per_cpu =
                    stats.get(&hook.stats_index, 0).map_err(|e| err(format!("reading stats: {e}")))?;
                let total = SockStats::sum(per_cpu.iter());
                Ok(ProgramStatus {
                    name: hook.name.into(),
                    id: hook.program_id,
                    attached_to: self.cfg.cgroup.display().to_string(),
                    seen: total.seen,
                    rewritten: total.rewritten,
                })
            })
            .collect()
    }

    /// Detaches the programs and removes every pin (meshd `--cleanup`, or a clean stop
    /// with the data path not kept).
    pub fn cleanup(mut self) -> Result<()> {
        // Drop our descriptors first so removing the pins releases the links.
        for hook in self.hooks.drain(..) {
            if let Attachment::Pinned(link) = hook.attachment {
                drop(link);
            }
        }
        match self.cfg.pin_dir.clone() {
            Some(dir) => {
                drop(self);
                cleanup_pins(&dir)
            }
            None => Ok(()),
        }
    }
}

/// Records this thread's network namespace as the one the "any local address" form
/// serves.
fn write_config(ebpf: &mut Ebpf) -> Result<()> {
    let err = ebpf_err("socket-lb");
    let host_netns_cookie = sys::own_netns_cookie().map_err(|e| {
        err(format!(
            "reading this network namespace's cookie (SO_NETNS_COOKIE): {e}; the socket load \
             balancer needs Linux 5.14 or later"
        ))
    })?;
    let mut map: Array<_, LbConfig> =
        Array::try_from(ebpf.map_mut(CONFIG_MAP).ok_or_else(|| err("config map missing".into()))?)
            .map_err(|e| err(format!("config map: {e}")))?;
    map.set(0, LbConfig { host_netns_cookie }, 0).map_err(|e| err(format!("writing the config map: {e}")))
}

/// Refuses a desired state the maps cannot express: too many backends for one
/// frontend, backends on `0.0.0.0:0` (a form that never receives traffic), or a
/// port-0 backend ("keep the port") on a frontend with a fixed port.
pub fn check_desired(desired: &BTreeMap<Frontend, Vec<Backend>>) -> Result<()> {
    if desired.len() > MAX_SERVICES as usize {
        return Err(Error::Config {
            setting: "socket-lb frontends",
            message: format!("{} frontends; at most {MAX_SERVICES} fit the map", desired.len()),
        });
    }
    let slots: usize = desired.values().map(Vec::len).sum();
    if slots > MAX_BACKEND_SLOTS as usize {
        return Err(Error::Config {
            setting: "socket-lb backends",
            message: format!("{slots} backend slots in all; at most {MAX_BACKEND_SLOTS} fit the map"),
        });
    }
    for (frontend, backends) in desired {
        if backends.len() > usize::from(MAX_BACKENDS_PER_SERVICE) {
            return Err(Error::Config {
                setting: "socket-lb backends",
                message: format!(
                    "{frontend:?} has {} backends; at most {MAX_BACKENDS_PER_SERVICE} fit a frontend",
                    backends.len()
                ),
            });
        }
        if frontend.port == 0 && frontend.addr.is_unspecified() && !backends.is_empty() {
            return Err(Error::Config {
                setting: "socket-lb frontend",
                message: format!(
                    "{frontend:?} is 0.0.0.0:0, which no connection ever matches; give the published port"
                ),
            });
        }
        if frontend.port != 0 {
            if let Some(backend) = backends.iter().find(|b| b.port == 0) {
                return Err(Error::Config {
                    setting: "socket-lb backends",
                    message: format!(
                        "{frontend:?} has backend {backend:?} with port 0, which only a wildcard {}:0 \
                         frontend can use; give the backend's port",
                        frontend.addr
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Detaches the links pinned in `pin_dir` (at once, not when the kernel gets to it),
/// removes the pins meshd's socket load balancer and ingress path keep there and the
/// directory itself; a missing directory is fine. Touches only the names they pin.
pub fn cleanup_pins(pin_dir: &Path) -> Result<()> {
    let err = ebpf_err("socket-lb");
    // The ingress path pins into a subdirectory of the node's directory.
    crate::ingress::cleanup_pins(&crate::ingress::pin_dir_in(pin_dir))?;
    let specs = map_specs();
    let names = HOOKS
        .iter()
        .flat_map(|(name, _)| [format!("link_{name}"), format!("link_{name}_new")])
        .chain(specs.iter().map(|s| s.name.to_string()));
    for name in names {
        let path = pin_dir.join(&name);
        if name.starts_with("link_") {
            // Detach now: removing the pin alone detaches later, from a work queue.
            match sys::detach_pinned_link(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(format!("detaching {}: {e}", path.display()))),
            }
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(format!("removing pin {}: {e}", pin_dir.join(&name).display()))),
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(format!("removing {}: {e}; remove what else is pinned there", pin_dir.display()))),
    }
}

/// The shape a pinned map must have to be reused (here and by the ingress path).
pub(crate) struct MapSpec {
    pub(crate) name: &'static str,
    pub(crate) map_type: MapType,
    pub(crate) key_size: u32,
    pub(crate) value_size: u32,
    pub(crate) max_entries: u32,
}

impl MapSpec {
    /// The shape of map `name`, with key and value sizes as `size_of` gives them.
    pub(crate) const fn new(
        name: &'static str,
        map_type: MapType,
        key_size: usize,
        value_size: usize,
        max_entries: u32,
    ) -> MapSpec {
        MapSpec { name, map_type, key_size: key_size as u32, value_size: value_size as u32, max_entries }
    }
}

fn map_specs() -> [MapSpec; 6] {
    use std::mem::size_of;
    let spec = MapSpec::new;
    [
        spec(SOCK_STATS_MAP, MapType::PerCpuArray, 4, size_of::<SockStats>(), STATS_ENTRIES),
        spec(SERVICES_MAP, MapType::Hash, size_of::<FrontendKey>(), size_of::<ServiceValue>(), MAX_SERVICES),
        spec(
            BACKENDS_MAP,
            MapType::Hash,
            size_of::<BackendKey>(),
            size_of::<BackendValue>(),
            MAX_BACKEND_SLOTS,
        ),
        spec(
            REVERSE_MAP,
            MapType::LruHash,
            size_of::<meshd_common::ReverseKey>(),
            size_of::<meshd_common::ReverseValue>(),
            MAX_REVERSE,
        ),
        spec(LOCAL_ADDRS_MAP, MapType::Hash, 4, 4, MAX_LOCAL_ADDRS),
        spec(CONFIG_MAP, MapType::Array, 4, size_of::<LbConfig>(), 1),
    ]
}

/// aya reuses whatever is pinned at a map's path without checking its shape; a map
/// pinned by an older meshd with another layout is removed here so a fresh one is
/// created (control refills it at its next apply).
pub(crate) fn drop_incompatible_map(path: &Path, spec: &MapSpec, program: &'static str) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let compatible = MapInfo::from_pin(path).ok().is_some_and(|info| {
        info.map_type().ok() == Some(spec.map_type)
            && info.key_size() == spec.key_size
            && info.value_size() == spec.value_size
            && info.max_entries() == spec.max_entries
    });
    if !compatible {
        tracing::warn!(map = spec.name, path = %path.display(), program, "pinned map has another layout; replacing it");
        std::fs::remove_file(path).map_err(|e| Error::Ebpf {
            program,
            message: format!("removing incompatible pin {}: {e}", path.display()),
        })?;
    }
    Ok(())
}

/// The pinned link at `path`, if it is attached to cgroup `cgroup_id` and its program
/// has `tag` and uses only the maps pinned in `map_pins`, with the attached program's id.
fn adoptable_link(
    path: &Path,
    tag: u64,
    map_pins: &[(&str, PathBuf)],
    cgroup_id: u64,
) -> Result<Option<(FdLink, u32)>> {
    if !path.exists() {
        return Ok(None);
    }
    match sys::obj_get(path).and_then(|fd| sys::link_cgroup_id(&fd)) {
        Ok(id) if id == cgroup_id => {}
        _ => return Ok(None),
    }
    let Ok(link) = PinnedLink::from_pin(path) else {
        return Ok(None);
    };
    let link = FdLink::from(link);
    let Ok(info) = link.info() else {
        return Ok(None);
    };
    let program_id = info.program_id();
    let Some(program) = loaded_programs().filter_map(|p| p.ok()).find(|p| p.id() == program_id) else {
        return Ok(None);
    };
    let mut want_maps: Vec<u32> =
        map_pins.iter().filter_map(|(_, p)| MapInfo::from_pin(p).ok()).map(|m| m.id()).collect();
    want_maps.sort_unstable();
    let used: Vec<u32> = match program.map_ids() {
        Ok(Some(ids)) => ids,
        _ => return Ok(None),
    };
    let uses_ours = used.iter().all(|id| want_maps.binary_search(id).is_ok());
    Ok((program.tag() == tag && uses_ours).then_some((link, program_id)))
}

/// Makes sure bpffs is mounted at [`BPFFS`] (when `pin_dir` is under it) and creates
/// `pin_dir`.
pub(crate) fn prepare_pin_dir(pin_dir: &Path) -> Result<()> {
    let err = ebpf_err("socket-lb");
    if pin_dir.starts_with(BPFFS) {
        let mounts =
            std::fs::read_to_string("/proc/mounts").map_err(|e| err(format!("reading /proc/mounts: {e}")))?;
        let mounted = mounts.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&BPFFS) && f.get(2) == Some(&"bpf")
        });
        if !mounted {
            // mount(2) directly: no dependency on util-linux being installed.
            nix::mount::mount(Some("bpf"), BPFFS, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
                .map_err(|e| {
                    err(format!("mounting bpffs at {BPFFS}: {e}; mount it (`mount -t bpf bpf {BPFFS}`)"))
                })?;
        }
    }
    std::fs::create_dir_all(pin_dir)
        .map_err(|e| err(format!("creating pin directory {}: {e}", pin_dir.display())))
}

/// An error with its sources, for messages that must say what the kernel said.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        out.push_str(": ");
        out.push_str(&inner.to_string());
        source = inner.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fe(port: u16) -> Frontend {
        Frontend { addr: Ipv4Addr::new(10, 99, 0, 1), port, proto: Proto::Tcp }
    }

    #[test]
    fn desired_states_the_maps_cannot_hold_are_refused() {
        let backend = Backend { addr: Ipv4Addr::new(10, 0, 0, 1), port: 80 };
        let keep_port = Backend { addr: Ipv4Addr::new(10, 0, 0, 1), port: 0 };
        assert!(check_desired(&BTreeMap::from([(fe(80), vec![backend]), (fe(0), vec![])])).is_ok());
        // The wildcard takes backends, with their own port or port 0 (keep the port).
        assert!(check_desired(&BTreeMap::from([(fe(0), vec![keep_port, backend])])).is_ok());
        let fixed =
            check_desired(&BTreeMap::from([(fe(80), vec![backend, keep_port])])).unwrap_err().to_string();
        assert!(fixed.contains("port 0") && fixed.contains("10.99.0.1:0"), "{fixed}");
        let any = Frontend { addr: Ipv4Addr::UNSPECIFIED, port: 0, proto: Proto::Tcp };
        let never = check_desired(&BTreeMap::from([(any, vec![backend])])).unwrap_err().to_string();
        assert!(never.contains("0.0.0.0:0"), "{never}");
        let many = vec![backend; usize::from(MAX_BACKENDS_PER_SERVICE) + 1];
        let too_many = check_desired(&BTreeMap::from([(fe(80), many)])).unwrap_err().to_string();
        assert!(too_many.contains("at most"), "{too_many}");
    }

    #[test]
    fn frontends_and_backends_round_trip_through_map_keys() {
        let frontend = Frontend { addr: Ipv4Addr::new(10, 99, 0, 1), port: 3306, proto: Proto::Udp };
        assert_eq!(Frontend::from_key(&frontend.key()), Some(frontend));
        let backend = Backend { addr: Ipv4Addr::new(10, 0, 0, 7), port: 8080 };
        assert_eq!(Backend::from_value(&backend.value()), backend);
        assert_eq!(frontend.key().proto, PROTO_UDP);
    }
}
