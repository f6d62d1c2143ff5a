//! Crash safety under load (issue 6, item 1). `sluice-loadgen send` pushes mail at
//! full rate into the real relay, which delivers it over a configured route to the
//! loadgen sink (5 ms per message, four connections, so a queue builds up). The
//! relay is SIGKILLed at random moments and started again on the same spool:
//!
//! - *accepting*: while loadgen is sending, after a random number of this
//!   round's messages were committed (group commits in progress);
//! - *draining*: after loadgen finished, while the queue is being delivered;
//! - *recovery*: a copy of the relay's own command line is started on the big
//!   queue it left and killed as soon as it opened its spool (start-up recovery
//!   and scheduling), then again at a random moment of its start-up.
//!
//! At the end every token that got a 250 (loadgen's ack log) reached the sink,
//! the spool is empty, and duplicates are counted. A duplicate is only allowed for
//! a delivery in flight at a kill: the sink's token counts are snapshot after each
//! kill (once the sink has no session left), no token may reach the sink twice
//! within one relay lifetime, and each kill explains at most
//! `MAX_CONNECTIONS × IN_FLIGHT_PER_CONNECTION` duplicates (one transaction
//! waiting for the sink's reply plus results not yet committed, per connection).
//!
//! CI runs 5 kills and a few thousand messages; `SLUICE_CRASH_KILLS=25` (see
//! bench/reliability.sh) is the long form. `SLUICE_CRASH_SEED` replays a run,
//! `SLUICE_CRASH_MESSAGES` sets the messages per sending round.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_testkit::*;

const MAX_CONNECTIONS: u64 = 4;
/// Deliveries per connection that can be done at the sink but not yet recorded
/// in the spool when the relay dies: the transaction waiting for its reply, and
/// results queued behind a commit.
const IN_FLIGHT_PER_CONNECTION: u64 = 4;
const SENDERS: u64 = 16;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")),
        Err(_) => default,
    }
}

/// xorshift64*: reproducible kill moments from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in lo..=hi.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    Accepting,
    Draining,
    Recovery,
}

/// One `loadgen send` run against the relay, with its own run id and ack log.
struct Send {
    guard: ChildGuard,
    out: PathBuf,
    acks: PathBuf,
}

impl Send {
    fn start(relay: &Relay, dir: &Path, run: &str, messages: u64) -> Send {
        let out = dir.join(format!("send-{run}.json"));
        let err = dir.join(format!("send-{run}.err"));
        let acks = dir.join(format!("acks-{run}"));
        let child = Command::new(loadgen_bin())
            .args(["send", "--json", "--target", &relay.addr_string()])
            .args(["--connections", &SENDERS.to_string(), "--cores", "1"])
            .args(["--messages", &messages.to_string(), "--size", "1024"])
            .args([
                "--domain",
                "crash.test",
                "--run-id",
                run,
                "--timeout",
                "20s",
            ])
            .arg("--ack-log")
            .arg(&acks)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("create send output"))
            .stderr(std::fs::File::create(&err).expect("create send stderr"))
            .spawn()
            .expect("spawn sluice-loadgen send");
        Send {
            guard: ChildGuard::new(child, "sluice-loadgen send"),
            out,
            acks,
        }
    }

    /// Waits for loadgen to finish (it gives up a few hundred ms after the relay
    /// is gone); returns its summary and the acknowledged tokens.
    fn finish(mut self) -> (Value, Vec<String>) {
        let status = self
            .guard
            .wait_timeout(Duration::from_secs(60))
            .expect("loadgen send did not finish");
        let out = std::fs::read(&self.out).unwrap_or_default();
        let summary: Value = serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!(
                "loadgen send ({status}) printed no summary: {e}: {}",
                text(&out)
            )
        });
        let acks = std::fs::read_to_string(&self.acks)
            .unwrap_or_else(|e| panic!("ack log {}: {e}", self.acks.display()));
        let tokens: Vec<String> = acks
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        assert_eq!(
            tokens.len() as u64,
            summary["accepted"].as_u64().unwrap_or(u64::MAX),
            "ack log and summary disagree: {summary}"
        );
        (summary, tokens)
    }
}

/// What the sink has counted once no session is open any more (a transaction
/// cut by the kill is finished or dropped by then).
fn settled_tokens(sink: &LoadgenSink) -> BTreeMap<String, u64> {
    wait_until(
        "the sink to have no open session",
        Duration::from_secs(30),
        || sink.stats()["sessions_current"].as_u64() == Some(0),
        || format!("{}", sink.stats()),
    );
    sink.tokens()
}

/// Where a start-up that was killed had got to, from its log.
fn startup_stage(log: &str) -> &'static str {
    if log.contains("\"sluice listening\"") {
        "listening"
    } else if log.contains("\"delivery started\"") {
        "scheduling"
    } else if log.contains("\"spool recovered\"") {
        "recovered"
    } else if log.contains("\"spool open\"") {
        "recovering"
    } else {
        "before spool open"
    }
}

/// Starts the relay's exact command line (read from /proc before it was killed)
/// on the same spool and SIGKILLs it during start-up: at once when `at_open`
/// and the log says the spool is open, else after `delay`. Returns the stage the
/// start-up had reached.
fn kill_during_startup(
    argv: &[String],
    log: &Path,
    at_open: bool,
    delay: Duration,
) -> &'static str {
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("create start-up log"))
        .spawn()
        .expect("spawn sluice for the start-up kill");
    let mut guard = ChildGuard::new(child, "sluice (start-up kill)");
    let t0 = Instant::now();
    if at_open {
        // Poll the log tightly: the window between "spool open" and listening
        // is a few milliseconds.
        loop {
            let t = std::fs::read_to_string(log).unwrap_or_default();
            if t.contains("\"spool open\"") || t0.elapsed() > Duration::from_secs(20) {
                break;
            }
            assert!(guard.is_running(), "relay exited during start-up:\n{t}");
            std::thread::sleep(Duration::from_micros(200));
        }
    } else {
        // A random kill moment, not a synchronisation.
        std::thread::sleep(delay);
    }
    guard.kill();
    let t = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        !t.contains("\"level\":\"ERROR\"") && !t.contains("panicked"),
        "start-up logged an error before the kill:\n{t}"
    );
    startup_stage(&t)
}

fn cmdline(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).expect("read /proc/PID/cmdline");
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_message() {
    let kills = env_u64("SLUICE_CRASH_KILLS", 5) as usize;
    let messages = env_u64("SLUICE_CRASH_MESSAGES", 800);
    let seed = env_u64(
        "SLUICE_CRASH_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1,
    );
    eprintln!("crash test: {kills} kills, {messages} messages per round, SLUICE_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let started = Instant::now();

    let ip: Ipv4Addr = loopback();
    let port = mx_port(&[ip]);
    let mut sink = LoadgenSink::start(
        &[SocketAddr::new(ip.into(), port)],
        &["--delay-data", "5ms"],
    );
    let mut relay = Relay::builder()
        .cores(2)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set(format!(
            "route.default={{type=\"relay\",host=\"{ip}\",port={port},tls=\"none\"}}"
        ))
        .set(format!(
            "destination={{default={{max_connections={MAX_CONNECTIONS}}}}}"
        ))
        .set("queue.default.retry=[\"1s\"]")
        .start();
    let work = tempfile::tempdir().expect("tempdir");

    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut attempted_runs: Vec<String> = Vec::new();
    // Sink counts after each kill, in order.
    let mut snapshots: Vec<BTreeMap<String, u64>> = Vec::new();
    let mut sigkills = 0usize;
    let (mut during_accept, mut during_drain) = (0usize, 0usize);
    let mut startup_stages: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut send_failed = 0u64;

    let mut recovery_rounds = 0usize;
    // Rounds until `kills` SIGKILLs: every kind early, then at random. A recovery
    // round is three kills (the running relay, then two start-ups).
    for k in 0.. {
        if sigkills >= kills {
            break;
        }
        let moment = match k {
            0 => Moment::Accepting,
            1 => Moment::Draining,
            2 => Moment::Recovery,
            _ => match rng.range(0, 2) {
                0 => Moment::Accepting,
                1 => Moment::Draining,
                _ => Moment::Recovery,
            },
        };
        let run = format!("k{k}");
        attempted_runs.push(run.clone());
        match moment {
            Moment::Accepting => {
                // Four rounds' worth, and the kill comes after a random number
                // of this round's messages were committed (at most half a
                // round): loadgen is still sending, commits are under way.
                let base = relay.stats().messages_stored;
                let target = base + rng.range(20, messages / 2);
                let mut send = Send::start(&relay, work.path(), &run, 4 * messages);
                wait_until(
                    "messages committed before the kill",
                    Duration::from_secs(60),
                    || relay.stats().messages_stored >= target,
                    || relay.log(),
                );
                let sending = send.guard.is_running();
                relay.kill9();
                sigkills += 1;
                let (summary, tokens) = send.finish();
                // A transaction loadgen had under way was cut by the kill.
                if sending && summary["failed"].as_u64().unwrap_or(0) > 0 {
                    during_accept += 1;
                }
                send_failed += summary["failed"].as_u64().unwrap_or(0);
                eprintln!(
                    "kill {}: accepting ({} acked, {} cut by the kill)",
                    sigkills,
                    tokens.len(),
                    summary["failed"]
                );
                acked.extend(tokens);
                snapshots.push(settled_tokens(&sink));
            }
            Moment::Draining | Moment::Recovery => {
                let send = Send::start(&relay, work.path(), &run, messages);
                let (summary, tokens) = send.finish();
                assert_eq!(
                    summary["accepted"].as_u64(),
                    Some(messages),
                    "a round without a kill must be fully acknowledged: {summary}"
                );
                acked.extend(tokens);
                let base = sink.messages();
                let queued = relay.count() as u64;
                // Kill after a random share of the backlog was delivered.
                let target = base + rng.range(1, (queued / 2).max(1));
                wait_until(
                    "deliveries before the kill",
                    Duration::from_secs(60),
                    || sink.messages() >= target,
                    || relay.log(),
                );
                let argv = cmdline(relay.pid());
                relay.kill9();
                sigkills += 1;
                let left = relay.count();
                assert!(
                    left > 0,
                    "kill {sigkills} came after the queue drained: not during delivery"
                );
                during_drain += 1;
                eprintln!("kill {sigkills}: delivering ({left} still queued)");
                snapshots.push(settled_tokens(&sink));
                if moment == Moment::Recovery {
                    recovery_rounds += 1;
                    for (i, at_open) in [true, false].into_iter().enumerate() {
                        let log = relay.dir.path().join(format!("startup-kill-{k}-{i}.log"));
                        let delay = Duration::from_millis(rng.range(1, 40));
                        let stage = kill_during_startup(&argv, &log, at_open, delay);
                        sigkills += 1;
                        *startup_stages.entry(stage).or_default() += 1;
                        eprintln!(
                            "kill {sigkills}: during start-up on {left} queued messages ({stage})"
                        );
                        snapshots.push(settled_tokens(&sink));
                    }
                }
            }
        }
        relay.restart();
    }

    wait_until(
        "the spool to empty after the last restart",
        Duration::from_secs(120),
        || relay.count() == 0,
        || relay.log(),
    );
    let fin = settled_tokens(&sink);
    snapshots.push(fin.clone());

    // Every acknowledged token reached the sink.
    let missing: Vec<&String> = acked.iter().filter(|t| !fin.contains_key(*t)).collect();
    // Nothing reached the sink that loadgen did not send.
    let foreign: Vec<&String> = fin
        .keys()
        .filter(|t| {
            !attempted_runs
                .iter()
                .any(|r| t.starts_with(&format!("lg-{r}-")))
        })
        .collect();
    // Per lifetime counts: lifetime i is what the sink got between snapshots.
    let mut within_lifetime = Vec::new();
    let mut per_kill = vec![0u64; snapshots.len()];
    for (token, total) in &fin {
        if *total < 2 {
            continue;
        }
        let mut prev = 0u64;
        let mut last_lifetime: Option<usize> = None;
        for (i, snap) in snapshots.iter().enumerate() {
            let now = snap.get(token).copied().unwrap_or(0);
            let got = now - prev;
            if got > 1 {
                within_lifetime.push((token.clone(), i, got));
            }
            if got > 0 {
                // Each delivery after the first is owed to the kill that ended
                // the lifetime of the previous delivery.
                if let Some(l) = last_lifetime {
                    per_kill[l] += got;
                } else if got > 1 {
                    per_kill[i] += got - 1;
                }
                last_lifetime = Some(i);
            }
            prev = now;
        }
    }
    let duplicates: u64 = fin.values().map(|n| n.saturating_sub(1)).sum();
    let unacked_delivered = fin.keys().filter(|t| !acked.contains(*t)).count();
    let bound = MAX_CONNECTIONS * IN_FLIGHT_PER_CONNECTION;
    eprintln!(
        "RESULT kills={sigkills} (accepting {during_accept}, delivering {during_drain}, \
         start-up {startup_stages:?}) acked={} lost={} delivered_unique={} duplicates={duplicates} \
         per_kill={:?} bound_per_kill={bound} unacked_delivered={unacked_delivered} \
         send_cut={send_failed} seconds={:.1}",
        acked.len(),
        missing.len(),
        fin.len(),
        &per_kill[..per_kill.len() - 1],
        started.elapsed().as_secs_f64()
    );
    assert!(
        missing.is_empty(),
        "{} acknowledged message(s) never reached the sink: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert!(foreign.is_empty(), "tokens nobody sent: {foreign:?}");
    assert!(
        within_lifetime.is_empty(),
        "delivered twice within one relay lifetime (not explained by a kill): {within_lifetime:?}"
    );
    assert_eq!(
        per_kill.last(),
        Some(&0),
        "duplicates after the last kill: {per_kill:?}"
    );
    for (i, n) in per_kill.iter().enumerate() {
        assert!(
            *n <= bound,
            "kill {} explains {n} duplicates, more than the {bound} deliveries that can be \
             in flight ({MAX_CONNECTIONS} connections × {IN_FLIGHT_PER_CONNECTION}): {per_kill:?}",
            i + 1
        );
    }
    assert_eq!(sigkills, snapshots.len() - 1);
    assert!(
        during_accept > 0,
        "no kill landed while loadgen was sending"
    );
    assert!(
        during_drain > 0,
        "no kill landed while the queue was draining"
    );
    if recovery_rounds > 0 {
        let in_startup: usize = startup_stages
            .iter()
            .filter(|(s, _)| **s != "listening")
            .map(|(_, n)| n)
            .sum();
        assert!(
            in_startup > 0,
            "no start-up kill landed before the relay listened: {startup_stages:?}"
        );
    }
    assert_eq!(relay.count(), 0);
    sink.kill();
}
