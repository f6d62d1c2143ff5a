//! The `sluice` command line.

use std::io::{self, BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_engine::admin::cli::{self as admin_cli, LocalToken};
use sluice_engine::config::{Config, EXAMPLE_CONFIG};

// glibc's malloc grows slower as the heap fragments: with 1M messages held,
// `_int_malloc` took three times its share of a core thread. mimalloc keeps
// free lists per thread and per size class, which suits one thread per core.
// Its version 2 (feature `v2`) hands freed pages back after 10 ms; version 3
// keeps them a second, which broke the body budget's RssAnon bound
// (tests/abuse.rs) while a flood of large bodies was being discarded.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "sluice: a thread-per-core SMTP relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ConfigArgs {
    /// Configuration file (TOML). Default: $SLUICE_CONFIG, else
    /// /etc/sluice/sluice.toml when it exists, else the built-in defaults (see sluice.toml).
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    /// Override a key by dotted path, e.g. --set server.cores=1 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    set: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Run(ConfigArgs),
    /// Validate a configuration file (and any --set overrides) and exit.
    ///
    /// With --changes OLD: also print what going from OLD to FILE needs, on the
    /// first line `restart`, `reload` or `none`, then the keys.
    CheckConfig {
        file: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// The configuration now in force (e.g. the file before an update).
        #[arg(long, value_name = "OLD")]
        changes: Option<PathBuf>,
    },
    /// Deprecated: `sluice queue … --offline`, under its old name.
    ///
    /// Each subcommand runs the `queue` one with --offline (`show` with
    /// --body) and prints the same output, with a note on stderr. Use
    /// `sluice queue …`: it asks the running relay, or reads the spool when
    /// the relay is not running.
    Spool {
        #[command(subcommand)]
        action: SpoolCommand,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Read a password on stdin and print its argon2id hash for [auth.users].
    HashPassword,
    /// Print the example configuration (every key, with defaults).
    ExampleConfig,
    /// The queue: from the running relay, or from the spool when it is not running.
    ///
    /// Reads go to the management API; when it refuses the connection (or with
    /// --offline) they read the spool, with the same output. Actions need the relay.
    Queue {
        #[command(subcommand)]
        action: admin_cli::QueueCommand,
        #[command(flatten)]
        api: admin_cli::ApiArgs,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Suspend or resume delivery to a destination, through the management API.
    Destination {
        #[command(subcommand)]
        action: admin_cli::DestinationCommand,
        #[command(flatten)]
        api: admin_cli::ApiArgs,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// TLS reporting (RFC 8460), through the management API.
    TlsRpt {
        #[command(subcommand)]
        action: admin_cli::TlsRptCommand,
        #[command(flatten)]
        api: admin_cli::ApiArgs,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// The suppression list (recipients refused after a hard bounce), through
    /// the management API.
    Suppression {
        #[command(subcommand)]
        action: admin_cli::SuppressionCommand,
        #[command(flatten)]
        api: admin_cli::ApiArgs,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Auto-bans (addresses refused at connect), through the management API.
    Ban {
        #[command(subcommand)]
        action: admin_cli::BanCommand,
        #[command(flatten)]
        api: admin_cli::ApiArgs,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Shaping actions in force (rules that fired, operator suspensions),
    /// through the management API.
    Shaping {
        #[command(subcommand)]
        action: admin_cli::ShapingCommand,
        #[command(flatten)]
        api: admin_cli::ApiArgs,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Cluster mode: the nodes, epochs, leases and queue per node, as the
    /// cluster engine (`[cluster] engine`) has them.
    Cluster {
        #[command(subcommand)]
        action: ClusterCommand,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// DKIM keys.
    Dkim {
        #[command(subcommand)]
        action: DkimCommand,
    },
    /// What the relay sees in DNS (routes, single lookups) and which TLS policy a
    /// destination gets (uses [dns], [delivery], [route.*], [[rule]]).
    Debug {
        #[command(subcommand)]
        action: sluice_engine::debug_cmd::DebugCommand,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// The old offline spellings, each now its `sluice queue … --offline`.
#[derive(Subcommand)]
enum ClusterCommand {
    /// Every node: epoch, state, lease left, messages queued, who took it over.
    Status {
        /// JSON, as `GET /api/v1/cluster` answers (without `local`).
        #[arg(long)]
        json: bool,
    },
    /// Take this node (cluster.node_id) out of the cluster: the running relay
    /// stops accepting and stops, syncs its last changes, and is marked `left`;
    /// the other nodes take over the mail it still holds at their next sweep.
    /// Starting it again with cluster.enabled rejoins it.
    Leave {
        /// Seconds to wait for the engine to show the node `left`.
        #[arg(long, default_value_t = 120)]
        wait: u64,
        #[command(flatten)]
        api: admin_cli::ApiArgs,
    },
}

#[derive(Subcommand)]
enum DkimCommand {
    /// Make a signing key: writes DIR/DOMAIN.SELECTOR.pem (PKCS#8, mode 0600,
    /// never over an existing file) and prints the DNS TXT record to publish.
    Keygen {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: String,
        #[arg(long, value_enum, default_value = "rsa")]
        algorithm: KeyAlgorithm,
        /// RSA modulus size (2048 ..= 8192).
        #[arg(long, default_value_t = 2048)]
        bits: usize,
        /// Directory for the private key.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KeyAlgorithm {
    Rsa,
    Ed25519,
}

/// `sluice dkim keygen`: the key file, then the record on stdout.
fn dkim_keygen(
    domain: &str,
    selector: &str,
    algorithm: KeyAlgorithm,
    bits: usize,
    dir: &std::path::Path,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    use sluice_policy::dkim::{generate_key, txt_record, SigningAlgorithm};
    use std::os::unix::fs::OpenOptionsExt;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let selector = selector.trim_end_matches('.').to_ascii_lowercase();
    for (what, name) in [("--domain", &domain), ("--selector", &selector)] {
        anyhow::ensure!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'),
            "{what} {name:?}: letters, digits, '-' and '.' only"
        );
    }
    let algorithm = match algorithm {
        KeyAlgorithm::Rsa => SigningAlgorithm::RsaSha256,
        KeyAlgorithm::Ed25519 => SigningAlgorithm::Ed25519Sha256,
    };
    let key = generate_key(algorithm, bits)?;
    let path = dir.join(format!("{domain}.{selector}.pem"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(key.private_pem.as_bytes())?;
    file.sync_all()?;
    eprintln!("private key written to {}", path.display());
    writeln!(
        out,
        "{}",
        txt_record(&selector, &domain, algorithm, &key.public_key)
    )?;
    Ok(())
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// `sluice queue list --offline`.
    List {
        #[arg(long)]
        json: bool,
    },
    /// `sluice queue show ID --body --offline`.
    Show { id: String },
    /// `sluice queue body ID --offline`.
    Body { id: String },
    /// `sluice queue count --offline`.
    Count,
    /// `sluice queue stats --offline`.
    Stats,
}

impl SpoolCommand {
    /// The `queue` command this spelling stands for, and whether it prints JSON.
    fn into_queue(self) -> (admin_cli::QueueCommand, bool) {
        use admin_cli::QueueCommand as Q;
        match self {
            SpoolCommand::List { json } => (
                Q::List {
                    filter: Default::default(),
                    limit: admin_cli::DEFAULT_LIST_LIMIT,
                    cursor: None,
                },
                json,
            ),
            SpoolCommand::Show { id } => (Q::Show { id, body: true }, false),
            SpoolCommand::Body { id } => (Q::Body { id }, false),
            SpoolCommand::Count => (Q::Count, false),
            SpoolCommand::Stats => (Q::Stats, false),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            SpoolCommand::List { .. } => "list",
            SpoolCommand::Show { .. } => "show ID --body",
            SpoolCommand::Body { .. } => "body ID",
            SpoolCommand::Count => "count",
            SpoolCommand::Stats => "stats",
        }
    }
}

/// The configuration file a command uses: `-c`, else `$SLUICE_CONFIG`, else
/// /etc/sluice/sluice.toml when it exists, else none (built-in defaults).
fn config_path(args: &ConfigArgs) -> Option<PathBuf> {
    admin_cli::config_path(
        args.config.clone(),
        std::env::var_os(admin_cli::CONFIG_ENV),
        |p| p.exists(),
    )
}

fn load_from(path: Option<&std::path::Path>, set: &[String]) -> anyhow::Result<Config> {
    let (origin, text) = match path {
        Some(path) => (
            path.display().to_string(),
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => ("built-in defaults".to_string(), String::new()),
    };
    Ok(Config::load(&origin, &text, set)?)
}

/// A client of the running relay's operations API, addressed by the config.
fn api_client(api: &admin_cli::ApiArgs, config: &ConfigArgs) -> anyhow::Result<admin_cli::Client> {
    admin_cli::Client::new(api, &load(config)?)
}

fn load(args: &ConfigArgs) -> anyhow::Result<Config> {
    load_from(config_path(args).as_deref(), &args.set)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match cli.command {
        Command::Run(args) => {
            let path = config_path(&args);
            let config = load_from(path.as_deref(), &args.set)?;
            // Flushes buffered log lines when `run` returns (SIGTERM included).
            let _log_guard = sluice_engine::logging::init(&config);
            tracing::info!(
                config = %path.as_ref().map_or("built-in defaults".into(), |p| p.display().to_string()),
                "configuration loaded"
            );
            match admin_cli::ensure_local_token(&config) {
                Ok(LocalToken::Created(token)) => tracing::info!(
                    path = %token.display(),
                    "created the management API token (admin.token_file is unset); `sluice queue` reads it"
                ),
                Ok(_) => {}
                // Mail does not depend on it: the API answers 401 instead.
                Err(e) => tracing::warn!("no management API token: {e:#}"),
            }
            // One descriptor per connection: use all the open files allowed.
            match sluice_engine::limits::raise_nofile() {
                Ok(c) => tracing::info!(
                    soft_before = c.before,
                    soft = c.after,
                    hard = c.hard,
                    "open files limit (RLIMIT_NOFILE) raised to the hard limit"
                ),
                Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
            }
            // Reloads (SIGHUP, the API) read the same file with the same --set.
            let source = sluice_engine::reload::ConfigSource {
                path: path
                    .as_ref()
                    .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())),
                overrides: args.set.clone(),
            };
            sluice_engine::runtime::run(config, source)
        }
        Command::CheckConfig { file, set, changes } => {
            let config = load_from(Some(&file), &set)?;
            for (name, l) in &config.server.listener {
                if let (Some(cert), Some(key)) = (&l.tls_cert, &l.tls_key) {
                    sluice_engine::tls::server_config(cert, key)
                        .with_context(|| format!("server.listener.{name}"))?;
                }
            }
            // The DKIM keys load as the relay would load them.
            config.dkim_policy()?;
            // So do the bounce classification rules.
            sluice_engine::bounce::load(config.delivery.bounce_rules.as_deref())
                .map_err(anyhow::Error::msg)?;
            // So does the outbound CA file.
            sluice_engine::delivery::outbound::OutboundTlsConfig::new(
                config.delivery.tls_ca_file.as_deref(),
                &config.route,
            )
            .context("delivery.tls_ca_file / route.*.tls_client_cert")?;
            let Some(old) = changes else {
                writeln!(out, "{}: ok", file.display())?;
                return Ok(());
            };
            // The running file may not load with this binary (a key it no
            // longer knows): only a restart is sure to apply the new one.
            let diff = match load_from(Some(&old), &set) {
                Ok(running) => sluice_engine::reload::changes(&running, &config),
                Err(e) => sluice_engine::reload::Changes {
                    reload: Vec::new(),
                    restart: vec![format!("{} does not load: {e:#}", old.display())],
                },
            };
            write!(out, "{diff}")?;
            Ok(())
        }
        Command::Spool { action, config } => {
            eprintln!(
                "sluice: `sluice spool` is deprecated; use `sluice queue {} --offline` (the same output)",
                action.name()
            );
            let config = load(&config)?;
            let (action, json) = action.into_queue();
            let api = admin_cli::ApiArgs {
                api: None,
                token_file: None,
                json,
                offline: true,
            };
            let client = admin_cli::Client::for_queue(&api, &config, &action)?;
            admin_cli::run_queue(&client, &config, json, action, &mut out)
        }
        Command::HashPassword => {
            let mut line = String::new();
            io::stdin().lock().read_line(&mut line)?;
            let password = line.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!password.is_empty(), "no password on stdin");
            writeln!(out, "{}", sluice_policy::hash_password(password)?)?;
            Ok(())
        }
        Command::Cluster {
            action: ClusterCommand::Leave { wait, api },
            config,
        } => {
            let cfg = load_from(config_path(&config).as_deref(), &config.set)?;
            anyhow::ensure!(
                cfg.cluster.enabled,
                "cluster.enabled is false in this configuration"
            );
            let client = admin_cli::Client::new(&api, &cfg)?;
            client.call("POST", "/cluster/leave", &[])?;
            let node = sluice_engine::cluster_io::wait_left(
                &cfg.cluster.settings(),
                std::time::Duration::from_secs(wait),
            )?;
            if api.json {
                let v = sluice_engine::cluster_io::status_json(std::slice::from_ref(&node), None);
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                writeln!(
                    out,
                    "{} left the cluster (epoch {}); {} message(s) of it go to the other nodes",
                    node.node_id, node.epoch, node.queued
                )?;
            }
            Ok(())
        }
        Command::Cluster {
            action: ClusterCommand::Status { json },
            config,
        } => {
            let cfg = load_from(config_path(&config).as_deref(), &config.set)?;
            anyhow::ensure!(
                cfg.cluster.enabled,
                "cluster.enabled is false in this configuration"
            );
            let nodes = sluice_cluster::status_blocking(&cfg.cluster.settings())?;
            if json {
                let v = sluice_engine::cluster_io::status_json(&nodes, None);
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                out.write_all(sluice_engine::cluster_io::status_text(&nodes).as_bytes())?;
            }
            Ok(())
        }
        Command::ExampleConfig => {
            out.write_all(EXAMPLE_CONFIG.as_bytes())?;
            Ok(())
        }
        Command::Queue {
            action,
            api,
            config,
        } => {
            let config = load(&config)?;
            let client = admin_cli::Client::for_queue(&api, &config, &action)?;
            admin_cli::run_queue(&client, &config, api.json, action, &mut out)
        }
        Command::Destination {
            action,
            api,
            config,
        } => admin_cli::run_destination(&api_client(&api, &config)?, api.json, action, &mut out),
        Command::TlsRpt {
            action,
            api,
            config,
        } => admin_cli::run_tls_rpt(&api_client(&api, &config)?, api.json, action, &mut out),
        Command::Suppression {
            action,
            api,
            config,
        } => admin_cli::run_suppression(&api_client(&api, &config)?, api.json, action, &mut out),
        Command::Ban {
            action,
            api,
            config,
        } => admin_cli::run_ban(&api_client(&api, &config)?, api.json, action, &mut out),
        Command::Shaping {
            action,
            api,
            config,
        } => admin_cli::run_shaping(&api_client(&api, &config)?, api.json, action, &mut out),
        Command::Debug { action, config } => {
            let config = load(&config)?;
            sluice_engine::debug_cmd::run(&config, action, &mut out)
        }
        Command::Dkim {
            action:
                DkimCommand::Keygen {
                    domain,
                    selector,
                    algorithm,
                    bits,
                    out: dir,
                },
        } => dkim_keygen(&domain, &selector, algorithm, bits, &dir, &mut out),
    }
}
