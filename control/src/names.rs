//! The names the embedded resolver answers, derived from the store: per network, each
//! service (how it resolves, its VIP, its healthy task IPs) and each healthy task's
//! name. Pure policy over plain data; the agent hands the result to
//! `meshd_dataplane::dns` and never edits the table any other way.

use std::{collections::BTreeSet, net::Ipv4Addr};

use meshd_dataplane::dns::{EndpointMode as DnsMode, NameTable, NetworkNames};

use crate::{
    model::{Endpoint, EndpointMode},
    store::Store,
};

/// The name table for the cluster in `store`, where `live` are the nodes whose tasks
/// are served (the same filter as [`crate::reconcile::desired`]): a task on a dead
/// node is suspended, so it vanishes from every answer and returns with the node. A
/// task whose address an older endpoint still holds ([`crate::ipam::shadowed`]) is left
/// out too: the address answers for the older one. So is a VIP an older endpoint or
/// service holds: until the service gets a new one, its name has no address.
pub fn name_table(store: &Store, live: &BTreeSet<String>) -> NameTable {
    let shadowed_keys = crate::ipam::shadowed_keys(store);
    let shadowed: BTreeSet<&str> =
        shadowed_keys.iter().filter_map(|key| key.strip_prefix("endpoint/")).collect();
    let healthy =
        |e: &&Endpoint| e.service.is_some() && live.contains(&e.node) && !shadowed.contains(e.id.as_str());
    let mut table = NameTable::default();
    for network in store.networks() {
        let on_net = |e: &&Endpoint| e.network == network.name;
        let mut names = NetworkNames::default();
        for service in store.services().filter(|s| s.network == network.name) {
            let mut ips: Vec<Ipv4Addr> =
                store.tasks_of(&service.name).filter(healthy).filter(on_net).map(|t| t.ip).collect();
            // A stable order: `tasks.SERVICE` answers in table order, and an unchanged
            // cluster must give an unchanged table (no needless swaps).
            ips.sort();
            ips.dedup();
            let mode = match service.endpoint_mode {
                EndpointMode::Vip => DnsMode::Vip,
                EndpointMode::Dnsrr => DnsMode::Dnsrr,
            };
            let vip = service
                .vip
                .filter(|_| mode == DnsMode::Vip)
                .filter(|_| !shadowed_keys.contains(crate::model::Key::service(&service.name).as_str()));
            names = names.with_service(&service.name, mode, vip, ips);
        }
        for task in store.endpoints().filter(healthy).filter(on_net) {
            names = names.with_task(&task.id, task.ip);
        }
        table.networks.insert(network.name.clone(), names);
    }
    table
}

/// The networks whose names a container in namespace `netns` on `node` may see: those
/// of the tasks attached there (sorted, no duplicates).
pub fn networks_of_netns(store: &Store, node: &str, netns: &str) -> Vec<String> {
    let networks: BTreeSet<String> = store
        .endpoints()
        .filter(|e| e.node == node && e.service.is_some() && e.netns.as_deref() == Some(netns))
        .map(|e| e.network.clone())
        .collect();
    networks.into_iter().collect()
}

/// The container namespaces of `node`'s tasks, each with the networks its tasks are on:
/// where the agent runs one resolver each.
pub fn local_resolvers(store: &Store, node: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out: std::collections::BTreeMap<String, BTreeSet<String>> = Default::default();
    for e in store.endpoints().filter(|e| e.node == node && e.service.is_some()) {
        if let Some(netns) = &e.netns {
            out.entry(netns.clone()).or_default().insert(e.network.clone());
        }
    }
    out.into_iter().map(|(netns, nets)| (netns, nets.into_iter().collect())).collect()
}

#[cfg(test)]
mod tests {
    use meshd_dataplane::dns::ServiceNames;

    use super::*;
    use crate::{
        ipam::mac_for_ip,
        model::{Network, Object, Service},
    };

    fn task(id: &str, service: &str, network: &str, node: &str, ip: [u8; 4]) -> Object {
        let ip = Ipv4Addr::from(ip);
        Object::Endpoint(Endpoint {
            id: id.into(),
            service: Some(service.into()),
            network: network.into(),
            node: node.into(),
            ip,
            mac: mac_for_ip(ip),
            vtep: Ipv4Addr::new(198, 18, 0, 11),
            host_if: Some(format!("mv{id}")),
            netns: Some(format!("/run/netns/{id}")),
            health: Default::default(),
            draining: false,
        })
    }

    fn store() -> Store {
        let mut s = Store::default();
        for (name, subnet, vni) in [("front", "10.0.1.0/24", 4096), ("back", "10.0.2.0/24", 4097)] {
            s.put(
                "n1",
                Object::Network(Network {
                    name: name.into(),
                    subnet: subnet.parse().unwrap(),
                    vni,
                    mtu: None,
                }),
            );
        }
        let service = |name: &str, network: &str, mode, vip: Option<[u8; 4]>| {
            Object::Service(Service {
                name: name.into(),
                network: network.into(),
                endpoint_mode: mode,
                vip: vip.map(Ipv4Addr::from),
                health_check: None,
            })
        };
        s.put("n1", service("web", "front", EndpointMode::Vip, Some([10, 0, 1, 2])));
        s.put("n1", service("api", "front", EndpointMode::Dnsrr, None));
        s.put("n1", service("db", "back", EndpointMode::Vip, None));
        s.put("n1", task("web.2", "web", "front", "n2", [10, 0, 1, 11]));
        s.put("n1", task("web.1", "web", "front", "n1", [10, 0, 1, 10]));
        s.put("n1", task("api.1", "api", "front", "n2", [10, 0, 1, 20]));
        s.put("n1", task("db.1", "db", "back", "n1", [10, 0, 2, 10]));
        // A node's own address is no task and no name.
        let mut node_ep = match task("node:n1:front", "x", "front", "n1", [10, 0, 1, 1]) {
            Object::Endpoint(e) => e,
            _ => unreachable!(),
        };
        node_ep.service = None;
        s.put("n1", Object::Endpoint(node_ep));
        s
    }

    fn live(nodes: &[&str]) -> BTreeSet<String> {
        nodes.iter().map(|n| n.to_string()).collect()
    }

    fn ip(a: [u8; 4]) -> Ipv4Addr {
        Ipv4Addr::from(a)
    }

    #[test]
    fn every_service_and_task_is_named_on_its_network() {
        let table = name_table(&store(), &live(&["n1", "n2"]));
        let front = &table.networks["front"];
        assert_eq!(
            front.services["web"],
            ServiceNames {
                mode: DnsMode::Vip,
                vip: Some(ip([10, 0, 1, 2])),
                task_ips: vec![ip([10, 0, 1, 10]), ip([10, 0, 1, 11])]
            }
        );
        assert_eq!(front.services["api"].mode, DnsMode::Dnsrr);
        assert_eq!(front.services["api"].task_ips, vec![ip([10, 0, 1, 20])]);
        assert_eq!(front.tasks.keys().collect::<Vec<_>>(), ["api.1", "web.1", "web.2"]);
        let back = &table.networks["back"];
        // No VIP allocated yet: the service is there, without an address.
        assert_eq!(back.services["db"].vip, None);
        assert_eq!(back.tasks["db.1"], ip([10, 0, 2, 10]));
        assert!(!front.services.contains_key("db") && !back.services.contains_key("web"));
    }

    #[test]
    fn a_dead_nodes_tasks_vanish_and_return_with_it() {
        let s = store();
        let without = name_table(&s, &live(&["n1"]));
        assert_eq!(without.networks["front"].services["web"].task_ips, vec![ip([10, 0, 1, 10])]);
        assert!(without.networks["front"].services["api"].task_ips.is_empty());
        assert!(!without.networks["front"].tasks.contains_key("web.2"));
        assert_eq!(name_table(&s, &live(&["n1", "n2"])), name_table(&s, &live(&["n2", "n1"])));
        assert!(name_table(&s, &live(&["n1", "n2"])).networks["front"].tasks.contains_key("web.2"));
    }

    #[test]
    fn a_shadowed_task_is_not_named() {
        let mut s = store();
        // A second endpoint claiming web.1's address (a conflict after a partition):
        // the younger one is shadowed.
        s.put("n2", task("web.9", "web", "front", "n2", [10, 0, 1, 10]));
        let table = name_table(&s, &live(&["n1", "n2"]));
        assert!(!table.networks["front"].tasks.contains_key("web.9"));
        assert_eq!(
            table.networks["front"].services["web"].task_ips,
            vec![ip([10, 0, 1, 10]), ip([10, 0, 1, 11])]
        );
    }

    #[test]
    fn a_shadowed_vip_is_not_answered() {
        let mut s = store();
        // A service written later whose VIP is web.1's address: the task keeps it.
        s.put(
            "n2",
            Object::Service(Service {
                name: "late".into(),
                network: "front".into(),
                endpoint_mode: EndpointMode::Vip,
                vip: Some(ip([10, 0, 1, 10])),
                health_check: None,
            }),
        );
        let table = name_table(&s, &live(&["n1", "n2"]));
        assert_eq!(table.networks["front"].services["late"].vip, None);
        assert_eq!(table.networks["front"].services["web"].vip, Some(ip([10, 0, 1, 2])));
        assert_eq!(table.networks["front"].tasks["web.1"], ip([10, 0, 1, 10]));
    }

    #[test]
    fn resolvers_follow_local_task_namespaces() {
        let s = store();
        let n1 = local_resolvers(&s, "n1");
        assert_eq!(n1.keys().collect::<Vec<_>>(), ["/run/netns/db.1", "/run/netns/web.1"]);
        assert_eq!(n1["/run/netns/db.1"], ["back"]);
        assert_eq!(networks_of_netns(&s, "n1", "/run/netns/web.1"), ["front"]);
        assert!(networks_of_netns(&s, "n1", "/run/netns/web.2").is_empty());
    }
}
