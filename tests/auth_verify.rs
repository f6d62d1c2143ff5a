//! Inbound authentication end to end, with real parts only: zones served by a
//! real NSD on loopback (with a `test.` parent, so DMARC's tree walk gets
//! NXDOMAIN like on the Internet, and `broken.test` answering SERVFAIL), the
//! real relay with `[server.listener.smtp.verify]`, clients presenting other
//! addresses through the PROXY protocol (our raw client and swaks), and the
//! reference implementations asked through the same NSD: pyspf for SPF,
//! dkimpy for DKIM signatures (`dkim.sign`, keys from `dknewkey`) and ARC
//! (`arc_sign`, `arc_verify`), see tests/py/auth_tool.py.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sluice_testkit::*;

const T: Duration = Duration::from_secs(30);
const RCPT: &str = "user@rcpt.test";

fn system_python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn tool(args: &[&str]) -> String {
    let out = run_with_timeout(
        Command::new(system_python())
            .arg(py_script("auth_tool.py"))
            .args(args),
        T,
    );
    assert_ok(&out, &format!("auth_tool.py {args:?}"));
    text(&out.stdout)
}

fn tool_bytes(args: &[&str]) -> Vec<u8> {
    let out = run_with_timeout(
        Command::new(system_python())
            .arg(py_script("auth_tool.py"))
            .args(args),
        T,
    );
    assert_ok(&out, &format!("auth_tool.py {args:?}"));
    out.stdout
}

/// A TXT record in zone-file syntax: strings of at most 200 bytes.
fn txt(owner: &str, value: &str) -> String {
    let parts: Vec<String> = value
        .as_bytes()
        .chunks(200)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!("{owner} TXT {}\n", parts.join(" "))
}

/// A relay verifying on its "smtp" listener, taking PROXY headers from
/// loopback, accepting mail for rcpt.test; `sets` are more `--set`s.
fn relay(nsd: &Nsd, sets: &[&str]) -> Relay {
    let mut b = Relay::builder()
        .set(nsd.servers_set())
        .set("relay.local_domains=[\"rcpt.test\"]")
        .set("server.hostname=\"mx.sluice.test\"")
        .lset("proxy_trusted_networks", "[\"127.0.0.0/8\"]")
        .lset("verify.iprev", "false")
        .proxy_probe();
    for s in sets {
        b = b.set(s.to_string());
    }
    b.start()
}

/// One transaction from `ip` (PROXY v1), HELO `helo`: the reply to the end
/// of DATA, or to MAIL when SPF refused the sender there.
fn send_from(relay: &Relay, ip: &str, helo: &str, from: &str, message: &[u8]) -> Reply {
    let mut c = relay.connect();
    c.send(format!("PROXY TCP4 {ip} 127.0.0.1 40000 25\r\n").as_bytes());
    let r = c.read_reply();
    assert_eq!(r.code, 220, "{r:?}");
    c.expect(&format!("EHLO {helo}"), 250);
    let r = c.cmd(&format!("MAIL FROM:<{from}>"));
    if r.code != 250 {
        c.send_line("QUIT");
        return r;
    }
    c.expect(&format!("RCPT TO:<{RCPT}>"), 250);
    c.expect("DATA", 354);
    c.send(message);
    c.send(b".\r\n");
    let r = c.read_reply();
    c.send_line("QUIT");
    r
}

/// The stored copy of the message the reply queued.
fn stored(relay: &Relay, reply: &Reply) -> String {
    assert_eq!(reply.code, 250, "{reply:?}\n{}", relay.log());
    let id = queued_id(&reply.text()).expect("queued id");
    String::from_utf8_lossy(&relay.body(&id)).into_owned()
}

/// Our Authentication-Results field (authserv-id mx.sluice.test) of a
/// stored message, unfolded.
fn auth_results(message: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in message.split("\r\n") {
        if line.is_empty() {
            break;
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            if inside {
                out.push(' ');
                out.push_str(line.trim());
            }
            continue;
        }
        inside = line
            .to_ascii_lowercase()
            .starts_with("authentication-results: mx.sluice.test;");
        if inside {
            assert!(out.is_empty(), "two A-R fields:\n{message}");
            out.push_str(line);
        }
    }
    out
}

/// "spf=RESULT" for the MAIL FROM identity in an A-R field.
fn mailfrom_result(ar: &str) -> String {
    ar.split(';')
        .map(str::trim)
        .find(|m| m.starts_with("spf=") && m.contains("smtp.mailfrom="))
        .and_then(|m| m.split_whitespace().next())
        .map(|m| m.trim_start_matches("spf=").to_string())
        .unwrap_or_else(|| panic!("no MAIL FROM spf result in {ar}"))
}

fn message(from: &str, subject: &str) -> String {
    format!(
        "From: Sender <{from}>\r\nTo: {RCPT}\r\nSubject: {subject}\r\n\
         Date: Sat, 05 Dec 2026 20:00:00 +0000\r\nMessage-ID: <{subject}@sluice.test>\r\n\
         \r\nHello, this is {subject}.\r\n"
    )
}

const SPF_ZONE: &str = "\
spf1 TXT \"v=spf1 ip4:192.0.2.0/24 -all\"
inc TXT \"v=spf1 include:inc-t.dlv.test ~all\"
inc-t TXT \"v=spf1 ip4:198.51.100.7 -all\"
redir TXT \"v=spf1 redirect=spf1.dlv.test\"
mxs TXT \"v=spf1 mx -all\"
mxs MX 10 mxh
mxh A 203.0.113.9
macro TXT \"v=spf1 exists:%{i}.ok.dlv.test -all\"
192.0.2.77.ok A 127.0.0.2
void2 TXT \"v=spf1 a:nx1.dlv.test a:nx2.dlv.test ip4:192.0.2.0/24 -all\"
void3 TXT \"v=spf1 a:nx1.dlv.test a:nx2.dlv.test a:nx3.dlv.test ip4:192.0.2.0/24 -all\"
ten TXT \"v=spf1 a:h1.dlv.test a:h2.dlv.test a:h3.dlv.test a:h4.dlv.test a:h5.dlv.test a:h6.dlv.test a:h7.dlv.test a:h8.dlv.test a:h9.dlv.test a:h10.dlv.test ip4:192.0.2.0/24 -all\"
eleven TXT \"v=spf1 a:h1.dlv.test a:h2.dlv.test a:h3.dlv.test a:h4.dlv.test a:h5.dlv.test a:h6.dlv.test a:h7.dlv.test a:h8.dlv.test a:h9.dlv.test a:h10.dlv.test a:h11.dlv.test ip4:192.0.2.0/24 -all\"
tmp TXT \"v=spf1 include:x.broken.test -all\"
soft TXT \"v=spf1 ~all\"
neu TXT \"v=spf1 ?all\"
bad TXT \"v=spf1 include -all\"
two TXT \"v=spf1 ip4:192.0.2.0/24 -all\"
two TXT \"v=spf1 -all\"
client A 192.0.2.1
";

fn hosts_zone() -> String {
    (1..=11).map(|i| format!("h{i} A 10.9.9.{i}\n")).collect()
}

#[test]
fn spf_results_agree_with_pyspf() {
    require_tools!("nsd", "swaks", "dknewkey");
    let nsd = Nsd::start_with_parent(&format!("{SPF_ZONE}{}", hosts_zone()));
    let relay = relay(
        &nsd,
        &[
            "server.listener.smtp.verify.dkim=false",
            "server.listener.smtp.verify.arc=false",
            "server.listener.smtp.verify.dmarc=false",
            "server.listener.smtp.verify.action.spf_fail=\"accept\"",
            "server.listener.smtp.verify.action.temperror=\"accept\"",
        ],
    );
    // (client, MAIL FROM, what RFC 7208 says)
    let cases = [
        ("192.0.2.5", "a@spf1.dlv.test", "pass"),
        ("198.51.100.1", "a@spf1.dlv.test", "fail"),
        ("198.51.100.7", "a@inc.dlv.test", "pass"),
        ("198.51.100.8", "a@inc.dlv.test", "softfail"),
        ("192.0.2.9", "a@redir.dlv.test", "pass"),
        ("203.0.113.9", "a@mxs.dlv.test", "pass"),
        ("203.0.113.10", "a@mxs.dlv.test", "fail"),
        ("192.0.2.77", "a@macro.dlv.test", "pass"),
        ("192.0.2.78", "a@macro.dlv.test", "fail"),
        ("192.0.2.1", "a@void2.dlv.test", "pass"),
        ("192.0.2.1", "a@void3.dlv.test", "permerror"),
        ("192.0.2.1", "a@ten.dlv.test", "pass"),
        ("192.0.2.1", "a@eleven.dlv.test", "permerror"),
        ("192.0.2.1", "a@tmp.dlv.test", "temperror"),
        ("192.0.2.1", "a@soft.dlv.test", "softfail"),
        ("192.0.2.1", "a@neu.dlv.test", "neutral"),
        ("192.0.2.1", "a@bad.dlv.test", "permerror"),
        ("192.0.2.1", "a@two.dlv.test", "permerror"),
        ("192.0.2.1", "a@nospf.dlv.test", "none"),
    ];
    let port = nsd.addr.port().to_string();
    let mut wrong = Vec::new();
    for (ip, from, want) in cases {
        let reply = send_from(
            &relay,
            ip,
            "client.dlv.test",
            from,
            message(from, "spf").as_bytes(),
        );
        let stored = stored(&relay, &reply);
        let ar = auth_results(&stored);
        assert!(
            ar.starts_with("Authentication-Results: mx.sluice.test;"),
            "{ar}"
        );
        let ours = mailfrom_result(&ar);
        let theirs = tool(&["spf", &port, ip, from, "client.dlv.test"])
            .trim()
            .to_string();
        if ours != theirs || ours != want {
            wrong.push(format!(
                "{ip} {from}: sluice {ours}, pyspf {theirs}, RFC {want}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}\n{}", wrong.join("\n"), relay.log());

    // `sluice debug spf` runs the same code.
    let servers = nsd.servers_set();
    for (ip, from, want) in [
        ("198.51.100.7", "a@inc.dlv.test", "pass"),
        ("192.0.2.1", "a@eleven.dlv.test", "permerror"),
        ("192.0.2.1", "a@tmp.dlv.test", "temperror"),
    ] {
        let out = sluice(&[
            "debug",
            "spf",
            ip,
            "client.dlv.test",
            from,
            "--set",
            &servers,
        ]);
        assert_ok(&out, "sluice debug spf");
        let said = text(&out.stdout);
        assert!(
            said.starts_with(&format!("spf={want} mailfrom {from}")),
            "{said}"
        );
    }
}

/// dknewkey's key pair: (private key file, TXT value).
fn dknewkey(dir: &Path, name: &str, ed25519: bool) -> (PathBuf, String) {
    let mut cmd = Command::new("dknewkey");
    cmd.current_dir(dir);
    if ed25519 {
        cmd.args(["--ktype", "ed25519"]);
    }
    cmd.arg(name);
    assert_ok(&run_with_timeout(&mut cmd, T), "dknewkey");
    let record = std::fs::read_to_string(dir.join(format!("{name}.dns"))).unwrap();
    (dir.join(format!("{name}.key")), record.trim().to_string())
}

fn dkimsign(dir: &Path, msg: &str, key: &Path, selector: &str, domain: &str, alg: &str) -> Vec<u8> {
    let p = dir.join("unsigned.eml");
    std::fs::write(&p, msg).unwrap();
    tool_bytes(&[
        "dkimsign",
        &p.display().to_string(),
        selector,
        domain,
        &key.display().to_string(),
        alg,
    ])
}

struct DkimSetup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    rsa: PathBuf,
    ed: PathBuf,
    nsd: Nsd,
}

fn dkim_setup() -> DkimSetup {
    let dir = tempfile::tempdir().unwrap();
    let (rsa, rsa_txt) = dknewkey(dir.path(), "rsa", false);
    let (ed, ed_txt) = dknewkey(dir.path(), "ed", true);
    let zone = format!(
        "{}{}\
_dmarc.sig TXT \"v=DMARC1; p=reject\"
sig TXT \"v=spf1 ip4:192.0.2.0/24 -all\"
_dmarc.quar TXT \"v=DMARC1; p=quarantine\"
_dmarc.none TXT \"v=DMARC1; p=none\"
_dmarc.pct0 TXT \"v=DMARC1; p=reject; pct=0\"
_dmarc.org TXT \"v=DMARC1; p=none; sp=reject\"
sub.org A 192.0.2.200
bounce TXT \"v=spf1 ip4:198.51.100.0/24 -all\"
",
        txt("rsa._domainkey.sig", &rsa_txt),
        txt("ed._domainkey.sig", &ed_txt),
    );
    let nsd = Nsd::start_with_parent(&zone);
    DkimSetup {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        rsa,
        ed,
        nsd,
    }
}

#[test]
fn dkimpy_signatures_dmarc_policies_and_refusals() {
    require_tools!("nsd", "swaks", "dknewkey");
    let s = dkim_setup();
    let relay = relay(&s.nsd, &[]);
    let from = "alice@sig.dlv.test";

    // RSA and Ed25519 signatures by dkimpy pass; DMARC passes on DKIM even
    // though MAIL FROM (bounce.dlv.test) is not aligned.
    for (key, sel, alg) in [
        (&s.rsa, "rsa", "rsa-sha256"),
        (&s.ed, "ed", "ed25519-sha256"),
    ] {
        let signed = dkimsign(&s.dir, &message(from, alg), key, sel, "sig.dlv.test", alg);
        let r = send_from(
            &relay,
            "198.51.100.4",
            "client.dlv.test",
            "b@bounce.dlv.test",
            &signed,
        );
        let ar = auth_results(&stored(&relay, &r));
        assert!(ar.contains("dkim=pass"), "{alg}: {ar}");
        assert!(ar.contains(&format!("header.s={sel}")), "{alg}: {ar}");
        assert!(ar.contains("dmarc=pass"), "{alg}: {ar}");
        assert_eq!(mailfrom_result(&ar), "pass", "{ar}");
    }

    // Tampered after signing: DKIM fails, DMARC fails, p=reject: 550 5.7.1
    // through swaks presenting 198.51.100.4 by PROXY.
    let signed = dkimsign(
        &s.dir,
        &message(from, "tampered"),
        &s.rsa,
        "rsa",
        "sig.dlv.test",
        "rsa-sha256",
    );
    let tampered = String::from_utf8(signed)
        .unwrap()
        .replace("Hello,", "Hullo,");
    let path = s.dir.join("tampered.eml");
    std::fs::write(&path, &tampered).unwrap();
    let out = swaks(
        &relay,
        &[
            "--proxy-version",
            "1",
            "--proxy-family",
            "TCP4",
            "--proxy-source",
            "198.51.100.4",
            "--proxy-source-port",
            "40001",
            "--proxy-dest",
            "127.0.0.1",
            "--proxy-dest-port",
            "25",
            "--ehlo",
            "client.dlv.test",
            "--from",
            "b@bounce.dlv.test",
            "--to",
            RCPT,
            "--data",
            &format!("@{}", path.display()),
        ],
    );
    let said = text(&out.stdout);
    assert!(said.contains("<** 550 5.7.1"), "{said}\n{}", relay.log());

    // The same message sent straight: 550 with the policy in the text, and
    // the log line carries the results.
    let r = send_from(
        &relay,
        "198.51.100.4",
        "client.dlv.test",
        "b@bounce.dlv.test",
        tampered.as_bytes(),
    );
    assert_eq!((r.code, r.enhanced()), (550, "5.7.1"), "{r:?}");
    let log = relay.log();
    assert!(
        log.contains("auth_results=spf_helo=none spf_mailfrom=pass dkim=fail arc=none dmarc=fail"),
        "{log}"
    );

    // DMARC without DKIM: SPF aligned passes; quarantine and none are
    // accepted with dmarc=fail; pct=0 weakens reject; sp= governs a
    // subdomain; SPF -all refuses with 5.7.23.
    let r = send_from(
        &relay,
        "192.0.2.5",
        "client.dlv.test",
        "x@sig.dlv.test",
        message(from, "aligned").as_bytes(),
    );
    let ar = auth_results(&stored(&relay, &r));
    assert!(ar.contains("dmarc=pass"), "{ar}");
    assert_eq!(mailfrom_result(&ar), "pass", "{ar}");
    for (dom, policy) in [("quar", "quarantine"), ("none", "none"), ("pct0", "reject")] {
        let f = format!("a@{dom}.dlv.test");
        let r = send_from(
            &relay,
            "198.51.100.4",
            "client.dlv.test",
            "b@bounce.dlv.test",
            message(&f, dom).as_bytes(),
        );
        let ar = auth_results(&stored(&relay, &r));
        assert!(ar.contains("dmarc=fail"), "{dom}: {ar}");
        assert!(
            ar.contains(&format!("policy.dmarc={policy}")),
            "{dom}: {ar}"
        );
    }
    let r = send_from(
        &relay,
        "198.51.100.4",
        "client.dlv.test",
        "b@bounce.dlv.test",
        message("a@sub.org.dlv.test", "sp").as_bytes(),
    );
    assert_eq!((r.code, r.enhanced()), (550, "5.7.1"), "{r:?}");
    let r = send_from(
        &relay,
        "203.0.113.1",
        "client.dlv.test",
        "x@sig.dlv.test",
        message(from, "spf").as_bytes(),
    );
    assert_eq!((r.code, r.enhanced()), (550, "5.7.23"), "{r:?}");

    // A forged A-R claiming our authserv-id is removed; others stay.
    let forged = format!(
        "Authentication-Results: mx.sluice.test; dkim=pass header.d=sig.dlv.test\r\n\
         Authentication-Results: elsewhere.test; spf=pass\r\n{}",
        message("a@none.dlv.test", "forged")
    );
    let r = send_from(
        &relay,
        "198.51.100.4",
        "client.dlv.test",
        "b@bounce.dlv.test",
        forged.as_bytes(),
    );
    let body = stored(&relay, &r);
    // The envelope's size is what is stored, the forged field gone.
    let id = queued_id(&r.text()).unwrap();
    let shown = String::from_utf8_lossy(&relay.queue(&["show", &id])).into_owned();
    assert_eq!(
        show_field(&shown, "size"),
        body.len().to_string(),
        "{shown}"
    );
    assert_eq!(
        body.matches("Authentication-Results: mx.sluice.test")
            .count(),
        1,
        "{body}"
    );
    assert!(
        body.contains("Authentication-Results: elsewhere.test; spf=pass"),
        "{body}"
    );
    assert!(!auth_results(&body).contains("dkim=pass"), "{body}");

    // Metrics per method and result.
    let metrics = relay.metrics();
    assert!(
        metrics.contains("sluice_auth_results_total{method=\"dkim\",result=\"pass\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_auth_decisions_total{decision=\"reject\"}"),
        "{metrics}"
    );
}

#[test]
fn dns_temporary_failure_tempfails() {
    require_tools!("nsd", "swaks", "dknewkey");
    let nsd = Nsd::start_with_parent("");
    let relay = relay(&nsd, &[]);
    // The From domain's DMARC record is under broken.test (SERVFAIL).
    let r = send_from(
        &relay,
        "198.51.100.4",
        "client.dlv.test",
        "b@x.broken.test",
        message("a@x.broken.test", "servfail").as_bytes(),
    );
    assert_eq!(r.code, 451, "{r:?}");
    assert!(r.enhanced().starts_with("4.7."), "{r:?}");
}

/// `sluice dkim keygen`: the key file and the zone-file line to publish.
fn keygen(dir: &Path, domain: &str, selector: &str) -> (PathBuf, String) {
    let out = sluice(&[
        "dkim",
        "keygen",
        "--domain",
        domain,
        "--selector",
        selector,
        "--algorithm",
        "rsa",
        "--out",
        &dir.display().to_string(),
    ]);
    assert_ok(&out, "sluice dkim keygen");
    (
        dir.join(format!("{domain}.{selector}.pem")),
        text(&out.stdout).trim().to_string(),
    )
}

#[test]
fn arc_chains_from_dkimpy_validate_and_sluice_seals_validate_with_dkimpy() {
    require_tools!("nsd", "dknewkey");
    let dir = tempfile::tempdir().unwrap();
    let (fwd_key, fwd_txt) = dknewkey(dir.path(), "fwd", false);
    let (seal_key, seal_line) = keygen(dir.path(), "seal.dlv.test", "arc");
    let nsd = Nsd::start_with_parent(&format!(
        "{}{seal_line}\n_dmarc.orig TXT \"v=DMARC1; p=none\"\n",
        txt("fwd._domainkey.fwd", &fwd_txt)
    ));
    let relay = relay(
        &nsd,
        &[
            "dkim.signer.arc.domain=\"seal.dlv.test\"",
            "dkim.signer.arc.selector=\"arc\"",
            "dkim.signer.arc.algorithm=\"rsa-sha256\"",
            &format!("dkim.signer.arc.key=\"{}\"", seal_key.display()),
            "server.listener.smtp.verify.arc_seal=\"arc\"",
        ],
    );
    let port = nsd.addr.port().to_string();
    let arcverify = |stored: &str| -> String {
        let p = dir.path().join("sealed.eml");
        std::fs::write(&p, stored).unwrap();
        tool(&["arcverify", &port, &p.display().to_string()])
    };

    // A message a forwarder (fwd.dlv.test) authenticated and sealed with dkimpy.
    let original = format!(
        "Authentication-Results: fwd.dlv.test; spf=pass smtp.mailfrom=a@orig.dlv.test\r\n{}",
        message("a@orig.dlv.test", "forwarded")
    );
    let p = dir.path().join("forwarded.eml");
    std::fs::write(&p, &original).unwrap();
    let chained = tool_bytes(&[
        "arcsign",
        &p.display().to_string(),
        "fwd",
        "fwd.dlv.test",
        &fwd_key.display().to_string(),
        "fwd.dlv.test",
    ]);
    assert!(
        String::from_utf8_lossy(&chained).starts_with("ARC-Seal: i=1"),
        "{}",
        String::from_utf8_lossy(&chained)
    );
    let r = send_from(
        &relay,
        "198.51.100.4",
        "client.dlv.test",
        "a@orig.dlv.test",
        &chained,
    );
    let stored_chain = stored(&relay, &r);
    let ar = auth_results(&stored_chain);
    assert!(ar.contains("arc=pass"), "{ar}\n{stored_chain}");
    // sluice added instance 2 (cv=pass) and dkimpy validates the chain.
    assert!(stored_chain.contains("i=2"), "{stored_chain}");
    let verdict = arcverify(&stored_chain);
    assert!(verdict.starts_with("pass"), "{verdict}\n{stored_chain}");

    // A message without a chain: sluice starts one (i=1, cv=none).
    let r = send_from(
        &relay,
        "198.51.100.4",
        "client.dlv.test",
        "a@orig.dlv.test",
        message("a@orig.dlv.test", "first-hop").as_bytes(),
    );
    let stored_new = stored(&relay, &r);
    assert!(stored_new.starts_with("ARC-"), "{stored_new}");
    let verdict = arcverify(&stored_new);
    assert!(verdict.starts_with("pass"), "{verdict}\n{stored_new}");

    // A broken chain (body changed after the seal) does not pass (mail-auth
    // says neutral: "body hash did not verify"); sluice's seal records that
    // with cv=fail (RFC 8617 §5.1.2), after which nobody seals again.
    let tampered = String::from_utf8(chained)
        .unwrap()
        .replace("Hello,", "Hullo,");
    let r = send_from(
        &relay,
        "198.51.100.4",
        "client.dlv.test",
        "a@orig.dlv.test",
        tampered.as_bytes(),
    );
    let stored_bad = stored(&relay, &r);
    let ar = auth_results(&stored_bad);
    assert!(
        ar.contains("arc=") && !ar.contains("arc=pass"),
        "{stored_bad}"
    );
    assert!(stored_bad.starts_with("ARC-Seal: i=2;"), "{stored_bad}");
    assert!(stored_bad.contains("cv=fail"), "{stored_bad}");
    let metrics = relay.metrics();
    assert!(
        metrics.contains("sluice_arc_seals_total{result=\"sealed\"} 3"),
        "{metrics}"
    );
}

/// A relay checking only iprev on its "smtp" listener (PROXY from loopback),
/// with one more listener key.
fn iprev_relay(nsd: &Nsd, (key, value): (&str, &str)) -> Relay {
    Relay::builder()
        .set(nsd.servers_set())
        .set("relay.local_domains=[\"rcpt.test\"]")
        .set("server.hostname=\"mx.sluice.test\"")
        .lset("proxy_trusted_networks", "[\"127.0.0.0/8\"]")
        .lset("verify.spf", "false")
        .lset("verify.dmarc", "false")
        .lset(key, value)
        .proxy_probe()
        .start()
}

#[test]
fn iprev_at_connect_passes_and_refuses_with_5_7_25() {
    require_tools!("nsd");
    // tests/dns/zones: 192.0.2.1 PTR a.hosts.mail.test, which has A
    // 192.0.2.1; 192.0.2.2 has no PTR.
    let nsd = Nsd::fixture();
    let relay = iprev_relay(&nsd, ("verify.action.iprev_fail", "\"reject\""));
    let m = message("a@mail.test", "iprev");
    let r = send_from(
        &relay,
        "192.0.2.1",
        "a.hosts.mail.test",
        "a@mail.test",
        m.as_bytes(),
    );
    let ar = auth_results(&stored(&relay, &r));
    assert!(ar.contains("iprev=pass policy.iprev=192.0.2.1"), "{ar}");
    let r = send_from(
        &relay,
        "192.0.2.2",
        "b.hosts.mail.test",
        "a@mail.test",
        m.as_bytes(),
    );
    assert_eq!((r.code, r.enhanced()), (550, "5.7.25"), "{r:?}");
}

#[test]
fn verify_config_errors_name_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, body: &str| -> String {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        let out = sluice(&["check-config", &p.display().to_string()]);
        assert!(!out.status.success(), "{name} accepted");
        text(&out.stderr)
    };
    let err = check(
        "action.toml",
        "[server.listener.smtp]\nbind = [\"127.0.0.1:2525\"]\n\n[server.listener.smtp.verify]\nspf = true\n[server.listener.smtp.verify.action]\nspf_fail = \"bounce\"\n",
    );
    assert!(
        err.contains("server.listener.smtp.verify.action.spf_fail"),
        "{err}"
    );
    assert!(err.contains("line 7"), "{err}");
    let err = check(
        "seal.toml",
        "[server.listener.smtp]\nbind = [\"127.0.0.1:2525\"]\n\n[server.listener.smtp.verify]\narc_seal = \"nobody\"\n",
    );
    assert!(
        err.contains("server.listener.smtp.verify.arc_seal"),
        "{err}"
    );
    assert!(err.contains("line 5"), "{err}");
    assert!(err.contains("nobody"), "{err}");
    let err = check(
        "offload.toml",
        "[server.listener.smtp]\nbind = [\"127.0.0.1:2525\"]\n\n[server.listener.smtp.verify]\noffload_size = \"12 parsecs\"\n",
    );
    assert!(
        err.contains("server.listener.smtp.verify.offload_size"),
        "{err}"
    );
    assert!(err.contains("line 5"), "{err}");
}

#[test]
fn sighup_switches_verification_on() {
    require_tools!("nsd");
    let nsd = Nsd::start_with_parent("spf1 TXT \"v=spf1 ip4:192.0.2.0/24 -all\"\n");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sluice.toml");
    let base = "[server.listener.smtp]\nproxy_trusted_networks = [\"127.0.0.0/8\"]\n";
    std::fs::write(&file, base).unwrap();
    let relay = Relay::builder()
        .config(file.clone())
        .set(nsd.servers_set())
        .set("relay.local_domains=[\"rcpt.test\"]")
        .set("server.hostname=\"mx.sluice.test\"")
        .proxy_probe()
        .start();
    let m = message("a@spf1.dlv.test", "reload");
    let r = send_from(
        &relay,
        "192.0.2.5",
        "client.dlv.test",
        "a@spf1.dlv.test",
        m.as_bytes(),
    );
    assert_eq!(auth_results(&stored(&relay, &r)), "", "verification is off");

    std::fs::write(
        &file,
        format!("{base}[server.listener.smtp.verify]\niprev = false\n"),
    )
    .unwrap();
    // SAFETY: kill(2) on the relay child this test started and has not reaped.
    let rc = unsafe { libc::kill(relay.pid() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0);
    wait_until(
        "the reload",
        T,
        || relay.log().contains("reload: "),
        || relay.log(),
    );
    let r = send_from(
        &relay,
        "192.0.2.5",
        "client.dlv.test",
        "a@spf1.dlv.test",
        m.as_bytes(),
    );
    let ar = auth_results(&stored(&relay, &r));
    assert_eq!(mailfrom_result(&ar), "pass", "{ar}");
    let r = send_from(
        &relay,
        "198.51.100.1",
        "client.dlv.test",
        "a@spf1.dlv.test",
        m.as_bytes(),
    );
    assert_eq!((r.code, r.enhanced()), (550, "5.7.23"), "{r:?}");
}

#[test]
fn dkim_signing_at_acceptance_still_verifies_with_the_results_and_seal_added() {
    require_tools!("nsd");
    let dir = tempfile::tempdir().unwrap();
    let (key, line) = keygen(dir.path(), "seal.dlv.test", "both");
    let nsd = Nsd::start_with_parent(&format!("{line}\n"));
    let relay = relay(
        &nsd,
        &[
            "dkim.signer.s.domain=\"seal.dlv.test\"",
            "dkim.signer.s.selector=\"both\"",
            "dkim.signer.s.algorithm=\"rsa-sha256\"",
            &format!("dkim.signer.s.key=\"{}\"", key.display()),
            "dkim.rule=[{sign=[\"s\"]}]",
            "server.listener.smtp.verify.arc_seal=\"s\"",
        ],
    );
    let r = send_from(
        &relay,
        "198.51.100.4",
        "client.dlv.test",
        "a@orig.dlv.test",
        message("a@orig.dlv.test", "signed-and-sealed").as_bytes(),
    );
    let stored = stored(&relay, &r);
    // Our signature first, then the ARC set and the results.
    assert!(stored.starts_with("DKIM-Signature:"), "{stored}");
    let arc_at = stored.find("ARC-Seal:").expect("sealed");
    let ar_at = stored
        .find("Authentication-Results: mx.sluice.test")
        .expect("A-R");
    assert!(arc_at < ar_at, "{stored}");
    let p = dir.path().join("out.eml");
    std::fs::write(&p, &stored).unwrap();
    let out = run_with_timeout(
        Command::new(system_python())
            .arg(py_script("dkim_verify.py"))
            .arg(nsd.addr.port().to_string())
            .arg(&p),
        T,
    );
    assert_ok(&out, "dkim_verify.py");
    let verdict = text(&out.stdout);
    assert!(verdict.contains("\"pass\": true"), "{verdict}\n{stored}");
    let arc = tool(&[
        "arcverify",
        &nsd.addr.port().to_string(),
        &p.display().to_string(),
    ]);
    assert!(arc.starts_with("pass"), "{arc}\n{stored}");
}

/// OpenDKIM's filter, run in its test mode (`opendkim -t FILE`, signing
/// mode, rsa-sha256, relaxed/relaxed, From over-signed), signs with the RSA
/// key dknewkey made for `rsa._domainkey.sig.dlv.test`: sluice verifies the
/// signature as pass, and a tampered copy as fail.
#[test]
fn opendkim_signatures_verify_in_sluice() {
    require_tools!("nsd", "dknewkey", "opendkim");
    let s = dkim_setup();
    let relay = relay(&s.nsd, &[]);
    // OpenDKIM refuses a configuration or key under a directory others can
    // write (such as /tmp): keep its files under target/.
    let private = tempfile::Builder::new()
        .prefix("opendkim-")
        .tempdir_in(repo_root().join("target"))
        .unwrap();
    let key = private.path().join("rsa.key");
    std::fs::copy(&s.rsa, &key).unwrap();
    let conf = private.path().join("opendkim.conf");
    std::fs::write(
        &conf,
        format!(
            "Mode s\nDomain sig.dlv.test\nSelector rsa\nKeyFile {}\n\
             SignatureAlgorithm rsa-sha256\nCanonicalization relaxed/relaxed\n\
             OversignHeaders From\nUserID root\nSyslog no\n",
            key.display()
        ),
    )
    .unwrap();
    let unsigned = message("alice@sig.dlv.test", "opendkim");
    let eml = private.path().join("unsigned.eml");
    std::fs::write(&eml, &unsigned).unwrap();
    let out = run_with_timeout(
        Command::new("opendkim")
            .arg("-x")
            .arg(&conf)
            .arg("-t")
            .arg(&eml),
        T,
    );
    assert_ok(&out, "opendkim -t");
    // It prints "opendkim: FILE:" and then the header field it would add.
    let printed = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let field = printed
        .find("DKIM-Signature:")
        .map(|at| {
            // It ends its lines with CRLF already; make sure of it.
            printed[at..]
                .trim_end()
                .replace("\r\n", "\n")
                .replace('\n', "\r\n")
        })
        .unwrap_or_else(|| panic!("no signature from opendkim:\n{printed}"));
    assert!(field.contains("a=rsa-sha256"), "{field}");
    let signed = format!("{field}\r\n{unsigned}");

    let r = send_from(
        &relay,
        "198.51.100.4",
        "client.dlv.test",
        "b@bounce.dlv.test",
        signed.as_bytes(),
    );
    let ar = auth_results(&stored(&relay, &r));
    assert!(ar.contains("dkim=pass"), "{ar}");
    assert!(ar.contains("header.d=sig.dlv.test"), "{ar}");
    assert!(ar.contains("dmarc=pass"), "{ar}");

    // One byte of the body changed after signing: the body hash no longer
    // matches, DMARC (p=reject) fails, 550 5.7.1.
    let tampered = signed.replace("Hello,", "Hullo,");
    let r = send_from(
        &relay,
        "198.51.100.4",
        "client.dlv.test",
        "b@bounce.dlv.test",
        tampered.as_bytes(),
    );
    assert_eq!(
        (r.code, r.enhanced()),
        (550, "5.7.1"),
        "{r:?}\n{}",
        relay.log()
    );
}

/// ARC sealing chosen by a `[[dkim.rule]]` (`arc_seal`), not by the
/// listener: mail from the forwarded sender domain is sealed (and dkimpy
/// validates the chain), other mail on the same listener is not.
#[test]
fn arc_seal_by_dkim_rule_seals_only_matching_mail() {
    require_tools!("nsd");
    let dir = tempfile::tempdir().unwrap();
    let (seal_key, seal_line) = keygen(dir.path(), "seal.dlv.test", "arc");
    let nsd = Nsd::start_with_parent(&format!(
        "{seal_line}\n_dmarc.orig TXT \"v=DMARC1; p=none\"\n"
    ));
    let relay = relay(
        &nsd,
        &[
            "dkim.signer.arc.domain=\"seal.dlv.test\"",
            "dkim.signer.arc.selector=\"arc\"",
            "dkim.signer.arc.algorithm=\"rsa-sha256\"",
            &format!("dkim.signer.arc.key=\"{}\"", seal_key.display()),
            "dkim.rule=[{match.sender_domain=\"orig.dlv.test\", arc_seal=\"arc\"}]",
        ],
    );
    let r = send_from(
        &relay,
        "198.51.100.4",
        "client.dlv.test",
        "a@orig.dlv.test",
        message("a@orig.dlv.test", "by-rule").as_bytes(),
    );
    let sealed = stored(&relay, &r);
    assert!(sealed.starts_with("ARC-Seal: i=1;"), "{sealed}");
    // A rule that only seals adds no DKIM signature.
    assert!(!sealed.contains("DKIM-Signature:"), "{sealed}");
    let p = dir.path().join("sealed.eml");
    std::fs::write(&p, &sealed).unwrap();
    let verdict = tool(&[
        "arcverify",
        &nsd.addr.port().to_string(),
        &p.display().to_string(),
    ]);
    assert!(verdict.starts_with("pass"), "{verdict}\n{sealed}");

    let r = send_from(
        &relay,
        "198.51.100.4",
        "client.dlv.test",
        "b@other.dlv.test",
        message("b@other.dlv.test", "no-rule").as_bytes(),
    );
    let plain = stored(&relay, &r);
    assert!(!plain.contains("ARC-Seal:"), "{plain}");
    assert!(!auth_results(&plain).is_empty(), "{plain}");
}

/// swaks from `ip` by PROXY v1, with `extra` arguments; its transcript.
fn swaks_from(relay: &Relay, ip: &str, from: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "--proxy-version",
        "1",
        "--proxy-family",
        "TCP4",
        "--proxy-source",
        ip,
        "--proxy-source-port",
        "40002",
        "--proxy-dest",
        "127.0.0.1",
        "--proxy-dest-port",
        "25",
        "--ehlo",
        "client.dlv.test",
        "--from",
        from,
        "--to",
        RCPT,
    ];
    args.extend_from_slice(extra);
    text(&swaks(relay, &args).stdout)
}

/// Python's smtplib (a PROXY v1 line sent first on its socket) from `ip`:
/// prints the MAIL reply, then, when MAIL was accepted, the whole
/// transaction's outcome ("sent" or the refusal).
fn smtplib_from(relay: &Relay, ip: &str, from: &str) -> String {
    let script = r#"
import smtplib, socket, sys
port, ip, sender, rcpt = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
class Proxied(smtplib.SMTP):
    def _get_socket(self, host, p, timeout):
        s = socket.create_connection((host, p), timeout)
        s.sendall(("PROXY TCP4 %s 127.0.0.1 40003 25\r\n" % ip).encode())
        return s
s = Proxied("127.0.0.1", port, timeout=30)
s.ehlo("client.dlv.test")
code, msg = s.mail(sender)
print("MAIL", code, msg.decode())
if code == 250:
    s.rset()
    try:
        s.sendmail(sender, [rcpt], "From: <%s>\r\nTo: <%s>\r\nSubject: smtplib\r\n\r\nhello\r\n" % (sender, rcpt))
        print("sent")
    except smtplib.SMTPException as e:
        print("refused", e)
s.quit()
"#;
    let out = run_with_timeout(
        Command::new(system_python()).args([
            "-c",
            script,
            &relay.addr().port().to_string(),
            ip,
            from,
            RCPT,
        ]),
        T,
    );
    assert_ok(&out, "smtplib");
    text(&out.stdout)
}

#[test]
fn spf_is_decided_at_mail_from_before_the_body() {
    require_tools!("nsd", "swaks");
    let nsd = Nsd::start_with_parent("spf1 TXT \"v=spf1 ip4:192.0.2.0/24 -all\"\n");
    let relay = relay(
        &nsd,
        &[
            "server.listener.smtp.verify.dkim=false",
            "server.listener.smtp.verify.arc=false",
        ],
    );

    // SPF fail with the default reject: swaks is refused at MAIL FROM and
    // never gets to DATA.
    let said = swaks_from(&relay, "203.0.113.1", "a@spf1.dlv.test", &[]);
    assert!(
        said.contains("<** 550 5.7.23 SPF validation failed"),
        "{said}"
    );
    assert!(!said.contains("DATA"), "the body was asked for:\n{said}");
    let mail_line = said
        .lines()
        .position(|l| l.contains("MAIL FROM:<a@spf1.dlv.test>"))
        .unwrap();
    assert!(
        said.lines()
            .nth(mail_line + 1)
            .unwrap()
            .contains("550 5.7.23"),
        "{said}"
    );

    // SERVFAIL for the sender's domain under temperror = tempfail (the
    // default): 451 4.7.24 at MAIL.
    let said = swaks_from(&relay, "192.0.2.5", "b@x.broken.test", &[]);
    assert!(said.contains("<** 451 4.7.24"), "{said}");
    assert!(!said.contains("DATA"), "{said}");

    // Python's smtplib sees the same at MAIL.
    let said = smtplib_from(&relay, "203.0.113.1", "a@spf1.dlv.test");
    assert!(
        said.starts_with("MAIL 550 5.7.23 SPF validation failed"),
        "{said}"
    );

    // Pass: MAIL is accepted, the message stored, and its A-R still
    // carries spf=pass, found at MAIL FROM (not looked up again).
    let said = smtplib_from(&relay, "192.0.2.5", "a@spf1.dlv.test");
    assert!(said.starts_with("MAIL 250 2.1.0 Ok"), "{said}");
    assert!(said.contains("sent"), "{said}\n{}", relay.log());
    let r = send_from(
        &relay,
        "192.0.2.5",
        "client.dlv.test",
        "a@spf1.dlv.test",
        message("a@spf1.dlv.test", "atmail").as_bytes(),
    );
    let body = stored(&relay, &r);
    let ar = auth_results(&body);
    assert_eq!(mailfrom_result(&ar), "pass", "{ar}");
    assert!(ar.contains("dmarc="), "DMARC ran with SPF's result: {ar}");

    // The log names the refusal at MAIL with its results; metrics count
    // each MAIL's SPF once: two accepted transactions (smtplib's sendmail
    // and the raw one; smtplib's first MAIL was reset), three refused.
    let log = relay.log();
    assert!(log.contains("sender refused by SPF"), "{log}");
    assert!(log.contains("spf_mailfrom=fail"), "{log}");
    let metrics = relay.metrics();
    let pass = "sluice_auth_results_total{method=\"spf_mailfrom\",result=\"pass\"} 3";
    assert!(metrics.contains(pass), "{metrics}");
    assert!(
        metrics.contains("sluice_auth_results_total{method=\"spf_mailfrom\",result=\"fail\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("sluice_auth_results_total{method=\"spf_mailfrom\",result=\"temperror\"} 1"),
        "{metrics}"
    );
}

#[test]
fn pipelined_transactions_keep_their_replies_in_order_around_the_spf_wait() {
    require_tools!("nsd", "swaks");
    let nsd = Nsd::start_with_parent("spf1 TXT \"v=spf1 ip4:192.0.2.0/24 -all\"\n");
    let relay = relay(
        &nsd,
        &[
            "server.listener.smtp.verify.dkim=false",
            "server.listener.smtp.verify.arc=false",
        ],
    );
    // swaks --pipeline sends MAIL, RCPT and DATA in one write.
    let said = swaks_from(&relay, "192.0.2.5", "a@spf1.dlv.test", &["--pipeline"]);
    let replies: Vec<&str> = said
        .lines()
        .filter(|l| l.starts_with("<~") || l.starts_with("<-") || l.starts_with("<**"))
        .collect();
    let mail = replies
        .iter()
        .position(|l| l.contains("2.1.0"))
        .unwrap_or_else(|| panic!("{said}"));
    assert!(replies[mail + 1].contains("250 2.1.5"), "{said}");
    assert!(replies[mail + 2].contains("354"), "{said}");
    assert!(replies[mail + 3].contains("queued as"), "{said}");

    let said = swaks_from(&relay, "203.0.113.1", "a@spf1.dlv.test", &["--pipeline"]);
    assert!(said.contains("550 5.7.23"), "{said}");
    assert!(!said.contains("354"), "{said}");

    // Byte-exact order: MAIL, RCPT, DATA in one write; MAIL refused, the
    // others answered after it as commands outside a transaction. Then a
    // new pipelined transaction in the same session is checked afresh.
    let mut c = relay.connect();
    c.send(b"PROXY TCP4 203.0.113.1 127.0.0.1 40000 25\r\n");
    assert_eq!(c.read_reply().code, 220);
    c.expect("EHLO client.dlv.test", 250);
    c.send(format!("MAIL FROM:<a@spf1.dlv.test>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n").as_bytes());
    let got: Vec<(u16, String)> = (0..3)
        .map(|_| {
            let r = c.read_reply();
            (r.code, r.enhanced().to_string())
        })
        .collect();
    assert_eq!(
        got,
        [
            (550, "5.7.23".to_string()),
            (503, "5.5.1".to_string()),
            (503, "5.5.1".to_string())
        ]
    );
    c.send(format!("RSET\r\nMAIL FROM:<>\r\nRCPT TO:<{RCPT}>\r\nNOOP\r\n").as_bytes());
    let codes: Vec<u16> = (0..4).map(|_| c.read_reply().code).collect();
    // The null reverse-path: HELO client.dlv.test has no SPF record (none).
    assert_eq!(codes, [250, 250, 250, 250]);
    c.send_line("QUIT");
}

#[test]
fn large_dkim_signed_message_is_hashed_on_the_blocking_pool() {
    require_tools!("nsd", "dknewkey");
    let s = dkim_setup();
    let relay = relay(&s.nsd, &[]);
    let from = "alice@sig.dlv.test";
    // About 3 MiB, signed by dkimpy.
    let mut big = message(from, "large");
    let line = "A line of a large message, long enough to make it several MiB.\r\n";
    while big.len() < 3 << 20 {
        big.push_str(line);
    }
    let signed = dkimsign(&s.dir, &big, &s.rsa, "rsa", "sig.dlv.test", "rsa-sha256");
    let r = send_from(
        &relay,
        "192.0.2.5",
        "client.dlv.test",
        "x@sig.dlv.test",
        &signed,
    );
    let ar = auth_results(&stored(&relay, &r));
    assert!(ar.contains("dkim=pass"), "{ar}");
    assert!(ar.contains("dmarc=pass"), "{ar}");
    let metrics = relay.metrics();
    assert!(
        metrics.contains("sluice_auth_body_hash_total{path=\"blocking\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_auth_body_hash_total{path=\"inline\"} 0"),
        "{metrics}"
    );
    // Tampered, it fails through the same path (p=reject: 550 5.7.1).
    let tampered = String::from_utf8(signed)
        .unwrap()
        .replacen("A line of", "A lime of", 1);
    let r = send_from(
        &relay,
        "198.51.100.4",
        "client.dlv.test",
        "b@bounce.dlv.test",
        tampered.as_bytes(),
    );
    assert_eq!((r.code, r.enhanced()), (550, "5.7.1"), "{r:?}");
    // A small message stays inline.
    let small = dkimsign(
        &s.dir,
        &message(from, "small"),
        &s.rsa,
        "rsa",
        "sig.dlv.test",
        "rsa-sha256",
    );
    let r = send_from(
        &relay,
        "192.0.2.5",
        "client.dlv.test",
        "x@sig.dlv.test",
        &small,
    );
    assert!(auth_results(&stored(&relay, &r)).contains("dkim=pass"));
    let metrics = relay.metrics();
    assert!(
        metrics.contains("sluice_auth_body_hash_total{path=\"blocking\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_auth_body_hash_total{path=\"inline\"} 1"),
        "{metrics}"
    );
}

#[test]
fn filters_see_the_name_iprev_verified() {
    require_tools!("nsd");
    // As above: 192.0.2.1 has a verified name, 192.0.2.2 none.
    let nsd = Nsd::fixture();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("mail.sieve");
    std::fs::write(
        &script,
        "require [\"environment\", \"reject\"];\n\
         if not environment :is \"remote-host\" \"a.hosts.mail.test\" {\n\
           reject \"550 5.7.1 Unnamed client\";\n\
         }\n",
    )
    .unwrap();
    let relay = iprev_relay(
        &nsd,
        ("sieve", &format!("{{mail=\"{}\"}}", script.display())),
    );
    let m = message("a@mail.test", "named");
    let r = send_from(
        &relay,
        "192.0.2.1",
        "a.hosts.mail.test",
        "a@mail.test",
        m.as_bytes(),
    );
    assert_eq!(r.code, 250, "{r:?}\n{}", relay.log());
    let r = send_from(
        &relay,
        "192.0.2.2",
        "b.hosts.mail.test",
        "a@mail.test",
        m.as_bytes(),
    );
    assert_eq!(
        (r.code, r.last()),
        (550, "550 5.7.1 Unnamed client"),
        "{r:?}"
    );
}
