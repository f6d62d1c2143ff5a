//! A real authoritative DNS server for the tests and benches: NSD on 127.0.0.1 at
//! a free port, serving the zones in tests/dns/zones, in its own temporary
//! directory. Started in the foreground as a child process, ready once it
//! answers a real query, stopped (its whole process group) when dropped.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Zones served, as (origin, file under tests/dns/zones).
pub const ZONES: &[(&str, &str)] = &[
    ("mail.test", "mail.test.zone"),
    ("other.test", "other.test.zone"),
    ("2.0.192.in-addr.arpa", "2.0.192.in-addr.arpa.zone"),
];

const READY_DEADLINE: Duration = Duration::from_secs(15);

pub fn zones_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests")
        .join("dns")
        .join("zones")
}

pub struct Nsd {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Nsd {
    /// Start NSD; panics with its log if it cannot be started.
    pub fn start() -> Nsd {
        let mut last_error = String::new();
        // A port found free can be taken before NSD binds it: try a few.
        for _ in 0..5 {
            match Nsd::try_start() {
                Ok(nsd) => return nsd,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start nsd: {last_error}");
    }

    fn try_start() -> Result<Nsd, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let port = free_udp_tcp_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let d = dir.path().display();
        let mut conf = format!(
            "server:\n  ip-address: 127.0.0.1@{port}\n  port: {port}\n  do-ip6: no\n  \
             username: \"\"\n  chroot: \"\"\n  zonesdir: \"{zones}\"\n  \
             pidfile: \"{d}/nsd.pid\"\n  database: \"\"\n  xfrdfile: \"{d}/xfrd.state\"\n  \
             zonelistfile: \"{d}/zone.list\"\n  logfile: \"{d}/nsd.log\"\n  \
             server-count: 1\n  verbosity: 1\n  hide-version: yes\n  tcp-count: 64\n  \
             rrl-ratelimit: 0\n  rrl-whitelist-ratelimit: 0\n\
             remote-control:\n  control-enable: no\n",
            zones = zones_dir().display()
        );
        for (name, file) in ZONES {
            conf.push_str(&format!("zone:\n  name: {name}\n  zonefile: {file}\n"));
        }
        let conf_path = dir.path().join("nsd.conf");
        std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;

        let mut cmd = Command::new(nsd_binary());
        cmd.arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Own process group: NSD forks (xfrd, main, server), and Drop stops them all.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(|e| format!("spawn nsd: {e}"))?;
        let mut nsd = Nsd {
            child: Some(child),
            addr,
            dir,
        };
        nsd.wait_ready()?;
        Ok(nsd)
    }

    /// Poll with a real query until NSD answers it.
    fn wait_ready(&mut self) -> Result<(), String> {
        let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        while started.elapsed() < READY_DEADLINE {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("nsd exited ({status}): {}", self.log()));
                }
            }
            let id = 0x5eed;
            let query = sluice_dns::build_query(id, "ns.mail.test", sluice_dns::QueryType::A)
                .map_err(|e| e.to_string())?;
            let _ = socket.send_to(&query, self.addr);
            if let Ok((n, _)) = socket.recv_from(&mut buf) {
                let answer = sluice_dns::parse_answer(
                    id,
                    "ns.mail.test",
                    sluice_dns::QueryType::A,
                    &buf[..n],
                );
                if answer.is_ok_and(|a| !a.records.is_empty()) {
                    return Ok(());
                }
            }
        }
        Err(format!(
            "nsd not answering after {READY_DEADLINE:?}: {}",
            self.log()
        ))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nsd.log")).unwrap_or_default()
    }

    /// `--set` value pointing the relay's resolver at this server.
    pub fn servers_override(&self) -> String {
        format!("dns.servers=[\"{}\"]", self.addr)
    }
}

impl Drop for Nsd {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGKILL to the whole group: NSD's forked processes go with it. The
        // leader is not reaped yet, so its group id cannot have been reused.
        let pgid = child.id() as libc::pid_t;
        // SAFETY: kill(2) on the process group of a child we own and have not reaped.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = child.wait();
    }
}

fn nsd_binary() -> PathBuf {
    for candidate in ["/usr/sbin/nsd", "/usr/local/sbin/nsd"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    PathBuf::from("nsd")
}

/// A port free for both UDP and TCP on 127.0.0.1 (NSD serves both).
pub fn free_udp_tcp_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("local addr").port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
