//! Egress pools in the relay: which member of a rule's `[pool.NAME]` a
//! message leaves from, and the warm-up counters, kept across restarts in
//! `<spool.path>/warmup`.
//!
//! * The choice (`sluice_policy::pool`, sans-IO) is made by the shard owner
//!   when it routes a message: smooth weighted round robin among the members
//!   that are usable now — not held by a shaping `suspend-source-ip` action
//!   for the destination, not found unavailable on this host (EADDRNOTAVAIL
//!   at bind), and under their warm-up cap for the day. The chosen member's
//!   address and EHLO name become the job's strategy, so its site, limits and
//!   shaping are those of that address. None usable: the recipients are
//!   deferred with a 451 saying so.
//! * The state is process-wide behind one mutex (pools are only consulted
//!   for rules that name one; nothing else takes the lock).
//! * A warming member's budget is reserved when it is chosen (delivered plus
//!   in flight must stay under the cap, so a burst cannot overshoot it) and
//!   counted only when the attempt delivers ([`settle`]): a deferred or
//!   failed attempt, or one that never left (held by the queue's limits, the
//!   operator's suspension), gives the reservation back. Counted values are
//!   handed to a writer thread that stores them (never written on an
//!   executor); reservations are memory only, as is what they stand for.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, OnceLock, PoisonError};

use sluice_policy::pool::{counter_key, decode_counter, unix_day, Picker, WarmupCounts};
use sluice_spool::{RecordTable, Reply, SpoolError};

use super::config::DeliveryConfig;
use super::job::{Job, Strategy, Target};
use super::routing::MxHosts;

/// Directory (and table) name under the spool path.
pub const WARMUP_DIR: &str = "warmup";
/// How long a source address that could not be bound is left out.
const UNAVAILABLE_MS: u64 = 300_000;
/// Most source addresses remembered as unavailable.
const MAX_UNAVAILABLE: usize = 4096;

#[derive(Default)]
struct Inner {
    picker: Picker,
    counts: WarmupCounts,
    /// Source address → until when it is left out.
    unavailable: HashMap<IpAddr, u64>,
}

/// Process-wide pool state.
pub struct PoolState {
    inner: Mutex<Inner>,
    /// Counter keys to store (the writer reads their current value).
    dirty: Mutex<Option<mpsc::Sender<String>>>,
}

static INSTALLED: OnceLock<Arc<PoolState>> = OnceLock::new();

fn installed() -> Option<&'static Arc<PoolState>> {
    INSTALLED.get()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PoolState {
    /// Opens the warm-up table under `spool_path`, restores today's counters
    /// (older ones are removed) and starts the writer thread. Blocking.
    pub fn open(spool_path: &Path, now: u64) -> Result<Arc<PoolState>, SpoolError> {
        let table = RecordTable::open(spool_path, WARMUP_DIR)?;
        let today = unix_day(now);
        let mut inner = Inner::default();
        for (key, value) in table.all()? {
            match std::str::from_utf8(&value).ok().and_then(decode_counter) {
                Some((day, count)) if day == today => inner.counts.restore(key, day, count),
                _ => table.delete(&key)?,
            }
        }
        let (tx, rx) = mpsc::channel::<String>();
        let state = Arc::new(PoolState {
            inner: Mutex::new(inner),
            dirty: Mutex::new(Some(tx)),
        });
        let me = state.clone();
        std::thread::Builder::new()
            .name("warmup-store".into())
            .spawn(move || me.write_loop(&rx, &table))
            .map_err(|e| SpoolError::Io(format!("warm-up writer thread: {e}")))?;
        Ok(state)
    }

    /// Stores each counter named on `rx` with its value at the time of the
    /// write (one thread, so the last write of a key is its latest value).
    fn write_loop(&self, rx: &mpsc::Receiver<String>, table: &RecordTable) {
        while let Ok(first) = rx.recv() {
            let mut keys = BTreeSet::from([first]);
            keys.extend(rx.try_iter());
            for key in keys {
                let Some(value) = lock(&self.inner).counts.encode(&key) else {
                    continue;
                };
                if let Err(e) = table.put(&key, value.as_bytes()) {
                    tracing::warn!(key = %key, error = %e, "warm-up counter not stored");
                }
            }
        }
    }
}

pub fn install(state: Arc<PoolState>) {
    let _ = INSTALLED.set(state);
}

/// Opens and installs the pool state unless it runs already (a reload adding
/// the first pool). Blocking: called off the executors.
pub fn open_if_needed(spool_path: &Path, now: u64) -> Result<(), SpoolError> {
    // The reloader's mutex keeps two reloads from racing here.
    if installed().is_none() {
        install(PoolState::open(spool_path, now)?);
    }
    Ok(())
}

/// A bind to `ip` failed with EADDRNOTAVAIL: the pools leave it out for a while.
pub fn source_unavailable(ip: IpAddr, now: u64) {
    let Some(state) = installed() else { return };
    let mut inner = lock(&state.inner);
    if inner.unavailable.len() >= MAX_UNAVAILABLE {
        inner.unavailable.retain(|_, until| *until > now);
    }
    if inner.unavailable.len() < MAX_UNAVAILABLE {
        tracing::warn!(source_ip = %ip, "source address not available on this host: left out of its pools for 5 minutes");
        inner.unavailable.insert(ip, now + UNAVAILABLE_MS);
    }
}

/// The scope a warming member's count is kept under: the provider of the
/// destination's first MX host (when the MX hosts were looked up), else the
/// destination.
fn scope(cfg: &DeliveryConfig, target: &Target, mx: Option<&MxHosts>) -> (String, Option<String>) {
    if let (Target::Mx { domain, .. }, Some(mx)) = (target, mx) {
        let provider = mx
            .get(domain)
            .and_then(|hosts| hosts.first())
            .and_then(|h| cfg.providers.provider_of(&super::config::host_key(h)));
        if let Some(p) = provider {
            return (format!("provider:{p}"), Some(p.to_string()));
        }
    }
    (
        super::admin::normalize_destination(&target.destination()),
        None,
    )
}

/// The strategy of a message routed to pool `name`: `base` with the chosen
/// member's address and EHLO name; a 451 when no member is usable.
pub(super) fn choose(
    cfg: &DeliveryConfig,
    name: &str,
    target: &Target,
    base: &Strategy,
    mx: Option<&MxHosts>,
    now: u64,
) -> Result<Strategy, Reply> {
    let Some(pool) = cfg.pools.pools.get(name) else {
        return Err(Reply::new(
            451,
            "4.3.5",
            format!("pool {name} is not configured"),
        ));
    };
    let Some(state) = installed() else {
        return Err(Reply::new(451, "4.3.0", "pools are not running"));
    };
    let today = unix_day(now);
    let (scope, provider) = scope(cfg, target, mx);
    let shaping = super::shaping::installed();
    let mut guard = lock(&state.inner);
    let inner = &mut *guard;
    let (picker, counts, unavailable) = (&mut inner.picker, &inner.counts, &inner.unavailable);
    let picked = picker.pick(name, pool, |m| {
        if unavailable.get(&m.ip).is_some_and(|until| *until > now) {
            return false;
        }
        if shaping.is_some_and(|s| s.source_suspended(target, m.ip, now)) {
            return false;
        }
        match cfg.pools.warmup_cap(m, today, provider.as_deref()) {
            Some(cap) => counts.used(&counter_key(m.ip, &scope), today) < cap,
            None => true,
        }
    });
    let Some(i) = picked else {
        drop(guard);
        crate::metrics::pool_exhausted(name);
        tracing::info!(pool = %name, scope = %scope, "no usable source address in pool: deferred");
        return Err(Reply::new(
            451,
            "4.4.5",
            format!(
                "no usable source address in pool {name} for {scope}: every member is suspended, unavailable or over its warm-up budget"
            ),
        ));
    };
    let member = &pool.members[i];
    let mut warmup = None;
    if member.warmup.is_some() {
        let key = counter_key(member.ip, &scope);
        if !inner.counts.reserve(&key, today) {
            return Err(Reply::new(
                451,
                "4.4.5",
                format!("pool {name}: warm-up counters full"),
            ));
        }
        warmup = Some(key);
    }
    drop(guard);
    crate::metrics::pool_chosen(name);
    Ok(Strategy {
        source_ip: Some(member.ip),
        ehlo_name: member.ehlo_name.clone().or_else(|| base.ehlo_name.clone()),
        pool: Some(name.to_string()),
        tenant: base.tenant.clone(),
        message_tls: base.message_tls,
        warmup,
    })
}

/// The attempt a warm-up reservation of `key` was made for is over: a
/// delivery counts (and is stored), anything else gives it back.
pub(super) fn settle(key: &str, delivered: bool, now: u64) {
    let Some(state) = installed() else { return };
    let counted = lock(&state.inner)
        .counts
        .settle(key, unix_day(now), delivered);
    if counted.is_some() {
        if let Some(tx) = lock(&state.dirty).as_ref() {
            let _ = tx.send(key.to_string());
        }
    }
}

/// Gives back the reservations of jobs that will not be sent this time.
pub(super) fn release<'a>(jobs: impl IntoIterator<Item = &'a Job>, now: u64) {
    for job in jobs {
        if let Some(key) = &job.strategy.warmup {
            settle(key, false, now);
        }
    }
}

/// One reservation is made per member choice, but a choice's recipients may
/// travel in several jobs (split per transaction, or routes sharing a
/// target): only the first of them settles it.
pub(super) fn one_settlement_per_choice(jobs: &mut [Box<Job>]) {
    let mut seen: Vec<String> = Vec::new();
    for job in jobs {
        if let Some(key) = job.strategy.warmup.take() {
            if !seen.contains(&key) {
                seen.push(key.clone());
                job.strategy.warmup = Some(key);
            }
        }
    }
}
