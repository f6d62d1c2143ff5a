//! Virtual queue quotas (`[queue.X] max_messages`, `max_bytes`).
//!
//! The queue of a message is decided by the `[[rule]]` set (first match) for its
//! first recipient, when the SMTP session accepts that recipient; the session
//! checks the queue's quota at RCPT and DATA (declared SIZE) and again at the end
//! of data (real size), answering `452 4.3.1` when it is full.
//!
//! Counting: each core keeps its own counters (messages, bytes) per queue, in
//! cache-line-sized slots so cores never write the same line. The shard owner
//! adds a message when it is stored (SMTP or DSN) or recovered and subtracts it
//! when it leaves the spool; a quota check sums the slots of all cores. The sum is
//! read without a lock while other cores are storing, and several sessions may
//! pass the check at the same moment, so the quota is soft: it can be overshot
//! by the messages in flight at once (at most one per concurrent session), never
//! by more.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use sluice_policy::{MessageFacts, RuleSet, DEFAULT_QUEUE};

use crate::config::delivery::QueueConfig;

#[repr(align(64))]
#[derive(Debug, Default)]
struct Slot {
    messages: AtomicI64,
    bytes: AtomicI64,
}

/// Messages and bytes queued per virtual queue, counted per core.
#[derive(Debug)]
pub struct QueueStats {
    index: HashMap<String, usize>,
    names: Vec<String>,
    cores: usize,
    /// `queue * cores + core`.
    slots: Box<[Slot]>,
}

impl QueueStats {
    /// Counters for `queues` (the "default" queue is always there) on `cores`.
    pub fn new<'a>(queues: impl IntoIterator<Item = &'a str>, cores: usize) -> QueueStats {
        let mut names = vec![DEFAULT_QUEUE.to_string()];
        for q in queues {
            if !names.iter().any(|n| n == q) {
                names.push(q.to_string());
            }
        }
        let cores = cores.max(1);
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        let slots = (0..names.len() * cores).map(|_| Slot::default()).collect();
        QueueStats {
            index,
            names,
            cores,
            slots,
        }
    }

    /// Position of `queue` in [`QueueStats::queues`]; a queue no longer
    /// configured (a message from an older config) counts as "default", the first.
    pub fn queue_index(&self, queue: &str) -> usize {
        self.index.get(queue).copied().unwrap_or(0)
    }

    fn slot(&self, core: usize, queue: &str) -> &Slot {
        &self.slots[self.queue_index(queue) * self.cores + core % self.cores]
    }

    /// A message of `bytes` entered `queue` on `core`.
    pub fn add(&self, core: usize, queue: &str, bytes: u64) {
        let s = self.slot(core, queue);
        s.messages.fetch_add(1, Ordering::Relaxed);
        s.bytes
            .fetch_add(i64::try_from(bytes).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// A message of `bytes` left `queue` (called by the core that added it).
    pub fn remove(&self, core: usize, queue: &str, bytes: u64) {
        let s = self.slot(core, queue);
        s.messages.fetch_sub(1, Ordering::Relaxed);
        s.bytes
            .fetch_sub(i64::try_from(bytes).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// (messages, bytes) in `queue`, all cores together.
    pub fn usage(&self, queue: &str) -> (u64, u64) {
        let q = self.queue_index(queue);
        let (mut messages, mut bytes) = (0i64, 0i64);
        for s in &self.slots[q * self.cores..(q + 1) * self.cores] {
            messages = messages.saturating_add(s.messages.load(Ordering::Relaxed));
            bytes = bytes.saturating_add(s.bytes.load(Ordering::Relaxed));
        }
        (messages.max(0) as u64, bytes.max(0) as u64)
    }

    /// Queue names known to the counters ("default" first).
    pub fn queues(&self) -> &[String] {
        &self.names
    }
}

impl crate::metrics::QueueDepth for QueueStats {
    fn queues(&self) -> &[String] {
        QueueStats::queues(self)
    }
    fn queue_index(&self, queue: &str) -> usize {
        QueueStats::queue_index(self, queue)
    }
    fn usage(&self, queue: &str) -> (u64, u64) {
        QueueStats::usage(self, queue)
    }
}

/// Why a queue refuses a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaExceeded {
    #[error("queue {queue} holds {used} of at most {max} messages")]
    Messages { queue: String, used: u64, max: u64 },
    #[error("queue {queue} holds {used} bytes of at most {max}")]
    Bytes { queue: String, used: u64, max: u64 },
}

/// What the SMTP session asks at RCPT and DATA: which queue, and is there room.
/// Shared by all listeners and cores.
#[derive(Debug)]
pub struct QueueAdmission {
    /// Shared with delivery (routes) and replaced by a reload.
    rules: Arc<ArcSwap<RuleSet>>,
    /// (max_messages, max_bytes) per queue with a quota; 0 = unlimited.
    limits: HashMap<String, (u64, u64)>,
    pub stats: Arc<QueueStats>,
    /// `[tenant.*]` and `[tenants]` (no tenants: no tenant checks at all);
    /// a reload stores new ones here.
    tenants: ArcSwap<TenantPolicy>,
    /// Each rate-limited tenant's message rate, for all cores together
    /// (retuned to the rates in force when next used, keeping what it spent).
    tenant_rates: std::sync::Mutex<HashMap<String, sluice_policy::MultiLimiter>>,
}

/// What the end of data needs to find a message's tenant.
#[derive(Debug, Clone, Default)]
pub struct TenantPolicy {
    pub tenants: BTreeMap<String, sluice_policy::tenant::TenantConfig>,
    pub source: sluice_policy::tenant::TenantsConfig,
}

impl TenantPolicy {
    /// The header field naming the tenant, when tenants and one are configured.
    pub fn header(&self) -> Option<&str> {
        if self.tenants.is_empty() {
            return None;
        }
        self.source.header()
    }

    /// The header field is removed from the message once read.
    pub fn strip_header(&self) -> bool {
        self.source.strip_header
    }
}

/// A tenant over its `message_rate`: the name and the wait in ms.
#[derive(Debug)]
pub struct TenantOverRate {
    pub tenant: String,
    pub wait_ms: u64,
}

impl QueueAdmission {
    pub fn new(
        rules: Arc<RuleSet>,
        queues: &BTreeMap<String, QueueConfig>,
        stats: Arc<QueueStats>,
    ) -> QueueAdmission {
        let limits = queues
            .iter()
            .filter(|(_, q)| q.max_messages > 0 || q.max_bytes.0 > 0)
            .map(|(name, q)| (name.clone(), (q.max_messages, q.max_bytes.0)))
            .collect();
        QueueAdmission {
            rules: Arc::new(ArcSwap::new(rules)),
            limits,
            stats,
            tenants: ArcSwap::from_pointee(TenantPolicy::default()),
            tenant_rates: std::sync::Mutex::default(),
        }
    }

    /// With `[tenant.*]` rate limits checked at the end of data.
    pub fn with_tenants(self, policy: TenantPolicy) -> QueueAdmission {
        self.tenants.store(Arc::new(policy));
        self
    }

    /// Puts reloaded `[tenant.*]` and `[tenants]` in force: the next end of
    /// data uses them. Limiters of tenants no longer configured are dropped;
    /// the others keep what they spent.
    pub fn set_tenants(&self, policy: TenantPolicy) {
        self.tenant_rates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|name, _| policy.tenants.contains_key(name));
        self.tenants.store(Arc::new(policy));
    }

    /// The tenants in force (the session asks it for the header to read).
    pub fn tenant_policy(&self) -> arc_swap::Guard<Arc<TenantPolicy>> {
        self.tenants.load()
    }

    /// Counts a message of the tenant `recipient` (the first) gives it
    /// against the tenant's `message_rate`; Err when over it. Ok(None)
    /// without a tenant. `header` is the value of the `[tenants] header`
    /// field, when it is configured and the client is trusted with it.
    pub fn tenant_permit(
        &self,
        facts: &MessageFacts<'_>,
        recipient: &str,
        header: Option<&str>,
        now: u64,
    ) -> Result<Option<String>, TenantOverRate> {
        let policy = self.tenants.load();
        if policy.tenants.is_empty() {
            return Ok(None);
        }
        let rules = self.rules.load();
        let decision = rules.evaluate(facts, recipient, None);
        let named = sluice_policy::tenant::from_header(header, &policy.tenants, &policy.source);
        let Some(tenant) = sluice_policy::tenant::tenant_of(
            decision.tenant.as_deref(),
            named.as_deref(),
            facts.auth_user,
            &policy.tenants,
        ) else {
            return Ok(None);
        };
        let rates = policy
            .tenants
            .get(&tenant)
            .map(|t| t.message_rate.as_slice())
            .unwrap_or_default();
        if rates.is_empty() {
            crate::metrics::tenant_count(&tenant, "accepted");
            return Ok(Some(tenant));
        }
        let verdict = {
            let mut limiters = self
                .tenant_rates
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let limiter = limiters
                .entry(tenant.clone())
                .or_insert_with(|| sluice_policy::MultiLimiter::new(rates.to_vec()));
            // A reload may have changed the rates: they apply from now on.
            limiter.retune(rates);
            limiter.try_acquire(now)
        };
        match verdict {
            Ok(()) => {
                crate::metrics::tenant_count(&tenant, "accepted");
                Ok(Some(tenant))
            }
            Err(wait_ms) => {
                crate::metrics::tenant_count(&tenant, "rate_limited");
                Err(TenantOverRate { tenant, wait_ms })
            }
        }
    }

    /// The rule set in force; a reload stores a new one here.
    pub fn rules(&self) -> &Arc<ArcSwap<RuleSet>> {
        &self.rules
    }

    /// The queue the rules give `recipient` of this message.
    pub fn queue_for(&self, facts: &MessageFacts<'_>, recipient: &str) -> String {
        self.rules
            .load()
            .evaluate(facts, recipient, None)
            .queue
            .clone()
    }

    /// Whether `queue` can take one more message of `bytes` (0 when unknown yet).
    pub fn check(&self, queue: &str, bytes: u64) -> Result<(), QuotaExceeded> {
        let Some(&(max_messages, max_bytes)) = self.limits.get(queue) else {
            return Ok(());
        };
        let (messages, used) = self.stats.usage(queue);
        if max_messages > 0 && messages >= max_messages {
            crate::metrics::throttled(crate::metrics::Throttle::QueueQuota);
            return Err(QuotaExceeded::Messages {
                queue: queue.to_string(),
                used: messages,
                max: max_messages,
            });
        }
        if max_bytes > 0 && used.saturating_add(bytes) > max_bytes {
            crate::metrics::throttled(crate::metrics::Throttle::QueueQuota);
            return Err(QuotaExceeded::Bytes {
                queue: queue.to_string(),
                used,
                max: max_bytes,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteSize;

    fn facts() -> MessageFacts<'static> {
        MessageFacts {
            listener: "smtp",
            client_ip: "192.0.2.1".parse().ok(),
            auth_user: None,
            sender: "a@example.org",
            priority: 0,
            size: 0,
        }
    }

    fn admission(rules: &str, queues: &[(&str, u64, u64)], cores: usize) -> QueueAdmission {
        #[derive(serde::Deserialize)]
        struct Doc {
            #[serde(default)]
            rule: Vec<sluice_policy::RuleConfig>,
        }
        let doc: Doc = toml::from_str(rules).expect("rules");
        let mut cfg = BTreeMap::new();
        for (name, msgs, bytes) in queues {
            cfg.insert(
                name.to_string(),
                QueueConfig {
                    max_messages: *msgs,
                    max_bytes: ByteSize(*bytes),
                    ..QueueConfig::default()
                },
            );
        }
        let names: Vec<&str> = cfg.keys().map(String::as_str).collect();
        let set = RuleSet::new(&doc.rule, &names, &[]).expect("rule set");
        let stats = Arc::new(QueueStats::new(names.iter().copied(), cores));
        QueueAdmission::new(Arc::new(set), &cfg, stats)
    }

    #[test]
    fn counters_sum_over_cores() {
        let s = QueueStats::new(["bulk"], 3);
        assert_eq!(s.queues(), ["default", "bulk"]);
        s.add(0, "bulk", 100);
        s.add(1, "bulk", 50);
        s.add(2, "default", 7);
        // Core numbers beyond the count wrap (leftover shards).
        s.add(5, "bulk", 1);
        assert_eq!(s.usage("bulk"), (3, 151));
        assert_eq!(s.usage("default"), (1, 7));
        // An unknown queue counts as default.
        s.add(1, "gone", 3);
        assert_eq!(s.usage("default"), (2, 10));
        assert_eq!(s.usage("gone"), (2, 10));
        s.remove(0, "bulk", 100);
        s.remove(1, "bulk", 50);
        s.remove(2, "bulk", 1);
        assert_eq!(s.usage("bulk"), (0, 0));
    }

    #[test]
    fn counters_from_many_threads() {
        let s = Arc::new(QueueStats::new(["q"], 4));
        let threads: Vec<_> = (0..4)
            .map(|core| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        s.add(core, "q", 10);
                        if i % 2 == 0 {
                            s.remove(core, "q", 10);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(s.usage("q"), (20_000, 200_000));
    }

    #[test]
    fn rules_choose_the_queue() {
        let a = admission(
            "[[rule]]\nmatch.recipient_domain = \"gmail.com\"\nqueue = \"gmail\"\n\n\
             [[rule]]\nmatch.size_min = \"1MiB\"\nqueue = \"bulk\"\n",
            &[("gmail", 0, 0), ("bulk", 0, 0)],
            1,
        );
        let f = facts();
        assert_eq!(a.queue_for(&f, "x@gmail.com"), "gmail");
        assert_eq!(a.queue_for(&f, "x@example.net"), "default");
        let big = MessageFacts { size: 2 << 20, ..f };
        assert_eq!(a.queue_for(&big, "x@example.net"), "bulk");
        assert_eq!(a.queue_for(&big, "x@GMAIL.com"), "gmail");
    }

    #[test]
    fn quotas_refuse_when_full() {
        let a = admission("", &[("default", 2, 1000), ("open", 0, 0)], 2);
        assert_eq!(a.check("default", 0), Ok(()));
        a.stats.add(0, "default", 400);
        assert_eq!(a.check("default", 600), Ok(()));
        assert_eq!(
            a.check("default", 601),
            Err(QuotaExceeded::Bytes {
                queue: "default".into(),
                used: 400,
                max: 1000
            })
        );
        a.stats.add(1, "default", 100);
        let err = a.check("default", 0).expect_err("two messages");
        assert!(err.to_string().contains("2 of at most 2"), "{err}");
        // Room again once a message leaves.
        a.stats.remove(1, "default", 100);
        assert_eq!(a.check("default", 0), Ok(()));
        // Queues without a quota are never full.
        for _ in 0..100 {
            a.stats.add(0, "open", 1 << 30);
        }
        assert_eq!(a.check("open", 1 << 30), Ok(()));
        assert_eq!(a.check("not-configured", 1 << 40), Ok(()));
    }
}
