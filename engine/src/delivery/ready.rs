//! The memory bound on messages due now (`delivery.max_ready_messages`).
//!
//! A message being attempted is held in memory (its envelope, its jobs in the
//! site queues): about 2 KiB. When acceptance outruns delivery that backlog
//! would grow with the queue. Past this core's share of the bound, a message
//! due now (fresh from SMTP, or woken by its timer) waits as its id only, in
//! arrival order; as attempts end, the waiting ones are read back from the
//! spool and dispatched. Nothing is refused or lost: the spool holds them.

use std::rc::Rc;

use sluice_spool::{MessageId, SpoolError};

use super::{halted, throttle, CoreDelivery};

impl CoreDelivery {
    /// This core's share of `delivery.max_ready_messages` (0 = no bound).
    fn ready_cap(&self) -> usize {
        throttle::per_core_share(self.cfg().delivery.max_ready_messages, self.cores)
    }

    /// Messages this core holds in memory for delivery now.
    fn ready_in_memory(&self) -> usize {
        self.attempts.borrow().len() + self.resolving.borrow().len()
    }

    /// Message `id` is being attempted (or its MX hosts looked up) already.
    pub(super) fn in_flight(&self, id: MessageId) -> bool {
        self.attempts.borrow().contains_key(&id) || self.resolving.borrow().contains(&id)
    }

    /// True when message `id`, due now, must wait its turn (it is queued as
    /// its id): the bound is reached, or others already wait before it.
    pub(super) fn must_wait(&self, id: MessageId) -> bool {
        let cap = self.ready_cap();
        if cap == 0 {
            return false;
        }
        let mut waiting = self.waiting.borrow_mut();
        if waiting.is_empty() && self.ready_in_memory() < cap {
            return false;
        }
        waiting.push_back(id);
        self.waiting_gauge.set(waiting.len() as f64);
        true
    }

    /// An attempt ended: dispatch waiting messages while there is room. One
    /// task at a time does it, yielding between messages.
    pub(super) fn pump_waiting(self: &Rc<Self>) {
        if self.pumping.get() || self.waiting.borrow().is_empty() {
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
            let cap = self.ready_cap();
            let next = if cap == 0 || self.ready_in_memory() < cap {
                let mut waiting = self.waiting.borrow_mut();
                let next = waiting.pop_front();
                self.waiting_gauge.set(waiting.len() as f64);
                next
            } else {
                None
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
