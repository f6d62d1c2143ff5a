//! REQUIRETLS and `TLS-Required: No` (RFC 8689) in the pure TLS decision:
//! every level and basis with every message request.

use super::*;
use crate::delivery::config::OutboundTls;

const REQUESTS: [MessageTls; 4] = [
    MessageTls::Policy,
    MessageTls::RequireTls,
    MessageTls::RequireTlsNotice,
    MessageTls::Optional,
];

fn bases() -> Vec<Basis> {
    vec![
        Basis::Global,
        Basis::Rule(2),
        Basis::Route("smart".into()),
        Basis::Lmtp,
        Basis::Dane,
        Basis::MtaSts,
    ]
}

fn policy(level: Level, basis: Basis, implicit: bool) -> TlsPolicy {
    TlsPolicy {
        level,
        basis,
        implicit,
    }
}

#[test]
fn the_request_comes_from_the_envelope_and_its_sender() {
    use sluice_spool::TlsRequest;
    assert_eq!(
        MessageTls::of(TlsRequest::Policy, "a@b"),
        MessageTls::Policy
    );
    assert_eq!(MessageTls::of(TlsRequest::Policy, ""), MessageTls::Policy);
    assert_eq!(
        MessageTls::of(TlsRequest::RequireTls, "a@b"),
        MessageTls::RequireTls
    );
    assert_eq!(
        MessageTls::of(TlsRequest::RequireTls, ""),
        MessageTls::RequireTlsNotice
    );
    assert_eq!(
        MessageTls::of(TlsRequest::Optional, "a@b"),
        MessageTls::Optional
    );
    assert!(MessageTls::RequireTls.requires_tls());
    assert!(MessageTls::RequireTlsNotice.requires_tls());
    assert!(!MessageTls::Optional.requires_tls());
    assert!(!MessageTls::Policy.requires_tls());
}

#[test]
fn every_level_and_basis_with_every_request() {
    for level in Level::ALL {
        for basis in bases() {
            for implicit in [false, true] {
                let p = policy(level, basis.clone(), implicit);
                for msg in REQUESTS {
                    let got = for_message(p.clone(), msg);
                    assert_eq!(got.implicit, implicit, "how TLS starts never changes");
                    match msg {
                        MessageTls::Policy => assert_eq!(got, p),
                        MessageTls::RequireTls | MessageTls::RequireTlsNotice => {
                            assert!(got.level.authenticates(), "{p} {msg:?} -> {got}");
                            if level.authenticates() {
                                // verify/dane keep their own authority.
                                assert_eq!(got, p);
                            } else {
                                assert_eq!(got.level, Level::Verify);
                                assert_eq!(got.basis, Basis::RequireTls);
                                assert_eq!(got.name(), "verify");
                            }
                        }
                        MessageTls::Optional => match level {
                            Level::None | Level::Opportunistic => assert_eq!(got, p),
                            _ => {
                                assert_eq!(got.level, Level::Opportunistic);
                                assert_eq!(got.basis, Basis::TlsRequiredNo);
                                assert_eq!(got.name(), "opportunistic");
                            }
                        },
                    }
                }
            }
        }
    }
}

#[test]
fn a_requiretls_session_never_goes_in_clear_nor_unverified() {
    for level in Level::ALL {
        for basis in bases() {
            for msg in [MessageTls::RequireTls, MessageTls::RequireTlsNotice] {
                let l = for_message(policy(level, basis.clone(), false), msg).level;
                for offered in [false, true] {
                    let v = decide(l, offered, Handshake::NotYet);
                    assert!(v != Verdict::Cleartext, "{level} {basis:?} {msg:?}");
                }
                let v = decide(l, true, Handshake::Refused("454 4.7.0 no"));
                assert!(matches!(v, Verdict::Defer(_)), "{v:?}");
                let v = decide(
                    l,
                    true,
                    Handshake::Done {
                        verified: Err("wrong name"),
                    },
                );
                assert_eq!(v, Verdict::Defer(Failure::NotVerified("wrong name".into())));
                let v = decide(l, true, Handshake::Done { verified: Ok(()) });
                assert_eq!(v, Verdict::Proceed { verified: true });
            }
        }
    }
}

#[test]
fn tls_required_no_falls_back_to_clear_where_the_policy_would_not() {
    for level in [Level::Required, Level::Verify, Level::Dane] {
        for basis in bases() {
            let l = for_message(policy(level, basis, false), MessageTls::Optional).level;
            assert_eq!(decide(l, false, Handshake::NotYet), Verdict::Cleartext);
            assert_eq!(
                decide(
                    l,
                    true,
                    Handshake::Done {
                        verified: Err("self-signed")
                    }
                ),
                Verdict::Proceed { verified: false }
            );
        }
    }
}

#[test]
fn the_next_hop_must_offer_requiretls_except_for_notices() {
    // (request, tls, offered) -> outcome
    let cases = [
        (MessageTls::Policy, false, false, Ok(false)),
        (MessageTls::Policy, true, true, Ok(false)),
        (MessageTls::Optional, true, true, Ok(false)),
        (MessageTls::Optional, false, false, Ok(false)),
        (MessageTls::RequireTls, true, true, Ok(true)),
        (
            MessageTls::RequireTls,
            true,
            false,
            Err(Failure::NoRequireTls),
        ),
        (
            MessageTls::RequireTls,
            false,
            true,
            Err(Failure::NoStartTls),
        ),
        (
            MessageTls::RequireTls,
            false,
            false,
            Err(Failure::NoStartTls),
        ),
        (MessageTls::RequireTlsNotice, true, true, Ok(true)),
        (MessageTls::RequireTlsNotice, true, false, Ok(false)),
        (
            MessageTls::RequireTlsNotice,
            false,
            false,
            Err(Failure::NoStartTls),
        ),
    ];
    for (msg, tls, offered, want) in cases {
        assert_eq!(
            requiretls_check(msg, tls, offered),
            want,
            "{msg:?} tls={tls} offered={offered}"
        );
    }
    let f = Failure::NoRequireTls;
    assert_eq!(f.label(), "no_requiretls");
    assert!(RESULTS.contains(&f.label()));
    assert!(f.quit(), "QUIT over the TLS session");
    let r = f.reply(&TlsPolicy::global(OutboundTls::Verify), "mx.example.net");
    assert_eq!((r.code, r.esc.as_deref()), (451, Some("4.7.30")));
    assert!(r.text.contains("mx.example.net"), "{}", r.text);
}

#[test]
fn only_a_refusal_by_every_host_bounces_and_only_requiretls_messages() {
    let last = Reply::local(451, "4.7.30", "REQUIRETLS: mx2 does not offer REQUIRETLS");
    let bounced = requiretls_outcome(MessageTls::RequireTls, 2, 2, &last).expect("bounce");
    assert_eq!(
        (bounced.code, bounced.esc.as_deref()),
        (550, Some("5.7.30"))
    );
    assert!(
        bounced.text.contains("mx2 does not offer"),
        "{}",
        bounced.text
    );
    // One host failed otherwise (refused connection, timeout): deferred.
    assert_eq!(
        requiretls_outcome(MessageTls::RequireTls, 2, 1, &last),
        None
    );
    // Nothing tried (no address): the usual routing failure.
    assert_eq!(
        requiretls_outcome(MessageTls::RequireTls, 0, 0, &last),
        None
    );
    for msg in [
        MessageTls::Policy,
        MessageTls::Optional,
        MessageTls::RequireTlsNotice,
    ] {
        assert_eq!(requiretls_outcome(msg, 2, 2, &last), None, "{msg:?}");
    }
}

#[test]
fn requests_split_sites() {
    let suffixes: Vec<&str> = REQUESTS.iter().map(|m| m.site_suffix()).collect();
    assert_eq!(suffixes[0], "");
    let mut unique = suffixes.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), REQUESTS.len());
    assert_eq!(Basis::RequireTls.to_string(), "the message's REQUIRETLS");
}

#[test]
fn the_bounce_keeps_the_cause_of_the_last_refusal() {
    let p = TlsPolicy::global(OutboundTls::Verify);
    // (refusal, its deferral, the bounce it becomes)
    let cases = [
        (Failure::NoRequireTls, "4.7.30", "5.7.30"),
        (Failure::NoStartTls, "4.7.10", "5.7.10"),
        (
            Failure::StartTlsRefused("454 no".into()),
            "4.7.10",
            "5.7.10",
        ),
        (
            Failure::NotVerified("unknown issuer".into()),
            "4.7.5",
            "5.7.5",
        ),
        (Failure::MxNotAuthenticated, "4.7.4", "5.7.4"),
    ];
    for (failure, deferral, bounce) in cases {
        let last = failure.reply(&p, "mx1.example.net");
        assert_eq!((last.code, last.esc.as_deref()), (451, Some(deferral)));
        assert!(RESULTS.contains(&failure.label()), "{failure:?}");
        let b = requiretls_outcome(MessageTls::RequireTls, 1, 1, &last).expect("bounce");
        assert_eq!(
            (b.code, b.esc.as_deref()),
            (550, Some(bounce)),
            "{failure:?}"
        );
        assert!(b.text.contains("mx1.example.net"), "{}", b.text);
        assert!(b.text.starts_with("REQUIRETLS: "), "{}", b.text);
    }
}

#[test]
fn a_requiretls_mx_host_must_be_authenticated_by_dnssec_or_mta_sts_enforce() {
    // (mx_secure, listed by an enforced MTA-STS policy) -> allowed
    let cases = [
        (false, false, false),
        (true, false, true),
        (false, true, true),
        (true, true, true),
    ];
    for msg in REQUESTS {
        for (secure, sts, allowed) in cases {
            let got = requiretls_mx(msg, secure, sts);
            if msg.requires_tls() && !allowed {
                assert_eq!(
                    got,
                    Err(Failure::MxNotAuthenticated),
                    "{msg:?} {secure} {sts}"
                );
            } else {
                assert_eq!(got, Ok(()), "{msg:?} {secure} {sts}");
            }
        }
    }
    let f = Failure::MxNotAuthenticated;
    assert_eq!(f.label(), "mx_not_authenticated");
    let r = f.reply(&TlsPolicy::global(OutboundTls::Verify), "mx.example.net");
    assert!(r.text.contains("not DNSSEC-validated"), "{}", r.text);
    assert!(r.text.contains("MTA-STS"), "{}", r.text);
}
