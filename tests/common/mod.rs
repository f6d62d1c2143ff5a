//! Shared harness for the end-to-end tests: starts the real `sluice` binary on its
//! own port and spool, talks to it with raw sockets, runs real clients (swaks,
//! Python smtplib) and reads the spool back with `sluice spool …`.
//!
//! Every process started here is owned by a guard that kills and reaps it on drop,
//! so a failing assertion never leaves a relay or a client behind.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The relay binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// How long a relay may take to start listening.
const READY_DEADLINE: Duration = Duration::from_secs(20);
/// Read timeout on test sockets: a missing reply fails the test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A helper script under tests/py/.
pub fn py_script(name: &str) -> PathBuf {
    repo_root().join("tests").join("py").join(name)
}

/// A free loopback port: bind port 0, note the port, release it.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

static NONCE: AtomicUsize = AtomicUsize::new(0);

fn nonce() -> String {
    let n = NONCE.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("t{}x{n}x{t:x}", std::process::id())
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
    run_with_timeout(Command::new(BIN).args(args), Duration::from_secs(30))
}

/// Runs a tests/py script with python3 and returns its output.
pub fn python(script: &str, args: &[&str], timeout: Duration) -> Output {
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

// ---------------------------------------------------------------------------------
// The relay
// ---------------------------------------------------------------------------------

pub struct RelayBuilder {
    listener: String,
    sets: Vec<String>,
    cores: usize,
    proxy_probe: bool,
    dir: Option<tempfile::TempDir>,
    config: Option<PathBuf>,
}

impl RelayBuilder {
    /// Name of the listener the harness binds to its free port (default "smtp").
    pub fn listener(mut self, name: &str) -> Self {
        self.listener = name.to_string();
        self
    }

    /// An extra `--set key=value`.
    pub fn set(mut self, kv: impl Into<String>) -> Self {
        self.sets.push(kv.into());
        self
    }

    /// `--set server.listener.<listener>.KEY=VALUE`.
    pub fn lset(self, key: &str, value: &str) -> Self {
        let kv = format!("server.listener.{}.{key}={value}", self.listener);
        self.set(kv)
    }

    pub fn cores(mut self, n: usize) -> Self {
        self.cores = n;
        self
    }

    /// The listener expects a PROXY header: the readiness probe sends one.
    pub fn proxy_probe(mut self) -> Self {
        self.proxy_probe = true;
        self
    }

    /// Start with `-c FILE` (the --set arguments still apply on top of it).
    pub fn config(mut self, file: PathBuf) -> Self {
        self.config = Some(file);
        self
    }

    /// Use this temporary directory (e.g. one holding a certificate made beforehand).
    pub fn dir(mut self, dir: tempfile::TempDir) -> Self {
        self.dir = Some(dir);
        self
    }

    pub fn start(self) -> Relay {
        let dir = self
            .dir
            .unwrap_or_else(|| tempfile::tempdir().expect("tempdir"));
        let port = free_port();
        let admin_port = free_port();
        let nonce = nonce();
        let spool = dir.path().join("spool");
        let l = &self.listener;
        let mut args = vec![
            format!("spool.path={}", spool.display()),
            format!("server.cores={}", self.cores),
            format!("server.listener.{l}.bind=[\"127.0.0.1:{port}\"]"),
            // Tests never let the relay reach for the machine's resolver (it is
            // not on loopback): delivery is off unless a test turns it on, and DNS
            // goes to a loopback port unless a test names its own server.
            "delivery.enabled=false".to_string(),
            "dns.servers=[\"127.0.0.1:9\"]".to_string(),
            // Its own operations listener, so relays in parallel tests never collide.
            format!("admin.listen=\"127.0.0.1:{admin_port}\""),
        ];
        // A greeting unique to this relay, so the readiness probe can tell it
        // apart from anything else that might answer on the port.
        let greeting_key = format!("server.listener.{l}.greeting=");
        let nonce = if self.sets.iter().any(|s| s.starts_with(&greeting_key)) {
            // The test chose the greeting; the probe can only check for a 220.
            String::new()
        } else {
            args.push(format!("{greeting_key}\"ESMTP sluice {nonce}\""));
            nonce
        };
        args.extend(self.sets);
        let mut relay = Relay {
            dir,
            port,
            admin_port,
            listener: self.listener,
            args,
            child: None,
            proxy_probe: self.proxy_probe,
            nonce,
            starts: 0,
            config: self.config,
        };
        // free_port() only finds a port free a moment ago; a busy machine (or a
        // test holding thousands of client sockets) may take it before the relay
        // binds. Then start again on fresh ports, a few times.
        let mut retries = 5;
        loop {
            match relay.try_launch() {
                Ok(()) => break relay,
                Err(log) if retries > 0 && log.contains("cannot bind") => {
                    retries -= 1;
                    relay.move_ports(free_port(), free_port());
                }
                Err(log) => panic!("relay exited during startup; log:\n{log}"),
            }
        }
    }
}

pub struct Relay {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The operations listener (/metrics, /api/v1).
    pub admin_port: u16,
    pub listener: String,
    args: Vec<String>,
    child: Option<ChildGuard>,
    proxy_probe: bool,
    nonce: String,
    starts: usize,
    /// The `-c` file, if any.
    config: Option<PathBuf>,
}

impl Relay {
    pub fn builder() -> RelayBuilder {
        RelayBuilder {
            listener: "smtp".into(),
            sets: Vec::new(),
            cores: 1,
            proxy_probe: false,
            dir: None,
            config: None,
        }
    }

    /// Starts a one-core relay with these extra `--set` arguments.
    pub fn start(sets: &[&str]) -> Relay {
        let mut b = Relay::builder();
        for s in sets {
            b = b.set(*s);
        }
        b.start()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.port)
    }

    pub fn addr_string(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn spool_path(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("relay not running").pid()
    }

    /// Everything the relay wrote to stderr, over all its starts.
    pub fn log(&self) -> String {
        let mut all = String::new();
        for i in 0..self.starts {
            let path = self.dir.path().join(format!("relay-{i}.log"));
            if let Ok(t) = std::fs::read_to_string(path) {
                all.push_str(&format!("--- start {i} ---\n{t}"));
            }
        }
        all
    }

    fn launch(&mut self) {
        if let Err(log) = self.try_launch() {
            panic!("relay exited during startup; log:\n{log}");
        }
    }

    /// Moves the relay (not yet running) to new SMTP and operations ports.
    fn move_ports(&mut self, port: u16, admin_port: u16) {
        let (old_bind, old_admin) = (
            format!("127.0.0.1:{}\"]", self.port),
            format!("\"127.0.0.1:{}\"", self.admin_port),
        );
        for a in &mut self.args {
            if a.starts_with(&format!("server.listener.{}.bind=", self.listener)) {
                *a = a.replace(&old_bind, &format!("127.0.0.1:{port}\"]"));
            } else if a.starts_with("admin.listen=") {
                *a = a.replace(&old_admin, &format!("\"127.0.0.1:{admin_port}\""));
            }
        }
        self.port = port;
        self.admin_port = admin_port;
    }

    /// Starts the relay and waits until it serves; Err(its log) if it exited.
    fn try_launch(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "relay already running");
        let log_path = self.dir.path().join(format!("relay-{}.log", self.starts));
        self.starts += 1;
        let log = std::fs::File::create(&log_path).expect("create relay log");
        let mut cmd = Command::new(BIN);
        cmd.arg("run");
        if let Some(file) = &self.config {
            cmd.arg("-c").arg(file);
        }
        for a in &self.args {
            cmd.arg("--set").arg(a);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let child = cmd.spawn().expect("spawn sluice run");
        self.child = Some(ChildGuard::new(child, "sluice run"));
        self.wait_ready()
    }

    /// Polls until a connection gets this relay's 220, or the deadline passes.
    fn wait_ready(&mut self) -> Result<(), String> {
        let until = Instant::now() + READY_DEADLINE;
        let addr = self.addr();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .unwrap()
                .child
                .as_mut()
                .unwrap()
                .try_wait()
                .unwrap()
            {
                self.child.as_mut().unwrap().child = None;
                self.child = None;
                return Err(format!("({status})\n{}", self.log()));
            }
            if Instant::now() >= until {
                panic!(
                    "relay not ready within {READY_DEADLINE:?}; log:\n{}",
                    self.log()
                );
            }
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                if self.proxy_probe {
                    let _ = s.write_all(b"PROXY TCP4 127.0.0.1 127.0.0.1 1 1\r\n");
                }
                let mut c = Client::from_stream(s);
                if let Ok(Some(line)) = c.try_read_line() {
                    assert!(
                        line.starts_with("220 ") && line.contains(&self.nonce),
                        "port {} answered with a foreign greeting {line:?}",
                        self.port
                    );
                    c.send(b"QUIT\r\n");
                    // Wait for the close so the probe no longer counts as a connection.
                    let _ = c.read_to_eof();
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL the relay and reap it.
    pub fn kill9(&mut self) {
        let mut guard = self.child.take().expect("relay not running");
        guard.kill();
    }

    /// SIGTERM the relay and wait for it to exit; returns its status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut guard = self.child.take().expect("relay not running");
        guard.signal(libc::SIGTERM);
        match guard.wait_timeout(Duration::from_secs(20)) {
            Some(s) => s,
            None => panic!(
                "relay did not exit within 20s of SIGTERM; log:\n{}",
                self.log()
            ),
        }
    }

    /// Waits (after a signal sent by the test) for the relay to exit; returns its status.
    pub fn terminate_wait(&mut self) -> ExitStatus {
        let mut guard = self.child.take().expect("relay not running");
        match guard.wait_timeout(Duration::from_secs(20)) {
            Some(s) => s,
            None => panic!("relay did not exit within 20s; log:\n{}", self.log()),
        }
    }

    /// Starts the relay again with the same arguments, port and spool.
    pub fn restart(&mut self) {
        self.launch();
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.is_running())
    }

    // --- the spool, through the CLI -----------------------------------------------

    /// `sluice spool ARGS --set spool.path=…`; panics unless it succeeds.
    pub fn spool(&self, args: &[&str]) -> Vec<u8> {
        let mut cmd = Command::new(BIN);
        cmd.arg("spool")
            .args(args)
            .arg("--set")
            .arg(format!("spool.path={}", self.spool_path().display()));
        let out = run_with_timeout(&mut cmd, Duration::from_secs(30));
        assert_ok(&out, &format!("sluice spool {args:?}"));
        out.stdout
    }

    pub fn count(&self) -> usize {
        let out = text(&self.spool(&["count"]));
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("spool count printed {out:?}"))
    }

    pub fn list(&self) -> Vec<SpoolEntry> {
        let out = text(&self.spool(&["list", "--json"]));
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}"));
                SpoolEntry {
                    id: v["id"].as_str().expect("id").to_string(),
                    size: v["size"].as_u64().expect("size"),
                    sender: v["sender"].as_str().expect("sender").to_string(),
                    recipients: v["recipients"]
                        .as_array()
                        .expect("recipients")
                        .iter()
                        .map(|r| r.as_str().unwrap().to_string())
                        .collect(),
                    queue: v["queue"].as_str().unwrap_or_default().to_string(),
                }
            })
            .collect()
    }

    pub fn body(&self, id: &str) -> Vec<u8> {
        self.spool(&["body", id])
    }

    pub fn show(&self, id: &str) -> String {
        text(&self.spool(&["show", id]))
    }

    pub fn stats(&self) -> Stats {
        let out = text(&self.spool(&["stats"]));
        let get = |name: &str| -> u64 {
            out.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse::<u64>()))
                .unwrap_or_else(|| panic!("no `{name}` in spool stats output {out:?}"))
                .unwrap_or_else(|e| panic!("bad `{name}` in {out:?}: {e}"))
        };
        Stats {
            messages_stored: get("messages_stored "),
            commits: get("commits "),
            queued: get("queued "),
        }
    }

    // --- clients ---------------------------------------------------------------

    /// A raw connection (no greeting read).
    pub fn connect(&self) -> Client {
        Client::connect(self.addr())
    }

    /// A raw connection with the 220 greeting read and checked.
    pub fn greeted(&self) -> Client {
        let mut c = self.connect();
        let r = c.read_reply();
        assert_eq!(r.code, 220, "greeting: {r:?}");
        c
    }

    /// Greeted, and EHLO done.
    pub fn session(&self) -> Client {
        let mut c = self.greeted();
        c.expect("EHLO client.test", 250);
        c
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut g) = self.child.take() {
            g.kill();
        }
        if std::thread::panicking() {
            eprintln!("relay log (port {}):\n{}", self.port, self.log());
        }
    }
}

#[derive(Debug, Clone)]
pub struct SpoolEntry {
    pub id: String,
    pub size: u64,
    pub sender: String,
    pub recipients: Vec<String>,
    pub queue: String,
}

#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub messages_stored: u64,
    pub commits: u64,
    pub queued: u64,
}

// ---------------------------------------------------------------------------------
// Raw SMTP client
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    /// Each line as received, without CRLF.
    pub lines: Vec<String>,
}

impl Reply {
    /// The text of all lines after "NNN-" / "NNN ".
    pub fn text(&self) -> String {
        self.lines
            .iter()
            .map(|l| l.get(4..).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn last(&self) -> &str {
        self.lines.last().map(String::as_str).unwrap_or("")
    }

    /// The enhanced status code of the last line ("2.0.0"), if any.
    pub fn enhanced(&self) -> &str {
        self.last()
            .get(4..)
            .and_then(|t| t.split(' ').next())
            .unwrap_or("")
    }

    pub fn has_line_starting(&self, prefix: &str) -> bool {
        self.lines
            .iter()
            .any(|l| l.get(4..).is_some_and(|t| t.starts_with(prefix)))
    }
}

pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        Client::from_stream(s)
    }

    /// Connects from a chosen loopback source address (e.g. 127.0.0.2).
    pub fn connect_from(src: Ipv4Addr, addr: SocketAddr) -> Client {
        // SAFETY: plain socket/bind/connect on a fresh fd we own, handed to TcpStream.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let stream = TcpStream::from_raw_fd(fd);
            let sin = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(ip.octets()),
                },
                sin_zero: [0; 8],
            };
            let local = sin(src, 0);
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let rc = libc::bind(fd, &local as *const _ as *const libc::sockaddr, len);
            assert_eq!(rc, 0, "bind {src}: {}", std::io::Error::last_os_error());
            let IpAddr::V4(dst_ip) = addr.ip() else {
                panic!("IPv4 only")
            };
            let remote = sin(dst_ip, addr.port());
            let rc = libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len);
            assert_eq!(
                rc,
                0,
                "connect {addr} from {src}: {}",
                std::io::Error::last_os_error()
            );
            Client::from_stream(stream)
        }
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write {:?}: {e}", text(&bytes[..bytes.len().min(80)])));
    }

    pub fn send_line(&mut self, line: &str) {
        self.send(format!("{line}\r\n").as_bytes());
    }

    /// One CRLF-terminated line (without the CRLF); Ok(None) at EOF before any byte.
    pub fn try_read_line(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..at + 2).collect();
                return Ok(Some(text(&line[..at])));
            }
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("EOF inside a line: {:?}", text(&self.buf)),
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn read_line(&mut self) -> String {
        match self.try_read_line() {
            Ok(Some(l)) => l,
            Ok(None) => panic!("connection closed while waiting for a reply line"),
            Err(e) => panic!("reading a reply line: {e}"),
        }
    }

    /// A complete (possibly multi-line) reply.
    pub fn read_reply(&mut self) -> Reply {
        let mut lines = Vec::new();
        loop {
            let line = self.read_line();
            assert!(
                line.len() >= 3 && line.as_bytes()[..3].iter().all(u8::is_ascii_digit),
                "malformed reply line {line:?} (after {lines:?})"
            );
            let code: u16 = line[..3].parse().unwrap();
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line);
            if !more {
                return Reply { code, lines };
            }
        }
    }

    /// A reply, or None when the server closed the connection first.
    pub fn try_read_reply(&mut self) -> Option<Reply> {
        match self.try_read_line() {
            Ok(None) => None,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("reading a reply: {e}"),
            Ok(Some(first)) => {
                let code: u16 = first
                    .get(..3)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or_else(|| panic!("malformed reply line {first:?}"));
                let mut lines = vec![first.clone()];
                if first.as_bytes().get(3) == Some(&b'-') {
                    let rest = self.read_reply();
                    lines.extend(rest.lines);
                }
                Some(Reply { code, lines })
            }
        }
    }

    /// Sends a command line and reads its reply.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send_line(line);
        self.read_reply()
    }

    /// Sends a command and asserts the reply code.
    pub fn expect(&mut self, line: &str, code: u16) -> Reply {
        let r = self.cmd(line);
        assert_eq!(r.code, code, "{line:?} got {r:?}");
        r
    }

    /// Reads until the server closes; returns whatever bytes arrived before (a reset
    /// after the server closed counts as closed).
    pub fn read_to_eof(&mut self) -> Vec<u8> {
        let mut all = std::mem::take(&mut self.buf);
        let mut chunk = [0u8; 8192];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return all,
                Ok(n) => all.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return all,
                Err(e) => panic!(
                    "waiting for the server to close: {e} (got {:?})",
                    text(&all)
                ),
            }
        }
    }

    /// Asserts the server closes the connection with nothing more to say.
    pub fn expect_closed(&mut self) {
        let rest = self.read_to_eof();
        assert!(
            rest.is_empty(),
            "expected the connection to close, got {:?}",
            text(&rest)
        );
    }

    /// MAIL, RCPT…, DATA, body (already dot-stuffed, without the final ".\r\n"),
    /// one command at a time; returns the queued id.
    pub fn send_mail(&mut self, from: &str, rcpts: &[&str], wire_body: &[u8]) -> String {
        self.expect(&format!("MAIL FROM:<{from}>"), 250);
        for r in rcpts {
            self.expect(&format!("RCPT TO:<{r}>"), 250);
        }
        self.expect("DATA", 354);
        self.send(wire_body);
        self.send(b".\r\n");
        let r = self.read_reply();
        assert_eq!(r.code, 250, "end of data: {r:?}");
        queued_id(&r.text()).unwrap_or_else(|| panic!("no queued id in {r:?}"))
    }
}

/// The id in "... queued as 0123456789ABCDEF".
pub fn queued_id(text: &str) -> Option<String> {
    let at = text.find("queued as ")? + "queued as ".len();
    let id: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    (id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit())).then_some(id)
}

/// Splits a stored message into our Received: header (with its CRLF) and the rest.
pub fn split_received(stored: &[u8]) -> (&[u8], &[u8]) {
    assert!(
        stored.starts_with(b"Received: "),
        "stored message does not start with Received: {:?}",
        text(&stored[..stored.len().min(200)])
    );
    let mut pos = 0;
    loop {
        let at = stored[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("unterminated Received: header")
            + pos
            + 2;
        if stored.get(at) == Some(&b'\t') || stored.get(at) == Some(&b' ') {
            pos = at;
            continue;
        }
        return stored.split_at(at);
    }
}

/// Asserts the stored message is our Received: header followed by exactly `sent`.
pub fn assert_stored_exact(stored: &[u8], sent: &[u8], id: &str) {
    let (header, rest) = split_received(stored);
    let h = text(header);
    assert!(
        h.contains(&format!("id {id}")),
        "Received: header lacks `id {id}`: {h:?}"
    );
    assert!(
        rest == sent,
        "stored bytes differ from what was sent\n  sent:   {:?}\n  stored: {:?}",
        text(sent),
        text(rest)
    );
}

/// Lines of `spool show` output starting with `prefix`.
pub fn show_lines<'a>(show: &'a str, prefix: &str) -> Vec<&'a str> {
    show.lines().filter(|l| l.starts_with(prefix)).collect()
}

/// The value of the first `key: value` line of `spool show` output.
pub fn show_field<'a>(show: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}:");
    show.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no `{key}:` line in spool show output:\n{show}"))
}

// ---------------------------------------------------------------------------------
// TLS material, passwords
// ---------------------------------------------------------------------------------

/// Makes a self-signed certificate and key for "localhost" with the openssl CLI.
pub fn make_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let out = run_with_timeout(
        Command::new("openssl").args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]),
        Duration::from_secs(30),
    );
    assert_ok(&out, "openssl req");
    (cert, key)
}

/// `sluice hash-password` with the password on stdin.
pub fn hash_password(password: &str) -> String {
    let mut child = ChildGuard::new(
        Command::new(BIN)
            .arg("hash-password")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hash-password"),
        "hash-password",
    );
    {
        let mut stdin = child.child.as_mut().unwrap().stdin.take().unwrap();
        stdin.write_all(format!("{password}\n").as_bytes()).unwrap();
    }
    let mut stdout = child.take_stdout();
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    let status = child
        .wait_timeout(Duration::from_secs(30))
        .expect("hash-password hangs");
    assert!(status.success(), "hash-password failed: {status}");
    let hash = out.trim().to_string();
    assert!(
        hash.starts_with("$argon2id$"),
        "hash-password printed {hash:?}"
    );
    hash
}

/// Reads lines from a child's stdout, calling `f` on each until it returns false or EOF.
pub fn for_each_line(stdout: ChildStdout, mut f: impl FnMut(&str) -> bool) {
    let reader = BufReader::new(stdout);
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if !f(&line) {
            break;
        }
    }
}

/// Runs swaks against the relay with extra arguments; returns the output.
pub fn swaks(relay: &Relay, args: &[&str]) -> Output {
    run_with_timeout(
        Command::new("swaks")
            .arg("--server")
            .arg(relay.addr_string())
            .args(["--timeout", "10", "--helo", "swaks.test"])
            .args(args),
        Duration::from_secs(30),
    )
}

/// The queued ids in a swaks transcript ("<-  250 2.0.0 Ok: queued as …").
pub fn swaks_ids(out: &Output) -> Vec<String> {
    text(&out.stdout)
        .lines()
        .filter(|l| (l.contains("<-") || l.contains("<~")) && l.contains(" 250 "))
        .filter_map(queued_id)
        .collect()
}
