//! What the management API's handlers share: the context, error answers,
//! parameter parsing, and asking every core. Both the reads (`queue_view`) and
//! the changes (`api`) use it, so neither imports the other's helpers.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use futures_channel::mpsc::UnboundedSender;
use serde_json::{json, Value};
use sluice_spool::{MessageId, Spool, SpoolError};

use super::Request;
use crate::delivery::admin::Command;

/// How long an API thread waits for the cores to answer.
pub(super) const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// What the API threads use: the spool and the channels to the cores.
#[derive(Default)]
pub struct ApiContext {
    /// The running spool (None only in tests of the router).
    pub spool: Option<Arc<Spool>>,
    /// Command senders indexed by core; None when delivery is disabled.
    pub cores: Option<Vec<UnboundedSender<Command>>>,
    /// Cluster mode's node (None when `cluster.enabled` is false).
    pub cluster: Option<Arc<sluice_cluster::Cluster>>,
    /// Starts the relay's stop, as SIGTERM does (`sluice cluster leave`).
    pub stop: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// An error answer: HTTP status and message.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: u16,
    pub(super) message: String,
}

pub(super) fn err(status: u16, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        message: message.into(),
    }
}

pub(super) type ApiResult = Result<Value, ApiError>;

pub(super) fn spool(api: &ApiContext) -> Result<&Spool, ApiError> {
    api.spool
        .as_deref()
        .ok_or_else(|| err(503, "the spool is not available"))
}

pub(super) fn cores(api: &ApiContext) -> Result<&[UnboundedSender<Command>], ApiError> {
    api.cores.as_deref().ok_or_else(|| {
        err(
            409,
            "delivery is disabled (delivery.enabled = false): queue actions and \
             destination suspensions need the delivery cores",
        )
    })
}

pub(super) fn spool_err(e: SpoolError) -> ApiError {
    match e {
        SpoolError::NotFound(id) => err(404, format!("no message {id} in the queue")),
        e => err(500, format!("spool: {e}")),
    }
}

pub(super) fn parse_id(s: &str) -> Result<MessageId, ApiError> {
    s.parse()
        .map_err(|_| err(400, format!("`{s}` is not a message id (16 hex digits)")))
}

pub(super) fn rfc3339(ms: u64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// A duration: plain seconds ("90") or humantime ("90s", "1h 30m").
pub(super) fn parse_duration(name: &str, v: &str) -> Result<Duration, ApiError> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(v).map_err(|e| err(400, format!("{name}: `{v}`: {e}")))
}

/// Longest `for` an operator may give an entry (a ban, a suppression).
const MAX_FOR: Duration = Duration::from_secs(10 * 365 * 86_400);

/// The optional `for` parameter in milliseconds, between 1 s and 10 years
/// (None: the caller's default).
pub(super) fn for_duration_ms(req: &Request) -> Result<Option<u64>, ApiError> {
    let Some(v) = req.param("for") else {
        return Ok(None);
    };
    let d = parse_duration("for", v)?;
    if d.is_zero() || d > MAX_FOR {
        return Err(err(400, "for: between 1s and 10 years"));
    }
    Ok(Some(d.as_millis() as u64))
}

/// `limit` of a list call: `default` when absent, at most `max` (more is
/// cut to it, not refused).
pub(super) fn list_limit(req: &Request, default: usize, max: usize) -> Result<usize, ApiError> {
    match req.param("limit") {
        Some(l) => Ok(l
            .parse::<usize>()
            .map_err(|_| err(400, format!("limit: `{l}` is not a number")))?
            .min(max)),
        None => Ok(default),
    }
}

pub(super) fn parse_count(
    req: &Request,
    name: &str,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match req.param(name) {
        None | Some("") => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n <= max => Ok(n),
            _ => Err(err(
                400,
                format!("{name}: `{v}` must be a number up to {max}"),
            )),
        },
    }
}

/// Sends a command built by `make` to every core and collects the answers.
pub(super) fn broadcast<T>(
    senders: &[UnboundedSender<Command>],
    make: impl Fn(mpsc::Sender<T>) -> Command,
) -> Result<Vec<T>, ApiError> {
    let (tx, rx) = mpsc::channel();
    for s in senders {
        s.unbounded_send(make(tx.clone()))
            .map_err(|_| err(503, "the delivery cores are stopping"))?;
    }
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let mut out = Vec::with_capacity(senders.len());
    for _ in senders {
        let left = deadline.saturating_duration_since(Instant::now());
        out.push(
            rx.recv_timeout(left)
                .map_err(|_| err(504, "the delivery cores did not answer in time"))?,
        );
    }
    Ok(out)
}

pub(super) fn suspended_list(senders: &[UnboundedSender<Command>]) -> Result<Vec<Value>, ApiError> {
    // Every core holds the same table; the first core's copy is the answer.
    let first = senders.get(..1).unwrap_or_default();
    let lists = broadcast(first, |reply| Command::Suspended { reply })?;
    Ok(lists
        .into_iter()
        .flatten()
        .map(|(d, until)| json!({ "destination": d, "until": rfc3339(until), "until_unix_ms": until }))
        .collect())
}
