//! Shared limits (issue 16 item 3, docs/cluster.md "(b)"): the decisions,
//! sans I/O, with time passed in. The engine calls are in `shared.rs`.
//!
//! * how many permits one rate call leases ([`permit_batch`]) and when a
//!   core asks again ([`PermitBank`]);
//! * what the local limits are while the engine cannot be asked
//!   ([`fallback_connections`], [`fallback_rate`]);
//! * the once-a-minute warning ([`OncePer`]).

use std::time::Duration;

/// `cluster.fallback_share`: the local limits in force while the engine is
/// unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackShare {
    /// Each node takes the configured limit divided by the nodes last seen
    /// up (the cluster together stays within it).
    Divide,
    /// Each node takes the whole configured limit (the single-node limits;
    /// the cluster may reach nodes × limit).
    Full,
}

/// Permits one rate call leases: `rate × lease ÷ nodes_up`, at least one
/// and at most the rate's burst (`count`). `count` permits per `per_ms`.
pub fn permit_batch(count: u32, per_ms: u64, lease_ms: u64, nodes_up: usize) -> u32 {
    let nodes = nodes_up.max(1) as u128;
    let per_ms = u128::from(per_ms.max(1));
    let n = u128::from(count) * u128::from(lease_ms) / per_ms / nodes;
    u32::try_from(n).unwrap_or(u32::MAX).clamp(1, count.max(1))
}

/// A connection limit while the engine is unreachable.
pub fn fallback_connections(limit: usize, nodes_up: usize, share: FallbackShare) -> usize {
    match share {
        FallbackShare::Full => limit,
        // Rounded down (the sum stays within the limit), but one each.
        FallbackShare::Divide => (limit / nodes_up.max(1)).max(1),
    }
}

/// A rate (`count` per `per_ms`) while the engine is unreachable: the same
/// period, the count divided (at least one).
pub fn fallback_rate(count: u32, per_ms: u64, nodes_up: usize, share: FallbackShare) -> (u32, u64) {
    match share {
        FallbackShare::Full => (count, per_ms),
        FallbackShare::Divide => {
            let nodes = u32::try_from(nodes_up.max(1)).unwrap_or(u32::MAX);
            if count >= nodes {
                (count / nodes, per_ms)
            } else {
                // Fewer than one per node per period: a longer period.
                let per = u128::from(per_ms) * u128::from(nodes) / u128::from(count.max(1));
                (1, u64::try_from(per).unwrap_or(u64::MAX))
            }
        }
    }
}

/// GCRA parameters of a rate for the engine's `sluice_take_permits`:
/// (emission interval, window) in µs. `count` permits per `per_ms`.
pub fn gcra_params(count: u32, per_ms: u64) -> (i64, i64) {
    let window_us = i64::try_from(u128::from(per_ms) * 1000).unwrap_or(i64::MAX);
    let interval = (window_us / i64::from(count.max(1))).max(1);
    (interval, window_us)
}

/// What a core does before one message under a shared rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// A leased permit was spent.
    Spent,
    /// A leased permit was spent, and half the lease is gone: ask for the
    /// next lease now (in the background).
    SpentAskMore,
    /// None left: ask and wait for the answer.
    Ask,
}

/// One site group's leased permits, kept by its owner core.
#[derive(Debug, Default, Clone)]
pub struct PermitBank {
    have: u32,
    /// Size of the last lease (the "half" is of it).
    lease: u32,
    /// A call is out (no second one is made meanwhile).
    asking: bool,
}

impl PermitBank {
    /// Takes one permit for a message.
    pub fn spend(&mut self) -> Spend {
        if self.have == 0 {
            return Spend::Ask;
        }
        self.have -= 1;
        if !self.asking && self.have <= self.lease / 2 {
            self.asking = true;
            Spend::SpentAskMore
        } else {
            Spend::Spent
        }
    }

    /// A call is made for a core that found none left.
    pub fn asking(&mut self) -> bool {
        !std::mem::replace(&mut self.asking, true)
    }

    /// The engine granted `n` (0 after a refusal or an error).
    pub fn granted(&mut self, n: u32) {
        self.asking = false;
        if n > 0 {
            self.have = self.have.saturating_add(n);
            self.lease = n;
        }
    }

    pub fn left(&self) -> u32 {
        self.have
    }

    pub fn is_asking(&self) -> bool {
        self.asking
    }
}

/// True at most once per `every` (the engine-unreachable warning).
#[derive(Debug, Default, Clone)]
pub struct OncePer {
    last_ms: Option<u64>,
}

impl OncePer {
    pub fn due(&mut self, now_ms: u64, every: Duration) -> bool {
        let every = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        if self
            .last_ms
            .is_some_and(|l| now_ms < l.saturating_add(every))
        {
            return false;
        }
        self.last_ms = Some(now_ms);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_the_nodes_share_of_a_second_within_the_burst() {
        // 30/s, 1 s lease, 3 nodes: 10 each.
        assert_eq!(permit_batch(30, 1000, 1000, 3), 10);
        // A slow rate still leases one.
        assert_eq!(permit_batch(10, 60_000, 1000, 3), 1);
        // Never more than the burst.
        assert_eq!(permit_batch(5, 1000, 10_000, 1), 5);
        // No node seen up yet counts as one.
        assert_eq!(permit_batch(10, 1000, 1000, 0), 10);
    }

    #[test]
    fn fallback_divides_and_keeps_one_each() {
        assert_eq!(fallback_connections(9, 3, FallbackShare::Divide), 3);
        assert_eq!(fallback_connections(3, 3, FallbackShare::Divide), 1);
        assert_eq!(fallback_connections(2, 3, FallbackShare::Divide), 1);
        assert_eq!(fallback_connections(3, 3, FallbackShare::Full), 3);
        assert_eq!(
            fallback_rate(30, 1000, 3, FallbackShare::Divide),
            (10, 1000)
        );
        assert_eq!(fallback_rate(2, 1000, 4, FallbackShare::Divide), (1, 2000));
        assert_eq!(fallback_rate(2, 1000, 4, FallbackShare::Full), (2, 1000));
    }

    #[test]
    fn gcra_interval_is_the_period_over_the_count() {
        assert_eq!(gcra_params(10, 1000), (100_000, 1_000_000));
        assert_eq!(gcra_params(3, 1000), (333_333, 1_000_000));
    }

    #[test]
    fn the_bank_asks_again_at_half_once() {
        let mut b = PermitBank::default();
        assert_eq!(b.spend(), Spend::Ask);
        assert!(b.asking());
        assert!(!b.asking(), "one call at a time");
        b.granted(4);
        assert_eq!(b.spend(), Spend::Spent); // 3 left
        assert_eq!(b.spend(), Spend::SpentAskMore); // 2 left: half
        assert_eq!(b.spend(), Spend::Spent, "already asking");
        b.granted(4);
        assert_eq!(b.left(), 5);
        b.granted(0);
        assert!(!b.is_asking());
    }

    #[test]
    fn once_per_minute() {
        let mut w = OncePer::default();
        let m = Duration::from_secs(60);
        assert!(w.due(1_000, m));
        assert!(!w.due(30_000, m));
        assert!(!w.due(60_999, m));
        assert!(w.due(61_000, m));
    }
}
