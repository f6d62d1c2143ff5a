//! When DANE applies, and the verifier in real rustls handshakes (in memory,
//! both ends rustls) against certificates made here.

use super::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConnection, ServerConnection};
use sluice_policy::dane::{
    MATCHING_SHA256, SELECTOR_CERT, SELECTOR_SPKI, USAGE_DANE_EE, USAGE_DANE_TA, USAGE_PKIX_EE,
};

const MX: &str = "mx1.example.net";

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

fn record(usage: u8, selector: u8, data: &[u8]) -> Tlsa {
    Tlsa {
        usage,
        selector,
        matching: MATCHING_SHA256,
        data: sha256(data),
    }
}

#[test]
fn tlsa_owner_names() {
    assert_eq!(
        tlsa_name(25, "mx1.example.net."),
        "_25._tcp.mx1.example.net"
    );
    assert_eq!(
        tlsa_name(2525, "mx1.example.net"),
        "_2525._tcp.mx1.example.net"
    );
}

#[test]
fn dane_needs_a_validating_resolver_and_a_secure_host() {
    assert!(applies(true, true).is_ok());
    assert_eq!(applies(false, true), Err("dns.dnssec_validating is off"));
    assert!(applies(true, false).is_err());
}

#[test]
fn classification_of_tlsa_answers() {
    let ee = Tlsa {
        usage: USAGE_DANE_EE,
        selector: SELECTOR_SPKI,
        matching: MATCHING_SHA256,
        data: vec![1; 32],
    };
    let ta = Tlsa {
        usage: USAGE_DANE_TA,
        ..ee.clone()
    };
    let pkix = Tlsa {
        usage: USAGE_PKIX_EE,
        ..ee.clone()
    };
    let owner = "_25._tcp.mx.example";
    let names = ["mx.example".to_string()];
    let classify = |answer| super::classify(answer, owner, &names);
    assert!(matches!(
        classify(TlsaAnswer::Failed("SERVFAIL".into())),
        Dane::LookupFailed { owner: o, why } if why == "SERVFAIL" && o == owner
    ));
    assert!(matches!(
        classify(TlsaAnswer::Answer {
            secure: false,
            records: vec![ee.clone()]
        }),
        Dane::Off(_)
    ));
    assert!(matches!(
        classify(TlsaAnswer::Answer {
            secure: true,
            records: vec![]
        }),
        Dane::Off(_)
    ));
    assert_eq!(
        classify(TlsaAnswer::Answer {
            secure: true,
            records: vec![pkix.clone()]
        }),
        Dane::Unusable
    );
    // Unusable records dropped, duplicates too, EE before TA.
    assert_eq!(
        classify(TlsaAnswer::Answer {
            secure: true,
            records: vec![ta.clone(), pkix, ee.clone(), ee.clone()]
        }),
        Dane::Records {
            records: vec![ee, ta].into(),
            names: names.to_vec().into()
        }
    );
}

#[test]
fn an_alias_is_looked_up_at_its_target_first_and_both_names_count() {
    // Not an alias (or a chain that ends where it began): the host name.
    let one = |n: &str| vec![n.to_string()];
    assert_eq!(
        tlsa_bases("MX.example.", None),
        (one("mx.example"), one("mx.example"))
    );
    assert_eq!(
        tlsa_bases("mx.example", Some("mx.example.")),
        (one("mx.example"), one("mx.example"))
    );
    // An alias: the expanded name first, then the name as listed; both are
    // reference identifiers.
    let both = vec![
        "host.provider.example".to_string(),
        "mx.example".to_string(),
    ];
    assert_eq!(
        tlsa_bases("mx.example", Some("Host.Provider.Example.")),
        (both.clone(), both)
    );
}

struct Server {
    chain: Vec<CertificateDer<'static>>,
    key: KeyPair,
}

fn new_ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "Test CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca")
}

fn server(name: &str, ca: &CertifiedIssuer<'static, KeyPair>) -> Server {
    let params = CertificateParams::new(vec![name.to_string()]).expect("params");
    let key = KeyPair::generate().expect("key");
    let leaf = params.signed_by(&key, ca).expect("leaf");
    Server {
        chain: vec![leaf.der().clone(), ca.der().clone()],
        key,
    }
}

/// A full TLS handshake in memory; the client's error if it refuses.
fn handshake(server: &Server, records: Vec<Tlsa>) -> Result<(), rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server.key.serialize_der()));
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(server.chain.clone(), key)?;
    let verifier = DaneVerifier::new(records.into(), vec![MX.to_string()], provider.clone());
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let name = ServerName::try_from(MX).expect("name");
    let mut client = ClientConnection::new(Arc::new(client_cfg), name)?;
    let mut srv = ServerConnection::new(Arc::new(server_cfg))?;
    for _ in 0..10 {
        let mut wire = Vec::new();
        client.write_tls(&mut wire).expect("client write");
        srv.read_tls(&mut wire.as_slice()).expect("server read");
        srv.process_new_packets()?;
        let mut wire = Vec::new();
        srv.write_tls(&mut wire).expect("server write");
        client.read_tls(&mut wire.as_slice()).expect("client read");
        client.process_new_packets()?;
        if !client.is_handshaking() && !srv.is_handshaking() {
            return Ok(());
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn verifier_accepts_matching_records_in_a_real_handshake() {
    let ca = new_ca();
    let s = server(MX, &ca);
    let spki = rcgen::PublicKeyData::subject_public_key_info(&s.key);
    handshake(&s, vec![record(USAGE_DANE_EE, SELECTOR_SPKI, &spki)]).expect("3 1 1");
    handshake(&s, vec![record(USAGE_DANE_EE, SELECTOR_CERT, &s.chain[0])]).expect("3 0 1");
    handshake(&s, vec![record(USAGE_DANE_TA, SELECTOR_CERT, ca.der())]).expect("2 0 1");
}

#[test]
fn verifier_refuses_in_the_handshake() {
    let ca = new_ca();
    let s = server(MX, &ca);
    let other = server(MX, &ca);
    let err = handshake(
        &s,
        vec![record(USAGE_DANE_EE, SELECTOR_CERT, &other.chain[0])],
    )
    .expect_err("wrong EE");
    assert!(err.to_string().contains("DANE"), "{err}");
    // TA: right anchor, wrong name.
    let elsewhere = server("mx9.example.org", &ca);
    let err = handshake(
        &elsewhere,
        vec![record(USAGE_DANE_TA, SELECTOR_CERT, ca.der())],
    )
    .expect_err("TA with the wrong name");
    assert!(err.to_string().contains("not valid for"), "{err}");
    // TA: a chain from another CA that sends the right CA along.
    let impostor = new_ca();
    let mut forged = server(MX, &impostor);
    forged.chain[1] = ca.der().clone();
    let err = handshake(
        &forged,
        vec![record(USAGE_DANE_TA, SELECTOR_CERT, ca.der())],
    )
    .expect_err("forged chain");
    assert!(err.to_string().contains("does not verify"), "{err}");
}
