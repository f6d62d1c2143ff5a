use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use heed::{EnvFlags, EnvOpenOptions, RoTxn, WithoutTls};
use tracing::{error, info};

use crate::id::MAX_SHARDS;
use crate::writer::{Dbs, Health, Msg, Op, OpKind, Writer, META_COMMITS, META_MESSAGES};
use crate::{Envelope, MessageId, SpoolError};

const DB_ENVELOPES: &str = "envelopes";
const DB_BODIES: &str = "bodies";
const DB_META: &str = "meta";
const SHARD_PREFIX: &str = "shard-";
/// Every core reads every shard (cross-core delivery) and the offline tools
/// read too; the default of 126 slots is tight on big machines.
const MAX_READERS: u32 = 1024;
/// A multiple of every common page size (4, 16, 64 KiB), as LMDB requires.
const MAP_ALIGN: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub struct SpoolConfig {
    pub path: PathBuf,
    pub shards: u16,
    /// LMDB map size per shard in bytes (rounded up to 64 KiB).
    pub map_size: usize,
    /// Most requests in one write transaction.
    pub max_batch: usize,
    /// fsync on every commit. `false` is for benchmarks only.
    pub sync: bool,
    /// How long a removal may wait to ride a commit that happens anyway
    /// (a store or update) before it commits alone; zero commits it at once.
    pub removal_linger: Duration,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub messages: u64,
    /// Sum of the envelopes' `size` (body bytes).
    pub bytes: u64,
    pub elapsed: Duration,
    /// Envelopes that did not decode (logged, left on disk, not counted above).
    pub corrupt: u64,
}

impl RecoveryReport {
    /// Adds another walk's counts (shards, cores); `elapsed` is the longest,
    /// since walks run side by side.
    pub fn add(&mut self, other: &RecoveryReport) {
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.corrupt += other.corrupt;
        self.elapsed = self.elapsed.max(other.elapsed);
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub commits: u64,
    pub messages: u64,
}

struct WriterHandle {
    tx: mpsc::Sender<Msg>,
    thread: Mutex<Option<JoinHandle<()>>>,
    closing: AtomicBool,
}

struct Shard {
    env: heed::Env<WithoutTls>,
    dbs: Dbs,
    /// None when opened read-only.
    writer: Option<WriterHandle>,
}

/// The running spool: opened once, shared (`Arc`) by all executor threads.
pub struct Spool {
    shards: Vec<Shard>,
    pub(crate) health: Arc<Health>,
    /// Cluster mode's replica log; empty otherwise.
    replicator: crate::writer::ReplicatorSlot,
}

fn io_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Io(format!("{what}: {e}"))
}

/// Highest `shard-N` index present plus one (0 if none).
fn existing_shards(path: &Path) -> Result<u16, SpoolError> {
    let mut n: u16 = 0;
    let entries = fs::read_dir(path).map_err(|e| io_err(path.display(), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err(path.display(), e))?;
        let name = entry.file_name();
        let Some(index) = name
            .to_str()
            .and_then(|s| s.strip_prefix(SHARD_PREFIX))
            .and_then(|s| s.parse::<u16>().ok())
        else {
            continue;
        };
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            n = n.max(index.saturating_add(1));
        }
    }
    Ok(n)
}

fn shard_dir(path: &Path, i: u16) -> PathBuf {
    path.join(format!("{SHARD_PREFIX}{i}"))
}

fn open_env(
    dir: &Path,
    map_size: Option<usize>,
    flags: EnvFlags,
) -> Result<heed::Env<WithoutTls>, SpoolError> {
    // Without TLS: a thread may hold several read txns (e.g. envelope() inside list()).
    let mut opts = EnvOpenOptions::new().read_txn_without_tls();
    opts.max_dbs(3).max_readers(MAX_READERS);
    if let Some(size) = map_size {
        opts.map_size(size);
    }
    // SAFETY: the only flags we pass are READ_ONLY, NO_META_SYNC and NO_SYNC;
    // none affects memory safety. NO_META_SYNC keeps the file consistent
    // (LMDB flushes the data pages before it writes the meta page); the
    // writer makes each meta page durable before it answers (writer.rs).
    // NO_SYNC trades durability against a system crash and is only used when
    // the operator asked for sync = false (benchmarks).
    unsafe {
        opts.flags(flags);
    }
    // SAFETY: the map is only modified through LMDB: our writer thread is the
    // sole writer of this environment in this process, other processes
    // (offline tools) go through LMDB's lock file, and we never touch the
    // data files directly. heed guards against double-open in one process.
    unsafe { opts.open(dir) }.map_err(|e| io_err(dir.display(), e))
}

impl Spool {
    /// Opens (creating) `path/shard-0 .. shard-(N-1)`, N = max(cfg.shards,
    /// shards already on disk), so mail of an earlier run with more cores is
    /// never orphaned. Starts one writer thread per shard.
    pub fn open(cfg: &SpoolConfig) -> Result<Spool, SpoolError> {
        fs::create_dir_all(&cfg.path).map_err(|e| io_err(cfg.path.display(), e))?;
        let n = cfg.shards.max(existing_shards(&cfg.path)?);
        if n == 0 || n > MAX_SHARDS {
            return Err(SpoolError::Io(format!(
                "{n} shards: must be 1..={MAX_SHARDS}"
            )));
        }
        let map_size = cfg.map_size.max(1).div_ceil(MAP_ALIGN) * MAP_ALIGN;
        let flags = if cfg.sync {
            EnvFlags::NO_META_SYNC
        } else {
            EnvFlags::NO_SYNC
        };
        // Built up in place so that an error half-way stops the writers already started (Drop).
        let mut spool = Spool {
            shards: Vec::with_capacity(usize::from(n)),
            health: Arc::default(),
            replicator: Arc::default(),
        };
        for i in 0..n {
            let dir = shard_dir(&cfg.path, i);
            fs::create_dir_all(&dir).map_err(|e| io_err(dir.display(), e))?;
            let env = open_env(&dir, Some(map_size), flags)?;
            let dbs = create_dbs(&env).map_err(|e| io_err(dir.display(), e))?;
            if cfg.sync {
                // create_dbs committed without flushing its meta page.
                env.force_sync().map_err(|e| io_err(dir.display(), e))?;
            }
            // A reader killed with -9 leaves its slot behind; reclaim it.
            env.clear_stale_readers()
                .map_err(|e| io_err(dir.display(), e))?;
            let (tx, rx) = mpsc::channel();
            let writer = Writer {
                shard: i,
                env: env.clone(),
                dbs,
                health: spool.health.clone(),
                max_batch: cfg.max_batch.max(1),
                metrics: crate::writer::WriterMetrics::new(),
                replicator: spool.replicator.clone(),
                defer_meta_sync: cfg.sync,
                removal_linger: cfg.removal_linger,
            };
            let thread = std::thread::Builder::new()
                .name(format!("spool-writer-{i}"))
                .spawn(move || writer.run(rx))
                .map_err(|e| io_err("spawn spool writer", e))?;
            spool.shards.push(Shard {
                env,
                dbs,
                writer: Some(WriterHandle {
                    tx,
                    thread: Mutex::new(Some(thread)),
                    closing: AtomicBool::new(false),
                }),
            });
        }
        info!(path = %cfg.path.display(), shards = n, sync = cfg.sync, "spool open");
        Ok(spool)
    }

    /// Opens the existing shards read-only, without writer threads, for
    /// offline tools that may run next to the relay.
    pub fn open_readonly(path: &Path) -> Result<Spool, SpoolError> {
        let n = existing_shards(path)?;
        if n == 0 {
            return Err(io_err(path.display(), "no spool shards"));
        }
        if n > MAX_SHARDS {
            return Err(io_err(path.display(), format!("{n} shards")));
        }
        let mut shards = Vec::with_capacity(usize::from(n));
        for i in 0..n {
            let dir = shard_dir(path, i);
            let env = open_env(&dir, None, EnvFlags::READ_ONLY)?;
            let dbs = open_dbs(&env, &dir)?;
            shards.push(Shard {
                env,
                dbs,
                writer: None,
            });
        }
        Ok(Spool {
            shards,
            health: Arc::default(),
            replicator: Arc::default(),
        })
    }

    pub fn shard_count(&self) -> u16 {
        // open() caps the count at MAX_SHARDS.
        self.shards.len() as u16
    }

    fn shard(&self, shard: u16) -> Result<&Shard, SpoolError> {
        self.shards
            .get(usize::from(shard))
            .ok_or(SpoolError::NoShard(shard))
    }

    fn shard_of(&self, id: MessageId) -> Result<&Shard, SpoolError> {
        self.shards
            .get(usize::from(id.shard()))
            .ok_or(SpoolError::NotFound(id))
    }

    /// A read txn; LMDB errors here mean the storage is broken: fail closed.
    fn read_txn<'a>(&self, shard: &'a Shard) -> Result<RoTxn<'a, WithoutTls>, SpoolError> {
        shard.env.read_txn().map_err(|e| self.storage(e))
    }

    fn storage(&self, e: heed::Error) -> SpoolError {
        self.health.fail(e.to_string())
    }

    /// Largest id stored in a shard (to seed `IdGenerator`).
    pub fn last_id(&self, shard: u16) -> Result<Option<MessageId>, SpoolError> {
        let s = self.shard(shard)?;
        let rtxn = self.read_txn(s)?;
        match s.dbs.envelopes.last(&rtxn).map_err(|e| self.storage(e))? {
            Some((key, _)) => id_from_key(key).map(Some),
            None => Ok(None),
        }
    }

    pub(crate) fn submit(
        &self,
        shard: u16,
        kind: OpKind,
    ) -> Result<oneshot::Receiver<Result<(), SpoolError>>, SpoolError> {
        self.health.check()?;
        let writer = self
            .shard(shard)?
            .writer
            .as_ref()
            .ok_or(SpoolError::ReadOnly)?;
        if writer.closing.load(Ordering::Acquire) {
            return Err(SpoolError::Closed);
        }
        let (reply, rx) = oneshot::channel();
        writer
            .tx
            .send(Msg::Op(Op { kind, reply }))
            .map_err(|_| SpoolError::Closed)?;
        Ok(rx)
    }

    /// Stores body + envelope durably. The envelope is encoded and the request
    /// queued at call time (so the caller keeps its envelope); the future resolves
    /// only after the write transaction holding it committed (fsynced when `sync`).
    /// Never blocks the calling thread.
    pub fn store(
        &self,
        shard: u16,
        id: MessageId,
        envelope: &Envelope,
        body: Vec<u8>,
    ) -> impl Future<Output = Result<(), SpoolError>> + Send + 'static {
        let submitted = if id.shard() != shard {
            Err(SpoolError::BadId(format!("{id} is not of shard {shard}")))
        } else {
            envelope.encode().and_then(|envelope| {
                self.submit(
                    shard,
                    OpKind::Store {
                        id,
                        envelope,
                        prefix: Vec::new(),
                        body,
                    },
                )
            })
        };
        wait(submitted)
    }

    /// [`Spool::store`] of `prefix` followed by `body` as one stored message,
    /// without joining them in memory: the writer reserves the value's space
    /// in LMDB and copies both slices straight into the map (header fields
    /// added at acceptance, such as DKIM signatures, cost no copy of the
    /// body). `envelope.size` should count both.
    pub fn store_prefixed(
        &self,
        shard: u16,
        id: MessageId,
        envelope: &Envelope,
        prefix: Vec<u8>,
        body: Vec<u8>,
    ) -> impl Future<Output = Result<(), SpoolError>> + Send + 'static {
        let submitted = if id.shard() != shard {
            Err(SpoolError::BadId(format!("{id} is not of shard {shard}")))
        } else {
            envelope.encode().and_then(|envelope| {
                self.submit(
                    shard,
                    OpKind::Store {
                        id,
                        envelope,
                        prefix,
                        body,
                    },
                )
            })
        };
        wait(submitted)
    }

    /// Removes a message (envelope + body) through the writer's group commit.
    pub fn remove(
        &self,
        id: MessageId,
    ) -> impl Future<Output = Result<(), SpoolError>> + Send + 'static {
        let submitted = match self.shard_of(id) {
            Ok(_) => self.submit(id.shard(), OpKind::Remove { id }),
            Err(e) => Err(e),
        };
        wait(submitted)
    }

    /// Replaces a stored message's envelope (per-recipient results, schedule)
    /// through the writer's group commit; NotFound if it is gone.
    pub fn update(
        &self,
        id: MessageId,
        envelope: &Envelope,
    ) -> impl Future<Output = Result<(), SpoolError>> + Send + 'static {
        let submitted = match self.shard_of(id) {
            Ok(_) => envelope
                .encode()
                .and_then(|envelope| self.submit(id.shard(), OpKind::Update { id, envelope })),
            Err(e) => Err(e),
        };
        wait(submitted)
    }

    /// Counts messages and body bytes by walking the envelopes only.
    pub fn recover(&self) -> Result<RecoveryReport, SpoolError> {
        let start = Instant::now();
        let mut report = RecoveryReport::default();
        for shard in 0..self.shard_count() {
            report.add(&self.recover_shard(shard, |_, _| {})?);
        }
        report.elapsed = start.elapsed();
        Ok(report)
    }

    /// The start-up walk of one shard: hands every envelope to `visit` (the
    /// scheduler's timer set, the queue counters) and counts messages, body
    /// bytes and undecodable envelopes (logged, left on disk) on the way, so
    /// start-up reads each envelope once.
    pub fn recover_shard(
        &self,
        shard: u16,
        mut visit: impl FnMut(MessageId, &Envelope),
    ) -> Result<RecoveryReport, SpoolError> {
        let start = Instant::now();
        let mut report = RecoveryReport::default();
        report.corrupt = self.visit_shard(shard, &mut |id, env| {
            report.messages += 1;
            report.bytes += env.size;
            visit(id, env);
            true
        })?;
        report.elapsed = start.elapsed();
        Ok(report)
    }

    pub fn count(&self) -> Result<u64, SpoolError> {
        let mut n = 0;
        for s in &self.shards {
            let rtxn = self.read_txn(s)?;
            n += s.dbs.envelopes.len(&rtxn).map_err(|e| self.storage(e))?;
        }
        Ok(n)
    }

    /// Visits envelopes shard by shard, in id order within a shard; `visit`
    /// returns false to stop. Undecodable envelopes are logged and skipped.
    pub fn list(
        &self,
        mut visit: impl FnMut(MessageId, &Envelope) -> bool,
    ) -> Result<(), SpoolError> {
        let mut stopped = false;
        for shard in 0..self.shard_count() {
            if stopped {
                break;
            }
            self.visit_shard(shard, &mut |id, env| {
                stopped = !visit(id, env);
                !stopped
            })?;
        }
        Ok(())
    }

    /// Visits one shard's envelopes in id order until `visit` returns false;
    /// undecodable ones are logged, skipped and counted (the return value).
    fn visit_shard(
        &self,
        shard: u16,
        visit: &mut impl FnMut(MessageId, &Envelope) -> bool,
    ) -> Result<u64, SpoolError> {
        let s = self
            .shards
            .get(shard as usize)
            .ok_or(SpoolError::NoShard(shard))?;
        let rtxn = self.read_txn(s)?;
        let mut corrupt = 0;
        for item in s.dbs.envelopes.iter(&rtxn).map_err(|e| self.storage(e))? {
            let (key, value) = item.map_err(|e| self.storage(e))?;
            let decoded = id_from_key(key).and_then(|id| Ok((id, Envelope::decode(id, value)?)));
            match decoded {
                Ok((id, env)) => {
                    if !visit(id, &env) {
                        break;
                    }
                }
                Err(e) => {
                    error!(error = %e, "spool: skipping undecodable envelope");
                    corrupt += 1;
                }
            }
        }
        Ok(corrupt)
    }

    pub fn envelope(&self, id: MessageId) -> Result<Envelope, SpoolError> {
        let s = self.shard_of(id)?;
        let rtxn = self.read_txn(s)?;
        match s
            .dbs
            .envelopes
            .get(&rtxn, &id.key())
            .map_err(|e| self.storage(e))?
        {
            Some(bytes) => Envelope::decode(id, bytes),
            None => Err(SpoolError::NotFound(id)),
        }
    }

    /// Calls `f` with the body borrowed straight from LMDB's memory map, inside
    /// a read transaction (keep `f` short: a long reader pins old pages).
    pub fn with_body<R>(&self, id: MessageId, f: impl FnOnce(&[u8]) -> R) -> Result<R, SpoolError> {
        let s = self.shard_of(id)?;
        let rtxn = self.read_txn(s)?;
        match s
            .dbs
            .bodies
            .get(&rtxn, &id.key())
            .map_err(|e| self.storage(e))?
        {
            Some(body) => Ok(f(body)),
            None => Err(SpoolError::NotFound(id)),
        }
    }

    /// Commits and messages stored, ever, summed over shards.
    pub fn stats(&self) -> Result<SpoolStats, SpoolError> {
        let mut stats = SpoolStats::default();
        for s in &self.shards {
            let rtxn = self.read_txn(s)?;
            let get = |key: &str| -> Result<u64, SpoolError> {
                match s.dbs.meta.get(&rtxn, key) {
                    Ok(v) => Ok(v.unwrap_or(0)),
                    Err(heed::Error::Decoding(e)) => {
                        Err(SpoolError::Corrupt(format!("meta {key}: {e}")))
                    }
                    Err(e) => Err(self.storage(e)),
                }
            };
            stats.commits += get(META_COMMITS)?;
            stats.messages += get(META_MESSAGES)?;
        }
        Ok(stats)
    }

    /// Cluster mode: from now on every committed batch goes to `replicator`,
    /// which answers the stores. Set once; false if one was set already.
    pub fn set_replicator(&self, replicator: Arc<dyn crate::Replicator>) -> bool {
        self.replicator.set(replicator).is_ok()
    }

    /// A stored message as it is on disk: the encoded envelope and the body
    /// (with its prefix), copied out (cluster reconciliation).
    pub fn stored(&self, id: MessageId) -> Result<(Vec<u8>, Vec<u8>), SpoolError> {
        let s = self.shard_of(id)?;
        let rtxn = self.read_txn(s)?;
        let key = id.key();
        let envelope = s
            .dbs
            .envelopes
            .get(&rtxn, &key)
            .map_err(|e| self.storage(e))?
            .ok_or(SpoolError::NotFound(id))?
            .to_vec();
        let body = s
            .dbs
            .bodies
            .get(&rtxn, &key)
            .map_err(|e| self.storage(e))?
            .ok_or(SpoolError::NotFound(id))?
            .to_vec();
        Ok((envelope, body))
    }

    /// True once a storage error failed the spool closed.
    pub fn is_failed(&self) -> bool {
        self.health.is_failed()
    }

    /// Commits what is queued and stops the writer threads. Blocks: call it
    /// from a plain thread, not an executor. Idempotent; also run on Drop.
    pub fn shutdown(&self) {
        for w in self.shards.iter().filter_map(|s| s.writer.as_ref()) {
            w.closing.store(true, Ordering::Release);
            // Err = writer already gone, nothing to stop.
            let _ = w.tx.send(Msg::Shutdown);
        }
        for w in self.shards.iter().filter_map(|s| s.writer.as_ref()) {
            let handle = w
                .thread
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(handle) = handle {
                if handle.join().is_err() {
                    error!("spool writer thread panicked");
                }
            }
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn wait(
    submitted: Result<oneshot::Receiver<Result<(), SpoolError>>, SpoolError>,
) -> Result<(), SpoolError> {
    // A dropped reply sender means the writer went away without answering.
    submitted?.await.unwrap_or(Err(SpoolError::Closed))
}

fn id_from_key(key: &[u8]) -> Result<MessageId, SpoolError> {
    <[u8; 8]>::try_from(key)
        .map(|b| MessageId(u64::from_be_bytes(b)))
        .map_err(|_| SpoolError::Corrupt(format!("key of {} bytes", key.len())))
}

fn create_dbs(env: &heed::Env<WithoutTls>) -> Result<Dbs, heed::Error> {
    let mut wtxn = env.write_txn()?;
    let dbs = Dbs {
        envelopes: env.create_database(&mut wtxn, Some(DB_ENVELOPES))?,
        bodies: env.create_database(&mut wtxn, Some(DB_BODIES))?,
        meta: env.create_database(&mut wtxn, Some(DB_META))?,
    };
    wtxn.commit()?;
    Ok(dbs)
}

fn open_dbs(env: &heed::Env<WithoutTls>, dir: &Path) -> Result<Dbs, SpoolError> {
    let err = |e: heed::Error| io_err(dir.display(), e);
    let missing = |name: &str| SpoolError::Corrupt(format!("{}: no {name} db", dir.display()));
    let rtxn = env.read_txn().map_err(err)?;
    let dbs = Dbs {
        envelopes: env
            .open_database(&rtxn, Some(DB_ENVELOPES))
            .map_err(err)?
            .ok_or_else(|| missing(DB_ENVELOPES))?,
        bodies: env
            .open_database(&rtxn, Some(DB_BODIES))
            .map_err(err)?
            .ok_or_else(|| missing(DB_BODIES))?,
        meta: env
            .open_database(&rtxn, Some(DB_META))
            .map_err(err)?
            .ok_or_else(|| missing(DB_META))?,
    };
    // Handles opened in a read txn become visible to the env only on commit.
    rtxn.commit().map_err(err)?;
    Ok(dbs)
}
