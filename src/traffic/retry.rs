//! Retries and their budget. An exchange is tried again (after a jittered 25–100 ms, within
//! `request_timeout`) only when Convocore cannot have acted on it or said to try again:
//! no connection, a connection closed before a response, or `502`/`503`/`504` without
//! `Retry-After`. A `429`, or a `503` with `Retry-After`, is never retried. A region's retries
//! over the last 10 s stay within 20 % of its first attempts (with a floor of 3, so the odd
//! failure of a quiet region is still retried, as Finagle's and Envoy's budgets keep a
//! minimum), so retries never turn a brownout into an outage.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The budget's window, in one-second slots.
const SLOTS: usize = 10;
/// Retries allowed per first attempt.
const RATIO: f64 = 0.2;
/// Retries allowed in the window however few the attempts.
const FLOOR: f64 = 3.0;

/// The shortest and longest pause before a retry.
pub const BACKOFF_MIN: Duration = Duration::from_millis(25);
pub const BACKOFF_MAX: Duration = Duration::from_millis(100);

#[derive(Default)]
pub struct Budget {
    inner: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    /// The second each slot counts, and its (first attempts, retries).
    slots: [(u64, u32, u32); SLOTS],
    origin: Option<Instant>,
}

impl Slots {
    fn second(&mut self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        now.saturating_duration_since(origin).as_secs()
    }

    fn slot(&mut self, second: u64) -> &mut (u64, u32, u32) {
        let slot = &mut self.slots[(second % SLOTS as u64) as usize];
        if slot.0 != second {
            *slot = (second, 0, 0);
        }
        slot
    }

    /// (first attempts, retries) over the window ending at `second`.
    fn totals(&self, second: u64) -> (u32, u32) {
        self.slots
            .iter()
            .filter(|(s, _, _)| *s + (SLOTS as u64) > second && *s <= second)
            .fold((0, 0), |(a, r), (_, fa, fr)| (a + fa, r + fr))
    }
}

impl Budget {
    /// Counts a first attempt.
    pub fn attempt(&self, now: Instant) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let second = s.second(now);
        s.slot(second).1 += 1;
    }

    /// Takes one retry from the budget, if it has one.
    pub fn try_retry(&self, now: Instant) -> bool {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let second = s.second(now);
        let (attempts, retries) = s.totals(second);
        if f64::from(retries) + 1.0 > (RATIO * f64::from(attempts)).max(FLOOR) {
            return false;
        }
        s.slot(second).2 += 1;
        true
    }
}

/// A pause in 25–100 ms, drawn afresh each time so that retries of many callers spread out.
pub fn backoff() -> Duration {
    let mut bytes = [0u8; 2];
    // Without a random draw, the middle of the range.
    let draw = if aws_lc_rs::rand::fill(&mut bytes).is_ok() {
        u64::from(u16::from_le_bytes(bytes))
    } else {
        u64::from(u16::MAX / 2)
    };
    let span = (BACKOFF_MAX - BACKOFF_MIN).as_micros() as u64;
    BACKOFF_MIN + Duration::from_micros(draw * span / u64::from(u16::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_stay_within_a_fifth_of_first_attempts_over_ten_seconds() {
        let budget = Budget::default();
        // A quiet region: its odd failure is retried, three times in ten seconds at most.
        budget.attempt(Instant::now());
        for _ in 0..3 {
            assert!(budget.try_retry(Instant::now()));
        }
        assert!(!budget.try_retry(Instant::now()));
        // A failing region under load: 100 attempts a second, each wanting a retry.
        let mut retries = 0;
        let mut attempts = 1;
        for _ in 0..30 {
            tokio::time::advance(Duration::from_secs(1)).await;
            for _ in 0..100 {
                budget.attempt(Instant::now());
                attempts += 1;
                if budget.try_retry(Instant::now()) {
                    retries += 1;
                }
            }
        }
        let ratio = f64::from(retries) / f64::from(attempts);
        assert!(ratio <= 0.21, "{retries} retries for {attempts} attempts");
        assert!(ratio >= 0.15, "{retries} retries for {attempts} attempts");
        // Ten quiet seconds later the budget has forgotten them.
        tokio::time::advance(Duration::from_secs(11)).await;
        budget.attempt(Instant::now());
        assert!(budget.try_retry(Instant::now()));
    }

    #[test]
    fn backoff_is_jittered_within_its_range() {
        let pauses: Vec<Duration> = (0..200).map(|_| backoff()).collect();
        assert!(pauses
            .iter()
            .all(|p| *p >= BACKOFF_MIN && *p <= BACKOFF_MAX));
        let distinct: std::collections::HashSet<_> = pauses.iter().collect();
        assert!(distinct.len() > 50, "jittered");
    }
}
