//! Configuration of outbound delivery: `[delivery]`, `[queue.NAME]`, `[route.NAME]`,
//! `[destination.NAME]`, `[source_ip."IP"]`, `[host."NAME"]` and the `[[rule]]` list that picks queue and route per
//! recipient.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use sluice_policy::{Rate, TlsLevel};

use super::provider::LimitKey;
use super::{ByteSize, HumanDuration};

/// `delivery.tls` and `route.NAME.tls`: a TLS level, or `implicit` (TLS from
/// the first byte, for smart hosts on port 465, at the `required` level).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboundTls {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, whether or not the certificate verifies (recorded).
    Opportunistic,
    /// STARTTLS must be offered and succeed, else the attempt is deferred.
    Required,
    /// STARTTLS must be offered and the certificate verify for the host name
    /// (web PKI roots plus `delivery.tls_ca_file`), else the attempt is deferred.
    Verify,
    /// TLS from the first byte (smart hosts on port 465), any certificate.
    Implicit,
    /// Mandatory DANE: only hosts with usable DNSSEC-secure TLSA records, the
    /// certificate matching them (needs `dns.dnssec_validating`): MX hosts at
    /// `_25._tcp.MX`, a route's host at `_PORT._tcp.HOST`.
    Dane,
}

impl OutboundTls {
    /// The security level this setting asks for.
    pub fn level(self) -> TlsLevel {
        match self {
            OutboundTls::None => TlsLevel::None,
            OutboundTls::Opportunistic => TlsLevel::Opportunistic,
            OutboundTls::Required | OutboundTls::Implicit => TlsLevel::Required,
            OutboundTls::Verify => TlsLevel::Verify,
            OutboundTls::Dane => TlsLevel::Dane,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySection {
    /// Deliver queued mail. Off: the relay only accepts and queues.
    pub enabled: bool,
    /// EHLO name; defaults to server.hostname.
    pub ehlo_name: Option<String>,
    /// Port for MX delivery (25; tests use others).
    pub mx_port: u16,
    pub tls: OutboundTls,
    /// PEM file of CA certificates trusted for the `verify` level, in addition
    /// to the web PKI roots (a private CA of smart hosts or internal MX hosts).
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// MTA-STS (RFC 8461): look up and apply the policies destinations
    /// publish (`_mta-sts` TXT, policy over HTTPS, cached in the spool
    /// directory). On by default.
    pub mta_sts: bool,
    /// Most time one MTA-STS policy fetch may take (connect, TLS, the whole
    /// response); the first delivery to a domain waits for it at most this long.
    pub mta_sts_fetch_timeout: HumanDuration,
    /// Port the MTA-STS policy is fetched from: 443, as RFC 8461 says. Only
    /// tests set another.
    pub mta_sts_https_port: u16,
    /// How often cached MTA-STS policies are swept for those past half their
    /// max_age, which are re-fetched before they expire (RFC 8461 §5.1).
    pub mta_sts_refresh_interval: HumanDuration,
    pub connect_timeout: HumanDuration,
    pub greeting_timeout: HumanDuration,
    pub ehlo_timeout: HumanDuration,
    pub starttls_timeout: HumanDuration,
    pub mail_timeout: HumanDuration,
    pub rcpt_timeout: HumanDuration,
    pub data_timeout: HumanDuration,
    pub data_end_timeout: HumanDuration,
    /// How long an idle connection waits for another message to its site.
    pub idle_timeout: HumanDuration,
    /// Recipients per SMTP transaction; more are split over transactions.
    pub max_recipients_per_transaction: usize,
    /// Concurrent connections to one destination host (MX host name, or a
    /// route's host), whatever sites share it; 0 = no limit. Exact across cores:
    /// each host is owned by one core, which hands out the slots.
    pub max_connections_per_host: usize,
    /// Messages per period from each source IP (a rule's `source_ip`, or
    /// "default" for the kernel-chosen address), e.g. ["100/s", "10000/h"];
    /// empty = no limit. `[source_ip."IP"] message_rate` overrides it per IP.
    /// Exact across cores: each source IP is owned by one core, which grants the
    /// message permits. A message over the rate waits (it is not failed).
    pub source_ip_rate: Vec<Rate>,
    /// New connections per period to one destination host, e.g. ["10/s"];
    /// empty = no limit. Exact across cores (the host's owner core checks it when
    /// it grants the connection). `[host."NAME"] connection_rate` overrides it.
    pub host_connection_rate: Vec<Rate>,
    /// Messages per period to one destination host over all its connections and
    /// sites; empty = no limit. Exact across cores (the host's owner core grants a
    /// permit per message). `[host."NAME"] message_rate` overrides it.
    pub host_message_rate: Vec<Rate>,
    /// Messages over one connection to a destination host; 0 = no host limit.
    /// The site's `max_messages_per_connection` still applies: the smaller wins.
    pub host_max_messages_per_connection: usize,
    /// Most messages due now held in memory for delivery, over all cores
    /// (each core holds its share); 0 = no bound. One costs about 2 KiB
    /// (envelope, jobs in the site queues). Beyond it a message due now waits
    /// as its id only (8 bytes), in its destination's line, and is read back
    /// from the spool as attempts end: acceptance outrunning delivery grows
    /// the spool, not memory. Lines are served in turn and one destination
    /// holds at most half a core's share (`delivery/ready_lines.rs`).
    pub max_ready_messages: usize,
    /// Bounce classification rules tried before the shipped ones
    /// (docs/bounce-classes.md); re-read on reload.
    pub bounce_rules: Option<std::path::PathBuf>,
    /// Use the shipped `[provider.*]` presets (engine/presets/providers.toml)
    /// under the operator's own tables (docs/providers.md).
    pub provider_presets: bool,
}

impl Default for DeliverySection {
    fn default() -> Self {
        let secs = |s| HumanDuration(Duration::from_secs(s));
        DeliverySection {
            enabled: true,
            ehlo_name: None,
            mx_port: 25,
            tls: OutboundTls::Opportunistic,
            tls_ca_file: None,
            mta_sts: true,
            mta_sts_fetch_timeout: secs(10),
            mta_sts_https_port: 443,
            mta_sts_refresh_interval: secs(900),
            connect_timeout: secs(30),
            greeting_timeout: secs(300),
            ehlo_timeout: secs(300),
            starttls_timeout: secs(300),
            mail_timeout: secs(300),
            rcpt_timeout: secs(300),
            data_timeout: secs(120),
            data_end_timeout: secs(600),
            idle_timeout: secs(5),
            max_recipients_per_transaction: 100,
            max_connections_per_host: 0,
            source_ip_rate: Vec::new(),
            host_connection_rate: Vec::new(),
            host_message_rate: Vec::new(),
            host_max_messages_per_connection: 0,
            max_ready_messages: 1_000_000,
            bounce_rules: None,
            provider_presets: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Delay before each retry; the last one repeats.
    pub retry: Vec<HumanDuration>,
    /// Send a delay notice when a message has waited this long (each once).
    pub notify_delay: Vec<HumanDuration>,
    /// Give up and bounce after this long in the queue.
    pub expire: HumanDuration,
    /// Quota: most messages queued (0 = no limit); beyond → 452 4.3.1.
    pub max_messages: u64,
    /// Quota: most bytes queued (0 = no limit); beyond → 452 4.3.1.
    pub max_bytes: ByteSize,
    /// Messages dispatched per period from this queue, e.g. ["100/s", "10000/h"];
    /// empty = no limit. A message over the rate waits (it is not failed).
    pub message_rate: Vec<Rate>,
    /// Most deliveries (jobs: one per message and site) of this queue in flight
    /// at once; 0 = no limit. Enforced by each shard owner with a share of
    /// ceil(concurrency / cores); messages over it wait until jobs finish.
    pub concurrency: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        let m = |mins: u64| HumanDuration(Duration::from_secs(mins * 60));
        QueueConfig {
            retry: vec![m(2), m(5), m(10), m(15), m(30), m(60), m(120)],
            notify_delay: vec![m(4 * 60), m(24 * 60)],
            expire: m(5 * 24 * 60),
            max_messages: 0,
            max_bytes: ByteSize(0),
            message_rate: Vec::new(),
            concurrency: 0,
        }
    }
}

impl QueueConfig {
    /// Delay before attempt number `attempts + 1` (attempts already made ≥ 1).
    pub fn retry_delay(&self, attempts: u32) -> Duration {
        let idx = (attempts.max(1) - 1) as usize;
        self.retry
            .get(idx)
            .or(self.retry.last())
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(600))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteKind {
    /// Look up the recipient domain's MX hosts.
    Mx,
    /// A smart host.
    Relay,
    /// A local mail store over LMTP.
    Lmtp,
    /// A local mail store over SMTP.
    Smtp,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(rename = "type")]
    pub kind: RouteKind,
    /// Host name or IP (relay, lmtp, smtp).
    pub host: Option<String>,
    pub port: Option<u16>,
    /// Overrides delivery.tls for this route (a rule's `tls` overrides both).
    pub tls: Option<OutboundTls>,
    /// PEM certificate chain presented to this route's host when it asks for a
    /// client certificate (smart hosts that admit relays by certificate);
    /// with `tls_client_key`.
    pub tls_client_cert: Option<std::path::PathBuf>,
    /// PEM private key of `tls_client_cert`.
    pub tls_client_key: Option<std::path::PathBuf>,
    pub auth_user: Option<String>,
    pub auth_password: Option<String>,
    /// Route a recipient takes instead once it has been deferred
    /// `fallback_after` times on this one (one level: the fallback's own
    /// fallback is not followed).
    pub fallback: Option<String>,
    #[serde(default = "default_fallback_after")]
    pub fallback_after: u32,
}

fn default_fallback_after() -> u32 {
    3
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DestinationConfig {
    /// Concurrent connections to one destination site.
    pub max_connections: usize,
    /// Messages sent over one connection before it is closed.
    pub max_messages_per_connection: usize,
    /// New connections per period, e.g. ["10/s", "1000/h"]; empty = no limit.
    pub connection_rate: Vec<Rate>,
    /// Messages (transactions) per period over all connections to the site.
    pub message_rate: Vec<Rate>,
    /// MX rollup: domains whose MX host sets are equal share one site (owner
    /// core and the limits above). Default on (from `[destination.default]`);
    /// `rollup = false` in a domain's own section (or in the default one)
    /// keeps the domain apart. A domain with its own section is apart anyway,
    /// under its own limits.
    pub rollup: Option<bool>,
}

impl Default for DestinationConfig {
    fn default() -> Self {
        DestinationConfig {
            max_connections: 16,
            max_messages_per_connection: 100,
            connection_rate: Vec::new(),
            message_rate: Vec::new(),
            rollup: None,
        }
    }
}

/// `[source_ip."IP"]`: settings of one sending address ("default" = the
/// kernel-chosen one).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceIpConfig {
    /// Replaces `delivery.source_ip_rate` for this address (empty = no limit).
    pub message_rate: Option<Vec<Rate>>,
}

/// `[host."NAME"]`: limits of one destination host (an MX host name, a route's
/// host, or an IP). Unset keys take the `[delivery] host_*` values.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// Replaces `delivery.max_connections_per_host` (0 = no limit).
    pub max_connections: Option<usize>,
    /// Replaces `delivery.host_connection_rate` (empty = no limit).
    pub connection_rate: Option<Vec<Rate>>,
    /// Replaces `delivery.host_message_rate` (empty = no limit).
    pub message_rate: Option<Vec<Rate>>,
    /// Replaces `delivery.host_max_messages_per_connection` (0 = no host limit).
    pub max_messages_per_connection: Option<usize>,
}

/// The limits in force for one destination host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostLimits {
    /// Concurrent connections; 0 = no limit.
    pub max_connections: usize,
    pub connection_rate: Vec<Rate>,
    pub message_rate: Vec<Rate>,
    /// Messages per connection; 0 = no host limit.
    pub max_messages_per_connection: usize,
}

impl HostLimits {
    /// Whether connecting needs the host owner at all.
    pub fn gates_connections(&self) -> bool {
        self.max_connections > 0 || !self.connection_rate.is_empty()
    }
}

/// All delivery-related sections, as they sit in the top-level config.
#[derive(Debug, Clone, Default)]
pub struct DeliveryConfig {
    pub delivery: DeliverySection,
    pub queues: BTreeMap<String, QueueConfig>,
    pub routes: BTreeMap<String, RouteConfig>,
    pub destinations: BTreeMap<String, DestinationConfig>,
    pub source_ips: BTreeMap<String, SourceIpConfig>,
    /// `[host."NAME"]` overrides, keyed as in the file.
    pub hosts: BTreeMap<String, HostConfig>,
    /// `[provider.*]` over the presets, with their matcher.
    pub providers: super::provider::Providers,
    /// `[pool.*]` and `[warmup.*]` (docs/pools.md).
    pub pools: sluice_policy::pool::Pools,
    /// `[tenant.*]`: weights of the delivery fair share.
    pub tenants: BTreeMap<String, sluice_policy::tenant::TenantConfig>,
    /// Counts the reloads that stored this snapshot (0 at start), so state
    /// built from an older one (a site's limits) knows to refresh itself.
    pub generation: u64,
}

impl DeliveryConfig {
    /// Schedule of a queue: its own `[queue.NAME]`; for a queue no longer
    /// configured (removed by a reload while mail of it waits) the default
    /// queue's, so that mail is retried and expires as the default queue's.
    pub fn queue(&self, name: &str) -> QueueConfig {
        self.queues
            .get(name)
            .or_else(|| self.queues.get(sluice_policy::DEFAULT_QUEUE))
            .cloned()
            .unwrap_or_default()
    }

    /// The route a recipient takes after `deferrals` deferred attempts: the named
    /// route, or its fallback once `fallback_after` attempts were deferred.
    pub fn effective_route<'a>(&'a self, name: &'a str, deferrals: u32) -> &'a str {
        match self.routes.get(name) {
            Some(RouteConfig {
                fallback: Some(fallback),
                fallback_after,
                ..
            }) if deferrals >= *fallback_after => fallback,
            _ => name,
        }
    }

    /// Message rate of a source IP key (see [`source_ip_key`]): its
    /// `[source_ip."IP"] message_rate`, else `delivery.source_ip_rate`.
    pub fn source_ip_rate(&self, key: &str) -> &[Rate] {
        let ip = key.parse::<std::net::IpAddr>().ok();
        self.source_ips
            .get(key)
            .or_else(|| {
                // Keys written in another form ("::0:1" for "::1").
                let ip = ip?;
                self.source_ips
                    .iter()
                    .find(|(k, _)| k.parse::<std::net::IpAddr>().ok() == Some(ip))
                    .map(|(_, v)| v)
            })
            .and_then(|s| s.message_rate.as_deref())
            .unwrap_or(&self.delivery.source_ip_rate)
    }

    /// Limits of a destination host (`throttle::host_key` form): its
    /// `[host."NAME"]` entry (names compared without case or trailing dot, IPs
    /// by value), else the `[delivery] host_*` keys.
    pub fn host_limits(&self, host: &str) -> HostLimits {
        let over = self.host_override(host);
        let d = &self.delivery;
        let o = over.cloned().unwrap_or_default();
        HostLimits {
            max_connections: o.max_connections.unwrap_or(d.max_connections_per_host),
            connection_rate: o
                .connection_rate
                .unwrap_or_else(|| d.host_connection_rate.clone()),
            message_rate: o
                .message_rate
                .unwrap_or_else(|| d.host_message_rate.clone()),
            max_messages_per_connection: o
                .max_messages_per_connection
                .unwrap_or(d.host_max_messages_per_connection),
        }
    }

    /// The `[host."NAME"]` entry of a host (names compared without case or
    /// trailing dot, IPs by value).
    fn host_override(&self, host: &str) -> Option<&HostConfig> {
        let key = host_key(host);
        let ip = key.parse::<std::net::IpAddr>().ok();
        self.hosts.iter().find_map(|(k, v)| {
            let k = host_key(k);
            let same = k == key || (ip.is_some() && k.parse::<std::net::IpAddr>().ok() == ip);
            same.then_some(v)
        })
    }

    /// What a connection to `host` from source IP key `ip_key` counts
    /// against: the host's own `[host."NAME"]` entry when it has one (the
    /// operator named it), else its provider per source IP, else the host
    /// under the `[delivery] host_*` values.
    pub fn limit_key(&self, host: &str, ip_key: &str) -> LimitKey {
        let key = host_key(host);
        if self.host_override(&key).is_none() {
            if let Some(name) = self.providers.provider_of(&key) {
                return LimitKey::Provider {
                    name: name.to_string(),
                    source_ip: ip_key.to_string(),
                };
            }
        }
        LimitKey::Host(key)
    }

    /// The limits of a key made by [`DeliveryConfig::limit_key`] (in its
    /// [`LimitKey::as_key`] form, as the host owners get it).
    pub fn limits_for(&self, key: &str) -> HostLimits {
        match LimitKey::parse(key) {
            LimitKey::Provider { name, .. } => self
                .providers
                .limits(&name, &self.delivery)
                .unwrap_or_else(|| self.host_limits(key)),
            LimitKey::Host(host) => self.host_limits(&host),
        }
    }

    /// Whether a domain's site is rolled up with the other domains of its
    /// MX host set: its own `[destination."D"]` says (apart unless it says
    /// otherwise — only `false` is accepted there), else
    /// `[destination.default] rollup` (on by default).
    pub fn rollup(&self, domain: &str) -> bool {
        match self.destinations.get(domain) {
            Some(own) => own.rollup.unwrap_or(false),
            None => self
                .destinations
                .get("default")
                .and_then(|d| d.rollup)
                .unwrap_or(true),
        }
    }

    /// Settings for a site: `[destination."example.com"]` or `[destination.default]`.
    pub fn destination(&self, site: &str) -> DestinationConfig {
        self.destinations
            .get(site)
            .or_else(|| self.destinations.get("default"))
            .cloned()
            .unwrap_or_default()
    }
}

/// Key of a sending address: the IP as text, or "default" when the kernel picks.
pub fn source_ip_key(ip: Option<std::net::IpAddr>) -> String {
    ip.map_or_else(|| "default".to_string(), |ip| ip.to_string())
}

/// Key of a destination host (limits, slots): case-insensitive, no trailing dot.
pub fn host_key(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}
