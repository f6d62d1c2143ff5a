//! PROXY protocol v1/v2 header parsing (the header comes first on connections from
//! trusted load balancers and carries the real client address).

use std::net::{IpAddr, SocketAddr};

use ppp::v1;
use ppp::v2;
use ppp::PartialResult;

/// The longest header we wait for: v1 is at most 107 bytes; v2 adds TLVs, bounded here.
pub const MAX_HEADER: usize = 536;

#[derive(Debug, PartialEq, Eq)]
pub enum ProxyParse {
    /// Need more bytes.
    Incomplete,
    /// Header of `len` bytes; `source` is None for LOCAL / UNKNOWN (keep the socket peer).
    Header {
        len: usize,
        source: Option<SocketAddr>,
    },
    Invalid(String),
}

pub fn parse(input: &[u8]) -> ProxyParse {
    if input.is_empty() {
        return ProxyParse::Incomplete;
    }
    let result = ppp::HeaderResult::parse(input);
    if result.is_incomplete() {
        if input.len() >= MAX_HEADER {
            return ProxyParse::Invalid("header too long".into());
        }
        return ProxyParse::Incomplete;
    }
    match result {
        ppp::HeaderResult::V1(Ok(h)) => {
            let source = match h.addresses {
                v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                }
                v1::Addresses::Unknown => None,
            };
            ProxyParse::Header {
                len: h.header.len(),
                source,
            }
        }
        ppp::HeaderResult::V2(Ok(h)) => {
            let source = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                (_, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                }
                _ => None,
            };
            ProxyParse::Header {
                len: h.header.len(),
                source,
            }
        }
        ppp::HeaderResult::V1(Err(e)) => ProxyParse::Invalid(format!("PROXY v1: {e:?}")),
        ppp::HeaderResult::V2(Err(e)) => ProxyParse::Invalid(format!("PROXY v2: {e:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_tcp4_with_trailing_smtp() {
        let input = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\nEHLO x\r\n";
        match parse(input) {
            ProxyParse::Header { len, source } => {
                assert_eq!(&input[len..], b"EHLO x\r\n");
                assert_eq!(source, Some("192.0.2.7:40000".parse().unwrap()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v1_incomplete_then_invalid() {
        assert_eq!(parse(b"PROXY TCP4 192.0.2.7"), ProxyParse::Incomplete);
        assert!(matches!(
            parse(b"EHLO example.org\r\n"),
            ProxyParse::Invalid(_)
        ));
    }

    #[test]
    fn v2_tcp6() {
        let mut input = vec![
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x21,
            0x00, 36,
        ];
        let src: std::net::Ipv6Addr = "2001:db8::5".parse().unwrap();
        let dst: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        input.extend_from_slice(&src.octets());
        input.extend_from_slice(&dst.octets());
        input.extend_from_slice(&1234u16.to_be_bytes());
        input.extend_from_slice(&25u16.to_be_bytes());
        let header_len = input.len();
        input.extend_from_slice(b"QUIT\r\n");
        for cut in 1..header_len {
            assert_eq!(parse(&input[..cut]), ProxyParse::Incomplete, "cut {cut}");
        }
        match parse(&input) {
            ProxyParse::Header { len, source } => {
                assert_eq!(len, header_len);
                assert_eq!(source, Some(SocketAddr::new(src.into(), 1234)));
            }
            other => panic!("{other:?}"),
        }
    }
}
