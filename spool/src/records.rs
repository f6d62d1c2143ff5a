//! A small persistent table of named records next to the spool (its own LMDB
//! environment in a subdirectory of `spool.path`), for state the relay keeps
//! across restarts that is not mail: the MTA-STS policy cache is the first.
//!
//! Keys are strings, values opaque bytes (the caller serializes). Calls are
//! blocking disk I/O: run them on a management thread, never on an executor.

use std::fs;
use std::path::{Path, PathBuf};

use heed::types::{Bytes, Str};
use heed::{Database, EnvOpenOptions, WithoutTls};

use crate::SpoolError;

/// Map size: the records are small (an MTA-STS policy is at most 64 KiB, and
/// the table holds one per destination domain mailed).
const MAP_SIZE: usize = 256 * 1024 * 1024;

/// A named table of records in `<spool.path>/<name>`.
pub struct RecordTable {
    env: heed::Env<WithoutTls>,
    db: Database<Str, Bytes>,
    dir: PathBuf,
}

fn err(dir: &Path, e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Io(format!("{}: {e}", dir.display()))
}

impl RecordTable {
    /// Opens (creating) the table `name` under `spool_path`.
    pub fn open(spool_path: &Path, name: &str) -> Result<RecordTable, SpoolError> {
        let dir = spool_path.join(name);
        fs::create_dir_all(&dir).map_err(|e| err(&dir, e))?;
        let mut opts = EnvOpenOptions::new().read_txn_without_tls();
        opts.max_dbs(1).map_size(MAP_SIZE);
        // SAFETY: the map is only modified through LMDB (this process opens
        // the environment once, and other processes such as `sluice debug`
        // go through LMDB's lock file); nothing touches the data files
        // directly.
        let env = unsafe { opts.open(&dir) }.map_err(|e| err(&dir, e))?;
        env.clear_stale_readers().map_err(|e| err(&dir, e))?;
        let mut wtxn = env.write_txn().map_err(|e| err(&dir, e))?;
        let db = env
            .create_database(&mut wtxn, Some(name))
            .map_err(|e| err(&dir, e))?;
        wtxn.commit().map_err(|e| err(&dir, e))?;
        Ok(RecordTable { env, db, dir })
    }

    /// Every record.
    pub fn all(&self) -> Result<Vec<(String, Vec<u8>)>, SpoolError> {
        let rtxn = self.env.read_txn().map_err(|e| err(&self.dir, e))?;
        let iter = self.db.iter(&rtxn).map_err(|e| err(&self.dir, e))?;
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item.map_err(|e| err(&self.dir, e))?;
            out.push((k.to_string(), v.to_vec()));
        }
        Ok(out)
    }

    /// One record.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, SpoolError> {
        let rtxn = self.env.read_txn().map_err(|e| err(&self.dir, e))?;
        let value = self.db.get(&rtxn, key).map_err(|e| err(&self.dir, e))?;
        Ok(value.map(<[u8]>::to_vec))
    }

    /// Stores (replacing) a record, durably.
    pub fn put(&self, key: &str, value: &[u8]) -> Result<(), SpoolError> {
        let mut wtxn = self.env.write_txn().map_err(|e| err(&self.dir, e))?;
        self.db
            .put(&mut wtxn, key, value)
            .map_err(|e| err(&self.dir, e))?;
        wtxn.commit().map_err(|e| err(&self.dir, e))
    }

    /// Removes a record (absent is fine).
    pub fn delete(&self, key: &str) -> Result<(), SpoolError> {
        let mut wtxn = self.env.write_txn().map_err(|e| err(&self.dir, e))?;
        self.db
            .delete(&mut wtxn, key)
            .map_err(|e| err(&self.dir, e))?;
        wtxn.commit().map_err(|e| err(&self.dir, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let t = RecordTable::open(dir.path(), "mta-sts").unwrap();
            t.put("example.com", b"one").unwrap();
            t.put("example.net", b"two").unwrap();
            t.put("example.com", b"three").unwrap();
            t.delete("example.net").unwrap();
            t.delete("absent.example").unwrap();
        }
        let t = RecordTable::open(dir.path(), "mta-sts").unwrap();
        assert_eq!(
            t.all().unwrap(),
            vec![("example.com".to_string(), b"three".to_vec())]
        );
        assert_eq!(
            t.get("example.com").unwrap().as_deref(),
            Some(&b"three"[..])
        );
        assert_eq!(t.get("example.net").unwrap(), None);
    }
}
