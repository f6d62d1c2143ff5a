//! sluice engine: configuration, the thread-per-core runtime, listeners and the
//! SMTP server. The `sluice` binary (main.rs) is a thin command line over this.

pub mod admin;
pub mod antispam;
pub mod auth_guard;
pub mod bans;
pub mod bounce;
pub mod budget;
pub mod cluster_actions;
pub mod cluster_io;
pub mod config;
pub mod conn;
pub mod debug_cmd;
pub mod delivery;
pub mod events;
pub mod filters;
/// Fuzz target bodies, behind the `fuzzing` feature (fuzz/, tests/fuzz_replay.rs,
/// tests/server_props.rs); not part of the relay.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod hooks;
pub mod inbound_limits;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod milter;
pub mod proxy;
pub mod queue;
/// The notice builder moved to `queue::dsn`; the old path still works.
pub use queue::dsn;
pub mod reload;
pub mod runtime;
pub mod smtp;
pub mod suppression;
pub mod time;
pub mod tls;
pub mod verify;
