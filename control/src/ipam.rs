//! Address management without a central allocator.
//!
//! A network's subnet is cut into blocks of 16 addresses. A node claims whole blocks
//! (starting at a block chosen by a stable hash of its name, so nodes rarely race for
//! the same one) and hands out task addresses only from blocks it owns. Claims are
//! replicated like any object; concurrent claims of one block resolve to the same
//! owner everywhere (see [`crate::store::Store::put_claim`]), and a node uses a new
//! block only once every live peer has seen its claim. All functions here are pure.

use std::{collections::HashSet, net::Ipv4Addr};

use ipnet::Ipv4Net;
use meshd_dataplane::overlay::MacAddr;

/// Prefix length of one block: 16 addresses.
pub const BLOCK_PREFIX: u8 = 28;

/// The prefix length of `subnet`'s blocks (a subnet smaller than a block is one block).
fn block_prefix(subnet: Ipv4Net) -> u8 {
    subnet.prefix_len().max(BLOCK_PREFIX)
}

/// How many blocks `subnet` holds.
pub fn block_count(subnet: Ipv4Net) -> u32 {
    1u32 << (block_prefix(subnet) - subnet.prefix_len())
}

/// The addresses of block `index` that may be given out: all but the subnet's network
/// and broadcast addresses.
pub fn block_addresses(subnet: Ipv4Net, index: u32) -> impl Iterator<Item = Ipv4Addr> {
    let size = 1u32 << (32 - block_prefix(subnet));
    let first = u32::from(subnet.network()) + index * size;
    let (net, bcast) = (subnet.network(), subnet.broadcast());
    (first..first + size).map(Ipv4Addr::from).filter(move |ip| *ip != net && *ip != bcast)
}

/// The block `node` should claim next on a subnet with `blocks` blocks, given the
/// indexes already claimed by anyone: its preferred block, or the next free one after it.
pub fn next_free_block(node: &str, blocks: u32, claimed: &HashSet<u32>) -> Option<u32> {
    let start = (crate::hash::fnv1a_64(node.as_bytes()) % u64::from(blocks)) as u32;
    (0..blocks).map(|i| (start + i) % blocks).find(|i| !claimed.contains(i))
}

/// The first address of `owned` blocks (in the order given) that is not in `used`.
pub fn allocate(subnet: Ipv4Net, owned: &[u32], used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    owned.iter().flat_map(|&b| block_addresses(subnet, b)).find(|ip| !used.contains(ip))
}

/// The MAC address of an overlay address: `02:42` followed by the IPv4 bytes, as Docker
/// does. Unique on a network because addresses are, and locally administered.
pub fn mac_for_ip(ip: Ipv4Addr) -> MacAddr {
    let [a, b, c, d] = ip.octets();
    MacAddr([0x02, 0x42, a, b, c, d])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn a_slash_24_has_sixteen_blocks_without_network_and_broadcast() {
        let subnet = net("10.0.0.0/24");
        assert_eq!(block_count(subnet), 16);
        let first: Vec<_> = block_addresses(subnet, 0).collect();
        assert_eq!(first.len(), 15);
        assert_eq!(first[0], Ipv4Addr::new(10, 0, 0, 1));
        let last: Vec<_> = block_addresses(subnet, 15).collect();
        assert_eq!(last.last(), Some(&Ipv4Addr::new(10, 0, 0, 254)));
    }

    #[test]
    fn a_tiny_subnet_is_one_block() {
        let subnet = net("10.9.0.0/30");
        assert_eq!(block_count(subnet), 1);
        assert_eq!(block_addresses(subnet, 0).count(), 2);
    }

    #[test]
    fn next_free_block_skips_claimed_and_wraps() {
        let start = next_free_block("n1", 4, &HashSet::new()).unwrap();
        let claimed: HashSet<u32> = [start].into();
        assert_eq!(next_free_block("n1", 4, &claimed), Some((start + 1) % 4));
        let all: HashSet<u32> = (0..4).collect();
        assert_eq!(next_free_block("n1", 4, &all), None);
    }

    #[test]
    fn allocate_takes_the_first_unused_address_of_owned_blocks() {
        let subnet = net("10.0.0.0/24");
        let used: HashSet<_> = [Ipv4Addr::new(10, 0, 0, 16)].into();
        assert_eq!(allocate(subnet, &[1], &used), Some(Ipv4Addr::new(10, 0, 0, 17)));
        let full: HashSet<_> = block_addresses(subnet, 1).collect();
        assert_eq!(allocate(subnet, &[1], &full), None);
    }

    #[test]
    fn mac_embeds_the_address() {
        assert_eq!(mac_for_ip(Ipv4Addr::new(10, 0, 0, 5)).to_string(), "02:42:0a:00:00:05");
    }
}
