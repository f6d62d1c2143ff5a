//! Message-body decoders for DATA (dot-stuffed, ends at CRLF.CRLF) and BDAT (counted).
//!
//! Both are pure byte machines that survive any split of the input across reads.
//! The DATA decoder is the SMTP-smuggling defence: only `CRLF . CRLF` ends the body;
//! a bare LF or bare CR never counts as a line end, so `\n.\n` or `\r.\r` inside the
//! body stay body bytes, and their presence is reported so the caller can reject.

/// What the body held besides ordinary lines.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BodyFlags {
    /// A LF not preceded by CR, or a CR not followed by LF, was seen.
    pub bare_newline: bool,
    /// The body grew beyond the size limit; bytes past it were discarded.
    pub too_big: bool,
    /// A NUL byte was seen (kept in the output; the caller applies the policy).
    pub nul: bool,
    /// A line (between any CR or LF) was longer than the line limit.
    pub long_line: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pos {
    /// At the start of a line (after CRLF, or at the start of the body).
    LineStart,
    /// Inside a line.
    Mid,
    /// Saw CR inside a line; waiting to see whether LF follows.
    Cr,
    /// Saw '.' at the start of a line.
    Dot,
    /// Saw ".\r" at the start of a line.
    DotCr,
}

/// Decodes a DATA body: removes dot-stuffing, finds the terminating CRLF.CRLF.
#[derive(Debug)]
pub struct DataDecoder {
    pos: Pos,
    limit: u64,
    written: u64,
    /// Longest line allowed in octets, line ends excluded (0: no limit).
    max_line: usize,
    /// Octets of the current decoded line.
    line_len: usize,
    pub flags: BodyFlags,
}

impl DataDecoder {
    /// `limit` is the most body bytes kept in `out` (beyond it, bytes are counted
    /// as too big and dropped, but the terminator is still searched for);
    /// `max_line` the longest line before `flags.long_line` is set (0: none).
    pub fn new(limit: u64, max_line: usize) -> DataDecoder {
        DataDecoder {
            pos: Pos::LineStart,
            limit,
            written: 0,
            max_line,
            line_len: 0,
            flags: BodyFlags::default(),
        }
    }

    /// Feeds input; appends decoded body bytes to `out`. Returns `Some(consumed)` when
    /// the terminator was found (consumed includes it), `None` when all of `input`
    /// was consumed and more is needed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            if self.pos == Pos::Mid {
                // Fast path: copy up to the next CR, LF or NUL in one go.
                match memchr::memchr3(b'\r', b'\n', 0, &input[i..]) {
                    None => {
                        self.content(&input[i..], out);
                        return None;
                    }
                    Some(off) => {
                        self.content(&input[i..i + off], out);
                        i += off;
                    }
                }
            }
            let b = input[i];
            i += 1;
            match (self.pos, b) {
                (Pos::LineStart, b'.') => self.pos = Pos::Dot,
                (Pos::LineStart | Pos::Mid, b'\r') => self.pos = Pos::Cr,
                (Pos::LineStart | Pos::Mid, b'\n') => self.bare(b"\n", out),
                (Pos::LineStart | Pos::Mid, _) => {
                    self.content(&[b], out);
                    self.pos = Pos::Mid;
                }
                (Pos::Cr, b'\n') => {
                    self.line_end(b"\r\n", out);
                    self.pos = Pos::LineStart;
                }
                (Pos::Cr, b'\r') => {
                    // The first CR was bare; the second may still start a CRLF.
                    self.flags.bare_newline = true;
                    self.line_end(b"\r", out);
                }
                (Pos::Cr, _) => {
                    self.bare(b"\r", out);
                    self.content(&[b], out);
                }
                (Pos::Dot, b'\r') => self.pos = Pos::DotCr,
                (Pos::Dot, b'\n') => self.bare(b"\n", out),
                (Pos::Dot, _) => {
                    // Dot-stuffed line: the leading dot is dropped.
                    self.content(&[b], out);
                    self.pos = Pos::Mid;
                }
                (Pos::DotCr, b'\n') => return Some(i),
                (Pos::DotCr, b'\r') => {
                    // ".\r\r": the first CR is bare, the second may start a CRLF.
                    self.flags.bare_newline = true;
                    self.line_end(b"\r", out);
                    self.pos = Pos::Cr;
                }
                (Pos::DotCr, _) => {
                    self.bare(b"\r", out);
                    self.content(&[b], out);
                }
            }
        }
        None
    }

    /// A bare CR or LF: it ends the line for anyone who reads it as one.
    fn bare(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.flags.bare_newline = true;
        self.line_end(bytes, out);
        self.pos = Pos::Mid;
    }

    fn line_end(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.line_len = 0;
        self.emit(bytes, out);
    }

    /// Line content (never CR or LF); NUL only when single.
    #[inline]
    fn content(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if bytes == [0] {
            self.flags.nul = true;
        }
        self.line_len += bytes.len();
        if self.max_line != 0 && self.line_len > self.max_line {
            self.flags.long_line = true;
        }
        self.emit(bytes, out);
    }

    #[inline]
    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let room = self.limit.saturating_sub(self.written);
        self.written += bytes.len() as u64;
        if self.written > self.limit {
            self.flags.too_big = true;
            out.extend_from_slice(&bytes[..room as usize]);
        } else {
            out.extend_from_slice(bytes);
        }
    }

    pub fn decoded_len(&self) -> u64 {
        self.written
    }
}

/// Checks BDAT chunks (raw octets, no dot-stuffing) across chunk boundaries:
/// bare CR/LF, NUL bytes and overlong lines.
#[derive(Debug, Default, Clone, Copy)]
pub struct BareNewlineScanner {
    prev_cr: bool,
    /// Bare CR or LF seen.
    pub found: bool,
    /// NUL seen.
    pub nul: bool,
    /// A line (between any CR or LF) longer than `max_line` seen.
    pub long_line: bool,
    /// 0: no limit.
    pub max_line: usize,
    line_len: usize,
}

impl BareNewlineScanner {
    pub fn new(max_line: usize) -> BareNewlineScanner {
        BareNewlineScanner {
            max_line,
            ..Default::default()
        }
    }

    pub fn scan(&mut self, chunk: &[u8]) {
        if memchr::memchr(0, chunk).is_some() {
            self.nul = true;
        }
        let mut prev_cr = self.prev_cr;
        let mut start = 0;
        while let Some(off) = memchr::memchr2(b'\r', b'\n', &chunk[start..]) {
            let at = start + off;
            self.line(off);
            self.line_len = 0;
            let cr_before = prev_cr && at == start;
            if prev_cr && at != start {
                // A CR was followed by something other than LF.
                self.found = true;
            }
            if chunk[at] == b'\n' {
                if !cr_before {
                    self.found = true;
                }
                prev_cr = false;
            } else {
                if cr_before {
                    self.found = true;
                }
                prev_cr = true;
            }
            start = at + 1;
        }
        self.line(chunk.len() - start);
        if prev_cr && start < chunk.len() {
            self.found = true;
            prev_cr = false;
        }
        self.prev_cr = prev_cr;
    }

    fn line(&mut self, octets: usize) {
        self.line_len += octets;
        if self.max_line != 0 && self.line_len > self.max_line {
            self.long_line = true;
        }
    }

    /// What the chunks held, in the terms the DATA decoder reports
    /// (`too_big` is counted by the session).
    pub fn flags(&self, too_big: bool) -> BodyFlags {
        BodyFlags {
            bare_newline: self.found,
            too_big,
            nul: self.nul,
            long_line: self.long_line,
        }
    }

    /// Call at the end of the message: a trailing CR is bare.
    pub fn finish(&mut self) {
        if self.prev_cr {
            self.found = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_split(input: &[u8], split: usize) -> (Vec<u8>, Option<usize>, BodyFlags) {
        let mut d = DataDecoder::new(1 << 20, 0);
        let mut out = Vec::new();
        let (a, b) = input.split_at(split.min(input.len()));
        if let Some(n) = d.feed(a, &mut out) {
            return (out, Some(n), d.flags);
        }
        let r = d.feed(b, &mut out).map(|n| n + a.len());
        (out, r, d.flags)
    }

    fn decode_all_splits(input: &[u8]) -> (Vec<u8>, Option<usize>, BodyFlags) {
        let whole = decode_split(input, input.len());
        for split in 0..=input.len() {
            assert_eq!(decode_split(input, split), whole, "split at {split}");
        }
        // Byte by byte too.
        let mut d = DataDecoder::new(1 << 20, 0);
        let mut out = Vec::new();
        let mut end = None;
        for (i, b) in input.iter().enumerate() {
            if let Some(n) = d.feed(std::slice::from_ref(b), &mut out) {
                assert_eq!(n, 1);
                end = Some(i + 1);
                break;
            }
        }
        assert_eq!((out.clone(), end, d.flags), whole);
        whole
    }

    #[test]
    fn plain_body_ends_at_crlf_dot_crlf() {
        let (out, end, flags) = decode_all_splits(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n");
        assert_eq!(out, b"Subject: x\r\n\r\nhello\r\n");
        assert_eq!(end, Some(24));
        assert_eq!(flags, BodyFlags::default());
    }

    #[test]
    fn empty_body() {
        let (out, end, _) = decode_all_splits(b".\r\n");
        assert_eq!(out, b"");
        assert_eq!(end, Some(3));
    }

    #[test]
    fn dot_stuffing_removed() {
        let (out, end, _) = decode_all_splits(b"..leading\r\n...\r\n.x\r\n.\r\n");
        assert_eq!(out, b".leading\r\n..\r\nx\r\n");
        assert!(end.is_some());
    }

    #[test]
    fn smuggling_bare_lf_dot_does_not_end() {
        let input = b"a\n.\nMAIL FROM:<evil@x>\r\n.\r\n";
        let (out, end, flags) = decode_all_splits(input);
        assert_eq!(end, Some(input.len()));
        assert_eq!(out, b"a\n.\nMAIL FROM:<evil@x>\r\n");
        assert!(flags.bare_newline);
    }

    #[test]
    fn smuggling_variants_never_end_early() {
        for body in [
            &b"a\r\n.\nX\r\n.\r\n"[..],
            b"a\n.\r\nX\r\n.\r\n",
            b"a\r.\r\nX\r\n.\r\n",
            b"a\r\n.\rX\r\n.\r\n",
            b"a\r\n.\r\rX\r\n.\r\n",
            b"a\r\r\n.\r\n",
        ] {
            let (out, end, flags) = decode_all_splits(body);
            assert_eq!(end, Some(body.len()), "{body:?}");
            assert!(flags.bare_newline, "{body:?}");
            assert!(
                out.ends_with(b"\r\n") || out.ends_with(b"\r\r\n"),
                "{out:?}"
            );
        }
    }

    #[test]
    fn size_limit_discards_but_finds_end() {
        let mut d = DataDecoder::new(4, 0);
        let mut out = Vec::new();
        assert_eq!(d.feed(b"123456789\r\n.\r\n", &mut out), Some(14));
        assert!(d.flags.too_big);
        assert_eq!(out, b"1234");
    }

    #[test]
    fn bdat_scanner() {
        let check = |chunks: &[&[u8]]| {
            let mut s = BareNewlineScanner::default();
            for c in chunks {
                s.scan(c);
            }
            s.finish();
            s.found
        };
        assert!(!check(&[b"a\r\nb\r\n"]));
        assert!(!check(&[b"a\r", b"\nb\r\n"]));
        assert!(check(&[b"a\nb"]));
        assert!(check(&[b"a\rb"]));
        assert!(check(&[b"a\r", b"b"]));
        assert!(check(&[b"a\r"]));
        assert!(check(&[b"\n"]));
        assert!(check(&[b"a\r\r\n"]));
    }

    #[test]
    fn nul_is_reported_wherever_it_is() {
        for body in [
            &b"a\0b\r\n.\r\n"[..],
            b"\0\r\n.\r\n",
            b"a\r\n\0.\r\n.\r\n",
            b"a\r\n.\0\r\n.\r\n",
            b"a\r\0\nb\r\n.\r\n",
            b"a\r\n.\r\0\r\n.\r\n",
        ] {
            let (out, end, flags) = decode_all_splits(body);
            assert!(flags.nul, "{body:?}");
            // NUL never ends the body: only the last CRLF.CRLF does.
            assert_eq!(end, Some(body.len()), "{body:?}");
            assert!(
                out.contains(&0),
                "NUL kept for the policy to decide: {body:?}"
            );
        }
        let (_, _, flags) = decode_all_splits(b"plain\r\n.\r\n");
        assert!(!flags.nul);
    }

    #[test]
    fn long_lines_are_reported() {
        let check = |body: &[u8], max: usize| {
            let mut d = DataDecoder::new(1 << 20, max);
            let mut out = Vec::new();
            let mut end = None;
            for b in body {
                if let Some(n) = d.feed(std::slice::from_ref(b), &mut out) {
                    end = Some(n);
                }
            }
            let mut whole = DataDecoder::new(1 << 20, max);
            assert!(whole.feed(body, &mut Vec::new()).is_some());
            assert_eq!(whole.flags, d.flags);
            assert!(end.is_some());
            d.flags.long_line
        };
        assert!(!check(b"12345\r\n.\r\n", 5));
        assert!(check(b"123456\r\n.\r\n", 5));
        // The transparency dot is not part of the line.
        assert!(!check(b"..2345\r\n.\r\n", 5));
        // Any CR or LF ends a line, as any next hop may read it.
        assert!(!check(b"123\n45\r678\r\n.\r\n", 5));
        assert!(check(b"123\n456789\r\n.\r\n", 5));
        assert!(!check(b"123456789\r\n.\r\n", 0));
    }

    #[test]
    fn bdat_scanner_nul_and_long_lines() {
        let scan = |chunks: &[&[u8]], max: usize| {
            let mut s = BareNewlineScanner::new(max);
            for c in chunks {
                s.scan(c);
            }
            s.finish();
            (s.nul, s.long_line)
        };
        assert_eq!(scan(&[b"a\r\nb"], 3), (false, false));
        assert_eq!(scan(&[b"a\0"], 3), (true, false));
        assert_eq!(scan(&[b"ab", b"cd\r\n"], 3), (false, true));
        assert_eq!(scan(&[b"abc\r", b"\nabc"], 3), (false, false));
        assert_eq!(scan(&[b"abc\r", b"\nabcd"], 3), (false, true));
        assert_eq!(scan(&[b"abcdef"], 0), (false, false));
    }
}
