//! Outbound delivery: destination-owned queues across cores.
//!
//! A message is followed through these files:
//!
//! * `scheduler.rs` — the **shard owner**. The core that owns a spool shard
//!   schedules that shard's messages: a timer set wakes them, it routes the open
//!   recipients (`routing.rs`) into jobs (`job.rs`), hands each job to the
//!   core that owns the job's site, merges the results and carries out what
//!   the ledger decides. Only this core writes the message. It also applies the
//!   per-queue message rate and concurrency at dispatch.
//! * `ready.rs` — the memory bound on messages due now
//!   (`delivery.max_ready_messages`): beyond this core's share, a message
//!   due now waits as its id only, and is read back from the spool as
//!   attempts end. `ready_lines.rs` decides who goes next: a line per
//!   destination served in turn, none holding more than half the share.
//! * `ledger.rs` — the decisions, **sans-IO**: whether a woken message is
//!   attempted (FUTURERELEASE, DELIVERBY, retry time), how recipients group
//!   into jobs, how results merge into the envelope, and what follows an
//!   attempt (retry, expiry, DELIVERBY, delay/failure/success notices, persist
//!   or remove) as a list of effects. Time is an argument; unit-tested with a
//!   manual clock.
//! * `site.rs` — the **site owner**. Every destination site (an MX domain, or a
//!   configured route's host, per source IP and EHLO name) hashes to one core,
//!   which holds its ready queue, connection count, rate limiters and idle
//!   connections, reads the body and runs the SMTP transaction
//!   (`outbound.rs`). Limits per site hold across cores without locks, and
//!   connections are reused for every message to that site whatever core
//!   accepted it. Idle sites are evicted.
//! * `mesh.rs` — jobs and results between cores over a glommio channel mesh, by
//!   value (envelope facts + message id), and the **host and source-IP
//!   owners**: with `delivery.max_connections_per_host` every host hashes to
//!   one core that hands out its connection slots; the same owner grants
//!   permits under the host's rates, and the owner of a sending address grants
//!   permits under `source_ip_rate` (a refusal carries the wait).
//! * `dane.rs` — when DANE (RFC 7672) applies to an MX host, and the rustls
//!   verifier that holds the server to its TLSA records (matching in
//!   `sluice_policy::dane`).
//! * `mta_sts.rs` — MTA-STS (RFC 8461): the `_mta-sts` TXT lookup, the policy
//!   fetched over HTTPS on a management thread, the cache (persisted in the
//!   spool directory), and what a policy does to a delivery (parsing and
//!   decisions in `sluice_policy::mta_sts`).
//! * `stage.rs` — the delivery stage: the receiving listener's filters asked
//!   before each attempt (issue 14), and what their verdict does.
//! * `pools.rs` — egress pools: the member of a rule's `[pool.NAME]` a
//!   message leaves from (weights, shaping suspensions, unavailable
//!   addresses, warm-up budgets persisted in `<spool.path>/warmup`).
//! * `notices.rs` — DSNs the ledger asks for, built and queued.
//! * `log.rs` — the delivery log (`sluice::delivery`).
//! * `admin.rs` — operator holds, suspensions and queue actions on this core.
//! * `shaping.rs` — response-driven shaping: replies feed the rules
//!   (`sluice_policy::shaping`) on the site's core, actions apply to the
//!   destination on every core and persist in `<spool.path>/shaping`; slow
//!   start of each site's concurrency.
//! * `throttle.rs`, `timing.rs` — limiters and the message's deadlines, both
//!   sans-IO.
//! * `tls_policy.rs` — which TLS policy a destination gets and why, and what a
//!   session under it may do (STARTTLS, clear text, proceed or defer), sans-IO.
//! * `tls_rpt.rs`, `tls_rpt_io.rs` — TLS reporting (RFC 8460): the record,
//!   result types, counters and reports (sans-IO), and the per-core counting,
//!   the store and the daily sending.

pub mod admin;
mod cluster_limits;
pub mod dane;
mod job;
pub mod ledger;
mod log;
mod mesh;
pub mod mta_sts;
mod notices;
pub mod outbound;
pub mod pools;
mod ready;
mod ready_lines;
mod rollup;
mod routing;
mod scheduler;
pub mod shaping;
mod site;
mod stage;
pub mod throttle;
pub mod timing;
pub mod tls_policy;
pub mod tls_rpt;
pub mod tls_rpt_io;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_channel::oneshot;
use glommio::channels::channel_mesh::{Receivers, Senders};
use glommio::timer::Timer;
use sluice_dns::Resolver;
use sluice_policy::MultiLimiter;
use sluice_spool::{Envelope, IdGenerator, MessageId, Spool};

use self::config::DeliveryConfig;
pub use self::job::{mx_set_key, rollup_key, JobRecipient, Outcome, Strategy, Target};
pub use self::ledger::is_open;
use self::ledger::Attempt;
pub use self::mesh::MeshMsg;
use self::outbound::OutboundTlsConfig;
pub use self::routing::{domain_of, route_recipient, MxHosts, Routed};
use self::site::Site;
use self::throttle::{HostTable, QueueConcurrency, SourceIpLimits};
pub use crate::config::delivery as config;
use crate::queue::{CoreQueue, Handoff};
pub use crate::time::now_ms;

/// Everything all cores share about delivery.
pub struct DeliveryShared {
    pub spool: Arc<Spool>,
    /// Routes, queues, destinations, hosts, source IPs, providers and the
    /// `[delivery]` limits; a reload stores a new snapshot (`reload.rs`) and
    /// readers load it where they decide (dispatch, a site's next step).
    pub cfg: Arc<arc_swap::ArcSwap<DeliveryConfig>>,
    pub hostname: String,
    pub ehlo_name: String,
    pub tls: OutboundTlsConfig,
    pub dns: sluice_dns::ResolverConfig,
    /// MTA-STS policies: the cache and the fetch thread (`mta_sts.rs`).
    pub mta_sts: Arc<mta_sts::MtaSts>,
    /// Shared with queue admission; replaced by a reload.
    pub rules: Arc<arc_swap::ArcSwap<sluice_policy::RuleSet>>,
    /// Command channels from the management API, one per core.
    pub admin: admin::AdminChannels,
    /// TLS reporting (`tls_rpt.enabled`): the store and settings.
    pub tls_rpt: Option<Arc<tls_rpt_io::RptShared>>,
    /// Listeners' filters asked before each attempt (`stage.rs`).
    pub stage_filters: crate::filters::delivery::DeliveryFiltersSwap,
    /// Cluster mode: no attempt starts once this node's lease ran out.
    pub lease: Option<Arc<sluice_cluster::LeaseClock>>,
    /// Cluster mode with `shared_limits`: connection slots and rate permits
    /// from the engine (`cluster_limits.rs`).
    pub limits: Option<Arc<sluice_cluster::shared::SharedLimits>>,
}

/// Delivery state of one core.
pub struct CoreDelivery {
    /// This core's own handle, for tasks it spawns from `&self` callers.
    me: std::rc::Weak<CoreDelivery>,
    core: u16,
    cores: usize,
    shared: Arc<DeliveryShared>,
    ids: Rc<IdGenerator>,
    senders: Senders<MeshMsg>,
    resolver: Resolver,
    attempts: RefCell<HashMap<MessageId, Attempt>>,
    /// Messages whose MX hosts are being looked up before routing (`match.mx`).
    resolving: RefCell<std::collections::HashSet<MessageId>>,
    timers: RefCell<BTreeSet<(u64, MessageId)>>,
    timer_wake: event_listener::Event,
    /// Messages held in memory for delivery, per destination, and those due
    /// now waiting for room under this core's share of
    /// `delivery.max_ready_messages`: ids only (8 bytes each, the envelope
    /// stays on disk), a line per destination, dispatched in turn as attempts
    /// end (`ready.rs`, `ready_lines.rs`).
    ready: RefCell<ready_lines::ReadyLines>,
    /// The waiting count as `sluice_delivery_waiting_messages{core}`.
    waiting_gauge: metrics::Gauge,
    /// A task is dispatching from `waiting`.
    pumping: Cell<bool>,
    sites: RefCell<HashMap<String, Rc<Site>>>,
    /// Site groups (MX rollup) by rollup key, while a site uses them.
    groups: RefCell<HashMap<String, std::rc::Weak<rollup::SiteGroup>>>,
    /// Shards this core schedules (its own, plus leftovers from runs with more cores).
    shards: Vec<u16>,
    /// This core's share of each queue's message rate (shard-owner side),
    /// with the configuration generation it was built under.
    queue_rates: RefCell<HashMap<String, (u64, MultiLimiter)>>,
    /// Host-owner side: slots of the hosts this core owns.
    hosts: RefCell<HostTable>,
    /// Requester side: host slot requests waiting for a grant.
    host_requests: RefCell<HashMap<u64, (String, oneshot::Sender<()>)>>,
    next_request: Cell<u64>,
    /// Source-IP-owner side: message rate limiters of the IPs this core owns.
    source_ips: RefCell<SourceIpLimits>,
    /// Requester side: permit requests waiting for an answer (the wait in ms).
    ip_requests: RefCell<HashMap<u64, oneshot::Sender<u64>>>,
    /// Host-owner side: connection and message rate limiters of the hosts this
    /// core owns (keys `throttle::host_rate_key`).
    host_rates: RefCell<SourceIpLimits>,
    /// Shard-owner side: jobs in flight per queue and messages held back by
    /// `[queue.X] concurrency`.
    queue_slots: RefCell<QueueConcurrency<MessageId>>,
    /// Set when the executor is about to stop: tasks dropped with it must not
    /// spawn anything (there is no executor left to run it).
    stopped: Cell<bool>,
    /// Operator holds and destination suspensions (`admin`).
    admin: admin::CoreAdmin,
    /// The way into the queue (notices are queued through it).
    queue: Rc<CoreQueue>,
}

impl CoreDelivery {
    pub fn new(
        core: u16,
        cores: usize,
        shared: Arc<DeliveryShared>,
        ids: Rc<IdGenerator>,
        senders: Senders<MeshMsg>,
        queue: Rc<CoreQueue>,
    ) -> Rc<CoreDelivery> {
        let shards = crate::queue::recovery::core_shards(shared.spool.shard_count(), core, cores);
        let d = Rc::new_cyclic(|me| CoreDelivery {
            me: me.clone(),
            core,
            cores,
            resolver: Resolver::new(shared.dns.clone()),
            hosts: RefCell::new(HostTable::new(
                shared.cfg.load().delivery.max_connections_per_host,
            )),
            shared,
            ids,
            senders,
            attempts: RefCell::new(HashMap::new()),
            resolving: RefCell::new(Default::default()),
            ready: RefCell::new(Default::default()),
            waiting_gauge: crate::metrics::ready_waiting(core),
            pumping: Cell::new(false),
            timers: RefCell::new(BTreeSet::new()),
            timer_wake: event_listener::Event::new(),
            sites: RefCell::new(HashMap::new()),
            groups: RefCell::new(HashMap::new()),
            shards,
            queue_rates: RefCell::new(HashMap::new()),
            host_requests: RefCell::new(HashMap::new()),
            next_request: Cell::new(0),
            source_ips: RefCell::new(SourceIpLimits::default()),
            ip_requests: RefCell::new(HashMap::new()),
            host_rates: RefCell::new(SourceIpLimits::default()),
            queue_slots: RefCell::new(QueueConcurrency::default()),
            stopped: Cell::new(false),
            admin: admin::CoreAdmin::default(),
            queue,
        });
        d.queue.set_handoff(crate::queue::weak_handoff(&d));
        d
    }

    /// The executor is stopping: attempts still in flight are abandoned (their
    /// recipients are still open in the spool, so they are retried after a
    /// restart) and nothing new is started.
    fn me(&self) -> Option<Rc<CoreDelivery>> {
        self.me.upgrade()
    }

    pub fn stop(&self) {
        self.stopped.set(true);
    }

    /// Starts the mesh receivers and the timer loop, and schedules every message
    /// of this core's shards found in the spool (recovery), counting them in the
    /// queue quotas.
    pub fn start(
        self: &Rc<Self>,
        mut receivers: Receivers<MeshMsg>,
    ) -> Result<sluice_spool::RecoveryReport, sluice_spool::SpoolError> {
        for (_peer, stream) in receivers.streams() {
            let me = self.clone();
            glommio::spawn_local(async move {
                while let Some(msg) = stream.recv().await {
                    me.on_mesh(msg);
                }
            })
            .detach();
        }
        let now = now_ms();
        let recovered = {
            let mut timers = self.timers.borrow_mut();
            // Messages with nothing open are scheduled too: the dispatch finds
            // nothing to do and removes them.
            crate::queue::recovery::recover(&self.queue, &self.shards, |id, env| {
                timers.insert((timing::wake_time(env, now), id));
            })?
        };
        let me = self.clone();
        glommio::spawn_local(async move { me.timer_loop().await }).detach();
        self.start_admin_commands();
        self.start_tls_rpt();
        Ok(recovered)
    }
}

impl Handoff for CoreDelivery {
    /// A message was just stored on this core (its shard): deliver it now.
    fn accepted(&self, id: MessageId, envelope: Envelope) {
        // The scheduler's methods take the Rc (they spawn tasks holding it).
        if let Some(me) = self.me() {
            if me.must_wait(id, &envelope) {
                // Stored; read back when its turn comes.
                return;
            }
            me.dispatch(id, envelope);
        }
    }
}

impl CoreDelivery {
    /// The delivery configuration in force: one atomic load. Not to be held
    /// across an await (take `shared.cfg.load_full()` for that).
    pub(super) fn cfg(&self) -> arc_swap::Guard<Arc<DeliveryConfig>> {
        self.shared.cfg.load()
    }

    /// How long an idle connection waits for another message, now.
    pub(super) fn idle_timeout(&self) -> Duration {
        self.cfg().delivery.idle_timeout.0
    }

    /// This core's resolver (shared with inbound verification: one cache).
    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }
}

impl crate::metrics::DeliveryGauges for CoreDelivery {
    fn dns_metrics(&self) -> sluice_dns::MetricsSnapshot {
        self.resolver.metrics()
    }
    fn site_backlog(&self) -> Vec<crate::metrics::SiteBacklog> {
        CoreDelivery::site_backlog(self)
    }
}

/// Runs a spool write of the delivery side until it commits. A full spool is
/// transient (removals and freed space end it), so the write is retried with
/// backoff rather than dropped: dropping a removal would send the message again
/// after a restart, dropping an update would forget the message until then.
/// Any other error means the spool failed closed (logged there); the message
/// stays on disk for the next start. False when it did not commit.
async fn persist<F, Fut>(id: MessageId, what: &str, mut write: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), sluice_spool::SpoolError>>,
{
    let mut wait = Duration::from_millis(100);
    let mut warned = false;
    loop {
        match write().await {
            Ok(()) => return true,
            Err(e) if e.is_full() => {
                if !warned {
                    tracing::warn!(id = %id, "{what}: spool full, retrying until it commits");
                    warned = true;
                }
                Timer::new(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::error!(id = %id, "{what} failed: {e}");
                return false;
            }
        }
    }
}

/// The envelope of a message the relay writes itself (a notice, a TLS report):
/// one recipient, no DSN of its own, arrived now on pseudo-listener `listener`.
fn generated_envelope(
    sender: String,
    to: &str,
    listener: &str,
    queue: String,
    body: &[u8],
    now: u64,
) -> Envelope {
    Envelope {
        sender,
        recipients: vec![sluice_spool::Recipient {
            address: to.to_string(),
            orcpt: None,
            notify: sluice_spool::Notify::NEVER,
            status: sluice_spool::RecipientStatus::Pending,
            local: false,
        }],
        ret: None,
        envid: None,
        body_type: if body.is_ascii() {
            sluice_spool::BodyType::SevenBit
        } else {
            sluice_spool::BodyType::EightBitMime
        },
        smtputf8: false,
        arrival_unix_ms: now,
        listener: listener.into(),
        client_ip: None,
        tls_request: sluice_spool::TlsRequest::Policy,
        tenant: None,
        header_facts: None,
        helo: String::new(),
        auth_user: None,
        tls: None,
        size: body.len() as u64,
        priority: 0,
        queue,
        hold_until_unix: 0,
        deliver_by: None,
        schedule: Default::default(),
    }
}

/// Why a message the relay wrote itself was not queued.
#[derive(Debug, thiserror::Error)]
enum GeneratedError {
    #[error("DKIM signing failed: {0}")]
    Signing(sluice_policy::dkim::DkimError),
    #[error("not queued (spool write failed)")]
    NotStored,
}

/// Queues a message the relay wrote itself the way SMTP mail goes: signed
/// once when a `[[dkim.rule]]` matches (never queued unsigned), stored with the
/// write retried through a full spool (`persist`, logged under `log_id`), then
/// counted and handed to delivery. The signers, for the log.
async fn queue_generated(
    queue: &CoreQueue,
    log_id: MessageId,
    id: MessageId,
    what: &str,
    mut envelope: Envelope,
    body: Vec<u8>,
) -> Result<String, GeneratedError> {
    let (body, signed) = queue.sign(&envelope, body).await;
    let signed = signed.map_err(GeneratedError::Signing)?;
    envelope.size += signed.prefix.len() as u64;
    let stored = persist(log_id, what, || {
        queue.store_prefixed(id, &envelope, signed.prefix.clone(), body.clone())
    })
    .await;
    if !stored {
        return Err(GeneratedError::NotStored);
    }
    queue.admitted(id, envelope);
    Ok(signed.signers)
}

/// Logs, once per process, that delivery stopped because the spool failed closed.
fn halted() {
    static LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::error!("spool failed closed: delivery stopped (restart once storage is repaired)");
    }
}
