//! Routing: which route, target and connection strategy a recipient takes
//! (the `[[rule]]` set, then the route's fallback after repeated deferrals).
//! When a rule uses `match.mx`, the MX host names of the recipients' domains
//! are looked up first ([`CoreDelivery::mx_hosts`]).

use std::collections::HashMap;

use sluice_spool::{Envelope, RecipientStatus, Reply};

use super::config::{DeliveryConfig, RouteConfig, RouteKind};
use super::job::{Strategy, Target};
use super::tls_policy::{self, TlsPolicy};
use super::{now_ms, CoreDelivery};

/// What the rules may match on, read once per message.
pub(super) fn message_facts(envelope: &Envelope) -> sluice_policy::MessageFacts<'_> {
    sluice_policy::MessageFacts {
        listener: &envelope.listener,
        client_ip: envelope.client_ip,
        auth_user: envelope.auth_user.as_deref(),
        sender: &envelope.sender,
        priority: envelope.priority,
        size: envelope.size,
    }
}

/// Where a recipient goes, as the rules and the configuration decide.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The route taken (after any fallback).
    pub route: String,
    pub target: Target,
    pub strategy: Strategy,
    /// The rule that decided (1-based), None when no rule matched.
    pub rule: Option<usize>,
}

/// Route, target, connection strategy and TLS policy for one recipient: the
/// first matching `[[rule]]` decides (with the domain's MX host names when
/// they were looked up); what no rule decides takes the rule set's built-in
/// routes ("local", "default" when configured); a route's fallback takes over
/// after `fallback_after` deferrals of this recipient. `tenant` is the one
/// stored with the message at reception. Pure: delivery and `sluice debug
/// tls` both call it.
pub fn route_recipient(
    cfg: &DeliveryConfig,
    facts: &sluice_policy::MessageFacts<'_>,
    tenant: Option<&str>,
    rules: &sluice_policy::RuleSet,
    recipient: &sluice_spool::Recipient,
    mx: Option<&MxHosts>,
) -> Result<Routed, Reply> {
    let hosts: Option<Vec<&str>> = mx.map(|m| {
        m.get(&domain_of(&recipient.address))
            .map(|h| h.iter().map(String::as_str).collect())
            .unwrap_or_default()
    });
    let decision =
        rules.evaluate_recipient(facts, &recipient.address, recipient.local, hosts.as_deref());
    let chosen = decision.route.as_str();
    let deferrals = match &recipient.status {
        RecipientStatus::Deferred { attempts, .. } => *attempts,
        _ => 0,
    };
    let route_name = cfg.effective_route(chosen, deferrals);
    // The message's REQUIRETLS is set per job (`ledger::jobs`).
    let strategy = Strategy {
        source_ip: decision.source_ip,
        ehlo_name: decision.ehlo_name.clone(),
        pool: decision.pool.clone(),
        tenant: sluice_policy::tenant::tenant_of(
            decision.tenant.as_deref(),
            tenant,
            facts.auth_user,
            &cfg.tenants,
        ),
        ..Strategy::default()
    };
    let route = cfg.routes.get(route_name);
    let tls = tls_policy::configured(
        decision.rule.zip(decision.tls),
        route.map(|r| (route_name, r)),
        cfg.delivery.tls,
    );
    let target = match route {
        Some(route) if route.kind != RouteKind::Mx => host_target(route_name, route, tls)?,
        route => {
            let domain = domain_of(&recipient.address);
            if domain.is_empty() {
                return Err(Reply::new(
                    550,
                    "5.1.2",
                    "recipient has no domain to route to",
                ));
            }
            Target::Mx {
                domain,
                port: route.and_then(|r| r.port).unwrap_or(cfg.delivery.mx_port),
                tls,
            }
        }
    };
    Ok(Routed {
        route: route_name.to_string(),
        target,
        strategy,
        rule: decision.rule,
    })
}

impl CoreDelivery {
    /// [`route_recipient`] with this relay's configuration.
    pub(super) fn target_for(
        &self,
        facts: &sluice_policy::MessageFacts<'_>,
        tenant: Option<&str>,
        rules: &sluice_policy::RuleSet,
        recipient: &sluice_spool::Recipient,
        mx: Option<&MxHosts>,
        chosen: &mut PoolChoices,
    ) -> Result<(String, Target, Strategy), Reply> {
        let cfg = self.cfg();
        let r = route_recipient(&cfg, facts, tenant, rules, recipient, mx)?;
        let strategy = match &r.strategy.pool {
            // A pool's member is chosen once per message and destination
            // (`pools.rs`): its recipients there travel together.
            Some(pool) => {
                let known = chosen
                    .iter()
                    .find(|((t, s), _)| *t == r.target && *s == r.strategy)
                    .map(|(_, member)| member.clone());
                match known {
                    Some(member) => member,
                    None => {
                        let member =
                            super::pools::choose(&cfg, pool, &r.target, &r.strategy, mx, now_ms())?;
                        if chosen.len() < MAX_POOL_CHOICES {
                            chosen.push(((r.target.clone(), r.strategy.clone()), member.clone()));
                        }
                        member
                    }
                }
            }
            None => r.strategy,
        };
        Ok((r.route, r.target, strategy))
    }
}

/// The pool members chosen for one message: (target, the rule's strategy) →
/// the member's strategy.
pub(super) type PoolChoices = Vec<((Target, Strategy), Strategy)>;

/// Most pool choices remembered for one message (one per destination and
/// pool; beyond this, each further recipient chooses anew).
const MAX_POOL_CHOICES: usize = 64;

/// MX host names per recipient domain, for rules using `match.mx`.
pub type MxHosts = HashMap<String, Vec<String>>;

/// The domain of an address, lowercased, without a trailing dot.
pub fn domain_of(address: &str) -> String {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase())
        .unwrap_or_default()
}

impl CoreDelivery {
    /// The MX host names of the open recipients' domains (cached by the
    /// resolver, so the connection's own lookup costs nothing more). A domain
    /// whose lookup fails has none: `match.mx` rules do not match it, and the
    /// connection reports the failure.
    pub(super) async fn mx_hosts(&self, envelope: &Envelope) -> MxHosts {
        let mut out = MxHosts::new();
        for r in &envelope.recipients {
            if !super::is_open(&r.status) {
                continue;
            }
            let domain = domain_of(&r.address);
            if domain.is_empty() || out.contains_key(&domain) {
                continue;
            }
            let route = self.resolver.resolve_route(&domain).await;
            let names = route.hosts.iter().map(|h| h.name.clone()).collect();
            out.insert(domain, names);
        }
        out
    }
}

pub(super) fn host_target(
    name: &str,
    route: &RouteConfig,
    tls: TlsPolicy,
) -> Result<Target, Reply> {
    let host = route
        .host
        .clone()
        .ok_or_else(|| Reply::new(451, "4.3.5", format!("route {name} has no host")))?;
    let (lmtp, default_port) = match route.kind {
        RouteKind::Lmtp => (true, 24),
        RouteKind::Smtp | RouteKind::Relay | RouteKind::Mx => (false, 25),
    };
    Ok(Target::Host {
        route: name.to_string(),
        host,
        port: route.port.unwrap_or(default_port),
        lmtp,
        tls,
        auth: route.auth_user.clone().zip(route.auth_password.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::delivery::OutboundTls;
    use crate::delivery::job::site_key;
    use crate::delivery::tls_policy::{Basis, Level};

    fn cfg(text: &str) -> DeliveryConfig {
        crate::config::Config::load("t", text, &[])
            .expect("config")
            .delivery_config()
    }

    #[test]
    fn fallback_route_after_n_deferrals() {
        let c = cfg(r#"
            [route.mx]
            type = "mx"
            fallback = "smarthost"
            fallback_after = 2

            [route.smarthost]
            type = "relay"
            host = "127.0.0.1"
            port = 2600
            fallback = "mx"

            [route.plain]
            type = "relay"
            host = "127.0.0.2"
            fallback = "smarthost"
            "#);
        assert_eq!(c.effective_route("mx", 0), "mx");
        assert_eq!(c.effective_route("mx", 1), "mx");
        assert_eq!(c.effective_route("mx", 2), "smarthost");
        assert_eq!(c.effective_route("mx", 9), "smarthost");
        // One level only: the fallback's own fallback is not followed.
        assert_eq!(c.effective_route("smarthost", 3), "mx");
        // fallback_after defaults to 3.
        assert_eq!(c.effective_route("plain", 2), "plain");
        assert_eq!(c.effective_route("plain", 3), "smarthost");
        // Unknown (built-in) routes have no fallback.
        assert_eq!(c.effective_route("nothing", 100), "nothing");
    }

    #[test]
    fn fallback_must_name_another_route() {
        for (text, needle) in [
            (
                "[route.a]\ntype = \"mx\"\nfallback = \"nowhere\"\n",
                "route.a.fallback",
            ),
            (
                "[route.a]\ntype = \"mx\"\nfallback = \"a\"\n",
                "route.a.fallback",
            ),
            (
                "[route.a]\ntype = \"mx\"\nfallback = \"mx\"\nfallback_after = 0\n",
                "route.a.fallback_after",
            ),
        ] {
            let err = crate::config::Config::load("t", text, &[])
                .expect_err(text)
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        // The built-in "mx" route is a valid fallback.
        cfg("[route.a]\ntype = \"relay\"\nhost = \"h\"\nfallback = \"mx\"\n");
    }

    #[test]
    fn client_certificate_keys_go_together_and_need_tls() {
        for (text, needle) in [
            (
                "[route.a]\ntype = \"relay\"\nhost = \"h\"\ntls_client_cert = \"/c.pem\"\n",
                "route.a.tls_client_cert",
            ),
            (
                "[route.a]\ntype = \"relay\"\nhost = \"h\"\ntls = \"none\"\n\
                 tls_client_cert = \"/c.pem\"\ntls_client_key = \"/k.pem\"\n",
                "needs TLS",
            ),
        ] {
            let err = crate::config::Config::load("t", text, &[])
                .expect_err(text)
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        cfg("[route.a]\ntype = \"relay\"\nhost = \"h\"\ntls_client_cert = \"/c.pem\"\ntls_client_key = \"/k.pem\"\n");
    }

    #[test]
    fn rollup_keys_are_the_mx_host_set_with_the_strategy() {
        use crate::delivery::job::{mx_set_key, rollup_key};
        let hosts = |h: &[&str]| h.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = mx_set_key(&hosts(&["mx2.example.net", "MX1.example.net."])).expect("set");
        let b = mx_set_key(&hosts(&[
            "mx1.example.net",
            "mx2.example.net",
            "mx1.example.net",
        ]))
        .expect("set");
        assert_eq!(a, "mx:mx1.example.net,mx2.example.net");
        assert_eq!(a, b, "order, case, dots and repeats do not matter");
        assert_ne!(mx_set_key(&hosts(&["mx1.example.net"])), Some(a.clone()));
        assert_eq!(mx_set_key(&[]), None, "a failed lookup rolls nothing up");
        let t = |domain: &str, level| Target::Mx {
            domain: domain.into(),
            port: 25,
            tls: TlsPolicy {
                level,
                basis: Basis::Global,
                implicit: false,
            },
        };
        let plain = Strategy::default();
        let from = Strategy {
            source_ip: Some("192.0.2.7".parse().expect("ip")),
            ..Strategy::default()
        };
        // Two domains, one key; a strategy or TLS level apart, another.
        let one = rollup_key(&a, &t("a.example", Level::Opportunistic), &plain);
        assert_eq!(
            one,
            rollup_key(&a, &t("b.example", Level::Opportunistic), &plain)
        );
        assert_eq!(one, "mx:mx1.example.net,mx2.example.net");
        assert_eq!(
            rollup_key(&a, &t("a.example", Level::Opportunistic), &from),
            "mx:mx1.example.net,mx2.example.net|192.0.2.7|"
        );
        assert_eq!(
            rollup_key(&a, &t("a.example", Level::Verify), &plain),
            "mx:mx1.example.net,mx2.example.net|tls=verify"
        );
    }

    #[test]
    fn rollup_is_on_by_default_and_off_per_domain_or_globally() {
        let c = cfg("");
        assert!(c.rollup("a.example"));
        let c = cfg("[destination.\"own.example\"]\nmax_connections = 2\n\
             [destination.\"out.example\"]\nrollup = false\n");
        assert!(c.rollup("a.example"));
        assert!(!c.rollup("own.example"), "its own section: its own limits");
        assert!(!c.rollup("out.example"));
        let c = cfg("[destination.default]\nrollup = false\n");
        assert!(!c.rollup("a.example"));
        // Only `false` belongs in a domain's own section.
        let err =
            crate::config::Config::load("t", "[destination.\"x.example\"]\nrollup = true\n", &[])
                .expect_err("rollup = true per domain")
                .to_string();
        assert!(err.contains("destination.\"x.example\".rollup"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn sites_are_split_by_connection_strategy() {
        let t = Target::Mx {
            domain: "example.com".into(),
            port: 25,
            tls: TlsPolicy::global(OutboundTls::Opportunistic),
        };
        assert_eq!(site_key(&t, &Strategy::default()), "example.com");
        let s = Strategy {
            source_ip: Some("192.0.2.7".parse().expect("ip")),
            ehlo_name: Some("out7.example.net".into()),
            ..Strategy::default()
        };
        assert_eq!(site_key(&t, &s), "example.com|192.0.2.7|out7.example.net");
        // A rule's TLS level other than the default makes a site of its own.
        let v = Target::Mx {
            domain: "example.com".into(),
            port: 25,
            tls: TlsPolicy {
                level: Level::Verify,
                basis: Basis::Rule(1),
                implicit: false,
            },
        };
        assert_eq!(site_key(&v, &Strategy::default()), "example.com|tls=verify");
        assert_eq!(
            site_key(&v, &s),
            "example.com|192.0.2.7|out7.example.net|tls=verify"
        );
        let h = host_target(
            "smart",
            &RouteConfig {
                kind: RouteKind::Relay,
                host: Some("relay.example.net".into()),
                port: None,
                tls: None,
                tls_client_cert: None,
                tls_client_key: None,
                auth_user: None,
                auth_password: None,
                fallback: None,
                fallback_after: 3,
            },
            TlsPolicy::global(OutboundTls::Opportunistic),
        )
        .expect("target");
        assert_eq!(h.destination(), "route:smart");
        assert_eq!(
            site_key(
                &h,
                &Strategy {
                    source_ip: None,
                    ehlo_name: Some("e".into()),
                    ..Strategy::default()
                }
            ),
            "route:smart||e"
        );
        // REQUIRETLS messages get connections of their own.
        let r = Strategy {
            message_tls: crate::delivery::tls_policy::MessageTls::RequireTls,
            ..Strategy::default()
        };
        assert_eq!(site_key(&t, &r), "example.com|requiretls");
        assert_eq!(site_key(&v, &r), "example.com|tls=verify|requiretls");
    }
}
