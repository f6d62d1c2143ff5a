//! Remote faults: the real relay delivers to next hops that misbehave — the
//! loadgen sink injecting 4xx/5xx at RCPT and at the end of data, 421s,
//! disconnects in the middle of DATA and after it, greylisting; sinks that stall
//! before the greeting, at RCPT or after the final dot; and the test kit's
//! scripted server (no PIPELINING) that never answers EHLO, MAIL or RCPT,
//! or stops reading in the middle of the message body.
//!
//! What must hold: temporary failures are retried and delivered once the fault
//! clears, permanent ones bounce (one DSN to the sender), every stage has its
//! timeout, nothing acknowledged is lost, and the relay's open sockets return to
//! their count before the faults (no connection leaks).
//!
//! Size of the storm: `RELIABILITY_REMOTE_MESSAGES` (default 200, the CI form).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sluice_testkit::*;

const T: Duration = Duration::from_secs(60);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// A relay that sends every recipient to `host:port` (a [route.sink] of type
/// smtp), retries every second, keeps idle connections 1 s, with `extra` sets.
fn relay_to(host: Ipv4Addr, port: u16, cores: usize, extra: &[String]) -> Relay {
    let mut b = Relay::builder()
        .cores(cores)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set("delivery.connect_timeout=\"2s\"")
        .set("delivery.idle_timeout=\"1s\"")
        .set("queue.default.retry=[\"1s\"]")
        .set(format!(
            "route.sink={{type=\"smtp\",host=\"{host}\",port={port},tls=\"none\"}}"
        ))
        .set("rule=[{route=\"sink\"}]");
    for e in extra {
        b = b.set(e.clone());
    }
    b.start()
}

fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------
// (1) A storm of 4xx/5xx replies, 421s, greylisting and dropped connections
// ---------------------------------------------------------------------------------

#[test]
fn fault_storm_retries_bounces_and_loses_nothing() {
    let messages = env_count("RELIABILITY_REMOTE_MESSAGES", 200);
    let ip = loopback();
    let port = mx_port(&[ip]);
    // d1.example: every RCPT refused 550 (→ bounce). Everything else (d0.example
    // and the bounces to the sender): greylisted once, then 15% 451 and 5% 421
    // at RCPT, 10% 452 and 5% disconnect after the data, 10% disconnect in the
    // middle of the data.
    let sink = LoadgenSink::start(
        &[sa(ip, port)],
        &[
            "--greylist",
            "--fault",
            "at=rcpt,code=550,share=100%,domain=d1.example,esc=5.1.1,text=no such user",
            "--fault",
            "at=rcpt,code=451,share=15%",
            "--fault",
            "at=rcpt,code=421,share=5%",
            "--fault",
            "at=data,code=452,share=10%",
            "--fault",
            "at=data,disconnect,share=5%",
            "--fault",
            "at=mid-data,share=10%",
        ],
    );
    let relay = relay_to(ip, port, 2, &[]);
    let baseline = baseline(&relay);

    let dir = tempfile::tempdir().expect("tempdir");
    let acks = dir.path().join("acks.txt");
    let out = run_with_timeout(
        Command::new(loadgen_bin())
            .args(["send", "--json", "--target", &relay.addr_string()])
            .args(["--connections", "8", "--messages", &messages.to_string()])
            .args(["--size-dist", "1024,20480,200000", "--domains", "2"])
            .arg("--ack-log")
            .arg(&acks),
        Duration::from_secs(120 + messages / 10),
    );
    let sent: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("loadgen send: {e}; stderr {}", text(&out.stderr)));
    assert_eq!(
        sent["accepted"], messages,
        "every message acknowledged: {sent}"
    );
    let acked: Vec<String> = std::fs::read_to_string(&acks)
        .expect("ack log")
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    assert_eq!(acked.len() as u64, messages, "ack log lines");

    wait_until(
        "the spool to empty (all delivered or bounced)",
        Duration::from_secs(180 + messages / 10),
        || relay.count() == 0,
        || format!("sink stats {}", sink.stats()),
    );

    // What arrived: originals (by token, one recipient each) and bounces.
    let saved = sink.saved();
    let mut delivered: BTreeMap<String, usize> = BTreeMap::new();
    let mut bounced: BTreeMap<String, usize> = BTreeMap::new();
    for s in &saved {
        if s.from().is_empty() {
            // A DSN: a failure report for the d1.example recipient of one
            // acknowledged message.
            let v = parse_dsn(&s.eml);
            assert_eq!(v["report_type"], "delivery-status", "{v:#}");
            let r = &v["recipients"];
            assert_eq!(r.as_array().map(Vec::len), Some(1), "{v:#}");
            assert_eq!(r[0]["action"], "failed", "{v:#}");
            assert!(field(&r[0], "status").starts_with("5.1.1"), "{v:#}");
            assert!(
                field(&r[0], "final-recipient").ends_with("@d1.example"),
                "{v:#}"
            );
            let body = text(&s.eml);
            let token = acked
                .iter()
                .find(|t| body.contains(&format!("<{t}@")))
                .unwrap_or_else(|| panic!("DSN for no acknowledged message: {v:#}"));
            *bounced.entry(token.clone()).or_default() += 1;
        } else {
            let rcpts = s.rcpts();
            assert!(
                rcpts.iter().all(|r| r.ends_with("@d0.example")),
                "only d0.example is ever accepted: {rcpts:?}"
            );
            let token = s.token().expect("token").to_string();
            *delivered.entry(token).or_default() += 1;
        }
    }
    let lost: Vec<&String> = acked
        .iter()
        .filter(|t| !delivered.contains_key(*t) && !bounced.contains_key(*t))
        .collect();
    let both: Vec<&String> = acked
        .iter()
        .filter(|t| delivered.contains_key(*t) && bounced.contains_key(*t))
        .collect();
    let dup_delivered: u64 = delivered.values().map(|n| *n as u64 - 1).sum();
    let dup_bounced: u64 = bounced.values().map(|n| *n as u64 - 1).sum();
    let stats = sink.stats();
    let attempts = log_events(&relay, "delivery attempt");
    let deferred = attempts
        .iter()
        .filter(|a| field(a, "status") == "deferred")
        .count();
    let failed = attempts
        .iter()
        .filter(|a| field(a, "status") == "failed")
        .count();
    let sockets_after = wait_sockets_back(&relay, baseline, "after the storm");
    eprintln!(
        "remote fault storm: {messages} acknowledged; {} delivered, {} bounced, {} lost, \
         {dup_delivered} duplicate deliveries, {dup_bounced} duplicate bounces; \
         relay attempts: {} ({deferred} deferred, {failed} failed); sink: {} connections, \
         greylisted {}, RCPT refusals {}, data refusals {}, disconnects {}; relay TCP connections \
         {baseline} before, {sockets_after} after",
        delivered.len(),
        bounced.len(),
        lost.len(),
        attempts.len(),
        stats["connections"],
        stats["greylisted"],
        stats["rcpt_rejected"],
        stats["data_rejected"],
        stats["disconnects"],
    );
    assert!(
        lost.is_empty(),
        "acknowledged but neither delivered nor bounced: {lost:?}"
    );
    assert!(both.is_empty(), "delivered and bounced: {both:?}");
    assert!(
        !delivered.is_empty() && !bounced.is_empty(),
        "both outcomes exercised: {} delivered, {} bounced",
        delivered.len(),
        bounced.len()
    );
    // The sink saves nothing it did not answer 250 to, so a duplicate here would
    // be the relay sending again what was acknowledged.
    assert_eq!(dup_delivered, 0, "duplicate deliveries: {delivered:?}");
    assert_eq!(dup_bounced, 0, "one bounce per message: {bounced:?}");
    // Faults really were hit, and retried.
    assert!(deferred > 0 && stats["greylisted"].as_u64().unwrap_or(0) > 0);
    let disc = &stats["disconnects"];
    assert!(
        disc["mid_data"].as_u64().unwrap_or(0) > 0 && disc["data"].as_u64().unwrap_or(0) > 0,
        "disconnects injected: {disc}"
    );
}

// ---------------------------------------------------------------------------------
// (2) Stalls: no greeting, no RCPT reply, no reply to the final dot
// ---------------------------------------------------------------------------------

#[test]
fn stalled_next_hops_time_out_per_stage_then_mail_is_delivered() {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let relay = relay_to(
        ip,
        port,
        1,
        &[
            "delivery.greeting_timeout=\"1s\"".into(),
            "delivery.rcpt_timeout=\"1s\"".into(),
            "delivery.data_end_timeout=\"1s\"".into(),
        ],
    );
    let baseline = baseline(&relay);
    // The sink offers PIPELINING and CHUNKING, so MAIL, RCPT and BDAT LAST go
    // in one write; each reply is still awaited under its own stage's timeout.
    for (stall, stage, timeout_in) in [
        ("--delay-greeting", "Greeting", "Greeting"),
        ("--delay-rcpt", "Rcpt", "Rcpt"),
        ("--delay-data", "DataEnd", "DataEnd"),
    ] {
        // A sink that takes an hour at this stage.
        let mut stalled = LoadgenSink::start(&[sa(ip, port)], &[stall, "1h"]);
        let tag = format!("stall-{stage}");
        let id = submit(
            &relay,
            "alice@snd.test",
            "",
            &[&format!("bob@{}.far.test", stage.to_ascii_lowercase())],
            format!("Subject: {tag}\r\nMessage-ID: <{tag}@snd.test>\r\n\r\nbody\r\n").as_bytes(),
        );
        let want = format!("timeout in {timeout_in} stage");
        wait_until(
            &format!("a deferral by the {stage} timeout"),
            Duration::from_secs(30),
            || {
                attempts(&relay, &id)
                    .iter()
                    .any(|a| field(a, "status") == "deferred" && field(a, "reply").contains(&want))
            },
            || relay.log(),
        );
        assert_eq!(
            stalled.messages(),
            0,
            "nothing completed at the stalled sink"
        );
        assert!(
            try_show(&relay, &id).is_some(),
            "the deferred message is kept"
        );
        stalled.kill();
        // The fault clears: a sink that answers on the same address.
        let good = LoadgenSink::start(&[sa(ip, port)], &[]);
        let got = good.wait_saved(1, T, &relay);
        assert_eq!(got[0].token(), Some(tag.as_str()), "{:?}", got[0].env);
        wait_until(
            "the spool to empty",
            T,
            || try_show(&relay, &id).is_none(),
            || relay.log(),
        );
        drop(good);
        let after = wait_sockets_back(&relay, baseline, stage);
        eprintln!("stall at {stage}: deferred by the timeout, delivered after; TCP connections {baseline} -> {after}");
    }
}

// ---------------------------------------------------------------------------------
// (3) A next hop that stops reading in the middle of the body
// ---------------------------------------------------------------------------------

/// The scripted next hop without PIPELINING (one command per reply): it
/// starts stalled at DATA (answers 354, then never reads another byte, so the
/// relay's writes fill the socket buffers and block); tests move the stall to
/// EHLO, MAIL or RCPT (no reply, ever) or clear it.
fn no_read_server(addr: SocketAddr) -> ScriptedServer {
    ScriptedServer::builder()
        .name("noread.test")
        .capability("SIZE 100000000")
        .on("DATA", Act::StopReading)
        .start(addr)
}

/// Moves the server's stall to `verb` (None: no stall).
fn stall_at(server: &ScriptedServer, verb: Option<&str>) {
    for v in ["EHLO", "MAIL", "RCPT", "DATA"] {
        server.set(v, None);
    }
    match verb {
        Some("DATA") => server.set("DATA", Some(Act::StopReading)),
        Some(v) => server.set(v, Some(Act::Hang)),
        None => {}
    }
}

#[test]
fn next_hop_that_stops_reading_mid_body_times_out_and_is_retried() {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let server = no_read_server(sa(ip, port));
    let relay = relay_to(ip, port, 1, &["delivery.data_timeout=\"2s\"".into()]);
    let baseline = baseline(&relay);
    // 12 MiB: far more than the socket buffers of both ends on loopback hold.
    let line = "x".repeat(998) + "\r\n";
    let mut body = b"Subject: big\r\nMessage-ID: <big@snd.test>\r\n\r\n".to_vec();
    for _ in 0..12 * 1050 {
        body.extend_from_slice(line.as_bytes());
    }
    let id = submit(&relay, "alice@snd.test", "", &["bob@far.test"], &body);
    wait_until(
        "a deferral of the stalled body transfer",
        Duration::from_secs(30),
        || {
            attempts(&relay, &id)
                .iter()
                .any(|a| field(a, "status") == "deferred")
        },
        || relay.log(),
    );
    let reply = attempts(&relay, &id)
        .iter()
        .map(|a| field(a, "reply").to_string())
        .next()
        .unwrap_or_default();
    assert!(server.hung() >= 1);
    // The relay gave up its side of the stalled connection.
    let after = wait_sockets_back(&relay, baseline, "stalled body");
    eprintln!("stalled body: deferred ({reply}); TCP connections {baseline} -> {after}");
    // The peer reads again: the retry delivers the whole body.
    stall_at(&server, None);
    wait_until(
        "delivery after the stall",
        T,
        || try_show(&relay, &id).is_none(),
        || relay.log(),
    );
    let sizes: Vec<usize> = server.messages().iter().map(|m| m.body.len()).collect();
    assert_eq!(sizes.len(), 1, "{sizes:?}");
    assert!(sizes[0] >= 12 * 1024 * 1024, "{sizes:?}");
}

/// The relay's TCP connections once the readiness probe is gone (0).
fn baseline(relay: &Relay) -> usize {
    wait_connections_at_most(relay.pid(), 0, "after start", Duration::from_secs(10))
}

/// Waits until the relay holds no more TCP connections than `baseline`.
fn wait_sockets_back(relay: &Relay, baseline: usize, what: &str) -> usize {
    wait_connections_at_most(relay.pid(), baseline, what, Duration::from_secs(30))
}

#[test]
fn scripted_stalls_at_ehlo_mail_and_rcpt_time_out_by_their_own_timeouts() {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let server = no_read_server(sa(ip, port));
    let relay = relay_to(
        ip,
        port,
        1,
        &[
            "delivery.ehlo_timeout=\"1s\"".into(),
            "delivery.mail_timeout=\"1s\"".into(),
            "delivery.rcpt_timeout=\"1s\"".into(),
        ],
    );
    let baseline = baseline(&relay);
    for (verb, stage) in [("EHLO", "Ehlo"), ("MAIL", "Mail"), ("RCPT", "Rcpt")] {
        stall_at(&server, Some(verb));
        let before = server.messages().len();
        let tag = format!("scripted-{stage}");
        let id = submit(
            &relay,
            "alice@snd.test",
            "",
            &["bob@far.test"],
            format!("Subject: {tag}\r\nMessage-ID: <{tag}@snd.test>\r\n\r\nbody\r\n").as_bytes(),
        );
        let want = format!("timeout in {stage} stage");
        wait_until(
            &format!("a deferral by the {stage} timeout"),
            Duration::from_secs(30),
            || {
                attempts(&relay, &id)
                    .iter()
                    .any(|a| field(a, "status") == "deferred" && field(a, "reply").contains(&want))
                    || log_events(&relay, "connection attempt failed")
                        .iter()
                        .any(|a| field(a, "reply").contains(&want))
            },
            || relay.log(),
        );
        assert!(
            try_show(&relay, &id).is_some(),
            "the deferred message is kept"
        );
        let after = wait_sockets_back(&relay, baseline, stage);
        // The fault clears: the retry goes through.
        stall_at(&server, None);
        wait_until(
            "delivery after the stall",
            T,
            || try_show(&relay, &id).is_none(),
            || relay.log(),
        );
        assert_eq!(server.messages().len(), before + 1);
        eprintln!("scripted stall at {verb}: deferred ({want}), delivered after; TCP connections {baseline} -> {after}");
    }
}
