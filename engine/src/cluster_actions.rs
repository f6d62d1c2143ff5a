//! Cluster mode with `shared_limits`: suspensions and shaping actions reach
//! every node (docs/cluster.md "(b) Suspensions and shaping actions").
//!
//! * Out: an operator suspension or resume (API, CLI), a shaping action a
//!   rule fired, and a cancel are published to the sluice-cluster thread
//!   (never blocking), which writes them to `sluice_action`.
//! * In: the rows of other nodes come back from that thread (LISTEN/NOTIFY,
//!   poll backstop) into a bounded queue, and one thread applies them
//!   through the same path as this node's own: the shaping list (stored in
//!   its table) and `Command::Suspend` / `Resume` to every core.
//!
//! Nothing is installed when cluster mode or shared limits are off: each
//! publish is then one `OnceLock` test.

use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use futures_channel::mpsc::UnboundedSender;
use sluice_cluster::actions::{ActionEvent, Actions};

use crate::delivery::admin::Command;
use crate::delivery::shaping::{self, ActiveAction};

/// Rows of other nodes waiting to be applied.
const APPLY_QUEUE: usize = 1_024;
/// A resume (and a cancel) stays readable this long: longer than any
/// suspension (`MAX_SUSPEND`, 30 days), so a node joining later still sees
/// what it ends.
const RESUME_KEPT_MS: u64 = 31 * 24 * 3600 * 1000;

static ACTIONS: OnceLock<Arc<Actions>> = OnceLock::new();

/// Starts the thread that applies other nodes' rows and hooks it to the
/// cluster thread. `node` prefixes this node's shaping action ids.
pub fn install(
    actions: Arc<Actions>,
    node: &str,
    cores: Vec<UnboundedSender<Command>>,
) -> std::io::Result<()> {
    if let Some(s) = shaping::installed() {
        s.set_id_prefix(node);
    }
    let (tx, rx) = mpsc::sync_channel::<ActionEvent>(APPLY_QUEUE);
    std::thread::Builder::new()
        .name("cluster-actions".into())
        .spawn(move || {
            while let Ok(ev) = rx.recv() {
                apply(&ev, &cores);
            }
        })?;
    actions.set_sink(Box::new(move |ev| tx.try_send(ev.clone()).is_ok()));
    let _ = ACTIONS.set(actions);
    Ok(())
}

/// An operator suspended `destination` until `until_ms` on this node.
pub fn suspended(destination: &str, until_ms: u64) {
    if let Some(a) = ACTIONS.get() {
        a.publish("suspend", destination, None, until_ms);
    }
}

/// An operator resumed `destination` on this node.
pub fn resumed(destination: &str) {
    if let Some(a) = ACTIONS.get() {
        a.publish(
            "resume",
            destination,
            None,
            crate::time::now_ms() + RESUME_KEPT_MS,
        );
    }
}

/// A shaping rule fired on this node.
pub fn shaping_taken(action: &ActiveAction) {
    let Some(a) = ACTIONS.get() else { return };
    match serde_json::to_string(action) {
        Ok(json) => {
            a.publish("add", &action.destination, Some(json), action.until_unix_ms);
        }
        Err(e) => tracing::warn!(id = %action.id, error = %e, "cluster: shaping action not shared"),
    }
}

/// An operator cancelled a shaping action on this node.
pub fn cancelled(action: &ActiveAction) {
    if let Some(a) = ACTIONS.get() {
        a.publish("cancel", &action.id, None, action.until_unix_ms);
    }
}

fn to_cores(cores: &[UnboundedSender<Command>], make: impl Fn() -> Command) {
    for tx in cores {
        let _ = tx.unbounded_send(make());
    }
}

fn suspend_on_cores(cores: &[UnboundedSender<Command>], destination: &str, until_ms: u64) {
    to_cores(cores, || Command::Suspend {
        destination: destination.to_string(),
        until_ms,
        reply: mpsc::channel().0,
    });
}

fn resume_on_cores(cores: &[UnboundedSender<Command>], destination: &str) {
    to_cores(cores, || Command::Resume {
        destination: destination.to_string(),
        reply: mpsc::channel().0,
    });
}

/// Applies another node's row as this node's own would be.
fn apply(ev: &ActionEvent, cores: &[UnboundedSender<Command>]) {
    let from = ev.origin_node.as_str();
    let store = shaping::installed();
    match ev.scope.as_str() {
        "suspend" => {
            let destination = crate::delivery::admin::normalize_destination(&ev.key);
            tracing::info!(target: "sluice::cluster", destination = %destination, until_ms = ev.until_unix_ms, from, "cluster: destination suspended by another node");
            suspend_on_cores(cores, &destination, ev.until_unix_ms);
            if let Some(s) = store {
                if let Err(e) = s.operator_suspend(&destination, ev.until_unix_ms) {
                    tracing::warn!(target: "sluice::cluster", destination = %destination, error = %e, "cluster: suspension not stored (ends at a restart)");
                }
            }
        }
        "resume" => {
            let destination = crate::delivery::admin::normalize_destination(&ev.key);
            tracing::info!(target: "sluice::cluster", destination = %destination, from, "cluster: destination resumed by another node");
            if let Some(s) = store {
                s.resume_destination(&destination);
            }
            resume_on_cores(cores, &destination);
        }
        "add" => {
            let Some(action) = ev
                .action
                .as_deref()
                .and_then(|j| serde_json::from_str::<ActiveAction>(j).ok())
            else {
                tracing::warn!(target: "sluice::cluster", id = ev.id, from, "cluster: unreadable shaping action ignored");
                return;
            };
            let Some(s) = store else { return };
            match s.adopt(&action) {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!(target: "sluice::cluster", id = %action.id, rule = %action.rule, action = %action.action, destination = %action.destination, from, "cluster: shaping action taken by another node");
                    if action.action == "suspend" {
                        suspend_on_cores(cores, &action.destination, action.until_unix_ms);
                    }
                }
                Err(e) => {
                    tracing::warn!(target: "sluice::cluster", id = %action.id, error = %e, "cluster: shaping action not stored (ends at a restart)")
                }
            }
        }
        "cancel" => {
            let Some(s) = store else { return };
            if let Some(action) = s.cancel(&ev.key) {
                tracing::info!(target: "sluice::cluster", id = %action.id, from, "cluster: shaping action cancelled by another node");
                if action.action == "suspend" {
                    resume_on_cores(cores, &action.destination);
                }
            }
        }
        other => {
            tracing::warn!(target: "sluice::cluster", id = ev.id, scope = other, from, "cluster: unknown action row ignored")
        }
    }
}
