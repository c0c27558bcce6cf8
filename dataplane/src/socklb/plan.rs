//! The pure part of the socket load balancer's map writer: from what the maps hold and
//! what control wants, the ordered writes that never expose a half-written service.

use std::collections::{BTreeMap, BTreeSet};

use meshd_common::{BackendKey, BackendValue, FrontendKey, ServiceValue, SERVICE_FLAGS_NONE};

/// What the service and backend maps hold (read back from the kernel).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    /// [`meshd_common::SERVICES_MAP`]'s entries.
    pub services: BTreeMap<FrontendKey, ServiceValue>,
    /// [`meshd_common::BACKENDS_MAP`]'s entries.
    pub backends: BTreeMap<BackendKey, BackendValue>,
}

/// One map write, in the order [`plan`] returns them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// Insert or overwrite a backend slot.
    PutBackend(BackendKey, BackendValue),
    /// Insert or overwrite a frontend.
    PutService(FrontendKey, ServiceValue),
    /// Remove a frontend.
    DeleteService(FrontendKey),
    /// Remove a backend slot.
    DeleteBackend(BackendKey),
}

/// The writes that turn `actual` into `desired` (frontend → backends in slot order).
///
/// Order guarantees, so a program reading at any moment sees a whole service:
/// - removed frontends are deleted before anything else, and their slots only at the end;
/// - a growing or new service gets its slots before its count is raised (or it appears);
/// - a shrinking service gets its lower count before its slots go;
/// - a service id is never reused while any slot of it remains in `actual`.
pub fn plan(actual: &MapState, desired: &BTreeMap<FrontendKey, Vec<BackendValue>>) -> Vec<Write> {
    let mut writes = Vec::new();
    for key in actual.services.keys().filter(|k| !desired.contains_key(k)) {
        writes.push(Write::DeleteService(*key));
    }
    let mut used_ids: BTreeSet<u32> = actual.services.values().map(|s| s.service_id).collect();
    used_ids.extend(actual.backends.keys().map(|k| k.service_id));
    let mut next_id = 1u32;
    let mut live = BTreeSet::new();
    for (key, backends) in desired {
        let old = actual.services.get(key);
        let service_id = match old {
            Some(service) => service.service_id,
            None => {
                while used_ids.contains(&next_id) {
                    next_id += 1;
                }
                used_ids.insert(next_id);
                next_id
            }
        };
        let count = u16::try_from(backends.len()).unwrap_or(u16::MAX);
        let value = ServiceValue { count, flags: SERVICE_FLAGS_NONE, service_id };
        let slots: Vec<Write> = backends
            .iter()
            .take(usize::from(count))
            .enumerate()
            .filter_map(|(slot, backend)| {
                let slot_key = BackendKey { service_id, slot: slot as u32 };
                live.insert(slot_key);
                (actual.backends.get(&slot_key) != Some(backend))
                    .then_some(Write::PutBackend(slot_key, *backend))
            })
            .collect();
        let service_changed = old != Some(&value);
        let shrinking = old.is_some_and(|o| o.count > count);
        if shrinking {
            writes.push(Write::PutService(*key, value));
            writes.extend(slots);
        } else {
            writes.extend(slots);
            if service_changed {
                writes.push(Write::PutService(*key, value));
            }
        }
    }
    writes.extend(actual.backends.keys().filter(|k| !live.contains(k)).map(|k| Write::DeleteBackend(*k)));
    writes
}

/// Applies `writes` to a [`MapState`] as the kernel would (for tests and simulations).
pub fn replay(state: &mut MapState, writes: &[Write]) {
    for write in writes {
        match *write {
            Write::PutBackend(k, v) => {
                state.backends.insert(k, v);
            }
            Write::PutService(k, v) => {
                state.services.insert(k, v);
            }
            Write::DeleteService(k) => {
                state.services.remove(&k);
            }
            Write::DeleteBackend(k) => {
                state.backends.remove(&k);
            }
        }
    }
}

/// Whether every service in `state` has all its slots `0..count` (what a program
/// reading the maps at this instant needs).
pub fn consistent(state: &MapState) -> bool {
    state.services.values().all(|s| {
        (0..u32::from(s.count))
            .all(|slot| state.backends.contains_key(&BackendKey { service_id: s.service_id, slot }))
    })
}

#[cfg(test)]
mod tests {
    use meshd_common::PROTO_TCP;

    use super::*;

    fn fe(last: u8) -> FrontendKey {
        FrontendKey::new([10, 99, 0, last], 80, PROTO_TCP)
    }

    fn be(last: u8) -> BackendValue {
        BackendValue::new([10, 0, 0, last], 8080)
    }

    /// Replays `writes` one at a time and checks every intermediate state.
    fn apply_checked(state: &mut MapState, writes: &[Write]) {
        for write in writes {
            replay(state, std::slice::from_ref(write));
            assert!(consistent(state), "half-written service after {write:?}: {state:?}");
        }
    }

    fn desired(entries: &[(FrontendKey, &[BackendValue])]) -> BTreeMap<FrontendKey, Vec<BackendValue>> {
        entries.iter().map(|(k, v)| (*k, v.to_vec())).collect()
    }

    fn converges(state: &mut MapState, want: &BTreeMap<FrontendKey, Vec<BackendValue>>) -> Vec<Write> {
        let writes = plan(state, want);
        apply_checked(state, &writes);
        assert_eq!(plan(state, want), vec![], "a second plan is empty");
        for (key, backends) in want {
            let service = state.services[key];
            assert_eq!(usize::from(service.count), backends.len());
            for (slot, backend) in backends.iter().enumerate() {
                assert_eq!(
                    state.backends[&BackendKey { service_id: service.service_id, slot: slot as u32 }],
                    *backend
                );
            }
        }
        assert_eq!(state.services.len(), want.len());
        writes
    }

    #[test]
    fn new_service_gets_slots_before_it_appears() {
        let mut state = MapState::default();
        let writes = converges(&mut state, &desired(&[(fe(1), &[be(1), be(2)])]));
        assert!(matches!(writes.last(), Some(Write::PutService(..))), "{writes:?}");
    }

    #[test]
    fn grow_shrink_and_replace() {
        let mut state = MapState::default();
        converges(&mut state, &desired(&[(fe(1), &[be(1)])]));
        let id = state.services[&fe(1)].service_id;
        converges(&mut state, &desired(&[(fe(1), &[be(1), be(2), be(3)])]));
        let writes = converges(&mut state, &desired(&[(fe(1), &[be(3)])]));
        assert!(
            matches!(writes.first(), Some(Write::PutService(_, ServiceValue { count: 1, .. }))),
            "{writes:?}"
        );
        assert_eq!(state.backends.len(), 1, "shrunk slots deleted");
        converges(&mut state, &desired(&[(fe(1), &[])]));
        assert_eq!(state.services[&fe(1)].count, 0, "no backends: kept, refusing");
        assert_eq!(state.services[&fe(1)].service_id, id, "the id is stable");
    }

    #[test]
    fn removed_service_goes_first_and_its_id_is_not_reused_in_the_same_plan() {
        let mut state = MapState::default();
        converges(&mut state, &desired(&[(fe(1), &[be(1), be(2)])]));
        let old_id = state.services[&fe(1)].service_id;
        let writes = converges(&mut state, &desired(&[(fe(2), &[be(3)])]));
        assert_eq!(writes[0], Write::DeleteService(fe(1)));
        assert_ne!(state.services[&fe(2)].service_id, old_id);
        assert_eq!(state.backends.len(), 1);
    }

    #[test]
    fn unchanged_maps_need_no_writes_and_strays_are_removed() {
        let mut state = MapState::default();
        let want = desired(&[(fe(1), &[be(1)]), (fe(2), &[be(2), be(3)])]);
        converges(&mut state, &want);
        // Damage: a stray slot of an unknown service and a missing slot of a known one.
        state.backends.insert(BackendKey { service_id: 77, slot: 0 }, be(9));
        let id2 = state.services[&fe(2)].service_id;
        state.backends.remove(&BackendKey { service_id: id2, slot: 1 });
        let writes = plan(&state, &want);
        assert_eq!(
            writes,
            vec![
                Write::PutBackend(BackendKey { service_id: id2, slot: 1 }, be(3)),
                Write::DeleteBackend(BackendKey { service_id: 77, slot: 0 }),
            ]
        );
        replay(&mut state, &writes);
        assert_eq!(plan(&state, &want), vec![]);
    }

    #[test]
    fn many_random_transitions_stay_consistent() {
        // A small deterministic generator: every transition between 40 random desired
        // states is replayed write by write and checked.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut state = MapState::default();
        for _ in 0..40 {
            let mut want = BTreeMap::new();
            for f in 0..(next() % 5) as u8 {
                let n = (next() % 5) as u8;
                want.insert(fe(f), (0..n).map(|b| be((next() % 8) as u8 + b)).collect());
            }
            converges(&mut state, &want);
        }
    }
}
