//! Bounce classification: which kind of failure a delivery reply reports.
//!
//! Every failed or deferred recipient carries a reply (ours for a local
//! condition, the next hop's otherwise): a code, an optional enhanced status
//! (RFC 3463) and a text. [`Classifier::classify`] maps it to a
//! [`BounceClass`] by ordered rules, first match wins:
//!
//! ```toml
//! [[rule]]
//! class = "rate-limited"
//! enhanced = ["4.7.28"]          # prefixes: "5.1" is 5.1.*, "x.2.2" is 4.2.2 or 5.2.2
//! code = [421, 451]              # any of (optional)
//! text = 'TSS0\d|unexpected volume'  # regex over the text, case-insensitive (optional)
//! ```
//!
//! Every key present must hold (AND); within `enhanced` or `code` any entry
//! may hold (OR); a rule needs at least one of the three. A reply without an
//! enhanced status never matches a rule that has `enhanced`. A rules file's
//! rules come before the shipped ones ([`DEFAULT_RULES`]), so they override
//! them; `defaults = false` at the top of the file drops the shipped rules.
//! No rule matching gives [`BounceClass::Other`].
//!
//! Pure: the rules are compiled once at load ([`Classifier::load`]) and
//! classifying is a few comparisons and regex matches over a bounded text.

mod class;
#[cfg(test)]
mod tests;

use std::fmt;

use regex::{Regex, RegexBuilder};
use serde::Deserialize;

pub use class::BounceClass;

/// The shipped rules (docs/bounce-classes.md explains them).
pub const DEFAULT_RULES: &str = include_str!("default_rules.toml");

/// A rules file larger than this is refused (the shipped one is ~6 KiB).
pub const MAX_RULES_FILE: usize = 1 << 20;
/// At most this many rules per file.
pub const MAX_RULES: usize = 10_000;
/// Compiled size limit of one rule's regex.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Only this much of a reply text is matched (longer texts are cut at a
/// character boundary); replies are bounded by the SMTP client already.
pub const MAX_TEXT: usize = 4096;

/// What went wrong loading rules: `origin` is the file (or "built-in rules"),
/// `rule` is 1-based as an operator counts `[[rule]]` tables, `line` the line
/// of the offending key when known.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {}{key}{}: {reason}",
    rule.map(|r| format!("rule {r}: ")).unwrap_or_default(),
    line.map(|l| format!(" (line {l})")).unwrap_or_default())]
pub struct BounceRulesError {
    pub origin: String,
    pub rule: Option<usize>,
    pub key: String,
    pub line: Option<usize>,
    pub reason: String,
}

/// One enhanced-status prefix: class (None: 4 or 5), then subject and detail
/// when given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EnhancedPrefix {
    class: Option<u8>,
    subject: Option<u16>,
    detail: Option<u16>,
}

impl EnhancedPrefix {
    pub(crate) fn parse(text: &str) -> Result<EnhancedPrefix, String> {
        let bad = || format!("`{text}` is not an enhanced status prefix like 5.1.1, 5.7 or x.2.2");
        let parts: Vec<&str> = text.trim().split('.').collect();
        if parts.is_empty() || parts.len() > 3 {
            return Err(bad());
        }
        let class = match parts[0] {
            "x" | "X" => None,
            "2" => Some(2),
            "4" => Some(4),
            "5" => Some(5),
            _ => return Err(bad()),
        };
        let num = |p: &str| -> Result<u16, String> {
            if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            p.parse().map_err(|_| bad())
        };
        let subject = parts.get(1).map(|p| num(p)).transpose()?;
        let detail = parts.get(2).map(|p| num(p)).transpose()?;
        Ok(EnhancedPrefix {
            class,
            subject,
            detail,
        })
    }

    pub(crate) fn matches(&self, s: &Enhanced) -> bool {
        self.class.is_none_or(|c| c == s.class)
            && self.subject.is_none_or(|v| v == s.subject)
            && self.detail.is_none_or(|v| v == s.detail)
    }
}

/// An enhanced status as classified (the spool's type converts into it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enhanced {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

/// The parts of a reply classification looks at.
#[derive(Debug, Clone, Copy)]
pub struct ReplyParts<'a> {
    /// 3-digit reply code; 0 when unknown.
    pub code: u16,
    pub enhanced: Option<Enhanced>,
    pub text: &'a str,
}

struct Rule {
    class: BounceClass,
    enhanced: Vec<EnhancedPrefix>,
    code: Vec<u16>,
    text: Option<Regex>,
}

impl Rule {
    fn matches(&self, r: &ReplyParts<'_>) -> bool {
        if !self.enhanced.is_empty() {
            let Some(s) = &r.enhanced else {
                return false;
            };
            if !self.enhanced.iter().any(|p| p.matches(s)) {
                return false;
            }
        }
        if !self.code.is_empty() && !self.code.contains(&r.code) {
            return false;
        }
        match &self.text {
            Some(re) => re.is_match(bounded(r.text)),
            None => true,
        }
    }
}

fn bounded(text: &str) -> &str {
    if text.len() <= MAX_TEXT {
        return text;
    }
    let mut end = MAX_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Compiled, ordered rules.
pub struct Classifier {
    rules: Vec<Rule>,
    /// How many of `rules` came from the operator's file (they come first).
    from_file: usize,
}

impl fmt::Debug for Classifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Classifier")
            .field("rules", &self.rules.len())
            .field("from_file", &self.from_file)
            .finish()
    }
}

impl Default for Classifier {
    /// The shipped rules alone.
    fn default() -> Classifier {
        // The shipped rules are tested to compile (tests::shipped_rules_compile);
        // should that ever break, classification degrades to "other" rather
        // than taking the relay down.
        match parse("built-in rules", DEFAULT_RULES) {
            Ok((rules, _)) => Classifier {
                rules,
                from_file: 0,
            },
            Err(_) => Classifier {
                rules: Vec::new(),
                from_file: 0,
            },
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRaw {
    #[serde(default = "yes")]
    defaults: bool,
    #[serde(default)]
    rule: Vec<toml::Spanned<RuleRaw>>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleRaw {
    class: toml::Spanned<String>,
    #[serde(default)]
    enhanced: Option<toml::Spanned<OneOrMany<String>>>,
    #[serde(default)]
    code: Option<toml::Spanned<OneOrMany<u16>>>,
    #[serde(default)]
    text: Option<toml::Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v],
            OneOrMany::Many(v) => v,
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Parses and compiles one rules text; also returns its `defaults` flag.
fn parse(origin: &str, text: &str) -> Result<(Vec<Rule>, bool), BounceRulesError> {
    let err =
        |rule: Option<usize>, key: &str, line: Option<usize>, reason: String| BounceRulesError {
            origin: origin.to_string(),
            rule,
            key: key.to_string(),
            line,
            reason,
        };
    if text.len() > MAX_RULES_FILE {
        return Err(err(
            None,
            "file",
            None,
            format!("larger than {MAX_RULES_FILE} bytes"),
        ));
    }
    let raw: FileRaw = toml::from_str(text).map_err(|e| {
        err(
            None,
            "syntax",
            e.span().map(|s| line_of(text, s.start)),
            e.message().trim().to_string(),
        )
    })?;
    if raw.rule.len() > MAX_RULES {
        return Err(err(
            None,
            "rule",
            None,
            format!("more than {MAX_RULES} rules"),
        ));
    }
    let mut rules = Vec::with_capacity(raw.rule.len());
    for (i, spanned) in raw.rule.into_iter().enumerate() {
        let n = Some(i + 1);
        let rule_line = Some(line_of(text, spanned.span().start));
        let r = spanned.into_inner();
        let at = |s: std::ops::Range<usize>| Some(line_of(text, s.start));
        let class: BounceClass = r
            .class
            .get_ref()
            .parse()
            .map_err(|e| err(n, "class", at(r.class.span()), e))?;
        let enhanced = match r.enhanced {
            Some(s) => {
                let line = at(s.span());
                s.into_inner()
                    .into_vec()
                    .iter()
                    .map(|p| EnhancedPrefix::parse(p))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| err(n, "enhanced", line, e))?
            }
            None => Vec::new(),
        };
        let code = match r.code {
            Some(s) => {
                let line = at(s.span());
                let codes = s.into_inner().into_vec();
                if let Some(c) = codes.iter().find(|c| !(200..=599).contains(*c)) {
                    return Err(err(n, "code", line, format!("{c} is not a reply code")));
                }
                codes
            }
            None => Vec::new(),
        };
        let text_re = match r.text {
            Some(s) => {
                let line = at(s.span());
                let re = RegexBuilder::new(s.get_ref())
                    .case_insensitive(true)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| err(n, "text", line, format!("invalid regex: {e}")))?;
                Some(re)
            }
            None => None,
        };
        if enhanced.is_empty() && code.is_empty() && text_re.is_none() {
            return Err(err(
                n,
                "rule",
                rule_line,
                "needs at least one of enhanced, code, text".into(),
            ));
        }
        rules.push(Rule {
            class,
            enhanced,
            code,
            text: text_re,
        });
    }
    Ok((rules, raw.defaults))
}

impl Classifier {
    /// The operator's rules (`origin` names the file in errors) before the
    /// shipped ones, unless the file says `defaults = false`.
    pub fn load(origin: &str, text: &str) -> Result<Classifier, BounceRulesError> {
        let (mut rules, defaults) = parse(origin, text)?;
        let from_file = rules.len();
        if defaults {
            let (shipped, _) = parse("built-in rules", DEFAULT_RULES)?;
            rules.extend(shipped);
        }
        Ok(Classifier { rules, from_file })
    }

    /// How many rules, and how many of them came from the file.
    pub fn counts(&self) -> (usize, usize) {
        (self.rules.len(), self.from_file)
    }

    /// The class of a failure or deferral reply: the first matching rule's,
    /// else [`BounceClass::Other`].
    pub fn classify(&self, reply: &ReplyParts<'_>) -> BounceClass {
        self.rules
            .iter()
            .find(|r| r.matches(reply))
            .map(|r| r.class)
            .unwrap_or(BounceClass::Other)
    }
}
