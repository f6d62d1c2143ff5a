//! TLS reporting (RFC 8460, issue 13): sessions to destinations that publish
//! `_smtp._tls` are counted per policy domain, survive a restart in the
//! store, and go out as gzipped JSON reports — by mail through the relay's
//! own queue to a Postfix smtp-sink, and by HTTPS POST to a Python server —
//! that validate against a JSON Schema written from the RFC (checked with
//! /usr/bin/python3 and python3-jsonschema, tests/py/tlsrpt_check.py).
//!
//! Destinations (NSD on loopback): `good` (its MX presents a certificate for
//! its name from the test CA; reports by mail), `bad` (its MX presents one for
//! another name; reports to https://rpt-https…), `rpt` (where the mailed
//! reports go; no `_smtp._tls`, so never counted). A second test covers
//! MTA-STS: an enforced policy reported as `sts`, and policies that cannot be
//! fetched or parsed (`sts-policy-fetch-error`, `sts-policy-invalid`).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use sluice_testkit::nsd::ZONE;
use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);

/// tests/py/https_sink.py: saves each POST.
struct HttpsSink {
    _guard: ChildGuard,
    dir: PathBuf,
}

impl HttpsSink {
    fn start(dir: &Path, addr: SocketAddr, tls: &(PathBuf, PathBuf)) -> HttpsSink {
        let out = dir.join("posts");
        std::fs::create_dir_all(&out).unwrap();
        let log = dir.join("https_sink.out");
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(py_script("https_sink.py"))
            .args(["--listen", &addr.to_string()])
            .arg("--cert")
            .arg(&tls.0)
            .arg("--key")
            .arg(&tls.1)
            .arg("--dir")
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit());
        let guard = ChildGuard::new(cmd.spawn().expect("/usr/bin/python3"), "https_sink.py");
        wait_until(
            "https_sink.py ready",
            Duration::from_secs(15),
            || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("ready")
            },
            String::new,
        );
        HttpsSink {
            _guard: guard,
            dir: out,
        }
    }

    /// (metadata, body file) of each saved POST.
    fn posts(&self) -> Vec<(Value, PathBuf)> {
        let mut out = Vec::new();
        for n in 1.. {
            let meta = self.dir.join(format!("post-{n}.json"));
            let Ok(text) = std::fs::read_to_string(&meta) else {
                break;
            };
            let v = serde_json::from_str(&text).expect("post metadata");
            out.push((v, self.dir.join(format!("post-{n}.body"))));
        }
        out
    }
}

/// tests/py/tlsrpt_check.py: the report parsed and validated.
fn check(kind: &str, file: &Path) -> Value {
    let out = run_with_timeout(
        Command::new("/usr/bin/python3")
            .arg(py_script("tlsrpt_check.py"))
            .arg(kind)
            .arg(file),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "tlsrpt_check.py {kind}: {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("tlsrpt_check.py output")
}

/// `sluice tls-rpt send-now --json` against the running relay.
fn send_now(relay: &Relay) -> Value {
    let api = format!("http://127.0.0.1:{}", relay.admin_port);
    let token = relay.spool_path().join("admin.token");
    let token = token.display().to_string();
    let out = sluice(&[
        "tls-rpt",
        "send-now",
        "--json",
        "--api",
        &api,
        "--token-file",
        &token,
    ]);
    assert!(
        out.status.success(),
        "sluice tls-rpt send-now: {}\n{}",
        text(&out.stderr),
        relay.log()
    );
    serde_json::from_slice(&out.stdout).expect("send-now JSON")
}

fn policies_of<'a>(report: &'a Value, kind: &str) -> Vec<&'a Value> {
    report["policies"]
        .as_array()
        .expect("policies")
        .iter()
        .filter(|p| p["policy"]["policy-type"] == kind)
        .collect()
}

#[test]
fn reports_by_mail_and_https_validate_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path(), "ca");
    let ips = loopbacks(4);
    let port = mx_port(&ips[..3]);
    let https_port = TcpListener::bind((ips[3], 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (good_mx, bad_mx) = (format!("mx-good.{ZONE}"), format!("mx-bad.{ZONE}"));
    let https_host = format!("rpt-https.{ZONE}");
    let zone = format!(
        "good MX 10 mx-good\nmx-good A {}\n\
         _smtp._tls.good TXT \"v=TLSRPTv1; rua=mailto:reports@rpt.{ZONE}\"\n\
         bad MX 10 mx-bad\nmx-bad A {}\n\
         _smtp._tls.bad TXT \"v=TLSRPTv1; rua=https://{https_host}:{https_port}/tlsrpt\"\n\
         rpt MX 10 mx-rpt\nmx-rpt A {}\n\
         rpt-https A {}\n",
        ips[0], ips[1], ips[2], ips[3]
    );
    let good = TlsReceiver::start(
        dir.path(),
        ips[0],
        port,
        Some(&make_issued_cert(dir.path(), &ca, "good", &good_mx)),
        None,
    );
    let _bad = TlsReceiver::start(
        dir.path(),
        ips[1],
        port,
        Some(&make_issued_cert(
            dir.path(),
            &ca,
            "bad",
            &format!("elsewhere.{ZONE}"),
        )),
        None,
    );
    let sink = PostfixSink::start(SocketAddr::new(ips[2].into(), port), &[]);
    let https = HttpsSink::start(
        dir.path(),
        SocketAddr::new(ips[3].into(), https_port),
        &make_issued_cert(dir.path(), &ca, "https", &https_host),
    );
    let nsd = Nsd::start(&zone);
    let mut relay = mx_relay(
        &nsd,
        port,
        2,
        &[
            format!("delivery.tls_ca_file=\"{}\"", ca.0.display()),
            format!(
                "rule=[{{match={{recipient_domain=[\"good.{ZONE}\",\"bad.{ZONE}\"]}},tls=\"verify\"}}]"
            ),
            "queue.default.retry=[\"1h\"]".into(),
            "tls_rpt.enabled=true".into(),
            "tls_rpt.organization_name=\"Sluice Test Org\"".into(),
            "tls_rpt.contact_info=\"mailto:tls-admin@relay.test\"".into(),
            "tls_rpt.sender=\"tls-reports@relay.test\"".into(),
        ],
    );

    let body = b"From: alice@snd.example\r\nSubject: tls-rpt\r\n\r\nhello\r\n";
    let good_rcpt = format!("bob@good.{ZONE}");
    let bad_rcpt = format!("carol@bad.{ZONE}");
    let id = submit(
        &relay,
        "alice@snd.example",
        "",
        &[&good_rcpt, &bad_rcpt],
        body,
    );
    wait_until(
        "an attempt for both recipients",
        T,
        || {
            let a = attempts(&relay, &id);
            [&good_rcpt, &bad_rcpt]
                .iter()
                .all(|r| a.iter().any(|e| field(e, "recipient") == r.as_str()))
        },
        || relay.log(),
    );
    let a = attempts(&relay, &id);
    let bad_attempt = a
        .iter()
        .find(|e| field(e, "recipient") == bad_rcpt)
        .unwrap();
    assert_eq!(field(bad_attempt, "status"), "deferred", "{bad_attempt}");
    assert_eq!(good.of("message").len(), 1);
    assert_eq!(good.of("message")[0]["tls"], true);

    // The counts are in memory on the cores: a restart (SIGTERM: every core
    // writes its counters to the store) keeps them.
    relay.terminate();
    relay.restart();

    let sent = send_now(&relay);
    let reports = sent["reports"].as_array().expect("reports");
    assert_eq!(reports.len(), 2, "{sent}\n{}", relay.log());
    for r in reports {
        assert_eq!(r["removed"], true, "{r}");
        assert_eq!(r["deliveries"][0]["ok"], true, "{r}\n{}", relay.log());
    }

    // By mail: queued by the relay, delivered to rpt's MX (smtp-sink).
    wait_until(
        "the mailed report at smtp-sink",
        T,
        || !sink.dumps().is_empty(),
        || relay.log(),
    );
    let dumps = sink.dumps();
    assert_eq!(dumps.len(), 1);
    let mail_file = dir.path().join("report.eml");
    std::fs::write(&mail_file, &dumps[0]).unwrap();
    let got = check("mail", &mail_file);
    let mail = &got["mail"];
    assert_eq!(mail["content_type"], "multipart/report", "{got}");
    assert_eq!(mail["report_type"], "tlsrpt", "{got}");
    assert_eq!(mail["tls_report_domain"], format!("good.{ZONE}"));
    assert_eq!(mail["tls_report_submitter"], "Sluice Test Org");
    assert_eq!(mail["from"], "tls-reports@relay.test");
    let subject = mail["subject"].as_str().unwrap();
    assert!(
        subject.starts_with(&format!(
            "Report Domain: good.{ZONE} Submitter: Sluice Test Org Report-ID: <"
        )),
        "{subject}"
    );
    let filename = mail["filename"].as_str().unwrap();
    assert!(
        filename.starts_with(&format!("relay.test!good.{ZONE}!")) && filename.ends_with(".json.gz"),
        "{filename}"
    );
    let report = &got["report"];
    assert_eq!(report["organization-name"], "Sluice Test Org");
    assert_eq!(report["contact-info"], "mailto:tls-admin@relay.test");
    let p = policies_of(report, "no-policy-found");
    assert_eq!(p.len(), 1, "{report}");
    assert_eq!(p[0]["policy"]["policy-domain"], format!("good.{ZONE}"));
    assert_eq!(p[0]["policy"]["mx-host"][0], good_mx.as_str());
    assert_eq!(
        p[0]["summary"]["total-successful-session-count"], 1,
        "{report}"
    );
    assert_eq!(
        p[0]["summary"]["total-failure-session-count"], 0,
        "{report}"
    );

    // By HTTPS POST, certificate verified against delivery.tls_ca_file.
    wait_until(
        "the POSTed report",
        T,
        || !https.posts().is_empty(),
        || relay.log(),
    );
    let posts = https.posts();
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].0["path"], "/tlsrpt");
    assert_eq!(posts[0].0["content_type"], "application/tlsrpt+gzip");
    let got = check("gzip", &posts[0].1);
    let report = &got["report"];
    let p = policies_of(report, "no-policy-found");
    assert_eq!(p.len(), 1, "{report}");
    assert_eq!(p[0]["policy"]["policy-domain"], format!("bad.{ZONE}"));
    assert_eq!(
        p[0]["summary"]["total-successful-session-count"], 0,
        "{report}"
    );
    assert_eq!(
        p[0]["summary"]["total-failure-session-count"], 1,
        "{report}"
    );
    let d = &p[0]["failure-details"][0];
    assert_eq!(d["result-type"], "certificate-host-mismatch", "{report}");
    assert_eq!(d["receiving-mx-hostname"], bad_mx.as_str());
    assert_eq!(d["receiving-ip"], ips[1].to_string());
    assert_eq!(d["failed-session-count"], 1);

    // Reported counters are gone; the report mail's own session (rpt has no
    // _smtp._tls record) was never counted.
    let again = send_now(&relay);
    assert_eq!(again["reports"], serde_json::json!([]), "{again}");
}

/// MTA-STS in the reports (RFC 8460 §4.3): a session under an enforced
/// policy (served by tests/py/mta_sts_server.py over HTTPS) is reported as
/// policy type `sts` with the policy's fields as `policy-string` and its MX
/// host; a domain whose `_mta-sts` TXT names a policy that cannot be fetched
/// (nothing listens at its `mta-sts` address) or does not parse is reported
/// with `sts-policy-fetch-error` / `sts-policy-invalid` (and its mail goes as
/// configured). Every report goes by HTTPS POST and validates against the schema.
#[test]
fn mta_sts_sessions_and_failed_policy_fetches_are_reported() {
    use sluice_testkit::mta_sts::PolicyServer;
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path(), "ca");
    // 0 the MX; 1 the policy server; 2 the report sink; 3 nothing listens.
    let ips = loopbacks(4);
    let port = mx_port(&ips[..1]);
    let policy_port = mx_port(&[ips[1], ips[3]]);
    let rpt_port = TcpListener::bind((ips[2], 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mx = format!("mx-sts.{ZONE}");
    let rpt_host = format!("rpt-https.{ZONE}");
    let labels = ["sts", "nofetch", "invalid"];
    let mut zone = format!("mx-sts A {}\nrpt-https A {}\n", ips[0], ips[2]);
    for l in labels {
        let policy_ip = if l == "nofetch" { ips[3] } else { ips[1] };
        zone.push_str(&format!(
            "{l} MX 10 mx-sts\n_mta-sts.{l} TXT \"v=STSv1; id=1;\"\nmta-sts.{l} A {policy_ip}\n\
             _smtp._tls.{l} TXT \"v=TLSRPTv1; rua=https://{rpt_host}:{rpt_port}/tlsrpt\"\n"
        ));
    }
    let receiver = TlsReceiver::start(
        dir.path(),
        ips[0],
        port,
        Some(&make_issued_cert(dir.path(), &ca, "mx", &mx)),
        None,
    );
    let certs: Vec<(String, (PathBuf, PathBuf))> = ["sts", "invalid"]
        .iter()
        .map(|l| {
            let name = format!("mta-sts.{l}.{ZONE}");
            (
                name.clone(),
                make_issued_cert(dir.path(), &ca, &format!("https-{l}"), &name),
            )
        })
        .collect();
    let policies = PolicyServer::start(dir.path(), ips[1], policy_port, &certs);
    policies.policy("sts", "enforce", &[&mx]);
    policies.body("invalid", "this is not an MTA-STS policy\r\n");
    let sink = HttpsSink::start(
        dir.path(),
        SocketAddr::new(ips[2].into(), rpt_port),
        &make_issued_cert(dir.path(), &ca, "rpt", &rpt_host),
    );
    let nsd = Nsd::start(&zone);
    let relay = mx_relay(
        &nsd,
        port,
        1,
        &[
            format!("delivery.tls_ca_file=\"{}\"", ca.0.display()),
            format!("delivery.mta_sts_https_port={policy_port}"),
            "delivery.mta_sts_fetch_timeout=\"3s\"".into(),
            "queue.default.retry=[\"1h\"]".into(),
            "tls_rpt.enabled=true".into(),
            "tls_rpt.organization_name=\"Sluice Test Org\"".into(),
            "tls_rpt.contact_info=\"mailto:tls-admin@relay.test\"".into(),
            "tls_rpt.sender=\"tls-reports@relay.test\"".into(),
        ],
    );
    let rcpts: Vec<String> = labels.iter().map(|l| format!("bob@{l}.{ZONE}")).collect();
    let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let body = b"From: alice@snd.example\r\nSubject: tls-rpt sts\r\n\r\nhello\r\n";
    let id = submit(&relay, "alice@snd.example", "", &refs, body);
    wait_until(
        "all three delivered",
        T,
        || {
            attempts(&relay, &id)
                .iter()
                .filter(|e| field(e, "status") == "delivered")
                .count()
                == 3
        },
        || relay.log(),
    );
    for e in attempts(&relay, &id) {
        let want = if field(&e, "recipient") == rcpts[0] {
            "mta-sts"
        } else {
            "opportunistic"
        };
        assert_eq!(field(&e, "tls_policy"), want, "{e}");
    }
    assert_eq!(receiver.of("message").len(), 3);

    let sent = send_now(&relay);
    assert_eq!(
        sent["reports"].as_array().map(Vec::len),
        Some(3),
        "{sent}\n{}",
        relay.log()
    );
    wait_until(
        "three POSTed reports",
        T,
        || sink.posts().len() == 3,
        || relay.log(),
    );
    let mut by_domain = std::collections::HashMap::new();
    for (_, file) in sink.posts() {
        let got = check("gzip", &file);
        let report = got["report"].clone();
        let domain = report["policies"][0]["policy"]["policy-domain"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        by_domain.insert(domain, report);
    }

    // Enforced: policy type sts, the policy's fields, the MX host.
    let report = &by_domain[&format!("sts.{ZONE}")];
    let p = policies_of(report, "sts");
    assert_eq!(p.len(), 1, "{report}");
    let strings: Vec<&str> = p[0]["policy"]["policy-string"]
        .as_array()
        .expect("policy-string")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for want in [
        "version: STSv1",
        "mode: enforce",
        &format!("mx: {mx}"),
        "max_age: 86400",
    ] {
        assert!(strings.contains(&want), "{want} in {strings:?}");
    }
    assert_eq!(p[0]["policy"]["mx-host"][0], mx.as_str(), "{report}");
    assert_eq!(
        p[0]["summary"]["total-successful-session-count"], 1,
        "{report}"
    );
    assert_eq!(
        p[0]["summary"]["total-failure-session-count"], 0,
        "{report}"
    );
    assert!(
        policies_of(report, "no-policy-found").is_empty(),
        "{report}"
    );

    // Fetch failed / policy invalid: an sts failure without policy string or
    // host; the session itself, under the configured policy, a success.
    for (label, result) in [
        ("nofetch", "sts-policy-fetch-error"),
        ("invalid", "sts-policy-invalid"),
    ] {
        let report = &by_domain[&format!("{label}.{ZONE}")];
        let p = policies_of(report, "sts");
        assert_eq!(p.len(), 1, "{report}");
        assert!(p[0]["policy"].get("policy-string").is_none(), "{report}");
        assert_eq!(
            p[0]["summary"]["total-failure-session-count"], 1,
            "{report}"
        );
        let d = &p[0]["failure-details"][0];
        assert_eq!(d["result-type"], result, "{report}");
        assert!(d.get("receiving-ip").is_none(), "{report}");
        let ok = policies_of(report, "no-policy-found");
        assert_eq!(ok.len(), 1, "{report}");
        assert_eq!(
            ok[0]["summary"]["total-successful-session-count"], 1,
            "{report}"
        );
    }
}
