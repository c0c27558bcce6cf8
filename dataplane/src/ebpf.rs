//! Loads meshd's kernel programs and attaches them. For now one program: the cgroup
//! `connect4` hook that every IPv4 `connect()` of the node's cgroup passes through.
//! Dropping [`SocketPrograms`] detaches everything it attached.

use std::{fs::File, path::PathBuf};

use aya::{
    maps::PerCpuArray,
    programs::{CgroupAttachMode, CgroupSockAddr},
    Ebpf,
};
use meshd_common::{SockStats, SOCK_STATS_MAP, STATS_CONNECT4};

use crate::{Error, Result};

/// The compiled kernel object, built by this crate's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshd-ebpf"));

const CONNECT4: &str = "connect4";

/// What `meshctl status` shows about a loaded program.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProgramStatus {
    /// Program name.
    pub name: String,
    /// Kernel program id (as `bpftool prog` shows it).
    pub id: u32,
    /// Where it is attached.
    pub attached_to: String,
    /// Calls it has seen.
    pub seen: u64,
}

/// The socket-level programs, loaded and attached to one cgroup.
pub struct SocketPrograms {
    ebpf: Ebpf,
    cgroup: PathBuf,
}

impl SocketPrograms {
    /// Loads the programs and attaches them to the cgroup v2 directory `cgroup`.
    pub fn attach(cgroup: PathBuf) -> Result<Self> {
        let ebpf_err = |message: String| Error::Ebpf { program: CONNECT4, message };
        let dir = File::open(&cgroup).map_err(|source| Error::Cgroup { path: cgroup.clone(), source })?;
        let mut ebpf =
            Ebpf::load(OBJECT).map_err(|e| ebpf_err(format!("loading the object: {}", chain(&e))))?;
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(CONNECT4)
            .ok_or_else(|| ebpf_err("missing from the object".into()))?
            .try_into()
            .map_err(|e| ebpf_err(format!("wrong program type: {e}")))?;
        program.load().map_err(|e| ebpf_err(format!("the verifier refused it: {}", chain(&e))))?;
        // Attached as a bpf_link, which always coexists with other programs on the
        // cgroup; the kernel wants the mode flags zero (`Single`) for links.
        program
            .attach(dir, CgroupAttachMode::Single)
            .map_err(|e| ebpf_err(format!("attaching to {}: {}", cgroup.display(), chain(&e))))?;
        tracing::info!(cgroup = %cgroup.display(), "attached cgroup connect4 program");
        Ok(SocketPrograms { ebpf, cgroup })
    }

    /// The loaded programs and their counters.
    ///
    /// (Reads the kernel's id and the per-CPU counters.)
    pub fn status(&self) -> Result<Vec<ProgramStatus>> {
        let ebpf_err = |message: String| Error::Ebpf { program: CONNECT4, message };
        let program: &CgroupSockAddr = self
            .ebpf
            .program(CONNECT4)
            .ok_or_else(|| ebpf_err("not loaded".into()))?
            .try_into()
            .map_err(|e| ebpf_err(format!("wrong program type: {e}")))?;
        let id = program.info().map_err(|e| ebpf_err(format!("reading its info: {e}")))?.id();
        let map = self.ebpf.map(SOCK_STATS_MAP).ok_or_else(|| ebpf_err("stats map missing".into()))?;
        let stats: PerCpuArray<_, SockStats> =
            PerCpuArray::try_from(map).map_err(|e| ebpf_err(format!("stats map: {e}")))?;
        let per_cpu = stats.get(&STATS_CONNECT4, 0).map_err(|e| ebpf_err(format!("reading stats: {e}")))?;
        let total = SockStats::sum(per_cpu.iter());
        Ok(vec![ProgramStatus {
            name: CONNECT4.into(),
            id,
            attached_to: self.cgroup.display().to_string(),
            seen: total.seen,
        }])
    }
}

/// An error with its sources, for messages that must say what the kernel said.
fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        out.push_str(": ");
        out.push_str(&inner.to_string());
        source = inner.source();
    }
    out
}
