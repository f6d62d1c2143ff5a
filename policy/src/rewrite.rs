//! Address rewriting, SRS, header edits and disclaimers (`[[rewrite]]`,
//! `[srs]`; docs/rewrite.md). Sans-IO: the session asks at MAIL and RCPT
//! what the envelope address becomes, and at the end of DATA what the
//! message gets; the day number for SRS is an argument.
//!
//! ```toml
//! [[rewrite]]
//! match.listener = "submission"        # optional, one or a list
//! match.direction = "outbound"         # "inbound", "outbound" or "any"
//! match.sender = '@example\.org$'      # optional regex on the envelope sender
//! sender = { regex = '^(.*)@old\.example$', replace = '$1@new.example' }
//! recipient_map = "aliases"            # a [lists] map
//! headers = true                       # From/To/Cc follow the envelope
//! srs = true                           # forwarded foreign senders get SRS
//! add_header = ["X-Relayed-By: sluice"]
//! remove_header = ["X-Internal-Id"]
//! disclaimer = "This message is confidential."
//! ```
//!
//! Semantics: a rule applies when every `match.*` key holds. For the
//! sender, the first applying rule with a `sender`/`sender_map` that
//! changes the address decides (one rewrite); the same for each recipient.
//! `srs`, `add_header`, `remove_header` and `disclaimer` of every applying
//! rule are used (the first disclaimer only). Direction is the client's:
//! outbound when it may relay (relay networks or authenticated), inbound
//! otherwise.

use std::collections::HashSet;
use std::sync::Arc;

use mail_parser::MimeHeaders as _;
use serde::Deserialize;

use crate::lists::Lists;
use crate::rules::one_or_many;
use crate::srs::{Srs, SrsError};

/// Most `[[rewrite]]` rules.
pub const MAX_RULES: usize = 1000;
/// Compiled size limit of one regex (bytes of program).
pub const MAX_REGEX_SIZE: usize = 1 << 20;
/// Longest disclaimer (bytes, each of the text and HTML forms).
pub const MAX_DISCLAIMER_LEN: usize = 4096;
/// Most header fields one rule adds or removes.
pub const MAX_HEADER_EDITS: usize = 32;
/// Longest address a rewrite may produce (RFC 5321's path limit).
pub const MAX_ADDRESS_LEN: usize = 256;

/// Which clients' mail a rule is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Clients that may not relay: mail for the local domains.
    Inbound,
    /// Clients that may relay (relay networks, authenticated).
    Outbound,
    #[default]
    Any,
}

/// A regex and its replacement (`$1`, `${name}` as in the regex crate).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexRewriteConfig {
    pub regex: String,
    pub replace: String,
}

/// The `match.*` keys of a rewrite rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteMatchConfig {
    #[serde(default, deserialize_with = "one_or_many")]
    pub listener: Option<Vec<String>>,
    #[serde(default)]
    pub direction: Direction,
    /// A regex on the envelope sender (as received, before any rewrite).
    pub sender: Option<String>,
    /// A `[lists]` name holding the sender (or its "@domain").
    pub sender_list: Option<String>,
}

/// One `[[rewrite]]` table as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteRuleConfig {
    #[serde(default, rename = "match")]
    pub when: RewriteMatchConfig,
    pub sender: Option<RegexRewriteConfig>,
    pub sender_map: Option<String>,
    pub recipient: Option<RegexRewriteConfig>,
    pub recipient_map: Option<String>,
    /// Rewrite the addresses in From (sender) and To/Cc (recipients) too.
    #[serde(default)]
    pub headers: bool,
    #[serde(default)]
    pub srs: bool,
    #[serde(default)]
    pub add_header: Vec<String>,
    #[serde(default)]
    pub remove_header: Vec<String>,
    pub disclaimer: Option<String>,
    pub disclaimer_html: Option<String>,
}

/// `[srs]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SrsConfig {
    /// The domain SRS addresses are in; must be a local domain, so bounces
    /// to it are accepted.
    pub domain: String,
    /// The first signs, all verify.
    pub secrets: Vec<String>,
    #[serde(default = "default_max_age")]
    pub max_age_days: u64,
    #[serde(default = "default_hash_length")]
    pub hash_length: usize,
}

fn default_max_age() -> u64 {
    21
}
fn default_hash_length() -> usize {
    4
}

/// A config error: the key (relative, e.g. `rewrite[2].sender.regex`) and why.
pub type ConfigError = (String, String);

#[derive(Debug, Clone)]
enum AddressRewrite {
    Regex(regex::Regex, String),
    Map(String),
}

#[derive(Debug, Clone)]
struct Rule {
    /// 1-based, for logs.
    number: usize,
    direction: Direction,
    sender_match: Option<regex::Regex>,
    sender_list: Option<String>,
    sender: Option<AddressRewrite>,
    recipient: Option<AddressRewrite>,
    headers: bool,
    srs: bool,
    /// Complete fields, CRLF-terminated.
    add_header: Vec<String>,
    remove_header: Vec<String>,
    disclaimer: Option<Disclaimer>,
}

/// Text appended to text/plain parts, and optionally HTML to text/html.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disclaimer {
    /// CRLF line ends.
    pub text: String,
    pub html: Option<String>,
}

/// A listener's rewriting: its rules (those naming it or no listener), SRS
/// and the lists. None in the session when there is nothing to do.
#[derive(Debug, Clone)]
pub struct Rewriter {
    rules: Vec<Rule>,
    srs: Option<Arc<Srs>>,
    lists: Arc<Lists>,
}

/// An envelope address rewritten by a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    pub address: String,
    /// 1-based rule number.
    pub rule: usize,
    /// The header fields follow (`headers = true`).
    pub headers: bool,
}

/// What RCPT gets from the rewriter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientRewrite {
    Unchanged,
    Rewritten(Rewritten),
    /// An SRS address of ours, reversed to the address it stands for.
    SrsReversed(String),
    /// An SRS address of ours that does not verify: refuse it.
    SrsRefused(SrsError),
}

/// What the message gets at the end of DATA.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessagePlan {
    /// Sign the sender with SRS (a rule asked and the message is forwarded).
    pub srs: bool,
    pub add_header: Vec<String>,
    pub remove_header: Vec<String>,
    pub disclaimer: Option<Disclaimer>,
}

impl MessagePlan {
    pub fn edits_message(&self) -> bool {
        !self.add_header.is_empty() || !self.remove_header.is_empty() || self.disclaimer.is_some()
    }
}

/// Builds the SRS signer of `[srs]`; errors name the key under `srs.`.
pub fn build_srs(c: &SrsConfig) -> Result<Srs, ConfigError> {
    let key = |k: &str| format!("srs.{k}");
    if c.domain.is_empty() || c.domain.contains(['@', ' ']) {
        return Err((key("domain"), "must be a domain name".into()));
    }
    if c.secrets.is_empty() || c.secrets.iter().any(|s| s.len() < 16) {
        return Err((
            key("secrets"),
            "at least one secret, each of 16 bytes or more".into(),
        ));
    }
    if c.secrets.len() > 16 {
        return Err((key("secrets"), "at most 16 secrets".into()));
    }
    if c.max_age_days == 0 || c.max_age_days > 1000 {
        return Err((key("max_age_days"), "must be 1 ..= 1000".into()));
    }
    if !crate::srs::HASH_LEN_RANGE.contains(&c.hash_length) {
        return Err((key("hash_length"), "must be 4 ..= 27".into()));
    }
    Ok(Srs::new(
        &c.domain,
        &c.secrets,
        c.max_age_days,
        c.hash_length,
    ))
}

impl Rewriter {
    /// The rewriter of listener `listener`: None when no rule applies to it
    /// and there is no SRS (the hot path stays a None test).
    pub fn build(
        listener: &str,
        rules: &[RewriteRuleConfig],
        srs: Option<Arc<Srs>>,
        lists: Arc<Lists>,
    ) -> Result<Option<Arc<Rewriter>>, ConfigError> {
        if rules.len() > MAX_RULES {
            return Err(("rewrite".into(), format!("at most {MAX_RULES} rules")));
        }
        let mut compiled = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let rule = compile(i, r, &lists, srs.is_some())?;
            let here = r
                .when
                .listener
                .as_ref()
                .is_none_or(|names| names.iter().any(|n| n == listener));
            if here {
                compiled.push(rule);
            }
        }
        if compiled.is_empty() && srs.is_none() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Rewriter {
            rules: compiled,
            srs,
            lists,
        })))
    }

    pub fn srs(&self) -> Option<&Srs> {
        self.srs.as_deref()
    }

    fn applying<'a>(
        &'a self,
        outbound: bool,
        sender: &'a str,
    ) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |r| {
            let direction = match r.direction {
                Direction::Any => true,
                Direction::Outbound => outbound,
                Direction::Inbound => !outbound,
            };
            direction
                && r.sender_match.as_ref().is_none_or(|re| re.is_match(sender))
                && r.sender_list
                    .as_ref()
                    .is_none_or(|l| self.lists.contains(l, sender, true))
        })
    }

    /// The envelope sender at MAIL (`outbound`: the client may relay). The
    /// null sender is never rewritten.
    pub fn sender(&self, outbound: bool, sender: &str) -> Option<Rewritten> {
        if sender.is_empty() {
            return None;
        }
        self.applying(outbound, sender).find_map(|r| {
            let new = apply(r.sender.as_ref()?, sender, &self.lists)?;
            Some(Rewritten {
                address: new,
                rule: r.number,
                headers: r.headers,
            })
        })
    }

    /// A recipient at RCPT: an SRS address of ours is reversed (or refused);
    /// otherwise the first rule that changes it. `sender` is the envelope
    /// sender as received.
    pub fn recipient(
        &self,
        outbound: bool,
        sender: &str,
        recipient: &str,
        day: u64,
    ) -> RecipientRewrite {
        if let Some(srs) = &self.srs {
            if srs.is_srs_address(recipient) {
                return match srs.reverse(recipient, day) {
                    Ok(original) => RecipientRewrite::SrsReversed(original),
                    Err(e) => RecipientRewrite::SrsRefused(e),
                };
            }
        }
        self.applying(outbound, sender)
            .find_map(|r| {
                let new = apply(r.recipient.as_ref()?, recipient, &self.lists)?;
                Some(RecipientRewrite::Rewritten(Rewritten {
                    address: new,
                    rule: r.number,
                    headers: r.headers,
                }))
            })
            .unwrap_or(RecipientRewrite::Unchanged)
    }

    /// What the message gets, from the rules applying to `sender` (as
    /// received). `forwarded`: the sender's domain is not local and some
    /// recipient is not local, the case SRS is for.
    pub fn message_plan(&self, outbound: bool, sender: &str, forwarded: bool) -> MessagePlan {
        let mut plan = MessagePlan::default();
        for r in self.applying(outbound, sender) {
            plan.srs |= r.srs && forwarded && self.srs.is_some();
            plan.add_header.extend(r.add_header.iter().cloned());
            plan.remove_header.extend(r.remove_header.iter().cloned());
            if plan.disclaimer.is_none() {
                plan.disclaimer = r.disclaimer.clone();
            }
        }
        plan
    }
}

fn compile(
    i: usize,
    r: &RewriteRuleConfig,
    lists: &Lists,
    have_srs: bool,
) -> Result<Rule, ConfigError> {
    let key = |k: &str| format!("rewrite[{}].{k}", i + 1);
    let regex = |k: &str, text: &str| {
        regex::RegexBuilder::new(text)
            .size_limit(MAX_REGEX_SIZE)
            .case_insensitive(true)
            .build()
            .map_err(|e| (key(k), e.to_string()))
    };
    let list = |k: &str, name: &str| {
        if lists.has(name) {
            Ok(name.to_string())
        } else {
            Err((key(k), format!("no list {name:?} in [lists]")))
        }
    };
    let address_rewrite = |k: &str,
                           re: &Option<RegexRewriteConfig>,
                           map: &Option<String>|
     -> Result<Option<AddressRewrite>, ConfigError> {
        match (re, map) {
            (Some(_), Some(_)) => Err((
                key(k),
                format!("{k} and {k}_map cannot both be set in one rule"),
            )),
            (Some(c), None) => Ok(Some(AddressRewrite::Regex(
                regex(&format!("{k}.regex"), &c.regex)?,
                c.replace.clone(),
            ))),
            (None, Some(name)) => Ok(Some(AddressRewrite::Map(list(&format!("{k}_map"), name)?))),
            (None, None) => Ok(None),
        }
    };
    if r.srs && !have_srs {
        return Err((key("srs"), "needs an [srs] table (domain, secrets)".into()));
    }
    if r.add_header.len() > MAX_HEADER_EDITS || r.remove_header.len() > MAX_HEADER_EDITS {
        return Err((
            key("add_header"),
            format!("at most {MAX_HEADER_EDITS} fields added and removed per rule"),
        ));
    }
    let mut add_header = Vec::new();
    for field in &r.add_header {
        let (name, value) = field.split_once(':').ok_or_else(|| {
            (
                key("add_header"),
                format!("{field:?} is not \"Name: value\""),
            )
        })?;
        check_field_name(name).map_err(|why| (key("add_header"), why))?;
        if value.len() > 998 || value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err((
                key("add_header"),
                format!(
                    "the value of {name:?} has a control character or is longer than 998 bytes"
                ),
            ));
        }
        add_header.push(format!("{}: {}\r\n", name, value.trim()));
    }
    for name in &r.remove_header {
        check_field_name(name).map_err(|why| (key("remove_header"), why))?;
    }
    let disclaimer = match (&r.disclaimer, &r.disclaimer_html) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err((
                key("disclaimer_html"),
                "needs disclaimer (the text form)".into(),
            ))
        }
        (Some(text), html) => {
            for (k, v) in [
                ("disclaimer", Some(text)),
                ("disclaimer_html", html.as_ref()),
            ] {
                let Some(v) = v else { continue };
                if v.len() > MAX_DISCLAIMER_LEN || !v.is_ascii() || v.contains('\0') {
                    return Err((
                        key(k),
                        format!("must be ASCII, at most {MAX_DISCLAIMER_LEN} bytes"),
                    ));
                }
            }
            Some(Disclaimer {
                text: crlf(text),
                html: html.as_deref().map(crlf),
            })
        }
    };
    Ok(Rule {
        number: i + 1,
        direction: r.when.direction,
        sender_match: r
            .when
            .sender
            .as_deref()
            .map(|s| regex("match.sender", s))
            .transpose()?,
        sender_list: r
            .when
            .sender_list
            .as_deref()
            .map(|n| list("match.sender_list", n))
            .transpose()?,
        sender: address_rewrite("sender", &r.sender, &r.sender_map)?,
        recipient: address_rewrite("recipient", &r.recipient, &r.recipient_map)?,
        headers: r.headers,
        srs: r.srs,
        add_header,
        remove_header: r.remove_header.clone(),
        disclaimer,
    })
}

fn check_field_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 76
        || name.bytes().any(|b| !(33..=126).contains(&b) || b == b':')
    {
        return Err(format!("{name:?} is not a header field name"));
    }
    Ok(())
}

/// Lines of `text` joined with CRLF, no trailing line end.
fn crlf(text: &str) -> String {
    text.lines().collect::<Vec<_>>().join("\r\n")
}

/// The rewritten address, or None when the rule does not change it (no
/// match, no map entry, or a result that is not a usable address).
fn apply(rewrite: &AddressRewrite, address: &str, lists: &Lists) -> Option<String> {
    let new = match rewrite {
        AddressRewrite::Regex(re, replace) => {
            if !re.is_match(address) {
                return None;
            }
            re.replace(address, replace.as_str()).into_owned()
        }
        AddressRewrite::Map(name) => {
            let value = lists.lookup(name, address)?;
            match value.strip_prefix('@') {
                Some(domain) => {
                    let (local, _) = address.rsplit_once('@')?;
                    format!("{local}@{domain}")
                }
                None => value.to_string(),
            }
        }
    };
    let usable = new.len() <= MAX_ADDRESS_LEN
        && new
            .rsplit_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
        && !new
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b'<' || b == b'>');
    (usable && !new.eq_ignore_ascii_case(address)).then_some(new)
}

/// Applies the header part of `plan` and the header address rewrites to a
/// message (header and body, CRLF): fields removed by name, addresses in
/// From (`sender`) and To/Cc (`recipients`) replaced, fields added at the
/// top, then the disclaimer (see [`add_disclaimer`]). Returns None when
/// nothing changed.
pub fn edit_message(
    message: &[u8],
    plan: &MessagePlan,
    sender: Option<(&str, &str)>,
    recipients: &[(String, String)],
) -> Option<Vec<u8>> {
    let needs_headers = !plan.add_header.is_empty()
        || !plan.remove_header.is_empty()
        || sender.is_some()
        || !recipients.is_empty();
    let mut out = if needs_headers {
        edit_header(message, plan, sender, recipients)
    } else {
        None
    };
    if let Some(disclaimer) = &plan.disclaimer {
        let current = out.as_deref().unwrap_or(message);
        if let Some(with) = add_disclaimer(current, disclaimer) {
            out = Some(with);
        }
    }
    out
}

fn edit_header(
    message: &[u8],
    plan: &MessagePlan,
    sender: Option<(&str, &str)>,
    recipients: &[(String, String)],
) -> Option<Vec<u8>> {
    let (fields, body_at) = crate::stage_message::split_fields(message);
    let header_len: usize = fields.iter().map(|f| f.raw.len()).sum();
    let removed: HashSet<String> = plan
        .remove_header
        .iter()
        .map(|n| n.to_ascii_lowercase())
        .collect();
    let mut out = Vec::with_capacity(message.len() + 256);
    for field in &plan.add_header {
        out.extend_from_slice(field.as_bytes());
    }
    let mut changed = !plan.add_header.is_empty();
    for f in &fields {
        let name = f.name.to_ascii_lowercase();
        if removed.contains(&name) {
            changed = true;
            continue;
        }
        let pairs: Vec<(&str, &str)> = match name.as_str() {
            "from" => sender.into_iter().collect(),
            "to" | "cc" => recipients
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect(),
            _ => Vec::new(),
        };
        let mut raw = f.raw.to_vec();
        for (old, new) in pairs {
            if let Some(r) = replace_address(&raw, old, new) {
                raw = r;
                changed = true;
            }
        }
        out.extend_from_slice(&raw);
    }
    if !changed {
        return None;
    }
    // The rest as it was: the separator line and the body, or whatever
    // ended the header block.
    let rest_at = header_len.min(body_at).min(message.len());
    out.extend_from_slice(&message[rest_at..]);
    Some(out)
}

/// `raw` with each whole-address occurrence of `old` (ASCII
/// case-insensitive) replaced by `new`; None when there is none.
fn replace_address(raw: &[u8], old: &str, new: &str) -> Option<Vec<u8>> {
    let old = old.as_bytes();
    if old.is_empty() || raw.len() < old.len() {
        return None;
    }
    let part_of_address =
        |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.@".contains(&b);
    let mut out = Vec::with_capacity(raw.len() + new.len());
    let mut i = 0;
    let mut found = false;
    while i < raw.len() {
        let fits = i + old.len() <= raw.len()
            && raw[i..i + old.len()].eq_ignore_ascii_case(old)
            && (i == 0 || !part_of_address(raw[i - 1]))
            && raw.get(i + old.len()).is_none_or(|&b| !part_of_address(b));
        if fits {
            out.extend_from_slice(new.as_bytes());
            i += old.len();
            found = true;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    found.then_some(out)
}

/// Why a disclaimer was not added (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisclaimerSkip {
    /// A DKIM-Signature is already there: the body hash would break.
    Signed,
    /// multipart/signed or encrypted, or S/MIME.
    Protected,
    /// No text part we can append to without re-encoding (base64 only).
    NoTextPart,
}

/// Whether the disclaimer can go into `message`, and why not.
pub fn disclaimer_skip(message: &[u8]) -> Option<DisclaimerSkip> {
    let (fields, _) = crate::stage_message::split_fields(message);
    if fields
        .iter()
        .any(|f| f.name.eq_ignore_ascii_case("dkim-signature"))
    {
        return Some(DisclaimerSkip::Signed);
    }
    let protected = fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("content-type"))
        .any(|f| {
            let v = f.value().to_ascii_lowercase();
            v.starts_with("multipart/signed")
                || v.starts_with("multipart/encrypted")
                || v.starts_with("application/pkcs7-mime")
                || v.starts_with("application/x-pkcs7-mime")
        });
    protected.then_some(DisclaimerSkip::Protected)
}

/// The message with the disclaimer appended to each displayed text part:
/// text/plain gets the text, text/html the HTML (before `</body>` when
/// there is one) or nothing without `disclaimer_html`. Parts in base64 are
/// left alone (re-encoding them would change their charset handling);
/// quoted-printable parts get the text encoded. None when nothing was
/// added (see [`disclaimer_skip`]).
pub fn add_disclaimer(message: &[u8], disclaimer: &Disclaimer) -> Option<Vec<u8>> {
    if disclaimer_skip(message).is_some() {
        return None;
    }
    let parsed = mail_parser::MessageParser::new().parse(message)?;
    let mut ids: Vec<u32> = parsed
        .text_body
        .iter()
        .chain(parsed.html_body.iter())
        .copied()
        .collect();
    ids.sort_unstable();
    ids.dedup();
    // (insert at, bytes), applied from the end so offsets stay valid.
    let mut inserts: Vec<(usize, Vec<u8>)> = Vec::new();
    for id in ids {
        let Some(part) = parsed.parts.get(id as usize) else {
            continue;
        };
        let html = match &part.body {
            mail_parser::PartType::Text(_) => false,
            mail_parser::PartType::Html(_) => true,
            _ => continue,
        };
        if part
            .content_disposition()
            .is_some_and(|d| d.is_attachment())
        {
            continue;
        }
        let addition = match (html, &disclaimer.html) {
            (false, _) => disclaimer.text.as_str(),
            (true, Some(h)) => h.as_str(),
            (true, None) => continue,
        };
        let (start, end) = (part.offset_body as usize, part.offset_end as usize);
        if start > end || end > message.len() {
            continue;
        }
        let encoded = match part.encoding {
            mail_parser::Encoding::None => addition.as_bytes().to_vec(),
            mail_parser::Encoding::QuotedPrintable => quoted_printable(addition),
            mail_parser::Encoding::Base64 => continue,
        };
        let content = &message[start..end];
        let at = if html {
            find_last_ci(content, b"</body>").map_or(end, |i| start + i)
        } else {
            end
        };
        let before = &message[start..at];
        let mut bytes = Vec::with_capacity(encoded.len() + 4);
        if at < end {
            // Inside the HTML, before </body>: no line break needed.
            bytes.extend_from_slice(&encoded);
        } else if before.ends_with(b"\r\n") || before.is_empty() {
            bytes.extend_from_slice(&encoded);
            bytes.extend_from_slice(b"\r\n");
        } else {
            bytes.extend_from_slice(b"\r\n");
            bytes.extend_from_slice(&encoded);
        }
        inserts.push((at, bytes));
    }
    if inserts.is_empty() {
        return None;
    }
    inserts.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    let mut out = message.to_vec();
    for (at, bytes) in inserts {
        out.splice(at..at, bytes);
    }
    Some(out)
}

fn find_last_ci(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    (0..=haystack.len().checked_sub(needle.len())?)
        .rev()
        .find(|&i| haystack[i..i + needle.len()].eq_ignore_ascii_case(needle))
}

/// ASCII text (CRLF lines) as quoted-printable: "=" escaped, lines soft-broken
/// before 76 characters, trailing white space protected.
fn quoted_printable(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 16);
    for (n, line) in text.split("\r\n").enumerate() {
        if n > 0 {
            out.extend_from_slice(b"\r\n");
        }
        let mut width = 0;
        let bytes = line.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            let last = i + 1 == bytes.len();
            let piece: Vec<u8> = if b == b'=' || ((b == b' ' || b == b'\t') && last) {
                format!("={b:02X}").into_bytes()
            } else {
                vec![b]
            };
            if width + piece.len() > 75 {
                out.extend_from_slice(b"=\r\n");
                width = 0;
            }
            width += piece.len();
            out.extend_from_slice(&piece);
        }
    }
    out
}

#[cfg(test)]
#[path = "rewrite_tests.rs"]
mod tests;
