//! DANE for outbound SMTP (RFC 7672) in the engine: when it applies to an MX
//! host, and the rustls certificate verifier that enforces it. The matching
//! itself is `sluice_policy::dane` (pure, unit-tested on generated chains).
//!
//! When DANE applies to a host ([`classify`], sans-IO):
//! - only with `dns.dnssec_validating` (otherwise no answer is secure, and
//!   DANE is off: the AD bit of an untrusted resolver proves nothing);
//! - only for MX hosts whose MX and address answers were all secure
//!   (`RouteHost::secure`; RFC 7672 §2.2.1–2.2.2);
//! - the TLSA RRset `_PORT._tcp.HOST` (PORT is `delivery.mx_port`, 25 in
//!   production) must itself be secure. Secure and with usable records: the
//!   server must authenticate with them ([`Dane::Records`]). Secure with none
//!   usable (only PKIX usages, unknown parameters): TLS is still mandatory but
//!   unauthenticated ([`Dane::Unusable`], RFC 7672 §2.2 — Postfix's
//!   "encrypt"). Absent (authenticated NXDOMAIN/NODATA) or insecure: DANE does
//!   not apply and the destination's other policy does ([`Dane::Off`]).
//! - A TLSA lookup that fails (SERVFAIL, as a validator answers for a bogus
//!   signature, or no answer) for a secure host makes that host unusable
//!   ([`Dane::LookupFailed`], RFC 7672 §2.2): it is skipped like a host that
//!   does not answer, never tried in clear.
//! - An MX host name that is an alias (a CNAME chain, secure since the host
//!   is): TLSA records are looked up at the fully expanded name first, then,
//!   when there are none there (absent or insecure), at the original name
//!   (RFC 7672 §2.2.2). Both names are reference identifiers for the
//!   certificate's name (DANE-TA; §3.2.2), wherever the records were found.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sluice_dns::Record;
use sluice_policy::dane::{self, DaneError, DaneMatch, Tlsa};

use super::tls_policy::{Basis, Level, TlsPolicy};

/// The TLSA owner name for an SMTP server on `port` (RFC 6698 §3, RFC 7672 §2.2.3).
pub fn tlsa_name(port: u16, host: &str) -> String {
    format!("_{port}._tcp.{}", host.trim_end_matches('.'))
}

/// What DANE says about one MX host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dane {
    /// DANE does not apply (why); the destination's configured policy does.
    Off(&'static str),
    /// Secure, usable TLSA records: the certificate must match them.
    /// `names`: the reference identifiers for DANE-TA's name check, the TLSA
    /// base domain first (the MX host name, and the name its CNAME chain
    /// expands to when it is an alias).
    Records {
        records: Arc<[Tlsa]>,
        names: Arc<[String]>,
    },
    /// A secure TLSA RRset without a usable record: TLS, unauthenticated.
    Unusable,
    /// The TLSA lookup of a secure host failed (at `owner`, why): do not use
    /// the host.
    LookupFailed { owner: String, why: String },
}

/// The TLSA lookup as [`classify`] needs it.
#[derive(Debug, Clone)]
pub enum TlsaAnswer {
    /// An answer: its AD bit as trusted (`Lookup::secure`) and its records
    /// (none for NXDOMAIN/NODATA).
    Answer { secure: bool, records: Vec<Tlsa> },
    /// No answer (the resolver's error).
    Failed(String),
}

impl TlsaAnswer {
    /// From the resolver's result.
    pub fn from_lookup(result: Result<sluice_dns::Lookup, sluice_dns::ResolveError>) -> TlsaAnswer {
        match result {
            Ok(lookup) => TlsaAnswer::Answer {
                secure: lookup.secure(),
                records: lookup
                    .records()
                    .iter()
                    .filter_map(|r| match r {
                        Record::Tlsa {
                            usage,
                            selector,
                            matching,
                            data,
                            ..
                        } => Some(Tlsa {
                            usage: *usage,
                            selector: *selector,
                            matching: *matching,
                            data: data.clone(),
                        }),
                        _ => None,
                    })
                    .collect(),
            },
            Err(e) => TlsaAnswer::Failed(e.to_string()),
        }
    }
}

/// Whether a TLSA lookup is worth making for a host: DANE can only apply to
/// a secure host behind a resolver declared validating.
pub fn applies(validating: bool, host_secure: bool) -> Result<(), &'static str> {
    if !validating {
        return Err("dns.dnssec_validating is off");
    }
    if !host_secure {
        return Err("MX or address records not DNSSEC-secure");
    }
    Ok(())
}

/// DANE's word on a host whose TLSA lookup at `owner` gave `answer` (see the
/// module doc); `names`: the reference identifiers usable records come with.
/// Call only when [`applies`] held.
pub fn classify(answer: TlsaAnswer, owner: &str, names: &[String]) -> Dane {
    match answer {
        TlsaAnswer::Failed(why) => Dane::LookupFailed {
            owner: owner.to_string(),
            why,
        },
        TlsaAnswer::Answer { secure: false, .. } => Dane::Off("TLSA records not DNSSEC-secure"),
        TlsaAnswer::Answer { records, .. } if records.is_empty() => Dane::Off("no TLSA records"),
        TlsaAnswer::Answer { records, .. } => {
            let mut usable: Vec<Tlsa> = Vec::new();
            for record in records {
                if record.is_usable() && !usable.contains(&record) {
                    usable.push(record);
                }
            }
            // DANE-EE first: it needs nothing but the leaf.
            usable.sort_by_key(|r| std::cmp::Reverse(r.usage));
            if usable.is_empty() {
                Dane::Unusable
            } else {
                Dane::Records {
                    records: usable.into(),
                    names: names.into(),
                }
            }
        }
    }
}

/// What DANE says about an MX host, looked up the way delivery does it (and
/// `sluice debug tls`): the TLSA records are asked for only when DANE can
/// apply (a validating resolver, a secure host, a policy above `none`).
pub async fn for_host(
    resolver: &sluice_dns::Resolver,
    host: &sluice_dns::RouteHost,
    port: u16,
    tls: &TlsPolicy,
) -> Dane {
    if tls.level == Level::None {
        return Dane::Off("TLS policy none");
    }
    if let Err(why) = applies(resolver.config().dnssec_validating, host.secure) {
        return Dane::Off(why);
    }
    let (bases, names) = tlsa_bases(&host.name, host.cname.as_deref());
    let mut dane = Dane::Off("no TLSA records");
    for base in bases {
        let owner = tlsa_name(port, &base);
        let answer =
            TlsaAnswer::from_lookup(resolver.lookup(&owner, sluice_dns::QueryType::Tlsa).await);
        // Records first found at the base put it first among the names.
        let mut ordered = vec![base.clone()];
        ordered.extend(names.iter().filter(|n| **n != base).cloned());
        dane = classify(answer, &owner, &ordered);
        if !matches!(dane, Dane::Off(_)) {
            break;
        }
    }
    dane
}

/// DANE for a smart host (a route's `host` under `tls = "dane"`): the host
/// resolved as an MX host would be (its addresses, whether they and any CNAME
/// chain are secure), then [`for_host`] at `_PORT._tcp.HOST` with the route's
/// port. An IP address has no TLSA records: DANE is off for it.
pub async fn for_smart_host(
    resolver: &sluice_dns::Resolver,
    host: &str,
    port: u16,
    tls: &TlsPolicy,
) -> (sluice_dns::RouteHost, Dane) {
    let resolved = resolver.resolve_named_host(host).await;
    if host.parse::<std::net::IpAddr>().is_ok() {
        return (resolved, Dane::Off("an IP address has no TLSA records"));
    }
    let dane = for_host(resolver, &resolved, port, tls).await;
    (resolved, dane)
}

/// Where to look for a secure host's TLSA records, in order, and the
/// reference identifiers (RFC 7672 §2.2.2, §3.2.2): for an alias, the
/// expanded name, then the MX host name as listed; both are names the
/// certificate may carry. Only called for a secure host, so the CNAME chain
/// that gave `cname` validated.
pub fn tlsa_bases(host: &str, cname: Option<&str>) -> (Vec<String>, Vec<String>) {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match cname.map(|c| c.trim_end_matches('.').to_ascii_lowercase()) {
        Some(target) if target != host => {
            let both = vec![target, host];
            (both.clone(), both)
        }
        _ => (vec![host.clone()], vec![host]),
    }
}

/// Why an MX host must not be dialled at all, if it must not: its TLSA
/// lookup failed (RFC 7672 §2.2), or the policy is mandatory DANE and DANE
/// does not authenticate it.
pub fn skip_reason(dane: &Dane, tls: &TlsPolicy, host: &str, port: u16) -> Option<String> {
    let tlsa = tlsa_name(port, host);
    match (dane, tls.level) {
        (Dane::LookupFailed { owner, why }, _) => {
            Some(format!("DANE: TLSA lookup {owner} failed: {why}"))
        }
        (Dane::Off(why), Level::Dane) => Some(format!(
            "TLS policy dane ({}): no DANE for {host}: {why}",
            tls.basis
        )),
        (Dane::Unusable, Level::Dane) => Some(format!(
            "TLS policy dane ({}): {tlsa} has no usable TLSA records",
            tls.basis
        )),
        _ => None,
    }
}

impl std::fmt::Display for Dane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dane::Off(why) => write!(f, "off ({why})"),
            Dane::Records { records, names } => {
                let list: Vec<String> = records.iter().map(Tlsa::presentation).collect();
                write!(
                    f,
                    "{} usable TLSA record(s): {}",
                    records.len(),
                    list.join(", ")
                )?;
                if names.len() > 1 {
                    write!(f, "; TLSA base {}, names {}", names[0], names.join(" "))?;
                }
                Ok(())
            }
            Dane::Unusable => f.write_str("secure TLSA records, none usable: TLS required"),
            Dane::LookupFailed { owner, why } => write!(f, "TLSA lookup {owner} failed: {why}"),
        }
    }
}

/// The policy DANE imposes on a session (RFC 7672 §2.2), which takes
/// precedence over the configured one (`tls_policy::select`): usable records →
/// `verify` against them; a secure set without usable records → `required`
/// (TLS, unauthenticated). None when DANE does not apply — and when the
/// configured level is `none`: an operator who turned TLS off for a
/// destination gets no TLS from DANE either; every other level (opportunistic
/// upwards) is raised to DANE's.
pub fn policy(dane: &Dane, configured: &TlsPolicy) -> Option<TlsPolicy> {
    if configured.level == Level::None {
        return None;
    }
    let level = match dane {
        Dane::Records { .. } => Level::Verify,
        Dane::Unusable => Level::Required,
        Dane::Off(_) | Dane::LookupFailed { .. } => return None,
    };
    Some(TlsPolicy {
        level,
        basis: Basis::Dane,
        implicit: configured.implicit,
    })
}

/// A rustls certificate verifier that accepts exactly the chains the host's
/// TLSA records allow (`sluice_policy::dane::verify`), with the MX host name as
/// the reference identifier for DANE-TA; handshake signatures are checked with
/// the provider's algorithms as usual.
#[derive(Debug)]
pub struct DaneVerifier {
    records: Arc<[Tlsa]>,
    names: Vec<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl DaneVerifier {
    /// `names`: the reference identifiers (the MX host name; RFC 7672 §3.2.2).
    pub fn new(
        records: Arc<[Tlsa]>,
        names: Vec<String>,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> DaneVerifier {
        DaneVerifier {
            records,
            names,
            provider,
        }
    }

    /// The verdict on a chain (leaf first), with how it matched.
    pub fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<DaneMatch, DaneError> {
        let mut chain = Vec::with_capacity(intermediates.len() + 1);
        chain.push(CertificateDer::from(end_entity.as_ref()));
        chain.extend(
            intermediates
                .iter()
                .map(|c| CertificateDer::from(c.as_ref())),
        );
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        dane::verify(&chain, &self.records, &names, now)
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now)
            .map(|_| ServerCertVerified::assertion())
            .map_err(|e| rustls::Error::General(format!("DANE: {e}")))
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
#[path = "dane_tests.rs"]
mod tests;
