//! The suppression list on disk: its own LMDB environment in
//! `<spool path>/suppression`, next to the shards, so it survives restarts
//! and is never mistaken for a shard.
//!
//! Key: `scope NUL recipient` (both already normalised by the caller);
//! value: a postcard-encoded [`StoredSuppression`]. Reads are plain LMDB read
//! transactions (memory-mapped, no lock, safe from any thread); writes commit
//! (and fsync) in the calling thread, so callers on an executor hand them to a
//! blocking thread.

use std::path::{Path, PathBuf};

use heed::types::Bytes;
use heed::{Database, EnvOpenOptions, WithoutTls};
use serde::{Deserialize, Serialize};

use crate::SpoolError;

/// Directory name under the spool path.
pub const SUPPRESSION_DIR: &str = "suppression";
const DB_NAME: &str = "suppression";
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

pub struct SuppressionStore {
    env: heed::Env<WithoutTls>,
    db: Database<Bytes, Bytes>,
    dir: PathBuf,
}

impl std::fmt::Debug for SuppressionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SuppressionStore")
            .field("dir", &self.dir)
            .finish()
    }
}

fn key(scope: &str, recipient: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(scope.len() + 1 + recipient.len());
    k.extend_from_slice(scope.as_bytes());
    k.push(0);
    k.extend_from_slice(recipient.as_bytes());
    k
}

impl SuppressionStore {
    /// Opens (creating) `spool_path/suppression`.
    pub fn open(spool_path: &Path, sync: bool) -> Result<SuppressionStore, SpoolError> {
        let dir = spool_path.join(SUPPRESSION_DIR);
        let io = |e: &dyn std::fmt::Display| SpoolError::Io(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(&dir).map_err(|e| io(&e))?;
        let mut opts = EnvOpenOptions::new().read_txn_without_tls();
        opts.max_dbs(1).map_size(MAP_SIZE);
        if !sync {
            // SAFETY: NO_SYNC trades durability against a system crash, not
            // memory safety; only with spool.sync = false (benchmarks).
            unsafe {
                opts.flags(heed::EnvFlags::NO_SYNC);
            }
        }
        // SAFETY: this environment is only modified through LMDB, by this
        // process (writes are serialised by LMDB's writer lock) and offline
        // tools going through its lock file; heed refuses a double open.
        let env = unsafe { opts.open(&dir) }.map_err(|e| io(&e))?;
        let mut wtxn = env.write_txn().map_err(|e| io(&e))?;
        let db = env
            .create_database(&mut wtxn, Some(DB_NAME))
            .map_err(|e| io(&e))?;
        wtxn.commit().map_err(|e| io(&e))?;
        Ok(SuppressionStore { env, db, dir })
    }

    fn storage(&self, e: heed::Error) -> SpoolError {
        match e {
            heed::Error::Mdb(heed::MdbError::MapFull) => SpoolError::Full,
            e => SpoolError::Failed(format!("{}: {e}", self.dir.display())),
        }
    }

    /// The entry for (scope, recipient), expired or not.
    pub fn get(
        &self,
        scope: &str,
        recipient: &str,
    ) -> Result<Option<StoredSuppression>, SpoolError> {
        let rtxn = self.env.read_txn().map_err(|e| self.storage(e))?;
        let Some(bytes) = self
            .db
            .get(&rtxn, &key(scope, recipient))
            .map_err(|e| self.storage(e))?
        else {
            return Ok(None);
        };
        postcard::from_bytes(bytes)
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
        let mut wtxn = self.env.write_txn().map_err(|e| self.storage(e))?;
        self.db
            .put(&mut wtxn, &key(scope, recipient), &value)
            .map_err(|e| self.storage(e))?;
        wtxn.commit().map_err(|e| self.storage(e))
    }

    /// Removes an entry; false when there was none (commits: blocking).
    pub fn remove(&self, scope: &str, recipient: &str) -> Result<bool, SpoolError> {
        let mut wtxn = self.env.write_txn().map_err(|e| self.storage(e))?;
        let removed = self
            .db
            .delete(&mut wtxn, &key(scope, recipient))
            .map_err(|e| self.storage(e))?;
        wtxn.commit().map_err(|e| self.storage(e))?;
        Ok(removed)
    }

    /// Entries in key order (scope, then recipient), at most `limit`, only
    /// `scope`'s when given; undecodable entries are skipped.
    pub fn list(
        &self,
        scope: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SuppressionRow>, SpoolError> {
        let rtxn = self.env.read_txn().map_err(|e| self.storage(e))?;
        let mut out = Vec::new();
        let prefix = scope.map(|s| key(s, ""));
        type Items<'t> = Box<dyn Iterator<Item = heed::Result<(&'t [u8], &'t [u8])>> + 't>;
        let iter: Items<'_> = match &prefix {
            Some(p) => Box::new(self.db.prefix_iter(&rtxn, p).map_err(|e| self.storage(e))?),
            None => Box::new(self.db.iter(&rtxn).map_err(|e| self.storage(e))?),
        };
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| self.storage(e))?;
            let Some(sep) = k.iter().position(|&b| b == 0) else {
                continue;
            };
            let (Ok(scope), Ok(recipient)) = (
                std::str::from_utf8(&k[..sep]),
                std::str::from_utf8(&k[sep + 1..]),
            ) else {
                continue;
            };
            let Ok(entry) = postcard::from_bytes::<StoredSuppression>(v) else {
                continue;
            };
            out.push(SuppressionRow {
                scope: scope.to_string(),
                recipient: recipient.to_string(),
                entry,
            });
        }
        Ok(out)
    }

    /// Deletes entries whose `until_unix_ms` is at or before `now`; returns
    /// how many (commits: blocking).
    pub fn purge_expired(&self, now_unix_ms: u64) -> Result<usize, SpoolError> {
        let mut wtxn = self.env.write_txn().map_err(|e| self.storage(e))?;
        let mut n = 0;
        {
            let mut iter = self.db.iter_mut(&mut wtxn).map_err(|e| self.storage(e))?;
            while let Some(item) = iter.next() {
                let (_, v) = item.map_err(|e| self.storage(e))?;
                let expired = postcard::from_bytes::<StoredSuppression>(v)
                    .map(|e| e.until_unix_ms <= now_unix_ms)
                    .unwrap_or(true);
                if expired {
                    // SAFETY: no reference into the database (the key and
                    // value slices above) is used after this deletion.
                    unsafe { iter.del_current() }.map_err(|e| self.storage(e))?;
                    n += 1;
                }
            }
        }
        wtxn.commit().map_err(|e| self.storage(e))?;
        Ok(n)
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
