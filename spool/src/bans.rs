//! Auto-bans on disk: a [`Table`] in `<spool path>/bans`, next to the shards,
//! so bans survive restarts. Key: the address as text; value: a
//! postcard-encoded [`StoredBan`]. Writes commit (and fsync) in the calling
//! thread, so callers on an executor hand them to another thread.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{SpoolError, Table};

/// Directory name under the spool path.
pub const BANS_DIR: &str = "bans";
/// Map size: millions of bans of ~80 bytes fit.
const MAP_SIZE: usize = 256 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBan {
    pub reason: String,
    pub added_unix_ms: u64,
    pub until_unix_ms: u64,
}

#[derive(Debug)]
pub struct BanStore {
    table: Table,
}

impl BanStore {
    /// Opens (creating) `spool_path/bans`.
    pub fn open(spool_path: &Path, sync: bool) -> Result<BanStore, SpoolError> {
        let table = Table::open_with(spool_path, BANS_DIR, MAP_SIZE, sync)?;
        Ok(BanStore { table })
    }

    /// Adds or replaces the ban of `address` (commits: blocking).
    pub fn put(&self, address: &str, ban: &StoredBan) -> Result<(), SpoolError> {
        let value = postcard::to_allocvec(ban).map_err(|e| SpoolError::Encode(e.to_string()))?;
        self.table.put(address.as_bytes(), &value)
    }

    /// Removes a ban; false when there was none (commits: blocking).
    pub fn remove(&self, address: &str) -> Result<bool, SpoolError> {
        self.table.delete(address.as_bytes())
    }

    /// Every stored ban (undecodable entries skipped).
    pub fn all(&self) -> Result<Vec<(String, StoredBan)>, SpoolError> {
        let mut out = Vec::new();
        self.table.visit(b"", |k, v| {
            if let (Ok(addr), Ok(ban)) =
                (std::str::from_utf8(k), postcard::from_bytes::<StoredBan>(v))
            {
                out.push((addr.to_string(), ban));
            }
            true
        })?;
        Ok(out)
    }

    /// Deletes bans that ended at or before `now` (and undecodable ones);
    /// returns how many (commits: blocking).
    pub fn purge_expired(&self, now_unix_ms: u64) -> Result<usize, SpoolError> {
        self.table.remove_where(|_, v| {
            postcard::from_bytes::<StoredBan>(v)
                .map(|b| b.until_unix_ms <= now_unix_ms)
                .unwrap_or(true)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_survive_reopening_and_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ban = |until| StoredBan {
            reason: "5 failed authentications within 10m".into(),
            added_unix_ms: 1,
            until_unix_ms: until,
        };
        {
            let s = BanStore::open(dir.path(), true).expect("open");
            s.put("192.0.2.1", &ban(100)).expect("put");
            s.put("2001:db8::1", &ban(300)).expect("put");
        }
        let s = BanStore::open(dir.path(), true).expect("reopen");
        let all = s.all().expect("all");
        assert_eq!(all.len(), 2);
        assert_eq!(s.purge_expired(200).expect("purge"), 1);
        assert_eq!(
            s.all().expect("all"),
            vec![("2001:db8::1".to_string(), ban(300))]
        );
        assert!(s.remove("2001:db8::1").expect("remove"));
        assert!(!s.remove("2001:db8::1").expect("remove"));
    }
}
