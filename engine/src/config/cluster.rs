//! `[cluster]`: cluster mode on a PostgreSQL engine (docs/cluster.md). Off
//! by default; then nothing of it runs.

use std::time::Duration;

use serde::Deserialize;
use sluice_cluster::limits::FallbackShare;
use sluice_cluster::{EngineDown, Settings, SharedLimitSettings};

use super::HumanDuration;

/// Longest `cluster.node_id` (it is a key in every engine row).
const MAX_NODE_ID: usize = 64;
/// Most servers in `cluster.engine`.
const MAX_ENGINES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineDownMode {
    Tempfail,
    AcceptLocal,
}

/// `cluster.fallback_share`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FallbackShareMode {
    Divide,
    Full,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    pub enabled: bool,
    /// Unique in the cluster; letters, digits, '-', '_' and '.'.
    pub node_id: String,
    /// PostgreSQL connection strings (primary, standby…), tried in order for
    /// the read-write server.
    pub engine: Vec<String>,
    /// A node that has not renewed its lease for this long is taken over.
    pub lease: HumanDuration,
    /// How often each node looks for dead nodes and imports their mail.
    pub sweep_interval: HumanDuration,
    /// What a message gets when the engine cannot take its copy.
    pub engine_down: EngineDownMode,
    /// Envelope updates and removals are written to the engine at least this often.
    pub sync_interval: HumanDuration,
    /// Messages of a dead node imported per engine transaction.
    pub import_batch: usize,
    /// Bound on connecting to the engine and on each engine round trip.
    pub engine_timeout: HumanDuration,
    /// Every destination's `max_connections` and `message_rate` hold across
    /// the cluster, and suspensions and shaping actions reach every node.
    pub shared_limits: bool,
    /// A connection slot's lease (renewed every third of it).
    pub slot_lease: HumanDuration,
    /// A rate call leases about this long's share of the rate.
    pub permit_lease: HumanDuration,
    /// Local limits while the engine is unreachable.
    pub fallback_share: FallbackShareMode,
    /// Backstop poll of the shared actions (LISTEN/NOTIFY is the fast path).
    pub action_poll: HumanDuration,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            enabled: false,
            node_id: String::new(),
            engine: Vec::new(),
            lease: HumanDuration(Duration::from_secs(15)),
            sweep_interval: HumanDuration(Duration::from_secs(5)),
            engine_down: EngineDownMode::AcceptLocal,
            sync_interval: HumanDuration(Duration::from_millis(100)),
            import_batch: 500,
            engine_timeout: HumanDuration(Duration::from_secs(5)),
            shared_limits: false,
            slot_lease: HumanDuration(Duration::from_secs(60)),
            permit_lease: HumanDuration(Duration::from_secs(1)),
            fallback_share: FallbackShareMode::Divide,
            action_poll: HumanDuration(Duration::from_secs(5)),
        }
    }
}

impl ClusterSection {
    /// Cross-key checks; Err names the key. Checked only when enabled.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !self.enabled {
            return Ok(());
        }
        let id = &self.node_id;
        if id.is_empty()
            || id.len() > MAX_NODE_ID
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err((
                "cluster.node_id",
                format!("must be 1..={MAX_NODE_ID} letters, digits, '-', '_' or '.', unique in the cluster"),
            ));
        }
        if self.engine.is_empty() || self.engine.len() > MAX_ENGINES {
            return Err((
                "cluster.engine",
                format!("must list 1..={MAX_ENGINES} PostgreSQL connection strings"),
            ));
        }
        for (i, dsn) in self.engine.iter().enumerate() {
            if let Err(e) = dsn.parse::<sluice_cluster::EngineConfig>() {
                // The string may hold a password: only its position is named.
                return Err(("cluster.engine", format!("entry {i}: {e}")));
            }
        }
        if self.lease.0 < Duration::from_secs(1) || self.lease.0 > Duration::from_secs(3600) {
            return Err(("cluster.lease", "must be 1s..=1h".into()));
        }
        if self.sweep_interval.0.is_zero() || self.sweep_interval.0 > self.lease.0 {
            return Err((
                "cluster.sweep_interval",
                "must be more than 0 and at most cluster.lease".into(),
            ));
        }
        if self.sync_interval.0.is_zero() || self.sync_interval.0 > Duration::from_secs(60) {
            return Err((
                "cluster.sync_interval",
                "must be more than 0 and at most 60s".into(),
            ));
        }
        if !(1..=10_000).contains(&self.import_batch) {
            return Err(("cluster.import_batch", "must be 1..=10000".into()));
        }
        if self.engine_timeout.0.is_zero() || self.engine_timeout.0 > self.lease.0 {
            return Err((
                "cluster.engine_timeout",
                "must be more than 0 and at most cluster.lease".into(),
            ));
        }
        let between = |d: Duration, lo: u64, hi: u64| {
            d >= Duration::from_millis(lo) && d <= Duration::from_millis(hi)
        };
        if !between(self.slot_lease.0, 1_000, 3_600_000) {
            return Err(("cluster.slot_lease", "must be 1s..=1h".into()));
        }
        if !between(self.permit_lease.0, 10, 60_000) {
            return Err(("cluster.permit_lease", "must be 10ms..=60s".into()));
        }
        if !between(self.action_poll.0, 100, 3_600_000) {
            return Err(("cluster.action_poll", "must be 100ms..=1h".into()));
        }
        Ok(())
    }

    pub fn settings(&self) -> Settings {
        Settings {
            node_id: self.node_id.clone(),
            engine: self.engine.clone(),
            lease: self.lease.0,
            sweep_interval: self.sweep_interval.0,
            engine_down: match self.engine_down {
                EngineDownMode::Tempfail => EngineDown::Tempfail,
                EngineDownMode::AcceptLocal => EngineDown::AcceptLocal,
            },
            sync_interval: self.sync_interval.0,
            import_batch: self.import_batch,
            engine_timeout: self.engine_timeout.0,
            shared_limits: self.shared_limits.then_some(SharedLimitSettings {
                slot_lease: self.slot_lease.0,
                permit_lease: self.permit_lease.0,
                fallback_share: match self.fallback_share {
                    FallbackShareMode::Divide => FallbackShare::Divide,
                    FallbackShareMode::Full => FallbackShare::Full,
                },
                action_poll: self.action_poll.0,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> ClusterSection {
        ClusterSection {
            enabled: true,
            node_id: "n1".into(),
            engine: vec!["host=127.0.0.1 port=5432 user=sluice dbname=sluice".into()],
            ..ClusterSection::default()
        }
    }

    #[test]
    fn off_needs_nothing() {
        assert!(ClusterSection::default().check().is_ok());
    }

    #[test]
    fn each_bad_key_is_named() {
        assert!(on().check().is_ok());
        let mut c = on();
        c.node_id = "a b".into();
        assert_eq!(c.check().unwrap_err().0, "cluster.node_id");
        let mut c = on();
        c.engine.clear();
        assert_eq!(c.check().unwrap_err().0, "cluster.engine");
        let mut c = on();
        c.engine = vec!["host=x port=notaport".into()];
        assert_eq!(c.check().unwrap_err().0, "cluster.engine");
        let mut c = on();
        c.sweep_interval = HumanDuration(Duration::from_secs(60));
        assert_eq!(c.check().unwrap_err().0, "cluster.sweep_interval");
        let mut c = on();
        c.lease = HumanDuration(Duration::from_millis(10));
        assert_eq!(c.check().unwrap_err().0, "cluster.lease");
        let mut c = on();
        c.slot_lease = HumanDuration(Duration::from_millis(10));
        assert_eq!(c.check().unwrap_err().0, "cluster.slot_lease");
        let mut c = on();
        c.permit_lease = HumanDuration(Duration::from_secs(600));
        assert_eq!(c.check().unwrap_err().0, "cluster.permit_lease");
        let mut c = on();
        c.action_poll = HumanDuration(Duration::ZERO);
        assert_eq!(c.check().unwrap_err().0, "cluster.action_poll");
    }
}
