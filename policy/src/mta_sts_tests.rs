use super::*;

const GOOD: &str = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\n";

#[test]
fn txt_records() {
    assert_eq!(
        parse_txt("v=STSv1; id=20160831085700Z;").unwrap(),
        "20160831085700Z"
    );
    assert_eq!(parse_txt("v=STSv1;id=abc").unwrap(), "abc");
    assert_eq!(parse_txt("v=STSv1; ext=1; id=x1 ").unwrap(), "x1");
    for bad in [
        "v=STSv2; id=1",
        "id=1; v=STSv1",
        "v=STSv1;",
        "v=STSv1; id=",
        "v=STSv1; id=a-b",
        "v=STSv1; id=123456789012345678901234567890123",
        "v=STSv1; id=1; id=2",
        "v=STSv1; junk",
    ] {
        assert!(parse_txt(bad).is_err(), "{bad}");
    }
    assert_eq!(txt_id(["v=spf1 -all"]).unwrap(), None);
    assert_eq!(
        txt_id(["v=spf1 -all", "v=STSv1; id=7"]).unwrap(),
        Some("7".into())
    );
    assert!(txt_id(["v=STSv1; id=7", "v=STSv1; id=8"]).is_err());
}

#[test]
fn a_policy_file() {
    let p = parse_policy(GOOD).unwrap();
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(p.mx, vec!["mail.example.com", "*.example.net"]);
    assert_eq!(p.max_age, 86400);
    // LF line ends, unknown keys, a trailing dot and upper case.
    let p = parse_policy(
        "version: STSv1\nmode: testing\nfoo: bar\nmx: MX1.Example.COM.\nmax_age: 60\n",
    )
    .unwrap();
    assert_eq!(
        (p.mode, p.mx[0].as_str()),
        (Mode::Testing, "mx1.example.com")
    );
    // mode none needs no mx.
    assert_eq!(
        parse_policy("version: STSv1\nmode: none\nmax_age: 1\n")
            .unwrap()
            .mode,
        Mode::None
    );
    // max_age is capped at about a year.
    let p = parse_policy("version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 9999999999\n").unwrap();
    assert_eq!(p.max_age, MAX_AGE_LIMIT);
}

#[test]
fn bad_policy_files() {
    for (body, why) in [
        ("mode: enforce\nmx: a.b\nmax_age: 1\n", "no version"),
        (
            "version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 1\n",
            "STSv1",
        ),
        (
            "version: STSv1\nmode: strict\nmx: a.b\nmax_age: 1\n",
            "unknown mode",
        ),
        ("version: STSv1\nmx: a.b\nmax_age: 1\n", "no mode"),
        ("version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx"),
        ("version: STSv1\nmode: enforce\nmx: a.b\n", "no max_age"),
        (
            "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: -1\n",
            "max_age",
        ),
        (
            "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 12345678901\n",
            "max_age",
        ),
        (
            "version: STSv1\nmode: enforce\nmode: testing\nmx: a.b\nmax_age: 1\n",
            "twice",
        ),
        (
            "version: STSv1\nmode: enforce\nmx: a..b\nmax_age: 1\n",
            "not a host name",
        ),
        (
            "version: STSv1\nmode: enforce\nmx: a.*.b\nmax_age: 1\n",
            "not a host name",
        ),
        ("version: STSv1\nmode enforce\n", "no ':'"),
    ] {
        let e = parse_policy(body).unwrap_err().to_string();
        assert!(e.contains(why), "{body:?}: {e}");
    }
}

#[test]
fn mx_patterns() {
    let p = parse_policy(GOOD).unwrap();
    assert!(p.matches("mail.example.com"));
    assert!(p.matches("MAIL.example.com."));
    assert!(!p.matches("mail2.example.com"));
    assert!(!p.matches("example.com"));
    // The wildcard stands for exactly one label.
    assert!(p.matches("mx1.example.net"));
    assert!(!p.matches("a.mx1.example.net"));
    assert!(!p.matches("example.net"));
    assert!(!p.matches(".example.net"));
    assert!(!p.matches("mx1.example.net.evil"));
}

fn cached(id: &str, fetched: u64, max_age: u64) -> Cached {
    Cached {
        id: id.into(),
        policy: Policy {
            mode: Mode::Enforce,
            mx: vec!["mx.example.com".into()],
            max_age,
        },
        fetched,
    }
}

#[test]
fn plans() {
    let c = cached("1", 1000, 100);
    assert_eq!(c.expires(), 1100);
    let id = |s: &str| Txt::Id(s.into());
    // Same id, fresh: the cache.
    assert_eq!(plan(&id("1"), Some(&c), 1050), Plan::UseCached);
    // New id: fetch (the cached policy is the fallback).
    assert_eq!(
        plan(&id("2"), Some(&c), 1050),
        Plan::Fetch { id: "2".into() }
    );
    // Expired: fetch again even with the same id.
    assert_eq!(
        plan(&id("1"), Some(&c), 1100),
        Plan::Fetch { id: "1".into() }
    );
    // Cold: fetch.
    assert_eq!(plan(&id("1"), None, 0), Plan::Fetch { id: "1".into() });
    // No record or a failed lookup: a fresh cache still holds (§5.1)...
    assert_eq!(plan(&Txt::Absent, Some(&c), 1099), Plan::UseCached);
    assert_eq!(
        plan(&Txt::Failed("SERVFAIL".into()), Some(&c), 1099),
        Plan::UseCached
    );
    // ...an expired one does not.
    assert!(matches!(
        plan(&Txt::Absent, Some(&c), 1100),
        Plan::NoPolicy(_)
    ));
    assert!(matches!(
        plan(&Txt::Failed("x".into()), None, 0),
        Plan::NoPolicy(_)
    ));
}

#[test]
fn refresh_from_half_max_age_until_expiry() {
    // Fetched at 1000, max_age 100: due from 1050 to 1099.
    let c = cached("1", 1000, 100);
    assert_eq!(c.refresh_at(), 1050);
    assert!(!c.refresh_due(1049));
    assert!(c.refresh_due(1050));
    assert!(c.refresh_due(1099));
    // Expired: not refreshed (dropped, fetched anew on use).
    assert!(!c.refresh_due(1100));
    // max_age 1: due at once, expired a second later.
    let short = cached("1", 1000, 1);
    assert!(short.refresh_due(1000));
    assert!(!short.refresh_due(1001));
}

#[test]
fn a_failed_refresh_is_retried_after_an_eighth_of_max_age() {
    let c = cached("1", 1000, 100);
    assert_eq!(c.refresh_retry(), 12);
    assert!(should_refresh(&c, None, 1050));
    // Tried at 1050 and failed: not again before 1062.
    assert!(!should_refresh(&c, Some(1050), 1051));
    assert!(!should_refresh(&c, Some(1050), 1061));
    assert!(should_refresh(&c, Some(1050), 1062));
    // An attempt from before this policy was fetched does not count.
    assert!(should_refresh(&c, Some(990), 1050));
    // Not due: no refresh whatever the attempts.
    assert!(!should_refresh(&c, None, 1049));
    assert!(!should_refresh(&c, None, 1100));
    // The retry interval stays between 1 s and an hour.
    assert_eq!(cached("1", 0, 4).refresh_retry(), 1);
    assert_eq!(cached("1", 0, MAX_AGE_LIMIT).refresh_retry(), 3600);
}

#[test]
fn the_sweep_takes_due_policies_soonest_expiry_first_and_is_bounded() {
    let a = cached("1", 1000, 100); // due 1050, expires 1100
    let b = cached("1", 1030, 60); // due 1060, expires 1090
    let c = cached("1", 1060, 100); // due 1110
    let d = cached("1", 900, 100); // expired at 1000
    let e = cached("1", 1000, 96); // due 1048, expires 1096, retry 12 s
    let entries = || {
        vec![
            ("a.example", &a, None),
            ("b.example", &b, None),
            ("c.example", &c, None),
            ("d.example", &d, None),
            ("e.example", &e, Some(1070)),
        ]
    };
    assert_eq!(
        refresh_sweep(entries(), 1076, 10),
        vec!["b.example", "a.example"]
    );
    assert_eq!(refresh_sweep(entries(), 1076, 1), vec!["b.example"]);
    assert!(refresh_sweep(entries(), 1030, 10).is_empty());
    // e's retry interval passed (tried at 1070): it is due again.
    assert_eq!(
        refresh_sweep(entries(), 1082, 10),
        vec!["b.example", "e.example", "a.example"]
    );
}

fn response(status: &str, headers: &str, body: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status}\r\n{headers}\r\n{body}").into_bytes()
}

#[test]
fn http_responses() {
    let ok = response(
        "200 OK",
        &format!(
            "Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
            GOOD.len()
        ),
        GOOD,
    );
    assert_eq!(http_body(&ok, true).unwrap(), GOOD);
    // Until the close, no length.
    let ok = response("200 OK", "Content-Type: text/plain\r\n", GOOD);
    assert_eq!(http_body(&ok, true).unwrap(), GOOD);
    // Chunked.
    let ok = response(
        "200 OK",
        "Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n",
        "5\r\nversi\r\n3\r\non:\r\n0\r\n\r\n",
    );
    assert_eq!(http_body(&ok, true).unwrap(), "version:");
    // Redirects and other statuses are failures.
    for status in [
        "301 Moved Permanently",
        "302 Found",
        "404 Not Found",
        "500 Oops",
    ] {
        let r = response(
            status,
            "Location: https://elsewhere/\r\nContent-Type: text/plain\r\n",
            "",
        );
        assert!(
            http_body(&r, true)
                .unwrap_err()
                .to_string()
                .contains("only 200"),
            "{status}"
        );
    }
    // Wrong media type.
    let r = response("200 OK", "Content-Type: text/html\r\n", GOOD);
    assert!(http_body(&r, true)
        .unwrap_err()
        .to_string()
        .contains("text/plain"));
    // Too large: by length, by chunks, or cut off at the read bound.
    let r = response(
        "200 OK",
        "Content-Type: text/plain\r\nContent-Length: 70000\r\n",
        "",
    );
    assert!(http_body(&r, true).is_err());
    let big = "a".repeat(MAX_BODY + 1);
    let r = response("200 OK", "Content-Type: text/plain\r\n", &big);
    assert!(http_body(&r, true).is_err());
    let r = response("200 OK", "Content-Type: text/plain\r\n", "abc");
    assert!(http_body(&r, false).is_err(), "not closed within the bound");
    let chunks = format!("{:x}\r\n{big}\r\n0\r\n\r\n", big.len());
    let r = response(
        "200 OK",
        "Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n",
        &chunks,
    );
    assert!(http_body(&r, true).is_err());
    // Truncated or no headers.
    let r = response(
        "200 OK",
        "Content-Type: text/plain\r\nContent-Length: 10\r\n",
        "abc",
    );
    assert!(http_body(&r, true).is_err());
    assert!(http_body(b"HTTP/1.1 200 OK\r\n", true).is_err());
    assert!(http_body(b"SSH-2.0\r\n\r\n", true).is_err());
}

#[test]
fn when_a_response_is_complete() {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n";
    assert!(!http_done(b"HTTP/1.1 200 OK\r\n"));
    assert!(!http_done(head.as_bytes()));
    assert!(!http_done(format!("{head}abc").as_bytes()));
    assert!(http_done(format!("{head}abcde").as_bytes()));
    // A redirect is refused as soon as its headers are in.
    assert!(http_done(
        b"HTTP/1.1 301 Moved\r\nLocation: https://x/\r\n\r\n"
    ));
    // No length: only the close ends it.
    assert!(!http_done(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nabc"
    ));
}
