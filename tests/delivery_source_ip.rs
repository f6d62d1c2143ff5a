//! Per-sending-IP message rate (`delivery.source_ip_rate`), seen from the next
//! hop: two destination sites owned by two different cores share the kernel-chosen
//! source address, and the address's owner core spaces their messages out across
//! both cores. Postfix's smtp-sink (a server nobody here wrote) dumps each message
//! to a file; the test notes when each file appears.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_testkit::*;

/// Postfix's smtp-sink on a loopback port, dumping each message to `dir`.
struct Sink {
    guard: ChildGuard,
    port: u16,
    dir: PathBuf,
}

impl Sink {
    fn start(dir: &Path) -> Sink {
        std::fs::create_dir_all(dir).expect("sink dir");
        let port = free_port();
        let template = format!("{}/msg-", dir.display());
        let child = Command::new("smtp-sink")
            .args(["-u", "root", "-d", &template])
            .arg(format!("127.0.0.1:{port}"))
            .arg("64")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("smtp-sink (Debian package postfix) must be installed");
        let guard = ChildGuard::new(child, "smtp-sink");
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let mut c = Client::from_stream(s);
                if c.read_line().starts_with("220") {
                    c.send_line("QUIT");
                    break;
                }
            }
            assert!(Instant::now() < until, "smtp-sink did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Sink {
            guard,
            port,
            dir: dir.to_path_buf(),
        }
    }

    /// Names of the dump files with their full contents (a file may be seen
    /// while smtp-sink is still writing it; only complete ones count).
    fn complete(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                if let Ok(b) = std::fs::read(e.path()) {
                    let text = String::from_utf8_lossy(&b).into_owned();
                    if text.contains("END-OF-TEST-MESSAGE") {
                        out.push((e.file_name().to_string_lossy().into_owned(), text));
                    }
                }
            }
        }
        out
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.guard.kill();
    }
}

/// The engine's owner hash (FNV-1a), to check the two sites land on two cores.
fn owner(key: &str, cores: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h % cores
}

fn send(relay: &Relay, to: &str, tag: usize) {
    let mut c = relay.session();
    c.expect("MAIL FROM:<alice@example.org>", 250);
    c.expect(&format!("RCPT TO:<{to}>"), 250);
    c.expect("DATA", 354);
    c.send(
        format!("Subject: m{tag}\r\nMessage-ID: <m{tag}@src.test>\r\n\r\nm{tag}\r\nEND-OF-TEST-MESSAGE\r\n.\r\n")
            .as_bytes(),
    );
    let reply = c.read_reply();
    assert_eq!(reply.code, 250, "{}", reply.text());
    c.send_line("QUIT");
}

#[test]
fn source_ip_rate_spaces_messages_across_cores() {
    let tmp = tempfile::tempdir().expect("tmp");
    let sink = Sink::start(&tmp.path().join("sink"));
    let port = sink.port;
    // Two sites ("route:a", "route:b") to the same sink, owned by different cores.
    assert_ne!(owner("route:a", 2), owner("route:b", 2));
    let route = |name: &str| {
        format!("route.{name}={{type=\"relay\",host=\"127.0.0.1\",port={port},tls=\"none\"}}")
    };
    let relay = Relay::builder()
        .cores(2)
        .set("delivery.enabled=true")
        .set("delivery.source_ip_rate=[\"2/s\"]")
        .set(route("a"))
        .set(route("b"))
        .set("rule=[{match={recipient_domain=[\"a.test\"]},route=\"a\"},{route=\"b\"}]")
        .set("queue.default.retry=[\"1s\"]")
        .start();
    let start = Instant::now();
    for i in 0..6 {
        let domain = if i % 2 == 0 { "a.test" } else { "b.test" };
        send(&relay, &format!("rcpt{i}@{domain}"), i);
    }
    let submitted = start.elapsed();
    // Poll the sink, noting when each message is first seen complete.
    let mut seen: HashMap<String, Instant> = HashMap::new();
    let until = Instant::now() + Duration::from_secs(30);
    while seen.len() < 6 {
        assert!(
            Instant::now() < until,
            "only {} of 6 messages arrived",
            seen.len()
        );
        for (name, _) in sink.complete() {
            seen.entry(name).or_insert_with(Instant::now);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut times: Vec<Instant> = seen.values().copied().collect();
    times.sort();
    let span = times[5] - times[0];
    // 2/s with a burst of 2: two at once, then one per 500ms → 2s in theory.
    assert!(
        span >= Duration::from_millis(1_500),
        "6 messages over {span:?} (submitted in {submitted:?}): faster than 2/s"
    );
    // Both sites' messages all arrived, each once.
    let bodies: Vec<String> = sink.complete().into_iter().map(|(_, t)| t).collect();
    assert_eq!(bodies.len(), 6);
    for i in 0..6 {
        let id = format!("Message-ID: <m{i}@src.test>");
        assert_eq!(
            bodies.iter().filter(|b| b.contains(&id)).count(),
            1,
            "m{i}: {bodies:?}"
        );
    }
    let until = Instant::now() + Duration::from_secs(20);
    while relay.count() != 0 {
        assert!(Instant::now() < until, "spool did not empty");
        std::thread::sleep(Duration::from_millis(25));
    }
}
