//! The sink's SMTP/LMTP server session as a sans-IO state machine: bytes in,
//! replies (`output`) and events (`take_events`) out. The driver owns the socket,
//! the clock and the sleeps; this file never touches either, so every rule
//! (pipelining, DATA dot-unstuffing and its end, BDAT chunks, bounded command
//! lines, fault decisions) is tested byte by byte below.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::faults::{FaultAction, Faults, Greylist, Rng, Stage};

/// Longest command line accepted, CRLF included (RFC 5321 asks for 512; extensions
/// make lines longer, so allow more, but never unbounded).
pub const MAX_LINE: usize = 4096;
/// Header bytes kept to find the token when the body is not being saved.
const HEADER_KEEP: usize = 64 * 1024;

/// Settings shared by every session of the sink.
#[derive(Clone)]
pub struct SessionConfig {
    pub hostname: String,
    pub lmtp: bool,
    /// STARTTLS is offered (a certificate is configured).
    pub starttls: bool,
    /// AUTH PLAIN/LOGIN is offered and any credentials are accepted.
    pub auth: bool,
    /// SIZE limit in bytes (0: none advertised, none enforced).
    pub max_size: u64,
    pub max_recipients: usize,
    /// Keep every message's bytes (for --save-dir).
    pub keep_body: bool,
    /// Header the token is read from (compared case-insensitively).
    pub token_header: String,
    pub faults: Faults,
    pub delay_greeting: Duration,
    pub delay_rcpt: Duration,
    pub delay_data: Duration,
    pub greylist: Option<Arc<Greylist>>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            hostname: "sink.loadgen.invalid".into(),
            lmtp: false,
            starttls: false,
            auth: false,
            max_size: 0,
            max_recipients: 1000,
            keep_body: false,
            token_header: "Message-ID".into(),
            faults: Faults::default(),
            delay_greeting: Duration::ZERO,
            delay_rcpt: Duration::ZERO,
            delay_data: Duration::ZERO,
            greylist: None,
        }
    }
}

/// What the driver must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Write the output (when convenient) and read more input.
    Read,
    /// Write the output, then sleep this long, then (if `has_pending`) call `resume`
    /// and carry on feeding the remaining input.
    Delay(Duration),
    /// Write the output and close the connection.
    Close,
    /// Write the output, drop any input still buffered, run the TLS handshake, then
    /// call `tls_started`.
    StartTls,
}

/// A message the sink accepted (for at least one recipient in LMTP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub from: String,
    /// Recipients that got a positive reply for this message.
    pub rcpts: Vec<String>,
    /// Message bytes after dot-unstuffing (DATA) or as sent (BDAT).
    pub bytes: u64,
    pub token: Option<String>,
    /// The bytes themselves when `keep_body` is set (else empty).
    pub body: Vec<u8>,
    pub bdat: bool,
}

/// Things to count, in the order they happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Message(Box<Received>),
    /// A negative reply at RCPT or at end of data (per recipient in LMTP).
    Rejected {
        stage: Stage,
        code: u16,
    },
    /// A RCPT refused by greylisting (also counted as Rejected 451).
    Greylisted,
    /// An injected disconnect.
    Disconnected(Stage),
    /// A TLS session was established.
    Tls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineState {
    /// At the start of a line (after CRLF).
    Start,
    /// "." at the start of a line.
    Dot,
    /// ".\r" at the start of a line.
    DotCr,
    /// Inside a line; `cr`: the last byte was '\r'.
    InLine { cr: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Command,
    Data,
    Chunk {
        remaining: u64,
        last: bool,
        size: u64,
    },
    /// AUTH continuation lines still expected (PLAIN: 1, LOGIN: 2 then 1).
    Auth {
        left: u8,
    },
}

#[derive(Default)]
struct Txn {
    from: Option<String>,
    rcpts: Vec<String>,
    body: Vec<u8>,
    bytes: u64,
    headers_done: bool,
    bdat: bool,
    /// A BDAT in this transaction failed (no MAIL/RCPT): later chunks are refused.
    bdat_failed: bool,
    disconnect_mid_data: bool,
    too_big: bool,
}

pub struct Session {
    cfg: Arc<SessionConfig>,
    rng: Rng,
    out: Vec<u8>,
    events: Vec<Event>,
    phase: Phase,
    dot: LineState,
    greeted: bool,
    tls: bool,
    authed: bool,
    closed: bool,
    /// An over-long command line is being skipped up to its LF.
    discarding: bool,
    /// The RCPT delay for the command at the head of the input has been served.
    delay_served: bool,
    /// End of data seen; its reply waits for `resume` after the data delay.
    pending_eod: bool,
    txn: Txn,
}

impl Session {
    pub fn new(cfg: Arc<SessionConfig>, seed: u64) -> Session {
        Session {
            cfg,
            rng: Rng::new(seed),
            out: Vec::with_capacity(512),
            events: Vec::new(),
            phase: Phase::Command,
            dot: LineState::Start,
            greeted: false,
            tls: false,
            authed: false,
            closed: false,
            discarding: false,
            delay_served: false,
            pending_eod: false,
            txn: Txn::default(),
        }
    }

    /// How long to wait before the greeting.
    pub fn greeting_delay(&self) -> Option<Duration> {
        (!self.cfg.delay_greeting.is_zero()).then_some(self.cfg.delay_greeting)
    }

    pub fn greeting(&mut self) {
        let proto = if self.cfg.lmtp { "LMTP" } else { "ESMTP" };
        let line = format!(
            "220 {} {proto} sluice-loadgen sink ready\r\n",
            self.cfg.hostname
        );
        self.out.extend_from_slice(line.as_bytes());
    }

    pub fn output(&self) -> &[u8] {
        &self.out
    }

    pub fn clear_output(&mut self) {
        self.out.clear();
    }

    pub fn take_events(&mut self) -> std::vec::Drain<'_, Event> {
        self.events.drain(..)
    }

    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub fn has_pending(&self) -> bool {
        self.pending_eod
    }

    /// After the driver served a Delay for the end of data: produce its reply.
    pub fn resume(&mut self) -> Action {
        if !self.pending_eod {
            return Action::Read;
        }
        self.pending_eod = false;
        self.end_of_data()
    }

    /// The TLS handshake after STARTTLS succeeded: the session starts over (RFC 3207).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.greeted = false;
        self.authed = false;
        self.txn = Txn::default();
        self.phase = Phase::Command;
        self.events.push(Event::Tls);
    }

    fn reply(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// Feeds input; returns how many bytes were used and what to do next. Input not
    /// used (an incomplete command line, at most MAX_LINE bytes) must be presented
    /// again, followed by new bytes.
    pub fn receive(&mut self, input: &[u8]) -> (usize, Action) {
        let mut pos = 0;
        loop {
            if self.closed {
                return (input.len(), Action::Close);
            }
            match self.phase {
                Phase::Data => {
                    if pos == input.len() {
                        return (pos, Action::Read);
                    }
                    if self.txn.disconnect_mid_data {
                        return (input.len(), self.disconnect(Stage::MidData));
                    }
                    let (used, ended) = self.data(&input[pos..]);
                    pos += used;
                    if ended {
                        self.phase = Phase::Command;
                        if let Some(a) = self.after_end() {
                            return (pos, a);
                        }
                    }
                }
                Phase::Chunk {
                    remaining,
                    last,
                    size,
                } => {
                    if remaining > 0 {
                        if pos == input.len() {
                            return (pos, Action::Read);
                        }
                        if self.txn.disconnect_mid_data {
                            return (input.len(), self.disconnect(Stage::MidData));
                        }
                        let take = remaining.min((input.len() - pos) as u64) as usize;
                        if !self.txn.bdat_failed {
                            self.emit(&input[pos..pos + take]);
                        }
                        pos += take;
                        self.phase = Phase::Chunk {
                            remaining: remaining - take as u64,
                            last,
                            size,
                        };
                        continue;
                    }
                    self.phase = Phase::Command;
                    if self.txn.bdat_failed {
                        self.reply("503 5.5.1 Error: need MAIL and RCPT before BDAT");
                        if last {
                            self.txn = Txn::default();
                        }
                    } else if !last {
                        self.reply(&format!("250 2.0.0 {size} octets received"));
                    } else if let Some(a) = self.after_end() {
                        return (pos, a);
                    }
                }
                Phase::Command | Phase::Auth { .. } => {
                    if pos == input.len() {
                        return (pos, Action::Read);
                    }
                    let rest = &input[pos..];
                    let Some(lf) = memchr::memchr(b'\n', rest) else {
                        if self.discarding || rest.len() >= MAX_LINE {
                            self.discarding = true;
                            return (input.len(), Action::Read);
                        }
                        return (pos, Action::Read);
                    };
                    if self.discarding || lf + 1 > MAX_LINE {
                        self.discarding = false;
                        pos += lf + 1;
                        self.reply("500 5.5.2 Error: line too long");
                        continue;
                    }
                    let mut line = &rest[..lf];
                    if line.last() == Some(&b'\r') {
                        line = &line[..line.len() - 1];
                    }
                    if let Phase::Auth { left } = self.phase {
                        pos += lf + 1;
                        self.auth_line(line, left);
                        continue;
                    }
                    if !self.cfg.delay_rcpt.is_zero() && is_verb(line, b"RCPT") {
                        if !self.delay_served {
                            self.delay_served = true;
                            return (pos, Action::Delay(self.cfg.delay_rcpt));
                        }
                        self.delay_served = false;
                    }
                    pos += lf + 1;
                    // Own the line so the command handlers may borrow self mutably.
                    let line = line.to_vec();
                    match self.command(&line) {
                        Action::Read => {}
                        Action::StartTls => return (input.len(), Action::StartTls),
                        other => return (pos, other),
                    }
                }
            }
        }
    }

    /// End of data (DATA or BDAT LAST) reached: delay or reply now.
    fn after_end(&mut self) -> Option<Action> {
        if !self.cfg.delay_data.is_zero() {
            self.pending_eod = true;
            return Some(Action::Delay(self.cfg.delay_data));
        }
        match self.end_of_data() {
            Action::Read => None,
            other => Some(other),
        }
    }

    fn disconnect(&mut self, stage: Stage) -> Action {
        self.events.push(Event::Disconnected(stage));
        self.closed = true;
        Action::Close
    }

    /// Message bytes (after unstuffing): count, and keep what is needed.
    fn emit(&mut self, bytes: &[u8]) {
        let txn = &mut self.txn;
        txn.bytes += bytes.len() as u64;
        if self.cfg.max_size > 0 && txn.bytes > self.cfg.max_size {
            txn.too_big = true;
        }
        if self.cfg.keep_body && !txn.too_big {
            txn.body.extend_from_slice(bytes);
            if !txn.headers_done {
                txn.headers_done = header_end(&txn.body, bytes.len()).is_some();
            }
        } else if !txn.headers_done {
            let room = HEADER_KEEP.saturating_sub(txn.body.len());
            txn.body.extend_from_slice(&bytes[..bytes.len().min(room)]);
            txn.headers_done =
                header_end(&txn.body, bytes.len()).is_some() || txn.body.len() >= HEADER_KEEP;
        }
    }

    /// Decodes DATA bytes: drops the stuffed dots, stops at CRLF.CRLF.
    /// Returns bytes used and whether the end was reached.
    fn data(&mut self, input: &[u8]) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() {
            match self.dot {
                LineState::Start => {
                    if input[i] == b'.' {
                        self.dot = LineState::Dot;
                        i += 1;
                    } else {
                        self.dot = LineState::InLine { cr: false };
                    }
                }
                LineState::Dot => {
                    if input[i] == b'\r' {
                        self.dot = LineState::DotCr;
                        i += 1;
                    } else {
                        // A stuffed dot: dropped; the byte belongs to the line.
                        self.dot = LineState::InLine { cr: false };
                    }
                }
                LineState::DotCr => {
                    if input[i] == b'\n' {
                        self.dot = LineState::Start;
                        return (i + 1, true);
                    }
                    // ".\r" then something else: the dot was stuffing, the CR is data.
                    self.emit(b"\r");
                    self.dot = LineState::InLine { cr: true };
                }
                LineState::InLine { cr } => match memchr::memchr(b'\n', &input[i..]) {
                    Some(off) => {
                        let crlf = if off > 0 {
                            input[i + off - 1] == b'\r'
                        } else {
                            cr
                        };
                        let end = i + off + 1;
                        self.emit(&input[i..end]);
                        i = end;
                        self.dot = if crlf {
                            LineState::Start
                        } else {
                            LineState::InLine { cr: false }
                        };
                    }
                    None => {
                        let seg = &input[i..];
                        let cr = seg.last() == Some(&b'\r');
                        self.emit(seg);
                        i = input.len();
                        self.dot = LineState::InLine { cr };
                    }
                },
            }
        }
        (i, false)
    }

    fn end_of_data(&mut self) -> Action {
        let txn = std::mem::take(&mut self.txn);
        let from = txn.from.clone().unwrap_or_default();
        if self.cfg.lmtp {
            let mut accepted = Vec::new();
            for rcpt in &txn.rcpts {
                if txn.too_big {
                    self.reply("552 5.3.4 Error: message too big");
                    self.events.push(Event::Rejected {
                        stage: Stage::Data,
                        code: 552,
                    });
                    continue;
                }
                match self
                    .cfg
                    .faults
                    .pick(Stage::Data, std::slice::from_ref(rcpt), &mut self.rng)
                    .cloned()
                {
                    None => {
                        self.reply(&format!("250 2.1.5 <{rcpt}> delivered"));
                        accepted.push(rcpt.clone());
                    }
                    Some(FaultAction::Disconnect) => {
                        self.finish(&txn, &from, accepted);
                        return self.disconnect(Stage::Data);
                    }
                    Some(FaultAction::Reply { code, esc, text }) => {
                        self.reply(&format!("{code} {esc} <{rcpt}> {text}"));
                        self.events.push(Event::Rejected {
                            stage: Stage::Data,
                            code,
                        });
                    }
                }
            }
            self.finish(&txn, &from, accepted);
            return Action::Read;
        }
        if txn.too_big {
            self.reply("552 5.3.4 Error: message too big");
            self.events.push(Event::Rejected {
                stage: Stage::Data,
                code: 552,
            });
            return Action::Read;
        }
        match self
            .cfg
            .faults
            .pick(Stage::Data, &txn.rcpts, &mut self.rng)
            .cloned()
        {
            None => {
                let rcpts = txn.rcpts.clone();
                self.finish(&txn, &from, rcpts);
                self.reply("250 2.0.0 Ok: queued");
                Action::Read
            }
            Some(FaultAction::Disconnect) => self.disconnect(Stage::Data),
            Some(FaultAction::Reply { code, esc, text }) => {
                self.reply(&format!("{code} {esc} {text}"));
                self.events.push(Event::Rejected {
                    stage: Stage::Data,
                    code,
                });
                if code == 421 {
                    self.closed = true;
                    return Action::Close;
                }
                Action::Read
            }
        }
    }

    /// Records an accepted message (if any recipient was accepted).
    fn finish(&mut self, txn: &Txn, from: &str, rcpts: Vec<String>) {
        if rcpts.is_empty() {
            return;
        }
        let token = header_value(&txn.body, &self.cfg.token_header).and_then(|v| token_of(&v));
        let body = if self.cfg.keep_body {
            txn.body.clone()
        } else {
            Vec::new()
        };
        self.events.push(Event::Message(Box::new(Received {
            from: from.to_string(),
            rcpts,
            bytes: txn.bytes,
            token,
            body,
            bdat: txn.bdat,
        })));
    }

    fn ehlo_reply(&mut self, arg: &str) {
        let mut lines = vec![format!("{} greets {arg}", self.cfg.hostname)];
        lines.push("PIPELINING".into());
        lines.push("8BITMIME".into());
        lines.push("SMTPUTF8".into());
        lines.push("DSN".into());
        lines.push(format!("SIZE {}", self.cfg.max_size));
        lines.push("CHUNKING".into());
        lines.push("ENHANCEDSTATUSCODES".into());
        if self.cfg.starttls && !self.tls {
            lines.push("STARTTLS".into());
        }
        if self.cfg.auth {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        let n = lines.len();
        for (i, l) in lines.iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            self.out
                .extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
        }
    }

    fn command(&mut self, line: &[u8]) -> Action {
        let verb_end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
        let verb = line[..verb_end].to_ascii_uppercase();
        let arg = String::from_utf8_lossy(&line[verb_end..])
            .trim()
            .to_string();
        match verb.as_slice() {
            b"EHLO" | b"HELO" | b"LHLO" => {
                let lhlo = verb == b"LHLO";
                if lhlo != self.cfg.lmtp {
                    self.reply(if self.cfg.lmtp {
                        "500 5.5.1 Error: this is LMTP, use LHLO"
                    } else {
                        "500 5.5.1 Error: command not recognized"
                    });
                } else if arg.is_empty() {
                    self.reply("501 5.5.4 Syntax: EHLO hostname");
                } else {
                    self.txn = Txn::default();
                    self.greeted = true;
                    if verb == b"HELO" {
                        let l = format!("250 {}", self.cfg.hostname);
                        self.reply(&l);
                    } else {
                        self.ehlo_reply(&arg);
                    }
                }
            }
            b"MAIL" => self.mail(&arg),
            b"RCPT" => return self.rcpt(&arg),
            b"DATA" => {
                if !arg.is_empty() {
                    self.reply("501 5.5.4 Syntax: DATA");
                } else if self.txn.from.is_none() {
                    self.reply("503 5.5.1 Error: need MAIL command");
                } else if self.txn.rcpts.is_empty() {
                    self.reply("554 5.5.1 Error: no valid recipients");
                } else if self.txn.bdat {
                    self.reply("503 5.5.1 Error: DATA after BDAT");
                } else {
                    self.reply("354 End data with <CR><LF>.<CR><LF>");
                    self.phase = Phase::Data;
                    self.dot = LineState::Start;
                    self.txn.disconnect_mid_data = self.draw_mid_data();
                }
            }
            b"BDAT" => self.bdat(&arg),
            b"RSET" => {
                self.txn = Txn::default();
                self.reply("250 2.0.0 Ok");
            }
            b"NOOP" => self.reply("250 2.0.0 Ok"),
            b"QUIT" => {
                self.reply("221 2.0.0 Bye");
                self.closed = true;
                return Action::Close;
            }
            b"VRFY" => self.reply("252 2.5.2 Cannot VRFY user, but will accept message"),
            b"HELP" => self.reply("214 2.0.0 sluice-loadgen sink"),
            b"STARTTLS" => {
                if !self.cfg.starttls {
                    self.reply("502 5.5.1 Error: command not implemented");
                } else if self.tls {
                    self.reply("503 5.5.1 Error: TLS already active");
                } else if !arg.is_empty() {
                    self.reply("501 5.5.4 Syntax: STARTTLS");
                } else {
                    self.reply("220 2.0.0 Ready to start TLS");
                    return Action::StartTls;
                }
            }
            b"AUTH" => self.auth(&arg),
            b"" => self.reply("500 5.5.2 Error: bad syntax"),
            _ => self.reply("500 5.5.2 Error: command not recognized"),
        }
        Action::Read
    }

    fn draw_mid_data(&mut self) -> bool {
        matches!(
            self.cfg
                .faults
                .pick(Stage::MidData, &self.txn.rcpts, &mut self.rng),
            Some(FaultAction::Disconnect)
        )
    }

    fn mail(&mut self, arg: &str) {
        if !self.greeted {
            self.reply("503 5.5.1 Error: send HELO/EHLO first");
            return;
        }
        if self.txn.from.is_some() {
            self.reply("503 5.5.1 Error: nested MAIL command");
            return;
        }
        let Some((path, params)) = parse_path(arg, "FROM:") else {
            self.reply("501 5.5.4 Syntax: MAIL FROM:<address>");
            return;
        };
        for p in params.split_ascii_whitespace() {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            if k.eq_ignore_ascii_case("SIZE") {
                match v.parse::<u64>() {
                    Ok(n) if self.cfg.max_size > 0 && n > self.cfg.max_size => {
                        self.reply("552 5.3.4 Error: message size exceeds limit");
                        return;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        self.reply("501 5.5.4 Error: bad SIZE parameter");
                        return;
                    }
                }
            }
        }
        self.txn = Txn {
            from: Some(path),
            ..Txn::default()
        };
        self.reply("250 2.1.0 Ok");
    }

    fn rcpt(&mut self, arg: &str) -> Action {
        if self.txn.from.is_none() {
            self.reply("503 5.5.1 Error: need MAIL command");
            return Action::Read;
        }
        let Some((path, _params)) = parse_path(arg, "TO:") else {
            self.reply("501 5.5.4 Syntax: RCPT TO:<address>");
            return Action::Read;
        };
        if path.is_empty() {
            self.reply("501 5.1.3 Error: empty recipient");
            return Action::Read;
        }
        if self.txn.rcpts.len() >= self.cfg.max_recipients {
            self.reply("452 4.5.3 Error: too many recipients");
            self.events.push(Event::Rejected {
                stage: Stage::Rcpt,
                code: 452,
            });
            return Action::Read;
        }
        if let Some(g) = &self.cfg.greylist {
            let from = self.txn.from.as_deref().unwrap_or("");
            if !g.check(from, &path, Instant::now()) {
                self.reply("451 4.7.1 Greylisted, please try again later");
                self.events.push(Event::Greylisted);
                self.events.push(Event::Rejected {
                    stage: Stage::Rcpt,
                    code: 451,
                });
                return Action::Read;
            }
        }
        match self
            .cfg
            .faults
            .pick(Stage::Rcpt, std::slice::from_ref(&path), &mut self.rng)
            .cloned()
        {
            None => {
                self.txn.rcpts.push(path);
                self.reply("250 2.1.5 Ok");
                Action::Read
            }
            Some(FaultAction::Disconnect) => self.disconnect(Stage::Rcpt),
            Some(FaultAction::Reply { code, esc, text }) => {
                self.reply(&format!("{code} {esc} {text}"));
                self.events.push(Event::Rejected {
                    stage: Stage::Rcpt,
                    code,
                });
                if code == 421 {
                    self.closed = true;
                    return Action::Close;
                }
                Action::Read
            }
        }
    }

    fn bdat(&mut self, arg: &str) {
        let mut parts = arg.split_ascii_whitespace();
        let size = parts.next().and_then(|s| s.parse::<u64>().ok());
        let last = match parts.next() {
            None => Some(false),
            Some(l) if l.eq_ignore_ascii_case("LAST") => Some(true),
            Some(_) => None,
        };
        let (Some(size), Some(last), None) = (size, last, parts.next()) else {
            self.reply("501 5.5.4 Syntax: BDAT size [LAST]");
            return;
        };
        if self.txn.from.is_none() || self.txn.rcpts.is_empty() || self.txn.bdat_failed {
            // The chunk still follows on the wire: swallow it, then refuse.
            self.txn.bdat_failed = true;
        } else if !self.txn.bdat {
            self.txn.bdat = true;
            self.txn.disconnect_mid_data = self.draw_mid_data();
        }
        self.phase = Phase::Chunk {
            remaining: size,
            last,
            size,
        };
    }

    fn auth(&mut self, arg: &str) {
        if !self.cfg.auth {
            self.reply("502 5.5.1 Error: command not implemented");
            return;
        }
        if self.authed {
            self.reply("503 5.5.1 Error: already authenticated");
            return;
        }
        let mut parts = arg.split_ascii_whitespace();
        let mech = parts.next().unwrap_or("").to_ascii_uppercase();
        let initial = parts.next();
        match (mech.as_str(), initial) {
            ("PLAIN", Some(_)) => self.auth_ok(),
            ("PLAIN", None) => {
                self.reply("334 ");
                self.phase = Phase::Auth { left: 1 };
            }
            ("LOGIN", Some(_)) => {
                self.reply("334 UGFzc3dvcmQ6");
                self.phase = Phase::Auth { left: 1 };
            }
            ("LOGIN", None) => {
                self.reply("334 VXNlcm5hbWU6");
                self.phase = Phase::Auth { left: 2 };
            }
            _ => self.reply("504 5.5.4 Error: unsupported mechanism"),
        }
    }

    fn auth_line(&mut self, line: &[u8], left: u8) {
        if line == b"*" {
            self.phase = Phase::Command;
            self.reply("501 5.7.0 Authentication cancelled");
            return;
        }
        if left > 1 {
            self.phase = Phase::Auth { left: left - 1 };
            self.reply("334 UGFzc3dvcmQ6");
        } else {
            self.phase = Phase::Command;
            self.auth_ok();
        }
    }

    fn auth_ok(&mut self) {
        self.authed = true;
        self.reply("235 2.7.0 Authentication successful");
    }
}

/// Whether a command line starts with this verb (case-insensitive).
fn is_verb(line: &[u8], verb: &[u8]) -> bool {
    line.len() >= verb.len()
        && line[..verb.len()].eq_ignore_ascii_case(verb)
        && (line.len() == verb.len() || line[verb.len()] == b' ')
}

/// "FROM:<a@b> SIZE=10" → ("a@b", "SIZE=10"). Lenient about spaces and brackets.
fn parse_path(arg: &str, keyword: &str) -> Option<(String, String)> {
    if arg.len() < keyword.len() || !arg[..keyword.len()].eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = arg[keyword.len()..].trim_start();
    if let Some(inner) = rest.strip_prefix('<') {
        let close = inner.find('>')?;
        let path = inner[..close].to_string();
        // A source route (@a,@b:user@c) is ignored, as RFC 5321 allows.
        let path = match path.split_once(':') {
            Some((route, p)) if route.starts_with('@') => p.to_string(),
            _ => path,
        };
        Some((path, inner[close + 1..].trim().to_string()))
    } else {
        let mut it = rest.splitn(2, ' ');
        let path = it.next()?.to_string();
        if path.is_empty() {
            return None;
        }
        Some((path, it.next().unwrap_or("").trim().to_string()))
    }
}

/// Where the header section ends (index of the blank line's LF + 1), looking only
/// at the part that may have changed after `added` new bytes were appended.
fn header_end(body: &[u8], added: usize) -> Option<usize> {
    if body.starts_with(b"\r\n") {
        return Some(2);
    }
    let from = body.len().saturating_sub(added + 3);
    memchr::memmem::find(&body[from..], b"\r\n\r\n").map(|i| from + i + 4)
}

/// The unfolded value of the first header called `name` in the header section.
pub fn header_value(msg: &[u8], name: &str) -> Option<String> {
    let end = header_end(msg, msg.len()).unwrap_or(msg.len());
    let headers = &msg[..end];
    let mut lines = headers.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if !line[..colon]
            .trim_ascii()
            .eq_ignore_ascii_case(name.as_bytes())
        {
            continue;
        }
        let mut value = line[colon + 1..].to_vec();
        while let Some(next) = lines.peek() {
            if matches!(next.first(), Some(b' ') | Some(b'\t')) {
                let next = lines.next().unwrap_or_default();
                value.push(b' ');
                value.extend_from_slice(next.strip_suffix(b"\r").unwrap_or(next).trim_ascii());
            } else {
                break;
            }
        }
        return Some(String::from_utf8_lossy(value.trim_ascii()).into_owned());
    }
    None
}

/// The token in a header value: "<tok@loadgen>" → "tok", "load tok" → "tok".
pub fn token_of(value: &str) -> Option<String> {
    let mut v = value.trim();
    if let (Some(open), Some(close)) = (v.find('<'), v.rfind('>')) {
        if open < close {
            v = &v[open + 1..close];
        }
    }
    let v = match v.rsplit_once('@') {
        Some((left, _)) => left,
        None => v.split_ascii_whitespace().last().unwrap_or(""),
    };
    let v = v.trim();
    (!v.is_empty()).then(|| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::faults::Fault;
    use super::*;

    fn cfg() -> SessionConfig {
        SessionConfig {
            keep_body: true,
            ..SessionConfig::default()
        }
    }

    fn session(c: SessionConfig) -> Session {
        let mut s = Session::new(Arc::new(c), 1);
        s.greeting();
        s
    }

    /// Feeds input the way the driver does (re-presenting unused bytes), serving
    /// delays at once. Returns the output and the last action.
    fn feed(s: &mut Session, input: &[u8]) -> (String, Action) {
        let mut pos = 0;
        let mut last = Action::Read;
        while pos < input.len() {
            let (used, action) = s.receive(&input[pos..]);
            pos += used;
            match action {
                Action::Read => {
                    if used == 0 {
                        break;
                    }
                }
                Action::Delay(_) => {
                    if s.has_pending() {
                        let a = s.resume();
                        if a == Action::Close {
                            last = a;
                            break;
                        }
                    }
                }
                other => {
                    last = other;
                    break;
                }
            }
        }
        let out = String::from_utf8_lossy(s.output()).into_owned();
        s.clear_output();
        (out, last)
    }

    /// Feeds input one byte at a time (a driver that re-presents leftovers).
    fn feed_bytewise(s: &mut Session, input: &[u8]) -> String {
        let mut pending: Vec<u8> = Vec::new();
        for &b in input {
            pending.push(b);
            loop {
                let (used, action) = s.receive(&pending);
                pending.drain(..used);
                match action {
                    Action::Delay(_) => {
                        if s.has_pending() {
                            s.resume();
                        }
                        continue;
                    }
                    Action::Read => break,
                    _ => return String::from_utf8_lossy(s.output()).into_owned(),
                }
            }
        }
        String::from_utf8_lossy(s.output()).into_owned()
    }

    fn messages(s: &mut Session) -> Vec<Received> {
        s.take_events()
            .filter_map(|e| match e {
                Event::Message(m) => Some(*m),
                _ => None,
            })
            .collect()
    }

    fn codes(out: &str) -> Vec<u16> {
        out.lines()
            .filter(|l| l.len() >= 4 && l.as_bytes()[3] == b' ')
            .map(|l| l[..3].parse().unwrap())
            .collect()
    }

    #[test]
    fn pipelined_transaction_and_dot_unstuffing() {
        let mut s = session(cfg());
        let input = b"EHLO c\r\nMAIL FROM:<a@x> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<b@y.example> NOTIFY=NEVER\r\nRCPT TO:<c@z.example>\r\nDATA\r\n\
Message-ID: <tok-1@loadgen>\r\n\r\n..leading dot\r\n.x\r\n..\r\n.\r\nQUIT\r\n";
        let (out, action) = feed(&mut s, input);
        assert_eq!(action, Action::Close);
        assert_eq!(codes(&out), vec![220, 250, 250, 250, 250, 354, 250, 221]);
        assert!(out.contains("250-PIPELINING\r\n") && out.contains("250-CHUNKING\r\n"));
        let m = messages(&mut s);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].from, "a@x");
        assert_eq!(m[0].rcpts, vec!["b@y.example", "c@z.example"]);
        assert_eq!(m[0].token.as_deref(), Some("tok-1"));
        assert_eq!(
            m[0].body,
            b"Message-ID: <tok-1@loadgen>\r\n\r\n.leading dot\r\nx\r\n.\r\n"
        );
        assert_eq!(m[0].bytes, m[0].body.len() as u64);
    }

    #[test]
    fn every_split_point_gives_the_same_result() {
        let input: &[u8] = b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@y>\r\nDATA\r\nSubject: load t9\r\n\r\n..a\r\n.b\r\n\r\n.\r\r\n.x.\r\n..\r\n.\r\nNOOP\r\n";
        let expected_body = b"Subject: load t9\r\n\r\n.a\r\nb\r\n\r\n\r\r\nx.\r\n.\r\n".to_vec();
        for split in 0..=input.len() {
            let mut s = session(SessionConfig {
                token_header: "subject".into(),
                ..cfg()
            });
            let mut out = String::new();
            let mut pending = Vec::new();
            for part in [&input[..split], &input[split..]] {
                pending.extend_from_slice(part);
                let (used, _) = s.receive(&pending);
                pending.drain(..used);
            }
            out.push_str(&String::from_utf8_lossy(s.output()));
            assert_eq!(
                codes(&out),
                vec![220, 250, 250, 250, 354, 250, 250],
                "split {split}"
            );
            let m = messages(&mut s);
            assert_eq!(m.len(), 1, "split {split}");
            assert_eq!(m[0].body, expected_body, "split {split}");
            assert_eq!(m[0].token.as_deref(), Some("t9"));
        }
        let mut s = session(cfg());
        let out = feed_bytewise(&mut s, input);
        assert_eq!(codes(&out), vec![220, 250, 250, 250, 354, 250, 250]);
        assert_eq!(messages(&mut s)[0].body, expected_body);
    }

    #[test]
    fn end_needs_crlf_dot_crlf() {
        let mut s = session(cfg());
        // Bare LF before the dot and ".\n" do not end the data.
        let (out, _) = feed(
            &mut s,
            b"HELO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\nx\n.\r\ny\r\n.\n\r\n.\r\n",
        );
        assert_eq!(codes(&out), vec![220, 250, 250, 250, 354, 250]);
        assert_eq!(messages(&mut s)[0].body, b"x\n.\r\ny\r\n\n\r\n");
        // Empty message.
        let (out, _) = feed(&mut s, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n.\r\n");
        assert_eq!(codes(&out), vec![250, 250, 354, 250]);
        let m = messages(&mut s);
        assert_eq!((m[0].bytes, m[0].token.clone()), (0, None));
    }

    #[test]
    fn bdat_chunks_raw_and_pipelined() {
        let mut s = session(cfg());
        let chunk1 = b"Message-ID: <bd@loadgen>\r\n\r\n.dot stays\r\n";
        let chunk2 = b"\r\n.\r\nend";
        let mut input = b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n".to_vec();
        input.extend_from_slice(format!("BDAT {}\r\n", chunk1.len()).as_bytes());
        input.extend_from_slice(chunk1);
        input.extend_from_slice(format!("BDAT {} LAST\r\n", chunk2.len()).as_bytes());
        input.extend_from_slice(chunk2);
        input.extend_from_slice(b"QUIT\r\n");
        let out = feed_bytewise(&mut s, &input);
        assert_eq!(codes(&out), vec![220, 250, 250, 250, 250, 250, 221]);
        assert!(out.contains(&format!("250 2.0.0 {} octets received", chunk1.len())));
        let m = messages(&mut s);
        let mut body = chunk1.to_vec();
        body.extend_from_slice(chunk2);
        assert_eq!(m[0].body, body);
        assert!(m[0].bdat);
        assert_eq!(m[0].token.as_deref(), Some("bd"));
    }

    #[test]
    fn bdat_without_transaction_swallows_the_chunk() {
        let mut s = session(cfg());
        let (out, _) = feed(
            &mut s,
            b"EHLO c\r\nBDAT 6 LAST\r\nQUIT\r\nNOOP\r\nBDAT 0 LAST\r\nBDAT x\r\n",
        );
        assert_eq!(codes(&out), vec![220, 250, 503, 250, 503, 501]);
        assert!(messages(&mut s).is_empty());
        // DATA after BDAT is refused; BDAT 0 LAST ends an empty message.
        let (out, _) = feed(
            &mut s,
            b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 1\r\nxDATA\r\nBDAT 0 LAST\r\n",
        );
        assert_eq!(codes(&out), vec![250, 250, 250, 503, 250]);
        assert_eq!(messages(&mut s)[0].body, b"x");
    }

    #[test]
    fn sequence_errors_and_long_lines() {
        let mut s = session(cfg());
        let (out, _) = feed(&mut s, b"MAIL FROM:<a@x>\r\nEHLO c\r\nRCPT TO:<b@y>\r\nDATA\r\nMAIL FROM:<a@x>\r\nMAIL FROM:<a@x>\r\nDATA\r\nFOO\r\n\r\n");
        assert_eq!(
            codes(&out),
            vec![220, 503, 250, 503, 503, 250, 503, 554, 500, 500]
        );
        let mut long = vec![b'N'; MAX_LINE * 3];
        long.extend_from_slice(b"\r\nNOOP\r\n");
        let out = feed_bytewise(&mut s, &long);
        assert_eq!(codes(&out), vec![500, 250]);
        assert!(out.contains("500 5.5.2 Error: line too long"));
        // A line too long that arrives at once is refused the same way.
        let mut s = session(cfg());
        let (out, _) = feed(&mut s, &long);
        assert_eq!(codes(&out), vec![220, 500, 250]);
    }

    #[test]
    fn size_limit() {
        let mut s = session(SessionConfig {
            max_size: 10,
            ..cfg()
        });
        let (out, _) = feed(&mut s, b"EHLO c\r\nMAIL FROM:<a@x> SIZE=11\r\nMAIL FROM:<a@x> SIZE=9\r\nRCPT TO:<b@y>\r\nDATA\r\n0123456789abc\r\n.\r\n");
        assert!(out.contains("250-SIZE 10\r\n"));
        assert_eq!(codes(&out), vec![220, 250, 552, 250, 250, 354, 552]);
        assert!(messages(&mut s).is_empty());
    }

    #[test]
    fn lmtp_replies_per_recipient() {
        let mut c = cfg();
        c.lmtp = true;
        c.faults
            .list
            .push(Fault::parse("at=data,code=452,share=1,domain=full.example").unwrap());
        let mut s = session(c);
        let (out, _) = feed(&mut s, b"EHLO c\r\nLHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@ok.example>\r\nRCPT TO:<c@full.example>\r\nRCPT TO:<d@ok.example>\r\nDATA\r\nhi\r\n.\r\n");
        assert!(out.starts_with("220 sink.loadgen.invalid LMTP"));
        assert_eq!(
            codes(&out),
            vec![220, 500, 250, 250, 250, 250, 250, 354, 250, 452, 250]
        );
        let m = messages(&mut s);
        assert_eq!(m[0].rcpts, vec!["b@ok.example", "d@ok.example"]);
    }

    #[test]
    fn faults_at_rcpt_and_data() {
        let mut c = cfg();
        c.faults
            .list
            .push(Fault::parse("at=rcpt,code=550,share=1,prefix=bad").unwrap());
        c.faults
            .list
            .push(Fault::parse("at=data,code=451,share=1,domain=slow.example").unwrap());
        c.faults
            .list
            .push(Fault::parse("at=rcpt,code=421,share=1,prefix=close").unwrap());
        let mut s = session(c);
        let (out, _) = feed(&mut s, b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<bad@x>\r\nRCPT TO:<ok@slow.example>\r\nDATA\r\nhi\r\n.\r\n");
        assert_eq!(codes(&out), vec![220, 250, 250, 550, 250, 354, 451]);
        let events: Vec<Event> = s.take_events().collect();
        assert_eq!(
            events,
            vec![
                Event::Rejected {
                    stage: Stage::Rcpt,
                    code: 550
                },
                Event::Rejected {
                    stage: Stage::Data,
                    code: 451
                }
            ]
        );
        let (out, action) = feed(&mut s, b"MAIL FROM:<a@x>\r\nRCPT TO:<close@x>\r\nNOOP\r\n");
        assert_eq!(codes(&out), vec![250, 421]);
        assert_eq!(action, Action::Close);
    }

    #[test]
    fn disconnect_mid_data_and_at_data() {
        let mut c = cfg();
        c.faults
            .list
            .push(Fault::parse("at=mid-data,share=1,domain=cut.example").unwrap());
        c.faults
            .list
            .push(Fault::parse("at=data,disconnect,share=1,domain=eod.example").unwrap());
        let mut s = session(c.clone());
        let (out, action) = feed(
            &mut s,
            b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@cut.example>\r\nDATA\r\n",
        );
        assert_eq!(codes(&out), vec![220, 250, 250, 250, 354]);
        assert_eq!(action, Action::Read);
        let (out, action) = feed(&mut s, b"Subject: x\r\n\r\nbody\r\n.\r\n");
        assert_eq!((out.as_str(), action), ("", Action::Close));
        assert!(s
            .take_events()
            .any(|e| e == Event::Disconnected(Stage::MidData)));
        // BDAT too.
        let mut s = session(c.clone());
        let (out, action) = feed(
            &mut s,
            b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@cut.example>\r\nBDAT 4 LAST\r\nbody",
        );
        assert_eq!(codes(&out), vec![220, 250, 250, 250]);
        assert_eq!(action, Action::Close);
        // At end of data: everything received, no reply.
        let mut s = session(c);
        let (out, action) = feed(
            &mut s,
            b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@eod.example>\r\nDATA\r\nbody\r\n.\r\n",
        );
        assert_eq!(codes(&out), vec![220, 250, 250, 250, 354]);
        assert_eq!(action, Action::Close);
        assert!(messages(&mut s).is_empty());
    }

    #[test]
    fn greylisting_first_attempt() {
        let mut c = cfg();
        c.greylist = Some(Arc::new(Greylist::new(Duration::ZERO)));
        let c = Arc::new(c);
        let mut s = Session::new(c.clone(), 3);
        let (out, _) = feed(
            &mut s,
            b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<b@y>\r\n",
        );
        assert_eq!(codes(&out), vec![250, 250, 451, 250]);
        assert!(out.contains("451 4.7.1 "));
        // Another session (another core) sees the same list.
        let mut s = Session::new(c, 4);
        let (out, _) = feed(&mut s, b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n");
        assert_eq!(codes(&out), vec![250, 250, 250]);
    }

    #[test]
    fn delays_are_actions() {
        let mut c = cfg();
        c.delay_rcpt = Duration::from_millis(5);
        c.delay_data = Duration::from_millis(7);
        c.delay_greeting = Duration::from_millis(3);
        let mut s = Session::new(Arc::new(c), 1);
        assert_eq!(s.greeting_delay(), Some(Duration::from_millis(3)));
        let input = b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\nx\r\n.\r\nNOOP\r\n";
        let (used, a) = s.receive(input);
        assert_eq!(a, Action::Delay(Duration::from_millis(5)));
        assert_eq!(&input[used..used + 4], b"RCPT");
        let rest = &input[used..];
        let (used2, a) = s.receive(rest);
        assert_eq!(a, Action::Delay(Duration::from_millis(7)));
        assert!(s.has_pending());
        assert!(!String::from_utf8_lossy(s.output()).contains("Ok: queued"));
        assert_eq!(s.resume(), Action::Read);
        assert!(String::from_utf8_lossy(s.output()).contains("Ok: queued"));
        let (_, a) = s.receive(&rest[used2..]);
        assert_eq!(a, Action::Read);
        assert_eq!(
            codes(&String::from_utf8_lossy(s.output())),
            vec![250, 250, 250, 354, 250, 250]
        );
    }

    #[test]
    fn starttls_and_auth() {
        let mut c = cfg();
        c.starttls = true;
        c.auth = true;
        let mut s = session(c);
        let (out, a) = feed(&mut s, b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<smuggled@x>\r\n");
        assert!(out.contains("250-STARTTLS\r\n") && out.contains("AUTH PLAIN LOGIN"));
        assert_eq!(codes(&out), vec![220, 250, 220]);
        assert_eq!(a, Action::StartTls);
        s.tls_started();
        let (out, _) = feed(
            &mut s,
            b"MAIL FROM:<a@x>\r\nEHLO c\r\nAUTH PLAIN AGEAYg==\r\nAUTH PLAIN\r\n",
        );
        assert!(!out.contains("STARTTLS"));
        assert_eq!(codes(&out), vec![503, 250, 235, 503]);
        let mut s = session(SessionConfig {
            auth: true,
            ..cfg()
        });
        let (out, _) = feed(&mut s, b"EHLO c\r\nAUTH LOGIN\r\ndXNlcg==\r\ncGFzcw==\r\n");
        assert_eq!(codes(&out), vec![220, 250, 334, 334, 235]);
    }

    #[test]
    fn tokens_from_headers() {
        let msg = b"Subject: load abc\r\nMessage-Id:\r\n <x-1@loadgen>\r\nX-Tok: q\r\n\r\nMessage-ID: <no@x>\r\n";
        assert_eq!(
            header_value(msg, "message-id").as_deref(),
            Some("<x-1@loadgen>")
        );
        assert_eq!(token_of("<x-1@loadgen>").as_deref(), Some("x-1"));
        assert_eq!(token_of("load abc").as_deref(), Some("abc"));
        assert_eq!(header_value(msg, "X-Missing"), None);
        assert_eq!(token_of("  "), None);
    }

    #[test]
    fn parse_paths() {
        assert_eq!(
            parse_path("FROM:<>", "FROM:"),
            Some((String::new(), String::new()))
        );
        assert_eq!(
            parse_path("from: <@r:a@b> SIZE=1", "FROM:"),
            Some(("a@b".into(), "SIZE=1".into()))
        );
        assert_eq!(
            parse_path("TO:a@b", "TO:"),
            Some(("a@b".into(), String::new()))
        );
        assert_eq!(parse_path("TO:<a@b", "TO:"), None);
        assert_eq!(parse_path("FROM:<a@b>", "TO:"), None);
    }
}
