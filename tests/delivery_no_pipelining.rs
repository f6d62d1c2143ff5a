//! Delivery to a next hop that does not offer PIPELINING (RFC 2920): the relay
//! must send each command only after the reply to the one before it. The next
//! hop here is a strict scripted server that, like Postfix's smtpd with
//! reject_unauth_pipelining, looks right after each command line for bytes of
//! the next one and answers 554 (closing) when it finds any.

mod common;
#[path = "delivery/harness.rs"]
mod harness;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use harness::*;

const T: Duration = Duration::from_secs(20);
const REFUSAL: &[u8] = b"554 5.5.0 Error: pipelining not allowed\r\n";

#[derive(Debug, Clone)]
struct Got {
    mail: String,
    /// Recipients the server accepted.
    rcpts: Vec<String>,
    body: String,
    /// "DATA" or "BDAT".
    how: &'static str,
}

#[derive(Default)]
struct Seen {
    msgs: Vec<Got>,
    /// Commands after which bytes of the next one were already there.
    early: Vec<String>,
    commands: Vec<String>,
}

struct StrictServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StrictServer {
    /// Listens on a fresh loopback address; EHLO offers CHUNKING when `chunking`,
    /// never PIPELINING. Recipients starting with "nobody" get 550.
    fn start(chunking: bool) -> StrictServer {
        let listener = TcpListener::bind((loopback(), 0)).expect("bind strict server");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut sessions = Vec::new();
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let st = st.clone();
                        sessions.push(std::thread::spawn(move || {
                            let _ = Session::new(s, chunking, &st).run();
                        }));
                    }
                    // Nothing to accept: poll the stop flag again shortly.
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for s in sessions {
                let _ = s.join();
            }
        });
        StrictServer {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn msgs(&self) -> Vec<Got> {
        self.seen.lock().unwrap().msgs.clone()
    }
    fn early(&self) -> Vec<String> {
        self.seen.lock().unwrap().early.clone()
    }
    fn commands(&self) -> Vec<String> {
        self.seen.lock().unwrap().commands.clone()
    }
}

impl Drop for StrictServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Session<'a> {
    s: TcpStream,
    /// Read but not yet used.
    pending: Vec<u8>,
    chunking: bool,
    seen: &'a Mutex<Seen>,
}

impl<'a> Session<'a> {
    fn new(s: TcpStream, chunking: bool, seen: &'a Mutex<Seen>) -> Session<'a> {
        Session {
            s,
            pending: Vec::new(),
            chunking,
            seen,
        }
    }

    fn fill(&mut self) -> std::io::Result<bool> {
        let mut buf = [0u8; 4096];
        let n = self.s.read(&mut buf)?;
        self.pending.extend_from_slice(&buf[..n]);
        Ok(n > 0)
    }

    /// The next line (without CRLF); None at end of stream.
    fn line(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(lf) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=lf).collect();
                let line = String::from_utf8_lossy(&line);
                return Ok(Some(line.trim_end_matches(['\r', '\n']).to_string()));
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    /// Whether bytes of a next command are already here, right after the one
    /// just read (Postfix's unauth_pipelining check: what is buffered, no wait).
    fn early(&mut self, after: &str) -> std::io::Result<bool> {
        let mut buffered = !self.pending.is_empty();
        if !buffered {
            self.s.set_nonblocking(true)?;
            let peeked = self.s.peek(&mut [0u8; 64]);
            self.s.set_nonblocking(false)?;
            buffered = matches!(peeked, Ok(n) if n > 0);
        }
        if buffered {
            self.seen.lock().unwrap().early.push(after.to_string());
            self.s.write_all(REFUSAL)?;
            let _ = self.s.shutdown(Shutdown::Both);
        }
        Ok(buffered)
    }

    fn reply(&mut self, r: &str) -> std::io::Result<()> {
        self.s.write_all(r.as_bytes())
    }

    fn run(&mut self) -> std::io::Result<()> {
        self.s.set_nonblocking(false)?;
        self.s.set_read_timeout(Some(T))?;
        self.reply("220 strict.test ESMTP\r\n")?;
        let (mut mail, mut rcpts) = (String::new(), Vec::new());
        while let Some(cmd) = self.line()? {
            self.seen.lock().unwrap().commands.push(cmd.clone());
            let verb = cmd.get(..4).unwrap_or("").to_ascii_uppercase();
            // BDAT's data follows its command by design; every other command
            // must be alone until answered.
            if verb != "BDAT" && self.early(&cmd)? {
                return Ok(());
            }
            match verb.as_str() {
                "EHLO" => {
                    let chunking = if self.chunking {
                        "250-CHUNKING\r\n"
                    } else {
                        ""
                    };
                    self.reply(&format!(
                        "250-strict.test\r\n250-8BITMIME\r\n{chunking}250 SIZE 10000000\r\n"
                    ))?;
                }
                "HELO" => self.reply("250 strict.test\r\n")?,
                "MAIL" => {
                    mail = cmd;
                    rcpts.clear();
                    self.reply("250 2.1.0 Ok\r\n")?;
                }
                "RCPT" if cmd.to_ascii_lowercase().contains("<nobody") => {
                    self.reply("550 5.1.1 <nobody>: Recipient address rejected\r\n")?;
                }
                "RCPT" => {
                    rcpts.push(cmd);
                    self.reply("250 2.1.5 Ok\r\n")?;
                }
                "DATA" if rcpts.is_empty() => {
                    self.reply("554 5.5.1 Error: no valid recipients\r\n")?
                }
                "DATA" => {
                    self.reply("354 End data with <CR><LF>.<CR><LF>\r\n")?;
                    let mut body = String::new();
                    loop {
                        let Some(l) = self.line()? else {
                            return Ok(());
                        };
                        if l == "." {
                            break;
                        }
                        body.push_str(&l);
                        body.push('\n');
                    }
                    if self.early("end of data")? {
                        return Ok(());
                    }
                    self.accept(&mail, &rcpts, body, "DATA")?;
                }
                "BDAT" => {
                    let mut words = cmd.split_ascii_whitespace().skip(1);
                    let len: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                    let last = words.next().is_some_and(|w| w.eq_ignore_ascii_case("LAST"));
                    while self.pending.len() < len {
                        if !self.fill()? {
                            return Ok(());
                        }
                    }
                    let chunk: Vec<u8> = self.pending.drain(..len).collect();
                    if self.early(&cmd)? {
                        return Ok(());
                    }
                    if !last || rcpts.is_empty() {
                        // One chunk with LAST is all the relay should send.
                        self.reply("554 5.5.1 Error: expected one BDAT LAST\r\n")?;
                        continue;
                    }
                    let body = String::from_utf8_lossy(&chunk).into_owned();
                    self.accept(&mail, &rcpts, body, "BDAT")?;
                }
                "RSET" | "NOOP" => self.reply("250 2.0.0 Ok\r\n")?,
                "QUIT" => {
                    self.reply("221 2.0.0 Bye\r\n")?;
                    return Ok(());
                }
                _ => self.reply("502 5.5.2 Error: command not recognized\r\n")?,
            }
        }
        Ok(())
    }

    fn accept(
        &mut self,
        mail: &str,
        rcpts: &[String],
        body: String,
        how: &'static str,
    ) -> std::io::Result<()> {
        self.seen.lock().unwrap().msgs.push(Got {
            mail: mail.to_string(),
            rcpts: rcpts.to_vec(),
            body,
            how,
        });
        self.reply("250 2.0.0 Ok: queued\r\n")
    }
}

/// A relay sending everything over route "default" (type relay) to `hop`.
fn relay_to(hop: SocketAddr) -> Relay {
    Relay::builder()
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set("delivery.connect_timeout=\"5s\"")
        .set("queue.default.retry=[\"1s\"]")
        .set(format!(
            "route.default={{type=\"relay\",host=\"{}\",port={},tls=\"none\"}}",
            hop.ip(),
            hop.port()
        ))
        .start()
}

fn body(tag: &str) -> Vec<u8> {
    format!("Subject: {tag}\r\nMessage-ID: <{tag}@snd.dlv.test>\r\n\r\n{tag} body\r\n").into_bytes()
}

/// The server's check works: a client that pipelines is refused.
fn assert_server_refuses_pipelining(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).expect("connect to strict server");
    s.set_read_timeout(Some(T)).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(b"\r\n") {
        let n = s.read(&mut buf).expect("greeting");
        assert!(n > 0, "closed before the greeting");
        got.extend_from_slice(&buf[..n]);
    }
    s.write_all(b"HELO probe.test\r\nMAIL FROM:<>\r\n")
        .expect("write");
    got.clear();
    loop {
        let n = s.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(text(&got), text(REFUSAL), "pipelining was not refused");
}

/// Checks the server's pipelining check, then forgets the probe.
fn probe(server: &StrictServer) {
    assert_server_refuses_pipelining(server.addr);
    let mut seen = server.seen.lock().unwrap();
    assert_eq!(seen.early, ["HELO probe.test"]);
    *seen = Seen::default();
}

fn sorted_addresses(rcpts: &[String]) -> Vec<String> {
    let mut v: Vec<String> = rcpts
        .iter()
        .filter_map(|r| {
            let start = r.find('<')? + 1;
            let end = r[start..].find('>')? + start;
            Some(r[start..end].to_string())
        })
        .collect();
    v.sort();
    v
}

fn wait_delivered(relay: &Relay, server: &StrictServer, n: usize) {
    wait_until(
        &format!("{n} message(s) at the strict server"),
        T,
        || server.msgs().len() >= n || !server.early().is_empty(),
        || format!("commands: {:?}\n{}", server.commands(), relay.log()),
    );
    assert!(
        server.early().is_empty(),
        "the relay sent ahead of a reply after {:?}; commands: {:?}",
        server.early(),
        server.commands()
    );
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
}

#[test]
fn no_pipelining_server_gets_one_command_per_reply_with_data() {
    let server = StrictServer::start(false);
    probe(&server);
    let relay = relay_to(server.addr);
    submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["bob@far.test", "carol@far.test", "dave@far.test"],
        &body("lockstep1"),
    );
    wait_delivered(&relay, &server, 1);
    // A refused recipient in the middle: the rest still go, then DATA.
    submit(
        &relay,
        "",
        "",
        &["erin@far.test", "nobody@far.test", "frank@far.test"],
        &body("lockstep2"),
    );
    wait_delivered(&relay, &server, 2);
    let msgs = server.msgs();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    let first = msgs
        .iter()
        .find(|m| m.body.contains("lockstep1 body"))
        .expect("first message");
    assert_eq!(first.how, "DATA");
    assert!(
        first.mail.starts_with("MAIL FROM:<alice@snd.dlv.test>"),
        "{first:?}"
    );
    assert_eq!(
        sorted_addresses(&first.rcpts),
        ["bob@far.test", "carol@far.test", "dave@far.test"]
    );
    let second = msgs
        .iter()
        .find(|m| m.body.contains("lockstep2 body"))
        .expect("second message");
    assert_eq!(
        sorted_addresses(&second.rcpts),
        ["erin@far.test", "frank@far.test"]
    );
    let commands = server.commands();
    assert!(
        commands
            .iter()
            .any(|c| c.to_ascii_lowercase().contains("<nobody@far.test>")),
        "the refused recipient was tried: {commands:?}"
    );
}

#[test]
fn chunking_without_pipelining_sends_bdat_after_the_rcpt_replies() {
    let server = StrictServer::start(true);
    probe(&server);
    let relay = relay_to(server.addr);
    submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["bob@far.test", "carol@far.test", "dave@far.test"],
        &body("chunked"),
    );
    wait_delivered(&relay, &server, 1);
    let msgs = server.msgs();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0].how, "BDAT");
    assert!(msgs[0].body.contains("chunked body"), "{msgs:?}");
    assert_eq!(
        sorted_addresses(&msgs[0].rcpts),
        ["bob@far.test", "carol@far.test", "dave@far.test"]
    );
}
