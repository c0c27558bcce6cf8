//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI 2016, §3.4) for the kernel ingress path of #6: the user
//! side fills a lookup table of [`MAGLEV_TABLE_SIZE`] slots with backend indexes
//! ([`populate`]); the kernel hashes a flow's 5-tuple ([`flow_hash`]) and reads
//! `table[hash % size]`. Each backend gets an equal share of slots (to within one per
//! unit of weight), and a backend joining or leaving moves few other slots, so most
//! flows keep their backend without any per-flow state.
//!
//! No allocation: the caller hands in the table and a scratch slice, so this compiles
//! for the BPF target as well (though only the user side populates).

/// Slots in a lookup table: a prime (the permutation needs it), 65,521 as in the paper
/// and in Katran. Larger than 100 × the backends of any one service meshd supports.
pub const MAGLEV_TABLE_SIZE: u32 = 65_521;

/// Marks a slot not yet filled while [`populate`] runs.
pub const EMPTY_SLOT: u32 = u32::MAX;

/// A 64-bit finaliser (splitmix64's): every input bit affects every output bit.
pub const fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A backend's place in the permutation of a table of `size` slots: where its
/// preference list starts (`offset`) and its stride (`skip`, never 0, so with a prime
/// `size` the list visits every slot exactly once). `id` identifies the backend
/// stably (e.g. its address and port), so its preferences do not depend on the others.
pub const fn offset_skip(id: u64, size: u32) -> (u32, u32) {
    let offset = (mix64(id ^ 0x6d61_676c_6576_3031) % size as u64) as u32;
    let skip = (mix64(id ^ 0x6d61_676c_6576_3032) % (size as u64 - 1)) as u32 + 1;
    (offset, skip)
}

/// Fills `table` (its length is the table size: a prime, normally
/// [`MAGLEV_TABLE_SIZE`]) with indexes into `ids`: in turns, each backend takes the
/// next slot of its preference list that is still free, `weights[i]` times per round
/// (weight 0: none). `next` is scratch, one entry per backend. Returns false, leaving
/// the table all [`EMPTY_SLOT`], when there is no backend with a weight (the caller
/// refuses such a service), or when the slices disagree in length.
pub fn populate(ids: &[u64], weights: &[u32], table: &mut [u32], next: &mut [u32]) -> bool {
    for slot in table.iter_mut() {
        *slot = EMPTY_SLOT;
    }
    if ids.len() != weights.len() || ids.len() != next.len() || table.is_empty() {
        return false;
    }
    if weights.iter().all(|&w| w == 0) {
        return false;
    }
    let size = table.len() as u32;
    for n in next.iter_mut() {
        *n = 0;
    }
    let mut filled = 0u32;
    loop {
        for (i, &id) in ids.iter().enumerate() {
            let (offset, skip) = offset_skip(id, size);
            for _ in 0..weights[i] {
                // The next free slot on this backend's list (the list covers every
                // slot, so one is found while any is free).
                let mut slot = permutation(offset, skip, next[i], size);
                while table[slot as usize] != EMPTY_SLOT {
                    next[i] += 1;
                    slot = permutation(offset, skip, next[i], size);
                }
                table[slot as usize] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == size {
                    return true;
                }
            }
        }
    }
}

/// The `j`-th entry of a backend's preference list.
const fn permutation(offset: u32, skip: u32, j: u32, size: u32) -> u32 {
    ((offset as u64 + j as u64 * skip as u64) % size as u64) as u32
}

/// The hash the kernel looks a flow up by: addresses and ports as the packet carries
/// them (raw, network order — any fixed order works as long as both sides agree, and
/// only the kernel computes it) and the protocol. Both halves of one TCP flow's
/// packets in one direction always hash alike; different flows spread evenly.
pub const fn flow_hash(saddr_raw: u32, daddr_raw: u32, sport_raw: u16, dport_raw: u16, proto: u8) -> u32 {
    let addrs = ((saddr_raw as u64) << 32) | daddr_raw as u64;
    let rest = ((sport_raw as u64) << 24) | ((dport_raw as u64) << 8) | proto as u64;
    let h = mix64(mix64(addrs) ^ rest);
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    extern crate std;
    use std::{vec, vec::Vec};

    fn table_for(ids: &[u64], weights: &[u32]) -> Vec<u32> {
        let mut table = vec![0; MAGLEV_TABLE_SIZE as usize];
        let mut next = vec![0; ids.len()];
        assert!(populate(ids, weights, &mut table, &mut next));
        table
    }

    fn backend(i: u64) -> u64 {
        // 10.0.0.i:80 as a stable id.
        (0x0a00_0000 + i) << 16 | 80
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut out = vec![0; n];
        for &b in table {
            out[b as usize] += 1;
        }
        out
    }

    #[test]
    fn every_slot_is_filled_and_shares_differ_by_at_most_one() {
        for n in [1usize, 2, 3, 7, 10, 100] {
            let ids: Vec<u64> = (0..n as u64).map(backend).collect();
            let table = table_for(&ids, &vec![1; n]);
            assert!(table.iter().all(|&b| (b as usize) < n));
            let s = shares(&table, n);
            let (min, max) = (s.iter().min().unwrap(), s.iter().max().unwrap());
            assert!(max - min <= 1, "n={n}: shares {min}..{max}");
        }
    }

    #[test]
    fn weights_give_proportional_shares() {
        let ids: Vec<u64> = (0..3).map(backend).collect();
        let table = table_for(&ids, &[1, 2, 0]);
        let s = shares(&table, 3);
        assert_eq!(s[2], 0, "weight 0 gets nothing");
        let ratio = s[1] as f64 / s[0] as f64;
        assert!((ratio - 2.0).abs() < 0.001, "weight 2 gets twice weight 1: {s:?}");
    }

    #[test]
    fn no_weighted_backend_fills_nothing() {
        let mut table = vec![0; 7];
        assert!(!populate(&[], &[], &mut table, &mut []));
        assert!(!populate(&[backend(1)], &[0], &mut table, &mut [0]));
        assert!(table.iter().all(|&s| s == EMPTY_SLOT));
        assert!(!populate(&[backend(1)], &[1, 1], &mut table, &mut [0]), "lengths disagree");
    }

    #[test]
    fn one_backend_joining_n_moves_about_one_share_of_the_slots() {
        for n in [3u64, 10, 50] {
            let before_ids: Vec<u64> = (0..n).map(backend).collect();
            let mut after_ids = before_ids.clone();
            after_ids.push(backend(n));
            let before = table_for(&before_ids, &vec![1; n as usize]);
            let after = table_for(&after_ids, &vec![1; n as usize + 1]);
            // Slots whose backend changed, other than those the newcomer took.
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| before_ids[**b as usize] != after_ids[**a as usize])
                .count() as f64
                / MAGLEV_TABLE_SIZE as f64;
            let ideal = 1.0 / (n as f64 + 1.0);
            std::eprintln!("n={n}: {moved:.4} of slots moved, ideal {ideal:.4}");
            // Maglev trades a little disruption for perfect balance: the paper's
            // measurements stay within a few percent of the ideal at these sizes.
            assert!(moved <= ideal * 1.25, "n={n}: {moved:.4} of slots moved, ideal {ideal:.4}");
        }
    }

    #[test]
    fn flows_spread_evenly_over_slots() {
        let buckets = 16usize;
        let mut counts = vec![0usize; buckets];
        let flows = 1u32 << 16;
        for i in 0..flows {
            let h = flow_hash(0x6400_12c6 ^ (i >> 8), 0x0b00_12c6, (i & 0xff) as u16, 0xb80b, 6);
            counts[(h % MAGLEV_TABLE_SIZE) as usize % buckets] += 1;
        }
        let mean = flows as usize / buckets;
        for (b, &c) in counts.iter().enumerate() {
            assert!(c.abs_diff(mean) * 10 < mean, "bucket {b}: {c} vs mean {mean}");
        }
        assert_eq!(flow_hash(1, 2, 3, 4, 6), flow_hash(1, 2, 3, 4, 6));
        assert_ne!(flow_hash(1, 2, 3, 4, 6), flow_hash(1, 2, 3, 4, 17));
    }
}
