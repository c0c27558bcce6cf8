//! The pure part of the ingress map writer: from what the maps hold and what control
//! wants, the ordered writes that never let the kernel program read a half-written
//! frontend, and which frontends the kernel path cannot take (the proxy serves them).
//!
//! Invariants the order keeps (a program reading the maps at any instant):
//! - a slot never points to a backend id before that id holds its backend;
//! - a frontend appears (or regains backends) only after its whole table is written;
//! - an id is retired (flags 0) only when no slot of a served frontend points to it;
//! - an id given to another backend gets a new `gen`, so flows remembered for the old
//!   one re-balance instead of following the id to a stranger.

use std::collections::{BTreeMap, BTreeSet};

use meshd_common::{
    ingress::{IngressBackend, IngressFrontend, BACKEND_DRAINING, BACKEND_LIVE, MAX_INGRESS_BACKENDS},
    maglev::{populate, MAGLEV_TABLE_SIZE},
    FrontendKey,
};

/// What the ingress maps hold: read back from the kernel (tables of served frontends
/// only: nothing else is ever read by the program).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngressMaps {
    /// `IN_FRONTENDS`.
    pub frontends: BTreeMap<FrontendKey, IngressFrontend>,
    /// `IN_BACKENDS` entries that are not all zero (retired ids keep their `gen`).
    pub backends: BTreeMap<u32, IngressBackend>,
    /// `IN_MAGLEV`, per table index: its [`MAGLEV_TABLE_SIZE`] slots.
    pub tables: BTreeMap<u32, Vec<u32>>,
}

/// One frontend as control wants it: its mode and backends (flags `BACKEND_LIVE`,
/// plus `BACKEND_LOCAL` where local; `gen` is ignored), each with a stable Maglev id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedFrontend {
    /// `MODE_SNAT` or `MODE_DSR`.
    pub mode: u8,
    /// Backends in a fixed order (the table depends on it), with their Maglev ids.
    pub backends: Vec<(u64, IngressBackend)>,
    /// Maglev ids of draining backends: they keep their backend id (flows to them
    /// keep working) but get no slot (no new flow).
    pub draining: BTreeSet<u64>,
}

/// One map write, in the order [`plan`] returns them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Remove a frontend (its packets pass to the stack, where the proxy listens).
    DeleteFrontend(FrontendKey),
    /// Write a backend id (a new backend, or a retired one: flags 0).
    PutBackend(u32, IngressBackend),
    /// Write slots of a table: `(slot, backend id)`.
    PutSlots(u32, Vec<(u32, u32)>),
    /// Insert or update a frontend.
    PutFrontend(FrontendKey, IngressFrontend),
}

/// The outcome of [`plan`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The writes, in order.
    pub writes: Vec<Write>,
    /// Frontends the kernel path cannot serve, with the reason (the proxy serves them).
    pub unserved: BTreeMap<FrontendKey, String>,
    /// The tables as they will be after the writes, of every frontend written with
    /// backends (what a read-back must find).
    pub tables: BTreeMap<u32, Vec<u32>>,
}

/// The stable Maglev id of a backend at `addr_raw:port_raw` (its slot preferences
/// depend only on it, so other backends joining or leaving move few of its slots).
pub fn maglev_id(addr_raw: u32, port_raw: u16) -> u64 {
    (u64::from(addr_raw) << 16) | u64::from(port_raw)
}

/// A backend value compared without its generation.
/// A backend value compared without its generation and its draining mark (a task
/// that starts draining keeps its id, so its flows keep it).
fn same_backend(a: &IngressBackend, b: &IngressBackend) -> bool {
    let plain = |v: &IngressBackend| IngressBackend { gen: 0, flags: v.flags & !BACKEND_DRAINING, ..*v };
    plain(a) == plain(b)
}

/// The Maglev table of `backends` whose ids are `ids` (slot → backend id).
/// Draining backends (Maglev ids in `draining`) get weight 0: no slot, no new flow.
pub fn build_table(backends: &[(u64, IngressBackend)], draining: &BTreeSet<u64>, ids: &[u32]) -> Vec<u32> {
    let keys: Vec<u64> = backends.iter().map(|(k, _)| *k).collect();
    let weights: Vec<u32> = keys.iter().map(|k| u32::from(!draining.contains(k))).collect();
    let mut table = vec![0u32; MAGLEV_TABLE_SIZE as usize];
    let mut next = vec![0u32; keys.len()];
    if !populate(&keys, &weights, &mut table, &mut next) {
        return Vec::new();
    }
    for slot in table.iter_mut() {
        *slot = ids[*slot as usize];
    }
    table
}

/// The writes that turn `actual` into `desired`, with at most `max_tables` Maglev
/// tables. Id 0 is never handed out, so a zeroed slot never names a live backend.
pub fn plan(actual: &IngressMaps, desired: &BTreeMap<FrontendKey, WantedFrontend>, max_tables: u32) -> Plan {
    let mut out = Plan::default();
    let kept = |key: &FrontendKey| desired.contains_key(key) && actual.frontends.contains_key(key);
    for key in actual.frontends.keys().filter(|k| !desired.contains_key(k)) {
        out.writes.push(Write::DeleteFrontend(*key));
    }
    // Ids a program may still read until this plan rewrites their slots.
    let mut busy: BTreeSet<u32> = BTreeSet::new();
    for (key, frontend) in &actual.frontends {
        if kept(key) && frontend.count > 0 {
            if let Some(table) = actual.tables.get(&frontend.table) {
                busy.extend(table.iter().copied());
            }
        }
    }
    let mut tables_used: BTreeSet<u32> =
        actual.frontends.iter().filter(|(k, _)| kept(k)).map(|(_, f)| f.table).collect();
    let mut assigned: BTreeSet<u32> = BTreeSet::new();
    let in_tables: BTreeSet<u32> = actual.tables.values().flatten().copied().collect();
    let mut next_id = 1u32;
    let mut new_backends = Vec::new();
    let mut frontend_writes = Vec::new();
    for (key, want) in desired {
        let old = actual.frontends.get(key);
        let table = match old {
            Some(f) => f.table,
            None => match (0..max_tables).find(|t| !tables_used.contains(t)) {
                Some(t) => t,
                None => {
                    out.unserved.insert(
                        *key,
                        format!(
                            "all {max_tables} Maglev tables are taken by other published ports (raise --xdp-max-ports)"
                        ),
                    );
                    continue;
                }
            },
        };
        // This frontend's current backends, by value: kept backends keep their id.
        let mut current: Vec<u32> = match (old, old.and_then(|f| actual.tables.get(&f.table))) {
            (Some(f), Some(slots)) if f.count > 0 => {
                slots.iter().copied().collect::<BTreeSet<u32>>().into_iter().collect()
            }
            _ => Vec::new(),
        };
        // A draining backend is in no table: it keeps its id (its flows name it) when
        // a live id with its value is in no table either.
        current.extend(actual.backends.keys().filter(|id| !in_tables.contains(id)));
        let mut ids = Vec::with_capacity(want.backends.len());
        let mut pending = Vec::new();
        let mut exhausted = false;
        for (_, backend) in &want.backends {
            let reuse = current.iter().copied().find(|id| {
                !assigned.contains(id)
                    && actual
                        .backends
                        .get(id)
                        .is_some_and(|b| b.flags & BACKEND_LIVE != 0 && same_backend(b, backend))
            });
            let id = match reuse {
                Some(id) => {
                    // Same task; its draining mark may have changed: rewritten in place,
                    // same generation (its flows stay).
                    if let Some(held) = actual.backends.get(&id).filter(|h| h.flags != backend.flags) {
                        pending.push(Write::PutBackend(id, IngressBackend { gen: held.gen, ..*backend }));
                    }
                    id
                }
                None => {
                    while next_id < MAX_INGRESS_BACKENDS
                        && (busy.contains(&next_id) || assigned.contains(&next_id))
                    {
                        next_id += 1;
                    }
                    if next_id >= MAX_INGRESS_BACKENDS {
                        exhausted = true;
                        break;
                    }
                    let gen = actual.backends.get(&next_id).map_or(0, |b| b.gen.wrapping_add(1));
                    pending.push(Write::PutBackend(next_id, IngressBackend { gen, ..*backend }));
                    next_id
                }
            };
            assigned.insert(id);
            ids.push(id);
        }
        if exhausted {
            out.unserved.insert(
                *key,
                format!(
                    "all {} backend ids are taken (too many tasks behind published ports)",
                    MAX_INGRESS_BACKENDS - 1
                ),
            );
            for id in &ids {
                assigned.remove(id);
            }
            // Its old frontend stays as it is (nothing was written for it).
            if let Some(f) = old {
                tables_used.insert(f.table);
            }
            continue;
        }
        new_backends.extend(pending);
        tables_used.insert(table);
        let count = want.backends.iter().filter(|(k, _)| !want.draining.contains(k)).count() as u32;
        if count > 0 {
            let slots = build_table(&want.backends, &want.draining, &ids);
            let changed: Vec<(u32, u32)> = match actual.tables.get(&table).filter(|_| old.is_some()) {
                Some(held) if held.len() == slots.len() => {
                    (0..slots.len()).filter(|&i| held[i] != slots[i]).map(|i| (i as u32, slots[i])).collect()
                }
                _ => slots.iter().enumerate().map(|(i, id)| (i as u32, *id)).collect(),
            };
            if !changed.is_empty() {
                frontend_writes.push(Write::PutSlots(table, changed));
            }
            out.tables.insert(table, slots);
        }
        let value = IngressFrontend { table, count, mode: want.mode, pad: [0; 3] };
        if old != Some(&value) {
            frontend_writes.push(Write::PutFrontend(*key, value));
        }
    }
    out.writes.extend(new_backends);
    out.writes.extend(frontend_writes);
    // Retire what no served table points to any more.
    let referenced: BTreeSet<u32> = out.tables.values().flatten().copied().collect();
    for (id, backend) in &actual.backends {
        let kept_by_unserved = busy.contains(id) && !referenced.contains(id) && !assigned.contains(id) && {
            // An unserved frontend left as it was still reads its ids.
            out.unserved.keys().any(|k| {
                actual
                    .frontends
                    .get(k)
                    .and_then(|f| actual.tables.get(&f.table))
                    .is_some_and(|t| t.contains(id))
            })
        };
        if backend.flags != 0 && !referenced.contains(id) && !assigned.contains(id) && !kept_by_unserved {
            out.writes.push(Write::PutBackend(*id, IngressBackend { flags: 0, ..*backend }));
        }
    }
    out
}

/// Applies `writes` to an [`IngressMaps`] as the kernel would (tests, simulations).
pub fn replay(state: &mut IngressMaps, writes: &[Write]) {
    for write in writes {
        match write {
            Write::DeleteFrontend(k) => {
                state.frontends.remove(k);
            }
            Write::PutBackend(id, b) => {
                state.backends.insert(*id, *b);
            }
            Write::PutSlots(t, slots) => {
                let table = state.tables.entry(*t).or_insert_with(|| vec![0; MAGLEV_TABLE_SIZE as usize]);
                for (slot, id) in slots {
                    table[*slot as usize] = *id;
                }
            }
            Write::PutFrontend(k, f) => {
                state.frontends.insert(*k, *f);
            }
        }
    }
}

/// Whether every slot of every frontend with backends names a live backend (what a
/// program reading the maps at this instant needs).
pub fn consistent(state: &IngressMaps) -> bool {
    state.frontends.values().filter(|f| f.count > 0).all(|f| {
        state.tables.get(&f.table).is_some_and(|t| {
            t.iter().all(|id| state.backends.get(id).is_some_and(|b| b.flags & BACKEND_LIVE != 0))
        })
    })
}

#[cfg(test)]
mod tests {
    use meshd_common::{
        ingress::{BACKEND_LOCAL, MODE_DSR, MODE_SNAT},
        ip4_raw, port_raw, PROTO_TCP,
    };

    use super::*;

    fn fe(port: u16) -> FrontendKey {
        FrontendKey::new([198, 18, 0, 11], port, PROTO_TCP)
    }

    fn be(last: u8) -> (u64, IngressBackend) {
        let addr_raw = ip4_raw([10, 0, 0, last]);
        let backend = IngressBackend {
            addr_raw,
            vtep_raw: ip4_raw([198, 18, 0, 12]),
            gw_raw: ip4_raw([10, 0, 0, 1]),
            ifindex: 0,
            vni: 4096,
            gen: 0,
            mac: [2, 0, 10, 0, 0, last],
            gw_mac: [2, 0, 10, 0, 0, 1],
            port_raw: port_raw(80),
            flags: BACKEND_LIVE,
        };
        (maglev_id(addr_raw, backend.port_raw), backend)
    }

    fn want(entries: &[(FrontendKey, u8, &[u8])]) -> BTreeMap<FrontendKey, WantedFrontend> {
        entries
            .iter()
            .map(|(k, mode, lasts)| {
                (
                    *k,
                    WantedFrontend {
                        mode: *mode,
                        backends: lasts.iter().map(|&l| be(l)).collect(),
                        draining: BTreeSet::new(),
                    },
                )
            })
            .collect()
    }

    /// Replays the plan write by write, checking every intermediate state; then a
    /// second plan must be empty and the tables must name exactly the wanted backends.
    fn converges(state: &mut IngressMaps, desired: &BTreeMap<FrontendKey, WantedFrontend>, max: u32) -> Plan {
        let p = plan(state, desired, max);
        for write in &p.writes {
            replay(state, std::slice::from_ref(write));
            assert!(consistent(state), "inconsistent after {write:?}");
        }
        // Only served frontends' tables are read back.
        state.tables.retain(|t, _| state.frontends.values().any(|f| f.table == *t && f.count > 0));
        let again = plan(state, desired, max);
        assert_eq!(again.writes, vec![], "a second plan is empty");
        for (key, w) in desired.iter().filter(|(k, _)| !p.unserved.contains_key(k)) {
            let f = state.frontends[key];
            assert_eq!(f.count as usize, w.backends.len());
            assert_eq!(f.mode, w.mode);
            if f.count > 0 {
                let key =
                    |b: &IngressBackend| (b.addr_raw, b.port_raw, b.mac, b.ifindex, b.flags, b.vtep_raw);
                let held: BTreeSet<_> =
                    state.tables[&f.table].iter().map(|id| key(&state.backends[id])).collect();
                let wanted: BTreeSet<_> = w.backends.iter().map(|(_, b)| key(b)).collect();
                assert_eq!(held, wanted);
            }
        }
        p
    }

    #[test]
    fn a_new_frontend_gets_backends_then_slots_then_appears() {
        let mut state = IngressMaps::default();
        let p = converges(&mut state, &want(&[(fe(3000), MODE_SNAT, &[2, 3])]), 4);
        let kinds: Vec<u8> = p
            .writes
            .iter()
            .map(|w| match w {
                Write::PutBackend(..) => 0,
                Write::PutSlots(..) => 1,
                Write::PutFrontend(..) => 2,
                Write::DeleteFrontend(..) => 3,
            })
            .collect();
        assert_eq!(kinds, [0, 0, 1, 2]);
        assert!(!state.backends.contains_key(&0), "id 0 is never used");
    }

    #[test]
    fn a_joining_backend_rewrites_few_slots_and_keeps_the_others_ids() {
        let mut state = IngressMaps::default();
        converges(&mut state, &want(&[(fe(3000), MODE_SNAT, &[2, 3, 4])]), 4);
        let before = state.backends.clone();
        let p = converges(&mut state, &want(&[(fe(3000), MODE_SNAT, &[2, 3, 4, 5])]), 4);
        let slots: usize =
            p.writes.iter().map(|w| if let Write::PutSlots(_, s) = w { s.len() } else { 0 }).sum();
        // Maglev: about a quarter of the table moves to the newcomer, little else.
        let ideal = MAGLEV_TABLE_SIZE as usize / 4;
        assert!(slots < ideal * 13 / 10, "{slots} slots rewritten, ideal {ideal}");
        for (id, b) in &before {
            assert_eq!(state.backends[id], *b, "kept backends keep their id and value");
        }
    }

    #[test]
    fn a_removed_backend_is_retired_after_its_slots_move_and_its_id_reused_with_a_new_gen() {
        let mut state = IngressMaps::default();
        converges(&mut state, &want(&[(fe(3000), MODE_SNAT, &[2, 3])]), 4);
        let gone = *state.backends.iter().find(|(_, b)| b.mac[5] == 3).unwrap().0;
        let p = converges(&mut state, &want(&[(fe(3000), MODE_SNAT, &[2])]), 4);
        assert!(matches!(p.writes.last(), Some(Write::PutBackend(id, b)) if *id == gone && b.flags == 0));
        let old_gen = state.backends[&gone].gen;
        converges(&mut state, &want(&[(fe(3000), MODE_SNAT, &[2, 7])]), 4);
        let reused = state.backends[&gone];
        assert_eq!(reused.mac[5], 7, "the free id is handed out again");
        assert_eq!(reused.gen, old_gen + 1, "with a new generation");
    }

    #[test]
    fn a_draining_backend_keeps_its_live_id_across_plans_but_no_slot() {
        let mut state = IngressMaps::default();
        converges(&mut state, &want(&[(fe(3000), MODE_SNAT, &[2, 3])]), 4);
        let (draining_id, before) =
            state.backends.iter().find(|(_, b)| b.mac[5] == 3).map(|(i, b)| (*i, *b)).unwrap();
        let mut desired = want(&[(fe(3000), MODE_SNAT, &[2, 3])]);
        let frontend = desired.get_mut(&fe(3000)).unwrap();
        frontend.draining.insert(be(3).0);
        // Twice: the second pass finds it in no table and must still keep its id.
        for _ in 0..2 {
            let p = plan(&state, &desired, 4);
            replay(&mut state, &p.writes);
            assert!(consistent(&state));
            assert_eq!(
                state.backends[&draining_id], before,
                "its id, value and generation stay (flows keep it)"
            );
            let f = state.frontends[&fe(3000)];
            assert_eq!(f.count, 1);
            assert!(state.tables[&f.table].iter().all(|id| *id != draining_id), "it takes no new flow");
        }
        // Detached: now it is retired.
        let p = plan(&state, &want(&[(fe(3000), MODE_SNAT, &[2])]), 4);
        assert!(p
            .writes
            .iter()
            .any(|w| matches!(w, Write::PutBackend(id, b) if *id == draining_id && b.flags == 0)));
    }

    #[test]
    fn mode_changes_rewrite_the_frontend_only_and_empty_frontends_keep_their_table() {
        let mut state = IngressMaps::default();
        converges(&mut state, &want(&[(fe(3000), MODE_SNAT, &[2])]), 4);
        let table = state.frontends[&fe(3000)].table;
        let p = converges(&mut state, &want(&[(fe(3000), MODE_DSR, &[2])]), 4);
        assert_eq!(
            p.writes.len(),
            1,
            "{:?}",
            p.writes.iter().map(std::mem::discriminant).collect::<Vec<_>>()
        );
        converges(&mut state, &want(&[(fe(3000), MODE_DSR, &[])]), 4);
        assert_eq!(state.frontends[&fe(3000)].count, 0);
        assert!(state.backends.values().all(|b| b.flags == 0), "no backend left live");
        converges(&mut state, &want(&[(fe(3000), MODE_DSR, &[4])]), 4);
        assert_eq!(state.frontends[&fe(3000)].table, table);
    }

    #[test]
    fn more_frontends_than_tables_are_left_to_the_proxy_with_the_reason() {
        let mut state = IngressMaps::default();
        let p = converges(
            &mut state,
            &want(&[(fe(1), MODE_SNAT, &[2]), (fe(2), MODE_SNAT, &[2]), (fe(3), MODE_SNAT, &[3])]),
            2,
        );
        assert_eq!(p.unserved.keys().collect::<Vec<_>>(), [&fe(3)]);
        assert!(p.unserved[&fe(3)].contains("--xdp-max-ports"), "{:?}", p.unserved);
        assert!(!state.frontends.contains_key(&fe(3)));
        // One port goes away: the waiting one takes its table.
        let p = converges(&mut state, &want(&[(fe(2), MODE_SNAT, &[2]), (fe(3), MODE_SNAT, &[3])]), 2);
        assert!(p.unserved.is_empty());
        assert!(matches!(p.writes[0], Write::DeleteFrontend(k) if k == fe(1)));
        assert_ne!(state.frontends[&fe(2)].table, state.frontends[&fe(3)].table);
    }

    #[test]
    fn local_flag_or_new_veth_makes_a_new_backend() {
        let mut state = IngressMaps::default();
        converges(&mut state, &want(&[(fe(3000), MODE_SNAT, &[2])]), 4);
        let mut w = want(&[(fe(3000), MODE_SNAT, &[2])]);
        let b = &mut w.get_mut(&fe(3000)).unwrap().backends[0].1;
        b.flags |= BACKEND_LOCAL;
        b.ifindex = 42;
        converges(&mut state, &w, 4);
        let live: Vec<_> = state.backends.values().filter(|b| b.flags != 0).collect();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].ifindex, 42);
    }

    #[test]
    fn random_transitions_stay_consistent_and_converge() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut state = IngressMaps::default();
        for _ in 0..12 {
            let mut d = BTreeMap::new();
            for port in 0..(next() % 4) as u16 {
                let n = (next() % 4) as u8;
                let lasts: BTreeSet<u8> = (0..n).map(|_| (next() % 6) as u8 + 2).collect();
                let mode = if next() % 2 == 0 { MODE_SNAT } else { MODE_DSR };
                d.insert(
                    fe(port + 1),
                    WantedFrontend {
                        mode,
                        backends: lasts.into_iter().map(be).collect(),
                        draining: BTreeSet::new(),
                    },
                );
            }
            converges(&mut state, &d, 2);
        }
    }
}
