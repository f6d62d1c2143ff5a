//! The per-shard writer thread: group commit.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use heed::types::{Bytes, Str, U64};
use heed::{Database, Env, MdbError, PutFlags, WithoutTls};
use tracing::{debug, error, warn};

use crate::replica::{Committed, Replicator, StoreReply, StoredMessage};
use crate::{space, MessageId, SpoolError};

/// Set once when cluster mode starts; read once per committed batch.
pub(crate) type ReplicatorSlot = std::sync::Arc<OnceLock<std::sync::Arc<dyn Replicator>>>;

pub(crate) type IdDb = Database<Bytes, Bytes>;
pub(crate) type MetaDb = Database<Str, U64<heed::byteorder::BigEndian>>;

pub(crate) const META_COMMITS: &str = "commits";
pub(crate) const META_MESSAGES: &str = "messages";

/// The three databases of one shard environment.
#[derive(Clone, Copy)]
pub(crate) struct Dbs {
    pub envelopes: IdDb,
    pub bodies: IdDb,
    pub meta: MetaDb,
}

/// Spool-wide fail-closed state, shared by all shards and writers.
#[derive(Default)]
pub(crate) struct Health {
    failed: AtomicBool,
    reason: OnceLock<String>,
}

impl Health {
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub fn check(&self) -> Result<(), SpoolError> {
        if self.is_failed() {
            Err(SpoolError::Failed(self.reason()))
        } else {
            Ok(())
        }
    }

    fn reason(&self) -> String {
        self.reason.get().cloned().unwrap_or_default()
    }

    /// Trip the spool into the failed state; the first reason is kept.
    pub fn fail(&self, reason: String) -> SpoolError {
        if self.reason.set(reason.clone()).is_ok() {
            error!(%reason, "spool storage error: failing closed");
        }
        self.failed.store(true, Ordering::Release);
        SpoolError::Failed(self.reason())
    }
}

pub(crate) enum Msg {
    Op(Op),
    Shutdown,
}

pub(crate) struct Op {
    pub kind: OpKind,
    pub reply: oneshot::Sender<Result<(), SpoolError>>,
}

pub(crate) enum OpKind {
    /// The envelope is already encoded by the caller, off the writer thread.
    Store {
        id: MessageId,
        envelope: Vec<u8>,
        /// Stored before `body` in the same value (empty for most stores).
        prefix: Vec<u8>,
        body: Vec<u8>,
    },
    Remove {
        id: MessageId,
    },
    /// Replace the envelope of a stored message (delivery progress).
    Update {
        id: MessageId,
        envelope: Vec<u8>,
    },
}

impl OpKind {
    /// Bytes this operation writes, pages aside.
    fn bytes(&self) -> u64 {
        match self {
            OpKind::Store {
                envelope,
                prefix,
                body,
                ..
            } => (envelope.len() + prefix.len() + body.len()) as u64,
            OpKind::Update { envelope, .. } => envelope.len() as u64,
            OpKind::Remove { .. } => 0,
        }
    }
}

/// Capacity errors leave LMDB consistent and may clear up (smaller message,
/// removals), so they are not fatal.
fn is_capacity(e: &heed::Error) -> bool {
    match e {
        heed::Error::Mdb(MdbError::MapFull | MdbError::TxnFull) => true,
        heed::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        ),
        _ => false,
    }
}

pub(crate) struct Writer {
    pub shard: u16,
    pub env: Env<WithoutTls>,
    pub dbs: Dbs,
    pub health: std::sync::Arc<Health>,
    pub max_batch: usize,
    pub metrics: WriterMetrics,
    pub replicator: ReplicatorSlot,
    /// The environment was opened with NO_META_SYNC (spool.sync = true): a
    /// commit flushes its data pages but leaves its meta page in the page
    /// cache, so its callers are answered only after a later flush.
    pub defer_meta_sync: bool,
    /// How long a removal may wait for a commit that happens anyway
    /// (`spool.removal_linger`; zero commits removals like any other op).
    pub removal_linger: Duration,
}

/// An operation that committed, with its outcome, not yet answered.
type Done = (Op, Result<(), SpoolError>);

/// When a committed operation may be answered, with the meta-page flush
/// deferred: a commit flushes its data pages and the meta page written by
/// the commit before it, not its own. So a batch is durable once the next
/// commit (or an explicit flush) has ended. Sans-IO: the writer tells it what
/// happened and answers what it hands back.
pub(crate) struct AckGate<T> {
    defer: bool,
    unflushed: Vec<T>,
}

impl<T> AckGate<T> {
    pub fn new(defer: bool, capacity: usize) -> AckGate<T> {
        AckGate {
            defer,
            unflushed: Vec::with_capacity(capacity),
        }
    }

    /// A commit ended: without deferral its batch is durable now; with it,
    /// the batch before it is, and this one waits.
    pub fn committed(&mut self, batch: impl IntoIterator<Item = T>) -> Vec<T> {
        if !self.defer {
            return batch.into_iter().collect();
        }
        let durable = std::mem::take(&mut self.unflushed);
        self.unflushed.extend(batch);
        durable
    }

    /// Outcomes to answer after the next explicit flush, releasing nothing.
    pub fn hold(&mut self, done: impl IntoIterator<Item = T>) {
        self.unflushed.extend(done);
    }

    /// An explicit flush ended: everything committed is durable.
    pub fn flushed(&mut self) -> Vec<T> {
        std::mem::take(&mut self.unflushed)
    }

    /// True when some caller waits for a flush.
    pub fn waiting(&self) -> bool {
        !self.unflushed.is_empty()
    }
}

/// Removals held back from starting a commit of their own. A removal needs
/// no prompt flush: lost in a crash, it only means the message is delivered
/// once more after the restart, which at-least-once delivery already allows
/// between the next hop's 250 and the removal's commit. So while stores or
/// updates are flowing (one was queued within the last `limit`), a removal
/// waits, up to `limit`, to ride the commit they are about to make; under
/// load that is almost always within a millisecond. When nothing else is
/// being written (a queue draining), removals commit at once as before, so a
/// crash then costs no more duplicates than it did. Half the commits of a
/// relay under load were removals alone, each a full B-tree path, free-list
/// and meta-page write. Sans-IO: the writer passes the time in.
pub(crate) struct RemovalLinger<T> {
    limit: Duration,
    max: usize,
    held: Vec<T>,
    since: Option<Instant>,
    /// When the last store or update was queued.
    last_write: Option<Instant>,
}

impl<T> RemovalLinger<T> {
    pub fn new(limit: Duration, max: usize) -> RemovalLinger<T> {
        RemovalLinger {
            limit,
            max: max.max(1),
            held: Vec::new(),
            since: None,
            last_write: None,
        }
    }

    /// False when removals commit like any other operation (limit zero).
    pub fn enabled(&self) -> bool {
        !self.limit.is_zero()
    }

    /// A store or update was queued: a commit is coming that removals can ride.
    pub fn saw_write(&mut self, now: Instant) {
        self.last_write = Some(now);
    }

    /// A removal queued at `now` waits only while other writes are flowing.
    pub fn should_hold(&self, now: Instant) -> bool {
        self.enabled()
            && self
                .last_write
                .is_some_and(|at| now.saturating_duration_since(at) < self.limit)
    }

    pub fn hold(&mut self, op: T, now: Instant) {
        self.since.get_or_insert(now);
        self.held.push(op);
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// When the oldest held removal must be committed, ridden or not.
    pub fn deadline(&self) -> Option<Instant> {
        self.since.map(|since| since + self.limit)
    }

    /// The held removals must commit now, alone if need be: the oldest has
    /// waited its limit, or they fill a batch.
    pub fn due(&self, now: Instant) -> bool {
        !self.held.is_empty()
            && (self.held.len() >= self.max || self.deadline().is_some_and(|at| now >= at))
    }

    /// Hands every held removal to the commit about to run.
    pub fn release_into(&mut self, batch: &mut Vec<T>) {
        batch.append(&mut self.held);
        self.since = None;
    }
}

/// Group-commit metrics (names documented in METRICS.md). The handles are
/// made once per writer, so a commit costs two histogram records.
pub(crate) struct WriterMetrics {
    commit_seconds: metrics::Histogram,
    batch_size: metrics::Histogram,
}

impl WriterMetrics {
    pub fn new() -> WriterMetrics {
        WriterMetrics {
            commit_seconds: metrics::histogram!("sluice_spool_commit_seconds"),
            batch_size: metrics::histogram!("sluice_spool_commit_batch_size"),
        }
    }
}

impl Writer {
    /// Group commit with the meta-page flush deferred (`defer_meta_sync`):
    /// LMDB's commit is a data-page fdatasync followed by an O_DSYNC write of
    /// the meta page, two device flushes in a row. With NO_META_SYNC the meta
    /// page is written without its flush, and the next commit's fdatasync
    /// (which flushes every dirty page of the file, that meta page included)
    /// makes it durable. So under load each commit costs one flush, and a
    /// batch is answered after the commit that follows it; when nothing
    /// follows, an explicit fdatasync answers it at once. Nobody hears "done"
    /// before both its data and its meta page were flushed, and LMDB keeps the
    /// file consistent whichever meta page a crash leaves newest.
    pub fn run(self, rx: Receiver<Msg>) {
        let mut batch: Vec<Op> = Vec::with_capacity(self.max_batch);
        let mut gate: AckGate<Done> = AckGate::new(self.defer_meta_sync, self.max_batch);
        let mut linger: RemovalLinger<Op> = RemovalLinger::new(self.removal_linger, self.max_batch);
        let mut shutting = false;
        loop {
            // Block for work only when nobody is waiting on a flush; with
            // removals held, no longer than the oldest may wait.
            if !shutting && !gate.waiting() {
                match next_request(&rx, linger.deadline()) {
                    Ok(Msg::Op(op)) => sort_op(op, &mut batch, &mut linger),
                    Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => shutting = true,
                    Err(RecvTimeoutError::Timeout) => {}
                }
            }
            // Whatever queued up while the last commit was fsyncing joins this txn.
            while batch.len() + linger.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(Msg::Op(op)) => sort_op(op, &mut batch, &mut linger),
                    Ok(Msg::Shutdown) => shutting = true,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        shutting = true;
                        break;
                    }
                }
            }
            let removals_due = linger.due(Instant::now()) || (shutting && !linger.is_empty());
            if !batch.is_empty() || removals_due {
                linger.release_into(&mut batch);
                self.commit_batch(&mut batch, &mut gate);
            } else if gate.waiting() {
                // Held removals stay held: a bare flush is cheaper than a
                // commit that writes their pages now.
                self.flush(&mut gate);
            } else if shutting {
                break;
            }
        }
        self.flush(&mut gate);
        debug!(shard = self.shard, "spool writer stopped");
    }

    /// Makes the last commit's meta page durable, then answers its callers.
    fn flush(&self, gate: &mut AckGate<Done>) {
        if !gate.waiting() {
            return;
        }
        // With sync = false nothing is flushed, ever (benchmarks only).
        let synced = if self.defer_meta_sync {
            self.env.force_sync()
        } else {
            Ok(())
        };
        match synced {
            Ok(()) => self.finish(gate.flushed().into_iter()),
            Err(e) => {
                let err = self.fail(e);
                fail_all(gate.flushed(), &err);
            }
        }
    }

    fn commit_batch(&self, batch: &mut Vec<Op>, gate: &mut AckGate<Done>) {
        if let Err(e) = self.health.check() {
            reply_all(batch, &e);
            fail_all(gate.flushed(), &e);
            return;
        }
        let started = Instant::now();
        match self.run_txn(batch) {
            Ok(results) => {
                // Before the replies: the latency is the commit's, not the wakeups'.
                self.metrics
                    .commit_seconds
                    .record(started.elapsed().as_secs_f64());
                self.metrics.batch_size.record(batch.len() as f64);
                let durable = gate.committed(batch.drain(..).zip(results));
                self.finish(durable.into_iter());
            }
            Err(e) if self.is_capacity(&e, batch) && batch.len() > 1 => {
                // Retry one by one so a single huge message only fails itself.
                warn!(shard = self.shard, batch = batch.len(), error = %e, "spool batch did not fit, retrying singly");
                for op in batch.drain(..) {
                    let r = self.commit_single(&op);
                    // A failed single commit flushed nothing: hold, flush once after.
                    gate.hold(std::iter::once((op, r)));
                }
                self.flush(gate);
            }
            Err(e) if self.is_capacity(&e, batch) => {
                warn!(shard = self.shard, error = %e, "spool full");
                reply_all(batch, &SpoolError::Full);
                self.flush(gate);
            }
            Err(e) => {
                let err = self.fail(e);
                reply_all(batch, &err);
                fail_all(gate.flushed(), &err);
            }
        }
    }

    /// Answers the callers of committed operations. In cluster mode the
    /// replicator gets the batch, and answers the stores itself once their
    /// copy is durable in the cluster engine (one Option test per batch).
    fn finish(&self, done: impl Iterator<Item = (Op, Result<(), SpoolError>)>) {
        let Some(replicator) = self.replicator.get() else {
            for (op, r) in done {
                let _ = op.reply.send(r);
            }
            return;
        };
        let mut batch = Committed {
            shard: self.shard,
            ..Committed::default()
        };
        for (Op { kind, reply }, r) in done {
            if r.is_err() {
                let _ = reply.send(r);
                continue;
            }
            match kind {
                OpKind::Store {
                    id,
                    envelope,
                    prefix,
                    body,
                } => batch.stores.push(StoredMessage {
                    id,
                    envelope,
                    prefix,
                    body,
                    reply: StoreReply(reply),
                }),
                OpKind::Update { id, envelope } => {
                    batch.updates.push((id, envelope));
                    let _ = reply.send(Ok(()));
                }
                OpKind::Remove { id } => {
                    batch.removes.push(id);
                    let _ = reply.send(Ok(()));
                }
            }
        }
        if !batch.is_empty() {
            replicator.committed(batch);
        }
    }

    fn commit_single(&self, op: &Op) -> Result<(), SpoolError> {
        self.health.check()?;
        match self.run_txn(std::slice::from_ref(op)) {
            Ok(results) => results.into_iter().next().unwrap_or(Ok(())),
            Err(e) if self.is_capacity(&e, std::slice::from_ref(op)) => Err(SpoolError::Full),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// A full map or disk. LMDB reports a write that ended short as EIO, and a
    /// short write is what a filesystem that just ran out of space does: an EIO
    /// with less space left than the transaction needed is a full disk (452,
    /// transient), not a failing one (fail closed).
    fn is_capacity(&self, e: &heed::Error, ops: &[Op]) -> bool {
        if is_capacity(e) {
            return true;
        }
        let heed::Error::Io(io) = e else {
            return false;
        };
        if io.raw_os_error() != Some(libc::EIO) {
            return false;
        }
        let needed = ops.iter().map(|op| op.kind.bytes()).sum::<u64>() + space::SHORT_WRITE_SLACK;
        space::free_bytes(self.env.path()).is_some_and(|free| free < needed)
    }

    fn fail(&self, e: heed::Error) -> SpoolError {
        self.health.fail(format!("shard {}: {e}", self.shard))
    }

    /// One write transaction for all `ops`. The outer error aborts the whole
    /// txn (nothing written); inner results are per-op outcomes of a txn that
    /// committed.
    fn run_txn(&self, ops: &[Op]) -> Result<Vec<Result<(), SpoolError>>, heed::Error> {
        let mut wtxn = self.env.write_txn()?;
        let mut results = Vec::with_capacity(ops.len());
        let mut stored = 0u64;
        for op in ops {
            let r = match &op.kind {
                OpKind::Store {
                    id,
                    envelope,
                    prefix,
                    body,
                } => {
                    let key = id.key();
                    // Never overwrite: a duplicate id must not replace a queued message.
                    match self.dbs.envelopes.put_with_flags(
                        &mut wtxn,
                        PutFlags::NO_OVERWRITE,
                        &key,
                        envelope,
                    ) {
                        Ok(()) => {
                            if prefix.is_empty() {
                                self.dbs.bodies.put(&mut wtxn, &key, body)?;
                            } else {
                                // MDB_RESERVE: both parts are copied once, into the map.
                                self.dbs.bodies.put_reserved(
                                    &mut wtxn,
                                    &key,
                                    prefix.len() + body.len(),
                                    |space| {
                                        space.write_all(prefix)?;
                                        space.write_all(body)
                                    },
                                )?;
                            }
                            stored += 1;
                            Ok(())
                        }
                        Err(heed::Error::Mdb(MdbError::KeyExist)) => {
                            Err(SpoolError::Duplicate(*id))
                        }
                        Err(e) => return Err(e),
                    }
                }
                OpKind::Update { id, envelope } => {
                    let key = id.key();
                    if self.dbs.envelopes.get(&wtxn, &key)?.is_some() {
                        self.dbs.envelopes.put(&mut wtxn, &key, envelope)?;
                        Ok(())
                    } else {
                        Err(SpoolError::NotFound(*id))
                    }
                }
                OpKind::Remove { id } => {
                    let key = id.key();
                    let had_envelope = self.dbs.envelopes.delete(&mut wtxn, &key)?;
                    let had_body = self.dbs.bodies.delete(&mut wtxn, &key)?;
                    if had_envelope || had_body {
                        Ok(())
                    } else {
                        Err(SpoolError::NotFound(*id))
                    }
                }
            };
            results.push(r);
        }
        bump(&self.dbs.meta, &mut wtxn, META_COMMITS, 1)?;
        if stored > 0 {
            bump(&self.dbs.meta, &mut wtxn, META_MESSAGES, stored)?;
        }
        wtxn.commit()?;
        Ok(results)
    }
}

/// How long the writer polls its queue, yielding the CPU between polls,
/// before it sleeps while removals are held.
const POLL_BEFORE_SLEEP: Duration = Duration::from_micros(200);

/// The next request, waiting no later than `deadline` (None: for as long as
/// it takes). With removals held the relay is delivering, and a store is
/// likely within a commit's time: the writer polls for it before it sleeps,
/// so the store neither waits for this thread's wake-up nor makes its sender
/// pay for one. Without that poll, lingering cost the pipelined load 2–7% of
/// its rate on a 2-vCPU box (BENCHMARKS.md, 2026-12-07).
fn next_request(rx: &Receiver<Msg>, deadline: Option<Instant>) -> Result<Msg, RecvTimeoutError> {
    let Some(deadline) = deadline else {
        return rx.recv().map_err(|_| RecvTimeoutError::Disconnected);
    };
    let poll_until = (Instant::now() + POLL_BEFORE_SLEEP).min(deadline);
    loop {
        match rx.try_recv() {
            Ok(msg) => return Ok(msg),
            Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
            Err(TryRecvError::Empty) if Instant::now() < poll_until => std::thread::yield_now(),
            Err(TryRecvError::Empty) => break,
        }
    }
    rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
}

/// Removals wait in `linger` while other writes flow; everything else
/// commits next.
fn sort_op(op: Op, batch: &mut Vec<Op>, linger: &mut RemovalLinger<Op>) {
    let now = Instant::now();
    if matches!(op.kind, OpKind::Remove { .. }) {
        if linger.should_hold(now) {
            linger.hold(op, now);
            return;
        }
    } else {
        linger.saw_write(now);
    }
    batch.push(op);
}

fn bump(meta: &MetaDb, wtxn: &mut heed::RwTxn, key: &str, by: u64) -> Result<(), heed::Error> {
    let now = meta.get(wtxn, key)?.unwrap_or(0);
    meta.put(wtxn, key, &now.wrapping_add(by))
}

/// Committed but never made durable: the callers hear the failure.
fn fail_all(done: Vec<Done>, e: &SpoolError) {
    for (op, _) in done {
        let _ = op.reply.send(Err(e.clone()));
    }
}

fn reply_all(batch: &mut Vec<Op>, e: &SpoolError) {
    for op in batch.drain(..) {
        let _ = op.reply.send(Err(e.clone()));
    }
}

#[cfg(test)]
mod ack_gate_tests {
    use super::AckGate;

    #[test]
    fn a_batch_is_answered_after_the_commit_that_follows_it() {
        let mut gate = AckGate::new(true, 4);
        assert!(
            gate.committed([1, 2]).is_empty(),
            "its own commit left the meta page unflushed"
        );
        assert!(gate.waiting());
        assert_eq!(
            gate.committed([3]),
            vec![1, 2],
            "the next commit's fdatasync flushed it"
        );
        assert_eq!(gate.committed([4, 5]), vec![3]);
        assert_eq!(
            gate.flushed(),
            vec![4, 5],
            "an explicit flush answers the last batch"
        );
        assert!(!gate.waiting());
        assert!(gate.flushed().is_empty());
    }

    #[test]
    fn held_outcomes_wait_for_an_explicit_flush() {
        let mut gate = AckGate::new(true, 4);
        assert!(gate.committed([1]).is_empty());
        gate.hold([2]);
        gate.hold([3]);
        assert!(gate.waiting());
        assert_eq!(gate.flushed(), vec![1, 2, 3]);
    }

    #[test]
    fn without_deferral_a_commit_answers_its_own_batch() {
        let mut gate = AckGate::new(false, 4);
        assert_eq!(gate.committed([1, 2]), vec![1, 2]);
        assert!(!gate.waiting());
    }
}

#[cfg(test)]
mod removal_linger_tests {
    use std::time::{Duration, Instant};

    use super::RemovalLinger;

    const LIMIT: Duration = Duration::from_millis(50);

    #[test]
    fn a_held_removal_is_due_only_once_the_oldest_has_waited_the_limit() {
        let start = Instant::now();
        let mut linger = RemovalLinger::new(LIMIT, 8);
        assert!(linger.enabled());
        assert_eq!(linger.deadline(), None, "nothing held, nothing to wake for");
        assert!(!linger.due(start));
        linger.hold(1, start);
        linger.hold(2, start + Duration::from_millis(30));
        assert_eq!(
            linger.deadline(),
            Some(start + LIMIT),
            "the oldest removal sets the deadline"
        );
        assert!(!linger.due(start + Duration::from_millis(49)));
        assert!(linger.due(start + LIMIT));
    }

    #[test]
    fn a_full_batch_of_removals_is_due_at_once() {
        let start = Instant::now();
        let mut linger = RemovalLinger::new(LIMIT, 3);
        for op in 0..2 {
            linger.hold(op, start);
        }
        assert!(!linger.due(start));
        linger.hold(2, start);
        assert!(linger.due(start), "three held fill a batch of three");
    }

    #[test]
    fn releasing_hands_every_removal_over_and_restarts_the_clock() {
        let start = Instant::now();
        let mut linger = RemovalLinger::new(LIMIT, 8);
        linger.hold(1, start);
        linger.hold(2, start);
        let mut batch = vec![0];
        linger.release_into(&mut batch);
        assert_eq!(
            batch,
            vec![0, 1, 2],
            "removals ride after the batch's own ops"
        );
        assert!(linger.is_empty());
        assert_eq!(linger.deadline(), None);
        let later = start + Duration::from_secs(1);
        linger.hold(3, later);
        assert_eq!(
            linger.deadline(),
            Some(later + LIMIT),
            "the clock starts again with the next held removal"
        );
    }

    #[test]
    fn a_zero_limit_turns_lingering_off() {
        let mut linger: RemovalLinger<u8> = RemovalLinger::new(Duration::ZERO, 8);
        assert!(!linger.enabled());
        let now = Instant::now();
        linger.saw_write(now);
        assert!(!linger.should_hold(now));
    }

    #[test]
    fn removals_wait_only_while_other_writes_flow() {
        let start = Instant::now();
        let mut linger: RemovalLinger<u8> = RemovalLinger::new(LIMIT, 8);
        assert!(
            !linger.should_hold(start),
            "no store seen yet: a draining queue commits its removals at once"
        );
        linger.saw_write(start);
        assert!(linger.should_hold(start + Duration::from_millis(49)));
        assert!(
            !linger.should_hold(start + LIMIT),
            "no store for a whole linger: nothing to ride"
        );
        linger.saw_write(start + Duration::from_secs(1));
        assert!(linger.should_hold(start + Duration::from_secs(1)));
    }
}
