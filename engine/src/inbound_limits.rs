//! `[[limit]]` in the relay: the one shared table
//! (`sluice_policy::inbound_limits::InboundLimits`, where the decisions are
//! made with the time passed in), with the logs and metrics of a refusal.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use sluice_policy::inbound_limits::{
    InboundLimits, LimitFacts, LimitPermit, LimitRefusal, LimitStage,
};

static INSTALLED: OnceLock<Arc<InboundLimits>> = OnceLock::new();

/// The running rules, when there are any.
pub fn installed() -> Option<&'static Arc<InboundLimits>> {
    INSTALLED.get()
}

/// Makes `l` the running rules (once per process).
pub fn install(l: Arc<InboundLimits>) {
    let _ = INSTALLED.set(l);
}

/// The rules, when any applies to `listener` (sessions keep None otherwise).
pub fn for_listener(listener: &str) -> Option<Arc<InboundLimits>> {
    installed().filter(|l| l.applies_to(listener)).cloned()
}

/// Checks the rules for `stage`; a refusal is logged and counted.
pub fn acquire(
    limits: &Arc<InboundLimits>,
    stage: LimitStage,
    facts: &LimitFacts<'_>,
    now_ms: u64,
) -> Result<LimitPermit, LimitRefusal> {
    let result = limits.acquire(stage, facts, now_ms);
    let untracked = limits.stats.untracked.swap(0, Ordering::Relaxed);
    if untracked > 0 {
        crate::metrics::limit_untracked(untracked);
    }
    if let Err(r) = &result {
        crate::metrics::limit_refused(&r.rule, stage.as_str());
        tracing::info!(
            target: "sluice::smtp",
            listener = %facts.listener,
            client_ip = %facts.ip,
            rule = %r.rule,
            key = %crate::smtp::server::printable(&r.key),
            stage = stage.as_str(),
            retry_ms = r.retry_ms,
            "inbound limit reached"
        );
    }
    result
}
