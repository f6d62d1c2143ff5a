//! The read side of the management API: queue summary, listing with filters
//! and pages, and one message in full, straight from the spool.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{json, Value};
use sluice_spool::{DeliverByMode, Envelope, MessageId, Notify, Recipient, RecipientStatus};

use super::calls::{
    err, parse_count, parse_duration, parse_id, rfc3339, spool, spool_err, suspended_list,
    ApiContext, ApiError, ApiResult,
};
use super::Request;
use crate::delivery::admin::{normalize_destination, recipient_destination};
use crate::delivery::is_open;
use crate::delivery::{now_ms, timing};

/// Page size bounds for listing.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1_000;
const MAX_OFFSET: usize = 100_000;
/// Most header bytes `show` returns.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Destinations listed in the summary by default and at most.
const DEFAULT_TOP: usize = 50;
const MAX_TOP: usize = 10_000;

// ---------------------------------------------------------------------------------
// Message state and filters
// ---------------------------------------------------------------------------------

/// A message's state as the API reports and filters it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not tried yet, or due again without a deferral.
    Queued,
    /// At least one recipient was deferred.
    Deferred,
    /// Held by the operator.
    Held,
}

impl Status {
    pub fn of(env: &Envelope) -> Status {
        if env.schedule.held {
            Status::Held
        } else if env
            .recipients
            .iter()
            .any(|r| matches!(r.status, RecipientStatus::Deferred { .. }))
        {
            Status::Deferred
        } else {
            Status::Queued
        }
    }

    fn name(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Deferred => "deferred",
            Status::Held => "held",
        }
    }

    fn parse(s: &str) -> Result<Status, ApiError> {
        match s {
            "queued" => Ok(Status::Queued),
            "deferred" => Ok(Status::Deferred),
            "held" => Ok(Status::Held),
            _ => Err(err(
                400,
                format!("status: `{s}` must be queued, deferred or held"),
            )),
        }
    }
}

/// Search criteria (all given ones must hold).
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Substring of the sender, case-insensitive.
    sender: Option<String>,
    /// Substring of any recipient, case-insensitive.
    recipient: Option<String>,
    /// Domain of any open recipient.
    domain: Option<String>,
    queue: Option<String>,
    status: Option<Status>,
    min_age_ms: Option<u64>,
    max_age_ms: Option<u64>,
}

impl Filter {
    pub(super) fn from_request(req: &Request) -> Result<Filter, ApiError> {
        let text = |name: &str| {
            req.param(name)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let age = |name: &str| -> Result<Option<u64>, ApiError> {
            text(name)
                .map(|v| parse_duration(name, &v).map(|d| d.as_millis() as u64))
                .transpose()
        };
        Ok(Filter {
            sender: text("sender").map(|s| s.to_ascii_lowercase()),
            recipient: text("recipient").map(|s| s.to_ascii_lowercase()),
            domain: text("domain").map(|d| normalize_destination(&d)),
            queue: text("queue"),
            status: text("status").map(|s| Status::parse(&s)).transpose()?,
            min_age_ms: age("min_age")?,
            max_age_ms: age("max_age")?,
        })
    }

    pub(super) fn is_empty(&self) -> bool {
        self.sender.is_none()
            && self.recipient.is_none()
            && self.domain.is_none()
            && self.queue.is_none()
            && self.status.is_none()
            && self.min_age_ms.is_none()
            && self.max_age_ms.is_none()
    }

    pub fn matches(&self, env: &Envelope, now: u64) -> bool {
        if let Some(s) = &self.sender {
            if !env.sender.to_ascii_lowercase().contains(s.as_str()) {
                return false;
            }
        }
        if let Some(r) = &self.recipient {
            if !env
                .recipients
                .iter()
                .any(|x| x.address.to_ascii_lowercase().contains(r.as_str()))
            {
                return false;
            }
        }
        if let Some(d) = &self.domain {
            if !env
                .recipients
                .iter()
                .any(|x| is_open(&x.status) && recipient_destination(&x.address) == *d)
            {
                return false;
            }
        }
        if self.queue.as_ref().is_some_and(|q| *q != env.queue) {
            return false;
        }
        if self.status.is_some_and(|s| s != Status::of(env)) {
            return false;
        }
        let age = now.saturating_sub(env.arrival_unix_ms);
        if self.min_age_ms.is_some_and(|m| age < m) || self.max_age_ms.is_some_and(|m| age > m) {
            return false;
        }
        true
    }
}

/// The NOTIFY keywords a recipient asked for, in RFC 3461 order.
fn notify_names(n: Notify) -> Vec<&'static str> {
    [
        (Notify::SUCCESS, "SUCCESS"),
        (Notify::FAILURE, "FAILURE"),
        (Notify::DELAY, "DELAY"),
        (Notify::NEVER, "NEVER"),
    ]
    .into_iter()
    .filter(|(bit, _)| n.contains(*bit))
    .map(|(_, name)| name)
    .collect()
}

/// One recipient's state: address, status, attempts, the reply that set the
/// status (`last_reply`; `last_error` only while deferred or failed) and
/// its DSN parameters.
fn recipient_json(r: &Recipient) -> Value {
    let (status, attempts, reply) = match &r.status {
        RecipientStatus::Pending => ("pending", 0, None),
        RecipientStatus::Delivered { reply } => ("delivered", 0, Some(reply)),
        RecipientStatus::Deferred { reply, attempts } => ("deferred", *attempts, Some(reply)),
        RecipientStatus::Failed { reply } => ("failed", 0, Some(reply)),
    };
    // The bounce class of a deferral or failure (docs/bounce-classes.md).
    let class = reply
        .filter(|_| status == "deferred" || status == "failed")
        .map(|r| crate::bounce::classify(r).as_str());
    let reply = reply.map(|r| r.to_string());
    json!({
        "address": r.address,
        "status": status,
        "attempts": attempts,
        "class": class,
        "last_error": reply.clone().filter(|_| status == "deferred" || status == "failed"),
        "last_reply": reply,
        "orcpt": r.orcpt,
        "notify": notify_names(r.notify),
        "local": r.local,
    })
}

/// One message as listed.
fn message_json(id: MessageId, env: &Envelope, now: u64) -> Value {
    let status = Status::of(env);
    let recipients: Vec<Value> = env.recipients.iter().map(recipient_json).collect();
    let last_error = env.recipients.iter().rev().find_map(|r| match &r.status {
        RecipientStatus::Deferred { reply, .. } => Some(reply.to_string()),
        _ => None,
    });
    let next_attempt = (status != Status::Held)
        .then(|| rfc3339(timing::wake_time(env, now).max(now)))
        .flatten();
    json!({
        "id": id.to_string(),
        "status": status.name(),
        "sender": env.sender,
        "recipients": recipients,
        "queue": env.queue,
        "priority": env.priority,
        "size": env.size,
        "arrival": rfc3339(env.arrival_unix_ms),
        "age_seconds": now.saturating_sub(env.arrival_unix_ms) / 1000,
        "attempts": env.schedule.attempts,
        "next_attempt": next_attempt,
        "last_error": last_error,
        "held": env.schedule.held,
        "hold_until": (env.hold_until_unix > 0).then(|| rfc3339(env.hold_until_unix * 1000)).flatten(),
        "deliver_by": env.deliver_by.and_then(|b| rfc3339(b.deadline_unix_ms)),
    })
}

// ---------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    messages: u64,
    bytes: u64,
    recipients: u64,
    deferred: u64,
    held: u64,
    oldest_ms: Option<u64>,
}

impl Tally {
    fn add(&mut self, env: &Envelope, recipients: u64) {
        self.messages += 1;
        self.bytes += env.size;
        self.recipients += recipients;
        match Status::of(env) {
            Status::Deferred => self.deferred += 1,
            Status::Held => self.held += 1,
            Status::Queued => {}
        }
        self.oldest_ms = Some(
            self.oldest_ms
                .map_or(env.arrival_unix_ms, |o| o.min(env.arrival_unix_ms)),
        );
    }

    fn json(&self, key: &str, name: &str) -> Value {
        json!({
            key: name,
            "messages": self.messages,
            "bytes": self.bytes,
            "recipients": self.recipients,
            "deferred": self.deferred,
            "held": self.held,
            "oldest": self.oldest_ms.and_then(rfc3339),
        })
    }
}

/// Totals by queue and by destination (the domain of each open recipient).
pub(super) fn summary(api: &ApiContext, req: &Request) -> ApiResult {
    let spool = spool(api)?;
    let top = parse_count(req, "top", DEFAULT_TOP, MAX_TOP)?;
    let mut total = Tally::default();
    let mut queues: BTreeMap<String, Tally> = BTreeMap::new();
    let mut dests: HashMap<String, Tally> = HashMap::new();
    spool
        .list(|_, env| {
            let open: Vec<&sluice_spool::Recipient> = env
                .recipients
                .iter()
                .filter(|r| is_open(&r.status))
                .collect();
            total.add(env, open.len() as u64);
            queues
                .entry(env.queue.clone())
                .or_default()
                .add(env, open.len() as u64);
            let mut per_domain: BTreeMap<String, u64> = BTreeMap::new();
            for r in open {
                *per_domain
                    .entry(recipient_destination(&r.address))
                    .or_default() += 1;
            }
            for (domain, n) in per_domain {
                dests.entry(domain).or_default().add(env, n);
            }
            true
        })
        .map_err(spool_err)?;
    let mut dests: Vec<(String, Tally)> = dests.into_iter().collect();
    dests.sort_by(|a, b| b.1.recipients.cmp(&a.1.recipients).then(a.0.cmp(&b.0)));
    let more = dests.len().saturating_sub(top);
    dests.truncate(top);
    let suspended = match &api.cores {
        Some(senders) => suspended_list(senders)?,
        None => Vec::new(),
    };
    // Counted apart from the walk: an envelope this version cannot decode
    // is not in the tallies but is still in the spool.
    let stored = spool.count().map_err(spool_err)?;
    Ok(json!({
        "stored": stored,
        "total": total.json("queue", "*"),
        "queues": queues.iter().map(|(q, t)| t.json("queue", q)).collect::<Vec<_>>(),
        "destinations": dests.iter().map(|(d, t)| t.json("destination", d)).collect::<Vec<_>>(),
        "destinations_not_shown": more,
        "suspended": suspended,
    }))
}

/// Matching messages in id (arrival) order, a page at a time.
pub(super) fn list(api: &ApiContext, req: &Request) -> ApiResult {
    let spool = spool(api)?;
    let filter = Filter::from_request(req)?;
    let limit = parse_count(req, "limit", DEFAULT_LIMIT, MAX_LIMIT)?.max(1);
    let offset = parse_count(req, "offset", 0, MAX_OFFSET)?;
    let cursor = match req.param("cursor").filter(|c| !c.is_empty()) {
        Some(c) => Some(parse_id(c)?),
        None => None,
    };
    let now = now_ms();
    // The smallest ids after the cursor, enough for offset + limit + 1 (to know
    // whether there is more); shards are walked one after another, so ids come
    // in order per shard only.
    let keep = offset + limit + 1;
    let mut page: BTreeSet<MessageId> = BTreeSet::new();
    let mut total = 0u64;
    spool
        .list(|id, env| {
            if filter.matches(env, now) {
                total += 1;
                if cursor.is_none_or(|c| id > c) {
                    page.insert(id);
                    if page.len() > keep {
                        page.pop_last();
                    }
                }
            }
            true
        })
        .map_err(spool_err)?;
    let ids: Vec<MessageId> = page.into_iter().skip(offset).collect();
    let more = ids.len() > limit;
    let mut messages = Vec::new();
    for id in ids.into_iter().take(limit) {
        // Gone since the walk (delivered): not listed.
        if let Ok(env) = spool.envelope(id) {
            messages.push(message_json(id, &env, now));
        }
    }
    let next_cursor = if more {
        messages
            .last()
            .and_then(|m| m["id"].as_str().map(str::to_string))
    } else {
        None
    };
    Ok(json!({
        "total": total,
        "messages": messages,
        "next_cursor": next_cursor,
    }))
}

/// One message: envelope, per-recipient state, schedule and its header section.
pub(super) fn show(api: &ApiContext, id: &str) -> ApiResult {
    let spool = spool(api)?;
    let id = parse_id(id)?;
    let env = spool.envelope(id).map_err(spool_err)?;
    let now = now_ms();
    let mut v = message_json(id, &env, now);
    let (headers, truncated) = spool
        .with_body(id, header_section)
        .unwrap_or_else(|_| (String::new(), false));
    let extra = json!({
        "ret": env.ret.map(|r| format!("{r:?}")),
        "envid": env.envid,
        "body_type": format!("{:?}", env.body_type),
        "smtputf8": env.smtputf8,
        "priority": env.priority,
        "listener": env.listener,
        "client_ip": env.client_ip,
        "helo": env.helo,
        "auth_user": env.auth_user,
        "tls": env.tls,
        // The BY= parameter as given (RFC 2852); the deadline is `deliver_by`.
        "deliver_by_request": env.deliver_by.map(|b| json!({
            "seconds": b.by_secs,
            "mode": match b.mode {
                DeliverByMode::Return => "R",
                DeliverByMode::Notify => "N",
            },
            "trace": b.trace,
        })),
        "delay_notices": env.schedule.delay_notices,
        // RFC 8689: REQUIRETLS on MAIL, or an honoured TLS-Required: No.
        "tls_request": match env.tls_request {
            sluice_spool::TlsRequest::Policy => "policy",
            sluice_spool::TlsRequest::RequireTls => "requiretls",
            sluice_spool::TlsRequest::Optional => "tls-required-no",
        },
        // The tenant it counted for at reception (docs/pools.md).
        "tenant": env.tenant,
        "headers": headers,
        "headers_truncated": truncated,
    });
    if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    Ok(v)
}

/// The message's header section (up to the first empty line), at most
/// `MAX_HEADER_BYTES`, as text.
fn header_section(body: &[u8]) -> (String, bool) {
    let end = memchr::memmem::find(body, b"\r\n\r\n")
        .map(|i| i + 2)
        .or_else(|| memchr::memmem::find(body, b"\n\n").map(|i| i + 1))
        .unwrap_or(body.len());
    let truncated = end > MAX_HEADER_BYTES;
    let head = &body[..end.min(MAX_HEADER_BYTES)];
    (String::from_utf8_lossy(head).into_owned(), truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_with(status: RecipientStatus, held: bool) -> Envelope {
        Envelope {
            sender: "Alice@Example.org".into(),
            recipients: vec![sluice_spool::Recipient {
                address: "bob@Dest.example".into(),
                orcpt: None,
                notify: Default::default(),
                status,
                local: false,
            }],
            ret: None,
            envid: None,
            body_type: sluice_spool::BodyType::SevenBit,
            smtputf8: false,
            arrival_unix_ms: 1_000_000,
            listener: "smtp".into(),
            client_ip: "127.0.0.1".parse().ok(),
            helo: "h".into(),
            auth_user: None,
            tls: None,
            size: 10,
            priority: 0,
            queue: "bulk".into(),
            hold_until_unix: 0,
            deliver_by: None,
            tls_request: Default::default(),
            tenant: None,
            header_facts: None,
            schedule: sluice_spool::Schedule {
                held,
                ..Default::default()
            },
        }
    }

    fn req(query: &[(&str, &str)]) -> Request {
        Request {
            method: "GET".into(),
            path: "/".into(),
            query: query
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: Vec::new(),
        }
    }

    #[test]
    fn filters_and_status() {
        let deferred = env_with(
            RecipientStatus::Deferred {
                reply: "451 later".into(),
                attempts: 1,
            },
            false,
        );
        let held = env_with(RecipientStatus::Pending, true);
        assert_eq!(Status::of(&deferred), Status::Deferred);
        assert_eq!(Status::of(&held), Status::Held);
        let now = 1_000_000 + 3_600_000;
        let f = |q: &[(&str, &str)]| Filter::from_request(&req(q)).expect("filter");
        assert!(f(&[("sender", "alice@")]).matches(&deferred, now));
        assert!(f(&[("domain", "DEST.example.")]).matches(&deferred, now));
        assert!(!f(&[("domain", "other.example")]).matches(&deferred, now));
        assert!(f(&[("status", "deferred"), ("queue", "bulk")]).matches(&deferred, now));
        assert!(!f(&[("status", "held")]).matches(&deferred, now));
        assert!(f(&[("min_age", "30m"), ("max_age", "7200")]).matches(&held, now));
        assert!(!f(&[("min_age", "2h")]).matches(&held, now));
        assert!(f(&[]).is_empty());
        assert!(Filter::from_request(&req(&[("status", "nope")])).is_err());
        assert!(Filter::from_request(&req(&[("min_age", "soon")])).is_err());
    }

    #[test]
    fn messages_carry_each_recipient_state_and_the_schedule() {
        const NOW: u64 = 1_800_000_000_000;
        let mut env = env_with(RecipientStatus::Pending, false);
        let rcpt = |address: &str, status| sluice_spool::Recipient {
            address: address.into(),
            orcpt: None,
            notify: Notify::default(),
            status,
            local: false,
        };
        env.recipients = vec![
            sluice_spool::Recipient {
                orcpt: Some("orig@example.net".into()),
                notify: Notify(Notify::SUCCESS.0 | Notify::FAILURE.0),
                local: true,
                ..rcpt(
                    "b@example.net",
                    RecipientStatus::Deferred {
                        reply: "451 4.4.1 mx.example.net [192.0.2.9]: connection refused".into(),
                        attempts: 3,
                    },
                )
            },
            rcpt(
                "c@example.net",
                RecipientStatus::Delivered {
                    reply: "250 2.0.0 ok".into(),
                },
            ),
            rcpt(
                "d@example.net",
                RecipientStatus::Failed {
                    reply: "550 5.1.1 no such user".into(),
                },
            ),
        ];
        env.schedule.attempts = 3;
        env.schedule.next_attempt_unix_ms = NOW + 300_000;
        env.arrival_unix_ms = NOW - 600_000;
        env.deliver_by = Some(sluice_spool::DeliverBy {
            deadline_unix_ms: NOW + 3_600_000,
            by_secs: 4200,
            mode: DeliverByMode::Notify,
            trace: true,
        });
        let id = MessageId(0x0123_4567_89ab_cdef);
        let v = message_json(id, &env, NOW);
        assert_eq!(v["id"], "0123456789ABCDEF");
        assert_eq!(v["status"], "deferred");
        assert_eq!(v["attempts"], 3);
        assert_eq!(v["age_seconds"], 600);
        assert_eq!(v["next_attempt"], "2027-01-15T08:05:00.000Z");
        assert_eq!(v["deliver_by"], "2027-01-15T09:00:00.000Z");
        assert_eq!(
            v["last_error"],
            "451 4.4.1 mx.example.net [192.0.2.9]: connection refused"
        );
        let r = &v["recipients"];
        assert_eq!(r[0]["address"], "b@example.net");
        assert_eq!(r[0]["status"], "deferred");
        assert_eq!(r[0]["attempts"], 3);
        assert_eq!(r[0]["last_error"], r[0]["last_reply"]);
        assert_eq!(r[0]["orcpt"], "orig@example.net");
        assert_eq!(r[0]["notify"], json!(["SUCCESS", "FAILURE"]));
        assert_eq!(r[0]["local"], true);
        assert_eq!(r[1]["status"], "delivered");
        assert_eq!(r[1]["last_error"], Value::Null);
        assert_eq!(r[1]["last_reply"], "250 2.0.0 ok");
        assert_eq!(r[1]["notify"], json!([]));
        assert_eq!(r[2]["last_error"], "550 5.1.1 no such user");
        assert_eq!(r[0]["class"], "network");
        assert_eq!(r[1]["class"], Value::Null);
        assert_eq!(r[2]["class"], "invalid-recipient");

        // Due: the time asked is "now"; a FUTURERELEASE hold moves it; an
        // operator hold has none.
        env.schedule.next_attempt_unix_ms = 0;
        env.deliver_by = None;
        assert_eq!(
            message_json(id, &env, NOW)["next_attempt"],
            "2027-01-15T08:00:00.000Z"
        );
        env.hold_until_unix = NOW / 1000 + 3600;
        let v = message_json(id, &env, NOW);
        assert_eq!(v["next_attempt"], "2027-01-15T09:00:00.000Z");
        assert_eq!(v["hold_until"], "2027-01-15T09:00:00.000Z");
        env.schedule.held = true;
        assert_eq!(message_json(id, &env, NOW)["next_attempt"], Value::Null);
    }

    #[test]
    fn header_section_is_bounded() {
        let (h, t) = header_section(b"Subject: x\r\nFrom: y\r\n\r\nbody\r\n");
        assert_eq!(h, "Subject: x\r\nFrom: y\r\n");
        assert!(!t);
        let big = vec![b'a'; MAX_HEADER_BYTES + 10];
        let (h, t) = header_section(&big);
        assert_eq!(h.len(), MAX_HEADER_BYTES);
        assert!(t);
    }
}
