//! Built-in rules at the SMTP stages (issue 14): the first filter of every
//! stage, a short declarative list per listener:
//!
//! ```toml
//! [[server.listener.smtp.filter_rule]]
//! stage = "rcpt"
//! recipient = "*@internal.example"
//! client_ip = ["0.0.0.0/0", "::/0"]
//! authenticated = false
//! action = "reject"
//! reply = "550 5.7.1 Internal addresses take no mail from outside"
//! ```
//!
//! Every condition present must hold (AND); within a list any entry may (OR).
//! Patterns are the whole-address globs of `[[rule]]` (`*` any run,
//! case-insensitive). A condition on something the stage does not know yet
//! (the sender at EHLO) does not hold. At DATA, `recipient` holds when any
//! recipient matches. Rules are tried in order; the first that matches
//! decides; none matching accepts.

use serde::Deserialize;

use crate::lists::Lists;
use crate::rules::one_or_many;
use crate::sieve::reject_verdict;
use crate::stage::{FilterReply, Stage, StageEvent, Verdict};
use crate::{rules::Glob, NetworkList};

/// One `[[server.listener.NAME.filter_rule]]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageRuleConfig {
    pub stage: String,
    #[serde(default, deserialize_with = "one_or_many")]
    pub client_ip: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub helo: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub sender: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub recipient: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub auth_user: Option<Vec<String>>,
    pub authenticated: Option<bool>,
    pub tls: Option<bool>,
    /// Local lists (`[lists]`) the sender / a recipient / the client IP must be in.
    pub sender_list: Option<String>,
    pub recipient_list: Option<String>,
    pub client_list: Option<String>,
    /// accept | reject | tempfail | discard | quarantine
    pub action: String,
    /// "550 5.7.1 text" for reject/tempfail (a default when absent).
    pub reply: Option<String>,
}

#[derive(Debug)]
struct StageRule {
    stage: Stage,
    client_ip: Option<NetworkList>,
    helo: Option<Vec<Glob>>,
    sender: Option<Vec<Glob>>,
    recipient: Option<Vec<Glob>>,
    auth_user: Option<Vec<String>>,
    authenticated: Option<bool>,
    tls: Option<bool>,
    sender_list: Option<String>,
    recipient_list: Option<String>,
    client_list: Option<String>,
    verdict: Verdict,
}

/// A listener's stage rules, checked.
#[derive(Debug, Default)]
pub struct StageRules {
    rules: Vec<StageRule>,
}

/// A rule that cannot be used: `rule` is 1-based, `key` the key inside it.
#[derive(Debug, thiserror::Error)]
#[error("filter_rule {rule}: {key}: {reason}")]
pub struct StageRuleError {
    pub rule: usize,
    pub key: &'static str,
    pub reason: String,
}

impl StageRules {
    pub fn new(configs: &[StageRuleConfig], lists: &Lists) -> Result<StageRules, StageRuleError> {
        let mut rules = Vec::with_capacity(configs.len());
        for (i, c) in configs.iter().enumerate() {
            let err = |key: &'static str, reason: String| StageRuleError {
                rule: i + 1,
                key,
                reason,
            };
            let stage = Stage::from_name(&c.stage).ok_or_else(|| {
                err(
                    "stage",
                    format!(
                        "`{}` is not one of connect, ehlo, auth, mail, rcpt, data, delivery",
                        c.stage
                    ),
                )
            })?;
            let globs = |key: &'static str, v: &Option<Vec<String>>| -> Result<_, StageRuleError> {
                v.as_ref()
                    .map(|items| {
                        items
                            .iter()
                            .map(|p| Glob::new(p, key == "sender"))
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .transpose()
                    .map_err(|e| err(key, e))
            };
            for (key, list) in [
                ("sender_list", &c.sender_list),
                ("recipient_list", &c.recipient_list),
                ("client_list", &c.client_list),
            ] {
                if let Some(name) = list {
                    if !lists.has(name) {
                        return Err(err(key, format!("no list `{name}` in [lists]")));
                    }
                }
            }
            let reply = |default_code: u16| -> Result<FilterReply, StageRuleError> {
                let text = c
                    .reply
                    .clone()
                    .unwrap_or_else(|| format!("{default_code} Rejected by policy"));
                match reject_verdict(&text) {
                    Verdict::Reject(r) | Verdict::Tempfail(r) => Ok(r),
                    _ => Err(err("reply", "not a reply".into())),
                }
            };
            let verdict = match c.action.as_str() {
                "accept" => Verdict::Accept,
                "reject" => {
                    let r = reply(550)?;
                    if r.code / 100 != 5 {
                        return Err(err("reply", "reject needs a 5xx code".into()));
                    }
                    Verdict::Reject(r)
                }
                "tempfail" => {
                    let text = c
                        .reply
                        .clone()
                        .unwrap_or_else(|| "451 4.7.1 Try again later".into());
                    match reject_verdict(&text) {
                        Verdict::Tempfail(r) => Verdict::Tempfail(r),
                        _ => return Err(err("reply", "tempfail needs a 4xx code".into())),
                    }
                }
                "discard" => Verdict::Discard,
                "quarantine" => Verdict::Quarantine {
                    reason: format!("filter_rule {}", i + 1),
                },
                other => {
                    return Err(err(
                        "action",
                        format!(
                            "`{other}` is not one of accept, reject, tempfail, discard, quarantine"
                        ),
                    ))
                }
            };
            rules.push(StageRule {
                stage,
                client_ip: c
                    .client_ip
                    .as_ref()
                    .map(|v| NetworkList::parse(v))
                    .transpose()
                    .map_err(|e| err("client_ip", e.to_string()))?,
                helo: globs("helo", &c.helo)?,
                sender: globs("sender", &c.sender)?,
                recipient: globs("recipient", &c.recipient)?,
                auth_user: c.auth_user.clone(),
                authenticated: c.authenticated,
                tls: c.tls,
                sender_list: c.sender_list.clone(),
                recipient_list: c.recipient_list.clone(),
                client_list: c.client_list.clone(),
                verdict,
            });
        }
        Ok(StageRules { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether any rule is for this stage.
    pub fn has(&self, stage: Stage) -> bool {
        self.rules.iter().any(|r| r.stage == stage)
    }

    /// The first matching rule's verdict at this stage (Accept when none).
    pub fn decide(&self, event: &StageEvent<'_>, lists: &Lists) -> Verdict {
        self.rules
            .iter()
            .filter(|r| r.stage == event.stage)
            .find(|r| r.matches(event, lists))
            .map(|r| r.verdict.clone())
            .unwrap_or_default()
    }
}

impl StageRule {
    fn matches(&self, e: &StageEvent<'_>, lists: &Lists) -> bool {
        let c = e.client;
        let any = |globs: &[Glob], text: &str| globs.iter().any(|g| g.matches(text));
        let recipients = || -> Vec<&str> {
            match e.recipient {
                Some(r) => vec![r],
                None => e.recipients.iter().map(String::as_str).collect(),
            }
        };
        if let Some(nets) = &self.client_ip {
            if !nets.contains(c.ip) {
                return false;
            }
        }
        if let Some(name) = &self.client_list {
            if !lists.contains(name, &c.ip.to_string(), true) {
                return false;
            }
        }
        if let Some(globs) = &self.helo {
            if !c.helo.as_deref().is_some_and(|h| any(globs, h)) {
                return false;
            }
        }
        if let Some(want) = self.authenticated {
            if c.auth_user.is_some() != want {
                return false;
            }
        }
        if let Some(users) = &self.auth_user {
            if !c.auth_user.as_ref().is_some_and(|u| users.contains(u)) {
                return false;
            }
        }
        if let Some(want) = self.tls {
            if c.tls.is_some() != want {
                return false;
            }
        }
        if let Some(globs) = &self.sender {
            if !e.sender.is_some_and(|s| any(globs, s)) {
                return false;
            }
        }
        if let Some(name) = &self.sender_list {
            if !e.sender.is_some_and(|s| lists.contains(name, s, true)) {
                return false;
            }
        }
        if let Some(globs) = &self.recipient {
            if !recipients().iter().any(|r| any(globs, r)) {
                return false;
            }
        }
        if let Some(name) = &self.recipient_list {
            if !recipients().iter().any(|r| lists.contains(name, r, true)) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::ClientFacts;

    fn client() -> ClientFacts {
        ClientFacts {
            listener: "smtp".into(),
            ip: "192.0.2.7".parse().expect("ip"),
            port: 40000,
            ptr: None,
            helo: Some("mx.example.net".into()),
            tls: None,
            auth_user: None,
            server_name: "relay.example".into(),
        }
    }

    fn rule(stage: &str, action: &str) -> StageRuleConfig {
        StageRuleConfig {
            stage: stage.into(),
            action: action.into(),
            ..Default::default()
        }
    }

    #[test]
    fn first_matching_rule_decides_at_its_stage() {
        let lists = Lists::from_entries([("vip", vec!["boss@example.org"])]);
        let mut vip = rule("rcpt", "accept");
        vip.sender_list = Some("vip".into());
        let mut internal = rule("rcpt", "reject");
        internal.recipient = Some(vec!["*@internal.example".into()]);
        internal.reply = Some("550 5.7.1 No outside mail".into());
        let rules = StageRules::new(&[vip, internal], &lists).expect("rules");
        let c = client();
        let event = |sender, rcpt| StageEvent {
            stage: Stage::Rcpt,
            client: &c,
            queue_id: None,
            sender: Some(sender),
            sender_params: &[],
            recipient: Some(rcpt),
            recipients: &[],
            message: None,
        };
        assert_eq!(
            rules.decide(&event("a@example.org", "x@internal.example"), &lists),
            Verdict::Reject(FilterReply {
                code: 550,
                enhanced: Some("5.7.1".into()),
                text: "No outside mail".into()
            })
        );
        assert_eq!(
            rules.decide(&event("boss@example.org", "x@internal.example"), &lists),
            Verdict::Accept
        );
        assert_eq!(
            rules.decide(&event("a@example.org", "x@example.com"), &lists),
            Verdict::Accept
        );
        // Not the rule's stage.
        let mail = StageEvent {
            stage: Stage::Mail,
            ..event("a@example.org", "x@internal.example")
        };
        assert_eq!(rules.decide(&mail, &lists), Verdict::Accept);
    }

    #[test]
    fn unknown_facts_do_not_match() {
        let mut r = rule("ehlo", "tempfail");
        r.sender = Some(vec!["*".into()]);
        let lists = Lists::default();
        let rules = StageRules::new(&[r], &lists).expect("rules");
        let c = client();
        let e = StageEvent {
            stage: Stage::Ehlo,
            client: &c,
            queue_id: None,
            sender: None,
            sender_params: &[],
            recipient: None,
            recipients: &[],
            message: None,
        };
        assert_eq!(rules.decide(&e, &lists), Verdict::Accept);
    }

    #[test]
    fn bad_rules_name_rule_and_key() {
        let lists = Lists::default();
        let e = StageRules::new(&[rule("body", "reject")], &lists).expect_err("stage");
        assert_eq!((e.rule, e.key), (1, "stage"));
        let mut r = rule("rcpt", "reject");
        r.reply = Some("451 4.7.1 later".into());
        let e = StageRules::new(&[rule("rcpt", "accept"), r], &lists).expect_err("reply");
        assert_eq!((e.rule, e.key), (2, "reply"));
        let mut r = rule("rcpt", "accept");
        r.sender_list = Some("nope".into());
        assert_eq!(
            StageRules::new(&[r], &lists).expect_err("list").key,
            "sender_list"
        );
    }
}
