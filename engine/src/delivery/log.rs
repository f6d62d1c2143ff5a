//! The delivery log (`sluice::delivery` target): one record per recipient per
//! attempt, and one when a message is given up on or removed.

use sluice_policy::bounce::BounceClass;
use sluice_spool::{Envelope, MessageId, RecipientStatus, Reply};

use super::job::{Job, JobResult, Outcome};
use super::outbound::Connection;
use super::{now_ms, CoreDelivery};
use crate::events::{Event, EventReply, Kind, Tls};

impl CoreDelivery {
    /// The delivery log: one record per recipient per attempt.
    /// `failed_policy`: the TLS policy a failed connection attempt ran under,
    /// when there is no connection to ask.
    pub(super) fn log_attempt(
        &self,
        job: &Job,
        conn: Option<&Connection>,
        failed_policy: Option<&'static str>,
        result: &JobResult,
    ) {
        let delay_ms = now_ms().saturating_sub(job.arrival_unix_ms);
        let (tls_version, tls_cipher) = conn
            .and_then(|c| c.tls.as_deref())
            .map(|t| t.split_once(' ').unwrap_or((t, "")))
            .unwrap_or(("no", ""));
        for (index, outcome) in &result.outcomes {
            let (status, reply) = match outcome {
                Outcome::Delivered(r) => ("delivered", r),
                Outcome::Deferred(r) => ("deferred", r),
                Outcome::Failed(r) => ("failed", r),
            };
            let rcpt = job
                .recipients
                .iter()
                .find(|r| r.index == *index)
                .map(|r| r.address.as_str())
                .unwrap_or("");
            // Failures and deferrals carry their bounce class (empty when delivered).
            let class = match outcome {
                Outcome::Delivered(_) => None,
                Outcome::Deferred(r) | Outcome::Failed(r) => {
                    let class = crate::bounce::classify(r);
                    crate::metrics::delivery_failure(class, status);
                    if matches!(outcome, Outcome::Failed(_)) {
                        suppress_later(&job.sender, rcpt, class, r);
                    }
                    Some(class)
                }
            };
            if crate::events::enabled() {
                crate::events::emit(attempt_event(job, conn, outcome, rcpt, class));
            }
            tracing::info!(
                target: "sluice::delivery",
                id = %job.id,
                recipient = %rcpt,
                recipients = job.recipients.len(),
                queue = %job.queue,
                route = %job.route,
                site = %job.target.destination(),
                group = job.rollup.as_deref().unwrap_or(""),
                host = conn.map(|c| c.host.as_str()).unwrap_or(""),
                limit_key = conn.map(|c| c.limit_key.as_str()).unwrap_or(""),
                ip = %conn.map(|c| c.ip.to_string()).unwrap_or_default(),
                source_ip = %job.strategy.source_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                tls = tls_version,
                tls_cipher,
                tls_verified = conn.is_some_and(|c| c.tls_verified),
                tls_policy = conn
                    .map(|c| c.tls_policy.name())
                    .or(failed_policy)
                    .unwrap_or_else(|| job.target.tls().name()),
                requiretls = job.strategy.message_tls.requires_tls(),
                tls_required_no = job.strategy.message_tls == super::tls_policy::MessageTls::Optional,
                status,
                class = class.map(|c| c.as_str()).unwrap_or(""),
                code = reply.code,
                enhanced = reply.status.map(tracing::field::display),
                reply = %reply,
                delay_ms,
                attempt = job.attempt,
                core = self.core,
                "delivery attempt"
            );
        }
    }

    /// A recipient given up on (queue expiry or DELIVERBY): the record that
    /// says so, after the deferrals before it.
    pub(super) fn log_gave_up(&self, id: MessageId, envelope: &Envelope, index: usize, now: u64) {
        let Some(r) = envelope.recipients.get(index) else {
            return;
        };
        let RecipientStatus::Failed { reply } = &r.status else {
            return;
        };
        let class = crate::bounce::classify(reply);
        crate::metrics::delivery_failure(class, "expired");
        if crate::events::enabled() {
            let mut e = Event::new(Kind::Expiry, now, &envelope.sender);
            e.id = Some(id.to_string());
            e.set_header_facts(envelope.tenant.as_deref(), envelope.header_facts.as_deref());
            e.recipient = Some(r.address.clone());
            e.size = Some(envelope.size);
            e.queue = Some(envelope.queue.clone());
            e.reply = Some(EventReply::from(reply));
            e.class = Some(class.as_str().to_string());
            e.attempt = Some(envelope.schedule.attempts);
            crate::events::emit(e);
        }
        tracing::info!(
            target: "sluice::delivery",
            id = %id,
            recipient = %r.address,
            queue = %envelope.queue,
            status = "expired",
            class = class.as_str(),
            code = reply.code,
            enhanced = reply.status.map(tracing::field::display),
            reply = %reply,
            delay_ms = now.saturating_sub(envelope.arrival_unix_ms),
            attempt = envelope.schedule.attempts,
            core = self.core,
            "given up"
        );
    }

    /// The message left the queue: every recipient delivered or failed.
    pub(super) fn log_removed(&self, id: MessageId, envelope: &Envelope, now: u64) {
        tracing::info!(
            target: "sluice::delivery",
            id = %id,
            queue = %envelope.queue,
            recipients = envelope.recipients.len(),
            delay_ms = now.saturating_sub(envelope.arrival_unix_ms),
            core = self.core,
            "removed"
        );
    }
}

/// The delivery, deferral or bounce event of one recipient's attempt.
fn attempt_event(
    job: &Job,
    conn: Option<&Connection>,
    outcome: &Outcome,
    rcpt: &str,
    class: Option<BounceClass>,
) -> Event {
    let (kind, reply) = match outcome {
        Outcome::Delivered(r) => (Kind::Delivery, r),
        Outcome::Deferred(r) => (Kind::Deferral, r),
        Outcome::Failed(r) => (Kind::Bounce, r),
    };
    let mut e = Event::new(kind, now_ms(), &job.sender);
    e.id = Some(job.id.to_string());
    e.set_header_facts(job.strategy.tenant.as_deref(), job.header_facts.as_deref());
    e.recipient = Some(rcpt.to_string());
    e.size = Some(job.size);
    e.queue = Some(job.queue.clone());
    e.site = Some(job.target.destination());
    e.route = Some(job.route.clone());
    e.remote_host = conn.map(|c| c.host.clone());
    e.remote_ip = conn.map(|c| c.ip.to_string());
    e.source_ip = conn
        .and_then(|c| c.source_ip)
        .or(job.strategy.source_ip)
        .map(|ip| ip.to_string());
    e.tls = conn.and_then(|c| {
        c.tls
            .as_deref()
            .map(|t| Tls::from_text(t, Some(c.tls_verified)))
    });
    e.reply = Some(EventReply::from(reply));
    e.class = class.map(|c| c.as_str().to_string());
    e.attempt = Some(job.attempt);
    e
}

/// A permanent failure may put the recipient on the suppression list: the
/// LMDB commit runs on a blocking thread, never on the executor.
fn suppress_later(sender: &str, rcpt: &str, class: BounceClass, reply: &Reply) {
    let Some(list) = crate::suppression::installed() else {
        return;
    };
    let (sender, rcpt, reason) = (sender.to_string(), rcpt.to_string(), reply.to_string());
    let list = list.clone();
    glommio::spawn_local(async move {
        let done = glommio::executor()
            .spawn_blocking(move || list.record_bounce(&sender, &rcpt, class, &reason, now_ms()))
            .await;
        if let Err(e) = done {
            tracing::warn!(error = %e, "suppression list write failed");
        }
    })
    .detach();
}
