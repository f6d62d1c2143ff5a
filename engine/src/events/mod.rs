//! Delivery events (docs/events.md): what happened to each message and
//! recipient, as JSON objects for a file and an HTTP webhook.
//!
//! - The cores make an [`Event`] where the delivery log is written (reception
//!   in `queue/mod.rs`, attempts and expiry in `delivery/log.rs`, refusals by
//!   the suppression list) and hand it to [`emit`]: a non-blocking send on a
//!   bounded channel. A full channel drops the event and counts it
//!   (`sluice_events_dropped_total{reason="channel_full"}`): delivery is never
//!   slowed by events.
//! - What reception reads from the header (Message-ID, tenant, campaign:
//!   [`HeaderFacts`]) is stored in the envelope, so every later event of the
//!   message carries it with no lookup.
//! - One events thread (`writer.rs`) takes them in batches: appends JSON
//!   lines to the file (`file.rs`) and, when a webhook is configured, stores
//!   the batch in the durable buffer (`<spool.path>/events`, one transaction).
//! - One poster thread (`webhook.rs`) POSTs the oldest buffered events in
//!   batches and removes them only when the webhook answers 2xx: delivery to
//!   the webhook is at-least-once, across restarts and kill -9.

pub mod file;
pub mod headers;
pub mod webhook;
mod writer;

use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::OnceLock;

use serde::Serialize;
use sluice_spool::{HeaderFacts, Reply};

pub use writer::start;

/// The kinds of event (`type` in the JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A message accepted and queued (one per message).
    Reception,
    /// A recipient accepted by the next hop (2xx).
    Delivery,
    /// A recipient's attempt failed temporarily (will be retried).
    Deferral,
    /// A recipient failed permanently (5xx, unroutable).
    Bounce,
    /// A recipient given up on: queue lifetime or DELIVERBY passed.
    Expiry,
    /// A recipient refused at RCPT or dropped at delivery by the suppression list.
    Suppression,
    /// Feedback (ARF) reports: reserved, nothing produces them yet.
    Feedback,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Reception => "reception",
            Kind::Delivery => "delivery",
            Kind::Deferral => "deferral",
            Kind::Bounce => "bounce",
            Kind::Expiry => "expiry",
            Kind::Suppression => "suppression",
            Kind::Feedback => "feedback",
        }
    }
}

/// The TLS of the session the event is about.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tls {
    /// e.g. "TLSv1.3".
    pub version: String,
    pub cipher: String,
    /// The peer's certificate was verified (outbound only; null for reception).
    pub verified: Option<bool>,
}

impl Tls {
    /// From the "VERSION CIPHER" text the relay keeps for a session.
    pub fn from_text(text: &str, verified: Option<bool>) -> Tls {
        let (version, cipher) = text.split_once(' ').unwrap_or((text, ""));
        Tls {
            version: version.to_string(),
            cipher: cipher.to_string(),
            verified,
        }
    }
}

/// A reply as the event carries it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventReply {
    pub code: u16,
    /// "5.1.1", or null when the reply had none.
    pub enhanced: Option<String>,
    pub text: String,
}

impl From<&Reply> for EventReply {
    fn from(r: &Reply) -> EventReply {
        EventReply {
            code: r.code,
            enhanced: r.status.map(|s| s.to_string()),
            text: r.text.clone(),
        }
    }
}

/// One event. Every key is always present (null when unknown), so consumers
/// see one schema; docs/events.md describes each.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: Kind,
    /// RFC 3339 UTC with milliseconds.
    #[serde(rename = "time", serialize_with = "rfc3339_ms")]
    pub time_ms: u64,
    /// The queue id.
    pub id: Option<String>,
    /// The Message-ID header field (as written, angle brackets included).
    pub message_id: Option<String>,
    pub sender: String,
    pub recipient: Option<String>,
    /// Reception only: every recipient accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<Vec<String>>,
    pub size: Option<u64>,
    pub queue: Option<String>,
    pub tenant: Option<String>,
    pub campaign: Option<String>,
    /// The destination (recipient domain or "route:NAME").
    pub site: Option<String>,
    pub route: Option<String>,
    /// The next hop that answered (host name and address).
    pub remote_host: Option<String>,
    pub remote_ip: Option<String>,
    /// Our address: the rule's `source_ip` outbound; the listener's client
    /// address is `client_ip`.
    pub source_ip: Option<String>,
    /// Reception and RCPT refusals: the client's address.
    pub client_ip: Option<String>,
    pub tls: Option<Tls>,
    pub reply: Option<EventReply>,
    /// The bounce class (docs/bounce-classes.md) of failures and deferrals.
    pub class: Option<String>,
    /// Delivery attempts of the message so far, this one included.
    pub attempt: Option<u32>,
}

impl Event {
    /// An event of `kind` at `time_ms` with only the sender set.
    pub fn new(kind: Kind, time_ms: u64, sender: &str) -> Event {
        Event {
            kind,
            time_ms,
            id: None,
            message_id: None,
            sender: sender.to_string(),
            recipient: None,
            recipients: None,
            size: None,
            queue: None,
            tenant: None,
            campaign: None,
            site: None,
            route: None,
            remote_host: None,
            remote_ip: None,
            source_ip: None,
            client_ip: None,
            tls: None,
            reply: None,
            class: None,
            attempt: None,
        }
    }

    /// The message's header facts: Message-ID and campaign as read at
    /// reception; the tenant the message counts for (`tenant`), else the raw
    /// `tenant_header` value.
    pub fn set_header_facts(&mut self, tenant: Option<&str>, facts: Option<&HeaderFacts>) {
        self.message_id = facts.and_then(|f| f.message_id.clone());
        self.tenant = tenant
            .map(str::to_string)
            .or_else(|| facts.and_then(|f| f.tenant.clone()));
        self.campaign = facts.and_then(|f| f.campaign.clone());
    }

    /// The JSON object (one line: no newline inside).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        self.write_json(&mut out);
        out
    }

    /// Appends the JSON object to `out` (the events thread reuses one buffer
    /// for a whole batch rather than allocating per event).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        // Serializing plain strings, numbers and options into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, self);
    }
}

fn rfc3339_ms<S: serde::Serializer>(ms: &u64, s: S) -> Result<S::Ok, S::Error> {
    let mut text = [0u8; 24];
    s.serialize_str(write_time(*ms, &mut text))
}

/// `2026-12-06T04:22:38.123Z`.
pub fn format_time(ms: u64) -> String {
    let mut text = [0u8; 24];
    write_time(ms, &mut text).to_string()
}

/// Formats `ms` (Unix time in milliseconds) into `text` without allocating:
/// a strftime pattern parsed per event was a visible part of what events cost.
fn write_time(ms: u64, text: &mut [u8; 24]) -> &str {
    use chrono::{Datelike, Timelike};
    let dt = chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .unwrap_or_default();
    let year = u32::try_from(dt.year()).unwrap_or(0).min(9999);
    let fields: [(usize, u32, usize); 7] = [
        (0, year, 4),
        (5, dt.month(), 2),
        (8, dt.day(), 2),
        (11, dt.hour(), 2),
        (14, dt.minute(), 2),
        (17, dt.second(), 2),
        (20, dt.timestamp_subsec_millis().min(999), 3),
    ];
    *text = *b"0000-00-00T00:00:00.000Z";
    for (at, mut value, width) in fields {
        for i in (0..width).rev() {
            text[at + i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    // Only ASCII digits and separators were written.
    std::str::from_utf8(text).unwrap_or("1970-01-01T00:00:00.000Z")
}

/// The reception event of a message just stored.
pub fn reception(id: sluice_spool::MessageId, env: &sluice_spool::Envelope) -> Event {
    let mut e = Event::new(Kind::Reception, crate::time::now_ms(), &env.sender);
    e.id = Some(id.to_string());
    e.set_header_facts(env.tenant.as_deref(), env.header_facts.as_deref());
    e.recipients = Some(env.recipients.iter().map(|r| r.address.clone()).collect());
    e.size = Some(env.size);
    e.queue = Some(env.queue.clone());
    e.client_ip = env.client_ip.map(|ip| ip.to_string());
    e.tls = env.tls.as_deref().map(|t| Tls::from_text(t, None));
    e
}

/// A recipient refused at RCPT by the suppression list (no queue id yet).
pub fn suppressed_at_rcpt(
    sender: &str,
    recipient: &str,
    client_ip: std::net::IpAddr,
    reply: &Reply,
    class: &str,
) -> Event {
    let mut e = Event::new(Kind::Suppression, crate::time::now_ms(), sender);
    e.recipient = Some(recipient.to_string());
    e.client_ip = Some(client_ip.to_string());
    e.reply = Some(EventReply::from(reply));
    e.class = Some(class.to_string());
    e
}

/// What the cores send to the events thread.
#[derive(Debug)]
pub(crate) enum Msg {
    Event(Box<Event>),
    /// Answer once everything sent before is written (shutdown).
    Flush(SyncSender<()>),
}

/// The running emitter, when `[events] enabled`.
pub(crate) struct Emitter {
    tx: SyncSender<Msg>,
    tenant_header: String,
    campaign_header: String,
}

static EMITTER: OnceLock<Emitter> = OnceLock::new();

/// Events are on.
pub fn enabled() -> bool {
    EMITTER.get().is_some()
}

fn send(msg: Msg) -> bool {
    let Some(e) = EMITTER.get() else {
        return false;
    };
    match e.tx.try_send(msg) {
        Ok(()) => true,
        Err(TrySendError::Full(_)) => {
            crate::metrics::events_dropped("channel_full");
            false
        }
        Err(TrySendError::Disconnected(_)) => {
            crate::metrics::events_dropped("stopped");
            false
        }
    }
}

/// Hands an event to the events thread without waiting (see the module
/// comment for what happens when it cannot keep up).
pub fn emit(event: Event) {
    if !enabled() {
        return;
    }
    crate::metrics::event_produced(event.kind.as_str());
    send(Msg::Event(Box::new(event)));
}

/// Reads the Message-ID and the configured tenant and campaign fields from
/// a message's header block (only when events are on).
pub fn reception_meta(message: &[u8]) -> Option<HeaderFacts> {
    let e = EMITTER.get()?;
    let [message_id, tenant, campaign] = headers::read(
        message,
        [
            "Message-ID",
            e.tenant_header.as_str(),
            e.campaign_header.as_str(),
        ],
    );
    Some(HeaderFacts {
        message_id,
        tenant,
        campaign,
    })
}

/// Waits (at most `timeout`) until the events sent so far are written:
/// called once at shutdown, off the executors.
pub fn flush(timeout: std::time::Duration) {
    let Some(e) = EMITTER.get() else {
        return;
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    // At shutdown waiting briefly for room is fine (no executor runs here).
    let deadline = std::time::Instant::now() + timeout;
    let mut msg = Msg::Flush(tx);
    loop {
        match e.tx.try_send(msg) {
            Ok(()) => break,
            Err(TrySendError::Full(m)) if std::time::Instant::now() < deadline => {
                msg = m;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
    let _ = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
}

/// SIGHUP: the file is reopened (after an external rotation) by the events
/// thread before its next write.
pub fn reopen_file() {
    file::request_reopen();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_every_key_and_rfc3339_ms_time() {
        let mut e = Event::new(Kind::Bounce, 1_765_000_000_123, "a@b.test");
        e.recipient = Some("c@d.test".into());
        e.reply = Some(EventReply::from(&Reply::new(550, "5.1.1", "no such user")));
        e.class = Some("invalid-recipient".into());
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["type"], "bounce");
        assert_eq!(v["time"], "2025-12-06T05:46:40.123Z");
        assert_eq!(v["reply"]["enhanced"], "5.1.1");
        assert_eq!(v["reply"]["code"], 550);
        assert!(v["message_id"].is_null());
        assert!(v.get("recipients").is_none(), "reception only");
        for key in [
            "id",
            "message_id",
            "sender",
            "recipient",
            "size",
            "queue",
            "tenant",
            "campaign",
            "site",
            "route",
            "remote_host",
            "remote_ip",
            "source_ip",
            "client_ip",
            "tls",
            "reply",
            "class",
            "attempt",
        ] {
            assert!(v.get(key).is_some(), "{key} missing");
        }
        assert!(!e.to_json().contains(&b'\n'));
    }

    #[test]
    fn time_is_rfc3339_with_milliseconds_and_zero_padded() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time(1_765_000_000_007), "2025-12-06T05:46:40.007Z");
        assert_eq!(format_time(1_000_000_000_999), "2001-09-09T01:46:40.999Z");
    }

    #[test]
    fn tls_text_splits() {
        let t = Tls::from_text("TLSv1.3 TLS13_AES_256_GCM_SHA384", Some(true));
        assert_eq!(t.version, "TLSv1.3");
        assert_eq!(t.cipher, "TLS13_AES_256_GCM_SHA384");
    }
}
