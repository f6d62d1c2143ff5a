//! The stub resolver: cache and in-flight sharing in front of a UDP/TCP transport
//! on glommio. One [`Resolver`] per executor; it is `!Send` by design (Rc/Cell
//! state, no locks). Lookups must be awaited on a glommio executor, except cache
//! hits, which never touch the network.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpStream, UdpSocket};
use glommio::timer::Timer;

use crate::cache::{Cache, CacheKey};
use crate::clock::{Clock, SystemClock};
use crate::metrics::{bump, Metrics, MetricsSnapshot, UpstreamMetrics, UpstreamSnapshot};
use crate::{
    build_query, parse_answer, Answer, DnsError, NegativeKind, QueryType, Record, ResolverConfig,
    ResponseCode,
};

/// Receive buffer for UDP answers. We advertise 1232 bytes; 4096 leaves room for
/// servers that ignore it. A datagram that fills the buffer may have been cut by
/// the kernel, so it is retried over TCP like a TC answer.
const UDP_BUFFER: usize = 4096;

/// CNAME hops followed across queries (each answer may hold a chain itself).
const MAX_CHASE: usize = 8;

/// Why a lookup produced no answer. NXDOMAIN and NODATA are answers (see
/// [`Lookup::negative`]), not errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },

    #[error("no DNS servers configured (dns.servers is empty and /etc/resolv.conf has none)")]
    NoServers,

    #[error("no answer from any DNS server before the timeout")]
    Timeout,

    /// SERVFAIL, REFUSED, FORMERR, NOTIMP… from every server that answered.
    #[error("DNS server failure: {0}")]
    ServerFailure(ResponseCode),

    #[error("unusable DNS answer: {0}")]
    Malformed(String),

    #[error("network error talking to DNS server: {0}")]
    Io(String),

    #[error("CNAME loop at {0}")]
    CnameLoop(String),

    #[error("CNAME chain longer than {MAX_CHASE} hops")]
    CnameChainTooLong,
}

impl ResolveError {
    /// Temporary failures may succeed on retry (mail is deferred); the others
    /// will not (mail bounces). Broken CNAME data is counted as temporary, like
    /// Postfix's "name service error": a fix on the domain's side heals it and the
    /// queue lifetime still bounds the wait.
    pub fn is_temporary(&self) -> bool {
        !matches!(self, ResolveError::InvalidName { .. })
    }

    /// Ranking for the error reported when every server failed: what a server
    /// said beats what we inferred.
    fn rank(&self) -> u8 {
        match self {
            ResolveError::ServerFailure(_) => 5,
            ResolveError::CnameLoop(_) | ResolveError::CnameChainTooLong => 4,
            ResolveError::Malformed(_) => 3,
            ResolveError::Io(_) => 2,
            ResolveError::Timeout => 1,
            ResolveError::InvalidName { .. } | ResolveError::NoServers => 0,
        }
    }
}

impl From<DnsError> for ResolveError {
    fn from(e: DnsError) -> Self {
        match e {
            DnsError::InvalidName { name, reason } => ResolveError::InvalidName { name, reason },
            DnsError::ServerFailure(code) => ResolveError::ServerFailure(code),
            DnsError::CnameLoop(name) => ResolveError::CnameLoop(name),
            DnsError::CnameChainTooLong => ResolveError::CnameChainTooLong,
            other => ResolveError::Malformed(other.to_string()),
        }
    }
}

/// The outcome of one lookup.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// Shared with the cache: cloning a Lookup does not copy records.
    pub answer: Rc<Answer>,
    /// Seconds this answer stays valid (the cached lifetime left, after clamps).
    pub ttl: u32,
    pub from_cache: bool,
    /// The resolver's `dnssec_validating`: whether its AD bits are believed.
    ad_trusted: bool,
}

impl Lookup {
    pub fn records(&self) -> &[Record] {
        &self.answer.records
    }

    /// The text of each TXT record of the answer (records of other types skipped).
    pub fn txt_strings(&self) -> Vec<&str> {
        self.records()
            .iter()
            .filter_map(|r| match r {
                Record::Txt(text, _) => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    pub fn negative(&self) -> Option<NegativeKind> {
        self.answer.negative
    }

    pub fn is_nxdomain(&self) -> bool {
        matches!(self.answer.negative, Some(NegativeKind::NxDomain { .. }))
    }

    /// DNSSEC-validated: the upstream set the AD bit and the resolver is
    /// configured to trust it ([`ResolverConfig::dnssec_validating`]). DANE
    /// rests on this; an AD bit from an upstream not declared validating is
    /// ignored.
    pub fn secure(&self) -> bool {
        self.ad_trusted && self.answer.authentic_data
    }

    /// The AD bit as the upstream sent it, trusted or not (for diagnostics).
    pub fn authentic_data(&self) -> bool {
        self.answer.authentic_data
    }
}

struct Upstream {
    addr: SocketAddr,
    /// Until then the server is tried after the healthy ones.
    down_until: Cell<Option<Instant>>,
    metrics: UpstreamMetrics,
}

type Waiters = Vec<oneshot::Sender<Result<Lookup, ResolveError>>>;

pub(crate) struct Inner {
    pub(crate) config: ResolverConfig,
    clock: Rc<dyn Clock>,
    cache: RefCell<Cache>,
    inflight: RefCell<HashMap<Box<[u8]>, Waiters>>,
    upstreams: Vec<Upstream>,
    metrics: Metrics,
    buffers: RefCell<Vec<Vec<u8>>>,
}

/// A per-core resolver. Cloning is cheap and shares cache and counters.
#[derive(Clone)]
pub struct Resolver {
    pub(crate) inner: Rc<Inner>,
}

impl Resolver {
    pub fn new(config: ResolverConfig) -> Resolver {
        Resolver::with_clock(config, Rc::new(SystemClock))
    }

    /// A resolver reading time from `clock` (tests move a [`crate::ManualClock`]).
    pub fn with_clock(config: ResolverConfig, clock: Rc<dyn Clock>) -> Resolver {
        let upstreams = config
            .servers
            .iter()
            .map(|&addr| Upstream {
                addr,
                down_until: Cell::new(None),
                metrics: UpstreamMetrics::default(),
            })
            .collect();
        Resolver {
            inner: Rc::new(Inner {
                cache: RefCell::new(Cache::new(config.cache_size)),
                config,
                clock,
                inflight: RefCell::new(HashMap::new()),
                upstreams,
                metrics: Metrics::default(),
                buffers: RefCell::new(Vec::new()),
            }),
        }
    }

    pub fn config(&self) -> &ResolverConfig {
        &self.inner.config
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        let m = &self.inner.metrics;
        let cache = self.inner.cache.borrow();
        MetricsSnapshot {
            queries: m.queries.get(),
            cache_hits: m.cache_hits.get(),
            cache_misses: m.cache_misses.get(),
            inflight_joins: m.inflight_joins.get(),
            upstream_queries: m.upstream_queries.get(),
            tcp_queries: m.tcp_queries.get(),
            timeouts: m.timeouts.get(),
            failures: m.failures.get(),
            cache_entries: cache.len() as u64,
            cache_evictions: cache.evictions(),
            upstreams: self
                .inner
                .upstreams
                .iter()
                .map(|u| UpstreamSnapshot {
                    server: u.addr,
                    queries: u.metrics.queries.get(),
                    answers: u.metrics.answers.get(),
                    failures: u.metrics.failures.get(),
                    latency_sum_us: u.metrics.latency_sum_us.get(),
                })
                .collect(),
        }
    }

    pub fn clear_cache(&self) {
        self.inner.cache.borrow_mut().clear();
    }

    /// A cached answer, without going to the network.
    pub fn lookup_cached(&self, name: &str, qtype: QueryType) -> Option<Lookup> {
        let key = CacheKey::new(name, qtype)?;
        self.inner.cached(key.as_bytes())
    }

    /// One lookup: from the cache, else joined to an identical lookup already in
    /// flight on this core, else asked upstream (and cached).
    pub async fn lookup(&self, name: &str, qtype: QueryType) -> Result<Lookup, ResolveError> {
        let inner = &*self.inner;
        bump(&inner.metrics.queries);
        {
            let Some(key) = CacheKey::new(name, qtype) else {
                return Err(ResolveError::InvalidName {
                    name: name.to_string(),
                    reason: "longer than 253 characters".into(),
                });
            };
            if let Some(hit) = inner.cached(key.as_bytes()) {
                bump(&inner.metrics.cache_hits);
                return Ok(hit);
            }
        }
        bump(&inner.metrics.cache_misses);
        // The network path is a large state machine: boxed, so the future of a
        // cache hit stays small and cheap to create, move and join.
        Box::pin(inner.lookup_miss(name, qtype)).await
    }
}

impl Inner {
    async fn lookup_miss(&self, name: &str, qtype: QueryType) -> Result<Lookup, ResolveError> {
        let key = match CacheKey::new(name, qtype) {
            Some(key) => Box::<[u8]>::from(key.as_bytes()),
            None => {
                return Err(ResolveError::InvalidName {
                    name: name.to_string(),
                    reason: "longer than 253 characters".into(),
                })
            }
        };
        let key = &*key;
        loop {
            let waiter = {
                let mut inflight = self.inflight.borrow_mut();
                match inflight.get_mut(key) {
                    Some(waiters) => {
                        let (tx, rx) = oneshot::channel();
                        waiters.push(tx);
                        Some(rx)
                    }
                    None => {
                        inflight.insert(key.into(), Vec::new());
                        None
                    }
                }
            };
            let Some(rx) = waiter else { break };
            bump(&self.metrics.inflight_joins);
            match rx.await {
                Ok(result) => return result,
                // The leading lookup was dropped (its caller gave up). Its answer
                // may have reached the cache; if not, lead a lookup ourselves.
                Err(oneshot::Canceled) => {
                    if let Some(hit) = self.cached(key) {
                        return Ok(hit);
                    }
                }
            }
        }

        let leader = Leader {
            inner: self,
            key,
            done: false,
        };
        let result = self.resolve_uncached(name, qtype).await;
        if result.is_err() {
            bump(&self.metrics.failures);
        }
        leader.finish(&result);
        result
    }
}

/// Owns an in-flight slot. Dropped unfinished (the lookup was cancelled), it
/// frees the slot; the waiters' senders drop with it and they retry.
struct Leader<'a> {
    inner: &'a Inner,
    key: &'a [u8],
    done: bool,
}

impl Leader<'_> {
    fn finish(mut self, result: &Result<Lookup, ResolveError>) {
        self.done = true;
        let waiters = self.inner.inflight.borrow_mut().remove(self.key);
        for tx in waiters.into_iter().flatten() {
            let _ = tx.send(result.clone());
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.inner.inflight.borrow_mut().remove(self.key);
        }
    }
}

impl Inner {
    fn cached(&self, key: &[u8]) -> Option<Lookup> {
        let now = self.clock.now();
        let (answer, ttl) = self.cache.borrow_mut().get(key, now)?;
        Some(Lookup {
            answer,
            ttl,
            from_cache: true,
            ad_trusted: self.config.dnssec_validating,
        })
    }

    fn store(&self, name: &str, qtype: QueryType, answer: Answer) -> Lookup {
        let ttl = self.config.ttl.cache_ttl(&answer);
        let answer = Rc::new(answer);
        if let Some(key) = CacheKey::new(name, qtype) {
            self.cache
                .borrow_mut()
                .insert(key.as_bytes(), answer.clone(), ttl, self.clock.now());
        }
        Lookup {
            answer,
            ttl: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
            from_cache: false,
            ad_trusted: self.config.dnssec_validating,
        }
    }

    /// Ask upstream; when the answer stops at a CNAME whose target it does not
    /// cover (an authoritative server for another zone, or a partial answer),
    /// follow the target with further queries.
    ///
    /// Chased names use the cache but not in-flight sharing: two lookups chasing
    /// each other's names (a cross-zone CNAME loop) could otherwise wait on each
    /// other forever.
    async fn resolve_uncached(&self, name: &str, qtype: QueryType) -> Result<Lookup, ResolveError> {
        let mut answer = self.exchange(name, qtype).await?;
        let mut chain: Vec<String> = vec![normalise(name)];
        let mut checked = 0;
        let mut hops = 0;
        loop {
            for record in answer.records.get(checked..).unwrap_or_default() {
                if let Record::Cname(target, _) = record {
                    let target = normalise(target);
                    if chain.contains(&target) {
                        return Err(ResolveError::CnameLoop(target));
                    }
                    chain.push(target);
                }
            }
            checked = answer.records.len();
            let Some(target) = chase_target(&answer) else {
                break;
            };
            hops += 1;
            if hops > MAX_CHASE {
                return Err(ResolveError::CnameChainTooLong);
            }
            let cached = CacheKey::new(&target, qtype).and_then(|k| self.cached(k.as_bytes()));
            let next = match cached {
                Some(hit) => hit.answer,
                None => {
                    let fresh = self.exchange(&target, qtype).await?;
                    if chase_target(&fresh).is_some() {
                        // Incomplete on its own: cached only as part of our chain.
                        Rc::new(fresh)
                    } else {
                        self.store(&target, qtype, fresh).answer
                    }
                }
            };
            answer = join_chain(answer, &next);
        }
        Ok(self.store(name, qtype, answer))
    }

    /// Servers in the order to try: healthy ones in configured order, then those
    /// in hold-down, the soonest to recover first.
    fn server_order(&self) -> Vec<usize> {
        let now = self.clock.now();
        let mut order: Vec<usize> = (0..self.upstreams.len()).collect();
        order.sort_by_key(|&i| match self.upstreams[i].down_until.get() {
            Some(until) if until > now => (true, Some(until)),
            _ => (false, None),
        });
        order
    }

    /// One question answered by the first server that gives a usable answer,
    /// with `attempts` rounds over the servers.
    async fn exchange(&self, name: &str, qtype: QueryType) -> Result<Answer, ResolveError> {
        if self.upstreams.is_empty() {
            return Err(ResolveError::NoServers);
        }
        // Validate the name once, before any network traffic.
        build_query(0, name, qtype)?;
        let mut worst: Option<ResolveError> = None;
        for _ in 0..self.config.attempts.max(1) {
            for i in self.server_order() {
                let upstream = &self.upstreams[i];
                match self.ask(upstream, name, qtype).await {
                    Ok(answer) => {
                        upstream.down_until.set(None);
                        return Ok(answer);
                    }
                    Err(e) => {
                        bump(&upstream.metrics.failures);
                        // SERVFAIL is usually about the queried domain, not the
                        // server: try the next one but do not hold this one down.
                        let about_domain = matches!(
                            e,
                            ResolveError::ServerFailure(ResponseCode::ServFail)
                                | ResolveError::CnameLoop(_)
                                | ResolveError::CnameChainTooLong
                        );
                        if !about_domain {
                            upstream
                                .down_until
                                .set(self.clock.now().checked_add(self.config.server_holddown));
                        }
                        if worst.as_ref().is_none_or(|w| e.rank() >= w.rank()) {
                            worst = Some(e);
                        }
                    }
                }
            }
        }
        Err(worst.unwrap_or(ResolveError::Timeout))
    }

    /// One exchange with one server: UDP, then TCP if the answer was truncated.
    async fn ask(
        &self,
        upstream: &Upstream,
        name: &str,
        qtype: QueryType,
    ) -> Result<Answer, ResolveError> {
        let id: u16 = rand::random();
        let query = build_query(id, name, qtype)?;
        bump(&self.metrics.upstream_queries);
        bump(&upstream.metrics.queries);
        let started = Instant::now();
        let mut answer = self.udp(upstream.addr, id, name, qtype, &query).await?;
        if answer.truncated {
            bump(&self.metrics.upstream_queries);
            bump(&self.metrics.tcp_queries);
            answer = self.tcp(upstream.addr, id, name, qtype, &query).await?;
        }
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let m = &upstream.metrics;
        bump(&m.answers);
        m.latency_sum_us
            .set(m.latency_sum_us.get().saturating_add(micros));
        Ok(answer)
    }

    async fn udp(
        &self,
        server: SocketAddr,
        id: u16,
        name: &str,
        qtype: QueryType,
        query: &[u8],
    ) -> Result<Answer, ResolveError> {
        let socket = udp_socket(server).map_err(|e| ResolveError::Io(e.to_string()))?;
        socket
            .send_to(query, server)
            .await
            .map_err(|e| ResolveError::Io(e.to_string()))?;
        let deadline = Instant::now() + self.config.timeout;
        let mut buf = self.buffers.borrow_mut().pop().unwrap_or_default();
        buf.resize(UDP_BUFFER, 0);
        let result = self
            .udp_receive(&socket, &mut buf, server, id, name, qtype, deadline)
            .await;
        self.buffers.borrow_mut().push(buf);
        result
    }

    /// Wait for the answer to our query. Datagrams from another address, with
    /// another id or for another question are ignored (late answers, spoofing
    /// attempts) and we keep waiting until the deadline.
    #[allow(clippy::too_many_arguments)]
    async fn udp_receive(
        &self,
        socket: &UdpSocket,
        buf: &mut [u8],
        server: SocketAddr,
        id: u16,
        name: &str,
        qtype: QueryType,
        deadline: Instant,
    ) -> Result<Answer, ResolveError> {
        // An unparseable datagram from the right address: reported if nothing
        // better arrives, but never trusted over a later good one.
        let mut garbled: Option<ResolveError> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let received = if left.is_zero() {
                None
            } else {
                within(left, socket.recv_from(buf)).await
            };
            let (len, from) = match received {
                None => {
                    if garbled.is_none() {
                        bump(&self.metrics.timeouts);
                    }
                    return Err(garbled.unwrap_or(ResolveError::Timeout));
                }
                Some(Err(e)) => return Err(ResolveError::Io(e.to_string())),
                Some(Ok(got)) => got,
            };
            if !same_endpoint(from, server) {
                continue;
            }
            let datagram = buf.get(..len).unwrap_or_default();
            if len >= buf.len() && datagram.starts_with(&id.to_be_bytes()) {
                // Filled the buffer: the kernel may have cut it. Our id from the
                // right address is enough to ask again over TCP, where the whole
                // answer is checked.
                return Ok(Answer {
                    records: Vec::new(),
                    truncated: true,
                    authentic_data: false,
                    negative: None,
                    min_ttl: 0,
                });
            }
            match parse_answer(id, name, qtype, datagram) {
                Ok(answer) => return Ok(answer),
                Err(DnsError::IdMismatch { .. } | DnsError::QuestionMismatch) => continue,
                Err(DnsError::Malformed(m)) => {
                    garbled = Some(ResolveError::Malformed(m));
                    continue;
                }
                Err(other) => return Err(other.into()),
            }
        }
    }

    async fn tcp(
        &self,
        server: SocketAddr,
        id: u16,
        name: &str,
        qtype: QueryType,
        query: &[u8],
    ) -> Result<Answer, ResolveError> {
        let timeout = self.config.timeout;
        let exchange = async {
            let io = |e: std::io::Error| ResolveError::Io(format!("TCP: {e}"));
            let mut stream = TcpStream::connect_timeout(server, timeout)
                .await
                .map_err(|e| ResolveError::Io(format!("TCP connect: {e}")))?;
            let len = u16::try_from(query.len())
                .map_err(|_| ResolveError::Malformed("query too long".into()))?;
            let mut framed = Vec::with_capacity(query.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(query);
            stream.write_all(&framed).await.map_err(io)?;
            stream.flush().await.map_err(io)?;
            let mut prefix = [0u8; 2];
            stream.read_exact(&mut prefix).await.map_err(io)?;
            let mut message = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
            stream.read_exact(&mut message).await.map_err(io)?;
            let mut answer = parse_answer(id, name, qtype, &message)?;
            // TC over TCP makes no sense; take what came.
            answer.truncated = false;
            Ok(answer)
        };
        match within(timeout, exchange).await {
            Some(result) => result,
            None => {
                bump(&self.metrics.timeouts);
                Err(ResolveError::Timeout)
            }
        }
    }
}

/// A fresh socket on a kernel-chosen (random) port for every query. Made with
/// socket2 rather than glommio's `bind`, which sets SO_REUSEPORT: with it, two
/// port-0 binds of one user could share a port and see each other's answers.
fn udp_socket(server: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let (domain, local): (Domain, SocketAddr) = if server.is_ipv6() {
        (Domain::IPV6, (std::net::Ipv6Addr::UNSPECIFIED, 0).into())
    } else {
        (Domain::IPV4, (std::net::Ipv4Addr::UNSPECIFIED, 0).into())
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_cloexec(true)?;
    socket.bind(&SockAddr::from(local))?;
    Ok(UdpSocket::from(socket))
}

/// The reply must come from the address and port we asked. An IPv4 server may
/// appear as v4-mapped on a dual-stack socket; compare canonical forms.
fn same_endpoint(from: SocketAddr, server: SocketAddr) -> bool {
    from.port() == server.port() && from.ip().to_canonical() == server.ip().to_canonical()
}

/// Races a future against a timer; None when the timer wins.
pub(crate) async fn within<T>(dur: Duration, fut: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        Timer::new(dur).await;
        None
    })
    .await
}

/// Poll all futures to completion concurrently on this task; results in order.
pub async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        for (fut, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(outputs.iter_mut().filter_map(Option::take).collect())
        }
    })
    .await
}

fn normalise(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// The CNAME target to chase: the answer ends in a CNAME and says NODATA
/// without an SOA for the target's zone, meaning the server did not cover the
/// target (an authoritative server for another zone). With such an SOA the
/// NODATA is real and there is nothing to chase.
fn chase_target(answer: &Answer) -> Option<String> {
    if answer.negative != Some(NegativeKind::NoData { ttl: 0 }) {
        return None;
    }
    match answer.records.last() {
        Some(Record::Cname(target, _)) => Some(target.clone()),
        _ => None,
    }
}

/// The chain so far followed by the answer for its target.
fn join_chain(head: Answer, tail: &Answer) -> Answer {
    let head_min = head.records.iter().map(Record::ttl).min();
    let mut records = head.records;
    records.extend(tail.records.iter().cloned());
    Answer {
        records,
        truncated: false,
        authentic_data: head.authentic_data && tail.authentic_data,
        negative: tail.negative,
        min_ttl: head_min.map_or(tail.min_ttl, |h| h.min(tail.min_ttl)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn endpoint_match_is_exact() {
        let server: SocketAddr = "127.0.0.1:5353".parse().unwrap();
        assert!(same_endpoint(server, server));
        assert!(same_endpoint(
            "[::ffff:127.0.0.1]:5353".parse().unwrap(),
            server
        ));
        assert!(!same_endpoint("127.0.0.2:5353".parse().unwrap(), server));
        assert!(!same_endpoint("127.0.0.1:5354".parse().unwrap(), server));
    }

    #[test]
    fn chain_joining() {
        let head = Answer {
            records: vec![Record::Cname("b.example".into(), 50)],
            truncated: false,
            authentic_data: true,
            negative: Some(NegativeKind::NoData { ttl: 0 }),
            min_ttl: 0,
        };
        assert_eq!(chase_target(&head).as_deref(), Some("b.example"));
        let tail = Answer {
            records: vec![Record::A(Ipv4Addr::new(192, 0, 2, 1), 300)],
            truncated: false,
            authentic_data: false,
            negative: None,
            min_ttl: 300,
        };
        let joined = join_chain(head, &tail);
        assert_eq!(joined.records.len(), 2);
        assert_eq!(joined.min_ttl, 50);
        assert!(!joined.authentic_data);
        assert_eq!(joined.negative, None);
        assert_eq!(chase_target(&joined), None);
    }

    #[test]
    fn errors_are_classified() {
        assert!(ResolveError::Timeout.is_temporary());
        assert!(ResolveError::ServerFailure(ResponseCode::ServFail).is_temporary());
        assert!(!ResolveError::InvalidName {
            name: "x".into(),
            reason: "y".into()
        }
        .is_temporary());
        assert!(
            ResolveError::ServerFailure(ResponseCode::Refused).rank()
                > ResolveError::Timeout.rank()
        );
    }
}
