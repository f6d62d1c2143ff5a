//! A scripted SMTP next hop: real TCP on loopback, one thread per session, told
//! per verb what to do, and recording what it was sent so tests can assert on it.
//!
//! - capabilities to advertise in EHLO ([`ServerBuilder::capability`]);
//! - strict pipelining ([`ServerBuilder::strict_pipelining`]): like Postfix's
//!   smtpd with reject_unauth_pipelining, bytes of a next command already there
//!   right after a command (BDAT's data excepted) get [`PIPELINING_REFUSAL`] and
//!   the connection is closed; lenient servers only record them;
//! - per verb, fixed in the builder or changed while it runs
//!   ([`ScriptedServer::set`]): another reply, a delay, no reply ever, a refusal
//!   that closes, or the usual reply and then no more reading ([`Act`]);
//!   [`END_OF_DATA`] names the reply to the final dot (or BDAT LAST);
//! - records the accept times, every command line, the commands after which
//!   early bytes were seen, the messages taken (envelope, body, connection,
//!   time) and the most transactions open at once.
//!
//! Dropping the server closes every session it holds and joins its threads.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a strict server answers to a pipelined command (then it closes).
pub const PIPELINING_REFUSAL: &str = "554 5.5.0 Error: pipelining not allowed";

/// The pseudo-verb of the reply to the end of the message (the final dot of
/// DATA, or BDAT LAST).
pub const END_OF_DATA: &str = ".";

/// How long a session waits for the client's next bytes.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What the server does at a verb instead of its usual reply.
#[derive(Debug, Clone)]
pub enum Act {
    /// Answer with this reply instead ("250 Ok", or lines joined by "\n").
    Reply(String),
    /// Wait this long, then answer as usual.
    Delay(Duration),
    /// Never answer, and keep the connection open until the server is dropped.
    Hang,
    /// Answer as usual (DATA: the 354), then never read again; the connection
    /// stays open until the server is dropped.
    StopReading,
    /// Answer with this reply and close the connection.
    Refuse(String),
}

#[derive(Debug, Clone)]
struct Rule {
    verb: String,
    /// Lowercase text the command line must contain, if any.
    arg: Option<String>,
    act: Act,
}

/// A message the server took (its end of data was answered 2xx).
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    /// Index of the connection (in accept order) that carried it.
    pub conn: usize,
    /// The client's address (its source IP tells which egress address sent it).
    pub peer: Option<SocketAddr>,
    /// The MAIL command line.
    pub mail: String,
    /// The RCPT command lines answered 2xx.
    pub rcpts: Vec<String>,
    /// As sent: DATA's lines (dot-stuffed, CRLF, without the final dot), or
    /// BDAT's chunks.
    pub body: Vec<u8>,
    /// "DATA" or "BDAT".
    pub how: &'static str,
}

impl Received {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The recipient addresses (inside <>), sorted.
    pub fn rcpt_addresses(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .rcpts
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
}

#[derive(Default)]
struct Record {
    accepts: Vec<Instant>,
    commands: Vec<String>,
    early: Vec<String>,
    messages: Vec<Received>,
    /// Sessions between an accepted MAIL and the end of that transaction.
    in_tx: usize,
    in_tx_max: usize,
    /// Sessions left hanging by [`Act::Hang`] or [`Act::StopReading`].
    hung: usize,
    /// Per client address: sessions open now, and the most open at once.
    open_by_ip: std::collections::BTreeMap<std::net::IpAddr, (usize, usize)>,
}

struct Shared {
    name: String,
    caps: Vec<String>,
    strict: bool,
    rules: Mutex<Vec<Rule>>,
    record: Mutex<Record>,
    /// A handle on every session's socket, to close them all on drop; and the
    /// sockets of hung sessions, kept open until then.
    sockets: Mutex<Vec<TcpStream>>,
    sessions: Mutex<Vec<JoinHandle<()>>>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking session thread must not hide what was recorded.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct ServerBuilder {
    name: String,
    caps: Vec<String>,
    strict: bool,
    rules: Vec<Rule>,
}

impl ServerBuilder {
    /// The name in the greeting and EHLO reply (default "scripted.test").
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// An EHLO keyword: "PIPELINING", "CHUNKING", "8BITMIME", "SMTPUTF8",
    /// "DSN", "SIZE 10000000"… (none by default).
    pub fn capability(mut self, cap: &str) -> Self {
        self.caps.push(cap.into());
        self
    }

    /// Refuse early bytes after a command (reject_unauth_pipelining).
    pub fn strict_pipelining(mut self) -> Self {
        self.strict = true;
        self
    }

    /// What to do at `verb` ("EHLO", "MAIL", "RCPT", "DATA", "BDAT",
    /// [`END_OF_DATA`]…).
    pub fn on(mut self, verb: &str, act: Act) -> Self {
        self.rules.push(Rule {
            verb: verb.to_ascii_uppercase(),
            arg: None,
            act,
        });
        self
    }

    /// What to do at `verb` when its command line contains `text` (any case),
    /// e.g. `.on_arg("RCPT", "<nobody", Act::Reply("550 5.1.1 no".into()))`.
    pub fn on_arg(mut self, verb: &str, text: &str, act: Act) -> Self {
        self.rules.push(Rule {
            verb: verb.to_ascii_uppercase(),
            arg: Some(text.to_ascii_lowercase()),
            act,
        });
        self
    }

    /// Listens on `addr` (port 0 for a free one).
    pub fn start(self, addr: SocketAddr) -> ScriptedServer {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let addr = listener
            .local_addr()
            .expect("local address of a bound socket");
        let shared = Arc::new(Shared {
            name: self.name,
            caps: self.caps,
            strict: self.strict,
            rules: Mutex::new(self.rules),
            record: Mutex::default(),
            sockets: Mutex::default(),
            sessions: Mutex::default(),
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let acceptor = std::thread::spawn(move || accept_loop(listener, sh));
        ScriptedServer {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }
}

pub struct ScriptedServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl ScriptedServer {
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            name: "scripted.test".into(),
            caps: Vec::new(),
            strict: false,
            rules: Vec::new(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on, `verb` (without an argument condition) does `act`; None
    /// restores the usual reply.
    pub fn set(&self, verb: &str, act: Option<Act>) {
        let verb = verb.to_ascii_uppercase();
        let mut rules = lock(&self.shared.rules);
        rules.retain(|r| !(r.verb == verb && r.arg.is_none()));
        if let Some(act) = act {
            rules.push(Rule {
                verb,
                arg: None,
                act,
            });
        }
    }

    /// Forgets everything recorded so far.
    pub fn reset(&self) {
        *lock(&self.shared.record) = Record::default();
    }

    pub fn messages(&self) -> Vec<Received> {
        lock(&self.shared.record).messages.clone()
    }

    /// Every command line received, in order (not message data).
    pub fn commands(&self) -> Vec<String> {
        lock(&self.shared.record).commands.clone()
    }

    /// Commands after which bytes of the next one were already there ("end of
    /// data" for the final dot).
    pub fn early(&self) -> Vec<String> {
        lock(&self.shared.record).early.clone()
    }

    /// When each connection was accepted.
    pub fn accepts(&self) -> Vec<Instant> {
        lock(&self.shared.record).accepts.clone()
    }

    /// The most sessions inside a mail transaction at once.
    pub fn max_transactions(&self) -> usize {
        lock(&self.shared.record).in_tx_max
    }

    /// Per client address, the most sessions it had open at once (counted
    /// from accept to close).
    pub fn max_sessions_by_ip(&self) -> std::collections::BTreeMap<std::net::IpAddr, usize> {
        lock(&self.shared.record)
            .open_by_ip
            .iter()
            .map(|(ip, (_, max))| (*ip, *max))
            .collect()
    }

    /// Sessions left hanging ([`Act::Hang`], [`Act::StopReading`]).
    pub fn hung(&self) -> usize {
        lock(&self.shared.record).hung
    }

    /// Most messages any one connection carried, and the number of connections
    /// that carried any.
    pub fn per_connection(&self) -> (usize, usize) {
        let mut counts = std::collections::BTreeMap::new();
        for m in self.messages() {
            *counts.entry(m.conn).or_insert(0usize) += 1;
        }
        (counts.values().copied().max().unwrap_or(0), counts.len())
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept; it sees the flag and returns.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for s in lock(&self.shared.sockets).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        let sessions: Vec<JoinHandle<()>> = lock(&self.shared.sessions).drain(..).collect();
        for t in sessions {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, sh: Arc<Shared>) {
    let mut conn = 0;
    for stream in listener.incoming() {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        lock(&sh.record).accepts.push(Instant::now());
        if let Ok(clone) = stream.try_clone() {
            lock(&sh.sockets).push(clone);
        }
        let sh2 = sh.clone();
        let n = conn;
        conn += 1;
        let peer = stream.peer_addr().ok();
        if let Some(p) = peer {
            let mut r = lock(&sh.record);
            let e = r.open_by_ip.entry(p.ip()).or_default();
            e.0 += 1;
            e.1 = e.1.max(e.0);
        }
        let t = std::thread::spawn(move || {
            let mut s = Session {
                sh: &sh2,
                conn: n,
                peer,
                in_tx: false,
            };
            let _ = s.run(stream);
            s.end_tx();
            if let Some(p) = peer {
                if let Some(e) = lock(&sh2.record).open_by_ip.get_mut(&p.ip()) {
                    e.0 = e.0.saturating_sub(1);
                }
            }
        });
        lock(&sh.sessions).push(t);
    }
}

/// How a session goes on after a step.
enum Next {
    Go,
    /// Close (QUIT, a refusal, a strict refusal).
    Close,
    /// Keep the socket open, unread, until the server is dropped.
    Hold,
}

struct Session<'a> {
    sh: &'a Shared,
    conn: usize,
    peer: Option<SocketAddr>,
    in_tx: bool,
}

impl Session<'_> {
    fn act(&self, verb: &str, line: &str) -> Option<Act> {
        let lower = line.to_ascii_lowercase();
        lock(&self.sh.rules)
            .iter()
            .find(|r| r.verb == verb && r.arg.as_ref().is_none_or(|a| lower.contains(a.as_str())))
            .map(|r| r.act.clone())
    }

    fn begin_tx(&mut self) {
        if !self.in_tx {
            self.in_tx = true;
            let mut r = lock(&self.sh.record);
            r.in_tx += 1;
            r.in_tx_max = r.in_tx_max.max(r.in_tx);
        }
    }

    fn end_tx(&mut self) {
        if self.in_tx {
            self.in_tx = false;
            lock(&self.sh.record).in_tx -= 1;
        }
    }

    fn hold(&self, stream: &TcpStream) -> Next {
        lock(&self.sh.record).hung += 1;
        if let Ok(s) = stream.try_clone() {
            lock(&self.sh.sockets).push(s);
        }
        Next::Hold
    }

    /// Whether bytes of a next command are already here (what is buffered, no
    /// wait, as Postfix checks); recorded, and refused when strict.
    fn early(
        &self,
        r: &BufReader<TcpStream>,
        w: &mut TcpStream,
        after: &str,
    ) -> std::io::Result<bool> {
        let mut buffered = !r.buffer().is_empty();
        if !buffered {
            w.set_nonblocking(true)?;
            let peeked = w.peek(&mut [0u8; 64]);
            w.set_nonblocking(false)?;
            buffered = matches!(peeked, Ok(n) if n > 0);
        }
        if !buffered {
            return Ok(false);
        }
        lock(&self.sh.record).early.push(after.to_string());
        if self.sh.strict {
            w.write_all(format!("{PIPELINING_REFUSAL}\r\n").as_bytes())?;
            let _ = w.shutdown(Shutdown::Both);
        }
        Ok(self.sh.strict)
    }

    /// Sends `usual` or what the script says instead; Some(next) when the
    /// session does not go on normally.
    fn answer(
        &self,
        w: &mut TcpStream,
        verb: &str,
        line: &str,
        usual: String,
    ) -> std::io::Result<(String, Option<Next>)> {
        let reply = match self.act(verb, line) {
            None => usual,
            Some(Act::Reply(r)) => r,
            Some(Act::Delay(d)) => {
                std::thread::sleep(d);
                usual
            }
            Some(Act::Hang) => return Ok((String::new(), Some(self.hold(w)))),
            Some(Act::Refuse(r)) => {
                send(w, &r)?;
                let _ = w.shutdown(Shutdown::Both);
                return Ok((r, Some(Next::Close)));
            }
            Some(Act::StopReading) => {
                send(w, &usual)?;
                return Ok((usual, Some(self.hold(w))));
            }
        };
        send(w, &reply)?;
        Ok((reply, None))
    }

    fn run(&mut self, stream: TcpStream) -> std::io::Result<()> {
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        let mut w = stream.try_clone()?;
        let mut r = BufReader::with_capacity(64 * 1024, stream);
        send(&mut w, &format!("220 {} ESMTP", self.sh.name))?;
        let (mut mail, mut rcpts) = (String::new(), Vec::<String>::new());
        let mut chunks = Vec::new();
        let mut raw = Vec::new();
        loop {
            raw.clear();
            if r.read_until(b'\n', &mut raw)? == 0 {
                return Ok(());
            }
            let line = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            lock(&self.sh.record).commands.push(line.clone());
            let verb = line
                .split_ascii_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            // BDAT's data follows its command by design.
            if verb != "BDAT" && self.early(&r, &mut w, &line)? {
                return Ok(());
            }
            let usual = match verb.as_str() {
                "EHLO" => self.ehlo(),
                "HELO" => format!("250 {}", self.sh.name),
                "MAIL" => "250 2.1.0 Ok".into(),
                "RCPT" => "250 2.1.5 Ok".into(),
                "DATA" if rcpts.is_empty() => "554 5.5.1 Error: no valid recipients".into(),
                "DATA" => "354 End data with <CR><LF>.<CR><LF>".into(),
                "RSET" | "NOOP" => "250 2.0.0 Ok".into(),
                "QUIT" => "221 2.0.0 Bye".into(),
                "BDAT" => {
                    match self.bdat(&mut r, &mut w, &line, &mail, &mut rcpts, &mut chunks)? {
                        Next::Go => continue,
                        _ => return Ok(()),
                    }
                }
                _ => "502 5.5.2 Error: command not recognized".into(),
            };
            let (reply, next) = self.answer(&mut w, &verb, &line, usual)?;
            match next {
                Some(Next::Go) | None => {}
                Some(Next::Close) | Some(Next::Hold) => return Ok(()),
            }
            let ok = reply.starts_with('2');
            match verb.as_str() {
                "MAIL" if ok => {
                    mail = line;
                    rcpts.clear();
                    chunks.clear();
                    self.begin_tx();
                }
                "RCPT" if ok => rcpts.push(line),
                "RSET" => {
                    rcpts.clear();
                    chunks.clear();
                    self.end_tx();
                }
                "QUIT" => return Ok(()),
                "DATA" if reply.starts_with("354") => {
                    let mut body = Vec::new();
                    loop {
                        raw.clear();
                        if r.read_until(b'\n', &mut raw)? == 0 {
                            return Ok(());
                        }
                        if raw == b".\r\n" || raw == b".\n" {
                            break;
                        }
                        body.extend_from_slice(&raw);
                    }
                    if self.early(&r, &mut w, "end of data")? {
                        return Ok(());
                    }
                    match self.end_of_data(&mut w, &mail, &rcpts, body, "DATA")? {
                        Next::Go => rcpts.clear(),
                        _ => return Ok(()),
                    }
                }
                _ => {}
            }
        }
    }

    /// BDAT (RFC 3030): the chunk follows the command; LAST ends the message.
    fn bdat(
        &mut self,
        r: &mut BufReader<TcpStream>,
        w: &mut TcpStream,
        line: &str,
        mail: &str,
        rcpts: &mut Vec<String>,
        chunks: &mut Vec<u8>,
    ) -> std::io::Result<Next> {
        let mut words = line.split_ascii_whitespace().skip(1);
        let len: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let last = words.next().is_some_and(|w| w.eq_ignore_ascii_case("LAST"));
        let mut chunk = vec![0u8; len];
        r.read_exact(&mut chunk)?;
        if self.early(r, w, line)? {
            return Ok(Next::Close);
        }
        if rcpts.is_empty() {
            send(w, "554 5.5.1 Error: no valid recipients")?;
            return Ok(Next::Go);
        }
        chunks.extend_from_slice(&chunk);
        if last {
            let body = std::mem::take(chunks);
            let next = self.end_of_data(w, mail, rcpts, body, "BDAT")?;
            rcpts.clear();
            return Ok(next);
        }
        let usual = format!("250 2.0.0 {len} octets received");
        Ok(self.answer(w, "BDAT", line, usual)?.1.unwrap_or(Next::Go))
    }

    fn ehlo(&self) -> String {
        let mut lines = vec![self.sh.name.clone()];
        lines.extend(self.sh.caps.iter().cloned());
        let n = lines.len();
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}", if i + 1 == n { ' ' } else { '-' }))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The reply to the end of the message; records it when that is 2xx.
    fn end_of_data(
        &mut self,
        w: &mut TcpStream,
        mail: &str,
        rcpts: &[String],
        body: Vec<u8>,
        how: &'static str,
    ) -> std::io::Result<Next> {
        let act = self.act(END_OF_DATA, "");
        if let Some(Act::Delay(d)) = act {
            std::thread::sleep(d);
        }
        let reply = match &act {
            Some(Act::Hang) => return Ok(self.hold(w)),
            Some(Act::Reply(r)) | Some(Act::Refuse(r)) => r.clone(),
            _ => "250 2.0.0 Ok: queued".into(),
        };
        if reply.starts_with('2') {
            lock(&self.sh.record).messages.push(Received {
                at: Instant::now(),
                conn: self.conn,
                peer: self.peer,
                mail: mail.to_string(),
                rcpts: rcpts.to_vec(),
                body,
                how,
            });
        }
        self.end_tx();
        send(w, &reply)?;
        Ok(match act {
            Some(Act::Refuse(_)) => {
                let _ = w.shutdown(Shutdown::Both);
                Next::Close
            }
            Some(Act::StopReading) => self.hold(w),
            _ => Next::Go,
        })
    }
}

/// Writes a reply; "\n" between lines becomes CRLF, and one ends it.
fn send(w: &mut TcpStream, reply: &str) -> std::io::Result<()> {
    let mut out = reply.replace('\n', "\r\n");
    out.push_str("\r\n");
    w.write_all(out.as_bytes())
}

/// A scripted next hop on a loopback address of this test, and the relay
/// `--set`s (delivery on, 1 s retry) that route `domains` to it.
pub fn routed_hop(domains: &[&str]) -> (ScriptedServer, Vec<String>) {
    let ip = crate::delivery::loopback();
    let port = std::net::TcpListener::bind((ip, 0))
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let hop = ScriptedServer::builder()
        .name("hop.test")
        .capability("8BITMIME")
        .start(SocketAddr::new(ip.into(), port));
    let list: Vec<String> = domains.iter().map(|d| format!("\"{d}\"")).collect();
    let sets = vec![
        "delivery.enabled=true".into(),
        "queue.default.retry=[\"1s\"]".into(),
        format!("route.hop={{type=\"relay\",host=\"{ip}\",port={port},tls=\"none\"}}"),
        format!(
            "rule=[{{match={{recipient_domain=[{}]}},route=\"hop\"}}]",
            list.join(",")
        ),
    ];
    (hop, sets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Client;
    use crate::process::wait_until;

    fn local() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    fn greeted(server: &ScriptedServer) -> Client {
        let mut c = Client::connect(server.addr());
        assert_eq!(c.read_reply().code, 220);
        c
    }

    #[test]
    fn strict_server_refuses_a_pipelined_command_and_closes() {
        let server = ScriptedServer::builder().strict_pipelining().start(local());
        let mut c = greeted(&server);
        c.send(b"EHLO a.test\r\nMAIL FROM:<>\r\n");
        let r = c.read_reply();
        assert_eq!(r.last(), PIPELINING_REFUSAL);
        c.expect_closed();
        assert_eq!(server.early(), ["EHLO a.test"]);
        assert!(server.messages().is_empty());
    }

    #[test]
    fn lenient_server_answers_pipelined_commands_and_records_them() {
        let server = ScriptedServer::builder()
            .capability("PIPELINING")
            .capability("SIZE 1000")
            .start(local());
        let mut c = greeted(&server);
        c.send(b"EHLO a.test\r\nMAIL FROM:<s@a.test>\r\n");
        let ehlo = c.read_reply();
        assert_eq!(
            ehlo.lines,
            ["250-scripted.test", "250-PIPELINING", "250 SIZE 1000"]
        );
        assert_eq!(c.read_reply().code, 250);
        assert_eq!(server.early(), ["EHLO a.test"]);
        assert_eq!(server.commands(), ["EHLO a.test", "MAIL FROM:<s@a.test>"]);
    }

    #[test]
    fn per_verb_replies_data_and_bdat_are_recorded() {
        let server = ScriptedServer::builder()
            .capability("CHUNKING")
            .on_arg("RCPT", "<nobody", Act::Reply("550 5.1.1 no".into()))
            .start(local());
        let mut c = greeted(&server);
        c.expect("EHLO a.test", 250);
        c.expect("MAIL FROM:<s@a.test>", 250);
        c.expect("RCPT TO:<nobody@b.test>", 550);
        c.expect("RCPT TO:<r@b.test>", 250);
        c.expect("DATA", 354);
        c.send(b"Subject: one\r\n\r\n..dot\r\n.\r\n");
        assert_eq!(c.read_reply().code, 250);
        c.expect("MAIL FROM:<s@a.test>", 250);
        c.expect("RCPT TO:<q@b.test>", 250);
        c.send(b"BDAT 3\r\nabc");
        assert_eq!(c.read_reply().code, 250);
        c.send(b"BDAT 2 LAST\r\nde");
        assert_eq!(c.read_reply().code, 250);
        let m = server.messages();
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m[0].how, "DATA");
        assert_eq!(m[0].rcpt_addresses(), ["r@b.test"]);
        assert_eq!(m[0].body, b"Subject: one\r\n\r\n..dot\r\n");
        assert_eq!(m[1].how, "BDAT");
        assert_eq!(m[1].body, b"abcde");
        assert_eq!(m[1].rcpt_addresses(), ["q@b.test"]);
        assert_eq!(server.max_transactions(), 1);
    }

    #[test]
    fn refuse_closes_and_stop_reading_holds_the_session() {
        let server = ScriptedServer::builder()
            .on("MAIL", Act::Refuse("421 4.3.2 go away".into()))
            .start(local());
        let mut c = greeted(&server);
        c.expect("EHLO a.test", 250);
        c.expect("MAIL FROM:<>", 421);
        c.expect_closed();

        server.set("MAIL", None);
        server.set("DATA", Some(Act::StopReading));
        let mut c = greeted(&server);
        c.expect("EHLO a.test", 250);
        c.expect("MAIL FROM:<>", 250);
        c.expect("RCPT TO:<r@b.test>", 250);
        c.expect("DATA", 354);
        wait_until(
            "the session to be held",
            Duration::from_secs(5),
            || server.hung() == 1,
            String::new,
        );
        assert!(server.messages().is_empty());
    }
}
