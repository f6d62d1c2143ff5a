//! The outbound body encoder: the stored message as it goes on the wire to the
//! next hop (DATA dot-stuffed and terminated, or BDAT's counted bytes).
//!
//! The bytes are canonicalised so that no receiver, however lenient, can find an
//! end of data before ours (SMTP smuggling through the relay, issue 17). The
//! stored body may hold anything a spool ever accepted (older versions,
//! `bare_newline = "accept"`, `nul_bytes = "strip"` before a restart), so this
//! does not trust it:
//!
//! - NUL bytes are dropped: receivers that delete them, or cut a line at them,
//!   would otherwise read `\0.` or `.\0.` as a lone dot (RFC 5321 §4.1.4 and
//!   RFC 6152 do not allow NUL in DATA anyway);
//! - every line end is CRLF: a bare CR or bare LF becomes CRLF (after the NULs
//!   are gone, so `CR NUL LF` is one line end);
//! - DATA only: a line gets the transparency dot (RFC 5321 §4.5.2) when its first
//!   printable ASCII byte is a dot, not only when its first byte is. A strict
//!   receiver removes exactly that one dot, so the message is unchanged; a
//!   receiver that trims whitespace or control bytes around the dot sees `..`,
//!   never a lone `.`.
//!
//! Everything else passes unchanged, so a conforming body is sent byte for byte.

/// Bytes of `body` on the wire after "BDAT n LAST" (what n must be).
pub fn bdat_len(body: &[u8]) -> u64 {
    let mut n = 0u64;
    walk(body, false, |piece| n += piece.len() as u64);
    n
}

/// Appends `body` canonicalised for BDAT: NULs dropped, CRLF line ends.
pub fn encode_bdat(body: &[u8], out: &mut Vec<u8>) {
    out.reserve(body.len() + 16);
    walk(body, false, |piece| out.extend_from_slice(piece));
}

/// Appends `body` canonicalised and dot-stuffed for DATA, then the terminating
/// CRLF.CRLF (with a CRLF first when the body does not end with one).
pub fn encode_data(body: &[u8], out: &mut Vec<u8>) {
    out.reserve(body.len() + body.len() / 64 + 8);
    let start = out.len();
    walk(body, true, |piece| out.extend_from_slice(piece));
    if out.len() > start && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

/// True when the line at the start of `rest` must get a transparency dot: its
/// first printable ASCII byte (before the line ends) is '.'.
fn needs_dot(rest: &[u8]) -> bool {
    for &b in rest {
        match b {
            b'\r' | b'\n' => return false,
            0x21..=0x7e => return b == b'.',
            _ => {}
        }
    }
    false
}

/// Hands the canonical wire form of `body` to `emit`, piece by piece.
fn walk(body: &[u8], dot_stuff: bool, mut emit: impl FnMut(&[u8])) {
    let mut i = 0;
    let mut line_start = true;
    while i < body.len() {
        if line_start {
            line_start = false;
            if dot_stuff && needs_dot(&body[i..]) {
                emit(b".");
            }
        }
        let Some(off) = memchr::memchr3(b'\r', b'\n', 0, &body[i..]) else {
            emit(&body[i..]);
            return;
        };
        let at = i + off;
        if off > 0 {
            emit(&body[i..at]);
        }
        i = at + 1;
        match body[at] {
            0 => {}
            b'\n' => {
                emit(b"\r\n");
                line_start = true;
            }
            _ => {
                // CR: with the NULs after it gone, an LF there belongs to it.
                emit(b"\r\n");
                line_start = true;
                while body.get(i) == Some(&0) {
                    i += 1;
                }
                if body.get(i) == Some(&b'\n') {
                    i += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_data(body, &mut out);
        out
    }

    fn bdat(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_bdat(body, &mut out);
        assert_eq!(bdat_len(body), out.len() as u64, "{body:?}");
        out
    }

    #[test]
    fn conforming_body_is_sent_unchanged() {
        let body = b"Subject: x\r\n\r\nhello\r\n";
        assert_eq!(data(body), b"Subject: x\r\n\r\nhello\r\n.\r\n");
        assert_eq!(bdat(body), body);
        assert_eq!(data(b""), b".\r\n");
        assert_eq!(bdat(b""), b"");
    }

    #[test]
    fn leading_dots_are_stuffed() {
        assert_eq!(data(b".a\r\n..\r\n."), b"..a\r\n...\r\n..\r\n.\r\n");
        // BDAT has no transparency.
        assert_eq!(bdat(b".a\r\n.\r\n"), b".a\r\n.\r\n");
    }

    #[test]
    fn line_ends_become_crlf() {
        assert_eq!(bdat(b"a\nb\rc\r\nd\r\r\n"), b"a\r\nb\r\nc\r\nd\r\n\r\n");
        assert_eq!(data(b"a\n.\nb"), b"a\r\n..\r\nb\r\n.\r\n");
        assert_eq!(data(b"a\r.\rb"), b"a\r\n..\r\nb\r\n.\r\n");
        assert_eq!(data(b"end\r"), b"end\r\n.\r\n");
    }

    #[test]
    fn nul_bytes_are_dropped() {
        assert_eq!(bdat(b"a\0b\0"), b"ab");
        assert_eq!(bdat(b"\0\0\0"), b"");
        assert_eq!(data(b"\0"), b".\r\n");
        // CR NUL LF is one line end once the NUL is gone.
        assert_eq!(bdat(b"a\r\0\0\nb"), b"a\r\nb");
        assert_eq!(bdat(b"a\r\0b"), b"a\r\nb");
        assert_eq!(data(b"a\r\n\0.\0\r\nb"), b"a\r\n..\r\nb\r\n.\r\n");
        assert_eq!(data(b"a\r\n.\0\r\nb"), b"a\r\n..\r\nb\r\n.\r\n");
        assert_eq!(data(b"a\n\0.\0\nb"), b"a\r\n..\r\nb\r\n.\r\n");
    }

    #[test]
    fn dots_behind_whitespace_and_controls_are_stuffed() {
        for line in [
            &b" ."[..],
            b"\t.",
            b" \t .  ",
            b"\x0b.",
            b"\x0c.\x0c",
            b"\x7f.",
            b"\xc2\xa0.",
            b"\x1f. x",
        ] {
            let mut body = b"a\r\n".to_vec();
            body.extend_from_slice(line);
            body.extend_from_slice(b"\r\nb\r\n");
            let mut want = b"a\r\n.".to_vec();
            want.extend_from_slice(line);
            want.extend_from_slice(b"\r\nb\r\n.\r\n");
            assert_eq!(data(&body), want, "{line:?}");
        }
        // A printable byte before the dot: nothing to trim to a lone dot.
        assert_eq!(data(b"x.\r\n"), b"x.\r\n.\r\n");
        assert_eq!(data(b" x .\r\n"), b" x .\r\n.\r\n");
        assert_eq!(data(b"  \r\n"), b"  \r\n.\r\n");
    }

    #[test]
    fn mixed_hostile_body() {
        let body = b"\0.\r\0\n \r.\n\0\0\r\r\n.\0";
        let whole = data(body);
        assert!(whole.ends_with(b"\r\n.\r\n"));
        assert_eq!(whole, b"..\r\n \r\n..\r\n\r\n\r\n..\r\n.\r\n");
    }
}
