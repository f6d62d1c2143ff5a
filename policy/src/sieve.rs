//! Sieve system scripts at the SMTP stages (issue 14), on sieve-rs.
//!
//! A listener names one script per stage. Scripts (and the scripts they may
//! `include`, from one configured directory) are compiled when the
//! configuration loads, so a syntax error stops `check-config` and a reload
//! with the file and line, and nothing is read from disk while mail flows.
//! A run is pure and synchronous: the engine decides where it runs.
//!
//! How Sieve actions become a [`FilterOutcome`]:
//! - `reject`/`ereject` → [`Verdict::Reject`] (550 5.7.1 and the text), or
//!   [`Verdict::Tempfail`] when the text starts with a 4xx code
//!   (`reject "451 4.7.1 try later"`); a text starting with a 5xx code sets
//!   that code.
//! - `discard` (and no keep, fileinto or redirect) → [`Verdict::Discard`].
//! - `fileinto` the quarantine mailbox (default "Quarantine", compared
//!   case-insensitively) → [`Verdict::Quarantine`]; any other mailbox is a keep.
//! - `keep`, the implicit keep, no action → [`Verdict::Accept`].
//! - At DATA only: `redirect` → the recipients become the redirect targets
//!   (plus the old ones when the script also keeps); `addheader`/
//!   `deleteheader` → header modifications; both bounded (`max_redirects`,
//!   the header limits of sieve-rs). Elsewhere these are ignored.
//! - `extlists` lists (`:list "NAME"`) are the relay's local lists
//!   ([`crate::lists::Lists`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sieve::{Compiler, Envelope, Event, Input, Recipient, Runtime, Sieve};

use crate::lists::Lists;
use crate::stage::{FilterOutcome, FilterReply, Modification, Stage, StageEvent, Verdict};

/// Largest script file read (bytes).
pub const MAX_SCRIPT_SIZE: usize = 256 * 1024;
/// Most scripts loaded from the include directory.
pub const MAX_INCLUDE_SCRIPTS: usize = 256;

/// `[server.listener.NAME.sieve]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SieveConfig {
    pub connect: Option<PathBuf>,
    pub ehlo: Option<PathBuf>,
    pub auth: Option<PathBuf>,
    pub mail: Option<PathBuf>,
    pub rcpt: Option<PathBuf>,
    pub data: Option<PathBuf>,
    /// Before each delivery attempt (a verdict only: no modifications).
    pub delivery: Option<PathBuf>,
    /// Where `include :global "name"` / `include :personal "name"` find
    /// "name.sieve" (or "name"). Unset: include fails to run.
    pub include_dir: Option<PathBuf>,
    /// Instructions one run may execute (loops are bounded by this).
    pub max_instructions: usize,
    /// Redirects one run may make.
    pub max_redirects: usize,
    /// The `fileinto` mailbox that means quarantine.
    pub quarantine_mailbox: String,
    /// "tempfail" (default) or "accept" when a script fails to run (limit hit,
    /// missing include, run-time error).
    pub on_failure: FailureAction,
}

impl Default for SieveConfig {
    fn default() -> Self {
        SieveConfig {
            connect: None,
            ehlo: None,
            auth: None,
            mail: None,
            rcpt: None,
            data: None,
            delivery: None,
            include_dir: None,
            max_instructions: 10_000,
            max_redirects: 4,
            quarantine_mailbox: "Quarantine".into(),
            on_failure: FailureAction::Tempfail,
        }
    }
}

/// The config spelling of [`crate::stage::OnFailure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    #[default]
    Tempfail,
    Accept,
}

impl From<FailureAction> for crate::stage::OnFailure {
    fn from(f: FailureAction) -> Self {
        match f {
            FailureAction::Tempfail => crate::stage::OnFailure::Tempfail,
            FailureAction::Accept => crate::stage::OnFailure::Accept,
        }
    }
}

impl SieveConfig {
    /// The configured script path of each stage.
    fn paths(&self) -> [(Stage, Option<&PathBuf>); 7] {
        [
            (Stage::Connect, self.connect.as_ref()),
            (Stage::Ehlo, self.ehlo.as_ref()),
            (Stage::Auth, self.auth.as_ref()),
            (Stage::Mail, self.mail.as_ref()),
            (Stage::Rcpt, self.rcpt.as_ref()),
            (Stage::Data, self.data.as_ref()),
            (Stage::Delivery, self.delivery.as_ref()),
        ]
    }
}

/// Why the scripts could not be loaded; `key` is the config key inside the
/// sieve table ("rcpt", "include_dir", ...).
#[derive(Debug, thiserror::Error)]
pub enum SieveLoadError {
    #[error("{path}: {reason}")]
    Read {
        key: String,
        path: String,
        reason: String,
    },
    #[error("{path}: line {line}, column {column}: {message}")]
    Compile {
        key: String,
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{0}")]
    Settings(String),
}

impl SieveLoadError {
    /// The config key the error is about.
    pub fn key(&self) -> &str {
        match self {
            SieveLoadError::Read { key, .. } | SieveLoadError::Compile { key, .. } => key,
            SieveLoadError::Settings(_) => "max_instructions",
        }
    }
}

/// Why a run gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SieveRunError {
    #[error("instruction limit reached")]
    Limit,
    #[error("script {0:?} not found for include")]
    MissingInclude(String),
    #[error("{0}")]
    Runtime(String),
}

/// The compiled scripts of one listener.
pub struct SieveSet {
    /// Indexed like [`Stage::ALL`].
    scripts: [Option<(String, Arc<Sieve>)>; 7],
    includes: BTreeMap<String, Arc<Sieve>>,
    runtime: Runtime,
    quarantine_mailbox: String,
    on_failure: crate::stage::OnFailure,
    lists: Arc<Lists>,
}

impl std::fmt::Debug for SieveSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stages: Vec<&str> = Stage::ALL
            .iter()
            .zip(&self.scripts)
            .filter(|(_, s)| s.is_some())
            .map(|(stage, _)| stage.name())
            .collect();
        f.debug_struct("SieveSet")
            .field("stages", &stages)
            .field("includes", &self.includes.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// What a run knows beyond the stage event: results of checks the session ran.
#[derive(Debug, Clone, Copy, Default)]
pub struct SieveExtras<'a> {
    /// "pass", "fail", ... (empty: not checked).
    pub spf: &'a str,
    pub dkim: &'a str,
    pub dmarc: &'a str,
    /// The DNSBL/DNSWL zones listing the client, comma-separated (empty:
    /// none, or the listener does not ask).
    pub dnsbl: &'a str,
}

fn stage_index(stage: Stage) -> usize {
    Stage::ALL.iter().position(|s| *s == stage).unwrap_or(0)
}

impl SieveSet {
    /// Reads and compiles every configured script (and the include directory).
    pub fn load(
        cfg: &SieveConfig,
        hostname: &str,
        lists: Arc<Lists>,
    ) -> Result<SieveSet, SieveLoadError> {
        if cfg.max_instructions == 0 || cfg.max_instructions > 10_000_000 {
            return Err(SieveLoadError::Settings(
                "max_instructions must be 1 ..= 10000000".into(),
            ));
        }
        let compiler = Compiler::new().with_max_script_size(MAX_SCRIPT_SIZE);
        let mut scripts: [Option<(String, Arc<Sieve>)>; 7] = Default::default();
        for (stage, path) in cfg.paths() {
            if let Some(path) = path {
                let script = compile_file(&compiler, stage.name(), path)?;
                scripts[stage_index(stage)] = Some((path.display().to_string(), Arc::new(script)));
            }
        }
        let mut includes = BTreeMap::new();
        if let Some(dir) = &cfg.include_dir {
            let read_err = |reason: String| SieveLoadError::Read {
                key: "include_dir".into(),
                path: dir.display().to_string(),
                reason,
            };
            let entries = std::fs::read_dir(dir).map_err(|e| read_err(e.to_string()))?;
            for entry in entries {
                let path = entry.map_err(|e| read_err(e.to_string()))?.path();
                if path.extension().and_then(|e| e.to_str()) != Some("sieve") || !path.is_file() {
                    continue;
                }
                if includes.len() >= MAX_INCLUDE_SCRIPTS {
                    return Err(read_err(format!("more than {MAX_INCLUDE_SCRIPTS} scripts")));
                }
                let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                    continue;
                };
                let script = compile_file(&compiler, "include_dir", &path)?;
                includes.insert(stem.to_string(), Arc::new(script));
            }
        }
        let mut runtime = Runtime::new()
            .with_cpu_limit(cfg.max_instructions)
            .with_max_redirects(cfg.max_redirects)
            .with_max_nested_includes(3)
            // Loops (`while`, a sieve-rs extension) are allowed: every run
            // is bounded by max_instructions anyway.
            .with_capability(sieve::compiler::grammar::Capability::While)
            .with_local_hostname(hostname.to_string());
        for name in lists.names() {
            runtime.set_valid_ext_list(name.to_string());
        }
        Ok(SieveSet {
            scripts,
            includes,
            runtime,
            quarantine_mailbox: cfg.quarantine_mailbox.clone(),
            on_failure: cfg.on_failure.into(),
            lists,
        })
    }

    /// Whether a script runs at this stage.
    pub fn has(&self, stage: Stage) -> bool {
        self.scripts[stage_index(stage)].is_some()
    }

    /// The stages with a script.
    pub fn stages(&self) -> impl Iterator<Item = Stage> + '_ {
        Stage::ALL.into_iter().filter(|s| self.has(*s))
    }

    pub fn on_failure(&self) -> crate::stage::OnFailure {
        self.on_failure
    }

    /// Runs the stage's script (Accept when there is none).
    pub fn run(
        &self,
        event: &StageEvent<'_>,
        extras: &SieveExtras<'_>,
    ) -> Result<FilterOutcome, SieveRunError> {
        let Some((name, script)) = &self.scripts[stage_index(event.stage)] else {
            return Ok(FilterOutcome::accept());
        };
        let message = event.message.unwrap_or(b"");
        let mut ctx = self.runtime.filter(message);
        let client = event.client;
        let env: [(&'static str, String); 13] = [
            ("remote-ip", client.ip.to_string()),
            ("remote_ip", client.ip.to_string()),
            ("remote-host", client.ptr.clone().unwrap_or_default()),
            ("helo", client.helo.clone().unwrap_or_default()),
            (
                "tls",
                client
                    .tls
                    .as_ref()
                    .map(|(v, c)| format!("{v} {c}"))
                    .unwrap_or_default(),
            ),
            ("auth_user", client.auth_user.clone().unwrap_or_default()),
            ("listener", client.listener.clone()),
            ("stage", event.stage.name().to_string()),
            ("spf", extras.spf.to_string()),
            ("dkim", extras.dkim.to_string()),
            ("dmarc", extras.dmarc.to_string()),
            ("dnsbl", extras.dnsbl.to_string()),
            ("queue_id", event.queue_id.unwrap_or_default().to_string()),
        ];
        for (key, value) in env {
            ctx.set_env_variable(key, value);
        }
        ctx.set_env_variable("domain", client.server_name.clone());
        ctx.set_env_variable("host", client.server_name.clone());
        ctx.set_env_variable("phase", "during".to_string());
        if let Some(sender) = event.sender {
            ctx.set_envelope(Envelope::From, sender);
        }
        match event.recipient {
            Some(rcpt) => ctx.set_envelope(Envelope::To, rcpt),
            None => {
                for rcpt in event.recipients {
                    ctx.set_envelope(Envelope::To, rcpt.as_str());
                }
            }
        }

        let mut acts = Actions::default();
        let mut input = Input::script(name.as_str(), script.clone());
        while let Some(result) = ctx.run(input) {
            input = Input::True;
            let event_out = result.map_err(|e| match e {
                sieve::runtime::RuntimeError::CPULimitReached => SieveRunError::Limit,
                other => SieveRunError::Runtime(format!("{other:?}")),
            })?;
            match event_out {
                Event::IncludeScript { name, optional } => {
                    let key = name.as_str();
                    let key = key.strip_suffix(".sieve").unwrap_or(key);
                    match self.includes.get(key) {
                        Some(s) => input = Input::script(name.clone(), s.clone()),
                        None if optional => input = Input::False,
                        None => return Err(SieveRunError::MissingInclude(key.to_string())),
                    }
                }
                Event::ListContains {
                    lists,
                    values,
                    match_as,
                } => {
                    let lower = !matches!(match_as, sieve::MatchAs::Octet);
                    let found = lists
                        .iter()
                        .any(|list| values.iter().any(|v| self.lists.contains(list, v, lower)));
                    input = found.into();
                }
                Event::MailboxExists { .. } | Event::DuplicateId { .. } => input = Input::False,
                Event::Function { .. } => input = Input::False,
                Event::SetEnvelope { envelope, value } => {
                    if envelope == Envelope::From {
                        acts.sender = Some(value);
                    }
                }
                Event::Keep { .. } => acts.keep = true,
                Event::Discard => acts.discard = true,
                Event::Reject { reason, .. } => acts.reject = Some(reason),
                Event::FileInto { folder, .. } => {
                    if folder.eq_ignore_ascii_case(&self.quarantine_mailbox) {
                        acts.quarantine = Some(folder);
                    } else {
                        acts.keep = true;
                    }
                }
                Event::SendMessage { recipient, .. } => match recipient {
                    Recipient::Address(a) => acts.redirects.push(a),
                    Recipient::Group(list) => acts.redirects.extend(list),
                    Recipient::List(_) => {}
                },
                Event::CreatedMessage { message, .. } => acts.edited = Some(message),
                Event::Notify { .. } => {}
            }
        }
        Ok(acts.outcome(event))
    }
}

fn compile_file(compiler: &Compiler, key: &str, path: &Path) -> Result<Sieve, SieveLoadError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| SieveLoadError::Read {
        key: key.to_string(),
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    compiler
        .compile(&bytes)
        .map_err(|e| SieveLoadError::Compile {
            key: key.to_string(),
            path: shown,
            line: e.line_num(),
            column: e.line_pos(),
            message: e.to_string(),
        })
}

/// What a run asked for, before it is turned into a verdict.
#[derive(Debug, Default)]
struct Actions {
    keep: bool,
    discard: bool,
    reject: Option<String>,
    quarantine: Option<String>,
    redirects: Vec<String>,
    edited: Option<Vec<u8>>,
    sender: Option<String>,
}

impl Actions {
    fn outcome(self, event: &StageEvent<'_>) -> FilterOutcome {
        if let Some(reason) = self.reject {
            return FilterOutcome::with_verdict(reject_verdict(&reason));
        }
        let mut modifications = Vec::new();
        if event.stage.may_modify() {
            if let (Some(edited), Some(original)) = (&self.edited, event.message) {
                modifications.extend(crate::stage_message::header_diff(original, edited));
            }
            if let Some(sender) = &self.sender {
                modifications.push(Modification::ChangeSender {
                    address: sender.clone(),
                });
            }
            if !self.redirects.is_empty() {
                if !self.keep {
                    for r in event.recipients {
                        modifications.push(Modification::RemoveRecipient { address: r.clone() });
                    }
                }
                for r in &self.redirects {
                    modifications.push(Modification::AddRecipient { address: r.clone() });
                }
            }
        }
        let verdict = if let Some(folder) = self.quarantine {
            Verdict::Quarantine {
                reason: format!("sieve fileinto \"{folder}\""),
            }
        } else if self.discard && !self.keep && self.redirects.is_empty() {
            Verdict::Discard
        } else {
            Verdict::Accept
        };
        FilterOutcome {
            verdict,
            modifications,
        }
    }
}

/// A reject text, with an optional leading reply code and enhanced status.
pub fn reject_verdict(reason: &str) -> Verdict {
    let text = reason.trim();
    let mut words = text.splitn(2, ' ');
    let first = words.next().unwrap_or("");
    let code = first
        .parse::<u16>()
        .ok()
        .filter(|c| (400..600).contains(c) && first.len() == 3);
    let (code, rest) = match code {
        Some(c) => (c, words.next().unwrap_or("").trim_start()),
        None => (550, text),
    };
    let mut words = rest.splitn(2, ' ');
    let maybe_esc = words.next().unwrap_or("");
    let class = code / 100;
    let esc_ok = {
        let parts: Vec<&str> = maybe_esc.split('.').collect();
        parts.len() == 3
            && parts[0] == class.to_string()
            && parts[1..]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
    };
    let (enhanced, text) = if esc_ok {
        (
            Some(maybe_esc.to_string()),
            words.next().unwrap_or("").to_string(),
        )
    } else {
        (Some(format!("{class}.7.1")), rest.to_string())
    };
    // One reply line: no line breaks from a script.
    let text = FilterReply::one_line(&text);
    let reply = FilterReply {
        code,
        enhanced,
        text,
    };
    if class == 4 {
        Verdict::Tempfail(reply)
    } else {
        Verdict::Reject(reply)
    }
}

#[cfg(test)]
#[path = "sieve_tests.rs"]
mod tests;
