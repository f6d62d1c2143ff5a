//! Inbound email authentication: iprev, SPF (RFC 7208), DKIM (RFC 6376),
//! ARC (RFC 8617) and DMARC (RFC 7489), judged by mail-auth fed through the
//! DNS bridge ([`bridge`]), then turned into an SMTP decision and an
//! Authentication-Results header (RFC 8601).
//!
//! No I/O here: the engine passes a [`DnsSource`] that asks its per-core
//! resolver. [`Verifier::verify_message`] runs the checks phase by phase,
//! each in rounds until it asks for nothing new (see `bridge.rs`).

pub mod bridge;
mod config;
mod headers;
mod rsa;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use mail_auth::arc::ArcSealer;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::Policy;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, MessageAuthenticator,
    ReceivedSpf, SpfOutput, SpfResult,
};

pub use bridge::{Answer, DnsCaches, DnsSource, Query};
pub use config::{Action, ActionConfig, VerifyConfig, DEFAULT_OFFLOAD_SIZE};
pub use headers::strip_own_results;
pub use mail_auth::{IprevOutput, IprevResult};

/// Rounds one check may take: SPF's ten DNS-querying terms plus the first
/// record and a spare.
pub const MAX_ROUNDS: usize = 12;

/// Which checks run (a listener's switches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checks {
    pub spf: bool,
    pub dkim: bool,
    pub arc: bool,
    pub dmarc: bool,
}

/// The SMTP facts a message is judged with.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub client_ip: IpAddr,
    pub helo: &'a str,
    /// "" for the null reverse-path.
    pub mail_from: &'a str,
    /// Our host name (SPF's %{r}).
    pub hostname: &'a str,
}

/// Who seals: a DKIM signer's key, d= and s=.
#[derive(Clone, Copy)]
pub struct Sealer<'a> {
    pub key: crate::dkim::KeyRef<'a>,
    pub domain: &'a str,
    pub selector: &'a str,
}

/// One mechanism's outcome as RFC 8601 names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    TempError,
    PermError,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::SoftFail => "softfail",
            Verdict::Neutral => "neutral",
            Verdict::None => "none",
            Verdict::TempError => "temperror",
            Verdict::PermError => "permerror",
        }
    }
}

impl From<SpfResult> for Verdict {
    fn from(r: SpfResult) -> Self {
        match r {
            SpfResult::Pass => Verdict::Pass,
            SpfResult::Fail => Verdict::Fail,
            SpfResult::SoftFail => Verdict::SoftFail,
            SpfResult::Neutral => Verdict::Neutral,
            SpfResult::TempError => Verdict::TempError,
            SpfResult::PermError => Verdict::PermError,
            SpfResult::None => Verdict::None,
        }
    }
}

fn dkim_verdict(r: &DkimResult) -> Verdict {
    match r {
        DkimResult::Pass => Verdict::Pass,
        DkimResult::Neutral(_) => Verdict::Neutral,
        DkimResult::Fail(_) => Verdict::Fail,
        DkimResult::PermError(_) => Verdict::PermError,
        DkimResult::TempError(_) => Verdict::TempError,
        DkimResult::None => Verdict::None,
    }
}

fn iprev_verdict(r: &IprevResult) -> Verdict {
    match r {
        IprevResult::Pass => Verdict::Pass,
        IprevResult::Fail(_) => Verdict::Fail,
        IprevResult::TempError(_) => Verdict::TempError,
        IprevResult::PermError(_) => Verdict::PermError,
        IprevResult::None => Verdict::None,
    }
}

fn dmarc_verdict(r: &DmarcResult) -> Verdict {
    match r {
        DmarcResult::Pass => Verdict::Pass,
        DmarcResult::Fail(_) => Verdict::Fail,
        DmarcResult::TempError(_) => Verdict::TempError,
        DmarcResult::PermError(_) => Verdict::PermError,
        DmarcResult::None => Verdict::None,
    }
}

/// One DKIM signature's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimSummary {
    pub verdict: Verdict,
    /// d= ("" when the signature did not parse).
    pub domain: String,
    pub selector: String,
}

/// DMARC's outcome with the policy that applies after `pct`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcSummary {
    pub verdict: Verdict,
    /// The From domain.
    pub domain: String,
    /// p= (or sp=) as published.
    pub published: DmarcPolicy,
    /// What to apply to a failure: `published`, or one level weaker when
    /// the message fell outside `pct`.
    pub applied: DmarcPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcPolicy {
    None,
    Quarantine,
    Reject,
}

impl DmarcPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DmarcPolicy::None => "none",
            DmarcPolicy::Quarantine => "quarantine",
            DmarcPolicy::Reject => "reject",
        }
    }
    fn weaker(self) -> DmarcPolicy {
        match self {
            DmarcPolicy::Reject => DmarcPolicy::Quarantine,
            _ => DmarcPolicy::None,
        }
    }
}

/// Everything verification found out about one message.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub iprev: Option<Verdict>,
    pub spf_helo: Option<Verdict>,
    pub spf_mailfrom: Option<Verdict>,
    pub dkim: Vec<DkimSummary>,
    pub arc: Option<Verdict>,
    pub dmarc: Option<DmarcSummary>,
    /// `Authentication-Results: …\r\n` (and ARC set, Received-SPF) to put
    /// before the message.
    pub headers: Vec<u8>,
    /// An ARC seal was asked for but could not be made (chain failed, or
    /// the key refused): why.
    pub seal_error: Option<String>,
    /// DNS queries answered for this message.
    pub queries: usize,
    /// The RFC 5322 From domain (lower case; "" when there is none).
    pub from_domain: String,
}

impl Report {
    /// The SPF result DMARC and the actions use: MAIL FROM's, or HELO's for
    /// the null reverse-path.
    pub fn spf(&self) -> Option<Verdict> {
        self.spf_mailfrom.or(self.spf_helo)
    }

    /// DKIM as one result: pass if any signature passed, else the first
    /// temperror, else fail if any failed, else none.
    pub fn dkim_overall(&self) -> Option<Verdict> {
        if self.dkim.is_empty() {
            return None;
        }
        for want in [Verdict::Pass, Verdict::TempError] {
            if self.dkim.iter().any(|d| d.verdict == want) {
                return Some(want);
            }
        }
        if self.dkim.iter().any(|d| {
            matches!(
                d.verdict,
                Verdict::Fail | Verdict::PermError | Verdict::Neutral
            )
        }) {
            return Some(Verdict::Fail);
        }
        Some(Verdict::None)
    }

    /// Some DKIM signature passed, but none for the From domain or a parent
    /// of it (RFC 7372's "no valid author-matched signature", 5.7.22).
    pub fn dkim_pass_unaligned(&self) -> bool {
        let from = self.from_domain.as_str();
        let passed: Vec<&str> = self
            .dkim
            .iter()
            .filter(|d| d.verdict == Verdict::Pass)
            .map(|d| d.domain.as_str())
            .collect();
        !passed.is_empty()
            && !from.is_empty()
            && !passed.iter().any(|d| {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                from == d || from.ends_with(&format!(".{d}"))
            })
    }

    /// `method=result` pairs for the log line and metrics.
    pub fn pairs(&self) -> Vec<(&'static str, Verdict)> {
        let mut out = Vec::new();
        if let Some(v) = self.iprev {
            out.push(("iprev", v));
        }
        if let Some(v) = self.spf_helo {
            out.push(("spf_helo", v));
        }
        if let Some(v) = self.spf_mailfrom {
            out.push(("spf_mailfrom", v));
        }
        if let Some(v) = self.dkim_overall() {
            out.push(("dkim", v));
        }
        if let Some(v) = self.arc {
            out.push(("arc", v));
        }
        if let Some(d) = &self.dmarc {
            out.push(("dmarc", d.verdict));
        }
        out
    }

    /// "spf=pass dkim=pass dmarc=pass" for the transaction log.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for (m, v) in self.pairs() {
            if !s.is_empty() {
                s.push(' ');
            }
            s.push_str(m);
            s.push('=');
            s.push_str(v.as_str());
        }
        s
    }
}

/// SPF for one transaction (RFC 7208 §2.3 HELO and §2.4 MAIL FROM), found
/// when MAIL FROM arrives and kept for the checks after DATA (DMARC
/// alignment, Authentication-Results, Received-SPF): never looked up twice.
#[derive(Debug, Clone, Default)]
pub struct SpfResults {
    /// None: the HELO identity was not checked (SPF off, or no HELO name).
    pub helo: Option<SpfOutput>,
    /// None: SPF off, or the null reverse-path (HELO stands in).
    pub mail_from: Option<SpfOutput>,
}

impl SpfResults {
    pub fn helo_verdict(&self) -> Option<Verdict> {
        self.helo.as_ref().map(|o| o.result().into())
    }

    pub fn mail_from_verdict(&self) -> Option<Verdict> {
        self.mail_from.as_ref().map(|o| o.result().into())
    }

    /// Both identities as temperror: what a check that could not finish in
    /// time gives.
    pub fn temperror(env: &Envelope<'_>) -> SpfResults {
        let out = |d: &str| spf_with(SpfOutput::new(d.to_string()), SpfResult::TempError, d);
        SpfResults {
            helo: (!env.helo.is_empty()).then(|| out(env.helo)),
            mail_from: env.mail_from.rsplit_once('@').map(|(_, d)| out(d)),
        }
    }

    /// As a report holding only SPF (for [`decide_spf`] and metrics).
    pub fn report(&self) -> Report {
        Report {
            spf_helo: self.helo_verdict(),
            spf_mailfrom: self.mail_from_verdict(),
            ..Report::default()
        }
    }
}

/// The body hashes a message's DKIM signatures and ARC message signatures
/// claim (and the one an ARC seal of ours needs), computed apart from the
/// checks: the size-dependent part of verification, which the engine runs
/// on another thread for large messages (see [`Verifier::verify_message`]).
#[derive(Debug, Clone)]
pub struct BodyHashes {
    /// Where the body starts (the header parse of the checks must agree).
    offset: u32,
    hashes: Vec<BodyHash>,
}

type BodyHash = (
    mail_auth::dkim::Canonicalization,
    mail_auth::common::crypto::HashAlgorithm,
    u64,
    Vec<u8>,
);

impl BodyHashes {
    /// Parses the header and hashes the body for each (canonicalization,
    /// algorithm, length) the signatures use, by mail-auth's own code; with
    /// `seal`, also relaxed/SHA-256 over the whole body. None: no header.
    pub fn compute(raw: &[u8], seal: bool) -> Option<BodyHashes> {
        use mail_auth::common::crypto::HashAlgorithm;
        use mail_auth::dkim::Canonicalization;
        let m = AuthenticatedMessage::parse(raw)?;
        let offset = m.body_offset;
        let mut hashes = m.body_hashes;
        let sealing = (Canonicalization::Relaxed, HashAlgorithm::Sha256, 0u64);
        if seal && !hashes.iter().any(|(c, h, l, _)| (*c, *h, *l) == sealing) {
            let body = raw.get(offset as usize..).unwrap_or_default();
            let bh = HashAlgorithm::Sha256
                .hash(Canonicalization::Relaxed.canonical_body(body, 0))
                .as_ref()
                .to_vec();
            hashes.push((sealing.0, sealing.1, sealing.2, bh));
        }
        Some(BodyHashes { offset, hashes })
    }

    /// How many hashes were made (tests, logs).
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

/// The message as mail-auth sees it. With `hashes`, only the header part is
/// parsed here (hashing an empty body) and the body hashes come from
/// `hashes`; should they not match what the header asks for (they are made
/// by the same parser, so this is not expected), the whole message is
/// parsed here instead, which is slower but never wrong.
fn parse_message<'x>(
    raw: &'x [u8],
    hashes: Option<&BodyHashes>,
) -> Option<AuthenticatedMessage<'x>> {
    let Some(h) = hashes else {
        return AuthenticatedMessage::parse(raw);
    };
    let with_hashes = || {
        let head = raw.get(..h.offset as usize)?;
        let mut m = AuthenticatedMessage::parse(head)?;
        if m.body_offset != h.offset {
            return None;
        }
        m.raw_message = raw;
        for entry in &mut m.body_hashes {
            let found = h
                .hashes
                .iter()
                .find(|(c, a, l, _)| (*c, *a, *l) == (entry.0, entry.1, entry.2))?;
            entry.3.clone_from(&found.3);
        }
        for extra in &h.hashes {
            if !m
                .body_hashes
                .iter()
                .any(|(c, a, l, _)| (*c, *a, *l) == (extra.0, extra.1, extra.2))
            {
                m.body_hashes.push(extra.clone());
            }
        }
        Some(m)
    };
    with_hashes().or_else(|| AuthenticatedMessage::parse(raw))
}

/// What the listener does with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Accept,
    /// Permanent refusal: code, enhanced code, text.
    Reject(u16, &'static str, String),
    /// Temporary refusal.
    TempFail(u16, &'static str, String),
}

/// The reply for a result whose action is reject or tempfail.
fn act(
    action: Action,
    code: (u16, &'static str, String),
    temp: (u16, &'static str, String),
) -> Option<Decision> {
    match action {
        Action::Accept => None,
        Action::Reject => Some(Decision::Reject(code.0, code.1, code.2)),
        Action::Tempfail => Some(Decision::TempFail(temp.0, temp.1, temp.2)),
    }
}

fn temp_reply(esc: &'static str, what: &str) -> (u16, &'static str, String) {
    (
        451,
        esc,
        format!("Temporary DNS failure while checking {what}, try again later"),
    )
}

/// SPF's own refusal (fail, softfail, permerror), if its action says so.
fn spf_decision(spf: Option<Verdict>, actions: &ActionConfig) -> Option<Decision> {
    match spf {
        Some(Verdict::Fail) => act(
            actions.spf_fail,
            (550, "5.7.23", "SPF validation failed".to_string()),
            temp_reply("4.7.23", "SPF"),
        ),
        Some(Verdict::SoftFail) => act(
            actions.spf_softfail,
            (
                550,
                "5.7.23",
                "SPF validation failed (softfail)".to_string(),
            ),
            temp_reply("4.7.23", "SPF"),
        ),
        Some(Verdict::PermError) => act(
            actions.spf_permerror,
            (550, "5.7.24", "SPF validation error".to_string()),
            temp_reply("4.7.24", "SPF"),
        ),
        _ => None,
    }
}

/// The decision at MAIL FROM, on SPF alone: what [`decide`] would say about
/// SPF after DATA (fail/softfail/permerror by their actions, temperror by
/// `temperror`), so a refusal comes before the body is sent.
pub fn decide_spf(spf: &SpfResults, actions: &ActionConfig) -> Decision {
    let verdict = spf.report().spf();
    if let Some(d) = spf_decision(verdict, actions) {
        return d;
    }
    if actions.temperror == Action::Tempfail && verdict == Some(Verdict::TempError) {
        let (c, e, t) = temp_reply("4.7.24", "SPF");
        return Decision::TempFail(c, e, t);
    }
    Decision::Accept
}

/// The listener's actions applied to a report, in order: iprev, SPF, DKIM,
/// DMARC, then temporary errors.
pub fn decide(report: &Report, actions: &ActionConfig) -> Decision {
    let temp = temp_reply;
    // No PTR at all (permerror) counts like a PTR that does not lead back.
    if matches!(report.iprev, Some(Verdict::Fail | Verdict::PermError)) {
        if let Some(d) = act(
            actions.iprev_fail,
            (550, "5.7.25", "Reverse DNS validation failed".to_string()),
            temp("4.7.25", "reverse DNS"),
        ) {
            return d;
        }
    }
    if let Some(d) = spf_decision(report.spf(), actions) {
        return d;
    }
    if report.dkim_overall() == Some(Verdict::Fail) {
        if let Some(d) = act(
            actions.dkim_fail,
            (550, "5.7.20", "No passing DKIM signature found".to_string()),
            temp("4.7.20", "DKIM"),
        ) {
            return d;
        }
    }
    if report.dkim_pass_unaligned() {
        if let Some(d) = act(
            actions.dkim_unaligned,
            (
                550,
                "5.7.22",
                "No valid author-matched DKIM signature found".to_string(),
            ),
            temp("4.7.22", "DKIM"),
        ) {
            return d;
        }
    }
    if let Some(dm) = &report.dmarc {
        if dm.verdict == Verdict::Fail {
            let action = match dm.applied {
                DmarcPolicy::Reject => actions.dmarc_reject,
                DmarcPolicy::Quarantine => actions.dmarc_quarantine,
                DmarcPolicy::None => Action::Accept,
            };
            if let Some(d) = act(
                action,
                (
                    550,
                    "5.7.1",
                    format!(
                        "Email rejected per DMARC policy for {} (p={})",
                        dm.domain,
                        dm.applied.as_str()
                    ),
                ),
                temp("4.7.1", "DMARC"),
            ) {
                return d;
            }
        }
    }
    if actions.temperror == Action::Tempfail {
        let temps = [
            (report.iprev, "4.7.25", "reverse DNS"),
            (report.spf(), "4.7.24", "SPF"),
            (report.dkim_overall(), "4.7.20", "DKIM"),
            (report.dmarc.as_ref().map(|d| d.verdict), "4.7.1", "DMARC"),
        ];
        for (v, esc, what) in temps {
            if v == Some(Verdict::TempError) {
                let (c, e, t) = temp(esc, what);
                return Decision::TempFail(c, e, t);
            }
        }
    }
    Decision::Accept
}

/// Polls a mail-auth future that can only finish at once (every lookup is
/// answered from the caches); None if it would wait, which would be a bug
/// in the bridge and is reported as temperror by the callers.
fn now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// mail-auth's verifier, never asked to resolve anything itself.
pub struct Verifier {
    auth: MessageAuthenticator,
    parsed: std::rc::Rc<bridge::ParsedTxt>,
}

/// Building mail-auth's authenticator failed (it builds a resolver object
/// it never uses).
#[derive(Debug, thiserror::Error)]
#[error("mail-auth setup: {0}")]
pub struct SetupError(String);

impl Verifier {
    /// The authenticator's own resolver gets no servers: if a lookup ever
    /// slipped past the caches it could not leave the box.
    pub fn new() -> Result<Verifier, SetupError> {
        use mail_auth::hickory_resolver::config::{ResolverConfig, ResolverOpts};
        let config = ResolverConfig::from_parts(None, vec![], vec![]);
        MessageAuthenticator::new(config, ResolverOpts::default())
            .map(|auth| Verifier {
                auth,
                parsed: Default::default(),
            })
            .map_err(|e| SetupError(e.to_string()))
    }

    /// Runs `run` against the caches in rounds: after each run the names it
    /// missed are resolved and it runs again. None: it still asked for new
    /// names after [`MAX_ROUNDS`] (or would have waited).
    async fn settle<T, S: DnsSource>(
        caches: &DnsCaches,
        dns: &S,
        mut run: impl FnMut() -> Option<T>,
    ) -> Option<T> {
        for _ in 0..MAX_ROUNDS {
            caches.reset_run();
            let out = run()?;
            let missing = caches.missing();
            if missing.is_empty() {
                return Some(out);
            }
            fetch(caches, dns, missing).await;
        }
        None
    }

    /// iprev (RFC 8601 §3): the client's PTR names must resolve back to it.
    pub async fn verify_iprev<S: DnsSource>(&self, dns: &S, ip: IpAddr) -> IprevOutput {
        let caches = DnsCaches::new(ip).with_parsed(self.parsed.clone());
        fetch(&caches, dns, vec![Query::Ptr(ip)]).await;
        let out = Self::settle(&caches, dns, || {
            let mut o = now(self.auth.verify_iprev(caches.params(ip)))?;
            if caches.touched_temp_failure() {
                o.result = IprevResult::TempError(mail_auth::Error::Dns(
                    mail_auth::DnsError::Resolver("temporary DNS failure".into()),
                ));
            }
            Some(o)
        })
        .await;
        out.unwrap_or(IprevOutput {
            result: IprevResult::TempError(mail_auth::Error::Dns(mail_auth::DnsError::Resolver(
                "too many DNS rounds".into(),
            ))),
            ptr: None,
        })
    }

    /// SPF check_host() for one identity: `sender` "" checks the HELO name.
    async fn spf<S: DnsSource>(
        &self,
        caches: &DnsCaches,
        dns: &S,
        env: &Envelope<'_>,
        sender: &str,
    ) -> SpfOutput {
        let (params, domain) = if sender.is_empty() {
            (
                SpfParameters::verify_ehlo(env.client_ip, env.helo, env.hostname),
                env.helo.to_string(),
            )
        } else {
            let domain = sender.rsplit_once('@').map_or(env.helo, |(_, d)| d);
            (
                SpfParameters::verify_mail_from(env.client_ip, env.helo, env.hostname, sender),
                domain.to_string(),
            )
        };
        let mut params = Some(params);
        let out = Self::settle(caches, dns, || {
            // SpfParameters is not Clone: rebuild it for each round.
            let p = match params.take() {
                Some(p) => p,
                None if sender.is_empty() => {
                    SpfParameters::verify_ehlo(env.client_ip, env.helo, env.hostname)
                }
                None => {
                    SpfParameters::verify_mail_from(env.client_ip, env.helo, env.hostname, sender)
                }
            };
            let out = now(self.auth.check_host(caches.params(p)))?;
            let result = if caches.touched_temp_failure() {
                SpfResult::TempError
            } else if caches.void_lookups(&domain) > 2 {
                SpfResult::PermError
            } else {
                out.result()
            };
            Some(spf_with(out, result, &domain))
        })
        .await;
        out.unwrap_or_else(|| {
            spf_with(
                mail_auth::SpfOutput::new(domain.clone()),
                SpfResult::TempError,
                &domain,
            )
        })
    }

    /// SPF for the HELO name alone (`sluice debug spf` and tests).
    pub async fn check_spf<S: DnsSource>(&self, dns: &S, env: &Envelope<'_>) -> Verdict {
        let caches = DnsCaches::new(env.client_ip).with_parsed(self.parsed.clone());
        let out = self.spf(&caches, dns, env, env.mail_from).await;
        out.result().into()
    }

    /// SPF for a transaction as MAIL FROM arrives: the HELO identity (RFC
    /// 7208 §2.3) and the MAIL FROM identity (§2.4; none for the null
    /// reverse-path, where HELO stands in), both records fetched in one
    /// batch first.
    pub async fn verify_spf<S: DnsSource>(&self, dns: &S, env: &Envelope<'_>) -> SpfResults {
        let caches = DnsCaches::new(env.client_ip).with_parsed(self.parsed.clone());
        let mut first: Vec<Query> = Vec::new();
        if !env.helo.is_empty() {
            first.push(Query::Txt(env.helo.to_ascii_lowercase()));
        }
        if let Some((_, d)) = env.mail_from.rsplit_once('@') {
            first.push(Query::Txt(d.to_ascii_lowercase()));
        }
        first.sort();
        first.dedup();
        fetch(&caches, dns, first).await;
        let helo = if env.helo.is_empty() {
            None
        } else {
            Some(self.spf(&caches, dns, env, "").await)
        };
        let mail_from = if env.mail_from.is_empty() {
            None
        } else {
            Some(self.spf(&caches, dns, env, env.mail_from).await)
        };
        SpfResults { helo, mail_from }
    }

    /// Judges one message after DATA: DKIM, ARC and DMARC as `checks`
    /// says, with `spf` found at MAIL FROM ([`Self::verify_spf`]; empty when
    /// SPF is off) for DMARC and the headers; builds the
    /// Authentication-Results header for `authserv_id` (carrying `iprev`
    /// when given), and ARC-seals when a sealer is given. `pct_sample`
    /// (0..100) decides whether a DMARC policy with `pct` below 100 applies
    /// to this message. `hashes`, when given, are the body hashes computed
    /// elsewhere ([`BodyHashes::compute`]): the body is then not read here.
    #[allow(clippy::too_many_arguments)]
    pub async fn verify_message<S: DnsSource>(
        &self,
        dns: &S,
        env: &Envelope<'_>,
        raw: &[u8],
        hashes: Option<&BodyHashes>,
        spf: &SpfResults,
        checks: Checks,
        authserv_id: &str,
        iprev: Option<&IprevOutput>,
        sealer: Option<Sealer<'_>>,
        received_spf: bool,
        pct_sample: u8,
    ) -> Report {
        let caches = DnsCaches::new(env.client_ip).with_parsed(self.parsed.clone());
        let mut report = Report {
            iprev: iprev.map(|o| iprev_verdict(&o.result)),
            ..Report::default()
        };
        let message = parse_message(raw, hashes);

        // Prefetch what the headers name, in one batch.
        let mut first: Vec<Query> = Vec::new();
        if let Some(m) = &message {
            if checks.dkim {
                for h in &m.dkim_headers {
                    first.push(Query::Txt(
                        format!("{}._domainkey.{}", h.header.s, h.header.d).to_ascii_lowercase(),
                    ));
                }
            }
            if checks.arc {
                for h in &m.ams_headers {
                    first.push(Query::Txt(
                        format!("{}._domainkey.{}", h.header.s, h.header.d).to_ascii_lowercase(),
                    ));
                }
                for h in &m.as_headers {
                    first.push(Query::Txt(
                        format!("{}._domainkey.{}", h.header.s, h.header.d).to_ascii_lowercase(),
                    ));
                }
            }
            if checks.dmarc {
                for from in &m.from {
                    if let Some((_, d)) = from.rsplit_once('@') {
                        let mut d = d.trim_end_matches('.').to_ascii_lowercase();
                        loop {
                            first.push(Query::Txt(format!("_dmarc.{d}")));
                            match d.split_once('.') {
                                Some((_, rest)) if rest.contains('.') => d = rest.to_string(),
                                _ => break,
                            }
                        }
                    }
                }
            }
        }
        first.sort();
        first.dedup();
        fetch(&caches, dns, first).await;

        let spf_helo = spf.helo.as_ref().filter(|_| checks.spf);
        let spf_mailfrom = spf.mail_from.as_ref().filter(|_| checks.spf);
        report.spf_helo = spf_helo.map(|o| o.result().into());
        report.spf_mailfrom = spf_mailfrom.map(|o| o.result().into());

        let mut ar = AuthenticationResults::new(authserv_id);
        if let Some(o) = iprev {
            ar = ar.with_iprev_result(o, env.client_ip);
        }
        if let Some(o) = spf_helo {
            ar = ar.with_spf_ehlo_result(o, env.client_ip, env.helo);
        }
        if let Some(o) = spf_mailfrom {
            ar = ar.with_spf_mailfrom_result(o, env.client_ip, env.mail_from, env.helo);
        }

        let Some(message) = message else {
            report.headers = header_bytes(&ar);
            report.queries = caches.answered.get();
            return report;
        };

        let dkim = if checks.dkim || checks.dmarc {
            Self::settle(&caches, dns, || {
                // Only TXT lookups here, whose temporary failures mail-auth
                // reads from the cache as temperror itself.
                let out = now(self.auth.verify_dkim(caches.params(&message)))?;
                Some(out)
            })
            .await
            .unwrap_or_default()
        } else {
            Vec::new()
        };
        if checks.dkim {
            report.dkim = dkim
                .iter()
                .map(|o| DkimSummary {
                    verdict: dkim_verdict(o.result()),
                    domain: o.signature().map(|s| s.d.clone()).unwrap_or_default(),
                    selector: o.signature().map(|s| s.s.clone()).unwrap_or_default(),
                })
                .collect();
            let header_from = message.from.first().map(String::as_str).unwrap_or("");
            report.from_domain = header_from
                .rsplit_once('@')
                .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase())
                .unwrap_or_default();
            ar = ar.with_dkim_results(&dkim, header_from);
        }

        let arc = if checks.arc || sealer.is_some() {
            Self::settle(&caches, dns, || {
                now(self.auth.verify_arc(caches.params(&message)))
            })
            .await
        } else {
            None
        };
        if checks.arc {
            if let Some(a) = &arc {
                if !a.sets().is_empty() || !matches!(a.result(), DkimResult::None) {
                    report.arc = Some(dkim_verdict(a.result()));
                    ar = ar.with_arc_result(a, env.client_ip);
                } else {
                    report.arc = Some(Verdict::None);
                }
            } else {
                report.arc = Some(Verdict::TempError);
            }
        }

        if checks.dmarc {
            let mail_from_domain = match env.mail_from.rsplit_once('@') {
                Some((_, d)) => d.to_string(),
                None => env.helo.to_string(),
            };
            let spf_for_dmarc = spf_mailfrom
                .or(spf_helo)
                .cloned()
                .unwrap_or_else(|| mail_auth::SpfOutput::new(mail_from_domain.clone()));
            let out = Self::settle(&caches, dns, || {
                let o = now(self.auth.verify_dmarc(caches.params(DmarcParameters {
                    message: &message,
                    dkim_output: &dkim,
                    dkim2_output: None,
                    rfc5321_mail_from_domain: &mail_from_domain,
                    spf_output: &spf_for_dmarc,
                })))?;
                Some((o, caches.touched_temp_failure()))
            })
            .await;
            match out {
                Some((o, temp)) => {
                    let verdict = if temp && !matches!(o.result(), DmarcResult::Pass) {
                        Verdict::TempError
                    } else {
                        dmarc_verdict(&o.result())
                    };
                    let published = match o.policy() {
                        Policy::Reject => DmarcPolicy::Reject,
                        Policy::Quarantine => DmarcPolicy::Quarantine,
                        Policy::None | Policy::Unspecified => DmarcPolicy::None,
                    };
                    let pct = find_pct(&caches, o.domain());
                    let applied = if u32::from(pct_sample) < pct {
                        published
                    } else {
                        published.weaker()
                    };
                    if !o.domain().is_empty() {
                        report.dmarc = Some(DmarcSummary {
                            verdict,
                            domain: o.domain().to_string(),
                            published,
                            applied,
                        });
                        ar = ar.with_dmarc_result(&o);
                    }
                }
                None => {
                    report.dmarc = Some(DmarcSummary {
                        verdict: Verdict::TempError,
                        domain: message
                            .from
                            .first()
                            .and_then(|f| f.rsplit_once('@'))
                            .map(|(_, d)| d.to_string())
                            .unwrap_or_default(),
                        published: DmarcPolicy::None,
                        applied: DmarcPolicy::None,
                    });
                }
            }
        }

        let mut headers = Vec::new();
        if let (Some(sealer), Some(arc)) = (sealer, &arc) {
            if arc.can_be_sealed() {
                let sealed = seal_with(sealer, &message, &ar, arc);
                match sealed {
                    Ok(h) => headers.extend_from_slice(&h),
                    Err(e) => report.seal_error = Some(e),
                }
            } else {
                report.seal_error = Some("ARC chain failed: not sealed".to_string());
            }
        }
        headers.extend_from_slice(&header_bytes(&ar));
        if received_spf {
            if let Some(o) = spf_mailfrom.or(spf_helo) {
                let r = ReceivedSpf::new(o, env.client_ip, env.helo, env.mail_from, env.hostname);
                headers.extend_from_slice(r.to_header().as_bytes());
            }
        }
        report.headers = headers;
        report.queries = caches.answered.get();
        report
    }
}

fn seal_with(
    sealer: Sealer<'_>,
    message: &AuthenticatedMessage<'_>,
    ar: &AuthenticationResults<'_>,
    arc: &mail_auth::ArcOutput<'_>,
) -> Result<Vec<u8>, String> {
    let set = ArcSealer::from_key(sealer.key)
        .domain(sealer.domain)
        .selector(sealer.selector)
        // Not DKIM-Signature: ours is added after the seal, on top, and
        // would be the instance a verifier picks for h=.
        .headers([
            "From",
            "To",
            "Cc",
            "Subject",
            "Date",
            "Message-ID",
            "Reply-To",
        ])
        .seal(message, ar, arc)
        .map_err(|e| e.to_string())?;
    Ok(set.to_header().into_bytes())
}

fn header_bytes(ar: &AuthenticationResults<'_>) -> Vec<u8> {
    ar.to_header().into_bytes()
}

fn spf_with(out: SpfOutput, result: SpfResult, domain: &str) -> SpfOutput {
    let _ = out;
    mail_auth::SpfOutput::new(domain.to_string()).with_result(result)
}

/// `pct=` of the DMARC record that applied to `domain`: its own, else the
/// nearest parent's that was fetched. 100 when absent or unreadable.
fn find_pct(caches: &DnsCaches, domain: &str) -> u32 {
    let mut d = domain.to_ascii_lowercase();
    loop {
        if let Some(raw) = caches.dmarc_raw(&d) {
            return raw
                .split(';')
                .filter_map(|t| t.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("pct"))
                .and_then(|(_, v)| v.trim().parse::<u32>().ok())
                .map_or(100, |p| p.min(100));
        }
        match d.split_once('.') {
            Some((_, rest)) if !rest.is_empty() => d = rest.to_string(),
            _ => return 100,
        }
    }
}

/// Resolves `queries` not answered yet and stores the answers; a query the
/// source leaves out is stored as a temporary failure.
async fn fetch<S: DnsSource>(caches: &DnsCaches, dns: &S, queries: Vec<Query>) {
    let queries: Vec<Query> = queries.into_iter().filter(|q| !caches.knows(q)).collect();
    if queries.is_empty() {
        return;
    }
    let answers = dns.resolve(queries.clone()).await;
    for (q, a) in answers {
        caches.insert(q, a);
    }
    for q in queries {
        if !caches.knows(&q) {
            caches.insert(q, Answer::TempFail("no answer".into()));
        }
    }
}
