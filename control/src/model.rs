//! The cluster model: plain data for networks, services, published ports, endpoints,
//! nodes, address claims and nodes' confirmations. No I/O here; the store replicates these values and
//! the reconciler turns them into dataplane operations.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use ipnet::Ipv4Net;
use meshd_dataplane::{overlay::MacAddr, proxy::Proto};
use serde::{Deserialize, Serialize};

/// A VXLAN network identifier.
pub type Vni = u32;

/// First VNI handed to overlay networks (Docker starts at 4096 as well).
pub const FIRST_VNI: Vni = 4096;

/// An overlay network: one L2 segment spanning every node, carried in VXLAN.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Name users refer to it by.
    pub name: String,
    /// The address range of its tasks.
    pub subnet: Ipv4Net,
    /// Its VXLAN network identifier.
    pub vni: Vni,
    /// Interface MTU on this network; `None`: each node's underlay MTU minus the
    /// 50 bytes of VXLAN overhead.
    #[serde(default)]
    pub mtu: Option<u32>,
}

/// How a service's name resolves and where its traffic is balanced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    /// One virtual IP in front of all tasks.
    #[default]
    Vip,
    /// DNS round-robin over the task IPs.
    Dnsrr,
}

impl FromStr for EndpointMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vip" => Ok(Self::Vip),
            "dnsrr" => Ok(Self::Dnsrr),
            other => Err(format!("unknown endpoint mode {other:?}: use vip or dnsrr")),
        }
    }
}

impl fmt::Display for EndpointMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Vip => "vip",
            Self::Dnsrr => "dnsrr",
        })
    }
}

/// A service: a named set of tasks on one network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Name users and DNS refer to it by.
    pub name: String,
    /// The network its tasks attach to.
    pub network: String,
    /// How its name resolves.
    pub endpoint_mode: EndpointMode,
    /// Its virtual IP on its network (`vip` mode, once allocated; see
    /// [`crate::ipam`]): connections to any port of it reach a task on the same port.
    /// Always encoded (gossip's postcard is not self-describing: a field skipped when
    /// `None` makes every later field unreadable); `default` reads older JSON stores.
    #[serde(default)]
    pub vip: Option<Ipv4Addr>,
    /// The active check each task's own node runs on it (`None`: no check; a task is
    /// healthy while its node is live). Always encoded, like `vip`.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
}

/// How a task is probed, and how often (`meshctl service create|update --health-*`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// What a probe does.
    pub probe: Probe,
    /// Time between probes, in milliseconds.
    pub interval_ms: u32,
    /// A probe not answered within this many milliseconds fails.
    pub timeout_ms: u32,
    /// Consecutive failed probes that take a healthy task out of rotation.
    pub retries: u32,
    /// Consecutive passed probes that bring an unhealthy task back.
    pub passes: u32,
}

/// One health probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Probe {
    /// A TCP connect to the task's port.
    Tcp {
        /// The task's port to connect to.
        port: u16,
    },
    /// An HTTP GET that must answer 2xx or 3xx.
    Http {
        /// The task's port.
        port: u16,
        /// The request path, e.g. `/healthz`.
        path: String,
    },
}

/// A task's health as its own node's checker last judged it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// In rotation (also: no check configured).
    #[default]
    Healthy,
    /// Failed `retries` probes in a row: out of rotation until `passes` probes pass.
    Unhealthy,
}

/// How new connections to a published port pick a task (the proxy's policy; the
/// kernel paths always use Maglev on the flow).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LbPolicy {
    /// Round robin.
    #[default]
    Rr,
    /// The task with the fewest active connections.
    Leastconn,
    /// Power of two choices: the less loaded of two random tasks.
    P2c,
    /// Maglev on the client's address: a client keeps its task.
    Maglev,
}

impl FromStr for LbPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rr" => Ok(Self::Rr),
            "leastconn" => Ok(Self::Leastconn),
            "p2c" => Ok(Self::P2c),
            "maglev" => Ok(Self::Maglev),
            other => {
                Err(format!("unknown load-balancing policy {other:?}: use rr, leastconn, p2c or maglev"))
            }
        }
    }
}

impl fmt::Display for LbPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rr => "rr",
            Self::Leastconn => "leastconn",
            Self::P2c => "p2c",
            Self::Maglev => "maglev",
        })
    }
}

/// Whether a node's tasks take new connections (`meshctl node drain|activate`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    /// Its tasks are in rotation.
    #[default]
    Active,
    /// Its tasks finish the connections they have and take no new ones; the node
    /// itself keeps serving published ports.
    Drain,
}

/// How external clients' traffic to a published port reaches its tasks on the kernel
/// path (the proxy path is the same in both modes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// Replies return through the node the client connected to (as with Docker).
    #[default]
    Snat,
    /// Direct server return: the task sees the client's address and its node replies
    /// straight to the client from the published address.
    Dsr,
}

impl FromStr for PublishMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "snat" => Ok(Self::Snat),
            "dsr" => Ok(Self::Dsr),
            other => Err(format!("unknown publish mode {other:?}: use snat or dsr")),
        }
    }
}

impl fmt::Display for PublishMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Snat => "snat",
            Self::Dsr => "dsr",
        })
    }
}

/// A port answered on every node and forwarded to one task of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    /// The port every node listens on.
    pub published: u16,
    /// The port the tasks listen on.
    pub target: u16,
    /// Transport protocol.
    pub proto: Proto,
    /// The service whose tasks receive the traffic.
    pub service: String,
    /// snat or dsr. Always encoded (gossip's postcard is not self-describing);
    /// `default` reads JSON stores from before modes.
    #[serde(default)]
    pub mode: PublishMode,
    /// The proxy's load-balancing policy. Always encoded.
    #[serde(default)]
    pub lb: LbPolicy,
    /// The proxy writes a PROXY protocol v2 header (the external client's address) to
    /// the task before the client's bytes; served by the proxy only. Always encoded.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Most connections the port takes at once on each node (0: no limit of its own,
    /// only the proxy's global cap); at the limit a new connection is refused at once,
    /// established ones are unaffected. Counting needs the proxy, so such a port is
    /// served by the proxy only. Always encoded.
    #[serde(default)]
    pub max_connections: u32,
    /// Set by `meshctl unpublish --grace`: the port takes no new connection, and
    /// connections already open may finish until this time (Unix milliseconds), when
    /// they are cut and the port is removed. Always encoded.
    #[serde(default)]
    pub closing_at: Option<u64>,
}

impl PublishedPort {
    /// Whether only the userspace proxy can serve this port as asked (it writes a
    /// PROXY header, or counts connections against a limit): the kernel paths (ingress,
    /// the socket LB's published form) leave it out.
    pub fn proxy_only(&self) -> bool {
        self.proxy_protocol || self.max_connections > 0
    }
}

/// An address on an overlay network: a task of a service, or a node's own interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Unique name: the task name, or `node:<node>:<network>` for a node's address.
    pub id: String,
    /// The service it is a task of; `None` for a node's own address.
    pub service: Option<String>,
    /// The network it lives on.
    pub network: String,
    /// The node that hosts it.
    pub node: String,
    /// Its overlay address.
    pub ip: Ipv4Addr,
    /// Its MAC address on the overlay.
    pub mac: MacAddr,
    /// The underlay address of its node, where VXLAN packets for it go.
    pub vtep: Ipv4Addr,
    /// Host-side interface name (tasks only).
    pub host_if: Option<String>,
    /// Network namespace path of the task (tasks only).
    pub netns: Option<String>,
    /// The task's health as its node's checker judged it. Always encoded.
    #[serde(default)]
    pub health: Health,
    /// Leaving: out of rotation, its connections finishing (`meshctl detach` with a
    /// grace period). Always encoded.
    #[serde(default)]
    pub draining: bool,
}

impl Endpoint {
    /// The id of a node's own address on a network.
    pub fn node_id(node: &str, network: &str) -> String {
        format!("node:{node}:{network}")
    }
}

/// A member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Its unique name.
    pub name: String,
    /// Its underlay address: VTEP and control-plane address.
    pub addr: Ipv4Addr,
    /// Whether its tasks take new connections. Always encoded.
    #[serde(default)]
    pub availability: Availability,
}

/// A node's claim on one address of a network (see [`crate::ipam`]): a block of one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockClaim {
    /// The network.
    pub network: String,
    /// Index of the address inside the subnet (0 is the network address).
    pub index: u32,
    /// The owner.
    pub node: String,
}

/// What a node confirms to the cluster, rewritten whenever it changes: commands wait
/// for every alive node's confirmation before they report something as done. Small
/// (a digest, not a list of objects) so that a thousand of them cost little.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// The node.
    pub node: String,
    /// Published ports it serves with at least one backend, as `PORT/PROTO`, sorted.
    /// (Not their backends: a task starting anywhere would make every node rewrite
    /// its record.)
    pub serving: Vec<String>,
    /// Published ports it listens on, with or without backends, sorted.
    #[serde(default)]
    pub listening: Vec<String>,
    /// Digest of the networks, services and published ports it holds (see
    /// [`crate::store::Store::catalog_digest`]).
    pub catalog: u64,
    /// Why it cannot take part in a network it needs (e.g. the subnet is full).
    #[serde(default)]
    pub problems: Vec<String>,
    /// Tasks its dataplane keeps out of new connections although they still exist
    /// (draining, or on a drained node), as applied by its last reconcile, sorted:
    /// `detach` and `node drain` wait for every node to list them.
    #[serde(default)]
    pub out_of_rotation: Vec<String>,
}

/// The cluster keyring as a rotation distributes it (see `meshctl key rotate`).
/// Its `Debug` shows key fingerprints only, so no log line can carry a key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyringRecord {
    /// Keys every node must accept, as 64 hex digits.
    pub keys: Vec<String>,
    /// Index of the key every node seals with.
    pub primary: usize,
    /// Rotation step; each step is acknowledged by every node.
    pub generation: u64,
}

impl std::fmt::Debug for KeyringRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hints: Vec<String> = self
            .keys
            .iter()
            .map(|k| match crate::gossip::seal::Key::from_hex(k) {
                Ok(key) => format!("{:08x}", key.hint()),
                Err(_) => "invalid".to_owned(),
            })
            .collect();
        f.debug_struct("KeyringRecord")
            .field("keys", &hints)
            .field("primary", &self.primary)
            .field("generation", &self.generation)
            .finish()
    }
}

/// A node's acknowledgement that it installed keyring `generation`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAck {
    /// The node.
    pub node: String,
    /// The generation it runs.
    pub generation: u64,
}

/// Every kind of object the store replicates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Object {
    /// See [`Network`].
    Network(Network),
    /// See [`Service`].
    Service(Service),
    /// See [`PublishedPort`].
    Published(PublishedPort),
    /// See [`Endpoint`].
    Endpoint(Endpoint),
    /// See [`Node`].
    Node(Node),
    /// See [`BlockClaim`].
    Block(BlockClaim),
    /// See [`KeyringRecord`].
    Keyring(KeyringRecord),
    /// See [`KeyAck`].
    KeyAck(KeyAck),
    /// See [`NodeState`].
    NodeState(NodeState),
}

impl Object {
    /// The store key this object lives under.
    pub fn key(&self) -> String {
        match self {
            Object::Network(n) => Key::network(&n.name),
            Object::Service(s) => Key::service(&s.name),
            Object::Published(p) => Key::published(p.proto, p.published),
            Object::Endpoint(e) => Key::endpoint(&e.id),
            Object::Node(n) => Key::node(&n.name),
            Object::Block(b) => Key::block(&b.network, b.index),
            Object::Keyring(_) => Key::KEYRING.to_owned(),
            Object::KeyAck(a) => Key::key_ack(&a.node),
            Object::NodeState(n) => Key::node_state(&n.node),
        }
    }
}

/// Builders of store keys; the prefix before `/` is the object kind.
pub struct Key;

impl Key {
    /// Key of the distributed keyring.
    pub const KEYRING: &'static str = "keyring";

    /// Key of a node's keyring acknowledgement.
    pub fn key_ack(node: &str) -> String {
        format!("keyack/{node}")
    }

    /// Key of a network.
    pub fn network(name: &str) -> String {
        format!("network/{name}")
    }
    /// Key of a service.
    pub fn service(name: &str) -> String {
        format!("service/{name}")
    }
    /// Key of a published port.
    pub fn published(proto: Proto, port: u16) -> String {
        format!("published/{proto}/{port}")
    }
    /// Key of an endpoint.
    pub fn endpoint(id: &str) -> String {
        format!("endpoint/{id}")
    }
    /// Key of a node.
    pub fn node(name: &str) -> String {
        format!("node/{name}")
    }
    /// Key of a node's confirmation record.
    pub fn node_state(node: &str) -> String {
        format!("nodestate/{node}")
    }
    /// Key of a block claim.
    pub fn block(network: &str, index: u32) -> String {
        format!("block/{network}/{index}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(mode: PublishMode) -> PublishedPort {
        PublishedPort {
            published: 3000,
            target: 80,
            proto: Proto::Tcp,
            service: "web".into(),
            mode,
            lb: Default::default(),
            proxy_protocol: false,
            max_connections: 0,
            closing_at: None,
        }
    }

    #[test]
    fn publish_modes_parse_and_refuse_unknown_values() {
        assert_eq!("snat".parse::<PublishMode>(), Ok(PublishMode::Snat));
        assert_eq!("dsr".parse::<PublishMode>(), Ok(PublishMode::Dsr));
        let err = "direct".parse::<PublishMode>().unwrap_err();
        assert!(err.contains("\"direct\"") && err.contains("snat or dsr"), "{err}");
        assert_eq!(PublishMode::Dsr.to_string(), "dsr");
    }

    #[test]
    fn the_mode_travels_in_gossip_and_old_json_stores_read_as_snat() {
        // postcard is not self-describing: the field must always be encoded.
        let obj = Object::Published(port(PublishMode::Dsr));
        let bytes = postcard::to_allocvec(&obj).unwrap();
        assert_eq!(postcard::from_bytes::<Object>(&bytes).unwrap(), obj);
        let old = r#"{"published":3000,"target":80,"proto":"tcp","service":"web"}"#;
        assert_eq!(serde_json::from_str::<PublishedPort>(old).unwrap(), port(PublishMode::Snat));
        let json = serde_json::to_value(port(PublishMode::Dsr)).unwrap();
        assert_eq!(json["mode"], "dsr");
    }
}
