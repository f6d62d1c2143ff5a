//! The site owner: every destination site (an MX domain or a route's host,
//! per source IP and EHLO name) lives on one core, which keeps its ready queue
//! (priority, then arrival), its connections (opened, reused, idle) and its
//! rate limiters, and carries out the jobs: read the body, run the SMTP
//! transaction, log it and report the result to the shard owner.

use std::cell::{Cell, RefCell};
use std::collections::BinaryHeap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;

use glommio::timer::Timer;
use sluice_dns::{QueryType, Record, RouteError};

use super::cluster_limits::{PermitStep, SlotStep};
use super::dane::{self, Dane};
use super::job::{
    deferred_all, notify_keywords, result_for_failure, ret_keyword, site_key, Job, JobResult,
    Outcome, Strategy, Target,
};
use super::mesh::HostSlot;
use super::mta_sts;
use super::outbound::{Connection, Endpoint, SessionFailure};
use super::rollup::SiteGroup;
use super::shaping::SiteShaping;
use super::throttle::{self, HostRate};
use super::tls_policy::{self, Level};
use super::{config, halted, now_ms, CoreDelivery};
use sluice_spool::Reply;

use crate::smtp::client::{self, OutboundMessage, OutboundRecipient};

/// Site-owner side: one destination (per connection strategy).
pub(super) struct Site {
    pub(super) key: String,
    pub(super) target: Target,
    strategy: Strategy,
    /// Key of the sending address (`config::source_ip_key`).
    ip_key: String,
    /// The configuration generation its limits (and its group's) are from.
    generation: Cell<u64>,
    /// Where its connections go: the latest job's target (a reload may move
    /// a route to another host or port), and how often that changed, so a
    /// connection to the old place ends before taking another job.
    current_target: RefCell<Target>,
    target_version: Cell<u64>,
    /// The limits it shares with the other domains of its MX host set (or
    /// has alone): `rollup.rs`.
    pub(super) group: Rc<SiteGroup>,
    /// `[pool.NAME] per_site_connections` of its member (0: none), read
    /// again when a reload brings a new generation.
    member_cap: Cell<usize>,
    /// In its group's waiting list.
    pub(super) group_waiting: Cell<bool>,
    pub(super) queue: RefCell<BinaryHeap<Queued>>,
    /// Slow start, backoff and the message-rate action (`shaping.rs`).
    pub(super) shaping: SiteShaping,
    active: Cell<usize>,
    idle: Cell<usize>,
    wake: event_listener::Event,
    seq: Cell<u64>,
    /// With `[tenant.*]` configured: the fair-share tags that order the
    /// queue in place of arrival (`sluice_policy::tenant`).
    fair: RefCell<Option<sluice_policy::tenant::FairTags>>,
}

pub(super) struct Queued {
    priority: i16,
    seq: u64,
    pub(super) job: Box<Job>,
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

/// An open connection and the host slot it holds.
struct Open {
    conn: Connection,
    _slot: Option<HostSlot>,
    /// Cluster mode: the cluster-wide connection slot (given back on drop).
    _cluster_slot: Option<sluice_cluster::shared::Slot>,
    /// The host (`throttle::host_key`), when it has a message rate.
    rated_host: Option<String>,
    /// Messages this connection may carry (site and host limits).
    max_messages: usize,
    /// The site's `target_version` it was opened for.
    target_version: u64,
}

impl Site {
    /// Connections open or opening now.
    pub(super) fn active_connections(&self) -> usize {
        self.active.get()
    }

    /// Its group's `max_connections`, or its pool member's share when lower
    /// (slow start and shaping stay below it).
    pub(super) fn max_connections(&self) -> usize {
        let group = self.group.max_connections.get();
        match self.member_cap.get() {
            0 => group,
            cap => cap.min(group),
        }
    }

    /// One more connection open or opening.
    pub(super) fn count_connection(&self) {
        self.active.set(self.active.get() + 1);
    }
}

/// `[pool.NAME] per_site_connections`: each pool member's share of a site
/// (0: none, the site's own limit).
fn member_cap(cfg: &config::DeliveryConfig, strategy: &Strategy) -> usize {
    strategy
        .pool
        .as_ref()
        .and_then(|p| cfg.pools.pools.get(p))
        .map_or(0, |p| p.per_site_connections)
}

impl CoreDelivery {
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

    /// Site-owner side: queue a job and make sure a connection will take it.
    pub(super) fn enqueue(self: &Rc<Self>, job: Box<Job>) {
        let key = site_key(&job.target, &job.strategy);
        tracing::debug!(id = %job.id, site = %key, group = job.rollup.as_deref().unwrap_or(""), core = self.core, "job queued");
        let site = {
            let mut sites = self.sites.borrow_mut();
            sites
                .entry(key.clone())
                .or_insert_with(|| {
                    let cfg = self.cfg();
                    let dest = cfg.destination(&job.target.destination());
                    let group = self.group_for(job.rollup.as_deref(), &key, &dest, cfg.generation);
                    let member_cap = member_cap(&cfg, &job.strategy);
                    let max_connections = match member_cap {
                        0 => group.max_connections.get(),
                        n => n.min(group.max_connections.get()),
                    };
                    Rc::new(Site {
                        key: key.clone(),
                        target: job.target.clone(),
                        strategy: job.strategy.clone(),
                        ip_key: config::source_ip_key(job.strategy.source_ip),
                        generation: Cell::new(cfg.generation),
                        current_target: RefCell::new(job.target.clone()),
                        target_version: Cell::new(0),
                        member_cap: Cell::new(member_cap),
                        shaping: SiteShaping::new(
                            self.slow_start().is_some(),
                            self.slow_start().unwrap_or(1),
                            max_connections,
                        ),
                        group,
                        group_waiting: Cell::new(false),
                        queue: RefCell::new(BinaryHeap::new()),
                        active: Cell::new(0),
                        idle: Cell::new(0),
                        wake: event_listener::Event::new(),
                        seq: Cell::new(0),
                        fair: RefCell::new((!cfg.tenants.is_empty()).then(Default::default)),
                    })
                })
                .clone()
        };
        self.refresh_limits(&site);
        if *site.current_target.borrow() != job.target {
            // Routed under a reloaded route: new connections go there.
            tracing::info!(site = %site.key, "site target changed (reload): new connections follow it");
            *site.current_target.borrow_mut() = job.target.clone();
            site.target_version.set(site.target_version.get() + 1);
        }
        let seq = match site.fair.borrow_mut().as_mut() {
            // Tenants compete: the job's place follows its tenant's share.
            Some(fair) => {
                let tenant = job.strategy.tenant.as_deref().unwrap_or("");
                let weight = self.cfg().tenants.get(tenant).map_or(1, |t| t.weight());
                fair.tag(tenant, weight)
            }
            None => {
                let seq = site.seq.get();
                site.seq.set(seq + 1);
                seq
            }
        };
        site.queue.borrow_mut().push(Queued {
            priority: job.priority,
            seq,
            job,
        });
        // A shaping suspension or bounce answers the job at once.
        if self.shaping_hold_site(&site, &self.shaping_state(&site)) {
            return;
        }
        if site.idle.get() > 0 {
            site.wake.notify(1);
        } else {
            self.connect_or_wait(&site);
        }
    }

    /// One connection to a site: takes jobs off the site's queue until it is empty
    /// (after an idle wait) or the per-connection message limit is reached. The
    /// site's rate limits and the host's connection limit delay it (timer, or a
    /// wait for a slot) rather than fail anything. A job is taken off the queue
    /// only once the connection is open, so while this task waits for a host slot
    /// another connection of the site can still take the job.
    pub(super) async fn connection_task(self: Rc<Self>, site: Rc<Site>) {
        let mut open: Option<Open> = None;
        let mut sent = 0usize;
        // A source IP permit granted and not yet used (kept while the site's own
        // message rate makes the next message wait).
        let mut ip_permit = false;
        // The same for the destination host's message rate.
        let mut host_permit = false;
        // Whether the source IP has a message rate, looked up again after a reload.
        let mut ip_rated = (u64::MAX, false);
        // The same for the cluster-wide message rate (shared limits).
        let mut cluster_permit = false;
        loop {
            // A reload's new limits apply from the next step.
            self.refresh_limits(&site);
            if ip_rated.0 != site.generation.get() {
                let cfg = self.cfg();
                ip_rated = (cfg.generation, !cfg.source_ip_rate(&site.ip_key).is_empty());
            }
            let ip_limited = ip_rated.1;
            if site.queue.borrow().is_empty() {
                if site.group.others_waiting() {
                    // Another domain of the group waits for this slot.
                    break;
                }
                let listener = site.wake.listen();
                // Another domain of the group starting to wait ends the idling.
                let group_listener = site.group.wake.listen();
                if !site.queue.borrow().is_empty() || site.group.others_waiting() {
                    continue;
                }
                site.idle.set(site.idle.get() + 1);
                let woke = futures_lite::future::or(
                    async {
                        futures_lite::future::or(listener, group_listener).await;
                        true
                    },
                    async {
                        Timer::new(self.idle_timeout()).await;
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
            // Shaping: a suspension or bounce empties the queue without a
            // connection; a lowered limit ends the connections above it.
            let shaping = self.shaping_state(&site);
            self.shaping_apply_backoff(&site, &shaping);
            if self.shaping_hold_site(&site, &shaping) || site.active.get() > self.site_limit(&site)
            {
                break;
            }
            if open.is_none() {
                // The site's connection rate.
                let wait = site.group.throttle.borrow_mut().connection_wait(now_ms());
                if let Some(wait) = wait {
                    crate::metrics::throttled(crate::metrics::Throttle::SiteConnectionRate);
                    tracing::debug!(site = %site.key, wait_ms = wait.as_millis() as u64, "site connection rate: waiting");
                    Timer::new(wait).await;
                    continue;
                }
                // The cluster-wide connection limit (shared limits on; off,
                // this Option test is all).
                let cluster_slot = if self.shared.limits.is_some() {
                    match self.cluster_slot(&site).await {
                        SlotStep::Taken(s) => Some(s),
                        SlotStep::Local => None,
                        SlotStep::Wait(wait) => {
                            crate::metrics::throttled(
                                crate::metrics::Throttle::ClusterConnectionLimit,
                            );
                            tracing::debug!(site = %site.key, "cluster connection limit: waiting");
                            Timer::new(wait).await;
                            continue;
                        }
                    }
                } else {
                    None
                };
                match self.connect(&site).await {
                    Ok(mut o) => {
                        o._cluster_slot = cluster_slot;
                        open = Some(o);
                        sent = 0;
                        host_permit = false;
                    }
                    Err(failure) => {
                        // Every job queued for this site would meet the same fate now.
                        let failed: Vec<Box<Job>> =
                            site.queue.borrow_mut().drain().map(|q| q.job).collect();
                        let mut observed = false;
                        for job in failed {
                            let result = result_for_failure(&job, &failure);
                            self.log_attempt(&job, None, failure.tls_policy, &result);
                            if !observed {
                                // One failed connection is one reply for the rules.
                                self.shaping_observe(&site, &result);
                                observed = true;
                            }
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
                        if wait > self.idle_timeout() {
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
                        if wait > self.idle_timeout() {
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
            // A message rate set by a shaping action.
            if let Some(wait) = self.shaping_rate_wait(&site, &shaping) {
                crate::metrics::throttled(crate::metrics::Throttle::SiteMessageRate);
                tracing::debug!(site = %site.key, wait_ms = wait.as_millis() as u64, "shaping message rate: waiting");
                Timer::new(wait).await;
                continue;
            }
            // The cluster-wide message rate (shared limits on; off, this
            // Option test is all).
            if !cluster_permit && self.shared.limits.is_some() {
                match self.cluster_permit(&site).await {
                    // Kept until a job is taken (the queue may have changed).
                    PermitStep::Go => cluster_permit = true,
                    PermitStep::Wait(wait) => {
                        crate::metrics::throttled(crate::metrics::Throttle::ClusterMessageRate);
                        tracing::debug!(site = %site.key, wait_ms = wait.as_millis() as u64, "cluster message rate: waiting");
                        Timer::new(wait).await;
                        continue;
                    }
                }
            }
            // The site's message rate.
            let wait = site.group.throttle.borrow_mut().message_wait(now_ms());
            if let Some(wait) = wait {
                if wait > self.idle_timeout() {
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
            if open
                .as_ref()
                .is_some_and(|o| o.target_version != site.target_version.get())
            {
                // The route moved (a reload): this connection goes to the
                // old place; the next one goes to the new.
                if let Some(o) = open.take() {
                    o.conn.quit().await;
                }
                continue;
            }
            let Some(queued) = site.queue.borrow_mut().pop() else {
                continue;
            };
            if let Some(fair) = site.fair.borrow_mut().as_mut() {
                fair.served(queued.seq);
            }
            let job = queued.job;
            ip_permit = false;
            host_permit = false;
            cluster_permit = false;
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
            self.log_attempt(&job, Some(&o.conn), None, &result);
            self.shaping_observe(&site, &result);
            self.report(&job, result);
            sent += 1;
            // Slow start may allow one more connection now.
            if site.idle.get() == 0 && !site.queue.borrow().is_empty() && self.may_connect(&site) {
                self.start_connection(site.clone());
            }
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
        site.group.active.set(site.group.active.get() - 1);
        let pending = !site.queue.borrow().is_empty();
        // Other domains of the group that waited for a slot go first.
        self.group_slot_freed(&site.group);
        if pending && site.idle.get() > 0 {
            // This connection ended over a lowered limit (shaping, a
            // reload) and left the job it was woken for: an idle one takes it.
            site.wake.notify(1);
        } else if pending {
            // A job may have arrived after the idle wait gave up.
            self.connect_or_wait(&site);
        }
        if site.active.get() == 0 && !pending {
            self.evict_site(site);
        }
    }

    /// A reload stored a new configuration: the site and its group take the
    /// destination's new limits (one load and compare when nothing changed).
    pub(super) fn refresh_limits(&self, site: &Site) {
        let cfg = self.cfg();
        if site.generation.replace(cfg.generation) == cfg.generation {
            return;
        }
        site.group
            .retune(&cfg.destination(&site.target.destination()), cfg.generation);
        site.member_cap.set(member_cap(&cfg, &site.strategy));
        if site.fair.borrow().is_none() && !cfg.tenants.is_empty() {
            // Tenants added by a reload: the site shares from its next job on.
            *site.fair.borrow_mut() = Some(Default::default());
        }
        if let Some(slow) = site.shaping.slow.borrow_mut().as_mut() {
            slow.set_max(u32::try_from(site.max_connections()).unwrap_or(u32::MAX));
        }
        tracing::debug!(site = %site.key, max_connections = site.max_connections(), "site limits reloaded");
    }

    /// An idle site (no connection, nothing queued) leaves the table once its
    /// rate limiters are full again, so the table holds the sites in use, not
    /// every domain ever mailed. The next job makes a new one.
    pub(super) fn evict_site(self: &Rc<Self>, site: Rc<Site>) {
        let idle = |s: &Site| s.active.get() == 0 && s.queue.borrow().is_empty();
        let at = site.group.throttle.borrow().forgettable_at();
        if at <= now_ms() {
            if idle(&site) {
                let removed = {
                    let mut sites = self.sites.borrow_mut();
                    let ours = sites.get(&site.key).is_some_and(|s| Rc::ptr_eq(s, &site));
                    ours.then(|| sites.remove(&site.key))
                };
                if removed.is_some() {
                    tracing::debug!(site = %site.key, "idle site evicted");
                    let group = site.group.key.clone();
                    drop(removed);
                    drop(site);
                    self.drop_group_if_unused(&group);
                }
            }
            return;
        }
        if self.stopped.get() {
            return;
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            Timer::new(std::time::Duration::from_millis(
                at.saturating_sub(now_ms()),
            ))
            .await;
            // Used again meanwhile: its own connection task evicts it later.
            if idle(&site) {
                me.evict_site(site);
            }
        })
        .detach();
    }

    /// Connects to the site's addresses in order, holding a slot of each host
    /// while trying it when `max_connections_per_host` is set.
    async fn connect(self: &Rc<Self>, site: &Site) -> Result<Open, SessionFailure> {
        // One snapshot for the whole attempt (it spans awaits).
        let cfg = self.shared.cfg.load_full();
        let target_version = site.target_version.get();
        let target = site.current_target.borrow().clone();
        let endpoints = self.endpoints(&target, &site.strategy).await?;
        let mut last = SessionFailure {
            reply: client::Reply::local(451, "4.4.4", "no host to connect to"),
            try_next: true,
            tls_policy: None,
            requiretls_refused: false,
        };
        let ehlo = site
            .strategy
            .ehlo_name
            .as_deref()
            .unwrap_or(&self.shared.ehlo_name);
        let mut slot: Option<HostSlot> = None;
        let site_max = site.group.max_per_connection.get();
        // Endpoints tried, and those that refused a REQUIRETLS message.
        let (mut tried, mut refused) = (0usize, 0usize);
        for ep in endpoints {
            // The host, or its provider per source IP (`[provider.*]`).
            let limit_key = cfg.limit_key(&ep.host, &site.ip_key);
            let key = limit_key.as_key();
            let limits = cfg.limits_for(&key);
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
            match Connection::open(&ep, &cfg.delivery, ehlo, &self.shared.tls).await {
                Ok(mut conn) => {
                    if let Some(name) = limit_key.provider() {
                        crate::metrics::provider_connection(name);
                    }
                    conn.limit_key.clone_from(&key);
                    return Ok(Open {
                        conn,
                        _slot: slot,
                        _cluster_slot: None,
                        rated_host: (!limits.message_rate.is_empty()).then_some(key),
                        max_messages: throttle::messages_per_connection(
                            site_max,
                            limits.max_messages_per_connection,
                        ),
                        target_version,
                    });
                }
                Err(f) => {
                    tracing::info!(host = %ep.host, ip = %ep.addr.ip(), reply = %f.reply, tls_policy = ep.tls.name(), ids = %waiting_ids(site), "connection attempt failed");
                    tried += 1;
                    refused += usize::from(f.requiretls_refused);
                    let next = f.try_next;
                    last = f;
                    if !next {
                        break;
                    }
                }
            }
        }
        // RFC 8689 §4.2.1: every host refused the REQUIRETLS message → bounce.
        if let Some(reply) =
            tls_policy::requiretls_outcome(site.strategy.message_tls, tried, refused, &last.reply)
        {
            tracing::info!(site = %site.key, reply = %reply, ids = %waiting_ids(site), "REQUIRETLS: no host can take the message");
            last.reply = reply;
        }
        Err(last)
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
                let mut dane_failure: Option<SessionFailure> = None;
                // The destination's MTA-STS policy (not for TLS policy none).
                let sts = if tls.level == Level::None && !strategy.message_tls.requires_tls() {
                    mta_sts::Sts::Off("TLS policy none".into())
                } else {
                    self.shared.mta_sts.policy_for(&self.resolver, domain).await
                };
                // TLS reporting: only for destinations that publish `_smtp._tls`.
                let rua = match &self.shared.tls_rpt {
                    Some(_) => super::tls_rpt_io::lookup_rua(&self.resolver, domain).await,
                    None => None,
                };
                // A policy that could not be fetched (or parsed) is reported
                // once per delivery attempt to the domain (RFC 8460 §4.3.2).
                if let (Some(rua), mta_sts::Sts::FetchFailed(e)) = (&rua, &sts) {
                    let t = Rc::new(super::tls_rpt::sts_fetch_target(domain, rua));
                    let result = super::tls_rpt::result_of_sts_fetch(e.invalid_policy());
                    super::tls_rpt_io::record_failure(&t, result, None, &e.to_string());
                }
                // REQUIRETLS: hosts with addresses, and those refused for an
                // MX not authenticated (RFC 8689 §4.2.1).
                let (mut considered, mut mx_refused) = (0usize, 0usize);
                for host in &route.hosts {
                    if host.addrs.is_empty() {
                        continue;
                    }
                    considered += 1;
                    let sts_listed = sts.mode() == Some(sluice_policy::mta_sts::Mode::Enforce)
                        && sts.skip_reason(&host.name).is_none();
                    if let Err(f) =
                        tls_policy::requiretls_mx(strategy.message_tls, host.mx_secure, sts_listed)
                    {
                        crate::metrics::requiretls_refused(f.label());
                        let reply = f.reply(tls, &host.name);
                        tracing::info!(host = %host.name, reply = %reply, "MX host skipped");
                        mx_refused += 1;
                        dane_failure = Some(SessionFailure {
                            reply,
                            try_next: false,
                            tls_policy: Some(tls.name()),
                            requiretls_refused: true,
                        });
                        continue;
                    }
                    // TLS-Required: No: the destination's DANE is ignored
                    // (RFC 8689 §4.2.2), so it is not even looked up.
                    let dane = if strategy.message_tls == tls_policy::MessageTls::Optional {
                        Dane::Off("the message's TLS-Required: No")
                    } else {
                        dane::for_host(&self.resolver, host, *port, tls).await
                    };
                    let skip = dane::skip_reason(&dane, tls, &host.name, *port);
                    let sts_policy = match &sts {
                        mta_sts::Sts::Policy { cached, .. } => Some(&cached.policy),
                        mta_sts::Sts::Off(_) | mta_sts::Sts::FetchFailed(_) => None,
                    };
                    let rpt = rua.as_ref().map(|rua| {
                        Rc::new(super::tls_rpt::target(
                            domain, &host.name, &dane, tls, sts_policy, rua,
                        ))
                    });
                    if let Some(why) = skip {
                        if let Some(t) = &rpt {
                            let result = super::tls_rpt::result_of_dane_skip(matches!(
                                dane,
                                Dane::LookupFailed { .. }
                            ));
                            super::tls_rpt_io::record_failure(t, result, None, &why);
                        }
                        let reply = client::Reply::local(451, "4.7.5", &why);
                        tracing::info!(host = %host.name, reply = %reply, "MX host skipped");
                        dane_failure = Some(SessionFailure {
                            reply,
                            try_next: false,
                            tls_policy: Some("dane"),
                            requiretls_refused: false,
                        });
                        continue;
                    }
                    // MTA-STS decides the hosts DANE does not (RFC 8461 §2).
                    let dane_decides = dane::policy(&dane, tls).is_some();
                    if let (false, Some(why)) = (dane_decides, sts.skip_reason(&host.name)) {
                        let reply = client::Reply::local(451, "4.7.5", &why);
                        tracing::info!(host = %host.name, reply = %reply, "MX host skipped");
                        dane_failure = Some(SessionFailure {
                            reply,
                            try_next: false,
                            tls_policy: Some("mta-sts"),
                            requiretls_refused: false,
                        });
                        continue;
                    }
                    if !dane_decides && sts.testing_mismatch(&host.name) {
                        crate::metrics::mta_sts_testing_failure("mx_mismatch");
                        tracing::info!(host = %host.name, domain = %domain, policy = %sts, "MTA-STS (testing): MX host matches no mx of the policy; used anyway");
                    }
                    for ip in &host.addrs {
                        eps.push(Endpoint {
                            host: host.name.clone(),
                            addr: SocketAddr::new(*ip, *port),
                            lmtp: false,
                            tls: tls.clone(),
                            dane: dane.clone(),
                            mta_sts: sts.mode(),
                            auth: None,
                            source_ip: strategy.source_ip,
                            route: None,
                            message_tls: strategy.message_tls,
                            tls_rpt: rpt.clone(),
                        });
                    }
                }
                if eps.is_empty() {
                    if let Some(mut failure) = dane_failure {
                        // Every host refused for its MX: RFC 8689 wants a bounce.
                        if let Some(reply) = tls_policy::requiretls_outcome(
                            strategy.message_tls,
                            considered,
                            mx_refused,
                            &failure.reply,
                        ) {
                            failure.reply = reply;
                        }
                        return Err(failure);
                    }
                    let error = route
                        .error
                        .clone()
                        .or_else(|| route.hosts.iter().find_map(|h| h.error.clone()));
                    return Err(route_failure(domain, error));
                }
                Ok(eps)
            }
            Target::Host {
                route,
                host,
                port,
                lmtp,
                tls,
                auth,
            } => {
                // Mandatory DANE for a smart host: its TLSA records at
                // `_PORT._tcp.HOST` must be secure and usable, else it is not
                // dialled (4.7.5, as for an MX host; the route's `fallback`
                // takes over after `fallback_after` deferrals).
                let mut dane = Dane::Off("not an MX route");
                let mut dane_ips = None;
                if tls.level == Level::Dane
                    && strategy.message_tls != tls_policy::MessageTls::Optional
                {
                    let (resolved, found) =
                        dane::for_smart_host(&self.resolver, host, *port, tls).await;
                    if let Some(why) = dane::skip_reason(&found, tls, host, *port) {
                        let reply = client::Reply::local(451, "4.7.5", &why);
                        tracing::info!(host = %host, reply = %reply, "smart host skipped");
                        return Err(SessionFailure {
                            reply,
                            try_next: false,
                            tls_policy: Some("dane"),
                            requiretls_refused: false,
                        });
                    }
                    dane = found;
                    dane_ips = Some(resolved.addrs);
                }
                let ips: Vec<IpAddr> = match (dane_ips, host.parse::<IpAddr>()) {
                    (Some(ips), _) => ips,
                    (None, Ok(ip)) => vec![ip],
                    (None, Err(_)) => {
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
                        reply: client::Reply::local(
                            451,
                            "4.4.3",
                            &format!("cannot resolve host {host}"),
                        ),
                        try_next: false,
                        tls_policy: None,
                        requiretls_refused: false,
                    });
                }
                Ok(ips
                    .into_iter()
                    .map(|ip| Endpoint {
                        host: host.clone(),
                        addr: SocketAddr::new(ip, *port),
                        lmtp: *lmtp,
                        tls: tls.clone(),
                        dane: dane.clone(),
                        mta_sts: None,
                        auth: auth.clone(),
                        source_ip: strategy.source_ip,
                        route: Some(route.clone()),
                        message_tls: strategy.message_tls,
                        tls_rpt: None,
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
                    notify: notify_keywords(r.notify),
                    orcpt: r.orcpt.clone(),
                })
                .collect(),
            size: job.size,
            eightbit: job.eightbit,
            smtputf8: job.smtputf8,
            ret: job.ret.map(ret_keyword),
            envid: job.envid.clone(),
        };
        if self.shared.spool.is_failed() {
            // Jobs queued before the spool failed closed do not go out either.
            halted();
            return Ok(deferred_all(
                job,
                Reply::new(451, "4.3.0", "spool failed: delivery stopped"),
            ));
        }
        // The body is copied out of the memory map (a read transaction cannot
        // be held across an await); a large one on a blocking thread, so a
        // copy of up to the message size limit does not stall the executor.
        let read = if job.size > OFF_EXECUTOR_BYTES {
            let spool = self.shared.spool.clone();
            let id = job.id;
            glommio::executor()
                .spawn_blocking(move || spool.with_body(id, |b| b.to_vec()))
                .await
        } else {
            self.shared.spool.with_body(job.id, |b| b.to_vec())
        };
        let body = match read {
            Ok(b) => b,
            Err(e) => {
                return Ok(deferred_all(
                    job,
                    Reply::new(451, "4.3.0", format!("spool read failed: {e}")),
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
}

fn route_failure(domain: &str, error: Option<RouteError>) -> SessionFailure {
    let reply = match &error {
        Some(RouteError::NullMx(_)) => client::Reply::local(
            556,
            "5.1.10",
            &format!("{domain} does not accept mail (null MX)"),
        ),
        Some(e) if e.is_permanent() => {
            client::Reply::local(550, "5.1.2", &format!("cannot route to {domain}: {e}"))
        }
        Some(e) => {
            client::Reply::local(451, "4.4.3", &format!("cannot route to {domain} now: {e}"))
        }
        None => client::Reply::local(451, "4.4.3", &format!("no usable MX host for {domain}")),
    };
    SessionFailure {
        reply,
        try_next: false,
        tls_policy: None,
        requiretls_refused: false,
    }
}

/// Bodies larger than this are read (and notices about them built) on a
/// blocking thread rather than on the executor.
pub(super) const OFF_EXECUTOR_BYTES: u64 = 1024 * 1024;

/// The messages waiting at a site (at most 32, then a count), for a log line
/// about a connection they all depend on.
fn waiting_ids(site: &Site) -> String {
    const SHOWN: usize = 32;
    let queue = site.queue.borrow();
    let mut ids: Vec<String> = queue
        .iter()
        .take(SHOWN)
        .map(|q| q.job.id.to_string())
        .collect();
    ids.sort();
    ids.dedup();
    if queue.len() > SHOWN {
        ids.push(format!("+{}", queue.len() - SHOWN));
    }
    ids.join(",")
}
