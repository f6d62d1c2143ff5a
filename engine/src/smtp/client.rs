//! The SMTP/LMTP client session as a sans-IO state machine (delivery side).
//!
//! Replies go in through [`ClientSession::receive`]; commands accumulate in an
//! output buffer; what needs the outside world (TLS handshake, writing a body,
//! reporting a finished transaction) comes back as a [`ClientEvent`]. The driver
//! picks each stage's timeout from [`ClientSession::stage`].
//!
//! Replies are framed here rather than with smtp-proto's receiver because the
//! client must keep strict bounds (reply length, line count) across arbitrary read
//! splits, and must be lenient about bare LF line ends that some servers send.

use std::collections::VecDeque;
use std::fmt;

use base64::Engine as _;

/// Longest reply line we keep; longer lines are truncated (not an error: some
/// servers send long banners).
const MAX_LINE: usize = 2048;
/// Most lines in one reply (EHLO replies are the longest in practice).
const MAX_LINES: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code ("5.1.1") when the server gave one.
    pub esc: Option<String>,
    /// The text of all lines, joined with "\n", without code or status code.
    pub text: String,
}

impl Reply {
    pub fn class(&self) -> u16 {
        self.code / 100
    }
    pub fn is_positive(&self) -> bool {
        self.class() == 2
    }
    pub fn is_transient(&self) -> bool {
        self.class() == 4
    }
    pub fn is_permanent(&self) -> bool {
        self.class() == 5
    }
    /// A reply we make up for a local condition (e.g. "no recipients accepted").
    pub fn local(code: u16, esc: &str, text: &str) -> Reply {
        Reply {
            code,
            esc: Some(esc.to_string()),
            text: text.to_string(),
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.text.replace('\n', " ");
        match &self.esc {
            Some(esc) => write!(f, "{} {} {}", self.code, esc, text),
            None => write!(f, "{} {}", self.code, text),
        }
    }
}

/// What the peer's EHLO reply offered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    pub chunking: bool,
    pub size: Option<u64>,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub starttls: bool,
    pub enhanced_status_codes: bool,
    pub auth_plain: bool,
    pub auth_login: bool,
    /// REQUIRETLS (RFC 8689), offered only over TLS.
    pub requiretls: bool,
}

impl Capabilities {
    fn parse(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities::default();
        // The first line is the greeting name; the rest are keywords.
        for line in reply.text.lines().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => caps.pipelining = true,
                "CHUNKING" => caps.chunking = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => caps.eightbitmime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "DSN" => caps.dsn = true,
                "STARTTLS" => caps.starttls = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "REQUIRETLS" => caps.requiretls = true,
                "AUTH" => {
                    for mech in words {
                        match mech.to_ascii_uppercase().as_str() {
                            "PLAIN" => caps.auth_plain = true,
                            "LOGIN" => caps.auth_login = true,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        caps
    }
}

/// The TLS level a session runs under; what it allows is decided by
/// [`crate::delivery::tls_policy::decide`].
pub use crate::delivery::tls_policy::Level as TlsPolicy;
use crate::delivery::tls_policy::{
    decide, requiretls_check, Failure, Handshake, MessageTls, Verdict,
};

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub ehlo_name: String,
    pub lmtp: bool,
    pub tls: TlsPolicy,
    /// TLS is already up when the session starts (implicit TLS, port 465):
    /// no STARTTLS, and AUTH may go ahead.
    pub implicit_tls: bool,
    /// AUTH credentials (smart hosts); only used over TLS.
    pub auth: Option<(String, String)>,
    /// What the messages of this session ask of it (RFC 8689): with
    /// REQUIRETLS the server must offer REQUIRETLS after TLS, and MAIL
    /// carries it ([`requiretls_check`]).
    pub message_tls: MessageTls,
}

/// Where the session is, for picking the stage's timeout and for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Greeting,
    Ehlo,
    StartTls,
    Auth,
    Idle,
    Mail,
    Rcpt,
    Data,
    DataEnd,
    Rset,
    Quit,
}

/// DSN parameters to pass on when the peer offers DSN.
#[derive(Debug, Clone, Default)]
pub struct OutboundRecipient {
    pub address: String,
    /// NOTIFY keywords, e.g. "SUCCESS,FAILURE" or "NEVER"; None = not given.
    pub notify: Option<String>,
    /// Original recipient address (sent as ORCPT=rfc822;xtext).
    pub orcpt: Option<String>,
}

/// One message transaction to run on a ready session.
#[derive(Debug, Clone, Default)]
pub struct OutboundMessage {
    pub sender: String,
    pub recipients: Vec<OutboundRecipient>,
    /// Body size on the wire (for SIZE=).
    pub size: u64,
    pub eightbit: bool,
    pub smtputf8: bool,
    /// "FULL" or "HDRS".
    pub ret: Option<&'static str>,
    pub envid: Option<String>,
}

/// Why a message cannot go over this session at all (decided before sending).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsendable {
    #[error("message needs SMTPUTF8 but the server does not offer it")]
    NeedsSmtpUtf8,
    #[error("message size {size} exceeds the server's limit {limit}")]
    TooBig { size: u64, limit: u64 },
    #[error("session is not ready for a transaction")]
    NotReady,
}

impl Unsendable {
    /// The reply recorded for the recipients.
    pub fn reply(&self) -> Reply {
        match self {
            Unsendable::NeedsSmtpUtf8 => Reply::local(
                553,
                "5.6.7",
                "non-ASCII addresses and the server does not offer SMTPUTF8",
            ),
            Unsendable::TooBig { .. } => {
                Reply::local(552, "5.3.4", "message too big for the server")
            }
            Unsendable::NotReady => Reply::local(451, "4.4.0", "session not ready"),
        }
    }
}

/// How a body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    /// After the 354: dot-stuffed, then CRLF.CRLF (use [`super::body_out::encode_data`]).
    Data,
    /// Right after "BDAT n LAST" (already in the output): the canonical bytes
    /// (use [`super::body_out::encode_bdat`]); n is [`super::body_out::bdat_len`].
    Bdat,
}

/// Per-recipient outcome of a transaction, in the order recipients were given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionResult {
    pub recipients: Vec<Reply>,
}

#[derive(Debug)]
pub enum ClientEvent {
    /// All input consumed; read more.
    Read,
    /// Greeting, EHLO (and STARTTLS/AUTH) done: call [`ClientSession::send`].
    Ready,
    /// Write the output (STARTTLS), then run the TLS handshake and call
    /// [`ClientSession::tls_established`]. Bytes after the 220 are discarded.
    StartTls,
    /// Write the body now, in this mode (after the output buffer).
    SendBody(BodyMode),
    /// The transaction ended; the session is ready for the next one.
    Done(TransactionResult),
    /// The session cannot go on (greeting refused, EHLO failed, TLS required but
    /// missing, protocol error). The reply says why; all pending recipients get it.
    Failed(Reply),
    /// QUIT answered.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo,
    StartTls,
    AuthChallenge,
    AuthResult,
    Mail,
    Rcpt(usize),
    Data,
    DataEnd,
    /// One LMTP reply per accepted recipient after the body.
    LmtpRcpt(usize),
    Rset,
    Quit,
}

pub struct ClientSession {
    cfg: ClientConfig,
    out: Vec<u8>,
    expect: VecDeque<Expect>,
    caps: Capabilities,
    tls: bool,
    authenticated: bool,
    /// Partial reply being framed.
    lines: Vec<String>,
    line: Vec<u8>,
    line_truncated: bool,
    // Current transaction.
    mail_reply: Option<Reply>,
    rcpt_replies: Vec<Option<Reply>>,
    data_reply: Option<Reply>,
    body_mode: BodyMode,
    /// The previous transaction ended without the server completing it: RSET first.
    needs_rset: bool,
    /// Without PIPELINING (RFC 2920), the transaction's commands not yet sent:
    /// each goes out only once the reply to the one before it has arrived.
    held: VecDeque<(Vec<u8>, Expect, Stage)>,
    /// Without PIPELINING, the body command is still to come after the last
    /// RCPT reply (BDAT's length, or DATA when `body_mode` is Data).
    held_body: Option<u64>,
    stage: Stage,
    auth_login_sent_user: bool,
    /// Why the session stopped on its TLS policy, when it did.
    tls_failure: Option<Failure>,
    /// MAIL carries REQUIRETLS (decided after the last EHLO).
    requiretls_param: bool,
}

impl ClientSession {
    pub fn new(cfg: ClientConfig) -> ClientSession {
        let mut expect = VecDeque::new();
        expect.push_back(Expect::Greeting);
        let tls = cfg.implicit_tls;
        ClientSession {
            cfg,
            out: Vec::with_capacity(1024),
            expect,
            caps: Capabilities::default(),
            tls,
            authenticated: false,
            lines: Vec::new(),
            line: Vec::new(),
            line_truncated: false,
            mail_reply: None,
            rcpt_replies: Vec::new(),
            data_reply: None,
            body_mode: BodyMode::Data,
            needs_rset: false,
            held: VecDeque::new(),
            held_body: None,
            stage: Stage::Greeting,
            auth_login_sent_user: false,
            tls_failure: None,
            requiretls_param: false,
        }
    }

    pub fn output(&self) -> &[u8] {
        &self.out
    }
    pub fn clear_output(&mut self) {
        self.out.clear();
    }
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The stage of the oldest reply still awaited: what a read is waiting for.
    /// `stage()` is that of the last command queued, which is later when commands
    /// went out together (a stalled MAIL reply is not a DATA timeout).
    pub fn awaited_stage(&self) -> Stage {
        match self.expect.front() {
            Some(Expect::Greeting) => Stage::Greeting,
            Some(Expect::Ehlo) => Stage::Ehlo,
            Some(Expect::StartTls) => Stage::StartTls,
            Some(Expect::AuthChallenge | Expect::AuthResult) => Stage::Auth,
            Some(Expect::Mail) => Stage::Mail,
            Some(Expect::Rcpt(_)) => Stage::Rcpt,
            Some(Expect::Data) => Stage::Data,
            Some(Expect::DataEnd | Expect::LmtpRcpt(_)) => Stage::DataEnd,
            Some(Expect::Rset) => Stage::Rset,
            Some(Expect::Quit) => Stage::Quit,
            None => self.stage,
        }
    }
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Feed bytes from the server. Returns bytes consumed and the next event.
    pub fn receive(&mut self, input: &[u8]) -> (usize, ClientEvent) {
        let mut pos = 0;
        while pos < input.len() {
            let rest = &input[pos..];
            let Some(lf) = memchr::memchr(b'\n', rest) else {
                self.push_line_bytes(rest);
                return (input.len(), ClientEvent::Read);
            };
            self.push_line_bytes(&rest[..lf]);
            pos += lf + 1;
            let line = std::mem::take(&mut self.line);
            self.line_truncated = false;
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            // Server text ends up in logs, the spool and DSNs: no control
            // characters (a CR inside a line would pass straight through).
            let text: String = String::from_utf8_lossy(line)
                .chars()
                .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
                .collect();
            let Some((code, last, body)) = split_reply_line(&text) else {
                return (
                    input.len(),
                    ClientEvent::Failed(Reply::local(
                        451,
                        "4.5.0",
                        &format!("malformed reply line from server: {}", text.escape_debug()),
                    )),
                );
            };
            if let Some(first) = self.lines.first() {
                if !first.starts_with(&format!("{code:03}")) {
                    return (
                        input.len(),
                        ClientEvent::Failed(Reply::local(
                            451,
                            "4.5.0",
                            "inconsistent multi-line reply from server",
                        )),
                    );
                }
            }
            if self.lines.len() >= MAX_LINES {
                return (
                    input.len(),
                    ClientEvent::Failed(Reply::local(
                        451,
                        "4.5.0",
                        "reply from server has too many lines",
                    )),
                );
            }
            self.lines.push(format!("{code:03}{body}"));
            if !last {
                continue;
            }
            let reply = make_reply(code, std::mem::take(&mut self.lines));
            let event = self.on_reply(reply);
            match event {
                None => {}
                Some(ClientEvent::StartTls) => return (input.len(), ClientEvent::StartTls),
                Some(e) => return (pos, e),
            }
        }
        (input.len(), ClientEvent::Read)
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.line.len());
        if bytes.len() > room {
            self.line.extend_from_slice(&bytes[..room]);
            self.line_truncated = true;
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    fn on_reply(&mut self, reply: Reply) -> Option<ClientEvent> {
        let Some(expect) = self.expect.pop_front() else {
            return Some(ClientEvent::Failed(Reply::local(
                451,
                "4.5.0",
                &format!("unexpected reply from server: {reply}"),
            )));
        };
        match expect {
            Expect::Greeting => {
                if reply.code != 220 {
                    return Some(session_failed(reply));
                }
                self.send_ehlo();
                None
            }
            Expect::Ehlo => {
                if !reply.is_positive() {
                    return Some(session_failed(reply));
                }
                self.caps = Capabilities::parse(&reply);
                if !self.tls {
                    match decide(self.cfg.tls, self.caps.starttls, Handshake::NotYet) {
                        Verdict::StartTls => {
                            self.command(b"STARTTLS\r\n", Expect::StartTls, Stage::StartTls);
                            return None;
                        }
                        Verdict::Defer(failure) => return Some(self.tls_failed(failure)),
                        Verdict::Cleartext | Verdict::Proceed { .. } => {}
                    }
                }
                match requiretls_check(self.cfg.message_tls, self.tls, self.caps.requiretls) {
                    Ok(param) => self.requiretls_param = param,
                    Err(failure) => return Some(self.tls_failed(failure)),
                }
                self.after_ehlo()
            }
            Expect::StartTls => {
                if reply.code == 220 {
                    return Some(ClientEvent::StartTls);
                }
                let text = reply.to_string();
                match decide(self.cfg.tls, true, Handshake::Refused(&text)) {
                    Verdict::Defer(failure) => Some(self.tls_failed(failure)),
                    // Opportunistic: go on in plaintext (never with REQUIRETLS).
                    _ => match requiretls_check(self.cfg.message_tls, false, false) {
                        Ok(_) => self.after_ehlo(),
                        Err(failure) => Some(self.tls_failed(failure)),
                    },
                }
            }
            Expect::AuthChallenge => {
                if reply.code != 334 {
                    return Some(session_failed(reply));
                }
                let Some((user, pass)) = self.cfg.auth.clone() else {
                    return Some(session_failed(reply));
                };
                let b64 = base64::engine::general_purpose::STANDARD;
                let answer = if !self.auth_login_sent_user {
                    self.auth_login_sent_user = true;
                    self.expect.push_front(Expect::AuthChallenge);
                    b64.encode(user)
                } else {
                    self.expect.push_front(Expect::AuthResult);
                    b64.encode(pass)
                };
                self.out.extend_from_slice(answer.as_bytes());
                self.out.extend_from_slice(b"\r\n");
                None
            }
            Expect::AuthResult => {
                if reply.code != 235 {
                    return Some(session_failed(reply));
                }
                self.authenticated = true;
                self.stage = Stage::Idle;
                Some(ClientEvent::Ready)
            }
            Expect::Rset => {
                // A failed RSET leaves the session unusable.
                if !reply.is_positive() {
                    return Some(session_failed(reply));
                }
                self.next_held()
            }
            Expect::Mail => {
                self.mail_reply = Some(reply);
                self.next_held()
            }
            Expect::Rcpt(i) => {
                if let Some(slot) = self.rcpt_replies.get_mut(i) {
                    *slot = Some(reply);
                }
                self.next_held()
            }
            Expect::Data => {
                if reply.code == 354 {
                    self.stage = Stage::DataEnd;
                    self.expect.push_back(Expect::DataEnd);
                    return Some(ClientEvent::SendBody(BodyMode::Data));
                }
                if reply.class() < 4 {
                    // A 2xx here would mark the message delivered without its body.
                    return Some(session_failed(reply));
                }
                self.data_reply = Some(reply);
                Some(self.finish())
            }
            Expect::DataEnd => {
                let accepted: Vec<usize> = self
                    .rcpt_replies
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.as_ref().is_some_and(Reply::is_positive))
                    .map(|(i, _)| i)
                    .collect();
                if !self.cfg.lmtp || accepted.is_empty() {
                    self.data_reply = Some(reply);
                    return Some(self.finish());
                }
                // LMTP (RFC 2033): one reply per accepted recipient, in RCPT order;
                // this is the first one.
                self.rcpt_replies[accepted[0]] = Some(reply);
                for &i in accepted[1..].iter().rev() {
                    self.expect.push_front(Expect::LmtpRcpt(i));
                }
                if accepted.len() == 1 {
                    return Some(self.finish_lmtp());
                }
                None
            }
            Expect::LmtpRcpt(i) => {
                if let Some(slot) = self.rcpt_replies.get_mut(i) {
                    *slot = Some(reply);
                }
                if self.expect.iter().any(|e| matches!(e, Expect::LmtpRcpt(_))) {
                    return None;
                }
                Some(self.finish_lmtp())
            }
            Expect::Quit => Some(ClientEvent::Closed),
        }
    }

    fn finish_lmtp(&mut self) -> ClientEvent {
        self.stage = Stage::Idle;
        let recipients = std::mem::take(&mut self.rcpt_replies)
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Reply::local(451, "4.5.0", "no reply for recipient")))
            .collect();
        self.mail_reply = None;
        self.data_reply = None;
        ClientEvent::Done(TransactionResult { recipients })
    }

    fn after_ehlo(&mut self) -> Option<ClientEvent> {
        if let Some((user, pass)) = self.cfg.auth.clone() {
            if !self.authenticated && self.tls {
                let b64 = base64::engine::general_purpose::STANDARD;
                if self.caps.auth_plain {
                    let token = b64.encode(format!("\0{user}\0{pass}"));
                    self.command(
                        format!("AUTH PLAIN {token}\r\n").as_bytes(),
                        Expect::AuthResult,
                        Stage::Auth,
                    );
                    return None;
                }
                if self.caps.auth_login {
                    self.auth_login_sent_user = false;
                    self.command(b"AUTH LOGIN\r\n", Expect::AuthChallenge, Stage::Auth);
                    return None;
                }
                return Some(ClientEvent::Failed(Reply::local(
                    451,
                    "4.7.0",
                    "server offers no AUTH mechanism we support",
                )));
            }
            if !self.tls {
                return Some(ClientEvent::Failed(Reply::local(
                    451,
                    "4.7.10",
                    "AUTH configured but the session is not encrypted",
                )));
            }
        }
        self.stage = Stage::Idle;
        Some(ClientEvent::Ready)
    }

    fn send_ehlo(&mut self) {
        let verb = if self.cfg.lmtp { "LHLO" } else { "EHLO" };
        let cmd = format!("{verb} {}\r\n", self.cfg.ehlo_name);
        self.command(cmd.as_bytes(), Expect::Ehlo, Stage::Ehlo);
    }

    fn command(&mut self, bytes: &[u8], expect: Expect, stage: Stage) {
        self.out.extend_from_slice(bytes);
        self.expect.push_back(expect);
        self.stage = stage;
    }

    /// Queues `bytes` now with PIPELINING, else holds it until the previous
    /// command is answered.
    fn envelope_command(&mut self, bytes: Vec<u8>, expect: Expect, stage: Stage) {
        if self.caps.pipelining || (self.expect.is_empty() && self.held.is_empty()) {
            self.command(&bytes, expect, stage);
        } else {
            self.held.push_back((bytes, expect, stage));
        }
    }

    /// Without PIPELINING, after an envelope reply: sends the next held command
    /// once every sent one is answered. A refused MAIL ends the transaction
    /// (RCPTs would only earn 503s); after the last RCPT the body command goes
    /// out only when a recipient was accepted.
    fn next_held(&mut self) -> Option<ClientEvent> {
        if !self.expect.is_empty() || (self.held.is_empty() && self.held_body.is_none()) {
            return None;
        }
        if self.mail_reply.as_ref().is_some_and(|m| !m.is_positive()) {
            self.held.clear();
            self.held_body = None;
            return Some(self.finish());
        }
        if let Some((bytes, expect, stage)) = self.held.pop_front() {
            self.command(&bytes, expect, stage);
            return None;
        }
        let body_len = self.held_body.take()?;
        let any_accepted = self
            .rcpt_replies
            .iter()
            .any(|r| r.as_ref().is_some_and(Reply::is_positive));
        if !any_accepted {
            return Some(self.finish());
        }
        if self.body_mode == BodyMode::Bdat {
            self.command(
                format!("BDAT {body_len} LAST\r\n").as_bytes(),
                Expect::DataEnd,
                Stage::DataEnd,
            );
            return Some(ClientEvent::SendBody(BodyMode::Bdat));
        }
        self.command(b"DATA\r\n", Expect::Data, Stage::Data);
        None
    }

    /// The session stops on its TLS policy: recorded for the caller (which
    /// words the deferral, counts it and says QUIT) and reported as a 4.7.x.
    fn tls_failed(&mut self, failure: Failure) -> ClientEvent {
        let status = match failure {
            Failure::NoStartTls | Failure::StartTlsRefused(_) => "4.7.10",
            Failure::Handshake(_) | Failure::NotVerified(_) => "4.7.5",
            Failure::NoRequireTls => "4.7.30",
            Failure::MxNotAuthenticated => "4.7.4",
        };
        let text = format!("TLS policy {}: {}", self.cfg.tls, failure.label());
        self.tls_failure = Some(failure);
        ClientEvent::Failed(Reply::local(451, status, &text))
    }

    /// Why the session stopped on its TLS policy (no STARTTLS, STARTTLS
    /// refused), when it did.
    pub fn tls_failure(&self) -> Option<&Failure> {
        self.tls_failure.as_ref()
    }

    /// The TLS handshake after STARTTLS succeeded: say EHLO again (RFC 3207).
    pub fn tls_established(&mut self) {
        self.tls = true;
        self.caps = Capabilities::default();
        self.line.clear();
        self.lines.clear();
        self.send_ehlo();
    }

    /// Queue one transaction on a ready session. With PIPELINING the whole envelope
    /// goes in one write; with CHUNKING too, so does the body (BDAT n LAST), which
    /// makes a message one round trip. Without PIPELINING only the first command
    /// is queued; the rest follow reply by reply (RFC 2920 forbids sending ahead,
    /// and servers such as Postfix with reject_unauth_pipelining refuse it).
    pub fn send(
        &mut self,
        msg: &OutboundMessage,
        body_len: u64,
    ) -> Result<Option<ClientEvent>, Unsendable> {
        if self.stage != Stage::Idle || !self.expect.is_empty() {
            return Err(Unsendable::NotReady);
        }
        if msg.smtputf8 && !self.caps.smtputf8 {
            return Err(Unsendable::NeedsSmtpUtf8);
        }
        if let Some(limit) = self.caps.size.filter(|&l| l > 0) {
            if msg.size > limit {
                return Err(Unsendable::TooBig {
                    size: msg.size,
                    limit,
                });
            }
        }
        self.held.clear();
        self.held_body = None;
        if self.needs_rset {
            self.command(b"RSET\r\n", Expect::Rset, Stage::Rset);
            self.needs_rset = false;
        }
        let mut mail = format!("MAIL FROM:<{}>", msg.sender);
        if self.caps.size.is_some() {
            mail.push_str(&format!(" SIZE={}", msg.size));
        }
        if msg.eightbit && self.caps.eightbitmime {
            mail.push_str(" BODY=8BITMIME");
        }
        if msg.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if self.requiretls_param {
            mail.push_str(" REQUIRETLS");
        }
        if self.caps.dsn {
            if let Some(ret) = msg.ret {
                mail.push_str(&format!(" RET={ret}"));
            }
            if let Some(envid) = &msg.envid {
                mail.push_str(&format!(" ENVID={}", xtext(envid)));
            }
        }
        mail.push_str("\r\n");
        self.envelope_command(mail.into_bytes(), Expect::Mail, Stage::Mail);
        self.mail_reply = None;
        self.data_reply = None;
        self.rcpt_replies = vec![None; msg.recipients.len()];
        for (i, r) in msg.recipients.iter().enumerate() {
            let mut rcpt = format!("RCPT TO:<{}>", r.address);
            if self.caps.dsn {
                if let Some(n) = &r.notify {
                    rcpt.push_str(&format!(" NOTIFY={n}"));
                }
                if let Some(o) = &r.orcpt {
                    rcpt.push_str(&format!(" ORCPT=rfc822;{}", xtext(o)));
                }
            }
            rcpt.push_str("\r\n");
            self.envelope_command(rcpt.into_bytes(), Expect::Rcpt(i), Stage::Rcpt);
        }
        if !self.caps.pipelining {
            // DATA or BDAT waits for the RCPT replies (see next_held).
            self.body_mode = if self.caps.chunking {
                BodyMode::Bdat
            } else {
                BodyMode::Data
            };
            self.held_body = Some(body_len);
            return Ok(None);
        }
        if self.caps.chunking && self.caps.pipelining {
            self.body_mode = BodyMode::Bdat;
            self.command(
                format!("BDAT {body_len} LAST\r\n").as_bytes(),
                Expect::DataEnd,
                Stage::DataEnd,
            );
            return Ok(Some(ClientEvent::SendBody(BodyMode::Bdat)));
        }
        self.body_mode = BodyMode::Data;
        self.command(b"DATA\r\n", Expect::Data, Stage::Data);
        Ok(None)
    }

    /// The outcome once the last reply of a transaction arrived.
    fn finish(&mut self) -> ClientEvent {
        self.stage = Stage::Idle;
        let mail = self.mail_reply.take();
        let data = self.data_reply.take();
        let mut completed = false;
        let recipients: Vec<Reply> = std::mem::take(&mut self.rcpt_replies)
            .into_iter()
            .map(|rcpt| match (&mail, rcpt, &data) {
                (Some(m), _, _) if !m.is_positive() => m.clone(),
                (_, Some(r), _) if !r.is_positive() => r,
                (_, Some(_), Some(d)) => {
                    completed |= d.is_positive();
                    d.clone()
                }
                (_, _, Some(d)) => d.clone(),
                _ => Reply::local(451, "4.5.0", "no reply for recipient"),
            })
            .collect();
        if !completed {
            self.needs_rset = true;
        }
        ClientEvent::Done(TransactionResult { recipients })
    }

    /// Say goodbye.
    pub fn quit(&mut self) {
        self.command(b"QUIT\r\n", Expect::Quit, Stage::Quit);
    }
}

/// The session ends on a server reply. Only a 4xx or 5xx may stand for the
/// recipients' outcome: anything else where it is not expected ("219" to the
/// greeting, "250" to STARTTLS or DATA) is a protocol error, since a 2xx would
/// otherwise count as delivered when nothing was sent.
fn session_failed(reply: Reply) -> ClientEvent {
    if reply.is_transient() || reply.is_permanent() {
        return ClientEvent::Failed(reply);
    }
    ClientEvent::Failed(Reply::local(
        451,
        "4.5.0",
        &format!("unexpected reply from server: {reply}"),
    ))
}

/// "250-text" / "250 text" / "250" → (code, is_last, rest-with-separator).
fn split_reply_line(line: &str) -> Option<(u16, bool, &str)> {
    let bytes = line.as_bytes();
    if bytes.len() < 3 || !bytes[..3].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code: u16 = line[..3].parse().ok()?;
    if !(200..=599).contains(&code) {
        return None;
    }
    match bytes.get(3) {
        None => Some((code, true, "")),
        Some(b' ') => Some((code, true, &line[3..])),
        Some(b'-') => Some((code, false, &line[3..])),
        Some(_) => None,
    }
}

fn make_reply(code: u16, lines: Vec<String>) -> Reply {
    let mut esc = None;
    let mut texts = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        let text = l.get(4..).unwrap_or("");
        // Enhanced status code: class matches the reply's class ("5.1.1 text").
        let (code_part, rest) = text.split_once(' ').unwrap_or((text, ""));
        let is_esc = code_part.split('.').count() == 3
            && code_part
                .split('.')
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
            && code_part.starts_with(char::from(b'0' + (code / 100) as u8));
        if is_esc {
            if i == 0 {
                esc = Some(code_part.to_string());
            }
            texts.push(rest.to_string());
        } else {
            texts.push(text.to_string());
        }
    }
    Reply {
        code,
        esc,
        text: texts.join("\n"),
    }
}

/// RFC 3461 xtext: '+', '=' and anything outside '!'..'~' become +XX.
pub fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}
