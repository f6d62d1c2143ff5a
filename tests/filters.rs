//! Programmable policy at the SMTP stages (issue 14) against the real binary:
//! built-in stage rules and Sieve scripts refuse at connect, EHLO, MAIL, RCPT
//! and DATA with their own replies (seen by Python's smtplib, swaks and a raw
//! pipelining client); a script stuck in a loop is stopped by the instruction
//! limit; discard, quarantine, editheader and redirect are checked on what
//! the next hop (the kit's scripted SMTP server) receives, and a quarantined
//! message is delivered once released through the API/CLI; a Sieve compile
//! error stops `sluice check-config` with the script's file and line.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);
const TOKEN: &str = "filters-test-token-0123456789abcdef";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write script");
    path
}

const RCPT_SCRIPT: &str = r#"require ["envelope", "reject", "ereject", "variables", "vnd.stalwart.while"];
if envelope :localpart "to" "nobody" { reject "No such user here"; stop; }
if envelope :localpart "to" "busy" { ereject "451 4.2.1 Mailbox busy, try later"; stop; }
if envelope :localpart "to" "loop" {
    set "i" "x";
    while "true" { set "i" "${i}"; }
}
"#;

const DATA_SCRIPT: &str = r#"require ["editheader", "fileinto", "reject", "variables", "envelope"];
if header :contains "Subject" "REJECTME" { reject "554 5.7.1 Content refused by policy"; stop; }
if header :contains "Subject" "DISCARDME" { discard; stop; }
if header :contains "Subject" "HOLDME" { fileinto "Quarantine"; stop; }
if header :contains "Subject" "REDIRECTME" { redirect "archive@far.test"; }
deleteheader "X-Internal";
addheader "X-Sieve-Checked" "yes from ${env.remote_ip}";
"#;

/// A relay whose smtp listener runs stage rules and the two scripts above.
fn filtering_relay(dir: tempfile::TempDir, extra: &[String]) -> Relay {
    let rcpt = write(dir.path(), "rcpt.sieve", RCPT_SCRIPT);
    let data = write(dir.path(), "data.sieve", DATA_SCRIPT);
    let mut b = Relay::builder()
        .lset(
            "sieve",
            &format!(
                "{{rcpt=\"{}\",data=\"{}\",max_instructions=5000}}",
                rcpt.display(),
                data.display()
            ),
        )
        .lset(
            "filter_rule",
            "[{stage=\"connect\",client_ip=\"127.0.0.9/32\",action=\"reject\",reply=\"554 5.7.1 Not from this network\"},\
              {stage=\"ehlo\",helo=\"*.bad.test\",action=\"tempfail\",reply=\"450 4.7.1 HELO not welcome\"},\
              {stage=\"mail\",sender=\"blocked@*\",action=\"reject\",reply=\"553 5.7.1 Sender blocked by rule\"},\
              {stage=\"rcpt\",recipient=\"drop@far.test\",action=\"discard\"}]",
        )
        .dir(dir);
    for s in extra {
        b = b.set(s.clone());
    }
    b.start()
}

fn session(relay: &Relay, helo: &str, from: &str, rcpts: &[&str], subject: &str) -> Value {
    let addr = relay.addr();
    let out = python(
        "filter_session.py",
        &[
            &addr.ip().to_string(),
            &addr.port().to_string(),
            helo,
            from,
            &rcpts.join(","),
            subject,
        ],
        T,
    );
    assert_ok(&out, "filter_session.py");
    serde_json::from_slice(&out.stdout).expect("json")
}

fn reply(v: &Value) -> (u64, String) {
    (
        v[0].as_u64().unwrap_or(0),
        v[1].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn each_stage_refuses_with_the_filter_reply() {
    let relay = filtering_relay(tempfile::tempdir().expect("tempdir"), &[]);

    // connect: the rule's reply instead of the greeting, then the end.
    let mut c = Client::connect_from(Ipv4Addr::new(127, 0, 0, 9), relay.addr());
    let greeting = c.read_reply();
    assert_eq!(greeting.last(), "554 5.7.1 Not from this network");
    c.expect_closed();

    // EHLO (smtplib): the rule's 450.
    let v = session(&relay, "mx.bad.test", "a@snd.test", &["b@far.test"], "x");
    assert_eq!(reply(&v["ehlo"]), (450, "4.7.1 HELO not welcome".into()));

    // MAIL (smtplib): the rule's 553.
    let v = session(&relay, "ok.test", "blocked@snd.test", &["b@far.test"], "x");
    assert_eq!(
        reply(&v["mail"]),
        (553, "5.7.1 Sender blocked by rule".into())
    );

    // RCPT (smtplib): Sieve reject and ereject with its own code.
    let v = session(
        &relay,
        "ok.test",
        "a@snd.test",
        &["nobody@far.test", "busy@far.test", "b@far.test"],
        "x",
    );
    assert_eq!(
        reply(&v["rcpt"]["nobody@far.test"]),
        (550, "5.7.1 No such user here".into())
    );
    assert_eq!(
        reply(&v["rcpt"]["busy@far.test"]),
        (451, "4.2.1 Mailbox busy, try later".into())
    );
    assert_eq!(reply(&v["rcpt"]["b@far.test"]).0, 250);
    assert_eq!(reply(&v["data"]).0, 250);

    // DATA (swaks): the script's 554 after the body.
    let out = swaks(
        &relay,
        &[
            "--from",
            "a@snd.test",
            "--to",
            "b@far.test",
            "--header",
            "Subject: please REJECTME",
        ],
    );
    let transcript = text(&out.stdout);
    assert!(
        transcript.contains("<** 554 5.7.1 Content refused by policy"),
        "{transcript}"
    );

    // A script that loops is stopped by max_instructions: 451 (on_failure
    // "tempfail", the default), and the session goes on.
    let v = session(&relay, "ok.test", "a@snd.test", &["loop@far.test"], "x");
    assert_eq!(
        reply(&v["rcpt"]["loop@far.test"]),
        (
            451,
            "4.3.0 Error: policy check failed, try again later".into()
        )
    );
    assert!(
        relay.log().contains("instruction limit reached"),
        "{}",
        relay.log()
    );

    // PIPELINING: the replies come in command order though RCPT waits for Sieve.
    let mut c = relay.greeted();
    c.expect("EHLO pipe.test", 250);
    c.send(
        b"MAIL FROM:<a@snd.test>\r\nRCPT TO:<nobody@far.test>\r\nRCPT TO:<b@far.test>\r\n\
RCPT TO:<busy@far.test>\r\nRSET\r\n",
    );
    let codes: Vec<String> = (0..5).map(|_| c.read_reply().last().to_string()).collect();
    assert_eq!(
        codes,
        [
            "250 2.1.0 Ok",
            "550 5.7.1 No such user here",
            "250 2.1.5 Ok",
            "451 4.2.1 Mailbox busy, try later",
            "250 2.0.0 Ok"
        ]
    );
    // Nothing was queued but the one smtplib message.
    assert_eq!(relay.count(), 1);
}

/// The next hop for far.test.
fn hop(addr: SocketAddr) -> ScriptedServer {
    ScriptedServer::builder()
        .name("hop.far.test")
        .capability("8BITMIME")
        .start(addr)
}

fn cli(relay: &Relay, token: &Path, args: &[&str]) -> String {
    let api = format!("http://127.0.0.1:{}", relay.admin_port);
    let tf = token.display().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--api", &api, "--token-file", &tf]);
    let out = sluice(&all);
    assert_ok(&out, &format!("sluice {args:?}"));
    text(&out.stdout)
}

#[test]
fn discard_quarantine_and_modifications_reach_the_next_hop() {
    let ip = loopback();
    let port = std::net::TcpListener::bind((ip, 0))
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let hop = hop(SocketAddr::new(ip.into(), port));
    let dir = tempfile::tempdir().expect("tempdir");
    let token = write(dir.path(), "api.token", &format!("{TOKEN}\n"));
    let relay = filtering_relay(
        dir,
        &[
            "delivery.enabled=true".into(),
            "queue.default.retry=[\"1s\"]".into(),
            format!("admin.token_file=\"{}\"", token.display()),
            format!("route.hop={{type=\"relay\",host=\"{ip}\",port={port},tls=\"none\"}}"),
            "rule=[{match={recipient_domain=[\"far.test\"]},route=\"hop\"}]".into(),
        ],
    );

    // Quarantined at DATA: accepted, held.
    let v = session(
        &relay,
        "ok.test",
        "a@snd.test",
        &["held@far.test"],
        "HOLDME",
    );
    let (code, text_held) = reply(&v["data"]);
    assert_eq!(code, 250, "{text_held}");
    let held_id = queued_id(&text_held).expect("queued id");
    // Discarded at DATA and (every recipient) at RCPT: 250, never stored.
    let v = session(
        &relay,
        "ok.test",
        "a@snd.test",
        &["gone@far.test"],
        "DISCARDME",
    );
    assert_eq!(reply(&v["data"]).0, 250);
    let v = session(&relay, "ok.test", "a@snd.test", &["drop@far.test"], "plain");
    assert_eq!(reply(&v["rcpt"]["drop@far.test"]).0, 250);
    assert_eq!(reply(&v["data"]).0, 250);
    // One recipient discarded at RCPT, the other delivered with the edits.
    let v = session(
        &relay,
        "ok.test",
        "a@snd.test",
        &["drop@far.test", "bob@far.test"],
        "edited",
    );
    assert_eq!(reply(&v["data"]).0, 250);
    // Redirected at DATA.
    let v = session(
        &relay,
        "ok.test",
        "a@snd.test",
        &["carol@far.test"],
        "REDIRECTME",
    );
    assert_eq!(reply(&v["data"]).0, 250);

    wait_until(
        "two deliveries",
        T,
        || hop.messages().len() >= 2,
        || relay.log(),
    );
    let msgs = hop.messages();
    let edited = msgs
        .iter()
        .find(|m| m.body_text().contains("Subject: edited"))
        .expect("edited message delivered");
    assert_eq!(edited.rcpt_addresses(), ["bob@far.test"]);
    let body = edited.body_text();
    assert!(
        body.starts_with("X-Sieve-Checked: yes from 127.0.0.1\r\n"),
        "{body}"
    );
    assert!(!body.contains("X-Internal"), "{body}");
    let redirected = msgs
        .iter()
        .find(|m| m.body_text().contains("Subject: REDIRECTME"))
        .expect("redirected message delivered");
    assert_eq!(redirected.rcpt_addresses(), ["archive@far.test"]);

    // Only the held message is left, and it is held.
    wait_until(
        "the spool to hold one",
        T,
        || relay.count() == 1,
        || relay.log(),
    );
    let show = relay.show(&held_id);
    assert!(show.contains("held"), "{show}");
    assert_eq!(hop.messages().len(), 2);
    assert!(!hop
        .messages()
        .iter()
        .any(|m| m.body_text().contains("HOLDME") || m.body_text().contains("DISCARDME")));

    // Released by the operator: delivered.
    cli(&relay, &token, &["queue", "release", &held_id]);
    wait_until(
        "the released message",
        T,
        || hop.messages().len() == 3,
        || relay.log(),
    );
    let released = &hop.messages()[2];
    assert!(released.body_text().contains("Subject: HOLDME"));
    assert_eq!(released.rcpt_addresses(), ["held@far.test"]);
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
}

#[test]
fn a_sieve_compile_error_stops_check_config_with_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = write(
        dir.path(),
        "broken.sieve",
        "require \"reject\";\n\nif header :nosuchtag \"Subject\" \"x\" { reject \"no\"; }\n",
    );
    let config = write(
        dir.path(),
        "sluice.toml",
        &format!(
            "[server.listener.smtp]\nbind = [\"127.0.0.1:2525\"]\n\n\
             [server.listener.smtp.sieve]\nrcpt = \"{}\"\n",
            script.display()
        ),
    );
    let out = sluice(&["check-config", config.to_str().expect("path")]);
    assert!(
        !out.status.success(),
        "check-config accepted a broken script"
    );
    let err = text(&out.stderr);
    assert!(err.contains("server.listener.smtp.sieve.rcpt"), "{err}");
    assert!(
        err.contains(&format!("{}: line 3,", script.display())),
        "{err}"
    );
    // Fixed, the same file passes.
    std::fs::write(&script, "require \"reject\";\nreject \"no\";\n").expect("fix");
    let out = sluice(&["check-config", config.to_str().expect("path")]);
    assert_ok(&out, "check-config with the fixed script");
}

fn sighup(relay: &Relay) {
    // SAFETY: kill(2) on the relay child this test started and has not reaped.
    let rc = unsafe { libc::kill(relay.pid() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0, "kill SIGHUP: {}", std::io::Error::last_os_error());
}

fn wait_log_count(relay: &Relay, needle: &str, n: usize) -> String {
    wait_until(
        &format!("{n} log lines with {needle:?}"),
        T,
        || relay.log().matches(needle).count() >= n,
        || relay.log(),
    );
    relay.log()
}

#[test]
fn sighup_recompiles_the_scripts_and_a_broken_one_keeps_the_running_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = write(
        dir.path(),
        "rcpt.sieve",
        "require [\"envelope\", \"reject\"];\nif envelope :localpart \"to\" \"first\" { reject \"first refused\"; }\n",
    );
    let config = write(
        dir.path(),
        "sluice.toml",
        &format!(
            "[server.listener.smtp.sieve]\nrcpt = \"{}\"\n",
            script.display()
        ),
    );
    let relay = Relay::builder().config(config).dir(dir).start();
    let rcpt = |to: &str| -> String {
        let mut c = relay.greeted();
        c.expect("EHLO reload.test", 250);
        c.expect("MAIL FROM:<a@snd.test>", 250);
        c.cmd(&format!("RCPT TO:<{to}>")).last().to_string()
    };
    assert_eq!(rcpt("first@far.test"), "550 5.7.1 first refused");
    assert_eq!(rcpt("second@far.test"), "250 2.1.5 Ok");

    // A new script: compiled by the reload, used by new sessions.
    std::fs::write(
        &script,
        "require [\"envelope\", \"reject\"];\nif envelope :localpart \"to\" \"second\" { reject \"second refused\"; }\n",
    )
    .expect("rewrite");
    sighup(&relay);
    wait_log_count(&relay, "reload: ", 1);
    assert_eq!(rcpt("first@far.test"), "250 2.1.5 Ok");
    assert_eq!(rcpt("second@far.test"), "550 5.7.1 second refused");

    // A broken script: the reload is refused naming file and line; the
    // running scripts stay.
    std::fs::write(
        &script,
        "require \"reject\";\nif header :nosuchtag \"Subject\" \"x\" { reject \"no\"; }\n",
    )
    .expect("break");
    sighup(&relay);
    let log = wait_log_count(&relay, "reload refused", 1);
    let line = log
        .lines()
        .find(|l| l.contains("reload refused"))
        .unwrap_or_default();
    assert!(
        line.contains(&format!("{}: line 2", script.display())),
        "{line}"
    );
    assert_eq!(rcpt("second@far.test"), "550 5.7.1 second refused");
}
