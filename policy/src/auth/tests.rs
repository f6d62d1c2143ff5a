use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;

use mail_auth::common::crypto::{Ed25519Key, SigningKey};
use mail_auth::dkim::DkimSigner;

use super::*;

/// A zone as a table; every query is logged, so tests can see the rounds.
#[derive(Default)]
struct Zone {
    answers: HashMap<Query, Answer>,
    asked: RefCell<Vec<Vec<Query>>>,
}

impl Zone {
    fn txt(mut self, name: &str, text: &str) -> Self {
        self.answers.insert(
            Query::Txt(name.into()),
            Answer::Txt(vec![text.as_bytes().to_vec()]),
        );
        self
    }
    fn a(mut self, name: &str, ip: &str) -> Self {
        self.answers
            .insert(Query::A(name.into()), Answer::A(vec![ip.parse().unwrap()]));
        self
    }
    fn set(mut self, q: Query, a: Answer) -> Self {
        self.answers.insert(q, a);
        self
    }
    fn rounds(&self) -> usize {
        self.asked.borrow().len()
    }
}

impl DnsSource for Zone {
    async fn resolve(&self, queries: Vec<Query>) -> Vec<(Query, Answer)> {
        self.asked.borrow_mut().push(queries.clone());
        queries
            .into_iter()
            .map(|q| {
                let a = self.answers.get(&q).cloned().unwrap_or(Answer::NotFound);
                (q, a)
            })
            .collect()
    }
}

fn run<F: std::future::Future>(f: F) -> F::Output {
    now(f).expect("the zone answers at once")
}

fn env<'a>(ip: &str, helo: &'a str, from: &'a str) -> Envelope<'a> {
    Envelope {
        client_ip: ip.parse::<IpAddr>().unwrap(),
        helo,
        mail_from: from,
        hostname: "mx.sluice.test",
    }
}

fn spf(zone: &Zone, ip: &str, from: &str) -> Verdict {
    let v = Verifier::new().unwrap();
    run(v.check_spf(zone, &env(ip, "client.test", from)))
}

#[test]
fn name_keys_rebuild_from_their_hash() {
    use bridge::MissKey;
    let k: Box<str> = "_dmarc.example.org.".into();
    assert_eq!(
        Box::<str>::from_hash("_dmarc.example.org.").as_deref(),
        Some(&*k)
    );
    assert_eq!(Box::<str>::from_hash(&k).as_deref(), Some(&*k));
}

#[test]
fn spf_include_resolves_in_rounds() {
    let zone = Zone::default()
        .txt("example.org", "v=spf1 include:_spf.example.net -all")
        .txt("_spf.example.net", "v=spf1 ip4:192.0.2.0/24 -all");
    assert_eq!(spf(&zone, "192.0.2.7", "a@example.org"), Verdict::Pass);
    // One round for the record, one for the include; then nothing new.
    assert_eq!(zone.rounds(), 2);
    assert_eq!(spf(&zone, "198.51.100.1", "a@example.org"), Verdict::Fail);
}

#[test]
fn spf_a_mx_and_redirect() {
    let zone = Zone::default()
        .txt(
            "example.org",
            "v=spf1 mx a:out.example.org redirect=other.test",
        )
        .set(
            Query::Mx("example.org".into()),
            Answer::Mx(vec![(10, "mx1.example.org".into())]),
        )
        .a("mx1.example.org", "192.0.2.10")
        .a("out.example.org", "192.0.2.20")
        .txt("other.test", "v=spf1 ip4:203.0.113.5 ~all");
    assert_eq!(spf(&zone, "192.0.2.10", "a@example.org"), Verdict::Pass);
    assert_eq!(spf(&zone, "192.0.2.20", "a@example.org"), Verdict::Pass);
    assert_eq!(spf(&zone, "203.0.113.5", "a@example.org"), Verdict::Pass);
    assert_eq!(
        spf(&zone, "203.0.113.6", "a@example.org"),
        Verdict::SoftFail
    );
}

#[test]
fn spf_no_record_is_none_and_bad_record_permerror() {
    let zone = Zone::default().txt("bad.test", "v=spf1 include -all");
    assert_eq!(spf(&zone, "192.0.2.1", "a@none.test"), Verdict::None);
    assert_eq!(spf(&zone, "192.0.2.1", "a@bad.test"), Verdict::PermError);
}

#[test]
fn spf_temporary_failures_are_temperror_never_pass_or_fail() {
    // On the record itself.
    let zone = Zone::default().set(
        Query::Txt("example.org".into()),
        Answer::TempFail("SERVFAIL".into()),
    );
    assert_eq!(spf(&zone, "192.0.2.1", "a@example.org"), Verdict::TempError);
    // On an `a` lookup that would otherwise read as "no address": fail.
    let zone = Zone::default()
        .txt("example.org", "v=spf1 a:broken.example.org -all")
        .set(
            Query::A("broken.example.org".into()),
            Answer::TempFail("timeout".into()),
        );
    assert_eq!(spf(&zone, "192.0.2.1", "a@example.org"), Verdict::TempError);
    // On an include.
    let zone = Zone::default()
        .txt("example.org", "v=spf1 include:x.test -all")
        .set(
            Query::Txt("x.test".into()),
            Answer::TempFail("timeout".into()),
        );
    assert_eq!(spf(&zone, "192.0.2.1", "a@example.org"), Verdict::TempError);
    // A source that never answers is a temporary failure too.
    struct Silent;
    impl DnsSource for Silent {
        async fn resolve(&self, _: Vec<Query>) -> Vec<(Query, Answer)> {
            Vec::new()
        }
    }
    let v = Verifier::new().unwrap();
    assert_eq!(
        run(v.check_spf(&Silent, &env("192.0.2.1", "h.test", "a@example.org"))),
        Verdict::TempError
    );
}

#[test]
fn spf_void_lookup_limit_is_two() {
    let zone = Zone::default()
        .txt("two.test", "v=spf1 a:v1.test a:v2.test ip4:192.0.2.1 -all")
        .txt(
            "three.test",
            "v=spf1 a:v1.test a:v2.test a:v3.test ip4:192.0.2.1 -all",
        );
    assert_eq!(spf(&zone, "192.0.2.1", "a@two.test"), Verdict::Pass);
    assert_eq!(spf(&zone, "192.0.2.1", "a@three.test"), Verdict::PermError);
}

#[test]
fn spf_ten_lookup_limit() {
    let mut zone = Zone::default();
    let ten: Vec<String> = (1..=10).map(|i| format!("a:h{i}.test")).collect();
    let eleven: Vec<String> = (1..=11).map(|i| format!("a:h{i}.test")).collect();
    for i in 1..=11 {
        zone = zone.a(&format!("h{i}.test"), "198.51.100.1");
    }
    zone = zone
        .txt(
            "ten.test",
            &format!("v=spf1 {} ip4:192.0.2.1 -all", ten.join(" ")),
        )
        .txt(
            "eleven.test",
            &format!("v=spf1 {} ip4:192.0.2.1 -all", eleven.join(" ")),
        );
    assert_eq!(spf(&zone, "192.0.2.1", "a@ten.test"), Verdict::Pass);
    assert_eq!(spf(&zone, "192.0.2.1", "a@eleven.test"), Verdict::PermError);
}

fn ed_key() -> (Ed25519Key, String) {
    let der = Ed25519Key::generate_pkcs8().unwrap();
    let key = Ed25519Key::from_pkcs8_der(&der).unwrap();
    let public = key.public_key();
    use base64ct::Encoding;
    let p = base64ct::Base64::encode_string(&public);
    (key, format!("v=DKIM1; k=ed25519; p={p}"))
}

const MESSAGE: &str = "From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hi\r\nDate: Sat, 5 Dec 2026 20:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\nHello.\r\n";

fn signed(key: &Ed25519Key, domain: &str, body: &str) -> Vec<u8> {
    let sig = DkimSigner::from_key(KeyClone(key))
        .domain(domain)
        .selector("s1")
        .headers(["From", "To", "Subject", "Date", "Message-ID"])
        .sign(body.as_bytes())
        .unwrap();
    let mut out = sig.to_header().into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

struct KeyClone<'a>(&'a Ed25519Key);
impl SigningKey for KeyClone<'_> {
    type Hasher = mail_auth::common::crypto::Sha256;
    fn sign(&self, input: impl mail_auth::common::headers::Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.sign(input)
    }
    fn algorithm(&self) -> mail_auth::common::crypto::Algorithm {
        self.0.algorithm()
    }
}

const ALL: Checks = Checks {
    spf: true,
    dkim: true,
    arc: true,
    dmarc: true,
};

/// SPF as at MAIL FROM, then the message checks; run twice, hashing the
/// body inline and apart ([`BodyHashes`], as large messages are), which
/// must agree.
fn verify(zone: &Zone, ip: &str, from: &str, raw: &[u8], pct_sample: u8) -> Report {
    let v = Verifier::new().unwrap();
    let e = env(ip, "client.test", from);
    let spf = run(v.verify_spf(zone, &e));
    let check = |hashes: Option<&BodyHashes>| {
        run(v.verify_message(
            zone,
            &e,
            raw,
            hashes,
            &spf,
            ALL,
            "mx.sluice.test",
            None,
            None,
            false,
            pct_sample,
        ))
    };
    let inline = check(None);
    let hashes = BodyHashes::compute(raw, false);
    let apart = check(hashes.as_ref());
    assert_eq!(inline.summary(), apart.summary(), "inline vs apart");
    assert_eq!(inline.headers, apart.headers, "inline vs apart");
    inline
}

#[test]
fn dkim_pass_aligns_dmarc_and_the_header_says_so() {
    let (key, record) = ed_key();
    let zone = Zone::default()
        .txt("s1._domainkey.example.org", &record)
        .txt("_dmarc.example.org", "v=DMARC1; p=reject")
        .txt("bounce.test", "v=spf1 -all");
    let raw = signed(&key, "example.org", MESSAGE);
    let r = verify(&zone, "192.0.2.1", "x@bounce.test", &raw, 0);
    assert_eq!(r.dkim_overall(), Some(Verdict::Pass));
    assert_eq!(r.spf(), Some(Verdict::Fail));
    assert_eq!(r.dmarc.as_ref().unwrap().verdict, Verdict::Pass);
    let h = String::from_utf8(r.headers.clone()).unwrap();
    assert!(
        h.starts_with("Authentication-Results: mx.sluice.test;"),
        "{h}"
    );
    assert!(h.contains("dkim=pass"), "{h}");
    assert!(h.contains("dmarc=pass"), "{h}");
    // SPF's records came at MAIL FROM; the key and the DMARC names in the
    // first batch after DATA.
    assert!(zone.asked.borrow()[0].contains(&Query::Txt("bounce.test".into())));
    assert!(zone.asked.borrow().iter().any(|batch| {
        batch.contains(&Query::Txt("s1._domainkey.example.org".into()))
            && batch.contains(&Query::Txt("_dmarc.example.org".into()))
    }));
    // SPF fails, but DMARC passes: the default actions reject only SPF -all.
    assert!(matches!(
        decide(&r, &ActionConfig::default()),
        Decision::Reject(550, "5.7.23", _)
    ));
}

#[test]
fn tampered_body_fails_dkim_and_dmarc_reject_gives_550_571() {
    let (key, record) = ed_key();
    let zone = Zone::default()
        .txt("s1._domainkey.example.org", &record)
        .txt("_dmarc.example.org", "v=DMARC1; p=reject");
    let mut raw = signed(&key, "example.org", MESSAGE);
    let n = raw.len();
    raw[n - 4] = b'!';
    let r = verify(&zone, "192.0.2.1", "x@other.test", &raw, 0);
    assert_eq!(r.dkim_overall(), Some(Verdict::Fail));
    let dm = r.dmarc.clone().unwrap();
    assert_eq!(
        (dm.verdict, dm.applied),
        (Verdict::Fail, DmarcPolicy::Reject)
    );
    assert!(matches!(
        decide(&r, &ActionConfig::default()),
        Decision::Reject(550, "5.7.1", _)
    ));
    let dkim_reject = ActionConfig {
        dkim_fail: Action::Reject,
        ..ActionConfig::default()
    };
    assert!(matches!(
        decide(&r, &dkim_reject),
        Decision::Reject(550, "5.7.20", _)
    ));
}

#[test]
fn dmarc_pct_zero_weakens_the_policy() {
    let zone = Zone::default().txt("_dmarc.example.org", "v=DMARC1; p=reject; pct=0");
    let r = verify(&zone, "192.0.2.1", "x@other.test", MESSAGE.as_bytes(), 50);
    let dm = r.dmarc.clone().unwrap();
    assert_eq!(dm.verdict, Verdict::Fail);
    assert_eq!(
        (dm.published, dm.applied),
        (DmarcPolicy::Reject, DmarcPolicy::Quarantine)
    );
    assert_eq!(decide(&r, &ActionConfig::default()), Decision::Accept);
    let zone = Zone::default().txt("_dmarc.example.org", "v=DMARC1; p=reject; pct=60");
    let r = verify(&zone, "192.0.2.1", "x@other.test", MESSAGE.as_bytes(), 59);
    assert_eq!(r.dmarc.unwrap().applied, DmarcPolicy::Reject);
}

#[test]
fn dmarc_subdomain_policy_and_spf_alignment() {
    let zone = Zone::default()
        .txt("_dmarc.example.org", "v=DMARC1; p=none; sp=reject")
        .txt("sub.example.org", "v=spf1 ip4:192.0.2.1 -all")
        .a("sub.example.org", "192.0.2.99");
    let msg = MESSAGE.replace("alice@example.org", "alice@sub.example.org");
    // Unaligned, failing: sp= applies to the subdomain.
    let r = verify(&zone, "192.0.2.2", "x@other.test", msg.as_bytes(), 0);
    let dm = r.dmarc.clone().unwrap();
    assert_eq!(
        (dm.verdict, dm.published),
        (Verdict::Fail, DmarcPolicy::Reject)
    );
    // SPF pass for the same domain aligns.
    let r = verify(&zone, "192.0.2.1", "x@sub.example.org", msg.as_bytes(), 0);
    assert_eq!(r.spf(), Some(Verdict::Pass));
    assert_eq!(r.dmarc.unwrap().verdict, Verdict::Pass);
}

#[test]
fn dmarc_temporary_failure_is_temperror_and_tempfails() {
    let zone = Zone::default().set(
        Query::Txt("_dmarc.example.org".into()),
        Answer::TempFail("SERVFAIL".into()),
    );
    let r = verify(&zone, "192.0.2.1", "x@other.test", MESSAGE.as_bytes(), 0);
    assert_eq!(r.dmarc.clone().unwrap().verdict, Verdict::TempError);
    assert!(matches!(
        decide(&r, &ActionConfig::default()),
        Decision::TempFail(451, "4.7.1", _)
    ));
}

#[test]
fn iprev_pass_fail_and_temperror() {
    let v = Verifier::new().unwrap();
    let ip: IpAddr = "192.0.2.5".parse().unwrap();
    let zone = Zone::default()
        .set(Query::Ptr(ip), Answer::Ptr(vec!["host.example.org".into()]))
        .a("host.example.org", "192.0.2.5");
    assert_eq!(run(v.verify_iprev(&zone, ip)).result, IprevResult::Pass);
    let zone = Zone::default()
        .set(Query::Ptr(ip), Answer::Ptr(vec!["host.example.org".into()]))
        .a("host.example.org", "192.0.2.6");
    assert!(matches!(
        run(v.verify_iprev(&zone, ip)).result,
        IprevResult::Fail(_)
    ));
    let zone = Zone::default().set(Query::Ptr(ip), Answer::TempFail("timeout".into()));
    assert!(matches!(
        run(v.verify_iprev(&zone, ip)).result,
        IprevResult::TempError(_)
    ));
}

#[test]
fn own_authentication_results_are_stripped() {
    let msg = b"Received: from x\r\nAuthentication-Results: mx.sluice.test; spf=pass\r\n smtp.mailfrom=a@b\r\nAuthentication-Results: (c) other.test; dkim=pass\r\nauthentication-results:  MX.SLUICE.TEST ;none\r\nSubject: s\r\n\r\nAuthentication-Results: mx.sluice.test; body\r\n";
    let out = strip_own_results(msg, "mx.sluice.test").unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "Received: from x\r\nAuthentication-Results: (c) other.test; dkim=pass\r\nSubject: s\r\n\r\nAuthentication-Results: mx.sluice.test; body\r\n"
    );
    assert!(strip_own_results(b"Subject: s\r\n\r\nbody", "mx.sluice.test").is_none());
}

#[test]
fn rsa_signatures_verify_through_openssl_and_tampering_fails() {
    use crate::dkim::{generate_key, txt_record, SigningAlgorithm};
    let key = generate_key(SigningAlgorithm::RsaSha256, 2048).unwrap();
    let line = txt_record(
        "s1",
        "example.org",
        SigningAlgorithm::RsaSha256,
        &key.public_key,
    );
    let record: String = line.split('"').skip(1).step_by(2).collect();
    // The key record's RSA key is the OpenSSL one.
    assert!(rsa::rsa_key_of(format!("{record};").as_bytes()).is_some());
    assert!(rsa::rsa_key_of(b"v=DKIM1; k=ed25519; p=AAAA").is_none());
    let dir = std::env::temp_dir().join(format!("sluice-auth-rsa-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("k.pem");
    std::fs::write(&path, &key.private_pem).unwrap();
    let cfg: crate::dkim::DkimConfig = toml::from_str(&format!(
        "[signer.s]\ndomain = \"example.org\"\nselector = \"s1\"\nalgorithm = \"rsa-sha256\"\nkey = {:?}\n[[rule]]\nsign = [\"s\"]\n",
        path.display().to_string()
    ))
    .unwrap();
    let policy = crate::dkim::DkimPolicy::from_config(&cfg, &[]).unwrap();
    let mut raw = policy.sign(&[0], MESSAGE.as_bytes(), |_, _| {}).unwrap();
    raw.extend_from_slice(MESSAGE.as_bytes());
    let zone = Zone::default()
        .txt("s1._domainkey.example.org", &record)
        .txt("_dmarc.example.org", "v=DMARC1; p=reject");
    let r = verify(&zone, "192.0.2.1", "x@other.test", &raw, 0);
    assert_eq!(r.dkim_overall(), Some(Verdict::Pass), "{r:?}");
    let n = raw.len();
    raw[n - 4] = b'!';
    let r = verify(&zone, "192.0.2.1", "x@other.test", &raw, 0);
    assert_eq!(r.dkim_overall(), Some(Verdict::Fail), "{r:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn received_spf_is_optional() {
    let zone = Zone::default().txt("example.org", "v=spf1 ip4:192.0.2.0/24 -all");
    let v = Verifier::new().unwrap();
    let e = env("192.0.2.1", "client.test", "a@example.org");
    let checks = Checks {
        spf: true,
        dkim: false,
        arc: false,
        dmarc: false,
    };
    let spf = run(v.verify_spf(&zone, &e));
    let with = run(v.verify_message(
        &zone,
        &e,
        MESSAGE.as_bytes(),
        None,
        &spf,
        checks,
        "mx.sluice.test",
        None,
        None,
        true,
        0,
    ));
    let h = String::from_utf8(with.headers).unwrap();
    assert!(h.contains("\r\nReceived-SPF: pass"), "{h}");
    let without = run(v.verify_message(
        &zone,
        &e,
        MESSAGE.as_bytes(),
        None,
        &spf,
        checks,
        "mx.sluice.test",
        None,
        None,
        false,
        0,
    ));
    assert!(!String::from_utf8(without.headers)
        .unwrap()
        .contains("Received-SPF"));
}

#[test]
fn dkim_pass_by_another_domain_is_5_7_22_when_asked() {
    let (key, record) = ed_key();
    let zone = Zone::default().txt("s1._domainkey.mailer.test", &record);
    // Signed by mailer.test, From example.org.
    let raw = signed(&key, "mailer.test", MESSAGE);
    let r = verify(&zone, "192.0.2.1", "x@other.test", &raw, 0);
    assert_eq!(r.dkim_overall(), Some(Verdict::Pass));
    assert!(r.dkim_pass_unaligned());
    assert_eq!(decide(&r, &ActionConfig::default()), Decision::Accept);
    let strict = ActionConfig {
        dkim_unaligned: Action::Reject,
        ..ActionConfig::default()
    };
    assert!(matches!(
        decide(&r, &strict),
        Decision::Reject(550, "5.7.22", _)
    ));
    // Signed by the From domain's parent: aligned.
    let zone = Zone::default().txt("s1._domainkey.example.org", &record);
    let msg = MESSAGE.replace("alice@example.org", "alice@news.example.org");
    let raw = signed(&key, "example.org", &msg);
    let r = verify(&zone, "192.0.2.1", "x@other.test", &raw, 0);
    assert_eq!(r.dkim_overall(), Some(Verdict::Pass));
    assert!(!r.dkim_pass_unaligned());
}

#[test]
fn spf_at_mail_from_decides_with_the_listener_actions() {
    let v = Verifier::new().unwrap();
    let zone = Zone::default()
        .txt("example.org", "v=spf1 ip4:192.0.2.0/24 -all")
        .txt("soft.test", "v=spf1 ~all")
        .set(
            Query::Txt("broken.test".into()),
            Answer::TempFail("SERVFAIL".into()),
        );
    let actions = ActionConfig::default();
    let at_mail = |ip: &str, from: &str| run(v.verify_spf(&zone, &env(ip, "client.test", from)));

    let pass = at_mail("192.0.2.1", "a@example.org");
    assert_eq!(pass.mail_from_verdict(), Some(Verdict::Pass));
    assert_eq!(pass.helo_verdict(), Some(Verdict::None));
    assert_eq!(decide_spf(&pass, &actions), Decision::Accept);

    let fail = at_mail("203.0.113.1", "a@example.org");
    assert_eq!(
        decide_spf(&fail, &actions),
        Decision::Reject(550, "5.7.23", "SPF validation failed".into())
    );
    // The same result after DATA (with nothing else) says the same.
    assert_eq!(
        decide(&fail.report(), &actions),
        decide_spf(&fail, &actions)
    );
    let lenient = ActionConfig {
        spf_fail: Action::Accept,
        ..ActionConfig::default()
    };
    assert_eq!(decide_spf(&fail, &lenient), Decision::Accept);

    let temp = at_mail("192.0.2.1", "a@broken.test");
    assert_eq!(temp.mail_from_verdict(), Some(Verdict::TempError));
    assert!(matches!(
        decide_spf(&temp, &actions),
        Decision::TempFail(451, "4.7.24", _)
    ));
    let accept_temp = ActionConfig {
        temperror: Action::Accept,
        ..ActionConfig::default()
    };
    assert_eq!(decide_spf(&temp, &accept_temp), Decision::Accept);

    // Softfail is accepted by default.
    let soft = at_mail("192.0.2.1", "a@soft.test");
    assert_eq!(soft.mail_from_verdict(), Some(Verdict::SoftFail));
    assert_eq!(decide_spf(&soft, &actions), Decision::Accept);

    // The null reverse-path: the HELO identity decides.
    let zone = Zone::default().txt("client.test", "v=spf1 -all");
    let bounce = run(v.verify_spf(&zone, &env("192.0.2.1", "client.test", "")));
    assert_eq!(bounce.mail_from, None.map(|o: SpfOutput| o));
    assert!(matches!(
        decide_spf(&bounce, &actions),
        Decision::Reject(550, "5.7.23", _)
    ));

    // Timed out: both identities temperror.
    let t = SpfResults::temperror(&env("192.0.2.1", "client.test", "a@example.org"));
    assert_eq!(t.helo_verdict(), Some(Verdict::TempError));
    assert_eq!(t.mail_from_verdict(), Some(Verdict::TempError));
}

#[test]
fn spf_found_at_mail_from_is_reused_not_looked_up_again() {
    let v = Verifier::new().unwrap();
    let zone = Zone::default().txt("example.org", "v=spf1 ip4:192.0.2.0/24 -all");
    let e = env("192.0.2.1", "client.test", "a@example.org");
    let spf = run(v.verify_spf(&zone, &e));
    let rounds = zone.rounds();
    let r = run(v.verify_message(
        &zone,
        &e,
        MESSAGE.as_bytes(),
        None,
        &spf,
        Checks {
            spf: true,
            dkim: false,
            arc: false,
            dmarc: false,
        },
        "mx.sluice.test",
        None,
        None,
        true,
        0,
    ));
    assert_eq!(zone.rounds(), rounds, "no DNS after DATA for SPF");
    assert_eq!(r.spf(), Some(Verdict::Pass));
    let h = String::from_utf8(r.headers).unwrap();
    assert!(h.contains("spf=pass"), "{h}");
    assert!(h.contains("Received-SPF: pass"), "{h}");
}

#[test]
fn body_hashes_made_apart_verify_like_inline_and_catch_tampering() {
    let (key, record) = ed_key();
    let zone = Zone::default()
        .txt("s1._domainkey.example.org", &record)
        .txt("_dmarc.example.org", "v=DMARC1; p=reject");
    let mut big = MESSAGE.to_string();
    for i in 0..20_000 {
        big.push_str(&format!(
            "line {i} of a large body, long enough to matter\r\n"
        ));
    }
    let raw = signed(&key, "example.org", &big);
    let hashes = BodyHashes::compute(&raw, false).unwrap();
    assert_eq!(hashes.len(), 1);
    let r = verify(&zone, "192.0.2.1", "x@example.org", &raw, 0);
    assert_eq!(r.dkim_overall(), Some(Verdict::Pass));
    // Hashes of another body: the check fails like a tampered message.
    let tampered = String::from_utf8(raw.clone())
        .unwrap()
        .replace("line 7 of", "line 8 of");
    let v = Verifier::new().unwrap();
    let e = env("192.0.2.1", "client.test", "x@example.org");
    let wrong = BodyHashes::compute(tampered.as_bytes(), false).unwrap();
    let r = run(v.verify_message(
        &zone,
        &e,
        &raw,
        Some(&wrong),
        &SpfResults::default(),
        ALL,
        "mx.sluice.test",
        None,
        None,
        false,
        0,
    ));
    assert_eq!(r.dkim_overall(), Some(Verdict::Fail));
    // With a seal asked for, the seal's own hash is made apart too (here
    // the signature's relaxed/SHA-256 one already is that hash).
    assert_eq!(BodyHashes::compute(&raw, true).unwrap().len(), 1);
    let unsigned = MESSAGE.as_bytes();
    assert!(BodyHashes::compute(unsigned, false).unwrap().is_empty());
    assert_eq!(BodyHashes::compute(unsigned, true).unwrap().len(), 1);
}
