//! Delivery events end to end (docs/events.md): the real relay delivers
//! through a real NSD to the test kit's scripted SMTP server (a
//! Gmail-shaped "550 5.1.1 does not exist" and a "452 4.2.2 over quota"),
//! with `[events]` writing a JSON-lines file and posting to a Python
//! webhook receiver (tests/py/webhook_sink.py, http.server) that answers 500
//! for a while and then recovers.
//!
//! - The file gets reception, delivery, deferral, bounce (with class) and
//!   suppression events whose fields match what the next hop saw and what
//!   the client sent (Message-ID, X-Tenant, X-Campaign read at reception).
//! - The webhook gets every event of the file, in batches, none lost, once
//!   it recovers.
//! - kill -9 while the webhook is down: after the restart the buffered
//!   events are posted.
//! - A deferred recipient past its queue lifetime gets an expiry event, and
//!   with `suppression.action = "drop"` a listed recipient a suppression
//!   event with the queue id (file only).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let (head, body) = resp.split_once("\r\n\r\n").expect("http answer");
    assert!(head.contains(" 200 "), "{head}");
    body.to_string()
}

fn metric(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// tests/py/webhook_sink.py: answers 500 while `fail` exists, else keeps
/// each batch as a line of `out`.
struct Webhook {
    _guard: ChildGuard,
    out: PathBuf,
    fail: PathBuf,
    url: String,
}

impl Webhook {
    fn start(dir: &Path, failing: bool) -> Webhook {
        let port = free_port();
        let out = dir.join("webhook.jsonl");
        let fail = dir.join("webhook.fail");
        if failing {
            std::fs::write(&fail, b"").expect("fail file");
        }
        let log = dir.join("webhook.out");
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(py_script("webhook_sink.py"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--out")
            .arg(&out)
            .arg("--fail-file")
            .arg(&fail)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(Stdio::inherit());
        let guard = ChildGuard::new(cmd.spawn().expect("/usr/bin/python3"), "webhook_sink.py");
        wait_until(
            "webhook_sink.py ready",
            Duration::from_secs(15),
            || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("ready")
            },
            String::new,
        );
        Webhook {
            _guard: guard,
            out,
            fail,
            url: format!("http://127.0.0.1:{port}/events"),
        }
    }

    fn recover(&self) {
        std::fs::remove_file(&self.fail).expect("remove fail file");
    }

    /// The batches received: each an array of events.
    fn batches(&self) -> Vec<Vec<Value>> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| v["events"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    fn events(&self) -> Vec<Value> {
        self.batches().into_iter().flatten().collect()
    }
}

/// The events file's objects.
fn file_events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// An event's identity for comparing sinks: the whole object as text.
fn keys(events: &[Value]) -> BTreeSet<String> {
    events.iter().map(|e| e.to_string()).collect()
}

fn find<'a>(events: &'a [Value], kind: &str, rcpt: &str) -> Option<&'a Value> {
    events
        .iter()
        .find(|e| e["type"] == kind && (rcpt.is_empty() || e["recipient"] == rcpt))
}

fn events_relay(nsd: &Nsd, port: u16, file: &Path, webhook: &Webhook, extra: &[&str]) -> Relay {
    let mut sets: Vec<String> = vec![
        "events.enabled=true".into(),
        format!("events.file=\"{}\"", file.display()),
        format!("events.webhook_url=\"{}\"", webhook.url),
        "events.webhook_batch_size=4".into(),
        "events.webhook_max_delay=\"200ms\"".into(),
        "events.webhook_retry_initial=\"100ms\"".into(),
        "events.webhook_retry_max=\"500ms\"".into(),
        "events.webhook_timeout=\"5s\"".into(),
        // One attempt in the test's time: the deferred stay deferred.
        "queue.default.retry=[\"1h\"]".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    mx_relay(nsd, port, 2, &sets)
}

#[test]
fn file_and_recovering_webhook_get_every_event_with_fields_matching_the_hop() {
    let ips = loopbacks(2);
    let port = mx_port(&ips);
    let nsd = Nsd::start(&format!(
        "a MX 10 mx1\nmx1 A {}\nsnd MX 10 bounces\nbounces A {}",
        ips[0], ips[1]
    ));
    let hop = ScriptedServer::builder()
        .name("mx1.a.dlv.test")
        .capability("PIPELINING")
        .capability("8BITMIME")
        .on_arg(
            "RCPT",
            "gone@",
            Act::Reply(
                "550-5.1.1 The mailbox you addressed does not exist here. Please check\n\
                 550 5.1.1 the spelling and try again. https://support.example/NoSuchUser e1si"
                    .into(),
            ),
        )
        .on_arg(
            "RCPT",
            "full@",
            Act::Reply(
                "452-4.2.2 The account you wrote to is over quota and cannot take\n\
                 452 4.2.2 mail right now. https://support.example/OverQuota e2si"
                    .into(),
            ),
        )
        .start(sa(ips[0], port));
    let _bounces = LoadgenSink::start(&[sa(ips[1], port)], &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let webhook = Webhook::start(dir.path(), true);
    let file = dir.path().join("events.jsonl");
    let relay = events_relay(
        &nsd,
        port,
        &file,
        &webhook,
        &["suppression.enabled=true", "suppression.action=\"refuse\""],
    );

    let body = b"Message-ID: <ev1@snd.dlv.test>\r\nX-Tenant: acme\r\nX-Campaign:\r\n spring-sale\r\nSubject: events\r\n\r\nhello\r\n";
    let id = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["ok@a.dlv.test", "gone@a.dlv.test", "full@a.dlv.test"],
        body,
    );
    let mut seen = Vec::new();
    wait_until(
        "reception, delivery, bounce and deferral in the file",
        T,
        || {
            seen = file_events(&file);
            find(&seen, "reception", "").is_some()
                && find(&seen, "delivery", "ok@a.dlv.test").is_some()
                && find(&seen, "bounce", "gone@a.dlv.test").is_some()
                && find(&seen, "deferral", "full@a.dlv.test").is_some()
        },
        || format!("{:#?}\n{}", file_events(&file), relay.log()),
    );

    // Reception: what the client sent.
    let r = find(&seen, "reception", "").expect("reception");
    assert_eq!(r["id"], id.as_str(), "{r}");
    assert_eq!(r["message_id"], "<ev1@snd.dlv.test>", "{r}");
    assert_eq!(r["tenant"], "acme", "{r}");
    assert_eq!(r["campaign"], "spring-sale", "folded value unfolded: {r}");
    assert_eq!(r["sender"], "alice@snd.dlv.test", "{r}");
    assert_eq!(
        r["recipients"],
        serde_json::json!(["ok@a.dlv.test", "gone@a.dlv.test", "full@a.dlv.test"])
    );
    assert_eq!(r["queue"], "default");
    assert_eq!(r["client_ip"], "127.0.0.1");
    let size = r["size"].as_u64().expect("size");
    assert!(size > body.len() as u64, "Received header included: {r}");
    let time = r["time"].as_str().expect("time");
    assert!(
        time.len() == 24 && time.ends_with('Z') && time.as_bytes()[19] == b'.',
        "RFC 3339 UTC with ms: {time}"
    );

    // Delivery: what the hop saw.
    let got = hop.messages();
    assert_eq!(got.len(), 1, "one transaction");
    assert_eq!(got[0].rcpt_addresses(), vec!["ok@a.dlv.test".to_string()]);
    assert!(got[0].body_text().contains("<ev1@snd.dlv.test>"));
    let d = find(&seen, "delivery", "ok@a.dlv.test").expect("delivery");
    assert_eq!(d["id"], id.as_str());
    assert_eq!(
        d["message_id"], "<ev1@snd.dlv.test>",
        "carried from reception: {d}"
    );
    assert_eq!(d["tenant"], "acme");
    assert_eq!(d["campaign"], "spring-sale");
    assert_eq!(d["sender"], "alice@snd.dlv.test");
    assert_eq!(d["site"], "a.dlv.test");
    assert_eq!(d["remote_ip"], ips[0].to_string(), "{d}");
    assert_eq!(d["remote_host"], "mx1.dlv.test", "{d}");
    assert_eq!(d["reply"]["code"], 250, "{d}");
    assert!(d["class"].is_null(), "{d}");
    assert_eq!(d["attempt"], 1);
    assert_eq!(d["size"].as_u64(), Some(size));
    assert!(d["tls"].is_null(), "the hop offers no STARTTLS: {d}");

    let b = find(&seen, "bounce", "gone@a.dlv.test").expect("bounce");
    assert_eq!(b["reply"]["code"], 550, "{b}");
    assert_eq!(b["reply"]["enhanced"], "5.1.1", "{b}");
    assert!(
        b["reply"]["text"]
            .as_str()
            .unwrap_or("")
            .contains("does not exist"),
        "{b}"
    );
    assert_eq!(b["class"], "invalid-recipient", "{b}");
    assert_eq!(b["remote_ip"], ips[0].to_string());
    assert_eq!(b["message_id"], "<ev1@snd.dlv.test>");

    let f = find(&seen, "deferral", "full@a.dlv.test").expect("deferral");
    assert_eq!(f["reply"]["code"], 452, "{f}");
    assert_eq!(f["reply"]["enhanced"], "4.2.2", "{f}");
    assert_eq!(f["class"], "mailbox-full", "{f}");

    // Suppression: the hard bounce listed gone@ (on a blocking thread after
    // the attempt); the next RCPT to it is refused, and the event says so.
    wait_until(
        "the bounce on the suppression list",
        T,
        || {
            metric(
                &http_get(relay.admin_port, "/metrics"),
                "sluice_suppression_added_total",
            ) >= 1.0
        },
        || relay.log(),
    );
    let out = swaks(
        &relay,
        &["--from", "bob@snd.dlv.test", "--to", "gone@a.dlv.test"],
    );
    assert!(
        text(&out.stdout).contains("550 5.1.1"),
        "{}",
        text(&out.stdout)
    );
    wait_until(
        "the suppression event in the file",
        T,
        || {
            seen = file_events(&file);
            find(&seen, "suppression", "gone@a.dlv.test").is_some()
        },
        || format!("{:#?}", file_events(&file)),
    );
    let s = find(&seen, "suppression", "gone@a.dlv.test").expect("suppression");
    assert_eq!(s["sender"], "bob@snd.dlv.test");
    assert_eq!(s["class"], "invalid-recipient", "{s}");
    assert_eq!(s["reply"]["code"], 550);
    assert_eq!(s["client_ip"], "127.0.0.1");

    // The webhook failed all along: nothing acknowledged, all buffered.
    let m = http_get(relay.admin_port, "/metrics");
    assert!(
        metric(&m, "sluice_events_post_failures_total") >= 1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "sluice_events_posted_total"), 0.0, "{m}");
    assert!(webhook.events().is_empty());
    assert_eq!(metric(&m, "sluice_events_dropped_total"), 0.0, "{m}");

    // It recovers: every event of the file arrives, in batches, none lost.
    webhook.recover();
    let mut posted = Vec::new();
    wait_until(
        "every event of the file at the webhook",
        T,
        || {
            seen = file_events(&file);
            posted = webhook.events();
            keys(&seen) == keys(&posted) && posted.len() == seen.len()
        },
        || {
            format!(
                "file {:#?}\nwebhook {:#?}",
                file_events(&file),
                webhook.events()
            )
        },
    );
    let batches = webhook.batches();
    assert!(
        batches.iter().all(|b| !b.is_empty() && b.len() <= 4),
        "batches of at most webhook_batch_size: {batches:?}"
    );
    assert!(
        batches.iter().any(|b| b.len() > 1),
        "events travel in batches: {batches:?}"
    );
    wait_until(
        "the buffer empty",
        T,
        || {
            metric(
                &http_get(relay.admin_port, "/metrics"),
                "sluice_events_buffered ",
            ) == 0.0
        },
        || http_get(relay.admin_port, "/metrics"),
    );
    let m = http_get(relay.admin_port, "/metrics");
    assert_eq!(
        metric(&m, "sluice_events_posted_total"),
        posted.len() as f64,
        "{m}"
    );
}

#[test]
fn buffered_events_are_posted_after_kill_9_and_restart() {
    let ips = loopbacks(1);
    let port = mx_port(&ips);
    let nsd = Nsd::start(&format!("a MX 10 mx1\nmx1 A {}", ips[0]));
    let sink = LoadgenSink::start(&[sa(ips[0], port)], &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let webhook = Webhook::start(dir.path(), true);
    let file = dir.path().join("events.jsonl");
    let mut relay = events_relay(&nsd, port, &file, &webhook, &[]);

    const N: usize = 6;
    let mut ids = Vec::new();
    for i in 0..N {
        let body = format!("Message-ID: <k{i}@snd.dlv.test>\r\nSubject: {i}\r\n\r\nhi\r\n");
        ids.push(submit(
            &relay,
            "alice@snd.dlv.test",
            "",
            &[&format!("r{i}@a.dlv.test")],
            body.as_bytes(),
        ));
    }
    // The file is written after the buffer's commit: an event in the file is
    // durable in the buffer.
    let mut seen = Vec::new();
    wait_until(
        "reception and delivery of every message in the file",
        T,
        || {
            seen = file_events(&file);
            seen.iter().filter(|e| e["type"] == "delivery").count() == N
                && seen.iter().filter(|e| e["type"] == "reception").count() == N
        },
        || format!("{:#?}\n{}", file_events(&file), relay.log()),
    );
    assert_eq!(sink.messages(), N as u64);
    wait_until(
        "a failed POST",
        T,
        || {
            metric(
                &http_get(relay.admin_port, "/metrics"),
                "sluice_events_post_failures_total",
            ) >= 1.0
        },
        || relay.log(),
    );
    relay.kill9();
    assert!(
        webhook.events().is_empty(),
        "nothing acknowledged before the kill"
    );

    webhook.recover();
    relay.restart();
    let mut posted = Vec::new();
    wait_until(
        "the buffered events posted after the restart",
        T,
        || {
            posted = webhook.events();
            keys(&posted) == keys(&seen)
        },
        || {
            format!(
                "file {:#?}\nwebhook {:#?}\n{}",
                file_events(&file),
                webhook.events(),
                relay.log()
            )
        },
    );
    assert_eq!(posted.len(), 2 * N, "none lost, none twice: {posted:#?}");
    for id in &ids {
        let d = posted
            .iter()
            .find(|e| e["type"] == "delivery" && e["id"] == id.as_str())
            .unwrap_or_else(|| panic!("delivery of {id}"));
        assert!(
            d["message_id"]
                .as_str()
                .is_some_and(|m| m.starts_with("<k")),
            "{d}"
        );
    }
}

#[test]
fn expiry_and_suppression_drop_events_in_the_file() {
    let ips = loopbacks(2);
    let port = mx_port(&ips);
    let nsd = Nsd::start(&format!(
        "a MX 10 mx1\nmx1 A {}\nsnd MX 10 bounces\nbounces A {}",
        ips[0], ips[1]
    ));
    let _hop = ScriptedServer::builder()
        .name("mx1.a.dlv.test")
        .capability("PIPELINING")
        .on_arg(
            "RCPT",
            "gone@",
            Act::Reply("550 5.1.1 The mailbox you addressed does not exist here.".into()),
        )
        .on_arg(
            "RCPT",
            "full@",
            Act::Reply("452 4.2.2 The account you wrote to is over quota.".into()),
        )
        .start(sa(ips[0], port));
    let _bounces = LoadgenSink::start(&[sa(ips[1], port)], &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("events.jsonl");
    let relay = mx_relay(
        &nsd,
        port,
        1,
        &[
            "events.enabled=true".into(),
            format!("events.file=\"{}\"", file.display()),
            "events.tenant_header=\"X-Customer\"".into(),
            "queue.default.retry=[\"1s\"]".into(),
            "queue.default.expire=\"2s\"".into(),
            "suppression.enabled=true".into(),
            "suppression.action=\"drop\"".into(),
        ],
    );

    // Deferred until the queue lifetime passes: deferrals, then one expiry.
    let full = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["full@a.dlv.test"],
        b"Message-ID: <exp@snd.dlv.test>\r\nX-Customer: initech\r\n\r\nhi\r\n",
    );
    // A hard bounce puts gone@ on the list; the next message to it is
    // accepted and dropped at delivery.
    submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["gone@a.dlv.test"],
        b"Subject: first\r\n\r\nhi\r\n",
    );
    wait_until(
        "the bounce on the suppression list",
        T,
        || {
            metric(
                &http_get(relay.admin_port, "/metrics"),
                "sluice_suppression_added_total",
            ) >= 1.0
        },
        || relay.log(),
    );
    let dropped = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["gone@a.dlv.test"],
        b"Subject: second\r\n\r\nhi\r\n",
    );
    let mut seen = Vec::new();
    wait_until(
        "the expiry and the suppression drop in the file",
        T,
        || {
            seen = file_events(&file);
            find(&seen, "expiry", "full@a.dlv.test").is_some()
                && find(&seen, "suppression", "gone@a.dlv.test").is_some()
        },
        || format!("{:#?}\n{}", file_events(&file), relay.log()),
    );
    let e = find(&seen, "expiry", "full@a.dlv.test").expect("expiry");
    assert_eq!(e["id"], full.as_str(), "{e}");
    assert_eq!(e["message_id"], "<exp@snd.dlv.test>", "{e}");
    assert_eq!(e["tenant"], "initech", "the configured header: {e}");
    assert_eq!(e["class"], "expired", "{e}");
    assert_eq!(e["reply"]["code"].as_u64().map(|c| c / 100), Some(5), "{e}");
    let deferrals = seen
        .iter()
        .filter(|v| v["type"] == "deferral" && v["id"] == full.as_str())
        .count();
    assert!(deferrals >= 1, "deferrals before the expiry: {seen:#?}");
    let s = find(&seen, "suppression", "gone@a.dlv.test").expect("suppression");
    assert_eq!(s["id"], dropped.as_str(), "{s}");
    assert_eq!(s["class"], "suppressed", "{s}");
    assert_eq!(s["reply"]["enhanced"], "5.1.1", "{s}");
    assert!(s["remote_ip"].is_null(), "no connection was made: {s}");
    // Every line is one event of the documented types.
    for v in &seen {
        let t = v["type"].as_str().unwrap_or("");
        assert!(
            [
                "reception",
                "delivery",
                "deferral",
                "bounce",
                "expiry",
                "suppression"
            ]
            .contains(&t),
            "{v}"
        );
    }
}
