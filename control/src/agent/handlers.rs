//! The local API's handlers: validate a request completely, then change the store in
//! one step (and the dataplane where the caller needs the outcome), so a refused
//! request leaves nothing behind.

use std::{
    collections::HashSet,
    hash::{BuildHasher, Hasher},
    net::Ipv4Addr,
    path::Path,
    time::Instant,
};

use ipnet::Ipv4Net;
use meshd_dataplane::{overlay::TaskLink, proxy::Proto};
use serde_json::{json, Value};

use super::{Agent, ATTACH_WAIT};
use crate::{
    api::Request,
    ipam,
    model::{Endpoint, EndpointMode, Key, Network, Object, PublishedPort, Service, FIRST_VNI},
    reconcile::Op,
    spec::PortSpec,
    Error, Result,
};

/// Checks a user-chosen name: DNS-label-like, so it works as a hostname later.
pub(super) fn check_name(kind: &str, name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
    if name.is_empty()
        || name.len() > 63
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name.chars().all(ok_char)
    {
        return Err(Error::invalid(format!(
            "invalid {kind} name {name:?}: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )));
    }
    Ok(())
}

impl Agent {
    pub(super) async fn handle(&self, request: Request) -> Result<Value> {
        match request {
            Request::NetworkCreate { name, subnet, mtu } => self.network_create(name, &subnet, mtu),
            Request::NetworkLs => Ok(self.network_ls()),
            Request::ServiceCreate { name, network, endpoint_mode } => {
                self.service_create(name, network, endpoint_mode)
            }
            Request::ServiceLs => Ok(self.service_ls()),
            Request::ServicePs { name } => self.service_ps(&name),
            Request::ServiceInspect { name } => self.service_inspect(&name),
            Request::ServiceRm { name } => self.service_rm(&name).await,
            Request::Attach { service, netns, name } => self.attach(&service, &netns, name).await,
            Request::Detach { name } => self.detach(&name).await,
            Request::Publish { spec, service } => self.publish(spec, &service).await,
            Request::Unpublish { published, proto, service } => {
                self.unpublish(published, proto, service).await
            }
            Request::NodeLs => Ok(self.node_ls()),
            Request::KeyRotate => self.key_rotate().await,
            Request::KeyLs => Ok(self.key_ls()),
            Request::Status => Ok(self.status().await),
        }
    }

    fn network_create(&self, name: String, subnet: &str, mtu: Option<u32>) -> Result<Value> {
        check_name("network", &name)?;
        if let Some(mtu) = mtu.filter(|m| !(576..=self.mtu).contains(m)) {
            return Err(Error::invalid(format!(
                "MTU {mtu} for network {name} is out of range: use 576 to {} (this node's underlay MTU minus 50 bytes of VXLAN)",
                self.mtu
            )));
        }
        let subnet: Ipv4Net = subnet.parse().map_err(|_| {
            Error::invalid(format!(
                "invalid subnet {subnet:?} for network {name}: use an IPv4 CIDR such as 10.0.0.0/24"
            ))
        })?;
        if subnet.prefix_len() > 30 {
            return Err(Error::invalid(format!(
                "subnet {subnet} of network {name} is too small: use /30 or larger"
            )));
        }
        let subnet = subnet.trunc();
        let mut gossip = self.gossip();
        let store = gossip.store();
        if store.network(&name).is_some() {
            return Err(Error::invalid(format!("network {name} already exists; pick another name")));
        }
        if let Some(other) =
            store.networks().find(|n| n.subnet.contains(&subnet) || subnet.contains(&n.subnet))
        {
            return Err(Error::invalid(format!(
                "subnet {subnet} overlaps network {} ({}); pick a subnet that does not overlap",
                other.name, other.subnet
            )));
        }
        let used: HashSet<u32> = store.networks().map(|n| n.vni).collect();
        let vni = (FIRST_VNI..).find(|v| !used.contains(v)).expect("VNIs are plentiful");
        let network = Network { name, subnet, vni, mtu };
        gossip.put(Object::Network(network.clone()), self.shared.now());
        drop(gossip);
        self.changed();
        Ok(json!(network))
    }

    fn network_ls(&self) -> Value {
        let gossip = self.gossip();
        let store = gossip.store();
        let rows: Vec<Value> = store
            .networks()
            .map(|n| {
                let tasks = store.endpoints().filter(|e| e.network == n.name && e.service.is_some()).count();
                json!({ "name": n.name, "subnet": n.subnet, "vni": n.vni, "mtu": n.mtu.unwrap_or(self.mtu), "tasks": tasks })
            })
            .collect();
        json!(rows)
    }

    fn service_create(&self, name: String, network: String, endpoint_mode: EndpointMode) -> Result<Value> {
        check_name("service", &name)?;
        let mut gossip = self.gossip();
        let store = gossip.store();
        if store.network(&network).is_none() {
            return Err(Error::invalid(format!(
                "network {network} does not exist; create it with `meshctl network create {network} --subnet CIDR`"
            )));
        }
        if store.service(&name).is_some() {
            return Err(Error::invalid(format!(
                "service {name} already exists; pick another name or `meshctl service rm {name}`"
            )));
        }
        let service = Service { name, network, endpoint_mode };
        gossip.put(Object::Service(service.clone()), self.shared.now());
        drop(gossip);
        self.changed();
        Ok(json!(service))
    }

    fn service_ls(&self) -> Value {
        let gossip = self.gossip();
        let store = gossip.store();
        let rows: Vec<Value> = store
            .services()
            .map(|s| {
                let ports: Vec<String> = store
                    .published()
                    .filter(|p| p.service == s.name)
                    .map(|p| format!("{}:{}/{}", p.published, p.target, p.proto))
                    .collect();
                json!({
                    "name": s.name, "network": s.network, "endpoint_mode": s.endpoint_mode,
                    "tasks": store.tasks_of(&s.name).count(), "published": ports,
                })
            })
            .collect();
        json!(rows)
    }

    fn unknown_service(name: &str) -> Error {
        Error::invalid(format!(
            "service {name} does not exist; list services with `meshctl service ls` or create it with `meshctl service create {name} --network NET`"
        ))
    }

    fn service_ps(&self, name: &str) -> Result<Value> {
        let gossip = self.gossip();
        let store = gossip.store();
        store.service(name).ok_or_else(|| Self::unknown_service(name))?;
        // A task on a dead or departed node is suspended: kept, but not routed to.
        let live = gossip.live_nodes();
        let rows: Vec<Value> = store
            .tasks_of(name)
            .map(|t| {
                let state = if live.contains(&t.node) { "running" } else { "suspended" };
                json!({ "task": t.id, "node": t.node, "ip": t.ip, "mac": t.mac, "vtep": t.vtep, "state": state, "netns": t.netns })
            })
            .collect();
        Ok(json!(rows))
    }

    fn service_inspect(&self, name: &str) -> Result<Value> {
        let tasks = self.service_ps(name)?;
        let gossip = self.gossip();
        let store = gossip.store();
        let service = store.service(name).ok_or_else(|| Self::unknown_service(name))?;
        let ports: Vec<&PublishedPort> = store.published().filter(|p| p.service == name).collect();
        Ok(
            json!({ "service": service, "network": store.network(&service.network), "published": ports, "tasks": tasks }),
        )
    }

    async fn service_rm(&self, name: &str) -> Result<Value> {
        {
            let mut gossip = self.gossip();
            let store = gossip.store();
            store.service(name).ok_or_else(|| Self::unknown_service(name))?;
            let mut keys = vec![Key::service(name)];
            keys.extend(
                store.published().filter(|p| p.service == name).map(|p| Key::published(p.proto, p.published)),
            );
            keys.extend(store.tasks_of(name).map(|t| Key::endpoint(&t.id)));
            let now = self.shared.now();
            for key in &keys {
                gossip.delete(key, now);
            }
        }
        self.changed();
        self.reconcile().await;
        Ok(json!({ "removed": name }))
    }

    async fn attach(&self, service: &str, netns: &str, name: Option<String>) -> Result<Value> {
        let network = {
            let gossip = self.gossip();
            let store = gossip.store();
            let svc = store.service(service).ok_or_else(|| Self::unknown_service(service))?;
            store.network(&svc.network).cloned().ok_or_else(|| {
                Error::invalid(format!(
                    "network {} of service {service} does not exist; recreate it",
                    svc.network
                ))
            })?
        };
        let netns_path = Path::new(netns);
        if !netns_path.exists() {
            return Err(meshd_dataplane::Error::NoNetns { path: netns_path.into() }.into());
        }
        let task = match name {
            Some(task) => task,
            None => format!(
                "{service}.{:06x}",
                std::collections::hash_map::RandomState::new().build_hasher().finish() & 0xff_ffff
            ),
        };
        check_name("task", &task)?;
        let taken = |agent: &Agent| agent.gossip().store().get(&Key::endpoint(&task)).is_some();
        if taken(self) {
            return Err(Error::invalid(format!(
                "task {task} already exists; pick another --name or detach it first"
            )));
        }
        if self
            .gossip()
            .store()
            .endpoints()
            .any(|e| e.netns.as_deref() == Some(netns) && e.node == self.cfg.node_name)
        {
            return Err(Error::invalid(format!("namespace {netns} is already a task; detach it first")));
        }

        self.alloc().wanted.insert(network.name.clone());
        let result = self.attach_on(&network, service, netns, task).await;
        self.alloc().wanted.remove(&network.name);
        result
    }

    async fn attach_on(&self, network: &Network, service: &str, netns: &str, task: String) -> Result<Value> {
        let netns_path = Path::new(netns);
        let deadline = Instant::now() + ATTACH_WAIT;
        let gateway = self.wait_for(deadline, || self.local_overlay_ip(network.vni), || {
            format!("this node's overlay for network {} is not ready after {ATTACH_WAIT:?}; see `meshctl status`", network.name)
        })
        .await?;
        let ip = loop {
            if let Some(ip) = self.allocate(network)? {
                break ip;
            }
            if Instant::now() >= deadline {
                return Err(Error::invalid(format!(
                    "no confirmed address block on network {} after {ATTACH_WAIT:?}; check `meshctl node ls` for unreachable peers",
                    network.name
                )));
            }
            self.changed();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let host_if = format!("mv{:08x}", crate::hash::fnv1a_32(task.as_bytes()));
        let link = TaskLink {
            vni: network.vni,
            netns: netns_path.into(),
            host_if: host_if.clone(),
            ip,
            prefix_len: network.subnet.prefix_len(),
            mac: ipam::mac_for_ip(ip),
            gateway,
            mtu: network.mtu.unwrap_or(self.mtu),
        };
        let plane = self.plane.lock().await;
        let attached = self.overlay.attach_task(&link).await;
        self.alloc().reserved.remove(&ip);
        attached?;
        let endpoint = Endpoint {
            id: task.clone(),
            service: Some(service.to_owned()),
            network: network.name.clone(),
            node: self.cfg.node_name.clone(),
            ip,
            mac: link.mac,
            vtep: self.cfg.advertise_addr,
            host_if: Some(host_if),
            netns: Some(netns.to_owned()),
        };
        self.seen.lock().actual.record(&Op::EnsureTask(link));
        self.write(|g, now| g.put(Object::Endpoint(endpoint.clone()), now));
        drop(plane);
        Ok(json!(endpoint))
    }

    /// This node's address on overlay `vni`, once the overlay is programmed (as last
    /// observed: an overlay not fully wired has MTU 0).
    fn local_overlay_ip(&self, vni: u32) -> Option<Ipv4Addr> {
        self.seen.lock().actual.overlays.get(&vni).filter(|o| o.mtu != 0).map(|o| o.node_ip)
    }

    async fn wait_for<T>(
        &self,
        deadline: Instant,
        mut probe: impl FnMut() -> Option<T>,
        timeout_message: impl FnOnce() -> String,
    ) -> Result<T> {
        loop {
            if let Some(value) = probe() {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                return Err(Error::invalid(timeout_message()));
            }
            self.changed();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn detach(&self, task: &str) -> Result<Value> {
        let endpoint = match self.gossip().store().get(&Key::endpoint(task)) {
            Some(Object::Endpoint(e)) if e.service.is_some() => e.clone(),
            _ => {
                return Err(Error::invalid(format!(
                    "task {task} does not exist; list tasks with `meshctl service ps SERVICE`"
                )))
            }
        };
        if endpoint.node != self.cfg.node_name {
            return Err(Error::invalid(format!(
                "task {task} runs on node {}; run `meshctl detach {task}` there",
                endpoint.node
            )));
        }
        self.write(|g, now| g.delete(&Key::endpoint(task), now));
        self.reconcile().await;
        Ok(json!({ "detached": task }))
    }

    async fn publish(&self, spec: PortSpec, service: &str) -> Result<Value> {
        {
            let gossip = self.gossip();
            let store = gossip.store();
            store.service(service).ok_or_else(|| Self::unknown_service(service))?;
            if let Some(p) =
                store.published().find(|p| p.published == spec.published && p.proto == spec.proto)
            {
                return Err(Error::invalid(format!(
                    "port {}/{} is already published for service {}; unpublish it first (`meshctl unpublish {} {}`)",
                    p.published, p.proto, p.service, p.published, p.service
                )));
            };
        }
        let port = PublishedPort {
            published: spec.published,
            target: spec.target,
            proto: spec.proto,
            service: service.into(),
        };
        // Bind here first: a port held by another process is refused with nothing written.
        let mut plane = self.plane.lock().await;
        plane.proxy.publish(spec.proto, spec.published, Vec::new()).await?;
        self.write(|g, now| g.put(Object::Published(port.clone()), now));
        drop(plane);
        self.reconcile().await;
        Ok(json!(port))
    }

    async fn unpublish(&self, published: u16, proto: Proto, service: Option<String>) -> Result<Value> {
        let key = Key::published(proto, published);
        let port = match self.gossip().store().get(&key) {
            Some(Object::Published(p)) => p.clone(),
            _ => {
                return Err(Error::invalid(format!(
                "port {published}/{proto} is not published; list published ports with `meshctl service ls`"
            )))
            }
        };
        if let Some(service) = service.filter(|s| *s != port.service) {
            return Err(Error::invalid(format!(
                "port {published}/{proto} is published for service {}, not {service}; run `meshctl unpublish {published} {}`",
                port.service, port.service
            )));
        }
        self.write(|g, now| g.delete(&key, now));
        self.reconcile().await;
        Ok(json!(port))
    }

    fn node_ls(&self) -> Value {
        let gossip = self.gossip();
        let now = self.shared.now();
        let vteps: std::collections::HashMap<&str, Ipv4Addr> =
            gossip.store().nodes().map(|n| (n.name.as_str(), n.addr)).collect();
        let mut rows = vec![json!({
            "name": gossip.name(), "addr": self.cfg.advertise_addr, "state": "self",
            "incarnation": gossip.incarnation(), "changed_secs_ago": Value::Null,
        })];
        rows.extend(gossip.members().map(|m| {
            let secs = (now.saturating_sub(m.since) as f64 / 100.0).round() / 10.0;
            json!({
                "name": m.name,
                "addr": vteps.get(m.name.as_str()).copied().unwrap_or_else(|| match m.addr.ip() {
                    std::net::IpAddr::V4(v4) => v4,
                    std::net::IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
                }),
                "state": m.state,
                "incarnation": m.incarnation,
                "changed_secs_ago": secs,
            })
        }));
        json!(rows)
    }

    async fn status(&self) -> Value {
        let (networks, services, endpoints, members, incarnation, health) = {
            let gossip = self.gossip();
            let s = gossip.store();
            (
                s.networks().count(),
                s.services().count(),
                s.endpoints().filter(|e| e.service.is_some()).count(),
                gossip.members().filter(|m| m.state == crate::gossip::MemberState::Alive).count() + 1,
                gossip.incarnation(),
                gossip.health(),
            )
        };
        let seen = self.seen.lock();
        let mut served: Vec<String> =
            seen.actual.listeners.keys().map(|(proto, port)| format!("{port}/{proto}")).collect();
        served.sort();
        json!({
            "node": self.cfg.node_name,
            "advertise_addr": self.cfg.advertise_addr,
            "control_port": self.cfg.control_port,
            "uptime_secs": self.shared.started.elapsed().as_secs(),
            "overlay_mtu": self.mtu,
            "ebpf": self.programs_status(),
            "networks": networks,
            "services": services,
            "tasks": endpoints,
            "local_tasks": seen.actual.local_tasks.len(),
            "overlays": seen.actual.overlays.len(),
            "overlay_peers": seen.actual.peers.len(),
            "published_ports": served,
            "gossip": {
                "alive_members": members,
                "incarnation": incarnation,
                "local_health": health,
                "keys": self.shared.keyring.read().keys.len(),
                "counters": self.shared.counters.snapshot(),
            },
            "errors": seen.errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_label_like() {
        assert!(check_name("service", "mvcapp").is_ok());
        assert!(check_name("task", "mvcapp.1").is_ok());
        for bad in ["", "-x", "a b", "x/y", &"a".repeat(64)] {
            let err = check_name("service", bad).unwrap_err().to_string();
            assert!(err.starts_with("invalid service name"), "{err}");
        }
    }
}
