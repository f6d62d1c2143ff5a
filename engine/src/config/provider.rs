//! `[provider.NAME]`: limits shared by every domain whose MX hosts belong to
//! one mailbox provider, recognised by MX host name suffix
//! (docs/providers.md). The shipped presets (`engine/presets/providers.toml`,
//! built in) are merged under the operator's tables key by key.

use std::collections::BTreeMap;

use serde::Deserialize;
use sluice_policy::provider::{ProviderError, ProviderMatcher};
use sluice_policy::Rate;

use super::delivery::{DeliverySection, HostLimits};

/// The shipped presets, as text (also shown by docs/providers.md).
pub const PRESETS: &str = include_str!("../../presets/providers.toml");

/// One `[provider.NAME]` table. Keys left out keep the preset's value (for a
/// preset provider), else the `[delivery] host_*` value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// MX host name suffixes of the provider (`google.com` matches
    /// `aspmx.l.google.com` and `google.com`, not `notgoogle.com`); an empty
    /// list turns a preset off.
    pub mx_suffixes: Option<Vec<String>>,
    /// Concurrent connections per source IP to all the provider's hosts
    /// (0 = no limit).
    pub max_connections: Option<usize>,
    /// New connections per period per source IP (empty = no limit).
    pub connection_rate: Option<Vec<Rate>>,
    /// Messages per period per source IP (empty = no limit).
    pub message_rate: Option<Vec<Rate>>,
    /// Messages over one connection (0 = no provider limit; the site's own
    /// limit still applies, the smaller wins).
    pub max_messages_per_connection: Option<usize>,
}

impl ProviderConfig {
    /// `self` with the keys it leaves out taken from `base`.
    fn over(self, base: &ProviderConfig) -> ProviderConfig {
        ProviderConfig {
            mx_suffixes: self.mx_suffixes.or_else(|| base.mx_suffixes.clone()),
            max_connections: self.max_connections.or(base.max_connections),
            connection_rate: self
                .connection_rate
                .or_else(|| base.connection_rate.clone()),
            message_rate: self.message_rate.or_else(|| base.message_rate.clone()),
            max_messages_per_connection: self
                .max_messages_per_connection
                .or(base.max_messages_per_connection),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PresetFile {
    provider: BTreeMap<String, ProviderConfig>,
}

/// The shipped presets, parsed.
pub fn presets() -> Result<BTreeMap<String, ProviderConfig>, toml::de::Error> {
    toml::from_str::<PresetFile>(PRESETS).map(|f| f.provider)
}

/// Why the providers cannot be used, with the key to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvidersError {
    /// Dotted key (`provider.NAME.mx_suffixes`).
    pub key: String,
    pub message: String,
}

/// The providers in force: presets (when on) merged with the operator's
/// tables, and the matcher over their suffixes.
#[derive(Debug, Clone, Default)]
pub struct Providers {
    providers: BTreeMap<String, ProviderConfig>,
    matcher: ProviderMatcher,
}

impl Providers {
    /// Merges the operator's `[provider.*]` over the presets (when
    /// `use_presets`) and builds the matcher.
    pub fn build(
        operator: &BTreeMap<String, ProviderConfig>,
        use_presets: bool,
    ) -> Result<Providers, ProvidersError> {
        let mut providers = if use_presets {
            presets().map_err(|e| ProvidersError {
                key: "delivery.provider_presets".into(),
                message: format!("the built-in presets do not parse: {e}"),
            })?
        } else {
            BTreeMap::new()
        };
        for (name, table) in operator {
            let merged = match providers.get(name) {
                Some(preset) => table.clone().over(preset),
                None => {
                    if table.mx_suffixes.is_none() {
                        return Err(ProvidersError {
                            key: format!("provider.{name}.mx_suffixes"),
                            message: "needed: there is no preset of this name to take it from"
                                .into(),
                        });
                    }
                    table.clone()
                }
            };
            providers.insert(name.clone(), merged);
        }
        let matcher = ProviderMatcher::new(providers.iter().map(|(name, p)| {
            (
                name.as_str(),
                p.mx_suffixes.as_deref().unwrap_or_default().iter(),
            )
        }))
        .map_err(|e: ProviderError| {
            // Blame a table the operator wrote, when one is involved.
            let written = |n: &str| operator.get(n).is_some_and(|t| t.mx_suffixes.is_some());
            let name = match &e {
                ProviderError::Duplicate { first, second, .. } if !written(second) => first,
                _ => e.provider(),
            };
            ProvidersError {
                key: format!("provider.{name}.mx_suffixes"),
                message: e.to_string(),
            }
        })?;
        Ok(Providers { providers, matcher })
    }

    /// The provider an MX host name belongs to.
    pub fn provider_of(&self, host: &str) -> Option<&str> {
        self.matcher.provider_of(host)
    }

    /// The provider's limits; keys it leaves out take the `[delivery]
    /// host_*` values. None for an unknown name.
    pub fn limits(&self, name: &str, d: &DeliverySection) -> Option<HostLimits> {
        let p = self.providers.get(name)?;
        Some(HostLimits {
            max_connections: p.max_connections.unwrap_or(d.max_connections_per_host),
            connection_rate: p
                .connection_rate
                .clone()
                .unwrap_or_else(|| d.host_connection_rate.clone()),
            message_rate: p
                .message_rate
                .clone()
                .unwrap_or_else(|| d.host_message_rate.clone()),
            max_messages_per_connection: p
                .max_messages_per_connection
                .unwrap_or(d.host_max_messages_per_connection),
        })
    }

    /// Provider names with their suffixes, for `sluice debug`.
    pub fn names(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.providers
            .iter()
            .map(|(n, p)| (n.as_str(), p.mx_suffixes.as_deref().unwrap_or_default()))
    }
}

/// What a connection to a destination host counts against: the host
/// itself, or its provider per source IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    /// `throttle::host_key` of the host.
    Host(String),
    /// The provider (by name) and the source IP key.
    Provider { name: String, source_ip: String },
}

/// Prefix of a provider's key in the host owners' tables; no host name or
/// IP address starts with it.
const PROVIDER_PREFIX: &str = "provider:";

impl LimitKey {
    /// The key as the owner tables and the mesh carry it:
    /// `mx.example.com`, or `provider:google|default`.
    pub fn as_key(&self) -> String {
        match self {
            LimitKey::Host(h) => h.clone(),
            LimitKey::Provider { name, source_ip } => {
                format!("{PROVIDER_PREFIX}{name}|{source_ip}")
            }
        }
    }

    /// The inverse of [`LimitKey::as_key`].
    pub fn parse(key: &str) -> LimitKey {
        match key
            .strip_prefix(PROVIDER_PREFIX)
            .and_then(|rest| rest.split_once('|'))
        {
            Some((name, ip)) => LimitKey::Provider {
                name: name.to_string(),
                source_ip: ip.to_string(),
            },
            None => LimitKey::Host(key.to_string()),
        }
    }

    /// The provider's name, when it is one.
    pub fn provider(&self) -> Option<&str> {
        match self {
            LimitKey::Provider { name, .. } => Some(name),
            LimitKey::Host(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn load(text: &str) -> Result<Config, String> {
        Config::load("t", text, &[]).map_err(|e| e.to_string())
    }

    #[test]
    fn presets_parse_and_cover_the_big_providers() {
        let p = presets().expect("presets");
        for name in [
            "google",
            "microsoft",
            "yahoo",
            "apple",
            "comcast",
            "gmx",
            "orange",
            "yandex",
            "mailru",
            "zoho",
            "proofpoint",
            "mimecast",
        ] {
            let entry = p.get(name).unwrap_or_else(|| panic!("{name} preset"));
            assert!(
                entry.mx_suffixes.as_ref().is_some_and(|s| !s.is_empty()),
                "{name}"
            );
            assert!(entry.max_connections.is_some_and(|n| n > 0), "{name}");
        }
        let all = Providers::build(&BTreeMap::new(), true).expect("presets build");
        for (host, want) in [
            ("aspmx.l.google.com", Some("google")),
            ("gmail-smtp-in.l.google.com", Some("google")),
            ("example-com.mail.protection.outlook.com", Some("microsoft")),
            ("mta6.am0.yahoodns.net", Some("yahoo")),
            ("mx01.mail.icloud.com", Some("apple")),
            ("mx1a1.comcast.net", Some("comcast")),
            ("mx00.emig.gmx.net", Some("gmx")),
            ("mx-ha03.web.de", Some("gmx")),
            ("smtp-in.orange.fr", Some("orange")),
            ("mx.yandex.ru", Some("yandex")),
            ("mxs.mail.ru", Some("mailru")),
            ("mx.zoho.eu", Some("zoho")),
            ("mx0a-001b2d01.pphosted.com", Some("proofpoint")),
            ("eu-smtp-inbound-1.mimecast.com", Some("mimecast")),
            ("mx.example.net", None),
            ("mx.hotmail.com.example", None),
        ] {
            assert_eq!(all.provider_of(host), want, "{host}");
        }
    }

    #[test]
    fn operator_tables_override_presets_key_by_key() {
        let c = load(
            "[delivery]\nmax_connections_per_host = 7\nhost_message_rate = [\"9/s\"]\n\
             [provider.google]\nmax_connections = 3\n\
             [provider.own]\nmx_suffixes = [\"mx.example.net\"]\n",
        )
        .expect("config");
        let d = c.delivery_config();
        let g = d.providers.limits("google", &d.delivery).expect("google");
        assert_eq!(g.max_connections, 3, "the operator's key");
        assert_eq!(g.max_messages_per_connection, 100, "the preset's key");
        assert_eq!(g.message_rate, vec!["9/s".parse().expect("rate")]);
        assert_eq!(
            d.providers.provider_of("alt1.aspmx.l.google.com"),
            Some("google")
        );
        let own = d.providers.limits("own", &d.delivery).expect("own");
        assert_eq!(own.max_connections, 7, "[delivery] host value");
        assert_eq!(d.providers.provider_of("a.mx.example.net"), Some("own"));
        // Presets off: only the operator's providers (whole tables).
        let c = load(
            "[delivery]\nprovider_presets = false\n\
             [provider.own]\nmx_suffixes = [\"example.net\"]\n",
        )
        .expect("config");
        let d = c.delivery_config();
        assert_eq!(d.providers.provider_of("aspmx.l.google.com"), None);
        assert_eq!(d.providers.provider_of("mx.example.net"), Some("own"));
        // An empty suffix list turns a preset off.
        let c = load("[provider.google]\nmx_suffixes = []\n").expect("config");
        let d = c.delivery_config();
        assert_eq!(d.providers.provider_of("aspmx.l.google.com"), None);
        assert_eq!(d.providers.provider_of("mx.yandex.ru"), Some("yandex"));
    }

    #[test]
    fn provider_errors_name_key_and_line() {
        for (text, key, line) in [
            (
                "[delivery]\nenabled = true\n[provider.own]\nmax_connections = 2\n",
                "provider.own.mx_suffixes",
                3,
            ),
            (
                "[provider.own]\nmx_suffixes = [\"bad suffix\"]\n",
                "provider.own.mx_suffixes",
                2,
            ),
            (
                "\n[provider.own]\nmx_suffixes = [\"google.com\"]\n",
                "provider.own.mx_suffixes",
                3,
            ),
            (
                "[provider.google]\nmax_conections = 2\n",
                "provider.google.max_conections",
                2,
            ),
            (
                "[provider.google]\nmessage_rate = [\"5/fortnight\"]\n",
                "provider.google.message_rate",
                2,
            ),
        ] {
            let err = load(text).expect_err(text);
            assert!(err.contains(key), "{text}: {err}");
            assert!(err.contains(&format!("line {line}")), "{text}: {err}");
        }
    }

    #[test]
    fn a_host_entry_beats_its_provider_and_providers_count_per_source_ip() {
        let c = load(
            "[delivery]\nmax_connections_per_host = 5\n\
             [provider.google]\nmax_connections = 3\n\
             [host.\"alt4.aspmx.l.google.com\"]\nmax_connections = 1\n",
        )
        .expect("config");
        let d = c.delivery_config();
        let google = |ip: &str| LimitKey::Provider {
            name: "google".into(),
            source_ip: ip.into(),
        };
        assert_eq!(
            d.limit_key("ASPMX.L.Google.com.", "default"),
            google("default")
        );
        assert_eq!(
            d.limit_key("aspmx.l.google.com", "192.0.2.7"),
            google("192.0.2.7"),
            "one key per provider and source IP"
        );
        assert_eq!(d.limits_for(&google("default").as_key()).max_connections, 3);
        // The operator named this host: its own entry, its own count.
        let own = d.limit_key("alt4.aspmx.l.google.com.", "default");
        assert_eq!(own, LimitKey::Host("alt4.aspmx.l.google.com".into()));
        assert_eq!(d.limits_for(&own.as_key()).max_connections, 1);
        // No provider: the host under the [delivery] values.
        let plain = d.limit_key("mx.example.net", "default");
        assert_eq!(plain, LimitKey::Host("mx.example.net".into()));
        assert_eq!(d.limits_for(&plain.as_key()).max_connections, 5);
        assert_eq!(
            d.limit_key("192.0.2.1", "default"),
            LimitKey::Host("192.0.2.1".into())
        );
    }

    #[test]
    fn limit_keys_round_trip() {
        for k in [
            LimitKey::Host("mx.example.com".into()),
            LimitKey::Host("2001:db8::1".into()),
            LimitKey::Provider {
                name: "google".into(),
                source_ip: "default".into(),
            },
            LimitKey::Provider {
                name: "own".into(),
                source_ip: "2001:db8::7".into(),
            },
        ] {
            assert_eq!(LimitKey::parse(&k.as_key()), k);
        }
        assert_eq!(
            LimitKey::Provider {
                name: "google".into(),
                source_ip: "192.0.2.7".into()
            }
            .as_key(),
            "provider:google|192.0.2.7"
        );
    }
}
