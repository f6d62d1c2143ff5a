//! Milter wire format: frames (`u32` big-endian length, one command byte,
//! data) and the packets carried in them, both ways. No I/O; every length is
//! bounded by the caller's limit.

use super::MilterError;
use crate::stage::FilterReply;

/// Protocol version this client speaks.
pub const VERSION: u32 = 6;
/// Largest body chunk sent in one SMFIC_BODY (the milter default, 64 KiB - 1).
pub const MAX_BODY_CHUNK: usize = 65_535;
/// Default largest frame accepted from a milter (any packet but the body
/// replacement's running total, which the message size bounds).
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// Commands (MTA to milter).
pub mod cmd {
    pub const ABORT: u8 = b'A';
    pub const BODY: u8 = b'B';
    pub const CONNECT: u8 = b'C';
    pub const MACRO: u8 = b'D';
    pub const BODYEOB: u8 = b'E';
    pub const HELO: u8 = b'H';
    pub const HEADER: u8 = b'L';
    pub const MAIL: u8 = b'M';
    pub const EOH: u8 = b'N';
    pub const OPTNEG: u8 = b'O';
    pub const QUIT: u8 = b'Q';
    pub const RCPT: u8 = b'R';
    pub const DATA: u8 = b'T';
}

/// Replies and modification requests (milter to MTA).
pub mod reply {
    pub const ADDRCPT: u8 = b'+';
    pub const DELRCPT: u8 = b'-';
    pub const ADDRCPT_PAR: u8 = b'2';
    pub const SHUTDOWN: u8 = b'4';
    pub const ACCEPT: u8 = b'a';
    pub const REPLBODY: u8 = b'b';
    pub const CONTINUE: u8 = b'c';
    pub const DISCARD: u8 = b'd';
    pub const CHGFROM: u8 = b'e';
    pub const CONN_FAIL: u8 = b'f';
    pub const ADDHEADER: u8 = b'h';
    pub const INSHEADER: u8 = b'i';
    pub const CHGHEADER: u8 = b'm';
    pub const OPTNEG: u8 = b'O';
    pub const PROGRESS: u8 = b'p';
    pub const QUARANTINE: u8 = b'q';
    pub const REJECT: u8 = b'r';
    pub const SKIP: u8 = b's';
    pub const TEMPFAIL: u8 = b't';
    pub const REPLYCODE: u8 = b'y';
}

/// Actions a milter may take (SMFIF_*), negotiated in OPTNEG.
pub mod action {
    pub const ADDHDRS: u32 = 0x01;
    pub const CHGBODY: u32 = 0x02;
    pub const ADDRCPT: u32 = 0x04;
    pub const DELRCPT: u32 = 0x08;
    pub const CHGHDRS: u32 = 0x10;
    pub const QUARANTINE: u32 = 0x20;
    pub const CHGFROM: u32 = 0x40;
    pub const ADDRCPT_PAR: u32 = 0x80;
    pub const SETSYMLIST: u32 = 0x100;
    /// Everything this client applies.
    pub const ALL: u32 = 0x1FF;
}

/// Protocol flags (SMFIP_*): steps the milter does not want (NO*) or will not
/// answer (NR_*), negotiated in OPTNEG.
pub mod proto {
    pub const NOCONNECT: u32 = 0x1;
    pub const NOHELO: u32 = 0x2;
    pub const NOMAIL: u32 = 0x4;
    pub const NORCPT: u32 = 0x8;
    pub const NOBODY: u32 = 0x10;
    pub const NOHDRS: u32 = 0x20;
    pub const NOEOH: u32 = 0x40;
    pub const NR_HDR: u32 = 0x80;
    pub const NOUNKNOWN: u32 = 0x100;
    pub const NODATA: u32 = 0x200;
    pub const SKIP: u32 = 0x400;
    pub const RCPT_REJ: u32 = 0x800;
    pub const NR_CONN: u32 = 0x1000;
    pub const NR_HELO: u32 = 0x2000;
    pub const NR_MAIL: u32 = 0x4000;
    pub const NR_RCPT: u32 = 0x8000;
    pub const NR_DATA: u32 = 0x10000;
    pub const NR_UNKN: u32 = 0x20000;
    pub const NR_EOH: u32 = 0x40000;
    pub const NR_BODY: u32 = 0x80000;
    pub const HDR_LEADSPC: u32 = 0x100000;
    /// What this client can honour: every skip and no-reply flag, SMFIR_SKIP.
    /// Not offered: RCPT_REJ (rejected recipients are not shown to milters),
    /// HDR_LEADSPC and the larger body chunk sizes.
    pub const OFFERED: u32 = NOCONNECT
        | NOHELO
        | NOMAIL
        | NORCPT
        | NOBODY
        | NOHDRS
        | NOEOH
        | NR_HDR
        | NOUNKNOWN
        | NODATA
        | SKIP
        | NR_CONN
        | NR_HELO
        | NR_MAIL
        | NR_RCPT
        | NR_DATA
        | NR_UNKN
        | NR_EOH
        | NR_BODY;
}

/// One frame: command or reply byte and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub code: u8,
    pub data: Vec<u8>,
}

/// Append one frame to `out`.
pub fn encode_frame(out: &mut Vec<u8>, code: u8, data: &[u8]) {
    encode_frame_parts(out, code, &[data]);
}

/// Append one frame whose data is the concatenation of `parts`.
pub fn encode_frame_parts(out: &mut Vec<u8>, code: u8, parts: &[&[u8]]) {
    let len: usize = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    // Frames we build are bounded far below 4 GiB (body chunks, header fields
    // of a message under the size limit); saturate rather than wrap.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.push(code);
    for part in parts {
        out.extend_from_slice(part);
    }
}

/// Append a NUL-terminated string. Embedded NULs would split the field on the
/// milter's side, so they are dropped.
pub fn put_cstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend(s.iter().copied().filter(|&b| b != 0));
    out.push(0);
}

/// Splits a byte stream into frames. Holds at most one partial frame.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    max_frame: usize,
}

impl FrameDecoder {
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            max_frame,
        }
    }

    /// Add bytes read from the milter.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that are not yet a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next whole frame, if one has arrived. A length of 0 or above the
    /// limit is an error as soon as the four length bytes are in.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, MilterError> {
        let avail = &self.buf[self.start..];
        let Some(len_bytes) = avail.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len == 0 {
            return Err(MilterError::EmptyFrame);
        }
        if len > self.max_frame {
            return Err(MilterError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        let Some(frame) = avail.get(4..4 + len) else {
            return Ok(None);
        };
        let out = Frame {
            code: frame[0],
            data: frame[1..].to_vec(),
        };
        self.start += 4 + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some(out))
    }
}

/// A reader over a frame's data: NUL-terminated strings and big-endian words.
pub struct Fields<'a> {
    data: &'a [u8],
    code: u8,
}

impl<'a> Fields<'a> {
    pub fn new(code: u8, data: &'a [u8]) -> Self {
        Fields { data, code }
    }

    fn malformed(&self, why: &'static str) -> MilterError {
        MilterError::Malformed {
            code: char::from(self.code),
            why,
        }
    }

    pub fn u32(&mut self) -> Result<u32, MilterError> {
        let Some(word) = self.data.get(..4) else {
            return Err(self.malformed("truncated 32-bit field"));
        };
        let v = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        self.data = &self.data[4..];
        Ok(v)
    }

    /// A NUL-terminated string as UTF-8 (lossy: milters send Latin-1 at times).
    pub fn cstr(&mut self) -> Result<String, MilterError> {
        let Some(end) = self.data.iter().position(|&b| b == 0) else {
            return Err(self.malformed("string without its NUL terminator"));
        };
        let s = String::from_utf8_lossy(&self.data[..end]).into_owned();
        self.data = &self.data[end + 1..];
        Ok(s)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn rest(&self) -> &'a [u8] {
        self.data
    }
}

/// The milter's answer to OPTNEG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub version: u32,
    /// SMFIF_* the milter will use.
    pub actions: u32,
    /// SMFIP_* the milter asked for.
    pub protocol: u32,
    /// Macro names the milter wants per step (SMFIM_* index), when it said.
    pub symlists: [Option<Vec<String>>; 7],
}

impl Negotiated {
    pub fn has(&self, protocol_flag: u32) -> bool {
        self.protocol & protocol_flag != 0
    }
}

/// The OPTNEG command this client sends.
pub fn encode_optneg(out: &mut Vec<u8>) {
    let mut data = [0u8; 12];
    data[..4].copy_from_slice(&VERSION.to_be_bytes());
    data[4..8].copy_from_slice(&action::ALL.to_be_bytes());
    data[8..].copy_from_slice(&proto::OFFERED.to_be_bytes());
    encode_frame(out, cmd::OPTNEG, &data);
}

/// Most macro names one symlist may carry.
const MAX_SYMLIST_NAMES: usize = 64;

/// Parse the milter's OPTNEG reply and check it asks for nothing not offered.
pub fn decode_optneg(frame: &Frame) -> Result<Negotiated, MilterError> {
    if frame.code != reply::OPTNEG {
        return Err(MilterError::Unexpected {
            code: char::from(frame.code),
            during: "option negotiation",
        });
    }
    let mut f = Fields::new(frame.code, &frame.data);
    let version = f.u32()?;
    let actions = f.u32()?;
    let protocol = f.u32()?;
    if !(2..=VERSION).contains(&version) {
        return Err(MilterError::Version(version));
    }
    if actions & !action::ALL != 0 {
        return Err(MilterError::NotOffered {
            what: "actions",
            bits: actions & !action::ALL,
        });
    }
    if protocol & !proto::OFFERED != 0 {
        return Err(MilterError::NotOffered {
            what: "protocol flags",
            bits: protocol & !proto::OFFERED,
        });
    }
    let mut symlists: [Option<Vec<String>>; 7] = Default::default();
    while !f.is_empty() {
        let index = f.u32()?;
        let names = f.cstr()?;
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| symlists.get_mut(i))
            .ok_or(MilterError::Malformed {
                code: 'O',
                why: "macro list for an unknown step",
            })?;
        let list: Vec<String> = names
            .split([' ', ','])
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect();
        if list.len() > MAX_SYMLIST_NAMES {
            return Err(MilterError::Malformed {
                code: 'O',
                why: "more than 64 macros asked for one step",
            });
        }
        *slot = Some(list);
    }
    Ok(Negotiated {
        version,
        actions,
        protocol,
        symlists,
    })
}

/// Parse SMFIR_REPLYCODE's text ("550 5.7.1 go away", possibly multi-line
/// with "550-…\r\n550 …") into a reply; the code must be 4xx or 5xx and the
/// enhanced status, when present, of the same class.
pub fn parse_replycode(data: &[u8]) -> Result<FilterReply, MilterError> {
    let bad = |why: &'static str| MilterError::Malformed { code: 'y', why };
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let text = String::from_utf8_lossy(&data[..end]);
    let mut code = None;
    let mut enhanced: Option<String> = None;
    let mut texts = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() && i > 0 {
            continue;
        }
        let digits = line
            .get(..3)
            .ok_or_else(|| bad("reply shorter than a code"))?;
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("reply does not start with a three-digit code"));
        }
        let this: u16 = digits.parse().map_err(|_| bad("bad reply code"))?;
        if !(400..600).contains(&this) {
            return Err(bad("reply code is not 4xx or 5xx"));
        }
        if *code.get_or_insert(this) != this {
            return Err(bad("lines of a multi-line reply differ in code"));
        }
        let rest = &line[3..];
        let rest = rest
            .strip_prefix(' ')
            .or_else(|| rest.strip_prefix('-'))
            .unwrap_or(rest);
        let (status, words) = match rest.split_once(' ') {
            Some((first, words)) if is_enhanced(first) => (Some(first), words),
            _ if is_enhanced(rest) => (Some(rest), ""),
            _ => (None, rest),
        };
        if let Some(status) = status {
            if status.as_bytes()[0] != digits.as_bytes()[0] {
                return Err(bad("enhanced status class differs from the reply code"));
            }
            enhanced.get_or_insert_with(|| status.to_string());
        }
        if !words.is_empty() {
            texts.push(words.to_string());
        }
    }
    let code = code.ok_or_else(|| bad("empty reply"))?;
    Ok(FilterReply {
        code,
        enhanced,
        text: texts.join(" "),
    })
}

fn is_enhanced(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
}
