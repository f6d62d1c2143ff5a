//! A DNSSEC test bed on loopback: zones signed by `ldns-signzone` (ECDSA P-256,
//! a KSK and a ZSK per zone, NSEC) and served by a real NSD ([`Nsd::serve`]),
//! behind a real validating `unbound` on another loopback port that holds each
//! signed zone's trust anchor and reaches NSD through stub zones.
//!
//! What the resolver in front says about each kind of [`Zone`]:
//! - [`Zone::secure`]: validated, answers carry the AD bit (NODATA and NXDOMAIN
//!   too: NSEC proves them);
//! - [`Zone::wrong_key`]: signed, but with a key that is not the anchor unbound
//!   holds for it: every answer is bogus, so unbound says SERVFAIL;
//! - [`Zone::unsigned`]: no signatures and no anchor: answers without AD
//!   (insecure, as for a zone under a parent without DS);
//! - [`Zone::corrupt_signature`] on a secure zone: one RRset's RRSIG is altered
//!   after signing, so that RRset alone is bogus (SERVFAIL) while the rest of
//!   the zone stays secure.
//!
//! unbound runs with `val-permissive-mode: no` and `harden-dnssec-stripped: yes`
//! (the defaults, written out) and no root anchor, so only the bed's anchors
//! decide. Both servers run in their own process groups and are stopped by pid
//! when the bed is dropped.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::nsd::{free_udp_tcp_port, Nsd};
use crate::process::need_tool;

/// Peer tools the bed needs: `require_tools!` them in a test before starting it.
pub const TOOLS: &[&str] = &["nsd", "unbound", "ldns-keygen", "ldns-signzone"];

const READY_DEADLINE: Duration = Duration::from_secs(15);

/// How a zone is signed and anchored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signing {
    /// Signed; unbound holds its KSK as trust anchor.
    Secure,
    /// Signed with one key; unbound's anchor for it is another key.
    WrongKey,
    /// Not signed; no anchor.
    Unsigned,
}

/// One zone of the bed: its origin (e.g. "sec.test") and zone-file lines
/// relative to it ("mx1 A 127.0.0.2", "_25._tcp.mx1 TLSA 3 1 1 <hex>"). SOA, NS
/// and `ns A 127.0.0.1` are added.
#[derive(Debug, Clone)]
pub struct Zone {
    pub origin: String,
    pub records: String,
    pub signing: Signing,
    /// (owner relative to the origin, "@" for the apex; record type) whose
    /// RRSIG is altered after signing.
    corrupt: Vec<(String, String)>,
}

impl Zone {
    fn new(origin: &str, records: &str, signing: Signing) -> Zone {
        Zone {
            origin: origin.trim_end_matches('.').to_ascii_lowercase(),
            records: records.to_string(),
            signing,
            corrupt: Vec::new(),
        }
    }

    pub fn secure(origin: &str, records: &str) -> Zone {
        Zone::new(origin, records, Signing::Secure)
    }

    pub fn wrong_key(origin: &str, records: &str) -> Zone {
        Zone::new(origin, records, Signing::WrongKey)
    }

    pub fn unsigned(origin: &str, records: &str) -> Zone {
        Zone::new(origin, records, Signing::Unsigned)
    }

    /// Alters the signature over `owner`/`rtype` (e.g. "_25._tcp.mx1", "TLSA")
    /// after signing: that RRset fails validation.
    pub fn corrupt_signature(mut self, owner: &str, rtype: &str) -> Zone {
        self.corrupt
            .push((owner.to_string(), rtype.to_ascii_uppercase()));
        self
    }

    fn text(&self) -> String {
        format!(
            "$ORIGIN {o}.\n$TTL 60\n@ SOA ns hostmaster 1 3600 600 86400 5\n@ NS ns\n\
             ns A 127.0.0.1\n{r}\n",
            o = self.origin,
            r = self.records
        )
    }

    fn fqdn(&self, owner: &str) -> String {
        if owner == "@" {
            format!("{}.", self.origin)
        } else {
            format!("{}.{}.", owner.trim_end_matches('.'), self.origin).to_ascii_lowercase()
        }
    }
}

/// NSD with the signed zones and a validating unbound in front of it.
pub struct DnssecBed {
    unbound: Unbound,
    /// The validating resolver: what the relay's `dns.servers` should name.
    pub resolver: SocketAddr,
    nsd: Nsd,
    dir: tempfile::TempDir,
}

impl DnssecBed {
    /// Signs `zones`, serves them and starts the validating resolver; returns
    /// once the resolver answers for the first zone.
    pub fn start(zones: &[Zone]) -> DnssecBed {
        for (tool, package) in [
            ("unbound", "unbound"),
            ("ldns-keygen", "ldnsutils"),
            ("ldns-signzone", "ldnsutils"),
        ] {
            need_tool(tool, package);
        }
        assert!(!zones.is_empty(), "a DNSSEC bed needs a zone");
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut served = Vec::new();
        let mut anchors = String::new();
        for zone in zones {
            let (text, anchor) = sign(dir.path(), zone);
            served.push((zone.origin.clone(), text));
            anchors.push_str(&anchor);
        }
        std::fs::write(dir.path().join("anchors"), &anchors).expect("write anchors");
        let probe = format!("ns.{}", zones[0].origin);
        let nsd = Nsd::serve(&served, &probe);

        let mut last_error = String::new();
        // A port found free can be taken before unbound binds it: try a few.
        for _ in 0..5 {
            match Unbound::start(dir.path(), zones, nsd.addr, &probe) {
                Ok(unbound) => {
                    return DnssecBed {
                        resolver: unbound.addr,
                        unbound,
                        nsd,
                        dir,
                    }
                }
                Err(e) => last_error = e,
            }
        }
        panic!("could not start unbound: {last_error}");
    }

    /// The authoritative server (no validation): for tests that need to see
    /// what a non-validating path would say.
    pub fn authoritative(&self) -> SocketAddr {
        self.nsd.addr
    }

    /// `--set` pointing the relay's resolver at the validating unbound.
    pub fn servers_set(&self) -> String {
        format!("dns.servers=[\"{}\"]", self.resolver)
    }

    /// unbound's log (validation failures are logged at val-log-level 2).
    pub fn log(&self) -> String {
        read_log(self.dir.path())
    }

    /// unbound's process id (the leader of its process group).
    pub fn unbound_pid(&self) -> u32 {
        self.unbound.child.as_ref().map_or(0, Child::id)
    }
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("unbound.log")).unwrap_or_default()
}

/// A running unbound, stopped (its process group, by the leader's pid) on drop.
struct Unbound {
    child: Option<Child>,
    addr: SocketAddr,
}

impl Unbound {
    fn start(dir: &Path, zones: &[Zone], nsd: SocketAddr, probe: &str) -> Result<Unbound, String> {
        let port = free_udp_tcp_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let conf_path = dir.join("unbound.conf");
        std::fs::write(&conf_path, unbound_conf(dir, port, zones, nsd))
            .map_err(|e| e.to_string())?;
        let mut cmd = Command::new(unbound_binary());
        cmd.arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(|e| format!("spawn unbound: {e}"))?;
        let mut unbound = Unbound {
            child: Some(child),
            addr,
        };
        unbound.wait_ready(dir, probe)?;
        Ok(unbound)
    }

    /// Polls with a real query until unbound answers it.
    fn wait_ready(&mut self, dir: &Path, name: &str) -> Result<(), String> {
        let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        while started.elapsed() < READY_DEADLINE {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("unbound exited ({status}): {}", read_log(dir)));
                }
            }
            let id = 0x5eed;
            let query = sluice_dns::build_query(id, name, sluice_dns::QueryType::A)
                .map_err(|e| e.to_string())?;
            let _ = socket.send_to(&query, self.addr);
            if let Ok((n, _)) = socket.recv_from(&mut buf) {
                // Any real answer will do, a SERVFAIL for a bogus zone too: the
                // tests assert what the answers say.
                match sluice_dns::parse_answer(id, name, sluice_dns::QueryType::A, &buf[..n]) {
                    Ok(_) | Err(sluice_dns::DnsError::ServerFailure(_)) => return Ok(()),
                    Err(_) => {}
                }
            }
        }
        Err(format!(
            "unbound not answering after {READY_DEADLINE:?}: {}",
            read_log(dir)
        ))
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pgid = child.id() as libc::pid_t;
            // SAFETY: kill(2) on the process group of a child we own and have not reaped.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

/// Runs a signing tool in `dir`; its trimmed stdout.
fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A new ECDSA P-256 key for `origin` in `dir`; its base name.
fn keygen(dir: &Path, origin: &str, ksk: bool) -> String {
    let mut args = vec!["-a", "ECDSAP256SHA256"];
    if ksk {
        args.push("-k");
    }
    args.push(origin);
    run(dir, "ldns-keygen", &args)
}

/// The zone text to serve and the trust-anchor lines for it.
fn sign(dir: &Path, zone: &Zone) -> (String, String) {
    let text = zone.text();
    if zone.signing == Signing::Unsigned {
        assert!(
            zone.corrupt.is_empty(),
            "{}: an unsigned zone has no signature to corrupt",
            zone.origin
        );
        return (text, String::new());
    }
    let unsigned = format!("{}.unsigned", zone.origin);
    let signed = format!("{}.signed", zone.origin);
    std::fs::write(dir.join(&unsigned), &text).expect("write zone");
    let ksk = keygen(dir, &zone.origin, true);
    let zsk = keygen(dir, &zone.origin, false);
    // Inception an hour back: clocks of signer and validator are the same here,
    // but a signature must never look like it is from the future.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let inception = (now.saturating_sub(3600)).to_string();
    let expiration = (now + 30 * 86400).to_string();
    run(
        dir,
        "ldns-signzone",
        &[
            "-i",
            &inception,
            "-e",
            &expiration,
            "-o",
            &zone.origin,
            "-f",
            &signed,
            &unsigned,
            &ksk,
            &zsk,
        ],
    );
    let mut signed_text = std::fs::read_to_string(dir.join(&signed)).expect("read signed zone");
    for (owner, rtype) in &zone.corrupt {
        signed_text = corrupt_rrsig(&signed_text, &zone.fqdn(owner), rtype)
            .unwrap_or_else(|| panic!("{}: no RRSIG over {owner} {rtype}", zone.origin));
    }
    let anchor_key = match zone.signing {
        Signing::Secure => ksk,
        // A key of the right name and algorithm that signed nothing.
        _ => keygen(dir, &zone.origin, true),
    };
    let anchor =
        std::fs::read_to_string(dir.join(format!("{anchor_key}.key"))).expect("read key file");
    (signed_text, anchor)
}

/// The zone text with one character of the signature over `owner`/`rtype`
/// changed (still valid base64); None when there is no such RRSIG.
fn corrupt_rrsig(text: &str, owner: &str, rtype: &str) -> Option<String> {
    let mut found = false;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let is_target = fields.len() > 5
                && fields[0].eq_ignore_ascii_case(owner)
                && fields[3] == "RRSIG"
                && fields[4].eq_ignore_ascii_case(rtype);
            if !is_target {
                return line.to_string();
            }
            found = true;
            let signature = fields[fields.len() - 1];
            let mut bytes = signature.as_bytes().to_vec();
            let i = bytes.len() / 2;
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let altered = String::from_utf8(bytes).expect("base64 is ASCII");
            let mut out = fields[..fields.len() - 1].join("\t");
            out.push('\t');
            out.push_str(&altered);
            out
        })
        .collect();
    found.then(|| lines.join("\n") + "\n")
}

fn unbound_conf(dir: &Path, port: u16, zones: &[Zone], nsd: SocketAddr) -> String {
    let d = dir.display();
    let mut conf = format!(
        "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-ip6: no\n  \
         do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  \
         pidfile: \"{d}/unbound.pid\"\n  use-syslog: no\n  logfile: \"{d}/unbound.log\"\n  \
         verbosity: 1\n  val-log-level: 2\n  num-threads: 1\n  so-reuseport: no\n  \
         outgoing-range: 64\n  num-queries-per-thread: 32\n  \
         access-control: 127.0.0.0/8 allow\n  do-not-query-localhost: no\n  \
         module-config: \"validator iterator\"\n  val-permissive-mode: no\n  \
         harden-dnssec-stripped: yes\n  qname-minimisation: no\n  \
         trust-anchor-signaling: no\n  root-key-sentinel: no\n  \
         local-zone: \"test.\" nodefault\n  trust-anchor-file: \"{d}/anchors\"\n\
         remote-control:\n  control-enable: no\n"
    );
    for zone in zones {
        conf.push_str(&format!(
            "stub-zone:\n  name: \"{}\"\n  stub-addr: {}@{}\n",
            zone.origin,
            nsd.ip(),
            nsd.port()
        ));
    }
    conf
}

fn unbound_binary() -> PathBuf {
    for candidate in ["/usr/sbin/unbound", "/usr/local/sbin/unbound"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    PathBuf::from("unbound")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupts_only_the_named_signature() {
        let text = "a.sec.test.\t60\tIN\tA\t127.0.0.2\n\
                    a.sec.test.\t60\tIN\tRRSIG\tA 13 3 60 2 1 5 sec.test. QUJD\n\
                    b.sec.test.\t60\tIN\tRRSIG\tA 13 3 60 2 1 5 sec.test. QUJD\n";
        let out = corrupt_rrsig(text, "a.sec.test.", "A").expect("found");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "a.sec.test.\t60\tIN\tA\t127.0.0.2");
        assert!(lines[1].ends_with("QUAD"), "{}", lines[1]);
        assert!(lines[2].ends_with("QUJD"));
        assert!(corrupt_rrsig(text, "a.sec.test.", "TLSA").is_none());
    }
}
