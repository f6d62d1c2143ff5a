//! The DNS bridge between mail-auth and our resolver (ARCHITECTURE.md
//! "Inbound authentication: the DNS bridge").
//!
//! mail-auth 0.13 has no resolver trait, but every lookup first asks the
//! caches passed in its `Parameters`. Built with its `test` feature, a lookup
//! that misses them answers "not found" (NXDOMAIN) instead of reaching its own
//! tokio resolver. [`DnsCaches`] are those caches, filled only from answers our
//! `dns` crate gave, and they *record* every name asked for that they do not
//! hold. A check then runs in rounds: run it against the caches, resolve the
//! recorded names through our resolver, run it again — until it asks for
//! nothing new (its result is then built from real answers only) or the round
//! limit is hit (temperror).
//!
//! Negative and failed answers: a TXT NXDOMAIN/NODATA is cached as mail-auth's
//! own "record not found" error and a temporary failure as its resolver error,
//! so mail-auth turns them into none/temperror itself. The address, MX and PTR
//! caches hold record sets only; for them a known-void name reads as a miss
//! (mail-auth's NXDOMAIN, which is right) and a temporary failure reads as a
//! miss too but is *noted*: a check that touched one ends as temperror, never
//! as pass or a permanent failure (see [`DnsCaches::touched_temp_failure`]).

use std::borrow::Borrow;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Instant;

use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use mail_auth::dmarc::Dmarc;
use mail_auth::hickory_resolver::proto::op::ResponseCode;
use mail_auth::spf::Spf;
use mail_auth::{DnsError, DnssecStatus, Error, Parameters, RecordSet, ResolverCache, Txt, MX};

/// One DNS question a check needs answered. Names are lower case without
/// the trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Query {
    Txt(String),
    A(String),
    Aaaa(String),
    Mx(String),
    Ptr(IpAddr),
}

impl std::fmt::Display for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Query::Txt(n) => write!(f, "TXT {n}"),
            Query::A(n) => write!(f, "A {n}"),
            Query::Aaaa(n) => write!(f, "AAAA {n}"),
            Query::Mx(n) => write!(f, "MX {n}"),
            Query::Ptr(ip) => write!(f, "PTR {ip}"),
        }
    }
}

/// What our resolver said, in terms the bridge needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Each record's character-strings joined.
    Txt(Vec<Vec<u8>>),
    A(Vec<Ipv4Addr>),
    Aaaa(Vec<Ipv6Addr>),
    /// (preference, exchange) pairs.
    Mx(Vec<(u16, String)>),
    Ptr(Vec<String>),
    /// NXDOMAIN or NODATA (an RFC 7208 "void" answer).
    NotFound,
    /// Timeout, SERVFAIL, network error: may work later.
    TempFail(String),
}

/// Resolves the names a check asked for. The engine implements it with the
/// per-core `dns::Resolver`; tests with a table.
#[allow(async_fn_in_trait)]
pub trait DnsSource {
    /// One answer per query, in any order; a query left out counts as a
    /// temporary failure.
    async fn resolve(&self, queries: Vec<Query>) -> Vec<(Query, Answer)>;
}

/// The trailing-dot, lower-case form mail-auth looks names up by.
pub(crate) fn fqdn(name: &str) -> Box<str> {
    let mut s = name.to_ascii_lowercase();
    if !s.ends_with('.') {
        s.push('.');
    }
    s.into_boxed_str()
}

fn bare(name: &str) -> String {
    name.trim_end_matches('.').to_string()
}

enum Entry<V> {
    Hit(V),
    Void,
    Temp,
}

/// One mail-auth cache that remembers what it was asked and did not hold.
pub struct Recorder<K, V> {
    map: RefCell<HashMap<K, Entry<V>>>,
    missing: RefCell<HashSet<K>>,
    /// Names answered void during the current run (RFC 7208 §4.6.4).
    voids: RefCell<HashSet<K>>,
    temp: Cell<bool>,
    /// Something missed during the current run.
    missed: Cell<bool>,
}

impl<K: Hash + Eq + Clone, V: Clone> Recorder<K, V> {
    fn new() -> Self {
        Recorder {
            map: RefCell::new(HashMap::new()),
            missing: RefCell::new(HashSet::new()),
            voids: RefCell::new(HashSet::new()),
            temp: Cell::new(false),
            missed: Cell::new(false),
        }
    }

    fn put(&self, key: K, entry: Entry<V>) {
        self.map.borrow_mut().insert(key, entry);
    }

    fn reset_run(&self) {
        self.missing.borrow_mut().clear();
        self.voids.borrow_mut().clear();
        self.temp.set(false);
        self.missed.set(false);
    }

    fn holds(&self, key: &K) -> bool {
        self.map.borrow().contains_key(key)
    }
}

/// The TXT cache answers errors itself (mail-auth reads them as none or
/// temperror); the record-set caches can only say "not here".
trait Negative: Sized {
    fn void() -> Option<Self>;
    fn temp() -> Option<Self>;
}

impl Negative for Txt {
    fn void() -> Option<Self> {
        Some(Txt::Error(Error::Dns(DnsError::RecordNotFound(
            ResponseCode::NXDomain,
        ))))
    }
    fn temp() -> Option<Self> {
        Some(Txt::Error(Error::Dns(DnsError::Resolver(
            "temporary DNS failure".to_string(),
        ))))
    }
}

impl<T> Negative for RecordSet<T> {
    fn void() -> Option<Self> {
        None
    }
    fn temp() -> Option<Self> {
        None
    }
}

impl<K: Hash + Eq + Clone + MissKey, V: Clone + Negative> ResolverCache<K, V> for Recorder<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let map = self.map.borrow();
        match map.get_key_value(name) {
            Some((_, Entry::Hit(v))) => Some(v.clone()),
            Some((k, Entry::Void)) => {
                self.voids.borrow_mut().insert(k.clone());
                V::void()
            }
            Some((_, Entry::Temp)) => {
                self.temp.set(true);
                V::temp()
            }
            None => {
                self.missed.set(true);
                if let Some(k) = K::from_hash(name) {
                    self.missing.borrow_mut().insert(k);
                }
                None
            }
        }
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.map.borrow_mut().remove(name) {
            Some(Entry::Hit(v)) => Some(v),
            _ => None,
        }
    }

    /// mail-auth inserts only what it resolved itself, which never happens
    /// with the `test` feature; ignored, so the caches hold our answers only.
    fn insert(&self, _key: K, _value: V, _valid_until: Instant) {}
}

/// Rebuilds the owned key of a miss from the borrowed form mail-auth asked
/// with. `ResolverCache::get` is generic over that form (`Q`), knowing only
/// `Q: Hash`; what a key hashes is enough to rebuild it.
pub(crate) trait MissKey: Sized {
    fn from_hash<Q: Hash + ?Sized>(q: &Q) -> Option<Self>;
}

/// Collects the bytes a value feeds its hasher.
#[derive(Default)]
struct Capture(Vec<u8>);

impl std::hash::Hasher for Capture {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
}

impl MissKey for Box<str> {
    /// `str` (and `Box<str>`, which delegates) hash as their bytes followed
    /// by one 0xff byte (`Hasher::write_str`'s prefix-free default);
    /// `name_keys_rebuild_from_their_hash` pins it.
    fn from_hash<Q: Hash + ?Sized>(q: &Q) -> Option<Self> {
        let mut c = Capture::default();
        q.hash(&mut c);
        let bytes = c.0.strip_suffix(&[0xff])?;
        std::str::from_utf8(bytes).ok().map(Box::from)
    }
}

impl MissKey for IpAddr {
    /// PTR is only ever asked for the client's address, which the caches
    /// know (see [`DnsCaches::missing`]): a PTR miss needs no key back.
    fn from_hash<Q: Hash + ?Sized>(_q: &Q) -> Option<Self> {
        None
    }
}

/// Parsed TXT records by their text, shared by the verifications of one
/// core: a popular domain's SPF, DMARC and key records are parsed (keys
/// decoded) once, not once per message. Bounded: emptied when full.
#[derive(Default)]
pub struct ParsedTxt {
    map: RefCell<HashMap<Vec<u8>, Txt>>,
}

/// Entries kept before [`ParsedTxt`] starts over.
const PARSED_MAX: usize = 4096;

impl ParsedTxt {
    fn get_or(&self, kind: u8, records: &[Vec<u8>], parse: impl FnOnce() -> Txt) -> Txt {
        let mut key = Vec::with_capacity(1 + records.iter().map(|r| r.len() + 1).sum::<usize>());
        key.push(kind);
        for r in records {
            key.extend_from_slice(r);
            key.push(0);
        }
        if let Some(t) = self.map.borrow().get(&key) {
            return t.clone();
        }
        let t = parse();
        let mut map = self.map.borrow_mut();
        if map.len() >= PARSED_MAX {
            map.clear();
        }
        map.insert(key, t.clone());
        t
    }
}

/// The five caches of one verification, shared by its checks and rounds.
pub struct DnsCaches {
    pub(crate) txt: Recorder<Box<str>, Txt>,
    pub(crate) mx: Recorder<Box<str>, RecordSet<MX>>,
    pub(crate) ipv4: Recorder<Box<str>, RecordSet<Ipv4Addr>>,
    pub(crate) ipv6: Recorder<Box<str>, RecordSet<Ipv6Addr>>,
    pub(crate) ptr: Recorder<IpAddr, RecordSet<Box<str>>>,
    /// The client address: the one PTR name anything asks for.
    client: IpAddr,
    /// Raw `_dmarc.` TXT records (mail-auth's parser drops `pct=`).
    dmarc_raw: RefCell<HashMap<String, String>>,
    /// Queries answered so far (counted per verification for the log).
    pub(crate) answered: Cell<usize>,
    parsed: Option<std::rc::Rc<ParsedTxt>>,
}

#[allow(clippy::type_complexity)]
pub(crate) type Params<'x, P> = Parameters<
    'x,
    P,
    Recorder<Box<str>, Txt>,
    Recorder<Box<str>, RecordSet<MX>>,
    Recorder<Box<str>, RecordSet<Ipv4Addr>>,
    Recorder<Box<str>, RecordSet<Ipv6Addr>>,
    Recorder<IpAddr, RecordSet<Box<str>>>,
>;

impl DnsCaches {
    pub fn new(client: IpAddr) -> DnsCaches {
        DnsCaches {
            txt: Recorder::new(),
            mx: Recorder::new(),
            ipv4: Recorder::new(),
            ipv6: Recorder::new(),
            ptr: Recorder::new(),
            client,
            dmarc_raw: RefCell::new(HashMap::new()),
            answered: Cell::new(0),
            parsed: None,
        }
    }

    /// Parses TXT records through (and into) a core's shared [`ParsedTxt`].
    pub fn with_parsed(mut self, parsed: std::rc::Rc<ParsedTxt>) -> DnsCaches {
        self.parsed = Some(parsed);
        self
    }

    fn parse(&self, kind: u8, records: &[Vec<u8>], parse: impl FnOnce() -> Txt) -> Txt {
        match &self.parsed {
            Some(p) => p.get_or(kind, records, parse),
            None => parse(),
        }
    }

    /// mail-auth parameters reading these caches.
    pub(crate) fn params<P>(&self, p: P) -> Params<'_, P> {
        Parameters {
            params: p,
            cache_txt: Some(&self.txt),
            cache_mx: Some(&self.mx),
            cache_ptr: Some(&self.ptr),
            cache_ipv4: Some(&self.ipv4),
            cache_ipv6: Some(&self.ipv6),
        }
    }

    /// Starts a run: forgets the misses, voids and temporary failures the
    /// previous one touched.
    pub(crate) fn reset_run(&self) {
        self.txt.reset_run();
        self.mx.reset_run();
        self.ipv4.reset_run();
        self.ipv6.reset_run();
        self.ptr.reset_run();
    }

    /// What the last run asked for that nobody has answered yet, sorted.
    pub fn missing(&self) -> Vec<Query> {
        let mut out: Vec<Query> = Vec::new();
        out.extend(
            self.txt
                .missing
                .borrow()
                .iter()
                .map(|k| Query::Txt(bare(k))),
        );
        out.extend(self.mx.missing.borrow().iter().map(|k| Query::Mx(bare(k))));
        out.extend(self.ipv4.missing.borrow().iter().map(|k| Query::A(bare(k))));
        out.extend(
            self.ipv6
                .missing
                .borrow()
                .iter()
                .map(|k| Query::Aaaa(bare(k))),
        );
        if self.ptr.missed.get() && !self.ptr.holds(&self.client) {
            out.push(Query::Ptr(self.client));
        }
        out.sort();
        out
    }

    /// The last run read a temporary failure somewhere.
    pub fn touched_temp_failure(&self) -> bool {
        self.txt.temp.get()
            || self.mx.temp.get()
            || self.ipv4.temp.get()
            || self.ipv6.temp.get()
            || self.ptr.temp.get()
    }

    /// Distinct names the last run found void, leaving out `except` (the
    /// domain whose SPF record is checked: its absence is "none", not a void
    /// lookup).
    pub(crate) fn void_lookups(&self, except: &str) -> usize {
        let except = fqdn(except);
        let mut names: HashSet<Box<str>> = HashSet::new();
        names.extend(
            self.txt
                .voids
                .borrow()
                .iter()
                .filter(|n| **n != except)
                .cloned(),
        );
        names.extend(self.mx.voids.borrow().iter().cloned());
        names.extend(self.ipv4.voids.borrow().iter().cloned());
        names.extend(self.ipv6.voids.borrow().iter().cloned());
        names.len()
    }

    /// Whether a name is answered already (any type).
    pub fn knows(&self, q: &Query) -> bool {
        match q {
            Query::Txt(n) => self.txt.holds(&fqdn(n)),
            Query::Mx(n) => self.mx.holds(&fqdn(n)),
            Query::A(n) => self.ipv4.holds(&fqdn(n)),
            Query::Aaaa(n) => self.ipv6.holds(&fqdn(n)),
            Query::Ptr(ip) => self.ptr.holds(ip),
        }
    }

    /// The raw `v=DMARC1` record of `_dmarc.DOMAIN`, if one was fetched.
    pub(crate) fn dmarc_raw(&self, domain: &str) -> Option<String> {
        self.dmarc_raw
            .borrow()
            .get(&format!(
                "_dmarc.{}",
                domain.trim_end_matches('.').to_ascii_lowercase()
            ))
            .cloned()
    }

    /// Stores what our resolver said. A TXT answer is parsed as what its name
    /// is for: `_dmarc.` names as DMARC, `._domainkey.` names as DKIM keys,
    /// anything else as SPF (the only other TXT mail-auth asks for here).
    pub fn insert(&self, q: Query, a: Answer) {
        self.answered.set(self.answered.get() + 1);
        match q {
            Query::Txt(name) => {
                let key = fqdn(&name);
                let entry = match a {
                    Answer::Txt(records) => {
                        let lower = key.to_string();
                        if lower.starts_with("_dmarc.") {
                            if let Some(raw) = records
                                .iter()
                                .filter_map(|r| std::str::from_utf8(r).ok())
                                .find(|r| {
                                    r.trim_start().to_ascii_lowercase().starts_with("v=dmarc1")
                                })
                            {
                                self.dmarc_raw
                                    .borrow_mut()
                                    .insert(bare(&lower), raw.to_string());
                            }
                            Entry::Hit(self.parse(0, &records, || parse_txt::<Dmarc>(&records)))
                        } else if lower.contains("._domainkey.") {
                            Entry::Hit(self.parse(1, &records, || domain_key(&records)))
                        } else if records.is_empty() {
                            Entry::Void
                        } else {
                            Entry::Hit(self.parse(2, &records, || parse_txt::<Spf>(&records)))
                        }
                    }
                    Answer::TempFail(_) => Entry::Temp,
                    _ => Entry::Void,
                };
                self.txt.put(key, entry);
            }
            Query::Mx(name) => {
                let entry = match a {
                    Answer::Mx(mut mx) if !mx.is_empty() => {
                        mx.sort_by_key(|m| m.0);
                        let mut sets: Vec<MX> = Vec::new();
                        for (pref, host) in mx {
                            let host = fqdn(&host);
                            match sets.iter_mut().find(|s| s.preference == pref) {
                                Some(s) => {
                                    let mut v = std::mem::take(&mut s.exchanges).into_vec();
                                    v.push(host);
                                    s.exchanges = v.into_boxed_slice();
                                }
                                None => sets.push(MX {
                                    exchanges: vec![host].into_boxed_slice(),
                                    preference: pref,
                                }),
                            }
                        }
                        Entry::Hit(set(sets))
                    }
                    Answer::TempFail(_) => Entry::Temp,
                    _ => Entry::Void,
                };
                self.mx.put(fqdn(&name), entry);
            }
            Query::A(name) => {
                let entry = match a {
                    Answer::A(v) if !v.is_empty() => Entry::Hit(set(v)),
                    Answer::TempFail(_) => Entry::Temp,
                    _ => Entry::Void,
                };
                self.ipv4.put(fqdn(&name), entry);
            }
            Query::Aaaa(name) => {
                let entry = match a {
                    Answer::Aaaa(v) if !v.is_empty() => Entry::Hit(set(v)),
                    Answer::TempFail(_) => Entry::Temp,
                    _ => Entry::Void,
                };
                self.ipv6.put(fqdn(&name), entry);
            }
            Query::Ptr(ip) => {
                let entry = match a {
                    Answer::Ptr(v) if !v.is_empty() => {
                        Entry::Hit(set(v.iter().map(|n| fqdn(n)).collect()))
                    }
                    Answer::TempFail(_) => Entry::Temp,
                    _ => Entry::Void,
                };
                self.ptr.put(ip, entry);
            }
        }
    }
}

/// A DKIM key record as mail-auth parses it, with an RSA key verified
/// through OpenSSL instead of mail-auth's rust-crypto (`rsa.rs`).
fn domain_key(records: &[Vec<u8>]) -> Txt {
    let mut last = Err(Error::Dns(DnsError::InvalidRecordType));
    for r in records {
        match DomainKey::parse(r) {
            Ok(mut key) => {
                if let Some(fast) = super::rsa::rsa_key_of(r) {
                    key.p = Box::new(fast);
                }
                return Txt::DomainKey(Arc::new(key));
            }
            Err(e) => last = Err(e),
        }
    }
    last.map(|k: DomainKey| Txt::DomainKey(Arc::new(k)))
        .unwrap_or_else(Txt::Error)
}

fn set<T>(v: Vec<T>) -> RecordSet<T> {
    RecordSet {
        rrset: Arc::from(v.into_boxed_slice()),
        dnssec_status: DnssecStatus::Indeterminate,
    }
}

/// As mail-auth reads a TXT RRset: the first record that parses as `T`, else
/// the last error ("invalid record" for none at all).
fn parse_txt<T: TxtRecordParser + Into<Txt>>(records: &[Vec<u8>]) -> Txt {
    let mut result: mail_auth::Result<T> = Err(Error::Dns(DnsError::InvalidRecordType));
    for r in records {
        result = T::parse(r);
        if result.is_ok() {
            break;
        }
    }
    result.into()
}
