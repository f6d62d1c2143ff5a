//! The command line and configuration errors, as an operator meets them.

use sluice_testkit::*;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    for sub in ["run", "check-config", "queue", "spool", "hash-password"] {
        assert!(h.contains(sub), "--help lacks {sub}: {h}");
    }
    let out = sluice(&["queue", "--help"]);
    assert_ok(&out, "queue --help");
    let h = text(&out.stdout);
    for sub in [
        "summary", "list", "show", "body", "count", "stats", "retry", "cancel",
    ] {
        assert!(h.contains(sub), "queue --help lacks {sub}: {h}");
    }
    // The old offline spelling is still there, and says what replaces it.
    let out = sluice(&["spool", "--help"]);
    assert_ok(&out, "spool --help");
    let h = text(&out.stdout);
    assert!(h.contains("Deprecated"), "spool --help: {h}");
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
    // Lines go out through the log writer thread; a SIGTERM stop flushes them.
    let mut relay = relay;
    assert!(relay.terminate().success());
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

#[test]
fn text_logs_off_a_terminal_have_no_colour_and_are_flushed_at_stop() {
    // stderr is a file here, as under journald: no ANSI escape codes.
    let mut relay = Relay::start(&[]);
    let mut c = relay.session();
    let id = c.send_mail(
        "a@example.test",
        &["b@example.test"],
        b"Subject: c\r\n\r\nx\r\n",
    );
    c.expect("QUIT", 221);
    assert!(relay.terminate().success());
    let log = relay.log();
    assert!(!log.contains('\x1b'), "colour codes in a log file:\n{log}");
    // Everything logged up to the exit was written (the writer is flushed).
    assert!(log.contains(&id), "the transaction line is missing:\n{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains("sluice stopped"),
        "last line {last:?}:\n{log}"
    );
}

#[test]
fn too_little_locked_memory_fails_at_start_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let spool = format!("spool.path={}", dir.path().join("spool").display());
    let port = free_port();
    let bind = format!("server.listener.smtp.bind=[\"127.0.0.1:{port}\"]");
    // 64 KiB: below the 512 KiB glommio needs for io_uring.
    let out = run_with_timeout(
        Command::new("sh")
            .arg("-c")
            .arg("ulimit -l 64 && exec \"$@\"")
            .arg("sh")
            .arg(bin())
            .args([
                "run",
                "--set",
                "server.cores=1",
                "--set",
                "admin.listen=\"\"",
            ])
            .args(["--set", &spool, "--set", &bind]),
        Duration::from_secs(30),
    );
    assert!(
        !out.status.success(),
        "started with 64 KiB of locked memory"
    );
    let err = text(&out.stderr);
    assert!(err.contains("RLIMIT_MEMLOCK"), "{err}");
    assert!(err.contains("LimitMEMLOCK=infinity"), "{err}");
    assert!(err.contains("ulimit -l"), "{err}");
}

#[test]
fn check_config_changes_says_restart_reload_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let old = write(
        dir.path(),
        "old.toml",
        "[relay]\nlocal_domains = [\"a.test\"]\n",
    );
    let reload = write(
        dir.path(),
        "reload.toml",
        "[relay]\nlocal_domains = [\"b.test\"]\n",
    );
    let restart = write(
        dir.path(),
        "restart.toml",
        "[server]\ncores = 2\n[relay]\nlocal_domains = [\"b.test\"]\n",
    );
    let first_line = |new: &str| {
        let out = sluice(&["check-config", "--changes", &old, new]);
        assert_ok(&out, "check-config --changes");
        text(&out.stdout)
    };
    assert_eq!(first_line(&old), "none\n");
    assert_eq!(first_line(&reload), "reload\nreloadable: relay\n");
    let out = first_line(&restart);
    assert!(
        out.starts_with("restart\nneed a restart: server.cores\n"),
        "{out}"
    );
    // The new file is still checked in full.
    let bad = write(dir.path(), "bad.toml", "[server]\ncores = \"many\"\n");
    let err = failure(&["check-config", "--changes", &old, &bad]);
    assert!(err.contains("server.cores"), "{err}");
}

/// `sluice ARGS` with only SLUICE_CONFIG to find everything (no -c, no token).
fn sluice_env(config: &str, args: &[&str]) -> std::process::Output {
    run_with_timeout(
        Command::new(bin())
            .args(args)
            .env("SLUICE_CONFIG", config)
            .env_remove("SLUICE_API_TOKEN"),
        Duration::from_secs(60),
    )
}

/// `sluice_env` that must succeed and print nothing on stderr; its stdout.
fn quiet_ok(config: &str, args: &[&str]) -> String {
    let out = sluice_env(config, args);
    assert_ok(&out, &format!("sluice {args:?}"));
    assert!(
        out.stderr.is_empty(),
        "sluice {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `--json` output with the one field that is live by nature removed from
/// every message: `age_seconds` (now − arrival) moves on between two calls.
fn without_live(json: &str) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let strip = |m: &mut serde_json::Value| {
        m.as_object_mut()
            .and_then(|o| o.remove("age_seconds"))
            .expect("age_seconds");
    };
    match v.get_mut("messages") {
        Some(serde_json::Value::Array(ms)) => ms.iter_mut().for_each(strip),
        _ => strip(&mut v),
    }
    v
}

#[test]
fn queue_commands_work_with_the_defaults_online_and_offline() {
    // Delivery goes to a port where nothing listens: the message is deferred.
    let dead = free_port();
    let mut relay = Relay::builder()
        .set("delivery.enabled=true")
        .set(format!(
            "route.default={{type=\"relay\",host=\"127.0.0.1\",port={dead},tls=\"none\"}}"
        ))
        .start();
    // What the relay was started with, as a file the CLI finds by itself.
    let config = write(
        relay.dir.path(),
        "sluice.toml",
        &format!(
            "[spool]\npath = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n",
            relay.spool_path().display(),
            relay.admin_port
        ),
    );
    let token = relay.spool_path().join("admin.token");
    assert!(token.exists(), "sluice run made no API token");

    let mut c = relay.session();
    let id = c.send_mail(
        "a@example.test",
        &["b@example.net"],
        b"Subject: q\r\n\r\nx\r\n",
    );
    c.expect("QUIT", 221);

    // Wait for the failed attempt to be recorded.
    let until = Instant::now() + Duration::from_secs(60);
    let online = loop {
        let out = sluice_env(&config, &["queue", "list"]);
        assert_ok(&out, "sluice queue list (online)");
        let t = text(&out.stdout);
        if t.contains("last error:") {
            assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));
            break t;
        }
        assert!(
            Instant::now() < until,
            "no deferral listed:\n{t}\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(online.contains(&format!("{id} deferred")), "{online}");
    let reason = online
        .lines()
        .find_map(|l| l.trim().strip_prefix("last error: "))
        .expect("a last error line");
    assert!(reason.starts_with("4"), "a temporary failure: {reason}");
    assert!(
        reason.contains(&dead.to_string()),
        "names the host: {reason}"
    );

    let out = sluice_env(&config, &["queue", "summary"]);
    assert_ok(&out, "sluice queue summary");
    assert!(
        text(&out.stdout).starts_with("1 message(s)"),
        "{}",
        text(&out.stdout)
    );
    let out = sluice_env(&config, &["queue", "count"]);
    assert_ok(&out, "sluice queue count");
    assert_eq!(text(&out.stdout), "1\n");

    // While the relay runs, the API (online) and the spool read here
    // (--offline) give the same bytes. The message waits for its retry (2 min
    // ahead), so `next_attempt` is a fixed time; it is live only while a
    // message is due (then it reads the clock). `age_seconds` (JSON) is live.
    let show = quiet_ok(&config, &["queue", "show", &id]);
    assert_eq!(
        quiet_ok(&config, &["queue", "show", &id, "--offline"]),
        show,
        "queue show: online and offline differ"
    );
    assert_eq!(
        quiet_ok(&config, &["queue", "list", "--offline"]),
        online,
        "queue list: online and offline differ"
    );
    for args in [
        vec!["queue", "list", "--json"],
        vec!["queue", "show", &id, "--json"],
    ] {
        let on = quiet_ok(&config, &args);
        let mut off_args = args.clone();
        off_args.push("--offline");
        let off = quiet_ok(&config, &off_args);
        assert_eq!(
            without_live(&on),
            without_live(&off),
            "{args:?}: {on}\n{off}"
        );
    }
    // What `show` prints, as `key: value` lines.
    for (key, want) in [
        ("id", id.as_str()),
        ("status", "deferred"),
        ("sender", "<a@example.test>"),
        ("envid", ""),
        ("smtputf8", "false"),
        ("held", "no"),
        ("attempts", "1"),
        ("delay_notices", "0"),
    ] {
        assert_eq!(show_field(&show, key), want, "{key}: {show}");
    }
    assert!(show_field(&show, "next_attempt").ends_with('Z'), "{show}");
    assert_eq!(show_field(&show, "last_error"), reason, "{show}");
    let rcpt = show_lines(&show, "recipient:");
    assert_eq!(
        rcpt,
        vec![format!(
            "recipient: <b@example.net> [deferred (1 attempts) class=network: {reason}]"
        )],
        "{show}"
    );
    assert!(show.contains("*** HEADERS ***\r\n") || show.contains("*** HEADERS ***\n"));
    assert!(show.contains("Subject: q\r\n"), "{show}");
    assert!(!show.contains("\r\nx\r\n"), "headers only: {show}");
    let with_body = quiet_ok(&config, &["queue", "show", &id, "--body"]);
    let (fields, message) = with_body
        .split_once("*** MESSAGE CONTENTS ***\n")
        .expect("a contents marker");
    assert_eq!(Some(fields), show.split("*** HEADERS ***").next());
    assert!(message.ends_with("Subject: q\r\n\r\nx\r\n"), "{message:?}");
    assert_eq!(
        message.as_bytes(),
        sluice_env(&config, &["queue", "body", &id]).stdout,
        "show --body prints the stored bytes"
    );

    // The old spelling: the same as `queue … --offline`, with a note on stderr.
    for (old, new) in [
        (vec!["spool", "count"], vec!["queue", "count", "--offline"]),
        (
            vec!["spool", "show", &id],
            vec!["queue", "show", &id, "--body", "--offline"],
        ),
        (vec!["spool", "list"], vec!["queue", "list", "--offline"]),
        (vec!["spool", "stats"], vec!["queue", "stats", "--offline"]),
    ] {
        let out = sluice_env(&config, &old);
        assert_ok(&out, &format!("sluice {old:?}"));
        let err = text(&out.stderr);
        assert!(
            err.contains("`sluice spool` is deprecated")
                && err.contains(&format!("sluice queue {}", old[1])),
            "sluice {old:?}: {err}"
        );
        assert_eq!(text(&out.stdout), quiet_ok(&config, &new), "{old:?}");
    }
    let out = sluice_env(&config, &["spool", "list", "--json"]);
    assert_ok(&out, "sluice spool list --json");
    assert_eq!(
        without_live(&text(&out.stdout)),
        without_live(&quiet_ok(
            &config,
            &["queue", "list", "--json", "--offline"]
        ))
    );

    // The relay stops: the same commands read the spool, with the same output.
    assert!(relay.terminate().success());
    let out = sluice_env(&config, &["queue", "list"]);
    assert_ok(&out, "sluice queue list (offline)");
    assert_eq!(text(&out.stdout), online, "offline output differs");
    assert!(
        text(&out.stderr).contains("reading the spool instead"),
        "{}",
        text(&out.stderr)
    );
    let out = sluice_env(&config, &["queue", "show", &id]);
    assert_ok(&out, "sluice queue show (offline)");
    assert_eq!(text(&out.stdout), show, "offline show differs");
    let out = sluice_env(&config, &["queue", "count"]);
    assert_eq!(text(&out.stdout), "1\n");
    // Actions need the running relay.
    let out = sluice_env(&config, &["queue", "retry", &id]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("is the relay running?"),
        "{}",
        text(&out.stderr)
    );
}

/// `sluice run` where io_uring_setup(2) fails with `errno` (a seccomp filter,
/// as a container's default profile or kernel.io_uring_disabled would).
fn run_without_io_uring(errno: i32) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bin());
    cmd.args([
        "run",
        "--set",
        "server.cores=1",
        "--set",
        "admin.listen=\"\"",
    ])
    .arg("--set")
    .arg(format!("spool.path={}", dir.path().join("spool").display()))
    .arg("--set")
    .arg(format!(
        "server.listener.smtp.bind=[\"127.0.0.1:{}\"]",
        free_port()
    ));
    let ret_errno = libc::SECCOMP_RET_ERRNO | (errno as u32 & 0xffff);
    // SAFETY: runs in the forked child before exec: only async-signal-safe
    // prctl calls on a filter that lives on this stack until exec.
    unsafe {
        cmd.pre_exec(move || {
            // Load the syscall number; io_uring_setup -> errno; else allow.
            let filter = [
                libc::sock_filter {
                    code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
                    jt: 0,
                    jf: 0,
                    k: 0,
                },
                libc::sock_filter {
                    code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 1,
                    k: libc::SYS_io_uring_setup as u32,
                },
                libc::sock_filter {
                    code: (libc::BPF_RET | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 0,
                    k: ret_errno,
                },
                libc::sock_filter {
                    code: (libc::BPF_RET | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 0,
                    k: libc::SECCOMP_RET_ALLOW,
                },
            ];
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    run_with_timeout(&mut cmd, Duration::from_secs(30))
}

#[test]
fn without_io_uring_the_start_error_names_it() {
    for errno in [libc::ENOSYS, libc::EPERM] {
        let out = run_without_io_uring(errno);
        assert!(!out.status.success(), "started without io_uring");
        let err = text(&out.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("sluice: io_uring is not available (io_uring_setup: "),
            "{err}"
        );
        assert!(last.contains("Linux 5.8"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
