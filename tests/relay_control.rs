//! Who may send where: relay networks, local domains, SMTP AUTH over STARTTLS,
//! PROXY protocol, connection limits, and the LMTP listener.

use sluice_testkit::*;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const PASSWORD: &str = "s3cret pass";

/// relay_networks without loopback, so only AUTH (or a local domain) lets us in.
fn closed_relay() -> RelayBuilder {
    Relay::builder()
        .set("relay.relay_networks=[\"10.0.0.0/8\"]")
        .set("relay.local_domains=[\"local.test\"]")
}

/// A starttls listener with user alice.
fn auth_relay(extra: &[(&str, &str)]) -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(dir.path());
    let mut b = closed_relay()
        .dir(dir)
        .set(format!("auth.users.alice=\"{}\"", hash_password(PASSWORD)))
        .lset("tls", "\"starttls\"")
        .lset("tls_cert", &format!("\"{}\"", cert.display()))
        .lset("tls_key", &format!("\"{}\"", key.display()));
    for (k, v) in extra {
        b = b.lset(k, v);
    }
    b.start()
}

fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[test]
fn relay_denied_outside_relay_networks_but_local_domains_accepted() {
    let relay = closed_relay().start();
    let mut c = relay.session();
    c.expect("MAIL FROM:<someone@example.test>", 250);
    let r = c.cmd("RCPT TO:<other@remote.test>");
    assert_eq!((r.code, r.enhanced()), (554, "5.7.1"), "{r:?}");
    c.expect("RCPT TO:<user@local.test>", 250);
    // Domains are case-insensitive (RFC 5321 §2.4).
    let r = c.cmd("RCPT TO:<user2@LOCAL.Test>");
    assert_eq!(r.code, 250, "upper-case local domain: {r:?}");
    c.expect("DATA", 354);
    c.send(b"Subject: local\r\n\r\nfor local users\r\n.\r\n");
    let r = c.read_reply();
    assert_eq!(r.code, 250, "{r:?}");
    let id = queued_id(&r.text()).unwrap();
    c.expect("QUIT", 221);

    let list = relay.list();
    assert_eq!(list.len(), 1);
    assert_eq!(
        list[0].recipients,
        vec!["user@local.test", "user2@LOCAL.Test"]
    );
    let show = relay.show(&id);
    for line in show_lines(&show, "recipient:") {
        assert!(
            line.contains(" local"),
            "local recipient not marked local: {line}"
        );
    }
}

/// RFC 5321 §4.5.1: a bare "postmaster" recipient (no domain) MUST be accepted,
/// from anyone, whatever the relay rules.
#[test]
fn bare_postmaster_recipient_is_accepted() {
    for relay in [Relay::start(&[]), closed_relay().start()] {
        let mut c = relay.session();
        c.expect("MAIL FROM:<someone@example.test>", 250);
        let r = c.cmd("RCPT TO:<postmaster>");
        assert_eq!(r.code, 250, "RCPT TO:<postmaster>: {r:?}");
        let r = c.cmd("RCPT TO:<PostMaster>");
        assert_eq!(r.code, 250, "RCPT TO:<PostMaster>: {r:?}");
        c.expect("DATA", 354);
        c.send(b"Subject: to postmaster\r\n\r\nhi\r\n.\r\n");
        let r = c.read_reply();
        assert_eq!(r.code, 250, "{r:?}");
        c.expect("QUIT", 221);
        let list = relay.list();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].recipients.len(), 2, "{list:?}");
        for rcpt in &list[0].recipients {
            assert!(
                rcpt.eq_ignore_ascii_case("postmaster"),
                "recipient stored as {rcpt:?}"
            );
        }
    }
}

/// The null path `<>` is a sender, never a recipient.
#[test]
fn null_recipient_is_refused() {
    let relay = Relay::start(&[]);
    let mut c = relay.session();
    c.expect("MAIL FROM:<>", 250);
    let r = c.cmd("RCPT TO:<>");
    assert!(r.code >= 500, "RCPT TO:<> must be refused: {r:?}");
    c.expect("QUIT", 221);
    assert_eq!(relay.count(), 0);
}

#[test]
fn auth_after_starttls_with_smtplib_allows_relaying() {
    let relay = auth_relay(&[]);
    let port = relay.port.to_string();
    let run = |mech: &str, password: &str, flags: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "127.0.0.1",
            &port,
            mech,
            "alice",
            password,
            "other@remote.test",
        ];
        args.extend_from_slice(flags);
        let out = python("auth_client.py", &args, Duration::from_secs(30));
        assert_ok(&out, "auth_client.py");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
    };

    let mut ids = Vec::new();
    for (mech, flags) in [
        ("PLAIN", &[][..]),
        ("LOGIN", &[][..]),
        ("PLAIN", &["--no-initial"][..]),
        ("LOGIN", &["--no-initial"][..]),
    ] {
        let v = run(mech, PASSWORD, flags);
        let features: Vec<String> =
            serde_json::from_value(v["features_before_tls"].clone()).unwrap();
        assert!(features.contains(&"starttls".to_string()), "{v}");
        assert!(
            !features.contains(&"auth".to_string()),
            "AUTH offered before TLS: {v}"
        );
        let after: Vec<String> = serde_json::from_value(v["features_after_tls"].clone()).unwrap();
        assert!(
            after.contains(&"auth".to_string()),
            "AUTH not offered after TLS: {v}"
        );
        assert!(!after.contains(&"starttls".to_string()), "{v}");
        assert_eq!(v["auth"][0], 235, "{mech} {flags:?}: {v}");
        assert_eq!(v["rcpt"][0], 250, "authenticated relay refused: {v}");
        assert_eq!(v["data"][0], 250, "{v}");
        ids.push(queued_id(v["data"][1].as_str().unwrap()).expect("id"));
    }
    for id in &ids {
        let show = relay.show(id);
        assert_eq!(show_field(&show, "auth_user"), "alice", "{show}");
        assert!(show_field(&show, "tls").starts_with("TLS"), "{show}");
        let body = relay.body(id);
        let header = text(split_received(&body).0);
        assert!(header.contains("with ESMTPSA"), "RFC 3848 type: {header:?}");
    }

    // Wrong password.
    let v = run("PLAIN", "wrong", &[]);
    assert_eq!(v["auth"][0], 535, "{v}");
    assert!(v["auth"][1].as_str().unwrap().starts_with("5.7.8"), "{v}");
    let v = run("LOGIN", "wrong", &[]);
    assert_eq!(v["auth"][0], 535, "{v}");
    // Unknown user.
    let out = python(
        "auth_client.py",
        &[
            "127.0.0.1",
            &port,
            "PLAIN",
            "mallory",
            PASSWORD,
            "other@remote.test",
        ],
        Duration::from_secs(30),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["auth"][0], 535, "{v}");
    assert_eq!(relay.count(), ids.len());
}

/// RFC 3207 §4.2: after STARTTLS the server MUST discard what it learnt from the
/// client before, and that includes an AUTH done in clear text.
#[test]
fn starttls_forgets_an_earlier_authentication() {
    let relay = auth_relay(&[("auth_plaintext", "true")]);
    let out = python(
        "auth_client.py",
        &[
            "127.0.0.1",
            &relay.port.to_string(),
            "PLAIN",
            "alice",
            PASSWORD,
            "other@remote.test",
            "--auth-before-tls",
        ],
        Duration::from_secs(30),
    );
    assert_ok(&out, "auth_client.py --auth-before-tls");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["auth_before_tls"][0], 235, "{v}");
    assert_eq!(v["starttls"][0], 220, "{v}");
    let after: Vec<String> = serde_json::from_value(v["features_after_tls"].clone()).unwrap();
    assert!(
        after.contains(&"auth".to_string()),
        "AUTH must be offered again after STARTTLS: {v}"
    );
    assert_eq!(
        v["rcpt"][0], 554,
        "the clear-text AUTH must not survive STARTTLS: {v}"
    );
    assert_eq!(relay.count(), 0);
}

#[test]
fn auth_with_swaks_tls() {
    let relay = auth_relay(&[]);
    for mech in ["PLAIN", "LOGIN"] {
        let out = swaks(
            &relay,
            &[
                "--tls",
                "-a",
                mech,
                "-au",
                "alice",
                "-ap",
                PASSWORD,
                "--from",
                "alice@example.test",
                "--to",
                "other@remote.test",
            ],
        );
        assert_ok(&out, &format!("swaks --tls -a {mech}"));
        let t = text(&out.stdout);
        assert!(t.contains("235 2.7.0"), "{t}");
        assert_eq!(swaks_ids(&out).len(), 1, "{t}");
    }
    let out = swaks(
        &relay,
        &[
            "--tls",
            "-a",
            "PLAIN",
            "-au",
            "alice",
            "-ap",
            "bad",
            "--to",
            "other@remote.test",
        ],
    );
    assert!(!out.status.success(), "swaks with a bad password must fail");
    assert!(
        text(&out.stdout).contains("535 5.7.8"),
        "{}",
        text(&out.stdout)
    );
    // Without AUTH, the same relay refuses the remote recipient.
    let out = swaks(&relay, &["--tls", "--to", "other@remote.test"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("554 5.7.1"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(relay.count(), 2);
}

#[test]
fn auth_refused_before_tls_when_plaintext_is_off() {
    let relay = auth_relay(&[]);
    let mut c = relay.greeted();
    let ehlo = c.expect("EHLO clear.test", 250);
    assert!(
        !ehlo.has_line_starting("AUTH"),
        "AUTH offered in clear text: {ehlo:?}"
    );
    assert!(ehlo.has_line_starting("STARTTLS"), "{ehlo:?}");
    let plain = b64(format!("\0alice\0{PASSWORD}").as_bytes());
    let r = c.cmd(&format!("AUTH PLAIN {plain}"));
    assert!(
        r.code == 538 || r.code == 502 || r.code == 530,
        "AUTH before TLS: {r:?}"
    );
    let r = c.cmd("AUTH LOGIN");
    assert!(
        r.code == 538 || r.code == 502 || r.code == 530,
        "AUTH LOGIN before TLS: {r:?}"
    );
    // And it did not authenticate: relaying is still refused.
    c.expect("MAIL FROM:<alice@example.test>", 250);
    c.expect("RCPT TO:<other@remote.test>", 554);
    c.expect("QUIT", 221);

    // swaks insisting on AUTH without TLS fails too.
    let out = swaks(
        &relay,
        &[
            "-a",
            "PLAIN",
            "-au",
            "alice",
            "-ap",
            PASSWORD,
            "--to",
            "other@remote.test",
        ],
    );
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert_eq!(relay.count(), 0);
}

#[test]
fn auth_without_tls_when_plaintext_is_on() {
    let relay = closed_relay()
        .set(format!("auth.users.alice=\"{}\"", hash_password(PASSWORD)))
        .lset("auth_plaintext", "true")
        .start();
    let mut c = relay.session();
    let ehlo = c.cmd("EHLO clear.test");
    assert!(ehlo.has_line_starting("AUTH"), "{ehlo:?}");
    c.expect("QUIT", 221);

    let out = swaks(
        &relay,
        &[
            "-a",
            "PLAIN",
            "-au",
            "alice",
            "-ap",
            PASSWORD,
            "--from",
            "alice@example.test",
            "--to",
            "other@remote.test",
        ],
    );
    assert_ok(&out, "swaks -a PLAIN");
    let ids = swaks_ids(&out);
    assert_eq!(ids.len(), 1, "{}", text(&out.stdout));
    let show = relay.show(&ids[0]);
    assert_eq!(show_field(&show, "auth_user"), "alice");
    assert_eq!(show_field(&show, "tls"), "");

    // Raw AUTH PLAIN with a bad password: 535 and still no relaying.
    let mut c = relay.session();
    let bad = b64(b"\0alice\0nope");
    let r = c.cmd(&format!("AUTH PLAIN {bad}"));
    assert_eq!((r.code, r.enhanced()), (535, "5.7.8"), "{r:?}");
    c.expect("MAIL FROM:<x@example.test>", 250);
    c.expect("RCPT TO:<other@remote.test>", 554);
    c.expect("QUIT", 221);
    assert_eq!(relay.count(), 1);
}

fn proxy_relay() -> Relay {
    Relay::builder()
        .set("relay.relay_networks=[\"10.1.2.0/24\"]")
        .lset("proxy_trusted_networks", "[\"127.0.0.0/8\"]")
        .proxy_probe()
        .start()
}

fn proxy_v2_ipv4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // AF_INET, STREAM
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h
}

/// Sends one message over a PROXY connection already greeted; returns the RCPT reply
/// and, when accepted, the queued id.
fn proxied_send(c: &mut Client, rcpt: &str) -> (Reply, Option<String>) {
    c.expect("MAIL FROM:<proxied@example.test>", 250);
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
    if r.code != 250 {
        c.expect("QUIT", 221);
        return (r, None);
    }
    c.expect("DATA", 354);
    c.send(b"Subject: via proxy\r\n\r\nhi\r\n.\r\n");
    let d = c.read_reply();
    assert_eq!(d.code, 250, "{d:?}");
    c.expect("QUIT", 221);
    (r, queued_id(&d.text()))
}

#[test]
fn proxy_protocol_v1_and_v2_carry_the_client_address() {
    let relay = proxy_relay();

    // v1 from a relay network: relaying allowed, client_ip is the proxied one.
    let mut c = relay.connect();
    c.send(b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 25\r\n");
    assert_eq!(c.read_reply().code, 220);
    let ehlo = c.expect("EHLO proxied.test", 250);
    assert!(ehlo.lines[0].contains("[10.1.2.3]"), "{ehlo:?}");
    let (r, id) = proxied_send(&mut c, "other@remote.test");
    assert_eq!(r.code, 250, "{r:?}");
    let id = id.unwrap();
    let show = relay.show(&id);
    assert_eq!(show_field(&show, "client_ip"), "10.1.2.3", "{show}");
    assert!(text(split_received(&relay.body(&id)).0).contains("[10.1.2.3]"));

    // v1 from outside the relay networks: refused, so the header really counts.
    let mut c = relay.connect();
    c.send(b"PROXY TCP4 192.0.2.9 10.0.0.1 5555 25\r\n");
    assert_eq!(c.read_reply().code, 220);
    c.expect("EHLO outsider.test", 250);
    let (r, _) = proxied_send(&mut c, "other@remote.test");
    assert_eq!((r.code, r.enhanced()), (554, "5.7.1"), "{r:?}");

    // v2 binary header, with the EHLO in the same write.
    let mut c = relay.connect();
    let mut first = proxy_v2_ipv4(
        Ipv4Addr::new(10, 1, 2, 4),
        Ipv4Addr::new(10, 0, 0, 1),
        4444,
        25,
    );
    first.extend_from_slice(b"EHLO v2.test\r\n");
    c.send(&first);
    assert_eq!(c.read_reply().code, 220);
    let ehlo = c.read_reply();
    assert_eq!(ehlo.code, 250, "{ehlo:?}");
    assert!(ehlo.lines[0].contains("[10.1.2.4]"), "{ehlo:?}");
    let (r, id2) = proxied_send(&mut c, "other@remote.test");
    assert_eq!(r.code, 250, "{r:?}");
    let show = relay.show(&id2.unwrap());
    assert_eq!(show_field(&show, "client_ip"), "10.1.2.4", "{show}");
    assert_eq!(relay.count(), 2);
}

#[test]
fn proxy_listener_closes_connections_without_a_header() {
    let relay = proxy_relay();
    let mut c = relay.connect();
    c.send(b"EHLO noproxy.test\r\n");
    let got = c.read_to_eof();
    assert!(
        got.is_empty(),
        "no greeting expected without a PROXY header, got {:?}",
        text(&got)
    );

    // A v1 header that is garbage is refused the same way.
    let mut c = relay.connect();
    c.send(b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n");
    let got = c.read_to_eof();
    assert!(got.is_empty(), "got {:?}", text(&got));
    assert_eq!(relay.count(), 0);
}

/// Connects (from `src`) until the relay greets with 220, retrying 421s while an
/// earlier connection's slot is being released; panics after the deadline.
fn greeted_from(relay: &Relay, src: Ipv4Addr) -> Client {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Client::connect_from(src, relay.addr());
        let r = c.read_reply();
        if r.code == 220 {
            return c;
        }
        assert_eq!(r.code, 421, "{r:?}");
        assert!(Instant::now() < until, "still refused after 10s: {r:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A connection that must be refused with 421 4.7.0 and closed.
fn expect_refused(relay: &Relay, src: Ipv4Addr) {
    let mut c = Client::connect_from(src, relay.addr());
    let r = c.read_reply();
    assert_eq!((r.code, r.enhanced()), (421, "4.7.0"), "{r:?}");
    c.expect_closed();
}

#[test]
fn per_ip_connection_limit() {
    let relay = Relay::builder().lset("max_connections_per_ip", "2").start();
    let lo = Ipv4Addr::new(127, 0, 0, 1);
    let other = Ipv4Addr::new(127, 0, 0, 2);
    let mut c1 = greeted_from(&relay, lo);
    let _c2 = greeted_from(&relay, lo);
    expect_refused(&relay, lo);
    // Another address is not limited by 127.0.0.1's connections.
    let mut c3 = greeted_from(&relay, other);
    c3.expect("EHLO other.test", 250);
    // The refused connection did not take a slot; closing one frees one.
    c1.expect("QUIT", 221);
    c1.expect_closed();
    let mut c4 = greeted_from(&relay, lo);
    c4.expect("NOOP", 250);
}

#[test]
fn listener_connection_limit() {
    let relay = Relay::builder().lset("max_connections", "2").start();
    let lo = Ipv4Addr::new(127, 0, 0, 1);
    let other = Ipv4Addr::new(127, 0, 0, 3);
    let mut c1 = greeted_from(&relay, lo);
    let _c2 = greeted_from(&relay, other);
    // The limit is for the listener as a whole, whatever the address.
    expect_refused(&relay, lo);
    expect_refused(&relay, Ipv4Addr::new(127, 0, 0, 4));
    c1.expect("QUIT", 221);
    c1.expect_closed();
    let mut c3 = greeted_from(&relay, lo);
    c3.expect("NOOP", 250);
}

#[test]
fn lmtp_listener_replies_per_recipient() {
    let relay = Relay::builder()
        .listener("lmtp")
        .lset("protocol", "\"lmtp\"")
        .start();
    let mut c = relay.greeted();
    let r = c.cmd("EHLO wrong.test");
    assert_eq!(r.code, 500, "EHLO on LMTP: {r:?}");
    let r = c.cmd("HELO wrong.test");
    assert_eq!(r.code, 500, "HELO on LMTP: {r:?}");
    let r = c.expect("LHLO lmtp.test", 250);
    assert!(r.has_line_starting("PIPELINING"), "{r:?}");
    c.expect("MAIL FROM:<a@example.test>", 250);
    c.expect("RCPT TO:<one@example.test>", 250);
    c.expect("RCPT TO:<two@example.test>", 250);
    c.expect("DATA", 354);
    c.send(b"Subject: lmtp\r\n\r\nto two\r\n.\r\n");
    let first = c.read_reply();
    let second = c.read_reply();
    assert_eq!(first.code, 250, "{first:?}");
    assert_eq!(second.code, 250, "{second:?}");
    // Nothing more: the next reply is QUIT's.
    c.expect("QUIT", 221);

    let list = relay.list();
    assert_eq!(list.len(), 1);
    assert_eq!(
        list[0].recipients,
        vec!["one@example.test", "two@example.test"]
    );
    let body = relay.body(&list[0].id);
    assert!(text(split_received(&body).0).contains("with LMTP"));
    // The SMTP listener is not there: only the lmtp one was configured.
    assert_eq!(show_field(&relay.show(&list[0].id), "listener"), "lmtp");
}

#[test]
fn per_ip_limit_counts_the_proxied_address() {
    let relay = Relay::builder()
        .lset("proxy_trusted_networks", "[\"127.0.0.0/8\"]")
        .lset("max_connections_per_ip", "1")
        .proxy_probe()
        .start();
    let proxied = |src: &str| -> Client {
        let mut c = relay.connect();
        c.send(format!("PROXY TCP4 {src} 10.0.0.1 1000 25\r\n").as_bytes());
        c
    };
    // The probe's connection may still be closing: retry while refused.
    let until = Instant::now() + Duration::from_secs(10);
    let mut a = loop {
        let mut c = proxied("192.0.2.1");
        let r = c.read_reply();
        if r.code == 220 {
            break c;
        }
        assert!(Instant::now() < until, "{r:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Same socket address (127.0.0.1), different client addresses: both admitted.
    let mut b = proxied("192.0.2.2");
    assert_eq!(b.read_reply().code, 220);
    // A second connection for 192.0.2.1 is over its limit.
    let mut c = proxied("192.0.2.1");
    let r = c.read_reply();
    assert_eq!((r.code, r.enhanced()), (421, "4.7.0"), "{r:?}");
    c.expect_closed();
    a.expect("NOOP", 250);
    b.expect("NOOP", 250);
}
