//! The delivery stage on the shard owner (issue 14 item 1). Before each
//! attempt of a message whose listener has filters at `delivery`, they are
//! asked (`filters::delivery`) and their verdict decides the attempt:
//!
//! * accept: routed and sent as usual;
//! * reject: every open recipient fails with the filter's reply, and the
//!   sender gets a failure notice, as if the next hop had said it;
//! * tempfail: every open recipient is deferred with the filter's reply (the
//!   queue's retry schedule, then its lifetime, apply);
//! * discard: the message is removed, logged, no notice;
//! * quarantine: the message is held until `sluice queue release`.
//!
//! While the filters run the message is in `resolving`, so no timer or
//! release dispatches it twice.

use std::rc::Rc;
use std::sync::Arc;

use sluice_policy::stage::{FilterReply, Verdict};
use sluice_spool::{Envelope, MessageId, Reply};

use super::job::{JobResult, Outcome};
use super::ledger::{is_open, Attempt};
use super::scheduler::{count_outcomes, failure_events};
use super::site::OFF_EXECUTOR_BYTES;
use super::{now_ms, CoreDelivery};
use crate::filters::Filters;

impl CoreDelivery {
    /// The delivery-stage filters of the listener that received the message,
    /// and whether the operator released it since its last dispatch.
    pub(super) fn delivery_filters(
        &self,
        id: MessageId,
        envelope: &Envelope,
    ) -> Option<(Arc<Filters>, bool)> {
        let all = self.shared.stage_filters.load();
        if all.is_empty() {
            return None;
        }
        // Taken at every dispatch, so the set never outgrows the releases
        // still on their way.
        let released = self.admin_take_released(id);
        Some((all.get(&envelope.listener)?.clone(), released))
    }

    /// Asks `filters` about the message, then routes it or carries out their
    /// refusal. A message the operator `released` goes past a quarantine.
    pub(super) fn delivery_stage(
        self: &Rc<Self>,
        id: MessageId,
        envelope: Envelope,
        filters: Arc<Filters>,
        released: bool,
    ) {
        self.start_resolving(id, &envelope);
        let me = self.clone();
        glommio::spawn_local(async move {
            let verdict = me.ask_before_delivery(id, &envelope, filters).await;
            if me.stopped.get() {
                return;
            }
            let let_through = released && matches!(verdict, Verdict::Quarantine { .. });
            if verdict == Verdict::Accept || let_through {
                me.end_resolving(id);
                me.route(id, envelope, now_ms());
                return;
            }
            tracing::info!(
                target: "sluice::delivery",
                id = %id,
                listener = %envelope.listener,
                verdict = verdict.name(),
                reply = %reply_text(&verdict),
                "refused before delivery"
            );
            crate::metrics::delivery_stage_refused(verdict.name());
            me.clone().carry_out(id, envelope, verdict).await;
            me.end_resolving(id);
        })
        .detach();
    }

    async fn ask_before_delivery(
        &self,
        id: MessageId,
        envelope: &Envelope,
        filters: Arc<Filters>,
    ) -> Verdict {
        // Copied out of the map: a read transaction cannot be held across
        // the filters' awaits. A large message is copied off the executor.
        let read = if envelope.size > OFF_EXECUTOR_BYTES {
            let spool = self.shared.spool.clone();
            glommio::executor()
                .spawn_blocking(move || spool.with_body(id, |b| b.to_vec()))
                .await
        } else {
            self.shared.spool.with_body(id, |b| b.to_vec())
        };
        match read {
            Ok(message) => {
                crate::filters::delivery::consult(
                    filters,
                    &id.to_string(),
                    envelope,
                    &message,
                    &self.shared.hostname,
                )
                .await
            }
            Err(e) => Verdict::Tempfail(FilterReply {
                code: 451,
                enhanced: Some("4.3.0".into()),
                text: format!("spool read failed: {e}"),
            }),
        }
    }

    /// A verdict other than accept.
    async fn carry_out(self: Rc<Self>, id: MessageId, envelope: Envelope, verdict: Verdict) {
        match verdict {
            Verdict::Accept => {}
            Verdict::Reject(r) => {
                self.close_attempt(id, envelope, Outcome::Failed(reply(r, "5.7.1")))
                    .await
            }
            Verdict::Tempfail(r) => {
                self.close_attempt(id, envelope, Outcome::Deferred(reply(r, "4.7.1")))
                    .await
            }
            Verdict::Discard => {
                let _busy = self.admin_finalizing(id);
                match self.shared.spool.remove(id).await {
                    Ok(()) => {
                        self.queue.removed(&envelope);
                    }
                    Err(e) => tracing::error!(id = %id, "discarding before delivery: {e}"),
                }
            }
            Verdict::Quarantine { .. } => {
                let mut held = envelope;
                held.schedule.held = true;
                let _busy = self.admin_finalizing(id);
                if let Err(e) = self.shared.spool.update(id, &held).await {
                    // Not held on disk: the next dispatch asks the filters again.
                    tracing::error!(id = %id, "quarantine before delivery: {e}");
                    let retry = now_ms() + 60_000;
                    self.schedule(retry, id);
                }
            }
        }
    }

    /// Ends this attempt with `outcome` for every open recipient, through the
    /// ledger like a next hop's answer (notices, retry, expiry, removal).
    async fn close_attempt(self: Rc<Self>, id: MessageId, envelope: Envelope, outcome: Outcome) {
        let outcomes: Vec<(u32, Outcome)> = (0u32..)
            .zip(&envelope.recipients)
            .filter(|(_, r)| is_open(&r.status))
            .map(|(i, _)| (i, outcome.clone()))
            .collect();
        if crate::events::enabled() {
            failure_events(id, &envelope, &outcomes, now_ms());
        }
        count_outcomes(&envelope, &outcomes);
        let mut attempt = Attempt::new(envelope, 1, true);
        attempt.record(JobResult {
            id,
            outcomes,
            remote_mta: None,
            peer_dsn: false,
            lmtp: false,
        });
        let _busy = self.admin_finalizing(id);
        self.clone().finalize(id, attempt).await;
    }
}

/// The filter's reply as the spool records it (`default` when it gave no
/// enhanced code).
fn reply(r: FilterReply, default: &str) -> Reply {
    let status = r.enhanced.as_deref().unwrap_or(default);
    Reply::new(r.code, status, r.text)
}

fn reply_text(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Reject(r) | Verdict::Tempfail(r) => {
            format!(
                "{} {} {}",
                r.code,
                r.enhanced.as_deref().unwrap_or(""),
                r.text
            )
        }
        Verdict::Quarantine { reason } => reason.clone(),
        _ => String::new(),
    }
}
