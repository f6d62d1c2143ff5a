//! Delivery to a smart host chosen by a `[[rule]]`: STARTTLS required and AUTH,
//! against the loadgen sink (which counts TLS sessions) and against a second real
//! sluice as the upstream relay (which checks the password and records the
//! authenticated user and TLS in its spool).

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use sluice_testkit::*;

const T: Duration = Duration::from_secs(20);
const USER: &str = "relay-user";
const PASSWORD: &str = "s3cret-Pass";

/// A relay whose recipients at far.example go to the smart host `host:port`.
fn relay_via_smarthost(host: &str, port: u16, tls: &str, password: &str) -> Relay {
    Relay::builder()
        .cores(2)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set("queue.default.retry=[\"1s\"]")
        .set(format!(
            "route.smarthost={{type=\"relay\",host=\"{host}\",port={port},tls=\"{tls}\",\
             auth_user=\"{USER}\",auth_password=\"{password}\"}}"
        ))
        .set("rule=[{match={recipient_domain=[\"far.example\"]},route=\"smarthost\"}]")
        .start()
}

/// A second sluice as the smart host: STARTTLS, one AUTH user, no delivery.
fn upstream_relay() -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(dir.path());
    Relay::builder()
        .dir(dir)
        .set(format!("auth.users.{USER}=\"{}\"", hash_password(PASSWORD)))
        .set("relay.relay_networks=[\"10.255.255.0/24\"]")
        .lset("tls", "\"starttls\"")
        .lset("tls_cert", &format!("\"{}\"", cert.display()))
        .lset("tls_key", &format!("\"{}\"", key.display()))
        .start()
}

const BODY: &[u8] =
    b"From: alice@snd.example\r\nTo: bob@far.example\r\nSubject: via smart host\r\n\
Message-ID: <smart@snd.example>\r\n\r\nhello\r\n..dot\r\n";

#[test]
fn smart_host_with_auth_over_required_starttls_loadgen_sink() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(dir.path());
    let ip = loopback();
    let port = TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sink = LoadgenSink::start(
        &[SocketAddr::new(ip.into(), port)],
        &[
            "--auth",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let relay = relay_via_smarthost(&ip.to_string(), port, "required", PASSWORD);
    let id = submit(&relay, "alice@snd.example", "", &["bob@far.example"], BODY);
    let saved = sink.wait_saved(1, T, &relay);
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    assert_eq!(saved[0].rcpts(), vec!["bob@far.example".to_string()]);
    assert_stored_exact(&saved[0].eml, b"From: alice@snd.example\r\nTo: bob@far.example\r\nSubject: via smart host\r\nMessage-ID: <smart@snd.example>\r\n\r\nhello\r\n.dot\r\n", &id);
    let stats = sink.stats();
    assert_eq!(
        stats["tls_sessions"], 1,
        "the session was encrypted: {stats}"
    );
    assert_eq!(stats["connections"], 1, "{stats}");
    let a = attempts(&relay, &id);
    assert_eq!(a.len(), 1, "{a:#?}");
    assert_eq!(field(&a[0], "status"), "delivered", "{a:#?}");
    assert_eq!(field(&a[0], "site"), "route:smarthost", "{a:#?}");
    assert!(field(&a[0], "tls").starts_with("TLSv1."), "{a:#?}");
    assert_eq!(a[0]["tls_verified"], false, "self-signed: {a:#?}");
}

#[test]
fn smart_host_upstream_sluice_sees_the_authenticated_user_and_tls() {
    let upstream = upstream_relay();
    let relay = relay_via_smarthost("127.0.0.1", upstream.port, "required", PASSWORD);
    let id = submit(&relay, "alice@snd.example", "", &["bob@far.example"], BODY);
    wait_until(
        "the message at the upstream relay",
        T,
        || upstream.count() == 1,
        || format!("relay:\n{}\nupstream:\n{}", relay.log(), upstream.log()),
    );
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    let up = spool_ids(&upstream);
    assert_eq!(up.len(), 1);
    let show = upstream.show(&up[0]);
    assert_eq!(show_field(&show, "sender"), "<alice@snd.example>", "{show}");
    assert!(show.contains("recipient: <bob@far.example>"), "{show}");
    assert_eq!(show_field(&show, "auth_user"), USER, "{show}");
    assert!(show_field(&show, "tls").starts_with("TLSv1."), "{show}");
    // Upstream's Received:, then ours, then exactly what the client sent.
    let body = upstream.body(&up[0]);
    let (_, ours) = split_received(&body);
    assert_stored_exact(
        ours,
        b"From: alice@snd.example\r\nTo: bob@far.example\r\nSubject: via smart host\r\nMessage-ID: <smart@snd.example>\r\n\r\nhello\r\n.dot\r\n",
        &id,
    );
}

#[test]
fn smart_host_refusing_the_password_defers_and_does_not_bounce() {
    // A wrong password is our configuration error, not the recipient's: the
    // message must wait (like Postfix's smtp_sasl_auth_soft_bounce=yes), not bounce.
    let upstream = upstream_relay();
    let relay = relay_via_smarthost("127.0.0.1", upstream.port, "required", "wrong-password");
    let id = submit(&relay, "alice@snd.example", "", &["bob@far.example"], BODY);
    wait_until(
        "a first attempt",
        T,
        || !attempts(&relay, &id).is_empty(),
        || relay.log(),
    );
    let a = attempts(&relay, &id);
    assert_eq!(
        field(&a[0], "status"),
        "deferred",
        "an AUTH failure at the smart host must defer, not bounce: {a:#?}"
    );
    // The attempt is logged before its result reaches the envelope.
    wait_until(
        "the deferral in the envelope",
        T,
        || {
            try_show(&relay, &id)
                .expect("the message stays queued")
                .contains("deferred")
        },
        || try_show(&relay, &id).unwrap_or_default(),
    );
    assert_eq!(upstream.count(), 0);
}

#[test]
fn required_tls_to_a_host_without_starttls_defers() {
    let ip = loopback();
    let port = TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sink = LoadgenSink::start(&[SocketAddr::new(ip.into(), port)], &["--auth"]);
    let relay = relay_via_smarthost(&ip.to_string(), port, "required", PASSWORD);
    let id = submit(&relay, "alice@snd.example", "", &["bob@far.example"], BODY);
    let mut show = String::new();
    wait_until(
        "two deferred attempts",
        T,
        || {
            show = try_show(&relay, &id).expect("the message stays queued");
            recipient_lines(&show)
                .first()
                .and_then(|l| deferred_attempts(l))
                .is_some_and(|n| n >= 2)
        },
        || relay.log(),
    );
    assert!(show.contains(" 4."), "{show}");
    let stats = sink.stats();
    assert_eq!(stats["messages"], 0, "nothing went in plaintext: {stats}");
    assert_eq!(relay.count(), 1, "no notice: {:?}", spool_ids(&relay));
}
