//! Delivery to a next hop that does not offer PIPELINING (RFC 2920): the relay
//! must send each command only after the reply to the one before it. The next
//! hop here is a strict scripted server that, like Postfix's smtpd with
//! reject_unauth_pipelining, looks right after each command line for bytes of
//! the next one and answers 554 (closing) when it finds any.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use sluice_testkit::*;

const T: Duration = Duration::from_secs(20);
/// The scripted next hop: strict about pipelining, EHLO offers CHUNKING when
/// `chunking` and never PIPELINING; recipients starting with "nobody" get 550.
fn strict_server(chunking: bool) -> ScriptedServer {
    let mut b = ScriptedServer::builder()
        .name("strict.test")
        .strict_pipelining()
        .capability("8BITMIME");
    if chunking {
        b = b.capability("CHUNKING");
    }
    b.capability("SIZE 10000000")
        .on_arg(
            "RCPT",
            "<nobody",
            Act::Reply("550 5.1.1 <nobody>: Recipient address rejected".into()),
        )
        .start(SocketAddr::new(loopback().into(), 0))
}

/// A relay sending everything over route "default" (type relay) to `hop`.
fn relay_to(hop: SocketAddr) -> Relay {
    Relay::builder()
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set("delivery.connect_timeout=\"5s\"")
        .set("queue.default.retry=[\"1s\"]")
        .set(format!(
            "route.default={{type=\"relay\",host=\"{}\",port={},tls=\"none\"}}",
            hop.ip(),
            hop.port()
        ))
        .start()
}

fn body(tag: &str) -> Vec<u8> {
    format!("Subject: {tag}\r\nMessage-ID: <{tag}@snd.dlv.test>\r\n\r\n{tag} body\r\n").into_bytes()
}

/// The server's check works: a client that pipelines is refused.
fn assert_server_refuses_pipelining(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).expect("connect to strict server");
    s.set_read_timeout(Some(T)).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(b"\r\n") {
        let n = s.read(&mut buf).expect("greeting");
        assert!(n > 0, "closed before the greeting");
        got.extend_from_slice(&buf[..n]);
    }
    s.write_all(b"HELO probe.test\r\nMAIL FROM:<>\r\n")
        .expect("write");
    got.clear();
    loop {
        let n = s.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(
        text(&got),
        format!("{PIPELINING_REFUSAL}\r\n"),
        "pipelining was not refused"
    );
}

/// Checks the server's pipelining check, then forgets the probe.
fn probe(server: &ScriptedServer) {
    assert_server_refuses_pipelining(server.addr());
    assert_eq!(server.early(), ["HELO probe.test"]);
    server.reset();
}

fn wait_delivered(relay: &Relay, server: &ScriptedServer, n: usize) {
    wait_until(
        &format!("{n} message(s) at the strict server"),
        T,
        || server.messages().len() >= n || !server.early().is_empty(),
        || format!("commands: {:?}\n{}", server.commands(), relay.log()),
    );
    assert!(
        server.early().is_empty(),
        "the relay sent ahead of a reply after {:?}; commands: {:?}",
        server.early(),
        server.commands()
    );
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
}

#[test]
fn no_pipelining_server_gets_one_command_per_reply_with_data() {
    let server = strict_server(false);
    probe(&server);
    let relay = relay_to(server.addr());
    submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["bob@far.test", "carol@far.test", "dave@far.test"],
        &body("lockstep1"),
    );
    wait_delivered(&relay, &server, 1);
    // A refused recipient in the middle: the rest still go, then DATA.
    submit(
        &relay,
        "",
        "",
        &["erin@far.test", "nobody@far.test", "frank@far.test"],
        &body("lockstep2"),
    );
    wait_delivered(&relay, &server, 2);
    let msgs = server.messages();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    let first = msgs
        .iter()
        .find(|m| m.body_text().contains("lockstep1 body"))
        .expect("first message");
    assert_eq!(first.how, "DATA");
    assert!(
        first.mail.starts_with("MAIL FROM:<alice@snd.dlv.test>"),
        "{first:?}"
    );
    assert_eq!(
        first.rcpt_addresses(),
        ["bob@far.test", "carol@far.test", "dave@far.test"]
    );
    let second = msgs
        .iter()
        .find(|m| m.body_text().contains("lockstep2 body"))
        .expect("second message");
    assert_eq!(second.rcpt_addresses(), ["erin@far.test", "frank@far.test"]);
    let commands = server.commands();
    assert!(
        commands
            .iter()
            .any(|c| c.to_ascii_lowercase().contains("<nobody@far.test>")),
        "the refused recipient was tried: {commands:?}"
    );
}

#[test]
fn chunking_without_pipelining_sends_bdat_after_the_rcpt_replies() {
    let server = strict_server(true);
    probe(&server);
    let relay = relay_to(server.addr());
    submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["bob@far.test", "carol@far.test", "dave@far.test"],
        &body("chunked"),
    );
    wait_delivered(&relay, &server, 1);
    let msgs = server.messages();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0].how, "BDAT");
    assert!(msgs[0].body_text().contains("chunked body"), "{msgs:?}");
    assert_eq!(
        msgs[0].rcpt_addresses(),
        ["bob@far.test", "carol@far.test", "dave@far.test"]
    );
    // One chunk with LAST is all the relay should send.
    let bdats: Vec<String> = server
        .commands()
        .into_iter()
        .filter(|c| c.to_ascii_uppercase().starts_with("BDAT "))
        .collect();
    assert!(
        bdats.len() == 1 && bdats[0].to_ascii_uppercase().ends_with(" LAST"),
        "expected one BDAT LAST: {bdats:?}"
    );
}
