//! VIPs without BPF: where the socket load balancer cannot run (or `--socket-lb off`),
//! each local container namespace gets meshd's nftables table
//! ([`meshd_dataplane::natlb`]) holding the VIPs of its network
//! ([`crate::reconcile::nat_tables`]). Driven from the reconcile pass like the rest.
//!
//! Each table costs an `nft` process to read back, so the loop does not observe every
//! namespace every second: it remembers what it wrote, writes when the wanted table
//! differs, and reads a namespace back when it has no record of it (a restart adopts
//! what the previous run left) or its record is older than [`NAT_REREAD`] — a hand
//! edit is repaired within that.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use meshd_dataplane::natlb;

use crate::reconcile::FrontendTable;

/// How long a remembered table is trusted before it is read back from the kernel.
pub const NAT_REREAD: Duration = Duration::from_secs(10);

/// The tables this node's fallback holds, as last written or read.
#[derive(Default)]
pub(super) struct NatFallback {
    tables: BTreeMap<PathBuf, (FrontendTable, Instant)>,
}

impl NatFallback {
    /// VIP → backends over every namespace's table (what `meshctl status` shows).
    pub(super) fn vips(&self) -> BTreeMap<std::net::Ipv4Addr, Vec<std::net::Ipv4Addr>> {
        let mut out: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for (table, _) in self.tables.values() {
            for (frontend, backends) in table {
                let entry = out.entry(frontend.addr).or_default();
                entry.extend(backends.iter().map(|b| b.addr));
                entry.sort();
                entry.dedup();
            }
        }
        out
    }

    /// How many container namespaces hold a table.
    pub(super) fn namespaces(&self) -> usize {
        self.tables.len()
    }
}

/// One namespace's work in a pass.
enum Work {
    /// Read back, then write if it differs.
    Check(PathBuf, FrontendTable),
    /// Write (the remembered table differs).
    Write(PathBuf, FrontendTable),
    /// The namespace's task left: remove meshd's table (if the namespace still exists).
    Remove(PathBuf),
}

impl super::Agent {
    /// The fallback's part of a reconcile pass: every local task namespace holds the
    /// VIPs of its network (`want`, from [`crate::reconcile::nat_tables`]). Failures go
    /// into `Seen.errors` and are retried on the next pass.
    pub(super) async fn reconcile_nat(&self, want: BTreeMap<PathBuf, FrontendTable>) {
        let Some(nat) = &self.nat else { return };
        let work: Vec<Work> = {
            let state = nat.lock();
            let mut work: Vec<Work> = state
                .tables
                .keys()
                .filter(|ns| !want.contains_key(*ns))
                .map(|ns| Work::Remove(ns.clone()))
                .collect();
            for (ns, table) in want {
                match state.tables.get(&ns) {
                    Some((held, at)) if at.elapsed() < NAT_REREAD => {
                        if *held != table {
                            work.push(Work::Write(ns, table));
                        }
                    }
                    _ => work.push(Work::Check(ns, table)),
                }
            }
            work
        };
        if work.is_empty() {
            return;
        }
        // `nft` runs as a process (bounded by natlb::NFT_TIMEOUT): off the runtime.
        let results =
            match tokio::task::spawn_blocking(move || work.into_iter().map(run).collect::<Vec<_>>()).await {
                Ok(results) => results,
                Err(error) => {
                    // Nothing is known of what was written: read every table back next pass.
                    tracing::error!(%error, "the nftables VIP pass failed; will read the tables back");
                    nat.lock().tables.clear();
                    self.seen.lock().errors.insert("nftables VIP tables".into(), error.to_string());
                    return;
                }
            };
        self.seen.lock().errors.remove("nftables VIP tables");
        let mut state = nat.lock();
        let mut seen = self.seen.lock();
        for (ns, outcome) in results {
            let key = format!("nftables VIP table in {}", ns.display());
            match outcome {
                Ok(Some(table)) => {
                    state.tables.insert(ns, (table, Instant::now()));
                    seen.errors.remove(&key);
                }
                Ok(None) => {
                    state.tables.remove(&ns);
                    seen.errors.remove(&key);
                }
                Err(message) => {
                    if seen.errors.get(&key) != Some(&message) {
                        tracing::warn!(op = %key, %message, "dataplane operation failed; will retry");
                    }
                    // Forget it: the next pass reads it back.
                    state.tables.remove(&ns);
                    seen.errors.insert(key, message);
                }
            }
        }
    }
}

/// Does one namespace's work; `Ok(Some(table))`: the namespace now holds `table`;
/// `Ok(None)`: it holds nothing of meshd's.
fn run(work: Work) -> (PathBuf, Result<Option<FrontendTable>, String>) {
    match work {
        Work::Remove(ns) => {
            let out = if ns.exists() { natlb::remove(&ns).map(|()| None) } else { Ok(None) };
            (ns, out.map_err(|e| e.to_string()))
        }
        Work::Write(ns, table) => {
            let out = natlb::apply(&ns, &table).map(|()| Some(table));
            (ns, out.map_err(|e| e.to_string()))
        }
        Work::Check(ns, table) => {
            let out = natlb::observe(&ns).and_then(|held| {
                if held != table {
                    natlb::apply(&ns, &table)?;
                }
                Ok(Some(table))
            });
            (ns, out.map_err(|e| e.to_string()))
        }
    }
}
