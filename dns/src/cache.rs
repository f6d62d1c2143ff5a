//! Per-core answer cache: no locks (one instance per executor), TTLs clamped by
//! configuration, negative answers kept for their RFC 2308 TTL, bounded size.
//!
//! Eviction removes the entry that expires soonest. Expired entries therefore go
//! first, and among live ones the entry with the least life left is the cheapest
//! to lose. A BTreeMap keyed by expiry makes that O(log n) without scanning.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::{Answer, QueryType};

/// Longest name in presentation form (RFC 1035 §2.3.4: 255 octets on the wire
/// make at most 253 characters, 254 with the trailing dot).
const MAX_NAME: usize = 254;

/// Cache key built on the stack, so a cache hit does not allocate: the query type
/// code followed by the lowercased name without its trailing dot.
pub(crate) struct CacheKey {
    buf: [u8; MAX_NAME + 1],
    len: usize,
}

impl CacheKey {
    /// None when the name is too long to be a DNS name (the lookup fails anyway).
    pub(crate) fn new(name: &str, qtype: QueryType) -> Option<CacheKey> {
        let name = name.trim();
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.len() > MAX_NAME {
            return None;
        }
        let mut buf = [0u8; MAX_NAME + 1];
        buf[0] = qtype as u8;
        for (dst, src) in buf[1..].iter_mut().zip(name.bytes()) {
            *dst = src.to_ascii_lowercase();
        }
        Some(CacheKey {
            buf,
            len: name.len() + 1,
        })
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// How cached lifetimes are derived from the TTLs in answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPolicy {
    /// Floor for positive answers (records with TTL 0 are kept this long).
    pub min: Duration,
    /// Ceiling for every answer.
    pub max: Duration,
    /// Ceiling for NXDOMAIN / NODATA.
    pub negative_max: Duration,
}

impl Default for TtlPolicy {
    fn default() -> Self {
        TtlPolicy {
            min: Duration::ZERO,
            max: Duration::from_secs(86_400),
            negative_max: Duration::from_secs(3_600),
        }
    }
}

impl TtlPolicy {
    /// How long `answer` may be cached; zero means not at all.
    pub fn cache_ttl(&self, answer: &Answer) -> Duration {
        let raw = Duration::from_secs(u64::from(answer.min_ttl));
        if answer.truncated {
            return Duration::ZERO;
        }
        if answer.negative.is_some() {
            // RFC 2308 §5: without an SOA (TTL 0) a negative answer is not cached,
            // whatever the floor says.
            if raw.is_zero() {
                return Duration::ZERO;
            }
            return raw.min(self.negative_max).min(self.max);
        }
        raw.max(self.min).min(self.max)
    }
}

struct Entry {
    answer: Rc<Answer>,
    expires: Instant,
    seq: u64,
}

pub(crate) struct Cache {
    map: HashMap<Box<[u8]>, Entry>,
    by_expiry: BTreeMap<(Instant, u64), Box<[u8]>>,
    capacity: usize,
    seq: u64,
    evictions: u64,
}

impl Cache {
    pub(crate) fn new(capacity: usize) -> Cache {
        Cache {
            map: HashMap::with_capacity(capacity.min(4096)),
            by_expiry: BTreeMap::new(),
            capacity,
            seq: 0,
            evictions: 0,
        }
    }

    /// A live entry and its remaining TTL in whole seconds (rounded down).
    pub(crate) fn get(&mut self, key: &[u8], now: Instant) -> Option<(Rc<Answer>, u32)> {
        let entry = self.map.get(key)?;
        if now < entry.expires {
            let left = (entry.expires - now).as_secs();
            return Some((
                entry.answer.clone(),
                u32::try_from(left).unwrap_or(u32::MAX),
            ));
        }
        self.remove(key);
        None
    }

    pub(crate) fn insert(&mut self, key: &[u8], answer: Rc<Answer>, ttl: Duration, now: Instant) {
        if self.capacity == 0 || ttl.is_zero() {
            return;
        }
        let Some(expires) = now.checked_add(ttl) else {
            return;
        };
        if self.map.contains_key(key) {
            self.remove(key);
        } else if self.map.len() >= self.capacity {
            if let Some((_, victim)) = self.by_expiry.pop_first() {
                self.map.remove(&victim);
                self.evictions += 1;
            }
        }
        self.seq += 1;
        let boxed: Box<[u8]> = key.into();
        self.by_expiry.insert((expires, self.seq), boxed.clone());
        self.map.insert(
            boxed,
            Entry {
                answer,
                expires,
                seq: self.seq,
            },
        );
    }

    fn remove(&mut self, key: &[u8]) {
        if let Some(entry) = self.map.remove(key) {
            self.by_expiry.remove(&(entry.expires, entry.seq));
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn evictions(&self) -> u64 {
        self.evictions
    }

    pub(crate) fn clear(&mut self) {
        self.map.clear();
        self.by_expiry.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NegativeKind, Record};
    use std::net::Ipv4Addr;

    fn answer(ttl: u32) -> Answer {
        Answer {
            records: vec![Record::A(Ipv4Addr::new(192, 0, 2, 1), ttl)],
            truncated: false,
            authentic_data: false,
            negative: None,
            min_ttl: ttl,
        }
    }

    fn negative(ttl: u32) -> Answer {
        Answer {
            records: Vec::new(),
            truncated: false,
            authentic_data: false,
            negative: Some(NegativeKind::NxDomain { ttl }),
            min_ttl: ttl,
        }
    }

    fn key(name: &str) -> Vec<u8> {
        CacheKey::new(name, QueryType::A)
            .expect("short name")
            .as_bytes()
            .to_vec()
    }

    #[test]
    fn key_is_case_and_dot_insensitive_and_typed() {
        assert_eq!(key("Example.COM."), key("example.com"));
        let mx = CacheKey::new("example.com", QueryType::Mx).expect("key");
        assert_ne!(mx.as_bytes(), &key("example.com")[..]);
        assert!(CacheKey::new(&"a".repeat(300), QueryType::A).is_none());
        assert!(CacheKey::new(&"a".repeat(254), QueryType::A).is_some());
    }

    #[test]
    fn entries_expire_at_their_ttl() {
        let t0 = Instant::now();
        let mut c = Cache::new(10);
        c.insert(&key("a"), Rc::new(answer(30)), Duration::from_secs(30), t0);
        let (_, left) = c.get(&key("a"), t0).expect("fresh");
        assert_eq!(left, 30);
        let (_, left) = c
            .get(&key("a"), t0 + Duration::from_millis(29_500))
            .expect("still live");
        assert_eq!(left, 0);
        assert!(c.get(&key("a"), t0 + Duration::from_secs(30)).is_none());
        assert_eq!(c.len(), 0, "expired entry removed on access");
    }

    #[test]
    fn full_cache_evicts_soonest_expiry_first() {
        let t0 = Instant::now();
        let mut c = Cache::new(3);
        c.insert(
            &key("long"),
            Rc::new(answer(300)),
            Duration::from_secs(300),
            t0,
        );
        c.insert(
            &key("short"),
            Rc::new(answer(5)),
            Duration::from_secs(5),
            t0,
        );
        c.insert(
            &key("mid"),
            Rc::new(answer(60)),
            Duration::from_secs(60),
            t0,
        );
        c.insert(
            &key("new"),
            Rc::new(answer(100)),
            Duration::from_secs(100),
            t0,
        );
        assert_eq!(c.len(), 3);
        assert_eq!(c.evictions(), 1);
        assert!(c.get(&key("short"), t0).is_none());
        for k in ["long", "mid", "new"] {
            assert!(c.get(&key(k), t0).is_some(), "{k}");
        }
        // Replacing an entry does not evict and keeps the index consistent.
        c.insert(&key("mid"), Rc::new(answer(1)), Duration::from_secs(1), t0);
        assert_eq!(c.len(), 3);
        c.insert(
            &key("x"),
            Rc::new(answer(100)),
            Duration::from_secs(100),
            t0,
        );
        assert!(c.get(&key("mid"), t0).is_none(), "mid now expires first");
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn zero_ttl_and_zero_capacity_store_nothing() {
        let t0 = Instant::now();
        let mut c = Cache::new(0);
        c.insert(&key("a"), Rc::new(answer(30)), Duration::from_secs(30), t0);
        assert!(c.get(&key("a"), t0).is_none());
        let mut c = Cache::new(5);
        c.insert(&key("a"), Rc::new(answer(0)), Duration::ZERO, t0);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn ttl_policy_clamps() {
        let p = TtlPolicy {
            min: Duration::from_secs(10),
            max: Duration::from_secs(1000),
            negative_max: Duration::from_secs(100),
        };
        assert_eq!(p.cache_ttl(&answer(0)), Duration::from_secs(10));
        assert_eq!(p.cache_ttl(&answer(500)), Duration::from_secs(500));
        assert_eq!(p.cache_ttl(&answer(5000)), Duration::from_secs(1000));
        assert_eq!(p.cache_ttl(&negative(60)), Duration::from_secs(60));
        assert_eq!(p.cache_ttl(&negative(600)), Duration::from_secs(100));
        // No SOA: not cached, the floor notwithstanding.
        assert_eq!(p.cache_ttl(&negative(0)), Duration::ZERO);
        let mut t = answer(60);
        t.truncated = true;
        assert_eq!(p.cache_ttl(&t), Duration::ZERO);
    }
}
