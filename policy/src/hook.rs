//! HTTP hooks (issue 14 item 4), sans I/O: the JSON document POSTed to a hook
//! at a stage, and what the hook's JSON answer means. The engine does the
//! HTTP; the schema is documented in docs/hooks.md.
//!
//! The request carries the stage, the client (address, port, HELO, TLS, AUTH
//! user), the envelope so far, the stage's argument and, when the hook asks
//! for it, the message (bounded: a longer message is cut and marked
//! `truncated`). The answer is an action (accept, reject, tempfail, discard,
//! quarantine), an optional SMTP reply and, at data, modifications.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::stage::{FilterOutcome, FilterReply, Modification, Stage, StageEvent, Verdict};

/// The version of the request document (`"version"`); bumped on an
/// incompatible change.
pub const DOCUMENT_VERSION: u32 = 1;

/// Most modifications one answer may carry.
pub const MAX_MODIFICATIONS: usize = 10_000;

/// Why a hook's answer cannot be used (the hook's `on_failure` applies).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookReplyError {
    #[error("the answer is not the expected JSON: {0}")]
    Json(String),
    #[error("unknown action `{0}`")]
    Action(String),
    #[error("reply code {0} is not 4xx or 5xx")]
    Code(u16),
    #[error("modification {index}: {why}")]
    Modification { index: usize, why: String },
    #[error("more than {MAX_MODIFICATIONS} modifications")]
    TooManyModifications,
}

/// What the request includes of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessagePolicy {
    /// Whether to include the message at all (at data).
    pub include: bool,
    /// Most bytes of it included; the rest is cut (`truncated: true`).
    pub max_bytes: usize,
}

/// The stage's argument: what the command at this stage named.
fn argument<'a>(event: &'a StageEvent<'_>) -> Option<&'a str> {
    match event.stage {
        Stage::Ehlo => event.client.helo.as_deref(),
        Stage::Auth => event.client.auth_user.as_deref(),
        Stage::Mail => event.sender,
        Stage::Rcpt => event.recipient,
        Stage::Connect | Stage::Data | Stage::Delivery => None,
    }
}

/// The JSON document for `event` (UTF-8 bytes, ready to POST).
pub fn request_document(event: &StageEvent<'_>, message: MessagePolicy) -> Vec<u8> {
    let c = event.client;
    let tls = c
        .tls
        .as_ref()
        .map(|(version, cipher)| json!({ "version": version, "cipher": cipher }));
    let auth = c.auth_user.as_ref().map(|user| json!({ "user": user }));
    let mut doc = json!({
        "version": DOCUMENT_VERSION,
        "stage": event.stage.name(),
        "client": {
            "ip": c.ip.to_string(),
            "port": c.port,
            "ptr": c.ptr,
            "helo": c.helo,
            "listener": c.listener,
            "server_name": c.server_name,
        },
        "tls": tls,
        "auth": auth,
        "envelope": {
            "queue_id": event.queue_id,
            "sender": event.sender,
            "sender_params": event.sender_params,
            "recipients": event.recipients,
        },
        "argument": argument(event),
    });
    if let (true, Some(bytes)) = (message.include, event.message) {
        doc["message"] = message_value(bytes, message.max_bytes);
    }
    // Serialising a Value cannot fail (string keys only).
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// `{"size", "truncated", "encoding", "content"}`: UTF-8 text as is, other
/// bytes in base64.
fn message_value(bytes: &[u8], max: usize) -> Value {
    let truncated = bytes.len() > max;
    let mut kept = &bytes[..bytes.len().min(max)];
    let (encoding, content) = match std::str::from_utf8(kept) {
        Ok(text) => ("utf-8", text.to_string()),
        // Cut inside a character: keep the text up to it.
        Err(e) if truncated && e.error_len().is_none() => {
            kept = &kept[..e.valid_up_to()];
            ("utf-8", String::from_utf8_lossy(kept).into_owned())
        }
        Err(_) => (
            "base64",
            base64::engine::general_purpose::STANDARD.encode(kept),
        ),
    };
    json!({
        "size": bytes.len(),
        "truncated": truncated,
        "encoding": encoding,
        "content": content,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    reply: Option<AnswerReply>,
    /// Why a message is quarantined (logged).
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    modifications: Vec<AnswerModification>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswerReply {
    code: u16,
    #[serde(default)]
    enhanced: Option<String>,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum AnswerModification {
    AddHeader {
        name: String,
        value: String,
        #[serde(default)]
        index: Option<usize>,
    },
    ChangeHeader {
        name: String,
        value: String,
        #[serde(default)]
        occurrence: Option<usize>,
    },
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
    ReplaceBody {
        #[serde(default)]
        body: Option<String>,
        #[serde(default)]
        body_base64: Option<String>,
    },
}

/// The outcome a hook's answer (the HTTP body of a 2xx) stands for. An empty
/// body or `{}` is accept. Replies are checked for their class; their text is
/// made one line by the session like every filter's.
pub fn parse_reply(body: &[u8]) -> Result<FilterOutcome, HookReplyError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(FilterOutcome::accept());
    }
    let answer: Answer =
        serde_json::from_slice(body).map_err(|e| HookReplyError::Json(e.to_string()))?;
    let reply = |class: u16, default: (u16, &str, &str)| -> Result<FilterReply, HookReplyError> {
        match &answer.reply {
            Some(r) if r.code / 100 != class => Err(HookReplyError::Code(r.code)),
            Some(r) => Ok(FilterReply {
                code: r.code,
                enhanced: r.enhanced.clone(),
                text: FilterReply::one_line(r.text.as_deref().unwrap_or(default.2)),
            }),
            None => Ok(FilterReply {
                code: default.0,
                enhanced: Some(default.1.into()),
                text: default.2.into(),
            }),
        }
    };
    let verdict = match answer.action.as_deref().unwrap_or("accept") {
        "accept" => Verdict::Accept,
        "reject" => Verdict::Reject(reply(5, (550, "5.7.1", "Rejected by policy"))?),
        "tempfail" => Verdict::Tempfail(reply(4, (451, "4.7.1", "Try again later"))?),
        "discard" => Verdict::Discard,
        "quarantine" => Verdict::Quarantine {
            reason: answer
                .reason
                .clone()
                .unwrap_or_else(|| "quarantined by hook".into()),
        },
        other => return Err(HookReplyError::Action(other.chars().take(40).collect())),
    };
    if answer.modifications.len() > MAX_MODIFICATIONS {
        return Err(HookReplyError::TooManyModifications);
    }
    let mut modifications = Vec::with_capacity(answer.modifications.len());
    for (index, m) in answer.modifications.into_iter().enumerate() {
        let bad = |why: &str| HookReplyError::Modification {
            index,
            why: why.to_string(),
        };
        modifications.push(match m {
            AnswerModification::AddHeader { name, value, index } => {
                Modification::AddHeader { name, value, index }
            }
            AnswerModification::ChangeHeader {
                name,
                value,
                occurrence,
            } => Modification::ChangeHeader {
                name,
                value,
                occurrence: occurrence.unwrap_or(1).max(1),
            },
            AnswerModification::RemoveHeader { name } => Modification::RemoveHeader { name },
            AnswerModification::AddRecipient { address } => Modification::AddRecipient { address },
            AnswerModification::RemoveRecipient { address } => {
                Modification::RemoveRecipient { address }
            }
            AnswerModification::ChangeSender { address } => Modification::ChangeSender { address },
            AnswerModification::ReplaceBody { body, body_base64 } => {
                let body = match (body, body_base64) {
                    (Some(text), None) => text.into_bytes(),
                    (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                        .decode(b64.as_bytes())
                        .map_err(|_| bad("body_base64 is not base64"))?,
                    _ => return Err(bad("replace_body needs one of body or body_base64")),
                };
                Modification::ReplaceBody { body: crlf(body) }
            }
        });
    }
    Ok(FilterOutcome {
        verdict,
        modifications,
    })
}

/// Bare LF line ends (JSON authors write "\n") made CRLF, as SMTP wants.
fn crlf(body: Vec<u8>) -> Vec<u8> {
    if !body.contains(&b'\n') {
        return body;
    }
    let mut out = Vec::with_capacity(body.len() + body.len() / 32);
    let mut prev = 0u8;
    for &b in &body {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    out
}

#[cfg(test)]
#[path = "hook_tests.rs"]
mod tests;
