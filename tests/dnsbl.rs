//! DNSBL/DNSWL and greylisting at RCPT, end to end with real parts: the
//! zones served by a real NSD on loopback, the real relay, clients (swaks,
//! Python's smtplib) presenting other addresses through the PROXY protocol,
//! and a scripted SMTP server as the next hop that greylisted mail finally
//! reaches. The relay's networks are emptied, so loopback clients are
//! strangers like any other.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);
const RCPT: &str = "user@rcpt.test";

/// bl.test lists 127.0.0.1 (127.0.0.2: reject), 192.0.2.10 (127.0.0.3:
/// tempfail) and 192.0.2.20; wl.test lists 192.0.2.20; dbl.test lists the
/// domain spam.example.
fn zones() -> Nsd {
    Nsd::start_with_zones(
        "",
        &[
            (
                "bl.test",
                "1.0.0.127 A 127.0.0.2\n10.2.0.192 A 127.0.0.3\n20.2.0.192 A 127.0.0.2\n",
            ),
            ("wl.test", "20.2.0.192 A 127.0.0.2\n"),
            ("dbl.test", "spam.example A 127.0.0.2\n"),
        ],
    )
}

/// The zones as `--set`s: bl.test (reject, 127.0.0.3 tempfail), dbl.test
/// for sender domains, wl.test as a DNSWL, and a zone NSD does not serve
/// (every lookup fails: lists nothing).
const ZONE_SETS: &str = "dnsbl.zone=[\
{name=\"bl.test\",action=\"reject\",results={\"127.0.0.3\"=\"tempfail\"}},\
{name=\"dbl.test\",subject=\"sender\"},\
{name=\"wl.test\",allow=true},\
{name=\"unserved.invalid\"}]";

fn relay(nsd: &Nsd, sets: &[String]) -> Relay {
    relay_in(nsd, tempfile::tempdir().expect("tempdir"), sets)
}

fn relay_in(nsd: &Nsd, dir: tempfile::TempDir, sets: &[String]) -> Relay {
    let mut b = Relay::builder()
        .dir(dir)
        .set(nsd.servers_set())
        .set("relay.local_domains=[\"rcpt.test\"]")
        .set("relay.relay_networks=[]")
        .lset("proxy_trusted_networks", "[\"127.0.0.0/8\"]")
        .proxy_probe();
    for s in sets {
        b = b.set(s.clone());
    }
    b.start()
}

/// swaks from `ip` (PROXY v1): its transcript.
fn swaks_from(relay: &Relay, ip: &str, from: &str, to: &str) -> String {
    let out = swaks(
        relay,
        &[
            "--proxy-version",
            "1",
            "--proxy-family",
            "TCP4",
            "--proxy-source",
            ip,
            "--proxy-source-port",
            "40001",
            "--proxy-dest",
            "127.0.0.1",
            "--proxy-dest-port",
            "25",
            "--from",
            from,
            "--to",
            to,
        ],
    );
    text(&out.stdout)
}

/// smtplib from `ip` (a PROXY v1 line first): "RCPT code text", then
/// "sent" when the message was accepted.
fn smtplib_from(relay: &Relay, ip: &str, from: &str, to: &str) -> String {
    let script = r#"
import smtplib, socket, sys
port, ip, sender, rcpt = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
class Proxied(smtplib.SMTP):
    def _get_socket(self, host, p, timeout):
        s = socket.create_connection((host, p), timeout)
        s.sendall(("PROXY TCP4 %s 127.0.0.1 40003 25\r\n" % ip).encode())
        return s
s = Proxied("127.0.0.1", port, timeout=30)
s.ehlo("client.example")
s.mail(sender)
code, msg = s.rcpt(rcpt)
print("RCPT", code, msg.decode())
if code == 250:
    code, msg = s.data("From: <%s>\r\nTo: <%s>\r\nSubject: greylist\r\n\r\nhello\r\n" % (sender, rcpt))
    print("DATA", code, msg.decode())
    if code == 250:
        print("sent")
s.quit()
"#;
    let out = run_with_timeout(
        Command::new("python3").args([
            "-c",
            script,
            &relay.addr().port().to_string(),
            ip,
            from,
            to,
        ]),
        T,
    );
    assert_ok(&out, "smtplib");
    text(&out.stdout)
}

#[test]
fn dnsbl_and_dnswl_answers_decide_at_rcpt() {
    require_tools!("nsd", "swaks");
    let nsd = zones();
    // A Sieve script at DATA records what the zones said (${env.dnsbl}).
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("data.sieve");
    std::fs::write(
        &script,
        "require [\"editheader\", \"variables\"];\naddheader \"X-DNSBL\" \"listed=${env.dnsbl}\";\n",
    )
    .expect("write script");
    let relay = relay_in(
        &nsd,
        dir,
        &[
            "server.listener.smtp.dnsbl=true".into(),
            ZONE_SETS.into(),
            "dnsbl.timeout=\"3s\"".into(),
            format!("server.listener.smtp.sieve.data=\"{}\"", script.display()),
        ],
    );

    // Listed with 127.0.0.2: 554 5.7.1 naming the zone, at RCPT.
    let said = swaks_from(&relay, "127.0.0.1", "a@sender.example", RCPT);
    assert!(
        said.contains("<** 554 5.7.1 Error: client [127.0.0.1] listed at bl.test"),
        "{said}\n{}",
        relay.log()
    );
    assert!(said.contains("-> RCPT TO:"), "{said}");
    // Listed with 127.0.0.3: 451 4.7.1.
    let said = smtplib_from(&relay, "192.0.2.10", "a@sender.example", RCPT);
    assert!(said.starts_with("RCPT 451 4.7.1"), "{said}");
    assert!(said.contains("listed at bl.test"), "{said}");
    // Listed in bl.test and in the DNSWL: passes.
    let said = smtplib_from(&relay, "192.0.2.20", "a@sender.example", RCPT);
    assert!(said.contains("sent"), "{said}\n{}", relay.log());
    let id = queued_id(&said).expect("queued id");
    let stored = String::from_utf8_lossy(&relay.body(&id)).into_owned();
    assert!(
        stored.contains("X-DNSBL: listed=bl.test,wl.test\r\n"),
        "{stored}"
    );
    // Not listed: passes, though unserved.invalid failed (a failed lookup
    // lists nothing).
    let said = smtplib_from(&relay, "192.0.2.30", "a@sender.example", RCPT);
    assert!(said.contains("sent"), "{said}\n{}", relay.log());
    // A sender domain listed in dbl.test.
    let said = swaks_from(&relay, "192.0.2.30", "a@spam.example", RCPT);
    assert!(
        said.contains("<** 554 5.7.1 Error: client [192.0.2.30] listed at dbl.test"),
        "{said}"
    );
    assert_eq!(relay.count(), 2);

    let m = relay.metrics();
    assert_eq!(
        metric_sum(&m, "sluice_dnsbl_decisions_total{verdict=\"reject\"}"),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "sluice_dnsbl_decisions_total{verdict=\"allowed\"}"),
        1.0
    );
    // Label order aside: the failed lookups of the unserved zone.
    let failed: f64 = m
        .lines()
        .filter(|l| {
            l.starts_with("sluice_dnsbl_lookups_total{")
                && l.contains("zone=\"unserved.invalid\"")
                && l.contains("result=\"failed\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(failed >= 1.0, "{m}");
    let log = relay.log();
    assert!(log.contains("client refused by DNSBL"), "{log}");
}

/// A relay greylisting on its listener (delay 3s), checking wl.test as a
/// DNSWL, delivering rcpt.test to `hop`; 203.0.113.77 is its relay network.
fn greylisting_relay(nsd: &Nsd, hop: SocketAddr) -> Relay {
    // The exemption list lives in the relay's own directory (removed with it).
    let dir = tempfile::tempdir().expect("tempdir");
    let list_path = dir.path().join("greylist_exempt.list");
    std::fs::write(&list_path, "postmaster@rcpt.test\n").expect("write list");
    let sets = [
        "server.listener.smtp.dnsbl=true".to_string(),
        "server.listener.smtp.greylist=true".to_string(),
        "dnsbl.zone=[{name=\"wl.test\",allow=true}]".to_string(),
        "greylist.delay=\"3s\"".to_string(),
        format!("lists.greylist_exempt=\"{}\"", list_path.display()),
        "greylist.skip_recipients_list=\"greylist_exempt\"".to_string(),
        "delivery.enabled=true".to_string(),
        "queue.default.retry=[\"1s\"]".to_string(),
        format!(
            "route.hop={{type=\"relay\",host=\"{}\",port={},tls=\"none\"}}",
            hop.ip(),
            hop.port()
        ),
        "rule=[{match={recipient_domain=[\"rcpt.test\"]},route=\"hop\"}]".to_string(),
    ];
    let mut b = Relay::builder()
        .set(nsd.servers_set())
        .set("relay.local_domains=[\"rcpt.test\"]")
        .set("relay.relay_networks=[\"203.0.113.77/32\"]")
        .lset("proxy_trusted_networks", "[\"127.0.0.0/8\"]")
        .proxy_probe()
        .dir(dir);
    for s in sets {
        b = b.set(s);
    }
    b.start()
}

#[test]
fn greylisting_defers_first_sight_passes_a_later_retry_and_remembers_it() {
    require_tools!("nsd", "swaks");
    let nsd = zones();
    let ip = loopback();
    let port = std::net::TcpListener::bind((ip, 0))
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let hop = ScriptedServer::builder()
        .name("hop.rcpt.test")
        .start(SocketAddr::new(ip.into(), port));
    let mut relay = greylisting_relay(&nsd, hop.addr());

    // First sight: 451 4.7.1 at RCPT.
    let first = Instant::now();
    let said = swaks_from(&relay, "198.51.100.7", "a@sender.example", RCPT);
    assert!(
        said.contains("<** 451 4.7.1 Error: greylisted, try again later"),
        "{said}\n{}",
        relay.log()
    );
    // A retry before the delay: still 451.
    let said = smtplib_from(&relay, "198.51.100.7", "a@sender.example", RCPT);
    assert!(
        first.elapsed() < Duration::from_secs(3),
        "the early retry took too long to prove anything"
    );
    assert!(said.starts_with("RCPT 451 4.7.1"), "{said}");
    // Retries until the delay has passed: accepted, then delivered.
    let mut last = String::new();
    wait_until(
        "a retry to be accepted",
        T,
        || {
            last = smtplib_from(&relay, "198.51.100.7", "a@sender.example", RCPT);
            last.contains("sent")
        },
        || relay.log(),
    );
    assert!(
        first.elapsed() >= Duration::from_secs(3),
        "accepted before the delay"
    );
    wait_until(
        "delivery to the next hop",
        T,
        || hop.messages().len() == 1,
        || relay.log(),
    );
    assert_eq!(hop.messages()[0].rcpt_addresses(), [RCPT]);

    // The same /24 passes at once; another sender is greylisted.
    let said = smtplib_from(&relay, "198.51.100.99", "a@sender.example", RCPT);
    assert!(said.contains("sent"), "{said}");
    let said = smtplib_from(&relay, "198.51.100.7", "b@sender.example", RCPT);
    assert!(said.starts_with("RCPT 451 4.7.1"), "{said}");
    // Exempt: a recipient on the list, and a DNSWL-listed client.
    let said = smtplib_from(
        &relay,
        "203.0.113.5",
        "c@sender.example",
        "postmaster@rcpt.test",
    );
    assert!(said.contains("sent"), "{said}");
    let said = smtplib_from(&relay, "192.0.2.20", "d@sender.example", RCPT);
    assert!(said.contains("sent"), "{said}");
    // A client in the relay networks is never greylisted.
    let said = smtplib_from(&relay, "203.0.113.77", "f@sender.example", RCPT);
    assert!(said.contains("sent"), "{said}");

    let m = relay.metrics();
    // First sight, the early retry, the other sender (and the polls that
    // came before the delay).
    assert!(
        metric_sum(&m, "sluice_greylist_total{result=\"deferred\"}") >= 3.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "sluice_greylist_total{result=\"exempt\"}"),
        2.0,
        "{m}"
    );

    // The triplet survives a restart: accepted at the first attempt.
    relay.terminate();
    relay.restart();
    let said = smtplib_from(&relay, "198.51.100.7", "a@sender.example", RCPT);
    assert!(said.contains("sent"), "{said}\n{}", relay.log());
    // And a new one is still greylisted after it.
    let said = smtplib_from(&relay, "198.51.100.7", "e@sender.example", RCPT);
    assert!(said.starts_with("RCPT 451 4.7.1"), "{said}");
}

/// The figure for the report: what a DNSBL check adds to a connection, with
/// the zone's answer in the resolver's cache and not (each client a new
/// address). One zone, NSD on loopback (so "not cached" is a loopback round
/// trip, not an Internet one). Run by hand:
/// `cargo nextest run --release -E 'binary(dnsbl)' --run-ignored only`.
#[test]
#[ignore = "a measurement, not a check"]
fn dnsbl_cost_per_connection() {
    require_tools!("nsd");
    let nsd = zones();
    const N: u32 = 200;
    let session = |relay: &Relay, ip: &str| {
        let mut c = relay.connect();
        c.send(format!("PROXY TCP4 {ip} 127.0.0.1 40000 25\r\n").as_bytes());
        assert_eq!(c.read_reply().code, 220);
        c.expect("EHLO client.example", 250);
        c.expect("MAIL FROM:<a@sender.example>", 250);
        c.expect(&format!("RCPT TO:<{RCPT}>"), 250);
        c.send_line("QUIT");
    };
    // The median session, in µs: the box is shared, and a mean follows
    // whatever else runs.
    let per_connection = |relay: &Relay, ip: &dyn Fn(u32) -> String| {
        let mut took: Vec<f64> = (0..N)
            .map(|i| {
                let start = Instant::now();
                session(relay, &ip(i));
                start.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        took.sort_by(f64::total_cmp);
        took[took.len() / 2]
    };
    let ip_of = |i: u32| format!("198.51.{}.{}", 100 + i / 250, 1 + i % 250);

    // Both relays up at once, measured in turn, the plain one before and
    // after (a busy box drifts).
    let plain = relay(&nsd, &[]);
    let checking = relay(
        &nsd,
        &[
            "server.listener.smtp.dnsbl=true".into(),
            "dnsbl.zone=[{name=\"bl.test\"}]".into(),
        ],
    );
    session(&plain, "203.0.113.9");
    let before = per_connection(&plain, &ip_of);
    let uncached = per_connection(&checking, &ip_of);
    // One address again and again: its NXDOMAIN stays cached (the zone's
    // negative TTL is 5 s, far more than the run).
    session(&checking, "203.0.113.9");
    let cached = per_connection(&checking, &|_| "203.0.113.9".to_string());
    let after = per_connection(&plain, &ip_of);
    let base = (before + after) / 2.0;
    println!("no DNSBL: {before:.0} µs before, {after:.0} µs after");
    println!(
        "median session (connect, PROXY, EHLO, MAIL, RCPT, QUIT; {N} each): \
         no DNSBL {base:.0} µs, DNSBL not cached {uncached:.0} µs (+{:.0}), \
         DNSBL cached {cached:.0} µs (+{:.0})",
        uncached - base,
        cached - base
    );
}
