//! Operator commands for the delivery cores: the queue side of the management
//! API (`admin::api`).
//!
//! The API runs on plain threads; it finds the messages itself (reading the
//! spool, which is safe from any thread) and sends their ids to the core that
//! owns their shard, over an unbounded channel drained by a task on that core.
//! Only that core changes a message, so its schedule in memory and its envelope
//! on disk stay in step. Replies go back over a std channel the API thread
//! blocks on with a deadline.
//!
//! Holds are persisted (`Schedule::held` in the envelope) and survive a
//! restart. Destination suspensions are in memory on every core (each core
//! dispatches its own shards' messages); the API also stores them with the
//! shaping actions (`shaping.rs`), from where every core takes them back at
//! a restart.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::{mpsc, Mutex, PoisonError};

use futures_channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use futures_lite::StreamExt;
use sluice_spool::{Envelope, MessageId, Reply, SpoolError};

use super::{now_ms, Attempt, CoreDelivery, JobRecipient, Strategy, Target};

/// What to do with a queued message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueAction {
    /// Attempt now (outside the retry schedule).
    Retry,
    /// No attempt until released (persisted).
    Hold,
    /// Undo a hold; the message is due at once.
    Release,
    /// Fail every open recipient and send the sender a failure DSN.
    Bounce,
    /// Remove without any notice.
    Drop,
}

impl QueueAction {
    pub fn name(self) -> &'static str {
        match self {
            QueueAction::Retry => "retry",
            QueueAction::Hold => "hold",
            QueueAction::Release => "release",
            QueueAction::Bounce => "bounce",
            QueueAction::Drop => "drop",
        }
    }
}

/// A command to one core.
pub enum Command {
    /// Apply `action` to these messages (all of this core's shards).
    Queue {
        action: QueueAction,
        ids: Vec<MessageId>,
        reply: mpsc::Sender<ActionReport>,
    },
    /// No new attempt to `destination` (a domain, or "route:NAME") before `until_ms`.
    Suspend {
        destination: String,
        until_ms: u64,
        reply: mpsc::Sender<()>,
    },
    /// End a suspension; answers whether there was one.
    Resume {
        destination: String,
        reply: mpsc::Sender<bool>,
    },
    /// The suspensions in force: (destination, until unix ms).
    Suspended {
        reply: mpsc::Sender<Vec<(String, u64)>>,
    },
    /// The sites of this core whose concurrency slow start or a shaping
    /// action sets (`shaping::SiteConcurrency`).
    ShapingSites {
        reply: mpsc::Sender<Vec<super::shaping::SiteConcurrency>>,
    },
    /// Write this core's TLS-RPT counters to the store; answers whether
    /// TLS reporting is on.
    TlsRptFlush { reply: mpsc::Sender<bool> },
    /// Send every stored TLS report now, today's too (core 0); answers
    /// what was sent.
    TlsRptSend {
        reply: mpsc::Sender<serde_json::Value>,
    },
}

/// What a core did with a `Command::Queue`.
#[derive(Debug, Default)]
pub struct ActionReport {
    pub done: Vec<MessageId>,
    /// Messages left alone, and why.
    pub skipped: Vec<(MessageId, String)>,
}

/// The command channels, one per core: the API keeps the senders, each core
/// takes its receiver when delivery starts.
pub struct AdminChannels {
    senders: Vec<UnboundedSender<Command>>,
    receivers: Mutex<Vec<Option<UnboundedReceiver<Command>>>>,
}

impl AdminChannels {
    pub fn new(cores: usize) -> AdminChannels {
        let (senders, receivers) = (0..cores)
            .map(|_| {
                let (tx, rx) = unbounded();
                (tx, Some(rx))
            })
            .unzip();
        AdminChannels {
            senders,
            receivers: Mutex::new(receivers),
        }
    }

    /// Senders indexed by core.
    pub fn senders(&self) -> Vec<UnboundedSender<Command>> {
        self.senders.clone()
    }

    fn take(&self, core: u16) -> Option<UnboundedReceiver<Command>> {
        self.receivers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(usize::from(core))
            .and_then(Option::take)
    }
}

/// The core owning a message's shard (the same rule as `CoreDelivery::new`).
pub fn owner_core(id: MessageId, cores: usize) -> usize {
    usize::from(id.shard()) % cores.max(1)
}

/// A destination name as matched: lower case, no trailing dot.
pub fn normalize_destination(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// The normalized destination (domain) of a recipient address.
pub fn recipient_destination(address: &str) -> String {
    normalize_destination(address.rsplit_once('@').map_or("", |(_, d)| d))
}

/// Per-core operator state (shard-owner side).
#[derive(Default)]
pub struct CoreAdmin {
    /// Hold decisions taken while the message was being attempted or
    /// finalized: applied when its envelope is next persisted, and
    /// authoritative over the stored flag until then.
    holds: RefCell<HashMap<MessageId, bool>>,
    /// Messages whose envelope a finalize is about to write (or remove): no
    /// other write may race it.
    finalizing: RefCell<HashSet<MessageId>>,
    /// Suspended destinations: name → until (unix ms).
    suspended: RefCell<HashMap<String, u64>>,
    /// Messages left undispatched because of a suspension, by destination.
    parked: RefCell<HashMap<String, HashSet<MessageId>>>,
    /// Messages the operator released, until their next dispatch: the
    /// delivery stage's quarantine does not hold them again then.
    released: RefCell<HashSet<MessageId>>,
}

/// Removes the message from `finalizing` when its finalize ends.
pub(super) struct Finalizing {
    core: Rc<CoreDelivery>,
    id: MessageId,
}

impl Drop for Finalizing {
    fn drop(&mut self) {
        self.core.admin.finalizing.borrow_mut().remove(&self.id);
        // A hold decided after the finalize wrote the envelope is stored now.
        if self.core.admin.holds.borrow().contains_key(&self.id) && !self.core.stopped.get() {
            let core = self.core.clone();
            let id = self.id;
            glommio::spawn_local(async move { core.admin_store_hold(id).await }).detach();
        }
    }
}

const CANCELLED: &str = "message cancelled by the operator";

impl CoreDelivery {
    /// Starts draining this core's command channel (when the API has one).
    pub(super) fn start_admin_commands(self: &Rc<Self>) {
        self.shaping_restore();
        let Some(mut rx) = self.shared.admin.take(self.core) else {
            return;
        };
        let me = self.clone();
        glommio::spawn_local(async move {
            while let Some(cmd) = rx.next().await {
                let me = me.clone();
                glommio::spawn_local(async move { me.on_admin(cmd).await }).detach();
            }
        })
        .detach();
    }

    /// A suspension stored before a restart (`shaping.rs`), back in force here.
    pub(super) fn admin_restore_suspension(&self, destination: String, until_ms: u64) {
        let mut suspended = self.admin.suspended.borrow_mut();
        let until = suspended
            .entry(normalize_destination(&destination))
            .or_insert(0);
        *until = (*until).max(until_ms);
    }

    async fn on_admin(self: Rc<Self>, cmd: Command) {
        match cmd {
            Command::Queue { action, ids, reply } => {
                let report = self.clone().admin_batch(action, ids).await;
                let _ = reply.send(report);
            }
            Command::Suspend {
                destination,
                until_ms,
                reply,
            } => {
                tracing::info!(destination = %destination, until_ms, core = self.core, "destination suspended");
                self.admin
                    .suspended
                    .borrow_mut()
                    .insert(normalize_destination(&destination), until_ms);
                let _ = reply.send(());
            }
            Command::Resume { destination, reply } => {
                let key = normalize_destination(&destination);
                let was = self.admin.suspended.borrow_mut().remove(&key).is_some();
                let parked = self.admin.parked.borrow_mut().remove(&key);
                // Due now, as if the suspension had never been; a message held
                // meanwhile stays held.
                let ids: Vec<MessageId> = parked.into_iter().flatten().collect();
                self.clone().admin_batch(QueueAction::Retry, ids).await;
                let _ = reply.send(was);
            }
            Command::Suspended { reply } => {
                let now = now_ms();
                let mut list: Vec<(String, u64)> = self
                    .admin
                    .suspended
                    .borrow()
                    .iter()
                    .filter(|(_, until)| **until > now)
                    .map(|(d, u)| (d.clone(), *u))
                    .collect();
                list.sort();
                let _ = reply.send(list);
            }
            Command::ShapingSites { reply } => {
                let _ = reply.send(self.shaping_sites());
            }
            Command::TlsRptFlush { reply } => {
                self.tls_rpt_flush().await;
                let _ = reply.send(self.shared.tls_rpt.is_some());
            }
            Command::TlsRptSend { reply } => {
                let _ = reply.send(self.tls_rpt_send(u32::MAX).await);
            }
        }
    }

    /// Whether the message is held (an operator decision in memory wins over
    /// the stored flag); checked before each dispatch.
    pub(super) fn admin_held(&self, id: MessageId, envelope: &Envelope) -> bool {
        self.admin
            .holds
            .borrow()
            .get(&id)
            .copied()
            .unwrap_or(envelope.schedule.held)
    }

    /// Applies a hold decided during an attempt to the envelope finalize writes.
    pub(super) fn admin_apply_hold(&self, id: MessageId, envelope: &mut Envelope) {
        if let Some(held) = self.admin.holds.borrow_mut().remove(&id) {
            envelope.schedule.held = held;
        }
    }

    /// Marks a finalize of `id` as started; the guard ends it.
    pub(super) fn admin_finalizing(self: &Rc<Self>, id: MessageId) -> Finalizing {
        self.admin.finalizing.borrow_mut().insert(id);
        Finalizing {
            core: self.clone(),
            id,
        }
    }

    /// Takes the groups going to suspended destinations (the target's name or
    /// the recipient's domain) out of a dispatch. Returns the earliest end of
    /// the suspensions that applied, if any did; the message is remembered so a
    /// resume can wake it.
    pub(super) fn admin_park_suspended(
        &self,
        id: MessageId,
        groups: &mut Vec<(Target, Strategy, String, Vec<JobRecipient>)>,
        now: u64,
    ) -> Option<u64> {
        let mut suspended = self.admin.suspended.borrow_mut();
        if suspended.is_empty() {
            return None;
        }
        // Suspensions that ran out end here; their waiting messages were
        // scheduled for that time when parked.
        let mut parked = self.admin.parked.borrow_mut();
        suspended.retain(|name, until| {
            let live = *until > now;
            if !live {
                parked.remove(name);
            }
            live
        });
        let mut earliest: Option<u64> = None;
        let mut parked_on: Vec<String> = Vec::new();
        let mut hit = |name: &str| -> bool {
            match suspended.get(name) {
                Some(until) => {
                    earliest = Some(earliest.map_or(*until, |e| e.min(*until)));
                    parked_on.push(name.to_string());
                    true
                }
                None => false,
            }
        };
        groups.retain_mut(|(target, _, _, rcpts)| {
            if hit(&normalize_destination(&target.destination())) {
                return false;
            }
            rcpts.retain(|r| !hit(&recipient_destination(&r.address)));
            !rcpts.is_empty()
        });
        for name in parked_on {
            parked.entry(name).or_default().insert(id);
        }
        if earliest.is_some() {
            tracing::debug!(id = %id, "destination suspended: recipients not attempted");
        }
        earliest
    }

    /// Applies one action to many messages. Checks come first and are
    /// synchronous, so the timer entries of every message acted on are dropped
    /// in one pass over the timer set (not one pass per message).
    async fn admin_batch(self: Rc<Self>, action: QueueAction, ids: Vec<MessageId>) -> ActionReport {
        let mut report = ActionReport::default();
        let mut checked = Vec::with_capacity(ids.len());
        for id in ids {
            match self.admin_check(action, id) {
                Ok(env) => checked.push((id, env)),
                Err(why) => report.skipped.push((id, why)),
            }
        }
        let rescheduled: HashSet<MessageId> = checked
            .iter()
            .filter(|(id, _)| action != QueueAction::Hold && !self.admin_busy(*id))
            .map(|(id, _)| *id)
            .collect();
        if !rescheduled.is_empty() {
            self.timers
                .borrow_mut()
                .retain(|(_, id)| !rescheduled.contains(id));
        }
        for (id, env) in checked {
            match self.clone().admin_act(action, id, env).await {
                Ok(()) => report.done.push(id),
                Err(why) => report.skipped.push((id, why)),
            }
            glommio::yield_if_needed().await;
        }
        report
    }

    /// An attempt of the message is out, or its finalize is writing it.
    fn admin_busy(&self, id: MessageId) -> bool {
        self.attempts.borrow().contains_key(&id) || self.admin.finalizing.borrow().contains(&id)
    }

    /// Whether `action` applies to the message now; its stored envelope if so.
    fn admin_check(&self, action: QueueAction, id: MessageId) -> Result<Envelope, String> {
        if !self.shards.contains(&id.shard()) {
            return Err("not a message of this core".into());
        }
        let envelope = match self.shared.spool.envelope(id) {
            Ok(env) => env,
            Err(SpoolError::NotFound(_)) => return Err("no such message".into()),
            Err(e) => return Err(format!("spool: {e}")),
        };
        let busy = self.admin_busy(id);
        match action {
            QueueAction::Hold | QueueAction::Release => Ok(envelope),
            QueueAction::Retry if self.admin_held(id, &envelope) => {
                Err("held: release it first".into())
            }
            QueueAction::Retry | QueueAction::Bounce | QueueAction::Drop if busy => {
                Err("an attempt is in progress; try again when it ends".into())
            }
            QueueAction::Retry | QueueAction::Bounce | QueueAction::Drop => Ok(envelope),
        }
    }

    /// Carries out a checked action (the message's timer entries are gone,
    /// unless it is busy or the action is a hold).
    async fn admin_act(
        self: Rc<Self>,
        action: QueueAction,
        id: MessageId,
        envelope: Envelope,
    ) -> Result<(), String> {
        let busy = self.admin_busy(id);
        tracing::info!(id = %id, action = action.name(), "queue: operator action");
        match action {
            QueueAction::Hold | QueueAction::Release => {
                let hold = action == QueueAction::Hold;
                if busy {
                    // The attempt's finalize writes the envelope; it takes the
                    // decision from here (a write now could be overwritten, or
                    // overwrite newer results).
                    self.admin.holds.borrow_mut().insert(id, hold);
                    return Ok(());
                }
                if envelope.schedule.held != hold {
                    let mut env = envelope;
                    env.schedule.held = hold;
                    // Decided in memory at once, so no dispatch meanwhile
                    // reads the old flag.
                    self.admin.holds.borrow_mut().insert(id, hold);
                    let stored = self.shared.spool.update(id, &env).await;
                    self.admin.holds.borrow_mut().remove(&id);
                    stored.map_err(|e| format!("spool: {e}"))?;
                }
                if !hold {
                    if !self.shared.stage_filters.load().is_empty() {
                        self.admin.released.borrow_mut().insert(id);
                    }
                    if !self.admin_busy(id) {
                        self.admin_redispatch(id);
                    }
                }
                Ok(())
            }
            QueueAction::Retry => {
                self.admin_redispatch(id);
                Ok(())
            }
            QueueAction::Drop => {
                self.forget(id);
                let _busy = self.admin_finalizing(id);
                self.shared
                    .spool
                    .remove(id)
                    .await
                    .map_err(|e| format!("spool: {e}"))?;
                self.queue.removed(&envelope);
                Ok(())
            }
            QueueAction::Bounce => {
                self.forget(id);
                let reply = Reply::new(550, "5.0.0", CANCELLED);
                if crate::events::enabled() {
                    let open: Vec<(u32, super::job::Outcome)> = (0u32..)
                        .zip(&envelope.recipients)
                        .filter(|(_, r)| super::ledger::is_open(&r.status))
                        .map(|(i, _)| (i, super::job::Outcome::Failed(reply.clone())))
                        .collect();
                    super::scheduler::failure_events(id, &envelope, &open, super::now_ms());
                }
                // Every open recipient fails; finalize sends the failure DSN
                // through the usual path and removes the message.
                let attempt = Attempt::cancel(envelope, reply);
                let _busy = self.admin_finalizing(id);
                self.clone().finalize(id, attempt).await;
                Ok(())
            }
        }
    }

    /// Stores a hold decision taken while the message was busy.
    async fn admin_store_hold(self: Rc<Self>, id: MessageId) {
        let Some(hold) = self.admin.holds.borrow().get(&id).copied() else {
            return;
        };
        if self.admin_busy(id) {
            // The next finalize applies it.
            return;
        }
        let result = match self.shared.spool.envelope(id) {
            Ok(mut env) if env.schedule.held != hold => {
                env.schedule.held = hold;
                self.shared.spool.update(id, &env).await
            }
            Ok(_) | Err(SpoolError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                self.admin.holds.borrow_mut().remove(&id);
                if !hold {
                    self.admin_redispatch(id);
                }
            }
            Err(e) => tracing::error!(id = %id, "queue: storing a hold failed: {e}"),
        }
    }

    /// Whether the operator released the message since its last dispatch
    /// (and forgets it: once only).
    pub(super) fn admin_take_released(&self, id: MessageId) -> bool {
        self.admin.released.borrow_mut().remove(&id)
    }

    /// Drops what this core remembers of a message that is going away.
    fn forget(&self, id: MessageId) {
        self.admin.holds.borrow_mut().remove(&id);
        self.admin.released.borrow_mut().remove(&id);
        for set in self.admin.parked.borrow_mut().values_mut() {
            set.remove(&id);
        }
    }

    /// Makes the message due now: dispatches it from its stored envelope with
    /// the retry time cleared (finalize then persists the next one as usual).
    /// A FUTURERELEASE time, a hold or a suspension still apply.
    fn admin_redispatch(self: &Rc<Self>, id: MessageId) {
        if self.attempts.borrow().contains_key(&id) {
            return;
        }
        match self.shared.spool.envelope(id) {
            Ok(mut env) => {
                env.schedule.next_attempt_unix_ms = 0;
                self.dispatch(id, env);
            }
            Err(e) => tracing::warn!(id = %id, "queue: message unreadable: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_and_names() {
        let id = MessageId((1_700_000_000_000u64 << 22) | (5 << 16) | 1);
        assert_eq!(id.shard(), 5);
        assert_eq!(owner_core(id, 2), 1);
        assert_eq!(owner_core(id, 1), 0);
        assert_eq!(normalize_destination(" Example.COM. "), "example.com");
        assert_eq!(normalize_destination("route:Smart"), "route:smart");
    }

    #[test]
    fn channels_hand_each_core_its_receiver_once() {
        let ch = AdminChannels::new(2);
        assert_eq!(ch.senders().len(), 2);
        assert!(ch.take(1).is_some());
        assert!(ch.take(1).is_none());
        assert!(ch.take(5).is_none());
    }
}
