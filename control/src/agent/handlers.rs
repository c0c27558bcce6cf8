//! The local API's handlers: validate a request completely, then change the store in
//! one step (and the dataplane where the caller needs the outcome), so a refused
//! request leaves nothing behind.

use std::{
    collections::{BTreeMap, HashSet},
    hash::{BuildHasher, Hasher},
    net::Ipv4Addr,
    path::Path,
    time::Instant,
};

use ipnet::Ipv4Net;
use meshd_dataplane::{overlay::TaskLink, proxy::Proto, socklb::Frontend};
use serde_json::{json, Value};

use super::{Agent, ATTACH_WAIT};

/// How a published port is served (`meshctl publish --mode --lb --proxy-protocol`).
struct PublishOptions {
    mode: PublishMode,
    lb: LbPolicy,
    proxy_protocol: bool,
    max_connections: u32,
}

/// How long a command waits for every alive node to confirm what it reports.
pub const CONFIRM_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
use crate::{
    api::Request,
    ipam,
    model::{
        Availability, Endpoint, EndpointMode, HealthCheck, Key, LbPolicy, Network, NodeState, Object,
        PublishMode, PublishedPort, Service, FIRST_VNI,
    },
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
            Request::NetworkCreate { name, subnet, mtu } => self.network_create(name, &subnet, mtu).await,
            Request::NetworkLs => Ok(self.network_ls()),
            Request::ServiceCreate { name, network, endpoint_mode, health_check } => {
                self.service_create(name, network, endpoint_mode, health_check).await
            }
            Request::ServiceUpdate { name, health_check } => self.service_update(&name, health_check).await,
            Request::ServiceLs => Ok(self.service_ls()),
            Request::ServicePs { name } => self.service_ps(&name),
            Request::ServiceInspect { name } => self.service_inspect(&name),
            Request::ServiceRm { name } => self.service_rm(&name).await,
            Request::Attach { service, netns, name, ip } => self.attach(&service, &netns, name, ip).await,
            Request::Detach { name, grace_ms } => self.detach(&name, grace_ms.unwrap_or(0)).await,
            Request::Publish { spec, service, detach, mode, lb, proxy_protocol, max_connections } => {
                let options = PublishOptions { mode, lb, proxy_protocol, max_connections };
                self.publish(spec, &service, detach, options).await
            }
            Request::Unpublish { published, proto, service, grace_ms } => {
                self.unpublish(published, proto, service, grace_ms.unwrap_or(0)).await
            }
            Request::NodeLs => Ok(self.node_ls()),
            Request::NodeAvailability { name, availability } => {
                self.node_availability(&name, availability).await
            }
            Request::KeyRotate => self.key_rotate().await,
            Request::KeyLs => Ok(self.key_ls()),
            Request::KeyInstall { keys } => self.key_install(&keys.0),
            Request::Status => Ok(self.status().await),
        }
    }

    async fn network_create(&self, name: String, subnet: &str, mtu: Option<u32>) -> Result<Value> {
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
        let network = self.put_network(name, subnet, mtu)?;
        self.known_everywhere(format!("network {}", network.name), json!(network)).await
    }

    /// After a create: waits until every alive node holds the same catalog, and returns
    /// `created` with how many nodes that is (`known_to`).
    async fn known_everywhere(&self, what: String, mut created: Value) -> Result<Value> {
        self.changed();
        let nodes = self
            .wait_for_catalog(|missing| {
                format!(
                    "{what} was created, but after {CONFIRM_WAIT:?} {missing} do not know it yet; check `meshctl node ls`"
                )
            })
            .await?;
        created["known_to"] = json!(nodes);
        Ok(created)
    }

    /// Writes a new network after checking its name and subnet against the others.
    fn put_network(&self, name: String, subnet: Ipv4Net, mtu: Option<u32>) -> Result<Network> {
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
        Ok(network)
    }

    fn network_ls(&self) -> Value {
        let gossip = self.gossip();
        let store = gossip.store();
        let rows: Vec<Value> = store
            .networks()
            .map(|n| {
                let tasks = store.endpoints().filter(|e| e.network == n.name && e.service.is_some()).count();
                // Addresses nobody claims (node addresses, tasks and spares all hold one).
                let claimed = store
                    .claims()
                    .filter(|c| c.network == n.name && ipam::is_usable(n.subnet, c.index))
                    .count() as u32;
                let free = ipam::usable(n.subnet).saturating_sub(claimed);
                json!({ "name": n.name, "subnet": n.subnet, "vni": n.vni, "mtu": n.mtu.unwrap_or(self.mtu), "tasks": tasks, "free": free })
            })
            .collect();
        json!(rows)
    }

    async fn service_create(
        &self,
        name: String,
        network: String,
        endpoint_mode: EndpointMode,
        health_check: Option<HealthCheck>,
    ) -> Result<Value> {
        check_name("service", &name)?;
        let net = self.check_new_service(&name, &network)?;
        // A VIP comes from this node's settled claims like a task address (usually its
        // spare, so no wait); a dnsrr service has none: its name resolves to tasks.
        let vip = match endpoint_mode {
            EndpointMode::Vip => Some(self.allocate_until(&net, None, Instant::now() + ATTACH_WAIT).await?),
            EndpointMode::Dnsrr => None,
        };
        let put = self.put_service(Service { name, network, endpoint_mode, vip, health_check });
        if let Some(ip) = vip {
            self.alloc().reserved.remove(&ip);
        }
        let service = put?;
        self.known_everywhere(format!("service {}", service.name), json!(service)).await
    }

    /// Checks that service `name` may be created on `network`; returns the network.
    fn check_new_service(&self, name: &str, network: &str) -> Result<Network> {
        let gossip = self.gossip();
        let store = gossip.store();
        if store.service(name).is_some() {
            return Err(Error::invalid(format!(
                "service {name} already exists; pick another name or `meshctl service rm {name}`"
            )));
        }
        store.network(network).cloned().ok_or_else(|| {
            Error::invalid(format!(
                "network {network} does not exist; create it with `meshctl network create {network} --subnet CIDR`"
            ))
        })
    }

    /// Writes a new service after checking its network and name again (the VIP
    /// allocation may have waited).
    fn put_service(&self, service: Service) -> Result<Service> {
        self.check_new_service(&service.name, &service.network)?;
        self.write(|g, now| g.put(Object::Service(service.clone()), now));
        Ok(service)
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
                    .map(|p| format!("{}:{}/{} ({})", p.published, p.target, p.proto, p.mode))
                    .collect();
                json!({
                    "name": s.name, "network": s.network, "endpoint_mode": s.endpoint_mode,
                    "vip": s.vip.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
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
                let state = match (live.contains(&t.node), t.draining) {
                    (false, _) => "suspended",
                    (true, true) => "draining",
                    (true, false) => "running",
                };
                json!({ "task": t.id, "node": t.node, "ip": t.ip, "mac": t.mac, "vtep": t.vtep, "state": state, "health": t.health, "netns": t.netns })
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
        let network = store.network(&service.network).cloned();
        let service = service.clone();
        let ports: Vec<PublishedPort> = ports.into_iter().cloned().collect();
        drop(gossip);
        // The same per-port view as `meshctl status`: which path serves it, in which mode.
        let paths: Vec<Value> =
            self.serving_paths().1.into_iter().filter(|p| p["service"] == json!(name)).collect();
        Ok(json!({
            "service": service, "network": network, "published": ports, "published_paths": paths,
            "tasks": tasks,
        }))
    }

    /// `service update`: replaces the service's health check; returns once every
    /// alive node holds the new catalog.
    async fn service_update(&self, name: &str, health_check: Option<HealthCheck>) -> Result<Value> {
        let updated = {
            let gossip = self.gossip();
            let service = gossip.store().service(name).ok_or_else(|| Self::unknown_service(name))?;
            Service { health_check, ..service.clone() }
        };
        self.write(|g, now| g.put(Object::Service(updated.clone()), now));
        self.known_everywhere(format!("service {name}"), json!(updated)).await
    }

    async fn service_rm(&self, name: &str) -> Result<Value> {
        {
            let mut gossip = self.gossip();
            let store = gossip.store();
            let service = store.service(name).ok_or_else(|| Self::unknown_service(name))?;
            let mut keys = vec![Key::service(name)];
            // The VIP's claim goes with it: the address is free for anyone again.
            let vip_index = service.vip.and_then(|vip| {
                let net = store.network(&service.network)?;
                Some(Key::block(&net.name, ipam::index_of(net.subnet, vip)?))
            });
            keys.extend(vip_index);
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

    async fn attach(
        &self,
        service: &str,
        netns: &str,
        name: Option<String>,
        ip: Option<Ipv4Addr>,
    ) -> Result<Value> {
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
        if let Some(ip) = ip {
            self.check_requested_ip(&network, ip)?;
        }

        self.alloc().wanted.insert(network.name.clone());
        let result = self.attach_on(&network, service, netns, task, ip).await;
        self.alloc().wanted.remove(&network.name);
        let mut reply = result?;
        self.report_resolver(netns, &mut reply).await;
        Ok(reply)
    }

    async fn attach_on(
        &self,
        network: &Network,
        service: &str,
        netns: &str,
        task: String,
        requested: Option<Ipv4Addr>,
    ) -> Result<Value> {
        let netns_path = Path::new(netns);
        let deadline = Instant::now() + ATTACH_WAIT;
        let gateway = self
            .wait_for(
                deadline,
                || self.local_overlay_ip(network.vni),
                || match self.alloc().errors.get(&network.name) {
                    // This node could not get its own address there: say why.
                    Some(why) => why.clone(),
                    None => format!(
                        "this node's overlay for network {} is not ready after {ATTACH_WAIT:?}; see `meshctl status`",
                        network.name
                    ),
                },
            )
            .await?;
        // One nudge (see `wait_for`); a claim made below wakes the reconciler itself.
        self.changed();
        let ip = self.allocate_until(network, requested, deadline).await?;
        let host_if = super::addresses::task_host_if(&task, ip);
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
            health: Default::default(),
            draining: false,
        };
        self.seen.lock().actual.record(&Op::EnsureTask(link));
        self.write(|g, now| g.put(Object::Endpoint(endpoint.clone()), now));
        drop(plane);
        Ok(json!(endpoint))
    }

    /// Reserves an address on `network` (the `requested` one, or any) from a settled
    /// claim of this node's, waiting for a claim to settle until `deadline`. The caller
    /// removes it from `reserved` once it is in the store (or given up).
    async fn allocate_until(
        &self,
        network: &Network,
        requested: Option<Ipv4Addr>,
        deadline: Instant,
    ) -> Result<Ipv4Addr> {
        loop {
            let allocated = match requested {
                Some(ip) => self.allocate_exact(network, ip),
                None => self.allocate(network),
            };
            if let Some(ip) = allocated? {
                return Ok(ip);
            }
            if Instant::now() >= deadline {
                return Err(Error::invalid(format!(
                    "no settled address claim on network {} after {ATTACH_WAIT:?}: the subnet is nearly full or peers are unreachable; check `meshctl network ls` and `meshctl node ls`",
                    network.name
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
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
        // One nudge: the reconciler runs after it, and every store change (a local
        // write, a gossip merge, a claim settling) wakes it again, with its 1 s period
        // behind that. Nudging on every poll ran a full reconcile and a store save 50
        // times a second while a command waited.
        self.changed();
        loop {
            if let Some(value) = probe() {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                return Err(Error::invalid(timeout_message()));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn detach(&self, task: &str, grace_ms: u64) -> Result<Value> {
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
        let mut reply = json!({ "detached": task, "grace_ms": grace_ms });
        if grace_ms > 0 {
            self.drain_task(&endpoint, grace_ms, &mut reply).await?;
        }
        self.write(|g, now| g.delete(&Key::endpoint(task), now));
        self.reconcile().await;
        Ok(reply)
    }

    /// `detach --grace`: marks `endpoint` draining, waits until every alive node
    /// confirms it sends it no new connection, then until the task's established TCP
    /// connections finish or `grace_ms` pass. Writes what it saw into `reply`.
    async fn drain_task(&self, endpoint: &Endpoint, grace_ms: u64, reply: &mut Value) -> Result<()> {
        let task = endpoint.id.as_str();
        if !endpoint.draining {
            let draining = Endpoint { draining: true, ..endpoint.clone() };
            self.write(|g, now| g.put(Object::Endpoint(draining), now));
        }
        let started = Instant::now();
        // Only nodes on its network know it (and can send to it).
        let participants = participants(self.gossip().store(), &endpoint.network);
        let nodes = self
            .wait_for_nodes(
                |state, _| {
                    !participants.contains(&state.node) || state.out_of_rotation.iter().any(|t| t == task)
                },
                |missing| {
                    format!(
                        "task {task} is draining, but after {CONFIRM_WAIT:?} {missing} have not confirmed they stopped sending it new connections; it is kept: run `meshctl detach {task}` again (or with --grace 0 to remove it at once)"
                    )
                },
            )
            .await?;
        reply["out_of_rotation_on"] = json!(nodes);
        reply["out_of_rotation_ms"] = json!(started.elapsed().as_millis() as u64);
        let Some(netns) = endpoint.netns.clone() else { return Ok(()) };
        let deadline = Instant::now() + std::time::Duration::from_millis(grace_ms);
        let mut first = None;
        let left = loop {
            let path = std::path::PathBuf::from(&netns);
            let count = tokio::task::spawn_blocking(move || established_in(&path))
                .await
                .map_err(|e| Error::invalid(format!("counting the connections of task {task}: {e}")))?;
            // A namespace that went away holds no connection.
            let count = count.unwrap_or(0);
            first.get_or_insert(count);
            self.seen.lock().draining.insert(task.to_owned(), count);
            if count == 0 || Instant::now() >= deadline {
                break count;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        self.seen.lock().draining.remove(task);
        reply["connections_at_drain"] = json!(first.unwrap_or(0));
        reply["connections_left"] = json!(left);
        reply["drained_ms"] = json!(started.elapsed().as_millis() as u64);
        Ok(())
    }

    /// `node drain|activate NODE`: writes the node's availability, then waits until
    /// every alive node confirms its tasks left (or rejoined) rotation.
    async fn node_availability(&self, name: &str, availability: Availability) -> Result<Value> {
        let (tasks, draining, networks): (Vec<(String, String)>, Vec<String>, Participants) = {
            let mut gossip = self.gossip();
            let node = gossip.store().node(name).cloned().ok_or_else(|| {
                Error::invalid(format!("node {name} does not exist; list nodes with `meshctl node ls`"))
            })?;
            let store = gossip.store();
            let on_node = || store.endpoints().filter(|e| e.node == name && e.service.is_some());
            let tasks: Vec<(String, String)> = on_node().map(|e| (e.id.clone(), e.network.clone())).collect();
            // Tasks draining themselves (`detach --grace` under way) stay out after `activate`.
            let draining = on_node().filter(|e| e.draining).map(|e| e.id.clone()).collect();
            // Only nodes on a task's network know it (and can send to it).
            let networks = tasks.iter().map(|(_, n)| (n.clone(), participants(store, n))).collect();
            if node.availability != availability {
                gossip.put(Object::Node(crate::model::Node { availability, ..node }), self.shared.now());
            }
            (tasks, draining, networks)
        };
        self.changed();
        let drain = availability == Availability::Drain;
        // The gossip lock is held while this runs: it reads only what it is given.
        let nodes = self
            .wait_for_nodes(
                |state, _| {
                    tasks.iter().all(|(t, net)| {
                        !networks[net].contains(&state.node)
                            || state.out_of_rotation.contains(t) == (drain || draining.contains(t))
                    })
                },
                |missing| {
                    format!(
                        "node {name} is now {}, but after {CONFIRM_WAIT:?} {missing} have not applied it yet; see `meshctl status` there",
                        if drain { "drained" } else { "active" }
                    )
                },
            )
            .await?;
        Ok(json!({ "node": name, "availability": availability, "tasks": tasks.len(), "confirmed_by": nodes }))
    }

    async fn publish(
        &self,
        spec: PortSpec,
        service: &str,
        detach: bool,
        options: PublishOptions,
    ) -> Result<Value> {
        let PublishOptions { mode, lb, proxy_protocol, max_connections } = options;
        // Publishing the same port, target and mode for the same service again changes
        // its policy in place (nothing to bind; connections keep their tasks); anything
        // else on a taken port is refused (a mode change would break the kernel path's
        // flows: unpublish first).
        let update = {
            let gossip = self.gossip();
            let store = gossip.store();
            store.service(service).ok_or_else(|| Self::unknown_service(service))?;
            let taken = store.published().find(|p| p.published == spec.published && p.proto == spec.proto);
            match taken {
                Some(p) if p.closing_at.is_some() => {
                    return Err(Error::invalid(format!(
                        "port {}/{} is being unpublished (its open connections may finish for a while); publish it again once that is done, or end it now with `meshctl unpublish {} --grace 0`",
                        p.published, p.proto, p.published
                    )))
                }
                Some(p)
                    if p.service == service
                        && p.target == spec.target
                        && p.mode == mode
                        && p.proxy_protocol == proxy_protocol
                        // A limit may change in place; adding or removing one moves
                        // the port between the kernel paths and the proxy.
                        && (p.max_connections > 0) == (max_connections > 0) =>
                {
                    true
                }
                Some(p) => {
                    return Err(Error::invalid(format!(
                        "port {}/{} is already published for service {}; unpublish it first (`meshctl unpublish {} {}`)",
                        p.published, p.proto, p.service, p.published, p.service
                    )))
                }
                None => false,
            }
        };
        let port = PublishedPort {
            published: spec.published,
            target: spec.target,
            proto: spec.proto,
            service: service.into(),
            mode,
            lb,
            proxy_protocol,
            max_connections,
            closing_at: None,
        };
        // What a node that cannot bind the port (another process holds it there) makes
        // the publish fail with; the publish is then rolled back: nothing stays published.
        let conflict = |node: &str, problem: &dyn std::fmt::Display| {
            format!(
                "cannot publish {}:{}/{} for service {}: on node {node}, {problem}; nothing was published",
                port.published, port.target, port.proto, port.service
            )
        };
        // Bind here first: a port held by another process here is refused with nothing
        // written.
        let mut plane = self.plane.lock().await;
        if !update {
            if let Err(error) = plane.proxy.publish(spec.proto, spec.published, Vec::new()).await {
                return Err(Error::invalid(conflict(&self.cfg.node_name, &error)));
            }
        }
        self.write(|g, now| g.put(Object::Published(port.clone()), now));
        drop(plane);
        self.reconcile().await;
        if detach {
            return Ok(json!({ "port": port, "detached": true }));
        }
        // Done when every alive node serves it (with a task, if any is running): a
        // script may use any node next. This node may not know the service's tasks yet
        // (task tables reach only the nodes taking part in their network, and it may
        // have joined just now), but a node hosting a task knows it and reports the
        // port served as soon as it listens. So: first every node listens; then, if any
        // node serves it (or this node knows a running task), every node must serve it.
        let served = format!("{}/{}", port.published, port.proto);
        let not_served = |missing: String| {
            format!(
                "published {}:{}/{} for service {}, but after {CONFIRM_WAIT:?} it is not served on {missing}; see `meshctl status` there",
                port.published, port.target, port.proto, port.service
            )
        };
        // Another node that cannot bind the port fails the publish at once.
        let problem_key = format!("published port {served}: ");
        let conflicted = std::sync::atomic::AtomicBool::new(false);
        let refused = |node: &str, state: &NodeState| {
            let problem = state.problems.iter().find_map(|p| p.strip_prefix(problem_key.as_str()))?;
            conflicted.store(true, std::sync::atomic::Ordering::Relaxed);
            Some(conflict(node, &problem))
        };
        let listening = self
            .wait_for_nodes_unless(|state, _| state.listening.contains(&served), refused, not_served)
            .await;
        let nodes = match listening {
            Ok(nodes) => nodes,
            Err(error) if conflicted.load(std::sync::atomic::Ordering::Relaxed) && !update => {
                self.write(|g, now| g.delete(&Key::published(port.proto, port.published), now));
                self.reconcile().await;
                return Err(error);
            }
            Err(error) => return Err(error),
        };
        let has_tasks = {
            let gossip = self.gossip();
            let live = gossip.live_nodes();
            let store = gossip.store();
            store.tasks_of(service).any(|t| live.contains(&t.node))
                || live.iter().filter_map(|n| store.node_state(n)).any(|s| s.serving.contains(&served))
        };
        let nodes = if has_tasks {
            self.wait_for_nodes(|state, _| state.serving.contains(&served), not_served).await?
        } else {
            nodes
        };
        Ok(json!({ "port": port, "detached": false, "served_on": nodes, "has_tasks": has_tasks }))
    }

    /// Waits until every alive node holds the networks, services and published ports
    /// this node holds (the same catalog digest); returns how many nodes that is.
    async fn wait_for_catalog(&self, timeout_message: impl FnOnce(String) -> String) -> Result<usize> {
        self.wait_for_nodes(|state, mine| state.catalog == mine, timeout_message).await
    }

    /// Waits until `confirmed(state, this node's catalog digest)` holds for the
    /// confirmation of every alive node (this one included); returns how many nodes
    /// that is. After [`CONFIRM_WAIT`] fails with `timeout_message(the missing nodes,
    /// with the problems they report)`.
    async fn wait_for_nodes(
        &self,
        confirmed: impl Fn(&NodeState, u64) -> bool,
        timeout_message: impl FnOnce(String) -> String,
    ) -> Result<usize> {
        self.wait_for_nodes_unless(confirmed, |_, _| None, timeout_message).await
    }

    /// [`Self::wait_for_nodes`], failing at once with `refused(node, state)`'s message
    /// when a node reports, in a confirmation of this node's catalog, that it cannot
    /// do what is waited for.
    async fn wait_for_nodes_unless(
        &self,
        confirmed: impl Fn(&NodeState, u64) -> bool,
        refused: impl Fn(&str, &NodeState) -> Option<String>,
        timeout_message: impl FnOnce(String) -> String,
    ) -> Result<usize> {
        let deadline = Instant::now() + CONFIRM_WAIT;
        // One nudge (see `wait_for`): confirmations arrive by gossip, which wakes the
        // reconciler, and this node confirms after each reconcile.
        self.changed();
        loop {
            let (count, missing) = {
                let gossip = self.gossip();
                let store = gossip.store();
                let mine = store.catalog_digest();
                let alive = gossip
                    .members()
                    .filter(|m| m.state == crate::gossip::MemberState::Alive)
                    .map(|m| m.name.as_str())
                    .chain([self.cfg.node_name.as_str()]);
                let mut count = 0;
                let mut missing = Vec::new();
                for node in alive {
                    count += 1;
                    // Only a confirmation of the current catalog speaks of this request.
                    let current = store.node_state(node).filter(|s| s.catalog == mine);
                    if let Some(message) = current.and_then(|state| refused(node, state)) {
                        return Err(Error::invalid(message));
                    }
                    match store.node_state(node) {
                        Some(state) if confirmed(state, mine) => {}
                        Some(state) if !state.problems.is_empty() => {
                            missing.push(format!("{node} ({})", state.problems.join("; ")))
                        }
                        _ => missing.push(node.to_owned()),
                    }
                }
                (count, missing)
            };
            if missing.is_empty() {
                return Ok(count);
            }
            if Instant::now() >= deadline {
                let mut missing = missing;
                missing.sort();
                let list =
                    format!("node{} {}", if missing.len() == 1 { "" } else { "s" }, missing.join(", "));
                return Err(Error::invalid(timeout_message(list)));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Rewrites this node's confirmation when it changed: the ports it listens on and
    /// those it serves with backends, the digest of the catalog it holds, and why it cannot take part in a
    /// network it needs.
    pub(super) fn confirm(&self) {
        let (serving, listening, failed, out_of_rotation) = {
            let seen = self.seen.lock();
            let ports = |with_backends: bool| -> Vec<String> {
                // BTreeMap keys: already sorted.
                seen.actual
                    .listeners
                    .iter()
                    .filter(|(_, l)| !with_backends || !l.backends.is_empty())
                    .map(|((proto, port), _)| format!("{port}/{proto}"))
                    .collect()
            };
            let failed: Vec<String> = seen
                .errors
                .iter()
                .filter(|(op, _)| op.starts_with("published port"))
                .map(|(op, e)| format!("{op}: {e}"))
                .collect();
            (ports(true), ports(false), failed, seen.out_of_rotation.clone())
        };
        // Why a port may not be served here: no address on its network, or a failed
        // listener (e.g. another process holds the port).
        let mut problems: Vec<String> = self.alloc().errors.values().cloned().collect();
        problems.extend(failed);
        let me = self.cfg.node_name.clone();
        self.write(|g, now| {
            let catalog = g.store().catalog_digest();
            let state = NodeState {
                node: me.clone(),
                serving,
                listening,
                catalog,
                problems,
                out_of_rotation: out_of_rotation.clone(),
            };
            g.put(Object::NodeState(state), now)
        });
    }

    async fn unpublish(
        &self,
        published: u16,
        proto: Proto,
        service: Option<String>,
        grace_ms: u64,
    ) -> Result<Value> {
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
        if grace_ms == 0 {
            self.write(|g, now| g.delete(&key, now));
            self.reconcile().await;
            return Ok(json!({ "port": port, "grace_ms": 0 }));
        }
        // Closed to new connections now; open ones may finish until `closing_at`, when
        // every node cuts them and the port is removed (`remove_closed_ports`).
        let closing_at = crate::wall_clock_ms() + grace_ms;
        let closing = PublishedPort { closing_at: Some(closing_at), ..port.clone() };
        self.write(|g, now| g.put(Object::Published(closing), now));
        self.reconcile().await;
        let served = format!("{published}/{proto}");
        let nodes = self
            .wait_for_nodes(
                |state, mine| state.catalog == mine && !state.listening.contains(&served),
                |missing| {
                    format!(
                        "port {served} is being unpublished (open connections are cut in {:.1}s), but after {CONFIRM_WAIT:?} {missing} still accept new connections; see `meshctl status` there",
                        grace_ms as f64 / 1000.0
                    )
                },
            )
            .await?;
        Ok(json!({ "port": port, "grace_ms": grace_ms, "closing_at": closing_at, "refused_on": nodes }))
    }

    fn node_ls(&self) -> Value {
        let gossip = self.gossip();
        let now = self.shared.now();
        let vteps: std::collections::HashMap<&str, Ipv4Addr> =
            gossip.store().nodes().map(|n| (n.name.as_str(), n.addr)).collect();
        let availability = |name: &str| gossip.store().node(name).map(|n| n.availability).unwrap_or_default();
        let mut rows = vec![json!({
            "name": gossip.name(), "addr": self.cfg.advertise_addr, "state": "self",
            "availability": availability(gossip.name()),
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
                "availability": availability(&m.name),
                "incarnation": m.incarnation,
                "changed_secs_ago": secs,
            })
        }));
        json!(rows)
    }

    /// Which path serves each VIP and each published port on this node, with the
    /// backends the socket load balancer's maps hold (read back from the kernel).
    fn serving_paths(&self) -> (Vec<Value>, Vec<Value>) {
        let (services, ports) = {
            let gossip = self.gossip();
            let store = gossip.store();
            let services: Vec<_> =
                store.services().filter_map(|s| Some((s.name.clone(), s.network.clone(), s.vip?))).collect();
            let ports: Vec<_> = store.published().cloned().collect();
            (services, ports)
        };
        let nat_vips = self.nat.as_ref().map(|nat| nat.lock().vips());
        // Before `seen`: never hold `seen` and the ingress path at once.
        let kernel: Vec<(String, Option<String>)> = ports
            .iter()
            .map(|p| match (p.proxy_protocol, p.max_connections) {
                (true, _) => (
                    "proxy".to_owned(),
                    Some("--proxy-protocol v2: only the proxy writes the header".to_owned()),
                ),
                (false, 1..) => (
                    "proxy".to_owned(),
                    Some("--max-connections: only the proxy counts a port's connections".to_owned()),
                ),
                (false, 0) => self.kernel_path(p.proto, p.published),
            })
            .collect();
        let port_counters: std::collections::BTreeMap<_, _> = self.proxy_stats.ports().into_iter().collect();
        let seen = self.seen.lock();
        let table = &seen.actual.frontends;
        let off = self.socklb_missing.as_ref().map(|why| format!("none: {why}"));
        let vips = services
            .into_iter()
            .map(|(service, network, vip)| {
                let frontend =
                    Frontend { addr: vip, port: 0, proto: meshd_dataplane::socklb::Proto::Tcp };
                let (path, backends) = match (&off, table.get(&frontend)) {
                    (Some(_), _) if nat_vips.is_some() => (
                        "nftables".to_owned(),
                        nat_vips.as_ref().and_then(|v| v.get(&vip)).cloned().unwrap_or_default(),
                    ),
                    (Some(off), _) => (off.clone(), Vec::new()),
                    (None, Some(backends)) => ("socket-lb".to_owned(), backends.iter().map(|b| b.addr).collect()),
                    (None, None) => ("none: this node takes no part in the network".to_owned(), Vec::new()),
                };
                json!({ "service": service, "network": network, "vip": vip, "path": path, "backends": backends })
            })
            .collect();
        let published = ports
            .into_iter()
            .zip(kernel)
            .map(|(p, (kernel_path, kernel_path_reason))| {
                let frontend = Frontend {
                    addr: Ipv4Addr::UNSPECIFIED,
                    port: p.published,
                    proto: crate::reconcile::lb_proto(p.proto),
                };
                // Without the socket load balancer, local clients reach the proxy's
                // listener like remote ones.
                let local = match (&off, table.get(&frontend)) {
                    (Some(_), _) => "proxy".to_owned(),
                    (None, Some(_)) => "socket-lb".to_owned(),
                    (None, None) => "proxy".to_owned(),
                };
                let backends: Vec<String> = table
                    .get(&frontend)
                    .map(|b| b.iter().map(|b| format!("{}:{}", b.addr, b.port)).collect())
                    .unwrap_or_default();
                // Remote clients arrive on the underlay: the underlay program (XDP
                // or tc) takes them when it serves the port, the proxy otherwise.
                let xdp = kernel_path != "proxy";
                let remote = if xdp { kernel_path.clone() } else { "proxy".to_owned() };
                // The backends remote clients reach through that path, as this node
                // programmed them (the ingress maps or the proxy's listener).
                let remote_backends: Vec<String> = if xdp {
                    seen.actual
                        .ingress
                        .services
                        .get(&(frontend.proto, p.published))
                        .map(|s| {
                            // Draining backends keep their flows but take no new one.
                            s.backends
                                .iter()
                                .filter(|b| !b.draining)
                                .map(|b| format!("{}:{}", b.addr, b.port))
                                .collect()
                        })
                        .unwrap_or_default()
                } else {
                    seen.actual
                        .listeners
                        .get(&(p.proto, p.published))
                        .map(|l| l.backends.iter().map(ToString::to_string).collect())
                        .unwrap_or_default()
                };
                json!({
                    "port": format!("{}/{}", p.published, p.proto), "service": p.service,
                    "local_clients": local, "remote_clients": remote, "backends": backends,
                    "remote_backends": remote_backends,
                    "kernel_path": kernel_path, "kernel_path_reason": kernel_path_reason,
                    "mode": p.mode, "lb": p.lb, "proxy_protocol": p.proxy_protocol.then_some("v2"),
                    "max_connections": (p.max_connections > 0).then_some(p.max_connections),
                    "closing_at": p.closing_at,
                    // What this node's proxy listener for the port did (none when closed).
                    "proxy": port_counters.get(&(p.proto, p.published)),
                })
            })
            .collect();
        (vips, published)
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
        let (address_errors, readdressed, recent) = {
            let alloc = self.alloc();
            (alloc.errors.clone(), alloc.readdressed, alloc.recent.iter().cloned().collect::<Vec<_>>())
        };
        // Before `seen` is locked: it reads `seen` itself.
        let dns = self.resolvers_status();
        let programs = self.programs_status();
        let paths = self.serving_paths();
        let ingress = self.ingress_status();
        // Before `seen` too: the fallback's reconcile takes `nat`, then `seen`.
        let nat_tables = self.nat.as_ref().map(|nat| nat.lock().namespaces());
        let seen = self.seen.lock();
        let mut errors = seen.errors.clone();
        errors.extend(address_errors.into_iter().map(|(k, v)| (format!("address on {k}"), v)));
        let mut served: Vec<String> =
            seen.actual.listeners.keys().map(|(proto, port)| format!("{port}/{proto}")).collect();
        served.sort();
        let proxy_config = &self.cfg.proxy;
        let fd_budget = crate::limits::FdBudget::for_caps(proxy_config);
        let nofile = crate::limits::nofile_limit().ok();
        let secs = |d: std::time::Duration| d.as_secs_f64();
        json!({
            "node": self.cfg.node_name,
            "advertise_addr": self.cfg.advertise_addr,
            "control_port": self.cfg.control_port,
            "uptime_secs": self.shared.started.elapsed().as_secs(),
            "overlay_mtu": self.mtu,
            "ebpf": programs,
            "vips": paths.0,
            "nftables_vip_tables": nat_tables,
            "published_paths": paths.1,
            "ingress": ingress,
            "networks": networks,
            "services": services,
            "tasks": endpoints,
            "local_tasks": seen.actual.local_tasks.len(),
            "overlays": seen.actual.overlays.len(),
            "overlay_peers": seen.actual.peers.len(),
            "published_ports": served,
            "draining_tasks": seen.draining,
            "gossip": {
                "alive_members": members,
                "incarnation": incarnation,
                "local_health": health,
                "keys": self.shared.keyring.read().keys.len(),
                "counters": self.shared.counters.snapshot(),
                "suppressed_warnings": self.shared.suppressed_warnings(),
            },
            "open_files": {
                "soft_limit": nofile.map(|l| l.soft),
                "hard_limit": nofile.map(|l| l.hard),
                "open": crate::limits::open_fds(),
                "needed_at_caps": fd_budget.total(),
                "warning": nofile.and_then(|l| crate::limits::nofile_warning(l, &fd_budget)),
            },
            "proxy": {
                "tcp_max_connections": proxy_config.tcp_max_connections,
                "tcp_idle_timeout_secs": proxy_config.tcp_idle_timeout.map(secs),
                "tcp_connect_timeout_secs": secs(proxy_config.tcp_connect_timeout),
                "tcp_keepalive_dead_after_secs": proxy_config.tcp_keepalive.map(|k| secs(k.dead_after())),
                "udp_max_flows": proxy_config.udp_max_flows,
                "udp_idle_timeout_secs": secs(proxy_config.udp_idle_timeout),
                "counters": self.proxy_stats.counters(),
            },
            "api": self.api_stats.snapshot(),
            "dns": dns,
            "errors": errors,
            "ipam": { "readdressed": readdressed, "recent_readdresses": recent },
            "store": {
                "path": self.cfg.state_dir.join("store.json"),
                "recovered": self.store_recovered,
                "resyncing": self.gossip().resyncing(),
            },
        })
    }
}

/// The nodes taking part in each network, by network.
type Participants = BTreeMap<String, HashSet<String>>;

/// The nodes taking part in `network` (each holds an address there); task endpoints
/// gossip only to them.
fn participants(store: &crate::store::Store, network: &str) -> HashSet<String> {
    store
        .endpoints()
        .filter(|e| e.service.is_none() && e.network == network)
        .map(|e| e.node.clone())
        .collect()
}

/// Open TCP connections in the network namespace at `netns` (IPv4 and IPv6),
/// read from `/proc/thread-self/net/tcp{,6}` on a thread inside it; an error when the
/// namespace cannot be entered.
fn established_in(netns: &Path) -> std::result::Result<usize, meshd_dataplane::Error> {
    meshd_dataplane::netns::run_in(netns, || {
        let tables: Vec<String> = ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .collect();
        count_established(&tables.join("\n"))
    })
}

/// Connections in `/proc/net/tcp`-format rows (IPv4 and IPv6 tables together) that may
/// still carry data — ESTABLISHED (`01`), SYN_RECV (`03`: sent before the node stopped
/// sending new ones), FIN_WAIT1 (`04`: last bytes not yet acknowledged), CLOSE_WAIT
/// (`08`: the peer closed, the task may still answer) — and that a server of the task
/// accepted: their local port is one a socket listens on (`0A`). Connections the task
/// opened itself (to a database, say) do not hold a drain for the whole grace period.
fn count_established(table: &str) -> usize {
    // (local port, state) of each row: `sl local_address rem_address st ...`.
    let rows: Vec<(u16, &str)> = table
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let local = f.nth(1)?;
            let state = f.nth(1)?;
            Some((u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?, state))
        })
        .collect();
    let listening: HashSet<u16> = rows.iter().filter(|(_, st)| *st == "0A").map(|(p, _)| *p).collect();
    rows.iter().filter(|(p, st)| matches!(*st, "01" | "03" | "04" | "08") && listening.contains(p)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_established_sockets_count() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n\
           0: 0100000A:0050 00000000:0000 0A 00000000:00000000\n\
           1: 0100000A:0050 0200000A:C350 01 00000000:00000000\n\
           2: 0100000A:0050 0200000A:C351 06 00000000:00000000\n\
           3: 0100000A:0050 0200000A:C352 04 00000000:00000000\n\
           4: 0100000A:9C40 0300000A:0CEA 01 00000000:00000000\n";
        // Two to the listening port 80; the TIME_WAIT one and the task's own outbound
        // connection (from port 40000 to 3306) do not count.
        assert_eq!(count_established(table), 2);
    }

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
