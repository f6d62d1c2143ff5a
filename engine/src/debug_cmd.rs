//! `sluice debug …`: what the relay sees in DNS, through the same resolver and
//! routing code delivery uses (the [dns] section of the configuration).

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, Context};
use glommio::{LocalExecutorBuilder, Placement};
use sluice_dns::{QueryType, Resolver, Route};

use crate::config::Config;

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
}

pub fn run(config: &Config, command: DebugCommand, out: &mut dyn Write) -> anyhow::Result<()> {
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
    executor.run(async move {
        let resolver = Resolver::new(resolver_config);
        match command {
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

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
