//! The hook cluster mode uses to copy committed writes elsewhere (a replica
//! log). Without one, the writer answers its callers itself, as it always
//! has; with one, a stored message's caller is answered by the replicator
//! once its copy is durable there too.

use futures_channel::oneshot;

use crate::{MessageId, SpoolError};

/// Answers the caller that stored a message (its session waits for it).
pub struct StoreReply(pub(crate) oneshot::Sender<Result<(), SpoolError>>);

impl StoreReply {
    pub fn send(self, result: Result<(), SpoolError>) {
        // The caller may have gone (connection closed): nothing to tell.
        let _ = self.0.send(result);
    }
}

impl std::fmt::Debug for StoreReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreReply")
    }
}

/// A message committed to LMDB whose caller has not been answered yet.
#[derive(Debug)]
pub struct StoredMessage {
    pub id: MessageId,
    /// The envelope as stored ([`crate::Envelope::decode`] reads it).
    pub envelope: Vec<u8>,
    /// Stored before `body` in the same value (header fields added at
    /// acceptance); the replica keeps `prefix` + `body` as one body.
    pub prefix: Vec<u8>,
    pub body: Vec<u8>,
    pub reply: StoreReply,
}

/// What one group commit changed, for the replicator.
#[derive(Debug, Default)]
pub struct Committed {
    pub shard: u16,
    /// Their callers wait for [`StoredMessage::reply`].
    pub stores: Vec<StoredMessage>,
    /// Envelope replacements (already answered).
    pub updates: Vec<(MessageId, Vec<u8>)>,
    /// Removals (already answered).
    pub removes: Vec<MessageId>,
}

impl Committed {
    pub fn is_empty(&self) -> bool {
        self.stores.is_empty() && self.updates.is_empty() && self.removes.is_empty()
    }
}

/// Receives every committed batch of every shard, on the writer threads.
/// It must not block for long: hand the batch to another thread.
pub trait Replicator: Send + Sync {
    fn committed(&self, batch: Committed);
}
