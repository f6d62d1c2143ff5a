//! Load held: thousands of idle and slowloris connections (one byte every few
//! seconds) held open against the real relay do not stop a new client from
//! being served; the per-IP limit and the idle/session timeouts shed them; the
//! relay's memory (RSS from /proc) stays bounded and is reported. And a burst
//! larger than a queue quota gets 452 4.3.1, not a crash, and the relay keeps
//! serving.
//!
//! Size: `RELIABILITY_LOAD_CONNECTIONS` (default 10000). The test raises its own
//! RLIMIT_NOFILE soft limit to the hard limit; the relay raises its own at start.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_testkit::*;

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Raises this process's open-files soft limit to the hard limit, and as root
/// (CI) the hard limit to `want` if it is lower; returns the soft limit. The
/// relay started by the test inherits it.
fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_max < want {
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: want,
            };
            // Only root may raise the hard limit; otherwise keep what we have.
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim),
            0,
            "setrlimit: {}",
            std::io::Error::last_os_error()
        );
    }
    lim.rlim_cur
}

/// A connection whose receive buffer is small (set before connecting, so the
/// window stays small): a peer writing to it blocks early.
fn connect_small_rcvbuf(addr: SocketAddr) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only")
    };
    // SAFETY: socket/setsockopt/connect on a fresh fd we own, then handed to TcpStream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let size: libc::c_int = 4096;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect {addr}: {}", std::io::Error::last_os_error());
        stream
    }
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Opens `n` connections to `addr` from `ips` (round robin, starting at
/// `offset`), reading each greeting; several threads.
fn open_held(ips: &[Ipv4Addr], addr: SocketAddr, n: usize) -> Vec<Client> {
    let threads = 4;
    let ips = ips.to_vec();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let ips = ips.clone();
            std::thread::spawn(move || {
                let mut v = Vec::new();
                for i in (t..n).step_by(threads) {
                    let mut c = Client::connect_from(ips[i % ips.len()], addr);
                    let line = c.read_line();
                    assert!(line.starts_with("220 "), "connection {i}: {line:?}");
                    v.push((i, c));
                }
                v
            })
        })
        .collect();
    let mut all: Vec<(usize, Client)> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("opener thread"))
        .collect();
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, c)| c).collect()
}

#[test]
fn held_idle_and_slowloris_connections_do_not_starve_a_new_client() {
    let n = env_count("RELIABILITY_LOAD_CONNECTIONS", 10_000);
    let nofile = raise_nofile(2 * n as u64 + 1000);
    assert!(
        nofile as usize >= n + 1000,
        "open files hard limit {nofile} is too low for {n} connections \
         (raise it, or set RELIABILITY_LOAD_CONNECTIONS)"
    );
    // 20 client addresses share the connections, each up to the per-IP limit.
    let ips = loopbacks(20);
    let per_ip = n.div_ceil(ips.len());
    let relay = Relay::builder()
        .cores(2)
        .lset("max_connections", &(n + 100).to_string())
        .lset("max_connections_per_ip", &per_ip.to_string())
        .lset("idle_timeout", "\"20s\"")
        .lset("session_timeout", "\"30s\"")
        .start();
    let pid = relay.pid();
    let log = relay.log();
    assert!(
        log.contains("open files limit (RLIMIT_NOFILE) raised"),
        "the relay logs its open-files limit: {log}"
    );
    let relay_nofile = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .expect("limits")
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or("")
        .to_string();
    let base_sockets = wait_connections_at_most(pid, 0, "after start", Duration::from_secs(10));
    let rss_before = status_kb(pid, "VmRSS");

    let t0 = Instant::now();
    let mut held = open_held(&ips, relay.addr(), n);
    let open_secs = t0.elapsed().as_secs_f64();
    // Half of them are slowloris: one byte of a command line every 2 s.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow: Vec<std::net::TcpStream> = held
        .iter()
        .skip(1)
        .step_by(2)
        .map(|c| c.stream.try_clone().expect("clone"))
        .collect();
    let slow_count = slow.len();
    let stop2 = stop.clone();
    let slowloris = std::thread::spawn(move || {
        let mut slow = slow;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            for s in &mut slow {
                // Stop once the relay has said something (its 421) or closed:
                // writing then would only draw a reset.
                let mut b = [0u8; 1];
                // SAFETY: a non-blocking peek into a local buffer on a socket we own.
                let r = unsafe {
                    libc::recv(
                        std::os::fd::AsRawFd::as_raw_fd(&*s),
                        b.as_mut_ptr().cast(),
                        1,
                        libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    )
                };
                if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
                {
                    let _ = s.write_all(b"X");
                }
            }
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until && !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });

    // All held at once.
    let held_sockets = tcp_connections(pid);
    assert!(
        held_sockets >= base_sockets + n,
        "the relay holds all {n} connections: {held_sockets} (baseline {base_sockets})"
    );
    // One more from an address at its limit is shed.
    let mut extra = Client::connect_from(ips[0], relay.addr());
    let r = extra.read_reply();
    assert_eq!(r.code, 421, "over the per-IP limit: {r:?}");
    assert!(
        r.text().contains("too many connections from your address"),
        "{r:?}"
    );
    extra.expect_closed();

    // A new client is served while they are held.
    let t1 = Instant::now();
    let out = swaks(
        &relay,
        &[
            "--from",
            "alice@example.org",
            "--to",
            "bob@example.com",
            "--header",
            "Subject: while 10k are held",
        ],
    );
    let swaks_secs = t1.elapsed().as_secs_f64();
    assert_ok(&out, "swaks while the connections are held");
    let ids = swaks_ids(&out);
    assert_eq!(ids.len(), 1, "{}", text(&out.stdout));
    let rss_with = status_kb(pid, "VmRSS");
    let held_check = tcp_connections(pid);

    // Timeouts shed them: idle ones after idle_timeout, slowloris ones at the
    // session timeout (their bytes keep resetting the idle timer).
    let shed_sockets =
        wait_connections_at_most(pid, base_sockets, "held ones shed", Duration::from_secs(90));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    slowloris.join().expect("slowloris thread");
    // Idle ones must all have been told 421 4.4.2; a slowloris one may instead
    // see a reset when its byte crossed the relay's close.
    let (mut idle_421, mut slow_421, mut slow_reset) = (0, 0, 0);
    let mut other = Vec::new();
    for (i, c) in held.iter_mut().enumerate() {
        let mut rest = Vec::new();
        let res = c.stream.read_to_end(&mut rest);
        let t = text(&rest);
        let timeout = t.starts_with("421 4.4.2 ");
        match (i % 2 == 1, timeout) {
            (false, true) => idle_421 += 1,
            (true, true) => slow_421 += 1,
            (true, false) if res.is_err() || t.is_empty() => slow_reset += 1,
            _ => {
                if other.len() < 5 {
                    other.push(format!("{i}: {t:?} {res:?}"));
                }
            }
        }
    }
    let timeouts = idle_421 + slow_421;
    drop(held);
    let rss_after = status_kb(pid, "VmRSS");
    // A second round (closed by the clients this time) must reuse that memory,
    // not add to it.
    let again = open_held(&ips, relay.addr(), n);
    let rss_again = status_kb(pid, "VmRSS");
    drop(again);
    wait_connections_at_most(
        pid,
        base_sockets,
        "second round closed",
        Duration::from_secs(60),
    );
    let hwm = status_kb(pid, "VmHWM");
    eprintln!(
        "load held: {n} connections ({slow_count} slowloris) from {} addresses opened in \
         {open_secs:.1}s; relay TCP connections {base_sockets} -> {held_sockets} (held) -> {shed_sockets} (shed); \
         swaks while held: {swaks_secs:.2}s; per-IP extra refused 421; shed by timeout \
         (421 4.4.2): {timeouts} ({slow_reset} slowloris reset); relay RSS {:.1} MiB before, {:.1} MiB with {n} held, \
         {:.1} MiB after, {:.1} MiB with {n} held again, peak {:.1} MiB; relay {relay_nofile}",
        ips.len(),
        mib(rss_before),
        mib(rss_with),
        mib(rss_after),
        mib(rss_again),
        mib(hwm),
    );
    assert!(held_check >= base_sockets + n, "still held during swaks");
    assert!(
        other.is_empty(),
        "connections not shed by a timeout: {other:?}"
    );
    assert_eq!(
        idle_421,
        n - slow_count,
        "every idle connection got 421 4.4.2"
    );
    assert_eq!(slow_421 + slow_reset, slow_count);
    // Generous bound: 64 KiB per held connection plus 64 MiB.
    let bound = rss_before + (n as u64) * 64 + 64 * 1024;
    assert!(
        rss_with <= bound,
        "RSS with {n} held {rss_with} kB over the bound {bound} kB"
    );
    // Bounded over rounds: the second hold costs at most 10% + 16 MiB more.
    let round_bound = rss_with + rss_with / 10 + 16 * 1024;
    assert!(
        rss_again <= round_bound,
        "RSS grew from {rss_with} kB to {rss_again} kB on a second round of {n}"
    );
}

#[test]
fn burst_over_the_queue_quota_gets_452_and_the_relay_keeps_serving() {
    const QUOTA: u64 = 100;
    const CONNS: u64 = 32;
    const BURST: u64 = 1000;
    let ip = loopback();
    let port = mx_port(&[ip]);
    // Delivery to a next hop that is down at first, so the queue fills.
    let relay = Relay::builder()
        .cores(2)
        .set("delivery.enabled=true")
        .set("delivery.connect_timeout=\"2s\"")
        .set("queue.default.retry=[\"1s\"]")
        .set(format!("queue.default.max_messages={QUOTA}"))
        .set(format!(
            "route.sink={{type=\"smtp\",host=\"{ip}\",port={port},tls=\"none\"}}"
        ))
        .set("rule=[{route=\"sink\"}]")
        .start();
    let out = run_with_timeout(
        Command::new(loadgen_bin())
            .args(["send", "--json", "--target", &relay.addr_string()])
            .args(["--connections", &CONNS.to_string()])
            .args(["--messages", &BURST.to_string(), "--size", "2048"]),
        Duration::from_secs(120),
    );
    let sent: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("loadgen send: {e}; stderr {}", text(&out.stderr)));
    let accepted = sent["accepted"].as_u64().unwrap_or(0);
    let refused_452 = sent["errors_by_code"]["452"].as_u64().unwrap_or(0);
    eprintln!(
        "quota burst: {BURST} messages over {CONNS} connections, quota {QUOTA}: \
         {accepted} accepted, {refused_452} refused 452; {sent}"
    );
    assert!(relay_alive(&relay), "the relay survived the burst");
    assert!(
        (QUOTA..=QUOTA + CONNS).contains(&accepted),
        "accepted {accepted}: the quota (soft by at most one per session) holds"
    );
    assert_eq!(
        accepted + refused_452,
        BURST,
        "every other message was refused 452: {sent}"
    );
    assert_eq!(
        relay.count() as u64,
        accepted,
        "spool holds what was accepted"
    );
    // Still serving: a new session is told 452 4.3.1 with the queue full …
    let mut c = relay.session();
    c.expect("MAIL FROM:<alice@example.org>", 250);
    let mut r = c.cmd("RCPT TO:<bob@example.com>");
    if r.code == 250 {
        r = c.cmd("DATA");
    }
    assert_eq!((r.code, r.enhanced()), (452, "4.3.1"), "{r:?}");
    c.send_line("QUIT");
    // … and once the next hop is up and the queue drains, mail is accepted again.
    let sink = LoadgenSink::start(&[SocketAddr::new(ip.into(), port)], &["--no-tokens"]);
    wait_until(
        "the queue to drain",
        Duration::from_secs(120),
        || relay.count() == 0,
        || relay.log(),
    );
    let out = swaks(
        &relay,
        &["--from", "alice@example.org", "--to", "bob@example.com"],
    );
    assert_ok(&out, "swaks after the queue drained");
    wait_until(
        "the last message at the sink",
        Duration::from_secs(30),
        || sink.messages() == accepted + 1,
        || relay.log(),
    );
}

fn relay_alive(relay: &Relay) -> bool {
    std::path::Path::new(&format!("/proc/{}", relay.pid())).exists()
        && std::net::TcpStream::connect(relay.addr()).is_ok()
}

#[test]
fn client_that_never_reads_its_replies_is_shed_by_the_write_timeout() {
    let relay = Relay::builder().lset("idle_timeout", "\"2s\"").start();
    let pid = relay.pid();
    let base = wait_connections_at_most(pid, 0, "after start", Duration::from_secs(10));
    // EHLO, then pipelined NOOPs whose replies (~14 MB) are never read: the
    // relay's writes fill both socket buffers and stop making progress.
    let c = Client::from_stream(connect_small_rcvbuf(relay.addr()));
    c.stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .expect("write timeout");
    let mut flood = b"EHLO reader.test\r\n".to_vec();
    for _ in 0..1_000_000 {
        flood.extend_from_slice(b"NOOP\r\n");
    }
    // Our own write stops too once the relay no longer reads (until it closes).
    let mut w = c.stream.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&flood);
    });
    wait_until(
        "the relay to take the connection",
        Duration::from_secs(10),
        || tcp_connections(pid) > base,
        || relay.log(),
    );
    wait_until(
        "the relay to drop the client that does not read",
        Duration::from_secs(30),
        || tcp_connections(pid) <= base,
        || relay.log(),
    );
    writer.join().expect("writer thread");
    drop(c);
    // Still serving.
    let mut s = relay.session();
    s.expect("QUIT", 221);
}

/// The bound of the `max_ready_messages` tests: far below their backlogs.
const READY: u64 = 20;

/// A sink answering each end of data 20 ms late, and a 2-core relay with
/// delivery on, `max_ready_messages = READY` and at most two connections to
/// the sink: about 100 messages a second out, while loadgen offers thousands.
fn slow_sink_and_bounded_relay(extra: &[String]) -> (LoadgenSink, Relay) {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let sink = LoadgenSink::start(
        &[SocketAddr::new(ip.into(), port)],
        &["--delay-data", "20ms"],
    );
    let mut builder = Relay::builder()
        .cores(2)
        .set("delivery.enabled=true")
        .set(format!("delivery.max_ready_messages={READY}"))
        .set("destination.default.max_connections=2")
        .set(format!(
            "route.sink={{type=\"smtp\",host=\"{ip}\",port={port},tls=\"none\"}}"
        ))
        .set("rule=[{route=\"sink\"}]");
    for kv in extra {
        builder = builder.set(kv.clone());
    }
    (sink, builder.start())
}

/// loadgen sends `n` messages of 1 KiB over `connections`; all must be accepted.
fn send_all(relay: &Relay, n: u64, connections: u32) {
    send_to(relay, n, connections, "example.com");
}

/// As `send_all`, every recipient at `domain`.
fn send_to(relay: &Relay, n: u64, connections: u32, domain: &str) {
    let out = run_with_timeout(
        Command::new(loadgen_bin())
            .args(["send", "--json", "--target", &relay.addr_string()])
            .args(["--connections", &connections.to_string()])
            .args(["--messages", &n.to_string(), "--size", "1024"])
            .args(["--domain", domain]),
        Duration::from_secs(120),
    );
    let sent: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("loadgen send: {e}; stderr {}", text(&out.stderr)));
    assert_eq!(sent["accepted"].as_u64(), Some(n), "all accepted: {sent}");
}

/// Watches the relay until the sink has `n` messages and the queue is empty;
/// asserts that most of them waited as ids, that never more than the bound
/// (and a few being removed) were held in memory, that the waiting gauge is
/// back at 0, and that each message arrived once.
fn assert_drained_within_the_bound(relay: &Relay, sink: &LoadgenSink, n: u64) {
    // What is queued but not waiting is what the cores hold in memory.
    let mut most_waiting = 0.0f64;
    let mut most_held = 0.0f64;
    wait_until(
        "every message at the sink",
        Duration::from_secs(120),
        || {
            let m = relay.metrics();
            let waiting = metric_sum(&m, "sluice_delivery_waiting_messages");
            let queued = metric_sum(&m, "sluice_queue_messages{");
            most_waiting = most_waiting.max(waiting);
            most_held = most_held.max(queued - waiting);
            sink.messages() >= n
        },
        || relay.log(),
    );
    eprintln!("{n} messages, bound {READY}: most waiting {most_waiting}, most held {most_held}");
    assert!(
        most_waiting >= (n / 2) as f64,
        "most of the backlog waited as ids: at most {most_waiting} did"
    );
    assert!(
        most_held <= (READY + 8) as f64,
        "at most the bound (and a few being removed) held in memory: {most_held}"
    );
    // The queue gauge, not the kit's offline count: a test may name its own spool.
    wait_until(
        "the queue to empty",
        Duration::from_secs(30),
        || metric_sum(&relay.metrics(), "sluice_queue_messages{") == 0.0,
        || relay.log(),
    );
    let m = relay.metrics();
    assert_eq!(
        metric_sum(&m, "sluice_delivery_waiting_messages"),
        0.0,
        "{m}"
    );
    assert_eq!(sink.messages(), n, "each delivered once");
    assert_ready_counts_held(relay);
}

/// The ready bound's per-destination counts never needed the safety net
/// (a removal that bypassed `end_attempt` / `end_resolving` would have
/// tripped it).
fn assert_ready_counts_held(relay: &Relay) {
    let log = relay.log();
    assert!(!log.contains("counts corrected"), "{log}");
}

/// `delivery.max_ready_messages`: with acceptance far ahead of a slow next
/// hop, the messages held in memory for delivery stay at the bound while the
/// rest wait in the spool as their ids (the `sluice_delivery_waiting_messages`
/// gauge), and every one is delivered once, in the end.
#[test]
fn a_backlog_beyond_max_ready_messages_waits_in_the_spool_and_is_all_delivered() {
    const BURST: u64 = 400;
    let (sink, relay) = slow_sink_and_bounded_relay(&[]);
    send_all(&relay, BURST, 16);
    assert_drained_within_the_bound(&relay, &sink, BURST);
}

/// A backlog recovered at start (messages queued while delivery was off) is
/// due all at once: past the bound it waits as ids through the timer path,
/// not only the hand-off after a 250, and every message still goes out once.
#[test]
fn a_recovered_backlog_beyond_max_ready_messages_waits_and_is_all_delivered() {
    const BACKLOG: u64 = 300;
    let spool_dir = tempfile::tempdir().expect("tempdir");
    let spool = format!("spool.path={}", spool_dir.path().join("spool").display());

    // Accept and queue only (delivery off), then stop.
    let mut queuing = Relay::builder().cores(2).set(spool.clone()).start();
    send_all(&queuing, BACKLOG, 8);
    assert!(queuing.terminate().success(), "{}", queuing.log());
    drop(queuing);

    // The same spool with delivery on behind the slow sink.
    let (sink, relay) = slow_sink_and_bounded_relay(&[spool]);
    assert_drained_within_the_bound(&relay, &sink, BACKLOG);
}

/// Head of line: a backlog for one slow destination must not hold back mail
/// for another. With `max_ready_messages` far below the backlog, the slow
/// destination may fill only half of each core's share, so mail for a second
/// destination goes in at once and reaches its sink while most of the slow
/// backlog still waits; in arrival order it would have come after all of it.
#[test]
fn a_slow_destinations_backlog_does_not_hold_back_mail_for_another() {
    const SLOW_BACKLOG: u64 = 300;
    const FAST: u64 = 20;
    let (slow_ip, fast_ip) = (loopback(), loopback());
    let port = mx_port(&[slow_ip, fast_ip]);
    let slow = LoadgenSink::start(
        &[SocketAddr::new(slow_ip.into(), port)],
        &["--delay-data", "20ms"],
    );
    let fast = LoadgenSink::start(&[SocketAddr::new(fast_ip.into(), port)], &[]);
    let route = |ip: Ipv4Addr| format!("{{type=\"smtp\",host=\"{ip}\",port={port},tls=\"none\"}}");
    let relay = Relay::builder()
        .cores(2)
        .set("delivery.enabled=true")
        .set(format!("delivery.max_ready_messages={READY}"))
        .set("destination.default.max_connections=2")
        .set(format!("route.slow={}", route(slow_ip)))
        .set(format!("route.fast={}", route(fast_ip)))
        .set("rule=[{match={recipient_domain=[\"fast.example\"]},route=\"fast\"},{route=\"slow\"}]")
        .start();

    send_to(&relay, SLOW_BACKLOG, 16, "slow.example");
    send_to(&relay, FAST, 4, "fast.example");
    wait_until(
        "the second destination's mail at its sink",
        Duration::from_secs(60),
        || fast.messages() >= FAST,
        || relay.log(),
    );
    let slow_first = slow.messages();
    eprintln!("{FAST} fast messages delivered after {slow_first} of {SLOW_BACKLOG} slow ones");
    assert!(
        slow_first <= SLOW_BACKLOG / 2,
        "mail for fast.example waited behind slow.example's backlog: \
         {slow_first} of {SLOW_BACKLOG} slow messages were delivered first"
    );

    // Nothing lost or doubled: the slow backlog drains too.
    wait_until(
        "the slow backlog at its sink",
        Duration::from_secs(60),
        || slow.messages() >= SLOW_BACKLOG,
        || relay.log(),
    );
    wait_until(
        "the queue to empty",
        Duration::from_secs(30),
        || metric_sum(&relay.metrics(), "sluice_queue_messages{") == 0.0,
        || relay.log(),
    );
    assert_eq!((slow.messages(), fast.messages()), (SLOW_BACKLOG, FAST));
    assert_ready_counts_held(&relay);
    assert_eq!(
        metric_sum(&relay.metrics(), "sluice_delivery_waiting_messages"),
        0.0
    );
}
