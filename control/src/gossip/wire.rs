//! Gossip messages and their encoding: compact binary (postcard) packets that fit one
//! UDP datagram, each carrying a protocol message and as many piggybacked updates as
//! fit. Pure codec; sealing is in [`super::seal`].

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::store::{Entry, Store};

/// What a member is, as the cluster sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Missed a probe; dead unless it refutes in time.
    Suspect,
    /// Confirmed failed.
    Dead,
    /// Left gracefully.
    Left,
}

/// A membership or data update spread by piggybacking.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Update {
    /// `node` is at `addr`, alive at `incarnation`.
    Alive {
        /// The member.
        node: String,
        /// Its gossip address.
        addr: SocketAddr,
        /// Its incarnation.
        incarnation: u64,
    },
    /// `from` suspects `node` at `incarnation`.
    Suspect {
        /// The member.
        node: String,
        /// The incarnation suspected.
        incarnation: u64,
        /// Who suspects it.
        from: String,
    },
    /// `node` is dead at `incarnation`.
    Dead {
        /// The member.
        node: String,
        /// The incarnation declared dead.
        incarnation: u64,
    },
    /// `node` left at `incarnation`.
    Left {
        /// The member.
        node: String,
        /// Its incarnation when leaving.
        incarnation: u64,
    },
    /// A store entry changed.
    Entry {
        /// The store key.
        key: String,
        /// The entry.
        entry: Entry,
    },
}

impl Update {
    /// What the update is about: a newer update on the same subject replaces an older
    /// one in the broadcast queue.
    pub fn subject(&self) -> String {
        match self {
            Update::Alive { node, .. }
            | Update::Suspect { node, .. }
            | Update::Dead { node, .. }
            | Update::Left { node, .. } => format!("member/{node}"),
            Update::Entry { key, .. } => format!("entry/{key}"),
        }
    }
}

/// The protocol part of a packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Are you alive? Answer with `Ack { seq }`.
    Ping {
        /// Probe sequence number.
        seq: u32,
        /// The member this ping is meant for (a restarted node at a re-used address
        /// must not answer for its predecessor).
        target: String,
    },
    /// Please ping `target` for me and relay its ack.
    PingReq {
        /// The requester's sequence number.
        seq: u32,
        /// The member to probe.
        target: String,
        /// Its address.
        target_addr: SocketAddr,
    },
    /// Answer to a ping.
    Ack {
        /// The sequence number answered.
        seq: u32,
    },
    /// Only piggybacked updates.
    Gossip,
}

/// One UDP datagram's content, before sealing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packet {
    /// Sender's node name.
    pub from: String,
    /// Sender's gossip address.
    pub from_addr: SocketAddr,
    /// Sender's process epoch (milliseconds since the Unix epoch at its start).
    pub epoch: u64,
    /// Sender's packet counter within the epoch (replay protection).
    pub seq: u64,
    /// The protocol message.
    pub msg: Msg,
    /// Piggybacked updates.
    pub updates: Vec<Update>,
}

/// A member as exchanged in a full state sync.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Name.
    pub node: String,
    /// Gossip address.
    pub addr: SocketAddr,
    /// Incarnation.
    pub incarnation: u64,
    /// State.
    pub state: MemberState,
}

/// The full state exchanged over TCP (join and anti-entropy).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushPull {
    /// Sender's node name.
    pub from: String,
    /// Whether the sender is joining or resyncing: the receiver answers with its whole
    /// state, unfiltered.
    pub join: bool,
    /// Whether this frame holds the sender's whole store (nothing filtered out): only
    /// such a frame can tell a resyncing node that an entry no longer exists.
    pub complete: bool,
    /// Sender's process epoch (as in [`Packet::epoch`]); with `seq`, replay protection.
    pub epoch: u64,
    /// Sender's push-pull counter within the epoch (set by the driver).
    pub seq: u64,
    /// Sender's wall clock at sending, in ms since the Unix epoch (set by the driver):
    /// frames older than half the tombstone TTL are refused, so a recorded frame can
    /// never bring back an entry whose tombstone has been reaped.
    pub sent_at_ms: u64,
    /// Local bookkeeping, never sent: every entry of the sender's store whose Lamport
    /// counter is at most this is in the frame (see `Gossip::note_pushed`).
    #[serde(skip)]
    pub covers: u64,
    /// Every member the sender knows.
    pub members: Vec<MemberRecord>,
    /// The sender's store.
    pub store: Store,
}

/// Why bytes are not a message.
#[derive(Debug, thiserror::Error)]
#[error("malformed gossip message: {0}")]
pub struct DecodeError(#[from] postcard::Error);

/// Encodes a packet.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("gossip messages always encode")
}

/// Decodes a packet or push-pull state.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DecodeError> {
    Ok(postcard::from_bytes(bytes)?)
}

/// Bytes of postcard's length prefix for a sequence of `n` items.
fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

/// Encodes `packet` with as many of `candidates` (in order) as keep it within `limit`
/// bytes; returns the bytes and the indexes of the updates included. An update too
/// large for any packet is skipped (it travels by TCP sync).
pub fn encode_within(mut packet: Packet, candidates: &[&Update], limit: usize) -> (Vec<u8>, Vec<usize>) {
    packet.updates.clear();
    // postcard writes the update list as a length prefix and the items back to back,
    // so the packet's size is known from each item's size without re-encoding.
    let base = encode(&packet).len() - varint_len(0);
    let mut total_items = 0;
    let mut used = Vec::new();
    for (i, update) in candidates.iter().enumerate() {
        let size = encode(update).len();
        if base + varint_len(used.len() + 1) + total_items + size <= limit {
            total_items += size;
            used.push(i);
            packet.updates.push((*update).clone());
        }
    }
    let bytes = encode(&packet);
    debug_assert!(bytes.len() <= limit || used.is_empty());
    (bytes, used)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet() -> Packet {
        Packet {
            from: "n1".into(),
            from_addr: "198.18.0.11:7946".parse().unwrap(),
            epoch: 1,
            seq: 2,
            msg: Msg::Ping { seq: 7, target: "n2".into() },
            updates: vec![],
        }
    }

    fn alive(i: usize) -> Update {
        Update::Alive {
            node: format!("node-{i:04}"),
            addr: "198.18.0.12:7946".parse().unwrap(),
            incarnation: 3,
        }
    }

    #[test]
    fn packets_round_trip() {
        let mut p = packet();
        p.updates.push(alive(1));
        assert_eq!(decode::<Packet>(&encode(&p)).unwrap(), p);
    }

    #[test]
    fn encode_within_respects_the_limit_and_reports_what_it_took() {
        let candidates: Vec<_> = (0..200).map(alive).collect();
        let refs: Vec<&Update> = candidates.iter().collect();
        let (bytes, used) = encode_within(packet(), &refs, 1400);
        assert!(bytes.len() <= 1400);
        assert!(used.len() > 10 && used.len() < 200, "{}", used.len());
        let decoded: Packet = decode(&bytes).unwrap();
        assert_eq!(decoded.updates.len(), used.len());
    }

    #[test]
    fn truncated_or_garbage_bytes_are_errors() {
        let bytes = encode(&packet());
        for cut in 0..bytes.len() {
            assert!(decode::<Packet>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode::<Packet>(&[0xff; 40]).is_err());
    }
}
