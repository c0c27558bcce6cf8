extern crate std;

use std::vec::Vec;

use etherparse::{Ethernet2Header, IpNumber, Ipv4Header, PacketBuilder, SlicedPacket, TransportSlice};

use super::*;
use crate::{ingress::DSR_MARKER, ip4_raw, port_raw};

fn tcp_packet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([1; 6], [2; 6]).ipv4(src, dst, 64).tcp(sport, dport, 1234, 512).syn();
    let payload = b"hello, mesh";
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn udp_packet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([1; 6], [2; 6]).ipv4(src, dst, 64).udp(sport, dport);
    let mut out = Vec::new();
    b.write(&mut out, b"datagram!").unwrap();
    out
}

fn word(p: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([p[at], p[at + 1]])
}

fn tuple(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Tuple {
    Tuple {
        src_raw: ip4_raw(src),
        dst_raw: ip4_raw(dst),
        sport_raw: port_raw(sport),
        dport_raw: port_raw(dport),
    }
}

#[test]
fn incremental_rewrite_matches_full_recomputation() {
    let cases = [
        (([198, 18, 0, 100], [198, 18, 0, 11], 40000, 3000), ([198, 18, 0, 100], [10, 0, 0, 5], 40000, 80)),
        (([198, 18, 0, 100], [198, 18, 0, 11], 40000, 3000), ([10, 0, 0, 1], [10, 0, 0, 5], 61234, 80)),
        (([10, 0, 0, 5], [10, 0, 0, 1], 80, 61234), ([198, 18, 0, 11], [198, 18, 0, 100], 3000, 40000)),
        (([255, 255, 255, 255], [0, 0, 0, 0], 65535, 0), ([0, 0, 0, 1], [255, 255, 0, 0], 1, 65535)),
    ];
    for ((s, d, sp, dp), (ns, nd, nsp, ndp)) in cases {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let build = |s, d, sp, dp| {
                if proto == IPPROTO_TCP {
                    tcp_packet(s, d, sp, dp)
                } else {
                    udp_packet(s, d, sp, dp)
                }
            };
            let before = build(s, d, sp, dp);
            let expected = build(ns, nd, nsp, ndp);
            let l4_check = if proto == IPPROTO_TCP { 34 + 16 } else { 34 + 6 };
            let (old, new) = (tuple(s, d, sp, dp), tuple(ns, nd, nsp, ndp));
            assert_eq!(ipv4_check_after(word(&before, 24), &old, &new), word(&expected, 24), "ip {proto}");
            assert_eq!(
                l4_check_after(word(&before, l4_check), proto, &old, &new),
                word(&expected, l4_check),
                "l4 {proto} {old:?} -> {new:?}"
            );
        }
    }
}

#[test]
fn udp_without_checksum_stays_without() {
    let old = tuple([1, 2, 3, 4], [5, 6, 7, 8], 1, 2);
    let new = tuple([9, 9, 9, 9], [5, 6, 7, 8], 3, 2);
    assert_eq!(l4_check_after(0, IPPROTO_UDP, &old, &new), 0);
}

#[test]
fn udp_checksum_never_becomes_zero() {
    // Search for a rewrite whose incremental result would be 0x0000.
    let old = tuple([1, 2, 3, 4], [5, 6, 7, 8], 1, 2);
    let mut hit = false;
    for p in 0..=u16::MAX {
        let new = Tuple { sport_raw: p, ..old };
        let c = l4_check_after(0x1234, IPPROTO_UDP, &old, &new);
        assert_ne!(c, 0);
        let tcp = l4_check_after(0x1234, IPPROTO_TCP, &old, &new);
        if tcp == 0xffff || tcp == 0 {
            hit = true;
            assert_eq!(c, 0xffff);
        }
    }
    assert!(hit, "the search reached the all-ones case");
}

#[test]
fn ipv4_checksum_matches_etherparse() {
    let mut h = Ipv4Header::new(100, 64, IpNumber::UDP, [198, 18, 0, 11], [198, 18, 0, 12]).unwrap();
    h.identification = 0xbeef;
    h.header_checksum = h.calc_header_checksum();
    let bytes = h.to_bytes();
    let arr: [u8; IPV4_LEN] = bytes[..].try_into().unwrap();
    assert_eq!(ipv4_checksum(&arr), word(&arr, 10));
    assert_eq!(h.calc_header_checksum().to_be_bytes(), word(&arr, 10).to_ne_bytes());
}

fn header(ver_ihl: u8, tot_len: u16, frag: u16, proto: u8) -> [u8; IPV4_LEN] {
    let mut h = [0u8; IPV4_LEN];
    h[0] = ver_ihl;
    h[2..4].copy_from_slice(&tot_len.to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[9] = proto;
    h
}

#[test]
fn ipv4_verdicts() {
    assert_eq!(check_ipv4(&header(0x45, 40, 0, 6), 40), Ipv4Verdict::Plain { proto: 6, tot_len: 40 });
    assert_eq!(
        check_ipv4(&header(0x45, 40, 0x4000, 6), 46),
        Ipv4Verdict::Plain { proto: 6, tot_len: 40 },
        "DF, padding"
    );
    assert_eq!(check_ipv4(&header(0x46, 44, 0, 6), 44), Ipv4Verdict::Pass, "options");
    assert_eq!(check_ipv4(&header(0x45, 40, 0x2000, 6), 40), Ipv4Verdict::Pass, "more fragments");
    assert_eq!(check_ipv4(&header(0x45, 40, 0x0010, 6), 40), Ipv4Verdict::Pass, "offset");
    assert_eq!(check_ipv4(&header(0x45, 41, 0, 6), 40), Ipv4Verdict::Pass, "tot_len beyond the frame");
    assert_eq!(check_ipv4(&header(0x44, 40, 0, 6), 40), Ipv4Verdict::Malformed, "ihl 4");
    assert_eq!(check_ipv4(&header(0x65, 40, 0, 6), 40), Ipv4Verdict::Malformed, "version 6");
    assert_eq!(check_ipv4(&header(0x45, 19, 0, 6), 40), Ipv4Verdict::Malformed, "tot_len below header");
}

#[test]
fn tcp_flags_and_offsets() {
    assert!(tcp_opens(TCP_SYN));
    assert!(!tcp_opens(TCP_SYN | TCP_ACK));
    assert!(!tcp_opens(TCP_ACK));
    assert!(tcp_doff_valid(0x50));
    assert!(!tcp_doff_valid(0x40));
}

#[test]
fn vxlan_source_ports_stay_ephemeral() {
    for h in [0u32, 1, 0xffff, 0xffff_ffff, 0x8000_0000, 12345678] {
        let p = vxlan_src_port(h);
        assert!((EPHEMERAL_MIN..=EPHEMERAL_MAX).contains(&p), "{h}: {p}");
    }
    assert_ne!(vxlan_src_port(0x1234_5678), vxlan_src_port(0x8765_4321));
}

#[test]
fn vxlan_header_bytes_and_dsr_mark() {
    assert_eq!(vxlan_header(0x0012_3456, None), [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
    let marked = vxlan_header(42, Some(port_raw(3000)));
    assert_eq!(marked, [0x08, DSR_MARKER, 0x0b, 0xb8, 0, 0, 42, 0]);
    assert_eq!(vxlan_dsr_port(&marked), Some(port_raw(3000)));
    assert_eq!(vxlan_dsr_port(&vxlan_header(42, None)), None);
    assert_eq!(vxlan_dsr_port(&[0, DSR_MARKER, 1, 2, 0, 0, 42, 0]), None, "no I flag");
}

#[test]
fn outer_headers_parse_as_the_kernel_writes_them() {
    let inner = tcp_packet([198, 18, 0, 100], [10, 0, 0, 5], 40000, 80);
    let o = Outer {
        dmac: [0xaa; 6],
        smac: [0xbb; 6],
        src_raw: ip4_raw([198, 18, 0, 11]),
        dst_raw: ip4_raw([198, 18, 0, 12]),
        id_raw: 0x1234,
        sport: 50000,
        inner_len: inner.len() as u16,
        vni: 4097,
        dsr_port_raw: None,
    };
    let mut h = [0xffu8; OUTER_LEN];
    write_outer_headers(&mut h, &o);
    let mut frame = h.to_vec();
    frame.extend_from_slice(&inner);
    let mut expected = Vec::new();
    let mut ip = Ipv4Header::new(
        (UDP_LEN + VXLAN_LEN + inner.len()) as u16,
        64,
        IpNumber::UDP,
        [198, 18, 0, 11],
        [198, 18, 0, 12],
    )
    .unwrap();
    ip.dont_fragment = false;
    ip.identification = u16::from_be_bytes(0x1234u16.to_ne_bytes());
    ip.header_checksum = ip.calc_header_checksum();
    Ethernet2Header { source: [0xbb; 6], destination: [0xaa; 6], ether_type: etherparse::EtherType::IPV4 }
        .write(&mut expected)
        .unwrap();
    ip.write(&mut expected).unwrap();
    expected.extend_from_slice(&50000u16.to_be_bytes());
    expected.extend_from_slice(&4789u16.to_be_bytes());
    expected.extend_from_slice(&((UDP_LEN + VXLAN_LEN + inner.len()) as u16).to_be_bytes());
    expected.extend_from_slice(&[0, 0]);
    expected.extend_from_slice(&[0x08, 0, 0, 0, 0, 0x10, 0x01, 0]);
    expected.extend_from_slice(&inner);
    assert_eq!(frame, expected);
    let parsed = SlicedPacket::from_ethernet(&frame).unwrap();
    let Some(TransportSlice::Udp(udp)) = parsed.transport else { panic!("outer UDP") };
    assert_eq!(udp.destination_port(), 4789);
}

/// An ICMP frag-needed from a router, quoting `quoted` (an Ethernet frame) from its IPv4
/// header on, up to the header and 8 transport bytes.
fn frag_needed(quoted: &[u8]) -> Vec<u8> {
    let quote = &quoted[14..14 + 20 + 8];
    let mut out = Vec::new();
    PacketBuilder::ethernet2([1; 6], [2; 6])
        .ipv4([192, 0, 2, 1], [198, 18, 0, 11], 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(&mut out, quote)
        .unwrap();
    out
}

#[test]
fn icmp_quote_rewrite_matches_full_recomputation() {
    for proto in [IPPROTO_TCP, IPPROTO_UDP] {
        let build = |s, d, sp, dp| {
            if proto == IPPROTO_TCP {
                tcp_packet(s, d, sp, dp)
            } else {
                udp_packet(s, d, sp, dp)
            }
        };
        // The reply the node sent to the client, then as the task sent it.
        let (s, d, sp, dp) = ([198, 18, 0, 11], [198, 18, 0, 100], 3000, 40000);
        let (ns, nd, nsp, ndp) = ([10, 0, 0, 5], [10, 0, 0, 1], 80, 61234);
        let before = frag_needed(&build(s, d, sp, dp));
        let after = frag_needed(&build(ns, nd, nsp, ndp));
        let q = 14 + 20 + ICMP_LEN;
        let checks = quote_checks_after(
            word(&before, 14 + 20 + 2),
            word(&before, q + 10),
            word(&before, q + 20 + 6),
            proto,
            &tuple(s, d, sp, dp),
            &tuple(ns, nd, nsp, ndp),
        );
        assert_eq!(checks.ip_raw, word(&after, q + 10), "quoted IPv4 {proto}");
        assert_eq!(checks.l4_raw, word(&after, q + 20 + 6), "quoted transport word {proto}");
        assert_eq!(checks.icmp_raw, word(&after, 14 + 20 + 2), "ICMP {proto}");
    }
    assert!(icmp_is_flow_error(ICMP_DEST_UNREACH) && icmp_is_flow_error(ICMP_TIME_EXCEEDED));
    assert!(!icmp_is_flow_error(8), "echo request");
}

#[test]
fn a_tuple_reads_the_addresses_where_ipv4_keeps_them() {
    let mut hdr = [0u8; IPV4_LEN];
    hdr[12..16].copy_from_slice(&[198, 18, 0, 100]);
    hdr[16..20].copy_from_slice(&[198, 18, 0, 11]);
    let t = Tuple::of_ipv4(&hdr, [40_000u16.to_be(), 3000u16.to_be()]);
    assert_eq!(t.src_raw.to_ne_bytes(), [198, 18, 0, 100]);
    assert_eq!(t.dst_raw.to_ne_bytes(), [198, 18, 0, 11]);
    assert_eq!((u16::from_be(t.sport_raw), u16::from_be(t.dport_raw)), (40_000, 3000));
}
