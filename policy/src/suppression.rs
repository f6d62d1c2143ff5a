//! Suppression decisions, sans-IO with the time passed in: which permanent
//! failures put a recipient on the suppression list, for how long, under which
//! scope, and what a suppressed recipient is told at RCPT.
//!
//! Scope: entries are kept per sender domain (the domain of MAIL FROM,
//! lower-cased; the null reverse-path has the scope `<>`), so one sender's
//! hard bounces do not block another sender's mail to the same address. An
//! entry with the scope [`GLOBAL_SCOPE`] (`*`) applies to every sender.
//! With `scope = "global"` configured, bounces are recorded under `*`.
//! (Tenants do not exist yet; when they do, the tenant takes the place of the
//! sender domain.)

use crate::bounce::BounceClass;

/// The scope of entries that apply to every sender.
pub const GLOBAL_SCOPE: &str = "*";
/// The scope of the null reverse-path (bounces).
pub const NULL_SENDER_SCOPE: &str = "<>";
/// Longest recipient address kept (RFC 5321 path limit).
pub const MAX_ADDRESS: usize = 256;
/// Longest reason text kept.
pub const MAX_REASON: usize = 512;

/// How bounces are scoped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeMode {
    /// Per sender domain (the default).
    SenderDomain,
    /// One list for every sender.
    Global,
}

/// What happens to mail for a suppressed recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Refused at RCPT (the client hears 550).
    Refuse,
    /// Accepted, then failed at delivery without a connection (a failure
    /// notice goes back as for any bounce).
    Drop,
}

/// One entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub class: BounceClass,
    /// The reply that caused it, or the operator's note.
    pub reason: String,
    pub added_unix_ms: u64,
    /// Suppressed until this time (exclusive).
    pub until_unix_ms: u64,
}

impl Entry {
    /// Whether the entry still suppresses at `now`.
    pub fn active(&self, now_unix_ms: u64) -> bool {
        now_unix_ms < self.until_unix_ms
    }

    /// The RCPT refusal for a suppressed recipient: 550 with the enhanced
    /// status of what the bounce said (5.1.1 unknown mailbox, 5.1.2 bad
    /// domain, else 5.7.1 refused by policy) and a text saying it is ours.
    pub fn refusal(&self) -> (u16, &'static str, String) {
        let status = match self.class {
            BounceClass::InvalidRecipient => "5.1.1",
            BounceClass::BadDomain => "5.1.2",
            _ => "5.7.1",
        };
        (
            550,
            status,
            format!(
                "Recipient suppressed after an earlier hard bounce ({})",
                self.class
            ),
        )
    }
}

/// The configured policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuppressionPolicy {
    /// Permanent failures of these classes add the recipient.
    pub classes: Vec<BounceClass>,
    pub ttl_ms: u64,
    pub scope: ScopeMode,
    pub action: Action,
}

impl SuppressionPolicy {
    /// The entry a permanent failure of `class` adds, if it adds one.
    /// Deferrals never add (call this for permanent failures only).
    pub fn on_permanent_failure(
        &self,
        class: BounceClass,
        reason: &str,
        now_unix_ms: u64,
    ) -> Option<Entry> {
        if !self.classes.contains(&class) || self.ttl_ms == 0 {
            return None;
        }
        Some(Entry {
            class,
            reason: bounded(reason, MAX_REASON),
            added_unix_ms: now_unix_ms,
            until_unix_ms: now_unix_ms.saturating_add(self.ttl_ms),
        })
    }

    /// The scope a bounce of mail from `sender` is recorded under.
    pub fn record_scope(&self, sender: &str) -> String {
        match self.scope {
            ScopeMode::Global => GLOBAL_SCOPE.to_string(),
            ScopeMode::SenderDomain => sender_scope(sender),
        }
    }

    /// The scopes checked for mail from `sender`, most specific first.
    pub fn lookup_scopes(&self, sender: &str) -> Vec<String> {
        match self.scope {
            ScopeMode::Global => vec![GLOBAL_SCOPE.to_string()],
            ScopeMode::SenderDomain => vec![sender_scope(sender), GLOBAL_SCOPE.to_string()],
        }
    }
}

/// The first active entry among `found` (in the order of
/// [`SuppressionPolicy::lookup_scopes`]); expired entries do not count.
pub fn decide<'a>(
    found: impl IntoIterator<Item = Option<&'a Entry>>,
    now_unix_ms: u64,
) -> Option<&'a Entry> {
    found.into_iter().flatten().find(|e| e.active(now_unix_ms))
}

/// The sender-domain scope of an envelope sender: its domain lower-cased,
/// `<>` for the null reverse-path, the whole address lower-cased when it has
/// no domain.
pub fn sender_scope(sender: &str) -> String {
    if sender.is_empty() {
        return NULL_SENDER_SCOPE.to_string();
    }
    let domain = sender.rsplit_once('@').map(|(_, d)| d).unwrap_or(sender);
    bounded(domain.trim_end_matches('.'), MAX_ADDRESS).to_ascii_lowercase()
}

/// A scope as an operator writes it (`example.com`, `*`, `<>`): validated and
/// normalised.
pub fn parse_scope(scope: &str) -> Result<String, String> {
    let s = scope.trim();
    if s == GLOBAL_SCOPE || s == NULL_SENDER_SCOPE {
        return Ok(s.to_string());
    }
    if s.is_empty()
        || s.len() > 253
        || s.bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'@' || b == 0)
    {
        return Err(format!(
            "scope `{scope}` is not a sender domain, `*` (every sender) or `<>` (null sender)"
        ));
    }
    Ok(s.trim_end_matches('.').to_ascii_lowercase())
}

/// A recipient as the list keys it: lower-cased (mailbox local parts are
/// case-insensitive in practice), angle brackets and spaces trimmed.
pub fn normalize_recipient(address: &str) -> Result<String, String> {
    let a = address.trim().trim_start_matches('<').trim_end_matches('>');
    if a.is_empty()
        || a.len() > MAX_ADDRESS
        || !a.contains('@')
        || a.bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == 0)
    {
        return Err(format!("`{address}` is not a recipient address"));
    }
    Ok(a.to_lowercase())
}

fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    fn policy(scope: ScopeMode) -> SuppressionPolicy {
        SuppressionPolicy {
            classes: vec![BounceClass::InvalidRecipient, BounceClass::BadDomain],
            ttl_ms: 30 * DAY,
            scope,
            action: Action::Refuse,
        }
    }

    #[test]
    fn only_configured_classes_add_and_entries_expire() {
        let p = policy(ScopeMode::SenderDomain);
        // A manual clock: the entry is made at t0 and looked at later.
        let t0 = 1_700_000_000_000;
        let e = p
            .on_permanent_failure(BounceClass::InvalidRecipient, "550 5.1.1 no such user", t0)
            .expect("added");
        assert_eq!(e.until_unix_ms, t0 + 30 * DAY);
        assert!(e.active(t0));
        assert!(e.active(t0 + 30 * DAY - 1));
        assert!(!e.active(t0 + 30 * DAY));
        assert_eq!(decide([Some(&e)], t0 + DAY), Some(&e));
        assert_eq!(decide([Some(&e)], t0 + 31 * DAY), None);

        assert!(p
            .on_permanent_failure(BounceClass::MailboxFull, "552 full", t0)
            .is_none());
        assert!(p
            .on_permanent_failure(BounceClass::PolicyBlock, "550 5.7.1 blocked", t0)
            .is_none());
        let zero = SuppressionPolicy { ttl_ms: 0, ..p };
        assert!(zero
            .on_permanent_failure(BounceClass::InvalidRecipient, "x", t0)
            .is_none());
    }

    #[test]
    fn scopes_per_sender_domain_or_global() {
        let p = policy(ScopeMode::SenderDomain);
        assert_eq!(p.record_scope("news@Shop.Example."), "shop.example");
        assert_eq!(p.record_scope(""), "<>");
        assert_eq!(p.lookup_scopes("a@b.example"), vec!["b.example", "*"]);
        let g = policy(ScopeMode::Global);
        assert_eq!(g.record_scope("news@shop.example"), "*");
        assert_eq!(g.lookup_scopes("news@shop.example"), vec!["*"]);
    }

    #[test]
    fn first_active_scope_decides() {
        let t0 = 1_000;
        let expired = Entry {
            class: BounceClass::InvalidRecipient,
            reason: "old".into(),
            added_unix_ms: 0,
            until_unix_ms: t0,
        };
        let global = Entry {
            class: BounceClass::PolicyBlock,
            reason: "operator".into(),
            added_unix_ms: 0,
            until_unix_ms: u64::MAX,
        };
        assert_eq!(decide([Some(&expired), Some(&global)], t0), Some(&global));
        assert_eq!(decide([None, None], t0), None);
    }

    #[test]
    fn refusal_codes_follow_the_class() {
        let mut e = Entry {
            class: BounceClass::InvalidRecipient,
            reason: String::new(),
            added_unix_ms: 0,
            until_unix_ms: 1,
        };
        let (code, status, text) = e.refusal();
        assert_eq!((code, status), (550, "5.1.1"));
        assert!(text.contains("suppressed"), "{text}");
        e.class = BounceClass::BadDomain;
        assert_eq!(e.refusal().1, "5.1.2");
        e.class = BounceClass::ContentBlock;
        assert_eq!(e.refusal().1, "5.7.1");
    }

    #[test]
    fn input_is_validated_and_bounded() {
        assert_eq!(
            normalize_recipient("<Bob@Example.NET>"),
            Ok("bob@example.net".into())
        );
        assert!(normalize_recipient("bob").is_err());
        assert!(normalize_recipient("a b@c").is_err());
        assert!(normalize_recipient(&format!("{}@x", "a".repeat(300))).is_err());
        assert_eq!(parse_scope("Shop.Example."), Ok("shop.example".into()));
        assert_eq!(parse_scope("*"), Ok("*".into()));
        assert!(parse_scope("a@b").is_err());
        assert!(parse_scope("").is_err());
        let p = policy(ScopeMode::SenderDomain);
        let e = p
            .on_permanent_failure(BounceClass::BadDomain, &"é".repeat(1000), 0)
            .expect("added");
        assert!(e.reason.len() <= MAX_REASON);
    }
}
