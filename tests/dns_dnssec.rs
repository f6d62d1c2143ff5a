//! The resolver behind a real validating resolver (unbound with trust anchors
//! for zones that NSD serves signed; the kit's `dnssec` bed): the AD bit our
//! queries ask for comes back on validated answers (records, NODATA and
//! NXDOMAIN alike), not on an unsigned zone's answers, never from the
//! authoritative server itself; a zone signed with a key that is not the anchor
//! and an RRset whose signature was altered are SERVFAIL; a mail route is
//! secure only when its MX and address answers all were.

use sluice_dns::{NegativeKind, QueryType, Record, ResolveError, Resolver, ResponseCode};
use sluice_testkit::dns::rt::{block_on, config, validating};
use sluice_testkit::dnssec::{DnssecBed, Zone, TOOLS};
use sluice_testkit::require_tools;

const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn bed() -> DnssecBed {
    DnssecBed::start(&[
        Zone::secure(
            "sec.test",
            &format!(
                "@ MX 10 mx1\nmx1 A 127.0.0.2\nmx2 A 127.0.0.3\nmx3 A 127.0.0.4\n\
                 _25._tcp.mx1 TLSA 3 1 1 {HASH}\n_25._tcp.mx3 TLSA 2 0 1 {HASH}\n"
            ),
        )
        .corrupt_signature("_25._tcp.mx3", "TLSA"),
        Zone::wrong_key(
            "bogus.test",
            &format!("@ MX 10 mx1\nmx1 A 127.0.0.5\n_25._tcp.mx1 TLSA 3 1 1 {HASH}\n"),
        ),
        Zone::unsigned(
            "ins.test",
            &format!("@ MX 10 mx1\nmx1 A 127.0.0.6\n_25._tcp.mx1 TLSA 3 1 1 {HASH}\n"),
        ),
    ])
}

fn servfail(result: Result<sluice_dns::Lookup, ResolveError>, what: &str, bed: &DnssecBed) {
    match result {
        Err(ResolveError::ServerFailure(ResponseCode::ServFail)) => {}
        other => panic!(
            "{what}: expected SERVFAIL, got {other:?}\nunbound log:\n{}",
            bed.log()
        ),
    }
}

#[test]
fn validated_answers_carry_ad_and_bogus_ones_fail() {
    require_tools!(TOOLS[0], TOOLS[1], TOOLS[2], TOOLS[3]);
    let bed = bed();
    block_on(async {
        let r = Resolver::new(validating(&[bed.resolver]));

        let tlsa = r
            .lookup("_25._tcp.mx1.sec.test", QueryType::Tlsa)
            .await
            .expect("secure TLSA");
        assert!(tlsa.secure(), "validated TLSA without AD: {tlsa:?}");
        match tlsa.records() {
            [Record::Tlsa {
                usage: 3,
                selector: 1,
                matching: 1,
                data,
                ..
            }] => assert_eq!(data.len(), 32),
            other => panic!("TLSA records: {other:?}"),
        }
        // A cache hit keeps the bit.
        let again = r
            .lookup("_25._tcp.mx1.sec.test", QueryType::Tlsa)
            .await
            .expect("cached");
        assert!(again.from_cache && again.secure());

        let a = r.lookup("mx1.sec.test", QueryType::A).await.expect("A");
        assert!(a.secure());

        // Authenticated denial: NODATA and NXDOMAIN are secure too (NSEC).
        let nodata = r
            .lookup("_25._tcp.mx2.sec.test", QueryType::Tlsa)
            .await
            .expect("nodata");
        assert!(matches!(
            nodata.negative(),
            Some(NegativeKind::NxDomain { .. }) | Some(NegativeKind::NoData { .. })
        ));
        assert!(nodata.secure(), "authenticated denial without AD");
        let nodata = r
            .lookup("mx2.sec.test", QueryType::Tlsa)
            .await
            .expect("nodata");
        assert!(matches!(
            nodata.negative(),
            Some(NegativeKind::NoData { .. })
        ));
        assert!(nodata.secure());

        // One RRset's signature altered: that RRset is bogus, the rest is not.
        servfail(
            r.lookup("_25._tcp.mx3.sec.test", QueryType::Tlsa).await,
            "TLSA with an altered RRSIG",
            &bed,
        );
        assert!(r
            .lookup("mx3.sec.test", QueryType::A)
            .await
            .expect("A next to the bogus TLSA")
            .secure());

        // Signed with a key that is not the anchor: everything is bogus.
        servfail(
            r.lookup("_25._tcp.mx1.bogus.test", QueryType::Tlsa).await,
            "TLSA of a zone signed with the wrong key",
            &bed,
        );
        servfail(
            r.lookup("mx1.bogus.test", QueryType::A).await,
            "A of a zone signed with the wrong key",
            &bed,
        );

        // Unsigned: answered, never AD.
        let insecure = r
            .lookup("_25._tcp.mx1.ins.test", QueryType::Tlsa)
            .await
            .expect("insecure TLSA");
        assert_eq!(insecure.records().len(), 1);
        assert!(!insecure.secure(), "AD on an unsigned zone");
    });
    let log = bed.log();
    assert!(
        log.contains("validation failure"),
        "unbound logged no validation failure:\n{log}"
    );
}

/// The AD bit is the validator's word: the authoritative server, asked the
/// same questions, does not set it (so a non-validating path never looks
/// secure to us).
#[test]
fn authoritative_answers_are_not_authenticated() {
    require_tools!(TOOLS[0], TOOLS[1], TOOLS[2], TOOLS[3]);
    let bed = bed();
    block_on(async {
        let r = Resolver::new(validating(&[bed.authoritative()]));
        let tlsa = r
            .lookup("_25._tcp.mx1.sec.test", QueryType::Tlsa)
            .await
            .expect("TLSA from NSD");
        assert_eq!(tlsa.records().len(), 1);
        assert!(!tlsa.secure());
        // NSD serves the altered signature as it is: only a validator notices.
        let bad = r
            .lookup("_25._tcp.mx3.sec.test", QueryType::Tlsa)
            .await
            .expect("TLSA with altered RRSIG from NSD");
        assert_eq!(bad.records().len(), 1);
        assert!(!bad.secure());
    });
}

#[test]
fn routes_are_secure_only_when_every_answer_was() {
    require_tools!(TOOLS[0], TOOLS[1], TOOLS[2], TOOLS[3]);
    let bed = bed();
    block_on(async {
        let r = Resolver::new(validating(&[bed.resolver]));
        let route = r.resolve_route("sec.test").await;
        assert_eq!(route.error, None, "{route:?}");
        assert_eq!(route.hosts.len(), 1);
        assert_eq!(route.hosts[0].name, "mx1.sec.test");
        assert!(route.hosts[0].secure, "{route:?}");

        let route = r.resolve_route("ins.test").await;
        assert_eq!(route.error, None, "{route:?}");
        assert!(!route.hosts[0].secure, "{route:?}");

        let route = r.resolve_route("bogus.test").await;
        let error = route.error.expect("bogus MX must not route");
        assert!(
            !error.is_permanent(),
            "a bogus answer is temporary: {error}"
        );
    });
}

/// `dns.dnssec_validating` off (the default): the same validated answers are
/// seen with their AD bit, but nothing counts as secure.
#[test]
fn ad_bit_is_ignored_unless_the_resolver_is_declared_validating() {
    require_tools!(TOOLS[0], TOOLS[1], TOOLS[2], TOOLS[3]);
    let bed = bed();
    block_on(async {
        let r = Resolver::new(config(&[bed.resolver]));
        let tlsa = r
            .lookup("_25._tcp.mx1.sec.test", QueryType::Tlsa)
            .await
            .expect("TLSA");
        assert!(tlsa.authentic_data(), "unbound validated it");
        assert!(!tlsa.secure(), "AD believed without dns.dnssec_validating");
        let route = r.resolve_route("sec.test").await;
        assert!(!route.hosts[0].secure, "{route:?}");
    });
}
