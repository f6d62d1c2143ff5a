//! Inbound rate and concurrency limits (`[[limit]]` rules): by client IP,
//! client network, sender, sender domain, recipient or authenticated user.
//!
//! Exact across cores: every core decides against the same table, a fixed set
//! of mutex shards keyed by (rule, key). A decision that involves several rules
//! locks all their shards at once, in shard order (no deadlock), checks every
//! rule and only then takes from all of them, so two cores can never both take
//! the last token and a refusal consumes nothing. Time is passed in (unix ms).
//!
//! What a rule counts depends on its key:
//! - `ip` / `network`: `rate` counts transactions (each MAIL accepted),
//!   `connection_rate` new connections, `concurrency` open connections.
//! - `sender`, `sender_domain`, `auth_user`: `rate` counts transactions,
//!   `concurrency` transactions in flight (MAIL to the end of the message).
//! - `recipient`: `rate` counts RCPTs naming it, `concurrency` transactions in
//!   flight that name it.
//!
//! The table is bounded: at most `max_tracked` keys; an idle key (no slot held,
//! its buckets full again) is dropped when room is needed. When every tracked
//! key is busy a new key is not limited (counted in [`LimitStats::untracked`]).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::IpNet;

use crate::throttle::{Rate, RateLimiter};

/// Lock shards of the table; a power of two.
const SHARDS: usize = 16;
/// A full shard is swept for idle keys at most this often.
const SWEEP_INTERVAL_MS: u64 = 1_000;

/// What a rule is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKey {
    Ip,
    /// The client address masked to these prefix lengths.
    Network {
        v4: u8,
        v6: u8,
    },
    Sender,
    SenderDomain,
    Recipient,
    AuthUser,
}

impl LimitKey {
    /// Keys of the client address: their concurrency counts connections.
    pub fn is_client(self) -> bool {
        matches!(self, LimitKey::Ip | LimitKey::Network { .. })
    }

    pub fn name(self) -> &'static str {
        match self {
            LimitKey::Ip => "ip",
            LimitKey::Network { .. } => "network",
            LimitKey::Sender => "sender",
            LimitKey::SenderDomain => "sender_domain",
            LimitKey::Recipient => "recipient",
            LimitKey::AuthUser => "auth_user",
        }
    }
}

/// Where in the session a check is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitStage {
    Connect,
    Mail,
    Rcpt,
}

impl LimitStage {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitStage::Connect => "connect",
            LimitStage::Mail => "mail",
            LimitStage::Rcpt => "rcpt",
        }
    }
}

/// The reply to a refused command (or connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitReply {
    pub code: u16,
    pub status: String,
    pub text: String,
}

/// One `[[limit]]` rule, validated.
#[derive(Debug, Clone)]
pub struct LimitRule {
    /// For logs and metrics.
    pub name: String,
    pub key: LimitKey,
    pub rate: Option<Rate>,
    /// Connections per period (`ip` and `network` only).
    pub connection_rate: Option<Rate>,
    pub concurrency: Option<u32>,
    /// Listeners it applies to; empty means all.
    pub listeners: Vec<String>,
    /// Replaces the default reply (421 4.7.0 at connect, 451 4.7.1 at MAIL/RCPT).
    pub reply: Option<LimitReply>,
}

impl LimitRule {
    pub fn applies_to(&self, listener: &str) -> bool {
        self.listeners.is_empty() || self.listeners.iter().any(|l| l == listener)
    }

    /// Whether this rule has something to check at `stage`, and what:
    /// (rate, concurrency).
    fn at(&self, stage: LimitStage) -> (Option<Rate>, Option<u32>) {
        match (stage, self.key) {
            (LimitStage::Connect, LimitKey::Ip | LimitKey::Network { .. }) => {
                (self.connection_rate, self.concurrency)
            }
            (LimitStage::Mail, LimitKey::Ip | LimitKey::Network { .. }) => (self.rate, None),
            (LimitStage::Mail, LimitKey::Sender | LimitKey::SenderDomain | LimitKey::AuthUser) => {
                (self.rate, self.concurrency)
            }
            (LimitStage::Rcpt, LimitKey::Recipient) => (self.rate, self.concurrency),
            _ => (None, None),
        }
    }

    fn default_reply(stage: LimitStage) -> LimitReply {
        match stage {
            LimitStage::Connect => LimitReply {
                code: 421,
                status: "4.7.0".into(),
                text: "Error: too many connections from your address, try again later".into(),
            },
            LimitStage::Mail | LimitStage::Rcpt => LimitReply {
                code: 451,
                status: "4.7.1".into(),
                text: "Error: rate limit exceeded, try again later".into(),
            },
        }
    }

    /// Longest period of its rates: an untouched bucket is full after it.
    fn idle_ms(&self) -> u64 {
        [self.rate, self.connection_rate]
            .iter()
            .flatten()
            .map(|r| r.per_ms)
            .max()
            .unwrap_or(0)
    }
}

/// What the session knows when it asks.
#[derive(Debug, Clone, Copy)]
pub struct LimitFacts<'a> {
    pub listener: &'a str,
    pub ip: IpAddr,
    pub sender: Option<&'a str>,
    pub auth_user: Option<&'a str>,
    pub recipient: Option<&'a str>,
}

/// A refusal: which rule and the reply to give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitRefusal {
    pub rule: String,
    pub key: String,
    pub reply: LimitReply,
    /// ms until the rate would allow it (0 for a concurrency refusal).
    pub retry_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Subject {
    Addr(IpAddr),
    Text(Box<str>),
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Addr(a) => write!(f, "{a}"),
            Subject::Text(t) => f.write_str(t),
        }
    }
}

/// (rule, stage, key): a rule's connection rate and message rate are
/// separate buckets.
type TableKey = (u16, LimitStage, Subject);

#[derive(Debug)]
struct Entry {
    rate: Option<RateLimiter>,
    held: u32,
    last_ms: u64,
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<TableKey, Entry>,
    last_sweep_ms: u64,
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct LimitStats {
    /// Keys that could not be tracked (table full of busy keys).
    pub untracked: AtomicU64,
}

/// The shared table of all `[[limit]]` rules.
#[derive(Debug)]
pub struct InboundLimits {
    rules: Vec<LimitRule>,
    shards: Box<[Mutex<Shard>]>,
    max_per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
    pub stats: LimitStats,
}

/// Concurrency slots taken; given back when dropped.
pub struct LimitPermit {
    limits: Arc<InboundLimits>,
    held: Vec<(usize, TableKey)>,
}

impl std::fmt::Debug for LimitPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitPermit")
            .field("slots", &self.held.len())
            .finish()
    }
}

impl Drop for LimitPermit {
    fn drop(&mut self) {
        for (shard, key) in self.held.drain(..) {
            let Ok(mut s) = self.limits.shards[shard].lock() else {
                continue;
            };
            if let Some(e) = s.map.get_mut(&key) {
                e.held = e.held.saturating_sub(1);
            }
        }
    }
}

/// The domain of an address, lowercased ("" for the null sender).
fn domain_of(address: &str) -> String {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
        .unwrap_or_default()
}

impl InboundLimits {
    /// `max_tracked`: keys held at most, all rules together (at least one per shard).
    pub fn new(rules: Vec<LimitRule>, max_tracked: usize) -> InboundLimits {
        InboundLimits {
            rules,
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            max_per_shard: (max_tracked / SHARDS).max(1),
            hasher: Default::default(),
            stats: LimitStats::default(),
        }
    }

    pub fn rules(&self) -> &[LimitRule] {
        &self.rules
    }

    /// Whether any rule applies to `listener` (else sessions skip the table).
    pub fn applies_to(&self, listener: &str) -> bool {
        self.rules.iter().any(|r| r.applies_to(listener))
    }

    /// Keys tracked now (all shards).
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.map.len()).unwrap_or(0))
            .sum()
    }

    /// The key a rule limits for these facts; None when the rule does not
    /// concern them (no sender yet, not authenticated, ...).
    fn subject(rule: &LimitRule, facts: &LimitFacts<'_>) -> Option<Subject> {
        Some(match rule.key {
            LimitKey::Ip => Subject::Addr(facts.ip.to_canonical()),
            LimitKey::Network { v4, v6 } => {
                let ip = facts.ip.to_canonical();
                let prefix = if ip.is_ipv4() { v4 } else { v6 };
                let net = IpNet::new(ip, prefix).ok()?;
                Subject::Addr(net.trunc().addr())
            }
            LimitKey::Sender => Subject::Text(facts.sender?.to_ascii_lowercase().into()),
            LimitKey::SenderDomain => Subject::Text(domain_of(facts.sender?).into()),
            LimitKey::Recipient => Subject::Text(facts.recipient?.to_ascii_lowercase().into()),
            LimitKey::AuthUser => Subject::Text(facts.auth_user?.into()),
        })
    }

    fn shard_of(&self, key: &TableKey) -> usize {
        (self.hasher.hash_one(key) as usize) & (SHARDS - 1)
    }

    /// Checks every rule for `stage` and, when all allow it, takes a token
    /// from each rate and a slot from each concurrency; the permit gives the
    /// slots back when dropped.
    pub fn acquire(
        self: &Arc<Self>,
        stage: LimitStage,
        facts: &LimitFacts<'_>,
        now_ms: u64,
    ) -> Result<LimitPermit, LimitRefusal> {
        // (shard, rule, key, rate, concurrency) of each rule that applies.
        type Wanted = (usize, usize, TableKey, Option<Rate>, Option<u32>);
        let mut wanted: Vec<Wanted> = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.applies_to(facts.listener) {
                continue;
            }
            let (rate, concurrency) = rule.at(stage);
            if rate.is_none() && concurrency.is_none() {
                continue;
            }
            let Some(subject) = Self::subject(rule, facts) else {
                continue;
            };
            let key = (i as u16, stage, subject);
            wanted.push((self.shard_of(&key), i, key, rate, concurrency));
        }
        let mut permit = LimitPermit {
            limits: self.clone(),
            held: Vec::new(),
        };
        if wanted.is_empty() {
            return Ok(permit);
        }
        // Every shard involved, locked in ascending order.
        let mut order: Vec<usize> = wanted.iter().map(|w| w.0).collect();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<(usize, MutexGuard<'_, Shard>)> = Vec::with_capacity(order.len());
        for s in order {
            match self.shards[s].lock() {
                Ok(g) => guards.push((s, g)),
                // A poisoned shard limits nothing rather than refusing all mail.
                Err(_) => return Ok(permit),
            }
        }
        // Phase 1: would every rule allow it?
        let mut tracked = vec![false; wanted.len()];
        for (n, (s, i, key, rate, concurrency)) in wanted.iter().enumerate() {
            let g = guards.iter().position(|(i, _)| i == s).unwrap_or(0);
            let shard = &mut *guards[g].1;
            let rule = &self.rules[*i];
            if !shard.map.contains_key(key) && !self.make_room(shard, now_ms) {
                self.stats.untracked.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            tracked[n] = true;
            let entry = shard.map.entry(key.clone()).or_insert_with(|| Entry {
                rate: rate.map(RateLimiter::new),
                held: 0,
                last_ms: now_ms,
            });
            entry.last_ms = now_ms;
            let refusal = |retry_ms| LimitRefusal {
                rule: rule.name.clone(),
                key: key.2.to_string(),
                reply: rule
                    .reply
                    .clone()
                    .unwrap_or_else(|| LimitRule::default_reply(stage)),
                retry_ms,
            };
            if let Some(limiter) = entry.rate.as_mut() {
                limiter.refill(now_ms);
                let wait = limiter.wait_ms();
                if wait > 0 {
                    return Err(refusal(wait));
                }
            }
            if concurrency.is_some_and(|max| entry.held >= max) {
                return Err(refusal(0));
            }
        }
        // Phase 2: all allow it; take.
        for (n, (s, _, key, _, concurrency)) in wanted.into_iter().enumerate() {
            if !tracked[n] {
                continue;
            }
            let g = guards.iter().position(|(i, _)| *i == s).unwrap_or(0);
            let Some(entry) = guards[g].1.map.get_mut(&key) else {
                continue;
            };
            if let Some(limiter) = entry.rate.as_mut() {
                limiter.take();
            }
            if concurrency.is_some() {
                entry.held += 1;
                permit.held.push((s, key));
            }
        }
        drop(guards);
        Ok(permit)
    }

    /// Room for one more key in `shard`: sweeps idle keys when full (at most
    /// once per interval). False when it stays full.
    fn make_room(&self, shard: &mut Shard, now_ms: u64) -> bool {
        if shard.map.len() < self.max_per_shard {
            return true;
        }
        if now_ms.saturating_sub(shard.last_sweep_ms) < SWEEP_INTERVAL_MS {
            return false;
        }
        shard.last_sweep_ms = now_ms;
        let rules = &self.rules;
        shard.map.retain(|(i, _, _), e| {
            let idle_ms = rules.get(usize::from(*i)).map_or(0, LimitRule::idle_ms);
            e.held > 0 || now_ms.saturating_sub(e.last_ms) < idle_ms
        });
        shard.map.len() < self.max_per_shard
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(key: LimitKey, rate: Option<&str>, concurrency: Option<u32>) -> LimitRule {
        LimitRule {
            name: format!("{}-rule", key.name()),
            key,
            rate: rate.map(|r| r.parse().expect("rate")),
            connection_rate: None,
            concurrency,
            listeners: Vec::new(),
            reply: None,
        }
    }

    fn facts<'a>(ip: &str, sender: Option<&'a str>, rcpt: Option<&'a str>) -> LimitFacts<'a> {
        LimitFacts {
            listener: "smtp",
            ip: ip.parse().expect("ip"),
            sender,
            auth_user: None,
            recipient: rcpt,
        }
    }

    #[test]
    fn ip_rate_allows_exactly_count_per_ip() {
        let l = Arc::new(InboundLimits::new(
            vec![rule(LimitKey::Ip, Some("3/m"), None)],
            1000,
        ));
        let t = 1_000_000;
        for ip in ["192.0.2.1", "192.0.2.2"] {
            let f = facts(ip, Some("a@x"), None);
            for _ in 0..3 {
                assert!(l.acquire(LimitStage::Mail, &f, t).is_ok());
            }
            let r = l.acquire(LimitStage::Mail, &f, t).expect_err("fourth");
            assert_eq!(r.reply.code, 451);
            assert_eq!(r.reply.status, "4.7.1");
            assert_eq!(r.retry_ms, 20_000);
            assert_eq!(r.key, ip);
        }
        // Connect is not counted by a message rate.
        let f = facts("192.0.2.1", None, None);
        assert!(l.acquire(LimitStage::Connect, &f, t).is_ok());
        // A token back after a third of a minute.
        let f = facts("192.0.2.1", Some("a@x"), None);
        assert!(l.acquire(LimitStage::Mail, &f, t + 19_999).is_err());
        assert!(l.acquire(LimitStage::Mail, &f, t + 20_000).is_ok());
    }

    #[test]
    fn network_rule_groups_addresses() {
        let l = Arc::new(InboundLimits::new(
            vec![rule(
                LimitKey::Network { v4: 24, v6: 64 },
                Some("2/h"),
                None,
            )],
            1000,
        ));
        let now = 5;
        assert!(l
            .acquire(LimitStage::Mail, &facts("198.51.100.1", None, None), now)
            .is_ok());
        assert!(l
            .acquire(LimitStage::Mail, &facts("198.51.100.200", None, None), now)
            .is_ok());
        let r = l
            .acquire(LimitStage::Mail, &facts("198.51.100.9", None, None), now)
            .expect_err("same /24");
        assert_eq!(r.key, "198.51.100.0");
        assert!(l
            .acquire(LimitStage::Mail, &facts("198.51.101.9", None, None), now)
            .is_ok());
        // IPv4-mapped IPv6 counts as the IPv4 address.
        assert!(l
            .acquire(
                LimitStage::Mail,
                &facts("::ffff:198.51.100.7", None, None),
                now
            )
            .is_err());
        for _ in 0..2 {
            assert!(l
                .acquire(LimitStage::Mail, &facts("2001:db8:1:2::1", None, None), now)
                .is_ok());
        }
        assert!(l
            .acquire(
                LimitStage::Mail,
                &facts("2001:db8:1:2:ffff::9", None, None),
                now
            )
            .is_err());
    }

    #[test]
    fn concurrency_is_held_until_the_permit_drops() {
        let l = Arc::new(InboundLimits::new(
            vec![rule(LimitKey::Ip, None, Some(2))],
            1000,
        ));
        let f = facts("192.0.2.9", None, None);
        let a = l.acquire(LimitStage::Connect, &f, 0).expect("1");
        let b = l.acquire(LimitStage::Connect, &f, 0).expect("2");
        let r = l.acquire(LimitStage::Connect, &f, 0).expect_err("3");
        assert_eq!(r.reply.code, 421);
        assert_eq!(r.reply.status, "4.7.0");
        drop(a);
        let c = l.acquire(LimitStage::Connect, &f, 0).expect("slot freed");
        drop((b, c));
        // MAIL does not count connections.
        assert!(l.acquire(LimitStage::Mail, &f, 0).is_ok());
    }

    #[test]
    fn refusal_takes_nothing_from_other_rules() {
        let l = Arc::new(InboundLimits::new(
            vec![
                rule(LimitKey::Ip, Some("10/m"), None),
                rule(LimitKey::SenderDomain, Some("1/m"), None),
            ],
            1000,
        ));
        let t = 0;
        assert!(l
            .acquire(
                LimitStage::Mail,
                &facts("192.0.2.1", Some("A@Example.ORG"), None),
                t
            )
            .is_ok());
        for _ in 0..20 {
            let r = l
                .acquire(
                    LimitStage::Mail,
                    &facts("192.0.2.1", Some("b@example.org"), None),
                    t,
                )
                .expect_err("domain spent");
            assert_eq!(r.rule, "sender_domain-rule");
            assert_eq!(r.key, "example.org");
        }
        // The IP's 10/m is untouched by the 20 refusals: 9 more for it.
        for n in 0..9 {
            assert!(
                l.acquire(
                    LimitStage::Mail,
                    &facts("192.0.2.1", Some(&format!("u@d{n}")), None),
                    t
                )
                .is_ok(),
                "{n}"
            );
        }
        assert!(l
            .acquire(
                LimitStage::Mail,
                &facts("192.0.2.1", Some("u@fresh"), None),
                t
            )
            .is_err());
    }

    #[test]
    fn recipient_and_auth_user_rules_apply_only_with_their_facts() {
        let mut auth = rule(LimitKey::AuthUser, Some("1/h"), None);
        auth.reply = Some(LimitReply {
            code: 450,
            status: "4.7.1".into(),
            text: "slow down".into(),
        });
        let l = Arc::new(InboundLimits::new(
            vec![rule(LimitKey::Recipient, Some("1/h"), None), auth],
            1000,
        ));
        let mut f = facts("192.0.2.1", Some("s@x"), Some("Boss@Example.com"));
        assert!(l.acquire(LimitStage::Rcpt, &f, 0).is_ok());
        f.recipient = Some("boss@example.com");
        assert!(l.acquire(LimitStage::Rcpt, &f, 0).is_err());
        // MAIL without authentication: the auth_user rule does not apply.
        for _ in 0..5 {
            assert!(l.acquire(LimitStage::Mail, &f, 0).is_ok());
        }
        f.auth_user = Some("alice");
        assert!(l.acquire(LimitStage::Mail, &f, 0).is_ok());
        let r = l.acquire(LimitStage::Mail, &f, 0).expect_err("alice");
        assert_eq!((r.reply.code, r.reply.text.as_str()), (450, "slow down"));
    }

    #[test]
    fn listener_scope() {
        let mut r = rule(LimitKey::Ip, Some("1/h"), None);
        r.listeners = vec!["mx".into()];
        let l = Arc::new(InboundLimits::new(vec![r], 1000));
        assert!(l.applies_to("mx") && !l.applies_to("submission"));
        let mut f = facts("192.0.2.1", None, None);
        f.listener = "submission";
        for _ in 0..3 {
            assert!(l.acquire(LimitStage::Mail, &f, 0).is_ok());
        }
        f.listener = "mx";
        assert!(l.acquire(LimitStage::Mail, &f, 0).is_ok());
        assert!(l.acquire(LimitStage::Mail, &f, 0).is_err());
    }

    #[test]
    fn table_is_bounded_and_idle_keys_make_room() {
        let l = Arc::new(InboundLimits::new(
            vec![rule(LimitKey::Ip, Some("1/s"), None)],
            SHARDS * 2,
        ));
        for n in 0..1000u32 {
            let ip = IpAddr::from(n.to_be_bytes());
            let f = LimitFacts {
                listener: "smtp",
                ip,
                sender: None,
                auth_user: None,
                recipient: None,
            };
            let _ = l.acquire(LimitStage::Mail, &f, 0);
            assert!(l.tracked() <= SHARDS * 2);
        }
        assert!(l.stats.untracked.load(Ordering::Relaxed) > 0);
        // A second later every key is idle (bucket full): a new one fits.
        let before = l.stats.untracked.load(Ordering::Relaxed);
        let f = facts("203.0.113.250", None, None);
        assert!(l.acquire(LimitStage::Mail, &f, 2_000).is_ok());
        assert!(l.acquire(LimitStage::Mail, &f, 2_000).is_err());
        assert_eq!(l.stats.untracked.load(Ordering::Relaxed), before);
    }

    /// Several threads racing on one key: exactly the bucket's count wins.
    #[test]
    fn exact_across_threads() {
        let l = Arc::new(InboundLimits::new(
            vec![
                rule(LimitKey::Ip, Some("500/h"), None),
                rule(LimitKey::Sender, Some("100000/h"), None),
            ],
            1000,
        ));
        let granted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..4 {
                let l = &l;
                let granted = &granted;
                s.spawn(move || {
                    for n in 0..1000 {
                        let sender = format!("s{t}-{n}@x");
                        let f = facts("192.0.2.77", Some(&sender), None);
                        if l.acquire(LimitStage::Mail, &f, 10).is_ok() {
                            granted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(granted.load(Ordering::Relaxed), 500);
    }
}
