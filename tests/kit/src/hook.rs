//! The test HTTP hook (tests/py/test_hook.py, Python's http.server) on a free
//! port, logging every document it is sent; what it answers is in the
//! script's docstring.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::process::{free_port, py_script, wait_until, ChildGuard};

pub struct HookServer {
    _guard: ChildGuard,
    port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl HookServer {
    pub fn start() -> HookServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("requests.jsonl");
        let port = free_port();
        let child = Command::new("python3")
            .arg(py_script("test_hook.py"))
            .arg(port.to_string())
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start test_hook.py");
        let mut guard = ChildGuard::new(child, "test_hook.py");
        wait_until(
            "the test hook to listen",
            Duration::from_secs(30),
            || {
                assert!(guard.is_running(), "test_hook.py exited");
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            },
            String::new,
        );
        HookServer {
            _guard: guard,
            port,
            log,
            _dir: dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The documents received so far, in order.
    pub fn documents(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("log line")["doc"].clone())
            .collect()
    }
}
