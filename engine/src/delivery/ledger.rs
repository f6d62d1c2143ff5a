//! The shard owner's decisions, sans-IO: whether a woken message is attempted,
//! how its open recipients are grouped into jobs, how job results are merged
//! into the envelope, and what follows an attempt (retry time, expiry,
//! DELIVERBY, which notices are owed, persist or remove). Every function takes
//! the time as an argument and returns effects for the scheduler to carry out,
//! so the rules are unit-tested with a manual clock (like the SMTP session).

use std::collections::HashMap;
use std::sync::Arc;

use sluice_spool::{
    EnhancedStatus, Envelope, MessageId, Notify, Recipient, RecipientStatus, Reply,
};

use super::config::QueueConfig;
use super::job::{Job, JobRecipient, JobResult, Outcome, Strategy, Target};
use super::timing::{self, ByState};
use crate::queue::dsn::{DsnAction, DsnKind};

/// What to do with a message the scheduler was woken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Held (FUTURERELEASE): look again at this time.
    WakeAt(u64),
    /// No attempt now, only the deadlines: a DELIVERBY wake-up before the next
    /// retry is due, or an R-mode deadline that has passed.
    Settle,
    /// Route the open recipients and send jobs.
    Attempt,
}

/// Whether a message woken at `now` is attempted.
pub fn admit(env: &Envelope, now: u64) -> Admit {
    let held = timing::held_until_ms(env);
    if held > now {
        return Admit::WakeAt(held);
    }
    let by = timing::deliver_by_state(env, now);
    if by == ByState::Return || (env.schedule.next_attempt_unix_ms > now && has_pending(env)) {
        return Admit::Settle;
    }
    Admit::Attempt
}

/// Recipients that share a target, connection strategy and route name.
pub type Group = (Target, Strategy, String, Vec<JobRecipient>);

/// Groups the open recipients by where they go (`route` decides per
/// recipient); those that cannot be routed fail with the reply it gave.
pub fn group(
    env: &Envelope,
    mut route: impl FnMut(&Recipient) -> Result<(String, Target, Strategy), Reply>,
) -> (Vec<Group>, Vec<(u32, Outcome)>) {
    let mut groups: Vec<Group> = Vec::new();
    let mut unroutable = Vec::new();
    for (i, r) in env.recipients.iter().enumerate() {
        if !is_open(&r.status) {
            continue;
        }
        // u32: max_recipients allows up to 100,000 per message.
        let index = i as u32;
        match route(r) {
            Ok((name, target, strategy)) => {
                let jr = JobRecipient {
                    index,
                    address: r.address.clone(),
                    notify: r.notify,
                    orcpt: r.orcpt.clone(),
                };
                match groups
                    .iter_mut()
                    .find(|(gt, gs, gr, _)| *gt == target && *gs == strategy && *gr == name)
                {
                    Some((_, _, _, list)) => list.push(jr),
                    None => groups.push((target, strategy, name, vec![jr])),
                }
            }
            // A transient refusal (no usable pool member) waits for a retry.
            Err(reply) if reply.class() == 4 => unroutable.push((index, Outcome::Deferred(reply))),
            Err(reply) => unroutable.push((index, Outcome::Failed(reply))),
        }
    }
    (groups, unroutable)
}

/// One job per group and transaction (`per_tx` recipients at most).
pub fn jobs(
    id: MessageId,
    reply_to: usize,
    env: &Envelope,
    groups: Vec<Group>,
    per_tx: usize,
) -> Vec<Box<Job>> {
    let mut jobs = Vec::new();
    let message_tls = super::tls_policy::MessageTls::of(env.tls_request, &env.sender);
    for (target, mut strategy, route, rcpts) in groups {
        strategy.message_tls = message_tls;
        for chunk in rcpts.chunks(per_tx.max(1)) {
            jobs.push(Box::new(Job {
                id,
                reply_to,
                target: target.clone(),
                strategy: strategy.clone(),
                route: route.clone(),
                queue: env.queue.clone(),
                recipients: chunk.to_vec(),
                sender: env.sender.clone(),
                priority: env.priority,
                size: env.size,
                eightbit: env.body_type != sluice_spool::BodyType::SevenBit,
                smtputf8: env.smtputf8,
                ret: env.ret,
                envid: env.envid.clone(),
                attempt: env.schedule.attempts + 1,
                arrival_unix_ms: env.arrival_unix_ms,
                rollup: None,
                header_facts: env.header_facts.clone(),
            }));
        }
    }
    jobs
}

/// A message with jobs out, waiting for their results.
pub struct Attempt {
    pub envelope: Envelope,
    outstanding: usize,
    /// False when no job went out (deadline handling, nothing open).
    attempted: bool,
    /// The host that answered for each recipient in this attempt ("dns; …"),
    /// for its notice; recipients that reached no host have none.
    remote_mta: HashMap<usize, Arc<str>>,
    /// Recipients that failed permanently in this attempt (each is notified once).
    newly_failed: Vec<usize>,
    /// Recipients delivered to a next hop that could not take over their
    /// NOTIFY=SUCCESS: (index, action) of the success notice we owe.
    success: Vec<(usize, DsnAction)>,
}

impl Attempt {
    pub fn new(envelope: Envelope, outstanding: usize, attempted: bool) -> Attempt {
        Attempt {
            envelope,
            outstanding,
            attempted,
            remote_mta: HashMap::new(),
            newly_failed: Vec::new(),
            success: Vec::new(),
        }
    }

    /// An operator cancel: every open recipient fails with `reply`; finalizing
    /// sends the failure notice and removes the message.
    pub fn cancel(mut envelope: Envelope, reply: Reply) -> Attempt {
        let mut failed = Vec::new();
        for (i, r) in envelope.recipients.iter_mut().enumerate() {
            if is_open(&r.status) {
                r.status = RecipientStatus::Failed {
                    reply: reply.clone(),
                };
                failed.push(i);
            }
        }
        let mut attempt = Attempt::new(envelope, 0, false);
        attempt.newly_failed = failed;
        attempt
    }

    /// Merges one job's result into the envelope. True when it was the last
    /// result the attempt waited for.
    pub fn record(&mut self, result: JobResult) -> bool {
        let remote: Option<Arc<str>> = result.remote_mta.map(Arc::from);
        for (index, outcome) in result.outcomes {
            let i = index as usize;
            let Some(r) = self.envelope.recipients.get_mut(i) else {
                continue;
            };
            let deferrals = match &r.status {
                RecipientStatus::Deferred { attempts, .. } => *attempts,
                _ => 0,
            };
            if let Some(mta) = &remote {
                self.remote_mta.insert(i, mta.clone());
            }
            r.status = match outcome {
                Outcome::Delivered(reply) => {
                    if let Some(action) = success_notice_due(r.notify, result.peer_dsn, result.lmtp)
                    {
                        self.success.push((i, action));
                    }
                    RecipientStatus::Delivered { reply }
                }
                Outcome::Failed(reply) => {
                    self.newly_failed.push(i);
                    RecipientStatus::Failed { reply }
                }
                Outcome::Deferred(reply) => RecipientStatus::Deferred {
                    reply,
                    attempts: deferrals + 1,
                },
            };
        }
        self.outstanding = self.outstanding.saturating_sub(1);
        self.outstanding == 0
    }
}

/// What a notice says about one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub index: usize,
    pub action: DsnAction,
    /// Enhanced status to report instead of the one in the recipient's reply.
    pub status: Option<EnhancedStatus>,
    /// The host that answered for this recipient, if one did.
    pub remote_mta: Option<Arc<str>>,
}

/// What the scheduler does after an attempt, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A recipient was given up on (queue expiry or DELIVERBY): count and log.
    GaveUp { index: usize, why: &'static str },
    /// Queue a notice to the sender.
    Notify {
        kind: DsnKind,
        notices: Vec<Notice>,
        /// Delay notices: when we give up.
        retry_until: Option<u64>,
    },
    /// Nothing is left open: remove the message.
    Remove,
    /// Write the envelope back and wake the message at this time.
    Persist { wake_at: u64 },
}

const EXPIRED: &str = "message expired in the queue";
const DELIVER_BY_EXPIRED: &str = "delivery time (DELIVERBY) expired";
/// 5.4.7: delivery time expired (RFC 3463).
const TIME_EXPIRED: EnhancedStatus = EnhancedStatus::new(5, 4, 7);

/// All results of an attempt are in (or none was made): applies expiry and
/// DELIVERBY, decides the notices, the retry time, and whether the message is
/// written back or removed. Returns the envelope to write and the effects.
pub fn finalize(attempt: Attempt, queue: &QueueConfig, now: u64) -> (Envelope, Vec<Effect>) {
    let Attempt {
        mut envelope,
        remote_mta,
        mut newly_failed,
        success,
        attempted,
        ..
    } = attempt;
    let mut effects = Vec::new();
    // One notice line per recipient, with the host that answered for it.
    let notice = |index: usize, action: DsnAction, status: Option<EnhancedStatus>| Notice {
        index,
        action,
        status,
        remote_mta: remote_mta.get(&index).cloned(),
    };
    if attempted {
        envelope.schedule.attempts += 1;
    }
    let expire_ms = queue.expire.0.as_millis() as u64;
    let by = timing::deliver_by_state(&envelope, now);
    let give_up = if timing::expired(&envelope, expire_ms, now) {
        Some(EXPIRED)
    } else if by == ByState::Return {
        Some(DELIVER_BY_EXPIRED)
    } else {
        None
    };
    if let Some(why) = give_up {
        for (i, r) in envelope.recipients.iter_mut().enumerate() {
            if !is_open(&r.status) {
                continue;
            }
            newly_failed.push(i);
            effects.push(Effect::GaveUp { index: i, why });
            let text = match &r.status {
                RecipientStatus::Deferred { reply, .. } => format!("{why}; last error: {reply}"),
                _ => why.to_string(),
            };
            r.status = RecipientStatus::Failed {
                reply: Reply {
                    code: 550,
                    status: Some(TIME_EXPIRED),
                    text,
                },
            };
        }
    }
    if !newly_failed.is_empty() {
        let notices = newly_failed
            .iter()
            .map(|&index| notice(index, DsnAction::Failed, None))
            .collect();
        effects.push(Effect::Notify {
            kind: DsnKind::Failure,
            notices,
            retry_until: None,
        });
    }
    if !success.is_empty() {
        let notices = success
            .iter()
            .map(|&(index, action)| notice(index, action, None))
            .collect();
        effects.push(Effect::Notify {
            kind: DsnKind::Success,
            notices,
            retry_until: None,
        });
    }
    if !has_pending(&envelope) {
        effects.push(Effect::Remove);
        return (envelope, effects);
    }
    if attempted {
        envelope.schedule.next_attempt_unix_ms =
            now + queue.retry_delay(envelope.schedule.attempts).as_millis() as u64;
    }
    let start = timing::queue_clock_start(&envelope);
    let until = start + expire_ms;
    let open: Vec<usize> = envelope
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| is_open(&r.status))
        .map(|(i, _)| i)
        .collect();
    let waited = now.saturating_sub(start);
    if let Some(threshold) = queue
        .notify_delay
        .get(envelope.schedule.delay_notices as usize)
    {
        if attempted && waited >= threshold.0.as_millis() as u64 {
            effects.push(Effect::Notify {
                kind: DsnKind::Delay,
                notices: open
                    .iter()
                    .map(|&index| notice(index, DsnAction::Delayed, None))
                    .collect(),
                retry_until: Some(until),
            });
            envelope.schedule.delay_notices += 1;
        }
    }
    if by == ByState::Notify {
        // RFC 2852 N mode: the deadline passed undelivered; say so once and
        // keep trying.
        effects.push(Effect::Notify {
            kind: DsnKind::Delay,
            notices: open
                .iter()
                .map(|&index| {
                    notice(
                        index,
                        DsnAction::Delayed,
                        Some(EnhancedStatus::new(4, 4, 7)),
                    )
                })
                .collect(),
            retry_until: Some(until),
        });
        envelope.schedule.deliver_by_notified = true;
    }
    let wake_at = timing::wake_time(&envelope, now).max(now);
    effects.push(Effect::Persist { wake_at });
    (envelope, effects)
}

/// The success notice owed for a delivered recipient (RFC 3461 §5.2.2): when it
/// asked for NOTIFY=SUCCESS and the next hop did not offer DSN, so the request
/// could not travel on, we report "relayed" (or "delivered" for an LMTP store,
/// which is final delivery). When the next hop offered DSN, NOTIFY went with the
/// RCPT and the notice is its job.
pub fn success_notice_due(notify: Notify, peer_dsn: bool, lmtp: bool) -> Option<DsnAction> {
    if peer_dsn || notify.contains(Notify::NEVER) || !notify.contains(Notify::SUCCESS) {
        return None;
    }
    Some(if lmtp {
        DsnAction::Delivered
    } else {
        DsnAction::Relayed
    })
}

/// A recipient still to be tried (pending or deferred).
pub fn is_open(status: &RecipientStatus) -> bool {
    matches!(
        status,
        RecipientStatus::Pending | RecipientStatus::Deferred { .. }
    )
}

pub fn has_pending(env: &Envelope) -> bool {
    env.recipients.iter().any(|r| is_open(&r.status))
}

/// The enhanced status a notice reports for a reply: its own, or a default
/// for its class and the notice kind.
pub fn dsn_status(reply: Option<&Reply>, kind: DsnKind) -> EnhancedStatus {
    if let Some(s) = reply.and_then(|r| r.status) {
        return s;
    }
    match (reply.map(Reply::class), kind) {
        (Some(2), _) => EnhancedStatus::new(2, 0, 0),
        (Some(5), _) | (_, DsnKind::Failure) => EnhancedStatus::new(5, 0, 0),
        _ => EnhancedStatus::new(4, 0, 0),
    }
}

#[cfg(test)]
#[path = "ledger_tests.rs"]
mod tests;
