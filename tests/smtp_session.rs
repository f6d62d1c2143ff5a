//! End-to-end SMTP sessions against the real relay: swaks, smtplib and raw sockets.
//! What is sent is compared byte for byte with what `sluice queue body` returns.

use sluice_testkit::*;
use std::time::Duration;

#[test]
fn swaks_message_is_queued_with_its_envelope() {
    let relay = Relay::start(&[]);
    let out = swaks(
        &relay,
        &[
            "--from",
            "sender@example.test",
            "--to",
            "rcpt1@example.test,rcpt2@example.net",
            "--header",
            "Subject: swaks e2e",
            "--body",
            "swaks body line",
        ],
    );
    assert_ok(&out, "swaks");
    let ids = swaks_ids(&out);
    assert_eq!(
        ids.len(),
        1,
        "one queued id expected in:\n{}",
        text(&out.stdout)
    );
    let id = &ids[0];

    let list = relay.list();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(&list[0].id, id);
    assert_eq!(list[0].sender, "sender@example.test");
    assert_eq!(
        list[0].recipients,
        vec!["rcpt1@example.test", "rcpt2@example.net"]
    );

    let body = relay.body(id);
    let (header, rest) = split_received(&body);
    let header = text(header);
    assert!(
        header.contains("swaks.test"),
        "HELO name missing from {header:?}"
    );
    assert!(
        header.contains("[127.0.0.1]"),
        "client IP missing from {header:?}"
    );
    let rest = text(rest);
    assert!(rest.contains("Subject: swaks e2e\r\n"), "{rest:?}");
    assert!(rest.contains("\r\n\r\nswaks body line\r\n"), "{rest:?}");
    assert_eq!(
        list[0].size,
        body.len() as u64,
        "listed size is the stored size"
    );
}

#[test]
fn raw_message_is_byte_exact_with_dot_stuffing_8bit_smtputf8_and_dsn() {
    let relay = Relay::start(&[]);
    let mut c = relay.session();
    let ehlo = c.cmd("EHLO raw.test");
    for ext in [
        "PIPELINING",
        "8BITMIME",
        "SMTPUTF8",
        "CHUNKING",
        "DSN",
        "ENHANCEDSTATUSCODES",
    ] {
        assert!(ehlo.has_line_starting(ext), "EHLO lacks {ext}: {ehlo:?}");
    }
    assert!(ehlo.has_line_starting("SIZE "), "EHLO lacks SIZE: {ehlo:?}");

    c.expect(
        "MAIL FROM:<s\u{e9}nder@ex\u{e4}mple.test> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=abc",
        250,
    );
    c.expect(
        "RCPT TO:<r\u{fc}cpt@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y",
        250,
    );
    c.expect("RCPT TO:<plain@example.test>", 250);
    c.expect("DATA", 354);

    // What the client means (unstuffed) and what goes on the wire (stuffed).
    let mut meant: Vec<u8> = Vec::new();
    meant.extend_from_slice(
        b"From: =?utf-8?q?S=C3=A9nder?= <s\xc3\xa9nder@ex\xc3\xa4mple.test>\r\n",
    );
    meant.extend_from_slice(b"Subject: byte exact\r\n");
    meant.extend_from_slice(b"\r\n");
    meant.extend_from_slice(b".a line that starts with a dot\r\n");
    meant.extend_from_slice(b"..two dots\r\n");
    meant.extend_from_slice(b". <- a dot and a space; a lone dot line follows\r\n");
    meant.extend_from_slice(b".\r\n");
    meant.extend_from_slice(b"8-bit: caf\xc3\xa9 \xff\xfe\x80 raw bytes\r\n");
    meant.extend_from_slice(b"tab\there, trailing space \r\n");
    meant.extend_from_slice(b"\r\n");
    meant.extend_from_slice(b"last line\r\n");
    let mut wire = Vec::new();
    for line in meant.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    assert_ne!(wire, meant, "the test body must need dot-stuffing");
    c.send(&wire);
    c.send(b".\r\n");
    let r = c.read_reply();
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(r.enhanced(), "2.0.0", "{r:?}");
    let id = queued_id(&r.text()).expect("queued id");
    c.expect("QUIT", 221);

    let stored = relay.body(&id);
    assert_stored_exact(&stored, &meant, &id);

    let show = relay.show(&id);
    assert_eq!(
        show_field(&show, "sender"),
        "<s\u{e9}nder@ex\u{e4}mple.test>"
    );
    let rcpts = show_lines(&show, "recipient:");
    assert_eq!(rcpts.len(), 2, "{show}");
    let first = rcpts[0];
    assert!(
        first.starts_with("recipient: <r\u{fc}cpt@example.test>"),
        "{first}"
    );
    let orcpt = first
        .split_whitespace()
        .find_map(|w| w.strip_prefix("orcpt="))
        .unwrap_or_else(|| panic!("no orcpt= in {first:?}"));
    assert!(
        orcpt.ends_with("x@y") && orcpt.to_ascii_lowercase().contains("rfc822"),
        "orcpt: {orcpt:?}"
    );
    let notify = first
        .split_once("notify=")
        .map(|(_, n)| n)
        .unwrap_or_else(|| panic!("no notify= in {first:?}"));
    assert!(
        notify_is_success_failure(notify),
        "notify should be SUCCESS,FAILURE: {first:?}"
    );
    assert!(
        !rcpts[1].contains("notify=") && !rcpts[1].contains("orcpt="),
        "{}",
        rcpts[1]
    );
    assert_eq!(
        show_field(&show, "ret").to_ascii_lowercase(),
        "headers",
        "{show}"
    );
    assert_eq!(show_field(&show, "envid"), "abc");
    assert_eq!(show_field(&show, "smtputf8"), "true");
    let body_type = show_field(&show, "body_type").to_ascii_lowercase();
    assert!(
        body_type.contains("8bit") || body_type.contains("eightbit"),
        "{show}"
    );
    assert_eq!(show_field(&show, "client_ip"), "127.0.0.1");
    assert_eq!(show_field(&show, "helo"), "raw.test");
    assert_eq!(show_field(&show, "size"), stored.len().to_string());
}

/// `notify=` as printed by `queue show`: flag names, or the bit set SUCCESS|FAILURE = 3.
fn notify_is_success_failure(notify: &str) -> bool {
    let n = notify
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    if n.contains("SUCCESS") || n.contains("FAILURE") {
        return n.contains("SUCCESS")
            && n.contains("FAILURE")
            && !n.contains("DELAY")
            && !n.contains("NEVER");
    }
    let digits: String = n.chars().filter(char::is_ascii_digit).collect();
    digits == "3"
}

#[test]
fn pipelined_mail_rcpt_rcpt_data_in_one_write() {
    let relay = Relay::start(&[]);
    let mut c = relay.greeted();
    let ehlo = c.cmd("EHLO pipe.test");
    assert!(ehlo.has_line_starting("PIPELINING"), "{ehlo:?}");
    c.send(b"MAIL FROM:<pipe@example.test>\r\nRCPT TO:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
    let codes: Vec<u16> = (0..4).map(|_| c.read_reply().code).collect();
    assert_eq!(codes, vec![250, 250, 250, 354]);
    let body = b"Subject: pipelined\r\n\r\nbody\r\n";
    c.send(body);
    // The end of data and the next commands in one write too.
    c.send(b".\r\nNOOP\r\nQUIT\r\n");
    let r = c.read_reply();
    assert_eq!(r.code, 250, "{r:?}");
    let id = queued_id(&r.text()).expect("id");
    assert_eq!(c.read_reply().code, 250, "NOOP");
    assert_eq!(c.read_reply().code, 221, "QUIT");
    c.expect_closed();

    let list = relay.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, id);
    assert_eq!(list[0].recipients, vec!["a@example.test", "b@example.test"]);
    assert_stored_exact(&relay.body(&id), body, &id);
}

#[test]
fn bdat_chunks_are_stored_byte_exact() {
    let relay = Relay::start(&[]);
    let mut c = relay.session();

    // Chunked: three chunks, the last one "BDAT n LAST". BDAT data is not
    // dot-stuffed: "\r\n.\r\n" and leading dots are message bytes.
    let chunks: [&[u8]; 3] = [
        b"Subject: bdat\r\n\r\nfirst chunk\r\n",
        b".not stuffed\r\n.\r\nstill the body, 8-bit \xe2\x82\xac\r\n",
        b"..end\r\n",
    ];
    c.expect("MAIL FROM:<bdat@example.test> BODY=8BITMIME", 250);
    c.expect("RCPT TO:<r@example.test>", 250);
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let cmd = format!(
            "BDAT {}{}\r\n",
            chunk.len(),
            if last { " LAST" } else { "" }
        );
        c.send(cmd.as_bytes());
        c.send(chunk);
        let r = c.read_reply();
        assert_eq!(r.code, 250, "chunk {i}: {r:?}");
        if last {
            let id = queued_id(&r.text()).expect("queued id after BDAT LAST");
            let want: Vec<u8> = chunks.concat();
            assert_stored_exact(&relay.body(&id), &want, &id);
        } else {
            assert!(
                queued_id(&r.text()).is_none(),
                "not queued before LAST: {r:?}"
            );
        }
    }

    // A chunk, then an empty "BDAT 0 LAST".
    c.expect("MAIL FROM:<bdat0@example.test>", 250);
    c.expect("RCPT TO:<r@example.test>", 250);
    c.send(b"BDAT 12\r\nSubject: z\r\n");
    assert_eq!(c.read_reply().code, 250);
    let r = c.expect("BDAT 0 LAST", 250);
    let id0 = queued_id(&r.text()).expect("id");
    assert_stored_exact(&relay.body(&id0), b"Subject: z\r\n", &id0);

    // Pipelined: MAIL, RCPT and BDAT LAST with its data in one write.
    let data = b"Subject: pipelined bdat\r\n\r\nall in one write\r\n";
    let mut one = Vec::new();
    one.extend_from_slice(b"MAIL FROM:<p@example.test>\r\nRCPT TO:<q@example.test>\r\n");
    one.extend_from_slice(format!("BDAT {} LAST\r\n", data.len()).as_bytes());
    one.extend_from_slice(data);
    one.extend_from_slice(b"QUIT\r\n");
    c.send(&one);
    assert_eq!(c.read_reply().code, 250, "MAIL");
    assert_eq!(c.read_reply().code, 250, "RCPT");
    let r = c.read_reply();
    assert_eq!(r.code, 250, "BDAT LAST: {r:?}");
    let id2 = queued_id(&r.text()).expect("id");
    assert_eq!(c.read_reply().code, 221);
    c.expect_closed();
    assert_stored_exact(&relay.body(&id2), data, &id2);
    let list = relay.list();
    assert_eq!(list.len(), 3, "{list:?}");
    let p = list
        .iter()
        .find(|e| e.id == id2)
        .expect("pipelined message listed");
    assert_eq!(p.sender, "p@example.test");
    assert_eq!(p.recipients, vec!["q@example.test"]);
}

#[test]
fn many_transactions_on_one_connection_with_rset() {
    let relay = Relay::start(&[]);
    let mut c = relay.session();
    let mut ids = Vec::new();
    for i in 0..6 {
        if i == 3 {
            // An abandoned transaction: RSET throws it away.
            c.expect("MAIL FROM:<abandoned@example.test>", 250);
            c.expect("RCPT TO:<nobody@example.test>", 250);
            c.expect("RSET", 250);
            // After RSET there is no transaction: RCPT is out of sequence.
            c.expect("RCPT TO:<nobody@example.test>", 503);
        }
        let body = format!("Subject: message {i}\r\n\r\nbody of message {i}\r\n");
        let id = c.send_mail(
            &format!("s{i}@example.test"),
            &[&format!("r{i}@example.test")],
            body.as_bytes(),
        );
        c.expect("RSET", 250);
        ids.push((id, body));
    }
    c.expect("QUIT", 221);

    let mut unique: Vec<&String> = ids.iter().map(|(id, _)| id).collect();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 6, "ids must be distinct: {ids:?}");
    let list = relay.list();
    assert_eq!(
        list.len(),
        6,
        "the abandoned transaction must not be stored: {list:?}"
    );
    assert!(list.iter().all(|e| e.sender != "abandoned@example.test"));
    for (i, (id, body)) in ids.iter().enumerate() {
        assert_stored_exact(&relay.body(id), body.as_bytes(), id);
        let e = list.iter().find(|e| &e.id == id).expect("listed");
        assert_eq!(e.sender, format!("s{i}@example.test"));
        assert_eq!(e.recipients, vec![format!("r{i}@example.test")]);
    }
}

#[test]
fn smtplib_send_message() {
    let relay = Relay::start(&[]);
    let out = python(
        "send_message.py",
        &["127.0.0.1", &relay.port.to_string()],
        Duration::from_secs(30),
    );
    assert_ok(&out, "send_message.py");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["refused"], serde_json::json!({}), "{v}");
    let features: Vec<&str> = v["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for f in [
        "pipelining",
        "8bitmime",
        "smtputf8",
        "size",
        "chunking",
        "dsn",
    ] {
        assert!(
            features.contains(&f),
            "smtplib did not see {f}: {features:?}"
        );
    }

    let list = relay.list();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].sender, "alice@example.test");
    assert_eq!(
        list[0].recipients,
        vec!["bob@example.test", "carol@example.test"]
    );
    let body = relay.body(&list[0].id);
    let (_, rest) = split_received(&body);
    let rest = text(rest);
    assert!(
        rest.contains("Subject: smtplib send_message\r\n"),
        "{rest:?}"
    );
    // smtplib dot-stuffed this line; the relay must have removed the stuffing.
    assert!(rest.contains("\r\n.leading dot line\r\n"), "{rest:?}");
    assert!(rest.ends_with("Bye.\r\n"), "{rest:?}");
}

#[test]
fn help_vrfy_noop_quit() {
    let relay = Relay::start(&[]);
    let mut c = relay.greeted();
    // These work before EHLO too.
    let r = c.expect("NOOP", 250);
    assert_eq!(r.enhanced(), "2.0.0");
    c.expect("EHLO cmds.test", 250);
    let r = c.expect("HELP", 214);
    assert!(r.text().contains("MAIL"), "{r:?}");
    let r = c.expect("VRFY postmaster", 252);
    assert_eq!(r.enhanced(), "2.5.0");
    c.expect("NOOP", 250);
    c.expect("RSET", 250);
    let r = c.expect("QUIT", 221);
    assert_eq!(r.enhanced(), "2.0.0");
    c.expect_closed();
    assert_eq!(relay.count(), 0);
}

#[test]
fn helo_session_works_without_extensions() {
    let relay = Relay::start(&[]);
    let mut c = relay.greeted();
    let r = c.expect("HELO old.test", 250);
    assert_eq!(r.lines.len(), 1, "HELO gets a one-line reply: {r:?}");
    let id = c.send_mail(
        "old@example.test",
        &["r@example.test"],
        b"Subject: helo\r\n\r\nx\r\n",
    );
    c.expect("QUIT", 221);
    let stored = relay.body(&id);
    let (header, rest) = split_received(&stored);
    assert!(text(header).contains("with SMTP"), "{:?}", text(header));
    assert_eq!(rest, b"Subject: helo\r\n\r\nx\r\n");
}

#[test]
fn data_survives_any_split_across_writes() {
    let relay = Relay::start(&[]);
    let mut c = relay.session();
    let meant: &[u8] = b"Subject: split\r\n\r\n.dot\r\nend\r\n";
    let wire: &[u8] = b"Subject: split\r\n\r\n..dot\r\nend\r\n.\r\n";
    // Every split point, including inside CRLF, inside "..", and inside the final CRLF.CRLF.
    for cut in 1..wire.len() {
        c.expect("MAIL FROM:<split@example.test>", 250);
        c.expect("RCPT TO:<r@example.test>", 250);
        c.expect("DATA", 354);
        c.send(&wire[..cut]);
        c.send(&wire[cut..]);
        let r = c.read_reply();
        assert_eq!(r.code, 250, "cut at {cut}: {r:?}");
        let id = queued_id(&r.text()).unwrap();
        assert_stored_exact(&relay.body(&id), meant, &id);
    }
    c.expect("QUIT", 221);
    assert_eq!(relay.count(), wire.len() - 1);
}

#[test]
fn implicit_tls_listener_with_swaks_tlsc() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(dir.path());
    let tls_port = free_port();
    let cert = format!("\"{}\"", cert.display());
    let key = format!("\"{}\"", key.display());
    let relay = Relay::builder()
        .dir(dir)
        .set(format!(
            "server.listener.smtps.bind=[\"127.0.0.1:{tls_port}\"]"
        ))
        .set("server.listener.smtps.tls=\"implicit\"")
        .set(format!("server.listener.smtps.tls_cert={cert}"))
        .set(format!("server.listener.smtps.tls_key={key}"))
        .start();
    // The plain listener has no STARTTLS (tls = none).
    let mut c = relay.session();
    let ehlo = c.cmd("EHLO plain.test");
    assert!(!ehlo.has_line_starting("STARTTLS"), "{ehlo:?}");
    let r = c.cmd("STARTTLS");
    assert_eq!(r.code, 502, "{r:?}");
    c.expect("QUIT", 221);

    // swaks with TLS on connect to the implicit listener.
    let out = run_with_timeout(
        std::process::Command::new("swaks")
            .args([
                "--server",
                &format!("127.0.0.1:{tls_port}"),
                "--tlsc",
                "--timeout",
                "10",
            ])
            .args([
                "--helo",
                "tlsc.test",
                "--from",
                "a@example.test",
                "--to",
                "b@example.test",
            ]),
        Duration::from_secs(30),
    );
    assert_ok(&out, "swaks --tlsc");
    let ids = swaks_ids(&out);
    assert_eq!(ids.len(), 1, "{}", text(&out.stdout));
    let show = relay.show(&ids[0]);
    assert_eq!(show_field(&show, "listener"), "smtps");
    assert!(show_field(&show, "tls").starts_with("TLS"), "{show}");
    let body = relay.body(&ids[0]);
    let header = text(split_received(&body).0);
    assert!(header.contains("with ESMTPS"), "{header:?}");
    assert!(header.contains("(using TLS"), "{header:?}");
}

#[test]
fn hostname_is_used_in_greeting_ehlo_and_received() {
    let relay = Relay::builder()
        .set("server.hostname=\"mx.example.test\"")
        .lset("greeting", "\"ESMTP ready\"")
        .start();
    let mut c = relay.connect();
    let g = c.read_reply();
    assert_eq!(g.lines, vec!["220 mx.example.test ESMTP ready"]);
    let ehlo = c.expect("EHLO host.test", 250);
    assert!(ehlo.lines[0].starts_with("250-mx.example.test"), "{ehlo:?}");
    let id = c.send_mail(
        "a@example.test",
        &["b@example.test"],
        b"Subject: h\r\n\r\nx\r\n",
    );
    let r = c.expect("QUIT", 221);
    assert!(r.text().contains("mx.example.test"), "{r:?}");
    let header = text(split_received(&relay.body(&id)).0);
    assert!(header.contains("by mx.example.test"), "{header:?}");
    assert!(header.contains("for <b@example.test>"), "{header:?}");
}
