//! Submission hygiene through the real binary (issue 14 item 6): Date and
//! Message-ID added where missing, envelope senders bound to the
//! authenticated user, and `bare_newline = "normalize"`. Clients: swaks, and
//! the kit's raw client where a bare LF must reach the wire.

use sluice_testkit::*;
use std::time::Duration;

const PASSWORD: &str = "s3cret pass";

/// Loopback outside the relay networks, so only AUTH makes a client trusted.
fn submission_relay(extra: &[(&str, &str)]) -> Relay {
    let mut b = Relay::builder()
        .set("relay.relay_networks=[\"10.0.0.0/8\"]")
        .set("relay.local_domains=[\"local.test\"]")
        .set(format!("auth.users.alice=\"{}\"", hash_password(PASSWORD)))
        .lset("auth_plaintext", "true");
    for (k, v) in extra {
        b = b.lset(k, v);
    }
    b.start()
}

fn swaks_as_alice(relay: &Relay, from: &str, data: &str) -> std::process::Output {
    swaks(
        relay,
        &[
            "-a",
            "PLAIN",
            "-au",
            "alice",
            "-ap",
            PASSWORD,
            "--from",
            from,
            "--to",
            "someone@remote.test",
            "--data",
            data,
        ],
    )
}

/// The header block of a stored message, after our Received header.
fn stored_header(relay: &Relay, id: &str) -> String {
    let stored = relay.body(id);
    let (_, rest) = split_received(&stored);
    let rest = text(rest);
    rest.split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn missing_date_and_message_id_are_added_for_authenticated_clients_only() {
    let relay = submission_relay(&[("add_missing_headers", "\"trusted\"")]);
    let out = swaks_as_alice(&relay, "alice@example.test", "Subject: no date\n\nhello\n");
    assert_ok(&out, "swaks -a PLAIN");
    let ids = swaks_ids(&out);
    assert_eq!(ids.len(), 1, "{}", text(&out.stdout));
    let header = stored_header(&relay, &ids[0]);
    let expected_id = format!("Message-ID: <{}@", ids[0]);
    assert!(header.contains(&expected_id), "{header}");
    let date = header
        .lines()
        .find_map(|l| l.strip_prefix("Date: "))
        .unwrap_or_else(|| panic!("no Date in {header}"));
    assert!(
        chrono::DateTime::parse_from_rfc2822(date).is_ok(),
        "Date not RFC 5322: {date}"
    );
    assert!(header.ends_with("Subject: no date"), "{header}");

    // A message that has both keeps its own, and no second copy is added.
    let out = swaks_as_alice(
        &relay,
        "alice@example.test",
        "Date: Sat, 5 Dec 2026 10:00:00 +0000\nMessage-Id: <own@example.test>\nSubject: s\n\nx\n",
    );
    assert_ok(&out, "swaks with Date and Message-Id");
    let header = stored_header(&relay, &swaks_ids(&out)[0]);
    assert_eq!(header.matches("Date:").count(), 1, "{header}");
    assert_eq!(
        header.to_ascii_lowercase().matches("message-id:").count(),
        1
    );
    assert!(header.contains("<own@example.test>"), "{header}");

    // An unauthenticated client outside the relay networks (mail for a local
    // domain) gets its message stored as it came.
    let out = swaks(
        &relay,
        &[
            "--from",
            "x@elsewhere.test",
            "--to",
            "user@local.test",
            "--data",
            "Subject: inbound\n\nhi\n",
        ],
    );
    assert_ok(&out, "unauthenticated swaks");
    let header = stored_header(&relay, &swaks_ids(&out)[0]);
    assert_eq!(header, "Subject: inbound");
}

#[test]
fn authenticated_senders_are_bound_to_their_login() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sluice.toml");
    let map = "[auth.sender_login]\nalice = [\"@example.test\"]\n";
    std::fs::write(&file, map).unwrap();
    let relay = Relay::builder()
        .config(file.clone())
        .set("relay.relay_networks=[\"10.0.0.0/8\"]")
        .set(format!("auth.users.alice=\"{}\"", hash_password(PASSWORD)))
        .lset("auth_plaintext", "true")
        .lset("enforce_sender_login", "true")
        .start();
    let out = swaks_as_alice(&relay, "news@example.test", "Subject: ok\n\nx\n");
    assert_ok(&out, "alice as news@example.test");
    assert_eq!(swaks_ids(&out).len(), 1);

    let out = swaks_as_alice(&relay, "ceo@other.test", "Subject: spoof\n\nx\n");
    assert!(!out.status.success(), "a foreign sender must be refused");
    let transcript = text(&out.stdout);
    assert!(
        transcript.contains("553 5.7.1") && transcript.contains("not owned by user alice"),
        "{transcript}"
    );
    assert_eq!(relay.count(), 1, "only the allowed message is queued");
    wait_until(
        "the refusal in the log",
        Duration::from_secs(10),
        || {
            relay
                .log()
                .contains("sender address not owned by the authenticated user")
        },
        || relay.log(),
    );

    // A reload that lets alice use other.test too takes effect without a restart.
    std::fs::write(
        &file,
        map.replace("\"@example.test\"]", "\"@example.test\", \"@other.test\"]"),
    )
    .unwrap();
    // SAFETY: kill(2) on the relay child this test started and has not reaped.
    let rc = unsafe { libc::kill(relay.pid() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0);
    wait_until(
        "the reload",
        Duration::from_secs(10),
        || relay.log().contains("auth.sender_login"),
        || relay.log(),
    );
    let out = swaks_as_alice(&relay, "ceo@other.test", "Subject: now allowed\n\nx\n");
    assert_ok(&out, "after reload");
    assert_eq!(relay.count(), 2);
}

#[test]
fn bare_newline_normalize_stores_crlf_line_ends() {
    let relay = submission_relay(&[("bare_newline", "\"normalize\"")]);
    let mut c = relay.session();
    c.expect("EHLO raw.test", 250);
    let id = c.send_mail(
        "x@elsewhere.test",
        &["user@local.test"],
        b"Subject: bare\n\nline one\nline two\rend\r\n",
    );
    c.expect("QUIT", 221);
    let stored = relay.body(&id);
    let (_, rest) = split_received(&stored);
    assert_eq!(
        text(rest),
        "Subject: bare\r\n\r\nline one\r\nline two\r\nend\r\n"
    );

    // The default still refuses the same bytes.
    let strict = submission_relay(&[]);
    let mut c = strict.session();
    c.expect("EHLO raw.test", 250);
    c.expect("MAIL FROM:<x@elsewhere.test>", 250);
    c.expect("RCPT TO:<user@local.test>", 250);
    c.expect("DATA", 354);
    // The end of data must follow a CRLF: a bare LF does not start a line.
    c.send(b"Subject: bare\n\nline\r\n.\r\n");
    let r = c.read_reply();
    assert_eq!((r.code, r.enhanced()), (550, "5.6.0"), "{r:?}");
    assert_eq!(strict.count(), 0);
}
