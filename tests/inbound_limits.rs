//! Inbound limits and auto-bans end to end, on a relay with two cores and a
//! PROXY listener, so one machine plays many client addresses:
//! - `[[limit]]` key = "ip", rate = "5/h": sluice-loadgen sends 10 messages
//!   from each of four addresses (`--proxy-sources`, one connection per
//!   message); exactly 5 per address are stored (counted in the spool by the
//!   address in each Received field) and 5 refused 451 4.7.1 (counted by the
//!   loadgen per address), however the connections fell across the cores.
//! - key = "ip", concurrency = 2: the third connection from one address gets
//!   421 4.7.0 while another address is let in; a closed one frees a slot.
//! - `[ban]`: three failed AUTHs (Python's smtplib) ban the address: the next
//!   connection gets 421 4.7.1; the ban is listed by `sluice ban list`,
//!   survives a restart (LMDB next to the spool) and is lifted by `sluice ban
//!   remove`. Two relay attempts (swaks) ban another address; `sluice ban
//!   add` bans a third.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);
const TOKEN: &str = "inbound-limits-test-token-0123456789";

fn system_python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// `sluice-loadgen send --json` into the relay; returns its summary.
fn loadgen_send(relay: &Relay, args: &[&str]) -> Value {
    let out = run_with_timeout(
        Command::new(loadgen_bin())
            .args(["send", "--json", "--target", &relay.addr_string()])
            .args(args),
        Duration::from_secs(120),
    );
    let stdout = text(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "loadgen send printed {stdout:?} ({e}); stderr {}",
            text(&out.stderr)
        )
    })
}

/// A relay with a PROXY listener trusting loopback, two cores.
fn proxy_relay(sets: &[String]) -> Relay {
    let mut b = Relay::builder()
        .cores(2)
        .lset("proxy_trusted_networks", "[\"127.0.0.0/8\"]")
        .proxy_probe();
    for s in sets {
        b = b.set(s.clone());
    }
    b.start()
}

/// A connection claiming to come from `ip`; returns it with the greeting.
fn connect_as(relay: &Relay, ip: &str) -> (Client, Reply) {
    let mut c = relay.connect();
    c.send(format!("PROXY TCP4 {ip} 127.0.0.1 40000 25\r\n").as_bytes());
    let r = c.read_reply();
    (c, r)
}

#[test]
fn rate_per_ip_is_exact_across_cores() {
    let relay = proxy_relay(&[
        // The loadgen's recipients are relayed for these clients.
        "relay.relay_networks=[\"127.0.0.0/8\", \"192.0.2.0/24\"]".into(),
        "limit=[{name = \"per-ip\", key = \"ip\", rate = \"5/h\"}]".into(),
    ]);
    let sources = ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"];
    let summary = loadgen_send(
        &relay,
        &[
            "--proxy-sources",
            &sources.join(","),
            "--messages",
            "40",
            "--connections",
            "4",
            "--per-connection",
            "1",
            "--cores",
            "1",
        ],
    );
    assert_eq!(summary["accepted"], 20, "{summary:#}");
    assert_eq!(summary["failed"], 0, "{summary:#}");
    assert_eq!(summary["errors_by_code"]["451"], 20, "{summary:#}");
    for ip in sources {
        assert_eq!(
            summary["per_source"][ip]["accepted"], 5,
            "{ip}: {summary:#}"
        );
        assert_eq!(summary["per_source"][ip]["refused"], 5, "{ip}: {summary:#}");
    }
    // The relay's side: 20 messages stored, 5 from each address.
    let entries = relay.list();
    assert_eq!(entries.len(), 20);
    let mut per_ip: BTreeMap<String, usize> = BTreeMap::new();
    for e in &entries {
        let body = text(&relay.body(&e.id));
        let ip = sources
            .iter()
            .find(|ip| {
                body.lines()
                    .next()
                    .is_some_and(|l| l.contains(&format!("[{ip}]")))
            })
            .unwrap_or_else(|| panic!("no known client in {body:?}"));
        *per_ip.entry(ip.to_string()).or_default() += 1;
    }
    assert_eq!(
        per_ip.values().copied().collect::<Vec<_>>(),
        vec![5; 4],
        "{per_ip:?}"
    );
    let m = relay.metrics();
    assert_eq!(
        metric_sum(
            &m,
            "sluice_inbound_limit_refused_total{rule=\"per-ip\",stage=\"mail\"}"
        ),
        20.0,
        "{m}"
    );
    assert!(relay.log().contains("inbound limit reached"));
}

#[test]
fn concurrency_per_ip_holds() {
    let relay = proxy_relay(&["limit=[{key = \"ip\", concurrency = 2}]".into()]);
    let (mut a, r) = connect_as(&relay, "192.0.2.50");
    assert_eq!(r.code, 220, "{r:?}");
    let (_b, r) = connect_as(&relay, "192.0.2.50");
    assert_eq!(r.code, 220, "{r:?}");
    let (mut c, r) = connect_as(&relay, "192.0.2.50");
    assert_eq!((r.code, r.enhanced()), (421, "4.7.0"), "{r:?}");
    c.expect_closed();
    let (_other, r) = connect_as(&relay, "192.0.2.51");
    assert_eq!(r.code, 220, "another address has its own slots: {r:?}");
    // A closed connection gives its slot back (once the relay saw the close).
    a.expect("QUIT", 221);
    drop(a);
    let deadline = Instant::now() + T;
    loop {
        let (_d, r) = connect_as(&relay, "192.0.2.50");
        if r.code == 220 {
            break;
        }
        assert_eq!(r.code, 421, "{r:?}");
        assert!(Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `sluice ARGS --json --api … --token-file …`, which must succeed.
fn cli(relay: &Relay, token: &Path, args: &[&str]) -> Value {
    let api = format!("http://127.0.0.1:{}", relay.admin_port);
    let tf = token.display().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--json", "--api", &api, "--token-file", &tf]);
    let out = sluice(&all);
    assert_ok(&out, &format!("sluice {args:?}"));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

fn banned(list: &Value) -> Vec<String> {
    list["bans"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| b["address"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// smtplib from `ip` (a PROXY v1 line first), one AUTH PLAIN with a wrong
/// password per connection: prints each attempt's code.
fn smtplib_bad_logins(relay: &Relay, ip: &str, attempts: usize) -> String {
    let script = r#"
import smtplib, socket, sys
port, ip, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
class Proxied(smtplib.SMTP):
    def _get_socket(self, host, p, timeout):
        s = socket.create_connection((host, p), timeout)
        s.sendall(("PROXY TCP4 %s 127.0.0.1 40003 25\r\n" % ip).encode())
        return s
for i in range(n):
    s = Proxied("127.0.0.1", port, timeout=30)
    s.ehlo("guesser.test")
    # One mechanism only: login() would try PLAIN then LOGIN (two failures).
    s.user, s.password = "alice", "wrong-%d" % i
    try:
        s.auth("PLAIN", s.auth_plain)
        print("accepted")
    except smtplib.SMTPAuthenticationError as e:
        print("refused", e.smtp_code)
    s.close()
"#;
    let out = run_with_timeout(
        Command::new(system_python()).args([
            "-c",
            script,
            &relay.addr().port().to_string(),
            ip,
            &attempts.to_string(),
        ]),
        T,
    );
    assert_ok(&out, "smtplib");
    text(&out.stdout)
}

#[test]
fn bans_for_auth_failures_and_relay_attempts_persist() {
    require_tools!("swaks");
    let dir = tempfile::tempdir().expect("tempdir");
    let token: PathBuf = dir.path().join("api.token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
    let hash = hash_password("right-password");
    let mut relay = Relay::builder()
        .dir(dir)
        .cores(2)
        .lset("proxy_trusted_networks", "[\"127.0.0.0/8\"]")
        .lset("auth_plaintext", "true")
        .proxy_probe()
        .set(format!("auth.users.alice=\"{hash}\""))
        .set("auth.failure_delay=\"0s\"")
        .set("auth.max_failures=10")
        .set(format!("admin.token_file=\"{}\"", token.display()))
        .set("ban.enabled=true")
        .set("ban.auth_failures=\"3/10m\"")
        .set("ban.relay_attempts=\"2/10m\"")
        .set("ban.duration=\"1h\"")
        .start();
    let token = relay.dir.path().join("api.token");

    // Three failed logins from one address: banned at the third.
    let guesser = "203.0.113.7";
    let out = smtplib_bad_logins(&relay, guesser, 3);
    assert_eq!(
        out.lines().filter(|l| *l == "refused 535").count(),
        3,
        "{out}"
    );
    let (mut c, r) = connect_as(&relay, guesser);
    assert_eq!((r.code, r.enhanced()), (421, "4.7.1"), "{r:?}");
    c.expect_closed();
    let (_c, r) = connect_as(&relay, "203.0.113.8");
    assert_eq!(r.code, 220, "a neighbour is not banned: {r:?}");

    // Two relay attempts (swaks through PROXY) from another address.
    let relayer = "198.51.100.9";
    for _ in 0..2 {
        let out = swaks(
            &relay,
            &[
                "--from",
                "a@outside.example",
                "--to",
                "victim@elsewhere.example",
                "--proxy-version",
                "1",
                "--proxy-family",
                "TCP4",
                "--proxy-source",
                relayer,
                "--proxy-source-port",
                "40001",
                "--proxy-dest",
                "127.0.0.1",
                "--proxy-dest-port",
                "25",
            ],
        );
        let t = text(&out.stdout);
        assert!(t.contains("554 5.7.1"), "{t}");
    }
    let (_c, r) = connect_as(&relay, relayer);
    assert_eq!((r.code, r.enhanced()), (421, "4.7.1"), "{r:?}");

    // The operator's view, and an operator's ban.
    let added = cli(&relay, &token, &["ban", "add", "192.0.2.99", "--for", "2h"]);
    assert_eq!(added["address"], "192.0.2.99");
    let list = cli(&relay, &token, &["ban", "list"]);
    let mut all = banned(&list);
    all.sort();
    assert_eq!(all, vec!["192.0.2.99", relayer, guesser], "{list:#}");
    let m = relay.metrics();
    assert_eq!(
        metric_sum(&m, "sluice_bans_total{offence=\"auth\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "sluice_bans_total{offence=\"relay\"}"),
        1.0,
        "{m}"
    );
    assert!(metric_sum(&m, "sluice_ban_refused_total") >= 2.0, "{m}");

    // A restart keeps them (stored by the bans thread: poll the new process).
    relay.terminate();
    relay.restart();
    let (_c, r) = connect_as(&relay, guesser);
    assert_eq!(
        (r.code, r.enhanced()),
        (421, "4.7.1"),
        "after restart: {r:?}"
    );
    let list = cli(&relay, &token, &["ban", "list"]);
    assert_eq!(banned(&list).len(), 3, "{list:#}");

    // Lifted: the next connection is greeted.
    let removed = cli(&relay, &token, &["ban", "remove", guesser]);
    assert_eq!(removed["removed"], true, "{removed:#}");
    let (_c, r) = connect_as(&relay, guesser);
    assert_eq!(r.code, 220, "{r:?}");
    let again = cli(&relay, &token, &["ban", "remove", guesser]);
    assert_eq!(again["removed"], false, "{again:#}");
}
