//! Processes and paths: where the workspace's binaries are, child processes
//! owned by a guard that kills and reaps them (by pid) on drop, so a failing
//! assertion never leaves a relay or a client behind, polling with a deadline,
//! and the one skip policy for missing peer tools.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Read timeout on test sockets: a missing reply fails the test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub fn repo_root() -> PathBuf {
    // This crate lives at tests/kit.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("..")
}

/// A helper script under tests/py/.
pub fn py_script(name: &str) -> PathBuf {
    repo_root().join("tests").join("py").join(name)
}

/// A binary of the workspace, by its cargo name. Cargo only tells an integration
/// test its own package's binaries at build time, and this crate is not one; so
/// at run time: nextest's NEXTEST_BIN_EXE_<name> / cargo's CARGO_BIN_EXE_<name>
/// when set, else the directory cargo builds every binary into (the test
/// executable sits in its `deps/` subdirectory).
fn workspace_bin(name: &str) -> PathBuf {
    for var in [
        format!("NEXTEST_BIN_EXE_{name}"),
        format!("CARGO_BIN_EXE_{name}"),
    ] {
        if let Some(p) = std::env::var_os(&var).map(PathBuf::from) {
            if p.exists() {
                return p;
            }
        }
    }
    let exe = std::env::current_exe().expect("path of the test executable");
    let dir = exe.parent().expect("directory of the test executable");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("target profile directory")
    } else {
        dir
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --release --workspace, \
         or run the tests with `cargo nextest run --workspace --release`)",
        p.display()
    );
    p
}

/// The relay binary.
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("sluice"))
}

/// The load generator and sink binary.
pub fn loadgen_bin() -> PathBuf {
    workspace_bin("sluice-loadgen")
}

/// Ports handed out by [`free_port`]: below the kernel's ephemeral range (32768–60999 by
/// default), so a client socket of another test running at the same time is never given
/// the port between our check and the relay's bind (which failed CI once).
const FREE_PORTS: std::ops::Range<u16> = 10_000..32_000;

/// A free loopback port: a port of [`FREE_PORTS`] that binds now, released again, and
/// that no other test process has claimed. Each test process starts at its own point of
/// the range (pid, clock) and walks on, so tests running side by side rarely try the
/// same ports.
pub fn free_port() -> u16 {
    free_port_where(|port| TcpListener::bind(("127.0.0.1", port)).is_ok())
}

/// A port of [`FREE_PORTS`] for which `usable` says yes (it binds what the caller needs).
pub(crate) fn free_port_where(usable: impl Fn(u16) -> bool) -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(usize::MAX);
    let span = usize::from(FREE_PORTS.end - FREE_PORTS.start);
    if NEXT.load(Ordering::Relaxed) == usize::MAX {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as usize)
            .unwrap_or(0);
        let start = (std::process::id() as usize).wrapping_mul(7919) ^ t;
        let _ = NEXT.compare_exchange(
            usize::MAX,
            start % span,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    for _ in 0..span {
        // Step by a prime so processes that start near each other spread apart.
        let n = NEXT.fetch_add(97, Ordering::Relaxed) % span;
        let port = FREE_PORTS.start + n as u16;
        if usable(port) && claim(port) {
            return port;
        }
    }
    panic!("no free loopback port in {FREE_PORTS:?}")
}

/// Claims `port` for this test process until it exits: an flock on a file
/// named after the port. A port that binds now may be bound by the relay only
/// seconds later (an Ansible run, say), and another test process walking the
/// range must not hand it out meanwhile (that failed a suite run once).
fn claim(port: u16) -> bool {
    use std::os::fd::AsRawFd;
    static CLAIMS: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("sluice-testkit-ports");
    let _ = std::fs::create_dir_all(&dir);
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(port.to_string()))
    else {
        // No claim possible: the bind check alone decides, as before.
        return true;
    };
    // SAFETY: flock on a descriptor `file` owns and keeps open; LOCK_NB never blocks.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return false;
    }
    // Held until the process exits, which releases the lock.
    if let Ok(mut claims) = CLAIMS.lock() {
        claims.push(file);
    }
    true
}

static NONCE: AtomicUsize = AtomicUsize::new(0);

/// A string no other relay of this machine uses (pid, counter, clock).
pub(crate) fn nonce() -> String {
    let n = NONCE.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("t{}x{n}x{t:x}", std::process::id())
}

// ---------------------------------------------------------------------------------
// The skip policy
// ---------------------------------------------------------------------------------

/// Whether the tests run in CI (`CI=true`, as .ci/run sets it).
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Whether `tool` is runnable: an absolute path that exists, or a name found on
/// PATH or in the sbin directories (Debian puts nsd and postfix's tools there).
pub fn have_tool(tool: &str) -> bool {
    if tool.starts_with('/') {
        return Path::new(tool).exists();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .any(|d| d.join(tool).is_file())
}

/// The one skip policy for peer tools: true when every tool is there. When one
/// is missing, panics under CI=true (CI installs them all, so a missing one is
/// a broken setup, never a pass) and otherwise prints a skip line and returns
/// false; the test then returns early:
///
/// ```ignore
/// if !require_tools(&["prometheus", "promtool"]) { return; }
/// ```
pub fn require_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have_tool(t)).collect();
    if missing.is_empty() {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string();
    assert!(
        !in_ci(),
        "{test}: {missing:?} not installed, and CI=true (.ci/run installs every peer tool)"
    );
    eprintln!("SKIP {test}: {missing:?} not installed (.ci/run lists the packages)");
    false
}

/// Returns from the calling test (it is skipped) unless every tool is there;
/// see [`require_tools`]: `require_tools!("nsd", "smtp-sink");`.
#[macro_export]
macro_rules! require_tools {
    ($($tool:expr),+ $(,)?) => {
        if !$crate::require_tools(&[$($tool),+]) {
            return;
        }
    };
}

/// For the kit's own starters, which cannot skip the test that called them:
/// panics naming the Debian package unless `tool` is installed. A test that
/// should be skipped without it calls [`require_tools!`] first.
pub(crate) fn need_tool(tool: &str, package: &str) {
    assert!(
        have_tool(tool),
        "{tool} is not installed (Debian package {package}; .ci/run installs it)"
    );
}

/// [`require_tools`] for one tool.
pub fn require_tool(tool: &str) -> bool {
    require_tools(&[tool])
}

// ---------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------

/// Polls `cond` until it holds; panics with `what` (and `detail()`) past the deadline.
pub fn wait_until(
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> bool,
    detail: impl Fn() -> String,
) {
    let until = Instant::now() + deadline;
    while !cond() {
        if Instant::now() >= until {
            panic!(
                "timed out after {deadline:?} waiting for {what}\n{}",
                detail()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------

/// Owns a child process: killed (SIGKILL) and reaped on drop unless already reaped.
pub struct ChildGuard {
    pub child: Option<Child>,
    pub what: String,
}

impl ChildGuard {
    pub fn new(child: Child, what: &str) -> ChildGuard {
        ChildGuard {
            child: Some(child),
            what: what.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("process already reaped").id()
    }

    pub fn take_stdout(&mut self) -> ChildStdout {
        self.child
            .as_mut()
            .and_then(|c| c.stdout.take())
            .expect("stdout was not piped")
    }

    /// Sends `sig` to the process by its pid.
    pub fn signal(&self, sig: i32) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: plain kill(2) on a child we own and have not reaped yet.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {sig}) failed: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits for the process to exit, polling, up to `deadline`; None on timeout.
    pub fn wait_timeout(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => c.try_wait().expect("try_wait").is_none(),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a command to completion with a deadline (the child is killed past it),
/// collecting stdout and stderr.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let desc = format!("{cmd:?}");
    let mut child = ChildGuard::new(
        cmd.spawn().unwrap_or_else(|e| panic!("spawn {desc}: {e}")),
        &desc,
    );
    let mut out = child.child.as_mut().unwrap().stdout.take().unwrap();
    let mut err = child.child.as_mut().unwrap().stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = match child.wait_timeout(timeout) {
        Some(s) => s,
        None => {
            child.kill();
            let stderr = t_err.join().unwrap_or_default();
            panic!(
                "{desc} did not finish within {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Runs `sluice ARGS` and returns its output (no assertion on the status).
pub fn sluice(args: &[&str]) -> Output {
    run_with_timeout(Command::new(bin()).args(args), Duration::from_secs(30))
}

/// Runs a tests/py script with python3 and returns its output.
pub fn python(script: &str, args: &[&str], timeout: Duration) -> Output {
    need_tool("python3", "python3");
    run_with_timeout(
        Command::new("python3").arg(py_script(script)).args(args),
        timeout,
    )
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Panics with both streams unless the command succeeded.
pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const MISSING: &str = "sluice-no-such-tool";

    #[test]
    fn tools_are_found_on_path_and_by_absolute_path() {
        assert!(have_tool("sh"));
        assert!(have_tool("/bin/sh"));
        assert!(!have_tool(MISSING));
        assert!(!have_tool("/nonexistent/sh"));
    }

    // One test sets CI both ways, so no other test of this binary reads it meanwhile
    // (nextest runs each test in a process of its own).
    #[test]
    fn a_missing_tool_fails_under_ci_and_skips_elsewhere() {
        std::env::set_var("CI", "true");
        assert!(require_tool("sh"));
        let caught = std::panic::catch_unwind(|| require_tools(&["sh", MISSING]));
        assert!(caught.is_err(), "a missing tool must fail under CI=true");
        std::env::set_var("CI", "false");
        assert!(!require_tools(&["sh", MISSING]));
        std::env::remove_var("CI");
        assert!(!require_tool(MISSING));
    }
}
