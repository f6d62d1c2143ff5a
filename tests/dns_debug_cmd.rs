//! `sluice debug route` and `sluice debug dns`: the real binary against NSD,
//! pointed at it with --set dns.servers=[…].

use std::process::{Command, Output};

use sluice_testkit::bin;
use sluice_testkit::nsd::Nsd;

fn sluice(nsd: &Nsd, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .arg("--set")
        .arg(nsd.servers_set())
        .arg("--set")
        .arg("dns.timeout=\"2s\"")
        .output()
        .expect("run sluice")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn debug_route_prints_hosts_addresses_ttls_and_security() {
    let nsd = Nsd::fixture();
    let out = sluice(&nsd, &["debug", "route", "unequal.mail.test"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "route unequal.mail.test: MX, 3 host(s)", "{text}");
    assert_eq!(
        lines[1],
        "  10 a.hosts.mail.test ttl=300 secure=no addrs=192.0.2.1"
    );
    assert_eq!(
        lines[2],
        "  20 b.hosts.mail.test ttl=300 secure=no addrs=192.0.2.2"
    );
    assert_eq!(
        lines[3],
        "  30 c.hosts.mail.test ttl=300 secure=no addrs=192.0.2.3,2001:db8::3"
    );
    assert_eq!(lines.len(), 4, "{text}");

    let out = sluice(
        &nsd,
        &[
            "debug",
            "route",
            "implicit.mail.test",
            "--set",
            "dns.ip_preference=\"ipv6-only\"",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("route implicit.mail.test: implicit MX (no MX records), 1 host(s)\n"),
        "{text}"
    );
    assert!(
        text.contains("  0 implicit.mail.test ttl=60 secure=no addrs=2001:db8::50\n"),
        "{text}"
    );
}

#[test]
fn debug_route_reports_failures_with_their_kind() {
    let nsd = Nsd::fixture();
    let out = sluice(&nsd, &["debug", "route", "nullmx.mail.test"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("error (permanent): nullmx.mail.test: null MX (RFC 7505)"),
        "{}",
        stdout(&out)
    );
    assert!(stderr(&out).contains("no route"), "{}", stderr(&out));

    let out = sluice(&nsd, &["debug", "route", "partial.mail.test"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("  10 missing.hosts.mail.test ttl=60 secure=no addrs=none error=\"missing.hosts.mail.test: no such domain (NXDOMAIN)\""),
        "{text}"
    );

    // A server that does not answer: temporary, within the configured timeout.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let out = Command::new(bin())
        .args(["debug", "route", "example.test", "--set"])
        .arg(format!(
            "dns.servers=[\"{}\"]",
            silent.local_addr().expect("addr")
        ))
        .args(["--set", "dns.timeout=\"200ms\"", "--set", "dns.attempts=1"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("error (temporary): example.test: no answer from any DNS server"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn debug_dns_does_one_lookup() {
    let nsd = Nsd::fixture();
    let out = sluice(&nsd, &["debug", "dns", "MX", "equal.mail.test"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("MX equal.mail.test: NOERROR records=5 ttl=300 secure=no time="),
        "{text}"
    );
    assert!(
        text.contains("  300 MX 20 backup.hosts.mail.test\n"),
        "{text}"
    );

    let out = sluice(&nsd, &["debug", "dns", "ptr", "192.0.2.1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("PTR 1.2.0.192.in-addr.arpa: NOERROR records=1"),
        "{text}"
    );
    assert!(text.contains("  300 PTR a.hosts.mail.test\n"), "{text}");

    let out = sluice(&nsd, &["debug", "dns", "TXT", "longtxt.mail.test"]);
    let joined = format!("{}{}{}", "a".repeat(200), "b".repeat(200), "c".repeat(200));
    assert!(
        stdout(&out).contains(&format!("  300 TXT \"{joined}\"\n")),
        "{}",
        stdout(&out)
    );

    let out = sluice(&nsd, &["debug", "dns", "A", "chain1.mail.test"]);
    let text = stdout(&out);
    assert!(
        text.contains(
            "  300 CNAME chain2.mail.test\n  300 CNAME chain3.mail.test\n  300 A 192.0.2.60\n"
        ),
        "{text}"
    );

    let out = sluice(&nsd, &["debug", "dns", "A", "missing.mail.test"]);
    assert!(out.status.success(), "a negative answer is an answer");
    assert!(
        stdout(&out).starts_with("A missing.mail.test: NXDOMAIN records=0 ttl=60"),
        "{}",
        stdout(&out)
    );

    let out = sluice(&nsd, &["debug", "dns", "A", "loop1.mail.test"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("CNAME loop"), "{}", stderr(&out));

    let out = sluice(&nsd, &["debug", "dns", "SRV", "x.mail.test"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unknown record type"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn debug_uses_the_config_file() {
    let nsd = Nsd::fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sluice.toml");
    std::fs::write(
        &path,
        format!(
            "[dns]\nservers = [\"{}\"]\nip_preference = \"ipv4-only\"\n",
            nsd.addr
        ),
    )
    .expect("write config");
    let out = Command::new(bin())
        .args(["debug", "route", "dualmx.mail.test", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("  10 c.hosts.mail.test ttl=300 secure=no addrs=192.0.2.3\n"),
        "{}",
        stdout(&out)
    );

    // A bad [dns] key is named with its line.
    std::fs::write(&path, "[dns]\ntimeout = \"2s\"\nretries = 3\n").expect("write");
    let out = Command::new(bin())
        .args(["debug", "route", "x.test", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("retries") && err.contains("line 3"), "{err}");
}
