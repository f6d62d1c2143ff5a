//! The relay-output invariant (issue 17): what sluice sends as DATA can never be
//! split into two transactions by a lenient receiver.
//!
//! [`Lenient`] is a receiver that gets the end of data wrong in every way we know
//! of, alone and combined: it drops NUL bytes before framing, ends lines at a bare
//! LF and/or a bare CR, and then cuts each line at a NUL, trims whitespace and
//! control bytes around it, or deletes every byte that is not printable ASCII. A
//! line it reduces to "." ends the message there. [`check_relay_output`] asserts
//! that, for every such receiver, the only end it finds in an encoded body is the
//! real one, and that a strict receiver gets the canonical body back.

use super::find;
use crate::smtp::body_out::{bdat_len, encode_bdat, encode_data};
use crate::smtp::data::DataDecoder;

/// How a line is normalised before it is compared with ".".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineRule {
    AsIs,
    /// C-string handling: the line ends at its first NUL.
    CutAtNul,
    /// Whitespace and control bytes (anything not printable ASCII) trimmed
    /// from both ends.
    Trim,
    /// Every byte that is not printable ASCII deleted.
    Graphic,
}

/// One way of misreading DATA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lenient {
    pub drop_nul: bool,
    pub bare_lf_ends_line: bool,
    pub bare_cr_ends_line: bool,
    pub line: LineRule,
}

impl Lenient {
    /// Every combination (32).
    pub fn all() -> Vec<Lenient> {
        let mut out = Vec::new();
        for bits in 0..8u8 {
            for line in [
                LineRule::AsIs,
                LineRule::CutAtNul,
                LineRule::Trim,
                LineRule::Graphic,
            ] {
                out.push(Lenient {
                    drop_nul: bits & 1 != 0,
                    bare_lf_ends_line: bits & 2 != 0,
                    bare_cr_ends_line: bits & 4 != 0,
                    line,
                });
            }
        }
        out
    }

    /// Byte offsets (in `wire`) just past each line this receiver takes for the
    /// end of data.
    pub fn ends(&self, wire: &[u8]) -> Vec<usize> {
        // Offsets are kept against the original bytes even when NULs are dropped.
        let kept: Vec<(usize, u8)> = wire
            .iter()
            .copied()
            .enumerate()
            .filter(|&(_, b)| !(self.drop_nul && b == 0))
            .collect();
        let mut out = Vec::new();
        let mut line: Vec<u8> = Vec::new();
        let mut i = 0;
        while i < kept.len() {
            let (at, b) = kept[i];
            i += 1;
            let end = match b {
                b'\r' if kept.get(i).map(|k| k.1) == Some(b'\n') => {
                    i += 1;
                    Some(kept[i - 1].0 + 1)
                }
                b'\r' if self.bare_cr_ends_line => Some(at + 1),
                b'\n' if self.bare_lf_ends_line => Some(at + 1),
                _ => None,
            };
            match end {
                Some(end) => {
                    if self.normalise(&line) == b"." {
                        out.push(end);
                    }
                    line.clear();
                }
                None => line.push(b),
            }
        }
        out
    }

    fn normalise(&self, line: &[u8]) -> Vec<u8> {
        let graphic = |b: &u8| (0x21..=0x7e).contains(b);
        match self.line {
            LineRule::AsIs => line.to_vec(),
            LineRule::CutAtNul => line.split(|&b| b == 0).next().unwrap_or(&[]).to_vec(),
            LineRule::Trim => {
                let start = line.iter().position(graphic).unwrap_or(line.len());
                let end = line.iter().rposition(graphic).map_or(start, |p| p + 1);
                line[start..end].to_vec()
            }
            LineRule::Graphic => line.iter().copied().filter(graphic).collect(),
        }
    }
}

/// The body a strict receiver must get: NULs gone, every line end CRLF.
pub fn canonical(body: &[u8]) -> Vec<u8> {
    let no_nul: Vec<u8> = body.iter().copied().filter(|&b| b != 0).collect();
    let mut out = Vec::with_capacity(no_nul.len());
    let mut i = 0;
    while i < no_nul.len() {
        match no_nul[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if no_nul.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// The invariant, for one stored body, through both outbound encoders.
pub fn check_relay_output(body: &[u8]) {
    let mut wire = Vec::new();
    encode_data(body, &mut wire);
    assert!(!wire.contains(&0), "NUL sent onward");
    for receiver in Lenient::all() {
        assert_eq!(
            receiver.ends(&wire),
            [wire.len()],
            "{receiver:?} finds an end of data before ours (smuggling): {wire:?}"
        );
    }
    // A strict receiver ends at the last CRLF.CRLF only and gets the body back.
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(&wire);
    assert_eq!(find(&framed, b"\r\n.\r\n"), Some(framed.len() - 5));
    let mut d = DataDecoder::new(u64::MAX, 0);
    let mut back = Vec::new();
    assert_eq!(d.feed(&wire, &mut back), Some(wire.len()));
    let mut want = canonical(body);
    if !want.is_empty() && !want.ends_with(b"\r\n") {
        want.extend_from_slice(b"\r\n");
    }
    assert_eq!(back, want, "a strict receiver does not get the body back");

    let mut chunk = Vec::new();
    encode_bdat(body, &mut chunk);
    assert_eq!(bdat_len(body), chunk.len() as u64, "BDAT length");
    assert_eq!(
        chunk,
        canonical(body),
        "BDAT bytes are not the canonical body"
    );
}

/// Fuzz target `relay_output`. Input: a stored body, any bytes.
pub fn relay_output(input: &[u8]) {
    check_relay_output(input);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lenient_receivers_split_raw_smuggling_payloads() {
        // Sent raw (as a relay that passes stored bytes on would), each of these
        // ends the message early for at least one receiver.
        for raw in [
            &b"a\r\n\0.\r\nMAIL\r\n.\r\n"[..],
            b"a\r\n\0.\0\r\nMAIL\r\n.\r\n",
            b"a\n\0.\nMAIL\r\n.\r\n",
            b"a\r\n .\t\r\nMAIL\r\n.\r\n",
            b"a\r\n\0\r\n.\r\r\nMAIL\r\n.\r\n",
        ] {
            let early = Lenient::all()
                .into_iter()
                .filter(|r| r.ends(raw).first() != Some(&raw.len()))
                .count();
            assert!(early > 0, "{raw:?}");
        }
    }

    #[test]
    fn encoded_bodies_never_split() {
        for body in [
            &b"a\r\n\0.\r\nMAIL"[..],
            b"a\r\n\0.\0\r\nMAIL\r\n",
            b"a\n\0.\nMAIL",
            b"a\r\n .\t\r\nMAIL",
            b"a\r\0\n.\r\r\nMAIL\r\n",
            b"\0",
            b"",
            b".",
            b"\r\n\x0b.\x0c\r\n",
        ] {
            check_relay_output(body);
        }
    }
}
