//! Tenants (`[tenant.NAME]`, a rule's `tenant`): one tenant's flood does not
//! starve another at a slow shared site, and a tenant's message rate is
//! enforced at the end of data. Real relay, real SMTP in and out: a scripted
//! next hop that takes one connection at a time and pauses at each message.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sluice_testkit::*;

/// Pause of the slow site at each end of data.
const SLOW: Duration = Duration::from_millis(10);

fn relay(hop: &ScriptedServer, extra: &[&str]) -> Relay {
    let mut b = Relay::builder()
        .cores(2)
        .set("delivery.enabled=true")
        .set("spool.sync=false")
        .set("queue.default.retry=[\"1s\"]")
        .set(format!(
            "route.hop={{type=\"relay\",host=\"{}\",port={},tls=\"none\"}}",
            hop.addr().ip(),
            hop.addr().port()
        ))
        .set("destination.default.max_connections=1")
        .set("tenant.a={}")
        .set("tenant.b={}")
        .set("tenant.c={}")
        .set(
            "rule=[{match={sender_domain=\"a.test\"},route=\"hop\",tenant=\"a\"},\
             {match={sender_domain=\"b.test\"},route=\"hop\",tenant=\"b\"},\
             {match={sender_domain=\"c.test\"},route=\"hop\",tenant=\"c\"}]",
        );
    for e in extra {
        b = b.set(*e);
    }
    b.start()
}

/// `n` messages from `from` over one session, one transaction after another.
fn send_many(relay: &Relay, from: &str, n: usize) {
    let mut c = relay.session();
    for i in 0..n {
        c.send_mail(
            from,
            &[&format!("r{i}@dest.test")],
            format!("Subject: {i}\r\n\r\n{from} {i}\r\n").as_bytes(),
        );
    }
    c.send_line("QUIT");
}

fn from_b(m: &Received) -> bool {
    m.mail.contains("@b.test")
}

#[test]
fn a_flood_from_one_tenant_does_not_starve_another() {
    let ips = loopbacks(1);
    let hop = ScriptedServer::builder()
        .name("slow.tenant.test")
        .capability("PIPELINING")
        .on(END_OF_DATA, Act::Delay(SLOW))
        .start(SocketAddr::new(ips[0].into(), 0));
    let relay = relay(&hop, &[]);
    let started = Instant::now();
    send_many(&relay, "flood@a.test", 2000);
    let before_b = hop.messages().len();
    send_many(&relay, "small@b.test", 100);
    let b_sent = hop.messages().len();
    wait_until(
        "tenant b's 100 messages at the slow site",
        Duration::from_secs(120),
        || hop.messages().iter().filter(|m| from_b(m)).count() >= 100,
        || {
            format!(
                "{} delivered, {} from b",
                hop.messages().len(),
                hop.messages().iter().filter(|m| from_b(m)).count()
            )
        },
    );
    let order = hop.messages();
    let b_positions: Vec<usize> = order
        .iter()
        .enumerate()
        .filter(|(_, m)| from_b(m))
        .map(|(i, _)| i)
        .collect();
    let median = b_positions[b_positions.len() / 2];
    let last = b_positions[b_positions.len() - 1];
    let first = b_positions[0];
    let window = &order[first..=last];
    let b_share = window.iter().filter(|m| from_b(m)).count() as f64 / window.len() as f64;
    eprintln!(
        "fairness: a's 2000 submitted in {:?}, {before_b} delivered before b started, {b_sent} when b's 100 were queued; \
         b's positions: first {first}, median {median}, last {last}; b's share of deliveries while b was waiting: {:.1}%",
        started.elapsed(),
        b_share * 100.0
    );
    // Without a fair share, b's mail waits behind a's whole backlog (2000 −
    // what was delivered while a was still sending): its median position
    // would be past 2000.
    assert!(
        median < b_sent + 400,
        "b's median delivery position {median} (b queued at {b_sent})"
    );
    assert!(
        last < 2000,
        "b's last message was delivered at position {last}: behind a's flood"
    );
    // Equal weights: about half the deliveries while both wait.
    assert!(b_share > 0.3, "b's share while competing: {b_share}");
    let metrics = relay.metrics();
    assert!(
        metric_sum(
            &metrics,
            "sluice_tenant_messages_total{tenant=\"b\",outcome=\"delivered\"}"
        ) >= 100.0,
        "{metrics}"
    );
    assert!(
        metric_sum(
            &metrics,
            "sluice_tenant_messages_total{tenant=\"a\",outcome=\"accepted\"}"
        ) >= 2000.0,
        "{metrics}"
    );
}

#[test]
fn a_tenant_over_its_message_rate_is_told_to_try_later() {
    let ips = loopbacks(1);
    let hop = ScriptedServer::builder().start(SocketAddr::new(ips[0].into(), 0));
    let relay = relay(&hop, &["tenant.c={message_rate=[\"3/h\"]}"]);
    let mut c = relay.session();
    for i in 0..3 {
        c.send_mail(
            "x@c.test",
            &["r@dest.test"],
            format!("Subject: {i}\r\n\r\n{i}\r\n").as_bytes(),
        );
    }
    c.expect("MAIL FROM:<x@c.test>", 250);
    c.expect("RCPT TO:<r@dest.test>", 250);
    c.expect("DATA", 354);
    c.send(b"Subject: 4\r\n\r\n4\r\n.\r\n");
    let r = c.read_reply();
    assert_eq!((r.code, r.enhanced()), (451, "4.7.1"), "{r:?}");
    assert!(r.text().contains("tenant c"), "{r:?}");
    // Other tenants are not held by c's rate.
    c.send_mail("y@b.test", &["r@dest.test"], b"Subject: b\r\n\r\nb\r\n");
    c.send_line("QUIT");
    let metrics = relay.metrics();
    assert_eq!(
        metric_sum(
            &metrics,
            "sluice_tenant_messages_total{tenant=\"c\",outcome=\"rate_limited\"}"
        ),
        1.0,
        "{metrics}"
    );
}
