//! A reply as recorded for a recipient: reply code, enhanced status code
//! (RFC 3463) and text, kept apart so nothing parses a reply line again later.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An enhanced status code "class.subject.detail" (RFC 3463), e.g. 5.1.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EnhancedStatus {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl EnhancedStatus {
    pub const fn new(class: u8, subject: u16, detail: u16) -> EnhancedStatus {
        EnhancedStatus {
            class,
            subject,
            detail,
        }
    }

    /// "5.1.1" → Some; anything else (class not 2, 4 or 5, a part missing, not
    /// digits, more than three digits) → None.
    pub fn parse(text: &str) -> Option<EnhancedStatus> {
        let mut parts = text.split('.');
        let mut next = |max_len: usize| -> Option<u16> {
            let p = parts.next()?;
            if p.is_empty() || p.len() > max_len || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            p.parse().ok()
        };
        let class = next(1)?;
        let subject = next(3)?;
        let detail = next(3)?;
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) {
            return None;
        }
        Some(EnhancedStatus::new(class as u8, subject, detail))
    }
}

impl fmt::Display for EnhancedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// A reply: ours (made up for a local condition) or the next hop's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// 3-digit reply code; 0 when a recorded text had none.
    pub code: u16,
    pub status: Option<EnhancedStatus>,
    /// The text after code and status, lines joined with spaces.
    pub text: String,
}

impl Reply {
    /// A reply with a known enhanced status (`status` must be one: use
    /// [`Reply::parse`] for text from elsewhere).
    pub fn new(code: u16, status: &str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            status: EnhancedStatus::parse(status),
            text: text.into(),
        }
    }

    /// Reads a reply line as written by [`Reply`]'s `Display` ("550 5.1.1
    /// text", "451 text"); envelopes older than version 6 stored them so.
    pub fn parse(line: &str) -> Reply {
        let line = line.trim();
        let (first, rest) = line.split_once(' ').unwrap_or((line, ""));
        let code = match first.len() == 3 && first.bytes().all(|b| b.is_ascii_digit()) {
            true => first.parse().unwrap_or(0),
            false => 0,
        };
        if code == 0 {
            return Reply {
                code,
                status: None,
                text: line.to_string(),
            };
        }
        let (word, after) = rest.split_once(' ').unwrap_or((rest, ""));
        match EnhancedStatus::parse(word) {
            Some(status) => Reply {
                code,
                status: Some(status),
                text: after.to_string(),
            },
            None => Reply {
                code,
                status: None,
                text: rest.to_string(),
            },
        }
    }

    /// 2, 4 or 5 (0 when unknown).
    pub fn class(&self) -> u16 {
        self.code / 100
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.code == 0 {
            return f.write_str(&self.text);
        }
        write!(f, "{}", self.code)?;
        if let Some(s) = self.status {
            write!(f, " {s}")?;
        }
        if !self.text.is_empty() {
            write!(f, " {}", self.text)?;
        }
        Ok(())
    }
}

impl From<&str> for Reply {
    fn from(line: &str) -> Reply {
        Reply::parse(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_read_back_what_they_print() {
        for line in [
            "550 5.1.1 no such user",
            "451 try later",
            "250 2.0.0 Ok: queued as 12345",
            "556 5.1.10 example.com does not accept mail (null MX)",
            "421",
            "something without a code",
            "550 5.4.7 message expired in the queue; last error: 451 4.2.1 busy",
        ] {
            let r = Reply::parse(line);
            assert_eq!(r.to_string(), line, "{r:?}");
        }
        let r = Reply::parse("550 5.1.1 no such user");
        assert_eq!(
            (r.code, r.status, r.text.as_str()),
            (550, Some(EnhancedStatus::new(5, 1, 1)), "no such user")
        );
        assert_eq!(Reply::parse("550 5.1 x").status, None);
        assert_eq!(Reply::parse("550 7.1.1 x").status, None);
        assert_eq!(Reply::parse("550 5.1.1000 x").status, None);
        assert_eq!(Reply::parse("250 ok").class(), 2);
    }
}
