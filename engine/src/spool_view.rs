//! Offline views of the spool for `sluice spool …` (like postqueue -p and postcat).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use sluice_spool::{Envelope, MessageId, Notify, RecipientStatus, Spool};

fn open(path: &Path) -> anyhow::Result<Spool> {
    Spool::open_readonly(path).with_context(|| format!("opening spool at {}", path.display()))
}

fn arrival(env: &Envelope) -> String {
    chrono::DateTime::from_timestamp_millis(env.arrival_unix_ms as i64)
        .map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
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
    spool.list(|id, env| {
        count += 1;
        let line = if json {
            serde_json::json!({
                "id": id.to_string(),
                "size": env.size,
                "arrival": arrival(env),
                "sender": env.sender,
                "recipients": env.recipients.iter().map(|r| r.address.clone()).collect::<Vec<_>>(),
                "queue": env.queue,
            })
            .to_string()
                + "\n"
        } else {
            let mut s = format!(
                "{id}  {:>9}  {}  <{}>\n",
                env.size,
                arrival(env),
                env.sender
            );
            for r in &env.recipients {
                s.push_str(&format!("        <{}>  {}\n", r.address, status(&r.status)));
            }
            s
        };
        result = out.write_all(line.as_bytes());
        result.is_ok()
    })?;
    result?;
    if !json {
        writeln!(out, "-- {count} message(s)")?;
    }
    Ok(())
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
    writeln!(out, "client_ip: {}", env.client_ip)?;
    writeln!(out, "helo: {}", env.helo)?;
    writeln!(out, "auth_user: {}", env.auth_user.as_deref().unwrap_or(""))?;
    writeln!(out, "tls: {}", env.tls.as_deref().unwrap_or(""))?;
    writeln!(out, "size: {}", env.size)?;
    writeln!(out, "priority: {}", env.priority)?;
    writeln!(out, "queue: {}", env.queue)?;
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
