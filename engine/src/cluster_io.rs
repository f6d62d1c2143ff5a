//! Cluster mode's parts on the cores and in the API (the engine work itself
//! runs on the sluice-cluster thread, `sluice_cluster`).
//!
//! * [`spawn_importer`]: on each core, takes a dead node's messages from the
//!   cluster thread into this core's queue (spool, quota, delivery): the
//!   third way into the queue besides SMTP and notices.
//! * [`status_json`]: `GET /api/v1/cluster` and `sluice cluster status`.

use std::rc::Rc;
use std::sync::atomic::Ordering;

use serde_json::{json, Value};
use sluice_cluster::{Cluster, Import, NodeStatus};
use sluice_spool::{Envelope, IdGenerator};

use crate::queue::CoreQueue;

pub fn spawn_importer(
    queue: Rc<CoreQueue>,
    ids: Rc<IdGenerator>,
    rx: async_channel::Receiver<Import>,
) {
    glommio::spawn_local(async move {
        while let Ok(import) = rx.recv().await {
            let result = import_one(&queue, &ids, import.envelope, import.body).await;
            let _ = import.reply.send(result);
        }
    })
    .detach();
}

async fn import_one(
    queue: &CoreQueue,
    ids: &IdGenerator,
    envelope: Vec<u8>,
    body: Vec<u8>,
) -> Result<(), String> {
    let id = ids.next(crate::time::now_ms());
    // The envelope keeps its recipients' state: those delivered before the
    // node died are not sent again.
    let envelope = Envelope::decode(id, &envelope).map_err(|e| e.to_string())?;
    queue
        .store(id, &envelope, body)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(target: "sluice::cluster", id = %id, sender = %envelope.sender, "cluster: imported");
    queue.admitted(id, envelope);
    Ok(())
}

/// The engine's view of the nodes, and this node's own counters.
pub fn status_json(nodes: &[NodeStatus], me: Option<&Cluster>) -> Value {
    let nodes: Vec<Value> = nodes
        .iter()
        .map(|n| {
            json!({
                "node_id": n.node_id,
                "epoch": n.epoch,
                "state": n.state,
                "lease_left_ms": n.lease_left_ms,
                "taken_by": n.taken_by,
                "version": n.version,
                "queued": n.queued,
            })
        })
        .collect();
    let local = me.map(|c| {
        let s = &c.stats;
        json!({
            "node_id": c.settings.node_id,
            "epoch": s.epoch.load(Ordering::Relaxed),
            "engine_up": s.engine_up.load(Ordering::Relaxed),
            "lease_left_ms": c.lease.remaining_ms(c.lease.now_ms()),
            "unreplicated": s.unreplicated.load(Ordering::Relaxed),
            "replicated": s.replicated.load(Ordering::Relaxed),
            "imported": s.imported.load(Ordering::Relaxed),
            "dropped": s.dropped.load(Ordering::Relaxed),
        })
    });
    json!({ "nodes": nodes, "local": local })
}

/// `sluice cluster leave`: polls the engine until this node's row is `left`
/// (its relay has stopped and synced); Err when `wait` passes first.
pub fn wait_left(
    settings: &sluice_cluster::Settings,
    wait: std::time::Duration,
) -> anyhow::Result<NodeStatus> {
    let until = std::time::Instant::now() + wait;
    loop {
        let nodes = sluice_cluster::status_blocking(settings)?;
        let me = nodes.into_iter().find(|n| n.node_id == settings.node_id);
        match me {
            Some(n) if n.state == "left" => return Ok(n),
            Some(n) if std::time::Instant::now() >= until => anyhow::bail!(
                "{} is still {} after {}s (see the relay's log)",
                n.node_id,
                n.state,
                wait.as_secs()
            ),
            None => anyhow::bail!("{} is not in the cluster", settings.node_id),
            Some(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
        }
    }
}

/// A short table for the CLI.
pub fn status_text(nodes: &[NodeStatus]) -> String {
    let mut out = format!(
        "{:<20} {:>6} {:<5} {:>12} {:>9} {}\n",
        "NODE", "EPOCH", "STATE", "LEASE_LEFT", "QUEUED", "TAKEN_BY"
    );
    for n in nodes {
        out.push_str(&format!(
            "{:<20} {:>6} {:<5} {:>11}s {:>9} {}\n",
            n.node_id,
            n.epoch,
            n.state,
            n.lease_left_ms / 1000,
            n.queued,
            n.taken_by.as_deref().unwrap_or("-")
        ));
    }
    out
}
