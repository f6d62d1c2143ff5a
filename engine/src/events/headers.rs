//! Reading a few header fields from a message's header block, sans-IO and
//! bounded: the scan stops at the blank line that ends the header or after
//! [`MAX_SCAN`] bytes, and each value is cut at [`MAX_VALUE`] characters.

/// Bytes of header looked at, at most.
pub const MAX_SCAN: usize = 256 * 1024;
/// Characters kept of a value.
pub const MAX_VALUE: usize = 256;

/// The first occurrence of each named field (names compared without regard
/// to case; an empty name matches nothing), unfolded and trimmed; none when
/// absent or empty.
pub fn read<const N: usize>(message: &[u8], names: [&str; N]) -> [Option<String>; N] {
    let mut out: [Option<String>; N] = std::array::from_fn(|_| None);
    let head = &message[..message.len().min(MAX_SCAN)];
    // (field index being read, value bytes so far)
    let mut current: Option<(usize, Vec<u8>)> = None;
    let finish = |current: &mut Option<(usize, Vec<u8>)>, out: &mut [Option<String>; N]| {
        if let Some((i, value)) = current.take() {
            let text = String::from_utf8_lossy(&value);
            let text: String = text
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .chars()
                .take(MAX_VALUE)
                .collect();
            if !text.is_empty() && out[i].is_none() {
                out[i] = Some(text);
            }
        }
    };
    for raw in head.split(|&b| b == b'\n') {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.is_empty() {
            break; // end of the header
        }
        if line[0] == b' ' || line[0] == b'\t' {
            if let Some((_, value)) = current.as_mut() {
                if value.len() < MAX_VALUE * 4 {
                    value.push(b' ');
                    value.extend_from_slice(line);
                }
            }
            continue;
        }
        finish(&mut current, &mut out);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = &line[..colon];
        if let Some(i) = names
            .iter()
            .position(|n| !n.is_empty() && name.trim_ascii().eq_ignore_ascii_case(n.as_bytes()))
        {
            if out[i].is_none() {
                let rest = &line[colon + 1..];
                current = Some((i, rest[..rest.len().min(MAX_VALUE * 4)].to_vec()));
            }
        }
    }
    finish(&mut current, &mut out);
    out
}

/// Removes every occurrence of the named field (with its folded lines) from
/// the message's header block (the first [`MAX_SCAN`] bytes, up to the blank
/// line); the body is not touched. Returns how many were removed.
pub fn remove(message: &mut Vec<u8>, name: &str) -> usize {
    if name.is_empty() {
        return 0;
    }
    let scan = message.len().min(MAX_SCAN);
    // Byte ranges of the fields to drop, found first, cut after.
    let mut drop: Vec<(usize, usize)> = Vec::new();
    let mut in_field = false;
    let mut at = 0;
    while at < scan {
        let end = message[at..scan]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(scan, |i| at + i + 1);
        let line = &message[at..end];
        let bare = line.strip_suffix(b"\n").unwrap_or(line);
        let bare = bare.strip_suffix(b"\r").unwrap_or(bare);
        if bare.is_empty() {
            break; // end of the header
        }
        if bare[0] == b' ' || bare[0] == b'\t' {
            if in_field {
                if let Some(last) = drop.last_mut() {
                    last.1 = end;
                }
            }
        } else {
            in_field = bare
                .iter()
                .position(|&b| b == b':')
                .is_some_and(|c| bare[..c].trim_ascii().eq_ignore_ascii_case(name.as_bytes()));
            if in_field {
                drop.push((at, end));
            }
        }
        at = end;
    }
    for &(start, end) in drop.iter().rev() {
        message.drain(start..end);
    }
    drop.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_folded_case_insensitive_first_only_and_stops_at_body() {
        let msg = b"Received: from x\r\n\tby y\r\nmessage-id:\r\n <abc@example.test>\r\nX-Tenant: acme \r\nX-Tenant: second\r\nSubject: hi\r\n\r\nX-Campaign: in the body\r\n";
        let [mid, tenant, campaign] = read(msg, ["Message-ID", "X-Tenant", "X-Campaign"]);
        assert_eq!(mid.as_deref(), Some("<abc@example.test>"));
        assert_eq!(tenant.as_deref(), Some("acme"));
        assert_eq!(campaign, None, "the body is not the header");
    }

    #[test]
    fn remove_drops_every_occurrence_with_its_folds_and_not_the_body() {
        let mut msg = b"Received: x\r\nX-Tenant: acme\r\n\tfolded\r\nSubject: hi\r\nx-tenant: b\r\n\r\nX-Tenant: body\r\n".to_vec();
        assert_eq!(remove(&mut msg, "X-Tenant"), 2);
        assert_eq!(
            msg,
            b"Received: x\r\nSubject: hi\r\n\r\nX-Tenant: body\r\n".to_vec()
        );
        assert_eq!(
            remove(&mut msg, "X-Tenant"),
            0,
            "the body is not the header"
        );
        assert_eq!(remove(&mut msg, ""), 0);
        let mut bare = b"X-Tenant: a\nB: c\n\nbody".to_vec();
        assert_eq!(remove(&mut bare, "x-tenant"), 1);
        assert_eq!(bare, b"B: c\n\nbody".to_vec());
    }

    #[test]
    fn empty_names_and_values_and_long_values_are_bounded() {
        let long = "v".repeat(5000);
        let msg = format!("A: {long}\nB:\n\nbody");
        let [a, b, c] = read(msg.as_bytes(), ["a", "b", ""]);
        assert_eq!(a.map(|s| s.len()), Some(MAX_VALUE));
        assert_eq!(b, None);
        assert_eq!(c, None);
        let [none] = read(b"no header at all", ["x"]);
        assert_eq!(none, None);
    }
}
