use std::sync::OnceLock;

use rsa::pkcs1::EncodeRsaPrivateKey;

use super::*;

/// RSA key generation is slow: one 2048-bit key for every test.
fn rsa_pem() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| {
        generate_key(SigningAlgorithm::RsaSha256, 2048)
            .unwrap()
            .private_pem
    })
}

struct Keys {
    dir: std::path::PathBuf,
}

impl Keys {
    fn new(tag: &str) -> Keys {
        let dir = std::env::temp_dir().join(format!("sluice-dkim-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("rsa.pem"), rsa_pem()).unwrap();
        let ed = generate_key(SigningAlgorithm::Ed25519Sha256, 0).unwrap();
        std::fs::write(dir.join("ed.pem"), ed.private_pem).unwrap();
        Keys { dir }
    }
    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config(text: &str) -> DkimConfig {
    toml::from_str(text).unwrap()
}

fn facts<'a>(listener: &'a str, sender: &'a str, auth: Option<&'a str>) -> MessageFacts<'a> {
    MessageFacts {
        listener,
        client_ip: Some("192.0.2.7".parse().unwrap()),
        auth_user: auth,
        sender,
        priority: 0,
        size: 100,
    }
}

fn two_signers(keys: &Keys) -> String {
    format!(
        r#"
[signer.rsa]
domain = "example.org"
selector = "s1"
key = "{}"
[signer.ed]
domain = "example.org"
selector = "e1"
algorithm = "ed25519-sha256"
key = "{}"
"#,
        keys.path("rsa.pem"),
        keys.path("ed.pem")
    )
}

#[test]
fn first_matching_rule_decides_and_no_match_is_unsigned() {
    let keys = Keys::new("select");
    let text = format!(
        r#"{}
[[rule]]
match.listener = "inbound"
sign = []
[[rule]]
match.sender_domain = ["example.org", "*.example.org"]
sign = ["rsa", "ed"]
[[rule]]
match.authenticated = true
match.queue = "bulk"
sign = "ed"
"#,
        two_signers(&keys)
    );
    let policy = DkimPolicy::from_config(&config(&text), &["bulk"]).unwrap();
    let names = |f: &MessageFacts, q: &str| policy.names(policy.select(f, q));
    // Dual signing, in the rule's order.
    assert_eq!(
        names(&facts("smtp", "a@example.org", None), "default"),
        "rsa,ed"
    );
    assert_eq!(
        names(&facts("smtp", "a@News.Example.org", None), "default"),
        "rsa,ed"
    );
    // An earlier rule with sign = [] wins over a later one that would sign.
    assert_eq!(
        names(&facts("inbound", "a@example.org", None), "default"),
        ""
    );
    // Queue and authentication together.
    assert_eq!(
        names(&facts("smtp", "a@other.test", Some("u")), "bulk"),
        "ed"
    );
    assert_eq!(
        names(&facts("smtp", "a@other.test", Some("u")), "default"),
        ""
    );
    assert_eq!(names(&facts("smtp", "a@other.test", None), "bulk"), "");
    // The null sender (notices) has no domain.
    assert_eq!(names(&facts("dsn", "", None), "default"), "");
    assert!(!policy.is_off());
    assert!(policy.any_rsa(policy.select(&facts("smtp", "a@example.org", None), "default")));
}

#[test]
fn auth_user_sender_glob_and_client_ip() {
    let keys = Keys::new("match");
    let text = format!(
        r#"{}
[[rule]]
match.auth_user = ["alice"]
match.sender = "bounces-*@example.org"
match.client_ip = "192.0.2.0/24"
sign = "rsa"
"#,
        two_signers(&keys)
    );
    let policy = DkimPolicy::from_config(&config(&text), &[]).unwrap();
    let hit = facts("smtp", "bounces-42@example.org", Some("alice"));
    assert_eq!(policy.names(policy.select(&hit, "default")), "rsa");
    for miss in [
        facts("smtp", "bounces-42@example.org", Some("bob")),
        facts("smtp", "news@example.org", Some("alice")),
        facts("smtp", "bounces-42@example.org", None),
    ] {
        assert!(policy.select(&miss, "default").is_empty(), "{miss:?}");
    }
    let mut elsewhere = hit;
    elsewhere.client_ip = Some("198.51.100.1".parse().unwrap());
    assert!(policy.select(&elsewhere, "default").is_empty());
    elsewhere.client_ip = None;
    assert!(policy.select(&elsewhere, "default").is_empty());
}

#[test]
fn arc_seal_comes_from_the_first_matching_rule() {
    let keys = Keys::new("seal");
    let text = format!(
        r#"{}
[[rule]]
match.listener = "forward"
arc_seal = "rsa"
[[rule]]
match.sender_domain = "example.org"
sign = "ed"
arc_seal = "ed"
[[rule]]
match.listener = "smtp"
sign = "rsa"
"#,
        two_signers(&keys)
    );
    let policy = DkimPolicy::from_config(&config(&text), &[]).unwrap();
    let seal = |f: &MessageFacts| policy.select_seal(f, "default").map(|s| s.name.clone());
    // A rule that only seals signs nothing.
    let fwd = facts("forward", "a@example.org", None);
    assert_eq!(seal(&fwd).as_deref(), Some("rsa"));
    assert_eq!(policy.names(policy.select(&fwd, "default")), "");
    // Sealing and signing from the same rule.
    assert_eq!(
        seal(&facts("smtp", "a@example.org", None)).as_deref(),
        Some("ed")
    );
    // The first matching rule has no arc_seal: not sealed, even though a
    // later rule would seal.
    assert_eq!(seal(&facts("smtp", "a@other.test", None)), None);
    assert_eq!(seal(&facts("other", "a@other.test", None)), None);

    // Without any arc_seal, nothing is sealed.
    let plain = format!("{}\n[[rule]]\nsign = \"rsa\"\n", two_signers(&keys));
    let policy = DkimPolicy::from_config(&config(&plain), &[]).unwrap();
    assert!(policy
        .select_seal(&facts("smtp", "a@example.org", None), "default")
        .is_none());
}

fn plan_error(text: &str) -> String {
    DkimPlan::new(&config(text), &[]).unwrap_err().to_string()
}

#[test]
fn configuration_errors_name_signer_or_rule_and_key() {
    let base = "[signer.a]\ndomain = \"example.org\"\nselector = \"s\"\nkey = \"/k\"\n";
    let cases = [
        (
            "[signer.a]\ndomain = \"exa mple\"\nselector = \"s\"\nkey = \"/k\"\n".to_string(),
            "dkim.signer.a.domain",
        ),
        (
            "[signer.a]\ndomain = \"example.org\"\nselector = \"\"\nkey = \"/k\"\n".to_string(),
            "dkim.signer.a.selector",
        ),
        (format!("{base}canonicalization = \"relaxed\"\n"), "dkim.signer.a.canonicalization"),
        (format!("{base}expire = \"soon\"\n"), "dkim.signer.a.expire"),
        (format!("{base}headers = [\"From\", \"Bad Name\"]\n"), "dkim.signer.a.headers"),
        (format!("{base}headers = [\"DKIM-Signature\"]\n"), "dkim.signer.a.headers"),
        (format!("{base}[[rule]]\nsign = [\"nope\"]\n"), "dkim rule 1: sign"),
        (format!("{base}[[rule]]\nmatch.listener = \"x\"\n"), "dkim rule 1: sign"),
        (format!("{base}[[rule]]\nsign = [\"a\", \"a\"]\n"), "dkim rule 1: sign"),
        (format!("{base}[[rule]]\narc_seal = \"nope\"\n"), "dkim rule 1: arc_seal"),
        (
            format!("{base}[[rule]]\nsign = []\n[[rule]]\nmatch.queue = \"bulk\"\nsign = \"a\"\n"),
            "dkim rule 2: match.queue",
        ),
        (
            format!("{base}[[rule]]\nmatch.sender_domain = \"*\"\nsign = \"a\"\n"),
            "dkim rule 1: match.sender_domain",
        ),
        (
            format!("{base}[[rule]]\nmatch.authenticated = false\nmatch.auth_user = \"u\"\nsign = \"a\"\n"),
            "dkim rule 1: match.auth_user",
        ),
    ];
    for (text, want) in cases {
        let err = plan_error(&text);
        assert!(err.starts_with(want), "{text}\n=> {err}");
    }
    // The shape is strict too.
    assert!(toml::from_str::<DkimConfig>(&format!("{base}colour = 1\n")).is_err());
    assert!(toml::from_str::<DkimConfig>(&format!("{base}algorithm = \"rsa-sha1\"\n")).is_err());
}

#[test]
fn keys_are_checked_at_load() {
    let keys = Keys::new("load");
    let signer = |alg: &str, key: &str| {
        config(&format!(
            "[signer.x]\ndomain = \"example.org\"\nselector = \"s\"\nalgorithm = \"{alg}\"\nkey = \"{key}\"\n"
        ))
    };
    // A small RSA key is refused with its size.
    let small = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1024).unwrap();
    let small_pem = small.to_pkcs1_pem(LineEnding::LF).unwrap();
    std::fs::write(keys.dir.join("small.pem"), small_pem.as_bytes()).unwrap();
    let err = DkimPolicy::from_config(&signer("rsa-sha256", &keys.path("small.pem")), &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("dkim.signer.x.key:") && err.contains("1024 bits"),
        "{err}"
    );
    // Wrong algorithm for the key, a missing file, garbage.
    for (alg, file) in [
        ("ed25519-sha256", "rsa.pem"),
        ("rsa-sha256", "ed.pem"),
        ("rsa-sha256", "missing.pem"),
    ] {
        let err = DkimPolicy::from_config(&signer(alg, &keys.path(file)), &[])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("dkim.signer.x.key:"), "{alg} {file}: {err}");
    }
    // PKCS#1 PEM and DER (PKCS#1 and PKCS#8) load as well as PKCS#8 PEM.
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(rsa_pem()).unwrap();
    std::fs::write(
        keys.dir.join("p1.pem"),
        key.to_pkcs1_pem(LineEnding::LF).unwrap().as_bytes(),
    )
    .unwrap();
    std::fs::write(
        keys.dir.join("p1.der"),
        key.to_pkcs1_der().unwrap().as_bytes(),
    )
    .unwrap();
    std::fs::write(
        keys.dir.join("p8.der"),
        key.to_pkcs8_der().unwrap().as_bytes(),
    )
    .unwrap();
    let reference =
        DkimPolicy::from_config(&signer("rsa-sha256", &keys.path("rsa.pem")), &[]).unwrap();
    for file in ["p1.pem", "p1.der", "p8.der"] {
        let p = DkimPolicy::from_config(&signer("rsa-sha256", &keys.path(file)), &[]).unwrap();
        assert!(p.same_signers(&reference), "{file}");
    }
    let ed = DkimPolicy::from_config(&signer("ed25519-sha256", &keys.path("ed.pem")), &[]).unwrap();
    assert!(!ed.same_signers(&reference));
    assert_eq!(ed.signers()[0].public_key.len(), 32);
}

const MESSAGE: &[u8] = b"Received: from client by relay; Sat, 5 Dec 2026 16:00:00 +0000\r\n\
From: Alice <alice@example.org>\r\n\
To: bob@example.net\r\n\
Subject: hello\r\n\
\r\n\
Body text.\r\n";

#[test]
fn signatures_carry_the_signer_and_over_sign_from() {
    let keys = Keys::new("sign");
    let text = format!(
        "{}expire = \"7d\"\n[[rule]]\nsign = [\"rsa\", \"ed\"]\n",
        two_signers(&keys)
    );
    let policy = DkimPolicy::from_config(&config(&text), &[]).unwrap();
    let chosen = policy.select(&facts("smtp", "alice@example.org", None), "default");
    let mut timed = Vec::new();
    let prefix = policy
        .sign(chosen, MESSAGE, |i, _| {
            timed.push(policy.signers()[i].name.clone())
        })
        .unwrap();
    assert_eq!(timed, ["rsa", "ed"]);
    let text = String::from_utf8(prefix).unwrap();
    let fields: Vec<&str> = text
        .split("DKIM-Signature: ")
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(fields.len(), 2, "{text}");
    assert!(
        fields[0].starts_with("v=1; a=rsa-sha256; s=s1; d=example.org; c=relaxed/relaxed;"),
        "{text}"
    );
    assert!(
        fields[1].starts_with("v=1; a=ed25519-sha256; s=e1; d=example.org;"),
        "{text}"
    );
    // Only the Ed25519 signer has `expire` (the last table in the text).
    assert!(!fields[0].replace("\r\n\t", " ").contains(" x="), "{text}");
    assert!(fields[1].replace("\r\n\t", " ").contains(" x="), "{text}");
    for f in &fields {
        let unfolded = f.replace("\r\n\t", " ");
        // From signed for the one present and once more for any added later.
        let h = unfolded
            .split("h=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap();
        let names: Vec<&str> = h.split(':').map(str::trim).collect();
        assert_eq!(
            names
                .iter()
                .filter(|n| n.eq_ignore_ascii_case("from"))
                .count(),
            2,
            "{h}"
        );
        assert!(
            !names.iter().any(|n| n.eq_ignore_ascii_case("received")),
            "{h}"
        );
        assert!(!unfolded.contains(" l="), "{unfolded}");
        assert!(f.ends_with(";\r\n"), "{f:?}");
    }
    // Nothing chosen: nothing to add.
    assert!(policy.sign(&[], MESSAGE, |_, _| {}).unwrap().is_empty());
}

#[test]
fn txt_record_is_split_into_255_byte_strings() {
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(rsa_pem()).unwrap();
    let public = rsa::RsaPublicKey::from(&key).to_public_key_der().unwrap();
    let line = txt_record(
        "s2026",
        "example.org.",
        SigningAlgorithm::RsaSha256,
        public.as_bytes(),
    );
    assert!(
        line.starts_with("s2026._domainkey.example.org. IN TXT \"v=DKIM1; k=rsa; p=MII"),
        "{line}"
    );
    let strings: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
    assert_eq!(strings.len(), 2, "{line}");
    assert_eq!(strings[0].len(), 255);
    assert!(strings[1].len() <= 255);
    let ed = generate_key(SigningAlgorithm::Ed25519Sha256, 0).unwrap();
    let line = txt_record(
        "e",
        "example.org",
        SigningAlgorithm::Ed25519Sha256,
        &ed.public_key,
    );
    assert!(
        line.starts_with("e._domainkey.example.org. IN TXT \"v=DKIM1; k=ed25519; p="),
        "{line}"
    );
    assert_eq!(line.matches('"').count(), 2, "{line}");
    assert!(generate_key(SigningAlgorithm::RsaSha256, 1024).is_err());
}

/// With `bare_newline = "accept"` the spool can hold bare LF line ends, which
/// the outbound encoder sends as CRLF: the body hash must be the same for both.
#[test]
fn bare_lf_body_hashes_like_its_crlf_form() {
    let keys = Keys::new("lf");
    let text = format!("{}[[rule]]\nsign = \"ed\"\n", two_signers(&keys));
    let policy = DkimPolicy::from_config(&config(&text), &[]).unwrap();
    let bh = |m: &[u8]| {
        let f = String::from_utf8(policy.sign(&[1], m, |_, _| {}).unwrap()).unwrap();
        let f = f.replace("\r\n\t", " ");
        f.split("bh=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string()
    };
    let crlf = b"From: a@example.org\r\nSubject: s\r\n\r\nline one\r\nline  two \r\n\r\n";
    let lf = b"From: a@example.org\r\nSubject: s\r\n\r\nline one\nline  two \n\n";
    assert_eq!(bh(lf), bh(crlf));
}
