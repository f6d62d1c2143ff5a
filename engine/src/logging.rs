//! Log output for `sluice run`: text or JSON lines on stderr, written by one
//! thread of their own so executors never wait on the stderr lock or a slow
//! reader (journald, a pipe, a full disk) while they serve connections.
//!
//! Executors format a line and put it on a bounded channel (`BUFFER_LINES`);
//! the `sluice-log` thread writes them in order. When the channel is full the
//! logging call waits for room: lines are never dropped (the delivery and
//! transaction lines are the mail log), so a log sink slower than the relay
//! slows the relay down instead of losing records — as the synchronous writer
//! did, but only once the buffer is full. The returned guard flushes what is
//! buffered when dropped: keep it until the process exits (a SIGTERM stop
//! returns through it; a SIGKILL loses at most the buffered lines).

use std::io::IsTerminal;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};

use crate::config::{Config, LogFormat};

/// Lines buffered between the executors and the writer thread (a few MiB of
/// text at most); room for bursts, small enough to flush at exit in well
/// under the second the guard waits.
pub const BUFFER_LINES: usize = 16_384;

/// Colour codes only for a person at a terminal: never into journald, files or
/// pipes, and not when `NO_COLOR` is set (no-color.org).
pub fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The log writer's guard: dropping it writes out the buffered lines.
static WRITER: std::sync::Mutex<Option<WorkerGuard>> = std::sync::Mutex::new(None);

/// Held by `run`: when dropped, the buffered log lines are written out.
pub struct LogGuard;

impl Drop for LogGuard {
    fn drop(&mut self) {
        flush();
    }
}

/// Writes out the buffered log lines and stops the writer (once).
fn flush() {
    let guard = WRITER.lock().map(|mut g| g.take()).unwrap_or(None);
    drop(guard);
}

/// Exits the process with `code` after writing out the buffered log lines
/// (`std::process::exit` runs no destructors, so the last lines, which say
/// why, would be lost).
pub fn exit(code: i32) -> ! {
    flush();
    std::process::exit(code)
}

/// Installs the global subscriber; hold the guard until exit.
pub fn init(config: &Config) -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(BUFFER_LINES)
        .lossy(false)
        .thread_name("sluice-log")
        .finish(std::io::stderr());
    let colour = use_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match config.log.format {
        LogFormat::Json => builder.with_ansi(false).json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(colour).init(),
    }
    if let Ok(mut slot) = WRITER.lock() {
        *slot = Some(guard);
    }
    LogGuard
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(
            !use_colour(false, None),
            "files, pipes and journald get none"
        );
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        // An empty NO_COLOR does not count (no-color.org).
        assert!(use_colour(true, Some(OsStr::new(""))));
    }
}
