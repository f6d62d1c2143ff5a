//! Delivery end to end: the real relay relays to Postfix's smtp-sink (a server
//! nobody here wrote) over a configured route; the sink's dump files show what
//! arrived on the wire, and the relay's spool shows what is left.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_testkit::*;

/// Postfix's smtp-sink on a loopback port, dumping each message to `dir`.
struct Sink {
    guard: ChildGuard,
    port: u16,
    dir: PathBuf,
}

impl Sink {
    fn start(dir: &Path, extra: &[&str]) -> Sink {
        Sink::start_on(dir, free_port(), extra)
    }

    fn start_on(dir: &Path, port: u16, extra: &[&str]) -> Sink {
        std::fs::create_dir_all(dir).expect("sink dir");
        let template = format!("{}/msg-", dir.display());
        let mut cmd = Command::new("smtp-sink");
        cmd.args(["-u", "root", "-d", &template])
            .args(extra)
            .arg(format!("127.0.0.1:{port}"))
            .arg("64");
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd
            .spawn()
            .expect("smtp-sink (Debian package postfix) must be installed");
        let guard = ChildGuard::new(child, "smtp-sink");
        // Ready when it greets.
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let mut c = Client::from_stream(s);
                if c.read_line().starts_with("220") {
                    c.send_line("QUIT");
                    break;
                }
            }
            assert!(Instant::now() < until, "smtp-sink did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Sink {
            guard,
            port,
            dir: dir.to_path_buf(),
        }
    }

    /// Dumped messages (each file: smtp-sink's envelope lines, then the message).
    fn messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                if let Ok(b) = std::fs::read(e.path()) {
                    out.push(String::from_utf8_lossy(&b).into_owned());
                }
            }
        }
        out
    }

    fn stop(mut self) {
        self.guard.kill();
    }
}

/// Polls `cond` until true or the deadline passes.
fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn relay_to(port: u16, extra: &[&str]) -> Relay {
    let mut b = Relay::builder()
        .cores(2)
        .set("delivery.enabled=true")
        .set(format!(
            "route.default={{type=\"relay\",host=\"127.0.0.1\",port={port},tls=\"none\"}}"
        ))
        .set("queue.default.retry=[\"1s\"]");
    for e in extra {
        b = b.set(*e);
    }
    b.start()
}

fn send(relay: &Relay, from: &str, to: &[&str], body: &str) -> String {
    let mut c = relay.session();
    c.send_line(&format!("MAIL FROM:<{from}>"));
    assert!(c.read_reply().code == 250);
    for r in to {
        c.send_line(&format!("RCPT TO:<{r}>"));
        assert_eq!(c.read_reply().code, 250);
    }
    c.send_line("DATA");
    assert_eq!(c.read_reply().code, 354);
    c.send(body.as_bytes());
    c.send(b".\r\n");
    let reply = c.read_reply();
    assert_eq!(reply.code, 250, "{}", reply.text());
    let text = reply.text();
    let id = text.rsplit(' ').next().expect("id").trim().to_string();
    c.send_line("QUIT");
    id
}

#[test]
fn relays_to_smart_host_and_empties_the_spool() {
    let tmp = tempfile::tempdir().expect("tmp");
    let sink = Sink::start(&tmp.path().join("sink"), &[]);
    let relay = relay_to(sink.port, &[]);
    let body = "Subject: hello\r\nX-Test: 1\r\n\r\nline one\r\n..dotted line\r\nlast\r\n";
    let id = send(
        &relay,
        "alice@example.org",
        &["bob@example.com", "carol@example.net"],
        body,
    );
    wait_for(
        "the sink to get the message",
        Duration::from_secs(20),
        || !sink.messages().is_empty(),
    );
    wait_for("the spool to empty", Duration::from_secs(20), || {
        relay.count() == 0
    });
    let msgs = sink.messages();
    assert_eq!(
        msgs.len(),
        1,
        "one transaction for both recipients of one site"
    );
    let m = &msgs[0];
    assert!(
        m.contains("bob@example.com") && m.contains("carol@example.net"),
        "{m}"
    );
    // The message arrived with our Received header and the body un-stuffed once
    // by the sink: exactly what the client sent.
    assert!(m.contains(&format!("with ESMTP id {id}")), "{m}");
    assert!(
        m.contains("line one\r\n.dotted line\r\nlast\r\n")
            || m.contains("line one\n.dotted line\nlast\n"),
        "{m}"
    );
    let log = relay.log();
    assert!(
        log.contains("delivery attempt") && log.contains("delivered"),
        "{log}"
    );
    sink.stop();
}

#[test]
fn temporary_failure_is_retried_until_it_succeeds() {
    let tmp = tempfile::tempdir().expect("tmp");
    // First the next hop refuses RCPT with 4xx.
    let port = free_port();
    let sink = Sink::start_on(&tmp.path().join("a"), port, &["-r", "RCPT"]);
    let relay = relay_to(port, &[]);
    let id = send(
        &relay,
        "alice@example.org",
        &["bob@example.com"],
        "Subject: retry\r\n\r\nbody\r\n",
    );
    wait_for("a deferral", Duration::from_secs(20), || {
        relay.show(&id).contains("deferred")
    });
    assert_eq!(relay.count(), 1, "a deferred message stays queued");
    sink.stop();
    // Now it accepts; the 1s retry schedule brings the message there.
    let sink = Sink::start_on(&tmp.path().join("b"), port, &[]);
    wait_for("delivery on retry", Duration::from_secs(30), || {
        relay.count() == 0
    });
    assert_eq!(sink.messages().len(), 1);
    sink.stop();
}

#[test]
fn permanent_failure_bounces_to_the_sender_with_a_valid_dsn() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Recipients at example.com go to a sink that rejects RCPT with 5xx; the
    // bounce (to the sender at example.org) goes to a second, accepting sink.
    let rejecting = Sink::start(&tmp.path().join("reject"), &["-f", "RCPT"]);
    let accepting = Sink::start(&tmp.path().join("accept"), &[]);
    let relay = Relay::builder()
        .cores(2)
        .set("delivery.enabled=true")
        .set(format!("route.reject={{type=\"relay\",host=\"127.0.0.1\",port={},tls=\"none\"}}", rejecting.port))
        .set(format!("route.accept={{type=\"relay\",host=\"127.0.0.1\",port={},tls=\"none\"}}", accepting.port))
        .set("rule=[{match={recipient_domain=[\"example.com\"]},route=\"reject\"},{route=\"accept\"}]")
        .start();
    let id = send(
        &relay,
        "alice@example.org",
        &["bob@example.com"],
        "Subject: will bounce\r\nMessage-ID: <orig@example.org>\r\n\r\nbody\r\n",
    );
    wait_for(
        "the bounce at the sender's sink",
        Duration::from_secs(20),
        || !accepting.messages().is_empty(),
    );
    wait_for("the spool to empty", Duration::from_secs(20), || {
        relay.count() == 0
    });
    let dsn = accepting.messages().remove(0);
    // Parse it with Python's email package: a multipart/report naming the recipient.
    let start = dsn
        .find("Received:")
        .or_else(|| dsn.find("From:"))
        .unwrap_or(0);
    let path = tmp.path().join("dsn.eml");
    std::fs::write(&path, &dsn[start..]).expect("write dsn");
    let check = r#"
import sys, email
from email import policy
m = email.message_from_bytes(open(sys.argv[1], 'rb').read(), policy=policy.default)
assert m.get_content_type() == 'multipart/report', m.get_content_type()
assert m.get_param('report-type') == 'delivery-status'
parts = list(m.iter_parts())
ds = [p for p in parts if p.get_content_type() == 'message/delivery-status'][0]
text = ds.as_string()
assert 'Final-Recipient: rfc822;bob@example.com' in text.replace('; ', ';'), text
assert 'Action: failed' in text, text
assert 'Status: 5.' in text, text
print('ok')
"#;
    let out = python_inline(check, &[path.to_str().expect("utf8")]);
    assert!(
        text(&out.stdout).contains("ok"),
        "{}\n{}",
        text(&out.stderr),
        dsn
    );
    assert!(
        dsn.contains("MAIL FROM:<>") || dsn.contains("X-Mail-Args: ") || dsn.contains("<>"),
        "bounce has a null sender: {dsn}"
    );
    let _ = id;
    rejecting.stop();
    accepting.stop();
}

#[test]
fn queued_mail_survives_sigkill_and_is_delivered_after_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let port = free_port();
    // No sink yet: delivery defers.
    let mut relay = relay_to(port, &["queue.default.retry=[\"1s\"]"]);
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(send(
            &relay,
            "alice@example.org",
            &["bob@example.com"],
            &format!("Subject: m{i}\r\n\r\nbody {i}\r\n"),
        ));
    }
    relay.kill9();
    relay.restart();
    assert_eq!(relay.count(), 20);
    let sink = Sink::start_on(&tmp.path().join("s"), port, &[]);
    wait_for("all delivered", Duration::from_secs(30), || {
        relay.count() == 0
    });
    let msgs = sink.messages();
    for id in &ids {
        assert_eq!(
            msgs.iter().filter(|m| m.contains(id.as_str())).count(),
            1,
            "message {id} delivered exactly once"
        );
    }
    sink.stop();
}

fn python_inline(code: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(code).args(args);
    run_with_timeout(&mut cmd, Duration::from_secs(30))
}
