//! The SMTP server session under hostile input: a driver that resolves actions
//! the way `conn.rs` does, checks every reply and submission, and compares runs
//! of the same bytes split into different reads.

use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

use sluice_policy::{NetworkList, RelayPolicy};
use sluice_spool::{IdGenerator, SpoolError};

use super::{has_bare_newline, Chunker, NOW_MS};
use crate::auth_guard::AuthGuard;
use crate::config::{AuthSection, BareNewline, NulBytes, Protocol};
use crate::smtp::server::{
    Action, DebugView, PeerInfo, Session, SessionConfig, Submission, TxSummary, MAX_HOLD_SECS,
};

/// A client inside the relay networks (may relay without AUTH).
pub const TRUSTED_IP: &str = "192.0.2.9";
/// A client outside them.
pub const OUTSIDE_IP: &str = "198.51.100.1";
/// The one account the driver's password check accepts.
pub const USER: &str = "alice";
pub const PASSWORD: &str = "secret";
/// Byte that separates client turns in a fuzz input (the client waits for the
/// replies between turns, so DATA and STARTTLS may end a turn safely).
pub const TURN: u8 = 0xff;

/// The longest message line the fuzz sessions accept (small, so fuzzing hits it).
pub const FUZZ_MAX_MESSAGE_LINE: usize = 100;

/// The session settings a fuzz input selects with its first byte (0x10: the
/// lenient listener, bare_newline = "accept" and nul_bytes = "strip").
pub fn fuzz_config(flags: u8) -> SessionConfig {
    SessionConfig {
        listener: "fuzz".into(),
        hostname: "mx.local.test".into(),
        greeting: "ESMTP".into(),
        protocol: if flags & 0x08 != 0 {
            Protocol::Lmtp
        } else {
            Protocol::Smtp
        },
        starttls: flags & 0x01 != 0,
        auth_plaintext: flags & 0x02 != 0,
        auth_enabled: flags & 0x04 != 0,
        max_message_size: 4096,
        max_recipients: 4,
        max_line_length: 512,
        max_errors: 20,
        bare_newline: if flags & 0x10 != 0 {
            BareNewline::Accept
        } else {
            BareNewline::Reject
        },
        nul_bytes: if flags & 0x10 != 0 {
            NulBytes::Strip
        } else {
            NulBytes::Reject
        },
        max_message_line_length: FUZZ_MAX_MESSAGE_LINE,
        relay: Arc::new(relay_policy()),
        // Default limits: a fresh guard per session config, so runs do not share
        // failure budgets.
        auth_guard: Arc::new(AuthGuard::new(&AuthSection::default())),
        untrusted: Default::default(),
        verify: None,
        honor_tls_required_no: false,
        filters: None,
        filter_stages: Default::default(),
        dnsbl: false,
        greylist: false,
        add_missing_headers: crate::config::AddMissingHeaders::No,
        sender_logins: None,
        rewrite: None,
    }
}

fn relay_policy() -> RelayPolicy {
    let networks = NetworkList::parse(&["192.0.2.0/24"]);
    match networks.and_then(|n| RelayPolicy::new(&["local.test".to_string()], n)) {
        Ok(p) => p,
        Err(e) => panic!("fixed relay policy: {e}"),
    }
}

/// Drives one session like the connection driver does: stores succeed (or fail,
/// when asked), passwords are checked against [`USER`]/[`PASSWORD`], STARTTLS
/// always "succeeds". Panics on any broken invariant.
pub struct ServerDriver {
    session: Session,
    cfg: Arc<SessionConfig>,
    /// Every reply line sent, in order, without CRLF.
    pub lines: Vec<String>,
    pub stored: Vec<Submission>,
    pub closed: bool,
    tls: bool,
    authenticated: bool,
    trusted_ip: bool,
    fail_stores: bool,
    stores: usize,
    /// Index in `lines` from which the replies depend on read boundaries (input
    /// after an accepted STARTTLS is dropped up to the end of its read; message
    /// data sent before the 354 closes the session only when in the same read).
    pub boundary_sensitive_from: Option<usize>,
}

impl ServerDriver {
    pub fn new(cfg: SessionConfig, ip: IpAddr, implicit_tls: bool, fail_stores: bool) -> Self {
        let cfg = Arc::new(cfg);
        let tls = implicit_tls.then(|| "TLSv1.3 TLS13_AES_128_GCM_SHA256".to_string());
        let mut session = Session::new(
            cfg.clone(),
            Rc::new(IdGenerator::new(0, None)),
            PeerInfo {
                ip,
                port: 2525,
                tls: tls.clone(),
            },
        );
        session.greeting();
        let trusted_ip = cfg
            .relay
            .check_recipient("x@remote.test", ip, false)
            .eq(&sluice_policy::RelayDecision::Relay);
        let mut d = ServerDriver {
            session,
            cfg,
            lines: Vec::new(),
            stored: Vec::new(),
            closed: false,
            tls: tls.is_some(),
            authenticated: false,
            trusted_ip,
            fail_stores,
            stores: 0,
            boundary_sensitive_from: None,
        };
        d.collect();
        assert!(
            d.lines.len() == 1 && d.lines[0].starts_with("220 "),
            "greeting: {:?}",
            d.lines
        );
        d
    }

    pub fn view(&self) -> DebugView {
        self.session.debug_view()
    }

    /// Final reply codes (the last line of each reply).
    pub fn codes(&self) -> Vec<u16> {
        self.lines
            .iter()
            .filter(|l| l.as_bytes().get(3) == Some(&b' '))
            .filter_map(|l| l[..3].parse().ok())
            .collect()
    }

    /// The code of the last reply line.
    pub fn last_code(&self) -> Option<u16> {
        self.codes().last().copied()
    }

    /// One read of `bytes` from the client.
    pub fn read(&mut self, bytes: &[u8]) {
        if self.closed {
            // The driver has closed the connection; nothing more is read.
            return;
        }
        let mut pos = 0;
        let mut calls = 0;
        while pos < bytes.len() {
            calls += 1;
            assert!(calls <= bytes.len() + 1, "session makes no progress");
            let (used, action) = self.session.receive(&bytes[pos..], NOW_MS);
            assert!(used <= bytes.len() - pos, "consumed more than it was given");
            pos += used;
            self.collect();
            match action {
                Action::Read => {
                    assert_eq!(pos, bytes.len(), "Read returned with input left over");
                }
                Action::Close => {
                    self.on_close();
                    return;
                }
                Action::StartTls => {
                    assert!(
                        self.cfg.starttls,
                        "STARTTLS accepted on a listener without it"
                    );
                    assert!(!self.tls, "STARTTLS accepted inside TLS");
                    assert_eq!(
                        self.lines.last().map(String::as_str),
                        Some("220 2.0.0 Ready to start TLS")
                    );
                    assert_eq!(pos, bytes.len(), "input after STARTTLS must be dropped");
                    self.boundary_sensitive_from.get_or_insert(self.lines.len());
                    self.tls = true;
                    self.authenticated = false;
                    self.session
                        .tls_established("TLSv1.3 TLS13_AES_128_GCM_SHA256".into());
                    assert!(self.session.output().is_empty());
                    return;
                }
                Action::Store(sub) => self.store(*sub),
                Action::Filter(_) => {
                    // The fuzz listeners have no filters: nothing asks.
                    panic!("filter action from a listener without filters");
                }
                Action::CheckSpf { .. } => {
                    // SPF passes here (no DNS): MAIL gets its 250.
                    self.session
                        .spf_result(sluice_policy::auth::SpfResults::default(), None);
                    self.collect();
                }
                Action::Authenticate { user, password } => {
                    assert!(
                        self.cfg.auth_enabled && (self.tls || self.cfg.auth_plaintext),
                        "AUTH reached the password check where it must be refused"
                    );
                    let ok = user == USER && password == PASSWORD;
                    // The failure delay is the driver's to wait; not here.
                    let delay = self.session.auth_result(user, ok, NOW_MS);
                    assert_eq!(delay.is_none(), ok);
                    self.authenticated |= ok;
                    self.collect();
                    if self.session.is_closed() {
                        self.on_close();
                        return;
                    }
                }
            }
            self.check_bounds();
        }
        self.check_bounds();
    }

    /// Feeds `turn` as reads of the chunker's sizes.
    pub fn feed(&mut self, turn: &[u8], chunker: &mut Chunker) {
        for piece in chunker.split(turn) {
            self.read(piece);
        }
    }

    fn on_close(&mut self) {
        assert!(self.session.is_closed());
        self.closed = true;
        let last = self.lines.last().map(|l| &l[..3]);
        assert!(
            matches!(last, Some("221" | "421" | "500" | "554")),
            "closed after {last:?}: a session never closes without saying why"
        );
        // A closed session ignores everything.
        let (used, action) = self.session.receive(b"NOOP\r\n", NOW_MS);
        assert_eq!(used, 6);
        assert!(matches!(action, Action::Close));
        assert!(self.session.output().is_empty(), "output after close");
    }

    fn check_bounds(&self) {
        let v = self.view();
        assert!(v.line <= self.cfg.max_line_length, "line buffer {v:?}");
        // The Received header is bounded by the HELO name and one recipient,
        // each at most a line long.
        let header_max = 2 * self.cfg.max_line_length + 512;
        assert!(
            v.body as u64 <= self.cfg.max_message_size + header_max as u64,
            "body buffer {v:?}"
        );
        assert!(v.recipients <= self.cfg.max_recipients, "{v:?}");
        assert_ne!(v.state, "paused", "paused with no action pending");
        assert_eq!(v.state == "closed", self.closed, "{v:?}");
    }

    /// Takes the session's output and checks every reply line.
    fn collect(&mut self) {
        let out = self.session.output().to_vec();
        self.session.clear_output();
        if out.is_empty() {
            return;
        }
        assert!(
            out.ends_with(b"\r\n"),
            "output not CRLF-terminated: {out:?}"
        );
        assert!(!has_bare_newline(&out), "bare CR or LF in replies: {out:?}");
        let text = match std::str::from_utf8(&out) {
            Ok(t) => t,
            Err(e) => panic!("replies are not UTF-8: {e}"),
        };
        let lines: Vec<&str> = text[..text.len() - 2].split("\r\n").collect();
        for (i, line) in lines.iter().enumerate() {
            let b = line.as_bytes();
            assert!(b.len() >= 4, "short reply line {line:?}");
            assert!(b[..3].iter().all(u8::is_ascii_digit), "no code: {line:?}");
            assert!((b'2'..=b'5').contains(&b[0]), "bad reply class: {line:?}");
            assert!(b[3] == b' ' || b[3] == b'-', "bad separator: {line:?}");
            assert!(
                !line.chars().any(char::is_control),
                "control character in reply {line:?}"
            );
            if b[3] == b'-' {
                let next = lines.get(i + 1);
                assert!(
                    next.is_some_and(|n| n.as_bytes()[..3] == b[..3]),
                    "unfinished multi-line reply at {line:?}"
                );
            }
            if line.starts_with("554 5.5.0") {
                self.boundary_sensitive_from
                    .get_or_insert(self.lines.len() + i);
            }
        }
        self.lines.extend(lines.into_iter().map(str::to_string));
    }

    fn store(&mut self, sub: Submission) {
        let env = &sub.envelope;
        assert!(
            (1..=self.cfg.max_recipients).contains(&env.recipients.len()),
            "stored with {} recipients",
            env.recipients.len()
        );
        assert_eq!(env.size, sub.body.len() as u64);
        assert!(sub.body.starts_with(b"Received: from "));
        let header_max = 2 * self.cfg.max_line_length + 512;
        assert!(sub.body.len() as u64 <= self.cfg.max_message_size + header_max as u64);
        if self.cfg.bare_newline == BareNewline::Reject {
            assert!(
                !has_bare_newline(&sub.body),
                "bare CR/LF stored despite bare_newline = reject"
            );
        }
        assert!(
            !sub.body.contains(&0),
            "NUL stored (nul_bytes is reject or strip)"
        );
        assert!((-9..=9).contains(&env.priority));
        assert!(env.hold_until_unix <= NOW_MS / 1000 + MAX_HOLD_SECS + 1);
        for addr in std::iter::once(&env.sender).chain(env.recipients.iter().map(|r| &r.address)) {
            assert!(
                !addr.contains(['\r', '\n', '\0', char::REPLACEMENT_CHARACTER]),
                "line break, NUL or U+FFFD in an address {addr:?}"
            );
            assert!(
                env.smtputf8 || addr.is_ascii(),
                "non-ASCII address stored without SMTPUTF8: {addr:?}"
            );
        }
        let may_relay = self.trusted_ip || self.authenticated;
        for r in &env.recipients {
            assert!(
                r.local || may_relay,
                "open relay: {} accepted for relaying from an untrusted client",
                r.address
            );
        }
        let summary = TxSummary::of(env);
        let id = sub.id;
        self.stores += 1;
        let result = match (self.fail_stores, self.stores % 3) {
            (true, 1) => Err(SpoolError::Full),
            (true, 2) => Err(SpoolError::Failed("disk".into())),
            _ => Ok(()),
        };
        let ok = result.is_ok();
        self.session.store_result(
            id,
            &summary,
            result.map_err(crate::queue::EnqueueError::from),
        );
        self.collect();
        let last = self.lines.last().map(|l| &l[..3]);
        let want = if ok { "250" } else { "45" };
        assert!(
            last.is_some_and(|c| c.starts_with(want)),
            "store reply {last:?}"
        );
        self.stored.push(sub);
    }
}

/// Fuzz target `smtp_server`. Input: flags byte (see [`fuzz_config`]; 0x20 = a
/// client inside the relay networks, 0x40 = implicit TLS, 0x80 = failing spool),
/// a chunking seed byte, then client turns separated by [`TURN`].
///
/// The turns are fed twice, once a turn per read and once in small reads; both
/// runs must give the same replies and store the same messages (up to the point
/// where the protocol itself depends on read boundaries).
pub fn smtp_server(input: &[u8]) {
    let [flags, seed, stream @ ..] = input else {
        return;
    };
    let run = |chunker: Option<&mut Chunker>| {
        let ip: IpAddr = match if flags & 0x20 != 0 {
            TRUSTED_IP
        } else {
            OUTSIDE_IP
        }
        .parse()
        {
            Ok(ip) => ip,
            Err(e) => panic!("fixed ip: {e}"),
        };
        let mut d = ServerDriver::new(
            fuzz_config(*flags),
            ip,
            flags & 0x40 != 0,
            flags & 0x80 != 0,
        );
        match chunker {
            Some(c) => {
                for turn in stream.split(|&b| b == TURN) {
                    d.feed(turn, c);
                }
            }
            None => {
                for turn in stream.split(|&b| b == TURN) {
                    d.read(turn);
                }
            }
        }
        d
    };
    let whole = run(None);
    let split = run(Some(&mut Chunker::new(*seed)));
    compare_runs(&whole, &split);
}

/// Asserts two runs of the same turns agree, up to the first reply that depends
/// on read boundaries.
pub fn compare_runs(a: &ServerDriver, b: &ServerDriver) {
    let cut = match (a.boundary_sensitive_from, b.boundary_sensitive_from) {
        (None, None) => None,
        (x, y) => Some(x.unwrap_or(usize::MAX).min(y.unwrap_or(usize::MAX))),
    };
    match cut {
        None => {
            assert_eq!(a.lines, b.lines, "replies depend on how the input is split");
            assert_eq!(a.stored.len(), b.stored.len());
            for (x, y) in a.stored.iter().zip(&b.stored) {
                assert_eq!(x.body, y.body, "stored body depends on the split");
                assert_eq!(x.envelope.sender, y.envelope.sender);
                assert_eq!(x.envelope.recipients, y.envelope.recipients);
            }
            assert_eq!(a.closed, b.closed);
        }
        Some(cut) => {
            let n = cut.min(a.lines.len()).min(b.lines.len());
            assert_eq!(
                a.lines[..n],
                b.lines[..n],
                "replies before the first read-boundary-dependent one differ"
            );
            assert!(
                n == cut || (a.lines.len() == b.lines.len()),
                "one run stopped replying early"
            );
        }
    }
}
