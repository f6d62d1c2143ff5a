//! Resolver settings and the /etc/resolv.conf fallback.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use crate::cache::TtlPolicy;

/// Which address families delivery uses, and in which order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IpPreference {
    Ipv4Only,
    Ipv6Only,
    /// Both families, IPv4 addresses first.
    #[default]
    PreferIpv4,
    /// Both families, IPv6 addresses first.
    PreferIpv6,
}

impl IpPreference {
    /// The address queries to make, in the order their answers are used.
    pub fn query_types(self) -> &'static [crate::QueryType] {
        use crate::QueryType::{Aaaa, A};
        match self {
            IpPreference::Ipv4Only => &[A],
            IpPreference::Ipv6Only => &[Aaaa],
            IpPreference::PreferIpv4 => &[A, Aaaa],
            IpPreference::PreferIpv6 => &[Aaaa, A],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverConfig {
    /// Recursive resolvers to ask, in order of preference.
    pub servers: Vec<SocketAddr>,
    /// Wait for one answer from one server.
    pub timeout: Duration,
    /// Rounds over the server list before a lookup gives up.
    pub attempts: u32,
    /// A server that failed is tried after the healthy ones for this long.
    pub server_holddown: Duration,
    pub ttl: TtlPolicy,
    /// Most cached answers per core; 0 disables caching (in-flight sharing stays).
    pub cache_size: usize,
    pub ip_preference: IpPreference,
    /// The servers validate DNSSEC and the path to them is trusted (a
    /// validating resolver on loopback): only then does an answer's AD bit make
    /// it [`crate::Lookup::secure`]. Off, every answer counts as insecure, as
    /// anyone on the path could have set the bit.
    pub dnssec_validating: bool,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            servers: Vec::new(),
            timeout: Duration::from_secs(2),
            attempts: 2,
            server_holddown: Duration::from_secs(30),
            ttl: TtlPolicy::default(),
            cache_size: 50_000,
            ip_preference: IpPreference::PreferIpv4,
            dnssec_validating: false,
        }
    }
}

/// glibc reads at most three nameservers (MAXNS); so do we.
const MAX_RESOLV_CONF_SERVERS: usize = 3;

/// `nameserver` lines of a resolv.conf text, port 53. Link-local IPv6 entries with
/// a zone ("fe80::1%eth0") are skipped: a SocketAddr here cannot carry the zone
/// by name. Options (timeout, attempts, rotate) are not read; [dns] has its own.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut servers = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        if let Ok(ip) = addr.parse::<IpAddr>() {
            let server = SocketAddr::new(ip, 53);
            if !servers.contains(&server) {
                servers.push(server);
            }
        }
        if servers.len() == MAX_RESOLV_CONF_SERVERS {
            break;
        }
    }
    servers
}

/// The system's resolvers from a resolv.conf file.
pub fn servers_from_resolv_conf(path: &Path) -> std::io::Result<Vec<SocketAddr>> {
    Ok(parse_resolv_conf(&std::fs::read_to_string(path)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let text = "\
# generated
search example.net
nameserver 192.0.2.53   # primary
nameserver  2001:db8::53
nameserver fe80::1%eth0
nameserver not-an-address
;nameserver 192.0.2.99
nameserver 192.0.2.53
options timeout:1 attempts:3
nameserver 192.0.2.54
nameserver 192.0.2.55
";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "192.0.2.53:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::53]:53".parse().unwrap(),
                "192.0.2.54:53".parse().unwrap(),
            ]
        );
        assert!(parse_resolv_conf("").is_empty());
        assert!(parse_resolv_conf("nameserver").is_empty());
    }
}
