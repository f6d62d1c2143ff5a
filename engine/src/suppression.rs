//! The suppression list in the relay: the LMDB store
//! (`sluice_spool::SuppressionStore`) with the configured policy
//! (`sluice_policy::suppression`, where the decisions are made with the time
//! passed in).
//!
//! - RCPT (action "refuse"): [`Suppressions::check`] is one LMDB read per
//!   scope (memory-mapped, lock-free), synchronous in the session.
//! - Delivery: a permanent failure whose class is configured is recorded by
//!   [`Suppressions::record_bounce`] on a blocking thread (an LMDB commit
//!   fsyncs); with action "drop" a suppressed recipient fails at routing.
//! - The management API lists, adds and removes from its own threads.

use std::sync::{Arc, OnceLock};

use sluice_policy::bounce::BounceClass;
use sluice_policy::suppression::{
    decide, normalize_recipient, parse_scope, Action, Entry, SuppressionPolicy,
};
use sluice_spool::{SpoolError, StoredSuppression, SuppressionRow, SuppressionStore};

static INSTALLED: OnceLock<Arc<Suppressions>> = OnceLock::new();

/// The running list, when `[suppression]` is enabled.
pub fn installed() -> Option<&'static Arc<Suppressions>> {
    INSTALLED.get()
}

/// Makes `s` the running list (once per process).
pub fn install(s: Arc<Suppressions>) {
    let _ = INSTALLED.set(s);
}

#[derive(Debug)]
pub struct Suppressions {
    store: SuppressionStore,
    policy: SuppressionPolicy,
}

fn to_entry(s: &StoredSuppression) -> Entry {
    Entry {
        class: s.class.parse().unwrap_or(BounceClass::Other),
        reason: s.reason.clone(),
        added_unix_ms: s.added_unix_ms,
        until_unix_ms: s.until_unix_ms,
    }
}

fn stored(e: &Entry) -> StoredSuppression {
    StoredSuppression {
        class: e.class.as_str().to_string(),
        reason: e.reason.clone(),
        added_unix_ms: e.added_unix_ms,
        until_unix_ms: e.until_unix_ms,
    }
}

impl Suppressions {
    pub fn new(store: SuppressionStore, policy: SuppressionPolicy) -> Suppressions {
        Suppressions { store, policy }
    }

    pub fn action(&self) -> Action {
        self.policy.action
    }

    /// The active entry suppressing `recipient` for mail from `sender` at
    /// `now`, if any. A storage error suppresses nothing (logged).
    pub fn check(&self, sender: &str, recipient: &str, now: u64) -> Option<Entry> {
        let rcpt = normalize_recipient(recipient).ok()?;
        let mut found = Vec::new();
        for scope in self.policy.lookup_scopes(sender) {
            match self.store.get(&scope, &rcpt) {
                Ok(e) => found.push(e.map(|s| to_entry(&s))),
                Err(e) => {
                    tracing::warn!(error = %e, "suppression list read failed");
                    found.push(None);
                }
            }
        }
        decide(found.iter().map(Option::as_ref), now).cloned()
    }

    /// A permanent failure: adds the recipient when its class is configured.
    /// Blocking (commits). Returns the entry added.
    pub fn record_bounce(
        &self,
        sender: &str,
        recipient: &str,
        class: BounceClass,
        reason: &str,
        now: u64,
    ) -> Result<Option<Entry>, SpoolError> {
        let Some(entry) = self.policy.on_permanent_failure(class, reason, now) else {
            return Ok(None);
        };
        let Ok(rcpt) = normalize_recipient(recipient) else {
            return Ok(None);
        };
        let scope = self.policy.record_scope(sender);
        self.store.put(&scope, &rcpt, &stored(&entry))?;
        tracing::info!(
            target: "sluice::delivery",
            scope = %scope,
            recipient = %rcpt,
            class = %class,
            until_unix_ms = entry.until_unix_ms,
            "recipient suppressed"
        );
        crate::metrics::suppression_added();
        Ok(Some(entry))
    }

    /// An operator's entry. Blocking. Err: bad input (as text) or storage.
    pub fn add(
        &self,
        scope: &str,
        recipient: &str,
        class: BounceClass,
        reason: &str,
        ttl_ms: Option<u64>,
        now: u64,
    ) -> Result<(String, String, Entry), AddError> {
        let scope = parse_scope(scope).map_err(AddError::Invalid)?;
        let rcpt = normalize_recipient(recipient).map_err(AddError::Invalid)?;
        let ttl = ttl_ms.unwrap_or(self.policy.ttl_ms);
        let entry = Entry {
            class,
            reason: reason
                .chars()
                .take(sluice_policy::suppression::MAX_REASON)
                .collect(),
            added_unix_ms: now,
            until_unix_ms: now.saturating_add(ttl),
        };
        self.store
            .put(&scope, &rcpt, &stored(&entry))
            .map_err(AddError::Storage)?;
        Ok((scope, rcpt, entry))
    }

    /// Removes an entry; false when there was none. Blocking.
    pub fn remove(&self, scope: &str, recipient: &str) -> Result<bool, AddError> {
        let scope = parse_scope(scope).map_err(AddError::Invalid)?;
        let rcpt = normalize_recipient(recipient).map_err(AddError::Invalid)?;
        self.store.remove(&scope, &rcpt).map_err(AddError::Storage)
    }

    /// Entries (active and not yet purged expired ones), at most `limit`.
    pub fn list(&self, scope: Option<&str>, limit: usize) -> Result<Vec<SuppressionRow>, AddError> {
        let scope = scope
            .map(parse_scope)
            .transpose()
            .map_err(AddError::Invalid)?;
        self.store
            .list(scope.as_deref(), limit)
            .map_err(AddError::Storage)
    }

    /// Deletes expired entries. Blocking.
    pub fn purge_expired(&self, now: u64) -> Result<usize, SpoolError> {
        self.store.purge_expired(now)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("{0}")]
    Invalid(String),
    #[error("suppression list: {0}")]
    Storage(SpoolError),
}
