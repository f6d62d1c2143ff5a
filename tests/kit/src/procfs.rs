//! What a process holds, read from /proc: its TCP connections (to count them
//! before and after faults and loads) and its memory.

use std::collections::HashSet;
use std::time::Duration;

use crate::process::wait_until;

/// Inodes of the process's open sockets (/proc/PID/fd links "socket:[N]").
fn socket_inodes(pid: u32) -> HashSet<String> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let l = std::fs::read_link(e.path()).ok()?;
            let l = l.to_string_lossy();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect()
}

/// Open sockets of any kind.
pub fn sockets(pid: u32) -> usize {
    socket_inodes(pid).len()
}

/// TCP connections (not listeners) among the process's sockets: its socket
/// inodes matched against /proc/PID/net/tcp and tcp6, state other than LISTEN.
pub fn tcp_connections(pid: u32) -> usize {
    let inodes = socket_inodes(pid);
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).ok())
        .map(|t| {
            t.lines()
                .skip(1)
                .filter(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 9 && f[3] != "0A" && inodes.contains(f[9])
                })
                .count()
        })
        .sum()
}

/// Waits until the process holds at most `n` TCP connections (e.g. 0 once the
/// harness's readiness probe is gone); returns the count.
pub fn wait_connections_at_most(pid: u32, n: usize, what: &str, deadline: Duration) -> usize {
    let mut now = usize::MAX;
    wait_until(
        &format!("at most {n} TCP connection(s) of pid {pid} ({what})"),
        deadline,
        || {
            now = tcp_connections(pid);
            now <= n
        },
        || format!("{} connections now", tcp_connections(pid)),
    );
    now
}

/// A field of /proc/PID/status in kB ("VmRSS", "VmHWM").
pub fn status_kb(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}
