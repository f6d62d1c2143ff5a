//! The shared vocabulary of programmable policy (issue 14): the SMTP stages a
//! filter runs at, what a filter may answer, and the changes it may ask for at
//! DATA. Built-in rules, Sieve scripts, milters and HTTP hooks all answer in
//! these types, so the engine combines them one way whatever produced them.
//!
//! Order at every stage: built-in rules, then Sieve, then milters, then HTTP
//! hooks. The first answer that is not [`Verdict::Accept`] ends the stage;
//! modifications from filters that accepted are applied in that same order.

use std::fmt;
use std::net::IpAddr;

/// Where in the life of a message a filter runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// A client connected (before the greeting).
    Connect,
    /// EHLO or HELO was given.
    Ehlo,
    /// AUTH succeeded (the user is known).
    Auth,
    /// MAIL FROM, before its reply.
    Mail,
    /// Each RCPT TO, before its reply.
    Rcpt,
    /// The whole message was received, before the 250 (or the BDAT LAST reply).
    Data,
    /// A queued message is about to be delivered to one destination.
    Delivery,
}

impl Stage {
    /// Every stage, in the order a message meets them.
    pub const ALL: [Stage; 7] = [
        Stage::Connect,
        Stage::Ehlo,
        Stage::Auth,
        Stage::Mail,
        Stage::Rcpt,
        Stage::Data,
        Stage::Delivery,
    ];

    /// The name used in configuration, logs, metrics and hook documents.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Ehlo => "ehlo",
            Stage::Auth => "auth",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
            Stage::Delivery => "delivery",
        }
    }

    /// The stage a configuration name means, if any.
    pub fn from_name(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|stage| stage.name() == name)
    }

    /// Whether a filter may change the message here (only once it is whole).
    pub fn may_modify(self) -> bool {
        matches!(self, Stage::Data)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An SMTP reply a filter asks for: code, optional enhanced status, text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterReply {
    pub code: u16,
    /// "5.7.1" and the like; None sends the text without one.
    pub enhanced: Option<String>,
    pub text: String,
}

impl FilterReply {
    /// `text` made fit for one SMTP reply line: control characters (line
    /// breaks included) become spaces, at most 400 characters, and an empty
    /// text becomes "Rejected by policy".
    pub fn one_line(text: &str) -> String {
        let line: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(400)
            .collect();
        if line.trim().is_empty() {
            "Rejected by policy".to_string()
        } else {
            line
        }
    }
}

/// What one filter decided at one stage.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Verdict {
    /// Go on to the next filter (and, after the last, to the normal reply).
    #[default]
    Accept,
    /// Refuse permanently with this reply (a 5xx).
    Reject(FilterReply),
    /// Refuse for now with this reply (a 4xx).
    Tempfail(FilterReply),
    /// Answer as if accepted, then drop: the message (at DATA) or the recipient
    /// (at RCPT) is never delivered. Logged.
    Discard,
    /// Accept, but hold the message in the queue until an operator releases it.
    Quarantine { reason: String },
}

impl Verdict {
    /// Whether this verdict ends the stage (later filters do not run).
    pub fn is_final(&self) -> bool {
        !matches!(self, Verdict::Accept)
    }

    /// The label used in logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Accept => "accept",
            Verdict::Reject(_) => "reject",
            Verdict::Tempfail(_) => "tempfail",
            Verdict::Discard => "discard",
            Verdict::Quarantine { .. } => "quarantine",
        }
    }
}

/// A change to the message a filter asks for at DATA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Modification {
    /// Add a header field at the top (`index` None or 0) or after the given
    /// number of fields (past the end: appended).
    AddHeader {
        name: String,
        value: String,
        index: Option<usize>,
    },
    /// Replace the `occurrence`-th (1-based) field of this name; an empty value
    /// deletes it (milter semantics).
    ChangeHeader {
        name: String,
        occurrence: usize,
        value: String,
    },
    /// Remove every field of this name.
    RemoveHeader {
        name: String,
    },
    AddRecipient {
        address: String,
    },
    RemoveRecipient {
        address: String,
    },
    ChangeSender {
        address: String,
    },
    /// Replace the body (everything after the header block).
    ReplaceBody {
        body: Vec<u8>,
    },
}

/// What a filter gives back: its verdict and (at DATA) its changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FilterOutcome {
    pub verdict: Verdict,
    pub modifications: Vec<Modification>,
}

impl FilterOutcome {
    pub fn accept() -> Self {
        Self::default()
    }

    pub fn with_verdict(verdict: Verdict) -> Self {
        Self {
            verdict,
            modifications: Vec::new(),
        }
    }
}

/// What to do when a filter cannot answer (times out, the socket fails, the
/// hook returns garbage): configured per filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFailure {
    /// Answer 451 4.3.0 so the client retries later (the safe default: nothing
    /// passes unfiltered).
    #[default]
    Tempfail,
    /// Carry on as if the filter had accepted.
    Accept,
}

/// What filters know of the client, filled in as the session learns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFacts {
    /// The listener's configured name ("smtp", "submission", ...).
    pub listener: String,
    pub ip: IpAddr,
    pub port: u16,
    /// The verified reverse name (iprev), when known.
    pub ptr: Option<String>,
    /// The EHLO/HELO argument, from the Ehlo stage on.
    pub helo: Option<String>,
    /// Protocol and cipher suite names once TLS is up ("TLSv1.3", "TLS13_AES_128_GCM_SHA256").
    pub tls: Option<(String, String)>,
    /// The authenticated user, from the Auth stage on.
    pub auth_user: Option<String>,
    /// The relay's own host name (the `j` macro of milters).
    pub server_name: String,
}

/// One stage's question to the filters. Borrowed from the session: filters copy
/// what they keep.
#[derive(Debug, Clone, Copy)]
pub struct StageEvent<'a> {
    pub stage: Stage,
    pub client: &'a ClientFacts,
    /// The queue id once MAIL was accepted (the `i` macro of milters).
    pub queue_id: Option<&'a str>,
    /// The reverse-path from the Mail stage on ("" is the null sender).
    pub sender: Option<&'a str>,
    /// MAIL FROM parameters as given (SIZE=, BODY=, ...).
    pub sender_params: &'a [String],
    /// At Rcpt: the recipient being asked about.
    pub recipient: Option<&'a str>,
    /// Recipients accepted so far (at Data and Delivery: all of them).
    pub recipients: &'a [String],
    /// At Data and Delivery: the whole message, header and body, CRLF line ends.
    pub message: Option<&'a [u8]>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_names_round_trip() {
        for stage in Stage::ALL {
            assert_eq!(Stage::from_name(stage.name()), Some(stage));
        }
        assert_eq!(Stage::from_name("body"), None);
    }

    #[test]
    fn only_data_may_modify() {
        let modifying: Vec<Stage> = Stage::ALL.into_iter().filter(|s| s.may_modify()).collect();
        assert_eq!(modifying, vec![Stage::Data]);
    }

    #[test]
    fn reply_text_is_one_bounded_line() {
        assert_eq!(FilterReply::one_line("no\r\nway"), "no  way");
        assert_eq!(FilterReply::one_line(" \n"), "Rejected by policy");
        assert_eq!(FilterReply::one_line(&"x".repeat(500)).len(), 400);
    }

    #[test]
    fn accept_is_not_final_and_others_are() {
        assert!(!Verdict::Accept.is_final());
        assert!(Verdict::Discard.is_final());
        let reply = FilterReply {
            code: 550,
            enhanced: Some("5.7.1".into()),
            text: "no".into(),
        };
        assert!(Verdict::Reject(reply.clone()).is_final());
        assert!(Verdict::Tempfail(reply).is_final());
    }
}
