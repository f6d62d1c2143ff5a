//! The bounce classes (docs/bounce-classes.md describes each).

use std::fmt;
use std::str::FromStr;

/// What kind of failure a reply reports. The names are the ones in the
/// delivery log (`class=`), DSNs, metric labels and the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BounceClass {
    /// The mailbox does not exist or is disabled (5.1.1, "user unknown").
    InvalidRecipient,
    /// The domain does not exist or takes no mail (NXDOMAIN, null MX, 5.1.2).
    BadDomain,
    /// The mailbox is over quota (x.2.2).
    MailboxFull,
    /// The content was refused: spam, virus, phishing.
    ContentBlock,
    /// The sender, its IP or domain was refused: blocklists, reputation,
    /// DMARC/SPF/DKIM policy, "access denied".
    PolicyBlock,
    /// Too much mail or too many connections: throttling, [TSS04]-style deferrals.
    RateLimited,
    /// The next hop (or our TLS policy) needs TLS that did not happen.
    TlsRequired,
    /// The next hop needs (other) SMTP authentication.
    AuthRequired,
    /// A DNS lookup failed temporarily.
    Dns,
    /// Connection refused, reset or timed out; protocol breakdowns.
    Network,
    /// The message is larger than the next hop takes.
    MessageTooLarge,
    /// The message outlived its queue lifetime or DELIVERBY time.
    Expired,
    /// The recipient is on the suppression list (refused without an attempt).
    Suppressed,
    /// None of the rules matched.
    Other,
}

impl BounceClass {
    pub const ALL: [BounceClass; 14] = [
        BounceClass::InvalidRecipient,
        BounceClass::BadDomain,
        BounceClass::MailboxFull,
        BounceClass::ContentBlock,
        BounceClass::PolicyBlock,
        BounceClass::RateLimited,
        BounceClass::TlsRequired,
        BounceClass::AuthRequired,
        BounceClass::Dns,
        BounceClass::Network,
        BounceClass::MessageTooLarge,
        BounceClass::Expired,
        BounceClass::Suppressed,
        BounceClass::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BounceClass::InvalidRecipient => "invalid-recipient",
            BounceClass::BadDomain => "bad-domain",
            BounceClass::MailboxFull => "mailbox-full",
            BounceClass::ContentBlock => "content-block",
            BounceClass::PolicyBlock => "policy-block",
            BounceClass::RateLimited => "rate-limited",
            BounceClass::TlsRequired => "tls-required",
            BounceClass::AuthRequired => "auth-required",
            BounceClass::Dns => "dns",
            BounceClass::Network => "network",
            BounceClass::MessageTooLarge => "message-too-large",
            BounceClass::Expired => "expired",
            BounceClass::Suppressed => "suppressed",
            BounceClass::Other => "other",
        }
    }
}

impl fmt::Display for BounceClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BounceClass {
    type Err = String;

    fn from_str(s: &str) -> Result<BounceClass, String> {
        BounceClass::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                let names: Vec<&str> = BounceClass::ALL.iter().map(|c| c.as_str()).collect();
                format!("unknown bounce class `{s}` (one of {})", names.join(", "))
            })
    }
}

impl<'de> serde::Deserialize<'de> for BounceClass {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BounceClass, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
