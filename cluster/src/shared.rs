//! Shared limits on the sluice-cluster thread (docs/cluster.md "(b)"): the
//! handle the cores call ([`SharedLimits`]) and the task that answers them
//! on a connection of its own, with `synchronous_commit = off` (the tables
//! are UNLOGGED: an engine crash only resets the limits).
//!
//! * A connection slot per new outbound connection to a site
//!   (`sluice_take_slot`), renewed every third of `slot_lease` while the
//!   connection lives, deleted when it closes ([`Slot`]'s drop).
//! * Rate permits in leases of `n` (`sluice_take_permits`, GCRA on the
//!   engine's clock).
//! * The number of nodes up, for the lease size and the fallback share.
//! * Engine unreachable: every call answers `Unavailable` at once (no round
//!   trip) until a retry, at most once a second, gets through; `fallback` is
//!   set meanwhile and a warning logged at most once a minute.
//!
//! The cores never wait on this thread beyond `engine_timeout`: they
//! `try_send` the call and await the oneshot under a timer of their own.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use tracing::{info, warn};

use crate::engine::{self, Db};
use crate::limits::{FallbackShare, OncePer};
use crate::settings::SharedLimitSettings;
use crate::{ClusterError, Settings};

/// Calls waiting for the limits task; a full queue makes the core use its
/// local limit for that step (counted).
const CALL_QUEUE: usize = 4_096;
/// Most slots of one key (a limit above is taken as this).
pub const MAX_SLOTS: u32 = 10_000;
/// While the engine is unreachable, a call is tried again at most this often.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// The engine-unreachable warning: at most one per this.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// A shared rate as the engine keeps it: key, and `count` per `per_ms`.
#[derive(Debug, Clone)]
pub struct RateKey {
    pub key: String,
    pub count: u32,
    pub per_ms: u64,
}

pub(crate) enum Call {
    TakeSlot {
        key: String,
        limit: u32,
        reply: oneshot::Sender<SlotAnswer>,
    },
    Release {
        key: String,
        slot: i32,
    },
    Permits {
        rates: Vec<RateKey>,
        want: u32,
        reply: oneshot::Sender<PermitAnswer>,
    },
}

/// The answer to a slot call.
pub enum SlotAnswer {
    Taken(Slot),
    /// Every slot of the key is held (by this node or others).
    Full,
    /// The engine did not answer: local limits.
    Unavailable,
}

/// The answer to a permit call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermitAnswer {
    Granted(u32),
    /// None now: ask again after this long.
    Wait(Duration),
    Unavailable,
}

/// A connection slot held; dropping it gives it back.
pub struct Slot {
    key: String,
    slot: i32,
    tx: async_channel::Sender<Call>,
}

impl Slot {
    pub fn number(&self) -> i32 {
        self.slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let call = Call::Release {
            key: std::mem::take(&mut self.key),
            slot: self.slot,
        };
        // Not given back (queue full, thread gone): it frees after its lease.
        if self.tx.try_send(call).is_err() {
            metrics::counter!("sluice_cluster_limit_calls_total", "call" => "release", "result" => "dropped").increment(1);
        }
    }
}

/// What the cores hold of the shared limits.
pub struct SharedLimits {
    tx: async_channel::Sender<Call>,
    /// Set while the engine is unreachable: the local (fallback) limits rule.
    fallback: AtomicBool,
    /// Nodes up at the last look (at least 1).
    nodes_up: AtomicUsize,
    pub share: FallbackShare,
    /// How long a core waits for an answer.
    pub timeout: Duration,
    pub permit_lease: Duration,
}

impl SharedLimits {
    /// While true, the cores use the fallback limits and make no call.
    pub fn fallback(&self) -> bool {
        self.fallback.load(Ordering::Relaxed)
    }

    pub fn nodes_up(&self) -> usize {
        self.nodes_up.load(Ordering::Relaxed).max(1)
    }

    /// Asks for a slot of `key` below `limit`. None: not asked (queue full).
    pub fn take_slot(&self, key: &str, limit: usize) -> Option<oneshot::Receiver<SlotAnswer>> {
        let (reply, rx) = oneshot::channel();
        let limit = u32::try_from(limit)
            .unwrap_or(MAX_SLOTS)
            .clamp(1, MAX_SLOTS);
        self.call(Call::TakeSlot {
            key: key.to_string(),
            limit,
            reply,
        })
        .then_some(rx)
    }

    /// Asks for up to `want` permits of every rate (granted: the fewest).
    pub fn take_permits(
        &self,
        rates: Vec<RateKey>,
        want: u32,
    ) -> Option<oneshot::Receiver<PermitAnswer>> {
        let (reply, rx) = oneshot::channel();
        self.call(Call::Permits { rates, want, reply })
            .then_some(rx)
    }

    fn call(&self, c: Call) -> bool {
        match self.tx.try_send(c) {
            Ok(()) => true,
            Err(_) => {
                metrics::counter!("sluice_cluster_limit_calls_total", "call" => "any", "result" => "queue_full").increment(1);
                false
            }
        }
    }
}

/// Makes the handle and the task's receiver.
pub(crate) fn new(
    s: &Settings,
    l: &SharedLimitSettings,
) -> (Arc<SharedLimits>, async_channel::Receiver<Call>) {
    let (tx, rx) = async_channel::bounded(CALL_QUEUE);
    let h = Arc::new(SharedLimits {
        tx,
        fallback: AtomicBool::new(false),
        nodes_up: AtomicUsize::new(1),
        share: l.fallback_share,
        timeout: s.engine_timeout,
        permit_lease: l.permit_lease,
    });
    (h, rx)
}

struct Task {
    s: Settings,
    slot_lease: Duration,
    h: Arc<SharedLimits>,
    db: Db,
    /// The connection was set up (synchronous_commit off).
    ready: bool,
    /// This node's slots of an earlier run were deleted.
    cleaned: bool,
    /// Slots this node holds, renewed together.
    held: HashSet<(String, i32)>,
    /// Engine unreachable: no call before this.
    retry_at: Option<Instant>,
    warn: OncePer,
    origin: Instant,
}

/// The limits task: answers the cores' calls one at a time, renews the held
/// slots and counts the nodes up every third of the slot lease.
pub(crate) async fn run(
    s: Settings,
    l: SharedLimitSettings,
    h: Arc<SharedLimits>,
    rx: async_channel::Receiver<Call>,
) {
    let mut t = Task {
        slot_lease: l.slot_lease,
        db: Db::new(&s),
        s,
        h,
        ready: false,
        cleaned: false,
        held: HashSet::new(),
        retry_at: None,
        warn: OncePer::default(),
        origin: Instant::now(),
    };
    let tick = (t.slot_lease / 3).max(Duration::from_millis(100));
    let mut next_tick = Instant::now();
    loop {
        // First, so a steady stream of calls never starves the renewal.
        if Instant::now() >= next_tick {
            t.renew().await;
            next_tick = Instant::now() + tick;
        }
        let wait = next_tick.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Ok(call)) => t.answer(call).await,
            // Every handle is gone: the relay is stopping.
            Ok(Err(_)) => return,
            Err(_) => {}
        }
    }
}

/// Sets up a fresh connection: no synchronous commit, and (once per
/// process) this node's slots of an earlier run deleted — none of its
/// connections lived through the restart.
async fn prepare(c: &tokio_postgres::Client, me: &str, first: bool) -> Result<(), ClusterError> {
    c.execute("SET synchronous_commit = off", &[]).await?;
    if first {
        c.execute("DELETE FROM sluice_conn_slot WHERE node_id = $1", &[&me])
            .await?;
    }
    Ok(())
}

impl Task {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether a call may go to the engine now (not while it is known
    /// unreachable, except one retry a second).
    fn may_try(&self) -> bool {
        self.retry_at.is_none_or(|at| Instant::now() >= at)
    }

    fn failed(&mut self, what: &'static str, e: &ClusterError) {
        self.db.broken();
        self.ready = false;
        self.retry_at = Some(Instant::now() + RETRY_EVERY);
        if !self.h.fallback.swap(true, Ordering::Relaxed) {
            metrics::gauge!("sluice_cluster_limits_fallback").set(1.0);
        }
        if self.warn.due(self.now_ms(), WARN_EVERY) {
            warn!(target: "sluice::cluster", call = what, error = %e, share = ?self.h.share, nodes_up = self.h.nodes_up(),
                "cluster engine unreachable: shared limits fall back to local limits");
        }
    }

    fn succeeded(&mut self) {
        self.retry_at = None;
        if self.h.fallback.swap(false, Ordering::Relaxed) {
            metrics::gauge!("sluice_cluster_limits_fallback").set(0.0);
            info!(target: "sluice::cluster", "cluster engine reachable again: shared limits in force");
        }
    }

    async fn client(&mut self) -> Result<&mut tokio_postgres::Client, ClusterError> {
        let first = !self.ready;
        let clean = !self.cleaned;
        let me = self.s.node_id.clone();
        let c = self.db.client().await?;
        if first {
            prepare(c, &me, clean).await?;
        }
        self.ready = true;
        self.cleaned = true;
        Ok(c)
    }

    async fn answer(&mut self, call: Call) {
        match call {
            Call::TakeSlot { key, limit, reply } => {
                let answer = self.take_slot(key, limit).await;
                // The core gave up waiting: give the slot back at once.
                if let Err(SlotAnswer::Taken(slot)) = reply.send(answer) {
                    drop(slot);
                }
            }
            Call::Release { key, slot } => self.release(key, slot).await,
            Call::Permits { rates, want, reply } => {
                let _ = reply.send(self.permits(&rates, want).await);
            }
        }
    }

    async fn take_slot(&mut self, key: String, limit: u32) -> SlotAnswer {
        if !self.may_try() {
            return SlotAnswer::Unavailable;
        }
        let started = Instant::now();
        let me = self.s.node_id.clone();
        let lease_ms = i64::try_from(self.slot_lease.as_millis()).unwrap_or(i64::MAX);
        let limit_i = i32::try_from(limit).unwrap_or(i32::MAX);
        let timeout = self.s.engine_timeout;
        let r = engine::bounded(timeout, "slot", async {
            let c = self.client().await?;
            let row = c
                .query_one(
                    "SELECT sluice_take_slot($1, $2, $3, $4)",
                    &[&key, &limit_i, &me, &lease_ms],
                )
                .await?;
            Ok(row.try_get::<_, i32>(0)?)
        })
        .await;
        metrics::histogram!("sluice_cluster_limit_call_seconds", "call" => "slot")
            .record(started.elapsed().as_secs_f64());
        match r {
            Ok(slot) if slot >= 0 => {
                self.succeeded();
                metrics::counter!("sluice_cluster_limit_calls_total", "call" => "slot", "result" => "taken").increment(1);
                self.held.insert((key.clone(), slot));
                SlotAnswer::Taken(Slot {
                    key,
                    slot,
                    tx: self.h.tx.clone(),
                })
            }
            Ok(_) => {
                self.succeeded();
                metrics::counter!("sluice_cluster_limit_calls_total", "call" => "slot", "result" => "full").increment(1);
                SlotAnswer::Full
            }
            Err(e) => {
                metrics::counter!("sluice_cluster_limit_calls_total", "call" => "slot", "result" => "error").increment(1);
                self.failed("slot", &e);
                SlotAnswer::Unavailable
            }
        }
    }

    async fn release(&mut self, key: String, slot: i32) {
        if !self.held.remove(&(key.clone(), slot)) {
            return;
        }
        if !self.may_try() {
            // Frees after its lease.
            return;
        }
        let me = self.s.node_id.clone();
        let timeout = self.s.engine_timeout;
        let r = engine::bounded(timeout, "slot release", async {
            let c = self.client().await?;
            c.execute(
                "DELETE FROM sluice_conn_slot WHERE key = $1 AND slot = $2 AND node_id = $3",
                &[&key, &slot, &me],
            )
            .await?;
            Ok(())
        })
        .await;
        match r {
            Ok(()) => self.succeeded(),
            Err(e) => self.failed("slot release", &e),
        }
    }

    async fn permits(&mut self, rates: &[RateKey], want: u32) -> PermitAnswer {
        if !self.may_try() || rates.is_empty() {
            return PermitAnswer::Unavailable;
        }
        let started = Instant::now();
        let want_i = i32::try_from(want.max(1)).unwrap_or(i32::MAX);
        let timeout = self.s.engine_timeout;
        let r = engine::bounded(timeout, "permits", async {
            let c = self.client().await?;
            let mut granted = i32::MAX;
            let mut wait_us = 0i64;
            // Each rate of the destination is its own key; a message needs a
            // permit of each (the unused rest of a larger grant is lost:
            // the error is on the slow side).
            for r in rates {
                let (iv, win) = crate::limits::gcra_params(r.count, r.per_ms);
                let row = c
                    .query_one(
                        "SELECT granted, wait_us FROM sluice_take_permits($1, $2, $3, $4)",
                        &[&r.key, &iv, &win, &want_i],
                    )
                    .await?;
                granted = granted.min(row.try_get::<_, i32>(0)?);
                wait_us = wait_us.max(row.try_get::<_, i64>(1)?);
                if granted == 0 {
                    break;
                }
            }
            Ok((granted, wait_us))
        })
        .await;
        metrics::histogram!("sluice_cluster_limit_call_seconds", "call" => "permits")
            .record(started.elapsed().as_secs_f64());
        match r {
            Ok((g, _)) if g > 0 => {
                self.succeeded();
                metrics::counter!("sluice_cluster_limit_calls_total", "call" => "permits", "result" => "granted").increment(1);
                PermitAnswer::Granted(u32::try_from(g).unwrap_or(0))
            }
            Ok((_, wait_us)) => {
                self.succeeded();
                metrics::counter!("sluice_cluster_limit_calls_total", "call" => "permits", "result" => "wait").increment(1);
                let us = u64::try_from(wait_us).unwrap_or(1).max(1000);
                PermitAnswer::Wait(Duration::from_micros(us))
            }
            Err(e) => {
                metrics::counter!("sluice_cluster_limit_calls_total", "call" => "permits", "result" => "error").increment(1);
                self.failed("permits", &e);
                PermitAnswer::Unavailable
            }
        }
    }

    /// Every third of the slot lease: the held slots renewed, the nodes up
    /// counted (also the retry that ends a fallback when nothing else calls).
    async fn renew(&mut self) {
        if !self.may_try() {
            return;
        }
        let me = self.s.node_id.clone();
        let lease_ms = i64::try_from(self.slot_lease.as_millis()).unwrap_or(i64::MAX);
        let (keys, slots): (Vec<String>, Vec<i32>) = self.held.iter().cloned().unzip();
        let timeout = self.s.engine_timeout;
        let r = engine::bounded(timeout, "slot renewal", async {
            let c = self.client().await?;
            if !keys.is_empty() {
                c.execute(
                    "UPDATE sluice_conn_slot AS c
                       SET expires_at = clock_timestamp() + $4::int8 * interval '1 millisecond'
                      FROM unnest($2::text[], $3::int4[]) AS h(key, slot)
                     WHERE c.key = h.key AND c.slot = h.slot AND c.node_id = $1",
                    &[&me, &keys, &slots, &lease_ms],
                )
                .await?;
            }
            let up: i64 = c
                .query_one(
                    "SELECT count(*) FROM sluice_node WHERE state = 'up' AND lease_until > now()",
                    &[],
                )
                .await?
                .try_get(0)?;
            Ok(up)
        })
        .await;
        match r {
            Ok(up) => {
                self.succeeded();
                let up = usize::try_from(up).unwrap_or(1).max(1);
                self.h.nodes_up.store(up, Ordering::Relaxed);
                metrics::gauge!("sluice_cluster_nodes_up").set(up as f64);
            }
            Err(e) => self.failed("slot renewal", &e),
        }
    }
}
