//! Tenants (`[tenant.NAME]`, a rule's `tenant`, the `[tenants] header`):
//! one tenant's flood does not starve another at a slow shared site, and a
//! tenant's message rate is enforced at the end of data; a tenant named by a
//! header field is limited, stored with the message across a restart, and
//! counted at delivery and in events. Real relay, real SMTP in and out
//! (swaks sets the header): a scripted next hop that takes one connection at
//! a time and pauses at each message, or defers until it is replaced.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

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

/// swaks from `from` to `to` with an `X-Tenant` header field; its transcript.
fn swaks_tenant(relay: &Relay, from: &str, to: &str, tenant: &str) -> String {
    let out = swaks(
        relay,
        &[
            "--from",
            from,
            "--to",
            to,
            "--header",
            &format!("X-Tenant: {tenant}"),
        ],
    );
    text(&out.stdout)
}

/// The events file's objects.
fn file_events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

fn tenant_metric(relay: &Relay, tenant: &str, outcome: &str) -> f64 {
    metric_sum(
        &relay.metrics(),
        &format!("sluice_tenant_messages_total{{tenant=\"{tenant}\",outcome=\"{outcome}\"}}"),
    )
}

#[test]
fn a_tenant_named_by_a_header_is_limited_stored_and_counted_at_delivery() {
    let ips = loopbacks(1);
    // The first next hop defers everything, so the mail is still queued when
    // the relay restarts.
    let deferring = ScriptedServer::builder()
        .on("MAIL", Act::Reply("451 4.3.0 not now".into()))
        .start(SocketAddr::new(ips[0].into(), 0));
    let hop_addr = deferring.addr();
    let events = tempfile::tempdir().expect("tempdir");
    let file = events.path().join("events.jsonl");
    let mut relay = Relay::builder()
        .cores(2)
        .set("delivery.enabled=true")
        .set("queue.default.retry=[\"1s\"]")
        .set(format!(
            "route.hop={{type=\"relay\",host=\"{}\",port={},tls=\"none\"}}",
            hop_addr.ip(),
            hop_addr.port()
        ))
        .set("rule=[{match={recipient_domain=[\"dest.test\"]},route=\"hop\"}]")
        .set("tenant.b={message_rate=[\"2/h\"]}")
        .set("tenant.misc={}")
        .set("tenants.header=\"X-Tenant\"")
        .set("tenants.default=\"misc\"")
        .set("events.enabled=true")
        .set(format!("events.file=\"{}\"", file.display()))
        .start();
    // Two of b's are taken; the third is over b's rate, named in the reply.
    for i in 0..2 {
        let t = swaks_tenant(&relay, "x@any.test", &format!("b{i}@dest.test"), "b");
        assert!(t.contains("<-  250 2.0.0"), "{t}");
    }
    let t = swaks_tenant(&relay, "x@any.test", "b2@dest.test", "b");
    assert!(t.contains("451 4.7.1"), "{t}");
    assert!(t.contains("tenant b is over its message rate"), "{t}");
    // A name that is no tenant counts for the default.
    let t = swaks_tenant(&relay, "x@any.test", "u@dest.test", "nobody");
    assert!(t.contains("<-  250 2.0.0"), "{t}");
    assert_eq!(tenant_metric(&relay, "b", "accepted"), 2.0);
    assert_eq!(tenant_metric(&relay, "b", "rate_limited"), 1.0);
    assert_eq!(tenant_metric(&relay, "misc", "accepted"), 1.0);
    // The queue shows what each message counts for.
    let shown: Vec<String> = relay.list().iter().map(|e| relay.show(&e.id)).collect();
    assert_eq!(
        shown.iter().filter(|s| s.contains("tenant: b\n")).count(),
        2,
        "{shown:#?}"
    );
    assert_eq!(
        shown
            .iter()
            .filter(|s| s.contains("tenant: misc\n"))
            .count(),
        1,
        "{shown:#?}"
    );
    // Delivery counts the attempts for the header's tenant: nothing else
    // (no rule tenant, no AUTH) names it.
    wait_until(
        "the deferrals counted for b and misc",
        Duration::from_secs(30),
        || {
            tenant_metric(&relay, "b", "deferred") >= 2.0
                && tenant_metric(&relay, "misc", "deferred") >= 1.0
        },
        || relay.metrics(),
    );
    // Restart with the mail queued: the tenant comes back from the spool.
    relay.terminate();
    drop(deferring);
    let hop = ScriptedServer::builder().start(hop_addr);
    relay.restart();
    wait_until(
        "the three messages at the next hop",
        Duration::from_secs(60),
        || hop.messages().len() >= 3,
        || format!("{} delivered\n{}", hop.messages().len(), relay.log()),
    );
    wait_until(
        "the deliveries counted per tenant after the restart",
        Duration::from_secs(10),
        || {
            tenant_metric(&relay, "b", "delivered") >= 2.0
                && tenant_metric(&relay, "misc", "delivered") >= 1.0
        },
        || relay.metrics(),
    );
    assert_eq!(hop.messages().len(), 3, "each message once");
    // The field was an instruction to the relay: not passed on
    // (`tenants.strip_header`, default true).
    for m in hop.messages() {
        let text = String::from_utf8_lossy(&m.body).to_ascii_lowercase();
        assert!(!text.contains("x-tenant:"), "{text}");
    }
    // Events carry the tenant the message counts for (not the raw value).
    let mut seen = Vec::new();
    wait_until(
        "the delivery events",
        Duration::from_secs(10),
        || {
            seen = file_events(&file);
            seen.iter().filter(|e| e["type"] == "delivery").count() >= 3
        },
        || format!("{:#?}", file_events(&file)),
    );
    let tenant_of = |kind: &str, rcpt: &str| {
        seen.iter()
            .find(|e| {
                e["type"] == kind
                    && (e["recipient"] == rcpt
                        || e["recipients"]
                            .as_array()
                            .is_some_and(|r| r.iter().any(|x| x == rcpt)))
            })
            .map(|e| e["tenant"].clone())
            .unwrap_or_else(|| panic!("no {kind} event for {rcpt}: {seen:#?}"))
    };
    assert_eq!(tenant_of("reception", "b0@dest.test"), "b");
    assert_eq!(tenant_of("delivery", "b1@dest.test"), "b");
    assert_eq!(tenant_of("reception", "u@dest.test"), "misc");
    assert_eq!(tenant_of("delivery", "u@dest.test"), "misc");
}

#[test]
fn an_untrusted_client_cannot_name_a_tenant() {
    let ips = loopbacks(1);
    let hop = ScriptedServer::builder().start(SocketAddr::new(ips[0].into(), 0));
    // Loopback is not a relay network here: the client is an outsider
    // sending to a local domain.
    let relay = Relay::builder()
        .set("delivery.enabled=true")
        .set("relay.relay_networks=[]")
        .set("relay.local_domains=[\"dest.test\"]")
        .set(format!(
            "route.hop={{type=\"relay\",host=\"{}\",port={},tls=\"none\"}}",
            hop.addr().ip(),
            hop.addr().port()
        ))
        .set("rule=[{match={recipient_domain=[\"dest.test\"]},route=\"hop\"}]")
        .set("tenant.b={message_rate=[\"1/h\"]}")
        .set("tenants.header=\"X-Tenant\"")
        .start();
    for i in 0..3 {
        let t = swaks_tenant(&relay, "x@any.test", &format!("r{i}@dest.test"), "b");
        assert!(t.contains("<-  250 2.0.0"), "{t}");
    }
    wait_until(
        "the three messages at the next hop",
        Duration::from_secs(30),
        || hop.messages().len() >= 3,
        || relay.log(),
    );
    let metrics = relay.metrics();
    assert_eq!(
        metric_sum(&metrics, "sluice_tenant_messages_total{tenant=\"b\""),
        0.0,
        "{metrics}"
    );
    // Not read, so not removed either: an outsider's field is its own.
    for m in hop.messages() {
        let text = String::from_utf8_lossy(&m.body).to_ascii_lowercase();
        assert!(text.contains("x-tenant: b"), "{text}");
    }
}
