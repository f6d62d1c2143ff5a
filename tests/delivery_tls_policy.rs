//! Outbound TLS policy per destination (issue 13): each level (`none`,
//! `opportunistic`, `required`, `verify`) chosen by `[[rule]] tls`, against
//! each kind of receiver — a certificate valid for its MX name (issued by a test
//! CA given as `delivery.tls_ca_file`), one for another name, a self-signed
//! one, and no STARTTLS at all. The receivers (tests/py/tls_receiver.py, TLS by
//! Python's ssl/OpenSSL) record whether each message crossed in clear text.
//! Mail goes only where the policy allows, never in clear when the policy needs
//! TLS; the delivery log and `sluice_tls_outbound_total` say which policy
//! applied and whether the certificate verified.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sluice_testkit::nsd::ZONE;
use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);

/// `GET /metrics` from the relay's operations listener.
fn metrics(relay: &Relay) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", relay.admin_port)).expect("admin listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.") && resp.contains(" 200 "),
        "{resp}"
    );
    resp
}

fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

const KINDS: [&str; 4] = ["good", "wrong", "self", "plain"];
const POLICIES: [&str; 4] = ["none", "opportunistic", "required", "verify"];

/// Whether `policy` may deliver to a receiver of `kind`, and then whether in
/// TLS and verified.
fn expected(policy: &str, kind: &str) -> Option<(bool, bool)> {
    let tls = policy != "none" && kind != "plain";
    let verified = tls && kind == "good";
    match policy {
        "required" if kind == "plain" => None,
        "verify" if kind != "good" => None,
        _ => Some((tls, verified)),
    }
}

#[test]
fn each_policy_against_each_receiver() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path(), "ca");
    // One receiver per (policy, kind), so each one's events are that pair's.
    let ips = loopbacks(POLICIES.len() * KINDS.len());
    let port = mx_port(&ips);
    let mut zone = String::new();
    let mut receivers = Vec::new();
    for (i, policy) in POLICIES.iter().enumerate() {
        for (j, kind) in KINDS.iter().enumerate() {
            let ip = ips[i * KINDS.len() + j];
            let label = format!("{policy}-{kind}");
            let mx = format!("mx-{label}.{ZONE}");
            zone.push_str(&format!("{label} MX 10 mx-{label}\nmx-{label} A {ip}\n"));
            let cert = match *kind {
                "good" => Some(make_issued_cert(dir.path(), &ca, &label, &mx)),
                "wrong" => Some(make_issued_cert(
                    dir.path(),
                    &ca,
                    &label,
                    &format!("elsewhere.{ZONE}"),
                )),
                "self" => Some(make_self_signed(dir.path(), &label, &mx)),
                _ => None,
            };
            let r = TlsReceiver::start(dir.path(), ip, port, cert.as_ref(), None);
            receivers.push(((*policy, *kind), r));
        }
    }
    let nsd = Nsd::start(&zone);
    let rules: Vec<String> = POLICIES
        .iter()
        .map(|p| {
            let domains: Vec<String> = KINDS
                .iter()
                .map(|k| format!("\"{p}-{k}.{ZONE}\""))
                .collect();
            format!(
                "{{match={{recipient_domain=[{}]}},tls=\"{p}\"}}",
                domains.join(",")
            )
        })
        .collect();
    let relay = mx_relay(
        &nsd,
        port,
        1,
        &[
            format!("delivery.tls_ca_file=\"{}\"", ca.0.display()),
            format!("rule=[{}]", rules.join(",")),
            // A wrong certificate stays wrong: retry rarely.
            "queue.default.retry=[\"1h\"]".to_string(),
        ],
    );
    let rcpts: Vec<String> = receivers
        .iter()
        .map(|((p, k), _)| format!("bob@{p}-{k}.{ZONE}"))
        .collect();
    let rcpt_refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let body = b"From: alice@snd.example\r\nSubject: tls policy\r\n\r\nhello\r\n";
    let id = submit(&relay, "alice@snd.example", "", &rcpt_refs, body);

    // Every recipient has its first attempt.
    let mut a = Vec::new();
    wait_until(
        "an attempt for every recipient",
        T,
        || {
            a = attempts(&relay, &id);
            rcpts
                .iter()
                .all(|r| a.iter().any(|e| field(e, "recipient") == r))
        },
        || relay.log(),
    );
    for ((policy, kind), receiver) in &receivers {
        let rcpt = format!("bob@{policy}-{kind}.{ZONE}");
        let rec = a
            .iter()
            .find(|e| field(e, "recipient") == rcpt)
            .expect("attempt");
        let what = format!("{policy} → {kind}: {rec}");
        assert_eq!(field(rec, "tls_policy"), *policy, "{what}");
        let messages = receiver.of("message");
        match expected(policy, kind) {
            Some((tls, verified)) => {
                assert_eq!(field(rec, "status"), "delivered", "{what}");
                assert_eq!(rec["tls_verified"], verified, "{what}");
                assert_eq!(field(rec, "tls").starts_with("TLSv1."), tls, "{what}");
                assert_eq!(messages.len(), 1, "{what}: {messages:?}");
                assert_eq!(messages[0]["tls"], tls, "{what}: {messages:?}");
            }
            None => {
                assert_eq!(field(rec, "status"), "deferred", "{what}");
                assert_eq!(rec["code"], 451, "{what}");
                let want = if *kind == "plain" { "4.7.10" } else { "4.7.5" };
                assert_eq!(field(rec, "enhanced"), want, "{what}");
                assert!(
                    field(rec, "reply").contains(&format!("TLS policy {policy} ([[rule]] ")),
                    "{what}"
                );
                assert_eq!(rec["tls_verified"], false, "{what}");
                assert!(
                    messages.is_empty(),
                    "{what}: nothing may arrive: {messages:?}"
                );
                if *kind != "plain" {
                    // The handshake happened, the check failed, QUIT went over TLS.
                    let quits = receiver.of("quit");
                    assert!(
                        quits.iter().any(|q| q["tls"] == true),
                        "{what}: QUIT after the failed verification: {:?}",
                        receiver.events()
                    );
                }
            }
        }
    }
    // The deferral is stored as the recipient's last reply once the attempt
    // is merged into the envelope.
    wait_until(
        "the 4.7.x deferrals in the envelope",
        T,
        || {
            let show = relay.show(&id);
            show.contains("4.7.10") && show.contains("4.7.5")
        },
        || relay.show(&id),
    );

    let m = metrics(&relay);
    for (policy, result, n) in [
        ("none", "cleartext", 4),
        ("opportunistic", "verified", 1),
        ("opportunistic", "unverified", 2),
        ("opportunistic", "cleartext", 1),
        ("required", "verified", 1),
        ("required", "unverified", 2),
        ("required", "no_starttls", 1),
        ("verify", "verified", 1),
        ("verify", "not_verified", 2),
        ("verify", "no_starttls", 1),
    ] {
        let series =
            format!("sluice_tls_outbound_total{{policy=\"{policy}\",result=\"{result}\"}}");
        assert_eq!(sample(&m, &series), n, "{series}:\n{m}");
    }
}

/// Precedence: a rule's `tls` over the route's over `delivery.tls`; and a
/// policy failure is deferred, never bounced, and never retried in clear.
#[test]
fn rule_over_route_over_global_and_never_clear_text_on_retry() {
    let dir = tempfile::tempdir().unwrap();
    // ips[1]: an MX host nobody listens on (an early deferral, no session).
    let ips = loopbacks(2);
    let port = mx_port(&ips);
    let plain = TlsReceiver::start(dir.path(), ips[0], port, None, None);
    let nsd = Nsd::start(&format!(
        "g MX 10 mx\nr MX 10 mx\nrr MX 10 mx\nmx A {}\ndead MX 10 deadmx\ndeadmx A {}",
        ips[0], ips[1]
    ));
    // Global verify; route "secure" (type mx) opportunistic; a rule sends r.*
    // through it, and rule 2 sends rr.* through it with tls = "required".
    let relay = mx_relay(
        &nsd,
        port,
        1,
        &[
            "delivery.tls=\"verify\"".to_string(),
            "route.secure={type=\"mx\",tls=\"opportunistic\"}".to_string(),
            format!(
                "rule=[{{match={{recipient_domain=[\"r.{ZONE}\"]}},route=\"secure\"}},\
                 {{match={{recipient_domain=[\"rr.{ZONE}\"]}},route=\"secure\",tls=\"required\"}}]"
            ),
        ],
    );
    let body = b"Subject: precedence\r\n\r\nhi\r\n";
    let id = submit(
        &relay,
        "alice@snd.example",
        "",
        &[
            &format!("a@g.{ZONE}"),
            &format!("a@r.{ZONE}"),
            &format!("a@rr.{ZONE}"),
            &format!("a@dead.{ZONE}"),
        ],
        body,
    );
    // Retries every second: wait for three attempts of the two deferred ones.
    let mut a = Vec::new();
    wait_until(
        "three attempts of each deferred recipient",
        T,
        || {
            a = attempts(&relay, &id);
            ["g", "rr", "dead"].iter().all(|d| {
                a.iter()
                    .filter(|e| field(e, "recipient") == format!("a@{d}.{ZONE}"))
                    .count()
                    >= 3
            })
        },
        || relay.log(),
    );
    let of = |d: &str| -> Vec<&Value> {
        a.iter()
            .filter(|e| field(e, "recipient") == format!("a@{d}.{ZONE}"))
            .collect()
    };
    for e in of("g") {
        assert_eq!(field(e, "tls_policy"), "verify", "{e}");
        assert_eq!(field(e, "status"), "deferred", "{e}");
        assert!(field(e, "reply").contains("(delivery.tls)"), "{e}");
    }
    let r = of("r");
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(field(r[0], "tls_policy"), "opportunistic");
    assert_eq!(field(r[0], "status"), "delivered");
    for e in of("rr") {
        assert_eq!(field(e, "tls_policy"), "required", "{e}");
        assert_eq!(field(e, "enhanced"), "4.7.10", "{e}");
        assert!(field(e, "reply").contains("([[rule]] 2 tls)"), "{e}");
    }
    // Deferred before any session: the record still names the policy.
    for e in of("dead") {
        assert_eq!(field(e, "status"), "deferred", "{e}");
        assert_eq!(field(e, "tls_policy"), "verify", "{e}");
        assert_eq!(e["tls_verified"], false, "{e}");
        assert!(field(e, "enhanced").starts_with("4.4."), "{e}");
    }
    let messages = plain.of("message");
    assert_eq!(
        messages.len(),
        1,
        "only r.{ZONE} went, in clear: {messages:?}"
    );
    assert_eq!(messages[0]["rcpts"][0], format!("a@r.{ZONE}"));
    // Deferred, not bounced: no notice was queued (the only message is ours).
    assert_eq!(relay.count(), 1, "{:?}", spool_ids(&relay));
}

/// A smart host that admits relays by client certificate (Python's ssl with
/// CERT_REQUIRED): the route with `tls_client_cert`/`tls_client_key` delivers
/// and the receiver saw our certificate; the same host through a route without
/// one refuses the handshake, and that recipient is deferred, never sent.
#[test]
fn client_certificate_for_a_smart_host_that_requires_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path(), "ca");
    let host = format!("smart.{ZONE}");
    let server = make_issued_cert(dir.path(), &ca, "smart", &host);
    let client = make_issued_cert(dir.path(), &ca, "client", "relay.client.test");
    let ips = loopbacks(1);
    let port = mx_port(&ips);
    let smart = TlsReceiver::start(dir.path(), ips[0], port, Some(&server), Some(&ca.0));
    let nsd = Nsd::start(&format!("smart A {}", ips[0]));
    let relay = mx_relay(
        &nsd,
        port,
        1,
        &[
            format!("delivery.tls_ca_file=\"{}\"", ca.0.display()),
            format!(
                "route.withcert={{type=\"relay\",host=\"{host}\",port={port},tls=\"verify\",\
                 tls_client_cert=\"{}\",tls_client_key=\"{}\"}}",
                client.0.display(),
                client.1.display()
            ),
            format!("route.nocert={{type=\"relay\",host=\"{host}\",port={port},tls=\"verify\"}}"),
            "rule=[{match={recipient_domain=[\"c.example\"]},route=\"withcert\"},\
             {match={recipient_domain=[\"n.example\"]},route=\"nocert\"}]"
                .to_string(),
            "queue.default.retry=[\"1h\"]".to_string(),
        ],
    );
    let id = submit(
        &relay,
        "alice@snd.example",
        "",
        &["a@c.example", "a@n.example"],
        b"Subject: client cert\r\n\r\nhi\r\n",
    );
    let mut a = Vec::new();
    wait_until(
        "an attempt for both recipients",
        T,
        || {
            a = attempts(&relay, &id);
            ["a@c.example", "a@n.example"]
                .iter()
                .all(|r| a.iter().any(|e| field(e, "recipient") == *r))
        },
        || relay.log(),
    );
    let of = |r: &str| a.iter().find(|e| field(e, "recipient") == r).expect(r);
    let with = of("a@c.example");
    assert_eq!(field(with, "status"), "delivered", "{with}");
    assert_eq!(with["tls_verified"], true, "{with}");
    assert_eq!(field(with, "tls_policy"), "verify", "{with}");
    let without = of("a@n.example");
    assert_eq!(field(without, "status"), "deferred", "{without}");
    assert_eq!(without["code"], 451, "{without}");
    let messages = smart.of("message");
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0]["rcpts"][0], "a@c.example");
    assert_eq!(messages[0]["tls"], true);
    assert_eq!(
        messages[0]["client_cn"], "relay.client.test",
        "{messages:?}"
    );
    assert!(
        smart.of("starttls").iter().any(|e| e["ok"] == false),
        "the session without a certificate was refused: {:?}",
        smart.events()
    );
}

/// `sluice debug tls DOMAIN` says which policy applies and why, through
/// delivery's own routing: a rule's tls (only for the sender it matches), a
/// route's tls, delivery.tls, and the names a verify session checks.
#[test]
fn debug_tls_names_the_policy_and_why() {
    let nsd = Nsd::start("m MX 10 mx1\nm MX 20 mx2\nmx1 A 127.0.0.1\nmx2 A 127.0.0.1");
    let run = |args: &[&str]| -> String {
        let out = run_with_timeout(
            Command::new(bin())
                .args(["debug", "tls"])
                .args(args)
                .args(["--set", &nsd.servers_set()])
                .args(["--set", "dns.timeout=\"2s\""])
                .args(["--set", "delivery.tls=\"required\""])
                .args([
                    "--set",
                    "route.smart={type=\"relay\",host=\"smart.example.net\",port=587,tls=\"verify\"}",
                ])
                .args([
                    "--set",
                    &format!(
                        "rule=[{{match={{recipient_domain=[\"m.{ZONE}\"],sender_domain=[\"vip.example\"]}},\
                         tls=\"verify\"}},{{match={{recipient_domain=[\"s.example\"]}},route=\"smart\"}}]"
                    ),
                ]),
            T,
        );
        assert_ok(&out, "sluice debug tls");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let m = format!("m.{ZONE}");
    let vip = run(&[&m, "--sender", "a@vip.example"]);
    assert!(
        vip.starts_with(&format!("tls {m}: verify (from [[rule]] 1 tls)\n")),
        "{vip}"
    );
    assert!(vip.contains("rule: [[rule]] 1 decided (route mx)"), "{vip}");
    for (pref, host) in [(10, "mx1"), (20, "mx2")] {
        assert!(
            vip.contains(&format!(
                "  {pref} certificate must verify for {host}.{ZONE} \
                 (dane: off (dns.dnssec_validating is off))\n"
            )),
            "{vip}"
        );
    }
    let other = run(&[&m, "--sender", "a@other.example"]);
    assert!(
        other.starts_with(&format!("tls {m}: required (from delivery.tls)\n")),
        "{other}"
    );
    assert!(
        other.contains("rule: none matched (built-in route mx)"),
        "{other}"
    );
    let smart = run(&["s.example"]);
    assert!(
        smart.starts_with("tls s.example: verify (from route.smart.tls)\n"),
        "{smart}"
    );
    assert!(
        smart.contains("route smart: SMTP smart.example.net:587")
            && smart.contains("certificate must verify for smart.example.net"),
        "{smart}"
    );
    assert!(
        smart.contains("dane: not looked up (a route to a host"),
        "{smart}"
    );
}

/// `sluice debug listeners`: each listener's TLS mode, certificate, versions
/// (no TLS 1.0/1.1), suites in server order, key exchange groups.
#[test]
fn debug_listeners_shows_the_inbound_tls_settings() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(dir.path());
    let out = run_with_timeout(
        Command::new(bin())
            .args(["debug", "listeners"])
            .args(["--set", "server.listener.smtp.bind=[\"127.0.0.1:2525\"]"])
            .args([
                "--set",
                "server.listener.submission.bind=[\"127.0.0.1:2587\"]",
            ])
            .args(["--set", "server.listener.submission.tls=\"starttls\""])
            .arg("--set")
            .arg(format!(
                "server.listener.submission.tls_cert=\"{}\"",
                cert.display()
            ))
            .arg("--set")
            .arg(format!(
                "server.listener.submission.tls_key=\"{}\"",
                key.display()
            )),
        T,
    );
    assert_ok(&out, "sluice debug listeners");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("listener smtp: 127.0.0.1:2525 tls=none\n"),
        "{text}"
    );
    assert!(
        text.contains("listener submission: 127.0.0.1:2587 tls=starttls\n"),
        "{text}"
    );
    assert!(
        text.contains("versions: TLSv1_3, TLSv1_2 (TLS 1.0 and 1.1 refused)"),
        "{text}"
    );
    assert!(
        text.contains("cipher suites (server order): TLS13_AES_256_GCM_SHA384"),
        "{text}"
    );
    assert!(!text.contains("TLSv1_1") && !text.contains("CBC"), "{text}");
    assert!(text.contains("key exchange: X25519"), "{text}");
}

/// A real Postfix as the MX: `verify` delivers over STARTTLS with a verified
/// certificate (issued for the MX name by the CA in `delivery.tls_ca_file`)
/// and Postfix logs the TLS session; `required` to a Postfix without TLS
/// defers, and nothing reaches the next hop.
#[test]
fn postfix_as_the_receiver() {
    if !can_run_postfix() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Postfix's daemons read the key as root, but reach the files through
    // the temp dir.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let ca = make_ca(dir.path(), "ca");
    let (cert, key) = make_issued_cert(dir.path(), &ca, "pfmx", &format!("pfmx.{ZONE}"));
    let sink_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let sink = LoadgenSink::start(&[sink_addr], &[]);
    let with_tls = PostfixRelay::start_tls(sink_addr.port(), &cert, &key);
    let without = PostfixRelay::start(sink_addr.port());
    // Two MX ports cannot share delivery.mx_port: a route per Postfix.
    let nsd = Nsd::start("pfmx A 127.0.0.1\nplainmx A 127.0.0.1");
    let relay = mx_relay(
        &nsd,
        25,
        1,
        &[
            format!("delivery.tls_ca_file=\"{}\"", ca.0.display()),
            format!(
                "route.pf={{type=\"smtp\",host=\"pfmx.{ZONE}\",port={},tls=\"verify\"}}",
                with_tls.addr.port()
            ),
            format!(
                "route.plain={{type=\"smtp\",host=\"plainmx.{ZONE}\",port={},tls=\"required\"}}",
                without.addr.port()
            ),
            "rule=[{match={recipient_domain=[\"v.example\"]},route=\"pf\"},\
             {match={recipient_domain=[\"r.example\"]},route=\"plain\"}]"
                .to_string(),
        ],
    );
    let id = submit(
        &relay,
        "alice@snd.example",
        "",
        &["a@v.example", "a@r.example"],
        b"Subject: via postfix\r\n\r\nhi\r\n",
    );
    let saved = sink.wait_saved(1, T, &relay);
    assert_eq!(saved[0].rcpts(), vec!["a@v.example".to_string()]);
    let mut a = Vec::new();
    wait_until(
        "an attempt for both recipients",
        T,
        || {
            a = attempts(&relay, &id);
            ["a@v.example", "a@r.example"]
                .iter()
                .all(|r| a.iter().any(|e| field(e, "recipient") == *r))
        },
        || relay.log(),
    );
    let of = |r: &str| a.iter().find(|e| field(e, "recipient") == r).expect(r);
    let v = of("a@v.example");
    assert_eq!(field(v, "status"), "delivered", "{v}");
    assert_eq!(field(v, "tls_policy"), "verify", "{v}");
    assert_eq!(v["tls_verified"], true, "{v}");
    assert!(field(v, "tls").starts_with("TLSv1."), "{v}");
    assert!(
        with_tls
            .maillog_text()
            .contains("TLS connection established from"),
        "{}",
        with_tls.maillog_text()
    );
    let r = of("a@r.example");
    assert_eq!(field(r, "status"), "deferred", "{r}");
    assert_eq!(field(r, "enhanced"), "4.7.10", "{r}");
    assert_eq!(
        sink.saved().len(),
        1,
        "nothing went through the Postfix without TLS"
    );
}

/// `sluice debug tls` and DANE, through a validating unbound in front of a
/// signed and an unsigned zone (the kit's dnssec bed): a secure MX host with a
/// usable TLSA record gets DANE's policy, a host in the unsigned zone and any
/// host while `dns.dnssec_validating` is off keep the configured one, and say
/// why.
#[test]
fn debug_tls_shows_dane_per_mx_host() {
    use sluice_testkit::dnssec::{DnssecBed, Zone, TOOLS};
    require_tools!(TOOLS[0], TOOLS[1], TOOLS[2], TOOLS[3]);
    let spki_hash = "ab".repeat(32);
    let bed = DnssecBed::start(&[
        Zone::secure(
            "sec.test",
            &format!("a MX 10 mx-a\nmx-a A 127.0.0.1\n_25._tcp.mx-a TLSA 3 1 1 {spki_hash}\n"),
        ),
        Zone::unsigned("ins.test", "b MX 10 mx-b\nmx-b A 127.0.0.1\n"),
    ]);
    let run = |domain: &str, validating: bool| -> String {
        let out = run_with_timeout(
            Command::new(bin())
                .args(["debug", "tls", domain])
                .args(["--set", &bed.servers_set()])
                .args(["--set", "dns.timeout=\"2s\""])
                .arg("--set")
                .arg(format!("dns.dnssec_validating={validating}")),
            T,
        );
        assert_ok(&out, "sluice debug tls");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let secure = run("a.sec.test", true);
    assert!(
        secure.starts_with("tls a.sec.test: opportunistic (from delivery.tls)\n"),
        "{secure}"
    );
    assert!(
        secure.contains(
            "  10 DANE: certificate must match TLSA for mx-a.sec.test \
             (dane: 1 usable TLSA record(s): 3 1 1 "
        ),
        "{secure}\n{}",
        bed.log()
    );
    let insecure = run("b.ins.test", true);
    assert!(
        insecure.contains(
            "  10 STARTTLS when offered; name mx-b.ins.test \
             (dane: off (MX or address records not DNSSEC-secure))\n"
        ),
        "{insecure}"
    );
    let off = run("a.sec.test", false);
    assert!(
        off.contains(
            "  10 STARTTLS when offered; name mx-a.sec.test (dane: off (dns.dnssec_validating is off))\n"
        ),
        "{off}"
    );
}
