//! Tenants, sans-IO: who a message counts for, and the delivery fair share.
//!
//! * A message's tenant is the `tenant` of the rule that decided its
//!   recipient, else its authenticated user when a `[tenant.USER]` section
//!   names it ([`tenant_of`]). Only configured names are tenants, so every
//!   set keyed by tenant (limiters, metric labels, fair-share tags) is bounded
//!   by the configuration.
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

/// A tenant setting that cannot be used (the dotted key and why).
pub fn check(tenants: &BTreeMap<String, TenantConfig>) -> Result<(), (String, String)> {
    if tenants.len() > MAX_TENANTS {
        return Err(("tenant".into(), format!("at most {MAX_TENANTS} tenants")));
    }
    for (name, t) in tenants {
        if t.weight == Some(0) {
            return Err((format!("tenant.{name}.weight"), "must be at least 1".into()));
        }
        if name.is_empty() || name.len() > 64 {
            return Err((format!("tenant.{name}"), "name of 1 to 64 bytes".into()));
        }
    }
    Ok(())
}

/// The tenant of a recipient: its rule's, else the authenticated user's own
/// `[tenant.USER]`, else none.
pub fn tenant_of(
    rule_tenant: Option<&str>,
    auth_user: Option<&str>,
    tenants: &BTreeMap<String, TenantConfig>,
) -> Option<String> {
    if let Some(t) = rule_tenant {
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
        assert_eq!(
            tenant_of(Some("x"), Some("acme"), &tenants).as_deref(),
            Some("x")
        );
        assert_eq!(
            tenant_of(None, Some("acme"), &tenants).as_deref(),
            Some("acme")
        );
        assert_eq!(tenant_of(None, Some("other"), &tenants), None);
        assert_eq!(tenant_of(None, None, &tenants), None);
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
}
