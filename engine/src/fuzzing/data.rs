//! The DATA and BDAT receivers under hostile input: the DATA decoder against a
//! simple reference (only the first CRLF.CRLF ends a body; a dot at a line start
//! is removed; nothing else changes), the client's encoder against the decoder
//! (what we relay onward never carries an early end marker), the BDAT bare-newline
//! scanner, and both paths through a whole server session.

use super::server::{fuzz_config, ServerDriver, FUZZ_MAX_MESSAGE_LINE, OUTSIDE_IP};
use super::{find, has_bare_newline, Chunker};
use crate::config::BareNewline;
use crate::smtp::body_out::encode_data;
use crate::smtp::data::{BareNewlineScanner, BodyFlags, DataDecoder};

const LIMITS: [u64; 4] = [16, 64, 1024, 65_536];
const ENVELOPE: &[u8] =
    b"EHLO client.test\r\nMAIL FROM:<a@local.test>\r\nRCPT TO:<b@local.test>\r\n";

/// What a DATA decoder run produced.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    out: Vec<u8>,
    /// Bytes consumed up to and including the terminator, if it was found.
    end: Option<usize>,
    flags: BodyFlags,
    decoded_len: u64,
}

fn decode(input: &[u8], limit: u64, reads: &[&[u8]]) -> Decoded {
    let mut d = DataDecoder::new(limit, FUZZ_MAX_MESSAGE_LINE);
    let mut out = Vec::new();
    let mut offset = 0;
    let mut end = None;
    for piece in reads {
        if let Some(n) = d.feed(piece, &mut out) {
            assert!(
                n >= 1 && n <= piece.len(),
                "consumed {n} of {}",
                piece.len()
            );
            end = Some(offset + n);
            break;
        }
        offset += piece.len();
    }
    if end.is_none() {
        assert_eq!(offset, input.len());
    }
    Decoded {
        out,
        end,
        flags: d.flags,
        decoded_len: d.decoded_len(),
    }
}

/// The reference decoding of a raw body: a dot at the start of the body or right
/// after a CRLF is removed.
fn unstuff(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, &b) in raw.iter().enumerate() {
        let line_start = i == 0 || (i >= 2 && &raw[i - 2..i] == b"\r\n");
        if !(b == b'.' && line_start) {
            out.push(b);
        }
    }
    out
}

/// The longest run of bytes between CR or LF (any line end a next hop may see).
fn longest_line(bytes: &[u8]) -> usize {
    bytes
        .split(|&b| b == b'\r' || b == b'\n')
        .map(<[u8]>::len)
        .max()
        .unwrap_or(0)
}

/// Checks one decoder run of `input` against the reference; returns it.
fn check_decoder(input: &[u8], limit: u64, seed: u8) -> Decoded {
    let whole = decode(input, limit, &[input]);
    let split = decode(input, limit, &Chunker::new(seed).split(input));
    assert_eq!(whole, split, "DATA decoding depends on read boundaries");

    // "\r\n" in front: the DATA command's own CRLF starts the first line.
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(input);
    let first_end = find(&framed, b"\r\n.\r\n").map(|at| at + 5 - 2);
    assert_eq!(
        whole.end, first_end,
        "the body must end at the first CRLF.CRLF"
    );

    let (raw, pending_cr) = match whole.end {
        Some(n) => (&input[..n - 3], false),
        None => (input, input.last() == Some(&b'\r')),
    };
    let mut reference = unstuff(raw);
    if pending_cr {
        // A CR at the end of the input waits for the next read.
        reference.pop();
    }
    assert_eq!(whole.decoded_len, reference.len() as u64);
    let kept = reference.len().min(limit as usize);
    assert_eq!(
        whole.out,
        reference[..kept],
        "decoded body differs from reference"
    );
    assert_eq!(whole.flags.too_big, reference.len() as u64 > limit);
    let scanned = if pending_cr {
        &raw[..raw.len() - 1]
    } else {
        raw
    };
    assert_eq!(whole.flags.bare_newline, has_bare_newline(scanned));
    assert_eq!(whole.flags.nul, reference.contains(&0), "NUL detection");
    assert_eq!(
        whole.flags.long_line,
        longest_line(&reference) > FUZZ_MAX_MESSAGE_LINE,
        "long line detection"
    );
    whole
}

/// What we send onward: see [`super::lenient::check_relay_output`]; and what a
/// strict decoder stored, sent again, comes back the same.
fn check_encoder(body: &[u8]) {
    super::lenient::check_relay_output(body);
    let mut wire = Vec::new();
    encode_data(body, &mut wire);
    assert!(!has_bare_newline(&wire), "bare CR/LF sent onward");
    let back = decode(&wire, u64::MAX, &[&wire]);
    assert_eq!(back.end, Some(wire.len()));
}

fn check_scanner(input: &[u8], seed: u8) {
    let mut s = BareNewlineScanner::new(FUZZ_MAX_MESSAGE_LINE);
    for piece in Chunker::new(seed).split(input) {
        s.scan(piece);
    }
    s.finish();
    assert_eq!(s.found, has_bare_newline(input), "BDAT bare newline scan");
    assert_eq!(s.nul, input.contains(&0), "BDAT NUL scan");
    assert_eq!(
        s.long_line,
        longest_line(input) > FUZZ_MAX_MESSAGE_LINE,
        "BDAT line length scan"
    );
}

/// The body through a whole session with DATA.
fn check_session_data(input: &[u8], limit: u64, flags: u8, seed: u8, expect: &Decoded) {
    let Some(end) = expect.end else {
        return;
    };
    let mut cfg = fuzz_config(flags & 0x10);
    cfg.max_message_size = limit;
    let lenient = cfg.bare_newline == BareNewline::Accept;
    let mut d = ServerDriver::new(cfg, ip(), false, false);
    let mut turn = ENVELOPE.to_vec();
    turn.extend_from_slice(b"DATA\r\n");
    d.read(&turn);
    assert_eq!(d.codes(), [220, 250, 250, 250, 354]);
    d.feed(&input[..end], &mut Chunker::new(seed));
    let last = d.codes().last().copied();
    let f = expect.flags;
    if f.too_big {
        assert_eq!(last, Some(552));
    } else if f.long_line || (!lenient && (f.bare_newline || f.nul)) {
        assert_eq!(last, Some(550));
    } else {
        assert_eq!(last, Some(250));
        let [msg] = d.stored.as_slice() else {
            panic!("{} messages stored", d.stored.len());
        };
        let want: Vec<u8> = expect.out.iter().copied().filter(|&b| b != 0).collect();
        assert!(msg.body.ends_with(&want), "stored body is not the data");
    }
    assert_eq!(d.view().state, "command");
}

/// The same bytes as BDAT chunks cut by the seed.
fn check_session_bdat(input: &[u8], limit: u64, flags: u8, seed: u8) {
    let mut cfg = fuzz_config(flags & 0x10);
    cfg.max_message_size = limit;
    let lenient = cfg.bare_newline == BareNewline::Accept;
    let mut d = ServerDriver::new(cfg, ip(), false, false);
    d.read(ENVELOPE);
    let mut pieces = Chunker::new(seed.wrapping_add(1)).split(input);
    pieces.truncate(64);
    let total: Vec<u8> = pieces.concat();
    if pieces.is_empty() {
        pieces.push(b"");
    }
    let mut sent = 0;
    for (i, piece) in pieces.iter().enumerate() {
        let last = i + 1 == pieces.len();
        let mut turn = format!(
            "BDAT {}{}\r\n",
            piece.len(),
            if last { " LAST" } else { "" }
        )
        .into_bytes();
        turn.extend_from_slice(piece);
        d.read(&turn);
        sent += piece.len();
        if !last {
            let want = format!("250 2.0.0 Ok: {sent} octets received");
            assert_eq!(d.lines.last(), Some(&want));
        }
    }
    let last = d.codes().last().copied();
    let refused = longest_line(&total) > FUZZ_MAX_MESSAGE_LINE
        || (!lenient && (has_bare_newline(&total) || total.contains(&0)));
    if total.len() as u64 > limit {
        assert_eq!(last, Some(552));
    } else if refused {
        assert_eq!(last, Some(550));
    } else {
        assert_eq!(last, Some(250));
        let [msg] = d.stored.as_slice() else {
            panic!("{} messages stored", d.stored.len());
        };
        let want: Vec<u8> = total.iter().copied().filter(|&b| b != 0).collect();
        assert!(msg.body.ends_with(&want), "stored body is not the chunks");
    }
    assert_eq!(d.view().state, "command");
}

fn ip() -> std::net::IpAddr {
    match OUTSIDE_IP.parse() {
        Ok(ip) => ip,
        Err(e) => panic!("fixed ip: {e}"),
    }
}

/// Fuzz target `smtp_data`. Input: a byte choosing the size limit (low 2 bits)
/// and bare-newline mode (0x10 = accept), a chunking seed byte, then the body
/// bytes as they would follow DATA (or be cut into BDAT chunks).
pub fn smtp_data(input: &[u8]) {
    let [flags, seed, body @ ..] = input else {
        return;
    };
    let limit = LIMITS[usize::from(flags & 3)];
    let got = check_decoder(body, limit, *seed);
    // An unterminated body always ends once the terminator follows.
    let mut closed = body.to_vec();
    closed.extend_from_slice(b"\r\n.\r\n");
    let closed_run = check_decoder(&closed, limit, *seed);
    assert!(closed_run.end.is_some());
    if let Some(end) = got.end {
        assert_eq!(closed_run.end, Some(end));
    }
    check_encoder(&closed_run.out);
    check_encoder(body);
    check_scanner(body, *seed);
    check_session_data(body, limit, *flags, *seed, &got);
    check_session_data(&closed, limit, *flags, *seed, &closed_run);
    check_session_bdat(body, limit, *flags, *seed);
}
