use std::collections::HashSet;
use std::net::IpAddr;

use crate::{NetworkList, PolicyError};

/// Outcome of the relay check for one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayDecision {
    /// The recipient domain is one of ours: accept from anyone.
    Local,
    /// Not ours, but the client may relay (trusted network or authenticated).
    Relay,
    /// Not ours and the client may not relay: 554 5.7.1.
    Denied,
}

/// Relay control in the spirit of Postfix's `permit_mynetworks,
/// permit_sasl_authenticated, reject_unauth_destination`.
///
/// Local domains match exactly (no implicit subdomains), case-insensitively, with a
/// trailing dot ignored.
#[derive(Clone, Debug)]
pub struct RelayPolicy {
    /// Normalised: ASCII lowercase, no trailing dot.
    local_domains: HashSet<String>,
    relay_networks: NetworkList,
}

impl RelayPolicy {
    pub fn new(
        local_domains: &[String],
        relay_networks: NetworkList,
    ) -> Result<RelayPolicy, PolicyError> {
        let mut set = HashSet::with_capacity(local_domains.len());
        for domain in local_domains {
            let normal = normalize(domain);
            validate_domain(&normal).map_err(|reason| PolicyError::InvalidDomain {
                domain: domain.clone(),
                reason,
            })?;
            set.insert(normal.into_owned());
        }
        Ok(RelayPolicy {
            local_domains: set,
            relay_networks,
        })
    }

    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.local_domains.contains(normalize(domain).as_ref())
    }

    /// Decide for one recipient address ("user@domain"). An address-literal domain
    /// ("[192.0.2.1]") is never local. A bare "postmaster" (RFC 5321 §4.5.1 requires
    /// accepting it without a domain) is local; any other address without a domain
    /// cannot be routed and is denied.
    pub fn check_recipient(
        &self,
        recipient: &str,
        client_ip: IpAddr,
        authenticated: bool,
    ) -> RelayDecision {
        let address = recipient.trim();
        let address = address
            .strip_prefix('<')
            .and_then(|a| a.strip_suffix('>'))
            .unwrap_or(address);
        // The last '@' separates the domain: quoted local parts and source routes
        // may contain '@' earlier.
        let Some((local_part, domain)) = address.rsplit_once('@') else {
            return if address.eq_ignore_ascii_case("postmaster") {
                RelayDecision::Local
            } else {
                RelayDecision::Denied
            };
        };
        if domain.is_empty() {
            return RelayDecision::Denied;
        }
        let trusted = authenticated || self.relay_networks.contains(client_ip);
        if !domain.starts_with('[') && self.is_local_domain(domain) {
            // Sender-specified routing in the local part (user%other@ours,
            // other!user@ours, "user@other"@ours) could be honoured by a next hop
            // and turn a local recipient into relaying: only clients that may
            // relay anyway get to use it (Postfix: allow_untrusted_routing = no).
            if !trusted && has_sender_routing(local_part) {
                return RelayDecision::Denied;
            }
            return RelayDecision::Local;
        }
        if trusted {
            RelayDecision::Relay
        } else {
            RelayDecision::Denied
        }
    }

    pub fn relay_networks(&self) -> &NetworkList {
        &self.relay_networks
    }
}

/// A local part carrying a route of its own: the percent hack, a UUCP bang path or
/// an '@' (quoted, or left by a stripped source route).
fn has_sender_routing(local_part: &str) -> bool {
    local_part.contains(['%', '!', '@'])
}

/// Lowercase and drop one trailing dot, borrowing when already normal (the common
/// case on the per-RCPT path).
pub(crate) fn normalize(domain: &str) -> std::borrow::Cow<'_, str> {
    let trimmed = domain.strip_suffix('.').unwrap_or(domain);
    if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(trimmed)
    }
}

/// RFC 1035 host name syntax (LDH labels), as used in SMTP domains. Internationalised
/// names must be given in A-label ("xn--") form.
pub(crate) fn validate_domain(domain: &str) -> Result<(), &'static str> {
    if domain.is_empty() {
        return Err("empty");
    }
    if domain.len() > 253 {
        return Err("longer than 253 characters");
    }
    let mut last = "";
    for label in domain.split('.') {
        if label.is_empty() {
            return Err("empty label");
        }
        if label.len() > 63 {
            return Err("label longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("only letters, digits, '-' and '.' are allowed (use xn-- form for IDN)");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("label starts or ends with '-'");
        }
        last = label;
    }
    // An all-numeric top label means an IP address was given, not a domain.
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err("looks like an IP address, not a domain");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn policy() -> RelayPolicy {
        let nets =
            NetworkList::parse(&["127.0.0.0/8", "::1/128", "192.0.2.0/24"]).expect("test networks");
        RelayPolicy::new(
            &["example.com".to_string(), "Mail.Example.NET.".to_string()],
            nets,
        )
        .expect("test policy")
    }

    const OUTSIDE: &str = "203.0.113.5";

    #[test]
    fn local_domains_case_and_trailing_dot() {
        let p = policy();
        assert!(p.is_local_domain("example.com"));
        assert!(p.is_local_domain("EXAMPLE.com."));
        assert!(p.is_local_domain("mail.example.net"));
        assert!(p.is_local_domain("MAIL.EXAMPLE.NET."));
        assert!(!p.is_local_domain("sub.example.com"));
        assert!(!p.is_local_domain("example.org"));
        assert!(!p.is_local_domain(""));
        assert!(!p.is_local_domain("."));
    }

    #[test]
    fn local_recipient_from_anyone() {
        let p = policy();
        for rcpt in [
            "alice@example.com",
            "Bob@EXAMPLE.COM.",
            "<carol@Example.Com>",
        ] {
            assert_eq!(
                p.check_recipient(rcpt, ip(OUTSIDE), false),
                RelayDecision::Local,
                "{rcpt}"
            );
        }
        // Local wins over relay permission.
        assert_eq!(
            p.check_recipient("alice@example.com", ip("127.0.0.1"), true),
            RelayDecision::Local
        );
    }

    #[test]
    fn relay_from_trusted_network() {
        let p = policy();
        for client in ["127.0.0.1", "::1", "192.0.2.200", "::ffff:192.0.2.9"] {
            assert_eq!(
                p.check_recipient("x@example.org", ip(client), false),
                RelayDecision::Relay,
                "{client}"
            );
        }
    }

    #[test]
    fn relay_when_authenticated() {
        let p = policy();
        assert_eq!(
            p.check_recipient("x@example.org", ip(OUTSIDE), true),
            RelayDecision::Relay
        );
        assert_eq!(
            p.check_recipient("x@example.org", ip("2001:db8::5"), true),
            RelayDecision::Relay
        );
    }

    #[test]
    fn denied_otherwise() {
        let p = policy();
        assert_eq!(
            p.check_recipient("x@example.org", ip(OUTSIDE), false),
            RelayDecision::Denied
        );
        assert_eq!(
            p.check_recipient("x@sub.example.com", ip("2001:db8::5"), false),
            RelayDecision::Denied
        );
        assert_eq!(
            p.check_recipient("x@", ip(OUTSIDE), true),
            RelayDecision::Denied
        );
    }

    #[test]
    fn ip_literal_is_never_local() {
        let p = policy();
        assert_eq!(
            p.check_recipient("x@[192.0.2.1]", ip(OUTSIDE), false),
            RelayDecision::Denied
        );
        assert_eq!(
            p.check_recipient("x@[IPv6:2001:db8::1]", ip(OUTSIDE), true),
            RelayDecision::Relay
        );
        assert_eq!(
            p.check_recipient("x@[127.0.0.1]", ip("127.0.0.1"), false),
            RelayDecision::Relay
        );
    }

    #[test]
    fn unusual_local_parts() {
        let p = policy();
        // Quoted local part containing '@': sender-specified routing, only for
        // clients that may relay anyway.
        assert_eq!(
            p.check_recipient("\"a@example.org\"@example.com", ip(OUTSIDE), false),
            RelayDecision::Denied
        );
        assert_eq!(
            p.check_recipient("\"a@example.org\"@example.com", ip("127.0.0.1"), false),
            RelayDecision::Local
        );
        for routed in [
            "user%example.org@example.com",
            "example.org!user@example.com",
            "\"user%x\"@example.com",
        ] {
            assert_eq!(
                p.check_recipient(routed, ip(OUTSIDE), false),
                RelayDecision::Denied,
                "{routed}"
            );
            assert_eq!(
                p.check_recipient(routed, ip(OUTSIDE), true),
                RelayDecision::Local,
                "{routed}"
            );
        }
        assert_eq!(
            p.check_recipient("\"plain quoted\"@example.com", ip(OUTSIDE), false),
            RelayDecision::Local
        );
        assert_eq!(
            p.check_recipient("\"a@example.com\"@example.org", ip(OUTSIDE), false),
            RelayDecision::Denied
        );
        // Bare postmaster is always accepted; other bare names are not routable.
        assert_eq!(
            p.check_recipient("PostMaster", ip(OUTSIDE), false),
            RelayDecision::Local
        );
        assert_eq!(
            p.check_recipient("root", ip("127.0.0.1"), true),
            RelayDecision::Denied
        );
    }

    #[test]
    fn bad_domains_are_named() {
        for bad in [
            "",
            ".",
            "exa mple.com",
            "-bad.example",
            "bad-.example",
            "a..b",
            "192.0.2.1",
            "[192.0.2.1]",
            "ex_ample.com",
            "bücher.example",
        ] {
            match RelayPolicy::new(&[bad.to_string()], NetworkList::default()) {
                Err(PolicyError::InvalidDomain { domain, .. }) => assert_eq!(domain, bad),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(RelayPolicy::new(&[long_label], NetworkList::default()).is_err());
        let long_name = vec!["abcdefghi"; 26].join(".");
        assert!(long_name.len() > 253);
        assert!(RelayPolicy::new(&[long_name], NetworkList::default()).is_err());
    }

    #[test]
    fn good_domains_accepted() {
        let ok = [
            "localhost".to_string(),
            "xn--bcher-kva.example".to_string(),
            "a1-b2.c3".to_string(),
            "123.example".to_string(),
        ];
        let p = RelayPolicy::new(&ok, NetworkList::default()).expect("valid domains");
        assert!(p.is_local_domain("LOCALHOST"));
        assert!(p.is_local_domain("123.example."));
    }

    #[test]
    fn no_networks_no_relay() {
        let p = RelayPolicy::new(&[], NetworkList::default()).expect("empty policy");
        assert_eq!(
            p.check_recipient("x@example.org", ip("127.0.0.1"), false),
            RelayDecision::Denied
        );
        assert_eq!(
            p.check_recipient("x@example.org", ip("127.0.0.1"), true),
            RelayDecision::Relay
        );
    }
}
