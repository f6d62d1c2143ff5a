//! Per destination host limits besides concurrency, and per-queue concurrency,
//! end to end through the real relay binary, a real NSD on loopback and the
//! scripted SMTP server of the test kit (message times, messages per connection,
//! concurrent transactions):
//!
//! - `[delivery] host_message_rate` holds across sites (three domains sharing
//!   one MX host) and cores;
//! - `[delivery] host_max_messages_per_connection` caps every connection;
//! - `[queue.X] concurrency = 1` never lets two deliveries of the queue overlap,
//!   even to several sites.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn body(tag: &str) -> Vec<u8> {
    format!("Subject: {tag}\r\nMessage-ID: <{tag}@snd.dlv.test>\r\n\r\n{tag} body\r\n").into_bytes()
}

/// The recording next hop: one thread per session, no PIPELINING; the end of
/// data is answered after `data_delay`, so deliveries that may overlap do.
fn recorder(addr: SocketAddr, data_delay: Duration) -> ScriptedServer {
    ScriptedServer::builder()
        .name("rec.test")
        .capability("8BITMIME")
        .capability("SIZE 100000000")
        .on(END_OF_DATA, Act::Delay(data_delay))
        .start(addr)
}

/// NSD with d1, d2 and d3 (.dlv.test) all pointing at one MX host `mx1` on a
/// fresh loopback address, a recorder there, and a two-core relay with `extra`.
fn shared_mx(data_delay: Duration, extra: &[&str]) -> (Nsd, ScriptedServer, Relay) {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let nsd = Nsd::start(&format!(
        "d1 MX 10 mx1\nd2 MX 10 mx1\nd3 MX 10 mx1\nmx1 A {ip}"
    ));
    let rec = recorder(sa(ip, port), data_delay);
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let relay = mx_relay(&nsd, port, 2, &extra);
    (nsd, rec, relay)
}

/// Sends `n` messages on one session, to d1, d2, d3 in turn (or to `domains`).
fn send(relay: &Relay, n: usize, domains: &[&str], tag: &str) {
    let mut c = relay.session();
    for i in 0..n {
        let d = domains[i % domains.len()];
        c.send_mail(
            "alice@snd.dlv.test",
            &[&format!("bob{i}@{d}.dlv.test")],
            &body(&format!("{tag}{i}")),
        );
    }
    c.send_line("QUIT");
}

fn wait_done(rec: &ScriptedServer, relay: &Relay, n: usize) -> Vec<Received> {
    wait_until(
        &format!("{n} messages at the recorder"),
        T,
        || rec.messages().len() >= n,
        || relay.log(),
    );
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    let msgs = rec.messages();
    assert_eq!(msgs.len(), n, "no duplicates");
    msgs
}

#[test]
fn host_message_rate_holds_across_domains_sharing_an_mx_host() {
    let (_nsd, rec, relay) = shared_mx(Duration::ZERO, &["delivery.host_message_rate=[\"2/s\"]"]);
    send(&relay, 6, &["d1", "d2", "d3"], "rate");
    let msgs = wait_done(&rec, &relay, 6);
    let mut rcpts: Vec<String> = msgs.iter().flat_map(|m| m.rcpts.clone()).collect();
    rcpts.sort();
    rcpts.dedup();
    assert_eq!(rcpts.len(), 6, "{rcpts:?}");
    for d in ["d1", "d2", "d3"] {
        assert!(rcpts.iter().any(|r| r.contains(d)), "{d}: {rcpts:?}");
    }
    let first = msgs.iter().map(|m| m.at).min().unwrap();
    let last = msgs.iter().map(|m| m.at).max().unwrap();
    // Burst of two, then one every 500 ms: the sixth 2 s after the first.
    assert!(
        last - first >= Duration::from_millis(1500),
        "6 messages at 2/s to one host arrived within {:?}",
        last - first
    );
}

#[test]
fn host_max_messages_per_connection_caps_every_connection() {
    let (_nsd, rec, relay) = shared_mx(
        Duration::from_millis(100),
        &[
            "delivery.host_max_messages_per_connection=2",
            "destination.default.max_connections=1",
        ],
    );
    // Mostly one site with one connection at a time, whose own limit (100)
    // would let that connection carry everything queued meanwhile.
    send(&relay, 9, &["d1", "d1", "d2"], "conn");
    wait_done(&rec, &relay, 9);
    let (most, conns) = rec.per_connection();
    assert!(most <= 2, "a connection carried {most} messages");
    assert!(conns >= 5, "9 messages over only {conns} connections");
}

#[test]
fn queue_concurrency_one_never_overlaps_deliveries_to_several_sites() {
    let (_nsd, rec, relay) = shared_mx(
        Duration::from_millis(200),
        &[
            "queue.default.concurrency=1",
            "delivery.idle_timeout=\"200ms\"",
        ],
    );
    send(&relay, 6, &["d1", "d2", "d3"], "conc");
    let msgs = wait_done(&rec, &relay, 6);
    let in_tx_max = rec.max_transactions();
    assert_eq!(
        in_tx_max, 1,
        "two deliveries of a queue with concurrency 1 overlapped"
    );
    // One at a time: at least 6 × 200 ms from the first to the last.
    let first = msgs.iter().map(|m| m.at).min().unwrap();
    let last = msgs.iter().map(|m| m.at).max().unwrap();
    assert!(
        last - first >= Duration::from_millis(1000),
        "{:?}",
        last - first
    );
}
