//! A small key/value table in an LMDB environment of its own beside the
//! spool's shards (`<spool.path>/<name>`): state that is not mail but must
//! survive a restart (the MTA-STS policy cache, the TLS-RPT counters, the
//! suppression list). Bytes in, bytes out; the caller owns the encoding.
//!
//! Reads are plain LMDB read transactions (memory-mapped, safe from any
//! thread). Every write is one transaction that commits (and, unless opened
//! without sync, fsyncs) in the calling thread: call writes from a blocking
//! thread, never from an executor.

use std::fs;
use std::path::{Path, PathBuf};

use heed::types::Bytes;
use heed::{EnvOpenOptions, WithoutTls};

use crate::SpoolError;

/// Key/value pairs, as stored.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// One named table; `Send + Sync`, shared by the threads that use it.
pub struct Table {
    env: heed::Env<WithoutTls>,
    db: heed::Database<Bytes, Bytes>,
    dir: PathBuf,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("dir", &self.dir).finish()
    }
}

impl Table {
    /// Opens (creating) the table `name` under the spool directory `path`,
    /// with a map of `map_size` bytes, committing durably.
    pub fn open(path: &Path, name: &str, map_size: usize) -> Result<Table, SpoolError> {
        Table::open_with(path, name, map_size, true)
    }

    /// As [`Table::open`]; `sync = false` skips the fsync at commit (only
    /// with `spool.sync = false`, for benchmarks).
    pub fn open_with(
        path: &Path,
        name: &str,
        map_size: usize,
        sync: bool,
    ) -> Result<Table, SpoolError> {
        let dir = path.join(name);
        let io = |e: &dyn std::fmt::Display| SpoolError::Io(format!("{}: {e}", dir.display()));
        fs::create_dir_all(&dir).map_err(|e| io(&e))?;
        let mut opts = EnvOpenOptions::new().read_txn_without_tls();
        opts.max_dbs(1).max_readers(64);
        opts.map_size(map_size.max(1).div_ceil(64 * 1024) * 64 * 1024);
        if !sync {
            // SAFETY: NO_SYNC trades durability against a system crash, not
            // memory safety.
            unsafe {
                opts.flags(heed::EnvFlags::NO_SYNC);
            }
        }
        // SAFETY: as for the spool's shards: the map is only modified through
        // LMDB (this process writes through this handle; other processes such
        // as `sluice debug` go through LMDB's lock file) and the data files
        // are never touched directly. heed guards against opening one
        // environment twice.
        let env = unsafe { opts.open(&dir) }.map_err(|e| io(&e))?;
        env.clear_stale_readers().map_err(|e| io(&e))?;
        let mut wtxn = env.write_txn().map_err(|e| io(&e))?;
        let db = env
            .create_database(&mut wtxn, Some(name))
            .map_err(|e| io(&e))?;
        wtxn.commit().map_err(|e| io(&e))?;
        Ok(Table { env, db, dir })
    }

    fn read_err(&self, e: heed::Error) -> SpoolError {
        SpoolError::Io(format!("{}: read: {e}", self.dir.display()))
    }

    fn write_err(&self, e: heed::Error) -> SpoolError {
        match e {
            heed::Error::Mdb(heed::MdbError::MapFull) => SpoolError::Full,
            e => SpoolError::Io(format!("{}: write: {e}", self.dir.display())),
        }
    }

    /// The value stored under `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, SpoolError> {
        let rtxn = self.env.read_txn().map_err(|e| self.read_err(e))?;
        let value = self.db.get(&rtxn, key).map_err(|e| self.read_err(e))?;
        Ok(value.map(<[u8]>::to_vec))
    }

    /// How many entries the table holds.
    pub fn count(&self) -> Result<u64, SpoolError> {
        let rtxn = self.env.read_txn().map_err(|e| self.read_err(e))?;
        self.db.len(&rtxn).map_err(|e| self.read_err(e))
    }

    /// Stores (replacing) one value.
    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), SpoolError> {
        let mut wtxn = self.env.write_txn().map_err(|e| self.write_err(e))?;
        self.db
            .put(&mut wtxn, key, value)
            .map_err(|e| self.write_err(e))?;
        wtxn.commit().map_err(|e| self.write_err(e))
    }

    /// Removes one key; false when it was absent.
    pub fn delete(&self, key: &[u8]) -> Result<bool, SpoolError> {
        let mut wtxn = self.env.write_txn().map_err(|e| self.write_err(e))?;
        let removed = self
            .db
            .delete(&mut wtxn, key)
            .map_err(|e| self.write_err(e))?;
        wtxn.commit().map_err(|e| self.write_err(e))?;
        Ok(removed)
    }

    /// For each `(key, value)` of the batch, stores `merge(old, value)` where
    /// `old` is what the key held; all in one transaction (all or nothing).
    pub fn merge(
        &self,
        batch: &[(Vec<u8>, Vec<u8>)],
        mut merge: impl FnMut(Option<&[u8]>, &[u8]) -> Vec<u8>,
    ) -> Result<(), SpoolError> {
        let mut wtxn = self.env.write_txn().map_err(|e| self.write_err(e))?;
        for (key, value) in batch {
            let old = self.db.get(&wtxn, key).map_err(|e| self.write_err(e))?;
            let merged = merge(old, value);
            self.db
                .put(&mut wtxn, key, &merged)
                .map_err(|e| self.write_err(e))?;
        }
        wtxn.commit().map_err(|e| self.write_err(e))
    }

    /// Every entry, in key order.
    pub fn entries(&self) -> Result<Entries, SpoolError> {
        self.scan(&[], usize::MAX)
    }

    /// At most `limit` entries whose key starts with `prefix`, in key order.
    pub fn scan(&self, prefix: &[u8], limit: usize) -> Result<Entries, SpoolError> {
        let mut out = Vec::new();
        self.visit(prefix, |k, v| {
            if out.len() >= limit {
                return false;
            }
            out.push((k.to_vec(), v.to_vec()));
            true
        })?;
        Ok(out)
    }

    /// Calls `each(key, value)` for the entries whose key starts with
    /// `prefix`, in key order, until it returns false; nothing is copied.
    pub fn visit(
        &self,
        prefix: &[u8],
        mut each: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), SpoolError> {
        let rtxn = self.env.read_txn().map_err(|e| self.read_err(e))?;
        // LMDB refuses an empty key to position on, so no prefix is a full scan.
        type Items<'t> = Box<dyn Iterator<Item = heed::Result<(&'t [u8], &'t [u8])>> + 't>;
        let iter: Items<'_> = if prefix.is_empty() {
            Box::new(self.db.iter(&rtxn).map_err(|e| self.read_err(e))?)
        } else {
            Box::new(
                self.db
                    .prefix_iter(&rtxn, prefix)
                    .map_err(|e| self.read_err(e))?,
            )
        };
        for item in iter {
            let (k, v) = item.map_err(|e| self.read_err(e))?;
            if !each(k, v) {
                break;
            }
        }
        Ok(())
    }

    /// Removes these keys (absent ones are ignored), in one transaction.
    pub fn remove(&self, keys: &[Vec<u8>]) -> Result<(), SpoolError> {
        let mut wtxn = self.env.write_txn().map_err(|e| self.write_err(e))?;
        for key in keys {
            self.db
                .delete(&mut wtxn, key)
                .map_err(|e| self.write_err(e))?;
        }
        wtxn.commit().map_err(|e| self.write_err(e))
    }

    /// Deletes every entry for which `drop(key, value)` holds, in one
    /// transaction; returns how many.
    pub fn remove_where(
        &self,
        mut drop: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<usize, SpoolError> {
        let mut wtxn = self.env.write_txn().map_err(|e| self.write_err(e))?;
        let mut n = 0;
        {
            let mut iter = self.db.iter_mut(&mut wtxn).map_err(|e| self.write_err(e))?;
            while let Some(item) = iter.next() {
                let (k, v) = item.map_err(|e| self.write_err(e))?;
                if drop(k, v) {
                    // SAFETY: no reference into the database (the key and
                    // value slices above) is used after this deletion.
                    unsafe { iter.del_current() }.map_err(|e| self.write_err(e))?;
                    n += 1;
                }
            }
        }
        wtxn.commit().map_err(|e| self.write_err(e))?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_persist_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let add = |old: Option<&[u8]>, new: &[u8]| {
            let o = old.map_or(0, |b| b[0]);
            vec![o + new[0]]
        };
        {
            let t = Table::open(dir.path(), "t", 1 << 20).unwrap();
            t.merge(&[(b"a".to_vec(), vec![1]), (b"b".to_vec(), vec![2])], add)
                .unwrap();
            t.merge(&[(b"a".to_vec(), vec![5])], add).unwrap();
        }
        let t = Table::open(dir.path(), "t", 1 << 20).unwrap();
        assert_eq!(
            t.entries().unwrap(),
            vec![(b"a".to_vec(), vec![6]), (b"b".to_vec(), vec![2])]
        );
        t.remove(&[b"a".to_vec(), b"zz".to_vec()]).unwrap();
        assert_eq!(t.entries().unwrap(), vec![(b"b".to_vec(), vec![2])]);
        assert_eq!(t.count().unwrap(), 1);
    }

    #[test]
    fn single_records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let t = Table::open(dir.path(), "mta-sts", 1 << 20).unwrap();
            t.put(b"example.com", b"one").unwrap();
            t.put(b"example.net", b"two").unwrap();
            t.put(b"example.com", b"three").unwrap();
            assert!(t.delete(b"example.net").unwrap());
            assert!(!t.delete(b"absent.example").unwrap());
        }
        let t = Table::open_with(dir.path(), "mta-sts", 1 << 20, false).unwrap();
        assert_eq!(
            t.entries().unwrap(),
            vec![(b"example.com".to_vec(), b"three".to_vec())]
        );
        assert_eq!(
            t.get(b"example.com").unwrap().as_deref(),
            Some(&b"three"[..])
        );
        assert_eq!(t.get(b"example.net").unwrap(), None);
    }

    #[test]
    fn scans_by_prefix_with_a_limit_and_removes_by_predicate() {
        let dir = tempfile::tempdir().unwrap();
        let t = Table::open(dir.path(), "t", 1 << 20).unwrap();
        for (k, v) in [("a/1", 1u8), ("a/2", 2), ("a/3", 3), ("b/1", 4)] {
            t.put(k.as_bytes(), &[v]).unwrap();
        }
        let keys = |e: Entries| -> Vec<String> {
            e.into_iter()
                .map(|(k, _)| String::from_utf8(k).unwrap())
                .collect()
        };
        assert_eq!(keys(t.scan(b"a/", 2).unwrap()), ["a/1", "a/2"]);
        assert_eq!(keys(t.scan(b"b/", 10).unwrap()), ["b/1"]);
        assert_eq!(t.remove_where(|_, v| v[0] % 2 == 1).unwrap(), 2);
        assert_eq!(keys(t.entries().unwrap()), ["a/2", "b/1"]);
    }
}
