//! Header layouts and checksum arithmetic for the ingress programs (#6): plain functions
//! over integers and byte arrays, so the kernel programs stay thin and every rule here
//! is tested on the host against a full recomputation.
//!
//! Checksums are handled as the packet carries them: a 16-bit word read from the wire
//! as a native integer (`_raw`). One's-complement sums do not depend on the byte order
//! the words are read in (RFC 1071 §2(B)), so swapping is never needed.

/// Ethernet header length (no VLAN tag: a tagged frame is not IPv4 to these programs).
pub const ETH_LEN: usize = 14;
/// IPv4 header length without options (the only length the programs rewrite).
pub const IPV4_LEN: usize = 20;
/// UDP header length.
pub const UDP_LEN: usize = 8;
/// TCP header length without options (the programs touch only its first 20 bytes).
pub const TCP_LEN: usize = 20;
/// VXLAN header length.
pub const VXLAN_LEN: usize = 8;
/// EtherType of IPv4, as the two wire bytes.
pub const ETH_P_IP_BYTES: [u8; 2] = [0x08, 0x00];
/// IPv4 protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IPv4 protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IPv4 protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// TTL of the outer header, as the kernel's VXLAN devices send it
/// (`ip4_dst_hoplimit`, `net.ipv4.ip_default_ttl` = 64).
pub const OUTER_TTL: u8 = 64;
/// Linux's default ephemeral port range (`net.ipv4.ip_local_port_range`), which the
/// kernel's VXLAN devices draw their UDP source ports from (`udp_flow_src_port`).
pub const EPHEMERAL_MIN: u16 = 32_768;
/// Last port of [`EPHEMERAL_MIN`]'s range, inclusive.
pub const EPHEMERAL_MAX: u16 = 60_999;
/// TCP flag SYN (in the flags byte, offset 13 of the TCP header).
pub const TCP_SYN: u8 = 0x02;
/// TCP flag ACK.
pub const TCP_ACK: u8 = 0x10;

/// Folds a 32-bit one's-complement accumulator to 16 bits (not inverted).
pub const fn csum_fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// A checksum field after one 16-bit word it covers changed from `old` to `new`
/// (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`).
pub const fn csum_replace2(check_raw: u16, old: u16, new: u16) -> u16 {
    !csum_fold((!check_raw) as u32 + (!old) as u32 + new as u32)
}

/// As [`csum_replace2`] for a 32-bit field (an address): both halves.
pub const fn csum_replace4(check_raw: u16, old: u32, new: u32) -> u16 {
    let sum = (!check_raw) as u32
        + (!(old as u16)) as u32
        + (!((old >> 16) as u16)) as u32
        + (new as u16) as u32
        + ((new >> 16) as u16) as u32;
    !csum_fold(sum)
}

/// The one's-complement checksum (inverted) of an IPv4 header without options whose
/// checksum field (bytes 10–11) is taken as zero, as the raw word to store.
pub fn ipv4_checksum(hdr: &[u8; IPV4_LEN]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < IPV4_LEN {
        if i != 10 {
            sum += u16::from_ne_bytes([hdr[i], hdr[i + 1]]) as u32;
        }
        i += 2;
    }
    !csum_fold(sum)
}

/// The addresses and ports of a TCP or UDP packet, as the wire carries them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuple {
    /// Source address (raw).
    pub src_raw: u32,
    /// Destination address (raw).
    pub dst_raw: u32,
    /// Source port (raw).
    pub sport_raw: u16,
    /// Destination port (raw).
    pub dport_raw: u16,
}

impl Tuple {
    /// The addresses of the IPv4 header `hdr` and the ports `ports` (source,
    /// destination) of its transport header, as they appear on the wire.
    pub const fn of_ipv4(hdr: &[u8; IPV4_LEN], ports: [u16; 2]) -> Tuple {
        Tuple {
            src_raw: u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]),
            dst_raw: u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]),
            sport_raw: ports[0],
            dport_raw: ports[1],
        }
    }
}

/// The IPv4 header checksum after the addresses changed from `old` to `new`.
pub const fn ipv4_check_after(check_raw: u16, old: &Tuple, new: &Tuple) -> u16 {
    let c = csum_replace4(check_raw, old.src_raw, new.src_raw);
    csum_replace4(c, old.dst_raw, new.dst_raw)
}

/// The TCP or UDP checksum after the addresses (pseudo-header) and ports changed from
/// `old` to `new`. A UDP checksum of 0 means "none" and stays 0; a UDP result of 0 is
/// sent as `0xffff` (RFC 768).
pub const fn l4_check_after(check_raw: u16, proto: u8, old: &Tuple, new: &Tuple) -> u16 {
    if proto == IPPROTO_UDP && check_raw == 0 {
        return 0;
    }
    let mut c = csum_replace4(check_raw, old.src_raw, new.src_raw);
    c = csum_replace4(c, old.dst_raw, new.dst_raw);
    c = csum_replace2(c, old.sport_raw, new.sport_raw);
    c = csum_replace2(c, old.dport_raw, new.dport_raw);
    if proto == IPPROTO_UDP && c == 0 {
        0xffff
    } else {
        c
    }
}

/// ICMP type "destination unreachable" (code 4: fragmentation needed).
pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMP type "time exceeded".
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// ICMP header length (type, code, checksum, 4 bytes of rest).
pub const ICMP_LEN: usize = 8;

/// Whether an ICMP message of this type is an error about one packet (it quotes the
/// packet's IPv4 header and first 8 transport bytes), and so follows that packet's flow.
pub const fn icmp_is_flow_error(icmp_type: u8) -> bool {
    icmp_type == ICMP_DEST_UNREACH || icmp_type == ICMP_TIME_EXCEEDED
}

/// The three checksums of an ICMP error after the packet it quotes is rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuoteChecks {
    /// The ICMP checksum (raw).
    pub icmp_raw: u16,
    /// The quoted IPv4 header's checksum (raw).
    pub ip_raw: u16,
    /// The quoted UDP checksum (raw; unchanged for TCP, whose checksum lies beyond the
    /// 8 quoted bytes a router must include).
    pub l4_raw: u16,
}

/// The checksums of an ICMP error whose quoted packet's addresses and ports change from
/// `old` to `new`: the quoted IPv4 header's and (UDP) transport checksums as for the
/// packet itself, and the ICMP checksum (no pseudo-header: it sums the quoted bytes)
/// over every quoted word that changed. Always inlined: six arguments are more than a
/// BPF function call can pass.
#[inline(always)]
pub const fn quote_checks_after(
    icmp_raw: u16,
    ip_raw: u16,
    l4_raw: u16,
    proto: u8,
    old: &Tuple,
    new: &Tuple,
) -> QuoteChecks {
    let ip = ipv4_check_after(ip_raw, old, new);
    let l4 = if proto == IPPROTO_UDP { l4_check_after(l4_raw, proto, old, new) } else { l4_raw };
    let mut icmp = csum_replace4(icmp_raw, old.src_raw, new.src_raw);
    icmp = csum_replace4(icmp, old.dst_raw, new.dst_raw);
    icmp = csum_replace2(icmp, old.sport_raw, new.sport_raw);
    icmp = csum_replace2(icmp, old.dport_raw, new.dport_raw);
    icmp = csum_replace2(icmp, ip_raw, ip);
    icmp = csum_replace2(icmp, l4_raw, l4);
    QuoteChecks { icmp_raw: icmp, ip_raw: ip, l4_raw: l4 }
}

/// What the programs do with an IPv4 header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv4Verdict {
    /// A plain header (no options, not a fragment, the whole packet present): its
    /// protocol. The transport header starts right after the 20 bytes.
    Plain {
        /// The protocol byte.
        proto: u8,
        /// The total length (host order).
        tot_len: u16,
    },
    /// Valid but not for the fast path (options, a fragment, a packet cut short on the
    /// wire): the stack decides.
    Pass,
    /// A header no host may accept (wrong version, IHL below 5, total length shorter
    /// than the header): drop it.
    Malformed,
}

/// Judges the first 20 bytes of an IPv4 header; `avail` is how many bytes the frame
/// holds from the header's start (Ethernet padding may make it more than the total
/// length).
pub const fn check_ipv4(hdr: &[u8; IPV4_LEN], avail: usize) -> Ipv4Verdict {
    let version = hdr[0] >> 4;
    let ihl = (hdr[0] & 0x0f) as usize;
    let tot_len = u16::from_be_bytes([hdr[2], hdr[3]]);
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    if version != 4 || ihl < 5 || (tot_len as usize) < ihl * 4 {
        return Ipv4Verdict::Malformed;
    }
    // Options, more-fragments or a fragment offset: the stack reassembles and parses.
    if ihl != 5 || frag & 0x3fff != 0 || tot_len as usize > avail {
        return Ipv4Verdict::Pass;
    }
    Ipv4Verdict::Plain { proto: hdr[9], tot_len }
}

/// Whether a TCP data offset (the high nibble of byte 12) is possible (at least 5
/// words). A smaller one is malformed.
pub const fn tcp_doff_valid(byte12: u8) -> bool {
    byte12 >> 4 >= 5
}

/// Whether a TCP flags byte opens a connection: SYN without ACK.
pub const fn tcp_opens(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The UDP source port (host order) of an encapsulated flow, spread over the
/// ephemeral range as the kernel's `udp_flow_src_port` spreads its flow hash, so
/// receivers' RSS sees one flow per inner flow.
pub const fn vxlan_src_port(flow_hash: u32) -> u16 {
    let hash = flow_hash ^ (flow_hash << 16);
    let span = (EPHEMERAL_MAX - EPHEMERAL_MIN) as u64;
    (((hash as u64 * span) >> 32) as u16) + EPHEMERAL_MIN
}

/// The 8-byte VXLAN header: flags (I), the optional DSR mark in the reserved bytes
/// (`crate::ingress::DSR_MARKER`, then the published port, raw), VNI in the top 24
/// bits of the second word.
pub const fn vxlan_header(vni: u32, dsr_port_raw: Option<u16>) -> [u8; VXLAN_LEN] {
    let v = vni.to_be_bytes();
    let (m, p) = match dsr_port_raw {
        Some(port) => (crate::ingress::DSR_MARKER, port.to_ne_bytes()),
        None => (0, [0, 0]),
    };
    [crate::ingress::VXLAN_FLAG_VNI, m, p[0], p[1], v[1], v[2], v[3], 0]
}

/// The published port (raw) a VXLAN header's DSR mark carries, if it has one.
pub const fn vxlan_dsr_port(hdr: &[u8; VXLAN_LEN]) -> Option<u16> {
    if hdr[0] & crate::ingress::VXLAN_FLAG_VNI != 0 && hdr[1] == crate::ingress::DSR_MARKER {
        Some(u16::from_ne_bytes([hdr[2], hdr[3]]))
    } else {
        None
    }
}

/// Everything the outer headers of one encapsulated frame depend on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outer {
    /// Next hop's MAC (from the FIB).
    pub dmac: [u8; 6],
    /// The egress interface's MAC (from the FIB).
    pub smac: [u8; 6],
    /// This node's underlay address (raw).
    pub src_raw: u32,
    /// The backend's node (raw).
    pub dst_raw: u32,
    /// IPv4 identification (raw). The kernel's VXLAN devices send without DF and with
    /// a fresh id per packet; so do the programs.
    pub id_raw: u16,
    /// UDP source port (host order, [`vxlan_src_port`]).
    pub sport: u16,
    /// Bytes of the inner Ethernet frame.
    pub inner_len: u16,
    /// VXLAN network id.
    pub vni: u32,
    /// DSR mark: the published port (raw), or `None`.
    pub dsr_port_raw: Option<u16>,
}

/// Bytes the encapsulation puts in front of the inner frame (`VXLAN_OVERHEAD` = 50).
pub const OUTER_LEN: usize = ETH_LEN + IPV4_LEN + UDP_LEN + VXLAN_LEN;

/// Writes the outer Ethernet, IPv4, UDP and VXLAN headers into `h`, exactly as the
/// kernel's VXLAN devices write them (TTL 64, no DF, UDP checksum 0, destination port
/// 4789). In place, so the kernel program writes straight into the packet.
pub fn write_outer_headers(h: &mut [u8; OUTER_LEN], o: &Outer) {
    h[0..6].copy_from_slice(&o.dmac);
    h[6..12].copy_from_slice(&o.smac);
    h[12..14].copy_from_slice(&ETH_P_IP_BYTES);
    let ip_len = o.inner_len + (IPV4_LEN + UDP_LEN + VXLAN_LEN) as u16;
    let i = ETH_LEN;
    h[i] = 0x45;
    h[i + 1] = 0;
    h[i + 2..i + 4].copy_from_slice(&ip_len.to_be_bytes());
    h[i + 4..i + 6].copy_from_slice(&o.id_raw.to_ne_bytes());
    h[i + 6..i + 8].copy_from_slice(&[0, 0]);
    h[i + 8] = OUTER_TTL;
    h[i + 9] = IPPROTO_UDP;
    h[i + 10..i + 12].copy_from_slice(&[0, 0]);
    h[i + 12..i + 16].copy_from_slice(&o.src_raw.to_ne_bytes());
    h[i + 16..i + 20].copy_from_slice(&o.dst_raw.to_ne_bytes());
    let mut sum = 0u32;
    let mut w = 0;
    while w < IPV4_LEN {
        sum += u16::from_ne_bytes([h[i + w], h[i + w + 1]]) as u32;
        w += 2;
    }
    h[i + 10..i + 12].copy_from_slice(&(!csum_fold(sum)).to_ne_bytes());
    let u = ETH_LEN + IPV4_LEN;
    h[u..u + 2].copy_from_slice(&o.sport.to_be_bytes());
    h[u + 2..u + 4].copy_from_slice(&crate::ingress::VXLAN_PORT.to_be_bytes());
    h[u + 4..u + 6].copy_from_slice(&(o.inner_len + (UDP_LEN + VXLAN_LEN) as u16).to_be_bytes());
    // Checksum 0: IPv4 VXLAN carries none by default in the kernel's devices.
    h[u + 6..u + 8].copy_from_slice(&[0, 0]);
    let v = u + UDP_LEN;
    h[v..v + VXLAN_LEN].copy_from_slice(&vxlan_header(o.vni, o.dsr_port_raw));
}

#[cfg(test)]
mod tests;
