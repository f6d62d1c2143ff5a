//! REQUIRETLS (RFC 8689), end to end. Python's smtplib submits over STARTTLS
//! with `REQUIRETLS` on MAIL; in clear text the keyword is neither advertised
//! nor accepted. The relay then delivers only over verified TLS (the test CA
//! trusted through `delivery.tls_ca_file`) to a next hop that offers
//! REQUIRETLS: a second `sluice` with a TLS listener takes it (and logs
//! requiretls); a receiver that verifies but does not offer REQUIRETLS
//! (tests/py/tls_receiver.py) and one with a certificate for another name get
//! nothing, and the message bounces 5.7.30 with a notice that itself goes
//! with REQUIRETLS and returns the headers only. A domain whose first MX
//! lacks REQUIRETLS is delivered through its second. A `TLS-Required: No`
//! header on a listener that honours it lowers a rule's `verify` to
//! opportunistic for that message only.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sluice_testkit::dnssec::{DnssecBed, Zone, TOOLS};
use sluice_testkit::*;

/// The signed zone of the MX hosts (validated by the bed's unbound: RFC 8689
/// §4.2.1 wants the MX of a REQUIRETLS message authenticated).
const ZONE: &str = "rtls.test";
/// An unsigned zone: its MX answers carry no AD bit.
const PLAIN: &str = "plain.test";

const T: Duration = Duration::from_secs(30);

/// Python's smtplib against the relay's listener: EHLO, then (over
/// STARTTLS when `tls`) MAIL with REQUIRETLS, RCPTs, DATA. Prints what it
/// saw as JSON: the EHLO keywords before and after STARTTLS and each reply.
const SMTPLIB_PY: &str = r#"
import json, smtplib, ssl, sys
port, tls, sender, rcpts = int(sys.argv[1]), sys.argv[2] == "tls", sys.argv[3], sys.argv[4].split(",")
options, header = sys.argv[5].split(",") if sys.argv[5] else [], sys.argv[6]
out = {}
s = smtplib.SMTP("127.0.0.1", port, timeout=20)
s.ehlo("client.test")
out["ehlo_clear"] = sorted(s.esmtp_features)
if tls:
    s.starttls(context=ssl._create_unverified_context())
    s.ehlo("client.test")
    out["ehlo_tls"] = sorted(s.esmtp_features)
code, text = s.mail(sender, options)
out["mail"] = [code, text.decode()]
if code == 250:
    for r in rcpts:
        c, t = s.rcpt(r)
        assert c == 250, (c, t)
    body = "From: <%s>\r\n%sSubject: secret plans\r\n\r\nBODY-MARKER the plans\r\n" % (sender, header)
    c, t = s.data(body.encode())
    out["data"] = [c, t.decode()]
s.quit()
print(json.dumps(out))
"#;

fn smtplib(relay: &Relay, tls: bool, sender: &str, rcpts: &[&str]) -> Value {
    smtplib_with(relay, tls, sender, rcpts, "REQUIRETLS", "")
}

/// `options`: MAIL parameters, comma-separated; `header`: a header line
/// (with its CRLF) put in the message.
fn smtplib_with(
    relay: &Relay,
    tls: bool,
    sender: &str,
    rcpts: &[&str],
    options: &str,
    header: &str,
) -> Value {
    let out = run_with_timeout(
        Command::new("python3")
            .arg("-c")
            .arg(SMTPLIB_PY)
            .arg(relay.port.to_string())
            .arg(if tls { "tls" } else { "clear" })
            .arg(sender)
            .arg(rcpts.join(","))
            .arg(options)
            .arg(header),
        T,
    );
    assert!(
        out.status.success(),
        "smtplib: {}\n{}",
        text(&out.stderr),
        relay.log()
    );
    serde_json::from_slice(&out.stdout).expect("smtplib printed JSON")
}

fn queued_as(v: &Value) -> String {
    let data = v["data"][1].as_str().unwrap_or_default();
    assert_eq!(v["data"][0], 250, "{v}");
    data.rsplit(' ').next().expect("queued id").to_string()
}

/// A sample of the relay's `/metrics` (0 when absent).
fn metric(relay: &Relay, series: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", relay.admin_port)).expect("admin");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[test]
fn requiretls_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path(), "ca");
    // ips[0]: a second sluice (REQUIRETLS); ips[1]: verifies, no REQUIRETLS;
    // ips[2]: a certificate for another name.
    let ips = loopbacks(3);
    let port = mx_port(&ips);
    let good_cert = make_issued_cert(dir.path(), &ca, "good", &format!("mx-good.{ZONE}"));
    let noreq_cert = make_issued_cert(dir.path(), &ca, "noreq", &format!("mx-noreq.{ZONE}"));
    let wrong_cert = make_issued_cert(dir.path(), &ca, "wrong", &format!("elsewhere.{ZONE}"));
    let noreq = TlsReceiver::start(dir.path(), ips[1], port, Some(&noreq_cert), None);
    let wrong = TlsReceiver::start(dir.path(), ips[2], port, Some(&wrong_cert), None);
    let receiver = Relay::builder()
        .set("log.format=\"json\"")
        .set(format!("server.listener.mx.bind=[\"{}:{port}\"]", ips[0]))
        .set("server.listener.mx.tls=\"starttls\"")
        .set(format!(
            "server.listener.mx.tls_cert=\"{}\"",
            good_cert.0.display()
        ))
        .set(format!(
            "server.listener.mx.tls_key=\"{}\"",
            good_cert.1.display()
        ))
        .start();
    require_tools!(TOOLS[0], TOOLS[1], TOOLS[2], TOOLS[3]);
    let bed = DnssecBed::start(&[
        Zone::secure(
            ZONE,
            &format!(
                "good MX 10 mx-good\nsnd MX 10 mx-good\nmx-good A {}\n\
                 noreq MX 10 mx-noreq\nmx-noreq A {}\n\
                 wrong MX 10 mx-wrong\nmx-wrong A {}\n\
                 multi MX 10 mx-noreq\nmulti MX 20 mx-good\n",
                ips[0], ips[1], ips[2]
            ),
        ),
        // Its MX is the REQUIRETLS-capable receiver, but the MX answer is not
        // authenticated.
        Zone::unsigned(PLAIN, &format!("@ MX 10 mx-good.{ZONE}.\n")),
    ]);
    let sender_cert = make_cert(dir.path());
    let mut builder = Relay::builder()
        .cores(1)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set(bed.servers_set())
        .set("dns.dnssec_validating=true")
        .set("dns.timeout=\"2s\"")
        .set(format!("delivery.mx_port={port}"))
        .set("delivery.connect_timeout=\"5s\"");
    for e in [
        format!("delivery.tls_ca_file=\"{}\"", ca.0.display()),
        "server.listener.smtp.tls=\"starttls\"".to_string(),
        format!(
            "server.listener.smtp.tls_cert=\"{}\"",
            sender_cert.0.display()
        ),
        format!(
            "server.listener.smtp.tls_key=\"{}\"",
            sender_cert.1.display()
        ),
        // wrong.* needs verify; TLS-Required: No is honoured here.
        format!("rule=[{{match={{recipient_domain=[\"wrong.{ZONE}\"]}},tls=\"verify\"}}]"),
        "server.listener.smtp.honor_tls_required_no=true".to_string(),
        "queue.default.retry=[\"1h\"]".to_string(),
    ] {
        builder = builder.set(e);
    }
    let relay = builder.start();
    let sender = format!("alice@snd.{ZONE}");

    // In clear text: not advertised, and refused.
    let clear = smtplib(&relay, false, &sender, &[&format!("bob@good.{ZONE}")]);
    let keywords = clear["ehlo_clear"].to_string();
    assert!(keywords.contains("starttls"), "{clear}");
    assert!(!keywords.contains("requiretls"), "{clear}");
    assert_eq!(clear["mail"][0], 530, "{clear}");
    assert!(
        clear["mail"][1]
            .as_str()
            .unwrap_or_default()
            .starts_with("5.7.10"),
        "{clear}"
    );
    assert_eq!(relay.count(), 0);

    // Over STARTTLS: advertised and accepted.
    let ok = smtplib(
        &relay,
        true,
        &sender,
        &[&format!("bob@good.{ZONE}"), &format!("carol@multi.{ZONE}")],
    );
    assert!(ok["ehlo_tls"].to_string().contains("requiretls"), "{ok}");
    assert_eq!(ok["mail"][0], 250, "{ok}");
    let id_ok = queued_as(&ok);
    let id_noreq = queued_as(&smtplib(
        &relay,
        true,
        &sender,
        &[&format!("dan@noreq.{ZONE}")],
    ));
    let id_wrong = queued_as(&smtplib(
        &relay,
        true,
        &sender,
        &[&format!("erin@wrong.{ZONE}")],
    ));

    let id_plain = queued_as(&smtplib(&relay, true, &sender, &[&format!("fay@{PLAIN}")]));

    // Delivered to the sluice that offers REQUIRETLS, verified, with REQUIRETLS.
    let mut a = Vec::new();
    wait_until(
        "both recipients of the first message delivered",
        T,
        || {
            a = attempts(&relay, &id_ok);
            a.iter()
                .filter(|e| field(e, "status") == "delivered")
                .count()
                == 2
        },
        || relay.log(),
    );
    for e in a.iter().filter(|e| field(e, "status") == "delivered") {
        assert_eq!(e["requiretls"], true, "{e}");
        assert_eq!(e["tls_verified"], true, "{e}");
        assert_eq!(field(e, "tls_policy"), "verify", "{e}");
        // multi's first MX lacks REQUIRETLS: its second one took it.
        assert_eq!(field(e, "host"), format!("mx-good.{ZONE}"), "{e}");
    }
    let at_receiver = || {
        log_events(&receiver, "transaction")
            .into_iter()
            .filter(|t| t["result"] == 250)
            .collect::<Vec<_>>()
    };
    wait_until(
        "the receiver logged the message",
        T,
        || at_receiver().iter().any(|t| field(t, "sender") == sender),
        || receiver.log(),
    );
    for t in at_receiver()
        .iter()
        .filter(|t| field(t, "sender") == sender)
    {
        assert_eq!(t["requiretls"], true, "{t}");
        assert!(field(t, "tls").starts_with("TLSv1."), "{t}");
    }

    // No REQUIRETLS at the only MX (5.7.30), a certificate for another name
    // (5.7.5), an MX answer that is not DNSSEC-validated (5.7.4, the host not
    // even dialled): not delivered, bounced with the cause's code.
    for (id, code) in [
        (&id_noreq, "5.7.30"),
        (&id_wrong, "5.7.5"),
        (&id_plain, "5.7.4"),
    ] {
        let mut a = Vec::new();
        wait_until(
            &format!("{id} bounced"),
            T,
            || {
                a = attempts(&relay, id);
                a.iter().any(|e| field(e, "status") == "failed")
            },
            || relay.log(),
        );
        let e = a.iter().find(|e| field(e, "status") == "failed").unwrap();
        assert_eq!(e["code"], 550, "{e}");
        assert_eq!(field(e, "enhanced"), code, "{e}");
        assert_eq!(e["requiretls"], true, "{e}");
        assert!(a.iter().all(|e| field(e, "status") != "delivered"), "{a:?}");
    }
    assert!(noreq.of("message").is_empty(), "{:?}", noreq.of(""));
    assert!(
        !wrong
            .of("message")
            .iter()
            .any(|m| m["rcpts"].to_string().contains("erin@")),
        "{:?}",
        wrong.of("")
    );
    // The receiver without REQUIRETLS verified fine: the session ended with
    // QUIT over TLS, before MAIL.
    assert!(
        noreq.of("quit").iter().any(|q| q["tls"] == true),
        "{:?}",
        noreq.of("")
    );
    let e = attempts(&relay, &id_wrong)
        .into_iter()
        .find(|e| field(e, "status") == "failed")
        .unwrap();
    assert!(field(&e, "reply").contains("not verified"), "{e}");
    let e = attempts(&relay, &id_plain)
        .into_iter()
        .find(|e| field(e, "status") == "failed")
        .unwrap();
    assert!(
        field(&e, "reply").contains(&format!("MX host mx-good.{ZONE} not authenticated")),
        "{e}"
    );
    // The receiver took the first message's two sessions (good, multi) and
    // nothing for {PLAIN}, though it is that domain's MX.
    let from_sender: Vec<Value> = at_receiver()
        .into_iter()
        .filter(|t| field(t, "sender") == sender)
        .collect();
    assert_eq!(from_sender.len(), 2, "{from_sender:?}");

    // The two notices went to the sender's MX (the sluice) with REQUIRETLS,
    // and return only the headers of the original.
    wait_until(
        "three notices at the receiver",
        T,
        || {
            at_receiver()
                .iter()
                .filter(|t| field(t, "sender").is_empty())
                .count()
                == 3
        },
        || format!("{}\n--- sender ---\n{}", receiver.log(), relay.log()),
    );
    for t in at_receiver()
        .iter()
        .filter(|t| field(t, "sender").is_empty())
    {
        assert_eq!(t["requiretls"], true, "{t}");
        let raw = receiver.body(field(t, "id"));
        // The receiver stored the request with the notice (`queue show`).
        let show = receiver.show(field(t, "id"));
        assert!(show.contains("tls_request: requiretls"), "{show}");
        let (to, code) = if raw.windows(5).any(|w| w == b"noreq") {
            (format!("dan@noreq.{ZONE}"), "5.7.30")
        } else if raw.windows(PLAIN.len()).any(|w| w == PLAIN.as_bytes()) {
            (format!("fay@{PLAIN}"), "5.7.4")
        } else {
            (format!("erin@wrong.{ZONE}"), "5.7.5")
        };
        let v = assert_failure_dsn(&raw, &[&to], code);
        assert!(
            v["parts"].to_string().contains("text/rfc822-headers"),
            "{v:#}"
        );
        let returned = v["returned"].as_str().unwrap_or_default();
        assert!(returned.contains("secret plans"), "{v:#}");
        assert!(!text(&raw).contains("BODY-MARKER"), "{}", text(&raw));
    }

    // TLS-Required: No (honoured by this listener): the rule's verify is
    // lowered to opportunistic, so the wrong certificate does not hold the
    // message; the same message without the header is deferred.
    let hdr = "TLS-Required: No\r\n";
    let id_optional = queued_as(&smtplib_with(
        &relay,
        true,
        &sender,
        &[&format!("frank@wrong.{ZONE}")],
        "",
        hdr,
    ));
    let id_strict = queued_as(&smtplib_with(
        &relay,
        true,
        &sender,
        &[&format!("gina@wrong.{ZONE}")],
        "",
        "",
    ));
    let first = |id: &str| {
        let mut a = Vec::new();
        wait_until(
            &format!("an attempt for {id}"),
            T,
            || {
                a = attempts(&relay, id);
                !a.is_empty()
            },
            || relay.log(),
        );
        a.remove(0)
    };
    let e = first(&id_optional);
    assert_eq!(field(&e, "status"), "delivered", "{e}");
    assert_eq!(field(&e, "tls_policy"), "opportunistic", "{e}");
    assert_eq!(e["tls_verified"], false, "{e}");
    assert_eq!(e["tls_required_no"], true, "{e}");
    assert_eq!(e["requiretls"], false, "{e}");
    let e = first(&id_strict);
    assert_eq!(field(&e, "status"), "deferred", "{e}");
    assert_eq!(field(&e, "enhanced"), "4.7.5", "{e}");
    assert_eq!(field(&e, "tls_policy"), "verify", "{e}");
    let got: Vec<String> = wrong
        .of("message")
        .iter()
        .map(|m| m["rcpts"].to_string())
        .collect();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].contains("frank@"), "{got:?}");

    // Refusals counted by reason.
    assert!(
        metric(
            &relay,
            "sluice_requiretls_refused_total{reason=\"no_requiretls\"}"
        ) >= 2
    );
    assert!(
        metric(
            &relay,
            "sluice_requiretls_refused_total{reason=\"not_verified\"}"
        ) >= 1
    );
}
