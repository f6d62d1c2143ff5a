//! The connection driver: the thin I/O loop around the sans-IO SMTP session.
//!
//! It reads from the socket (plain or TLS), feeds the session, writes its replies,
//! and carries out its actions: store in the spool, verify a password off the
//! executor, start TLS. Replies to pipelined commands are written together once the
//! input at hand is used up (RFC 2920 allows it; it saves syscalls).

use std::cell::Cell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::timer::Timer;
use sluice_policy::sieve::SieveExtras;
use sluice_policy::stage::{ClientFacts, FilterOutcome, Stage, StageEvent, Verdict};
use sluice_policy::{Credentials, NetworkList};
use sluice_spool::{IdGenerator, Spool};

use crate::config::{ListenerConfig, TlsMode};
use crate::filters::session::FilterSession;
use crate::metrics::Reject;
use crate::proxy::{self, ProxyParse};
use crate::smtp::server::{self, Action, PeerInfo, Session, SessionConfig, Submission};
use crate::time::{now_ms, within};

/// Everything about one listener that all cores share.
pub struct ListenerShared {
    pub name: String,
    /// Replaced by a reload; each connection takes the current one when it opens
    /// and keeps it for its life.
    pub session: ArcSwap<SessionConfig>,
    pub tls_mode: TlsMode,
    pub tls: Option<futures_rustls::TlsAcceptor>,
    /// The certificate the acceptor presents, replaceable by a reload.
    pub certs: Option<Arc<crate::tls::CertSwap>>,
    pub proxy_trusted: NetworkList,
    pub max_connections: usize,
    pub max_per_ip: usize,
    pub idle_timeout: Duration,
    pub session_timeout: Duration,
    /// Connections open on this listener, all cores together (exact global limit).
    pub active: AtomicUsize,
    /// Connections per client IP, all cores together. Touched once per connection
    /// open and close, never per command, so a mutex is cheap enough here.
    pub per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Metric handles of this listener.
    pub metrics: crate::metrics::ListenerMetrics,
    /// Bytes of message bodies held in RAM; one budget for all listeners.
    pub body_budget: Arc<crate::budget::BodyBudget>,
}

impl ListenerShared {
    pub fn new(
        name: &str,
        cfg: &ListenerConfig,
        session: Arc<SessionConfig>,
        tls: Option<(Arc<rustls::ServerConfig>, Arc<crate::tls::CertSwap>)>,
        body_budget: Arc<crate::budget::BodyBudget>,
    ) -> Result<ListenerShared, sluice_policy::PolicyError> {
        let (tls, certs) = match tls {
            Some((config, certs)) => (Some(futures_rustls::TlsAcceptor::from(config)), Some(certs)),
            None => (None, None),
        };
        Ok(ListenerShared {
            name: name.to_string(),
            session: ArcSwap::new(session),
            tls_mode: cfg.tls,
            tls,
            certs,
            proxy_trusted: NetworkList::parse(&cfg.proxy_trusted_networks)?,
            max_connections: cfg.max_connections,
            max_per_ip: cfg.max_connections_per_ip,
            idle_timeout: cfg.idle_timeout.0,
            session_timeout: cfg.session_timeout.0,
            active: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            metrics: crate::metrics::ListenerMetrics::new(name),
            body_budget,
        })
    }
}

/// What a connection task needs from its core.
pub struct CoreContext {
    pub core: u16,
    pub spool: Arc<Spool>,
    /// The way into the queue: store, count, hand to delivery (when enabled).
    pub queue: Rc<crate::queue::CoreQueue>,
    /// Queue choice and quotas, checked by sessions at RCPT and DATA; this core
    /// counts what it stores.
    pub queues: Arc<crate::queue::admission::QueueAdmission>,
    pub ids: Rc<IdGenerator>,
    /// Replaced by a reload (auth.users).
    pub credentials: Arc<ArcSwap<Credentials>>,
    pub shutdown: Arc<event_listener::Event>,
    pub shutting_down: Arc<std::sync::atomic::AtomicBool>,
    /// Sessions alive on this core (for the drain at shutdown).
    pub sessions: Cell<usize>,
    /// Inbound authentication for listeners with a `verify` table (None:
    /// no DNS configured; those listeners then accept unverified, logged at
    /// start).
    pub verify: Option<Rc<crate::verify::CoreVerify>>,
    /// DNSBL/DNSWL and greylisting for listeners that switch them on (None:
    /// no listener did at start).
    pub antispam: Option<Rc<crate::antispam::CoreAntispam>>,
}

/// Read buffer while a client sends commands (and holds a PROXY header).
const READ_BUFFER_SMALL: usize = 4 * 1024;
/// Read buffer once a read fills the small one (message data).
const READ_BUFFER: usize = 64 * 1024;
const PROXY_TIMEOUT: Duration = Duration::from_secs(10);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

enum Conn {
    Plain(TcpStream),
    Tls(Box<futures_rustls::server::TlsStream<TcpStream>>),
    /// Transient, while a STARTTLS handshake owns the stream.
    Gone,
}

impl Conn {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf).await,
            Conn::Tls(s) => s.read(buf).await,
            Conn::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.write_all(data).await,
            Conn::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Conn::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    async fn close(&mut self) {
        match self {
            Conn::Plain(s) => {
                let _ = s.close().await;
            }
            Conn::Tls(s) => {
                let _ = s.close().await;
            }
            Conn::Gone => {}
        }
    }
}

/// Removes this connection from the listener's counters when the session ends.
struct Admission<'a> {
    listener: &'a ListenerShared,
    ip: Option<IpAddr>,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.listener.active.fetch_sub(1, Ordering::Relaxed);
        self.listener.metrics.current.decrement(1.0);
        if let Some(ip) = self.ip {
            if let Ok(mut map) = self.listener.per_ip.lock() {
                if let Some(n) = map.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        map.remove(&ip);
                    }
                }
            }
        }
    }
}

impl<'a> Admission<'a> {
    fn admit_ip(&mut self, ip: IpAddr) -> bool {
        let Ok(mut map) = self.listener.per_ip.lock() else {
            return false;
        };
        let n = map.entry(ip).or_insert(0);
        if *n >= self.listener.max_per_ip {
            return false;
        }
        *n += 1;
        self.ip = Some(ip);
        true
    }
}

pub async fn handle(stream: TcpStream, listener: Arc<ListenerShared>, ctx: Rc<CoreContext>) {
    let socket_peer = match stream.peer_addr() {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!("peer address unavailable: {e}");
            return;
        }
    };
    ctx.sessions.set(ctx.sessions.get() + 1);
    // The session's filter chain (milter connections): made by `serve` when
    // the listener has filters, told QUIT here however the session ended.
    let mut chain = None;
    let result = serve(stream, socket_peer, &listener, &ctx, &mut chain).await;
    if let Some(chain) = chain {
        chain.quit().await;
    }
    ctx.sessions.set(ctx.sessions.get() - 1);
    if let Err(e) = result {
        tracing::debug!(peer = %socket_peer, listener = %listener.name, "connection ended: {e}");
    }
}

async fn serve(
    stream: TcpStream,
    socket_peer: SocketAddr,
    listener: &ListenerShared,
    ctx: &CoreContext,
    chain: &mut Option<FilterSession>,
) -> std::io::Result<()> {
    let session_config = listener.session.load_full();
    let hostname = session_config.hostname.clone();
    // Replies are batched here (one write per flight of input), so Nagle only
    // adds delay: where a flight is answered in two writes (replies owed
    // before a filter or SPF pause, then the rest), the second would wait for
    // the client's delayed ACK, ~40 ms a message.
    let _ = stream.set_nodelay(true);
    // The read timers do not cover writes: a client that stops reading (its
    // window full) would hold the session forever. No progress for the idle
    // timeout fails the write and ends the session.
    if !listener.idle_timeout.is_zero() {
        let _ = stream.set_write_timeout(Some(listener.idle_timeout));
    }
    // Milters' `{if_addr}`: one getsockname, only for listeners with milters.
    let local_addr = session_config
        .filters
        .as_ref()
        .filter(|f| !f.milters().is_empty())
        .and_then(|_| stream.local_addr().ok());
    let mut conn = Conn::Plain(stream);
    // Small until data arrives in bulk: idle connections are most of them, and
    // a recycled 64 KiB allocation is zeroed (touched) in full — 10,000 idle
    // sessions cost ~650 MiB more that way (tests/reliability_load.rs).
    let mut buf = vec![0u8; READ_BUFFER_SMALL];
    let (mut start, mut end) = (0usize, 0usize);

    let previous = listener.active.fetch_add(1, Ordering::Relaxed);
    listener.metrics.connections.increment(1);
    listener.metrics.current.increment(1.0);
    let mut admission = Admission { listener, ip: None };
    if previous >= listener.max_connections {
        listener.metrics.rejected(Reject::ConnectionLimit);
        tracing::warn!(peer = %socket_peer, listener = %listener.name, "connection limit reached");
        conn.write_all(&server::refusal(&hostname, "Error: too many connections"))
            .await?;
        conn.close().await;
        return Ok(());
    }

    // PROXY protocol: only from trusted networks, and then mandatory.
    let mut peer = socket_peer;
    if !listener.proxy_trusted.is_empty() {
        if !listener.proxy_trusted.contains(socket_peer.ip()) {
            listener.metrics.rejected(Reject::ProxyUntrusted);
            tracing::warn!(peer = %socket_peer, "PROXY listener: connection from untrusted network refused");
            conn.close().await;
            return Ok(());
        }
        loop {
            match proxy::parse(&buf[..end]) {
                ProxyParse::Header { len, source } => {
                    if let Some(src) = source {
                        peer = src;
                    }
                    start = len;
                    break;
                }
                ProxyParse::Invalid(why) => {
                    listener.metrics.rejected(Reject::ProxyInvalid);
                    tracing::warn!(peer = %socket_peer, "bad PROXY header: {why}");
                    conn.close().await;
                    return Ok(());
                }
                ProxyParse::Incomplete => {
                    if end >= proxy::MAX_HEADER {
                        listener.metrics.rejected(Reject::ProxyInvalid);
                        conn.close().await;
                        return Ok(());
                    }
                    let n = match within(PROXY_TIMEOUT, conn.read(&mut buf[end..proxy::MAX_HEADER]))
                        .await
                    {
                        Some(r) => r?,
                        None => return Ok(()),
                    };
                    if n == 0 {
                        return Ok(());
                    }
                    end += n;
                }
            }
        }
    }

    // Bans and `[[limit]]` connection rules, on the real client address.
    if let Some(bans) = crate::bans::installed() {
        if let Some(ban) = bans.banned(peer.ip(), now_ms()) {
            crate::metrics::ban_refused();
            tracing::info!(client_ip = %peer.ip(), listener = %listener.name, reason = %ban.reason, "connection from a banned address refused");
            let reply = format!(
                "421 4.7.1 {hostname} Error: your address is banned for abuse, try again later\r\n"
            );
            conn.write_all(reply.as_bytes()).await?;
            conn.close().await;
            return Ok(());
        }
    }
    let limits = crate::inbound_limits::for_listener(&listener.name);
    // Held for the session: the connection slots of `concurrency` rules.
    let _connection_permit = match &limits {
        Some(l) => {
            let facts = sluice_policy::inbound_limits::LimitFacts {
                listener: &listener.name,
                ip: peer.ip(),
                sender: None,
                auth_user: None,
                recipient: None,
            };
            let stage = sluice_policy::inbound_limits::LimitStage::Connect;
            match crate::inbound_limits::acquire(l, stage, &facts, now_ms()) {
                Ok(permit) => Some(permit),
                Err(r) => {
                    let reply = format!(
                        "{} {} {hostname} {}\r\n",
                        r.reply.code, r.reply.status, r.reply.text
                    );
                    conn.write_all(reply.as_bytes()).await?;
                    conn.close().await;
                    return Ok(());
                }
            }
        }
        None => None,
    };

    if !admission.admit_ip(peer.ip()) {
        listener.metrics.rejected(Reject::PerIpLimit);
        tracing::warn!(client_ip = %peer.ip(), listener = %listener.name, "per-IP connection limit reached");
        conn.write_all(&server::refusal(
            &hostname,
            "Error: too many connections from your address",
        ))
        .await?;
        conn.close().await;
        return Ok(());
    }
    if ctx.spool.is_failed() || ctx.shutting_down.load(Ordering::Relaxed) {
        listener.metrics.rejected(Reject::Unavailable);
        conn.write_all(&server::refusal(&hostname, "Service not available"))
            .await?;
        conn.close().await;
        return Ok(());
    }

    let mut tls_info = None;
    if listener.tls_mode == TlsMode::Implicit {
        let Some(acceptor) = &listener.tls else {
            return Ok(());
        };
        let Conn::Plain(tcp) = std::mem::replace(&mut conn, Conn::Gone) else {
            return Ok(());
        };
        match within(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Some(Ok(tls)) => {
                listener.metrics.tls_handshake(true);
                tls_info = Some(crate::tls::describe(tls.get_ref().1));
                conn = Conn::Tls(Box::new(tls));
            }
            Some(Err(e)) => {
                listener.metrics.tls_handshake(false);
                tracing::info!(client_ip = %peer.ip(), "TLS handshake failed: {e}");
                return Ok(());
            }
            None => {
                listener.metrics.tls_handshake(false);
                return Ok(());
            }
        }
    }

    // iprev starts when the client connects, beside the session (the
    // greeting does not wait for DNS); its result joins the message checks
    // and gives filters the client's name.
    let verify_cfg = session_config.verify.clone();
    let mut iprev = IprevCheck {
        task: match (&verify_cfg, &ctx.verify) {
            (Some(v), Some(core)) if v.iprev => {
                let core = core.clone();
                let ip = peer.ip();
                Some(glommio::spawn_local(async move { core.iprev(ip).await }))
            }
            _ => None,
        },
        output: None,
    };

    // The listener's filters (issue 14): None on the hot path.
    *chain = session_config
        .filters
        .clone()
        .map(|f| FilterSession::new(f, local_addr));
    let relay = session_config.relay.clone();
    // DNSBL and greylisting at RCPT (before the filters): None on the hot path.
    let mut rcpt_checks: RcptChecks = ctx
        .antispam
        .clone()
        .filter(|_| session_config.dnsbl || session_config.greylist)
        .map(|core| {
            (
                core,
                session_config.dnsbl,
                session_config.greylist,
                crate::antispam::SessionMemo::default(),
            )
        });
    let started = Instant::now();
    let mut session = Session::new(
        session_config,
        ctx.ids.clone(),
        PeerInfo {
            ip: peer.ip(),
            port: peer.port(),
            tls: tls_info,
        },
    );
    session.set_queue_admission(ctx.queues.clone());
    session.set_metrics(listener.metrics.smtp.clone());
    if let Some(list) = crate::suppression::installed() {
        if list.action() == sluice_policy::suppression::Action::Refuse {
            session.set_suppression(list.clone());
        }
    }
    session.set_body_budget(listener.body_budget.clone());
    if let Some(l) = limits {
        session.set_limits(l);
    }
    tracing::debug!(client_ip = %peer.ip(), listener = %listener.name, core = ctx.core, "connected");
    session.greeting();
    if let Some(call) = session.take_filter_call() {
        let outcome = run_filters(chain, call, &mut iprev, &dnsbl_listed(&rcpt_checks)).await;
        session.filter_result(outcome, now_ms());
    }

    loop {
        // Use up the input at hand; stop early for actions.
        while start < end {
            let (used, action) = session.receive(&buf[start..end], now_ms());
            start += used;
            match action {
                Action::Read => {}
                Action::Close => {
                    conn.write_all(session.output()).await?;
                    conn.close().await;
                    return Ok(());
                }
                Action::StartTls => {
                    conn.write_all(session.output()).await?;
                    session.clear_output();
                    // Bytes the client pipelined after STARTTLS were sent in clear
                    // text before the handshake: they are dropped, never executed.
                    start = 0;
                    end = 0;
                    let Some(acceptor) = &listener.tls else {
                        return Ok(());
                    };
                    let Conn::Plain(tcp) = std::mem::replace(&mut conn, Conn::Gone) else {
                        return Ok(());
                    };
                    match within(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Some(Ok(tls)) => {
                            listener.metrics.tls_handshake(true);
                            let info = crate::tls::describe(tls.get_ref().1);
                            conn = Conn::Tls(Box::new(tls));
                            session.tls_established(info);
                        }
                        Some(Err(e)) => {
                            listener.metrics.tls_handshake(false);
                            tracing::info!(client_ip = %peer.ip(), "STARTTLS handshake failed: {e}");
                            return Ok(());
                        }
                        None => {
                            listener.metrics.tls_handshake(false);
                            return Ok(());
                        }
                    }
                }
                Action::Store(submission) => {
                    // Replies owed for earlier pipelined commands go out first.
                    if !session.output().is_empty() {
                        conn.write_all(session.output()).await?;
                        session.clear_output();
                    }
                    let Submission {
                        id,
                        mut envelope,
                        body,
                        reservation,
                        spf,
                        filter_data,
                        discard,
                        mut quarantine,
                    } = *submission;
                    let mut summary = server::TxSummary::of(&envelope);
                    if discard {
                        drop(reservation);
                        session.data_verdict(id, &summary, &Verdict::Discard);
                        continue;
                    }
                    let received = crate::metrics::queue(&envelope.queue);
                    let mut added = Vec::new();
                    let mut body = body;
                    if let (Some(v), Some(core)) = (&verify_cfg, &ctx.verify) {
                        iprev.settle().await;
                        let dkim = ctx.queue.dkim().map(|d| d.load_full());
                        let sealer = dkim
                            .as_deref()
                            .and_then(|d| {
                                crate::queue::dkim::arc_sealer(d, v.arc_seal.as_deref(), &envelope)
                            })
                            .map(|signer| sluice_policy::auth::Sealer {
                                key: signer.key(),
                                domain: &signer.domain,
                                selector: &signer.selector,
                            });
                        let before = body.len();
                        let outcome = core
                            .check(
                                v,
                                &hostname,
                                id,
                                &envelope,
                                body,
                                spf,
                                iprev.output.as_ref(),
                                sealer,
                            )
                            .await;
                        match outcome {
                            crate::verify::Outcome::Accept {
                                headers,
                                body: checked,
                                summary: s,
                            } => {
                                added = headers;
                                // A forged own A-R removed: the size shrinks with it.
                                let removed = before.saturating_sub(checked.len()) as u64;
                                envelope.size = envelope.size.saturating_sub(removed);
                                body = checked;
                                summary.auth = s;
                            }
                            crate::verify::Outcome::Refuse {
                                code,
                                esc,
                                text,
                                summary: s,
                            } => {
                                drop(reservation);
                                summary.auth = s;
                                session.store_refused(id, &summary, code, esc, &text);
                                continue;
                            }
                        }
                    }
                    if let (true, Some(f)) = (filter_data, chain.as_mut()) {
                        let mut client = session.client_facts();
                        client.ptr = iprev.verified_name().await;
                        let outcome = data_filters(
                            f,
                            &client,
                            id,
                            &envelope,
                            &body,
                            &summary.auth,
                            &dnsbl_listed(&rcpt_checks),
                        )
                        .await;
                        let verdict = match outcome.verdict {
                            Verdict::Quarantine { reason } => {
                                quarantine = Some(reason);
                                Verdict::Accept
                            }
                            other => other,
                        };
                        if verdict != Verdict::Accept {
                            drop(reservation);
                            session.data_verdict(id, &summary, &verdict);
                            continue;
                        }
                        match crate::filters::apply::apply(
                            &outcome.modifications,
                            &mut envelope,
                            body,
                            &relay,
                        ) {
                            Ok(changed) => body = changed,
                            Err(e) => {
                                tracing::warn!(target: "sluice::filter", id = %id, error = %e, "filter modifications refused");
                                drop(reservation);
                                session.data_verdict(
                                    id,
                                    &summary,
                                    &crate::filters::failure_verdict(),
                                );
                                continue;
                            }
                        }
                        summary.sender = envelope.sender.clone();
                        summary.recipients = envelope.recipients.len();
                        summary.size = envelope.size;
                        if envelope.recipients.is_empty() {
                            drop(reservation);
                            session.data_verdict(id, &summary, &Verdict::Discard);
                            continue;
                        }
                    }
                    if let Some(reason) = quarantine {
                        // Held until an operator releases it (queue release).
                        envelope.schedule.held = true;
                        tracing::info!(target: "sluice::filter", id = %id, reason = %reason, "message quarantined");
                    }
                    let result = ctx.queue.enqueue_with(id, envelope, added, body).await;
                    // The body has left this session's memory (stored or not).
                    drop(reservation);
                    let result = result.map(|signers| summary.dkim = signers);
                    if result.is_ok() {
                        received.received.increment(1);
                    }
                    session.store_result(id, &summary, result);
                }
                Action::CheckSpf { helo, sender } => {
                    // MAIL's reply waits for SPF; what the client pipelined
                    // after it stays in the buffer and is read afterwards,
                    // so replies keep their order. Replies owed for earlier
                    // commands go out first.
                    if !session.output().is_empty() {
                        conn.write_all(session.output()).await?;
                        session.clear_output();
                    }
                    let (spf, refusal) = match (&verify_cfg, &ctx.verify) {
                        (Some(v), Some(core)) => {
                            core.check_spf(v, &hostname, peer.ip(), &helo, &sender)
                                .await
                        }
                        // No DNS configured: unverified, like the message checks.
                        _ => (Default::default(), None),
                    };
                    session.spf_result(spf, refusal);
                    if let Some(call) = session.take_filter_call() {
                        let outcome =
                            run_filters(chain, call, &mut iprev, &dnsbl_listed(&rcpt_checks)).await;
                        session.filter_result(outcome, now_ms());
                    }
                }
                Action::Filter(call) => {
                    // Like SPF: the stage's reply and what was pipelined
                    // after it wait; replies owed before go out first.
                    if !session.output().is_empty() {
                        conn.write_all(session.output()).await?;
                        session.clear_output();
                    }
                    if let (Stage::Rcpt, Some((core, dnsbl, greylist, memo))) =
                        (call.stage, rcpt_checks.as_mut())
                    {
                        let facts = crate::antispam::RcptFacts {
                            ip: peer.ip(),
                            helo: call.client.helo.as_deref().unwrap_or(""),
                            sender: call.sender.as_deref().unwrap_or(""),
                            recipient: call.recipient.as_deref().unwrap_or(""),
                            trusted: session.trusted(),
                            dnsbl: *dnsbl,
                            greylist: *greylist,
                        };
                        let verdict = core.check_rcpt(memo, &facts, now_ms()).await;
                        if verdict != Verdict::Accept {
                            session.filter_result(FilterOutcome::with_verdict(verdict), now_ms());
                            continue;
                        }
                    }
                    let outcome =
                        run_filters(chain, call, &mut iprev, &dnsbl_listed(&rcpt_checks)).await;
                    session.filter_result(outcome, now_ms());
                }
                Action::Authenticate { user, password } => {
                    let credentials = ctx.credentials.load_full();
                    let user_for_check = user.clone();
                    let ok = glommio::executor()
                        .spawn_blocking(move || credentials.verify(&user_for_check, &password))
                        .await;
                    if let Some(delay) = session.auth_result(user, ok, now_ms()) {
                        // The 535 (and anything after it) waits: guessing gets slow.
                        Timer::new(delay).await;
                    }
                    if let (Some(c), Some(mechanism)) = (chain.as_mut(), session.auth_mechanism()) {
                        c.set_auth_type(mechanism);
                    }
                    if let Some(call) = session.take_filter_call() {
                        let outcome =
                            run_filters(chain, call, &mut iprev, &dnsbl_listed(&rcpt_checks)).await;
                        session.filter_result(outcome, now_ms());
                    }
                }
            }
        }
        start = 0;
        if !session.output().is_empty() {
            conn.write_all(session.output()).await?;
            session.clear_output();
        }
        // A transaction that ended without a stored message (RSET, refused
        // at some stage): milters still holding it are told ABORT.
        if let Some(c) = chain.as_mut() {
            if !session.in_transaction() {
                c.abort().await;
            }
        }
        if session.is_closed() {
            conn.close().await;
            return Ok(());
        }

        let remaining = listener.session_timeout.saturating_sub(started.elapsed());
        let wait = listener.idle_timeout.min(remaining);
        let idle = !session.in_transaction();
        // All input is used up here: between transactions, go back to the
        // small buffer.
        if idle && buf.len() > READ_BUFFER_SMALL {
            buf = vec![0u8; READ_BUFFER_SMALL];
        }
        let shutdown = ctx.shutdown.listen();
        // Between transactions a shutdown ends the session at once; inside one, the
        // client gets until its timeout (bounded by the shutdown grace).
        let stop_now = idle && ctx.shutting_down.load(Ordering::Relaxed);
        let outcome = if stop_now {
            ReadOutcome::Shutdown
        } else {
            futures_lite::future::or(
                async { ReadOutcome::Data(conn.read(&mut buf).await) },
                futures_lite::future::or(
                    async {
                        Timer::new(wait).await;
                        ReadOutcome::Timeout
                    },
                    async {
                        if idle {
                            shutdown.await;
                            ReadOutcome::Shutdown
                        } else {
                            std::future::pending().await
                        }
                    },
                ),
            )
            .await
        };
        match outcome {
            ReadOutcome::Data(Ok(0)) => return Ok(()),
            ReadOutcome::Data(Ok(n)) => {
                end = n;
                // A full read: more is coming in bulk, take the large buffer
                // (resize keeps the bytes just read).
                if n == buf.len() && buf.len() < READ_BUFFER {
                    buf.resize(READ_BUFFER, 0);
                }
            }
            ReadOutcome::Data(Err(e)) => return Err(e),
            ReadOutcome::Timeout => {
                tracing::info!(client_ip = %peer.ip(), listener = %listener.name, "session timeout");
                session.timeout();
                conn.write_all(session.output()).await?;
                conn.close().await;
                return Ok(());
            }
            ReadOutcome::Shutdown => {
                session.shutdown();
                conn.write_all(session.output()).await?;
                conn.close().await;
                return Ok(());
            }
        }
    }
}

/// The client's iprev check, started at connect when the listener's
/// `verify` asks for it, awaited the first time the message checks or a
/// filter need it. Dropping it (the session ends first) cancels the task.
struct IprevCheck {
    task: Option<glommio::Task<crate::verify::IprevOutput>>,
    output: Option<crate::verify::IprevOutput>,
}

impl IprevCheck {
    /// Waits for the check, if one is running.
    async fn settle(&mut self) {
        if let Some(task) = self.task.take() {
            self.output = Some(task.await);
        }
    }

    /// The client's name for filters (`client.ptr`): the first PTR name
    /// when iprev passed, else none.
    async fn verified_name(&mut self) -> Option<String> {
        self.settle().await;
        let out = self.output.as_ref()?;
        if out.result != sluice_policy::auth::IprevResult::Pass {
            return None;
        }
        let name = out.ptr.as_ref()?.first()?;
        Some(name.trim_end_matches('.').to_string())
    }
}

/// The session's RCPT checks: the antispam core, the listener's `dnsbl`
/// and `greylist` switches, and what the zones said so far.
type RcptChecks = Option<(
    Rc<crate::antispam::CoreAntispam>,
    bool,
    bool,
    crate::antispam::SessionMemo,
)>;

/// The zones that listed the client (Sieve's `${env.dnsbl}`); empty, not
/// allocated, when nothing was looked up.
fn dnsbl_listed(checks: &RcptChecks) -> String {
    checks
        .as_ref()
        .map(|(_, _, _, memo)| memo.listed())
        .unwrap_or_default()
}

/// One stage's filters (accept when the listener has none).
async fn run_filters(
    chain: &mut Option<FilterSession>,
    mut call: Box<crate::filters::OwnedEvent>,
    iprev: &mut IprevCheck,
    dnsbl: &str,
) -> FilterOutcome {
    match chain {
        Some(c) => {
            call.client.ptr = iprev.verified_name().await;
            let extras = SieveExtras {
                dnsbl,
                ..SieveExtras::default()
            };
            c.run(&call.event(), &extras).await
        }
        None => FilterOutcome::accept(),
    }
}

/// The DATA filters on the whole message, with the inbound authentication
/// results when the listener checked them.
async fn data_filters(
    filters: &mut FilterSession,
    client: &ClientFacts,
    id: sluice_spool::MessageId,
    envelope: &sluice_spool::Envelope,
    body: &[u8],
    auth: &str,
    dnsbl: &str,
) -> FilterOutcome {
    let recipients: Vec<String> = envelope
        .recipients
        .iter()
        .map(|r| r.address.clone())
        .collect();
    let queue_id = id.to_string();
    let event = StageEvent {
        stage: Stage::Data,
        client,
        queue_id: Some(&queue_id),
        sender: Some(&envelope.sender),
        sender_params: &[],
        recipient: None,
        recipients: &recipients,
        message: Some(body),
    };
    let (spf, dkim, dmarc) = crate::filters::auth_words(auth);
    let extras = SieveExtras {
        spf,
        dkim,
        dmarc,
        dnsbl,
    };
    filters.run(&event, &extras).await
}

enum ReadOutcome {
    Data(std::io::Result<usize>),
    Timeout,
    Shutdown,
}
