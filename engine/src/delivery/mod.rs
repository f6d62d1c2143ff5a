//! Outbound delivery: destination-owned queues across cores.
//!
//! Two roles live on every core:
//!
//! * **Shard owner.** The core that owns a spool shard schedules that shard's
//!   messages: it decides each recipient's route, hands jobs to the cores that own
//!   the destination sites, merges their results into the envelope, persists it
//!   (through the shard's writer, group-committed), schedules retries, expires,
//!   sends DSNs and removes finished messages. Only this core writes the message.
//! * **Site owner.** Every destination site (an MX domain, or a configured route's
//!   host) hashes to exactly one core, which holds its ready queue, its connection
//!   count and its idle connections. Limits per site therefore hold across all
//!   cores without locks, and connections are reused for every message to that
//!   site whatever core accepted it.
//!
//! Jobs and results travel between cores over a glommio channel mesh by value
//! (envelope facts + message id); the site owner reads the body from the shard's
//! LMDB environment directly (readers are safe across threads).

pub mod config;
pub mod outbound;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use glommio::channels::channel_mesh::{Receivers, Senders};
use glommio::timer::Timer;
use sluice_dns::{QueryType, Record, Resolver, RouteError};
use sluice_spool::{Envelope, IdGenerator, MessageId, Notify, RecipientStatus, Ret, Spool};

use self::config::{DeliveryConfig, OutboundTls, RouteConfig, RouteKind};
use self::outbound::{Connection, Endpoint, OutboundTlsConfig, SessionFailure};
use crate::smtp::client::{OutboundMessage, OutboundRecipient, Reply};

/// Everything all cores share about delivery.
pub struct DeliveryShared {
    pub spool: Arc<Spool>,
    pub cfg: DeliveryConfig,
    pub hostname: String,
    pub ehlo_name: String,
    pub tls: OutboundTlsConfig,
    pub dns: sluice_dns::ResolverConfig,
    pub rules: sluice_policy::RuleSet,
}

/// Where a group of recipients goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The recipient domain's MX hosts.
    Mx { domain: String, port: u16 },
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
    fn site(&self) -> String {
        match self {
            Target::Mx { domain, .. } => domain.clone(),
            Target::Host { route, .. } => format!("route:{route}"),
        }
    }
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
}

#[derive(Debug)]
pub enum MeshMsg {
    Job(Box<Job>),
    Result(JobResult),
}

/// A message with jobs out, waiting for their results (shard-owner side).
struct Attempt {
    envelope: Envelope,
    outstanding: usize,
    remote_mta: Option<String>,
    /// Recipients that failed permanently in this attempt (each is notified once).
    newly_failed: Vec<usize>,
}

/// Site-owner side: one destination.
struct Site {
    target: Target,
    max_connections: usize,
    max_per_connection: usize,
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

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// FNV-1a: a stable hash so every core maps a site to the same owner.
fn site_owner(site: &str, peers: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in site.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % peers.max(1) as u64) as usize
}

/// Delivery state of one core.
pub struct CoreDelivery {
    core: u16,
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
            resolver: Resolver::new(shared.dns.clone()),
            shared,
            ids,
            senders,
            attempts: RefCell::new(HashMap::new()),
            timers: RefCell::new(BTreeSet::new()),
            timer_wake: event_listener::Event::new(),
            sites: RefCell::new(HashMap::new()),
            shards,
        })
    }

    /// Starts the mesh receivers and the timer loop, and schedules every message
    /// of this core's shards found in the spool (recovery).
    pub fn start(
        self: &Rc<Self>,
        mut receivers: Receivers<MeshMsg>,
    ) -> Result<usize, sluice_spool::SpoolError> {
        for (_peer, stream) in receivers.streams() {
            let me = self.clone();
            glommio::spawn_local(async move {
                while let Some(msg) = stream.recv().await {
                    match msg {
                        MeshMsg::Job(job) => me.enqueue(job),
                        MeshMsg::Result(result) => me.on_result(result),
                    }
                }
            })
            .detach();
        }
        let mut scheduled = 0;
        for &shard in &self.shards {
            let mut timers = self.timers.borrow_mut();
            self.shared.spool.list_shard(shard, |id, env| {
                if has_pending(env) {
                    timers.insert((env.schedule.next_attempt_unix_ms, id));
                    scheduled += 1;
                }
                true
            })?;
        }
        let me = self.clone();
        glommio::spawn_local(async move { me.timer_loop().await }).detach();
        Ok(scheduled)
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

    /// Groups the message's open recipients by target and sends each group to the
    /// site's owner.
    fn dispatch(self: &Rc<Self>, id: MessageId, envelope: Envelope) {
        let now = now_ms();
        if envelope.hold_until_unix * 1000 > now {
            self.schedule(envelope.hold_until_unix * 1000, id);
            return;
        }
        let mut groups: Vec<(Target, Vec<JobRecipient>)> = Vec::new();
        let mut unroutable = Vec::new();
        for (i, r) in envelope.recipients.iter().enumerate() {
            if !is_open(&r.status) {
                continue;
            }
            match self.target_for(&envelope, &r.address, r.local) {
                Ok(t) => {
                    let jr = JobRecipient {
                        index: i as u16,
                        address: r.address.clone(),
                        notify: notify_keywords(r.notify),
                        orcpt: r.orcpt.clone(),
                    };
                    match groups.iter_mut().find(|(gt, _)| *gt == t) {
                        Some((_, list)) => list.push(jr),
                        None => groups.push((t, vec![jr])),
                    }
                }
                Err(reply) => unroutable.push((i as u16, Outcome::Failed(reply))),
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
        for (target, rcpts) in groups {
            for chunk in rcpts.chunks(per_tx) {
                jobs.push(Box::new(Job {
                    id,
                    reply_to: me_peer,
                    target: target.clone(),
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
            let me = self.clone();
            glommio::spawn_local(async move {
                me.finalize(
                    id,
                    Attempt {
                        envelope,
                        outstanding: 0,
                        remote_mta: None,
                        newly_failed: Vec::new(),
                    },
                )
                .await
            })
            .detach();
            return;
        }
        self.attempts.borrow_mut().insert(
            id,
            Attempt {
                envelope,
                outstanding,
                remote_mta: None,
                newly_failed: Vec::new(),
            },
        );
        for job in jobs {
            let owner = site_owner(&job.target.site(), peers);
            tracing::debug!(id = %id, site = %job.target.site(), owner, me = me_peer, "job dispatched");
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
            });
        }
    }

    /// The route for one recipient: the first matching `[[rule]]` decides; local
    /// domains go to the "local" route when one is configured.
    fn target_for(
        &self,
        envelope: &Envelope,
        address: &str,
        local: bool,
    ) -> Result<Target, String> {
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
        let decision = self.shared.rules.evaluate(&facts, address, None);
        // Without a deciding rule: local domains take the "local" route and the
        // rest the "default" route, when those are configured; else MX.
        let route_name = match decision.rule {
            Some(_) => decision.route.as_str(),
            None if local && cfg.routes.contains_key("local") => "local",
            None if cfg.routes.contains_key("default") => "default",
            None => decision.route.as_str(),
        };
        match cfg.routes.get(route_name) {
            Some(route) if route.kind != RouteKind::Mx => {
                host_target(route_name, route, cfg.delivery.tls)
            }
            _ => {
                let domain = address
                    .rsplit_once('@')
                    .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase())
                    .unwrap_or_default();
                if domain.is_empty() {
                    return Err("550 5.1.2 recipient has no domain to route to".into());
                }
                let port = cfg
                    .routes
                    .get(route_name)
                    .and_then(|r| r.port)
                    .unwrap_or(cfg.delivery.mx_port);
                Ok(Target::Mx { domain, port })
            }
        }
    }

    /// Site-owner side: queue a job and make sure a connection will take it.
    fn enqueue(self: &Rc<Self>, job: Box<Job>) {
        let key = job.target.site();
        tracing::debug!(id = %job.id, site = %key, core = self.core, "job queued");
        let site = {
            let mut sites = self.sites.borrow_mut();
            sites
                .entry(key.clone())
                .or_insert_with(|| {
                    let dest = self.shared.cfg.destination(&key);
                    Rc::new(Site {
                        target: job.target.clone(),
                        max_connections: dest.max_connections.max(1),
                        max_per_connection: dest.max_messages_per_connection.max(1),
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
    /// (after an idle wait) or the per-connection message limit is reached.
    async fn connection_task(self: Rc<Self>, site: Rc<Site>) {
        let cfg = &self.shared.cfg.delivery;
        let mut conn: Option<Connection> = None;
        let mut sent = 0usize;
        loop {
            let next = site.queue.borrow_mut().pop();
            let queued = match next {
                Some(q) => q,
                None => {
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
            };
            let job = queued.job;
            if conn.is_none() {
                match self.connect(&site.target).await {
                    Ok(c) => conn = Some(c),
                    Err(failure) => {
                        // Every job queued for this site would meet the same fate now.
                        let mut failed = vec![job];
                        failed.extend(site.queue.borrow_mut().drain().map(|q| q.job));
                        for job in failed {
                            let result = result_for_failure(&job, &failure);
                            self.log_attempt(&job, None, &result);
                            self.report(&job, result);
                        }
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            let result = self.deliver(c, &job).await;
            let broken = result.is_err();
            let result = match result {
                Ok(r) => r,
                Err(failure) => result_for_failure(&job, &failure),
            };
            self.log_attempt(&job, Some(&*c), &result);
            self.report(&job, result);
            sent += 1;
            if broken {
                conn = None;
                sent = 0;
            } else if sent >= site.max_per_connection {
                if let Some(c) = conn.take() {
                    c.quit().await;
                }
                sent = 0;
            }
        }
        if let Some(c) = conn.take() {
            c.quit().await;
        }
        site.active.set(site.active.get() - 1);
        // A job may have arrived after the idle wait gave up.
        if !site.queue.borrow().is_empty() && site.active.get() < site.max_connections {
            site.active.set(site.active.get() + 1);
            let me = self.clone();
            glommio::spawn_local(async move { me.connection_task(site).await }).detach();
        }
    }

    async fn connect(&self, target: &Target) -> Result<Connection, SessionFailure> {
        let cfg = &self.shared.cfg.delivery;
        let endpoints = self.endpoints(target).await?;
        let mut last = SessionFailure {
            reply: Reply::local(451, "4.4.4", "no host to connect to"),
            try_next: true,
        };
        for ep in endpoints {
            match Connection::open(&ep, cfg, &self.shared.ehlo_name, &self.shared.tls).await {
                Ok(c) => return Ok(c),
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

    /// Addresses to try, in order.
    async fn endpoints(&self, target: &Target) -> Result<Vec<Endpoint>, SessionFailure> {
        match target {
            Target::Mx { domain, port } => {
                let mut route = self.resolver.resolve_route(domain).await;
                let own = [
                    self.shared.hostname.as_str(),
                    self.shared.ehlo_name.as_str(),
                ];
                route.drop_self(&own);
                let mut eps = Vec::new();
                for host in &route.hosts {
                    for ip in &host.addrs {
                        eps.push(Endpoint {
                            host: host.name.clone(),
                            addr: SocketAddr::new(*ip, *port),
                            lmtp: false,
                            tls: self.shared.cfg.delivery.tls,
                            auth: None,
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
        // The body is copied out of the memory map once, into the send buffer;
        // a read transaction cannot be held across an await.
        let body = match self.shared.spool.with_body(job.id, |b| b.to_vec()) {
            Ok(b) => b,
            Err(e) => {
                return Ok(JobResult {
                    id: job.id,
                    outcomes: job
                        .recipients
                        .iter()
                        .map(|r| {
                            (
                                r.index,
                                Outcome::Deferred(format!("451 4.3.0 spool read failed: {e}")),
                            )
                        })
                        .collect(),
                    remote_mta: None,
                })
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
        })
    }

    fn log_attempt(&self, job: &Job, conn: Option<&Connection>, result: &JobResult) {
        let delay_ms = now_ms().saturating_sub(job.arrival_unix_ms);
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
                site = %job.target.site(),
                host = conn.map(|c| c.host.as_str()).unwrap_or(""),
                ip = %conn.map(|c| c.ip.to_string()).unwrap_or_default(),
                tls = conn.and_then(|c| c.tls.as_deref()).unwrap_or("no"),
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
            for (index, outcome) in &result.outcomes {
                if let Some(r) = attempt.envelope.recipients.get_mut(*index as usize) {
                    let attempts_so_far = match &r.status {
                        RecipientStatus::Deferred { attempts, .. } => *attempts,
                        _ => 0,
                    };
                    r.status = match outcome {
                        Outcome::Delivered(reply) => RecipientStatus::Delivered {
                            reply: reply.clone(),
                        },
                        Outcome::Failed(reply) => {
                            attempt.newly_failed.push(*index as usize);
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
            glommio::spawn_local(async move { me.finalize(id, attempt).await }).detach();
        }
    }

    /// All results of an attempt are in: persist, notify, reschedule or remove.
    async fn finalize(self: Rc<Self>, id: MessageId, attempt: Attempt) {
        let Attempt {
            mut envelope,
            remote_mta,
            mut newly_failed,
            ..
        } = attempt;
        let now = now_ms();
        let queue = self.shared.cfg.queue(&envelope.queue);
        envelope.schedule.attempts += 1;
        let expired =
            now.saturating_sub(envelope.arrival_unix_ms) >= queue.expire.0.as_millis() as u64;
        if expired {
            for (i, r) in envelope.recipients.iter_mut().enumerate() {
                if is_open(&r.status) {
                    newly_failed.push(i);
                    let last = match &r.status {
                        RecipientStatus::Deferred { reply, .. } => reply.clone(),
                        _ => String::new(),
                    };
                    r.status = RecipientStatus::Failed {
                        reply: format!(
                            "550 5.4.7 message expired in the queue; last error: {last}"
                        ),
                    };
                }
            }
        }
        if !newly_failed.is_empty() {
            self.notify(
                &envelope,
                id,
                crate::dsn::DsnKind::Failure,
                &newly_failed,
                remote_mta.as_deref(),
                None,
            )
            .await;
        }
        if !has_pending(&envelope) {
            if let Err(e) = self.shared.spool.remove(id).await {
                tracing::error!(id = %id, "removing delivered message failed: {e}");
            }
            return;
        }
        let next = now + queue.retry_delay(envelope.schedule.attempts).as_millis() as u64;
        envelope.schedule.next_attempt_unix_ms = next;
        let waited = now.saturating_sub(envelope.arrival_unix_ms);
        if let Some(threshold) = queue
            .notify_delay
            .get(envelope.schedule.delay_notices as usize)
        {
            if waited >= threshold.0.as_millis() as u64 {
                let open: Vec<usize> = envelope
                    .recipients
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| is_open(&r.status))
                    .map(|(i, _)| i)
                    .collect();
                let until = envelope.arrival_unix_ms + queue.expire.0.as_millis() as u64;
                self.notify(
                    &envelope,
                    id,
                    crate::dsn::DsnKind::Delay,
                    &open,
                    remote_mta.as_deref(),
                    Some(until),
                )
                .await;
                envelope.schedule.delay_notices += 1;
            }
        }
        match self.shared.spool.update(id, &envelope).await {
            Ok(()) => self.schedule(next, id),
            Err(e) => tracing::error!(id = %id, "persisting delivery state failed: {e}"),
        }
    }

    /// Builds and queues a DSN to the envelope sender for the given recipients.
    async fn notify(
        self: &Rc<Self>,
        envelope: &Envelope,
        id: MessageId,
        kind: crate::dsn::DsnKind,
        indices: &[usize],
        remote_mta: Option<&str>,
        retry_until: Option<u64>,
    ) {
        let now = now_ms();
        let recipients: Vec<crate::dsn::DsnRecipient<'_>> = indices
            .iter()
            .filter_map(|&i| envelope.recipients.get(i))
            .map(|r| {
                let (action, reply) = match (&kind, &r.status) {
                    (crate::dsn::DsnKind::Failure, RecipientStatus::Failed { reply }) => {
                        (crate::dsn::DsnAction::Failed, reply.clone())
                    }
                    (_, RecipientStatus::Deferred { reply, .. }) => {
                        (crate::dsn::DsnAction::Delayed, reply.clone())
                    }
                    (_, RecipientStatus::Delivered { reply }) => {
                        (crate::dsn::DsnAction::Delivered, reply.clone())
                    }
                    (_, _) => (crate::dsn::DsnAction::Delayed, String::new()),
                };
                crate::dsn::DsnRecipient {
                    recipient: r,
                    action,
                    status: enhanced_status(&reply, &kind),
                    remote_mta: remote_mta.map(str::to_string),
                    diagnostic: (!reply.is_empty()).then_some(reply),
                    last_attempt_unix_ms: Some(now),
                    will_retry_until_unix_ms: retry_until,
                }
            })
            .collect();
        let original = self
            .shared
            .spool
            .with_body(id, |b| b.to_vec())
            .unwrap_or_default();
        let ctx = crate::dsn::DsnContext {
            reporting_mta: &self.shared.hostname,
            now_unix_ms: now,
            original_id: id,
        };
        let Some(dsn) = crate::dsn::build_dsn(kind, envelope, &original, &recipients, &ctx) else {
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
            schedule: Default::default(),
        };
        match self
            .shared
            .spool
            .store(self.core, dsn_id, dsn_envelope.clone(), dsn.body)
            .await
        {
            Ok(()) => {
                tracing::info!(target: "sluice::delivery", id = %id, dsn_id = %dsn_id, to = %dsn.recipient, kind = ?kind, "notification queued");
                self.dispatch(dsn_id, dsn_envelope);
            }
            Err(e) => tracing::error!(id = %id, "queuing a delivery notification failed: {e}"),
        }
    }
}

fn is_open(status: &RecipientStatus) -> bool {
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
fn enhanced_status(reply: &str, kind: &crate::dsn::DsnKind) -> String {
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
        (Some(b'5'), _) | (_, crate::dsn::DsnKind::Failure) => "5.0.0".into(),
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
    }
}
