//! `[suppression]`: recipients that hard-bounced are refused (or dropped) for
//! a while. The decisions are `sluice_policy::suppression`'s; the list lives in
//! `<spool.path>/suppression` (LMDB).

use serde::{Deserialize, Deserializer};
use sluice_policy::bounce::BounceClass;
use sluice_policy::suppression::{Action, ScopeMode, SuppressionPolicy};

use super::HumanDuration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SuppressionSection {
    /// Off by default: nothing is added, nothing refused.
    pub enabled: bool,
    /// Permanent failures of these classes add the recipient.
    pub classes: Vec<BounceClass>,
    /// How long an entry suppresses.
    pub ttl: HumanDuration,
    /// "sender-domain" (default) or "global".
    #[serde(deserialize_with = "scope")]
    pub scope: ScopeMode,
    /// "refuse" (550 at RCPT, default) or "drop" (failed at delivery).
    #[serde(deserialize_with = "action")]
    pub action: Action,
}

impl Default for SuppressionSection {
    fn default() -> Self {
        SuppressionSection {
            enabled: false,
            classes: vec![BounceClass::InvalidRecipient, BounceClass::BadDomain],
            ttl: HumanDuration(std::time::Duration::from_secs(30 * 86_400)),
            scope: ScopeMode::SenderDomain,
            action: Action::Refuse,
        }
    }
}

impl SuppressionSection {
    pub fn policy(&self) -> SuppressionPolicy {
        SuppressionPolicy {
            classes: self.classes.clone(),
            ttl_ms: u64::try_from(self.ttl.0.as_millis()).unwrap_or(u64::MAX),
            scope: self.scope,
            action: self.action,
        }
    }
}

fn scope<'de, D: Deserializer<'de>>(d: D) -> Result<ScopeMode, D::Error> {
    match String::deserialize(d)?.as_str() {
        "sender-domain" => Ok(ScopeMode::SenderDomain),
        "global" => Ok(ScopeMode::Global),
        other => Err(serde::de::Error::custom(format!(
            "`{other}` must be \"sender-domain\" or \"global\""
        ))),
    }
}

fn action<'de, D: Deserializer<'de>>(d: D) -> Result<Action, D::Error> {
    match String::deserialize(d)?.as_str() {
        "refuse" => Ok(Action::Refuse),
        "drop" => Ok(Action::Drop),
        other => Err(serde::de::Error::custom(format!(
            "`{other}` must be \"refuse\" or \"drop\""
        ))),
    }
}
