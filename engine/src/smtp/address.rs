//! Envelope addresses as they are stored and sent on.
//!
//! The command parser hands over a quoted local part without its quotes
//! (`"a@b"@example.com` arrives as `a@b@example.com`). Stored and relayed like that,
//! the next hop could read the first '@' as the domain separator, or reject the
//! malformed address. So a local part that is not a dot-atom is quoted again
//! (RFC 5321 §4.1.2 Quoted-string), which keeps the address meaning what the client
//! sent, and lets the relay policy see routing characters inside it.

use std::borrow::Cow;

/// The address with its local part quoted when it is not a dot-atom. Addresses
/// without '@' (a bare "postmaster") and empty addresses come back unchanged.
pub fn requote(address: &str) -> Cow<'_, str> {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Cow::Borrowed(address);
    };
    if is_dot_atom(local) {
        return Cow::Borrowed(address);
    }
    let mut out = String::with_capacity(address.len() + 4);
    out.push('"');
    for c in local.chars() {
        // qtextSMTP excludes only '"' and '\'; they are escaped (quoted-pairSMTP).
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out.push('@');
    out.push_str(domain);
    Cow::Owned(out)
}

/// RFC 5321 Dot-string: atoms of atext joined by single dots (RFC 6531 adds any
/// non-ASCII character to atext).
fn is_dot_atom(local: &str) -> bool {
    !local.is_empty()
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_atoms_are_left_alone() {
        for a in [
            "user@example.com",
            "user%other.org@example.com",
            "other.org!user@example.com",
            "a.b+c@example.com",
            "jöran@bücher.de",
            "postmaster",
            "",
        ] {
            assert_eq!(requote(a), a, "{a}");
        }
    }

    #[test]
    fn other_local_parts_are_quoted() {
        assert_eq!(
            requote("user@other.org@example.com"),
            "\"user@other.org\"@example.com"
        );
        assert_eq!(requote("a b@example.com"), "\"a b\"@example.com");
        assert_eq!(requote(".a@example.com"), "\".a\"@example.com");
        assert_eq!(requote("a..b@example.com"), "\"a..b\"@example.com");
        assert_eq!(requote("a\"b\\c@x.test"), "\"a\\\"b\\\\c\"@x.test");
        assert_eq!(requote("@example.com"), "\"\"@example.com");
    }
}
