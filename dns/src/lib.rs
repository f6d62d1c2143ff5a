//! sans-IO DNS for mail routing: build query bytes, interpret answer bytes, plan MX
//! delivery order. No sockets, no clocks; the resolver driver and cache sit on top.

mod message;
mod mx;

use std::net::{Ipv4Addr, Ipv6Addr};

pub use hickory_proto::op::ResponseCode;
pub use message::{build_query, parse_answer, EDNS_PAYLOAD};
pub use mx::{plan_mx, MxPlan};

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

impl Record {
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
}
