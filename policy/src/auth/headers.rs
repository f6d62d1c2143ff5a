//! Header-field surgery the verifier needs on the received message.

/// The message without the `Authentication-Results:` fields that claim
/// `authserv_id` (RFC 8601 §5: a forged claim of ours must not survive), or
/// None when there is none (the common case: no copy).
pub fn strip_own_results(message: &[u8], authserv_id: &str) -> Option<Vec<u8>> {
    let end = header_end(message);
    let mut drop: Vec<(usize, usize)> = Vec::new();
    let mut at = 0;
    while at < end {
        let field_end = field_end(message, at, end);
        let field = &message[at..field_end];
        if let Some(colon) = field.iter().position(|&b| b == b':') {
            let name = &field[..colon];
            if name.eq_ignore_ascii_case(b"Authentication-Results")
                && claims(&field[colon + 1..], authserv_id)
            {
                drop.push((at, field_end));
            }
        }
        at = field_end;
    }
    if drop.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(message.len());
    let mut from = 0;
    for (a, b) in drop {
        out.extend_from_slice(&message[from..a]);
        from = b;
    }
    out.extend_from_slice(&message[from..]);
    Some(out)
}

/// Offset of the blank line ending the header (or the message length).
fn header_end(m: &[u8]) -> usize {
    let mut i = 0;
    while i < m.len() {
        if m[i] == b'\n' || (m[i] == b'\r' && m.get(i + 1) == Some(&b'\n')) {
            return i;
        }
        match m[i..].iter().position(|&b| b == b'\n') {
            Some(p) => i += p + 1,
            None => return m.len(),
        }
    }
    m.len()
}

/// End of the field starting at `at`, continuation lines included.
fn field_end(m: &[u8], at: usize, end: usize) -> usize {
    let mut i = at;
    loop {
        match m[i..end].iter().position(|&b| b == b'\n') {
            Some(p) => i += p + 1,
            None => return end,
        }
        if i >= end || !matches!(m[i], b' ' | b'\t') {
            return i;
        }
    }
}

/// The value's authserv-id (first token, after comments and folding)
/// equals `id`, ignoring case.
fn claims(value: &[u8], id: &str) -> bool {
    let text = String::from_utf8_lossy(value);
    let mut depth = 0usize;
    let mut token = String::new();
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' if depth > 0 => depth -= 1,
            _ if depth > 0 => {}
            ';' => break,
            c if c.is_whitespace() => {
                if !token.is_empty() {
                    break;
                }
            }
            c => token.push(c),
        }
    }
    token.eq_ignore_ascii_case(id)
}
