//! Sender Rewriting Scheme (Shevek's SRS draft, the "guarded" variant that
//! libsrs2, postsrsd and pysrs implement): a forwarder replaces a foreign
//! envelope sender with an address in its own domain that carries the
//! original, so SPF at the next hop passes and bounces come back to it.
//!
//! - SRS0 (first forwarder): `SRS0=HHHH=TT=orig-domain=orig-local@srs-domain`.
//!   TT is the day number mod 1024 in two base32 characters; HHHH is
//!   HMAC-SHA1(secret, lowercase(TT + orig-domain + orig-local)), standard
//!   base64, truncated.
//! - SRS1 (a sender that already is some forwarder's SRS0):
//!   `SRS1=HHHH=first-forwarder==HHHH=TT=orig-domain=orig-local@srs-domain`,
//!   the hash over lowercase(first-forwarder + "=HHHH=TT=…"). Its reverse
//!   gives back the SRS0 address at the first forwarder, which checks its own
//!   hash and age.
//!
//! Key rotation: the first secret signs, every secret verifies. Sans-IO: the
//! day number is an argument.

use base64::Engine as _;

/// Timestamps wrap after this many days (two base32 characters).
const TICK_SLOTS: u64 = 1024;
const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// Longest address we make or take (RFC 5321's path limit).
pub const MAX_ADDRESS_LEN: usize = 256;
/// Bounds on the configured hash length (base64 characters of the 27 an
/// HMAC-SHA1 has).
pub const HASH_LEN_RANGE: std::ops::RangeInclusive<usize> = 4..=27;

/// Why an SRS address was refused on its way back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SrsError {
    #[error("not an SRS address")]
    NotSrs,
    #[error("malformed SRS address")]
    Malformed,
    #[error("SRS hash does not verify")]
    BadHash,
    #[error("SRS address expired")]
    Expired,
}

/// A configured SRS rewriter.
#[derive(Clone)]
pub struct Srs {
    domain: String,
    secrets: Vec<ring::hmac::Key>,
    max_age_days: u64,
    hash_len: usize,
}

impl std::fmt::Debug for Srs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secrets stay out of logs.
        f.debug_struct("Srs")
            .field("domain", &self.domain)
            .field("secrets", &self.secrets.len())
            .field("max_age_days", &self.max_age_days)
            .field("hash_len", &self.hash_len)
            .finish()
    }
}

/// Today's SRS day number from a Unix time in seconds.
pub fn day_of(unix_secs: u64) -> u64 {
    unix_secs / 86_400
}

impl Srs {
    /// `secrets` must not be empty; `hash_len` in [`HASH_LEN_RANGE`]. The
    /// caller (config) checks both and names the key.
    pub fn new(domain: &str, secrets: &[String], max_age_days: u64, hash_len: usize) -> Srs {
        Srs {
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            secrets: secrets
                .iter()
                .map(|s| {
                    ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, s.as_bytes())
                })
                .collect(),
            max_age_days,
            hash_len: hash_len.clamp(*HASH_LEN_RANGE.start(), *HASH_LEN_RANGE.end()),
        }
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Whether `address` is in the SRS domain with an SRS0/SRS1 local part
    /// (what [`Srs::reverse`] takes).
    pub fn is_srs_address(&self, address: &str) -> bool {
        match address.rsplit_once('@') {
            Some((local, domain)) => {
                domain
                    .trim_end_matches('.')
                    .eq_ignore_ascii_case(&self.domain)
                    && srs_tag(local).is_some()
            }
            None => false,
        }
    }

    /// The SRS sender for `sender` forwarded today (`day` from [`day_of`]).
    /// None for the null sender, an address without '@', one already in the
    /// SRS domain, or one whose result would be too long.
    pub fn forward(&self, sender: &str, day: u64) -> Option<String> {
        let (local, domain) = sender.rsplit_once('@')?;
        if local.is_empty() || domain.is_empty() {
            return None;
        }
        if domain
            .trim_end_matches('.')
            .eq_ignore_ascii_case(&self.domain)
        {
            return None;
        }
        let new_local = match srs_tag(local) {
            Some((1, rest)) => {
                // Already SRS1: keep the first forwarder and its SRS0 part,
                // sign them anew for our domain.
                let (_, rest) = rest.split_once('=')?;
                let (first, srs0_rest) = rest.split_once('=')?;
                let hash = self.hash(&[first, srs0_rest], 0);
                format!("SRS1={hash}={first}={srs0_rest}")
            }
            Some((_, _)) => {
                // SRS0 of another forwarder: keep it whole after its tag,
                // separator included (hence the "==").
                let rest = &local[4..];
                let hash = self.hash(&[domain, rest], 0);
                format!("SRS1={hash}={domain}={rest}")
            }
            None => {
                let stamp = timestamp(day);
                let hash = self.hash(&[&stamp, domain, local], 0);
                format!("SRS0={hash}={stamp}={domain}={local}")
            }
        };
        let address = format!("{new_local}@{}", self.domain);
        (address.len() <= MAX_ADDRESS_LEN).then_some(address)
    }

    /// The address an SRS recipient stands for, checked: the hash under any
    /// secret (case-insensitively, as the draft allows for case-smashing
    /// relays) and, for SRS0, the age.
    pub fn reverse(&self, address: &str, day: u64) -> Result<String, SrsError> {
        let (local, domain) = address.rsplit_once('@').ok_or(SrsError::NotSrs)?;
        if !domain
            .trim_end_matches('.')
            .eq_ignore_ascii_case(&self.domain)
        {
            return Err(SrsError::NotSrs);
        }
        let (kind, rest) = srs_tag(local).ok_or(SrsError::NotSrs)?;
        if kind == 1 {
            let mut parts = rest.splitn(3, '=');
            let (hash, first, srs0_rest) = match (parts.next(), parts.next(), parts.next()) {
                (Some(h), Some(f), Some(r)) if !f.is_empty() && !r.is_empty() => (h, f, r),
                _ => return Err(SrsError::Malformed),
            };
            self.verify(hash, &[first, srs0_rest])?;
            return Ok(format!("SRS0{srs0_rest}@{first}"));
        }
        let mut parts = rest.splitn(4, '=');
        let (hash, stamp, orig_domain, orig_local) =
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(h), Some(t), Some(d), Some(l)) if !d.is_empty() && !l.is_empty() => {
                    (h, t, d, l)
                }
                _ => return Err(SrsError::Malformed),
            };
        self.verify(hash, &[stamp, orig_domain, orig_local])?;
        let stamped = stamp_value(stamp).ok_or(SrsError::Malformed)?;
        // Days since the stamp, modulo the cycle: a stamp from the future
        // reads as almost a whole cycle old.
        let age = (day % TICK_SLOTS + TICK_SLOTS - stamped) % TICK_SLOTS;
        if age > self.max_age_days {
            return Err(SrsError::Expired);
        }
        Ok(format!("{orig_local}@{orig_domain}"))
    }

    /// The hash under secret `index`: base64 of HMAC-SHA1 over the
    /// lowercased parts, cut to the configured length.
    fn hash(&self, parts: &[&str], index: usize) -> String {
        let Some(key) = self.secrets.get(index) else {
            return String::new();
        };
        let mut ctx = ring::hmac::Context::with_key(key);
        for part in parts {
            ctx.update(part.to_ascii_lowercase().as_bytes());
        }
        let mut text = base64::engine::general_purpose::STANDARD.encode(ctx.sign().as_ref());
        text.truncate(self.hash_len);
        text
    }

    fn verify(&self, hash: &str, parts: &[&str]) -> Result<(), SrsError> {
        if hash.len() != self.hash_len {
            return Err(SrsError::BadHash);
        }
        for index in 0..self.secrets.len() {
            if self.hash(parts, index).eq_ignore_ascii_case(hash) {
                return Ok(());
            }
        }
        Err(SrsError::BadHash)
    }
}

/// `Some((0 or 1, text after the tag))` when `local` starts with SRS0 or SRS1
/// (any case) followed by one of the draft's separators.
fn srs_tag(local: &str) -> Option<(u8, &str)> {
    let tag = local.get(..4)?;
    let kind = if tag.eq_ignore_ascii_case("SRS0") {
        0
    } else if tag.eq_ignore_ascii_case("SRS1") {
        1
    } else {
        return None;
    };
    let rest = &local[4..];
    let sep = rest.chars().next()?;
    matches!(sep, '=' | '-' | '+').then(|| (kind, &rest[1..]))
}

/// Two base32 characters for `day` mod 1024.
fn timestamp(day: u64) -> String {
    let slot = day % TICK_SLOTS;
    let hi = BASE32[(slot >> 5) as usize & 31] as char;
    let lo = BASE32[slot as usize & 31] as char;
    format!("{hi}{lo}")
}

/// The slot of a two-character base32 timestamp (any case).
fn stamp_value(stamp: &str) -> Option<u64> {
    if stamp.len() != 2 {
        return None;
    }
    stamp.bytes().try_fold(0u64, |acc, c| {
        let c = c.to_ascii_uppercase();
        let digit = BASE32.iter().position(|&b| b == c)?;
        Some(acc * 32 + digit as u64)
    })
}

#[cfg(test)]
#[path = "srs_tests.rs"]
mod tests;
