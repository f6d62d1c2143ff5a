//! Slows and stops password guessing over SMTP AUTH.
//!
//! Three layers, from `[auth]`: a delay before each 535 that grows with the
//! failures in the session, a cap on failures per connection, and a failure budget
//! per client IP shared by all connections and cores (a token bucket; an IP that
//! spent it gets 421 at AUTH, before any password is checked, until it refills).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use sluice_policy::{MultiLimiter, Rate};

use crate::config::AuthSection;

/// Client IPs tracked at most; beyond it, idle entries are dropped first and, if
/// the table is still full, new IPs are not tracked (their failures still count
/// per connection).
const MAX_TRACKED_IPS: usize = 65_536;
/// How often a full table may be swept for idle entries.
const SWEEP_INTERVAL_MS: u64 = 1_000;

struct IpEntry {
    limiter: MultiLimiter,
    /// AUTH refused until this time (unix ms): the budget is spent.
    blocked_until_ms: u64,
    last_failure_ms: u64,
}

pub struct AuthGuard {
    failure_delay: Duration,
    failure_delay_max: Duration,
    pub max_failures: usize,
    rates: Vec<Rate>,
    /// Time after which an untouched bucket is full again (the longest period).
    idle_ms: u64,
    per_ip: Mutex<HashMap<IpAddr, IpEntry>>,
    /// When a full table was last swept (unix ms).
    last_sweep_ms: AtomicU64,
}

impl std::fmt::Debug for AuthGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthGuard")
            .field("failure_delay", &self.failure_delay)
            .field("failure_delay_max", &self.failure_delay_max)
            .field("max_failures", &self.max_failures)
            .field("rates", &self.rates)
            .finish()
    }
}

impl AuthGuard {
    pub fn new(cfg: &AuthSection) -> AuthGuard {
        AuthGuard {
            failure_delay: cfg.failure_delay.0,
            failure_delay_max: cfg.failure_delay_max.0,
            // 0 would close before the first attempt could fail: treat it as 1.
            max_failures: cfg.max_failures.max(1),
            rates: cfg.failure_rate_per_ip.clone(),
            idle_ms: cfg
                .failure_rate_per_ip
                .iter()
                .map(|r| r.per_ms)
                .max()
                .unwrap_or(0),
            per_ip: Mutex::new(HashMap::new()),
            last_sweep_ms: AtomicU64::new(0),
        }
    }

    /// The wait before the reply to the `failures`-th failure of a session.
    pub fn delay(&self, failures: usize) -> Duration {
        let n = u32::try_from(failures).unwrap_or(u32::MAX);
        self.failure_delay
            .saturating_mul(n)
            .min(self.failure_delay_max)
    }

    /// This IP spent its failure budget: refuse AUTH without checking anything.
    pub fn blocked(&self, ip: IpAddr, now_ms: u64) -> bool {
        if self.rates.is_empty() {
            return false;
        }
        let Ok(map) = self.per_ip.lock() else {
            return false;
        };
        map.get(&ip).is_some_and(|e| now_ms < e.blocked_until_ms)
    }

    /// Counts a failure from `ip`; true when it went over the budget (the client
    /// is then blocked until a failure would fit again).
    pub fn failed(&self, ip: IpAddr, now_ms: u64) -> bool {
        if self.rates.is_empty() {
            return false;
        }
        let Ok(mut map) = self.per_ip.lock() else {
            return false;
        };
        if map.len() >= MAX_TRACKED_IPS && !map.contains_key(&ip) {
            // A full table is swept at most once per interval: otherwise every new
            // address in a spread-out guessing attack would scan it under the lock
            // all cores share.
            let last = self.last_sweep_ms.load(Ordering::Relaxed);
            if now_ms.saturating_sub(last) < SWEEP_INTERVAL_MS {
                return false;
            }
            self.last_sweep_ms.store(now_ms, Ordering::Relaxed);
            let idle = self.idle_ms;
            map.retain(|_, e| {
                now_ms < e.blocked_until_ms || now_ms.saturating_sub(e.last_failure_ms) < idle
            });
            if map.len() >= MAX_TRACKED_IPS {
                return false;
            }
        }
        let entry = map.entry(ip).or_insert_with(|| IpEntry {
            limiter: MultiLimiter::new(self.rates.clone()),
            blocked_until_ms: 0,
            last_failure_ms: now_ms,
        });
        entry.last_failure_ms = now_ms;
        match entry.limiter.try_acquire(now_ms) {
            Ok(()) => false,
            Err(wait_ms) => {
                entry.blocked_until_ms = now_ms.saturating_add(wait_ms.max(1));
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(rates: &[&str]) -> AuthGuard {
        let cfg = AuthSection {
            failure_delay: crate::config::HumanDuration(Duration::from_millis(300)),
            failure_delay_max: crate::config::HumanDuration(Duration::from_secs(1)),
            max_failures: 3,
            failure_rate_per_ip: rates.iter().map(|r| r.parse().expect("rate")).collect(),
            ..AuthSection::default()
        };
        AuthGuard::new(&cfg)
    }

    #[test]
    fn delay_grows_and_is_bounded() {
        let g = guard(&[]);
        assert_eq!(g.delay(0), Duration::ZERO);
        assert_eq!(g.delay(1), Duration::from_millis(300));
        assert_eq!(g.delay(3), Duration::from_millis(900));
        assert_eq!(g.delay(4), Duration::from_secs(1));
        assert_eq!(g.delay(usize::MAX), Duration::from_secs(1));
    }

    #[test]
    fn per_ip_budget_blocks_then_refills() {
        let g = guard(&["3/10s"]);
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let other: IpAddr = "192.0.2.8".parse().expect("ip");
        let t = 1_000_000;
        for _ in 0..3 {
            assert!(!g.failed(ip, t));
        }
        assert!(!g.blocked(ip, t));
        assert!(g.failed(ip, t), "the fourth failure is over 3/10s");
        assert!(g.blocked(ip, t));
        assert!(!g.blocked(other, t), "other clients are not affected");
        // One token back after a third of the period.
        assert!(g.blocked(ip, t + 3_000));
        assert!(!g.blocked(ip, t + 3_334));
    }

    #[test]
    fn no_rates_no_limit() {
        let g = guard(&[]);
        let ip: IpAddr = "::1".parse().expect("ip");
        for i in 0..1000 {
            assert!(!g.failed(ip, i));
        }
        assert!(!g.blocked(ip, 1000));
    }
}
