//! Address rewriting, SRS, header edits and disclaimers (issue 14 item 5,
//! docs/rewrite.md) through the real binary: swaks, python smtplib and the
//! kit's client send, a scripted next hop receives, and the envelope and
//! bytes it got are checked. SRS addresses are checked with an independent
//! implementation (Debian's python3-srs, pysrs), which also signs one with
//! a secret the relay only keeps for verifying.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);
const NEW_SECRET: &str = "new-secret-0123456789";
const OLD_SECRET: &str = "old-secret-0123456789";

/// The system Python, where Debian's python3-srs lives.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Runs Python code with arguments; stdin is null (messages go through a file).
fn run_python(code: &str, args: &[&str]) -> Output {
    run_with_timeout(Command::new(python()).arg("-c").arg(code).args(args), T)
}

fn lists_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write list");
    format!("lists.{name}=\"{}\"", path.display())
}

fn wait_for_messages(hop: &ScriptedServer, n: usize, relay: &Relay) -> Vec<Received> {
    wait_until(
        "messages at the next hop",
        T,
        || hop.messages().len() >= n,
        || relay.log(),
    );
    hop.messages()
}

#[test]
fn sender_and_recipient_rewritten_by_regex_and_map_with_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (hop, sets) = routed_hop(&["far.test"]);
    let mut b = Relay::builder()
        .set("relay.local_domains=[\"local.test\"]")
        .set(lists_file(
            dir.path(),
            "aliases",
            "info@local.test bob@far.test\n@old.test @far.test\n",
        ))
        .set(
            "rewrite=[\
             {match={direction=\"outbound\"},sender={regex='^(.*)@internal\\.test$',replace='$1@snd.test'},headers=true},\
             {recipient_map=\"aliases\",headers=true}]",
        );
    for s in sets {
        b = b.set(s);
    }
    let relay = b.start();

    let out = swaks(
        &relay,
        &[
            "--from",
            "ann@internal.test",
            "--to",
            "info@local.test,carl@old.test,dora@far.test",
            "--data",
            "From: Ann <ann@internal.test>\nTo: info@local.test, carl@old.test\nCc: dora@far.test\nSubject: rewrite\n\nbody for ann@internal.test\n",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stdout));
    let msgs = wait_for_messages(&hop, 1, &relay);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let m = &msgs[0];
    assert!(m.mail.contains("<ann@snd.test>"), "{}", m.mail);
    assert_eq!(
        m.rcpt_addresses(),
        ["bob@far.test", "carl@far.test", "dora@far.test"]
    );
    let body = m.body_text();
    assert!(body.contains("From: Ann <ann@snd.test>\r\n"), "{body}");
    assert!(
        body.contains("To: bob@far.test, carl@far.test\r\n"),
        "{body}"
    );
    assert!(body.contains("Cc: dora@far.test\r\n"), "{body}");
    // Only header fields follow; the body is the sender's.
    assert!(body.contains("body for ann@internal.test"), "{body}");
    let log = relay.log();
    assert!(
        log.contains("sender rewritten") && log.contains("ann@internal.test"),
        "{log}"
    );
    assert!(log.contains("recipient rewritten"), "{log}");
}

#[test]
fn inbound_clients_are_not_rewritten_by_outbound_rules() {
    let (hop, sets) = routed_hop(&["far.test", "local.test"]);
    let mut b = Relay::builder()
        .set("relay.relay_networks=[\"10.0.0.0/8\"]")
        .set("relay.local_domains=[\"local.test\"]")
        .set(
            "rewrite=[{match={direction=\"outbound\"},sender={regex='^(.*)@internal\\.test$',replace='$1@snd.test'}}]",
        );
    for s in sets {
        b = b.set(s);
    }
    let relay = b.start();
    let mut c = relay.session();
    c.send_mail(
        "ann@internal.test",
        &["user@local.test"],
        b"Subject: in\r\n\r\nx\r\n",
    );
    c.expect("QUIT", 221);
    let msgs = wait_for_messages(&hop, 1, &relay);
    assert!(
        msgs[0].mail.contains("<ann@internal.test>"),
        "{}",
        msgs[0].mail
    );
}

/// pysrs reverses `address` with both secrets; Err is its complaint.
fn pysrs_reverse(address: &str) -> Result<String, String> {
    let out = run_python(
        "import sys, SRS\n\
         srs = SRS.new(secret=[sys.argv[2], sys.argv[3]], maxage=21, hashlength=4)\n\
         print(srs.reverse(sys.argv[1]))",
        &[address, NEW_SECRET, OLD_SECRET],
    );
    if out.status.success() {
        Ok(text(&out.stdout).trim().to_string())
    } else {
        Err(text(&out.stderr))
    }
}

#[test]
fn srs_on_forwarding_and_bounces_reversed_with_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (hop, sets) = routed_hop(&["far.test", "origin.test"]);
    // Loopback outside the relay networks: the forwarder's inbound side.
    let mut b = Relay::builder()
        .set("relay.relay_networks=[\"10.0.0.0/8\"]")
        .set("relay.local_domains=[\"local.test\",\"srs.local.test\"]")
        .set(format!(
            "srs={{domain=\"srs.local.test\",secrets=[\"{NEW_SECRET}\",\"{OLD_SECRET}\"]}}"
        ))
        .set(lists_file(
            dir.path(),
            "forwards",
            "fwd@local.test bob@far.test\n",
        ))
        .set("rewrite=[{match={direction=\"inbound\"},recipient_map=\"forwards\",srs=true}]");
    for s in sets {
        b = b.set(s);
    }
    let relay = b.start();

    // Forwarded: the foreign sender becomes an SRS0 address of ours.
    let mut c = relay.session();
    c.send_mail(
        "alice@origin.test",
        &["fwd@local.test"],
        b"Subject: fwd\r\n\r\nx\r\n",
    );
    // Mail to a local mailbox is not forwarded: no SRS.
    c.send_mail(
        "alice@origin.test",
        &["user@local.test"],
        b"Subject: local\r\n\r\nx\r\n",
    );
    let msgs = wait_for_messages(&hop, 1, &relay);
    let m = &msgs[0];
    assert_eq!(m.rcpt_addresses(), ["bob@far.test"]);
    let start = m.mail.find('<').expect("<") + 1;
    let end = m.mail.find('>').expect(">");
    let srs = m.mail[start..end].to_string();
    assert!(
        srs.starts_with("SRS0=") && srs.ends_with("=origin.test=alice@srs.local.test"),
        "{srs}"
    );
    // An independent implementation agrees.
    assert_eq!(pysrs_reverse(&srs).as_deref(), Ok("alice@origin.test"));
    let stored = relay.messages();
    assert!(
        stored
            .iter()
            .any(|e| e.to_string().contains("alice@origin.test")
                && e.to_string().contains("user@local.test")),
        "local delivery keeps the sender: {stored:?}"
    );

    // The bounce to the SRS address goes back to the original sender.
    c.expect("MAIL FROM:<>", 250);
    c.expect(&format!("RCPT TO:<{srs}>"), 250);
    // Tampered (another local part under the same hash): refused.
    let tampered = srs.replace("=alice@", "=mallory@");
    let r = c.cmd(&format!("RCPT TO:<{tampered}>"));
    assert_eq!((r.code, r.enhanced()), (550, "5.1.1"), "{r:?}");
    // Signed by pysrs with the old secret: still verifies after rotation.
    let old = run_python(
        "import sys, SRS\n\
         print(SRS.new(secret=sys.argv[1], maxage=21, hashlength=4).forward('carol@origin.test', 'srs.local.test'))",
        &[OLD_SECRET],
    );
    assert!(old.status.success(), "{}", text(&old.stderr));
    let old = text(&old.stdout).trim().to_string();
    c.expect(&format!("RCPT TO:<{old}>"), 250);
    // A secret the relay never had does not.
    let foreign = run_python(
        "import SRS\n\
         print(SRS.new(secret='someone-elses-secret', maxage=21, hashlength=4).forward('dave@origin.test', 'srs.local.test'))",
        &[],
    );
    let foreign = text(&foreign.stdout).trim().to_string();
    let r = c.cmd(&format!("RCPT TO:<{foreign}>"));
    assert_eq!(r.code, 550, "{r:?}");
    c.expect("DATA", 354);
    c.send(b"Subject: Undelivered Mail\r\n\r\nbounce\r\n.\r\n");
    assert_eq!(c.read_reply().code, 250);
    c.expect("QUIT", 221);

    let msgs = wait_for_messages(&hop, 2, &relay);
    let bounce = &msgs[1];
    assert!(bounce.mail.contains("FROM:<>"), "{}", bounce.mail);
    assert_eq!(
        bounce.rcpt_addresses(),
        ["alice@origin.test", "carol@origin.test"]
    );
    assert!(relay.log().contains("SRS recipient refused"));
}

#[test]
fn header_edits_and_a_disclaimer_in_a_multipart_message() {
    let (hop, sets) = routed_hop(&["far.test"]);
    let mut b = Relay::builder().set(
        "rewrite=[{match={direction=\"outbound\"},add_header=[\"X-Relayed: sluice\"],remove_header=[\"X-Internal\"],\
         disclaimer=\"--\\nConfidential: for the addressee only.\",disclaimer_html=\"<p>Confidential</p>\"}]",
    );
    for s in sets {
        b = b.set(s);
    }
    let relay = b.start();

    // python smtplib sends a multipart/alternative message with an attachment.
    let sent = run_python(
        "import sys, smtplib\n\
         from email.message import EmailMessage\n\
         m = EmailMessage()\n\
         m['From'] = 'ann@snd.test'; m['To'] = 'bob@far.test'; m['Subject'] = 'multi'\n\
         m['X-Internal'] = 'secret routing note'\n\
         m.set_content('Hello Bob.\\n')\n\
         m.add_alternative('<html><body><p>Hello Bob.</p></body></html>\\n', subtype='html')\n\
         m.add_attachment(b'\\x00\\x01binary', maintype='application', subtype='octet-stream', filename='a.bin')\n\
         host, port = sys.argv[1].rsplit(':', 1)\n\
         with smtplib.SMTP(host, int(port), timeout=20) as s:\n\
         \x20   s.send_message(m)\n",
        &[&relay.addr_string()],
    );
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    // A message signed elsewhere keeps its body (no disclaimer).
    let mut c = relay.session();
    c.send_mail(
        "ann@snd.test",
        &["bob@far.test"],
        b"DKIM-Signature: v=1; a=rsa-sha256; d=snd.test; s=s; bh=x; b=y\r\nSubject: signed\r\n\r\nsigned body\r\n",
    );
    c.expect("QUIT", 221);

    let msgs = wait_for_messages(&hop, 2, &relay);
    let multi = msgs
        .iter()
        .find(|m| m.body_text().contains("Subject: multi"))
        .expect("the multipart message");
    let body = multi.body_text();
    assert!(body.contains("X-Relayed: sluice\r\n"), "{body}");
    assert!(!body.contains("X-Internal"), "{body}");
    // Parsed again by Python's email package: the parts are intact, the
    // text ones end with the disclaimer, the attachment is unchanged.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("delivered.eml");
    std::fs::write(&file, &multi.body).expect("write message");
    let parsed = run_python(
        "import sys, email\n\
         from email import policy\n\
         m = email.message_from_bytes(open(sys.argv[1], 'rb').read(), policy=policy.default)\n\
         print(m.get_content_type(), m.is_multipart(), not m.defects)\n\
         for p in m.walk():\n\
         \x20   if p.is_multipart(): continue\n\
         \x20   c = p.get_content()\n\
         \x20   print(p.get_content_type(), repr(c if isinstance(c, str) else bytes(c)))\n",
        &[&file.to_string_lossy()],
    );
    assert!(parsed.status.success(), "{}", text(&parsed.stderr));
    let parsed = text(&parsed.stdout);
    assert!(
        parsed.starts_with("multipart/mixed True True\n"),
        "{parsed}"
    );
    assert!(
        parsed.contains(
            "text/plain 'Hello Bob.\\r\\n--\\r\\nConfidential: for the addressee only.\\r\\n'"
        ),
        "{parsed}"
    );
    assert!(
        parsed.contains("<p>Hello Bob.</p><p>Confidential</p></body></html>"),
        "{parsed}"
    );
    assert!(
        parsed.contains("application/octet-stream b'\\x00\\x01binary'"),
        "{parsed}"
    );
    let signed = msgs
        .iter()
        .find(|m| m.body_text().contains("Subject: signed"))
        .expect("the signed message");
    let body = signed.body_text();
    assert!(body.contains("X-Relayed: sluice\r\n"), "{body}");
    assert!(body.ends_with("\r\n\r\nsigned body\r\n"), "{body}");
}

#[test]
fn bad_rewrite_config_names_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (config, key) in [
        (
            "[[rewrite]]\nsender = { regex = '(', replace = 'x' }\n",
            "rewrite[1].sender.regex",
        ),
        (
            "[srs]\ndomain = \"srs.other.test\"\nsecrets = [\"0123456789abcdef\"]\n",
            "srs.domain",
        ),
        (
            "[[rewrite]]\nrecipient_map = \"missing\"\n",
            "rewrite[1].recipient_map",
        ),
    ] {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, config).expect("write config");
        let out = run_with_timeout(Command::new(bin()).arg("check-config").arg(&file), T);
        assert!(!out.status.success(), "{config}");
        let err = text(&out.stderr);
        assert!(err.contains(key), "{key}: {err}");
    }
}
