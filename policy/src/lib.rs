//! Decisions for sluice: which clients may relay, which domains are ours, SMTP AUTH
//! credential checks, per-recipient rules (queue, route, connection strategy) and
//! the rate and concurrency limits that shape delivery.
//!
//! Everything here is pure and synchronous. Note that [`Credentials::verify`] runs a
//! deliberately slow password hash: callers on an executor thread must hand it to a
//! blocking pool.

mod credentials;
mod error;
mod network;
mod relay;
mod rules;
mod throttle;

pub use credentials::{hash_password, Credentials};
pub use error::PolicyError;
pub use network::NetworkList;
pub use relay::{RelayDecision, RelayPolicy};
pub use rules::{
    Decision, MatchConfig, MessageFacts, RuleConfig, RuleSet, SizeSpec, DEFAULT_QUEUE,
    DEFAULT_ROUTE,
};
pub use throttle::{Concurrency, MultiLimiter, Rate, RateLimiter};
