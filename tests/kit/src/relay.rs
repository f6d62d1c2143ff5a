//! The real relay: `sluice run` on free loopback ports with `--set` overrides,
//! its own spool in a temporary directory, ready once its unique greeting
//! answers, killed by pid when dropped (a panicking test prints its log).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::process::{assert_ok, bin, free_port, nonce, run_with_timeout, text, ChildGuard};

/// How long a relay may take to start listening.
const READY_DEADLINE: Duration = Duration::from_secs(20);

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

    /// Cluster mode (docs/cluster.md) on the engine `dsn` as node `node`,
    /// with a lease (3 s), sweep (1 s) and sync (50 ms) short enough for a
    /// bounded test.
    pub fn cluster(self, dsn: &str, node: &str) -> Self {
        self.set("cluster.enabled=true")
            .set(format!("cluster.node_id=\"{node}\""))
            .set(format!("cluster.engine=[\"{dsn}\"]"))
            .set("cluster.lease=\"3s\"")
            .set("cluster.sweep_interval=\"1s\"")
            .set("cluster.engine_timeout=\"2s\"")
            .set("cluster.sync_interval=\"50ms\"")
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

    /// `GET path` from the relay's operations listener: the body of a 200
    /// answer (panics on anything else, with the answer).
    pub fn admin_get(&self, path: &str) -> String {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.admin_port);
        crate::delivery::http_request(addr, "GET", path, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("GET {path} on the operations listener: {e}"))
    }

    /// The relay's Prometheus exposition (`GET /metrics`).
    pub fn metrics(&self) -> String {
        self.admin_get("/metrics")
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
        let mut cmd = Command::new(bin());
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

    // --- the spool, through the CLI (offline) -----------------------------------------------

    /// `sluice queue ARGS --offline --set spool.path=…` (the spool read
    /// directly, running relay or not; no API token involved); panics unless
    /// it succeeds.
    pub fn queue(&self, args: &[&str]) -> Vec<u8> {
        let mut cmd = Command::new(bin());
        cmd.arg("queue")
            .args(args)
            .arg("--offline")
            .arg("--set")
            .arg(format!("spool.path={}", self.spool_path().display()));
        let out = run_with_timeout(&mut cmd, Duration::from_secs(30));
        assert_ok(&out, &format!("sluice queue {args:?} --offline"));
        out.stdout
    }

    pub fn count(&self) -> usize {
        let out = text(&self.queue(&["count"]));
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("queue count printed {out:?}"))
    }

    /// Every queued message as `queue list --json` gives it, all pages.
    pub fn messages(&self) -> Vec<serde_json::Value> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut args = vec!["list", "--json", "--limit", "1000"];
            if let Some(c) = &cursor {
                args.extend(["--cursor", c.as_str()]);
            }
            let out = text(&self.queue(&args));
            let mut page: serde_json::Value = serde_json::from_str(&out)
                .unwrap_or_else(|e| panic!("queue list --json: {e}: {out:?}"));
            cursor = page["next_cursor"].as_str().map(str::to_string);
            match page["messages"].take() {
                serde_json::Value::Array(m) => all.extend(m),
                other => panic!("queue list --json: no messages array: {other:?}"),
            }
            if cursor.is_none() {
                return all;
            }
        }
    }

    pub fn list(&self) -> Vec<SpoolEntry> {
        self.messages()
            .into_iter()
            .map(|v| SpoolEntry {
                id: v["id"].as_str().expect("id").to_string(),
                size: v["size"].as_u64().expect("size"),
                sender: v["sender"].as_str().expect("sender").to_string(),
                recipients: v["recipients"]
                    .as_array()
                    .expect("recipients")
                    .iter()
                    .map(|r| r["address"].as_str().expect("address").to_string())
                    .collect(),
                queue: v["queue"].as_str().unwrap_or_default().to_string(),
            })
            .collect()
    }

    pub fn body(&self, id: &str) -> Vec<u8> {
        self.queue(&["body", id])
    }

    /// `queue show ID --body`: the `key: value` fields, then the whole message.
    pub fn show(&self, id: &str) -> String {
        text(&self.queue(&["show", id, "--body"]))
    }

    pub fn stats(&self) -> Stats {
        let out = text(&self.queue(&["stats"]));
        let get = |name: &str| -> u64 {
            out.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse::<u64>()))
                .unwrap_or_else(|| panic!("no `{name}` in queue stats output {out:?}"))
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

/// The sum of every sample in a Prometheus exposition whose line starts with
/// `prefix` (a metric name, or a name with some of its labels); 0 when none.
pub fn metric_sum(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
