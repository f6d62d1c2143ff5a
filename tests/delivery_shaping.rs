//! Shaping of delivery to one destination site, seen from the next hop: higher
//! MT-PRIORITY goes first, per-site connection and messages-per-connection limits
//! are never exceeded (the loadgen sink records its maximum concurrent sessions
//! and messages per connection), and connections are reused.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);

/// `sluice-loadgen send --json` into the relay; returns its summary.
fn loadgen_send(relay: &Relay, args: &[&str]) -> Value {
    let out = run_with_timeout(
        Command::new(loadgen_bin())
            .args(["send", "--json", "--target", &relay.addr_string()])
            .args(args),
        Duration::from_secs(60),
    );
    let stdout = text(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "loadgen send printed {stdout:?} ({e}); stderr {}",
            text(&out.stderr)
        )
    })
}

fn site_relay(nsd: &Nsd, port: u16, extra: &[String]) -> Relay {
    mx_relay(nsd, port, 2, extra)
}

#[test]
fn higher_mt_priority_is_delivered_first() {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let nsd = Nsd::start(&format!("prio MX 10 mx1\nmx1 A {ip}"));
    // The next hop is slow to greet: the site's only connection is still being
    // opened while all messages queue; once it is ready, jobs leave the queue by
    // priority, then arrival.
    let sink = LoadgenSink::start(
        &[SocketAddr::new(ip.into(), port)],
        &["--delay-greeting", "6s"],
    );
    let relay = site_relay(
        &nsd,
        port,
        &["destination.default.max_connections=1".into()],
    );
    let msg = |tag: &str| {
        format!("Subject: {tag}\r\nMessage-ID: <{tag}@snd.dlv.test>\r\n\r\n{tag}\r\n").into_bytes()
    };
    let started = Instant::now();
    let mut c = relay.session();
    let mut send = |tag: &str, params: &str| {
        c.expect(&format!("MAIL FROM:<alice@snd.dlv.test>{params}"), 250);
        c.expect("RCPT TO:<bob@prio.dlv.test>", 250);
        c.expect("DATA", 354);
        c.send(&msg(tag));
        c.send(b".\r\n");
        assert_eq!(c.read_reply().code, 250);
    };
    send("plug", "");
    for i in 1..=3 {
        send(&format!("low{i}"), " MT-PRIORITY=-5");
    }
    for i in 1..=3 {
        send(&format!("high{i}"), " MT-PRIORITY=5");
    }
    send("normal1", "");
    c.send_line("QUIT");
    // Valid only if everything was queued while the first session still waited
    // for its greeting.
    let s = sink.stats();
    assert_eq!(
        s["messages"],
        0,
        "the sink took a message before all were queued ({:?} after the first): \
         the machine is too slow for this test's 6 s hold",
        started.elapsed()
    );
    let saved = sink.wait_saved(8, T, &relay);
    let order: Vec<&str> = saved.iter().map(|m| m.token().unwrap_or("?")).collect();
    assert_eq!(
        order,
        ["high1", "high2", "high3", "plug", "normal1", "low1", "low2", "low3"],
        "arrival order at the sink"
    );
    let s = sink.stats();
    assert_eq!(s["connections"], 1, "{s}");
}

#[test]
fn site_limits_hold_max_two_connections_three_messages_each() {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let nsd = Nsd::start(&format!("thr MX 10 mx1\nmx1 A {ip}"));
    // A little latency at end of data so deliveries overlap and the limits bite.
    let sink = LoadgenSink::start(
        &[SocketAddr::new(ip.into(), port)],
        &["--delay-data", "30ms"],
    );
    let relay = site_relay(
        &nsd,
        port,
        &[
            "destination={\"thr.dlv.test\"={max_connections=2,max_messages_per_connection=3}}"
                .into(),
        ],
    );
    let sent = loadgen_send(
        &relay,
        &[
            "--connections",
            "4",
            "--messages",
            "30",
            "--size",
            "600",
            "--domain",
            "thr.dlv.test",
        ],
    );
    assert_eq!(sent["accepted"], 30, "{sent}");
    wait_until(
        "30 messages at the sink",
        T,
        || sink.messages() >= 30,
        || relay.log(),
    );
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    let s = sink.stats();
    eprintln!(
        "sessions_max={} max_messages_per_connection={} connections={}",
        s["sessions_max"], s["max_messages_per_connection"], s["connections"]
    );
    assert_eq!(s["messages"], 30, "{s}");
    assert_eq!(s["tokens_unique"], 30, "{s}");
    assert_eq!(s["tokens_duplicated"], 0, "{s}");
    let sessions_max = s["sessions_max"].as_u64().unwrap();
    let per_conn = s["max_messages_per_connection"].as_u64().unwrap();
    assert!(sessions_max <= 2, "max_connections=2 exceeded: {s}");
    assert!(per_conn <= 3, "max_messages_per_connection=3 exceeded: {s}");
    assert!(s["connections"].as_u64().unwrap() >= 10, "{s}");
    // The limits were reached, not just respected by idling.
    assert_eq!(sessions_max, 2, "{s}");
    assert_eq!(per_conn, 3, "{s}");
}

#[test]
fn connections_are_reused_across_messages_to_one_site() {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let nsd = Nsd::start(&format!("reuse MX 10 mx1\nmx1 A {ip}"));
    let sink = LoadgenSink::start(&[SocketAddr::new(ip.into(), port)], &[]);
    let relay = site_relay(&nsd, port, &[]);
    // One after another, each sent once the previous one was delivered: the idle
    // connection (delivery.idle_timeout 5 s) carries them all.
    for i in 0..20u64 {
        submit(
            &relay,
            "alice@snd.dlv.test",
            "",
            &["bob@reuse.dlv.test"],
            format!("Subject: reuse {i}\r\nMessage-ID: <reuse{i}@snd.dlv.test>\r\n\r\nhi\r\n")
                .as_bytes(),
        );
        // Gone from the spool: its result is in, so the connection is idle again
        // (the sink counts a message before its 250 reaches the relay).
        wait_until(
            &format!("message {i} delivered"),
            T,
            || relay.count() == 0,
            || relay.log(),
        );
    }
    let s = sink.stats();
    assert_eq!(s["messages"], 20, "{s}");
    assert_eq!(s["connections"], 1, "one connection for all: {s}");
    assert_eq!(s["max_messages_per_connection"], 20, "{s}");

    // A burst of 30 from a pipelining client: deliveries overlap, so more
    // connections open (at most destination.default.max_connections = 16), and
    // each still carries several messages.
    let sent = loadgen_send(
        &relay,
        &[
            "--connections",
            "1",
            "--messages",
            "30",
            "--size",
            "600",
            "--domain",
            "reuse.dlv.test",
        ],
    );
    assert_eq!(sent["accepted"], 30, "{sent}");
    wait_until(
        "50 messages at the sink",
        T,
        || sink.messages() >= 50,
        || relay.log(),
    );
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    let s = sink.stats();
    eprintln!(
        "burst: connections={} sessions_max={} max_messages_per_connection={}",
        s["connections"], s["sessions_max"], s["max_messages_per_connection"]
    );
    assert_eq!(s["messages"], 50, "{s}");
    assert_eq!(s["tokens_duplicated"], 0, "{s}");
    let burst_connections = s["connections"].as_u64().unwrap() - 1;
    assert!(s["sessions_max"].as_u64().unwrap() <= 16, "{s}");
    assert!(
        burst_connections <= 15,
        "30 messages over {burst_connections} connections: connections are reused ({s})"
    );
}
