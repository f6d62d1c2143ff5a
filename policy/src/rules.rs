//! Per-recipient decisions (virtual queue, route, connection strategy) as ordered
//! match arms, read like OpenSMTPD's `match from … for domain … action …`:
//!
//! ```toml
//! [[rule]]
//! match.recipient_domain = ["gmail.com", "*.google.com"]
//! match.listener = "submission"
//! queue = "gmail"
//! source_ip = "192.0.2.5"
//! ```
//!
//! Semantics:
//! - Every `match.*` key present must hold (AND). Within one key's list any entry
//!   may hold (OR). A rule without `match` matches every recipient. A list key also
//!   accepts a single string.
//! - Rules are tried in order and the FIRST matching rule decides. Action fields it
//!   sets (`queue`, `route`, `source_ip`, `ehlo_name`, `tls`) are used; fields it
//!   leaves unset take the defaults (queue [`DEFAULT_QUEUE`], route
//!   [`DEFAULT_ROUTE`], no source address, the server's own EHLO name, the TLS
//!   level of the route or `delivery.tls`). Later rules are never consulted,
//!   so put specific rules before general ones. No match at all gives the defaults,
//!   except for the route when the config names the built-in routes: a recipient
//!   no rule decides takes route `local` when it is in a local domain and a route
//!   named "local" exists, else route `default` when one named "default" exists,
//!   else [`DEFAULT_ROUTE`] (see [`RuleSet::evaluate_recipient`]).
//! - Domains (`recipient_domain`, `sender_domain`, `mx`) are an exact name or
//!   `*.suffix`, which matches names strictly below `suffix` (not `suffix`
//!   itself). Compared ASCII case-insensitively, a trailing dot ignored.
//! - `sender` and `recipient` are whole-address globs where `*` matches any run of
//!   characters ("*@example.org", "bounces-*@example.org", "postmaster@*"), ASCII
//!   case-insensitive. For `sender`, "" matches only the null reverse-path `<>`;
//!   note that "*" matches it too.
//! - `listener` and `auth_user` are exact and case-sensitive (they are config
//!   names and login names, as [`crate::Credentials`] compares them).
//!   `authenticated = true` means the session authenticated, `false` that it did not.
//! - `priority_min` is the lowest MT-PRIORITY (RFC 6710, -9..=9) that matches;
//!   `size_min`/`size_max` are inclusive byte bounds (integer or "512KiB", "10MiB").
//! - `mx` needs the MX host names of the recipient's domain: see
//!   [`RuleSet::decide_with_mx`]. Without them such rules never match; the
//!   delivery engine looks the MX hosts up before routing when a rule uses `mx`.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::relay::{normalize, validate_domain};
use crate::{NetworkList, PolicyError, TlsLevel};

/// Queue used when no rule (or the deciding rule) names one.
pub const DEFAULT_QUEUE: &str = "default";
/// Route used when no rule (or the deciding rule) names one: delivery by MX lookup.
pub const DEFAULT_ROUTE: &str = "mx";

/// A route of this name, when configured, takes what no rule decides.
pub const BUILTIN_DEFAULT_ROUTE: &str = "default";
/// A route of this name, when configured, takes the local domains' recipients
/// no rule decides.
pub const BUILTIN_LOCAL_ROUTE: &str = "local";

/// Lists with more exact domains than this are looked up in a hash set; below it a
/// linear case-insensitive scan is cheaper than hashing a lowercased copy.
const LINEAR_SCAN_MAX: usize = 8;

/// One `[[rule]]` table as written in the config. Nothing is checked until
/// [`RuleSet::new`], so errors can name the rule number.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The `match` table (a Rust keyword, hence the field name).
    #[serde(default, rename = "match")]
    pub when: MatchConfig,
    pub queue: Option<String>,
    pub route: Option<String>,
    /// Local address to connect from.
    pub source_ip: Option<String>,
    /// A `[pool.NAME]` of source addresses to connect from (instead of `source_ip`).
    pub pool: Option<String>,
    /// The `[tenant.NAME]` these recipients count for (rate limits, delivery share).
    pub tenant: Option<String>,
    pub ehlo_name: Option<String>,
    /// Outbound TLS level for the recipients this rule decides; overrides the
    /// route's `tls` and `delivery.tls`.
    pub tls: Option<TlsLevel>,
}

/// The `match.*` keys of a rule; an absent key places no condition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    #[serde(default, deserialize_with = "one_or_many")]
    pub listener: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub client_ip: Option<Vec<String>>,
    pub authenticated: Option<bool>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub auth_user: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub sender: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub sender_domain: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub recipient: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub recipient_domain: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub mx: Option<Vec<String>>,
    pub priority_min: Option<i16>,
    pub size_min: Option<SizeSpec>,
    pub size_max: Option<SizeSpec>,
}

/// A size as written: integer bytes or a string with a unit. Parsed by
/// [`RuleSet::new`] so a bad unit is reported with its rule number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeSpec {
    Bytes(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for SizeSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = SizeSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size: an integer number of bytes or a string like \"10MiB\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SizeSpec, E> {
                u64::try_from(v)
                    .map(SizeSpec::Bytes)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SizeSpec, E> {
                Ok(SizeSpec::Bytes(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SizeSpec, E> {
                Ok(SizeSpec::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `key = "x"` as shorthand for `key = ["x"]`.
pub(crate) fn one_or_many<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a string or a list of strings")]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Some(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    }))
}

/// What the message looks like, for matching. Borrowed: built per transaction
/// without copying.
#[derive(Debug, Clone, Copy)]
pub struct MessageFacts<'a> {
    pub listener: &'a str,
    /// None for messages the relay wrote itself (notices): `match.client_ip`
    /// never matches them.
    pub client_ip: Option<IpAddr>,
    /// Some when the session authenticated.
    pub auth_user: Option<&'a str>,
    /// Reverse-path without angle brackets; "" for the null sender.
    pub sender: &'a str,
    /// MT-PRIORITY, 0 when not given.
    pub priority: i16,
    pub size: u64,
}

/// The outcome for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub queue: String,
    pub route: String,
    pub source_ip: Option<IpAddr>,
    /// The rule's `pool` (checked against `[pool.*]` by the config).
    pub pool: Option<String>,
    /// The rule's `tenant` (checked against `[tenant.*]` by the config).
    pub tenant: Option<String>,
    pub ehlo_name: Option<String>,
    /// The rule's `tls`; None leaves the level to the route and `delivery.tls`.
    pub tls: Option<TlsLevel>,
    /// 1-based index of the rule that decided, for logs; None when no rule matched.
    pub rule: Option<usize>,
}

/// Compiled rules: every pattern parsed and lowercased once, each rule's complete
/// decision (defaults filled in) built ahead of time.
#[derive(Debug, Clone)]
pub struct RuleSet {
    rules: Vec<Rule>,
    fallback: Decision,
    /// What no rule decides for a recipient in a local domain, when a route
    /// named "local" exists.
    local_fallback: Option<Decision>,
    uses_mx: bool,
}

#[derive(Debug, Clone)]
struct Rule {
    cond: Conditions,
    decision: Decision,
}

/// Checked cheapest first in [`Conditions::matches`].
#[derive(Debug, Clone, Default)]
struct Conditions {
    listener: Option<Box<[Box<str>]>>,
    authenticated: Option<bool>,
    priority_min: Option<i16>,
    size_min: Option<u64>,
    size_max: Option<u64>,
    client_ip: Option<NetworkList>,
    auth_user: Option<Box<[Box<str>]>>,
    recipient_domain: Option<DomainSet>,
    sender_domain: Option<DomainSet>,
    recipient: Option<Box<[Glob]>>,
    sender: Option<Box<[Glob]>>,
    mx: Option<DomainSet>,
}

impl RuleSet {
    /// Compile and validate `rules`. Every queue and route named must be in
    /// `known_queues`/`known_routes`; [`DEFAULT_QUEUE`] and [`DEFAULT_ROUTE`] are
    /// always accepted since they are what unmatched recipients get anyway.
    pub fn new(
        rules: &[RuleConfig],
        known_queues: &[&str],
        known_routes: &[&str],
    ) -> Result<RuleSet, PolicyError> {
        let mut compiled = Vec::with_capacity(rules.len());
        for (i, config) in rules.iter().enumerate() {
            compiled.push(compile_rule(i + 1, config, known_queues, known_routes)?);
        }
        let uses_mx = compiled.iter().any(|r| r.cond.mx.is_some());
        let mut fallback = default_decision(None);
        if known_routes.contains(&BUILTIN_DEFAULT_ROUTE) {
            fallback.route = BUILTIN_DEFAULT_ROUTE.to_string();
        }
        let local_fallback = known_routes
            .contains(&BUILTIN_LOCAL_ROUTE)
            .then(|| Decision {
                route: BUILTIN_LOCAL_ROUTE.to_string(),
                ..default_decision(None)
            });
        Ok(RuleSet {
            rules: compiled,
            fallback,
            local_fallback,
            uses_mx,
        })
    }

    /// Decision before the route is resolved: rules using `match.mx` do not match.
    pub fn decide(&self, facts: &MessageFacts, recipient: &str) -> Decision {
        self.evaluate(facts, recipient, None).clone()
    }

    /// Rules using `match.mx` need the MX host names, known only after DNS: the
    /// engine calls this again with `Some(mx hosts)` once the route resolves (any
    /// host matching any pattern is a match). With `None` such rules do not match,
    /// so the two calls can pick different rules when an earlier rule uses `mx`.
    pub fn decide_with_mx(
        &self,
        facts: &MessageFacts,
        recipient: &str,
        mx_hosts: Option<&[&str]>,
    ) -> Decision {
        self.evaluate(facts, recipient, mx_hosts).clone()
    }

    /// Same as [`RuleSet::decide_with_mx`] without allocating: the decision is a
    /// reference into the compiled rules.
    pub fn evaluate(
        &self,
        facts: &MessageFacts,
        recipient: &str,
        mx_hosts: Option<&[&str]>,
    ) -> &Decision {
        let rcpt = Address::new(recipient);
        let sender = Address::new(facts.sender);
        self.rules
            .iter()
            .find(|r| r.cond.matches(facts, &rcpt, &sender, mx_hosts))
            .map_or(&self.fallback, |r| &r.decision)
    }

    /// Like [`RuleSet::evaluate`] for a recipient whose domain is local or not:
    /// when no rule matches, a local recipient takes the route named "local" if
    /// the config has one.
    pub fn evaluate_recipient(
        &self,
        facts: &MessageFacts,
        recipient: &str,
        local: bool,
        mx_hosts: Option<&[&str]>,
    ) -> &Decision {
        let d = self.evaluate(facts, recipient, mx_hosts);
        match (&self.local_fallback, d.rule, local) {
            (Some(l), None, true) => l,
            _ => d,
        }
    }

    /// True when some rule uses `match.mx`, so decisions may change once the MX
    /// hosts are known.
    pub fn uses_mx(&self) -> bool {
        self.uses_mx
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

fn default_decision(rule: Option<usize>) -> Decision {
    Decision {
        queue: DEFAULT_QUEUE.to_string(),
        route: DEFAULT_ROUTE.to_string(),
        source_ip: None,
        pool: None,
        tenant: None,
        ehlo_name: None,
        tls: None,
        rule,
    }
}

fn compile_rule(
    n: usize,
    config: &RuleConfig,
    known_queues: &[&str],
    known_routes: &[&str],
) -> Result<Rule, PolicyError> {
    let bad = |key: &'static str, reason: String| PolicyError::InvalidRule {
        rule: n,
        key,
        reason,
    };
    let m = &config.when;
    let mut cond = Conditions {
        authenticated: m.authenticated,
        ..Conditions::default()
    };

    cond.listener = compile_list(&m.listener, "match.listener", &bad, |s| {
        if s.is_empty() {
            Err("empty listener name".into())
        } else {
            Ok(s.into())
        }
    })?;
    cond.auth_user = compile_list(&m.auth_user, "match.auth_user", &bad, |s| {
        if s.is_empty() {
            Err("empty user name".into())
        } else {
            Ok(s.into())
        }
    })?;
    if cond.auth_user.is_some() && m.authenticated == Some(false) {
        return Err(bad(
            "match.auth_user",
            "contradicts match.authenticated = false".into(),
        ));
    }

    if let Some(items) = &m.client_ip {
        if items.is_empty() {
            return Err(bad("match.client_ip", empty_list()));
        }
        let list = NetworkList::parse(items).map_err(|e| bad("match.client_ip", e.to_string()))?;
        cond.client_ip = Some(list);
    }

    cond.sender = compile_list(&m.sender, "match.sender", &bad, |s| Glob::new(s, true))?;
    cond.recipient = compile_list(&m.recipient, "match.recipient", &bad, |s| {
        Glob::new(s, false)
    })?;
    cond.sender_domain = compile_domains(&m.sender_domain, "match.sender_domain", &bad)?;
    cond.recipient_domain = compile_domains(&m.recipient_domain, "match.recipient_domain", &bad)?;
    cond.mx = compile_domains(&m.mx, "match.mx", &bad)?;

    if let Some(p) = m.priority_min {
        if !(-9..=9).contains(&p) {
            return Err(bad(
                "match.priority_min",
                format!("{p} is outside the MT-PRIORITY range -9..=9"),
            ));
        }
        cond.priority_min = Some(p);
    }
    cond.size_min = m
        .size_min
        .as_ref()
        .map(parse_size)
        .transpose()
        .map_err(|e| bad("match.size_min", e))?;
    cond.size_max = m
        .size_max
        .as_ref()
        .map(parse_size)
        .transpose()
        .map_err(|e| bad("match.size_max", e))?;
    if let (Some(min), Some(max)) = (cond.size_min, cond.size_max) {
        if min > max {
            return Err(bad(
                "match.size_min",
                format!("{min} bytes is more than match.size_max ({max} bytes): nothing can match"),
            ));
        }
    }

    let mut decision = default_decision(Some(n));
    if let Some(queue) = &config.queue {
        check_known(queue, DEFAULT_QUEUE, known_queues, "queue").map_err(|e| bad("queue", e))?;
        decision.queue.clone_from(queue);
    }
    if let Some(route) = &config.route {
        check_known(route, DEFAULT_ROUTE, known_routes, "route").map_err(|e| bad("route", e))?;
        decision.route.clone_from(route);
    }
    if let Some(text) = &config.source_ip {
        let ip: IpAddr = text
            .trim()
            .parse()
            .map_err(|_| bad("source_ip", format!("{text:?} is not an IP address")))?;
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(bad(
                "source_ip",
                format!("{text:?} cannot be a local address to connect from"),
            ));
        }
        decision.source_ip = Some(ip);
    }
    if let Some(pool) = &config.pool {
        if config.source_ip.is_some() {
            return Err(bad(
                "pool",
                "a rule sets source_ip or pool, not both".into(),
            ));
        }
        if pool.is_empty() {
            return Err(bad("pool", "empty pool name".into()));
        }
        decision.pool = Some(pool.clone());
    }
    if let Some(tenant) = &config.tenant {
        if tenant.is_empty() {
            return Err(bad("tenant", "empty tenant name".into()));
        }
        decision.tenant = Some(tenant.clone());
    }
    if let Some(name) = &config.ehlo_name {
        validate_domain(name).map_err(|reason| bad("ehlo_name", format!("{name:?}: {reason}")))?;
        decision.ehlo_name = Some(name.clone());
    }
    decision.tls = config.tls;
    Ok(Rule { cond, decision })
}

fn empty_list() -> String {
    "empty list matches nothing (omit the key to match anything)".into()
}

/// Compile each item of an optional list, naming the bad item in the error.
pub(crate) fn compile_list<T>(
    items: &Option<Vec<String>>,
    key: &'static str,
    bad: &impl Fn(&'static str, String) -> PolicyError,
    compile: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<Box<[T]>>, PolicyError> {
    let Some(items) = items else {
        return Ok(None);
    };
    if items.is_empty() {
        return Err(bad(key, empty_list()));
    }
    items
        .iter()
        .map(|s| compile(s).map_err(|reason| bad(key, format!("{s:?}: {reason}"))))
        .collect::<Result<Box<[T]>, _>>()
        .map(Some)
}

pub(crate) fn compile_domains(
    items: &Option<Vec<String>>,
    key: &'static str,
    bad: &impl Fn(&'static str, String) -> PolicyError,
) -> Result<Option<DomainSet>, PolicyError> {
    let Some(items) = items else {
        return Ok(None);
    };
    if items.is_empty() {
        return Err(bad(key, empty_list()));
    }
    DomainSet::new(items)
        .map(Some)
        .map_err(|(item, reason)| bad(key, format!("{item:?}: {reason}")))
}

fn check_known(name: &str, builtin: &str, known: &[&str], what: &str) -> Result<(), String> {
    if name == builtin || known.contains(&name) {
        return Ok(());
    }
    let mut names: Vec<&str> = known.to_vec();
    if !names.contains(&builtin) {
        names.push(builtin);
    }
    names.sort_unstable();
    Err(format!(
        "unknown {what} {name:?} (known: {})",
        names.join(", ")
    ))
}

fn parse_size(spec: &SizeSpec) -> Result<u64, String> {
    match spec {
        SizeSpec::Bytes(n) => Ok(*n),
        SizeSpec::Text(t) => crate::parse_size(t),
    }
}

impl Conditions {
    fn matches(
        &self,
        facts: &MessageFacts,
        rcpt: &Address,
        sender: &Address,
        mx_hosts: Option<&[&str]>,
    ) -> bool {
        if let Some(names) = &self.listener {
            if !names.iter().any(|n| **n == *facts.listener) {
                return false;
            }
        }
        if let Some(want) = self.authenticated {
            if facts.auth_user.is_some() != want {
                return false;
            }
        }
        if let Some(min) = self.priority_min {
            if facts.priority < min {
                return false;
            }
        }
        if let Some(min) = self.size_min {
            if facts.size < min {
                return false;
            }
        }
        if let Some(max) = self.size_max {
            if facts.size > max {
                return false;
            }
        }
        if let Some(nets) = &self.client_ip {
            if !facts.client_ip.is_some_and(|ip| nets.contains(ip)) {
                return false;
            }
        }
        if let Some(users) = &self.auth_user {
            match facts.auth_user {
                Some(user) if users.iter().any(|u| **u == *user) => {}
                _ => return false,
            }
        }
        if let Some(set) = &self.recipient_domain {
            if !rcpt.domain.is_some_and(|d| set.contains(d)) {
                return false;
            }
        }
        if let Some(set) = &self.sender_domain {
            if !sender.domain.is_some_and(|d| set.contains(d)) {
                return false;
            }
        }
        if let Some(globs) = &self.recipient {
            if !globs.iter().any(|g| g.matches(rcpt.full)) {
                return false;
            }
        }
        if let Some(globs) = &self.sender {
            if !globs.iter().any(|g| g.matches(sender.full)) {
                return false;
            }
        }
        if let Some(set) = &self.mx {
            let Some(hosts) = mx_hosts else {
                return false;
            };
            if !hosts.iter().any(|h| set.contains(h)) {
                return false;
            }
        }
        true
    }
}

/// An envelope address split for matching, borrowing from the input.
pub(crate) struct Address<'a> {
    /// Without angle brackets or a trailing dot.
    pub(crate) full: &'a str,
    /// After the last '@' (quoted local parts may contain '@'); None when absent.
    pub(crate) domain: Option<&'a str>,
}

impl<'a> Address<'a> {
    pub(crate) fn new(raw: &'a str) -> Address<'a> {
        let a = raw.trim();
        let a = a
            .strip_prefix('<')
            .and_then(|x| x.strip_suffix('>'))
            .unwrap_or(a);
        let full = a.strip_suffix('.').unwrap_or(a);
        let domain = full
            .rsplit_once('@')
            .map(|(_, d)| d)
            .filter(|d| !d.is_empty());
        Address { full, domain }
    }
}

/// Exact names plus "*.suffix" wildcards.
#[derive(Debug, Clone)]
pub(crate) struct DomainSet {
    exact: Exact,
    /// Each with its leading dot (".google.com"), lowercase.
    suffixes: Box<[Box<str>]>,
}

#[derive(Debug, Clone)]
enum Exact {
    Few(Box<[Box<str>]>),
    Many(HashSet<Box<str>>),
}

impl DomainSet {
    /// On error returns the offending item and why.
    fn new(items: &[String]) -> Result<DomainSet, (String, String)> {
        let mut exact = Vec::new();
        let mut suffixes = Vec::new();
        for item in items {
            let fail = |reason: &str| (item.clone(), reason.to_string());
            let normal = normalize(item.trim()).into_owned();
            let (name, wildcard) = match normal.strip_prefix("*.") {
                Some(rest) => (rest, true),
                None => (normal.as_str(), false),
            };
            if name.contains('*') || normal == "*" {
                return Err(fail(
                    "only a leading \"*.\" wildcard is allowed (omit the key to match any domain)",
                ));
            }
            validate_domain(name).map_err(fail)?;
            if wildcard {
                suffixes.push(format!(".{name}").into_boxed_str());
            } else {
                exact.push(name.to_string().into_boxed_str());
            }
        }
        let exact = if exact.len() > LINEAR_SCAN_MAX {
            Exact::Many(exact.into_iter().collect())
        } else {
            Exact::Few(exact.into_boxed_slice())
        };
        Ok(DomainSet {
            exact,
            suffixes: suffixes.into_boxed_slice(),
        })
    }

    pub(crate) fn contains(&self, domain: &str) -> bool {
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        let found = match &self.exact {
            Exact::Few(names) => names.iter().any(|n| n.eq_ignore_ascii_case(domain)),
            Exact::Many(set) => set.contains(lowercase(domain).as_ref()),
        };
        found
            || self
                .suffixes
                .iter()
                .any(|s| ends_with_ci(domain.as_bytes(), s.as_bytes()))
    }
}

fn lowercase(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// A '*' glob compiled to prefix, ordered middle pieces and suffix, so matching is
/// a few slice comparisons with no backtracking (leftmost placement of each middle
/// piece is always safe when '*' is the only wildcard).
#[derive(Debug, Clone)]
pub(crate) struct Glob {
    /// Lowercase. Without a star the whole pattern is in `prefix`.
    prefix: Box<str>,
    middle: Box<[Box<str>]>,
    suffix: Box<str>,
    star: bool,
}

impl Glob {
    pub(crate) fn new(pattern: &str, allow_empty: bool) -> Result<Glob, String> {
        let p = pattern.trim();
        if p.is_empty() && !allow_empty {
            return Err("empty pattern".into());
        }
        if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("whitespace or control character in pattern".into());
        }
        if p.contains(['<', '>']) {
            return Err("write the address without angle brackets".into());
        }
        let p = p.strip_suffix('.').unwrap_or(p).to_ascii_lowercase();
        let mut pieces: Vec<&str> = p.split('*').collect();
        if pieces.len() == 1 {
            return Ok(Glob {
                prefix: p.as_str().into(),
                middle: Box::new([]),
                suffix: "".into(),
                star: false,
            });
        }
        // split gives at least two pieces here: first and last are anchored.
        let suffix = pieces.pop().unwrap_or_default();
        let prefix = if pieces.is_empty() {
            ""
        } else {
            pieces.remove(0)
        };
        Ok(Glob {
            prefix: prefix.into(),
            middle: pieces
                .into_iter()
                .filter(|s| !s.is_empty())
                .map(Into::into)
                .collect(),
            suffix: suffix.into(),
            star: true,
        })
    }

    pub(crate) fn matches(&self, text: &str) -> bool {
        let t = text.as_bytes();
        if !self.star {
            return t.eq_ignore_ascii_case(self.prefix.as_bytes());
        }
        let (pre, suf) = (self.prefix.as_bytes(), self.suffix.as_bytes());
        if t.len() < pre.len() + suf.len()
            || !t[..pre.len()].eq_ignore_ascii_case(pre)
            || !ends_with_ci(t, suf)
        {
            return false;
        }
        let mut rest = &t[pre.len()..t.len() - suf.len()];
        for piece in self.middle.iter() {
            match find_ci(rest, piece.as_bytes()) {
                Some(at) => rest = &rest[at + piece.len()..],
                None => return false,
            }
        }
        true
    }
}

fn ends_with_ci(text: &[u8], suffix: &[u8]) -> bool {
    text.len() >= suffix.len() && text[text.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

/// `needle` is lowercase and non-empty.
fn find_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUEUES: &[&str] = &["default", "gmail", "bulk", "slow"];
    const ROUTES: &[&str] = &["mx", "smarthost", "local"];

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[serde(default)]
        rule: Vec<RuleConfig>,
    }

    fn parse(toml_text: &str) -> Vec<RuleConfig> {
        toml::from_str::<Doc>(toml_text).expect("test toml").rule
    }

    fn rules(toml_text: &str) -> RuleSet {
        RuleSet::new(&parse(toml_text), QUEUES, ROUTES).expect("test rules")
    }

    fn rule_error(toml_text: &str) -> (usize, &'static str, String) {
        match RuleSet::new(&parse(toml_text), QUEUES, ROUTES) {
            Err(PolicyError::InvalidRule { rule, key, reason }) => (rule, key, reason),
            other => panic!("expected a rule error, got {other:?}"),
        }
    }

    fn facts() -> MessageFacts<'static> {
        MessageFacts {
            listener: "smtp",
            client_ip: "203.0.113.7".parse().ok(),
            auth_user: None,
            sender: "alice@example.org",
            priority: 0,
            size: 10_000,
        }
    }

    /// Which rule decided, for terse assertions.
    fn which(set: &RuleSet, f: &MessageFacts, rcpt: &str) -> Option<usize> {
        set.decide(f, rcpt).rule
    }

    #[test]
    fn no_rules_gives_defaults() {
        let set = RuleSet::new(&[], &[], &[]).expect("empty");
        assert!(set.is_empty());
        assert!(!set.uses_mx());
        let d = set.decide(&facts(), "bob@example.com");
        assert_eq!(
            d,
            Decision {
                queue: "default".into(),
                route: "mx".into(),
                source_ip: None,
                pool: None,
                tenant: None,
                ehlo_name: None,
                tls: None,
                rule: None,
            }
        );
    }

    #[test]
    fn tls_level_is_one_of_five_and_unset_by_default() {
        for level in TlsLevel::ALL {
            let set = rules(&format!("[[rule]]\ntls = \"{level}\"\n"));
            assert_eq!(set.decide(&facts(), "a@b.example").tls, Some(level));
        }
        assert_eq!(
            rules("[[rule]]\nqueue = \"bulk\"\n")
                .decide(&facts(), "a@b.example")
                .tls,
            None
        );
        // MTA-STS is what a destination publishes, not a level to configure
        // (`dane` is one: mandatory DANE).
        let err = match toml::from_str::<Doc>("[[rule]]\ntls = \"mta-sts\"\n") {
            Ok(_) => panic!("mta-sts is not a level"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("unknown variant `mta-sts`"), "{err}");
    }

    #[test]
    fn rule_without_match_matches_everything() {
        let set = rules("[[rule]]\nqueue = \"bulk\"\n");
        let d = set.decide(&facts(), "anyone@anywhere.example");
        assert_eq!((d.queue.as_str(), d.rule), ("bulk", Some(1)));
        assert_eq!(d.route, "mx");
        // Even a recipient with no domain at all.
        assert_eq!(which(&set, &facts(), "postmaster"), Some(1));
    }

    #[test]
    fn first_match_wins_and_unset_fields_take_defaults() {
        let set = rules(
            r#"
            [[rule]]
            match.recipient_domain = "gmail.com"
            queue = "gmail"

            [[rule]]
            match.recipient_domain = ["gmail.com", "example.com"]
            queue = "slow"
            route = "smarthost"
            source_ip = "127.0.0.5"
            ehlo_name = "out1.example.net"
            tls = "verify"

            [[rule]]
            route = "local"
            "#,
        );
        // Rule 1 decides alone: rule 2 also matches but its route/source are not merged in.
        let d = set.decide(&facts(), "x@gmail.com");
        assert_eq!(
            d,
            Decision {
                queue: "gmail".into(),
                route: "mx".into(),
                source_ip: None,
                pool: None,
                tenant: None,
                ehlo_name: None,
                tls: None,
                rule: Some(1),
            }
        );
        let d = set.decide(&facts(), "x@example.com");
        assert_eq!(
            d,
            Decision {
                queue: "slow".into(),
                route: "smarthost".into(),
                source_ip: Some("127.0.0.5".parse().expect("ip")),
                pool: None,
                tenant: None,
                ehlo_name: Some("out1.example.net".into()),
                tls: Some(TlsLevel::Verify),
                rule: Some(2),
            }
        );
        let d = set.decide(&facts(), "x@other.example");
        assert_eq!((d.queue.as_str(), d.route.as_str()), ("default", "local"));
        assert_eq!(d.rule, Some(3));
        // The borrowing form agrees.
        assert_eq!(
            set.evaluate(&facts(), "x@example.com", None),
            &set.decide(&facts(), "x@example.com")
        );
    }

    #[test]
    fn recipient_domain_exact_wildcard_case_and_dot() {
        let set = rules(
            r#"
            [[rule]]
            match.recipient_domain = ["gmail.com", "GoogleMail.com.", "*.google.com"]
            "#,
        );
        let f = facts();
        for yes in [
            "a@gmail.com",
            "a@GMAIL.COM",
            "a@gmail.com.",
            "<a@googlemail.com>",
            "a@mail.google.com",
            "a@x.y.Google.Com",
            "\"odd@local\"@gmail.com",
        ] {
            assert_eq!(which(&set, &f, yes), Some(1), "{yes}");
        }
        for no in [
            "a@google.com",
            "a@notgmail.com",
            "a@gmail.com.evil",
            "a@xgoogle.com",
            "gmail.com",
            "a@",
            "a@gmail.com@other.example",
        ] {
            assert_eq!(which(&set, &f, no), None, "{no}");
        }
    }

    #[test]
    fn many_exact_domains_use_the_set_path() {
        let names: Vec<String> = (0..50).map(|i| format!("d{i}.example")).collect();
        let cfg = RuleConfig {
            when: MatchConfig {
                recipient_domain: Some(names),
                ..MatchConfig::default()
            },
            ..RuleConfig::default()
        };
        let set = RuleSet::new(&[cfg], &[], &[]).expect("rules");
        assert_eq!(which(&set, &facts(), "x@d49.example"), Some(1));
        assert_eq!(which(&set, &facts(), "x@D7.EXAMPLE."), Some(1));
        assert_eq!(which(&set, &facts(), "x@d50.example"), None);
    }

    #[test]
    fn listener_client_ip_and_auth() {
        let set = rules(
            r#"
            [[rule]]
            match.listener = ["submission", "submissions"]
            match.client_ip = ["10.0.0.0/8", "2001:db8::/32"]
            queue = "bulk"

            [[rule]]
            match.authenticated = true
            match.auth_user = ["alice"]
            queue = "gmail"

            [[rule]]
            match.authenticated = true
            queue = "slow"

            [[rule]]
            match.authenticated = false
            route = "local"
            "#,
        );
        let mut f = facts();
        f.listener = "submission";
        f.client_ip = "10.1.2.3".parse().ok();
        assert_eq!(which(&set, &f, "x@y.example"), Some(1));
        f.client_ip = "::ffff:10.9.9.9".parse().ok();
        assert_eq!(which(&set, &f, "x@y.example"), Some(1));
        f.client_ip = "2001:db8::1".parse().ok();
        assert_eq!(which(&set, &f, "x@y.example"), Some(1));
        // Both conditions are needed (AND).
        f.client_ip = "192.0.2.1".parse().ok();
        assert_eq!(which(&set, &f, "x@y.example"), Some(4));
        // A notice the relay wrote has no client: no network matches it.
        f.client_ip = None;
        assert_eq!(which(&set, &f, "x@y.example"), Some(4));
        f.listener = "smtp";
        f.client_ip = "10.1.2.3".parse().ok();
        assert_eq!(which(&set, &f, "x@y.example"), Some(4));
        // Listener names are exact.
        f.listener = "Submission";
        assert_eq!(which(&set, &f, "x@y.example"), Some(4));

        f.auth_user = Some("alice");
        assert_eq!(which(&set, &f, "x@y.example"), Some(2));
        f.auth_user = Some("Alice");
        assert_eq!(which(&set, &f, "x@y.example"), Some(3));
        f.auth_user = Some("bob");
        assert_eq!(which(&set, &f, "x@y.example"), Some(3));
    }

    #[test]
    fn auth_user_alone_requires_a_login() {
        let set = rules("[[rule]]\nmatch.auth_user = \"alice\"\n");
        let mut f = facts();
        assert_eq!(which(&set, &f, "x@y.example"), None);
        f.auth_user = Some("alice");
        assert_eq!(which(&set, &f, "x@y.example"), Some(1));
    }

    #[test]
    fn sender_globs() {
        let set = rules(
            r#"
            [[rule]]
            match.sender = ["bounces-*@example.org", "alice@example.org", "*@lists.example.net", "*-noreply-*@*"]
            queue = "bulk"

            [[rule]]
            match.sender = [""]
            queue = "slow"
            "#,
        );
        let mut f = facts();
        let mut check = |sender: &'static str, want: Option<usize>| {
            f.sender = sender;
            assert_eq!(which(&set, &f, "x@y.example"), want, "{sender:?}");
        };
        check("alice@example.org", Some(1));
        check("ALICE@Example.Org", Some(1));
        check("<alice@example.org>", Some(1));
        check("alice@example.org.", Some(1));
        check("bounces-123@example.org", Some(1));
        check("bounces-@example.org", Some(1));
        check("bounces@example.org", None);
        check("bounces-1@example.org.uk", None);
        check("xalice@example.org", None);
        check("alice@example.orgx", None);
        check("a@lists.example.net", Some(1));
        check("@lists.example.net", Some(1));
        check("a@xlists.example.net", None);
        check("shop-noreply-7@example.com", Some(1));
        check("shop-noreply@example.com", None);
        check("", Some(2));
        check("<>", Some(2));
    }

    #[test]
    fn glob_edge_cases() {
        let g = |p: &str| Glob::new(p, true).expect("glob");
        assert!(g("*").matches(""));
        assert!(g("*").matches("anything@at.all"));
        assert!(g("**").matches("x"));
        assert!(g("a*a").matches("aa"));
        assert!(!g("a*a").matches("a"));
        assert!(g("a*b*b").matches("abb"));
        assert!(!g("a*b*b").matches("ab"));
        assert!(g("*ab*ab*").matches("xxabyyab"));
        assert!(!g("*ab*ab*").matches("xxaby"));
        assert!(g("").matches(""));
        assert!(!g("").matches("a"));
        // Overlapping prefix and suffix must not share characters.
        assert!(!g("ab*ba").matches("aba"));
        assert!(g("ab*ba").matches("abba"));
    }

    #[test]
    fn sender_domain_and_recipient() {
        let set = rules(
            r#"
            [[rule]]
            match.sender_domain = ["example.org", "*.example.net"]
            match.recipient = ["postmaster@*", "abuse@*"]
            queue = "slow"
            "#,
        );
        let mut f = facts();
        assert_eq!(which(&set, &f, "postmaster@anywhere.example"), Some(1));
        assert_eq!(which(&set, &f, "Abuse@Anywhere.Example"), Some(1));
        assert_eq!(which(&set, &f, "bob@anywhere.example"), None);
        f.sender = "carol@mail.example.net";
        assert_eq!(which(&set, &f, "postmaster@x.example"), Some(1));
        f.sender = "carol@example.net";
        assert_eq!(which(&set, &f, "postmaster@x.example"), None);
        f.sender = "";
        assert_eq!(which(&set, &f, "postmaster@x.example"), None);
    }

    #[test]
    fn priority_and_size() {
        let set = rules(
            r#"
            [[rule]]
            match.priority_min = 1
            queue = "gmail"

            [[rule]]
            match.size_min = "1MiB"
            match.size_max = 10485760
            queue = "bulk"

            [[rule]]
            match.size_min = "512KiB"
            queue = "slow"
            "#,
        );
        let mut f = facts();
        f.priority = 1;
        assert_eq!(which(&set, &f, "x@y.example"), Some(1));
        f.priority = 9;
        assert_eq!(which(&set, &f, "x@y.example"), Some(1));
        f.priority = 0;
        assert_eq!(which(&set, &f, "x@y.example"), None);
        f.priority = -5;
        f.size = 1 << 20;
        assert_eq!(which(&set, &f, "x@y.example"), Some(2));
        f.size = 10 << 20;
        assert_eq!(which(&set, &f, "x@y.example"), Some(2));
        f.size = (10 << 20) + 1;
        assert_eq!(which(&set, &f, "x@y.example"), Some(3));
        f.size = (1 << 20) - 1;
        assert_eq!(which(&set, &f, "x@y.example"), Some(3));
        f.size = 512 * 1024 - 1;
        assert_eq!(which(&set, &f, "x@y.example"), None);
    }

    #[test]
    fn sizes_parse() {
        let p = |s: &str| parse_size(&SizeSpec::Text(s.into()));
        assert_eq!(p("512KiB"), Ok(512 * 1024));
        assert_eq!(p("1MiB"), Ok(1 << 20));
        assert_eq!(p("1 GiB"), Ok(1 << 30));
        assert_eq!(p("2048"), Ok(2048));
        assert_eq!(p("10MB"), Ok(10_000_000));
        assert!(p("").is_err());
        assert!(p("MiB").is_err());
        assert!(p("1.5MiB").is_err());
        assert!(p("10 parsecs").is_err());
        assert!(p("99999999999TiB").is_err());
        assert_eq!(parse_size(&SizeSpec::Bytes(7)), Ok(7));
    }

    #[test]
    fn mx_rules_match_only_with_hosts() {
        let set = rules(
            r#"
            [[rule]]
            match.mx = ["*.google.com", "*.outlook.com"]
            queue = "gmail"

            [[rule]]
            match.recipient_domain = "example.com"
            queue = "slow"
            "#,
        );
        assert!(set.uses_mx());
        let f = facts();
        // Before DNS: the mx rule cannot match, the next rule decides.
        assert_eq!(set.decide(&f, "a@example.com").rule, Some(2));
        assert_eq!(set.decide_with_mx(&f, "a@example.com", None).rule, Some(2));
        let google = ["alt1.aspmx.l.google.com.", "ASPMX.L.GOOGLE.COM"];
        let d = set.decide_with_mx(&f, "a@example.com", Some(&google));
        assert_eq!((d.queue.as_str(), d.rule), ("gmail", Some(1)));
        let mixed = ["mx.example.com", "example-com.mail.protection.outlook.com"];
        assert_eq!(
            set.decide_with_mx(&f, "a@example.com", Some(&mixed)).rule,
            Some(1)
        );
        let other = ["mx.example.com", "google.com"];
        assert_eq!(
            set.decide_with_mx(&f, "a@example.com", Some(&other)).rule,
            Some(2)
        );
        assert_eq!(
            set.decide_with_mx(&f, "a@example.com", Some(&[])).rule,
            Some(2)
        );
        assert!(!rules("[[rule]]\nqueue = \"bulk\"\n").uses_mx());
    }

    #[test]
    fn all_keys_together_are_anded() {
        let set = rules(
            r#"
            [[rule]]
            match.listener = "submission"
            match.client_ip = "10.0.0.0/8"
            match.authenticated = true
            match.auth_user = "alice"
            match.sender = "*@example.org"
            match.sender_domain = "example.org"
            match.recipient = "*@gmail.com"
            match.recipient_domain = "gmail.com"
            match.mx = "*.google.com"
            match.priority_min = 0
            match.size_min = 1
            match.size_max = "1MiB"
            queue = "gmail"
            "#,
        );
        let base = MessageFacts {
            listener: "submission",
            client_ip: "10.0.0.1".parse().ok(),
            auth_user: Some("alice"),
            sender: "alice@example.org",
            priority: 0,
            size: 100,
        };
        let mx = ["gmail-smtp-in.l.google.com"];
        let decide = |f: &MessageFacts, rcpt: &str, mx: Option<&[&str]>| {
            set.decide_with_mx(f, rcpt, mx).rule
        };
        assert_eq!(decide(&base, "bob@gmail.com", Some(&mx)), Some(1));
        // Each single condition failing on its own breaks the match.
        let variations: Vec<MessageFacts> = vec![
            MessageFacts {
                listener: "smtp",
                ..base
            },
            MessageFacts {
                client_ip: "11.0.0.1".parse().ok(),
                ..base
            },
            MessageFacts {
                auth_user: None,
                ..base
            },
            MessageFacts {
                auth_user: Some("bob"),
                ..base
            },
            MessageFacts {
                sender: "alice@example.net",
                ..base
            },
            MessageFacts {
                priority: -1,
                ..base
            },
            MessageFacts { size: 0, ..base },
            MessageFacts {
                size: (1 << 20) + 1,
                ..base
            },
        ];
        for f in &variations {
            assert_eq!(decide(f, "bob@gmail.com", Some(&mx)), None, "{f:?}");
        }
        assert_eq!(decide(&base, "bob@googlemail.com", Some(&mx)), None);
        assert_eq!(
            decide(&base, "bob@gmail.com", Some(&["mx.example.com"])),
            None
        );
        assert_eq!(decide(&base, "bob@gmail.com", None), None);
    }

    #[test]
    fn validation_errors_name_rule_and_key() {
        let good = "[[rule]]\nqueue = \"bulk\"\n[[rule]]\nroute = \"smarthost\"\n";
        let cases: &[(&str, &str, &str)] = &[
            (
                "match.client_ip = [\"10.0.0.1/8\"]",
                "match.client_ip",
                "10.0.0.1/8",
            ),
            ("match.client_ip = []", "match.client_ip", "empty list"),
            ("match.size_min = \"1 parsec\"", "match.size_min", "parsec"),
            ("match.size_max = \"lots\"", "match.size_max", "lots"),
            (
                "match.size_min = \"2MiB\"\nmatch.size_max = \"1MiB\"",
                "match.size_min",
                "size_max",
            ),
            ("match.priority_min = 10", "match.priority_min", "10"),
            (
                "match.recipient_domain = [\"gmail.com\", \"bad domain\"]",
                "match.recipient_domain",
                "bad domain",
            ),
            (
                "match.recipient_domain = \"*\"",
                "match.recipient_domain",
                "\"*\"",
            ),
            (
                "match.recipient_domain = \"g*mail.com\"",
                "match.recipient_domain",
                "g*mail.com",
            ),
            (
                "match.sender_domain = \"192.0.2.1\"",
                "match.sender_domain",
                "192.0.2.1",
            ),
            ("match.mx = \"*.\"", "match.mx", "*."),
            (
                "match.sender = [\"a b@example.org\"]",
                "match.sender",
                "a b@example.org",
            ),
            (
                "match.sender = \"<a@example.org>\"",
                "match.sender",
                "angle",
            ),
            ("match.recipient = \"\"", "match.recipient", "empty"),
            ("match.listener = \"\"", "match.listener", "empty"),
            ("match.auth_user = []", "match.auth_user", "empty list"),
            (
                "match.authenticated = false\nmatch.auth_user = \"alice\"",
                "match.auth_user",
                "contradicts",
            ),
            ("queue = \"gmial\"", "queue", "gmial"),
            ("route = \"smarthots\"", "route", "smarthots"),
            ("source_ip = \"127.0.0.300\"", "source_ip", "127.0.0.300"),
            ("source_ip = \"0.0.0.0\"", "source_ip", "0.0.0.0"),
            (
                "ehlo_name = \"out 1.example.net\"",
                "ehlo_name",
                "out 1.example.net",
            ),
        ];
        for (body, want_key, needle) in cases {
            let text = format!("{good}[[rule]]\n{body}\n");
            let (rule, key, reason) = rule_error(&text);
            assert_eq!((rule, key), (3, *want_key), "{body}: {reason}");
            assert!(reason.contains(needle), "{body}: {reason}");
        }
        let msg = RuleSet::new(
            &parse("[[rule]]\n[[rule]]\n[[rule]]\nmatch.client_ip = \"10.0.0.1/8\"\n"),
            QUEUES,
            ROUTES,
        )
        .expect_err("bad network")
        .to_string();
        assert!(
            msg.starts_with("rule 3: match.client_ip: invalid network \"10.0.0.1/8\""),
            "{msg}"
        );
    }

    #[test]
    fn unknown_queue_or_route_rejected_builtins_accepted() {
        let cfg = parse("[[rule]]\nqueue = \"gmail\"\nroute = \"smarthost\"\n");
        let err = RuleSet::new(&cfg, &["bulk"], ROUTES).expect_err("unknown queue");
        let msg = err.to_string();
        assert!(
            msg.contains("rule 1: queue: unknown queue \"gmail\""),
            "{msg}"
        );
        assert!(msg.contains("bulk") && msg.contains("default"), "{msg}");
        let err = RuleSet::new(&cfg, QUEUES, &["mx"]).expect_err("unknown route");
        assert!(err.to_string().contains("rule 1: route:"), "{err}");
        // The defaults need not be listed.
        let cfg = parse("[[rule]]\nqueue = \"default\"\nroute = \"mx\"\n");
        RuleSet::new(&cfg, &[], &[]).expect("builtins");
        // Names are exact.
        let cfg = parse("[[rule]]\nqueue = \"Gmail\"\n");
        assert!(RuleSet::new(&cfg, QUEUES, ROUTES).is_err());
    }

    #[test]
    fn config_shape_is_strict() {
        let bad = [
            "[[rule]]\nmatch.recipient_domains = [\"x.example\"]\n",
            "[[rule]]\nqueues = \"bulk\"\n",
            "[[rule]]\nmatch.size_min = -1\n",
            "[[rule]]\nmatch.authenticated = \"yes\"\n",
            "[[rule]]\nmatch.listener = 5\n",
        ];
        for text in bad {
            assert!(toml::from_str::<Doc>(text).is_err(), "{text}");
        }
        let cfg = parse("[[rule]]\nmatch = { listener = \"smtp\", size_max = 5 }\n");
        assert_eq!(cfg[0].when.listener, Some(vec!["smtp".to_string()]));
        assert_eq!(cfg[0].when.size_max, Some(SizeSpec::Bytes(5)));
    }

    #[test]
    fn routes_named_local_and_default_take_what_no_rule_decides() {
        let rules = parse(
            r#"
            [[rule]]
            match.recipient_domain = "special.example"
            queue = "bulk"
            "#,
        );
        let f = facts();
        // Neither route configured: MX.
        let plain = RuleSet::new(&rules, QUEUES, &["mx"]).expect("rules");
        assert_eq!(
            plain
                .evaluate_recipient(&f, "a@x.example", true, None)
                .route,
            "mx"
        );
        // Both configured: local recipients go to "local", the rest to "default".
        let both = RuleSet::new(&rules, QUEUES, &["local", "default"]).expect("rules");
        let local = both.evaluate_recipient(&f, "a@x.example", true, None);
        assert_eq!((local.route.as_str(), local.rule), ("local", None));
        assert_eq!(
            both.evaluate_recipient(&f, "a@x.example", false, None)
                .route,
            "default"
        );
        // A deciding rule keeps its own route (unset: MX), local or not.
        let d = both.evaluate_recipient(&f, "a@special.example", true, None);
        assert_eq!((d.route.as_str(), d.rule), ("mx", Some(1)));
        // Only "default": local recipients take it too.
        let default = RuleSet::new(&rules, QUEUES, &["default"]).expect("rules");
        assert_eq!(
            default
                .evaluate_recipient(&f, "a@x.example", true, None)
                .route,
            "default"
        );
    }
}
