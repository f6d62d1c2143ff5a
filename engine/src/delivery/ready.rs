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

    /// Message `id` is held in memory for delivery now: an attempt, or its MX
    /// hosts or filters being asked. Called at every insert into `attempts`
    /// or `resolving` (and `release_from_memory` at every removal), so the
    /// per-destination counts hold.
    pub(super) fn hold_in_memory(&self, id: MessageId, envelope: &Envelope) {
        self.ready.borrow_mut().enter(id, &destination(envelope));
    }

    /// Message `id` left memory (the counterpart of `hold_in_memory`).
    pub(super) fn release_from_memory(&self, id: MessageId) {
        if !self.in_flight(id) {
            self.ready.borrow_mut().leave(id);
        }
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

    /// The safety net under the pairing above: more messages counted as
    /// held than `attempts` and `resolving` hold means a removal missed
    /// `release_from_memory`. Forget those (logged), or their destination
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
