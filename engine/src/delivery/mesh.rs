//! The cross-core mesh: jobs and results travel between shard owners and
//! site owners by value, and the owners of destination hosts and source IPs
//! hand out connection slots and rate permits. Each host, source IP and site
//! hashes to one owner core ([`owner_of`]), so their limits hold exactly across
//! cores without locks.

use std::rc::Rc;
use std::time::Duration;

use futures_channel::oneshot;

use super::job::{Job, JobResult};
use super::now_ms;
use super::throttle::{self, HostRate, Waiter};
use super::CoreDelivery;

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

/// FNV-1a: a stable hash so every core maps a site (or host) to the same owner.
pub(super) fn owner_of(site: &str, peers: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in site.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % peers.max(1) as u64) as usize
}

/// A connection slot on a destination host; given back to the host's owner
/// when dropped.
pub(super) struct HostSlot {
    pub(super) host: String,
    core: Rc<CoreDelivery>,
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        let host = std::mem::take(&mut self.host);
        self.core.release_host(host);
    }
}

impl CoreDelivery {
    pub(super) fn on_mesh(self: &Rc<Self>, msg: MeshMsg) {
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

    /// Sends a job's result to its shard owner.
    pub(super) fn report(self: &Rc<Self>, job: &Job, result: JobResult) {
        if let Some(key) = &job.strategy.warmup {
            let delivered = result
                .outcomes
                .iter()
                .any(|(_, o)| matches!(o, super::job::Outcome::Delivered(_)));
            super::pools::settle(key, delivered, super::now_ms());
        }
        if let Some(tenant) = &job.strategy.tenant {
            for (_, outcome) in &result.outcomes {
                crate::metrics::tenant_outcome(tenant, outcome);
            }
        }
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

    /// Asks the owner of source IP `key` for a permit to send one message.
    /// None: granted (and counted). Some: ask again after this long. When the
    /// owner cannot be reached (shutting down) the message goes ahead.
    pub(super) async fn source_ip_permit(self: &Rc<Self>, key: &str) -> Option<Duration> {
        let peers = self.senders.nr_consumers().max(1);
        let me = self.senders.peer_id();
        // Salted so an IP and a host of the same name need not share an owner.
        let owner = owner_of(&format!("ip:{key}"), peers);
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
        let cfg = self.cfg();
        self.source_ips
            .borrow_mut()
            .permit(key, cfg.source_ip_rate(key), now_ms())
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
    pub(super) async fn host_rate_permit(
        self: &Rc<Self>,
        host: &str,
        kind: HostRate,
    ) -> Option<Duration> {
        let peers = self.senders.nr_consumers().max(1);
        let me = self.senders.peer_id();
        // The same owner as the host's connection slots.
        let owner = owner_of(host, peers);
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
        let limits = self.cfg().limits_for(host);
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

    /// Waits for a connection slot on `host` from the host's owner core. None
    /// only when the owner cannot be reached (shutting down).
    pub(super) async fn acquire_host(self: &Rc<Self>, host: String) -> Option<HostSlot> {
        let peers = self.senders.nr_consumers().max(1);
        let me = self.senders.peer_id();
        let owner = owner_of(&host, peers);
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
        let max = self.cfg().limits_for(&host).max_connections;
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
    pub(super) fn release_host(self: &Rc<Self>, host: String) {
        if self.stopped.get() {
            // Every core is stopping; the owner's slot table goes with it.
            return;
        }
        let peers = self.senders.nr_consumers().max(1);
        let owner = owner_of(&host, peers);
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
}
