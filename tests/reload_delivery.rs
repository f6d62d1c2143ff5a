//! Delivery settings changed by SIGHUP on the real relay, with mail queued and
//! in flight, against the kit's scripted SMTP servers on loopback:
//!
//! * a route's host and its destination's concurrency and message rate change
//!   in the file; after the SIGHUP the mail deferred at the old host is
//!   retried at the new one, the new host never sees more than the new
//!   concurrency, the messages respect the new rate, and every message is
//!   delivered exactly once;
//! * a file that does not load is refused and the settings in force keep
//!   working;
//! * a `[[shaping.rule]]` added by a reload fires on the next matching reply.
//!
//! The time from the SIGHUP to the reload being in force (its log line) is
//! printed for BENCHMARKS.md.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);

fn free_addr(ip: Ipv4Addr) -> SocketAddr {
    TcpListener::bind((ip, 0))
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
}

/// A next hop that answers the end of data after `delay` (so deliveries
/// that may overlap do) and defers recipients whose address holds `defer`.
fn hop(name: &str, addr: SocketAddr, delay: Duration, defer: Option<&str>) -> ScriptedServer {
    let mut b = ScriptedServer::builder()
        .name(name)
        .capability("8BITMIME")
        .on(END_OF_DATA, Act::Delay(delay));
    if let Some(text) = defer {
        b = b.on_arg("RCPT", text, Act::Reply("451 4.3.0 not now".into()));
    }
    b.start(addr)
}

fn body(tag: &str) -> Vec<u8> {
    format!("Subject: {tag}\r\nMessage-ID: <{tag}@snd.reload.test>\r\n\r\n{tag}\r\n").into_bytes()
}

/// The delivery part of the file: everything to far.test goes by route `hop`.
fn delivery_file(path: &Path, host: SocketAddr, dest: &str, extra: &str) {
    let text = format!(
        "[queue.default]\nretry = [\"1s\"]\n\n\
         [route.hop]\ntype = \"relay\"\nhost = \"{}\"\nport = {}\ntls = \"none\"\n\n\
         [[rule]]\nmatch = {{ recipient_domain = [\"far.test\"] }}\nroute = \"hop\"\n\n\
         [destination.\"route:hop\"]\n{dest}\n{extra}",
        host.ip(),
        host.port()
    );
    std::fs::write(path, text).expect("write the config file");
}

fn relay_with(dir: tempfile::TempDir, file: &Path) -> Relay {
    Relay::builder()
        .cores(2)
        .config(file.to_path_buf())
        .dir(dir)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .start()
}

fn sighup(relay: &Relay) {
    // SAFETY: kill(2) on the relay child this test started and has not reaped.
    let rc = unsafe { libc::kill(relay.pid() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0, "kill SIGHUP: {}", std::io::Error::last_os_error());
}

/// SIGHUPs the relay and waits for the `n`-th reload outcome (`reload: …` or
/// `reload refused: …`); returns it and the time it took.
fn reload(relay: &Relay, n: usize) -> (String, Duration) {
    let outcomes = || -> Vec<String> {
        relay
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["message"].as_str().map(str::to_string))
            .filter(|m| m.starts_with("reload: ") || m.starts_with("reload refused: "))
            .collect()
    };
    let started = Instant::now();
    sighup(relay);
    wait_until(
        &format!("reload outcome #{n}"),
        T,
        || outcomes().len() >= n,
        || relay.log(),
    );
    (outcomes()[n - 1].clone(), started.elapsed())
}

/// The Subject of every message a server took, in arrival order.
fn tags(server: &ScriptedServer) -> Vec<String> {
    server
        .messages()
        .iter()
        .filter_map(|m| {
            m.body_text()
                .lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(|s| s.trim().to_string()))
        })
        .collect()
}

fn send(relay: &Relay, tag: &str, n: usize, local: &str) -> Vec<String> {
    let mut c = relay.session();
    (0..n)
        .map(|i| {
            let t = format!("{tag}{i}");
            c.send_mail(
                "alice@snd.reload.test",
                &[&format!("{local}{i}@far.test")],
                &body(&t),
            );
            t
        })
        .collect()
}

#[test]
fn sighup_moves_a_route_and_changes_its_limits_without_losing_mail() {
    let ip = loopback();
    let (addr_a, addr_b) = (free_addr(ip), free_addr(ip));
    // A defers the "held" recipients: that mail stays queued until the route
    // moves. B is the new host.
    let a = hop("a.test", addr_a, Duration::from_millis(300), Some("<held"));
    let b = hop("b.test", addr_b, Duration::from_millis(100), None);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("sluice.toml");
    delivery_file(&file, addr_a, "max_connections = 4", "");
    let relay = relay_with(dir, &file);

    // Before: up to four connections at once to A; the held mail is deferred.
    let mut sent = send(&relay, "before", 8, "bob");
    sent.extend(send(&relay, "held", 4, "held"));
    wait_until(
        "A to take the first 8",
        T,
        || a.messages().len() >= 8,
        || relay.log(),
    );
    wait_until(
        "the held mail to be deferred at A",
        T,
        || relay.log().contains("451 4.3.0"),
        || relay.log(),
    );
    let before_max = a.max_transactions();
    assert!(
        before_max > 1,
        "A saw at most {before_max} transaction at once: the test needs overlap"
    );
    assert!(before_max <= 4, "A saw {before_max} transactions at once");

    // The route moves to B, one connection at a time, at most 4 messages a second.
    delivery_file(
        &file,
        addr_b,
        "max_connections = 1\nmessage_rate = [\"4/s\"]",
        "",
    );
    let (summary, took) = reload(&relay, 1);
    eprintln!(
        "FIGURE reload: SIGHUP to the new limits in force: {} ms",
        took.as_millis()
    );
    assert!(summary.starts_with("reload: "), "{summary}");
    assert!(
        summary.contains("route") && summary.contains("destination"),
        "{summary}"
    );
    assert!(!summary.contains("need a restart"), "{summary}");
    let a_after_reload = a.messages().len();
    sent.extend(send(&relay, "after", 10, "carol"));

    // Everything ends at B: the four held (queued before the reload) and the ten new.
    wait_until(
        "B to take the held and the new mail",
        T,
        || b.messages().len() >= 14,
        || relay.log(),
    );
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    assert_eq!(b.max_transactions(), 1, "B's new concurrency limit is 1");
    let at_b: Vec<Instant> = b.messages().iter().map(|m| m.at).collect();
    let span = at_b[at_b.len() - 1].duration_since(at_b[0]);
    // 14 messages at 4/s with a burst of 4: at least 10 waits of 250 ms.
    assert!(
        span >= Duration::from_millis(2400),
        "14 messages at B took only {span:?} under 4/s"
    );
    assert_eq!(a.messages().len(), a_after_reload, "nothing more went to A");

    // Exactly once: every token arrived at A or B, none twice.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for t in tags(&a).into_iter().chain(tags(&b)) {
        *seen.entry(t).or_default() += 1;
    }
    for t in &sent {
        assert_eq!(
            seen.get(t),
            Some(&1),
            "{t} delivered {:?} times; all: {seen:?}",
            seen.get(t)
        );
    }
    assert_eq!(seen.len(), sent.len(), "{seen:?}");
    assert!(tags(&b).iter().filter(|t| t.starts_with("held")).count() == 4);

    // A file that does not load changes nothing: the route stays at B, one
    // connection at a time.
    let good = std::fs::read_to_string(&file).expect("read the file");
    std::fs::write(
        &file,
        good.replace(&addr_b.port().to_string(), &addr_a.port().to_string())
            .replace("max_connections = 1", "max_connections = \"many\""),
    )
    .expect("write the bad file");
    let (refused, _) = reload(&relay, 2);
    assert!(refused.starts_with("reload refused: "), "{refused}");
    assert!(
        refused.contains("max_connections"),
        "names the key: {refused}"
    );
    let more = send(&relay, "refused", 4, "dave");
    wait_until(
        "B to take the mail sent after the refused reload",
        T,
        || tags(&b).iter().filter(|t| t.starts_with("refused")).count() == more.len(),
        || relay.log(),
    );
    assert_eq!(
        a.messages().len(),
        a_after_reload,
        "the refused file's host A got nothing"
    );
    assert_eq!(b.max_transactions(), 1, "the limit in force still holds");
}

#[test]
fn a_shaping_rule_added_by_reload_fires() {
    let ip = loopback();
    let addr = free_addr(ip);
    let server = hop("s.test", addr, Duration::ZERO, Some("<slow"));
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("sluice.toml");
    delivery_file(&file, addr, "max_connections = 2", "");
    let relay = relay_with(dir, &file);

    // No rule yet: deferrals are only retried.
    send(&relay, "slow", 1, "slow");
    wait_until(
        "a deferral without a rule",
        T,
        || relay.log().contains("451 4.3.0"),
        || relay.log(),
    );
    assert!(log_events(&relay, "shaping action taken").is_empty());

    // The rule arrives by SIGHUP; the next deferrals (the queued message is
    // retried every second) make it fire.
    delivery_file(
        &file,
        addr,
        "max_connections = 2",
        "\n[[shaping.rule]]\nname = \"reloaded\"\ncode = [451]\nthreshold = \"2/1m\"\n\
         action = \"suspend\"\nduration = \"10m\"\n",
    );
    let (summary, _) = reload(&relay, 1);
    assert!(summary.contains("shaping"), "{summary}");
    wait_until(
        "the reloaded rule to fire",
        T,
        || {
            log_events(&relay, "shaping action taken")
                .iter()
                .any(|v| v["rule"] == "reloaded")
        },
        || relay.log(),
    );
    drop(server);
}

#[test]
fn a_lowered_concurrency_holds_at_a_site_already_in_use() {
    let ip = loopback();
    let addr = free_addr(ip);
    let server = hop("c.test", addr, Duration::from_millis(400), None);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("sluice.toml");
    delivery_file(&file, addr, "max_connections = 4", "");
    let relay = relay_with(dir, &file);

    // The site opens several connections (they stay open, idle, afterwards).
    send(&relay, "wide", 8, "bob");
    wait_until(
        "the first 8",
        T,
        || server.messages().len() >= 8,
        || relay.log(),
    );
    assert!(
        server.max_transactions() > 1,
        "the test needs overlap before the reload"
    );

    // Same host, one connection: the site and its open connections are the
    // ones from before, so only retuning them can hold the new limit.
    delivery_file(&file, addr, "max_connections = 1", "");
    let (summary, _) = reload(&relay, 1);
    assert!(summary.contains("destination"), "{summary}");
    send(&relay, "narrow", 8, "carol");
    wait_until(
        "the next 8",
        T,
        || {
            tags(&server)
                .iter()
                .filter(|t| t.starts_with("narrow"))
                .count()
                == 8
        },
        || relay.log(),
    );
    // One at a time, each answered after 400 ms: at least 7 × 400 ms from
    // the first to the last (four at a time would take about 800 ms).
    let times: Vec<Instant> = server
        .messages()
        .iter()
        .filter(|m| m.body_text().contains("Subject: narrow"))
        .map(|m| m.at)
        .collect();
    let span = times[times.len() - 1].duration_since(times[0]);
    assert!(
        span >= Duration::from_millis(2700),
        "8 messages under max_connections = 1 took only {span:?}"
    );
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
}

fn today() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The pool and tenant part of a file: everything to far.test leaves from
/// pool `p` by route `hop`; the tenant comes from `X-Tenant`.
fn pool_file(path: &Path, hop: SocketAddr, members: &str, tenant_rate: &str) {
    let text = format!(
        "[queue.default]\nretry = [\"1s\"]\n\n\
         [route.hop]\ntype = \"relay\"\nhost = \"{}\"\nport = {}\ntls = \"none\"\n\n\
         [warmup.new]\nschedule = [3]\n\n\
         [pool.p]\nmembers = [{members}]\n\n\
         [tenants]\nheader = \"X-Tenant\"\n\n\
         [tenant.t]\nmessage_rate = [\"{tenant_rate}\"]\n\n\
         [[rule]]\nmatch = {{ recipient_domain = [\"far.test\"] }}\nroute = \"hop\"\npool = \"p\"\n",
        hop.ip(),
        hop.port()
    );
    std::fs::write(path, text).expect("write the config file");
}

/// Sends one message of tenant `t` (by its header field); the end of data's code.
fn send_tenant(relay: &Relay, tag: &str) -> u16 {
    let mut c = relay.session();
    c.expect("MAIL FROM:<alice@snd.reload.test>", 250);
    c.expect(&format!("RCPT TO:<{tag}@far.test>"), 250);
    c.expect("DATA", 354);
    c.send(format!("X-Tenant: t\r\nSubject: {tag}\r\n\r\n{tag}\r\n.\r\n").as_bytes());
    let r = c.read_reply();
    c.send_line("QUIT");
    r.code
}

#[test]
fn sighup_changes_pool_members_and_a_tenant_rate_keeping_warmup_counts() {
    let ips = loopbacks(3);
    let hop = ScriptedServer::builder()
        .name("hop.reload.test")
        .start(SocketAddr::new(ips[0].into(), 0));
    let warming = format!(
        "{{ ip = \"{}\", warmup = \"new\", warmup_start = \"{}\" }}",
        ips[1],
        today()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("sluice.toml");
    // Before: one member, warming at 3 a day; tenant t may send 20 an hour.
    pool_file(&file, hop.addr(), &warming, "20/h");
    let relay = relay_with(dir, &file);
    let mut accepted: Vec<String> = Vec::new();
    for i in 0..6 {
        let tag = format!("before{i}");
        assert_eq!(send_tenant(&relay, &tag), 250, "{tag}");
        accepted.push(tag);
    }
    // Three leave from the warming member; the rest wait, its budget spent.
    wait_until(
        "three messages at the hop and the rest deferred",
        T,
        || {
            hop.messages().len() >= 3
                && metric_sum(&relay.metrics(), "sluice_pool_exhausted_total{pool=\"p\"}") >= 1.0
        },
        || relay.log(),
    );
    assert_eq!(hop.messages().len(), 3);

    // The pool gains a member, tenant t's rate drops to 2 an hour.
    let added = format!("{warming}, {{ ip = \"{}\" }}", ips[2]);
    pool_file(&file, hop.addr(), &added, "2/h");
    let (summary, took) = reload(&relay, 1);
    eprintln!(
        "FIGURE reload: SIGHUP to new pool members and tenant rate in force: {} ms",
        took.as_millis()
    );
    assert!(summary.contains("pool"), "{summary}");
    assert!(summary.contains("tenant"), "{summary}");
    assert!(!summary.contains("need a restart"), "{summary}");

    // The new rate holds at once (the old one had 14 of 20 left): of three
    // more, at least one is told to try later.
    let mut refused = 0;
    for i in 0..3 {
        let tag = format!("after{i}");
        match send_tenant(&relay, &tag) {
            250 => accepted.push(tag),
            451 => refused += 1,
            code => panic!("{tag}: {code}"),
        }
    }
    assert!(refused >= 1, "the lowered tenant rate was not applied");
    assert!(
        metric_sum(
            &relay.metrics(),
            "sluice_tenant_messages_total{tenant=\"t\",outcome=\"rate_limited\"}"
        ) >= 1.0
    );

    // Every accepted message arrives once; the queued ones and the new ones
    // leave from the new member, the warming one stays at its 3.
    let n = accepted.len();
    wait_until(
        &format!("{n} messages at the hop"),
        T,
        || hop.messages().len() >= n,
        || relay.log(),
    );
    let mut got = tags(&hop);
    got.sort();
    accepted.sort();
    assert_eq!(got, accepted, "each accepted message once");
    let from = |ip: Ipv4Addr| {
        hop.messages()
            .iter()
            .filter(|m| m.peer.map(|p| p.ip()) == Some(ip.into()))
            .count()
    };
    assert_eq!(from(ips[1]), 3, "the warming member's budget was reset");
    assert_eq!(from(ips[2]), n - 3);
}
