//! Named records next to the spool: a [`Table`] with string keys, for state
//! the relay keeps across restarts that is not mail (the MTA-STS policy
//! cache, shaping actions and operator suspensions).
//!
//! Values are opaque bytes (the caller serializes). Calls are blocking disk
//! I/O: run them on a management thread, never on an executor.

use std::path::Path;

use crate::{SpoolError, Table};

/// Map size: the records are small (an MTA-STS policy is at most 64 KiB, and
/// the table holds one per destination domain mailed).
const MAP_SIZE: usize = 256 * 1024 * 1024;

/// A named table of records in `<spool.path>/<name>`.
#[derive(Debug)]
pub struct RecordTable {
    table: Table,
}

impl RecordTable {
    /// Opens (creating) the table `name` under `spool_path`.
    pub fn open(spool_path: &Path, name: &str) -> Result<RecordTable, SpoolError> {
        Ok(RecordTable {
            table: Table::open(spool_path, name, MAP_SIZE)?,
        })
    }

    /// Every record; a key that is not UTF-8 (never written by us) is skipped.
    pub fn all(&self) -> Result<Vec<(String, Vec<u8>)>, SpoolError> {
        Ok(self
            .table
            .entries()?
            .into_iter()
            .filter_map(|(k, v)| Some((String::from_utf8(k).ok()?, v)))
            .collect())
    }

    /// One record.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, SpoolError> {
        self.table.get(key.as_bytes())
    }

    /// Stores (replacing) a record, durably.
    pub fn put(&self, key: &str, value: &[u8]) -> Result<(), SpoolError> {
        self.table.put(key.as_bytes(), value)
    }

    /// Removes a record (absent is fine).
    pub fn delete(&self, key: &str) -> Result<(), SpoolError> {
        self.table.delete(key.as_bytes()).map(|_| ())
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
