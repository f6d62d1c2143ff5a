//! tests/py/tls_receiver.py on its own loopback address: an SMTP receiver whose TLS is
//! Python's `ssl` (OpenSSL), so the relay's outbound TLS policies meet a server nobody
//! here wrote. It writes one JSON line per event (`ready`, `session`, `message`…) to a
//! file the tests read.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::process::{py_script, wait_until, ChildGuard};

/// A running tls_receiver.py; stopped when dropped.
pub struct TlsReceiver {
    _guard: ChildGuard,
    events: PathBuf,
}

impl TlsReceiver {
    /// Listens on `ip:port`, writing events under `dir`. `tls`: the certificate and
    /// key STARTTLS offers (None: no STARTTLS); `client_ca`: require a client
    /// certificate from this CA. Returns once the receiver says it is ready.
    pub fn start(
        dir: &Path,
        ip: Ipv4Addr,
        port: u16,
        tls: Option<&(PathBuf, PathBuf)>,
        client_ca: Option<&Path>,
    ) -> TlsReceiver {
        let events = dir.join(format!("tls-receiver-{ip}-{port}.jsonl"));
        let mut cmd = Command::new("python3");
        cmd.arg(py_script("tls_receiver.py"))
            .args(["--listen", &format!("{ip}:{port}")])
            .arg("--events")
            .arg(&events);
        if let Some((cert, key)) = tls {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        if let Some(ca) = client_ca {
            cmd.arg("--client-ca").arg(ca);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let receiver = TlsReceiver {
            _guard: ChildGuard::new(cmd.spawn().expect("python3"), "tls_receiver.py"),
            events,
        };
        wait_until(
            &format!("tls_receiver.py on {ip}:{port}"),
            Duration::from_secs(30),
            || !receiver.of("ready").is_empty(),
            || format!("events: {:?}", receiver.events()),
        );
        receiver
    }

    /// Every event so far, in order.
    pub fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The events of one kind (`""`: all of them).
    pub fn of(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| kind.is_empty() || e["event"] == kind)
            .collect()
    }

    /// The messages received.
    pub fn messages(&self) -> Vec<Value> {
        self.of("message")
    }
}
