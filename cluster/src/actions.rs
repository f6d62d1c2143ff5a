//! Suspensions and shaping actions across the cluster (docs/cluster.md
//! "(b) Suspensions and shaping actions"), on the sluice-cluster thread.
//!
//! * Written: an operator suspension or resume, a fired shaping action or a
//!   cancel becomes a row of `sluice_action` (logged: it survives an engine
//!   restart) and a `NOTIFY sluice_action`. The cores and the API only
//!   `try_send` it here ([`Actions::publish`]).
//! * Read: `LISTEN sluice_action` on a connection of its own, and a poll of
//!   `id > last` every `action_poll` as the backstop; the rows of other
//!   nodes still in force go, in id order, to the sink the relay installed
//!   (which applies them through its own suspension and shaping path).
//! * Expiry is each node's own (every row carries its `until`); rows past
//!   it by an hour are deleted.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tracing::{info, warn};

use crate::engine::{self, Db};
use crate::limits::OncePer;
use crate::{ClusterError, Settings};

/// Rows waiting to be written; beyond it a publish is dropped (logged).
const PUBLISH_QUEUE: usize = 1_024;
/// Rows read per query.
const READ_BATCH: i64 = 500;
/// Rows past their `until` are deleted this long after (at most once a minute).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// One row of `sluice_action` as the relay applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionEvent {
    pub id: i64,
    /// "add" (`action` holds the relay's JSON of it), "cancel" (`key` is
    /// the action's id) or "resume" (`key` is the destination).
    pub scope: String,
    pub key: String,
    pub action: Option<String>,
    pub until_unix_ms: u64,
    pub origin_node: String,
}

/// Applies a row from another node; false: not now (asked again later).
pub type ActionSink = Box<dyn Fn(&ActionEvent) -> bool + Send + Sync>;

pub(crate) struct Publish {
    scope: &'static str,
    key: String,
    action: Option<String>,
    until_unix_ms: u64,
}

/// The relay's side: publish, and the sink for other nodes' rows.
pub struct Actions {
    tx: async_channel::Sender<Publish>,
    sink: OnceLock<ActionSink>,
}

impl Actions {
    /// Queues a row for the engine (never blocks). False: the queue is full
    /// or the thread gone; the action holds on this node only (logged).
    pub fn publish(
        &self,
        scope: &'static str,
        key: &str,
        action: Option<String>,
        until_unix_ms: u64,
    ) -> bool {
        let ok = self
            .tx
            .try_send(Publish {
                scope,
                key: key.to_string(),
                action,
                until_unix_ms,
            })
            .is_ok();
        if !ok {
            warn!(target: "sluice::cluster", scope, key, "cluster: action not shared (queue full); it holds on this node only");
        }
        ok
    }

    /// Installs what applies other nodes' rows (once; rows read before it
    /// is installed wait).
    pub fn set_sink(&self, sink: ActionSink) {
        let _ = self.sink.set(sink);
    }
}

pub(crate) fn new() -> (Arc<Actions>, async_channel::Receiver<Publish>) {
    let (tx, rx) = async_channel::bounded(PUBLISH_QUEUE);
    (
        Arc::new(Actions {
            tx,
            sink: OnceLock::new(),
        }),
        rx,
    )
}

struct Task {
    s: Settings,
    poll: Duration,
    h: Arc<Actions>,
    db: Db,
    listen: Option<Client>,
    notify_tx: tokio::sync::mpsc::Sender<()>,
    /// The last row applied (or skipped as this node's own).
    last: i64,
    pruned: Option<Instant>,
    warn: OncePer,
    origin: Instant,
}

pub(crate) async fn run(
    s: Settings,
    poll: Duration,
    h: Arc<Actions>,
    rx: async_channel::Receiver<Publish>,
) {
    let (notify_tx, mut notify_rx) = tokio::sync::mpsc::channel(1);
    let mut t = Task {
        db: Db::new(&s),
        s,
        poll,
        h,
        listen: None,
        notify_tx,
        last: 0,
        pruned: None,
        warn: OncePer::default(),
        origin: Instant::now(),
    };
    let mut next_poll = Instant::now();
    loop {
        let wait = next_poll.saturating_duration_since(Instant::now());
        tokio::select! {
            p = rx.recv() => match p {
                Ok(p) => t.write(p).await,
                Err(_) => return,
            },
            _ = notify_rx.recv() => t.read().await,
            _ = tokio::time::sleep(wait) => {
                t.ensure_listening().await;
                t.read().await;
                t.prune().await;
                next_poll = Instant::now() + t.poll;
            }
        }
    }
}

impl Task {
    fn failed(&mut self, what: &'static str, e: &ClusterError) {
        self.db.broken();
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        if self.warn.due(now, Duration::from_secs(60)) {
            warn!(target: "sluice::cluster", task = what, error = %e, "cluster engine unreachable: suspensions and shaping actions are not shared meanwhile");
        }
    }

    /// (Re)opens the LISTEN connection; the poll that follows catches up
    /// on what was missed while it was down.
    async fn ensure_listening(&mut self) {
        if self.listen.as_ref().is_some_and(|c| !c.is_closed()) {
            return;
        }
        let r = engine::bounded(self.s.engine_timeout, "listen", async {
            let c = engine::connect_notified(&self.s, Some(self.notify_tx.clone())).await?;
            c.batch_execute("LISTEN sluice_action").await?;
            Ok(c)
        })
        .await;
        match r {
            Ok(c) => self.listen = Some(c),
            Err(e) => self.failed("listen", &e),
        }
    }

    async fn write(&mut self, p: Publish) {
        let me = self.s.node_id.clone();
        let until = i64::try_from(p.until_unix_ms).unwrap_or(i64::MAX);
        let r = engine::bounded(self.s.engine_timeout, "action", async {
            let c = self.db.client().await?;
            let row = c
                .query_one(
                    "WITH i AS (
                       INSERT INTO sluice_action (scope, key, action, until, origin_node)
                       VALUES ($1, $2, $3::text::jsonb, to_timestamp($4::int8 / 1000.0), $5)
                       RETURNING id)
                     SELECT id, pg_notify('sluice_action', id::text) FROM i",
                    &[&p.scope, &p.key, &p.action, &until, &me],
                )
                .await?;
            Ok(row.try_get::<_, i64>(0)?)
        })
        .await;
        match r {
            Ok(id) => {
                metrics::counter!("sluice_cluster_actions_total", "direction" => "shared")
                    .increment(1);
                info!(target: "sluice::cluster", id, scope = p.scope, key = %p.key, "cluster: action shared");
            }
            Err(e) => {
                metrics::counter!("sluice_cluster_actions_total", "direction" => "lost")
                    .increment(1);
                warn!(target: "sluice::cluster", scope = p.scope, key = %p.key, error = %e, "cluster: action not shared; it holds on this node only");
                self.failed("action", &e);
            }
        }
    }

    /// Applies the other nodes' rows after `last`, in order.
    async fn read(&mut self) {
        let Some(sink) = self.h.sink.get() else {
            return;
        };
        loop {
            let me = self.s.node_id.clone();
            let last = self.last;
            let r = engine::bounded(self.s.engine_timeout, "action poll", async {
                let c = self.db.client().await?;
                let rows = c
                    .query(
                        "SELECT id, scope, key, action::text, origin_node,
                                (extract(epoch FROM until) * 1000)::int8
                           FROM sluice_action
                          WHERE id > $1 AND until > now()
                          ORDER BY id LIMIT $2",
                        &[&last, &READ_BATCH],
                    )
                    .await?;
                let mut out = Vec::with_capacity(rows.len());
                for r in rows {
                    out.push(ActionEvent {
                        id: r.try_get(0)?,
                        scope: r.try_get(1)?,
                        key: r.try_get(2)?,
                        action: r.try_get(3)?,
                        origin_node: r.try_get(4)?,
                        until_unix_ms: u64::try_from(r.try_get::<_, i64>(5)?).unwrap_or(0),
                    });
                }
                Ok(out)
            })
            .await;
            let events = match r {
                Ok(ev) => ev,
                Err(e) => return self.failed("action poll", &e),
            };
            let full = events.len() as i64 >= READ_BATCH;
            for ev in events {
                if ev.origin_node != me {
                    if !sink(&ev) {
                        // The relay cannot take it now: from here next time.
                        return;
                    }
                    metrics::counter!("sluice_cluster_actions_total", "direction" => "applied")
                        .increment(1);
                }
                self.last = ev.id;
            }
            if !full {
                return;
            }
        }
    }

    async fn prune(&mut self) {
        if self.pruned.is_some_and(|p| p.elapsed() < PRUNE_EVERY) {
            return;
        }
        self.pruned = Some(Instant::now());
        let r = engine::bounded(self.s.engine_timeout, "action prune", async {
            self.db
                .client()
                .await?
                .execute(
                    "DELETE FROM sluice_action WHERE until < now() - interval '1 hour'",
                    &[],
                )
                .await?;
            Ok(())
        })
        .await;
        if let Err(e) = r {
            self.failed("action prune", &e);
        }
    }
}
