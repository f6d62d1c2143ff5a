//! The rewriting decisions and message edits, driven directly.

use super::*;

fn rule(toml_text: &str) -> RewriteRuleConfig {
    toml::from_str(toml_text).expect("rule parses")
}

fn lists() -> Arc<Lists> {
    Arc::new(Lists::from_entries([
        (
            "aliases",
            vec!["info@local.test team@remote.test", "@old.test @new.test"],
        ),
        ("vips", vec!["@vip.test"]),
    ]))
}

fn srs() -> Arc<Srs> {
    Arc::new(Srs::new(
        "srs.local.test",
        &["0123456789abcdef".into()],
        21,
        4,
    ))
}

fn rewriter(rules: &[&str], listener: &str) -> Option<Arc<Rewriter>> {
    let rules: Vec<_> = rules.iter().map(|r| rule(r)).collect();
    Rewriter::build(listener, &rules, Some(srs()), lists()).expect("builds")
}

#[test]
fn regex_and_map_rewrite_sender_and_recipient() {
    let r = rewriter(
        &[
            r#"sender = { regex = '^(.*)@old\.test$', replace = '$1@new.test' }
               headers = true"#,
            r#"recipient_map = "aliases""#,
        ],
        "smtp",
    )
    .expect("some");
    assert_eq!(
        r.sender(false, "Ann@OLD.test"),
        Some(Rewritten {
            address: "Ann@new.test".into(),
            rule: 1,
            headers: true
        })
    );
    assert_eq!(r.sender(false, "ann@other.test"), None);
    assert_eq!(r.sender(false, ""), None);
    let rewritten = |a: &str| match r.recipient(false, "s@x.test", a, 0) {
        RecipientRewrite::Rewritten(w) => Some(w.address),
        _ => None,
    };
    assert_eq!(
        rewritten("INFO@local.test").as_deref(),
        Some("team@remote.test")
    );
    assert_eq!(rewritten("bob@old.test").as_deref(), Some("bob@new.test"));
    assert_eq!(rewritten("bob@else.test"), None);
}

#[test]
fn scope_by_listener_direction_and_sender() {
    let rules = [
        r#"match.listener = "submission"
           match.direction = "outbound"
           sender = { regex = '^(.*)@a\.test$', replace = '$1@b.test' }"#,
        r#"match.sender_list = "vips"
           recipient = { regex = '^x@', replace = 'y@' }"#,
    ];
    let sub = rewriter(&rules, "submission").expect("some");
    assert!(sub.sender(true, "u@a.test").is_some());
    assert_eq!(sub.sender(false, "u@a.test"), None, "inbound client");
    // Without SRS and without a rule for it, a listener has no rewriter.
    let none = Rewriter::build("mx", &[rule(rules[0])], None, lists()).expect("builds");
    assert!(none.is_none());
    let mx = rewriter(&rules, "mx").expect("srs");
    assert_eq!(mx.sender(true, "u@a.test"), None);
    assert!(matches!(
        mx.recipient(false, "boss@vip.test", "x@r.test", 0),
        RecipientRewrite::Rewritten(_)
    ));
    assert_eq!(
        mx.recipient(false, "nobody@else.test", "x@r.test", 0),
        RecipientRewrite::Unchanged
    );
}

#[test]
fn srs_addresses_are_reversed_or_refused() {
    let r = rewriter(&[], "smtp").expect("srs");
    let day = 20_000;
    let signed = srs().forward("alice@example.org", day).expect("signs");
    assert_eq!(
        r.recipient(false, "", &signed, day),
        RecipientRewrite::SrsReversed("alice@example.org".into())
    );
    let tampered = signed.replace("alice", "mallory");
    assert_eq!(
        r.recipient(false, "", &tampered, day),
        RecipientRewrite::SrsRefused(SrsError::BadHash)
    );
    assert_eq!(
        r.recipient(false, "", &signed, day + 30),
        RecipientRewrite::SrsRefused(SrsError::Expired)
    );
}

#[test]
fn message_plan_collects_every_applying_rule() {
    let r = rewriter(
        &[
            r#"srs = true
               add_header = ["X-One: 1"]"#,
            r#"match.direction = "outbound"
               remove_header = ["X-Secret"]
               disclaimer = "first""#,
            r#"disclaimer = "second""#,
        ],
        "smtp",
    )
    .expect("some");
    let plan = r.message_plan(true, "s@x.test", true);
    assert!(plan.srs);
    assert_eq!(plan.add_header, vec!["X-One: 1\r\n".to_string()]);
    assert_eq!(plan.remove_header, vec!["X-Secret".to_string()]);
    assert_eq!(plan.disclaimer.map(|d| d.text), Some("first".into()));
    let plan = r.message_plan(false, "s@x.test", false);
    assert!(!plan.srs);
    assert_eq!(plan.disclaimer.map(|d| d.text), Some("second".into()));
}

#[test]
fn config_errors_name_the_key() {
    let err = |text: &str, srs: bool| {
        Rewriter::build("smtp", &[rule(text)], srs.then(srs_arc), lists())
            .err()
            .map(|e| e.0)
    };
    fn srs_arc() -> Arc<Srs> {
        srs()
    }
    assert_eq!(
        err(r#"sender = { regex = '(', replace = 'x' }"#, true).as_deref(),
        Some("rewrite[1].sender.regex")
    );
    assert_eq!(
        err(r#"recipient_map = "nope""#, true).as_deref(),
        Some("rewrite[1].recipient_map")
    );
    assert_eq!(err("srs = true", false).as_deref(), Some("rewrite[1].srs"));
    assert_eq!(
        err(r#"add_header = ["Bad Name: x"]"#, true).as_deref(),
        Some("rewrite[1].add_header")
    );
    assert_eq!(
        err("disclaimer = \"caf\u{e9}\"", true).as_deref(),
        Some("rewrite[1].disclaimer")
    );
    let bad_srs = SrsConfig {
        domain: "srs.test".into(),
        secrets: vec!["short".into()],
        max_age_days: 21,
        hash_length: 4,
    };
    assert_eq!(
        build_srs(&bad_srs).err().map(|e| e.0).as_deref(),
        Some("srs.secrets")
    );
}

#[test]
fn header_edits_and_address_rewrites() {
    let plan = MessagePlan {
        add_header: vec!["X-Added: yes\r\n".into()],
        remove_header: vec!["x-secret".into()],
        ..Default::default()
    };
    let message = b"From: Ann <ann@old.test>\r\nTo: info@local.test, xinfo@local.test\r\nX-Secret: 1\r\n\tfolded\r\nSubject: hi\r\n\r\nbody ann@old.test\r\n";
    let out = edit_message(
        message,
        &plan,
        Some(("ann@old.test", "ann@new.test")),
        &[("info@local.test".into(), "team@remote.test".into())],
    )
    .expect("changed");
    assert_eq!(
        String::from_utf8(out).expect("utf8"),
        "X-Added: yes\r\nFrom: Ann <ann@new.test>\r\nTo: team@remote.test, xinfo@local.test\r\nSubject: hi\r\n\r\nbody ann@old.test\r\n"
    );
    assert_eq!(
        edit_message(
            b"Subject: x\r\n\r\nb\r\n",
            &MessagePlan::default(),
            None,
            &[]
        ),
        None
    );
}

fn disclaimer() -> Disclaimer {
    Disclaimer {
        text: "-- \r\nConfidential.".into(),
        html: Some("<p>Confidential.</p>".into()),
    }
}

#[test]
fn disclaimer_in_a_single_text_part() {
    let out = add_disclaimer(b"Subject: x\r\n\r\nHello\r\n", &disclaimer()).expect("added");
    assert_eq!(out, b"Subject: x\r\n\r\nHello\r\n-- \r\nConfidential.\r\n");
}

#[test]
fn disclaimer_in_multipart_alternative_keeps_structure() {
    let message = b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nHello\r\n--b1\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<html><body>Hi=20there</body></html>\r\n--b1\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=a.txt\r\nContent-Transfer-Encoding: base64\r\n\r\nQUJD\r\n--b1--\r\n";
    let out = add_disclaimer(message, &disclaimer()).expect("added");
    let text = String::from_utf8(out.clone()).expect("utf8");
    assert!(
        text.contains("\r\n\r\nHello\r\n-- \r\nConfidential.\r\n--b1\r\n"),
        "{text}"
    );
    assert!(
        text.contains("Hi=20there<p>Confidential.</p></body>"),
        "{text}"
    );
    assert!(text.contains("QUJD\r\n--b1--"), "{text}");
    let parsed = mail_parser::MessageParser::new()
        .parse(&out)
        .expect("parses");
    assert_eq!(parsed.parts.len(), 4);
    assert!(parsed
        .body_text(0)
        .unwrap_or_default()
        .contains("Confidential."));
    assert!(parsed
        .body_html(0)
        .unwrap_or_default()
        .contains("<p>Confidential.</p>"));
}

#[test]
fn disclaimer_skips_signed_and_base64() {
    let signed = b"DKIM-Signature: v=1; a=rsa-sha256; d=x.test\r\nSubject: x\r\n\r\nHello\r\n";
    assert_eq!(disclaimer_skip(signed), Some(DisclaimerSkip::Signed));
    assert_eq!(add_disclaimer(signed, &disclaimer()), None);
    let smime = b"Content-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n";
    assert_eq!(disclaimer_skip(smime), Some(DisclaimerSkip::Protected));
    let b64 = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\nSGVsbG8=\r\n";
    assert_eq!(add_disclaimer(b64, &disclaimer()), None);
}

#[test]
fn quoted_printable_escapes_and_wraps() {
    assert_eq!(quoted_printable("a=b \r\nc"), b"a=3Db=20\r\nc".to_vec());
    let long = "x".repeat(100);
    let qp = quoted_printable(&long);
    assert!(qp.split(|&b| b == b'\n').all(|l| l.len() <= 77));
    assert!(qp.starts_with(&[b'x'; 75]) && qp[75..78] == *b"=\r\n");
}
