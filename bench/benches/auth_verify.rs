//! Inbound verification cost per message with a warm DNS cache: SPF (MAIL
//! FROM with one include, plus HELO), DKIM (one RSA-2048 or Ed25519
//! signature over a 1 KiB message) and DMARC, through the DNS bridge exactly
//! as a listener runs it (`Verifier::verify_message`), the answers coming from
//! an in-memory table (what a warm per-core cache gives: no I/O, no await).
//! SPF is found at MAIL FROM (`Verifier::verify_spf`), the rest after DATA.
//! The `large` cases time DKIM over 64 KiB – 10 MiB bodies inline, the body
//! hashes alone (the part the engine moves to the blocking pool at
//! `verify.offload_size`), what is left on the executor then, and the
//! blocking pool's round trip on glommio: together they place the cut-over.
//! BENCHMARKS.md "Inbound authentication".

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_policy::auth::{
    Answer, BodyHashes, Checks, DnsSource, Envelope, Query, SpfResults, Verifier,
};
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
    signed_size(dir, algorithm, 1024)
}

/// A signed message of `size` bytes and the TXT value of its key.
fn signed_size(
    dir: &std::path::Path,
    algorithm: SigningAlgorithm,
    size: usize,
) -> (Vec<u8>, String) {
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
    let body = message(size);
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
            let spf = if checks.spf {
                futures_lite::future::block_on(v.verify_spf(&z, &env))
            } else {
                SpfResults::default()
            };
            let r = futures_lite::future::block_on(v.verify_message(
                &z,
                &env,
                black_box(&m),
                None,
                &spf,
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
    g.bench_function("spf", |b| {
        b.iter(|| black_box(futures_lite::future::block_on(v.verify_spf(&z, &env))))
    });
    g.finish();

    let dkim_only = Checks {
        spf: false,
        dkim: true,
        arc: false,
        dmarc: false,
    };
    let mut g = c.benchmark_group("auth_verify_large");
    g.sample_size(10);
    for (label, size) in [
        ("64KiB", 64 << 10),
        ("256KiB", 256 << 10),
        ("1MiB", 1 << 20),
        ("10MiB", 10 << 20),
    ] {
        let (m, txt) = signed_size(dir.path(), SigningAlgorithm::RsaSha256, size);
        let z = zone(&txt);
        let none = SpfResults::default();
        let check = |hashes: Option<&BodyHashes>| {
            let r = futures_lite::future::block_on(v.verify_message(
                &z,
                &env,
                black_box(&m),
                hashes,
                &none,
                dkim_only,
                "mx.sluice.test",
                None,
                None,
                false,
                50,
            ));
            assert_eq!(r.summary(), "dkim=pass", "{r:?}");
            r
        };
        g.throughput(Throughput::Bytes(size as u64));
        // All of it on one thread: what runs on the executor below the cut-over.
        g.bench_function(BenchmarkId::new("inline", label), |b| {
            b.iter(|| black_box(check(None)))
        });
        // The part moved to the blocking pool.
        g.bench_function(BenchmarkId::new("body_hashes", label), |b| {
            b.iter(|| black_box(BodyHashes::compute(black_box(&m), false)))
        });
        // What stays on the executor when the hashes come from the pool.
        let hashes = BodyHashes::compute(&m, false).expect("hashes");
        g.bench_function(BenchmarkId::new("executor_share", label), |b| {
            b.iter(|| black_box(check(Some(&hashes))))
        });
    }
    g.finish();

    // The blocking pool's round trip from a glommio executor (an empty job):
    // the fixed price of offloading.
    let mut g = c.benchmark_group("auth_verify_offload");
    g.bench_function("spawn_blocking_round_trip", |b| {
        b.iter_custom(|iters| {
            glommio::LocalExecutorBuilder::default()
                .spawn(move || async move {
                    let started = std::time::Instant::now();
                    for _ in 0..iters {
                        glommio::executor().spawn_blocking(|| black_box(0u8)).await;
                    }
                    started.elapsed()
                })
                .expect("executor")
                .join()
                .expect("join")
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
