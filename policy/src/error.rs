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

    /// `rule` is 1-based, as an operator counts `[[rule]]` tables; `key` is the
    /// dotted key inside the rule ("match.client_ip", "queue").
    #[error("rule {rule}: {key}: {reason}")]
    InvalidRule {
        rule: usize,
        key: &'static str,
        reason: String,
    },

    /// `key` is the key inside `[dkim.signer.NAME]` ("key", "domain").
    #[error("dkim.signer.{signer}.{key}: {reason}")]
    InvalidDkimSigner {
        signer: String,
        key: &'static str,
        reason: String,
    },

    /// `rule` is 1-based, as an operator counts `[[dkim.rule]]` tables.
    #[error("dkim rule {rule}: {key}: {reason}")]
    InvalidDkimRule {
        rule: usize,
        key: &'static str,
        reason: String,
    },

    #[error("invalid rate {text:?}: {reason}")]
    InvalidRate { text: String, reason: String },
}
