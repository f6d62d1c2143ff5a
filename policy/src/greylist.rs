//! Greylisting decisions (issue 14 item 7), sans-IO with the time passed in.
//! A triplet (client network, sender, recipient) seen for the first time is
//! deferred (451 4.7.1); a retry after `delay` and before `expire` passes,
//! and the triplet is then remembered for `pass_ttl` (renewed as mail keeps
//! passing). The engine keeps the entries in an LMDB table in the spool;
//! this module says what to store and how it is encoded.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::lists::Lists;
use crate::NetworkList;

/// Timings and keying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GreylistPolicy {
    /// A retry sooner than this after the first attempt is deferred again.
    pub delay_ms: u64,
    /// A first attempt not retried within this is forgotten.
    pub expire_ms: u64,
    /// How long a triplet that passed keeps passing.
    pub pass_ttl_ms: u64,
    /// Clients are keyed by network: /24 and /64 by default, since large
    /// senders retry from another address of the same pool.
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
}

/// What the table holds for a triplet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Deferred; first seen then.
    Pending { first_ms: u64 },
    /// Passed; keeps passing until then.
    Passed { until_ms: u64 },
}

/// The answer for one RCPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// 451 4.7.1; the retry passes from `retry_after_ms` on.
    Defer {
        retry_after_ms: u64,
    },
}

/// Longest sender and recipient parts of a key: LMDB keys stop at 511
/// bytes. Longer addresses are cut (two that differ only past 200 bytes
/// share an entry).
const MAX_PART: usize = 200;

/// A renewal of a passed entry is written at most this often (a write per
/// message would make every accepted RCPT a disk write).
const RENEW_EVERY_MS: u64 = 24 * 3600 * 1000;

impl Entry {
    /// 9 bytes: a tag and a little-endian time.
    pub fn encode(&self) -> [u8; 9] {
        let (tag, t) = match *self {
            Entry::Pending { first_ms } => (0u8, first_ms),
            Entry::Passed { until_ms } => (1u8, until_ms),
        };
        let mut out = [0u8; 9];
        out[0] = tag;
        out[1..].copy_from_slice(&t.to_le_bytes());
        out
    }

    /// None for bytes this version did not write (treated as absent).
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let (&tag, rest) = bytes.split_first()?;
        let t = u64::from_le_bytes(rest.try_into().ok()?);
        match tag {
            0 => Some(Entry::Pending { first_ms: t }),
            1 => Some(Entry::Passed { until_ms: t }),
            _ => None,
        }
    }
}

impl GreylistPolicy {
    /// The client's network as the key's first part ("192.0.2.0/24").
    pub fn network(&self, ip: IpAddr) -> IpNet {
        let prefix = match ip {
            IpAddr::V4(_) => self.ipv4_prefix.min(32),
            IpAddr::V6(_) => self.ipv6_prefix.min(128),
        };
        IpNet::new(ip, prefix)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| IpNet::from(ip))
    }

    /// The table key: network, sender and recipient (lowercased, cut to
    /// [`MAX_PART`] bytes), NUL-separated.
    pub fn key(&self, ip: IpAddr, sender: &str, recipient: &str) -> Vec<u8> {
        let net = self.network(ip).to_string();
        let cut = |s: &str| -> Vec<u8> {
            let mut b = s.to_ascii_lowercase().into_bytes();
            b.truncate(MAX_PART);
            b
        };
        let mut k = Vec::with_capacity(net.len() + 2 * MAX_PART + 2);
        k.extend_from_slice(net.as_bytes());
        k.push(0);
        k.extend_from_slice(&cut(sender));
        k.push(0);
        k.extend_from_slice(&cut(recipient));
        k
    }

    /// The answer for a triplet holding `stored` at `now_ms`, and what to
    /// write (None: leave the table as it is).
    pub fn decide(&self, stored: Option<Entry>, now_ms: u64) -> (Outcome, Option<Entry>) {
        let first_sight = |now: u64| {
            (
                Outcome::Defer {
                    retry_after_ms: now.saturating_add(self.delay_ms),
                },
                Some(Entry::Pending { first_ms: now }),
            )
        };
        match stored {
            None => first_sight(now_ms),
            Some(Entry::Pending { first_ms }) => {
                let age = now_ms.saturating_sub(first_ms);
                if age > self.expire_ms {
                    first_sight(now_ms)
                } else if age < self.delay_ms {
                    // Too early: the first sighting stands (not reset, or a
                    // client retrying every minute would never pass).
                    (
                        Outcome::Defer {
                            retry_after_ms: first_ms.saturating_add(self.delay_ms),
                        },
                        None,
                    )
                } else {
                    (Outcome::Pass, Some(self.passed(now_ms)))
                }
            }
            Some(Entry::Passed { until_ms }) => {
                if now_ms > until_ms {
                    first_sight(now_ms)
                } else if now_ms.saturating_add(self.pass_ttl_ms)
                    >= until_ms.saturating_add(RENEW_EVERY_MS)
                {
                    (Outcome::Pass, Some(self.passed(now_ms)))
                } else {
                    (Outcome::Pass, None)
                }
            }
        }
    }

    fn passed(&self, now_ms: u64) -> Entry {
        Entry::Passed {
            until_ms: now_ms.saturating_add(self.pass_ttl_ms),
        }
    }

    /// Whether a stored entry no longer means anything at `now_ms` (purge).
    pub fn is_expired(&self, entry: Option<Entry>, now_ms: u64) -> bool {
        match entry {
            None => true,
            Some(Entry::Pending { first_ms }) => now_ms.saturating_sub(first_ms) > self.expire_ms,
            Some(Entry::Passed { until_ms }) => now_ms > until_ms,
        }
    }
}

/// Who is never greylisted (besides DNSWL-listed, authenticated and
/// relay-network clients, which the engine checks).
#[derive(Debug, Clone, Default)]
pub struct Exemptions {
    /// Client networks (`skip_networks` and the `skip_clients_list`).
    pub networks: NetworkList,
    /// A `[lists]` name of senders (`user@domain` or `@domain`).
    pub senders_list: Option<String>,
    /// A `[lists]` name of recipients (`user@domain` or `@domain`).
    pub recipients_list: Option<String>,
}

impl Exemptions {
    /// Why this triplet skips greylisting, if it does.
    pub fn reason(
        &self,
        ip: IpAddr,
        sender: &str,
        recipient: &str,
        lists: &Lists,
    ) -> Option<&'static str> {
        if self.networks.contains(ip) {
            return Some("client network");
        }
        if let Some(name) = &self.senders_list {
            if !sender.is_empty() && lists.contains(name, sender, true) {
                return Some("sender");
            }
        }
        if let Some(name) = &self.recipients_list {
            if lists.contains(name, recipient, true) {
                return Some("recipient");
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    fn policy() -> GreylistPolicy {
        GreylistPolicy {
            delay_ms: 5 * MIN,
            expire_ms: 240 * MIN,
            pass_ttl_ms: 35 * 24 * 60 * MIN,
            ipv4_prefix: 24,
            ipv6_prefix: 64,
        }
    }

    #[test]
    fn first_sight_defers_and_records() {
        let p = policy();
        assert_eq!(
            p.decide(None, 1000),
            (
                Outcome::Defer {
                    retry_after_ms: 1000 + 5 * MIN
                },
                Some(Entry::Pending { first_ms: 1000 })
            )
        );
    }

    #[test]
    fn early_retry_defers_without_resetting_the_clock() {
        let p = policy();
        let stored = Some(Entry::Pending { first_ms: 1000 });
        assert_eq!(
            p.decide(stored, 1000 + 4 * MIN),
            (
                Outcome::Defer {
                    retry_after_ms: 1000 + 5 * MIN
                },
                None
            )
        );
    }

    #[test]
    fn retry_in_the_window_passes_and_is_remembered() {
        let p = policy();
        let stored = Some(Entry::Pending { first_ms: 1000 });
        let now = 1000 + 6 * MIN;
        let (o, w) = p.decide(stored, now);
        assert_eq!(o, Outcome::Pass);
        assert_eq!(
            w,
            Some(Entry::Passed {
                until_ms: now + p.pass_ttl_ms
            })
        );
        // Passing again soon after writes nothing; a day later renews.
        assert_eq!(p.decide(w, now + MIN), (Outcome::Pass, None));
        let later = now + 25 * 60 * MIN;
        assert_eq!(
            p.decide(w, later),
            (
                Outcome::Pass,
                Some(Entry::Passed {
                    until_ms: later + p.pass_ttl_ms
                })
            )
        );
    }

    #[test]
    fn late_retry_and_lapsed_pass_start_over() {
        let p = policy();
        let late = 1000 + 241 * MIN;
        assert_eq!(
            p.decide(Some(Entry::Pending { first_ms: 1000 }), late).1,
            Some(Entry::Pending { first_ms: late })
        );
        let lapsed = Some(Entry::Passed { until_ms: 5000 });
        assert!(matches!(p.decide(lapsed, 5001).0, Outcome::Defer { .. }));
        assert!(p.is_expired(lapsed, 5001));
        assert!(!p.is_expired(lapsed, 5000));
        assert!(p.is_expired(Some(Entry::Pending { first_ms: 0 }), 241 * MIN));
        assert!(!p.is_expired(Some(Entry::Pending { first_ms: 0 }), 239 * MIN));
    }

    #[test]
    fn keys_use_the_network_and_bounded_lowercase_addresses() {
        let p = policy();
        let a = p.key("192.0.2.7".parse().unwrap(), "A@Example.com", "b@x.test");
        let b = p.key("192.0.2.200".parse().unwrap(), "a@example.com", "B@X.TEST");
        assert_eq!(a, b);
        assert_eq!(a, b"192.0.2.0/24\0a@example.com\0b@x.test".to_vec());
        let v6 = p.key("2001:db8::1".parse().unwrap(), "", "b@x.test");
        assert!(v6.starts_with(b"2001:db8::/64\0\0"));
        let long = "x".repeat(400);
        assert!(p.key("192.0.2.1".parse().unwrap(), &long, &long).len() < 511);
    }

    #[test]
    fn entries_round_trip() {
        for e in [
            Entry::Pending { first_ms: 7 },
            Entry::Passed { until_ms: u64::MAX },
        ] {
            assert_eq!(Entry::decode(&e.encode()), Some(e));
        }
        assert_eq!(Entry::decode(b""), None);
        assert_eq!(Entry::decode(&[9, 0, 0, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn exemptions() {
        let lists = Lists::from_entries([
            ("senders", vec!["@trusted.example"]),
            ("rcpts", vec!["postmaster@x.test"]),
        ]);
        let ex = Exemptions {
            networks: NetworkList::parse(&["10.0.0.0/8"]).unwrap(),
            senders_list: Some("senders".into()),
            recipients_list: Some("rcpts".into()),
        };
        let ip = "192.0.2.1".parse().unwrap();
        assert_eq!(
            ex.reason("10.1.2.3".parse().unwrap(), "", "a@x.test", &lists),
            Some("client network")
        );
        assert_eq!(
            ex.reason(ip, "Bob@Trusted.Example", "a@x.test", &lists),
            Some("sender")
        );
        assert_eq!(
            ex.reason(ip, "a@b.example", "postmaster@x.test", &lists),
            Some("recipient")
        );
        assert_eq!(ex.reason(ip, "a@b.example", "a@x.test", &lists), None);
    }
}
