//! The management API under `/api/v1`: JSON over HTTP, bearer-token auth (checked
//! by the caller in `admin`). `docs/openapi.yaml` describes it; a test checks
//! that it lists exactly the routes of [`ROUTES`].
//!
//! Reads (summary, list, show: `queue_view`) walk the spool from this thread:
//! LMDB readers are safe on any thread and never block the cores. Changes go to
//! the core that owns the message's shard (`delivery::admin`), so its schedule
//! in memory and its envelope on disk agree; destination suspensions go to
//! every core.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_channel::mpsc::UnboundedSender;
use serde_json::json;
use sluice_spool::MessageId;

pub use super::calls::ApiContext;
use super::calls::{
    broadcast, cores, err, parse_duration, parse_id, rfc3339, spool, spool_err, suspended_list,
    ApiError, ApiResult, REPLY_TIMEOUT,
};
use super::queue_view::{list, show, summary, Filter};
use super::{AdminState, Request, Response};
use crate::delivery::admin::{normalize_destination, owner_core, Command, QueueAction};
use crate::delivery::now_ms;

/// Most messages one filtered action touches; the answer says when more matched.
const MAX_ACTION_IDS: usize = 10_000;
/// Longest suspension.
const MAX_SUSPEND: Duration = Duration::from_secs(30 * 24 * 3600);

/// Messages acted on, and those skipped with the reason.
type Outcomes = (Vec<MessageId>, Vec<(MessageId, String)>);

/// Everything the API serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Summary,
    List,
    Show,
    RetryOne,
    HoldOne,
    ReleaseOne,
    CancelOne,
    RetryMany,
    HoldMany,
    ReleaseMany,
    CancelMany,
    Destinations,
    Suspend,
    Resume,
    Reload,
    TlsRptSend,
    SuppressionList,
    SuppressionAdd,
    SuppressionRemove,
    BanList,
    BanAdd,
    BanRemove,
    ShapingList,
    ShapingCancel,
    ShapingSites,
    Cluster,
    ClusterLeave,
}

pub struct Route {
    pub method: &'static str,
    /// Full path; `{name}` matches one path segment.
    pub path: &'static str,
    pub op: Op,
}

/// The route table: the router and the OpenAPI test both read it.
pub const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: "/api/v1/queue/summary",
        op: Op::Summary,
    },
    Route {
        method: "GET",
        path: "/api/v1/queue/messages",
        op: Op::List,
    },
    Route {
        method: "GET",
        path: "/api/v1/queue/messages/{id}",
        op: Op::Show,
    },
    Route {
        method: "POST",
        path: "/api/v1/queue/messages/{id}/retry",
        op: Op::RetryOne,
    },
    Route {
        method: "POST",
        path: "/api/v1/queue/messages/{id}/hold",
        op: Op::HoldOne,
    },
    Route {
        method: "POST",
        path: "/api/v1/queue/messages/{id}/release",
        op: Op::ReleaseOne,
    },
    Route {
        method: "POST",
        path: "/api/v1/queue/messages/{id}/cancel",
        op: Op::CancelOne,
    },
    Route {
        method: "POST",
        path: "/api/v1/queue/retry",
        op: Op::RetryMany,
    },
    Route {
        method: "POST",
        path: "/api/v1/queue/hold",
        op: Op::HoldMany,
    },
    Route {
        method: "POST",
        path: "/api/v1/queue/release",
        op: Op::ReleaseMany,
    },
    Route {
        method: "POST",
        path: "/api/v1/queue/cancel",
        op: Op::CancelMany,
    },
    Route {
        method: "GET",
        path: "/api/v1/destinations",
        op: Op::Destinations,
    },
    Route {
        method: "POST",
        path: "/api/v1/destinations/{name}/suspend",
        op: Op::Suspend,
    },
    Route {
        method: "POST",
        path: "/api/v1/destinations/{name}/resume",
        op: Op::Resume,
    },
    Route {
        method: "POST",
        path: "/api/v1/reload",
        op: Op::Reload,
    },
    Route {
        method: "POST",
        path: "/api/v1/tls-rpt/send",
        op: Op::TlsRptSend,
    },
    Route {
        method: "GET",
        path: "/api/v1/suppression",
        op: Op::SuppressionList,
    },
    Route {
        method: "POST",
        path: "/api/v1/suppression/add",
        op: Op::SuppressionAdd,
    },
    Route {
        method: "POST",
        path: "/api/v1/suppression/remove",
        op: Op::SuppressionRemove,
    },
    Route {
        method: "GET",
        path: "/api/v1/bans",
        op: Op::BanList,
    },
    Route {
        method: "POST",
        path: "/api/v1/bans/add",
        op: Op::BanAdd,
    },
    Route {
        method: "POST",
        path: "/api/v1/bans/remove",
        op: Op::BanRemove,
    },
    Route {
        method: "GET",
        path: "/api/v1/shaping/actions",
        op: Op::ShapingList,
    },
    Route {
        method: "POST",
        path: "/api/v1/shaping/actions/{id}/cancel",
        op: Op::ShapingCancel,
    },
    Route {
        method: "GET",
        path: "/api/v1/shaping/sites",
        op: Op::ShapingSites,
    },
    Route {
        method: "GET",
        path: "/api/v1/cluster",
        op: Op::Cluster,
    },
    Route {
        method: "POST",
        path: "/api/v1/cluster/leave",
        op: Op::ClusterLeave,
    },
];

/// Finds the route: Ok(op, path parameters), or the 404/405 to answer.
fn find_route(method: &str, path: &str) -> Result<(Op, Vec<String>), Response> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let mut path_known = false;
    for route in ROUTES {
        let pattern: Vec<&str> = route.path.split('/').collect();
        if pattern.len() != segments.len() {
            continue;
        }
        let mut params = Vec::new();
        let matched = pattern.iter().zip(&segments).all(|(p, s)| {
            if p.starts_with('{') {
                params.push((*s).to_string());
                !s.is_empty()
            } else {
                p == s
            }
        });
        if !matched {
            continue;
        }
        if route.method == method {
            return Ok((route.op, params));
        }
        path_known = true;
    }
    Err(if path_known {
        Response::error(405, "method not allowed on this path")
    } else {
        Response::error(404, "no such API endpoint")
    })
}

pub fn handle(state: &AdminState, req: &Request) -> Response {
    let (op, params) = match find_route(&req.method, &req.path) {
        Ok(found) => found,
        Err(resp) => return resp,
    };
    if op == Op::Reload {
        return match &state.reload {
            Some(reload) => match reload() {
                Ok(summary) => Response::json(200, &json!({ "reloaded": summary })),
                Err(why) => Response::json(409, &json!({ "error": why })),
            },
            None => Response::error(501, "reload is not available"),
        };
    }
    let api = &state.api;
    let result = match op {
        Op::Summary => summary(api, req),
        Op::List => list(api, req),
        Op::Show => show(api, &params[0]),
        Op::RetryOne => act_one(api, QueueAction::Retry, &params[0]),
        Op::HoldOne => act_one(api, QueueAction::Hold, &params[0]),
        Op::ReleaseOne => act_one(api, QueueAction::Release, &params[0]),
        Op::CancelOne => cancel_mode(req).and_then(|a| act_one(api, a, &params[0])),
        Op::RetryMany => act_many(api, QueueAction::Retry, req),
        Op::HoldMany => act_many(api, QueueAction::Hold, req),
        Op::ReleaseMany => act_many(api, QueueAction::Release, req),
        Op::CancelMany => cancel_mode(req).and_then(|a| act_many(api, a, req)),
        Op::Destinations => destinations(api),
        Op::Suspend => suspend(api, &params[0], req),
        Op::Resume => resume(api, &params[0]),
        Op::TlsRptSend => tls_rpt_send(api),
        Op::SuppressionList => super::suppression_api::list(req),
        Op::SuppressionAdd => super::suppression_api::add(req),
        Op::SuppressionRemove => super::suppression_api::remove(req),
        Op::BanList => super::ban_api::list(req),
        Op::BanAdd => super::ban_api::add(req),
        Op::BanRemove => super::ban_api::remove(req),
        Op::ShapingList => super::shaping_api::list(),
        Op::ShapingCancel => super::shaping_api::cancel(api, &params[0]),
        Op::ShapingSites => super::shaping_api::sites(api),
        Op::Cluster => cluster(api),
        Op::ClusterLeave => cluster_leave(api),
        Op::Reload => unreachable!("answered above"),
    };
    match result {
        Ok(value) => Response::json(200, &value),
        Err(e) => Response::error(e.status, &e.message),
    }
}

// ---------------------------------------------------------------------------------
// Changes, through the owning cores
// ---------------------------------------------------------------------------------

/// `sluice cluster leave`: the relay stops as for SIGTERM (no new
/// connections, sessions drained); at the end of the stop the cluster thread
/// writes the last changes and marks the node `left`, and the other nodes
/// take over what it still holds at their next sweep.
fn cluster_leave(api: &ApiContext) -> ApiResult {
    let Some(c) = &api.cluster else {
        return Err(err(404, "cluster mode is off (cluster.enabled = false)"));
    };
    let Some(stop) = &api.stop else {
        return Err(err(501, "this relay cannot be stopped through the API"));
    };
    let already = c.leaving.swap(true, std::sync::atomic::Ordering::AcqRel);
    if !already {
        tracing::warn!(target: "sluice::cluster", node = %c.settings.node_id, "cluster: leaving (asked through the API): stopping, then handing over");
        stop();
    }
    Ok(json!({ "node_id": c.settings.node_id, "leaving": true }))
}

/// The engine's view of the nodes plus this node's counters (on this admin
/// thread: its own short connection, bounded by `cluster.engine_timeout`).
fn cluster(api: &ApiContext) -> ApiResult {
    let Some(c) = &api.cluster else {
        return Err(err(404, "cluster mode is off (cluster.enabled = false)"));
    };
    let nodes = sluice_cluster::status_blocking(&c.settings)
        .map_err(|e| err(503, format!("cluster engine: {e}")))?;
    Ok(crate::cluster_io::status_json(&nodes, Some(c)))
}

fn cancel_mode(req: &Request) -> Result<QueueAction, ApiError> {
    match req.param("mode").unwrap_or("bounce") {
        "bounce" | "" => Ok(QueueAction::Bounce),
        "drop" => Ok(QueueAction::Drop),
        m => Err(err(400, format!("mode: `{m}` must be bounce or drop"))),
    }
}

/// Sends each core its share of `ids` and merges the answers.
fn run_action(
    senders: &[UnboundedSender<Command>],
    action: QueueAction,
    ids: Vec<MessageId>,
) -> Result<Outcomes, ApiError> {
    let mut per_core: BTreeMap<usize, Vec<MessageId>> = BTreeMap::new();
    for id in ids {
        per_core
            .entry(owner_core(id, senders.len()))
            .or_default()
            .push(id);
    }
    let (tx, rx) = mpsc::channel();
    let mut waiting = 0;
    for (core, ids) in per_core {
        let cmd = Command::Queue {
            action,
            ids,
            reply: tx.clone(),
        };
        senders[core]
            .unbounded_send(cmd)
            .map_err(|_| err(503, "the delivery cores are stopping"))?;
        waiting += 1;
    }
    let mut done = Vec::new();
    let mut skipped = Vec::new();
    let deadline = Instant::now() + REPLY_TIMEOUT;
    for _ in 0..waiting {
        let left = deadline.saturating_duration_since(Instant::now());
        let report = rx
            .recv_timeout(left)
            .map_err(|_| err(504, "the delivery cores did not answer in time"))?;
        done.extend(report.done);
        skipped.extend(report.skipped);
    }
    done.sort();
    skipped.sort();
    Ok((done, skipped))
}

fn act_one(api: &ApiContext, action: QueueAction, id: &str) -> ApiResult {
    let id = parse_id(id)?;
    let spool = spool(api)?;
    // 404 before 409: a wrong id is the more useful answer.
    spool.envelope(id).map_err(spool_err)?;
    let senders = cores(api)?;
    let (done, skipped) = run_action(senders, action, vec![id])?;
    if let Some((_, why)) = skipped.first() {
        let status = if why == "no such message" { 404 } else { 409 };
        return Err(err(status, format!("{id}: {why}")));
    }
    Ok(json!({
        "action": action.name(),
        "id": id.to_string(),
        "done": !done.is_empty(),
    }))
}

/// An action on every message matching the filter (at most `MAX_ACTION_IDS`).
fn act_many(api: &ApiContext, action: QueueAction, req: &Request) -> ApiResult {
    let spool = spool(api)?;
    let filter = Filter::from_request(req)?;
    if filter.is_empty() && req.param("all") != Some("true") {
        return Err(err(
            400,
            "no filter given: add one (sender, recipient, domain, queue, status, \
             min_age, max_age) or all=true",
        ));
    }
    let senders = cores(api)?;
    let now = now_ms();
    let mut ids = Vec::new();
    let mut matched = 0u64;
    spool
        .list(|id, env| {
            if filter.matches(env, now) {
                matched += 1;
                if ids.len() < MAX_ACTION_IDS {
                    ids.push(id);
                }
            }
            true
        })
        .map_err(spool_err)?;
    let truncated = matched > ids.len() as u64;
    let (done, skipped) = run_action(senders, action, ids)?;
    Ok(json!({
        "action": action.name(),
        "matched": matched,
        "done": done.iter().map(|id| id.to_string()).collect::<Vec<_>>(),
        "skipped": skipped
            .iter()
            .map(|(id, why)| json!({ "id": id.to_string(), "reason": why }))
            .collect::<Vec<_>>(),
        "truncated": truncated,
    }))
}

fn destinations(api: &ApiContext) -> ApiResult {
    let suspended = match &api.cores {
        Some(senders) => suspended_list(senders)?,
        None => Vec::new(),
    };
    Ok(json!({ "suspended": suspended }))
}

fn destination_name(name: &str) -> Result<String, ApiError> {
    let d = normalize_destination(name);
    if d.is_empty() || d.len() > 255 || d.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(err(400, format!("`{name}` is not a destination name")));
    }
    Ok(d)
}

fn suspend(api: &ApiContext, name: &str, req: &Request) -> ApiResult {
    let destination = destination_name(name)?;
    let spec = req
        .param("for")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| err(400, "for: how long to suspend (e.g. for=1h) is required"))?;
    let duration = parse_duration("for", spec)?;
    if duration.is_zero() || duration > MAX_SUSPEND {
        return Err(err(400, "for: must be more than 0 and at most 30 days"));
    }
    let senders = cores(api)?;
    let until = now_ms() + duration.as_millis() as u64;
    broadcast(senders, |reply| Command::Suspend {
        destination: destination.clone(),
        until_ms: until,
        reply,
    })?;
    // Stored, so it outlives a restart.
    if let Some(shaping) = crate::delivery::shaping::installed() {
        shaping
            .operator_suspend(&destination, until)
            .map_err(|e| err(500, format!("suspension not stored: {e}")))?;
    }
    // Cluster mode: every node suspends it.
    crate::cluster_actions::suspended(&destination, until);
    Ok(json!({
        "destination": destination,
        "suspended": true,
        "until": rfc3339(until),
        "until_unix_ms": until,
    }))
}

fn resume(api: &ApiContext, name: &str) -> ApiResult {
    let destination = destination_name(name)?;
    let senders = cores(api)?;
    // Shaping suspensions of the destination end too (and the stored ones).
    let shaped =
        crate::delivery::shaping::installed().map_or(0, |s| s.resume_destination(&destination));
    let was = broadcast(senders, |reply| Command::Resume {
        destination: destination.clone(),
        reply,
    })?;
    crate::cluster_actions::resumed(&destination);
    let was: Vec<bool> = was.into_iter().map(|w| w || shaped > 0).collect();
    Ok(json!({
        "destination": destination,
        "resumed": was.into_iter().any(|w| w),
    }))
}

/// Every core writes its TLS-RPT counters, then core 0 sends every stored
/// report (today's too): the test hook and the operator's "send now".
fn tls_rpt_send(api: &ApiContext) -> ApiResult {
    let senders = cores(api)?;
    let on = broadcast(senders, |reply| Command::TlsRptFlush { reply })?;
    if !on.first().copied().unwrap_or(false) {
        return Err(err(409, "tls_rpt.enabled is false"));
    }
    let first = senders.get(..1).unwrap_or_default();
    let mut sent = broadcast(first, |reply| Command::TlsRptSend { reply })?;
    Ok(sent.pop().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use serde_json::Value;

    const OPENAPI: &str = include_str!("../../../docs/openapi.yaml");

    #[test]
    fn routes_match_with_parameters() {
        let (op, params) = find_route("GET", "/api/v1/queue/messages/0123")
            .map_err(|r| r.status)
            .expect("show");
        assert_eq!(op, Op::Show);
        assert_eq!(params, vec!["0123".to_string()]);
        let (op, params) = find_route("POST", "/api/v1/destinations/example.com/suspend")
            .map_err(|r| r.status)
            .expect("suspend");
        assert_eq!(op, Op::Suspend);
        assert_eq!(params, vec!["example.com".to_string()]);
        assert_eq!(
            find_route("DELETE", "/api/v1/queue/summary")
                .err()
                .map(|r| r.status),
            Some(405)
        );
        assert_eq!(
            find_route("GET", "/api/v1/nothing").err().map(|r| r.status),
            Some(404)
        );
        assert_eq!(
            find_route("GET", "/api/v1/queue/messages//hold")
                .err()
                .map(|r| r.status),
            Some(404)
        );
    }

    /// The OpenAPI document parses and lists exactly the routes served, with
    /// bearer auth and an error schema, so the two cannot drift apart.
    #[test]
    fn openapi_lists_every_route() {
        let doc: Value = serde_yaml::from_str(OPENAPI).expect("docs/openapi.yaml parses");
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"].as_str(),
            Some("bearer")
        );
        assert!(doc["components"]["schemas"]["Error"].is_object());
        let paths = doc["paths"].as_object().expect("paths");
        let mut documented = BTreeSet::new();
        for (path, item) in paths {
            for (method, operation) in item.as_object().expect("path item") {
                if method == "parameters" {
                    continue;
                }
                assert!(
                    operation["responses"]["401"].is_object() || path == "/healthz",
                    "{method} {path}: no 401 response"
                );
                documented.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
        let served: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method.to_string(), r.path.to_string()))
            .collect();
        assert_eq!(documented, served, "docs/openapi.yaml and ROUTES differ");
    }

    #[test]
    fn mutations_without_delivery_are_refused() {
        let api = ApiContext::default();
        assert_eq!(cores(&api).err().map(|e| e.status), Some(409));
    }
}
