//! Byte-level tests of the sans-IO client session against scripted server replies.

use super::client::*;

fn cfg() -> ClientConfig {
    ClientConfig {
        ehlo_name: "relay.test".into(),
        lmtp: false,
        tls: TlsPolicy::Opportunistic,
        implicit_tls: false,
        auth: None,
        message_tls: crate::delivery::tls_policy::MessageTls::Policy,
    }
}

fn msg(rcpts: &[&str]) -> OutboundMessage {
    OutboundMessage {
        sender: "a@x.test".into(),
        recipients: rcpts
            .iter()
            .map(|r| OutboundRecipient {
                address: r.to_string(),
                notify: Some("FAILURE".into()),
                orcpt: Some(r.to_string()),
            })
            .collect(),
        size: 100,
        eightbit: true,
        smtputf8: false,
        ret: Some("HDRS"),
        envid: Some("id+1".into()),
    }
}

/// Feeds `input` byte by byte; returns the first non-Read event.
fn feed(c: &mut ClientSession, input: &[u8]) -> ClientEvent {
    for i in 0..input.len() {
        let (used, ev) = c.receive(&input[i..i + 1]);
        assert_eq!(used, 1);
        if !matches!(ev, ClientEvent::Read) {
            assert_eq!(i + 1, input.len(), "event before the end of input");
            return ev;
        }
    }
    ClientEvent::Read
}

fn take(c: &mut ClientSession) -> String {
    let s = String::from_utf8_lossy(c.output()).into_owned();
    c.clear_output();
    s
}

const EHLO_FULL: &[u8] = b"250-mx.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n";

#[test]
fn pipelined_bdat_transaction() {
    let mut c = ClientSession::new(cfg());
    assert!(matches!(
        feed(&mut c, b"220 mx.test ESMTP\r\n"),
        ClientEvent::Read
    ));
    assert_eq!(take(&mut c), "EHLO relay.test\r\n");
    assert!(matches!(feed(&mut c, EHLO_FULL), ClientEvent::Ready));
    assert!(c.capabilities().chunking && c.capabilities().dsn);
    let ev = c
        .send(&msg(&["b@y.test", "c@y.test"]), 100)
        .expect("sendable");
    assert!(matches!(ev, Some(ClientEvent::SendBody(BodyMode::Bdat))));
    assert_eq!(
        take(&mut c),
        "MAIL FROM:<a@x.test> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=id+2B1\r\n\
         RCPT TO:<b@y.test> NOTIFY=FAILURE ORCPT=rfc822;b@y.test\r\n\
         RCPT TO:<c@y.test> NOTIFY=FAILURE ORCPT=rfc822;c@y.test\r\n\
         BDAT 100 LAST\r\n"
    );
    let ev = feed(
        &mut c,
        b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n250 2.0.0 queued\r\n",
    );
    let ClientEvent::Done(result) = ev else {
        panic!("{ev:?}")
    };
    assert_eq!(result.recipients[0].code, 250);
    assert_eq!(result.recipients[0].esc.as_deref(), Some("2.0.0"));
    assert_eq!(result.recipients[1].code, 550);
    assert_eq!(result.recipients[1].text, "no such user");
    // Next message reuses the session; no RSET after a completed transaction.
    assert!(c.send(&msg(&["d@y.test"]), 10).is_ok());
    assert!(take(&mut c).starts_with("MAIL FROM"));
}

#[test]
fn data_path_and_mail_failure_then_rset() {
    let mut c = ClientSession::new(cfg());
    feed(&mut c, b"220 mx\r\n");
    take(&mut c);
    assert!(matches!(
        feed(&mut c, b"250-mx\r\n250 PIPELINING\r\n"),
        ClientEvent::Ready
    ));
    assert!(c.send(&msg(&["b@y.test"]), 5).expect("ok").is_none());
    assert_eq!(
        take(&mut c),
        "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
    );
    let ev = feed(&mut c, b"250 ok\r\n250 ok\r\n354 go\r\n");
    assert!(matches!(ev, ClientEvent::SendBody(BodyMode::Data)));
    let ev = feed(&mut c, b"451 4.3.0 try later\r\n");
    let ClientEvent::Done(r) = ev else { panic!() };
    assert_eq!(r.recipients[0].code, 451);
    // A transaction the server did not complete: RSET goes first next time.
    c.send(&msg(&["b@y.test"]), 5).expect("ok");
    let out = take(&mut c);
    assert!(out.starts_with("RSET\r\nMAIL FROM"), "{out}");
    let ev = feed(
        &mut c,
        b"250 ok\r\n550 5.7.1 sender rejected\r\n503 need mail\r\n554 no valid recipients\r\n",
    );
    let ClientEvent::Done(r) = ev else { panic!() };
    assert_eq!(
        r.recipients[0].code, 550,
        "MAIL failure applies to every recipient"
    );
}

#[test]
fn starttls_then_ehlo_again() {
    let mut c = ClientSession::new(cfg());
    feed(&mut c, b"220 mx\r\n");
    take(&mut c);
    assert!(matches!(
        feed(&mut c, b"250-mx\r\n250 STARTTLS\r\n"),
        ClientEvent::Read
    ));
    assert_eq!(take(&mut c), "STARTTLS\r\n");
    assert!(matches!(
        feed(&mut c, b"220 go ahead\r\n"),
        ClientEvent::StartTls
    ));
    c.tls_established();
    assert_eq!(take(&mut c), "EHLO relay.test\r\n");
    assert!(matches!(
        feed(&mut c, b"250-mx\r\n250 PIPELINING\r\n"),
        ClientEvent::Ready
    ));
    assert!(c.is_tls());
}

#[test]
fn tls_required_fails_without_starttls() {
    let mut c = ClientSession::new(ClientConfig {
        tls: TlsPolicy::Required,
        ..cfg()
    });
    feed(&mut c, b"220 mx\r\n");
    let ev = feed(&mut c, b"250 mx\r\n");
    let ClientEvent::Failed(r) = ev else { panic!() };
    assert_eq!((r.code, r.esc.as_deref()), (451, Some("4.7.10")));
    assert_eq!(
        c.tls_failure(),
        Some(&crate::delivery::tls_policy::Failure::NoStartTls)
    );
    assert_eq!(take(&mut c), "EHLO relay.test\r\n", "nothing else went out");
}

#[test]
fn refused_starttls_defers_under_verify_and_goes_on_in_clear_when_opportunistic() {
    let mut c = ClientSession::new(ClientConfig {
        tls: TlsPolicy::Verify,
        ..cfg()
    });
    feed(&mut c, b"220 mx\r\n");
    feed(&mut c, b"250-mx\r\n250 STARTTLS\r\n");
    assert_eq!(take(&mut c), "EHLO relay.test\r\nSTARTTLS\r\n");
    let ClientEvent::Failed(r) = feed(&mut c, b"454 4.7.0 TLS not available\r\n") else {
        panic!()
    };
    assert_eq!((r.code, r.esc.as_deref()), (451, Some("4.7.10")));
    assert!(matches!(
        c.tls_failure(),
        Some(crate::delivery::tls_policy::Failure::StartTlsRefused(t)) if t.contains("454")
    ));
    assert_eq!(take(&mut c), "", "no MAIL in clear");

    let mut c = ClientSession::new(cfg());
    feed(&mut c, b"220 mx\r\n");
    feed(&mut c, b"250-mx\r\n250 STARTTLS\r\n");
    assert!(matches!(
        feed(&mut c, b"454 4.7.0 TLS not available\r\n"),
        ClientEvent::Ready
    ));
    assert!(!c.is_tls());
}

#[test]
fn none_never_sends_starttls() {
    let mut c = ClientSession::new(ClientConfig {
        tls: TlsPolicy::None,
        ..cfg()
    });
    feed(&mut c, b"220 mx\r\n");
    assert!(matches!(
        feed(&mut c, b"250-mx\r\n250 STARTTLS\r\n"),
        ClientEvent::Ready
    ));
    assert_eq!(take(&mut c), "EHLO relay.test\r\n");
}

#[test]
fn implicit_tls_authenticates_without_starttls() {
    let mut c = ClientSession::new(ClientConfig {
        tls: TlsPolicy::Required,
        implicit_tls: true,
        auth: Some(("u".into(), "p".into())),
        ..cfg()
    });
    assert!(c.is_tls());
    feed(&mut c, b"220 mx\r\n");
    feed(&mut c, b"250-mx\r\n250 AUTH PLAIN\r\n");
    assert_eq!(take(&mut c), "EHLO relay.test\r\nAUTH PLAIN AHUAcA==\r\n");
}

#[test]
fn smart_host_auth_login_over_tls() {
    let mut c = ClientSession::new(ClientConfig {
        auth: Some(("u".into(), "p".into())),
        ..cfg()
    });
    feed(&mut c, b"220 mx\r\n");
    feed(&mut c, b"250-mx\r\n250 STARTTLS\r\n");
    feed(&mut c, b"220 go\r\n");
    c.tls_established();
    take(&mut c);
    assert!(matches!(
        feed(&mut c, b"250-mx\r\n250 AUTH LOGIN\r\n"),
        ClientEvent::Read
    ));
    assert_eq!(take(&mut c), "AUTH LOGIN\r\n");
    feed(&mut c, b"334 VXNlcm5hbWU6\r\n");
    assert_eq!(take(&mut c), "dQ==\r\n");
    feed(&mut c, b"334 UGFzc3dvcmQ6\r\n");
    assert_eq!(take(&mut c), "cA==\r\n");
    assert!(matches!(
        feed(&mut c, b"235 2.7.0 ok\r\n"),
        ClientEvent::Ready
    ));
}

#[test]
fn greeting_refused_and_garbage() {
    let mut c = ClientSession::new(cfg());
    assert!(
        matches!(feed(&mut c, b"554 5.7.1 go away\r\n"), ClientEvent::Failed(r) if r.code == 554)
    );
    let mut c = ClientSession::new(cfg());
    assert!(matches!(
        feed(&mut c, b"hello there\r\n"),
        ClientEvent::Failed(_)
    ));
    let mut c = ClientSession::new(cfg());
    assert!(matches!(
        feed(&mut c, b"220-a\r\n250 b\r\n"),
        ClientEvent::Failed(_)
    ));
}

#[test]
fn lmtp_one_reply_per_accepted_recipient() {
    let mut c = ClientSession::new(ClientConfig {
        lmtp: true,
        tls: TlsPolicy::None,
        ..cfg()
    });
    feed(&mut c, b"220 lmtp\r\n");
    assert_eq!(take(&mut c), "LHLO relay.test\r\n");
    feed(&mut c, b"250-lmtp\r\n250 PIPELINING\r\n");
    c.send(&msg(&["a@l", "b@l", "c@l"]), 3).expect("ok");
    take(&mut c);
    let ev = feed(
        &mut c,
        b"250 ok\r\n250 ok\r\n550 no\r\n250 ok\r\n354 go\r\n",
    );
    assert!(matches!(ev, ClientEvent::SendBody(BodyMode::Data)));
    assert!(matches!(
        feed(&mut c, b"250 2.0.0 a done\r\n"),
        ClientEvent::Read
    ));
    let ev = feed(&mut c, b"452 4.2.2 c over quota\r\n");
    let ClientEvent::Done(r) = ev else {
        panic!("{ev:?}")
    };
    let codes: Vec<u16> = r.recipients.iter().map(|r| r.code).collect();
    assert_eq!(codes, [250, 550, 452]);
}

#[test]
fn smtputf8_and_size_checked_before_sending() {
    let mut c = ClientSession::new(cfg());
    feed(&mut c, b"220 mx\r\n");
    feed(&mut c, b"250-mx\r\n250 SIZE 50\r\n");
    let mut m = msg(&["b@y"]);
    assert_eq!(
        c.send(&m, 100).err(),
        Some(Unsendable::TooBig {
            size: 100,
            limit: 50
        })
    );
    m.size = 10;
    m.smtputf8 = true;
    assert_eq!(c.send(&m, 10).err(), Some(Unsendable::NeedsSmtpUtf8));
}

#[test]
fn multiline_reply_and_bare_lf_tolerated() {
    let mut c = ClientSession::new(cfg());
    feed(&mut c, b"220-first\n220-second\r\n220 third\n");
    assert_eq!(take(&mut c), "EHLO relay.test\r\n");
}

#[test]
fn xtext_encodes_specials() {
    assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
}

/// Found by the smtp_client fuzz target: a failure carried the server's 2xx,
/// and delivery records a failure's reply for every recipient (2xx = delivered).
#[test]
fn positive_reply_out_of_place_is_a_local_failure() {
    let mut c = ClientSession::new(cfg());
    let ev = feed(&mut c, b"219 x\r\n");
    let ClientEvent::Failed(r) = ev else {
        panic!("{ev:?}")
    };
    assert_eq!((r.code, r.esc.as_deref()), (451, Some("4.5.0")));

    // 250 to DATA (no 354): the body was never sent.
    let mut c = ClientSession::new(cfg());
    feed(&mut c, b"220 mx.test\r\n");
    assert!(matches!(
        feed(&mut c, b"250 mx.test\r\n"),
        ClientEvent::Ready
    ));
    take(&mut c);
    assert!(c.send(&msg(&["b@y.test"]), 10).expect("sendable").is_none());
    let ev = feed(&mut c, b"250 ok\r\n250 ok\r\n250 ok\r\n");
    let ClientEvent::Failed(r) = ev else {
        panic!("{ev:?}")
    };
    assert_eq!(r.code, 451);

    // A real 4xx/5xx is passed through as it came.
    let mut c = ClientSession::new(cfg());
    let ev = feed(&mut c, b"554 5.7.1 go away\r\n");
    assert!(matches!(ev, ClientEvent::Failed(r) if r.code == 554));
}

/// Found by the smtp_client fuzz target: a CR inside a reply line was kept in
/// the reply text (which goes to logs, the spool and DSNs).
#[test]
fn control_characters_in_replies_are_replaced() {
    let mut c = ClientSession::new(cfg());
    let ev = feed(&mut c, b"554 5.7.1 no\rpe\x00\x1b[31m\r\n");
    let ClientEvent::Failed(r) = ev else {
        panic!("{ev:?}")
    };
    assert_eq!(r.text, "no?pe??[31m");
}

// ---------------------------------------------------------------------------------
// Servers without PIPELINING (RFC 2920): one command, then its reply, then the next
// ---------------------------------------------------------------------------------

/// A session that said EHLO to a server offering `ehlo` (no PIPELINING).
fn ready_without_pipelining(ehlo: &[u8]) -> ClientSession {
    let mut c = ClientSession::new(cfg());
    feed(&mut c, b"220 mx.test\r\n");
    take(&mut c);
    assert!(matches!(feed(&mut c, ehlo), ClientEvent::Ready));
    assert!(!c.capabilities().pipelining);
    c
}

/// Feeds `reply` byte by byte, checking nothing is queued before its last byte;
/// returns the event and what was queued after it.
fn answer(c: &mut ClientSession, reply: &[u8]) -> (ClientEvent, String) {
    for i in 0..reply.len() {
        assert!(
            c.output().is_empty(),
            "command queued before the reply arrived: {:?}",
            String::from_utf8_lossy(c.output())
        );
        let (used, ev) = c.receive(&reply[i..i + 1]);
        assert_eq!(used, 1);
        if !matches!(ev, ClientEvent::Read) {
            assert_eq!(i + 1, reply.len(), "event before the end of the reply");
            return (ev, take(c));
        }
    }
    (ClientEvent::Read, take(c))
}

#[test]
fn without_pipelining_each_command_waits_for_the_previous_reply() {
    let mut c = ready_without_pipelining(b"250-mx.test\r\n250 8BITMIME\r\n");
    let rcpts = ["b@y.test", "c@y.test", "d@y.test"];
    assert!(c.send(&msg(&rcpts), 10).expect("sendable").is_none());
    assert_eq!(take(&mut c), "MAIL FROM:<a@x.test> BODY=8BITMIME\r\n");
    assert_eq!(c.awaited_stage(), Stage::Mail);
    let (ev, out) = answer(&mut c, b"250 2.1.0 ok\r\n");
    assert!(matches!(ev, ClientEvent::Read), "{ev:?}");
    assert_eq!(out, "RCPT TO:<b@y.test>\r\n");
    assert_eq!(c.awaited_stage(), Stage::Rcpt);
    // A refused recipient in the middle: the others still go, one at a time.
    let (_, out) = answer(&mut c, b"550 5.1.1 no such user\r\n");
    assert_eq!(out, "RCPT TO:<c@y.test>\r\n");
    let (_, out) = answer(&mut c, b"250 2.1.5 ok\r\n");
    assert_eq!(out, "RCPT TO:<d@y.test>\r\n");
    let (ev, out) = answer(&mut c, b"250 2.1.5 ok\r\n");
    assert!(matches!(ev, ClientEvent::Read), "{ev:?}");
    assert_eq!(out, "DATA\r\n");
    assert_eq!(c.awaited_stage(), Stage::Data);
    let (ev, out) = answer(&mut c, b"354 go\r\n");
    assert!(
        matches!(ev, ClientEvent::SendBody(BodyMode::Data)),
        "{ev:?}"
    );
    assert_eq!(out, "");
    assert_eq!(c.awaited_stage(), Stage::DataEnd);
    let (ev, _) = answer(&mut c, b"250 2.0.0 queued\r\n");
    let ClientEvent::Done(r) = ev else {
        panic!("{ev:?}")
    };
    let codes: Vec<u16> = r.recipients.iter().map(|r| r.code).collect();
    assert_eq!(codes, [550, 250, 250]);
    assert_eq!(r.recipients[0].text, "no such user");
    // Completed: the next transaction starts with MAIL alone, no RSET.
    c.send(&msg(&["e@y.test"]), 10).expect("sendable");
    assert_eq!(take(&mut c), "MAIL FROM:<a@x.test> BODY=8BITMIME\r\n");
}

#[test]
fn without_pipelining_all_recipients_refused_means_no_data_then_rset() {
    let mut c = ready_without_pipelining(b"250 mx.test\r\n");
    c.send(&msg(&["b@y.test", "c@y.test"]), 10)
        .expect("sendable");
    assert_eq!(take(&mut c), "MAIL FROM:<a@x.test>\r\n");
    answer(&mut c, b"250 ok\r\n");
    let (ev, out) = answer(&mut c, b"550 5.1.1 no\r\n");
    assert!(matches!(ev, ClientEvent::Read), "{ev:?}");
    assert_eq!(out, "RCPT TO:<c@y.test>\r\n");
    let (ev, out) = answer(&mut c, b"450 4.2.1 later\r\n");
    let ClientEvent::Done(r) = ev else {
        panic!("{ev:?}")
    };
    assert_eq!(out, "", "no DATA without an accepted recipient");
    let codes: Vec<u16> = r.recipients.iter().map(|r| r.code).collect();
    assert_eq!(codes, [550, 450]);
    // The next transaction resets first, and waits for the RSET reply.
    c.send(&msg(&["d@y.test"]), 10).expect("sendable");
    assert_eq!(take(&mut c), "RSET\r\n");
    assert_eq!(c.awaited_stage(), Stage::Rset);
    let (_, out) = answer(&mut c, b"250 ok\r\n");
    assert_eq!(out, "MAIL FROM:<a@x.test>\r\n");
}

#[test]
fn without_pipelining_a_refused_mail_sends_no_rcpt() {
    let mut c = ready_without_pipelining(b"250 mx.test\r\n");
    c.send(&msg(&["b@y.test", "c@y.test"]), 10)
        .expect("sendable");
    assert_eq!(take(&mut c), "MAIL FROM:<a@x.test>\r\n");
    let (ev, out) = answer(&mut c, b"553 5.7.1 sender refused\r\n");
    let ClientEvent::Done(r) = ev else {
        panic!("{ev:?}")
    };
    assert_eq!(out, "");
    assert!(r.recipients.iter().all(|r| r.code == 553), "{r:?}");
    assert_eq!(r.recipients.len(), 2);
}

#[test]
fn chunking_without_pipelining_sends_bdat_after_the_rcpt_replies() {
    let mut c = ready_without_pipelining(b"250-mx.test\r\n250 CHUNKING\r\n");
    assert!(c
        .send(&msg(&["b@y.test", "c@y.test"]), 42)
        .expect("sendable")
        .is_none());
    assert_eq!(take(&mut c), "MAIL FROM:<a@x.test>\r\n");
    let (_, out) = answer(&mut c, b"250 ok\r\n");
    assert_eq!(out, "RCPT TO:<b@y.test>\r\n");
    let (_, out) = answer(&mut c, b"250 ok\r\n");
    assert_eq!(out, "RCPT TO:<c@y.test>\r\n");
    let (ev, out) = answer(&mut c, b"250 ok\r\n");
    assert!(
        matches!(ev, ClientEvent::SendBody(BodyMode::Bdat)),
        "{ev:?}"
    );
    assert_eq!(out, "BDAT 42 LAST\r\n");
    assert_eq!(c.awaited_stage(), Stage::DataEnd);
    let (ev, _) = answer(&mut c, b"250 2.0.0 queued\r\n");
    let ClientEvent::Done(r) = ev else {
        panic!("{ev:?}")
    };
    assert!(r.recipients.iter().all(|r| r.code == 250), "{r:?}");
}

#[test]
fn with_pipelining_the_envelope_still_goes_in_one_write() {
    let mut c = ClientSession::new(cfg());
    feed(&mut c, b"220 mx.test\r\n");
    take(&mut c);
    feed(&mut c, b"250-mx.test\r\n250 PIPELINING\r\n");
    c.send(&msg(&["b@y.test", "c@y.test"]), 10)
        .expect("sendable");
    assert_eq!(
        take(&mut c),
        "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n"
    );
    // Replies arriving together are all taken; the stage is that of the oldest.
    assert_eq!(c.awaited_stage(), Stage::Mail);
    let ev = feed(&mut c, b"250 ok\r\n550 no\r\n250 ok\r\n354 go\r\n");
    assert!(
        matches!(ev, ClientEvent::SendBody(BodyMode::Data)),
        "{ev:?}"
    );
    assert_eq!(take(&mut c), "");
}

/// A REQUIRETLS session (level already raised to verify by `for_message`):
/// STARTTLS, then REQUIRETLS must be offered in the second EHLO, then MAIL
/// carries it.
fn requiretls_session(msg: crate::delivery::tls_policy::MessageTls) -> ClientSession {
    let mut c = ClientSession::new(ClientConfig {
        tls: TlsPolicy::Verify,
        message_tls: msg,
        ..cfg()
    });
    feed(&mut c, b"220 mx\r\n");
    feed(&mut c, b"250-mx\r\n250-REQUIRETLS\r\n250 STARTTLS\r\n");
    assert!(matches!(feed(&mut c, b"220 go\r\n"), ClientEvent::StartTls));
    c.tls_established();
    take(&mut c);
    c
}

#[test]
fn requiretls_goes_on_mail_when_the_server_offers_it_after_tls() {
    use crate::delivery::tls_policy::MessageTls;
    let mut c = requiretls_session(MessageTls::RequireTls);
    assert!(matches!(
        feed(&mut c, b"250-mx\r\n250-PIPELINING\r\n250 REQUIRETLS\r\n"),
        ClientEvent::Ready
    ));
    assert!(c.capabilities().requiretls);
    c.send(&msg(&["b@y.test"]), 5).expect("send");
    let out = take(&mut c);
    assert!(
        out.starts_with("MAIL FROM:<a@x.test> REQUIRETLS\r\n"),
        "{out}"
    );
}

#[test]
fn requiretls_stops_without_the_keyword_after_tls_but_notices_go_without_it() {
    use crate::delivery::tls_policy::{Failure, MessageTls};
    // REQUIRETLS offered before TLS only counts after it (RFC 8689 §4.2.1).
    let mut c = requiretls_session(MessageTls::RequireTls);
    let ClientEvent::Failed(r) = feed(&mut c, b"250-mx\r\n250 PIPELINING\r\n") else {
        panic!("must stop")
    };
    assert_eq!((r.code, r.esc.as_deref()), (451, Some("4.7.30")));
    assert_eq!(c.tls_failure(), Some(&Failure::NoRequireTls));
    assert_eq!(take(&mut c), "", "no MAIL");

    let mut c = requiretls_session(MessageTls::RequireTlsNotice);
    assert!(matches!(
        feed(&mut c, b"250-mx\r\n250 PIPELINING\r\n"),
        ClientEvent::Ready
    ));
    c.send(&msg(&["b@y.test"]), 5).expect("send");
    let out = take(&mut c);
    assert!(out.starts_with("MAIL FROM:<a@x.test>\r\n"), "{out}");
}

#[test]
fn plain_messages_never_send_requiretls_even_when_offered() {
    use crate::delivery::tls_policy::MessageTls;
    for msg_tls in [MessageTls::Policy, MessageTls::Optional] {
        let mut c = requiretls_session(msg_tls);
        feed(&mut c, b"250-mx\r\n250 REQUIRETLS\r\n");
        c.send(&msg(&["b@y.test"]), 5).expect("send");
        let out = take(&mut c);
        assert!(!out.contains("REQUIRETLS"), "{out}");
    }
}

#[test]
fn a_requiretls_session_without_starttls_stops_before_mail() {
    use crate::delivery::tls_policy::MessageTls;
    let mut c = ClientSession::new(ClientConfig {
        tls: TlsPolicy::Verify,
        message_tls: MessageTls::RequireTls,
        ..cfg()
    });
    feed(&mut c, b"220 mx\r\n");
    let ClientEvent::Failed(r) = feed(&mut c, b"250-mx\r\n250 REQUIRETLS\r\n") else {
        panic!("must stop")
    };
    assert_eq!((r.code, r.esc.as_deref()), (451, Some("4.7.10")));
    assert_eq!(take(&mut c), "EHLO relay.test\r\n");
}
