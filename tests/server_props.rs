//! Property test of the server session (issue 6): any stream of client turns,
//! however it is split into reads, gives the same replies and stored messages;
//! the state machine stays within its bounds; and afterwards a plain transaction
//! still succeeds.
//!
//! A turn is what a client sends before waiting for replies: DATA and STARTTLS
//! only ever end one (RFC 2920 §3.1), everything else may be pipelined.
//! Longer runs: `PROPTEST_CASES=5000 cargo nextest run --release -p sluice-engine
//! --test server_props`.

use std::net::IpAddr;

use proptest::prelude::*;

use sluice_engine::fuzzing::server::{fuzz_config, ServerDriver, OUTSIDE_IP, TRUSTED_IP};
use sluice_engine::fuzzing::Chunker;

#[derive(Debug, Clone)]
enum Piece {
    Ehlo(String),
    Helo(String),
    Lhlo,
    Mail(&'static str),
    Rcpt(&'static str),
    Bdat(Vec<u8>, bool),
    AuthPlain(bool),
    AuthLogin(bool),
    Rset,
    Noop,
    Quit,
    /// Message data after a DATA that ended the previous turn.
    Body(Vec<u8>),
    Garbage(Vec<u8>),
    LongLine(usize),
    /// A whole pipelined transaction ending in BDAT LAST (`true`: LHLO for LMTP).
    Transaction(bool, Vec<u8>),
}

const MAILS: [&str; 6] = [
    "MAIL FROM:<a@local.test>",
    "MAIL FROM:<>",
    "MAIL FROM:<a@x.test> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=e1",
    "MAIL FROM:<a@x.test> HOLDFOR=60 BY=120;R MT-PRIORITY=2",
    "MAIL FROM:<a@x.test> SIZE=999999999",
    "MAIL FROM:a@x.test",
];
const RCPTS: [&str; 8] = [
    "RCPT TO:<b@local.test>",
    "RCPT TO:<c@remote.test>",
    "RCPT TO:<postmaster>",
    "RCPT TO:<c%d@local.test>",
    "RCPT TO:<@a.test:u@remote.test>",
    "RCPT TO:<b@local.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@local.test",
    "RCPT TO:<>",
    "RCPT TO:<u@[192.0.2.1]>",
];

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        "[a-z]{1,8}(\\.[a-z]{1,5})?".prop_map(Piece::Ehlo),
        "[a-z]{1,8}".prop_map(Piece::Helo),
        Just(Piece::Lhlo),
        (0..MAILS.len()).prop_map(|i| Piece::Mail(MAILS[i])),
        (0..RCPTS.len()).prop_map(|i| Piece::Rcpt(RCPTS[i])),
        (proptest::collection::vec(any::<u8>(), 0..40), any::<bool>())
            .prop_map(|(b, last)| Piece::Bdat(b, last)),
        any::<bool>().prop_map(Piece::AuthPlain),
        any::<bool>().prop_map(Piece::AuthLogin),
        Just(Piece::Rset),
        Just(Piece::Noop),
        Just(Piece::Quit),
        proptest::collection::vec(any::<u8>(), 0..60).prop_map(Piece::Body),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(Piece::Garbage),
        (400..700usize).prop_map(Piece::LongLine),
    ]
}

/// Pieces, with whole transactions more likely for LMTP's greeting or not.
fn piece_for(lmtp: bool) -> impl Strategy<Value = Piece> {
    prop_oneof![
        3 => piece(),
        1 => proptest::collection::vec(any::<u8>(), 0..40)
            .prop_map(move |b| Piece::Transaction(lmtp, b)),
    ]
}

fn bytes_of(p: &Piece) -> Vec<u8> {
    let line = |s: &str| format!("{s}\r\n").into_bytes();
    match p {
        Piece::Ehlo(h) => line(&format!("EHLO {h}")),
        Piece::Helo(h) => line(&format!("HELO {h}")),
        Piece::Lhlo => line("LHLO client.test"),
        Piece::Mail(m) => line(m),
        Piece::Rcpt(r) => line(r),
        Piece::Bdat(b, last) => {
            let mut v =
                format!("BDAT {}{}\r\n", b.len(), if *last { " LAST" } else { "" }).into_bytes();
            v.extend_from_slice(b);
            v
        }
        // alice/secret, or a wrong password.
        Piece::AuthPlain(true) => line("AUTH PLAIN AGFsaWNlAHNlY3JldA=="),
        Piece::AuthPlain(false) => line("AUTH PLAIN AGFsaWNlAHdyb25n"),
        Piece::AuthLogin(good) => {
            let pass = if *good { "c2VjcmV0" } else { "d3Jvbmc=" };
            line(&format!("AUTH LOGIN\r\nYWxpY2U=\r\n{pass}"))
        }
        Piece::Rset => line("RSET"),
        Piece::Noop => line("NOOP"),
        Piece::Quit => line("QUIT"),
        Piece::Body(b) => {
            let mut v = b.clone();
            v.extend_from_slice(b"\r\n.\r\n");
            v
        }
        Piece::Garbage(b) => b.clone(),
        Piece::Transaction(lmtp, body) => {
            let hello = if *lmtp { "LHLO" } else { "EHLO" };
            let mut v = format!(
                "{hello} c.test\r\nMAIL FROM:<a@local.test>\r\nRCPT TO:<b@local.test>\r\nBDAT {} LAST\r\n",
                body.len()
            )
            .into_bytes();
            v.extend_from_slice(body);
            v
        }
        Piece::LongLine(n) => {
            let mut v = vec![b'X'; *n];
            v.extend_from_slice(b"\r\n");
            v
        }
    }
}

#[derive(Debug, Clone)]
enum End {
    Open,
    StartTls,
    /// DATA ends this turn; the message data is the next one.
    Data(Vec<u8>),
}

/// A turn: pipelined pieces, then maybe STARTTLS, or DATA and (as a second
/// turn) its message data.
fn turn(lmtp: bool) -> impl Strategy<Value = Vec<Vec<u8>>> {
    (
        proptest::collection::vec(piece_for(lmtp), 0..6),
        prop_oneof![
            Just(End::Open),
            Just(End::StartTls),
            proptest::collection::vec(any::<u8>(), 0..60).prop_map(End::Data),
        ],
    )
        .prop_map(|(pieces, end)| {
            let mut v: Vec<u8> = pieces.iter().flat_map(bytes_of).collect();
            match end {
                End::Open => vec![v],
                End::StartTls => {
                    v.extend_from_slice(b"STARTTLS\r\n");
                    vec![v]
                }
                End::Data(body) => {
                    v.extend_from_slice(b"DATA\r\n");
                    vec![v, bytes_of(&Piece::Body(body))]
                }
            }
        })
}

/// Session flags (see `fuzz_config`), turns, chunking seed.
fn case() -> impl Strategy<Value = (u8, Vec<Vec<u8>>, u8)> {
    (0u8..0x80).prop_flat_map(|flags| {
        (
            Just(flags),
            proptest::collection::vec(turn(flags & 0x08 != 0), 1..6)
                .prop_map(|t| t.into_iter().flatten().collect()),
            any::<u8>(),
        )
    })
}

fn driver(flags: u8) -> ServerDriver {
    let mut cfg = fuzz_config(flags);
    // Few enough closes that most cases get to the final transaction.
    cfg.max_errors = 1000;
    let ip: IpAddr = if flags & 0x20 != 0 {
        TRUSTED_IP
    } else {
        OUTSIDE_IP
    }
    .parse()
    .expect("fixed ip");
    ServerDriver::new(cfg, ip, flags & 0x40 != 0, false)
}

/// Brings a session back to the command state (if it is still open).
fn settle(d: &mut ServerDriver) {
    for _ in 0..4 {
        if d.closed {
            return;
        }
        let v = d.view();
        match v.state {
            "data" => d.read(b"\r\n.\r\n"),
            "bdat" if v.bdat_remaining <= 100_000 => d.read(&vec![b'x'; v.bdat_remaining]),
            "auth" => d.read(b"*\r\n"),
            "command" if v.line > 0 || v.discarding => d.read(b"\r\n"),
            _ => return,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        // CI default; PROPTEST_CASES raises it for long runs.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_split_same_session((flags, turns, seed) in case()) {
        let mut whole = driver(flags);
        let mut chunked = driver(flags);
        let mut bytewise = driver(flags);
        let mut chunker = Chunker::new(seed | 1);
        for t in &turns {
            whole.read(t);
            chunked.feed(t, &mut chunker);
            for b in t {
                bytewise.read(std::slice::from_ref(b));
            }
        }
        for other in [&chunked, &bytewise] {
            prop_assert_eq!(&whole.lines, &other.lines);
            prop_assert_eq!(whole.stored.len(), other.stored.len());
            for (a, b) in whole.stored.iter().zip(&other.stored) {
                prop_assert_eq!(&a.body, &b.body);
                prop_assert_eq!(&a.envelope.recipients, &b.envelope.recipients);
            }
            prop_assert_eq!(whole.closed, other.closed);
            if !whole.closed {
                // (A closed session's leftovers do not matter.)
                prop_assert_eq!(whole.view(), other.view());
            }
        }
        // Turns never pipeline data after DATA: the early-data defence must not fire.
        prop_assert!(!whole.lines.iter().any(|l| l.starts_with("554 5.5.0")));

        // Whatever happened, RSET and a fresh transaction work.
        settle(&mut whole);
        if !whole.closed {
            let stored = whole.stored.len();
            let lmtp = flags & 0x08 != 0;
            whole.read(b"RSET\r\n");
            prop_assert_eq!(whole.last_code(), Some(250));
            let hello: &[u8] = if lmtp { b"LHLO c\r\n" } else { b"EHLO c\r\n" };
            whole.read(hello);
            whole.read(b"MAIL FROM:<a@local.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n");
            let n = whole.codes().len();
            prop_assert_eq!(&whole.codes()[n - 4..], &[250, 250, 250, 354]);
            whole.read(b"hello\r\n.\r\n");
            prop_assert_eq!(whole.last_code(), Some(250));
            prop_assert_eq!(whole.stored.len(), stored + 1);
            prop_assert!(whole.stored[stored].body.ends_with(b"\r\nhello\r\n"));
            prop_assert_eq!(whole.view().state, "command");
        }
    }
}

/// Bodies made of the bytes that matter around an end of data.
fn hostile_body() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            Just(b'.'),
            Just(0u8),
            Just(b' '),
            Just(b'\t'),
            Just(0x0b),
            Just(b'\r'),
            Just(b'\n'),
            Just(b'a'),
            Just(0xa0),
        ],
        0..64,
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1024),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Issue 17: whatever a spool holds, what we send on cannot be split by a
    /// lenient receiver (the `relay_output` fuzz invariant); and whatever a
    /// lenient listener (bare_newline accept, nul_bytes strip) stores from DATA
    /// is relayed safely as well.
    #[test]
    fn relay_output_never_splits(body in hostile_body()) {
        sluice_engine::fuzzing::lenient::check_relay_output(&body);
        let ip: IpAddr = OUTSIDE_IP.parse().unwrap();
        let mut d = ServerDriver::new(fuzz_config(0x10), ip, false, false);
        d.read(b"EHLO c.test\r\nMAIL FROM:<a@local.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n");
        let mut data = body.clone();
        data.extend_from_slice(b"\r\n.\r\n");
        d.read(&data);
        for sub in &d.stored {
            prop_assert!(!sub.body.contains(&0));
            sluice_engine::fuzzing::lenient::check_relay_output(&sub.body);
        }
    }
}
