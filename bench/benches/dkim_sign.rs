//! DKIM signing per core: one signature over a 1 KiB and a 100 KiB message
//! (canonicalize, hash, sign: what `CoreQueue::enqueue` does per signer) with
//! RSA-2048 (ring) and Ed25519 (ed25519-dalek), next to the raw signature of
//! the same keys over a 32-byte input (the crypto alone). `bench/dkim-vs-openssl.sh` runs this and
//! `openssl speed` together and prints the ratios (BENCHMARKS.md "DKIM signing").

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_policy::dkim::{
    generate_key, DkimConfig, DkimPolicy, DkimRuleConfig, SignerConfig, SigningAlgorithm,
};

/// A plain message of about `size` bytes: headers, then 76-byte lines.
fn message(size: usize) -> Vec<u8> {
    let mut m = b"Received: from client.example.net by relay.example.org; Sat, 5 Dec 2026 16:00:00 +0000\r\n\
From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: benchmark\r\n\
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

fn policy(dir: &std::path::Path, algorithm: SigningAlgorithm) -> DkimPolicy {
    let key = generate_key(algorithm, 2048).expect("key");
    let path = dir.join(format!("{algorithm:?}.pem"));
    std::fs::write(&path, key.private_pem).expect("write key");
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
    DkimPolicy::from_config(&cfg, &[]).expect("policy")
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let algorithms = [
        ("rsa2048", SigningAlgorithm::RsaSha256),
        ("ed25519", SigningAlgorithm::Ed25519Sha256),
    ];
    let mut g = c.benchmark_group("dkim_sign");
    for (name, algorithm) in algorithms {
        let p = policy(dir.path(), algorithm);
        for (label, size) in [("1KiB", 1024), ("100KiB", 100 * 1024)] {
            let m = message(size);
            g.throughput(Throughput::Elements(1));
            g.bench_with_input(BenchmarkId::new(name, label), &m, |b, m| {
                b.iter(|| black_box(p.sign(&[0], black_box(m), |_, _| {}).expect("sign")))
            });
        }
    }
    g.finish();

    // The same keys' signature over 32 bytes (SHA-256 of 32 bytes, then the
    // signature): the raw rate of the crypto the signer uses.
    let mut g = c.benchmark_group("raw_sign");
    for (name, algorithm) in algorithms {
        let p = policy(dir.path(), algorithm);
        let digest = [7u8; 32];
        g.throughput(Throughput::Elements(1));
        g.bench_function(name, |b| {
            b.iter(|| black_box(p.sign_raw(0, black_box(&digest[..])).expect("sign")))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
