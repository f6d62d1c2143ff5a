//! Where the resolver reads the time. Cache expiry and server hold-down go through
//! [`Clock`] so tests can move time forward instead of sleeping. Network timeouts
//! use glommio timers (real time): they bound waits, they are not cache state.

use std::cell::Cell;
use std::time::{Duration, Instant};

pub trait Clock {
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that only moves when told to. Share it with the resolver through an
/// `Rc` and call [`ManualClock::advance`].
#[derive(Debug)]
pub struct ManualClock {
    base: Instant,
    offset: Cell<Duration>,
}

impl ManualClock {
    pub fn new() -> ManualClock {
        ManualClock {
            base: Instant::now(),
            offset: Cell::new(Duration::ZERO),
        }
    }

    pub fn advance(&self, by: Duration) {
        self.offset.set(self.offset.get() + by);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + self.offset.get()
    }
}
