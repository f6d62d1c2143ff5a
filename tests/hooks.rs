//! HTTP hooks (issue 14 item 4, docs/hooks.md) against the real binary: a
//! Python http.server hook (tests/py/test_hook.py) rejects at RCPT, accepts,
//! modifies at DATA (checked on the bytes the next hop receives), discards
//! and quarantines; a hook that answers too late, answers garbage or is not
//! there follows its `on_failure`, counted in `sluice_hook_calls_total`.

use std::time::Duration;

use serde_json::Value;
use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);

fn relay_with_hooks(hooks: &str, sets: &[String]) -> Relay {
    let mut b = Relay::builder().lset("hook", hooks);
    for s in sets {
        b = b.set(s.clone());
    }
    b.start()
}

/// The DATA exchange of a message; returns the reply to the final dot.
fn data(c: &mut Client, subject: &str) -> Reply {
    c.expect("DATA", 354);
    c.send(
        format!(
            "From: a@snd.test\r\nTo: bob@far.test\r\nSubject: {subject}\r\nX-Remove-Me: yes\r\n\r\noriginal body\r\n.\r\n"
        )
        .as_bytes(),
    );
    c.read_reply()
}

fn hook_calls(relay: &Relay, hook: &str, result: &str) -> f64 {
    metric_sum(
        &relay.metrics(),
        &format!("sluice_hook_calls_total{{hook=\"{hook}\",result=\"{result}\"}}"),
    )
}

#[test]
fn a_hook_rejects_at_rcpt_and_modifies_discards_and_quarantines_at_data() {
    let hook = HookServer::start();
    let (hop, sets) = routed_hop(&["far.test"]);
    let relay = relay_with_hooks(
        &format!(
            "[{{name=\"policy\",url=\"{}\",stages=[\"rcpt\",\"data\"],include_message=true}}]",
            hook.url("/")
        ),
        &sets,
    );

    let mut c = relay.session();
    c.expect("MAIL FROM:<a@snd.test>", 250);
    let r = c.cmd("RCPT TO:<blocked@far.test>");
    assert_eq!(
        (r.code, r.last()),
        (550, "550 5.7.1 Recipient blocked by hook")
    );
    c.expect("RCPT TO:<bob@far.test>", 250);
    c.expect("RCPT TO:<removed@far.test>", 250);
    let r = data(&mut c, "hook-edit please");
    assert_eq!(r.code, 250, "{r:?}");
    let edited = queued_id(&r.text()).expect("queued id");

    c.expect("MAIL FROM:<a@snd.test>", 250);
    c.expect("RCPT TO:<bob@far.test>", 250);
    let r = data(&mut c, "hook-reject this");
    assert_eq!(
        (r.code, r.last()),
        (554, "554 5.7.1 Content refused by hook")
    );

    c.expect("MAIL FROM:<a@snd.test>", 250);
    c.expect("RCPT TO:<bob@far.test>", 250);
    let r = data(&mut c, "hook-discard this");
    assert_eq!(r.code, 250, "{r:?}");

    c.expect("MAIL FROM:<a@snd.test>", 250);
    c.expect("RCPT TO:<bob@far.test>", 250);
    let r = data(&mut c, "hook-quarantine this");
    assert_eq!(r.code, 250, "{r:?}");
    let held = queued_id(&r.text()).expect("held id");
    c.expect("QUIT", 221);

    wait_until(
        "the edited message at the next hop",
        T,
        || !hop.messages().is_empty(),
        || relay.log(),
    );
    let msgs = hop.messages();
    assert_eq!(msgs.len(), 1, "only the edited message leaves: {msgs:?}");
    let m = &msgs[0];
    assert!(m.mail.contains("<hooked@snd.test>"), "{}", m.mail);
    assert_eq!(m.rcpt_addresses(), ["bob@far.test", "copy@far.test"]);
    let body = m.body_text();
    assert!(body.contains("X-Hook: checked 127.0.0.1\r\n"), "{body}");
    assert!(
        body.contains("Subject: [hook] hook-edit please\r\n"),
        "{body}"
    );
    assert!(!body.contains("X-Remove-Me"), "{body}");
    assert!(body.ends_with("\r\n\r\nreplaced by hook\r\n"), "{body}");

    // The held message stays; the discarded and refused ones were never stored.
    wait_until("one message left", T, || relay.count() == 1, || relay.log());
    assert!(relay.show(&held).contains("held"));

    // What the hook was sent.
    let docs = hook.documents();
    let blocked = docs
        .iter()
        .find(|d| d["stage"] == "rcpt" && d["argument"] == "blocked@far.test")
        .expect("the rcpt document");
    assert_eq!(blocked["client"]["ip"], "127.0.0.1");
    assert_eq!(blocked["client"]["helo"], "client.test");
    assert_eq!(blocked["client"]["listener"], "smtp");
    assert_eq!(blocked["envelope"]["sender"], "a@snd.test");
    assert_eq!(blocked["tls"], Value::Null);
    let data_doc = docs
        .iter()
        .find(|d| d["stage"] == "data" && d["envelope"]["queue_id"] == edited.as_str())
        .expect("the data document of the edited message");
    assert_eq!(
        data_doc["envelope"]["recipients"],
        serde_json::json!(["bob@far.test", "removed@far.test"])
    );
    let message = &data_doc["message"];
    assert_eq!(message["truncated"], false);
    assert_eq!(message["encoding"], "utf-8");
    assert!(message["content"]
        .as_str()
        .is_some_and(|t| t.contains("Subject: hook-edit please\r\n")));
    // rcpt: blocked, bob, removed, bob, bob, bob; data: four messages.
    assert_eq!(docs.len(), 10, "{docs:#?}");
    assert_eq!(hook_calls(&relay, "policy", "ok"), 10.0);
}

#[test]
fn hook_failures_follow_on_failure_and_are_counted() {
    let hook = HookServer::start();
    let (hop, sets) = routed_hop(&["far.test"]);
    let dead = free_port();
    let relay = relay_with_hooks(
        &format!(
            "[{{name=\"slow\",url=\"{}\",stages=[\"rcpt\"],timeout=\"1s\"}},\
              {{name=\"broken\",url=\"{}\",stages=[\"data\"],on_failure=\"accept\"}},\
              {{name=\"gone\",url=\"http://127.0.0.1:{dead}/\",stages=[\"mail\"],on_failure=\"accept\"}}]",
            hook.url("/slow"),
            hook.url("/broken")
        ),
        &sets,
    );
    let mut c = relay.session();
    // mail: nobody listens, accepted anyway (on_failure = accept).
    c.expect("MAIL FROM:<a@snd.test>", 250);
    // rcpt: the hook answers after 5 s, the timeout is 1 s: 451 4.3.0.
    let r = c.cmd("RCPT TO:<bob@far.test>");
    assert_eq!((r.code, r.enhanced()), (451, "4.3.0"), "{r:?}");
    c.expect("RSET", 250);
    c.expect("QUIT", 221);
    assert_eq!(hook_calls(&relay, "slow", "timeout"), 1.0);
    assert_eq!(hook_calls(&relay, "gone", "transport"), 1.0);
    drop(relay);

    // The same hooks, the slow one accepting on failure: the message goes
    // through; the garbage answer at data is a counted failure, accepted.
    let relay = relay_with_hooks(
        &format!(
            "[{{name=\"slow\",url=\"{}\",stages=[\"rcpt\"],timeout=\"1s\",on_failure=\"accept\"}},\
              {{name=\"broken\",url=\"{}\",stages=[\"data\"],on_failure=\"accept\"}}]",
            hook.url("/slow"),
            hook.url("/broken")
        ),
        &sets,
    );
    let mut c = relay.session();
    c.expect("MAIL FROM:<a@snd.test>", 250);
    c.expect("RCPT TO:<bob@far.test>", 250);
    let r = data(&mut c, "unfiltered");
    assert_eq!(r.code, 250, "{r:?}");
    c.expect("QUIT", 221);
    wait_until(
        "delivery despite the failed hooks",
        T,
        || !hop.messages().is_empty(),
        || relay.log(),
    );
    assert!(hop.messages()[0]
        .body_text()
        .contains("Subject: unfiltered"));
    assert_eq!(hook_calls(&relay, "slow", "timeout"), 1.0);
    assert_eq!(hook_calls(&relay, "broken", "invalid_reply"), 1.0);
}

#[test]
fn check_config_names_a_bad_hook_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("sluice.toml");
    std::fs::write(
        &file,
        "[server.listener.smtp]\nbind = [\"127.0.0.1:2525\"]\n\n[[server.listener.smtp.hook]]\nname = \"h\"\nurl = \"ftp://example.org/\"\n",
    )
    .expect("write");
    let out = sluice(&["check-config", &file.display().to_string()]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("server.listener.smtp.hook[0].url") && err.contains("line 6"),
        "{err}"
    );
}

#[test]
fn a_full_hook_queue_fails_at_once_as_busy() {
    let hook = HookServer::start();
    // One request in flight, none waiting.
    let relay = relay_with_hooks(
        &format!(
            "[{{name=\"narrow\",url=\"{}\",stages=[\"rcpt\"],timeout=\"3s\",max_concurrency=1,max_queued=0}}]",
            hook.url("/slow")
        ),
        &[],
    );
    let mut first = relay.session();
    first.expect("MAIL FROM:<a@snd.test>", 250);
    first.send_line("RCPT TO:<one@far.test>");
    // The only thread is in the slow request now.
    wait_until(
        "the first request at the hook",
        T,
        || hook.documents().len() == 1,
        || relay.log(),
    );
    let mut second = relay.session();
    second.expect("MAIL FROM:<a@snd.test>", 250);
    let r = second.cmd("RCPT TO:<two@far.test>");
    assert_eq!((r.code, r.enhanced()), (451, "4.3.0"), "{r:?}");
    assert_eq!(hook_calls(&relay, "narrow", "busy"), 1.0);
    // The first one runs out of time (the hook takes 5 s).
    let r = first.read_reply();
    assert_eq!((r.code, r.enhanced()), (451, "4.3.0"), "{r:?}");
    assert_eq!(hook_calls(&relay, "narrow", "timeout"), 1.0);
    assert_eq!(
        hook.documents().len(),
        1,
        "the busy call never reached the hook"
    );
}
