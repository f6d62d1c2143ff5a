//! One outbound SMTP/LMTP connection: the I/O loop around the sans-IO client
//! session. Connects to a host's addresses in order, runs greeting, EHLO,
//! STARTTLS under the destination's TLS policy (`tls_policy.rs` decides) and
//! AUTH, then runs transactions until the caller quits. Each stage has its own
//! timeout.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use super::config::{DeliverySection, RouteConfig};
use super::dane::{Dane, DaneVerifier};
use super::tls_policy::{self, Basis, Failure, Handshake, TlsPolicy, Verdict};
use crate::smtp::client::{
    BodyMode, ClientConfig, ClientEvent, ClientSession, OutboundMessage, Reply, Stage,
};
use crate::time::within;
use crate::tls::TlsError;

/// Why a connection attempt or a session failed.
#[derive(Debug, Clone)]
pub struct SessionFailure {
    pub reply: Reply,
    /// Whether to try the next address or host (connect errors, 4xx/5xx greetings).
    pub try_next: bool,
    /// The TLS policy the session failed under, when it failed one (for the
    /// delivery log: DANE's policy is decided per host, not per site).
    pub tls_policy: Option<&'static str>,
    /// A REQUIRETLS session refused on REQUIRETLS's terms (no STARTTLS,
    /// certificate not verified, REQUIRETLS not offered): the host cannot
    /// take the message, as opposed to a failure that may pass.
    pub requiretls_refused: bool,
}

impl SessionFailure {
    fn local(code: u16, esc: &str, text: String, try_next: bool) -> SessionFailure {
        SessionFailure {
            reply: Reply::local(code, esc, &text),
            try_next,
            tls_policy: None,
            requiretls_refused: false,
        }
    }
}

/// TLS for outbound sessions. The handshake accepts any certificate (so a
/// session that fails `verify` can still say QUIT, and opportunistic TLS
/// beats plaintext); whether the chain verifies for the host name — against
/// the web PKI roots plus `delivery.tls_ca_file` — is checked right after it,
/// recorded, and given to [`tls_policy::decide`].
pub struct OutboundTlsConfig {
    accept_any: Arc<rustls::ClientConfig>,
    /// The same with a route's client certificate (`route.NAME.tls_client_cert`).
    with_client_cert: HashMap<String, Arc<rustls::ClientConfig>>,
    verifier: Arc<rustls::client::WebPkiServerVerifier>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl OutboundTlsConfig {
    /// `ca_file`: PEM certificates trusted in addition to the web PKI roots;
    /// `routes`: the routes, whose client certificates are loaded here.
    pub fn new(
        ca_file: Option<&Path>,
        routes: &BTreeMap<String, RouteConfig>,
    ) -> Result<OutboundTlsConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            let bad = |message: String| TlsError::Cert {
                path: path.display().to_string(),
                message,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no certificate found".into()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
            }
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let builder = || {
            Ok::<_, TlsError>(
                rustls::ClientConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AcceptAny(provider.clone()))),
            )
        };
        let mut with_client_cert = HashMap::new();
        for (name, route) in routes {
            let (Some(cert), Some(key)) = (&route.tls_client_cert, &route.tls_client_key) else {
                continue;
            };
            // Checks that the key fits the certificate, with the file names.
            crate::tls::certified_key(cert, key)?;
            let (chain, key_der) = crate::tls::chain_and_key(cert, key)?;
            let mut config = builder()?
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| TlsError::Key {
                    path: key.display().to_string(),
                    message: e.to_string(),
                })?;
            config.resumption = rustls::client::Resumption::disabled();
            with_client_cert.insert(name.clone(), Arc::new(config));
        }
        // No session resumption: the handshake accepts any certificate and
        // the policy's check (web PKI, DANE, MTA-STS) runs on the chain
        // afterwards. A resumed session presents no certificate; rustls would
        // hand back the chain of the session it resumes, which may have been
        // made under a weaker policy (opportunistic) for the same name. Every
        // session is a full handshake whose chain is checked (Postfix's
        // client keeps no session cache by default either).
        let mut accept_any = builder()?.with_no_client_auth();
        accept_any.resumption = rustls::client::Resumption::disabled();
        Ok(OutboundTlsConfig {
            accept_any: Arc::new(accept_any),
            with_client_cert,
            verifier,
            provider,
        })
    }

    /// A client config that verifies the server in the handshake (web PKI
    /// roots plus `delivery.tls_ca_file`, the name asked for): for HTTPS
    /// fetches such as MTA-STS policies.
    pub fn verifying_client(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        Ok(Arc::new(
            rustls::ClientConfig::builder_with_provider(self.provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
                .with_webpki_verifier(self.verifier.clone())
                .with_no_client_auth(),
        ))
    }

    /// The client config for a connection on `route` (its client certificate,
    /// if it has one).
    fn client_config(&self, route: Option<&str>) -> Arc<rustls::ClientConfig> {
        route
            .and_then(|r| self.with_client_cert.get(r))
            .unwrap_or(&self.accept_any)
            .clone()
    }

    /// Whether the peer's chain satisfies the host's TLSA records
    /// ([`DaneVerifier`], with the host's reference identifiers: its name, and
    /// the name its CNAME chain expands to), or why not.
    fn verify_dane(
        &self,
        conn: &rustls::ClientConnection,
        records: &Arc<[sluice_policy::dane::Tlsa]>,
        names: &[String],
    ) -> Result<(), String> {
        let Some((end, rest)) = conn.peer_certificates().and_then(|c| c.split_first()) else {
            return Err("no certificate presented".into());
        };
        let verifier = DaneVerifier::new(records.clone(), names.to_vec(), self.provider.clone());
        match verifier.check(end, rest, UnixTime::now()) {
            Ok(found) => {
                tracing::debug!(names = ?names, matched = ?found, "DANE: certificate matches TLSA");
                Ok(())
            }
            Err(e) => Err(format!("DANE: {e}")),
        }
    }

    fn verify(&self, conn: &rustls::ClientConnection, name: &ServerName<'_>) -> Result<(), String> {
        let Some((end, rest)) = conn.peer_certificates().and_then(|c| c.split_first()) else {
            return Err("no certificate presented".into());
        };
        self.verifier
            .verify_server_cert(end, rest, name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Accepts any certificate but still checks handshake signatures properly.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<futures_rustls::client::TlsStream<TcpStream>>),
    Gone,
}

impl Stream {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf).await,
            Stream::Tls(s) => s.read(buf).await,
            Stream::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(data).await,
            Stream::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Stream::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
}

/// What the connection needs to know about where it goes.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Host name (for TLS SNI and logs).
    pub host: String,
    pub addr: SocketAddr,
    pub lmtp: bool,
    /// The destination's configured TLS policy.
    pub tls: TlsPolicy,
    /// What DANE says about this host (its TLSA records, if they apply).
    pub dane: Dane,
    /// The destination's MTA-STS mode, when a policy applies (`mta_sts.rs`).
    pub mta_sts: Option<sluice_policy::mta_sts::Mode>,
    pub auth: Option<(String, String)>,
    /// Local address to connect from (rules' `source_ip`); None = the kernel picks.
    pub source_ip: Option<IpAddr>,
    /// The configured route (host targets), whose client certificate TLS presents.
    pub route: Option<String>,
    /// What the messages of the site ask (RFC 8689; `tls_policy::for_message`).
    pub message_tls: tls_policy::MessageTls,
    /// Where this session is counted for TLS reporting (MX routes of
    /// destinations that publish `_smtp._tls`).
    pub tls_rpt: Option<std::rc::Rc<super::tls_rpt::Target>>,
}

pub struct Connection {
    stream: Stream,
    client: ClientSession,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    pub host: String,
    pub ip: IpAddr,
    /// The local address the connection was bound to, when the rules chose one.
    pub source_ip: Option<IpAddr>,
    /// "TLSv1.3 TLS13_AES_256_GCM_SHA384" once TLS is up.
    pub tls: Option<String>,
    pub tls_verified: bool,
    /// The policy the session ran under.
    pub tls_policy: TlsPolicy,
    /// What its messages ask (REQUIRETLS, TLS-Required: No).
    pub message_tls: tls_policy::MessageTls,
    /// The configured route (client certificate), if any.
    route: Option<String>,
    lmtp: bool,
    timeouts: Timeouts,
    /// DANE's word on the host (the TLSA records verification uses).
    dane: Dane,
    /// An MTA-STS policy in testing mode applies: failures it would see are
    /// logged and counted, the session goes on as configured.
    sts_testing: bool,
    tls_rpt: Option<std::rc::Rc<super::tls_rpt::Target>>,
    /// What the connection counts against (`LimitKey::as_key`: the host, or
    /// `provider:NAME|IP`), for the log.
    pub limit_key: String,
}

#[derive(Debug, Clone, Copy)]
struct Timeouts {
    greeting: Duration,
    ehlo: Duration,
    starttls: Duration,
    mail: Duration,
    rcpt: Duration,
    data: Duration,
    data_end: Duration,
}

impl Timeouts {
    fn for_stage(&self, stage: Stage) -> Duration {
        match stage {
            Stage::Greeting => self.greeting,
            Stage::Ehlo | Stage::Auth | Stage::Rset | Stage::Quit | Stage::Idle => self.ehlo,
            Stage::StartTls => self.starttls,
            Stage::Mail => self.mail,
            Stage::Rcpt => self.rcpt,
            Stage::Data => self.data,
            Stage::DataEnd => self.data_end,
        }
    }
}

impl Connection {
    /// Connects and runs the session up to "ready for MAIL".
    pub async fn open(
        endpoint: &Endpoint,
        cfg: &DeliverySection,
        ehlo_name: &str,
        tls: &OutboundTlsConfig,
    ) -> Result<Connection, SessionFailure> {
        let stage_err = |what: &str, e: String| {
            SessionFailure::local(
                451,
                "4.4.1",
                format!("{what} {} [{}]: {e}", endpoint.host, endpoint.addr),
                true,
            )
        };
        let tcp = match connect_tcp(endpoint.addr, endpoint.source_ip, cfg.connect_timeout.0).await
        {
            Ok(s) => s,
            Err(e) => {
                if let (std::io::ErrorKind::AddrNotAvailable, Some(ip)) =
                    (e.kind(), endpoint.source_ip)
                {
                    // Not an address of this host (any more): pools skip it.
                    super::pools::source_unavailable(ip, super::now_ms());
                }
                return Err(stage_err("connect to", e.to_string()));
            }
        };
        let _ = tcp.set_nodelay(true);
        // A peer that stops reading (its window full) would block a write
        // forever; no progress for data_timeout fails the write instead.
        if !cfg.data_timeout.0.is_zero() {
            let _ = tcp.set_write_timeout(Some(cfg.data_timeout.0));
        }
        // DANE (looked up per MX host by the site) and an enforced MTA-STS
        // policy (per destination) take precedence over the configured policy
        // here; then the message's REQUIRETLS or TLS-Required: No applies.
        let policy = tls_policy::for_message(
            tls_policy::select(
                super::dane::policy(&endpoint.dane, &endpoint.tls),
                super::mta_sts::policy(endpoint.mta_sts, &endpoint.tls),
                endpoint.tls.clone(),
            ),
            endpoint.message_tls,
        );
        let sts_testing = endpoint.mta_sts == Some(sluice_policy::mta_sts::Mode::Testing)
            && policy.basis != Basis::Dane;
        let mut conn = Connection {
            stream: Stream::Plain(tcp),
            client: ClientSession::new(ClientConfig {
                ehlo_name: ehlo_name.to_string(),
                lmtp: endpoint.lmtp,
                tls: policy.level,
                implicit_tls: policy.implicit,
                auth: endpoint.auth.clone(),
                message_tls: endpoint.message_tls,
            }),
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
            host: endpoint.host.clone(),
            ip: endpoint.addr.ip(),
            source_ip: endpoint.source_ip,
            tls: None,
            tls_verified: false,
            tls_policy: policy,
            message_tls: endpoint.message_tls,
            route: endpoint.route.clone(),
            dane: endpoint.dane.clone(),
            sts_testing,
            tls_rpt: endpoint.tls_rpt.clone(),
            limit_key: String::new(),
            lmtp: endpoint.lmtp,
            timeouts: Timeouts {
                greeting: cfg.greeting_timeout.0,
                ehlo: cfg.ehlo_timeout.0,
                starttls: cfg.starttls_timeout.0,
                mail: cfg.mail_timeout.0,
                rcpt: cfg.rcpt_timeout.0,
                data: cfg.data_timeout.0,
                data_end: cfg.data_end_timeout.0,
            },
        };
        if conn.tls_policy.implicit {
            conn.start_tls(tls, cfg.starttls_timeout.0).await?;
        }
        loop {
            match conn.next_event().await? {
                ClientEvent::Ready => {
                    if conn.sts_testing && conn.tls.is_none() {
                        conn.sts_testing_failure("no_starttls", "no TLS session");
                    }
                    crate::metrics::outbound_tls_policy(
                        conn.tls_policy.name(),
                        tls_policy::success_label(conn.tls.is_some(), conn.tls_verified),
                    );
                    conn.report_session();
                    return Ok(conn);
                }
                ClientEvent::StartTls => {
                    conn.start_tls(tls, cfg.starttls_timeout.0).await?;
                    conn.client.tls_established();
                }
                ClientEvent::Failed(reply) => {
                    if let Some(failure) = conn.client.tls_failure().cloned() {
                        return Err(conn.policy_failure(failure).await);
                    }
                    // A refused login is our configuration's fault, not the
                    // recipients': defer (Postfix's smtp_sasl_auth_soft_bounce).
                    let reply = if conn.client.stage() == Stage::Auth && reply.is_permanent() {
                        Reply::local(
                            454,
                            "4.7.0",
                            &format!("{} refused our credentials: {reply}", endpoint.host),
                        )
                    } else {
                        reply
                    };
                    return Err(SessionFailure {
                        reply,
                        try_next: true,
                        tls_policy: None,
                        requiretls_refused: false,
                    });
                }
                other => {
                    return Err(SessionFailure::local(
                        451,
                        "4.5.0",
                        format!("unexpected client state while opening session: {other:?}"),
                        true,
                    ))
                }
            }
        }
    }

    /// The TLS handshake (after the 220 to STARTTLS, or first for implicit
    /// TLS), then the policy's verdict on it.
    async fn start_tls(
        &mut self,
        tls: &OutboundTlsConfig,
        timeout: Duration,
    ) -> Result<(), SessionFailure> {
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err(self
                .policy_failure(Failure::Handshake("stream not plain".into()))
                .await);
        };
        let name = match self.host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => match ServerName::try_from(self.host.clone()) {
                Ok(name) => name,
                Err(e) => {
                    let why = format!("{} is not a TLS server name: {e}", self.host);
                    return Err(self.policy_failure(Failure::Handshake(why)).await);
                }
            },
        };
        let connector =
            futures_rustls::TlsConnector::from(tls.client_config(self.route.as_deref()));
        let why = match within(timeout, connector.connect(name.clone(), tcp)).await {
            Some(Ok(stream)) => {
                let session = stream.get_ref().1;
                let verified = match &self.dane {
                    Dane::Records { records, names } if self.tls_policy.basis == Basis::Dane => {
                        tls.verify_dane(session, records, names)
                    }
                    // Mandatory DANE without records never verifies (the
                    // host should not have been dialled at all).
                    _ if self.tls_policy.level == tls_policy::Level::Dane => {
                        Err("DANE: no usable TLSA records".to_string())
                    }
                    _ => tls.verify(session, &name),
                };
                crate::metrics::outbound_tls(Ok(verified.is_ok()));
                if let (true, Err(why)) = (self.sts_testing, &verified) {
                    self.sts_testing_failure("not_verified", why);
                }
                self.tls = Some(crate::tls::describe(session));
                self.stream = Stream::Tls(Box::new(stream));
                // Bytes read before the handshake belong to the plaintext session.
                self.start = 0;
                self.end = 0;
                let handshake = Handshake::Done {
                    verified: verified.as_ref().map(|_| ()).map_err(String::as_str),
                };
                match tls_policy::decide(self.tls_policy.level, true, handshake) {
                    Verdict::Proceed { verified } => {
                        self.tls_verified = verified;
                        return Ok(());
                    }
                    Verdict::Defer(failure) => return Err(self.policy_failure(failure).await),
                    // Not verdicts on a finished handshake.
                    Verdict::StartTls | Verdict::Cleartext => {
                        return Err(self
                            .policy_failure(Failure::Handshake("no verdict".into()))
                            .await)
                    }
                }
            }
            Some(Err(e)) => e.to_string(),
            None => "handshake timed out".to_string(),
        };
        crate::metrics::outbound_tls(Err(()));
        if self.sts_testing {
            self.sts_testing_failure("handshake_failed", &why);
        }
        let failure = match tls_policy::decide(self.tls_policy.level, true, Handshake::Failed(&why))
        {
            Verdict::Defer(f) => f,
            _ => Failure::Handshake(why),
        };
        Err(self.policy_failure(failure).await)
    }

    /// What an MTA-STS policy in testing mode would have refused (RFC 8461
    /// §5: report, deliver anyway): logged and counted.
    fn sts_testing_failure(&self, result: &'static str, why: &str) {
        crate::metrics::mta_sts_testing_failure(result);
        tracing::info!(
            host = %self.host,
            ip = %self.ip,
            result,
            why,
            tls_policy = self.tls_policy.name(),
            "MTA-STS (testing): the session fails the policy; delivering as configured"
        );
    }

    /// A session that failed its TLS policy: counted, QUIT said where the
    /// stream still works (never after a failed handshake, nor before the
    /// greeting of an implicit-TLS session), and every recipient deferred
    /// with the policy's 4.7.x reply. The next host is tried.
    async fn policy_failure(&mut self, failure: Failure) -> SessionFailure {
        crate::metrics::outbound_tls_policy(self.tls_policy.name(), failure.label());
        let reply = failure.reply(&self.tls_policy, &self.host);
        // A handshake that broke off may work next time; the rest are the
        // host's answer to REQUIRETLS.
        let requiretls_refused =
            self.message_tls.requires_tls() && !matches!(failure, Failure::Handshake(_));
        if requiretls_refused {
            crate::metrics::requiretls_refused(failure.label());
        }
        if let Some(target) = &self.tls_rpt {
            let (basis, level) = (&self.tls_policy.basis, self.tls_policy.level);
            match super::tls_rpt::result_of(&failure, basis, level) {
                Some(result) => super::tls_rpt_io::record_failure(
                    target,
                    result,
                    Some(self.ip),
                    &reply.to_string(),
                ),
                None => super::tls_rpt_io::record_success(target),
            }
        }
        tracing::info!(
            host = %self.host,
            ip = %self.ip,
            tls_policy = self.tls_policy.name(),
            tls_policy_from = %self.tls_policy.basis,
            requiretls = self.message_tls.requires_tls(),
            reply = %reply,
            "TLS policy not met"
        );
        if failure.quit() && self.client.stage() != Stage::Greeting {
            self.client.quit();
            let _ = within(Duration::from_secs(2), self.next_event()).await;
        }
        SessionFailure {
            reply,
            try_next: true,
            tls_policy: Some(self.tls_policy.name()),
            requiretls_refused,
        }
    }

    /// Counts a session that met its policy for TLS reporting: TLS up is a
    /// success; clear text (opportunistic, STARTTLS missing or refused) is
    /// `starttls-not-supported`. Sessions under `none` tried no TLS.
    fn report_session(&self) {
        let Some(target) = &self.tls_rpt else {
            return;
        };
        if self.tls.is_some() {
            super::tls_rpt_io::record_success(target);
        } else if self.tls_policy.level != tls_policy::Level::None {
            super::tls_rpt_io::record_failure(
                target,
                super::tls_rpt::ResultType::StarttlsNotSupported,
                Some(self.ip),
                "STARTTLS not offered or refused; sent in clear text",
            );
        }
    }

    /// Writes what the client queued, then reads until the client reports an event.
    async fn next_event(&mut self) -> Result<ClientEvent, SessionFailure> {
        loop {
            if !self.client.output().is_empty() {
                let out = std::mem::take(&mut self.client_output());
                if let Err(e) = self.stream.write_all(&out).await {
                    return Err(self.write_failure(e));
                }
            }
            while self.start < self.end {
                let (used, event) = self.client.receive(&self.buf[self.start..self.end]);
                self.start += used;
                if !matches!(event, ClientEvent::Read) {
                    if matches!(event, ClientEvent::StartTls) {
                        self.start = self.end;
                    }
                    return Ok(event);
                }
            }
            if !self.client.output().is_empty() {
                continue;
            }
            self.start = 0;
            self.end = 0;
            // The timeout of the reply awaited, not of the last command sent.
            let stage = self.client.awaited_stage();
            let timeout = self.timeouts.for_stage(stage);
            match within(timeout, self.stream.read(&mut self.buf)).await {
                Some(Ok(0)) => return Err(self.io_failure("connection closed by server".into())),
                Some(Ok(n)) => self.end = n,
                Some(Err(e)) => return Err(self.io_failure(e.to_string())),
                None => {
                    return Err(self.io_failure(format!("timeout in {stage:?} stage")));
                }
            }
        }
    }

    fn client_output(&mut self) -> Vec<u8> {
        let out = self.client.output().to_vec();
        self.client.clear_output();
        out
    }

    fn write_failure(&self, e: std::io::Error) -> SessionFailure {
        if e.kind() == std::io::ErrorKind::TimedOut {
            return self.io_failure(format!(
                "write timeout in {:?} stage (the server stopped reading)",
                self.client.stage()
            ));
        }
        self.io_failure(e.to_string())
    }

    fn io_failure(&self, what: String) -> SessionFailure {
        SessionFailure::local(
            451,
            "4.4.2",
            format!("{} [{}]: {what}", self.host, self.ip),
            false,
        )
    }

    /// Runs one transaction. `body` is the stored message. Returns one reply per
    /// recipient, or a session failure (the connection is then unusable).
    pub async fn transaction(
        &mut self,
        msg: &OutboundMessage,
        body: &[u8],
    ) -> Result<Vec<Reply>, SessionFailure> {
        let bdat_len = crate::smtp::body_out::bdat_len(body);
        let first = match self.client.send(msg, bdat_len) {
            Ok(ev) => ev,
            Err(unsendable) => {
                let reply = unsendable.reply();
                return Ok(vec![reply; msg.recipients.len()]);
            }
        };
        let mut event = match first {
            Some(ev) => ev,
            None => self.next_event().await?,
        };
        loop {
            match event {
                ClientEvent::SendBody(mode) => {
                    let mut out = self.client_output();
                    match mode {
                        BodyMode::Bdat => crate::smtp::body_out::encode_bdat(body, &mut out),
                        BodyMode::Data => crate::smtp::body_out::encode_data(body, &mut out),
                    }
                    if let Err(e) = self.stream.write_all(&out).await {
                        return Err(self.write_failure(e));
                    }
                    event = self.next_event().await?;
                }
                ClientEvent::Done(result) => return Ok(result.recipients),
                ClientEvent::Failed(reply) => {
                    return Err(SessionFailure {
                        reply,
                        try_next: false,
                        tls_policy: None,
                        requiretls_refused: false,
                    })
                }
                other => {
                    return Err(SessionFailure::local(
                        451,
                        "4.5.0",
                        format!("unexpected client event {other:?}"),
                        false,
                    ))
                }
            }
        }
    }

    /// Whether the peer offered DSN (RFC 3461): then NOTIFY and ORCPT went with
    /// each RCPT and success notices are the peer's job, not ours.
    pub fn peer_dsn(&self) -> bool {
        self.client.capabilities().dsn
    }

    /// Whether this is an LMTP session (final delivery, not relaying).
    pub fn lmtp(&self) -> bool {
        self.lmtp
    }

    /// QUIT, best effort and briefly.
    pub async fn quit(mut self) {
        self.client.quit();
        let _ = within(Duration::from_secs(2), self.next_event()).await;
    }
}

/// Opens a TCP connection within `timeout`, from `source` when given.
///
/// glommio 0.9's `TcpStream::connect` creates its socket internally, so it
/// cannot bind one first. With a source address the socket is made with
/// socket2: bound, connected non-blocking (EINPROGRESS), then handed to glommio
/// (`TcpStream::from(socket2::Socket)`). Completion is awaited with a zero-length
/// send: Linux answers EAGAIN while the handshake is under way, so glommio polls
/// for writability, and the retried send returns 0 once connected or the
/// connect error (ECONNREFUSED …) if it failed.
pub async fn connect_tcp(
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
    let Some(source) = source else {
        return within(timeout, TcpStream::connect(addr))
            .await
            .ok_or_else(timed_out)?
            .map_err(std::io::Error::from);
    };
    if source.is_ipv4() != addr.is_ipv4() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("source address {source} is not of the same family as {addr}"),
        ));
    }
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .map_err(|e| std::io::Error::new(e.kind(), format!("bind to {source}: {e}")))?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let mut stream = TcpStream::from(socket);
    within(timeout, stream.write(&[]))
        .await
        .ok_or_else(timed_out)??;
    // Connected for sure only if the peer address is known.
    stream.peer_addr().map_err(std::io::Error::from)?;
    Ok(stream)
}

/// The relay's own outbound TLS steps, for the handshake benchmark
/// (bench/benches/tls_handshake.rs): the client config a connection on
/// `route` uses, and the verification every TLS session runs after its
/// handshake.
pub mod bench_api {
    use super::*;

    pub fn client_config(
        tls: &OutboundTlsConfig,
        route: Option<&str>,
    ) -> Arc<rustls::ClientConfig> {
        tls.client_config(route)
    }

    pub fn verify(
        tls: &OutboundTlsConfig,
        conn: &rustls::ClientConnection,
        name: &ServerName<'_>,
    ) -> Result<(), String> {
        tls.verify(conn, name)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;
    use std::net::TcpListener;

    use glommio::{LocalExecutorBuilder, Placement};

    use super::*;

    fn block_on<T>(fut: impl std::future::Future<Output = T>) -> T {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(512 * 1024)
            .make()
            .expect("glommio executor")
            .run(fut)
    }

    #[test]
    fn connects_from_the_chosen_source_address() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let mut peers = Vec::new();
            for _ in 0..2 {
                let (mut s, peer) = listener.accept().expect("accept");
                let mut b = [0u8; 4];
                let _ = s.read(&mut b);
                peers.push(peer.ip());
            }
            peers
        });
        let (from_source, default_local) = block_on(async move {
            let source: IpAddr = "127.0.0.3".parse().expect("ip");
            let s = connect_tcp(addr, Some(source), Duration::from_secs(5))
                .await
                .expect("connect from 127.0.0.3");
            let local = s.local_addr().expect("local").ip();
            let plain = connect_tcp(addr, None, Duration::from_secs(5))
                .await
                .expect("connect");
            let plain_local = plain.local_addr().expect("local").ip();
            drop((s, plain));
            (local, plain_local)
        });
        assert_eq!(from_source, "127.0.0.3".parse::<IpAddr>().unwrap());
        assert_eq!(default_local, "127.0.0.1".parse::<IpAddr>().unwrap());
        let peers = server.join().expect("server");
        assert_eq!(peers[0], "127.0.0.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn refused_and_mismatched_sources_fail_cleanly() {
        // A port nobody listens on: bind then drop to get one.
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("listen")
            .local_addr()
            .expect("addr")
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let (refused, family, bad_bind) = block_on(async move {
            let src: IpAddr = "127.0.0.2".parse().expect("ip");
            let refused = connect_tcp(addr, Some(src), Duration::from_secs(5)).await;
            let v6: IpAddr = "::1".parse().expect("ip");
            let family = connect_tcp(addr, Some(v6), Duration::from_secs(5)).await;
            // 192.0.2.1 (TEST-NET) is not an address of this host: bind fails
            // before any packet is sent.
            let foreign: IpAddr = "192.0.2.1".parse().expect("ip");
            let bad_bind = connect_tcp(addr, Some(foreign), Duration::from_secs(5)).await;
            (
                refused.err().map(|e| e.kind()),
                family.err().map(|e| e.kind()),
                bad_bind.err().map(|e| e.to_string()),
            )
        });
        assert_eq!(refused, Some(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(family, Some(std::io::ErrorKind::InvalidInput));
        let msg = bad_bind.expect("bind error");
        assert!(msg.contains("bind to 192.0.2.1"), "{msg}");
    }

    /// Two handshakes with the same server over memory; the kind of the second.
    fn second_handshake(client: Arc<rustls::ClientConfig>) -> rustls::HandshakeKind {
        let cert = rcgen::generate_simple_self_signed(vec!["mx.example.net".to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let server = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap(),
        );
        let mut kind = None;
        for _ in 0..2 {
            let name = ServerName::try_from("mx.example.net").unwrap();
            let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
            let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
            for _ in 0..20 {
                let mut buf = Vec::new();
                c.write_tls(&mut buf).unwrap();
                s.read_tls(&mut buf.as_slice()).unwrap();
                s.process_new_packets().unwrap();
                let mut buf = Vec::new();
                s.write_tls(&mut buf).unwrap();
                c.read_tls(&mut buf.as_slice()).unwrap();
                c.process_new_packets().unwrap();
                if !c.is_handshaking() && !s.is_handshaking() && !s.wants_write() {
                    break;
                }
            }
            assert!(!c.is_handshaking());
            kind = c.handshake_kind();
        }
        kind.expect("handshake done")
    }

    #[test]
    fn outbound_sessions_are_never_resumed() {
        let tls = OutboundTlsConfig::new(None, &BTreeMap::new()).unwrap();
        assert_eq!(
            second_handshake(tls.client_config(None)),
            rustls::HandshakeKind::Full,
            "a resumed session would skip the certificate the policy checks"
        );
        // The same config with rustls' default resumption does resume: the
        // check above can fail.
        let mut resuming = (*tls.client_config(None)).clone();
        resuming.resumption = rustls::client::Resumption::default();
        assert_eq!(
            second_handshake(Arc::new(resuming)),
            rustls::HandshakeKind::Resumed
        );
    }
}
