//! The `sluice` command line.

use std::io::{self, BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_engine::config::{Config, LogFormat, EXAMPLE_CONFIG};

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
    /// Configuration file (TOML). Without it, the built-in defaults (see sluice.toml).
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
    CheckConfig {
        file: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Offline views of the spool (the relay may be running).
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
    /// The running relay's queue, through the management API.
    Queue {
        #[command(subcommand)]
        action: sluice_engine::admin::cli::QueueCommand,
        #[command(flatten)]
        api: sluice_engine::admin::cli::ApiArgs,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Suspend or resume delivery to a destination, through the management API.
    Destination {
        #[command(subcommand)]
        action: sluice_engine::admin::cli::DestinationCommand,
        #[command(flatten)]
        api: sluice_engine::admin::cli::ApiArgs,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// What the relay sees in DNS: routes and single lookups (uses [dns]).
    Debug {
        #[command(subcommand)]
        action: sluice_engine::debug_cmd::DebugCommand,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// List queued messages with their recipients.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one message: envelope and contents.
    Show { id: String },
    /// Print one message's stored bytes exactly.
    Body { id: String },
    /// Number of queued messages.
    Count,
    /// Lifetime counters: messages stored and commits (group commit shows as commits << messages).
    Stats,
}

fn load(args: &ConfigArgs) -> anyhow::Result<Config> {
    let (origin, text) = match &args.config {
        Some(path) => (
            path.display().to_string(),
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => ("built-in defaults".to_string(), String::new()),
    };
    Ok(Config::load(&origin, &text, &args.set)?)
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
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
            let config = load(&args)?;
            init_logging(&config);
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
                path: args
                    .config
                    .as_ref()
                    .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())),
                overrides: args.set.clone(),
            };
            sluice_engine::runtime::run(config, source)
        }
        Command::CheckConfig { file, set } => {
            let config = load(&ConfigArgs {
                config: Some(file.clone()),
                set,
            })?;
            for (name, l) in &config.server.listener {
                if let (Some(cert), Some(key)) = (&l.tls_cert, &l.tls_key) {
                    sluice_engine::tls::server_config(cert, key)
                        .with_context(|| format!("server.listener.{name}"))?;
                }
            }
            writeln!(out, "{}: ok", file.display())?;
            Ok(())
        }
        Command::Spool { action, config } => {
            let config = load(&config)?;
            let path = &config.spool.path;
            match action {
                SpoolCommand::List { json } => {
                    sluice_engine::spool_view::list(path, json, &mut out)
                }
                SpoolCommand::Show { id } => sluice_engine::spool_view::show(path, &id, &mut out),
                SpoolCommand::Body { id } => sluice_engine::spool_view::body(path, &id, &mut out),
                SpoolCommand::Count => sluice_engine::spool_view::count(path, &mut out),
                SpoolCommand::Stats => sluice_engine::spool_view::stats(path, &mut out),
            }
        }
        Command::HashPassword => {
            let mut line = String::new();
            io::stdin().lock().read_line(&mut line)?;
            let password = line.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!password.is_empty(), "no password on stdin");
            writeln!(out, "{}", sluice_policy::hash_password(password)?)?;
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
            let client = sluice_engine::admin::cli::Client::new(&api, &config)?;
            sluice_engine::admin::cli::run_queue(&client, api.json, action, &mut out)
        }
        Command::Destination {
            action,
            api,
            config,
        } => {
            let config = load(&config)?;
            let client = sluice_engine::admin::cli::Client::new(&api, &config)?;
            sluice_engine::admin::cli::run_destination(&client, api.json, action, &mut out)
        }
        Command::Debug { action, config } => {
            let config = load(&config)?;
            sluice_engine::debug_cmd::run(&config, action, &mut out)
        }
    }
}
