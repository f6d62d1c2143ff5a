//! MTA-STS (RFC 8461) in the engine: discovery, the policy cache, the fetch,
//! and what a policy means for a delivery. The parsing and the decisions are
//! `sluice_policy::mta_sts` (sans-IO, unit-tested).
//!
//! - **Discovery** ([`MtaSts::policy_for`], on the executor, async): the
//!   `_mta-sts.DOMAIN` TXT record through our resolver, then
//!   [`sluice_policy::mta_sts::plan`] against the cached policy.
//! - **Fetch** (off the executors): the executor resolves `mta-sts.DOMAIN`
//!   through our resolver and hands the addresses to the MTA-STS management
//!   thread, which runs each fetch on a short-lived thread of its own:
//!   `https://mta-sts.DOMAIN/.well-known/mta-sts.txt` over rustls, the
//!   certificate verified against the web PKI (plus `delivery.tls_ca_file`)
//!   for that name, no redirects (only a 200 is accepted), at most 64 KiB of
//!   body, the whole fetch bounded by `delivery.mta_sts_fetch_timeout`.
//! - **Cache**: in memory for every core, persisted in the spool's
//!   `mta-sts` record table (LMDB) by the management thread, loaded at start.
//!   A policy is used until `max_age` runs out; a new TXT id fetches again;
//!   a failed fetch keeps a cached policy while it is fresh (§5.1).
//! - **Proactive refresh** (§5.1): a policy past half its max_age is
//!   re-fetched before it expires, under the same id — when a delivery uses
//!   it (the delivery goes on with the cached policy; it does not wait), and
//!   by a sweep of the management thread every
//!   `delivery.mta_sts_refresh_interval`, so policies of domains with no
//!   traffic stay fresh too. Decisions in `sluice_policy::mta_sts`
//!   (`should_refresh`, `refresh_sweep`: bounded per sweep, failed attempts
//!   retried after an eighth of max_age). A refresh resolves `mta-sts.DOMAIN`
//!   on its fetch thread (`sluice_dns::addresses_blocking`, the configured
//!   servers; no executor involved). A failed refresh changes nothing: the
//!   cached policy holds until it really expires.
//! - **Cold miss**: the first delivery to a domain with a TXT record but no
//!   cached policy waits for the fetch (at most the fetch timeout); if the
//!   fetch fails, it goes on under the configured policy, as RFC 8461 §5.1
//!   says for a domain without a usable policy.
//!
//! What a policy does ([`Sts`], applied in `site.rs` and `outbound.rs`):
//! `enforce` → MX hosts that match no `mx` pattern are not used, and TLS must
//! verify against the web PKI for the MX host name (`tls_policy` level
//! verify, basis MTA-STS; 4.7.x deferral otherwise); `testing` → delivery as
//! configured, failures logged and counted; `none` → nothing. A host with a
//! DANE policy gets DANE instead (`tls_policy::select`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use rustls::pki_types::ServerName;
use sluice_dns::{QueryType, Record, Resolver};
use sluice_policy::mta_sts::{self, Cached, Mode, Plan, Txt, MAX_BODY, MAX_HEAD};

use super::tls_policy::{Basis, Level, TlsPolicy};

/// The record table in the spool directory.
pub const TABLE: &str = "mta-sts";
/// Fetches running at once; more fail at once (and are retried with the
/// next delivery).
const MAX_IN_FLIGHT: usize = 64;

/// Why a policy fetch failed; `label` is the metric's `result`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("no address for {0}")]
    NoAddress(String),
    #[error("connect: {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Http(String),
    #[error("{0}")]
    Policy(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Busy(&'static str),
}

impl FetchError {
    /// The policy was fetched but is not a valid policy (`sts-policy-invalid`
    /// in TLS reports; every other failure is `sts-policy-fetch-error`).
    pub fn invalid_policy(&self) -> bool {
        matches!(self, FetchError::Policy(_))
    }

    pub fn label(&self) -> &'static str {
        match self {
            FetchError::NoAddress(_) => "no_address",
            FetchError::Connect(_) => "connect_failed",
            FetchError::Tls(_) => "tls_failed",
            FetchError::Http(_) => "http_failed",
            FetchError::Policy(_) => "invalid_policy",
            FetchError::Timeout(_) => "timeout",
            FetchError::Busy(_) => "busy",
        }
    }
}

/// Every `result` label of `sluice_mta_sts_fetches_total`.
pub const FETCH_RESULTS: [&str; 8] = [
    "ok",
    "no_address",
    "connect_failed",
    "tls_failed",
    "http_failed",
    "invalid_policy",
    "timeout",
    "busy",
];

/// Where the policy in use came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The cache (memory, loaded from LMDB at start).
    Cache,
    /// Fetched for this delivery.
    Fetched,
}

/// MTA-STS's word on a destination domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sts {
    /// No policy applies (why).
    Off(String),
    /// A policy applies. `note`: a failed refresh, when the cached policy is
    /// used in its place.
    Policy {
        cached: Arc<Cached>,
        source: Source,
        note: Option<String>,
    },
    /// The domain publishes an `_mta-sts` TXT record but its policy could not
    /// be fetched or did not parse, and no cached policy is fresh: no policy
    /// applies (RFC 8461 §5.1), and TLS-RPT reports the failure
    /// (`sts-policy-fetch-error` / `sts-policy-invalid`, RFC 8460 §4.3.2).
    FetchFailed(FetchError),
}

impl Sts {
    /// The mode in force (None when no policy applies, or its mode is none).
    pub fn mode(&self) -> Option<Mode> {
        match self {
            Sts::Policy { cached, .. } if cached.policy.mode != Mode::None => {
                Some(cached.policy.mode)
            }
            _ => None,
        }
    }

    /// Why MX host `host` must not be used, if it must not: an enforced
    /// policy whose patterns it does not match (§4.1).
    pub fn skip_reason(&self, host: &str) -> Option<String> {
        match self {
            Sts::Policy { cached, .. } if cached.policy.mode == Mode::Enforce => {
                (!cached.policy.matches(host)).then(|| {
                    format!(
                        "MTA-STS (enforce): MX host {host} matches no mx of the policy ({})",
                        cached.policy.mx.join(" ")
                    )
                })
            }
            _ => None,
        }
    }

    /// A testing policy's MX mismatch: logged, the host still used.
    pub fn testing_mismatch(&self, host: &str) -> bool {
        matches!(self, Sts::Policy { cached, .. }
            if cached.policy.mode == Mode::Testing && !cached.policy.matches(host))
    }
}

impl std::fmt::Display for Sts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sts::Off(why) => write!(f, "off ({why})"),
            Sts::FetchFailed(e) => write!(f, "off (policy fetch failed: {e})"),
            Sts::Policy {
                cached,
                source,
                note,
            } => {
                write!(
                    f,
                    "mode {}, mx {}, id {}, source {}, expires {}",
                    cached.policy.mode,
                    cached.policy.mx.join(" "),
                    cached.id,
                    match source {
                        Source::Cache => "cache",
                        Source::Fetched => "fetched",
                    },
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_secs(cached.expires())
                    )
                )?;
                if let Some(note) = note {
                    write!(f, " ({note})")?;
                }
                Ok(())
            }
        }
    }
}

/// The policy an enforced MTA-STS policy imposes on a session: `verify`
/// against the web PKI for the MX host name (RFC 8461 §4.2). None for other
/// modes, and when the configured level is `none` (the operator turned TLS
/// off for the destination) or mandatory DANE (DANE alone decides).
pub fn policy(mode: Option<Mode>, configured: &TlsPolicy) -> Option<TlsPolicy> {
    match (mode, configured.level) {
        (Some(Mode::Enforce), Level::Opportunistic | Level::Required | Level::Verify) => {
            Some(TlsPolicy {
                level: Level::Verify,
                basis: Basis::MtaSts,
                implicit: configured.implicit,
            })
        }
        _ => None,
    }
}

/// Where a fetch's result goes.
type Waiter = oneshot::Sender<Result<Arc<Cached>, FetchError>>;

/// A fetch asked of the management thread.
struct Request {
    domain: String,
    id: String,
    addrs: Vec<IpAddr>,
    reply: Waiter,
}

enum Msg {
    Fetch(Request),
    Done {
        domain: String,
        id: String,
        result: Result<mta_sts::Policy, FetchError>,
    },
    /// An expired policy to drop from the table.
    Forget(String),
    /// A delivery used a policy that is due for a refresh.
    Refresh(String),
}

/// Settings of the fetch.
#[derive(Clone)]
pub struct FetchConfig {
    pub timeout: Duration,
    /// 443 in production (`delivery.mta_sts_https_port`; tests use others).
    pub port: u16,
    /// rustls with the web PKI roots plus `delivery.tls_ca_file`, verifying.
    pub tls: Arc<rustls::ClientConfig>,
    /// The DNS servers a refresh resolves `mta-sts.DOMAIN` with (blocking,
    /// on the fetch thread).
    pub dns: sluice_dns::ResolverConfig,
    /// How often the management thread sweeps the cache for policies due for
    /// a refresh (`delivery.mta_sts_refresh_interval`). None: no proactive
    /// refresh at all (`sluice debug tls`, whose memory is thrown away).
    pub refresh_interval: Option<Duration>,
}

/// Most refreshes one sweep starts (the rest wait for the next sweep).
const REFRESH_PER_SWEEP: usize = 16;

/// MTA-STS state shared by every core.
pub struct MtaSts {
    enabled: bool,
    refresh: bool,
    timeout: Duration,
    cache: Arc<Mutex<HashMap<String, Arc<Cached>>>>,
    tx: mpsc::Sender<Msg>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl MtaSts {
    /// Loads the cached policies from `<spool_path>/mta-sts` and starts the
    /// management thread. A table that cannot be opened leaves the cache in
    /// memory only (logged): MTA-STS still works, it just refetches after a
    /// restart. `persist`: whether fetched policies are written back to the
    /// table. The relay persists; `sluice debug tls` does not: it reads the
    /// relay's table, and what it fetches stays in its own memory, so the
    /// table only ever holds what the running relay itself has in memory.
    pub fn start(
        enabled: bool,
        spool_path: Option<PathBuf>,
        persist: bool,
        fetch: FetchConfig,
    ) -> std::io::Result<Arc<MtaSts>> {
        let table = match spool_path {
            Some(path) if enabled => match sluice_spool::RecordTable::open(&path, TABLE) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(error = %e, "MTA-STS: policy table unavailable, caching in memory only");
                    None
                }
            },
            _ => None,
        };
        let mut loaded = HashMap::new();
        if let Some(t) = &table {
            match t.all() {
                Ok(rows) => {
                    for (domain, bytes) in rows {
                        match serde_json::from_slice::<Cached>(&bytes) {
                            Ok(c) => {
                                loaded.insert(domain, Arc::new(c));
                            }
                            Err(e) => {
                                tracing::warn!(%domain, error = %e, "MTA-STS: unreadable cached policy dropped");
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "MTA-STS: reading the policy table"),
            }
        }
        if enabled {
            tracing::info!(policies = loaded.len(), "MTA-STS: cached policies loaded");
        }
        let table = table.filter(|_| persist);
        let cache = Arc::new(Mutex::new(loaded));
        let (tx, rx) = mpsc::channel();
        let timeout = fetch.timeout;
        let refresh = fetch.refresh_interval.is_some();
        if enabled {
            let manager = Manager {
                table,
                cache: cache.clone(),
                fetch,
                tx: tx.clone(),
                waiting: HashMap::new(),
                tried: HashMap::new(),
            };
            std::thread::Builder::new()
                .name("mta-sts".into())
                .spawn(move || manager.run(rx))?;
        }
        Ok(Arc::new(MtaSts {
            enabled,
            refresh,
            timeout,
            cache,
            tx,
        }))
    }

    fn cached(&self, domain: &str) -> Option<Arc<Cached>> {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(domain)
            .cloned()
    }

    /// MTA-STS's word on `domain` now: the TXT record looked up, the cache
    /// consulted, the policy fetched when it must be (waiting for it at most
    /// the fetch timeout). The delivery and `sluice debug tls` both call this.
    pub async fn policy_for(&self, resolver: &Resolver, domain: &str) -> Sts {
        if !self.enabled {
            return Sts::Off("delivery.mta_sts = false".into());
        }
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let txt = match resolver
            .lookup(&format!("_mta-sts.{domain}"), QueryType::Txt)
            .await
        {
            Ok(lookup) => match mta_sts::txt_id(lookup.txt_strings()) {
                Ok(Some(id)) => Txt::Id(id),
                Ok(None) => Txt::Absent,
                Err(e) => Txt::Failed(e.to_string()),
            },
            Err(e) => Txt::Failed(e.to_string()),
        };
        let cached = self.cached(&domain);
        match mta_sts::plan(&txt, cached.as_deref(), now_secs()) {
            Plan::UseCached => match cached {
                Some(cached) => {
                    if self.refresh && cached.refresh_due(now_secs()) {
                        // Refreshed in the background; this delivery uses
                        // the cached policy, which is still fresh.
                        let _ = self.tx.send(Msg::Refresh(domain.clone()));
                    }
                    Sts::Policy {
                        cached,
                        source: Source::Cache,
                        note: match txt {
                            Txt::Failed(why) => Some(format!("TXT lookup: {why}")),
                            _ => None,
                        },
                    }
                }
                None => Sts::Off("no cached policy".into()),
            },
            Plan::NoPolicy(why) => {
                if cached.is_some() {
                    let _ = self.tx.send(Msg::Forget(domain.clone()));
                }
                let why = match txt {
                    Txt::Failed(e) => format!("{why}: {e}"),
                    _ => why.to_string(),
                };
                Sts::Off(why)
            }
            Plan::Fetch { id } => {
                let result = self.fetch(resolver, &domain, id).await;
                let fresh = cached.filter(|c| c.is_fresh(now_secs()));
                match (result, fresh) {
                    (Ok(new), _) => Sts::Policy {
                        cached: new,
                        source: Source::Fetched,
                        note: None,
                    },
                    (Err(e), Some(old)) => {
                        tracing::info!(%domain, error = %e, id = %old.id, "MTA-STS: policy fetch failed, cached policy kept");
                        Sts::Policy {
                            cached: old,
                            source: Source::Cache,
                            note: Some(format!("refresh failed: {e}")),
                        }
                    }
                    (Err(e), None) => {
                        tracing::info!(%domain, error = %e, "MTA-STS: policy fetch failed, no cached policy: configured TLS policy applies");
                        Sts::FetchFailed(e)
                    }
                }
            }
        }
    }

    /// Resolves `mta-sts.DOMAIN` here (our resolver, async) and has the
    /// management thread fetch the policy.
    async fn fetch(
        &self,
        resolver: &Resolver,
        domain: &str,
        id: String,
    ) -> Result<Arc<Cached>, FetchError> {
        let host = format!("mta-sts.{domain}");
        let mut addrs = Vec::new();
        for qt in [QueryType::A, QueryType::Aaaa] {
            if let Ok(l) = resolver.lookup(&host, qt).await {
                for r in l.records() {
                    match r {
                        Record::A(ip, _) => addrs.push(IpAddr::V4(*ip)),
                        Record::Aaaa(ip, _) => addrs.push(IpAddr::V6(*ip)),
                        _ => {}
                    }
                }
            }
        }
        let (reply, rx) = oneshot::channel();
        let request = Request {
            domain: domain.to_string(),
            id,
            addrs,
            reply,
        };
        if self.tx.send(Msg::Fetch(request)).is_err() {
            return Err(FetchError::Busy("MTA-STS thread gone"));
        }
        // The thread bounds the fetch; this bound covers a thread that does not answer.
        match crate::time::within(self.timeout + Duration::from_secs(2), rx).await {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(FetchError::Busy("MTA-STS thread dropped the request")),
            None => Err(FetchError::Timeout(self.timeout)),
        }
    }
}

/// The management thread: fetches (each on a thread of its own, one per
/// domain at a time), the table writes, the cache updates.
struct Manager {
    table: Option<sluice_spool::RecordTable>,
    cache: Arc<Mutex<HashMap<String, Arc<Cached>>>>,
    fetch: FetchConfig,
    tx: mpsc::Sender<Msg>,
    /// Fetches in flight: who waits for each domain's (nobody, for a refresh).
    waiting: HashMap<String, Vec<Waiter>>,
    /// When a refresh of each domain's policy was last started (Unix seconds).
    tried: HashMap<String, u64>,
}

impl Manager {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut next_sweep = self.fetch.refresh_interval.map(|i| Instant::now() + i);
        loop {
            let msg = match next_sweep {
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(msg) => Some(msg),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                },
                None => match rx.recv() {
                    Ok(msg) => Some(msg),
                    Err(_) => return,
                },
            };
            match msg {
                Some(Msg::Fetch(req)) => self.start_fetch(req),
                Some(Msg::Done { domain, id, result }) => self.finish(domain, id, result),
                Some(Msg::Forget(domain)) => self.forget_expired(&domain),
                Some(Msg::Refresh(domain)) => {
                    let now = now_secs();
                    let due = self.cached(&domain).is_some_and(|c| {
                        mta_sts::should_refresh(&c, self.tried.get(&domain).copied(), now)
                    });
                    if due {
                        self.start_refresh(domain);
                    }
                }
                None => {
                    self.sweep();
                    next_sweep = self.fetch.refresh_interval.map(|i| Instant::now() + i);
                }
            }
        }
    }

    fn cached(&self, domain: &str) -> Option<Arc<Cached>> {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(domain)
            .cloned()
    }

    fn forget_expired(&mut self, domain: &str) {
        let expired = {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            let expired = cache.get(domain).is_some_and(|c| !c.is_fresh(now_secs()));
            if expired {
                cache.remove(domain);
            }
            expired
        };
        if expired {
            self.tried.remove(domain);
            tracing::info!(%domain, "MTA-STS: cached policy expired, dropped");
            if let Some(t) = &self.table {
                if let Err(e) = t.delete(domain) {
                    tracing::warn!(%domain, error = %e, "MTA-STS: dropping an expired policy");
                }
            }
        }
    }

    /// The periodic sweep: expired policies dropped, those due refreshed
    /// (at most [`REFRESH_PER_SWEEP`], and never past the fetch bound).
    fn sweep(&mut self) {
        let now = now_secs();
        let snapshot: Vec<(String, Arc<Cached>)> = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(d, c)| (d.clone(), c.clone()))
            .collect();
        for (domain, cached) in &snapshot {
            if !cached.is_fresh(now) {
                self.forget_expired(domain);
            }
        }
        let room = MAX_IN_FLIGHT
            .saturating_sub(self.waiting.len())
            .min(REFRESH_PER_SWEEP);
        let due: Vec<String> = mta_sts::refresh_sweep(
            snapshot
                .iter()
                .filter(|(d, _)| !self.waiting.contains_key(d))
                .map(|(d, c)| (d.as_str(), &**c, self.tried.get(d).copied())),
            now,
            room,
        )
        .into_iter()
        .map(str::to_string)
        .collect();
        for domain in due {
            self.start_refresh(domain);
        }
    }

    /// Re-fetches a cached policy under its id, nobody waiting: the fetch
    /// thread resolves `mta-sts.DOMAIN` itself (blocking DNS, off the
    /// executors).
    fn start_refresh(&mut self, domain: String) {
        let Some(cached) = self.cached(&domain) else {
            return;
        };
        if self.waiting.contains_key(&domain) || self.waiting.len() >= MAX_IN_FLIGHT {
            return;
        }
        self.tried.insert(domain.clone(), now_secs());
        self.waiting.insert(domain.clone(), Vec::new());
        tracing::info!(%domain, id = %cached.id, "MTA-STS: refreshing the cached policy");
        self.spawn_fetch(domain, cached.id.clone(), |domain, fetch| {
            let host = format!("mta-sts.{domain}");
            match sluice_dns::addresses_blocking(&fetch.dns, &host) {
                Ok(addrs) => fetch_policy(domain, &addrs, fetch),
                Err(e) => Err(FetchError::NoAddress(format!("{host}: {e}"))),
            }
        });
    }

    fn start_fetch(&mut self, req: Request) {
        if let Some(waiters) = self.waiting.get_mut(&req.domain) {
            waiters.push(req.reply);
            return;
        }
        if self.waiting.len() >= MAX_IN_FLIGHT {
            crate::metrics::mta_sts_fetch("busy");
            let _ = req
                .reply
                .send(Err(FetchError::Busy("too many MTA-STS fetches in flight")));
            return;
        }
        self.waiting.insert(req.domain.clone(), vec![req.reply]);
        let addrs = req.addrs;
        self.spawn_fetch(req.domain, req.id, move |domain, fetch| {
            fetch_policy(domain, &addrs, fetch)
        });
    }

    /// Runs one fetch on its own thread; its result comes back as
    /// `Msg::Done`, or at once here when no thread could be started.
    fn spawn_fetch(
        &mut self,
        domain: String,
        id: String,
        job: impl FnOnce(&str, &FetchConfig) -> Result<mta_sts::Policy, FetchError> + Send + 'static,
    ) {
        let fetch = self.fetch.clone();
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("mta-sts-fetch".into())
            .spawn({
                let domain = domain.clone();
                let id = id.clone();
                move || {
                    let result = job(&domain, &fetch);
                    let _ = tx.send(Msg::Done { domain, id, result });
                }
            });
        if let Err(e) = spawned {
            self.finish(
                domain,
                id,
                Err(FetchError::Connect(format!("no fetch thread: {e}"))),
            );
        }
    }

    fn finish(&mut self, domain: String, id: String, result: Result<mta_sts::Policy, FetchError>) {
        let waiters = self.waiting.remove(&domain).unwrap_or_default();
        let result = match result {
            Ok(policy) => {
                crate::metrics::mta_sts_fetch("ok");
                let cached = Arc::new(Cached {
                    id,
                    policy,
                    fetched: now_secs(),
                });
                tracing::info!(%domain, id = %cached.id, policy = %cached.policy, "MTA-STS: policy fetched");
                if let Some(t) = &self.table {
                    let stored = serde_json::to_vec(&*cached)
                        .map_err(|e| e.to_string())
                        .and_then(|bytes| t.put(&domain, &bytes).map_err(|e| e.to_string()));
                    if let Err(e) = stored {
                        tracing::warn!(%domain, error = %e, "MTA-STS: storing the policy");
                    }
                }
                self.cache
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(domain, cached.clone());
                Ok(cached)
            }
            Err(e) => {
                crate::metrics::mta_sts_fetch(e.label());
                if let Some(old) = self.cached(&domain).filter(|c| c.is_fresh(now_secs())) {
                    tracing::info!(%domain, error = %e, id = %old.id, expires = old.expires(), "MTA-STS: policy refresh failed, cached policy kept until it expires");
                }
                Err(e)
            }
        };
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

/// Fetches and parses `https://mta-sts.DOMAIN/.well-known/mta-sts.txt` from
/// `addrs` (blocking; on a fetch thread). Every step is bounded by what is
/// left of the fetch timeout.
fn fetch_policy(
    domain: &str,
    addrs: &[IpAddr],
    cfg: &FetchConfig,
) -> Result<mta_sts::Policy, FetchError> {
    let host = format!("mta-sts.{domain}");
    if addrs.is_empty() {
        return Err(FetchError::NoAddress(host));
    }
    let deadline = Instant::now() + cfg.timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(FetchError::Timeout(cfg.timeout))
    };
    let mut last = FetchError::NoAddress(host.clone());
    let mut tcp = None;
    for ip in addrs {
        match TcpStream::connect_timeout(&SocketAddr::new(*ip, cfg.port), left()?) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = FetchError::Connect(format!("{ip}:{}: {e}", cfg.port)),
        }
    }
    let Some(mut tcp) = tcp else {
        return Err(last);
    };
    let name =
        ServerName::try_from(host.clone()).map_err(|e| FetchError::Tls(format!("{host}: {e}")))?;
    let mut conn = rustls::ClientConnection::new(cfg.tls.clone(), name)
        .map_err(|e| FetchError::Tls(e.to_string()))?;
    let io_err = |e: std::io::Error| -> FetchError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                FetchError::Timeout(cfg.timeout)
            }
            _ => match e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                Some(tls) => FetchError::Tls(tls.to_string()),
                None => FetchError::Connect(e.to_string()),
            },
        }
    };
    // The handshake (certificate verified for mta-sts.DOMAIN by the config's
    // verifier), each step within what is left of the timeout.
    while conn.is_handshaking() {
        let t = left()?;
        tcp.set_read_timeout(Some(t)).map_err(io_err)?;
        tcp.set_write_timeout(Some(t)).map_err(io_err)?;
        conn.complete_io(&mut tcp).map_err(io_err)?;
    }
    let port = if cfg.port == 443 {
        String::new()
    } else {
        format!(":{}", cfg.port)
    };
    let request = format!(
        "GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}{port}\r\nUser-Agent: sluice\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    );
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    tls.write_all(request.as_bytes()).map_err(io_err)?;
    tls.flush().map_err(io_err)?;
    let limit = MAX_HEAD + MAX_BODY;
    let mut response = Vec::with_capacity(8 * 1024);
    let mut buf = [0u8; 8 * 1024];
    let mut complete = false;
    while response.len() <= limit {
        let t = left()?;
        tls.sock.set_read_timeout(Some(t)).map_err(io_err)?;
        match tls.read(&mut buf) {
            Ok(0) => {
                complete = true;
                break;
            }
            Ok(n) => {
                response.extend_from_slice(&buf[..n]);
                // Complete by its length or last chunk, or refused by its
                // status: done, whether or not the server closes.
                if mta_sts::http_done(&response) {
                    break;
                }
            }
            // A server that closes without close_notify: the length checks
            // in `http_body` still catch a cut-off body.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                complete = true;
                break;
            }
            Err(e) => return Err(io_err(e)),
        }
    }
    let body =
        mta_sts::http_body(&response, complete).map_err(|e| FetchError::Http(e.to_string()))?;
    mta_sts::parse_policy(&body).map_err(|e| FetchError::Policy(e.to_string()))
}
