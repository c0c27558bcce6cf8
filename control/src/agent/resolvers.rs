//! The embedded resolvers this node runs: one per local container namespace, each
//! serving `127.0.0.11:53` from sockets meshd opens inside it, all reading one name
//! table. Driven from the reconcile pass: the table is rebuilt from the store and
//! swapped when it changed, and the resolvers running are brought in line with the
//! local task namespaces ([`plan`], pure). Owns nothing but those sockets.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use meshd_dataplane::{
    dns::{adopt_sockets, open_in_netns, NameTable, Resolver, ResolverConfig, TableHandle, RESOLVER_ADDR},
    proxy::handover::Handover,
};

/// How long `meshctl attach` waits for the new container's resolver.
pub const RESOLVER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the resolvers of this node should change: namespaces to stop serving, to
/// start serving (with the networks whose names they see), and running ones whose
/// networks changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ResolverPlan {
    /// Namespaces whose resolver stops.
    pub stop: Vec<String>,
    /// Namespaces that get a resolver, with their networks.
    pub start: Vec<(String, Vec<String>)>,
    /// Running resolvers whose container joined or left a network.
    pub renetwork: Vec<(String, Vec<String>)>,
}

/// The changes from `running` (namespace → networks served) to `desired`.
pub fn plan(
    running: &BTreeMap<String, Vec<String>>,
    desired: &BTreeMap<String, Vec<String>>,
) -> ResolverPlan {
    let mut out = ResolverPlan::default();
    out.stop.extend(running.keys().filter(|ns| !desired.contains_key(*ns)).cloned());
    for (ns, networks) in desired {
        match running.get(ns) {
            None => out.start.push((ns.clone(), networks.clone())),
            Some(have) if have != networks => out.renetwork.push((ns.clone(), networks.clone())),
            Some(_) => {}
        }
    }
    out
}

/// One running resolver and the networks it was given.
struct Running {
    resolver: Resolver,
    networks: Vec<String>,
}

/// This node's resolvers and their shared table.
pub(super) struct Resolvers {
    config: ResolverConfig,
    /// Where forwards are sent from: meshd's own namespace, so upstreams on the
    /// node's loopback (a local caching resolver) are reachable.
    forward_netns: PathBuf,
    table: TableHandle,
    /// The table last handed to the resolvers (swapped only when it differs).
    current: NameTable,
    running: BTreeMap<String, Running>,
    /// The listener keeper, so a container's resolver sockets outlive a restart of
    /// meshd (queries wait in them instead of meeting a closed port).
    handover: Option<std::sync::Arc<Handover>>,
}

/// The keeper's keys of a container's resolver sockets start with this.
fn handover_prefix(netns: &Path) -> String {
    format!("dns/{}/", netns.display())
}

impl Resolvers {
    /// No resolvers yet; every one started later uses `config`.
    pub(super) fn new(config: ResolverConfig) -> Resolvers {
        Resolvers {
            config,
            forward_netns: PathBuf::from("/proc/self/ns/net"),
            table: TableHandle::default(),
            current: NameTable::default(),
            running: BTreeMap::new(),
            handover: None,
        }
    }

    /// Hands the resolvers' sockets over through `handover` (see [`Handover`]).
    pub(super) fn set_handover(&mut self, handover: std::sync::Arc<Handover>) {
        self.handover = Some(handover);
    }

    /// Swaps in `table` if it differs from the one served.
    pub(super) fn set_table(&mut self, table: NameTable) {
        if table != self.current {
            self.table.update(&table);
            self.current = table;
        }
    }

    /// Brings the running resolvers in line with `desired` (namespace → networks).
    /// Returns the resolvers to shut down (the caller awaits them without holding any
    /// lock) and each namespace's start error, keyed like `Seen.errors`; a namespace
    /// that started (or needs nothing) is in `ok`, so its old error can be cleared.
    pub(super) fn apply(&mut self, desired: &BTreeMap<String, Vec<String>>) -> Applied {
        let running: BTreeMap<String, Vec<String>> =
            self.running.iter().map(|(ns, r)| (ns.clone(), r.networks.clone())).collect();
        let plan = plan(&running, desired);
        let mut out = Applied::default();
        for ns in plan.stop {
            if let Some(r) = self.running.remove(&ns) {
                out.stopped.push(r.resolver);
            }
            if let Some(handover) = &self.handover {
                handover.delete(&handover_prefix(Path::new(&ns)));
            }
            out.ok.push(error_key(&ns));
        }
        for (ns, networks) in plan.renetwork {
            if let Some(r) = self.running.get_mut(&ns) {
                r.resolver.set_networks(networks.clone());
                r.networks = networks;
            }
        }
        for (ns, networks) in plan.start {
            match self.start(Path::new(&ns), networks.clone()) {
                Ok(resolver) => {
                    tracing::info!(netns = %ns, ?networks, "resolver serving on 127.0.0.11:53");
                    self.running.insert(ns.clone(), Running { resolver, networks });
                    out.ok.push(error_key(&ns));
                }
                Err(error) => out.failed.push((error_key(&ns), start_error(&ns, &error))),
            }
        }
        out
    }

    fn start(&self, netns: &Path, networks: Vec<String>) -> meshd_dataplane::Result<Resolver> {
        let prefix = handover_prefix(netns);
        let (udp_key, tcp_key) = (format!("{prefix}udp"), format!("{prefix}tcp"));
        let mut adopted = self.handover.as_ref().map(|h| h.claim(&prefix)).unwrap_or_default();
        let sockets = match (adopted.remove(&udp_key), adopted.remove(&tcp_key)) {
            (Some(udp), Some(tcp)) => adopt_sockets(udp, tcp, &self.forward_netns)?,
            partial => {
                // Half a pair (never written so) cannot serve: both go, here and in the
                // keeper, and the port is bound anew.
                drop(partial);
                if let Some(handover) = &self.handover {
                    handover.delete(&prefix);
                }
                let sockets = open_in_netns(netns, RESOLVER_ADDR, Some(&self.forward_netns))?;
                if let Some(handover) = &self.handover {
                    handover.put(&udp_key, &sockets.udp);
                    handover.put(&tcp_key, &sockets.tcp);
                }
                sockets
            }
        };
        Resolver::start(netns, sockets, self.table.clone(), networks, self.config.clone())
    }

    /// Whether a resolver serves namespace `netns`.
    pub(super) fn serving(&self, netns: &str) -> bool {
        self.running.contains_key(netns)
    }

    /// How many resolvers run.
    pub(super) fn count(&self) -> usize {
        self.running.len()
    }

    /// Every resolver, for shutdown.
    pub(super) fn take_all(&mut self) -> Vec<Resolver> {
        std::mem::take(&mut self.running).into_values().map(|r| r.resolver).collect()
    }

    /// The upstreams forwards go to.
    pub(super) fn upstreams(&self) -> &[std::net::SocketAddr] {
        &self.config.upstreams
    }
}

impl super::Agent {
    /// The resolvers' part of a reconcile pass: the table from `store` (tasks of nodes
    /// outside `live` left out), and one resolver per local task namespace. Start
    /// failures (namespace gone, port taken) go into `Seen.errors` and are retried on
    /// the next pass.
    pub(super) async fn reconcile_resolvers(
        &self,
        store: &crate::store::Store,
        live: &std::collections::BTreeSet<String>,
    ) {
        let table = crate::names::name_table(store, live);
        let desired = crate::names::local_resolvers(store, &self.cfg.node_name);
        let applied = {
            let mut resolvers = self.resolvers.lock();
            resolvers.set_table(table);
            resolvers.apply(&desired)
        };
        {
            let mut seen = self.seen.lock();
            for key in &applied.ok {
                seen.errors.remove(key);
            }
            for (key, message) in applied.failed {
                if seen.errors.get(&key) != Some(&message) {
                    tracing::warn!(resolver = %key, %message, "starting a resolver failed; will retry");
                }
                seen.errors.insert(key, message);
            }
        }
        for resolver in applied.stopped {
            tracing::info!(netns = %resolver.netns().display(), "resolver stopped");
            resolver.shutdown().await;
        }
    }

    /// After an attach of `netns`: waits (up to [`RESOLVER_WAIT`]) until a resolver
    /// serves it, then adds `"resolver": "127.0.0.11:53"` to `reply`; if none could
    /// start, `"resolver": null` and `"resolver_error"` say why (the task is attached
    /// either way: its network works, and the reconciler keeps retrying).
    pub(super) async fn report_resolver(&self, netns: &str, reply: &mut serde_json::Value) {
        let deadline = std::time::Instant::now() + RESOLVER_WAIT;
        // The endpoint write woke the reconciler; it starts the resolver in its pass.
        self.changed();
        loop {
            if self.resolvers.lock().serving(netns) {
                reply["resolver"] = serde_json::json!(RESOLVER_ADDR.to_string());
                return;
            }
            let error = self.seen.lock().errors.get(&error_key(netns)).cloned();
            if error.is_some() || std::time::Instant::now() >= deadline {
                reply["resolver"] = serde_json::Value::Null;
                reply["resolver_error"] = serde_json::json!(error.unwrap_or_else(|| format!(
                    "the resolver did not start within {RESOLVER_WAIT:?}; see `meshctl status`"
                )));
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// The resolvers' part of `meshctl status`.
    pub(super) fn resolvers_status(&self) -> serde_json::Value {
        let resolvers = self.resolvers.lock();
        let errors: BTreeMap<String, String> = self
            .seen
            .lock()
            .errors
            .iter()
            .filter(|(key, _)| key.starts_with("resolver in "))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        serde_json::json!({
            "address": RESOLVER_ADDR.to_string(),
            "running": resolvers.count(),
            "upstreams": resolvers.upstreams(),
            "errors": errors,
        })
    }

    /// Stops every resolver (their sockets live in this process).
    pub(super) async fn stop_resolvers(&self) {
        let all = self.resolvers.lock().take_all();
        for resolver in all {
            resolver.shutdown().await;
        }
    }
}

/// The outcome of [`Resolvers::apply`].
#[derive(Default)]
pub(super) struct Applied {
    /// Resolvers removed from service, to be shut down.
    pub stopped: Vec<Resolver>,
    /// Error keys to clear.
    pub ok: Vec<String>,
    /// Error keys with their messages.
    pub failed: Vec<(String, String)>,
}

/// What `meshctl status` says about a resolver that could not start. The dataplane's
/// bind error speaks of published ports; here the fix is in the container.
fn start_error(netns: &str, error: &meshd_dataplane::Error) -> String {
    match error {
        meshd_dataplane::Error::Bind { addr, source } => format!(
            "cannot serve DNS on {addr} in {netns}: {source}; stop what holds that port in the container (meshd retries every second)"
        ),
        other => other.to_string(),
    }
}

/// The key of a namespace's resolver in `meshctl status` errors.
pub(super) fn error_key(netns: &str) -> String {
    format!("resolver in {netns}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        entries
            .iter()
            .map(|(ns, nets)| (ns.to_string(), nets.iter().map(|n| n.to_string()).collect()))
            .collect()
    }

    #[test]
    fn the_plan_is_the_difference() {
        let running = map(&[("/a", &["front"]), ("/b", &["back"]), ("/c", &["front"])]);
        let desired = map(&[("/a", &["front"]), ("/b", &["back", "front"]), ("/d", &["back"])]);
        let p = plan(&running, &desired);
        assert_eq!(p.stop, ["/c"]);
        assert_eq!(p.start, [("/d".to_owned(), vec!["back".to_owned()])]);
        assert_eq!(p.renetwork, [("/b".to_owned(), vec!["back".to_owned(), "front".to_owned()])]);
        assert_eq!(plan(&desired, &desired), ResolverPlan::default());
    }
}
