//! DANE for outbound SMTP (RFC 7672) end to end: the relay resolves through a
//! real validating unbound in front of DNSSEC-signed zones (the kit's dnssec
//! bed) and delivers to receivers (tests/py/tls_receiver.py, TLS by Python's
//! ssl/OpenSSL) on their own loopback addresses, each presenting a chain made
//! here (rcgen). TLSA records of each usage, selector and matching type that
//! match and that do not, a forged chain that carries the genuine anchor, a
//! wrong name, a TLSA RRset with a bogus signature, a zone signed with the
//! wrong key, an unsigned zone, a receiver without STARTTLS: mail goes only
//! where the policy allows and never in clear where DANE applies.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PublicKeyData,
};
use serde_json::Value;
use sluice_testkit::dnssec::{DnssecBed, Zone, TOOLS};
use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);
const SEC: &str = "sec.test";
const INS: &str = "ins.test";
const BOGUS: &str = "bog.test";

// ---------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------

type Ca = CertifiedIssuer<'static, KeyPair>;

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

fn root(name: &str) -> Ca {
    CertifiedIssuer::self_signed(ca_params(name), KeyPair::generate().unwrap()).unwrap()
}

fn intermediate(name: &str, parent: &Ca) -> Ca {
    CertifiedIssuer::signed_by(ca_params(name), KeyPair::generate().unwrap(), parent).unwrap()
}

/// A server's certificate chain (leaf first) and key, written as PEM files.
struct Chain {
    ders: Vec<Vec<u8>>,
    key: KeyPair,
    files: (PathBuf, PathBuf),
}

impl Chain {
    fn leaf(&self) -> &[u8] {
        &self.ders[0]
    }
    fn leaf_spki(&self) -> Vec<u8> {
        self.key.subject_public_key_info()
    }
}

/// A leaf for `name` issued by `issuer`, sent with `extra` CA certificates.
fn chain(dir: &Path, stem: &str, name: &str, issuer: &Ca, extra: &[&Ca]) -> Chain {
    let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let leaf = p.signed_by(&key, issuer).unwrap();
    let mut pem = leaf.pem();
    let mut ders = vec![leaf.der().to_vec()];
    for ca in extra {
        pem.push_str(&ca.pem());
        ders.push(ca.der().to_vec());
    }
    write_chain(dir, stem, pem, ders, key)
}

fn self_signed(dir: &Path, stem: &str, name: &str) -> Chain {
    let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    write_chain(dir, stem, cert.pem(), vec![cert.der().to_vec()], key)
}

fn write_chain(dir: &Path, stem: &str, pem: String, ders: Vec<Vec<u8>>, key: KeyPair) -> Chain {
    let cert = dir.join(format!("{stem}.pem"));
    let key_file = dir.join(format!("{stem}.key"));
    std::fs::write(&cert, pem).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    Chain {
        ders,
        key,
        files: (cert, key_file),
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// TLSA presentation data "U S M HEX" for `selected` (a DER certificate or
/// SPKI, as the selector says).
fn tlsa(usage: u8, selector: u8, matching: u8, selected: &[u8]) -> String {
    let data = match matching {
        1 => ring::digest::digest(&ring::digest::SHA256, selected)
            .as_ref()
            .to_vec(),
        2 => ring::digest::digest(&ring::digest::SHA512, selected)
            .as_ref()
            .to_vec(),
        _ => selected.to_vec(),
    };
    format!("{usage} {selector} {matching} {}", hex(&data))
}

/// The DER SubjectPublicKeyInfo of a CA's certificate.
fn ca_spki(ca: &Ca) -> Vec<u8> {
    sluice_policy::dane::subject_public_key_info(ca.der())
        .expect("SPKI of a certificate made here")
        .to_vec()
}

// ---------------------------------------------------------------------------------
// Receivers
// ---------------------------------------------------------------------------------

fn relay(bed: &DnssecBed, port: u16, extra: &[String]) -> Relay {
    let mut b = Relay::builder()
        .cores(1)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set(bed.servers_set())
        .set("dns.timeout=\"2s\"")
        .set(format!("delivery.mx_port={port}"))
        .set("delivery.connect_timeout=\"5s\"")
        // A failed check stays failed: one attempt is what is looked at.
        .set("queue.default.retry=[\"1h\"]");
    for e in extra {
        b = b.set(e.clone());
    }
    b.start()
}

/// What a case expects of its recipient's first attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Delivered over TLS under `policy`, `verified` or not.
    Delivered {
        policy: &'static str,
        verified: bool,
    },
    /// Deferred with this enhanced code; nothing reaches the receiver.
    Deferred {
        enhanced: &'static str,
        policy: &'static str,
    },
}

struct Case {
    label: &'static str,
    zone: &'static str,
    expect: Expect,
    receiver: TlsReceiver,
}

fn submit_to(relay: &Relay, cases: &[Case]) -> (String, Vec<Value>) {
    let rcpts: Vec<String> = cases
        .iter()
        .map(|c| format!("bob@{}.{}", c.label, c.zone))
        .collect();
    let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let body = b"From: alice@snd.example\r\nSubject: dane\r\n\r\nhello\r\n";
    let id = submit(relay, "alice@snd.example", "", &refs, body);
    let mut a = Vec::new();
    wait_until(
        "an attempt for every recipient",
        T,
        || {
            a = attempts(relay, &id);
            rcpts
                .iter()
                .all(|r| a.iter().any(|e| field(e, "recipient") == r))
        },
        || relay.log(),
    );
    (id, a)
}

fn check(case: &Case, a: &[Value], relay: &Relay, bed: &DnssecBed) {
    let rcpt = format!("bob@{}.{}", case.label, case.zone);
    let rec = a
        .iter()
        .find(|e| field(e, "recipient") == rcpt)
        .expect("attempt");
    let what = format!("{}: {rec}\nunbound:\n{}", case.label, bed.log());
    let messages = case.receiver.of("message");
    match case.expect {
        Expect::Delivered { policy, verified } => {
            assert_eq!(field(rec, "status"), "delivered", "{what}");
            assert_eq!(field(rec, "tls_policy"), policy, "{what}");
            assert_eq!(rec["tls_verified"], verified, "{what}");
            assert!(field(rec, "tls").starts_with("TLSv1."), "{what}");
            assert_eq!(messages.len(), 1, "{what}: {messages:?}");
            assert_eq!(messages[0]["tls"], true, "{what}: {messages:?}");
        }
        Expect::Deferred { enhanced, policy } => {
            assert_eq!(field(rec, "status"), "deferred", "{what}");
            assert_eq!(field(rec, "enhanced"), enhanced, "{what}");
            if !policy.is_empty() {
                assert_eq!(field(rec, "tls_policy"), policy, "{what}");
            }
            assert!(
                messages.is_empty(),
                "{what}: nothing may arrive: {messages:?}\n{}",
                relay.log()
            );
        }
    }
}

/// Every usage, selector and matching type that matches delivers, verified,
/// under `tls_policy=dane`; every way of not matching defers with 4.7.5 and
/// sends nothing; TLSA that is absent or insecure leaves the configured
/// (opportunistic) policy in charge.
#[test]
fn dane_decides_where_mail_goes() {
    require_tools!(TOOLS[0], TOOLS[1], TOOLS[2], TOOLS[3]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = root("DANE Test Root");
    let int = intermediate("DANE Test Issuing", &ca);
    let impostor = root("DANE Test Root");

    struct Spec {
        label: &'static str,
        zone: &'static str,
        /// The chain the receiver presents; None: no STARTTLS.
        chain: Option<Chain>,
        /// TLSA records published for its MX host, from its chain.
        tlsa: Vec<String>,
        expect: Expect,
    }
    let host = |label: &str, zone: &str| format!("mx-{label}.{zone}");
    let dane_ok = Expect::Delivered {
        policy: "dane",
        verified: true,
    };
    let dane_fail = Expect::Deferred {
        enhanced: "4.7.5",
        policy: "dane",
    };
    let opportunistic = Expect::Delivered {
        policy: "opportunistic",
        verified: false,
    };
    let mut specs: Vec<Spec> = Vec::new();
    let mut add = |label: &'static str,
                   zone: &'static str,
                   chain: Option<Chain>,
                   tlsa: Vec<String>,
                   expect: Expect| {
        specs.push(Spec {
            label,
            zone,
            chain,
            tlsa,
            expect,
        })
    };

    // DANE-EE: each selector and matching type.
    for (label, selector, matching) in [
        ("ee300", 0u8, 0u8),
        ("ee311", 1, 1),
        ("ee302", 0, 2),
        ("ee310", 1, 0),
    ] {
        let c = chain(d, label, &host(label, SEC), &int, &[&int]);
        let selected = if selector == 1 {
            c.leaf_spki()
        } else {
            c.leaf().to_vec()
        };
        let t = vec![tlsa(3, selector, matching, &selected)];
        add(label, SEC, Some(c), t, dane_ok);
    }
    // DANE-EE ignores the name: a certificate for another name still matches.
    let c = chain(d, "eename", "elsewhere.example", &int, &[&int]);
    let t = vec![tlsa(3, 1, 1, &c.leaf_spki())];
    add("eename", SEC, Some(c), t, dane_ok);
    // DANE-TA on the root (sent) and on the intermediate, both selectors.
    let c = chain(d, "ta201", &host("ta201", SEC), &int, &[&int, &ca]);
    add(
        "ta201",
        SEC,
        Some(c),
        vec![tlsa(2, 0, 1, ca.der())],
        dane_ok,
    );
    let c = chain(d, "ta212", &host("ta212", SEC), &int, &[&int]);
    add(
        "ta212",
        SEC,
        Some(c),
        vec![tlsa(2, 1, 2, &ca_spki(&int))],
        dane_ok,
    );
    // DANE-TA "2 1 0": the root's key in the record, the root not sent.
    let c = chain(d, "ta210", &host("ta210", SEC), &int, &[&int]);
    add(
        "ta210",
        SEC,
        Some(c),
        vec![tlsa(2, 1, 0, &ca_spki(&ca))],
        dane_ok,
    );
    // A key rollover publishes two records: one matching is enough.
    let c = chain(d, "roll", &host("roll", SEC), &int, &[&int]);
    let t = vec![
        tlsa(3, 1, 1, &self_signed(d, "old", "old").leaf_spki()),
        tlsa(3, 1, 1, &c.leaf_spki()),
    ];
    add("roll", SEC, Some(c), t, dane_ok);

    // Not matching: another key; TA with the wrong name; a chain from an
    // impostor CA (same name) that carries the genuine root along.
    let c = chain(d, "eebad", &host("eebad", SEC), &int, &[&int]);
    let t = vec![tlsa(3, 1, 1, &self_signed(d, "other", "other").leaf_spki())];
    add("eebad", SEC, Some(c), t, dane_fail);
    let c = chain(d, "taname", "elsewhere.example", &int, &[&int, &ca]);
    add(
        "taname",
        SEC,
        Some(c),
        vec![tlsa(2, 0, 1, ca.der())],
        dane_fail,
    );
    let c = chain(d, "forged", &host("forged", SEC), &impostor, &[&ca]);
    add(
        "forged",
        SEC,
        Some(c),
        vec![tlsa(2, 0, 1, ca.der())],
        dane_fail,
    );
    // Matching records, but a receiver without STARTTLS: never in clear.
    let c = self_signed(d, "plainkey", &host("plain", SEC));
    let t = vec![tlsa(3, 1, 1, &c.leaf_spki())];
    add(
        "plain",
        SEC,
        None,
        t,
        Expect::Deferred {
            enhanced: "4.7.10",
            policy: "dane",
        },
    );
    // The TLSA RRset's signature is bogus: the host is not used at all.
    let c = chain(d, "bogus", &host("bogus", SEC), &int, &[&int]);
    let t = vec![tlsa(3, 1, 1, &c.leaf_spki())];
    add(
        "bogus",
        SEC,
        Some(c),
        t,
        Expect::Deferred {
            enhanced: "4.7.5",
            policy: "",
        },
    );
    // Only PKIX usages (unusable for SMTP): TLS is still required, not
    // authenticated.
    let c = self_signed(d, "pkix", &host("pkix", SEC));
    let t = vec![tlsa(1, 1, 1, &c.leaf_spki())];
    add(
        "pkix",
        SEC,
        Some(c),
        t,
        Expect::Delivered {
            policy: "dane",
            verified: false,
        },
    );
    // No TLSA in a secure zone, or TLSA in an unsigned one: not DANE.
    let c = self_signed(d, "none", &host("none", SEC));
    add("none", SEC, Some(c), vec![], opportunistic);
    let c = self_signed(d, "ins", &host("ins", INS));
    let t = vec![tlsa(3, 1, 1, &self_signed(d, "x", "x").leaf_spki())];
    add("ins", INS, Some(c), t, opportunistic);
    // Mandatory DANE (a rule's tls = "dane", below): a host DANE
    // authenticates is used; one without TLSA, or in an unsigned zone, is not.
    let c = chain(d, "mandok", &host("mandok", SEC), &int, &[&int]);
    let t = vec![tlsa(3, 1, 1, &c.leaf_spki())];
    add("mandok", SEC, Some(c), t, dane_ok);
    let c = self_signed(d, "mandnone", &host("mandnone", SEC));
    add("mandnone", SEC, Some(c), vec![], dane_fail);
    let c = self_signed(d, "mandins", &host("mandins", INS));
    let t = vec![tlsa(3, 1, 1, &c.leaf_spki())];
    add("mandins", INS, Some(c), t, dane_fail);
    // The whole domain signed with a key that is not the anchor: no route.
    let c = self_signed(d, "bz", &host("bz", BOGUS));
    add(
        "bz",
        BOGUS,
        Some(c),
        vec![],
        Expect::Deferred {
            enhanced: "",
            policy: "",
        },
    );

    let ips = loopbacks(specs.len());
    let port = mx_port(&ips);
    let mut zones: std::collections::BTreeMap<&str, String> = Default::default();
    let mut cases = Vec::new();
    for (spec, ip) in specs.into_iter().zip(&ips) {
        let records = zones.entry(spec.zone).or_default();
        let label = spec.label;
        records.push_str(&format!("{label} MX 10 mx-{label}\nmx-{label} A {ip}\n"));
        for t in &spec.tlsa {
            records.push_str(&format!("_{port}._tcp.mx-{label} TLSA {t}\n"));
        }
        let receiver =
            TlsReceiver::start(d, *ip, port, spec.chain.as_ref().map(|c| &c.files), None);
        cases.push(Case {
            label,
            zone: spec.zone,
            expect: spec.expect,
            receiver,
        });
    }
    let bed = DnssecBed::start(&[
        Zone::secure(SEC, &zones[SEC]).corrupt_signature(&format!("_{port}._tcp.mx-bogus"), "TLSA"),
        Zone::unsigned(INS, &zones[INS]),
        Zone::wrong_key(BOGUS, &zones[BOGUS]),
    ]);
    let relay = relay(
        &bed,
        port,
        &[
            "dns.dnssec_validating=true".to_string(),
            format!(
                "rule=[{{match={{recipient_domain=[\"mandok.{SEC}\",\"mandnone.{SEC}\",\"mandins.{INS}\"]}},tls=\"dane\"}}]"
            ),
        ],
    );
    let (_id, a) = submit_to(&relay, &cases);
    for case in &cases {
        if case.label == "bz" {
            let rec = a
                .iter()
                .find(|e| field(e, "recipient") == format!("bob@bz.{BOGUS}"))
                .expect("attempt");
            assert_eq!(field(rec, "status"), "deferred", "{rec}");
            assert!(case.receiver.of("message").is_empty());
            continue;
        }
        check(case, &a, &relay, &bed);
    }
    // The bogus TLSA host, and the hosts mandatory DANE cannot
    // authenticate, were never dialled: no session reached them.
    for label in ["bogus", "mandnone", "mandins"] {
        let c = cases.iter().find(|c| c.label == label).unwrap();
        assert!(
            c.receiver.of("quit").is_empty() && c.receiver.of("starttls").is_empty(),
            "{label}: {:?}",
            c.receiver.events()
        );
    }
    // Failed DANE checks said QUIT over the TLS session they had made.
    for label in ["eebad", "taname", "forged"] {
        let c = cases.iter().find(|c| c.label == label).unwrap();
        assert!(
            c.receiver.of("quit").iter().any(|q| q["tls"] == true),
            "{label}: {:?}",
            c.receiver.events()
        );
    }
}

/// An MX host name that is an alias (RFC 7672 §2.2.2, §3.2.2), in a
/// secure zone: TLSA records are looked up at the CNAME target first, then at
/// the name as listed; a DANE-TA certificate may carry either name. Records
/// at the target that do not match defer (4.7.5, nothing sent), even when the
/// listed name has records that would match: the target's records win.
#[test]
fn tlsa_at_the_cname_target_of_an_mx_host() {
    require_tools!(TOOLS[0], TOOLS[1], TOOLS[2], TOOLS[3]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = root("DANE CNAME Root");
    let int = intermediate("DANE CNAME Issuing", &ca);
    let ips = loopbacks(4);
    let port = mx_port(&ips);
    let dane_ok = Expect::Delivered {
        policy: "dane",
        verified: true,
    };
    // (label, the name the certificate is for, TLSA at the target, TLSA at
    // the listed name, expected)
    let alias = |l: &str| format!("mx-{l}.{SEC}");
    let target = |l: &str| format!("tgt-{l}.{SEC}");
    let ta = tlsa(2, 0, 1, ca.der());
    let wrong = tlsa(3, 1, 1, &self_signed(d, "wrong", "wrong").leaf_spki());
    let specs = [
        // TA at the target; the certificate names the listed MX host.
        ("cn", alias("cn"), Some(ta.clone()), None, dane_ok),
        // TA at the target; the certificate names the target.
        ("cnt", target("cnt"), Some(ta.clone()), None, dane_ok),
        // Nothing at the target: the listed name's records apply.
        ("cnorig", alias("cnorig"), None, Some(ta.clone()), dane_ok),
        // The target's records do not match: deferred, never in clear,
        // though the listed name's would have matched.
        (
            "cnbad",
            alias("cnbad"),
            Some(wrong.clone()),
            Some(ta.clone()),
            Expect::Deferred {
                enhanced: "4.7.5",
                policy: "dane",
            },
        ),
    ];
    let mut zone = String::new();
    let mut cases = Vec::new();
    for ((label, name, at_target, at_alias, expect), ip) in specs.into_iter().zip(&ips) {
        zone.push_str(&format!(
            "{label} MX 10 mx-{label}\nmx-{label} CNAME tgt-{label}\ntgt-{label} A {ip}\n"
        ));
        if let Some(t) = at_target {
            zone.push_str(&format!("_{port}._tcp.tgt-{label} TLSA {t}\n"));
        }
        if let Some(t) = at_alias {
            zone.push_str(&format!("_{port}._tcp.mx-{label} TLSA {t}\n"));
        }
        let c = chain(d, label, &name, &int, &[&int, &ca]);
        let receiver = TlsReceiver::start(d, *ip, port, Some(&c.files), None);
        cases.push(Case {
            label,
            zone: SEC,
            expect,
            receiver,
        });
    }
    let bed = DnssecBed::start(&[Zone::secure(SEC, &zone)]);
    let relay = relay(&bed, port, &["dns.dnssec_validating=true".to_string()]);
    let (_id, a) = submit_to(&relay, &cases);
    for case in &cases {
        check(case, &a, &relay, &bed);
    }
    // The failed check said QUIT over its TLS session.
    let bad = cases.iter().find(|c| c.label == "cnbad").unwrap();
    assert!(
        bad.receiver.of("quit").iter().any(|q| q["tls"] == true),
        "{:?}",
        bad.receiver.events()
    );

    // `sluice debug tls` shows where the records were found.
    let out = run_with_timeout(
        Command::new(bin())
            .args(["debug", "tls", &format!("cn.{SEC}")])
            .args(["--set", &bed.servers_set()])
            .args(["--set", "dns.timeout=\"2s\""])
            .args(["--set", "dns.dnssec_validating=true"])
            .args(["--set", &format!("delivery.mx_port={port}")]),
        T,
    );
    assert_ok(&out, "sluice debug tls");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "; TLSA base tgt-cn.{SEC}, names tgt-cn.{SEC} mx-cn.{SEC})"
        )),
        "{text}"
    );
}

/// DANE for smart hosts: a relay route with `tls = "dane"` looks its host's
/// TLSA records up at `_PORT._tcp.HOST` (the route's port). Secure and
/// matching → delivered, verified, `tls_policy=dane`; secure and not matching
/// → 4.7.5, nothing sent; a host in an unsigned zone → not dialled (4.7.5:
/// `dane` is mandatory, as on MX routes), and the route's `fallback` takes the
/// message after `fallback_after` deferrals.
#[test]
fn dane_for_smart_hosts() {
    require_tools!(TOOLS[0], TOOLS[1], TOOLS[2], TOOLS[3]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ips = loopbacks(3);
    let port = mx_port(&ips);
    let ok = self_signed(d, "ok", &format!("smart-ok.{SEC}"));
    let bad = self_signed(d, "bad", &format!("smart-bad.{SEC}"));
    let ins = self_signed(d, "ins", &format!("smart-ins.{INS}"));
    let other = self_signed(d, "other", "other");
    let bed = DnssecBed::start(&[
        Zone::secure(
            SEC,
            &format!(
                "smart-ok A {}\n_{port}._tcp.smart-ok TLSA {}\n\
                 smart-bad A {}\n_{port}._tcp.smart-bad TLSA {}\n",
                ips[0],
                tlsa(3, 1, 1, &ok.leaf_spki()),
                ips[1],
                tlsa(3, 1, 1, &other.leaf_spki()),
            ),
        ),
        Zone::unsigned(
            INS,
            &format!(
                "smart-ins A {}\n_{port}._tcp.smart-ins TLSA {}\n",
                ips[2],
                tlsa(3, 1, 1, &ins.leaf_spki())
            ),
        ),
    ]);
    let cases = vec![
        Case {
            label: "ok",
            zone: SEC,
            expect: Expect::Delivered {
                policy: "dane",
                verified: true,
            },
            receiver: TlsReceiver::start(d, ips[0], port, Some(&ok.files), None),
        },
        Case {
            label: "bad",
            zone: SEC,
            expect: Expect::Deferred {
                enhanced: "4.7.5",
                policy: "dane",
            },
            receiver: TlsReceiver::start(d, ips[1], port, Some(&bad.files), None),
        },
    ];
    let ins_rx = TlsReceiver::start(d, ips[2], port, Some(&ins.files), None);
    let route = |name: &str, host: &str, extra: &str| {
        format!("route.{name}={{type=\"relay\",host=\"{host}\",port={port},tls=\"dane\"{extra}}}")
    };
    let sets = [
        "dns.dnssec_validating=true".to_string(),
        route("ok", &format!("smart-ok.{SEC}"), ""),
        route("bad", &format!("smart-bad.{SEC}"), ""),
        route(
            "ins",
            &format!("smart-ins.{INS}"),
            ",fallback=\"plain\",fallback_after=1",
        ),
        format!(
            "route.plain={{type=\"relay\",host=\"smart-ins.{INS}\",port={port},tls=\"opportunistic\"}}"
        ),
        format!(
            "rule=[{{match={{recipient_domain=[\"ok.{SEC}\"]}},route=\"ok\"}},\
             {{match={{recipient_domain=[\"bad.{SEC}\"]}},route=\"bad\"}},\
             {{match={{recipient_domain=[\"ins.{INS}\"]}},route=\"ins\"}}]"
        ),
    ];
    // `sluice debug tls` decides as delivery will, through the same code.
    let debug = |domain: &str| -> String {
        let mut cmd = Command::new(bin());
        cmd.args(["debug", "tls", domain])
            .args(["--set", &bed.servers_set()])
            .args(["--set", "dns.timeout=\"2s\""]);
        for set in &sets {
            cmd.args(["--set", set]);
        }
        let out = run_with_timeout(&mut cmd, T);
        assert_ok(&out, "sluice debug tls");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = debug(&format!("ok.{SEC}"));
    for want in [
        "  dane: the route's host below (dns.dnssec_validating = true)".to_string(),
        format!(
            "  DANE: certificate must match TLSA for smart-ok.{SEC} (dane: 1 usable TLSA record(s): {})",
            tlsa(3, 1, 1, &ok.leaf_spki())
        ),
    ] {
        assert!(text.contains(&want), "missing {want:?} in:\n{text}");
    }
    let text = debug(&format!("ins.{INS}"));
    assert!(
        text.contains(&format!(
            "  skipped: smart-ins.{INS}: TLS policy dane (route.ins.tls): no DANE for smart-ins.{INS}"
        )),
        "{text}"
    );

    let mut relay_sets = sets.to_vec();
    relay_sets.push("queue.default.retry=[\"1s\"]".to_string());
    let relay = relay(&bed, port, &relay_sets);
    let (_id, a) = submit_to(&relay, &cases);
    for case in &cases {
        check(case, &a, &relay, &bed);
    }
    // The failed check said QUIT over its TLS session.
    assert!(
        cases[1]
            .receiver
            .of("quit")
            .iter()
            .any(|q| q["tls"] == true),
        "{:?}",
        cases[1].receiver.events()
    );

    // The host in the unsigned zone: not dialled under `dane`; the fallback
    // route (opportunistic, same host) delivers after one deferral.
    let body = b"From: alice@snd.example\r\nSubject: dane\r\n\r\nhello\r\n";
    let rcpt = format!("bob@ins.{INS}");
    let id = submit(&relay, "alice@snd.example", "", &[&rcpt], body);
    let mut tries = Vec::new();
    wait_until(
        "the fallback route's delivery",
        T,
        || {
            tries = attempts(&relay, &id);
            tries.iter().any(|e| field(e, "status") == "delivered")
        },
        || relay.log(),
    );
    let first = &tries[0];
    assert_eq!(field(first, "status"), "deferred", "{first}");
    assert_eq!(field(first, "enhanced"), "4.7.5", "{first}");
    assert_eq!(field(first, "tls_policy"), "dane", "{first}");
    assert!(
        field(first, "reply").contains(&format!("no DANE for smart-ins.{INS}")),
        "{first}"
    );
    let last = tries.last().unwrap();
    assert_eq!(field(last, "status"), "delivered", "{last}");
    assert_eq!(field(last, "tls_policy"), "opportunistic", "{last}");
    let got = ins_rx.of("message");
    assert_eq!(got.len(), 1, "{got:?}");
    // Only the fallback's session reached the host.
    assert_eq!(ins_rx.of("starttls").len(), 1, "{:?}", ins_rx.events());
}

/// Without `dns.dnssec_validating` the relay believes no AD bit: the same
/// secure, non-matching TLSA record changes nothing and the configured
/// opportunistic policy delivers.
#[test]
fn dane_is_off_unless_the_resolver_is_declared_validating() {
    require_tools!(TOOLS[0], TOOLS[1], TOOLS[2], TOOLS[3]);
    let dir = tempfile::tempdir().unwrap();
    let ips = loopbacks(1);
    let port = mx_port(&ips);
    let c = self_signed(dir.path(), "leaf", &format!("mx-a.{SEC}"));
    let other = self_signed(dir.path(), "other", "other");
    let receiver = TlsReceiver::start(dir.path(), ips[0], port, Some(&c).map(|c| &c.files), None);
    let bed = DnssecBed::start(&[Zone::secure(
        SEC,
        &format!(
            "a MX 10 mx-a\nmx-a A {}\n_{port}._tcp.mx-a TLSA {}\n",
            ips[0],
            tlsa(3, 1, 1, &other.leaf_spki())
        ),
    )]);
    let relay = relay(&bed, port, &[]);
    let cases = [Case {
        label: "a",
        zone: SEC,
        expect: Expect::Delivered {
            policy: "opportunistic",
            verified: false,
        },
        receiver,
    }];
    let (_id, a) = submit_to(&relay, &cases);
    check(&cases[0], &a, &relay, &bed);
}

/// `sluice debug tls DOMAIN` shows, per MX host, what DANE decided and the
/// check a session will make, through the same code delivery uses.
#[test]
fn debug_tls_shows_dane_per_mx_host() {
    require_tools!(TOOLS[0], TOOLS[1], TOOLS[2], TOOLS[3]);
    let dir = tempfile::tempdir().unwrap();
    let c = self_signed(dir.path(), "leaf", &format!("mx1.{SEC}"));
    let bed = DnssecBed::start(&[
        Zone::secure(
            SEC,
            &format!(
                "m MX 10 mx1\nm MX 20 mx2\nm MX 30 mx3\nmx1 A 127.0.0.1\nmx2 A 127.0.0.1\n\
                 mx3 A 127.0.0.1\n_25._tcp.mx1 TLSA {}\n_25._tcp.mx3 TLSA {}\n",
                tlsa(3, 1, 1, &c.leaf_spki()),
                tlsa(3, 1, 1, &c.leaf_spki())
            ),
        )
        .corrupt_signature("_25._tcp.mx3", "TLSA"),
        Zone::unsigned(INS, "m MX 10 mx1\nmx1 A 127.0.0.1\n"),
    ]);
    let run = |args: &[&str]| -> String {
        let out = run_with_timeout(
            Command::new(bin())
                .args(["debug", "tls"])
                .args(args)
                .args(["--set", &bed.servers_set()])
                .args(["--set", "dns.timeout=\"2s\""]),
            T,
        );
        assert_ok(&out, "sluice debug tls");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let m = format!("m.{SEC}");
    let text = run(&[&m, "--set", "dns.dnssec_validating=true"]);
    let digest = tlsa(3, 1, 1, &c.leaf_spki());
    for want in [
        format!("tls {m}: opportunistic (from delivery.tls)\n"),
        "dane: per MX host below (dns.dnssec_validating = true)".to_string(),
        format!(
            "  10 DANE: certificate must match TLSA for mx1.{SEC} (dane: 1 usable TLSA record(s): {digest})"
        ),
        format!("  20 STARTTLS when offered; name mx2.{SEC} (dane: off (no TLSA records))"),
        format!("  30 skipped: mx3.{SEC}: DANE: TLSA lookup _25._tcp.mx3.{SEC} failed"),
    ] {
        assert!(text.contains(&want), "missing {want:?} in:\n{text}");
    }
    // Unsigned zone; and the same secure zone without a validating resolver.
    let ins = run(&[&format!("m.{INS}"), "--set", "dns.dnssec_validating=true"]);
    assert!(
        ins.contains("(dane: off (MX or address records not DNSSEC-secure))"),
        "{ins}"
    );
    let off = run(&[&m]);
    assert!(
        off.contains(&format!(
            "  10 STARTTLS when offered; name mx1.{SEC} (dane: off (dns.dnssec_validating is off))"
        )),
        "{off}"
    );
    // Mandatory DANE: the hosts it cannot authenticate are skipped.
    let mandatory = run(&[
        &m,
        "--set",
        "dns.dnssec_validating=true",
        "--set",
        "delivery.tls=\"dane\"",
    ]);
    assert!(
        mandatory.contains(&format!("  20 skipped: mx2.{SEC}: TLS policy dane (delivery.tls): no DANE for mx2.{SEC}: no TLSA records")),
        "{mandatory}"
    );
}
