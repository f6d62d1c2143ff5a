//! What the node thread needs from `[cluster]` (validated by the engine's
//! config, which names the keys).

use std::time::Duration;

/// `cluster.engine_down`: what a batch gets when the engine cannot take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineDown {
    /// 451 4.3.0 and the message is removed again: no 250 without the engine.
    Tempfail,
    /// 250 after the LMDB commit (the single-node promise); replicated later.
    AcceptLocal,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub node_id: String,
    /// libpq-style connection strings, tried in order for a read-write server.
    pub engine: Vec<String>,
    pub lease: Duration,
    pub sweep_interval: Duration,
    pub engine_down: EngineDown,
    pub sync_interval: Duration,
    /// Messages of a dead node imported per engine transaction.
    pub import_batch: usize,
    /// Bound on connecting and on each engine round trip.
    pub engine_timeout: Duration,
    /// Item 3: destinations' connection and message-rate limits held across
    /// the cluster (None: off, the local limits only).
    pub shared_limits: Option<SharedLimitSettings>,
}

/// `[cluster] shared_limits = true` and its keys.
#[derive(Debug, Clone)]
pub struct SharedLimitSettings {
    /// A connection slot's lease: renewed every third of it while the
    /// connection lives; a dead node's slots free after it.
    pub slot_lease: Duration,
    /// A rate call leases about this long's share of the rate.
    pub permit_lease: Duration,
    pub fallback_share: crate::limits::FallbackShare,
    /// The backstop poll of `sluice_action` (LISTEN/NOTIFY is the fast path).
    pub action_poll: Duration,
}

impl Settings {
    pub fn heartbeat_interval(&self) -> Duration {
        self.lease / 3
    }

    pub fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }
}
