//! `/api/v1/suppression`: list, add and remove suppression list entries
//! (`crate::suppression`). Runs on the API thread: reads are LMDB reads, an
//! add or remove commits here (never on a core).

use serde_json::{json, Value};
use sluice_policy::bounce::BounceClass;
use sluice_spool::SuppressionRow;

use super::calls::{err, for_duration_ms, list_limit, rfc3339, ApiError, ApiResult};
use super::Request;
use crate::delivery::now_ms;
use crate::suppression::{AddError, Suppressions};

/// Most entries one list answers.
pub const MAX_LIST: usize = 10_000;
/// Default of `limit`.
const DEFAULT_LIST: usize = 1_000;

fn list_of() -> Result<&'static Suppressions, ApiError> {
    crate::suppression::installed()
        .map(|s| s.as_ref())
        .ok_or_else(|| {
            err(
                409,
                "the suppression list is off ([suppression] enabled = false)",
            )
        })
}

fn add_err(e: AddError) -> ApiError {
    match e {
        AddError::Invalid(m) => err(400, m),
        AddError::Storage(e) => err(500, e.to_string()),
    }
}

fn row_json(r: &SuppressionRow, now: u64) -> Value {
    json!({
        "scope": r.scope,
        "recipient": r.recipient,
        "class": r.entry.class,
        "reason": r.entry.reason,
        "added": rfc3339(r.entry.added_unix_ms),
        "until": rfc3339(r.entry.until_unix_ms),
        "active": now < r.entry.until_unix_ms,
    })
}

/// GET: `scope` (optional), `limit` (default 1000, at most 10000).
pub(super) fn list(req: &Request) -> ApiResult {
    let s = list_of()?;
    let limit = list_limit(req, DEFAULT_LIST, MAX_LIST)?;
    let now = now_ms();
    let rows = s.list(req.param("scope"), limit).map_err(add_err)?;
    Ok(json!({
        "entries": rows.iter().map(|r| row_json(r, now)).collect::<Vec<_>>(),
        "truncated": rows.len() >= limit,
    }))
}

/// The `scope` (default `*`: every sender) and `recipient` an add or remove names.
fn entry_key(req: &Request) -> Result<(&str, &str), ApiError> {
    let recipient = req
        .param("recipient")
        .ok_or_else(|| err(400, "recipient: missing"))?;
    let scope = req
        .param("scope")
        .unwrap_or(sluice_policy::suppression::GLOBAL_SCOPE);
    Ok((scope, recipient))
}

/// POST: `recipient`, `scope` (default `*`: every sender), `class` (default
/// policy-block), `for` (default the configured ttl), `reason`.
pub(super) fn add(req: &Request) -> ApiResult {
    let s = list_of()?;
    let (scope, recipient) = entry_key(req)?;
    let class: BounceClass = match req.param("class") {
        Some(c) => c
            .parse()
            .map_err(|e: String| err(400, format!("class: {e}")))?,
        None => BounceClass::PolicyBlock,
    };
    let ttl = for_duration_ms(req)?;
    let reason = req.param("reason").unwrap_or("added by the operator");
    let (scope, recipient, entry) = s
        .add(scope, recipient, class, reason, ttl, now_ms())
        .map_err(add_err)?;
    tracing::info!(scope = %scope, recipient = %recipient, class = %class, "suppression added by the operator");
    Ok(json!({
        "scope": scope,
        "recipient": recipient,
        "class": class.as_str(),
        "until": rfc3339(entry.until_unix_ms),
    }))
}

/// POST: `recipient`, `scope` (default `*`).
pub(super) fn remove(req: &Request) -> ApiResult {
    let s = list_of()?;
    let (scope, recipient) = entry_key(req)?;
    let removed = s.remove(scope, recipient).map_err(add_err)?;
    if removed {
        tracing::info!(scope = %scope, recipient = %recipient, "suppression removed by the operator");
    }
    Ok(json!({ "scope": scope, "recipient": recipient, "removed": removed }))
}
