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
//! reports go; no `_smtp._tls`, so never counted).

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
