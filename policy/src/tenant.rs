//! Tenants, sans-IO: who a message counts for, and the delivery fair share.
//!
//! * A message's tenant is the `tenant` of the rule that decided its
//!   recipient, else the one named by the `[tenants] header` field (read from
//!   trusted clients only, [`from_header`]), else its authenticated user when
//!   a `[tenant.USER]` section names it ([`tenant_of`]). Only configured names
//!   are tenants, so every set keyed by tenant (limiters, metric labels,
//!   fair-share tags) is bounded by the configuration.
//! * Fair share at a site is start-time fair queueing: each job gets a finish
//!   tag `max(virtual time, tenant's last tag) + SCALE / weight`, the site
//!   serves the lowest tag first, and serving a job moves the virtual time to
//!   its tag. A tenant that queued thousands of jobs holds tags far ahead; a
//!   newcomer's jobs start at the virtual time, so they interleave with the
//!   backlog by weight instead of waiting behind it.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::Rate;

/// Tag distance of one job of weight 1.
const SCALE: u64 = 1 << 20;
/// Most distinct tenants a site keeps tags for (the configured ones, plus
/// the untenanted bucket).
pub const MAX_TENANTS: usize = 10_000;

/// `[tenant.NAME]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Messages per period accepted for this tenant (all cores together);
    /// over it, the end of data is answered 451 4.7.1. Empty = no limit.
    #[serde(default)]
    pub message_rate: Vec<Rate>,
    /// Share of a site's deliveries when tenants compete for it; default 1.
    pub weight: Option<u32>,
}

impl TenantConfig {
    pub fn weight(&self) -> u32 {
        self.weight.unwrap_or(1).max(1)
    }
}

/// Longest tenant name a header may carry (and a `[tenant.NAME]` may have).
pub const MAX_NAME: usize = 64;
/// Longest header field name accepted for `tenants.header`.
pub const MAX_HEADER_NAME: usize = 64;

/// `[tenants]`: where a tenant comes from besides rules and AUTH.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantsConfig {
    /// Header field naming the message's tenant, read at the end of data
    /// from trusted clients; "" (default) reads none.
    pub header: String,
    /// The tenant of a message whose header names no configured tenant (an
    /// unknown or malformed value); none: such a message falls through to
    /// its authenticated user, as if the header were absent.
    pub default: Option<String>,
    /// Remove the header field from the message once read (true): it is an
    /// instruction to this relay, not something the recipients should see.
    pub strip_header: bool,
}

impl Default for TenantsConfig {
    fn default() -> TenantsConfig {
        TenantsConfig {
            header: String::new(),
            default: None,
            strip_header: true,
        }
    }
}

impl TenantsConfig {
    /// The header field to read, when one is configured.
    pub fn header(&self) -> Option<&str> {
        (!self.header.is_empty()).then_some(self.header.as_str())
    }
}

/// A value a header may name a tenant with: 1 to [`MAX_NAME`] bytes of
/// ASCII letters, digits, `.`, `_` and `-`.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The tenant a header value names: itself when it is a configured tenant,
/// else `[tenants] default` (which may be none). No value: none.
pub fn from_header(
    value: Option<&str>,
    tenants: &BTreeMap<String, TenantConfig>,
    source: &TenantsConfig,
) -> Option<String> {
    let value = value?.trim();
    if valid_name(value) && tenants.contains_key(value) {
        return Some(value.to_string());
    }
    source.default.clone()
}

/// `[tenants]` that cannot be used (the dotted key and why).
pub fn check_source(
    source: &TenantsConfig,
    tenants: &BTreeMap<String, TenantConfig>,
) -> Result<(), (String, String)> {
    let h = &source.header;
    if h.len() > MAX_HEADER_NAME || !h.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err((
            "tenants.header".into(),
            format!("must be a header field name (printable ASCII, no colon, at most {MAX_HEADER_NAME} characters)"),
        ));
    }
    if let Some(d) = &source.default {
        if !tenants.contains_key(d) {
            return Err(("tenants.default".into(), format!("no [tenant.{d}] section")));
        }
    }
    Ok(())
}

/// A tenant setting that cannot be used (the dotted key and why).
pub fn check(tenants: &BTreeMap<String, TenantConfig>) -> Result<(), (String, String)> {
    if tenants.len() > MAX_TENANTS {
        return Err(("tenant".into(), format!("at most {MAX_TENANTS} tenants")));
    }
    for (name, t) in tenants {
        if t.weight == Some(0) {
            return Err((format!("tenant.{name}.weight"), "must be at least 1".into()));
        }
        if name.is_empty() || name.len() > MAX_NAME {
            return Err((
                format!("tenant.{name}"),
                format!("name of 1 to {MAX_NAME} bytes"),
            ));
        }
    }
    Ok(())
}

/// The tenant of a recipient: its rule's, else `named` (the header's at the
/// end of data, the one stored with the message at delivery) while it is
/// still configured, else the authenticated user's own `[tenant.USER]`,
/// else none.
pub fn tenant_of(
    rule_tenant: Option<&str>,
    named: Option<&str>,
    auth_user: Option<&str>,
    tenants: &BTreeMap<String, TenantConfig>,
) -> Option<String> {
    if let Some(t) = rule_tenant {
        return Some(t.to_string());
    }
    if let Some(t) = named.filter(|t| tenants.contains_key(*t)) {
        return Some(t.to_string());
    }
    auth_user
        .filter(|u| tenants.contains_key(*u))
        .map(str::to_string)
}

/// Start-time fair queueing tags of one site.
#[derive(Debug, Default)]
pub struct FairTags {
    vtime: u64,
    last: HashMap<String, u64>,
}

impl FairTags {
    /// The finish tag of a new job of `tenant` ("" for none) with `weight`.
    pub fn tag(&mut self, tenant: &str, weight: u32) -> u64 {
        if !self.last.contains_key(tenant) && self.last.len() >= MAX_TENANTS {
            // Tags at or behind the virtual time say nothing any more.
            let v = self.vtime;
            self.last.retain(|_, t| *t > v);
        }
        let start = self.last.get(tenant).copied().unwrap_or(0).max(self.vtime);
        let tag = start + SCALE / u64::from(weight.max(1));
        if self.last.len() < MAX_TENANTS || self.last.contains_key(tenant) {
            self.last.insert(tenant.to_string(), tag);
        }
        tag
    }

    /// A job with this tag was taken off the queue.
    pub fn served(&mut self, tag: u64) {
        self.vtime = self.vtime.max(tag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newcomer_interleaves_with_a_backlog() {
        let mut f = FairTags::default();
        let mut queue: Vec<(u64, &str)> = (0..1000).map(|_| (f.tag("a", 1), "a")).collect();
        // Ten of A's served, then B arrives with 10.
        queue.sort();
        let mut order: Vec<&str> = Vec::new();
        for _ in 0..10 {
            let (t, who) = queue.remove(0);
            f.served(t);
            order.push(who);
        }
        queue.extend((0..10).map(|_| (f.tag("b", 1), "b")));
        queue.sort();
        for (t, who) in queue.drain(..30) {
            f.served(t);
            order.push(who);
        }
        // B's ten are among the next twenty, alternating with A.
        let b_positions: Vec<usize> = order
            .iter()
            .enumerate()
            .filter(|(_, w)| **w == "b")
            .map(|(i, _)| i)
            .collect();
        assert_eq!(b_positions.len(), 10);
        assert!(b_positions.iter().all(|p| *p < 31), "{b_positions:?}");
    }

    #[test]
    fn weights_share_the_site() {
        let mut f = FairTags::default();
        let mut queue: Vec<(u64, &str)> = Vec::new();
        for _ in 0..300 {
            queue.push((f.tag("a", 3), "a"));
            queue.push((f.tag("b", 1), "b"));
        }
        queue.sort();
        let first: Vec<&str> = queue.iter().take(100).map(|(_, w)| *w).collect();
        let a = first.iter().filter(|w| **w == "a").count();
        assert!((74..=76).contains(&a), "{a} of 100");
    }

    #[test]
    fn the_tenant_comes_from_the_rule_or_a_configured_user() {
        let mut tenants = BTreeMap::new();
        tenants.insert("acme".to_string(), TenantConfig::default());
        tenants.insert("shop".to_string(), TenantConfig::default());
        assert_eq!(
            tenant_of(Some("x"), Some("shop"), Some("acme"), &tenants).as_deref(),
            Some("x")
        );
        assert_eq!(
            tenant_of(None, None, Some("acme"), &tenants).as_deref(),
            Some("acme")
        );
        // A named tenant (header, or stored) comes before the user's.
        assert_eq!(
            tenant_of(None, Some("shop"), Some("acme"), &tenants).as_deref(),
            Some("shop")
        );
        // One no longer configured (a reload removed it) is passed over.
        assert_eq!(
            tenant_of(None, Some("gone"), Some("acme"), &tenants).as_deref(),
            Some("acme")
        );
        assert_eq!(tenant_of(None, None, Some("other"), &tenants), None);
        assert_eq!(tenant_of(None, None, None, &tenants), None);
        let mut bad = tenants.clone();
        bad.insert(
            "z".into(),
            TenantConfig {
                weight: Some(0),
                ..TenantConfig::default()
            },
        );
        assert_eq!(check(&bad).map_err(|e| e.0), Err("tenant.z.weight".into()));
    }

    #[test]
    fn a_header_names_a_configured_tenant_or_gets_the_default() {
        let mut tenants = BTreeMap::new();
        tenants.insert("acme".to_string(), TenantConfig::default());
        tenants.insert("misc".to_string(), TenantConfig::default());
        let mut source = TenantsConfig {
            header: "X-Tenant".into(),
            ..TenantsConfig::default()
        };
        assert_eq!(
            from_header(Some(" acme "), &tenants, &source).as_deref(),
            Some("acme")
        );
        assert_eq!(from_header(None, &tenants, &source), None);
        // Unknown, malformed, too long: the default, here none.
        assert_eq!(from_header(Some("other"), &tenants, &source), None);
        source.default = Some("misc".into());
        for bad in ["other", "ac me", "acme;x", "", &"a".repeat(65), "acmé"] {
            assert_eq!(
                from_header(Some(bad), &tenants, &source).as_deref(),
                Some("misc"),
                "{bad:?}"
            );
        }
        assert!(valid_name("a.b_c-9"));
        assert!(!valid_name(&"a".repeat(65)));
        assert_eq!(check_source(&source, &tenants), Ok(()));
        source.default = Some("nobody".into());
        assert_eq!(
            check_source(&source, &tenants).map_err(|e| e.0),
            Err("tenants.default".into())
        );
        source.default = None;
        source.header = "X-Tenant:".into();
        assert_eq!(
            check_source(&source, &tenants).map_err(|e| e.0),
            Err("tenants.header".into())
        );
    }
}
