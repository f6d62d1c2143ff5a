//! CI smoke run of the end-to-end benchmark script (issue 5): `bench/relay-vs-postfix.sh
//! --quick` must keep working. No timing assertions: only that the script exits 0 and that
//! its table has a sluice row with messages delivered.
//!
//! Needs what the script needs (root, Postfix's smtp-source and postfix, curl, jq): when
//! one is missing the test fails under CI=true and is skipped elsewhere (the test kit's
//! skip policy, `require_tools!`).

use std::path::PathBuf;
use std::process::Command;

use sluice_testkit::{bin, in_ci, repo_root, require_tools};

fn bin_dir() -> PathBuf {
    // cargo builds every workspace binary into the same directory.
    bin().parent().expect("binary directory").to_path_buf()
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Parse the markdown table: rows of `| case | setup | accepted | delivered | ...`.
fn delivered_by_setup(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| case "))
        .filter_map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            (cells.len() >= 4).then(|| (cells[1].to_string(), cells[3].to_string()))
        })
        .collect()
}

#[test]
fn relay_vs_postfix_quick_runs() {
    require_tools!(
        "/usr/sbin/smtp-source",
        "/usr/sbin/postfix",
        "/usr/sbin/postconf",
        "curl",
        "jq",
        "timeout",
        "openssl",
        "ss"
    );
    if !is_root() {
        // Like a missing tool: a failure in CI, a skip elsewhere.
        assert!(!in_ci(), "the bench script needs root, and CI=true");
        eprintln!("SKIP relay_vs_postfix_quick_runs: not root");
        return;
    }
    let bins = bin_dir();
    assert!(
        bins.join("sluice-loadgen").exists(),
        "no sluice-loadgen in {}",
        bins.display()
    );
    let repo = repo_root();
    // A port base of its own (the script refuses ports in use rather than sharing them),
    // below the kernel's ephemeral range (32768–60999): there, a client socket of another
    // test running at the same time can hold the port and make the sink's bind fail.
    // The quick run uses fewer than 100 ports from the base.
    let port_base = 20000 + (std::process::id() % 120) * 100;
    let out = Command::new("timeout")
        .arg("120")
        .arg(repo.join("bench/relay-vs-postfix.sh"))
        .args(["--quick", "--no-build", "--no-append", "--bin-dir"])
        .arg(&bins)
        .args(["--port-base", &port_base.to_string()])
        .current_dir(&repo)
        .output()
        .expect("run bench/relay-vs-postfix.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "script failed: {:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    let rows = delivered_by_setup(&stdout);
    let sluice: Vec<_> = rows
        .iter()
        .filter(|(setup, _)| setup.starts_with("sluice"))
        .collect();
    assert!(
        !sluice.is_empty(),
        "no sluice row in the table:\n{stdout}\n{stderr}"
    );
    for (setup, delivered) in &sluice {
        let n: f64 = delivered.parse().unwrap_or_else(|_| {
            panic!("{setup}: delivered {delivered:?} is not a number\n{stdout}\n{stderr}")
        });
        assert!(n > 0.0, "{setup}: delivered {n}\n{stdout}");
    }
}
