//! DNS for mail routing.
//!
//! The sans-IO core (`message`, `mx`) builds query bytes, interprets answer bytes
//! and plans MX delivery order without sockets or clocks. On top of it:
//! [`Resolver`], a per-core stub resolver on glommio (UDP with TCP fallback,
//! failover, cache, in-flight sharing, counters), and [`Resolver::resolve_route`],
//! which turns a recipient domain into a [`Route`].

mod blocking;
mod cache;
mod clock;
mod config;
mod message;
mod metrics;
mod mx;
mod resolver;
mod route;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

pub use blocking::{addresses_blocking, lookup_blocking};
pub use cache::TtlPolicy;
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{parse_resolv_conf, servers_from_resolv_conf, IpPreference, ResolverConfig};
pub use hickory_proto::op::ResponseCode;
pub use message::{build_query, parse_answer, EDNS_PAYLOAD};
pub use metrics::{MetricsSnapshot, UpstreamSnapshot};
pub use mx::{plan_mx, MxPlan};
pub use resolver::{join_all, Lookup, ResolveError, Resolver};
pub use route::{expanded_name, Route, RouteError, RouteHost, MAX_MX_HOSTS};

/// Record types sluice asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueryType {
    Mx,
    A,
    Aaaa,
    Txt,
    Ptr,
    Tlsa,
}

impl QueryType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueryType::Mx => "MX",
            QueryType::A => "A",
            QueryType::Aaaa => "AAAA",
            QueryType::Txt => "TXT",
            QueryType::Ptr => "PTR",
            QueryType::Tlsa => "TLSA",
        }
    }
}

impl fmt::Display for QueryType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QueryType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            QueryType::Mx,
            QueryType::A,
            QueryType::Aaaa,
            QueryType::Txt,
            QueryType::Ptr,
            QueryType::Tlsa,
        ]
        .into_iter()
        .find(|t| t.as_str().eq_ignore_ascii_case(s.trim()))
        .ok_or_else(|| format!("unknown record type `{s}` (MX, A, AAAA, TXT, PTR or TLSA)"))
    }
}

/// The PTR query name for an address: "1.2.0.192.in-addr.arpa" or the nibble
/// form under ip6.arpa (RFC 3596 §2.5).
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa")
        }
        IpAddr::V6(v6) => {
            let mut name = String::with_capacity(72);
            for byte in v6.octets().iter().rev() {
                name.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            name.push_str("ip6.arpa");
            name
        }
    }
}

/// An interpreted response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Answer-section records on the CNAME chain from the question name: CNAMEs and
    /// records of the queried type. Unrelated records are dropped (poisoning defence).
    pub records: Vec<Record>,
    /// TC bit: the answer is incomplete; retry over TCP.
    pub truncated: bool,
    /// AD bit from the resolver (DNSSEC-validated); DANE needs it.
    pub authentic_data: bool,
    /// Set for NXDOMAIN and NODATA.
    pub negative: Option<NegativeKind>,
    /// Lowest TTL of the records and the negative TTL: how long the whole answer may
    /// be cached. 0 when there is nothing to go by.
    pub min_ttl: u32,
}

/// Why an answer holds no records of the queried type. `ttl` is the RFC 2308
/// negative-caching TTL: the lower of the SOA's TTL and its MINIMUM field, 0 when
/// the response carried no usable SOA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NegativeKind {
    NxDomain { ttl: u32 },
    NoData { ttl: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// `exchange` is without the trailing dot; the root (null MX) is ".".
    Mx {
        preference: u16,
        exchange: String,
        ttl: u32,
    },
    A(Ipv4Addr, u32),
    Aaaa(Ipv6Addr, u32),
    /// Character-strings joined without a separator (RFC 7208 §3.3, DKIM).
    Txt(String, u32),
    Ptr(String, u32),
    Cname(String, u32),
    Tlsa {
        usage: u8,
        selector: u8,
        matching: u8,
        data: Vec<u8>,
        ttl: u32,
    },
}

/// Presentation form (RFC 1035 §5.1) without owner, class and TTL, for operators.
impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Record::Mx {
                preference,
                exchange,
                ..
            } => write!(f, "MX {preference} {exchange}"),
            Record::A(a, _) => write!(f, "A {a}"),
            Record::Aaaa(a, _) => write!(f, "AAAA {a}"),
            Record::Txt(text, _) => write!(f, "TXT {text:?}"),
            Record::Ptr(name, _) => write!(f, "PTR {name}"),
            Record::Cname(name, _) => write!(f, "CNAME {name}"),
            Record::Tlsa {
                usage,
                selector,
                matching,
                data,
                ..
            } => {
                write!(f, "TLSA {usage} {selector} {matching} ")?;
                data.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
        }
    }
}

impl Record {
    /// The address an A or AAAA record holds.
    pub fn ip_addr(&self) -> Option<std::net::IpAddr> {
        match self {
            Record::A(ip, _) => Some(std::net::IpAddr::V4(*ip)),
            Record::Aaaa(ip, _) => Some(std::net::IpAddr::V6(*ip)),
            _ => None,
        }
    }

    pub fn ttl(&self) -> u32 {
        match self {
            Record::Mx { ttl, .. } | Record::Tlsa { ttl, .. } => *ttl,
            Record::A(_, ttl)
            | Record::Aaaa(_, ttl)
            | Record::Txt(_, ttl)
            | Record::Ptr(_, ttl)
            | Record::Cname(_, ttl) => *ttl,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },

    #[error("encoding DNS query: {0}")]
    Encode(String),

    /// Not ours (late, or spoofed): a UDP driver should keep waiting.
    #[error("response id {got} does not match query id {expected}")]
    IdMismatch { expected: u16, got: u16 },

    /// Right id, wrong question: treat like a spoof.
    #[error("response question does not match the query")]
    QuestionMismatch,

    /// SERVFAIL, REFUSED, FORMERR, NOTIMP and other error rcodes: a temporary failure
    /// for mail routing.
    #[error("DNS server failure: {0}")]
    ServerFailure(ResponseCode),

    #[error("malformed DNS message: {0}")]
    Malformed(String),

    /// A well-formed answer whose CNAME chain comes back to a name on it.
    #[error("CNAME loop at {0}")]
    CnameLoop(String),

    #[error("CNAME chain too long")]
    CnameChainTooLong,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_type_names() {
        for t in ["MX", "a", "Aaaa", "txt", "PTR", "tlsa"] {
            let parsed: QueryType = t.parse().expect(t);
            assert!(parsed.as_str().eq_ignore_ascii_case(t));
        }
        assert!("SRV".parse::<QueryType>().is_err());
    }

    #[test]
    fn reverse_names() {
        assert_eq!(
            reverse_name("192.0.2.1".parse().unwrap()),
            "1.2.0.192.in-addr.arpa"
        );
        assert_eq!(
            reverse_name("2001:db8::567:89ab".parse().unwrap()),
            "b.a.9.8.7.6.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
        );
    }

    #[test]
    fn records_display() {
        let mx = Record::Mx {
            preference: 10,
            exchange: "mx.example".into(),
            ttl: 1,
        };
        assert_eq!(mx.to_string(), "MX 10 mx.example");
        assert_eq!(
            Record::Txt("v=spf1 -all".into(), 1).to_string(),
            "TXT \"v=spf1 -all\""
        );
        let tlsa = Record::Tlsa {
            usage: 3,
            selector: 1,
            matching: 1,
            data: vec![0xab, 0x01],
            ttl: 1,
        };
        assert_eq!(tlsa.to_string(), "TLSA 3 1 1 ab01");
    }
}
