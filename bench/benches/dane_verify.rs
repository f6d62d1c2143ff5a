//! What checking a server's certificate costs per new connection, DANE next
//! to the web PKI check every outbound TLS session already makes: the same
//! chain (EC P-256 leaf for the MX name, issued by a test CA) checked
//!
//! - `webpki`: rustls's `WebPkiServerVerifier` with the CA as root (what
//!   `OutboundTlsConfig::verify` runs after each handshake);
//! - `dane_ee`: `sluice_policy::dane::verify` against `3 1 1` (SHA-256 of the
//!   leaf's key; no chain, no name);
//! - `dane_ta`: against `2 0 1` (SHA-256 of the CA certificate, sent in the
//!   chain): match, then the path leaf → CA verified by webpki and the name;
//! - `dane_ta_key`: against `2 1 0` (the CA's key in full, CA not sent).
//!
//! An interleaved run prints the cases side by side first (rounds in rotating
//! order, the median round per case), then criterion runs each.
//!
//! `cargo bench -p sluice-bench --bench dane_verify` (BENCHMARKS.md "DANE").

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, Criterion};
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sluice_policy::dane::{self, Tlsa};

const NAME: &str = "mx1.bench.test";

struct Setup {
    _dir: tempfile::TempDir,
    leaf: CertificateDer<'static>,
    ca: CertificateDer<'static>,
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    ee: Vec<Tlsa>,
    ta: Vec<Tlsa>,
    ta_key: Vec<Tlsa>,
}

fn der(path: &std::path::Path) -> CertificateDer<'static> {
    CertificateDer::pem_file_iter(path)
        .expect("pem")
        .next()
        .expect("a certificate")
        .expect("pem certificate")
}

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_files = sluice_testkit::make_ca(dir.path(), "ca");
    let (cert, _key) = sluice_testkit::make_issued_cert(dir.path(), &ca_files, "mx1", NAME);
    let leaf = der(&cert);
    let ca = der(&ca_files.0);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("root");
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .expect("verifier");
    let record = |usage, selector, matching, data| {
        vec![Tlsa {
            usage,
            selector,
            matching,
            data,
        }]
    };
    let leaf_spki = dane::subject_public_key_info(&leaf).expect("spki").to_vec();
    let ca_spki = dane::subject_public_key_info(&ca).expect("spki").to_vec();
    let s = Setup {
        ee: record(3, 1, 1, sha256(&leaf_spki)),
        ta: record(2, 0, 1, sha256(&ca)),
        ta_key: record(2, 1, 0, ca_spki),
        _dir: dir,
        leaf,
        ca,
        webpki,
    };
    // The checks are real: each passes here, and fails for another name or key.
    for (kind, what) in KINDS.iter().enumerate() {
        assert!(run_case(&s, kind, NAME), "{what}");
    }
    assert!(!run_case(&s, 0, "other.bench.test"));
    assert!(!run_case(&s, 2, "other.bench.test"));
    let wrong = vec![Tlsa {
        data: sha256(&s.ca),
        ..s.ee[0].clone()
    }];
    assert!(dane::verify(
        std::slice::from_ref(&s.leaf),
        &wrong,
        &[NAME],
        UnixTime::now()
    )
    .is_err());
    s
}

const KINDS: [&str; 4] = ["webpki", "dane_ee", "dane_ta", "dane_ta_key"];

/// One check of kind `kind` (index into KINDS) for `name`; whether it passed.
fn run_case(s: &Setup, kind: usize, name: &str) -> bool {
    let now = UnixTime::now();
    match kind {
        0 => {
            let server = ServerName::try_from(name.to_string()).expect("name");
            s.webpki
                .verify_server_cert(&s.leaf, &[], &server, &[], now)
                .is_ok()
        }
        1 => dane::verify(std::slice::from_ref(&s.leaf), &s.ee, &[name], now).is_ok(),
        2 => dane::verify(&[s.leaf.clone(), s.ca.clone()], &s.ta, &[name], now).is_ok(),
        _ => dane::verify(std::slice::from_ref(&s.leaf), &s.ta_key, &[name], now).is_ok(),
    }
}

fn interleaved(s: &Setup) {
    const ROUNDS: usize = 25;
    const PER_ROUND: u32 = 500;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); KINDS.len()];
    for round in 0..ROUNDS {
        for i in 0..KINDS.len() {
            let kind = (round + i) % KINDS.len();
            let start = Instant::now();
            for _ in 0..PER_ROUND {
                black_box(run_case(s, kind, NAME));
            }
            times[kind].push(start.elapsed().as_secs_f64() * 1e6 / f64::from(PER_ROUND));
        }
    }
    let medians: Vec<f64> = times
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect();
    println!("interleaved: {ROUNDS} rounds x {PER_ROUND} checks per case, median µs per check");
    for (kind, name) in KINDS.iter().enumerate() {
        println!(
            "  {name:<12} {:7.2} µs  {:5.2}x webpki",
            medians[kind],
            medians[kind] / medians[0]
        );
    }
}

fn bench(c: &mut Criterion) {
    let s = setup();
    interleaved(&s);
    let mut g = c.benchmark_group("certificate_check_per_connection");
    for (kind, name) in KINDS.iter().enumerate() {
        g.bench_function(*name, |b| b.iter(|| black_box(run_case(&s, kind, NAME))));
    }
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
