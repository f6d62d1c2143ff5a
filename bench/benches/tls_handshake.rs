//! The cost of outbound TLS per new connection, in memory (no sockets): a
//! rustls client and server handshake (TLS 1.3, ECDHE X25519, server
//! certificate EC P-256 issued by a test CA; the server config is the
//! listener's own, `sluice_engine::tls::server_config`).
//!
//! Each case runs as a full handshake (client session resumption off) and as
//! a resumed one (the client's default session cache, which the relay keeps):
//!
//! - `accept_any`: the handshake alone, certificate not checked;
//! - `sluice`: what every outbound TLS session of the relay does, whatever its
//!   policy: the handshake with `OutboundTlsConfig`'s client config, then
//!   `OutboundTlsConfig::verify` (web PKI roots plus the CA file) for the MX
//!   name — opportunistic and required log the result, verify acts on it, so
//!   `verify` costs the same per connection as `opportunistic`;
//! - `rustls_verifying`: a client that verifies inside the handshake
//!   (rustls's `WebPkiServerVerifier` as its verifier), for comparison: a
//!   resumed session is not verified again there, while the relay's check
//!   after the handshake runs on every session.
//!
//! Before criterion's per-case runs, an interleaved A/B/C run prints the cases
//! side by side: rounds of 200 handshakes per case, the cases in rotating order
//! each round, the median round per case. On a machine busy with other work,
//! load drifts between criterion's cases; the interleaved ratios do not.
//!
//! `cargo bench -p sluice-bench --bench tls_handshake` (BENCHMARKS.md "Outbound TLS").

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, Criterion};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use sluice_engine::delivery::outbound::{bench_api, OutboundTlsConfig};

const NAME: &str = "mx1.bench.test";

/// Runs a handshake to its end, moving the bytes between the two in memory.
fn handshake(client: &mut ClientConnection, server: &mut ServerConnection) {
    let mut buf = Vec::with_capacity(8192);
    while client.is_handshaking() || server.is_handshaking() {
        buf.clear();
        while client.wants_write() {
            client.write_tls(&mut buf).expect("client write");
        }
        if !buf.is_empty() {
            server.read_tls(&mut &buf[..]).expect("server read");
            server.process_new_packets().expect("server process");
        }
        buf.clear();
        while server.wants_write() {
            server.write_tls(&mut buf).expect("server write");
        }
        if !buf.is_empty() {
            client.read_tls(&mut &buf[..]).expect("client read");
            client.process_new_packets().expect("client process");
        }
    }
}

fn connect(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> ClientConnection {
    let name = ServerName::try_from(NAME).expect("name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client");
    let mut s = ServerConnection::new(server.clone()).expect("server");
    handshake(&mut c, &mut s);
    c
}

/// Everything the cases need, made once. `[0]` full handshakes (session
/// resumption off in the client), `[1]` resumed ones (the clients' default
/// session cache, as the relay has: a new connection to a host it spoke TLS
/// with recently resumes).
struct Setup {
    _dir: tempfile::TempDir,
    server: Arc<ServerConfig>,
    outbound: OutboundTlsConfig,
    accept_any: [Arc<ClientConfig>; 2],
    verifying: [Arc<ClientConfig>; 2],
    name: ServerName<'static>,
}

fn no_resumption(config: &Arc<ClientConfig>) -> Arc<ClientConfig> {
    let mut c = (**config).clone();
    c.resumption = rustls::client::Resumption::disabled();
    Arc::new(c)
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = sluice_testkit::make_ca(dir.path(), "ca");
    let (cert, key) = sluice_testkit::make_issued_cert(dir.path(), &ca, "mx1", NAME);
    let server = sluice_engine::tls::server_config(&cert, &key).expect("server config");
    let outbound = OutboundTlsConfig::new(Some(&ca.0), &BTreeMap::new()).expect("outbound");
    let accept_any = bench_api::client_config(&outbound, None);
    let name = ServerName::try_from(NAME).expect("name");
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for der in CertificateDer::pem_file_iter(&ca.0).expect("ca") {
        roots.add(der.expect("ca pem")).expect("ca root");
    }
    let verifying = Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    // The checks are real: the verified handshakes verify, a wrong name does not.
    let conn = connect(&accept_any, &server);
    assert!(bench_api::verify(&outbound, &conn, &name).is_ok());
    let other = ServerName::try_from("other.bench.test").expect("name");
    assert!(bench_api::verify(&outbound, &conn, &other).is_err());
    connect(&verifying, &server);
    Setup {
        _dir: dir,
        server,
        outbound,
        accept_any: [no_resumption(&accept_any), accept_any],
        verifying: [no_resumption(&verifying), verifying],
        name,
    }
}

const KINDS: [&str; 3] = ["accept_any", "sluice", "rustls_verifying"];
const VARIANTS: [&str; 2] = ["full", "resumed"];

/// One new connection of `kind` (index into KINDS), full or resumed.
fn run_case(s: &Setup, variant: usize, kind: usize) {
    match kind {
        0 => {
            black_box(connect(&s.accept_any[variant], &s.server));
        }
        1 => {
            let conn = connect(&s.accept_any[variant], &s.server);
            black_box(bench_api::verify(&s.outbound, &conn, &s.name).is_ok());
        }
        _ => {
            black_box(connect(&s.verifying[variant], &s.server));
        }
    }
}

/// The cases side by side: 25 rounds of 100 handshakes per case, in rotating
/// order; the median round per case, and its ratio to `accept_any` of the same
/// variant.
fn interleaved(s: &Setup) {
    const ROUNDS: usize = 25;
    const PER_ROUND: u32 = 100;
    let cases: Vec<(usize, usize)> = (0..VARIANTS.len())
        .flat_map(|v| (0..KINDS.len()).map(move |k| (v, k)))
        .collect();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..ROUNDS {
        for i in 0..cases.len() {
            let c = (round + i) % cases.len();
            let (variant, kind) = cases[c];
            let start = Instant::now();
            for _ in 0..PER_ROUND {
                run_case(s, variant, kind);
            }
            times[c].push(start.elapsed().as_secs_f64() * 1e6 / f64::from(PER_ROUND));
        }
    }
    let medians: Vec<f64> = times
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect();
    println!(
        "interleaved: {ROUNDS} rounds x {PER_ROUND} handshakes per case, median µs per new connection (client and server CPU)"
    );
    for (i, (variant, kind)) in cases.iter().enumerate() {
        let base = medians[variant * KINDS.len()];
        println!(
            "  {:<8} {:<17} {:8.1} µs  {:5.2}x accept_any",
            VARIANTS[*variant],
            KINDS[*kind],
            medians[i],
            medians[i] / base
        );
    }
}

fn bench(c: &mut Criterion) {
    let s = setup();
    interleaved(&s);
    let conn = connect(&s.accept_any[0], &s.server);
    let mut g = c.benchmark_group("outbound_tls_per_connection");
    for (kind, name) in KINDS.iter().enumerate() {
        g.bench_function(format!("full/{name}"), |b| b.iter(|| run_case(&s, 0, kind)));
    }
    g.bench_function("verify_only", |b| {
        b.iter(|| black_box(bench_api::verify(&s.outbound, &conn, &s.name).is_ok()))
    });
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
