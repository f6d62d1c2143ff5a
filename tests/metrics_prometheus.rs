//! Metrics: the `/metrics` exposition of a real relay under a short load passes
//! `promtool check metrics`, and a real Prometheus server scraping it sees the
//! received-messages counter and the queue depth reach what was sent and what
//! the spool holds. A second relay delivers to a loadgen sink, so the delivery
//! counters and histograms are checked against what the sink got.
//!
//! Needs `prometheus` and `promtool` (Debian package `prometheus`) and the
//! workspace's `sluice-loadgen`; without them the test is skipped, except under
//! CI=true, where it fails.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_testkit::*;

/// Messages in the load; a few hundred, over several connections.
const MESSAGES: u64 = 300;

/// The tool's name when installed (the kit's skip policy otherwise).
fn tool(name: &str) -> Option<String> {
    require_tool(name).then(|| name.to_string())
}

/// A plain HTTP/1.0 GET on loopback: (status, body).
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

fn scrape(relay: &Relay) -> String {
    let (status, body) = http_get(relay.admin_port, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

/// The value of one series (exact name and labels as exposed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn load(relay: &Relay, messages: u64) -> u64 {
    let out = run_with_timeout(
        Command::new(loadgen_bin())
            .args(["send", "--json", "--target", &relay.addr_string()])
            .args(["--connections", "8", "--messages", &messages.to_string()])
            .args(["--size", "2048"]),
        Duration::from_secs(120),
    );
    let sent: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("loadgen send: {e}; stderr {}", text(&out.stderr)));
    let accepted = sent["accepted"].as_u64().unwrap_or(0);
    assert_eq!(accepted, messages, "every message accepted: {sent}");
    accepted
}

fn promtool_check(promtool: &str, exposition: &str) {
    let mut child = ChildGuard::new(
        Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting promtool"),
        "promtool",
    );
    let mut stdin = child
        .child
        .as_mut()
        .and_then(|c| c.stdin.take())
        .expect("promtool stdin");
    stdin
        .write_all(exposition.as_bytes())
        .expect("feeding promtool");
    drop(stdin);
    let status = child
        .wait_timeout(Duration::from_secs(60))
        .expect("promtool finished");
    let mut out = String::new();
    if let Some(mut e) = child.child.as_mut().and_then(|c| c.stderr.take()) {
        let _ = e.read_to_string(&mut out);
    }
    assert!(
        status.success(),
        "promtool check metrics failed ({status}): {out}\n--- exposition ---\n{exposition}"
    );
}

/// A Prometheus server of our own, on a free port, scraping `target` every
/// second; killed (by pid) when dropped.
struct Prometheus {
    guard: ChildGuard,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(bin: &str, target: u16) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: sluice\n    static_configs:\n      \
                 - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .expect("writing prometheus.yml");
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting prometheus");
        let mut p = Prometheus {
            guard: ChildGuard::new(child, "prometheus"),
            port,
            _dir: dir,
        };
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(p.guard.is_running(), "prometheus exited during start-up");
            if matches!(http_get(port, "/-/ready"), Ok((200, _))) {
                break;
            }
            assert!(Instant::now() < until, "prometheus not ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    /// The value of an instant query with one result, if it has one.
    fn query(&self, promql: &str) -> Option<f64> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, body) = http_get(self.port, &path).ok()?;
        if status != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Polls `promql` until it equals `want` or the deadline passes; the last value.
    fn wait_for(&self, promql: &str, want: f64, deadline: Duration) -> Option<f64> {
        let until = Instant::now() + deadline;
        loop {
            let got = self.query(promql);
            if got == Some(want) || Instant::now() >= until {
                return got;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.guard.kill();
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_received_messages_and_queue_depth() {
    let (Some(prometheus), Some(promtool)) = (tool("prometheus"), tool("promtool")) else {
        return;
    };
    // Delivery off: everything received stays queued, so the depth is known.
    let relay = Relay::builder().cores(2).start();
    let server = Prometheus::start(&prometheus, relay.admin_port);

    let sent = load(&relay, MESSAGES);
    let held = relay.count() as u64;
    assert_eq!(held, sent, "the spool holds every message");

    let text = scrape(&relay);
    promtool_check(&promtool, &text);
    assert_eq!(
        sample(&text, "sluice_messages_received_total{queue=\"default\"}"),
        Some(sent as f64),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "sluice_smtp_transactions_total{listener=\"smtp\",result=\"accepted\"}"
        ),
        Some(sent as f64)
    );
    // Each accepted message had at least MAIL, RCPT and the final 250 answered 2xx.
    let ok_replies = sample(
        &text,
        "sluice_smtp_replies_total{listener=\"smtp\",class=\"2xx\"}",
    )
    .unwrap_or(0.0);
    assert!(ok_replies >= 3.0 * sent as f64, "2xx replies {ok_replies}");
    assert!(
        sample(&text, "sluice_spool_commit_seconds_count").unwrap_or(0.0) >= 1.0,
        "spool commits are timed"
    );
    assert!(
        text.contains("sluice_spool_commit_seconds_bucket{le=\"0.001\"}"),
        "latency is a histogram"
    );
    assert!(text.contains("sluice_executor_busy_ratio{core=\"1\"}"));

    // Prometheus itself sees the counter and the gauge reach the real numbers.
    let received = server.wait_for(
        "sum(sluice_messages_received_total)",
        sent as f64,
        Duration::from_secs(60),
    );
    assert_eq!(
        received,
        Some(sent as f64),
        "received counter in Prometheus"
    );
    let depth = server.wait_for(
        "sum(sluice_queue_messages{queue=\"default\"})",
        held as f64,
        Duration::from_secs(30),
    );
    assert_eq!(depth, Some(held as f64), "queue depth in Prometheus");
    let bytes = server
        .query("sum(sluice_queue_bytes)")
        .expect("queue bytes in Prometheus");
    assert!(bytes >= (sent * 2048) as f64, "queue bytes {bytes}");
    let up = server.query("up{job=\"sluice\"}");
    assert_eq!(up, Some(1.0), "the scrape target is healthy");
}

#[test]
fn delivery_counters_follow_what_the_sink_received() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let ip = loopback();
    let port = mx_port(&[ip]);
    let sink = LoadgenSink::start(&[std::net::SocketAddr::new(ip.into(), port)], &[]);
    let relay = Relay::builder()
        .cores(2)
        .set("delivery.enabled=true")
        .set(format!(
            "route.sink={{type=\"smtp\",host=\"{ip}\",port={port},tls=\"none\"}}"
        ))
        .set("rule=[{route=\"sink\"}]")
        // A message rate, so jobs wait at the site for a while (its backlog
        // shows) and the throttle counts.
        .set("destination={\"route:sink\"={message_rate=[\"20/s\"]}}")
        .start();
    const N: u64 = 100;
    load(&relay, N);

    // Poll the exposition until every recipient is delivered and the queue is
    // empty, noting the largest site backlog seen on the way.
    let until = Instant::now() + Duration::from_secs(60);
    let mut backlog_seen = 0.0f64;
    let text = loop {
        let text = scrape(&relay);
        let backlog = sample(&text, "sluice_site_queue_messages{site=\"route:sink\"}");
        backlog_seen = backlog_seen.max(backlog.unwrap_or(0.0));
        let delivered = sample(
            &text,
            "sluice_recipients_delivered_total{queue=\"default\"}",
        )
        .unwrap_or(0.0);
        let depth = sample(&text, "sluice_queue_messages{queue=\"default\"}");
        if delivered == N as f64 && depth == Some(0.0) {
            break text;
        }
        assert!(
            Instant::now() < until,
            "delivered {delivered}, depth {depth:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    promtool_check(&promtool, &text);
    assert_eq!(sink.saved().len() as u64, N, "the sink got every message");
    assert_eq!(
        sample(&text, "sluice_delivery_attempt_seconds_count"),
        Some(N as f64),
        "one timed transaction per message:\n{text}"
    );
    assert_eq!(
        sample(&text, "sluice_delivery_delay_seconds_count"),
        Some(N as f64)
    );
    assert_eq!(
        sample(&text, "sluice_recipients_bounced_total{queue=\"default\"}"),
        Some(0.0)
    );
    assert!(
        backlog_seen >= 1.0,
        "the rate-limited site showed a backlog (largest seen {backlog_seen})"
    );
    assert!(
        sample(
            &text,
            "sluice_throttle_events_total{kind=\"site_message_rate\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "the site message rate was counted:\n{text}"
    );
    // Site series stay bounded: named sites (here one) plus "_other".
    let sites = text
        .lines()
        .filter(|l| l.starts_with("sluice_site_queue_messages{"))
        .count();
    assert!((1..=21).contains(&sites), "{sites} site series");
    assert_eq!(
        sample(&text, "sluice_site_queue_messages{site=\"_other\"}"),
        Some(0.0),
        "{text}"
    );
}

/// Polls the exposition until `series` has `want`; the last exposition on failure.
fn wait_sample(relay: &Relay, series: &str, want: f64) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape(relay);
        if sample(&text, series) == Some(want) {
            return;
        }
        assert!(
            Instant::now() < until,
            "{series} never reached {want}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn inbound_tls_and_refused_connections_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = make_cert(dir.path());
    let relay = Relay::builder()
        .dir(dir)
        .lset("tls", "\"starttls\"")
        .lset("tls_cert", &format!("\"{}\"", cert.display()))
        .lset("tls_key", &format!("\"{}\"", key.display()))
        .lset("max_connections_per_ip", "2")
        .start();

    // Two STARTTLS sessions that send mail: two good handshakes.
    let out = run_with_timeout(
        Command::new(loadgen_bin())
            .args([
                "send",
                "--json",
                "--starttls",
                "--target",
                &relay.addr_string(),
            ])
            .args(["--connections", "2", "--messages", "10"]),
        Duration::from_secs(60),
    );
    let sent: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("loadgen send: {e}; stderr {}", text(&out.stderr)));
    assert_eq!(sent["accepted"].as_u64(), Some(10), "{sent}");
    wait_sample(
        &relay,
        "sluice_tls_inbound_handshakes_total{listener=\"smtp\",result=\"ok\"}",
        2.0,
    );

    // A client that answers the 220 to STARTTLS with something not TLS.
    let mut c = relay.session();
    c.expect("STARTTLS", 220);
    c.send(b"this is no ClientHello\r\n\r\n");
    let _ = c.read_to_eof();
    wait_sample(
        &relay,
        "sluice_tls_inbound_handshakes_total{listener=\"smtp\",result=\"failed\"}",
        1.0,
    );

    // Two sessions held open from one address; the third is refused.
    let held = [relay.greeted(), relay.greeted()];
    wait_sample(&relay, "sluice_connections_current{listener=\"smtp\"}", 2.0);
    let mut third = relay.connect();
    let refusal = third.read_reply();
    assert_eq!(refusal.code, 421, "{refusal:?}");
    wait_sample(
        &relay,
        "sluice_connections_rejected_total{listener=\"smtp\",reason=\"per_ip_limit\"}",
        1.0,
    );
    drop(held);
    drop(third);
    wait_sample(&relay, "sluice_connections_current{listener=\"smtp\"}", 0.0);
    let text = scrape(&relay);
    // The readiness probe, the loadgen's two, the bad handshake, two held, one refused.
    let total = sample(&text, "sluice_connections_total{listener=\"smtp\"}").unwrap_or(0.0);
    assert!(total >= 6.0, "connections_total {total}");
}
