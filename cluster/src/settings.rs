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
}

impl Settings {
    pub fn heartbeat_interval(&self) -> Duration {
        self.lease / 3
    }

    pub fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }
}
