//! Delivery throttles, wired from `policy::throttle`:
//!
//! * [`SiteThrottle`]: `[destination.X] connection_rate` and `message_rate`, held by
//!   the core that owns the site, so they are exact across cores.
//! * [`HostTable`]: `[delivery] max_connections_per_host`. A host (MX host name or
//!   a route's host) may serve many sites, so sites cannot own it; instead every
//!   host hashes to one owner core that keeps this table and grants connection
//!   slots over the mesh. Exact across cores.
//! * [`SourceIpLimits`]: `[delivery] source_ip_rate` (and `[source_ip."IP"]
//!   message_rate`). Every source IP hashes to one owner core that keeps its
//!   limiter and grants message permits over the mesh. Exact across cores.
//! * [`per_core_rate`]: `[queue.X] message_rate`, enforced at dispatch by each
//!   shard owner with an even share of the rate, so the cores together never go
//!   above it.
//!
//! Everything here is plain data with the time passed in, so it is tested without
//! sleeping; the delivery engine turns a refusal into a timer wait.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use sluice_policy::{MultiLimiter, Rate};

use super::config::DestinationConfig;

/// Rate limits of one destination site.
#[derive(Debug, Clone)]
pub struct SiteThrottle {
    connections: MultiLimiter,
    messages: MultiLimiter,
}

impl SiteThrottle {
    pub fn new(dest: &DestinationConfig) -> SiteThrottle {
        SiteThrottle {
            connections: MultiLimiter::new(dest.connection_rate.clone()),
            messages: MultiLimiter::new(dest.message_rate.clone()),
        }
    }

    /// None: a new connection may be opened now (and is counted). Some: wait
    /// this long, then ask again.
    pub fn connection_wait(&mut self, now_ms: u64) -> Option<Duration> {
        self.connections
            .try_acquire(now_ms)
            .err()
            .map(Duration::from_millis)
    }

    /// None: one more message may be sent now (and is counted). Some: wait.
    pub fn message_wait(&mut self, now_ms: u64) -> Option<Duration> {
        self.messages
            .try_acquire(now_ms)
            .err()
            .map(Duration::from_millis)
    }
}

/// One core's share of a rate that all `cores` enforce independently: each gets
/// at most 1/cores of the burst and of the long-run rate, so together they stay
/// within `rate`. When the rate's count is below the number of cores each core
/// still needs a burst of one, so the combined burst can reach `cores` (the
/// long-run rate still holds).
pub fn per_core_rate(rate: Rate, cores: usize) -> Rate {
    let n = cores.max(1) as u128;
    if n == 1 {
        return rate;
    }
    let count = (u128::from(rate.count) / n).max(1);
    // count / per_ms == rate.count / (n * rate.per_ms), rounded towards slower.
    let per_ms = (count * n * u128::from(rate.per_ms)).div_ceil(u128::from(rate.count));
    Rate {
        count: count as u32,
        per_ms: u64::try_from(per_ms).unwrap_or(u64::MAX),
    }
}

/// Message rate limiters per source IP key, kept by the key's owner core.
#[derive(Debug, Default)]
pub struct SourceIpLimits {
    limiters: HashMap<String, MultiLimiter>,
}

impl SourceIpLimits {
    /// A message permit for `key`, limited by `rates` (fixed per key: the first
    /// request's rates build the limiter). None: granted now (and counted).
    /// Some: ask again after this long.
    pub fn permit(&mut self, key: &str, rates: &[Rate], now_ms: u64) -> Option<Duration> {
        if rates.is_empty() {
            return None;
        }
        if !self.limiters.contains_key(key) {
            self.limiters
                .insert(key.to_string(), MultiLimiter::new(rates.to_vec()));
        }
        self.limiters
            .get_mut(key)?
            .try_acquire(now_ms)
            .err()
            .map(|ms| Duration::from_millis(ms.max(1)))
    }
}

/// Who waits for a host slot: a mesh peer and its request number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    pub peer: usize,
    pub req: u64,
}

#[derive(Debug, Default)]
struct HostEntry {
    active: usize,
    waiting: VecDeque<Waiter>,
}

/// Connection slots per destination host, kept by the host's owner core.
/// Requests beyond the limit wait in arrival order.
#[derive(Debug)]
pub struct HostTable {
    max: usize,
    hosts: HashMap<String, HostEntry>,
}

impl HostTable {
    pub fn new(max: usize) -> HostTable {
        HostTable {
            max: max.max(1),
            hosts: HashMap::new(),
        }
    }

    /// True: the slot is granted now. False: `waiter` is queued and will be
    /// returned by a later [`HostTable::release`].
    pub fn acquire(&mut self, host: &str, waiter: Waiter) -> bool {
        let entry = self.hosts.entry(host.to_string()).or_default();
        if entry.active < self.max {
            entry.active += 1;
            true
        } else {
            entry.waiting.push_back(waiter);
            false
        }
    }

    /// A slot is given back. When someone waits, the slot passes to them (and
    /// they are returned, to be told); otherwise the count drops.
    pub fn release(&mut self, host: &str) -> Option<Waiter> {
        let entry = self.hosts.get_mut(host)?;
        if let Some(next) = entry.waiting.pop_front() {
            return Some(next);
        }
        entry.active = entry.active.saturating_sub(1);
        if entry.active == 0 {
            self.hosts.remove(host);
        }
        None
    }

    /// Slots held on `host`.
    pub fn active(&self, host: &str) -> usize {
        self.hosts.get(host).map_or(0, |e| e.active)
    }

    /// Requests waiting for `host`.
    pub fn waiting(&self, host: &str) -> usize {
        self.hosts.get(host).map_or(0, |e| e.waiting.len())
    }
}

/// Key of a destination host in the table: case-insensitive, no trailing dot.
pub fn host_key(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(s: &str) -> Rate {
        s.parse().expect("rate")
    }

    fn dest(toml_text: &str) -> DestinationConfig {
        toml::from_str(toml_text).expect("destination config")
    }

    #[test]
    fn destination_rates_parse_and_unknown_keys_fail() {
        let d = dest("connection_rate = [\"2/s\", \"3/m\"]\nmessage_rate = [\"5/s\"]\n");
        assert_eq!(d.connection_rate, vec![rate("2/s"), rate("3/m")]);
        assert_eq!(d.message_rate, vec![rate("5/s")]);
        assert_eq!(d.max_connections, 16);
        let err = toml::from_str::<DestinationConfig>("message_rate = [\"5/fortnight\"]\n")
            .expect_err("bad rate")
            .to_string();
        assert!(err.contains("5/fortnight"), "{err}");
        assert!(toml::from_str::<DestinationConfig>("connection_rates = []\n").is_err());
    }

    #[test]
    fn no_rates_never_wait() {
        let mut t = SiteThrottle::new(&DestinationConfig::default());
        for now in 0..10_000 {
            assert_eq!(t.connection_wait(now), None);
            assert_eq!(t.message_wait(now), None);
        }
    }

    #[test]
    fn connection_rate_delays_instead_of_refusing() {
        let mut t = SiteThrottle::new(&dest("connection_rate = [\"2/s\", \"3/m\"]\n"));
        let t0 = 1_700_000_000_000;
        assert_eq!(t.connection_wait(t0), None);
        assert_eq!(t.connection_wait(t0), None);
        // Burst of two used: the next one is 500ms away.
        assert_eq!(t.connection_wait(t0), Some(Duration::from_millis(500)));
        assert_eq!(t.connection_wait(t0 + 500), None);
        // Per-minute limit (3) now empty: 20s per token from the first use.
        assert_eq!(
            t.connection_wait(t0 + 1_000),
            Some(Duration::from_millis(19_000))
        );
        assert_eq!(t.connection_wait(t0 + 20_000), None);
        // Message limits are separate.
        assert_eq!(t.message_wait(t0 + 20_000), None);
    }

    #[test]
    fn message_rate_holds_over_a_simulated_stream() {
        // A connection task that sleeps exactly the wait it is told sends at the
        // rate and never above it.
        let mut t = SiteThrottle::new(&dest("message_rate = [\"10/s\"]\n"));
        let mut now = 5_000u64;
        let mut sent = Vec::new();
        while sent.len() < 1_000 {
            match t.message_wait(now) {
                None => sent.push(now),
                Some(w) => now += w.as_millis() as u64,
            }
        }
        for (i, &at) in sent.iter().enumerate() {
            // In any window [sent[j], at]: at most 10 + 10 * len / 1000.
            let first = sent[i.saturating_sub(20)];
            let in_window = sent[..=i].iter().filter(|&&s| s >= first).count() as u64;
            assert!(in_window <= 10 + 10 * (at - first) / 1_000, "at {at}");
        }
        // 1000 messages: burst 10, then 990 at 100ms each.
        assert_eq!(sent.last().copied(), Some(5_000 + 99_000));
    }

    #[test]
    fn per_core_rates_sum_to_at_most_the_rate() {
        for (text, cores) in [
            ("10/s", 1),
            ("10/s", 2),
            ("10/s", 3),
            ("7/m", 4),
            ("1/s", 2),
            ("1000/h", 6),
            ("3/10ms", 64),
        ] {
            let r = rate(text);
            let share = per_core_rate(r, cores);
            if cores == 1 {
                assert_eq!(share, r);
            }
            // Long-run: cores * share.count / share.per_ms <= r.count / r.per_ms.
            assert!(
                u128::from(share.count) * cores as u128 * u128::from(r.per_ms)
                    <= u128::from(r.count) * u128::from(share.per_ms),
                "{text} over {cores}: {share}"
            );
            // Greedy acquisition on every core at every step stays within the
            // token-bucket bound of the whole rate (plus the forced minimum burst).
            let mut limiters: Vec<MultiLimiter> =
                (0..cores).map(|_| MultiLimiter::new(vec![share])).collect();
            let horizon = 20 * r.per_ms;
            let step = (r.per_ms / 50).max(1);
            let mut got = 0u64;
            let mut now = 0;
            while now <= horizon {
                for l in &mut limiters {
                    while l.try_acquire(now).is_ok() {
                        got += 1;
                    }
                }
                now += step;
            }
            let extra_burst = (cores as u64).saturating_sub(u64::from(r.count));
            let bound = u64::from(r.count) + horizon * u64::from(r.count) / r.per_ms;
            assert!(
                got <= bound + extra_burst,
                "{text} over {cores}: {got} > {bound}"
            );
            // And not stingy: at least 80% of the rate gets through.
            assert!(
                got * 10 >= bound * 8,
                "{text} over {cores}: only {got} of {bound}"
            );
        }
    }

    #[test]
    fn host_slots_are_exact_and_fifo() {
        let mut t = HostTable::new(2);
        let w = |peer, req| Waiter { peer, req };
        assert!(t.acquire("mx.example", w(0, 1)));
        assert!(t.acquire("mx.example", w(1, 2)));
        assert!(!t.acquire("mx.example", w(1, 3)));
        assert!(!t.acquire("mx.example", w(0, 4)));
        // Other hosts are counted separately.
        assert!(t.acquire("mx2.example", w(0, 5)));
        assert_eq!((t.active("mx.example"), t.waiting("mx.example")), (2, 2));
        // A release hands the slot to the first waiter; the count stays at max.
        assert_eq!(t.release("mx.example"), Some(w(1, 3)));
        assert_eq!(t.active("mx.example"), 2);
        assert_eq!(t.release("mx.example"), Some(w(0, 4)));
        assert_eq!(t.release("mx.example"), None);
        assert_eq!(t.active("mx.example"), 1);
        assert_eq!(t.release("mx.example"), None);
        assert_eq!(t.active("mx.example"), 0);
        // Releasing an unknown host is harmless.
        assert_eq!(t.release("nowhere.example"), None);
        assert_eq!(t.active("mx2.example"), 1);
    }

    #[test]
    fn host_table_never_exceeds_max_under_random_traffic() {
        let mut t = HostTable::new(3);
        let mut seed = 0x1234_5678u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed >> 33
        };
        let hosts = ["a", "b"];
        let mut holding: Vec<(&str, u64)> = Vec::new();
        let mut waiting: Vec<(&str, u64)> = Vec::new();
        for req in 0..20_000u64 {
            let host = hosts[(rnd() % 2) as usize];
            if rnd() % 2 == 0 {
                if t.acquire(host, Waiter { peer: 0, req }) {
                    holding.push((host, req));
                } else {
                    waiting.push((host, req));
                }
            } else if let Some(pos) = holding.iter().position(|(h, _)| *h == host) {
                holding.remove(pos);
                if let Some(next) = t.release(host) {
                    let i = waiting
                        .iter()
                        .position(|(h, r)| *h == host && *r == next.req)
                        .expect("granted waiter was waiting");
                    // FIFO: the oldest waiter of that host.
                    assert!(waiting[..i].iter().all(|(h, _)| *h != host));
                    holding.push(waiting.remove(i));
                }
            }
            for h in hosts {
                let held = holding.iter().filter(|(x, _)| *x == h).count();
                assert_eq!(held, t.active(h));
                assert!(held <= 3);
            }
        }
    }

    fn delivery(text: &str) -> crate::delivery::config::DeliveryConfig {
        let cfg = crate::config::Config::load("test", text, &[]).expect("config");
        cfg.delivery_config()
    }

    #[test]
    fn source_ip_rates_come_from_the_global_key_or_an_override() {
        use crate::delivery::config::source_ip_key;
        let none = delivery("");
        assert!(none.source_ip_rate("default").is_empty());
        let c = delivery(
            "[delivery]\nsource_ip_rate = [\"2/s\", \"100/h\"]\n\
             [source_ip.\"127.0.0.9\"]\nmessage_rate = [\"5/m\"]\n\
             [source_ip.\"::0:1\"]\nmessage_rate = []\n",
        );
        assert_eq!(source_ip_key(None), "default");
        assert_eq!(c.source_ip_rate("default"), &[rate("2/s"), rate("100/h")]);
        assert_eq!(c.source_ip_rate("192.0.2.1"), &[rate("2/s"), rate("100/h")]);
        assert_eq!(c.source_ip_rate("127.0.0.9"), &[rate("5/m")]);
        // Another spelling of ::1; an empty override lifts the limit.
        let ip: std::net::IpAddr = "::1".parse().expect("ip");
        assert!(c.source_ip_rate(&source_ip_key(Some(ip))).is_empty());
        // Keys must be addresses or "default"; rates must parse.
        assert!(crate::config::Config::load("t", "[source_ip.example]\n", &[]).is_err());
        assert!(
            crate::config::Config::load("t", "[delivery]\nsource_ip_rate = [\"x\"]\n", &[])
                .is_err()
        );
        assert!(
            crate::config::Config::load("t", "[source_ip.default]\nmessage_rates = []\n", &[])
                .is_err()
        );
    }

    #[test]
    fn source_ip_permits_are_per_ip_and_delay() {
        let mut t = SourceIpLimits::default();
        let r = [rate("2/s")];
        let t0 = 1_700_000_000_000;
        assert_eq!(t.permit("default", &r, t0), None);
        assert_eq!(t.permit("default", &r, t0), None);
        assert_eq!(
            t.permit("default", &r, t0),
            Some(Duration::from_millis(500))
        );
        // Another IP has its own budget; no rates means no limit.
        assert_eq!(t.permit("192.0.2.1", &r, t0), None);
        for _ in 0..100 {
            assert_eq!(t.permit("192.0.2.2", &[], t0), None);
        }
        assert_eq!(
            t.permit("default", &r, t0 + 499),
            Some(Duration::from_millis(1))
        );
        assert_eq!(t.permit("default", &r, t0 + 500), None);
        assert_eq!(
            t.permit("default", &r, t0 + 500),
            Some(Duration::from_millis(500))
        );
    }

    #[test]
    fn source_ip_permits_hold_the_rate_for_many_requesters() {
        // Requesters (connections on any core) each ask, sleep what they are
        // told and ask again: the grants never exceed burst + rate * time.
        let mut t = SourceIpLimits::default();
        let r = [rate("10/s"), rate("50/m")];
        let mut next = [0u64; 7];
        let mut grants = Vec::new();
        while grants.len() < 200 {
            let (i, &now) = next
                .iter()
                .enumerate()
                .min_by_key(|(_, &n)| n)
                .expect("requesters");
            match t.permit("default", &r, now) {
                None => {
                    grants.push(now);
                    next[i] = now + 7;
                }
                Some(w) => next[i] = now + w.as_millis() as u64,
            }
        }
        for (i, &at) in grants.iter().enumerate() {
            let n = (i + 1) as u64;
            assert!(n <= 10 + at * 10 / 1_000, "{n} grants by {at}ms");
            assert!(n <= 50 + at * 50 / 60_000, "{n} grants by {at}ms");
        }
        // 200 grants at 50/min after a burst of 50: about 3 minutes.
        let last = *grants.last().expect("grants");
        assert!((179_000..=181_000).contains(&last), "{last}");
    }

    #[test]
    fn host_keys_fold_case_and_dot() {
        assert_eq!(host_key("MX1.Example.COM."), "mx1.example.com");
        assert_eq!(host_key("192.0.2.1"), "192.0.2.1");
    }
}
