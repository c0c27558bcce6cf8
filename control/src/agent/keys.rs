//! The cluster keyring at run time: installing a keyring that a rotation distributed,
//! running a rotation (`meshctl key rotate`), and installing a keyring the operator
//! brings out of band (`meshctl key install`). Keys are never logged nor returned:
//! only their 32-bit fingerprints are.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use super::{persist::write_keyring, Agent, CLAIM_SETTLE};
use crate::{
    gossip::{self as protocol, seal::Keyring},
    model::{Key, Object},
    Error, Result,
};

/// How long a rotation waits after claiming the rotation lock before it trusts the
/// claim: a concurrent claim from another node reaches every node well within it.
pub const ROTATION_SETTLE: Duration = CLAIM_SETTLE;

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

    /// Fails unless this node still holds the rotation lock for `claim`.
    fn check_rotation_lock(&self, claim: u64, step: &str) -> Result<()> {
        let gossip = self.gossip();
        match gossip.store().rotation_lock() {
            Some((holder, generation)) if holder == self.cfg.node_name && generation == claim => Ok(()),
            Some((holder, generation)) => Err(Error::invalid(format!(
                "key rotation refused {step}: a concurrent `meshctl key rotate` started on node {holder} \
                 (generation {generation}) holds the keyring; wait until `meshctl key ls` shows one key on \
                 every node, then run `meshctl key rotate` again if you still need a new key"
            ))),
            None => Err(Error::invalid(format!(
                "key rotation refused {step}: the rotation lock vanished; run `meshctl key rotate` again"
            ))),
        }
    }

    /// Rotates the cluster key in three acknowledged steps: every node accepts the new
    /// key; every node seals with it; the old key is dropped. First it claims the
    /// rotation lock and waits for the claim to settle: of two rotations started at
    /// once, exactly one proceeds and the other fails having changed nothing.
    pub(super) async fn key_rotate(&self) -> Result<Value> {
        let base = {
            let gossip = self.gossip();
            let store = gossip.store();
            let distributed = store.keyring().map_or(0, |k| k.generation);
            let locked = store.rotation_lock().map_or(0, |(_, generation)| generation);
            distributed.max(locked).max(store.max_key_ack())
        };
        // One lock at a time: sync_keyring takes key_generation, then gossip.
        let base = base.max(*self.key_generation.lock());
        let claim = base + 1;
        self.write(|g, now| {
            g.claim_rotation(claim, now);
            true
        });
        tokio::time::sleep(ROTATION_SETTLE).await;
        self.check_rotation_lock(claim, "before it started")?;
        let current = self.shared.keyring.read().clone();
        let new = crate::gossip::seal::Key::generate();
        let old = current.primary().clone();
        let steps = [
            (vec![old.to_hex(), new.to_hex()], 0, "accept the new key"),
            (vec![old.to_hex(), new.to_hex()], 1, "seal with the new key"),
            (vec![new.to_hex()], 0, "drop the old key"),
        ];
        for (i, (keys, primary, what)) in steps.into_iter().enumerate() {
            let generation = base + 1 + i as u64;
            self.check_rotation_lock(claim, &format!("at step {} ({what})", i + 1))?;
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
                // No nudge per poll: the write above woke the reconciler (which installs
                // and acknowledges the record here), and acknowledgements from the
                // others arrive by gossip.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        Ok(json!({ "primary": format!("{:08x}", new.hint()), "generation": base + 3 }))
    }

    /// Replaces this node's keyring with `keys` (the first seals) brought by the
    /// operator, persists it (0600, durably), and removes the distributed keyring
    /// record, which may hold the compromised key, so that nothing reinstalls it. Keys
    /// never travel over gossip this way: the operator runs it on every node.
    pub(super) fn key_install(&self, keys: &[String]) -> Result<Value> {
        let keys: Vec<protocol::seal::Key> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                protocol::seal::Key::from_hex(k).map_err(|e| {
                    Error::invalid(format!(
                        "key install: key {} is invalid ({e}); nothing was changed",
                        i + 1
                    ))
                })
            })
            .collect::<Result<_>>()?;
        if keys.is_empty() {
            return Err(Error::invalid("key install: the keyring holds no key; nothing was changed"));
        }
        let ring = Keyring { keys, primary: 0 };
        write_keyring(&self.cfg.keyring_file, &ring)?;
        let hint = format!("{:08x}", ring.primary().hint());
        let count = ring.keys.len();
        *self.shared.keyring.write() = ring;
        self.write(|g, now| g.delete(Key::KEYRING, now));
        tracing::warn!(primary = %hint, keys = count, "installed a keyring given by the operator; gossip with nodes that lack it stops");
        Ok(json!({ "node": self.cfg.node_name, "primary": hint, "keys": count }))
    }
}
