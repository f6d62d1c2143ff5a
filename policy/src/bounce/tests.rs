//! Classification against replies shaped like the big providers' (texts in
//! our own words, codes and markers as the providers send them) and sluice's
//! own local replies.

use super::*;

/// "550 5.1.1 text" → parts.
fn parts(line: &str) -> (u16, Option<Enhanced>, String) {
    let (code, rest) = line.split_once(' ').unwrap_or((line, ""));
    let code: u16 = code.parse().unwrap_or(0);
    let (first, after) = rest.split_once(' ').unwrap_or((rest, ""));
    let nums: Vec<&str> = first.split('.').collect();
    let enhanced = if nums.len() == 3 && nums.iter().all(|n| n.parse::<u16>().is_ok()) {
        Some(Enhanced {
            class: nums[0].parse().unwrap_or(0),
            subject: nums[1].parse().unwrap_or(0),
            detail: nums[2].parse().unwrap_or(0),
        })
    } else {
        None
    };
    let text = if enhanced.is_some() { after } else { rest };
    (code, enhanced, text.to_string())
}

fn class_of(c: &Classifier, line: &str) -> BounceClass {
    let (code, enhanced, text) = parts(line);
    c.classify(&ReplyParts {
        code,
        enhanced,
        text: &text,
    })
}

/// (reply as received, expected class).
const FIXTURES: &[(&str, &str)] = &[
    // Gmail-shaped.
    ("550 5.1.1 The mailbox you addressed does not exist here. Check the spelling. https://support.example/mail/?p=NoSuchUser x1si", "invalid-recipient"),
    ("452 4.2.2 The account you wrote to is over quota and cannot take mail now. https://support.example/mail/?p=OverQuota y2si", "mailbox-full"),
    ("421 4.7.28 We have seen an unusual rate of unsolicited mail from your IP 192.0.2.1; try later. z3si", "rate-limited"),
    ("550 5.7.1 This message looks like spam and was refused to protect our users. q4si", "content-block"),
    ("550 5.7.26 Mail from your domain was refused: it is unauthenticated (DMARC policy of the sender domain). w5si", "policy-block"),
    ("552 5.2.3 Your message is larger than our limit of 25 MB. e6si", "message-too-large"),
    ("530 5.7.0 Authentication required to send here.", "auth-required"),
    ("530 5.7.0 Must issue a STARTTLS command first.", "tls-required"),
    // Yahoo-shaped.
    ("421 4.7.0 [TSS04] Mail from 192.0.2.1 deferred for now: unexpected volume or complaints from users", "rate-limited"),
    ("554 5.7.9 Message refused by our content policy (spam).", "content-block"),
    ("553 5.7.1 [BL21] Connections from 192.0.2.1 refused; the IP is listed on the Spamhaus list", "policy-block"),
    ("552 1 Requested mail action aborted, mailbox not found", "invalid-recipient"),
    // Microsoft-shaped.
    ("550 5.7.1 Messages from [192.0.2.1] were not sent: part of your provider's network is on our block list (S3150).", "policy-block"),
    ("550 5.7.606 Access denied, banned sending IP [192.0.2.1].", "policy-block"),
    ("550 5.5.0 Requested action not taken: mailbox unavailable", "invalid-recipient"),
    ("451 4.7.500 Server busy, please try again later from [192.0.2.1].", "rate-limited"),
    ("452 4.5.3 Too many recipients in this transaction", "rate-limited"),
    // Size.
    ("552 5.3.4 Message size exceeds fixed maximum message size", "message-too-large"),
    ("552 Message too big for this system", "message-too-large"),
    // Generic.
    ("550 No such user here", "invalid-recipient"),
    ("550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown in virtual mailbox table", "invalid-recipient"),
    ("554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.example.org", "policy-block"),
    ("550 5.7.1 Delivery not authorized", "policy-block"),
    ("450 4.2.1 Mailbox temporarily disabled", "invalid-recipient"),
    ("554 5.6.0 Message has a malformed header", "other"),
    ("500 Syntax error", "other"),
    // sluice's own local replies (engine outbound.rs, site.rs, ledger.rs, tls_policy.rs).
    ("451 4.4.1 connect to mx.example.net [192.0.2.7:25]: Connection refused (os error 111)", "network"),
    ("451 4.4.2 mx.example.net [192.0.2.7]: read timeout in Data stage", "network"),
    ("451 4.4.3 cannot route to example.net now: SERVFAIL", "dns"),
    ("550 5.1.2 cannot route to nosuch.example: NXDOMAIN", "bad-domain"),
    ("556 5.1.10 example.net does not accept mail (null MX)", "bad-domain"),
    ("451 4.7.10 TLS policy require (config): mx.example.net does not offer STARTTLS", "tls-required"),
    ("451 4.7.5 TLS policy verify (route): certificate of mx.example.net not verified: expired", "tls-required"),
    ("550 5.4.7 message expired in the queue", "expired"),
    ("454 4.7.0 smtp.example.net refused our credentials: 535 5.7.8 bad", "auth-required"),
];

#[test]
fn provider_and_local_replies_classify() {
    let c = Classifier::default();
    let mut wrong = Vec::new();
    for (line, want) in FIXTURES {
        let got = class_of(&c, line);
        if got.as_str() != *want {
            wrong.push(format!("{line:?}: got {got}, want {want}"));
        }
    }
    assert!(wrong.is_empty(), "misclassified:\n{}", wrong.join("\n"));
}

#[test]
fn shipped_rules_compile() {
    let (rules, defaults) = parse("built-in rules", DEFAULT_RULES).expect("shipped rules");
    assert!(defaults);
    assert!(rules.len() > 20, "{}", rules.len());
    assert_eq!(Classifier::default().counts().0, rules.len());
}

#[test]
fn file_rules_come_first_and_can_drop_defaults() {
    let file = r#"
[[rule]]
class = "policy-block"
text = 'does not exist'
"#;
    let c = Classifier::load("rules.toml", file).expect("loads");
    let (total, from_file) = c.counts();
    assert_eq!(from_file, 1);
    assert!(total > 1);
    assert_eq!(
        class_of(&c, "550 5.1.1 the mailbox does not exist"),
        BounceClass::PolicyBlock
    );
    // Shipped rules still apply after the file's.
    assert_eq!(
        class_of(&c, "452 4.2.2 over quota"),
        BounceClass::MailboxFull
    );

    let only = "defaults = false\n[[rule]]\nclass = \"rate-limited\"\ncode = 421\n";
    let c = Classifier::load("rules.toml", only).expect("loads");
    assert_eq!(c.counts(), (1, 1));
    assert_eq!(
        class_of(&c, "421 4.7.0 slow down"),
        BounceClass::RateLimited
    );
    assert_eq!(class_of(&c, "550 5.1.1 no such user"), BounceClass::Other);
}

#[test]
fn enhanced_prefixes_and_codes_combine() {
    let file = "defaults = false\n\
        [[rule]]\nclass = \"mailbox-full\"\nenhanced = \"x.2\"\ncode = [452, 552]\n\
        [[rule]]\nclass = \"dns\"\nenhanced = \"4\"\n";
    let c = Classifier::load("f", file).expect("loads");
    assert_eq!(class_of(&c, "552 5.2.0 full"), BounceClass::MailboxFull);
    assert_eq!(class_of(&c, "452 4.2.9 full"), BounceClass::MailboxFull);
    // Right status, wrong code: falls through to the next rule.
    assert_eq!(class_of(&c, "450 4.2.2 full"), BounceClass::Dns);
    // A reply without an enhanced status never matches `enhanced`.
    assert_eq!(class_of(&c, "452 full"), BounceClass::Other);
}

#[test]
fn errors_name_key_and_line() {
    let bad_regex = "\n[[rule]]\nclass = \"dns\"\ntext = '(unclosed'\n";
    let e = Classifier::load("/etc/sluice/bounce.toml", bad_regex)
        .expect_err("bad regex")
        .to_string();
    assert!(e.contains("/etc/sluice/bounce.toml"), "{e}");
    assert!(e.contains("rule 1: text (line 4)"), "{e}");
    assert!(e.contains("invalid regex"), "{e}");

    let bad_class = "[[rule]]\nclass = \"spammy\"\ncode = 550\n";
    let e = Classifier::load("f", bad_class)
        .expect_err("class")
        .to_string();
    assert!(e.contains("rule 1: class (line 2)"), "{e}");
    assert!(e.contains("unknown bounce class `spammy`"), "{e}");

    let bad_prefix = "[[rule]]\nclass = \"dns\"\nenhanced = [\"5.1\", \"6.1\"]\n";
    let e = Classifier::load("f", bad_prefix)
        .expect_err("prefix")
        .to_string();
    assert!(e.contains("rule 1: enhanced (line 3)"), "{e}");

    let bad_code = "[[rule]]\nclass = \"dns\"\n\ncode = [99]\n";
    let e = Classifier::load("f", bad_code)
        .expect_err("code")
        .to_string();
    assert!(e.contains("rule 1: code (line 4)"), "{e}");

    let empty = "[[rule]]\nclass = \"dns\"\n";
    let e = Classifier::load("f", empty).expect_err("empty").to_string();
    assert!(e.contains("needs at least one of"), "{e}");

    let unknown_key = "[[rule]]\nclass = \"dns\"\ncode = 421\nregex = 'x'\n";
    let e = Classifier::load("f", unknown_key)
        .expect_err("key")
        .to_string();
    assert!(e.contains("line"), "{e}");

    let syntax = "[[rule]\n";
    let e = Classifier::load("f", syntax)
        .expect_err("syntax")
        .to_string();
    assert!(e.contains("syntax (line 1)"), "{e}");
}

#[test]
fn long_text_is_bounded() {
    let c = Classifier::default();
    let mut text = "x".repeat(MAX_TEXT + 10);
    text.push_str(" does not exist");
    // The marker sits past the bound: not seen.
    assert_eq!(
        c.classify(&ReplyParts {
            code: 550,
            enhanced: None,
            text: &text
        }),
        BounceClass::Other
    );
    // A cut inside a multi-byte character does not panic.
    let multi = "é".repeat(MAX_TEXT);
    let _ = c.classify(&ReplyParts {
        code: 550,
        enhanced: None,
        text: &multi,
    });
}

#[test]
fn class_names_round_trip() {
    for c in BounceClass::ALL {
        assert_eq!(c.as_str().parse::<BounceClass>(), Ok(c));
    }
    assert!("nope".parse::<BounceClass>().is_err());
}
