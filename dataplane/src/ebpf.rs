//! The entry point control uses today: the socket load balancer of [`crate::socklb`]
//! without pins, so dropping [`SocketPrograms`] detaches everything it attached (the
//! behaviour `meshd` relies on at SIGTERM until it moves to pinned mode).

use std::path::PathBuf;

pub use crate::socklb::ProgramStatus;
use crate::{
    socklb::{SocketLb, SocketLbConfig},
    Result,
};

/// The socket-level programs, loaded and attached to one cgroup, unpinned.
pub struct SocketPrograms {
    lb: SocketLb,
}

impl SocketPrograms {
    /// Loads the programs and attaches them to the cgroup v2 directory `cgroup`.
    pub fn attach(cgroup: PathBuf) -> Result<Self> {
        Ok(SocketPrograms { lb: SocketLb::open(SocketLbConfig { cgroup, pin_dir: None })? })
    }

    /// The attached programs and their counters, `connect4` first.
    pub fn status(&self) -> Result<Vec<ProgramStatus>> {
        self.lb.status()
    }

    /// The load balancer itself, for writing frontends.
    pub fn lb_mut(&mut self) -> &mut SocketLb {
        &mut self.lb
    }
}
