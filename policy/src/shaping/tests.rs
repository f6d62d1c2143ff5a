use super::*;

fn rules(toml_text: &str) -> Result<ShapingRules, ShapingError> {
    #[derive(Deserialize)]
    struct File {
        rule: Vec<ShapingRuleConfig>,
    }
    let f: File = toml::from_str(toml_text).expect("toml");
    ShapingRules::compile(&f.rule)
}

fn reply(code: u16, esc: Option<(u8, u16, u16)>, text: &str) -> Observed<'_> {
    Observed {
        reply: ReplyParts {
            code,
            enhanced: esc.map(|(c, s, d)| enhanced(c, s, d)),
            text,
        },
        class: None,
    }
}

const TSS04: &str = r#"
[[rule]]
name = "yahoo-tss04"
code = [421]
enhanced = ["4.7"]
text = '\[TSS04\]'
site = "*.yahoo.test"
threshold = "3/5m"
action = "suspend"
duration = "10m"
"#;

#[test]
fn threshold_within_the_window_fires_once_then_counts_afresh() {
    let r = rules(TSS04).unwrap();
    let mut s = Shaper::default();
    let hit = reply(
        421,
        Some((4, 7, 0)),
        "4.7.0 [TSS04] Messages temporarily deferred",
    );
    let t0 = 1_000_000;
    assert!(s
        .observe(&r, "a.yahoo.test", "a.yahoo.test", &hit, t0)
        .is_empty());
    assert!(s
        .observe(&r, "a.yahoo.test", "a.yahoo.test", &hit, t0 + 1000)
        .is_empty());
    let fired = s.observe(&r, "a.yahoo.test", "a.yahoo.test", &hit, t0 + 2000);
    assert_eq!(
        fired,
        vec![Fired {
            rule: "yahoo-tss04".into(),
            action: Action::Suspend,
            until_ms: t0 + 2000 + 600_000,
        }]
    );
    // The window starts again.
    assert!(s
        .observe(&r, "a.yahoo.test", "a.yahoo.test", &hit, t0 + 3000)
        .is_empty());
}

#[test]
fn matches_outside_the_window_do_not_count() {
    let r = rules(TSS04).unwrap();
    let mut s = Shaper::default();
    let hit = reply(421, Some((4, 7, 0)), "[TSS04]");
    let t0 = 10_000_000;
    s.observe(&r, "y", "mx.yahoo.test", &hit, t0);
    s.observe(&r, "y", "mx.yahoo.test", &hit, t0 + 100);
    // 5 minutes later the first two are gone.
    assert!(s
        .observe(&r, "y", "mx.yahoo.test", &hit, t0 + 300_100)
        .is_empty());
    assert!(s
        .observe(&r, "y", "mx.yahoo.test", &hit, t0 + 300_200)
        .is_empty());
    assert_eq!(
        s.observe(&r, "y", "mx.yahoo.test", &hit, t0 + 300_300)
            .len(),
        1
    );
}

#[test]
fn every_key_must_hold_and_sites_count_apart() {
    let r = rules(TSS04).unwrap();
    let mut s = Shaper::default();
    let t = 5_000_000;
    for _ in 0..5 {
        // Wrong code, wrong enhanced, wrong text, out of scope.
        assert!(s
            .observe(
                &r,
                "a",
                "a.yahoo.test",
                &reply(451, Some((4, 7, 0)), "[TSS04]"),
                t
            )
            .is_empty());
        assert!(s
            .observe(
                &r,
                "a",
                "a.yahoo.test",
                &reply(421, Some((4, 4, 0)), "[TSS04]"),
                t
            )
            .is_empty());
        assert!(s
            .observe(&r, "a", "a.yahoo.test", &reply(421, None, "[TSS04]"), t)
            .is_empty());
        assert!(s
            .observe(
                &r,
                "a",
                "a.yahoo.test",
                &reply(421, Some((4, 7, 0)), "busy"),
                t
            )
            .is_empty());
        assert!(s
            .observe(
                &r,
                "b",
                "b.example.test",
                &reply(421, Some((4, 7, 0)), "[tss04]"),
                t
            )
            .is_empty());
    }
    let hit = reply(421, Some((4, 7, 0)), "[tss04]");
    s.observe(&r, "a", "a.yahoo.test", &hit, t);
    s.observe(&r, "b", "yahoo.test", &hit, t);
    s.observe(&r, "a", "a.yahoo.test", &hit, t);
    assert!(s.observe(&r, "b", "yahoo.test", &hit, t).is_empty());
    assert_eq!(s.observe(&r, "a", "a.yahoo.test", &hit, t).len(), 1);
}

#[test]
fn class_matching_and_valued_actions() {
    let r = rules(
        r#"
[[rule]]
name = "blocked"
class = ["policy-block"]
threshold = "1/1m"
action = "bounce"
duration = "1h"

[[rule]]
name = "slow"
code = [421, 451]
threshold = "2/1m"
action = "message-rate"
message_rate = "10/m"
duration = "30m"

[[rule]]
name = "fewer"
code = [451]
threshold = "1/1m"
action = "connections"
connections = 2
duration = "5m"
"#,
    )
    .unwrap();
    let mut s = Shaper::default();
    let mut block = reply(550, Some((5, 7, 1)), "blocked");
    assert!(
        s.observe(&r, "x", "x", &block, 1_000_000).is_empty(),
        "no class given"
    );
    block.class = Some(BounceClass::PolicyBlock);
    let f = s.observe(&r, "x", "x", &block, 1_000_000);
    assert_eq!(f[0].action, Action::Bounce);
    let f = s.observe(&r, "x", "x", &reply(451, None, "later"), 1_000_000);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].action, Action::Connections(2));
    let f = s.observe(&r, "x", "x", &reply(451, None, "later"), 1_000_000);
    let names: Vec<_> = f.iter().map(|f| f.action.to_string()).collect();
    assert_eq!(names, vec!["message-rate=10/m", "connections=2"]);
}

#[test]
fn bad_rules_name_the_rule_and_key() {
    let base = |extra: &str| {
        format!("[[rule]]\nname = \"r\"\nthreshold = \"3/5m\"\nduration = \"1h\"\n{extra}\n")
    };
    let cases = [
        ("action = \"suspend\"", "code"),
        ("code = [421]\naction = \"explode\"", "action"),
        ("code = [421]\naction = \"connections\"", "connections"),
        ("code = [421]\naction = \"message-rate\"", "message_rate"),
        (
            "code = [421]\naction = \"suspend\"\nconnections = 2",
            "connections",
        ),
        ("code = [999]\naction = \"suspend\"", "code"),
        ("enhanced = [\"4.x\"]\naction = \"suspend\"", "enhanced"),
        ("text = \"(\"\naction = \"suspend\"", "text"),
        ("code = [421]\nsite = \"a*b\"\naction = \"suspend\"", "site"),
    ];
    for (extra, key) in cases {
        let e = rules(&base(extra)).unwrap_err();
        assert_eq!(e.key, key, "{extra}: {e}");
        assert_eq!(e.rule, 1);
        assert!(e.to_string().starts_with("shaping.rule 1 (r): "), "{e}");
    }
    let e = rules("[[rule]]\nname = \"r\"\ncode = [421]\nthreshold = \"3/5m\"\naction = \"suspend\"\nduration = \"forever\"\n").unwrap_err();
    assert_eq!(e.key, "duration");
}

#[test]
fn actions_round_trip_through_their_stored_form() {
    for a in [
        Action::Suspend,
        Action::SuspendSourceIp,
        Action::Connections(3),
        Action::MessageRate("5/m".parse().unwrap()),
        Action::Bounce,
        Action::Backoff,
    ] {
        assert_eq!(Action::from_parts(a.name(), &a.value()), Some(a));
    }
    assert_eq!(Action::from_parts("connections", "0"), None);
    assert_eq!(Action::from_parts("nope", ""), None);
}

#[test]
fn slow_start_grows_with_successes_and_halves_on_deferrals() {
    let mut s = SlowStart::new(2, 10);
    assert_eq!(s.limit(), 2);
    // Fast growth before any deferral: one per success.
    for _ in 0..3 {
        s.success(false);
    }
    assert_eq!(s.limit(), 5);
    s.deferral();
    assert_eq!(s.limit(), 2);
    // Additive now: `limit` successes per step.
    s.success(false);
    assert_eq!(s.limit(), 2);
    s.success(false);
    assert_eq!(s.limit(), 3);
    for _ in 0..100 {
        s.success(false);
    }
    assert_eq!(s.limit(), 10, "bounded by the configured limit");
    for _ in 0..10 {
        s.deferral();
    }
    assert_eq!(s.limit(), 1, "never below one");
    // Backoff mode: ten times slower.
    for _ in 0..9 {
        s.success(true);
    }
    assert_eq!(s.limit(), 1);
    s.success(true);
    assert_eq!(s.limit(), 2);
    assert_eq!(SlowStart::new(5, 3).limit(), 3);
    assert_eq!(SlowStart::new(0, 3).limit(), 1);
}

#[test]
fn windows_are_bounded() {
    let r = rules(TSS04).unwrap();
    let mut s = Shaper::default();
    let hit = reply(421, Some((4, 7, 0)), "[TSS04]");
    for i in 0..(MAX_TRACKED as u64 + 10) {
        s.observe(&r, &format!("s{i}"), "yahoo.test", &hit, 1_000 + i);
    }
    assert!(s.tracked() <= MAX_TRACKED);
}

#[test]
fn slow_start_follows_a_new_ceiling() {
    let mut s = SlowStart::new(4, 8);
    s.set_max(2);
    assert_eq!(s.limit(), 2, "a lower ceiling caps the window at once");
    s.success(false);
    assert_eq!(s.limit(), 2);
    s.set_max(3);
    s.success(false);
    assert_eq!(s.limit(), 3, "a higher ceiling is grown into");
    s.set_max(0);
    assert_eq!(s.limit(), 1, "never below one connection");
}
