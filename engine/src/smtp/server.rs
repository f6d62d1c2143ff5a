//! The SMTP/LMTP server session as a sans-IO state machine.
//!
//! Bytes go in through [`Session::receive`]; replies accumulate in an output buffer
//! the driver writes out; anything that needs the outside world (store a message,
//! check a password, start TLS, close) comes back as an [`Action`], and the session
//! consumes no more input until the driver reports the outcome. There are no
//! sockets, clocks or threads here: the time is passed in, so every rule is testable
//! byte by byte.

use std::borrow::Cow;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use sluice_policy::sender_login::SenderLogins;
use sluice_policy::{RelayDecision, RelayPolicy};
use sluice_spool::{
    BodyType, DeliverBy, DeliverByMode, Envelope, IdGenerator, MessageId, NoticeLimit, Notify,
    Recipient, RecipientStatus, Ret, Schedule, TlsRequest,
};
use smtp_proto::{
    Request, MAIL_BY_NOTIFY, MAIL_BY_RETURN, MAIL_BY_TRACE, RCPT_NOTIFY_DELAY, RCPT_NOTIFY_FAILURE,
    RCPT_NOTIFY_NEVER, RCPT_NOTIFY_SUCCESS,
};

use super::data::{BareNewlineScanner, BodyFlags, DataDecoder};
use super::hygiene;
use crate::auth_guard::AuthGuard;
use crate::budget::{BodyBudget, BodyReservation};
use crate::config::{
    AddMissingHeaders, BareNewline, ListenerConfig, NulBytes, Protocol, UntrustedExtension,
    UntrustedNotices,
};
use crate::queue::admission::QueueAdmission;
use sluice_policy::stage::{FilterReply, Stage, Verdict};

/// FUTURERELEASE (RFC 4865): the longest hold accepted, in seconds (7 days).
/// Queue expiry and delay notices count from the release, not the arrival.
pub const MAX_HOLD_SECS: u64 = 7 * 24 * 3600;
/// DELIVERBY (RFC 2852): the shortest by-time accepted in R (return) mode, in
/// seconds. Anything shorter could not survive one retry; N (notify) mode takes
/// any by-time, even zero or negative (notify at once if not delivered).
pub const MIN_BY_SECS: i64 = 60;
/// RFC 2852's by-time range.
const MAX_BY_SECS: i64 = 999_999_999;

/// Per-listener settings the session needs; built once, shared by all its sessions.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub listener: String,
    pub hostname: String,
    pub greeting: String,
    pub protocol: Protocol,
    /// STARTTLS can be offered (listener tls = "starttls").
    pub starttls: bool,
    /// AUTH may be offered without TLS.
    pub auth_plaintext: bool,
    /// Users exist, so AUTH is offered at all.
    pub auth_enabled: bool,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_line_length: usize,
    pub max_errors: usize,
    pub bare_newline: BareNewline,
    pub nul_bytes: NulBytes,
    /// Longest line of message data, CRLF excluded (0: no limit).
    pub max_message_line_length: usize,
    pub relay: Arc<RelayPolicy>,
    /// AUTH failure delays and limits, shared by all listeners and cores.
    pub auth_guard: Arc<AuthGuard>,
    /// What untrusted clients' envelope extensions and notices get.
    pub untrusted: UntrustedPolicy,
    /// `[server.listener.NAME.verify]`: inbound authentication (None: off).
    pub verify: Option<Arc<sluice_policy::auth::VerifyConfig>>,
    /// `honor_tls_required_no`: a `TLS-Required: No` header field relaxes the
    /// message's outbound TLS policy (RFC 8689 §3).
    pub honor_tls_required_no: bool,
    /// The listener's filters (issue 14); None with `filter_stages` empty
    /// when it has none.
    pub filters: Option<Arc<crate::filters::Filters>>,
    /// The stages with a filter: checked (a bit test) at every stage.
    /// RCPT is in it also when the listener checks DNSBLs or greylists
    /// (the driver runs those before the filters).
    pub filter_stages: crate::filters::StageSet,
    /// `dnsbl` and `greylist`: checked by the driver at each RCPT.
    pub dnsbl: bool,
    pub greylist: bool,
    /// Date and Message-ID added where missing (`add_missing_headers`).
    pub add_missing_headers: AddMissingHeaders,
    /// `[auth.sender_login]` when the listener has `enforce_sender_login`.
    pub sender_logins: Option<Arc<SenderLogins>>,
    /// `[[rewrite]]` rules for this listener and `[srs]`; None: nothing to
    /// rewrite (the hot path: one Option test at MAIL, RCPT and the end of DATA).
    pub rewrite: Option<Arc<sluice_policy::rewrite::Rewriter>>,
}

/// The listener's `untrusted_*` keys: what a client outside the relay networks,
/// not authenticated, gets for MT-PRIORITY, HOLDFOR/HOLDUNTIL and notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UntrustedPolicy {
    pub mt_priority: UntrustedExtension,
    pub hold: UntrustedExtension,
    pub notices: UntrustedNotices,
}

impl UntrustedPolicy {
    pub fn of(l: &ListenerConfig) -> UntrustedPolicy {
        UntrustedPolicy {
            mt_priority: l.untrusted_mt_priority,
            hold: l.untrusted_hold,
            notices: l.untrusted_notices,
        }
    }
}

impl Default for UntrustedPolicy {
    fn default() -> Self {
        UntrustedPolicy::of(&ListenerConfig::default())
    }
}

impl SessionConfig {
    pub fn from_listener(
        name: &str,
        l: &ListenerConfig,
        server_hostname: &str,
        relay: Arc<RelayPolicy>,
        auth_enabled: bool,
        auth_guard: Arc<AuthGuard>,
        sender_logins: &Arc<SenderLogins>,
    ) -> SessionConfig {
        let session_filters = l
            .filters
            .as_ref()
            .filter(|f| !f.session_stages().is_empty());
        SessionConfig {
            listener: name.to_string(),
            hostname: l
                .hostname
                .clone()
                .unwrap_or_else(|| server_hostname.to_string()),
            greeting: l.greeting.clone(),
            protocol: l.protocol,
            starttls: l.tls == crate::config::TlsMode::Starttls,
            auth_plaintext: l.auth_plaintext,
            auth_enabled,
            max_message_size: l.max_message_size.0,
            max_recipients: l.max_recipients,
            max_line_length: l.max_line_length,
            max_errors: l.max_errors,
            bare_newline: l.bare_newline,
            nul_bytes: l.nul_bytes,
            max_message_line_length: l.max_message_line_length,
            relay,
            auth_guard,
            untrusted: UntrustedPolicy::of(l),
            verify: l.verify.clone().map(Arc::new),
            honor_tls_required_no: l.honor_tls_required_no,
            // Filters only before delivery leave the session on the hot path.
            filter_stages: {
                let mut set = session_filters
                    .map(|f| f.session_stages())
                    .unwrap_or_default();
                if l.dnsbl || l.greylist {
                    set.insert(Stage::Rcpt);
                }
                set
            },
            dnsbl: l.dnsbl,
            greylist: l.greylist,
            filters: session_filters.cloned(),
            add_missing_headers: l.add_missing_headers,
            sender_logins: l.enforce_sender_login.then(|| sender_logins.clone()),
            rewrite: l.rewrite.clone(),
        }
    }
}

/// What the driver must do before the session can go on.
#[derive(Debug)]
pub enum Action {
    /// Nothing: all input consumed, read more.
    Read,
    /// Write the output (the 220), then run the TLS handshake; input after the
    /// STARTTLS line has been discarded (STARTTLS injection defence).
    StartTls,
    /// Store the message durably, then call [`Session::store_result`].
    Store(Box<Submission>),
    /// Verify credentials (slow hash: off the executor), then call [`Session::auth_result`].
    Authenticate { user: String, password: String },
    /// Check SPF for this MAIL FROM (and the HELO name) before MAIL is
    /// answered, then call [`Session::spf_result`]; the reply to MAIL and
    /// everything pipelined after it wait for that.
    CheckSpf { helo: String, sender: String },
    /// Run the listener's filters for this stage (issue 14), then call
    /// [`Session::filter_result`]; the stage's reply and everything
    /// pipelined after it wait for that. Only for stages with filters.
    Filter(Box<crate::filters::OwnedEvent>),
    /// Write the output, then close the connection.
    Close,
}

/// A complete message ready for the spool.
#[derive(Debug)]
pub struct Submission {
    pub id: MessageId,
    pub envelope: Envelope,
    pub body: Vec<u8>,
    /// The body's share of the memory budget; dropping it (once the body is
    /// stored or given up) gives it back.
    pub reservation: Option<BodyReservation>,
    /// SPF as found at MAIL FROM (None when the listener does not check it).
    pub spf: Option<sluice_policy::auth::SpfResults>,
    /// The listener has DATA filters: run them before storing.
    pub filter_data: bool,
    /// An earlier stage's filter discarded the message (or every recipient):
    /// answer as if queued, store nothing.
    pub discard: bool,
    /// An earlier stage's filter quarantined the message: store it held.
    pub quarantine: Option<String>,
}

#[derive(Debug)]
enum State {
    Command,
    Data(DataDecoder),
    /// Reading a BDAT chunk of `remaining` bytes; `discard` when the transaction
    /// already failed (the bytes are still consumed to keep the stream in sync).
    Bdat {
        remaining: usize,
        last: bool,
        discard: Option<(u16, &'static str, String)>,
    },
    AuthPlainResponse,
    AuthLoginUser,
    AuthLoginPassword {
        user: String,
    },
    /// Waiting for the driver to report a store or auth outcome.
    Paused,
    Closed,
}

#[derive(Debug, Default)]
struct Transaction {
    sender: Option<String>,
    ret: Option<Ret>,
    envid: Option<String>,
    body_type: Option<BodyType>,
    smtputf8: bool,
    priority: i16,
    hold_until_unix: u64,
    deliver_by: Option<DeliverBy>,
    /// SIZE= from MAIL (0 when not given), for quota checks before the body.
    declared_size: u64,
    /// REQUIRETLS on MAIL (RFC 8689), accepted on TLS sessions only.
    requiretls: bool,
    /// Virtual queue, decided by the rules for the first recipient.
    queue: Option<String>,
    recipients: Vec<Recipient>,
    /// Set when a body started (first BDAT chunk or DATA): id, buffer, checks.
    id: Option<MessageId>,
    body: Vec<u8>,
    /// Bytes of our Received header at the start of `body`.
    received_len: usize,
    bdat_bytes: u64,
    bdat_scan: BareNewlineScanner,
    bdat_too_big: bool,
    /// The body's share of the memory budget (None without a budget, or once
    /// the body is no longer kept).
    reservation: Option<BodyReservation>,
    /// The budget could not hold the body: it is read to its end and discarded,
    /// then answered 452 4.3.1.
    over_budget: bool,
    /// SPF found when MAIL FROM arrived, for the checks after DATA.
    spf: Option<sluice_policy::auth::SpfResults>,
    /// Recipients a filter discarded at RCPT (answered 250, never delivered).
    discarded: usize,
    /// A filter at MAIL discarded the transaction.
    discard: bool,
    /// A filter at MAIL or RCPT quarantined the message.
    quarantine: Option<String>,
    /// The recipient waiting for the RCPT filters.
    pending_rcpt: Option<Recipient>,
    /// The sender as received, when a `[[rewrite]]` rule changed it.
    original_sender: Option<String>,
    /// (original, new) addresses header fields follow (`headers = true`):
    /// the sender for From, the recipients for To and Cc.
    header_sender: Option<(String, String)>,
    header_recipients: Vec<(String, String)>,
    /// Slots of `[[limit]]` concurrency rules this transaction holds (given
    /// back when it ends).
    limit_permits: Vec<sluice_policy::inbound_limits::LimitPermit>,
}

impl Transaction {
    /// The budget cannot hold the body any longer: it is dropped now and the
    /// rest is read only to find its end, then answered 452 4.3.1.
    fn discard_over_budget(&mut self, client_ip: IpAddr) {
        tracing::info!(%client_ip, "message memory budget spent: body discarded");
        self.over_budget = true;
        self.reservation = None;
        self.body = Vec::new();
    }
}

/// The parts of an envelope the transaction log line needs once the envelope has
/// gone to the spool.
#[derive(Debug, Clone)]
pub struct TxSummary {
    pub sender: String,
    pub recipients: usize,
    pub size: u64,
    /// The DKIM signers that signed, comma-separated (set after the store).
    pub dkim: String,
    /// Inbound authentication results, "spf=pass dkim=pass dmarc=pass"
    /// ("" when the listener verifies nothing).
    pub auth: String,
    /// The message came with REQUIRETLS (RFC 8689).
    pub requiretls: bool,
}

impl TxSummary {
    pub fn of(envelope: &Envelope) -> TxSummary {
        TxSummary {
            sender: envelope.sender.clone(),
            recipients: envelope.recipients.len(),
            size: envelope.size,
            dkim: String::new(),
            auth: String::new(),
            requiretls: envelope.tls_request == TlsRequest::RequireTls,
        }
    }
}

/// A snapshot of a session's internals, see [`Session::debug_view`].
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugView {
    /// "command", "data", "bdat", "auth", "paused" or "closed".
    pub state: &'static str,
    /// Bytes of a command line held across reads.
    pub line: usize,
    /// The current line outgrew the limit and is being skipped to its CRLF.
    pub discarding: bool,
    /// Bytes of the message body held (Received header included).
    pub body: usize,
    pub recipients: usize,
    /// Bytes still to come in the current BDAT chunk.
    pub bdat_remaining: usize,
}

/// Connection facts the driver knows.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub ip: IpAddr,
    pub port: u16,
    /// Set when the connection is TLS from the first byte (implicit TLS).
    pub tls: Option<String>,
}

pub struct Session {
    cfg: Arc<SessionConfig>,
    ids: Rc<IdGenerator>,
    peer: PeerInfo,
    state: State,
    out: Vec<u8>,
    /// A command line split across reads.
    line: Vec<u8>,
    /// The current line outgrew the limit; discard up to its CRLF.
    line_overflow: bool,
    helo: Option<String>,
    extended: bool,
    tls: Option<String>,
    auth_user: Option<String>,
    /// The SASL mechanism of the AUTH in progress or done (milters' `{auth_type}`).
    auth_mechanism: Option<&'static str>,
    errors: usize,
    /// Failed AUTH attempts in this session (for the delay and the cap).
    auth_failures: usize,
    tx: Transaction,
    /// Queue choice and quotas; without it every message goes to "default".
    queues: Option<Arc<QueueAdmission>>,
    /// Suppressed recipients are refused at RCPT (`[suppression] action = "refuse"`).
    suppression: Option<Arc<crate::suppression::Suppressions>>,
    /// Messages accepted in this session (for the log).
    pub accepted: u64,
    /// Replies sent by class (2xx..5xx) and not yet added to `metrics`.
    replies: [u64; 4],
    metrics: Option<Arc<crate::metrics::SmtpMetrics>>,
    /// Bytes of bodies held in RAM, shared by all sessions; None = unbounded.
    body_budget: Option<Arc<BodyBudget>>,
    /// The stage whose filters the session waits for.
    filter_wait: Option<sluice_policy::stage::Stage>,
    /// A filter call made outside `receive` (connect, auth, MAIL after
    /// SPF), for the driver to take with [`Session::take_filter_call`].
    pending_filter: Option<Box<crate::filters::OwnedEvent>>,
    /// A filter at connect, EHLO or AUTH discarded everything this session sends.
    discard_session: bool,
    /// A filter at connect, EHLO or AUTH quarantined everything this session sends.
    quarantine_session: Option<String>,
    /// `[[limit]]` rules that apply to this listener (None: none do).
    limits: Option<Arc<sluice_policy::inbound_limits::InboundLimits>>,
    /// A MAIL command was accepted (a session without one is a scan for `[ban]`).
    mail_seen: bool,
    /// Ended by the relay (shutdown), not by the client: not a scan.
    ended_by_us: bool,
}

/// The reply when the memory budget cannot hold a body.
const BUDGET_TEXT: &str = "Error: insufficient system resources, try again later";

impl Session {
    pub fn new(cfg: Arc<SessionConfig>, ids: Rc<IdGenerator>, peer: PeerInfo) -> Session {
        Session {
            tls: peer.tls.clone(),
            cfg,
            ids,
            peer,
            state: State::Command,
            out: Vec::with_capacity(512),
            line: Vec::new(),
            line_overflow: false,
            helo: None,
            extended: false,
            auth_user: None,
            auth_mechanism: None,
            errors: 0,
            auth_failures: 0,
            tx: Transaction::default(),
            queues: None,
            suppression: None,
            accepted: 0,
            replies: [0; 4],
            metrics: None,
            body_budget: None,
            filter_wait: None,
            pending_filter: None,
            discard_session: false,
            quarantine_session: None,
            limits: None,
            mail_seen: false,
            ended_by_us: false,
        }
    }

    /// Check MAIL and RCPT against these `[[limit]]` rules.
    pub fn set_limits(&mut self, limits: Arc<sluice_policy::inbound_limits::InboundLimits>) {
        self.limits = Some(limits);
    }

    /// `[[limit]]` rules at MAIL or RCPT: Err(()) after the refusal's reply
    /// (not a protocol error: the client should come back later).
    fn check_limits(
        &mut self,
        stage: sluice_policy::inbound_limits::LimitStage,
        sender: Option<&str>,
        recipient: Option<&str>,
        now_ms: u64,
    ) -> Result<(), ()> {
        let Some(limits) = self.limits.clone() else {
            return Ok(());
        };
        let facts = sluice_policy::inbound_limits::LimitFacts {
            listener: &self.cfg.listener,
            ip: self.peer.ip,
            sender,
            auth_user: self.auth_user.as_deref(),
            recipient,
        };
        match crate::inbound_limits::acquire(&limits, stage, &facts, now_ms) {
            Ok(permit) => {
                self.tx.limit_permits.push(permit);
                Ok(())
            }
            Err(r) => {
                self.reply(r.reply.code, &r.reply.status, &r.reply.text);
                Err(())
            }
        }
    }

    /// Bound the bytes of message bodies this session holds by `budget`.
    pub fn set_body_budget(&mut self, budget: Arc<BodyBudget>) {
        self.body_budget = Some(budget);
    }

    /// In the relay networks or authenticated: trusted with envelope
    /// extensions, notices and a larger share of the body budget.
    pub fn trusted(&self) -> bool {
        self.auth_user.is_some() || self.cfg.relay.relay_networks().contains(self.peer.ip)
    }

    /// Takes the first share of the body budget for a new body; false when the
    /// budget has nothing left for this client.
    fn reserve_body(&mut self) -> bool {
        let Some(budget) = &self.body_budget else {
            return true;
        };
        let slot = (!self.trusted()).then(|| budget.client_slot(self.peer.ip));
        let mut r = BodyReservation::new(budget.clone(), slot);
        if !r.cover(crate::budget::GRANT) {
            tracing::info!(client_ip = %self.peer.ip, "message memory budget spent: body refused");
            return false;
        }
        self.tx.reservation = Some(r);
        true
    }

    /// Let the rules choose each message's virtual queue, and refuse mail for a
    /// queue over its quota (452 4.3.1 at RCPT, DATA or the end of data).
    pub fn set_queue_admission(&mut self, queues: Arc<QueueAdmission>) {
        self.queues = Some(queues);
    }

    /// Refuse recipients on the suppression list at RCPT.
    pub fn set_suppression(&mut self, list: Arc<crate::suppression::Suppressions>) {
        self.suppression = Some(list);
    }

    /// Count replies and transactions into a listener's metrics.
    pub fn set_metrics(&mut self, metrics: Arc<crate::metrics::SmtpMetrics>) {
        self.metrics = Some(metrics);
    }

    /// Adds the replies counted so far to the metrics (once per transaction
    /// and at the end, rather than once per reply).
    fn flush_metrics(&mut self) {
        if let Some(m) = &self.metrics {
            m.add_replies(&mut self.replies);
        }
    }

    /// The 220 banner; with connect filters, a filter call first (see
    /// [`Session::take_filter_call`]).
    pub fn greeting(&mut self) {
        if self.filtered(Stage::Connect) {
            self.pending_filter = Some(self.filter_call(Stage::Connect, None));
            return;
        }
        self.banner();
    }

    fn banner(&mut self) {
        let text = format!("{} {}", self.cfg.hostname, self.cfg.greeting);
        self.reply(220, "", &text);
    }

    pub fn output(&self) -> &[u8] {
        &self.out
    }

    pub fn clear_output(&mut self) {
        self.out.clear();
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// A transaction is under way (MAIL given, or a body being received or stored).
    pub fn in_transaction(&self) -> bool {
        self.tx.sender.is_some() || !matches!(self.state, State::Command | State::Closed)
    }

    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// For the fuzz targets and property tests: where the state machine is and
    /// what it buffers, so they can check its bounds from outside.
    #[doc(hidden)]
    pub fn debug_view(&self) -> DebugView {
        let (state, bdat_remaining) = match &self.state {
            State::Command => ("command", 0),
            State::Data(_) => ("data", 0),
            State::Bdat { remaining, .. } => ("bdat", *remaining),
            State::AuthPlainResponse | State::AuthLoginUser | State::AuthLoginPassword { .. } => {
                ("auth", 0)
            }
            State::Paused => ("paused", 0),
            State::Closed => ("closed", 0),
        };
        DebugView {
            state,
            line: self.line.len(),
            discarding: self.line_overflow,
            body: self.tx.body.len(),
            recipients: self.tx.recipients.len(),
            bdat_remaining,
        }
    }

    /// The idle or session timer ran out.
    pub fn timeout(&mut self) {
        let text = format!("{} Error: timeout exceeded", self.cfg.hostname);
        self.reply(421, "4.4.2", &text);
        self.state = State::Closed;
    }

    /// The relay is shutting down or the spool failed: tell the client to come back.
    pub fn shutdown(&mut self) {
        self.ended_by_us = true;
        let text = format!(
            "{} Service not available, closing connection",
            self.cfg.hostname
        );
        self.reply(421, "4.3.2", &text);
        self.state = State::Closed;
    }

    /// The TLS handshake after STARTTLS finished; `info` is "version cipher".
    pub fn tls_established(&mut self, info: String) {
        self.tls = Some(info);
        // RFC 3207 §4.2: forget everything learnt before TLS, credentials included.
        self.auth_user = None;
        self.helo = None;
        self.extended = false;
        self.tx = Transaction::default();
        self.line.clear();
        self.line_overflow = false;
        self.state = State::Command;
    }

    /// Feed received bytes. Returns how many were consumed and what the driver must do.
    /// When the action is `Read`, all input was consumed.
    pub fn receive(&mut self, input: &[u8], now_ms: u64) -> (usize, Action) {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match &mut self.state {
                State::Closed => return (input.len(), Action::Close),
                State::Paused => return (pos, Action::Read),
                State::Data(decoder) => {
                    let limit_hit = decoder.flags.too_big;
                    // Decoding never makes the body grow by more than the input.
                    let grown = (self.tx.body.len() + rest.len()) as u64;
                    if self
                        .tx
                        .reservation
                        .as_mut()
                        .is_some_and(|r| !r.cover(grown))
                    {
                        self.tx.discard_over_budget(self.peer.ip);
                    }
                    match decoder.feed(rest, &mut self.tx.body) {
                        None => {
                            if decoder.flags.too_big && !limit_hit {
                                // Stop holding the oversized body in memory.
                                self.tx.body = Vec::new();
                                self.tx.reservation = None;
                            }
                            if self.tx.over_budget {
                                // Decoded only to find the end; the buffer is
                                // reused, at most one read's worth.
                                self.tx.body.clear();
                            }
                            return (input.len(), Action::Read);
                        }
                        Some(n) => {
                            pos += n;
                            let flags = decoder.flags;
                            self.state = State::Command;
                            if self.tx.over_budget {
                                self.fail_body(452, "4.3.1", BUDGET_TEXT);
                            } else if let Some(action) = self.end_of_body(flags, now_ms) {
                                return (pos, action);
                            }
                        }
                    }
                }
                State::Bdat {
                    remaining,
                    last,
                    discard,
                } => {
                    let take = (*remaining).min(rest.len());
                    let chunk = &rest[..take];
                    *remaining -= take;
                    pos += take;
                    if discard.is_none() {
                        self.tx.bdat_bytes += take as u64;
                        self.tx.bdat_scan.scan(chunk);
                        if self.tx.bdat_bytes > self.cfg.max_message_size {
                            self.tx.bdat_too_big = true;
                            self.tx.body = Vec::new();
                            self.tx.reservation = None;
                        } else if !self.tx.over_budget {
                            let grown = (self.tx.body.len() + take) as u64;
                            let fits = self.tx.reservation.as_mut().is_none_or(|r| r.cover(grown));
                            if fits {
                                self.tx.body.extend_from_slice(chunk);
                            } else {
                                self.tx.discard_over_budget(self.peer.ip);
                            }
                        }
                    }
                    if *remaining > 0 {
                        return (input.len(), Action::Read);
                    }
                    let last = *last;
                    let discard = discard.take();
                    self.state = State::Command;
                    if let Some((code, esc, text)) = discard {
                        self.error_reply(code, esc, &text);
                        if last {
                            self.tx = Transaction::default();
                        }
                    } else if self.tx.over_budget {
                        if last {
                            self.fail_body(452, "4.3.1", BUDGET_TEXT);
                        } else {
                            // Later chunks of this transaction are refused too.
                            self.reply(452, "4.3.1", BUDGET_TEXT);
                        }
                    } else if last {
                        self.tx.bdat_scan.finish();
                        let flags = self.tx.bdat_scan.flags(self.tx.bdat_too_big);
                        if let Some(action) = self.end_of_body(flags, now_ms) {
                            return (pos, action);
                        }
                    } else {
                        let text = format!("Ok: {} octets received", self.tx.bdat_bytes);
                        self.reply(250, "2.0.0", &text);
                    }
                }
                State::Command
                | State::AuthPlainResponse
                | State::AuthLoginUser
                | State::AuthLoginPassword { .. } => {
                    if rest.is_empty() {
                        return (pos, Action::Read);
                    }
                    match self.take_line(rest) {
                        LineResult::Incomplete => return (input.len(), Action::Read),
                        LineResult::TooLong(n) => {
                            pos += n;
                            self.state = State::Command;
                            self.error_reply(500, "5.5.2", "Error: line too long");
                            if self.is_closed() {
                                return (input.len(), Action::Close);
                            }
                        }
                        LineResult::BareNewline => {
                            // Never treat a bare LF/CR as a line end (smuggling); the
                            // stream is now unframed, so close like Postfix does.
                            self.reply(
                                500,
                                "5.5.2",
                                "Error: bare <CR> or <LF> received; commands must end in CRLF",
                            );
                            self.state = State::Closed;
                            return (input.len(), Action::Close);
                        }
                        LineResult::Line(n) => {
                            let owned;
                            let line: &[u8] = if self.line.is_empty() {
                                &rest[..n]
                            } else {
                                owned = std::mem::take(&mut self.line);
                                &owned
                            };
                            pos += n;
                            let more_input = pos < input.len();
                            if let Some(action) = self.line_received(line, more_input, now_ms) {
                                return match action {
                                    // Anything after STARTTLS or a close is dropped.
                                    Action::StartTls | Action::Close => (input.len(), action),
                                    other => (pos, other),
                                };
                            }
                            if self.is_closed() {
                                return (input.len(), Action::Close);
                            }
                        }
                    }
                }
            }
        }
    }

    /// A complete body (DATA or BDAT LAST): refused for its size or a listener
    /// policy, or submitted (NULs stripped under nul_bytes = "strip").
    fn end_of_body(&mut self, flags: BodyFlags, now_ms: u64) -> Option<Action> {
        if flags.too_big {
            self.fail_body(552, "5.3.4", "Error: message too big");
        } else if let Some(text) = self.body_refusal(flags) {
            self.fail_body(550, "5.6.0", &text);
        } else {
            if flags.nul {
                // body_refusal let NULs through: nul_bytes = "strip".
                self.tx.body.retain(|&b| b != 0);
            }
            if let Some(text) = self.hygiene(flags, now_ms) {
                self.fail_body(552, "5.3.4", text);
                return None;
            }
            if let (Some(_), Some(id)) = (&self.cfg.rewrite, self.tx.id) {
                self.rewrite_message(id, now_ms);
            }
            return Some(self.submit(now_ms));
        }
        None
    }

    /// Submission hygiene on a complete body: bare line ends normalized
    /// (`bare_newline = "normalize"`), then missing Date and Message-ID added
    /// (`add_missing_headers`). Err is the reply text when the result no longer
    /// fits the size limit.
    fn hygiene(&mut self, flags: BodyFlags, now_ms: u64) -> Option<&'static str> {
        if flags.bare_newline && self.cfg.bare_newline == BareNewline::Normalize {
            if let Some(fixed) = hygiene::normalize_line_ends(&self.tx.body) {
                self.tx.body = fixed;
            }
        }
        let add = match self.cfg.add_missing_headers {
            AddMissingHeaders::No => false,
            AddMissingHeaders::Trusted => self.trusted(),
            AddMissingHeaders::Always => true,
        };
        if let (true, Some(id)) = (add, self.tx.id) {
            let start = self.tx.received_len.min(self.tx.body.len());
            let present = hygiene::header_presence(&self.tx.body[start..]);
            let fields =
                hygiene::missing_fields(present, &id.to_string(), &self.cfg.hostname, now_ms);
            if !fields.is_empty() {
                self.tx.body.splice(start..start, fields.bytes());
            }
        }
        let limit = self.cfg.max_message_size + self.tx.received_len as u64;
        (self.tx.body.len() as u64 > limit).then_some("Error: message too big")
    }

    /// Why a complete body (not too big) is refused under this listener's
    /// policies, if it is; all three answer 550 5.6.0.
    fn body_refusal(&self, flags: BodyFlags) -> Option<String> {
        if flags.bare_newline && self.cfg.bare_newline == BareNewline::Reject {
            return Some(
                "Error: bare <CR> or <LF> in message data (lines must end in CRLF)".into(),
            );
        }
        if flags.nul && self.cfg.nul_bytes == NulBytes::Reject {
            return Some("Error: NUL byte in message data".into());
        }
        if flags.long_line {
            return Some(format!(
                "Error: message data line longer than {} octets",
                self.cfg.max_message_line_length
            ));
        }
        None
    }

    /// Finds the end of a command line in `rest` (continuing a partial line held in
    /// `self.line`). Only CRLF ends a line.
    fn take_line(&mut self, rest: &[u8]) -> LineResult {
        // A CR ending the previous read must be followed by LF now.
        if self.line.last() == Some(&b'\r') {
            if rest[0] != b'\n' {
                return LineResult::BareNewline;
            }
            if self.line_overflow || self.line.len() + 1 > self.cfg.max_line_length {
                self.line.clear();
                self.line_overflow = false;
                return LineResult::TooLong(1);
            }
            self.line.push(b'\n');
            return LineResult::Line(1);
        }
        let Some(at) = memchr::memchr2(b'\r', b'\n', rest) else {
            self.hold_partial(rest);
            return LineResult::Incomplete;
        };
        if rest[at] == b'\n' {
            // LF with no CR before it.
            return LineResult::BareNewline;
        }
        match rest.get(at + 1) {
            None => {
                self.hold_partial(rest);
                LineResult::Incomplete
            }
            Some(b'\n') => {
                let n = at + 2;
                if self.line_overflow || self.line.len() + n > self.cfg.max_line_length {
                    self.line.clear();
                    self.line_overflow = false;
                    return LineResult::TooLong(n);
                }
                if !self.line.is_empty() {
                    self.line.extend_from_slice(&rest[..n]);
                }
                LineResult::Line(n)
            }
            Some(_) => LineResult::BareNewline,
        }
    }

    /// Keeps a partial line, bounded: past the limit only the last byte is kept (to
    /// see whether it is the CR of the terminating CRLF).
    fn hold_partial(&mut self, rest: &[u8]) {
        if self.line_overflow || self.line.len() + rest.len() > self.cfg.max_line_length {
            self.line_overflow = true;
            self.line.clear();
            if rest.last() == Some(&b'\r') {
                self.line.push(b'\r');
            }
        } else {
            self.line.extend_from_slice(rest);
        }
    }

    fn line_received(&mut self, line: &[u8], more_input: bool, now_ms: u64) -> Option<Action> {
        match std::mem::replace(&mut self.state, State::Command) {
            State::AuthPlainResponse => return self.auth_plain_response(strip_crlf(line)),
            State::AuthLoginUser => {
                let text = strip_crlf(line);
                if text == b"*" {
                    self.error_reply(501, "5.7.0", "Authentication cancelled");
                    return None;
                }
                match decode_b64_utf8(text) {
                    Some(user) => {
                        self.reply(334, "", "UGFzc3dvcmQ6");
                        self.state = State::AuthLoginPassword { user };
                    }
                    None => self.error_reply(501, "5.5.2", "Invalid base64 data"),
                }
                return None;
            }
            State::AuthLoginPassword { user } => {
                let text = strip_crlf(line);
                if text == b"*" {
                    self.error_reply(501, "5.7.0", "Authentication cancelled");
                    return None;
                }
                return match decode_b64_utf8(text) {
                    Some(password) => {
                        self.state = State::Paused;
                        Some(Action::Authenticate { user, password })
                    }
                    None => {
                        self.error_reply(501, "5.5.2", "Invalid base64 data");
                        None
                    }
                };
            }
            _ => {}
        }
        if let Some((code, esc, text)) = unusable_command(line) {
            self.error_reply(code, esc, text);
            return None;
        }
        let request = match Request::parse(&mut line.iter()) {
            // smtp-proto reads "<postmaster>" (no domain) as an empty address, like
            // "<>"; RFC 5321 §4.5.1 requires accepting the former, so tell them apart.
            Ok(Request::Rcpt { mut to }) if to.address.is_empty() => {
                if is_bare_postmaster(line) {
                    to.address = Cow::Borrowed("postmaster");
                    Request::Rcpt { to }
                } else {
                    self.error_reply(501, "5.1.3", "Error: bad recipient address syntax");
                    return None;
                }
            }
            Ok(Request::Mail { .. }) if super::requiretls::repeated(line) => {
                self.error_reply(501, "5.5.4", "Error: REQUIRETLS given more than once");
                return None;
            }
            Ok(r) => r,
            Err(e) => {
                self.parse_error(e);
                return None;
            }
        };
        self.command(request, more_input, now_ms)
    }

    fn parse_error(&mut self, e: smtp_proto::Error) {
        use smtp_proto::Error as E;
        match e {
            E::UnknownCommand => self.error_reply(500, "5.5.1", "Error: command not recognized"),
            E::InvalidSenderAddress => {
                self.error_reply(501, "5.1.7", "Error: bad sender address syntax")
            }
            E::InvalidRecipientAddress => {
                self.error_reply(501, "5.1.3", "Error: bad recipient address syntax")
            }
            E::SyntaxError { syntax } => {
                self.error_reply(501, "5.5.4", &format!("Syntax: {syntax}"))
            }
            E::InvalidParameter { param } => {
                self.error_reply(501, "5.5.4", &format!("Error: invalid parameter {param}"))
            }
            E::UnsupportedParameter { param } => self.error_reply(
                555,
                "5.5.4",
                &format!("Error: unsupported parameter {}", printable(&param)),
            ),
            _ => self.error_reply(500, "5.5.2", "Error: syntax error"),
        }
    }

    fn command(
        &mut self,
        request: Request<Cow<'_, str>>,
        more_input: bool,
        now_ms: u64,
    ) -> Option<Action> {
        let lmtp = self.cfg.protocol == Protocol::Lmtp;
        match request {
            Request::Lhlo { host } if lmtp => return self.ehlo(&host, true, now_ms),
            Request::Ehlo { host } if !lmtp => return self.ehlo(&host, true, now_ms),
            Request::Helo { host } if !lmtp => return self.ehlo(&host, false, now_ms),
            Request::Ehlo { .. } | Request::Helo { .. } => {
                self.error_reply(500, "5.5.1", "Error: use LHLO with LMTP")
            }
            Request::Lhlo { .. } => self.error_reply(500, "5.5.1", "Error: LHLO is for LMTP"),
            Request::Mail { from } => return self.mail(from, now_ms),
            Request::Rcpt { to } => return self.rcpt(to),
            Request::Data => return self.data(more_input, now_ms),
            Request::Bdat {
                chunk_size,
                is_last,
            } => self.bdat(chunk_size, is_last, now_ms),
            Request::Rset => {
                self.tx = Transaction::default();
                self.reply(250, "2.0.0", "Ok");
            }
            Request::Noop { .. } => self.reply(250, "2.0.0", "Ok"),
            Request::Quit => {
                let text = format!("{} closing connection", self.cfg.hostname);
                self.reply(221, "2.0.0", &text);
                self.state = State::Closed;
                return Some(Action::Close);
            }
            Request::Help { .. } => {
                // Only what this session would accept now (as EHLO advertises it).
                let mut text = String::from(if lmtp {
                    "Commands: LHLO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY"
                } else {
                    "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY"
                });
                if self.cfg.starttls && self.tls.is_none() {
                    text.push_str(" STARTTLS");
                }
                if self.auth_offered() {
                    text.push_str(" AUTH");
                }
                self.reply(214, "2.0.0", &text);
            }
            Request::Vrfy { .. } => self.reply(
                252,
                "2.5.0",
                "Cannot VRFY user, but will accept message and attempt delivery",
            ),
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => {
                self.error_reply(502, "5.5.1", "Error: command not implemented")
            }
            Request::StartTls => return self.starttls(),
            Request::Auth {
                mechanism,
                initial_response,
            } => return self.auth(mechanism, &initial_response, now_ms),
        }
        None
    }

    fn ehlo(&mut self, host: &str, extended: bool, now_ms: u64) -> Option<Action> {
        self.helo = Some(host.to_string());
        self.extended = extended;
        self.tx = Transaction::default();
        if self.filtered(Stage::Ehlo) {
            return Some(Action::Filter(self.filter_call(Stage::Ehlo, None)));
        }
        self.ehlo_reply(now_ms);
        None
    }

    fn ehlo_reply(&mut self, now_ms: u64) {
        let host = self.helo.clone().unwrap_or_default();
        let host = host.as_str();
        let extended = self.extended;
        if !extended {
            let text = self.cfg.hostname.clone();
            self.reply(250, "", &text);
            return;
        }
        let mut lines = vec![format!(
            "{} Hello {} [{}]",
            self.cfg.hostname,
            printable(host),
            self.peer.ip
        )];
        lines.push("PIPELINING".into());
        lines.push(format!("SIZE {}", self.cfg.max_message_size));
        lines.push("8BITMIME".into());
        lines.push("SMTPUTF8".into());
        lines.push("ENHANCEDSTATUSCODES".into());
        lines.push("CHUNKING".into());
        lines.push("DSN".into());
        lines.push(format!("DELIVERBY {MIN_BY_SECS}"));
        // RFC 4865: max-future-release-interval and max-future-release-date-time.
        let latest = chrono::DateTime::from_timestamp((now_ms / 1000 + MAX_HOLD_SECS) as i64, 0)
            .unwrap_or_default()
            .format("%Y-%m-%dT%H:%M:%SZ");
        lines.push(format!("FUTURERELEASE {MAX_HOLD_SECS} {latest}"));
        lines.push("MT-PRIORITY MIXER".into());
        // RFC 8689 §2: only where the session itself is protected by TLS.
        if self.tls.is_some() {
            lines.push("REQUIRETLS".into());
        }
        if self.cfg.starttls && self.tls.is_none() {
            lines.push("STARTTLS".into());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        lines.push("HELP".into());
        self.multiline(250, &lines);
    }

    /// What the rules match on, before the body (size as declared).
    fn facts(&self, size: u64) -> sluice_policy::MessageFacts<'_> {
        sluice_policy::MessageFacts {
            listener: &self.cfg.listener,
            client_ip: Some(self.peer.ip),
            auth_user: self.auth_user.as_deref(),
            sender: self.tx.sender.as_deref().unwrap_or(""),
            priority: self.tx.priority,
            size,
        }
    }

    /// The queue quota before a body is read; Err is the reply text.
    fn quota_check(&self, size: u64) -> Result<(), String> {
        let (Some(queues), Some(queue)) = (&self.queues, &self.tx.queue) else {
            return Ok(());
        };
        queues.check(queue, size).map_err(|e| {
            tracing::info!(client_ip = %self.peer.ip, "{e}");
            "Error: insufficient system storage (queue full)".to_string()
        })
    }

    fn auth_offered(&self) -> bool {
        self.cfg.auth_enabled
            && self.auth_user.is_none()
            && (self.tls.is_some() || self.cfg.auth_plaintext)
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<Cow<'_, str>>, now_ms: u64) -> Option<Action> {
        if self.helo.is_none() {
            let greet = if self.cfg.protocol == Protocol::Lmtp {
                "LHLO"
            } else {
                "EHLO/HELO"
            };
            return self.refuse_mail(503, "5.5.1", &format!("Error: send {greet} first"));
        }
        if self.tx.sender.is_some() {
            return self.refuse_mail(503, "5.5.1", "Error: nested MAIL command");
        }
        if from.size as u64 > self.cfg.max_message_size {
            return self.refuse_mail(552, "5.3.4", "Error: message size exceeds fixed limit");
        }
        let requiretls = from.flags & smtp_proto::MAIL_REQUIRETLS != 0;
        if requiretls && self.tls.is_none() {
            // Not advertised in clear; a client that asks anyway must not
            // believe the message will be protected (RFC 8689 §2).
            return self.refuse_mail(530, "5.7.10", "Error: REQUIRETLS needs a TLS session");
        }
        let (mut hold_until_unix, deliver_by) = match mail_times(&from, now_ms) {
            Ok(times) => times,
            Err(text) => return self.refuse_mail(501, "5.5.4", &text),
        };
        let mut priority = from.mt_priority.clamp(-9, 9) as i16;
        if !self.trusted() {
            // RFC 6710 §5: a priority is only worth what its source is trusted
            // with; lowering one's own mail harms no one.
            let hold_asked = from.hold_for != 0 || from.hold_until != 0;
            let policy = self.cfg.untrusted;
            for (asked, what, rule) in [
                (priority > 0, "MT-PRIORITY above 0", policy.mt_priority),
                (hold_asked, "HOLDFOR/HOLDUNTIL", policy.hold),
            ] {
                if asked && rule == UntrustedExtension::Reject {
                    tracing::info!(client_ip = %self.peer.ip, "{what} from an untrusted client refused");
                    let text = format!("Error: {what} only from trusted or authenticated clients");
                    return self.refuse_mail(550, "5.7.1", &text);
                }
            }
            if priority > 0 && policy.mt_priority == UntrustedExtension::Ignore {
                tracing::info!(client_ip = %self.peer.ip, priority, "MT-PRIORITY from an untrusted client ignored");
                priority = 0;
            }
            if hold_asked && policy.hold == UntrustedExtension::Ignore {
                tracing::info!(client_ip = %self.peer.ip, "HOLDFOR/HOLDUNTIL from an untrusted client ignored");
                hold_until_unix = 0;
            }
        }
        let body_type = if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            BodyType::BinaryMime
        } else if from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0 {
            BodyType::EightBitMime
        } else {
            BodyType::SevenBit
        };
        let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
        if !smtputf8 && !from.address.is_ascii() {
            // RFC 6531 §3.5: never sent on without SMTPUTF8, so never accepted.
            return self.refuse_mail(
                553,
                "5.6.7",
                "Error: non-ASCII sender address without SMTPUTF8",
            );
        }
        if from.env_id.as_deref().is_some_and(|e| !is_xtext_safe(e)) {
            return self.refuse_mail(501, "5.5.4", "Error: invalid parameter ENVID");
        }
        if let (Some(logins), Some(user)) = (&self.cfg.sender_logins, &self.auth_user) {
            if !logins.allows(user, &from.address) {
                tracing::info!(
                    client_ip = %self.peer.ip,
                    user = %printable(user),
                    sender = %printable(&from.address),
                    "sender address not owned by the authenticated user"
                );
                let text = format!(
                    "Error: <{}>: sender address not owned by user {}",
                    printable(&from.address),
                    printable(user)
                );
                return self.refuse_mail(553, "5.7.1", &text);
            }
        }
        // A client refused by a limit did send mail: not a scan.
        self.mail_seen = true;
        let limited = self.check_limits(
            sluice_policy::inbound_limits::LimitStage::Mail,
            Some(from.address.as_ref()),
            None,
            now_ms,
        );
        if limited.is_err() {
            // Nothing of this transaction is kept (its permits included).
            self.tx = Transaction::default();
            return None;
        }
        self.tx.body_type = Some(body_type);
        self.tx.smtputf8 = smtputf8;
        self.tx.ret = if from.flags & smtp_proto::MAIL_RET_FULL != 0 {
            Some(Ret::Full)
        } else if from.flags & smtp_proto::MAIL_RET_HDRS != 0 {
            Some(Ret::Headers)
        } else {
            None
        };
        self.tx.envid = from.env_id.map(Cow::into_owned);
        self.tx.priority = priority;
        self.tx.hold_until_unix = hold_until_unix;
        self.tx.deliver_by = deliver_by;
        self.tx.declared_size = from.size as u64;
        self.tx.requiretls = requiretls;
        // A quoted local part keeps its quotes (see smtp::address).
        let sender = super::address::requote(&from.address).into_owned();
        let spf_sender = sender.clone();
        self.tx.sender = Some(sender);
        if self.cfg.rewrite.is_some() {
            self.rewrite_sender();
        }
        if self.cfg.verify.as_ref().is_some_and(|v| v.spf) {
            // The reply waits for SPF (Session::spf_result), which checks the
            // sender as the client gave it.
            self.state = State::Paused;
            return Some(Action::CheckSpf {
                helo: self.helo.clone().unwrap_or_default(),
                sender: spf_sender,
            });
        }
        if self.filtered(Stage::Mail) {
            return Some(Action::Filter(self.filter_call(Stage::Mail, None)));
        }
        self.reply(250, "2.1.0", "Ok");
        None
    }

    /// `[[rewrite]]` on the sender just taken: routing, filters and the
    /// spool see the new address.
    fn rewrite_sender(&mut self) {
        let (Some(rw), Some(sender)) = (&self.cfg.rewrite, &self.tx.sender) else {
            return;
        };
        let Some(new) = rw.sender(self.trusted(), sender) else {
            return;
        };
        tracing::info!(
            target: "sluice::rewrite",
            listener = %self.cfg.listener,
            client_ip = %self.peer.ip,
            rule = new.rule,
            original = %printable(sender),
            sender = %printable(&new.address),
            "sender rewritten"
        );
        let original = sender.clone();
        if new.headers {
            self.tx.header_sender = Some((original.clone(), new.address.clone()));
        }
        self.tx.original_sender = Some(original);
        self.tx.sender = Some(new.address);
    }

    /// `[[rewrite]]` and SRS on a recipient the relay decision accepted:
    /// Ok(None) unchanged, Ok(Some) the address routing and the spool see,
    /// Err when it is refused (an SRS address that does not verify).
    fn rewrite_recipient(&mut self, address: &str) -> Result<Option<String>, ()> {
        use sluice_policy::rewrite::RecipientRewrite;
        let Some(rw) = &self.cfg.rewrite else {
            return Ok(None);
        };
        let sender = self
            .tx
            .original_sender
            .as_deref()
            .or(self.tx.sender.as_deref())
            .unwrap_or("");
        let day = crate::time::now_ms() / 86_400_000;
        let (new, rule) = match rw.recipient(self.trusted(), sender, address, day) {
            RecipientRewrite::Unchanged => return Ok(None),
            RecipientRewrite::SrsRefused(why) => {
                tracing::info!(
                    target: "sluice::rewrite",
                    listener = %self.cfg.listener,
                    client_ip = %self.peer.ip,
                    recipient = %printable(address),
                    "SRS recipient refused: {why}"
                );
                // Policy, not a protocol error: not counted towards max_errors.
                self.reply(550, "5.1.1", &format!("Error: {why}"));
                return Err(());
            }
            RecipientRewrite::SrsReversed(original) => (original, None),
            RecipientRewrite::Rewritten(w) => {
                if w.headers {
                    self.tx
                        .header_recipients
                        .push((address.to_string(), w.address.clone()));
                }
                (w.address, Some(w.rule))
            }
        };
        tracing::info!(
            target: "sluice::rewrite",
            listener = %self.cfg.listener,
            client_ip = %self.peer.ip,
            rule = rule.map(|r| r.to_string()).unwrap_or_else(|| "srs".into()),
            original = %printable(address),
            recipient = %printable(&new),
            "recipient rewritten"
        );
        Ok(Some(new))
    }

    /// At the end of DATA: SRS for a forwarded sender, then the header edits,
    /// header address rewrites and disclaimer of the rules that apply.
    fn rewrite_message(&mut self, id: MessageId, now_ms: u64) {
        let Some(rw) = self.cfg.rewrite.clone() else {
            return;
        };
        let sender = self.tx.sender.clone().unwrap_or_default();
        let original = self.tx.original_sender.clone().unwrap_or(sender.clone());
        let foreign_sender = sender
            .rsplit_once('@')
            .is_some_and(|(_, d)| !self.cfg.relay.is_local_domain(d));
        let forwarded = foreign_sender && self.tx.recipients.iter().any(|r| !r.local);
        let plan = rw.message_plan(self.trusted(), &original, forwarded);
        if plan.srs {
            if let Some(new) = rw
                .srs()
                .and_then(|s| s.forward(&sender, now_ms / 86_400_000))
            {
                tracing::info!(
                    target: "sluice::rewrite",
                    id = %id,
                    listener = %self.cfg.listener,
                    original = %printable(&sender),
                    sender = %printable(&new),
                    "sender rewritten with SRS"
                );
                self.tx.sender = Some(new);
            }
        }
        let header_sender = self.tx.header_sender.take();
        let header_recipients = std::mem::take(&mut self.tx.header_recipients);
        if !plan.edits_message() && header_sender.is_none() && header_recipients.is_empty() {
            return;
        }
        let start = self.tx.received_len.min(self.tx.body.len());
        let message = &self.tx.body[start..];
        if plan.disclaimer.is_some() {
            if let Some(why) = sluice_policy::rewrite::disclaimer_skip(message) {
                tracing::info!(target: "sluice::rewrite", id = %id, "disclaimer not added: {why:?}");
            }
        }
        let edited = sluice_policy::rewrite::edit_message(
            message,
            &plan,
            header_sender
                .as_ref()
                .map(|(a, b)| (a.as_str(), b.as_str())),
            &header_recipients,
        );
        if let Some(edited) = edited {
            self.tx.body.truncate(start);
            self.tx.body.extend_from_slice(&edited);
        }
    }

    /// A MAIL command refused before any check: the error reply, no action.
    fn refuse_mail(&mut self, code: u16, esc: &str, text: &str) -> Option<Action> {
        self.error_reply(code, esc, text);
        None
    }

    /// The outcome of an [`Action::CheckSpf`]: `refusal` (550 5.7.23/24 or
    /// 451 4.7.24 by the listener's actions) ends the transaction before it
    /// began; otherwise MAIL is answered 250 and the results are kept for
    /// the checks after DATA. A refusal is policy, not a protocol error: it
    /// does not count towards `max_errors`.
    pub fn spf_result(
        &mut self,
        spf: sluice_policy::auth::SpfResults,
        refusal: Option<(u16, &'static str, String)>,
    ) {
        self.state = State::Command;
        match refusal {
            Some((code, esc, text)) => {
                let tx = std::mem::take(&mut self.tx);
                tracing::info!(
                    target: "sluice::smtp",
                    listener = %self.cfg.listener,
                    client_ip = %self.peer.ip,
                    helo = %printable(self.helo.as_deref().unwrap_or("")),
                    sender = %printable(tx.sender.as_deref().unwrap_or("")),
                    result = code,
                    auth_results = %spf.report().summary(),
                    error = %text,
                    "sender refused by SPF"
                );
                self.reply(code, esc, &text);
                if let Some(m) = &self.metrics {
                    m.tx_rejected.increment(1);
                }
            }
            None => {
                self.tx.spf = Some(spf);
                if self.filtered(Stage::Mail) {
                    self.pending_filter = Some(self.filter_call(Stage::Mail, None));
                    return;
                }
                self.reply(250, "2.1.0", "Ok");
            }
        }
    }

    fn rcpt(&mut self, to: smtp_proto::RcptTo<Cow<'_, str>>) -> Option<Action> {
        if self.tx.sender.is_none() {
            self.error_reply(503, "5.5.1", "Error: need MAIL command");
            return None;
        }
        if self.tx.id.is_some() {
            self.error_reply(503, "5.5.1", "Error: RCPT after BDAT");
            return None;
        }
        if to.orcpt.as_deref().is_some_and(|o| !is_xtext_safe(o)) {
            self.error_reply(501, "5.5.4", "Error: invalid parameter ORCPT");
            return None;
        }
        self.rcpt_checked(to)
    }

    fn rcpt_checked(&mut self, to: smtp_proto::RcptTo<Cow<'_, str>>) -> Option<Action> {
        self.rcpt_policy(to);
        if self.tx.pending_rcpt.is_some() {
            let address = self.tx.pending_rcpt.as_ref().map(|r| r.address.clone());
            return Some(Action::Filter(self.filter_call(Stage::Rcpt, address)));
        }
        None
    }

    fn rcpt_policy(&mut self, to: smtp_proto::RcptTo<Cow<'_, str>>) {
        if self.tx.recipients.len() >= self.cfg.max_recipients {
            // Not counted as a protocol error: a bulk client simply sends the rest later.
            self.reply(452, "4.5.3", "Error: too many recipients");
            return;
        }
        // A quoted local part keeps its quotes, so the policy sees any '@' in it
        // and the next hop gets the address the client sent (see smtp::address).
        let address = super::address::requote(to.address.as_ref()).into_owned();
        let address = address.as_str();
        let local = if address.eq_ignore_ascii_case("postmaster") {
            true
        } else {
            match self
                .cfg
                .relay
                .check_recipient(address, self.peer.ip, self.auth_user.is_some())
            {
                RelayDecision::Local => true,
                RelayDecision::Relay => false,
                RelayDecision::Denied => {
                    tracing::info!(
                        client_ip = %self.peer.ip,
                        recipient = %printable(address),
                        "relay denied"
                    );
                    if let Some(bans) = crate::bans::installed() {
                        bans.offence(
                            self.peer.ip,
                            sluice_policy::ban::Offence::Relay,
                            crate::time::now_ms(),
                        );
                    }
                    return self.error_reply(554, "5.7.1", "Error: relay access denied");
                }
            }
        };
        // Rewriting after the relay decision on the address the client gave
        // (an alias of a local domain may forward anywhere); `local` then
        // follows the new address.
        let rewritten = match self.rewrite_recipient(address) {
            Ok(r) => r,
            Err(()) => return,
        };
        let (address, local) = match &rewritten {
            Some(new) => (
                new.as_str(),
                matches!(
                    self.cfg
                        .relay
                        .check_recipient(new, self.peer.ip, self.auth_user.is_some()),
                    RelayDecision::Local
                ),
            ),
            None => (address, local),
        };
        // After the relay decision, so a stranger's non-ASCII relay attempt still
        // reads "relay access denied".
        if !self.tx.smtputf8 && !address.is_ascii() {
            return self.error_reply(
                553,
                "5.6.7",
                "Error: non-ASCII recipient address without SMTPUTF8",
            );
        }
        if let Some(list) = &self.suppression {
            let sender = self.tx.sender.as_deref().unwrap_or("");
            if let Some(entry) = list.check(sender, address, crate::time::now_ms()) {
                let (code, status, text) = entry.refusal();
                tracing::info!(
                    client_ip = %self.peer.ip,
                    recipient = %printable(address),
                    class = %entry.class,
                    "recipient suppressed"
                );
                crate::metrics::suppression_refused("refuse");
                if crate::events::enabled() {
                    crate::events::emit(crate::events::suppressed_at_rcpt(
                        sender,
                        address,
                        self.peer.ip,
                        &sluice_spool::Reply::new(code, status, &text),
                        entry.class.as_str(),
                    ));
                }
                // Not a protocol error: a bulk client's list simply has it.
                self.reply(code, status, &text);
                return;
            }
        }
        if self.limits.is_some() {
            let sender = self.tx.sender.clone();
            let limited = self.check_limits(
                sluice_policy::inbound_limits::LimitStage::Rcpt,
                sender.as_deref(),
                Some(address),
                crate::time::now_ms(),
            );
            if limited.is_err() {
                return;
            }
        }
        if let Some(queues) = self.queues.clone() {
            let queue = match &self.tx.queue {
                Some(q) => q.clone(),
                None => queues.queue_for(&self.facts(self.tx.declared_size), address),
            };
            if let Err(e) = queues.check(&queue, self.tx.declared_size) {
                // Not a protocol error: the client should simply try later.
                tracing::info!(client_ip = %self.peer.ip, recipient = %printable(address), "{e}");
                self.reply(
                    452,
                    "4.3.1",
                    "Error: insufficient system storage (queue full)",
                );
                return;
            }
            self.tx.queue = Some(queue);
        }
        let mut notify = Notify::default();
        for (flag, bit) in [
            (RCPT_NOTIFY_SUCCESS, Notify::SUCCESS),
            (RCPT_NOTIFY_FAILURE, Notify::FAILURE),
            (RCPT_NOTIFY_DELAY, Notify::DELAY),
            (RCPT_NOTIFY_NEVER, Notify::NEVER),
        ] {
            if to.flags & flag != 0 {
                notify |= bit;
            }
        }
        let recipient = Recipient {
            address: address.to_string(),
            orcpt: to.orcpt.map(Cow::into_owned),
            notify,
            status: RecipientStatus::Pending,
            local,
        };
        if self.filtered(Stage::Rcpt) {
            // Answered once the filters have (Session::filter_result).
            self.tx.pending_rcpt = Some(recipient);
            return;
        }
        self.tx.recipients.push(recipient);
        self.reply(250, "2.1.5", "Ok");
    }

    fn data(&mut self, more_input: bool, now_ms: u64) -> Option<Action> {
        if self.tx.sender.is_none() {
            self.error_reply(503, "5.5.1", "Error: need MAIL command");
            return None;
        }
        if self.tx.recipients.is_empty() && self.tx.discarded == 0 {
            self.error_reply(554, "5.5.1", "Error: no valid recipients");
            return None;
        }
        if self.tx.id.is_some() {
            self.error_reply(503, "5.5.1", "Error: DATA after BDAT");
            return None;
        }
        if let Err(text) = self.quota_check(self.tx.declared_size) {
            self.reply(452, "4.3.1", &text);
            return None;
        }
        if more_input {
            // The client sent message data without waiting for our 354: its stream
            // can no longer be told apart from commands, so end the session.
            self.reply(554, "5.5.0", "Error: data sent before the 354 reply");
            self.tx = Transaction::default();
            self.state = State::Closed;
            return Some(Action::Close);
        }
        if !self.reserve_body() {
            // Nothing read yet: the client keeps the transaction and may retry.
            self.reply(452, "4.3.1", BUDGET_TEXT);
            return None;
        }
        self.begin_body(now_ms);
        self.reply(354, "", "End data with <CR><LF>.<CR><LF>");
        let limit = self.cfg.max_message_size;
        let max_line = self.cfg.max_message_line_length;
        self.state = State::Data(DataDecoder::new(limit, max_line));
        None
    }

    fn bdat(&mut self, size: usize, last: bool, now_ms: u64) {
        let failure = if self.tx.sender.is_none() {
            Some((503, "5.5.1", "Error: need MAIL command".to_string()))
        } else if self.tx.recipients.is_empty() && self.tx.discarded == 0 {
            Some((554, "5.5.1", "Error: no valid recipients".to_string()))
        } else if self.tx.over_budget {
            Some((452, "4.3.1", BUDGET_TEXT.to_string()))
        } else if self.tx.id.is_none() {
            match self.quota_check(self.tx.declared_size) {
                Err(text) => Some((452, "4.3.1", text)),
                Ok(()) if !self.reserve_body() => {
                    // This chunk is lost: the chunks after it must not start
                    // a body without it.
                    self.tx.over_budget = true;
                    Some((452, "4.3.1", BUDGET_TEXT.to_string()))
                }
                Ok(()) => None,
            }
        } else {
            None
        };
        if failure.is_none() && self.tx.id.is_none() {
            self.begin_body(now_ms);
            self.tx.bdat_scan = BareNewlineScanner::new(self.cfg.max_message_line_length);
        }
        self.state = State::Bdat {
            remaining: size,
            last,
            discard: failure,
        };
    }

    /// Allocates the message id and starts the body with our Received: header.
    fn begin_body(&mut self, now_ms: u64) {
        let id = self.ids.next(now_ms);
        self.tx.id = Some(id);
        let header = self.received_header(id, now_ms);
        let mut body = Vec::with_capacity(header.len() + 4096);
        body.extend_from_slice(header.as_bytes());
        self.tx.body = body;
        self.tx.received_len = header.len();
    }

    fn received_header(&self, id: MessageId, now_ms: u64) -> String {
        let helo = self.helo.as_deref().map(printable).unwrap_or_default();
        let mut with = String::from(match (self.cfg.protocol, self.extended) {
            (Protocol::Lmtp, _) => "LMTP",
            (Protocol::Smtp, true) => "ESMTP",
            (Protocol::Smtp, false) => "SMTP",
        });
        // RFC 3848 protocol types.
        if self.extended {
            if self.tls.is_some() {
                with.push('S');
            }
            if self.auth_user.is_some() {
                with.push('A');
            }
        }
        let mut h = format!(
            "Received: from {helo} ({helo} [{}])\r\n\tby {} (sluice) with {with} id {id}",
            self.peer.ip, self.cfg.hostname
        );
        if let Some(tls) = &self.tls {
            h.push_str(&format!("\r\n\t(using {tls})"));
        }
        if let [only] = self.tx.recipients.as_slice() {
            h.push_str(&format!("\r\n\tfor <{}>", printable(&only.address)));
        }
        let date = chrono::DateTime::from_timestamp_millis(now_ms as i64)
            .unwrap_or_default()
            .to_rfc2822();
        h.push_str(&format!(";\r\n\t{date}\r\n"));
        h
    }

    fn submit(&mut self, now_ms: u64) -> Action {
        let mut tx = std::mem::take(&mut self.tx);
        let Some(id) = tx.id else {
            self.error_reply(503, "5.5.1", "Error: no transaction");
            return Action::Read;
        };
        // The queue again, now that the real size is known (rules may match on
        // size), and its quota with that size.
        let size = tx.body.len() as u64;
        let mut queue = tx
            .queue
            .clone()
            .unwrap_or_else(|| sluice_policy::DEFAULT_QUEUE.to_string());
        let mut tenant = None;
        if let (Some(queues), Some(first)) = (self.queues.clone(), tx.recipients.first()) {
            let facts = sluice_policy::MessageFacts {
                listener: &self.cfg.listener,
                client_ip: Some(self.peer.ip),
                auth_user: self.auth_user.as_deref(),
                sender: tx.sender.as_deref().unwrap_or(""),
                priority: tx.priority,
                size,
            };
            queue = queues.queue_for(&facts, &first.address);
            if let Err(e) = queues.check(&queue, size) {
                tracing::info!(
                    target: "sluice::smtp",
                    id = %id,
                    listener = %self.cfg.listener,
                    client_ip = %self.peer.ip,
                    recipients = tx.recipients.len(),
                    size,
                    result = 452,
                    error = %e,
                    "transaction rejected"
                );
                self.reply(
                    452,
                    "4.3.1",
                    "Error: insufficient system storage (queue full)",
                );
                return Action::Read;
            }
            // The `[tenants] header` field names the tenant, for trusted
            // clients only (an outsider must not spend a tenant's budget).
            let policy = queues.tenant_policy();
            let header = match policy.header() {
                Some(name) if self.trusted() => {
                    let [value] = crate::events::headers::read(&tx.body, [name]);
                    // An instruction to this relay, not for the recipients.
                    if value.is_some() && policy.strip_header() {
                        crate::events::headers::remove(&mut tx.body, name);
                    }
                    value
                }
                _ => None,
            };
            // `[tenant.NAME] message_rate`: over it, try later.
            match queues.tenant_permit(
                &facts,
                &first.address,
                header.as_deref(),
                crate::time::now_ms(),
            ) {
                Ok(t) => tenant = t,
                Err(e) => {
                    tracing::info!(
                        target: "sluice::smtp",
                        id = %id,
                        listener = %self.cfg.listener,
                        client_ip = %self.peer.ip,
                        tenant = %e.tenant,
                        wait_ms = e.wait_ms,
                        result = 451,
                        "transaction rejected: tenant over its message rate"
                    );
                    self.reply(
                        451,
                        "4.7.1",
                        &format!(
                            "Error: tenant {} is over its message rate, try later",
                            e.tenant
                        ),
                    );
                    return Action::Read;
                }
            }
        }
        // Every recipient discarded at RCPT, or the session or transaction
        // discarded by a filter: answered like a stored message, never stored.
        let discard = tx.discard || self.discard_session || tx.recipients.is_empty();
        let quarantine = tx.quarantine.or_else(|| self.quarantine_session.clone());
        let envelope = Envelope {
            sender: tx.sender.unwrap_or_default(),
            recipients: tx.recipients,
            ret: tx.ret,
            envid: tx.envid,
            body_type: tx.body_type.unwrap_or(BodyType::SevenBit),
            smtputf8: tx.smtputf8,
            arrival_unix_ms: now_ms,
            listener: self.cfg.listener.clone(),
            client_ip: Some(self.peer.ip),
            helo: self.helo.clone().unwrap_or_default(),
            auth_user: self.auth_user.clone(),
            tls: self.tls.clone(),
            size: tx.body.len() as u64,
            priority: tx.priority,
            queue,
            hold_until_unix: tx.hold_until_unix,
            deliver_by: tx.deliver_by,
            tls_request: self.tls_request(tx.requiretls, &tx.body),
            tenant,
            header_facts: None,
            schedule: Schedule {
                notices: self.notice_limit(),
                ..Default::default()
            },
        };
        self.state = State::Paused;
        Action::Store(Box::new(Submission {
            id,
            envelope,
            body: tx.body,
            reservation: tx.reservation,
            spf: tx.spf,
            filter_data: self.filtered(Stage::Data),
            discard,
            quarantine,
        }))
    }

    /// What the sender asked of the message's onward transport (RFC 8689):
    /// REQUIRETLS from MAIL; else `TLS-Required: No` in the header block,
    /// where the listener honours it (the header is ignored under
    /// REQUIRETLS, RFC 8689 §4.1).
    fn tls_request(&self, requiretls: bool, body: &[u8]) -> TlsRequest {
        if requiretls {
            TlsRequest::RequireTls
        } else if self.cfg.honor_tls_required_no && super::requiretls::tls_required_no(body) {
            TlsRequest::Optional
        } else {
            TlsRequest::Policy
        }
    }

    /// What this message's success and delay notices may carry: as asked for
    /// trusted clients, the listener's `untrusted_notices` for the others.
    fn notice_limit(&self) -> NoticeLimit {
        if self.trusted() {
            return NoticeLimit::Unlimited;
        }
        match self.cfg.untrusted.notices {
            UntrustedNotices::Full => NoticeLimit::Unlimited,
            UntrustedNotices::Headers => NoticeLimit::HeadersOnly,
            UntrustedNotices::None => NoticeLimit::FailuresOnly,
        }
    }

    /// The outcome of an [`Action::Store`]; `summary` is what the transaction log needs.
    pub fn store_result(
        &mut self,
        id: MessageId,
        summary: &TxSummary,
        result: Result<(), crate::queue::EnqueueError>,
    ) {
        self.state = State::Command;
        if let Some(m) = &self.metrics {
            match &result {
                Ok(()) => m.tx_accepted.increment(1),
                Err(_) => m.tx_failed.increment(1),
            }
        }
        let (code, esc, text) = match &result {
            Ok(()) => {
                self.accepted += 1;
                (250, "2.0.0", format!("Ok: queued as {id}"))
            }
            Err(e) if e.is_full() => (
                452,
                "4.3.1",
                "Error: insufficient system storage".to_string(),
            ),
            Err(_) => (451, "4.3.0", "Error: local error in processing".to_string()),
        };
        tracing::info!(
            target: "sluice::smtp",
            id = %id,
            listener = %self.cfg.listener,
            client_ip = %self.peer.ip,
            tls = self.tls.as_deref().unwrap_or("no"),
            auth = self.auth_user.as_deref().unwrap_or(""),
            sender = %printable(&summary.sender),
            recipients = summary.recipients,
            size = summary.size,
            result = code,
            dkim = %summary.dkim,
            auth_results = %summary.auth,
            requiretls = summary.requiretls,
            error = result.as_ref().err().map(|e| e.to_string()).unwrap_or_default(),
            "transaction"
        );
        if self.cfg.protocol == Protocol::Lmtp && result.is_ok() {
            // RFC 2033: one reply per accepted recipient.
            for _ in 0..summary.recipients {
                self.reply(code, esc, &text);
            }
        } else {
            self.reply(code, esc, &text);
        }
        self.flush_metrics();
    }

    /// The listener's authentication checks refused the message (550 5.7.x
    /// or 451 4.7.x): reply, log with the results, and go on with the
    /// session like after any other reply to DATA.
    pub fn store_refused(
        &mut self,
        id: MessageId,
        summary: &TxSummary,
        code: u16,
        esc: &str,
        text: &str,
    ) {
        self.state = State::Command;
        if let Some(m) = &self.metrics {
            m.tx_rejected.increment(1);
        }
        tracing::info!(
            target: "sluice::smtp",
            id = %id,
            listener = %self.cfg.listener,
            client_ip = %self.peer.ip,
            tls = self.tls.as_deref().unwrap_or("no"),
            auth = self.auth_user.as_deref().unwrap_or(""),
            sender = %printable(&summary.sender),
            recipients = summary.recipients,
            size = summary.size,
            result = code,
            auth_results = %summary.auth,
            error = text,
            "transaction refused by authentication checks"
        );
        self.answer_data(summary.recipients, code, esc, text);
    }

    /// A body that will not be stored: reply, log, forget the transaction.
    fn fail_body(&mut self, code: u16, esc: &str, text: &str) {
        let tx = std::mem::take(&mut self.tx);
        tracing::info!(
            target: "sluice::smtp",
            id = %tx.id.map(|i| i.to_string()).unwrap_or_default(),
            listener = %self.cfg.listener,
            client_ip = %self.peer.ip,
            tls = self.tls.as_deref().unwrap_or("no"),
            sender = %printable(tx.sender.as_deref().unwrap_or("")),
            recipients = tx.recipients.len(),
            result = code,
            error = text,
            "transaction rejected"
        );
        self.error_reply(code, esc, text);
        if let Some(m) = &self.metrics {
            m.tx_rejected.increment(1);
        }
        self.flush_metrics();
    }

    fn starttls(&mut self) -> Option<Action> {
        if !self.cfg.starttls {
            self.error_reply(502, "5.5.1", "Error: STARTTLS not available");
            return None;
        }
        if self.tls.is_some() {
            self.error_reply(503, "5.5.1", "Error: TLS already active");
            return None;
        }
        self.reply(220, "2.0.0", "Ready to start TLS");
        Some(Action::StartTls)
    }

    fn auth(&mut self, mechanism: u64, initial: &str, now_ms: u64) -> Option<Action> {
        if !self.cfg.auth_enabled || (self.tls.is_none() && !self.cfg.auth_plaintext) {
            if self.cfg.auth_enabled && self.cfg.starttls {
                self.error_reply(
                    538,
                    "5.7.11",
                    "Error: encryption required for requested authentication mechanism",
                );
            } else {
                self.error_reply(502, "5.5.1", "Error: authentication not enabled");
            }
            return None;
        }
        if self.helo.is_none() {
            self.error_reply(503, "5.5.1", "Error: send EHLO first");
            return None;
        }
        if self.auth_user.is_some() {
            self.error_reply(503, "5.5.1", "Error: already authenticated");
            return None;
        }
        if self.tx.sender.is_some() {
            self.error_reply(
                503,
                "5.5.1",
                "Error: AUTH not allowed during a mail transaction",
            );
            return None;
        }
        if self.cfg.auth_guard.blocked(self.peer.ip, now_ms) {
            // The password is not even looked at: guessing from here is over.
            tracing::warn!(client_ip = %self.peer.ip, "AUTH refused: too many failures from this address");
            let text = format!(
                "{} Error: too many failed authentications from your address, try again later",
                self.cfg.hostname
            );
            self.reply(421, "4.7.0", &text);
            self.state = State::Closed;
            return Some(Action::Close);
        }
        self.auth_mechanism = match mechanism {
            smtp_proto::AUTH_PLAIN => Some("PLAIN"),
            smtp_proto::AUTH_LOGIN => Some("LOGIN"),
            _ => None,
        };
        match mechanism {
            smtp_proto::AUTH_PLAIN => {
                if initial.is_empty() {
                    self.reply(334, "", "");
                    self.state = State::AuthPlainResponse;
                    None
                } else {
                    self.auth_plain_response(initial.as_bytes())
                }
            }
            smtp_proto::AUTH_LOGIN => {
                if initial.is_empty() {
                    self.reply(334, "", "VXNlcm5hbWU6");
                    self.state = State::AuthLoginUser;
                } else {
                    match decode_b64_utf8(initial.as_bytes()) {
                        Some(user) => {
                            self.reply(334, "", "UGFzc3dvcmQ6");
                            self.state = State::AuthLoginPassword { user };
                        }
                        None => self.error_reply(501, "5.5.2", "Invalid base64 data"),
                    }
                }
                None
            }
            _ => {
                self.error_reply(504, "5.5.4", "Error: unsupported authentication mechanism");
                None
            }
        }
    }

    fn auth_plain_response(&mut self, text: &[u8]) -> Option<Action> {
        if text == b"*" {
            self.error_reply(501, "5.7.0", "Authentication cancelled");
            return None;
        }
        let decoded = if text == b"=" {
            Some(Vec::new())
        } else {
            decode_b64(text)
        };
        let Some(decoded) = decoded else {
            self.error_reply(501, "5.5.2", "Invalid base64 data");
            return None;
        };
        // authzid NUL authcid NUL passwd
        let mut parts = decoded.split(|&b| b == 0);
        let (Some(authz), Some(Ok(user)), Some(Ok(pass)), None) = (
            parts.next(),
            parts.next().map(std::str::from_utf8),
            parts.next().map(std::str::from_utf8),
            parts.next(),
        ) else {
            self.error_reply(501, "5.5.2", "Error: malformed PLAIN response");
            return None;
        };
        if !authz.is_empty() && authz != user.as_bytes() {
            self.error_reply(535, "5.7.8", "Error: authentication credentials invalid");
            return None;
        }
        self.state = State::Paused;
        Some(Action::Authenticate {
            user: user.to_string(),
            password: pass.to_string(),
        })
    }

    /// The outcome of an [`Action::Authenticate`]. After a failure, the driver must
    /// wait the returned time before writing the reply (slows password guessing).
    pub fn auth_result(&mut self, user: String, ok: bool, now_ms: u64) -> Option<Duration> {
        self.state = State::Command;
        if ok {
            tracing::info!(client_ip = %self.peer.ip, user = %printable(&user), "authenticated");
            self.auth_user = Some(user);
            if self.filtered(Stage::Auth) {
                self.pending_filter = Some(self.filter_call(Stage::Auth, None));
                return None;
            }
            self.reply(235, "2.7.0", "Authentication successful");
            return None;
        }
        self.auth_failures += 1;
        let guard = self.cfg.auth_guard.clone();
        let over_ip_budget = guard.failed(self.peer.ip, now_ms);
        if let Some(bans) = crate::bans::installed() {
            bans.offence(self.peer.ip, sluice_policy::ban::Offence::Auth, now_ms);
        }
        tracing::warn!(
            client_ip = %self.peer.ip,
            user = %printable(&user),
            failures = self.auth_failures,
            "authentication failed"
        );
        self.error_reply(535, "5.7.8", "Error: authentication credentials invalid");
        if !self.is_closed() && (over_ip_budget || self.auth_failures >= guard.max_failures) {
            let text = format!(
                "{} Error: too many failed authentications",
                self.cfg.hostname
            );
            self.reply(421, "4.7.0", &text);
            self.state = State::Closed;
        }
        Some(guard.delay(self.auth_failures))
    }

    /// Whether the listener has filters at this stage (a bit test).
    fn filtered(&self, stage: Stage) -> bool {
        self.cfg.filter_stages.contains(stage)
    }

    /// Pauses for the stage's filters and says what they need to know.
    fn filter_call(
        &mut self,
        stage: Stage,
        recipient: Option<String>,
    ) -> Box<crate::filters::OwnedEvent> {
        self.state = State::Paused;
        self.filter_wait = Some(stage);
        Box::new(crate::filters::OwnedEvent {
            stage,
            client: self.client_facts(),
            queue_id: None,
            sender: self.tx.sender.clone(),
            sender_params: Vec::new(),
            recipient,
            recipients: self
                .tx
                .recipients
                .iter()
                .map(|r| r.address.clone())
                .collect(),
            message: None,
        })
    }

    /// The SASL mechanism of the successful AUTH, if any.
    pub fn auth_mechanism(&self) -> Option<&'static str> {
        self.auth_user.as_ref().and(self.auth_mechanism)
    }

    /// What filters know of the client now.
    pub fn client_facts(&self) -> sluice_policy::stage::ClientFacts {
        sluice_policy::stage::ClientFacts {
            listener: self.cfg.listener.clone(),
            ip: self.peer.ip,
            port: self.peer.port,
            ptr: None,
            helo: self.helo.clone(),
            tls: self.tls.as_ref().map(|t| match t.split_once(' ') {
                Some((version, cipher)) => (version.to_string(), cipher.to_string()),
                None => (t.clone(), String::new()),
            }),
            auth_user: self.auth_user.clone(),
            server_name: self.cfg.hostname.clone(),
        }
    }

    /// A filter call the session made outside [`Session::receive`] (at
    /// connect, after AUTH succeeded, after SPF at MAIL): the driver runs it
    /// and calls [`Session::filter_result`] before feeding more input.
    pub fn take_filter_call(&mut self) -> Option<Box<crate::filters::OwnedEvent>> {
        self.pending_filter.take()
    }

    /// The combined answer of the filters for the stage the session waits
    /// for: the stage's own reply, or the filter's refusal (not a protocol
    /// error: it does not count towards `max_errors`).
    pub fn filter_result(&mut self, outcome: sluice_policy::stage::FilterOutcome, now_ms: u64) {
        self.state = State::Command;
        let Some(stage) = self.filter_wait.take() else {
            return;
        };
        let verdict = outcome.verdict;
        if let Some((code, esc, text)) = filter_refusal(&verdict) {
            tracing::info!(
                target: "sluice::smtp",
                listener = %self.cfg.listener,
                client_ip = %self.peer.ip,
                stage = %stage,
                sender = %printable(self.tx.sender.as_deref().unwrap_or("")),
                recipient = %printable(self.tx.pending_rcpt.as_ref().map(|r| r.address.as_str()).unwrap_or("")),
                result = code,
                error = %text,
                "refused by filter"
            );
            match stage {
                Stage::Connect => self.state = State::Closed,
                Stage::Ehlo => self.helo = None,
                Stage::Auth => self.auth_user = None,
                Stage::Mail => self.tx = Transaction::default(),
                _ => self.tx.pending_rcpt = None,
            }
            self.reply(code, &esc, &text);
            return;
        }
        let discard = verdict == Verdict::Discard;
        let quarantine = match &verdict {
            Verdict::Quarantine { reason } => Some(reason.clone()),
            _ => None,
        };
        if discard || quarantine.is_some() {
            tracing::info!(
                target: "sluice::smtp",
                listener = %self.cfg.listener,
                client_ip = %self.peer.ip,
                stage = %stage,
                verdict = verdict.name(),
                sender = %printable(self.tx.sender.as_deref().unwrap_or("")),
                recipient = %printable(self.tx.pending_rcpt.as_ref().map(|r| r.address.as_str()).unwrap_or("")),
                "filter verdict"
            );
        }
        match stage {
            Stage::Connect | Stage::Ehlo | Stage::Auth => {
                self.discard_session |= discard;
                if quarantine.is_some() {
                    self.quarantine_session = quarantine;
                }
            }
            Stage::Mail => {
                self.tx.discard |= discard;
                if quarantine.is_some() {
                    self.tx.quarantine = quarantine;
                }
            }
            _ => {
                if quarantine.is_some() {
                    self.tx.quarantine = quarantine;
                }
                match self.tx.pending_rcpt.take() {
                    Some(_) if discard => self.tx.discarded += 1,
                    Some(r) => self.tx.recipients.push(r),
                    None => {}
                }
            }
        }
        match stage {
            Stage::Connect => self.banner(),
            Stage::Ehlo => self.ehlo_reply(now_ms),
            Stage::Auth => self.reply(235, "2.7.0", "Authentication successful"),
            Stage::Mail => self.reply(250, "2.1.0", "Ok"),
            _ => self.reply(250, "2.1.5", "Ok"),
        }
    }

    /// The DATA filters' verdict on a message that will not be stored as
    /// is: a refusal, or a discard (answered like a stored message).
    pub fn data_verdict(&mut self, id: MessageId, summary: &TxSummary, verdict: &Verdict) {
        self.state = State::Command;
        let (code, esc, text) = match filter_refusal(verdict) {
            Some(refusal) => {
                if let Some(m) = &self.metrics {
                    m.tx_rejected.increment(1);
                }
                refusal
            }
            None => (250, "2.0.0".to_string(), format!("Ok: queued as {id}")),
        };
        tracing::info!(
            target: "sluice::smtp",
            id = %id,
            listener = %self.cfg.listener,
            client_ip = %self.peer.ip,
            tls = self.tls.as_deref().unwrap_or("no"),
            auth = self.auth_user.as_deref().unwrap_or(""),
            sender = %printable(&summary.sender),
            recipients = summary.recipients,
            size = summary.size,
            result = code,
            verdict = verdict.name(),
            auth_results = %summary.auth,
            error = if code >= 400 { text.as_str() } else { "" },
            "transaction decided by filter"
        );
        self.answer_data(summary.recipients, code, &esc, &text);
    }

    /// The answer to a message not stored as is: one reply, or under LMTP
    /// one per recipient (RFC 2033) and at least one.
    fn answer_data(&mut self, recipients: usize, code: u16, esc: &str, text: &str) {
        let replies = if self.cfg.protocol == Protocol::Lmtp {
            recipients.max(1)
        } else {
            1
        };
        for _ in 0..replies {
            self.reply(code, esc, text);
        }
        self.flush_metrics();
    }

    fn reply(&mut self, code: u16, esc: &str, text: &str) {
        self.count_reply(code);
        use std::io::Write as _;
        // Writing into a Vec cannot fail.
        let _ = if esc.is_empty() {
            write!(self.out, "{code} {text}\r\n")
        } else {
            write!(self.out, "{code} {esc} {text}\r\n")
        };
    }

    fn count_reply(&mut self, code: u16) {
        if let Some(i) = crate::metrics::reply_class(code) {
            self.replies[i] += 1;
        }
    }

    fn multiline(&mut self, code: u16, lines: &[String]) {
        self.count_reply(code);
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            self.out
                .extend_from_slice(format!("{code}{sep}{line}\r\n").as_bytes());
        }
    }

    /// A reply that counts towards max_errors; past the limit, 421 and close.
    fn error_reply(&mut self, code: u16, esc: &str, text: &str) {
        self.reply(code, esc, text);
        self.errors += 1;
        if self.errors >= self.cfg.max_errors {
            let text = format!("{} Error: too many errors", self.cfg.hostname);
            self.reply(421, "4.7.0", &text);
            self.state = State::Closed;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.flush_metrics();
        if let Some(bans) = crate::bans::installed() {
            let scan = !self.mail_seen && self.auth_user.is_none() && !self.ended_by_us;
            if scan && bans.counts(sluice_policy::ban::Offence::Scan) {
                bans.offence(
                    self.peer.ip,
                    sluice_policy::ban::Offence::Scan,
                    crate::time::now_ms(),
                );
            }
        }
    }
}

/// FUTURERELEASE and DELIVERBY of a MAIL command as stored times: the absolute
/// hold (unix seconds, 0 = none) and the delivery deadline. Err is the 501 text.
fn mail_times(
    from: &smtp_proto::MailFrom<Cow<'_, str>>,
    now_ms: u64,
) -> Result<(u64, Option<DeliverBy>), String> {
    let now_s = now_ms / 1000;
    if from.hold_for != 0 && from.hold_until != 0 {
        return Err("Error: HOLDFOR and HOLDUNTIL cannot be used together".into());
    }
    let mut hold_until = 0;
    if from.hold_for != 0 {
        if from.hold_for > MAX_HOLD_SECS {
            return Err(format!(
                "Error: HOLDFOR exceeds the maximum of {MAX_HOLD_SECS} seconds"
            ));
        }
        // Rounded up: a hold is never released before the seconds asked for.
        hold_until = now_ms.div_ceil(1000) + from.hold_for;
    }
    if from.hold_until != 0 {
        if from.hold_until > now_s + MAX_HOLD_SECS {
            return Err(format!(
                "Error: HOLDUNTIL is more than {MAX_HOLD_SECS} seconds away"
            ));
        }
        // A time in the past means "release now" (RFC 4865 §3).
        if from.hold_until > now_s {
            hold_until = from.hold_until;
        }
    }
    if from.flags & (MAIL_BY_NOTIFY | MAIL_BY_RETURN) == 0 {
        return Ok((hold_until, None));
    }
    let mode = if from.flags & MAIL_BY_RETURN != 0 {
        DeliverByMode::Return
    } else {
        DeliverByMode::Notify
    };
    if !(-MAX_BY_SECS..=MAX_BY_SECS).contains(&from.by) {
        return Err("Error: BY time out of range".into());
    }
    if mode == DeliverByMode::Return && from.by < MIN_BY_SECS {
        return Err(format!(
            "Error: BY time below the minimum of {MIN_BY_SECS} seconds"
        ));
    }
    let deadline = (i128::from(now_ms) + i128::from(from.by) * 1000).max(0) as u64;
    if mode == DeliverByMode::Return && hold_until.saturating_mul(1000) >= deadline {
        return Err("Error: the message would be held past its BY deadline".into());
    }
    Ok((
        hold_until,
        Some(DeliverBy {
            deadline_unix_ms: deadline,
            by_secs: from.by,
            mode,
            trace: from.flags & MAIL_BY_TRACE != 0,
        }),
    ))
}

enum LineResult {
    Incomplete,
    /// A complete line of n bytes (from `rest`, possibly completing `self.line`).
    Line(usize),
    /// The line exceeded the limit; n bytes up to and including its CRLF consumed.
    TooLong(usize),
    BareNewline,
}

/// "RCPT TO:<postmaster>" in any case, with optional spaces.
/// The reply for a refusing verdict: the filter's code when it is of the
/// right class (5xx reject, 4xx tempfail), its enhanced status when that
/// matches the class, the text on one line.
fn filter_refusal(verdict: &Verdict) -> Option<(u16, String, String)> {
    let (reply, class, default_code) = match verdict {
        Verdict::Reject(r) => (r, 5, 550),
        Verdict::Tempfail(r) => (r, 4, 451),
        _ => return None,
    };
    let code = if reply.code / 100 == class {
        reply.code
    } else {
        default_code
    };
    let esc = reply
        .enhanced
        .as_deref()
        .filter(|e| e.starts_with(&format!("{class}.")) && e.len() <= 11)
        .map(str::to_string)
        .unwrap_or_else(|| format!("{class}.7.1"));
    Some((code, esc, FilterReply::one_line(&reply.text)))
}

fn is_bare_postmaster(line: &[u8]) -> bool {
    let lower = line.to_ascii_lowercase();
    let Some(start) = memchr::memchr(b'<', &lower) else {
        return false;
    };
    lower[start..].starts_with(b"<postmaster>")
}

/// A command line that must not reach the parser: NUL anywhere (RFC 5321
/// §4.1.4 leaves no room for it, and C-string code downstream would cut the line
/// there), or bytes that are not UTF-8 (the parser would replace them with
/// U+FFFD and the relay would send on an address the client never gave).
fn unusable_command(line: &[u8]) -> Option<(u16, &'static str, &'static str)> {
    if memchr::memchr(0, line).is_some() {
        return Some((501, "5.5.2", "Error: NUL byte in command"));
    }
    if std::str::from_utf8(line).is_ok() {
        return None;
    }
    let verb = line.get(..4).unwrap_or_default();
    Some(if verb.eq_ignore_ascii_case(b"MAIL") {
        (501, "5.1.7", "Error: sender address is not valid UTF-8")
    } else if verb.eq_ignore_ascii_case(b"RCPT") {
        (501, "5.1.3", "Error: recipient address is not valid UTF-8")
    } else {
        (500, "5.5.2", "Error: command is not valid UTF-8")
    })
}

/// ENVID and ORCPT after xtext decoding: the parser turns "+FF" into U+00FF,
/// which would go on as two other bytes; printable ASCII only (RFC 3461).
fn is_xtext_safe(value: &str) -> bool {
    value.bytes().all(|b| (0x20..0x7f).contains(&b))
}

fn strip_crlf(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r\n").unwrap_or(line)
}

fn decode_b64(text: &[u8]) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// Base64 that decodes to UTF-8 (a user name or password): invalid bytes are
/// refused, never replaced, so two different secrets cannot become one.
fn decode_b64_utf8(text: &[u8]) -> Option<String> {
    String::from_utf8(decode_b64(text)?).ok()
}

/// Client-supplied text made safe for logs and headers: control characters become '?'.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The reply sent when a connection is refused before a session exists.
pub fn refusal(hostname: &str, reason: &str) -> Vec<u8> {
    format!("421 4.7.0 {hostname} {reason}\r\n").into_bytes()
}
