//! `[shaping]`: response-driven shaping rules (`[[shaping.rule]]`) and slow
//! start. The rules and their matching are `sluice_policy::shaping`'s; the
//! engine side is `delivery::shaping`.

use serde::Deserialize;
use sluice_policy::shaping::{ShapingError, ShapingRuleConfig, ShapingRules};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShapingSection {
    /// Concurrency to a site starts at `slow_start_initial` and grows with
    /// successful deliveries up to the configured limit; deferrals halve it.
    pub slow_start: bool,
    /// Connections a site starts with under slow start.
    pub slow_start_initial: u32,
    /// Ordered rules; every matching rule counts the reply.
    pub rule: Vec<ShapingRuleConfig>,
}

impl Default for ShapingSection {
    fn default() -> Self {
        ShapingSection {
            slow_start: false,
            slow_start_initial: 2,
            rule: Vec::new(),
        }
    }
}

impl ShapingSection {
    pub fn rules(&self) -> Result<ShapingRules, ShapingError> {
        ShapingRules::compile(&self.rule)
    }
}
