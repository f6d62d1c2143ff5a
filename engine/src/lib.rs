//! sluice engine: configuration, the thread-per-core runtime, listeners and the
//! SMTP server. The `sluice` binary (main.rs) is a thin command line over this.

pub mod admin;
pub mod auth_guard;
pub mod budget;
pub mod config;
pub mod conn;
pub mod debug_cmd;
pub mod delivery;
pub mod dsn;
#[doc(hidden)]
pub mod fuzzing;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod runtime;
pub mod smtp;
pub mod spool_view;
pub mod time;
pub mod tls;
