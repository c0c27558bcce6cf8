//! meshd's dataplane: the mechanisms that make the cluster's decisions real on one
//! node. It owns kernel objects (VXLAN devices, bridges, veths, eBPF programs) and
//! sockets (the published-port proxy). It knows nothing about where the decisions come
//! from: the control crate tells it what to program.

pub mod backoff;
pub mod dns;
mod error;
pub mod holder;
pub mod ingress;
pub mod lb;
pub mod natlb;
pub mod netlink;
pub mod netns;
pub mod overlay;
pub mod proxy;
pub mod socklb;

pub use error::{Error, Result};
