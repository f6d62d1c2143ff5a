//! The memory bound on messages due now (`delivery.max_ready_messages`).
//!
//! A message being attempted is held in memory (its envelope, its jobs in the
//! site queues): about 2 KiB. When acceptance outruns delivery that backlog
//! would grow with the queue. Past this core's share of the bound, a message
//! due now (fresh from SMTP, or woken by its timer) waits as its id only, in
//! its destination's line (`ready_lines.rs`: lines served in turn, no
//! destination holding more than half the share); as attempts end, the
//! waiting ones are read back from the spool and dispatched. Nothing is
//! refused or lost: the spool holds them.

use std::rc::Rc;

use sluice_spool::{Envelope, MessageId, SpoolError};

use super::ledger::Attempt;
use super::{halted, throttle, CoreDelivery};

/// The destination a message counts against: its first recipient's domain.
fn destination(envelope: &Envelope) -> String {
    envelope
        .recipients
        .first()
        .map(|r| super::routing::domain_of(&r.address))
        .unwrap_or_default()
}

impl CoreDelivery {
    /// This core's share of `delivery.max_ready_messages` (0 = no bound).
    fn ready_cap(&self) -> usize {
        throttle::per_core_share(self.cfg().delivery.max_ready_messages, self.cores)
    }

    /// Message `id` is being attempted (or its MX hosts looked up) already.
    pub(super) fn in_flight(&self, id: MessageId) -> bool {
        self.attempts.borrow().contains_key(&id) || self.resolving.borrow().contains(&id)
    }

    /// Message `id` is being attempted: it enters `attempts`, and is counted
    /// against its destination. `attempts` and `resolving` change only
    /// through these four methods, so the per-destination counts hold.
    pub(super) fn start_attempt(&self, id: MessageId, attempt: Attempt) {
        self.ready
            .borrow_mut()
            .enter(id, &destination(&attempt.envelope));
        self.attempts.borrow_mut().insert(id, attempt);
    }

    /// Message `id`'s attempt is complete: it leaves memory.
    pub(super) fn end_attempt(&self, id: MessageId) -> Option<Attempt> {
        self.ready.borrow_mut().leave(id);
        self.attempts.borrow_mut().remove(&id)
    }

    /// Message `id`'s MX hosts or delivery filters are being asked.
    pub(super) fn start_resolving(&self, id: MessageId, envelope: &Envelope) {
        self.ready.borrow_mut().enter(id, &destination(envelope));
        self.resolving.borrow_mut().insert(id);
    }

    /// Message `id`'s MX hosts or filters answered.
    pub(super) fn end_resolving(&self, id: MessageId) {
        self.ready.borrow_mut().leave(id);
        self.resolving.borrow_mut().remove(&id);
    }

    /// True when message `id`, due now, must wait its turn (it is queued as
    /// its id): the share is full, its destination holds half of it, or
    /// others for its destination already wait before it.
    pub(super) fn must_wait(&self, id: MessageId, envelope: &Envelope) -> bool {
        let cap = self.ready_cap();
        if cap == 0 {
            return false;
        }
        let mut ready = self.ready.borrow_mut();
        if !ready.must_wait(id, &destination(envelope), cap) {
            return false;
        }
        self.waiting_gauge.set(ready.waiting() as f64);
        true
    }

    /// The safety net under the methods above: more messages counted as
    /// held than `attempts` and `resolving` hold means a removal bypassed
    /// them. Forget those (logged), or their destination
    /// would stay at its limit and its line would never move.
    fn correct_held_counts(&self) {
        let in_memory = self.attempts.borrow().len() + self.resolving.borrow().len();
        let mut ready = self.ready.borrow_mut();
        if ready.held() <= in_memory {
            return;
        }
        let attempts = self.attempts.borrow();
        let resolving = self.resolving.borrow();
        let dropped = ready.retain_held(|id| attempts.contains_key(&id) || resolving.contains(&id));
        tracing::warn!(
            core = self.core,
            dropped,
            "ready bound: messages counted as held were no longer in memory; counts corrected"
        );
    }

    /// Messages due now that wait for room.
    pub(super) fn waiting_count(&self) -> usize {
        self.ready.borrow().waiting()
    }

    /// An attempt ended: dispatch waiting messages while there is room. One
    /// task at a time does it, yielding between messages.
    pub(super) fn pump_waiting(self: &Rc<Self>) {
        if self.pumping.get() || self.waiting_count() == 0 {
            return;
        }
        self.pumping.set(true);
        let me = self.clone();
        glommio::spawn_local(async move {
            me.pump().await;
            me.pumping.set(false);
        })
        .detach();
    }

    async fn pump(self: &Rc<Self>) {
        loop {
            if self.stopped.get() {
                return;
            }
            if self.shared.spool.is_failed() {
                // Not even a read: the storage is suspect (they stay on disk).
                halted();
                return;
            }
            self.correct_held_counts();
            let cap = self.ready_cap();
            let next = {
                let mut ready = self.ready.borrow_mut();
                let next = ready.next(cap);
                self.waiting_gauge.set(ready.waiting() as f64);
                next
            };
            let Some(id) = next else {
                return;
            };
            if self.in_flight(id) {
                continue;
            }
            match self.shared.spool.envelope(id) {
                Ok(envelope) => self.dispatch(id, envelope),
                // Deleted by the operator while it waited.
                Err(SpoolError::NotFound(_)) => {}
                Err(e) => tracing::warn!(id = %id, "waiting message unreadable: {e}"),
            }
            glommio::yield_if_needed().await;
        }
    }
}
