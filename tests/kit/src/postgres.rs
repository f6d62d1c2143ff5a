//! A real PostgreSQL server for the cluster tests: `initdb` and `postgres`
//! from the Debian package, in the test's temporary directory, on a free
//! loopback port, trust authentication for loopback. Run as the unprivileged
//! `postgres` user when the tests run as root (CI); killed by pid on drop.
//! No standby: the tests exercise the nodes, not the engine's failover.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{free_port, have_tool, text, ChildGuard};

/// The server binaries: the newest `/usr/lib/postgresql/N/bin`.
pub fn pg_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

/// Whether PostgreSQL can be started here; under CI=true a missing server
/// fails the test (see [`crate::require_tools`]).
pub fn require_postgres() -> bool {
    if pg_bin_dir().is_some() && have_tool("psql") {
        return true;
    }
    assert!(
        !crate::in_ci(),
        "PostgreSQL is not installed and CI=true (.ci/run installs the postgresql package)"
    );
    eprintln!("SKIP: PostgreSQL not installed (Debian package postgresql)");
    false
}

pub struct Postgres {
    guard: ChildGuard,
    pub port: u16,
    data: PathBuf,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

/// The postmaster on `data`, listening on 127.0.0.1:`port`.
fn spawn_server(bin: &Path, data: &Path, sock: &Path, port: u16) -> ChildGuard {
    let child = as_server_user(&bin.join("postgres"))
        .arg("-D")
        .arg(data)
        .args(["-p", &port.to_string(), "-k"])
        .arg(sock)
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "max_connections=60",
            "-c",
            "shared_buffers=32MB",
            "-c",
            "log_min_messages=warning",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting postgres");
    ChildGuard::new(child, "postgres")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `cmd` as the `postgres` user when we are root (initdb and postgres refuse root).
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = pg_bin_dir().expect("PostgreSQL server binaries (Debian package postgresql)");
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir_all(&sock).unwrap();
        if is_root() {
            // The server user must reach its directories.
            let chmod = Command::new("chmod")
                .arg("0755")
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(chmod.success());
            let chown = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(chown.success(), "chown to the postgres user");
        }
        let out = as_server_user(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "sluice", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdin(Stdio::null())
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let port = free_port();
        let mut pg = Postgres {
            guard: spawn_server(&bin, &data, &sock, port),
            port,
            data,
            sock,
            _dir: dir,
        };
        pg.wait_ready();
        pg
    }

    /// Polls until the server answers a query (30 s at most).
    fn wait_ready(&mut self) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(self.guard.is_running(), "postgres exited during start-up");
            if self.try_psql("SELECT 1").is_ok_and(|s| s.trim() == "1") {
                return;
            }
            assert!(Instant::now() < until, "postgres not ready within 30s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fast shutdown (SIGINT: open sessions are ended, in-flight
    /// transactions rolled back, a checkpoint written), waiting for the
    /// postmaster to exit. The data directory and port are kept for [`start_again`].
    ///
    /// [`start_again`]: Postgres::start_again
    pub fn stop(&mut self) {
        self.guard.signal(libc::SIGINT);
        let status = self.guard.wait_timeout(Duration::from_secs(30));
        assert!(status.is_some(), "postgres did not stop within 30s");
    }

    /// Starts the server again on the same data directory and port.
    pub fn start_again(&mut self) {
        assert!(!self.guard.is_running(), "postgres is still running");
        let bin = pg_bin_dir().expect("PostgreSQL server binaries");
        self.guard = spawn_server(&bin, &self.data, &self.sock, self.port);
        self.wait_ready();
    }

    /// The postmaster's pid (its backends are its children).
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// The connection string a node's `cluster.engine` lists.
    pub fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=sluice dbname=postgres connect_timeout=5",
            self.port
        )
    }

    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new("psql")
            .arg(self.dsn())
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(text(&out.stdout))
        } else {
            Err(text(&out.stderr))
        }
    }

    /// Runs `sql` with psql; panics on an error. Rows as `a|b` lines.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql)
            .unwrap_or_else(|e| panic!("psql {sql}: {e}"))
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if !self.guard.is_running() {
            return;
        }
        // Immediate shutdown: the postmaster stops its backends before it exits
        // (a SIGKILL of the postmaster alone would leave them behind for a while).
        self.guard.signal(libc::SIGQUIT);
        let _ = self.guard.wait_timeout(Duration::from_secs(10));
    }
}

/// What every cluster test starts with: PostgreSQL, and NSD serving
/// `<zone> MX 10 mx1` with `mx1` on a fresh loopback address, whose SMTP
/// port (the nodes' `delivery.mx_port`) the test's sink listens on.
pub struct ClusterStage {
    pub pg: Postgres,
    pub nsd: crate::nsd::Nsd,
    /// mx1's address.
    pub ip: std::net::Ipv4Addr,
    /// The port a sink on `ip` listens on.
    pub port: u16,
}

/// The [`ClusterStage`] of a test whose domain is `zone`; none (the test
/// returns) when nsd or PostgreSQL is missing outside CI.
pub fn cluster_stage(zone: &str) -> Option<ClusterStage> {
    if !crate::process::require_tools(&["nsd"]) || !require_postgres() {
        return None;
    }
    let pg = Postgres::start();
    let ip = crate::delivery::loopback();
    let port = crate::delivery::mx_port(&[ip]);
    let nsd = crate::nsd::Nsd::start(&format!("{zone} MX 10 mx1\nmx1 A {ip}"));
    Some(ClusterStage { pg, nsd, ip, port })
}

/// A cluster node as the cluster tests run one: one core, `name` in the
/// engine `pg`, delivery on through `nsd`'s MX to `port`, JSON logs, short
/// DNS, connect and retry times.
pub fn cluster_node(
    pg: &Postgres,
    nsd: &crate::nsd::Nsd,
    port: u16,
    name: &str,
) -> crate::relay::RelayBuilder {
    crate::relay::Relay::builder()
        .cores(1)
        .cluster(&pg.dsn(), name)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set(nsd.servers_set())
        .set("dns.timeout=\"1s\"")
        .set(format!("delivery.mx_port={port}"))
        .set("delivery.connect_timeout=\"5s\"")
        .set("queue.default.retry=[\"1s\"]")
}
