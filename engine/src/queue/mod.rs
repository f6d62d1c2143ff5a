//! The queue: the one way a message enters (and is counted in) the spool.
//!
//! * `admission.rs` — which virtual queue a message belongs to and its quota
//!   (`[queue.X] max_messages`, `max_bytes`), checked by the SMTP session, and
//!   the per-core counters behind it.
//! * [`CoreQueue::enqueue`] (this file) — store in the spool, count in the
//!   quota, hand to delivery. SMTP (`conn.rs`) and notices
//!   (`delivery/notices.rs`) both come in here.
//! * `recovery.rs` — at start, one walk of each shard counts what is queued
//!   and hands each message to the scheduler.
//! * `dsn.rs` — building delivery status notifications (RFC 3461/3464/6533).
//! * `dkim.rs` — DKIM signing at acceptance, before the store (the
//!   `[dkim]` rules choose the signers; notices are matched like any message).
//!
//! The inbound side knows only this module; delivery registers itself as the
//! [`Handoff`] of its core.

pub mod admission;
pub mod dkim;
pub mod dsn;
pub mod recovery;

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use sluice_spool::{Envelope, MessageId, Spool, SpoolError};

use self::admission::QueueStats;

/// Takes a message that was just stored on this core (its shard).
pub trait Handoff {
    fn accepted(&self, id: MessageId, envelope: Envelope);
}

/// This core's way into the queue.
pub struct CoreQueue {
    core: u16,
    spool: Arc<Spool>,
    stats: Arc<QueueStats>,
    /// Delivery on this core, when enabled (weak: delivery holds the queue).
    handoff: RefCell<Option<Weak<dyn Handoff>>>,
    /// DKIM signing; None signs nothing.
    dkim: Option<dkim::DkimSwap>,
}

/// Why a message was not queued.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// A rule asked for a signature that could not be made: the message is
    /// refused (451 4.3.0) rather than sent unsigned.
    #[error("{0}")]
    Signing(#[from] sluice_policy::dkim::DkimError),
}

impl EnqueueError {
    /// The transient "no space" case (452 4.3.1).
    pub fn is_full(&self) -> bool {
        matches!(self, EnqueueError::Spool(e) if e.is_full())
    }
}

impl CoreQueue {
    pub fn new(core: u16, spool: Arc<Spool>, stats: Arc<QueueStats>) -> CoreQueue {
        CoreQueue {
            core,
            spool,
            stats,
            handoff: RefCell::new(None),
            dkim: None,
        }
    }

    /// Signs what the `[dkim]` rules ask for before it is stored.
    pub fn with_dkim(mut self, dkim: dkim::DkimSwap) -> CoreQueue {
        self.dkim = Some(dkim);
        self
    }

    /// The DKIM signers (ARC sealing borrows their keys).
    pub fn dkim(&self) -> Option<&dkim::DkimSwap> {
        self.dkim.as_ref()
    }

    /// Delivery takes what is stored from now on.
    pub fn set_handoff(&self, handoff: Weak<dyn Handoff>) {
        *self.handoff.borrow_mut() = Some(handoff);
    }

    pub fn core(&self) -> u16 {
        self.core
    }

    pub fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }

    pub fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }

    /// Signs the message when a `[[dkim.rule]]` says so, stores it in this
    /// core's shard (group-committed with other sessions' messages) with the
    /// signatures before it, and once it is durable counts it in its queue
    /// and hands it to delivery. Ok: the signers that signed, comma-separated
    /// ("" for none).
    pub async fn enqueue(
        &self,
        id: MessageId,
        envelope: Envelope,
        body: Vec<u8>,
    ) -> Result<String, EnqueueError> {
        self.enqueue_with(id, envelope, Vec::new(), body).await
    }

    /// [`CoreQueue::enqueue`] with header fields the receiving side adds
    /// (Authentication-Results, an ARC set): stored after our DKIM
    /// signatures and before the body, outside what is signed (the signature
    /// covers the message as the client sent it plus our Received).
    pub async fn enqueue_with(
        &self,
        id: MessageId,
        mut envelope: Envelope,
        added: Vec<u8>,
        body: Vec<u8>,
    ) -> Result<String, EnqueueError> {
        // Events on: the header facts every event of the message carries,
        // stored in its envelope.
        envelope.header_facts = crate::events::reception_meta(&body).map(std::sync::Arc::new);
        let (body, signed) = self.sign(&envelope, body).await;
        let signed = signed.inspect_err(|e| {
            tracing::warn!(target: "sluice::dkim", id = %id, error = %e, "signing failed: message refused");
        })?;
        let mut prefix = signed.prefix;
        prefix.extend_from_slice(&added);
        envelope.size += prefix.len() as u64;
        self.store_prefixed(id, &envelope, prefix, body).await?;
        if crate::events::enabled() {
            crate::events::emit(crate::events::reception(id, &envelope));
        }
        self.admitted(id, envelope);
        Ok(signed.signers)
    }

    /// The DKIM step alone (notices sign once, then retry the store). The
    /// body comes back whatever the outcome.
    pub async fn sign(
        &self,
        envelope: &Envelope,
        body: Vec<u8>,
    ) -> (
        Vec<u8>,
        Result<dkim::Signed, sluice_policy::dkim::DkimError>,
    ) {
        match &self.dkim {
            Some(d) => dkim::sign(d, envelope, body).await,
            None => (
                body,
                Ok(dkim::Signed {
                    prefix: Vec::new(),
                    signers: String::new(),
                }),
            ),
        }
    }

    /// The spool write of `prefix` (header fields) then `body`, without
    /// joining them; follow a success with [`CoreQueue::admitted`].
    pub async fn store_prefixed(
        &self,
        id: MessageId,
        envelope: &Envelope,
        prefix: Vec<u8>,
        body: Vec<u8>,
    ) -> Result<(), SpoolError> {
        self.spool
            .store_prefixed(self.core, id, envelope, prefix, body)
            .await
    }

    /// The spool write alone, for callers that retry it (a notice waits out a
    /// full spool); follow a success with [`CoreQueue::admitted`].
    pub async fn store(
        &self,
        id: MessageId,
        envelope: &Envelope,
        body: Vec<u8>,
    ) -> Result<(), SpoolError> {
        self.spool.store(self.core, id, envelope, body).await
    }

    /// A stored message is counted and handed to delivery.
    pub fn admitted(&self, id: MessageId, envelope: Envelope) {
        self.stats
            .add(usize::from(self.core), &envelope.queue, envelope.size);
        let handoff = self.handoff.borrow().as_ref().and_then(Weak::upgrade);
        if let Some(h) = handoff {
            h.accepted(id, envelope);
        }
    }

    /// A message left the spool.
    pub fn removed(&self, envelope: &Envelope) {
        self.stats
            .remove(usize::from(self.core), &envelope.queue, envelope.size);
    }
}

impl std::fmt::Debug for CoreQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreQueue")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

/// Keeps `Rc` in the signature simple for callers holding an `Rc<T>`.
pub fn weak_handoff<T: Handoff + 'static>(h: &Rc<T>) -> Weak<dyn Handoff> {
    let weak: Weak<T> = Rc::downgrade(h);
    weak
}
