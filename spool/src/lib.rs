//! Durable message spool for sluice on LMDB.
//!
//! One LMDB environment per core shard, each with a dedicated writer thread that
//! group-commits all queued requests in one transaction (and one fsync). Executor
//! threads never block: they hand requests to the writer over a channel and await
//! a oneshot that resolves only after the commit returned.

mod bans;
mod envelope;
mod error;
mod events;
mod id;
mod records;
mod replica;
mod reply;
mod space;
mod spool;
mod suppression;
mod table;
mod writer;

pub use bans::{BanStore, StoredBan, BANS_DIR};
pub use envelope::{
    BodyType, DeliverBy, DeliverByMode, Envelope, HeaderFacts, NoticeLimit, Notify, Recipient,
    RecipientStatus, Ret, Schedule, TlsRequest,
};
pub use error::SpoolError;
pub use events::{Batch as EventBatch, EventStore, EVENTS_DIR};
pub use id::{IdGenerator, MessageId, MAX_SHARDS};
pub use records::RecordTable;
pub use replica::{Committed, Replicator, StoreReply, StoredMessage};
pub use reply::{EnhancedStatus, Reply};
pub use spool::{RecoveryReport, Spool, SpoolConfig, SpoolStats};
pub use suppression::{StoredSuppression, SuppressionRow, SuppressionStore, SUPPRESSION_DIR};
pub use table::{Entries, Table};

#[cfg(test)]
mod tests;
