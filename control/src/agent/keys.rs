//! The cluster keyring at run time: installing a keyring that a rotation distributed,
//! and running a rotation (`meshctl key rotate`).

use std::{collections::HashSet, time::Instant};

use serde_json::{json, Value};

use super::{persist::write_keyring, Agent};
use crate::{
    gossip::{self as protocol, seal::Keyring},
    model::Object,
    Error, Result,
};

impl Agent {
    /// Installs a keyring distributed by a rotation, persists it, and acknowledges it.
    pub(super) fn sync_keyring(&self) {
        let Some(record) = self.gossip().store().keyring().cloned() else { return };
        let mut generation = self.key_generation.lock();
        if record.generation <= *generation {
            return;
        }
        let keys: Result<Vec<_>, _> = record.keys.iter().map(|k| protocol::seal::Key::from_hex(k)).collect();
        let ring = match keys {
            Ok(keys) if record.primary < keys.len() => Keyring { keys, primary: record.primary },
            _ => {
                tracing::warn!(generation = record.generation, "ignoring a malformed distributed keyring");
                return;
            }
        };
        if let Err(error) = write_keyring(&self.cfg.keyring_file, &ring) {
            tracing::warn!(%error, "could not persist the rotated keyring; a restart would use the old one");
        }
        *self.shared.keyring.write() = ring;
        *generation = record.generation;
        tracing::info!(generation = record.generation, primary = record.primary, "installed rotated keyring");
        let ack = crate::model::KeyAck { node: self.cfg.node_name.clone(), generation: record.generation };
        self.write(|g, now| g.put(Object::KeyAck(ack), now));
    }

    pub(super) fn key_ls(&self) -> Value {
        let ring = self.shared.keyring.read().clone();
        let rows: Vec<Value> = ring
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| json!({ "key": format!("{:08x}", k.hint()), "primary": i == ring.primary }))
            .collect();
        json!(rows)
    }

    /// Rotates the cluster key in three acknowledged steps: every node accepts the new
    /// key; every node seals with it; the old key is dropped.
    pub(super) async fn key_rotate(&self) -> Result<Value> {
        let current = self.shared.keyring.read().clone();
        let new = crate::gossip::seal::Key::generate();
        let old = current.primary().clone();
        // One lock at a time: sync_keyring takes key_generation, then gossip.
        let distributed = self.gossip().store().keyring().map_or(0, |k| k.generation);
        let base = distributed.max(*self.key_generation.lock());
        let steps = [
            (vec![old.to_hex(), new.to_hex()], 0, "accept the new key"),
            (vec![old.to_hex(), new.to_hex()], 1, "seal with the new key"),
            (vec![new.to_hex()], 0, "drop the old key"),
        ];
        for (i, (keys, primary, what)) in steps.into_iter().enumerate() {
            let generation = base + 1 + i as u64;
            let record = crate::model::KeyringRecord { keys, primary, generation };
            self.write(|g, now| g.put(Object::Keyring(record), now));
            let deadline = Instant::now() + std::time::Duration::from_secs(30);
            loop {
                // Every node the cluster knows must acknowledge, unless it is dead or
                // gone: a node this one has not heard from yet still counts, so a
                // rotation never strands a member that is still joining.
                let laggards: Vec<String> = {
                    let gossip = self.gossip();
                    let departed: HashSet<&str> = gossip
                        .members()
                        .filter(|m| {
                            matches!(
                                m.state,
                                crate::gossip::MemberState::Dead | crate::gossip::MemberState::Left
                            )
                        })
                        .map(|m| m.name.as_str())
                        .collect();
                    gossip
                        .store()
                        .nodes()
                        .map(|n| n.name.as_str())
                        .filter(|n| !departed.contains(n))
                        .filter(|n| gossip.store().key_ack(n) < generation)
                        .map(String::from)
                        .collect()
                };
                if laggards.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(Error::invalid(format!(
                        "key rotation stopped at step {} ({what}): nodes {} have not acknowledged after 30 s; \
                         check them with `meshctl node ls` and run `meshctl key rotate` again",
                        i + 1,
                        laggards.join(", ")
                    )));
                }
                self.changed();
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        Ok(json!({ "primary": format!("{:08x}", new.hint()), "generation": base + 3 }))
    }
}
