//! One SMTP session's run of its listener's filter chain: what the chain
//! keeps between stages. Rules, Sieve and HTTP hooks keep nothing; each milter keeps a
//! connection, opened at the first stage that asks it (a listener without
//! milters never opens or allocates anything here), told ABORT when a
//! transaction ends without a message and QUIT when the session ends — also
//! when the session task is dropped ([`MilterSession`]'s `Drop`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use sluice_policy::milter::SessionExtras;
use sluice_policy::sieve::SieveExtras;
use sluice_policy::stage::{FilterOutcome, StageEvent};

use super::{FilterKind, Filters};
use crate::milter::MilterSession;

/// The filter chain of one session.
pub struct FilterSession {
    filters: Arc<Filters>,
    /// One slot per configured milter, in order; empty until a milter is
    /// first asked (then sized to the list, each slot opened when used).
    milters: Vec<Option<MilterSession>>,
    extras: SessionExtras,
}

impl FilterSession {
    /// `local` is the relay's address the client reached (`{if_addr}`).
    pub fn new(filters: Arc<Filters>, local: Option<SocketAddr>) -> FilterSession {
        FilterSession {
            filters,
            milters: Vec::new(),
            extras: SessionExtras {
                local_addr: local,
                auth_type: None,
            },
        }
    }

    /// AUTH succeeded with this mechanism (`{auth_type}` from the next MAIL).
    pub fn set_auth_type(&mut self, mechanism: &str) {
        self.extras.auth_type = Some(mechanism.to_string());
        for m in self.milters.iter_mut().flatten() {
            m.set_auth_type(mechanism);
        }
    }

    /// Runs the chain for one stage and combines the answers: rules, Sieve,
    /// milters, hooks; the first verdict that is not accept ends the stage.
    pub async fn run(&mut self, event: &StageEvent<'_>, extras: &SieveExtras<'_>) -> FilterOutcome {
        let mut combined = FilterOutcome::accept();
        let filters = self.filters.clone();
        for kind in FilterKind::ORDER {
            match kind {
                FilterKind::Rules => {
                    let started = Instant::now();
                    let outcome = filters.rules_outcome(event);
                    if combine(&mut combined, event, "rules", started, outcome) {
                        return combined;
                    }
                }
                FilterKind::Sieve => {
                    let started = Instant::now();
                    if let Some(outcome) = filters.sieve_outcome(event, extras).await {
                        if combine(&mut combined, event, "sieve", started, outcome) {
                            return combined;
                        }
                    }
                }
                FilterKind::Milter => {
                    for (i, cfg) in filters.milters().iter().enumerate() {
                        if !cfg.asked_at(event.stage) {
                            continue;
                        }
                        let started = Instant::now();
                        let milter = self.milter(i, event).await;
                        let outcome = milter.consult(event).await;
                        if combine(&mut combined, event, &cfg.name, started, outcome) {
                            return combined;
                        }
                    }
                }
                FilterKind::Hook => {
                    for hook in filters.hooks() {
                        if !hook.config().asked_at(event.stage) {
                            continue;
                        }
                        let started = Instant::now();
                        let outcome = hook.consult(event).await;
                        if combine(&mut combined, event, &hook.config().name, started, outcome) {
                            return combined;
                        }
                    }
                }
            }
        }
        combined
    }

    /// The `i`-th milter's connection, opened now if this is its first use.
    async fn milter(&mut self, i: usize, event: &StageEvent<'_>) -> &mut MilterSession {
        let configs = self.filters.milters();
        if self.milters.len() < configs.len() {
            self.milters.resize_with(configs.len(), || None);
        }
        let milter = match self.milters[i].take() {
            Some(m) => m,
            None => {
                MilterSession::open(
                    &configs[i],
                    event.client,
                    self.extras.clone(),
                    self.filters.max_message_size(),
                )
                .await
            }
        };
        self.milters[i].insert(milter)
    }

    /// A transaction ended without a message (RSET, refusals, a new MAIL
    /// coming): milters holding one are told ABORT.
    pub async fn abort(&mut self) {
        for m in self.milters.iter_mut().flatten() {
            m.abort().await;
        }
    }

    /// The session ended: QUIT to every open milter.
    pub async fn quit(mut self) {
        for m in std::mem::take(&mut self.milters).into_iter().flatten() {
            m.quit().await;
        }
    }
}

/// Adds one filter's outcome to the stage's; true when it ends the stage.
fn combine(
    combined: &mut FilterOutcome,
    event: &StageEvent<'_>,
    filter: &str,
    started: Instant,
    outcome: FilterOutcome,
) -> bool {
    tracing::debug!(
        target: "sluice::filter",
        stage = %event.stage,
        filter,
        verdict = outcome.verdict.name(),
        micros = started.elapsed().as_micros() as u64,
        "filter ran"
    );
    if event.stage.may_modify() {
        combined.modifications.extend(outcome.modifications);
    }
    if !outcome.verdict.is_final() {
        return false;
    }
    tracing::info!(
        target: "sluice::filter",
        stage = %event.stage,
        client_ip = %event.client.ip,
        filter,
        verdict = outcome.verdict.name(),
        "filter decided"
    );
    combined.verdict = outcome.verdict;
    true
}
