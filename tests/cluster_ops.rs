//! Cluster operations (docs/cluster.md "Tests", issue 16 item 4) with real
//! parts on loopback: a PostgreSQL server started by the test, three
//! `sluice` nodes (one core each) delivering by MX (real NSD) into one
//! `sluice-loadgen sink`, `sluice-loadgen send` loading them.
//!
//! * test 6, `engine_restart_under_load_*`: the engine is stopped (fast
//!   shutdown) for longer than a lease while the three nodes take load, then
//!   started again on the same port and data directory. Every token that got
//!   a 250 reaches the sink; the nodes reconnect by themselves (same
//!   processes, same epochs, none declared dead); with `engine_down =
//!   "tempfail"` the gap's mail gets 451 4.3.0, with `"accept-local"` it gets
//!   250 and the unreplicated gauge rises, then drains back to 0.
//! * `leaving_node_hands_over_at_once` (`sluice cluster leave`): a node
//!   holding mail (its MX port is closed: a site that defers) leaves: it stops
//!   (status 0), shows `left`, and the others deliver all of its mail, once
//!   each, long before its 60 s lease would have run out; started again with
//!   the same configuration it rejoins (new epoch, the handed-over mail
//!   dropped from its spool) and takes mail again.
//! * `stop_writes_the_last_removals`: with a long `sync_interval`, a node's
//!   deliveries are still rows in the engine when it gets SIGTERM; the stop
//!   writes their removals, so no taker would send them again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_testkit::postgres::{cluster_node, cluster_stage, ClusterStage, Postgres};
use sluice_testkit::*;

const DOMAIN: &str = "ops.dlv.test";
/// The kit's cluster lease (RelayBuilder::cluster).
const LEASE: Duration = Duration::from_secs(3);

fn node(pg: &Postgres, nsd: &Nsd, port: u16, name: &str, engine_down: &str) -> Relay {
    node_builder(pg, nsd, port, name, engine_down).start()
}

fn node_builder(
    pg: &Postgres,
    nsd: &Nsd,
    port: u16,
    name: &str,
    engine_down: &str,
) -> RelayBuilder {
    cluster_node(pg, nsd, port, name).set(format!("cluster.engine_down=\"{engine_down}\""))
}

/// `loadgen send` to `relay` for `secs` at `rate` msg/s, acks logged to `ack`.
fn timed_load(relay: &Relay, run_id: &str, secs: u64, rate: u64, ack: &Path) -> Command {
    let mut c = Command::new(loadgen_bin());
    c.args(["send", "--json", "--target", &relay.addr_string()])
        .args(["--connections", "2", "--cores", "1"])
        .args([
            "--duration",
            &format!("{secs}s"),
            "--rate",
            &rate.to_string(),
        ])
        .args(["--size", "1024", "--domain", DOMAIN, "--timeout", "30s"])
        .args(["--run-id", run_id])
        .arg("--ack-log")
        .arg(ack);
    c
}

/// One message by hand, tagged with `token` where the sink reads loadgen's
/// (its Message-ID);
/// returns the end-of-data reply.
fn probe(relay: &Relay, token: &str) -> Reply {
    let mut c = relay.session();
    c.expect("MAIL FROM:<probe@client.test>", 250);
    c.expect(&format!("RCPT TO:<probe@{DOMAIN}>"), 250);
    c.expect("DATA", 354);
    c.send(
        format!(
            "Message-ID: <{token}@client.test>\r\nSubject: probe\r\nFrom: <probe@client.test>\r\n\r\nprobe\r\n.\r\n"
        )
        .as_bytes(),
    );
    let r = c.read_reply();
    c.send(b"QUIT\r\n");
    r
}

fn gauge(relay: &Relay, name: &str) -> f64 {
    metric_sum(&relay.metrics(), name)
}

/// `node_id → (epoch, state)` as the engine has them.
fn node_rows(pg: &Postgres) -> BTreeMap<String, (i64, String)> {
    pg.psql("SELECT node_id, epoch, state FROM sluice_node ORDER BY 1")
        .lines()
        .filter_map(|l| {
            let mut f = l.split('|');
            Some((
                f.next()?.to_string(),
                (f.next()?.parse().ok()?, f.next()?.to_string()),
            ))
        })
        .collect()
}

fn engine_restart_under_load(engine_down: &str) {
    let Some(ClusterStage {
        mut pg,
        nsd,
        ip,
        port,
    }) = cluster_stage("ops")
    else {
        return;
    };
    let accept_local = engine_down == "accept-local";
    let sink = LoadgenSink::start(&[SocketAddr::new(ip.into(), port)], &[]);
    let mut nodes: Vec<Relay> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| node(&pg, &nsd, port, n, engine_down))
        .collect();
    let pids: Vec<u32> = nodes.iter().map(Relay::pid).collect();
    let before = node_rows(&pg);
    assert_eq!(before.len(), 3, "{before:?}");
    let dir = tempfile::tempdir().unwrap();
    let acks: Vec<PathBuf> = (1..=3)
        .map(|i| dir.path().join(format!("n{i}.acks")))
        .collect();

    // 16 s of load at 20 msg/s per node; the engine goes away 3 s in, for
    // longer than a lease, and comes back with 6 s or more of load left.
    let load: Vec<std::thread::JoinHandle<Value>> = nodes
        .iter()
        .zip(&acks)
        .enumerate()
        .map(|(i, (n, a))| {
            let mut cmd = timed_load(n, &format!("n{}", i + 1), 16, 20, a);
            std::thread::spawn(move || {
                let out = run_with_timeout(&mut cmd, Duration::from_secs(120));
                serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
            })
        })
        .collect();
    wait_until(
        "load reaching the sink before the engine stops",
        Duration::from_secs(30),
        || sink.messages() >= 30,
        || nodes[0].log(),
    );
    pg.stop();
    let stopped = Instant::now();

    // During the gap: the mode's answer, on every node.
    let mut probes = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let token = format!("lg-gap-n{}", i + 1);
        let r = probe(n, &token);
        if accept_local {
            assert_eq!(r.code, 250, "accept-local, engine down: {r:?}");
            probes.push(token);
        } else {
            assert_eq!(r.code, 451, "tempfail, engine down: {r:?}");
            assert_eq!(r.enhanced(), "4.3.0", "{r:?}");
        }
    }
    if accept_local {
        wait_until(
            "the unreplicated gauge to rise",
            Duration::from_secs(10),
            || {
                nodes
                    .iter()
                    .all(|n| gauge(n, "sluice_cluster_unreplicated_messages") >= 1.0)
            },
            || nodes[0].metrics(),
        );
    }
    wait_until(
        "the nodes to see the engine down",
        Duration::from_secs(10),
        || {
            nodes
                .iter()
                .all(|n| gauge(n, "sluice_cluster_engine_up") == 0.0)
        },
        || nodes[0].log(),
    );
    // The outage outlasts every lease in the engine: a sweeper that judged
    // by lease_until alone would declare all the others dead when it returns.
    while stopped.elapsed() < LEASE + Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(100));
    }
    pg.start_again();
    eprintln!("ops: engine down for {} ms", stopped.elapsed().as_millis());

    let sent: Vec<Value> = load.into_iter().map(|t| t.join().unwrap()).collect();
    eprintln!("ops: load {sent:?}");
    let refused: u64 = sent
        .iter()
        .map(|v| v["errors_by_code"]["451"].as_u64().unwrap_or(0))
        .sum();
    let accepted: u64 = sent
        .iter()
        .map(|v| v["accepted"].as_u64().unwrap_or(0))
        .sum();
    assert!(accepted > 0, "{sent:?}");
    if accept_local {
        assert_eq!(refused, 0, "accept-local refused mail: {sent:?}");
    } else {
        assert!(refused > 0, "no 451 during the gap under load: {sent:?}");
    }

    // The same processes, reconnected, none fenced or declared dead.
    for (n, pid) in nodes.iter_mut().zip(&pids) {
        assert!(n.is_running(), "a node exited:\n{}", n.log());
        assert_eq!(n.pid(), *pid);
    }
    wait_until(
        "every node to reach the engine again",
        Duration::from_secs(30),
        || {
            nodes
                .iter()
                .all(|n| gauge(n, "sluice_cluster_engine_up") == 1.0)
        },
        || nodes[0].log(),
    );
    let after = node_rows(&pg);
    assert_eq!(after, before, "epochs or states changed across the restart");
    if accept_local {
        wait_until(
            "the unreplicated gauge to drain",
            Duration::from_secs(30),
            || {
                nodes
                    .iter()
                    .all(|n| gauge(n, "sluice_cluster_unreplicated_messages") == 0.0)
            },
            || nodes[0].log(),
        );
    }
    // New mail is replicated again before its 250, on every node.
    for (i, n) in nodes.iter().enumerate() {
        let token = format!("lg-after-n{}", i + 1);
        let r = probe(n, &token);
        assert_eq!(r.code, 250, "after the restart: {r:?}\n{}", n.log());
        probes.push(token);
    }

    let mut acked = acked_tokens(&acks);
    acked.extend(probes);
    let mut tokens = BTreeMap::new();
    wait_until(
        "every acknowledged token at the sink",
        Duration::from_secs(90),
        || {
            tokens = sink.tokens();
            acked.iter().all(|t| tokens.contains_key(t))
        },
        || {
            let now = sink.tokens();
            let missing: Vec<&String> = acked.iter().filter(|t| !now.contains_key(*t)).collect();
            format!(
                "{} of {} missing, e.g. {:?}\nn1 log:\n{}",
                missing.len(),
                acked.len(),
                &missing[..missing.len().min(10)],
                nodes[0].log()
            )
        },
    );
    // Everything delivered is gone from the replica log as well.
    wait_until(
        "the replica log to empty",
        Duration::from_secs(30),
        || {
            pg.try_psql("SELECT count(*) FROM sluice_message")
                .is_ok_and(|s| s.trim() == "0")
        },
        || {
            pg.try_psql("SELECT origin_node, count(*) FROM sluice_message GROUP BY 1")
                .unwrap_or_default()
        },
    );
    eprintln!(
        "ops: {} acknowledged, {} refused with 451, all at the sink",
        acked.len(),
        refused
    );
}

#[test]
fn engine_restart_under_load_tempfail() {
    engine_restart_under_load("tempfail");
}

#[test]
fn engine_restart_under_load_accept_local() {
    engine_restart_under_load("accept-local");
}

/// A lease far longer than the hand-over may take.
const LONG_LEASE_SECS: u64 = 60;

fn cli_cluster(pg: &Postgres, node: &str, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(bin());
    c.arg("cluster")
        .args(args)
        .args(["--set", "cluster.enabled=true"])
        .args(["--set", &format!("cluster.node_id=\"{node}\"")])
        .args(["--set", &format!("cluster.engine=[\"{}\"]", pg.dsn())]);
    run_with_timeout(&mut c, Duration::from_secs(90))
}

fn count_of(pg: &Postgres, origin: &str) -> i64 {
    pg.psql(&format!(
        "SELECT count(*) FROM sluice_message WHERE origin_node = '{origin}'"
    ))
    .trim()
    .parse()
    .unwrap_or(-1)
}

#[test]
fn leaving_node_hands_over_at_once() {
    let Some(ClusterStage { pg, nsd, ip, port }) = cluster_stage("ops") else {
        return;
    };
    let sink = LoadgenSink::start(&[SocketAddr::new(ip.into(), port)], &[]);
    // Nothing listens on n2's port: it holds what it accepts.
    let closed = free_port();
    let long = |r: RelayBuilder| r.set(format!("cluster.lease=\"{LONG_LEASE_SECS}s\""));
    let _n1 = long(node_builder(&pg, &nsd, port, "n1", "tempfail")).start();
    let mut n2 = long(node_builder(&pg, &nsd, closed, "n2", "tempfail")).start();
    let _n3 = long(node_builder(&pg, &nsd, port, "n3", "tempfail")).start();
    let dir = tempfile::tempdir().unwrap();
    let ack = dir.path().join("n2.acks");
    let mut send = Command::new(loadgen_bin());
    send.args(["send", "--json", "--target", &n2.addr_string()])
        .args(["--connections", "2", "--cores", "1", "--messages", "40"])
        .args(["--size", "1024", "--domain", DOMAIN, "--run-id", "held"])
        .arg("--ack-log")
        .arg(&ack);
    let out = run_with_timeout(&mut send, Duration::from_secs(60));
    assert_ok(&out, "loadgen send to n2");
    let acked = acked_tokens(std::slice::from_ref(&ack));
    assert_eq!(acked.len(), 40, "{}", text(&out.stdout));
    assert_eq!(count_of(&pg, "n2"), 40, "replicated before each 250");
    assert_eq!(n2.count(), 40, "n2 holds its mail");

    let left_at = Instant::now();
    let out = Command::new(bin())
        .args(["cluster", "leave", "--wait", "60"])
        .args(["--api", &format!("http://127.0.0.1:{}", n2.admin_port)])
        .arg("--token-file")
        .arg(n2.spool_path().join("admin.token"))
        .args(["--set", "cluster.enabled=true"])
        .args(["--set", "cluster.node_id=\"n2\""])
        .args(["--set", &format!("cluster.engine=[\"{}\"]", pg.dsn())])
        .output()
        .unwrap();
    assert_ok(&out, "sluice cluster leave");
    assert!(
        text(&out.stdout).contains("n2 left the cluster"),
        "{}",
        text(&out.stdout)
    );
    let status = n2.terminate_wait();
    assert_eq!(status.code(), Some(0), "n2 after leaving:\n{}", n2.log());
    assert!(n2.log().contains("cluster: left"), "{}", n2.log());

    // Taken over at the next sweep (1 s), not after the 60 s lease.
    let mut tokens = BTreeMap::new();
    wait_until(
        "n2's mail at the sink, from the others",
        Duration::from_secs(LONG_LEASE_SECS / 2),
        || {
            tokens = sink.tokens();
            acked.iter().all(|t| tokens.contains_key(t))
        },
        || {
            pg.try_psql("SELECT node_id, epoch, state FROM sluice_node")
                .unwrap_or_default()
        },
    );
    eprintln!(
        "ops: leave to the last of n2's mail at the sink: {} ms",
        left_at.elapsed().as_millis()
    );
    // n2 never reached the site: every copy came from a taker, once.
    for t in &acked {
        assert_eq!(
            tokens.get(t),
            Some(&1),
            "{t} delivered {:?} times",
            tokens.get(t)
        );
    }
    let st = cli_cluster(&pg, "cli", &["status", "--json"]);
    assert_ok(&st, "sluice cluster status");
    let v: Value = serde_json::from_slice(&st.stdout).unwrap();
    let row = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == "n2")
        .cloned()
        .unwrap();
    assert_eq!(row["state"], "left", "{v}");
    assert_eq!(row["queued"], 0, "{v}");
    let left_epoch = row["epoch"].as_i64().unwrap();

    // Rejoining by configuration: the same node, started again.
    n2.restart();
    let rows = node_rows(&pg);
    assert_eq!(rows["n2"].1, "up", "{rows:?}");
    assert!(rows["n2"].0 > left_epoch, "a new epoch: {rows:?}");
    assert_eq!(
        n2.count(),
        0,
        "the handed-over mail is dropped:\n{}",
        n2.log()
    );
    assert_eq!(
        n2.log().matches("cluster: dropped, taken over").count(),
        40,
        "{}",
        n2.log()
    );
    for i in 0..3 {
        let r = probe(&n2, &format!("lg-rejoined-{i}"));
        assert_eq!(r.code, 250, "{r:?}");
    }
    assert_eq!(count_of(&pg, "n2"), 3, "the rejoined node replicates again");
}

#[test]
fn stop_writes_the_last_removals() {
    let Some(ClusterStage { pg, nsd, ip, port }) = cluster_stage("ops") else {
        return;
    };
    let sink = LoadgenSink::start(&[SocketAddr::new(ip.into(), port)], &[]);
    // Removals wait for the interval (or 1,000 of them): none before the stop.
    let mut n1 = node_builder(&pg, &nsd, port, "n1", "tempfail")
        .set("cluster.sync_interval=\"60s\"")
        .start();
    let dir = tempfile::tempdir().unwrap();
    let ack = dir.path().join("n1.acks");
    let mut send = Command::new(loadgen_bin());
    send.args(["send", "--json", "--target", &n1.addr_string()])
        .args(["--connections", "2", "--cores", "1", "--messages", "30"])
        .args(["--size", "1024", "--domain", DOMAIN, "--run-id", "stop"])
        .arg("--ack-log")
        .arg(&ack);
    assert_ok(
        &run_with_timeout(&mut send, Duration::from_secs(60)),
        "loadgen send",
    );
    let acked = acked_tokens(std::slice::from_ref(&ack));
    assert_eq!(acked.len(), 30);
    wait_until(
        "n1's mail at the sink",
        Duration::from_secs(30),
        || {
            let t = sink.tokens();
            acked.iter().all(|a| t.contains_key(a))
        },
        || n1.log(),
    );
    wait_until(
        "n1's spool to empty",
        Duration::from_secs(10),
        || n1.count() == 0,
        || n1.log(),
    );
    assert_eq!(
        count_of(&pg, "n1"),
        30,
        "the removals are still waiting for the sync interval"
    );
    let status = n1.terminate();
    assert_eq!(status.code(), Some(0), "{}", n1.log());
    assert_eq!(count_of(&pg, "n1"), 0, "the stop wrote the removals");
}
