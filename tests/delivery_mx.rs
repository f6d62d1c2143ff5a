//! Delivery by MX, end to end with real parts only: the real relay binary, a real
//! NSD whose zone points MX records at loopback addresses of this test alone, and
//! real SMTP servers there (the loadgen sink, Postfix's smtp-sink). Covers the
//! bytes on the wire, MX fallback (refused connections, 421 and 450 greetings),
//! every address of a host, greylisting then success, 5xx → DSN, expiry, null MX,
//! NXDOMAIN, and DNS SERVFAIL/timeouts (deferral, not bounce).

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use sluice_testkit::*;

const T: Duration = Duration::from_secs(20);

fn sa(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// A message that exercises the wire: a leading-dot line, a line of one dot,
/// trailing white space, an empty line, 8-bit text and a 998-octet line.
fn tricky_message(subject: &str) -> Vec<u8> {
    let mut m = format!(
        "From: Alice <alice@snd.dlv.test>\r\nTo: bob@a.dlv.test\r\nSubject: {subject}\r\n\
         Message-ID: <{subject}@snd.dlv.test>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
         first line\r\n.leading dot\r\n.\r\n..two dots\r\ntrailing space   \r\n\ttab line\r\n\r\n\
         h\u{e9}llo w\u{f6}rld \u{2603}\r\n"
    )
    .into_bytes();
    m.extend(std::iter::repeat_n(b'x', 998));
    m.extend_from_slice(b"\r\nlast line\r\n");
    m
}

#[test]
fn mx_delivery_bytes_at_the_sink_are_received_header_plus_exact_message() {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let nsd = Nsd::start(&format!("a MX 10 mx1\nmx1 A {ip}"));
    let sink = LoadgenSink::start(&[sa(ip, port)], &[]);
    let relay = mx_relay(&nsd, port, 2, &[]);
    let sent = tricky_message("bytes");
    let id = submit(
        &relay,
        "alice@snd.dlv.test",
        "BODY=8BITMIME",
        &["bob@a.dlv.test"],
        &dot_stuff(&sent),
    );
    let saved = sink.wait_saved(1, T, &relay);
    assert_eq!(saved.len(), 1);
    let m = &saved[0];
    assert_eq!(m.from(), "alice@snd.dlv.test");
    assert_eq!(m.rcpts(), vec!["bob@a.dlv.test".to_string()]);
    // Our Received: header, then exactly the bytes the client sent (unstuffed).
    assert_stored_exact(&m.eml, &sent, &id);
    assert_crlf_only(&m.eml);
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    let a = attempts(&relay, &id);
    assert_eq!(a.len(), 1, "{a:#?}");
    assert_eq!(field(&a[0], "status"), "delivered", "{a:#?}");
    assert_eq!(field(&a[0], "host"), "mx1.dlv.test", "{a:#?}");
    assert_eq!(field(&a[0], "ip"), ip.to_string(), "{a:#?}");
}

#[test]
fn bare_line_ends_accepted_on_input_leave_as_crlf_only() {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let nsd = Nsd::start(&format!("a MX 10 mx1\nmx1 A {ip}"));
    let sink = LoadgenSink::start(&[sa(ip, port)], &[]);
    let relay = mx_relay(
        &nsd,
        port,
        1,
        &["server.listener.smtp.bare_newline=\"accept\"".into()],
    );
    // Bare LF and bare CR inside the message (stored as received).
    let sent: &[u8] =
        b"Subject: bare\r\nMessage-ID: <bare@snd.dlv.test>\r\n\r\none\ntwo\rthree\r\nfour\n\nfive\r\n";
    let id = submit(&relay, "alice@snd.dlv.test", "", &["bob@a.dlv.test"], sent);
    let saved = sink.wait_saved(1, T, &relay);
    let eml = &saved[0].eml;
    let (_, rest) = split_received(eml);
    assert_eq!(
        text(rest),
        text(&to_crlf(sent)),
        "the wire copy is the spooled body with every line end made CRLF"
    );
    assert_crlf_only(eml);
    let _ = id;
}

#[test]
fn data_path_to_postfix_smtp_sink_dot_stuffs_correctly() {
    // Postfix's smtp-sink offers no CHUNKING: the body goes with DATA, stuffed.
    let ip = loopback();
    let port = mx_port(&[ip]);
    let nsd = Nsd::start(&format!("a MX 10 mx1\nmx1 A {ip}"));
    let sink = PostfixSink::start(sa(ip, port), &[]);
    let relay = mx_relay(&nsd, port, 1, &[]);
    let sent = tricky_message("data-path");
    let id = submit(
        &relay,
        "alice@snd.dlv.test",
        "BODY=8BITMIME",
        &["bob@a.dlv.test"],
        &dot_stuff(&sent),
    );
    // smtp-sink writes LF line ends and its own header lines first; the message
    // (our Received: header, then the sent bytes) must come through intact.
    let want = to_lf(&sent);
    let mut dumps = Vec::new();
    wait_until(
        "smtp-sink to dump the whole message",
        T,
        || {
            dumps = sink.dumps();
            dumps
                .iter()
                .any(|d| d.ends_with(b"last line\n") || d.ends_with(b"last line\n\n"))
        },
        || {
            format!(
                "dumps: {:?}\n{}",
                sink.dumps().iter().map(|d| text(d)).collect::<Vec<_>>(),
                relay.log()
            )
        },
    );
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    assert_eq!(dumps.len(), 1);
    let dump = &dumps[0];
    let at = dump
        .windows(want.len())
        .position(|w| w == want.as_slice())
        .unwrap_or_else(|| {
            panic!(
                "sent message not found in the smtp-sink dump:\n{}",
                text(dump)
            )
        });
    let tail = &dump[at + want.len()..];
    assert!(
        tail.iter().all(|&b| b == b'\n'),
        "junk after the message: {:?}",
        text(tail)
    );
    let head = text(&dump[..at]);
    assert!(head.contains(&format!("id {id}")), "{head}");
    assert!(head.contains("X-Rcpt-Args: <bob@a.dlv.test>"), "{head}");
}

#[test]
fn second_mx_is_used_when_the_first_refuses_connections() {
    let ips = loopbacks(2);
    let (dead, live) = (ips[0], ips[1]);
    let port = mx_port(&ips);
    let nsd = Nsd::start(&format!(
        "a MX 10 mx1\na MX 20 mx2\nmx1 A {dead}\nmx2 A {live}"
    ));
    let sink = LoadgenSink::start(&[sa(live, port)], &[]);
    // An hour between retries: only a fallback within the first attempt delivers.
    let relay = mx_relay(&nsd, port, 1, &["queue.default.retry=[\"1h\"]".into()]);
    let id = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["bob@a.dlv.test"],
        b"Subject: fallback\r\nMessage-ID: <fb@snd.dlv.test>\r\n\r\nhi\r\n",
    );
    sink.wait_saved(1, T, &relay);
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    let refused = failed_connections(&relay, &dead.to_string());
    assert_eq!(refused.len(), 1, "the first MX was tried: {}", relay.log());
    assert_eq!(field(&refused[0], "host"), "mx1.dlv.test");
    assert_eq!(field(&refused[0], "ids"), id, "the line names the message");
    let a = attempts(&relay, &id);
    assert_eq!(a.len(), 1, "one attempt, delivered: {a:#?}");
    assert_eq!(field(&a[0], "status"), "delivered", "{a:#?}");
    assert_eq!(field(&a[0], "host"), "mx2.dlv.test", "{a:#?}");
}

#[test]
fn an_idle_site_is_evicted_and_made_again_for_the_next_message() {
    let ips = loopbacks(1);
    let port = mx_port(&ips);
    let nsd = Nsd::start(&format!("a MX 10 mx1\nmx1 A {}", ips[0]));
    let sink = LoadgenSink::start(&[sa(ips[0], port)], &[]);
    let relay = mx_relay(
        &nsd,
        port,
        1,
        &[
            "delivery.idle_timeout=\"200ms\"".into(),
            "log.level=\"info,sluice_engine::delivery=debug\"".into(),
        ],
    );
    let evicted = |relay: &Relay| {
        log_events(relay, "idle site evicted")
            .iter()
            .filter(|v| field(v, "site") == "a.dlv.test")
            .count()
    };
    for n in 1..=2 {
        submit(
            &relay,
            "alice@snd.dlv.test",
            "",
            &["bob@a.dlv.test"],
            format!("Subject: evict {n}\r\n\r\nhi\r\n").as_bytes(),
        );
        sink.wait_saved(n, T, &relay);
        // Idle (connection closed after idle_timeout, nothing queued, no
        // rates to remember): the site leaves the table.
        wait_until(
            "the idle site to be evicted",
            T,
            || evicted(&relay) == n,
            || relay.log(),
        );
    }
}

#[test]
fn a_rule_matching_the_mx_host_name_routes_the_recipient() {
    // a.dlv.test's MX host answers nowhere; a rule on that MX host name sends
    // its recipients to a route whose host listens.
    let ips = loopbacks(2);
    let (dead, live) = (ips[0], ips[1]);
    let port = mx_port(&ips);
    let nsd = Nsd::start(&format!(
        "a MX 10 mx1.provider\nmx1.provider A {dead}\nb MX 10 mx2\nmx2 A {dead}"
    ));
    let sink = LoadgenSink::start(&[sa(live, port)], &[]);
    let relay = mx_relay(
        &nsd,
        port,
        1,
        &[
            "queue.default.retry=[\"1h\"]".into(),
            format!("route.provider={{type=\"relay\",host=\"{live}\",port={port},tls=\"none\"}}"),
            "rule=[{match={mx=[\"*.provider.dlv.test\"]},route=\"provider\"}]".into(),
        ],
    );
    let id = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["bob@a.dlv.test", "carol@b.dlv.test"],
        b"Subject: by mx\r\n\r\nhi\r\n",
    );
    sink.wait_saved(1, T, &relay);
    wait_until(
        "both recipients to have an attempt",
        T,
        || attempts(&relay, &id).len() >= 2,
        || relay.log(),
    );
    let a = attempts(&relay, &id);
    let bob = a
        .iter()
        .find(|l| field(l, "recipient") == "bob@a.dlv.test")
        .expect("bob's attempt");
    assert_eq!(field(bob, "status"), "delivered", "{a:#?}");
    assert_eq!(field(bob, "route"), "provider", "{a:#?}");
    // The other domain's MX does not match: it stays on MX delivery.
    let carol = a
        .iter()
        .find(|l| field(l, "recipient") == "carol@b.dlv.test")
        .expect("carol's attempt");
    assert_eq!(field(carol, "route"), "mx", "{a:#?}");
    assert_eq!(field(carol, "status"), "deferred", "{a:#?}");
}

#[test]
fn mx_hosts_greeting_421_or_450_are_skipped_for_the_next() {
    let ips = loopbacks(3);
    let port = mx_port(&ips);
    let nsd = Nsd::start(&format!(
        "a MX 10 mx1\na MX 20 mx2\na MX 30 mx3\nmx1 A {}\nmx2 A {}\nmx3 A {}",
        ips[0], ips[1], ips[2]
    ));
    let _closing = PostfixSink::start(sa(ips[0], port), &["-Q", "CONNECT"]); // 421, close
    let _busy = PostfixSink::start(sa(ips[1], port), &["-r", "CONNECT"]); // 450 greeting
    let sink = LoadgenSink::start(&[sa(ips[2], port)], &[]);
    let relay = mx_relay(&nsd, port, 1, &["queue.default.retry=[\"1h\"]".into()]);
    let id = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["bob@a.dlv.test"],
        b"Subject: greetings\r\nMessage-ID: <gr@snd.dlv.test>\r\n\r\nhi\r\n",
    );
    sink.wait_saved(1, T, &relay);
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    let f421 = failed_connections(&relay, &ips[0].to_string());
    assert_eq!(f421.len(), 1, "{}", relay.log());
    assert!(field(&f421[0], "reply").starts_with("421"), "{f421:#?}");
    let f450 = failed_connections(&relay, &ips[1].to_string());
    assert_eq!(f450.len(), 1, "{}", relay.log());
    assert!(field(&f450[0], "reply").starts_with("450"), "{f450:#?}");
    let a = attempts(&relay, &id);
    assert_eq!(a.len(), 1, "{a:#?}");
    assert_eq!(field(&a[0], "status"), "delivered", "{a:#?}");
    assert_eq!(field(&a[0], "host"), "mx3.dlv.test", "{a:#?}");
}

#[test]
fn every_address_of_an_mx_host_is_tried() {
    // One MX host with five addresses, four of them dead. Addresses of a host are
    // shuffled, so each new connection meets the live one at a random place; with
    // one message per connection and an hour between retries, eight messages all
    // delivered on their first attempt means every address is tried; the check
    // that a dead address was met fails only if the live one came first every
    // time (probability (1/5)^8).
    let ips = loopbacks(5);
    let port = mx_port(&ips);
    let live = ips[4];
    let mut zone = String::from("a MX 10 mx1\n");
    for ip in &ips {
        zone.push_str(&format!("mx1 A {ip}\n"));
    }
    let nsd = Nsd::start(&zone);
    let sink = LoadgenSink::start(&[sa(live, port)], &[]);
    let relay = mx_relay(
        &nsd,
        port,
        1,
        &[
            "queue.default.retry=[\"1h\"]".into(),
            "destination.default.max_messages_per_connection=1".into(),
            "destination.default.max_connections=1".into(),
        ],
    );
    for i in 0..8 {
        submit(
            &relay,
            "alice@snd.dlv.test",
            "",
            &["bob@a.dlv.test"],
            format!("Subject: addr {i}\r\nMessage-ID: <addr{i}@snd.dlv.test>\r\n\r\nhi\r\n")
                .as_bytes(),
        );
    }
    sink.wait_saved(8, T, &relay);
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    let stats = sink.stats();
    assert_eq!(
        stats["connections"], 8,
        "one message per connection: {stats}"
    );
    let dead_tried = ips[..4]
        .iter()
        .filter(|ip| !failed_connections(&relay, &ip.to_string()).is_empty())
        .count();
    assert!(
        dead_tried >= 1,
        "dead addresses were tried: {}",
        relay.log()
    );
    let all = log_events(&relay, "delivery attempt");
    assert_eq!(all.len(), 8, "{all:#?}");
    assert!(
        all.iter()
            .all(|a| field(a, "status") == "delivered" && a["ip"] == live.to_string()),
        "every message delivered on its first attempt: {all:#?}"
    );
}

#[test]
fn greylisted_recipient_is_deferred_then_delivered_on_retry() {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let nsd = Nsd::start(&format!("a MX 10 mx1\nmx1 A {ip}"));
    let sink = LoadgenSink::start(&[sa(ip, port)], &["--greylist"]);
    let relay = mx_relay(&nsd, port, 1, &[]);
    let id = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["bob@a.dlv.test"],
        b"Subject: grey\r\nMessage-ID: <grey@snd.dlv.test>\r\n\r\nhi\r\n",
    );
    let saved = sink.wait_saved(1, T, &relay);
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    assert_eq!(saved.len(), 1);
    let stats = sink.stats();
    assert_eq!(stats["greylisted"], 1, "{stats}");
    assert_eq!(stats["messages"], 1, "{stats}");
    let a = attempts(&relay, &id);
    assert_eq!(a.len(), 2, "{a:#?}");
    assert_eq!(field(&a[0], "status"), "deferred", "{a:#?}");
    assert!(field(&a[0], "reply").starts_with("451"), "{a:#?}");
    assert_eq!(field(&a[1], "status"), "delivered", "{a:#?}");
    assert_eq!(a[1]["attempt"], 2, "{a:#?}");
}

/// A relay, an MX sink for a.dlv.test and a sink for the sender's domain
/// snd.dlv.test (where DSNs go, by MX too).
struct BounceSetup {
    nsd: Nsd,
    port: u16,
    rcpt_ip: std::net::Ipv4Addr,
    bounce: LoadgenSink,
}

fn bounce_setup(extra_zone: &str) -> BounceSetup {
    let ips = loopbacks(2);
    let port = mx_port(&ips);
    let nsd = Nsd::start(&format!(
        "a MX 10 mx1\nmx1 A {}\nsnd MX 10 bounces\nbounces A {}\n{extra_zone}",
        ips[0], ips[1]
    ));
    let bounce = LoadgenSink::start(&[sa(ips[1], port)], &[]);
    BounceSetup {
        nsd,
        port,
        rcpt_ip: ips[0],
        bounce,
    }
}

#[test]
fn a_bounce_names_each_recipients_own_remote_mta() {
    // bad@a.dlv.test is refused by mx1 (which answered); nobody@null.dlv.test
    // never reached a host (null MX): it gets no Remote-MTA.
    let s = bounce_setup("null MX 0 .");
    let _sink = LoadgenSink::start(
        &[sa(s.rcpt_ip, s.port)],
        &[
            "--fault",
            "at=rcpt,code=550,esc=5.1.1,prefix=bad,share=100%,text=no such user",
        ],
    );
    let relay = mx_relay(&s.nsd, s.port, 1, &["queue.default.retry=[\"1h\"]".into()]);
    submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["bad@a.dlv.test", "nobody@null.dlv.test"],
        b"Subject: two bounces\r\n\r\nbody\r\n",
    );
    let dsns = s.bounce.wait_saved(1, T, &relay);
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    assert_eq!(dsns.len(), 1, "one notice for both");
    let v = parse_dsn(&dsns[0].eml);
    let recipients = v["recipients"].as_array().expect("recipients");
    assert_eq!(recipients.len(), 2, "{v:#}");
    for r in recipients {
        let who = r["final-recipient"].as_str().unwrap_or("");
        let mta = r["remote-mta"].as_str();
        if who.contains("bad@a.dlv.test") {
            assert!(mta.unwrap_or("").contains("mx1.dlv.test"), "{v:#}");
        } else {
            assert!(who.contains("nobody@null.dlv.test"), "{v:#}");
            assert_eq!(mta, None, "no host was reached: {v:#}");
        }
    }
}

#[test]
fn a_large_message_is_delivered_and_returned_whole() {
    // Over the size where the body is read, and the notice built, off the
    // executor.
    let s = bounce_setup("");
    let sink = LoadgenSink::start(
        &[sa(s.rcpt_ip, s.port)],
        &[
            "--fault",
            "at=rcpt,code=550,esc=5.1.1,prefix=bad,share=100%,text=no such user",
        ],
    );
    let relay = mx_relay(&s.nsd, s.port, 1, &["queue.default.retry=[\"1h\"]".into()]);
    let line = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuv\r\n";
    let mut body = b"Subject: large\r\n\r\n".to_vec();
    while body.len() < 2 * 1024 * 1024 {
        body.extend_from_slice(line.as_bytes());
    }
    body.extend_from_slice(b"the-end-marker\r\n");
    submit(
        &relay,
        "alice@snd.dlv.test",
        "RET=FULL",
        &["good@a.dlv.test", "bad@a.dlv.test"],
        &body,
    );
    let dsns = s.bounce.wait_saved(1, T, &relay);
    let delivered = sink.wait_saved(1, T, &relay);
    let got = text(&delivered[0].eml);
    assert!(got.contains("the-end-marker"), "the whole body arrived");
    assert!(got.len() >= 2 * 1024 * 1024, "{}", got.len());
    assert!(
        text(&dsns[0].eml).contains("the-end-marker"),
        "RET=FULL returns the whole original"
    );
}

#[test]
fn rcpt_5xx_bounces_with_a_dsn_python_reads_as_multipart_report() {
    let s = bounce_setup("");
    let sink = LoadgenSink::start(
        &[sa(s.rcpt_ip, s.port)],
        &[
            "--fault",
            "at=rcpt,code=550,esc=5.1.1,prefix=bad,share=100%,text=no such user",
        ],
    );
    let relay = mx_relay(&s.nsd, s.port, 2, &["queue.default.retry=[\"1h\"]".into()]);
    let id = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["good@a.dlv.test", "bad@a.dlv.test"],
        b"Subject: will half bounce\r\nMessage-ID: <half@snd.dlv.test>\r\n\r\nbody\r\n",
    );
    let dsns = s.bounce.wait_saved(1, T, &relay);
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    // The good recipient got the message once; the bad one is reported.
    let delivered = sink.saved();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].rcpts(), vec!["good@a.dlv.test".to_string()]);
    assert_eq!(dsns.len(), 1, "one notice");
    let dsn = &dsns[0];
    assert_eq!(dsn.from(), "", "a DSN has the null sender");
    assert_eq!(dsn.rcpts(), vec!["alice@snd.dlv.test".to_string()]);
    let v = assert_failure_dsn(&dsn.eml, &["bad@a.dlv.test"], "5.1.1");
    let r = &v["recipients"][0];
    let diag = r["diagnostic-code"].as_str().unwrap_or("");
    assert!(diag.starts_with("smtp;") && diag.contains("550"), "{v:#}");
    assert!(
        r["remote-mta"]
            .as_str()
            .unwrap_or("")
            .contains("mx1.dlv.test"),
        "{v:#}"
    );
    assert!(
        v["to"].as_str().unwrap().contains("alice@snd.dlv.test"),
        "{v:#}"
    );
    assert!(
        v["returned"]
            .as_str()
            .unwrap()
            .contains("Subject: will half bounce"),
        "the original comes back: {v:#}"
    );
    assert!(
        text(&dsn.eml).contains(&id),
        "the notice names the queue id of the original"
    );
}

#[test]
fn expired_message_bounces_with_5_4_7() {
    // a.dlv.test's only MX is an address nobody listens on.
    let s = bounce_setup("");
    let relay = mx_relay(
        &s.nsd,
        s.port,
        1,
        &[
            "queue.default.expire=\"2s\"".into(),
            "queue.default.retry=[\"1s\"]".into(),
        ],
    );
    let id = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["bob@a.dlv.test"],
        b"Subject: expires\r\nMessage-ID: <exp@snd.dlv.test>\r\n\r\nbody\r\n",
    );
    let dsns = s.bounce.wait_saved(1, T, &relay);
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    let v = assert_failure_dsn(&dsns[0].eml, &["bob@a.dlv.test"], "5.4.7");
    let diag = v["recipients"][0]["diagnostic-code"].as_str().unwrap_or("");
    assert!(
        diag.contains("4.4.1") || diag.contains("connect"),
        "last error kept: {v:#}"
    );
    let a = attempts(&relay, &id);
    assert!(a.len() >= 2, "retried before expiring: {a:#?}");
    assert!(a.iter().all(|l| field(l, "status") == "deferred"), "{a:#?}");
    // The log says what happened after the last deferral: given up, removed.
    let gave_up: Vec<_> = log_events(&relay, "given up")
        .into_iter()
        .filter(|v| v["id"] == id.as_str())
        .collect();
    assert_eq!(gave_up.len(), 1, "{}", relay.log());
    assert_eq!(field(&gave_up[0], "status"), "expired");
    assert_eq!(field(&gave_up[0], "recipient"), "bob@a.dlv.test");
    assert!(
        field(&gave_up[0], "reply").contains("5.4.7"),
        "{gave_up:#?}"
    );
    let removed = log_events(&relay, "removed");
    assert!(
        removed.iter().any(|v| v["id"] == id.as_str()),
        "removal logged: {}",
        relay.log()
    );
}

#[test]
fn null_mx_bounces_at_once_with_5_1_10() {
    let s = bounce_setup("null MX 0 .");
    let relay = mx_relay(&s.nsd, s.port, 1, &["queue.default.retry=[\"1h\"]".into()]);
    let id = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["bob@null.dlv.test"],
        b"Subject: null mx\r\nMessage-ID: <null@snd.dlv.test>\r\n\r\nbody\r\n",
    );
    let dsns = s.bounce.wait_saved(1, T, &relay);
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    assert_failure_dsn(&dsns[0].eml, &["bob@null.dlv.test"], "5.1.10");
    let a = attempts(&relay, &id);
    assert_eq!(a.len(), 1, "{a:#?}");
    assert_eq!(field(&a[0], "status"), "failed", "{a:#?}");
    assert_eq!(a[0]["attempt"], 1, "{a:#?}");
}

#[test]
fn nxdomain_bounces() {
    let s = bounce_setup("");
    let relay = mx_relay(&s.nsd, s.port, 1, &["queue.default.retry=[\"1h\"]".into()]);
    let id = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["bob@no-such-domain.dlv.test"],
        b"Subject: nxdomain\r\nMessage-ID: <nx@snd.dlv.test>\r\n\r\nbody\r\n",
    );
    let dsns = s.bounce.wait_saved(1, T, &relay);
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    let v = assert_failure_dsn(&dsns[0].eml, &["bob@no-such-domain.dlv.test"], "5.");
    let diag = v["recipients"][0]["diagnostic-code"].as_str().unwrap_or("");
    assert!(
        diag.to_ascii_lowercase().contains("nxdomain") || diag.contains("no such domain"),
        "{v:#}"
    );
    let a = attempts(&relay, &id);
    assert_eq!(a.len(), 1, "{a:#?}");
    assert_eq!(field(&a[0], "status"), "failed", "{a:#?}");
}

/// Waits until `id` has been deferred at least twice; asserts it never left the
/// spool and is the only message there (no DSN was made).
fn assert_deferred_twice_without_bounce(relay: &Relay, id: &str, want_in_reply: &str) {
    let mut last = String::new();
    wait_until(
        "two deferred attempts",
        T,
        || {
            let show = try_show(relay, id)
                .unwrap_or_else(|| panic!("{id} left the spool (bounced?); log:\n{}", relay.log()));
            last = show.clone();
            recipient_lines(&show)
                .first()
                .and_then(|l| deferred_attempts(l))
                .is_some_and(|n| n >= 2)
        },
        || relay.log(),
    );
    let line = &recipient_lines(&last)[0];
    assert!(line.contains(want_in_reply), "{line}");
    assert!(line.contains(": 451 4.4.3 "), "a temporary status: {line}");
    assert_eq!(relay.count(), 1, "no notice queued: {:?}", spool_ids(relay));
}

#[test]
fn dns_servfail_defers_and_does_not_bounce() {
    let s = bounce_setup("");
    let relay = mx_relay(&s.nsd, s.port, 1, &[]);
    let rcpt = format!("bob@x.{BROKEN_ZONE}");
    let id = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &[&rcpt],
        b"Subject: servfail\r\nMessage-ID: <sf@snd.dlv.test>\r\n\r\nbody\r\n",
    );
    assert_deferred_twice_without_bounce(&relay, &id, "DNS server failure");
    assert_eq!(s.bounce.messages(), 0, "no DSN reached the sender");
}

#[test]
fn dns_timeout_defers_and_does_not_bounce() {
    // A resolver that never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay = Relay::builder()
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set(format!(
            "dns.servers=[\"{}\"]",
            silent.local_addr().unwrap()
        ))
        .set("dns.timeout=\"300ms\"")
        .set("dns.attempts=1")
        .set("queue.default.retry=[\"1s\"]")
        .start();
    let id = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["bob@a.dlv.test"],
        b"Subject: timeout\r\nMessage-ID: <to@snd.dlv.test>\r\n\r\nbody\r\n",
    );
    assert_deferred_twice_without_bounce(&relay, &id, "timeout");
}

#[test]
fn delay_notice_when_a_message_waits_past_notify_delay() {
    // a.dlv.test's MX is dead; the queue says: tell the sender after 1 s.
    let s = bounce_setup("");
    let relay = mx_relay(
        &s.nsd,
        s.port,
        1,
        &[
            "queue.default.notify_delay=[\"1s\"]".into(),
            "queue.default.expire=\"1h\"".into(),
        ],
    );
    let id = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["bob@a.dlv.test"],
        b"Subject: slow\r\nMessage-ID: <slow@snd.dlv.test>\r\n\r\nbody\r\n",
    );
    let dsns = s.bounce.wait_saved(1, T, &relay);
    let v = parse_dsn(&dsns[0].eml);
    assert_eq!(v["content_type"], "multipart/report", "{v:#}");
    assert_eq!(v["report_type"], "delivery-status", "{v:#}");
    let r = &v["recipients"][0];
    assert_eq!(r["action"], "delayed", "{v:#}");
    assert!(r["status"].as_str().unwrap().starts_with("4."), "{v:#}");
    assert!(r["will-retry-until"].is_string(), "{v:#}");
    assert_eq!(dsns[0].from(), "");
    // The message itself is still queued.
    assert!(try_show(&relay, &id).is_some());
}

#[test]
fn no_bounce_for_notify_never_or_a_null_sender_and_ret_hdrs_returns_headers() {
    let s = bounce_setup("");
    let _sink = LoadgenSink::start(
        &[sa(s.rcpt_ip, s.port)],
        &["--fault", "at=rcpt,code=550,esc=5.1.1,share=100%"],
    );
    let relay = mx_relay(&s.nsd, s.port, 1, &["queue.default.retry=[\"1h\"]".into()]);
    let mut c = relay.session();
    // NOTIFY=NEVER: no notice.
    c.expect("MAIL FROM:<alice@snd.dlv.test>", 250);
    c.expect("RCPT TO:<never@a.dlv.test> NOTIFY=NEVER", 250);
    c.expect("DATA", 354);
    c.send(b"Subject: never\r\n\r\nbody\r\n.\r\n");
    assert_eq!(c.read_reply().code, 250);
    // A bounce is never bounced.
    c.expect("MAIL FROM:<>", 250);
    c.expect("RCPT TO:<nullsender@a.dlv.test>", 250);
    c.expect("DATA", 354);
    c.send(b"Subject: null sender\r\n\r\nbody\r\n.\r\n");
    assert_eq!(c.read_reply().code, 250);
    // The control: RET=HDRS, a notice with the headers only.
    c.expect("MAIL FROM:<alice@snd.dlv.test> RET=HDRS ENVID=env-42", 250);
    c.expect("RCPT TO:<control@a.dlv.test>", 250);
    c.expect("DATA", 354);
    c.send(b"Subject: control\r\nX-Marker: yes\r\n\r\nsecret body line\r\n.\r\n");
    assert_eq!(c.read_reply().code, 250);
    c.send_line("QUIT");
    let dsns = s.bounce.wait_saved(1, T, &relay);
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    let dsns_now = s.bounce.saved();
    assert_eq!(dsns_now.len(), 1, "only the control bounced: {dsns_now:#?}");
    let v = assert_failure_dsn(&dsns[0].eml, &["control@a.dlv.test"], "5.1.1");
    assert_eq!(v["parts"][2], "text/rfc822-headers", "{v:#}");
    let returned = v["returned"].as_str().unwrap();
    assert!(returned.contains("X-Marker: yes"), "{v:#}");
    assert!(!returned.contains("secret body line"), "{v:#}");
    assert_eq!(v["per_message"]["original-envelope-id"], "env-42", "{v:#}");
}

#[test]
fn dsn_parameters_are_passed_to_a_next_hop_that_offers_dsn() {
    // Postfix's smtp-sink offers DSN and dumps the MAIL and RCPT parameters.
    let ip = loopback();
    let port = mx_port(&[ip]);
    let nsd = Nsd::start(&format!("a MX 10 mx1\nmx1 A {ip}"));
    let sink = PostfixSink::start(sa(ip, port), &[]);
    let relay = mx_relay(&nsd, port, 1, &[]);
    let mut c = relay.session();
    c.expect("MAIL FROM:<alice@snd.dlv.test> RET=HDRS ENVID=env-7", 250);
    c.expect(
        "RCPT TO:<bob@a.dlv.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob@orig.example",
        250,
    );
    c.expect("DATA", 354);
    c.send(b"Subject: dsn params\r\n\r\nbody\r\n.\r\n");
    assert_eq!(c.read_reply().code, 250);
    c.send_line("QUIT");
    let mut dumps = Vec::new();
    wait_until(
        "smtp-sink to dump the message",
        T,
        || {
            dumps = sink.dumps();
            dumps.iter().any(|d| text(d).contains("\nbody\n"))
        },
        || relay.log(),
    );
    let d = text(&dumps[0]);
    let mail = d
        .lines()
        .find(|l| l.starts_with("X-Mail-Args:"))
        .unwrap_or_else(|| panic!("{d}"));
    let rcpt = d
        .lines()
        .find(|l| l.starts_with("X-Rcpt-Args:"))
        .unwrap_or_else(|| panic!("{d}"));
    assert!(
        mail.contains("RET=HDRS") && mail.contains("ENVID=env-7"),
        "{mail}"
    );
    assert!(rcpt.contains("NOTIFY=FAILURE,DELAY"), "{rcpt}");
    assert!(
        rcpt.to_ascii_lowercase()
            .contains("orcpt=rfc822;bob@orig.example"),
        "{rcpt}"
    );
}
