//! The PROXY protocol, version 2 (the binary header HAProxy's specification defines in
//! its section 2.2), which the proxy writes to a task before the client's bytes when a
//! port is published with `--proxy-protocol v2`: it carries the external client's
//! address and the address it connected to, so a task behind the proxy still learns
//! who its client is (moby#25526).

use std::net::{IpAddr, SocketAddr};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];

/// Version 2, command PROXY (the connection was relayed on behalf of another).
const VERSION_PROXY: u8 = 0x21;
/// Address family and transport: TCP over IPv4, TCP over IPv6.
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;

/// The v2 header for a TCP connection from `client` to `local` (the published
/// address). Both must be of one family; a mixed pair (which a relay never produces)
/// is written with IPv4-mapped IPv6 addresses.
pub fn header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_PROXY);
    match (client.ip(), local.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            out.push(TCP4);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(TCP6);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(src).octets());
            out.extend_from_slice(&v6(dst).octets());
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&local.port().to_be_bytes());
    out
}

/// The client address in a v2 header at the start of `buf`, and the header's length;
/// `None` when `buf` does not start with a complete TCP v2 header (for tests and test
/// servers: the proxy only writes).
pub fn parse(buf: &[u8]) -> Option<(SocketAddr, usize)> {
    if buf.len() < 16 || buf[..12] != SIGNATURE || buf[12] != VERSION_PROXY {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let body = buf.get(16..16 + len)?;
    let client = match buf[13] {
        TCP4 if len >= 12 => {
            SocketAddr::from((<[u8; 4]>::try_from(&body[..4]).ok()?, u16::from_be_bytes([body[8], body[9]])))
        }
        TCP6 if len >= 36 => SocketAddr::from((
            <[u8; 16]>::try_from(&body[..16]).ok()?,
            u16::from_be_bytes([body[32], body[33]]),
        )),
        _ => return None,
    };
    Some((client, 16 + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_header_is_laid_out_as_the_specification_says() {
        let client: SocketAddr = "198.18.0.100:40000".parse().unwrap();
        let local: SocketAddr = "198.18.0.11:3000".parse().unwrap();
        let h = header(client, local);
        let mut expected = SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        expected.extend_from_slice(&[198, 18, 0, 100, 198, 18, 0, 11]);
        expected.extend_from_slice(&[0x9C, 0x40, 0x0B, 0xB8]);
        assert_eq!(h, expected);
        assert_eq!(parse(&h), Some((client, 28)));
    }

    #[test]
    fn an_ipv6_header_round_trips_and_garbage_is_not_a_header() {
        let client: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        let local: SocketAddr = "[2001:db8::2]:3000".parse().unwrap();
        let h = header(client, local);
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(parse(&h), Some((client, 52)));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), None);
        assert_eq!(parse(&h[..20]), None, "truncated");
    }
}
