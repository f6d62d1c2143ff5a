//! The ledger with a manual clock: retry schedule, expiry, delay notices,
//! DELIVERBY, partial results and notices.

use std::time::Duration;

use sluice_spool::{DeliverBy, DeliverByMode, Recipient};

use super::*;
use crate::config::HumanDuration;

use super::super::timing::tests::T0;
const MIN: u64 = 60_000;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;

fn rcpt(address: &str) -> Recipient {
    Recipient {
        address: address.into(),
        orcpt: None,
        notify: Notify::default(),
        status: RecipientStatus::Pending,
        local: false,
    }
}

fn env(recipients: &[&str]) -> Envelope {
    Envelope {
        recipients: recipients.iter().map(|r| rcpt(r)).collect(),
        ..super::super::timing::tests::env()
    }
}

fn queue() -> QueueConfig {
    let m = |mins: u64| HumanDuration(Duration::from_secs(mins * 60));
    QueueConfig {
        retry: vec![m(1), m(5)],
        notify_delay: vec![m(4 * 60)],
        expire: m(24 * 60),
        ..QueueConfig::default()
    }
}

fn result(outcomes: Vec<(u32, Outcome)>, mta: Option<&str>) -> JobResult {
    JobResult {
        id: MessageId(1),
        outcomes,
        remote_mta: mta.map(str::to_string),
        peer_dsn: false,
        lmtp: false,
    }
}

fn deferred(reply: &str) -> Outcome {
    Outcome::Deferred(reply.into())
}

/// One attempt of every recipient with `outcome` at `now`.
fn attempt_all(e: Envelope, outcome: Outcome, now: u64) -> (Envelope, Vec<Effect>) {
    let n = e.recipients.len() as u32;
    let mut a = Attempt::new(e, 1, true);
    assert!(a.record(result(
        (0..n).map(|i| (i, outcome.clone())).collect(),
        Some("dns; mx.example.net")
    )));
    finalize(a, &queue(), now)
}

fn notices_of(effects: &[Effect], want: DsnKind) -> Vec<Notice> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Notify { kind, notices, .. } if *kind == want => Some(notices.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn retries_follow_the_schedule_and_the_last_delay_repeats() {
    let mut e = env(&["b@example.com"]);
    let mut now = T0;
    for (n, delay) in [(1, MIN), (2, 5 * MIN), (3, 5 * MIN), (4, 5 * MIN)] {
        let (next, effects) = attempt_all(e, deferred("451 4.3.0 later"), now);
        assert_eq!(next.schedule.attempts, n);
        assert_eq!(next.schedule.next_attempt_unix_ms, now + delay);
        assert_eq!(
            effects,
            vec![Effect::Persist {
                wake_at: now + delay
            }]
        );
        assert_eq!(
            next.recipients[0].status,
            RecipientStatus::Deferred {
                reply: "451 4.3.0 later".into(),
                attempts: n
            }
        );
        // Woken before it is due: no attempt.
        assert_eq!(admit(&next, now + delay - 1), Admit::Settle);
        assert_eq!(admit(&next, now + delay), Admit::Attempt);
        now += delay;
        e = next;
    }
}

#[test]
fn expiry_fails_what_is_open_and_keeps_the_last_error() {
    let mut e = env(&["b@example.com", "c@example.com"]);
    e.recipients[1].status = RecipientStatus::Delivered {
        reply: "250 ok".into(),
    };
    e.recipients[0].status = RecipientStatus::Deferred {
        reply: "451 4.2.1 mailbox busy".into(),
        attempts: 3,
    };
    e.schedule.next_attempt_unix_ms = T0 + DAY + 1;
    // The deadline wake-up settles without an attempt.
    let (out, effects) = finalize(Attempt::new(e, 0, false), &queue(), T0 + DAY);
    assert_eq!(out.schedule.attempts, 0, "no attempt was made");
    assert_eq!(
        out.recipients[0].status,
        RecipientStatus::Failed {
            reply: "550 5.4.7 message expired in the queue; last error: 451 4.2.1 mailbox busy"
                .into()
        }
    );
    assert_eq!(
        effects,
        vec![
            Effect::GaveUp {
                index: 0,
                why: EXPIRED
            },
            Effect::Notify {
                kind: DsnKind::Failure,
                notices: vec![Notice {
                    index: 0,
                    action: DsnAction::Failed,
                    status: None,
                    remote_mta: None,
                }],
                retry_until: None,
            },
            Effect::Remove,
        ]
    );
    // A moment earlier it is still open.
    let mut e = env(&["b@example.com"]);
    e.schedule.attempts = 3;
    let (out, effects) = attempt_all(e, deferred("451 later"), T0 + DAY - 1);
    assert!(is_open(&out.recipients[0].status));
    assert!(matches!(effects.last(), Some(Effect::Persist { .. })));
}

#[test]
fn expiry_counts_from_the_release_of_a_held_message() {
    let mut e = env(&["b@example.com"]);
    e.hold_until_unix = (T0 + 2 * DAY) / 1000;
    assert_eq!(admit(&e, T0), Admit::WakeAt(T0 + 2 * DAY));
    let (out, _) = attempt_all(e, deferred("451 later"), T0 + 2 * DAY + HOUR);
    assert!(
        is_open(&out.recipients[0].status),
        "held time is not queue time"
    );
}

#[test]
fn one_delay_notice_per_threshold_after_an_attempt() {
    let e = env(&["b@example.com"]);
    // Before the threshold: none.
    let (e, effects) = attempt_all(e, deferred("451 later"), T0 + 3 * HOUR);
    assert!(notices_of(&effects, DsnKind::Delay).is_empty());
    // Past it: one, with the give-up time and the host that answered.
    let (e, effects) = attempt_all(e, deferred("451 later"), T0 + 4 * HOUR);
    assert_eq!(
        effects[0],
        Effect::Notify {
            kind: DsnKind::Delay,
            notices: vec![Notice {
                index: 0,
                action: DsnAction::Delayed,
                status: None,
                remote_mta: Some("dns; mx.example.net".into()),
            }],
            retry_until: Some(T0 + DAY),
        }
    );
    assert_eq!(e.schedule.delay_notices, 1);
    // Not again for the same threshold.
    let (_, effects) = attempt_all(e, deferred("451 later"), T0 + 5 * HOUR);
    assert!(notices_of(&effects, DsnKind::Delay).is_empty());
}

#[test]
fn deliver_by_return_mode_fails_at_the_deadline() {
    let mut e = env(&["b@example.com"]);
    e.deliver_by = Some(DeliverBy {
        deadline_unix_ms: T0 + 10 * MIN,
        by_secs: 600,
        mode: DeliverByMode::Return,
        trace: false,
    });
    let (e, effects) = attempt_all(e, deferred("451 later"), T0 + MIN);
    // The retry would be at T0+2m; the deadline comes later and wakes it.
    assert_eq!(
        effects,
        vec![Effect::Persist {
            wake_at: T0 + 2 * MIN
        }]
    );
    let mut e = e;
    e.schedule.next_attempt_unix_ms = T0 + 20 * MIN;
    assert_eq!(
        timing::wake_time(&e, T0 + 2 * MIN),
        T0 + 10 * MIN,
        "the deadline comes first"
    );
    assert_eq!(admit(&e, T0 + 10 * MIN), Admit::Settle);
    let (out, effects) = finalize(Attempt::new(e, 0, false), &queue(), T0 + 10 * MIN);
    assert_eq!(
        out.recipients[0].status,
        RecipientStatus::Failed {
            reply: format!("550 5.4.7 {DELIVER_BY_EXPIRED}; last error: 451 later")
                .as_str()
                .into()
        }
    );
    assert!(effects.contains(&Effect::Remove));
    assert_eq!(notices_of(&effects, DsnKind::Failure).len(), 1);
}

#[test]
fn deliver_by_notify_mode_says_so_once_and_keeps_trying() {
    let mut e = env(&["b@example.com"]);
    e.deliver_by = Some(DeliverBy {
        deadline_unix_ms: T0 + MIN,
        by_secs: 60,
        mode: DeliverByMode::Notify,
        trace: false,
    });
    let (e, effects) = attempt_all(e, deferred("451 later"), T0 + 2 * MIN);
    let notices = notices_of(&effects, DsnKind::Delay);
    assert_eq!(notices.len(), 1);
    assert_eq!(notices[0].status, Some(EnhancedStatus::new(4, 4, 7)));
    assert!(e.schedule.deliver_by_notified);
    assert!(matches!(effects.last(), Some(Effect::Persist { .. })));
    let (_, effects) = attempt_all(e, deferred("451 later"), T0 + 4 * MIN);
    assert!(notices_of(&effects, DsnKind::Delay).is_empty());
}

#[test]
fn partial_results_merge_and_each_recipient_keeps_its_remote_mta() {
    let e = env(&["a@one.example", "b@two.example", "c@nomx.example"]);
    let mut a = Attempt::new(e, 3, true);
    assert!(!a.record(result(
        vec![(0, Outcome::Failed("550 5.1.1 no such user".into()))],
        Some("dns; mx.one.example")
    )));
    assert!(!a.record(result(
        vec![(1, Outcome::Delivered("250 ok".into()))],
        Some("dns; mx.two.example")
    )));
    // Null MX: no host was reached.
    assert!(a.record(result(
        vec![(2, Outcome::Failed("556 5.1.10 null MX".into()))],
        None
    )));
    let (out, effects) = finalize(a, &queue(), T0);
    assert_eq!(effects.last(), Some(&Effect::Remove));
    let failed = notices_of(&effects, DsnKind::Failure);
    assert_eq!(
        failed
            .iter()
            .map(|n| (n.index, n.remote_mta.as_deref()))
            .collect::<Vec<_>>(),
        vec![(0, Some("dns; mx.one.example")), (2, None)]
    );
    assert!(matches!(
        out.recipients[1].status,
        RecipientStatus::Delivered { .. }
    ));
}

#[test]
fn a_partial_deferral_keeps_the_message_for_the_rest() {
    let e = env(&["a@example.com", "b@example.com"]);
    let mut a = Attempt::new(e, 1, true);
    assert!(a.record(result(
        vec![
            (0, Outcome::Delivered("250 ok".into())),
            (1, deferred("452 4.2.2 full"))
        ],
        Some("dns; mx.example.com")
    )));
    let (out, effects) = finalize(a, &queue(), T0);
    assert_eq!(effects, vec![Effect::Persist { wake_at: T0 + MIN }]);
    assert!(!is_open(&out.recipients[0].status));
    assert!(is_open(&out.recipients[1].status));
}

#[test]
fn success_notice_only_when_the_next_hop_cannot_send_it() {
    let mut e = env(&["a@example.com"]);
    e.recipients[0].notify = Notify::SUCCESS;
    let mut a = Attempt::new(e, 1, true);
    a.record(result(
        vec![(0, Outcome::Delivered("250 ok".into()))],
        Some("dns; mx.example.com"),
    ));
    let (_, effects) = finalize(a, &queue(), T0);
    let success = notices_of(&effects, DsnKind::Success);
    assert_eq!(success.len(), 1);
    assert_eq!(success[0].action, DsnAction::Relayed);
}

#[test]
fn success_notices_only_when_the_next_hop_cannot_take_them() {
    let s = Notify::SUCCESS;
    assert_eq!(
        success_notice_due(s, false, false),
        Some(DsnAction::Relayed)
    );
    assert_eq!(
        success_notice_due(s, false, true),
        Some(DsnAction::Delivered)
    );
    assert_eq!(
        success_notice_due(s | Notify::FAILURE, false, false),
        Some(DsnAction::Relayed)
    );
    // The next hop offered DSN: NOTIFY went with the RCPT.
    assert_eq!(success_notice_due(s, true, false), None);
    assert_eq!(success_notice_due(s, true, true), None);
    // Not asked for.
    assert_eq!(success_notice_due(Notify::default(), false, false), None);
    assert_eq!(
        success_notice_due(Notify::FAILURE | Notify::DELAY, false, false),
        None
    );
    assert_eq!(success_notice_due(Notify::NEVER, false, false), None);
}

#[test]
fn operator_cancel_fails_open_recipients_and_removes() {
    let mut e = env(&["a@example.com", "b@example.com"]);
    e.recipients[0].status = RecipientStatus::Delivered {
        reply: "250 ok".into(),
    };
    let (out, effects) = finalize(
        Attempt::cancel(e, "550 5.0.0 cancelled".into()),
        &queue(),
        T0 + MIN,
    );
    assert_eq!(out.schedule.attempts, 0);
    assert_eq!(notices_of(&effects, DsnKind::Failure).len(), 1);
    assert_eq!(effects.last(), Some(&Effect::Remove));
}

fn mx(domain: &str) -> Target {
    Target::Mx {
        domain: domain.into(),
        port: 25,
        tls: super::super::tls_policy::TlsPolicy::global(
            super::super::config::OutboundTls::Opportunistic,
        ),
    }
}

fn route_by_domain(r: &Recipient) -> Result<(String, Target, Strategy), Reply> {
    match r.address.rsplit_once('@') {
        Some((_, d)) if d != "bad.example" => Ok(("mx".into(), mx(d), Strategy::default())),
        _ => Err("550 5.1.2 no route".into()),
    }
}

#[test]
fn dispatch_groups_open_recipients_by_target_and_splits_transactions() {
    let mut e = env(&[
        "a@one.example",
        "b@two.example",
        "c@one.example",
        "d@bad.example",
        "e@one.example",
    ]);
    e.recipients[4].status = RecipientStatus::Delivered {
        reply: "250 ok".into(),
    };
    let (groups, unroutable) = group(&e, route_by_domain);
    assert_eq!(groups.len(), 2);
    assert_eq!(
        groups[0].3.iter().map(|r| r.index).collect::<Vec<_>>(),
        vec![0, 2]
    );
    assert_eq!(unroutable.len(), 1);
    assert_eq!(unroutable[0].0, 3);
    let jobs = jobs(MessageId(7), 0, &e, groups, 1);
    assert_eq!(jobs.len(), 3, "one recipient per transaction");
    assert!(jobs.iter().all(|j| j.attempt == 1));
}

#[test]
fn recipient_indexes_past_65535_reach_the_right_recipients() {
    // max_recipients accepts up to 100,000: a 16-bit index wrapped past
    // 65,535 and results landed on the wrong recipients.
    let addresses: Vec<String> = (0..70_000).map(|i| format!("r{i}@example.com")).collect();
    let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let e = env(&refs);
    let (groups, _) = group(&e, route_by_domain);
    let last = groups[0].3.last().expect("recipients");
    assert_eq!(last.index, 69_999);
    assert_eq!(last.address, "r69999@example.com");
    let mut a = Attempt::new(e, 1, true);
    a.record(result(
        vec![(69_999, Outcome::Failed("550 5.1.1 no".into()))],
        None,
    ));
    assert!(is_open(&a.envelope.recipients[69_999 - 65_536].status));
    assert!(matches!(
        a.envelope.recipients[69_999].status,
        RecipientStatus::Failed { .. }
    ));
}

#[test]
fn notices_report_the_reply_status_or_a_default_for_its_class() {
    let r = |line: &str| Reply::parse(line);
    let f = DsnKind::Failure;
    assert_eq!(
        dsn_status(Some(&r("550 5.1.1 no such user")), f),
        EnhancedStatus::new(5, 1, 1)
    );
    assert_eq!(
        dsn_status(Some(&r("550 no such user")), f),
        EnhancedStatus::new(5, 0, 0)
    );
    assert_eq!(
        dsn_status(Some(&r("451 try later")), DsnKind::Delay),
        EnhancedStatus::new(4, 0, 0)
    );
    assert_eq!(
        dsn_status(Some(&r("250 ok")), DsnKind::Success),
        EnhancedStatus::new(2, 0, 0)
    );
    assert_eq!(dsn_status(None, f), EnhancedStatus::new(5, 0, 0));
    // Expiry keeps the last error's text, but reports its own status.
    let mut e = env(&["b@example.com"]);
    e.recipients[0].status = RecipientStatus::Deferred {
        reply: r("451 4.2.1 mailbox busy"),
        attempts: 1,
    };
    let (out, _) = finalize(Attempt::new(e, 0, false), &queue(), T0 + DAY);
    let RecipientStatus::Failed { reply } = &out.recipients[0].status else {
        panic!("failed expected: {out:?}");
    };
    assert_eq!(
        (reply.code, dsn_status(Some(reply), f)),
        (550, EnhancedStatus::new(5, 4, 7))
    );
}
