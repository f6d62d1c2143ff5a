//! Offline views of the spool for `sluice spool …` (like postqueue -p and postcat).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use sluice_spool::{Envelope, MessageId, Notify, RecipientStatus, Spool};

fn open(path: &Path) -> anyhow::Result<Spool> {
    Spool::open_readonly(path).with_context(|| format!("opening spool at {}", path.display()))
}

fn arrival(env: &Envelope) -> String {
    time_ms(env.arrival_unix_ms)
}

fn time_ms(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// When the scheduler will next look at the message: "now" when due (or never
/// tried), else the time (UTC). A FUTURERELEASE hold or an earlier DELIVERBY
/// deadline counts.
fn next_attempt(env: &Envelope, now_ms: u64) -> String {
    let due = crate::delivery::timing::wake_time(env, now_ms);
    if due <= now_ms {
        "now".into()
    } else {
        time_ms(due)
    }
}

/// The last error of a recipient still being tried or given up on.
fn last_error(s: &RecipientStatus) -> Option<String> {
    match s {
        RecipientStatus::Deferred { reply, .. } | RecipientStatus::Failed { reply } => {
            Some(reply.to_string())
        }
        _ => None,
    }
}

/// One recipient's state as JSON: address, status, attempts, last error (the
/// offline `spool list --json` and the management API show the same).
pub(crate) fn recipient_json(r: &sluice_spool::Recipient) -> serde_json::Value {
    serde_json::json!({
        "address": r.address,
        "status": state(&r.status),
        "attempts": match &r.status {
            RecipientStatus::Deferred { attempts, .. } => *attempts,
            _ => 0,
        },
        "last_error": last_error(&r.status),
    })
}

fn state(s: &RecipientStatus) -> &'static str {
    match s {
        RecipientStatus::Pending => "pending",
        RecipientStatus::Delivered { .. } => "delivered",
        RecipientStatus::Deferred { .. } => "deferred",
        RecipientStatus::Failed { .. } => "failed",
    }
}

fn status(s: &RecipientStatus) -> String {
    match s {
        RecipientStatus::Pending => "pending".into(),
        RecipientStatus::Delivered { reply } => format!("delivered: {reply}"),
        RecipientStatus::Deferred { reply, attempts } => {
            format!("deferred ({attempts} attempts): {reply}")
        }
        RecipientStatus::Failed { reply } => format!("failed: {reply}"),
    }
}

fn notify_names(n: Notify) -> String {
    [
        (Notify::SUCCESS, "SUCCESS"),
        (Notify::FAILURE, "FAILURE"),
        (Notify::DELAY, "DELAY"),
        (Notify::NEVER, "NEVER"),
    ]
    .iter()
    .filter(|(bit, _)| n.contains(*bit))
    .map(|(_, name)| *name)
    .collect::<Vec<_>>()
    .join(",")
}

pub fn list(path: &Path, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let spool = open(path)?;
    let mut result = Ok(());
    let mut count = 0u64;
    let now = crate::delivery::now_ms();
    spool.list(|id, env| {
        count += 1;
        let line = list_entry(id, env, json, now);
        result = out.write_all(line.as_bytes());
        result.is_ok()
    })?;
    result?;
    if !json {
        writeln!(out, "-- {count} message(s)")?;
    }
    Ok(())
}

/// One message in `sluice spool list`: like postqueue -p, with the queue, the
/// attempt count and next attempt, and each recipient's state and last error.
fn list_entry(id: MessageId, env: &Envelope, json: bool, now_ms: u64) -> String {
    if json {
        // "recipients" stays a list of addresses (tools read it); the
        // per-recipient state is in "recipient_status", in the same order.
        let status: Vec<serde_json::Value> = env.recipients.iter().map(recipient_json).collect();
        return serde_json::json!({
            "id": id.to_string(),
            "size": env.size,
            "arrival": arrival(env),
            "sender": env.sender,
            "recipients": env.recipients.iter().map(|r| r.address.as_str()).collect::<Vec<_>>(),
            "recipient_status": status,
            "queue": env.queue,
            "priority": env.priority,
            "attempts": env.schedule.attempts,
            "next_attempt": next_attempt(env, now_ms),
            "hold_until": (env.hold_until_unix > 0).then(|| time_ms(env.hold_until_unix * 1000)),
            "deliver_by": env.deliver_by.map(|b| time_ms(b.deadline_unix_ms)),
            "held": env.schedule.held,
        })
        .to_string()
            + "\n";
    }
    let mut s = format!(
        "{id}  {:>9}  {}  <{}>\n        queue {}  attempts {}  next attempt {}{}\n",
        env.size,
        arrival(env),
        env.sender,
        env.queue,
        env.schedule.attempts,
        next_attempt(env, now_ms),
        if env.schedule.held { "  HELD" } else { "" },
    );
    for r in &env.recipients {
        s.push_str(&format!("        <{}>  {}\n", r.address, status(&r.status)));
    }
    s
}

pub fn show(path: &Path, id: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let spool = open(path)?;
    let id: MessageId = id
        .parse()
        .with_context(|| format!("`{id}` is not a message id"))?;
    let env = spool.envelope(id)?;
    writeln!(out, "*** ENVELOPE {id} ***")?;
    writeln!(out, "arrival: {}", arrival(&env))?;
    writeln!(out, "sender: <{}>", env.sender)?;
    for r in &env.recipients {
        let mut extra = String::new();
        if let Some(o) = &r.orcpt {
            extra.push_str(&format!(" orcpt=rfc822;{o}"));
        }
        if !r.notify.is_empty() {
            extra.push_str(&format!(" notify={}", notify_names(r.notify)));
        }
        if r.local {
            extra.push_str(" local");
        }
        writeln!(
            out,
            "recipient: <{}>{extra} [{}]",
            r.address,
            status(&r.status)
        )?;
    }
    writeln!(out, "ret: {:?}", env.ret)?;
    writeln!(out, "envid: {}", env.envid.as_deref().unwrap_or(""))?;
    writeln!(out, "body_type: {:?}", env.body_type)?;
    writeln!(out, "smtputf8: {}", env.smtputf8)?;
    writeln!(out, "listener: {}", env.listener)?;
    match env.client_ip {
        Some(ip) => writeln!(out, "client_ip: {ip}")?,
        None => writeln!(out, "client_ip: (none: written by the relay)")?,
    }
    writeln!(out, "helo: {}", env.helo)?;
    writeln!(out, "auth_user: {}", env.auth_user.as_deref().unwrap_or(""))?;
    writeln!(out, "tls: {}", env.tls.as_deref().unwrap_or(""))?;
    writeln!(out, "size: {}", env.size)?;
    writeln!(out, "priority: {}", env.priority)?;
    writeln!(out, "queue: {}", env.queue)?;
    if env.hold_until_unix > 0 {
        writeln!(out, "hold_until: {}", time_ms(env.hold_until_unix * 1000))?;
    }
    if env.schedule.held {
        writeln!(out, "held: yes (by the operator)")?;
    }
    if let Some(by) = env.deliver_by {
        writeln!(
            out,
            "deliver_by: {} (BY={};{:?}{})",
            time_ms(by.deadline_unix_ms),
            by.by_secs,
            by.mode,
            if by.trace { ", trace" } else { "" }
        )?;
    }
    writeln!(out, "attempts: {}", env.schedule.attempts)?;
    writeln!(
        out,
        "next_attempt: {}",
        next_attempt(&env, crate::delivery::now_ms())
    )?;
    writeln!(out, "delay_notices: {}", env.schedule.delay_notices)?;
    writeln!(out, "*** MESSAGE CONTENTS ***")?;
    spool.with_body(id, |body| out.write_all(body))??;
    Ok(())
}

/// Just the body bytes, exactly as stored (for tools and tests).
pub fn body(path: &Path, id: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let spool = open(path)?;
    let id: MessageId = id
        .parse()
        .with_context(|| format!("`{id}` is not a message id"))?;
    spool.with_body(id, |body| out.write_all(body))??;
    Ok(())
}

pub fn count(path: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let spool = open(path)?;
    writeln!(out, "{}", spool.count()?)?;
    Ok(())
}

pub fn stats(path: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let spool = open(path)?;
    let s = spool.stats()?;
    writeln!(out, "messages_stored {}", s.messages)?;
    writeln!(out, "commits {}", s.commits)?;
    writeln!(out, "queued {}", spool.count()?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use sluice_spool::{BodyType, Recipient, Schedule};

    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn env() -> Envelope {
        let rcpt = |address: &str, status| Recipient {
            address: address.into(),
            orcpt: None,
            notify: Notify::default(),
            status,
            local: false,
        };
        Envelope {
            sender: "a@example.org".into(),
            recipients: vec![
                rcpt(
                    "b@example.net",
                    RecipientStatus::Deferred {
                        reply: "451 4.4.1 mx.example.net [192.0.2.9]: connection refused".into(),
                        attempts: 3,
                    },
                ),
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
            ],
            ret: None,
            envid: None,
            body_type: BodyType::SevenBit,
            smtputf8: false,
            arrival_unix_ms: NOW - 600_000,
            listener: "smtp".into(),
            client_ip: "192.0.2.1".parse().ok(),
            helo: "c".into(),
            auth_user: None,
            tls: None,
            size: 1234,
            priority: 0,
            queue: "bulk".into(),
            hold_until_unix: 0,
            deliver_by: None,
            schedule: Schedule {
                attempts: 3,
                next_attempt_unix_ms: NOW + 300_000,
                delay_notices: 0,
                deliver_by_notified: false,
                held: false,
                notices: Default::default(),
            },
        }
    }

    #[test]
    fn list_shows_attempts_next_attempt_and_last_errors() {
        let id = MessageId(0x0123_4567_89ab_cdef);
        let text = list_entry(id, &env(), false, NOW);
        assert!(text.starts_with("0123456789ABCDEF"), "{text}");
        assert!(
            text.contains("queue bulk  attempts 3  next attempt 2027-01-15 08:05:00"),
            "{text}"
        );
        assert!(
            text.contains("<b@example.net>  deferred (3 attempts): 451 4.4.1 mx.example.net [192.0.2.9]: connection refused"),
            "{text}"
        );
        assert!(
            text.contains("<d@example.net>  failed: 550 5.1.1 no such user"),
            "{text}"
        );

        let json: serde_json::Value =
            serde_json::from_str(&list_entry(id, &env(), true, NOW)).expect("json");
        assert_eq!(json["attempts"], 3);
        assert_eq!(json["queue"], "bulk");
        assert_eq!(json["next_attempt"], "2027-01-15 08:05:00");
        assert_eq!(json["recipients"][0], "b@example.net");
        let st = &json["recipient_status"];
        assert_eq!(st[0]["address"], "b@example.net");
        assert_eq!(st[0]["status"], "deferred");
        assert_eq!(st[0]["attempts"], 3);
        assert_eq!(
            st[0]["last_error"],
            "451 4.4.1 mx.example.net [192.0.2.9]: connection refused"
        );
        assert_eq!(st[1]["status"], "delivered");
        assert_eq!(st[1]["last_error"], serde_json::Value::Null);
        assert_eq!(st[2]["last_error"], "550 5.1.1 no such user");
    }

    #[test]
    fn next_attempt_is_now_when_due_and_honours_holds() {
        let mut e = env();
        e.schedule.next_attempt_unix_ms = 0;
        assert_eq!(next_attempt(&e, NOW), "now");
        e.hold_until_unix = NOW / 1000 + 3600;
        assert_eq!(next_attempt(&e, NOW), time_ms(NOW + 3_600_000));
    }
}
