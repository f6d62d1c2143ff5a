//! Milter connections of one SMTP session (issue 14, item 3): one
//! [`MilterSession`] per `[[server.listener.NAME.milter]]` entry, over TCP or
//! a unix socket, on the session's glommio executor (no tokio, nothing
//! blocking). The protocol itself — what is sent at each stage, what the
//! replies mean — is `sluice_policy::milter::MilterProtocol`; this module only
//! moves its bytes with timeouts and applies `on_failure`.
//!
//! # How the stage pipeline calls it
//!
//! `crate::filters::session::FilterSession` does, per SMTP session:
//!
//! ```text
//! // the first stage that asks this milter (after rules and Sieve):
//! let mut m = MilterSession::open(&cfg, &facts, extras, listener.max_message_size).await;
//! // at each stage it is asked at, milters in order:
//! let outcome = m.consult(&event).await;   // on_failure already applied
//! // outcome.verdict not Accept: it ends the stage (reply from it);
//! // at Data, outcome.modifications are applied in order.
//! // The session between transactions (RSET, refusals): m.abort().await
//! // AUTH succeeded: m.set_auth_type("PLAIN") before the Mail stage.
//! // session end: m.quit().await (dropped without it: QUIT written in Drop)
//! ```
//!
//! Stages the milter is not asked at are still shown to it when it is next
//! asked (connect, helo, mail and earlier recipients are sent first), so a
//! milter asked only at `data` sees the whole dialogue. Milter semantics kept:
//! an accept at connect or helo ends filtering for the connection; at mail,
//! rcpt or in the message, for the message; a discard at mail or rcpt drops
//! the whole message (answered `Discard` at Data); a reject at rcpt refuses
//! that recipient only. Every `consult` is bounded by `stage_timeout`, each
//! reply by `command_timeout`.
//!
//! After any failure (connect refused, timeout, protocol error, the milter
//! closing) the connection is dropped and every later stage answers the
//! `on_failure` outcome: 451 4.3.0 (tempfail) or accept.

use std::net::SocketAddr;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpStream, UnixStream};
use sluice_policy::milter::{MilterLimits, MilterProtocol, Poll, SessionExtras};
use sluice_policy::stage::{
    ClientFacts, FilterOutcome, FilterReply, OnFailure, Stage, StageEvent, Verdict,
};

use crate::config::milter::{MilterConfig, MilterSocket};
use crate::time::within;

/// Why a milter could not answer.
#[derive(Debug, thiserror::Error)]
pub enum MilterError {
    #[error("cannot connect to {socket}: {source}")]
    Connect {
        socket: String,
        source: std::io::Error,
    },
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("milter closed the connection")]
    Closed,
    #[error(transparent)]
    Protocol(#[from] sluice_policy::milter::MilterError),
    #[error("unavailable since an earlier failure")]
    Unavailable,
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(bytes).await,
            Stream::Unix(s) => s.write_all(bytes).await,
        }
    }

    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf).await,
            Stream::Unix(s) => s.read(buf).await,
        }
    }

    async fn close(self) {
        let _ = match self {
            Stream::Tcp(mut s) => s.close().await,
            Stream::Unix(mut s) => s.close().await,
        };
    }
}

/// One session's connection to one milter.
pub struct MilterSession {
    config: MilterConfig,
    proto: MilterProtocol,
    stream: Option<Stream>,
    extras: SessionExtras,
    /// The failure that took the connection down, for logs.
    failed: Option<String>,
}

/// Read buffer per milter connection.
const READ_CHUNK: usize = 16 * 1024;

impl MilterSession {
    /// Connect and negotiate. Never fails: a milter that cannot be reached
    /// leaves a session whose every stage answers `on_failure` (logged here).
    pub async fn open(
        config: &MilterConfig,
        client: &ClientFacts,
        extras: SessionExtras,
        max_message_size: usize,
    ) -> MilterSession {
        let limits = MilterLimits {
            max_body_replacement: max_message_size,
            ..MilterLimits::default()
        };
        let mut session = MilterSession {
            config: config.clone(),
            proto: MilterProtocol::new(limits),
            stream: None,
            extras,
            failed: None,
        };
        let timeout = config.connect_timeout.0;
        let result = within(timeout, session.connect_and_negotiate())
            .await
            .unwrap_or(Err(MilterError::Timeout("connecting and negotiating")));
        if let Err(e) = result {
            tracing::warn!(milter = %config.name, socket = %config.socket, client_ip = %client.ip, error = %e, "milter unavailable");
            session.fail(e.to_string()).await;
        }
        session
    }

    async fn connect_and_negotiate(&mut self) -> Result<(), MilterError> {
        let socket = self.config.socket.clone();
        let connect_err = |source: std::io::Error| MilterError::Connect {
            socket: socket.to_string(),
            source,
        };
        let stream = match &self.config.socket {
            MilterSocket::Inet(addr) => Stream::Tcp(
                TcpStream::connect(*addr)
                    .await
                    .map_err(|e| connect_err(e.into()))?,
            ),
            MilterSocket::Unix(path) => Stream::Unix(
                UnixStream::connect(path)
                    .await
                    .map_err(|e| connect_err(e.into()))?,
            ),
        };
        self.stream = Some(stream);
        self.proto.negotiate();
        self.run(self.config.command_timeout.0).await.map(|_| ())
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Whether this milter's answer is asked at `stage`.
    pub fn asked_at(&self, stage: Stage) -> bool {
        self.config.asked_at(stage)
    }

    /// Whether the connection is down (every stage answers `on_failure`).
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// The local address the client reached (`{if_addr}`), when it was not
    /// known at [`open`](Self::open).
    pub fn set_local_addr(&mut self, addr: SocketAddr) {
        self.extras.local_addr = Some(addr);
    }

    /// The SASL mechanism of a successful AUTH (`{auth_type}`).
    pub fn set_auth_type(&mut self, mechanism: &str) {
        self.extras.auth_type = Some(mechanism.to_string());
    }

    /// The milter's answer at this stage, or why there is none.
    pub async fn at_stage(&mut self, event: &StageEvent<'_>) -> Result<FilterOutcome, MilterError> {
        if self.failed.is_some() || self.stream.is_none() {
            return Err(MilterError::Unavailable);
        }
        if let Err(e) = self.proto.begin(event, &self.extras) {
            return self.fail_with(e.into()).await;
        }
        let stage_timeout = self.config.stage_timeout.0;
        let command_timeout = self.config.command_timeout.0;
        let result = within(stage_timeout, self.run(command_timeout))
            .await
            .unwrap_or(Err(MilterError::Timeout("for the stage")));
        match result {
            Ok(outcome) => Ok(outcome),
            Err(e) => self.fail_with(e).await,
        }
    }

    /// [`at_stage`](Self::at_stage) with `on_failure` applied: the outcome
    /// the pipeline uses.
    pub async fn consult(&mut self, event: &StageEvent<'_>) -> FilterOutcome {
        match self.at_stage(event).await {
            Ok(outcome) => outcome,
            Err(e) => {
                if !matches!(e, MilterError::Unavailable) {
                    tracing::warn!(milter = %self.config.name, stage = %event.stage, client_ip = %event.client.ip, error = %e, "milter failed");
                }
                self.failure_outcome()
            }
        }
    }

    /// What a stage answers when the milter cannot.
    pub fn failure_outcome(&self) -> FilterOutcome {
        match self.config.on_failure {
            OnFailure::Accept => FilterOutcome::accept(),
            OnFailure::Tempfail => FilterOutcome::with_verdict(Verdict::Tempfail(FilterReply {
                code: 451,
                enhanced: Some("4.3.0".into()),
                text: "Message filter unavailable, try again later".into(),
            })),
        }
    }

    /// RSET or an abandoned transaction: SMFIC_ABORT if the milter holds one.
    pub async fn abort(&mut self) {
        let bytes = self.proto.abort();
        if bytes.is_empty() {
            return;
        }
        if let Err(e) = self.write(&bytes).await {
            self.fail(e.to_string()).await;
        }
    }

    /// Session end: SMFIC_QUIT and close.
    pub async fn quit(mut self) {
        if self.failed.is_none() && self.stream.is_some() {
            let bytes = self.proto.quit();
            let _ = self.write(&bytes).await;
        }
        if let Some(stream) = self.stream.take() {
            stream.close().await;
        }
    }

    /// The QUIT frame written without waiting, for a session dropped
    /// without [`quit`](Self::quit): a few bytes a socket's send buffer
    /// takes at once. Best effort; the close follows either way.
    fn quit_now(&mut self) {
        let Some(Stream::Tcp(stream)) = &self.stream else {
            return;
        };
        if self.failed.is_some() {
            return;
        }
        let bytes = self.proto.quit();
        let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
        // SAFETY: `fd` is the open socket owned by `stream`, alive for this
        // call; `bytes` is a valid buffer of `bytes.len()` bytes. MSG_DONTWAIT
        // never blocks the executor; MSG_NOSIGNAL avoids SIGPIPE.
        let _ = unsafe {
            libc::send(
                fd,
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
    }

    async fn fail_with<T>(&mut self, e: MilterError) -> Result<T, MilterError> {
        self.fail(e.to_string()).await;
        Err(e)
    }

    async fn fail(&mut self, why: String) {
        self.failed = Some(why);
        if let Some(stream) = self.stream.take() {
            stream.close().await;
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), MilterError> {
        let timeout = self.config.command_timeout.0;
        let stream = self.stream.as_mut().ok_or(MilterError::Unavailable)?;
        within(timeout, stream.write_all(bytes))
            .await
            .ok_or(MilterError::Timeout("writing to the milter"))??;
        Ok(())
    }

    /// Drive the protocol until the stage (or negotiation) is answered.
    async fn run(&mut self, command_timeout: Duration) -> Result<FilterOutcome, MilterError> {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            match self.proto.poll()? {
                Poll::Write(bytes) => self.write(&bytes).await?,
                Poll::Read => {
                    let stream = self.stream.as_mut().ok_or(MilterError::Unavailable)?;
                    let n = within(command_timeout, stream.read(&mut buf))
                        .await
                        .ok_or(MilterError::Timeout("waiting for the milter's reply"))??;
                    if n == 0 {
                        return Err(MilterError::Closed);
                    }
                    self.proto.feed(&buf[..n]);
                }
                Poll::Done(outcome) => return Ok(outcome),
            }
        }
    }
}

impl Drop for MilterSession {
    fn drop(&mut self) {
        // After quit() or a failure the stream is gone: nothing to say.
        self.quit_now();
    }
}
