use std::io::Write as _;
use std::sync::Arc;

use super::*;
use crate::stage::ClientFacts;

const MESSAGE: &[u8] =
    b"Received: from x\r\nFrom: a@example.org\r\nSubject: hello\r\nX-Junk: 1\r\n\r\nbody text\r\n";

struct Scripts {
    dir: std::path::PathBuf,
}

impl Scripts {
    fn new(tag: &str) -> Scripts {
        let dir = std::env::temp_dir().join(format!("sluice-sieve-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        Scripts { dir }
    }

    fn file(&self, name: &str, text: &str) -> std::path::PathBuf {
        let path = self.dir.join(name);
        let mut f = std::fs::File::create(&path).expect("create");
        f.write_all(text.as_bytes()).expect("write");
        path
    }
}

impl Drop for Scripts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn client() -> ClientFacts {
    ClientFacts {
        listener: "smtp".into(),
        ip: "192.0.2.9".parse().expect("ip"),
        port: 1025,
        ptr: None,
        helo: Some("client.example".into()),
        tls: None,
        auth_user: None,
        server_name: "relay.example".into(),
    }
}

fn load(s: &Scripts, stage: &str, text: &str) -> SieveSet {
    let path = s.file(&format!("{stage}.sieve"), text);
    let mut cfg = SieveConfig {
        include_dir: Some(s.dir.clone()),
        ..Default::default()
    };
    match stage {
        "rcpt" => cfg.rcpt = Some(path),
        "data" => cfg.data = Some(path),
        "ehlo" => cfg.ehlo = Some(path),
        _ => panic!("stage {stage}"),
    }
    let lists = Lists::from_entries([("blocked", vec!["@spam.example"])]);
    SieveSet::load(&cfg, "relay.example", Arc::new(lists)).expect("load")
}

fn run_rcpt(set: &SieveSet, rcpt: &str) -> Result<FilterOutcome, SieveRunError> {
    let c = client();
    let event = StageEvent {
        stage: Stage::Rcpt,
        client: &c,
        queue_id: None,
        sender: Some("a@example.org"),
        sender_params: &[],
        recipient: Some(rcpt),
        recipients: &[],
        message: None,
    };
    set.run(&event, &SieveExtras::default())
}

fn run_data(set: &SieveSet, extras: SieveExtras<'_>) -> FilterOutcome {
    let c = client();
    let recipients = vec!["b@example.net".to_string()];
    let event = StageEvent {
        stage: Stage::Data,
        client: &c,
        queue_id: Some("abc"),
        sender: Some("a@example.org"),
        sender_params: &[],
        recipient: None,
        recipients: &recipients,
        message: Some(MESSAGE),
    };
    set.run(&event, &extras).expect("run")
}

#[test]
fn reject_with_and_without_a_code() {
    let s = Scripts::new("reject");
    let set = load(
        &s,
        "rcpt",
        r#"require ["envelope", "reject", "ereject"];
if envelope :domain "to" "closed.example" { reject "No mail for this domain"; }
if envelope :localpart "to" "later" { ereject "451 4.2.1 Mailbox busy"; }
"#,
    );
    assert_eq!(
        run_rcpt(&set, "x@closed.example").expect("run").verdict,
        Verdict::Reject(FilterReply {
            code: 550,
            enhanced: Some("5.7.1".into()),
            text: "No mail for this domain".into()
        })
    );
    assert_eq!(
        run_rcpt(&set, "later@open.example").expect("run").verdict,
        Verdict::Tempfail(FilterReply {
            code: 451,
            enhanced: Some("4.2.1".into()),
            text: "Mailbox busy".into()
        })
    );
    assert_eq!(
        run_rcpt(&set, "x@open.example").expect("run"),
        FilterOutcome::accept()
    );
}

#[test]
fn discard_quarantine_and_keep() {
    let s = Scripts::new("actions");
    let set = load(
        &s,
        "rcpt",
        r#"require ["envelope", "fileinto"];
if envelope :is "to" "drop@example.net" { discard; stop; }
if envelope :is "to" "hold@example.net" { fileinto "quarantine"; stop; }
if envelope :is "to" "other@example.net" { fileinto "Archive"; }
"#,
    );
    assert_eq!(
        run_rcpt(&set, "drop@example.net").expect("run").verdict,
        Verdict::Discard
    );
    assert!(matches!(
        run_rcpt(&set, "hold@example.net").expect("run").verdict,
        Verdict::Quarantine { .. }
    ));
    assert_eq!(
        run_rcpt(&set, "other@example.net").expect("run").verdict,
        Verdict::Accept
    );
}

#[test]
fn environment_variables_and_extlists() {
    let s = Scripts::new("env");
    let set = load(
        &s,
        "rcpt",
        r#"require ["variables", "environment", "reject", "envelope", "extlists"];
if envelope :list "to" "blocked" { reject "listed"; stop; }
if string :is "${env.remote_ip}" "192.0.2.9" { if environment :is "helo" "client.example" { reject "from ${env.helo}"; } }
"#,
    );
    let listed = run_rcpt(&set, "x@spam.example").expect("run").verdict;
    assert!(matches!(&listed, Verdict::Reject(r) if r.text == "listed"));
    let env = run_rcpt(&set, "x@ok.example").expect("run").verdict;
    assert!(
        matches!(&env, Verdict::Reject(r) if r.text == "from client.example"),
        "{env:?}"
    );
}

#[test]
fn editheader_becomes_header_modifications() {
    let s = Scripts::new("edit");
    let set = load(
        &s,
        "data",
        r#"require ["editheader", "variables"];
addheader "X-Sieve" "checked spf=${env.spf}";
deleteheader "X-Junk";
"#,
    );
    let out = run_data(
        &set,
        SieveExtras {
            spf: "pass",
            ..Default::default()
        },
    );
    assert_eq!(out.verdict, Verdict::Accept);
    let mut env = crate::stage_message::EditableEnvelope {
        sender: "a@example.org".into(),
        recipients: vec!["b@example.net".into()],
    };
    let edited =
        crate::stage_message::apply(&out.modifications, &mut env, MESSAGE.to_vec()).expect("apply");
    let text = String::from_utf8(edited).expect("utf8");
    assert!(
        text.starts_with("X-Sieve: checked spf=pass\r\nReceived: from x\r\n"),
        "{text}"
    );
    assert!(!text.contains("X-Junk"), "{text}");
    assert!(text.ends_with("\r\n\r\nbody text\r\n"), "{text}");
}

#[test]
fn redirect_replaces_the_recipients_at_data() {
    let s = Scripts::new("redirect");
    let set = load(&s, "data", "redirect \"archive@example.com\";\n");
    let out = run_data(&set, SieveExtras::default());
    assert_eq!(
        out.modifications,
        vec![
            Modification::RemoveRecipient {
                address: "b@example.net".into()
            },
            Modification::AddRecipient {
                address: "archive@example.com".into()
            },
        ]
    );
}

#[test]
fn include_from_the_directory() {
    let s = Scripts::new("include");
    s.file(
        "common.sieve",
        "require \"reject\";\nreject \"from include\";\n",
    );
    let set = load(
        &s,
        "rcpt",
        "require \"include\";\ninclude :global \"common\";\n",
    );
    let v = run_rcpt(&set, "x@example.net").expect("run").verdict;
    assert!(
        matches!(&v, Verdict::Reject(r) if r.text == "from include"),
        "{v:?}"
    );
}

#[test]
fn a_loop_is_stopped_by_the_instruction_limit() {
    let s = Scripts::new("loop");
    let path = s.file(
        "rcpt.sieve",
        r#"require ["variables", "vnd.stalwart.while"];
set "i" "0";
while "true" { set "i" "${i}1"; }
"#,
    );
    let cfg = SieveConfig {
        rcpt: Some(path.clone()),
        ..Default::default()
    };
    let set = SieveSet::load(&cfg, "h", Arc::default()).expect("load");
    assert_eq!(run_rcpt(&set, "x@example.net"), Err(SieveRunError::Limit));
}

#[test]
fn compile_errors_name_file_and_line() {
    let s = Scripts::new("compile");
    let path = s.file(
        "rcpt.sieve",
        "require \"reject\";\n\nif header :bogus \"x\" { keep; }\n",
    );
    let cfg = SieveConfig {
        rcpt: Some(path.clone()),
        ..Default::default()
    };
    let e = SieveSet::load(&cfg, "h", Arc::default()).expect_err("compile error");
    let text = e.to_string();
    assert!(
        text.starts_with(&format!("{}: line 3,", path.display())),
        "{text}"
    );
    assert_eq!(e.key(), "rcpt");
}

#[test]
fn reply_texts_are_parsed() {
    assert_eq!(
        reject_verdict("554 5.7.0 go away"),
        Verdict::Reject(FilterReply {
            code: 554,
            enhanced: Some("5.7.0".into()),
            text: "go away".into()
        })
    );
    assert_eq!(
        reject_verdict("421 slow down"),
        Verdict::Tempfail(FilterReply {
            code: 421,
            enhanced: Some("4.7.1".into()),
            text: "slow down".into()
        })
    );
    // A code-like word that is not a code stays text; control characters go.
    assert_eq!(
        reject_verdict("6000 bad\r\nInjected"),
        Verdict::Reject(FilterReply {
            code: 550,
            enhanced: Some("5.7.1".into()),
            text: "6000 bad  Injected".into()
        })
    );
}
