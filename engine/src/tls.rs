//! TLS configuration for listeners (rustls, TLS 1.2 and 1.3, ring provider).

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate file {path}: {message}")]
    Cert { path: String, message: String },
    #[error("key file {path}: {message}")]
    Key { path: String, message: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Reads a PEM certificate chain and a PEM private key.
pub fn chain_and_key(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert.display().to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert.display().to_string(),
            message: "no certificate found".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        message: e.to_string(),
    })?;
    Ok((certs, key_der))
}

/// Reads a PEM certificate chain and a PEM private key and checks that they
/// belong together.
pub fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let (certs, key_der) = chain_and_key(cert, key)?;
    CertifiedKey::from_der(certs, key_der, &provider()).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        message: format!("does not fit {}: {e}", cert.display()),
    })
}

/// The protocol versions listeners accept, newest first: TLS 1.0 and 1.1 are
/// refused.
pub const SERVER_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Builds a server config from a PEM certificate chain and a PEM private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    Ok(reloadable_server_config(cert, key)?.0)
}

/// A listener's certificate and key, swapped in place by a reload: handshakes
/// after the swap present the new one; established sessions keep theirs.
#[derive(Debug)]
pub struct CertSwap(ArcSwap<CertifiedKey>);

impl CertSwap {
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.0.load_full()
    }

    pub fn store(&self, key: Arc<CertifiedKey>) {
        self.0.store(key);
    }
}

impl ResolvesServerCert for CertSwap {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// A server config whose certificate can be replaced later through the
/// returned [`CertSwap`].
pub fn reloadable_server_config(
    cert: &Path,
    key: &Path,
) -> Result<(Arc<ServerConfig>, Arc<CertSwap>), TlsError> {
    let swap = Arc::new(CertSwap(ArcSwap::from_pointee(certified_key(cert, key)?)));
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(SERVER_VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(swap.clone());
    // Server cipher preference: our suite order (AEADs, ECDHE only, strongest
    // first in ring's list) wins over a client that lists weaker ones first.
    config.ignore_client_order = true;
    Ok((Arc::new(config), swap))
}

/// "TLSv1.3 TLS13_AES_256_GCM_SHA384" for logs, the envelope and Received:
/// (server and client connections alike).
pub fn describe(conn: &rustls::CommonState) -> String {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "TLS".to_string(),
    };
    match conn.negotiated_cipher_suite() {
        Some(suite) => format!("{version} {:?}", suite.suite()),
        None => version,
    }
}

/// What a server config offers, for `sluice debug listeners`: protocol
/// versions, cipher suites in the server's order of preference (it chooses:
/// `ignore_client_order`), and key exchange groups.
pub struct ServerOffer {
    pub versions: Vec<String>,
    pub suites: Vec<String>,
    pub groups: Vec<String>,
    pub server_order: bool,
}

pub fn server_offer(config: &ServerConfig) -> ServerOffer {
    let provider = config.crypto_provider();
    let versions: Vec<rustls::ProtocolVersion> =
        SERVER_VERSIONS.iter().map(|v| v.version).collect();
    ServerOffer {
        versions: versions.iter().map(|v| format!("{v:?}")).collect(),
        suites: provider
            .cipher_suites
            .iter()
            .filter(|s| versions.contains(&s.version().version))
            .map(|s| format!("{:?}", s.suite()))
            .collect(),
        groups: provider
            .kx_groups
            .iter()
            .map(|g| format!("{:?}", g.name()))
            .collect(),
        server_order: config.ignore_client_order,
    }
}
