//! The PROXY protocol version 2 header (haproxy's spec, section 2.2): what the front end
//! writes first to a `proxy_protocol = true` pool's connections, and the form in which a
//! connection it delivers to a sluice-worker pool (`handoff::DELIVERED`) names the client's
//! address and the local address it reached.

use std::net::{IpAddr, SocketAddr};

const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const V2_PROXY: u8 = 0x21;
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;

/// The header for a TCP connection from `client` to `local` (the address it reached). An
/// IPv4 client seen on an IPv6 socket (v4-mapped) is written as TCP over IPv4.
pub fn header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let v4 = |a: IpAddr| match a {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    let mut h = Vec::with_capacity(16 + 36);
    h.extend_from_slice(&SIGNATURE);
    h.push(V2_PROXY);
    match (v4(client.ip()), v4(local.ip())) {
        (Some(src), Some(dst)) => {
            h.push(TCP4);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&src.octets());
            h.extend_from_slice(&dst.octets());
        }
        _ => {
            let six = |a: IpAddr| match a {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            h.push(TCP6);
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&six(client.ip()).octets());
            h.extend_from_slice(&six(local.ip()).octets());
        }
    }
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&local.port().to_be_bytes());
    h
}

/// The addresses a header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    pub client: SocketAddr,
    pub local: SocketAddr,
}

/// Reads a header of the form [`header`] writes at the start of `buf`: the addresses and
/// the header's length. None when `buf` does not start with a whole one of that form.
pub fn parse(buf: &[u8]) -> Option<(Addresses, usize)> {
    if buf.len() < 16 || buf[..12] != SIGNATURE || buf[12] != V2_PROXY {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let body = buf.get(16..16 + len)?;
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let (client, local) = match (buf[13], len) {
        (TCP4, 12) => {
            let ip = |b: &[u8]| IpAddr::from([b[0], b[1], b[2], b[3]]);
            (
                SocketAddr::new(ip(&body[0..4]), port(&body[8..10])),
                SocketAddr::new(ip(&body[4..8]), port(&body[10..12])),
            )
        }
        (TCP6, 36) => {
            let ip = |b: &[u8]| {
                let mut a = [0u8; 16];
                a.copy_from_slice(b);
                IpAddr::from(a)
            };
            (
                SocketAddr::new(ip(&body[0..16]), port(&body[32..34])),
                SocketAddr::new(ip(&body[16..32]), port(&body[34..36])),
            )
        }
        _ => return None,
    };
    Some((Addresses { client, local }, 16 + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_header_writes_parse_reads_back_and_nothing_else() {
        for (c, l) in [
            ("192.0.2.7:51000", "198.51.100.1:443"),
            ("[2001:db8::1]:5", "[::1]:80"),
        ] {
            let (client, local) = (c.parse().unwrap(), l.parse().unwrap());
            let mut h = header(client, local);
            let n = h.len();
            h.extend_from_slice(b"GET / HTTP/1.1\r\n");
            assert_eq!(parse(&h), Some((Addresses { client, local }, n)));
            assert_eq!(parse(&h[..n - 1]), None);
        }
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), None);
        let mut h = header("1.2.3.4:1".parse().unwrap(), "5.6.7.8:2".parse().unwrap());
        h[15] = 13;
        assert_eq!(parse(&h), None, "a length that is not its family's");
    }

    #[test]
    fn ipv4_and_ipv6_headers_follow_the_spec_byte_for_byte() {
        let h = header(
            "192.0.2.7:51000".parse().unwrap(),
            "198.51.100.1:443".parse().unwrap(),
        );
        let mut want = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
        want.extend_from_slice(&[192, 0, 2, 7, 198, 51, 100, 1]);
        want.extend_from_slice(&51000u16.to_be_bytes());
        want.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(h, want);
        let h = header(
            "[2001:db8::1]:5".parse().unwrap(),
            "[::1]:80".parse().unwrap(),
        );
        assert_eq!(&h[12..16], b"\x21\x21\x00\x24");
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(
            &h[16..32],
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        // A v4-mapped client on an IPv6 socket is IPv4.
        let h = header(
            "[::ffff:10.0.0.1]:9".parse().unwrap(),
            "[::ffff:10.0.0.2]:80".parse().unwrap(),
        );
        assert_eq!(h[13], TCP4);
    }
}
