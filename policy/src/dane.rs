//! DANE for SMTP (RFC 7672, with the terms of RFC 6698 and RFC 7218): does the
//! certificate chain a server presented satisfy the TLSA records published for
//! it? Pure: records, chain, reference names and the time come in, a verdict
//! goes out. The engine wraps it in a rustls certificate verifier and decides
//! when DANE applies (secure MX and address answers, a secure TLSA RRset).
//!
//! - Usable records: DANE-TA(2) and DANE-EE(3), selector Cert(0) or SPKI(1),
//!   matching Full(0), SHA2-256(1) or SHA2-512(2), with data of the right
//!   length. PKIX-TA(0)/PKIX-EE(1) are unusable in SMTP (RFC 7672 §3.1.3), as
//!   is anything unknown; unusable records are ignored, and a set with none
//!   usable is [`DaneError::NoUsableRecords`] (the caller still insists on TLS).
//! - DANE-EE: the leaf certificate (or its key) matches; names and validity
//!   dates are not checked (RFC 7672 §3.1.1).
//! - DANE-TA: some certificate the server sent matches, and the chain really
//!   leads from the leaf up to it: every signature along the path is verified
//!   by webpki with the matched certificate as the only trust anchor, validity
//!   dates and the server-auth EKU (when present) are checked, and the leaf must
//!   be valid for one of the reference names (the TLSA base domain and the MX
//!   host name, RFC 7672 §3.2.2), wildcards included. For a `2 1 0` record
//!   (the anchor's whole public key) the anchor certificate may be absent from
//!   the chain (RFC 7672 §3.1.2): the key itself anchors the topmost
//!   certificate's issuer. A TA record that matches the leaf itself makes the
//!   leaf its own anchor: only its name is checked.
//!
//! Names are matched against subjectAltName dNSName entries only (webpki
//! ignores the subject CN), as RFC 6125 recommends and current CAs issue.

use ring::digest;
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};

/// One TLSA record's fields (RFC 6698 §2.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

pub const USAGE_PKIX_TA: u8 = 0;
pub const USAGE_PKIX_EE: u8 = 1;
pub const USAGE_DANE_TA: u8 = 2;
pub const USAGE_DANE_EE: u8 = 3;
pub const SELECTOR_CERT: u8 = 0;
pub const SELECTOR_SPKI: u8 = 1;
pub const MATCHING_FULL: u8 = 0;
pub const MATCHING_SHA256: u8 = 1;
pub const MATCHING_SHA512: u8 = 2;

impl Tlsa {
    /// Usable by an SMTP client (RFC 7672 §3.1): usage 2 or 3 with a known
    /// selector and matching type and data of a fitting length.
    pub fn is_usable(&self) -> bool {
        let usage_ok = matches!(self.usage, USAGE_DANE_TA | USAGE_DANE_EE);
        let selector_ok = matches!(self.selector, SELECTOR_CERT | SELECTOR_SPKI);
        let data_ok = match self.matching {
            MATCHING_FULL => !self.data.is_empty(),
            MATCHING_SHA256 => self.data.len() == 32,
            MATCHING_SHA512 => self.data.len() == 64,
            _ => false,
        };
        usage_ok && selector_ok && data_ok
    }

    /// Whether this record's selector and matching type applied to `cert`
    /// give the record's data. False for a certificate that cannot be parsed
    /// (selector SPKI) or an unknown selector or matching type.
    pub fn matches(&self, cert: &[u8]) -> bool {
        let selected = match self.selector {
            SELECTOR_CERT => cert,
            SELECTOR_SPKI => match parse_cert(cert) {
                Some(fields) => fields.spki,
                None => return false,
            },
            _ => return false,
        };
        match self.matching {
            MATCHING_FULL => selected == self.data.as_slice(),
            MATCHING_SHA256 => digest::digest(&digest::SHA256, selected).as_ref() == self.data,
            MATCHING_SHA512 => digest::digest(&digest::SHA512, selected).as_ref() == self.data,
            _ => false,
        }
    }

    /// "3 1 1 <hex>" for logs.
    pub fn presentation(&self) -> String {
        let hex: String = self.data.iter().map(|b| format!("{b:02x}")).collect();
        format!("{} {} {} {hex}", self.usage, self.selector, self.matching)
    }
}

/// How a chain satisfied the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaneMatch {
    /// A DANE-EE record matched the leaf.
    EndEntity { record: Tlsa },
    /// A DANE-TA record matched the certificate at `depth` (0 = the leaf; the
    /// chain's length for a bare `2 1 0` key), the path to it verified and the
    /// leaf is valid for `name`.
    TrustAnchor {
        record: Tlsa,
        depth: usize,
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DaneError {
    #[error("no usable TLSA records (only PKIX usages or unknown parameters)")]
    NoUsableRecords,
    #[error("the server sent no certificate")]
    NoCertificate,
    #[error("no TLSA record matches the server's certificate chain")]
    NoMatch,
    #[error("TLSA {record} matched a certificate at depth {depth}, but the chain does not verify up to it: {reason}")]
    Chain {
        record: String,
        depth: usize,
        reason: String,
    },
    #[error("TLSA {record} verified the chain, but the certificate is not valid for {names}")]
    Name { record: String, names: String },
}

/// Checks `chain` (leaf first, as the server sent it) against `records`, with
/// `names` as the reference identifiers for DANE-TA.
pub fn verify(
    chain: &[CertificateDer<'_>],
    records: &[Tlsa],
    names: &[&str],
    now: UnixTime,
) -> Result<DaneMatch, DaneError> {
    let usable: Vec<&Tlsa> = records.iter().filter(|r| r.is_usable()).collect();
    if usable.is_empty() {
        return Err(DaneError::NoUsableRecords);
    }
    let Some(leaf) = chain.first() else {
        return Err(DaneError::NoCertificate);
    };

    // DANE-EE first: cheapest, and it needs nothing but the leaf.
    if let Some(record) = usable
        .iter()
        .find(|r| r.usage == USAGE_DANE_EE && r.matches(leaf.as_ref()))
    {
        return Ok(DaneMatch::EndEntity {
            record: (*record).clone(),
        });
    }

    // DANE-TA: the most telling failure is kept for the report.
    let mut failure = DaneError::NoMatch;
    for record in usable.iter().filter(|r| r.usage == USAGE_DANE_TA) {
        for (depth, cert) in chain.iter().enumerate() {
            if !record.matches(cert.as_ref()) {
                continue;
            }
            let outcome = if depth == 0 {
                // The leaf is its own anchor: nothing to chain, the name counts.
                leaf_name(leaf, names, record, 0)
            } else {
                match anchor_from_cert(cert) {
                    Ok(anchor) => anchored(chain, anchor, names, record, depth, now),
                    Err(reason) => Err(DaneError::Chain {
                        record: record.presentation(),
                        depth,
                        reason,
                    }),
                }
            };
            match outcome {
                Ok(found) => return Ok(found),
                Err(e) => failure = e,
            }
        }
        // "2 1 0": the anchor's key in full; its certificate need not be sent.
        // A key that signed nothing sent is no match; a name mismatch is told.
        if record.selector == SELECTOR_SPKI && record.matching == MATCHING_FULL {
            if let Some(anchor) = bare_key_anchor(chain, &record.data) {
                match anchored(chain, anchor, names, record, chain.len(), now) {
                    Ok(found) => return Ok(found),
                    Err(e @ DaneError::Name { .. }) => failure = e,
                    Err(_) => {}
                }
            }
        }
    }
    Err(failure)
}

fn anchor_from_cert<'a>(cert: &'a CertificateDer<'a>) -> Result<TrustAnchor<'a>, String> {
    webpki::anchor_from_trusted_cert(cert).map_err(|e| format!("unusable anchor: {e}"))
}

/// The trust anchor a bare SPKI makes: it vouches for the issuer name of the
/// topmost certificate sent.
fn bare_key_anchor<'a>(chain: &'a [CertificateDer<'a>], spki: &'a [u8]) -> Option<TrustAnchor<'a>> {
    let top = parse_cert(chain.last()?.as_ref())?;
    let (_, spki_value, _) = tlv(spki)?;
    let (_, issuer_value, _) = tlv(top.issuer)?;
    Some(TrustAnchor {
        subject: issuer_value.into(),
        subject_public_key_info: spki_value.into(),
        name_constraints: None,
    })
}

/// Verifies the path from the leaf to `anchor` through the other certificates
/// sent, then the leaf's name.
fn anchored(
    chain: &[CertificateDer<'_>],
    anchor: TrustAnchor<'_>,
    names: &[&str],
    record: &Tlsa,
    depth: usize,
    now: UnixTime,
) -> Result<DaneMatch, DaneError> {
    let chain_error = |reason: String| DaneError::Chain {
        record: record.presentation(),
        depth,
        reason,
    };
    let leaf = chain.first().ok_or(DaneError::NoCertificate)?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| chain_error(e.to_string()))?;
    let intermediates = chain.get(1..).unwrap_or_default();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        intermediates,
        now,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map_err(|e| chain_error(e.to_string()))?;
    leaf_name(leaf, names, record, depth)
}

fn leaf_name(
    leaf: &CertificateDer<'_>,
    names: &[&str],
    record: &Tlsa,
    depth: usize,
) -> Result<DaneMatch, DaneError> {
    let name_error = || DaneError::Name {
        record: record.presentation(),
        names: names.join(", "),
    };
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|_| name_error())?;
    for name in names {
        let Ok(server_name) = ServerName::try_from(name.trim_end_matches('.')) else {
            continue;
        };
        if ee.verify_is_valid_for_subject_name(&server_name).is_ok() {
            return Ok(DaneMatch::TrustAnchor {
                record: record.clone(),
                depth,
                name: name.trim_end_matches('.').to_ascii_lowercase(),
            });
        }
    }
    Err(name_error())
}

/// The DER SubjectPublicKeyInfo (the whole SEQUENCE, what selector 1 hashes)
/// of a DER certificate; None when it does not parse.
pub fn subject_public_key_info(cert: &[u8]) -> Option<&[u8]> {
    parse_cert(cert).map(|fields| fields.spki)
}

// ---------------------------------------------------------------------------------
// Just enough DER to find a certificate's issuer and SubjectPublicKeyInfo
// ---------------------------------------------------------------------------------

/// Byte ranges of an X.509 certificate, each a whole TLV (tag and length too).
struct CertFields<'a> {
    issuer: &'a [u8],
    spki: &'a [u8],
}

/// One DER element at the start of `input`: (tag, contents, rest). Low tag
/// numbers and definite lengths up to 4 bytes only, as certificates use.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, rest) = rest.split_at(n);
        let len = bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        // DER: the shortest form.
        if len < 0x80 || bytes[0] == 0 {
            return None;
        }
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

/// The TLV at the start of `input` as a slice, and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (tag, _, rest) = tlv(input)?;
    let whole = input.get(..input.len() - rest.len())?;
    Some((tag, whole, rest))
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const VERSION: u8 = 0xa0;

fn parse_cert(der: &[u8]) -> Option<CertFields<'_>> {
    let (tag, cert, _) = tlv(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    let (tag, _, after) = element(rest)?;
    if tag == VERSION {
        rest = after;
    }
    let (tag, _, after) = element(rest)?; // serialNumber
    if tag != INTEGER {
        return None;
    }
    let (tag, _, after) = element(after)?; // signature AlgorithmIdentifier
    if tag != SEQUENCE {
        return None;
    }
    let (tag, issuer, after) = element(after)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, _, after) = element(after)?; // validity
    let (_, _, after) = element(after)?; // subject
    let (tag, spki, _) = element(after)?;
    if tag != SEQUENCE {
        return None;
    }
    Some(CertFields { issuer, spki })
}

#[cfg(test)]
#[path = "dane_tests.rs"]
mod tests;
