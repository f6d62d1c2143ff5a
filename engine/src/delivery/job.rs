//! What travels between cores: a job (recipients of one message for one
//! site) and its result, plus where a job goes (target and connection
//! strategy) and the site key that picks the site's owner core.

use std::net::IpAddr;

use sluice_spool::{EnhancedStatus, MessageId, Notify, Reply, Ret};

use super::outbound::SessionFailure;
use super::tls_policy::{Level, MessageTls, TlsPolicy};
use crate::smtp::client;

/// Where a group of recipients goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The recipient domain's MX hosts.
    Mx {
        domain: String,
        port: u16,
        tls: TlsPolicy,
    },
    /// A configured host (smart host or local store).
    Host {
        route: String,
        host: String,
        port: u16,
        lmtp: bool,
        tls: TlsPolicy,
        auth: Option<(String, String)>,
    },
}

impl Target {
    /// The destination's name: the domain, or "route:NAME". `[destination.*]`
    /// settings are looked up by it.
    pub fn destination(&self) -> String {
        match self {
            Target::Mx { domain, .. } => domain.clone(),
            Target::Host { route, .. } => format!("route:{route}"),
        }
    }

    /// The configured TLS policy of this destination.
    pub fn tls(&self) -> &TlsPolicy {
        match self {
            Target::Mx { tls, .. } | Target::Host { tls, .. } => tls,
        }
    }
}

/// How connections are made (rules' `source_ip` and `ehlo_name`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Strategy {
    pub source_ip: Option<IpAddr>,
    pub ehlo_name: Option<String>,
    /// The `[pool.NAME]` the source address was chosen from (`pools.rs`).
    pub pool: Option<String>,
    /// The tenant the recipients count for (`[tenant.NAME]`): not part of
    /// the site key; the site shares its deliveries between tenants.
    pub tenant: Option<String>,
    /// The message's REQUIRETLS or `TLS-Required: No` (RFC 8689): its
    /// sessions run under their own policy, so they get their own site.
    pub message_tls: MessageTls,
    /// The warm-up counter (`"IP|scope"`) this job holds a reservation of,
    /// settled when its result is reported (`pools::settle`): a delivery
    /// counts, anything else gives the reservation back. Not part of the
    /// site key.
    pub warmup: Option<String>,
}

/// The site key: destination plus connection strategy, since a connection from
/// one source address cannot carry mail meant to leave from another; and the
/// TLS level when it is not the default `opportunistic`, since rules can give
/// one destination several levels and a connection runs under one; and the
/// message's REQUIRETLS or `TLS-Required: No`, for the same reason.
pub fn site_key(target: &Target, strategy: &Strategy) -> String {
    keyed(target.destination(), target, strategy)
}

/// The key of an MX host set: `mx:` and the host names, lowercase, without
/// trailing dots, sorted and without repeats (so preference order and
/// spelling do not matter). None for an empty set (the lookup failed: the
/// domain stays apart, and its connection reports why).
pub fn mx_set_key(hosts: &[String]) -> Option<String> {
    let mut names: Vec<String> = hosts
        .iter()
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .collect();
    if names.is_empty() {
        return None;
    }
    names.sort();
    names.dedup();
    Some(format!("mx:{}", names.join(",")))
}

/// The rollup key of a job to an MX target: its MX host set in place of the
/// domain, with the same strategy and TLS parts as [`site_key`], so domains
/// sharing it share a site group (owner core and limits) only when their
/// connections would run the same way.
pub fn rollup_key(mx_set: &str, target: &Target, strategy: &Strategy) -> String {
    keyed(mx_set.to_string(), target, strategy)
}

/// `destination` followed by the strategy and TLS parts of a site key.
fn keyed(destination: String, target: &Target, strategy: &Strategy) -> String {
    let mut key = destination;
    if strategy.source_ip.is_some() || strategy.ehlo_name.is_some() {
        key = format!(
            "{key}|{}|{}",
            strategy
                .source_ip
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            strategy.ehlo_name.as_deref().unwrap_or("")
        );
    }
    let level = target.tls().level;
    if level != Level::Opportunistic {
        key.push_str("|tls=");
        key.push_str(level.name());
    }
    key.push_str(strategy.message_tls.site_suffix());
    key
}

#[derive(Debug, Clone)]
pub struct JobRecipient {
    /// Position in the envelope's recipient list.
    pub index: u32,
    pub address: String,
    pub notify: Notify,
    pub orcpt: Option<String>,
}

/// Recipients of one message for one site, sent to the site's owner.
#[derive(Debug)]
pub struct Job {
    pub id: MessageId,
    /// Mesh peer to send the result to (the shard owner).
    pub reply_to: usize,
    pub target: Target,
    pub strategy: Strategy,
    /// Route name that chose the target (after any fallback), for the log.
    pub route: String,
    /// Virtual queue of the message, for the log.
    pub queue: String,
    pub recipients: Vec<JobRecipient>,
    pub sender: String,
    pub priority: i16,
    pub size: u64,
    pub eightbit: bool,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    pub envid: Option<String>,
    pub attempt: u32,
    pub arrival_unix_ms: u64,
    /// The site group (MX rollup) the job's site belongs to: its
    /// [`rollup_key`], set by the shard owner when the domain is rolled up;
    /// None = the site stands alone.
    pub rollup: Option<String>,
    /// What reception read from the header, for delivery events (shared
    /// with the envelope; none when events are off).
    pub header_facts: Option<std::sync::Arc<sluice_spool::HeaderFacts>>,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Delivered(Reply),
    Deferred(Reply),
    Failed(Reply),
}

impl Outcome {
    pub fn of(reply: &client::Reply) -> Outcome {
        let recorded = recorded(reply);
        match reply.class() {
            2 => Outcome::Delivered(recorded),
            5 => Outcome::Failed(recorded),
            _ => Outcome::Deferred(recorded),
        }
    }

    pub fn reply(&self) -> &Reply {
        match self {
            Outcome::Delivered(r) | Outcome::Deferred(r) | Outcome::Failed(r) => r,
        }
    }
}

#[derive(Debug)]
pub struct JobResult {
    pub id: MessageId,
    pub outcomes: Vec<(u32, Outcome)>,
    /// For DSNs: "dns; mx.example.com" of the host that answered, if any.
    pub remote_mta: Option<String>,
    /// The next hop offered DSN (NOTIFY was passed on with each RCPT).
    pub peer_dsn: bool,
    /// The next hop was an LMTP store (final delivery).
    pub lmtp: bool,
}

/// NOTIFY as it goes on the RCPT command (RFC 3461), None when not given.
pub fn notify_keywords(n: Notify) -> Option<String> {
    if n.is_empty() {
        return None;
    }
    let names: Vec<&str> = [
        (Notify::NEVER, "NEVER"),
        (Notify::SUCCESS, "SUCCESS"),
        (Notify::FAILURE, "FAILURE"),
        (Notify::DELAY, "DELAY"),
    ]
    .iter()
    .filter(|(bit, _)| n.contains(*bit))
    .map(|(_, name)| *name)
    .collect();
    Some(names.join(","))
}

/// Every recipient of the job gets the session failure's reply.
pub fn result_for_failure(job: &Job, failure: &SessionFailure) -> JobResult {
    let outcome = Outcome::of(&failure.reply);
    JobResult {
        id: job.id,
        outcomes: job
            .recipients
            .iter()
            .map(|r| (r.index, outcome.clone()))
            .collect(),
        remote_mta: None,
        peer_dsn: false,
        lmtp: false,
    }
}

/// Every recipient of the job is deferred with `reply`.
pub fn deferred_all(job: &Job, reply: Reply) -> JobResult {
    JobResult {
        id: job.id,
        outcomes: job
            .recipients
            .iter()
            .map(|r| (r.index, Outcome::Deferred(reply.clone())))
            .collect(),
        remote_mta: None,
        peer_dsn: false,
        lmtp: false,
    }
}

/// RET as it goes on the MAIL command (RFC 3461).
pub fn ret_keyword(ret: Ret) -> &'static str {
    match ret {
        Ret::Full => "FULL",
        Ret::Headers => "HDRS",
    }
}

/// A next hop's reply (or one made up for a local condition) as recorded:
/// the enhanced status kept apart, lines joined.
pub fn recorded(reply: &client::Reply) -> Reply {
    Reply {
        code: reply.code,
        status: reply.esc.as_deref().and_then(EnhancedStatus::parse),
        text: reply.text.replace('\n', " "),
    }
}
