//! Submission hygiene on a received message (sans-IO): the Date and
//! Message-ID header fields a submitting client left out (RFC 6409 §8.2, 8.3),
//! and bare CR/LF turned into CRLF under `bare_newline = "normalize"`.

/// Which of the fields we may add are already in a header block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeaderPresence {
    pub date: bool,
    pub message_id: bool,
}

/// Looks at the field names of the header block at the start of `message`
/// (up to the first empty line, or the end). Continuation lines are skipped;
/// names compare case-insensitively (RFC 5322 §1.2.2).
pub fn header_presence(message: &[u8]) -> HeaderPresence {
    let mut found = HeaderPresence::default();
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii_end();
        if name.eq_ignore_ascii_case(b"date") {
            found.date = true;
        } else if name.eq_ignore_ascii_case(b"message-id") {
            found.message_id = true;
        }
        if found.date && found.message_id {
            break;
        }
    }
    found
}

/// The header fields to add to a message that lacks them, CRLF-terminated:
/// `Date` from `now_ms`, `Message-ID` from our queue id (unique per relay)
/// and host name.
pub fn missing_fields(
    present: HeaderPresence,
    queue_id: &str,
    hostname: &str,
    now_ms: u64,
) -> String {
    let mut fields = String::new();
    if !present.date {
        let date = chrono::DateTime::from_timestamp_millis(now_ms as i64)
            .unwrap_or_default()
            .to_rfc2822();
        fields.push_str(&format!("Date: {date}\r\n"));
    }
    if !present.message_id {
        fields.push_str(&format!("Message-ID: <{queue_id}@{hostname}>\r\n"));
    }
    fields
}

/// Every CR not followed by LF and every LF not preceded by CR becomes CRLF;
/// CRLF pairs are kept. Returns None when there was nothing to change.
pub fn normalize_line_ends(message: &[u8]) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut i = 0;
    while let Some(off) = memchr::memchr2(b'\r', b'\n', &message[i..]) {
        let at = i + off;
        let bare = match message[at] {
            b'\r' => message.get(at + 1) != Some(&b'\n'),
            _ => at == 0 || message[at - 1] != b'\r',
        };
        i = at + 1;
        if bare {
            let buf = out.get_or_insert_with(|| Vec::with_capacity(message.len() + 64));
            buf.extend_from_slice(&message[copied..at]);
            buf.extend_from_slice(b"\r\n");
            copied = at + 1;
        }
    }
    let mut buf = out?;
    buf.extend_from_slice(&message[copied..]);
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_fields_in_the_header_block_only() {
        let m =
            b"Subject: hi\r\nDATE: Sun, 6 Dec 2026 10:00:00 +0000\r\n\r\nMessage-ID: <in@body>\r\n";
        assert_eq!(
            header_presence(m),
            HeaderPresence {
                date: true,
                message_id: false
            }
        );
        let folded = b"Subject: a\r\n Message-ID: <not@a.field>\r\nmessage-id : <x@y>\r\n\r\n";
        let p = header_presence(folded);
        assert!(p.message_id && !p.date);
        // A message that is all header block (no empty line) is still read.
        assert!(header_presence(b"Date: x\r\nMessage-Id: <a@b>").message_id);
        assert_eq!(header_presence(b""), HeaderPresence::default());
    }

    #[test]
    fn adds_only_what_is_missing() {
        let now = 1_796_558_400_000; // 2026-12-06 12:00:00 UTC
        let both = missing_fields(HeaderPresence::default(), "0a1b2c", "mx.example", now);
        assert_eq!(
            both,
            "Date: Sun, 6 Dec 2026 12:00:00 +0000\r\nMessage-ID: <0a1b2c@mx.example>\r\n"
        );
        let only_id = missing_fields(
            HeaderPresence {
                date: true,
                message_id: false,
            },
            "q",
            "h",
            now,
        );
        assert_eq!(only_id, "Message-ID: <q@h>\r\n");
        let none = missing_fields(
            HeaderPresence {
                date: true,
                message_id: true,
            },
            "q",
            "h",
            now,
        );
        assert!(none.is_empty());
    }

    #[test]
    fn normalizes_bare_cr_and_lf() {
        assert_eq!(normalize_line_ends(b"a\r\nb\r\n"), None);
        assert_eq!(normalize_line_ends(b""), None);
        let cases: [(&[u8], &[u8]); 6] = [
            (b"a\nb\n", b"a\r\nb\r\n"),
            (b"a\rb", b"a\r\nb"),
            (b"\n", b"\r\n"),
            (b"\r", b"\r\n"),
            (b"a\r\r\nb", b"a\r\n\r\nb"),
            (b"x\n\r\ny\n\rz", b"x\r\n\r\ny\r\n\r\nz"),
        ];
        for (input, want) in cases {
            let got = normalize_line_ends(input).expect("changed");
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(input));
            // The result has no bare line ends left.
            assert_eq!(normalize_line_ends(&got), None);
        }
    }
}
