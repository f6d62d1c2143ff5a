//! Exact rate and concurrency limits for one destination, queue or source IP.
//!
//! Each limited thing is owned by one core (design §3), so these are plain structs
//! with `&mut self`: no atomics, no locks. Time is passed in as unix milliseconds,
//! which keeps them deterministic and testable without sleeping. A clock that
//! steps backwards is treated as no time passing, never as extra tokens.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use crate::PolicyError;

/// `count` events per `per_ms` milliseconds, written "100/s", "20/m", "5000/h",
/// "10/10s" or "3/1h30m" (the period is a humantime duration; a bare unit means one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Rate {
    pub count: u32,
    pub per_ms: u64,
}

impl FromStr for Rate {
    type Err = PolicyError;

    fn from_str(text: &str) -> Result<Rate, PolicyError> {
        let bad = |reason: &str| PolicyError::InvalidRate {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let (count, period) = text
            .split_once('/')
            .ok_or_else(|| bad("expected COUNT/PERIOD like 100/s, 20/m or 10/10s"))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| bad("count is not a whole number"))?;
        if count == 0 {
            return Err(bad("count must be at least 1 (omit the limit instead)"));
        }
        let period = period.trim();
        // "s" alone reads as "per second"; humantime wants a number first.
        let duration = if period.starts_with(|c: char| c.is_ascii_digit()) {
            humantime::parse_duration(period)
        } else {
            humantime::parse_duration(&format!("1{period}"))
        }
        .map_err(|_| bad("period is not a duration like s, m, h or 10s"))?;
        if duration.subsec_nanos() % 1_000_000 != 0 {
            return Err(bad("period must be a whole number of milliseconds"));
        }
        let per_ms = u64::try_from(duration.as_millis()).map_err(|_| bad("period is too long"))?;
        if per_ms == 0 {
            return Err(bad("period must be at least 1ms"));
        }
        Ok(Rate { count, per_ms })
    }
}

impl TryFrom<String> for Rate {
    type Error = PolicyError;

    fn try_from(text: String) -> Result<Rate, PolicyError> {
        text.parse()
    }
}

/// Shortest form that parses back to the same rate: "100/s", "10/10s", "7/1500ms".
impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1_000, "s"),
        ];
        for (ms, unit) in UNITS {
            if self.per_ms.is_multiple_of(ms) {
                return match self.per_ms / ms {
                    1 => write!(f, "{}/{unit}", self.count),
                    n => write!(f, "{}/{n}{unit}", self.count),
                };
            }
        }
        write!(f, "{}/{}ms", self.count, self.per_ms)
    }
}

/// Token bucket allowing `count` events per `per_ms`, with burst = `count`.
///
/// Exact integer arithmetic: the level is kept in units of 1/per_ms token, so each
/// elapsed millisecond adds exactly `count` units and a token costs `per_ms`
/// units. No rounding ever drifts, so over any interval of L ms at most
/// `count + floor(L * count / per_ms)` events are allowed. It starts full.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate: Rate,
    /// Units available; at most `capacity`.
    level: u128,
    capacity: u128,
    /// Time of the last refill; None until first use, so a fresh bucket is full
    /// whatever the clock reads.
    last_ms: Option<u64>,
}

impl RateLimiter {
    pub fn new(rate: Rate) -> Self {
        let capacity = u128::from(rate.count) * u128::from(rate.per_ms);
        RateLimiter {
            rate,
            level: capacity,
            capacity,
            last_ms: None,
        }
    }

    /// Take one token, or say how many ms until one is available.
    pub fn try_acquire(&mut self, now_ms: u64) -> Result<(), u64> {
        self.refill(now_ms);
        match self.wait_ms() {
            0 => {
                self.take();
                Ok(())
            }
            wait => Err(wait),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    pub(crate) fn refill(&mut self, now_ms: u64) {
        match self.last_ms {
            Some(last) if now_ms > last => {
                let added = u128::from(now_ms - last) * u128::from(self.rate.count);
                self.level = self.level.saturating_add(added).min(self.capacity);
                self.last_ms = Some(now_ms);
            }
            // Same instant or the clock stepped back: nothing accrues, and `last`
            // stays put so the lost interval is not credited twice later.
            Some(_) => {}
            None => self.last_ms = Some(now_ms),
        }
    }

    /// ms from the last refill until a whole token is there; 0 if one is now.
    pub(crate) fn wait_ms(&self) -> u64 {
        let token = u128::from(self.rate.per_ms);
        if self.level >= token {
            return 0;
        }
        let missing = token - self.level;
        let per_ms = u128::from(self.rate.count);
        // At most per_ms (a whole period), so it fits in u64.
        u64::try_from(missing.div_ceil(per_ms)).unwrap_or(u64::MAX)
    }

    pub(crate) fn take(&mut self) {
        self.level -= u128::from(self.rate.per_ms);
    }

    /// The same bucket under another rate: as full (in fraction of its
    /// capacity) as this one, refilled from the same instant.
    fn rescaled(&self, rate: Rate) -> RateLimiter {
        let mut out = RateLimiter::new(rate);
        if self.capacity > 0 {
            // Saturates only for rates far beyond any real configuration
            // (the result is then capped at full).
            out.level = self
                .level
                .saturating_mul(out.capacity)
                .checked_div(self.capacity)
                .unwrap_or(out.capacity)
                .min(out.capacity);
        }
        out.last_ms = self.last_ms;
        out
    }
}

/// Several limits at once (say per second and per hour for one destination): an
/// event is allowed only when every limit allows it, and a refusal consumes
/// nothing from any of them.
#[derive(Debug, Clone)]
pub struct MultiLimiter {
    limiters: Vec<RateLimiter>,
}

impl MultiLimiter {
    /// No rates means no limit.
    pub fn new(rates: Vec<Rate>) -> Self {
        MultiLimiter {
            limiters: rates.into_iter().map(RateLimiter::new).collect(),
        }
    }

    /// Take one token from every limit, or report the longest wait among those
    /// that refuse.
    pub fn try_acquire(&mut self, now_ms: u64) -> Result<(), u64> {
        let mut wait = 0;
        for limiter in &mut self.limiters {
            limiter.refill(now_ms);
            wait = wait.max(limiter.wait_ms());
        }
        if wait > 0 {
            return Err(wait);
        }
        for limiter in &mut self.limiters {
            limiter.take();
        }
        Ok(())
    }

    pub fn rates(&self) -> impl Iterator<Item = Rate> + '_ {
        self.limiters.iter().map(RateLimiter::rate)
    }

    /// Whether these are the limits in force (same rates, same order).
    pub fn has_rates(&self, rates: &[Rate]) -> bool {
        self.rates().eq(rates.iter().copied())
    }

    /// Puts new rates in force (a configuration reload) without forgetting
    /// what was spent: a limit whose rate is unchanged keeps its bucket; a
    /// limit over the same period with a new count keeps its fill fraction
    /// (a half-empty bucket stays half empty); a new period starts full.
    pub fn retune(&mut self, rates: &[Rate]) {
        if self.has_rates(rates) {
            return;
        }
        let old = std::mem::take(&mut self.limiters);
        self.limiters = rates
            .iter()
            .map(|&rate| {
                let same = old.iter().find(|l| l.rate == rate);
                let period = old.iter().find(|l| l.rate.per_ms == rate.per_ms);
                match (same, period) {
                    (Some(l), _) => l.clone(),
                    (None, Some(l)) => l.rescaled(rate),
                    (None, None) => RateLimiter::new(rate),
                }
            })
            .collect();
    }
}

/// A counter with a maximum: connections open to a host, sessions on a site.
#[derive(Debug, Clone)]
pub struct Concurrency {
    max: u32,
    current: u32,
    max_seen: u32,
}

impl Concurrency {
    pub fn new(max: u32) -> Self {
        Concurrency {
            max,
            current: 0,
            max_seen: 0,
        }
    }

    /// Take a slot if one is free.
    pub fn try_acquire(&mut self) -> bool {
        if self.current >= self.max {
            return false;
        }
        self.current += 1;
        self.max_seen = self.max_seen.max(self.current);
        true
    }

    /// Give a slot back. More releases than acquisitions is a caller bug; it is
    /// caught in debug builds and otherwise cannot take the count below zero.
    pub fn release(&mut self) {
        debug_assert!(self.current > 0, "Concurrency::release without acquire");
        self.current = self.current.saturating_sub(1);
    }

    pub fn current(&self) -> u32 {
        self.current
    }

    /// Highest `current` ever reached, for metrics and tests.
    pub fn max_seen(&self) -> u32 {
        self.max_seen
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    /// New limit on reload. Slots already held above it stay held; no new ones
    /// are given until the count drops below it.
    pub fn set_max(&mut self, max: u32) {
        self.max = max;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    fn rate(text: &str) -> Rate {
        text.parse().expect("test rate")
    }

    /// Deterministic pseudo-random numbers (Knuth's MMIX LCG); high bits are the
    /// good ones.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn rates_parse() {
        assert_eq!(
            rate("100/s"),
            Rate {
                count: 100,
                per_ms: 1_000
            }
        );
        assert_eq!(
            rate("20/m"),
            Rate {
                count: 20,
                per_ms: 60_000
            }
        );
        assert_eq!(
            rate("5000/h"),
            Rate {
                count: 5000,
                per_ms: 3_600_000
            }
        );
        assert_eq!(
            rate("10/10s"),
            Rate {
                count: 10,
                per_ms: 10_000
            }
        );
        assert_eq!(
            rate(" 3 / 1h30m "),
            Rate {
                count: 3,
                per_ms: 5_400_000
            }
        );
        assert_eq!(
            rate("1/d"),
            Rate {
                count: 1,
                per_ms: 86_400_000
            }
        );
        assert_eq!(
            rate("7/250ms"),
            Rate {
                count: 7,
                per_ms: 250
            }
        );
        assert_eq!(
            rate("2/min"),
            Rate {
                count: 2,
                per_ms: 60_000
            }
        );
    }

    #[test]
    fn rates_rejected_naming_the_text() {
        for bad in [
            "",
            "100",
            "/s",
            "x/s",
            "-1/s",
            "0/s",
            "1.5/s",
            "10/",
            "10/parsec",
            "10/0s",
            "10/1us",
            "10/1500us",
            "99999999999/s",
            "10/s/s",
        ] {
            match bad.parse::<Rate>() {
                Err(PolicyError::InvalidRate { text, .. }) => assert_eq!(text, bad),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        let msg = "10/fortnights"
            .parse::<Rate>()
            .expect_err("bad")
            .to_string();
        assert!(msg.contains("10/fortnights"), "{msg}");
    }

    #[test]
    fn rate_display_round_trips() {
        for text in [
            "100/s", "20/m", "5000/h", "10/10s", "1/d", "7/250ms", "3/90m", "4/1500ms",
        ] {
            let r = rate(text);
            assert_eq!(r.to_string(), text);
            assert_eq!(rate(&r.to_string()), r);
        }
        assert_eq!(rate("1/60s").to_string(), "1/m");
    }

    #[test]
    fn rate_deserializes_from_string() {
        use serde::de::value::{Error, StrDeserializer, StringDeserializer};
        use serde::de::IntoDeserializer;
        let good: StringDeserializer<Error> = "20/m".to_string().into_deserializer();
        assert_eq!(
            Rate::deserialize(good).expect("rate"),
            Rate {
                count: 20,
                per_ms: 60_000
            }
        );
        let bad: StrDeserializer<Error> = "20/lightyear".into_deserializer();
        let err = Rate::deserialize(bad).expect_err("bad rate");
        assert!(err.to_string().contains("20/lightyear"), "{err}");
    }

    #[test]
    fn cold_start_allows_exactly_count_then_waits() {
        let mut l = RateLimiter::new(rate("5/s"));
        let t0 = 1_700_000_000_000;
        for _ in 0..5 {
            assert_eq!(l.try_acquire(t0), Ok(()));
        }
        // One token refills every 200ms.
        assert_eq!(l.try_acquire(t0), Err(200));
        assert_eq!(l.try_acquire(t0 + 150), Err(50));
        assert_eq!(l.try_acquire(t0 + 199), Err(1));
        assert_eq!(l.try_acquire(t0 + 200), Ok(()));
        assert_eq!(l.try_acquire(t0 + 200), Err(200));
        // A long pause refills to the burst and no further.
        let later = t0 + 3_600_000;
        for _ in 0..5 {
            assert_eq!(l.try_acquire(later), Ok(()));
        }
        assert!(l.try_acquire(later).is_err());
    }

    #[test]
    fn fractional_refill_accumulates_exactly() {
        // 3 per 10 ms: a token every 3.33 ms, so refills alternate 4, 3, 3 ms.
        let mut l = RateLimiter::new(rate("3/10ms"));
        for _ in 0..3 {
            assert_eq!(l.try_acquire(0), Ok(()));
        }
        let mut granted = 0;
        for now in 1..=3_000u64 {
            if l.try_acquire(now).is_ok() {
                granted += 1;
            }
        }
        // Exactly 3 per 10ms over 3000ms: 900 more.
        assert_eq!(granted, 900);
    }

    #[test]
    fn clock_going_back_grants_nothing_extra() {
        let mut l = RateLimiter::new(rate("1/s"));
        assert_eq!(l.try_acquire(10_000), Ok(()));
        assert!(l.try_acquire(5_000).is_err());
        assert!(l.try_acquire(10_500).is_err());
        assert_eq!(l.try_acquire(11_000), Ok(()));
    }

    #[test]
    fn huge_rates_do_not_overflow() {
        let mut l = RateLimiter::new(Rate {
            count: u32::MAX,
            per_ms: u64::MAX,
        });
        assert_eq!(l.try_acquire(0), Ok(()));
        assert_eq!(l.try_acquire(u64::MAX), Ok(()));
        let mut slow = RateLimiter::new(Rate {
            count: 1,
            per_ms: u64::MAX,
        });
        assert_eq!(slow.try_acquire(0), Ok(()));
        assert_eq!(slow.try_acquire(1), Err(u64::MAX - 1));
    }

    /// Random rates and clock steps, trying to acquire at every step: the token
    /// bucket bound holds over every window and each refusal reports an exact wait.
    #[test]
    fn bucket_bound_holds_over_random_steps() {
        let mut lcg = Lcg(0x5eed_1234);
        for case in 0..200 {
            let count = 1 + lcg.below(20) as u32;
            let per_ms = 1 + lcg.below(5_000);
            let r = Rate { count, per_ms };
            let mut l = RateLimiter::new(r);
            let max_step = 1 + lcg.below(2 * per_ms / u64::from(count) + 2);
            let mut now = lcg.below(1 << 40);
            let mut grants: Vec<u64> = Vec::new();
            for _ in 0..2_000 {
                now += lcg.below(max_step + 1);
                match l.try_acquire(now) {
                    Ok(()) => grants.push(now),
                    Err(wait) => {
                        assert!(wait >= 1 && wait <= per_ms, "case {case}: wait {wait}");
                        // The wait is exact: one ms early is refused, on time is granted.
                        let mut probe = l.clone();
                        assert!(probe.try_acquire(now + wait - 1).is_err(), "case {case}");
                        assert_eq!(probe.try_acquire(now + wait), Ok(()), "case {case}");
                    }
                }
            }
            // Every window [grants[i], grants[j]] of length L holds at most
            // count + floor(L * count / per_ms) grants.
            for i in 0..grants.len() {
                for j in i..grants.len() {
                    let len = u128::from(grants[j] - grants[i]);
                    let allowed = u128::from(count) + len * u128::from(count) / u128::from(per_ms);
                    let seen = (j - i + 1) as u128;
                    assert!(
                        seen <= allowed,
                        "case {case} {r}: {seen} grants in {len}ms, bound {allowed}"
                    );
                }
            }
        }
    }

    /// Greedy acquisition at every ms hits the bound exactly in the long run.
    #[test]
    fn bucket_is_not_stingy() {
        let mut lcg = Lcg(42);
        for _ in 0..50 {
            let count = 1 + lcg.below(10) as u32;
            let per_ms = 1 + lcg.below(200);
            let mut l = RateLimiter::new(Rate { count, per_ms });
            let horizon = 20 * per_ms;
            let mut got = 0u64;
            for now in 0..=horizon {
                while l.try_acquire(now).is_ok() {
                    got += 1;
                }
            }
            let bound = u64::from(count) + horizon * u64::from(count) / per_ms;
            assert_eq!(got, bound, "{count}/{per_ms}ms");
        }
    }

    /// Sliding check with a queue as the engine would see it: no window of per_ms
    /// (half-open) ever has more than 2*count grants, the burst plus one period.
    #[test]
    fn per_window_count_never_exceeds_bound() {
        let mut lcg = Lcg(7);
        let r = rate("10/s");
        let mut l = RateLimiter::new(r);
        let mut now = 0u64;
        let mut window: VecDeque<u64> = VecDeque::new();
        for _ in 0..50_000 {
            now += lcg.below(120);
            if l.try_acquire(now).is_ok() {
                window.push_back(now);
            }
            while window.front().is_some_and(|&t| t + r.per_ms <= now) {
                window.pop_front();
            }
            // Window of length < per_ms: floor(L*count/per_ms) <= count - 1.
            assert!(window.len() < 2 * r.count as usize, "{}", window.len());
        }
    }

    #[test]
    fn multi_limiter_needs_all_and_consumes_nothing_on_refusal() {
        let mut m = MultiLimiter::new(vec![rate("2/s"), rate("3/m")]);
        assert_eq!(m.try_acquire(0), Ok(()));
        assert_eq!(m.try_acquire(0), Ok(()));
        // Per-second limit refuses: 500ms until its next token.
        assert_eq!(m.try_acquire(0), Err(500));
        assert_eq!(m.try_acquire(500), Ok(()));
        // Per-minute limit now empty: 20s per token, 20s - 500ms since the first refill.
        assert_eq!(m.try_acquire(1_000), Err(19_000));
        // Refusals took nothing from the per-second bucket: both of its tokens are
        // still there when the per-minute one comes back.
        assert_eq!(m.try_acquire(20_000), Ok(()));
        let mut fresh = MultiLimiter::new(vec![rate("2/s"), rate("3/m")]);
        for t in [0, 0, 500] {
            assert_eq!(fresh.try_acquire(t), Ok(()));
        }
        for t in (1_000..20_000).step_by(37) {
            assert!(fresh.try_acquire(t).is_err());
        }
        assert_eq!(fresh.try_acquire(20_000), Ok(()));
        assert_eq!(fresh.try_acquire(20_000), Err(20_000));
        // Longest wait is reported when several refuse.
        let mut both = MultiLimiter::new(vec![rate("1/s"), rate("1/h")]);
        assert_eq!(both.try_acquire(0), Ok(()));
        assert_eq!(both.try_acquire(10), Err(3_600_000 - 10));
        assert_eq!(both.rates().count(), 2);
        // No rates: no limit.
        let mut none = MultiLimiter::new(Vec::new());
        for _ in 0..1_000 {
            assert_eq!(none.try_acquire(0), Ok(()));
        }
    }

    #[test]
    fn multi_limiter_random_refusals_leave_state_untouched() {
        let mut lcg = Lcg(99);
        let rates = vec![rate("5/s"), rate("40/m"), rate("100/h")];
        let mut m = MultiLimiter::new(rates.clone());
        let mut singles: Vec<RateLimiter> = rates.into_iter().map(RateLimiter::new).collect();
        let mut now = 0;
        for _ in 0..20_000 {
            now += lcg.below(400);
            let got = m.try_acquire(now);
            // Model: check every single limiter on clones, commit only if all pass.
            let mut trial = singles.clone();
            let results: Vec<Result<(), u64>> =
                trial.iter_mut().map(|l| l.try_acquire(now)).collect();
            if results.iter().all(Result::is_ok) {
                singles = trial;
                assert_eq!(got, Ok(()));
            } else {
                let longest = results.iter().filter_map(|r| r.err()).max();
                assert_eq!(got.err(), longest);
                for l in &mut singles {
                    l.refill(now);
                }
            }
        }
    }

    #[test]
    fn concurrency_never_exceeds_max() {
        let mut c = Concurrency::new(3);
        assert!(c.try_acquire());
        assert!(c.try_acquire());
        assert!(c.try_acquire());
        assert!(!c.try_acquire());
        assert_eq!(c.current(), 3);
        c.release();
        assert_eq!(c.current(), 2);
        assert!(c.try_acquire());
        assert!(!c.try_acquire());

        let mut lcg = Lcg(3);
        let mut c = Concurrency::new(7);
        let mut held = 0u32;
        for _ in 0..100_000 {
            if lcg.below(3) < 2 {
                let ok = c.try_acquire();
                assert_eq!(ok, held < 7);
                held += u32::from(ok);
            } else if held > 0 {
                c.release();
                held -= 1;
            }
            assert_eq!(c.current(), held);
            assert!(c.current() <= c.max());
        }
        assert_eq!(c.max_seen(), 7);

        let mut zero = Concurrency::new(0);
        assert!(!zero.try_acquire());
        assert_eq!(zero.max_seen(), 0);
    }

    #[test]
    fn concurrency_lowered_max_drains() {
        let mut c = Concurrency::new(4);
        for _ in 0..4 {
            assert!(c.try_acquire());
        }
        c.set_max(2);
        assert!(!c.try_acquire());
        c.release();
        c.release();
        assert!(!c.try_acquire());
        c.release();
        assert!(c.try_acquire());
        assert_eq!(c.current(), 2);
        assert_eq!(c.max_seen(), 4);
    }
    #[test]
    fn retune_keeps_unchanged_buckets_and_scales_changed_ones() {
        let mut m = MultiLimiter::new(vec![rate("10/s"), rate("100/m")]);
        for _ in 0..10 {
            assert!(m.try_acquire(0).is_ok());
        }
        assert!(m.try_acquire(0).is_err(), "10/s spent");
        // Same rates: nothing changes.
        m.retune(&[rate("10/s"), rate("100/m")]);
        assert!(m.try_acquire(0).is_err());
        // 10/s → 2/s: the per-second bucket stays empty (same fraction), so
        // the next permit comes at the new rate's pace, not a fresh burst.
        m.retune(&[rate("2/s"), rate("100/m")]);
        assert!(m.has_rates(&[rate("2/s"), rate("100/m")]));
        assert_eq!(m.try_acquire(0), Err(500));
        assert!(m.try_acquire(500).is_ok());
        assert!(m.try_acquire(500).is_err());
        // The per-minute bucket kept its 11 spent tokens (less the 0.6 s of
        // refill since): 90 more at t = 600 ms, not 100.
        m.retune(&[rate("1000/s"), rate("100/m")]);
        let granted = (0..200).filter(|_| m.try_acquire(600).is_ok()).count();
        assert_eq!(granted, 90);
        // A new period starts full; removing every rate lifts the limit.
        m.retune(&[rate("1/h")]);
        assert!(m.try_acquire(5000).is_ok());
        assert!(m.try_acquire(5000).is_err());
        m.retune(&[]);
        assert!(m.try_acquire(5000).is_ok());
    }
}
