//! Header fields of a message as filters see and change them: split the header
//! block into fields, apply [`Modification`]s to a message and its envelope, and
//! turn a rewritten message (Sieve editheader) back into modifications.
//!
//! Messages here are whole (header and body) with CRLF line ends, as the SMTP
//! session holds them.

use crate::stage::Modification;

/// Most recipients a filter may leave on a message (redirects included).
pub const MAX_RECIPIENTS_AFTER_FILTER: usize = 1000;

/// One header field: its name as written and its raw bytes (name, colon,
/// value and folded continuation lines, final CRLF included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<'a> {
    pub name: &'a str,
    pub raw: &'a [u8],
}

impl Field<'_> {
    /// The value unfolded and trimmed (continuation line breaks removed).
    pub fn value(&self) -> String {
        let after = self.raw.len().min(self.name.len() + 1);
        let text = String::from_utf8_lossy(&self.raw[after..]);
        text.replace("\r\n", "")
            .replace('\n', "")
            .trim()
            .to_string()
    }
}

/// The header fields of `message` and the offset where the body starts (after
/// the empty line; the message length when there is no body). Lines that are
/// not fields (no colon) end the header block, as in mail parsers.
pub fn split_fields(message: &[u8]) -> (Vec<Field<'_>>, usize) {
    let mut fields = Vec::new();
    let mut pos = 0;
    while pos < message.len() {
        let line_end = line_end(message, pos);
        let line = &message[pos..line_end];
        if line == b"\r\n" || line == b"\n" {
            return (fields, line_end);
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return (fields, pos);
        };
        let name = &line[..colon];
        if name.is_empty() || name.iter().any(|b| !(33..=126).contains(b)) {
            return (fields, pos);
        }
        // Folded continuation lines start with a space or a tab.
        let mut end = line_end;
        while end < message.len() && matches!(message[end], b' ' | b'\t') {
            end = self::line_end(message, end);
        }
        let name = std::str::from_utf8(name).unwrap_or_default();
        fields.push(Field {
            name,
            raw: &message[pos..end],
        });
        pos = end;
    }
    (fields, message.len())
}

fn line_end(message: &[u8], from: usize) -> usize {
    memchr_lf(&message[from..]).map_or(message.len(), |at| from + at + 1)
}

fn memchr_lf(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

/// The envelope parts a filter may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditableEnvelope {
    pub sender: String,
    pub recipients: Vec<String>,
}

/// Why a set of modifications cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("header field name {0:?} is not valid")]
    BadHeaderName(String),
    #[error("header field value for {0:?} contains a bare line break or NUL")]
    BadHeaderValue(String),
    #[error("address {0:?} is not valid")]
    BadAddress(String),
    #[error("more than {MAX_RECIPIENTS_AFTER_FILTER} recipients")]
    TooManyRecipients,
}

/// Applies `mods` in order to `message` and `envelope`. Recipient and sender
/// changes go to the envelope; header and body changes rebuild the message.
/// Returns the new message (unchanged bytes when only the envelope changed).
pub fn apply(
    mods: &[Modification],
    envelope: &mut EditableEnvelope,
    message: Vec<u8>,
) -> Result<Vec<u8>, ApplyError> {
    let touches_message = mods.iter().any(|m| {
        !matches!(
            m,
            Modification::AddRecipient { .. }
                | Modification::RemoveRecipient { .. }
                | Modification::ChangeSender { .. }
        )
    });
    for m in mods {
        match m {
            Modification::AddRecipient { address } => {
                check_address(address)?;
                if !envelope
                    .recipients
                    .iter()
                    .any(|r| r.eq_ignore_ascii_case(address))
                {
                    if envelope.recipients.len() >= MAX_RECIPIENTS_AFTER_FILTER {
                        return Err(ApplyError::TooManyRecipients);
                    }
                    envelope.recipients.push(address.clone());
                }
            }
            Modification::RemoveRecipient { address } => {
                let bare = strip_brackets(address);
                envelope
                    .recipients
                    .retain(|r| !r.eq_ignore_ascii_case(bare));
            }
            Modification::ChangeSender { address } => {
                let bare = strip_brackets(address);
                if !bare.is_empty() {
                    check_address(bare)?;
                }
                envelope.sender = bare.to_string();
            }
            _ => {}
        }
    }
    if !touches_message {
        return Ok(message);
    }
    let (fields, body_at) = split_fields(&message);
    let mut headers: Vec<Vec<u8>> = fields.iter().map(|f| f.raw.to_vec()).collect();
    let mut body = message[body_at..].to_vec();
    // The header block ends with an empty line when the message has one.
    let fields_end: usize = fields.iter().map(|f| f.raw.len()).sum();
    let mut separator = body_at > fields_end;
    for m in mods {
        match m {
            Modification::AddHeader { name, value, index } => {
                let field = make_field(name, value)?;
                let at = index.unwrap_or(0).min(headers.len());
                headers.insert(at, field);
            }
            Modification::ChangeHeader {
                name,
                occurrence,
                value,
            } => {
                check_name(name)?;
                let found = headers
                    .iter()
                    .enumerate()
                    .filter(|(_, raw)| field_name(raw).eq_ignore_ascii_case(name))
                    .nth(occurrence.saturating_sub(1))
                    .map(|(i, _)| i);
                match (found, value.is_empty()) {
                    (Some(i), true) => {
                        headers.remove(i);
                    }
                    (Some(i), false) => headers[i] = make_field(name, value)?,
                    // Milter semantics: changing a missing field adds it.
                    (None, false) => headers.push(make_field(name, value)?),
                    (None, true) => {}
                }
            }
            Modification::RemoveHeader { name } => {
                headers.retain(|raw| !field_name(raw).eq_ignore_ascii_case(name));
            }
            Modification::ReplaceBody { body: new } => {
                body = new.clone();
                separator = true;
            }
            _ => {}
        }
    }
    let mut out = Vec::with_capacity(message.len() + 256);
    for h in &headers {
        out.extend_from_slice(h);
    }
    if separator {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&body);
    Ok(out)
}

fn field_name(raw: &[u8]) -> &str {
    let end = raw.iter().position(|&b| b == b':').unwrap_or(0);
    std::str::from_utf8(&raw[..end]).unwrap_or_default()
}

fn strip_brackets(address: &str) -> &str {
    let a = address.trim();
    a.strip_prefix('<')
        .and_then(|a| a.strip_suffix('>'))
        .unwrap_or(a)
}

fn check_name(name: &str) -> Result<(), ApplyError> {
    if name.is_empty()
        || name.len() > 256
        || name.bytes().any(|b| !(33..=126).contains(&b) || b == b':')
    {
        return Err(ApplyError::BadHeaderName(name.to_string()));
    }
    Ok(())
}

fn check_address(address: &str) -> Result<(), ApplyError> {
    let ok = address.len() <= 512
        && address.contains('@')
        && !address
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'<' || b == b'>');
    if ok {
        Ok(())
    } else {
        Err(ApplyError::BadAddress(address.to_string()))
    }
}

/// "Name: value\r\n"; a value with line breaks must already be folded (each
/// break followed by a space or tab), else it is refused.
fn make_field(name: &str, value: &str) -> Result<Vec<u8>, ApplyError> {
    check_name(name)?;
    let value = value.trim_start();
    let normalized = value.replace("\r\n", "\n");
    let bad = normalized.contains('\0')
        || normalized.contains('\r')
        || normalized
            .split('\n')
            .skip(1)
            .any(|line| !line.starts_with([' ', '\t']));
    if bad || value.len() > 64 * 1024 {
        return Err(ApplyError::BadHeaderValue(name.to_string()));
    }
    let mut out = Vec::with_capacity(name.len() + value.len() + 4);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(normalized.replace('\n', "\r\n").as_bytes());
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

/// The header modifications that turn `before`'s header block into `after`'s:
/// every field name whose fields differ is removed, then `after`'s fields of
/// those names are added at their positions. Applied in order with [`apply`]
/// they rebuild `after`'s header block (unchanged fields keep their bytes).
pub fn header_diff(before: &[u8], after: &[u8]) -> Vec<Modification> {
    let (old, _) = split_fields(before);
    let (new, _) = split_fields(after);
    let key = |f: &Field<'_>| (f.name.to_ascii_lowercase(), f.value());
    let values_of = |fields: &[Field<'_>], name: &str| -> Vec<String> {
        fields
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case(name))
            .map(|f| f.value())
            .collect()
    };
    let mut changed: Vec<String> = Vec::new();
    for f in old.iter().chain(new.iter()) {
        let name = f.name.to_ascii_lowercase();
        if changed.contains(&name) {
            continue;
        }
        if values_of(&old, &name) != values_of(&new, &name) {
            changed.push(name);
        }
    }
    let mut mods: Vec<Modification> = changed
        .iter()
        .map(|name| Modification::RemoveHeader { name: name.clone() })
        .collect();
    for (i, f) in new.iter().enumerate() {
        let (name, value) = key(f);
        if changed.contains(&name) {
            mods.push(Modification::AddHeader {
                name: f.name.to_string(),
                value,
                index: Some(i),
            });
        }
    }
    mods
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] =
        b"Received: from a\r\n\tby b\r\nSubject: hi\r\nX-Spam: yes\r\nX-Spam: no\r\n\r\nbody\r\n";

    fn env() -> EditableEnvelope {
        EditableEnvelope {
            sender: "a@example.org".into(),
            recipients: vec!["b@example.net".into()],
        }
    }

    #[test]
    fn fields_are_split_with_folding() {
        let (fields, body) = split_fields(MSG);
        assert_eq!(fields.len(), 4);
        assert_eq!(fields[0].name, "Received");
        assert_eq!(fields[0].value(), "from a\tby b");
        assert_eq!(&MSG[body..], b"body\r\n");
    }

    #[test]
    fn header_changes_apply_in_order() {
        let mods = vec![
            Modification::AddHeader {
                name: "X-Filtered".into(),
                value: "yes".into(),
                index: Some(1),
            },
            Modification::RemoveHeader {
                name: "x-spam".into(),
            },
            Modification::ChangeHeader {
                name: "Subject".into(),
                occurrence: 1,
                value: "[ext] hi".into(),
            },
        ];
        let mut e = env();
        let out = apply(&mods, &mut e, MSG.to_vec()).expect("apply");
        assert_eq!(
            out,
            b"Received: from a\r\n\tby b\r\nX-Filtered: yes\r\nSubject: [ext] hi\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn envelope_changes_leave_the_message() {
        let mods = vec![
            Modification::AddRecipient {
                address: "c@example.net".into(),
            },
            Modification::RemoveRecipient {
                address: "<b@example.net>".into(),
            },
            Modification::ChangeSender {
                address: "<>".into(),
            },
        ];
        let mut e = env();
        let out = apply(&mods, &mut e, MSG.to_vec()).expect("apply");
        assert_eq!(out, MSG);
        assert_eq!(e.recipients, vec!["c@example.net".to_string()]);
        assert_eq!(e.sender, "");
    }

    #[test]
    fn bad_input_is_refused() {
        let mut e = env();
        let bad_value = vec![Modification::AddHeader {
            name: "X-A".into(),
            value: "a\r\nInjected: yes".into(),
            index: None,
        }];
        assert!(matches!(
            apply(&bad_value, &mut e, MSG.to_vec()),
            Err(ApplyError::BadHeaderValue(_))
        ));
        let bad_rcpt = vec![Modification::AddRecipient {
            address: "a b@c".into(),
        }];
        assert!(matches!(
            apply(&bad_rcpt, &mut e, MSG.to_vec()),
            Err(ApplyError::BadAddress(_))
        ));
    }

    #[test]
    fn body_is_replaced() {
        let mods = vec![Modification::ReplaceBody {
            body: b"new\r\n".to_vec(),
        }];
        let out = apply(&mods, &mut env(), MSG.to_vec()).expect("apply");
        assert!(out.ends_with(b"X-Spam: no\r\n\r\nnew\r\n"));
    }

    #[test]
    fn diff_rebuilds_the_new_header_block() {
        let after = b"X-Top: 1\r\nReceived: from a\r\n\tby b\r\nSubject: hi\r\n\r\nbody\r\n";
        let mods = header_diff(MSG, after);
        let out = apply(&mods, &mut env(), MSG.to_vec()).expect("apply");
        assert_eq!(out, after);
    }
}
