//! RSA DKIM/ARC signature verification through the system's OpenSSL, put in
//! place of mail-auth's rust-crypto key when a key record is cached
//! (`bridge.rs`). Same reason as for signing (ARCHITECTURE.md "DKIM signing"):
//! the `rsa` crate's public-key operation is several times slower.

use mail_auth::common::crypto::{Algorithm, CryptoError, VerifyingKey};
use mail_auth::dkim::Canonicalization;
use mail_auth::Error;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Public};

/// Largest modulus taken (mail-auth's own bound is of the same order).
const MAX_BITS: u32 = 8192;

pub(crate) struct OpenSslRsaKey {
    key: PKey<Public>,
    bits: u32,
}

impl OpenSslRsaKey {
    /// `p=` bytes: SubjectPublicKeyInfo DER (RFC 6376 §3.6.1), or a bare
    /// PKCS#1 RSAPublicKey as some publishers write it.
    pub(crate) fn from_der(der: &[u8]) -> Option<OpenSslRsaKey> {
        let key = PKey::public_key_from_der(der).ok().or_else(|| {
            openssl::rsa::Rsa::public_key_from_der_pkcs1(der)
                .ok()
                .and_then(|r| PKey::from_rsa(r).ok())
        })?;
        let rsa = key.rsa().ok()?;
        let bits = rsa.n().num_bits().max(0) as u32;
        if bits > MAX_BITS {
            return None;
        }
        Some(OpenSslRsaKey { key, bits })
    }

    fn verify_digest(
        &self,
        data: &[u8],
        signature: &[u8],
        algorithm: Algorithm,
    ) -> mail_auth::Result<()> {
        let digest = match algorithm {
            Algorithm::RsaSha256 => MessageDigest::sha256(),
            Algorithm::RsaSha1 => MessageDigest::sha1(),
            Algorithm::Ed25519Sha256 => {
                return Err(Error::Crypto(CryptoError::IncompatibleAlgorithms))
            }
        };
        let ok = openssl::sign::Verifier::new(digest, &self.key)
            .and_then(|mut v| {
                v.set_rsa_padding(openssl::rsa::Padding::PKCS1)?;
                v.verify_oneshot(signature, data)
            })
            .unwrap_or(false);
        if ok {
            Ok(())
        } else {
            Err(Error::Crypto(CryptoError::FailedVerification))
        }
    }
}

impl VerifyingKey for OpenSslRsaKey {
    fn verify<'a>(
        &self,
        headers: &mut dyn Iterator<Item = (&'a [u8], &'a [u8])>,
        signature: &[u8],
        canonicalization: Canonicalization,
        algorithm: Algorithm,
    ) -> mail_auth::Result<()> {
        let mut data = Vec::with_capacity(512);
        canonicalization.canonicalize_headers(headers, &mut data);
        self.verify_digest(&data, signature, algorithm)
    }

    fn verify_bytes(
        &self,
        input: &[u8],
        signature: &[u8],
        algorithm: Algorithm,
    ) -> mail_auth::Result<()> {
        self.verify_digest(input, signature, algorithm)
    }

    fn public_key_bits(&self) -> usize {
        self.bits as usize
    }
}

/// The RSA key of a DKIM key record (`k=rsa`, the default), if it is one.
pub(crate) fn rsa_key_of(record: &[u8]) -> Option<OpenSslRsaKey> {
    let text = std::str::from_utf8(record).ok()?;
    let mut p = None;
    for tag in text.split(';') {
        let Some((k, v)) = tag.split_once('=') else {
            continue;
        };
        match k.trim() {
            "k" if !v.trim().eq_ignore_ascii_case("rsa") => return None,
            "p" => p = Some(v),
            _ => {}
        }
    }
    let b64: String = p?.chars().filter(|c| !c.is_whitespace()).collect();
    if b64.is_empty() {
        return None;
    }
    use base64ct::Encoding;
    let der = base64ct::Base64::decode_vec(&b64).ok()?;
    OpenSslRsaKey::from_der(&der)
}
