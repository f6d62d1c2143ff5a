//! Mail routing (RFC 5321 §5.1): from a recipient domain to the ordered hosts and
//! addresses delivery should try, or a typed reason why there are none.
//!
//! Choices, matching what Postfix does:
//! - MX hosts by preference, equal preferences shuffled per call; a host's
//!   addresses shuffled within each family (smtp_randomize_addresses).
//! - No MX records → the domain itself at preference 0 (implicit MX).
//! - NXDOMAIN for the domain and a null MX (RFC 7505) are permanent.
//! - An MX pointing at a CNAME is followed (RFC 2181 §10.3 forbids it, real
//!   domains do it anyway, and every mainstream MTA delivers). The resolver
//!   returns the chain with the addresses; the fully expanded name is kept in
//!   [`RouteHost::cname`] (DANE looks for TLSA records there first, RFC 7672
//!   §2.2.2).
//! - An MX whose exchange is an IP address ("10 192.0.2.1.") is not a host name:
//!   that host counts as a failed name lookup (permanent for it) and the other
//!   hosts are still used. Postfix likewise refuses numeric MX data.
//! - A route fails only when no host has an address: temporarily if any host's
//!   failure was temporary (it may come back), permanently otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rand::seq::SliceRandom;

use crate::resolver::{join_all, ResolveError, Resolver};
use crate::{plan_mx, MxPlan, QueryType, Record};

/// MX hosts looked up per route; mail will not get past the first few anyway
/// (Postfix stops at 5 addresses by default).
pub const MAX_MX_HOSTS: usize = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The domain as asked (trailing dot removed).
    pub domain: String,
    /// Hosts in the order to try them. May be empty when `error` is set.
    pub hosts: Vec<RouteHost>,
    /// Set when no host has an address.
    pub error: Option<RouteError>,
    /// The domain had no MX records; `hosts` is the domain itself.
    pub implicit_mx: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteHost {
    /// The MX exchange (or the domain, for an implicit MX), lowercase, no dot.
    pub name: String,
    /// When `name` is an alias: the name at the end of its CNAME chain (from
    /// the address answers), lowercase, no dot. Whether the chain is secure
    /// is part of `secure`.
    pub cname: Option<String>,
    pub preference: u16,
    /// In the order to try, by the configured IP preference.
    pub addrs: Vec<IpAddr>,
    /// Seconds this host's data stays valid: the lowest TTL left of the MX
    /// answer (for an implicit MX, the NODATA's negative TTL: an MX may appear)
    /// and the address answers.
    pub ttl: u32,
    /// Every answer on the way (MX and addresses) had the AD bit.
    pub secure: bool,
    /// The MX answer alone (for an implicit MX, the NODATA that made it one)
    /// had the AD bit: the host name itself is DNSSEC-authenticated even when
    /// its addresses are not (RFC 8689 §4.2.1 asks this of REQUIRETLS).
    pub mx_secure: bool,
    /// Why this host has no addresses.
    pub error: Option<RouteError>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("{0}: no such domain (NXDOMAIN)")]
    NoSuchDomain(String),
    #[error("{0}: null MX (RFC 7505): the domain accepts no mail")]
    NullMx(String),
    #[error("{0}: no address records of the allowed families")]
    NoAddress(String),
    #[error("{0}: MX exchange is an IP address, not a host name")]
    IpLiteralMx(String),
    #[error("{0}: MX lists this host; mail would loop")]
    MxLoopsBack(String),
    #[error("{name}: {error}")]
    Lookup { name: String, error: ResolveError },
}

impl RouteError {
    /// Permanent: bounce now. Otherwise defer and retry.
    pub fn is_permanent(&self) -> bool {
        match self {
            RouteError::Lookup { error, .. } => !error.is_temporary(),
            _ => true,
        }
    }
}

impl Route {
    fn failed(domain: &str, error: RouteError) -> Route {
        Route {
            domain: domain.to_string(),
            hosts: Vec::new(),
            error: Some(error),
            implicit_mx: false,
        }
    }

    /// RFC 5321 §5.1: when one of our own names is in the list, drop it and every
    /// host with the same or a larger preference. With nothing left, mail for the
    /// domain would come back to us: a permanent error.
    pub fn drop_self(&mut self, own_names: &[&str]) {
        let own = |name: &str| {
            own_names
                .iter()
                .any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(name))
        };
        let Some(cut) = self
            .hosts
            .iter()
            .filter(|h| own(&h.name))
            .map(|h| h.preference)
            .min()
        else {
            return;
        };
        self.hosts.retain(|h| h.preference < cut);
        self.error = if self.hosts.is_empty() {
            Some(RouteError::MxLoopsBack(self.domain.clone()))
        } else {
            route_error(&self.hosts)
        };
    }
}

/// The error a route reports when no host has an address.
fn route_error(hosts: &[RouteHost]) -> Option<RouteError> {
    if hosts.iter().any(|h| !h.addrs.is_empty()) {
        return None;
    }
    let errors = || hosts.iter().filter_map(|h| h.error.as_ref());
    errors()
        .find(|e| !e.is_permanent())
        .or_else(|| errors().next())
        .cloned()
}

/// The name `name` expands to through the CNAME records of an answer (the
/// last target of the chain), lowercase without the trailing dot; None when
/// the answer has no CNAME or the chain comes back to `name`.
pub fn expanded_name(name: &str, records: &[Record]) -> Option<String> {
    let last = records.iter().rev().find_map(|r| match r {
        Record::Cname(target, _) => Some(target.trim_end_matches('.').to_ascii_lowercase()),
        _ => None,
    })?;
    (!last.eq_ignore_ascii_case(name.trim_end_matches('.'))).then_some(last)
}

/// "[192.0.2.1]" or "[IPv6:2001:db8::1]" (RFC 5321 §4.1.3).
fn address_literal(domain: &str) -> Option<IpAddr> {
    let inner = domain.strip_prefix('[')?.strip_suffix(']')?;
    match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => {
            inner[5..].parse::<Ipv6Addr>().ok().map(IpAddr::V6)
        }
        _ => inner.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
    }
}

impl Resolver {
    /// Where mail for `domain` goes, by the same rules delivery uses.
    pub async fn resolve_route(&self, domain: &str) -> Route {
        let domain = domain.trim().trim_end_matches('.');
        if let Some(ip) = address_literal(domain) {
            return Route {
                domain: domain.to_string(),
                hosts: vec![RouteHost {
                    name: domain.to_string(),
                    cname: None,
                    preference: 0,
                    addrs: vec![ip],
                    ttl: 0,
                    secure: false,
                    mx_secure: false,
                    error: None,
                }],
                error: None,
                implicit_mx: false,
            };
        }
        let mx = match self.lookup(domain, QueryType::Mx).await {
            Ok(mx) => mx,
            Err(error) => {
                let name = domain.to_string();
                return Route::failed(domain, RouteError::Lookup { name, error });
            }
        };
        if mx.is_nxdomain() {
            return Route::failed(domain, RouteError::NoSuchDomain(domain.to_string()));
        }
        let (candidates, implicit_mx) = match plan_mx(domain, mx.records(), rand::random()) {
            MxPlan::NullMx => {
                return Route::failed(domain, RouteError::NullMx(domain.to_string()));
            }
            MxPlan::Implicit(name) => (vec![(0, name.to_ascii_lowercase())], true),
            MxPlan::Hosts(mut hosts) => {
                hosts.truncate(MAX_MX_HOSTS);
                (hosts, false)
            }
        };
        let lookups = candidates
            .into_iter()
            .map(|(preference, name)| self.resolve_host(name, preference, mx.ttl, mx.secure()))
            .collect();
        let hosts = join_all(lookups).await;
        Route {
            domain: domain.to_string(),
            error: route_error(&hosts),
            hosts,
            implicit_mx,
        }
    }

    /// A host named by configuration (a smart host) resolved as an MX host
    /// would be: its addresses by the IP preference, whether they (and a CNAME
    /// chain to them) are DNSSEC-secure, and the expanded name of an alias.
    /// There is no MX answer: `secure` and `mx_secure` rest on the address
    /// answers alone; preference 0.
    pub async fn resolve_named_host(&self, name: &str) -> RouteHost {
        let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
        self.resolve_host(name, 0, u32::MAX, true).await
    }

    async fn resolve_host(
        &self,
        name: String,
        preference: u16,
        mx_ttl: u32,
        mx_secure: bool,
    ) -> RouteHost {
        let mut host = RouteHost {
            name,
            cname: None,
            preference,
            addrs: Vec::new(),
            ttl: mx_ttl,
            secure: false,
            mx_secure,
            error: None,
        };
        if host.name.parse::<IpAddr>().is_ok() {
            host.error = Some(RouteError::IpLiteralMx(host.name.clone()));
            return host;
        }
        let families = self.config().ip_preference.query_types();
        let results = join_all(
            families
                .iter()
                .map(|&qtype| self.lookup(&host.name, qtype))
                .collect(),
        )
        .await;

        let mut secure = mx_secure;
        let mut answered = false;
        let mut nxdomain = false;
        let mut failure: Option<ResolveError> = None;
        // TTL of the addresses shown; a family with none only counts when no
        // family has any (then its negative TTL is what expires).
        let mut addr_ttl: Option<u32> = None;
        let mut negative_ttl: Option<u32> = None;
        for result in results {
            match result {
                Ok(lookup) => {
                    answered = true;
                    secure &= lookup.secure();
                    nxdomain |= lookup.is_nxdomain();
                    if host.cname.is_none() {
                        host.cname = expanded_name(&host.name, lookup.records());
                    }
                    let slot = if lookup.negative().is_some() {
                        &mut negative_ttl
                    } else {
                        &mut addr_ttl
                    };
                    *slot = Some(slot.map_or(lookup.ttl, |t| t.min(lookup.ttl)));
                    let mut family: Vec<IpAddr> = Vec::new();
                    for addr in lookup.records().iter().filter_map(Record::ip_addr) {
                        if !family.contains(&addr) && !host.addrs.contains(&addr) {
                            family.push(addr);
                        }
                    }
                    family.shuffle(&mut rand::rng());
                    host.addrs.extend(family);
                }
                Err(error) => {
                    // Keep a temporary failure over a permanent one: the family
                    // we could not ask might have had the addresses.
                    if failure.as_ref().is_none_or(|f| !f.is_temporary()) {
                        failure = Some(error);
                    }
                }
            }
        }
        host.secure = answered && secure;
        if let Some(ttl) = addr_ttl.or(negative_ttl) {
            host.ttl = host.ttl.min(ttl);
        }
        if host.addrs.is_empty() {
            host.error = Some(match failure {
                Some(error) => RouteError::Lookup {
                    name: host.name.clone(),
                    error,
                },
                None if nxdomain => RouteError::NoSuchDomain(host.name.clone()),
                None => RouteError::NoAddress(host.name.clone()),
            });
        }
        host
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, preference: u16, addr: Option<&str>) -> RouteHost {
        RouteHost {
            name: name.into(),
            cname: None,
            preference,
            addrs: addr.map(|a| a.parse().unwrap()).into_iter().collect(),
            ttl: 60,
            secure: false,
            mx_secure: false,
            error: if addr.is_none() {
                Some(RouteError::NoAddress(name.into()))
            } else {
                None
            },
        }
    }

    #[test]
    fn address_literals() {
        assert_eq!(
            address_literal("[192.0.2.1]"),
            Some("192.0.2.1".parse().unwrap())
        );
        assert_eq!(
            address_literal("[IPv6:2001:db8::1]"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            address_literal("[ipv6:2001:db8::1]"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(address_literal("[2001:db8::1]"), None);
        assert_eq!(address_literal("192.0.2.1"), None);
        assert_eq!(address_literal("[example.com]"), None);
        assert_eq!(address_literal("["), None);
    }

    #[test]
    fn the_expanded_name_is_the_end_of_the_cname_chain() {
        let a = Record::A("192.0.2.1".parse().unwrap(), 60);
        assert_eq!(expanded_name("mx.example", std::slice::from_ref(&a)), None);
        assert_eq!(expanded_name("mx.example", &[]), None);
        let chain = [
            Record::Cname("Alias.Example.NET.".into(), 60),
            Record::Cname("host.provider.example.".into(), 60),
            a,
        ];
        assert_eq!(
            expanded_name("mx.example", &chain),
            Some("host.provider.example".into())
        );
        // A chain that ends where it began expands to nothing new.
        assert_eq!(expanded_name("host.provider.example.", &chain[1..]), None);
    }

    #[test]
    fn route_error_prefers_temporary() {
        let mut hosts = vec![host("a", 10, None), host("b", 20, None)];
        assert_eq!(route_error(&hosts), Some(RouteError::NoAddress("a".into())));
        hosts[1].error = Some(RouteError::Lookup {
            name: "b".into(),
            error: ResolveError::Timeout,
        });
        let err = route_error(&hosts).expect("error");
        assert!(!err.is_permanent(), "{err}");
        hosts.push(host("c", 30, Some("192.0.2.3")));
        assert_eq!(route_error(&hosts), None);
    }

    #[test]
    fn drop_self_cuts_at_own_preference() {
        let mut route = Route {
            domain: "example".into(),
            hosts: vec![
                host("a.example", 10, Some("192.0.2.1")),
                host("me.example", 20, Some("192.0.2.2")),
                host("peer.example", 20, Some("192.0.2.3")),
                host("c.example", 30, Some("192.0.2.4")),
            ],
            error: None,
            implicit_mx: false,
        };
        route.drop_self(&["ME.example."]);
        assert_eq!(route.hosts.len(), 1);
        assert_eq!(route.hosts[0].name, "a.example");
        assert_eq!(route.error, None);
        route.drop_self(&["a.example"]);
        assert!(route.hosts.is_empty());
        assert_eq!(route.error, Some(RouteError::MxLoopsBack("example".into())));
        assert!(route.error.as_ref().is_some_and(RouteError::is_permanent));
    }
}
