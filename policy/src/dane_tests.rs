//! DANE matching on certificates made here (rcgen): a root, an intermediate
//! and leaves signed along that path or by an impostor CA.

// One-element slices of a record or certificate kept for the assertion read
// better as `&[x.clone()]`.
#![allow(clippy::cloned_ref_to_slice_refs)]

use super::*;
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData,
};

type Ca = CertifiedIssuer<'static, KeyPair>;

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn root(name: &str) -> Ca {
    CertifiedIssuer::self_signed(ca_params(name), KeyPair::generate().expect("key")).expect("root")
}

fn intermediate(name: &str, parent: &Ca) -> Ca {
    CertifiedIssuer::signed_by(ca_params(name), KeyPair::generate().expect("key"), parent)
        .expect("intermediate")
}

struct Leaf {
    der: CertificateDer<'static>,
    key: KeyPair,
}

fn leaf_with(names: &[&str], parent: &Ca, edit: impl FnOnce(&mut CertificateParams)) -> Leaf {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<String>>())
            .expect("params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    edit(&mut params);
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, parent).expect("leaf");
    Leaf {
        der: cert.der().clone(),
        key,
    }
}

fn leaf(names: &[&str], parent: &Ca) -> Leaf {
    leaf_with(names, parent, |_| {})
}

fn der(ca: &Ca) -> CertificateDer<'static> {
    ca.der().clone()
}

fn sha256(data: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA256, data).as_ref().to_vec()
}

fn sha512(data: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA512, data).as_ref().to_vec()
}

fn spki(cert: &[u8]) -> Vec<u8> {
    parse_cert(cert).expect("parse").spki.to_vec()
}

/// The record of `usage` with `selector` and `matching` for `cert`.
fn tlsa(usage: u8, selector: u8, matching: u8, cert: &[u8]) -> Tlsa {
    let selected = if selector == SELECTOR_SPKI {
        spki(cert)
    } else {
        cert.to_vec()
    };
    let data = match matching {
        MATCHING_SHA256 => sha256(&selected),
        MATCHING_SHA512 => sha512(&selected),
        _ => selected,
    };
    Tlsa {
        usage,
        selector,
        matching,
        data,
    }
}

fn now() -> UnixTime {
    UnixTime::now()
}

const MX: &str = "mx1.example.net";

#[test]
fn spki_is_found_in_the_certificate() {
    let ca = root("Root");
    let l = leaf(&[MX], &ca);
    assert_eq!(spki(&l.der), l.key.subject_public_key_info());
    // The contents match what webpki takes as an anchor's key.
    let anchor = webpki::anchor_from_trusted_cert(&l.der).expect("anchor");
    let (_, value, rest) = tlv(&spki(&l.der))
        .map(|(t, v, r)| (t, v.to_vec(), r.len()))
        .expect("tlv");
    assert_eq!(rest, 0);
    assert_eq!(anchor.subject_public_key_info.as_ref(), value.as_slice());
    // And the issuer is the root's subject.
    let ca_anchor = webpki::anchor_from_trusted_cert(ca.der()).expect("ca anchor");
    let issuer = parse_cert(&l.der).expect("parse").issuer;
    assert_eq!(tlv(issuer).expect("issuer").1, ca_anchor.subject.as_ref());
}

#[test]
fn der_reader_refuses_garbage() {
    assert!(parse_cert(&[]).is_none());
    assert!(parse_cert(&[0x30, 0x03, 0x02, 0x01]).is_none());
    assert!(parse_cert(&[0x04, 0x00]).is_none());
    // Long form for a short length is not DER.
    assert!(tlv(&[0x30, 0x81, 0x05, 1, 2, 3, 4, 5]).is_none());
    assert!(tlv(&[0x30, 0x82, 0x00, 0x90]).is_none());
    // Length past the end.
    assert!(tlv(&[0x30, 0x05, 1]).is_none());
    let ca = root("Root");
    let mut bad = ca.der().to_vec();
    bad.truncate(bad.len() / 2);
    assert!(parse_cert(&bad).is_none());
    let record = tlsa(USAGE_DANE_EE, SELECTOR_SPKI, MATCHING_SHA256, ca.der());
    assert!(!record.matches(&bad));
}

#[test]
fn usable_records() {
    let ok = |usage, selector, matching, len| {
        Tlsa {
            usage,
            selector,
            matching,
            data: vec![7; len],
        }
        .is_usable()
    };
    assert!(ok(3, 1, 1, 32));
    assert!(ok(3, 0, 2, 64));
    assert!(ok(2, 0, 0, 300));
    assert!(ok(2, 1, 0, 91));
    // PKIX usages are unusable for SMTP (RFC 7672 §3.1.3).
    assert!(!ok(USAGE_PKIX_TA, 1, 1, 32));
    assert!(!ok(USAGE_PKIX_EE, 1, 1, 32));
    assert!(!ok(4, 1, 1, 32));
    assert!(!ok(3, 2, 1, 32));
    assert!(!ok(3, 1, 3, 32));
    // Digest of the wrong length, empty full data.
    assert!(!ok(3, 1, 1, 31));
    assert!(!ok(3, 1, 2, 32));
    assert!(!ok(3, 1, 0, 0));
}

#[test]
fn dane_ee_every_selector_and_matching_type() {
    let ca = root("Root");
    let l = leaf(&[MX], &ca);
    let chain = [l.der.clone(), der(&ca)];
    for selector in [SELECTOR_CERT, SELECTOR_SPKI] {
        for matching in [MATCHING_FULL, MATCHING_SHA256, MATCHING_SHA512] {
            let record = tlsa(USAGE_DANE_EE, selector, matching, &l.der);
            assert_eq!(
                verify(&chain, &[record.clone()], &[MX], now()),
                Ok(DaneMatch::EndEntity { record }),
                "3 {selector} {matching}"
            );
        }
    }
}

#[test]
fn dane_ee_ignores_names_and_dates_but_not_the_key() {
    let ca = root("Root");
    let expired = leaf_with(&["somewhere.else.example"], &ca, |p| {
        p.not_before = date_time_ymd(2000, 1, 1);
        p.not_after = date_time_ymd(2001, 1, 1);
    });
    let record = tlsa(USAGE_DANE_EE, SELECTOR_SPKI, MATCHING_SHA256, &expired.der);
    assert!(verify(&[expired.der.clone()], &[record.clone()], &[MX], now()).is_ok());

    // Another certificate for the same name: no match.
    let other = leaf(&[MX], &ca);
    assert_eq!(
        verify(
            &[other.der.clone(), der(&ca)],
            &[record.clone()],
            &[MX],
            now()
        ),
        Err(DaneError::NoMatch)
    );
    // Same key, new certificate: 3 1 x still matches, 3 0 x does not.
    let mut params = CertificateParams::new(vec![MX.to_string()]).expect("params");
    params.serial_number = Some(rcgen::SerialNumber::from(99u64));
    let reissued = params.signed_by(&expired.key, &ca).expect("reissue");
    assert!(verify(&[reissued.der().clone()], &[record], &[MX], now()).is_ok());
    let by_cert = tlsa(USAGE_DANE_EE, SELECTOR_CERT, MATCHING_SHA256, &expired.der);
    assert_eq!(
        verify(&[reissued.der().clone()], &[by_cert], &[MX], now()),
        Err(DaneError::NoMatch)
    );
}

#[test]
fn dane_ee_matches_only_the_leaf() {
    let ca = root("Root");
    let l = leaf(&[MX], &ca);
    // An EE record for the CA certificate the server also sends: not the leaf.
    let record = tlsa(USAGE_DANE_EE, SELECTOR_CERT, MATCHING_SHA256, ca.der());
    assert_eq!(
        verify(&[l.der.clone(), der(&ca)], &[record], &[MX], now()),
        Err(DaneError::NoMatch)
    );
}

#[test]
fn dane_ta_at_each_depth_selector_and_matching_type() {
    let ca = root("Root");
    let int = intermediate("Issuing CA", &ca);
    let l = leaf(&[MX], &int);
    let chain = [l.der.clone(), der(&int), der(&ca)];
    for (depth, anchor) in [(1usize, int.der()), (2, ca.der())] {
        for selector in [SELECTOR_CERT, SELECTOR_SPKI] {
            for matching in [MATCHING_FULL, MATCHING_SHA256, MATCHING_SHA512] {
                let record = tlsa(USAGE_DANE_TA, selector, matching, anchor);
                assert_eq!(
                    verify(&chain, &[record.clone()], &["mx1.example.net."], now()),
                    Ok(DaneMatch::TrustAnchor {
                        record,
                        depth,
                        name: MX.into()
                    }),
                    "2 {selector} {matching} at depth {depth}"
                );
            }
        }
    }
}

/// The attack a hash-only check lets through: the server sends the genuine
/// anchor certificate, but its leaf was issued by someone else.
#[test]
fn dane_ta_requires_the_chain_to_reach_the_anchor() {
    let ca = root("Root");
    let impostor = root("Root"); // same name, other key
    let forged = leaf(&[MX], &impostor);
    let record = tlsa(USAGE_DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, ca.der());
    match verify(
        &[forged.der.clone(), der(&ca)],
        &[record.clone()],
        &[MX],
        now(),
    ) {
        Err(DaneError::Chain { depth: 1, .. }) => {}
        other => panic!("forged chain accepted or misreported: {other:?}"),
    }
    // With the impostor's intermediate in between, still no path.
    let fake_int = intermediate("Issuing CA", &impostor);
    let forged = leaf(&[MX], &fake_int);
    assert!(matches!(
        verify(
            &[forged.der.clone(), der(&fake_int), der(&ca)],
            &[record],
            &[MX],
            now()
        ),
        Err(DaneError::Chain { depth: 2, .. })
    ));
}

#[test]
fn dane_ta_checks_the_name() {
    let ca = root("Root");
    let l = leaf(&["other.example.org"], &ca);
    let record = tlsa(USAGE_DANE_TA, SELECTOR_CERT, MATCHING_SHA256, ca.der());
    let chain = [l.der.clone(), der(&ca)];
    assert!(matches!(
        verify(&chain, &[record.clone()], &[MX, "example.net"], now()),
        Err(DaneError::Name { .. })
    ));
    // Either reference identifier will do: the TLSA base domain or the MX name.
    let found = verify(&chain, &[record], &[MX, "other.example.org"], now()).expect("second name");
    assert!(matches!(found, DaneMatch::TrustAnchor { name, .. } if name == "other.example.org"));
}

#[test]
fn dane_ta_accepts_a_wildcard_for_one_label() {
    let ca = root("Root");
    let l = leaf(&["*.example.net"], &ca);
    let record = tlsa(USAGE_DANE_TA, SELECTOR_SPKI, MATCHING_SHA512, ca.der());
    let chain = [l.der.clone(), der(&ca)];
    assert!(verify(&chain, &[record.clone()], &[MX], now()).is_ok());
    assert!(matches!(
        verify(&chain, &[record], &["a.mx1.example.net"], now()),
        Err(DaneError::Name { .. })
    ));
}

#[test]
fn dane_ta_checks_dates_below_the_anchor() {
    let ca = root("Root");
    let expired = leaf_with(&[MX], &ca, |p| {
        p.not_before = date_time_ymd(2000, 1, 1);
        p.not_after = date_time_ymd(2001, 1, 1);
    });
    let record = tlsa(USAGE_DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, ca.der());
    let err = verify(&[expired.der.clone(), der(&ca)], &[record], &[MX], now())
        .expect_err("expired leaf");
    assert!(matches!(err, DaneError::Chain { .. }), "{err}");
    assert!(err.to_string().contains("Expired"), "{err}");
}

#[test]
fn dane_ta_requires_server_auth_when_ekus_are_listed() {
    let ca = root("Root");
    let client_only = leaf_with(&[MX], &ca, |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    });
    let record = tlsa(USAGE_DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, ca.der());
    assert!(matches!(
        verify(
            &[client_only.der.clone(), der(&ca)],
            &[record],
            &[MX],
            now()
        ),
        Err(DaneError::Chain { .. })
    ));
}

#[test]
fn dane_ta_bare_key_anchors_a_chain_without_its_certificate() {
    let ca = root("Root");
    let int = intermediate("Issuing CA", &ca);
    let l = leaf(&[MX], &int);
    let record = Tlsa {
        usage: USAGE_DANE_TA,
        selector: SELECTOR_SPKI,
        matching: MATCHING_FULL,
        data: spki(ca.der()),
    };
    // The root is not sent; its key in the record anchors the intermediate.
    let chain = [l.der.clone(), der(&int)];
    assert_eq!(
        verify(&chain, &[record.clone()], &[MX], now()),
        Ok(DaneMatch::TrustAnchor {
            record: record.clone(),
            depth: 2,
            name: MX.into()
        })
    );
    // A key that signed nothing here.
    let stranger = Tlsa {
        data: spki(root("Root").der()),
        ..record
    };
    assert_eq!(
        verify(&chain, &[stranger], &[MX], now()),
        Err(DaneError::NoMatch)
    );
}

#[test]
fn dane_ta_matching_the_leaf_makes_it_its_own_anchor() {
    let own = root(MX);
    // A self-signed server certificate with a name, published as TA.
    let mut params = CertificateParams::new(vec![MX.to_string()]).expect("params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, MX);
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed");
    let record = tlsa(USAGE_DANE_TA, SELECTOR_CERT, MATCHING_SHA256, cert.der());
    let found = verify(&[cert.der().clone()], &[record.clone()], &[MX], now()).expect("own anchor");
    assert!(matches!(found, DaneMatch::TrustAnchor { depth: 0, .. }));
    assert!(matches!(
        verify(
            &[cert.der().clone()],
            &[record],
            &["elsewhere.example"],
            now()
        ),
        Err(DaneError::Name { .. })
    ));
    drop(own);
}

#[test]
fn unusable_records_are_ignored_and_a_set_of_only_those_is_reported() {
    let ca = root("Root");
    let l = leaf(&[MX], &ca);
    let chain = [l.der.clone(), der(&ca)];
    let pkix_ee = tlsa(USAGE_PKIX_EE, SELECTOR_CERT, MATCHING_SHA256, &l.der);
    let pkix_ta = tlsa(USAGE_PKIX_TA, SELECTOR_CERT, MATCHING_SHA256, ca.der());
    assert_eq!(
        verify(&chain, &[pkix_ee.clone(), pkix_ta.clone()], &[MX], now()),
        Err(DaneError::NoUsableRecords)
    );
    // A PKIX record that would match does not rescue a usable one that does not.
    let wrong = tlsa(USAGE_DANE_EE, SELECTOR_CERT, MATCHING_SHA256, ca.der());
    assert_eq!(
        verify(&chain, &[pkix_ee, wrong.clone()], &[MX], now()),
        Err(DaneError::NoMatch)
    );
    // Any one usable match is enough (a key rollover publishes two).
    let right = tlsa(USAGE_DANE_EE, SELECTOR_SPKI, MATCHING_SHA256, &l.der);
    assert!(verify(&chain, &[pkix_ta, wrong, right], &[MX], now()).is_ok());
    assert_eq!(
        verify(&[], &[tlsa(3, 1, 1, &l.der)], &[MX], now()),
        Err(DaneError::NoCertificate)
    );
}
