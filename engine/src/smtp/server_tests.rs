//! Byte-level tests of the sans-IO server session. Every script is run twice: in
//! one piece and one byte at a time, and both must give the same replies.

use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

use sluice_policy::{NetworkList, RelayPolicy};
use sluice_spool::{IdGenerator, SpoolError};

use super::server::{Action, PeerInfo, Session, SessionConfig, TxSummary};
use crate::config::{BareNewline, NulBytes, Protocol};
use crate::filters::{OwnedEvent, StageSet};
use sluice_policy::stage::{FilterReply, Stage, Verdict};

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
        nul_bytes: NulBytes::Reject,
        max_message_line_length: 998,
        relay: Arc::new(
            RelayPolicy::new(
                &["local.test".to_string()],
                NetworkList::parse(&["192.0.2.0/24"]).expect("networks"),
            )
            .expect("policy"),
        ),
        auth_guard: Arc::new(crate::auth_guard::AuthGuard::new(
            &crate::config::AuthSection::default(),
        )),
        untrusted: Default::default(),
        verify: None,
        honor_tls_required_no: false,
        filters: None,
        filter_stages: Default::default(),
        dnsbl: false,
        greylist: false,
        add_missing_headers: crate::config::AddMissingHeaders::No,
        sender_logins: None,
        rewrite: None,
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
    /// (HELO, sender) of every SPF check asked for.
    spf_checks: Vec<(String, String)>,
    /// What SPF checks answer (None: accept).
    spf_refusal: Option<(u16, &'static str, String)>,
    /// (stage, recipient) of every filter call.
    filter_calls: Vec<(Stage, Option<String>)>,
    /// What the filters answer.
    filter: fn(&OwnedEvent) -> Verdict,
}

impl Harness {
    fn new(cfg: SessionConfig, ip: &str) -> Harness {
        Harness::filtered(cfg, ip, |_| Verdict::Accept)
    }

    fn filtered(cfg: SessionConfig, ip: &str, filter: fn(&OwnedEvent) -> Verdict) -> Harness {
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
            spf_checks: Vec::new(),
            spf_refusal: None,
            filter_calls: Vec::new(),
            filter,
        };
        h.pending_filter();
        h.drain();
        h
    }

    /// Answers a filter call the session made outside `receive`.
    fn pending_filter(&mut self) {
        if let Some(call) = self.session.take_filter_call() {
            self.answer_filter(&call);
        }
    }

    fn answer_filter(&mut self, call: &OwnedEvent) {
        // Nothing of the stage is answered before the filters are.
        assert_eq!(self.session.debug_view().state, "paused");
        self.filter_calls.push((call.stage, call.recipient.clone()));
        let verdict = (self.filter)(call);
        self.session.filter_result(
            sluice_policy::stage::FilterOutcome::with_verdict(verdict),
            NOW,
        );
        if self.session.is_closed() {
            self.closed = true;
        }
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
                        let _ = self.session.auth_result(user, ok, NOW);
                        self.pending_filter();
                    }
                    Action::Filter(call) => self.answer_filter(&call),
                    Action::CheckSpf { helo, sender } => {
                        // Nothing is answered before the check's outcome.
                        assert_eq!(self.session.debug_view().state, "paused");
                        self.spf_checks.push((helo, sender));
                        self.session
                            .spf_result(Default::default(), self.spf_refusal.clone());
                        self.pending_filter();
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
    // A failed AUTH names no mechanism (milters' {auth_type}).
    assert_eq!(h.session.auth_mechanism(), None);
    h.feed(b"AUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\n", 3);
    assert!(h.out.contains("235 2.7.0"), "{}", h.out);
    assert_eq!(h.session.auth_mechanism(), Some("LOGIN"));
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
    h.session.store_result(
        sub.id,
        &TxSummary::of(&sub.envelope),
        Err(SpoolError::Full.into()),
    );
    h.drain();
    assert!(h.out.contains("452 4.3.1"), "{}", h.out);
    assert!(!h.out.contains("queued as"));
}

/// A DKIM signature a rule asked for and could not be made: 451 4.3.0, and
/// the message is not acknowledged.
#[test]
fn signing_failure_gives_451() {
    let mut h = Harness::new(config(), "192.0.2.1");
    let (_, action) = h.session.receive(
        b"EHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@r.test>\r\nBDAT 2 LAST\r\nhi",
        NOW,
    );
    let Action::Store(sub) = action else {
        panic!("expected a store")
    };
    let failed = sluice_policy::dkim::DkimError::Sign {
        signer: "example-rsa".into(),
        reason: "key unusable".into(),
    };
    h.session.store_result(
        sub.id,
        &TxSummary::of(&sub.envelope),
        Err(crate::queue::EnqueueError::from(failed)),
    );
    h.drain();
    assert!(h.out.contains("451 4.3.0"), "{}", h.out);
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

// ---- FUTURERELEASE, DELIVERBY, MT-PRIORITY and queue quotas ----

fn mail_with(params: &str) -> Harness {
    let input = format!(
        "EHLO client.test\r\nMAIL FROM:<a@local.test> {params}\r\nRCPT TO:<b@local.test>\r\nBDAT 2 LAST\r\nhi"
    );
    // A client in the relay networks: these extensions are for trusted ones.
    run(config(), "192.0.2.1", input.as_bytes())
}

#[test]
fn ehlo_advertises_futurerelease_deliverby_and_mt_priority() {
    let h = run(config(), "198.51.100.1", b"EHLO x\r\n");
    let latest =
        chrono::DateTime::from_timestamp((NOW / 1000 + super::server::MAX_HOLD_SECS) as i64, 0)
            .expect("time")
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
    for line in [
        "250-DELIVERBY 60\r\n".to_string(),
        format!("250-FUTURERELEASE 604800 {latest}\r\n"),
        "250-MT-PRIORITY MIXER\r\n".to_string(),
    ] {
        assert!(h.out.contains(&line), "{line:?} missing in {}", h.out);
    }
}

#[test]
fn future_release_is_stored_as_an_absolute_time() {
    let now_s = NOW / 1000;
    let h = mail_with("HOLDFOR=3600");
    assert_eq!(h.codes(), ["220", "250", "250", "250", "250"]);
    assert_eq!(h.stored[0].envelope.hold_until_unix, now_s + 3600);

    let until = chrono::DateTime::from_timestamp((now_s + 7200) as i64, 0)
        .expect("time")
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let h = mail_with(&format!("HOLDUNTIL={until}"));
    assert_eq!(h.stored[0].envelope.hold_until_unix, now_s + 7200);

    // A release time in the past means now.
    let h = mail_with("HOLDUNTIL=2001-01-01T00:00:00Z");
    assert_eq!(h.stored[0].envelope.hold_until_unix, 0);
    // The full interval is allowed, one second more is not.
    let h = mail_with("HOLDFOR=604800");
    assert_eq!(h.stored[0].envelope.hold_until_unix, now_s + 604_800);
    for bad in [
        "HOLDFOR=604801".to_string(),
        format!(
            "HOLDUNTIL={}",
            chrono::DateTime::from_timestamp((now_s + 604_801) as i64, 0)
                .expect("time")
                .format("%Y-%m-%dT%H:%M:%SZ")
        ),
        format!("HOLDFOR=60 HOLDUNTIL={until}"),
    ] {
        let h = mail_with(&bad);
        assert_eq!(h.codes()[1..3], ["250", "501"], "{bad}: {}", h.out);
        assert!(h.out.contains("501 5.5.4"), "{bad}: {}", h.out);
        assert!(h.stored.is_empty(), "{bad}");
    }
}

#[test]
fn deliver_by_is_accepted_and_stored_as_a_deadline() {
    use sluice_spool::{DeliverBy, DeliverByMode};
    let h = mail_with("BY=120;R");
    assert_eq!(h.codes(), ["220", "250", "250", "250", "250"], "{}", h.out);
    assert_eq!(
        h.stored[0].envelope.deliver_by,
        Some(DeliverBy {
            deadline_unix_ms: NOW + 120_000,
            by_secs: 120,
            mode: DeliverByMode::Return,
            trace: false,
        })
    );
    // N mode takes any by-time, even past ones; T is kept.
    let h = mail_with("BY=-10;NT");
    assert_eq!(
        h.stored[0].envelope.deliver_by,
        Some(DeliverBy {
            deadline_unix_ms: NOW - 10_000,
            by_secs: -10,
            mode: DeliverByMode::Notify,
            trace: true,
        })
    );
    let h = mail_with("BY=0;N");
    assert_eq!(
        h.stored[0].envelope.deliver_by.map(|b| b.deadline_unix_ms),
        Some(NOW)
    );
    // No BY, no deadline.
    let h = mail_with("");
    assert_eq!(h.stored[0].envelope.deliver_by, None);
    // R mode below the advertised minimum, zero or negative; and a hold that
    // outlasts the deadline.
    for bad in ["BY=59;R", "BY=0;R", "BY=-5;RT", "HOLDFOR=600 BY=300;R"] {
        let h = mail_with(bad);
        assert_eq!(h.codes()[1..3], ["250", "501"], "{bad}: {}", h.out);
        assert!(h.out.contains("501 5.5.4"), "{bad}: {}", h.out);
        assert!(h.stored.is_empty(), "{bad}");
    }
    // A hold shorter than an R deadline is fine.
    let h = mail_with("HOLDFOR=60 BY=300;R");
    assert_eq!(h.stored.len(), 1, "{}", h.out);
}

#[test]
fn mt_priority_is_stored() {
    let h = mail_with("MT-PRIORITY=3");
    assert_eq!(h.stored[0].envelope.priority, 3);
    let h = mail_with("MT-PRIORITY=-4");
    assert_eq!(h.stored[0].envelope.priority, -4);
}

// ---- trust: envelope extensions, notices ----

fn mail_from(cfg: SessionConfig, ip: &str, params: &str) -> Harness {
    let input = format!(
        "EHLO client.test\r\nMAIL FROM:<a@outside.test> {params}\r\nRCPT TO:<b@local.test>\r\nBDAT 2 LAST\r\nhi"
    );
    run(cfg, ip, input.as_bytes())
}

const UNTRUSTED: &str = "198.51.100.1";

#[test]
fn untrusted_clients_cannot_raise_priority_or_hold_mail() {
    use crate::config::UntrustedExtension::*;
    // Defaults: a raised priority is ignored, a lowered one kept; a hold refused.
    let h = mail_from(config(), UNTRUSTED, "MT-PRIORITY=3");
    assert_eq!(h.codes(), ["220", "250", "250", "250", "250"], "{}", h.out);
    assert_eq!(h.stored[0].envelope.priority, 0);
    let h = mail_from(config(), UNTRUSTED, "MT-PRIORITY=-4");
    assert_eq!(h.stored[0].envelope.priority, -4);
    for hold in ["HOLDFOR=3600", "HOLDUNTIL=2001-01-01T00:00:00Z"] {
        let h = mail_from(config(), UNTRUSTED, hold);
        assert_eq!(h.codes()[1..3], ["250", "550"], "{hold}: {}", h.out);
        assert!(h.out.contains("550 5.7.1"), "{}", h.out);
        assert!(h.stored.is_empty());
    }
    // Configurable both ways.
    let mut cfg = config();
    cfg.untrusted.mt_priority = Reject;
    cfg.untrusted.hold = Ignore;
    let h = mail_from(cfg.clone(), UNTRUSTED, "MT-PRIORITY=1");
    assert!(
        h.out.contains("550 5.7.1") && h.stored.is_empty(),
        "{}",
        h.out
    );
    let h = mail_from(cfg.clone(), UNTRUSTED, "MT-PRIORITY=0 HOLDFOR=3600");
    assert_eq!(h.stored[0].envelope.hold_until_unix, 0, "{}", h.out);
    cfg.untrusted.mt_priority = Accept;
    cfg.untrusted.hold = Accept;
    let h = mail_from(cfg, UNTRUSTED, "MT-PRIORITY=5 HOLDFOR=60");
    assert_eq!(h.stored[0].envelope.priority, 5);
    assert_eq!(h.stored[0].envelope.hold_until_unix, NOW / 1000 + 60);
    // The relay networks are trusted.
    let h = mail_from(config(), "192.0.2.1", "MT-PRIORITY=5 HOLDFOR=60");
    assert_eq!(h.stored[0].envelope.priority, 5);
}

#[test]
fn authenticated_clients_are_trusted_with_extensions() {
    use base64::Engine as _;
    let mut cfg = config();
    cfg.auth_plaintext = true;
    let input = format!(
        "EHLO c\r\nAUTH PLAIN {}\r\nMAIL FROM:<a@outside.test> MT-PRIORITY=4 HOLDFOR=60\r\nRCPT TO:<b@local.test>\r\nBDAT 2 LAST\r\nhi",
        base64::engine::general_purpose::STANDARD.encode("\0alice\0secret")
    );
    let h = run(cfg, UNTRUSTED, input.as_bytes());
    assert_eq!(h.stored.len(), 1, "{}", h.out);
    let env = &h.stored[0].envelope;
    assert_eq!((env.priority, env.hold_until_unix), (4, NOW / 1000 + 60));
    assert_eq!(env.schedule.notices, sluice_spool::NoticeLimit::Unlimited);
}

#[test]
fn notice_limit_is_set_by_trust_and_the_listener_key() {
    use crate::config::UntrustedNotices;
    use sluice_spool::NoticeLimit;
    let limit = |cfg: SessionConfig, ip: &str| {
        mail_from(cfg, ip, "RET=FULL").stored[0]
            .envelope
            .schedule
            .notices
    };
    assert_eq!(limit(config(), "192.0.2.1"), NoticeLimit::Unlimited);
    assert_eq!(limit(config(), UNTRUSTED), NoticeLimit::HeadersOnly);
    for (key, want) in [
        (UntrustedNotices::Full, NoticeLimit::Unlimited),
        (UntrustedNotices::None, NoticeLimit::FailuresOnly),
    ] {
        let mut cfg = config();
        cfg.untrusted.notices = key;
        assert_eq!(limit(cfg.clone(), UNTRUSTED), want);
        assert_eq!(limit(cfg, "192.0.2.1"), NoticeLimit::Unlimited);
    }
}

// ---- the memory budget for bodies ----

fn budgeted(ip: &str, budget: &Arc<crate::budget::BodyBudget>) -> Harness {
    let mut cfg = config();
    cfg.max_message_size = 1 << 20;
    let mut h = Harness::new(cfg, ip);
    h.session.set_body_budget(budget.clone());
    h
}

/// Sends one DATA transaction: the commands whole, then the body in pieces of
/// `chunk` bytes (the body may only follow the 354).
fn send_data(h: &mut Harness, ehlo: bool, body_len: usize, chunk: usize) {
    let cmds = if ehlo {
        TX
    } else {
        &TX[b"EHLO client.test\r\n".len()..]
    };
    h.feed(cmds, usize::MAX);
    h.feed(b"DATA\r\n", usize::MAX);
    let line = [b'x'; 98];
    let mut body = Vec::new();
    while body.len() < body_len {
        body.extend_from_slice(&line);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b".\r\n");
    h.feed(&body, chunk);
}

#[test]
fn body_over_the_client_budget_is_read_to_its_end_then_452() {
    use crate::budget::{BodyBudget, GRANT};
    let budget = Arc::new(BodyBudget::new(8 * GRANT, 2 * GRANT));
    for chunk in [usize::MAX, 4096, 1] {
        let mut h = budgeted(UNTRUSTED, &budget);
        send_data(&mut h, true, 3 * GRANT as usize, chunk);
        assert_eq!(
            h.codes(),
            ["220", "250", "250", "250", "354", "452"],
            "{}",
            h.out
        );
        assert!(h.out.contains("452 4.3.1"), "{}", h.out);
        assert!(h.stored.is_empty());
        assert_eq!(budget.used(), 0, "given back at the end of data");
        // In sync: the next transaction on the same connection fits and is stored.
        send_data(&mut h, false, 1000, chunk);
        assert_eq!(h.stored.len(), 1, "{}", h.out);
        assert!(budget.used() > 0, "held until the store completes");
        h.stored.clear();
        assert_eq!(budget.used(), 0);
    }
    // A trusted client only meets the process budget.
    let mut h = budgeted("192.0.2.1", &budget);
    send_data(&mut h, true, 3 * GRANT as usize, usize::MAX);
    assert_eq!(h.stored.len(), 1, "{}", h.out);
    drop(h);
    assert_eq!(budget.used(), 0);
}

#[test]
fn spent_budget_refuses_data_at_once_and_bdat_chunks() {
    use crate::budget::{BodyBudget, BodyReservation, GRANT};
    let budget = Arc::new(BodyBudget::new(4 * GRANT, 2 * GRANT));
    // Someone else holds it all: DATA gets 452 without a 354.
    let mut all = BodyReservation::new(budget.clone(), None);
    assert!(all.cover(4 * GRANT));
    let mut h = budgeted(UNTRUSTED, &budget);
    let mut input = TX.to_vec();
    input.extend_from_slice(b"DATA\r\n");
    h.feed(&input, usize::MAX);
    assert_eq!(h.codes(), ["220", "250", "250", "250", "452"], "{}", h.out);
    // BDAT: the first chunk finds nothing left; a later chunk, though the
    // budget is back, must not start a body without it.
    let mut h = budgeted(UNTRUSTED, &budget);
    let mut input = TX.to_vec();
    input.extend_from_slice(b"BDAT 5\r\nfirst");
    h.feed(&input, usize::MAX);
    drop(all);
    h.feed(b"BDAT 4 LAST\r\nlast", usize::MAX);
    assert_eq!(
        h.codes(),
        ["220", "250", "250", "250", "452", "452"],
        "{}",
        h.out
    );
    assert!(h.stored.is_empty());
    // BDAT past the client's share: that chunk and the rest get 452, nothing stored.
    let mut h = budgeted(UNTRUSTED, &budget);
    let mut input = TX.to_vec();
    let big = 3 * GRANT as usize;
    input.extend_from_slice(format!("BDAT {big}\r\n").as_bytes());
    input.extend(std::iter::repeat_n(b'x', big));
    input.extend_from_slice(b"BDAT 2 LAST\r\nhi");
    input.extend_from_slice(
        b"MAIL FROM:<a@local.test>\r\nRCPT TO:<b@local.test>\r\nBDAT 2 LAST\r\nhi",
    );
    h.feed(&input, 1000);
    assert_eq!(
        h.codes(),
        ["220", "250", "250", "250", "452", "452", "250", "250", "250"],
        "{}",
        h.out
    );
    assert_eq!(h.stored.len(), 1, "the transaction after the refused one");
    h.stored.clear();
    drop(h);
    assert_eq!(budget.used(), 0);
}

fn admission(
    rules: &str,
    queues: &[(&str, u64, u64)],
) -> Arc<crate::queue::admission::QueueAdmission> {
    use crate::queue::admission::{QueueAdmission, QueueStats};
    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(default)]
        rule: Vec<sluice_policy::RuleConfig>,
    }
    let doc: Doc = toml::from_str(rules).expect("rules");
    let mut cfg = std::collections::BTreeMap::new();
    for (name, msgs, bytes) in queues {
        cfg.insert(
            name.to_string(),
            crate::config::delivery::QueueConfig {
                max_messages: *msgs,
                max_bytes: crate::config::ByteSize(*bytes),
                ..Default::default()
            },
        );
    }
    let names: Vec<&str> = cfg.keys().map(String::as_str).collect();
    let set = sluice_policy::RuleSet::new(&doc.rule, &names, &[]).expect("rule set");
    let stats = Arc::new(QueueStats::new(names.iter().copied(), 1));
    Arc::new(QueueAdmission::new(Arc::new(set), &cfg, stats))
}

/// Like `run`, with queue admission on both harnesses.
fn run_with_queues(adm: &Arc<crate::queue::admission::QueueAdmission>, input: &[u8]) -> Harness {
    // A relay client, so remote recipients are accepted.
    let mut whole = Harness::new(config(), "192.0.2.9");
    whole.session.set_queue_admission(adm.clone());
    whole.feed(input, input.len());
    let mut bytewise = Harness::new(config(), "192.0.2.9");
    bytewise.session.set_queue_admission(adm.clone());
    bytewise.feed(input, 1);
    assert_eq!(whole.codes(), bytewise.codes());
    whole
}

#[test]
fn rules_choose_the_stored_queue() {
    let adm = admission(
        "[[rule]]\nmatch.recipient_domain = \"gmail.test\"\nqueue = \"gmail\"\n\n\
         [[rule]]\nmatch.size_min = 100\nqueue = \"big\"\n",
        &[("gmail", 0, 0), ("big", 0, 0)],
    );
    let h = run_with_queues(
        &adm,
        b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<u@gmail.test>\r\nRCPT TO:<v@local.test>\r\nBDAT 2 LAST\r\nhi",
    );
    assert_eq!(
        h.codes(),
        ["220", "250", "250", "250", "250", "250"],
        "{}",
        h.out
    );
    assert_eq!(h.stored[0].envelope.queue, "gmail");
    // The first recipient decides; the size rule sees the real size at the end.
    let h = run_with_queues(
        &adm,
        b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<v@local.test>\r\nBDAT 2 LAST\r\nhi",
    );
    // The Received: header alone is over 100 bytes.
    assert_eq!(h.stored[0].envelope.queue, "big");
}

#[test]
fn full_queues_get_452_at_rcpt_data_and_end_of_data() {
    let adm = admission("", &[("default", 2, 1000)]);
    // Room: accepted.
    let h = run_with_queues(
        &adm,
        b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<v@local.test>\r\nBDAT 2 LAST\r\nhi",
    );
    assert_eq!(h.codes(), ["220", "250", "250", "250", "250"]);
    // A declared SIZE beyond the byte quota: 452 at RCPT.
    let h = run_with_queues(
        &adm,
        b"EHLO c\r\nMAIL FROM:<a@x.test> SIZE=2000\r\nRCPT TO:<v@local.test>\r\n",
    );
    assert_eq!(h.codes(), ["220", "250", "250", "452"]);
    assert!(h.out.contains("452 4.3.1"), "{}", h.out);
    // A body beyond it: 452 at the end of data, nothing stored.
    let body = format!("{0}\r\n{0}\r\n.\r\n", "x".repeat(600));
    let mut input =
        b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<v@local.test>\r\nDATA\r\n".to_vec();
    let mut h = Harness::new(config(), "198.51.100.1");
    h.session.set_queue_admission(adm.clone());
    h.feed(&input, input.len());
    h.feed(body.as_bytes(), 7);
    assert_eq!(h.codes(), ["220", "250", "250", "250", "354", "452"]);
    assert!(h.stored.is_empty());
    // The queue fills up (two messages): 452 at RCPT, and at DATA for a
    // transaction whose RCPT got in before.
    adm.stats.add(0, "default", 10);
    input = b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<v@local.test>\r\n".to_vec();
    let mut h = Harness::new(config(), "198.51.100.1");
    h.session.set_queue_admission(adm.clone());
    h.feed(&input, input.len());
    assert_eq!(h.codes(), ["220", "250", "250", "250"]);
    adm.stats.add(0, "default", 10);
    h.feed(b"DATA\r\n", 6);
    assert_eq!(h.codes(), ["220", "250", "250", "250", "452"]);
    let h = run_with_queues(
        &adm,
        b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<v@local.test>\r\nRCPT TO:<w@local.test>\r\n",
    );
    assert_eq!(h.codes(), ["220", "250", "250", "452", "452"]);
    // 452 for a full queue is not a protocol error: no 421 after many.
    assert!(!h.out.contains("421"), "{}", h.out);
}

// ---------------------------------------------------------------------------------
// Issue 17: NUL, UTF-8, long lines, HELP (byte-level classes)
// ---------------------------------------------------------------------------------

/// Like [`run`], but the client waits for the 354 after each DATA (a turn
/// ends after every "DATA\r\n"), as a real client does.
fn run_turns(cfg: SessionConfig, ip: &str, input: &[u8]) -> Harness {
    let mut turns = Vec::new();
    let mut rest = input;
    while let Some(at) = rest.windows(6).position(|w| w == b"DATA\r\n") {
        turns.push(&rest[..at + 6]);
        rest = &rest[at + 6..];
    }
    turns.push(rest);
    let mut whole = Harness::new(cfg.clone(), ip);
    let mut bytewise = Harness::new(cfg, ip);
    for t in turns {
        whole.feed(t, t.len());
        bytewise.feed(t, 1);
    }
    assert_eq!(whole.codes(), bytewise.codes(), "byte by byte differs");
    assert_eq!(whole.stored.len(), bytewise.stored.len());
    for (a, b) in whole.stored.iter().zip(&bytewise.stored) {
        assert_eq!(strip_received(&a.body), strip_received(&b.body));
    }
    whole
}

/// The last reply line of a harness.
fn last_line(h: &Harness) -> &str {
    h.out.lines().last().unwrap_or("")
}

#[test]
fn nul_in_data_and_bdat_is_refused_by_default() {
    for body in [
        &b"a\r\n\0.\r\nMAIL FROM:<evil@x.test>\r\n"[..],
        b"a\r\n\0.\0\r\nx\r\n",
        b"a\0b\r\n",
        b"\0\r\n",
    ] {
        let mut input = TX.to_vec();
        input.extend_from_slice(b"DATA\r\n");
        input.extend_from_slice(body);
        input.extend_from_slice(b".\r\nQUIT\r\n");
        let h = run_turns(config(), "198.51.100.1", &input);
        assert_eq!(
            h.codes(),
            ["220", "250", "250", "250", "354", "550", "221"],
            "{body:?}"
        );
        assert!(last_line(&h).starts_with("221"));
        assert!(
            h.out.contains("550 5.6.0 Error: NUL byte in message data"),
            "{}",
            h.out
        );
        assert!(h.stored.is_empty());

        let mut input = TX.to_vec();
        input.extend_from_slice(format!("BDAT {} LAST\r\n", body.len()).as_bytes());
        input.extend_from_slice(body);
        let h = run_turns(config(), "198.51.100.1", &input);
        assert_eq!(
            h.codes().last().map(String::as_str),
            Some("550"),
            "{body:?}"
        );
        assert!(h.stored.is_empty());
    }
}

#[test]
fn nul_strip_mode_stores_without_nul() {
    let mut cfg = config();
    cfg.nul_bytes = NulBytes::Strip;
    let mut input = TX.to_vec();
    input.extend_from_slice(b"DATA\r\na\r\n\0.\0\r\nb\0c\r\n.\r\n");
    let h = run_turns(cfg.clone(), "198.51.100.1", &input);
    assert_eq!(h.codes().last().map(String::as_str), Some("250"));
    assert_eq!(strip_received(&h.stored[0].body), b"a\r\n.\r\nbc\r\n");
    // BDAT, with the NUL split from its line across chunks.
    let mut input = TX.to_vec();
    input.extend_from_slice(b"BDAT 4\r\na\r\n\0BDAT 3 LAST\r\n.\r\n");
    let h = run_turns(cfg.clone(), "198.51.100.1", &input);
    assert_eq!(h.codes().last().map(String::as_str), Some("250"));
    assert_eq!(strip_received(&h.stored[0].body), b"a\r\n.\r\n");
    // With bare_newline = "accept" too: LF NUL . LF is stored as LF . LF (body
    // bytes; the outbound encoder makes it CRLF ".." CRLF).
    cfg.bare_newline = BareNewline::Accept;
    let mut input = TX.to_vec();
    input.extend_from_slice(b"DATA\r\na\n\0.\nMAIL FROM:<e@x.test>\r\n.\r\nQUIT\r\n");
    let h = run_turns(cfg, "198.51.100.1", &input);
    assert_eq!(h.codes(), ["220", "250", "250", "250", "354", "250", "221"]);
    assert_eq!(
        strip_received(&h.stored[0].body),
        b"a\n.\nMAIL FROM:<e@x.test>\r\n"
    );
}

#[test]
fn nul_anywhere_in_a_command_is_refused() {
    for line in [
        &b"EHLO a\0b\r\n"[..],
        b"\0EHLO ab\r\n",
        b"EHLO ab\0\r\n",
        b"NOOP \0\r\n",
    ] {
        let h = run_turns(config(), "198.51.100.1", line);
        assert_eq!(h.codes(), ["220", "501"], "{line:?}");
        assert!(h.out.contains("501 5.5.2 Error: NUL byte in command"));
    }
    let h = run_turns(
        config(),
        "198.51.100.1",
        b"EHLO ok.test\r\nMAIL FROM:<a\0@local.test>\r\nMAIL FROM:<a@local.test>\r\nRCPT TO:<b@local\0.test>\r\n",
    );
    assert_eq!(h.codes(), ["220", "250", "501", "250", "501"]);
}

/// Invalid UTF-8 in an address, every kind: never replaced, always refused.
const BAD_UTF8: &[&[u8]] = &[
    b"\xff\xfe",
    b"\xc0\xaf",         // overlong '/'
    b"\xe0\x80\xaf",     // overlong, 3 bytes
    b"\xed\xa0\x80",     // UTF-16 surrogate
    b"\xc3",             // truncated
    b"\xe2\x82",         // truncated
    b"\xf4\x90\x80\x80", // above U+10FFFF
    b"\x80",             // lone continuation byte
];

#[test]
fn invalid_utf8_addresses_are_refused_with_or_without_smtputf8() {
    for bad in BAD_UTF8 {
        for smtputf8 in ["", " SMTPUTF8"] {
            let mut mail = b"EHLO c.test\r\nMAIL FROM:<j".to_vec();
            mail.extend_from_slice(bad);
            mail.extend_from_slice(format!("rg@local.test>{smtputf8}\r\n").as_bytes());
            let h = run_turns(config(), "198.51.100.1", &mail);
            assert_eq!(h.codes(), ["220", "250", "501"], "{bad:?}{smtputf8}");
            assert!(h.out.contains("501 5.1.7"), "{}", h.out);

            let mut rcpt =
                format!("EHLO c.test\r\nMAIL FROM:<a@local.test>{smtputf8}\r\nRCPT TO:<j")
                    .into_bytes();
            rcpt.extend_from_slice(bad);
            rcpt.extend_from_slice(
                b"rg@local.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\nx\r\n.\r\n",
            );
            let h = run_turns(config(), "198.51.100.1", &rcpt);
            assert_eq!(
                h.codes(),
                ["220", "250", "250", "501", "250", "354", "250"],
                "{bad:?}{smtputf8}"
            );
            assert!(h.out.contains("501 5.1.3"), "{}", h.out);
            let rcpts: Vec<&str> = h.stored[0]
                .envelope
                .recipients
                .iter()
                .map(|r| r.address.as_str())
                .collect();
            assert_eq!(rcpts, ["b@local.test"]);
        }
    }
    // Other commands too: the parser would have replaced the bytes.
    let h = run_turns(config(), "198.51.100.1", b"EHLO \xff\xfe.test\r\n");
    assert_eq!(h.codes(), ["220", "500"]);
}

#[test]
fn non_ascii_addresses_need_smtputf8() {
    let h = run_turns(
        config(),
        "198.51.100.1",
        "EHLO c.test\r\nMAIL FROM:<jörg@local.test>\r\nMAIL FROM:<a@local.test>\r\n\
         RCPT TO:<jörg@local.test>\r\nRCPT TO:<b@bücher.local.test>\r\nRSET\r\n\
         MAIL FROM:<jörg@local.test> SMTPUTF8\r\nRCPT TO:<jörg@local.test>\r\nDATA\r\nx\r\n.\r\n"
            .as_bytes(),
    );
    assert_eq!(
        h.codes(),
        ["220", "250", "553", "250", "553", "554", "250", "250", "250", "354", "250"]
    );
    assert!(h.out.contains("553 5.6.7"), "{}", h.out);
    let env = &h.stored[0].envelope;
    assert!(env.smtputf8);
    assert_eq!(env.sender, "jörg@local.test");
    assert_eq!(env.recipients[0].address, "jörg@local.test");
}

#[test]
fn envid_and_orcpt_that_decode_to_non_ascii_are_refused() {
    let h = run_turns(
        config(),
        "198.51.100.1",
        b"EHLO c.test\r\nMAIL FROM:<a@local.test> ENVID=a+FFb\r\nMAIL FROM:<a@local.test> ENVID=a+2Bb\r\n\
          RCPT TO:<b@local.test> ORCPT=rfc822;b+FF@local.test\r\nRCPT TO:<b@local.test> ORCPT=rfc822;b+2B1@local.test\r\n",
    );
    assert_eq!(h.codes(), ["220", "250", "501", "250", "501", "250"]);
}

#[test]
fn auth_credentials_that_are_not_utf8_are_refused() {
    use base64::Engine as _;
    // PLAIN "\0alice\0secr\xff" and LOGIN with a non-UTF-8 password.
    let plain = base64::engine::general_purpose::STANDARD.encode(b"\0alice\0secr\xff");
    let pass = base64::engine::general_purpose::STANDARD.encode(b"\xff\xfe");
    let mut cfg = config();
    cfg.auth_plaintext = true;
    let input = format!("EHLO c.test\r\nAUTH PLAIN {plain}\r\nAUTH LOGIN YWxpY2U=\r\n{pass}\r\n");
    let h = run_turns(cfg, "198.51.100.1", input.as_bytes());
    assert_eq!(h.codes(), ["220", "250", "501", "334", "501"]);
}

#[test]
fn long_message_lines_are_refused() {
    let mut cfg = config();
    cfg.max_message_line_length = 20;
    cfg.bare_newline = BareNewline::Accept;
    // (body, DATA accepted, BDAT accepted): DATA counts decoded octets (the
    // transparency dot is not part of the line), BDAT raw ones; any CR or LF
    // ends a line.
    for (body, data_ok, bdat_ok) in [
        (&b"12345678901234567890\r\n"[..], true, true),
        (b"123456789012345678901\r\n", false, false),
        (b".2345678901234567890\r\n", true, true),
        (b"..234567890123456789012\r\n", false, false),
        (b"..2345678901234567890\r\n", true, false),
        (b"1234567890\n1234567890\r\n", true, true),
        (b"1234567890\n123456789012345678901\r\n", false, false),
    ] {
        let mut input = TX.to_vec();
        input.extend_from_slice(b"DATA\r\n");
        input.extend_from_slice(body);
        input.extend_from_slice(b".\r\n");
        let h = run_turns(cfg.clone(), "198.51.100.1", &input);
        let want = if data_ok { "250" } else { "550" };
        assert_eq!(h.codes().last().map(String::as_str), Some(want), "{body:?}");
        if !data_ok {
            assert!(last_line(&h).starts_with("550 5.6.0"), "{}", h.out);
        }
        let mut input = TX.to_vec();
        input.extend_from_slice(format!("BDAT {} LAST\r\n", body.len()).as_bytes());
        input.extend_from_slice(body);
        let h = run_turns(cfg.clone(), "198.51.100.1", &input);
        let want = if bdat_ok { "250" } else { "550" };
        assert_eq!(
            h.codes().last().map(String::as_str),
            Some(want),
            "BDAT {body:?}"
        );
    }
}

#[test]
fn help_names_only_what_is_offered() {
    // A STARTTLS listener with users and no auth_plaintext: STARTTLS, not AUTH.
    let h = run_turns(config(), "198.51.100.1", b"HELP\r\n");
    assert!(h.out.contains(" STARTTLS"), "{}", h.out);
    assert!(!h.out.contains(" AUTH"), "{}", h.out);
    let mut cfg = config();
    cfg.starttls = false;
    cfg.auth_enabled = false;
    cfg.auth_plaintext = true;
    let h = run_turns(cfg.clone(), "198.51.100.1", b"HELP\r\n");
    assert!(
        !h.out.contains("STARTTLS") && !h.out.contains("AUTH"),
        "{}",
        h.out
    );
    cfg.auth_enabled = true;
    let h = run_turns(cfg, "198.51.100.1", b"HELP\r\n");
    assert!(h.out.contains(" AUTH"), "{}", h.out);
}

#[test]
fn received_header_lines_stay_under_998_octets() {
    // The parser bounds a HELO name to 255 octets and a path to 256, so our
    // Received header (the name twice on its first line) stays under the
    // 998-octet limit the message data is held to.
    let host = vec!["h".repeat(62); 4].join(".");
    let input = format!(
        "EHLO {host}\r\nMAIL FROM:<a@local.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\nx\r\n.\r\n"
    );
    let h = run_turns(config(), "198.51.100.1", input.as_bytes());
    assert_eq!(
        h.codes().last().map(String::as_str),
        Some("250"),
        "{}",
        h.out
    );
    let body = &h.stored[0].body;
    let longest = body.split(|&b| b == b'\n').map(<[u8]>::len).max();
    assert!(longest.is_some_and(|n| n <= 999), "{longest:?}");
}

// ---- REQUIRETLS (RFC 8689) ----

/// A session over TLS (STARTTLS done), then `input`.
fn over_tls(cfg: SessionConfig, input: &[u8]) -> Harness {
    let mut h = Harness::new(cfg, "192.0.2.1");
    h.feed(b"EHLO x\r\nSTARTTLS\r\n", 64);
    assert!(h.starttls);
    h.session.tls_established("TLSv1.3 TEST".into());
    h.out.clear();
    h.feed(input, 1);
    h
}

#[test]
fn requiretls_is_advertised_only_over_tls() {
    let clear = run(config(), "192.0.2.1", b"EHLO x\r\n");
    assert!(!clear.out.contains("REQUIRETLS"), "{}", clear.out);
    assert!(clear.out.contains("250-STARTTLS"), "{}", clear.out);
    let tls = over_tls(config(), b"EHLO x\r\n");
    assert!(tls.out.contains("250-REQUIRETLS\r\n"), "{}", tls.out);
    assert!(!tls.out.contains("STARTTLS"), "{}", tls.out);
}

#[test]
fn requiretls_in_clear_is_refused_530_and_nothing_is_stored() {
    let h = run(
        config(),
        "192.0.2.1",
        b"EHLO x\r\nMAIL FROM:<a@local.test> REQUIRETLS\r\nRCPT TO:<b@local.test>\r\n",
    );
    assert!(
        h.out
            .contains("530 5.7.10 Error: REQUIRETLS needs a TLS session\r\n"),
        "{}",
        h.out
    );
    assert_eq!(h.codes(), ["220", "250", "530", "503"]);
    assert!(h.stored.is_empty());
}

#[test]
fn requiretls_over_tls_is_stored_with_the_message() {
    let h = over_tls(
        config(),
        b"EHLO x\r\nMAIL FROM:<a@local.test> requiretls SIZE=2\r\nRCPT TO:<b@local.test>\r\nBDAT 2 LAST\r\nhi",
    );
    assert_eq!(h.codes(), ["250", "250", "250", "250"], "{}", h.out);
    assert_eq!(h.stored.len(), 1);
    assert_eq!(
        h.stored[0].envelope.tls_request,
        sluice_spool::TlsRequest::RequireTls
    );
    // The next transaction on the session starts without it.
    let h = over_tls(
        config(),
        b"EHLO x\r\nMAIL FROM:<a@local.test> REQUIRETLS\r\nRSET\r\nMAIL FROM:<a@local.test>\r\nRCPT TO:<b@local.test>\r\nBDAT 2 LAST\r\nhi",
    );
    assert_eq!(h.stored.len(), 1, "{}", h.out);
    assert_eq!(
        h.stored[0].envelope.tls_request,
        sluice_spool::TlsRequest::Policy
    );
}

#[test]
fn requiretls_twice_or_with_a_value_is_a_syntax_error() {
    let h = over_tls(
        config(),
        b"EHLO x\r\nMAIL FROM:<a@local.test> REQUIRETLS REQUIRETLS\r\nMAIL FROM:<a@local.test> REQUIRETLS=yes\r\n",
    );
    assert!(
        h.out
            .contains("501 5.5.4 Error: REQUIRETLS given more than once\r\n"),
        "{}",
        h.out
    );
    assert_eq!(h.codes()[..3], ["250", "501", "555"], "{}", h.out);
}

#[test]
fn tls_required_no_is_recorded_only_where_the_listener_honours_it() {
    let msg = "TLS-Required: No\r\nSubject: s\r\n\r\nbody\r\n";
    let input = format!(
        "EHLO x\r\nMAIL FROM:<a@local.test>\r\nRCPT TO:<b@local.test>\r\nBDAT {} LAST\r\n{msg}",
        msg.len()
    );
    let input = input.as_bytes();
    let h = run(config(), "192.0.2.1", input);
    assert_eq!(h.stored.len(), 1, "{}", h.out);
    assert_eq!(
        h.stored[0].envelope.tls_request,
        sluice_spool::TlsRequest::Policy
    );
    let mut cfg = config();
    cfg.honor_tls_required_no = true;
    let h = run(cfg.clone(), "192.0.2.1", input);
    assert_eq!(
        h.stored[0].envelope.tls_request,
        sluice_spool::TlsRequest::Optional
    );
    // The header is relayed as it came.
    assert!(
        String::from_utf8_lossy(&h.stored[0].body).contains("\r\nTLS-Required: No\r\n"),
        "header kept"
    );
    // Under REQUIRETLS the header is ignored (RFC 8689 §4.1).
    let h = over_tls(
        cfg,
        format!(
            "EHLO x\r\nMAIL FROM:<a@local.test> REQUIRETLS\r\nRCPT TO:<b@local.test>\r\nBDAT {} LAST\r\n{msg}",
            msg.len()
        )
        .as_bytes(),
    );
    assert_eq!(h.stored.len(), 1, "{}", h.out);
    assert_eq!(
        h.stored[0].envelope.tls_request,
        sluice_spool::TlsRequest::RequireTls
    );
}

fn verifying() -> SessionConfig {
    SessionConfig {
        verify: Some(Arc::new(sluice_policy::auth::VerifyConfig::default())),
        ..config()
    }
}

#[test]
fn mail_reply_waits_for_spf_and_pipelined_commands_wait_behind_it() {
    let mut s = Session::new(
        Arc::new(verifying()),
        Rc::new(IdGenerator::new(0, None)),
        PeerInfo {
            ip: "198.51.100.1".parse().unwrap(),
            port: 1000,
            tls: None,
        },
    );
    let (_, a) = s.receive(b"EHLO client.test\r\n", NOW);
    assert!(matches!(a, Action::Read));
    s.clear_output();
    let input = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n";
    let (used, a) = s.receive(input, NOW);
    assert_eq!(used, b"MAIL FROM:<a@example.org>\r\n".len());
    match a {
        Action::CheckSpf { helo, sender } => {
            assert_eq!(
                (helo.as_str(), sender.as_str()),
                ("client.test", "a@example.org")
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(s.output().is_empty(), "MAIL answered before SPF");
    // Paused: nothing more is taken until the outcome.
    assert_eq!(s.receive(&input[used..], NOW).0, 0);
    assert!(s.output().is_empty());
    s.spf_result(Default::default(), None);
    let (rest, a) = s.receive(&input[used..], NOW);
    assert_eq!(used + rest, input.len());
    assert!(matches!(a, Action::Read));
    let out = String::from_utf8_lossy(s.output()).into_owned();
    let codes: Vec<&str> = out.lines().map(|l| &l[..3]).collect();
    assert_eq!(codes, ["250", "250", "354"], "{out}");
}

#[test]
fn spf_refusal_ends_the_transaction_at_mail_and_rset_checks_again() {
    let input = b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@local.test>\r\nDATA\r\nRSET\r\nMAIL FROM:<c@example.org>\r\nRSET\r\nMAIL FROM:<>\r\nQUIT\r\n";
    for chunk in [input.len(), 1] {
        let mut h = Harness::new(verifying(), "198.51.100.1");
        h.spf_refusal = Some((550, "5.7.23", "SPF validation failed".into()));
        h.feed(input, chunk);
        assert_eq!(
            h.codes(),
            ["220", "250", "550", "503", "503", "250", "550", "250", "550", "221"],
            "{}",
            h.out
        );
        assert!(
            h.out.contains("550 5.7.23 SPF validation failed"),
            "{}",
            h.out
        );
        assert!(h.stored.is_empty());
        // Each MAIL is checked: the null reverse-path too (its HELO).
        let asked: Vec<&str> = h.spf_checks.iter().map(|(_, s)| s.as_str()).collect();
        assert_eq!(asked, ["a@example.org", "c@example.org", ""]);
        assert!(h.spf_checks.iter().all(|(helo, _)| helo == "client.test"));
        // Policy refusals are not protocol errors: max_errors (5) not reached.
        assert!(!h.out.contains("421"), "{}", h.out);
    }
}

#[test]
fn spf_tempfail_at_mail_and_pass_carries_the_results_to_the_submission() {
    let mut h = Harness::new(verifying(), "198.51.100.1");
    h.spf_refusal = Some((
        451,
        "4.7.24",
        "Temporary DNS failure while checking SPF, try again later".into(),
    ));
    h.feed(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n", 1000);
    assert!(
        h.out
            .ends_with("451 4.7.24 Temporary DNS failure while checking SPF, try again later\r\n"),
        "{}",
        h.out
    );
    h.spf_refusal = None;
    h.feed(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n",
        1000,
    );
    h.feed(b"Subject: x\r\n\r\nbody\r\n.\r\n", 1000);
    assert_eq!(
        h.codes(),
        ["220", "250", "451", "250", "250", "354", "250"],
        "{}",
        h.out
    );
    assert_eq!(h.stored.len(), 1);
    assert!(
        h.stored[0].spf.is_some(),
        "SPF found at MAIL goes with the message"
    );
    assert_eq!(h.spf_checks.len(), 2);
}

#[test]
fn no_spf_check_without_verification_or_with_spf_off() {
    let h = run(config(), "198.51.100.1", TX);
    assert!(h.spf_checks.is_empty());
    let v = sluice_policy::auth::VerifyConfig {
        spf: false,
        dmarc: false,
        ..Default::default()
    };
    let cfg = SessionConfig {
        verify: Some(Arc::new(v)),
        ..config()
    };
    let h = run(cfg, "198.51.100.1", TX);
    assert!(h.spf_checks.is_empty());
    assert_eq!(h.codes(), ["220", "250", "250", "250"]);
}

// ---- Filters at the SMTP stages (issue 14) ----

fn with_filters(stages: &[Stage]) -> SessionConfig {
    let mut set = StageSet::EMPTY;
    for s in stages {
        set.insert(*s);
    }
    SessionConfig {
        filter_stages: set,
        ..config()
    }
}

fn reject(code: u16, esc: &str, text: &str) -> Verdict {
    let reply = FilterReply {
        code,
        enhanced: Some(esc.into()),
        text: text.into(),
    };
    if code >= 500 {
        Verdict::Reject(reply)
    } else {
        Verdict::Tempfail(reply)
    }
}

/// Runs `input` whole and byte by byte with the same filter answers; a
/// message body (after the 354) is given apart, as a client would.
fn run_filtered(cfg: SessionConfig, input: &[u8], filter: fn(&OwnedEvent) -> Verdict) -> Harness {
    let (commands, body) = match input.windows(6).position(|w| w == b"DATA\r\n") {
        Some(at) => input.split_at(at + 6),
        None => (input, &b""[..]),
    };
    let mut whole = Harness::filtered(cfg.clone(), "198.51.100.1", filter);
    whole.feed(commands, commands.len());
    whole.feed(body, body.len().max(1));
    let mut bytewise = Harness::filtered(cfg, "198.51.100.1", filter);
    bytewise.feed(commands, 1);
    bytewise.feed(body, 1);
    assert_eq!(
        whole.out, bytewise.out,
        "replies differ when fed byte by byte"
    );
    assert_eq!(whole.filter_calls, bytewise.filter_calls);
    assert_eq!(whole.stored.len(), bytewise.stored.len());
    whole
}

const FILTER_TX: &[u8] = b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<bad@local.test>\r\nRCPT TO:<good@local.test>\r\nDATA\r\n";

#[test]
fn no_filter_stage_means_no_filter_call() {
    let h = run_filtered(
        config(),
        b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@local.test>\r\nQUIT\r\n",
        |_| panic!("no filter is configured"),
    );
    assert!(h.filter_calls.is_empty());
    assert_eq!(h.codes(), ["220", "250", "250", "250", "221"]);
}

#[test]
fn rcpt_filter_rejects_one_recipient_and_pipelined_replies_keep_their_order() {
    let mut input = FILTER_TX.to_vec();
    input.extend_from_slice(b"hello\r\n.\r\nQUIT\r\n");
    let h = run_filtered(with_filters(&[Stage::Rcpt]), &input, |call| {
        if call.recipient.as_deref() == Some("bad@local.test") {
            reject(550, "5.7.1", "No such user here")
        } else {
            Verdict::Accept
        }
    });
    assert_eq!(
        h.filter_calls,
        [
            (Stage::Rcpt, Some("bad@local.test".to_string())),
            (Stage::Rcpt, Some("good@local.test".to_string()))
        ]
    );
    let lines: Vec<&str> = h
        .out
        .lines()
        .filter(|l| l.as_bytes().get(3) == Some(&b' '))
        .collect();
    assert_eq!(lines[3], "550 5.7.1 No such user here");
    assert_eq!(lines[4], "250 2.1.5 Ok");
    assert_eq!(lines[5], "354 End data with <CR><LF>.<CR><LF>");
    assert_eq!(h.stored.len(), 1);
    let rcpts: Vec<&str> = h.stored[0]
        .envelope
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(rcpts, ["good@local.test"]);
}

#[test]
fn each_stage_refuses_with_the_filter_reply() {
    // connect: the reply, then the session ends.
    let h = run_filtered(with_filters(&[Stage::Connect]), b"EHLO x\r\n", |_| {
        reject(554, "5.7.1", "Go away")
    });
    assert_eq!(h.out, "554 5.7.1 Go away\r\n");
    assert!(h.closed);
    // EHLO tempfailed: MAIL then needs EHLO.
    let h = run_filtered(
        with_filters(&[Stage::Ehlo]),
        b"EHLO bad.test\r\nMAIL FROM:<a@example.org>\r\n",
        |_| reject(450, "4.7.1", "Try later"),
    );
    assert_eq!(h.codes(), ["220", "450", "503"]);
    assert!(h.out.contains("450 4.7.1 Try later\r\n"), "{}", h.out);
    // MAIL refused: RCPT then needs MAIL; not counted as an error.
    let h = run_filtered(
        with_filters(&[Stage::Mail]),
        b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@local.test>\r\n",
        |_| reject(553, "5.7.1", "Sender refused"),
    );
    assert_eq!(h.codes(), ["220", "250", "553", "503"]);
    // A class mismatch is corrected: reject always 5xx.
    let h = run_filtered(
        with_filters(&[Stage::Mail]),
        b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\n",
        |_| {
            Verdict::Reject(FilterReply {
                code: 250,
                enhanced: None,
                text: "x\r\ny".into(),
            })
        },
    );
    assert!(h.out.ends_with("550 5.7.1 x  y\r\n"), "{}", h.out);
}

#[test]
fn auth_filter_runs_after_success_and_can_refuse() {
    let cfg = SessionConfig {
        auth_enabled: true,
        auth_plaintext: true,
        ..with_filters(&[Stage::Auth])
    };
    // AHBhbGljZQBzZWNyZXQ= is "\0alice\0secret".
    let input = b"EHLO c.test\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<a@example.org>\r\n";
    let h = run_filtered(cfg.clone(), input, |_| Verdict::Accept);
    assert_eq!(h.codes(), ["220", "250", "235", "250"]);
    let h = run_filtered(cfg, input, |call| {
        assert_eq!(call.client.auth_user.as_deref(), Some("alice"));
        reject(535, "5.7.8", "Not from here")
    });
    assert_eq!(h.codes(), ["220", "250", "535", "250"]);
    assert_eq!(h.filter_calls, [(Stage::Auth, None)]);
}

#[test]
fn discard_at_rcpt_drops_the_recipient_and_all_discarded_stores_nothing() {
    let mut input = FILTER_TX.to_vec();
    input.extend_from_slice(b"hello\r\n.\r\n");
    let h = run_filtered(with_filters(&[Stage::Rcpt]), &input, |_| Verdict::Discard);
    // Both recipients look accepted; DATA goes on.
    assert_eq!(h.codes(), ["220", "250", "250", "250", "250", "354", "250"]);
    assert_eq!(h.stored.len(), 1);
    assert!(h.stored[0].discard);
    assert!(h.stored[0].envelope.recipients.is_empty());
}

#[test]
fn quarantine_at_mail_marks_the_submission() {
    let mut input = FILTER_TX.to_vec();
    input.extend_from_slice(b"hello\r\n.\r\n");
    let h = run_filtered(with_filters(&[Stage::Mail, Stage::Data]), &input, |_| {
        Verdict::Quarantine {
            reason: "test".into(),
        }
    });
    assert_eq!(h.stored.len(), 1);
    assert_eq!(h.stored[0].quarantine.as_deref(), Some("test"));
    assert!(h.stored[0].filter_data);
    assert!(!h.stored[0].discard);
}

#[test]
fn mail_filter_runs_after_spf() {
    let cfg = SessionConfig {
        filter_stages: with_filters(&[Stage::Mail]).filter_stages,
        ..verifying()
    };
    let h = run_filtered(
        cfg,
        b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@local.test>\r\n",
        |call| {
            assert_eq!(call.sender.as_deref(), Some("a@example.org"));
            Verdict::Accept
        },
    );
    assert_eq!(h.spf_checks.len(), 1);
    assert_eq!(h.filter_calls, [(Stage::Mail, None)]);
    assert_eq!(h.codes(), ["220", "250", "250", "250"]);
}

// ---- Submission hygiene (issue 14 item 6) ----

#[test]
fn bare_newline_normalize_stores_crlf_for_data_and_bdat() {
    let mut cfg = config();
    cfg.bare_newline = BareNewline::Normalize;
    let mut input = TX.to_vec();
    input.extend_from_slice(b"DATA\r\nSubject: x\n\nline\rtwo\r\nz\n\r\n.\r\n");
    let h = run_turns(cfg.clone(), "192.0.2.1", &input);
    assert_eq!(h.codes(), ["220", "250", "250", "250", "354", "250"]);
    assert_eq!(
        strip_received(&h.stored[0].body),
        b"Subject: x\r\n\r\nline\r\ntwo\r\nz\r\n\r\n"
    );
    let mut input = TX.to_vec();
    input.extend_from_slice(b"BDAT 8 LAST\r\na\nb\r\nc\rd");
    let h = run_turns(cfg, "192.0.2.1", &input);
    assert_eq!(h.codes(), ["220", "250", "250", "250", "250"]);
    assert_eq!(strip_received(&h.stored[0].body), b"a\r\nb\r\nc\r\nd");
}

#[test]
fn normalized_body_over_the_size_limit_is_refused() {
    let mut cfg = config();
    cfg.bare_newline = BareNewline::Normalize;
    cfg.max_message_size = 100;
    let mut input = TX.to_vec();
    // 90 octets received, 150 once every bare LF is a CRLF.
    input.extend_from_slice(b"DATA\r\n");
    input.extend_from_slice(&b"ab\n".repeat(30)[..]);
    input.extend_from_slice(b"\r\n.\r\n");
    let h = run_turns(cfg, "192.0.2.1", &input);
    assert_eq!(h.codes().last().map(String::as_str), Some("552"));
    assert!(h.stored.is_empty());
}

fn with_missing_headers(mode: crate::config::AddMissingHeaders) -> SessionConfig {
    SessionConfig {
        add_missing_headers: mode,
        ..config()
    }
}

fn one_message(cfg: SessionConfig, ip: &str, body: &[u8]) -> Vec<u8> {
    let mut input = TX.to_vec();
    input.extend_from_slice(b"DATA\r\n");
    input.extend_from_slice(body);
    input.extend_from_slice(b".\r\n");
    let h = run_turns(cfg, ip, &input);
    assert_eq!(h.stored.len(), 1, "{}", h.out);
    strip_received(&h.stored[0].body).to_vec()
}

#[test]
fn missing_date_and_message_id_are_added_for_trusted_clients() {
    use crate::config::AddMissingHeaders;
    let bare = b"Subject: hi\r\n\r\nbody\r\n";
    // 192.0.2.0/24 is the relay network: trusted.
    let got = one_message(
        with_missing_headers(AddMissingHeaders::Trusted),
        "192.0.2.1",
        bare,
    );
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(text.starts_with("Date: "), "{text}");
    assert!(text.contains("\r\nMessage-ID: <"), "{text}");
    assert!(
        text.contains("@mx.test>\r\nSubject: hi\r\n\r\nbody\r\n"),
        "{text}"
    );
    // An outsider's message is relayed as it came under "trusted"...
    let got = one_message(
        with_missing_headers(AddMissingHeaders::Trusted),
        "198.51.100.1",
        b"Subject: hi\r\n\r\nbody\r\n",
    );
    assert_eq!(got, bare);
    // ...but not under "always"; and "no" adds nothing for anyone.
    let got = one_message(
        with_missing_headers(AddMissingHeaders::Always),
        "198.51.100.1",
        bare,
    );
    assert!(got.starts_with(b"Date: "));
    let got = one_message(
        with_missing_headers(AddMissingHeaders::No),
        "192.0.2.1",
        bare,
    );
    assert_eq!(got, bare);
    // Fields already there are not added twice (names are case-insensitive).
    let has = b"message-id: <x@y>\r\nDATE: Sun, 6 Dec 2026 12:00:00 +0000\r\n\r\nb\r\n";
    let got = one_message(
        with_missing_headers(AddMissingHeaders::Always),
        "192.0.2.1",
        has,
    );
    assert_eq!(got, has);
}

fn enforcing(map: &[(&str, &[&str])]) -> SessionConfig {
    let map = map
        .iter()
        .map(|(u, ps)| (u.to_string(), ps.iter().map(|p| p.to_string()).collect()))
        .collect();
    let logins = sluice_policy::sender_login::SenderLogins::new(&map).expect("map");
    SessionConfig {
        sender_logins: Some(Arc::new(logins)),
        auth_plaintext: true,
        ..config()
    }
}

fn authenticated_mail(cfg: SessionConfig, sender: &str) -> Harness {
    let mut h = Harness::new(cfg, "198.51.100.1");
    // alice / secret (the harness's only good credentials).
    let input = format!(
        "EHLO x\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<{sender}>\r\nRCPT TO:<b@remote.test>\r\n"
    );
    h.feed(input.as_bytes(), 7);
    h
}

#[test]
fn authenticated_senders_are_bound_to_their_logins() {
    let map: &[(&str, &[&str])] = &[("alice", &["alice@example.com", "@example.org"])];
    for ok in [
        "alice@example.com",
        "ALICE@example.com",
        "news@example.org",
        "",
    ] {
        let h = authenticated_mail(enforcing(map), ok);
        assert_eq!(
            h.codes(),
            ["220", "250", "235", "250", "250"],
            "{ok}: {}",
            h.out
        );
    }
    let h = authenticated_mail(enforcing(map), "bob@example.com");
    assert_eq!(h.codes(), ["220", "250", "235", "553", "503"], "{}", h.out);
    assert!(
        h.out
            .contains("553 5.7.1 Error: <bob@example.com>: sender address not owned by user alice"),
        "{}",
        h.out
    );
    // Without the listener's enforcement the same sender passes.
    let h = authenticated_mail(
        SessionConfig {
            auth_plaintext: true,
            ..config()
        },
        "bob@example.com",
    );
    assert_eq!(h.codes(), ["220", "250", "235", "250", "250"], "{}", h.out);
    // Unauthenticated clients are left to the relay rules.
    let mut h = Harness::new(enforcing(map), "192.0.2.1");
    h.feed(b"EHLO x\r\nMAIL FROM:<bob@example.com>\r\n", 64);
    assert_eq!(h.codes(), ["220", "250", "250"]);
}
