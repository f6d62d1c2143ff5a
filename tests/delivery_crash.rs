//! Crash test under load: `sluice-loadgen send` pushes 300 messages into the real
//! relay, which delivers them by MX (real NSD) to the loadgen sink; the relay is
//! SIGKILLed three times while it delivers and started again each time. At the
//! end every acknowledged message reached the sink at least once (matched by the
//! loadgen token in Message-ID); duplicates are counted and reported.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sluice_testkit::*;

const MESSAGES: u64 = 300;
const SENDERS: u64 = 8;
const MAX_CONNECTIONS: u64 = 3;
const KILLS: usize = 3;

/// The tokens `loadgen send` uses: lg-WORKER-N, messages split evenly.
fn send_tokens(messages: u64, connections: u64) -> Vec<String> {
    let mut v = Vec::new();
    for i in 0..connections {
        let share = messages / connections + u64::from(i < messages % connections);
        for n in 0..share {
            v.push(format!("lg-{i}-{n}"));
        }
    }
    v
}

#[test]
fn sigkill_during_delivery_loses_no_acknowledged_message() {
    let ip = loopback();
    let port = mx_port(&[ip]);
    let nsd = Nsd::start(&format!("crash MX 10 mx1\nmx1 A {ip}"));
    // 25 ms per message at the sink and three connections: delivery takes a few
    // seconds, long enough to kill the relay in the middle of it three times.
    let sink = LoadgenSink::start(
        &[SocketAddr::new(ip.into(), port)],
        &["--delay-data", "25ms"],
    );
    let mut relay = mx_relay(
        &nsd,
        port,
        2,
        &[format!(
            "destination={{\"crash.dlv.test\"={{max_connections={MAX_CONNECTIONS}}}}}"
        )],
    );
    let out = run_with_timeout(
        Command::new(loadgen_bin())
            .args(["send", "--json", "--target", &relay.addr_string()])
            .args(["--connections", &SENDERS.to_string()])
            .args(["--messages", &MESSAGES.to_string()])
            .args(["--size", "1024", "--domain", "crash.dlv.test"]),
        Duration::from_secs(60),
    );
    let sent: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("loadgen send: {e}; stderr {}", text(&out.stderr)));
    assert_eq!(
        sent["accepted"], MESSAGES,
        "every message acknowledged: {sent}"
    );

    let mut at_kill = Vec::new();
    for k in 0..KILLS {
        let base = sink.messages();
        // Let some deliveries happen since the last start, then kill mid-stream.
        wait_until(
            &format!("deliveries before kill {}", k + 1),
            Duration::from_secs(30),
            || sink.messages() >= base + 25,
            || relay.log(),
        );
        relay.kill9();
        let delivered = sink.messages();
        at_kill.push(delivered);
        assert!(
            delivered < MESSAGES,
            "kill {} came after delivery finished ({delivered} at the sink): not a \
             crash during delivery",
            k + 1
        );
        relay.restart();
    }
    wait_until(
        "the spool to empty after the last restart",
        Duration::from_secs(60),
        || relay.count() == 0,
        || relay.log(),
    );
    let tokens = sink.tokens();
    let missing: Vec<String> = send_tokens(MESSAGES, SENDERS)
        .into_iter()
        .filter(|t| !tokens.contains_key(t))
        .collect();
    let duplicates: u64 = tokens.values().map(|n| n.saturating_sub(1)).sum();
    let duplicated: Vec<(&String, &u64)> = tokens.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "crash test: {MESSAGES} acknowledged, {} unique at the sink, {duplicates} duplicate \
         deliveries ({} messages), sink counts at the kills {at_kill:?}",
        tokens.len(),
        duplicated.len()
    );
    assert!(
        missing.is_empty(),
        "{} acknowledged message(s) never reached the sink: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert_eq!(
        tokens.len() as u64,
        MESSAGES,
        "no unexpected tokens: {tokens:?}"
    );
    // A duplicate is allowed only for an attempt in flight at a kill: at most one
    // transaction per connection (plus results not yet persisted) per kill.
    let bound = KILLS as u64 * MAX_CONNECTIONS * 4;
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates for {KILLS} kills with {MAX_CONNECTIONS} connections \
         (bound {bound}): {duplicated:?}"
    );
}
