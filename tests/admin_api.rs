//! The management API and the `sluice queue` / `sluice destination` CLI on a
//! real queue: the real relay delivers over configured routes to the loadgen
//! sink (a "good" route) or to a closed port (the "dead" route, which defers);
//! every action is checked through the spool (`sluice queue list --json --offline`) and
//! what arrives at the sink, through both raw HTTP requests and the CLI.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value;
use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);
const TOKEN: &str = "test-token-0123456789abcdef";

fn body(tag: &str) -> Vec<u8> {
    format!("Subject: {tag}\r\nMessage-ID: <{tag}@snd.test>\r\n\r\n{tag} body\r\n").into_bytes()
}

/// A port on `ip` with nothing listening (bound, then let go).
fn closed_port(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A temporary directory holding the API token file.
fn token_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("api.token");
    std::fs::write(&path, format!("{TOKEN}\n")).expect("token file");
    (dir, path)
}

/// A relay delivering "dead.test" to `dead` (nothing listens there at first)
/// and everything else (DSNs included) to `good`; retries only after an hour,
/// so whatever is attempted sooner was asked for.
fn relay(cores: usize, good: SocketAddr, dead: SocketAddr, dir: tempfile::TempDir) -> Relay {
    let token = dir.path().join("api.token");
    Relay::builder()
        .dir(dir)
        .cores(cores)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set("delivery.connect_timeout=\"5s\"")
        .set("queue.default.retry=[\"1h\"]")
        .set(format!(
            "route.default={{type=\"relay\",host=\"{}\",port={},tls=\"none\"}}",
            good.ip(),
            good.port()
        ))
        .set(format!(
            "route.dead={{type=\"relay\",host=\"{}\",port={},tls=\"none\"}}",
            dead.ip(),
            dead.port()
        ))
        .set("rule=[{match={recipient_domain=[\"dead.test\"]},route=\"dead\"}]")
        .set(format!("admin.token_file=\"{}\"", token.display()))
        .start()
}

/// One raw HTTP/1.1 request to the relay's API; (status, JSON body).
fn http(relay: &Relay, method: &str, target: &str, token: Option<&str>) -> (u16, Value) {
    let mut s = TcpStream::connect(("127.0.0.1", relay.admin_port)).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("read the answer");
    let resp = text(&resp);
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP answer");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line in {head:?}"));
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{target}: {e}: {body:?}"));
    (status, json)
}

/// An authorized API call that must answer 200.
fn api(relay: &Relay, method: &str, target: &str) -> Value {
    let (status, v) = http(relay, method, target, Some(TOKEN));
    assert_eq!(status, 200, "{method} {target}: {v}\n{}", relay.log());
    v
}

/// `sluice ARGS --api … --token-file …`: (exit ok, stdout, stderr).
fn cli(relay: &Relay, token_file: &Path, args: &[&str]) -> (bool, String, String) {
    let api = format!("http://127.0.0.1:{}", relay.admin_port);
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--api", &api, "--token-file"]);
    let tf = token_file.display().to_string();
    all.push(&tf);
    let out = sluice(&all);
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// A CLI call with --json that must succeed; its parsed output.
fn cli_json(relay: &Relay, token_file: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, out, err) = cli(relay, token_file, &all);
    assert!(ok, "sluice {args:?} failed: {err}\n{}", relay.log());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("sluice {args:?}: {e}: {out:?}"))
}

/// The message `id` as `queue list --json --offline` gives it, if still queued.
fn spooled(relay: &Relay, id: &str) -> Option<Value> {
    relay.messages().into_iter().find(|v| v["id"] == id)
}

fn wait_gone(relay: &Relay, id: &str) {
    wait_until(
        &format!("{id} to leave the spool"),
        T,
        || spooled(relay, id).is_none(),
        || relay.log(),
    );
}

/// Waits until the message's recipients have been deferred `n` times.
fn wait_deferred(relay: &Relay, id: &str, n: u64) {
    wait_until(
        &format!("{id} deferred {n} time(s)"),
        T,
        || {
            spooled(relay, id).is_some_and(|v| {
                v["attempts"].as_u64().unwrap_or(0) >= n
                    && v["recipients"][0]["status"] == "deferred"
            })
        },
        || relay.log(),
    );
}

/// Saved messages at the sink addressed to `rcpt`.
fn arrived(sink: &LoadgenSink, rcpt: &str) -> Vec<Saved> {
    sink.saved()
        .into_iter()
        .filter(|s| s.rcpts().iter().any(|r| r == rcpt))
        .collect()
}

fn wait_arrived(sink: &LoadgenSink, rcpt: &str, relay: &Relay) -> Saved {
    let mut got = Vec::new();
    wait_until(
        &format!("a message to {rcpt} at the sink"),
        T,
        || {
            got = arrived(sink, rcpt);
            !got.is_empty()
        },
        || relay.log(),
    );
    got.remove(0)
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().or(x["id"].as_str()).unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn api_and_cli_drive_a_real_queue() {
    let ip = loopback();
    let good = SocketAddr::new(ip.into(), closed_port(ip));
    let sink = LoadgenSink::start(&[good], &[]);
    let dead_ip = loopback();
    let dead = SocketAddr::new(dead_ip.into(), closed_port(dead_ip));
    let (dir, token_file) = token_dir();
    let relay = relay(2, good, dead, dir);

    // --- authentication --------------------------------------------------------
    let (status, v) = http(&relay, "GET", "/api/v1/queue/summary", None);
    assert_eq!(status, 401, "{v}");
    let (status, v) = http(
        &relay,
        "GET",
        "/api/v1/queue/summary",
        Some("wrong-token-wrong-token"),
    );
    assert_eq!(status, 401, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("token")),
        "{v}"
    );
    let (status, _) = http(
        &relay,
        "POST",
        "/api/v1/queue/messages/0000000000000001/hold",
        None,
    );
    assert_eq!(status, 401);
    let (ok, _, err) = cli(&relay, Path::new("/dev/null"), &["queue", "summary"]);
    assert!(!ok && err.contains("401"), "CLI with an empty token: {err}");
    // Errors name the problem.
    let (status, v) = http(&relay, "GET", "/api/v1/queue/messages/nothex", Some(TOKEN));
    assert_eq!(status, 400, "{v}");
    let (status, _) = http(
        &relay,
        "GET",
        "/api/v1/queue/messages/00000000000000ff",
        Some(TOKEN),
    );
    assert_eq!(status, 404);
    let (status, _) = http(&relay, "DELETE", "/api/v1/queue/summary", Some(TOKEN));
    assert_eq!(status, 405);
    let (status, v) = http(&relay, "POST", "/api/v1/queue/hold", Some(TOKEN));
    assert_eq!(status, 400, "a filtered action without a filter: {v}");

    // --- suspend, hold, resume, release ------------------------------------------
    let v = api(
        &relay,
        "POST",
        "/api/v1/destinations/good.test/suspend?for=1h",
    );
    assert_eq!(v["destination"], "good.test");
    let v = api(&relay, "GET", "/api/v1/destinations");
    assert_eq!(v["suspended"][0]["destination"], "good.test", "{v}");
    let m1 = submit(&relay, "a@snd.test", "", &["u1@good.test"], &body("m1"));
    let v = api(&relay, "GET", "/api/v1/queue/messages?domain=good.test");
    assert_eq!(ids(&v["messages"]), vec![m1.clone()], "{v}");
    assert_eq!(v["total"], 1);
    let v = api(&relay, "POST", &format!("/api/v1/queue/messages/{m1}/hold"));
    assert_eq!(v["done"], true, "{v}");
    assert_eq!(spooled(&relay, &m1).expect("m1 queued")["held"], true);
    let v = cli_json(&relay, &token_file, &["destination", "resume", "good.test"]);
    assert_eq!(v["resumed"], true, "{v}");
    // A message sent after the resume arrives; the held one, older, does not.
    submit(&relay, "a@snd.test", "", &["u2@good.test"], &body("m2"));
    wait_arrived(&sink, "u2@good.test", &relay);
    assert!(
        arrived(&sink, "u1@good.test").is_empty(),
        "a held message was delivered"
    );
    let v = cli_json(&relay, &token_file, &["queue", "show", &m1]);
    assert_eq!(v["status"], "held", "{v}");
    assert!(
        v["headers"]
            .as_str()
            .is_some_and(|h| h.contains("Subject: m1")),
        "{v}"
    );
    assert_eq!(v["recipients"][0]["address"], "u1@good.test");
    let (status, v) = http(
        &relay,
        "POST",
        &format!("/api/v1/queue/messages/{m1}/retry"),
        Some(TOKEN),
    );
    assert_eq!(status, 409, "retry of a held message: {v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("held")),
        "{v}"
    );
    let (ok, out, err) = cli(&relay, &token_file, &["queue", "release", &m1]);
    assert!(ok, "{err}");
    assert!(out.contains(&m1), "{out}");
    wait_arrived(&sink, "u1@good.test", &relay);
    wait_gone(&relay, &m1);

    // --- retry now ----------------------------------------------------------------
    let m3 = submit(&relay, "a@snd.test", "", &["x@dead.test"], &body("m3"));
    wait_deferred(&relay, &m3, 1);
    let v = api(&relay, "GET", &format!("/api/v1/queue/messages/{m3}"));
    assert_eq!(v["status"], "deferred", "{v}");
    assert!(v["last_error"].as_str().is_some(), "{v}");
    assert!(v["next_attempt"].as_str().is_some(), "{v}");
    // The next hop comes up; without a retry the message would wait an hour.
    let mut dead_sink = LoadgenSink::start(&[dead], &[]);
    let v = cli_json(
        &relay,
        &token_file,
        &["queue", "retry", "--domain", "dead.test"],
    );
    assert_eq!(ids(&v["done"]), vec![m3.clone()], "{v}");
    wait_arrived(&dead_sink, "x@dead.test", &relay);
    wait_gone(&relay, &m3);
    dead_sink.kill();

    // --- list with pages, cancel (bounce and drop) -------------------------------------
    let m4 = submit(
        &relay,
        "bouncer@snd.test",
        "",
        &["y@dead.test"],
        &body("m4"),
    );
    let m5 = submit(
        &relay,
        "dropper@snd.test",
        "",
        &["z@dead.test"],
        &body("m5"),
    );
    wait_deferred(&relay, &m4, 1);
    wait_deferred(&relay, &m5, 1);
    let mut seen = Vec::new();
    let mut cursor = String::new();
    for _ in 0..3 {
        let v = api(
            &relay,
            "GET",
            &format!("/api/v1/queue/messages?status=deferred&limit=1&cursor={cursor}"),
        );
        assert_eq!(v["total"], 2, "{v}");
        seen.extend(
            v["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string()),
        );
        match v["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    let mut want = vec![m4.clone(), m5.clone()];
    want.sort();
    assert_eq!(seen, want, "two pages of one, in id order");
    let (ok, table, _) = cli(
        &relay,
        &token_file,
        &["queue", "list", "--sender", "bouncer"],
    );
    assert!(ok && table.contains(&m4) && !table.contains(&m5), "{table}");

    let v = api(
        &relay,
        "POST",
        &format!("/api/v1/queue/messages/{m4}/cancel?mode=bounce"),
    );
    assert_eq!(v["action"], "bounce", "{v}");
    wait_gone(&relay, &m4);
    let dsn = wait_arrived(&sink, "bouncer@snd.test", &relay);
    assert_eq!(dsn.from(), "", "a DSN has the null sender");
    assert_failure_dsn(&dsn.eml, &["y@dead.test"], "5.0.0");

    let v = cli_json(&relay, &token_file, &["queue", "cancel", &m5, "--drop"]);
    assert_eq!(v["action"], "drop", "{v}");
    assert!(spooled(&relay, &m5).is_none(), "dropped, so gone at once");
    // Nothing about the dropped message ever arrives: a later message does.
    submit(
        &relay,
        "a@snd.test",
        "",
        &["marker@good.test"],
        &body("marker"),
    );
    wait_arrived(&sink, "marker@good.test", &relay);
    assert!(
        arrived(&sink, "dropper@snd.test").is_empty(),
        "a DSN for a dropped message"
    );
    assert!(arrived(&sink, "z@dead.test").is_empty());

    // --- hold and release by filter ---------------------------------------------------
    let m7 = submit(&relay, "a@snd.test", "", &["w@dead.test"], &body("m7"));
    wait_deferred(&relay, &m7, 1);
    let v = api(&relay, "POST", "/api/v1/queue/hold?domain=dead.test");
    assert_eq!(ids(&v["done"]), vec![m7.clone()], "{v}");
    let v = cli_json(&relay, &token_file, &["queue", "list", "--status", "held"]);
    assert_eq!(v["total"], 1, "{v}");
    assert_eq!(v["messages"][0]["id"], m7.as_str());
    assert_eq!(spooled(&relay, &m7).expect("m7")["held"], true);
    let v = api(&relay, "GET", "/api/v1/queue/summary");
    assert_eq!(v["total"]["held"], 1, "{v}");
    assert!(
        v["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["destination"] == "dead.test" && d["held"] == 1),
        "{v}"
    );
    let v = cli_json(
        &relay,
        &token_file,
        &["queue", "release", "--domain", "dead.test"],
    );
    assert_eq!(ids(&v["done"]), vec![m7.clone()], "{v}");
    // Released means due now: a second attempt (the port is closed again).
    wait_deferred(&relay, &m7, 2);
    assert_eq!(spooled(&relay, &m7).expect("m7")["held"], false);
    let (ok, summary, _) = cli(&relay, &token_file, &["queue", "summary"]);
    assert!(ok && summary.contains("dead.test"), "{summary}");

    // --- a suspension runs out by itself ----------------------------------------------
    let v = api(
        &relay,
        "POST",
        "/api/v1/destinations/expiring.test/suspend?for=2s",
    );
    let until = v["until_unix_ms"].as_u64().expect("until_unix_ms");
    let m8 = submit(&relay, "a@snd.test", "", &["e@expiring.test"], &body("m8"));
    let saved = wait_arrived(&sink, "e@expiring.test", &relay);
    let saved_at = std::fs::metadata(sink.save_dir.join(format!("{}.json", saved.name)))
        .and_then(|m| m.modified())
        .expect("saved file time");
    let saved_ms = saved_at.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    // File times come from the kernel's coarse clock, up to a tick (≤ 10 ms)
    // behind; a delivery that ignored the suspension would be ~2 s early.
    assert!(
        saved_ms + 10 >= until,
        "delivered {} ms before the suspension ended",
        until - saved_ms
    );
    wait_gone(&relay, &m8);
}

#[test]
fn hold_and_suspension_survive_a_restart() {
    let ip = loopback();
    let good = SocketAddr::new(ip.into(), closed_port(ip));
    let sink = LoadgenSink::start(&[good], &[]);
    let dead_ip = loopback();
    let dead = SocketAddr::new(dead_ip.into(), closed_port(dead_ip));
    let (dir, token_file) = token_dir();
    let mut relay = relay(1, good, dead, dir);

    // Suspended first, so nothing is attempted before the hold.
    cli_json(
        &relay,
        &token_file,
        &["destination", "suspend", "good.test", "--for", "1h"],
    );
    let m1 = submit(&relay, "a@snd.test", "", &["held@good.test"], &body("held"));
    let v = cli_json(&relay, &token_file, &["queue", "hold", &m1]);
    assert_eq!(v["done"], true, "{v}");

    let status = relay.terminate();
    assert!(status.success(), "{status:?}");
    relay.restart();

    // Both the suspension (stored with the shaping actions) and the hold
    // outlive the restart.
    let v = api(&relay, "GET", "/api/v1/destinations");
    assert_eq!(v["suspended"][0]["destination"], "good.test", "{v}");
    let v = api(&relay, "GET", "/api/v1/shaping/actions");
    assert_eq!(v["actions"][0]["rule"], "operator", "{v}");
    assert_eq!(v["actions"][0]["destination"], "good.test", "{v}");
    assert_eq!(spooled(&relay, &m1).expect("m1 queued")["held"], true);
    let v = cli_json(&relay, &token_file, &["destination", "resume", "good.test"]);
    assert_eq!(v["resumed"], true, "{v}");
    let v = api(&relay, "GET", "/api/v1/shaping/actions");
    assert_eq!(v["actions"].as_array().map(Vec::len), Some(0), "{v}");
    submit(
        &relay,
        "a@snd.test",
        "",
        &["later@good.test"],
        &body("later"),
    );
    wait_arrived(&sink, "later@good.test", &relay);
    assert!(
        arrived(&sink, "held@good.test").is_empty(),
        "held message delivered after a restart"
    );
    let v = api(&relay, "GET", &format!("/api/v1/queue/messages/{m1}"));
    assert_eq!(v["status"], "held", "{v}");

    let v = api(
        &relay,
        "POST",
        &format!("/api/v1/queue/messages/{m1}/release"),
    );
    assert_eq!(v["done"], true, "{v}");
    wait_arrived(&sink, "held@good.test", &relay);
    wait_gone(&relay, &m1);
}

#[test]
fn queue_actions_need_delivery() {
    let (dir, token_file) = token_dir();
    let relay = Relay::builder()
        .dir(dir)
        .set(format!("admin.token_file=\"{}\"", token_file.display()))
        .start();
    let id = submit(&relay, "a@snd.test", "", &["b@good.test"], &body("idle"));
    // Reads work without delivery.
    let v = api(&relay, "GET", "/api/v1/queue/messages");
    assert_eq!(v["total"], 1, "{v}");
    let v = cli_json(&relay, &token_file, &["queue", "summary"]);
    assert_eq!(v["total"]["messages"], 1, "{v}");
    // Changes need the delivery cores.
    let (status, v) = http(
        &relay,
        "POST",
        &format!("/api/v1/queue/messages/{id}/hold"),
        Some(TOKEN),
    );
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("delivery is disabled")),
        "{v}"
    );
    let (ok, _, err) = cli(
        &relay,
        &token_file,
        &["destination", "suspend", "good.test", "--for", "1h"],
    );
    assert!(!ok, "suspend without delivery succeeded");
    assert!(
        err.contains("409") && err.contains("delivery is disabled"),
        "{err}"
    );
    // Token from the environment, API address from the config.
    let out = run_with_timeout(
        std::process::Command::new(bin())
            .args(["queue", "list", "--json", "--set"])
            .arg(format!("admin.listen=\"127.0.0.1:{}\"", relay.admin_port))
            .env("SLUICE_API_TOKEN", TOKEN),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["messages"][0]["id"], id.as_str(), "{v}");
    assert_eq!(spooled(&relay, &id).expect("still queued")["held"], false);
}
