//! Outbound TLS policy, pure and sans-IO:
//!
//! - which policy applies to a recipient's destination and why
//!   ([`configured`]: `[[rule]] tls` over `route.NAME.tls` over `delivery.tls`;
//!   [`select`]: a destination's DANE over its MTA-STS over the configured one,
//!   RFC 8461 §2);
//! - what a session under that policy may do, given what the server offered and
//!   how the handshake went ([`decide`]). The SMTP client asks it after EHLO and
//!   after a refused STARTTLS; the connection asks it after the handshake. A
//!   policy that needs TLS never gets [`Verdict::Cleartext`].
//!
//! DANE is decided per MX host in `dane.rs` (its result comes in as
//! [`Basis::Dane`]); MTA-STS per destination in `mta_sts.rs` (an enforced
//! policy comes in as [`Basis::MtaSts`]).
//! [`select`] is where they take precedence. They reduce to the same levels: a usable TLSA set or an
//! enforced MTA-STS policy is `verify` against their own authority (TLSA
//! records, the policy's MX patterns), so [`decide`] needs no change for them.

use std::fmt;

use super::config::{OutboundTls, RouteConfig, RouteKind};
use crate::smtp::client::Reply;

pub use sluice_policy::TlsLevel as Level;

/// Where a policy came from: the configuration key, or what the destination
/// publishes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Basis {
    /// The MX host's TLSA records (DANE, RFC 7672; `dane.rs`).
    Dane,
    /// The destination's MTA-STS policy in enforce mode (RFC 8461;
    /// `mta_sts.rs`).
    MtaSts,
    /// `tls` of `[[rule]]` number N (1-based), the rule that decided the recipient.
    Rule(usize),
    /// `route.NAME.tls`.
    Route(String),
    /// `delivery.tls`.
    Global,
    /// An LMTP route without `tls` of its own: local stores are reached in clear.
    Lmtp,
    /// The message's REQUIRETLS (RFC 8689) raised the destination's level to
    /// `verify` ([`for_message`]).
    RequireTls,
    /// The message's `TLS-Required: No` (RFC 8689 §3), honoured by its
    /// listener, lowered the destination's level to `opportunistic`.
    TlsRequiredNo,
}

impl fmt::Display for Basis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Basis::Dane => f.write_str("DANE (TLSA records)"),
            Basis::MtaSts => f.write_str("MTA-STS (enforce)"),
            Basis::Rule(n) => write!(f, "[[rule]] {n} tls"),
            Basis::Route(name) => write!(f, "route.{name}.tls"),
            Basis::Global => f.write_str("delivery.tls"),
            Basis::Lmtp => f.write_str("LMTP route default (none)"),
            Basis::RequireTls => f.write_str("the message's REQUIRETLS"),
            Basis::TlsRequiredNo => f.write_str("the message's TLS-Required: No"),
        }
    }
}

/// The TLS policy of a destination: the level and why it applies.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsPolicy {
    pub level: Level,
    pub basis: Basis,
    /// TLS from the first byte (`tls = "implicit"`: port 465) instead of STARTTLS.
    pub implicit: bool,
}

impl TlsPolicy {
    /// `delivery.tls` alone (what applies when nothing more specific does).
    pub fn global(tls: OutboundTls) -> TlsPolicy {
        TlsPolicy {
            level: tls.level(),
            basis: Basis::Global,
            implicit: tls == OutboundTls::Implicit,
        }
    }

    /// The label in logs and metrics: "dane" and "mta-sts" for published
    /// policies, else the level ("none", "opportunistic", "required", "verify").
    pub fn name(&self) -> &'static str {
        match self.basis {
            Basis::Dane => "dane",
            Basis::MtaSts => "mta-sts",
            _ => self.level.name(),
        }
    }
}

impl fmt::Display for TlsPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (from {}", self.level, self.basis)?;
        if self.implicit {
            f.write_str(", implicit TLS")?;
        }
        f.write_str(")")
    }
}

/// The configured policy of one recipient. Precedence, most specific first:
/// 1. `tls` of the `[[rule]]` that decided the recipient (`rule`: its number
///    and level, when it set one);
/// 2. `tls` of the route the recipient takes (`route`, after any fallback);
/// 3. for LMTP routes, `none`; else `delivery.tls` (`global`).
///
/// `implicit` (port 465) is how TLS starts, not a level: it comes from the
/// route's (or the global) `tls = "implicit"` whatever level a rule sets.
pub fn configured(
    rule: Option<(usize, Level)>,
    route: Option<(&str, &RouteConfig)>,
    global: OutboundTls,
) -> TlsPolicy {
    let (setting, basis) = match route {
        Some((name, r)) => match r.tls {
            Some(tls) => (tls, Basis::Route(name.to_string())),
            None if r.kind == RouteKind::Lmtp => (OutboundTls::None, Basis::Lmtp),
            None => (global, Basis::Global),
        },
        None => (global, Basis::Global),
    };
    let implicit = setting == OutboundTls::Implicit;
    match rule {
        Some((n, level)) => TlsPolicy {
            level,
            basis: Basis::Rule(n),
            implicit,
        },
        None => TlsPolicy {
            level: setting.level(),
            basis,
            implicit,
        },
    }
}

/// The policy a session runs under (RFC 8461 §2): the destination's DANE
/// policy (usable TLSA records) when it has one, else its MTA-STS policy in
/// enforce mode, else the configured one. `testing` MTA-STS policies are not
/// passed here (they only report). How TLS starts (implicit or STARTTLS) stays
/// the configured one.
pub fn select(
    dane: Option<TlsPolicy>,
    mta_sts: Option<TlsPolicy>,
    configured: TlsPolicy,
) -> TlsPolicy {
    let implicit = configured.implicit;
    let mut chosen = dane.or(mta_sts).unwrap_or(configured);
    chosen.implicit = implicit;
    chosen
}

/// How far TLS got on the session, as [`decide`] needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake<'a> {
    /// Not tried yet: the EHLO reply is in.
    NotYet,
    /// The server answered STARTTLS with something other than 220 (the reply).
    Refused(&'a str),
    /// The handshake failed or timed out (why). The connection is unusable.
    Failed(&'a str),
    /// TLS is up. `verified`: whether the certificate chain verifies for the
    /// host name, or why not.
    Done { verified: Result<(), &'a str> },
}

/// What the session does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send STARTTLS.
    StartTls,
    /// Go on without TLS (only for `none` and `opportunistic`).
    Cleartext,
    /// TLS is up and meets the policy.
    Proceed { verified: bool },
    /// Stop and defer the recipients.
    Defer(Failure),
}

/// Why a session failed its TLS policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The policy needs TLS and the server did not offer STARTTLS.
    NoStartTls,
    /// The policy needs TLS and the server refused STARTTLS (its reply).
    StartTlsRefused(String),
    /// The handshake failed (why).
    Handshake(String),
    /// The policy needs a verified certificate and it did not verify (why).
    NotVerified(String),
    /// The message carries REQUIRETLS and the server, after TLS, did not
    /// offer REQUIRETLS in its EHLO reply (RFC 8689 §4.2.1).
    NoRequireTls,
    /// The message carries REQUIRETLS and the MX host was not authenticated:
    /// the MX answer was not DNSSEC-validated and no MTA-STS policy in
    /// enforce mode lists the host (RFC 8689 §4.2.1). Decided before any
    /// connection ([`requiretls_mx`]); the host is not used.
    MxNotAuthenticated,
}

impl Failure {
    /// The deferral every recipient gets: 4.7.10 (encryption needed) when TLS
    /// never started, 4.7.5 (cryptographic failure) when it did not succeed or
    /// the certificate did not verify. Always 4xx: a policy failure is retried,
    /// never bounced.
    pub fn reply(&self, policy: &TlsPolicy, host: &str) -> Reply {
        let p = format!("TLS policy {} ({})", policy.name(), policy.basis);
        match self {
            Failure::NoStartTls => Reply::local(
                451,
                "4.7.10",
                &format!("{p}: {host} does not offer STARTTLS"),
            ),
            Failure::StartTlsRefused(reply) => Reply::local(
                451,
                "4.7.10",
                &format!("{p}: {host} refused STARTTLS: {reply}"),
            ),
            Failure::Handshake(why) => Reply::local(
                451,
                "4.7.5",
                &format!("{p}: TLS handshake with {host} failed: {why}"),
            ),
            Failure::NotVerified(why) => Reply::local(
                451,
                "4.7.5",
                &format!("{p}: certificate of {host} not verified: {why}"),
            ),
            Failure::NoRequireTls => Reply::local(
                451,
                "4.7.30",
                &format!("REQUIRETLS: {host} does not offer REQUIRETLS"),
            ),
            Failure::MxNotAuthenticated => Reply::local(
                451,
                "4.7.4",
                &format!("REQUIRETLS: MX host {host} not authenticated: the MX records are not DNSSEC-validated and no MTA-STS policy in enforce mode lists it"),
            ),
        }
    }

    /// The `result` label of `sluice_tls_outbound_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Failure::NoStartTls => "no_starttls",
            Failure::StartTlsRefused(_) => "starttls_refused",
            Failure::Handshake(_) => "handshake_failed",
            Failure::NotVerified(_) => "not_verified",
            Failure::NoRequireTls => "no_requiretls",
            Failure::MxNotAuthenticated => "mx_not_authenticated",
        }
    }

    /// Whether the session can still say QUIT (all but a failed handshake,
    /// after which the stream is unusable). After a failed verification the
    /// QUIT goes over the TLS session just made; no mail does.
    pub fn quit(&self) -> bool {
        !matches!(self, Failure::Handshake(_))
    }
}

/// The `result` label of `sluice_tls_outbound_total` for a session that met its
/// policy: "verified", "unverified" (TLS, certificate not verified) or
/// "cleartext".
pub fn success_label(tls: bool, verified: bool) -> &'static str {
    match (tls, verified) {
        (true, true) => "verified",
        (true, false) => "unverified",
        (false, _) => "cleartext",
    }
}

/// Every `result` label, for registering the metric's series.
pub const RESULTS: [&str; 9] = [
    "verified",
    "unverified",
    "cleartext",
    "no_starttls",
    "starttls_refused",
    "handshake_failed",
    "not_verified",
    "no_requiretls",
    "mx_not_authenticated",
];

/// The decision: `level` is the policy's level, `starttls_offered` whether the
/// EHLO reply listed STARTTLS, `handshake` how far TLS got.
///
/// | level | no STARTTLS | STARTTLS refused | handshake failed | not verified |
/// |---|---|---|---|---|
/// | none | clear text | — | — | (implicit TLS only) proceed |
/// | opportunistic | clear text | clear text | defer 4.7.5 | proceed, logged unverified |
/// | required | defer 4.7.10 | defer 4.7.10 | defer 4.7.5 | proceed, logged unverified |
/// | verify | defer 4.7.10 | defer 4.7.10 | defer 4.7.5 | defer 4.7.5 after QUIT |
///
/// A failed handshake defers at every level: the connection is gone, and the
/// next host (or the next attempt) is tried; there is no clear-text retry on
/// the same connection.
pub fn decide(level: Level, starttls_offered: bool, handshake: Handshake<'_>) -> Verdict {
    match handshake {
        Handshake::NotYet => match level {
            Level::None => Verdict::Cleartext,
            _ if starttls_offered => Verdict::StartTls,
            Level::Opportunistic => Verdict::Cleartext,
            Level::Required | Level::Verify | Level::Dane => Verdict::Defer(Failure::NoStartTls),
        },
        Handshake::Refused(reply) => {
            if level.encrypts() {
                Verdict::Defer(Failure::StartTlsRefused(reply.to_string()))
            } else {
                Verdict::Cleartext
            }
        }
        Handshake::Failed(why) => Verdict::Defer(Failure::Handshake(why.to_string())),
        Handshake::Done { verified: Ok(()) } => Verdict::Proceed { verified: true },
        Handshake::Done { verified: Err(why) } => {
            if level.authenticates() {
                Verdict::Defer(Failure::NotVerified(why.to_string()))
            } else {
                Verdict::Proceed { verified: false }
            }
        }
    }
}

/// What a message asks of the transport of its onward relay (RFC 8689), as
/// a session applies it. Messages that ask different things never share a
/// connection (it is part of the site key).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum MessageTls {
    /// Nothing asked: the destination's policy.
    #[default]
    Policy,
    /// REQUIRETLS: verified TLS (the level raised to at least `verify`), a
    /// next hop that offers REQUIRETLS, and REQUIRETLS on its MAIL command.
    RequireTls,
    /// A notice (null sender) about a REQUIRETLS message: sent with
    /// REQUIRETLS over verified TLS, but a next hop without REQUIRETLS does
    /// not stop it (RFC 8689 §5: the parameter should not get a bounce
    /// discarded); it then goes without the parameter.
    RequireTlsNotice,
    /// `TLS-Required: No`, honoured: the destination's policy (configured,
    /// DANE, MTA-STS) is lowered to opportunistic; `none` stays `none`.
    Optional,
}

impl MessageTls {
    /// The request stored with the message and its sender ("" for notices).
    pub fn of(request: sluice_spool::TlsRequest, sender: &str) -> MessageTls {
        match request {
            sluice_spool::TlsRequest::Policy => MessageTls::Policy,
            sluice_spool::TlsRequest::RequireTls if sender.is_empty() => {
                MessageTls::RequireTlsNotice
            }
            sluice_spool::TlsRequest::RequireTls => MessageTls::RequireTls,
            sluice_spool::TlsRequest::Optional => MessageTls::Optional,
        }
    }

    /// Whether the message carries REQUIRETLS (either form).
    pub fn requires_tls(self) -> bool {
        matches!(self, MessageTls::RequireTls | MessageTls::RequireTlsNotice)
    }

    /// The suffix of the site key ("" for [`MessageTls::Policy`]).
    pub fn site_suffix(self) -> &'static str {
        match self {
            MessageTls::Policy => "",
            MessageTls::RequireTls => "|requiretls",
            MessageTls::RequireTlsNotice => "|requiretls-notice",
            MessageTls::Optional => "|tls-optional",
        }
    }
}

/// The policy one message's session runs under: the destination's (after
/// [`select`]) with the message's request applied. REQUIRETLS raises `none`,
/// `opportunistic` and `required` to `verify` (from [`Basis::RequireTls`]);
/// `verify` and `dane` (and DANE's or MTA-STS's verify) stay as they are, so
/// their own authority still checks the certificate. `TLS-Required: No`
/// lowers every level above `opportunistic` to it.
pub fn for_message(policy: TlsPolicy, msg: MessageTls) -> TlsPolicy {
    match msg {
        MessageTls::Policy => policy,
        MessageTls::RequireTls | MessageTls::RequireTlsNotice => {
            if policy.level.authenticates() {
                policy
            } else {
                TlsPolicy {
                    level: Level::Verify,
                    basis: Basis::RequireTls,
                    implicit: policy.implicit,
                }
            }
        }
        MessageTls::Optional => {
            if policy.level == Level::None || policy.level == Level::Opportunistic {
                policy
            } else {
                TlsPolicy {
                    level: Level::Opportunistic,
                    basis: Basis::TlsRequiredNo,
                    implicit: policy.implicit,
                }
            }
        }
    }
}

/// After the EHLO that follows TLS (or any EHLO of a session already over
/// TLS): whether the message may go, and whether its MAIL command carries
/// REQUIRETLS. `tls`: the session is over TLS; `offered`: the EHLO reply
/// listed REQUIRETLS. The level from [`for_message`] has already made sure a
/// REQUIRETLS session is verified TLS before this is asked.
pub fn requiretls_check(msg: MessageTls, tls: bool, offered: bool) -> Result<bool, Failure> {
    match msg {
        MessageTls::Policy | MessageTls::Optional => Ok(false),
        // Never reached in clear (verify needs TLS); refused all the same.
        MessageTls::RequireTls | MessageTls::RequireTlsNotice if !tls => Err(Failure::NoStartTls),
        MessageTls::RequireTls if !offered => Err(Failure::NoRequireTls),
        MessageTls::RequireTls => Ok(true),
        MessageTls::RequireTlsNotice => Ok(offered),
    }
}

/// RFC 8689 §4.2.1 step 2: an MX host may take a REQUIRETLS message (or a
/// notice about one) only when the MX lookup that named it was
/// DNSSEC-validated (`mx_secure`: the AD bit from a resolver configured as
/// validating, as DANE trusts it) or an MTA-STS policy in enforce mode lists
/// it (`sts_enforced_match`). Hosts reached without an MX lookup (routes to
/// a named host) are not asked. Other messages are never refused here.
pub fn requiretls_mx(
    msg: MessageTls,
    mx_secure: bool,
    sts_enforced_match: bool,
) -> Result<(), Failure> {
    if msg.requires_tls() && !mx_secure && !sts_enforced_match {
        return Err(Failure::MxNotAuthenticated);
    }
    Ok(())
}

/// Where every host of a REQUIRETLS message refused it on REQUIRETLS's
/// terms (`requiretls_refusals` of `attempts` hosts or endpoints), the
/// message is not deliverable: RFC 8689 §4.2.1 wants a non-delivery
/// notification, so the deferral becomes permanent. The bounce keeps the
/// cause of the last refusal (RFC 8689 §5), as the permanent form of its
/// deferral code:
///
/// | last refusal | deferral | bounce |
/// |---|---|---|
/// | next hop does not offer REQUIRETLS | 451 4.7.30 | 550 5.7.30 REQUIRETLS support required |
/// | no STARTTLS, or STARTTLS refused | 451 4.7.10 | 550 5.7.10 encryption needed |
/// | certificate not verified | 451 4.7.5 | 550 5.7.5 cryptographic failure |
/// | MX host not authenticated (no DNSSEC, no MTA-STS enforce) | 451 4.7.4 | 550 5.7.4 security features not supported |
///
/// A host that failed otherwise (connection refused, timeout, a failed
/// handshake) may work later: the message is deferred as usual. Notices are
/// never bounced (there is nobody to tell); they stay deferred until the
/// queue gives up on them.
pub fn requiretls_outcome(
    msg: MessageTls,
    attempts: usize,
    requiretls_refusals: usize,
    last: &Reply,
) -> Option<Reply> {
    if msg != MessageTls::RequireTls || attempts == 0 || requiretls_refusals < attempts {
        return None;
    }
    let why = last.text.as_str();
    let (esc, what) = match last.esc.as_deref() {
        Some("4.7.10") => ("5.7.10", "encryption needed"),
        Some("4.7.5") => ("5.7.5", "the server certificate did not verify"),
        Some("4.7.4") => ("5.7.4", "no MX host is authenticated (DNSSEC or MTA-STS)"),
        _ => ("5.7.30", "REQUIRETLS support required"),
    };
    Some(Reply::local(
        550,
        esc,
        &format!("REQUIRETLS: {what}: no MX host or relay could take the message over verified TLS with REQUIRETLS (last: {why})"),
    ))
}

#[cfg(test)]
#[path = "requiretls_tests.rs"]
mod requiretls_tests;

#[cfg(test)]
mod tests {
    use super::*;

    const LEVELS: [Level; 5] = Level::ALL;

    fn route(kind: RouteKind, tls: Option<OutboundTls>) -> RouteConfig {
        RouteConfig {
            kind,
            host: Some("smart.example.net".into()),
            port: None,
            tls,
            tls_client_cert: None,
            tls_client_key: None,
            auth_user: None,
            auth_password: None,
            fallback: None,
            fallback_after: 3,
        }
    }

    #[test]
    fn without_starttls_only_none_and_opportunistic_go_on_in_clear() {
        for level in LEVELS {
            let v = decide(level, false, Handshake::NotYet);
            match level {
                Level::None | Level::Opportunistic => assert_eq!(v, Verdict::Cleartext),
                Level::Required | Level::Verify | Level::Dane => {
                    assert_eq!(v, Verdict::Defer(Failure::NoStartTls))
                }
            }
        }
    }

    #[test]
    fn starttls_is_used_whenever_offered_except_at_none() {
        for level in LEVELS {
            let v = decide(level, true, Handshake::NotYet);
            let want = if level == Level::None {
                Verdict::Cleartext
            } else {
                Verdict::StartTls
            };
            assert_eq!(v, want, "{level}");
        }
    }

    #[test]
    fn a_refused_starttls_falls_back_to_clear_only_when_allowed() {
        for level in LEVELS {
            let v = decide(level, true, Handshake::Refused("454 4.7.0 not now"));
            if level.encrypts() {
                assert_eq!(
                    v,
                    Verdict::Defer(Failure::StartTlsRefused("454 4.7.0 not now".into()))
                );
            } else {
                assert_eq!(v, Verdict::Cleartext);
            }
        }
    }

    #[test]
    fn a_failed_handshake_defers_at_every_level() {
        for level in LEVELS {
            let v = decide(level, true, Handshake::Failed("bad record mac"));
            assert_eq!(
                v,
                Verdict::Defer(Failure::Handshake("bad record mac".into()))
            );
        }
    }

    #[test]
    fn only_verify_needs_the_certificate_to_verify() {
        for level in LEVELS {
            assert_eq!(
                decide(level, true, Handshake::Done { verified: Ok(()) }),
                Verdict::Proceed { verified: true }
            );
            let v = decide(
                level,
                true,
                Handshake::Done {
                    verified: Err("certificate not valid for name"),
                },
            );
            if level.authenticates() {
                let Verdict::Defer(f) = v else {
                    panic!("{v:?}")
                };
                assert!(f.quit(), "QUIT over the TLS session after a failed check");
                assert_eq!(f.label(), "not_verified");
            } else {
                assert_eq!(v, Verdict::Proceed { verified: false }, "{level}");
            }
        }
    }

    #[test]
    fn no_verdict_of_an_encrypting_level_is_clear_text() {
        let handshakes = [
            Handshake::NotYet,
            Handshake::Refused("502 no"),
            Handshake::Failed("eof"),
            Handshake::Done { verified: Ok(()) },
            Handshake::Done {
                verified: Err("unknown issuer"),
            },
        ];
        for level in [Level::Required, Level::Verify, Level::Dane] {
            for offered in [false, true] {
                for h in handshakes {
                    assert_ne!(
                        decide(level, offered, h),
                        Verdict::Cleartext,
                        "{level} {h:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn failures_defer_with_the_right_status_and_name_the_policy() {
        let p = TlsPolicy {
            level: Level::Verify,
            basis: Basis::Rule(2),
            implicit: false,
        };
        let cases = [
            (Failure::NoStartTls, "4.7.10", "does not offer STARTTLS"),
            (
                Failure::StartTlsRefused("454 4.7.0 no".into()),
                "4.7.10",
                "refused STARTTLS: 454 4.7.0 no",
            ),
            (Failure::Handshake("eof".into()), "4.7.5", "handshake"),
            (
                Failure::NotVerified("unknown issuer".into()),
                "4.7.5",
                "not verified: unknown issuer",
            ),
        ];
        for (f, esc, text) in cases {
            let r = f.reply(&p, "mx1.example.com");
            assert_eq!(r.code, 451, "{f:?}: never a bounce");
            let shown = r.to_string();
            assert!(shown.contains(esc), "{shown}");
            assert!(shown.contains(text), "{shown}");
            assert!(
                shown.contains("TLS policy verify ([[rule]] 2 tls)"),
                "{shown}"
            );
            assert!(shown.contains("mx1.example.com"), "{shown}");
            assert!(RESULTS.contains(&f.label()));
        }
        assert!(!Failure::Handshake("eof".into()).quit());
        assert!(Failure::NoStartTls.quit());
    }

    #[test]
    fn rule_over_route_over_global() {
        let relay = route(RouteKind::Relay, Some(OutboundTls::Required));
        let bare = route(RouteKind::Relay, None);
        let lmtp = route(RouteKind::Lmtp, None);
        let g = OutboundTls::Opportunistic;
        // Rule wins over both.
        let p = configured(Some((3, Level::Verify)), Some(("smart", &relay)), g);
        assert_eq!((p.level, p.basis.clone()), (Level::Verify, Basis::Rule(3)));
        assert_eq!(p.to_string(), "verify (from [[rule]] 3 tls)");
        // Route over global.
        let p = configured(None, Some(("smart", &relay)), g);
        assert_eq!(
            (p.level, p.basis),
            (Level::Required, Basis::Route("smart".into()))
        );
        // A route without tls takes the global level.
        let p = configured(None, Some(("smart", &bare)), OutboundTls::Verify);
        assert_eq!((p.level, p.basis), (Level::Verify, Basis::Global));
        // ...except LMTP, which is clear text unless told otherwise.
        let p = configured(None, Some(("local", &lmtp)), OutboundTls::Verify);
        assert_eq!((p.level, p.basis), (Level::None, Basis::Lmtp));
        let p = configured(Some((1, Level::Required)), Some(("local", &lmtp)), g);
        assert_eq!((p.level, p.basis), (Level::Required, Basis::Rule(1)));
        // MX (no configured route) and nothing else: global.
        assert_eq!(configured(None, None, g), TlsPolicy::global(g));
    }

    #[test]
    fn implicit_tls_is_the_transport_and_survives_a_rule_level() {
        let smtps = route(RouteKind::Relay, Some(OutboundTls::Implicit));
        let p = configured(None, Some(("smtps", &smtps)), OutboundTls::Opportunistic);
        assert_eq!((p.level, p.implicit), (Level::Required, true));
        let p = configured(
            Some((1, Level::Verify)),
            Some(("smtps", &smtps)),
            OutboundTls::Opportunistic,
        );
        assert_eq!((p.level, p.implicit), (Level::Verify, true));
        assert!(p.to_string().ends_with(", implicit TLS)"));
    }

    #[test]
    fn dane_over_mta_sts_over_configured() {
        let conf = TlsPolicy {
            level: Level::Opportunistic,
            basis: Basis::Global,
            implicit: false,
        };
        let dane = TlsPolicy {
            level: Level::Verify,
            basis: Basis::Dane,
            implicit: false,
        };
        let sts = TlsPolicy {
            level: Level::Verify,
            basis: Basis::MtaSts,
            implicit: false,
        };
        assert_eq!(select(None, None, conf.clone()), conf);
        assert_eq!(select(None, Some(sts.clone()), conf.clone()), sts);
        assert_eq!(
            select(Some(dane.clone()), Some(sts.clone()), conf.clone()),
            dane
        );
        assert_eq!(select(Some(dane.clone()), None, conf).name(), "dane");
        assert_eq!(sts.name(), "mta-sts");
        // The configured transport stays.
        let smtps = TlsPolicy {
            implicit: true,
            ..TlsPolicy::global(OutboundTls::Required)
        };
        assert!(select(Some(dane), None, smtps).implicit);
    }

    #[test]
    fn labels() {
        assert_eq!(success_label(true, true), "verified");
        assert_eq!(success_label(true, false), "unverified");
        assert_eq!(success_label(false, false), "cleartext");
        assert_eq!(TlsPolicy::global(OutboundTls::Implicit).name(), "required");
        assert_eq!(TlsPolicy::global(OutboundTls::Verify).name(), "verify");
    }
}
