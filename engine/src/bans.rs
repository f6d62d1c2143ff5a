//! Auto-bans in the relay (`[ban]`): offences counted by
//! `sluice_policy::ban::OffenceCounter` (all cores together), bans held in
//! memory for the check at connect (one mutex lock per connection, like the
//! per-IP connection count) and stored in LMDB (`<spool.path>/bans`) so they
//! survive a restart.
//!
//! Cores never commit: a new, changed or lifted ban goes over a bounded
//! channel to the bans thread, which writes them in order (and purges expired
//! ones once a minute). The management API lists from memory and sends its
//! adds and removes through the same thread, so a store never sees them out of
//! order.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sluice_policy::ban::{Ban, BanPolicy, Offence, OffenceCounter};
use sluice_spool::{BanStore, SpoolError, StoredBan};

/// Writes queued for the bans thread at most.
const CHANNEL: usize = 4_096;
/// How often the bans thread purges expired bans.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// Longest reason kept.
const MAX_REASON: usize = 200;

static INSTALLED: OnceLock<Arc<Bans>> = OnceLock::new();

/// The running bans, when `[ban]` is enabled.
pub fn installed() -> Option<&'static Arc<Bans>> {
    INSTALLED.get()
}

/// Makes `b` the running bans (once per process).
pub fn install(b: Arc<Bans>) {
    let _ = INSTALLED.set(b);
}

enum Write {
    Put(IpAddr, Ban),
    Remove(IpAddr),
}

pub struct Bans {
    counter: OffenceCounter,
    active: Mutex<HashMap<IpAddr, Ban>>,
    writes: SyncSender<Write>,
}

impl std::fmt::Debug for Bans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bans").finish_non_exhaustive()
    }
}

fn stored(b: &Ban) -> StoredBan {
    StoredBan {
        reason: b.reason.clone(),
        added_unix_ms: b.added_unix_ms,
        until_unix_ms: b.until_unix_ms,
    }
}

impl Bans {
    /// Loads the stored bans still in force and starts the bans thread.
    pub fn start(store: BanStore, policy: BanPolicy, now_ms: u64) -> Result<Arc<Bans>, SpoolError> {
        match store.purge_expired(now_ms) {
            Ok(n) if n > 0 => tracing::info!(purged = n, "expired bans removed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "ban list purge failed"),
        }
        let mut active = HashMap::new();
        for (addr, b) in store.all()? {
            let Ok(ip) = addr.parse::<IpAddr>() else {
                continue;
            };
            active.insert(
                ip,
                Ban {
                    reason: b.reason,
                    added_unix_ms: b.added_unix_ms,
                    until_unix_ms: b.until_unix_ms,
                },
            );
        }
        if !active.is_empty() {
            tracing::info!(bans = active.len(), "bans loaded");
        }
        crate::metrics::bans_active(active.len());
        let (tx, rx) = sync_channel::<Write>(CHANNEL);
        std::thread::Builder::new()
            .name("sluice-bans".into())
            .spawn(move || loop {
                match rx.recv_timeout(PURGE_EVERY) {
                    Ok(Write::Put(ip, ban)) => {
                        if let Err(e) = store.put(&ip.to_string(), &stored(&ban)) {
                            tracing::warn!(client_ip = %ip, error = %e, "ban not stored");
                        }
                    }
                    Ok(Write::Remove(ip)) => {
                        if let Err(e) = store.remove(&ip.to_string()) {
                            tracing::warn!(client_ip = %ip, error = %e, "ban removal not stored");
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        if let Err(e) = store.purge_expired(crate::time::now_ms()) {
                            tracing::warn!(error = %e, "ban list purge failed");
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            })
            .map_err(|e| SpoolError::Io(format!("starting the bans thread: {e}")))?;
        Ok(Arc::new(Bans {
            counter: OffenceCounter::new(policy),
            active: Mutex::new(active),
            writes: tx,
        }))
    }

    /// The ban in force on `ip` at `now_ms`, if any.
    pub fn banned(&self, ip: IpAddr, now_ms: u64) -> Option<Ban> {
        let ip = ip.to_canonical();
        let mut active = self.active.lock().ok()?;
        match active.get(&ip) {
            Some(b) if b.active(now_ms) => Some(b.clone()),
            Some(_) => {
                // Ended: forgotten here; the bans thread purges the store.
                active.remove(&ip);
                crate::metrics::bans_active(active.len());
                None
            }
            None => None,
        }
    }

    /// Whether offences of this kind are counted (cheap: a field test).
    pub fn counts(&self, kind: Offence) -> bool {
        self.counter.counts(kind)
    }

    /// An offence by `ip`; bans it when that reaches the threshold.
    pub fn offence(&self, ip: IpAddr, kind: Offence, now_ms: u64) {
        if !self.counts(kind) {
            return;
        }
        crate::metrics::ban_offence(kind.as_str());
        let Some(ban) = self.counter.offence(ip, kind, now_ms) else {
            return;
        };
        tracing::warn!(
            target: "sluice::smtp",
            client_ip = %ip,
            offence = kind.as_str(),
            reason = %ban.reason,
            until_unix_ms = ban.until_unix_ms,
            "address banned"
        );
        crate::metrics::banned(kind.as_str());
        self.set(ip.to_canonical(), ban);
    }

    fn set(&self, ip: IpAddr, ban: Ban) {
        if let Ok(mut active) = self.active.lock() {
            active.insert(ip, ban.clone());
            crate::metrics::bans_active(active.len());
        }
        self.send(Write::Put(ip, ban));
    }

    fn send(&self, w: Write) {
        match self.writes.try_send(w) {
            Ok(()) => {}
            // The ban holds in memory; only a restart would forget it.
            Err(TrySendError::Full(_)) => {
                tracing::warn!("bans thread behind: a ban change was not stored")
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::warn!("bans thread gone: a ban change was not stored")
            }
        }
    }

    /// An operator's ban (the API thread). Err: bad input.
    pub fn add(
        &self,
        address: &str,
        duration_ms: Option<u64>,
        reason: &str,
        now_ms: u64,
    ) -> Result<(IpAddr, Ban), String> {
        let ip: IpAddr = address
            .trim()
            .parse()
            .map_err(|_| format!("`{address}` is not an IP address"))?;
        let ip = ip.to_canonical();
        let ban = Ban {
            reason: reason.chars().take(MAX_REASON).collect(),
            added_unix_ms: now_ms,
            until_unix_ms: now_ms
                .saturating_add(duration_ms.unwrap_or(self.counter.policy().duration_ms)),
        };
        self.set(ip, ban.clone());
        Ok((ip, ban))
    }

    /// Lifts a ban; false when there was none. Err: bad input.
    pub fn remove(&self, address: &str) -> Result<(IpAddr, bool), String> {
        let ip: IpAddr = address
            .trim()
            .parse()
            .map_err(|_| format!("`{address}` is not an IP address"))?;
        let ip = ip.to_canonical();
        let removed = match self.active.lock() {
            Ok(mut active) => {
                let removed = active.remove(&ip).is_some();
                crate::metrics::bans_active(active.len());
                removed
            }
            Err(_) => false,
        };
        self.send(Write::Remove(ip));
        Ok((ip, removed))
    }

    /// Bans in force, soonest to end first, at most `limit`.
    pub fn list(&self, now_ms: u64, limit: usize) -> Vec<(IpAddr, Ban)> {
        let Ok(active) = self.active.lock() else {
            return Vec::new();
        };
        let mut all: Vec<(IpAddr, Ban)> = active
            .iter()
            .filter(|(_, b)| b.active(now_ms))
            .map(|(ip, b)| (*ip, b.clone()))
            .collect();
        all.sort_by_key(|(ip, b)| (b.until_unix_ms, *ip));
        all.truncate(limit);
        all
    }
}
