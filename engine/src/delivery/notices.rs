//! Notices (DSNs) to the sender: built from the envelope and the original
//! body, then queued like any other message.

use std::rc::Rc;

use sluice_spool::{Envelope, MessageId, Notify, RecipientStatus};

use super::ledger::{dsn_status, Notice};
use super::{now_ms, persist, CoreDelivery};
use crate::queue::dsn::DsnKind;

impl CoreDelivery {
    /// Builds and queues a DSN to the envelope sender for the given recipients.
    pub(super) async fn notify(
        self: &Rc<Self>,
        envelope: &Envelope,
        id: MessageId,
        kind: DsnKind,
        notices: &[Notice],
        retry_until: Option<u64>,
    ) {
        let now = now_ms();
        let recipients: Vec<crate::queue::dsn::DsnRecipient<'_>> = notices
            .iter()
            .filter_map(|n| envelope.recipients.get(n.index).map(|r| (n, r)))
            .map(|(n, r)| {
                let reply = match &r.status {
                    RecipientStatus::Failed { reply }
                    | RecipientStatus::Deferred { reply, .. }
                    | RecipientStatus::Delivered { reply } => Some(reply),
                    RecipientStatus::Pending => None,
                };
                let status = n.status.unwrap_or_else(|| dsn_status(reply, kind));
                crate::queue::dsn::DsnRecipient {
                    recipient: r,
                    action: n.action,
                    status: status.to_string(),
                    remote_mta: n.remote_mta.as_deref().map(str::to_string),
                    diagnostic: reply.map(ToString::to_string),
                    last_attempt_unix_ms: Some(now),
                    will_retry_until_unix_ms: retry_until,
                }
            })
            .collect();
        let ctx = crate::queue::dsn::DsnContext {
            reporting_mta: &self.shared.hostname,
            now_unix_ms: now,
            original_id: id,
        };
        // Built straight from the memory map; an unreadable body still gets a
        // notice, without the original.
        let build = |original: &[u8]| {
            crate::queue::dsn::build_dsn(kind, envelope, original, &recipients, &ctx)
        };
        let built = self
            .shared
            .spool
            .with_body(id, build)
            .unwrap_or_else(|_| build(&[]));
        let Some(dsn) = built else {
            return;
        };
        let dsn_id = self.ids.next(now);
        let dsn_envelope = Envelope {
            sender: String::new(),
            recipients: vec![sluice_spool::Recipient {
                address: dsn.recipient.clone(),
                orcpt: None,
                notify: Notify::NEVER,
                status: RecipientStatus::Pending,
                local: false,
            }],
            ret: None,
            envid: None,
            body_type: dsn.body_type,
            smtputf8: false,
            arrival_unix_ms: now,
            listener: "dsn".into(),
            client_ip: String::new(),
            helo: String::new(),
            auth_user: None,
            tls: None,
            size: dsn.body.len() as u64,
            priority: 0,
            queue: envelope.queue.clone(),
            hold_until_unix: 0,
            deliver_by: None,
            schedule: Default::default(),
        };
        // The same way into the queue as SMTP (store, count, hand to the
        // scheduler), with the write retried through a full spool.
        let stored = persist(id, "queuing a delivery notification", || {
            self.queue.store(dsn_id, &dsn_envelope, dsn.body.clone())
        })
        .await;
        if stored {
            crate::metrics::dsn_queued(match kind {
                DsnKind::Failure => "failure",
                DsnKind::Delay => "delay",
                DsnKind::Success => "success",
            });
            tracing::info!(target: "sluice::delivery", id = %id, dsn_id = %dsn_id, to = %dsn.recipient, kind = ?kind, "notification queued");
            self.queue.admitted(dsn_id, dsn_envelope);
        }
    }
}
