//! The milter client (engine/src/milter, policy/src/milter) against real
//! milters: a pymilter script (tests/py/test_milter.py, Debian python3-milter)
//! over TCP and a unix socket, and rspamd's milter (proxy worker). The first
//! tests drive `MilterSession` on a glommio executor and assert every verdict
//! and modification decoded from the milter's replies; the last ones run the
//! `sluice` binary with `[[server.listener.smtp.milter]]` and check the
//! replies its SMTP clients get and the bytes the next hop receives.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use sluice_engine::config::milter::{MilterConfig, MilterSocket, MILTER_STAGES};
use sluice_engine::config::HumanDuration;
use sluice_engine::milter::MilterSession;
use sluice_policy::milter::SessionExtras;
use sluice_policy::stage::{
    ClientFacts, FilterOutcome, FilterReply, Modification, OnFailure, Stage, StageEvent, Verdict,
};
use sluice_testkit::*;

const PYMILTER: &str = "/usr/lib/python3/dist-packages/Milter/__init__.py";

fn block_on<T>(fut: impl std::future::Future<Output = T>) -> T {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 * 1024)
        .make()
        .expect("glommio executor")
        .run(fut)
}

fn config(socket: MilterSocket, on_failure: OnFailure) -> MilterConfig {
    MilterConfig {
        name: "test".into(),
        socket,
        connect_timeout: HumanDuration(Duration::from_secs(10)),
        command_timeout: HumanDuration(Duration::from_secs(20)),
        stage_timeout: HumanDuration(Duration::from_secs(60)),
        on_failure,
        stages: MILTER_STAGES.to_vec(),
    }
}

fn facts() -> ClientFacts {
    ClientFacts {
        listener: "smtp".into(),
        ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)),
        port: 41000,
        ptr: Some("client.example".into()),
        helo: Some("client.example".into()),
        tls: Some(("TLSv1.3".into(), "TLS13_AES_128_GCM_SHA256".into())),
        auth_user: Some("alice".into()),
        server_name: "mx.example.net".into(),
    }
}

fn extras() -> SessionExtras {
    SessionExtras {
        local_addr: Some(SocketAddr::from(([127, 0, 0, 1], 25))),
        auth_type: Some("PLAIN".into()),
    }
}

/// An event with the envelope so far.
struct Tx {
    sender: String,
    rcpts: Vec<String>,
}

impl Tx {
    fn new(sender: &str) -> Tx {
        Tx {
            sender: sender.into(),
            rcpts: Vec::new(),
        }
    }
    fn event<'a>(
        &'a self,
        stage: Stage,
        c: &'a ClientFacts,
        rcpt: Option<&'a str>,
        msg: Option<&'a [u8]>,
    ) -> StageEvent<'a> {
        StageEvent {
            stage,
            client: c,
            queue_id: Some("Q1"),
            sender: Some(&self.sender),
            sender_params: &[],
            recipient: rcpt,
            recipients: &self.rcpts,
            message: msg,
        }
    }
}

/// The pymilter test milter on `spec`; ready once `ready_probe` holds.
fn start_pymilter(spec: &str, ready_probe: impl Fn() -> bool) -> ChildGuard {
    let child = Command::new("/usr/bin/python3")
        .arg(py_script("test_milter.py"))
        .arg(spec)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start test_milter.py");
    let mut guard = ChildGuard::new(child, "test_milter.py");
    wait_until(
        "the test milter to listen",
        Duration::from_secs(20),
        || {
            assert!(guard.is_running(), "test_milter.py exited");
            ready_probe()
        },
        String::new,
    );
    guard
}

fn start_tcp_pymilter() -> (ChildGuard, SocketAddr) {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let guard = start_pymilter(&format!("inet:{port}@127.0.0.1"), || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    });
    (guard, addr)
}

fn reply(code: u16, enhanced: &str, text: &str) -> FilterReply {
    FilterReply {
        code,
        enhanced: Some(enhanced.into()),
        text: text.into(),
    }
}

fn header_added<'a>(o: &'a FilterOutcome, name: &str) -> &'a str {
    o.modifications
        .iter()
        .find_map(|m| match m {
            Modification::AddHeader { name: n, value, .. } if n == name => Some(value.as_str()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {name} added: {:?}", o.modifications))
}

#[test]
fn pymilter_envelope_verdicts_and_every_modification() {
    require_tools!(PYMILTER);
    let (_milter, addr) = start_tcp_pymilter();
    let c = facts();
    let body: Vec<u8> = b"0123456789abcdef\r\n".repeat(8000); // 144 000 bytes: three body chunks
    let mut message = b"Subject: hello\r\nX-Remove-Me: yes\r\nFrom: a@example.org\r\n\r\n".to_vec();
    message.extend_from_slice(&body);
    block_on(async {
        let mut m = MilterSession::open(
            &config(MilterSocket::Inet(addr), OnFailure::Tempfail),
            &c,
            extras(),
            50 << 20,
        )
        .await;
        assert!(!m.is_failed(), "connected and negotiated");
        let mut tx = Tx::new("a@example.org");
        for stage in [Stage::Connect, Stage::Ehlo, Stage::Mail] {
            let o = m.at_stage(&tx.event(stage, &c, None, None)).await.unwrap();
            assert_eq!(o, FilterOutcome::accept(), "{stage}");
        }
        tx.rcpts.push("b@example.com".into());
        let o = m
            .at_stage(&tx.event(Stage::Rcpt, &c, Some("b@example.com"), None))
            .await
            .unwrap();
        assert_eq!(o.verdict, Verdict::Accept);
        let o = m
            .at_stage(&tx.event(Stage::Rcpt, &c, Some("tempfail@example.com"), None))
            .await
            .unwrap();
        assert_eq!(
            o.verdict,
            Verdict::Tempfail(reply(451, "4.7.1", "Recipient deferred by test milter"))
        );
        let o = m
            .at_stage(&tx.event(Stage::Data, &c, None, Some(&message)))
            .await
            .unwrap();
        assert_eq!(o.verdict, Verdict::Accept);
        let macros = header_added(&o, "X-Macros");
        for want in [
            "j=mx.example.net",
            "{daemon_name}=smtp",
            "_=client.example [192.0.2.9]",
            "{if_addr}=127.0.0.1",
            "{tls_version}=TLSv1.3",
            "i=Q1",
            "{auth_authen}=alice",
            "{mail_addr}=a@example.org",
            "{rcpt_addr}=tempfail@example.com",
            "helo=client.example",
            "client=192.0.2.9:41000",
        ] {
            assert!(macros.contains(want), "{want} in {macros}");
        }
        assert_eq!(
            header_added(&o, "X-Body-Len"),
            format!("{} headers=3", body.len()),
            "the whole body and every header reached the milter"
        );
        let rest: Vec<&Modification> = o
            .modifications
            .iter()
            .filter(|m| {
                !matches!(
                    m,
                    Modification::AddHeader {
                        index: Some(usize::MAX),
                        ..
                    }
                )
            })
            .collect();
        assert_eq!(
            rest,
            vec![
                &Modification::AddHeader {
                    name: "X-First".into(),
                    value: "inserted".into(),
                    index: Some(0)
                },
                &Modification::ChangeHeader {
                    name: "Subject".into(),
                    occurrence: 1,
                    value: "[milter] hello".into()
                },
                &Modification::ChangeHeader {
                    name: "X-Remove-Me".into(),
                    occurrence: 1,
                    value: String::new()
                },
                &Modification::AddRecipient {
                    address: "added@example.com".into()
                },
                &Modification::RemoveRecipient {
                    address: "removed@example.com".into()
                },
                &Modification::ChangeSender {
                    address: "changed@example.org".into()
                },
                &Modification::ReplaceBody {
                    body: b"replaced body\r\nsecond chunk\r\n".to_vec()
                },
            ]
        );
        // A second transaction on the same connection: the sender refused.
        let tx = Tx::new("reject@example.org");
        let o = m
            .at_stage(&tx.event(Stage::Mail, &c, None, None))
            .await
            .unwrap();
        assert_eq!(
            o.verdict,
            Verdict::Reject(reply(550, "5.7.1", "Sender refused by test milter"))
        );
        m.abort().await;
        // And a third after RSET goes through.
        let tx = Tx::new("ok@example.org");
        let o = m
            .at_stage(&tx.event(Stage::Mail, &c, None, None))
            .await
            .unwrap();
        assert_eq!(o.verdict, Verdict::Accept);
        m.quit().await;
    });
}

#[test]
fn pymilter_over_unix_socket_discard_and_quarantine() {
    require_tools!(PYMILTER);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("milter.sock");
    let probe = path.clone();
    let _milter = start_pymilter(&format!("unix:{}", path.display()), move || {
        std::os::unix::net::UnixStream::connect(&probe).is_ok()
    });
    let c = facts();
    block_on(async {
        let mut m = MilterSession::open(
            &config(MilterSocket::Unix(path.clone()), OnFailure::Tempfail),
            &c,
            extras(),
            50 << 20,
        )
        .await;
        assert!(!m.is_failed());
        // Asked only at RCPT and DATA: connect, helo and mail are caught up.
        let mut tx = Tx::new("a@example.org");
        tx.rcpts.push("discard@example.com".into());
        let o = m
            .at_stage(&tx.event(Stage::Rcpt, &c, Some("discard@example.com"), None))
            .await
            .unwrap();
        assert_eq!(o.verdict, Verdict::Accept, "discard waits for the message");
        let msg = b"Subject: x\r\n\r\nbody\r\n";
        let o = m
            .at_stage(&tx.event(Stage::Data, &c, None, Some(msg)))
            .await
            .unwrap();
        assert_eq!(o, FilterOutcome::with_verdict(Verdict::Discard));
        // Next message: quarantined, with its changes.
        let mut tx = Tx::new("a@example.org");
        tx.rcpts.push("b@example.com".into());
        let o = m
            .at_stage(&tx.event(Stage::Mail, &c, None, None))
            .await
            .unwrap();
        assert_eq!(o.verdict, Verdict::Accept);
        let msg = b"Subject: please quarantine me\r\n\r\nbody\r\n";
        let o = m
            .at_stage(&tx.event(Stage::Data, &c, None, Some(msg)))
            .await
            .unwrap();
        assert_eq!(
            o.verdict,
            Verdict::Quarantine {
                reason: "test milter quarantine".into()
            }
        );
        assert!(o.modifications.contains(&Modification::ChangeSender {
            address: "changed@example.org".into()
        }));
        m.quit().await;
    });
}

#[test]
fn unreachable_and_silent_milters_follow_on_failure() {
    let c = facts();
    let tx = Tx::new("a@example.org");
    // Nothing listens on this port.
    let port = free_port();
    let refused = MilterSocket::Inet(SocketAddr::from(([127, 0, 0, 1], port)));
    // A listener that accepts (the kernel does) but never answers OPTNEG.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    block_on(async {
        let mut m = MilterSession::open(
            &config(refused.clone(), OnFailure::Tempfail),
            &c,
            extras(),
            1 << 20,
        )
        .await;
        assert!(m.is_failed());
        let o = m.consult(&tx.event(Stage::Mail, &c, None, None)).await;
        assert_eq!(
            o.verdict,
            Verdict::Tempfail(reply(
                451,
                "4.3.0",
                "Message filter unavailable, try again later"
            ))
        );
        let mut m =
            MilterSession::open(&config(refused, OnFailure::Accept), &c, extras(), 1 << 20).await;
        assert_eq!(
            m.consult(&tx.event(Stage::Mail, &c, None, None)).await,
            FilterOutcome::accept()
        );

        let mut cfg = config(MilterSocket::Inet(silent_addr), OnFailure::Tempfail);
        cfg.connect_timeout = HumanDuration(Duration::from_millis(300));
        let started = Instant::now();
        let mut m = MilterSession::open(&cfg, &c, extras(), 1 << 20).await;
        let waited = started.elapsed();
        assert!(m.is_failed(), "no OPTNEG reply: failed");
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert!(matches!(
            m.consult(&tx.event(Stage::Mail, &c, None, None))
                .await
                .verdict,
            Verdict::Tempfail(_)
        ));
    });
    drop(silent);
}

/// rspamd started by the test: its own config in a temporary directory, a
/// proxy worker in milter mode scanning itself, two test symbols keyed on the
/// Subject. SIGTERM on drop (the main process stops its workers), then the
/// ChildGuard's SIGKILL if it is still there.
struct Rspamd {
    guard: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Drop for Rspamd {
    fn drop(&mut self) {
        if self.guard.is_running() {
            // SAFETY: kill(2) on the pid of a child we own and have not reaped.
            unsafe {
                libc::kill(self.guard.pid() as libc::pid_t, libc::SIGTERM);
            }
            let _ = self.guard.wait_timeout(Duration::from_secs(15));
        }
    }
}

fn start_rspamd(port: u16) -> Rspamd {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("db")).unwrap();
    std::fs::write(
        d.join("rules.lua"),
        r#"
for name, score in pairs({ SLUICE_TEST_REJECT = 20.0, SLUICE_TEST_SPAM = 8.0 }) do
  local needle = name == 'SLUICE_TEST_REJECT' and 'rspamd%-reject' or 'rspamd%-spam'
  rspamd_config:register_symbol{
    name = name, score = score, group = 'sluice',
    callback = function(task)
      return (task:get_subject() or ''):find(needle) ~= nil
    end
  }
end
"#,
    )
    .unwrap();
    let conf = format!(
        r#"options {{ pidfile = "{d}/rspamd.pid"; dbdir = "{d}/db"; tempdir = "{d}"; filters = ""; }}
logging {{ type = "console"; level = "error"; }}
actions {{ reject = 15; add_header = 6; }}
lua = "{d}/rules.lua";
worker "rspamd_proxy" {{
  bind_socket = "127.0.0.1:{port}";
  milter = yes;
  timeout = 60s;
  count = 1;
  upstream "local" {{ default = yes; self_scan = yes; }}
}}
"#,
        d = d.display()
    );
    std::fs::write(d.join("rspamd.conf"), conf).unwrap();
    let child = Command::new("rspamd")
        .args(["-f", "-u", "root", "-g", "root", "-c"])
        .arg(d.join("rspamd.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start rspamd");
    let mut r = Rspamd {
        guard: ChildGuard::new(child, "rspamd"),
        _dir: dir,
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // rspamd compiles its URL suffix list at start: ~20 s on a busy box.
    wait_until(
        "rspamd's milter to listen",
        Duration::from_secs(120),
        || {
            assert!(r.guard.is_running(), "rspamd exited");
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        },
        String::new,
    );
    r
}

#[test]
fn rspamd_milter_rejects_marks_and_accepts() {
    require_tools!("rspamd");
    let port = free_port();
    let _rspamd = start_rspamd(port);
    let c = facts();
    let socket = MilterSocket::Inet(SocketAddr::from(([127, 0, 0, 1], port)));
    block_on(async {
        let mut m =
            MilterSession::open(&config(socket, OnFailure::Tempfail), &c, extras(), 50 << 20).await;
        assert!(!m.is_failed(), "negotiated with rspamd");
        let outcome_for = |subject: &str| {
            format!("From: a@example.org\r\nTo: b@example.com\r\nSubject: {subject}\r\nMessage-ID: <1@example.org>\r\nDate: Sun, 6 Dec 2026 04:00:00 +0000\r\n\r\nHello.\r\n")
        };
        let mut results = Vec::new();
        for subject in ["rspamd-reject now", "rspamd-spam here", "plain hello"] {
            let mut tx = Tx::new("a@example.org");
            tx.rcpts.push("b@example.com".into());
            let msg = outcome_for(subject);
            let o = m
                .at_stage(&tx.event(Stage::Data, &c, None, Some(msg.as_bytes())))
                .await
                .unwrap();
            results.push(o);
        }
        m.quit().await;
        eprintln!("rspamd outcomes: {results:#?}");
        assert_eq!(
            results[0].verdict,
            Verdict::Reject(reply(554, "5.7.1", "Spam message rejected"))
        );
        assert_eq!(results[1].verdict, Verdict::Accept);
        assert!(
            results[1].modifications.iter().any(|m| matches!(m,
                Modification::AddHeader { name, value, .. } | Modification::ChangeHeader { name, value, .. }
                    if name.eq_ignore_ascii_case("X-Spam") && value.contains("Yes"))),
            "spam marked: {:?}",
            results[1]
        );
        assert_eq!(results[2].verdict, Verdict::Accept);
        assert!(
            !results[2].modifications.iter().any(|m| matches!(m,
                Modification::AddHeader { name, value, .. } | Modification::ChangeHeader { name, value, .. }
                    if name.eq_ignore_ascii_case("X-Spam") && value.contains("Yes"))),
            "ham not marked: {:?}",
            results[2]
        );
    });
}

// ---- Milters called by the relay's SMTP sessions (the real `sluice` binary) ----

const T: Duration = Duration::from_secs(30);
const PASSWORD: &str = "milter test password";

/// The next hop for far.test and example.com.
fn hop_and_route() -> (ScriptedServer, Vec<String>) {
    routed_hop(&["far.test", "example.com"])
}

fn relay_with(milter: &str, sets: &[String], dir: Option<tempfile::TempDir>) -> Relay {
    let mut b = Relay::builder()
        .set("server.hostname=\"mx.sluice.test\"")
        .set(format!("auth.users.alice=\"{}\"", hash_password(PASSWORD)))
        .lset("auth_plaintext", "true")
        .lset("milter", milter);
    for s in sets {
        b = b.set(s.clone());
    }
    if let Some(dir) = dir {
        b = b.dir(dir);
    }
    b.start()
}

fn auth_plain(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    format!("AUTH PLAIN {token}")
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

#[test]
fn relay_sessions_consult_pymilter_and_apply_its_changes() {
    require_tools!(PYMILTER);
    let (_milter, maddr) = start_tcp_pymilter();
    let (hop, mut sets) = hop_and_route();
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("api.token");
    std::fs::write(&token, "milter-test-token-0123456789abcdef\n").expect("token");
    sets.push(format!("admin.token_file=\"{}\"", token.display()));
    let relay = relay_with(
        &format!("[{{name=\"py\",socket=\"inet:{maddr}\"}}]"),
        &sets,
        Some(dir),
    );

    // Refusals at MAIL and RCPT with the milter's own replies.
    let mut c = relay.session();
    let r = c.cmd(&auth_plain("alice", PASSWORD));
    assert_eq!(r.code, 235, "{r:?}");
    let r = c.cmd("MAIL FROM:<reject@snd.test>");
    assert_eq!(
        (r.code, r.last()),
        (550, "550 5.7.1 Sender refused by test milter")
    );
    // A transaction given up by RSET: the milter is told ABORT.
    c.expect("MAIL FROM:<a@snd.test>", 250);
    c.expect("RCPT TO:<bob@far.test>", 250);
    c.expect("RSET", 250);
    c.expect("MAIL FROM:<a@snd.test>", 250);
    let r = c.cmd("RCPT TO:<refused@far.test>");
    assert_eq!(
        (r.code, r.last()),
        (550, "550 5.1.1 Recipient refused by test milter")
    );
    let r = c.cmd("RCPT TO:<tempfail@far.test>");
    assert_eq!(
        (r.code, r.last()),
        (451, "451 4.7.1 Recipient deferred by test milter")
    );
    c.expect("RCPT TO:<bob@far.test>", 250);
    c.expect("RCPT TO:<removed@example.com>", 250);
    let r = data(&mut c, "hello");
    assert_eq!(r.code, 250, "{r:?}");
    let id = queued_id(&r.text()).expect("queued id");
    // Quarantined by the milter: accepted and held.
    c.expect("MAIL FROM:<a@snd.test>", 250);
    c.expect("RCPT TO:<held@far.test>", 250);
    let r = data(&mut c, "please quarantine");
    assert_eq!(r.code, 250, "{r:?}");
    let held = queued_id(&r.text()).expect("held id");
    // Discarded at RCPT: the whole message goes, answered as accepted.
    c.expect("MAIL FROM:<a@snd.test>", 250);
    c.expect("RCPT TO:<carol@far.test>", 250);
    c.expect("RCPT TO:<discard@far.test>", 250);
    let r = data(&mut c, "discard me");
    assert_eq!(r.code, 250, "{r:?}");
    c.expect("QUIT", 221);

    wait_until(
        "the modified message at the next hop",
        T,
        || !hop.messages().is_empty(),
        || relay.log(),
    );
    let msgs = hop.messages();
    assert_eq!(msgs.len(), 1, "only the first message leaves: {msgs:?}");
    let m = &msgs[0];
    assert!(m.mail.contains("<changed@example.org>"), "{}", m.mail);
    assert_eq!(m.rcpt_addresses(), ["added@example.com", "bob@far.test"]);
    let body = m.body_text();
    assert!(body.starts_with("X-First: inserted\r\n"), "{body}");
    assert!(body.contains("\r\nSubject: [milter] hello\r\n"), "{body}");
    assert!(!body.contains("X-Remove-Me"), "{body}");
    // SMFIR_ADDHEADER appends (as Sendmail and Postfix do): after the Subject.
    let header_block = body.split("\r\n\r\n").next().unwrap_or_default();
    let subject_at = header_block.find("\r\nSubject:").expect("Subject");
    let macros_at = header_block.find("\r\nX-Macros:").expect("X-Macros");
    assert!(
        macros_at > subject_at,
        "added fields go last: {header_block}"
    );
    assert!(
        body.ends_with("\r\n\r\nreplaced body\r\nsecond chunk\r\n"),
        "{body}"
    );
    let macros = body
        .lines()
        .find_map(|l| l.strip_prefix("X-Macros: "))
        .expect("X-Macros");
    for want in [
        "j=mx.sluice.test".to_string(),
        "{daemon_name}=smtp".into(),
        format!("{{if_addr}}={}", relay.addr().ip()),
        "{auth_authen}=alice".into(),
        "{auth_type}=PLAIN".into(),
        format!("i={id}"),
        "aborts=1".into(),
        "helo=client.test".into(),
    ] {
        assert!(macros.contains(&want), "{want} in {macros}");
    }
    // The held message stays (and nothing else): the discarded one was never stored.
    wait_until("one message left", T, || relay.count() == 1, || relay.log());
    let show = relay.show(&held);
    assert!(show.contains("held"), "{show}");
    assert_eq!(hop.messages().len(), 1);
}

#[test]
fn rspamd_marks_mail_the_relay_delivers() {
    require_tools!("rspamd");
    let port = free_port();
    let _rspamd = start_rspamd(port);
    let (hop, sets) = hop_and_route();
    let relay = relay_with(
        &format!("[{{name=\"rspamd\",socket=\"inet:127.0.0.1:{port}\",stages=[\"data\"]}}]"),
        &sets,
        None,
    );
    let mut c = relay.session();
    c.expect("MAIL FROM:<a@snd.test>", 250);
    c.expect("RCPT TO:<bob@far.test>", 250);
    let r = data(&mut c, "rspamd-reject now");
    assert_eq!(r.code, 554, "{r:?}");
    c.expect("MAIL FROM:<a@snd.test>", 250);
    c.expect("RCPT TO:<bob@far.test>", 250);
    let r = data(&mut c, "rspamd-spam here");
    assert_eq!(r.code, 250, "{r:?}");
    c.expect("QUIT", 221);
    wait_until(
        "the marked message at the next hop",
        T,
        || !hop.messages().is_empty(),
        || relay.log(),
    );
    let body = hop.messages()[0].body_text();
    assert!(body.contains("Subject: rspamd-spam here"), "{body}");
    assert!(
        body.lines()
            .any(|l| l.to_ascii_lowercase().starts_with("x-spam: yes")),
        "rspamd's header on the delivered bytes: {body}"
    );
    wait_until(
        "the spool to empty",
        T,
        || relay.count() == 0,
        || relay.log(),
    );
}

#[test]
fn a_milter_that_is_down_follows_on_failure() {
    // Nothing listens on this port.
    let dead = free_port();
    let (hop, sets) = hop_and_route();

    let relay = relay_with(
        &format!("[{{name=\"down\",socket=\"inet:127.0.0.1:{dead}\",stages=[\"rcpt\",\"data\"]}}]"),
        &sets,
        None,
    );
    let mut c = relay.session();
    c.expect("MAIL FROM:<a@snd.test>", 250);
    let r = c.cmd("RCPT TO:<bob@far.test>");
    assert_eq!((r.code, r.enhanced()), (451, "4.3.0"), "{r:?}");
    c.expect("QUIT", 221);
    assert_eq!(relay.count(), 0);
    drop(relay);

    let relay = relay_with(
        &format!("[{{name=\"down\",socket=\"inet:127.0.0.1:{dead}\",on_failure=\"accept\"}}]"),
        &sets,
        None,
    );
    let mut c = relay.session();
    c.expect("MAIL FROM:<a@snd.test>", 250);
    c.expect("RCPT TO:<bob@far.test>", 250);
    let r = data(&mut c, "unfiltered");
    assert_eq!(r.code, 250, "{r:?}");
    c.expect("QUIT", 221);
    wait_until(
        "delivery without the milter",
        T,
        || !hop.messages().is_empty(),
        || relay.log(),
    );
    assert!(hop.messages()[0]
        .body_text()
        .contains("Subject: unfiltered"));
}
