//! Outbound delivery: destination-owned queues across cores.
//!
//! Two roles live on every core:
//!
//! * **Shard owner.** The core that owns a spool shard schedules that shard's
//!   messages: it decides each recipient's route, hands jobs to the cores that own
//!   the destination sites, merges their results into the envelope, persists it
//!   (through the shard's writer, group-committed), schedules retries, expires,
//!   sends DSNs and removes finished messages. Only this core writes the message.
//!   It also applies the per-queue message rate at dispatch and the FUTURERELEASE
//!   and DELIVERBY times of the message, and the per-queue concurrency (its
//!   share, ceil(limit / cores), of jobs in flight; held messages wait for a
//!   job of their queue to finish).
//! * **Site owner.** Every destination site (an MX domain, or a configured route's
//!   host, per source IP and EHLO name) hashes to exactly one core, which holds its
//!   ready queue, its connection count, its rate limiters and its idle
//!   connections. Limits per site therefore hold across all cores without locks,
//!   and connections are reused for every message to that site whatever core
//!   accepted it.
//! * **Host owner.** With `delivery.max_connections_per_host`, every destination
//!   host also hashes to one core, which hands out its connection slots over the
//!   mesh (several sites may share a host), so that limit is exact too. The
//!   same owner grants connection and message permits under the host's rates
//!   (`delivery.host_connection_rate`, `host_message_rate`, `[host."NAME"]`).
//! * **Source-IP owner.** With `delivery.source_ip_rate` (or `[source_ip."IP"]
//!   message_rate`), every sending address hashes to one core, which keeps its
//!   message rate limiter and grants a permit per message over the mesh; a
//!   refusal carries the wait, and the connection sleeps it and asks again.
//!
//! Jobs and results travel between cores over a glommio channel mesh by value
//! (envelope facts + message id); the site owner reads the body from the shard's
//! LMDB environment directly (readers are safe across threads).

pub mod admin;
pub mod config;
pub mod outbound;
pub mod quota;
pub mod throttle;
pub mod timing;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_channel::oneshot;
use glommio::channels::channel_mesh::{Receivers, Senders};
use glommio::timer::Timer;
use sluice_dns::{QueryType, Record, Resolver, RouteError};
use sluice_policy::MultiLimiter;
use sluice_spool::{Envelope, IdGenerator, MessageId, Notify, RecipientStatus, Ret, Spool};

use self::config::{DeliveryConfig, OutboundTls, RouteConfig, RouteKind};
use self::outbound::{Connection, Endpoint, OutboundTlsConfig, SessionFailure};
use self::quota::QueueStats;
use self::throttle::{HostRate, HostTable, QueueConcurrency, SiteThrottle, SourceIpLimits, Waiter};
use self::timing::ByState;
use crate::dsn::{DsnAction, DsnKind};
use crate::smtp::client::{OutboundMessage, OutboundRecipient, Reply};
pub use crate::time::now_ms;

/// Everything all cores share about delivery.
pub struct DeliveryShared {
    pub spool: Arc<Spool>,
    pub cfg: DeliveryConfig,
    pub hostname: String,
    pub ehlo_name: String,
    pub tls: OutboundTlsConfig,
    pub dns: sluice_dns::ResolverConfig,
    /// Shared with queue admission; replaced by a reload.
    pub rules: Arc<arc_swap::ArcSwap<sluice_policy::RuleSet>>,
    /// Per-queue message and byte counts (quotas), updated by shard owners.
    pub queue_stats: Arc<QueueStats>,
    /// Command channels from the management API, one per core.
    pub admin: admin::AdminChannels,
}

/// Where a group of recipients goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The recipient domain's MX hosts.
    Mx {
        domain: String,
        port: u16,
        tls: OutboundTls,
    },
    /// A configured host (smart host or local store).
    Host {
        route: String,
        host: String,
        port: u16,
        lmtp: bool,
        tls: OutboundTls,
        auth: Option<(String, String)>,
    },
}

impl Target {
    /// The destination's name: the domain, or "route:NAME". `[destination.*]`
    /// settings are looked up by it.
    fn destination(&self) -> String {
        match self {
            Target::Mx { domain, .. } => domain.clone(),
            Target::Host { route, .. } => format!("route:{route}"),
        }
    }
}

/// How connections are made (rules' `source_ip` and `ehlo_name`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Strategy {
    pub source_ip: Option<IpAddr>,
    pub ehlo_name: Option<String>,
}

/// The site key: destination plus connection strategy, since a connection from
/// one source address cannot carry mail meant to leave from another.
fn site_key(target: &Target, strategy: &Strategy) -> String {
    let base = target.destination();
    if strategy.source_ip.is_none() && strategy.ehlo_name.is_none() {
        return base;
    }
    format!(
        "{base}|{}|{}",
        strategy
            .source_ip
            .map(|ip| ip.to_string())
            .unwrap_or_default(),
        strategy.ehlo_name.as_deref().unwrap_or("")
    )
}

#[derive(Debug, Clone)]
pub struct JobRecipient {
    pub index: u16,
    pub address: String,
    pub notify: Option<String>,
    pub orcpt: Option<String>,
}

/// Recipients of one message for one site, sent to the site's owner.
#[derive(Debug)]
pub struct Job {
    pub id: MessageId,
    /// Mesh peer to send the result to (the shard owner).
    pub reply_to: usize,
    pub target: Target,
    pub strategy: Strategy,
    /// Route name that chose the target (after any fallback), for the log.
    pub route: String,
    /// Virtual queue of the message, for the log.
    pub queue: String,
    pub recipients: Vec<JobRecipient>,
    pub sender: String,
    pub priority: i16,
    pub size: u64,
    pub eightbit: bool,
    pub smtputf8: bool,
    pub ret: Option<&'static str>,
    pub envid: Option<String>,
    pub attempt: u32,
    pub arrival_unix_ms: u64,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Delivered(String),
    Deferred(String),
    Failed(String),
}

impl Outcome {
    fn of(reply: &Reply) -> Outcome {
        let text = reply.to_string();
        match reply.class() {
            2 => Outcome::Delivered(text),
            5 => Outcome::Failed(text),
            _ => Outcome::Deferred(text),
        }
    }
}

#[derive(Debug)]
pub struct JobResult {
    pub id: MessageId,
    pub outcomes: Vec<(u16, Outcome)>,
    /// For DSNs: "dns; mx.example.com" of the host that answered, if any.
    pub remote_mta: Option<String>,
    /// The next hop offered DSN (NOTIFY was passed on with each RCPT).
    pub peer_dsn: bool,
    /// The next hop was an LMTP store (final delivery).
    pub lmtp: bool,
}

#[derive(Debug)]
pub enum MeshMsg {
    Job(Box<Job>),
    Result(JobResult),
    /// To a host's owner: a connection slot for `host`, answered by HostGrant.
    HostAcquire {
        host: String,
        from: usize,
        req: u64,
    },
    /// From a host's owner: request `req` holds a slot now.
    HostGrant {
        req: u64,
    },
    /// To a host's owner: a slot of `host` is given back.
    HostRelease {
        host: String,
    },
    /// To a source IP's owner: a permit to send one message from `ip` (a
    /// source IP key), answered by IpPermitReply.
    IpPermit {
        ip: String,
        from: usize,
        req: u64,
    },
    /// To a host's owner: a permit for one connection or one message to `host`
    /// under its rates, answered by IpPermitReply.
    HostPermit {
        host: String,
        kind: HostRate,
        from: usize,
        req: u64,
    },
    /// From a source IP's (or host's) owner: 0 = granted, else ask again after
    /// this many ms.
    IpPermitReply {
        req: u64,
        wait_ms: u64,
    },
}

/// A message with jobs out, waiting for their results (shard-owner side).
struct Attempt {
    envelope: Envelope,
    outstanding: usize,
    /// False when no job went out (deadline handling, nothing open).
    attempted: bool,
    remote_mta: Option<String>,
    /// Recipients that failed permanently in this attempt (each is notified once).
    newly_failed: Vec<usize>,
    /// Recipients delivered to a next hop that could not take over their
    /// NOTIFY=SUCCESS: (index, action) of the success notice we owe.
    success: Vec<(usize, DsnAction)>,
}

impl Attempt {
    fn new(envelope: Envelope, outstanding: usize, attempted: bool) -> Attempt {
        Attempt {
            envelope,
            outstanding,
            attempted,
            remote_mta: None,
            newly_failed: Vec::new(),
            success: Vec::new(),
        }
    }
}

/// Site-owner side: one destination (per connection strategy).
struct Site {
    key: String,
    target: Target,
    strategy: Strategy,
    /// Key of the sending address (`config::source_ip_key`).
    ip_key: String,
    max_connections: usize,
    max_per_connection: usize,
    throttle: RefCell<SiteThrottle>,
    queue: RefCell<BinaryHeap<Queued>>,
    active: Cell<usize>,
    idle: Cell<usize>,
    wake: event_listener::Event,
    seq: Cell<u64>,
}

struct Queued {
    priority: i16,
    seq: u64,
    job: Box<Job>,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        self.priority == other.priority && self.seq == other.seq
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    /// Max-heap: higher priority first, then earlier arrival (lower seq).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

/// FNV-1a: a stable hash so every core maps a site (or host) to the same owner.
fn site_owner(site: &str, peers: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in site.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % peers.max(1) as u64) as usize
}

/// A connection slot on a destination host; given back to the host's owner
/// when dropped.
struct HostSlot {
    host: String,
    core: Rc<CoreDelivery>,
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        let host = std::mem::take(&mut self.host);
        self.core.release_host(host);
    }
}

/// An open connection and the host slot it holds.
struct Open {
    conn: Connection,
    _slot: Option<HostSlot>,
    /// The host (`throttle::host_key`), when it has a message rate.
    rated_host: Option<String>,
    /// Messages this connection may carry (site and host limits).
    max_messages: usize,
}

/// What a success/failure/delay notice says about one recipient.
struct Notice {
    index: usize,
    action: DsnAction,
    /// Enhanced status to report instead of the one in the recipient's reply.
    status: Option<&'static str>,
}

/// Delivery state of one core.
pub struct CoreDelivery {
    core: u16,
    cores: usize,
    shared: Arc<DeliveryShared>,
    ids: Rc<IdGenerator>,
    senders: Senders<MeshMsg>,
    resolver: Resolver,
    attempts: RefCell<HashMap<MessageId, Attempt>>,
    timers: RefCell<BTreeSet<(u64, MessageId)>>,
    timer_wake: event_listener::Event,
    sites: RefCell<HashMap<String, Rc<Site>>>,
    /// Shards this core schedules (its own, plus leftovers from runs with more cores).
    shards: Vec<u16>,
    /// This core's share of each queue's message rate (shard-owner side).
    queue_rates: RefCell<HashMap<String, MultiLimiter>>,
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
}

impl CoreDelivery {
    pub fn new(
        core: u16,
        cores: usize,
        shared: Arc<DeliveryShared>,
        ids: Rc<IdGenerator>,
        senders: Senders<MeshMsg>,
    ) -> Rc<CoreDelivery> {
        let shard_count = shared.spool.shard_count();
        let shards = (0..shard_count)
            .filter(|s| (*s as usize) % cores == core as usize)
            .collect();
        Rc::new(CoreDelivery {
            core,
            cores,
            resolver: Resolver::new(shared.dns.clone()),
            hosts: RefCell::new(HostTable::new(shared.cfg.delivery.max_connections_per_host)),
            shared,
            ids,
            senders,
            attempts: RefCell::new(HashMap::new()),
            timers: RefCell::new(BTreeSet::new()),
            timer_wake: event_listener::Event::new(),
            sites: RefCell::new(HashMap::new()),
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
        })
    }

    /// The executor is stopping: attempts still in flight are abandoned (their
    /// recipients are still open in the spool, so they are retried after a
    /// restart) and nothing new is started.
    pub fn stop(&self) {
        self.stopped.set(true);
    }

    /// For the metrics: this core's resolver counters.
    pub fn dns_metrics(&self) -> sluice_dns::MetricsSnapshot {
        self.resolver.metrics()
    }

    /// For the metrics: (destination, jobs, bytes) waiting at the sites this
    /// core owns, for those with any.
    pub fn site_backlog(&self) -> Vec<crate::metrics::SiteBacklog> {
        self.sites
            .borrow()
            .values()
            .filter_map(|s| {
                let queue = s.queue.borrow();
                (!queue.is_empty()).then(|| {
                    let bytes = queue.iter().map(|q| q.job.size).sum();
                    (s.target.destination(), queue.len() as u64, bytes)
                })
            })
            .collect()
    }

    /// Starts the mesh receivers and the timer loop, and schedules every message
    /// of this core's shards found in the spool (recovery), counting them in the
    /// queue quotas.
    pub fn start(
        self: &Rc<Self>,
        mut receivers: Receivers<MeshMsg>,
    ) -> Result<usize, sluice_spool::SpoolError> {
        for (_peer, stream) in receivers.streams() {
            let me = self.clone();
            glommio::spawn_local(async move {
                while let Some(msg) = stream.recv().await {
                    me.on_mesh(msg);
                }
            })
            .detach();
        }
        let mut scheduled = 0;
        let now = now_ms();
        let stats = &self.shared.queue_stats;
        for &shard in &self.shards {
            let mut timers = self.timers.borrow_mut();
            self.shared.spool.list_shard(shard, |id, env| {
                stats.add(self.core as usize, &env.queue, env.size);
                // Messages with nothing open are scheduled too: the dispatch
                // finds nothing to do and removes them.
                timers.insert((timing::wake_time(env, now), id));
                scheduled += 1;
                true
            })?;
        }
        let me = self.clone();
        glommio::spawn_local(async move { me.timer_loop().await }).detach();
        self.start_admin_commands();
        Ok(scheduled)
    }

    fn on_mesh(self: &Rc<Self>, msg: MeshMsg) {
        match msg {
            MeshMsg::Job(job) => self.enqueue(job),
            MeshMsg::Result(result) => self.on_result(result),
            MeshMsg::HostAcquire { host, from, req } => {
                self.host_acquire(host, Waiter { peer: from, req })
            }
            MeshMsg::HostGrant { req } => self.host_granted(req),
            MeshMsg::HostRelease { host } => self.host_released(&host),
            MeshMsg::IpPermit { ip, from, req } => self.ip_permit_asked(&ip, from, req),
            MeshMsg::HostPermit {
                host,
                kind,
                from,
                req,
            } => {
                let wait = self.host_rate_wait(&host, kind);
                self.permit_reply(from, req, wait);
            }
            MeshMsg::IpPermitReply { req, wait_ms } => self.ip_permit_answered(req, wait_ms),
        }
    }

    /// A message was just accepted on this core (its shard): deliver it now.
    pub fn accepted(self: &Rc<Self>, id: MessageId, envelope: Envelope) {
        self.dispatch(id, envelope);
    }

    async fn timer_loop(self: Rc<Self>) {
        loop {
            let listener = self.timer_wake.listen();
            let now = now_ms();
            let next = self.timers.borrow().first().copied();
            match next {
                Some((due, id)) if due <= now => {
                    self.timers.borrow_mut().remove(&(due, id));
                    if self.attempts.borrow().contains_key(&id) {
                        continue;
                    }
                    if self.shared.spool.is_failed() {
                        // Not even a read: the storage is suspect.
                        halted();
                        continue;
                    }
                    match self.shared.spool.envelope(id) {
                        Ok(env) => self.dispatch(id, env),
                        Err(e) => tracing::warn!(id = %id, "scheduled message unreadable: {e}"),
                    }
                    // Let other tasks run between dispatches of a large backlog.
                    glommio::yield_if_needed().await;
                }
                Some((due, _)) => {
                    let wait = Duration::from_millis((due - now).min(60_000));
                    futures_lite::future::or(
                        async {
                            Timer::new(wait).await;
                        },
                        listener,
                    )
                    .await;
                }
                None => listener.await,
            }
        }
    }

    fn schedule(&self, due: u64, id: MessageId) {
        let earliest = self.timers.borrow().first().map(|t| t.0);
        self.timers.borrow_mut().insert((due, id));
        if earliest.is_none_or(|e| due < e) {
            self.timer_wake.notify(1);
        }
    }

    /// This core's wait before another message of `queue` may go out; None = now
    /// (and it is counted).
    fn queue_rate_wait(&self, queue: &str, now: u64) -> Option<u64> {
        let cfg = self.shared.cfg.queues.get(queue)?;
        if cfg.message_rate.is_empty() {
            return None;
        }
        let mut rates = self.queue_rates.borrow_mut();
        let limiter = rates.entry(queue.to_string()).or_insert_with(|| {
            MultiLimiter::new(
                cfg.message_rate
                    .iter()
                    .map(|r| throttle::per_core_rate(*r, self.cores))
                    .collect(),
            )
        });
        limiter.try_acquire(now).err()
    }

    /// This core's share of the queue's concurrency (0 = no limit).
    fn queue_concurrency(&self, queue: &str) -> usize {
        self.shared
            .cfg
            .queues
            .get(queue)
            .map_or(0, |q| throttle::per_core_share(q.concurrency, self.cores))
    }

    /// Settles a message without sending anything (deadline handling, or
    /// nothing left open).
    fn settle(self: &Rc<Self>, id: MessageId, envelope: Envelope) {
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
    fn dispatch(self: &Rc<Self>, id: MessageId, envelope: Envelope) {
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
        let now = now_ms();
        let held = timing::held_until_ms(&envelope);
        if held > now {
            self.schedule(held, id);
            return;
        }
        // Woken for a DELIVERBY deadline before the next retry is due, or the
        // deadline of an R-mode request has passed: no attempt now.
        let by = timing::deliver_by_state(&envelope, now);
        if by == ByState::Return
            || (envelope.schedule.next_attempt_unix_ms > now && has_pending(&envelope))
        {
            self.settle(id, envelope);
            return;
        }
        let mut groups: Vec<(Target, Strategy, String, Vec<JobRecipient>)> = Vec::new();
        let mut unroutable = Vec::new();
        for (i, r) in envelope.recipients.iter().enumerate() {
            if !is_open(&r.status) {
                continue;
            }
            match self.target_for(&envelope, r) {
                Ok((route, t, strategy)) => {
                    let jr = JobRecipient {
                        index: i as u16,
                        address: r.address.clone(),
                        notify: notify_keywords(r.notify),
                        orcpt: r.orcpt.clone(),
                    };
                    match groups
                        .iter_mut()
                        .find(|(gt, gs, gr, _)| *gt == t && *gs == strategy && *gr == route)
                    {
                        Some((_, _, _, list)) => list.push(jr),
                        None => groups.push((t, strategy, route, vec![jr])),
                    }
                }
                Err(reply) => unroutable.push((i as u16, Outcome::Failed(reply))),
            }
        }
        // Destinations suspended by the operator: their recipients wait; when
        // nothing else is to be done, wake at the suspension's end.
        if let Some(until) = self.admin_park_suspended(id, &mut groups, now) {
            if groups.is_empty() && unroutable.is_empty() {
                self.schedule(until, id);
                return;
            }
        }
        let peers = self.senders.nr_consumers().max(1);
        let me_peer = self.senders.peer_id();
        let per_tx = self
            .shared
            .cfg
            .delivery
            .max_recipients_per_transaction
            .max(1);
        let mut jobs = Vec::new();
        for (target, strategy, route, rcpts) in groups {
            for chunk in rcpts.chunks(per_tx) {
                jobs.push(Box::new(Job {
                    id,
                    reply_to: me_peer,
                    target: target.clone(),
                    strategy: strategy.clone(),
                    route: route.clone(),
                    queue: envelope.queue.clone(),
                    recipients: chunk.to_vec(),
                    sender: envelope.sender.clone(),
                    priority: envelope.priority,
                    size: envelope.size,
                    eightbit: envelope.body_type != sluice_spool::BodyType::SevenBit,
                    smtputf8: envelope.smtputf8,
                    ret: envelope.ret.map(|r| match r {
                        Ret::Full => "FULL",
                        Ret::Headers => "HDRS",
                    }),
                    envid: envelope.envid.clone(),
                    attempt: envelope.schedule.attempts + 1,
                    arrival_unix_ms: envelope.arrival_unix_ms,
                }));
            }
        }
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
            return;
        }
        if let Some(wait) = self.queue_rate_wait(&envelope.queue, now) {
            crate::metrics::throttled(crate::metrics::Throttle::QueueRate);
            self.schedule(now + wait, id);
            return;
        }
        if limit > 0 {
            self.queue_slots
                .borrow_mut()
                .start(&envelope.queue, outstanding);
        }
        self.attempts
            .borrow_mut()
            .insert(id, Attempt::new(envelope, outstanding, true));
        for job in jobs {
            let key = site_key(&job.target, &job.strategy);
            let owner = site_owner(&key, peers);
            tracing::debug!(id = %id, site = %key, owner, me = me_peer, "job dispatched");
            if owner == me_peer {
                self.enqueue(job);
            } else {
                let me = self.clone();
                // If the peer is gone (shutdown), defer instead of losing track.
                let fallback = deferred_all(&job, "451 4.3.2 delivery core unavailable");
                glommio::spawn_local(async move {
                    if me.senders.send_to(owner, MeshMsg::Job(job)).await.is_err() {
                        me.on_result(fallback);
                    }
                })
                .detach();
            }
        }
        if !unroutable.is_empty() {
            self.on_result(JobResult {
                id,
                outcomes: unroutable,
                remote_mta: None,
                peer_dsn: false,
                lmtp: false,
            });
        }
    }

    /// Route, target and connection strategy for one recipient: the first
    /// matching `[[rule]]` decides; local domains go to the "local" route when one
    /// is configured; a route's fallback takes over after `fallback_after`
    /// deferrals of this recipient.
    fn target_for(
        &self,
        envelope: &Envelope,
        recipient: &sluice_spool::Recipient,
    ) -> Result<(String, Target, Strategy), String> {
        let cfg = &self.shared.cfg;
        let client_ip = envelope
            .client_ip
            .parse()
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let facts = sluice_policy::MessageFacts {
            listener: &envelope.listener,
            client_ip,
            auth_user: envelope.auth_user.as_deref(),
            sender: &envelope.sender,
            priority: envelope.priority,
            size: envelope.size,
        };
        let rules = self.shared.rules.load();
        let decision = rules.evaluate(&facts, &recipient.address, None);
        // Without a deciding rule: local domains take the "local" route and the
        // rest the "default" route, when those are configured; else MX.
        let chosen = match decision.rule {
            Some(_) => decision.route.as_str(),
            None if recipient.local && cfg.routes.contains_key("local") => "local",
            None if cfg.routes.contains_key("default") => "default",
            None => decision.route.as_str(),
        };
        let deferrals = match &recipient.status {
            RecipientStatus::Deferred { attempts, .. } => *attempts,
            _ => 0,
        };
        let route_name = cfg.effective_route(chosen, deferrals);
        let strategy = Strategy {
            source_ip: decision.source_ip,
            ehlo_name: decision.ehlo_name.clone(),
        };
        let target = match cfg.routes.get(route_name) {
            Some(route) if route.kind != RouteKind::Mx => {
                host_target(route_name, route, cfg.delivery.tls)?
            }
            route => {
                let domain = recipient
                    .address
                    .rsplit_once('@')
                    .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase())
                    .unwrap_or_default();
                if domain.is_empty() {
                    return Err("550 5.1.2 recipient has no domain to route to".into());
                }
                Target::Mx {
                    domain,
                    port: route.and_then(|r| r.port).unwrap_or(cfg.delivery.mx_port),
                    tls: route.and_then(|r| r.tls).unwrap_or(cfg.delivery.tls),
                }
            }
        };
        Ok((route_name.to_string(), target, strategy))
    }

    /// Site-owner side: queue a job and make sure a connection will take it.
    fn enqueue(self: &Rc<Self>, job: Box<Job>) {
        let key = site_key(&job.target, &job.strategy);
        tracing::debug!(id = %job.id, site = %key, core = self.core, "job queued");
        let site = {
            let mut sites = self.sites.borrow_mut();
            sites
                .entry(key.clone())
                .or_insert_with(|| {
                    let dest = self.shared.cfg.destination(&job.target.destination());
                    Rc::new(Site {
                        key: key.clone(),
                        target: job.target.clone(),
                        strategy: job.strategy.clone(),
                        ip_key: config::source_ip_key(job.strategy.source_ip),
                        max_connections: dest.max_connections.max(1),
                        max_per_connection: dest.max_messages_per_connection.max(1),
                        throttle: RefCell::new(SiteThrottle::new(&dest)),
                        queue: RefCell::new(BinaryHeap::new()),
                        active: Cell::new(0),
                        idle: Cell::new(0),
                        wake: event_listener::Event::new(),
                        seq: Cell::new(0),
                    })
                })
                .clone()
        };
        let seq = site.seq.get();
        site.seq.set(seq + 1);
        site.queue.borrow_mut().push(Queued {
            priority: job.priority,
            seq,
            job,
        });
        if site.idle.get() > 0 {
            site.wake.notify(1);
        } else if site.active.get() < site.max_connections {
            site.active.set(site.active.get() + 1);
            let me = self.clone();
            glommio::spawn_local(async move { me.connection_task(site).await }).detach();
        }
    }

    /// One connection to a site: takes jobs off the site's queue until it is empty
    /// (after an idle wait) or the per-connection message limit is reached. The
    /// site's rate limits and the host's connection limit delay it (timer, or a
    /// wait for a slot) rather than fail anything. A job is taken off the queue
    /// only once the connection is open, so while this task waits for a host slot
    /// another connection of the site can still take the job.
    async fn connection_task(self: Rc<Self>, site: Rc<Site>) {
        let cfg = &self.shared.cfg.delivery;
        let mut open: Option<Open> = None;
        let mut sent = 0usize;
        let ip_limited = !self.shared.cfg.source_ip_rate(&site.ip_key).is_empty();
        // A source IP permit granted and not yet used (kept while the site's own
        // message rate makes the next message wait).
        let mut ip_permit = false;
        // The same for the destination host's message rate.
        let mut host_permit = false;
        loop {
            if site.queue.borrow().is_empty() {
                let listener = site.wake.listen();
                if !site.queue.borrow().is_empty() {
                    continue;
                }
                site.idle.set(site.idle.get() + 1);
                let woke = futures_lite::future::or(
                    async {
                        listener.await;
                        true
                    },
                    async {
                        Timer::new(cfg.idle_timeout.0).await;
                        false
                    },
                )
                .await;
                site.idle.set(site.idle.get() - 1);
                if woke {
                    continue;
                }
                break;
            }
            if open.is_none() {
                // The site's connection rate.
                let wait = site.throttle.borrow_mut().connection_wait(now_ms());
                if let Some(wait) = wait {
                    crate::metrics::throttled(crate::metrics::Throttle::SiteConnectionRate);
                    tracing::debug!(site = %site.key, wait_ms = wait.as_millis() as u64, "site connection rate: waiting");
                    Timer::new(wait).await;
                    continue;
                }
                match self.connect(&site).await {
                    Ok(o) => {
                        open = Some(o);
                        sent = 0;
                        host_permit = false;
                    }
                    Err(failure) => {
                        // Every job queued for this site would meet the same fate now.
                        let failed: Vec<Box<Job>> =
                            site.queue.borrow_mut().drain().map(|q| q.job).collect();
                        for job in failed {
                            let result = result_for_failure(&job, &failure);
                            self.log_attempt(&job, None, &result);
                            self.report(&job, result);
                        }
                    }
                }
                // The queue may have changed while connecting: look again.
                continue;
            }
            // The source IP's message rate, granted by the IP's owner core.
            if ip_limited && !ip_permit {
                match self.source_ip_permit(&site.ip_key).await {
                    None => ip_permit = true,
                    Some(wait) => {
                        if wait > cfg.idle_timeout.0 {
                            if let Some(o) = open.take() {
                                o.conn.quit().await;
                            }
                        }
                        crate::metrics::throttled(crate::metrics::Throttle::SourceIpRate);
                        tracing::debug!(site = %site.key, source_ip = %site.ip_key, wait_ms = wait.as_millis() as u64, "source IP message rate: waiting");
                        Timer::new(wait).await;
                        continue;
                    }
                }
                // The queue may have changed while asking: look again.
                continue;
            }
            // The destination host's message rate, granted by the host's owner.
            let rated_host = open.as_ref().and_then(|o| o.rated_host.clone());
            if let (Some(host), false) = (rated_host, host_permit) {
                match self.host_rate_permit(&host, HostRate::Message).await {
                    None => host_permit = true,
                    Some(wait) => {
                        if wait > cfg.idle_timeout.0 {
                            if let Some(o) = open.take() {
                                o.conn.quit().await;
                            }
                        }
                        crate::metrics::throttled(crate::metrics::Throttle::HostMessageRate);
                        tracing::debug!(site = %site.key, host = %host, wait_ms = wait.as_millis() as u64, "host message rate: waiting");
                        Timer::new(wait).await;
                    }
                }
                continue;
            }
            // The site's message rate.
            let wait = site.throttle.borrow_mut().message_wait(now_ms());
            if let Some(wait) = wait {
                if wait > cfg.idle_timeout.0 {
                    // Do not keep an idle connection (and its host slot) through a
                    // long wait.
                    if let Some(o) = open.take() {
                        o.conn.quit().await;
                    }
                }
                crate::metrics::throttled(crate::metrics::Throttle::SiteMessageRate);
                tracing::debug!(site = %site.key, wait_ms = wait.as_millis() as u64, "site message rate: waiting");
                Timer::new(wait).await;
                continue;
            }
            let Some(queued) = site.queue.borrow_mut().pop() else {
                continue;
            };
            let job = queued.job;
            ip_permit = false;
            host_permit = false;
            let Some(o) = open.as_mut() else { continue };
            let started = std::time::Instant::now();
            let result = self.deliver(&mut o.conn, &job).await;
            crate::metrics::global()
                .attempt_seconds
                .record(started.elapsed().as_secs_f64());
            let broken = result.is_err();
            let result = match result {
                Ok(r) => r,
                Err(failure) => result_for_failure(&job, &failure),
            };
            self.log_attempt(&job, Some(&o.conn), &result);
            self.report(&job, result);
            sent += 1;
            if broken {
                open = None;
            } else if sent >= o.max_messages {
                if let Some(o) = open.take() {
                    o.conn.quit().await;
                }
            }
        }
        if let Some(o) = open.take() {
            o.conn.quit().await;
        }
        site.active.set(site.active.get() - 1);
        // A job may have arrived after the idle wait gave up.
        if !site.queue.borrow().is_empty() && site.active.get() < site.max_connections {
            site.active.set(site.active.get() + 1);
            let me = self.clone();
            glommio::spawn_local(async move { me.connection_task(site).await }).detach();
        }
    }

    /// Asks the owner of source IP `key` for a permit to send one message.
    /// None: granted (and counted). Some: ask again after this long. When the
    /// owner cannot be reached (shutting down) the message goes ahead.
    async fn source_ip_permit(self: &Rc<Self>, key: &str) -> Option<Duration> {
        let peers = self.senders.nr_consumers().max(1);
        let me = self.senders.peer_id();
        // Salted so an IP and a host of the same name need not share an owner.
        let owner = site_owner(&format!("ip:{key}"), peers);
        if owner == me {
            return self.ip_permit_wait(key);
        }
        self.ask_owner(owner, |from, req| MeshMsg::IpPermit {
            ip: key.to_string(),
            from,
            req,
        })
        .await
    }

    /// Sends a permit request to an owner core and waits for its answer. None:
    /// granted, or the owner cannot be reached (shutting down: go ahead). Some:
    /// ask again after this long.
    async fn ask_owner(
        self: &Rc<Self>,
        owner: usize,
        request: impl FnOnce(usize, u64) -> MeshMsg,
    ) -> Option<Duration> {
        let req = self.next_request.get();
        self.next_request.set(req + 1);
        let (tx, rx) = oneshot::channel();
        self.ip_requests.borrow_mut().insert(req, tx);
        let msg = request(self.senders.peer_id(), req);
        if self.senders.send_to(owner, msg).await.is_err() {
            self.ip_requests.borrow_mut().remove(&req);
            return None;
        }
        match rx.await {
            Ok(0) | Err(_) => None,
            Ok(ms) => Some(Duration::from_millis(ms)),
        }
    }

    /// Source-IP-owner side: the limiter's answer for one permit.
    fn ip_permit_wait(&self, key: &str) -> Option<Duration> {
        let rates = self.shared.cfg.source_ip_rate(key);
        self.source_ips.borrow_mut().permit(key, rates, now_ms())
    }

    /// Source-IP-owner side: a peer asks for a permit.
    fn ip_permit_asked(self: &Rc<Self>, key: &str, from: usize, req: u64) {
        let wait = self.ip_permit_wait(key);
        self.permit_reply(from, req, wait);
    }

    /// Owner side (source IP or host): answers a permit request.
    fn permit_reply(self: &Rc<Self>, from: usize, req: u64, wait: Option<Duration>) {
        let wait_ms = wait.map_or(0, |w| (w.as_millis() as u64).max(1));
        let me = self.clone();
        glommio::spawn_local(async move {
            let _ = me
                .senders
                .send_to(from, MeshMsg::IpPermitReply { req, wait_ms })
                .await;
        })
        .detach();
    }

    /// Asks the owner of destination host `host` (a `throttle::host_key`) for a
    /// permit under its connection or message rate. None: granted (and
    /// counted). Some: ask again after this long. When the owner cannot be
    /// reached (shutting down) it goes ahead.
    async fn host_rate_permit(self: &Rc<Self>, host: &str, kind: HostRate) -> Option<Duration> {
        let peers = self.senders.nr_consumers().max(1);
        let me = self.senders.peer_id();
        // The same owner as the host's connection slots.
        let owner = site_owner(host, peers);
        if owner == me {
            return self.host_rate_wait(host, kind);
        }
        self.ask_owner(owner, |from, req| MeshMsg::HostPermit {
            host: host.to_string(),
            kind,
            from,
            req,
        })
        .await
    }

    /// Host-owner side: the host's limiter's answer for one permit.
    fn host_rate_wait(&self, host: &str, kind: HostRate) -> Option<Duration> {
        let limits = self.shared.cfg.host_limits(host);
        let rates = match kind {
            HostRate::Connection => &limits.connection_rate,
            HostRate::Message => &limits.message_rate,
        };
        self.host_rates
            .borrow_mut()
            .permit(&throttle::host_rate_key(kind, host), rates, now_ms())
    }

    /// Requester side: the owner answered a permit request.
    fn ip_permit_answered(&self, req: u64, wait_ms: u64) {
        if let Some(tx) = self.ip_requests.borrow_mut().remove(&req) {
            let _ = tx.send(wait_ms);
        }
    }

    /// Connects to the site's addresses in order, holding a slot of each host
    /// while trying it when `max_connections_per_host` is set.
    async fn connect(self: &Rc<Self>, site: &Site) -> Result<Open, SessionFailure> {
        let cfg = &self.shared.cfg.delivery;
        let endpoints = self.endpoints(&site.target, &site.strategy).await?;
        let mut last = SessionFailure {
            reply: Reply::local(451, "4.4.4", "no host to connect to"),
            try_next: true,
        };
        let ehlo = site
            .strategy
            .ehlo_name
            .as_deref()
            .unwrap_or(&self.shared.ehlo_name);
        let mut slot: Option<HostSlot> = None;
        let site_max = site.max_per_connection;
        for ep in endpoints {
            let key = throttle::host_key(&ep.host);
            let limits = self.shared.cfg.host_limits(&key);
            if limits.max_connections > 0 {
                if slot.as_ref().is_none_or(|s| s.host != key) {
                    // Give the previous host's slot back before waiting for another.
                    drop(slot.take());
                    slot = self.acquire_host(key.clone()).await;
                }
            } else {
                drop(slot.take());
            }
            // The host's connection rate, granted by its owner (after the slot,
            // so the connection follows the permit at once).
            if !limits.connection_rate.is_empty() {
                while let Some(wait) = self.host_rate_permit(&key, HostRate::Connection).await {
                    crate::metrics::throttled(crate::metrics::Throttle::HostConnectionRate);
                    tracing::debug!(host = %key, wait_ms = wait.as_millis() as u64, "host connection rate: waiting");
                    Timer::new(wait).await;
                }
            }
            match Connection::open(&ep, cfg, ehlo, &self.shared.tls).await {
                Ok(conn) => {
                    return Ok(Open {
                        conn,
                        _slot: slot,
                        rated_host: (!limits.message_rate.is_empty()).then_some(key),
                        max_messages: throttle::messages_per_connection(
                            site_max,
                            limits.max_messages_per_connection,
                        ),
                    })
                }
                Err(f) => {
                    tracing::info!(host = %ep.host, ip = %ep.addr.ip(), reply = %f.reply, "connection attempt failed");
                    let next = f.try_next;
                    last = f;
                    if !next {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    /// Waits for a connection slot on `host` from the host's owner core. None
    /// only when the owner cannot be reached (shutting down).
    async fn acquire_host(self: &Rc<Self>, host: String) -> Option<HostSlot> {
        let peers = self.senders.nr_consumers().max(1);
        let me = self.senders.peer_id();
        let owner = site_owner(&host, peers);
        let req = self.next_request.get();
        self.next_request.set(req + 1);
        let (tx, rx) = oneshot::channel();
        self.host_requests
            .borrow_mut()
            .insert(req, (host.clone(), tx));
        if owner == me {
            self.host_acquire(host.clone(), Waiter { peer: me, req });
        } else {
            let msg = MeshMsg::HostAcquire {
                host: host.clone(),
                from: me,
                req,
            };
            if self.senders.send_to(owner, msg).await.is_err() {
                self.host_requests.borrow_mut().remove(&req);
                return None;
            }
        }
        if rx.await.is_err() {
            return None;
        }
        Some(HostSlot {
            host,
            core: self.clone(),
        })
    }

    /// Host-owner side: a slot is asked for.
    fn host_acquire(self: &Rc<Self>, host: String, waiter: Waiter) {
        let max = self.shared.cfg.host_limits(&host).max_connections;
        let granted = self.hosts.borrow_mut().acquire_max(&host, max, waiter);
        if granted {
            self.host_grant(waiter);
        } else {
            crate::metrics::throttled(crate::metrics::Throttle::HostConnectionLimit);
            tracing::debug!(host = %host, "destination host at its connection limit: waiting");
        }
    }

    /// Host-owner side: a slot came back; pass it to the next waiter if any.
    fn host_released(self: &Rc<Self>, host: &str) {
        let next = self.hosts.borrow_mut().release(host);
        if let Some(waiter) = next {
            self.host_grant(waiter);
        }
    }

    fn host_grant(self: &Rc<Self>, waiter: Waiter) {
        if waiter.peer == self.senders.peer_id() {
            self.host_granted(waiter.req);
            return;
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            let _ = me
                .senders
                .send_to(waiter.peer, MeshMsg::HostGrant { req: waiter.req })
                .await;
        })
        .detach();
    }

    /// Requester side: a slot was granted. If the requester is gone, the slot
    /// goes straight back.
    fn host_granted(self: &Rc<Self>, req: u64) {
        let entry = self.host_requests.borrow_mut().remove(&req);
        if let Some((host, tx)) = entry {
            if tx.send(()).is_err() {
                self.release_host(host);
            }
        }
    }

    /// Gives a host slot back to its owner.
    fn release_host(self: &Rc<Self>, host: String) {
        if self.stopped.get() {
            // Every core is stopping; the owner's slot table goes with it.
            return;
        }
        let peers = self.senders.nr_consumers().max(1);
        let owner = site_owner(&host, peers);
        if owner == self.senders.peer_id() {
            self.host_released(&host);
            return;
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            let _ = me
                .senders
                .send_to(owner, MeshMsg::HostRelease { host })
                .await;
        })
        .detach();
    }

    /// Addresses to try, in order.
    async fn endpoints(
        &self,
        target: &Target,
        strategy: &Strategy,
    ) -> Result<Vec<Endpoint>, SessionFailure> {
        match target {
            Target::Mx { domain, port, tls } => {
                let mut route = self.resolver.resolve_route(domain).await;
                let mut own = vec![
                    self.shared.hostname.as_str(),
                    self.shared.ehlo_name.as_str(),
                ];
                if let Some(name) = &strategy.ehlo_name {
                    own.push(name);
                }
                route.drop_self(&own);
                let mut eps = Vec::new();
                for host in &route.hosts {
                    for ip in &host.addrs {
                        eps.push(Endpoint {
                            host: host.name.clone(),
                            addr: SocketAddr::new(*ip, *port),
                            lmtp: false,
                            tls: *tls,
                            auth: None,
                            source_ip: strategy.source_ip,
                        });
                    }
                }
                if eps.is_empty() {
                    let error = route
                        .error
                        .clone()
                        .or_else(|| route.hosts.iter().find_map(|h| h.error.clone()));
                    return Err(route_failure(domain, error));
                }
                Ok(eps)
            }
            Target::Host {
                host,
                port,
                lmtp,
                tls,
                auth,
                ..
            } => {
                let ips: Vec<IpAddr> = match host.parse::<IpAddr>() {
                    Ok(ip) => vec![ip],
                    Err(_) => {
                        let mut ips = Vec::new();
                        for qt in [QueryType::A, QueryType::Aaaa] {
                            if let Ok(l) = self.resolver.lookup(host, qt).await {
                                for r in l.records() {
                                    match r {
                                        Record::A(ip, _) => ips.push(IpAddr::V4(*ip)),
                                        Record::Aaaa(ip, _) => ips.push(IpAddr::V6(*ip)),
                                        _ => {}
                                    }
                                }
                            }
                        }
                        ips
                    }
                };
                if ips.is_empty() {
                    return Err(SessionFailure {
                        reply: Reply::local(451, "4.4.3", &format!("cannot resolve host {host}")),
                        try_next: false,
                    });
                }
                Ok(ips
                    .into_iter()
                    .map(|ip| Endpoint {
                        host: host.clone(),
                        addr: SocketAddr::new(ip, *port),
                        lmtp: *lmtp,
                        tls: *tls,
                        auth: auth.clone(),
                        source_ip: strategy.source_ip,
                    })
                    .collect())
            }
        }
    }

    /// One transaction on an open connection.
    async fn deliver(&self, conn: &mut Connection, job: &Job) -> Result<JobResult, SessionFailure> {
        let msg = OutboundMessage {
            sender: job.sender.clone(),
            recipients: job
                .recipients
                .iter()
                .map(|r| OutboundRecipient {
                    address: r.address.clone(),
                    notify: r.notify.clone(),
                    orcpt: r.orcpt.clone(),
                })
                .collect(),
            size: job.size,
            eightbit: job.eightbit,
            smtputf8: job.smtputf8,
            ret: job.ret,
            envid: job.envid.clone(),
        };
        if self.shared.spool.is_failed() {
            // Jobs queued before the spool failed closed do not go out either.
            halted();
            return Ok(deferred_all(
                job,
                "451 4.3.0 spool failed: delivery stopped",
            ));
        }
        // The body is copied out of the memory map once, into the send buffer;
        // a read transaction cannot be held across an await.
        let body = match self.shared.spool.with_body(job.id, |b| b.to_vec()) {
            Ok(b) => b,
            Err(e) => {
                return Ok(deferred_all(
                    job,
                    &format!("451 4.3.0 spool read failed: {e}"),
                ))
            }
        };
        let replies = conn.transaction(&msg, &body).await?;
        Ok(JobResult {
            id: job.id,
            outcomes: job
                .recipients
                .iter()
                .zip(replies.iter())
                .map(|(r, reply)| (r.index, Outcome::of(reply)))
                .collect(),
            remote_mta: Some(format!("dns; {}", conn.host)),
            peer_dsn: conn.peer_dsn(),
            lmtp: conn.lmtp(),
        })
    }

    /// The delivery log: one record per recipient per attempt.
    fn log_attempt(&self, job: &Job, conn: Option<&Connection>, result: &JobResult) {
        let delay_ms = now_ms().saturating_sub(job.arrival_unix_ms);
        let (tls_version, tls_cipher) = conn
            .and_then(|c| c.tls.as_deref())
            .map(|t| t.split_once(' ').unwrap_or((t, "")))
            .unwrap_or(("no", ""));
        for (index, outcome) in &result.outcomes {
            let (status, reply) = match outcome {
                Outcome::Delivered(r) => ("delivered", r),
                Outcome::Deferred(r) => ("deferred", r),
                Outcome::Failed(r) => ("failed", r),
            };
            let rcpt = job
                .recipients
                .iter()
                .find(|r| r.index == *index)
                .map(|r| r.address.as_str())
                .unwrap_or("");
            tracing::info!(
                target: "sluice::delivery",
                id = %job.id,
                recipient = %rcpt,
                recipients = job.recipients.len(),
                queue = %job.queue,
                route = %job.route,
                site = %job.target.destination(),
                host = conn.map(|c| c.host.as_str()).unwrap_or(""),
                ip = %conn.map(|c| c.ip.to_string()).unwrap_or_default(),
                source_ip = %job.strategy.source_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                tls = tls_version,
                tls_cipher,
                tls_verified = conn.is_some_and(|c| c.tls_verified),
                status,
                reply = %reply,
                delay_ms,
                attempt = job.attempt,
                core = self.core,
                "delivery attempt"
            );
        }
    }

    /// Sends a job's result to its shard owner.
    fn report(self: &Rc<Self>, job: &Job, result: JobResult) {
        if job.reply_to == self.senders.peer_id() {
            self.on_result(result);
            return;
        }
        let me = self.clone();
        let to = job.reply_to;
        glommio::spawn_local(async move {
            if me
                .senders
                .send_to(to, MeshMsg::Result(result))
                .await
                .is_err()
            {
                tracing::warn!("result for a job could not reach its shard owner (shutting down)");
            }
        })
        .detach();
    }

    /// Shard-owner side: merge a job's result; finalize when the attempt is complete.
    fn on_result(self: &Rc<Self>, result: JobResult) {
        let done = {
            let mut attempts = self.attempts.borrow_mut();
            let Some(attempt) = attempts.get_mut(&result.id) else {
                return;
            };
            crate::metrics::count_outcomes(
                &attempt.envelope.queue,
                attempt.envelope.arrival_unix_ms,
                &result.outcomes,
            );
            for (index, outcome) in &result.outcomes {
                let i = *index as usize;
                if let Some(r) = attempt.envelope.recipients.get_mut(i) {
                    let attempts_so_far = match &r.status {
                        RecipientStatus::Deferred { attempts, .. } => *attempts,
                        _ => 0,
                    };
                    r.status = match outcome {
                        Outcome::Delivered(reply) => {
                            if let Some(action) =
                                success_notice_due(r.notify, result.peer_dsn, result.lmtp)
                            {
                                attempt.success.push((i, action));
                            }
                            RecipientStatus::Delivered {
                                reply: reply.clone(),
                            }
                        }
                        Outcome::Failed(reply) => {
                            attempt.newly_failed.push(i);
                            RecipientStatus::Failed {
                                reply: reply.clone(),
                            }
                        }
                        Outcome::Deferred(reply) => RecipientStatus::Deferred {
                            reply: reply.clone(),
                            attempts: attempts_so_far + 1,
                        },
                    };
                }
            }
            if result.remote_mta.is_some() {
                attempt.remote_mta = result.remote_mta.clone();
            }
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
            attempt.outstanding = attempt.outstanding.saturating_sub(1);
            if attempt.outstanding == 0 {
                attempts.remove(&result.id)
            } else {
                None
            }
        };
        if let Some(attempt) = done {
            let me = self.clone();
            let id = result.id;
            let busy = self.admin_finalizing(id);
            glommio::spawn_local(async move {
                let _busy = busy;
                me.finalize(id, attempt).await
            })
            .detach();
        }
    }

    /// All results of an attempt are in (or none was made): apply expiry and
    /// DELIVERBY, send notices, then persist and reschedule, or remove.
    async fn finalize(self: Rc<Self>, id: MessageId, attempt: Attempt) {
        let Attempt {
            mut envelope,
            remote_mta,
            mut newly_failed,
            success,
            attempted,
            ..
        } = attempt;
        let now = now_ms();
        let queue = self.shared.cfg.queue(&envelope.queue);
        if attempted {
            envelope.schedule.attempts += 1;
        }
        let expire_ms = queue.expire.0.as_millis() as u64;
        let by = timing::deliver_by_state(&envelope, now);
        let give_up = if timing::expired(&envelope, expire_ms, now) {
            Some("550 5.4.7 message expired in the queue")
        } else if by == ByState::Return {
            Some("550 5.4.7 delivery time (DELIVERBY) expired")
        } else {
            None
        };
        if let Some(why) = give_up {
            for (i, r) in envelope.recipients.iter_mut().enumerate() {
                if is_open(&r.status) {
                    newly_failed.push(i);
                    crate::metrics::queue(&envelope.queue).expired.increment(1);
                    let last = match &r.status {
                        RecipientStatus::Deferred { reply, .. } => reply.clone(),
                        _ => String::new(),
                    };
                    r.status = RecipientStatus::Failed {
                        reply: if last.is_empty() {
                            why.to_string()
                        } else {
                            format!("{why}; last error: {last}")
                        },
                    };
                }
            }
        }
        if !newly_failed.is_empty() {
            let notices: Vec<Notice> = newly_failed
                .iter()
                .map(|&index| Notice {
                    index,
                    action: DsnAction::Failed,
                    status: None,
                })
                .collect();
            self.notify(
                &envelope,
                id,
                DsnKind::Failure,
                &notices,
                remote_mta.as_deref(),
                None,
            )
            .await;
        }
        if !success.is_empty() {
            let notices: Vec<Notice> = success
                .iter()
                .map(|&(index, action)| Notice {
                    index,
                    action,
                    status: None,
                })
                .collect();
            self.notify(
                &envelope,
                id,
                DsnKind::Success,
                &notices,
                remote_mta.as_deref(),
                None,
            )
            .await;
        }
        if !has_pending(&envelope) {
            if persist(id, "removing a finished message", || {
                self.shared.spool.remove(id)
            })
            .await
            {
                self.shared
                    .queue_stats
                    .remove(self.core as usize, &envelope.queue, envelope.size);
            }
            return;
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
                let notices: Vec<Notice> = open
                    .iter()
                    .map(|&index| Notice {
                        index,
                        action: DsnAction::Delayed,
                        status: None,
                    })
                    .collect();
                self.notify(
                    &envelope,
                    id,
                    DsnKind::Delay,
                    &notices,
                    remote_mta.as_deref(),
                    Some(until),
                )
                .await;
                envelope.schedule.delay_notices += 1;
            }
        }
        if by == ByState::Notify {
            // RFC 2852 N mode: the deadline passed undelivered; say so once and
            // keep trying.
            let notices: Vec<Notice> = open
                .iter()
                .map(|&index| Notice {
                    index,
                    action: DsnAction::Delayed,
                    status: Some("4.4.7"),
                })
                .collect();
            self.notify(
                &envelope,
                id,
                DsnKind::Delay,
                &notices,
                remote_mta.as_deref(),
                Some(until),
            )
            .await;
            envelope.schedule.deliver_by_notified = true;
        }
        let wake = timing::wake_time(&envelope, now).max(now);
        self.admin_apply_hold(id, &mut envelope);
        if persist(id, "persisting delivery state", || {
            self.shared.spool.update(id, &envelope)
        })
        .await
        {
            self.schedule(wake, id);
        }
    }

    /// Builds and queues a DSN to the envelope sender for the given recipients.
    async fn notify(
        self: &Rc<Self>,
        envelope: &Envelope,
        id: MessageId,
        kind: DsnKind,
        notices: &[Notice],
        remote_mta: Option<&str>,
        retry_until: Option<u64>,
    ) {
        let now = now_ms();
        let recipients: Vec<crate::dsn::DsnRecipient<'_>> = notices
            .iter()
            .filter_map(|n| envelope.recipients.get(n.index).map(|r| (n, r)))
            .map(|(n, r)| {
                let reply = match &r.status {
                    RecipientStatus::Failed { reply }
                    | RecipientStatus::Deferred { reply, .. }
                    | RecipientStatus::Delivered { reply } => reply.clone(),
                    RecipientStatus::Pending => String::new(),
                };
                let status = match n.status {
                    Some(s) => s.to_string(),
                    None => enhanced_status(&reply, &kind),
                };
                crate::dsn::DsnRecipient {
                    recipient: r,
                    action: n.action,
                    status,
                    remote_mta: remote_mta.map(str::to_string),
                    diagnostic: (!reply.is_empty()).then_some(reply),
                    last_attempt_unix_ms: Some(now),
                    will_retry_until_unix_ms: retry_until,
                }
            })
            .collect();
        let ctx = crate::dsn::DsnContext {
            reporting_mta: &self.shared.hostname,
            now_unix_ms: now,
            original_id: id,
        };
        // Built straight from the memory map; an unreadable body still gets a
        // notice, without the original.
        let build =
            |original: &[u8]| crate::dsn::build_dsn(kind, envelope, original, &recipients, &ctx);
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
        let stored = persist(id, "queuing a delivery notification", || {
            self.shared
                .spool
                .store(self.core, dsn_id, &dsn_envelope, dsn.body.clone())
        })
        .await;
        if stored {
            self.shared
                .queue_stats
                .add(self.core as usize, &dsn_envelope.queue, dsn_envelope.size);
            crate::metrics::dsn_queued(kind);
            tracing::info!(target: "sluice::delivery", id = %id, dsn_id = %dsn_id, to = %dsn.recipient, kind = ?kind, "notification queued");
            self.dispatch(dsn_id, dsn_envelope);
        }
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

/// Logs, once per process, that delivery stopped because the spool failed closed.
fn halted() {
    static LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::error!("spool failed closed: delivery stopped (restart once storage is repaired)");
    }
}

/// The success notice owed for a delivered recipient (RFC 3461 §5.2.2): when it
/// asked for NOTIFY=SUCCESS and the next hop did not offer DSN, so the request
/// could not travel on, we report "relayed" (or "delivered" for an LMTP store,
/// which is final delivery). When the next hop offered DSN, NOTIFY went with the
/// RCPT and the notice is its job.
fn success_notice_due(notify: Notify, peer_dsn: bool, lmtp: bool) -> Option<DsnAction> {
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
pub(crate) fn is_open(status: &RecipientStatus) -> bool {
    matches!(
        status,
        RecipientStatus::Pending | RecipientStatus::Deferred { .. }
    )
}

fn has_pending(env: &Envelope) -> bool {
    env.recipients.iter().any(|r| is_open(&r.status))
}

fn notify_keywords(n: Notify) -> Option<String> {
    if n.is_empty() {
        return None;
    }
    let names: Vec<&str> = [
        (Notify::NEVER, "NEVER"),
        (Notify::SUCCESS, "SUCCESS"),
        (Notify::FAILURE, "FAILURE"),
        (Notify::DELAY, "DELAY"),
    ]
    .iter()
    .filter(|(bit, _)| n.contains(*bit))
    .map(|(_, name)| *name)
    .collect();
    Some(names.join(","))
}

/// The enhanced status code of a reply text ("550 5.1.1 …" → "5.1.1"), or a
/// default for the notice kind.
fn enhanced_status(reply: &str, kind: &DsnKind) -> String {
    let mut words = reply.split_whitespace();
    let code = words.next().unwrap_or("");
    if let Some(esc) = words.next() {
        let parts: Vec<&str> = esc.split('.').collect();
        if parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        {
            return esc.to_string();
        }
    }
    match (code.as_bytes().first(), kind) {
        (Some(b'2'), _) => "2.0.0".into(),
        (Some(b'5'), _) | (_, DsnKind::Failure) => "5.0.0".into(),
        _ => "4.0.0".into(),
    }
}

fn host_target(
    name: &str,
    route: &RouteConfig,
    default_tls: OutboundTls,
) -> Result<Target, String> {
    let host = route
        .host
        .clone()
        .ok_or_else(|| format!("451 4.3.5 route {name} has no host"))?;
    let (lmtp, default_port) = match route.kind {
        RouteKind::Lmtp => (true, 24),
        RouteKind::Smtp | RouteKind::Relay | RouteKind::Mx => (false, 25),
    };
    let tls = route
        .tls
        .unwrap_or(if lmtp { OutboundTls::None } else { default_tls });
    Ok(Target::Host {
        route: name.to_string(),
        host,
        port: route.port.unwrap_or(default_port),
        lmtp,
        tls,
        auth: route.auth_user.clone().zip(route.auth_password.clone()),
    })
}

fn route_failure(domain: &str, error: Option<RouteError>) -> SessionFailure {
    let reply = match &error {
        Some(RouteError::NullMx(_)) => Reply::local(
            556,
            "5.1.10",
            &format!("{domain} does not accept mail (null MX)"),
        ),
        Some(e) if e.is_permanent() => {
            Reply::local(550, "5.1.2", &format!("cannot route to {domain}: {e}"))
        }
        Some(e) => Reply::local(451, "4.4.3", &format!("cannot route to {domain} now: {e}")),
        None => Reply::local(451, "4.4.3", &format!("no usable MX host for {domain}")),
    };
    SessionFailure {
        reply,
        try_next: false,
    }
}

fn result_for_failure(job: &Job, failure: &SessionFailure) -> JobResult {
    let outcome = Outcome::of(&failure.reply);
    JobResult {
        id: job.id,
        outcomes: job
            .recipients
            .iter()
            .map(|r| (r.index, outcome.clone()))
            .collect(),
        remote_mta: None,
        peer_dsn: false,
        lmtp: false,
    }
}

fn deferred_all(job: &Job, reply: &str) -> JobResult {
    JobResult {
        id: job.id,
        outcomes: job
            .recipients
            .iter()
            .map(|r| (r.index, Outcome::Deferred(reply.to_string())))
            .collect(),
        remote_mta: None,
        peer_dsn: false,
        lmtp: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> DeliveryConfig {
        crate::config::Config::load("t", text, &[])
            .expect("config")
            .delivery_config()
    }

    #[test]
    fn fallback_route_after_n_deferrals() {
        let c = cfg(r#"
            [route.mx]
            type = "mx"
            fallback = "smarthost"
            fallback_after = 2

            [route.smarthost]
            type = "relay"
            host = "127.0.0.1"
            port = 2600
            fallback = "mx"

            [route.plain]
            type = "relay"
            host = "127.0.0.2"
            fallback = "smarthost"
            "#);
        assert_eq!(c.effective_route("mx", 0), "mx");
        assert_eq!(c.effective_route("mx", 1), "mx");
        assert_eq!(c.effective_route("mx", 2), "smarthost");
        assert_eq!(c.effective_route("mx", 9), "smarthost");
        // One level only: the fallback's own fallback is not followed.
        assert_eq!(c.effective_route("smarthost", 3), "mx");
        // fallback_after defaults to 3.
        assert_eq!(c.effective_route("plain", 2), "plain");
        assert_eq!(c.effective_route("plain", 3), "smarthost");
        // Unknown (built-in) routes have no fallback.
        assert_eq!(c.effective_route("nothing", 100), "nothing");
    }

    #[test]
    fn fallback_must_name_another_route() {
        for (text, needle) in [
            (
                "[route.a]\ntype = \"mx\"\nfallback = \"nowhere\"\n",
                "route.a.fallback",
            ),
            (
                "[route.a]\ntype = \"mx\"\nfallback = \"a\"\n",
                "route.a.fallback",
            ),
            (
                "[route.a]\ntype = \"mx\"\nfallback = \"mx\"\nfallback_after = 0\n",
                "route.a.fallback_after",
            ),
        ] {
            let err = crate::config::Config::load("t", text, &[])
                .expect_err(text)
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        // The built-in "mx" route is a valid fallback.
        cfg("[route.a]\ntype = \"relay\"\nhost = \"h\"\nfallback = \"mx\"\n");
    }

    #[test]
    fn success_notices_only_when_the_next_hop_cannot_take_them() {
        let s = Notify::SUCCESS;
        assert_eq!(
            success_notice_due(s, false, false),
            Some(DsnAction::Relayed)
        );
        assert_eq!(
            success_notice_due(s, false, true),
            Some(DsnAction::Delivered)
        );
        assert_eq!(
            success_notice_due(s | Notify::FAILURE, false, false),
            Some(DsnAction::Relayed)
        );
        // The next hop offered DSN: NOTIFY went with the RCPT.
        assert_eq!(success_notice_due(s, true, false), None);
        assert_eq!(success_notice_due(s, true, true), None);
        // Not asked for.
        assert_eq!(success_notice_due(Notify::default(), false, false), None);
        assert_eq!(
            success_notice_due(Notify::FAILURE | Notify::DELAY, false, false),
            None
        );
        assert_eq!(success_notice_due(Notify::NEVER, false, false), None);
    }

    #[test]
    fn sites_are_split_by_connection_strategy() {
        let t = Target::Mx {
            domain: "example.com".into(),
            port: 25,
            tls: OutboundTls::Opportunistic,
        };
        assert_eq!(site_key(&t, &Strategy::default()), "example.com");
        let s = Strategy {
            source_ip: Some("192.0.2.7".parse().expect("ip")),
            ehlo_name: Some("out7.example.net".into()),
        };
        assert_eq!(site_key(&t, &s), "example.com|192.0.2.7|out7.example.net");
        let h = host_target(
            "smart",
            &RouteConfig {
                kind: RouteKind::Relay,
                host: Some("relay.example.net".into()),
                port: None,
                tls: None,
                auth_user: None,
                auth_password: None,
                fallback: None,
                fallback_after: 3,
            },
            OutboundTls::Opportunistic,
        )
        .expect("target");
        assert_eq!(h.destination(), "route:smart");
        assert_eq!(
            site_key(
                &h,
                &Strategy {
                    source_ip: None,
                    ehlo_name: Some("e".into())
                }
            ),
            "route:smart||e"
        );
    }

    #[test]
    fn enhanced_status_from_replies() {
        assert_eq!(
            enhanced_status("550 5.1.1 no such user", &DsnKind::Failure),
            "5.1.1"
        );
        assert_eq!(
            enhanced_status("550 no such user", &DsnKind::Failure),
            "5.0.0"
        );
        assert_eq!(enhanced_status("451 try later", &DsnKind::Delay), "4.0.0");
        assert_eq!(enhanced_status("250 ok", &DsnKind::Success), "2.0.0");
        assert_eq!(
            enhanced_status(
                "550 5.4.7 delivery time (DELIVERBY) expired",
                &DsnKind::Failure
            ),
            "5.4.7"
        );
    }
}
