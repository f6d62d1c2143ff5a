//! Mailbox providers recognised by MX host name: `[provider.NAME]
//! mx_suffixes` says which destination hosts belong to which provider, so the
//! provider's limits can hold for every domain it hosts. Pure: the engine asks
//! [`ProviderMatcher::provider_of`] with a host name and counts the connection
//! against the provider it names.

use thiserror::Error;

/// A suffix list that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProviderError {
    /// Not a host name suffix (empty label, space, `@`, wildcard inside).
    #[error("provider {provider}: mx_suffixes entry {suffix:?} is not a host name suffix")]
    BadSuffix { provider: String, suffix: String },
    /// Two providers claim the same suffix: which one a host belongs to
    /// would depend on the order they are written in.
    #[error("providers {first} and {second} both list the MX suffix {suffix:?}")]
    Duplicate {
        suffix: String,
        first: String,
        second: String,
    },
}

impl ProviderError {
    /// The provider whose entry is wrong (the second one for a duplicate).
    pub fn provider(&self) -> &str {
        match self {
            ProviderError::BadSuffix { provider, .. } => provider,
            ProviderError::Duplicate { second, .. } => second,
        }
    }
}

/// Suffix → provider, longest suffix first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderMatcher {
    /// (suffix without leading dot, provider name), longest suffix first.
    suffixes: Vec<(String, String)>,
}

/// A suffix as written (`google.com`, `.google.com`, `*.google.com`, any
/// case, trailing dot) in the form it is compared in; None when it is not a
/// host name suffix.
pub fn normalize_suffix(suffix: &str) -> Option<String> {
    let s = suffix.trim_end_matches('.');
    let s = s
        .strip_prefix("*.")
        .or_else(|| s.strip_prefix('.'))
        .unwrap_or(s);
    let s = s.to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    (!s.is_empty() && s.len() <= 253 && s.split('.').all(label_ok)).then_some(s)
}

impl ProviderMatcher {
    /// Builds the matcher from (provider name, its suffixes). A suffix
    /// listed by two providers is an error; one listed twice by the same
    /// provider is harmless.
    pub fn new<'a, I, S>(providers: I) -> Result<ProviderMatcher, ProviderError>
    where
        I: IntoIterator<Item = (&'a str, S)>,
        S: IntoIterator<Item = &'a String>,
    {
        let mut suffixes: Vec<(String, String)> = Vec::new();
        for (name, list) in providers {
            for raw in list {
                let Some(suffix) = normalize_suffix(raw) else {
                    return Err(ProviderError::BadSuffix {
                        provider: name.to_string(),
                        suffix: raw.clone(),
                    });
                };
                match suffixes.iter().find(|(s, _)| *s == suffix) {
                    Some((_, other)) if other == name => {}
                    Some((_, other)) => {
                        return Err(ProviderError::Duplicate {
                            suffix,
                            first: other.clone(),
                            second: name.to_string(),
                        })
                    }
                    None => suffixes.push((suffix, name.to_string())),
                }
            }
        }
        // The most specific suffix decides (`mx.example.google.com` under an
        // operator's `example.google.com` beats the preset's `google.com`).
        suffixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Ok(ProviderMatcher { suffixes })
    }

    /// The provider an MX host belongs to: the one with the longest suffix
    /// the host name equals or ends with on a label boundary (so
    /// `notgoogle.com` is not `google.com`). Case and a trailing dot do not
    /// matter. IP addresses never match.
    pub fn provider_of(&self, host: &str) -> Option<&str> {
        let host = host.trim_end_matches('.');
        if host.parse::<std::net::IpAddr>().is_ok() {
            return None;
        }
        self.suffixes.iter().find_map(|(suffix, name)| {
            let matches = host.len() >= suffix.len() && {
                let cut = host.len() - suffix.len();
                host.is_char_boundary(cut)
                    && host[cut..].eq_ignore_ascii_case(suffix)
                    && (cut == 0 || host.as_bytes()[cut - 1] == b'.')
            };
            matches.then_some(name.as_str())
        })
    }

    /// Whether no provider is known.
    pub fn is_empty(&self) -> bool {
        self.suffixes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(list: &[(&'static str, &[&str])]) -> Result<ProviderMatcher, ProviderError> {
        let owned: Vec<(&str, Vec<String>)> = list
            .iter()
            .map(|(n, s)| (*n, s.iter().map(|x| x.to_string()).collect()))
            .collect();
        ProviderMatcher::new(owned.iter().map(|(n, s)| (*n, s.iter())))
    }

    #[test]
    fn suffixes_match_on_a_label_boundary_only() {
        let m = matcher(&[
            ("google", &["google.com", "googlemail.com"]),
            ("microsoft", &["outlook.com"]),
        ])
        .expect("matcher");
        for (host, want) in [
            ("aspmx.l.google.com", Some("google")),
            ("ALT1.ASPMX.L.Google.COM.", Some("google")),
            ("google.com", Some("google")),
            ("gmail-smtp-in.l.googlemail.com", Some("google")),
            ("notgoogle.com", None),
            ("google.com.evil.example", None),
            ("xgoogle.com", None),
            ("example-com.mail.protection.outlook.com", Some("microsoft")),
            ("outlook.co", None),
            ("com", None),
            ("", None),
            ("192.0.2.1", None),
        ] {
            assert_eq!(m.provider_of(host), want, "{host}");
        }
    }

    #[test]
    fn the_longest_suffix_wins_whatever_the_order() {
        for list in [
            [
                ("big", &["example.net"][..]),
                ("part", &["mx.example.net"][..]),
            ],
            [
                ("part", &["mx.example.net"][..]),
                ("big", &["example.net"][..]),
            ],
        ] {
            let m = matcher(&list).expect("matcher");
            assert_eq!(m.provider_of("a.mx.example.net"), Some("part"));
            assert_eq!(m.provider_of("mx.example.net"), Some("part"));
            assert_eq!(m.provider_of("other.example.net"), Some("big"));
            // "mx.example.net" is a suffix of "xmx.example.net" only by bytes.
            assert_eq!(m.provider_of("xmx.example.net"), Some("big"));
        }
    }

    #[test]
    fn suffixes_are_written_freely_but_must_be_names() {
        let m = matcher(&[("y", &["*.YAHOODNS.net.", ".yahoo.com"])]).expect("matcher");
        assert_eq!(m.provider_of("mta5.am0.yahoodns.net"), Some("y"));
        assert_eq!(m.provider_of("mx.yahoo.com"), Some("y"));
        for bad in [
            "",
            ".",
            "a..b",
            "a b.com",
            "user@example.com",
            "a.*.com",
            "*",
        ] {
            let err = matcher(&[("p", &[bad])]).expect_err(bad);
            assert_eq!(err.provider(), "p");
            assert!(err.to_string().contains("mx_suffixes"), "{err}");
        }
        assert_eq!(
            normalize_suffix("*.Example.COM."),
            Some("example.com".into())
        );
    }

    #[test]
    fn a_suffix_belongs_to_one_provider() {
        let err = matcher(&[("a", &["example.net"]), ("b", &["Example.NET"])]).expect_err("dup");
        assert_eq!(
            err,
            ProviderError::Duplicate {
                suffix: "example.net".into(),
                first: "a".into(),
                second: "b".into(),
            }
        );
        // Twice by the same provider is harmless.
        let m = matcher(&[("a", &["example.net", "*.example.net"])]).expect("same provider");
        assert_eq!(m.provider_of("mx.example.net"), Some("a"));
        assert!(ProviderMatcher::default().is_empty());
    }
}
