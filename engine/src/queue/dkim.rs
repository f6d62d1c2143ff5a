//! DKIM signing on the way into the queue (see ARCHITECTURE.md "DKIM
//! signing"): the loaded policy with its metric handles, swapped whole by a
//! reload, and the signing step of [`super::CoreQueue::enqueue`].

use std::sync::Arc;

use arc_swap::ArcSwap;
use metrics::{counter, histogram, Counter, Histogram};
use sluice_policy::dkim::{DkimError, DkimPolicy, SigningAlgorithm};
use sluice_policy::MessageFacts;
use sluice_spool::Envelope;

/// Bodies above this are signed on the blocking pool even with Ed25519 only:
/// hashing them takes longer than the hand-off.
const INLINE_BODY_MAX: usize = 256 * 1024;

/// A policy and the metric handles of its signers (same order), made once
/// per load so signing counts with an atomic add.
pub struct DkimState {
    pub policy: DkimPolicy,
    signed: Vec<Counter>,
    failed: Vec<Counter>,
    seconds: Vec<Histogram>,
}

impl DkimState {
    pub fn new(policy: DkimPolicy) -> DkimState {
        let label = |a: SigningAlgorithm| match a {
            SigningAlgorithm::RsaSha256 => "rsa-sha256",
            SigningAlgorithm::Ed25519Sha256 => "ed25519-sha256",
        };
        let signers = policy.signers();
        DkimState {
            signed: signers
                .iter()
                .map(|s| counter!("sluice_dkim_signatures_total", "signer" => s.name.clone()))
                .collect(),
            failed: signers
                .iter()
                .map(|s| counter!("sluice_dkim_signing_failures_total", "signer" => s.name.clone()))
                .collect(),
            seconds: signers
                .iter()
                .map(|s| histogram!("sluice_dkim_signing_seconds", "algorithm" => label(s.algorithm)))
                .collect(),
            policy,
        }
    }

    /// Signs `body` with `chosen`: the header fields to store before it.
    fn sign(&self, chosen: &[usize], body: &[u8]) -> Result<Vec<u8>, DkimError> {
        let result = self.policy.sign(chosen, body, |i, took| {
            if let (Some(c), Some(h)) = (self.signed.get(i), self.seconds.get(i)) {
                c.increment(1);
                h.record(took.as_secs_f64());
            }
        });
        if let Err(DkimError::Sign { signer, .. }) = &result {
            let at = self.policy.signers().iter().position(|s| &s.name == signer);
            if let Some(c) = at.and_then(|i| self.failed.get(i)) {
                c.increment(1);
            }
        }
        result
    }
}

/// The running policy, replaced by a reload.
pub type DkimSwap = Arc<ArcSwap<DkimState>>;

/// What the `[[dkim.rule]]` conditions see of a message.
pub fn facts(envelope: &Envelope) -> MessageFacts<'_> {
    MessageFacts {
        listener: &envelope.listener,
        client_ip: envelope.client_ip,
        auth_user: envelope.auth_user.as_deref(),
        sender: &envelope.sender,
        priority: envelope.priority,
        size: envelope.size,
    }
}

/// The signer whose key ARC-seals a message: the listener's
/// `verify.arc_seal` when it names one, else the first matching
/// `[[dkim.rule]]`'s `arc_seal`.
pub fn arc_sealer<'a>(
    state: &'a DkimState,
    listener_choice: Option<&str>,
    envelope: &Envelope,
) -> Option<&'a sluice_policy::dkim::Signer> {
    match listener_choice {
        Some(name) => state.policy.signers().iter().find(|s| s.name == name),
        None => state.policy.select_seal(&facts(envelope), &envelope.queue),
    }
}

/// What signing a message gave.
pub struct Signed {
    /// `DKIM-Signature:` fields to store before the body (empty: unsigned).
    pub prefix: Vec<u8>,
    /// The signers, comma-separated, for the log ("" when unsigned).
    pub signers: String,
}

/// Signs a message about to be stored, if a rule asks. RSA (about a
/// millisecond of CPU per signature) and large bodies go to the executor's
/// blocking pool, moving the body there and back rather than copying it;
/// Ed25519 on a small body stays on the executor.
pub async fn sign(
    dkim: &DkimSwap,
    envelope: &Envelope,
    body: Vec<u8>,
) -> (Vec<u8>, Result<Signed, DkimError>) {
    let state = dkim.load_full();
    let facts = facts(envelope);
    let chosen = state.policy.select(&facts, &envelope.queue);
    if chosen.is_empty() {
        return (
            body,
            Ok(Signed {
                prefix: Vec::new(),
                signers: String::new(),
            }),
        );
    }
    let signers = state.policy.names(chosen);
    if !state.policy.any_rsa(chosen) && body.len() <= INLINE_BODY_MAX {
        let result = state.sign(chosen, &body);
        return (body, result.map(|prefix| Signed { prefix, signers }));
    }
    let chosen = chosen.to_vec();
    let (body, result) = glommio::executor()
        .spawn_blocking(move || {
            let result = state.sign(&chosen, &body);
            (body, result)
        })
        .await;
    (body, result.map(|prefix| Signed { prefix, signers }))
}
