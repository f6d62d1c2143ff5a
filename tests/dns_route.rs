//! Mail routing (RFC 5321 §5.1) against a real authoritative server: MX order
//! and shuffling, implicit MX, null MX, MX to CNAME and to an IP literal,
//! missing hosts, address-family preference, a host whose addresses need TCP.

use std::collections::HashSet;
use std::net::IpAddr;

use sluice_dns::{IpPreference, ResolveError, Resolver, ResolverConfig, Route, RouteError};
use sluice_testkit::dns::rt::{block_on, config};
use sluice_testkit::nsd::Nsd;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn names(route: &Route) -> Vec<(u16, &str)> {
    route
        .hosts
        .iter()
        .map(|h| (h.preference, h.name.as_str()))
        .collect()
}

fn with_preference(nsd: &Nsd, ip_preference: IpPreference) -> ResolverConfig {
    ResolverConfig {
        ip_preference,
        ..config(&[nsd.addr])
    }
}

#[test]
fn unequal_preferences_in_order_with_addresses() {
    let nsd = Nsd::fixture();
    block_on(async {
        let r = Resolver::new(config(&[nsd.addr]));
        let route = r.resolve_route("Unequal.Mail.Test.").await;
        assert_eq!(route.error, None);
        assert_eq!(route.domain, "Unequal.Mail.Test");
        assert!(!route.implicit_mx);
        assert_eq!(
            names(&route),
            vec![
                (10, "a.hosts.mail.test"),
                (20, "b.hosts.mail.test"),
                (30, "c.hosts.mail.test")
            ]
        );
        assert_eq!(route.hosts[0].addrs, vec![ip("192.0.2.1")]);
        // prefer-ipv4: both families, IPv4 first.
        assert_eq!(
            route.hosts[2].addrs,
            vec![ip("192.0.2.3"), ip("2001:db8::3")]
        );
        for h in &route.hosts {
            assert_eq!(h.ttl, 300);
            assert!(!h.secure, "NSD sets no AD bit");
            assert_eq!(h.error, None);
        }
    });
}

#[test]
fn equal_preferences_are_shuffled_backup_stays_last() {
    let nsd = Nsd::fixture();
    block_on(async {
        let r = Resolver::new(config(&[nsd.addr]));
        let mut first = HashSet::new();
        for _ in 0..64 {
            let route = r.resolve_route("equal.mail.test").await;
            assert_eq!(route.hosts.len(), 5);
            assert!(route.hosts[..4].iter().all(|h| h.preference == 10));
            assert_eq!(names(&route)[4], (20, "backup.hosts.mail.test"));
            first.insert(route.hosts[0].name.clone());
        }
        // 64 draws among 4: all appear first (chance of missing one ~ 4·0.75⁶⁴).
        assert_eq!(first.len(), 4, "{first:?}");
        // Only the first route went to the network.
        let m = r.metrics();
        assert!(m.upstream_queries <= 11, "{m:?}");
    });
}

#[test]
fn addresses_of_one_host_are_shuffled() {
    let nsd = Nsd::fixture();
    block_on(async {
        let r = Resolver::new(with_preference(&nsd, IpPreference::Ipv4Only));
        let mut first = HashSet::new();
        for _ in 0..48 {
            let route = r.resolve_route("multimx.mail.test").await;
            let addrs = &route.hosts[0].addrs;
            assert_eq!(addrs.len(), 3);
            first.insert(addrs[0]);
        }
        assert_eq!(first.len(), 3, "{first:?}");
    });
}

#[test]
fn no_mx_means_the_domain_itself() {
    let nsd = Nsd::fixture();
    block_on(async {
        let r = Resolver::new(config(&[nsd.addr]));
        let route = r.resolve_route("implicit.mail.test").await;
        assert_eq!(route.error, None);
        assert!(route.implicit_mx);
        assert_eq!(names(&route), vec![(0, "implicit.mail.test")]);
        assert_eq!(
            route.hosts[0].addrs,
            vec![ip("192.0.2.50"), ip("2001:db8::50")]
        );

        // No MX and no addresses: permanent.
        let route = r.resolve_route("bare.mail.test").await;
        let err = route.error.expect("no route");
        assert_eq!(err, RouteError::NoAddress("bare.mail.test".into()));
        assert!(err.is_permanent());
    });
}

#[test]
fn null_mx_and_nxdomain_are_permanent() {
    let nsd = Nsd::fixture();
    block_on(async {
        let r = Resolver::new(config(&[nsd.addr]));
        let route = r.resolve_route("nullmx.mail.test").await;
        assert!(route.hosts.is_empty());
        let err = route.error.expect("null MX");
        assert_eq!(err, RouteError::NullMx("nullmx.mail.test".into()));
        assert!(err.is_permanent());

        let route = r.resolve_route("no-such-domain.mail.test").await;
        let err = route.error.expect("nxdomain");
        assert_eq!(
            err,
            RouteError::NoSuchDomain("no-such-domain.mail.test".into())
        );
        assert!(err.is_permanent());
    });
}

#[test]
fn missing_mx_hosts() {
    let nsd = Nsd::fixture();
    block_on(async {
        let r = Resolver::new(config(&[nsd.addr]));
        // The only MX host does not exist: permanent.
        let route = r.resolve_route("noaddr.mail.test").await;
        let err = route.error.clone().expect("no route");
        assert_eq!(
            err,
            RouteError::NoSuchDomain("missing.hosts.mail.test".into())
        );
        assert!(err.is_permanent());
        assert_eq!(route.hosts.len(), 1);
        assert!(route.hosts[0].addrs.is_empty());

        // A missing host beside a working one: the route works, the host says why.
        let route = r.resolve_route("partial.mail.test").await;
        assert_eq!(route.error, None);
        assert_eq!(
            names(&route),
            vec![(10, "missing.hosts.mail.test"), (20, "a.hosts.mail.test")]
        );
        assert!(route.hosts[0].error.is_some());
        assert_eq!(route.hosts[1].addrs, vec![ip("192.0.2.1")]);
    });
}

#[test]
fn mx_pointing_at_a_cname_is_followed() {
    let nsd = Nsd::fixture();
    block_on(async {
        let r = Resolver::new(config(&[nsd.addr]));
        let route = r.resolve_route("cnamemx.mail.test").await;
        assert_eq!(route.error, None);
        assert_eq!(names(&route), vec![(10, "alias.hosts.mail.test")]);
        assert_eq!(route.hosts[0].addrs, vec![ip("192.0.2.1")]);

        let route = r.resolve_route("crossmx.mail.test").await;
        assert_eq!(route.error, None);
        assert_eq!(names(&route), vec![(10, "www.other.test")]);
        assert_eq!(route.hosts[0].addrs, vec![ip("192.0.2.80")]);
    });
}

#[test]
fn mx_naming_an_ip_address_is_a_failed_host() {
    let nsd = Nsd::fixture();
    block_on(async {
        let r = Resolver::new(config(&[nsd.addr]));
        let route = r.resolve_route("ipmx.mail.test").await;
        let err = route.error.expect("no route");
        assert_eq!(err, RouteError::IpLiteralMx("192.0.2.9".into()));
        assert!(err.is_permanent());

        let route = r.resolve_route("ipmixed.mail.test").await;
        assert_eq!(route.error, None);
        assert_eq!(
            route.hosts[0].error,
            Some(RouteError::IpLiteralMx("192.0.2.9".into()))
        );
        assert_eq!(route.hosts[1].addrs, vec![ip("192.0.2.2")]);
    });
}

#[test]
fn ip_family_preference() {
    let nsd = Nsd::fixture();
    block_on(async {
        let cases = [
            (
                IpPreference::PreferIpv6,
                vec![ip("2001:db8::3"), ip("192.0.2.3")],
            ),
            (
                IpPreference::PreferIpv4,
                vec![ip("192.0.2.3"), ip("2001:db8::3")],
            ),
            (IpPreference::Ipv6Only, vec![ip("2001:db8::3")]),
            (IpPreference::Ipv4Only, vec![ip("192.0.2.3")]),
        ];
        for (pref, want) in cases {
            let r = Resolver::new(with_preference(&nsd, pref));
            let route = r.resolve_route("dualmx.mail.test").await;
            assert_eq!(route.hosts[0].addrs, want, "{pref:?}");
        }
        // An IPv6-only host under ipv4-only: no usable address, permanent.
        let r = Resolver::new(with_preference(&nsd, IpPreference::Ipv4Only));
        let route = r.resolve_route("v6mx.mail.test").await;
        let err = route.error.expect("no v4");
        assert_eq!(err, RouteError::NoAddress("v6only.hosts.mail.test".into()));
        let r = Resolver::new(with_preference(&nsd, IpPreference::PreferIpv4));
        let route = r.resolve_route("v6mx.mail.test").await;
        assert_eq!(route.hosts[0].addrs, vec![ip("2001:db8::6")]);
    });
}

#[test]
fn host_with_addresses_needing_tcp() {
    let nsd = Nsd::fixture();
    block_on(async {
        let r = Resolver::new(with_preference(&nsd, IpPreference::Ipv4Only));
        let route = r.resolve_route("bigmx.mail.test").await;
        assert_eq!(route.error, None);
        assert_eq!(route.hosts[0].addrs.len(), 120);
        assert_eq!(r.metrics().tcp_queries, 1);
    });
}

#[test]
fn address_literal_domain() {
    block_on(async {
        // No server needed: nothing is looked up.
        let r = Resolver::new(config(&[]));
        let route = r.resolve_route("[192.0.2.77]").await;
        assert_eq!(route.error, None);
        assert_eq!(route.hosts[0].addrs, vec![ip("192.0.2.77")]);
        let route = r.resolve_route("[IPv6:2001:db8::77]").await;
        assert_eq!(route.hosts[0].addrs, vec![ip("2001:db8::77")]);
        // Anything else with no server is a temporary lookup failure.
        let route = r.resolve_route("example.test").await;
        assert_eq!(
            route.error,
            Some(RouteError::Lookup {
                name: "example.test".into(),
                error: ResolveError::NoServers
            })
        );
    });
}
