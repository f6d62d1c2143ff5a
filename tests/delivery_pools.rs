//! Egress pools (`[pool.NAME]`, a rule's `pool`) and IP warm-up
//! (`[warmup.NAME]`), seen from the next hop: a scripted SMTP server on a
//! loopback address records each message's peer address, which tells which
//! pool member sent it (127.0.0.0/8 is all local here, so every member can
//! be bound).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use sluice_testkit::*;

const T: Duration = Duration::from_secs(60);

fn hop(ip: Ipv4Addr) -> ScriptedServer {
    ScriptedServer::builder()
        .name("hop.pool.test")
        .capability("PIPELINING")
        // The member introducing itself as blocked.pool.test is refused the
        // way a provider blocks an address.
        .on_arg(
            "EHLO",
            "blocked.pool.test",
            Act::Refuse("421 4.7.0 [IPBLOCK] mail from this address is blocked".into()),
        )
        .start(SocketAddr::new(ip.into(), 0))
}

/// A relay delivering everything through route "hop" from pool "p".
fn relay(hop: &ScriptedServer, members: &str, extra: &[&str]) -> Relay {
    let mut b = Relay::builder()
        .cores(2)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set("queue.default.retry=[\"1s\"]")
        .set(format!(
            "route.hop={{type=\"relay\",host=\"{}\",port={},tls=\"none\"}}",
            hop.addr().ip(),
            hop.addr().port()
        ))
        .set(format!("pool.p.members=[{members}]"))
        .set("rule=[{route=\"hop\",pool=\"p\"}]");
    for e in extra {
        b = b.set(*e);
    }
    b.start()
}

fn send(relay: &Relay, n: usize, tag: &str) {
    for i in 0..n {
        let body =
            format!("Subject: {tag}{i}\r\nMessage-ID: <{tag}{i}@pool.test>\r\n\r\n{tag}{i}\r\n");
        submit(
            relay,
            "sender@pool.test",
            "",
            &[&format!("r{i}@dest.test")],
            body.as_bytes(),
        );
    }
}

/// Waits for `n` messages at the hop; their senders' addresses.
fn wait_received(hop: &ScriptedServer, relay: &Relay, n: usize) -> Vec<IpAddr> {
    wait_until(
        &format!("{n} messages at the hop"),
        T,
        || hop.messages().len() >= n,
        || relay.log(),
    );
    hop.messages()
        .iter()
        .filter_map(|m| m.peer.map(|p| p.ip()))
        .collect()
}

fn count(peers: &[IpAddr], ip: Ipv4Addr) -> usize {
    peers.iter().filter(|p| **p == IpAddr::V4(ip)).count()
}

fn member(ip: Ipv4Addr, rest: &str) -> String {
    format!("{{ip=\"{ip}\",{rest}}}")
}

#[test]
fn weights_share_the_messages_between_members() {
    let ips = loopbacks(3);
    let hop = hop(ips[0]);
    let members = format!(
        "{},{}",
        member(ips[1], "weight=3,ehlo_name=\"a.pool.test\""),
        member(ips[2], "weight=1,ehlo_name=\"b.pool.test\"")
    );
    let relay = relay(&hop, &members, &[]);
    send(&relay, 40, "w");
    let peers = wait_received(&hop, &relay, 40);
    let (a, b) = (count(&peers, ips[1]), count(&peers, ips[2]));
    // Smooth weighted round robin gives 30/10; a plain alternation (or the
    // kernel's choice of source) would give 20/20 or 0/0.
    assert_eq!(a + b, 40, "every message from a pool member: {peers:?}");
    assert!((27..=33).contains(&a), "weight 3 member sent {a} of 40");
    assert!((7..=13).contains(&b), "weight 1 member sent {b} of 40");
    // Each member introduced itself with its own EHLO name.
    let ehlos: Vec<String> = hop
        .commands()
        .into_iter()
        .filter(|c| c.to_ascii_uppercase().starts_with("EHLO"))
        .collect();
    assert!(ehlos.iter().any(|c| c.contains("a.pool.test")), "{ehlos:?}");
    assert!(ehlos.iter().any(|c| c.contains("b.pool.test")), "{ehlos:?}");
    let metrics = relay.metrics();
    assert!(
        metric_sum(&metrics, "sluice_pool_choices_total{pool=\"p\"}") >= 40.0,
        "{metrics}"
    );
}

#[test]
fn blocked_and_unavailable_members_are_skipped() {
    let ips = loopbacks(4);
    let hop = hop(ips[0]);
    // ips[3] is refused at EHLO (a shaping rule suspends it for the
    // destination); 192.0.2.55 is not an address of this host (EADDRNOTAVAIL).
    let members = format!(
        "{},{},{},{}",
        member(ips[1], "ehlo_name=\"a.pool.test\""),
        member(ips[2], "ehlo_name=\"b.pool.test\""),
        member(ips[3], "ehlo_name=\"blocked.pool.test\""),
        "{ip=\"192.0.2.55\"}"
    );
    let rule = "shaping.rule=[{name=\"ipblock\",site=\"route:hop\",code=[421],text='IPBLOCK',\
                threshold=\"1/1m\",action=\"suspend-source-ip\",duration=\"1h\"}]";
    let relay = relay(&hop, &members, &[rule]);
    send(&relay, 30, "s");
    // Everything arrives: mail first given to the blocked or missing member
    // is deferred, then retried from the others.
    let peers = wait_received(&hop, &relay, 30);
    assert_eq!(
        count(&peers, ips[3]),
        0,
        "blocked member sent mail: {peers:?}"
    );
    assert_eq!(
        count(&peers, ips[1]) + count(&peers, ips[2]),
        30,
        "{peers:?}"
    );
    assert!(
        !log_events(&relay, "shaping action taken").is_empty(),
        "the blocked member was never tried:\n{}",
        relay.log()
    );
    assert!(
        relay
            .log()
            .contains("source address not available on this host"),
        "the unavailable member was never tried:\n{}",
        relay.log()
    );
    // Now suspended and left out: new mail goes straight to the others.
    hop.reset();
    send(&relay, 10, "t");
    let peers = wait_received(&hop, &relay, 10);
    assert_eq!(count(&peers, ips[3]), 0, "{peers:?}");
    let refused_ehlo = hop
        .commands()
        .iter()
        .filter(|c| c.contains("blocked.pool.test"))
        .count();
    assert_eq!(refused_ehlo, 0, "the suspended member was dialled again");
}

/// Today (UTC) as YYYY-MM-DD.
fn today() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn warmup_budget_caps_a_member_and_survives_a_restart() {
    let ips = loopbacks(3);
    let hop = hop(ips[0]);
    let members = format!(
        "{},{}",
        member(
            ips[1],
            &format!("warmup=\"new\",warmup_start=\"{}\"", today())
        ),
        member(ips[2], "weight=1")
    );
    let mut relay = relay(&hop, &members, &["warmup.new.schedule=[4,8]"]);
    send(&relay, 20, "a");
    let peers = wait_received(&hop, &relay, 20);
    // Equal weights would give 10 each: the warming member stops at 4.
    assert_eq!(count(&peers, ips[1]), 4, "{peers:?}");
    assert_eq!(count(&peers, ips[2]), 16, "{peers:?}");
    // The day's count is kept across a restart.
    relay.terminate();
    relay.restart();
    hop.reset();
    send(&relay, 10, "b");
    let peers = wait_received(&hop, &relay, 10);
    assert_eq!(
        count(&peers, ips[1]),
        0,
        "budget reset by the restart: {peers:?}"
    );
    assert_eq!(count(&peers, ips[2]), 10, "{peers:?}");
}

#[test]
fn a_pool_with_no_usable_member_defers_with_a_reason() {
    let ips = loopbacks(1);
    let hop = hop(ips[0]);
    let members = "{ip=\"192.0.2.55\"}";
    let relay = relay(&hop, members, &[]);
    let id = submit(
        &relay,
        "sender@pool.test",
        "",
        &["r@dest.test"],
        b"Subject: x\r\n\r\nx\r\n",
    );
    // The first attempt fails to bind; the retries find no usable member and
    // defer without a connection, saying why. Nothing is bounced.
    wait_until(
        "a deferral naming the pool",
        T,
        || try_show(&relay, &id).is_some_and(|s| s.contains("no usable source address in pool p")),
        || format!("{:?}\n{}", try_show(&relay, &id), relay.log()),
    );
    let show = relay.show(&id);
    assert!(
        recipient_lines(&show).iter().all(|l| !l.contains("failed")),
        "{show}"
    );
    assert!(hop.messages().is_empty());
}

#[test]
fn a_deferred_attempt_does_not_spend_the_warmup_budget() {
    let ips = loopbacks(2);
    // The hop defers the "later" recipients, takes the rest.
    let hop = ScriptedServer::builder()
        .name("hop.pool.test")
        .on_arg("RCPT", "later", Act::Reply("451 4.3.0 not now".into()))
        .start(SocketAddr::new(ips[0].into(), 0));
    let members = member(
        ips[1],
        &format!("warmup=\"new\",warmup_start=\"{}\"", today()),
    );
    // One attempt each in the test's time: a deferred message waits an hour.
    let relay = relay(
        &hop,
        &members,
        &["warmup.new.schedule=[3]", "queue.default.retry=[\"1h\"]"],
    );
    let later: Vec<String> = (0..3)
        .map(|i| {
            submit(
                &relay,
                "sender@pool.test",
                "",
                &[&format!("later{i}@dest.test")],
                format!("Subject: later{i}\r\n\r\nx\r\n").as_bytes(),
            )
        })
        .collect();
    // Each is deferred by the hop (its result recorded in the spool).
    wait_until(
        "the three deferred by the hop",
        T,
        || {
            later.iter().all(|id| {
                try_show(&relay, id)
                    .is_some_and(|s| s.contains("451 4.3.0") && s.contains("deferred"))
            })
        },
        || relay.log(),
    );
    assert!(hop.messages().is_empty());
    // Three deferred attempts spent nothing: the day's three go out.
    send(&relay, 3, "ok");
    let peers = wait_received(&hop, &relay, 3);
    assert_eq!(count(&peers, ips[1]), 3, "{peers:?}");
    // Three delivered: the cap holds for the next one.
    let id = submit(
        &relay,
        "sender@pool.test",
        "",
        &["over@dest.test"],
        b"Subject: over\r\n\r\nx\r\n",
    );
    wait_until(
        "the fourth deferred for the budget",
        T,
        || try_show(&relay, &id).is_some_and(|s| s.contains("no usable source address in pool p")),
        || format!("{:?}\n{}", try_show(&relay, &id), relay.log()),
    );
    assert_eq!(hop.messages().len(), 3);
}

#[test]
fn per_site_connections_caps_each_member_at_a_site() {
    let ips = loopbacks(3);
    // Slow at each message, so the relay wants many connections at once.
    let hop = ScriptedServer::builder()
        .name("hop.pool.test")
        .capability("PIPELINING")
        .on(END_OF_DATA, Act::Delay(Duration::from_millis(150)))
        .start(SocketAddr::new(ips[0].into(), 0));
    let members = format!(
        "{},{}",
        member(ips[1], "ehlo_name=\"a.pool.test\""),
        member(ips[2], "ehlo_name=\"b.pool.test\"")
    );
    let relay = relay(
        &hop,
        &members,
        &[
            "pool.p.per_site_connections=2",
            "destination.default.max_connections=10",
        ],
    );
    send(&relay, 40, "c");
    let peers = wait_received(&hop, &relay, 40);
    assert_eq!(count(&peers, ips[1]) + count(&peers, ips[2]), 40);
    let by_ip = hop.max_sessions_by_ip();
    let most = |ip: Ipv4Addr| by_ip.get(&IpAddr::V4(ip)).copied().unwrap_or(0);
    eprintln!("most sessions at once per member: {by_ip:?}");
    // The site alone would allow 10 per member.
    assert!(most(ips[1]) <= 2, "{by_ip:?}");
    assert!(most(ips[2]) <= 2, "{by_ip:?}");
    // And the cap is reached, so the test sees concurrency at all.
    assert!(most(ips[1]).max(most(ips[2])) == 2, "{by_ip:?}");
}
