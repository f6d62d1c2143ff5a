//! Who of the messages due now goes into memory next, under this core's share
//! of `delivery.max_ready_messages` (sans-IO; `ready.rs` drives it).
//!
//! One waiting line per destination (the first recipient's domain), served in
//! turn, and no destination may hold more than half the share in memory. So a
//! destination that is slow or stuck fills at most half the bound: mail for
//! the others still goes in at once, and as slots free up the waiting
//! destinations take them in turn rather than in arrival order. Without it, one
//! slow destination's backlog put everything behind it (head-of-line).

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use sluice_spool::MessageId;

/// Waiting lines and the messages held in memory, per destination.
#[derive(Default)]
pub struct ReadyLines {
    /// In memory for delivery (being attempted, or its MX hosts looked up).
    held: HashMap<MessageId, Rc<str>>,
    held_per_destination: HashMap<Rc<str>, usize>,
    /// Due now, waiting for room, as ids (the envelope stays on disk).
    lines: HashMap<Rc<str>, VecDeque<MessageId>>,
    /// Destinations with a non-empty line, in the order they are served.
    turns: VecDeque<Rc<str>>,
    waiting: usize,
}

/// The most one destination may hold of a share of `cap` (0 = no bound).
pub fn per_destination_limit(cap: usize) -> usize {
    cap.div_ceil(2).max(1)
}

impl ReadyLines {
    /// Messages held in memory.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Messages waiting in the lines.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    fn held_by(&self, destination: &str) -> usize {
        self.held_per_destination
            .get(destination)
            .copied()
            .unwrap_or(0)
    }

    /// Message `id`, for `destination`, is now held in memory. Idempotent.
    pub fn enter(&mut self, id: MessageId, destination: &str) {
        if self.held.contains_key(&id) {
            return;
        }
        let key = self.key(destination);
        *self.held_per_destination.entry(key.clone()).or_insert(0) += 1;
        self.held.insert(id, key);
    }

    /// Message `id` left memory (its attempt ended, or it went back to wait
    /// on a timer). Unknown ids are ignored.
    pub fn leave(&mut self, id: MessageId) {
        let Some(key) = self.held.remove(&id) else {
            return;
        };
        if let Some(n) = self.held_per_destination.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.held_per_destination.remove(&key);
            }
        }
    }

    /// Forgets held messages for which `still_held` is false; returns how
    /// many. The safety net for a removal that missed `leave`, which would
    /// otherwise keep its destination counted at its limit for good.
    pub fn retain_held(&mut self, mut still_held: impl FnMut(MessageId) -> bool) -> usize {
        let gone: Vec<MessageId> = self
            .held
            .keys()
            .copied()
            .filter(|id| !still_held(*id))
            .collect();
        for id in &gone {
            self.leave(*id);
        }
        gone.len()
    }

    /// One `Rc` per destination name while it is in use.
    fn key(&self, destination: &str) -> Rc<str> {
        self.held_per_destination
            .get_key_value(destination)
            .map(|(k, _)| k.clone())
            .or_else(|| {
                self.lines
                    .get_key_value(destination)
                    .map(|(k, _)| k.clone())
            })
            .unwrap_or_else(|| Rc::from(destination))
    }

    /// Message `id`, for `destination`, is due now: true when it must wait
    /// (it joined its destination's line). It may go in when the share has
    /// room, its destination is under its limit and has no one waiting before
    /// it. `cap` 0 means no bound.
    pub fn must_wait(&mut self, id: MessageId, destination: &str, cap: usize) -> bool {
        if cap == 0 {
            return false;
        }
        let line_empty = self.lines.get(destination).is_none_or(VecDeque::is_empty);
        if line_empty
            && self.held.len() < cap
            && self.held_by(destination) < per_destination_limit(cap)
        {
            return false;
        }
        let key = self.key(destination);
        let line = self.lines.entry(key.clone()).or_default();
        if line.is_empty() {
            self.turns.push_back(key);
        }
        line.push_back(id);
        self.waiting += 1;
        true
    }

    /// The next waiting message to take into memory, if there is room: the
    /// first of the next destination in turn that is under its limit.
    pub fn next(&mut self, cap: usize) -> Option<MessageId> {
        if cap != 0 && self.held.len() >= cap {
            return None;
        }
        let limit = per_destination_limit(cap);
        // At most two destinations can be at the limit (it is half the
        // share), so this looks at no more than three.
        for _ in 0..self.turns.len() {
            let key = self.turns.pop_front()?;
            if cap != 0 && self.held_by(&key) >= limit {
                self.turns.push_back(key);
                continue;
            }
            let line = self.lines.get_mut(&key)?;
            let id = line.pop_front();
            if line.is_empty() {
                self.lines.remove(&key);
            } else {
                self.turns.push_back(key);
            }
            if id.is_some() {
                self.waiting -= 1;
            }
            return id;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> MessageId {
        MessageId(n)
    }

    /// Takes everything `next` gives while entering each into memory.
    fn take_all(
        lines: &mut ReadyLines,
        cap: usize,
        dest: impl Fn(MessageId) -> &'static str,
    ) -> Vec<MessageId> {
        let mut out = Vec::new();
        while let Some(m) = lines.next(cap) {
            lines.enter(m, dest(m));
            out.push(m);
        }
        out
    }

    #[test]
    fn no_bound_never_waits() {
        let mut l = ReadyLines::default();
        for n in 0..100 {
            assert!(!l.must_wait(id(n), "a.example", 0));
            l.enter(id(n), "a.example");
        }
        assert_eq!((l.held(), l.waiting()), (100, 0));
    }

    #[test]
    fn one_destination_holds_at_most_half_the_share() {
        let mut l = ReadyLines::default();
        let mut admitted = 0;
        for n in 0..10 {
            if !l.must_wait(id(n), "slow.example", 10) {
                l.enter(id(n), "slow.example");
                admitted += 1;
            }
        }
        assert_eq!(admitted, 5);
        assert_eq!(l.waiting(), 5);
        // Another destination still goes in at once.
        assert!(!l.must_wait(id(100), "fast.example", 10));
        l.enter(id(100), "fast.example");
        // The slow one gets nothing more until one of its own leaves.
        assert_eq!(l.next(10), None);
        l.leave(id(0));
        assert_eq!(l.next(10), Some(id(5)), "its own line, in order");
    }

    #[test]
    fn order_is_kept_within_a_destination() {
        let mut l = ReadyLines::default();
        let cap = 4; // a destination's limit: 2
        for n in 0..2 {
            assert!(!l.must_wait(id(n), "a.example", cap));
            l.enter(id(n), "a.example");
        }
        assert!(l.must_wait(id(2), "a.example", cap), "at its limit");
        l.leave(id(0));
        // a.example has room again, but id 2 waits before id 3.
        assert!(l.must_wait(id(3), "a.example", cap));
        assert_eq!(take_all(&mut l, cap, |_| "a.example"), vec![id(2)]);
        l.leave(id(1));
        assert_eq!(take_all(&mut l, cap, |_| "a.example"), vec![id(3)]);
    }

    #[test]
    fn freed_slots_go_round_the_waiting_destinations() {
        let mut l = ReadyLines::default();
        let cap = 4;
        // Fill the share with two destinations at their limit of two.
        for (n, d) in [
            (0, "a.example"),
            (1, "a.example"),
            (2, "b.example"),
            (3, "b.example"),
        ] {
            assert!(!l.must_wait(id(n), d, cap));
            l.enter(id(n), d);
        }
        // Backlogs for a, b and c; c arrived last.
        for n in 10..13 {
            assert!(l.must_wait(id(n), "a.example", cap));
        }
        for n in 20..23 {
            assert!(l.must_wait(id(n), "b.example", cap));
        }
        for n in 30..33 {
            assert!(l.must_wait(id(n), "c.example", cap));
        }
        assert_eq!(l.waiting(), 9);
        // Freed slots go to each destination in turn (a, b, c, a…), not to
        // the oldest backlog first: c is served after one turn each.
        l.leave(id(0));
        assert_eq!(l.next(cap), Some(id(10)));
        l.enter(id(10), "a.example");
        l.leave(id(2));
        assert_eq!(l.next(cap), Some(id(20)));
        l.enter(id(20), "b.example");
        l.leave(id(1));
        assert_eq!(
            l.next(cap),
            Some(id(30)),
            "c's turn, though a freed the slot"
        );
        l.enter(id(30), "c.example");
        assert_eq!(l.next(cap), None, "share full");
        assert_eq!((l.held(), l.waiting()), (4, 6));
    }

    #[test]
    fn a_stuck_destination_cannot_fill_the_share() {
        let mut l = ReadyLines::default();
        let cap = 20;
        for n in 0..1000 {
            if !l.must_wait(id(n), "stuck.example", cap) {
                l.enter(id(n), "stuck.example");
            }
        }
        assert_eq!((l.held(), l.waiting()), (10, 990));
        // Nothing of stuck.example ever leaves, yet others keep going in.
        for n in 1000..1100 {
            assert!(!l.must_wait(id(n), "other.example", cap), "message {n}");
            l.enter(id(n), "other.example");
            l.leave(id(n));
        }
        assert_eq!(l.next(cap), None, "stuck.example stays at its limit");
    }

    #[test]
    fn leave_and_enter_are_idempotent_and_counts_return_to_zero() {
        let mut l = ReadyLines::default();
        l.enter(id(1), "a.example");
        l.enter(id(1), "a.example");
        assert_eq!(l.held(), 1);
        l.leave(id(1));
        l.leave(id(1));
        l.leave(id(2));
        assert_eq!(l.held(), 0);
        assert!(l.held_per_destination.is_empty());
    }

    #[test]
    fn a_missed_leave_is_corrected_and_frees_the_destination() {
        let mut l = ReadyLines::default();
        let cap = 4;
        for n in 0..2 {
            assert!(!l.must_wait(id(n), "a.example", cap));
            l.enter(id(n), "a.example");
        }
        assert!(l.must_wait(id(2), "a.example", cap));
        assert_eq!(l.next(cap), None, "a.example at its limit");
        // id 0 left memory without a `leave`: only id 1 is still held.
        assert_eq!(l.retain_held(|m| m == id(1)), 1);
        assert_eq!(l.held(), 1);
        assert_eq!(l.next(cap), Some(id(2)));
    }

    #[test]
    fn lowering_the_bound_to_none_lets_every_waiting_message_go() {
        let mut l = ReadyLines::default();
        for n in 0..6 {
            if !l.must_wait(id(n), "a.example", 2) {
                l.enter(id(n), "a.example");
            }
        }
        assert_eq!(l.waiting(), 5);
        assert_eq!(take_all(&mut l, 0, |_| "a.example").len(), 5);
        assert_eq!(l.waiting(), 0);
        assert!(l.lines.is_empty() && l.turns.is_empty());
    }
}
