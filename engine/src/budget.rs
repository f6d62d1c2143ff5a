//! The memory budget for message bodies being received.
//!
//! Every session holds the body it receives in RAM until the end of data, when
//! it goes to the spool in one write. Without a bound, many sessions sending
//! large bodies slowly (or never ending them) can push the process into the OOM
//! killer. The budget caps those bytes for the whole process and, for clients
//! that are neither in the relay networks nor authenticated, per client address
//! (an IPv4 address, an IPv6 /64), so one stranger cannot take what the others
//! need. A body that does not fit is read to its end and discarded, then
//! answered 452 4.3.1: the client tries again later, nothing is lost.
//!
//! Lock-free: one process-wide atomic counter, and per-client counters in a
//! fixed table of atomics indexed by a keyed hash of the address. Sessions take
//! the budget in [`GRANT`] steps, so the counters are touched about once per
//! 64 KiB read, never per byte. Two addresses may share a slot; the hash key is
//! random per process, so an attacker cannot aim at a victim's slot.

use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Budget taken at a time; the read buffer's size, so a session touches the
/// counters about once per read while a body arrives.
pub const GRANT: u64 = 64 * 1024;

/// Per-client slots. 16,384 × 8 bytes; collisions stay rare for the few
/// hundred clients a relay sees at once.
const SLOTS: usize = 16 * 1024;

pub struct BodyBudget {
    total_limit: u64,
    per_client_limit: u64,
    used: AtomicU64,
    clients: Box<[AtomicU64]>,
    key: std::collections::hash_map::RandomState,
}

impl std::fmt::Debug for BodyBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyBudget")
            .field("total_limit", &self.total_limit)
            .field("per_client_limit", &self.per_client_limit)
            .field("used", &self.used())
            .finish()
    }
}

impl BodyBudget {
    pub fn new(total_limit: u64, per_client_limit: u64) -> BodyBudget {
        BodyBudget {
            total_limit,
            per_client_limit,
            used: AtomicU64::new(0),
            clients: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            key: Default::default(),
        }
    }

    /// Bytes held by all sessions now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The per-client slot of an address: IPv4 (or IPv4-mapped IPv6) by
    /// address, other IPv6 by /64, the block one host usually holds.
    pub fn client_slot(&self, ip: IpAddr) -> usize {
        let mut h = self.key.build_hasher();
        match ip.to_canonical() {
            IpAddr::V4(v4) => (4u8, v4.octets()).hash(&mut h),
            IpAddr::V6(v6) => {
                let o = v6.octets();
                (6u8, [o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]]).hash(&mut h)
            }
        }
        (std::hash::Hasher::finish(&h) as usize) % SLOTS
    }

    /// Takes `n` bytes from the process budget and, when `slot` is given, from
    /// that client's; all or nothing.
    fn take(&self, slot: Option<usize>, n: u64) -> bool {
        if !add_within(&self.used, n, self.total_limit) {
            return false;
        }
        if let Some(s) = slot {
            if !add_within(&self.clients[s], n, self.per_client_limit) {
                self.used.fetch_sub(n, Ordering::Relaxed);
                return false;
            }
        }
        true
    }

    fn give(&self, slot: Option<usize>, n: u64) {
        self.used.fetch_sub(n, Ordering::Relaxed);
        if let Some(s) = slot {
            self.clients[s].fetch_sub(n, Ordering::Relaxed);
        }
    }
}

/// Adds `n` to `counter` unless that would pass `limit`. A failed attempt may
/// show for a moment in the counter (other takers then see less room), which
/// errs on the safe side.
fn add_within(counter: &AtomicU64, n: u64, limit: u64) -> bool {
    let before = counter.fetch_add(n, Ordering::Relaxed);
    if before.saturating_add(n) > limit {
        counter.fetch_sub(n, Ordering::Relaxed);
        return false;
    }
    true
}

/// One body's share of the budget. Dropping it gives the bytes back, so every
/// way a transaction ends (stored, refused, reset, timeout, connection lost)
/// returns them.
pub struct BodyReservation {
    budget: Arc<BodyBudget>,
    slot: Option<usize>,
    held: u64,
}

impl std::fmt::Debug for BodyReservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyReservation")
            .field("slot", &self.slot)
            .field("held", &self.held)
            .finish()
    }
}

impl BodyReservation {
    /// An empty reservation; `slot` is the client's (None: only the process
    /// budget applies, for trusted clients).
    pub fn new(budget: Arc<BodyBudget>, slot: Option<usize>) -> BodyReservation {
        BodyReservation {
            budget,
            slot,
            held: 0,
        }
    }

    /// Makes sure `needed` bytes are covered, taking more in [`GRANT`] steps.
    /// False when the budget cannot cover them (what was held stays held).
    pub fn cover(&mut self, needed: u64) -> bool {
        if needed <= self.held {
            return true;
        }
        let short = needed - self.held;
        let step = short.div_ceil(GRANT) * GRANT;
        // The rounded step first; near a limit, exactly what is missing.
        if self.budget.take(self.slot, step) {
            self.held += step;
            return true;
        }
        if step != short && self.budget.take(self.slot, short) {
            self.held += short;
            return true;
        }
        false
    }

    pub fn held(&self) -> u64 {
        self.held
    }
}

impl Drop for BodyReservation {
    fn drop(&mut self) {
        self.budget.give(self.slot, self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn process_limit_refuses_and_drop_gives_back() {
        let b = Arc::new(BodyBudget::new(4 * GRANT, 4 * GRANT));
        let mut r1 = BodyReservation::new(b.clone(), None);
        assert!(r1.cover(1));
        assert_eq!(r1.held(), GRANT);
        assert!(r1.cover(3 * GRANT));
        let mut r2 = BodyReservation::new(b.clone(), None);
        assert!(r2.cover(GRANT));
        assert!(!r2.cover(GRANT + 1), "process budget is spent");
        assert_eq!(b.used(), 4 * GRANT);
        drop(r1);
        assert_eq!(b.used(), GRANT);
        assert!(r2.cover(4 * GRANT));
        drop(r2);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn per_client_limit_spares_other_clients() {
        let b = Arc::new(BodyBudget::new(100 * GRANT, 3 * GRANT));
        let s1 = b.client_slot(ip("192.0.2.1"));
        let s2 = b.client_slot(ip("192.0.2.2"));
        assert_ne!(
            s1, s2,
            "keyed hash put two neighbours in one slot (1 in 16k)"
        );
        let mut a = BodyReservation::new(b.clone(), Some(s1));
        let mut a2 = BodyReservation::new(b.clone(), Some(s1));
        assert!(a.cover(2 * GRANT));
        assert!(!a2.cover(2 * GRANT), "same client, over its share");
        // Near the limit the exact shortfall is taken, not a whole grant.
        assert!(a2.cover(GRANT - 10));
        let mut other = BodyReservation::new(b.clone(), Some(s2));
        assert!(other.cover(3 * GRANT));
        // A trusted session (no slot) only meets the process limit.
        let mut trusted = BodyReservation::new(b.clone(), None);
        assert!(trusted.cover(50 * GRANT));
        drop((a, a2, other, trusted));
        assert_eq!(b.used(), 0);
        assert!(b.clients.iter().all(|c| c.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn a_refused_take_leaves_no_trace() {
        let b = Arc::new(BodyBudget::new(2 * GRANT, GRANT));
        let s = b.client_slot(ip("2001:db8::1"));
        let mut r = BodyReservation::new(b.clone(), Some(s));
        assert!(!r.cover(GRANT + 1), "over the client's share");
        assert_eq!(b.used(), 0, "the process share is given back too");
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn ipv6_slots_by_64_and_mapped_ipv4_as_ipv4() {
        let b = BodyBudget::new(1, 1);
        assert_eq!(
            b.client_slot(ip("2001:db8:1:2::1")),
            b.client_slot(ip("2001:db8:1:2:ffff::9"))
        );
        assert_eq!(
            b.client_slot(ip("::ffff:192.0.2.7")),
            b.client_slot(ip("192.0.2.7"))
        );
    }
}
