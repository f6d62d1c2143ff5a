//! Notices (DSNs) to the sender: built from the envelope and the original
//! body, then queued like any other message.

use std::rc::Rc;

use sluice_spool::{Envelope, MessageId, RecipientStatus, Spool};

use super::ledger::{dsn_status, Notice};
use super::site::OFF_EXECUTOR_BYTES;
use super::{generated_envelope, now_ms, queue_generated, CoreDelivery, GeneratedError};
use crate::queue::dsn::DsnKind;

/// What one notice is about.
struct NoticeRequest {
    id: MessageId,
    kind: DsnKind,
    notices: Vec<Notice>,
    retry_until: Option<u64>,
    now: u64,
}

/// Builds the notice straight from the memory map; an unreadable body still
/// gets a notice, without the original.
fn build(
    spool: &Spool,
    hostname: &str,
    envelope: &Envelope,
    req: &NoticeRequest,
) -> Option<crate::queue::dsn::DsnMessage> {
    let recipients: Vec<crate::queue::dsn::DsnRecipient<'_>> = req
        .notices
        .iter()
        .filter_map(|n| envelope.recipients.get(n.index).map(|r| (n, r)))
        .map(|(n, r)| {
            let reply = match &r.status {
                RecipientStatus::Failed { reply }
                | RecipientStatus::Deferred { reply, .. }
                | RecipientStatus::Delivered { reply } => Some(reply),
                RecipientStatus::Pending => None,
            };
            let status = n.status.unwrap_or_else(|| dsn_status(reply, req.kind));
            crate::queue::dsn::DsnRecipient {
                recipient: r,
                action: n.action,
                status: status.to_string(),
                remote_mta: n.remote_mta.as_deref().map(str::to_string),
                diagnostic: reply.map(ToString::to_string),
                last_attempt_unix_ms: Some(req.now),
                will_retry_until_unix_ms: req.retry_until,
            }
        })
        .collect();
    let ctx = crate::queue::dsn::DsnContext {
        reporting_mta: hostname,
        now_unix_ms: req.now,
        original_id: req.id,
    };
    let build = |original: &[u8]| {
        crate::queue::dsn::build_dsn(req.kind, envelope, original, &recipients, &ctx)
    };
    spool
        .with_body(req.id, build)
        .unwrap_or_else(|_| build(&[]))
}

impl CoreDelivery {
    /// Builds and queues a DSN to the envelope sender for the given recipients.
    pub(super) async fn notify(
        self: &Rc<Self>,
        envelope: &Envelope,
        id: MessageId,
        kind: DsnKind,
        notices: Vec<Notice>,
        retry_until: Option<u64>,
    ) {
        let now = now_ms();
        let req = NoticeRequest {
            id,
            kind,
            notices,
            retry_until,
            now,
        };
        // A notice may return the whole original (RET=FULL): for a large one,
        // reading and copying it happens on a blocking thread.
        let built = if envelope.size > OFF_EXECUTOR_BYTES {
            let spool = self.shared.spool.clone();
            let hostname = self.shared.hostname.clone();
            let envelope = envelope.clone();
            glommio::executor()
                .spawn_blocking(move || build(&spool, &hostname, &envelope, &req))
                .await
        } else {
            build(&self.shared.spool, &self.shared.hostname, envelope, &req)
        };
        let Some(dsn) = built else {
            return;
        };
        let dsn_id = self.ids.next(now);
        let mut dsn_envelope = generated_envelope(
            String::new(),
            &dsn.recipient,
            "dsn",
            envelope.queue.clone(),
            &dsn.body,
            now,
        );
        dsn_envelope.body_type = dsn.body_type;
        // RFC 8689 §5: a notice about a REQUIRETLS message goes with
        // REQUIRETLS too (and returns only the headers, `dsn.rs`).
        if envelope.tls_request == sluice_spool::TlsRequest::RequireTls {
            dsn_envelope.tls_request = sluice_spool::TlsRequest::RequireTls;
        }
        // Signed like SMTP mail when a [[dkim.rule]] matches the notice
        // (listener "dsn", null sender). A notice that cannot be signed is
        // not sent unsigned: it is dropped and logged, as a notice that
        // cannot be built is.
        let what = "queuing a delivery notification";
        match queue_generated(&self.queue, id, dsn_id, what, dsn_envelope, dsn.body).await {
            Ok(signers) => {
                crate::metrics::dsn_queued(kind.as_str());
                tracing::info!(target: "sluice::delivery", id = %id, dsn_id = %dsn_id, to = %dsn.recipient, kind = ?kind, dkim = %signers, "notification queued");
            }
            Err(GeneratedError::Signing(e)) => {
                tracing::error!(target: "sluice::delivery", id = %id, dsn_id = %dsn_id, error = %e, "notification not queued: DKIM signing failed");
            }
            // Logged by `persist`.
            Err(GeneratedError::NotStored) => {}
        }
    }
}
