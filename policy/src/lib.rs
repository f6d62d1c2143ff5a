//! Relay decisions for sluice: which clients may relay, which domains are ours, and
//! SMTP AUTH credential checks.
//!
//! Everything here is pure and synchronous. Note that [`Credentials::verify`] runs a
//! deliberately slow password hash: callers on an executor thread must hand it to a
//! blocking pool.

mod credentials;
mod error;
mod network;
mod relay;

pub use credentials::{hash_password, Credentials};
pub use error::PolicyError;
pub use network::NetworkList;
pub use relay::{RelayDecision, RelayPolicy};
