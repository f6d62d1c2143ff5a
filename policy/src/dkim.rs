//! DKIM signing of outbound mail (RFC 6376; Ed25519 per RFC 8463): the
//! configured signers, the `[[dkim.rule]]` list choosing them, and the signing
//! itself (mail-auth's signer).
//!
//! ```toml
//! [dkim.signer.example-rsa]
//! domain = "example.org"
//! selector = "s2026"
//! algorithm = "rsa-sha256"      # or "ed25519-sha256"
//! key = "/etc/sluice/dkim/example.org.s2026.pem"
//!
//! [[dkim.rule]]
//! match.sender_domain = ["example.org"]
//! sign = ["example-rsa", "example-ed"]
//! ```
//!
//! Rules: every `match.*` key present must hold (AND), any entry of a list may
//! hold (OR), as in `[[rule]]`. The first matching rule decides; `sign = []`
//! leaves what it matches unsigned; no match leaves the message unsigned.
//! Several signers on one rule sign the message once each (dual signing).
//!
//! [`DkimPlan::new`] checks everything but the key files; [`DkimPlan::load`]
//! reads and checks the keys (RSA below 2048 bits is refused). The choice
//! ([`DkimPolicy::select`]) is pure; [`DkimPolicy::sign`] hashes and signs.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use mail_auth::common::crypto::{Algorithm, CryptoError, Ed25519Key, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use serde::Deserialize;

use crate::relay::validate_domain;
use crate::rules::{compile_domains, compile_list, one_or_many, Address, DomainSet, Glob};
use crate::{MessageFacts, NetworkList, PolicyError};

/// Smallest RSA modulus accepted (RFC 8301 §3.2 asks for at least 1024;
/// receivers such as Gmail want 2048).
pub const MIN_RSA_BITS: usize = 2048;

/// Signed when a signer does not list its own `headers`. `From` is always
/// signed and over-signed (listed once more than it occurs), so a second
/// `From` added on the way breaks the signature.
pub const DEFAULT_HEADERS: &[&str] = &[
    "From",
    "Reply-To",
    "Sender",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-Disposition",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

/// The `[dkim]` section as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DkimConfig {
    /// Signers by name.
    pub signer: BTreeMap<String, SignerConfig>,
    /// Ordered: the first match decides.
    pub rule: Vec<DkimRuleConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum SigningAlgorithm {
    #[default]
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
    #[serde(rename = "ed25519-sha256")]
    Ed25519Sha256,
}

impl SigningAlgorithm {
    /// The `k=` tag of the key record.
    pub fn key_type(self) -> &'static str {
        match self {
            SigningAlgorithm::RsaSha256 => "rsa",
            SigningAlgorithm::Ed25519Sha256 => "ed25519",
        }
    }
}

/// One `[dkim.signer.NAME]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignerConfig {
    /// `d=`.
    pub domain: String,
    /// `s=`.
    pub selector: String,
    #[serde(default)]
    pub algorithm: SigningAlgorithm,
    /// PEM (PKCS#1 or PKCS#8) or DER private key.
    pub key: PathBuf,
    /// Header fields to sign; absent: [`DEFAULT_HEADERS`].
    #[serde(default)]
    pub headers: Option<Vec<String>>,
    /// "header/body", each "relaxed" or "simple"; absent: "relaxed/relaxed".
    #[serde(default)]
    pub canonicalization: Option<String>,
    /// `x=`: how long the signature stays valid ("7d"); absent: no expiry.
    #[serde(default)]
    pub expire: Option<String>,
}

/// One `[[dkim.rule]]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimRuleConfig {
    #[serde(default, rename = "match")]
    pub when: DkimMatchConfig,
    /// Signer names; `[]` leaves matching mail unsigned.
    #[serde(default, deserialize_with = "one_or_many")]
    pub sign: Option<Vec<String>>,
    /// ARC-seal matching mail (RFC 8617) with this signer's key and `d=`/`s=`:
    /// for mail this relay forwards. The seal records the listener's
    /// `verify` results, so it needs that table on the receiving listener.
    #[serde(default)]
    pub arc_seal: Option<String>,
}

/// The `match.*` keys of a DKIM rule; an absent key places no condition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimMatchConfig {
    #[serde(default, deserialize_with = "one_or_many")]
    pub listener: Option<Vec<String>>,
    pub authenticated: Option<bool>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub auth_user: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub sender: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub sender_domain: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub client_ip: Option<Vec<String>>,
    /// The message's virtual queue.
    #[serde(default, deserialize_with = "one_or_many")]
    pub queue: Option<Vec<String>>,
}

/// A signing failure (the message must not be accepted unsigned).
#[derive(Debug, Clone, thiserror::Error)]
pub enum DkimError {
    #[error("DKIM signer {signer}: {reason}")]
    Sign { signer: String, reason: String },
    #[error("DKIM key generation: {0}")]
    Generate(String),
}

/// A signer checked except for its key.
#[derive(Debug, Clone)]
struct SignerSpec {
    name: String,
    domain: String,
    selector: String,
    algorithm: SigningAlgorithm,
    key: PathBuf,
    headers: Vec<String>,
    header_c: Canonicalization,
    body_c: Canonicalization,
    expire_secs: u64,
}

#[derive(Debug, Clone, Default)]
struct Cond {
    listener: Option<Box<[Box<str>]>>,
    authenticated: Option<bool>,
    auth_user: Option<Box<[Box<str>]>>,
    queue: Option<Box<[Box<str>]>>,
    client_ip: Option<NetworkList>,
    sender_domain: Option<DomainSet>,
    sender: Option<Box<[Glob]>>,
}

#[derive(Debug, Clone)]
struct DkimRule {
    cond: Cond,
    /// Indexes into the signers.
    sign: Box<[usize]>,
    /// The signer whose key ARC-seals matching mail.
    seal: Option<usize>,
}

/// The configuration checked, keys not read yet.
#[derive(Debug, Clone, Default)]
pub struct DkimPlan {
    signers: Vec<SignerSpec>,
    rules: Vec<DkimRule>,
}

/// One loaded signer.
pub struct Signer {
    pub name: String,
    pub domain: String,
    pub selector: String,
    pub algorithm: SigningAlgorithm,
    /// The public key as published in `p=` (SubjectPublicKeyInfo DER for RSA,
    /// the 32 raw bytes for Ed25519).
    pub public_key: Vec<u8>,
    inner: DkimSigner<Key, Done>,
}

/// A signing key as mail-auth's signer uses it. RSA goes through the system's
/// OpenSSL (mail-auth's rust-crypto `rsa` signs at about 16% of `openssl
/// speed`, ring at about 40%; BENCHMARKS.md "DKIM signing"); Ed25519 stays
/// mail-auth's (ed25519-dalek, faster than OpenSSL's).
pub(crate) enum Key {
    Rsa(openssl::pkey::PKey<openssl::pkey::Private>),
    Ed25519(Box<Ed25519Key>),
}

impl SigningKey for Key {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        match self {
            Key::Rsa(key) => {
                // What is signed is the canonical header block (a few hundred
                // bytes); OpenSSL hashes it itself (PKCS#1 v1.5, SHA-256).
                let mut data = Vec::with_capacity(1024);
                input.write(&mut data);
                rsa_sign(key, &data).map_err(|e| {
                    mail_auth::Error::Crypto(CryptoError::Library(format!(
                        "RSA signing failed: {e}"
                    )))
                })
            }
            Key::Ed25519(key) => key.sign(input),
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            Key::Rsa(_) => Algorithm::RsaSha256,
            Key::Ed25519(_) => Algorithm::Ed25519Sha256,
        }
    }
}

/// A signer's key lent to the ARC sealer (`[server.listener.NAME.verify]
/// arc_seal`): same key, same algorithm, no copy.
#[derive(Clone, Copy)]
pub struct KeyRef<'a>(&'a Key);

impl SigningKey for KeyRef<'_> {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.sign(input)
    }

    fn algorithm(&self) -> Algorithm {
        self.0.algorithm()
    }
}

impl Signer {
    /// This signer's key for ARC sealing.
    pub fn key(&self) -> KeyRef<'_> {
        KeyRef(&self.inner.key)
    }
}

fn rsa_sign(
    key: &openssl::pkey::PKeyRef<openssl::pkey::Private>,
    data: &[u8],
) -> Result<Vec<u8>, openssl::error::ErrorStack> {
    let mut signer = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), key)?;
    signer.set_rsa_padding(openssl::rsa::Padding::PKCS1)?;
    signer.update(data)?;
    signer.sign_to_vec()
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("name", &self.name)
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// Signers with their keys and the compiled rules.
#[derive(Debug, Default)]
pub struct DkimPolicy {
    signers: Vec<Signer>,
    rules: Vec<DkimRule>,
}

impl DkimPlan {
    /// Checks the section; `known_queues` are the configured virtual queues
    /// ("default" is always known).
    pub fn new(cfg: &DkimConfig, known_queues: &[&str]) -> Result<DkimPlan, PolicyError> {
        let mut signers = Vec::with_capacity(cfg.signer.len());
        for (name, s) in &cfg.signer {
            signers.push(compile_signer(name, s)?);
        }
        let mut rules = Vec::with_capacity(cfg.rule.len());
        for (i, r) in cfg.rule.iter().enumerate() {
            rules.push(compile_rule(i + 1, r, &signers, known_queues)?);
        }
        Ok(DkimPlan { signers, rules })
    }

    /// Reads every signer's key.
    pub fn load(self) -> Result<DkimPolicy, PolicyError> {
        let mut signers = Vec::with_capacity(self.signers.len());
        for spec in self.signers {
            let bad = |reason: String| PolicyError::InvalidDkimSigner {
                signer: spec.name.clone(),
                key: "key",
                reason: format!("{}: {reason}", spec.key.display()),
            };
            let (key, public_key) = load_key(&spec.key, spec.algorithm).map_err(bad)?;
            let mut inner = DkimSigner::from_key(key)
                .domain(spec.domain.clone())
                .selector(spec.selector.clone())
                .headers(spec.headers.iter().cloned())
                .header_canonicalization(spec.header_c)
                .body_canonicalization(spec.body_c);
            if spec.expire_secs > 0 {
                inner = inner.expiration(spec.expire_secs);
            }
            signers.push(Signer {
                name: spec.name,
                domain: spec.domain,
                selector: spec.selector,
                algorithm: spec.algorithm,
                public_key,
                inner,
            });
        }
        Ok(DkimPolicy {
            signers,
            rules: self.rules,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.signers.is_empty() && self.rules.is_empty()
    }
}

impl DkimPolicy {
    /// [`DkimPlan::new`] then [`DkimPlan::load`].
    pub fn from_config(cfg: &DkimConfig, known_queues: &[&str]) -> Result<DkimPolicy, PolicyError> {
        DkimPlan::new(cfg, known_queues)?.load()
    }

    /// The signers (indexes into [`DkimPolicy::signers`]) for a message in
    /// `queue`: those of the first matching rule, none when no rule matches.
    pub fn select(&self, facts: &MessageFacts, queue: &str) -> &[usize] {
        if self.rules.is_empty() {
            return &[];
        }
        let sender = Address::new(facts.sender);
        self.rules
            .iter()
            .find(|r| r.cond.matches(facts, &sender, queue))
            .map_or(&[], |r| &r.sign)
    }

    /// The signer that ARC-seals a message in `queue`: the `arc_seal` of the
    /// first matching rule (the rule that also decides its signatures).
    pub fn select_seal(&self, facts: &MessageFacts, queue: &str) -> Option<&Signer> {
        if self.rules.iter().all(|r| r.seal.is_none()) {
            return None;
        }
        let sender = Address::new(facts.sender);
        self.rules
            .iter()
            .find(|r| r.cond.matches(facts, &sender, queue))
            .and_then(|r| r.seal)
            .and_then(|i| self.signers.get(i))
    }

    pub fn signers(&self) -> &[Signer] {
        &self.signers
    }

    /// True when no rule can ask for a signature.
    pub fn is_off(&self) -> bool {
        self.rules.iter().all(|r| r.sign.is_empty())
    }

    /// True when any of `chosen` is RSA (slow enough to move off an executor).
    pub fn any_rsa(&self, chosen: &[usize]) -> bool {
        chosen.iter().any(|&i| {
            self.signers
                .get(i)
                .is_some_and(|s| s.algorithm == SigningAlgorithm::RsaSha256)
        })
    }

    /// Signer names, comma-separated, for logs.
    pub fn names(&self, chosen: &[usize]) -> String {
        let mut out = String::new();
        for &i in chosen {
            if let Some(s) = self.signers.get(i) {
                if !out.is_empty() {
                    out.push(',');
                }
                out.push_str(&s.name);
            }
        }
        out
    }

    /// Signs `message` (header block and body, CRLF line ends) with each of
    /// `chosen` and returns the `DKIM-Signature:` fields to put before it, in
    /// the order given. `each` is told each signer's index and the time its
    /// signature took.
    pub fn sign(
        &self,
        chosen: &[usize],
        message: &[u8],
        mut each: impl FnMut(usize, std::time::Duration),
    ) -> Result<Vec<u8>, DkimError> {
        let mut out = Vec::with_capacity(chosen.len() * 512);
        for &i in chosen {
            let Some(signer) = self.signers.get(i) else {
                continue;
            };
            let started = std::time::Instant::now();
            let signature = signer.inner.sign(message).map_err(|e| DkimError::Sign {
                signer: signer.name.clone(),
                reason: e.to_string(),
            })?;
            signature.write_header(&mut out);
            each(i, started.elapsed());
        }
        Ok(out)
    }

    /// The raw signature of `data` with signer `i`'s key (hash and sign, no
    /// DKIM around it): the benchmarks' baseline for the signing path.
    pub fn sign_raw(&self, i: usize, data: &[u8]) -> Result<Vec<u8>, DkimError> {
        let signer = self.signers.get(i).ok_or_else(|| DkimError::Sign {
            signer: format!("#{i}"),
            reason: "no such signer".into(),
        })?;
        signer.inner.key.sign(data).map_err(|e| DkimError::Sign {
            signer: signer.name.clone(),
            reason: e.to_string(),
        })
    }

    /// Whether two policies sign alike (same signers, names and keys), so a
    /// reload can say if the keys changed.
    pub fn same_signers(&self, other: &DkimPolicy) -> bool {
        self.signers.len() == other.signers.len()
            && self.signers.iter().zip(&other.signers).all(|(a, b)| {
                a.name == b.name
                    && a.domain == b.domain
                    && a.selector == b.selector
                    && a.public_key == b.public_key
            })
    }
}

fn compile_signer(name: &str, s: &SignerConfig) -> Result<SignerSpec, PolicyError> {
    let bad = |key: &'static str, reason: String| PolicyError::InvalidDkimSigner {
        signer: name.to_string(),
        key,
        reason,
    };
    validate_domain(&s.domain).map_err(|r| bad("domain", format!("{:?}: {r}", s.domain)))?;
    // A selector is one or more DNS labels (RFC 6376 §3.1).
    validate_domain(&s.selector).map_err(|r| bad("selector", format!("{:?}: {r}", s.selector)))?;
    if s.key.as_os_str().is_empty() {
        return Err(bad("key", "empty path".into()));
    }
    let listed: Vec<String> = match &s.headers {
        Some(h) => h.clone(),
        None => DEFAULT_HEADERS.iter().map(|h| (*h).to_string()).collect(),
    };
    let mut headers = Vec::with_capacity(listed.len() + 2);
    for h in listed {
        let h = h.trim().to_string();
        if h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return Err(bad("headers", format!("{h:?} is not a header field name")));
        }
        if h.eq_ignore_ascii_case("DKIM-Signature") {
            return Err(bad(
                "headers",
                "DKIM-Signature cannot be signed by itself".into(),
            ));
        }
        headers.push(h);
    }
    if !headers.iter().any(|h| h.eq_ignore_ascii_case("From")) {
        headers.insert(0, "From".to_string());
    }
    // Listed twice: mail-auth signs every From present, then names the
    // second entry as absent, which over-signs it.
    headers.push("From".to_string());
    let (header_c, body_c) = match &s.canonicalization {
        None => (Canonicalization::Relaxed, Canonicalization::Relaxed),
        Some(text) => parse_canonicalization(text).ok_or_else(|| {
            bad(
                "canonicalization",
                format!("{text:?}: expected \"header/body\", each relaxed or simple"),
            )
        })?,
    };
    let expire_secs = match &s.expire {
        None => 0,
        Some(text) => {
            let d = humantime::parse_duration(text)
                .map_err(|e| bad("expire", format!("{text:?} is not a duration like 7d: {e}")))?;
            if d.as_secs() == 0 {
                return Err(bad("expire", "must be at least one second".into()));
            }
            d.as_secs()
        }
    };
    Ok(SignerSpec {
        name: name.to_string(),
        domain: s.domain.trim_end_matches('.').to_ascii_lowercase(),
        selector: s.selector.trim_end_matches('.').to_ascii_lowercase(),
        algorithm: s.algorithm,
        key: s.key.clone(),
        headers,
        header_c,
        body_c,
        expire_secs,
    })
}

fn parse_canonicalization(text: &str) -> Option<(Canonicalization, Canonicalization)> {
    let one = |t: &str| match t.trim() {
        "relaxed" => Some(Canonicalization::Relaxed),
        "simple" => Some(Canonicalization::Simple),
        _ => None,
    };
    let (h, b) = text.split_once('/')?;
    Some((one(h)?, one(b)?))
}

fn compile_rule(
    n: usize,
    r: &DkimRuleConfig,
    signers: &[SignerSpec],
    known_queues: &[&str],
) -> Result<DkimRule, PolicyError> {
    let bad = |key: &'static str, reason: String| PolicyError::InvalidDkimRule {
        rule: n,
        key,
        reason,
    };
    let m = &r.when;
    let nonempty = |what: &'static str| {
        move |s: &str| -> Result<Box<str>, String> {
            if s.is_empty() {
                Err(format!("empty {what}"))
            } else {
                Ok(s.into())
            }
        }
    };
    let mut cond = Cond {
        authenticated: m.authenticated,
        ..Cond::default()
    };
    cond.listener = compile_list(
        &m.listener,
        "match.listener",
        &bad,
        nonempty("listener name"),
    )?;
    cond.auth_user = compile_list(&m.auth_user, "match.auth_user", &bad, nonempty("user name"))?;
    if cond.auth_user.is_some() && m.authenticated == Some(false) {
        return Err(bad(
            "match.auth_user",
            "contradicts match.authenticated = false".into(),
        ));
    }
    cond.queue = compile_list(&m.queue, "match.queue", &bad, |s| {
        if s == crate::DEFAULT_QUEUE || known_queues.contains(&s) {
            Ok(s.into())
        } else {
            Err("not a configured queue".into())
        }
    })?;
    if let Some(items) = &m.client_ip {
        if items.is_empty() {
            return Err(bad("match.client_ip", "empty list matches nothing".into()));
        }
        cond.client_ip =
            Some(NetworkList::parse(items).map_err(|e| bad("match.client_ip", e.to_string()))?);
    }
    cond.sender = compile_list(&m.sender, "match.sender", &bad, |s| Glob::new(s, true))?;
    cond.sender_domain = compile_domains(&m.sender_domain, "match.sender_domain", &bad)?;
    let no_signers = Vec::new();
    let names = match (&r.sign, &r.arc_seal) {
        (Some(names), _) => names,
        // A rule that only seals signs nothing.
        (None, Some(_)) => &no_signers,
        (None, None) => {
            return Err(bad(
                "sign",
                "required: the signers to use (sign = [] leaves matching mail unsigned)".into(),
            ))
        }
    };
    let find = |key: &'static str, name: &str| -> Result<usize, PolicyError> {
        signers.iter().position(|s| s.name == name).ok_or_else(|| {
            let known: Vec<&str> = signers.iter().map(|s| s.name.as_str()).collect();
            bad(
                key,
                format!(
                    "unknown signer {name:?} (known: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            )
        })
    };
    let seal = match &r.arc_seal {
        Some(name) => Some(find("arc_seal", name)?),
        None => None,
    };
    let mut sign = Vec::with_capacity(names.len());
    for name in names {
        let i = find("sign", name)?;
        if sign.contains(&i) {
            return Err(bad("sign", format!("signer {name:?} listed twice")));
        }
        sign.push(i);
    }
    Ok(DkimRule {
        cond,
        sign: sign.into_boxed_slice(),
        seal,
    })
}

impl Cond {
    fn matches(&self, facts: &MessageFacts, sender: &Address, queue: &str) -> bool {
        if let Some(names) = &self.listener {
            if !names.iter().any(|n| **n == *facts.listener) {
                return false;
            }
        }
        if let Some(want) = self.authenticated {
            if facts.auth_user.is_some() != want {
                return false;
            }
        }
        if let Some(users) = &self.auth_user {
            match facts.auth_user {
                Some(user) if users.iter().any(|u| **u == *user) => {}
                _ => return false,
            }
        }
        if let Some(queues) = &self.queue {
            if !queues.iter().any(|q| **q == *queue) {
                return false;
            }
        }
        if let Some(nets) = &self.client_ip {
            if !facts.client_ip.is_some_and(|ip: IpAddr| nets.contains(ip)) {
                return false;
            }
        }
        if let Some(set) = &self.sender_domain {
            if !sender.domain.is_some_and(|d| set.contains(d)) {
                return false;
            }
        }
        if let Some(globs) = &self.sender {
            if !globs.iter().any(|g| g.matches(sender.full)) {
                return false;
            }
        }
        true
    }
}

/// Reads a private key: PEM (PKCS#1 "RSA PRIVATE KEY" or PKCS#8 "PRIVATE
/// KEY") or DER. Returns it with its public key as published in `p=`.
fn load_key(path: &Path, algorithm: SigningAlgorithm) -> Result<(Key, Vec<u8>), String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let pem = bytes.trim_ascii_start().starts_with(b"-----BEGIN");
    match algorithm {
        SigningAlgorithm::RsaSha256 => {
            let key = if pem {
                match PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| format!("PEM: {e}"))? {
                    PrivateKeyDer::Pkcs1(d) => {
                        rsa::RsaPrivateKey::from_pkcs1_der(d.secret_pkcs1_der())
                            .map_err(|e| format!("PKCS#1: {e}"))?
                    }
                    PrivateKeyDer::Pkcs8(d) => {
                        rsa::RsaPrivateKey::from_pkcs8_der(d.secret_pkcs8_der())
                            .map_err(|e| format!("not an RSA PKCS#8 key: {e}"))?
                    }
                    _ => return Err("not an RSA key (PKCS#1 or PKCS#8 expected)".into()),
                }
            } else {
                rsa::RsaPrivateKey::from_pkcs8_der(&bytes)
                    .or_else(|_| rsa::RsaPrivateKey::from_pkcs1_der(&bytes))
                    .map_err(|e| format!("not an RSA key in PEM or DER: {e}"))?
            };
            let bits = key.n().bits();
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "RSA key of {bits} bits; at least {MIN_RSA_BITS} are required"
                ));
            }
            let public = rsa::RsaPublicKey::from(&key)
                .to_public_key_der()
                .map_err(|e| e.to_string())?
                .as_bytes()
                .to_vec();
            let der = key.to_pkcs8_der().map_err(|e| e.to_string())?;
            let key = openssl::pkey::PKey::private_key_from_der(der.as_bytes())
                .map_err(|e| format!("RSA key refused by OpenSSL: {e}"))?;
            Ok((Key::Rsa(key), public))
        }
        SigningAlgorithm::Ed25519Sha256 => {
            let key = if pem {
                match PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| format!("PEM: {e}"))? {
                    PrivateKeyDer::Pkcs8(d) => Ed25519Key::from_pkcs8_der(d.secret_pkcs8_der()),
                    _ => return Err("not an Ed25519 PKCS#8 key".into()),
                }
            } else {
                Ed25519Key::from_pkcs8_der(&bytes)
            }
            .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))?;
            let public = key.public_key();
            Ok((Key::Ed25519(Box::new(key)), public))
        }
    }
}

/// A new key pair from [`generate_key`].
pub struct GeneratedKey {
    /// PKCS#8 PEM.
    pub private_pem: String,
    /// As published in `p=`.
    pub public_key: Vec<u8>,
}

/// Makes a key pair: RSA of `rsa_bits` (at least [`MIN_RSA_BITS`]) or Ed25519.
pub fn generate_key(
    algorithm: SigningAlgorithm,
    rsa_bits: usize,
) -> Result<GeneratedKey, DkimError> {
    let err = |e: &dyn std::fmt::Display| DkimError::Generate(e.to_string());
    match algorithm {
        SigningAlgorithm::RsaSha256 => {
            if !(MIN_RSA_BITS..=8192).contains(&rsa_bits) {
                return Err(DkimError::Generate(format!(
                    "RSA keys are {MIN_RSA_BITS} ..= 8192 bits"
                )));
            }
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, rsa_bits)
                .map_err(|e| err(&e))?;
            let private_pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| err(&e))?;
            let public_key = rsa::RsaPublicKey::from(&key)
                .to_public_key_der()
                .map_err(|e| err(&e))?
                .as_bytes()
                .to_vec();
            Ok(GeneratedKey {
                private_pem: private_pem.to_string(),
                public_key,
            })
        }
        SigningAlgorithm::Ed25519Sha256 => {
            let v2 = Ed25519Key::generate_pkcs8().map_err(|e| err(&e))?;
            // Written as PKCS#8 v1 (no public key inside): OpenSSL 3.0, and so
            // OpenDKIM, cannot read the v2 form ed25519-dalek makes.
            let mut info =
                rsa::pkcs8::PrivateKeyInfo::try_from(v2.as_slice()).map_err(|e| err(&e))?;
            info.public_key = None;
            let der = rsa::pkcs8::der::Encode::to_der(&info).map_err(|e| err(&e))?;
            let key = Ed25519Key::from_pkcs8_der(&der).map_err(|e| err(&e))?;
            let private_pem =
                rsa::pkcs8::der::pem::encode_string("PRIVATE KEY", LineEnding::LF, &der)
                    .map_err(|e| err(&e))?;
            Ok(GeneratedKey {
                private_pem,
                public_key: key.public_key(),
            })
        }
    }
}

/// The zone-file line publishing a key: `S._domainkey.D. IN TXT "v=DKIM1;
/// k=…; p=…"`, the text split into strings of at most 255 bytes (RFC 1035
/// character-strings; receivers join them).
pub fn txt_record(
    selector: &str,
    domain: &str,
    algorithm: SigningAlgorithm,
    public_key: &[u8],
) -> String {
    use base64ct::Encoding;
    let text = format!(
        "v=DKIM1; k={}; p={}",
        algorithm.key_type(),
        base64ct::Base64::encode_string(public_key)
    );
    let mut line = format!(
        "{}._domainkey.{}. IN TXT",
        selector.trim_end_matches('.'),
        domain.trim_end_matches('.')
    );
    // The text is ASCII, so any byte offset is a character boundary.
    for chunk in text.as_bytes().chunks(255) {
        line.push_str(" \"");
        line.push_str(&String::from_utf8_lossy(chunk));
        line.push('"');
    }
    line
}

#[cfg(test)]
mod tests;
