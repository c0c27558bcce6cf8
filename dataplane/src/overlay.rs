//! Kernel VXLAN overlays. Per network a node has a bridge `mbr<VNI>` carrying the
//! node's own overlay address, a VXLAN device `mvx<VNI>` (UDP 4789, learning off, ARP
//! proxy on) enslaved to it, one static FDB entry (MAC → remote VTEP) and one
//! permanent neighbour entry (IP → MAC) per remote endpoint: no flooding, no multicast.
//! A task is a veth pair: `mv<hash>` on the bridge, `eth0` in the task's namespace.
//!
//! The changes go through iproute2 (`ip`, `bridge`) and `nsenter`: the commands every
//! operator already reads, with exact error messages. This module only executes what
//! it is told; which entries should exist is decided by the control crate.

use std::{
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    str::FromStr,
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::process::Command;

use crate::{Error, Result};

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

/// Priority of the policy-routing rules that isolate networks from each other.
const ISOLATION_PRIORITY: &str = "1000";

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

/// Name of the bridge of network `vni`.
pub fn bridge_name(vni: u32) -> String {
    format!("mbr{vni}")
}

/// Name of the VXLAN device of network `vni`.
pub fn vxlan_name(vni: u32) -> String {
    format!("mvx{vni}")
}

/// Kernel VXLAN overlays on this node.
#[derive(Clone, Debug)]
pub struct KernelVxlan {
    /// This node's underlay address: source of its VXLAN packets.
    pub local_vtep: Ipv4Addr,
}

impl KernelVxlan {
    /// Creates (or completes) the bridge and VXLAN device of a network. Idempotent.
    pub async fn ensure_network(&self, spec: &OverlaySpec) -> Result<()> {
        let (br, vx) = (bridge_name(spec.vni), vxlan_name(spec.vni));
        let (mtu, vni, mac) = (spec.mtu.to_string(), spec.vni.to_string(), spec.node_mac.to_string());
        let port = VXLAN_PORT.to_string();
        let local = self.local_vtep.to_string();
        if !link_exists(&br).await? {
            run("ip", &["link", "add", &br, "type", "bridge"]).await?;
        }
        run("ip", &["link", "set", &br, "address", &mac, "mtu", &mtu]).await?;
        if !link_exists(&vx).await? {
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &vx,
                    "type",
                    "vxlan",
                    "id",
                    &vni,
                    "local",
                    &local,
                    "dstport",
                    &port,
                    "nolearning",
                    "proxy",
                ],
            )
            .await?;
        }
        run("ip", &["link", "set", &vx, "mtu", &mtu, "master", &br, "up"]).await?;
        let addr = format!("{}/{}", spec.node_ip, spec.prefix_len);
        run("ip", &["addr", "replace", &addr, "dev", &br]).await?;
        run("ip", &["link", "set", &br, "up"]).await
    }

    /// Removes a network's bridge and VXLAN device (their entries go with them).
    pub async fn remove_network(&self, vni: u32) -> Result<()> {
        for link in [vxlan_name(vni), bridge_name(vni)] {
            if link_exists(&link).await? {
                run("ip", &["link", "del", &link]).await?;
            }
        }
        Ok(())
    }

    /// Keeps traffic from `from` (one overlay network's subnet) out of `to` (another's),
    /// even where the node forwards packets between its bridges: a policy-routing rule
    /// answers such packets with ICMP "prohibited". Idempotent.
    pub async fn isolate(&self, from: Ipv4Net, to: Ipv4Net) -> Result<()> {
        let (from, to) = (from.to_string(), to.to_string());
        let rule = ["from", from.as_str(), "to", to.as_str(), "priority", ISOLATION_PRIORITY, "prohibit"];
        // `ip rule add` would add a duplicate; remove any previous copy first.
        let _ = run("ip", &[&["rule", "del"][..], &rule].concat()).await;
        run("ip", &[&["rule", "add"][..], &rule].concat()).await
    }

    /// Removes an isolation rule.
    pub async fn unisolate(&self, from: Ipv4Net, to: Ipv4Net) -> Result<()> {
        let (from, to) = (from.to_string(), to.to_string());
        let rule = ["from", from.as_str(), "to", to.as_str(), "priority", ISOLATION_PRIORITY, "prohibit"];
        run_absent_ok("ip", &[&["rule", "del"][..], &rule].concat()).await
    }

    /// Programs the FDB and neighbour entries that reach a remote endpoint.
    pub async fn add_peer(&self, peer: &PeerSpec) -> Result<()> {
        let vx = vxlan_name(peer.vni);
        let (mac, ip, vtep) = (peer.mac.to_string(), peer.ip.to_string(), peer.vtep.to_string());
        run("bridge", &["fdb", "replace", &mac, "dev", &vx, "dst", &vtep, "self", "permanent"]).await?;
        run("ip", &["neigh", "replace", &ip, "lladdr", &mac, "dev", &vx, "nud", "permanent"]).await
    }

    /// Removes a remote endpoint's entries.
    pub async fn remove_peer(&self, peer: &PeerSpec) -> Result<()> {
        let vx = vxlan_name(peer.vni);
        let (mac, ip, vtep) = (peer.mac.to_string(), peer.ip.to_string(), peer.vtep.to_string());
        // Either entry may be gone already (the device was removed, or a restart); the
        // goal is that they do not exist, so "not found" is success.
        run_absent_ok("bridge", &["fdb", "del", &mac, "dev", &vx, "dst", &vtep, "self"]).await?;
        run_absent_ok("ip", &["neigh", "del", &ip, "dev", &vx]).await
    }

    /// Creates a task's interface inside its namespace and plugs it into the bridge;
    /// an interface that exists already is left as it is. On failure nothing is left
    /// behind.
    pub async fn attach_task(&self, task: &TaskLink) -> Result<()> {
        if !task.netns.exists() {
            return Err(Error::NoNetns { path: task.netns.clone() });
        }
        if link_exists(&task.host_if).await? {
            return Ok(());
        }
        let result = self.try_attach_task(task).await;
        if result.is_err() {
            let _ = self.detach_task(&task.host_if).await;
        }
        result
    }

    async fn try_attach_task(&self, task: &TaskLink) -> Result<()> {
        let peer = format!("{}p", task.host_if);
        let mtu = task.mtu.to_string();
        let netns = task.netns.to_string_lossy();
        run("ip", &["link", "add", &task.host_if, "mtu", &mtu, "type", "veth", "peer", "name", &peer])
            .await?;
        run("ip", &["link", "set", &peer, "netns", &netns]).await?;
        let mac = task.mac.to_string();
        let addr = format!("{}/{}", task.ip, task.prefix_len);
        let gateway = task.gateway.to_string();
        in_netns(
            &task.netns,
            &["ip", "link", "set", &peer, "name", "eth0", "address", &mac, "mtu", &mtu, "up"],
        )
        .await?;
        in_netns(&task.netns, &["ip", "addr", "add", &addr, "dev", "eth0"]).await?;
        in_netns(&task.netns, &["ip", "link", "set", "lo", "up"]).await?;
        in_netns(&task.netns, &["ip", "route", "replace", "default", "via", &gateway, "dev", "eth0"]).await?;
        run("ip", &["link", "set", &task.host_if, "master", &bridge_name(task.vni), "up"]).await
    }

    /// Removes a task's interface (its peer inside the namespace goes with it).
    pub async fn detach_task(&self, host_if: &str) -> Result<()> {
        if link_exists(host_if).await? {
            run("ip", &["link", "del", host_if]).await?;
        }
        Ok(())
    }
}

/// The MTU of the interface that holds `addr`, the node's underlay address.
pub async fn underlay_mtu(addr: Ipv4Addr) -> Result<u32> {
    let out = output("ip", &["-o", "addr", "show", "to", &addr.to_string()]).await?;
    let dev = out
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| Error::Netlink {
            command: format!("ip -o addr show to {addr}"),
            stderr: format!("no interface has {addr}; pass this node's own address as --advertise-addr"),
        })?
        .to_owned();
    // Ask the link rather than /sys: /sys may be mounted for another namespace.
    let out = output("ip", &["-o", "link", "show", "dev", &dev]).await?;
    let mtu = out.split_whitespace().skip_while(|w| *w != "mtu").nth(1).and_then(|m| m.parse().ok());
    Ok(mtu.unwrap_or(1500))
}

async fn link_exists(name: &str) -> Result<bool> {
    let status = Command::new("ip")
        .args(["link", "show", "dev", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .map_err(|source| Error::Spawn { program: "ip".into(), source })?;
    Ok(status.success())
}

async fn in_netns(netns: &Path, args: &[&str]) -> Result<()> {
    let net = format!("--net={}", netns.display());
    let mut full = vec![net.as_str(), "--"];
    full.extend_from_slice(args);
    run("nsenter", &full).await
}

async fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|source| Error::Spawn { program: program.into(), source })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Netlink {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

async fn run(program: &str, args: &[&str]) -> Result<()> {
    tracing::debug!("{program} {}", args.join(" "));
    output(program, args).await.map(drop)
}

async fn run_absent_ok(program: &str, args: &[&str]) -> Result<()> {
    match run(program, args).await {
        Err(Error::Netlink { stderr, .. })
            if stderr.contains("No such file")
                || stderr.contains("Cannot find device")
                || stderr.contains("not found") =>
        {
            Ok(())
        }
        other => other,
    }
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
