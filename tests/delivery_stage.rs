//! The delivery stage (issue 14 item 1) against the real binary: the filters
//! of the listener that received a message are asked again before each
//! delivery attempt. An HTTP hook (tests/py/test_hook.py) accepts, rejects
//! (the sender gets a failure notice), tempfails (asked again at the retry),
//! discards and quarantines (released by the operator, then sent); a Sieve
//! script and a built-in rule at `delivery` do the same from the config.
//! Everything is checked on what the next hop receives and on the queue.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);
const TOKEN: &str = "delivery-stage-token-0123456789abcdef";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// Sends one message through a raw session; its queue id.
fn send(relay: &Relay, rcpt: &str, subject: &str) -> String {
    let mut c = relay.session();
    c.expect("MAIL FROM:<a@snd.test>", 250);
    c.expect(&format!("RCPT TO:<{rcpt}>"), 250);
    c.expect("DATA", 354);
    c.send(
        format!("From: a@snd.test\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n.\r\n")
            .as_bytes(),
    );
    let r = c.read_reply();
    assert_eq!(r.code, 250, "{r:?}");
    c.expect("QUIT", 221);
    queued_id(&r.text()).expect("queued id")
}

/// What the next hop received with `needle` in it.
fn received_with(hop: &ScriptedServer, needle: &str) -> Vec<Received> {
    hop.messages()
        .into_iter()
        .filter(|m| m.body_text().contains(needle))
        .collect()
}

fn refused(relay: &Relay, verdict: &str) -> f64 {
    metric_sum(
        &relay.metrics(),
        &format!("sluice_delivery_stage_refused_total{{verdict=\"{verdict}\"}}"),
    )
}

/// The delivery-stage documents the hook got about `subject`'s message.
fn stage_docs(hook: &HookServer, subject: &str) -> Vec<Value> {
    hook.documents()
        .into_iter()
        .filter(|d| {
            d["stage"] == "delivery"
                && d["message"]["content"]
                    .as_str()
                    .is_some_and(|c| c.contains(&format!("Subject: {subject}\r\n")))
        })
        .collect()
}

#[test]
fn a_hook_before_delivery_accepts_rejects_tempfails_discards_and_quarantines() {
    let hook = HookServer::start();
    // The senders' domain goes to the same hop, so failure notices arrive there.
    let (hop, sets) = routed_hop(&["far.test", "snd.test"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let token = write(dir.path(), "api.token", &format!("{TOKEN}\n"));
    let mut b = Relay::builder()
        .dir(dir)
        .lset(
            "hook",
            &format!(
                "[{{name=\"gate\",url=\"{}\",stages=[\"delivery\"],include_message=true}}]",
                hook.url("/")
            ),
        )
        .set(format!("admin.token_file=\"{}\"", token.display()));
    for s in sets {
        b = b.set(s);
    }
    let relay = b.start();

    let plain = send(&relay, "bob@far.test", "plain");
    let rejected = send(&relay, "rita@far.test", "stage-reject");
    let deferred = send(&relay, "tom@far.test", "stage-tempfail");
    let discarded = send(&relay, "dan@far.test", "stage-discard");
    let held = send(&relay, "quin@far.test", "stage-quarantine");

    // Accepted: sent as is.
    wait_until(
        "the accepted message at the next hop",
        T,
        || !received_with(&hop, "Subject: plain").is_empty(),
        || relay.log(),
    );
    // Rejected: never sent; the sender is told, with the hook's reply.
    wait_until(
        "the failure notice for the rejected message",
        T,
        || {
            hop.messages().iter().any(|m| {
                m.mail.contains("<>")
                    && m.rcpt_addresses() == ["a@snd.test"]
                    && m.body_text().contains("Held back by delivery hook")
            })
        },
        || relay.log(),
    );
    assert!(
        received_with(&hop, "Subject: stage-reject\r\n")
            .iter()
            .all(|m| m.mail.contains("<>")),
        "only inside the notice"
    );
    // Tempfailed: still queued with the hook's reply, and asked again at the
    // retry (the queue retries every second).
    wait_until(
        "the tempfailed message asked again",
        T,
        || stage_docs(&hook, "stage-tempfail").len() >= 2,
        || relay.log(),
    );
    let show = relay.show(&deferred);
    assert!(show.contains("Not now, says the delivery hook"), "{show}");
    // Quarantined: held, not sent.
    wait_until(
        "the quarantined message held",
        T,
        || relay.show(&held).contains("yes (by the operator)"),
        || relay.show(&held),
    );
    // Discarded: gone, not sent.
    wait_until(
        "the discarded message gone",
        T,
        || {
            !relay
                .messages()
                .iter()
                .any(|m| m["id"] == discarded.as_str())
        },
        || relay.log(),
    );
    for (subject, id) in [
        ("stage-tempfail", &deferred),
        ("stage-discard", &discarded),
        ("stage-quarantine", &held),
    ] {
        assert!(
            received_with(&hop, &format!("Subject: {subject}")).is_empty(),
            "{subject} ({id}) reached the next hop"
        );
    }
    assert!(!relay
        .messages()
        .iter()
        .any(|m| m["id"] == plain.as_str() || m["id"] == rejected.as_str()));
    assert_eq!(refused(&relay, "reject"), 1.0);
    assert_eq!(refused(&relay, "discard"), 1.0);
    assert_eq!(refused(&relay, "quarantine"), 1.0);
    assert!(refused(&relay, "tempfail") >= 2.0);

    // Released by the operator: past the quarantine once, and sent.
    let api = format!("http://127.0.0.1:{}", relay.admin_port);
    let tf = token.display().to_string();
    let out = sluice(&[
        "queue",
        "release",
        &held,
        "--api",
        &api,
        "--token-file",
        &tf,
    ]);
    assert_ok(&out, "sluice queue release");
    wait_until(
        "the released message at the next hop",
        T,
        || !received_with(&hop, "Subject: stage-quarantine").is_empty(),
        || relay.log(),
    );
    assert!(
        stage_docs(&hook, "stage-quarantine").len() >= 2,
        "asked again at the release"
    );

    // What the hook was told before delivery.
    let doc = stage_docs(&hook, "plain")
        .pop()
        .expect("the plain message's document");
    assert_eq!(doc["client"]["ip"], "127.0.0.1");
    assert_eq!(doc["client"]["helo"], "client.test");
    assert_eq!(doc["client"]["listener"], "smtp");
    assert_eq!(doc["envelope"]["queue_id"], plain.as_str());
    assert_eq!(doc["envelope"]["sender"], "a@snd.test");
    assert_eq!(
        doc["envelope"]["recipients"],
        serde_json::json!(["bob@far.test"])
    );
    assert_eq!(doc["argument"], Value::Null);
    // No session stage asks the hook: every document is a delivery one.
    assert!(hook.documents().iter().all(|d| d["stage"] == "delivery"));
}

#[test]
fn a_sieve_script_and_a_rule_before_delivery() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = write(
        dir.path(),
        "delivery.sieve",
        "require [\"reject\", \"envelope\"];\n\
         if header :contains \"subject\" \"sieve-stop\" {\n\
           reject \"550 5.7.1 Stopped by the delivery script\";\n\
         }\n",
    );
    let (hop, sets) = routed_hop(&["far.test", "snd.test"]);
    let mut b = Relay::builder()
        .dir(dir)
        .lset("sieve", &format!("{{delivery=\"{}\"}}", script.display()))
        .lset(
            "filter_rule",
            "[{stage=\"delivery\",recipient=\"later@far.test\",action=\"tempfail\",reply=\"451 4.7.1 Rule says later\"}]",
        );
    for s in sets {
        b = b.set(s);
    }
    let relay = b.start();

    send(&relay, "bob@far.test", "fine");
    send(&relay, "bob@far.test", "sieve-stop");
    let later = send(&relay, "later@far.test", "by rule");

    wait_until(
        "the failure notice from the script",
        T,
        || {
            hop.messages().iter().any(|m| {
                m.mail.contains("<>") && m.body_text().contains("Stopped by the delivery script")
            })
        },
        || relay.log(),
    );
    wait_until(
        "the rule's deferral",
        T,
        || relay.show(&later).contains("Rule says later"),
        || relay.log(),
    );
    assert_eq!(received_with(&hop, "Subject: fine").len(), 1);
    assert!(received_with(&hop, "Subject: by rule").is_empty());
    assert!(received_with(&hop, "Subject: sieve-stop")
        .iter()
        .all(|m| m.mail.contains("<>")));
}
