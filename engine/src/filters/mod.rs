//! The filter chain of a listener (issue 14): built-in stage rules, then Sieve,
//! then milters, then HTTP hooks, asked in that order at each SMTP stage they
//! are configured for. The first answer that is not accept ends the stage;
//! modifications from the filters that accepted before it (at DATA only) are
//! kept in order.
//!
//! The SMTP session never calls this: it emits `Action::Filter` (or, at DATA,
//! marks its `Action::Store`) only for stages in [`Filters::stages`], and the
//! connection driver runs the chain ([`session::FilterSession`], which holds
//! the session's milter connections) and hands the [`FilterOutcome`] back. A
//! listener without filters has an empty stage set: nothing is built, nothing
//! allocated, no action emitted.

use std::sync::Arc;
use std::time::Duration;

use sluice_policy::lists::Lists;
use sluice_policy::sieve::{SieveConfig, SieveExtras, SieveRunError, SieveSet};
use sluice_policy::stage::{
    ClientFacts, FilterOutcome, FilterReply, OnFailure, Stage, StageEvent, Verdict,
};
use sluice_policy::stage_rules::{StageRuleConfig, StageRules};

use crate::config::hook::HookConfig;
use crate::config::milter::MilterConfig;
use crate::hooks::Hook;

pub mod apply;
pub mod delivery;
pub mod session;

/// A message at least this big is given to Sieve on the blocking thread pool
/// rather than on the executor (BENCHMARKS.md "Sieve"): parsing dominates a
/// run, and it grows with the message.
pub const SIEVE_OFFLOAD_BYTES: usize = 256 * 1024;

/// How long an offloaded Sieve run may take before OnFailure applies.
pub const SIEVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A set of stages, as bits (Copy, no allocation: checked on every command).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageSet(u8);

impl StageSet {
    pub const EMPTY: StageSet = StageSet(0);

    fn bit(stage: Stage) -> u8 {
        1 << (stage as u8)
    }

    pub fn insert(&mut self, stage: Stage) {
        self.0 |= Self::bit(stage);
    }

    pub fn contains(self, stage: Stage) -> bool {
        self.0 & Self::bit(stage) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// This set without `stage`.
    pub fn without(self, stage: Stage) -> StageSet {
        StageSet(self.0 & !Self::bit(stage))
    }
}

/// The kinds of filter, in the order they run at every stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterKind {
    Rules,
    Sieve,
    Milter,
    Hook,
}

impl FilterKind {
    pub const ORDER: [FilterKind; 4] = [
        FilterKind::Rules,
        FilterKind::Sieve,
        FilterKind::Milter,
        FilterKind::Hook,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FilterKind::Rules => "rules",
            FilterKind::Sieve => "sieve",
            FilterKind::Milter => "milter",
            FilterKind::Hook => "hook",
        }
    }
}

/// One listener's filters, built when the configuration loads (and again on
/// reload): scripts compiled, rules checked.
#[derive(Debug)]
pub struct Filters {
    stages: StageSet,
    rules: StageRules,
    sieve: Option<Arc<SieveSet>>,
    lists: Arc<Lists>,
    /// `[[server.listener.NAME.milter]]`, in order; each session connects
    /// to one at the first stage that asks it.
    milters: Vec<MilterConfig>,
    /// The listener's message size limit (bounds a milter's body replacement).
    max_message_size: usize,
    /// `[[server.listener.NAME.hook]]`, in order; shared by every session
    /// (their threads start at the first call).
    hooks: Vec<Hook>,
}

/// What a listener's filters are built from.
pub struct FilterSources<'a> {
    pub sieve: Option<&'a SieveConfig>,
    pub rules: &'a [StageRuleConfig],
    pub milters: &'a [MilterConfig],
    pub hooks: &'a [HookConfig],
    pub hostname: &'a str,
    pub lists: Arc<Lists>,
    pub max_message_size: usize,
}

/// A config error: the key inside the listener table, and why.
pub type BuildError = (String, String);

impl Filters {
    /// The listener's filters, or None when it has none (the hot path).
    pub fn build(src: FilterSources<'_>) -> Result<Option<Arc<Filters>>, BuildError> {
        let FilterSources {
            sieve,
            rules,
            milters,
            hooks,
            hostname,
            lists,
            max_message_size,
        } = src;
        if sieve.is_none() && rules.is_empty() && milters.is_empty() && hooks.is_empty() {
            return Ok(None);
        }
        let rules = StageRules::new(rules, &lists)
            .map_err(|e| ("filter_rule".to_string(), e.to_string()))?;
        let sieve = match sieve {
            Some(cfg) => Some(Arc::new(
                SieveSet::load(cfg, hostname, lists.clone())
                    .map_err(|e| (format!("sieve.{}", e.key()), e.to_string()))?,
            )),
            None => None,
        };
        let mut stages = StageSet::EMPTY;
        for stage in Stage::ALL {
            if rules.has(stage)
                || sieve.as_ref().is_some_and(|s| s.has(stage))
                || milters.iter().any(|m| m.asked_at(stage))
                || hooks.iter().any(|h| h.asked_at(stage))
            {
                stages.insert(stage);
            }
        }
        if stages.is_empty() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Filters {
            stages,
            rules,
            sieve,
            lists,
            milters: milters.to_vec(),
            max_message_size,
            hooks: hooks.iter().cloned().map(Hook::new).collect(),
        })))
    }

    pub fn stages(&self) -> StageSet {
        self.stages
    }

    /// The stages an SMTP session asks (all but delivery, which the shard
    /// owner runs before each delivery attempt: `delivery.rs`).
    pub fn session_stages(&self) -> StageSet {
        self.stages.without(Stage::Delivery)
    }

    /// Whether anything runs before delivery.
    pub fn at_delivery(&self) -> bool {
        self.stages.contains(Stage::Delivery)
    }

    pub fn milters(&self) -> &[MilterConfig] {
        &self.milters
    }

    pub fn hooks(&self) -> &[Hook] {
        &self.hooks
    }

    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// The built-in rules' verdict.
    fn rules_outcome(&self, event: &StageEvent<'_>) -> FilterOutcome {
        FilterOutcome::with_verdict(self.rules.decide(event, &self.lists))
    }

    /// The Sieve script's outcome, None when no script runs at this stage.
    async fn sieve_outcome(
        &self,
        event: &StageEvent<'_>,
        extras: &SieveExtras<'_>,
    ) -> Option<FilterOutcome> {
        let set = self.sieve.as_ref().filter(|s| s.has(event.stage))?;
        Some(match run_sieve(set, event, extras).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(
                    target: "sluice::filter",
                    stage = %event.stage,
                    client_ip = %event.client.ip,
                    filter = "sieve",
                    error = %e,
                    "filter failed"
                );
                match set.on_failure() {
                    OnFailure::Accept => FilterOutcome::accept(),
                    OnFailure::Tempfail => FilterOutcome::with_verdict(failure_verdict()),
                }
            }
        })
    }
}

/// What a filter that could not answer gives under OnFailure::Tempfail.
pub fn failure_verdict() -> Verdict {
    Verdict::Tempfail(FilterReply {
        code: 451,
        enhanced: Some("4.3.0".into()),
        text: "Error: policy check failed, try again later".into(),
    })
}

/// Small runs stay on the executor; a big message goes to the blocking pool
/// with a timeout (the instruction limit bounds the run itself).
async fn run_sieve(
    set: &Arc<SieveSet>,
    event: &StageEvent<'_>,
    extras: &SieveExtras<'_>,
) -> Result<FilterOutcome, SieveRunError> {
    let big = event
        .message
        .is_some_and(|m| m.len() >= SIEVE_OFFLOAD_BYTES);
    if !big {
        return set.run(event, extras);
    }
    let set = set.clone();
    let owned = OwnedEvent::of(event);
    let (spf, dkim, dmarc, dnsbl) = (
        extras.spf.to_string(),
        extras.dkim.to_string(),
        extras.dmarc.to_string(),
        extras.dnsbl.to_string(),
    );
    let task = glommio::executor().spawn_blocking(move || {
        let extras = SieveExtras {
            spf: &spf,
            dkim: &dkim,
            dmarc: &dmarc,
            dnsbl: &dnsbl,
        };
        set.run(&owned.event(), &extras)
    });
    match crate::time::within(SIEVE_TIMEOUT, task).await {
        Some(result) => result,
        None => Err(SieveRunError::Runtime("timed out".into())),
    }
}

/// A stage event that owns its parts (for the blocking pool, and for the
/// SMTP session's `Action::Filter`).
#[derive(Debug, Clone)]
pub struct OwnedEvent {
    pub stage: Stage,
    pub client: ClientFacts,
    pub queue_id: Option<String>,
    pub sender: Option<String>,
    pub sender_params: Vec<String>,
    pub recipient: Option<String>,
    pub recipients: Vec<String>,
    pub message: Option<Vec<u8>>,
}

impl OwnedEvent {
    pub fn of(e: &StageEvent<'_>) -> OwnedEvent {
        OwnedEvent {
            stage: e.stage,
            client: e.client.clone(),
            queue_id: e.queue_id.map(str::to_string),
            sender: e.sender.map(str::to_string),
            sender_params: e.sender_params.to_vec(),
            recipient: e.recipient.map(str::to_string),
            recipients: e.recipients.to_vec(),
            message: e.message.map(<[u8]>::to_vec),
        }
    }

    pub fn event(&self) -> StageEvent<'_> {
        StageEvent {
            stage: self.stage,
            client: &self.client,
            queue_id: self.queue_id.as_deref(),
            sender: self.sender.as_deref(),
            sender_params: &self.sender_params,
            recipient: self.recipient.as_deref(),
            recipients: &self.recipients,
            message: self.message.as_deref(),
        }
    }
}

/// The SPF/DKIM/DMARC words of an "spf=pass dkim=fail dmarc=none" summary.
pub fn auth_words(summary: &str) -> (&str, &str, &str) {
    let mut out = ("", "", "");
    for word in summary.split_whitespace() {
        match word.split_once('=') {
            Some(("spf", v)) => out.0 = v,
            Some(("dkim", v)) => out.1 = v,
            Some(("dmarc", v)) => out.2 = v,
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_sets_hold_their_stages() {
        let mut set = StageSet::EMPTY;
        assert!(set.is_empty());
        set.insert(Stage::Rcpt);
        set.insert(Stage::Data);
        assert!(set.contains(Stage::Rcpt) && set.contains(Stage::Data));
        assert!(!set.contains(Stage::Mail) && !set.contains(Stage::Connect));
    }

    #[test]
    fn no_filters_build_nothing() {
        let built = Filters::build(FilterSources {
            sieve: None,
            rules: &[],
            milters: &[],
            hooks: &[],
            hostname: "h",
            lists: Arc::default(),
            max_message_size: 1 << 20,
        })
        .expect("build");
        assert!(built.is_none());
    }

    #[test]
    fn auth_summary_words() {
        assert_eq!(
            auth_words("spf=pass dkim=fail dmarc=none"),
            ("pass", "fail", "none")
        );
        assert_eq!(auth_words(""), ("", "", ""));
    }
}
