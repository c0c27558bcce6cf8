//! The health checker: probes this node's own tasks as their services' checks say and
//! writes a task's health into the cluster state when it flips (the judging is in
//! `crate::health`).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::task::JoinSet;

use super::Agent;
use crate::{
    health::{probe, Tracker},
    model::{Endpoint, Health, HealthCheck, Key, Object},
};

/// How often the checker looks for due probes.
const TICK: Duration = Duration::from_millis(100);
/// Most probes in flight at once on a node.
const MAX_IN_FLIGHT: usize = 256;

impl Agent {
    /// Runs forever: each task of this node whose service has a check is probed every
    /// interval; a flip is written to its endpoint. A task whose service dropped its
    /// check is healthy again.
    pub(super) async fn health_loop(self: Arc<Self>) {
        let mut trackers: HashMap<String, (Tracker, Instant)> = HashMap::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let (checked, unchecked) = self.local_checks();
            trackers.retain(|id, _| checked.iter().any(|(e, _)| e.id == *id));
            for id in unchecked {
                self.set_health(&id, Health::Healthy);
            }
            let now = Instant::now();
            let mut probes = JoinSet::new();
            for (endpoint, check) in checked {
                let (_, due) = trackers
                    .entry(endpoint.id.clone())
                    .or_insert_with(|| (Tracker::new(endpoint.health), now));
                if now < *due || probes.len() >= MAX_IN_FLIGHT {
                    continue;
                }
                *due = now + Duration::from_millis(check.interval_ms.into());
                probes.spawn(async move {
                    let limit = Duration::from_millis(check.timeout_ms.into());
                    let passed = probe(endpoint.ip, &check.probe, limit).await;
                    (endpoint.id, check, passed)
                });
            }
            while let Some(Ok((id, check, passed))) = probes.join_next().await {
                let Some((tracker, _)) = trackers.get_mut(&id) else { continue };
                if let Some(health) = tracker.record(passed, &check) {
                    tracing::info!(task = %id, ?health, "health check flipped");
                    self.set_health(&id, health);
                }
            }
        }
    }

    /// This node's tasks with their service's check, and the ids of those without one
    /// that are still marked unhealthy.
    fn local_checks(&self) -> (Vec<(Endpoint, HealthCheck)>, Vec<String>) {
        let gossip = self.gossip();
        let store = gossip.store();
        let mut checked = Vec::new();
        let mut unchecked = Vec::new();
        for e in store.endpoints().filter(|e| e.node == self.cfg.node_name) {
            let Some(service) = e.service.as_deref().and_then(|s| store.service(s)) else { continue };
            match &service.health_check {
                Some(check) => checked.push((e.clone(), check.clone())),
                None if e.health != Health::Healthy => unchecked.push(e.id.clone()),
                None => {}
            }
        }
        (checked, unchecked)
    }

    /// Writes `health` into task `id`'s endpoint (if it still exists and differs).
    fn set_health(&self, id: &str, health: Health) {
        self.write(|g, now| {
            let current = match g.store().get(&Key::endpoint(id)) {
                Some(Object::Endpoint(e)) if e.health != health => e.clone(),
                _ => return false,
            };
            g.put(Object::Endpoint(Endpoint { health, ..current }), now)
        });
    }
}
