//! `/api/v1/bans`: list, add and remove auto-bans (`crate::bans`). Runs on
//! the API thread: lists read memory; adds and removes change memory at once
//! and are stored by the bans thread.

use serde_json::{json, Value};

use super::calls::{err, for_duration_ms, list_limit, rfc3339, ApiError, ApiResult};
use super::Request;
use crate::bans::Bans;
use crate::delivery::now_ms;

/// Most bans one list answers.
const MAX_LIST: usize = 10_000;
/// Default of `limit`.
const DEFAULT_LIST: usize = 1_000;

fn bans() -> Result<&'static Bans, ApiError> {
    crate::bans::installed()
        .map(|b| b.as_ref())
        .ok_or_else(|| err(409, "bans are off ([ban] enabled = false)"))
}

fn address(req: &Request) -> Result<&str, ApiError> {
    req.param("address")
        .ok_or_else(|| err(400, "address: missing"))
}

/// GET: `limit` (default 1000, at most 10000).
pub(super) fn list(req: &Request) -> ApiResult {
    let b = bans()?;
    let limit = list_limit(req, DEFAULT_LIST, MAX_LIST)?;
    let rows = b.list(now_ms(), limit);
    let entries: Vec<Value> = rows
        .iter()
        .map(|(ip, ban)| {
            json!({
                "address": ip.to_string(),
                "reason": ban.reason,
                "added": rfc3339(ban.added_unix_ms),
                "until": rfc3339(ban.until_unix_ms),
            })
        })
        .collect();
    Ok(json!({ "bans": entries, "truncated": rows.len() >= limit }))
}

/// POST: `address`, `for` (default ban.duration), `reason`.
pub(super) fn add(req: &Request) -> ApiResult {
    let b = bans()?;
    let addr = address(req)?;
    let duration = for_duration_ms(req)?;
    let reason = req.param("reason").unwrap_or("added by the operator");
    let (ip, ban) = b
        .add(addr, duration, reason, now_ms())
        .map_err(|e| err(400, e))?;
    tracing::info!(client_ip = %ip, "ban added by the operator");
    Ok(json!({ "address": ip.to_string(), "until": rfc3339(ban.until_unix_ms) }))
}

/// POST: `address`.
pub(super) fn remove(req: &Request) -> ApiResult {
    let b = bans()?;
    let (ip, removed) = b.remove(address(req)?).map_err(|e| err(400, e))?;
    if removed {
        tracing::info!(client_ip = %ip, "ban removed by the operator");
    }
    Ok(json!({ "address": ip.to_string(), "removed": removed }))
}
