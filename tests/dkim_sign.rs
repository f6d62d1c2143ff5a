//! DKIM signing end to end, with real parts only: keys made by `sluice dkim
//! keygen`, their TXT records served by a real NSD on loopback, the real relay
//! signing at acceptance and delivering by MX to the loadgen sink, and the
//! signatures checked by dkimpy (python3-dkim) asking that NSD. OpenDKIM's
//! `opendkim-testkey` checks the published RSA records against the private
//! keys through the same NSD (its libunbound resolver takes a forwarder with a
//! port; it does not handle Ed25519 keys). OpenDKIM's filter itself, run in
//! its test mode (`opendkim -t FILE`, verifying), checks the signatures of
//! the delivered messages through that resolver configuration too, RSA and
//! Ed25519. (`opendkim-testmsg` cannot be used for that: it verifies through
//! the system resolver, res_query on port 53 only.)

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);
const DOMAIN: &str = "snd.dlv.test";

/// dkimpy and dnspython are Debian packages: the system interpreter has them
/// even where `python3` on PATH is another one.
fn system_python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

struct Key {
    path: PathBuf,
    /// The zone-file line keygen printed.
    record: String,
}

fn keygen(dir: &Path, selector: &str, algorithm: &str) -> Key {
    let out = sluice(&[
        "dkim",
        "keygen",
        "--domain",
        DOMAIN,
        "--selector",
        selector,
        "--algorithm",
        algorithm,
        "--out",
        &dir.display().to_string(),
    ]);
    assert_ok(&out, "sluice dkim keygen");
    let record = text(&out.stdout).trim().to_string();
    let path = dir.join(format!("{DOMAIN}.{selector}.pem"));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", path.display());
    let k = if algorithm == "rsa" { "rsa" } else { "ed25519" };
    assert!(
        record.starts_with(&format!(
            "{selector}._domainkey.{DOMAIN}. IN TXT \"v=DKIM1; k={k}; p="
        )),
        "{record}"
    );
    // Character-strings of at most 255 bytes.
    for s in record.split('"').skip(1).step_by(2) {
        assert!(s.len() <= 255, "{record}");
    }
    // Never over an existing key.
    let again = sluice(&[
        "dkim",
        "keygen",
        "--domain",
        DOMAIN,
        "--selector",
        selector,
        "--algorithm",
        algorithm,
        "--out",
        &dir.display().to_string(),
    ]);
    assert!(
        !again.status.success(),
        "keygen overwrote {}",
        path.display()
    );
    Key { path, record }
}

/// The TXT text of a keygen line, its strings joined.
fn record_text(line: &str) -> String {
    line.split('"').skip(1).step_by(2).collect()
}

/// dkimpy's verdict on each signature of each message.
fn verify(nsd: &Nsd, messages: &[&[u8]]) -> Vec<Vec<Value>> {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        py_script("dkim_verify.py").display().to_string(),
        nsd.addr.port().to_string(),
    ];
    for (i, m) in messages.iter().enumerate() {
        let p = dir.path().join(format!("{i}.eml"));
        std::fs::write(&p, m).unwrap();
        args.push(p.display().to_string());
    }
    let out = run_with_timeout(Command::new(system_python()).args(&args), T);
    assert_ok(&out, "dkim_verify.py");
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Vec<Value>>(l).unwrap())
        .collect()
}

fn served_txt(nsd: &Nsd, name: &str) -> String {
    let out = run_with_timeout(
        Command::new(system_python())
            .arg(py_script("dkim_verify.py"))
            .arg(nsd.addr.port().to_string())
            .args(["--txt", name]),
        T,
    );
    assert_ok(&out, "dkim_verify.py --txt");
    text(&out.stdout).trim().to_string()
}

/// A libunbound configuration for OpenDKIM that asks only the test's NSD.
fn opendkim_resolver_conf(nsd: &Nsd, dir: &Path) -> PathBuf {
    let unbound = dir.join("unbound.conf");
    std::fs::write(
        &unbound,
        format!(
            // unbound answers the RFC 6761 names (test.) itself unless told not to.
            "server:\n  do-not-query-localhost: no\n  module-config: \"iterator\"\n\
             local-zone: \"test.\" nodefault\n  domain-insecure: \"test.\"\n\
             forward-zone:\n  name: \".\"\n  forward-addr: 127.0.0.1@{}\n",
            nsd.addr.port()
        ),
    )
    .unwrap();
    unbound
}

/// opendkim-testkey: the record NSD serves matches the private key.
fn opendkim_testkey(nsd: &Nsd, dir: &Path, selector: &str, key: &Path) {
    let unbound = opendkim_resolver_conf(nsd, dir);
    let conf = dir.join("opendkim.conf");
    std::fs::write(
        &conf,
        format!("ResolverConfiguration {}\n", unbound.display()),
    )
    .unwrap();
    let out = run_with_timeout(
        // Debian installs it in /usr/sbin, which may not be on PATH.
        Command::new("/usr/sbin/opendkim-testkey")
            .args(["-vvv", "-d", DOMAIN, "-s", selector, "-k"])
            .arg(key)
            .arg("-x")
            .arg(&conf),
        T,
    );
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "opendkim-testkey {selector}:\n{all}");
    assert!(
        all.contains("key OK"),
        "opendkim-testkey {selector}:\n{all}"
    );
}

/// OpenDKIM's filter verifying a message in its test mode (`opendkim -t`),
/// keys fetched from the test's NSD: "SELECTOR RESULT" for each DKIM result
/// in the Authentication-Results field it would add, sorted.
fn opendkim_verify(nsd: &Nsd, message: &[u8]) -> Vec<String> {
    // The filter refuses a configuration under a directory others can write
    // (such as /tmp), so its files live under target/.
    let dir = tempfile::Builder::new()
        .prefix("opendkim-")
        .tempdir_in(repo_root().join("target"))
        .unwrap();
    let unbound = opendkim_resolver_conf(nsd, dir.path());
    let conf = dir.path().join("opendkim.conf");
    std::fs::write(
        &conf,
        format!(
            "Mode v\nResolverConfiguration {}\nUserID root\nSyslog no\nAlwaysAddARHeader yes\n",
            unbound.display()
        ),
    )
    .unwrap();
    let eml = dir.path().join("message.eml");
    std::fs::write(&eml, message).unwrap();
    // -vv prints the header fields the filter would insert.
    let out = run_with_timeout(
        Command::new("/usr/sbin/opendkim")
            .arg("-x")
            .arg(&conf)
            .arg("-vv")
            .arg("-t")
            .arg(&eml),
        T,
    );
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "opendkim -t:\n{all}");
    let field = all
        .split("hname='Authentication-Results' hvalue='")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or_else(|| panic!("no Authentication-Results from opendkim:\n{all}"));
    // Comments such as "(2048-bit key; unprotected key)" hold semicolons too.
    let mut depth = 0;
    let field: String = field
        .chars()
        .filter(|c| {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    return false;
                }
                _ => {}
            }
            depth == 0
        })
        .collect();
    let mut results: Vec<String> = field
        .split(';')
        .map(str::trim)
        .filter_map(|m| m.strip_prefix("dkim="))
        .map(|m| {
            let result = m.split_whitespace().next().unwrap_or("?");
            let selector = m
                .split_whitespace()
                .find_map(|p| p.strip_prefix("header.s="))
                .unwrap_or("?");
            format!("{selector} {result}")
        })
        .collect();
    results.sort();
    results
}

struct Setup {
    dir: tempfile::TempDir,
    nsd: Nsd,
    sink: LoadgenSink,
    rsa: Key,
    ed: Key,
    rsa2: Key,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let rsa = keygen(dir.path(), "s1", "rsa");
    let ed = keygen(dir.path(), "e1", "ed25519");
    let rsa2 = keygen(dir.path(), "s2", "rsa");
    let ip = loopback();
    let port = mx_port(&[ip]);
    let nsd = Nsd::start(&format!(
        "rcpt MX 10 mx1\nsnd MX 10 mx1\nmx1 A {ip}\nnull MX 0 .\n{}\n{}\n{}",
        rsa.record, ed.record, rsa2.record
    ));
    let sink = LoadgenSink::start(&[SocketAddr::new(ip.into(), port)], &[]);
    Setup {
        dir,
        nsd,
        sink,
        rsa,
        ed,
        rsa2,
    }
}

fn signers_toml(rsa_selector: &str, rsa_key: &Path, ed: &Key) -> String {
    format!(
        "[dkim.signer.rsa]\ndomain = \"{DOMAIN}\"\nselector = \"{rsa_selector}\"\nkey = \"{}\"\n\
         [dkim.signer.ed]\ndomain = \"{DOMAIN}\"\nselector = \"e1\"\nalgorithm = \"ed25519-sha256\"\nkey = \"{}\"\n\
         [[dkim.rule]]\nmatch.listener = \"dsn\"\nsign = \"ed\"\n\
         [[dkim.rule]]\nmatch.sender = \"rsa@{DOMAIN}\"\nsign = \"rsa\"\n\
         [[dkim.rule]]\nmatch.sender = \"ed@{DOMAIN}\"\nsign = \"ed\"\n\
         [[dkim.rule]]\nmatch.sender_domain = \"{DOMAIN}\"\nsign = [\"rsa\", \"ed\"]\n",
        rsa_key.display(),
        ed.path.display()
    )
}

fn relay(s: &Setup, config: &Path) -> Relay {
    let port = s.sink.listen[0].port();
    Relay::builder()
        .config(config.to_path_buf())
        .cores(1)
        .set("delivery.enabled=true")
        .set("log.format=\"json\"")
        .set(s.nsd.servers_set())
        .set("dns.timeout=\"1s\"")
        .set(format!("delivery.mx_port={port}"))
        .set("queue.default.retry=[\"1s\"]")
        .start()
}

fn message(from: &str, subject: &str) -> Vec<u8> {
    format!(
        "From: Sender <{from}>\r\nTo: someone@rcpt.dlv.test\r\nSubject: {subject}\r\n\
         Date: Sat, 05 Dec 2026 16:00:00 +0000\r\nMessage-ID: <{subject}@{DOMAIN}>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n\
         Hello,  this line has  extra spaces   \r\n\r\nand trailing blank lines\r\n\r\n\r\n"
    )
    .into_bytes()
}

/// Sends one message and returns what the sink saved for it.
fn relay_one(s: &Setup, relay: &Relay, from: &str, subject: &str) -> Vec<u8> {
    let before = s.sink.saved().len();
    submit(
        relay,
        from,
        "",
        &["someone@rcpt.dlv.test"],
        &dot_stuff(&message(from, subject)),
    );
    let saved = s.sink.wait_saved(before + 1, T, relay);
    let m = saved
        .into_iter()
        .find(|m| text(&m.eml).contains(&format!("Subject: {subject}\r\n")))
        .unwrap_or_else(|| panic!("{subject} not at the sink"));
    m.eml
}

fn summary(results: &[Value]) -> Vec<(String, String, bool)> {
    results
        .iter()
        .map(|r| {
            (
                r["a"].as_str().unwrap_or("").to_string(),
                r["s"].as_str().unwrap_or("").to_string(),
                r["pass"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

#[test]
fn rsa_ed25519_and_dual_signatures_verify_with_dkimpy_and_opendkim() {
    require_tools!(
        "nsd",
        "/usr/sbin/opendkim-testkey",
        "/usr/sbin/opendkim",
        "dkimverify"
    );
    let s = setup();
    // What NSD serves is what keygen printed, and OpenDKIM agrees that it
    // belongs to the private key.
    for (selector, key) in [("s1", &s.rsa), ("e1", &s.ed), ("s2", &s.rsa2)] {
        let name = format!("{selector}._domainkey.{DOMAIN}");
        assert_eq!(served_txt(&s.nsd, &name), record_text(&key.record));
    }
    opendkim_testkey(&s.nsd, s.dir.path(), "s1", &s.rsa.path);
    opendkim_testkey(&s.nsd, s.dir.path(), "s2", &s.rsa2.path);
    // (Not e1: opendkim-testkey 2.11 compares RSA keys only, "EVP_PKEY_get1_RSA()
    // failed"; the Ed25519 record is checked by dkimpy below.)

    let config = s.dir.path().join("sluice.toml");
    std::fs::write(&config, signers_toml("s1", &s.rsa.path, &s.ed)).unwrap();
    let relay = relay(&s, &config);

    let rsa = relay_one(&s, &relay, &format!("rsa@{DOMAIN}"), "rsa");
    let ed = relay_one(&s, &relay, &format!("ed@{DOMAIN}"), "ed");
    let dual = relay_one(&s, &relay, &format!("news@{DOMAIN}"), "dual");
    let unsigned = relay_one(&s, &relay, "someone@other.dlv.test", "unsigned");
    // Tampered on the way: a changed body and an added From.
    let body_changed = text(&dual).replace("trailing blank", "trailing BLANK");
    let from_added = format!("From: Mallory <m@evil.test>\r\n{}", text(&dual));
    let results = verify(
        &s.nsd,
        &[
            &rsa,
            &ed,
            &dual,
            &unsigned,
            body_changed.as_bytes(),
            from_added.as_bytes(),
        ],
    );
    let pass = |a: &str, sel: &str| (a.to_string(), sel.to_string(), true);
    let fail = |a: &str, sel: &str| (a.to_string(), sel.to_string(), false);
    assert_eq!(
        summary(&results[0]),
        vec![pass("rsa-sha256", "s1")],
        "{results:?}"
    );
    assert_eq!(
        summary(&results[1]),
        vec![pass("ed25519-sha256", "e1")],
        "{results:?}"
    );
    assert_eq!(
        summary(&results[2]),
        vec![pass("rsa-sha256", "s1"), pass("ed25519-sha256", "e1")],
        "{results:?}"
    );
    assert!(results[3].is_empty(), "{results:?}");
    assert!(!text(&unsigned).contains("DKIM-Signature"));
    for tampered in &results[4..] {
        assert_eq!(
            summary(tampered),
            vec![fail("rsa-sha256", "s1"), fail("ed25519-sha256", "e1")],
            "{results:?}"
        );
    }
    // d= is the signer's domain, and the signature fields lead the message.
    assert!(text(&dual).starts_with("DKIM-Signature: v=1; a=rsa-sha256; s=s1; d=snd.dlv.test;"));
    for r in results.iter().take(3).flatten() {
        assert_eq!(r["d"], DOMAIN, "{results:?}");
    }

    // OpenDKIM's own verifier agrees: every signature sluice made passes,
    // RSA and Ed25519, and the tampered copies fail.
    assert_eq!(opendkim_verify(&s.nsd, &rsa), ["s1 pass"]);
    assert_eq!(opendkim_verify(&s.nsd, &ed), ["e1 pass"]);
    assert_eq!(opendkim_verify(&s.nsd, &dual), ["e1 pass", "s1 pass"]);
    assert_eq!(
        opendkim_verify(&s.nsd, body_changed.as_bytes()),
        ["e1 fail", "s1 fail"]
    );

    // A notice the relay writes (listener "dsn", null sender) is signed by
    // the rule naming that listener: a bounce from a null MX domain.
    let before = s.sink.saved().len();
    submit(
        &relay,
        &format!("rsa@{DOMAIN}"),
        "",
        &["nobody@null.dlv.test"],
        &dot_stuff(&message(&format!("rsa@{DOMAIN}"), "bounced")),
    );
    let saved = s.sink.wait_saved(before + 1, T, &relay);
    let dsn = saved
        .iter()
        .find(|m| m.from().is_empty())
        .unwrap_or_else(|| panic!("no notice at the sink"));
    let results = verify(&s.nsd, &[&dsn.eml]);
    assert_eq!(
        summary(&results[0]),
        vec![pass("ed25519-sha256", "e1")],
        "{results:?}"
    );
    let notices = log_events(&relay, "notification queued");
    assert_eq!(notices.len(), 1, "{}", relay.log());
    assert_eq!(notices[0]["dkim"], "ed", "{}", relay.log());

    // The acceptance log names the signers.
    let signed: Vec<String> = log_events(&relay, "transaction")
        .iter()
        .map(|v| v["dkim"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(
        signed,
        ["rsa", "ed", "rsa,ed", "", "rsa"],
        "{}",
        relay.log()
    );

    // Signatures per signer and the latency histogram, as Prometheus sees them.
    let metrics = relay.metrics();
    for line in [
        "sluice_dkim_signatures_total{signer=\"rsa\"} 3",
        "sluice_dkim_signatures_total{signer=\"ed\"} 3",
        "sluice_dkim_signing_seconds_count{algorithm=\"rsa-sha256\"} 3",
        "sluice_dkim_signing_seconds_count{algorithm=\"ed25519-sha256\"} 3",
        "sluice_dkim_signing_failures_total{signer=\"rsa\"} 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in:\n{metrics}"
        );
    }
}

#[test]
fn sighup_swaps_in_a_new_key_and_a_bad_key_keeps_the_running_one() {
    require_tools!("nsd", "dkimverify");
    let s = setup();
    let config = s.dir.path().join("sluice.toml");
    std::fs::write(&config, signers_toml("s1", &s.rsa.path, &s.ed)).unwrap();
    let relay = relay(&s, &config);
    let first = relay_one(&s, &relay, &format!("rsa@{DOMAIN}"), "before");

    // Rotation: selector s2 with its own key.
    std::fs::write(&config, signers_toml("s2", &s.rsa2.path, &s.ed)).unwrap();
    assert_ok(
        &sluice(&["check-config", &config.display().to_string()]),
        "check-config",
    );
    sighup(&relay);
    wait_log(&relay, "reload: ", 1);
    let rotated = relay_one(&s, &relay, &format!("rsa@{DOMAIN}"), "rotated");

    // A key that does not load: the reload is refused, s2 keeps signing.
    let bad = s.dir.path().join("bad.pem");
    std::fs::write(
        &bad,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    std::fs::write(&config, signers_toml("s3", &bad, &s.ed)).unwrap();
    // check-config loads the keys as the relay does.
    let checked = sluice(&["check-config", &config.display().to_string()]);
    assert!(!checked.status.success(), "check-config passed a bad key");
    assert!(
        text(&checked.stderr).contains("dkim.signer.rsa.key"),
        "{}",
        text(&checked.stderr)
    );
    sighup(&relay);
    let refused = wait_log(&relay, "reload refused", 1);
    assert!(refused.contains("dkim.signer.rsa.key"), "{refused}");
    let kept = relay_one(&s, &relay, &format!("rsa@{DOMAIN}"), "kept");

    let results = verify(&s.nsd, &[&first, &rotated, &kept]);
    let got: Vec<_> = results.iter().map(|r| summary(r)).collect();
    let rsa = |sel: &str| vec![("rsa-sha256".to_string(), sel.to_string(), true)];
    assert_eq!(
        got,
        vec![rsa("s1"), rsa("s2"), rsa("s2")],
        "{}",
        relay.log()
    );
}

fn sighup(relay: &Relay) {
    // SAFETY: kill(2) on the relay child this test started and has not reaped.
    let rc = unsafe { libc::kill(relay.pid() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0, "kill SIGHUP: {}", std::io::Error::last_os_error());
}

/// Waits for the `n`-th log line containing `needle`; returns it.
fn wait_log(relay: &Relay, needle: &str, n: usize) -> String {
    let mut found = String::new();
    wait_until(
        &format!("log line #{n} with {needle:?}"),
        T,
        || {
            let log = relay.log();
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
            if lines.len() >= n {
                found = lines[n - 1].to_string();
                true
            } else {
                false
            }
        },
        || relay.log(),
    );
    found
}

/// The "after relay through Postfix unchanged": a dual-signed message
/// that a real Postfix (a private instance, as Debian ships it) relays on still
/// verifies with dkimpy, and the Received line Postfix adds shows it went
/// through Postfix.
#[test]
fn signatures_still_verify_after_relay_through_postfix() {
    require_tools!("nsd", "dkimverify");
    if !can_run_postfix() {
        return;
    }
    let s = setup();
    let sink_port = free_port();
    let sink = LoadgenSink::start(&[SocketAddr::from(([127, 0, 0, 1], sink_port))], &[]);
    let postfix = PostfixRelay::start(sink_port);
    let config = s.dir.path().join("sluice.toml");
    std::fs::write(&config, signers_toml("s1", &s.rsa.path, &s.ed)).unwrap();
    let relay = Relay::builder()
        .config(config)
        .cores(1)
        .set("delivery.enabled=true")
        .set(s.nsd.servers_set())
        .set(format!(
            "route.default={{type=\"relay\",host=\"127.0.0.1\",port={},tls=\"none\"}}",
            postfix.addr.port()
        ))
        .set("queue.default.retry=[\"1s\"]")
        .start();
    submit(
        &relay,
        &format!("news@{DOMAIN}"),
        "",
        &["someone@rcpt.dlv.test"],
        &dot_stuff(&message(&format!("news@{DOMAIN}"), "via-postfix")),
    );
    let saved = sink.wait_saved(1, T, &relay);
    let eml = text(&saved[0].eml);
    assert!(
        eml.starts_with("Received: from ") && eml.contains("by bench-postfix.localdomain"),
        "not relayed by the test's Postfix:\n{eml}\nmaillog:\n{}",
        postfix.maillog_text()
    );
    let results = verify(&s.nsd, &[&saved[0].eml]);
    let pass = |a: &str, sel: &str| (a.to_string(), sel.to_string(), true);
    assert_eq!(
        summary(&results[0]),
        vec![pass("rsa-sha256", "s1"), pass("ed25519-sha256", "e1")],
        "{results:?}\n{eml}"
    );
}
