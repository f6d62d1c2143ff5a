//! Per destination host limits besides concurrency, and per-queue concurrency,
//! end to end through the real relay binary, a real NSD on loopback and a small
//! recording SMTP server of this file (message times, messages per connection,
//! concurrent sessions and concurrent transactions):
//!
//! - `[delivery] host_message_rate` holds across sites (three domains sharing
//!   one MX host) and cores;
//! - `[delivery] host_max_messages_per_connection` caps every connection;
//! - `[queue.X] concurrency = 1` never lets two deliveries of the queue overlap,
//!   even to several sites.

mod common;
#[path = "delivery/harness.rs"]
mod harness;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::*;

const T: Duration = Duration::from_secs(30);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn body(tag: &str) -> Vec<u8> {
    format!("Subject: {tag}\r\nMessage-ID: <{tag}@snd.dlv.test>\r\n\r\n{tag} body\r\n").into_bytes()
}

// ---------------------------------------------------------------------------------
// A recording SMTP server
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Msg {
    at: Instant,
    conn: usize,
    rcpts: Vec<String>,
}

#[derive(Default)]
struct State {
    msgs: Vec<Msg>,
    sessions: usize,
    sessions_max: usize,
    /// Sessions between MAIL and the reply to the end of data.
    in_tx: usize,
    in_tx_max: usize,
}

/// One thread per session; no PIPELINING; the end of data is answered after
/// `data_delay`, so deliveries that may overlap do.
struct Recorder {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    fn start(addr: SocketAddr, data_delay: Duration) -> Recorder {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut conns = 0;
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        {
                            let mut g = st.lock().unwrap();
                            g.sessions += 1;
                            g.sessions_max = g.sessions_max.max(g.sessions);
                        }
                        let conn = conns;
                        conns += 1;
                        let st2 = st.clone();
                        std::thread::spawn(move || {
                            let mut in_tx = false;
                            let _ = session(s, conn, &st2, data_delay, &mut in_tx);
                            let mut g = st2.lock().unwrap();
                            g.sessions -= 1;
                            if in_tx {
                                g.in_tx -= 1;
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Recorder {
            state,
            stop,
            thread: Some(thread),
        }
    }

    fn msgs(&self) -> Vec<Msg> {
        self.state.lock().unwrap().msgs.clone()
    }

    /// (most concurrent sessions, most concurrent transactions).
    fn maxima(&self) -> (usize, usize) {
        let g = self.state.lock().unwrap();
        (g.sessions_max, g.in_tx_max)
    }

    /// Most messages any one connection carried, and the connection count.
    fn per_connection(&self) -> (usize, usize) {
        let msgs = self.msgs();
        let mut counts = std::collections::BTreeMap::new();
        for m in &msgs {
            *counts.entry(m.conn).or_insert(0usize) += 1;
        }
        (counts.values().copied().max().unwrap_or(0), counts.len())
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn session(
    s: TcpStream,
    conn: usize,
    st: &Mutex<State>,
    data_delay: Duration,
    in_tx: &mut bool,
) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    w.write_all(b"220 rec.test ESMTP\r\n")?;
    let mut rcpts = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_string();
        let verb = cmd.get(..4).unwrap_or("").to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => w.write_all(b"250-rec.test\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n")?,
            "HELO" => w.write_all(b"250 rec.test\r\n")?,
            "MAIL" => {
                rcpts.clear();
                if !*in_tx {
                    *in_tx = true;
                    let mut g = st.lock().unwrap();
                    g.in_tx += 1;
                    g.in_tx_max = g.in_tx_max.max(g.in_tx);
                }
                w.write_all(b"250 2.1.0 Ok\r\n")?;
            }
            "RCPT" => {
                rcpts.push(cmd);
                w.write_all(b"250 2.1.5 Ok\r\n")?;
            }
            "DATA" => {
                w.write_all(b"354 go ahead\r\n")?;
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 {
                        return Ok(());
                    }
                    if line == ".\r\n" {
                        break;
                    }
                }
                std::thread::sleep(data_delay);
                {
                    let mut g = st.lock().unwrap();
                    g.msgs.push(Msg {
                        at: Instant::now(),
                        conn,
                        rcpts: rcpts.clone(),
                    });
                    if *in_tx {
                        *in_tx = false;
                        g.in_tx -= 1;
                    }
                }
                w.write_all(b"250 2.0.0 Ok: queued\r\n")?;
            }
            "RSET" | "NOOP" => {
                if *in_tx {
                    *in_tx = false;
                    st.lock().unwrap().in_tx -= 1;
                }
                w.write_all(b"250 2.0.0 Ok\r\n")?
            }
            "QUIT" => {
                w.write_all(b"221 2.0.0 Bye\r\n")?;
                return Ok(());
            }
            _ => w.write_all(b"502 5.5.2 Error: command not recognized\r\n")?,
        }
    }
}

/// NSD with d1, d2 and d3 (.dlv.test) all pointing at one MX host `mx1` on a
/// fresh loopback address, a recorder there, and a two-core relay with `extra`.
fn shared_mx(data_delay: Duration, extra: &[&str]) -> (Nsd, Recorder, common::Relay) {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let nsd = Nsd::start(&format!(
        "d1 MX 10 mx1\nd2 MX 10 mx1\nd3 MX 10 mx1\nmx1 A {ip}"
    ));
    let rec = Recorder::start(sa(ip, port), data_delay);
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let relay = mx_relay(&nsd, port, 2, &extra);
    (nsd, rec, relay)
}

/// Sends `n` messages on one session, to d1, d2, d3 in turn (or to `domains`).
fn send(relay: &common::Relay, n: usize, domains: &[&str], tag: &str) {
    let mut c = relay.session();
    for i in 0..n {
        let d = domains[i % domains.len()];
        c.send_mail(
            "alice@snd.dlv.test",
            &[&format!("bob{i}@{d}.dlv.test")],
            &body(&format!("{tag}{i}")),
        );
    }
    c.send_line("QUIT");
}

fn wait_done(rec: &Recorder, relay: &common::Relay, n: usize) -> Vec<Msg> {
    wait_until(
        &format!("{n} messages at the recorder"),
        T,
        || rec.msgs().len() >= n,
        || relay.log(),
    );
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
    let msgs = rec.msgs();
    assert_eq!(msgs.len(), n, "no duplicates");
    msgs
}

#[test]
fn host_message_rate_holds_across_domains_sharing_an_mx_host() {
    let (_nsd, rec, relay) = shared_mx(Duration::ZERO, &["delivery.host_message_rate=[\"2/s\"]"]);
    send(&relay, 6, &["d1", "d2", "d3"], "rate");
    let msgs = wait_done(&rec, &relay, 6);
    let mut rcpts: Vec<String> = msgs.iter().flat_map(|m| m.rcpts.clone()).collect();
    rcpts.sort();
    rcpts.dedup();
    assert_eq!(rcpts.len(), 6, "{rcpts:?}");
    for d in ["d1", "d2", "d3"] {
        assert!(rcpts.iter().any(|r| r.contains(d)), "{d}: {rcpts:?}");
    }
    let first = msgs.iter().map(|m| m.at).min().unwrap();
    let last = msgs.iter().map(|m| m.at).max().unwrap();
    // Burst of two, then one every 500 ms: the sixth 2 s after the first.
    assert!(
        last - first >= Duration::from_millis(1500),
        "6 messages at 2/s to one host arrived within {:?}",
        last - first
    );
}

#[test]
fn host_max_messages_per_connection_caps_every_connection() {
    let (_nsd, rec, relay) = shared_mx(
        Duration::from_millis(100),
        &[
            "delivery.host_max_messages_per_connection=2",
            "destination.default.max_connections=1",
        ],
    );
    // Mostly one site with one connection at a time, whose own limit (100)
    // would let that connection carry everything queued meanwhile.
    send(&relay, 9, &["d1", "d1", "d2"], "conn");
    wait_done(&rec, &relay, 9);
    let (most, conns) = rec.per_connection();
    assert!(most <= 2, "a connection carried {most} messages");
    assert!(conns >= 5, "9 messages over only {conns} connections");
}

#[test]
fn queue_concurrency_one_never_overlaps_deliveries_to_several_sites() {
    let (_nsd, rec, relay) = shared_mx(
        Duration::from_millis(200),
        &[
            "queue.default.concurrency=1",
            "delivery.idle_timeout=\"200ms\"",
        ],
    );
    send(&relay, 6, &["d1", "d2", "d3"], "conc");
    let msgs = wait_done(&rec, &relay, 6);
    let (_, in_tx_max) = rec.maxima();
    assert_eq!(
        in_tx_max, 1,
        "two deliveries of a queue with concurrency 1 overlapped"
    );
    // One at a time: at least 6 × 200 ms from the first to the last.
    let first = msgs.iter().map(|m| m.at).min().unwrap();
    let last = msgs.iter().map(|m| m.at).max().unwrap();
    assert!(
        last - first >= Duration::from_millis(1000),
        "{:?}",
        last - first
    );
}
