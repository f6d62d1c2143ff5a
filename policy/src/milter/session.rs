//! One connection to one milter: which commands each stage sends, and what
//! the replies mean for the stage.

use std::collections::VecDeque;
use std::net::SocketAddr;

use super::codec::{
    self, action, cmd, encode_frame, proto, put_cstr, reply, Fields, Frame, FrameDecoder,
    Negotiated,
};
use super::MilterError;
use crate::stage::{FilterOutcome, FilterReply, Modification, Stage, StageEvent, Verdict};

/// Bounds on what a milter may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MilterLimits {
    /// Largest frame accepted from the milter.
    pub max_frame: usize,
    /// Largest replacement body (all SMFIR_REPLBODY chunks together).
    pub max_body_replacement: usize,
    /// Most modifications in one end-of-message answer.
    pub max_modifications: usize,
}

impl Default for MilterLimits {
    fn default() -> Self {
        MilterLimits {
            max_frame: codec::DEFAULT_MAX_FRAME,
            max_body_replacement: 50 << 20,
            max_modifications: 10_000,
        }
    }
}

/// Facts the milter macros need that [`StageEvent`] does not carry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionExtras {
    /// The relay's address the client connected to (`{if_addr}`, `{daemon_addr}`).
    pub local_addr: Option<SocketAddr>,
    /// The SASL mechanism used (`{auth_type}`), once AUTH succeeded.
    pub auth_type: Option<String>,
}

/// What the caller does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    /// Write these bytes to the milter, then poll again.
    Write(Vec<u8>),
    /// Read from the milter, [`MilterProtocol::feed`] what came, poll again.
    Read,
    /// The stage is answered.
    Done(FilterOutcome),
}

/// The protocol step a command belongs to (also the SMFIM_* macro index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Optneg,
    Connect,
    Helo,
    Mail,
    Rcpt,
    Data,
    Header,
    Eoh,
    Body,
    Eom,
    /// ABORT, QUIT: never answered.
    Silent,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Optneg => "option negotiation",
            Kind::Connect => "connect",
            Kind::Helo => "helo",
            Kind::Mail => "mail",
            Kind::Rcpt => "rcpt",
            Kind::Data => "data",
            Kind::Header => "header",
            Kind::Eoh => "end of header",
            Kind::Body => "body",
            Kind::Eom => "end of message",
            Kind::Silent => "abort",
        }
    }
}

struct Step {
    kind: Kind,
    bytes: Vec<u8>,
    answered: bool,
}

/// A milter connection's protocol state. One stage at a time: [`begin`]
/// a stage, then [`poll`] until [`Poll::Done`].
///
/// [`begin`]: MilterProtocol::begin
/// [`poll`]: MilterProtocol::poll
pub struct MilterProtocol {
    limits: MilterLimits,
    decoder: FrameDecoder,
    neg: Option<Negotiated>,
    steps: VecDeque<Step>,
    waiting: Option<Kind>,
    outcome: Option<FilterOutcome>,
    /// Whether the stage in progress is over (a final reply came).
    stage_done: bool,
    // Connection state.
    connect_sent: bool,
    helo_sent: bool,
    /// Set when the milter accepted or refused the whole connection.
    conn_final: Option<Verdict>,
    // Transaction state.
    mail_sent: bool,
    rcpts_seen: Vec<String>,
    msg_accepted: bool,
    discard: bool,
    /// A transaction was started and not finished by an end-of-message.
    need_abort: bool,
    // End-of-message collection.
    mods: Vec<Modification>,
    new_body: Option<Vec<u8>>,
    quarantine: Option<String>,
}

impl MilterProtocol {
    pub fn new(limits: MilterLimits) -> Self {
        MilterProtocol {
            limits,
            decoder: FrameDecoder::new(limits.max_frame),
            neg: None,
            steps: VecDeque::new(),
            waiting: None,
            outcome: None,
            stage_done: false,
            connect_sent: false,
            helo_sent: false,
            conn_final: None,
            mail_sent: false,
            rcpts_seen: Vec::new(),
            msg_accepted: false,
            discard: false,
            need_abort: false,
            mods: Vec::new(),
            new_body: None,
            quarantine: None,
        }
    }

    /// Start option negotiation; poll until Done (an accept outcome).
    pub fn negotiate(&mut self) {
        let mut bytes = Vec::with_capacity(17);
        codec::encode_optneg(&mut bytes);
        self.reset_stage();
        self.steps.push_back(Step {
            kind: Kind::Optneg,
            bytes,
            answered: true,
        });
    }

    /// What the milter asked for, once negotiation is done.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.neg.as_ref()
    }

    /// Bytes read from the milter.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.decoder.push(bytes);
    }

    fn reset_stage(&mut self) {
        self.steps.clear();
        self.waiting = None;
        self.outcome = None;
        self.stage_done = false;
        self.mods.clear();
        self.new_body = None;
        self.quarantine = None;
    }

    fn flag(&self, f: u32) -> bool {
        self.neg.as_ref().is_some_and(|n| n.has(f))
    }

    /// Queue what `event`'s stage sends (catching up on earlier steps the
    /// caller did not ask about, so the milter always sees a whole dialogue).
    pub fn begin(
        &mut self,
        event: &StageEvent<'_>,
        extras: &SessionExtras,
    ) -> Result<(), MilterError> {
        if self.waiting.is_some() || !self.steps.is_empty() {
            return Err(MilterError::Busy);
        }
        self.reset_stage();
        if let Some(v) = &self.conn_final {
            self.outcome = Some(FilterOutcome::with_verdict(v.clone()));
            return Ok(());
        }
        match event.stage {
            Stage::Auth | Stage::Delivery => {}
            Stage::Connect => self.catch_up_connect(event, extras),
            Stage::Ehlo => {
                self.catch_up_connect(event, extras);
                self.helo_sent = false;
                self.catch_up_helo(event, extras);
            }
            Stage::Mail => {
                self.catch_up_connect(event, extras);
                self.catch_up_helo(event, extras);
                self.push_abort_if_needed();
                self.queue_mail(event, extras);
            }
            Stage::Rcpt => {
                if self.msg_accepted {
                    return Ok(());
                }
                self.catch_up_envelope(event, extras);
                if let Some(rcpt) = event.recipient {
                    self.queue_rcpt(rcpt, event, extras);
                }
            }
            Stage::Data => {
                if self.msg_accepted {
                    return Ok(());
                }
                self.catch_up_envelope(event, extras);
                if self.discard {
                    self.push_abort_if_needed();
                    self.outcome = Some(FilterOutcome::with_verdict(Verdict::Discard));
                    return Ok(());
                }
                self.queue_message(event, extras);
            }
        }
        Ok(())
    }

    /// RSET or a transaction the session ended: the bytes of SMFIC_ABORT (none
    /// when the milter holds no transaction).
    pub fn abort(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.need_abort {
            encode_frame(&mut out, cmd::ABORT, &[]);
        }
        self.end_transaction();
        self.reset_stage();
        out
    }

    /// The session ends: the bytes of SMFIC_QUIT.
    pub fn quit(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(&mut out, cmd::QUIT, &[]);
        self.reset_stage();
        out
    }

    fn end_transaction(&mut self) {
        self.mail_sent = false;
        self.rcpts_seen.clear();
        self.msg_accepted = false;
        self.discard = false;
        self.need_abort = false;
    }

    fn push_abort_if_needed(&mut self) {
        if self.need_abort {
            let mut bytes = Vec::new();
            encode_frame(&mut bytes, cmd::ABORT, &[]);
            self.push(Kind::Silent, bytes, false);
        }
        self.end_transaction();
    }

    fn push(&mut self, kind: Kind, bytes: Vec<u8>, answered: bool) {
        self.steps.push_back(Step {
            kind,
            bytes,
            answered,
        });
    }

    /// Queue one command with its macros, unless the milter skips the step.
    fn queue_command(
        &mut self,
        kind: Kind,
        code: u8,
        data: &[u8],
        macros: &[(&str, String)],
        skip: u32,
        no_reply: u32,
    ) {
        if self.flag(skip) {
            return;
        }
        let mut bytes = Vec::with_capacity(data.len() + 64);
        self.encode_macros(&mut bytes, kind, code, macros);
        encode_frame(&mut bytes, code, data);
        let answered = !self.flag(no_reply);
        self.push(kind, bytes, answered);
    }

    fn encode_macros(&self, out: &mut Vec<u8>, kind: Kind, code: u8, macros: &[(&str, String)]) {
        let index = match kind {
            Kind::Connect => 0,
            Kind::Helo => 1,
            Kind::Mail => 2,
            Kind::Rcpt => 3,
            Kind::Data => 4,
            Kind::Eom => 5,
            Kind::Eoh => 6,
            _ => return,
        };
        let wanted = self
            .neg
            .as_ref()
            .and_then(|n| n.symlists.get(index))
            .and_then(|l| l.as_ref());
        let bare = |n: &str| n.trim_start_matches('{').trim_end_matches('}').to_string();
        let mut data = vec![code];
        let mut any = false;
        for (name, value) in macros {
            if let Some(list) = wanted {
                if !list.iter().any(|w| bare(w) == bare(name)) {
                    continue;
                }
            }
            put_cstr(&mut data, name.as_bytes());
            put_cstr(&mut data, value.as_bytes());
            any = true;
        }
        if any {
            encode_frame(out, cmd::MACRO, &data);
        }
    }

    fn catch_up_connect(&mut self, event: &StageEvent<'_>, extras: &SessionExtras) {
        if self.connect_sent {
            return;
        }
        self.connect_sent = true;
        let c = event.client;
        let host = c.ptr.clone().unwrap_or_else(|| format!("[{}]", c.ip));
        let mut data = Vec::with_capacity(64);
        put_cstr(&mut data, host.as_bytes());
        data.push(if c.ip.is_ipv4() { b'4' } else { b'6' });
        data.extend_from_slice(&c.port.to_be_bytes());
        put_cstr(&mut data, c.ip.to_string().as_bytes());
        let mut macros = vec![
            ("j", c.server_name.clone()),
            (
                "_",
                format!("{} [{}]", c.ptr.as_deref().unwrap_or("unknown"), c.ip),
            ),
            ("{daemon_name}", c.listener.clone()),
            ("{client_addr}", c.ip.to_string()),
            ("{client_port}", c.port.to_string()),
            (
                "{client_name}",
                c.ptr.clone().unwrap_or_else(|| "unknown".into()),
            ),
            (
                "{client_ptr}",
                c.ptr.clone().unwrap_or_else(|| "unknown".into()),
            ),
            ("v", "sluice".into()),
        ];
        if let Some(local) = extras.local_addr {
            macros.push(("{if_addr}", local.ip().to_string()));
            macros.push(("{daemon_addr}", local.ip().to_string()));
            macros.push(("{daemon_port}", local.port().to_string()));
        }
        self.queue_command(
            Kind::Connect,
            cmd::CONNECT,
            &data,
            &macros,
            proto::NOCONNECT,
            proto::NR_CONN,
        );
    }

    fn catch_up_helo(&mut self, event: &StageEvent<'_>, _extras: &SessionExtras) {
        if self.helo_sent {
            return;
        }
        let Some(helo) = event.client.helo.as_deref() else {
            return;
        };
        self.helo_sent = true;
        let mut data = Vec::new();
        put_cstr(&mut data, helo.as_bytes());
        let mut macros = Vec::new();
        if let Some((version, cipher)) = &event.client.tls {
            macros.push(("{tls_version}", version.clone()));
            macros.push(("{cipher}", cipher.clone()));
        }
        self.queue_command(
            Kind::Helo,
            cmd::HELO,
            &data,
            &macros,
            proto::NOHELO,
            proto::NR_HELO,
        );
    }

    fn catch_up_envelope(&mut self, event: &StageEvent<'_>, extras: &SessionExtras) {
        self.catch_up_connect(event, extras);
        self.catch_up_helo(event, extras);
        if !self.mail_sent {
            self.queue_mail(event, extras);
        }
        for rcpt in event.recipients {
            if Some(rcpt.as_str()) != event.recipient && !self.rcpts_seen.contains(rcpt) {
                self.queue_rcpt(rcpt, event, extras);
            }
        }
    }

    fn queue_id_macro(event: &StageEvent<'_>, macros: &mut Vec<(&str, String)>) {
        if let Some(id) = event.queue_id {
            macros.push(("i", id.to_string()));
        }
    }

    fn queue_mail(&mut self, event: &StageEvent<'_>, extras: &SessionExtras) {
        self.mail_sent = true;
        self.need_abort = true;
        let sender = event.sender.unwrap_or("");
        let mut data = Vec::new();
        put_cstr(&mut data, format!("<{sender}>").as_bytes());
        for p in event.sender_params {
            put_cstr(&mut data, p.as_bytes());
        }
        let mut macros = Vec::new();
        Self::queue_id_macro(event, &mut macros);
        if let Some(user) = &event.client.auth_user {
            macros.push(("{auth_authen}", user.clone()));
            if let Some(t) = &extras.auth_type {
                macros.push(("{auth_type}", t.clone()));
            }
        }
        macros.push(("{mail_addr}", sender.to_string()));
        macros.push(("{mail_host}", domain_of(sender).to_string()));
        macros.push(("{mail_mailer}", "smtp".into()));
        self.queue_command(
            Kind::Mail,
            cmd::MAIL,
            &data,
            &macros,
            proto::NOMAIL,
            proto::NR_MAIL,
        );
    }

    fn queue_rcpt(&mut self, rcpt: &str, event: &StageEvent<'_>, _extras: &SessionExtras) {
        self.rcpts_seen.push(rcpt.to_string());
        let mut data = Vec::new();
        put_cstr(&mut data, format!("<{rcpt}>").as_bytes());
        let mut macros = Vec::new();
        Self::queue_id_macro(event, &mut macros);
        macros.push(("{rcpt_addr}", rcpt.to_string()));
        macros.push(("{rcpt_host}", domain_of(rcpt).to_string()));
        macros.push(("{rcpt_mailer}", "smtp".into()));
        self.queue_command(
            Kind::Rcpt,
            cmd::RCPT,
            &data,
            &macros,
            proto::NORCPT,
            proto::NR_RCPT,
        );
    }

    fn queue_message(&mut self, event: &StageEvent<'_>, _extras: &SessionExtras) {
        let mut macros = Vec::new();
        Self::queue_id_macro(event, &mut macros);
        self.queue_command(
            Kind::Data,
            cmd::DATA,
            &[],
            &macros,
            proto::NODATA,
            proto::NR_DATA,
        );
        let message = event.message.unwrap_or(&[]);
        let (headers, body) = split_message(message);
        if !self.flag(proto::NOHDRS) {
            let answered = !self.flag(proto::NR_HDR);
            for (name, value) in headers {
                let mut data = Vec::with_capacity(name.len() + value.len() + 2);
                put_cstr(&mut data, name);
                put_cstr(&mut data, &value);
                let mut bytes = Vec::with_capacity(data.len() + 5);
                encode_frame(&mut bytes, cmd::HEADER, &data);
                self.push(Kind::Header, bytes, answered);
            }
        }
        self.queue_command(
            Kind::Eoh,
            cmd::EOH,
            &[],
            &macros,
            proto::NOEOH,
            proto::NR_EOH,
        );
        if !self.flag(proto::NOBODY) {
            let answered = !self.flag(proto::NR_BODY);
            for chunk in body.chunks(codec::MAX_BODY_CHUNK) {
                let mut bytes = Vec::with_capacity(chunk.len() + 5);
                encode_frame(&mut bytes, cmd::BODY, chunk);
                self.push(Kind::Body, bytes, answered);
            }
        }
        // End of message is always sent and always answered.
        let mut bytes = Vec::new();
        self.encode_macros(&mut bytes, Kind::Eom, cmd::BODYEOB, &macros);
        encode_frame(&mut bytes, cmd::BODYEOB, &[]);
        self.push(Kind::Eom, bytes, true);
    }

    /// The next thing to do for the stage in progress.
    pub fn poll(&mut self) -> Result<Poll, MilterError> {
        loop {
            if let Some(kind) = self.waiting {
                let Some(frame) = self.decoder.next_frame()? else {
                    return Ok(Poll::Read);
                };
                self.on_frame(kind, frame)?;
                continue;
            }
            if self.stage_done || self.outcome.is_some() {
                // Silent steps queued first (an ABORT before a Discard
                // answer) still go out; whatever a final answer made moot does not.
                let mut out = Vec::new();
                while self.steps.front().is_some_and(|s| s.kind == Kind::Silent) {
                    if let Some(step) = self.steps.pop_front() {
                        out.extend_from_slice(&step.bytes);
                    }
                }
                self.steps.clear();
                if !out.is_empty() {
                    return Ok(Poll::Write(out));
                }
                let outcome = self.outcome.take().unwrap_or_default();
                self.stage_done = false;
                return Ok(Poll::Done(outcome));
            }
            if self.steps.is_empty() {
                return Ok(Poll::Done(FilterOutcome::accept()));
            }
            // Write every step up to and including the first answered one.
            let mut out = Vec::new();
            while let Some(step) = self.steps.pop_front() {
                out.extend_from_slice(&step.bytes);
                if step.answered {
                    self.waiting = Some(step.kind);
                    break;
                }
            }
            return Ok(Poll::Write(out));
        }
    }

    fn finish(&mut self, verdict: Verdict) {
        self.waiting = None;
        self.stage_done = true;
        self.outcome = Some(FilterOutcome::with_verdict(verdict));
    }

    fn on_frame(&mut self, kind: Kind, frame: Frame) -> Result<(), MilterError> {
        let unexpected = |code: u8| MilterError::Unexpected {
            code: char::from(code),
            during: kind.name(),
        };
        if kind == Kind::Optneg {
            self.neg = Some(codec::decode_optneg(&frame)?);
            self.waiting = None;
            return Ok(());
        }
        match frame.code {
            reply::PROGRESS => Ok(()),
            reply::CONTINUE => {
                self.waiting = None;
                if kind == Kind::Eom {
                    self.finish_eom(Verdict::Accept);
                }
                Ok(())
            }
            reply::SKIP => {
                if kind != Kind::Body {
                    return Err(unexpected(frame.code));
                }
                self.waiting = None;
                while self.steps.front().is_some_and(|s| s.kind == Kind::Body) {
                    self.steps.pop_front();
                }
                Ok(())
            }
            reply::ACCEPT => {
                self.on_final(kind, Verdict::Accept, true);
                Ok(())
            }
            reply::REJECT => {
                let r = default_reply(550, "5.7.1", "Command rejected");
                self.on_final(kind, Verdict::Reject(r), false);
                Ok(())
            }
            reply::TEMPFAIL => {
                let r = default_reply(451, "4.7.1", "Service unavailable - try again later");
                self.on_final(kind, Verdict::Tempfail(r), false);
                Ok(())
            }
            reply::REPLYCODE => {
                let r = codec::parse_replycode(&frame.data)?;
                let v = if r.code >= 500 {
                    Verdict::Reject(r)
                } else {
                    Verdict::Tempfail(r)
                };
                self.on_final(kind, v, false);
                Ok(())
            }
            reply::DISCARD => {
                self.on_final(kind, Verdict::Discard, false);
                Ok(())
            }
            reply::SHUTDOWN | reply::CONN_FAIL => {
                Err(MilterError::Shutdown(char::from(frame.code)))
            }
            reply::ADDHEADER
            | reply::INSHEADER
            | reply::CHGHEADER
            | reply::ADDRCPT
            | reply::ADDRCPT_PAR
            | reply::DELRCPT
            | reply::CHGFROM
            | reply::REPLBODY
            | reply::QUARANTINE => {
                if kind != Kind::Eom {
                    return Err(unexpected(frame.code));
                }
                self.on_modification(frame)
            }
            other => Err(unexpected(other)),
        }
    }

    /// A final reply (anything but continue) at step `kind`.
    fn on_final(&mut self, kind: Kind, verdict: Verdict, accepted: bool) {
        match kind {
            Kind::Connect => {
                self.conn_final = Some(verdict.clone());
                self.finish(verdict);
            }
            Kind::Helo => {
                if accepted {
                    self.conn_final = Some(Verdict::Accept);
                }
                self.finish(verdict);
            }
            Kind::Mail | Kind::Rcpt if verdict == Verdict::Discard => {
                // Milter semantics: the whole message goes, answered as
                // accepted; the Data stage answers Discard.
                self.discard = true;
                self.waiting = None;
            }
            Kind::Rcpt if !accepted => {
                // That recipient only; the transaction goes on.
                self.finish(verdict);
            }
            Kind::Eom => {
                self.need_abort = false;
                self.end_transaction();
                if accepted {
                    self.finish_eom(Verdict::Accept);
                } else {
                    self.finish(verdict);
                }
            }
            _ => {
                if accepted {
                    self.msg_accepted = true;
                }
                self.finish(verdict);
            }
        }
    }

    fn finish_eom(&mut self, verdict: Verdict) {
        self.end_transaction();
        let mut mods = std::mem::take(&mut self.mods);
        if let Some(body) = self.new_body.take() {
            // Most milters send CRLF already: keep the bytes as they are then.
            let bare_lf = body
                .iter()
                .enumerate()
                .any(|(i, &b)| b == b'\n' && (i == 0 || body[i - 1] != b'\r'));
            let body = if bare_lf { crlf(&body) } else { body };
            mods.push(Modification::ReplaceBody { body });
        }
        let verdict = match (verdict, self.quarantine.take()) {
            (Verdict::Accept, Some(reason)) => Verdict::Quarantine { reason },
            (v, _) => v,
        };
        self.waiting = None;
        self.stage_done = true;
        self.outcome = Some(FilterOutcome {
            verdict,
            modifications: mods,
        });
    }

    fn on_modification(&mut self, frame: Frame) -> Result<(), MilterError> {
        let code = frame.code;
        let needed = match code {
            reply::ADDHEADER | reply::INSHEADER => action::ADDHDRS,
            reply::CHGHEADER => action::CHGHDRS,
            reply::ADDRCPT => action::ADDRCPT,
            reply::ADDRCPT_PAR => action::ADDRCPT_PAR,
            reply::DELRCPT => action::DELRCPT,
            reply::CHGFROM => action::CHGFROM,
            reply::REPLBODY => action::CHGBODY,
            _ => action::QUARANTINE,
        };
        if self.neg.as_ref().is_none_or(|n| n.actions & needed == 0) {
            return Err(MilterError::ActionNotNegotiated(char::from(code)));
        }
        if self.mods.len() >= self.limits.max_modifications {
            return Err(MilterError::TooManyModifications(
                self.limits.max_modifications,
            ));
        }
        let mut f = Fields::new(code, &frame.data);
        let m = match code {
            reply::ADDHEADER => {
                let name = header_name(f.cstr()?)?;
                // Appended, as Sendmail and Postfix do (an index past the end).
                Modification::AddHeader {
                    name,
                    value: crlf_str(&f.cstr()?),
                    index: Some(usize::MAX),
                }
            }
            reply::INSHEADER => {
                let index = f.u32()?;
                let name = header_name(f.cstr()?)?;
                Modification::AddHeader {
                    name,
                    value: crlf_str(&f.cstr()?),
                    index: Some(usize::try_from(index).unwrap_or(usize::MAX)),
                }
            }
            reply::CHGHEADER => {
                let index = f.u32()?;
                let name = header_name(f.cstr()?)?;
                // A missing value deletes, like an empty one.
                let value = if f.is_empty() {
                    String::new()
                } else {
                    f.cstr()?
                };
                Modification::ChangeHeader {
                    name,
                    occurrence: usize::try_from(index.max(1)).unwrap_or(usize::MAX),
                    value: crlf_str(&value),
                }
            }
            reply::ADDRCPT | reply::ADDRCPT_PAR => Modification::AddRecipient {
                address: address(f.cstr()?)?,
            },
            reply::DELRCPT => Modification::RemoveRecipient {
                address: address(f.cstr()?)?,
            },
            reply::CHGFROM => Modification::ChangeSender {
                address: {
                    let a = f.cstr()?;
                    let a = a.trim();
                    a.strip_prefix('<')
                        .and_then(|a| a.strip_suffix('>'))
                        .unwrap_or(a)
                        .to_string()
                },
            },
            reply::REPLBODY => {
                let body = self.new_body.get_or_insert_with(Vec::new);
                if body.len() + frame.data.len() > self.limits.max_body_replacement {
                    return Err(MilterError::BodyTooLarge(self.limits.max_body_replacement));
                }
                body.extend_from_slice(&frame.data);
                return Ok(());
            }
            _ => {
                let reason = f.cstr()?;
                self.quarantine = Some(reason);
                return Ok(());
            }
        };
        self.mods.push(m);
        Ok(())
    }
}

fn default_reply(code: u16, enhanced: &str, text: &str) -> FilterReply {
    FilterReply {
        code,
        enhanced: Some(enhanced.into()),
        text: text.into(),
    }
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
}

/// A header name from a milter: printable ASCII without ':' or spaces.
fn header_name(name: String) -> Result<String, MilterError> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err(MilterError::Malformed {
            code: 'h',
            why: "header name empty or not printable ASCII without ':'",
        });
    }
    Ok(name)
}

/// A recipient from a milter, angle brackets removed; must not be empty.
fn address(a: String) -> Result<String, MilterError> {
    let t = a.trim();
    let t = t
        .strip_prefix('<')
        .and_then(|t| t.strip_suffix('>'))
        .unwrap_or(t);
    if t.is_empty() || t.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(MilterError::Malformed {
            code: '+',
            why: "recipient empty or with spaces or controls",
        });
    }
    Ok(t.to_string())
}

/// Line ends as CRLF (milters send LF in folded headers and new bodies).
fn crlf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 32);
    let mut prev = 0u8;
    for &b in bytes {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    out
}

fn crlf_str(s: &str) -> String {
    String::from_utf8_lossy(&crlf(s.as_bytes())).into_owned()
}

/// A header field as sent to the milter: name, value.
type Field<'a> = (&'a [u8], Vec<u8>);

/// Header fields (name, value with folds as LF, leading blanks removed) and
/// the body (after the empty line) of a CRLF message.
pub(crate) fn split_message(message: &[u8]) -> (Vec<Field<'_>>, &[u8]) {
    let mut headers: Vec<Field<'_>> = Vec::new();
    let mut pos = 0;
    while pos < message.len() {
        let end = memchr_lf(&message[pos..])
            .map(|i| pos + i + 1)
            .unwrap_or(message.len());
        let line = &message[pos..end];
        let text = line
            .strip_suffix(b"\n")
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .unwrap_or(line);
        pos = end;
        if text.is_empty() {
            return (headers, &message[pos..]);
        }
        if text[0] == b' ' || text[0] == b'\t' {
            if let Some((_, value)) = headers.last_mut() {
                value.push(b'\n');
                value.extend_from_slice(text);
            }
            continue;
        }
        let Some(colon) = text.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = trim_end(&text[..colon]);
        let mut value = &text[colon + 1..];
        while let [b' ' | b'\t', rest @ ..] = value {
            value = rest;
        }
        headers.push((name, value.to_vec()));
    }
    (headers, &[])
}

fn memchr_lf(s: &[u8]) -> Option<usize> {
    s.iter().position(|&b| b == b'\n')
}

fn trim_end(mut s: &[u8]) -> &[u8] {
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}
