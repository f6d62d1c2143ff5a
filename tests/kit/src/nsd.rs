//! A real authoritative DNS server for the tests and benches: NSD on 127.0.0.1 at
//! a free port, in its own temporary directory, serving either the fixture zones
//! in tests/dns/zones ([`Nsd::fixture`]) or a dlv.test zone the test writes
//! ([`Nsd::start`]). Started in the foreground as a child process in its own
//! process group, ready once it answers a real query, stopped (the whole group,
//! by the leader's pid) when dropped.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{need_tool, repo_root};

/// The zone [`Nsd::start`] serves (each test has its own NSD, so the name repeats).
pub const ZONE: &str = "dlv.test";
/// A zone [`Nsd::start`] is configured for but cannot load: it answers SERVFAIL.
pub const BROKEN_ZONE: &str = "broken.test";

/// Fixture zones served by [`Nsd::fixture`], as (origin, file under tests/dns/zones).
const ZONES: &[(&str, &str)] = &[
    ("mail.test", "mail.test.zone"),
    ("other.test", "other.test.zone"),
    ("2.0.192.in-addr.arpa", "2.0.192.in-addr.arpa.zone"),
];

const READY_DEADLINE: Duration = Duration::from_secs(15);

fn zones_dir() -> PathBuf {
    repo_root().join("tests").join("dns").join("zones")
}

pub struct Nsd {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// What one NSD serves: zone clauses, where their files are, and a name that
/// must resolve once it is ready.
struct Zones {
    dir: Option<PathBuf>,
    clauses: String,
    probe: String,
    /// (file name, contents) written into the server's own directory.
    write: Vec<(String, String)>,
}

impl Nsd {
    /// Serves `records` (zone-file lines relative to dlv.test, e.g.
    /// "a MX 10 mx1" / "mx1 A 127.1.2.3") plus SOA/NS, and a broken.test zone
    /// whose file is missing (SERVFAIL).
    pub fn start(records: &str) -> Nsd {
        let zone = format!(
            "$ORIGIN {ZONE}.\n$TTL 60\n@ SOA ns hostmaster 1 3600 600 86400 5\n@ NS ns\nns A 127.0.0.1\n{records}\n"
        );
        Nsd::start_with(|| Zones {
            dir: None,
            clauses: format!(
                "zone:\n  name: {ZONE}\n  zonefile: dlv.zone\n\
                 zone:\n  name: {BROKEN_ZONE}\n  zonefile: missing.zone\n"
            ),
            probe: format!("ns.{ZONE}"),
            write: vec![("dlv.zone".into(), zone.clone())],
        })
    }

    /// [`Nsd::start`], and the parent zone `test.` too (empty but for its
    /// SOA/NS), so names under it answer NXDOMAIN rather than REFUSED: DMARC's
    /// tree walk (RFC 9989) asks `_dmarc.test.` like it would `_dmarc.com.`.
    pub fn start_with_parent(records: &str) -> Nsd {
        let zone = format!(
            "$ORIGIN {ZONE}.\n$TTL 60\n@ SOA ns hostmaster 1 3600 600 86400 5\n@ NS ns\nns A 127.0.0.1\n{records}\n"
        );
        let parent = "$ORIGIN test.\n$TTL 60\n@ SOA ns.dlv.test. hostmaster 1 3600 600 86400 5\n@ NS ns.dlv.test.\n".to_string();
        Nsd::start_with(|| Zones {
            dir: None,
            clauses: format!(
                "zone:\n  name: {ZONE}\n  zonefile: dlv.zone\n\
                 zone:\n  name: test\n  zonefile: parent.zone\n\
                 zone:\n  name: {BROKEN_ZONE}\n  zonefile: missing.zone\n"
            ),
            probe: format!("ns.{ZONE}"),
            write: vec![
                ("dlv.zone".into(), zone.clone()),
                ("parent.zone".into(), parent.clone()),
            ],
        })
    }

    /// Like [`Nsd::start`], plus zones of other names, each as (origin,
    /// zone-file lines relative to it): MX hosts under real provider names
    /// (`google.com`…) pointing at loopback addresses.
    pub fn start_with_zones(records: &str, extra: &[(&str, &str)]) -> Nsd {
        let zone_text = |origin: &str, records: &str| {
            format!(
                "$ORIGIN {origin}.\n$TTL 60\n@ SOA ns.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 5\n@ NS ns.{ZONE}.\n{records}\n"
            )
        };
        let zone = format!(
            "$ORIGIN {ZONE}.\n$TTL 60\n@ SOA ns hostmaster 1 3600 600 86400 5\n@ NS ns\nns A 127.0.0.1\n{records}\n"
        );
        let mut clauses = format!("zone:\n  name: {ZONE}\n  zonefile: dlv.zone\n");
        let mut write = vec![("dlv.zone".to_string(), zone)];
        for (i, (origin, records)) in extra.iter().enumerate() {
            let file = format!("extra{i}.zone");
            clauses.push_str(&format!("zone:\n  name: {origin}\n  zonefile: {file}\n"));
            write.push((file, zone_text(origin, records)));
        }
        Nsd::start_with(|| Zones {
            dir: None,
            clauses: clauses.clone(),
            probe: format!("ns.{ZONE}"),
            write: write.clone(),
        })
    }

    /// Serves the fixture zones of tests/dns/zones ([`ZONES`]).
    pub fn fixture() -> Nsd {
        Nsd::start_with(|| Zones {
            dir: Some(zones_dir()),
            clauses: ZONES
                .iter()
                .map(|(name, file)| format!("zone:\n  name: {name}\n  zonefile: {file}\n"))
                .collect(),
            probe: "ns.mail.test".into(),
            write: Vec::new(),
        })
    }

    /// Serves whole zones the caller wrote, as (origin, zone file text); ready
    /// once `probe` (an A record in one of them) resolves. The DNSSEC test bed
    /// ([`crate::dnssec`]) serves its signed zones this way.
    pub fn serve(zones: &[(String, String)], probe: &str) -> Nsd {
        Nsd::start_with(|| Zones {
            dir: None,
            clauses: zones
                .iter()
                .enumerate()
                .map(|(i, (origin, _))| format!("zone:\n  name: {origin}\n  zonefile: z{i}.zone\n"))
                .collect(),
            probe: probe.to_string(),
            write: zones
                .iter()
                .enumerate()
                .map(|(i, (_, text))| (format!("z{i}.zone"), text.clone()))
                .collect(),
        })
    }

    fn start_with(zones: impl Fn() -> Zones) -> Nsd {
        need_tool("nsd", "nsd");
        let mut last_error = String::new();
        // A port found free can be taken before NSD binds it: try a few.
        for _ in 0..5 {
            match Nsd::try_start(zones()) {
                Ok(nsd) => return nsd,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start nsd: {last_error}");
    }

    fn try_start(zones: Zones) -> Result<Nsd, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        for (file, contents) in &zones.write {
            std::fs::write(dir.path().join(file), contents).map_err(|e| e.to_string())?;
        }
        let port = free_udp_tcp_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let d = dir.path().display();
        let zonesdir = zones.dir.unwrap_or_else(|| dir.path().to_path_buf());
        let conf = format!(
            "server:\n  ip-address: 127.0.0.1@{port}\n  port: {port}\n  do-ip6: no\n  \
             username: \"\"\n  chroot: \"\"\n  zonesdir: \"{zones}\"\n  \
             pidfile: \"{d}/nsd.pid\"\n  database: \"\"\n  xfrdfile: \"{d}/xfrd.state\"\n  \
             zonelistfile: \"{d}/zone.list\"\n  logfile: \"{d}/nsd.log\"\n  \
             server-count: 1\n  verbosity: 1\n  hide-version: yes\n  tcp-count: 64\n  \
             rrl-ratelimit: 0\n  rrl-whitelist-ratelimit: 0\n\
             remote-control:\n  control-enable: no\n{clauses}",
            zones = zonesdir.display(),
            clauses = zones.clauses,
        );
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
        nsd.wait_ready(&zones.probe)?;
        Ok(nsd)
    }

    /// Polls with a real query until NSD answers it.
    fn wait_ready(&mut self, name: &str) -> Result<(), String> {
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
            let query = sluice_dns::build_query(id, name, sluice_dns::QueryType::A)
                .map_err(|e| e.to_string())?;
            let _ = socket.send_to(&query, self.addr);
            if let Ok((n, _)) = socket.recv_from(&mut buf) {
                let answer =
                    sluice_dns::parse_answer(id, name, sluice_dns::QueryType::A, &buf[..n]);
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

    /// Replaces the records of a server made by [`Nsd::start`] (a new serial,
    /// then SIGHUP, which has NSD reload changed zone files), and waits until
    /// the TXT record `name` answers with a string containing `expect`.
    pub fn replace_records(&mut self, records: &str, serial: u32, name: &str, expect: &str) {
        let zone = format!(
            "$ORIGIN {ZONE}.\n$TTL 60\n@ SOA ns hostmaster {serial} 3600 600 86400 5\n@ NS ns\nns A 127.0.0.1\n{records}\n"
        );
        let file = self.dir.path().join("dlv.zone");
        std::fs::write(&file, zone).expect("write the zone");
        let child = self.child.as_ref().expect("nsd running");
        // SAFETY: kill(2) on a child we own and have not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) };
        let socket = UdpSocket::bind("127.0.0.1:0").expect("udp socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        while started.elapsed() < READY_DEADLINE {
            let id = 0x5eee;
            let query =
                sluice_dns::build_query(id, name, sluice_dns::QueryType::Txt).expect("query");
            let _ = socket.send_to(&query, self.addr);
            if let Ok((n, _)) = socket.recv_from(&mut buf) {
                let answer =
                    sluice_dns::parse_answer(id, name, sluice_dns::QueryType::Txt, &buf[..n]);
                if answer.is_ok_and(|a| {
                    a.records
                        .iter()
                        .any(|r| matches!(r, sluice_dns::Record::Txt(t, _) if t.contains(expect)))
                }) {
                    return;
                }
            }
        }
        panic!("nsd did not load the new records: {}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nsd.log")).unwrap_or_default()
    }

    /// `--set` pointing the relay's resolver at this server.
    pub fn servers_set(&self) -> String {
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
pub(crate) fn free_udp_tcp_port() -> u16 {
    crate::process::free_port_where(|port| {
        let udp = UdpSocket::bind(("127.0.0.1", port));
        udp.is_ok() && TcpListener::bind(("127.0.0.1", port)).is_ok()
    })
}
