use std::net::IpAddr;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

use crate::PolicyError;

/// The IPv4-mapped block `::ffff:0:0/96` as integers: IPv4 lives here inside IPv6.
const MAPPED_START: u128 = 0xffff_0000_0000;
const MAPPED_END: u128 = 0xffff_ffff_ffff;

/// Ordered set of CIDR networks.
///
/// Lookups are a binary search over merged, sorted address ranges, so cost is
/// O(log n) regardless of how the list was written. The address space is treated as
/// one: an IPv4 client seen on a dual-stack socket as `::ffff:a.b.c.d` matches IPv4
/// entries, and an IPv6 entry covering part of `::ffff:0:0/96` matches those IPv4
/// addresses too.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(try_from = "Vec<String>")]
pub struct NetworkList {
    /// As configured, in order, for display and re-serialisation.
    networks: Vec<IpNet>,
    /// Sorted, non-overlapping, non-adjacent inclusive ranges.
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl NetworkList {
    /// Parse CIDR networks ("10.0.0.0/8", "::1/128") and bare addresses ("192.0.2.1"
    /// is a /32). A network with host bits set ("10.0.0.1/8") is rejected because it
    /// is usually a typo for a single host or a different prefix.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<NetworkList, PolicyError> {
        let mut networks = Vec::with_capacity(items.len());
        for item in items {
            networks.push(parse_item(item.as_ref())?);
        }
        Ok(Self::from_networks(networks))
    }

    /// Build from already-parsed networks (host bits are ignored here).
    pub fn from_networks(networks: Vec<IpNet>) -> NetworkList {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in &networks {
            match net.trunc() {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()))),
                IpNet::V6(n) => {
                    let (start, end) = (u128::from(n.network()), u128::from(n.broadcast()));
                    v6.push((start, end));
                    // The part inside the mapped block is also IPv4 space.
                    let (s, e) = (start.max(MAPPED_START), end.min(MAPPED_END));
                    if s <= e {
                        v4.push(((s - MAPPED_START) as u32, (e - MAPPED_START) as u32));
                    }
                }
            }
        }
        NetworkList {
            networks,
            v4: merge(v4),
            v6: merge(v6),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => in_ranges(&self.v4, u32::from(a)),
            IpAddr::V6(a) => in_ranges(&self.v6, u128::from(a)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    /// The networks as configured, in order.
    pub fn networks(&self) -> &[IpNet] {
        &self.networks
    }
}

impl TryFrom<Vec<String>> for NetworkList {
    type Error = PolicyError;

    fn try_from(items: Vec<String>) -> Result<Self, Self::Error> {
        NetworkList::parse(&items)
    }
}

fn parse_item(raw: &str) -> Result<IpNet, PolicyError> {
    let bad = |reason: String| PolicyError::InvalidNetwork {
        item: raw.to_string(),
        reason,
    };
    let item = raw.trim();
    if item.is_empty() {
        return Err(bad("empty".into()));
    }
    if item.contains('/') {
        let net = IpNet::from_str(item)
            .map_err(|_| bad("not a CIDR network like 10.0.0.0/8 or 2001:db8::/32".into()))?;
        if net.addr() != net.network() {
            return Err(bad(format!(
                "host bits set; the network is {}",
                net.trunc()
            )));
        }
        Ok(net)
    } else {
        let addr =
            IpAddr::from_str(item).map_err(|_| bad("not an IP address or CIDR network".into()))?;
        Ok(match addr {
            IpAddr::V4(a) => IpNet::V4(Ipv4Net::from(a)),
            IpAddr::V6(a) => IpNet::V6(Ipv6Net::from(a)),
        })
    }
}

/// Sort and coalesce overlapping or adjacent ranges so lookup is one binary search.
fn merge<T: Copy + Ord + Step>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if last.1 >= start || last.1.succ() == Some(start) => {
                last.1 = last.1.max(end);
            }
            _ => out.push((start, end)),
        }
    }
    out
}

fn in_ranges<T: Copy + Ord>(ranges: &[(T, T)], x: T) -> bool {
    // First range starting after x; the one before it is the only candidate.
    let idx = ranges.partition_point(|&(start, _)| start <= x);
    idx > 0 && ranges[idx - 1].1 >= x
}

trait Step: Sized {
    fn succ(self) -> Option<Self>;
}

impl Step for u32 {
    fn succ(self) -> Option<Self> {
        self.checked_add(1)
    }
}

impl Step for u128 {
    fn succ(self) -> Option<Self> {
        self.checked_add(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn list(items: &[&str]) -> NetworkList {
        NetworkList::parse(items).expect("test list")
    }

    #[test]
    fn ipv4_cidr_and_bare() {
        let l = list(&["10.0.0.0/8", "192.0.2.1"]);
        assert!(l.contains(ip("10.0.0.0")));
        assert!(l.contains(ip("10.255.255.255")));
        assert!(!l.contains(ip("11.0.0.0")));
        assert!(!l.contains(ip("9.255.255.255")));
        assert!(l.contains(ip("192.0.2.1")));
        assert!(!l.contains(ip("192.0.2.2")));
        assert!(!l.contains(ip("192.0.2.0")));
    }

    #[test]
    fn ipv6_cidr_and_bare() {
        let l = list(&["::1/128", "2001:db8::/32", "fe80::1"]);
        assert!(l.contains(ip("::1")));
        assert!(!l.contains(ip("::2")));
        assert!(l.contains(ip("2001:db8:ffff::1")));
        assert!(!l.contains(ip("2001:db9::")));
        assert!(l.contains(ip("fe80::1")));
        assert!(!l.contains(ip("fe80::2")));
        // IPv6 entries do not leak into IPv4.
        assert!(!l.contains(ip("0.0.0.1")));
    }

    #[test]
    fn mapped_ipv6_matches_ipv4_entries() {
        let l = list(&["127.0.0.0/8", "192.0.2.7"]);
        assert!(l.contains(ip("::ffff:127.0.0.1")));
        assert!(l.contains(ip("::ffff:192.0.2.7")));
        assert!(!l.contains(ip("::ffff:192.0.2.8")));
        // IPv4-compatible (deprecated) form is not mapped and must not match.
        assert!(!l.contains(ip("::127.0.0.1")));
    }

    #[test]
    fn mapped_ipv6_entries_match_ipv4_clients() {
        let l = list(&["::ffff:10.0.0.0/104"]);
        assert!(l.contains(ip("10.1.2.3")));
        assert!(l.contains(ip("::ffff:10.1.2.3")));
        assert!(!l.contains(ip("11.0.0.0")));
        let all = list(&["::/0"]);
        assert!(all.contains(ip("203.0.113.9")));
        assert!(all.contains(ip("2001:db8::1")));
    }

    #[test]
    fn overlapping_and_adjacent_ranges_merge() {
        let l = list(&["10.0.0.0/9", "10.128.0.0/9", "10.64.0.0/10", "10.0.0.5"]);
        assert_eq!(l.v4, vec![(0x0a00_0000, 0x0aff_ffff)]);
        assert!(l.contains(ip("10.200.0.1")));
        let edge = list(&["255.255.255.255", "0.0.0.0/0"]);
        assert!(edge.contains(ip("255.255.255.255")));
        assert!(edge.contains(ip("0.0.0.0")));
        let top = list(&["ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]);
        assert!(top.contains(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
    }

    #[test]
    fn empty_list() {
        let l = NetworkList::default();
        assert!(l.is_empty());
        assert!(!l.contains(ip("127.0.0.1")));
        let parsed = NetworkList::parse::<&str>(&[]).expect("empty is fine");
        assert!(parsed.is_empty());
        assert!(!list(&["::1"]).is_empty());
    }

    #[test]
    fn order_is_kept() {
        let l = list(&["192.0.2.0/24", "10.0.0.0/8", " ::1 "]);
        let shown: Vec<String> = l.networks().iter().map(|n| n.to_string()).collect();
        assert_eq!(shown, ["192.0.2.0/24", "10.0.0.0/8", "::1/128"]);
    }

    #[test]
    fn bad_items_are_named() {
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "300.0.0.1",
            "example.com",
            "",
            "   ",
            "10.0.0.1/8",
            "2001:db8::1/32",
            "::1/129",
            "1.2.3.4/",
        ] {
            match NetworkList::parse(&["127.0.0.1", bad]) {
                Err(PolicyError::InvalidNetwork { item, .. }) => assert_eq!(item, bad),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        let msg = NetworkList::parse(&["10.0.0.1/8"])
            .expect_err("host bits")
            .to_string();
        assert!(
            msg.contains("10.0.0.1/8") && msg.contains("10.0.0.0/8"),
            "{msg}"
        );
    }

    #[test]
    fn deserializes_from_string_list() {
        use serde::de::value::{Error, SeqDeserializer};
        let good: SeqDeserializer<_, Error> =
            SeqDeserializer::new(["127.0.0.0/8", "::1/128"].into_iter());
        let l = NetworkList::deserialize(good).expect("deserialize");
        assert!(l.contains(ip("127.0.0.2")));
        let bad: SeqDeserializer<_, Error> = SeqDeserializer::new(["nope"].into_iter());
        let err = NetworkList::deserialize(bad).expect_err("bad item");
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
