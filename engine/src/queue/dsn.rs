//! Delivery status notifications (RFC 3464 report format, RFC 3461 SMTP DSN
//! semantics, RFC 6522 multipart/report, RFC 6533 for internationalised mail).
//!
//! Pure: envelope + original bytes + per-recipient outcomes in, a complete RFC 5322
//! notice out. No I/O, no clock (the caller passes `now`). The MIME structure is
//! built with mail-builder; the machine-readable `message/delivery-status` body is
//! written here because it is a list of header blocks, not free text.
//!
//! Choices worth knowing:
//! - Who gets a notice is decided per recipient from its NOTIFY and its action
//!   (RFC 3461 §4.1): `failed` needs FAILURE or no NOTIFY, `delayed` needs DELAY or
//!   no NOTIFY, `delivered`/`relayed`/`expanded` need SUCCESS; NEVER silences the
//!   recipient. No recipient left, or a null sender: no notice (`None`).
//! - Returned content: RET=FULL → the whole original as `message/rfc822`; RET=HDRS →
//!   its header block as `text/rfc822-headers`. Without RET a failure notice returns
//!   the whole original when it is at most 64 KiB and the headers otherwise; delay
//!   and success notices return the headers (the sender still has the message, and a
//!   delay notice may repeat several times).
//! - Mail from a client that was neither in the relay networks nor authenticated
//!   carries a [`NoticeLimit`] (the listener's `untrusted_notices`): its success and
//!   delay notices return the headers only, or are not sent. Such a client can name
//!   any sender, and a "relayed" notice with RET=FULL would mail the whole message
//!   there: a reflector. Failure notices are what a sender needs; they are not limited.
//! - The original's headers are found by splitting at the first empty line (CRLF
//!   CRLF, or LF LF for tolerance); no MIME parser is needed for that, and the
//!   original is embedded as borrowed bytes (bare CR or LF normalised to CRLF).
//! - Everything that came from the network (addresses, ORCPT, ENVID, HELO,
//!   diagnostics, remote MTA names) goes through [`clean`]: control characters,
//!   CR and LF included, become spaces, so nothing can start a header line.
//! - When an address is not ASCII (SMTPUTF8), the report uses RFC 6533 types
//!   (`message/global-delivery-status`, `utf-8` address type, `message/global`);
//!   otherwise non-ASCII text in diagnostics is replaced by `?` so the report stays
//!   7-bit.

use std::borrow::Cow;
use std::fmt::Write as _;

use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::{make_boundary, BodyPart, MimePart};
use mail_builder::MessageBuilder;
use sluice_spool::{BodyType, Envelope, MessageId, NoticeLimit, Notify, Recipient, Ret};

/// Original messages up to this size are returned whole when RET is absent.
pub const RETURN_FULL_MAX: usize = 64 * 1024;

/// Most header bytes returned (RET=HDRS, or a large original without RET) and
/// scanned for the Subject: a message that is nothing but headers (a header bomb)
/// must not make its notice as large as itself. Cut at a line end.
pub const RETURN_HEADERS_MAX: usize = 64 * 1024;

/// Longest diagnostic we copy into a notice (characters).
const DIAGNOSTIC_MAX: usize = 900;

/// Which notice this is; decides the Subject and the human text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsnKind {
    Failure,
    Delay,
    /// Covers the RFC 3464 actions "delivered", "relayed" and "expanded".
    Success,
}

impl DsnKind {
    /// The name metrics and logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            DsnKind::Failure => "failure",
            DsnKind::Delay => "delay",
            DsnKind::Success => "success",
        }
    }
}

/// RFC 3464 §2.3.3 action-field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsnAction {
    Failed,
    Delayed,
    Delivered,
    Relayed,
    Expanded,
}

impl DsnAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DsnAction::Failed => "failed",
            DsnAction::Delayed => "delayed",
            DsnAction::Delivered => "delivered",
            DsnAction::Relayed => "relayed",
            DsnAction::Expanded => "expanded",
        }
    }

    /// The NOTIFY keyword a recipient must have asked for (RFC 3461 §4.1); an
    /// absent NOTIFY counts as FAILURE,DELAY.
    fn wanted_by(self, notify: Notify) -> bool {
        if notify.contains(Notify::NEVER) {
            return false;
        }
        match self {
            DsnAction::Failed => notify.is_empty() || notify.contains(Notify::FAILURE),
            DsnAction::Delayed => notify.is_empty() || notify.contains(Notify::DELAY),
            DsnAction::Delivered | DsnAction::Relayed | DsnAction::Expanded => {
                notify.contains(Notify::SUCCESS)
            }
        }
    }

    fn default_status(self) -> &'static str {
        match self {
            DsnAction::Failed => "5.0.0",
            DsnAction::Delayed => "4.0.0",
            _ => "2.0.0",
        }
    }
}

/// One recipient's outcome, as reported.
#[derive(Clone, Debug)]
pub struct DsnRecipient<'a> {
    /// Address, ORCPT and NOTIFY come from here.
    pub recipient: &'a Recipient,
    pub action: DsnAction,
    /// Enhanced status code ("5.1.1"); a malformed value is replaced by the
    /// action's generic code (5.0.0 / 4.0.0 / 2.0.0).
    pub status: String,
    /// "dns; mx.example.com" (a bare host name gets the "dns; " prefix).
    pub remote_mta: Option<String>,
    /// The remote reply, e.g. "550 5.1.1 no such user" (reported as
    /// `smtp; …`); anything not starting with a reply code is reported as
    /// `X-Sluice; …` unless it already carries a "type;" prefix.
    pub diagnostic: Option<String>,
    pub last_attempt_unix_ms: Option<u64>,
    /// For delay notices: when we give up.
    pub will_retry_until_unix_ms: Option<u64>,
}

/// Facts about us and the moment of reporting.
#[derive(Clone, Debug)]
pub struct DsnContext<'a> {
    /// Our host name (Reporting-MTA, MAILER-DAEMON@…, Message-ID).
    pub reporting_mta: &'a str,
    pub now_unix_ms: u64,
    /// Spool id of the message being reported on.
    pub original_id: MessageId,
}

/// A notice ready to be queued: send from the null reverse-path to `recipient`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DsnMessage {
    /// Always "" (null reverse-path; RFC 3461 §6.2).
    pub sender: String,
    /// The original envelope sender.
    pub recipient: String,
    /// The complete RFC 5322 message, CRLF line ends.
    pub body: Vec<u8>,
    /// What the body needs from the next hop (8BITMIME / BINARYMIME): 8-bit only
    /// when the returned original or an SMTPUTF8 address carries 8-bit bytes.
    pub body_type: BodyType,
}

/// What a notice returns of the original message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Returned {
    Whole,
    Headers,
}

/// Whether a notice of `kind` may be sent, and what it returns: RET as asked
/// (without RET, a failure notice returns an original of at most
/// [`RETURN_FULL_MAX`] whole, anything else the headers), then `limit` for
/// success and delay notices. `None`: no notice of this kind.
pub fn returned_content(
    kind: DsnKind,
    ret: Option<Ret>,
    original_len: usize,
    limit: NoticeLimit,
) -> Option<Returned> {
    let asked = match ret {
        Some(Ret::Full) => Returned::Whole,
        Some(Ret::Headers) => Returned::Headers,
        None if kind == DsnKind::Failure && original_len <= RETURN_FULL_MAX => Returned::Whole,
        None => Returned::Headers,
    };
    match (kind, limit) {
        (DsnKind::Failure, _) | (_, NoticeLimit::Unlimited) => Some(asked),
        (_, NoticeLimit::HeadersOnly) => Some(Returned::Headers),
        (_, NoticeLimit::FailuresOnly) => None,
    }
}

/// Build the notice, or `None` when none must be sent: null envelope sender (never
/// bounce a bounce), or no recipient whose NOTIFY asks for a notice about its
/// action (NOTIFY=NEVER; SUCCESS not requested; FAILURE/DELAY explicitly left out),
/// or a success or delay notice the message's [`NoticeLimit`] rules out.
pub fn build_dsn(
    kind: DsnKind,
    envelope: &Envelope,
    original: &[u8],
    recipients: &[DsnRecipient<'_>],
    ctx: &DsnContext<'_>,
) -> Option<DsnMessage> {
    let sender = clean_addr(&envelope.sender);
    if sender.is_empty() {
        return None;
    }
    // RFC 8689 §5: a notice about a REQUIRETLS message returns the headers
    // only, as if RET=HDRS, whatever RET asked.
    let ret = if envelope.tls_request == sluice_spool::TlsRequest::RequireTls {
        Some(Ret::Headers)
    } else {
        envelope.ret
    };
    let returned_kind = returned_content(kind, ret, original.len(), envelope.schedule.notices)?;
    let rcpts: Vec<&DsnRecipient<'_>> = recipients
        .iter()
        .filter(|r| r.action.wanted_by(r.recipient.notify))
        .collect();
    if rcpts.is_empty() {
        return None;
    }

    let host = clean_host(ctx.reporting_mta);
    // RFC 6533 report when any address is not ASCII.
    let global = !sender.is_ascii()
        || rcpts.iter().any(|r| {
            !r.recipient.address.is_ascii()
                || r.recipient.orcpt.as_deref().is_some_and(|o| !o.is_ascii())
        });

    let headers = bounded_headers(split_headers(original).0);
    let full = returned_kind == Returned::Whole;
    let returned: Cow<'_, [u8]> = crlf(if full { original } else { headers });
    let returned_8bit = !returned.is_ascii();
    let returned_binary = full && envelope.body_type == BodyType::BinaryMime;

    let human = human_text(kind, envelope, headers, &rcpts, ctx, &host, global);
    let status = delivery_status(envelope, &rcpts, ctx, &host, global);

    // A boundary that cannot occur in the embedded original.
    let boundary = loop {
        let b = format!("sluice-dsn={}", make_boundary("_"));
        if memchr::memmem::find(&returned, b.as_bytes()).is_none() {
            break b;
        }
    };

    let status_type = if global {
        "message/global-delivery-status"
    } else {
        "message/delivery-status"
    };
    let original_type = match (full, global) {
        (true, false) => "message/rfc822",
        (true, true) => "message/global",
        (false, false) => "text/rfc822-headers",
        (false, true) => "message/global-headers",
    };
    let original_cte = if returned_binary {
        "binary"
    } else if returned_8bit {
        "8bit"
    } else {
        "7bit"
    };

    let parts = vec![
        MimePart::new("text/plain", human).header("Content-Description", Raw::new("Notification")),
        MimePart::new(
            ContentType::new(status_type),
            BodyPart::Binary(status.into_bytes().into()),
        )
        .header("Content-Description", Raw::new("Delivery report"))
        .transfer_encoding(if global { "8bit" } else { "7bit" }),
        MimePart::new(ContentType::new(original_type), BodyPart::Binary(returned))
            .header(
                "Content-Description",
                Raw::new(if full {
                    "Original message"
                } else {
                    "Original message headers"
                }),
            )
            .transfer_encoding(original_cte),
    ];
    let report = MimePart::new(
        ContentType::new("multipart/report")
            // RFC 6533 §6.3: the report type names the second part.
            .attribute(
                "report-type",
                if global {
                    "global-delivery-status"
                } else {
                    "delivery-status"
                },
            )
            .attribute("boundary", boundary),
        parts,
    );

    let subject = match kind {
        DsnKind::Failure => "Undelivered Mail Returned to Sender",
        DsnKind::Delay => "Delayed Mail (still being retried)",
        DsnKind::Success => "Successful Mail Delivery Report",
    };
    let kind_tag = match kind {
        DsnKind::Failure => "failure",
        DsnKind::Delay => "delay",
        DsnKind::Success => "success",
    };
    let body = MessageBuilder::new()
        .from(Address::new_address(
            Some("Mail Delivery System"),
            format!("MAILER-DAEMON@{host}"),
        ))
        .to(Address::new_address(None::<&str>, sender.clone()))
        .subject(subject)
        .header("Date", Raw::new(rfc5322_date(ctx.now_unix_ms)))
        .message_id(format!(
            "{}.{}.{kind_tag}.dsn@{host}",
            ctx.original_id, ctx.now_unix_ms
        ))
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .body(report)
        .write_to_vec()
        .expect("writing to a Vec cannot fail");

    let body_type = if returned_binary {
        BodyType::BinaryMime
    } else if body.is_ascii() {
        BodyType::SevenBit
    } else {
        BodyType::EightBitMime
    };
    Some(DsnMessage {
        sender: String::new(),
        recipient: sender,
        body,
        body_type,
    })
}

/// The `message/delivery-status` body: the per-message block, then one block per
/// recipient, blocks separated by an empty line.
fn delivery_status(
    envelope: &Envelope,
    rcpts: &[&DsnRecipient<'_>],
    ctx: &DsnContext<'_>,
    host: &str,
    global: bool,
) -> String {
    let mut out = String::new();
    field(&mut out, "Reporting-MTA", &format!("dns; {host}"));
    if let Some(envid) = envelope.envid.as_deref() {
        let envid = clean(envid, global, 200);
        if !envid.is_empty() {
            field(&mut out, "Original-Envelope-Id", &envid);
        }
    }
    field(&mut out, "X-Sluice-Queue-ID", &ctx.original_id.to_string());
    let helo = clean_host(&envelope.helo);
    if !helo.is_empty() {
        let value = match envelope.client_ip {
            None => format!("dns; {helo}"),
            Some(ip) => format!("dns; {helo} ({ip})"),
        };
        field(&mut out, "Received-From-MTA", &value);
    }
    field(
        &mut out,
        "Arrival-Date",
        &rfc5322_date(envelope.arrival_unix_ms),
    );

    for r in rcpts {
        out.push_str("\r\n");
        if let Some(orcpt) = r.recipient.orcpt.as_deref() {
            let orcpt = original_recipient(orcpt);
            if !orcpt.is_empty() {
                field(&mut out, "Original-Recipient", &orcpt);
            }
        }
        let addr = clean_addr(&r.recipient.address);
        let addr_type = if addr.is_ascii() { "rfc822" } else { "utf-8" };
        field(&mut out, "Final-Recipient", &format!("{addr_type};{addr}"));
        field(&mut out, "Action", r.action.as_str());
        field(&mut out, "Status", status_code(&r.status, r.action));
        if let Some(mta) = r.remote_mta.as_deref() {
            let mta = clean(mta, false, 255);
            if !mta.is_empty() {
                let value = if has_type_prefix(&mta) {
                    mta
                } else {
                    format!("dns; {mta}")
                };
                field(&mut out, "Remote-MTA", &value);
            }
        }
        if let Some(diag) = r.diagnostic.as_deref() {
            let diag = diagnostic(diag, global);
            if !diag.is_empty() {
                field(&mut out, "Diagnostic-Code", &diag);
            }
            // An extension field (RFC 3464 §2.4 "X-"): the bounce class of
            // the failure or deferral (docs/bounce-classes.md).
            if matches!(r.action, DsnAction::Failed | DsnAction::Delayed) {
                let class = crate::bounce::classify_line(r.diagnostic.as_deref().unwrap_or(""));
                field(&mut out, "X-Sluice-Bounce-Class", class.as_str());
            }
        }
        if let Some(ms) = r.last_attempt_unix_ms {
            field(&mut out, "Last-Attempt-Date", &rfc5322_date(ms));
        }
        if r.action == DsnAction::Delayed {
            if let Some(ms) = r.will_retry_until_unix_ms {
                field(&mut out, "Will-Retry-Until", &rfc5322_date(ms));
            }
        }
    }
    out
}

/// The text/plain part for people.
fn human_text(
    kind: DsnKind,
    envelope: &Envelope,
    headers: &[u8],
    rcpts: &[&DsnRecipient<'_>],
    ctx: &DsnContext<'_>,
    host: &str,
    global: bool,
) -> String {
    let mut t = String::new();
    let _ = write!(t, "This is the mail system at {host}.\r\n\r\n");
    t.push_str(match kind {
        DsnKind::Failure => {
            "Your message could not be delivered to one or more recipients.\r\n\
             The permanent errors reported are listed below; the message has\r\n\
             been removed from the queue for these recipients.\r\n"
        }
        DsnKind::Delay => {
            "Your message has not yet been delivered to one or more recipients.\r\n\
             The mail system keeps trying; you do not need to send it again.\r\n\
             You will be told if delivery finally fails.\r\n"
        }
        DsnKind::Success => {
            "Your message was successfully delivered to the destination(s)\r\n\
             listed below. If a recipient was \"relayed\", the next system does\r\n\
             not report delivery, so no further notice will follow for it.\r\n"
        }
    });
    t.push_str("\r\n");
    let _ = write!(t, "Queue ID: {}\r\n", ctx.original_id);
    let _ = write!(t, "Arrived: {}\r\n", rfc5322_date(envelope.arrival_unix_ms));
    if let Some(subject) = header_value(headers, "subject") {
        let subject = clean(&String::from_utf8_lossy(&subject), true, 200);
        let _ = write!(t, "Subject: {subject}\r\n");
    }
    t.push_str("\r\n");
    for r in rcpts {
        let addr = clean_addr(&r.recipient.address);
        let _ = write!(t, "<{addr}>: {}", r.action.as_str());
        if let Some(mta) = r.remote_mta.as_deref() {
            let mta = clean(mta, false, 255);
            let mta = mta.strip_prefix("dns;").map(str::trim).unwrap_or(&mta);
            if !mta.is_empty() {
                let _ = write!(t, " (host {mta})");
            }
        }
        t.push_str("\r\n");
        if let Some(diag) = r.diagnostic.as_deref() {
            let diag = clean(diag, global, DIAGNOSTIC_MAX);
            if !diag.is_empty() {
                let _ = write!(t, "    {diag}\r\n");
            }
        }
        if r.action == DsnAction::Delayed {
            if let Some(ms) = r.will_retry_until_unix_ms {
                let _ = write!(t, "    Will retry until {}\r\n", rfc5322_date(ms));
            }
        }
    }
    t
}

/// Append "Name: value" to a delivery-status block, folded at spaces near 78
/// columns. `value` is a single line (already cleaned).
fn field(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push_str(": ");
    let mut col = name.len() + 2;
    for (i, word) in value.split(' ').filter(|w| !w.is_empty()).enumerate() {
        if i > 0 {
            if col + 1 + word.len() > 78 {
                out.push_str("\r\n ");
                col = 1;
            } else {
                out.push(' ');
                col += 1;
            }
        }
        out.push_str(word);
        col += word.len();
    }
    out.push_str("\r\n");
}

/// One safe line of text: control characters (CR, LF, TAB, NUL, DEL, C1) become
/// spaces, runs of white space collapse, ends are trimmed; non-ASCII becomes '?'
/// unless `utf8`; at most `max` characters.
fn clean(s: &str, utf8: bool, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    let mut space = false;
    let mut n = 0;
    for c in s.chars() {
        if n >= max {
            break;
        }
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else if !utf8 && !c.is_ascii() {
            '?'
        } else {
            c
        };
        if c == ' ' {
            space = !out.is_empty();
            continue;
        }
        if space {
            out.push(' ');
            n += 1;
            space = false;
        }
        out.push(c);
        n += 1;
    }
    out
}

/// An address for headers and report fields: one token, no angle brackets.
fn clean_addr(s: &str) -> String {
    let s = s.trim();
    let s = s
        .strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(s);
    clean(s, true, 512)
        .chars()
        .filter(|&c| c != '<' && c != '>' && c != ' ')
        .collect()
}

/// A host name or address literal: printable ASCII without spaces or brackets
/// that would break "dns; host (ip)".
fn clean_host(s: &str) -> String {
    clean(s, false, 255)
        .chars()
        .filter(|&c| !matches!(c, ' ' | '(' | ')' | ';' | '<' | '>'))
        .collect()
}

/// ORCPT as stored may be "rfc822;addr" or just "addr".
fn original_recipient(orcpt: &str) -> String {
    let o = clean(orcpt, true, 512);
    if has_type_prefix(&o) {
        let (t, a) = o.split_once(';').unwrap_or(("rfc822", &o));
        format!("{};{}", t.trim(), a.trim())
    } else if o.is_empty() {
        o
    } else {
        format!("rfc822;{o}")
    }
}

/// True for "atom;..." (an RFC 3464 address/diagnostic/mta type prefix).
fn has_type_prefix(s: &str) -> bool {
    match s.split_once(';') {
        Some((t, _)) => {
            let t = t.trim();
            !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        }
        None => false,
    }
}

/// "smtp; 550 5.1.1 …" for SMTP replies (multi-line replies joined).
fn diagnostic(d: &str, utf8: bool) -> String {
    let d = clean(d, utf8, DIAGNOSTIC_MAX);
    if d.is_empty() {
        d
    } else if d.len() >= 3 && d.as_bytes()[..3].iter().all(u8::is_ascii_digit) {
        format!("smtp; {d}")
    } else if has_type_prefix(&d) {
        d
    } else {
        format!("X-Sluice; {d}")
    }
}

/// The enhanced status code if well formed (class 2/4/5, RFC 3463), else the
/// action's generic code.
fn status_code(s: &str, action: DsnAction) -> &str {
    let s = s.trim();
    let mut it = s.split('.');
    let ok = matches!(it.next(), Some("2" | "4" | "5"))
        && it
            .by_ref()
            .take(2)
            .filter(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
            .count()
            == 2
        && it.next().is_none();
    if ok {
        s
    } else {
        action.default_status()
    }
}

pub(crate) fn rfc5322_date(unix_ms: u64) -> String {
    let ms = i64::try_from(unix_ms).unwrap_or(i64::MAX);
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc2822()
}

/// Split a message at the first empty line: (header block including its last
/// line end, body). No empty line: it is all header.
fn split_headers(msg: &[u8]) -> (&[u8], &[u8]) {
    if msg.starts_with(b"\r\n") {
        return (&[], &msg[2..]);
    }
    if msg.starts_with(b"\n") {
        return (&[], &msg[1..]);
    }
    let crlf = memchr::memmem::find(msg, b"\r\n\r\n").map(|p| (p + 2, p + 4));
    let lf = memchr::memmem::find(msg, b"\n\n").map(|p| (p + 1, p + 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => {
            let (h, b) = if a.0 <= b.0 { a } else { b };
            (&msg[..h], &msg[b..])
        }
        (Some((h, b)), None) | (None, Some((h, b))) => (&msg[..h], &msg[b..]),
        (None, None) => (msg, &[]),
    }
}

/// The header block cut to [`RETURN_HEADERS_MAX`] at the last line end before it
/// (a hard cut when one line is longer than that).
fn bounded_headers(headers: &[u8]) -> &[u8] {
    if headers.len() <= RETURN_HEADERS_MAX {
        return headers;
    }
    let head = &headers[..RETURN_HEADERS_MAX];
    match memchr::memrchr(b'\n', head) {
        Some(at) => &head[..=at],
        None => head,
    }
}

/// The unfolded value of the first header `name` (lower case) in a header block.
fn header_value(headers: &[u8], name: &str) -> Option<Vec<u8>> {
    let mut value: Option<Vec<u8>> = None;
    for line in headers.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(v) = value.as_mut() {
            if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                v.push(b' ');
                v.extend_from_slice(line);
                continue;
            }
            break;
        }
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            if line[..colon]
                .trim_ascii()
                .eq_ignore_ascii_case(name.as_bytes())
            {
                value = Some(line[colon + 1..].to_vec());
            }
        }
    }
    value
}

/// Bare CR or LF → CRLF (borrowed when already clean, which is the norm for
/// spooled messages).
fn crlf(b: &[u8]) -> Cow<'_, [u8]> {
    let clean = memchr::memchr2_iter(b'\r', b'\n', b).all(|i| match b[i] {
        b'\r' => b.get(i + 1) == Some(&b'\n'),
        _ => i > 0 && b[i - 1] == b'\r',
    });
    if clean {
        return Cow::Borrowed(b);
    }
    let mut out = Vec::with_capacity(b.len() + b.len() / 32);
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if b.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_spool::{RecipientStatus, Schedule};
    use std::process::Command;

    const NOW: u64 = 1_751_367_157_000; // 2025-07-01
    const ORIGINAL: &[u8] = b"From: Alice <alice@example.org>\r\n\
To: bob@example.net\r\n\
Subject: Quarterly report\r\n\
Message-ID: <orig-1@example.org>\r\n\
\r\n\
BODY-MARKER line one\r\n\
line two\r\n";

    fn rcpt(addr: &str, notify: Notify, orcpt: Option<&str>) -> Recipient {
        Recipient {
            address: addr.into(),
            orcpt: orcpt.map(Into::into),
            notify,
            status: RecipientStatus::Pending,
            local: false,
        }
    }

    fn envelope(sender: &str, ret: Option<Ret>, envid: Option<&str>) -> Envelope {
        Envelope {
            sender: sender.into(),
            recipients: vec![],
            ret,
            envid: envid.map(Into::into),
            body_type: BodyType::SevenBit,
            smtputf8: false,
            arrival_unix_ms: NOW - 3_600_000,
            listener: "smtp".into(),
            client_ip: "192.0.2.7".parse().ok(),
            helo: "client.example.org".into(),
            auth_user: None,
            tls: None,
            size: ORIGINAL.len() as u64,
            priority: 0,
            queue: "default".into(),
            hold_until_unix: 0,
            deliver_by: None,
            tls_request: Default::default(),
            tenant: None,
            header_facts: None,
            schedule: Schedule::default(),
        }
    }

    fn ctx() -> DsnContext<'static> {
        DsnContext {
            reporting_mta: "relay.sluice.test",
            now_unix_ms: NOW,
            original_id: MessageId(0x0123_4567_89ab_cdef),
        }
    }

    fn outcome<'a>(
        r: &'a Recipient,
        action: DsnAction,
        status: &str,
        diag: &str,
    ) -> DsnRecipient<'a> {
        DsnRecipient {
            recipient: r,
            action,
            status: status.into(),
            remote_mta: Some("dns; mx.example.net".into()),
            diagnostic: (!diag.is_empty()).then(|| diag.into()),
            last_attempt_unix_ms: Some(NOW - 1000),
            will_retry_until_unix_ms: (action == DsnAction::Delayed).then_some(NOW + 86_400_000),
        }
    }

    /// Parse `body` with Python's email package (policy.default) and run the
    /// assertions in `script` against it. The prelude checks the multipart/report
    /// skeleton and binds: m (the notice), human, ds, orig (its three parts),
    /// per_msg (first delivery-status block), rcpts (the recipient blocks).
    fn python(body: &[u8], script: &str) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dsn.eml");
        std::fs::write(&path, body).unwrap();
        let prelude = r#"
import sys, email
from email import policy
raw = open(sys.argv[1], 'rb').read()
assert b'\n' not in raw.replace(b'\r\n', b''), 'bare LF'
assert b'\r' not in raw.replace(b'\r\n', b''), 'bare CR'
m = email.message_from_bytes(raw, policy=policy.default)
assert m.get_content_type() == 'multipart/report', m.get_content_type()
assert m.get_param('report-type') == 'delivery-status', m.get_param('report-type')
assert m['Auto-Submitted'] == 'auto-replied'
assert m['From'].addresses[0].addr_spec == 'MAILER-DAEMON@relay.sluice.test', m['From']
assert m['Date'] is not None and m['Date'].datetime is not None
assert m['Message-ID'].startswith('<') and m['Message-ID'].endswith('@relay.sluice.test>')
assert m['MIME-Version'] == '1.0'
assert not m.defects, m.defects
parts = m.get_payload()
assert len(parts) == 3, len(parts)
human, ds, orig = parts
for p in parts:
    assert not p.defects, p.defects
assert human.get_content_type() == 'text/plain'
text = human.get_content()
assert ds.get_content_type() == 'message/delivery-status', ds.get_content_type()
blocks = ds.get_payload()
per_msg, rcpts = blocks[0], blocks[1:]
assert per_msg['Reporting-MTA'] == 'dns; relay.sluice.test', per_msg['Reporting-MTA']
assert per_msg['Arrival-Date'] is not None
for b in rcpts:
    assert b['Final-Recipient'].startswith('rfc822;'), b['Final-Recipient']
    assert b['Action'] is not None and b['Status'] is not None
def rcpt(addr):
    hits = [b for b in rcpts if b['Final-Recipient'] == 'rfc822;' + addr]
    assert len(hits) == 1, (addr, [b['Final-Recipient'] for b in rcpts])
    return hits[0]
"#;
        let out = Command::new("python3")
            .arg("-c")
            .arg(format!("{prelude}\n{script}\nprint('OK')"))
            .arg(&path)
            .output()
            .expect("python3 must be installed for the DSN tests");
        assert!(
            out.status.success() && out.stdout.ends_with(b"OK\n"),
            "python rejected the notice:\n{}\n--- notice ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(body)
        );
    }

    #[test]
    fn failure_ret_hdrs_names_recipients_and_omits_body() {
        let a = rcpt(
            "bob@example.net",
            Notify::default(),
            Some("rfc822;Bob@Example.NET"),
        );
        let b = rcpt(
            "carol@example.net",
            Notify::FAILURE | Notify::DELAY,
            Some("carol@example.net"),
        );
        let env = envelope("alice@example.org", Some(Ret::Headers), Some("ENV-42"));
        let outcomes = [
            outcome(
                &a,
                DsnAction::Failed,
                "5.1.1",
                "550 5.1.1 <bob@example.net>: no such user",
            ),
            outcome(&b, DsnAction::Failed, "5.2.2", "552 5.2.2 mailbox full"),
        ];
        let dsn = build_dsn(DsnKind::Failure, &env, ORIGINAL, &outcomes, &ctx()).unwrap();
        assert_eq!(dsn.sender, "");
        assert_eq!(dsn.recipient, "alice@example.org");
        assert_eq!(dsn.body_type, BodyType::SevenBit);
        python(
            &dsn.body,
            r#"
assert m['Subject'] == 'Undelivered Mail Returned to Sender'
assert m['To'].addresses[0].addr_spec == 'alice@example.org'
assert per_msg['Original-Envelope-Id'] == 'ENV-42'
assert len(rcpts) == 2
b = rcpt('bob@example.net')
assert b['Action'] == 'failed' and b['Status'] == '5.1.1', (b['Action'], b['Status'])
assert b['Original-Recipient'] == 'rfc822;Bob@Example.NET', b['Original-Recipient']
assert b['Remote-MTA'] == 'dns; mx.example.net'
assert b['Diagnostic-Code'] == 'smtp; 550 5.1.1 <bob@example.net>: no such user', b['Diagnostic-Code']
assert b['X-Sluice-Bounce-Class'] == 'invalid-recipient', b['X-Sluice-Bounce-Class']
assert b['Last-Attempt-Date'] is not None and b['Will-Retry-Until'] is None
c = rcpt('carol@example.net')
assert c['Action'] == 'failed' and c['Status'] == '5.2.2'
assert c['Original-Recipient'] == 'rfc822;carol@example.net', c['Original-Recipient']
assert orig.get_content_type() == 'text/rfc822-headers', orig.get_content_type()
h = orig.get_content()
assert 'Subject: Quarterly report' in h and 'BODY-MARKER' not in h, h
assert b'BODY-MARKER' not in raw
assert 'bob@example.net' in text and 'no such user' in text and 'Quarterly report' in text
"#,
        );
    }

    #[test]
    fn failure_ret_full_returns_whole_message() {
        let a = rcpt("bob@example.net", Notify::FAILURE, None);
        let env = envelope("alice@example.org", Some(Ret::Full), None);
        let outcomes = [outcome(
            &a,
            DsnAction::Failed,
            "5.1.1",
            "550 5.1.1 no such user",
        )];
        let dsn = build_dsn(DsnKind::Failure, &env, ORIGINAL, &outcomes, &ctx()).unwrap();
        python(
            &dsn.body,
            r#"
assert per_msg['Original-Envelope-Id'] is None
assert rcpt('bob@example.net')['Original-Recipient'] is None
assert orig.get_content_type() == 'message/rfc822', orig.get_content_type()
inner = orig.get_content()
assert inner['Subject'] == 'Quarterly report'
assert 'BODY-MARKER line one' in inner.get_content()
"#,
        );
        // The original is embedded byte for byte.
        assert!(memchr::memmem::find(&dsn.body, ORIGINAL).is_some());
    }

    #[test]
    fn ret_absent_returns_small_whole_large_headers() {
        let a = rcpt("bob@example.net", Notify::default(), None);
        let env = envelope("alice@example.org", None, None);
        let outcomes = [outcome(&a, DsnAction::Failed, "5.1.1", "550 5.1.1 no")];
        let small = build_dsn(DsnKind::Failure, &env, ORIGINAL, &outcomes, &ctx()).unwrap();
        python(
            &small.body,
            "assert orig.get_content_type() == 'message/rfc822'",
        );

        let mut big = ORIGINAL.to_vec();
        while big.len() <= RETURN_FULL_MAX {
            big.extend_from_slice(b"filler filler filler filler filler filler filler filler\r\n");
        }
        let large = build_dsn(DsnKind::Failure, &env, &big, &outcomes, &ctx()).unwrap();
        assert!(large.body.len() < 8 * 1024);
        python(
            &large.body,
            "assert orig.get_content_type() == 'text/rfc822-headers'\nassert 'filler' not in orig.get_content()",
        );
    }

    #[test]
    fn delay_notice_has_will_retry_until_and_headers_only() {
        let a = rcpt("bob@example.net", Notify::default(), None);
        let b = rcpt("carol@example.net", Notify::FAILURE, None); // did not ask for DELAY
        let c = rcpt("dave@example.net", Notify::DELAY, None);
        let env = envelope("alice@example.org", None, None);
        let outcomes = [
            outcome(&a, DsnAction::Delayed, "4.4.1", "421 4.4.1 try later"),
            outcome(&b, DsnAction::Delayed, "4.4.1", "421 4.4.1 try later"),
            outcome(&c, DsnAction::Delayed, "4.2.2", "452 4.2.2 over quota"),
        ];
        let dsn = build_dsn(DsnKind::Delay, &env, ORIGINAL, &outcomes, &ctx()).unwrap();
        python(
            &dsn.body,
            r#"
assert m['Subject'] == 'Delayed Mail (still being retried)'
assert len(rcpts) == 2, [b['Final-Recipient'] for b in rcpts]
for a, s in (('bob@example.net', '4.4.1'), ('dave@example.net', '4.2.2')):
    b = rcpt(a)
    assert b['Action'] == 'delayed' and b['Status'] == s
    assert b['Will-Retry-Until'] is not None
assert 'carol' not in raw.decode()
assert orig.get_content_type() == 'text/rfc822-headers'
"#,
        );
        // Nobody asked for delay notices: none.
        let outcomes = [outcome(&b, DsnAction::Delayed, "4.4.1", "")];
        assert!(build_dsn(DsnKind::Delay, &env, ORIGINAL, &outcomes, &ctx()).is_none());
    }

    #[test]
    fn success_only_when_notify_has_success() {
        let a = rcpt("bob@example.net", Notify::SUCCESS | Notify::FAILURE, None);
        let b = rcpt("carol@example.net", Notify::default(), None);
        let c = rcpt("dave@example.net", Notify::FAILURE | Notify::DELAY, None);
        let d = rcpt("erin@example.net", Notify::SUCCESS, None);
        let env = envelope("alice@example.org", None, Some("batch-7"));
        let ok = |r, action| DsnRecipient {
            diagnostic: Some("250 2.0.0 Ok: queued as 4F2".into()),
            ..outcome(r, action, "2.0.0", "")
        };
        let outcomes = [
            ok(&a, DsnAction::Delivered),
            ok(&b, DsnAction::Delivered),
            ok(&c, DsnAction::Delivered),
            ok(&d, DsnAction::Relayed),
        ];
        let dsn = build_dsn(DsnKind::Success, &env, ORIGINAL, &outcomes, &ctx()).unwrap();
        python(
            &dsn.body,
            r#"
assert m['Subject'] == 'Successful Mail Delivery Report'
assert per_msg['Original-Envelope-Id'] == 'batch-7'
assert len(rcpts) == 2, [b['Final-Recipient'] for b in rcpts]
assert rcpt('bob@example.net')['Action'] == 'delivered'
assert rcpt('erin@example.net')['Action'] == 'relayed'
assert rcpt('erin@example.net')['Status'] == '2.0.0'
assert 'carol' not in raw.decode() and 'dave' not in raw.decode()
assert orig.get_content_type() == 'text/rfc822-headers'
"#,
        );
        let outcomes = [ok(&b, DsnAction::Delivered), ok(&c, DsnAction::Delivered)];
        assert!(build_dsn(DsnKind::Success, &env, ORIGINAL, &outcomes, &ctx()).is_none());
    }

    #[test]
    fn notice_limit_decides_success_and_delay_content_only() {
        use DsnKind::*;
        use NoticeLimit::*;
        use Returned::*;
        let small = ORIGINAL.len();
        let large = RETURN_FULL_MAX + 1;
        // (kind, ret, original length, limit) -> expected
        type Case = (DsnKind, Option<Ret>, usize, NoticeLimit, Option<Returned>);
        let cases: &[Case] = &[
            (Failure, Some(Ret::Full), large, FailuresOnly, Some(Whole)),
            (Failure, Some(Ret::Full), large, HeadersOnly, Some(Whole)),
            (Failure, None, small, HeadersOnly, Some(Whole)),
            (Failure, None, large, Unlimited, Some(Headers)),
            (Failure, Some(Ret::Headers), small, Unlimited, Some(Headers)),
            (Success, Some(Ret::Full), large, Unlimited, Some(Whole)),
            (Success, Some(Ret::Full), large, HeadersOnly, Some(Headers)),
            (Success, Some(Ret::Full), small, FailuresOnly, None),
            (Success, None, small, Unlimited, Some(Headers)),
            (Delay, Some(Ret::Full), small, Unlimited, Some(Whole)),
            (Delay, Some(Ret::Full), small, HeadersOnly, Some(Headers)),
            (Delay, None, small, FailuresOnly, None),
        ];
        for &(kind, ret, len, limit, want) in cases {
            assert_eq!(
                returned_content(kind, ret, len, limit),
                want,
                "{kind:?} {ret:?} {len} {limit:?}"
            );
        }
    }

    #[test]
    fn untrusted_success_notice_is_limited() {
        let a = rcpt("bob@example.net", Notify::SUCCESS | Notify::FAILURE, None);
        let mut env = envelope("victim@example.org", Some(Ret::Full), None);
        let outcomes = [outcome(&a, DsnAction::Relayed, "2.0.0", "")];
        let full = build_dsn(DsnKind::Success, &env, ORIGINAL, &outcomes, &ctx()).unwrap();
        assert!(text_of(&full.body).contains("BODY-MARKER"));
        env.schedule.notices = NoticeLimit::HeadersOnly;
        let hdrs = build_dsn(DsnKind::Success, &env, ORIGINAL, &outcomes, &ctx()).unwrap();
        assert!(!text_of(&hdrs.body).contains("BODY-MARKER"));
        python(
            &hdrs.body,
            "assert orig.get_content_type() == 'text/rfc822-headers'",
        );
        env.schedule.notices = NoticeLimit::FailuresOnly;
        assert!(build_dsn(DsnKind::Success, &env, ORIGINAL, &outcomes, &ctx()).is_none());
        // A failure notice still returns what RET asked for.
        let failed = [outcome(&a, DsnAction::Failed, "5.1.1", "550 5.1.1 no")];
        let f = build_dsn(DsnKind::Failure, &env, ORIGINAL, &failed, &ctx()).unwrap();
        assert!(text_of(&f.body).contains("BODY-MARKER"));
    }

    fn text_of(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[test]
    fn never_bounce_a_bounce() {
        let a = rcpt("bob@example.net", Notify::default(), None);
        let outcomes = [outcome(&a, DsnAction::Failed, "5.1.1", "550 no")];
        for sender in ["", "<>", " "] {
            let env = envelope(sender, Some(Ret::Full), None);
            for kind in [DsnKind::Failure, DsnKind::Delay, DsnKind::Success] {
                assert!(build_dsn(kind, &env, ORIGINAL, &outcomes, &ctx()).is_none());
            }
        }
    }

    #[test]
    fn notify_never_means_no_notice() {
        let a = rcpt("bob@example.net", Notify::NEVER, None);
        let b = rcpt("carol@example.net", Notify::NEVER, None);
        let env = envelope("alice@example.org", None, None);
        let failed = [
            outcome(&a, DsnAction::Failed, "5.1.1", "550 no"),
            outcome(&b, DsnAction::Failed, "5.1.1", "550 no"),
        ];
        assert!(build_dsn(DsnKind::Failure, &env, ORIGINAL, &failed, &ctx()).is_none());
        let delayed = [outcome(&a, DsnAction::Delayed, "4.0.0", "")];
        assert!(build_dsn(DsnKind::Delay, &env, ORIGINAL, &delayed, &ctx()).is_none());
        // A NEVER recipient is left out of a notice sent for the others.
        let c = rcpt("dave@example.net", Notify::default(), None);
        let mixed = [
            outcome(&a, DsnAction::Failed, "5.1.1", "550 no"),
            outcome(&c, DsnAction::Failed, "5.1.1", "550 no"),
        ];
        let dsn = build_dsn(DsnKind::Failure, &env, ORIGINAL, &mixed, &ctx()).unwrap();
        python(
            &dsn.body,
            "assert len(rcpts) == 1\nrcpt('dave@example.net')\nassert 'bob@' not in text",
        );
    }

    #[test]
    fn crlf_injection_creates_no_header() {
        let a = rcpt(
            "bob@example.net\r\nX-Injected-Rcpt: 1",
            Notify::default(),
            Some("rfc822;bob@example.net\r\nX-Injected-Orcpt: 1"),
        );
        let env = envelope(
            "alice@example.org\r\nBcc: victim@example.com",
            None,
            Some("id\r\nX-Injected-Envid: 1"),
        );
        let outcomes = [DsnRecipient {
            remote_mta: Some("mx.example.net\r\nX-Injected-Mta: 1".into()),
            ..outcome(
                &a,
                DsnAction::Failed,
                "5.1.1\r\nX-Injected-Status: 1",
                "550-5.1.1 first line\r\n550 5.1.1 second\r\nX-Injected: yes\r\n\r\nFinal-Recipient: rfc822;evil@example.com\n\rAction: delivered",
            )
        }];
        let dsn = build_dsn(DsnKind::Failure, &env, ORIGINAL, &outcomes, &ctx()).unwrap();
        assert!(!dsn.recipient.contains(['\r', '\n']));
        python(
            &dsn.body,
            r#"
def names(msg):
    return [k.lower() for k in msg.keys()]
for msg in [m, human, ds, orig] + blocks:
    assert not any(n.startswith('x-injected') or n == 'bcc' for n in names(msg)), names(msg)
assert len(blocks) == 2, len(blocks)
b = rcpts[0]
assert b['Action'] == 'failed', b['Action']
assert b['Status'] == '5.0.0', b['Status']
d = b['Diagnostic-Code']
assert d.startswith('smtp; 550-5.1.1 first line 550 5.1.1 second X-Injected: yes'), d
assert 'Final-Recipient: rfc822;evil@example.com' in d, d
assert len(m.get_all('To')) == 1 and m['Bcc'] is None
"#,
        );
    }

    #[test]
    fn long_diagnostic_is_folded_and_parses() {
        let a = rcpt("bob@example.net", Notify::default(), None);
        let env = envelope("alice@example.org", None, None);
        let long = format!("550 5.7.1 {}", "policy rejection words ".repeat(20));
        let outcomes = [outcome(&a, DsnAction::Failed, "5.7.1", &long)];
        let dsn = build_dsn(DsnKind::Failure, &env, ORIGINAL, &outcomes, &ctx()).unwrap();
        let text = String::from_utf8(dsn.body.clone()).unwrap();
        assert!(text.split("\r\n").all(|l| l.len() <= 78), "{text}");
        python(
            &dsn.body,
            &format!(
                "assert rcpt('bob@example.net')['Diagnostic-Code'] == 'smtp; {}'",
                long.trim()
            ),
        );
    }

    #[test]
    fn a_requiretls_original_comes_back_as_headers_only_whatever_ret_says() {
        let a = rcpt("bob@example.net", Notify::default(), None);
        for ret in [Some(Ret::Full), None, Some(Ret::Headers)] {
            let mut env = envelope("alice@example.org", ret, None);
            env.tls_request = sluice_spool::TlsRequest::RequireTls;
            let outcomes = [outcome(
                &a,
                DsnAction::Failed,
                "5.7.30",
                "550 5.7.30 REQUIRETLS support required",
            )];
            let dsn = build_dsn(DsnKind::Failure, &env, ORIGINAL, &outcomes, &ctx()).unwrap();
            let text = String::from_utf8(dsn.body).unwrap();
            assert!(text.contains("text/rfc822-headers"), "{ret:?}: {text}");
            assert!(text.contains("Subject: Quarterly report"), "{text}");
            assert!(!text.contains("BODY-MARKER"), "{ret:?}: {text}");
        }
    }

    #[test]
    fn bare_lf_original_is_normalised() {
        let a = rcpt("bob@example.net", Notify::default(), None);
        let env = envelope("alice@example.org", Some(Ret::Full), None);
        let outcomes = [outcome(&a, DsnAction::Failed, "5.1.1", "550 no")];
        let orig = b"Subject: lf\nFrom: a@b\n\nbody\nmore\r\n";
        let dsn = build_dsn(DsnKind::Failure, &env, orig, &outcomes, &ctx()).unwrap();
        python(&dsn.body, "assert orig.get_content()['Subject'] == 'lf'");
    }

    #[test]
    fn utf8_addresses_use_global_report() {
        let a = rcpt("bjørn@exämple.net", Notify::default(), None);
        let mut env = envelope("alice@example.org", Some(Ret::Full), None);
        env.smtputf8 = true;
        let outcomes = [outcome(&a, DsnAction::Failed, "5.1.1", "550 5.1.1 unknown")];
        let dsn = build_dsn(DsnKind::Failure, &env, ORIGINAL, &outcomes, &ctx()).unwrap();
        assert_eq!(dsn.body_type, BodyType::EightBitMime);
        let text = String::from_utf8(dsn.body).unwrap();
        assert!(
            text.contains("Content-Type: message/global-delivery-status"),
            "{text}"
        );
        assert!(
            text.contains("report-type=global-delivery-status")
                || text.contains("report-type=\"global-delivery-status\""),
            "the report type matches the second part: {text}"
        );
        assert!(
            text.contains("Final-Recipient: utf-8;bjørn@exämple.net"),
            "{text}"
        );
        assert!(text.contains("Content-Type: message/global\r\n"), "{text}");
    }

    #[test]
    fn header_bomb_returns_bounded_headers() {
        // 100k header lines and no body: the whole message is "headers".
        let mut bomb = b"Subject: bomb\r\n".to_vec();
        for i in 0..100_000 {
            bomb.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        assert!(bomb.len() > 10 * RETURN_HEADERS_MAX);
        let r = rcpt("bob@example.net", Notify::default(), None);
        // Without RET too: the bomb is over RETURN_FULL_MAX, so headers only.
        for ret in [Some(Ret::Headers), None] {
            let env = envelope("alice@example.org", ret, None);
            let outcomes = [outcome(
                &r,
                DsnAction::Failed,
                "5.1.1",
                "550 5.1.1 no such user",
            )];
            let dsn =
                build_dsn(DsnKind::Failure, &env, &bomb, &outcomes, &ctx()).expect("a notice");
            assert!(
                dsn.body.len() < RETURN_HEADERS_MAX + 8 * 1024,
                "notice of {} bytes",
                dsn.body.len()
            );
            let text = String::from_utf8_lossy(&dsn.body);
            assert!(
                text.contains("X-H0: v\r\n"),
                "the first headers are returned"
            );
            assert!(!text.contains("X-H99999:"), "the tail is cut");
            assert!(text.contains("bomb"), "the Subject is still found");
            python(
                &dsn.body,
                "assert orig.get_content_type() == 'text/rfc822-headers'",
            );
        }
    }

    #[test]
    fn helpers() {
        assert_eq!(status_code("5.1.1", DsnAction::Failed), "5.1.1");
        assert_eq!(status_code("4.4.7", DsnAction::Failed), "4.4.7");
        assert_eq!(status_code("550", DsnAction::Failed), "5.0.0");
        assert_eq!(status_code("5.1.1.1", DsnAction::Failed), "5.0.0");
        assert_eq!(status_code("3.1.1", DsnAction::Delayed), "4.0.0");
        assert_eq!(
            diagnostic("connection refused", false),
            "X-Sluice; connection refused"
        );
        assert_eq!(diagnostic("smtp; 550 x", false), "smtp; 550 x");
        assert_eq!(diagnostic("550 n\u{e4}h", false), "smtp; 550 n?h");
        assert_eq!(original_recipient("bob@x"), "rfc822;bob@x");
        assert_eq!(original_recipient("RFC822; bob@x"), "RFC822;bob@x");
        assert_eq!(split_headers(b"A: b\r\n\r\nbody").0, b"A: b\r\n");
        assert_eq!(split_headers(b"A: b\r\n").0, b"A: b\r\n");
        assert_eq!(
            header_value(b"X: 1\r\nsubject: a\r\n b\r\nY: 2\r\n", "subject").as_deref(),
            Some(&b" a  b"[..])
        );
        assert!(matches!(crlf(b"a\r\nb\r\n"), Cow::Borrowed(_)));
        assert_eq!(&*crlf(b"a\nb\rc\r\n"), b"a\r\nb\r\nc\r\n");
    }
}
