//! `/api/v1/shaping/actions`: the shaping actions in force (rules that fired,
//! and operator suspensions), and cancelling one. Runs on the API thread: a
//! cancel removes the stored action here (never on a core) and lifts a
//! suspension on every core.

use serde_json::{json, Value};

use super::calls::{broadcast, cores, err, rfc3339, ApiContext, ApiResult};
use crate::delivery::admin::Command;
use crate::delivery::now_ms;
use crate::delivery::shaping::{installed, ActiveAction, Shaping};

fn shaping() -> Result<&'static Shaping, super::calls::ApiError> {
    installed()
        .map(|s| s.as_ref())
        .ok_or_else(|| err(409, "shaping needs delivery (delivery.enabled = false)"))
}

fn action_json(a: &ActiveAction) -> Value {
    json!({
        "id": a.id,
        "rule": a.rule,
        "action": a.action,
        "value": a.value,
        "destination": a.destination,
        "site": a.site,
        "reply": a.reply,
        "created": rfc3339(a.created_unix_ms),
        "until": rfc3339(a.until_unix_ms),
        "until_unix_ms": a.until_unix_ms,
    })
}

/// GET: every action in force, oldest first.
pub(super) fn list() -> ApiResult {
    let mut actions = shaping()?.list(now_ms());
    actions.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
    Ok(json!({ "actions": actions.iter().map(action_json).collect::<Vec<_>>() }))
}

/// POST: ends the action `id` now; a suspension's waiting mail is due at once.
pub(super) fn cancel(api: &ApiContext, id: &str) -> ApiResult {
    if id.is_empty() || id.len() > 300 {
        return Err(err(400, "not an action id"));
    }
    let Some(action) = shaping()?.cancel(id) else {
        return Err(err(404, format!("no shaping action {id} in force")));
    };
    crate::cluster_actions::cancelled(&action);
    if action.action == "suspend" {
        let senders = cores(api)?;
        broadcast(senders, |reply| Command::Resume {
            destination: action.destination.clone(),
            reply,
        })?;
    }
    Ok(json!({ "cancelled": true, "action": action_json(&action) }))
}

/// GET: the sites whose concurrency slow start or a `connections` action
/// sets, from every core (a site lives on one).
pub(super) fn sites(api: &ApiContext) -> ApiResult {
    let senders = cores(api)?;
    let per_core = broadcast(senders, |reply| Command::ShapingSites { reply })?;
    let sites: Vec<Value> = per_core
        .into_iter()
        .flatten()
        .map(|s| {
            json!({
                "site": s.site,
                "destination": s.destination,
                "core": s.core,
                "limit": s.limit,
                "max": s.max,
                "active": s.active,
                "queued": s.queued,
                "group": s.group,
                "group_active": s.group_active,
            })
        })
        .collect();
    Ok(json!({ "sites": sites }))
}
