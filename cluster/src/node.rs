//! The sluice-cluster thread: one OS thread with a tokio current-thread
//! runtime, started only in cluster mode. The glommio executors never run
//! its futures; they reach it through bounded queues (the spool writers
//! through the replicator, the cores' importers back through theirs).
//!
//! Its tasks, each with its own engine connection:
//! * replication: copies committed batches before their 250, and envelope
//!   updates and removals every `sync_interval`;
//! * heartbeat: extends the lease, and renews the local lease clock;
//! * sweep: declares nodes past their lease dead and imports their messages
//!   into this node's spool through the cores' queues.
//!
//! A later shared-limits task (issue 16 item 3) gets its own connection here.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use sluice_spool::{Committed, MessageId, Replicator, Spool, SpoolError, StoredMessage};
use tracing::{error, info, warn};

use crate::engine::{self, Db, Row};
use crate::fence::EXIT_FENCED;
use crate::judge;
use crate::lease::LeaseClock;
use crate::pending::PendingSync;
use crate::reconcile;
use crate::{ClusterError, EngineDown, Settings};

/// Committed batches waiting for the replication task (each up to the
/// spool's max_batch messages); a full queue makes the spool writers wait.
const REPLICATION_QUEUE: usize = 256;
/// Most messages merged into one engine transaction.
const MAX_MERGED: usize = 2_000;
/// Import requests waiting per core.
pub const IMPORT_QUEUE: usize = 1_024;
/// Longest wait for a core to store an imported message.
const IMPORT_WAIT: Duration = Duration::from_secs(60);
/// Longest the replication task waits before it looks for a stop request.
const STOP_CHECK: Duration = Duration::from_millis(100);
/// Engine-down warnings: at most one per this.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// A dead node's message for this core's spool (`CoreQueue`): stored under
/// a new id of the core, counted in its queue, handed to delivery. The reply
/// comes once it is in LMDB and replicated as this node's own.
pub struct Import {
    pub envelope: Vec<u8>,
    pub body: Vec<u8>,
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// What the API and the metrics read of this node's cluster state.
#[derive(Debug, Default)]
pub struct Stats {
    pub epoch: AtomicI64,
    pub engine_up: AtomicBool,
    pub unreplicated: AtomicU64,
    pub replicated: AtomicU64,
    pub imported: AtomicU64,
    pub dropped: AtomicU64,
}

/// The running node, as the rest of the relay sees it.
pub struct Cluster {
    pub settings: Settings,
    /// Read by every core's scheduler before a dispatch.
    pub lease: Arc<LeaseClock>,
    pub stats: Arc<Stats>,
    /// `shared_limits = true`: the cores' way to the shared limits.
    pub limits: Option<Arc<crate::shared::SharedLimits>>,
    /// `shared_limits = true`: suspensions and shaping actions shared.
    pub actions: Option<Arc<crate::actions::Actions>>,
    /// Set by `sluice cluster leave`: the stop that follows hands the node's
    /// mail over and marks it `left` (see [`Cluster::stop`]).
    pub leaving: AtomicBool,
    stop_tx: async_channel::Sender<StopRequest>,
}

struct Node {
    s: Settings,
    epoch: i64,
    spool: Arc<Spool>,
    lease: Arc<LeaseClock>,
    stats: Arc<Stats>,
    imports: Vec<async_channel::Sender<Import>>,
    /// Lease-clock ms of the last failed engine call (0: none), for the sweep's judgement.
    last_engine_error_ms: AtomicU64,
    /// Marked `left` by its own stop: the fence that follows is expected.
    left: AtomicBool,
}

/// Joins the cluster (tables, new epoch, reconciliation of the recovered
/// spool), hooks replication into the spool, and leaves the thread running.
/// Blocks until the join is done: the caller opens listeners and starts
/// dispatch only after it.
pub fn start(
    settings: Settings,
    spool: Arc<Spool>,
    imports: Vec<async_channel::Sender<Import>>,
) -> Result<Cluster, ClusterError> {
    let lease = Arc::new(LeaseClock::new());
    if settings.engine_down == EngineDown::AcceptLocal {
        // The single-node promise during an engine outage: delivery goes on.
        lease.deliver_while_unreachable();
    }
    let stats = Arc::new(Stats::default());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let shared = item3_handles(&settings);
    let (limits, actions) = (
        shared.as_ref().map(|h| h.limits.clone()),
        shared.as_ref().map(|h| h.actions.clone()),
    );
    let (stop_tx, stop_rx) = async_channel::bounded(1);
    let (s, l, st) = (settings.clone(), lease.clone(), stats.clone());
    std::thread::Builder::new()
        .name("sluice-cluster".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(ClusterError::Thread(e.to_string())));
                    return;
                }
            };
            let control = Control {
                ready: ready_tx,
                stop: stop_rx,
            };
            rt.block_on(run(s, spool, l, st, imports, shared, control));
        })
        .map_err(|e| ClusterError::Thread(e.to_string()))?;
    ready_rx
        .recv()
        .map_err(|_| ClusterError::Thread("stopped during the join".into()))??;
    Ok(Cluster {
        settings,
        lease,
        stats,
        limits,
        actions,
        leaving: AtomicBool::new(false),
        stop_tx,
    })
}

/// How the starting thread and the relay's stop reach the cluster thread.
struct Control {
    /// The join's outcome, awaited by [`start`].
    ready: std::sync::mpsc::Sender<Result<(), ClusterError>>,
    /// The relay's stop (and leave), for the replication task.
    stop: async_channel::Receiver<StopRequest>,
}

async fn run(
    s: Settings,
    spool: Arc<Spool>,
    lease: Arc<LeaseClock>,
    stats: Arc<Stats>,
    imports: Vec<async_channel::Sender<Import>>,
    shared: Option<Item3>,
    control: Control,
) {
    let Control { ready, stop } = control;
    let mut db = Db::new(&s);
    let joined = engine::bounded(s.engine_timeout * 4, "join", async {
        let sent = lease.now_ms();
        let epoch = engine::join(db.client().await?, &s).await?;
        lease.renewed(sent, s.lease);
        Ok(epoch)
    })
    .await;
    let epoch = match joined {
        Ok(e) => e,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    stats.epoch.store(epoch, Ordering::Relaxed);
    stats.engine_up.store(true, Ordering::Relaxed);
    metrics::gauge!("sluice_cluster_engine_up").set(1.0);
    metrics::gauge!("sluice_cluster_epoch").set(epoch as f64);
    info!(target: "sluice::cluster", node = %s.node_id, epoch, "cluster: joined");
    let node = Arc::new(Node {
        s,
        epoch,
        spool,
        lease,
        stats,
        imports,
        last_engine_error_ms: AtomicU64::new(0),
        left: AtomicBool::new(false),
    });
    if let Err(e) = reconcile(&node, &mut db).await {
        let _ = ready.send(Err(e));
        return;
    }
    let (tx, rx) = async_channel::bounded(REPLICATION_QUEUE);
    node.spool
        .set_replicator(Arc::new(ChannelReplicator { tx }));
    let _ = ready.send(Ok(()));

    if let Some(h) = shared {
        spawn_item3(&node.s, h);
    }
    tokio::spawn(heartbeat_loop(node.clone()));
    tokio::spawn(replication_loop(node.clone(), rx, stop));
    sweep_loop(node, db).await;
}

/// The join's second half: the recovered spool against the engine.
async fn reconcile(node: &Node, db: &mut Db) -> Result<(), ClusterError> {
    let me = node.s.node_id.as_str();
    let mut local = Vec::new();
    node.spool.list(|id, _| {
        local.push(id.0);
        true
    })?;
    let c = db.client().await?;
    let as_set = |v: Vec<i64>| v.into_iter().map(|i| i as u64).collect::<HashSet<u64>>();
    let in_engine = as_set(engine::ids_of(c, "sluice_message", me).await?);
    let taken = as_set(engine::ids_of(c, "sluice_taken", me).await?);
    let plan = reconcile::plan(&local, &in_engine, &taken);
    for &id in &plan.drop_local {
        // Not replicated: the replicator is not hooked in yet.
        match node.spool.remove(MessageId(id)).await {
            Ok(()) | Err(SpoolError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        info!(target: "sluice::cluster", id = %MessageId(id), "cluster: dropped, taken over");
    }
    node.stats
        .dropped
        .fetch_add(plan.drop_local.len() as u64, Ordering::Relaxed);
    metrics::counter!("sluice_cluster_dropped_total").increment(plan.drop_local.len() as u64);
    for chunk in plan.replicate.chunks(500) {
        replicate_from_spool(node, c, chunk).await?;
    }
    if !plan.delete_remote.is_empty() {
        let ids: Vec<i64> = plan.delete_remote.iter().map(|&i| i as i64).collect();
        let t = c.transaction().await?;
        engine::check_epoch(&t, me, node.epoch).await?;
        engine::delete_messages(&t, me, &ids).await?;
        t.commit().await?;
    }
    // The drops are committed locally: the tombstones have done their job
    // (and ids freed by the drops may be given out again).
    c.execute("DELETE FROM sluice_taken WHERE origin_node = $1", &[&me])
        .await?;
    info!(
        target: "sluice::cluster",
        local = local.len(),
        dropped = plan.drop_local.len(),
        replicated = plan.replicate.len(),
        deleted_remote = plan.delete_remote.len(),
        "cluster: spool reconciled"
    );
    Ok(())
}

/// Copies messages from the local spool (reconciliation, accept-local catch-up).
async fn replicate_from_spool(
    node: &Node,
    c: &mut tokio_postgres::Client,
    ids: &[u64],
) -> Result<usize, ClusterError> {
    let mut stored = Vec::with_capacity(ids.len());
    for &id in ids {
        match node.spool.stored(MessageId(id)) {
            Ok((env, body)) => stored.push((id as i64, env, body)),
            // Delivered meanwhile: nothing to copy.
            Err(SpoolError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let rows: Vec<Row<'_>> = stored
        .iter()
        .map(|(id, e, b)| Row {
            id: *id,
            envelope: e,
            body: b,
        })
        .collect();
    if !rows.is_empty() {
        engine::write_messages(c, &node.s.node_id, node.epoch, &rows).await?;
    }
    Ok(rows.len())
}

/// How the process exits when fenced: the engine installs one that writes
/// out its buffered log lines first.
static EXIT: std::sync::OnceLock<fn(i32) -> !> = std::sync::OnceLock::new();

/// Installs the exit used when the node finds itself fenced.
pub fn set_exit(exit: fn(i32) -> !) {
    let _ = EXIT.set(exit);
}

/// Fenced while running: nothing more may start; exit with a status of its
/// own so the service manager restarts the node into a fresh join.
fn fenced_exit(node: &Node, why: &str) -> ! {
    node.lease.revoke();
    if node.left.load(Ordering::Acquire) {
        // This node marked itself left (its own epoch bump): the process is
        // on its way out through `Cluster::stop`, whose answer was sent.
        // Nothing more may run on this thread.
        loop {
            std::thread::park();
        }
    }
    error!(target: "sluice::cluster", node = %node.s.node_id, epoch = node.epoch, reason = why, "cluster: fenced, exiting");
    match EXIT.get() {
        Some(exit) => exit(EXIT_FENCED),
        None => std::process::exit(EXIT_FENCED),
    }
}

fn set_engine_up(node: &Node, up: bool) {
    if !up {
        engine_failed(node);
    }
    node.stats.engine_up.store(up, Ordering::Relaxed);
    metrics::gauge!("sluice_cluster_engine_up").set(if up { 1.0 } else { 0.0 });
}

fn engine_failed(node: &Node) {
    // max(1): 0 means "never".
    let now = node.lease.now_ms().max(1);
    node.last_engine_error_ms.store(now, Ordering::Relaxed);
}

/// Logs an engine failure at most once per [`WARN_EVERY`] per task.
struct Warner(Option<Instant>);

impl Warner {
    fn warn(&mut self, task: &'static str, e: &ClusterError) {
        if self.0.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            self.0 = Some(Instant::now());
            warn!(target: "sluice::cluster", task, error = %e, "cluster engine unreachable");
        }
    }
}

async fn heartbeat_loop(node: Arc<Node>) {
    let mut db = Db::new(&node.s);
    let mut warner = Warner(None);
    loop {
        let sent = node.lease.now_ms();
        let r = engine::bounded(node.s.engine_timeout, "heartbeat", async {
            engine::heartbeat(db.client().await?, &node.s, node.epoch).await
        })
        .await;
        match r {
            Ok(()) => {
                node.lease.renewed(sent, node.s.lease);
                node.lease.set_unreachable(false);
                set_engine_up(&node, true);
            }
            Err(ClusterError::Fenced(f)) => fenced_exit(&node, &f.0),
            Err(e) => {
                node.lease.set_unreachable(true);
                db.broken();
                set_engine_up(&node, false);
                warner.warn("heartbeat", &e);
            }
        }
        tokio::time::sleep(node.s.heartbeat_interval()).await;
    }
}

/// Hands committed batches from the spool writers to the replication task.
struct ChannelReplicator {
    tx: async_channel::Sender<Committed>,
}

impl Replicator for ChannelReplicator {
    fn committed(&self, batch: Committed) {
        // On a writer thread (a plain thread): waiting here is backpressure.
        if let Err(e) = self.tx.send_blocking(batch) {
            for s in e.into_inner().stores {
                s.reply.send(Err(SpoolError::Replication(
                    "cluster thread stopped".into(),
                )));
            }
        }
    }
}

async fn replication_loop(
    node: Arc<Node>,
    rx: async_channel::Receiver<Committed>,
    stop: async_channel::Receiver<StopRequest>,
) {
    let mut db = Db::new(&node.s);
    let mut warner = Warner(None);
    let mut pending = PendingSync::default();
    let mut unreplicated: Vec<u64> = Vec::new();
    let mut last_sync = Instant::now();
    let interval = node.s.sync_interval;
    let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
    loop {
        if let Ok(req) = stop.try_recv() {
            let r = finish(
                &node,
                &mut db,
                &mut warner,
                &rx,
                &mut pending,
                &mut unreplicated,
                req.leave,
            )
            .await;
            let _ = req.reply.send(r);
            return;
        }
        // Woken at least every STOP_CHECK to see a stop request, whatever
        // the sync interval (up to 60 s).
        let wait = interval.saturating_sub(last_sync.elapsed()).min(STOP_CHECK);
        let first = match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Ok(b)) => Some(b),
            // Every sender is gone: the spool has shut down.
            Ok(Err(_)) => return,
            Err(_) => None,
        };
        let mut stores: Vec<StoredMessage> = Vec::new();
        let mut next = first;
        while let Some(b) = next.take() {
            stores.extend(b.stores);
            for (id, env) in b.updates {
                pending.update(id.0, env);
            }
            for id in b.removes {
                pending.remove(id.0);
            }
            if stores.len() < MAX_MERGED {
                next = rx.try_recv().ok();
            }
        }
        if !stores.is_empty() {
            replicate_stores(&node, &mut db, &mut warner, stores, &mut unreplicated).await;
        }
        let since = u64::try_from(last_sync.elapsed().as_millis()).unwrap_or(u64::MAX);
        if pending.due(since, interval_ms) {
            sync_pending(&node, &mut db, &mut warner, &mut pending).await;
            last_sync = Instant::now();
        } else if pending.is_empty() {
            last_sync = Instant::now();
        }
        if !unreplicated.is_empty() && node.stats.engine_up.load(Ordering::Relaxed) {
            catch_up(&node, &mut db, &mut warner, &mut unreplicated).await;
        }
    }
}

/// One engine transaction for the merged batches; then the sessions' 250s.
async fn replicate_stores(
    node: &Node,
    db: &mut Db,
    warner: &mut Warner,
    stores: Vec<StoredMessage>,
    unreplicated: &mut Vec<u64>,
) {
    // Body and prefix are one value in the engine (the prefix is usually empty).
    let joined: Vec<Option<Vec<u8>>> = stores
        .iter()
        .map(|m| (!m.prefix.is_empty()).then(|| [m.prefix.as_slice(), &m.body].concat()))
        .collect();
    let rows: Vec<Row<'_>> = stores
        .iter()
        .zip(&joined)
        .map(|(m, j)| Row {
            id: m.id.0 as i64,
            envelope: &m.envelope,
            body: j.as_deref().unwrap_or(&m.body),
        })
        .collect();
    let r = engine::bounded(node.s.engine_timeout, "replication", async {
        engine::write_messages(db.client().await?, &node.s.node_id, node.epoch, &rows).await
    })
    .await;
    drop(rows);
    let n = stores.len() as u64;
    match r {
        Ok(()) => {
            set_engine_up(node, true);
            node.stats.replicated.fetch_add(n, Ordering::Relaxed);
            metrics::counter!("sluice_cluster_replicated_total").increment(n);
            for m in stores {
                m.reply.send(Ok(()));
            }
        }
        Err(ClusterError::Fenced(f)) => {
            for m in stores {
                m.reply.send(Err(SpoolError::Replication(f.to_string())));
            }
            fenced_exit(node, &f.0)
        }
        Err(e) => {
            db.broken();
            set_engine_up(node, false);
            warner.warn("replication", &e);
            match node.s.engine_down {
                EngineDown::Tempfail => {
                    for m in stores {
                        // Taken out again: no 250, and nothing to deliver. The
                        // removal is queued at once (the future need not be awaited).
                        drop(node.spool.remove(m.id));
                        m.reply.send(Err(SpoolError::Replication(e.to_string())));
                    }
                }
                EngineDown::AcceptLocal => {
                    for m in stores {
                        unreplicated.push(m.id.0);
                        m.reply.send(Ok(()));
                    }
                    set_unreplicated(node, unreplicated.len());
                }
            }
        }
    }
}

fn set_unreplicated(node: &Node, n: usize) {
    node.stats.unreplicated.store(n as u64, Ordering::Relaxed);
    metrics::gauge!("sluice_cluster_unreplicated_messages").set(n as f64);
}

async fn sync_pending(node: &Node, db: &mut Db, warner: &mut Warner, pending: &mut PendingSync) {
    let updates: Vec<(i64, &[u8])> = pending
        .updates
        .iter()
        .map(|(id, e)| (*id as i64, e.as_slice()))
        .collect();
    let removes: Vec<i64> = pending.removes.iter().map(|&i| i as i64).collect();
    let r = engine::bounded(node.s.engine_timeout, "sync", async {
        engine::sync_changes(
            db.client().await?,
            &node.s.node_id,
            node.epoch,
            &updates,
            &removes,
        )
        .await
    })
    .await;
    drop(updates);
    match r {
        Ok(()) => {
            pending.updates.clear();
            pending.removes.clear();
        }
        Err(ClusterError::Fenced(f)) => fenced_exit(node, &f.0),
        Err(e) => {
            db.broken();
            set_engine_up(node, false);
            warner.warn("sync", &e);
            let shed = pending.shed();
            if shed > 0 {
                warn!(target: "sluice::cluster", shed, "cluster: too many changes waiting for the engine; envelope updates given up");
            }
        }
    }
}

/// Accept-local mode, engine back: copy what was accepted without it.
async fn catch_up(node: &Node, db: &mut Db, warner: &mut Warner, unreplicated: &mut Vec<u64>) {
    while !unreplicated.is_empty() {
        let take = unreplicated.len().min(500);
        let chunk: Vec<u64> = unreplicated[unreplicated.len() - take..].to_vec();
        let r = engine::bounded(node.s.engine_timeout, "catch-up", async {
            replicate_from_spool(node, db.client().await?, &chunk).await
        })
        .await;
        match r {
            Ok(_) => {
                unreplicated.truncate(unreplicated.len() - take);
                set_unreplicated(node, unreplicated.len());
            }
            Err(ClusterError::Fenced(f)) => fenced_exit(node, &f.0),
            Err(e) => {
                db.broken();
                engine_failed(node);
                warner.warn("catch-up", &e);
                return;
            }
        }
    }
    info!(target: "sluice::cluster", "cluster: messages accepted while the engine was down are replicated");
}

async fn sweep_loop(node: Arc<Node>, mut db: Db) {
    let mut warner = Warner(None);
    loop {
        tokio::time::sleep(node.s.sweep_interval).await;
        match sweep_once(&node, &mut db).await {
            Ok(()) => {}
            Err(ClusterError::Fenced(f)) => fenced_exit(&node, &f.0),
            Err(e) => {
                db.broken();
                engine_failed(&node);
                warner.warn("sweep", &e);
            }
        }
    }
}

async fn sweep_once(node: &Node, db: &mut Db) -> Result<(), ClusterError> {
    let me = node.s.node_id.as_str();
    let last_error = match node.last_engine_error_ms.load(Ordering::Relaxed) {
        0 => None,
        at => Some(at),
    };
    let lease_ms = u64::try_from(node.s.lease_ms()).unwrap_or(u64::MAX);
    let dead = if judge::may_judge(node.lease.now_ms(), last_error, lease_ms) {
        engine::bounded(node.s.engine_timeout, "sweep", async {
            engine::sweep(db.client().await?, me, node.epoch, node.s.lease).await
        })
        .await?
    } else {
        // Just back from an engine outage: the others may not have renewed yet.
        Vec::new()
    };
    for d in &dead {
        warn!(target: "sluice::cluster", node = %d, "cluster: node missed its lease; taking over its mail");
    }
    let stranded = engine::bounded(node.s.engine_timeout, "sweep", async {
        engine::stranded_nodes(db.client().await?).await
    })
    .await?;
    for origin in stranded {
        let mut total = 0;
        loop {
            let n = import_batch(node, db, &origin).await?;
            if n == 0 {
                break;
            }
            total += n;
        }
        if total > 0 {
            info!(target: "sluice::cluster", node = %origin, messages = total, "cluster: imported a dead node's mail");
        }
    }
    Ok(())
}

/// Moves up to `import_batch` messages of a dead node into this node's
/// spool; their engine rows are deleted (and tombstoned in `sluice_taken`,
/// for the node's return) only once they are stored and replicated here.
async fn import_batch(node: &Node, db: &mut Db, origin: &str) -> Result<usize, ClusterError> {
    let me = node.s.node_id.as_str();
    let c = db.client().await?;
    let t = c.transaction().await?;
    engine::check_epoch(&t, me, node.epoch).await?;
    // FOR SHARE: a node rejoining under this id waits for this batch, and
    // the next batch sees it up and stops.
    let state = t
        .query_opt(
            "SELECT state FROM sluice_node WHERE node_id = $1 FOR SHARE",
            &[&origin],
        )
        .await?;
    match &state {
        Some(r) if r.try_get::<_, &str>(0)? != "up" => {}
        _ => return Ok(0),
    }
    let limit = i64::try_from(node.s.import_batch).unwrap_or(500);
    let rows = t
        .query(
            "SELECT m.msg_id, m.envelope, b.body FROM sluice_message m
             JOIN sluice_body b ON b.origin_node = m.origin_node AND b.msg_id = m.msg_id
             WHERE m.origin_node = $1 ORDER BY m.msg_id LIMIT $2
             FOR UPDATE OF m SKIP LOCKED",
            &[&origin, &limit],
        )
        .await?;
    if rows.is_empty() || node.imports.is_empty() {
        return Ok(0);
    }
    let mut waiting = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let id: i64 = r.try_get(0)?;
        let (reply, done) = oneshot::channel();
        let import = Import {
            envelope: r.try_get::<_, Vec<u8>>(1)?,
            body: r.try_get::<_, Vec<u8>>(2)?,
            reply,
        };
        let core = &node.imports[i % node.imports.len()];
        if core.send(import).await.is_err() {
            return Err(ClusterError::Thread(
                "a core's import queue is closed".into(),
            ));
        }
        waiting.push((id, done));
    }
    let mut ok = Vec::with_capacity(waiting.len());
    for (id, done) in waiting {
        match tokio::time::timeout(IMPORT_WAIT, done).await {
            Ok(Ok(Ok(()))) => ok.push(id),
            Ok(Ok(Err(e))) => {
                warn!(target: "sluice::cluster", node = %origin, id = %MessageId(id as u64), error = %e, "cluster: import failed; left for a later pass")
            }
            _ => {
                warn!(target: "sluice::cluster", node = %origin, id = %MessageId(id as u64), "cluster: import not confirmed; left for a later pass")
            }
        }
    }
    engine::delete_messages(&t, origin, &ok).await?;
    t.execute(
        "INSERT INTO sluice_taken (origin_node, msg_id, taken_by)
         SELECT $1, i, $3 FROM unnest($2::int8[]) AS i ON CONFLICT DO NOTHING",
        &[&origin, &ok, &me],
    )
    .await?;
    t.commit().await?;
    let n = ok.len();
    node.stats.imported.fetch_add(n as u64, Ordering::Relaxed);
    metrics::counter!("sluice_cluster_imported_total").increment(n as u64);
    Ok(n)
}

/// `sluice cluster status` and the API: the engine's view of every node.
pub fn status_blocking(settings: &Settings) -> Result<Vec<engine::NodeStatus>, ClusterError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClusterError::Thread(e.to_string()))?;
    rt.block_on(engine::bounded(
        settings.engine_timeout * 2,
        "status",
        async {
            let c = engine::connect(settings).await?;
            engine::status(&c).await
        },
    ))
}

/// Item 3's handles, made before the thread starts (the relay holds them
/// from the join on) and their tasks' receivers.
struct Item3 {
    limits: Arc<crate::shared::SharedLimits>,
    limit_rx: async_channel::Receiver<crate::shared::Call>,
    actions: Arc<crate::actions::Actions>,
    action_rx: async_channel::Receiver<crate::actions::Publish>,
}

fn item3_handles(s: &Settings) -> Option<Item3> {
    let l = s.shared_limits.as_ref()?;
    let (limits, limit_rx) = crate::shared::new(s, l);
    let (actions, action_rx) = crate::actions::new();
    Some(Item3 {
        limits,
        limit_rx,
        actions,
        action_rx,
    })
}

/// The shared-limits and actions tasks, each with its own connection.
fn spawn_item3(s: &Settings, h: Item3) {
    let Some(l) = s.shared_limits.clone() else {
        return;
    };
    let poll = l.action_poll;
    tokio::spawn(crate::shared::run(s.clone(), l, h.limits, h.limit_rx));
    tokio::spawn(crate::actions::run(s.clone(), poll, h.actions, h.action_rx));
}

/// A stop of the relay, asked of the replication task once the spool's
/// writers have drained (every committed batch is then in its queue).
struct StopRequest {
    leave: bool,
    reply: std::sync::mpsc::Sender<Result<(), ClusterError>>,
}

impl Cluster {
    /// At the relay's stop, after the spool's writers have drained: writes
    /// the last envelope updates and removals (so the others do not deliver
    /// again what this node delivered), and, when `leaving` was set, marks
    /// the node `left` with a new epoch, so the next sweep of any other node
    /// takes over what it still holds at once instead of after its lease.
    pub fn stop(&self, wait: std::time::Duration) -> Result<(), ClusterError> {
        let (reply, answer) = std::sync::mpsc::channel();
        let leave = self.leaving.load(Ordering::Acquire);
        self.stop_tx
            .try_send(StopRequest { leave, reply })
            .map_err(|_| {
                ClusterError::Thread("stop already asked, or the thread is gone".into())
            })?;
        answer
            .recv_timeout(wait)
            .map_err(|_| ClusterError::Timeout("the stop's last sync"))?
    }
}

/// The replication task's last work (see [`Cluster::stop`]).
async fn finish(
    node: &Node,
    db: &mut Db,
    warner: &mut Warner,
    rx: &async_channel::Receiver<Committed>,
    pending: &mut PendingSync,
    unreplicated: &mut Vec<u64>,
    leave: bool,
) -> Result<(), ClusterError> {
    let mut stores = Vec::new();
    while let Ok(b) = rx.try_recv() {
        stores.extend(b.stores);
        for (id, env) in b.updates {
            pending.update(id.0, env);
        }
        for id in b.removes {
            pending.remove(id.0);
        }
    }
    if !stores.is_empty() {
        replicate_stores(node, db, warner, stores, unreplicated).await;
    }
    if !unreplicated.is_empty() {
        catch_up(node, db, warner, unreplicated).await;
    }
    if !pending.is_empty() {
        sync_pending(node, db, warner, pending).await;
    }
    // The cores have stopped; nothing may start from here on either way.
    node.lease.revoke();
    if !pending.is_empty() || !unreplicated.is_empty() {
        return Err(ClusterError::Thread(format!(
            "the engine did not take the last changes ({} pending, {} unreplicated){}",
            pending.len(),
            unreplicated.len(),
            if leave {
                "; not leaving: the node stays up until its lease runs out"
            } else {
                ""
            }
        )));
    }
    if leave {
        node.left.store(true, Ordering::Release);
        let me = node.s.node_id.as_str();
        let r = engine::bounded(node.s.engine_timeout, "leave", async {
            engine::leave(db.client().await?, me, node.epoch).await
        })
        .await;
        if let Err(e) = r {
            node.left.store(false, Ordering::Release);
            return Err(e);
        }
        info!(target: "sluice::cluster", node = %me, epoch = node.epoch, "cluster: left; the other nodes take over this node's mail");
    }
    Ok(())
}
