//! The node's own view of its lease, on its monotonic clock.
//!
//! The engine's clock decides when others may take a node's mail
//! (`lease_until` in `sluice_node`); this clock decides when the node itself
//! stops starting attempts. It counts from when a heartbeat was *sent*, minus
//! a margin, so it always runs out before the engine's does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The part of a lease the node gives up to clock drift and scheduling delay.
pub fn margin_ms(lease_ms: u64) -> u64 {
    lease_ms / 5
}

/// Until when (local ms) a heartbeat sent at `sent_ms` lets the node deliver.
pub fn valid_until(sent_ms: u64, lease_ms: u64) -> u64 {
    sent_ms.saturating_add(lease_ms - margin_ms(lease_ms))
}

/// Shared by the cluster thread (which renews it) and every core's
/// scheduler (which reads it before each dispatch).
#[derive(Debug)]
pub struct LeaseClock {
    origin: Instant,
    /// Local ms since `origin`; 0 = not valid (before the join, or fenced).
    valid_until_ms: AtomicU64,
    /// `engine_down = "accept-local"`: while the engine cannot be reached
    /// (not fenced: unreachable), the node delivers on as a single node.
    deliver_unreachable: AtomicBool,
    /// The last heartbeat failed to reach the engine.
    unreachable: AtomicBool,
}

impl Default for LeaseClock {
    fn default() -> Self {
        LeaseClock::new()
    }
}

impl LeaseClock {
    pub fn new() -> LeaseClock {
        LeaseClock {
            origin: Instant::now(),
            valid_until_ms: AtomicU64::new(0),
            deliver_unreachable: AtomicBool::new(false),
            unreachable: AtomicBool::new(false),
        }
    }

    /// This clock's now, in ms (monotonic).
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A heartbeat sent at `sent_ms` was accepted by the engine.
    pub fn renewed(&self, sent_ms: u64, lease: Duration) {
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        // fetch_max: a slow reply to an older heartbeat never shortens it.
        self.valid_until_ms
            .fetch_max(valid_until(sent_ms, lease_ms), Ordering::AcqRel);
    }

    /// Fenced: nothing more may start, whatever the last heartbeat said.
    pub fn revoke(&self) {
        self.deliver_unreachable.store(false, Ordering::Release);
        self.valid_until_ms.store(0, Ordering::Release);
    }

    /// `engine_down = "accept-local"`: an unreachable engine does not stop
    /// delivery (a partitioned node may then deliver what a survivor also
    /// takes over: duplicates, never a loss; docs/cluster.md).
    pub fn deliver_while_unreachable(&self) {
        self.deliver_unreachable.store(true, Ordering::Release);
    }

    /// The heartbeat's last outcome: the engine could (not) be reached. A
    /// node frozen past its lease has not failed a heartbeat: it stays
    /// stopped until the next one.
    pub fn set_unreachable(&self, unreachable: bool) {
        self.unreachable.store(unreachable, Ordering::Release);
    }

    /// May an attempt start at `now_ms`?
    pub fn allows(&self, now_ms: u64) -> bool {
        now_ms < self.valid_until_ms.load(Ordering::Acquire)
            || (self.unreachable.load(Ordering::Acquire)
                && self.deliver_unreachable.load(Ordering::Acquire))
    }

    /// Ms left at `now_ms` (0 when run out).
    pub fn remaining_ms(&self, now_ms: u64) -> u64 {
        self.valid_until_ms
            .load(Ordering::Acquire)
            .saturating_sub(now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_runs_out_before_the_engines() {
        // 3 s lease, heartbeat sent at 10 s: valid until 12.4 s locally,
        // while the engine keeps the node up until at least 13 s.
        assert_eq!(valid_until(10_000, 3_000), 12_400);
        let c = LeaseClock::new();
        assert!(!c.allows(0), "no lease before the first heartbeat");
        c.renewed(10_000, Duration::from_secs(3));
        assert!(c.allows(12_399));
        assert!(!c.allows(12_400));
        assert_eq!(c.remaining_ms(12_000), 400);
    }

    #[test]
    fn a_late_reply_to_an_older_heartbeat_does_not_shorten_it() {
        let c = LeaseClock::new();
        c.renewed(20_000, Duration::from_secs(3));
        c.renewed(19_000, Duration::from_secs(3));
        assert!(c.allows(22_000));
    }

    #[test]
    fn accept_local_delivers_on_while_the_engine_is_unreachable() {
        let c = LeaseClock::new();
        c.renewed(1_000, Duration::from_secs(3));
        c.set_unreachable(true);
        assert!(!c.allows(5_000), "tempfail: stopped at the lease");
        c.deliver_while_unreachable();
        assert!(c.allows(5_000));
        c.set_unreachable(false);
        assert!(!c.allows(5_000), "reachable again: the lease rules");
        c.set_unreachable(true);
        c.revoke();
        assert!(!c.allows(5_000), "fenced: never");
    }

    #[test]
    fn revoked_lease_allows_nothing() {
        let c = LeaseClock::new();
        c.renewed(1_000, Duration::from_secs(15));
        c.revoke();
        assert!(!c.allows(1_001));
    }
}
