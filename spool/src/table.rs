//! A small key/value table in an LMDB environment of its own beside the
//! spool's shards (`<spool.path>/<name>`): state that is not mail but must
//! survive a restart (the TLS-RPT counters). Bytes in, bytes out; the caller
//! owns the encoding. Writes are whole batches in one transaction and block:
//! call them from a blocking thread, never from an executor.

use std::fs;
use std::path::Path;

use heed::types::Bytes;
use heed::{EnvOpenOptions, WithoutTls};

use crate::SpoolError;

/// Key/value pairs, as stored.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// One named table; `Send + Sync`, shared by the threads that use it.
pub struct Table {
    env: heed::Env<WithoutTls>,
    db: heed::Database<Bytes, Bytes>,
}

fn err(what: &str, e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Io(format!("{what}: {e}"))
}

impl Table {
    /// Opens (creating) the table `name` under the spool directory `path`,
    /// with a map of `map_size` bytes.
    pub fn open(path: &Path, name: &str, map_size: usize) -> Result<Table, SpoolError> {
        let dir = path.join(name);
        fs::create_dir_all(&dir).map_err(|e| err(&dir.display().to_string(), e))?;
        let mut opts = EnvOpenOptions::new().read_txn_without_tls();
        opts.max_dbs(1).max_readers(64);
        opts.map_size(map_size.max(1).div_ceil(64 * 1024) * 64 * 1024);
        // SAFETY: as for the spool's shards: the map is only modified through
        // LMDB (this process writes through this handle; other processes go
        // through LMDB's lock file) and the data files are never touched
        // directly. heed guards against opening one environment twice.
        let env = unsafe { opts.open(&dir) }.map_err(|e| err(&dir.display().to_string(), e))?;
        env.clear_stale_readers()
            .map_err(|e| err(&dir.display().to_string(), e))?;
        let mut wtxn = env.write_txn().map_err(|e| err(name, e))?;
        let db = env
            .create_database(&mut wtxn, Some(name))
            .map_err(|e| err(name, e))?;
        wtxn.commit().map_err(|e| err(name, e))?;
        Ok(Table { env, db })
    }

    /// For each `(key, value)` of the batch, stores `merge(old, value)` where
    /// `old` is what the key held; all in one transaction (all or nothing).
    pub fn merge(
        &self,
        batch: &[(Vec<u8>, Vec<u8>)],
        mut merge: impl FnMut(Option<&[u8]>, &[u8]) -> Vec<u8>,
    ) -> Result<(), SpoolError> {
        let mut wtxn = self.env.write_txn().map_err(write_err)?;
        for (key, value) in batch {
            let merged = merge(self.db.get(&wtxn, key).map_err(write_err)?, value);
            self.db.put(&mut wtxn, key, &merged).map_err(write_err)?;
        }
        wtxn.commit().map_err(write_err)
    }

    /// Every entry, in key order.
    pub fn entries(&self) -> Result<Entries, SpoolError> {
        let rtxn = self.env.read_txn().map_err(|e| err("read", e))?;
        let mut out = Vec::new();
        for item in self.db.iter(&rtxn).map_err(|e| err("read", e))? {
            let (k, v) = item.map_err(|e| err("read", e))?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Removes these keys (absent ones are ignored), in one transaction.
    pub fn remove(&self, keys: &[Vec<u8>]) -> Result<(), SpoolError> {
        let mut wtxn = self.env.write_txn().map_err(write_err)?;
        for key in keys {
            self.db.delete(&mut wtxn, key).map_err(write_err)?;
        }
        wtxn.commit().map_err(write_err)
    }
}

fn write_err(e: heed::Error) -> SpoolError {
    match e {
        heed::Error::Mdb(heed::MdbError::MapFull) => SpoolError::Full,
        e => err("write", e),
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
    }
}
