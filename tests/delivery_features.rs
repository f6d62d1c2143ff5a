//! Delivery features seen end to end through the real relay binary, a real NSD
//! on loopback and real next hops (the loadgen sink, Postfix's smtp-sink and a
//! scripted SMTP server of the test kit): FUTURERELEASE holds, DELIVERBY
//! deadlines, queue quotas, fallback routes, destination connection and message
//! rates, the per-host connection limit, a rule's source IP and EHLO name, and
//! success notices (NOTIFY=SUCCESS) to next hops with and without DSN.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_testkit::*;

const T: Duration = Duration::from_secs(20);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

fn body(tag: &str) -> Vec<u8> {
    format!("Subject: {tag}\r\nMessage-ID: <{tag}@snd.dlv.test>\r\n\r\n{tag} body\r\n").into_bytes()
}

/// A relay delivering to `route` (a [route.r] of type smtp at `host:port`) for
/// every recipient, retrying every second unless `extra` says otherwise.
fn route_relay(host: Ipv4Addr, port: u16, cores: usize, extra: &[String]) -> Relay {
    let mut b = Relay::builder()
        .cores(cores)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set("delivery.connect_timeout=\"5s\"")
        .set("queue.default.retry=[\"1s\"]")
        .set(format!(
            "route.r={{type=\"smtp\",host=\"{host}\",port={port}}}"
        ))
        .set("rule=[{match={recipient_domain=[\"far.test\"]},route=\"r\"}]");
    for e in extra {
        b = b.set(e.clone());
    }
    b.start()
}

/// Polls a loadgen sink's saved messages, noting the wall time each was first
/// seen (20 ms resolution), until `n` are in.
fn arrivals(sink: &LoadgenSink, n: usize, relay: &Relay) -> Vec<(Saved, u64)> {
    let mut seen: Vec<(Saved, u64)> = Vec::new();
    wait_until(
        &format!("{n} message(s) at the sink"),
        T,
        || {
            let t = now_ms();
            for s in sink.saved() {
                if !seen.iter().any(|(x, _)| x.name == s.name) {
                    seen.push((s, t));
                }
            }
            seen.len() >= n
        },
        || relay.log(),
    );
    seen
}

/// A recording next hop (accept and message times, one thread per session): no
/// PIPELINING, no DSN.
fn mini_sink(addr: SocketAddr) -> ScriptedServer {
    ScriptedServer::builder()
        .name("mini.test")
        .capability("8BITMIME")
        .capability("SIZE 100000000")
        .start(addr)
}

// ---------------------------------------------------------------------------------
// (1) FUTURERELEASE
// ---------------------------------------------------------------------------------

/// Waits until the wall clock's millisecond within the second is in [lo, hi).
fn align_subsec(lo: u64, hi: u64) {
    let until = Instant::now() + Duration::from_secs(3);
    while !(lo..hi).contains(&(now_ms() % 1000)) {
        assert!(Instant::now() < until, "clock alignment");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Sends one message with `params` on an EHLOed session; returns its id.
fn send_with(c: &mut Client, params: &str, rcpt: &str, tag: &str) -> String {
    c.expect(&format!("MAIL FROM:<alice@snd.dlv.test> {params}"), 250);
    c.expect(&format!("RCPT TO:<{rcpt}>"), 250);
    c.expect("DATA", 354);
    c.send(&body(tag));
    c.send(b".\r\n");
    let r = c.read_reply();
    assert_eq!(r.code, 250, "{r:?}");
    queued_id(&r.text()).unwrap()
}

#[test]
fn futurerelease_holds_are_advertised_shown_and_honoured() {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let sink = LoadgenSink::start(&[sa(ip, port)], &[]);
    let relay = route_relay(ip, port, 2, &[]);

    let mut c = relay.greeted();
    let ehlo = c.expect("EHLO client.test", 250);
    assert!(
        ehlo.has_line_starting("FUTURERELEASE 604800 "),
        "EHLO does not advertise FUTURERELEASE: {ehlo:?}"
    );
    // HOLDFOR=3 sent just after a whole second (1 to 100 ms into it): the relay
    // rounds the release up to a whole second, so it is the next second + 3 (see
    // futurerelease_holdfor_is_not_released_early).
    align_subsec(1, 100);
    let mail_at = now_ms();
    let id_for = send_with(&mut c, "HOLDFOR=3", "held@far.test", "holdfor");
    // HOLDUNTIL: an absolute time 4 whole seconds ahead.
    let until_s = now_ms() / 1000 + 4;
    let until = chrono::DateTime::from_timestamp(until_s as i64, 0)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let id_until = send_with(
        &mut c,
        &format!("HOLDUNTIL={until}"),
        "until@far.test",
        "holduntil",
    );
    c.send_line("QUIT");

    // While held (polled up to 2 s after MAIL): nothing at the sink, and
    // `queue show` shows both holds.
    let fmt = |s: u64| {
        chrono::DateTime::from_timestamp(s as i64, 0)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let mut checks = 0;
    while now_ms() < mail_at + 2000 {
        let show_for = try_show(&relay, &id_for).expect("held message left the spool");
        let show_until = try_show(&relay, &id_until).expect("held message left the spool");
        assert!(
            sink.saved().is_empty(),
            "a held message reached the sink {} ms after MAIL",
            now_ms() - mail_at
        );
        assert_eq!(
            show_field(&show_for, "hold_until"),
            fmt(mail_at.div_ceil(1000) + 3),
            "{show_for}"
        );
        assert_eq!(
            show_field(&show_until, "hold_until"),
            fmt(until_s),
            "{show_until}"
        );
        checks += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(checks >= 2);

    let got = arrivals(&sink, 2, &relay);
    for (m, at) in &got {
        match m.token() {
            Some("holdfor") => assert!(
                *at >= (mail_at / 1000 + 3) * 1000,
                "HOLDFOR=3 released {} ms after MAIL",
                at - mail_at
            ),
            Some("holduntil") => assert!(
                *at >= until_s * 1000,
                "HOLDUNTIL={until} released {} ms early",
                until_s * 1000 - at
            ),
            other => panic!("unexpected message {other:?}"),
        }
        // And not held much longer than asked.
        assert!(*at < mail_at + 10_000, "released late: {} ms", at - mail_at);
    }
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
}

/// RFC 4865: HOLDFOR is a number of seconds to hold the message. Sent late in a
/// second (700–900 ms past it), it must still not leave before 3 s have passed.
#[test]
fn futurerelease_holdfor_is_not_released_early() {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let sink = LoadgenSink::start(&[sa(ip, port)], &[]);
    let relay = route_relay(ip, port, 1, &[]);
    let mut c = relay.session();
    align_subsec(700, 900);
    let mail_at = now_ms();
    send_with(&mut c, "HOLDFOR=3", "held@far.test", "holdfor");
    c.send_line("QUIT");
    let got = arrivals(&sink, 1, &relay);
    let at = got[0].1;
    assert!(
        at >= mail_at + 3000,
        "MAIL ... HOLDFOR=3 sent at {mail_at} (unix ms) reached the sink {} ms later \
         (want >= 3000): the hold is counted from the start of the second",
        at - mail_at
    );
}

// ---------------------------------------------------------------------------------
// (2) DELIVERBY
// ---------------------------------------------------------------------------------

#[test]
fn deliverby_is_advertised_stored_as_a_deadline_and_too_short_r_refused() {
    let dead = loopback();
    let port = mx_port(&[dead]);
    // Nothing listens at the next hop: the message stays queued.
    let relay = route_relay(dead, port, 1, &[]);
    let mut c = relay.greeted();
    let ehlo = c.expect("EHLO client.test", 250);
    assert!(
        ehlo.lines
            .iter()
            .any(|l| l.get(4..) == Some("DELIVERBY 60")),
        "EHLO does not advertise DELIVERBY 60: {ehlo:?}"
    );
    // Below the advertised minimum in R mode: refused (RFC 2852 §4, 501 5.5.4).
    let r = c.cmd("MAIL FROM:<alice@snd.dlv.test> BY=30;R");
    assert_eq!(r.code, 501, "BY=30;R: {r:?}");
    assert_eq!(r.enhanced(), "5.5.4", "BY=30;R: {r:?}");
    let before = now_ms();
    c.expect("MAIL FROM:<alice@snd.dlv.test> BY=60;R", 250);
    let after = now_ms();
    c.expect("RCPT TO:<bob@far.test>", 250);
    c.expect("DATA", 354);
    c.send(&body("deliverby"));
    c.send(b".\r\n");
    let r = c.read_reply();
    assert_eq!(r.code, 250, "{r:?}");
    let id = queued_id(&r.text()).unwrap();
    c.send_line("QUIT");
    // Deferred at least once (the hop is dead), still queued with its deadline.
    let mut show = String::new();
    wait_until(
        "a deferral",
        T,
        || {
            show = try_show(&relay, &id).unwrap_or_default();
            recipient_lines(&show)
                .iter()
                .any(|l| l.contains("deferred"))
        },
        || {
            format!(
                "{}\n{}",
                try_show(&relay, &id).unwrap_or_default(),
                relay.log()
            )
        },
    );
    let by = show_field(&show, "deliver_by");
    assert!(by.contains("(BY=60;"), "{show}");
    let when = by.split(" (").next().unwrap();
    let when_ms = chrono::DateTime::parse_from_rfc3339(when)
        .unwrap_or_else(|e| panic!("deadline {when:?}: {e}: {show}"))
        .timestamp_millis() as u64;
    let (lo, hi) = (before + 60_000, after + 60_000);
    assert!(
        (lo..=hi).contains(&when_ms),
        "deadline {when} ({when_ms} ms), want between {lo} and {hi}: {show}"
    );
}

// ---------------------------------------------------------------------------------
// (3) Queue quota
// ---------------------------------------------------------------------------------

#[test]
fn queue_max_messages_refuses_the_third_with_452_4_3_1() {
    let dead = loopback();
    let port = mx_port(&[dead]);
    let relay = route_relay(
        dead,
        port,
        1,
        &[
            "queue.default.max_messages=2".into(),
            "queue.default.retry=[\"1h\"]".into(),
        ],
    );
    let id1 = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["b1@far.test"],
        &body("q1"),
    );
    let id2 = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["b2@far.test"],
        &body("q2"),
    );
    let mut c = relay.session();
    c.expect("MAIL FROM:<alice@snd.dlv.test>", 250);
    let mut r = c.cmd("RCPT TO:<b3@far.test>");
    if r.code == 250 {
        r = c.cmd("DATA");
        if r.code == 354 {
            c.send(&body("q3"));
            c.send(b".\r\n");
            r = c.read_reply();
        }
    }
    assert_eq!(r.code, 452, "third message over max_messages=2: {r:?}");
    assert_eq!(r.enhanced(), "4.3.1", "{r:?}");
    c.send_line("QUIT");
    let mut ids = spool_ids(&relay);
    ids.sort();
    let mut want = vec![id1, id2];
    want.sort();
    assert_eq!(ids, want, "the first two are queued, nothing else");
}

// ---------------------------------------------------------------------------------
// (4) Fallback route
// ---------------------------------------------------------------------------------

#[test]
fn fallback_route_takes_over_after_fallback_after_deferrals() {
    let ips = loopbacks(2);
    let (dead, live) = (ips[0], ips[1]);
    let port = mx_port(&ips);
    let sink = LoadgenSink::start(&[sa(live, port)], &[]);
    let relay = Relay::builder()
        .cores(2)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set("delivery.connect_timeout=\"5s\"")
        .set("queue.default.retry=[\"1s\"]")
        .set(format!(
            "route.primary={{type=\"smtp\",host=\"{dead}\",port={port},fallback=\"backup\",fallback_after=1}}"
        ))
        .set(format!("route.backup={{type=\"smtp\",host=\"{live}\",port={port}}}"))
        .set("rule=[{match={recipient_domain=[\"far.test\"]},route=\"primary\"}]")
        .start();
    let id = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["bob@far.test"],
        &body("fallback"),
    );
    let saved = sink.wait_saved(1, T, &relay);
    assert_eq!(saved[0].rcpts(), vec!["bob@far.test".to_string()]);
    assert_eq!(saved[0].token(), Some("fallback"));
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    let a = attempts(&relay, &id);
    assert_eq!(a.len(), 2, "one deferral on primary, then backup: {a:#?}");
    assert_eq!(field(&a[0], "route"), "primary", "{a:#?}");
    assert_eq!(field(&a[0], "status"), "deferred", "{a:#?}");
    assert_eq!(field(&a[1], "route"), "backup", "{a:#?}");
    assert_eq!(field(&a[1], "status"), "delivered", "{a:#?}");
}

// ---------------------------------------------------------------------------------
// (5) Destination rates
// ---------------------------------------------------------------------------------

#[test]
fn destination_message_rate_spreads_deliveries() {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let sink = mini_sink(sa(ip, port));
    let relay = route_relay(
        ip,
        port,
        2,
        &["destination.default.message_rate=[\"2/s\"]".into()],
    );
    let mut c = relay.session();
    for i in 0..6 {
        c.send_mail(
            "alice@snd.dlv.test",
            &["bob@far.test"],
            &body(&format!("rate{i}")),
        );
    }
    c.send_line("QUIT");
    wait_until(
        "6 messages at the sink",
        T,
        || sink.messages().len() >= 6,
        || relay.log(),
    );
    let msgs = sink.messages();
    assert_eq!(msgs.len(), 6);
    for m in &msgs {
        assert!(m.mail.contains("<alice@snd.dlv.test>"), "{m:?}");
        assert_eq!(m.rcpts.len(), 1, "{m:?}");
        assert!(m.rcpts[0].contains("<bob@far.test>"), "{m:?}");
    }
    let span = msgs.last().unwrap().at - msgs[0].at;
    assert!(
        span >= Duration::from_millis(1500),
        "6 messages at 2/s arrived within {span:?}"
    );
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
}

#[test]
fn destination_connection_rate_spaces_connections() {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let sink = mini_sink(sa(ip, port));
    let relay = route_relay(
        ip,
        port,
        2,
        &[
            "destination.default.connection_rate=[\"1/s\"]".into(),
            "destination.default.max_messages_per_connection=1".into(),
        ],
    );
    let mut c = relay.session();
    for i in 0..3 {
        c.send_mail(
            "alice@snd.dlv.test",
            &["bob@far.test"],
            &body(&format!("conn{i}")),
        );
    }
    c.send_line("QUIT");
    wait_until(
        "3 messages at the sink",
        T,
        || sink.messages().len() >= 3,
        || relay.log(),
    );
    let msgs = sink.messages();
    let mut conns: Vec<usize> = msgs.iter().map(|m| m.conn).collect();
    conns.dedup();
    assert_eq!(conns.len(), 3, "one message per connection: {msgs:?}");
    let accepts = sink.accepts();
    assert_eq!(accepts.len(), 3, "three connections");
    for w in accepts.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(800),
            "connections {gap:?} apart at connection_rate 1/s"
        );
    }
}

// ---------------------------------------------------------------------------------
// (6) Per-host connection limit
// ---------------------------------------------------------------------------------

#[test]
fn max_connections_per_host_holds_across_domains_sharing_an_mx_host() {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let nsd = Nsd::start(&format!(
        "d1 MX 10 mx1\nd2 MX 10 mx1\nd3 MX 10 mx1\nmx1 A {ip}"
    ));
    // Slow end of data, so sessions for the three sites would overlap.
    let sink = LoadgenSink::start(&[sa(ip, port)], &["--delay-data", "200ms"]);
    let relay = mx_relay(
        &nsd,
        port,
        2,
        &[
            "delivery.max_connections_per_host=1".into(),
            "delivery.idle_timeout=\"300ms\"".into(),
        ],
    );
    let mut c = relay.session();
    for i in 0..6 {
        let d = ["d1", "d2", "d3"][i % 3];
        c.send_mail(
            "alice@snd.dlv.test",
            &[&format!("bob@{d}.dlv.test")],
            &body(&format!("host{i}")),
        );
    }
    c.send_line("QUIT");
    wait_until(
        "6 messages at the sink",
        T,
        || sink.messages() >= 6,
        || relay.log(),
    );
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    let s = sink.stats();
    assert_eq!(s["messages"], 6, "{s}");
    assert_eq!(s["tokens_duplicated"], 0, "{s}");
    assert_eq!(
        s["sessions_max"], 1,
        "max_connections_per_host=1 exceeded: {s}"
    );
    let mut rcpts: Vec<String> = sink.saved().iter().flat_map(|m| m.rcpts()).collect();
    rcpts.sort();
    rcpts.dedup();
    assert_eq!(rcpts.len(), 3, "all three domains delivered: {rcpts:?}");
}

// ---------------------------------------------------------------------------------
// (7) Rule source_ip and ehlo_name
// ---------------------------------------------------------------------------------

#[test]
fn rule_source_ip_and_ehlo_name_are_used_for_the_connection() {
    let ips = loopbacks(2);
    let (hop, src) = (ips[0], ips[1]);
    let port = mx_port(&[hop]);
    let sink = PostfixSink::start(sa(hop, port), &[]);
    let relay = Relay::builder()
        .cores(2)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set("delivery.connect_timeout=\"5s\"")
        .set("queue.default.retry=[\"1s\"]")
        .set(format!(
            "route.r={{type=\"smtp\",host=\"{hop}\",port={port}}}"
        ))
        .set(format!(
            "rule=[{{match={{recipient_domain=[\"far.test\"]}},route=\"r\",\
             source_ip=\"{src}\",ehlo_name=\"out.example.test\"}}]"
        ))
        .start();
    submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["bob@far.test"],
        &body("srcip"),
    );
    let mut dumps = Vec::new();
    wait_until(
        "smtp-sink to dump the message",
        T,
        || {
            dumps = sink.dumps();
            dumps.iter().any(|d| text(d).contains("srcip body"))
        },
        || relay.log(),
    );
    let d = text(&dumps[0]);
    let line = |k: &str| {
        d.lines()
            .find(|l| l.starts_with(k))
            .unwrap_or_else(|| panic!("no {k} in dump:\n{d}"))
            .to_string()
    };
    assert_eq!(
        line("X-Client-Addr:"),
        format!("X-Client-Addr: {src}"),
        "{d}"
    );
    assert_eq!(line("X-Helo-Args:"), "X-Helo-Args: out.example.test", "{d}");
}

// ---------------------------------------------------------------------------------
// (8) Success notices
// ---------------------------------------------------------------------------------

/// NSD with a.dlv.test → `hop` and snd.dlv.test (the sender's domain) → `bounce`.
fn dsn_setup() -> (Nsd, u16, Ipv4Addr, LoadgenSink) {
    let ips = loopbacks(2);
    let port = mx_port(&ips);
    let nsd = Nsd::start(&format!(
        "a MX 10 mx1\nmx1 A {}\nsnd MX 10 bounces\nbounces A {}",
        ips[0], ips[1]
    ));
    let bounce = LoadgenSink::start(&[sa(ips[1], port)], &[]);
    (nsd, port, ips[0], bounce)
}

fn submit_notify_success(relay: &Relay, tag: &str) -> String {
    let mut c = relay.session();
    c.expect("MAIL FROM:<alice@snd.dlv.test>", 250);
    c.expect("RCPT TO:<bob@a.dlv.test> NOTIFY=SUCCESS", 250);
    c.expect("DATA", 354);
    c.send(&body(tag));
    c.send(b".\r\n");
    let r = c.read_reply();
    assert_eq!(r.code, 250, "{r:?}");
    c.send_line("QUIT");
    queued_id(&r.text()).unwrap()
}

#[test]
fn notify_success_to_a_hop_without_dsn_sends_a_relayed_notice() {
    let (nsd, port, hop, bounce) = dsn_setup();
    // smtp-sink -N: no DSN announced.
    let sink = PostfixSink::start(sa(hop, port), &["-N"]);
    let relay = mx_relay(&nsd, port, 2, &[]);
    let id = submit_notify_success(&relay, "success-relayed");
    let notices = bounce.wait_saved(1, T, &relay);
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    // Delivered once, without NOTIFY (the hop has no DSN).
    let dumps = sink.dumps();
    assert_eq!(
        dumps.len(),
        1,
        "{:?}",
        dumps.iter().map(|d| text(d)).collect::<Vec<_>>()
    );
    let d = text(&dumps[0]);
    assert!(d.contains("success-relayed body"), "{d}");
    let rcpt = d
        .lines()
        .find(|l| l.starts_with("X-Rcpt-Args:"))
        .unwrap_or("");
    assert!(
        !rcpt.contains("NOTIFY"),
        "NOTIFY passed to a hop without DSN: {rcpt}"
    );

    assert_eq!(notices.len(), 1, "one notice");
    let n = &notices[0];
    assert_eq!(n.from(), "", "a notice has the null sender");
    assert_eq!(n.rcpts(), vec!["alice@snd.dlv.test".to_string()]);
    let v = parse_dsn(&n.eml);
    let show = || format!("{v:#}\n--- raw ---\n{}", text(&n.eml));
    assert_eq!(v["content_type"], "multipart/report", "{}", show());
    assert_eq!(v["report_type"], "delivery-status", "{}", show());
    assert!(v["defects"].as_array().unwrap().is_empty(), "{}", show());
    let parts = v["parts"].as_array().unwrap();
    assert!(parts.len() >= 2, "{}", show());
    assert_eq!(parts[1], "message/delivery-status", "{}", show());
    let recipients = v["recipients"].as_array().unwrap();
    assert_eq!(recipients.len(), 1, "{}", show());
    let r = &recipients[0];
    assert_eq!(
        r["final-recipient"]
            .as_str()
            .unwrap_or("")
            .replace(' ', "")
            .to_ascii_lowercase(),
        "rfc822;bob@a.dlv.test",
        "{}",
        show()
    );
    assert_eq!(r["action"], "relayed", "{}", show());
    assert!(
        r["status"].as_str().unwrap_or("").starts_with("2."),
        "{}",
        show()
    );
    assert!(text(&n.eml).contains(&id), "the notice names the queue id");
}

#[test]
fn notify_success_to_a_hop_with_dsn_is_passed_on_and_no_notice_is_sent() {
    let (nsd, port, hop, bounce) = dsn_setup();
    // smtp-sink announces DSN by default.
    let sink = PostfixSink::start(sa(hop, port), &[]);
    let relay = mx_relay(&nsd, port, 2, &[]);
    submit_notify_success(&relay, "success-passed");
    let mut dumps = Vec::new();
    wait_until(
        "smtp-sink to dump the message",
        T,
        || {
            dumps = sink.dumps();
            dumps
                .iter()
                .any(|d| text(d).contains("success-passed body"))
        },
        || relay.log(),
    );
    // Once the spool is empty, any notice made would have been delivered already.
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    let d = text(&dumps[0]);
    let rcpt = d
        .lines()
        .find(|l| l.starts_with("X-Rcpt-Args:"))
        .unwrap_or_else(|| panic!("{d}"));
    assert!(rcpt.contains("NOTIFY=SUCCESS"), "{rcpt}");
    assert_eq!(bounce.messages(), 0, "no notice when the hop offers DSN");
    assert!(bounce.saved().is_empty());
}
