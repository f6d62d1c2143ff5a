//! `[server.listener.NAME.verify]`: which checks run and what their results
//! do. The engine parses it with the rest of the listener (key and line in
//! its errors); [`VerifyConfig::check`] catches what serde cannot.

use serde::Deserialize;

use super::Checks;
use crate::SizeSpec;

/// Bodies at least this large are hashed for DKIM/ARC on the blocking pool
/// (`offload_size`'s default): below it the hash takes under ~0.25 ms (the trip to
/// the pool and back is ~30 µs) (BENCHMARKS.md "Inbound authentication").
pub const DEFAULT_OFFLOAD_SIZE: u64 = 64 * 1024;

/// What a result does to the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// 550 with the result's enhanced code.
    Reject,
    /// 451 4.7.x: the client tries again later.
    Tempfail,
    /// Accepted; the Authentication-Results header tells what was found.
    Accept,
}

/// Actions per result.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActionConfig {
    /// iprev fail or permerror (no PTR, or none leading back to the address).
    pub iprev_fail: Action,
    pub spf_fail: Action,
    pub spf_softfail: Action,
    pub spf_permerror: Action,
    /// No DKIM signature passed and at least one failed.
    pub dkim_fail: Action,
    /// A DKIM signature passed, but none by the From domain (or a parent).
    pub dkim_unaligned: Action,
    /// DMARC failed and the domain's policy (after pct) is reject.
    pub dmarc_reject: Action,
    /// DMARC failed and the domain's policy (after pct) is quarantine.
    pub dmarc_quarantine: Action,
    /// A check could not finish for a temporary DNS failure.
    pub temperror: Action,
}

impl Default for ActionConfig {
    /// Honour what domains publish (SPF -all, DMARC p=reject), tolerate the
    /// rest, and ask for a retry when DNS fails rather than judge blind.
    fn default() -> Self {
        ActionConfig {
            iprev_fail: Action::Accept,
            spf_fail: Action::Reject,
            spf_softfail: Action::Accept,
            spf_permerror: Action::Accept,
            dkim_fail: Action::Accept,
            dkim_unaligned: Action::Accept,
            dmarc_reject: Action::Reject,
            dmarc_quarantine: Action::Accept,
            temperror: Action::Tempfail,
        }
    }
}

/// One listener's `verify` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyConfig {
    /// iprev at connect (PTR, then the names back to the address).
    pub iprev: bool,
    pub spf: bool,
    pub dkim: bool,
    pub arc: bool,
    pub dmarc: bool,
    /// Authentication-Results authserv-id; default the server hostname.
    pub authserv_id: Option<String>,
    /// Also add a Received-SPF header field (RFC 7208 §9.1).
    pub received_spf: bool,
    /// ARC-seal accepted mail with this `[dkim.signer.NAME]`'s key.
    pub arc_seal: Option<String>,
    /// Messages of at least this many bytes have their DKIM/ARC body hashes
    /// computed on the executor's blocking pool instead of inline.
    pub offload_size: SizeSpec,
    pub action: ActionConfig,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            iprev: true,
            spf: true,
            dkim: true,
            arc: true,
            dmarc: true,
            authserv_id: None,
            received_spf: false,
            arc_seal: None,
            offload_size: SizeSpec::Bytes(DEFAULT_OFFLOAD_SIZE),
            action: ActionConfig::default(),
        }
    }
}

impl VerifyConfig {
    pub fn checks(&self) -> Checks {
        Checks {
            spf: self.spf,
            dkim: self.dkim,
            arc: self.arc,
            dmarc: self.dmarc,
        }
    }

    /// `offload_size` in bytes (the default when unreadable: [`Self::check`]
    /// refuses such a configuration at load).
    pub fn offload_bytes(&self) -> u64 {
        match &self.offload_size {
            SizeSpec::Bytes(n) => *n,
            SizeSpec::Text(t) => crate::parse_size(t).unwrap_or(DEFAULT_OFFLOAD_SIZE),
        }
    }

    /// (key, reason) for a value serde accepted but sluice cannot use.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if let SizeSpec::Text(t) = &self.offload_size {
            crate::parse_size(t).map_err(|why| ("offload_size", why))?;
        }
        if let Some(id) = &self.authserv_id {
            let ok = !id.is_empty()
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
            if !ok {
                return Err((
                    "authserv_id",
                    format!("`{id}` is not a host-name-like token (letters, digits, . - _)"),
                ));
            }
        }
        if self.dmarc && !(self.spf || self.dkim) {
            return Err((
                "dmarc",
                "DMARC needs spf or dkim (or both) switched on".to_string(),
            ));
        }
        Ok(())
    }
}
