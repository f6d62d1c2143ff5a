//! Cluster mode (issue 16, docs/cluster.md): a replica log of every node's
//! spool in PostgreSQL, node leases with fencing epochs, and the takeover of
//! a dead node's mail by the survivors.
//!
//! * `lease`, `fence`, `judge`, `reconcile`, `pending` — the decisions, sans I/O, with
//!   time passed in;
//! * `engine` — the SQL;
//! * `node` — the sluice-cluster thread (tokio, never on the executors);
//! * `limits` (sans I/O), `shared` and `actions` — item 3: connection slots
//!   and rate permits shared through the engine, suspensions and shaping
//!   actions shared by `sluice_action` with LISTEN/NOTIFY.

pub mod actions;
pub mod fence;
pub mod judge;
pub mod lease;
pub mod limits;
pub mod pending;
pub mod reconcile;
pub mod schema;

mod engine;
mod node;
mod settings;
pub mod shared;

pub use engine::NodeStatus;
pub use fence::{Fenced, EXIT_FENCED};
pub use lease::LeaseClock;
pub use node::{set_exit, start, status_blocking, Cluster, Import, Stats, IMPORT_QUEUE};
pub use settings::{EngineDown, Settings, SharedLimitSettings};
/// Parses a `cluster.engine` entry (the config check uses it).
pub use tokio_postgres::Config as EngineConfig;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster engine: {0}")]
    Engine(#[from] tokio_postgres::Error),
    #[error("cluster engine: no read-write server answered ({0})")]
    NoEngine(String),
    #[error("cluster engine: {0} timed out")]
    Timeout(&'static str),
    #[error(transparent)]
    Fenced(#[from] Fenced),
    #[error("cluster: spool: {0}")]
    Spool(#[from] sluice_spool::SpoolError),
    #[error("cluster thread: {0}")]
    Thread(String),
}
