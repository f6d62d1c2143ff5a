//! The suppression list on disk: a [`Table`] in `<spool path>/suppression`,
//! next to the shards, so it survives restarts and is never mistaken for a
//! shard.
//!
//! Key: `scope NUL recipient` (both already normalised by the caller);
//! value: a postcard-encoded [`StoredSuppression`]. Writes commit (and fsync)
//! in the calling thread, so callers on an executor hand them to a blocking
//! thread.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{SpoolError, Table};

/// Directory name under the spool path.
pub const SUPPRESSION_DIR: &str = "suppression";
/// Map size: ~20 million entries of ~100 bytes fit.
const MAP_SIZE: usize = 2 << 30;

/// One entry as stored. `class` is the bounce class name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSuppression {
    pub class: String,
    pub reason: String,
    pub added_unix_ms: u64,
    pub until_unix_ms: u64,
}

/// A listed entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuppressionRow {
    pub scope: String,
    pub recipient: String,
    pub entry: StoredSuppression,
}

#[derive(Debug)]
pub struct SuppressionStore {
    table: Table,
}

fn key(scope: &str, recipient: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(scope.len() + 1 + recipient.len());
    k.extend_from_slice(scope.as_bytes());
    k.push(0);
    k.extend_from_slice(recipient.as_bytes());
    k
}

/// The row a stored entry stands for; None when it does not decode.
fn row(key: &[u8], value: &[u8]) -> Option<SuppressionRow> {
    let sep = key.iter().position(|&b| b == 0)?;
    let scope = std::str::from_utf8(&key[..sep]).ok()?;
    let recipient = std::str::from_utf8(&key[sep + 1..]).ok()?;
    let entry = postcard::from_bytes::<StoredSuppression>(value).ok()?;
    Some(SuppressionRow {
        scope: scope.to_string(),
        recipient: recipient.to_string(),
        entry,
    })
}

impl SuppressionStore {
    /// Opens (creating) `spool_path/suppression`.
    pub fn open(spool_path: &Path, sync: bool) -> Result<SuppressionStore, SpoolError> {
        let table = Table::open_with(spool_path, SUPPRESSION_DIR, MAP_SIZE, sync)?;
        Ok(SuppressionStore { table })
    }

    /// The entry for (scope, recipient), expired or not.
    pub fn get(
        &self,
        scope: &str,
        recipient: &str,
    ) -> Result<Option<StoredSuppression>, SpoolError> {
        let Some(bytes) = self.table.get(&key(scope, recipient))? else {
            return Ok(None);
        };
        postcard::from_bytes(&bytes)
            .map(Some)
            .map_err(|e| SpoolError::Corrupt(format!("suppression entry: {e}")))
    }

    /// Adds or replaces an entry (commits: blocking).
    pub fn put(
        &self,
        scope: &str,
        recipient: &str,
        entry: &StoredSuppression,
    ) -> Result<(), SpoolError> {
        let value = postcard::to_allocvec(entry).map_err(|e| SpoolError::Encode(e.to_string()))?;
        self.table.put(&key(scope, recipient), &value)
    }

    /// Removes an entry; false when there was none (commits: blocking).
    pub fn remove(&self, scope: &str, recipient: &str) -> Result<bool, SpoolError> {
        self.table.delete(&key(scope, recipient))
    }

    /// Entries in key order (scope, then recipient), at most `limit`, only
    /// `scope`'s when given; undecodable entries are skipped.
    pub fn list(
        &self,
        scope: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SuppressionRow>, SpoolError> {
        let prefix = scope.map(|s| key(s, "")).unwrap_or_default();
        let mut out = Vec::new();
        self.table.visit(&prefix, |k, v| {
            if out.len() >= limit {
                return false;
            }
            out.extend(row(k, v));
            true
        })?;
        Ok(out)
    }

    /// Deletes entries whose `until_unix_ms` is at or before `now` (and any
    /// that do not decode); returns how many (commits: blocking).
    pub fn purge_expired(&self, now_unix_ms: u64) -> Result<usize, SpoolError> {
        self.table.remove_where(|_, v| {
            postcard::from_bytes::<StoredSuppression>(v)
                .map(|e| e.until_unix_ms <= now_unix_ms)
                .unwrap_or(true)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(until: u64) -> StoredSuppression {
        StoredSuppression {
            class: "invalid-recipient".into(),
            reason: "550 5.1.1 no such user".into(),
            added_unix_ms: 1,
            until_unix_ms: until,
        }
    }

    #[test]
    fn entries_survive_reopen_and_expire_on_purge() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = SuppressionStore::open(dir.path(), true).expect("open");
            s.put("shop.example", "bob@example.net", &entry(100))
                .expect("put");
            s.put("*", "carol@example.net", &entry(1000)).expect("put");
            s.put("other.example", "bob@example.net", &entry(1000))
                .expect("put");
        }
        let s = SuppressionStore::open(dir.path(), true).expect("reopen");
        assert_eq!(
            s.get("shop.example", "bob@example.net").expect("get"),
            Some(entry(100))
        );
        assert_eq!(
            s.get("shop.example", "carol@example.net").expect("get"),
            None
        );
        assert_eq!(s.list(None, 10).expect("list").len(), 3);
        let only = s.list(Some("shop.example"), 10).expect("list");
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].recipient, "bob@example.net");
        assert_eq!(s.list(None, 2).expect("list").len(), 2);
        assert_eq!(s.purge_expired(100).expect("purge"), 1);
        assert_eq!(s.get("shop.example", "bob@example.net").expect("get"), None);
        assert!(s.remove("*", "carol@example.net").expect("remove"));
        assert!(!s.remove("*", "carol@example.net").expect("remove"));
        assert_eq!(s.list(None, 10).expect("list").len(), 1);
    }
}
