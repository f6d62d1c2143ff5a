//! The configuration model (`sluice.toml`) and its loader.
//!
//! Every key has a default, so an empty file (or no file) is a working relay on
//! loopback. Unknown keys and bad values are errors naming the dotted key and, when
//! it came from the file, its line. `--set a.b.c=value` overrides are applied to the
//! parsed document before it is deserialized.

pub mod antispam;
pub mod cluster;
pub mod delivery;
pub mod events;
pub mod hook;
pub mod limits;
pub mod milter;
pub mod provider;
pub mod shaping;
pub mod suppression;
pub mod tls_rpt;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// Text of the example configuration shipped in the repository; its values are
/// the built-in defaults, and a test keeps the two in agreement.
pub const EXAMPLE_CONFIG: &str = include_str!("../../sluice.toml");
/// Longest a finished message's removal may wait for a commit to ride.
const MAX_REMOVAL_LINGER: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: key `{key}`{}: {message}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Invalid {
        origin: String,
        key: String,
        line: Option<usize>,
        message: String,
    },
    #[error("{origin}: TOML syntax error{}: {message}", line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    Syntax {
        origin: String,
        line: Option<usize>,
        message: String,
    },
    #[error("--set {arg}: {message}")]
    Override { arg: String, message: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub spool: SpoolSection,
    pub relay: RelaySection,
    pub auth: AuthSection,
    pub log: LogSection,
    pub admin: AdminSection,
    pub dns: DnsSection,
    pub delivery: delivery::DeliverySection,
    /// Virtual queues by name; "default" always exists.
    pub queue: BTreeMap<String, delivery::QueueConfig>,
    /// Routes by name ("mx" is built in).
    pub route: BTreeMap<String, delivery::RouteConfig>,
    /// Per-site limits; "default" applies to sites without their own entry.
    pub destination: BTreeMap<String, delivery::DestinationConfig>,
    /// Per sending address (an IP, or "default"): overrides of its limits.
    pub source_ip: BTreeMap<String, delivery::SourceIpConfig>,
    /// Per destination host (MX host name, route host or IP): overrides of the
    /// `[delivery] host_*` limits.
    pub host: BTreeMap<String, delivery::HostConfig>,
    /// Mailbox providers by name (docs/providers.md): merged over the shipped
    /// presets key by key.
    pub provider: BTreeMap<String, provider::ProviderConfig>,
    /// The providers in force, built by `finish` from the presets and
    /// `provider`.
    #[serde(skip)]
    pub providers: provider::Providers,
    /// Egress pools of source addresses a rule can choose (docs/pools.md).
    pub pool: BTreeMap<String, sluice_policy::pool::PoolConfig>,
    /// IP warm-up schedules pool members follow.
    pub warmup: BTreeMap<String, sluice_policy::pool::WarmupConfig>,
    /// Tenants: rate limits at acceptance and a share of delivery (docs/pools.md).
    pub tenant: BTreeMap<String, sluice_policy::tenant::TenantConfig>,
    /// Where a tenant comes from besides rules and AUTH: a header field.
    pub tenants: sluice_policy::tenant::TenantsConfig,
    /// `pool` and `warmup` checked, built by `finish`.
    #[serde(skip)]
    pub pools: sluice_policy::pool::Pools,
    /// Ordered match arms choosing queue and route per recipient.
    pub rule: Vec<sluice_policy::RuleConfig>,
    /// DKIM signers and the rules choosing them.
    pub dkim: sluice_policy::dkim::DkimConfig,
    /// SMTP TLS reporting (RFC 8460).
    pub tls_rpt: tls_rpt::TlsRptSection,
    /// Hard-bounced recipients refused or dropped for a while.
    pub suppression: suppression::SuppressionSection,
    /// Inbound rate and concurrency limits (`[[limit]]`).
    pub limit: Vec<limits::LimitConfig>,
    /// Auto-ban of addresses that fail AUTH, try to relay or scan.
    pub ban: limits::BanSection,
    /// Delivery events to a file and a webhook (docs/events.md).
    pub events: events::EventsSection,
    /// Response-driven shaping rules and slow start.
    pub shaping: shaping::ShapingSection,
    /// Local lists by name: a file each, one entry a line (Sieve extlists,
    /// stage rules). Read at load and reload.
    pub lists: BTreeMap<String, PathBuf>,
    /// DNSBL/DNSWL zones (`[[dnsbl.zone]]`), used by listeners with `dnsbl = true`.
    pub dnsbl: antispam::DnsblSection,
    /// Greylisting, used by listeners with `greylist = true`.
    pub greylist: antispam::GreylistSection,
    /// `dnsbl` and `greylist` as the policy uses them, built by `finish`.
    #[serde(skip)]
    pub antispam: AntispamPolicy,
    /// Address rewriting, header edits and disclaimers (docs/rewrite.md).
    pub rewrite: Vec<sluice_policy::rewrite::RewriteRuleConfig>,
    /// The Sender Rewriting Scheme for forwarded mail (docs/rewrite.md).
    pub srs: Option<sluice_policy::rewrite::SrsConfig>,
    /// Cluster mode on a PostgreSQL engine (docs/cluster.md).
    pub cluster: cluster::ClusterSection,
}

/// What `[dnsbl]`, `[greylist]` and `[lists]` give the RCPT checks.
#[derive(Debug, Clone, Default)]
pub struct AntispamPolicy {
    pub dnsbl: sluice_policy::dnsbl::DnsblPolicy,
    pub greylist: Option<sluice_policy::greylist::GreylistPolicy>,
    pub exemptions: sluice_policy::greylist::Exemptions,
    pub lists: std::sync::Arc<sluice_policy::lists::Lists>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub hostname: String,
    pub cores: usize,
    pub io_memory: ByteSize,
    pub ring_depth: usize,
    pub shutdown_grace: HumanDuration,
    /// Message-body bytes held in RAM by all sessions receiving (see budget.rs).
    pub max_body_memory: ByteSize,
    /// The same for one client address (IPv4, IPv6 /64) outside the relay
    /// networks and not authenticated.
    pub max_body_memory_per_client: ByteSize,
    pub listener: BTreeMap<String, ListenerConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hostname: "localhost".into(),
            cores: 0,
            io_memory: ByteSize(512 * 1024),
            ring_depth: 128,
            shutdown_grace: HumanDuration(Duration::from_secs(10)),
            max_body_memory: ByteSize(512 << 20),
            max_body_memory_per_client: ByteSize(128 << 20),
            listener: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Smtp,
    Lmtp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    Starttls,
    Implicit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareNewline {
    /// 550 5.6.0 at the end of data.
    Reject,
    /// Stored as received.
    Accept,
    /// Accepted; every bare CR or LF is stored as CRLF.
    Normalize,
}

/// When a listener adds the Date and Message-ID header fields a message lacks
/// (RFC 6409 §8.2–8.3; a relay must not, RFC 5321 §6.4, so "no" by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddMissingHeaders {
    No,
    /// For authenticated clients and the relay networks: submission.
    Trusted,
    /// For every client.
    Always,
}

/// NUL bytes in message data (DATA and BDAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NulBytes {
    /// 550 5.6.0 at the end of data.
    Reject,
    /// Accepted, stored without them.
    Strip,
}

/// What an envelope extension asked for by an untrusted client (outside the
/// relay networks, not authenticated) gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UntrustedExtension {
    /// Honoured as from anyone.
    Accept,
    /// Accepted but not honoured (250, as if not given).
    Ignore,
    /// MAIL refused with 550 5.7.1.
    Reject,
}

/// What success and delay notices for mail from untrusted clients may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UntrustedNotices {
    /// As asked (RET=FULL returns the whole message).
    Full,
    /// The header block only, whatever RET says.
    Headers,
    /// None at all; failure notices are not affected.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    pub bind: Vec<SocketAddr>,
    pub protocol: Protocol,
    pub tls: TlsMode,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub greeting: String,
    pub hostname: Option<String>,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub proxy_trusted_networks: Vec<String>,
    pub auth_plaintext: bool,
    pub max_message_size: ByteSize,
    pub max_recipients: usize,
    pub max_line_length: usize,
    pub max_errors: usize,
    pub idle_timeout: HumanDuration,
    pub session_timeout: HumanDuration,
    pub bare_newline: BareNewline,
    pub nul_bytes: NulBytes,
    pub max_message_line_length: usize,
    /// Date and Message-ID added where missing, for whom.
    pub add_missing_headers: AddMissingHeaders,
    /// An authenticated client's MAIL FROM must be one `[auth.sender_login]`
    /// gives its user (553 5.7.1 otherwise).
    pub enforce_sender_login: bool,
    /// MT-PRIORITY above 0 from untrusted clients (lowering is always allowed).
    pub untrusted_mt_priority: UntrustedExtension,
    /// HOLDFOR / HOLDUNTIL from untrusted clients.
    pub untrusted_hold: UntrustedExtension,
    pub untrusted_notices: UntrustedNotices,
    /// Honour a `TLS-Required: No` header field (RFC 8689 §3) in mail from
    /// this listener: its delivery ignores the destination's TLS policy
    /// (configured, DANE, MTA-STS) and runs opportunistic. Off by default.
    pub honor_tls_required_no: bool,
    /// Inbound authentication (iprev, SPF, DKIM, ARC, DMARC) and ARC
    /// sealing; absent: nothing is checked (ARCHITECTURE.md "Inbound
    /// authentication").
    pub verify: Option<sluice_policy::auth::VerifyConfig>,
    /// Milters consulted by this listener's sessions, in order
    /// (`[[server.listener.NAME.milter]]`; see config/milter.rs).
    pub milter: Vec<milter::MilterConfig>,
    /// HTTP hooks consulted by this listener's sessions, in order, after the
    /// milters (`[[server.listener.NAME.hook]]`; docs/hooks.md).
    pub hook: Vec<hook::HookConfig>,
    /// Sieve system scripts per SMTP stage (ARCHITECTURE.md "Programmable
    /// policy"); compiled when the config loads.
    pub sieve: Option<sluice_policy::sieve::SieveConfig>,
    /// Built-in rules at the SMTP stages, tried before Sieve.
    pub filter_rule: Vec<sluice_policy::stage_rules::StageRuleConfig>,
    /// Ask the `[[dnsbl.zone]]`s about clients (at RCPT).
    pub dnsbl: bool,
    /// Greylist (client network, sender, recipient) triplets (at RCPT).
    pub greylist: bool,
    /// The filters built from `filter_rule`, `sieve`, `milter` (and
    /// `[lists]`) when the config loads; None: the listener has none (the hot path).
    #[serde(skip)]
    pub filters: Option<std::sync::Arc<crate::filters::Filters>>,
    /// `[[rewrite]]` and `[srs]` for this listener, built when the config
    /// loads; None: nothing to rewrite here.
    #[serde(skip)]
    pub rewrite: Option<std::sync::Arc<sluice_policy::rewrite::Rewriter>>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            bind: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
            protocol: Protocol::Smtp,
            tls: TlsMode::None,
            tls_cert: None,
            tls_key: None,
            greeting: "ESMTP sluice".into(),
            hostname: None,
            max_connections: 4096,
            max_connections_per_ip: 128,
            proxy_trusted_networks: Vec::new(),
            auth_plaintext: false,
            max_message_size: ByteSize(50 * 1024 * 1024),
            max_recipients: 1000,
            max_line_length: 2048,
            max_errors: 10,
            idle_timeout: HumanDuration(Duration::from_secs(300)),
            session_timeout: HumanDuration(Duration::from_secs(1800)),
            bare_newline: BareNewline::Reject,
            nul_bytes: NulBytes::Reject,
            max_message_line_length: 998,
            add_missing_headers: AddMissingHeaders::No,
            enforce_sender_login: false,
            untrusted_mt_priority: UntrustedExtension::Ignore,
            untrusted_hold: UntrustedExtension::Reject,
            untrusted_notices: UntrustedNotices::Headers,
            honor_tls_required_no: false,
            verify: None,
            milter: Vec::new(),
            hook: Vec::new(),
            sieve: None,
            filter_rule: Vec::new(),
            dnsbl: false,
            greylist: false,
            filters: None,
            rewrite: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSection {
    pub path: PathBuf,
    pub map_size: ByteSize,
    pub max_batch: usize,
    pub sync: bool,
    /// How long a finished message's removal may wait to ride a commit that
    /// happens anyway; zero commits each removal at once.
    pub removal_linger: HumanDuration,
}

impl Default for SpoolSection {
    fn default() -> Self {
        SpoolSection {
            path: PathBuf::from("./data"),
            map_size: ByteSize(4 << 30),
            max_batch: 512,
            sync: true,
            removal_linger: HumanDuration(Duration::from_millis(10)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySection {
    pub local_domains: Vec<String>,
    pub relay_networks: Vec<String>,
}

impl Default for RelaySection {
    fn default() -> Self {
        RelaySection {
            local_domains: Vec::new(),
            relay_networks: vec!["127.0.0.0/8".into(), "::1/128".into()],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    pub users: BTreeMap<String, String>,
    /// Wait before a 535: this times the failures so far in the session.
    pub failure_delay: HumanDuration,
    /// The longest such wait.
    pub failure_delay_max: HumanDuration,
    /// Failed AUTH attempts per connection; the last one's 535 is followed by
    /// 421 4.7.0 and a close.
    pub max_failures: usize,
    /// Failed AUTH attempts per client IP, all connections and cores together;
    /// past it AUTH gets 421 4.7.0 until the budget refills. Empty = no limit.
    pub failure_rate_per_ip: Vec<sluice_policy::Rate>,
    /// User -> the envelope senders it may use (addresses, `@domain`, `*`),
    /// checked on listeners with `enforce_sender_login`.
    pub sender_login: BTreeMap<String, Vec<String>>,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            users: BTreeMap::new(),
            failure_delay: HumanDuration(Duration::from_secs(1)),
            failure_delay_max: HumanDuration(Duration::from_secs(5)),
            max_failures: 3,
            failure_rate_per_ip: vec![sluice_policy::Rate {
                count: 60,
                per_ms: 3_600_000,
            }],
            sender_login: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// The operations HTTP listener: `/metrics` and the management API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// "IP:PORT" to listen on; empty disables the listener.
    pub listen: String,
    /// File holding the bearer token for `/api/v1`; empty: the API answers 401.
    pub token_file: Option<PathBuf>,
    /// Whether `/metrics` also wants the token (scrapers usually don't send one).
    pub metrics_auth: bool,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: "127.0.0.1:9925".into(),
            token_file: None,
            metrics_auth: false,
        }
    }
}

/// Address families for delivery (`dns.ip_preference`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IpPreference {
    Ipv4Only,
    Ipv6Only,
    PreferIpv4,
    PreferIpv6,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsSection {
    pub servers: Vec<SocketAddr>,
    pub timeout: HumanDuration,
    pub attempts: u32,
    pub server_holddown: HumanDuration,
    pub min_ttl: HumanDuration,
    pub max_ttl: HumanDuration,
    pub negative_max_ttl: HumanDuration,
    pub cache_size: usize,
    pub ip_preference: IpPreference,
    /// The `servers` validate DNSSEC over a trusted path (loopback unbound):
    /// their AD bit is believed, which DANE needs. Off: no answer is secure.
    pub dnssec_validating: bool,
}

impl Default for DnsSection {
    fn default() -> Self {
        DnsSection {
            servers: Vec::new(),
            timeout: HumanDuration(Duration::from_secs(2)),
            attempts: 2,
            server_holddown: HumanDuration(Duration::from_secs(30)),
            min_ttl: HumanDuration(Duration::ZERO),
            max_ttl: HumanDuration(Duration::from_secs(86_400)),
            negative_max_ttl: HumanDuration(Duration::from_secs(3_600)),
            cache_size: 50_000,
            ip_preference: IpPreference::PreferIpv4,
            dnssec_validating: false,
        }
    }
}

impl DnsSection {
    /// Cross-key checks: (dotted key, message) of the first problem.
    fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(bad) = self.servers.iter().find(|s| s.port() == 0) {
            return Err(("dns.servers", format!("{bad}: port 0")));
        }
        if self.timeout.0.is_zero() {
            return Err(("dns.timeout", "must be above zero".into()));
        }
        if !(1..=10).contains(&self.attempts) {
            return Err(("dns.attempts", "must be 1 ..= 10".into()));
        }
        if self.min_ttl.0 > self.max_ttl.0 {
            return Err(("dns.min_ttl", "must not exceed dns.max_ttl".into()));
        }
        Ok(())
    }

    /// The resolver settings; with no `servers`, those of `resolv_conf`
    /// (normally /etc/resolv.conf).
    pub fn resolver_config(
        &self,
        resolv_conf: &std::path::Path,
    ) -> std::io::Result<sluice_dns::ResolverConfig> {
        let servers = if self.servers.is_empty() {
            sluice_dns::servers_from_resolv_conf(resolv_conf)?
        } else {
            self.servers.clone()
        };
        Ok(sluice_dns::ResolverConfig {
            servers,
            timeout: self.timeout.0,
            attempts: self.attempts,
            server_holddown: self.server_holddown.0,
            ttl: sluice_dns::TtlPolicy {
                min: self.min_ttl.0,
                max: self.max_ttl.0,
                negative_max: self.negative_max_ttl.0,
            },
            cache_size: self.cache_size,
            ip_preference: match self.ip_preference {
                IpPreference::Ipv4Only => sluice_dns::IpPreference::Ipv4Only,
                IpPreference::Ipv6Only => sluice_dns::IpPreference::Ipv6Only,
                IpPreference::PreferIpv4 => sluice_dns::IpPreference::PreferIpv4,
                IpPreference::PreferIpv6 => sluice_dns::IpPreference::PreferIpv6,
            },
            dnssec_validating: self.dnssec_validating,
        })
    }
}

/// A size in bytes: an integer, or a string with a unit ("512KiB", "50MiB", "4GiB", "10MB").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        sluice_policy::parse_size(text).map(ByteSize)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size: an integer number of bytes or a string like \"50MiB\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration written as "30s", "5m", "1h 30m".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(HumanDuration)
            .map_err(|e| {
                de::Error::custom(format!("`{text}` is not a duration like 30s or 5m: {e}"))
            })
    }
}

impl Config {
    /// Parse a configuration text, then apply `--set` overrides (each `dotted.key=value`).
    /// `origin` names the source in errors (a file path, or "built-in defaults").
    pub fn load(origin: &str, text: &str, overrides: &[String]) -> Result<Config, ConfigError> {
        // Deserialize the file alone first, so an error in it is reported with the
        // file's own line numbers before overrides shift anything. This also
        // keeps invalid TOML away from toml_edit, which panics on some of it
        // ("all items have spans"; found by the config_load fuzz target).
        let mut config = deserialize(origin, text)?;
        if !overrides.is_empty() {
            let mut doc: toml_edit::DocumentMut =
                text.parse()
                    .map_err(|e: toml_edit::TomlError| ConfigError::Syntax {
                        origin: origin.to_string(),
                        line: e.span().map(|s| line_of(text, s.start)),
                        message: e.message().trim().to_string(),
                    })?;
            for arg in overrides {
                apply_override(&mut doc, arg)?;
            }
            let merged = doc.to_string();
            config = deserialize(origin, &merged).map_err(|e| match e {
                ConfigError::Invalid { key, message, .. } => ConfigError::Override {
                    arg: overrides
                        .iter()
                        .find(|o| {
                            o.split('=')
                                .next()
                                .is_some_and(|k| key.starts_with(k.trim()))
                        })
                        .cloned()
                        .unwrap_or_else(|| key.clone()),
                    message: format!("key `{key}`: {message}"),
                },
                other => other,
            })?;
        }
        config.finish(origin, text)?;
        Ok(config)
    }

    /// Fill implied values and check what serde cannot: cross-key rules.
    fn finish(&mut self, origin: &str, text: &str) -> Result<(), ConfigError> {
        if self.server.listener.is_empty() {
            self.server
                .listener
                .insert("smtp".to_string(), ListenerConfig::default());
        }
        let invalid = |key: String, message: String| ConfigError::Invalid {
            line: find_key_line(text, &key),
            origin: origin.to_string(),
            key,
            message,
        };
        let lists = sluice_policy::lists::Lists::load(&self.lists).map_err(|e| {
            let name = e.name.clone();
            invalid(format!("lists.{name}"), e.to_string())
        })?;
        let lists = std::sync::Arc::new(lists);
        let dnsbl = self
            .dnsbl
            .policy()
            .map_err(|(k, why)| invalid(format!("dnsbl.{k}"), why))?;
        let greylist = self
            .greylist
            .policy()
            .map_err(|(k, why)| invalid(format!("greylist.{k}"), why))?;
        let exemptions = self
            .greylist
            .exemptions(&lists)
            .map_err(|(k, why)| invalid(format!("greylist.{k}"), why))?;
        for (name, l) in &self.server.listener {
            if l.dnsbl && dnsbl.zones.is_empty() {
                return Err(invalid(
                    format!("server.listener.{name}.dnsbl"),
                    "no [[dnsbl.zone]] is configured".into(),
                ));
            }
        }
        self.antispam = AntispamPolicy {
            dnsbl,
            greylist: Some(greylist),
            exemptions,
            lists: lists.clone(),
        };
        let srs = match &self.srs {
            Some(c) => {
                let srs =
                    sluice_policy::rewrite::build_srs(c).map_err(|(k, why)| invalid(k, why))?;
                if !self
                    .relay
                    .local_domains
                    .iter()
                    .any(|d| d.trim_end_matches('.').eq_ignore_ascii_case(srs.domain()))
                {
                    return Err(invalid(
                        "srs.domain".into(),
                        "must be one of relay.local_domains, so bounces to it are accepted".into(),
                    ));
                }
                Some(std::sync::Arc::new(srs))
            }
            None => None,
        };
        for (name, l) in self.server.listener.iter_mut() {
            l.rewrite = sluice_policy::rewrite::Rewriter::build(
                name,
                &self.rewrite,
                srs.clone(),
                lists.clone(),
            )
            .map_err(|(k, why)| invalid(k, why))?;
        }
        let hostname = self.server.hostname.clone();
        for (name, l) in self.server.listener.iter_mut() {
            let key = |k: &str| format!("server.listener.{name}.{k}");
            let own_name = l.hostname.clone().unwrap_or_else(|| hostname.clone());
            l.filters = crate::filters::Filters::build(crate::filters::FilterSources {
                sieve: l.sieve.as_ref(),
                rules: &l.filter_rule,
                milters: &l.milter,
                hooks: &l.hook,
                hostname: &own_name,
                lists: lists.clone(),
                max_message_size: usize::try_from(l.max_message_size.0).unwrap_or(usize::MAX),
            })
            .map_err(|(k, why)| invalid(key(&k), why))?;
        }
        for (name, l) in &self.server.listener {
            let key = |k: &str| format!("server.listener.{name}.{k}");
            if l.bind.is_empty() {
                return Err(invalid(
                    key("bind"),
                    "at least one address is needed".into(),
                ));
            }
            if l.tls != TlsMode::None && (l.tls_cert.is_none() || l.tls_key.is_none()) {
                return Err(invalid(
                    key("tls"),
                    "tls_cert and tls_key are required when tls is not \"none\"".into(),
                ));
            }
            if l.max_line_length < 512 {
                return Err(invalid(
                    key("max_line_length"),
                    "must be at least 512 (RFC 5321 §4.5.3.1.4)".into(),
                ));
            }
            if l.max_recipients == 0 || l.max_recipients > 100_000 {
                return Err(invalid(
                    key("max_recipients"),
                    "must be 1 ..= 100000".into(),
                ));
            }
            if l.max_connections == 0 {
                return Err(invalid(key("max_connections"), "must be at least 1".into()));
            }
            if let Some(v) = &l.verify {
                if let Err((k, why)) = v.check() {
                    return Err(invalid(key(&format!("verify.{k}")), why));
                }
                if let Some(signer) = &v.arc_seal {
                    if !self.dkim.signer.contains_key(signer) {
                        return Err(invalid(
                            key("verify.arc_seal"),
                            format!("no [dkim.signer.{signer}] to seal with"),
                        ));
                    }
                }
            }
            if l.max_errors == 0 {
                return Err(invalid(key("max_errors"), "must be at least 1".into()));
            }
            if l.idle_timeout.0.is_zero() || l.session_timeout.0.is_zero() {
                return Err(invalid(
                    key("idle_timeout"),
                    "timeouts must be above zero".into(),
                ));
            }
            if let Err(e) = sluice_policy::NetworkList::parse(&l.proxy_trusted_networks) {
                return Err(invalid(key("proxy_trusted_networks"), e.to_string()));
            }
            if l.milter.len() > milter::MAX_MILTERS {
                return Err(invalid(
                    key("milter"),
                    format!("at most {} milters per listener", milter::MAX_MILTERS),
                ));
            }
            for (i, m) in l.milter.iter().enumerate() {
                let failed = m.check().err().or_else(|| {
                    l.milter[..i]
                        .iter()
                        .any(|o| o.name == m.name)
                        .then(|| ("name", format!("`{}` is used twice", m.name)))
                });
                if let Some((k, why)) = failed {
                    return Err(ConfigError::Invalid {
                        origin: origin.to_string(),
                        key: format!("server.listener.{name}.milter[{i}].{k}"),
                        line: table_key_line(text, name, "milter", i, k),
                        message: why,
                    });
                }
            }
            if l.hook.len() > hook::MAX_HOOKS {
                return Err(invalid(
                    key("hook"),
                    format!("at most {} hooks per listener", hook::MAX_HOOKS),
                ));
            }
            for (i, h) in l.hook.iter().enumerate() {
                let failed = h.check().err().or_else(|| {
                    l.hook[..i]
                        .iter()
                        .any(|o| o.name == h.name)
                        .then(|| ("name", format!("`{}` is used twice", h.name)))
                });
                if let Some((k, why)) = failed {
                    return Err(ConfigError::Invalid {
                        origin: origin.to_string(),
                        key: format!("server.listener.{name}.hook[{i}].{k}"),
                        line: table_key_line(text, name, "hook", i, k),
                        message: why,
                    });
                }
            }
        }
        let body = (
            self.server.max_body_memory.0,
            self.server.max_body_memory_per_client.0,
        );
        if body.0 < crate::budget::GRANT {
            return Err(invalid(
                "server.max_body_memory".into(),
                "must be at least 64KiB".into(),
            ));
        }
        // A share above the process budget simply leaves the process limit.
        if body.1 < crate::budget::GRANT {
            return Err(invalid(
                "server.max_body_memory_per_client".into(),
                "must be at least 64KiB".into(),
            ));
        }
        for (name, l) in &self.server.listener {
            if l.max_message_size.0 > body.0 {
                return Err(invalid(
                    format!("server.listener.{name}.max_message_size"),
                    "is larger than server.max_body_memory: such a message could never be received"
                        .into(),
                ));
            }
        }
        if let Err(e) = sluice_policy::sender_login::SenderLogins::new(&self.auth.sender_login) {
            // A user name may hold dots (an address): fall back to the table's line.
            let key = format!("auth.sender_login.{}", e.user);
            let line =
                find_key_line(text, &key).or_else(|| find_key_line(text, "auth.sender_login"));
            return Err(ConfigError::Invalid {
                origin: origin.to_string(),
                key,
                line,
                message: e.message,
            });
        }
        if self.server.cores > crate::runtime::MAX_CORES {
            return Err(invalid(
                "server.cores".into(),
                format!(
                    "at most {} cores (spool shard id is 6 bits)",
                    crate::runtime::MAX_CORES
                ),
            ));
        }
        if self.spool.max_batch == 0 {
            return Err(invalid(
                "spool.max_batch".into(),
                "must be at least 1".into(),
            ));
        }
        if self.spool.removal_linger.0 > MAX_REMOVAL_LINGER {
            return Err(invalid(
                "spool.removal_linger".into(),
                format!(
                    "must be at most {} (finished messages stay on disk and in the queue counts that long)",
                    humantime::format_duration(MAX_REMOVAL_LINGER)
                ),
            ));
        }
        if self.spool.map_size.0 < (1 << 20) {
            return Err(invalid(
                "spool.map_size".into(),
                "must be at least 1MiB".into(),
            ));
        }
        if let Err(e) = self.relay_policy() {
            let key = if e.to_string().contains("network") || e.to_string().contains("CIDR") {
                "relay.relay_networks"
            } else {
                "relay.local_domains"
            };
            return Err(invalid(key.into(), e.to_string()));
        }
        if let Err(e) = sluice_policy::Credentials::new(self.auth.users.clone()) {
            return Err(invalid("auth.users".into(), e.to_string()));
        }
        // tracing-subscriber's filter parser panics on some non-ASCII text, and
        // span/field filters ("[span{field=value}]") compile values into DFAs that
        // can take minutes to build (both found by the config_load fuzz target).
        // Targets and levels are all a relay's operator needs.
        let level = &self.log.level;
        if !level.is_ascii() || level.contains(['[', '{']) || level.len() > MAX_LOG_LEVEL {
            return Err(invalid(
                "log.level".into(),
                format!(
                    "targets and levels only, like \"info,sluice=debug\" (ASCII, no [span] or {{field}} filters, at most {MAX_LOG_LEVEL} characters)"
                ),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid("log.level".into(), e.to_string()));
        }
        if let Err((key, message)) = self.dns.check() {
            return Err(invalid(key.into(), message));
        }
        if let Err((key, message)) = self.tls_rpt.check() {
            return Err(invalid(key.into(), message));
        }
        if let Err((key, message)) = self.events.check() {
            return Err(invalid(key.into(), message));
        }
        if let Err((key, message)) = self.cluster.check() {
            return Err(invalid(key.into(), message));
        }
        if self.delivery.mta_sts_refresh_interval.0.is_zero() {
            return Err(invalid(
                "delivery.mta_sts_refresh_interval".into(),
                "must be more than 0 (how often cached policies are checked for a refresh)".into(),
            ));
        }
        // Mandatory DANE rests on the resolver's AD bit.
        if self.delivery.tls == delivery::OutboundTls::Dane && !self.dns.dnssec_validating {
            return Err(invalid(
                "delivery.tls".into(),
                "\"dane\" needs dns.dnssec_validating = true (a validating resolver)".into(),
            ));
        }
        for (name, route) in &self.route {
            use delivery::RouteKind;
            // Mandatory DANE on an MX route (TLSA per MX host) or a route
            // to a host (TLSA at `_PORT._tcp.HOST`).
            if route.tls == Some(delivery::OutboundTls::Dane) {
                if !self.dns.dnssec_validating {
                    return Err(invalid(
                        format!("route.{name}.tls"),
                        "\"dane\" needs dns.dnssec_validating = true (a validating resolver)"
                            .into(),
                    ));
                }
                if route
                    .host
                    .as_deref()
                    .is_some_and(|h| h.parse::<std::net::IpAddr>().is_ok())
                {
                    return Err(invalid(
                        format!("route.{name}.tls"),
                        "\"dane\" needs a host name in route.NAME.host (TLSA records are looked up at _PORT._tcp.HOST), not an IP address"
                            .into(),
                    ));
                }
            }
            if route.kind != RouteKind::Mx && route.host.is_none() {
                return Err(invalid(
                    format!("route.{name}.host"),
                    "required for relay, lmtp and smtp routes".into(),
                ));
            }
            if route.tls_client_cert.is_some() != route.tls_client_key.is_some() {
                return Err(invalid(
                    format!("route.{name}.tls_client_cert"),
                    "tls_client_cert and tls_client_key go together".into(),
                ));
            }
            if route.tls_client_cert.is_some()
                && route.tls.unwrap_or(self.delivery.tls) == delivery::OutboundTls::None
            {
                return Err(invalid(
                    format!("route.{name}.tls_client_cert"),
                    "a client certificate needs TLS, and this route's tls is \"none\"".into(),
                ));
            }
            if route.auth_user.is_some() != route.auth_password.is_some() {
                return Err(invalid(
                    format!("route.{name}.auth_user"),
                    "auth_user and auth_password go together".into(),
                ));
            }
            if let Some(fallback) = &route.fallback {
                let known =
                    fallback == sluice_policy::DEFAULT_ROUTE || self.route.contains_key(fallback);
                if !known || fallback == name {
                    return Err(invalid(
                        format!("route.{name}.fallback"),
                        format!("`{fallback}` must name another route (or \"mx\")"),
                    ));
                }
                if route.fallback_after == 0 {
                    return Err(invalid(
                        format!("route.{name}.fallback_after"),
                        "must be at least 1".into(),
                    ));
                }
            }
        }
        for (name, queue) in &self.queue {
            if queue.retry.is_empty() || queue.retry.iter().any(|d| d.0.is_zero()) {
                return Err(invalid(
                    format!("queue.{name}.retry"),
                    "needs at least one non-zero delay".into(),
                ));
            }
        }
        self.providers = provider::Providers::build(&self.provider, self.delivery.provider_presets)
            .map_err(|e| ConfigError::Invalid {
                // An absent key is blamed on its table's line.
                line: find_key_line(text, &e.key).or_else(|| {
                    let table = e.key.rsplit_once('.').map_or("", |(t, _)| t);
                    find_key_line(text, table)
                }),
                origin: origin.to_string(),
                key: e.key,
                message: e.message,
            })?;
        for (name, dest) in &self.destination {
            if name != "default" && dest.rollup == Some(true) {
                return Err(ConfigError::Invalid {
                    origin: origin.to_string(),
                    key: format!("destination.\"{name}\".rollup"),
                    line: find_path_line(text, &["destination", name, "rollup"]),
                    message: "only `rollup = false` belongs in a domain's own section (a rolled-up site takes [destination.default]'s limits)".into(),
                });
            }
        }
        for name in self.source_ip.keys() {
            if name != "default" && name.parse::<std::net::IpAddr>().is_err() {
                return Err(invalid(
                    format!("source_ip.{name}"),
                    "must be an IP address or \"default\"".into(),
                ));
            }
        }
        if let Err(e) = self.rule_set() {
            return Err(invalid("rule".into(), e.to_string()));
        }
        self.pools = sluice_policy::pool::Pools::new(&self.pool, &self.warmup)
            .map_err(|e| invalid(e.key.clone(), e.reason.clone()))?;
        sluice_policy::tenant::check(&self.tenant).map_err(|(key, reason)| invalid(key, reason))?;
        sluice_policy::tenant::check_source(&self.tenants, &self.tenant)
            .map_err(|(key, reason)| invalid(key, reason))?;
        for (i, rule) in self.rule.iter().enumerate() {
            if let Some(tenant) = &rule.tenant {
                if !self.tenant.contains_key(tenant) {
                    return Err(invalid(
                        "rule".into(),
                        format!("rule {}: tenant: no [tenant.{tenant}] section", i + 1),
                    ));
                }
            }
            if let Some(pool) = &rule.pool {
                if !self.pools.pools.contains_key(pool) {
                    return Err(invalid(
                        "rule".into(),
                        format!("rule {}: pool: no [pool.{pool}] section", i + 1),
                    ));
                }
            }
        }
        if let Err(e) = self.shaping.rules() {
            let line = text
                .lines()
                .enumerate()
                .filter(|(_, l)| {
                    let l: String = l.chars().filter(|c| !c.is_whitespace()).collect();
                    l.starts_with("[[shaping.rule]]")
                })
                .nth(e.rule.saturating_sub(1))
                .map(|(i, _)| i + 1);
            return Err(ConfigError::Invalid {
                origin: origin.to_string(),
                key: format!("shaping.rule[{}].{}", e.rule, e.key),
                line,
                message: e.reason,
            });
        }
        let listener_names: Vec<&str> = self.server.listener.keys().map(String::as_str).collect();
        if let Err(e) = limits::limit_rules(&self.limit, &listener_names) {
            let line = text
                .lines()
                .enumerate()
                .filter(|(_, l)| {
                    let l: String = l.chars().filter(|c| !c.is_whitespace()).collect();
                    l.starts_with("[[limit]]")
                })
                .nth(e.rule.saturating_sub(1))
                .map(|(i, _)| i + 1);
            return Err(ConfigError::Invalid {
                origin: origin.to_string(),
                key: format!("limit[{}].{}", e.rule, e.key),
                line,
                message: e.reason,
            });
        }
        if let Err((key, why)) = self.ban.policy(&self.relay.relay_networks) {
            return Err(invalid(format!("ban.{key}"), why));
        }
        if self.shaping.slow_start_initial == 0 {
            return Err(invalid(
                "shaping.slow_start_initial".into(),
                "must be at least 1".into(),
            ));
        }
        // Key files are read when the relay starts or reloads, not here.
        if let Err(e) = self.dkim_plan() {
            return Err(dkim_error(origin, text, e));
        }
        Ok(())
    }

    /// The `[dkim]` section checked, keys not read.
    pub fn dkim_plan(&self) -> Result<sluice_policy::dkim::DkimPlan, sluice_policy::PolicyError> {
        let queues: Vec<&str> = self.queue.keys().map(String::as_str).collect();
        sluice_policy::dkim::DkimPlan::new(&self.dkim, &queues)
    }

    /// The `[dkim]` section with every signer's key loaded; errors name the
    /// key (`dkim.signer.NAME.key`) and the file.
    pub fn dkim_policy(
        &self,
    ) -> Result<sluice_policy::dkim::DkimPolicy, sluice_policy::PolicyError> {
        self.dkim_plan()?.load()
    }

    /// `[tenant.*]` and `[tenants]` as the end of data uses them.
    pub fn tenant_policy(&self) -> crate::queue::admission::TenantPolicy {
        crate::queue::admission::TenantPolicy {
            tenants: self.tenant.clone(),
            source: self.tenants.clone(),
        }
    }

    /// The delivery-related sections, for the delivery engine.
    pub fn delivery_config(&self) -> delivery::DeliveryConfig {
        delivery::DeliveryConfig {
            delivery: self.delivery.clone(),
            queues: self.queue.clone(),
            routes: self.route.clone(),
            destinations: self.destination.clone(),
            source_ips: self.source_ip.clone(),
            hosts: self.host.clone(),
            providers: self.providers.clone(),
            pools: self.pools.clone(),
            tenants: self.tenant.clone(),
            generation: 0,
        }
    }

    /// The rule set, validated against the configured queue and route names.
    pub fn rule_set(&self) -> Result<sluice_policy::RuleSet, sluice_policy::PolicyError> {
        let queues: Vec<&str> = self.queue.keys().map(String::as_str).collect();
        let routes: Vec<&str> = self.route.keys().map(String::as_str).collect();
        sluice_policy::RuleSet::new(&self.rule, &queues, &routes)
    }

    pub fn relay_policy(&self) -> Result<sluice_policy::RelayPolicy, sluice_policy::PolicyError> {
        let networks = sluice_policy::NetworkList::parse(&self.relay.relay_networks)?;
        sluice_policy::RelayPolicy::new(&self.relay.local_domains, networks)
    }
}

/// A `[dkim]` error with its dotted key and line: `dkim.signer.NAME.KEY`
/// (the signer's table line when the key is absent) or the N-th
/// `[[dkim.rule]]` table.
fn dkim_error(origin: &str, text: &str, e: sluice_policy::PolicyError) -> ConfigError {
    use sluice_policy::PolicyError;
    let (key, line, message) = match &e {
        PolicyError::InvalidDkimSigner {
            signer,
            key,
            reason,
        } => {
            let dotted = format!("dkim.signer.{signer}.{key}");
            let line = find_key_line(text, &dotted)
                .or_else(|| find_key_line(text, &format!("dkim.signer.{signer}")));
            (dotted, line, reason.clone())
        }
        PolicyError::InvalidDkimRule { rule, key, reason } => {
            let line = text
                .lines()
                .enumerate()
                .filter(|(_, l)| {
                    let l: String = l.chars().filter(|c| !c.is_whitespace()).collect();
                    l.starts_with("[[dkim.rule]]")
                })
                .nth(rule.saturating_sub(1))
                .map(|(i, _)| i + 1);
            (format!("dkim.rule[{rule}].{key}"), line, reason.clone())
        }
        other => ("dkim".to_string(), None, other.to_string()),
    };
    ConfigError::Invalid {
        origin: origin.to_string(),
        key,
        line,
        message,
    }
}

/// Longest `log.level` filter accepted.
const MAX_LOG_LEVEL: usize = 1024;

fn deserialize(origin: &str, text: &str) -> Result<Config, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Syntax {
        origin: origin.to_string(),
        line: e.span().map(|s| line_of(text, s.start)),
        message: e.message().trim().to_string(),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let line = inner
            .span()
            .map(|s| line_of(text, s.start))
            .or_else(|| find_key_line(text, &key));
        ConfigError::Invalid {
            origin: origin.to_string(),
            key,
            line,
            message: inner.message().trim().to_string(),
        }
    })
}

/// Set `dotted.key=value` in the document. The value is parsed as TOML; if it is not
/// valid TOML it is taken as a plain string, so `--set spool.path=/var/spool` works.
fn apply_override(doc: &mut toml_edit::DocumentMut, arg: &str) -> Result<(), ConfigError> {
    let err = |message: String| ConfigError::Override {
        arg: arg.to_string(),
        message,
    };
    let (path, raw) = arg
        .split_once('=')
        .ok_or_else(|| err("expected dotted.key=value".into()))?;
    let keys: Vec<&str> = path.trim().split('.').map(str::trim).collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(err("empty key segment".into()));
    }
    let assignment = format!("v = {raw}");
    // Only TOML the toml crate accepts reaches toml_edit (see `Config::load`).
    let parsed = match toml::Deserializer::parse(&assignment) {
        Ok(_) => assignment.parse::<toml_edit::DocumentMut>().ok(),
        Err(_) => None,
    };
    let value: toml_edit::Value = match parsed
        .as_ref()
        .and_then(|p| p.get("v"))
        .and_then(|i| i.as_value())
    {
        Some(v) => v.clone(),
        None => toml_edit::Value::from(raw),
    };
    let (last, parents) = keys.split_last().ok_or_else(|| err("empty key".into()))?;
    let mut table: &mut dyn toml_edit::TableLike = doc.as_table_mut();
    for key in parents {
        let entry = table
            .entry(key)
            .or_insert(toml_edit::Item::Table(toml_edit::Table::new()));
        table = entry
            .as_table_like_mut()
            .ok_or_else(|| err(format!("`{key}` is not a table")))?;
    }
    table.insert(last, toml_edit::Item::Value(value));
    Ok(())
}

/// Line of `key` in the `index`-th `[[server.listener.NAME.TABLE]]` table
/// (the table's header line when the key is not written).
fn table_key_line(
    text: &str,
    listener: &str,
    table: &str,
    index: usize,
    key: &str,
) -> Option<usize> {
    let doc: toml_edit::Document<&str> = toml_edit::Document::parse(text).ok()?;
    let tables = doc
        .get("server")?
        .get("listener")?
        .get(listener)?
        .get(table)?
        .as_array_of_tables()?;
    let table = tables.get(index)?;
    let span = table
        .get_key_value(key)
        .and_then(|(k, _)| k.span())
        .or_else(|| table.span())?;
    Some(line_of(text, span.start))
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Line of a dotted key in the file, for errors found after deserialization.
fn find_key_line(text: &str, dotted: &str) -> Option<usize> {
    let parts: Vec<&str> = dotted.split('.').collect();
    find_path_line(text, &parts)
}

/// Line of a key given as its path (names that contain dots, such as
/// domains, stay one part).
fn find_path_line(text: &str, path: &[&str]) -> Option<usize> {
    let doc: toml_edit::Document<&str> = toml_edit::Document::parse(text).ok()?;
    let mut item: &toml_edit::Item = doc.as_item();
    let mut span = None;
    for key in path {
        let table = item.as_table_like()?;
        let (k, v) = table.get_key_value(key)?;
        span = k.span().or(v.span()).or(span);
        item = v;
    }
    span.map(|s| line_of(text, s.start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_is_valid_and_equals_defaults() {
        let from_file = Config::load("sluice.toml", EXAMPLE_CONFIG, &[]).expect("example loads");
        let defaults = Config::load("defaults", "", &[]).expect("defaults load");
        assert_eq!(format!("{from_file:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn removal_linger_is_bounded_and_zero_turns_it_off() {
        match Config::load("t.toml", "[spool]\nremoval_linger = \"11s\"\n", &[]) {
            Err(ConfigError::Invalid { key, line, .. }) => {
                assert_eq!(key, "spool.removal_linger");
                assert_eq!(line, Some(2));
            }
            other => panic!("11s accepted: {other:?}"),
        }
        let off = Config::load("t.toml", "[spool]\nremoval_linger = \"0s\"\n", &[]).expect("0s");
        assert!(off.spool.removal_linger.0.is_zero());
        let default = Config::load("t.toml", "", &[]).expect("defaults");
        assert_eq!(default.spool.removal_linger.0, Duration::from_millis(10));
    }

    #[test]
    fn dnsbl_and_greylist_errors_name_the_key() {
        let bad = |text: &str, want: &str| match Config::load("t.toml", text, &[]) {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, want, "{text}"),
            other => panic!("{text}: {other:?}"),
        };
        bad(
            "[server.listener.smtp]\ndnsbl = true\n",
            "server.listener.smtp.dnsbl",
        );
        bad(
            "[[dnsbl.zone]]\nname = \"bl.example\"\naction = \"drop\"\n",
            "dnsbl.zone[0].action",
        );
        bad(
            "[[dnsbl.zone]]\nname = \"bl.example\"\nresults = { \"x\" = \"reject\" }\n",
            "dnsbl.zone[0].results",
        );
        bad("[[dnsbl.zone]]\nname = \"a..b\"\n", "dnsbl.zone[0].name");
        bad(
            "[greylist]\ndelay = \"1h\"\nexpire = \"30m\"\n",
            "greylist.expire",
        );
        bad(
            "[greylist]\nskip_senders_list = \"nope\"\n",
            "greylist.skip_senders_list",
        );
        let ok = Config::load(
            "t.toml",
            "[server.listener.smtp]\ndnsbl = true\ngreylist = true\n\
             [[dnsbl.zone]]\nname = \"Zen.Example.\"\nsubject = \"sender\"\n\
             results = { \"127.0.0.3\" = \"score:2\" }\n",
            &[],
        )
        .expect("valid");
        let zone = &ok.antispam.dnsbl.zones[0];
        assert_eq!(zone.name, "zen.example");
        assert_eq!(zone.subject, sluice_policy::dnsbl::Subject::Sender);
        assert_eq!(
            zone.results,
            [(
                std::net::Ipv4Addr::new(127, 0, 0, 3),
                sluice_policy::dnsbl::ListAction::Score(2)
            )]
        );
        assert!(ok.antispam.greylist.is_some());
    }

    #[test]
    fn bad_shaping_rule_names_key_and_line() {
        let text = "[[shaping.rule]]\nname = \"a\"\ncode = [421]\nthreshold = \"3/5m\"\n\
                    action = \"suspend\"\nduration = \"1h\"\n\n\
                    [[shaping.rule]]\nname = \"b\"\ncode = [421]\nthreshold = \"3/5m\"\n\
                    action = \"explode\"\nduration = \"1h\"\n";
        match Config::load("t.toml", text, &[]) {
            Err(ConfigError::Invalid {
                key, line, message, ..
            }) => {
                assert_eq!(key, "shaping.rule[2].action");
                assert_eq!(line, Some(8));
                assert!(message.contains("explode"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let ok = Config::load("t.toml", &text.replace("explode", "backoff"), &[]).expect("valid");
        assert_eq!(ok.shaping.rules().expect("rules").rules().len(), 2);
    }

    #[test]
    fn bad_sender_login_pattern_names_user_and_line() {
        let text = "[auth.sender_login]\nalice = [\"alice@example.com\"]\n\"bob@example.com\" = [\"example.org\"]\n";
        match Config::load("t.toml", text, &[]) {
            Err(ConfigError::Invalid {
                key, line, message, ..
            }) => {
                assert_eq!(key, "auth.sender_login.bob@example.com");
                assert!(line.is_some_and(|l| l <= 3), "{line:?}");
                assert!(message.contains("example.org"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let ok = Config::load(
            "t.toml",
            &text.replace("\"example.org\"", "\"@example.org\""),
            &[],
        )
        .expect("valid");
        assert_eq!(ok.auth.sender_login.len(), 2);
        let bad = Config::load(
            "t.toml",
            "[server.listener.s]\nbare_newline = \"fix\"\n",
            &[],
        );
        assert!(
            matches!(bad, Err(ConfigError::Invalid { line: Some(2), .. })),
            "{bad:?}"
        );
    }

    /// Found by the config_load fuzz target: toml_edit panicked on this text.
    #[test]
    fn invalid_toml_is_an_error_not_a_panic() {
        let text = "[rou53\"]\ntimeo=+ \"0010.10.1:53\"]\ntimeout==+ \".0.10.1:53\"]\ntimeout.=+\u{fffd}\"0010.1:53T";
        for overrides in [vec![], vec!["server.cores=2".to_string()]] {
            match Config::load("t", text, &overrides) {
                Err(ConfigError::Syntax { line: Some(2), .. }) => {}
                other => panic!("{other:?}"),
            }
        }
    }

    /// Found by the config_load fuzz target: tracing-subscriber panicked on the
    /// first and spent minutes compiling the field filter of the second.
    #[test]
    fn log_level_is_targets_and_levels_only() {
        let slow = format!("0[s{{f=R.+{}}}]", ".".repeat(100));
        for bad in ["x[\u{fffd}\u{fffd}]", "info,[span]=debug", slow.as_str()] {
            let text = format!("[log]\nlevel = {}\n", toml_edit::Value::from(bad));
            match Config::load("t", &text, &[]) {
                Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "log.level"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let ok = Config::load("t", "[log]\nlevel = \"warn,sluice::smtp=debug\"\n", &[]);
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = "[server]\nhostname = \"a\"\nbogus = 1\n";
        let err = Config::load("t.toml", text, &[]).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_value_names_key_and_line() {
        let text = "[spool]\npath = \"x\"\nmap_size = \"lots\"\n";
        let err = Config::load("t.toml", text, &[]).unwrap_err().to_string();
        assert!(err.contains("spool.map_size"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn listener_value_error_has_path() {
        let text = "[server.listener.a]\nbind = [\"127.0.0.1:25\"]\ntls = \"sometimes\"\n";
        let err = Config::load("t.toml", text, &[]).unwrap_err().to_string();
        assert!(err.contains("server.listener.a.tls"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn body_memory_and_untrusted_keys_are_checked_with_key_and_line() {
        let cases = [
            (
                "[server]\nmax_body_memory = \"1KiB\"\n",
                "server.max_body_memory",
                2,
            ),
            (
                "[server]\nmax_body_memory = \"64MiB\"\nmax_body_memory_per_client = 4096\n",
                "server.max_body_memory_per_client",
                3,
            ),
            (
                "[server]\nmax_body_memory = \"10MiB\"\n[server.listener.a]\nbind = [\"127.0.0.1:25\"]\nmax_message_size = \"20MiB\"\n",
                "server.listener.a.max_message_size",
                5,
            ),
            (
                "[server.listener.a]\nbind = [\"127.0.0.1:25\"]\nuntrusted_hold = \"maybe\"\n",
                "server.listener.a.untrusted_hold",
                3,
            ),
            (
                "[server.listener.a]\nbind = [\"127.0.0.1:25\"]\nuntrusted_notices = \"some\"\n",
                "server.listener.a.untrusted_notices",
                3,
            ),
        ];
        for (text, key, line) in cases {
            let err = Config::load("t.toml", text, &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
            assert!(err.contains(&format!("line {line}")), "{text}: {err}");
        }
        let ok = "[server.listener.a]\nbind = [\"127.0.0.1:25\"]\nuntrusted_mt_priority = \"reject\"\nuntrusted_hold = \"accept\"\nuntrusted_notices = \"none\"\n";
        let cfg = Config::load("t.toml", ok, &[]).expect("loads");
        let l = &cfg.server.listener["a"];
        assert_eq!(l.untrusted_mt_priority, UntrustedExtension::Reject);
        assert_eq!(l.untrusted_hold, UntrustedExtension::Accept);
        assert_eq!(l.untrusted_notices, UntrustedNotices::None);
    }

    #[test]
    fn cross_key_error_has_line() {
        let text = "[server.listener.a]\nbind = [\"127.0.0.1:25\"]\ntls = \"starttls\"\n";
        let err = Config::load("t.toml", text, &[]).unwrap_err().to_string();
        assert!(err.contains("server.listener.a.tls"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn mandatory_dane_needs_a_validating_resolver_and_a_host_name() {
        let err = |text: &str| Config::load("t.toml", text, &[]).unwrap_err().to_string();
        let e = err("[delivery]\ntls = \"dane\"\n");
        assert!(
            e.contains("delivery.tls") && e.contains("dnssec_validating"),
            "{e}"
        );
        let e = err("[dns]\ndnssec_validating = true\n[route.smart]\ntype = \"relay\"\nhost = \"192.0.2.1\"\ntls = \"dane\"\n");
        assert!(
            e.contains("route.smart.tls") && e.contains("host name"),
            "{e}"
        );
        let e = err("[route.smart]\ntype = \"relay\"\nhost = \"s.example\"\ntls = \"dane\"\n");
        assert!(
            e.contains("route.smart.tls") && e.contains("dnssec_validating"),
            "{e}"
        );
        Config::load(
            "t.toml",
            "[dns]\ndnssec_validating = true\n[route.smart]\ntype = \"relay\"\nhost = \"s.example\"\nport = 587\ntls = \"dane\"\n",
            &[],
        )
        .expect("dane for a smart host");
        let e = err("[route.out]\ntype = \"mx\"\ntls = \"dane\"\n");
        assert!(
            e.contains("route.out.tls") && e.contains("dnssec_validating"),
            "{e}"
        );
        Config::load(
            "t.toml",
            "[dns]\ndnssec_validating = true\n[delivery]\ntls = \"dane\"\n[route.out]\ntype = \"mx\"\ntls = \"dane\"\n",
            &[],
        )
        .expect("dane with a validating resolver");
    }

    #[test]
    fn overrides_apply_by_dotted_path() {
        let cfg = Config::load(
            "t",
            "",
            &[
                "server.listener.smtp.bind=[\"127.0.0.1:2600\"]".into(),
                "spool.path=/tmp/x y".into(),
                "server.cores=1".into(),
            ],
        )
        .expect("loads");
        assert_eq!(cfg.server.cores, 1);
        assert_eq!(cfg.spool.path, PathBuf::from("/tmp/x y"));
        assert_eq!(
            cfg.server.listener["smtp"].bind,
            vec!["127.0.0.1:2600".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn bad_override_is_reported() {
        let err = Config::load("t", "", &["server.cores=many".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.cores"), "{err}");
        assert!(Config::load("t", "", &["nokey".into()]).is_err());
    }

    #[test]
    fn dns_section_keys() {
        let cfg = Config::load(
            "t",
            "[dns]\nservers = [\"127.0.0.1:5353\"]\nip_preference = \"ipv6-only\"\n",
            &["dns.min_ttl=\"10s\"".into()],
        )
        .expect("loads");
        let r = cfg
            .dns
            .resolver_config(std::path::Path::new("/nonexistent"))
            .expect("servers given, resolv.conf not read");
        assert_eq!(
            r.servers,
            vec!["127.0.0.1:5353".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(r.ip_preference, sluice_dns::IpPreference::Ipv6Only);
        assert_eq!(r.ttl.min, Duration::from_secs(10));

        // No servers: the resolv.conf given (the relay passes /etc/resolv.conf).
        let dir = tempfile::tempdir().expect("tempdir");
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&resolv, "nameserver 192.0.2.53\n").expect("write");
        let r = Config::default()
            .dns
            .resolver_config(&resolv)
            .expect("resolv.conf read");
        assert_eq!(
            r.servers,
            vec!["192.0.2.53:53".parse::<SocketAddr>().unwrap()]
        );
        assert!(Config::default()
            .dns
            .resolver_config(std::path::Path::new("/nonexistent"))
            .is_err());

        let err = Config::load("t", "[dns]\nservers = [\"127.0.0.1\"]\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dns.servers") && err.contains("line 2"),
            "{err}"
        );
        let err = Config::load("t", "[dns]\nattempts = 0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dns.attempts") && err.contains("line 2"),
            "{err}"
        );
    }

    #[test]
    fn dkim_errors_name_key_and_line() {
        let signer = "[dkim.signer.a]\ndomain = \"example.org\"\nselector = \"s\"\nkey = \"/nonexistent.pem\"\n";
        let cases = [
            (
                format!("{signer}canonicalization = \"loose\"\n"),
                "dkim.signer.a.canonicalization",
                5,
            ),
            (
                "[dkim.signer.a]\ndomain = \"example.org\"\nkey = \"/k\"\n".to_string(),
                "dkim.signer.a",
                1,
            ),
            (
                format!("{signer}[[dkim.rule]]\nsign = []\n\n[[dkim.rule]]\nsign = [\"b\"]\n"),
                "dkim.rule[2].sign",
                8,
            ),
            (
                format!("{signer}[[dkim.rule]]\nmatch.queue = \"bulk\"\nsign = \"a\"\n"),
                "dkim.rule[1].match.queue",
                5,
            ),
        ];
        for (text, key, line) in cases {
            let err = Config::load("t.toml", &text, &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
            assert!(err.contains(&format!("line {line}")), "{text}: {err}");
        }
        // The plan is checked at load; the key file only when the relay
        // starts, reloads or check-config runs.
        let cfg = Config::load(
            "t.toml",
            &format!("{signer}[[dkim.rule]]\nsign = \"a\"\n"),
            &[],
        )
        .expect("loads");
        let err = cfg.dkim_policy().unwrap_err().to_string();
        assert!(
            err.contains("dkim.signer.a.key") && err.contains("/nonexistent.pem"),
            "{err}"
        );
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(ByteSize::parse("512KiB"), Ok(ByteSize(512 * 1024)));
        assert_eq!(ByteSize::parse("10MB"), Ok(ByteSize(10_000_000)));
        assert!(ByteSize::parse("12 parsecs").is_err());
    }
}
