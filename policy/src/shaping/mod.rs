//! Response-driven shaping: what the relay does when a destination's replies
//! say it is sending too much (throttling, blocks), and how many connections a
//! site gets as deliveries succeed or are deferred (slow start).
//!
//! * [`ShapingRules`]: the ordered `[[shaping.rule]]` list, compiled once. A
//!   rule matches a reply (code, enhanced-status prefix, text regex, bounce
//!   class; every key present must hold) in a scope (a destination name,
//!   `*.suffix`, or every site), counts matching replies per site, and fires
//!   when `threshold` (`3/5m`: 3 matches within 5 minutes) is reached.
//! * [`Shaper`]: the per-site windows of one core, fed replies with the time
//!   passed in; answers the actions that fired.
//! * [`SlowStart`]: a site's concurrency window, from a low start up to the
//!   configured limit, halved on a deferral.
//!
//! Pure and synchronous: the engine owns the clock, the storage and the effect
//! of each action.

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::Duration;

use regex::{Regex, RegexBuilder};
use serde::Deserialize;

use crate::bounce::{BounceClass, Enhanced, EnhancedPrefix, ReplyParts, MAX_TEXT};
use crate::Rate;

/// At most this many rules.
pub const MAX_RULES: usize = 1_000;
/// Sites whose windows one [`Shaper`] keeps; beyond it the stalest go.
pub const MAX_TRACKED: usize = 100_000;
/// Largest threshold count (each match in the window is remembered).
pub const MAX_THRESHOLD: u32 = 10_000;
/// Longest action.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 86_400);
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// What a fired rule does to the site, for `duration`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// No connection to the destination (every source IP); its mail waits.
    Suspend,
    /// No connection to the site from the source IP that got the reply.
    SuspendSourceIp,
    /// At most this many connections to the site.
    Connections(u32),
    /// At most this message rate to the site.
    MessageRate(Rate),
    /// Mail queued for the site fails (DSNs); so does mail arriving for it.
    Bounce,
    /// Concurrency halved now and regained slowly.
    Backoff,
}

impl Action {
    /// The name in the config, logs, metrics and API.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Suspend => "suspend",
            Action::SuspendSourceIp => "suspend-source-ip",
            Action::Connections(_) => "connections",
            Action::MessageRate(_) => "message-rate",
            Action::Bounce => "bounce",
            Action::Backoff => "backoff",
        }
    }

    /// The action's value ("2", "10/m") or "".
    pub fn value(&self) -> String {
        match self {
            Action::Connections(n) => n.to_string(),
            Action::MessageRate(r) => r.to_string(),
            _ => String::new(),
        }
    }

    /// Rebuilds an action from its name and value (as stored).
    pub fn from_parts(name: &str, value: &str) -> Option<Action> {
        Some(match name {
            "suspend" => Action::Suspend,
            "suspend-source-ip" => Action::SuspendSourceIp,
            "connections" => Action::Connections(value.parse().ok().filter(|n| *n > 0)?),
            "message-rate" => Action::MessageRate(value.parse().ok()?),
            "bounce" => Action::Bounce,
            "backoff" => Action::Backoff,
            _ => return None,
        })
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Connections(_) | Action::MessageRate(_) => {
                write!(f, "{}={}", self.name(), self.value())
            }
            _ => f.write_str(self.name()),
        }
    }
}

/// One `[[shaping.rule]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapingRuleConfig {
    /// Names the rule in logs, metrics and the API.
    pub name: String,
    /// Reply codes, any of.
    #[serde(default)]
    pub code: Vec<u16>,
    /// Enhanced status prefixes ("4.7", "5.7.1", "x.7"), any of.
    #[serde(default)]
    pub enhanced: Vec<String>,
    /// Regex over the reply text, case-insensitive.
    #[serde(default)]
    pub text: Option<String>,
    /// Bounce classes, any of.
    #[serde(default)]
    pub class: Vec<BounceClass>,
    /// Destination scope: a name, "*.suffix", or absent for every site.
    #[serde(default)]
    pub site: Option<String>,
    /// "N/PERIOD": N matching replies within PERIOD at one site.
    pub threshold: Rate,
    /// suspend, suspend-source-ip, connections, message-rate, bounce, backoff.
    pub action: String,
    /// For action = "connections".
    #[serde(default)]
    pub connections: Option<u32>,
    /// For action = "message-rate".
    #[serde(default)]
    pub message_rate: Option<Rate>,
    /// How long the action lasts ("10m", "1h").
    pub duration: String,
}

/// A rule that does not compile: `rule` is 1-based as an operator counts
/// `[[shaping.rule]]` tables.
#[derive(Debug, thiserror::Error)]
#[error("shaping.rule {rule} ({name}): {key}: {reason}")]
pub struct ShapingError {
    pub rule: usize,
    pub name: String,
    pub key: &'static str,
    pub reason: String,
}

/// Where a rule applies.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    Any,
    Exact(String),
    /// ".example.com": the name ends with it (the bare name too).
    Suffix(String),
}

impl Scope {
    fn matches(&self, destination: &str) -> bool {
        match self {
            Scope::Any => true,
            Scope::Exact(d) => d == destination,
            Scope::Suffix(s) => destination.ends_with(s.as_str()) || destination == &s[1..],
        }
    }
}

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    code: Vec<u16>,
    enhanced: Vec<EnhancedPrefix>,
    text: Option<Regex>,
    class: Vec<BounceClass>,
    scope: Scope,
    pub threshold: Rate,
    pub action: Action,
    pub duration_ms: u64,
}

/// The reply a delivery got, as the rules see it.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub reply: ReplyParts<'a>,
    /// Its bounce class, when the caller classified it.
    pub class: Option<BounceClass>,
}

impl Rule {
    fn matches(&self, destination: &str, o: &Observed<'_>) -> bool {
        if !self.scope.matches(destination) {
            return false;
        }
        if !self.code.is_empty() && !self.code.contains(&o.reply.code) {
            return false;
        }
        if !self.enhanced.is_empty() {
            let Some(s) = &o.reply.enhanced else {
                return false;
            };
            if !self.enhanced.iter().any(|p| p.matches(s)) {
                return false;
            }
        }
        if !self.class.is_empty() && !o.class.is_some_and(|c| self.class.contains(&c)) {
            return false;
        }
        if let Some(re) = &self.text {
            let mut end = o.reply.text.len().min(MAX_TEXT);
            while !o.reply.text.is_char_boundary(end) {
                end -= 1;
            }
            if !re.is_match(&o.reply.text[..end]) {
                return false;
            }
        }
        true
    }
}

/// The compiled rule list.
#[derive(Debug, Default)]
pub struct ShapingRules {
    rules: Vec<Rule>,
}

impl ShapingRules {
    /// Compiles the rules, checking every key.
    pub fn compile(configs: &[ShapingRuleConfig]) -> Result<ShapingRules, ShapingError> {
        if configs.len() > MAX_RULES {
            return Err(ShapingError {
                rule: MAX_RULES + 1,
                name: String::new(),
                key: "rule",
                reason: format!("at most {MAX_RULES} rules"),
            });
        }
        let mut rules = Vec::with_capacity(configs.len());
        for (i, c) in configs.iter().enumerate() {
            let bad = |key: &'static str, reason: String| ShapingError {
                rule: i + 1,
                name: c.name.clone(),
                key,
                reason,
            };
            if c.name.is_empty()
                || c.name.len() > 64
                || !c
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(bad(
                    "name",
                    "1 to 64 letters, digits, '-', '_' or '.'".into(),
                ));
            }
            if rules.iter().any(|r: &Rule| r.name == c.name) {
                return Err(bad("name", "another rule has this name".into()));
            }
            if c.code.iter().any(|code| !(200..=599).contains(code)) {
                return Err(bad("code", "reply codes are 200 to 599".into()));
            }
            let enhanced = c
                .enhanced
                .iter()
                .map(|e| EnhancedPrefix::parse(e))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad("enhanced", e))?;
            let text = c
                .text
                .as_deref()
                .map(|t| {
                    RegexBuilder::new(t)
                        .case_insensitive(true)
                        .size_limit(REGEX_SIZE_LIMIT)
                        .build()
                })
                .transpose()
                .map_err(|e| bad("text", e.to_string()))?;
            if c.code.is_empty() && enhanced.is_empty() && text.is_none() && c.class.is_empty() {
                return Err(bad(
                    "code",
                    "a rule needs at least one of code, enhanced, text or class".into(),
                ));
            }
            let scope = match c.site.as_deref().map(|s| s.trim().to_ascii_lowercase()) {
                None => Scope::Any,
                Some(s) if s == "*" => Scope::Any,
                Some(s) if s.starts_with("*.") && s.len() > 2 => Scope::Suffix(s[1..].to_string()),
                Some(s) if !s.is_empty() && !s.contains('*') => {
                    Scope::Exact(s.trim_end_matches('.').to_string())
                }
                Some(s) => return Err(bad("site", format!("`{s}` is not a name or *.suffix"))),
            };
            if c.threshold.count > MAX_THRESHOLD {
                return Err(bad(
                    "threshold",
                    format!("at most {MAX_THRESHOLD} replies per window"),
                ));
            }
            let action = match (c.action.as_str(), c.connections, c.message_rate) {
                ("connections", Some(n), None) if n > 0 => Action::Connections(n),
                ("connections", _, _) => return Err(bad(
                    "connections",
                    "action connections needs connections = N (at least 1), and no message_rate"
                        .into(),
                )),
                ("message-rate", None, Some(r)) => Action::MessageRate(r),
                ("message-rate", _, _) => {
                    return Err(bad(
                        "message_rate",
                        "action message-rate needs message_rate = \"N/PERIOD\", and no connections"
                            .into(),
                    ))
                }
                (_, Some(_), _) => {
                    return Err(bad(
                        "connections",
                        "only for action = \"connections\"".into(),
                    ))
                }
                (_, _, Some(_)) => {
                    return Err(bad(
                        "message_rate",
                        "only for action = \"message-rate\"".into(),
                    ))
                }
                (name, None, None) => Action::from_parts(name, "").ok_or_else(|| {
                    bad(
                        "action",
                        format!(
                            "`{name}` is not one of suspend, suspend-source-ip, connections, \
                             message-rate, bounce, backoff"
                        ),
                    )
                })?,
            };
            let duration = humantime::parse_duration(c.duration.trim())
                .map_err(|e| bad("duration", format!("`{}`: {e}", c.duration)))?;
            if duration.is_zero() || duration > MAX_DURATION {
                return Err(bad(
                    "duration",
                    "must be more than 0 and at most 30 days".into(),
                ));
            }
            rules.push(Rule {
                name: c.name.clone(),
                code: c.code.clone(),
                enhanced,
                text,
                class: c.class.clone(),
                scope,
                threshold: c.threshold,
                action,
                duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            });
        }
        Ok(ShapingRules { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
}

/// A rule that fired at a site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    pub rule: String,
    pub action: Action,
    /// When the action ends (unix ms).
    pub until_ms: u64,
}

/// Matching replies per (rule, site) on one core: the sites this core owns.
#[derive(Debug, Default)]
pub struct Shaper {
    /// (rule index, site) → times of the matches still in the window.
    windows: HashMap<(usize, String), VecDeque<u64>>,
}

impl Shaper {
    /// Counts a reply got at `site` (whose destination is `destination`) and
    /// answers the rules whose threshold it reached. A rule that fires starts
    /// counting afresh.
    pub fn observe(
        &mut self,
        rules: &ShapingRules,
        site: &str,
        destination: &str,
        observed: &Observed<'_>,
        now_ms: u64,
    ) -> Vec<Fired> {
        let mut fired = Vec::new();
        for (i, rule) in rules.rules.iter().enumerate() {
            if !rule.matches(destination, observed) {
                continue;
            }
            if self.windows.len() >= MAX_TRACKED {
                self.forget_stale(rules, now_ms);
            }
            let window = self.windows.entry((i, site.to_string())).or_default();
            let start = now_ms.saturating_sub(rule.threshold.per_ms);
            while window.front().is_some_and(|t| *t <= start) {
                window.pop_front();
            }
            window.push_back(now_ms);
            if window.len() >= rule.threshold.count as usize {
                window.clear();
                fired.push(Fired {
                    rule: rule.name.clone(),
                    action: rule.action.clone(),
                    until_ms: now_ms.saturating_add(rule.duration_ms),
                });
            }
        }
        fired
    }

    /// Drops windows with nothing left in them; if that frees nothing, the
    /// windows whose last match is oldest.
    fn forget_stale(&mut self, rules: &ShapingRules, now_ms: u64) {
        self.windows.retain(|(i, _), w| {
            let per = rules.rules.get(*i).map_or(0, |r| r.threshold.per_ms);
            w.back().is_some_and(|t| *t > now_ms.saturating_sub(per))
        });
        if self.windows.len() >= MAX_TRACKED {
            let mut lasts: Vec<u64> = self
                .windows
                .values()
                .map(|w| w.back().copied().unwrap_or(0))
                .collect();
            lasts.sort_unstable();
            let cut = lasts[lasts.len() / 2];
            self.windows
                .retain(|_, w| w.back().copied().unwrap_or(0) > cut);
        }
    }

    /// Windows held (for tests and bounds).
    pub fn tracked(&self) -> usize {
        self.windows.len()
    }
}

/// A site's concurrency: starts at `initial`, +1 per success until the first
/// deferral, then +1 per `limit` successes (additive increase), halved by a
/// deferral (multiplicative decrease); never below 1 nor above `max`. In
/// backoff mode growth is ten times slower still.
#[derive(Debug, Clone)]
pub struct SlowStart {
    limit: u32,
    max: u32,
    successes: u32,
    /// A deferral was seen: growth is additive from now on.
    avoiding: bool,
}

/// How much slower a site in backoff mode regains concurrency.
pub const BACKOFF_SLOWDOWN: u32 = 10;

impl SlowStart {
    pub fn new(initial: u32, max: u32) -> SlowStart {
        let max = max.max(1);
        SlowStart {
            limit: initial.clamp(1, max),
            max,
            successes: 0,
            avoiding: false,
        }
    }

    /// Connections allowed now.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// A new ceiling (the site's configured limit changed): a lower one caps
    /// the window at once, a higher one is grown into as before.
    pub fn set_max(&mut self, max: u32) {
        self.max = max.max(1);
        self.limit = self.limit.min(self.max);
    }

    /// A delivery succeeded; `backoff` when the site is in backoff mode.
    pub fn success(&mut self, backoff: bool) {
        if self.limit >= self.max {
            return;
        }
        self.successes += 1;
        let needed = match (self.avoiding, backoff) {
            (_, true) => self.limit.saturating_mul(BACKOFF_SLOWDOWN),
            (true, false) => self.limit,
            (false, false) => 1,
        };
        if self.successes >= needed {
            self.successes = 0;
            self.limit += 1;
        }
    }

    /// The site deferred a delivery (a 4xx from the next hop).
    pub fn deferral(&mut self) {
        self.limit = (self.limit / 2).max(1);
        self.successes = 0;
        self.avoiding = true;
    }
}

/// The enhanced status as the rules take it.
pub fn enhanced(class: u8, subject: u16, detail: u16) -> Enhanced {
    Enhanced {
        class,
        subject,
        detail,
    }
}
