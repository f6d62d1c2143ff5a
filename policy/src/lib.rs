//! Decisions for sluice: which clients may relay, which domains are ours, SMTP AUTH
//! credential checks, per-recipient rules (queue, route, connection strategy, TLS
//! level) and
//! the rate and concurrency limits that shape delivery.
//!
//! Everything here is pure and synchronous. Note that [`Credentials::verify`] runs a
//! deliberately slow password hash: callers on an executor thread must hand it to a
//! blocking pool.

pub mod auth;
pub mod ban;
pub mod bounce;
mod credentials;
pub mod dane;
pub mod dkim;
pub mod dnsbl;
mod error;
pub mod greylist;
pub mod hook;
pub mod inbound_limits;
pub mod lists;
pub mod milter;
pub mod mta_sts;
mod network;
pub mod pool;
pub mod provider;
mod relay;
pub mod rewrite;
mod rules;
pub mod sender_login;
pub mod shaping;
pub mod sieve;
pub mod srs;
pub mod stage;
pub mod stage_message;
pub mod stage_rules;
pub mod suppression;
pub mod tenant;
mod throttle;
mod tls;

pub use credentials::{hash_password, Credentials};
pub use error::PolicyError;
pub use network::NetworkList;
pub use relay::{RelayDecision, RelayPolicy};
pub use rules::{
    Decision, MatchConfig, MessageFacts, RuleConfig, RuleSet, SizeSpec, DEFAULT_QUEUE,
    DEFAULT_ROUTE,
};
pub use throttle::{Concurrency, MultiLimiter, Rate, RateLimiter};
pub use tls::TlsLevel;

/// Integer bytes or a number with a unit: B, KiB, MiB, GiB, TiB (binary) or K/KB,
/// M/MB, G/GB, T/TB (decimal). Shared by the rules and the engine's size keys so
/// both accept the same spellings.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 512KiB, 50MiB or 4GiB"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => return Err(format!("unknown size unit `{other}` in `{text}`")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size `{text}` is too large"))
}
