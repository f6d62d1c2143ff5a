//! When may a sweeper declare other nodes dead?
//!
//! A lease that ran out in the engine means "this node did not reach the
//! engine", which after an outage of the *engine* is true of every node. A
//! sweeper that itself lost the engine recently therefore waits until every
//! live node has had a whole lease (and one heartbeat interval) of engine
//! time to renew before it judges anyone. The engine side of the same rule
//! (a postmaster younger than the lease judges nobody) is in the sweep's SQL.
//! Waiting only delays a takeover: it never lets two nodes deliver at once.

/// Whether a sweep at `now_ms` may declare nodes past their lease dead, given
/// the last engine failure this node saw (`None`: none since it joined).
pub fn may_judge(now_ms: u64, last_engine_error_ms: Option<u64>, lease_ms: u64) -> bool {
    match last_engine_error_ms {
        None => true,
        Some(at) => now_ms.saturating_sub(at) >= quiet_needed_ms(lease_ms),
    }
}

/// A lease, plus the heartbeat interval (a third of it) that a node may
/// spend between its last failed and its first successful heartbeat.
pub fn quiet_needed_ms(lease_ms: u64) -> u64 {
    lease_ms.saturating_add(lease_ms / 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_that_never_lost_the_engine_judges() {
        assert!(may_judge(5_000, None, 3_000));
    }

    #[test]
    fn after_an_engine_outage_it_waits_a_lease_and_a_heartbeat() {
        // Last failure at 10 s, 3 s lease: not before 14 s.
        assert!(!may_judge(10_000, Some(10_000), 3_000));
        assert!(!may_judge(13_999, Some(10_000), 3_000));
        assert!(may_judge(14_000, Some(10_000), 3_000));
    }

    #[test]
    fn a_clock_read_before_the_failure_does_not_underflow() {
        assert!(!may_judge(9_000, Some(10_000), 3_000));
    }
}
