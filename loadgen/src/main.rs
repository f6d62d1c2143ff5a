//! `sluice-loadgen`: the SMTP load source (`send`) and the counting, fault-injecting
//! SMTP/LMTP sink (`sink`) used by the benchmarks and the integration tests.

use clap::{Parser, Subcommand};

mod send;
mod sink;

#[derive(Parser)]
#[command(
    name = "sluice-loadgen",
    version,
    about = "SMTP load generator and sink for sluice"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send messages to an SMTP server and report throughput and latency.
    Send(Box<send::SendArgs>),
    /// Accept and count SMTP/LMTP messages, with fault injection; stats as JSON.
    Sink(Box<sink::SinkArgs>),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Send(args) => send::send(*args),
        Command::Sink(args) => sink::run(*args),
    }
}
