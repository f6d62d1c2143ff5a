//! The command line and configuration errors, as an operator meets them.

use sluice_testkit::*;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

fn write(dir: &std::path::Path, name: &str, content: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path.display().to_string()
}

fn failure(args: &[&str]) -> String {
    let out = sluice(args);
    assert!(
        !out.status.success(),
        "sluice {args:?} should fail; stdout: {}",
        text(&out.stdout)
    );
    assert_ne!(out.status.code(), Some(0));
    text(&out.stderr)
}

#[test]
fn check_config_accepts_the_shipped_example() {
    let example = repo_root().join("sluice.toml");
    let path = example.to_str().unwrap();
    let out = sluice(&["check-config", path]);
    assert_ok(&out, "check-config sluice.toml");
    assert!(text(&out.stdout).contains("ok"), "{}", text(&out.stdout));

    // `example-config` prints the same file.
    let out = sluice(&["example-config"]);
    assert_ok(&out, "example-config");
    assert_eq!(out.stdout, std::fs::read(&example).unwrap());
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "unknown.toml",
        "# a comment\n[server]\nhostname = \"mx.test\"\nbogus_knob = 1\n",
    );
    let err = failure(&["check-config", &f]);
    assert!(err.contains("bogus_knob"), "{err}");
    assert!(err.contains("line 4"), "{err}");

    // The same inside a listener table.
    let f = write(
        dir.path(),
        "unknown-listener.toml",
        "[server.listener.mx]\nbind = [\"127.0.0.1:2525\"]\n\nmax_conections = 5\n",
    );
    let err = failure(&["check-config", &f]);
    assert!(err.contains("max_conections"), "{err}");
    assert!(err.contains("line 4"), "{err}");
}

#[test]
fn bad_value_is_named_by_dotted_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "badvalue.toml",
        "[spool]\npath = \"x\"\n\nmap_size = \"lots\"\n",
    );
    let err = failure(&["check-config", &f]);
    assert!(err.contains("spool.map_size"), "{err}");
    assert!(err.contains("line 4"), "{err}");

    let f = write(
        dir.path(),
        "badduration.toml",
        "[server.listener.smtp]\nbind = [\"127.0.0.1:2525\"]\nidle_timeout = \"soon\"\n",
    );
    let err = failure(&["check-config", &f]);
    assert!(err.contains("server.listener.smtp.idle_timeout"), "{err}");
    assert!(err.contains("line 3"), "{err}");

    // `run` refuses the same file before doing anything.
    let err = failure(&["run", "--config", &f]);
    assert!(err.contains("server.listener.smtp.idle_timeout"), "{err}");

    let f = write(dir.path(), "syntax.toml", "[server]\nhostname = \n");
    let err = failure(&["check-config", &f]);
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn bad_override_names_the_key() {
    let example = repo_root().join("sluice.toml");
    let err = failure(&[
        "check-config",
        example.to_str().unwrap(),
        "--set",
        "server.cores=many",
    ]);
    assert!(err.contains("server.cores"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let spool = format!("spool.path={}", dir.path().join("spool").display());
    let err = failure(&["run", "--set", &spool, "--set", "server.cores=many"]);
    assert!(err.contains("server.cores"), "{err}");
    let err = failure(&["run", "--set", &spool, "--set", "server.no_such_key=1"]);
    assert!(err.contains("no_such_key"), "{err}");
}

#[test]
fn version_and_help() {
    let out = sluice(&["--version"]);
    assert_ok(&out, "--version");
    let v = text(&out.stdout);
    assert!(v.starts_with("sluice "), "{v}");
    assert!(v.contains(env!("CARGO_PKG_VERSION")), "{v}");

    let out = sluice(&["--help"]);
    assert_ok(&out, "--help");
    let h = text(&out.stdout);
    for sub in ["run", "check-config", "spool", "hash-password"] {
        assert!(h.contains(sub), "--help lacks {sub}: {h}");
    }
    let out = sluice(&["spool", "--help"]);
    assert_ok(&out, "spool --help");
    let h = text(&out.stdout);
    for sub in ["list", "show", "body", "count", "stats"] {
        assert!(h.contains(sub), "spool --help lacks {sub}: {h}");
    }
    // An unknown subcommand is a usage error.
    let out = sluice(&["frobnicate"]);
    assert!(!out.status.success());
}

#[test]
fn run_fails_when_the_port_is_taken() {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let mut child = ChildGuard::new(
        Command::new(bin())
            // No operations listener: only the SMTP port's conflict is under test.
            .args([
                "run",
                "--set",
                "server.cores=1",
                "--set",
                "admin.listen=\"\"",
                "--set",
            ])
            .arg(format!("spool.path={}", dir.path().join("spool").display()))
            .arg("--set")
            .arg(format!(
                "server.listener.inbound.bind=[\"127.0.0.1:{port}\"]"
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("err.log")).unwrap(),
            ))
            .spawn()
            .unwrap(),
        "sluice run",
    );
    let status = child
        .wait_timeout(Duration::from_secs(20))
        .expect("sluice run kept running on a port that is in use");
    let err = std::fs::read_to_string(dir.path().join("err.log")).unwrap();
    assert!(!status.success(), "{status}: {err}");
    assert!(
        err.contains("server.listener.inbound"),
        "the listener is not named: {err}"
    );
    assert!(
        err.contains(&port.to_string()),
        "the address is not named: {err}"
    );
    drop(holder);
}

#[test]
fn hash_password_makes_argon2id_hashes() {
    let a = hash_password("correct horse");
    let b = hash_password("correct horse");
    assert_ne!(a, b, "hashes must be salted");
    // An empty password is refused.
    let mut child = ChildGuard::new(
        Command::new(bin())
            .arg("hash-password")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        "hash-password",
    );
    let status = child.wait_timeout(Duration::from_secs(30)).expect("hangs");
    assert!(!status.success());
}

#[test]
fn json_logs_have_one_line_per_transaction() {
    let relay = Relay::start(&["log.format=\"json\""]);
    let mut c = relay.session();
    let id = c.send_mail(
        "a@example.test",
        &["b@example.test", "c@example.test"],
        b"Subject: j\r\n\r\nx\r\n",
    );
    c.expect("QUIT", 221);
    // The transaction line is written before the 250 goes out.
    let log = std::fs::read_to_string(relay.dir.path().join("relay-0.log")).unwrap();
    let mut found = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        if v["id"] == serde_json::json!(id) {
            found += 1;
            assert_eq!(v["result"], 250, "{v}");
            assert_eq!(v["recipients"], 2, "{v}");
            assert_eq!(v["client_ip"], "127.0.0.1", "{v}");
            assert_eq!(v["sender"], "a@example.test", "{v}");
        }
    }
    assert_eq!(found, 1, "one log line for transaction {id}:\n{log}");
}
