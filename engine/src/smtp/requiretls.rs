//! REQUIRETLS (RFC 8689) on the way in, pure: the MAIL parameter seen twice,
//! and the `TLS-Required: No` header field of a received message.

/// Whether the MAIL command line names the REQUIRETLS parameter more than
/// once (501: a parameter may appear once, RFC 5321 §4.1.1.11). The parser
/// keeps a flag, so the line itself is looked at.
pub fn repeated(line: &[u8]) -> bool {
    // Parameters follow the closing '>' of the reverse-path.
    let params = match line.iter().position(|&b| b == b'>') {
        Some(end) => &line[end + 1..],
        None => return false,
    };
    params
        .split(|b| b.is_ascii_whitespace())
        .filter(|word| word.eq_ignore_ascii_case(b"REQUIRETLS"))
        .count()
        > 1
}

/// Longest header block looked at for `TLS-Required` (the header block of a
/// message that carries the field is rarely larger; beyond it the field
/// counts as absent).
const MAX_HEADER_BYTES: usize = 256 * 1024;

/// Whether the message's header block has a `TLS-Required` field whose value
/// is `No` (RFC 8689 §3; case-insensitive, folding and surrounding
/// whitespace allowed). Any other value, or none, is false. Only the first
/// `TLS-Required` field counts.
pub fn tls_required_no(message: &[u8]) -> bool {
    let block = &message[..message.len().min(MAX_HEADER_BYTES)];
    let mut lines = block.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            // End of the header block.
            return false;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if !line[..colon]
            .trim_ascii()
            .eq_ignore_ascii_case(b"TLS-Required")
        {
            continue;
        }
        let mut value = line[colon + 1..].to_vec();
        while let Some(next) = lines.peek() {
            if next.first().is_some_and(|&b| b == b' ' || b == b'\t') {
                let next = next.strip_suffix(b"\r").unwrap_or(next);
                value.push(b' ');
                value.extend_from_slice(next);
                lines.next();
            } else {
                break;
            }
        }
        return value.trim_ascii().eq_ignore_ascii_case(b"No");
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parameter_twice_is_found_once_is_not() {
        assert!(!repeated(b"MAIL FROM:<a@b> REQUIRETLS"));
        assert!(!repeated(
            b"MAIL FROM:<a@b> SIZE=10 requiretls BODY=8BITMIME"
        ));
        assert!(repeated(b"MAIL FROM:<a@b> REQUIRETLS REQUIRETLS"));
        assert!(repeated(b"MAIL FROM:<a@b> RequireTLS SMTPUTF8 requiretls"));
        // In the address it is no parameter.
        assert!(!repeated(b"MAIL FROM:<REQUIRETLS@b> REQUIRETLS"));
        assert!(!repeated(b"MAIL FROM:<a@b> REQUIRETLS=1 REQUIRETLS"));
        assert!(!repeated(b"MAIL FROM:a@b REQUIRETLS REQUIRETLS"));
    }

    #[test]
    fn tls_required_no_in_the_header_block_only() {
        let yes: &[&[u8]] = &[
            b"Received: x\r\nTLS-Required: No\r\n\r\nbody",
            b"tls-required:no\r\n\r\n",
            b"Subject: a\r\nTLS-Required:\r\n  NO  \r\n\r\n",
            b"TLS-Required: No\n\nbare newlines",
        ];
        for m in yes {
            assert!(tls_required_no(m), "{}", String::from_utf8_lossy(m));
        }
        let no: &[&[u8]] = &[
            b"Subject: a\r\n\r\nTLS-Required: No\r\n",
            b"TLS-Required: Yes\r\n\r\n",
            b"TLS-Required: No thanks\r\n\r\n",
            b"X-TLS-Required: No\r\n\r\n",
            b"Subject: TLS-Required: No\r\n\r\n",
            b"",
            // The first field decides.
            b"TLS-Required: maybe\r\nTLS-Required: No\r\n\r\n",
        ];
        for m in no {
            assert!(!tls_required_no(m), "{}", String::from_utf8_lossy(m));
        }
    }
}
