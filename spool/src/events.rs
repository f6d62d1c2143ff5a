//! The delivery events' durable buffer: its own LMDB environment in
//! `<spool path>/events`, next to the shards.
//!
//! One table, `pending`: events not yet acknowledged by the webhook, keyed
//! by a big-endian sequence number (so key order is arrival order); values
//! are the event's JSON as the sink will post it. (Releases before envelope
//! version 10 also kept a `meta` table of header facts per message here; the
//! envelope carries them now and an old table is emptied at open.)
//!
//! Writes are whole batches in one transaction and block (commit fsyncs):
//! call them from the events thread, never from an executor.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use heed::types::Bytes;
use heed::{Database, EnvOpenOptions, RwTxn, WithoutTls};

use crate::SpoolError;

/// Directory name under the spool path.
pub const EVENTS_DIR: &str = "events";

pub struct EventStore {
    env: heed::Env<WithoutTls>,
    pending: Database<Bytes, Bytes>,
    next_seq: AtomicU64,
    /// Every pending event below this sequence number was acknowledged by the
    /// webhook. They are deleted by the writer's next batch, not by a commit
    /// (and an fsync) of their own: an acknowledgement lost in a crash only
    /// posts those events again, which at-least-once allows.
    acked_below: AtomicU64,
    /// Acknowledged events not deleted yet.
    unpurged: AtomicU64,
    dir: PathBuf,
}

impl std::fmt::Debug for EventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// One write transaction of the events thread (see [`EventStore::batch`]).
pub struct Batch<'s> {
    store: &'s EventStore,
    txn: RwTxn<'s>,
    seq: u64,
    /// Acknowledged events this batch deleted.
    purged: u64,
}

impl Batch<'_> {
    /// Buffers one event for the webhook.
    pub fn push_pending(&mut self, json: &[u8]) -> Result<(), SpoolError> {
        let key = self.seq.to_be_bytes();
        self.seq += 1;
        // Sequence numbers only grow, so the put is an append: LMDB fills
        // each page instead of splitting it in half, which halves the pages a
        // batch writes.
        self.store
            .pending
            .put_with_flags(&mut self.txn, heed::PutFlags::APPEND, &key, json)
            .map_err(|e| self.store.storage(e))
    }

    /// Events buffered now, this batch's included.
    pub fn pending_len(&self) -> Result<u64, SpoolError> {
        self.store
            .pending
            .len(&self.txn)
            .map_err(|e| self.store.storage(e))
    }

    /// Makes the batch durable (fsync unless the spool runs without sync).
    /// Deletes the events the webhook acknowledged so far (in this batch's
    /// transaction, so with its commit).
    pub fn purge_acknowledged(&mut self) -> Result<(), SpoolError> {
        let below = self.store.acked_below.load(Ordering::Acquire);
        if below == 0 {
            return Ok(());
        }
        let end = below.to_be_bytes();
        let range = (
            std::ops::Bound::Unbounded,
            std::ops::Bound::Excluded(&end[..]),
        );
        let n = self
            .store
            .pending
            .delete_range(&mut self.txn, &range)
            .map_err(|e| self.store.storage(e))?;
        self.purged += n as u64;
        Ok(())
    }

    pub fn commit(self) -> Result<(), SpoolError> {
        let seq = self.seq;
        let store = self.store;
        let purged = self.purged;
        self.txn.commit().map_err(|e| store.storage(e))?;
        store.next_seq.store(seq, Ordering::Relaxed);
        if purged > 0 {
            let _ = store
                .unpurged
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    Some(n.saturating_sub(purged))
                });
        }
        Ok(())
    }
}

impl EventStore {
    /// Opens (creating) `spool_path/events` with a map of `map_size` bytes.
    pub fn open(spool_path: &Path, sync: bool, map_size: usize) -> Result<EventStore, SpoolError> {
        let dir = spool_path.join(EVENTS_DIR);
        let io = |e: &dyn std::fmt::Display| SpoolError::Io(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(&dir).map_err(|e| io(&e))?;
        let mut opts = EnvOpenOptions::new().read_txn_without_tls();
        opts.max_dbs(2)
            .map_size(map_size.max(1 << 20).div_ceil(64 * 1024) * 64 * 1024);
        if !sync {
            // SAFETY: NO_SYNC trades durability against a system crash, not
            // memory safety; only with spool.sync = false (benchmarks).
            unsafe {
                opts.flags(heed::EnvFlags::NO_SYNC);
            }
        }
        // SAFETY: this environment is only modified through LMDB, by this
        // process (one events thread writes; LMDB serialises writers) and
        // offline tools going through its lock file; heed refuses a double
        // open in one process.
        let env = unsafe { opts.open(&dir) }.map_err(|e| io(&e))?;
        env.clear_stale_readers().map_err(|e| io(&e))?;
        let mut wtxn = env.write_txn().map_err(|e| io(&e))?;
        let pending = env
            .create_database(&mut wtxn, Some("pending"))
            .map_err(|e| io(&e))?;
        // The header facts table of earlier releases: the envelope holds
        // them now, so what it kept would never be deleted.
        let old_meta: Option<Database<Bytes, Bytes>> =
            env.open_database(&wtxn, Some("meta")).map_err(|e| io(&e))?;
        if let Some(old) = old_meta {
            old.clear(&mut wtxn).map_err(|e| io(&e))?;
        }
        let next = match pending.last(&wtxn).map_err(|e| io(&e))? {
            Some((k, _)) => seq_of(k).map_or(0, |s| s + 1),
            None => 0,
        };
        wtxn.commit().map_err(|e| io(&e))?;
        Ok(EventStore {
            env,
            pending,
            next_seq: AtomicU64::new(next),
            acked_below: AtomicU64::new(0),
            unpurged: AtomicU64::new(0),
            dir,
        })
    }

    fn storage(&self, e: heed::Error) -> SpoolError {
        match e {
            heed::Error::Mdb(heed::MdbError::MapFull) => SpoolError::Full,
            e => SpoolError::Failed(format!("{}: {e}", self.dir.display())),
        }
    }

    /// Starts a write transaction (one writer: the events thread).
    pub fn batch(&self) -> Result<Batch<'_>, SpoolError> {
        let txn = self.env.write_txn().map_err(|e| self.storage(e))?;
        Ok(Batch {
            store: self,
            txn,
            seq: self.next_seq.load(Ordering::Relaxed),
            purged: 0,
        })
    }

    /// The oldest `n` buffered events: (sequence, JSON).
    pub fn oldest(&self, n: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let rtxn = self.env.read_txn().map_err(|e| self.storage(e))?;
        let mut out = Vec::with_capacity(n.min(4096));
        // Acknowledged events still stored (not purged yet) are skipped.
        let start = self.acked_below.load(Ordering::Acquire).to_be_bytes();
        let range = (
            std::ops::Bound::Included(&start[..]),
            std::ops::Bound::Unbounded,
        );
        let iter = self
            .pending
            .range(&rtxn, &range)
            .map_err(|e| self.storage(e))?;
        for item in iter {
            if out.len() >= n {
                break;
            }
            let (k, v) = item.map_err(|e| self.storage(e))?;
            if let Some(seq) = seq_of(k) {
                out.push((seq, v.to_vec()));
            }
        }
        Ok(out)
    }

    /// Events waiting for the webhook (acknowledged ones not counted).
    pub fn pending_len(&self) -> Result<u64, SpoolError> {
        let rtxn = self.env.read_txn().map_err(|e| self.storage(e))?;
        let stored = self.pending.len(&rtxn).map_err(|e| self.storage(e))?;
        Ok(stored.saturating_sub(self.unpurged.load(Ordering::Acquire)))
    }

    /// The webhook took every event up to and including `last` (`count` of
    /// them, the oldest pending): they are no longer posted, and the writer's
    /// next batch deletes them.
    pub fn acknowledge_through(&self, last: u64, count: usize) {
        self.unpurged.fetch_add(count as u64, Ordering::AcqRel);
        self.acked_below
            .fetch_max(last.saturating_add(1), Ordering::AcqRel);
    }

    /// Acknowledged events are waiting to be deleted.
    pub fn has_unpurged(&self) -> bool {
        self.unpurged.load(Ordering::Acquire) > 0
    }
}

fn seq_of(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_survives_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = EventStore::open(dir.path(), true, 1 << 20).unwrap();
            let mut b = s.batch().unwrap();
            for i in 0..300u32 {
                b.push_pending(format!("{{\"n\":{i}}}").as_bytes()).unwrap();
            }
            assert_eq!(b.pending_len().unwrap(), 300);
            b.commit().unwrap();
            let first = s.oldest(2).unwrap();
            assert_eq!(first[0], (0, b"{\"n\":0}".to_vec()));
            assert_eq!(first[1].0, 1);
            s.acknowledge_through(1, 2);
            assert_eq!(s.pending_len().unwrap(), 298, "acknowledged: not pending");
            assert_eq!(
                s.oldest(1).unwrap()[0].0,
                2,
                "acknowledged: not posted again"
            );
            let mut b = s.batch().unwrap();
            b.purge_acknowledged().unwrap();
            b.commit().unwrap();
            assert!(!s.has_unpurged());
        }
        let s = EventStore::open(dir.path(), true, 1 << 20).unwrap();
        assert_eq!(s.pending_len().unwrap(), 298, "the purge was committed");
        let next = s.oldest(1).unwrap();
        assert_eq!(next[0].0, 2, "order kept over the reopen");
        let mut b = s.batch().unwrap();
        b.push_pending(b"late").unwrap();
        b.commit().unwrap();
        let all = s.oldest(1000).unwrap();
        assert_eq!(
            all.last().unwrap(),
            &(300, b"late".to_vec()),
            "sequence continues"
        );
    }

    #[test]
    fn an_old_header_facts_table_is_emptied_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join(EVENTS_DIR);
        std::fs::create_dir_all(&events).unwrap();
        {
            let mut opts = EnvOpenOptions::new().read_txn_without_tls();
            opts.max_dbs(2).map_size(1 << 20);
            // SAFETY: a test's own directory, opened once here and closed
            // before the store opens it.
            let env = unsafe { opts.open(&events) }.unwrap();
            let mut w = env.write_txn().unwrap();
            let meta: Database<Bytes, Bytes> = env.create_database(&mut w, Some("meta")).unwrap();
            meta.put(&mut w, b"id1", b"m").unwrap();
            w.commit().unwrap();
            env.prepare_for_closing().wait();
        }
        let s = EventStore::open(dir.path(), true, 1 << 20).unwrap();
        let r = s.env.read_txn().unwrap();
        let meta: Database<Bytes, Bytes> = s.env.open_database(&r, Some("meta")).unwrap().unwrap();
        assert_eq!(meta.len(&r).unwrap(), 0);
    }
}
