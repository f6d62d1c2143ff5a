//! `sluice-loadgen sink` run as a real process and checked with clients we wrote
//! (`sluice-loadgen send`, raw sockets) and clients we did not (swaks, Python
//! smtplib, Postfix's smtp-source).
//!
//! Every test gets loopback addresses of its own (127.a.b.c), so parallel tests
//! never share an SO_REUSEPORT group, and nothing here uses port 25 of 127.0.0.1.
//! Readiness is polled (the stats endpoint answers once every core has bound its
//! sockets); every process started is killed and reaped by a guard on drop.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_testkit::{http_request, make_cert, run_with_timeout, ChildGuard};

const BIN: &str = env!("CARGO_BIN_EXE_sluice-loadgen");
const DEADLINE: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------

static NEXT_HOST: AtomicU8 = AtomicU8::new(2);

/// A loopback address no other test process uses: 127.a.b.c from our pid.
fn loopback() -> IpAddr {
    let pid = std::process::id();
    let a = 1 + (pid % 254) as u8;
    let b = 1 + ((pid / 254) % 254) as u8;
    let c = NEXT_HOST.fetch_add(1, Ordering::Relaxed);
    IpAddr::V4(Ipv4Addr::new(127, a, b, c))
}

/// A port free on every one of these addresses.
fn free_port(ips: &[IpAddr]) -> u16 {
    for _ in 0..100 {
        let port = TcpListener::bind((ips[0], 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if ips[1..]
            .iter()
            .all(|ip| TcpListener::bind((*ip, port)).is_ok())
        {
            return port;
        }
    }
    panic!("no common free port on {ips:?}");
}

/// `n` listen addresses on one port (several "MX hosts").
fn addrs(n: usize) -> Vec<SocketAddr> {
    let ips: Vec<IpAddr> = (0..n).map(|_| loopback()).collect();
    let port = free_port(&ips);
    ips.into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

// ---------------------------------------------------------------------------------
// The sink process
// ---------------------------------------------------------------------------------

struct Sink {
    guard: ChildGuard,
    listen: Vec<SocketAddr>,
    stats: SocketAddr,
}

impl Sink {
    fn start(listen: &[SocketAddr], extra: &[&str]) -> Sink {
        let stats = SocketAddr::new(listen[0].ip(), free_port(&[listen[0].ip()]));
        let mut cmd = Command::new(BIN);
        cmd.arg("sink")
            .args(["--cores", "2", "--stats-listen", &stats.to_string()]);
        for a in listen {
            cmd.args(["--listen", &a.to_string()]);
        }
        cmd.args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("starting sluice-loadgen sink");
        let mut sink = Sink {
            guard: ChildGuard::new(child, "sluice-loadgen sink"),
            listen: listen.to_vec(),
            stats,
        };
        let start = Instant::now();
        loop {
            assert!(sink.guard.is_running(), "sink exited during start-up");
            if sink.try_http("GET", "/stats").is_ok() {
                return sink;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "sink not ready after {DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn addr(&self) -> SocketAddr {
        self.listen[0]
    }

    fn pid(&self) -> u32 {
        self.guard.pid()
    }

    fn try_http(&self, method: &str, path: &str) -> std::io::Result<String> {
        http_request(self.stats, method, path, IO_TIMEOUT)
    }

    fn http(&self, method: &str, path: &str) -> String {
        self.try_http(method, path).expect("stats endpoint")
    }

    fn stats(&self) -> Value {
        serde_json::from_str(&self.http("GET", "/stats")).expect("stats JSON")
    }

    /// Polls the stats until `f` holds (for effects that follow a client's close).
    fn wait_for(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let s = self.stats();
            if f(&s) {
                return s;
            }
            assert!(start.elapsed() < DEADLINE, "{what}: not reached; stats {s}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM; returns the JSON summary printed on stdout (the exit must be 0).
    fn terminate(mut self) -> Value {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let mut stdout = self.guard.take_stdout();
        let Some(status) = self.guard.wait_timeout(DEADLINE) else {
            panic!("sink did not exit after SIGTERM");
        };
        let mut out = String::new();
        stdout.read_to_string(&mut out).expect("sink stdout");
        assert!(status.success(), "sink exit status {status}; stdout {out}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("summary {out:?}: {e}"))
    }
}

/// Runs a short-lived command to completion (killed past two minutes).
fn run(cmd: &mut Command) -> Output {
    run_with_timeout(cmd.stdin(Stdio::null()), Duration::from_secs(120))
}

/// `sluice-loadgen send … --json`; returns its summary.
fn send(target: SocketAddr, args: &[&str]) -> Value {
    let out = run(Command::new(BIN)
        .args(["send", "--json", "--target", &target.to_string()])
        .args(args));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "send output {stdout:?} ({e}); stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The tokens `send` uses: lg-WORKER-N, messages split evenly over the workers.
fn send_tokens(messages: u64, connections: u64) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for i in 0..connections {
        let share = messages / connections + u64::from(i < messages % connections);
        for n in 0..share {
            set.insert(format!("lg-{i}-{n}"));
        }
    }
    set
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

// ---------------------------------------------------------------------------------
// A raw SMTP client
// ---------------------------------------------------------------------------------

struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let mut c = Client::connect_silent(addr);
        let (code, text) = c.reply();
        assert_eq!(code, 220, "greeting {text}");
        c
    }

    fn connect_silent(addr: SocketAddr) -> Client {
        let w = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        w.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        Client {
            r: BufReader::new(w.try_clone().unwrap()),
            w,
        }
    }

    /// One (possibly multi-line) reply.
    fn reply(&mut self) -> (u16, String) {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = self.r.read_line(&mut line).expect("reading a reply");
            assert!(n > 0, "connection closed; replies so far {all:?}");
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return (line[..3].parse().expect("reply code"), all);
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
    }

    fn cmd(&mut self, line: &str) -> (u16, String) {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    fn expect(&mut self, line: &str, code: u16) -> String {
        let (c, text) = self.cmd(line);
        assert_eq!(c, code, "{line} → {text}");
        text
    }

    /// The server closed the connection without a further reply.
    fn expect_closed(&mut self) {
        let mut rest = Vec::new();
        match self.r.read_to_end(&mut rest) {
            Ok(_) => assert!(
                rest.is_empty(),
                "unexpected bytes {:?}",
                String::from_utf8_lossy(&rest)
            ),
            Err(e) => assert!(
                matches!(e.kind(), std::io::ErrorKind::ConnectionReset),
                "expected a close, got {e}"
            ),
        }
    }

    /// A whole transaction with DATA; returns the end-of-data reply.
    fn message(&mut self, from: &str, rcpts: &[&str], body: &str) -> (u16, String) {
        self.expect(&format!("MAIL FROM:<{from}>"), 250);
        for r in rcpts {
            self.expect(&format!("RCPT TO:<{r}>"), 250);
        }
        self.expect("DATA", 354);
        self.send(body.as_bytes());
        self.send(b".\r\n");
        self.reply()
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("loadgen-sink")
        .tempdir()
        .unwrap()
}

/// Saved messages by token: (envelope, bytes).
fn saved(dir: &Path) -> BTreeMap<String, (Value, Vec<u8>)> {
    let mut map = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let env: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let eml = std::fs::read(dir.join(env["eml"].as_str().unwrap())).unwrap();
        map.insert(env["token"].as_str().unwrap_or("").to_string(), (env, eml));
    }
    map
}

// ---------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------

#[test]
fn send_and_sink_agree_on_counts_and_tokens() {
    let listen = addrs(2);
    let sink = Sink::start(&listen, &["--report-tokens"]);
    let (messages, connections) = (1500u64, 8u64);
    let sent = send(
        listen[0],
        &[
            "--messages",
            &messages.to_string(),
            "--connections",
            &connections.to_string(),
            "--recipients",
            "2",
            "--domain",
            "dest.example",
        ],
    );
    assert_eq!(sent["accepted"], messages, "{sent}");
    assert_eq!(sent["rejected"], 0);
    assert_eq!(sent["worker_errors"].as_array().unwrap().len(), 0);

    // One more through the second "MX host", with a token of our own.
    let mut c = Client::connect(listen[1]);
    c.expect("EHLO raw.example", 250);
    let (code, _) = c.message(
        "s@raw.example",
        &["x@Other.Example"],
        "Message-ID: <raw-1@loadgen>\r\nSubject: raw\r\n\r\nhello\r\n",
    );
    assert_eq!(code, 250);
    c.expect("QUIT", 221);

    let s = sink.wait_for("sessions closed", |s| s["sessions_current"] == 0);
    assert_eq!(s["messages"], messages + 1, "{s}");
    assert_eq!(s["recipients"], 2 * messages + 1);
    assert_eq!(s["connections"], connections + 1);
    assert_eq!(s["domains"]["dest.example"], 2 * messages);
    assert_eq!(s["domains"]["other.example"], 1);
    assert_eq!(s["listeners"][listen[0].to_string()], messages);
    assert_eq!(s["listeners"][listen[1].to_string()], 1);
    let mut expected = send_tokens(messages, connections);
    expected.insert("raw-1".into());
    let tokens = s["tokens"].as_object().unwrap();
    let seen: BTreeSet<String> = tokens.keys().cloned().collect();
    assert_eq!(seen, expected, "tokens sent and seen differ");
    assert!(tokens.values().all(|v| v == 1), "a token arrived twice");
    assert_eq!(s["tokens_duplicated"], 0);
    assert_eq!(s["messages_without_token"], 0);
    assert!(n(&s["bytes"]) >= messages * 1024, "{s}");
    assert!((1..=connections + 1).contains(&n(&s["sessions_max"])));

    let fin = sink.terminate();
    assert_eq!(fin["messages"], messages + 1);
    assert_eq!(
        fin["tokens"].as_object().unwrap().len() as u64,
        messages + 1
    );
    assert_eq!(fin["bytes"], s["bytes"]);
}

#[test]
fn fault_shares_land_within_tolerance() {
    let listen = addrs(1);
    let sink = Sink::start(
        &listen,
        &[
            "--fault",
            "at=rcpt,code=451,share=20%",
            "--fault",
            "at=data,code=554,share=10%",
        ],
    );
    let total = 500u64;
    let sent = send(sink.addr(), &["--messages", "500", "--connections", "4"]);
    let s = sink.stats();
    let r451 = n(&s["rcpt_rejected"]["451"]);
    let d554 = n(&s["data_rejected"]["554"]);
    let share451 = r451 as f64 / total as f64;
    assert!(
        (share451 - 0.20).abs() <= 0.08,
        "451 at RCPT: {r451}/{total}; {s}"
    );
    let share554 = d554 as f64 / (total - r451) as f64;
    assert!(
        (share554 - 0.10).abs() <= 0.08,
        "554 at end of data: {d554}/{}; {s}",
        total - r451
    );
    // Every message is accounted for, on both sides.
    assert_eq!(n(&s["messages"]) + r451 + d554, total, "{s}");
    assert_eq!(sent["accepted"], s["messages"], "{sent} vs {s}");
    assert_eq!(n(&sent["accepted"]) + n(&sent["rejected"]), total);
}

#[test]
fn faults_by_domain_and_prefix() {
    let listen = addrs(1);
    let sink = Sink::start(
        &listen,
        &[
            "--fault",
            "at=rcpt,code=550,share=100%,domain=bad.example,esc=5.1.1,text=No such user",
            "--fault",
            "at=rcpt,code=452,share=1,prefix=full-",
            "--fault",
            "at=data,code=451,share=100%,domain=slow.example",
            "--fault",
            "at=rcpt,code=421,share=1,prefix=bye",
        ],
    );
    let mut c = Client::connect(sink.addr());
    c.expect("EHLO t.example", 250);
    c.expect("MAIL FROM:<s@t.example>", 250);
    let text = c.expect("RCPT TO:<x@BAD.example>", 550);
    assert!(text.starts_with("550 5.1.1 No such user"), "{text}");
    c.expect("RCPT TO:<full-1@good.example>", 452);
    c.expect("RCPT TO:<ok@good.example>", 250);
    c.expect("DATA", 354);
    c.send(b"Message-ID: <f-1@loadgen>\r\n\r\nbody\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    // End of data refused when a recipient is in the slow domain.
    c.expect("MAIL FROM:<s@t.example>", 250);
    c.expect("RCPT TO:<a@slow.example>", 250);
    c.expect("DATA", 354);
    c.send(b"Message-ID: <f-2@loadgen>\r\n\r\nbody\r\n.\r\n");
    assert_eq!(c.reply().0, 451);
    // 421 closes the session.
    c.expect("MAIL FROM:<s@t.example>", 250);
    c.expect("RCPT TO:<bye@good.example>", 421);
    c.expect_closed();
    let s = sink.stats();
    assert_eq!(s["messages"], 1, "{s}");
    assert_eq!(s["rcpt_rejected"]["550"], 1);
    assert_eq!(s["rcpt_rejected"]["452"], 1);
    assert_eq!(s["rcpt_rejected"]["421"], 1);
    assert_eq!(s["data_rejected"]["451"], 1);
    assert_eq!(s["domains"]["good.example"], 1);
}

#[test]
fn greylisting_refuses_the_first_attempt_only() {
    let listen = addrs(1);
    let sink = Sink::start(&listen, &["--greylist"]);
    let mut c = Client::connect(sink.addr());
    c.expect("EHLO t.example", 250);
    c.expect("MAIL FROM:<s@t.example>", 250);
    let text = c.expect("RCPT TO:<r@grey.example>", 451);
    assert!(text.starts_with("451 4.7.1 "), "{text}");
    c.expect("RCPT TO:<r@grey.example>", 250);
    c.expect("QUIT", 221);

    // With send: the first run is refused entirely, the identical retry accepted.
    let first = send(sink.addr(), &["--messages", "40", "--connections", "4"]);
    assert_eq!(
        (first["accepted"].clone(), first["rejected"].clone()),
        (0.into(), 40.into()),
        "{first}"
    );
    let again = send(sink.addr(), &["--messages", "40", "--connections", "4"]);
    assert_eq!(
        (again["accepted"].clone(), again["rejected"].clone()),
        (40.into(), 0.into()),
        "{again}"
    );
    let s = sink.stats();
    assert_eq!(s["greylisted"], 41, "{s}");
    assert_eq!(s["rcpt_rejected"]["451"], 41);
    assert_eq!(s["messages"], 40);
    assert_eq!(s["tokens_unique"], 40);
    assert_eq!(s["tokens_duplicated"], 0);
}

#[test]
fn disconnects_mid_data_and_at_end_of_data() {
    let listen = addrs(1);
    let sink = Sink::start(
        &listen,
        &[
            "--fault",
            "at=mid-data,share=100%,domain=cut.example",
            "--fault",
            "at=data,disconnect,share=100%,domain=eod.example",
        ],
    );
    // Unaffected domain first.
    let mut c = Client::connect(sink.addr());
    c.expect("EHLO t.example", 250);
    assert_eq!(
        c.message(
            "s@t.example",
            &["a@fine.example"],
            "Subject: ok\r\n\r\nok\r\n"
        )
        .0,
        250
    );
    // Mid-DATA: the connection drops while the body arrives, with no reply.
    c.expect("MAIL FROM:<s@t.example>", 250);
    c.expect("RCPT TO:<a@cut.example>", 250);
    c.expect("DATA", 354);
    c.send(b"Subject: cut\r\n\r\nfirst part of the body\r\n");
    c.expect_closed();
    // BDAT is cut the same way.
    let mut c = Client::connect(sink.addr());
    c.expect("EHLO t.example", 250);
    c.expect("MAIL FROM:<s@t.example>", 250);
    c.expect("RCPT TO:<b@cut.example>", 250);
    c.send(b"BDAT 100 LAST\r\nSubject: cut\r\n");
    c.expect_closed();
    // At end of data: the whole message arrives, then the connection drops.
    let mut c = Client::connect(sink.addr());
    c.expect("EHLO t.example", 250);
    c.expect("MAIL FROM:<s@t.example>", 250);
    c.expect("RCPT TO:<a@eod.example>", 250);
    c.expect("DATA", 354);
    c.send(b"Subject: eod\r\n\r\nbody\r\n.\r\n");
    c.expect_closed();
    let s = sink.wait_for("sessions closed", |s| s["sessions_current"] == 0);
    assert_eq!(s["disconnects"]["mid_data"], 2, "{s}");
    assert_eq!(s["disconnects"]["data"], 1);
    assert_eq!(s["messages"], 1);
}

#[test]
fn concurrent_sessions_and_messages_per_connection() {
    let listen = addrs(1);
    let sink = Sink::start(&listen, &[]);
    let mut clients: Vec<Client> = (0..7).map(|_| Client::connect(sink.addr())).collect();
    let s = sink.stats();
    assert_eq!(
        (s["sessions_current"].clone(), s["sessions_max"].clone()),
        (7.into(), 7.into()),
        "{s}"
    );
    for c in &mut clients {
        c.expect("QUIT", 221);
    }
    drop(clients);
    let s = sink.wait_for("sessions closed", |s| s["sessions_current"] == 0);
    assert_eq!(s["sessions_max"], 7);
    assert_eq!(s["connections"], 7);

    let sent = send(
        sink.addr(),
        &[
            "--messages",
            "30",
            "--connections",
            "3",
            "--per-connection",
            "4",
        ],
    );
    assert_eq!(sent["accepted"], 30, "{sent}");
    let s = sink.wait_for("sessions closed", |s| s["sessions_current"] == 0);
    assert_eq!(s["max_messages_per_connection"], 4, "{s}");
    assert_eq!(s["sessions_max"], 7);
    // 3 workers × 10 messages, 4 per connection: 3 connections each.
    assert_eq!(s["connections"], 7 + 9);

    // One connection carrying more messages raises the maximum.
    let mut c = Client::connect(sink.addr());
    c.expect("EHLO t.example", 250);
    for i in 0..6 {
        let body = format!("Message-ID: <many-{i}@loadgen>\r\n\r\nx\r\n");
        assert_eq!(c.message("s@t.example", &["r@t.example"], &body).0, 250);
    }
    assert_eq!(sink.stats()["max_messages_per_connection"], 6);
}

#[test]
fn stage_delays_hold_replies_back() {
    let listen = addrs(1);
    let delay = Duration::from_millis(150);
    let sink = Sink::start(
        &listen,
        &[
            "--delay-greeting",
            "150ms",
            "--delay-rcpt",
            "150ms",
            "--delay-data",
            "150ms",
        ],
    );
    let t = Instant::now();
    let mut c = Client::connect(sink.addr());
    assert!(t.elapsed() >= delay, "greeting after {:?}", t.elapsed());
    c.expect("EHLO t.example", 250);
    c.expect("MAIL FROM:<s@t.example>", 250);
    let t = Instant::now();
    c.expect("RCPT TO:<r@t.example>", 250);
    assert!(t.elapsed() >= delay, "RCPT reply after {:?}", t.elapsed());
    c.expect("DATA", 354);
    let t = Instant::now();
    c.send(b"Subject: slow\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    assert!(
        t.elapsed() >= delay,
        "end-of-data reply after {:?}",
        t.elapsed()
    );
}

#[test]
fn bdat_bytes_are_saved_raw_and_data_bytes_unstuffed() {
    let listen = addrs(1);
    let dir = tempdir();
    let sink = Sink::start(&listen, &["--save-dir", dir.path().to_str().unwrap()]);
    let mut c = Client::connect(sink.addr());
    let ehlo = c.expect("EHLO t.example", 250);
    for ext in [
        "PIPELINING",
        "8BITMIME",
        "SMTPUTF8",
        "DSN",
        "SIZE",
        "CHUNKING",
        "ENHANCEDSTATUSCODES",
    ] {
        assert!(ehlo.contains(ext), "{ext} missing from {ehlo}");
    }
    let chunk1: &[u8] = b"Message-ID: <bdat-1@loadgen>\r\n\r\n.a dot stays\r\n.\r\n";
    let chunk2: &[u8] = b"..and so does this\r\n\xc3\xa9t\xc3\xa9\r\n";
    let mut wire =
        b"MAIL FROM:<s@t.example> BODY=BINARYMIME\r\nRCPT TO:<r@bdat.example>\r\n".to_vec();
    wire.extend_from_slice(format!("BDAT {}\r\n", chunk1.len()).as_bytes());
    wire.extend_from_slice(chunk1);
    wire.extend_from_slice(format!("BDAT {} LAST\r\n", chunk2.len()).as_bytes());
    wire.extend_from_slice(chunk2);
    c.send(&wire);
    for _ in 0..4 {
        assert_eq!(c.reply().0, 250);
    }
    // The same content through DATA, dot-stuffed on the wire.
    c.expect("MAIL FROM:<s@t.example>", 250);
    c.expect("RCPT TO:<r@data.example>", 250);
    c.expect("DATA", 354);
    c.send(
        b"Message-ID: <data-1@loadgen>\r\n\r\n..a dot stays\r\n..\r\n...and so does this\r\n.\r\n",
    );
    assert_eq!(c.reply().0, 250);
    c.expect("QUIT", 221);

    let saved = saved(dir.path());
    let (env, eml) = &saved["bdat-1"];
    assert_eq!(eml, &[chunk1, chunk2].concat());
    assert_eq!(env["bdat"], true);
    assert_eq!(env["rcpts"], serde_json::json!(["r@bdat.example"]));
    assert_eq!(env["listener"], sink.addr().to_string());
    let (env, eml) = &saved["data-1"];
    assert_eq!(
        eml.as_slice(),
        b"Message-ID: <data-1@loadgen>\r\n\r\n.a dot stays\r\n.\r\n..and so does this\r\n"
    );
    assert_eq!(env["from"], "s@t.example");
    let s = sink.stats();
    assert_eq!(s["bdat_messages"], 1);
    assert_eq!(
        n(&s["bytes"]),
        (chunk1.len() + chunk2.len()) as u64 + eml.len() as u64
    );
}

#[test]
fn lmtp_replies_per_recipient() {
    let listen = addrs(1);
    let sink = Sink::start(
        &listen,
        &[
            "--lmtp",
            "--fault",
            "at=data,code=452,share=100%,domain=full.example",
        ],
    );
    let mut c = Client::connect(sink.addr());
    c.expect("EHLO t.example", 500);
    c.expect("LHLO t.example", 250);
    c.expect("MAIL FROM:<s@t.example>", 250);
    for r in ["a@ok.example", "b@full.example", "c@ok.example"] {
        c.expect(&format!("RCPT TO:<{r}>"), 250);
    }
    c.expect("DATA", 354);
    c.send(b"Message-ID: <lmtp-1@loadgen>\r\n\r\nx\r\n.\r\n");
    let replies: Vec<u16> = (0..3).map(|_| c.reply().0).collect();
    assert_eq!(replies, vec![250, 452, 250]);
    c.expect("QUIT", 221);

    // swaks speaks LMTP too and reads one reply per recipient.
    let out = run(Command::new("swaks").args([
        "--server",
        &sink.addr().ip().to_string(),
        "--port",
        &sink.addr().port().to_string(),
        "--protocol",
        "LMTP",
        "--from",
        "s@swaks.example",
        "--to",
        "d@ok.example,e@full.example",
        "--header",
        "Message-Id: <swaks-lmtp@loadgen>",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("250 2.1.5 <d@ok.example>"), "{text}");
    assert!(text.contains("452 4.3.0 <e@full.example>"), "{text}");
    let s = sink.stats();
    assert_eq!(s["messages"], 2, "{s}");
    assert_eq!(s["recipients"], 3);
    assert_eq!(s["data_rejected"]["452"], 2);
    assert_eq!(s["domains"]["ok.example"], 3);
    assert_eq!(s["lmtp"], true);
}

#[test]
fn swaks_plain_pipelined_and_starttls() {
    let listen = addrs(1);
    let dir = tempdir();
    let (cert, key) = make_cert(dir.path());
    let sink = Sink::start(
        &listen,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let swaks = |token: &str, extra: &[&str]| {
        let out = run(Command::new("swaks")
            .args([
                "--server",
                &sink.addr().ip().to_string(),
                "--port",
                &sink.addr().port().to_string(),
                "--from",
                "s@swaks.example",
                "--to",
                "r@swaks.example",
                "--header",
                &format!("Message-Id: <{token}@loadgen>"),
            ])
            .args(extra));
        assert!(
            out.status.success(),
            "swaks {extra:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    swaks("swaks-plain", &[]);
    swaks("swaks-pipe", &["--pipeline"]);
    swaks("swaks-tls", &["--tls"]);
    let s = sink.stats();
    assert_eq!(s["messages"], 3, "{s}");
    assert_eq!(s["tls_sessions"], 1);
    assert_eq!(s["tokens_unique"], 3);
    assert_eq!(s["domains"]["swaks.example"], 3);
    let tokens = sink.http("GET", "/tokens");
    assert_eq!(tokens, "swaks-pipe 1\nswaks-plain 1\nswaks-tls 1\n");
}

/// smtplib sends a message file (its own dot-stuffing on the wire); the sink must
/// save exactly the file's bytes. Then the same over STARTTLS.
const SMTPLIB_SCRIPT: &str = r#"
import smtplib, ssl, sys
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
msg = open(path, "rb").read()
with smtplib.SMTP(host, port, timeout=30) as s:
    s.ehlo("py.example")
    assert s.has_extn("pipelining") and s.has_extn("8bitmime") and s.has_extn("starttls")
    refused = s.sendmail("py@src.example", ["a@py.example", "b@py2.example"], msg, mail_options=["BODY=8BITMIME"])
    assert refused == {}, refused
    s.starttls(context=ssl._create_unverified_context())
    s.ehlo("py.example")
    s.sendmail("py@src.example", ["c@py.example"], msg.replace(b"py-plain", b"py-tls"))
print("ok")
"#;

#[test]
fn python_smtplib_bytes_match_what_was_saved() {
    let listen = addrs(1);
    let dir = tempdir();
    let save = dir.path().join("saved");
    let (cert, key) = make_cert(dir.path());
    let sink = Sink::start(
        &listen,
        &[
            "--save-dir",
            save.to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let message: &[u8] = "Message-ID: <py-plain@loadgen>\r\nSubject: dots\r\n\r\n.leading dot\r\n.\r\n..two\r\nol\u{e9} 8-bit\r\n\r\n"
        .as_bytes();
    let msg_path = dir.path().join("msg.eml");
    std::fs::write(&msg_path, message).unwrap();
    let out = run(Command::new("python3").args([
        "-c",
        SMTPLIB_SCRIPT,
        &sink.addr().ip().to_string(),
        &sink.addr().port().to_string(),
        msg_path.to_str().unwrap(),
    ]));
    assert!(
        out.status.success(),
        "python: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let saved = saved(&save);
    let (env, eml) = &saved["py-plain"];
    assert_eq!(eml.as_slice(), message);
    assert_eq!(
        env["rcpts"],
        serde_json::json!(["a@py.example", "b@py2.example"])
    );
    assert_eq!(env["from"], "py@src.example");
    let (env, eml) = &saved["py-tls"];
    assert_eq!(
        String::from_utf8_lossy(eml)
            .replace("py-tls", "py-plain")
            .as_bytes(),
        message
    );
    assert_eq!(env["rcpts"], serde_json::json!(["c@py.example"]));
    let s = sink.stats();
    assert_eq!(s["messages"], 2);
    assert_eq!(s["recipients"], 3);
    assert_eq!(s["tls_sessions"], 1);
    assert_eq!(s["domains"]["py.example"], 2);
    assert_eq!(s["domains"]["py2.example"], 1);
}

#[test]
fn postfix_smtp_source_against_the_sink() {
    let smtp_source = "/usr/sbin/smtp-source";
    assert!(
        Path::new(smtp_source).exists(),
        "{smtp_source} missing: install Debian's postfix package (.ci/run does)"
    );
    let listen = addrs(1);
    let sink = Sink::start(&listen, &[]);
    let target = sink.addr().to_string();
    let out = run(Command::new(smtp_source).args([
        "-s",
        "4",
        "-m",
        "200",
        "-l",
        "2000",
        "-r",
        "2",
        "-d",
        "-M",
        "source.example",
        "-f",
        "src@source.example",
        "-t",
        "rcpt@dest.example",
        &target,
    ]));
    assert!(
        out.status.success(),
        "smtp-source: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = sink.stats();
    assert_eq!(s["messages"], 200, "{s}");
    assert_eq!(s["recipients"], 400);
    assert_eq!(s["domains"]["dest.example"], 400);
    assert!(n(&s["bytes"]) >= 200 * 2000);
    assert!(n(&s["sessions_max"]) <= 4);

    // And in LMTP mode.
    let listen = addrs(1);
    let lmtp = Sink::start(&listen, &["--lmtp"]);
    let out = run(Command::new(smtp_source).args([
        "-L",
        "-s",
        "2",
        "-m",
        "50",
        "-r",
        "3",
        "-M",
        "source.example",
        "-t",
        "rcpt@lmtp.example",
        &lmtp.addr().to_string(),
    ]));
    assert!(
        out.status.success(),
        "smtp-source -L: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = lmtp.stats();
    assert_eq!(s["messages"], 50, "{s}");
    assert_eq!(s["recipients"], 150);
}

#[test]
fn stats_file_http_reset_and_summary_on_sigterm() {
    let listen = addrs(1);
    let dir = tempdir();
    let file = dir.path().join("stats.json");
    let sink = Sink::start(
        &listen,
        &[
            "--stats-file",
            file.to_str().unwrap(),
            "--stats-interval",
            "20ms",
        ],
    );
    let read_file =
        || -> Option<Value> { serde_json::from_slice(&std::fs::read(&file).ok()?).ok() };
    let mut c = Client::connect(sink.addr());
    c.expect("EHLO t.example", 250);
    let body = "Message-ID: <sig-1@loadgen>\r\n\r\nx\r\n";
    assert_eq!(c.message("s@t.example", &["r@t.example"], body).0, 250);
    let start = Instant::now();
    while read_file().map(|v| v["messages"] == 1) != Some(true) {
        assert!(
            start.elapsed() < DEADLINE,
            "stats file never showed the message"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(sink.http("GET", "/tokens"), "sig-1 1\n");
    // Reset zeroes the counters; the open session still counts as current.
    sink.http("POST", "/reset");
    let s = sink.stats();
    assert_eq!(
        (s["messages"].clone(), s["sessions_current"].clone()),
        (0.into(), 1.into()),
        "{s}"
    );
    assert_eq!(s["max_messages_per_connection"], 0);
    assert_eq!(sink.http("GET", "/tokens"), "");
    let body = "Message-ID: <sig-2@loadgen>\r\n\r\nx\r\n";
    assert_eq!(c.message("s@t.example", &["r@t.example"], body).0, 250);
    c.expect("QUIT", 221);
    assert!(sink.try_http("GET", "/nothing").is_err());

    let fin = sink.terminate();
    assert_eq!(fin["messages"], 1, "{fin}");
    assert_eq!(fin["tokens_unique"], 1);
    assert_eq!(read_file().unwrap()["messages"], 1);
}
