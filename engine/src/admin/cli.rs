//! `sluice queue …` and `sluice destination …`: a command line over the
//! management API (`api`). Human tables by default, `--json` prints the API's
//! answer as it is; a refused call exits non-zero with the API's message.
//!
//! When the relay is not running (its API refuses the connection) or with
//! `--offline`, the queue reads (summary, list, show, count) are answered by
//! the same API code over the spool opened read-only here, so the output is
//! the same either way; actions need the running relay. `sluice spool …` is a
//! deprecated alias of the offline reads.

use std::cell::Cell;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::config::Config;

/// The environment variable holding the API token (instead of a file).
pub const TOKEN_ENV: &str = "SLUICE_API_TOKEN";
/// The environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "SLUICE_CONFIG";
/// The configuration file used when neither `-c` nor `SLUICE_CONFIG` names one.
pub const DEFAULT_CONFIG: &str = "/etc/sluice/sluice.toml";
/// The token file `sluice run` creates in the spool directory when
/// `admin.token_file` is unset (the one directory the service may write).
pub const LOCAL_TOKEN_FILE: &str = "admin.token";

/// Which configuration file to load: the explicit one, else the environment's
/// (an empty value counts as unset), else the default path if it exists, else
/// none (the built-in defaults).
pub fn config_path(
    explicit: Option<PathBuf>,
    env: Option<OsString>,
    exists: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    explicit
        .or_else(|| env.filter(|v| !v.is_empty()).map(PathBuf::from))
        .or_else(|| {
            let default = Path::new(DEFAULT_CONFIG);
            exists(default).then(|| default.to_path_buf())
        })
}

/// The API token file in force: `admin.token_file`, else the one `sluice run`
/// creates in the spool directory (None when the API is off).
pub fn token_path(config: &Config) -> Option<PathBuf> {
    if let Some(path) = &config.admin.token_file {
        return Some(path.clone());
    }
    (!config.admin.listen.is_empty()).then(|| config.spool.path.join(LOCAL_TOKEN_FILE))
}

/// What `ensure_local_token` did.
#[derive(Debug, PartialEq, Eq)]
pub enum LocalToken {
    /// `admin.token_file` is set, or the API is off: nothing to do.
    NotUsed,
    /// The file was there already.
    Existing(PathBuf),
    /// Made now, with a new random token.
    Created(PathBuf),
}

/// With `admin.token_file` unset, makes `<spool.path>/admin.token` (mode 0600,
/// 32 random bytes as hex) unless it exists, so the CLI on the same box can
/// use the API with the defaults.
pub fn ensure_local_token(config: &Config) -> anyhow::Result<LocalToken> {
    use std::os::unix::fs::OpenOptionsExt;
    if config.admin.token_file.is_some() {
        return Ok(LocalToken::NotUsed);
    }
    let Some(path) = token_path(config) else {
        return Ok(LocalToken::NotUsed);
    };
    if path.exists() {
        return Ok(LocalToken::Existing(path));
    }
    std::fs::create_dir_all(&config.spool.path)
        .with_context(|| format!("spool.path: creating {}", config.spool.path.display()))?;
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .context("reading /dev/urandom for the API token")?;
    let token: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(f) => f,
        // Made by another start in the meantime: use that one.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Ok(LocalToken::Existing(path))
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
    };
    file.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(LocalToken::Created(path))
}
/// Messages per `queue list` page unless --limit says otherwise.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// How long the CLI waits for an answer (queue actions wait for every core).
const TIMEOUT: Duration = Duration::from_secs(90);

/// Prints an answer as text.
type Render = fn(&Value, &mut dyn Write) -> std::io::Result<()>;

/// Where the API is and how to authenticate.
#[derive(Args, Clone, Debug)]
pub struct ApiArgs {
    /// API base URL, e.g. http://127.0.0.1:9925 (default: from admin.listen).
    #[arg(long, global = true)]
    pub api: Option<String>,
    /// File holding the bearer token (default: $SLUICE_API_TOKEN, else
    /// admin.token_file, else <spool.path>/admin.token made by `sluice run`).
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON answer.
    #[arg(long, global = true)]
    pub json: bool,
    /// Read the spool here instead of asking the relay (reads only). Without
    /// it, reads fall back to the spool when the relay's API is not running.
    #[arg(long, global = true)]
    pub offline: bool,
}

/// Which messages a queue action applies to: one id, or a filter.
#[derive(Args, Clone, Debug, Default)]
pub struct Selection {
    /// One message id (else the filter below selects).
    pub id: Option<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Act on every queued message when no filter is given.
    #[arg(long)]
    pub all: bool,
}

#[derive(Args, Clone, Debug, Default)]
pub struct FilterArgs {
    /// Part of the sender address.
    #[arg(long)]
    pub sender: Option<String>,
    /// Part of a recipient address.
    #[arg(long)]
    pub recipient: Option<String>,
    /// Domain of a recipient still to be delivered.
    #[arg(long)]
    pub domain: Option<String>,
    /// Virtual queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// queued, deferred or held.
    #[arg(long)]
    pub status: Option<String>,
    /// Arrived at least this long ago (e.g. 10m).
    #[arg(long)]
    pub min_age: Option<String>,
    /// Arrived at most this long ago.
    #[arg(long)]
    pub max_age: Option<String>,
}

impl FilterArgs {
    fn query(&self) -> Vec<(&'static str, String)> {
        [
            ("sender", &self.sender),
            ("recipient", &self.recipient),
            ("domain", &self.domain),
            ("queue", &self.queue),
            ("status", &self.status),
            ("min_age", &self.min_age),
            ("max_age", &self.max_age),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect()
    }
}

#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// Totals by queue and by destination.
    Summary {
        /// Destinations shown.
        #[arg(long, default_value_t = 20)]
        top: usize,
    },
    /// List queued messages (filters combine).
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Messages per page (at most 1000).
        #[arg(long, default_value_t = DEFAULT_LIST_LIMIT)]
        limit: usize,
        /// Continue after this id (the previous page's next_cursor).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show one message: envelope, recipients, schedule, headers (`key: value` lines).
    Show {
        id: String,
        /// Print the whole stored message instead of its headers (read from
        /// the spool on this box, like `body`).
        #[arg(long)]
        body: bool,
    },
    /// Number of queued messages.
    Count,
    /// One message's stored bytes exactly (read from the spool on this box).
    Body { id: String },
    /// Spool lifetime counters: messages stored vs. commits (read from the spool on this box).
    Stats,
    /// Attempt now: one message, or every one matching the filter.
    Retry(Selection),
    /// Hold (no attempts until released; survives a restart).
    Hold(Selection),
    /// Release held messages (due at once).
    Release(Selection),
    /// Cancel: bounce (failure DSN to the sender) or, with --drop, remove silently.
    Cancel {
        #[command(flatten)]
        selection: Selection,
        /// Remove without a DSN.
        #[arg(long)]
        drop: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TlsRptCommand {
    /// Send every stored TLS report (RFC 8460) now, today's counts included.
    SendNow,
}

/// `sluice tls-rpt send-now`.
pub fn run_tls_rpt(
    client: &Client,
    json: bool,
    cmd: TlsRptCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let TlsRptCommand::SendNow = cmd;
    let value = client.call("POST", "/tls-rpt/send", &[])?;
    emit(
        json,
        &value,
        |v, o| {
            let reports = v["reports"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            if reports.is_empty() {
                writeln!(o, "no TLS reports to send")?;
            }
            for r in reports {
                for d in r["deliveries"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                {
                    writeln!(
                        o,
                        "{} {} -> {}: {}",
                        s(&r["policy_domain"]),
                        s(&r["day"]),
                        s(&d["to"]),
                        s(&d["result"])
                    )?;
                }
            }
            Ok(())
        },
        out,
    )
}

#[derive(Subcommand, Debug)]
pub enum DestinationCommand {
    /// No attempts to DOMAIN (or route:NAME) for a while.
    Suspend {
        destination: String,
        /// How long, e.g. 30m, 1h, 2h30m.
        #[arg(long = "for", value_name = "DURATION")]
        duration: String,
    },
    /// End a suspension.
    Resume { destination: String },
    /// Suspensions in force.
    List,
}

#[derive(Subcommand, Debug)]
pub enum SuppressionCommand {
    /// Entries on the list (scope, recipient, class, until).
    List {
        /// Only this scope: a sender domain, `*` (every sender) or `<>`.
        #[arg(long)]
        scope: Option<String>,
        /// Entries shown (at most 10000).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Suppress a recipient.
    Add {
        recipient: String,
        /// A sender domain, or `*` for every sender (the default).
        #[arg(long, default_value = "*")]
        scope: String,
        /// Bounce class recorded (default policy-block).
        #[arg(long)]
        class: Option<String>,
        /// How long, e.g. 30d (default: suppression.ttl).
        #[arg(long = "for", value_name = "DURATION")]
        duration: Option<String>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a suppression.
    Remove {
        recipient: String,
        /// The scope it was recorded under (see `list`); default `*`.
        #[arg(long, default_value = "*")]
        scope: String,
    },
}

pub fn run_suppression(
    client: &Client,
    json: bool,
    cmd: SuppressionCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let (value, render): (Value, Render) = match cmd {
        SuppressionCommand::List { scope, limit } => {
            let mut q = vec![("limit", limit.to_string())];
            if let Some(scope) = scope {
                q.push(("scope", scope));
            }
            (client.call("GET", "/suppression", &q)?, |v, o| {
                let entries = arr(&v["entries"]);
                if entries.is_empty() {
                    return writeln!(o, "no suppressed recipients");
                }
                for e in entries {
                    writeln!(
                        o,
                        "{} {} {} until {}{}",
                        s(&e["scope"]),
                        s(&e["recipient"]),
                        s(&e["class"]),
                        s(&e["until"]),
                        if e["active"].as_bool() == Some(true) {
                            ""
                        } else {
                            " (expired)"
                        }
                    )?;
                }
                if v["truncated"].as_bool() == Some(true) {
                    writeln!(o, "(more entries: raise --limit)")?;
                }
                Ok(())
            })
        }
        SuppressionCommand::Add {
            recipient,
            scope,
            class,
            duration,
            reason,
        } => {
            let mut q = vec![("recipient", recipient), ("scope", scope)];
            for (k, v) in [("class", class), ("for", duration), ("reason", reason)] {
                if let Some(v) = v {
                    q.push((k, v));
                }
            }
            (client.call("POST", "/suppression/add", &q)?, |v, o| {
                writeln!(
                    o,
                    "{} suppressed for {} until {} ({})",
                    s(&v["recipient"]),
                    s(&v["scope"]),
                    s(&v["until"]),
                    s(&v["class"])
                )
            })
        }
        SuppressionCommand::Remove { recipient, scope } => (
            client.call(
                "POST",
                "/suppression/remove",
                &[("recipient", recipient), ("scope", scope)],
            )?,
            |v, o| {
                if v["removed"].as_bool() == Some(true) {
                    writeln!(
                        o,
                        "{} no longer suppressed for {}",
                        s(&v["recipient"]),
                        s(&v["scope"])
                    )
                } else {
                    writeln!(
                        o,
                        "{} was not suppressed for {}",
                        s(&v["recipient"]),
                        s(&v["scope"])
                    )
                }
            },
        ),
    };
    emit(json, &value, render, out)
}

#[derive(Subcommand, Debug)]
pub enum BanCommand {
    /// Bans in force (address, reason, until).
    List {
        /// Bans shown (at most 10000).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Ban an address.
    Add {
        address: String,
        /// How long, e.g. 1h or 7d (default: ban.duration).
        #[arg(long = "for", value_name = "DURATION")]
        duration: Option<String>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a ban.
    Remove { address: String },
}

pub fn run_ban(
    client: &Client,
    json: bool,
    cmd: BanCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let (value, render): (Value, Render) = match cmd {
        BanCommand::List { limit } => (
            client.call("GET", "/bans", &[("limit", limit.to_string())])?,
            |v, o| {
                let bans = arr(&v["bans"]);
                if bans.is_empty() {
                    return writeln!(o, "no banned addresses");
                }
                for b in bans {
                    writeln!(
                        o,
                        "{} until {} ({})",
                        s(&b["address"]),
                        s(&b["until"]),
                        s(&b["reason"])
                    )?;
                }
                if v["truncated"].as_bool() == Some(true) {
                    writeln!(o, "(more bans: raise --limit)")?;
                }
                Ok(())
            },
        ),
        BanCommand::Add {
            address,
            duration,
            reason,
        } => {
            let mut q = vec![("address", address)];
            for (k, v) in [("for", duration), ("reason", reason)] {
                if let Some(v) = v {
                    q.push((k, v));
                }
            }
            (client.call("POST", "/bans/add", &q)?, |v, o| {
                writeln!(o, "{} banned until {}", s(&v["address"]), s(&v["until"]))
            })
        }
        BanCommand::Remove { address } => (
            client.call("POST", "/bans/remove", &[("address", address)])?,
            |v, o| {
                if v["removed"].as_bool() == Some(true) {
                    writeln!(o, "{} no longer banned", s(&v["address"]))
                } else {
                    writeln!(o, "{} was not banned", s(&v["address"]))
                }
            },
        ),
    };
    emit(json, &value, render, out)
}

#[derive(Subcommand, Debug)]
pub enum ShapingCommand {
    /// Shaping actions in force: rules that fired, and operator suspensions.
    List,
    /// End a shaping action now (its id from `list`).
    Cancel { id: String },
    /// Sites whose concurrency slow start or an action sets: connections
    /// allowed now, configured, open.
    Sites,
}

pub fn run_shaping(
    client: &Client,
    json: bool,
    cmd: ShapingCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let (value, render): (Value, Render) = match cmd {
        ShapingCommand::List => (client.call("GET", "/shaping/actions", &[])?, |v, o| {
            let actions = arr(&v["actions"]);
            if actions.is_empty() {
                return writeln!(o, "no shaping action in force");
            }
            for a in actions {
                let value = a["value"].as_str().unwrap_or_default();
                writeln!(
                    o,
                    "{} {} {}{} {} until {}{}",
                    s(&a["id"]),
                    s(&a["rule"]),
                    s(&a["action"]),
                    if value.is_empty() {
                        String::new()
                    } else {
                        format!("={value}")
                    },
                    s(&a["destination"]),
                    s(&a["until"]),
                    match a["reply"].as_str().unwrap_or_default() {
                        "" => String::new(),
                        r => format!(" after \"{r}\""),
                    }
                )?;
            }
            Ok(())
        }),
        ShapingCommand::Sites => (client.call("GET", "/shaping/sites", &[])?, |v, o| {
            let sites = arr(&v["sites"]);
            if sites.is_empty() {
                return writeln!(o, "no site under slow start or a connections action");
            }
            for x in sites {
                writeln!(
                    o,
                    "{} limit {} of {} open {} queued {} (core {})",
                    s(&x["site"]),
                    s(&x["limit"]),
                    s(&x["max"]),
                    s(&x["active"]),
                    s(&x["queued"]),
                    s(&x["core"])
                )?;
            }
            Ok(())
        }),
        ShapingCommand::Cancel { id } => (
            client.call(
                "POST",
                &format!("/shaping/actions/{}/cancel", enc(&id)),
                &[],
            )?,
            |v, o| {
                writeln!(
                    o,
                    "cancelled {} ({} {} on {})",
                    s(&v["action"]["id"]),
                    s(&v["action"]["rule"]),
                    s(&v["action"]["action"]),
                    s(&v["action"]["destination"])
                )
            },
        ),
    };
    emit(json, &value, render, out)
}

/// Why a call to the API failed.
enum CallError {
    /// Nothing listens there (the relay is not running): a read may fall back.
    Unreachable(anyhow::Error),
    /// It answered with an error, or the answer was unusable.
    Failed(anyhow::Error),
}

/// Where queue calls go: the relay's API, and/or the spool read here.
pub struct Client {
    /// Base URL and token (the token may be empty: the API then says 401).
    online: Option<(String, String)>,
    /// Spool to read when the API is not answering (or with --offline).
    offline: Option<PathBuf>,
    /// Why no token was found, told if the API asks for one.
    token_missing: Option<String>,
    /// The fallback note is printed once.
    noted: Cell<bool>,
}

impl Client {
    /// For `sluice destination …`: the running relay only.
    pub fn new(args: &ApiArgs, config: &Config) -> anyhow::Result<Client> {
        if args.offline {
            bail!("--offline: destination suspensions and the suppression list are served by the running relay");
        }
        Client::build(args, config, false)
    }

    /// For `sluice queue …`: the API, with the spool as the fallback for reads
    /// when the API address comes from the configuration.
    pub fn for_queue(
        args: &ApiArgs,
        config: &Config,
        cmd: &QueueCommand,
    ) -> anyhow::Result<Client> {
        let read = matches!(
            cmd,
            QueueCommand::Summary { .. }
                | QueueCommand::List { .. }
                | QueueCommand::Show { .. }
                | QueueCommand::Count
                | QueueCommand::Body { .. }
                | QueueCommand::Stats
        );
        if args.offline {
            if !read {
                bail!("--offline: queue actions need the running relay");
            }
            return Ok(Client {
                online: None,
                offline: Some(config.spool.path.clone()),
                token_missing: None,
                noted: Cell::new(true),
            });
        }
        Client::build(args, config, read && args.api.is_none())
    }

    fn build(args: &ApiArgs, config: &Config, fallback: bool) -> anyhow::Result<Client> {
        let offline = fallback.then(|| config.spool.path.clone());
        let base = match &args.api {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => {
                let listen = &config.admin.listen;
                if listen.is_empty() {
                    if offline.is_some() {
                        return Ok(Client {
                            online: None,
                            offline,
                            token_missing: None,
                            noted: Cell::new(true),
                        });
                    }
                    bail!("admin.listen is empty (the API is off); give --api URL");
                }
                let addr: std::net::SocketAddr = listen
                    .parse()
                    .with_context(|| format!("admin.listen {listen:?}"))?;
                // A wildcard listener is reached on loopback.
                let ip = if addr.ip().is_unspecified() {
                    match addr {
                        std::net::SocketAddr::V4(_) => "127.0.0.1".to_string(),
                        std::net::SocketAddr::V6(_) => "[::1]".to_string(),
                    }
                } else {
                    match addr {
                        std::net::SocketAddr::V4(a) => a.ip().to_string(),
                        std::net::SocketAddr::V6(a) => format!("[{}]", a.ip()),
                    }
                };
                format!("http://{ip}:{}", addr.port())
            }
        };
        let (token, token_missing) = match (&args.token_file, std::env::var(TOKEN_ENV)) {
            (Some(path), _) => (read_token(path)?, None),
            (None, Ok(t)) if !t.trim().is_empty() => (t.trim().to_string(), None),
            _ => match token_path(config) {
                Some(path) => match read_token(&path) {
                    Ok(t) => (t, None),
                    // Not fatal yet: the relay may not be running (the
                    // fallback needs no token), or may not want one.
                    Err(e) => (String::new(), Some(format!("{e:#}"))),
                },
                None => (
                    String::new(),
                    Some(format!(
                        "no API token: give --token-file, set {TOKEN_ENV}, or set admin.token_file"
                    )),
                ),
            },
        };
        Ok(Client {
            online: Some((base, token)),
            offline,
            token_missing,
            noted: Cell::new(false),
        })
    }

    /// The spool this client reads when it never asks the relay (`--offline`,
    /// or no API configured).
    fn spool_only(&self) -> Option<&Path> {
        self.online
            .is_none()
            .then_some(self.offline.as_deref())
            .flatten()
    }

    /// Calls the API (or answers a read from the spool); the JSON answer, or
    /// an error carrying the API's message.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<Value> {
        if let Some((base, token)) = &self.online {
            match self.call_online(base, token, method, path, query) {
                Ok(v) => return Ok(v),
                Err(CallError::Unreachable(e)) if self.offline.is_some() && method == "GET" => {
                    if !self.noted.replace(true) {
                        eprintln!("sluice: {e:#}; reading the spool instead");
                    }
                }
                Err(CallError::Unreachable(e) | CallError::Failed(e)) => return Err(e),
            }
        }
        let Some(spool_path) = &self.offline else {
            bail!("no API to call");
        };
        if method != "GET" {
            bail!("{method} {path}: the relay is not running; queue actions need it");
        }
        self.call_offline(spool_path, method, path, query)
    }

    fn call_online(
        &self,
        base: &str,
        token: &str,
        method: &str,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Value, CallError> {
        let url = format!("{base}/api/v1{path}");
        let mut req = ureq::request(method, &url)
            .timeout(TIMEOUT)
            .set("Authorization", &format!("Bearer {token}"));
        for (k, v) in query {
            req = req.query(k, v);
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let body: Value = r.into_json().unwrap_or(Value::Null);
                let msg = body["error"].as_str().unwrap_or("(no message)");
                let hint = match (&self.token_missing, code) {
                    (Some(why), 401) => format!(" ({why})"),
                    _ => String::new(),
                };
                return Err(CallError::Failed(anyhow!(
                    "{method} {path}: HTTP {code}: {msg}{hint}"
                )));
            }
            Err(ureq::Error::Transport(t)) if t.kind() == ureq::ErrorKind::ConnectionFailed => {
                return Err(CallError::Unreachable(anyhow!(
                    "the management API at {base} is not answering (is the relay running?)"
                )))
            }
            Err(e) => return Err(CallError::Failed(anyhow!("{url}: {e}"))),
        };
        resp.into_json::<Value>()
            .with_context(|| format!("{url}: the answer is not JSON"))
            .map_err(CallError::Failed)
    }

    /// A read answered by the API's own code over the spool opened read-only.
    fn call_offline(
        &self,
        spool_path: &Path,
        method: &str,
        path: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<Value> {
        let spool = open_spool(spool_path)?;
        let state = super::AdminState {
            token: None,
            metrics_auth: false,
            reload: None,
            api: super::api::ApiContext {
                spool: Some(Arc::new(spool)),
                cores: None,
                cluster: None,
                stop: None,
            },
        };
        let req = super::Request {
            method: method.to_string(),
            path: format!("/api/v1{path}"),
            query: query
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            body: Vec::new(),
        };
        let resp = super::api::handle(&state, &req);
        let body: Value = serde_json::from_slice(&resp.body).context("the answer is not JSON")?;
        if resp.status != 200 {
            let msg = body["error"].as_str().unwrap_or("(no message)");
            bail!("{method} {path}: {msg}");
        }
        Ok(body)
    }
}

fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the API token from {}", path.display()))?;
    Ok(text.trim().to_string())
}

fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn run_queue(
    client: &Client,
    config: &Config,
    json: bool,
    cmd: QueueCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let (value, render): (Value, Render) = match cmd {
        // The stored bytes and the commit counters are not in the API: read
        // here (LMDB readers are safe beside the running relay).
        QueueCommand::Body { id } => return print_body(&config.spool.path, &id, out),
        QueueCommand::Stats => return print_stats(&config.spool.path, out),
        // The spool's own count (the summary's `stored`): every envelope,
        // decodable or not. Offline it is read without walking the queue.
        QueueCommand::Count => {
            let messages = match client.spool_only() {
                Some(path) => Value::from(open_spool(path)?.count()?),
                None => client.call("GET", "/queue/summary", &[("top", "0".to_string())])?
                    ["stored"]
                    .take(),
            };
            (serde_json::json!({ "messages": messages }), |v, o| {
                writeln!(o, "{}", s(&v["messages"]))
            })
        }
        QueueCommand::Summary { top } => (
            client.call("GET", "/queue/summary", &[("top", top.to_string())])?,
            print_summary,
        ),
        QueueCommand::List {
            filter,
            limit,
            cursor,
        } => {
            let mut q = filter.query();
            q.push(("limit", limit.to_string()));
            if let Some(c) = cursor {
                q.push(("cursor", c));
            }
            (client.call("GET", "/queue/messages", &q)?, print_list)
        }
        QueueCommand::Show { id, body: false } => (
            client.call("GET", &format!("/queue/messages/{}", enc(&id)), &[])?,
            print_show,
        ),
        QueueCommand::Show { id, body: true } => {
            if json {
                bail!("--body prints the message bytes, which are not JSON: use `sluice queue body ID`");
            }
            let v = client.call("GET", &format!("/queue/messages/{}", enc(&id)), &[])?;
            print_show_fields(&v, out)?;
            writeln!(out, "*** MESSAGE CONTENTS ***")?;
            return print_body(&config.spool.path, &id, out);
        }
        QueueCommand::Retry(sel) => (act(client, "retry", &sel, &[])?, print_action),
        QueueCommand::Hold(sel) => (act(client, "hold", &sel, &[])?, print_action),
        QueueCommand::Release(sel) => (act(client, "release", &sel, &[])?, print_action),
        QueueCommand::Cancel { selection, drop } => {
            let mode = if drop { "drop" } else { "bounce" };
            (
                act(client, "cancel", &selection, &[("mode", mode.to_string())])?,
                print_action,
            )
        }
    };
    emit(json, &value, render, out)
}

fn act(
    client: &Client,
    verb: &str,
    sel: &Selection,
    extra: &[(&str, String)],
) -> anyhow::Result<Value> {
    match &sel.id {
        Some(id) => {
            if !sel.filter.query().is_empty() || sel.all {
                bail!("give a message id or a filter, not both");
            }
            client.call(
                "POST",
                &format!("/queue/messages/{}/{verb}", enc(id)),
                extra,
            )
        }
        None => {
            let mut q = sel.filter.query();
            if q.is_empty() && !sel.all {
                bail!("give a message id, a filter (--domain, --queue, …) or --all");
            }
            if sel.all {
                q.push(("all", "true".into()));
            }
            q.extend(extra.iter().cloned());
            client.call("POST", &format!("/queue/{verb}"), &q)
        }
    }
}

pub fn run_destination(
    client: &Client,
    json: bool,
    cmd: DestinationCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let (value, render): (Value, Render) = match cmd {
        DestinationCommand::Suspend {
            destination,
            duration,
        } => (
            client.call(
                "POST",
                &format!("/destinations/{}/suspend", enc(&destination)),
                &[("for", duration)],
            )?,
            |v, o| {
                writeln!(
                    o,
                    "{} suspended until {}",
                    s(&v["destination"]),
                    s(&v["until"])
                )
            },
        ),
        DestinationCommand::Resume { destination } => (
            client.call(
                "POST",
                &format!("/destinations/{}/resume", enc(&destination)),
                &[],
            )?,
            |v, o| {
                if v["resumed"].as_bool() == Some(true) {
                    writeln!(o, "{} resumed", s(&v["destination"]))
                } else {
                    writeln!(o, "{} was not suspended", s(&v["destination"]))
                }
            },
        ),
        DestinationCommand::List => (client.call("GET", "/destinations", &[])?, |v, o| {
            print_suspended(&v["suspended"], o)
        }),
    };
    emit(json, &value, render, out)
}

fn emit(json: bool, value: &Value, render: Render, out: &mut impl Write) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, value)?;
        writeln!(out)?;
    } else {
        render(value, out)?;
    }
    Ok(())
}

/// A JSON value as table text ("-" for null).
fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(t) if t.is_empty() => "<>".into(),
        Value::String(t) => t.clone(),
        other => other.to_string(),
    }
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn print_tallies(rows: &[Value], key: &str, o: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        o,
        "{:<32} {:>8} {:>12} {:>10} {:>8} {:>6}  OLDEST",
        key.to_uppercase(),
        "MESSAGES",
        "BYTES",
        "RECIPIENTS",
        "DEFERRED",
        "HELD"
    )?;
    for r in rows {
        writeln!(
            o,
            "{:<32} {:>8} {:>12} {:>10} {:>8} {:>6}  {}",
            s(&r[key]),
            s(&r["messages"]),
            s(&r["bytes"]),
            s(&r["recipients"]),
            s(&r["deferred"]),
            s(&r["held"]),
            s(&r["oldest"])
        )?;
    }
    Ok(())
}

fn print_summary(v: &Value, o: &mut dyn Write) -> std::io::Result<()> {
    let t = &v["total"];
    writeln!(
        o,
        "{} message(s), {} byte(s), {} recipient(s) to deliver; {} deferred, {} held",
        s(&t["messages"]),
        s(&t["bytes"]),
        s(&t["recipients"]),
        s(&t["deferred"]),
        s(&t["held"])
    )?;
    writeln!(o)?;
    print_tallies(arr(&v["queues"]), "queue", o)?;
    writeln!(o)?;
    print_tallies(arr(&v["destinations"]), "destination", o)?;
    if v["destinations_not_shown"].as_u64().unwrap_or(0) > 0 {
        writeln!(o, "… and {} more", s(&v["destinations_not_shown"]))?;
    }
    if !arr(&v["suspended"]).is_empty() {
        writeln!(o)?;
        print_suspended(&v["suspended"], o)?;
    }
    Ok(())
}

fn print_suspended(v: &Value, o: &mut dyn Write) -> std::io::Result<()> {
    if arr(v).is_empty() {
        return writeln!(o, "no destination is suspended");
    }
    writeln!(o, "{:<40} SUSPENDED UNTIL", "DESTINATION")?;
    for d in arr(v) {
        writeln!(o, "{:<40} {}", s(&d["destination"]), s(&d["until"]))?;
    }
    Ok(())
}

fn print_list(v: &Value, o: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        o,
        "{:<16} {:<8} {:>9} {:>4} {:<24} {:<30} RECIPIENTS",
        "ID", "STATUS", "SIZE", "TRY", "ARRIVAL", "SENDER"
    )?;
    for m in arr(&v["messages"]) {
        let rcpts: Vec<String> = arr(&m["recipients"])
            .iter()
            .map(|r| format!("{} ({})", s(&r["address"]), s(&r["status"])))
            .collect();
        writeln!(
            o,
            "{:<16} {:<8} {:>9} {:>4} {:<24} {:<30} {}",
            s(&m["id"]),
            s(&m["status"]),
            s(&m["size"]),
            s(&m["attempts"]),
            s(&m["arrival"]),
            s(&m["sender"]),
            rcpts.join(", ")
        )?;
        // Why it is still here: the last deferral reply.
        if let Some(e) = m["last_error"].as_str() {
            writeln!(o, "{:<16} last error: {e}", "")?;
        }
    }
    write!(o, "-- {} message(s) match", s(&v["total"]))?;
    if let Some(c) = v["next_cursor"].as_str() {
        write!(o, "; more with --cursor {c}")?;
    }
    writeln!(o)
}

/// A JSON value as a `key: value` line's value ("" for null).
fn plain(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(t) => t.clone(),
        other => other.to_string(),
    }
}

/// One recipient of `queue show`: address, DSN parameters, then its state in
/// brackets with the attempts and the reply that set it.
fn recipient_line(r: &Value) -> String {
    let mut line = format!("recipient: <{}>", plain(&r["address"]));
    if let Some(o) = r["orcpt"].as_str() {
        line.push_str(&format!(" orcpt=rfc822;{o}"));
    }
    let notify: Vec<String> = arr(&r["notify"]).iter().map(plain).collect();
    if !notify.is_empty() {
        line.push_str(&format!(" notify={}", notify.join(",")));
    }
    if r["local"].as_bool() == Some(true) {
        line.push_str(" local");
    }
    line.push_str(&format!(" [{}", plain(&r["status"])));
    if r["status"] == "deferred" {
        line.push_str(&format!(" ({} attempts)", plain(&r["attempts"])));
    }
    if let Some(class) = r["class"].as_str() {
        line.push_str(&format!(" class={class}"));
    }
    if let Some(reply) = r["last_reply"].as_str() {
        line.push_str(&format!(": {reply}"));
    }
    line.push(']');
    line
}

/// `queue show` without the message: one `key: value` line per field (keys
/// without a value are printed empty, so a grep finds every key; hold_until,
/// deliver_by and last_error only when there is one).
fn print_show_fields(m: &Value, o: &mut dyn Write) -> std::io::Result<()> {
    let mut line = |key: &str, value: String| writeln!(o, "{key}: {value}");
    line("id", plain(&m["id"]))?;
    line("status", plain(&m["status"]))?;
    line("arrival", plain(&m["arrival"]))?;
    line("sender", format!("<{}>", plain(&m["sender"])))?;
    for r in arr(&m["recipients"]) {
        writeln!(o, "{}", recipient_line(r))?;
    }
    let mut line = |key: &str, value: String| writeln!(o, "{key}: {value}");
    for key in ["ret", "envid", "body_type", "smtputf8", "listener"] {
        line(key, plain(&m[key]))?;
    }
    line(
        "client_ip",
        match &m["client_ip"] {
            Value::Null => "(none: written by the relay)".into(),
            ip => plain(ip),
        },
    )?;
    for key in ["helo", "auth_user", "tls", "size", "priority", "queue"] {
        line(key, plain(&m[key]))?;
    }
    if !m["hold_until"].is_null() {
        line("hold_until", plain(&m["hold_until"]))?;
    }
    line(
        "held",
        if m["held"].as_bool() == Some(true) {
            "yes (by the operator)".into()
        } else {
            "no".into()
        },
    )?;
    if !m["deliver_by"].is_null() {
        let by = &m["deliver_by_request"];
        line(
            "deliver_by",
            format!(
                "{} (BY={};{}{})",
                plain(&m["deliver_by"]),
                plain(&by["seconds"]),
                plain(&by["mode"]),
                if by["trace"].as_bool() == Some(true) {
                    ", trace"
                } else {
                    ""
                }
            ),
        )?;
    }
    line("attempts", plain(&m["attempts"]))?;
    line(
        "next_attempt",
        match &m["next_attempt"] {
            Value::Null => "(held)".into(),
            t => plain(t),
        },
    )?;
    if !m["last_error"].is_null() {
        line("last_error", plain(&m["last_error"]))?;
    }
    line("delay_notices", plain(&m["delay_notices"]))?;
    if m["tls_request"].as_str().is_some_and(|r| r != "policy") {
        line("tls_request", plain(&m["tls_request"]))?;
    }
    if !m["tenant"].is_null() {
        line("tenant", plain(&m["tenant"]))?;
    }
    Ok(())
}

fn print_show(m: &Value, o: &mut dyn Write) -> std::io::Result<()> {
    print_show_fields(m, o)?;
    writeln!(o, "*** HEADERS ***")?;
    o.write_all(m["headers"].as_str().unwrap_or("").as_bytes())?;
    if m["headers_truncated"].as_bool() == Some(true) {
        writeln!(o, "[headers truncated]")?;
    }
    Ok(())
}

fn open_spool(path: &Path) -> anyhow::Result<sluice_spool::Spool> {
    sluice_spool::Spool::open_readonly(path)
        .with_context(|| format!("opening spool at {}", path.display()))
}

/// One message's bytes exactly as stored (for tools and tests).
fn print_body(path: &Path, id: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let spool = open_spool(path)?;
    let id: sluice_spool::MessageId = id
        .parse()
        .with_context(|| format!("`{id}` is not a message id"))?;
    spool.with_body(id, |body| out.write_all(body))??;
    Ok(())
}

/// Lifetime counters: group commit shows as commits far below messages.
fn print_stats(path: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let spool = open_spool(path)?;
    let st = spool.stats()?;
    writeln!(out, "messages_stored {}", st.messages)?;
    writeln!(out, "commits {}", st.commits)?;
    writeln!(out, "queued {}", spool.count()?)?;
    Ok(())
}

fn print_action(v: &Value, o: &mut dyn Write) -> std::io::Result<()> {
    if let Some(id) = v["id"].as_str() {
        return writeln!(o, "{}: {id}", s(&v["action"]));
    }
    writeln!(
        o,
        "{}: {} matched, {} done, {} skipped{}",
        s(&v["action"]),
        s(&v["matched"]),
        arr(&v["done"]).len(),
        arr(&v["skipped"]).len(),
        if v["truncated"].as_bool() == Some(true) {
            " (only the first 10000 were acted on; run again)"
        } else {
            ""
        }
    )?;
    for sk in arr(&v["skipped"]) {
        writeln!(o, "  skipped {}: {}", s(&sk["id"]), s(&sk["reason"]))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(enc("route:smart"), "route:smart");
        assert_eq!(enc("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn tables_render() {
        let v = serde_json::json!({
            "total": 2, "next_cursor": "00000000000000ff",
            "messages": [{"id": "00000000000000ff", "status": "held", "size": 10,
                "attempts": 0, "arrival": "2026-01-01T00:00:00.000Z", "sender": "",
                "recipients": [{"address": "b@x.test", "status": "pending"}]},
                {"id": "0000000000000100", "status": "deferred", "size": 10,
                "attempts": 2, "arrival": "2026-01-01T00:00:00.000Z", "sender": "a@y.test",
                "last_error": "451 4.4.1 mx.x.test [192.0.2.9]: connection refused",
                "recipients": [{"address": "c@x.test", "status": "deferred"}]}]
        });
        let mut out = Vec::new();
        print_list(&v, &mut out).expect("render");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains("00000000000000ff held"), "{text}");
        assert!(text.contains("b@x.test (pending)"), "{text}");
        assert!(text.contains("--cursor 00000000000000ff"), "{text}");
        // The deferral reason is on the line after its message, and only there.
        let lines: Vec<&str> = text.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.starts_with("0000000000000100 deferred"))
            .expect("deferred message listed");
        assert_eq!(
            lines[at + 1].trim(),
            "last error: 451 4.4.1 mx.x.test [192.0.2.9]: connection refused",
            "{text}"
        );
        assert_eq!(text.matches("last error:").count(), 1, "{text}");
    }

    #[test]
    fn show_is_key_value_lines() {
        let v = serde_json::json!({
            "id": "00000000000000ff", "status": "held", "sender": "",
            "arrival": "2026-01-01T00:00:00.000Z", "queue": "bulk", "size": 10,
            "priority": -3, "attempts": 2, "next_attempt": null, "held": true,
            "last_error": "451 4.4.1 later",
            "hold_until": "2026-01-02T00:00:00.000Z",
            "deliver_by": "2026-01-03T00:00:00.000Z",
            "deliver_by_request": {"seconds": 60, "mode": "R", "trace": true},
            "ret": "Headers", "envid": null, "body_type": "EightBitMime",
            "smtputf8": true, "listener": "smtp", "client_ip": null, "helo": "h",
            "auth_user": null, "tls": null, "delay_notices": 1,
            "headers": "Subject: s\r\n", "headers_truncated": true,
            "recipients": [
                {"address": "b@x.test", "status": "deferred", "attempts": 2,
                 "last_reply": "451 4.4.1 later", "orcpt": "o@y.test",
                 "notify": ["SUCCESS", "DELAY"], "local": true},
                {"address": "c@x.test", "status": "delivered", "attempts": 0,
                 "last_reply": "250 ok", "orcpt": null, "notify": [], "local": false},
                {"address": "d@x.test", "status": "pending", "attempts": 0,
                 "last_reply": null, "orcpt": null, "notify": [], "local": false}]
        });
        let mut out = Vec::new();
        print_show(&v, &mut out).expect("render");
        let text = String::from_utf8(out).expect("utf8");
        for line in [
            "status: held",
            "sender: <>",
            "recipient: <b@x.test> orcpt=rfc822;o@y.test notify=SUCCESS,DELAY local [deferred (2 attempts): 451 4.4.1 later]",
            "recipient: <c@x.test> [delivered: 250 ok]",
            "recipient: <d@x.test> [pending]",
            "ret: Headers",
            "envid: ",
            "client_ip: (none: written by the relay)",
            "tls: ",
            "priority: -3",
            "hold_until: 2026-01-02T00:00:00.000Z",
            "held: yes (by the operator)",
            "deliver_by: 2026-01-03T00:00:00.000Z (BY=60;R, trace)",
            "next_attempt: (held)",
            "last_error: 451 4.4.1 later",
            "delay_notices: 1",
            "*** HEADERS ***",
            "Subject: s",
            "[headers truncated]",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        // Every field line is `key: value`, until the headers.
        for l in text.lines().take_while(|l| !l.starts_with("***")) {
            assert!(l.contains(": "), "{l:?}");
        }
    }

    #[test]
    fn config_file_is_found_by_flag_then_environment_then_default_path() {
        let yes = |_: &Path| true;
        let no = |_: &Path| false;
        let flag = Some(PathBuf::from("/x/flag.toml"));
        let env = Some(OsString::from("/x/env.toml"));
        assert_eq!(config_path(flag.clone(), env.clone(), yes), flag, "-c wins");
        assert_eq!(
            config_path(None, env.clone(), yes),
            Some(PathBuf::from("/x/env.toml"))
        );
        assert_eq!(
            config_path(None, Some(OsString::new()), yes),
            Some(PathBuf::from(DEFAULT_CONFIG)),
            "an empty SLUICE_CONFIG is unset"
        );
        assert_eq!(config_path(None, None, no), None, "built-in defaults");
    }

    #[test]
    fn local_token_is_made_once_private_and_found_by_the_cli() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = dir.path().join("spool");
        let config = Config::load(
            "t",
            &format!("[spool]\npath = {:?}\n", spool.display().to_string()),
            &[],
        )
        .expect("config");
        let path = spool.join(LOCAL_TOKEN_FILE);
        assert_eq!(token_path(&config), Some(path.clone()));
        assert_eq!(
            ensure_local_token(&config).expect("create"),
            LocalToken::Created(path.clone())
        );
        let token = read_token(&path).expect("read");
        assert_eq!(token.len(), 64, "{token}");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            ensure_local_token(&config).expect("again"),
            LocalToken::Existing(path.clone())
        );
        assert_eq!(read_token(&path).expect("read"), token, "not replaced");

        // A configured token file, or no API: nothing is made.
        let off = Config::load("t", "[admin]\nlisten = \"\"\n", &[]).expect("config");
        assert_eq!(token_path(&off), None);
        assert_eq!(ensure_local_token(&off).expect("off"), LocalToken::NotUsed);
    }
}
