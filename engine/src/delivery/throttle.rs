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
//! * Host rates (`[delivery] host_connection_rate`, `host_message_rate`, and
//!   `[host."NAME"]` overrides) use a [`SourceIpLimits`] table on the host's
//!   owner core, keyed by kind and host: the owner grants a permit per
//!   connection and per message, so these are exact across cores too.
//! * [`per_core_rate`]: `[queue.X] message_rate`, enforced at dispatch by each
//!   shard owner with an even share of the rate, so the cores together never go
//!   above it.
//! * [`QueueConcurrency`]: `[queue.X] concurrency`, jobs in flight per queue,
//!   enforced at dispatch by each shard owner with a share of
//!   [`per_core_share`] = ceil(limit / cores).
//!
//! Everything here is plain data with the time passed in, so it is tested without
//! sleeping; the delivery engine turns a refusal into a timer wait.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use sluice_policy::{MultiLimiter, Rate};

use super::config::DestinationConfig;

/// When a limiter last used at `last_ms` is full again (and so no different
/// from a new one): a bucket refills completely within its longest period.
fn refilled_at(limiter: &MultiLimiter, last_ms: u64) -> u64 {
    last_ms.saturating_add(limiter.rates().map(|r| r.per_ms).max().unwrap_or(0))
}

/// Rate limits of one destination site.
#[derive(Debug, Clone)]
pub struct SiteThrottle {
    connections: MultiLimiter,
    messages: MultiLimiter,
    /// Time of the last permit asked for.
    last_ms: u64,
}

impl SiteThrottle {
    pub fn new(dest: &DestinationConfig) -> SiteThrottle {
        SiteThrottle {
            connections: MultiLimiter::new(dest.connection_rate.clone()),
            messages: MultiLimiter::new(dest.message_rate.clone()),
            last_ms: 0,
        }
    }

    /// The destination's rates changed (a reload): in force from the next
    /// permit, what was spent kept (`MultiLimiter::retune`).
    pub fn retune(&mut self, dest: &DestinationConfig) {
        self.connections.retune(&dest.connection_rate);
        self.messages.retune(&dest.message_rate);
    }

    /// The destination's message rates (shared across the cluster when
    /// `cluster.shared_limits` is on).
    pub fn message_rates(&self) -> Vec<Rate> {
        self.messages.rates().collect()
    }

    /// From when forgetting this throttle loses nothing (both buckets full).
    pub fn forgettable_at(&self) -> u64 {
        refilled_at(&self.connections, self.last_ms).max(refilled_at(&self.messages, self.last_ms))
    }

    /// None: a new connection may be opened now (and is counted). Some: wait
    /// this long, then ask again.
    pub fn connection_wait(&mut self, now_ms: u64) -> Option<Duration> {
        self.last_ms = self.last_ms.max(now_ms);
        self.connections
            .try_acquire(now_ms)
            .err()
            .map(Duration::from_millis)
    }

    /// None: one more message may be sent now (and is counted). Some: wait.
    pub fn message_wait(&mut self, now_ms: u64) -> Option<Duration> {
        self.last_ms = self.last_ms.max(now_ms);
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

/// One core's share of a concurrency limit split over `cores`: ceil(limit /
/// cores), so each core can run at least one (0 stays "no limit").
pub fn per_core_share(limit: usize, cores: usize) -> usize {
    limit.div_ceil(cores.max(1))
}

/// Jobs in flight per virtual queue on one shard owner, and the messages held
/// back because their queue was full (woken as jobs finish).
#[derive(Debug)]
pub struct QueueConcurrency<T> {
    inflight: HashMap<String, usize>,
    held: HashMap<String, VecDeque<T>>,
}

impl<T> Default for QueueConcurrency<T> {
    fn default() -> Self {
        QueueConcurrency {
            inflight: HashMap::new(),
            held: HashMap::new(),
        }
    }
}

impl<T> QueueConcurrency<T> {
    /// May a message with `jobs` jobs of `queue` start under `limit` (0 = no
    /// limit)? True: its jobs are counted. A message with more jobs than the
    /// limit starts only when nothing of the queue is in flight.
    pub fn try_start(&mut self, queue: &str, limit: usize, jobs: usize) -> bool {
        if !self.fits(queue, limit, jobs) {
            return false;
        }
        self.start(queue, jobs);
        true
    }

    /// Whether [`QueueConcurrency::try_start`] would start it (nothing counted).
    pub fn fits(&self, queue: &str, limit: usize, jobs: usize) -> bool {
        let n = self.inflight(queue);
        limit == 0 || n == 0 || n + jobs <= limit
    }

    /// Counts `jobs` more jobs of `queue` in flight.
    pub fn start(&mut self, queue: &str, jobs: usize) {
        if jobs > 0 {
            *self.inflight.entry(queue.to_string()).or_default() += jobs;
        }
    }

    /// Keeps `item` until a job of `queue` finishes.
    pub fn hold(&mut self, queue: &str, item: T) {
        self.held
            .entry(queue.to_string())
            .or_default()
            .push_back(item);
    }

    /// One job of `queue` finished: the held items that may try again now
    /// (as many as there are free slots, at least one when the queue is idle).
    pub fn finish(&mut self, queue: &str, limit: usize) -> Vec<T> {
        let n = match self.inflight.get_mut(queue) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if n == 0 {
            self.inflight.remove(queue);
        }
        let free = if limit == 0 {
            usize::MAX
        } else {
            limit.saturating_sub(n).max(usize::from(n == 0))
        };
        let Some(held) = self.held.get_mut(queue) else {
            return Vec::new();
        };
        let take = free.min(held.len());
        let out: Vec<T> = held.drain(..take).collect();
        if held.is_empty() {
            self.held.remove(queue);
        }
        out
    }

    /// Jobs of `queue` in flight.
    pub fn inflight(&self, queue: &str) -> usize {
        self.inflight.get(queue).copied().unwrap_or(0)
    }

    /// Messages of `queue` held back.
    pub fn held(&self, queue: &str) -> usize {
        self.held.get(queue).map_or(0, VecDeque::len)
    }
}

/// Message rate limiters per source IP key, kept by the key's owner core. Also
/// used by host owners for host connection and message rates (keys
/// [`host_rate_key`]).
#[derive(Debug, Default)]
pub struct SourceIpLimits {
    /// Limiter and the time it was last asked.
    limiters: HashMap<String, (MultiLimiter, u64)>,
    /// Time of the last sweep for limiters that are full again.
    swept_ms: u64,
}

/// How often the limiter tables are swept for idle entries.
const SWEEP_MS: u64 = 60_000;

impl SourceIpLimits {
    /// A message permit for `key`, limited by `rates` (those in force now: a
    /// reload that changed them retunes the key's limiter, keeping what was
    /// spent). None: granted now (and counted). Some: ask again after this
    /// long.
    pub fn permit(&mut self, key: &str, rates: &[Rate], now_ms: u64) -> Option<Duration> {
        if rates.is_empty() {
            return None;
        }
        if now_ms >= self.swept_ms.saturating_add(SWEEP_MS) {
            self.evict_idle(now_ms);
        }
        if !self.limiters.contains_key(key) {
            self.limiters
                .insert(key.to_string(), (MultiLimiter::new(rates.to_vec()), now_ms));
        }
        let (limiter, last) = self.limiters.get_mut(key)?;
        *last = (*last).max(now_ms);
        limiter.retune(rates);
        limiter
            .try_acquire(now_ms)
            .err()
            .map(|ms| Duration::from_millis(ms.max(1)))
    }

    /// Drops the limiters that are full again (a new one would be the same),
    /// so addresses and hosts seen once do not stay forever.
    pub fn evict_idle(&mut self, now_ms: u64) {
        self.swept_ms = now_ms;
        self.limiters
            .retain(|_, (limiter, last)| refilled_at(limiter, *last) > now_ms);
    }

    /// Limiters held.
    pub fn len(&self) -> usize {
        self.limiters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiters.is_empty()
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
        self.acquire_max(host, self.max, waiter)
    }

    /// Like [`HostTable::acquire`] with this host's own limit (`[host."NAME"]
    /// max_connections`); 0 = no limit (still counted).
    pub fn acquire_max(&mut self, host: &str, max: usize, waiter: Waiter) -> bool {
        let max = if max == 0 { usize::MAX } else { max };
        let entry = self.hosts.entry(host.to_string()).or_default();
        if entry.active < max {
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

pub use crate::config::delivery::host_key;

/// What a host rate permit is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRate {
    Connection,
    Message,
}

/// Key of a host's rate limiter in the owner's [`SourceIpLimits`] table.
pub fn host_rate_key(kind: HostRate, host: &str) -> String {
    match kind {
        HostRate::Connection => format!("conn|{host}"),
        HostRate::Message => format!("msg|{host}"),
    }
}

/// Messages one connection may carry: the site's limit, lowered by the host's
/// (0 = no host limit).
pub fn messages_per_connection(site: usize, host: usize) -> usize {
    let site = site.max(1);
    if host == 0 {
        site
    } else {
        site.min(host)
    }
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

    fn delivery(text: &str) -> crate::config::delivery::DeliveryConfig {
        let cfg = crate::config::Config::load("test", text, &[]).expect("config");
        cfg.delivery_config()
    }

    #[test]
    fn source_ip_rates_come_from_the_global_key_or_an_override() {
        use crate::config::delivery::source_ip_key;
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
    fn permits_follow_a_reloaded_rate_without_a_fresh_burst() {
        let mut t = SourceIpLimits::default();
        let t0 = 1_000_000;
        for _ in 0..10 {
            assert_eq!(t.permit("host", &[rate("10/s")], t0), None);
        }
        // Lowered to 1/s: the spent bucket stays spent, the next permit
        // comes at the new pace.
        assert_eq!(
            t.permit("host", &[rate("1/s")], t0),
            Some(Duration::from_millis(1000))
        );
        assert_eq!(t.permit("host", &[rate("1/s")], t0 + 1000), None);
        assert!(t.permit("host", &[rate("1/s")], t0 + 1000).is_some());
        // Raised again: the next permit follows the higher rate.
        assert_eq!(t.permit("host", &[rate("100/s")], t0 + 1010), None);
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
    fn host_limits_come_from_delivery_or_a_host_override() {
        use crate::config::delivery::HostLimits;
        assert_eq!(
            delivery("").host_limits("mx.example"),
            HostLimits::default()
        );
        assert!(!HostLimits::default().gates_connections());
        let c = delivery(
            "[delivery]\nmax_connections_per_host = 3\n\
             host_connection_rate = [\"10/s\"]\nhost_message_rate = [\"2/s\", \"100/h\"]\n\
             host_max_messages_per_connection = 5\n\
             [host.\"MX1.Example.com.\"]\nmax_connections = 1\nmessage_rate = []\n\
             [host.\"::0:1\"]\nconnection_rate = [\"1/m\"]\nmax_messages_per_connection = 0\n",
        );
        let global = c.host_limits("mx2.example.com");
        assert_eq!(
            global,
            HostLimits {
                max_connections: 3,
                connection_rate: vec![rate("10/s")],
                message_rate: vec![rate("2/s"), rate("100/h")],
                max_messages_per_connection: 5,
            }
        );
        assert!(global.gates_connections());
        // Override by name (any case, trailing dot): unset keys stay global.
        let mx1 = c.host_limits("mx1.example.COM.");
        assert_eq!(mx1.max_connections, 1);
        assert!(mx1.message_rate.is_empty());
        assert_eq!(mx1.connection_rate, vec![rate("10/s")]);
        assert_eq!(mx1.max_messages_per_connection, 5);
        // Override by IP, written in another form.
        let lo = c.host_limits("::1");
        assert_eq!(lo.connection_rate, vec![rate("1/m")]);
        assert_eq!(lo.max_messages_per_connection, 0);
        assert_eq!(lo.max_connections, 3);
        // Unknown keys and bad rates fail.
        assert!(crate::config::Config::load("t", "[host.a]\nmessage_rates = []\n", &[]).is_err());
        assert!(
            crate::config::Config::load("t", "[delivery]\nhost_message_rate = [\"x\"]\n", &[])
                .is_err()
        );
    }

    #[test]
    fn host_messages_per_connection_take_the_smaller_limit() {
        assert_eq!(messages_per_connection(100, 0), 100);
        assert_eq!(messages_per_connection(100, 2), 2);
        assert_eq!(messages_per_connection(3, 10), 3);
        assert_eq!(messages_per_connection(0, 0), 1);
    }

    #[test]
    fn host_slots_follow_a_per_host_maximum() {
        let mut t = HostTable::new(1);
        let w = |req| Waiter { peer: 0, req };
        // 0 = no limit for that host (still counted).
        for req in 0..10 {
            assert!(t.acquire_max("free", 0, w(req)));
        }
        assert_eq!(t.active("free"), 10);
        assert!(t.acquire_max("two", 2, w(20)));
        assert!(t.acquire_max("two", 2, w(21)));
        assert!(!t.acquire_max("two", 2, w(22)));
        assert_eq!(t.release("two"), Some(w(22)));
        assert_eq!(t.active("two"), 2);
        // The table's own maximum for plain acquire.
        assert!(t.acquire("one", w(30)));
        assert!(!t.acquire("one", w(31)));
    }

    #[test]
    fn host_rates_are_per_host_and_kind_and_hold_for_many_requesters() {
        let mut t = SourceIpLimits::default();
        let r = [rate("2/s")];
        let t0 = 1_700_000_000_000u64;
        let (c, m) = (HostRate::Connection, HostRate::Message);
        let key = |k, h| host_rate_key(k, h);
        assert_eq!(t.permit(&key(m, "mx1"), &r, t0), None);
        assert_eq!(t.permit(&key(m, "mx1"), &r, t0), None);
        assert_eq!(
            t.permit(&key(m, "mx1"), &r, t0),
            Some(Duration::from_millis(500))
        );
        // Connections and other hosts are counted apart.
        assert_eq!(t.permit(&key(c, "mx1"), &r, t0), None);
        assert_eq!(t.permit(&key(m, "mx2"), &r, t0), None);
        // Six requesters (connections on any core, to any site sharing the
        // host) sleeping what they are told: 6 messages span >= 2 s.
        let mut t = SourceIpLimits::default();
        let mut next = [t0; 6];
        let mut grants = Vec::new();
        while grants.len() < 6 {
            let (i, &now) = next
                .iter()
                .enumerate()
                .min_by_key(|(_, &n)| n)
                .expect("requesters");
            match t.permit(&key(m, "mx"), &r, now) {
                None => {
                    grants.push(now);
                    next[i] = u64::MAX;
                }
                Some(w) => next[i] = now + w.as_millis() as u64,
            }
        }
        assert_eq!(grants.last().copied(), Some(t0 + 2_000));
    }

    #[test]
    fn queue_concurrency_holds_and_wakes() {
        assert_eq!(per_core_share(0, 4), 0);
        assert_eq!(per_core_share(1, 2), 1);
        assert_eq!(per_core_share(5, 2), 3);
        assert_eq!(per_core_share(8, 4), 2);
        assert_eq!(per_core_share(3, 1), 3);
        let mut q: QueueConcurrency<u32> = QueueConcurrency::default();
        // No limit: always starts.
        assert!(q.try_start("open", 0, 100));
        assert!(q.try_start("q", 2, 1));
        assert!(q.try_start("q", 2, 1));
        assert!(!q.try_start("q", 2, 1));
        q.hold("q", 1);
        q.hold("q", 2);
        q.hold("q", 3);
        assert_eq!((q.inflight("q"), q.held("q")), (2, 3));
        // Other queues are apart.
        assert!(q.try_start("other", 1, 1));
        // One job finishes: one slot, one message may try again.
        assert_eq!(q.finish("q", 2), vec![1]);
        assert!(q.try_start("q", 2, 1));
        assert!(!q.fits("q", 2, 1));
        assert_eq!(q.finish("q", 2), vec![2]);
        assert_eq!(q.finish("q", 2), vec![3]);
        assert_eq!((q.inflight("q"), q.held("q")), (0, 0));
        // A message with more jobs than the limit goes out alone.
        assert!(q.try_start("q", 2, 3));
        assert!(!q.try_start("q", 2, 1));
        q.hold("q", 4);
        assert_eq!(q.finish("q", 2), Vec::<u32>::new());
        assert_eq!(q.finish("q", 2), vec![4]);
        assert_eq!(q.finish("q", 2), Vec::<u32>::new());
        assert_eq!(q.inflight("q"), 0);
    }

    #[test]
    fn queue_concurrency_is_never_exceeded_in_a_simulation() {
        let mut q: QueueConcurrency<u64> = QueueConcurrency::default();
        let limit = 3;
        let mut running: Vec<u64> = Vec::new();
        let mut ready: Vec<u64> = (0..200).collect();
        let mut done = 0;
        let mut seed = 7u64;
        while done < 200 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            if !ready.is_empty() && seed >> 63 == 0 {
                let id = ready.remove(0);
                if q.try_start("q", limit, 1) {
                    running.push(id);
                } else {
                    q.hold("q", id);
                }
            } else if !running.is_empty() {
                running.remove((seed >> 40) as usize % running.len());
                done += 1;
                ready.extend(q.finish("q", limit));
            } else if ready.is_empty() {
                panic!("stuck: {} held", q.held("q"));
            }
            assert!(running.len() <= limit);
            assert_eq!(q.inflight("q"), running.len());
        }
    }

    #[test]
    fn host_keys_fold_case_and_dot() {
        assert_eq!(host_key("MX1.Example.COM."), "mx1.example.com");
        assert_eq!(host_key("192.0.2.1"), "192.0.2.1");
    }

    #[test]
    fn idle_limiters_are_evicted_once_full_again() {
        let mut t = SourceIpLimits::default();
        let r = [rate("2/m")];
        let t0 = 1_000_000;
        for i in 0..100 {
            assert_eq!(t.permit(&format!("192.0.2.{i}"), &r, t0), None);
        }
        assert_eq!(t.len(), 100);
        // Used up: a key still limited is kept through a sweep.
        assert_eq!(t.permit("busy", &r, t0), None);
        assert_eq!(t.permit("busy", &r, t0), None);
        assert!(t.permit("busy", &r, t0 + 29_000).is_some());
        t.evict_idle(t0 + 59_999);
        assert_eq!(t.len(), 101, "nothing is full yet");
        // A minute after their last use the one-off keys are full again: gone.
        t.evict_idle(t0 + 60_000);
        assert_eq!(t.len(), 1, "only the key still limited is left");
        // A permit a sweep interval later sweeps without an explicit call.
        assert_eq!(t.permit("late", &r, t0 + 60_000 + SWEEP_MS), None);
        assert_eq!(t.len(), 1, "only the key just asked for is left");
        // Forgetting a full limiter changed nothing: the rate still holds.
        let mut fresh = SourceIpLimits::default();
        let now = t0 + 200_000;
        assert_eq!(t.permit("busy", &r, now), fresh.permit("busy", &r, now));
    }

    #[test]
    fn a_site_throttle_is_forgettable_after_its_longest_period() {
        let d = dest("connection_rate = [\"1/s\"]\nmessage_rate = [\"10/m\", \"100/h\"]\n");
        let mut t = SiteThrottle::new(&d);
        assert_eq!(t.message_wait(5_000), None);
        assert_eq!(t.forgettable_at(), 5_000 + 3_600_000);
        let none = SiteThrottle::new(&DestinationConfig::default());
        assert_eq!(none.forgettable_at(), 0, "no rates: nothing to remember");
    }
}
