//! Connections and statements against the cluster engine (PostgreSQL). Runs
//! on the sluice-cluster thread's tokio runtime only.

use std::future::Future;
use std::time::Duration;

use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::{Client, GenericClient, NoTls};

use crate::fence;
use crate::{ClusterError, Settings};

/// One connection, made again after it broke (the DSN list is tried in
/// order, for a read-write server: the primary, wherever it now is).
pub(crate) struct Db {
    settings: Settings,
    client: Option<Client>,
}

impl Db {
    pub fn new(settings: &Settings) -> Db {
        Db {
            settings: settings.clone(),
            client: None,
        }
    }

    pub async fn client(&mut self) -> Result<&mut Client, ClusterError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        let client = match self.client.take() {
            Some(c) => c,
            None => connect(&self.settings).await?,
        };
        Ok(self.client.insert(client))
    }

    /// After an error: the next use connects again.
    pub fn broken(&mut self) {
        self.client = None;
    }
}

pub(crate) async fn connect(s: &Settings) -> Result<Client, ClusterError> {
    connect_notified(s, None).await
}

/// Like [`connect`]; each NOTIFY the connection receives is signalled on
/// `notify` (a full channel drops it: one wake-up is as good as several).
pub(crate) async fn connect_notified(
    s: &Settings,
    notify: Option<tokio::sync::mpsc::Sender<()>>,
) -> Result<Client, ClusterError> {
    let mut last = String::from("cluster.engine is empty");
    for (i, dsn) in s.engine.iter().enumerate() {
        let mut cfg: tokio_postgres::Config = match dsn.parse() {
            Ok(c) => c,
            Err(e) => {
                // The DSN may hold a password: name it by position only.
                last = format!("cluster.engine[{i}]: {e}");
                continue;
            }
        };
        cfg.connect_timeout(s.engine_timeout)
            .target_session_attrs(TargetSessionAttrs::ReadWrite)
            .application_name("sluice");
        match tokio::time::timeout(s.engine_timeout, cfg.connect(NoTls)).await {
            Ok(Ok((client, mut conn))) => {
                let notify = notify.clone();
                tokio::spawn(async move {
                    loop {
                        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                            Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                                if let Some(n) = &notify {
                                    let _ = n.try_send(());
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tracing::debug!(target: "sluice::cluster", error = %e, "engine connection closed");
                                return;
                            }
                            None => return,
                        }
                    }
                });
                return Ok(client);
            }
            Ok(Err(e)) => last = format!("cluster.engine[{i}]: {e}"),
            Err(_) => last = format!("cluster.engine[{i}]: connect timed out"),
        }
    }
    Err(ClusterError::NoEngine(last))
}

/// Bounds one engine step in time.
pub(crate) async fn bounded<T>(
    limit: Duration,
    what: &'static str,
    fut: impl Future<Output = Result<T, ClusterError>>,
) -> Result<T, ClusterError> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or(Err(ClusterError::Timeout(what)))
}

/// The epoch check every write transaction starts with. A plain read (no
/// row lock): a heartbeat is then never kept waiting by replication, and a
/// batch that commits just after a takeover bumped the epoch is still
/// imported, by the importers' next pass over the dead node's rows.
pub(crate) async fn check_epoch(
    t: &impl GenericClient,
    me: &str,
    epoch: i64,
) -> Result<(), ClusterError> {
    let row = t
        .query_opt(
            "SELECT epoch, state FROM sluice_node WHERE node_id = $1",
            &[&me],
        )
        .await?;
    let found = match &row {
        Some(r) => Some((r.try_get::<_, i64>(0)?, r.try_get::<_, &str>(1)?)),
        None => None,
    };
    fence::check_epoch(epoch, found).map_err(ClusterError::Fenced)
}

/// Creates the tables on first use, and joins: a new epoch for this node
/// (which fences any other process still running under its id).
pub(crate) async fn join(c: &mut Client, s: &Settings) -> Result<i64, ClusterError> {
    let t = c.transaction().await?;
    t.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&crate::schema::SCHEMA_LOCK],
    )
    .await?;
    let exists: bool = t
        .query_one("SELECT to_regclass('sluice_taken') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        t.batch_execute(crate::schema::CREATE).await?;
    }
    let limits: bool = t
        .query_one("SELECT to_regclass('sluice_action') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !limits {
        t.batch_execute(crate::schema::CREATE_LIMITS).await?;
    }
    let row = t
        .query_one(
            "INSERT INTO sluice_node (node_id, epoch, state, lease_until, version, started_at)
             VALUES ($1, 1, 'up', now() + make_interval(secs => $2), $3, now())
             ON CONFLICT (node_id) DO UPDATE SET epoch = sluice_node.epoch + 1, state = 'up',
               lease_until = EXCLUDED.lease_until, version = EXCLUDED.version,
               started_at = now(), taken_by = NULL
             RETURNING epoch",
            &[
                &s.node_id,
                &s.lease.as_secs_f64(),
                &env!("CARGO_PKG_VERSION"),
            ],
        )
        .await?;
    let epoch: i64 = row.try_get(0)?;
    t.commit().await?;
    Ok(epoch)
}

/// Extends the lease; Err(Fenced) when the row is no longer this process's.
pub(crate) async fn heartbeat(c: &Client, s: &Settings, epoch: i64) -> Result<(), ClusterError> {
    let n = c
        .execute(
            "UPDATE sluice_node SET lease_until = now() + make_interval(secs => $3)
             WHERE node_id = $1 AND epoch = $2 AND state = 'up'",
            &[&s.node_id, &epoch, &s.lease.as_secs_f64()],
        )
        .await?;
    fence::heartbeat_outcome(n).map_err(ClusterError::Fenced)
}

/// `sluice cluster leave`: the node's row goes to `left` with a new epoch
/// (which fences any write of this process still to come); its messages
/// are then taken over by the next sweep of any other node.
pub(crate) async fn leave(c: &Client, me: &str, epoch: i64) -> Result<(), ClusterError> {
    let n = c
        .execute(
            "UPDATE sluice_node SET state = 'left', epoch = epoch + 1, lease_until = now(), taken_by = NULL
             WHERE node_id = $1 AND epoch = $2 AND state = 'up'",
            &[&me, &epoch],
        )
        .await?;
    if n == 1 {
        Ok(())
    } else {
        Err(ClusterError::Fenced(fence::Fenced(
            "leave matched no row (epoch bumped or state changed)".into(),
        )))
    }
}

/// One message's rows: id, stored envelope, body (prefix included).
pub(crate) struct Row<'a> {
    pub id: i64,
    pub envelope: &'a [u8],
    pub body: &'a [u8],
}

/// Copies messages of this node into the replica log, in one transaction
/// that commits only if this process still holds the node's epoch.
pub(crate) async fn write_messages(
    c: &mut Client,
    me: &str,
    epoch: i64,
    rows: &[Row<'_>],
) -> Result<(), ClusterError> {
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let envelopes: Vec<&[u8]> = rows.iter().map(|r| r.envelope).collect();
    let bodies: Vec<&[u8]> = rows.iter().map(|r| r.body).collect();
    let t = c.transaction().await?;
    check_epoch(&t, me, epoch).await?;
    t.execute(
        "INSERT INTO sluice_message (origin_node, msg_id, envelope)
         SELECT $1, i, e FROM unnest($2::int8[], $3::bytea[]) AS r(i, e)
         ON CONFLICT (origin_node, msg_id) DO UPDATE SET envelope = EXCLUDED.envelope, updated_at = now()",
        &[&me, &ids, &envelopes],
    )
    .await?;
    t.execute(
        "INSERT INTO sluice_body (origin_node, msg_id, body)
         SELECT $1, i, b FROM unnest($2::int8[], $3::bytea[]) AS r(i, b)
         ON CONFLICT (origin_node, msg_id) DO UPDATE SET body = EXCLUDED.body",
        &[&me, &ids, &bodies],
    )
    .await?;
    t.commit().await?;
    Ok(())
}

/// Envelope updates and removals of this node's messages.
pub(crate) async fn sync_changes(
    c: &mut Client,
    me: &str,
    epoch: i64,
    updates: &[(i64, &[u8])],
    removes: &[i64],
) -> Result<(), ClusterError> {
    let t = c.transaction().await?;
    check_epoch(&t, me, epoch).await?;
    if !updates.is_empty() {
        let ids: Vec<i64> = updates.iter().map(|u| u.0).collect();
        let envs: Vec<&[u8]> = updates.iter().map(|u| u.1).collect();
        t.execute(
            "UPDATE sluice_message m SET envelope = u.e, updated_at = now()
             FROM unnest($2::int8[], $3::bytea[]) AS u(i, e)
             WHERE m.origin_node = $1 AND m.msg_id = u.i",
            &[&me, &ids, &envs],
        )
        .await?;
    }
    if !removes.is_empty() {
        delete_messages(&t, me, removes).await?;
    }
    t.commit().await?;
    Ok(())
}

pub(crate) async fn delete_messages(
    t: &impl GenericClient,
    origin: &str,
    ids: &[i64],
) -> Result<(), ClusterError> {
    t.execute(
        "DELETE FROM sluice_body WHERE origin_node = $1 AND msg_id = ANY($2)",
        &[&origin, &ids],
    )
    .await?;
    t.execute(
        "DELETE FROM sluice_message WHERE origin_node = $1 AND msg_id = ANY($2)",
        &[&origin, &ids],
    )
    .await?;
    Ok(())
}

/// Ids of `origin` in one of the id tables (`sluice_message`, `sluice_taken`).
pub(crate) async fn ids_of(
    c: &Client,
    table: &'static str,
    origin: &str,
) -> Result<Vec<i64>, ClusterError> {
    let sql = format!("SELECT msg_id FROM {table} WHERE origin_node = $1");
    let rows = c.query(&sql, &[&origin]).await?;
    rows.iter()
        .map(|r| r.try_get::<_, i64>(0).map_err(ClusterError::from))
        .collect()
}

/// Declares nodes past their lease dead, bumping their epoch (the fence).
/// Returns the nodes taken over. A server started less than a lease ago
/// judges nobody: no node could renew while it was down (see `judge`).
pub(crate) async fn sweep(
    c: &mut Client,
    me: &str,
    epoch: i64,
    lease: Duration,
) -> Result<Vec<String>, ClusterError> {
    let t = c.transaction().await?;
    check_epoch(&t, me, epoch).await?;
    let rows = t
        .query(
            "SELECT node_id FROM sluice_node
             WHERE state = 'up' AND node_id <> $1 AND lease_until < now()
               AND pg_postmaster_start_time() < now() - make_interval(secs => $2)
             FOR UPDATE SKIP LOCKED",
            &[&me, &lease.as_secs_f64()],
        )
        .await?;
    let mut dead = Vec::with_capacity(rows.len());
    for r in &rows {
        let node: String = r.try_get(0)?;
        t.execute(
            "UPDATE sluice_node SET state = 'dead', epoch = epoch + 1, taken_by = $2 WHERE node_id = $1",
            &[&node, &me],
        )
        .await?;
        dead.push(node);
    }
    t.commit().await?;
    Ok(dead)
}

/// Nodes not up that still have messages in the replica log.
pub(crate) async fn stranded_nodes(c: &Client) -> Result<Vec<String>, ClusterError> {
    let rows = c
        .query(
            "SELECT n.node_id FROM sluice_node n WHERE n.state <> 'up'
             AND EXISTS (SELECT 1 FROM sluice_message m WHERE m.origin_node = n.node_id)",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| r.try_get::<_, String>(0).map_err(ClusterError::from))
        .collect()
}

/// One node's view in `sluice cluster status` and `GET /api/v1/cluster`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub node_id: String,
    pub epoch: i64,
    pub state: String,
    /// Engine clock: ms until the lease runs out (negative: ran out that long ago).
    pub lease_left_ms: i64,
    pub taken_by: Option<String>,
    pub version: Option<String>,
    /// Messages in the replica log this node owns.
    pub queued: i64,
}

pub(crate) async fn status(c: &Client) -> Result<Vec<NodeStatus>, ClusterError> {
    let rows = c
        .query(
            "SELECT n.node_id, n.epoch, n.state,
                    (extract(epoch FROM (n.lease_until - now())) * 1000)::int8,
                    n.taken_by, n.version, coalesce(q.n, 0)::int8
             FROM sluice_node n
             LEFT JOIN (SELECT origin_node, count(*) AS n FROM sluice_message GROUP BY 1) q
               ON q.origin_node = n.node_id
             ORDER BY n.node_id",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(NodeStatus {
                node_id: r.try_get(0)?,
                epoch: r.try_get(1)?,
                state: r.try_get(2)?,
                lease_left_ms: r.try_get(3)?,
                taken_by: r.try_get(4)?,
                version: r.try_get(5)?,
                queued: r.try_get(6)?,
            })
        })
        .collect()
}
