//! The names the embedded resolver answers: [`NameTable`] is plain data the control
//! side derives from its store (networks, services, healthy tasks); [`NameIndex`] is
//! the same data arranged for one hash lookup per query. Nothing here does I/O.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

/// How a service's name resolves (Docker's `--endpoint-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointMode {
    /// The name resolves to the service's one virtual IP on the network.
    Vip,
    /// The name resolves to every healthy task IP, in shuffled order.
    Dnsrr,
}

/// One service as seen on one network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceNames {
    /// How `SERVICE` resolves.
    pub mode: EndpointMode,
    /// The virtual IP on this network (`Vip` mode; ignored for `Dnsrr`).
    pub vip: Option<Ipv4Addr>,
    /// The healthy tasks' IPs on this network (what `tasks.SERVICE` returns).
    pub task_ips: Vec<Ipv4Addr>,
}

/// The names visible on one network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkNames {
    /// Services on the network, by name.
    pub services: BTreeMap<String, ServiceNames>,
    /// Healthy tasks on the network, by task name (`mysql.1`) → IP.
    pub tasks: BTreeMap<String, Ipv4Addr>,
}

impl NetworkNames {
    /// This network with service `name` added: how it resolves, its VIP (vip mode) and
    /// its healthy tasks' addresses.
    pub fn with_service(
        mut self,
        name: &str,
        mode: EndpointMode,
        vip: Option<Ipv4Addr>,
        task_ips: Vec<Ipv4Addr>,
    ) -> Self {
        self.services.insert(name.to_owned(), ServiceNames { mode, vip, task_ips });
        self
    }

    /// This network with task `name` at `ip` added.
    pub fn with_task(mut self, name: &str, ip: Ipv4Addr) -> Self {
        self.tasks.insert(name.to_owned(), ip);
        self
    }
}

/// Everything the resolver knows: per network name, the names on it. The control side
/// builds it from the store whenever the cluster changes and hands it over whole.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameTable {
    /// Network name → names on it.
    pub networks: BTreeMap<String, NetworkNames>,
}

/// What a name resolves to on one network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// One fixed address (a VIP or a task).
    One(Ipv4Addr),
    /// Every address, in table order (`tasks.SERVICE`).
    All(Vec<Ipv4Addr>),
    /// Every address, shuffled per answer (a `dnsrr` service).
    Shuffled(Vec<Ipv4Addr>),
}

/// One name's meaning on one network.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// Index of the network in [`NameIndex::networks`].
    pub network: usize,
    /// What the name resolves to there.
    pub target: Target,
}

/// A [`NameTable`] arranged for lookups: lowercase names (every accepted form:
/// `SERVICE`, `SERVICE.NETWORK`, `tasks.SERVICE[.NETWORK]`, `TASK[.NETWORK]`) → their
/// entries per network, and addresses → PTR targets per network. Built once per table
/// change, shared read-only by every namespace's resolver.
#[derive(Clone, Debug, Default)]
pub struct NameIndex {
    /// Network names, lowercase; entries refer to them by position.
    pub(crate) networks: Vec<String>,
    /// Lowercase name without trailing dot → its meaning on each network.
    pub(crate) forward: HashMap<String, Vec<Entry>>,
    /// Address → (network, fully qualified PTR target without trailing dot).
    pub(crate) reverse: HashMap<Ipv4Addr, Vec<(usize, String)>>,
}

impl NameIndex {
    /// Arranges `table` for lookups.
    pub fn build(table: &NameTable) -> NameIndex {
        let mut index = NameIndex::default();
        for (net_name, names) in &table.networks {
            let network = index.networks.len();
            let net = net_name.to_ascii_lowercase();
            index.networks.push(net.clone());
            for (service, s) in &names.services {
                let service = service.to_ascii_lowercase();
                let main = match (s.mode, s.vip) {
                    (EndpointMode::Vip, Some(vip)) => Some(Target::One(vip)),
                    // A vip service whose VIP is not allocated yet has no address to
                    // give, but the name is the cluster's: an empty answer on its
                    // network, NXDOMAIN elsewhere, never a forward upstream.
                    (EndpointMode::Vip, None) => Some(Target::All(Vec::new())),
                    (EndpointMode::Dnsrr, _) => Some(Target::Shuffled(s.task_ips.clone())),
                };
                if let Some(target) = main {
                    index.add(&service, &net, network, target);
                }
                index.add(&format!("tasks.{service}"), &net, network, Target::All(s.task_ips.clone()));
                if let (EndpointMode::Vip, Some(vip)) = (s.mode, s.vip) {
                    index.reverse.entry(vip).or_default().push((network, format!("{service}.{net}")));
                }
            }
            for (task, ip) in &names.tasks {
                let task = task.to_ascii_lowercase();
                index.add(&task, &net, network, Target::One(*ip));
                index.reverse.entry(*ip).or_default().push((network, format!("{task}.{net}")));
            }
        }
        index
    }

    fn add(&mut self, name: &str, net: &str, network: usize, target: Target) {
        self.forward
            .entry(format!("{name}.{net}"))
            .or_default()
            .push(Entry { network, target: target.clone() });
        self.forward.entry(name.to_owned()).or_default().push(Entry { network, target });
    }
}
