//! Egress pools and IP warm-up, sans-IO.
//!
//! * `[pool.NAME]`: source addresses (each with an optional EHLO name and a
//!   weight) a `[[rule]]` can choose with `pool = "NAME"`. [`Picker::pick`]
//!   chooses one by smooth weighted round robin among the members the caller
//!   finds usable (not suspended, address available, under its warm-up
//!   budget), so the weights hold over any run of choices and a skipped
//!   member's share goes to the others.
//! * `[warmup.NAME]`: messages per day per address, growing by day since the
//!   member's `warmup_start`, optionally per provider. [`WarmupCounts`] counts
//!   what each member sent per day and scope (provider, or destination when
//!   no provider matches).
//!
//! Time (the Unix day) is always an argument.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use serde::Deserialize;

/// Most members in one pool (each is a source address on this host).
pub const MAX_MEMBERS: usize = 1024;
/// Most days in one warm-up schedule.
pub const MAX_SCHEDULE_DAYS: usize = 366;
/// Most (member, scope) counters kept at once; beyond it, counters of past
/// days are dropped first, then a new scope is refused (see [`WarmupCounts::charge`]).
pub const MAX_COUNTERS: usize = 100_000;
/// Milliseconds in a day.
const DAY_MS: u64 = 86_400_000;

/// A pool or warm-up setting that cannot be used; `key` is the dotted config key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct PoolError {
    pub key: String,
    pub reason: String,
}

/// `[warmup.NAME]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupConfig {
    /// Messages per day per address per provider (or destination): the first
    /// entry is day 1 (the member's `warmup_start`); after the last day there
    /// is no cap.
    pub schedule: Vec<u64>,
    /// Schedules for named providers (`[provider.NAME]`), replacing `schedule`.
    #[serde(default)]
    pub provider: BTreeMap<String, Vec<u64>>,
}

/// One `members` entry of `[pool.NAME]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    pub ip: String,
    pub ehlo_name: Option<String>,
    /// Relative share of connections; default 1; 0 keeps the member out.
    pub weight: Option<u32>,
    /// A `[warmup.NAME]` schedule this address follows.
    pub warmup: Option<String>,
    /// Day 1 of its schedule, "YYYY-MM-DD" (UTC); required with `warmup`.
    pub warmup_start: Option<String>,
}

/// `[pool.NAME]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub members: Vec<MemberConfig>,
    /// Connections per destination site from each member; 0 = the site's own limit.
    #[serde(default)]
    pub per_site_connections: usize,
}

/// A checked warm-up schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warmup {
    schedule: Vec<u64>,
    provider: BTreeMap<String, Vec<u64>>,
}

impl Warmup {
    /// The cap on `day` (1 = the start day; earlier days count as day 1) for
    /// a scope under `provider`; None once the schedule is over.
    pub fn cap(&self, day: u64, provider: Option<&str>) -> Option<u64> {
        let schedule = provider
            .and_then(|p| self.provider.get(p))
            .unwrap_or(&self.schedule);
        let index = usize::try_from(day.max(1) - 1).unwrap_or(usize::MAX);
        schedule.get(index).copied()
    }
}

/// A checked member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub ip: IpAddr,
    pub ehlo_name: Option<String>,
    pub weight: u32,
    /// Its schedule's name and its first day (Unix day number).
    pub warmup: Option<(String, u64)>,
}

/// A checked pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub members: Vec<Member>,
    pub per_site_connections: usize,
}

/// Every pool and warm-up schedule, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pools {
    pub pools: BTreeMap<String, Pool>,
    pub warmups: BTreeMap<String, Warmup>,
}

impl Pools {
    /// Checks `[pool.*]` and `[warmup.*]`.
    pub fn new(
        pools: &BTreeMap<String, PoolConfig>,
        warmups: &BTreeMap<String, WarmupConfig>,
    ) -> Result<Pools, PoolError> {
        let mut out = Pools::default();
        for (name, w) in warmups {
            let check = |key: String, s: &[u64]| {
                if s.is_empty() || s.len() > MAX_SCHEDULE_DAYS {
                    return Err(PoolError {
                        key,
                        reason: format!("needs 1 to {MAX_SCHEDULE_DAYS} daily counts"),
                    });
                }
                Ok(())
            };
            check(format!("warmup.{name}.schedule"), &w.schedule)?;
            for (p, s) in &w.provider {
                check(format!("warmup.{name}.provider.{p}"), s)?;
            }
            out.warmups.insert(
                name.clone(),
                Warmup {
                    schedule: w.schedule.clone(),
                    provider: w.provider.clone(),
                },
            );
        }
        for (name, p) in pools {
            let key = |i: usize, k: &str| format!("pool.{name}.members[{i}].{k}");
            if p.members.is_empty() || p.members.len() > MAX_MEMBERS {
                return Err(PoolError {
                    key: format!("pool.{name}.members"),
                    reason: format!("needs 1 to {MAX_MEMBERS} members"),
                });
            }
            let mut members = Vec::with_capacity(p.members.len());
            for (i, m) in p.members.iter().enumerate() {
                let ip: IpAddr = m.ip.trim().parse().map_err(|_| PoolError {
                    key: key(i, "ip"),
                    reason: format!("{:?} is not an IP address", m.ip),
                })?;
                if ip.is_unspecified() || ip.is_multicast() {
                    return Err(PoolError {
                        key: key(i, "ip"),
                        reason: format!("{ip} cannot be a local address to connect from"),
                    });
                }
                if members.iter().any(|o: &Member| o.ip == ip) {
                    return Err(PoolError {
                        key: key(i, "ip"),
                        reason: format!("{ip} is listed twice"),
                    });
                }
                if let Some(e) = &m.ehlo_name {
                    crate::relay::validate_domain(e).map_err(|reason| PoolError {
                        key: key(i, "ehlo_name"),
                        reason: format!("{e:?}: {reason}"),
                    })?;
                }
                let warmup = match (&m.warmup, &m.warmup_start) {
                    (None, None) => None,
                    (Some(w), Some(start)) => {
                        if !out.warmups.contains_key(w) {
                            return Err(PoolError {
                                key: key(i, "warmup"),
                                reason: format!("no [warmup.{w}] section"),
                            });
                        }
                        let day = parse_date(start).ok_or_else(|| PoolError {
                            key: key(i, "warmup_start"),
                            reason: format!("{start:?} is not a date (YYYY-MM-DD)"),
                        })?;
                        Some((w.clone(), day))
                    }
                    (Some(_), None) => {
                        return Err(PoolError {
                            key: key(i, "warmup_start"),
                            reason: "required with warmup".into(),
                        })
                    }
                    (None, Some(_)) => {
                        return Err(PoolError {
                            key: key(i, "warmup"),
                            reason: "warmup_start without a warmup schedule".into(),
                        })
                    }
                };
                members.push(Member {
                    ip,
                    ehlo_name: m.ehlo_name.clone(),
                    weight: m.weight.unwrap_or(1),
                    warmup,
                });
            }
            if members.iter().all(|m| m.weight == 0) {
                return Err(PoolError {
                    key: format!("pool.{name}.members"),
                    reason: "every member has weight 0".into(),
                });
            }
            out.pools.insert(
                name.clone(),
                Pool {
                    members,
                    per_site_connections: p.per_site_connections,
                },
            );
        }
        Ok(out)
    }

    /// The cap of `member` on Unix day `today` for a scope under `provider`;
    /// None = no cap (no warm-up, or its schedule is over).
    pub fn warmup_cap(&self, member: &Member, today: u64, provider: Option<&str>) -> Option<u64> {
        let (name, start) = member.warmup.as_ref()?;
        let day = today.saturating_sub(*start) + 1;
        self.warmups.get(name)?.cap(day, provider)
    }

    /// Whether any member follows a warm-up schedule.
    pub fn any_warmup(&self) -> bool {
        self.pools
            .values()
            .any(|p| p.members.iter().any(|m| m.warmup.is_some()))
    }
}

/// The Unix day of a time in milliseconds.
pub fn unix_day(unix_ms: u64) -> u64 {
    unix_ms / DAY_MS
}

/// "YYYY-MM-DD" → Unix day number (proleptic Gregorian, UTC).
pub fn parse_date(text: &str) -> Option<u64> {
    let mut parts = text.trim().splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let d: i64 = parts.next()?.parse().ok()?;
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) {
        return None;
    }
    // Days from civil (H. Hinnant's algorithm, written out).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    u64::try_from(era * 146_097 + doe - 719_468).ok()
}

fn days_in_month(y: i64, m: i64) -> i64 {
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    match m {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Smooth weighted round robin state, per pool.
#[derive(Debug, Default)]
pub struct Picker {
    current: HashMap<String, Vec<i64>>,
}

impl Picker {
    /// Picks a member of `pool` (named `name`) among those `usable` accepts;
    /// None when none is (or every usable one has weight 0).
    pub fn pick(
        &mut self,
        name: &str,
        pool: &Pool,
        mut usable: impl FnMut(&Member) -> bool,
    ) -> Option<usize> {
        let current = self
            .current
            .entry(name.to_string())
            .or_insert_with(|| vec![0; pool.members.len()]);
        current.resize(pool.members.len(), 0);
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, m) in pool.members.iter().enumerate() {
            if m.weight == 0 || !usable(m) {
                continue;
            }
            let w = i64::from(m.weight);
            current[i] += w;
            total += w;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        current[b] -= total;
        Some(b)
    }
}

/// Messages each warming member delivered today, per scope; stored as
/// `"IP|scope"` → (day, count). Besides, the messages dispatched and not yet
/// answered (reservations, memory only): the cap is checked against both, so
/// a burst cannot overshoot it, but only a delivery is counted — a deferred
/// or failed attempt gives its reservation back.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WarmupCounts {
    counts: HashMap<String, (u64, u64)>,
    /// `"IP|scope"` → (day, messages in flight).
    held: HashMap<String, (u64, u64)>,
}

/// The key of a member's counter for a scope.
pub fn counter_key(ip: IpAddr, scope: &str) -> String {
    format!("{ip}|{scope}")
}

impl WarmupCounts {
    /// What `key` sent on `day`.
    pub fn sent(&self, key: &str, day: u64) -> u64 {
        match self.counts.get(key) {
            Some((d, n)) if *d == day => *n,
            _ => 0,
        }
    }

    /// Delivered plus in flight for `key` on `day`: what the cap is checked against.
    pub fn used(&self, key: &str, day: u64) -> u64 {
        let held = match self.held.get(key) {
            Some((d, n)) if *d == day => *n,
            _ => 0,
        };
        self.sent(key, day) + held
    }

    /// Reserves one message for `key` on `day` (it is being dispatched).
    /// False when the table is full (the caller treats the member as over
    /// budget, which only defers).
    pub fn reserve(&mut self, key: &str, day: u64) -> bool {
        if !self.held.contains_key(key) && self.held.len() >= MAX_COUNTERS {
            self.held.retain(|_, (d, n)| *d >= day && *n > 0);
            if self.held.len() >= MAX_COUNTERS {
                return false;
            }
        }
        let entry = self.held.entry(key.to_string()).or_insert((day, 0));
        if entry.0 != day {
            *entry = (day, 0);
        }
        entry.1 += 1;
        true
    }

    /// The attempt a reservation of `key` was made for is over: the
    /// reservation is given back, and a delivery is counted on `day`
    /// (Some(new count), to be stored). A reservation of an earlier day was
    /// dropped with its day; the delivery still counts today.
    pub fn settle(&mut self, key: &str, day: u64, delivered: bool) -> Option<u64> {
        if let Some(entry) = self.held.get_mut(key) {
            if entry.0 == day {
                entry.1 = entry.1.saturating_sub(1);
            }
            if entry.1 == 0 || entry.0 != day {
                self.held.remove(key);
            }
        }
        if delivered {
            self.charge(key, day)
        } else {
            None
        }
    }

    /// Counts one message for `key` on `day`; the new count. When the table
    /// is full, counters of earlier days make room; if none can, the
    /// message is not counted and None is returned (the caller treats the
    /// member as over budget, which only defers).
    pub fn charge(&mut self, key: &str, day: u64) -> Option<u64> {
        if !self.counts.contains_key(key) && self.counts.len() >= MAX_COUNTERS {
            self.counts.retain(|_, (d, _)| *d >= day);
            if self.counts.len() >= MAX_COUNTERS {
                return None;
            }
        }
        let entry = self.counts.entry(key.to_string()).or_insert((day, 0));
        if entry.0 != day {
            *entry = (day, 0);
        }
        entry.1 += 1;
        Some(entry.1)
    }

    /// Restores a counter read back from storage.
    pub fn restore(&mut self, key: String, day: u64, count: u64) {
        if self.counts.len() < MAX_COUNTERS {
            self.counts.insert(key, (day, count));
        }
    }

    /// The stored form of a counter: "DAY:COUNT".
    pub fn encode(&self, key: &str) -> Option<String> {
        self.counts.get(key).map(|(d, n)| format!("{d}:{n}"))
    }
}

/// Reads a counter's stored form ("DAY:COUNT").
pub fn decode_counter(value: &str) -> Option<(u64, u64)> {
    let (d, n) = value.split_once(':')?;
    Some((d.parse().ok()?, n.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(text: &str) -> Result<Pools, PoolError> {
        #[derive(Deserialize)]
        struct Doc {
            #[serde(default)]
            pool: BTreeMap<String, PoolConfig>,
            #[serde(default)]
            warmup: BTreeMap<String, WarmupConfig>,
        }
        let doc: Doc = toml::from_str(text).expect("toml");
        Pools::new(&doc.pool, &doc.warmup)
    }

    #[test]
    fn dates_become_unix_days() {
        assert_eq!(parse_date("1970-01-01"), Some(0));
        assert_eq!(parse_date("2000-03-01"), Some(11_017));
        assert_eq!(parse_date("2026-12-06"), Some(20_793));
        assert_eq!(parse_date("2024-02-29"), Some(19_782));
        assert_eq!(parse_date("2023-02-29"), None);
        assert_eq!(parse_date("2026-13-01"), None);
        assert_eq!(parse_date("yesterday"), None);
        assert_eq!(unix_day(20_793 * DAY_MS + 5), 20_793);
    }

    #[test]
    fn weights_hold_and_skipped_members_shift_to_the_others() {
        let p =
            pools("[pool.p]\nmembers = [{ip = \"192.0.2.1\", weight = 3}, {ip = \"192.0.2.2\"}]\n")
                .expect("pools");
        let pool = &p.pools["p"];
        let mut picker = Picker::default();
        let mut counts = [0; 2];
        for _ in 0..400 {
            counts[picker.pick("p", pool, |_| true).expect("a member")] += 1;
        }
        assert_eq!(counts, [300, 100]);
        let first = pool.members[0].ip;
        for _ in 0..10 {
            assert_eq!(picker.pick("p", pool, |m| m.ip != first), Some(1));
        }
        assert_eq!(picker.pick("p", pool, |_| false), None);
    }

    #[test]
    fn warmup_caps_grow_by_day_and_per_provider() {
        let p = pools(
            "[warmup.w]\nschedule = [10, 20]\nprovider.gmail = [1]\n\
             [pool.p]\nmembers = [{ip = \"192.0.2.1\", warmup = \"w\", warmup_start = \"2026-12-06\"}, {ip = \"192.0.2.2\"}]\n",
        )
        .expect("pools");
        let m = &p.pools["p"].members;
        let start = 20_793;
        assert_eq!(p.warmup_cap(&m[0], start - 3, None), Some(10));
        assert_eq!(p.warmup_cap(&m[0], start, None), Some(10));
        assert_eq!(p.warmup_cap(&m[0], start + 1, None), Some(20));
        assert_eq!(p.warmup_cap(&m[0], start + 2, None), None);
        assert_eq!(p.warmup_cap(&m[0], start, Some("gmail")), Some(1));
        assert_eq!(p.warmup_cap(&m[0], start + 1, Some("gmail")), None);
        assert_eq!(p.warmup_cap(&m[0], start, Some("yahoo")), Some(10));
        assert_eq!(p.warmup_cap(&m[1], start, None), None);
        assert!(p.any_warmup());
    }

    #[test]
    fn counters_reset_daily_and_stay_bounded() {
        let mut c = WarmupCounts::default();
        assert_eq!(c.charge("a", 5), Some(1));
        assert_eq!(c.charge("a", 5), Some(2));
        assert_eq!(c.sent("a", 5), 2);
        assert_eq!(c.sent("a", 6), 0);
        assert_eq!(c.encode("a").as_deref(), Some("5:2"));
        assert_eq!(decode_counter("5:2"), Some((5, 2)));
        assert_eq!(c.charge("a", 6), Some(1));
        for i in 0..MAX_COUNTERS - 1 {
            c.restore(format!("old{i}"), 1, 1);
        }
        // Full: yesterday's counters make room for today's.
        assert_eq!(c.charge("new", 6), Some(1));
        assert!(c.counts.len() <= 2);
    }

    #[test]
    fn only_deliveries_count_and_reservations_hold_the_cap() {
        let mut c = WarmupCounts::default();
        // Two dispatched: both count against the cap while in flight.
        assert!(c.reserve("a", 5));
        assert!(c.reserve("a", 5));
        assert_eq!(c.used("a", 5), 2);
        assert_eq!(c.sent("a", 5), 0);
        // One deferred: its reservation is given back, nothing counted.
        assert_eq!(c.settle("a", 5, false), None);
        assert_eq!(c.used("a", 5), 1);
        // One delivered: counted (and stored by the caller).
        assert_eq!(c.settle("a", 5, true), Some(1));
        assert_eq!((c.used("a", 5), c.sent("a", 5)), (1, 1));
        assert!(c.held.is_empty());
        // A reservation of yesterday delivered today counts today.
        assert!(c.reserve("b", 5));
        assert_eq!(c.settle("b", 6, true), Some(1));
        assert_eq!(c.used("b", 6), 1);
        assert!(c.held.is_empty());
        // An extra settle never goes below zero.
        assert_eq!(c.settle("a", 5, false), None);
        assert_eq!(c.used("a", 5), 1);
    }

    #[test]
    fn bad_settings_name_their_key() {
        let e = |t: &str| pools(t).expect_err("bad").key;
        assert_eq!(e("[pool.p]\nmembers = []\n"), "pool.p.members");
        assert_eq!(
            e("[pool.p]\nmembers = [{ip = \"nope\"}]\n"),
            "pool.p.members[0].ip"
        );
        assert_eq!(
            e("[pool.p]\nmembers = [{ip = \"192.0.2.1\", warmup = \"x\", warmup_start = \"2026-01-01\"}]\n"),
            "pool.p.members[0].warmup"
        );
        assert_eq!(
            e("[warmup.x]\nschedule = [1]\n[pool.p]\nmembers = [{ip = \"192.0.2.1\", warmup = \"x\"}]\n"),
            "pool.p.members[0].warmup_start"
        );
        assert_eq!(e("[warmup.x]\nschedule = []\n"), "warmup.x.schedule");
        assert_eq!(
            e("[pool.p]\nmembers = [{ip = \"192.0.2.1\", weight = 0}]\n"),
            "pool.p.members"
        );
    }
}
