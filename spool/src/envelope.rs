use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{MessageId, Reply, SpoolError};

/// Leading byte of every stored envelope, so the format can change later.
/// 3 added `deliver_by` and `Schedule::deliver_by_notified`; version 2 envelopes
/// (written by earlier releases) still decode, with those fields empty.
/// 4 appends an extension record ([`Extension`]) after the version 3 layout, so
/// fields added since are optional for readers of the version 3 part; version 3
/// envelopes decode with the extension's defaults.
/// 5 appends a second record ([`Extension5`]) after version 4's; version 4
/// envelopes decode with its defaults.
/// 6 stores recipient replies typed ([`Reply`]: code, enhanced status, text)
/// instead of reply lines, followed by both extension records; version 5 and
/// older envelopes decode with their lines read into that type.
/// 7 stores the client address typed (`Option<IpAddr>`, none for notices the
/// relay wrote) instead of as text; older envelopes decode with the text
/// parsed, an empty or unreadable one as none.
/// 8 appends a third record ([`Extension8`]: the sender's transport security
/// request, RFC 8689) after version 7's; version 7 envelopes decode with its
/// default.
/// 9 appends a fourth record ([`Extension9`]: the tenant the message counts
/// for) after version 8's; version 8 envelopes decode with no tenant.
/// 10 appends a fifth record ([`Extension10`]: the header facts delivery
/// events carry) after version 9's; version 9 envelopes decode with none.
const ENVELOPE_VERSION: u8 = 10;
const ENVELOPE_V9: u8 = 9;
const ENVELOPE_V8: u8 = 8;
const ENVELOPE_V7: u8 = 7;
const ENVELOPE_V6: u8 = 6;
const ENVELOPE_V5: u8 = 5;
const ENVELOPE_V4: u8 = 4;
const ENVELOPE_V3: u8 = 3;
const ENVELOPE_V2: u8 = 2;

/// Fields stored after the version 3 layout (version 4 on).
#[derive(Default, Serialize, Deserialize)]
struct Extension {
    held: bool,
}

/// Fields stored after version 4's extension record (version 5 on).
#[derive(Default, Serialize, Deserialize)]
struct Extension5 {
    notices: NoticeLimit,
}

/// Fields stored after version 5's extension record (version 8 on).
#[derive(Default, Serialize, Deserialize)]
struct Extension8 {
    tls_request: TlsRequest,
}

/// Fields stored after version 8's extension record (version 9 on).
#[derive(Default, Serialize, Deserialize)]
struct Extension9 {
    tenant: Option<String>,
}

/// [`Extension9`] written from a borrowed envelope (no copy of the tenant).
#[derive(Serialize)]
struct Extension9Ref<'a> {
    tenant: Option<&'a str>,
}

/// Fields stored after version 9's extension record (version 10 on).
#[derive(Default, Serialize, Deserialize)]
struct Extension10 {
    header_facts: Option<HeaderFacts>,
}

/// The same record written from a borrowed envelope (postcard encodes an
/// `Option<&T>` as it encodes an `Option<T>`).
#[derive(Serialize)]
struct Extension10Ref<'a> {
    header_facts: Option<&'a HeaderFacts>,
}

/// What reception read from the message's header for its delivery events
/// (only when events are on): every later event of the message carries it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderFacts {
    /// The Message-ID field, as written.
    pub message_id: Option<String>,
    /// The raw value of `[events] tenant_header` (used when the message
    /// counted for no `[tenant.NAME]`).
    pub tenant: Option<String>,
    /// The raw value of `[events] campaign_header`.
    pub campaign: Option<String>,
}

/// What the sender asked of the transport security of the message's onward
/// relay (RFC 8689), decided when it is received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TlsRequest {
    /// Nothing asked: the destination's TLS policy applies. Messages stored
    /// before version 8 decode as this.
    #[default]
    Policy,
    /// `REQUIRETLS` on MAIL FROM: only over verified TLS, to a next hop that
    /// offers REQUIRETLS itself.
    RequireTls,
    /// A `TLS-Required: No` header field, honoured by the listener
    /// (`honor_tls_required_no`): the destination's policy is relaxed to
    /// opportunistic TLS.
    Optional,
}

/// What success and delay notices about a message may carry, decided when it
/// is received: a client that is not trusted can forge the sender and turn
/// them into a reflector. Failure notices are never limited by this.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NoticeLimit {
    /// As the client asked (RET decides what is returned). Messages stored
    /// before version 5 decode as this.
    #[default]
    Unlimited,
    /// The original's header block only, whatever RET says.
    HeadersOnly,
    /// No success or delay notices.
    FailuresOnly,
}

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
    /// The connecting client (after PROXY); none for messages the relay
    /// wrote itself (delivery status notifications).
    pub client_ip: Option<IpAddr>,
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
    /// FUTURERELEASE (RFC 4865): unix seconds before which no attempt is made;
    /// 0 = none. HOLDFOR is stored converted to this absolute time.
    pub hold_until_unix: u64,
    /// DELIVERBY (RFC 2852), when the client asked for it.
    pub deliver_by: Option<DeliverBy>,
    /// Delivery bookkeeping, persisted with each attempt's outcome.
    pub schedule: Schedule,
    /// REQUIRETLS or `TLS-Required: No` (RFC 8689). Stored in the version 8
    /// extension record, not in the version 7 layout.
    #[serde(skip)]
    pub tls_request: TlsRequest,
    /// The `[tenant.NAME]` the message counted for at reception (from its
    /// header, rules or AUTH), so delivery shares and counts it the same
    /// way. Stored in the version 9 extension record; older envelopes have
    /// none.
    #[serde(skip)]
    pub tenant: Option<String>,
    /// Header facts for delivery events (none when events are off). Stored
    /// in the version 10 extension record; shared, not copied, by the jobs
    /// of an attempt.
    #[serde(skip)]
    pub header_facts: Option<Arc<HeaderFacts>>,
}

/// A DELIVERBY request: what to do when the deadline passes undelivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverBy {
    /// Unix ms by which the message should be delivered (arrival + by-time).
    pub deadline_unix_ms: u64,
    /// The by-time as the client gave it (seconds, may be negative in N mode).
    pub by_secs: i64,
    pub mode: DeliverByMode,
    /// The T (trace) flag.
    pub trace: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeliverByMode {
    /// R: return the message (fail it, DSN 5.4.7) when the deadline passes.
    Return,
    /// N: send a delay notice when the deadline passes and keep trying.
    Notify,
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
    /// The DELIVERBY (N mode) delay notice was sent.
    pub deliver_by_notified: bool,
    /// Put on hold by the operator: no attempt until released. Stored in the
    /// version 4 extension record, not in the version 3 layout.
    #[serde(skip)]
    pub held: bool,
    /// Limit on success and delay notices. Stored in the version 5 extension
    /// record, not in the version 3 layout.
    #[serde(skip)]
    pub notices: NoticeLimit,
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
    Delivered { reply: Reply },
    Deferred { reply: Reply, attempts: u32 },
    Failed { reply: Reply },
}

impl Envelope {
    /// The stored form (what the spool writes and a cluster engine copies).
    pub fn encode(&self) -> Result<Vec<u8>, SpoolError> {
        self.encode_as(ENVELOPE_VERSION)
    }

    /// The layout and the extension records of version `v` (7 or later):
    /// the writing side of [`with_records`]; tests write older versions
    /// with it.
    fn encode_as(&self, v: u8) -> Result<Vec<u8>, SpoolError> {
        let enc = |e: postcard::Error| SpoolError::Encode(e.to_string());
        let mut out = postcard::to_extend(self, vec![v]).map_err(enc)?;
        let ext = Extension {
            held: self.schedule.held,
        };
        out = postcard::to_extend(&ext, out).map_err(enc)?;
        let ext5 = Extension5 {
            notices: self.schedule.notices,
        };
        out = postcard::to_extend(&ext5, out).map_err(enc)?;
        if v >= ENVELOPE_V8 {
            let ext8 = Extension8 {
                tls_request: self.tls_request,
            };
            out = postcard::to_extend(&ext8, out).map_err(enc)?;
        }
        if v >= ENVELOPE_V9 {
            let ext9 = Extension9Ref {
                tenant: self.tenant.as_deref(),
            };
            out = postcard::to_extend(&ext9, out).map_err(enc)?;
        }
        if v >= ENVELOPE_VERSION {
            let ext10 = Extension10Ref {
                header_facts: self.header_facts.as_deref(),
            };
            out = postcard::to_extend(&ext10, out).map_err(enc)?;
        }
        Ok(out)
    }

    /// Decodes an envelope as stored (`id` names it in errors only).
    pub fn decode(id: MessageId, bytes: &[u8]) -> Result<Envelope, SpoolError> {
        let corrupt = |e: postcard::Error| SpoolError::Corrupt(format!("envelope {id}: {e}"));
        match bytes.split_first() {
            // Versions 7 on share the layout and differ only in how many
            // extension records follow it.
            Some((&v @ ENVELOPE_V7..=ENVELOPE_VERSION, rest)) => {
                let (env, records) =
                    postcard::take_from_bytes::<Envelope>(rest).map_err(corrupt)?;
                with_records(env, records, v).map_err(corrupt)
            }
            Some((&ENVELOPE_V6, rest)) => {
                let (env, ext) =
                    postcard::take_from_bytes::<v4::Envelope<Recipient>>(rest).map_err(corrupt)?;
                let (ext, ext5) = postcard::take_from_bytes::<Extension>(ext).map_err(corrupt)?;
                let ext5: Extension5 = postcard::from_bytes(ext5).map_err(corrupt)?;
                let mut env = Envelope::from(env);
                env.schedule.held = ext.held;
                env.schedule.notices = ext5.notices;
                Ok(env)
            }
            Some((&ENVELOPE_V5, rest)) => {
                let (env, ext) =
                    postcard::take_from_bytes::<v4::Envelope>(rest).map_err(corrupt)?;
                let (ext, ext5) = postcard::take_from_bytes::<Extension>(ext).map_err(corrupt)?;
                let ext5: Extension5 = postcard::from_bytes(ext5).map_err(corrupt)?;
                let mut env = Envelope::from(env);
                env.schedule.held = ext.held;
                env.schedule.notices = ext5.notices;
                Ok(env)
            }
            Some((&ENVELOPE_V4, rest)) => {
                let (env, ext) =
                    postcard::take_from_bytes::<v4::Envelope>(rest).map_err(corrupt)?;
                let ext: Extension = postcard::from_bytes(ext).map_err(corrupt)?;
                let mut env = Envelope::from(env);
                env.schedule.held = ext.held;
                Ok(env)
            }
            Some((&ENVELOPE_V3, rest)) => postcard::from_bytes::<v4::Envelope>(rest)
                .map(Envelope::from)
                .map_err(corrupt),
            Some((&ENVELOPE_V2, rest)) => postcard::from_bytes::<v2::Envelope>(rest)
                .map(|e| Envelope::from(v4::Envelope::from(e)))
                .map_err(corrupt),
            Some((v, _)) => Err(SpoolError::Corrupt(format!(
                "envelope {id}: unknown version {v}"
            ))),
            None => Err(SpoolError::Corrupt(format!("envelope {id}: empty"))),
        }
    }
}

/// Reads the extension records a version `v` (7 or later) envelope carries
/// after its layout into `env`: held and notices (7), the TLS request (8),
/// the tenant (9), the header facts (10).
fn with_records(mut env: Envelope, bytes: &[u8], v: u8) -> Result<Envelope, postcard::Error> {
    let (ext, rest) = postcard::take_from_bytes::<Extension>(bytes)?;
    let (ext5, mut rest) = postcard::take_from_bytes::<Extension5>(rest)?;
    env.schedule.held = ext.held;
    env.schedule.notices = ext5.notices;
    if v >= ENVELOPE_V8 {
        let (ext8, r) = postcard::take_from_bytes::<Extension8>(rest)?;
        env.tls_request = ext8.tls_request;
        rest = r;
    }
    if v >= ENVELOPE_V9 {
        let (ext9, r) = postcard::take_from_bytes::<Extension9>(rest)?;
        env.tenant = ext9.tenant;
        rest = r;
    }
    if v >= ENVELOPE_VERSION {
        let (ext10, _) = postcard::take_from_bytes::<Extension10>(rest)?;
        env.header_facts = ext10.header_facts.map(Arc::new);
    }
    Ok(env)
}

/// The version 3–6 layout (the client address as text), decoded and converted.
/// Versions 3–5 hold reply lines ([`Recipient`] here), each read into a
/// [`Reply`] once, here; version 6 holds typed replies (`super::Recipient`).
mod v4 {
    use serde::{Deserialize, Serialize};

    use super::{BodyType, DeliverBy, Notify, Ret, Schedule};
    use crate::Reply;

    #[derive(Serialize, Deserialize)]
    pub(super) struct Envelope<R = Recipient> {
        pub sender: String,
        pub recipients: Vec<R>,
        pub ret: Option<Ret>,
        pub envid: Option<String>,
        pub body_type: BodyType,
        pub smtputf8: bool,
        pub arrival_unix_ms: u64,
        pub listener: String,
        pub client_ip: String,
        pub helo: String,
        pub auth_user: Option<String>,
        pub tls: Option<String>,
        pub size: u64,
        pub priority: i16,
        pub queue: String,
        pub hold_until_unix: u64,
        pub deliver_by: Option<DeliverBy>,
        pub schedule: Schedule,
    }

    #[derive(Serialize, Deserialize)]
    pub(super) struct Recipient {
        pub address: String,
        pub orcpt: Option<String>,
        pub notify: Notify,
        pub status: RecipientStatus,
        pub local: bool,
    }

    #[derive(Serialize, Deserialize)]
    pub(super) enum RecipientStatus {
        Pending,
        Delivered { reply: String },
        Deferred { reply: String, attempts: u32 },
        Failed { reply: String },
    }

    impl From<RecipientStatus> for super::RecipientStatus {
        fn from(s: RecipientStatus) -> super::RecipientStatus {
            use super::RecipientStatus as New;
            match s {
                RecipientStatus::Pending => New::Pending,
                RecipientStatus::Delivered { reply } => New::Delivered {
                    reply: Reply::parse(&reply),
                },
                RecipientStatus::Deferred { reply, attempts } => New::Deferred {
                    reply: Reply::parse(&reply),
                    attempts,
                },
                RecipientStatus::Failed { reply } => New::Failed {
                    reply: Reply::parse(&reply),
                },
            }
        }
    }

    impl From<Recipient> for super::Recipient {
        fn from(r: Recipient) -> super::Recipient {
            super::Recipient {
                address: r.address,
                orcpt: r.orcpt,
                notify: r.notify,
                status: r.status.into(),
                local: r.local,
            }
        }
    }

    impl<R: Into<super::Recipient>> From<Envelope<R>> for super::Envelope {
        fn from(e: Envelope<R>) -> super::Envelope {
            super::Envelope {
                sender: e.sender,
                recipients: e.recipients.into_iter().map(Into::into).collect(),
                ret: e.ret,
                envid: e.envid,
                body_type: e.body_type,
                smtputf8: e.smtputf8,
                arrival_unix_ms: e.arrival_unix_ms,
                listener: e.listener,
                client_ip: e.client_ip.parse().ok(),
                helo: e.helo,
                auth_user: e.auth_user,
                tls: e.tls,
                size: e.size,
                priority: e.priority,
                queue: e.queue,
                hold_until_unix: e.hold_until_unix,
                deliver_by: e.deliver_by,
                schedule: e.schedule,
                tls_request: super::TlsRequest::Policy,
                tenant: None,
                header_facts: None,
            }
        }
    }

    /// For tests: a recipient in the version 3–5 form (reply lines).
    #[cfg(test)]
    impl From<&super::Recipient> for Recipient {
        fn from(r: &super::Recipient) -> Recipient {
            use super::RecipientStatus as New;
            Recipient {
                address: r.address.clone(),
                orcpt: r.orcpt.clone(),
                notify: r.notify,
                status: match &r.status {
                    New::Pending => RecipientStatus::Pending,
                    New::Delivered { reply } => RecipientStatus::Delivered {
                        reply: reply.to_string(),
                    },
                    New::Deferred { reply, attempts } => RecipientStatus::Deferred {
                        reply: reply.to_string(),
                        attempts: *attempts,
                    },
                    New::Failed { reply } => RecipientStatus::Failed {
                        reply: reply.to_string(),
                    },
                },
                local: r.local,
            }
        }
    }

    /// For tests: a recipient in the version 6 form (typed replies).
    #[cfg(test)]
    impl From<&super::Recipient> for super::Recipient {
        fn from(r: &super::Recipient) -> super::Recipient {
            r.clone()
        }
    }

    /// For tests: the old layout of a current envelope, with recipients in
    /// the form of version 3–5 (`R = Recipient`) or 6 (`R = super::Recipient`).
    #[cfg(test)]
    impl<R: for<'a> From<&'a super::Recipient>> From<&super::Envelope> for Envelope<R> {
        fn from(e: &super::Envelope) -> Envelope<R> {
            Envelope {
                sender: e.sender.clone(),
                recipients: e.recipients.iter().map(R::from).collect(),
                ret: e.ret,
                envid: e.envid.clone(),
                body_type: e.body_type,
                smtputf8: e.smtputf8,
                arrival_unix_ms: e.arrival_unix_ms,
                listener: e.listener.clone(),
                client_ip: e.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                helo: e.helo.clone(),
                auth_user: e.auth_user.clone(),
                tls: e.tls.clone(),
                size: e.size,
                priority: e.priority,
                queue: e.queue.clone(),
                hold_until_unix: e.hold_until_unix,
                deliver_by: e.deliver_by,
                schedule: e.schedule.clone(),
            }
        }
    }
}

/// The version 2 layout, decoded and converted so spools written before version 3
/// keep working. Postcard is not self-describing: the field order is the format.
mod v2 {
    use serde::Deserialize;

    use super::v4::Recipient;
    use super::{BodyType, Ret};

    #[derive(Deserialize)]
    pub(super) struct Envelope {
        sender: String,
        recipients: Vec<Recipient>,
        ret: Option<Ret>,
        envid: Option<String>,
        body_type: BodyType,
        smtputf8: bool,
        arrival_unix_ms: u64,
        listener: String,
        client_ip: String,
        helo: String,
        auth_user: Option<String>,
        tls: Option<String>,
        size: u64,
        priority: i16,
        queue: String,
        hold_until_unix: u64,
        schedule: Schedule,
    }

    #[derive(Deserialize)]
    struct Schedule {
        attempts: u32,
        next_attempt_unix_ms: u64,
        delay_notices: u8,
    }

    impl From<Envelope> for super::v4::Envelope {
        fn from(e: Envelope) -> super::v4::Envelope {
            super::v4::Envelope {
                sender: e.sender,
                recipients: e.recipients,
                ret: e.ret,
                envid: e.envid,
                body_type: e.body_type,
                smtputf8: e.smtputf8,
                arrival_unix_ms: e.arrival_unix_ms,
                listener: e.listener,
                client_ip: e.client_ip,
                helo: e.helo,
                auth_user: e.auth_user,
                tls: e.tls,
                size: e.size,
                priority: e.priority,
                queue: e.queue,
                hold_until_unix: e.hold_until_unix,
                deliver_by: None,
                schedule: super::Schedule {
                    attempts: e.schedule.attempts,
                    next_attempt_unix_ms: e.schedule.next_attempt_unix_ms,
                    delay_notices: e.schedule.delay_notices,
                    deliver_by_notified: false,
                    held: false,
                    notices: super::NoticeLimit::Unlimited,
                },
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use serde::Serialize;

        use super::super::*;

        /// The version 2 layout as written by earlier releases.
        #[derive(Serialize)]
        struct OldEnvelope<'a> {
            sender: &'a str,
            recipients: Vec<super::super::v4::Recipient>,
            ret: Option<Ret>,
            envid: Option<&'a str>,
            body_type: BodyType,
            smtputf8: bool,
            arrival_unix_ms: u64,
            listener: &'a str,
            client_ip: &'a str,
            helo: &'a str,
            auth_user: Option<&'a str>,
            tls: Option<&'a str>,
            size: u64,
            priority: i16,
            queue: &'a str,
            hold_until_unix: u64,
            schedule: (u32, u64, u8),
        }

        #[test]
        fn version_2_envelopes_still_decode() {
            let old = OldEnvelope {
                sender: "a@example.org",
                recipients: vec![super::super::v4::Recipient {
                    address: "b@example.net".into(),
                    orcpt: None,
                    notify: Notify::SUCCESS,
                    status: super::super::v4::RecipientStatus::Deferred {
                        reply: "451 4.0.0 later".into(),
                        attempts: 3,
                    },
                    local: false,
                }],
                ret: Some(Ret::Full),
                envid: Some("e1"),
                body_type: BodyType::SevenBit,
                smtputf8: false,
                arrival_unix_ms: 1_700_000_000_000,
                listener: "smtp",
                client_ip: "192.0.2.1",
                helo: "c.example.org",
                auth_user: Some("alice"),
                tls: None,
                size: 123,
                priority: 4,
                queue: "bulk",
                hold_until_unix: 1_700_000_100,
                schedule: (3, 1_700_000_200_000, 1),
            };
            let bytes = postcard::to_extend(&old, vec![2u8]).expect("encode v2");
            let id = MessageId(1);
            let env = Envelope::decode(id, &bytes).expect("v2 decodes");
            assert_eq!(env.sender, "a@example.org");
            assert_eq!(env.queue, "bulk");
            assert_eq!(env.priority, 4);
            assert_eq!(env.hold_until_unix, 1_700_000_100);
            assert_eq!(env.deliver_by, None);
            assert_eq!(
                env.schedule,
                Schedule {
                    attempts: 3,
                    next_attempt_unix_ms: 1_700_000_200_000,
                    delay_notices: 1,
                    deliver_by_notified: false,
                    held: false,
                    notices: NoticeLimit::Unlimited,
                }
            );
            // Written back, it is the current version and round-trips.
            let new = env.encode().expect("encode");
            assert_eq!(new[0], ENVELOPE_VERSION);
            assert_eq!(Envelope::decode(id, &new).expect("v3"), env);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            sender: "a@example.org".into(),
            recipients: vec![Recipient {
                address: "b@example.net".into(),
                orcpt: None,
                notify: Notify::default(),
                status: RecipientStatus::Pending,
                local: false,
            }],
            ret: None,
            envid: None,
            body_type: BodyType::SevenBit,
            smtputf8: false,
            arrival_unix_ms: 1_700_000_000_000,
            listener: "smtp".into(),
            client_ip: Some(IpAddr::from([192, 0, 2, 1])),
            helo: "c.example.org".into(),
            auth_user: None,
            tls: None,
            size: 10,
            priority: 0,
            queue: "default".into(),
            hold_until_unix: 0,
            deliver_by: None,
            schedule: Schedule::default(),
            tls_request: TlsRequest::Policy,
            tenant: None,
            header_facts: None,
        }
    }

    #[test]
    fn the_tenant_round_trips() {
        for tenant in [None, Some("acme".to_string())] {
            let mut env = sample();
            env.tenant = tenant;
            env.tls_request = TlsRequest::RequireTls;
            let bytes = env.encode().expect("encode");
            assert_eq!(bytes[0], ENVELOPE_VERSION);
            assert_eq!(Envelope::decode(MessageId(5), &bytes).expect("decode"), env);
        }
    }

    #[test]
    fn header_facts_round_trip() {
        let mut env = sample();
        env.tenant = Some("acme".into());
        env.header_facts = Some(Arc::new(HeaderFacts {
            message_id: Some("<a@b.test>".into()),
            tenant: None,
            campaign: Some("spring".into()),
        }));
        let bytes = env.encode().expect("encode");
        assert_eq!(bytes[0], ENVELOPE_VERSION);
        assert_eq!(Envelope::decode(MessageId(6), &bytes).expect("decode"), env);
    }

    #[test]
    fn version_9_envelopes_still_decode_without_header_facts() {
        // Version 9 as earlier releases wrote it: the layout and four
        // extension records, no header facts after them.
        let mut env = sample();
        env.tenant = Some("acme".into());
        let bytes = env.encode_as(ENVELOPE_V9).expect("encode v9");
        let back = Envelope::decode(MessageId(1), &bytes).expect("v9 decodes");
        assert_eq!(back, env);
        assert_eq!(back.header_facts, None);
    }

    #[test]
    fn version_8_envelopes_still_decode_without_a_tenant() {
        // Version 8 as earlier releases wrote it: the layout and three
        // extension records, no tenant record after them.
        let mut env = sample();
        env.schedule.held = true;
        env.schedule.notices = NoticeLimit::HeadersOnly;
        env.tls_request = TlsRequest::RequireTls;
        let bytes = env.encode_as(ENVELOPE_V8).expect("encode v8");
        let back = Envelope::decode(MessageId(1), &bytes).expect("v8 decodes");
        assert_eq!(back, env);
        assert_eq!(back.tenant, None);
        // Written back, it is version 9 and keeps a tenant set since.
        let mut env9 = back.clone();
        env9.tenant = Some("acme".into());
        let new = env9.encode().expect("encode");
        assert_eq!(new[0], ENVELOPE_VERSION);
        assert_eq!(Envelope::decode(MessageId(1), &new).expect("v9"), env9);
    }

    #[test]
    fn the_tls_request_round_trips() {
        let id = MessageId(9);
        for request in [
            TlsRequest::Policy,
            TlsRequest::RequireTls,
            TlsRequest::Optional,
        ] {
            let mut env = sample();
            env.tls_request = request;
            env.schedule.held = true;
            env.schedule.notices = NoticeLimit::HeadersOnly;
            let bytes = env.encode().expect("encode");
            assert_eq!(bytes[0], ENVELOPE_VERSION);
            assert_eq!(Envelope::decode(id, &bytes).expect("decode"), env);
        }
    }

    #[test]
    fn version_7_envelopes_still_decode_without_a_tls_request() {
        // Version 7: the current layout and the two extension records before
        // version 8's, as earlier releases wrote it.
        let mut env = sample();
        env.schedule.held = true;
        env.schedule.notices = NoticeLimit::FailuresOnly;
        let bytes = env.encode_as(ENVELOPE_V7).expect("encode v7");
        let back = Envelope::decode(MessageId(1), &bytes).expect("v7 decodes");
        assert_eq!(back, env);
        assert_eq!(back.tls_request, TlsRequest::Policy);
        // Written back, it is the current version and keeps a request set since.
        let mut env8 = env.clone();
        env8.tls_request = TlsRequest::RequireTls;
        let new = env8.encode().expect("encode");
        assert_eq!(new[0], ENVELOPE_VERSION);
        assert_eq!(Envelope::decode(MessageId(1), &new).expect("current"), env8);
    }

    #[test]
    fn the_hold_flag_round_trips() {
        let id = MessageId(7);
        let mut env = sample();
        env.schedule.held = true;
        let bytes = env.encode().expect("encode");
        assert_eq!(bytes[0], ENVELOPE_VERSION);
        assert_eq!(Envelope::decode(id, &bytes).expect("decode"), env);
        env.schedule.held = false;
        let bytes = env.encode().expect("encode");
        assert!(!Envelope::decode(id, &bytes).expect("decode").schedule.held);
    }

    #[test]
    fn version_4_envelopes_still_decode_with_their_replies_typed() {
        let mut env = sample();
        env.recipients[0].status = RecipientStatus::Failed {
            reply: Reply::new(550, "5.1.1", "no such user"),
        };
        env.schedule.held = true;
        let old = v4::Envelope::<v4::Recipient>::from(&env);
        let bytes = postcard::to_extend(&old, vec![ENVELOPE_V4]).expect("encode v4");
        let bytes = postcard::to_extend(&Extension { held: true }, bytes).expect("ext");
        let back = Envelope::decode(MessageId(1), &bytes).expect("v4 decodes");
        assert_eq!(back, env);
        let RecipientStatus::Failed { reply } = &back.recipients[0].status else {
            panic!("failed status expected: {back:?}");
        };
        assert_eq!(reply.status, Some(crate::EnhancedStatus::new(5, 1, 1)));
        // Written back, it is the current version and round-trips.
        let new = back.encode().expect("encode");
        assert_eq!(new[0], ENVELOPE_VERSION);
        assert_eq!(Envelope::decode(MessageId(1), &new).expect("current"), env);
    }

    #[test]
    fn the_notice_limit_round_trips() {
        let id = MessageId(8);
        for limit in [
            NoticeLimit::Unlimited,
            NoticeLimit::HeadersOnly,
            NoticeLimit::FailuresOnly,
        ] {
            let mut env = sample();
            env.schedule.notices = limit;
            env.schedule.held = true;
            let bytes = env.encode().expect("encode");
            assert_eq!(bytes[0], ENVELOPE_VERSION);
            assert_eq!(Envelope::decode(id, &bytes).expect("decode"), env);
        }
    }

    #[test]
    fn version_5_envelopes_still_decode_with_their_notice_limit() {
        // Version 5: the version 4 layout (reply lines) and both extension records.
        let mut env = sample();
        env.recipients[0].status = RecipientStatus::Deferred {
            reply: Reply::new(451, "4.7.1", "try later"),
            attempts: 2,
        };
        env.schedule.held = true;
        env.schedule.notices = NoticeLimit::HeadersOnly;
        let old = v4::Envelope::<v4::Recipient>::from(&env);
        let bytes = postcard::to_extend(&old, vec![ENVELOPE_V5]).expect("encode v5");
        let bytes = postcard::to_extend(&Extension { held: true }, bytes).expect("ext");
        let bytes = postcard::to_extend(
            &Extension5 {
                notices: NoticeLimit::HeadersOnly,
            },
            bytes,
        )
        .expect("ext5");
        let back = Envelope::decode(MessageId(1), &bytes).expect("v5 decodes");
        assert_eq!(back, env);
        assert_eq!(back.schedule.notices, NoticeLimit::HeadersOnly);
    }

    #[test]
    fn version_3_envelopes_still_decode() {
        // Version 3 is the version 4 layout without the extension record.
        let env = sample();
        let bytes = postcard::to_extend(
            &v4::Envelope::<v4::Recipient>::from(&env),
            vec![ENVELOPE_V3],
        )
        .expect("encode v3");
        let back = Envelope::decode(MessageId(1), &bytes).expect("v3 decodes");
        assert_eq!(back, env);
        assert!(!back.schedule.held);
    }

    #[test]
    fn version_6_envelopes_still_decode_with_their_client_address_typed() {
        // Version 6: typed replies, the client address as text, both records.
        let mut env = sample();
        env.recipients[0].status = RecipientStatus::Delivered {
            reply: Reply::new(250, "2.0.0", "ok"),
        };
        env.schedule.notices = NoticeLimit::FailuresOnly;
        let write_v6 = |client_ip: &str| {
            let old = v4::Envelope::<Recipient> {
                client_ip: client_ip.into(),
                ..v4::Envelope::from(&env)
            };
            let bytes = postcard::to_extend(&old, vec![ENVELOPE_V6]).expect("encode v6");
            let bytes = postcard::to_extend(&Extension { held: false }, bytes).expect("ext");
            postcard::to_extend(
                &Extension5 {
                    notices: NoticeLimit::FailuresOnly,
                },
                bytes,
            )
            .expect("ext5")
        };
        let back = Envelope::decode(MessageId(1), &write_v6("192.0.2.1")).expect("v6 decodes");
        assert_eq!(back, env);
        assert_eq!(back.client_ip, Some(IpAddr::from([192, 0, 2, 1])));
        // A relay-written notice stored "" as its client: it reads as none.
        let back = Envelope::decode(MessageId(2), &write_v6("")).expect("v6 decodes");
        assert_eq!(back.client_ip, None);
        let v6_ipv6 = write_v6("2001:db8::7");
        let back = Envelope::decode(MessageId(3), &v6_ipv6).expect("v6 decodes");
        assert_eq!(back.client_ip, "2001:db8::7".parse().ok());
    }

    #[test]
    fn a_client_address_round_trips_in_both_families_and_as_none() {
        for ip in [None, "192.0.2.9".parse().ok(), "2001:db8::9".parse().ok()] {
            let mut env = sample();
            env.client_ip = ip;
            let bytes = env.encode().expect("encode");
            assert_eq!(Envelope::decode(MessageId(4), &bytes).expect("decode"), env);
        }
    }
}
