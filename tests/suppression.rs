//! The suppression list end to end: a hard bounce (the test kit's scripted
//! server answering a Gmail-shaped "550 5.1.1 … does not exist") puts the
//! recipient on the list for the sender's domain; the next message to it is
//! refused at RCPT (Python's smtplib and swaks see 550 5.1.1 "suppressed")
//! while another sender domain still gets through; the entry survives a
//! restart (LMDB next to the spool); `sluice suppression remove` lifts it and
//! `add` puts a global one. With action = "drop" a suppressed recipient is
//! accepted and failed at delivery without a connection, with a failure notice
//! whose class is "suppressed".

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);
const TOKEN: &str = "suppression-test-token-0123456789";

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The hop: "gone@" does not exist, everyone else is accepted.
fn hop(addr: SocketAddr) -> ScriptedServer {
    ScriptedServer::builder()
        .name("mx.provider.test")
        .capability("PIPELINING")
        .capability("8BITMIME")
        .on_arg(
            "RCPT",
            "gone@",
            Act::Reply(
                "550-5.1.1 The mailbox you addressed does not exist here. Please check\n\
                 550 5.1.1 the spelling and try again. https://support.example/NoSuchUser s1si"
                    .into(),
            ),
        )
        .start(addr)
}

struct Setup {
    _nsd: Nsd,
    hop: ScriptedServer,
    bounces: LoadgenSink,
    relay: Relay,
    token: PathBuf,
}

fn setup(action: &str) -> Setup {
    let ips = loopbacks(2);
    let port = mx_port(&ips);
    let nsd = Nsd::start(&format!(
        "a MX 10 mx1\nmx1 A {}\nsnd MX 10 bounces\nbounces A {}\nother MX 10 bounces",
        ips[0], ips[1]
    ));
    let hop = hop(sa(ips[0], port));
    let bounces = LoadgenSink::start(&[sa(ips[1], port)], &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("api.token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
    let relay = Relay::builder()
        .dir(dir)
        .cores(2)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set(nsd.servers_set())
        .set("dns.timeout=\"1s\"")
        .set(format!("delivery.mx_port={port}"))
        .set("delivery.connect_timeout=\"5s\"")
        .set("queue.default.retry=[\"1s\"]")
        .set(format!("admin.token_file=\"{}\"", token.display()))
        .set("suppression.enabled=true")
        .set("suppression.ttl=\"7d\"")
        .set(format!("suppression.action=\"{action}\""))
        .start();
    Setup {
        _nsd: nsd,
        hop,
        bounces,
        relay,
        token: token.clone(),
    }
}

/// `sluice ARGS --json --api … --token-file …`, which must succeed.
fn cli(relay: &Relay, token: &Path, args: &[&str]) -> Value {
    let api = format!("http://127.0.0.1:{}", relay.admin_port);
    let tf = token.display().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--json", "--api", &api, "--token-file", &tf]);
    let out = sluice(&all);
    assert_ok(&out, &format!("sluice {args:?}"));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

/// smtplib's view of one RCPT: Ok(()) accepted, Err((code, text)) refused.
fn smtplib(relay: &Relay, from: &str, to: &str) -> Result<(), (u64, String)> {
    let addr = relay.addr();
    let out = python(
        "rcpt_probe.py",
        &[&addr.ip().to_string(), &addr.port().to_string(), from, to],
        T,
    );
    assert_ok(&out, "rcpt_probe.py");
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    match v.get("refused") {
        Some(r) => Err((
            r[0].as_u64().unwrap_or(0),
            r[1].as_str().unwrap_or("").to_string(),
        )),
        None => Ok(()),
    }
}

/// swaks' transcript line answering RCPT ("<** 550 …" or "<-  250 …").
fn swaks_rcpt(relay: &Relay, from: &str, to: &str) -> String {
    let out = swaks(relay, &["--from", from, "--to", to]);
    text(&out.stdout)
        .lines()
        .skip_while(|l| !l.contains("RCPT TO:"))
        .nth(1)
        .unwrap_or("")
        .to_string()
}

fn entries(relay: &Relay, token: &Path) -> Vec<Value> {
    cli(relay, token, &["suppression", "list"])["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn hard_bounce_suppresses_refuses_at_rcpt_survives_restart_and_is_lifted() {
    let mut s = setup("refuse");
    let relay = &s.relay;
    submit(
        relay,
        "alice@snd.dlv.test",
        "",
        &["gone@a.dlv.test"],
        b"Subject: first\r\n\r\nfirst\r\n",
    );
    // The bounce is recorded on a blocking thread after the attempt.
    let mut list = Vec::new();
    wait_until(
        "the recipient on the suppression list",
        T,
        || {
            list = entries(relay, &s.token);
            !list.is_empty()
        },
        || relay.log(),
    );
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["scope"], "snd.dlv.test");
    assert_eq!(list[0]["recipient"], "gone@a.dlv.test");
    assert_eq!(list[0]["class"], "invalid-recipient");
    assert_eq!(list[0]["active"], true);
    assert!(
        list[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("does not exist"),
        "{list:?}"
    );
    let m = relay.metrics();
    assert_eq!(metric_sum(&m, "sluice_suppression_added_total"), 1.0, "{m}");

    // The next message from the same sender domain: refused at RCPT.
    let (code, why) = smtplib(relay, "bob@snd.dlv.test", "Gone@A.dlv.test").expect_err("refused");
    assert_eq!(code, 550, "{why}");
    assert!(
        why.starts_with("5.1.1") && why.contains("suppressed"),
        "{why}"
    );
    let line = swaks_rcpt(relay, "alice@snd.dlv.test", "gone@a.dlv.test");
    assert!(
        line.contains("550 5.1.1") && line.contains("suppressed"),
        "{line}"
    );
    // Another sender domain is not affected (its message goes out, bounces,
    // and is recorded under its own scope).
    smtplib(relay, "carol@other.dlv.test", "gone@a.dlv.test").expect("other sender accepted");
    let m = relay.metrics();
    assert_eq!(
        metric_sum(&m, "sluice_suppression_refused_total{action=\"refuse\"}"),
        2.0,
        "{m}"
    );
    let scoped = |relay: &Relay| {
        cli(
            relay,
            &s.token,
            &["suppression", "list", "--scope", "snd.dlv.test"],
        )["entries"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };

    // After a restart the entry is still there and still refuses.
    s.relay.terminate();
    s.relay.restart();
    let relay = &s.relay;
    let line = swaks_rcpt(relay, "alice@snd.dlv.test", "gone@a.dlv.test");
    assert!(line.contains("550 5.1.1"), "after restart: {line}");
    let kept = scoped(relay);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0]["recipient"], "gone@a.dlv.test");

    // `sluice suppression remove` lifts it.
    let v = cli(
        relay,
        &s.token,
        &[
            "suppression",
            "remove",
            "gone@a.dlv.test",
            "--scope",
            "snd.dlv.test",
        ],
    );
    assert_eq!(v["removed"], true, "{v}");
    assert!(scoped(relay).is_empty());
    let v = cli(
        relay,
        &s.token,
        &[
            "suppression",
            "remove",
            "gone@a.dlv.test",
            "--scope",
            "snd.dlv.test",
        ],
    );
    assert_eq!(v["removed"], false, "{v}");
    smtplib(relay, "alice@snd.dlv.test", "gone@a.dlv.test").expect("accepted after remove");

    // An operator's global entry refuses every sender, with 5.7.1 for policy-block.
    let v = cli(
        relay,
        &s.token,
        &[
            "suppression",
            "add",
            "someone@a.dlv.test",
            "--for",
            "1h",
            "--reason",
            "complaint",
        ],
    );
    assert_eq!(v["scope"], "*", "{v}");
    let (code, why) =
        smtplib(relay, "carol@other.dlv.test", "someone@a.dlv.test").expect_err("refused");
    assert_eq!(code, 550);
    assert!(
        why.starts_with("5.7.1") && why.contains("suppressed"),
        "{why}"
    );

    // Bad input is a 400 with the reason, through the CLI's error.
    let api = format!("http://127.0.0.1:{}", relay.admin_port);
    let tf = s.token.display().to_string();
    let out = sluice(&[
        "suppression",
        "add",
        "not-an-address",
        "--api",
        &api,
        "--token-file",
        &tf,
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("HTTP 400"),
        "{}",
        text(&out.stderr)
    );
    let _ = &s.hop;
    let _ = &s.bounces;
}

#[test]
fn drop_action_fails_at_delivery_without_a_connection() {
    let s = setup("drop");
    let relay = &s.relay;
    cli(
        relay,
        &s.token,
        &[
            "suppression",
            "add",
            "dropped@a.dlv.test",
            "--scope",
            "snd.dlv.test",
            "--class",
            "invalid-recipient",
        ],
    );
    // Accepted at RCPT (drop, not refuse)…
    let id = submit(
        relay,
        "alice@snd.dlv.test",
        "",
        &["dropped@a.dlv.test"],
        b"Subject: dropped\r\n\r\ndropped\r\n",
    );
    // …then failed without an attempt: the failure notice says suppressed.
    let notices = s.bounces.wait_saved(1, T, relay);
    let dsn = assert_failure_dsn(&notices[0].eml, &["dropped@a.dlv.test"], "5.1.1");
    assert_eq!(
        dsn["recipients"][0]["x-sluice-bounce-class"], "suppressed",
        "{dsn:#}"
    );
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    assert!(
        !s.hop
            .commands()
            .iter()
            .any(|c| c.to_ascii_lowercase().contains("dropped@")),
        "the hop saw the suppressed recipient: {:?}",
        s.hop.commands()
    );
    assert!(attempts(relay, &id).is_empty(), "no delivery attempt");
    let m = relay.metrics();
    assert_eq!(
        metric_sum(&m, "sluice_suppression_refused_total{action=\"drop\"}"),
        1.0,
        "{m}"
    );
}
