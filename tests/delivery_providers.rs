//! Provider limits and MX rollup end to end: the real relay binary, a real
//! NSD on loopback serving the MX sets (also under real provider names such
//! as google.com), and the loadgen sink counting concurrent sessions
//! (`sessions_max`) over all the fake MX hosts:
//!
//! - `[provider.NAME] max_connections` holds for several domains whose MX
//!   hosts (different hosts, different addresses) share the provider's
//!   suffix, and the log names the key it counted against;
//! - a shipped preset (google) matches real Google MX names, and the
//!   operator's override of one key changes its limit;
//! - domains whose MX host sets are equal share one site group (one
//!   `max_connections`), and a domain with `rollup = false` is counted alone.

use std::collections::BTreeSet;
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

/// Sends one message per entry of `domains` (full domain names) on one
/// session, all queued before the first delivery ends.
fn send(relay: &Relay, domains: &[String], tag: &str) {
    let mut c = relay.session();
    for (i, d) in domains.iter().enumerate() {
        c.send_mail(
            "alice@snd.dlv.test",
            &[&format!("bob{i}@{d}")],
            &body(&format!("{tag}{i}")),
        );
    }
    c.send_line("QUIT");
}

/// Waits for `n` messages at the sink and an empty spool; returns the
/// sink's stats.
fn wait_done(sink: &LoadgenSink, relay: &Relay, n: u64) -> serde_json::Value {
    wait_until(
        &format!("{n} messages at the sink"),
        T,
        || sink.messages() >= n,
        || relay.log(),
    );
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    let s = sink.stats();
    assert_eq!(s["messages"], n, "{s}");
    assert_eq!(s["tokens_duplicated"], 0, "{s}");
    s
}

/// `n` messages spread over `domains` in turn.
fn spread(domains: &[&str], n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{}.dlv.test", domains[i % domains.len()]))
        .collect()
}

/// The `key` fields of the delivery records of recipients at `domain`.
fn attempt_fields(relay: &Relay, domain: &str, key: &str) -> BTreeSet<String> {
    log_events(relay, "delivery attempt")
        .iter()
        .filter(|v| field(v, "recipient").ends_with(&format!("@{domain}")))
        .map(|v| field(v, key).to_string())
        .collect()
}

#[test]
fn provider_max_connections_hold_across_domains_and_mx_hosts() {
    let ips = loopbacks(3);
    let port = mx_port(&ips);
    // Three domains, three MX hosts of one provider on three addresses: no
    // host and no site is shared, only the provider.
    let nsd = Nsd::start(&format!(
        "p1 MX 10 mx1.prov\np2 MX 10 mx2.prov\np3 MX 10 mx3.prov\n\
         mx1.prov A {}\nmx2.prov A {}\nmx3.prov A {}",
        ips[0], ips[1], ips[2]
    ));
    let listen: Vec<SocketAddr> = ips.iter().map(|ip| sa(*ip, port)).collect();
    let sink = LoadgenSink::start(&listen, &["--delay-data", "200ms"]);
    let relay = mx_relay(
        &nsd,
        port,
        2,
        &[
            "provider.fake.mx_suffixes=[\"prov.dlv.test\"]".into(),
            "provider.fake.max_connections=2".into(),
            "delivery.idle_timeout=\"300ms\"".into(),
        ],
    );
    send(&relay, &spread(&["p1", "p2", "p3"], 12), "prov");
    let s = wait_done(&sink, &relay, 12);
    assert!(
        s["sessions_max"]
            .as_u64()
            .is_some_and(|n| (1..=2).contains(&n)),
        "provider max_connections=2 exceeded: {s}"
    );
    for d in ["p1", "p2", "p3"] {
        let keys = attempt_fields(&relay, &format!("{d}.dlv.test"), "limit_key");
        assert_eq!(
            keys,
            BTreeSet::from(["provider:fake|default".to_string()]),
            "{d}: {}",
            relay.log()
        );
    }
}

#[test]
fn a_preset_provider_matches_real_names_and_an_override_changes_its_limit() {
    let ips = loopbacks(3);
    let port = mx_port(&ips);
    // Domains hosted by "Google": MX hosts under google.com, served by the
    // test's own NSD on loopback addresses.
    let nsd = Nsd::start_with_zones(
        "g1 MX 10 aspmx.l.google.com.\ng2 MX 10 alt1.aspmx.l.google.com.\n\
         g3 MX 10 alt2.aspmx.l.google.com.",
        &[(
            "google.com",
            &format!(
                "aspmx.l A {}\nalt1.aspmx.l A {}\nalt2.aspmx.l A {}",
                ips[0], ips[1], ips[2]
            ),
        )],
    );
    let listen: Vec<SocketAddr> = ips.iter().map(|ip| sa(*ip, port)).collect();
    let sink = LoadgenSink::start(&listen, &["--delay-data", "200ms"]);
    // The preset's other keys stay (max_messages_per_connection); only
    // max_connections is the operator's.
    let relay = mx_relay(
        &nsd,
        port,
        2,
        &[
            "provider.google.max_connections=1".into(),
            "delivery.idle_timeout=\"300ms\"".into(),
        ],
    );
    send(&relay, &spread(&["g1", "g2", "g3"], 9), "goog");
    let s = wait_done(&sink, &relay, 9);
    assert_eq!(s["sessions_max"], 1, "override max_connections=1: {s}");
    for d in ["g1", "g2", "g3"] {
        let keys = attempt_fields(&relay, &format!("{d}.dlv.test"), "limit_key");
        assert_eq!(
            keys,
            BTreeSet::from(["provider:google|default".to_string()]),
            "{d}"
        );
    }
    // `sluice debug tls` names the provider of each MX host.
    let run = run_with_timeout(
        std::process::Command::new(bin())
            .args(["debug", "tls", "g1.dlv.test"])
            .args(["--set", &nsd.servers_set()])
            .args(["--set", "dns.timeout=\"2s\""])
            .args(["--set", "provider.google.max_connections=1"]),
        T,
    );
    assert_ok(&run, "sluice debug tls");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        out.contains("limits of aspmx.l.google.com: provider google, key provider:google|default: max_connections 1"),
        "{out}"
    );
}

#[test]
fn domains_sharing_an_mx_set_share_limits_and_rollup_false_stands_apart() {
    let ip = loopback();
    let port = mx_port(&[ip]);
    // r1, r2, r3: the same MX host set {mx1, mx2} (r3 lists it in the other
    // order). r4: the same set too, but `rollup = false`.
    let nsd = Nsd::start(&format!(
        "r1 MX 10 mx1\nr1 MX 20 mx2\nr2 MX 10 mx1\nr2 MX 20 mx2\n\
         r3 MX 10 mx2\nr3 MX 20 mx1\nr4 MX 10 mx1\nr4 MX 20 mx2\n\
         mx1 A {ip}\nmx2 A {ip}"
    ));
    let sink = LoadgenSink::start(&[sa(ip, port)], &["--delay-data", "300ms"]);
    let relay = mx_relay(
        &nsd,
        port,
        2,
        &[
            // (`--set` keys cannot quote a dotted name: the whole table.)
            "destination={default={max_connections=1},\
             \"r4.dlv.test\"={max_connections=1,rollup=false}}"
                .into(),
            // Longer than the test's deadline: a connection idling while
            // another domain of its group waits would stall the test; it
            // must close at once instead.
            "delivery.idle_timeout=\"40s\"".into(),
        ],
    );
    // First the three rolled-up domains alone: one connection between them
    // (each alone would have had its own).
    send(&relay, &spread(&["r1", "r2", "r3"], 9), "roll");
    let s = wait_done(&sink, &relay, 9);
    assert_eq!(s["sessions_max"], 1, "the group's max_connections=1: {s}");
    let group = "mx:mx1.dlv.test,mx2.dlv.test";
    for d in ["r1", "r2", "r3"] {
        let groups = attempt_fields(&relay, &format!("{d}.dlv.test"), "group");
        assert_eq!(groups, BTreeSet::from([group.to_string()]), "{d}");
    }
    // Then with r4 too: its own connection runs beside the group's.
    let mut mixed = spread(&["r1", "r2", "r3"], 6);
    mixed.extend(spread(&["r4"], 6));
    send(&relay, &mixed, "mix");
    let s = wait_done(&sink, &relay, 21);
    assert_eq!(
        s["sessions_max"], 2,
        "one connection for the group and one for r4: {s}"
    );
    let groups = attempt_fields(&relay, "r4.dlv.test", "group");
    assert_eq!(groups, BTreeSet::from([String::new()]), "r4 stands alone");
}
