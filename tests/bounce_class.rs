//! Bounce classification end to end: the real relay delivers through a real NSD
//! to the test kit's scripted SMTP server answering RCPT with replies shaped
//! like the big providers' (Gmail 5.1.1 "does not exist", 4.2.2 over quota,
//! Microsoft's S3150 block list, Yahoo's [TSS04] deferral), plus local failures
//! (NXDOMAIN, connection refused). The class must show in the delivery log
//! (`class=`), in the failure DSN the relay sends back (parsed by Python's
//! email package), in `sluice_delivery_failures_total{class,status}` and in
//! `sluice queue show`. A rules file put before the shipped rules reclassifies
//! a reply; a broken one is refused by `sluice check-config` with its line.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use serde_json::Value;
use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The value of `sluice_delivery_failures_total` with these labels (0 if absent).
fn failures(metrics: &str, class: &str, status: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("sluice_delivery_failures_total{"))
        .filter(|l| {
            l.contains(&format!("class=\"{class}\"")) && l.contains(&format!("status=\"{status}\""))
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Provider-shaped RCPT replies (texts in our own words), by local part.
fn provider_hop(addr: SocketAddr) -> ScriptedServer {
    ScriptedServer::builder()
        .name("mx.provider.test")
        .capability("PIPELINING")
        .capability("8BITMIME")
        .on_arg(
            "RCPT",
            "gone@",
            Act::Reply(
                "550-5.1.1 The mailbox you addressed does not exist here. Please check\n\
                 550 5.1.1 the spelling and try again. https://support.example/NoSuchUser g1si"
                    .into(),
            ),
        )
        .on_arg(
            "RCPT",
            "full@",
            Act::Reply(
                "452-4.2.2 The account you wrote to is over quota and cannot take\n\
                 452 4.2.2 mail right now. https://support.example/OverQuota g2si"
                    .into(),
            ),
        )
        .on_arg(
            "RCPT",
            "blocked@",
            Act::Reply(
                "550 5.7.1 Messages from [192.0.2.1] were not sent: part of your \
                 provider's network is on our block list (S3150)."
                    .into(),
            ),
        )
        .on_arg(
            "RCPT",
            "slow@",
            Act::Reply(
                "451 4.7.0 [TSS04] Mail from 192.0.2.1 deferred for now: unexpected \
                 volume or complaints from users"
                    .into(),
            ),
        )
        .on_arg(
            "RCPT",
            "custom@",
            Act::Reply("554 5.6.0 custom-marker: header looks odd".into()),
        )
        .start(addr)
}

#[test]
fn classes_show_in_log_dsn_metrics_and_queue_show() {
    let ips = loopbacks(3);
    let port = mx_port(&ips);
    // a → the provider; snd (the sender's domain) → the DSN sink; dead → an
    // address where nothing listens on the MX port; nosuch.dlv.test: NXDOMAIN.
    let nsd = Nsd::start(&format!(
        "a MX 10 mx1\nmx1 A {}\nsnd MX 10 bounces\nbounces A {}\ndead MX 10 mxd\nmxd A {}",
        ips[0], ips[1], ips[2]
    ));
    let _hop = provider_hop(sa(ips[0], port));
    let bounces = LoadgenSink::start(&[sa(ips[1], port)], &[]);
    // Nothing listens on ips[2]:port (bound, then let go).
    drop(TcpListener::bind(sa(ips[2], port)).expect("bind"));

    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("bounce-rules.toml");
    std::fs::write(
        &rules,
        "# Ours first: a site-specific text the shipped rules do not know.\n\
         [[rule]]\nclass = \"content-block\"\ntext = 'custom-marker'\n",
    )
    .expect("rules file");
    let relay = Relay::builder()
        .dir(dir)
        .cores(2)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set(nsd.servers_set())
        .set("dns.timeout=\"1s\"")
        .set(format!("delivery.mx_port={port}"))
        .set("delivery.connect_timeout=\"5s\"")
        // One attempt in the test's time: the deferred stay deferred.
        .set("queue.default.retry=[\"1h\"]")
        .set(format!("delivery.bounce_rules=\"{}\"", rules.display()))
        .start();

    let rcpts = [
        "gone@a.dlv.test",
        "full@a.dlv.test",
        "blocked@a.dlv.test",
        "slow@a.dlv.test",
        "custom@a.dlv.test",
        "x@nosuch.dlv.test",
        "x@dead.dlv.test",
    ];
    let id = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &rcpts,
        b"Subject: classes\r\nMessage-ID: <classes@snd.dlv.test>\r\n\r\nhello\r\n",
    );

    // One attempt per recipient in the delivery log, each with its class.
    let want = [
        ("gone@a.dlv.test", "failed", "invalid-recipient"),
        ("full@a.dlv.test", "deferred", "mailbox-full"),
        ("blocked@a.dlv.test", "failed", "policy-block"),
        ("slow@a.dlv.test", "deferred", "rate-limited"),
        ("custom@a.dlv.test", "failed", "content-block"),
        ("x@nosuch.dlv.test", "failed", "bad-domain"),
        ("x@dead.dlv.test", "deferred", "network"),
    ];
    let mut seen: Vec<Value> = Vec::new();
    wait_until(
        "an attempt for every recipient",
        T,
        || {
            seen = attempts(&relay, &id);
            rcpts
                .iter()
                .all(|r| seen.iter().any(|a| field(a, "recipient") == *r))
        },
        || relay.log(),
    );
    for (rcpt, status, class) in want {
        let a = seen
            .iter()
            .find(|a| field(a, "recipient") == rcpt)
            .unwrap_or_else(|| panic!("no attempt for {rcpt}"));
        assert_eq!(field(a, "status"), status, "{rcpt}: {a}");
        assert_eq!(field(a, "class"), class, "{rcpt}: {a}");
    }

    // The failure notice to the sender: one block per failed recipient, each
    // with its class.
    let notices = bounces.wait_saved(1, T, &relay);
    // (Blocks come in the order the failures came in: compare as a set.)
    let dsn = parse_dsn(&notices[0].eml);
    assert_eq!(dsn["content_type"], "multipart/report", "{dsn:#}");
    assert_eq!(dsn["report_type"], "delivery-status", "{dsn:#}");
    assert!(
        dsn["defects"].as_array().expect("defects").is_empty(),
        "{dsn:#}"
    );
    assert_eq!(
        dsn["recipients"].as_array().expect("blocks").len(),
        4,
        "{dsn:#}"
    );
    let show = || format!("{dsn:#}");
    for (rcpt, class) in [
        ("gone@a.dlv.test", "invalid-recipient"),
        ("blocked@a.dlv.test", "policy-block"),
        ("custom@a.dlv.test", "content-block"),
        ("x@nosuch.dlv.test", "bad-domain"),
    ] {
        let block = dsn["recipients"]
            .as_array()
            .expect("recipients")
            .iter()
            .find(|b| {
                b["final-recipient"]
                    .as_str()
                    .unwrap_or("")
                    .to_ascii_lowercase()
                    .ends_with(rcpt)
            })
            .unwrap_or_else(|| panic!("no block for {rcpt}: {}", show()));
        assert_eq!(block["action"], "failed", "{}", show());
        assert_eq!(block["x-sluice-bounce-class"], class, "{}", show());
    }

    // The metric, by class and status.
    let m = relay.metrics();
    for (class, status) in [
        ("invalid-recipient", "failed"),
        ("policy-block", "failed"),
        ("content-block", "failed"),
        ("bad-domain", "failed"),
        ("mailbox-full", "deferred"),
        ("rate-limited", "deferred"),
        ("network", "deferred"),
    ] {
        assert_eq!(failures(&m, class, status), 1.0, "{class} {status}:\n{m}");
    }
    assert_eq!(failures(&m, "invalid-recipient", "deferred"), 0.0);

    // `sluice queue show`: the deferred recipients with their class.
    wait_until(
        "the message written back deferred",
        T,
        || text(&relay.queue(&["show", &id])).contains("class=mailbox-full"),
        || relay.log(),
    );
    let shown = text(&relay.queue(&["show", &id]));
    for (rcpt, class) in [
        ("full@a.dlv.test", "mailbox-full"),
        ("slow@a.dlv.test", "rate-limited"),
        ("x@dead.dlv.test", "network"),
        ("gone@a.dlv.test", "invalid-recipient"),
    ] {
        let line = shown
            .lines()
            .find(|l| l.starts_with(&format!("recipient: <{rcpt}>")))
            .unwrap_or_else(|| panic!("no {rcpt} in:\n{shown}"));
        assert!(line.contains(&format!("class={class}")), "{line}");
    }
}

#[test]
fn a_broken_rules_file_is_refused_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nclass = \"dns\"\ncode = 451\n\n[[rule]]\nclass = \"network\"\ntext = '(unclosed'\n",
    )
    .expect("rules");
    let conf = dir.path().join("sluice.toml");
    std::fs::write(
        &conf,
        format!("[delivery]\nbounce_rules = \"{}\"\n", rules.display()),
    )
    .expect("config");
    let out = sluice(&["check-config", conf.to_str().expect("path")]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "accepted: {}", text(&out.stdout));
    assert!(err.contains("delivery.bounce_rules"), "{err}");
    assert!(err.contains("rule 2: text (line 7)"), "{err}");
    assert!(err.contains("invalid regex"), "{err}");

    std::fs::write(&rules, "[[rule]]\nclass = \"dns\"\ncode = 451\n").expect("rules");
    let out = sluice(&["check-config", conf.to_str().expect("path")]);
    assert_ok(&out, "check-config with a good rules file");
}
