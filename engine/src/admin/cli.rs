//! `sluice queue …` and `sluice destination …`: a command line over the
//! management API (`api`). Human tables by default, `--json` prints the API's
//! answer as it is; a refused call exits non-zero with the API's message.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::config::Config;

/// The environment variable holding the API token (instead of a file).
pub const TOKEN_ENV: &str = "SLUICE_API_TOKEN";
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
    /// File holding the bearer token (default: admin.token_file, or $SLUICE_API_TOKEN).
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON answer.
    #[arg(long, global = true)]
    pub json: bool,
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
        /// Messages per page.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Continue after this id (the previous page's next_cursor).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show one message: envelope, recipients, schedule, headers.
    Show { id: String },
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

/// An API connection: base URL and token.
pub struct Client {
    base: String,
    token: String,
}

impl Client {
    /// From the command line, the environment and the configuration.
    pub fn new(args: &ApiArgs, config: &Config) -> anyhow::Result<Client> {
        let base = match &args.api {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => {
                let listen = &config.admin.listen;
                if listen.is_empty() {
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
        let token = match (&args.token_file, std::env::var(TOKEN_ENV)) {
            (Some(path), _) => read_token(path)?,
            (None, Ok(t)) if !t.trim().is_empty() => t.trim().to_string(),
            _ => match &config.admin.token_file {
                Some(path) => read_token(path)?,
                None => bail!(
                    "no API token: give --token-file, set {TOKEN_ENV}, or set admin.token_file"
                ),
            },
        };
        Ok(Client { base, token })
    }

    /// Calls the API; the JSON answer, or an error carrying the API's message.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1{path}", self.base);
        let mut req = ureq::request(method, &url)
            .timeout(TIMEOUT)
            .set("Authorization", &format!("Bearer {}", self.token));
        for (k, v) in query {
            req = req.query(k, v);
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let body: Value = r.into_json().unwrap_or(Value::Null);
                let msg = body["error"].as_str().unwrap_or("(no message)");
                bail!("{method} {path}: HTTP {code}: {msg}");
            }
            Err(e) => return Err(anyhow!("{url}: {e}")),
        };
        resp.into_json::<Value>()
            .with_context(|| format!("{url}: the answer is not JSON"))
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
    json: bool,
    cmd: QueueCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let (value, render): (Value, Render) = match cmd {
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
        QueueCommand::Show { id } => (
            client.call("GET", &format!("/queue/messages/{}", enc(&id)), &[])?,
            print_show,
        ),
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
    }
    write!(o, "-- {} message(s) match", s(&v["total"]))?;
    if let Some(c) = v["next_cursor"].as_str() {
        write!(o, "; more with --cursor {c}")?;
    }
    writeln!(o)
}

fn print_show(m: &Value, o: &mut dyn Write) -> std::io::Result<()> {
    for key in [
        "id",
        "status",
        "sender",
        "queue",
        "size",
        "arrival",
        "attempts",
        "next_attempt",
        "last_error",
        "hold_until",
        "deliver_by",
        "priority",
        "listener",
        "client_ip",
        "helo",
        "auth_user",
        "tls",
    ] {
        writeln!(o, "{key:<13} {}", s(&m[key]))?;
    }
    for r in arr(&m["recipients"]) {
        write!(
            o,
            "{:<13} {} [{}",
            "recipient",
            s(&r["address"]),
            s(&r["status"])
        )?;
        if r["attempts"].as_u64().unwrap_or(0) > 0 {
            write!(o, ", {} attempt(s)", s(&r["attempts"]))?;
        }
        if let Some(e) = r["last_error"].as_str() {
            write!(o, ": {e}")?;
        }
        writeln!(o, "]")?;
    }
    writeln!(o, "--- headers ---")?;
    o.write_all(m["headers"].as_str().unwrap_or("").as_bytes())?;
    if m["headers_truncated"].as_bool() == Some(true) {
        writeln!(o, "[headers truncated]")?;
    }
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
                "recipients": [{"address": "b@x.test", "status": "pending"}]}]
        });
        let mut out = Vec::new();
        print_list(&v, &mut out).expect("render");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains("00000000000000ff held"), "{text}");
        assert!(text.contains("b@x.test (pending)"), "{text}");
        assert!(text.contains("--cursor 00000000000000ff"), "{text}");
    }
}
