//! MTA-STS (RFC 8461, issue 13 item 3) with real peers: NSD serves the
//! `_mta-sts` TXT records, the MX records and the addresses (all loopback);
//! tests/py/mta_sts_server.py (Python's http.server and ssl) serves the
//! policies over HTTPS with certificates of a test CA that the relay trusts
//! through `delivery.tls_ca_file`; tests/py/tls_receiver.py receives the
//! mail and records whether it crossed in clear text.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sluice_testkit::mta_sts::PolicyServer;
use sluice_testkit::nsd::ZONE;
use sluice_testkit::*;

const T: Duration = Duration::from_secs(40);

/// `GET /metrics` from the relay's operations listener.
fn metrics(relay: &Relay) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", relay.admin_port)).expect("admin listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp
}

fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn fetches(relay: &Relay, result: &str) -> u64 {
    sample(
        &metrics(relay),
        &format!("sluice_mta_sts_fetches_total{{result=\"{result}\"}}"),
    )
}

/// The first attempt of each recipient of message `id`.
fn first_attempts(relay: &Relay, id: &str, rcpts: &[String]) -> Vec<Value> {
    let mut a = Vec::new();
    wait_until(
        "an attempt for every recipient",
        T,
        || {
            a = attempts(relay, id);
            rcpts
                .iter()
                .all(|r| a.iter().any(|e| field(e, "recipient") == r))
        },
        || relay.log(),
    );
    rcpts
        .iter()
        .map(|r| {
            a.iter()
                .find(|e| field(e, "recipient") == r)
                .cloned()
                .expect("attempt")
        })
        .collect()
}

const BODY: &[u8] = b"From: alice@snd.example\r\nSubject: mta-sts\r\n\r\nhello\r\n";

/// enforce with a good certificate → delivered, verified, under `mta-sts`,
/// and the preferred MX host the policy does not list is never used;
/// enforce with a certificate for another name → 4.7.5, nothing in clear;
/// testing with that certificate → delivered unverified, the failure logged
/// and counted; a policy server that redirects, sends more than 64 KiB,
/// presents a bad certificate or is slow → no policy (no cache yet): the
/// configured opportunistic policy applies. `sluice debug tls` shows the
/// cached policy.
#[test]
fn enforce_testing_and_failed_fetches() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path(), "ca");
    // 0 rogue (enf's preferred MX, not in its policy), 1 enf's good MX,
    // 2 wrong-name MX (bad, tst), 3 the HTTPS server, 4 wrong-name MX of
    // the failed-fetch domains.
    let ips = loopbacks(5);
    let smtp_port = mx_port(&ips[..3]);
    let https_port = mx_port(&ips[3..4]);
    let cert = |stem: &str, name: &str| make_issued_cert(dir.path(), &ca, stem, name);
    let rogue = TlsReceiver::start(
        dir.path(),
        ips[0],
        smtp_port,
        Some(&cert("rogue", &format!("rogue.{ZONE}"))),
        None,
    );
    let good = TlsReceiver::start(
        dir.path(),
        ips[1],
        smtp_port,
        Some(&cert("mxgood", &format!("mx-good.{ZONE}"))),
        None,
    );
    let wrong = TlsReceiver::start(
        dir.path(),
        ips[2],
        smtp_port,
        Some(&cert("mxwrong", &format!("elsewhere.{ZONE}"))),
        None,
    );
    let failing = ["redir", "huge", "badcert", "slow"];
    let mut certs: Vec<(String, (PathBuf, PathBuf))> =
        ["enf", "bad", "tst", "redir", "huge", "slow", "dbg"]
            .iter()
            .map(|l| {
                let name = format!("mta-sts.{l}.{ZONE}");
                (name.clone(), cert(&format!("https-{l}"), &name))
            })
            .collect();
    // The bad certificate: for another name.
    certs.push((
        format!("mta-sts.badcert.{ZONE}"),
        cert("https-badcert", &format!("www.{ZONE}")),
    ));
    let https = PolicyServer::start(dir.path(), ips[3], https_port, &certs);
    https.policy("enf", "enforce", &[&format!("mx-good.{ZONE}")]);
    https.policy("bad", "enforce", &[&format!("*.{ZONE}")]);
    https.policy("tst", "testing", &[&format!("mx-wrong.{ZONE}")]);
    // Only `sluice debug tls` asks for this one.
    https.policy("dbg", "enforce", &[&format!("mx-good.{ZONE}")]);
    for l in failing {
        https.policy(l, "enforce", &[&format!("mx-wrong.{ZONE}")]);
    }
    https.mode("redir", "redirect");
    https.mode("huge", "huge");
    https.mode("slow", "slow");

    let mut zone = format!(
        "rogue A {}\nmx-good A {}\nmx-wrong A {}\n\
         enf MX 5 rogue\nenf MX 10 mx-good\nbad MX 10 mx-wrong\ntst MX 10 mx-wrong\n",
        ips[0], ips[1], ips[2]
    );
    zone.push_str("dbg MX 10 mx-good\n");
    for l in [
        "enf", "bad", "tst", "redir", "huge", "badcert", "slow", "dbg",
    ] {
        zone.push_str(&format!(
            "_mta-sts.{l} TXT \"v=STSv1; id=1;\"\nmta-sts.{l} A {}\n",
            ips[3]
        ));
    }
    for l in failing {
        zone.push_str(&format!("{l} MX 10 mx-wrong\n"));
    }
    let nsd = Nsd::start(&zone);
    let relay = mx_relay(
        &nsd,
        smtp_port,
        1,
        &[
            format!("delivery.tls_ca_file=\"{}\"", ca.0.display()),
            format!("delivery.mta_sts_https_port={https_port}"),
            "delivery.mta_sts_fetch_timeout=\"3s\"".to_string(),
            "queue.default.retry=[\"1h\"]".to_string(),
        ],
    );
    let labels = ["enf", "bad", "tst", "redir", "huge", "badcert", "slow"];
    let rcpts: Vec<String> = labels.iter().map(|l| format!("bob@{l}.{ZONE}")).collect();
    let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let id = submit(&relay, "alice@snd.example", "", &refs, BODY);
    let a = first_attempts(&relay, &id, &rcpts);
    let of = |l: &str| &a[labels.iter().position(|x| *x == l).unwrap()];

    // enforce, good certificate: delivered verified to the listed host only.
    let enf = of("enf");
    assert_eq!(field(enf, "status"), "delivered", "{enf}");
    assert_eq!(field(enf, "tls_policy"), "mta-sts", "{enf}");
    assert_eq!(enf["tls_verified"], true, "{enf}");
    assert!(
        rogue.messages().is_empty(),
        "the MX host outside the policy was used"
    );
    let got = good.messages();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["tls"], true);
    assert!(relay
        .log()
        .contains(&format!("MX host rogue.{ZONE} matches no mx of the policy")));

    // enforce, certificate for another name: deferred 4.7.5, never in clear.
    let bad = of("bad");
    assert_eq!(field(bad, "status"), "deferred", "{bad}");
    assert_eq!(field(bad, "enhanced"), "4.7.5", "{bad}");
    assert_eq!(field(bad, "tls_policy"), "mta-sts", "{bad}");
    assert!(
        field(bad, "reply").contains("TLS policy mta-sts (MTA-STS (enforce))"),
        "{bad}"
    );

    // testing: delivered (as configured: opportunistic, unverified), reported.
    let tst = of("tst");
    assert_eq!(field(tst, "status"), "delivered", "{tst}");
    assert_eq!(field(tst, "tls_policy"), "opportunistic", "{tst}");
    assert_eq!(tst["tls_verified"], false, "{tst}");
    assert!(
        relay
            .log()
            .contains("MTA-STS (testing): the session fails the policy"),
        "{}",
        relay.log()
    );
    let m = metrics(&relay);
    assert!(
        sample(
            &m,
            "sluice_mta_sts_testing_failures_total{result=\"not_verified\"}"
        ) >= 1,
        "{m}"
    );

    // Failed fetches, no cached policy: the configured policy.
    for l in failing {
        let r = of(l);
        assert_eq!(field(r, "status"), "delivered", "{l}: {r}");
        assert_eq!(field(r, "tls_policy"), "opportunistic", "{l}: {r}");
    }
    // The wrong-name receiver got tst and the four failed-fetch domains,
    // all over TLS; bad's message never arrived.
    let wrong_msgs = wrong.messages();
    assert_eq!(wrong_msgs.len(), 5, "{wrong_msgs:?}");
    assert!(
        wrong_msgs.iter().all(|m| m["tls"] == true),
        "{wrong_msgs:?}"
    );
    assert!(
        !wrong_msgs
            .iter()
            .any(|m| m["rcpts"].to_string().contains(&format!("bad.{ZONE}"))),
        "{wrong_msgs:?}"
    );
    let m = metrics(&relay);
    for (result, n) in [
        ("ok", 3),
        ("http_failed", 2),
        ("tls_failed", 1),
        ("timeout", 1),
    ] {
        let series = format!("sluice_mta_sts_fetches_total{{result=\"{result}\"}}");
        assert_eq!(sample(&m, &series), n, "{series}:\n{m}");
    }
    assert_eq!(
        https.requests("badcert"),
        0,
        "no request after a bad certificate"
    );
    assert_eq!(https.requests("redir"), 1, "the redirect was not followed");
    assert!(
        sample(
            &m,
            "sluice_tls_outbound_total{policy=\"mta-sts\",result=\"not_verified\"}"
        ) >= 1,
        "{m}"
    );

    // debug tls: the policy the relay cached (its table in the spool), and
    // the host choice delivery makes.
    let out = run_with_timeout(
        Command::new(bin())
            .args(["debug", "tls", &format!("enf.{ZONE}")])
            .args(["--set", &nsd.servers_set()])
            .args([
                "--set",
                &format!("spool.path=\"{}\"", relay.spool_path().display()),
            ])
            .args([
                "--set",
                &format!("delivery.tls_ca_file=\"{}\"", ca.0.display()),
            ])
            .args([
                "--set",
                &format!("delivery.mta_sts_https_port={https_port}"),
            ]),
        T,
    );
    assert_ok(&out, "sluice debug tls");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("tls enf.{ZONE}: verify (from MTA-STS (enforce))")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "mta-sts: mode enforce, mx mx-good.{ZONE}, id 1, source cache, expires "
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("5 skipped: rogue.{ZONE}: MTA-STS (enforce)")),
        "{text}"
    );
    assert!(
        text.contains(&format!("10 certificate must verify for mx-good.{ZONE}")),
        "{text}"
    );
    assert_eq!(https.requests("enf"), 1, "debug used the cached policy");

    // A domain the relay never mailed: debug fetches its policy but does not
    // write the relay's table (the relay would not see it), so a second run
    // fetches again.
    let debug_dbg = || {
        let out = run_with_timeout(
            Command::new(bin())
                .args(["debug", "tls", &format!("dbg.{ZONE}")])
                .args(["--set", &nsd.servers_set()])
                .args([
                    "--set",
                    &format!("spool.path=\"{}\"", relay.spool_path().display()),
                ])
                .args([
                    "--set",
                    &format!("delivery.tls_ca_file=\"{}\"", ca.0.display()),
                ])
                .args([
                    "--set",
                    &format!("delivery.mta_sts_https_port={https_port}"),
                ]),
            T,
        );
        assert_ok(&out, "sluice debug tls");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    for n in 1..=2 {
        let text = debug_dbg();
        assert!(text.contains("source fetched"), "{text}");
        assert_eq!(https.requests("dbg"), n, "run {n}: {text}");
    }
}

/// A new TXT id fetches the new policy; the cache survives a restart (no
/// fetch after it); a failed refresh keeps the cached policy (RFC 8461 §5.1).
#[test]
fn refresh_restart_and_cached_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path(), "ca");
    let ips = loopbacks(3);
    let smtp_port = mx_port(&ips[..2]);
    let https_port = mx_port(&ips[2..]);
    let cert = |stem: &str, name: &str| make_issued_cert(dir.path(), &ca, stem, name);
    let a_rx = TlsReceiver::start(
        dir.path(),
        ips[0],
        smtp_port,
        Some(&cert("mxa", &format!("mx-a.{ZONE}"))),
        None,
    );
    let b_rx = TlsReceiver::start(
        dir.path(),
        ips[1],
        smtp_port,
        Some(&cert("mxb", &format!("mx-b.{ZONE}"))),
        None,
    );
    let name = format!("mta-sts.chg.{ZONE}");
    let https = PolicyServer::start(
        dir.path(),
        ips[2],
        https_port,
        &[(name.clone(), cert("https", &name))],
    );
    https.policy("chg", "enforce", &[&format!("mx-a.{ZONE}")]);
    let zone = |id: u32| {
        format!(
            "chg MX 10 mx-a\nchg MX 20 mx-b\nmx-a A {}\nmx-b A {}\nmta-sts.chg A {}\n\
             _mta-sts.chg 0 TXT \"v=STSv1; id={id};\"\n",
            ips[0], ips[1], ips[2]
        )
    };
    let mut nsd = Nsd::start(&zone(1));
    let mut relay = mx_relay(
        &nsd,
        smtp_port,
        1,
        &[
            format!("delivery.tls_ca_file=\"{}\"", ca.0.display()),
            format!("delivery.mta_sts_https_port={https_port}"),
            "delivery.mta_sts_fetch_timeout=\"3s\"".to_string(),
            // A new connection (and so a new policy look-up) per message: an
            // open connection carries on under the policy it was opened with.
            "delivery.idle_timeout=\"0s\"".to_string(),
        ],
    );
    let rcpt = vec![format!("bob@chg.{ZONE}")];
    let send = |relay: &Relay| -> Value {
        let id = submit(relay, "alice@snd.example", "", &[&rcpt[0]], BODY);
        let a = first_attempts(relay, &id, &rcpt).remove(0);
        assert_eq!(field(&a, "status"), "delivered", "{a}");
        assert_eq!(field(&a, "tls_policy"), "mta-sts", "{a}");
        assert_eq!(a["tls_verified"], true, "{a}");
        a
    };
    // id 1: mx-a only.
    send(&relay);
    assert_eq!((a_rx.messages().len(), b_rx.messages().len()), (1, 0));
    assert_eq!(https.requests("chg"), 1);
    // The same id again: the cache, no fetch.
    send(&relay);
    assert_eq!((a_rx.messages().len(), b_rx.messages().len()), (2, 0));
    assert_eq!(https.requests("chg"), 1);

    // id 2 with a policy for mx-b only: fetched again, mx-a no longer used.
    https.policy("chg", "enforce", &[&format!("mx-b.{ZONE}")]);
    nsd.replace_records(&zone(2), 2, &format!("_mta-sts.chg.{ZONE}"), "id=2");
    send(&relay);
    assert_eq!((a_rx.messages().len(), b_rx.messages().len()), (2, 1));
    assert_eq!(https.requests("chg"), 2);

    // Restart: the policy comes from LMDB, nothing is fetched.
    relay.terminate();
    relay.restart();
    send(&relay);
    assert_eq!((a_rx.messages().len(), b_rx.messages().len()), (2, 2));
    assert_eq!(https.requests("chg"), 2, "no fetch after the restart");
    assert_eq!(fetches(&relay, "ok"), 0);
    let log = relay.log();
    let second = log.split("--- start 1 ---").nth(1).unwrap_or_default();
    assert!(
        second
            .lines()
            .any(|l| l.contains("MTA-STS: cached policies loaded") && l.contains("\"policies\":1")),
        "{second}"
    );

    // id 3, but the server now redirects: the fetch fails, the cached
    // (id 2) policy still holds.
    https.mode("chg", "redirect");
    nsd.replace_records(&zone(3), 3, &format!("_mta-sts.chg.{ZONE}"), "id=3");
    send(&relay);
    assert_eq!((a_rx.messages().len(), b_rx.messages().len()), (2, 3));
    assert_eq!(https.requests("chg"), 3);
    assert_eq!(fetches(&relay, "http_failed"), 1);
    assert!(relay
        .log()
        .contains("policy fetch failed, cached policy kept"));
}

/// Proactive refresh (RFC 8461 §5.1), same TXT id throughout:
/// - used after half its max_age, a cached policy is re-fetched in the
///   background (that delivery still goes by the cached one, the next by the
///   new one) — with the sweep effectively off, nothing is fetched without
///   traffic;
/// - the management thread's sweep re-fetches a policy past half its max_age
///   with no traffic at all, so the changed policy is in force before the
///   old one would have expired;
/// - a refresh that fails keeps the cached policy until it really expires;
///   after that the domain has no policy (the configured one applies).
#[test]
fn proactive_refresh_on_use_and_by_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path(), "ca");
    let ips = loopbacks(3);
    let smtp_port = mx_port(&ips[..2]);
    let https_port = mx_port(&ips[2..]);
    let cert = |stem: &str, name: &str| make_issued_cert(dir.path(), &ca, stem, name);
    let a_rx = TlsReceiver::start(
        dir.path(),
        ips[0],
        smtp_port,
        Some(&cert("mxa", &format!("mx-a.{ZONE}"))),
        None,
    );
    let b_rx = TlsReceiver::start(
        dir.path(),
        ips[1],
        smtp_port,
        Some(&cert("mxb", &format!("mx-b.{ZONE}"))),
        None,
    );
    let certs: Vec<(String, (PathBuf, PathBuf))> = ["use", "swp"]
        .iter()
        .map(|l| {
            let name = format!("mta-sts.{l}.{ZONE}");
            (name.clone(), cert(&format!("https-{l}"), &name))
        })
        .collect();
    let https = PolicyServer::start(dir.path(), ips[2], https_port, &certs);
    let mx_a = format!("mx-a.{ZONE}");
    let mx_b = format!("mx-b.{ZONE}");
    let mut zone = format!("mx-a A {}\nmx-b A {}\n", ips[0], ips[1]);
    for l in ["use", "swp"] {
        zone.push_str(&format!(
            "{l} MX 10 mx-a\n{l} MX 20 mx-b\nmta-sts.{l} A {}\n_mta-sts.{l} TXT \"v=STSv1; id=1;\"\n",
            ips[2]
        ));
    }
    let nsd = Nsd::start(&zone);
    let relay_with = |sweep: &str| {
        mx_relay(
            &nsd,
            smtp_port,
            1,
            &[
                format!("delivery.tls_ca_file=\"{}\"", ca.0.display()),
                format!("delivery.mta_sts_https_port={https_port}"),
                "delivery.mta_sts_fetch_timeout=\"3s\"".to_string(),
                format!("delivery.mta_sts_refresh_interval=\"{sweep}\""),
                // A new connection, and so a policy look-up, per message.
                "delivery.idle_timeout=\"0s\"".to_string(),
                "queue.default.retry=[\"1h\"]".to_string(),
            ],
        )
    };
    // One message to `label`; its attempt.
    let send = |relay: &Relay, label: &str| -> Value {
        let rcpt = vec![format!("bob@{label}.{ZONE}")];
        let id = submit(relay, "alice@snd.example", "", &[&rcpt[0]], BODY);
        first_attempts(relay, &id, &rcpt).remove(0)
    };
    let delivered_under_sts = |a: &Value| {
        assert_eq!(field(a, "status"), "delivered", "{a}");
        assert_eq!(field(a, "tls_policy"), "mta-sts", "{a}");
        assert_eq!(a["tls_verified"], true, "{a}");
    };
    let received = || (a_rx.messages().len(), b_rx.messages().len());

    // Refresh on use: the sweep runs once an hour, so only deliveries fetch.
    let max_age = 10;
    https.policy_max_age("use", "enforce", &[&mx_a], max_age);
    let mut relay = relay_with("1h");
    delivered_under_sts(&send(&relay, "use"));
    // The policy was fetched before this delivery.
    let fetched_by = std::time::Instant::now();
    assert_eq!(received(), (1, 0));
    assert_eq!(https.requests("use"), 1);
    https.policy_max_age("use", "enforce", &[&mx_b], max_age);
    // Half the max_age passes (the subject of the test is time itself).
    let half = Duration::from_secs(max_age / 2);
    wait_until(
        "half the policy's max_age",
        half + Duration::from_secs(1),
        || fetched_by.elapsed() > half,
        String::new,
    );
    assert_eq!(https.requests("use"), 1, "no fetch without traffic");
    // This delivery goes by the cached policy (mx-a) and starts a refresh.
    delivered_under_sts(&send(&relay, "use"));
    assert_eq!(received(), (2, 0));
    wait_until(
        "the refresh on use",
        T,
        || {
            relay
                .log()
                .contains(&format!("mx {mx_b}, max_age {max_age}s"))
        },
        || relay.log(),
    );
    assert_eq!(https.requests("use"), 2);
    assert!(relay
        .log()
        .contains("MTA-STS: refreshing the cached policy"));
    assert!(!relay.log().contains("cached policy expired"));
    // The next delivery: the refreshed policy (mx-b only).
    delivered_under_sts(&send(&relay, "use"));
    assert_eq!(received(), (2, 1));
    assert_eq!(https.requests("use"), 2, "the refreshed policy is cached");
    relay.terminate();
    drop(relay);

    // The sweep, every second: no traffic after the first delivery.
    let max_age = 12;
    https.policy_max_age("swp", "enforce", &[&mx_a], max_age);
    let relay = relay_with("1s");
    delivered_under_sts(&send(&relay, "swp"));
    assert_eq!(received(), (3, 1));
    assert_eq!(https.requests("swp"), 1);
    https.policy_max_age("swp", "enforce", &[&mx_b], max_age);
    wait_until(
        "a refresh by the sweep",
        T,
        || {
            relay
                .log()
                .contains(&format!("mx {mx_b}, max_age {max_age}s"))
        },
        || relay.log(),
    );
    assert!(https.requests("swp") >= 2);
    assert!(!relay.log().contains("cached policy expired"));
    delivered_under_sts(&send(&relay, "swp"));
    assert_eq!(received(), (3, 2), "the refreshed policy applies");

    // The policy server now fails (a redirect): the sweep's refresh fails,
    // and the cached policy holds until it expires...
    https.mode("swp", "redirect");
    wait_until(
        "a failed refresh",
        T,
        || {
            relay
                .log()
                .contains("policy refresh failed, cached policy kept until it expires")
        },
        || relay.log(),
    );
    assert!(fetches(&relay, "http_failed") >= 1);
    delivered_under_sts(&send(&relay, "swp"));
    assert_eq!(received(), (3, 3), "still the cached policy (mx-b only)");
    // ...and no longer: dropped at expiry, the domain has no policy, and
    // the configured (opportunistic) policy applies, mx-a first.
    wait_until(
        "the cached policy's expiry",
        T,
        || relay.log().contains("cached policy expired, dropped"),
        || relay.log(),
    );
    let a = send(&relay, "swp");
    assert_eq!(field(&a, "status"), "delivered", "{a}");
    assert_eq!(field(&a, "tls_policy"), "opportunistic", "{a}");
    assert_eq!(received(), (4, 3));
}
