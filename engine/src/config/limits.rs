//! `[[limit]]` (inbound rate and concurrency limits) and `[ban]` (auto-ban of
//! addresses that fail AUTH, try to relay or scan). The decisions are
//! `sluice_policy::inbound_limits` and `sluice_policy::ban`'s.

use serde::{Deserialize, Deserializer};
use sluice_policy::ban::{BanPolicy, MAX_THRESHOLD};
use sluice_policy::inbound_limits::{LimitKey, LimitReply, LimitRule};
use sluice_policy::{NetworkList, Rate};

use super::HumanDuration;

/// Keys tracked by all `[[limit]]` rules together (idle ones are dropped first).
pub const MAX_TRACKED_KEYS: usize = 262_144;

/// One `[[limit]]` table as written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// For logs and metrics (default: `limit<N>`).
    pub name: Option<String>,
    /// ip, network, sender, sender_domain, recipient or auth_user.
    pub key: String,
    /// Prefix lengths of a `network` key.
    pub prefix_v4: Option<u8>,
    pub prefix_v6: Option<u8>,
    /// Transactions (RCPTs for a `recipient` key) per period, e.g. "100/m".
    pub rate: Option<Rate>,
    /// New connections per period (`ip` and `network` keys).
    pub connection_rate: Option<Rate>,
    /// Open connections (`ip`, `network`) or transactions in flight (others).
    pub concurrency: Option<u32>,
    /// Listeners it applies to (default all).
    #[serde(default)]
    pub listeners: Vec<String>,
    /// "CODE X.Y.Z text" replacing the default reply.
    pub reply: Option<String>,
}

/// A `[[limit]]` error: which key of which rule, and why.
#[derive(Debug)]
pub struct LimitError {
    /// 1-based.
    pub rule: usize,
    pub key: &'static str,
    pub reason: String,
}

fn parse_reply(text: &str) -> Result<LimitReply, String> {
    let mut parts = text.trim().splitn(3, ' ');
    let (Some(code), Some(status), text) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("`{text}`: expected \"CODE X.Y.Z text\""));
    };
    let code: u16 = code
        .parse()
        .map_err(|_| format!("`{code}` is not a reply code"))?;
    if !(400..600).contains(&code) {
        return Err(format!("{code}: a refusal is 4xx or 5xx"));
    }
    let class = status.split('.').collect::<Vec<_>>();
    let numeric = class.len() == 3 && class.iter().all(|p| p.parse::<u16>().is_ok());
    if !numeric || class[0] != (code / 100).to_string() {
        return Err(format!(
            "`{status}` is not an enhanced status code of class {}",
            code / 100
        ));
    }
    let text = text.unwrap_or("Error: rate limit exceeded").trim();
    if text.len() > 200 || text.chars().any(|c| c.is_control()) {
        return Err("the text must be at most 200 characters on one line".into());
    }
    Ok(LimitReply {
        code,
        status: status.to_string(),
        text: text.to_string(),
    })
}

impl LimitConfig {
    fn rule(&self, n: usize, listeners: &[&str]) -> Result<LimitRule, LimitError> {
        let err = |key: &'static str, reason: String| LimitError {
            rule: n,
            key,
            reason,
        };
        let key = match self.key.as_str() {
            "ip" => LimitKey::Ip,
            "network" => {
                let v4 = self.prefix_v4.unwrap_or(24);
                let v6 = self.prefix_v6.unwrap_or(64);
                if v4 > 32 {
                    return Err(err("prefix_v4", format!("{v4}: at most 32")));
                }
                if v6 > 128 {
                    return Err(err("prefix_v6", format!("{v6}: at most 128")));
                }
                LimitKey::Network { v4, v6 }
            }
            "sender" => LimitKey::Sender,
            "sender_domain" => LimitKey::SenderDomain,
            "recipient" => LimitKey::Recipient,
            "auth_user" => LimitKey::AuthUser,
            other => {
                return Err(err(
                    "key",
                    format!(
                    "`{other}`: one of ip, network, sender, sender_domain, recipient, auth_user"
                ),
                ))
            }
        };
        if !matches!(key, LimitKey::Network { .. })
            && (self.prefix_v4.is_some() || self.prefix_v6.is_some())
        {
            return Err(err("prefix_v4", "only for key = \"network\"".into()));
        }
        if self.connection_rate.is_some() && !key.is_client() {
            return Err(err(
                "connection_rate",
                "only for key = \"ip\" or \"network\"".into(),
            ));
        }
        if self.rate.is_none() && self.connection_rate.is_none() && self.concurrency.is_none() {
            return Err(err(
                "rate",
                "set rate, connection_rate or concurrency".into(),
            ));
        }
        if self.concurrency == Some(0) {
            return Err(err("concurrency", "must be at least 1".into()));
        }
        for l in &self.listeners {
            if !listeners.contains(&l.as_str()) {
                return Err(err("listeners", format!("no listener named `{l}`")));
            }
        }
        let reply = self
            .reply
            .as_deref()
            .map(parse_reply)
            .transpose()
            .map_err(|e| err("reply", e))?;
        Ok(LimitRule {
            name: self.name.clone().unwrap_or_else(|| format!("limit{n}")),
            key,
            rate: self.rate,
            connection_rate: self.connection_rate,
            concurrency: self.concurrency,
            listeners: self.listeners.clone(),
            reply,
        })
    }
}

/// `[[limit]]` rules at most (every decision walks them).
pub const MAX_RULES: usize = 256;

/// The rules of `[[limit]]`, validated.
pub fn limit_rules(
    limits: &[LimitConfig],
    listeners: &[&str],
) -> Result<Vec<LimitRule>, LimitError> {
    if limits.len() > MAX_RULES {
        return Err(LimitError {
            rule: MAX_RULES + 1,
            key: "key",
            reason: format!("at most {MAX_RULES} [[limit]] rules"),
        });
    }
    limits
        .iter()
        .enumerate()
        .map(|(i, l)| l.rule(i + 1, listeners))
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BanSection {
    /// Off by default: no offence counted, no address refused.
    pub enabled: bool,
    /// Failed AUTH attempts within a window that ban ("off": not counted).
    #[serde(deserialize_with = "threshold")]
    pub auth_failures: Option<Rate>,
    /// RCPTs refused as relay attempts within a window that ban.
    #[serde(deserialize_with = "threshold")]
    pub relay_attempts: Option<Rate>,
    /// Sessions ending without a MAIL accepted (nor AUTH) within a window.
    #[serde(deserialize_with = "threshold")]
    pub scans: Option<Rate>,
    /// How long a ban lasts.
    pub duration: HumanDuration,
    /// Never banned (besides relay.relay_networks).
    pub exempt_networks: Vec<String>,
    /// Addresses whose offences are counted at most.
    pub max_tracked: usize,
}

impl Default for BanSection {
    fn default() -> Self {
        BanSection {
            enabled: false,
            auth_failures: Some(Rate {
                count: 10,
                per_ms: 600_000,
            }),
            relay_attempts: Some(Rate {
                count: 5,
                per_ms: 600_000,
            }),
            scans: None,
            duration: HumanDuration(std::time::Duration::from_secs(3600)),
            exempt_networks: Vec::new(),
            max_tracked: 65_536,
        }
    }
}

impl BanSection {
    /// The policy, with `relay_networks` exempt too. Err: (key, why).
    pub fn policy(&self, relay_networks: &[String]) -> Result<BanPolicy, (&'static str, String)> {
        for (key, t) in [
            ("auth_failures", self.auth_failures),
            ("relay_attempts", self.relay_attempts),
            ("scans", self.scans),
        ] {
            if t.is_some_and(|r| r.count > MAX_THRESHOLD) {
                return Err((key, format!("the count is at most {MAX_THRESHOLD}")));
            }
        }
        if self.duration.0.is_zero() {
            return Err(("duration", "must be more than 0".into()));
        }
        if self.max_tracked == 0 {
            return Err(("max_tracked", "must be at least 1".into()));
        }
        let mut nets: Vec<String> = self.exempt_networks.clone();
        nets.extend(relay_networks.iter().cloned());
        let exempt = NetworkList::parse(&nets).map_err(|e| ("exempt_networks", e.to_string()))?;
        Ok(BanPolicy {
            thresholds: [self.auth_failures, self.relay_attempts, self.scans],
            duration_ms: u64::try_from(self.duration.0.as_millis()).unwrap_or(u64::MAX),
            exempt,
            max_tracked: self.max_tracked,
        })
    }
}

fn threshold<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Rate>, D::Error> {
    let text = String::deserialize(d)?;
    if text == "off" {
        return Ok(None);
    }
    text.parse::<Rate>()
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("{e} (or \"off\")")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_and_are_checked() {
        let r = parse_reply("450 4.7.1 Slow down please").expect("reply");
        assert_eq!(
            (r.code, r.status.as_str(), r.text.as_str()),
            (450, "4.7.1", "Slow down please")
        );
        for bad in [
            "",
            "450",
            "250 2.0.0 ok",
            "450 5.7.1 x",
            "450 4.7 x",
            "abc 4.7.1 x",
        ] {
            assert!(parse_reply(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rules_validate_naming_the_key() {
        let base = LimitConfig {
            key: "ip".into(),
            rate: Some("10/m".parse().expect("rate")),
            ..LimitConfig::default()
        };
        assert!(limit_rules(std::slice::from_ref(&base), &["smtp"]).is_ok());
        let cases: Vec<(LimitConfig, &str)> = vec![
            (
                LimitConfig {
                    key: "ipaddr".into(),
                    ..base.clone()
                },
                "key",
            ),
            (
                LimitConfig {
                    rate: None,
                    ..base.clone()
                },
                "rate",
            ),
            (
                LimitConfig {
                    concurrency: Some(0),
                    ..base.clone()
                },
                "concurrency",
            ),
            (
                LimitConfig {
                    listeners: vec!["nope".into()],
                    ..base.clone()
                },
                "listeners",
            ),
            (
                LimitConfig {
                    key: "sender".into(),
                    connection_rate: base.rate,
                    ..base.clone()
                },
                "connection_rate",
            ),
            (
                LimitConfig {
                    key: "network".into(),
                    prefix_v4: Some(33),
                    ..base.clone()
                },
                "prefix_v4",
            ),
            (
                LimitConfig {
                    prefix_v6: Some(48),
                    ..base.clone()
                },
                "prefix_v4",
            ),
            (
                LimitConfig {
                    reply: Some("250 2.0.0 fine".into()),
                    ..base.clone()
                },
                "reply",
            ),
        ];
        for (cfg, key) in cases {
            let e = limit_rules(&[base.clone(), cfg], &["smtp"]).expect_err(key);
            assert_eq!((e.rule, e.key), (2, key), "{}", e.reason);
        }
    }
}
