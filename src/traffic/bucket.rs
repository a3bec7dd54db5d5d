//! Token buckets as GCRA (one "theoretical arrival time" per key): the teams' request rate at
//! the gateway. The arithmetic is the one a shared (Redis) bucket runs too, so that a team's
//! limit means the same with or without shared state.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Rate;

/// Buckets kept for teams that `[teams]` does not name (their names come from tokens): past
/// this many, full buckets are dropped, and if none is, newcomers share one overflow bucket.
pub const MAX_UNLISTED: usize = 10_000;

/// A bucket's limit: `burst` requests, one more every `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub rate: Rate,
    pub burst: u32,
}

impl Limit {
    fn interval(&self) -> Duration {
        self.rate.interval()
    }

    /// The time a full bucket takes to refill from empty.
    pub fn window(&self) -> Duration {
        self.interval() * self.burst
    }
}

/// What a bucket said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Taken; this many are left, and the bucket is full again after `full_in`.
    Allowed { remaining: u32, full_in: Duration },
    /// Empty: the next request is allowed after `retry_after`; full again after `full_in`.
    Limited {
        retry_after: Duration,
        full_in: Duration,
    },
}

/// One GCRA step: the key's arrival time `tat` (None: a full bucket), the limit, now. Returns
/// the verdict and the new `tat` (unchanged when limited).
pub fn gcra(tat: Option<Instant>, limit: Limit, now: Instant) -> (Verdict, Option<Instant>) {
    let interval = limit.interval();
    let window = limit.window();
    let tat = tat.unwrap_or(now).max(now);
    let new_tat = tat + interval;
    // Allowed while the new arrival time stays within one window of now.
    let ahead = new_tat - now;
    if ahead > window {
        let retry_after = ahead - window;
        return (
            Verdict::Limited {
                retry_after,
                full_in: tat - now,
            },
            Some(tat),
        );
    }
    let left = window - ahead;
    let remaining = if interval.is_zero() {
        limit.burst
    } else {
        u32::try_from(left.as_nanos() / interval.as_nanos()).unwrap_or(u32::MAX)
    };
    (
        Verdict::Allowed {
            remaining,
            full_in: ahead,
        },
        Some(new_tat),
    )
}

/// The teams' buckets, in this process (the fallback a shared store sits in front of).
#[derive(Default)]
pub struct TeamBuckets {
    inner: Mutex<Buckets>,
}

#[derive(Default)]
struct Buckets {
    listed: HashMap<String, Instant, foldhash::fast::RandomState>,
    unlisted: HashMap<String, Instant, foldhash::fast::RandomState>,
    overflow: Option<Instant>,
}

impl TeamBuckets {
    /// Takes one request from `team`'s bucket. `listed`: `[teams]` names the team (its bucket
    /// is kept however many there are; the config bounds them).
    pub fn take(&self, team: &str, listed: bool, limit: Limit, now: Instant) -> Verdict {
        let mut b = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let b = &mut *b;
        let map = if listed {
            &mut b.listed
        } else {
            &mut b.unlisted
        };
        if let Some(tat) = map.get_mut(team) {
            let (verdict, next) = gcra(Some(*tat), limit, now);
            if let Some(next) = next {
                *tat = next;
            }
            return verdict;
        }
        if !listed && map.len() >= MAX_UNLISTED {
            // A bucket whose arrival time has passed is full: dropping it changes nothing.
            map.retain(|_, tat| *tat > now);
            if map.len() >= MAX_UNLISTED {
                let (verdict, next) = gcra(b.overflow, limit, now);
                b.overflow = next;
                return verdict;
            }
        }
        let (verdict, next) = gcra(None, limit, now);
        if let Some(next) = next {
            map.insert(team.to_string(), next);
        }
        verdict
    }

    /// Drops buckets that are full again (idle long enough), and those of teams a reload
    /// removed from `[teams]`.
    pub fn sweep(&self, now: Instant, listed: impl Fn(&str) -> bool) {
        let mut b = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        b.unlisted.retain(|_, tat| *tat > now);
        b.listed.retain(|team, tat| *tat > now && listed(team));
        if b.overflow.is_some_and(|tat| tat <= now) {
            b.overflow = None;
        }
    }

    /// Buckets held: (listed, unlisted).
    pub fn len(&self) -> (usize, usize) {
        let b = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (b.listed.len(), b.unlisted.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(text: &str, burst: u32) -> Limit {
        Limit {
            rate: Rate::parse(text).unwrap(),
            burst,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_lets_its_burst_through_then_refills_at_its_rate() {
        let buckets = TeamBuckets::default();
        let l = limit("10/s", 5);
        let now = Instant::now();
        for left in (0..5).rev() {
            match buckets.take("a", true, l, now) {
                Verdict::Allowed { remaining, .. } => assert_eq!(remaining, left),
                v => panic!("{v:?}"),
            }
        }
        match buckets.take("a", true, l, now) {
            Verdict::Limited {
                retry_after,
                full_in,
            } => {
                assert_eq!(retry_after, Duration::from_millis(100));
                assert_eq!(full_in, Duration::from_millis(500));
            }
            v => panic!("{v:?}"),
        }
        // Another team has its own bucket.
        assert!(matches!(
            buckets.take("b", true, l, now),
            Verdict::Allowed { remaining: 4, .. }
        ));
        tokio::time::advance(Duration::from_millis(100)).await;
        let now = Instant::now();
        assert!(matches!(
            buckets.take("a", true, l, now),
            Verdict::Allowed { remaining: 0, .. }
        ));
        assert!(matches!(
            buckets.take("a", true, l, now),
            Verdict::Limited { .. }
        ));
        // Over a long run the bucket passes its rate and no more.
        let mut allowed = 0;
        for _ in 0..1000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            if matches!(
                buckets.take("a", true, l, Instant::now()),
                Verdict::Allowed { .. }
            ) {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 100, "10 s at 10/s");
    }

    #[tokio::test(start_paused = true)]
    async fn unlisted_teams_are_bounded_and_forgotten_when_full() {
        let buckets = TeamBuckets::default();
        let l = limit("1/s", 1);
        let now = Instant::now();
        for i in 0..MAX_UNLISTED + 500 {
            buckets.take(&format!("made-up-{i}"), false, l, now);
        }
        assert_eq!(buckets.len(), (0, MAX_UNLISTED));
        // The newcomers past the bound shared one bucket: the 501st was limited.
        assert!(matches!(
            buckets.take("yet-another", false, l, now),
            Verdict::Limited { .. }
        ));
        tokio::time::advance(Duration::from_secs(1)).await;
        buckets.sweep(Instant::now(), |_| true);
        assert_eq!(buckets.len(), (0, 0));
    }
}
