use crate::MessageId;

/// Everything that can go wrong in the spool. `Clone` so one failure can be
/// handed to every request of a batch.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum SpoolError {
    /// The map (or the disk) is full. Transient: the engine replies 452 4.3.1.
    #[error("spool full")]
    Full,
    /// A storage error failed the spool closed; nothing is written any more.
    #[error("spool failed: {0}")]
    Failed(String),
    /// The writer is gone or shutting down.
    #[error("spool closed")]
    Closed,
    #[error("message {0} not found")]
    NotFound(MessageId),
    /// Stored bytes that do not decode.
    #[error("corrupt spool record: {0}")]
    Corrupt(String),
    #[error("bad message id: {0}")]
    BadId(String),
    /// A store whose id is already in the spool (the id generator was misused).
    #[error("message {0} already stored")]
    Duplicate(MessageId),
    /// The shard number is outside this spool.
    #[error("no such shard {0}")]
    NoShard(u16),
    /// Writes on a spool opened with `open_readonly`.
    #[error("spool is open read-only")]
    ReadOnly,
    /// Opening the spool (directories, environments).
    #[error("spool open: {0}")]
    Io(String),
    /// Cluster mode: the batch could not be written to the cluster engine
    /// (or this node is fenced); the message was not kept (451 4.3.0).
    #[error("not replicated: {0}")]
    Replication(String),
    /// An envelope that cannot be encoded (should not happen).
    #[error("envelope encode: {0}")]
    Encode(String),
}

impl SpoolError {
    /// True for the transient "no space" case (reply 452 4.3.1, keep going).
    pub fn is_full(&self) -> bool {
        matches!(self, SpoolError::Full)
    }
}
