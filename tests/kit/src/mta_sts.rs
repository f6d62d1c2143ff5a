//! An MTA-STS policy server (RFC 8461 §3.3) for the tests: tests/py/mta_sts_server.py
//! (Python's http.server and ssl) serves `https://mta-sts.LABEL.dlv.test/.well-known/mta-sts.txt`
//! from files the test writes, one certificate per name chosen by SNI, and
//! logs each request as a JSON line. Stopped by pid on drop.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::nsd::ZONE;
use crate::process::{py_script, wait_until, ChildGuard};

/// A JSON-lines event file written by one of the Python peers.
pub fn events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// mta_sts_server.py: one HTTPS server for every `mta-sts.D` name, the
/// certificate chosen by SNI.
pub struct PolicyServer {
    _guard: ChildGuard,
    root: PathBuf,
    log: PathBuf,
}

impl PolicyServer {
    pub fn start(
        dir: &Path,
        ip: Ipv4Addr,
        port: u16,
        certs: &[(String, (PathBuf, PathBuf))],
    ) -> PolicyServer {
        let root = dir.join("policies");
        std::fs::create_dir_all(&root).unwrap();
        let log = dir.join("https.jsonl");
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(py_script("mta_sts_server.py"))
            .args(["--listen", &format!("{ip}:{port}")])
            .arg("--root")
            .arg(&root)
            .arg("--log")
            .arg(&log);
        for (name, (cert, key)) in certs {
            cmd.arg("--cert")
                .arg(format!("{name}={}:{}", cert.display(), key.display()));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let s = PolicyServer {
            _guard: ChildGuard::new(child, "mta_sts_server.py"),
            root,
            log,
        };
        wait_until(
            "mta_sts_server.py",
            Duration::from_secs(15),
            || events(&s.log).iter().any(|e| e["event"] == "ready"),
            || format!("{:?}", events(&s.log)),
        );
        s
    }

    /// The policy served for `mta-sts.{label}.dlv.test` (max_age one day).
    pub fn policy(&self, label: &str, mode: &str, mx: &[&str]) {
        self.policy_max_age(label, mode, mx, 86400);
    }

    /// The policy served for `mta-sts.{label}.dlv.test`, with its max_age
    /// in seconds.
    pub fn policy_max_age(&self, label: &str, mode: &str, mx: &[&str], max_age: u64) {
        let mut body = format!("version: STSv1\r\nmode: {mode}\r\n");
        for m in mx {
            body.push_str(&format!("mx: {m}\r\n"));
        }
        body.push_str(&format!("max_age: {max_age}\r\n"));
        // Renamed into place: a relay refreshing in the background never
        // reads half a file.
        let path = self.root.join(format!("mta-sts.{label}.{ZONE}.txt"));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    /// How the server misbehaves for `mta-sts.{label}.dlv.test` ("" = not).
    pub fn mode(&self, label: &str, mode: &str) {
        std::fs::write(self.root.join(format!("mta-sts.{label}.{ZONE}.mode")), mode).unwrap();
    }

    /// Requests for `mta-sts.{label}.dlv.test`'s policy so far.
    pub fn requests(&self, label: &str) -> usize {
        let host = format!("mta-sts.{label}.{ZONE}");
        events(&self.log)
            .iter()
            .filter(|e| e["host"] == host.as_str() && e["path"] == "/.well-known/mta-sts.txt")
            .count()
    }

    /// Serves `body` as-is (e.g. text that is not a policy) for
    /// `mta-sts.{label}.dlv.test`.
    pub fn body(&self, label: &str, body: &str) {
        std::fs::write(self.root.join(format!("mta-sts.{label}.{ZONE}.txt")), body).unwrap();
    }
}
