//! Inbound verification cost per message with a warm DNS cache: SPF (MAIL
//! FROM with one include, plus HELO), DKIM (one RSA-2048 or Ed25519
//! signature over a 1 KiB message) and DMARC, through the DNS bridge exactly
//! as a listener runs it (`Verifier::verify_message`), the answers coming from
//! an in-memory table (what a warm per-core cache gives: no I/O, no await).
//! BENCHMARKS.md "Inbound authentication".

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_policy::auth::{Answer, Checks, DnsSource, Envelope, Query, Verifier};
use sluice_policy::dkim::{
    generate_key, txt_record, DkimConfig, DkimPolicy, DkimRuleConfig, SignerConfig,
    SigningAlgorithm,
};

struct Warm(HashMap<Query, Answer>);

impl DnsSource for Warm {
    async fn resolve(&self, queries: Vec<Query>) -> Vec<(Query, Answer)> {
        queries
            .into_iter()
            .map(|q| {
                let a = self.0.get(&q).cloned().unwrap_or(Answer::NotFound);
                (q, a)
            })
            .collect()
    }
}

fn message(size: usize) -> Vec<u8> {
    let mut m = b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: benchmark\r\n\
Date: Sat, 05 Dec 2026 16:00:00 +0000\r\nMessage-ID: <bench@example.org>\r\n\
MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        .to_vec();
    let line = b"The quick brown fox jumps over the lazy dog, again and again and again.  x\r\n";
    while m.len() < size {
        m.extend_from_slice(line);
    }
    m.truncate(size - 2);
    m.extend_from_slice(b"\r\n");
    m
}

/// A signed 1 KiB message and the TXT value of its key.
fn signed(dir: &std::path::Path, algorithm: SigningAlgorithm) -> (Vec<u8>, String) {
    let key = generate_key(algorithm, 2048).expect("key");
    let path = dir.join(format!("{algorithm:?}.pem"));
    std::fs::write(&path, &key.private_pem).expect("write key");
    let mut signer = BTreeMap::new();
    signer.insert(
        "s".to_string(),
        SignerConfig {
            domain: "example.org".into(),
            selector: "bench".into(),
            algorithm,
            key: path,
            headers: None,
            canonicalization: None,
            expire: None,
        },
    );
    let cfg = DkimConfig {
        signer,
        rule: vec![DkimRuleConfig {
            when: Default::default(),
            sign: Some(vec!["s".into()]),
            arc_seal: None,
        }],
    };
    let p = DkimPolicy::from_config(&cfg, &[]).expect("policy");
    let body = message(1024);
    let mut m = p.sign(&[0], &body, |_, _| {}).expect("sign");
    m.extend_from_slice(&body);
    let line = txt_record("bench", "example.org", algorithm, &key.public_key);
    let text: String = line.split('"').skip(1).step_by(2).collect();
    (m, text)
}

fn zone(dkim_txt: &str) -> Warm {
    let mut z = HashMap::new();
    let txt = |s: &str| Answer::Txt(vec![s.as_bytes().to_vec()]);
    z.insert(
        Query::Txt("example.org".into()),
        txt("v=spf1 include:_spf.example.org -all"),
    );
    z.insert(
        Query::Txt("_spf.example.org".into()),
        txt("v=spf1 ip4:192.0.2.0/24 -all"),
    );
    z.insert(
        Query::Txt("mail.example.org".into()),
        txt("v=spf1 ip4:192.0.2.0/24 -all"),
    );
    z.insert(
        Query::Txt("bench._domainkey.example.org".into()),
        txt(dkim_txt),
    );
    z.insert(
        Query::Txt("_dmarc.example.org".into()),
        txt("v=DMARC1; p=reject"),
    );
    Warm(z)
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = Verifier::new().expect("verifier");
    let env = Envelope {
        client_ip: "192.0.2.7".parse().expect("ip"),
        helo: "mail.example.org",
        mail_from: "bounce@example.org",
        hostname: "mx.sluice.test",
    };
    let all = Checks {
        spf: true,
        dkim: true,
        arc: false,
        dmarc: true,
    };
    let mut g = c.benchmark_group("auth_verify");
    g.throughput(Throughput::Elements(1));
    for (name, algorithm) in [
        ("rsa2048", SigningAlgorithm::RsaSha256),
        ("ed25519", SigningAlgorithm::Ed25519Sha256),
    ] {
        let (m, txt) = signed(dir.path(), algorithm);
        let z = zone(&txt);
        let run = |checks: Checks| {
            let r = futures_lite::future::block_on(v.verify_message(
                &z,
                &env,
                black_box(&m),
                checks,
                "mx.sluice.test",
                None,
                None,
                false,
                50,
            ));
            assert_eq!(r.summary(), expected(checks), "{:?}", r);
            r
        };
        g.bench_function(BenchmarkId::new("spf+dkim+dmarc", name), |b| {
            b.iter(|| black_box(run(all)))
        });
        g.bench_function(BenchmarkId::new("dkim", name), |b| {
            b.iter(|| {
                black_box(run(Checks {
                    spf: false,
                    dmarc: false,
                    ..all
                }))
            })
        });
    }
    let z = zone("");
    let m = message(1024);
    g.bench_function("spf", |b| {
        b.iter(|| {
            black_box(futures_lite::future::block_on(v.verify_message(
                &z,
                &env,
                black_box(&m),
                Checks {
                    spf: true,
                    dkim: false,
                    arc: false,
                    dmarc: false,
                },
                "mx.sluice.test",
                None,
                None,
                false,
                50,
            )))
        })
    });
    g.finish();
}

fn expected(c: Checks) -> &'static str {
    if c.spf {
        "spf_helo=pass spf_mailfrom=pass dkim=pass dmarc=pass"
    } else {
        "dkim=pass"
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
