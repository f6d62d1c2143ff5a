//! Auto-ban decisions (`[ban]`): an address that commits too many offences of
//! one kind within a window is banned for a while.
//!
//! Offences:
//! - `auth`: a failed AUTH (535).
//! - `relay`: a RCPT refused as a relay attempt (554 5.7.1 relay access denied).
//! - `scan`: a session that ends without a MAIL command accepted and without
//!   authenticating (probes, scanners, clients that only try commands).
//!
//! Thresholds are written like rates: "5/10m" bans at the 5th offence within
//! any 10 minutes (an exact sliding window: the offence times are kept, at
//! most the threshold's count of them per address and kind). Time is passed in.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;

use crate::throttle::Rate;
use crate::NetworkList;

/// Largest threshold count accepted (it bounds the times kept per address).
pub const MAX_THRESHOLD: u32 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Offence {
    Auth,
    Relay,
    Scan,
}

impl Offence {
    pub const ALL: [Offence; 3] = [Offence::Auth, Offence::Relay, Offence::Scan];

    pub fn as_str(self) -> &'static str {
        match self {
            Offence::Auth => "auth",
            Offence::Relay => "relay",
            Offence::Scan => "scan",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A ban decided here (the engine stores and enforces it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    pub reason: String,
    pub added_unix_ms: u64,
    pub until_unix_ms: u64,
}

impl Ban {
    pub fn active(&self, now_ms: u64) -> bool {
        now_ms < self.until_unix_ms
    }
}

#[derive(Debug, Clone)]
pub struct BanPolicy {
    /// Per offence kind (indexed by `Offence`): None is not counted.
    pub thresholds: [Option<Rate>; 3],
    pub duration_ms: u64,
    /// Never banned.
    pub exempt: NetworkList,
    /// Addresses tracked at most; beyond it new ones are not counted.
    pub max_tracked: usize,
}

#[derive(Debug, Default)]
struct Record {
    times: [VecDeque<u64>; 3],
    last_ms: u64,
}

/// Counts offences per address, all cores together.
#[derive(Debug)]
pub struct OffenceCounter {
    policy: BanPolicy,
    /// The longest window: a record untouched for it counts nothing.
    idle_ms: u64,
    records: Mutex<HashMap<IpAddr, Record>>,
}

impl OffenceCounter {
    pub fn new(policy: BanPolicy) -> OffenceCounter {
        let idle_ms = policy
            .thresholds
            .iter()
            .flatten()
            .map(|r| r.per_ms)
            .max()
            .unwrap_or(0);
        OffenceCounter {
            policy,
            idle_ms,
            records: Mutex::new(HashMap::new()),
        }
    }

    pub fn policy(&self) -> &BanPolicy {
        &self.policy
    }

    /// Whether this kind is counted at all.
    pub fn counts(&self, kind: Offence) -> bool {
        self.policy.thresholds[kind.index()].is_some()
    }

    /// Records an offence by `ip`; Some(ban) when it reaches the threshold
    /// (the address's counts start again from zero).
    pub fn offence(&self, ip: IpAddr, kind: Offence, now_ms: u64) -> Option<Ban> {
        let threshold = self.policy.thresholds[kind.index()]?;
        let ip = ip.to_canonical();
        if self.policy.exempt.contains(ip) {
            return None;
        }
        let mut records = self.records.lock().ok()?;
        if records.len() >= self.policy.max_tracked && !records.contains_key(&ip) {
            let idle = self.idle_ms;
            records.retain(|_, r| now_ms.saturating_sub(r.last_ms) < idle);
            if records.len() >= self.policy.max_tracked {
                return None;
            }
        }
        let record = records.entry(ip).or_default();
        record.last_ms = now_ms;
        let times = &mut record.times[kind.index()];
        while times
            .front()
            .is_some_and(|&t| t.saturating_add(threshold.per_ms) <= now_ms)
        {
            times.pop_front();
        }
        times.push_back(now_ms);
        if times.len() < threshold.count as usize {
            return None;
        }
        records.remove(&ip);
        Some(Ban {
            reason: format!(
                "{} {} within {}",
                threshold.count,
                match kind {
                    Offence::Auth => "failed authentications",
                    Offence::Relay => "relay attempts",
                    Offence::Scan => "sessions without mail",
                },
                humantime::format_duration(std::time::Duration::from_millis(threshold.per_ms))
            ),
            added_unix_ms: now_ms,
            until_unix_ms: now_ms.saturating_add(self.policy.duration_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(auth: &str, exempt: &[&str]) -> OffenceCounter {
        OffenceCounter::new(BanPolicy {
            thresholds: [
                Some(auth.parse().expect("rate")),
                None,
                Some("2/1m".parse().expect("rate")),
            ],
            duration_ms: 3_600_000,
            exempt: NetworkList::parse(exempt).expect("nets"),
            max_tracked: 4,
        })
    }

    #[test]
    fn bans_at_the_threshold_within_the_window() {
        let c = counter("3/10m", &[]);
        let ip: IpAddr = "192.0.2.5".parse().expect("ip");
        let t = 1_000_000;
        assert_eq!(c.offence(ip, Offence::Auth, t), None);
        assert_eq!(c.offence(ip, Offence::Auth, t + 1), None);
        let ban = c.offence(ip, Offence::Auth, t + 2).expect("third");
        assert_eq!(ban.until_unix_ms, t + 2 + 3_600_000);
        assert!(
            ban.reason.contains("3 failed authentications within 10m"),
            "{}",
            ban.reason
        );
        assert!(ban.active(t + 3) && !ban.active(t + 2 + 3_600_000));
        // Counting starts again.
        assert_eq!(c.offence(ip, Offence::Auth, t + 3), None);
    }

    #[test]
    fn old_offences_slide_out() {
        let c = counter("3/10m", &[]);
        let ip: IpAddr = "192.0.2.5".parse().expect("ip");
        assert_eq!(c.offence(ip, Offence::Auth, 0), None);
        assert_eq!(c.offence(ip, Offence::Auth, 300_000), None);
        // The first is out of the window at 600_000.
        assert_eq!(c.offence(ip, Offence::Auth, 600_000), None);
        assert!(c.offence(ip, Offence::Auth, 600_001).is_some());
    }

    #[test]
    fn kinds_counted_apart_unconfigured_and_exempt_ignored() {
        let c = counter("2/1m", &["10.0.0.0/8"]);
        let ip: IpAddr = "192.0.2.5".parse().expect("ip");
        assert_eq!(c.offence(ip, Offence::Auth, 0), None);
        assert_eq!(c.offence(ip, Offence::Scan, 0), None);
        for _ in 0..10 {
            assert_eq!(
                c.offence(ip, Offence::Relay, 0),
                None,
                "relay not configured"
            );
        }
        assert!(c.offence(ip, Offence::Scan, 1).is_some());
        let inside: IpAddr = "10.1.2.3".parse().expect("ip");
        for _ in 0..10 {
            assert_eq!(c.offence(inside, Offence::Auth, 0), None);
        }
        assert!(!c.counts(Offence::Relay) && c.counts(Offence::Auth));
    }

    #[test]
    fn tracked_addresses_are_bounded() {
        let c = counter("2/1m", &[]);
        for n in 0..4u8 {
            let ip = IpAddr::from([192, 0, 2, n]);
            assert_eq!(c.offence(ip, Offence::Auth, 0), None);
        }
        let fifth = IpAddr::from([192, 0, 2, 9]);
        for _ in 0..5 {
            assert_eq!(c.offence(fifth, Offence::Auth, 10), None, "table full");
        }
        // Once the others are idle, it is counted.
        assert_eq!(c.offence(fifth, Offence::Auth, 60_000), None);
        assert!(c.offence(fifth, Offence::Auth, 60_001).is_some());
    }
}
