//! Shared parts of the delivery integration tests (tests/delivery_*.rs): loopback
//! addresses of their own per test, a real NSD serving a zone the test writes
//! (MX records pointing at those addresses), the loadgen sink and Postfix's
//! smtp-sink as next hops, a relay set up to deliver through that DNS, and
//! Python's email package to read DSNs.
//!
//! Every process started here is owned by a guard that kills and reaps it (by
//! pid) on drop. Waiting is polling with a deadline, never a bare sleep.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::queued_id;
use crate::nsd::Nsd;
use crate::process::{bin, loadgen_bin, need_tool, run_with_timeout, text, wait_until, ChildGuard};
use crate::relay::Relay;

// ---------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------

static NEXT_HOST: AtomicU8 = AtomicU8::new(100);

/// A loopback address no other test process uses: 127.a.b.c with a and b from
/// our pid (each test runs in its own process under nextest) and c counting up
/// from 100 (tests/loadgen_sink.rs counts from 2 with the same pid scheme).
pub fn loopback() -> Ipv4Addr {
    let pid = std::process::id();
    let a = 1 + (pid % 254) as u8;
    let b = 1 + ((pid / 254) % 254) as u8;
    let c = NEXT_HOST.fetch_add(1, Ordering::Relaxed);
    assert!(c < 255, "out of loopback addresses");
    Ipv4Addr::new(127, a, b, c)
}

/// `n` fresh loopback addresses.
pub fn loopbacks(n: usize) -> Vec<Ipv4Addr> {
    (0..n).map(|_| loopback()).collect()
}

/// The SMTP port for this test's MX hosts: 25 when it is free on every address
/// (we run as root on loopback addresses of our own), else one free on all.
pub fn mx_port(ips: &[Ipv4Addr]) -> u16 {
    let free_on_all = |port: u16| {
        let held: Vec<TcpListener> = ips
            .iter()
            .filter_map(|ip| TcpListener::bind((*ip, port)).ok())
            .collect();
        held.len() == ips.len()
    };
    if free_on_all(25) {
        return 25;
    }
    for _ in 0..100 {
        let port = TcpListener::bind((ips[0], 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if free_on_all(port) {
            return port;
        }
    }
    panic!("no port free on all of {ips:?}");
}

// ---------------------------------------------------------------------------------
// sluice-loadgen sink
// ---------------------------------------------------------------------------------

/// One message the sink saved: its envelope JSON and exact bytes.
#[derive(Debug, Clone)]
pub struct Saved {
    /// "CORE-SEQ" of the file name.
    pub name: String,
    pub seq: u64,
    pub env: Value,
    pub eml: Vec<u8>,
}

impl Saved {
    pub fn from(&self) -> &str {
        self.env["from"].as_str().unwrap_or("?")
    }
    pub fn rcpts(&self) -> Vec<String> {
        self.env["rcpts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| v.as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
    pub fn token(&self) -> Option<&str> {
        self.env["token"].as_str()
    }
}

/// The tokens `sluice-loadgen send --ack-log` wrote to `acks` (one line per
/// message acknowledged with a 250, token first); unreadable logs add none.
pub fn acked_tokens(acks: &[PathBuf]) -> Vec<String> {
    let mut out = Vec::new();
    for a in acks {
        let text = std::fs::read_to_string(a).unwrap_or_default();
        out.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string),
        );
    }
    out
}

pub struct LoadgenSink {
    guard: ChildGuard,
    pub listen: Vec<SocketAddr>,
    pub stats_addr: SocketAddr,
    pub save_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoadgenSink {
    /// A one-core sink on `listen`, saving every message; `extra` are more
    /// `sink` options (faults, --auth, TLS, delays…).
    pub fn start(listen: &[SocketAddr], extra: &[&str]) -> LoadgenSink {
        let dir = tempfile::tempdir().expect("tempdir");
        let save_dir = dir.path().join("saved");
        let ip = listen[0].ip();
        let stats_port = TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let stats_addr = SocketAddr::new(ip, stats_port);
        let mut cmd = Command::new(loadgen_bin());
        cmd.arg("sink")
            .args(["--cores", "1", "--stats-listen", &stats_addr.to_string()])
            .arg("--save-dir")
            .arg(&save_dir);
        for a in listen {
            cmd.args(["--listen", &a.to_string()]);
        }
        cmd.args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("starting sluice-loadgen sink");
        let mut sink = LoadgenSink {
            guard: ChildGuard::new(child, "sluice-loadgen sink"),
            listen: listen.to_vec(),
            stats_addr,
            save_dir,
            _dir: dir,
        };
        // Ready once the stats endpoint answers (every core has bound by then).
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(sink.guard.is_running(), "sink exited during start-up");
            if sink.try_http("GET", "/stats").is_ok() {
                break;
            }
            assert!(Instant::now() < until, "sink not ready");
            std::thread::sleep(Duration::from_millis(10));
        }
        sink
    }

    fn try_http(&self, method: &str, path: &str) -> std::io::Result<String> {
        http_request(self.stats_addr, method, path, Duration::from_secs(15))
    }

    pub fn stats(&self) -> Value {
        let body = self.try_http("GET", "/stats").expect("sink stats");
        serde_json::from_str(&body).expect("stats JSON")
    }

    pub fn messages(&self) -> u64 {
        self.stats()["messages"].as_u64().unwrap_or(0)
    }

    /// token → count, from GET /tokens.
    pub fn tokens(&self) -> std::collections::BTreeMap<String, u64> {
        let body = self.try_http("GET", "/tokens").expect("sink tokens");
        body.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(t, n)| (t.to_string(), n.trim().parse().unwrap_or(0)))
            .collect()
    }

    /// Saved messages, in the order the sink accepted them (one core: by SEQ).
    pub fn saved(&self) -> Vec<Saved> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.save_dir) else {
            return out;
        };
        for entry in rd.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let env: Value = serde_json::from_slice(&std::fs::read(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let eml = std::fs::read(self.save_dir.join(env["eml"].as_str().unwrap())).unwrap();
            let seq = name
                .rsplit('-')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(u64::MAX);
            out.push(Saved {
                name,
                seq,
                env,
                eml,
            });
        }
        out.sort_by_key(|s| s.seq);
        out
    }

    /// Waits until at least `n` messages are saved; returns them.
    pub fn wait_saved(&self, n: usize, deadline: Duration, relay: &Relay) -> Vec<Saved> {
        let mut got = Vec::new();
        wait_until(
            &format!("{n} message(s) at the sink {:?}", self.listen),
            deadline,
            || {
                got = self.saved();
                got.len() >= n
            },
            || format!("relay log:\n{}", relay.log()),
        );
        got
    }

    pub fn kill(&mut self) {
        self.guard.kill();
    }
}

// ---------------------------------------------------------------------------------
// Postfix smtp-sink
// ---------------------------------------------------------------------------------

pub struct PostfixSink {
    guard: ChildGuard,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl PostfixSink {
    /// smtp-sink on `addr`, dumping each message under its directory; `extra` are
    /// smtp-sink options (-Q CONNECT: 421 greeting; -r CONNECT: 450 greeting…).
    pub fn start(addr: SocketAddr, extra: &[&str]) -> PostfixSink {
        need_tool("smtp-sink", "postfix");
        let dir = tempfile::tempdir().expect("tempdir");
        let template = format!("{}/msg-", dir.path().display());
        let mut cmd = Command::new("smtp-sink");
        cmd.args(["-u", "root", "-d", &template])
            .args(extra)
            .arg(addr.to_string())
            .arg("16")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .expect("smtp-sink (Debian package postfix) must be installed");
        let mut sink = PostfixSink {
            guard: ChildGuard::new(child, "smtp-sink"),
            addr,
            dir,
        };
        // Ready once it answers a connection with any reply line.
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(sink.guard.is_running(), "smtp-sink exited during start-up");
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut b = [0u8; 64];
                if matches!(s.read(&mut b), Ok(n) if n >= 3) {
                    let _ = s.write_all(b"QUIT\r\n");
                    break;
                }
            }
            assert!(Instant::now() < until, "smtp-sink not ready on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        sink
    }

    /// The dump files (smtp-sink's X- headers and Received:, then the message
    /// with LF line ends).
    pub fn dumps(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
            for e in rd.flatten() {
                if let Ok(b) = std::fs::read(e.path()) {
                    out.push(b);
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------
// The relay, delivering through the test's DNS
// ---------------------------------------------------------------------------------

/// A relay that delivers: MX lookups go to `nsd`, MX hosts are dialled on
/// `port`, retries every second unless `extra` says otherwise (later --set wins).
pub fn mx_relay(nsd: &Nsd, port: u16, cores: usize, extra: &[String]) -> Relay {
    let mut b = Relay::builder()
        .cores(cores)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set(nsd.servers_set())
        .set("dns.timeout=\"1s\"")
        .set(format!("delivery.mx_port={port}"))
        .set("delivery.connect_timeout=\"5s\"")
        .set("queue.default.retry=[\"1s\"]");
    for e in extra {
        b = b.set(e.clone());
    }
    b.start()
}

/// MAIL (with `mail_params`), RCPTs, DATA of `body` (already dot-stuffed,
/// CRLF-terminated), QUIT; returns the queued id.
pub fn submit(relay: &Relay, from: &str, mail_params: &str, rcpts: &[&str], body: &[u8]) -> String {
    let mut c = relay.session();
    let sp = if mail_params.is_empty() { "" } else { " " };
    c.expect(&format!("MAIL FROM:<{from}>{sp}{mail_params}"), 250);
    for r in rcpts {
        c.expect(&format!("RCPT TO:<{r}>"), 250);
    }
    c.expect("DATA", 354);
    c.send(body);
    c.send(b".\r\n");
    let r = c.read_reply();
    assert_eq!(r.code, 250, "end of data: {r:?}");
    let id = queued_id(&r.text()).unwrap_or_else(|| panic!("no id in {r:?}"));
    c.send_line("QUIT");
    id
}

/// The relay's JSON log records (log.format="json") whose message is `message`.
pub fn log_events(relay: &Relay, message: &str) -> Vec<Value> {
    relay
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

/// The "delivery attempt" records for queue id `id`, in log order.
pub fn attempts(relay: &Relay, id: &str) -> Vec<Value> {
    log_events(relay, "delivery attempt")
        .into_iter()
        .filter(|v| v["id"] == id)
        .collect()
}

/// The "connection attempt failed" records naming address `ip`.
pub fn failed_connections(relay: &Relay, ip: &str) -> Vec<Value> {
    log_events(relay, "connection attempt failed")
        .into_iter()
        .filter(|v| v["ip"] == ip)
        .collect()
}

/// A string field of a log record ("" when absent).
pub fn field<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

// ---------------------------------------------------------------------------------
// DSNs through Python's email package
// ---------------------------------------------------------------------------------

const DSN_PY: &str = r#"
import sys, json, email
from email import policy
raw = open(sys.argv[1], 'rb').read()
m = email.message_from_bytes(raw, policy=policy.default)
out = {
    "content_type": m.get_content_type(),
    "report_type": m.get_param('report-type'),
    "defects": [type(d).__name__ for d in m.defects],
    "from": str(m.get('From', '')),
    "to": str(m.get('To', '')),
    "subject": str(m.get('Subject', '')),
    "auto_submitted": str(m.get('Auto-Submitted', '')),
    "parts": [p.get_content_type() for p in m.iter_parts()] if m.is_multipart() else [],
    "per_message": {},
    "recipients": [],
    "returned": "",
}
for p in m.walk():
    out["defects"] += [type(d).__name__ for d in p.defects]
    ct = p.get_content_type()
    if ct == 'message/delivery-status':
        blocks = p.get_payload()
        out["per_message"] = {k.lower(): str(v) for k, v in blocks[0].items()}
        for b in blocks[1:]:
            out["recipients"].append({k.lower(): str(v) for k, v in b.items()})
    elif ct == 'message/rfc822':
        inner = p.get_payload()[0]
        out["returned"] = inner.as_string()
    elif ct == 'text/rfc822-headers':
        out["returned"] = p.get_content()
print(json.dumps(out))
"#;

/// Parses `raw` (a DSN as the sink saved it) with Python's email package; returns
/// what it found (content type, report type, per-message and per-recipient fields,
/// the returned content).
pub fn parse_dsn(raw: &[u8]) -> Value {
    need_tool("python3", "python3");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dsn.eml");
    std::fs::write(&path, raw).unwrap();
    let out = run_with_timeout(
        Command::new("python3").arg("-c").arg(DSN_PY).arg(&path),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "python could not parse the DSN: {}\n{}",
        text(&out.stderr),
        text(raw)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("python printed {:?}: {e}", text(&out.stdout));
    })
}

/// Checks `dsn` is a valid RFC 3464 failure report for exactly `rcpts` with
/// statuses starting with `status_prefix`; returns the parsed view.
pub fn assert_failure_dsn(raw: &[u8], rcpts: &[&str], status_prefix: &str) -> Value {
    let v = parse_dsn(raw);
    let show = || format!("{v:#}\n--- raw ---\n{}", text(raw));
    assert_eq!(v["content_type"], "multipart/report", "{}", show());
    assert_eq!(v["report_type"], "delivery-status", "{}", show());
    assert!(
        v["defects"].as_array().unwrap().is_empty(),
        "MIME defects: {}",
        show()
    );
    let parts: Vec<&str> = v["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(parts.len() >= 2, "{}", show());
    assert_eq!(parts[0], "text/plain", "{}", show());
    assert_eq!(parts[1], "message/delivery-status", "{}", show());
    assert!(
        v["per_message"]["reporting-mta"]
            .as_str()
            .is_some_and(|s| s.starts_with("dns;")),
        "{}",
        show()
    );
    let recipients = v["recipients"].as_array().unwrap();
    assert_eq!(recipients.len(), rcpts.len(), "{}", show());
    for (r, want) in recipients.iter().zip(rcpts) {
        let fr = r["final-recipient"].as_str().unwrap_or("");
        assert_eq!(
            fr.replace(' ', "").to_ascii_lowercase(),
            format!("rfc822;{}", want.to_ascii_lowercase()),
            "{}",
            show()
        );
        assert_eq!(r["action"], "failed", "{}", show());
        let status = r["status"].as_str().unwrap_or("");
        assert!(
            status.starts_with(status_prefix),
            "status {status:?}, want {status_prefix}…: {}",
            show()
        );
    }
    v
}

/// `sluice queue show ID --offline`, or None once the message has left the spool.
pub fn try_show(relay: &Relay, id: &str) -> Option<String> {
    let out = run_with_timeout(
        Command::new(bin())
            .args(["queue", "show", id, "--offline", "--set"])
            .arg(format!("spool.path={}", relay.spool_path().display())),
        Duration::from_secs(30),
    );
    out.status.success().then(|| text(&out.stdout))
}

/// The `recipient:` lines of `queue show`.
pub fn recipient_lines(show: &str) -> Vec<String> {
    show.lines()
        .filter(|l| l.starts_with("recipient:"))
        .map(str::to_string)
        .collect()
}

/// Attempts recorded for a deferred recipient line ("deferred (N attempts)").
pub fn deferred_attempts(line: &str) -> Option<u32> {
    let at = line.find("deferred (")? + "deferred (".len();
    line[at..].split(' ').next()?.parse().ok()
}

/// LF line ends (for comparing with smtp-sink's dumps).
pub fn to_lf(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\r' && b.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Every bare CR and bare LF made a CRLF (what must go on the wire).
pub fn to_crlf(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len() + 16);
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\r' if b.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 2;
            }
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Dot-stuffs CRLF-terminated message bytes for DATA (without the final dot).
pub fn dot_stuff(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len() + 16);
    let mut start = true;
    for &c in b {
        if start && c == b'.' {
            out.push(b'.');
        }
        out.push(c);
        start = c == b'\n';
    }
    out
}

/// Panics at the first bare CR or bare LF.
pub fn assert_crlf_only(b: &[u8]) {
    for i in 0..b.len() {
        if b[i] == b'\r' {
            assert!(
                b.get(i + 1) == Some(&b'\n'),
                "bare CR at {i}: {:?}",
                text(b)
            );
        }
        if b[i] == b'\n' {
            assert!(i > 0 && b[i - 1] == b'\r', "bare LF at {i}: {:?}", text(b));
        }
    }
}

/// Ids of the messages in the relay's spool (`queue list --json --offline`).
pub fn spool_ids(relay: &Relay) -> Vec<String> {
    relay.list().into_iter().map(|m| m.id).collect()
}

/// One HTTP/1.0 request (to a sink's stats listener, the relay's operations
/// listener); the body of a 200 answer.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    read_timeout: Duration,
) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(read_timeout))?;
    write!(s, "{method} {path} HTTP/1.0\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
    if head.split(' ').nth(1) != Some("200") {
        return Err(std::io::Error::other(format!("HTTP: {head}")));
    }
    Ok(body.to_string())
}
