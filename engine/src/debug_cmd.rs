//! `sluice debug …`: what the relay sees in DNS, and which TLS policy a
//! destination gets, through the same resolver and routing code delivery uses
//! (the [dns], [delivery], [route.*] and [[rule]] sections of the configuration).

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, Context};
use glommio::{LocalExecutorBuilder, Placement};
use sluice_dns::{QueryType, Resolver, Route};

use crate::config::delivery::DeliveryConfig;
use crate::config::Config;
use crate::delivery::{
    dane, domain_of, mx_set_key, rollup_key, route_recipient, tls_policy, MxHosts, Target,
};

/// Where the system's resolvers are listed when `dns.servers` is empty.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

#[derive(clap::Subcommand, Debug, Clone)]
pub enum DebugCommand {
    /// Delivery route for a domain: MX hosts in order, addresses, TTLs, DNSSEC (AD).
    Route { domain: String },
    /// One lookup. TYPE is MX, A, AAAA, TXT, PTR or TLSA; for PTR, NAME may be an IP.
    Dns {
        #[arg(value_name = "TYPE")]
        qtype: String,
        name: String,
    },
    /// SPF (RFC 7208) for a client address, HELO name and MAIL FROM ("" for
    /// the null sender: the HELO name is checked), through the same code the
    /// listeners' `verify` runs.
    Spf {
        ip: IpAddr,
        helo: String,
        sender: String,
    },
    /// Each listener's TLS: mode, certificate, protocol versions, cipher
    /// suites in the server's order, key exchange groups.
    Listeners,
    /// Outbound TLS policy for a domain and why (which rule, route or
    /// delivery.tls), through delivery's own routing; the hosts and the
    /// certificate names a `verify` session checks.
    Tls {
        domain: String,
        /// Local part of the recipient the rules see.
        #[arg(long, default_value = "postmaster")]
        local_part: String,
        /// Sender the rules see ("" is the null sender).
        #[arg(long, default_value = "")]
        sender: String,
        /// Listener the rules see.
        #[arg(long, default_value = "smtp")]
        listener: String,
        /// Authenticated user the rules see.
        #[arg(long)]
        auth_user: Option<String>,
        /// Client address the rules see.
        #[arg(long)]
        client_ip: Option<IpAddr>,
    },
}

pub fn run(config: &Config, command: DebugCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    if let DebugCommand::Listeners = command {
        return listeners(config, out);
    }
    let resolver_config = config
        .dns
        .resolver_config(Path::new(RESOLV_CONF))
        .with_context(|| format!("dns.servers is empty and {RESOLV_CONF} cannot be read"))?;
    let executor = LocalExecutorBuilder::new(Placement::Unbound)
        .name("sluice-debug")
        .io_memory(config.server.io_memory.0 as usize)
        .ring_depth(config.server.ring_depth)
        .make()
        .map_err(|e| anyhow!("starting executor: {e}"))?;
    // Checked before the executor: a configuration error is an error, not a
    // lookup.
    let rules = config.rule_set()?;
    let relay = config.relay_policy()?;
    let delivery = config.delivery_config();
    // MTA-STS as delivery sees it: the policies the relay cached (its table in
    // the spool directory, when there is one) and the same fetch.
    let mta_sts = match command {
        DebugCommand::Tls { .. } => {
            let tls = crate::delivery::outbound::OutboundTlsConfig::new(
                config.delivery.tls_ca_file.as_deref(),
                &config.route,
            )
            .context("outbound TLS setup (delivery.tls_ca_file, route.*.tls_client_cert)")?;
            let table = config.spool.path.join(crate::delivery::mta_sts::TABLE);
            Some(crate::delivery::mta_sts::MtaSts::start(
                config.delivery.mta_sts,
                table.is_dir().then(|| config.spool.path.clone()),
                // Read the relay's table, never write it: the running relay
                // would not see what this process stored.
                false,
                crate::delivery::mta_sts::FetchConfig {
                    timeout: config.delivery.mta_sts_fetch_timeout.0,
                    port: config.delivery.mta_sts_https_port,
                    tls: tls.verifying_client()?,
                    dns: resolver_config.clone(),
                    // A refresh would only fill this process's memory.
                    refresh_interval: None,
                },
            )?)
        }
        _ => None,
    };
    executor.run(async move {
        let resolver = Resolver::new(resolver_config);
        match command {
            DebugCommand::Listeners => listeners(config, out),
            DebugCommand::Tls {
                domain,
                local_part,
                sender,
                listener,
                auth_user,
                client_ip,
            } => {
                let facts = sluice_policy::MessageFacts {
                    listener: &listener,
                    client_ip,
                    auth_user: auth_user.as_deref(),
                    sender: &sender,
                    priority: 0,
                    size: 0,
                };
                let query = TlsQuery {
                    recipient: format!("{local_part}@{}", domain.trim_end_matches('.')),
                    facts,
                    local: relay.is_local_domain(&domain),
                };
                let Some(mta_sts) = mta_sts else {
                    return Err(anyhow!("MTA-STS not set up"));
                };
                tls(&resolver, &delivery, &rules, &mta_sts, &query, out).await
            }
            DebugCommand::Route { domain } => {
                let route = resolver.resolve_route(&domain).await;
                print_route(&route, out)?;
                match &route.error {
                    Some(e) => Err(anyhow!("no route: {e}")),
                    None => Ok(()),
                }
            }
            DebugCommand::Dns { qtype, name } => {
                let qtype: QueryType = qtype.parse().map_err(|e: String| anyhow!(e))?;
                let name = match (qtype, name.parse::<IpAddr>()) {
                    (QueryType::Ptr, Ok(ip)) => sluice_dns::reverse_name(ip),
                    _ => name,
                };
                lookup(&resolver, qtype, &name, out).await
            }
            DebugCommand::Spf { ip, helo, sender } => {
                let verifier = sluice_policy::auth::Verifier::new()?;
                let env = sluice_policy::auth::Envelope {
                    client_ip: ip,
                    helo: &helo,
                    mail_from: &sender,
                    hostname: &config.server.hostname,
                };
                let started = Instant::now();
                let verdict = verifier
                    .check_spf(&crate::verify::ResolverSource(&resolver), &env)
                    .await;
                let identity = if sender.is_empty() {
                    format!("helo {helo}")
                } else {
                    format!("mailfrom {sender}")
                };
                writeln!(
                    out,
                    "spf={} {identity} ip={ip} time={:.1}ms",
                    verdict.as_str(),
                    started.elapsed().as_secs_f64() * 1000.0
                )?;
                Ok(())
            }
        }
    })
}

async fn lookup(
    resolver: &Resolver,
    qtype: QueryType,
    name: &str,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let result = resolver.lookup(name, qtype).await;
    let elapsed = started.elapsed();
    let lookup = result.with_context(|| format!("{qtype} {name}"))?;
    let status = match lookup.negative() {
        Some(sluice_dns::NegativeKind::NxDomain { .. }) => "NXDOMAIN",
        Some(sluice_dns::NegativeKind::NoData { .. }) => "NODATA",
        None => "NOERROR",
    };
    writeln!(
        out,
        "{qtype} {name}: {status} records={} ttl={} secure={}{} time={:.1}ms",
        lookup.records().len(),
        lookup.ttl,
        yes_no(lookup.secure()),
        if lookup.authentic_data() && !lookup.secure() {
            " (AD set, not trusted: dns.dnssec_validating = false)"
        } else {
            ""
        },
        elapsed.as_secs_f64() * 1000.0,
    )?;
    for record in lookup.records() {
        writeln!(out, "  {} {record}", record.ttl())?;
    }
    Ok(())
}

fn print_route(route: &Route, out: &mut dyn Write) -> std::io::Result<()> {
    let source = if route.implicit_mx {
        "implicit MX (no MX records)"
    } else {
        "MX"
    };
    writeln!(
        out,
        "route {}: {source}, {} host(s)",
        route.domain,
        route.hosts.len()
    )?;
    for host in &route.hosts {
        let addrs = if host.addrs.is_empty() {
            "none".to_string()
        } else {
            host.addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(
            out,
            "  {} {} ttl={} secure={} addrs={addrs}",
            host.preference,
            host.name,
            host.ttl,
            yes_no(host.secure),
        )?;
        if let Some(e) = &host.error {
            write!(out, " error=\"{e}\"")?;
        }
        writeln!(out)?;
    }
    if let Some(e) = &route.error {
        let kind = if e.is_permanent() {
            "permanent"
        } else {
            "temporary"
        };
        writeln!(out, "error ({kind}): {e}")?;
    }
    Ok(())
}

/// `sluice debug listeners`: the inbound TLS of each listener, from the same
/// server config the relay builds (so a bad certificate is an error here too).
fn listeners(config: &Config, out: &mut dyn Write) -> anyhow::Result<()> {
    for (name, l) in &config.server.listener {
        let binds = l
            .bind
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mode = match l.tls {
            crate::config::TlsMode::None => "none",
            crate::config::TlsMode::Starttls => "starttls",
            crate::config::TlsMode::Implicit => "implicit",
        };
        writeln!(out, "listener {name}: {binds} tls={mode}")?;
        let (Some(cert), Some(key)) = (&l.tls_cert, &l.tls_key) else {
            continue;
        };
        let chain = crate::tls::certified_key(cert, key)
            .with_context(|| format!("server.listener.{name}"))?
            .cert
            .len();
        let server = crate::tls::server_config(cert, key)
            .with_context(|| format!("server.listener.{name}"))?;
        let offer = crate::tls::server_offer(&server);
        writeln!(
            out,
            "  certificate: {} ({chain} in chain), key {}",
            cert.display(),
            key.display()
        )?;
        writeln!(
            out,
            "  versions: {} (TLS 1.0 and 1.1 refused)",
            offer.versions.join(", ")
        )?;
        writeln!(
            out,
            "  cipher suites ({} order): {}",
            if offer.server_order {
                "server"
            } else {
                "client"
            },
            offer.suites.join(", ")
        )?;
        writeln!(out, "  key exchange: {}", offer.groups.join(", "))?;
    }
    Ok(())
}

/// The recipient `sluice debug tls` routes.
struct TlsQuery<'a> {
    recipient: String,
    facts: sluice_policy::MessageFacts<'a>,
    local: bool,
}

async fn tls(
    resolver: &Resolver,
    cfg: &DeliveryConfig,
    rules: &sluice_policy::RuleSet,
    mta_sts: &crate::delivery::mta_sts::MtaSts,
    q: &TlsQuery<'_>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let recipient = sluice_spool::Recipient {
        address: q.recipient.clone(),
        orcpt: None,
        notify: Default::default(),
        status: sluice_spool::RecipientStatus::Pending,
        local: q.local,
    };
    let domain = domain_of(&q.recipient);
    // Rules with match.mx see the MX host names, as in delivery.
    let mut mx = MxHosts::new();
    let mut route_lookup = None;
    if rules.uses_mx() {
        let route = resolver.resolve_route(&domain).await;
        mx.insert(
            domain.clone(),
            route.hosts.iter().map(|h| h.name.clone()).collect(),
        );
        route_lookup = Some(route);
    }
    let routed = route_recipient(
        cfg,
        &q.facts,
        None,
        rules,
        &recipient,
        rules.uses_mx().then_some(&mx),
    )
    .map_err(|reply| anyhow!("{} does not route: {reply}", q.recipient))?;
    // The destination's configured policy; MTA-STS is looked up for MX routes
    // (as delivery does), DANE is decided per MX host below.
    let configured = routed.target.tls().clone();
    let sts = match &routed.target {
        Target::Mx { .. } if configured.level != tls_policy::Level::None => {
            mta_sts.policy_for(resolver, &domain).await
        }
        Target::Mx { .. } => crate::delivery::mta_sts::Sts::Off("TLS policy none".into()),
        Target::Host { .. } => crate::delivery::mta_sts::Sts::Off(
            "a route to a host: MTA-STS applies to MX routes only".into(),
        ),
    };
    let policy = tls_policy::select(
        None,
        crate::delivery::mta_sts::policy(sts.mode(), &configured),
        configured.clone(),
    );
    writeln!(out, "tls {domain}: {policy}")?;
    writeln!(
        out,
        "  recipient <{}>{}, sender <{}>, listener {}",
        q.recipient,
        if q.local { " (local domain)" } else { "" },
        q.facts.sender,
        q.facts.listener
    )?;
    match routed.rule {
        Some(n) => writeln!(out, "  rule: [[rule]] {n} decided (route {})", routed.route)?,
        None => writeln!(
            out,
            "  rule: none matched (built-in route {})",
            routed.route
        )?,
    }
    writeln!(
        out,
        "  precedence: DANE > MTA-STS > [[rule]] tls > route.NAME.tls > delivery.tls (= {})",
        cfg.delivery.tls.level()
    )?;
    match &routed.target {
        Target::Mx { .. } if policy.level != tls_policy::Level::None => writeln!(
            out,
            "  dane: per MX host below (dns.dnssec_validating = {})",
            resolver.config().dnssec_validating
        )?,
        Target::Mx { .. } => writeln!(out, "  dane: not looked up (TLS policy none)")?,
        Target::Host { .. } if policy.level == tls_policy::Level::Dane => writeln!(
            out,
            "  dane: the route's host below (dns.dnssec_validating = {})",
            resolver.config().dnssec_validating
        )?,
        Target::Host { .. } => writeln!(
            out,
            "  dane: not looked up (a route to a host, without tls = \"dane\")"
        )?,
    }
    writeln!(out, "  mta-sts: {sts}")?;
    let check = |policy: &tls_policy::TlsPolicy| match (policy.level, &policy.basis) {
        (tls_policy::Level::Verify, tls_policy::Basis::Dane) => {
            "DANE: certificate must match TLSA for"
        }
        (tls_policy::Level::Required, tls_policy::Basis::Dane) => {
            "DANE (no usable TLSA): TLS required, any certificate; name"
        }
        (tls_policy::Level::Verify, _) => "certificate must verify for",
        (tls_policy::Level::Required, _) => "TLS required, any certificate; name",
        (tls_policy::Level::Opportunistic, _) => "STARTTLS when offered; name",
        (tls_policy::Level::None, _) => "no TLS; name",
        (tls_policy::Level::Dane, _) => "DANE must authenticate",
    };
    match &routed.target {
        Target::Host {
            host, port, lmtp, ..
        } => {
            let cert = cfg
                .routes
                .get(&routed.route)
                .is_some_and(|r| r.tls_client_cert.is_some());
            writeln!(
                out,
                "  route {}: {} {host}:{port}{}",
                routed.route,
                if *lmtp { "LMTP" } else { "SMTP" },
                if cert { ", client certificate" } else { "" }
            )?;
            if configured.level != tls_policy::Level::Dane {
                writeln!(out, "  {} {host}", check(&policy))?;
                return Ok(());
            }
            // The same decision delivery makes for the smart host.
            let (_, dane) = dane::for_smart_host(resolver, host, *port, &configured).await;
            match dane::skip_reason(&dane, &configured, host, *port) {
                Some(why) => writeln!(out, "  skipped: {host}: {why}")?,
                None => {
                    let effective =
                        tls_policy::select(dane::policy(&dane, &configured), None, configured);
                    writeln!(out, "  {} {host} (dane: {dane})", check(&effective))?;
                }
            }
        }
        Target::Mx { port, .. } => {
            let route = match route_lookup {
                Some(r) => r,
                None => resolver.resolve_route(&domain).await,
            };
            writeln!(out, "  route {}: MX of {domain}, port {port}", routed.route)?;
            // MX rollup: the site group this domain's site joins.
            let names: Vec<String> = route.hosts.iter().map(|h| h.name.clone()).collect();
            match mx_set_key(&names) {
                Some(set) if cfg.rollup(&domain) => writeln!(
                    out,
                    "  site group: {} (MX rollup: shares [destination.default] limits with domains of the same MX host set)",
                    rollup_key(&set, &routed.target, &routed.strategy)
                )?,
                _ if !cfg.rollup(&domain) => {
                    writeln!(out, "  site group: none (rollup off for {domain})")?
                }
                _ => writeln!(out, "  site group: none (no MX host names)")?,
            }
            let ip_key = crate::config::delivery::source_ip_key(routed.strategy.source_ip);
            for host in &route.hosts {
                print_limit_key(cfg, &host.name, &ip_key, out)?;
                if host.addrs.is_empty() {
                    writeln!(out, "  {} {}: no address", host.preference, host.name)?;
                    continue;
                }
                // The same decisions delivery makes for this host.
                let dane = dane::for_host(resolver, host, *port, &configured).await;
                if let Some(why) = dane::skip_reason(&dane, &configured, &host.name, *port) {
                    writeln!(out, "  {} skipped: {}: {why}", host.preference, host.name)?;
                    continue;
                }
                let dane_policy = dane::policy(&dane, &configured);
                if let (None, Some(why)) = (&dane_policy, sts.skip_reason(&host.name)) {
                    writeln!(out, "  {} skipped: {}: {why}", host.preference, host.name)?;
                    continue;
                }
                let effective = tls_policy::select(
                    dane_policy,
                    crate::delivery::mta_sts::policy(sts.mode(), &configured),
                    configured.clone(),
                );
                writeln!(
                    out,
                    "  {} {} {} (dane: {dane})",
                    host.preference,
                    check(&effective),
                    host.name
                )?;
            }
            if let Some(e) = &route.error {
                writeln!(out, "  MX lookup: {e}")?;
            }
        }
    }
    Ok(())
}

/// What connections to `host` count against (`[host.*]`, provider, or the
/// `[delivery] host_*` values), as delivery decides it.
fn print_limit_key(
    cfg: &DeliveryConfig,
    host: &str,
    ip_key: &str,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let key = cfg.limit_key(host, ip_key);
    let limits = cfg.limits_for(&key.as_key());
    let whose = match key.provider() {
        Some(name) => format!("provider {name}"),
        None => "host".to_string(),
    };
    let rates = |r: &[sluice_policy::Rate]| {
        if r.is_empty() {
            "none".to_string()
        } else {
            r.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    writeln!(
        out,
        "  limits of {host}: {whose}, key {}: max_connections {}, max_messages_per_connection {}, connection_rate {}, message_rate {}",
        key.as_key(),
        limits.max_connections,
        limits.max_messages_per_connection,
        rates(&limits.connection_rate),
        rates(&limits.message_rate),
    )
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
