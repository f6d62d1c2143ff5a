//! Response-driven shaping end to end: the real relay delivers through a real
//! NSD to the kit's scripted SMTP servers, which start answering MAIL with a
//! Yahoo-style `421 4.7.0 [TSS04]` deferral (or a `550 5.7.1` block) after
//! some messages went through. `[[shaping.rule]]` rules fire on those replies:
//!
//! * a suspension stops every connection to the site until it expires (the
//!   server's accept times prove it), then the mail goes;
//! * a suspension is listed by the API and the CLI, survives a restart of the
//!   relay, and `sluice shaping cancel` ends it: delivery resumes;
//! * a bounce rule fails the mail queued for the site: failure DSNs reach the
//!   sender's MX, parsed by Python's email package.
//!
//! The time from the throttling reply to the action (and to the suspension
//! reaching each core) is printed from the relay's log timestamps; see
//! BENCHMARKS.md "Shaping reaction time".

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);
const TOKEN: &str = "shaping-token-0123456789abcdef";
const TSS04: &str = "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to \
                     unexpected volume or user complaints";

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn hop(name: &str, addr: SocketAddr) -> ScriptedServer {
    ScriptedServer::builder()
        .name(name)
        .capability("PIPELINING")
        .capability("8BITMIME")
        .start(addr)
}

fn body(tag: &str) -> Vec<u8> {
    format!("Subject: {tag}\r\nMessage-ID: <{tag}@snd.dlv.test>\r\n\r\n{tag}\r\n").into_bytes()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds since midnight of a log record's RFC 3339 timestamp.
fn log_ms(v: &Value) -> f64 {
    let ts = v["timestamp"]
        .as_str()
        .unwrap_or_else(|| panic!("no timestamp: {v}"));
    let time = ts.split('T').nth(1).expect("time part");
    let time = time.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next().and_then(|p| p.parse().ok()).expect("hours");
    let m: f64 = parts.next().and_then(|p| p.parse().ok()).expect("minutes");
    let s: f64 = parts.next().and_then(|p| p.parse().ok()).expect("seconds");
    ((h * 60.0 + m) * 60.0 + s) * 1000.0
}

fn token_file(relay_dir: &tempfile::TempDir) -> PathBuf {
    let path = relay_dir.path().join("api.token");
    std::fs::write(&path, format!("{TOKEN}\n")).expect("token file");
    path
}

/// `sluice ARGS --api … --token-file …`; panics unless it succeeds; stdout.
fn cli(relay: &Relay, token: &std::path::Path, args: &[&str]) -> String {
    let api = format!("http://127.0.0.1:{}", relay.admin_port);
    let tf = token.display().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--api", &api, "--token-file", &tf]);
    let out = sluice(&all);
    assert!(
        out.status.success(),
        "sluice {args:?}: {}\n{}",
        text(&out.stderr),
        relay.log()
    );
    text(&out.stdout)
}

fn actions(relay: &Relay, token: &std::path::Path) -> Vec<Value> {
    let out = cli(relay, token, &["shaping", "list", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["actions"].as_array().cloned().unwrap_or_default()
}

fn taken(relay: &Relay, rule: &str) -> Vec<Value> {
    log_events(relay, "shaping action taken")
        .into_iter()
        .filter(|v| v["rule"] == rule)
        .collect()
}

fn wait_taken(relay: &Relay, rule: &str) -> Value {
    wait_until(
        &format!("shaping rule {rule} to fire"),
        T,
        || !taken(relay, rule).is_empty(),
        || relay.log(),
    );
    taken(relay, rule).remove(0)
}

fn rules() -> String {
    // Inline TOML for --set: two suspension rules (one short, to expire; one
    // long, to be cancelled) and a bounce rule, each scoped to its domain.
    let tss = |name: &str, site: &str, duration: &str| {
        format!(
            "{{name=\"{name}\",site=\"{site}\",code=[421],enhanced=[\"4.7\"],text='\\[TSS04\\]',\
             threshold=\"2/1m\",action=\"suspend\",duration=\"{duration}\"}}"
        )
    };
    format!(
        "shaping.rule=[{},{},{{name=\"blocked\",site=\"block.dlv.test\",code=[550],enhanced=[\"5.7.1\"],\
         threshold=\"1/1m\",action=\"bounce\",duration=\"1h\"}}]",
        tss("tss-expire", "expire.dlv.test", "4s"),
        tss("tss-cancel", "cancel.dlv.test", "1h"),
    )
}

#[test]
fn rules_suspend_expire_persist_cancel_and_bounce() {
    let ips = loopbacks(4);
    let port = mx_port(&ips);
    let nsd = Nsd::start(&format!(
        "expire MX 10 mx1\nmx1 A {}\ncancel MX 10 mx2\nmx2 A {}\nblock MX 10 mx3\nmx3 A {}\n\
         snd MX 10 bounces\nbounces A {}",
        ips[0], ips[1], ips[2], ips[3]
    ));
    let expire_hop = hop("mx1.expire.test", sa(ips[0], port));
    let cancel_hop = hop("mx2.cancel.test", sa(ips[1], port));
    let block_hop = hop("mx3.block.test", sa(ips[2], port));
    let bounces = LoadgenSink::start(&[sa(ips[3], port)], &[]);

    let dir = tempfile::tempdir().expect("tempdir");
    let token = token_file(&dir);
    let mut relay = Relay::builder()
        .dir(dir)
        .cores(2)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set("log.level=\"info,sluice_engine::delivery::shaping=debug\"")
        .set(nsd.servers_set())
        .set("dns.timeout=\"1s\"")
        .set(format!("delivery.mx_port={port}"))
        .set("delivery.connect_timeout=\"5s\"")
        .set("queue.default.retry=[\"1s\"]")
        .set(format!("admin.token_file=\"{}\"", token.display()))
        .set(rules())
        .start();

    // --- a suspension that expires -----------------------------------------------
    // Two messages go through, then the site throttles.
    for i in 0..2 {
        submit(
            &relay,
            "alice@snd.dlv.test",
            "",
            &[&format!("ok{i}@expire.dlv.test")],
            &body(&format!("ok{i}")),
        );
    }
    wait_until(
        "two messages at mx1",
        T,
        || expire_hop.messages().len() == 2,
        || relay.log(),
    );
    expire_hop.set("MAIL", Some(Act::Reply(TSS04.into())));
    for i in 0..2 {
        submit(
            &relay,
            "alice@snd.dlv.test",
            "",
            &[&format!("t{i}@expire.dlv.test")],
            &body(&format!("t{i}")),
        );
    }
    let action = wait_taken(&relay, "tss-expire");
    let seen = Instant::now();
    let until = action["until"].as_str().map(str::to_string);
    let listed = actions(&relay, &token);
    let mine = listed
        .iter()
        .find(|a| a["rule"] == "tss-expire")
        .unwrap_or_else(|| panic!("tss-expire not listed: {listed:?}"));
    assert_eq!(mine["action"], "suspend");
    assert_eq!(mine["destination"], "expire.dlv.test");
    assert!(
        mine["reply"].as_str().is_some_and(|r| r.contains("TSS04")),
        "{mine}"
    );
    let until_ms = mine["until_unix_ms"].as_u64().expect("until_unix_ms");
    let ends = seen + Duration::from_millis(until_ms.saturating_sub(unix_ms()));
    let accepted_before = expire_hop.accepts().len();
    // The site accepts again; the mail waits for the suspension to end.
    expire_hop.set("MAIL", None);
    wait_until(
        "the parked messages at mx1",
        T,
        || expire_hop.messages().len() == 4,
        || relay.log(),
    );
    let accepts = expire_hop.accepts();
    for at in &accepts[accepted_before..] {
        assert!(
            *at + Duration::from_millis(50) >= ends,
            "connection {} ms before the suspension (until {until:?}) ended",
            (ends - *at).as_millis()
        );
    }
    wait_until(
        "the expiry to be logged",
        T,
        || {
            log_events(&relay, "shaping action expired")
                .iter()
                .any(|v| v["rule"] == "tss-expire")
        },
        || relay.log(),
    );

    // Reaction time: from the reply's delivery record to the action, and to
    // the suspension on every core.
    let reply_at = attempts_for_rcpt(&relay, "t")
        .iter()
        .filter(|v| field(v, "reply").contains("TSS04"))
        .map(log_ms)
        .fold(0.0, f64::max);
    let taken_at = log_ms(&action);
    let cores_at = log_events(&relay, "destination suspended")
        .iter()
        .filter(|v| v["destination"] == "expire.dlv.test")
        .map(log_ms)
        .fold(0.0, f64::max);
    assert!(reply_at > 0.0 && cores_at > 0.0, "{}", relay.log());
    eprintln!(
        "shaping reaction: reply → action {:.3} ms, reply → suspended on every core {:.3} ms",
        taken_at - reply_at,
        cores_at - reply_at
    );

    // --- a suspension that survives a restart and is cancelled --------------------
    cancel_hop.set("MAIL", Some(Act::Reply(TSS04.into())));
    let c1 = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["c1@cancel.dlv.test"],
        &body("c1"),
    );
    let c2 = submit(
        &relay,
        "alice@snd.dlv.test",
        "",
        &["c2@cancel.dlv.test"],
        &body("c2"),
    );
    let fired = wait_taken(&relay, "tss-cancel");
    wait_until(
        "the action to be stored",
        T,
        || {
            log_events(&relay, "shaping action stored")
                .iter()
                .any(|v| v["id"] == fired["id"])
        },
        || relay.log(),
    );
    cancel_hop.set("MAIL", None);
    let status = relay.terminate();
    assert!(status.success(), "{status:?}");
    relay.restart();
    let accepted = cancel_hop.accepts().len();
    let listed = actions(&relay, &token);
    let action = listed
        .iter()
        .find(|a| a["rule"] == "tss-cancel")
        .unwrap_or_else(|| panic!("tss-cancel lost in the restart: {listed:?}"))
        .clone();
    let text_list = cli(&relay, &token, &["shaping", "list"]);
    assert!(
        text_list.contains("tss-cancel suspend cancel.dlv.test"),
        "{text_list}"
    );
    let dests = relay.admin_get("/metrics");
    assert!(
        metric_sum(&dests, "sluice_shaping_active_actions") >= 1.0,
        "active gauge after restart"
    );
    // Three retry periods: the messages are due every second, but parked.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        cancel_hop.accepts().len(),
        accepted,
        "connection during a suspension restored from disk"
    );
    assert!(relay.list().iter().any(|e| e.id == c1), "c1 still queued");
    let out = cli(
        &relay,
        &token,
        &["shaping", "cancel", action["id"].as_str().expect("id")],
    );
    assert!(out.contains("cancelled"), "{out}");
    wait_until(
        "c1 and c2 at mx2 after the cancel",
        T,
        || cancel_hop.messages().len() == 2,
        || relay.log(),
    );
    assert!(actions(&relay, &token)
        .iter()
        .all(|a| a["rule"] != "tss-cancel"));
    let _ = c2;

    // --- a block bounces the mail queued for the site ----------------------------------
    block_hop.set("MAIL", Some(Act::Reply("451 4.3.0 try again later".into())));
    let ids: Vec<String> = (0..3)
        .map(|i| {
            submit(
                &relay,
                "alice@snd.dlv.test",
                "",
                &[&format!("b{i}@block.dlv.test")],
                &body(&format!("b{i}")),
            )
        })
        .collect();
    wait_until(
        "three deferred messages for block.dlv.test",
        T,
        || ids.iter().all(|id| !attempts(&relay, id).is_empty()),
        || relay.log(),
    );
    block_hop.set(
        "MAIL",
        Some(Act::Reply(
            "550 5.7.1 [BL21] Connections from 192.0.2.1 blocked by policy".into(),
        )),
    );
    wait_taken(&relay, "blocked");
    wait_until(
        "three failure DSNs",
        T,
        || {
            bounces
                .saved()
                .iter()
                .filter(|s| text(&s.eml).contains("block.dlv.test"))
                .count()
                == 3
        },
        || relay.log(),
    );
    for s in bounces
        .saved()
        .iter()
        .filter(|s| text(&s.eml).contains("block.dlv.test"))
    {
        let v = assert_failure_dsn(&s.eml, &[rcpt_of(&s.eml)], "5.7.1");
        assert!(
            v["recipients"][0]["diagnostic-code"]
                .as_str()
                .is_some_and(|d| d.contains("5.7.1")),
            "{v}"
        );
    }
    // None was delivered; the ones queued behind the block failed by the
    // action, without reaching the site.
    let records: Vec<Value> = ids.iter().flat_map(|id| attempts(&relay, id)).collect();
    assert!(
        records.iter().all(|v| v["status"] != "delivered"),
        "{records:?}"
    );
    assert!(
        records.iter().any(|v| v["status"] == "failed"
            && field(v, "reply").contains("stopped by shaping rule blocked")),
        "{records:?}"
    );
    for id in &ids {
        wait_until(
            &format!("{id} gone"),
            T,
            || !relay.list().iter().any(|e| &e.id == id),
            || relay.log(),
        );
    }

    let metrics = relay.metrics();
    // Counters start at the restart: the bounce rule fired after it.
    let line = "sluice_shaping_actions_total{rule=\"blocked\",action=\"bounce\"} 1";
    assert!(metrics.contains(line), "{line} missing:\n{metrics}");
}

/// "delivery attempt" records whose recipient starts with `prefix`.
fn attempts_for_rcpt(relay: &Relay, prefix: &str) -> Vec<Value> {
    log_events(relay, "delivery attempt")
        .into_iter()
        .filter(|v| {
            v.to_string()
                .contains(&format!("{prefix}0@expire.dlv.test"))
                || v.to_string()
                    .contains(&format!("{prefix}1@expire.dlv.test"))
        })
        .collect()
}

/// The failed recipient named in a DSN (its Final-Recipient).
fn rcpt_of(raw: &[u8]) -> &'static str {
    let t = text(raw);
    for r in [
        "b0@block.dlv.test",
        "b1@block.dlv.test",
        "b2@block.dlv.test",
    ] {
        if t.to_ascii_lowercase().contains(&format!("rfc822; {r}"))
            || t.contains(&format!("rfc822;{r}"))
        {
            return r;
        }
    }
    panic!("no block recipient in the DSN:\n{t}")
}

/// Waits for the relay's record of the message's delivery: the site owner
/// fed the reply to slow start in the same step, before anything else ran.
fn delivered(relay: &Relay, id: &str) {
    wait_until(
        &format!("{id} delivered"),
        T,
        || {
            attempts(relay, id)
                .iter()
                .any(|v| v["status"] == "delivered")
        },
        || relay.log(),
    );
}

/// The site's entry in `GET /api/v1/shaping/sites` (through the CLI).
fn site_limit(relay: &Relay, token: &std::path::Path, site: &str) -> Option<u64> {
    let out = cli(relay, token, &["shaping", "sites", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["sites"]
        .as_array()?
        .iter()
        .find(|s| s["site"] == site)
        .and_then(|s| s["limit"].as_u64())
}

#[test]
fn slow_start_grows_with_successes_and_halves_on_a_deferral() {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let nsd = Nsd::start(&format!("slow MX 10 mx1\nmx1 A {ip}\nsnd MX 10 mx1"));
    let server = hop("mx1.slow.test", sa(ip, port));
    let dir = tempfile::tempdir().expect("tempdir");
    let token = token_file(&dir);
    let relay = Relay::builder()
        .dir(dir)
        .cores(2)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set(nsd.servers_set())
        .set("dns.timeout=\"1s\"")
        .set(format!("delivery.mx_port={port}"))
        .set("delivery.connect_timeout=\"5s\"")
        // The site (and its window) stays while the test looks at it.
        .set("delivery.idle_timeout=\"60s\"")
        .set("queue.default.retry=[\"1h\"]")
        .set("destination.default.max_connections=4")
        .set("shaping.slow_start=true")
        .set("shaping.slow_start_initial=1")
        .set(format!("admin.token_file=\"{}\"", token.display()))
        .start();
    let send = |tag: &str| {
        submit(
            &relay,
            "alice@snd.dlv.test",
            "",
            &[&format!("{tag}@slow.dlv.test")],
            &body(tag),
        )
    };
    let s0 = send("s0");
    delivered(&relay, &s0);
    // One success: 1 → 2 (one more per success until the first deferral).
    assert_eq!(site_limit(&relay, &token, "slow.dlv.test"), Some(2));
    let s1 = send("s1");
    delivered(&relay, &s1);
    let s2 = send("s2");
    delivered(&relay, &s2);
    assert_eq!(site_limit(&relay, &token, "slow.dlv.test"), Some(4));
    let s3 = send("s3");
    delivered(&relay, &s3);
    assert_eq!(
        site_limit(&relay, &token, "slow.dlv.test"),
        Some(4),
        "bounded by destination max_connections"
    );
    // A deferral halves it.
    server.set("MAIL", Some(Act::Reply("451 4.7.0 slow down".into())));
    let id = send("d0");
    wait_until(
        "d0 deferred",
        T,
        || {
            attempts(&relay, &id)
                .iter()
                .any(|v| v["status"] == "deferred")
        },
        || relay.log(),
    );
    assert_eq!(site_limit(&relay, &token, "slow.dlv.test"), Some(2));
    let text_out = cli(&relay, &token, &["shaping", "sites"]);
    assert!(
        text_out.contains("slow.dlv.test limit 2 of 4"),
        "{text_out}"
    );
}
