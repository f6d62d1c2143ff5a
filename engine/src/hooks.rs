//! HTTP hooks (issue 14 item 4): a session's stage POSTed as JSON to a URL,
//! the JSON answer applied like any filter's (docs/hooks.md). The document
//! and the answer are `sluice_policy::hook` (sans-IO); this module moves them.
//!
//! The HTTP exchange never runs on an executor: each hook has its own small
//! pool of plain threads (`max_concurrency`, started at the first call)
//! behind a bounded queue: at most `max_queued` requests wait beyond those in
//! flight. The executor hands a request over
//! and awaits a oneshot answer with the hook's timeout; a full queue, a
//! timeout, a transport error, a status that is not 2xx or an answer that
//! does not parse is a failure: counted (`sluice_hook_calls_total`), logged,
//! and the hook's `on_failure` applies. When a reload replaces the hook, the
//! old pool's threads end once the last session holding it is gone.

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_channel::oneshot;
use sluice_policy::hook::{self, MessagePolicy};
use sluice_policy::stage::{FilterOutcome, OnFailure, StageEvent};

use crate::config::hook::HookConfig;

/// Most bytes of a hook's answer read; beyond, the answer is refused.
const MAX_ANSWER: u64 = 64 << 20;

/// Why a hook could not answer.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("too many requests waiting")]
    Busy,
    #[error("timed out")]
    Timeout,
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("{0}")]
    Transport(String),
    #[error(transparent)]
    Reply(#[from] hook::HookReplyError),
}

impl HookError {
    /// The `result` label of `sluice_hook_calls_total`.
    fn label(&self) -> &'static str {
        match self {
            HookError::Busy => "busy",
            HookError::Timeout => "timeout",
            HookError::Status(_) => "http_status",
            HookError::Transport(_) => "transport",
            HookError::Reply(_) => "invalid_reply",
        }
    }
}

struct Job {
    body: Vec<u8>,
    answer: oneshot::Sender<Result<Vec<u8>, HookError>>,
}

/// The queue to a hook's threads. `outstanding` counts the requests handed
/// over and not finished (waiting or in flight): at most `limit`
/// (`max_concurrency + max_queued`), so the channel, as large as `limit`,
/// never refuses an admitted request.
struct Pool {
    tx: SyncSender<Job>,
    outstanding: Arc<AtomicUsize>,
    limit: usize,
}

impl Pool {
    /// Hands `job` over, or says why not.
    fn submit(&self, job: Job) -> Result<(), HookError> {
        if self.outstanding.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            return Err(HookError::Busy);
        }
        self.tx.try_send(job).map_err(|e| {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            match e {
                TrySendError::Full(_) => HookError::Busy,
                TrySendError::Disconnected(_) => HookError::Transport("worker threads gone".into()),
            }
        })
    }
}

/// One configured hook and (once used) its threads.
pub struct Hook {
    config: HookConfig,
    pool: OnceLock<Option<Pool>>,
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hook")
            .field("name", &self.config.name)
            .finish()
    }
}

impl Hook {
    pub fn new(config: HookConfig) -> Hook {
        Hook {
            config,
            pool: OnceLock::new(),
        }
    }

    pub fn config(&self) -> &HookConfig {
        &self.config
    }

    /// The hook's answer at this stage, `on_failure` applied.
    pub async fn consult(&self, event: &StageEvent<'_>) -> FilterOutcome {
        match self.call(event).await {
            Ok(outcome) => {
                crate::metrics::hook_call(&self.config.name, "ok");
                outcome
            }
            Err(e) => {
                crate::metrics::hook_call(&self.config.name, e.label());
                tracing::warn!(
                    target: "sluice::filter",
                    hook = %self.config.name,
                    stage = %event.stage,
                    client_ip = %event.client.ip,
                    error = %e,
                    "hook failed"
                );
                match self.config.on_failure {
                    OnFailure::Accept => FilterOutcome::accept(),
                    OnFailure::Tempfail => {
                        FilterOutcome::with_verdict(crate::filters::failure_verdict())
                    }
                }
            }
        }
    }

    async fn call(&self, event: &StageEvent<'_>) -> Result<FilterOutcome, HookError> {
        let body = hook::request_document(
            event,
            MessagePolicy {
                include: self.config.include_message,
                max_bytes: usize::try_from(self.config.max_message_size.0).unwrap_or(usize::MAX),
            },
        );
        let Some(pool) = self.pool.get_or_init(|| self.start()) else {
            return Err(HookError::Transport("no worker threads".into()));
        };
        let (tx, rx) = oneshot::channel();
        pool.submit(Job { body, answer: tx })?;
        // The worker's own timeout ends the exchange; this one also covers
        // the time the request waited in the queue.
        let answer = crate::time::within(self.config.timeout.0, rx)
            .await
            .ok_or(HookError::Timeout)?
            .map_err(|_| HookError::Transport("worker dropped the request".into()))??;
        Ok(hook::parse_reply(&answer)?)
    }

    /// The worker threads and the queue to them.
    fn start(&self) -> Option<Pool> {
        let limit = self.config.max_concurrency + self.config.max_queued;
        let (tx, rx) = mpsc::sync_channel::<Job>(limit);
        let rx = Arc::new(Mutex::new(rx));
        let outstanding = Arc::new(AtomicUsize::new(0));
        let agent = agent(self.config.timeout.0);
        let mut started = 0;
        for i in 0..self.config.max_concurrency {
            let worker = Worker {
                rx: rx.clone(),
                outstanding: outstanding.clone(),
                agent: agent.clone(),
                url: self.config.url.clone(),
            };
            match std::thread::Builder::new()
                .name(format!("hook-{}-{i}", self.config.name))
                .spawn(move || worker.run())
            {
                Ok(_) => started += 1,
                Err(e) => {
                    tracing::error!(hook = %self.config.name, error = %e, "cannot start a hook thread");
                }
            }
        }
        (started > 0).then_some(Pool {
            tx,
            outstanding,
            limit,
        })
    }
}

/// The HTTP client of a hook's threads: the whole exchange bounded by the
/// hook's timeout; https verified against the web PKI.
fn agent(timeout: Duration) -> ureq::Agent {
    let mut builder = ureq::AgentBuilder::new()
        .timeout(timeout)
        .redirects(0)
        .user_agent("sluice");
    if let Ok(tls) = https_config() {
        builder = builder.tls_config(tls);
    }
    builder.build()
}

fn https_config() -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

struct Worker {
    rx: Arc<Mutex<Receiver<Job>>>,
    /// The pool's count of requests not finished; one less per job done.
    outstanding: Arc<AtomicUsize>,
    agent: ureq::Agent,
    url: String,
}

impl Worker {
    fn run(self) {
        loop {
            let job = match self.rx.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => return,
            };
            // All senders gone (the hook was replaced and dropped): done.
            let Ok(job) = job else {
                return;
            };
            // A session that stopped waiting (timeout, gone) needs no answer.
            if !job.answer.is_canceled() {
                let result = self.post(&job.body);
                let _ = job.answer.send(result);
            }
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn post(&self, body: &[u8]) -> Result<Vec<u8>, HookError> {
        let response = match self
            .agent
            .post(&self.url)
            .set("Content-Type", "application/json")
            .send_bytes(body)
        {
            Ok(r) => r,
            Err(ureq::Error::Status(code, _)) => return Err(HookError::Status(code)),
            Err(ureq::Error::Transport(t)) => {
                return Err(
                    if matches!(t.kind(), ureq::ErrorKind::Io)
                        && t.to_string().contains("timed out")
                    {
                        HookError::Timeout
                    } else {
                        HookError::Transport(t.to_string())
                    },
                )
            }
        };
        let status = response.status();
        if !(200..300).contains(&status) {
            return Err(HookError::Status(status));
        }
        let mut answer = Vec::new();
        response
            .into_reader()
            .take(MAX_ANSWER + 1)
            .read_to_end(&mut answer)
            .map_err(|e| HookError::Transport(format!("reading the answer: {e}")))?;
        if answer.len() as u64 > MAX_ANSWER {
            return Err(HookError::Transport("answer too large".into()));
        }
        Ok(answer)
    }
}
