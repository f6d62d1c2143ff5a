//! Byte-level tests of the sans-IO server session. Every script is run twice: in
//! one piece and one byte at a time, and both must give the same replies.

use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

use sluice_policy::{NetworkList, RelayPolicy};
use sluice_spool::{IdGenerator, SpoolError};

use super::server::{Action, PeerInfo, Session, SessionConfig, TxSummary};
use crate::config::{BareNewline, Protocol};

const NOW: u64 = 1_790_000_000_000;

fn config() -> SessionConfig {
    SessionConfig {
        listener: "test".into(),
        hostname: "mx.test".into(),
        greeting: "ESMTP".into(),
        protocol: Protocol::Smtp,
        starttls: true,
        auth_plaintext: false,
        auth_enabled: true,
        max_message_size: 10_000,
        max_recipients: 3,
        max_line_length: 512,
        max_errors: 5,
        bare_newline: BareNewline::Reject,
        relay: Arc::new(
            RelayPolicy::new(
                &["local.test".to_string()],
                NetworkList::parse(&["192.0.2.0/24"]).expect("networks"),
            )
            .expect("policy"),
        ),
    }
}

/// Drives a session: feeds input in chunks of `chunk` bytes, stores every
/// submission successfully (recording it), and fails every authentication.
struct Harness {
    session: Session,
    stored: Vec<super::server::Submission>,
    out: String,
    closed: bool,
    starttls: bool,
}

impl Harness {
    fn new(cfg: SessionConfig, ip: &str) -> Harness {
        let ip: IpAddr = ip.parse().expect("ip");
        let mut session = Session::new(
            Arc::new(cfg),
            Rc::new(IdGenerator::new(0, None)),
            PeerInfo {
                ip,
                port: 1000,
                tls: None,
            },
        );
        session.greeting();
        let mut h = Harness {
            session,
            stored: Vec::new(),
            out: String::new(),
            closed: false,
            starttls: false,
        };
        h.drain();
        h
    }

    fn drain(&mut self) {
        self.out
            .push_str(&String::from_utf8_lossy(self.session.output()));
        self.session.clear_output();
    }

    fn feed(&mut self, input: &[u8], chunk: usize) {
        for piece in input.chunks(chunk.max(1)) {
            let mut pos = 0;
            while pos < piece.len() && !self.closed {
                let (used, action) = self.session.receive(&piece[pos..], NOW);
                pos += used;
                match action {
                    Action::Read => {}
                    Action::Close => self.closed = true,
                    Action::StartTls => {
                        self.starttls = true;
                        pos = piece.len();
                    }
                    Action::Store(sub) => {
                        let summary = TxSummary::of(&sub.envelope);
                        let id = sub.id;
                        self.stored.push(*sub);
                        self.session.store_result(id, &summary, Ok(()));
                    }
                    Action::Authenticate { user, password } => {
                        let ok = user == "alice" && password == "secret";
                        self.session.auth_result(user, ok);
                    }
                }
            }
        }
        self.drain();
    }

    fn codes(&self) -> Vec<String> {
        self.out
            .lines()
            .filter(|l| l.len() >= 4 && l.as_bytes()[3] == b' ')
            .map(|l| l[..3].to_string())
            .collect()
    }
}

/// Runs `input` whole and byte by byte; asserts both agree; returns the whole-run harness.
fn run(cfg: SessionConfig, ip: &str, input: &[u8]) -> Harness {
    let mut whole = Harness::new(cfg.clone(), ip);
    whole.feed(input, input.len());
    let mut bytewise = Harness::new(cfg, ip);
    bytewise.feed(input, 1);
    assert_eq!(
        whole.codes(),
        bytewise.codes(),
        "replies differ when fed byte by byte"
    );
    assert_eq!(whole.stored.len(), bytewise.stored.len());
    for (a, b) in whole.stored.iter().zip(&bytewise.stored) {
        assert_eq!(strip_received(&a.body), strip_received(&b.body));
    }
    whole
}

fn strip_received(body: &[u8]) -> &[u8] {
    // The Received header ends at the first CRLF not followed by a tab.
    let mut i = 0;
    while let Some(off) = body[i..].windows(2).position(|w| w == b"\r\n") {
        let end = i + off + 2;
        if body.get(end) != Some(&b'\t') {
            return &body[end..];
        }
        i = end;
    }
    body
}

const TX: &[u8] = b"EHLO client.test\r\nMAIL FROM:<a@local.test>\r\nRCPT TO:<b@local.test>\r\n";

#[test]
fn simple_transaction_is_stored_byte_exact() {
    let mut input = TX.to_vec();
    input.extend_from_slice(b"DATA\r\n");
    let mut h = Harness::new(config(), "198.51.100.1");
    h.feed(&input, input.len());
    h.feed(b"Subject: hi\r\n\r\n..dot\r\nend\r\n.\r\nQUIT\r\n", 1);
    assert_eq!(h.codes(), ["220", "250", "250", "250", "354", "250", "221"]);
    assert_eq!(h.stored.len(), 1);
    let msg = &h.stored[0];
    assert_eq!(
        strip_received(&msg.body),
        b"Subject: hi\r\n\r\n.dot\r\nend\r\n"
    );
    assert!(msg.body.starts_with(b"Received: from client.test"));
    assert_eq!(msg.envelope.sender, "a@local.test");
    assert_eq!(msg.envelope.recipients[0].address, "b@local.test");
    assert!(msg.envelope.recipients[0].local);
    assert!(h.out.contains(&format!("queued as {}", msg.id)));
    assert!(h.closed);
}

#[test]
fn ehlo_advertises_extensions() {
    let h = run(config(), "198.51.100.1", b"EHLO x\r\n");
    for ext in [
        "PIPELINING",
        "SIZE 10000",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "DSN",
        "STARTTLS",
    ] {
        assert!(h.out.contains(ext), "{ext} missing in {}", h.out);
    }
    // No AUTH before TLS when plaintext auth is off.
    assert!(!h.out.contains("AUTH"), "{}", h.out);
}

#[test]
fn pipelined_commands_answered_in_order() {
    let h = run(
        config(),
        "192.0.2.9",
        b"EHLO x\r\nMAIL FROM:<a@x.test> RET=HDRS ENVID=e1\r\nRCPT TO:<b@remote.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@remote.test\r\nRCPT TO:<c@remote.test>\r\nBDAT 7 LAST\r\nhello\r\nRSET\r\n",
    );
    assert_eq!(h.codes(), ["220", "250", "250", "250", "250", "250", "250"]);
    let env = &h.stored[0].envelope;
    assert_eq!(env.envid.as_deref(), Some("e1"));
    assert_eq!(env.ret, Some(sluice_spool::Ret::Headers));
    assert!(env.recipients[0]
        .notify
        .contains(sluice_spool::Notify::SUCCESS));
    assert!(env.recipients[0]
        .notify
        .contains(sluice_spool::Notify::FAILURE));
    // smtp-proto keeps the address of "rfc822;addr"; the type is implied.
    assert_eq!(env.recipients[0].orcpt.as_deref(), Some("b@remote.test"));
    assert!(!env.recipients[0].local);
    assert_eq!(strip_received(&h.stored[0].body), b"hello\r\n");
}

#[test]
fn bdat_chunks_concatenate() {
    let h = run(
        config(),
        "192.0.2.9",
        b"EHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@remote.test>\r\nBDAT 4\r\nab\r\nBDAT 0 LAST\r\n",
    );
    assert_eq!(h.codes(), ["220", "250", "250", "250", "250", "250"]);
    assert_eq!(strip_received(&h.stored[0].body), b"ab\r\n");
}

#[test]
fn relay_denied_for_outsiders_allowed_for_networks() {
    let h = run(
        config(),
        "198.51.100.1",
        b"EHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@remote.test>\r\n",
    );
    assert!(h.out.contains("554 5.7.1"), "{}", h.out);
    let h = run(
        config(),
        "192.0.2.1",
        b"EHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@remote.test>\r\n",
    );
    assert_eq!(h.codes(), ["220", "250", "250", "250"]);
}

#[test]
fn wrong_order_and_syntax() {
    let h = run(
        config(),
        "192.0.2.1",
        b"MAIL FROM:<a@x.test>\r\nEHLO x\r\nRCPT TO:<b@x.test>\r\nDATA\r\nMAIL FROM:bad\r\nXYZZY\r\n",
    );
    // Five errors reach max_errors: 421 and close.
    assert_eq!(
        h.codes(),
        ["220", "503", "250", "503", "503", "501", "500", "421"]
    );
    assert!(h.out.contains("500 5.5.1"));
    assert!(h.stored.is_empty());
}

#[test]
fn too_many_recipients() {
    let h = run(
        config(),
        "192.0.2.1",
        b"EHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<a@r.test>\r\nRCPT TO:<b@r.test>\r\nRCPT TO:<c@r.test>\r\nRCPT TO:<d@r.test>\r\n",
    );
    assert_eq!(h.codes(), ["220", "250", "250", "250", "250", "250", "452"]);
    assert!(h.out.contains("452 4.5.3"));
}

#[test]
fn line_too_long_is_skipped_to_its_end() {
    let mut input = b"EHLO x\r\nNOOP ".to_vec();
    input.extend(std::iter::repeat_n(b'a', 600));
    input.extend_from_slice(b"\r\nNOOP\r\n");
    let h = run(config(), "192.0.2.1", &input);
    assert_eq!(h.codes(), ["220", "250", "500", "250"]);
    assert!(h.out.contains("500 5.5.2"));
}

#[test]
fn message_too_big_stores_nothing() {
    let h = run(
        config(),
        "192.0.2.1",
        b"EHLO x\r\nMAIL FROM:<a@x.test> SIZE=20000\r\n",
    );
    assert!(h.out.contains("552 5.3.4"), "{}", h.out);

    let mut h = Harness::new(config(), "192.0.2.1");
    h.feed(
        b"EHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@r.test>\r\nDATA\r\n",
        64,
    );
    let big = vec![b'x'; 20_000];
    h.feed(&big, 1000);
    h.feed(b"\r\n.\r\nNOOP\r\n", 3);
    assert_eq!(h.codes(), ["220", "250", "250", "250", "354", "552", "250"]);
    assert!(h.stored.is_empty());

    let mut input =
        b"EHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@r.test>\r\nBDAT 20000 LAST\r\n".to_vec();
    input.extend_from_slice(&big);
    input.extend_from_slice(b"NOOP\r\n");
    let h = run(config(), "192.0.2.1", &input);
    assert_eq!(h.codes(), ["220", "250", "250", "250", "552", "250"]);
    assert!(h.stored.is_empty());
}

#[test]
fn smuggled_transaction_is_not_started() {
    let mut input = TX.to_vec();
    input.extend_from_slice(b"DATA\r\n");
    let mut h = Harness::new(config(), "192.0.2.1");
    h.feed(&input, input.len());
    h.feed(
        b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@local.test>\r\nDATA\r\nevil\r\n.\r\nNOOP\r\n",
        7,
    );
    // One 550 for the whole thing (rejected for the bare LF), then the NOOP.
    assert_eq!(h.codes(), ["220", "250", "250", "250", "354", "550", "250"]);
    assert!(h.out.contains("550 5.6.0"));
    assert!(h.stored.is_empty());

    let mut cfg = config();
    cfg.bare_newline = BareNewline::Accept;
    let mut h = Harness::new(cfg, "192.0.2.1");
    h.feed(&input, input.len());
    h.feed(b"hi\n.\nMAIL FROM:<evil@x.test>\r\n.\r\n", 1);
    assert_eq!(h.stored.len(), 1);
    assert_eq!(
        strip_received(&h.stored[0].body),
        b"hi\n.\nMAIL FROM:<evil@x.test>\r\n"
    );
}

#[test]
fn bare_lf_command_closes() {
    let h = run(config(), "192.0.2.1", b"EHLO x\r\nNOOP\nNOOP\r\n");
    assert_eq!(h.codes(), ["220", "250", "500"]);
    assert!(h.closed);
    let h = run(config(), "192.0.2.1", b"EHLO x\r\nNO\rOP\r\n");
    assert_eq!(h.codes(), ["220", "250", "500"]);
    assert!(h.closed);
}

#[test]
fn data_before_354_is_refused() {
    let mut input = TX.to_vec();
    input.extend_from_slice(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n");
    let mut h = Harness::new(config(), "192.0.2.1");
    h.feed(&input, input.len());
    assert!(h.out.contains("554 5.5.0"), "{}", h.out);
    assert!(h.closed);
    assert!(h.stored.is_empty());
}

#[test]
fn starttls_discards_pipelined_bytes() {
    let mut h = Harness::new(config(), "192.0.2.1");
    h.feed(b"EHLO x\r\nSTARTTLS\r\nNOOP\r\nNOOP\r\n", 64);
    assert!(h.starttls);
    assert_eq!(h.codes(), ["220", "250", "220"]);
    h.session.tls_established("TLSv1.3 TEST".into());
    h.feed(b"MAIL FROM:<a@x.test>\r\n", 64);
    // State was reset by TLS: EHLO is needed again.
    assert_eq!(h.codes().last().map(String::as_str), Some("503"));
}

#[test]
fn auth_after_tls_and_relay_by_authenticated_user() {
    let mut h = Harness::new(config(), "198.51.100.1");
    h.feed(b"EHLO x\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", 64);
    assert!(h.out.contains("538 5.7.11"), "{}", h.out);
    h.session.tls_established("TLSv1.3 TEST".into());
    h.out.clear();
    h.feed(b"EHLO x\r\n", 64);
    assert!(h.out.contains("AUTH PLAIN LOGIN"));
    // Wrong password, then LOGIN with the right one.
    h.feed(b"AUTH PLAIN AGFsaWNlAHdyb25n\r\n", 5);
    assert!(h.out.contains("535 5.7.8"));
    h.feed(b"AUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\n", 3);
    assert!(h.out.contains("235 2.7.0"), "{}", h.out);
    h.feed(
        b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@remote.test>\r\nBDAT 2 LAST\r\nhi",
        4,
    );
    assert_eq!(h.stored.len(), 1);
    assert_eq!(h.stored[0].envelope.auth_user.as_deref(), Some("alice"));
    let received = String::from_utf8_lossy(&h.stored[0].body).into_owned();
    assert!(received.contains("with ESMTPSA"), "{received}");
    assert!(received.contains("(using TLSv1.3 TEST)"), "{received}");
}

#[test]
fn too_many_errors_disconnects() {
    let h = run(config(), "192.0.2.1", b"A\r\nB\r\nC\r\nD\r\nE\r\nNOOP\r\n");
    assert_eq!(h.codes(), ["220", "500", "500", "500", "500", "500", "421"]);
    assert!(h.closed);
}

#[test]
fn lmtp_replies_per_recipient() {
    let mut cfg = config();
    cfg.protocol = Protocol::Lmtp;
    let h = run(
        cfg,
        "192.0.2.1",
        b"EHLO x\r\nLHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@local.test>\r\nRCPT TO:<c@local.test>\r\nBDAT 2 LAST\r\nhi",
    );
    assert_eq!(
        h.codes(),
        ["220", "500", "250", "250", "250", "250", "250", "250"]
    );
}

#[test]
fn spool_full_gives_452() {
    let mut h = Harness::new(config(), "192.0.2.1");
    let (_, action) = h.session.receive(
        b"EHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@r.test>\r\nBDAT 2 LAST\r\nhi",
        NOW,
    );
    let Action::Store(sub) = action else {
        panic!("expected a store")
    };
    h.session
        .store_result(sub.id, &TxSummary::of(&sub.envelope), Err(SpoolError::Full));
    h.drain();
    assert!(h.out.contains("452 4.3.1"), "{}", h.out);
    assert!(!h.out.contains("queued as"));
}

#[test]
fn help_vrfy_noop_quit() {
    let h = run(
        config(),
        "192.0.2.1",
        b"HELP\r\nVRFY x\r\nNOOP\r\nQUIT\r\nNOOP\r\n",
    );
    assert_eq!(h.codes(), ["220", "214", "252", "250", "221"]);
}

#[test]
fn bare_postmaster_accepted_null_recipient_refused() {
    let h = run(
        config(),
        "198.51.100.1",
        b"EHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<PostMaster>\r\nRCPT TO:<>\r\n",
    );
    assert_eq!(h.codes(), ["220", "250", "250", "250", "501"]);
}

#[test]
fn starttls_forgets_authentication() {
    let mut cfg = config();
    cfg.auth_plaintext = true;
    let mut h = Harness::new(cfg, "198.51.100.1");
    h.feed(b"EHLO x\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", 64);
    assert!(h.out.contains("235 2.7.0"));
    h.feed(b"STARTTLS\r\n", 64);
    h.session.tls_established("TLSv1.3 TEST".into());
    h.out.clear();
    h.feed(
        b"EHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@remote.test>\r\n",
        64,
    );
    assert!(h.out.contains("AUTH PLAIN LOGIN"), "{}", h.out);
    assert!(h.out.contains("554 5.7.1"), "{}", h.out);
}
