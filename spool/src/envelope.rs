use serde::{Deserialize, Serialize};

use crate::{MessageId, SpoolError};

/// Leading byte of every stored envelope, so the format can change later.
const ENVELOPE_VERSION: u8 = 2;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// "" = null reverse-path.
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// DSN RET.
    pub ret: Option<Ret>,
    /// DSN ENVID (xtext-decoded).
    pub envid: Option<String>,
    pub body_type: BodyType,
    pub smtputf8: bool,
    pub arrival_unix_ms: u64,
    pub listener: String,
    pub client_ip: String,
    pub helo: String,
    pub auth_user: Option<String>,
    /// e.g. "TLSv1.3 TLS13_AES_256_GCM_SHA384".
    pub tls: Option<String>,
    /// Body bytes stored (incl. Received header).
    pub size: u64,
    /// MT-PRIORITY, default 0.
    pub priority: i16,
    /// Virtual queue name.
    pub queue: String,
    /// FUTURERELEASE, 0 = none.
    pub hold_until_unix: u64,
    /// Delivery bookkeeping, persisted with each attempt's outcome.
    pub schedule: Schedule,
}

/// When the message is next due and how it has fared so far. Recipients still
/// `Pending` or `Deferred` are tried together at `next_attempt_unix_ms`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// Delivery attempts made (for the retry schedule and the log).
    pub attempts: u32,
    /// Unix ms of the next attempt; 0 = as soon as possible.
    pub next_attempt_unix_ms: u64,
    /// Delay notices already sent (index into the queue's notify schedule).
    pub delay_notices: u8,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: String,
    pub orcpt: Option<String>,
    pub notify: Notify,
    pub status: RecipientStatus,
    pub local: bool,
}

/// DSN NOTIFY as a bitset; empty (the default) means "not given".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Notify(pub u8);

impl Notify {
    pub const SUCCESS: Notify = Notify(1);
    pub const FAILURE: Notify = Notify(2);
    pub const DELAY: Notify = Notify(4);
    pub const NEVER: Notify = Notify(8);

    pub fn contains(self, other: Notify) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for Notify {
    type Output = Notify;
    fn bitor(self, rhs: Notify) -> Notify {
        Notify(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Notify {
    fn bitor_assign(&mut self, rhs: Notify) {
        self.0 |= rhs.0;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Ret {
    Full,
    Headers,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BodyType {
    SevenBit,
    EightBitMime,
    BinaryMime,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecipientStatus {
    Pending,
    Delivered { reply: String },
    Deferred { reply: String, attempts: u32 },
    Failed { reply: String },
}

impl Envelope {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, SpoolError> {
        postcard::to_extend(self, vec![ENVELOPE_VERSION])
            .map_err(|e| SpoolError::Encode(e.to_string()))
    }

    pub(crate) fn decode(id: MessageId, bytes: &[u8]) -> Result<Envelope, SpoolError> {
        match bytes.split_first() {
            Some((&ENVELOPE_VERSION, rest)) => postcard::from_bytes(rest)
                .map_err(|e| SpoolError::Corrupt(format!("envelope {id}: {e}"))),
            Some((v, _)) => Err(SpoolError::Corrupt(format!(
                "envelope {id}: unknown version {v}"
            ))),
            None => Err(SpoolError::Corrupt(format!("envelope {id}: empty"))),
        }
    }
}
