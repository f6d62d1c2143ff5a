//! Which envelope senders an authenticated user may use (`[auth.sender_login]`),
//! the check Postfix makes with `smtpd_sender_login_maps` and
//! `reject_sender_login_mismatch`: a submission account cannot send as anyone it
//! likes.
//!
//! Each user maps to a list of patterns: a whole address (`alice@example.com`),
//! a domain (`@example.com`: any local part there) or `*` (anything). A user
//! with no entry may use only the address that is its login name. The null
//! sender (`<>`) is always allowed: it is what bounces and auto-replies use.

use std::collections::{BTreeMap, HashMap};

/// One allowed-sender pattern, lowercased.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Domain(String),
    Address(String),
}

/// The parsed `[auth.sender_login]` map.
#[derive(Debug, Clone, Default)]
pub struct SenderLogins {
    users: HashMap<String, Vec<Pattern>>,
}

/// Why one pattern of the map is not usable: the user and the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("user `{user}`: {message}")]
pub struct SenderLoginError {
    pub user: String,
    pub message: String,
}

impl SenderLogins {
    /// Parses the map; every pattern is checked, so a typo fails at load.
    pub fn new(map: &BTreeMap<String, Vec<String>>) -> Result<SenderLogins, SenderLoginError> {
        let mut users = HashMap::with_capacity(map.len());
        for (user, patterns) in map {
            let parsed = patterns
                .iter()
                .map(|p| {
                    parse_pattern(p).map_err(|message| SenderLoginError {
                        user: user.clone(),
                        message,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            users.insert(user.to_ascii_lowercase(), parsed);
        }
        Ok(SenderLogins { users })
    }

    /// Whether `user` (as authenticated) may send with envelope sender
    /// `sender` (as given in MAIL FROM, without angle brackets).
    pub fn allows(&self, user: &str, sender: &str) -> bool {
        if sender.is_empty() {
            return true;
        }
        let sender = sender.to_ascii_lowercase();
        let Some(patterns) = self.users.get(&user.to_ascii_lowercase()) else {
            return sender == user.to_ascii_lowercase();
        };
        let domain = sender.rsplit_once('@').map(|(_, d)| d);
        patterns.iter().any(|p| match p {
            Pattern::Any => true,
            Pattern::Domain(d) => domain == Some(d.as_str()),
            Pattern::Address(a) => *a == sender,
        })
    }
}

fn parse_pattern(text: &str) -> Result<Pattern, String> {
    let text = text.trim();
    if text == "*" {
        return Ok(Pattern::Any);
    }
    let lower = text.to_ascii_lowercase();
    match lower.rsplit_once('@') {
        Some(("", domain)) if valid_domain(domain) => Ok(Pattern::Domain(domain.to_string())),
        Some((local, domain)) if !local.is_empty() && valid_domain(domain) => {
            Ok(Pattern::Address(lower))
        }
        _ => Err(format!("`{text}` is not an address, an @domain or `*`")),
    }
}

fn valid_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 253
        && domain
            .split('.')
            .all(|label| !label.is_empty() && !label.contains(char::is_whitespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logins(entries: &[(&str, &[&str])]) -> SenderLogins {
        let map = entries
            .iter()
            .map(|(u, ps)| (u.to_string(), ps.iter().map(|p| p.to_string()).collect()))
            .collect();
        SenderLogins::new(&map).expect("valid map")
    }

    #[test]
    fn addresses_domains_and_any() {
        let l = logins(&[
            ("alice", &["alice@example.com", "@example.org"]),
            ("relay", &["*"]),
        ]);
        assert!(l.allows("alice", "alice@example.com"));
        assert!(l.allows("ALICE", "Alice@Example.COM"));
        assert!(l.allows("alice", "anyone@example.org"));
        assert!(!l.allows("alice", "bob@example.com"));
        assert!(!l.allows("alice", "alice@sub.example.org"));
        assert!(!l.allows("alice", "alice@example.org.evil"));
        assert!(l.allows("relay", "whoever@wherever.test"));
    }

    #[test]
    fn unlisted_user_may_use_its_login_address_only() {
        let l = logins(&[]);
        assert!(l.allows("carol@example.com", "carol@example.com"));
        assert!(l.allows("carol@example.com", "CAROL@example.com"));
        assert!(!l.allows("carol@example.com", "dave@example.com"));
        assert!(!l.allows("carol", "carol@example.com"));
    }

    #[test]
    fn null_sender_is_always_allowed() {
        let l = logins(&[("alice", &["alice@example.com"])]);
        assert!(l.allows("alice", ""));
        assert!(l.allows("nobody", ""));
    }

    #[test]
    fn bad_patterns_name_the_user() {
        for bad in ["example.com", "@", "alice@", "@bad..domain", ""] {
            let map = BTreeMap::from([("alice".to_string(), vec![bad.to_string()])]);
            let e = SenderLogins::new(&map).expect_err(bad);
            assert_eq!(e.user, "alice");
            assert!(e.message.contains("not an address"), "{bad}: {e}");
        }
    }
}
