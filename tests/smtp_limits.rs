//! Bad input and limits: each gets its reply and leaves nothing in the spool.
//! Raw sockets, so the bytes on the wire are exactly the abuse being tested.

use sluice_testkit::*;
use std::time::{Duration, Instant};

#[test]
fn line_too_long_gets_500_5_5_2_and_the_session_goes_on() {
    let relay = Relay::start(&[]);
    let mut c = relay.session();
    let long = format!("NOOP {}", "x".repeat(3000));
    let r = c.cmd(&long);
    assert_eq!((r.code, r.enhanced()), (500, "5.5.2"), "{r:?}");
    c.expect("NOOP", 250);

    // The same, split over two writes, inside a transaction.
    c.expect("MAIL FROM:<a@example.test>", 250);
    let long_rcpt = format!("RCPT TO:<{}@example.test>\r\n", "y".repeat(3000));
    let (one, two) = long_rcpt.as_bytes().split_at(1500);
    // TCP_NODELAY is on: the two writes go out as separate segments.
    c.send(one);
    c.send(two);
    let r = c.read_reply();
    assert_eq!((r.code, r.enhanced()), (500, "5.5.2"), "{r:?}");
    // The over-long line was not taken as a recipient.
    let r = c.cmd("DATA");
    assert!(
        (r.code == 503 || r.code == 554) && r.enhanced() == "5.5.1",
        "{r:?}"
    );
    c.expect("QUIT", 221);
    assert_eq!(relay.count(), 0);
}

#[test]
fn unknown_command_and_bad_syntax() {
    let relay = Relay::start(&[]);
    let mut c = relay.session();
    let r = c.cmd("FROB something");
    assert_eq!((r.code, r.enhanced()), (500, "5.5.1"), "{r:?}");
    let r = c.cmd("MAIL FROM:bad");
    assert_eq!(r.code, 501, "{r:?}");
    assert!(r.enhanced().starts_with("5."), "{r:?}");
    let r = c.cmd("MAIL FROM:<a@example.test> FROBNICATE=yes");
    assert!(
        r.code == 501 || r.code == 555,
        "unknown MAIL parameter: {r:?}"
    );
    c.expect("MAIL FROM:<a@example.test>", 250);
    let r = c.cmd("RCPT TO:not an address");
    assert_eq!(r.code, 501, "{r:?}");
    let r = c.cmd("DATA");
    assert!(
        r.code == 503 || r.code == 554,
        "DATA with no valid recipient: {r:?}"
    );
    c.expect("QUIT", 221);
    assert_eq!(relay.count(), 0);
}

#[test]
fn commands_out_of_order_get_503() {
    let relay = Relay::start(&[]);
    let mut c = relay.greeted();
    // MAIL before EHLO.
    let r = c.cmd("MAIL FROM:<a@example.test>");
    assert_eq!((r.code, r.enhanced()), (503, "5.5.1"), "{r:?}");
    c.expect("EHLO order.test", 250);
    // RCPT before MAIL.
    let r = c.cmd("RCPT TO:<b@example.test>");
    assert_eq!((r.code, r.enhanced()), (503, "5.5.1"), "{r:?}");
    // DATA before MAIL.
    let r = c.cmd("DATA");
    assert_eq!((r.code, r.enhanced()), (503, "5.5.1"), "{r:?}");
    // BDAT before MAIL: the chunk is consumed, the reply is 503.
    c.send(b"BDAT 5 LAST\r\nhello");
    let r = c.read_reply();
    assert_eq!((r.code, r.enhanced()), (503, "5.5.1"), "{r:?}");
    c.expect("MAIL FROM:<a@example.test>", 250);
    // Nested MAIL.
    let r = c.cmd("MAIL FROM:<a@example.test>");
    assert_eq!(r.code, 503, "{r:?}");
    // DATA before any RCPT: RFC 5321 §3.3 allows 503 or 554 here.
    let r = c.cmd("DATA");
    assert!(
        (r.code == 503 || r.code == 554) && r.enhanced() == "5.5.1",
        "DATA before RCPT: {r:?}"
    );
    c.expect("NOOP", 250);
    c.expect("QUIT", 221);
    assert_eq!(relay.count(), 0);
}

#[test]
fn too_many_recipients_gets_452_4_5_3() {
    let relay = Relay::start(&["server.listener.smtp.max_recipients=3"]);
    let mut c = relay.session();
    c.expect("MAIL FROM:<a@example.test>", 250);
    for i in 1..=3 {
        c.expect(&format!("RCPT TO:<r{i}@example.test>"), 250);
    }
    let r = c.cmd("RCPT TO:<r4@example.test>");
    assert_eq!((r.code, r.enhanced()), (452, "4.5.3"), "{r:?}");
    let r = c.cmd("RCPT TO:<r5@example.test>");
    assert_eq!(r.code, 452, "{r:?}");
    c.expect("RSET", 250);
    assert_eq!(relay.count(), 0);

    // The transaction itself is still good: it goes out with the first three only.
    c.expect("MAIL FROM:<a@example.test>", 250);
    for i in 1..=4 {
        c.cmd(&format!("RCPT TO:<r{i}@example.test>"));
    }
    c.expect("DATA", 354);
    c.send(b"Subject: three\r\n\r\nx\r\n.\r\n");
    let r = c.read_reply();
    assert_eq!(r.code, 250, "{r:?}");
    c.expect("QUIT", 221);
    let list = relay.list();
    assert_eq!(list.len(), 1);
    assert_eq!(
        list[0].recipients,
        vec!["r1@example.test", "r2@example.test", "r3@example.test"]
    );
}

#[test]
fn message_too_big_gets_552_5_3_4_by_size_data_and_bdat() {
    let relay = Relay::start(&["server.listener.smtp.max_message_size=1000"]);
    let mut c = relay.greeted();
    let ehlo = c.expect("EHLO big.test", 250);
    assert!(
        ehlo.lines.iter().any(|l| l.ends_with("SIZE 1000")),
        "SIZE 1000 advertised: {ehlo:?}"
    );

    // Declared with SIZE= at MAIL.
    let r = c.cmd("MAIL FROM:<a@example.test> SIZE=5000");
    assert_eq!((r.code, r.enhanced()), (552, "5.3.4"), "{r:?}");
    // No transaction was started by the refused MAIL.
    c.expect("RCPT TO:<b@example.test>", 503);

    // An oversized DATA body (not declared).
    c.expect("MAIL FROM:<a@example.test>", 250);
    c.expect("RCPT TO:<b@example.test>", 250);
    c.expect("DATA", 354);
    let line = format!("{}\r\n", "z".repeat(98));
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    for _ in 0..20 {
        big.extend_from_slice(line.as_bytes());
    }
    c.send(&big);
    c.send(b".\r\n");
    let r = c.read_reply();
    assert_eq!((r.code, r.enhanced()), (552, "5.3.4"), "{r:?}");
    c.expect("NOOP", 250);

    // An oversized BDAT LAST chunk.
    c.expect("MAIL FROM:<a@example.test>", 250);
    c.expect("RCPT TO:<b@example.test>", 250);
    c.send(format!("BDAT {} LAST\r\n", big.len()).as_bytes());
    c.send(&big);
    let r = c.read_reply();
    assert_eq!((r.code, r.enhanced()), (552, "5.3.4"), "{r:?}");
    c.expect("NOOP", 250);

    // Two BDAT chunks that each fit but together do not.
    c.expect("MAIL FROM:<a@example.test>", 250);
    c.expect("RCPT TO:<b@example.test>", 250);
    let half = &big[..600];
    c.send(b"BDAT 600\r\n");
    c.send(half);
    let r = c.read_reply();
    assert_eq!(r.code, 250, "first chunk fits: {r:?}");
    c.send(b"BDAT 600 LAST\r\n");
    c.send(half);
    let r = c.read_reply();
    assert_eq!((r.code, r.enhanced()), (552, "5.3.4"), "{r:?}");
    c.expect("NOOP", 250);
    assert_eq!(relay.count(), 0, "nothing oversized may be stored");

    // A message under the limit still goes through (the limit is not "refuse all").
    let mut small = b"Subject: small\r\n\r\n".to_vec();
    for _ in 0..5 {
        small.extend_from_slice(line.as_bytes());
    }
    let id = c.send_mail("a@example.test", &["b@example.test"], &small);
    c.expect("QUIT", 221);
    assert_eq!(relay.count(), 1);
    assert_stored_exact(&relay.body(&id), &small, &id);
}

#[test]
fn idle_timeout_sends_421_4_4_2_unprompted() {
    let relay = Relay::start(&["server.listener.smtp.idle_timeout=1s"]);
    let mut c = relay.session();
    c.expect("MAIL FROM:<a@example.test>", 250);
    c.expect("RCPT TO:<b@example.test>", 250);
    let started = Instant::now();
    // Send nothing: the relay must speak first.
    let r = c.read_reply();
    let waited = started.elapsed();
    assert_eq!((r.code, r.enhanced()), (421, "4.4.2"), "{r:?}");
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(8),
        "421 after {waited:?}, expected about 1s"
    );
    c.expect_closed();

    // A client that stalls in the middle of a message body.
    let mut c = relay.session();
    c.expect("MAIL FROM:<a@example.test>", 250);
    c.expect("RCPT TO:<b@example.test>", 250);
    c.expect("DATA", 354);
    c.send(b"Subject: stalled\r\n\r\nhalf a bo");
    let r = c.read_reply();
    assert_eq!((r.code, r.enhanced()), (421, "4.4.2"), "{r:?}");
    c.expect_closed();
    assert_eq!(relay.count(), 0, "a stalled body must not be stored");
}

#[test]
fn session_timeout_ends_even_a_busy_session() {
    let relay = Relay::start(&["server.listener.smtp.session_timeout=2s"]);
    let mut c = relay.session();
    let started = Instant::now();
    // Keep the session busy (never idle) until the relay ends it.
    let r = loop {
        let r = c.cmd("NOOP");
        if r.code != 250 {
            break r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "session_timeout=2s never fired"
        );
    };
    let waited = started.elapsed();
    assert_eq!((r.code, r.enhanced()), (421, "4.4.2"), "{r:?}");
    assert!(
        waited >= Duration::from_millis(1500),
        "421 after {waited:?}, expected about 2s"
    );
    c.expect_closed();
}

#[test]
fn line_length_limit_is_exact() {
    let relay = Relay::start(&["server.listener.smtp.max_line_length=600"]);
    let mut c = relay.session();
    // 600 bytes including CRLF: allowed.
    let ok = format!("NOOP {}", "a".repeat(600 - 2 - 5));
    assert_eq!(ok.len() + 2, 600);
    c.expect(&ok, 250);
    // 601 bytes: too long.
    let long = format!("NOOP {}", "a".repeat(600 - 2 - 5 + 1));
    let r = c.cmd(&long);
    assert_eq!((r.code, r.enhanced()), (500, "5.5.2"), "{r:?}");
    c.expect("NOOP", 250);
    c.expect("QUIT", 221);
}

#[test]
fn too_many_errors_gets_421_4_7_0_and_close() {
    let relay = Relay::start(&["server.listener.smtp.max_errors=3"]);
    let mut c = relay.session();
    for i in 1..=2 {
        let r = c.cmd(&format!("BOGUS{i}"));
        assert_eq!(r.code, 500, "{r:?}");
    }
    c.expect("NOOP", 250);
    let r = c.cmd("BOGUS3");
    assert_eq!(r.code, 500, "{r:?}");
    let r = c.read_reply();
    assert_eq!((r.code, r.enhanced()), (421, "4.7.0"), "{r:?}");
    c.expect_closed();
    assert_eq!(relay.count(), 0);
}

#[test]
fn data_sent_before_354_is_refused_with_554_5_5_0() {
    let relay = Relay::start(&[]);
    let mut c = relay.session();
    c.expect("MAIL FROM:<a@example.test>", 250);
    c.expect("RCPT TO:<b@example.test>", 250);
    c.send(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n");
    let r = c.read_reply();
    assert_eq!((r.code, r.enhanced()), (554, "5.5.0"), "{r:?}");
    // The stream cannot be trusted any more: the relay closes.
    c.expect_closed();
    assert_eq!(relay.count(), 0);
}

const SMUGGLE_VARIANTS: [(&str, &[u8]); 4] = [
    ("LF.LF", b"\n.\n"),
    ("CRLF.LF", b"\r\n.\n"),
    ("LF.CRLF", b"\n.\r\n"),
    ("CR.CR", b"\r.\r"),
];

/// DATA body with a smuggled second transaction behind a fake end of data.
fn smuggling_body(variant: &[u8]) -> Vec<u8> {
    let mut b = b"Subject: innocent\r\n\r\nhello".to_vec();
    b.extend_from_slice(variant);
    b.extend_from_slice(
        b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n",
    );
    b
}

fn smuggle(relay: &Relay, variant: &[u8]) -> Reply {
    let mut c = relay.session();
    c.expect("MAIL FROM:<good@example.test>", 250);
    c.expect("RCPT TO:<friend@example.test>", 250);
    c.expect("DATA", 354);
    let mut all = smuggling_body(variant);
    all.extend_from_slice(b".\r\n");
    c.send(&all);
    let end = c.read_reply();
    // Nothing else was answered: the next reply is the one to QUIT.
    let r = c.cmd("QUIT");
    assert_eq!(
        r.code, 221,
        "a reply to a smuggled command came back: {r:?} (end of data: {end:?})"
    );
    c.expect_closed();
    end
}

#[test]
fn smtp_smuggling_is_rejected_with_bare_newline_reject() {
    let relay = Relay::start(&[]);
    for (name, variant) in SMUGGLE_VARIANTS {
        let r = smuggle(&relay, variant);
        assert_eq!((r.code, r.enhanced()), (550, "5.6.0"), "{name}: {r:?}");
        assert_eq!(relay.count(), 0, "{name}: nothing may be stored");
    }
}

#[test]
fn smtp_smuggling_with_bare_newline_accept_stores_one_message() {
    let relay = Relay::start(&["server.listener.smtp.bare_newline=\"accept\""]);
    for (i, (name, variant)) in SMUGGLE_VARIANTS.iter().enumerate() {
        let r = smuggle(&relay, variant);
        assert_eq!(r.code, 250, "{name}: {r:?}");
        let id = queued_id(&r.text()).expect("id");
        let list = relay.list();
        assert_eq!(
            list.len(),
            i + 1,
            "{name}: exactly one message per attempt: {list:?}"
        );
        assert!(
            list.iter().all(|e| e.sender == "good@example.test"),
            "{name}: {list:?}"
        );
        let e = list.iter().find(|e| e.id == id).unwrap();
        assert_eq!(e.recipients, vec!["friend@example.test"], "{name}");
        let stored = relay.body(&id);
        let (_, rest) = split_received(&stored);
        let rest = text(rest);
        assert!(
            rest.starts_with("Subject: innocent\r\n\r\nhello"),
            "{name}: {rest:?}"
        );
        assert!(
            rest.contains("MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n"),
            "{name}: the smuggled text must be body: {rest:?}"
        );
        assert!(rest.ends_with("evil\r\n"), "{name}: {rest:?}");
    }
}

#[test]
fn bare_newline_in_bdat_follows_the_bare_newline_setting() {
    let chunk = b"Subject: bdat bare\r\n\r\nline\n.\nMAIL FROM:<evil@x.test>\r\n";
    for (setting, want) in [("reject", 550u16), ("accept", 250)] {
        let relay = Relay::start(&[&format!("server.listener.smtp.bare_newline=\"{setting}\"")]);
        let mut c = relay.session();
        c.expect("MAIL FROM:<good@example.test>", 250);
        c.expect("RCPT TO:<friend@example.test>", 250);
        c.send(format!("BDAT {} LAST\r\n", chunk.len()).as_bytes());
        c.send(chunk);
        let r = c.read_reply();
        assert_eq!(r.code, want, "{setting}: {r:?}");
        c.expect("QUIT", 221);
        if want == 550 {
            assert_eq!(r.enhanced(), "5.6.0");
            assert_eq!(relay.count(), 0);
        } else {
            let id = queued_id(&r.text()).unwrap();
            assert_eq!(relay.count(), 1);
            assert_stored_exact(&relay.body(&id), chunk, &id);
        }
    }
}

#[test]
fn bare_lf_in_a_command_gets_500_5_5_2_and_close() {
    let relay = Relay::start(&[]);
    let mut c = relay.session();
    c.send(b"NOOP\n");
    let r = c.read_reply();
    assert_eq!((r.code, r.enhanced()), (500, "5.5.2"), "{r:?}");
    c.expect_closed();

    // A bare LF used to sneak a second command into one line.
    let mut c = relay.session();
    c.send(b"MAIL FROM:<a@example.test>\nRCPT TO:<b@example.test>\r\n");
    let r = c.read_reply();
    assert_eq!((r.code, r.enhanced()), (500, "5.5.2"), "{r:?}");
    c.expect_closed();
    assert_eq!(relay.count(), 0);
}

#[test]
fn starttls_command_injection_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(dir.path());
    let relay = Relay::builder()
        .dir(dir)
        .lset("tls", "\"starttls\"")
        .lset("tls_cert", &format!("\"{}\"", cert.display()))
        .lset("tls_key", &format!("\"{}\"", key.display()))
        .start();
    let out = python(
        "starttls_inject.py",
        &["127.0.0.1", &relay.port.to_string()],
        Duration::from_secs(30),
    );
    assert_ok(&out, "starttls_inject.py");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let lines = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap_or_else(|| panic!("no {k} in {v}"))
            .iter()
            .map(|l| l.as_str().unwrap().trim_end().to_string())
            .collect()
    };
    assert!(lines("ehlo").iter().any(|l| l.ends_with("STARTTLS")), "{v}");
    let starttls = lines("starttls");
    assert!(starttls[0].starts_with("220"), "{v}");
    assert!(
        v.get("handshake_error").is_none(),
        "handshake failed (clear-text reply injected?): {v}"
    );
    let first = v["first_after_tls"].as_str().unwrap();
    assert!(
        first.starts_with("250-"),
        "the first reply after TLS must be the EHLO's, got {first:?} (full: {v})"
    );
    let ehlo = lines("ehlo_after_tls");
    assert!(
        !ehlo.iter().any(|l| l == "250 2.0.0 Ok"),
        "injected NOOP answered: {v}"
    );
    assert!(
        !ehlo.iter().any(|l| l.ends_with("STARTTLS")),
        "STARTTLS offered again: {v}"
    );
    assert_eq!(lines("noop_after_tls"), vec!["250 2.0.0 Ok"], "{v}");
    assert!(lines("mail_before_tls")[0].starts_with("250"), "{v}");
    assert!(
        lines("rcpt_after_tls")[0].starts_with("503"),
        "the MAIL given before STARTTLS must be forgotten: {v}"
    );
    assert!(lines("quit")[0].starts_with("221"), "{v}");
    assert_eq!(relay.count(), 0);
}
