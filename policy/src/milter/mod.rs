//! Milter client protocol (Sendmail/Postfix milter, version 6), sans I/O.
//!
//! [`codec`] is the wire format: frames, the OPTNEG packet both ways, the
//! SMFIR_REPLYCODE text. [`MilterProtocol`] is one connection to one milter:
//! it turns each [`StageEvent`](crate::stage::StageEvent) into the commands
//! the milter expects (with the macros of that step) and the milter's replies
//! into a [`FilterOutcome`](crate::stage::FilterOutcome). It never reads or
//! writes a socket: the caller loops on [`MilterProtocol::poll`], writing what
//! it is given, reading when asked, until the outcome is there. The engine's
//! `milter` module does that on glommio with timeouts.
//!
//! What the client offers in negotiation: every action (SMFIF_ADDHDRS through
//! SMFIF_SETSYMLIST) and every skip (SMFIP_NO*) and no-reply (SMFIP_NR_*) flag,
//! plus SMFIP_SKIP. A milter asking for more is refused ([`MilterError::NotOffered`]).
//!
//! Bounds: a frame from the milter is at most `max_frame` bytes (1 MiB by
//! default); body replacement chunks add up to at most `max_body_replacement`
//! (the listener's message size); at most `max_modifications` changes per
//! message. Anything malformed is a [`MilterError`]; the engine then applies
//! the milter's `on_failure`.

pub mod codec;
mod session;

pub use codec::{Frame, FrameDecoder, Negotiated};
pub use session::{MilterLimits, MilterProtocol, Poll, SessionExtras};

/// What went wrong talking to a milter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MilterError {
    #[error("milter sent a frame of length 0")]
    EmptyFrame,
    #[error("milter sent a frame of {len} bytes (limit {max})")]
    FrameTooLarge { len: usize, max: usize },
    #[error("malformed milter reply '{code}': {why}")]
    Malformed { code: char, why: &'static str },
    #[error("unexpected milter reply '{code}' during {during}")]
    Unexpected { code: char, during: &'static str },
    #[error("milter speaks protocol version {0} (2 to 6 supported)")]
    Version(u32),
    #[error("milter asked for {what} not offered: {bits:#x}")]
    NotOffered { what: &'static str, bits: u32 },
    #[error("milter used an action it did not negotiate ('{0}')")]
    ActionNotNegotiated(char),
    #[error("milter replaced the body with more than {0} bytes")]
    BodyTooLarge(usize),
    #[error("milter asked for more than {0} modifications")]
    TooManyModifications(usize),
    #[error("milter shut down or refused the connection ('{0}')")]
    Shutdown(char),
    #[error("a stage was asked before the previous one finished")]
    Busy,
}

#[cfg(test)]
mod tests;
