//! The cost of outbound TLS per new connection, in memory (no sockets): a
//! rustls client and server handshake (TLS 1.3, ECDHE X25519, server
//! certificate EC P-256 issued by a test CA; the server config is the
//! listener's own, `sluice_engine::tls::server_config`).
//!
//! - `accept_any`: the handshake alone, certificate not checked;
//! - `sluice`: what every outbound TLS session of the relay does, whatever its
//!   policy: the handshake with `OutboundTlsConfig`'s client config, then
//!   `OutboundTlsConfig::verify` (web PKI roots plus the CA file) for the MX
//!   name — opportunistic and required log the result, verify acts on it, so
//!   `verify` costs the same per connection as `opportunistic`;
//! - `rustls_verifying`: a client that verifies inside the handshake
//!   (rustls's `WebPkiServerVerifier` as its verifier), for comparison.
//!
//! `cargo bench -p sluice-bench --bench tls_handshake` (BENCHMARKS.md "Outbound TLS").

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use sluice_engine::delivery::outbound::OutboundTlsConfig;

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

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = sluice_testkit::make_ca(dir.path(), "ca");
    let (cert, key) = sluice_testkit::make_issued_cert(dir.path(), &ca, "mx1", NAME);
    let server = sluice_engine::tls::server_config(&cert, &key).expect("server config");
    let outbound = OutboundTlsConfig::new(Some(&ca.0), &BTreeMap::new()).expect("outbound");
    let accept_any = outbound.client_config(None);
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
    assert!(outbound.verify(&conn, &name).is_ok());
    let other = ServerName::try_from("other.bench.test").expect("name");
    assert!(outbound.verify(&conn, &other).is_err());
    connect(&verifying, &server);

    let mut g = c.benchmark_group("outbound_tls_per_connection");
    g.bench_function("accept_any", |b| {
        b.iter(|| black_box(connect(&accept_any, &server)))
    });
    g.bench_function("sluice", |b| {
        b.iter(|| {
            let conn = connect(&accept_any, &server);
            black_box(outbound.verify(&conn, &name).is_ok())
        })
    });
    g.bench_function("rustls_verifying", |b| {
        b.iter(|| black_box(connect(&verifying, &server)))
    });
    g.bench_function("verify_only", |b| {
        b.iter(|| black_box(outbound.verify(&conn, &name).is_ok()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
