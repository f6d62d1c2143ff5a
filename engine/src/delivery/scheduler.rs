//! The shard owner: schedules the messages of its spool shards. A timer set
//! `(due, id)` wakes messages; the ledger decides what each wake-up means; the
//! scheduler routes open recipients into jobs, hands them to the site owners,
//! merges their results and carries out the ledger's effects (notices,
//! persist, remove). It also applies the per-queue message rate and
//! concurrency at dispatch. Only this core writes the message.

use std::rc::Rc;
use std::time::Duration;

use glommio::timer::Timer;
use sluice_policy::MultiLimiter;
use sluice_spool::{Envelope, MessageId, Reply};

use super::job::{deferred_all, mx_set_key, rollup_key, site_key, Job, JobResult, Outcome, Target};
use super::ledger::{self, Admit, Attempt, Effect};
use super::mesh::{owner_of, MeshMsg};
use super::routing::{message_facts, MxHosts};
use super::{halted, now_ms, persist, throttle, CoreDelivery};

/// A dispatch held back by a run-out cluster lease is looked at again after this.
const LEASE_RECHECK_MS: u64 = 1_000;

impl CoreDelivery {
    /// Wakes each message when its time comes (retry, release, deadline) and
    /// dispatches it.
    pub(super) async fn timer_loop(self: Rc<Self>) {
        loop {
            let listener = self.timer_wake.listen();
            let now = now_ms();
            let next = self.timers.borrow().first().copied();
            match next {
                Some((due, id)) if due <= now => {
                    self.timers.borrow_mut().remove(&(due, id));
                    if self.in_flight(id) {
                        continue;
                    }
                    if self.shared.spool.is_failed() {
                        // Not even a read: the storage is suspect.
                        halted();
                        continue;
                    }
                    match self.shared.spool.envelope(id) {
                        // Its destination decides whether it waits for room.
                        Ok(env) if self.must_wait(id, &env) => {}
                        Ok(env) => self.dispatch(id, env),
                        Err(e) => tracing::warn!(id = %id, "scheduled message unreadable: {e}"),
                    }
                    // Let other tasks run between dispatches of a large backlog.
                    glommio::yield_if_needed().await;
                }
                _ => {
                    // Messages waiting for room (ready.rs) get a 1 s backstop
                    // in case no ending attempt wakes them.
                    let backstop = (self.waiting_count() > 0).then_some(1_000);
                    self.pump_waiting();
                    let wait_ms = match next {
                        Some((due, _)) => Some((due - now).min(backstop.unwrap_or(60_000))),
                        None => backstop,
                    };
                    match wait_ms {
                        Some(ms) => {
                            futures_lite::future::or(
                                async {
                                    Timer::new(Duration::from_millis(ms)).await;
                                },
                                listener,
                            )
                            .await;
                        }
                        None => listener.await,
                    }
                }
            }
        }
    }

    pub(super) fn schedule(&self, due: u64, id: MessageId) {
        let earliest = self.timers.borrow().first().map(|t| t.0);
        self.timers.borrow_mut().insert((due, id));
        if earliest.is_none_or(|e| due < e) {
            self.timer_wake.notify(1);
        }
    }

    /// This core's wait before another message of `queue` may go out; None = now
    /// (and it is counted).
    fn queue_rate_wait(&self, queue: &str, now: u64) -> Option<u64> {
        let cfg = self.cfg();
        let mut rates = self.queue_rates.borrow_mut();
        let Some(q) = cfg.queues.get(queue).filter(|q| !q.message_rate.is_empty()) else {
            // No rate (or no longer, after a reload).
            rates.remove(queue);
            return None;
        };
        let share = || {
            q.message_rate
                .iter()
                .map(|r| throttle::per_core_rate(*r, self.cores))
                .collect::<Vec<_>>()
        };
        let (generation, limiter) = rates
            .entry(queue.to_string())
            .or_insert_with(|| (cfg.generation, MultiLimiter::new(share())));
        if *generation != cfg.generation {
            // A reload: the new rate from the next permit, the spent tokens kept.
            limiter.retune(&share());
            *generation = cfg.generation;
        }
        limiter.try_acquire(now).err()
    }

    /// This core's share of the queue's concurrency (0 = no limit).
    fn queue_concurrency(&self, queue: &str) -> usize {
        self.cfg()
            .queues
            .get(queue)
            .map_or(0, |q| throttle::per_core_share(q.concurrency, self.cores))
    }

    /// Settles a message without sending anything (deadline handling, or
    /// nothing left open).
    pub(super) fn settle(self: &Rc<Self>, id: MessageId, envelope: Envelope) {
        let busy = self.admin_finalizing(id);
        let me = self.clone();
        glommio::spawn_local(async move {
            let _busy = busy;
            me.finalize(id, Attempt::new(envelope, 0, false)).await
        })
        .detach();
    }

    /// Groups the message's open recipients by target and sends each group to the
    /// site's owner.
    pub(super) fn dispatch(self: &Rc<Self>, id: MessageId, envelope: Envelope) {
        if self.shared.spool.is_failed() {
            // Failed closed: a delivery whose result cannot be recorded would be
            // sent again after the restart. The message stays on disk for then.
            halted();
            return;
        }
        if self.admin_held(id, &envelope) {
            // Held by the operator: nothing until released (which dispatches).
            return;
        }
        if let Some(lease) = &self.shared.lease {
            if !lease.allows(lease.now_ms()) {
                // Cluster mode, lease run out (engine unreachable, or this
                // node was frozen): another node may own the message now.
                // Look again after a heartbeat may have renewed it.
                return self.schedule(now_ms() + LEASE_RECHECK_MS, id);
            }
        }
        let now = now_ms();
        match ledger::admit(&envelope, now) {
            Admit::WakeAt(at) => return self.schedule(at, id),
            Admit::Settle => return self.settle(id, envelope),
            Admit::Attempt => {}
        }
        if let Some((filters, released)) = self.delivery_filters(id, &envelope) {
            // The listener's filters decide first (`stage.rs`).
            return self.delivery_stage(id, envelope, filters, released);
        }
        self.route(id, envelope, now);
    }

    /// Routes an admitted message: its MX hosts first when a rule needs them.
    pub(super) fn route(self: &Rc<Self>, id: MessageId, envelope: Envelope, now: u64) {
        // A rule matches on MX host names, or warm-up budgets count per
        // provider (known from the MX hosts).
        if self.shared.rules.load().uses_mx() || self.needs_mx_for_warmup() {
            // A rule matches on MX host names: look them up before routing.
            self.start_resolving(id, &envelope);
            let me = self.clone();
            glommio::spawn_local(async move {
                let mx = me.mx_hosts(&envelope).await;
                me.end_resolving(id);
                if !me.stopped.get() {
                    me.send_jobs(id, envelope, Some(&mx), now_ms());
                    me.pump_waiting();
                }
            })
            .detach();
            return;
        }
        self.send_jobs(id, envelope, None, now);
    }

    /// Warm-up schedules exist and providers are known: the MX hosts of a
    /// message's domains are looked up before routing so a warming member's
    /// budget counts per provider.
    fn needs_mx_for_warmup(&self) -> bool {
        let cfg = self.cfg();
        cfg.pools.any_warmup() && cfg.providers.names().next().is_some()
    }

    /// Routes the open recipients, groups them into jobs and sends each to its
    /// site's owner (after the queue's concurrency and rate allow it).
    fn send_jobs(
        self: &Rc<Self>,
        id: MessageId,
        envelope: Envelope,
        mx: Option<&MxHosts>,
        now: u64,
    ) {
        let (mut groups, unroutable) = {
            let facts = message_facts(&envelope);
            let rules = self.shared.rules.load();
            let dropping = crate::suppression::installed()
                .filter(|l| l.action() == sluice_policy::suppression::Action::Drop);
            let mut chosen = super::routing::PoolChoices::new();
            ledger::group(&envelope, |r| {
                // `[suppression] action = "drop"`: a suppressed recipient fails
                // here, without a connection.
                if let Some(entry) =
                    dropping.and_then(|l| l.check(&envelope.sender, &r.address, now))
                {
                    let (code, status, text) = entry.refusal();
                    crate::metrics::suppression_refused("drop");
                    crate::metrics::delivery_failure(
                        sluice_policy::bounce::BounceClass::Suppressed,
                        "failed",
                    );
                    return Err(sluice_spool::Reply::new(code, status, text));
                }
                self.target_for(
                    &facts,
                    envelope.tenant.as_deref(),
                    &rules,
                    r,
                    mx,
                    &mut chosen,
                )
            })
        };
        if crate::events::enabled() {
            failure_events(id, &envelope, &unroutable, now);
        }
        // Destinations suspended by the operator: their recipients wait; when
        // nothing else is to be done, wake at the suspension's end. Warm-up
        // reservations of the groups parked are given back.
        let reserved: Vec<String> = groups
            .iter()
            .filter_map(|(_, s, _, _)| s.warmup.clone())
            .collect();
        let parked = self.admin_park_suspended(id, &mut groups, now);
        for key in reserved {
            if !groups
                .iter()
                .any(|(_, s, _, _)| s.warmup.as_ref() == Some(&key))
            {
                super::pools::settle(&key, false, now);
            }
        }
        if let Some(until) = parked {
            if groups.is_empty() && unroutable.is_empty() {
                self.schedule(until, id);
                return;
            }
        }
        let me_peer = self.senders.peer_id();
        let per_tx = self.cfg().delivery.max_recipients_per_transaction;
        let mut jobs = ledger::jobs(id, me_peer, &envelope, groups, per_tx);
        super::pools::one_settlement_per_choice(&mut jobs);
        let outstanding = jobs.len() + usize::from(!unroutable.is_empty());
        if outstanding == 0 {
            // Nothing open (e.g. recovered after its last result was persisted).
            self.settle(id, envelope);
            return;
        }
        // The queue's concurrency: over it, the message waits for a job of its
        // queue to finish (no timer; `on_result` wakes it).
        let limit = self.queue_concurrency(&envelope.queue);
        if limit > 0
            && !self
                .queue_slots
                .borrow()
                .fits(&envelope.queue, limit, outstanding)
        {
            crate::metrics::throttled(crate::metrics::Throttle::QueueConcurrency);
            tracing::debug!(id = %id, queue = %envelope.queue, "queue concurrency: held");
            self.queue_slots.borrow_mut().hold(&envelope.queue, id);
            super::pools::release(jobs.iter().map(|j| &**j), now);
            return;
        }
        if let Some(wait) = self.queue_rate_wait(&envelope.queue, now) {
            crate::metrics::throttled(crate::metrics::Throttle::QueueRate);
            self.schedule(now + wait, id);
            super::pools::release(jobs.iter().map(|j| &**j), now);
            return;
        }
        if limit > 0 {
            self.queue_slots
                .borrow_mut()
                .start(&envelope.queue, outstanding);
        }
        self.start_attempt(id, Attempt::new(envelope, outstanding, true));
        if !unroutable.is_empty() {
            self.on_result(JobResult {
                id,
                outcomes: unroutable,
                remote_mta: None,
                peer_dsn: false,
                lmtp: false,
            });
        }
        // MX rollup: the site group of each job to a rolled-up domain is its
        // MX host set, which must be known before the owner core is.
        let rolled: Vec<String> = {
            let mut domains: Vec<String> = jobs
                .iter()
                .filter_map(|j| match &j.target {
                    Target::Mx { domain, .. } if self.cfg().rollup(domain) => Some(domain.clone()),
                    _ => None,
                })
                .collect();
            domains.sort();
            domains.dedup();
            domains
        };
        if rolled.is_empty() {
            return self.hand_out(jobs, &MxHosts::new());
        }
        if let Some(mx) = mx.filter(|m| rolled.iter().all(|d| m.contains_key(d))) {
            // Already looked up for the rules.
            return self.hand_out(jobs, mx);
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            let mut mx = MxHosts::new();
            for domain in rolled {
                let route = me.resolver.resolve_route(&domain).await;
                mx.insert(domain, route.hosts.into_iter().map(|h| h.name).collect());
            }
            if !me.stopped.get() {
                me.hand_out(jobs, &mx);
            }
        })
        .detach();
    }

    /// Sends each job to its site's owner core: the owner of its site group
    /// when the domain is rolled up (`mx` has its MX host names), else of
    /// its site.
    fn hand_out(self: &Rc<Self>, jobs: impl IntoIterator<Item = Box<Job>>, mx: &MxHosts) {
        let peers = self.senders.nr_consumers().max(1);
        let me_peer = self.senders.peer_id();
        for mut job in jobs {
            if let Target::Mx { domain, .. } = &job.target {
                if self.cfg().rollup(domain) {
                    job.rollup = mx
                        .get(domain)
                        .map(Vec::as_slice)
                        .and_then(mx_set_key)
                        .map(|set| rollup_key(&set, &job.target, &job.strategy));
                }
            }
            let id = job.id;
            let key = site_key(&job.target, &job.strategy);
            let owner = owner_of(job.rollup.as_deref().unwrap_or(&key), peers);
            tracing::debug!(id = %id, site = %key, owner, me = me_peer, "job dispatched");
            if owner == me_peer {
                self.enqueue(job);
            } else {
                let me = self.clone();
                // If the peer is gone (shutdown), defer instead of losing track.
                let fallback =
                    deferred_all(&job, Reply::new(451, "4.3.2", "delivery core unavailable"));
                let warmup = job.strategy.warmup.clone();
                glommio::spawn_local(async move {
                    if me.senders.send_to(owner, MeshMsg::Job(job)).await.is_err() {
                        if let Some(key) = warmup {
                            super::pools::settle(&key, false, now_ms());
                        }
                        me.on_result(fallback);
                    }
                })
                .detach();
            }
        }
    }

    /// Shard-owner side: merge a job's result; finalize when the attempt is complete.
    pub(super) fn on_result(self: &Rc<Self>, result: JobResult) {
        let id = result.id;
        let last = {
            let mut attempts = self.attempts.borrow_mut();
            let Some(attempt) = attempts.get_mut(&id) else {
                return;
            };
            count_outcomes(&attempt.envelope, &result.outcomes);
            let last = attempt.record(result);
            let limit = self.queue_concurrency(&attempt.envelope.queue);
            if limit > 0 {
                let woken = self
                    .queue_slots
                    .borrow_mut()
                    .finish(&attempt.envelope.queue, limit);
                let now = now_ms();
                for held in woken {
                    self.schedule(now, held);
                }
            }
            last
        };
        let done = if last { self.end_attempt(id) } else { None };
        if let Some(attempt) = done {
            self.pump_waiting();
            let me = self.clone();
            let busy = self.admin_finalizing(id);
            glommio::spawn_local(async move {
                let _busy = busy;
                me.finalize(id, attempt).await
            })
            .detach();
        }
    }

    /// All results of an attempt are in (or none was made): carries out what
    /// the ledger decides (notices, then persist and reschedule, or remove).
    pub(super) async fn finalize(self: Rc<Self>, id: MessageId, attempt: Attempt) {
        let now = now_ms();
        let queue = self.cfg().queue(&attempt.envelope.queue);
        let (mut envelope, effects) = ledger::finalize(attempt, &queue, now);
        for effect in effects {
            match effect {
                Effect::GaveUp { index, .. } => {
                    crate::metrics::queue(&envelope.queue).expired.increment(1);
                    self.log_gave_up(id, &envelope, index, now);
                }
                Effect::Notify {
                    kind,
                    notices,
                    retry_until,
                } => self.notify(&envelope, id, kind, notices, retry_until).await,
                Effect::Remove => {
                    if persist(id, "removing a finished message", || {
                        self.shared.spool.remove(id)
                    })
                    .await
                    {
                        self.queue.removed(&envelope);
                        self.log_removed(id, &envelope, now);
                    }
                }
                Effect::Persist { wake_at } => {
                    self.admin_apply_hold(id, &mut envelope);
                    if persist(id, "persisting delivery state", || {
                        self.shared.spool.update(id, &envelope)
                    })
                    .await
                    {
                        self.schedule(wake_at, id);
                    }
                }
            }
        }
    }
}

/// Counts a job's per-recipient outcomes in the queue's metrics; delivered
/// ones also give their end-to-end delay.
pub(super) fn count_outcomes(envelope: &Envelope, outcomes: &[(u32, Outcome)]) {
    let q = crate::metrics::queue(&envelope.queue);
    let now = now_ms();
    for (_, outcome) in outcomes {
        match outcome {
            Outcome::Delivered(_) => {
                q.delivered.increment(1);
                crate::metrics::delivered_after(
                    now.saturating_sub(envelope.arrival_unix_ms) as f64 / 1000.0,
                );
            }
            Outcome::Deferred(_) => q.deferred.increment(1),
            Outcome::Failed(_) => q.bounced.increment(1),
        }
    }
}

/// Recipients that failed or were deferred without a connection (at routing,
/// an operator's bounce, the delivery stage's filters): a suppression event
/// for those the suppression list dropped, a deferral event for deferrals, a
/// bounce event for the others.
pub(super) fn failure_events(
    id: MessageId,
    envelope: &Envelope,
    unroutable: &[(u32, Outcome)],
    now: u64,
) {
    use crate::events::{Event, EventReply, Kind};
    for (index, outcome) in unroutable {
        let reply = outcome.reply();
        let class = crate::bounce::classify(reply);
        let kind = match outcome {
            Outcome::Deferred(_) => Kind::Deferral,
            _ if class == sluice_policy::bounce::BounceClass::Suppressed => Kind::Suppression,
            _ => Kind::Bounce,
        };
        let mut e = Event::new(kind, now, &envelope.sender);
        e.id = Some(id.to_string());
        e.recipient = envelope
            .recipients
            .get(*index as usize)
            .map(|r| r.address.clone());
        e.size = Some(envelope.size);
        e.queue = Some(envelope.queue.clone());
        e.reply = Some(EventReply::from(reply));
        e.class = Some(class.as_str().to_string());
        e.attempt = Some(envelope.schedule.attempts + 1);
        crate::events::emit(e);
    }
}
