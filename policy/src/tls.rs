//! The outbound TLS security levels that `[[rule]]`, routes and `delivery.tls`
//! name (Postfix's `smtp_tls_security_level` is the model). What each level
//! demands of a session is decided in the engine (`delivery/tls_policy.rs`).

use serde::Deserialize;

/// How much an outbound session demands of TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsLevel {
    /// Never STARTTLS: the session stays in clear text.
    None,
    /// STARTTLS when offered, any certificate; clear text when not offered.
    Opportunistic,
    /// STARTTLS must be offered and succeed; any certificate.
    Required,
    /// STARTTLS must be offered and the certificate must verify for the host
    /// name (web PKI roots or the configured CA file).
    Verify,
    /// Mandatory DANE (Postfix's `dane-only`): only MX hosts with usable
    /// DNSSEC-secure TLSA records are used, and the certificate must match
    /// them. (DANE also applies on its own, over opportunistic, required and
    /// verify, wherever an MX host publishes usable secure TLSA records.)
    Dane,
}

impl TlsLevel {
    /// The name as written in the configuration, for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            TlsLevel::None => "none",
            TlsLevel::Opportunistic => "opportunistic",
            TlsLevel::Required => "required",
            TlsLevel::Verify => "verify",
            TlsLevel::Dane => "dane",
        }
    }

    /// Whether a session under this level may never carry mail in clear text.
    pub fn encrypts(self) -> bool {
        matches!(self, TlsLevel::Required | TlsLevel::Verify | TlsLevel::Dane)
    }

    /// Whether the peer's certificate must verify.
    pub fn authenticates(self) -> bool {
        matches!(self, TlsLevel::Verify | TlsLevel::Dane)
    }

    /// Every level, weakest first.
    pub const ALL: [TlsLevel; 5] = [
        TlsLevel::None,
        TlsLevel::Opportunistic,
        TlsLevel::Required,
        TlsLevel::Verify,
        TlsLevel::Dane,
    ];
}

impl std::fmt::Display for TlsLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
