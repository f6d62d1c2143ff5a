//! A private Postfix instance (the real MTA, as Debian ships it) that relays
//! everything it accepts to one next hop. It is rendered from the same templates
//! as the benchmark's (bench/postfix/main.cf.in and master.cf.in: Debian's
//! services, no chroot, queue files fsynced), with its own config, queue and data
//! directories in a temp dir, and is stopped on drop: `postfix stop`, then the
//! master and its children by pid if they linger.
//!
//! Postfix's daemons switch to the `postfix` user, so this needs root; without it
//! (or without Postfix) the skip policy applies, as for any peer tool.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{free_port, in_ci, repo_root, require_tools, run_with_timeout};

const POSTFIX: &str = "/usr/sbin/postfix";
/// How long start-up and shutdown may take before the test fails.
const START_STOP_LIMIT: Duration = Duration::from_secs(30);

pub struct PostfixRelay {
    /// Postfix's smtpd listens here (loopback).
    pub addr: SocketAddr,
    conf: PathBuf,
    queue: PathBuf,
    /// The instance's maillog (Postfix's own log lines), for failure messages.
    pub maillog: PathBuf,
    _dir: tempfile::TempDir,
}

/// Whether a private Postfix instance can run here; see the module comment.
/// Under CI=true a missing piece is a failure, elsewhere a skip line.
pub fn can_run_postfix() -> bool {
    if !require_tools(&[POSTFIX, "postconf"]) {
        return false;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            !in_ci(),
            "a private Postfix instance needs root, and CI=true"
        );
        eprintln!("SKIP: a private Postfix instance needs root");
    }
    root
}

impl PostfixRelay {
    /// A Postfix on a free loopback port relaying all mail to 127.0.0.1:`next_hop_port`
    /// (no TLS either way, no milters). Call [`can_run_postfix`] first.
    pub fn start(next_hop_port: u16) -> PostfixRelay {
        PostfixRelay::start_with(next_hop_port, None)
    }

    /// The same, offering STARTTLS (`smtpd_tls_security_level = may`) with this
    /// PEM certificate and key; no TLS to the next hop.
    pub fn start_tls(next_hop_port: u16, cert: &Path, key: &Path) -> PostfixRelay {
        PostfixRelay::start_with(next_hop_port, Some((cert, key)))
    }

    fn start_with(next_hop_port: u16, tls: Option<(&Path, &Path)>) -> PostfixRelay {
        let dir = tempfile::tempdir().expect("tempdir");
        // Postfix's unprivileged daemons must be able to reach the queue below it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the Postfix temp dir");
        let base = dir.path();
        let (conf, queue, data) = (base.join("conf"), base.join("queue"), base.join("data"));
        for d in [&conf, &queue, &data] {
            std::fs::create_dir_all(d).expect("create a Postfix directory");
        }
        let port = free_port();
        let templates = repo_root().join("bench").join("postfix");
        let vars = [
            ("@CONFIG_DIR@", conf.display().to_string()),
            ("@QUEUE_DIR@", queue.display().to_string()),
            ("@DATA_DIR@", data.display().to_string()),
            ("@BASE_DIR@", base.display().to_string()),
            (
                "@SMTPD_TLS_LEVEL@",
                if tls.is_some() { "may" } else { "none" }.to_string(),
            ),
            (
                "@TLS_CERT@",
                tls.map(|t| t.0.display().to_string()).unwrap_or_default(),
            ),
            (
                "@TLS_KEY@",
                tls.map(|t| t.1.display().to_string()).unwrap_or_default(),
            ),
            ("@SINK_PORT@", next_hop_port.to_string()),
            ("@MILTERS@", String::new()),
            // The benchmark's verify cases only: no TLS to the next hop here.
            ("@SMTP_TLS_LEVEL@", "none".to_string()),
            ("@SMTP_TLS_CAFILE@", String::new()),
            ("@SMTPD_ADDR@", format!("127.0.0.1:{port}")),
        ];
        for name in ["main.cf", "master.cf"] {
            let mut text = render(&templates.join(format!("{name}.in")), &vars);
            if name == "main.cf" && tls.is_some() {
                // "TLS connection established from …" in the maillog.
                text.push_str("smtpd_tls_loglevel = 1\n");
            }
            std::fs::write(conf.join(name), text).expect("write the Postfix config");
        }
        let chown = run_with_timeout(
            Command::new("chown").arg("postfix").arg(&data),
            START_STOP_LIMIT,
        );
        assert!(chown.status.success(), "chown postfix {}", data.display());
        let relay = PostfixRelay {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            maillog: data.join("maillog"),
            conf,
            queue,
            _dir: dir,
        };
        for verb in ["check", "start"] {
            let out = run_with_timeout(
                Command::new(POSTFIX).arg("-c").arg(&relay.conf).arg(verb),
                START_STOP_LIMIT,
            );
            assert!(
                out.status.success(),
                "postfix {verb} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        relay.wait_for_greeting();
        relay
    }

    fn wait_for_greeting(&self) {
        let until = Instant::now() + START_STOP_LIMIT;
        loop {
            if let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut b = [0u8; 3];
                if s.read_exact(&mut b).is_ok() && &b == b"220" {
                    return;
                }
            }
            assert!(
                Instant::now() < until,
                "Postfix not greeting on {} (maillog: {})",
                self.addr,
                self.maillog_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn maillog_text(&self) -> String {
        std::fs::read_to_string(&self.maillog).unwrap_or_default()
    }

    /// The master's pid, while it runs.
    fn master_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.queue.join("pid").join("master.pid")).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }
}

fn render(template: &Path, vars: &[(&str, String)]) -> String {
    let mut text = std::fs::read_to_string(template)
        .unwrap_or_else(|e| panic!("read {}: {e}", template.display()));
    for (key, value) in vars {
        text = text.replace(key, value);
    }
    text
}

/// Pids whose parent is `parent` (Postfix's daemons are the master's children).
fn children_of(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid …": comm may hold spaces, so read after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

impl Drop for PostfixRelay {
    fn drop(&mut self) {
        let master = self.master_pid();
        let _ = run_with_timeout(
            Command::new(POSTFIX).arg("-c").arg(&self.conf).arg("stop"),
            START_STOP_LIMIT,
        );
        let Some(master) = master else { return };
        let until = Instant::now() + START_STOP_LIMIT;
        while Path::new(&format!("/proc/{master}")).exists() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        if Path::new(&format!("/proc/{master}")).exists() {
            for pid in children_of(master).into_iter().chain([master]) {
                // SAFETY: kill has no memory-safety preconditions; the pids are this
                // instance's master and its children, read from /proc just now.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}
