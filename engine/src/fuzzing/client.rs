//! The delivery client's reply parser under a hostile server: whatever the server
//! sends, replies stay bounded and well-formed, our commands never echo its bytes,
//! AUTH never goes out in clear, a TLS-required session never sends mail in
//! clear, and every transaction reports one reply per recipient.

use super::{has_bare_newline, Chunker};
use crate::smtp::client::{
    ClientConfig, ClientEvent, ClientSession, OutboundMessage, OutboundRecipient, Reply, Stage,
    TlsPolicy,
};

/// Most transactions a fuzz run starts on one session.
const MAX_TRANSACTIONS: usize = 3;
/// Longest reply text: 100 lines of at most 2048 bytes, joined by "\n".
const MAX_REPLY_TEXT: usize = 100 * 2049;
const VERBS: [&str; 10] = [
    "EHLO ",
    "LHLO ",
    "STARTTLS",
    "AUTH ",
    "MAIL FROM:<",
    "RCPT TO:<",
    "DATA",
    "BDAT ",
    "RSET",
    "QUIT",
];

fn fuzz_client_config(flags: u8) -> ClientConfig {
    ClientConfig {
        ehlo_name: "relay.local.test".into(),
        lmtp: flags & 0x01 != 0,
        tls: match (flags >> 1) & 3 {
            0 => TlsPolicy::None,
            1 => TlsPolicy::Opportunistic,
            2 => TlsPolicy::Required,
            _ => TlsPolicy::Verify,
        },
        implicit_tls: false,
        auth: (flags & 0x08 != 0).then(|| ("relayuser".to_string(), "pa55word".to_string())),
        message_tls: if flags & 0x40 != 0 {
            crate::delivery::tls_policy::MessageTls::RequireTls
        } else {
            crate::delivery::tls_policy::MessageTls::Policy
        },
    }
}

fn message(flags: u8) -> OutboundMessage {
    let n = 1 + usize::from((flags >> 4) & 3);
    OutboundMessage {
        sender: "bounce@local.test".into(),
        recipients: (0..n)
            .map(|i| OutboundRecipient {
                address: format!("r{i}@remote.test"),
                notify: Some("FAILURE".into()),
                orcpt: Some(format!("r{i}@remote.test")),
            })
            .collect(),
        size: 1000,
        eightbit: flags & 0x40 != 0,
        smtputf8: flags & 0x80 != 0,
        ret: Some("HDRS"),
        envid: Some("env+1".into()),
    }
}

/// Drives a client session over server bytes, recording events as text.
struct ClientDriver {
    session: ClientSession,
    msg: OutboundMessage,
    tls: bool,
    required_tls: bool,
    transactions: usize,
    /// The current transaction's body went out (SendBody).
    body_sent: bool,
    done: bool,
    pub events: Vec<String>,
    /// Index in `events` after which read boundaries matter (bytes after the 220
    /// to STARTTLS are dropped to the end of their read).
    pub boundary_sensitive_from: Option<usize>,
}

impl ClientDriver {
    fn new(flags: u8) -> ClientDriver {
        let cfg = fuzz_client_config(flags);
        ClientDriver {
            required_tls: cfg.tls.encrypts(),
            session: ClientSession::new(cfg),
            msg: message(flags),
            tls: false,
            transactions: 0,
            body_sent: false,
            done: false,
            events: Vec::new(),
            boundary_sensitive_from: None,
        }
    }

    fn read(&mut self, bytes: &[u8]) {
        let mut pos = 0;
        let mut calls = 0;
        while pos < bytes.len() && !self.done {
            calls += 1;
            assert!(calls <= bytes.len() + 1, "client makes no progress");
            let (used, event) = self.session.receive(&bytes[pos..]);
            assert!(used <= bytes.len() - pos);
            pos += used;
            self.check_output();
            self.events.push(format!("{event:?}"));
            match event {
                ClientEvent::Read => assert_eq!(pos, bytes.len()),
                ClientEvent::Ready => {
                    assert_eq!(self.session.stage(), Stage::Idle);
                    assert!(
                        self.tls || !self.required_tls,
                        "Ready in clear with TLS required"
                    );
                    self.start_transaction();
                }
                ClientEvent::StartTls => {
                    assert_eq!(
                        pos,
                        bytes.len(),
                        "bytes after the STARTTLS 220 must be dropped"
                    );
                    assert!(!self.tls);
                    self.boundary_sensitive_from
                        .get_or_insert(self.events.len());
                    self.tls = true;
                    self.session.tls_established();
                    assert!(self.session.is_tls());
                    self.check_output();
                    return;
                }
                ClientEvent::SendBody(_) => self.body_sent = true,
                ClientEvent::Done(result) => {
                    assert_eq!(
                        result.recipients.len(),
                        self.msg.recipients.len(),
                        "one reply per recipient"
                    );
                    for r in &result.recipients {
                        check_reply(r);
                        assert!(
                            !r.is_positive() || self.body_sent,
                            "recipient delivered ({r}) but the body was never sent"
                        );
                    }
                    assert_eq!(self.session.stage(), Stage::Idle);
                    self.start_transaction();
                }
                ClientEvent::Failed(reply) => {
                    check_reply(&reply);
                    // Delivery records this reply for every recipient: a 2xx would
                    // count as delivered.
                    assert!(reply.code >= 400, "failure with a positive reply {reply}");
                    self.done = true;
                }
                ClientEvent::Closed => self.done = true,
            }
        }
    }

    fn start_transaction(&mut self) {
        if self.transactions == MAX_TRANSACTIONS {
            self.session.quit();
            self.check_output();
            return;
        }
        self.transactions += 1;
        self.body_sent = false;
        match self.session.send(&self.msg, self.msg.size) {
            // BDAT: the body goes out right after the commands.
            Ok(Some(ClientEvent::SendBody(_))) => self.body_sent = true,
            Ok(_) => {}
            Err(e) => {
                check_reply(&e.reply());
                self.session.quit();
            }
        }
        self.check_output();
    }

    /// Commands are whole CRLF lines we composed: one of our verbs, or a base64
    /// AUTH LOGIN answer; AUTH only inside TLS; MAIL only inside TLS when required.
    fn check_output(&mut self) {
        let out = self.session.output().to_vec();
        self.session.clear_output();
        if out.is_empty() {
            return;
        }
        assert!(out.ends_with(b"\r\n") && !has_bare_newline(&out), "{out:?}");
        let text = match std::str::from_utf8(&out) {
            Ok(t) => t,
            Err(e) => panic!("commands are not UTF-8: {e}"),
        };
        for line in text[..text.len() - 2].split("\r\n") {
            let known = VERBS.iter().any(|v| line.starts_with(v));
            let base64 = !line.is_empty()
                && line
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
            assert!(known || base64, "unexpected command line {line:?}");
            assert!(!line.chars().any(char::is_control), "{line:?}");
            if line.starts_with("AUTH ") || (base64 && !known) {
                assert!(self.tls, "credentials sent without TLS: {line:?}");
            }
            if line.starts_with("MAIL ") {
                assert!(
                    self.tls || !self.required_tls,
                    "mail sent in clear with TLS required"
                );
            }
        }
    }
}

fn check_reply(r: &Reply) {
    assert!((200..=599).contains(&r.code), "reply code {}", r.code);
    assert!(
        r.text.len() <= MAX_REPLY_TEXT,
        "reply text {} bytes",
        r.text.len()
    );
    assert!(
        !r.text
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'),
        "control character in reply text {:?}",
        r.text
    );
    if let Some(esc) = &r.esc {
        let parts: Vec<&str> = esc.split('.').collect();
        assert!(
            parts.len() == 3
                && parts
                    .iter()
                    .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit())),
            "bad enhanced status code {esc:?}"
        );
        assert_eq!(
            u16::from(esc.as_bytes()[0] - b'0'),
            r.code / 100,
            "enhanced status class differs from the reply's"
        );
    }
    // Formatting for logs and DSNs must not fail or panic.
    let _ = r.to_string();
}

/// Fuzz target `smtp_client`. Input: a flags byte (0x01 LMTP, 0x06 TLS policy,
/// 0x08 AUTH configured, 0x30 recipients - 1, 0x40 8-bit body, 0x80 SMTPUTF8),
/// a chunking seed byte, then everything the server sends.
///
/// Fed as one read and in small reads: the events must agree up to the first
/// STARTTLS (after which the protocol drops the rest of the read).
pub fn smtp_client(input: &[u8]) {
    let [flags, seed, stream @ ..] = input else {
        return;
    };
    let mut whole = ClientDriver::new(*flags);
    whole.read(stream);
    let mut split = ClientDriver::new(*flags);
    for piece in Chunker::new(*seed).split(stream) {
        split.read(piece);
    }
    // Read events are where reads ended: leave them out of the comparison.
    let strip = |d: &ClientDriver| -> Vec<String> {
        let cut = d.boundary_sensitive_from.unwrap_or(d.events.len());
        d.events[..cut]
            .iter()
            .filter(|e| *e != "Read")
            .cloned()
            .collect()
    };
    let (a, b) = (strip(&whole), strip(&split));
    if whole.boundary_sensitive_from.is_none() && split.boundary_sensitive_from.is_none() {
        assert_eq!(a, b, "client events depend on read boundaries");
    } else {
        let n = a.len().min(b.len());
        assert_eq!(a[..n], b[..n], "client events before STARTTLS differ");
    }
}
