use thiserror::Error;

/// Errors from loading policy configuration. Each names the offending item so that
/// config validation can point the operator at it.
#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("invalid network {item:?}: {reason}")]
    InvalidNetwork { item: String, reason: String },

    #[error("invalid domain {domain:?}: {reason}")]
    InvalidDomain {
        domain: String,
        reason: &'static str,
    },

    /// The hash itself is never echoed: it is secret-ish and ends up in logs.
    #[error("auth user {user:?}: {reason}")]
    InvalidCredential { user: String, reason: String },

    #[error("hashing password: {0}")]
    Hash(String),
}
