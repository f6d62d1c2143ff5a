//! When a message is due, and what its deadlines mean: FUTURERELEASE holds
//! (RFC 4865), DELIVERBY deadlines (RFC 2852) and queue expiry. Pure functions of
//! the envelope and the time, so the scheduler's rules are tested without a clock.

use sluice_spool::{DeliverByMode, Envelope};

/// Where queue time starts: arrival, or the release time of a held message (a
/// message held for 7 days must not expire on its first attempt, nor get delay
/// notices for the time it was held on purpose).
pub fn queue_clock_start(env: &Envelope) -> u64 {
    env.arrival_unix_ms
        .max(env.hold_until_unix.saturating_mul(1000))
}

/// Unix ms before which no attempt may be made (FUTURERELEASE); 0 = none.
pub fn held_until_ms(env: &Envelope) -> u64 {
    env.hold_until_unix.saturating_mul(1000)
}

/// What a DELIVERBY request asks for at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByState {
    /// No request, or nothing left to do for it.
    None,
    /// The deadline is ahead: wake up for it at this time.
    Ahead(u64),
    /// R mode, deadline passed: return the message (fail it, 5.4.7).
    Return,
    /// N mode, deadline passed, no notice yet: send a delay notice (4.4.7) and
    /// keep trying.
    Notify,
}

pub fn deliver_by_state(env: &Envelope, now_ms: u64) -> ByState {
    let Some(by) = env.deliver_by else {
        return ByState::None;
    };
    if by.mode == DeliverByMode::Notify && env.schedule.deliver_by_notified {
        return ByState::None;
    }
    if now_ms < by.deadline_unix_ms {
        return ByState::Ahead(by.deadline_unix_ms);
    }
    match by.mode {
        DeliverByMode::Return => ByState::Return,
        DeliverByMode::Notify => ByState::Notify,
    }
}

/// When the scheduler should next look at the message: its next attempt, or an
/// earlier DELIVERBY deadline, and never before its FUTURERELEASE time.
pub fn wake_time(env: &Envelope, now_ms: u64) -> u64 {
    let mut due = env.schedule.next_attempt_unix_ms;
    if let ByState::Ahead(deadline) = deliver_by_state(env, now_ms) {
        due = due.min(deadline);
    }
    due.max(held_until_ms(env))
}

/// True when the queue's expiry time has passed.
pub fn expired(env: &Envelope, expire_ms: u64, now_ms: u64) -> bool {
    now_ms.saturating_sub(queue_clock_start(env)) >= expire_ms
}

#[cfg(test)]
pub(super) mod tests {
    use sluice_spool::{BodyType, DeliverBy, Schedule};

    use super::*;

    pub(in crate::delivery) const T0: u64 = 1_800_000_000_000;

    /// A message received at `T0` with no recipients (the delivery tests' base).
    pub(in crate::delivery) fn env() -> Envelope {
        Envelope {
            sender: "a@example.org".into(),
            recipients: Vec::new(),
            ret: None,
            envid: None,
            body_type: BodyType::SevenBit,
            smtputf8: false,
            arrival_unix_ms: T0,
            listener: "smtp".into(),
            client_ip: "192.0.2.1".parse().ok(),
            helo: "c".into(),
            auth_user: None,
            tls: None,
            size: 10,
            priority: 0,
            queue: "default".into(),
            hold_until_unix: 0,
            deliver_by: None,
            tls_request: Default::default(),
            tenant: None,
            header_facts: None,
            schedule: Schedule::default(),
        }
    }

    fn by(mode: DeliverByMode, secs: i64) -> Option<DeliverBy> {
        Some(DeliverBy {
            deadline_unix_ms: (T0 as i64 + secs * 1000) as u64,
            by_secs: secs,
            mode,
            trace: false,
        })
    }

    #[test]
    fn hold_moves_the_queue_clock_and_the_wake_time() {
        let mut e = env();
        assert_eq!(queue_clock_start(&e), T0);
        assert_eq!(wake_time(&e, T0), 0);
        e.hold_until_unix = T0 / 1000 + 3600;
        assert_eq!(queue_clock_start(&e), T0 + 3_600_000);
        assert_eq!(wake_time(&e, T0), T0 + 3_600_000);
        // Expiry counts from the release.
        let five_days = 5 * 86_400_000;
        assert!(!expired(&e, five_days, T0 + five_days));
        assert!(expired(&e, five_days, T0 + 3_600_000 + five_days));
        // A hold in the past changes nothing.
        e.hold_until_unix = T0 / 1000 - 10;
        assert_eq!(queue_clock_start(&e), T0);
        assert!(expired(&e, five_days, T0 + five_days));
    }

    #[test]
    fn deliver_by_return_mode() {
        let mut e = env();
        e.deliver_by = by(DeliverByMode::Return, 600);
        e.schedule.next_attempt_unix_ms = T0 + 3_600_000;
        assert_eq!(deliver_by_state(&e, T0), ByState::Ahead(T0 + 600_000));
        // The deadline comes before the next retry: wake for it.
        assert_eq!(wake_time(&e, T0), T0 + 600_000);
        assert_eq!(
            deliver_by_state(&e, T0 + 599_999),
            ByState::Ahead(T0 + 600_000)
        );
        assert_eq!(deliver_by_state(&e, T0 + 600_000), ByState::Return);
        assert_eq!(deliver_by_state(&e, T0 + 10_000_000), ByState::Return);
    }

    #[test]
    fn deliver_by_notify_mode_notifies_once() {
        let mut e = env();
        e.deliver_by = by(DeliverByMode::Notify, 60);
        e.schedule.next_attempt_unix_ms = T0 + 30_000;
        // The retry comes first.
        assert_eq!(wake_time(&e, T0), T0 + 30_000);
        assert_eq!(deliver_by_state(&e, T0 + 60_000), ByState::Notify);
        e.schedule.deliver_by_notified = true;
        assert_eq!(deliver_by_state(&e, T0 + 60_000), ByState::None);
        e.schedule.next_attempt_unix_ms = T0 + 900_000;
        assert_eq!(wake_time(&e, T0 + 60_000), T0 + 900_000);
        // N mode with a by-time already past (negative) notifies at once.
        let mut e = env();
        e.deliver_by = Some(DeliverBy {
            deadline_unix_ms: T0 - 5_000,
            by_secs: -5,
            mode: DeliverByMode::Notify,
            trace: true,
        });
        assert_eq!(deliver_by_state(&e, T0), ByState::Notify);
    }

    #[test]
    fn no_request_no_deadline() {
        let mut e = env();
        e.schedule.next_attempt_unix_ms = T0 + 5;
        assert_eq!(deliver_by_state(&e, T0 + 1_000_000), ByState::None);
        assert_eq!(wake_time(&e, T0), T0 + 5);
    }
}
