//! The Ansible role (ansible/roles/sluice) installs a relay that works: the real
//! ansible-playbook installs into a staging prefix (nothing touches the live
//! system: no user, no systemctl, no sysctl --load), the INSTALLED binary runs
//! with the RENDERED config and queues mail from swaks (plain and STARTTLS), a
//! config that `sluice check-config` rejects never replaces the installed one, a
//! second run in --check mode changes nothing, ansible-lint passes (on the
//! sluice role and the cluster engine's sluice_engine role), and the
//! Prometheus scrape job passes promtool (when installed). The cluster
//! variables render a `[cluster]` section `sluice check-config` accepts (the
//! engine itself is not started: no system PostgreSQL from a test).
//!
//! Needs ansible-playbook and ansible-lint (`apt-get install -y ansible
//! ansible-lint`): without them the test fails under CI=true and skips otherwise.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sluice_testkit::{
    assert_ok, bin, free_port, have_tool, require_tools, run_with_timeout, text, ChildGuard,
};

/// One playbook run (about 5 s) or lint run may take this long on a loaded box.
const ANSIBLE_TIMEOUT: Duration = Duration::from_secs(180);

fn ansible_dir() -> PathBuf {
    sluice_testkit::repo_root().join("ansible")
}

fn id(flag: &str) -> String {
    let out = run_with_timeout(Command::new("id").arg(flag), Duration::from_secs(10));
    assert_ok(&out, "id");
    text(&out.stdout).trim().to_string()
}

/// Ansible confined to the test's directory: its own temp dirs, no user or
/// system ansible.cfg, no colour (so the recap parses).
fn ansible_command(program: &str, work: &Path) -> Command {
    let mut cmd = Command::new(program);
    let tmp = work.join("ansible-tmp");
    std::fs::create_dir_all(&tmp).expect("create ansible tmp");
    let cfg = work.join("ansible.cfg");
    std::fs::write(&cfg, "[defaults]\n").expect("write ansible.cfg");
    cmd.current_dir(ansible_dir())
        .env("ANSIBLE_CONFIG", &cfg)
        .env("ANSIBLE_ROLES_PATH", ansible_dir().join("roles"))
        .env("ANSIBLE_LOCAL_TEMP", &tmp)
        .env("ANSIBLE_REMOTE_TEMP", &tmp)
        .env("ANSIBLE_HOME", &tmp)
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_FORCE_COLOR", "0")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
        .env("XDG_CACHE_HOME", work.join("cache"))
        .env("NO_COLOR", "1");
    cmd
}

fn playbook(work: &Path, vars: &[&Path], extra: &[&str]) -> Output {
    let mut cmd = ansible_command("ansible-playbook", work);
    cmd.args(["-i", "localhost,", "-c", "local"])
        .arg(ansible_dir().join("tests").join("test.yml"));
    for v in vars {
        cmd.arg("-e").arg(format!("@{}", v.display()));
    }
    cmd.args(extra);
    run_with_timeout(&mut cmd, ANSIBLE_TIMEOUT)
}

/// The PLAY RECAP counter `name` (ok, changed, failed, ...) for localhost.
fn recap(out: &Output, name: &str) -> u64 {
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .skip_while(|l| !l.starts_with("PLAY RECAP"))
        .find(|l| l.starts_with("localhost"))
        .unwrap_or_else(|| panic!("no PLAY RECAP line for localhost:\n{stdout}"));
    let key = format!("{name}=");
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(&key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in recap line {line:?}"))
}

/// A self-signed certificate and key for the STARTTLS listener.
fn make_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = run_with_timeout(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=relay.test", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        Duration::from_secs(60),
    );
    assert_ok(&out, "openssl req");
    (cert, key)
}

/// Polls until `port` answers with a 220 greeting, failing if the relay exits.
fn wait_greeting(relay: &mut ChildGuard, port: u16, log: &Path) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            relay.is_running(),
            "installed relay exited during startup; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 512];
            if let Ok(n) = s.read(&mut buf) {
                let line = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(line.starts_with("220 relay.test "), "greeting {line:?}");
                let _ = s.write_all(b"QUIT\r\n");
                return;
            }
        }
        assert!(
            Instant::now() < until,
            "installed relay not listening on {port} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn swaks(port: u16, to: &str, tls: bool) -> Output {
    let mut cmd = Command::new("swaks");
    cmd.args(["--server", &format!("127.0.0.1:{port}")])
        .args(["--timeout", "10", "--helo", "swaks.test"])
        .args(["--from", "sender@example.org", "--to", to])
        .args(["--header", "Subject: installed by ansible"]);
    if tls {
        cmd.arg("--tls");
    }
    run_with_timeout(&mut cmd, Duration::from_secs(30))
}

/// `GET path` over plain HTTP/1.0: (status line, body).
fn http_get(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect admin listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("send request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

#[test]
fn role_installs_a_working_relay_and_is_idempotent() {
    require_tools!("ansible-playbook", "ansible-lint");
    let work = tempfile::tempdir().expect("tempdir");
    let work = work.path();
    let prefix = work.join("prefix");
    let (cert, key) = make_cert(work);
    let (smtp_port, submission_port, admin_port) = (free_port(), free_port(), free_port());
    // Builds from before the [admin] section cannot take the keys.
    let example = sluice_testkit::sluice(&["example-config"]);
    let admin = text(&example.stdout).contains("\n[admin]\n");

    let vars = serde_json::json!({
        "sluice_prefix": prefix,
        "sluice_binary_src": bin(),
        // The test's own account owns everything; no user is created.
        "sluice_manage_user": false,
        "sluice_user": id("-un"),
        "sluice_group": id("-gn"),
        "sluice_file_owner": id("-un"),
        "sluice_file_group": id("-gn"),
        // Unit and sysctl drop-in are written under the prefix, never applied.
        "sluice_manage_systemd": true,
        "sluice_manage_sysctl": true,
        "sluice_hostname": "relay.test",
        "sluice_cores": 1,
        "sluice_listeners": [
            {"name": "smtp", "bind": format!("127.0.0.1:{smtp_port}")},
            {"name": "submission", "bind": [format!("127.0.0.1:{submission_port}")],
             "tls": "starttls", "cert_src": cert, "key_src": key,
             "max_message_size": "10MiB"},
        ],
        "sluice_local_domains": ["relay.test"],
        // Never the machine's resolver, and no delivery attempts.
        "sluice_dns_servers": ["127.0.0.1:9"],
        "sluice_dns_options": {"timeout": "1s", "attempts": 1},
        "sluice_delivery_enabled": false,
        "sluice_delivery_options": {"source_ip_rate": ["100/s"], "max_connections_per_host": 8},
        "sluice_queues": {"bulk": {"retry": ["1m", "10m"], "message_rate": ["50/s"]}},
        "sluice_destinations": {"default": {"max_connections": 8},
                                "example.com": {"max_connections": 2, "message_rate": ["5/s"]}},
        "sluice_hosts": {"mx.example.com": {"max_connections": 2}},
        "sluice_source_ips": {"default": {"message_rate": ["100/s"]}},
        "sluice_rules": [{"match": {"recipient_domain": ["example.com"], "listener": "submission"},
                          "queue": "bulk"}],
        "sluice_log_format": "text",
        "sluice_admin_enabled": admin,
        "sluice_admin_listen": format!("127.0.0.1:{admin_port}"),
    });
    let vars_file = work.join("vars.json");
    std::fs::write(&vars_file, vars.to_string()).expect("write vars");

    // 1. Install.
    let out = playbook(work, &[&vars_file], &[]);
    assert_ok(&out, "ansible-playbook (install)");
    assert_eq!(recap(&out, "failed"), 0);
    assert!(
        recap(&out, "changed") > 0,
        "a fresh install changes something"
    );

    let bin = prefix.join("usr/local/bin/sluice");
    let config = prefix.join("etc/sluice/sluice.toml");
    let spool = prefix.join("var/lib/sluice");
    let rendered = std::fs::read_to_string(&config).expect("rendered sluice.toml");
    assert!(
        rendered.contains("servers = [\"127.0.0.1:9\"]"),
        "{rendered}"
    );
    assert!(
        rendered.contains(&format!("path = \"{}\"", spool.display())),
        "{rendered}"
    );
    let unit = std::fs::read_to_string(prefix.join("etc/systemd/system/sluice.service"))
        .expect("unit under the prefix");
    for line in [
        format!(
            "ExecStart={} run --config {}",
            bin.display(),
            config.display()
        ),
        "ExecReload=/bin/kill -HUP $MAINPID".to_string(),
        format!("ReadWritePaths={}", spool.display()),
        "LimitMEMLOCK=infinity".to_string(),
        "AmbientCapabilities=CAP_NET_BIND_SERVICE".to_string(),
        "ProtectSystem=strict".to_string(),
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "unit lacks {line:?}:\n{unit}"
        );
    }
    let sysctl = std::fs::read_to_string(prefix.join("etc/sysctl.d/60-sluice.conf"))
        .expect("sysctl drop-in under the prefix");
    assert!(
        sysctl.contains("net.ipv4.ip_local_port_range = 1024 65535"),
        "{sysctl}"
    );

    // 2. The installed binary with the rendered config queues mail.
    let log = work.join("relay.log");
    let mut relay = ChildGuard::new(
        Command::new(&bin)
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("relay log"))
            .spawn()
            .expect("start installed sluice"),
        "installed sluice",
    );
    wait_greeting(&mut relay, smtp_port, &log);
    let plain = swaks(smtp_port, "user@relay.test", false);
    assert_ok(&plain, "swaks (smtp listener)");
    let tls = swaks(submission_port, "user@example.com", true);
    assert_ok(&tls, "swaks --tls (submission listener)");
    assert!(
        text(&tls.stdout).contains("TLS started"),
        "{}",
        text(&tls.stdout)
    );
    let count = run_with_timeout(
        Command::new(&bin)
            .args(["queue", "count", "--offline", "-c"])
            .arg(&config),
        Duration::from_secs(30),
    );
    assert_ok(&count, "sluice queue count --offline");
    assert_eq!(text(&count.stdout).trim(), "2", "both messages are spooled");
    if admin {
        let (status, body) = http_get(admin_port, "/metrics");
        assert!(status.contains(" 200"), "GET /metrics: {status}");
        assert!(body.contains("sluice"), "metrics body:\n{body}");
    }
    relay.signal(libc::SIGTERM);
    let status = relay
        .wait_timeout(Duration::from_secs(30))
        .expect("installed relay stops on SIGTERM");
    assert!(status.success(), "relay exit {status}");

    // 3. A config check-config rejects fails the play and is not installed.
    let bad_file = work.join("bad.json");
    let mut bad = vars.clone();
    bad["sluice_listeners"][0]["max_line_length"] = serde_json::json!(100);
    std::fs::write(&bad_file, bad.to_string()).expect("write bad vars");
    let out = playbook(work, &[&bad_file], &[]);
    assert!(
        !out.status.success(),
        "a config check-config rejects must fail the play"
    );
    assert!(
        text(&out.stdout).contains("max_line_length"),
        "the failure names the key:\n{}",
        text(&out.stdout)
    );
    assert_eq!(
        std::fs::read_to_string(&config).expect("config still there"),
        rendered,
        "the rejected config replaced the installed one"
    );

    // 4. Idempotence: a second run would change nothing.
    let out = playbook(work, &[&vars_file], &["--check", "--diff"]);
    assert_ok(&out, "ansible-playbook --check --diff");
    assert_eq!(
        recap(&out, "changed"),
        0,
        "second run changes something:\n{}",
        text(&out.stdout)
    );

    // 5. A changed sluice.toml restarts when a key only read at start changed,
    // and reloads when only reloadable keys did (with the default action). The
    // handlers themselves skip under a prefix; the play shows which ran.
    let restart_file = work.join("restart.json");
    let mut restart_vars = vars.clone();
    restart_vars["sluice_cores"] = serde_json::json!(2);
    std::fs::write(&restart_file, restart_vars.to_string()).expect("write vars");
    let out = playbook(work, &[&restart_file], &[]);
    assert_ok(&out, "ansible-playbook (server.cores changed)");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("sluice.toml changed, restart: need a restart: server.cores"),
        "{stdout}"
    );
    assert!(
        stdout.contains("RUNNING HANDLER [sluice : Restart sluice]"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("RUNNING HANDLER [sluice : Reload sluice]"),
        "{stdout}"
    );

    let reload_file = work.join("reload.json");
    let mut reload_vars = restart_vars.clone();
    reload_vars["sluice_local_domains"] = serde_json::json!(["relay.test", "other.test"]);
    std::fs::write(&reload_file, reload_vars.to_string()).expect("write vars");
    let out = playbook(work, &[&reload_file], &[]);
    assert_ok(&out, "ansible-playbook (relay.local_domains changed)");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("sluice.toml changed, reload: reloadable: relay"),
        "{stdout}"
    );
    assert!(
        stdout.contains("RUNNING HANDLER [sluice : Reload sluice]"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("RUNNING HANDLER [sluice : Restart sluice]"),
        "{stdout}"
    );
    // No backups pile up beside the live file and its candidate.
    let leftovers: Vec<String> = std::fs::read_dir(prefix.join("etc/sluice"))
        .expect("config dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sluice.toml") && n != "sluice.toml" && n != "sluice.toml.new")
        .collect();
    assert!(leftovers.is_empty(), "backups left behind: {leftovers:?}");

    // 6. Lint (offline: .ansible-lint sets it; no galaxy, no schema downloads).
    let mut lint = ansible_command("ansible-lint", work);
    lint.args([
        "-c",
        ".ansible-lint",
        "roles/sluice",
        "roles/sluice_engine",
        "site.yml",
        "tests/test.yml",
    ]);
    let out = run_with_timeout(&mut lint, ANSIBLE_TIMEOUT);
    assert_ok(&out, "ansible-lint");

    // 7. The shipped scrape job is a valid Prometheus config (when promtool is
    // installed; the metrics tests scrape a live relay).
    if have_tool("promtool") {
        let out = run_with_timeout(
            Command::new("promtool")
                .args(["check", "config"])
                .arg(ansible_dir().join("prometheus").join("sluice-scrape.yml")),
            Duration::from_secs(60),
        );
        assert_ok(&out, "promtool check config");
    }
}

#[test]
fn role_renders_a_cluster_section() {
    require_tools!("ansible-playbook");
    let work = tempfile::tempdir().expect("tempdir");
    let work = work.path();
    let prefix = work.join("prefix");
    let vars = serde_json::json!({
        "sluice_prefix": prefix,
        "sluice_binary_src": bin(),
        "sluice_manage_user": false,
        "sluice_user": id("-un"),
        "sluice_group": id("-gn"),
        "sluice_file_owner": id("-un"),
        "sluice_file_group": id("-gn"),
        "sluice_manage_systemd": false,
        "sluice_manage_sysctl": false,
        "sluice_hostname": "relay.test",
        "sluice_cores": 1,
        "sluice_listeners": [{"name": "smtp", "bind": format!("127.0.0.1:{}", free_port())}],
        "sluice_dns_servers": ["127.0.0.1:9"],
        "sluice_delivery_enabled": false,
        "sluice_admin_enabled": false,
        "sluice_cluster_enabled": true,
        "sluice_cluster_engine": [
            "host=pg1.example.net port=5432 user=sluice dbname=sluice password=s3cret",
            "host=pg2.example.net port=5432 user=sluice dbname=sluice password=s3cret"
        ],
        "sluice_cluster_options": {"lease": "20s", "engine_down": "accept-local"},
    });
    let vars_file = work.join("vars.json");
    std::fs::write(&vars_file, vars.to_string()).expect("write vars");
    let out = playbook(work, &[&vars_file], &[]);
    assert_ok(&out, "ansible-playbook (cluster mode)");
    let config = prefix.join("etc/sluice/sluice.toml");
    let rendered = std::fs::read_to_string(&config).expect("rendered sluice.toml");
    // node_id defaults to the inventory name (localhost here).
    for line in [
        "[cluster]",
        "enabled = true",
        "node_id = \"localhost\"",
        "engine = [\"host=pg1.example.net port=5432 user=sluice dbname=sluice password=s3cret\", \"host=pg2.example.net port=5432 user=sluice dbname=sluice password=s3cret\"]",
        "engine_down = \"accept-local\"",
        "lease = \"20s\"",
    ] {
        assert!(
            rendered.lines().any(|l| l == line),
            "no {line:?} in:\n{rendered}"
        );
    }
    // The installed binary takes it (the play's validate ran it too).
    let check = run_with_timeout(
        Command::new(prefix.join("usr/local/bin/sluice"))
            .arg("check-config")
            .arg(&config),
        Duration::from_secs(30),
    );
    assert_ok(&check, "sluice check-config on the rendered [cluster]");

    // A bad cluster variable fails the play, naming the key.
    let mut bad = vars.clone();
    bad["sluice_cluster_options"]["engine_down"] = serde_json::json!("maybe");
    let bad_file = work.join("bad.json");
    std::fs::write(&bad_file, bad.to_string()).expect("write bad vars");
    let out = playbook(work, &[&bad_file], &[]);
    assert!(
        !out.status.success(),
        "engine_down = \"maybe\" was accepted"
    );
    assert!(
        text(&out.stdout).contains("cluster.engine_down"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        std::fs::read_to_string(&config).expect("config still there"),
        rendered
    );
}
