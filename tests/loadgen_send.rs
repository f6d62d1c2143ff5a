//! `sluice-loadgen send` against `sluice-loadgen sink`, both as real processes on
//! loopback addresses of their own: counts and tokens agree with the ack log,
//! domain skew, CHUNKING, STARTTLS and AUTH, open-loop pacing, error counts under
//! fault injection. Readiness is polled; every child is killed and reaped by a
//! guard on drop.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_testkit::{run_with_timeout, ChildGuard, PostfixSink};

const BIN: &str = env!("CARGO_BIN_EXE_sluice-loadgen");
const DEADLINE: Duration = Duration::from_secs(30);
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

static NEXT_HOST: AtomicU8 = AtomicU8::new(2);

/// A loopback address no other test process uses: 127.a.b.c from our pid (the
/// third octet is offset from the one tests/loadgen_sink.rs uses).
fn loopback() -> IpAddr {
    let pid = std::process::id();
    let a = 1 + (pid % 254) as u8;
    let b = 1 + ((pid / 254) % 254) as u8;
    let c = 128 + NEXT_HOST.fetch_add(1, Ordering::Relaxed);
    IpAddr::V4(Ipv4Addr::new(127, a, b, c))
}

fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Sink {
    guard: ChildGuard,
    addr: SocketAddr,
    stats: SocketAddr,
}

impl Sink {
    fn start(extra: &[&str]) -> Sink {
        let ip = loopback();
        let addr = SocketAddr::new(ip, free_port(ip));
        let stats = SocketAddr::new(ip, free_port(ip));
        let child = Command::new(BIN)
            .args(["sink", "--cores", "2", "--report-tokens"])
            .args(["--listen", &addr.to_string()])
            .args(["--stats-listen", &stats.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting sluice-loadgen sink");
        let mut sink = Sink {
            guard: ChildGuard::new(child, "sluice-loadgen sink"),
            addr,
            stats,
        };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = sink.guard.child.as_mut().unwrap().try_wait() {
                panic!("sink exited during start-up: {status}");
            }
            if sink.try_stats().is_ok() {
                return sink;
            }
            assert!(start.elapsed() < DEADLINE, "sink not ready");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn try_stats(&self) -> std::io::Result<Value> {
        let mut s = TcpStream::connect_timeout(&self.stats, Duration::from_secs(2))?;
        s.set_read_timeout(Some(DEADLINE))?;
        write!(s, "GET /stats HTTP/1.0\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let (head, body) = resp
            .split_once("\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("no header end"))?;
        if !head.starts_with("HTTP/1.0 200") {
            return Err(std::io::Error::other(head.to_string()));
        }
        serde_json::from_str(body).map_err(std::io::Error::other)
    }

    /// Stats once the sink's cores have merged (the endpoint asks them to).
    fn stats(&self) -> Value {
        self.try_stats().expect("sink stats")
    }
}

/// Runs `send --json --target SINK ARGS…` to completion (killed after RUN_TIMEOUT);
/// returns its summary and how long it took.
fn send(sink: &Sink, args: &[&str]) -> (Value, Duration) {
    let started = Instant::now();
    let output = run_with_timeout(
        Command::new(BIN)
            .args(["send", "--json", "--target", &sink.addr.to_string()])
            .args(args),
        RUN_TIMEOUT,
    );
    let elapsed = started.elapsed();
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr);
    let v: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("send printed {out:?} ({e}); stderr {err}"));
    let status = output.status;
    assert!(status.success(), "send failed: {status}; {v}; stderr {err}");
    (v, elapsed)
}

/// The ack log: token → queue id.
fn ack_log(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let (t, id) = l.split_once(' ').expect("TOKEN ID");
            (t.to_string(), id.to_string())
        })
        .collect()
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn sink_tokens(stats: &Value) -> BTreeMap<String, u64> {
    stats["tokens"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), n(v)))
        .collect()
}

#[test]
fn ack_log_tokens_and_counts_agree_and_are_unique_across_runs() {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let mut all = BTreeSet::new();
    for run in 0..2 {
        let log = dir.path().join(format!("acks-{run}"));
        let (s, _) = send(
            &sink,
            &[
                "--run-id",
                "auto",
                "--cores",
                "2",
                "--connections",
                "6",
                "--messages",
                "301",
                "--per-connection",
                "7",
                "--recipients",
                "2",
                "--ack-log",
                log.to_str().unwrap(),
            ],
        );
        assert_eq!(n(&s["accepted"]), 301, "{s}");
        assert_eq!(n(&s["attempted"]), 301, "{s}");
        assert_eq!(n(&s["rejected"]) + n(&s["failed"]), 0, "{s}");
        assert_eq!(s["cores"], 2);
        assert_eq!(n(&s["bytes"]), 301 * 1024);
        assert!(s["txn_ms"]["p99"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["eod_to_250_ms"]["max"].as_f64().unwrap() > 0.0, "{s}");
        let run_id = s["run_id"].as_str().expect("run id").to_string();
        let acks = ack_log(&log);
        assert_eq!(acks.len(), 301);
        for (token, id) in &acks {
            assert!(token.starts_with(&format!("lg-{run_id}-")), "{token}");
            assert_eq!(id, "-", "the sink's 250 carries no queue id");
            assert!(all.insert(token.clone()), "token {token} acked twice");
        }
    }
    assert_eq!(all.len(), 602, "tokens unique across the two runs");
    let st = sink.stats();
    assert_eq!(n(&st["messages"]), 602, "{st}");
    assert_eq!(n(&st["recipients"]), 1204);
    assert_eq!(n(&st["max_messages_per_connection"]), 7);
    assert_eq!(n(&st["tokens_duplicated"]), 0);
    let seen = sink_tokens(&st);
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        all,
        "acked and received tokens differ"
    );
}

#[test]
fn zipf_domains_favour_d0() {
    let sink = Sink::start(&[]);
    let (s, _) = send(
        &sink,
        &[
            "--messages",
            "600",
            "--connections",
            "4",
            "--domains",
            "5",
            "--domain-dist",
            "zipf:1.2",
            "--seed",
            "7",
        ],
    );
    assert_eq!(n(&s["accepted"]), 600, "{s}");
    let st = sink.stats();
    let d = &st["domains"];
    let counts: Vec<u64> = (0..5).map(|i| n(&d[format!("d{i}.example")])).collect();
    assert_eq!(counts.iter().sum::<u64>(), 600, "{st}");
    assert!(
        counts[1..].iter().all(|c| *c < counts[0]),
        "d0 gets the most: {counts:?}"
    );
    assert!(counts[0] > counts[4] * 2, "skewed: {counts:?}");
    for (i, count) in counts.iter().enumerate() {
        let name = format!("d{i}.example");
        assert_eq!(n(&s["accepted_per_domain"][&name]), *count, "{s}");
    }

    // Uniform rotates: five recipients cover the five domains exactly.
    let sink = Sink::start(&[]);
    let (s, _) = send(
        &sink,
        &[
            "--messages",
            "50",
            "--connections",
            "2",
            "--recipients",
            "5",
            "--domains",
            "5",
        ],
    );
    assert_eq!(n(&s["accepted"]), 50, "{s}");
    let st = sink.stats();
    for i in 0..5 {
        assert_eq!(n(&st["domains"][format!("d{i}.example")]), 50, "{st}");
    }
}

fn self_signed(dir: &Path) -> (String, String) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=sink.loadgen.invalid", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        cert.to_str().unwrap().to_string(),
        key.to_str().unwrap().to_string(),
    )
}

#[test]
fn chunking_starttls_and_auth_against_the_sink() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let sink = Sink::start(&["--tls-cert", &cert, "--tls-key", &key, "--auth"]);

    // CHUNKING, pipelined, varied sizes.
    let (s, _) = send(
        &sink,
        &[
            "--chunking",
            "--messages",
            "100",
            "--connections",
            "3",
            "--size-dist",
            "uniform:200:30000",
        ],
    );
    assert_eq!(n(&s["accepted"]), 100, "{s}");
    let st = sink.stats();
    assert_eq!(n(&st["bdat_messages"]), 100, "{st}");
    assert_eq!(n(&st["bytes"]), n(&s["bytes"]), "{st} {s}");

    // STARTTLS + AUTH PLAIN, one round trip per command, reconnecting.
    let (s, _) = send(
        &sink,
        &[
            "--starttls",
            "--auth",
            "user:secret",
            "--no-pipelining",
            "--messages",
            "60",
            "--connections",
            "3",
            "--per-connection",
            "10",
            "--size-dist",
            "1000,5000",
        ],
    );
    assert_eq!(n(&s["accepted"]), 60, "{s}");
    assert_eq!(n(&s["connects"]), 6, "{s}");
    let st = sink.stats();
    assert_eq!(n(&st["tls_sessions"]), 6, "{st}");
    assert_eq!(n(&st["messages"]), 160);

    // All of it at once: STARTTLS, AUTH, CHUNKING without pipelining.
    let (s, _) = send(
        &sink,
        &[
            "--starttls",
            "--auth",
            "u:p",
            "--chunking",
            "--no-pipelining",
            "--messages",
            "20",
            "--connections",
            "2",
        ],
    );
    assert_eq!(n(&s["accepted"]), 20, "{s}");
    assert_eq!(n(&sink.stats()["bdat_messages"]), 120);
}

#[test]
fn rate_paces_an_open_loop() {
    let sink = Sink::start(&[]);
    let (s, took) = send(
        &sink,
        &["--rate", "100", "--messages", "200", "--connections", "4"],
    );
    assert_eq!(n(&s["accepted"]), 200, "{s}");
    assert!(
        took >= Duration::from_millis(1800),
        "200 at 100/s in {took:?}"
    );
    assert!(s["seconds"].as_f64().unwrap() >= 1.8, "{s}");
    assert_eq!(s["rate"].as_f64(), Some(100.0));

    // With --duration the count is open: it stops in time.
    let (s, took) = send(&sink, &["--duration", "1s", "--connections", "2"]);
    assert!(n(&s["accepted"]) > 0, "{s}");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert_eq!(n(&sink.stats()["messages"]), 200 + n(&s["accepted"]));
}

#[test]
fn error_counts_by_reply_code_with_fault_injection() {
    let sink = Sink::start(&[
        "--seed",
        "3",
        "--fault",
        "at=rcpt,code=550,share=20%",
        "--fault",
        "at=data,code=451,share=20%",
        "--fault",
        "at=mid-data,share=5%",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("acks");
    let (s, _) = send(
        &sink,
        &[
            "--messages",
            "400",
            "--connections",
            "4",
            "--ack-log",
            log.to_str().unwrap(),
        ],
    );
    let codes = &s["errors_by_code"];
    assert!(n(&codes["550"]) > 0, "{s}");
    assert!(n(&codes["451"]) > 0, "{s}");
    assert!(n(&s["failed"]) > 0, "mid-data disconnects: {s}");
    assert!(n(&s["connection_errors"]) >= n(&s["failed"]), "{s}");
    assert_eq!(
        n(&s["accepted"]) + n(&s["rejected"]) + n(&s["failed"]),
        400,
        "{s}"
    );
    assert_eq!(n(&s["attempted"]), 400);
    let accepted = n(&s["accepted"]);
    assert!(accepted > 100 && accepted < 400, "{s}");
    let st = sink.stats();
    assert_eq!(n(&st["messages"]), accepted, "{st}");
    assert_eq!(n(&st["rcpt_rejected"]["550"]), n(&codes["550"]), "{st}");
    assert_eq!(n(&st["data_rejected"]["451"]), n(&codes["451"]), "{st}");
    let acks: BTreeSet<String> = ack_log(&log).into_iter().map(|(t, _)| t).collect();
    assert_eq!(acks.len() as u64, accepted);
    let seen: BTreeSet<String> = sink_tokens(&st).into_keys().collect();
    assert_eq!(acks, seen, "acked tokens are the ones the sink counted");
}

/// `send` checked by a sink nobody here wrote: Postfix's smtp-sink dumps every
/// message it accepts; the dumps hold exactly the tokens send reports as accepted.
#[test]
fn send_against_postfix_smtp_sink() {
    let ip = loopback();
    let port = free_port(ip);
    let sink = PostfixSink::start(SocketAddr::new(ip, port), &[]);
    let dir = tempfile::tempdir().unwrap();
    let acks = dir.path().join("acks.txt");
    let output = run_with_timeout(
        Command::new(BIN)
            .args(["send", "--json", "--target", &format!("{ip}:{port}")])
            .args([
                "--messages",
                "120",
                "--connections",
                "4",
                "--recipients",
                "2",
                "--run-id",
                "auto",
            ])
            .arg("--ack-log")
            .arg(&acks),
        RUN_TIMEOUT,
    );
    let summary: Value = serde_json::from_slice(&output.stdout).expect("JSON summary");
    assert_eq!(n(&summary["accepted"]), 120, "{summary}");
    let acked: BTreeSet<String> = ack_log(&acks).into_iter().map(|(t, _)| t).collect();
    assert_eq!(acked.len(), 120);
    // smtp-sink writes each dump when it answers the final dot, so all are there.
    let mut seen = BTreeMap::new();
    for dump in sink.dumps() {
        let text = String::from_utf8_lossy(&dump);
        let token = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("Message-ID: <")
                    .or_else(|| l.strip_prefix("Message-Id: <"))
            })
            .and_then(|rest| rest.split('@').next())
            .unwrap_or("?")
            .to_string();
        *seen.entry(token).or_insert(0u32) += 1;
    }
    let seen_tokens: BTreeSet<String> = seen.keys().cloned().collect();
    assert_eq!(seen_tokens, acked, "tokens at smtp-sink vs send's ack log");
    assert!(
        seen.values().all(|&c| c == 1),
        "a token arrived twice: {seen:?}"
    );
}
