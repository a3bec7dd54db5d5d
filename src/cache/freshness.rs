//! What an entry's age allows, decided from its wall-clock store time (see [`crate::clock`])
//! and one configuration's windows: fresh, servable at once while a refresh runs
//! (stale-while-revalidate), servable only if the upstream fails (stale-if-error), or too old.

use std::time::Duration;

use crate::clock::UnixMillis;

/// One configuration's freshness windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    pub ttl: Duration,
    pub stale_if_error: Duration,
    pub stale_while_revalidate: Duration,
}

impl Windows {
    /// How long an entry is worth keeping at all: `ttl` plus the longer stale window, and at
    /// least `ttl` again, so an entry too old to serve can still be revalidated by a
    /// conditional request (a `304` saves its body's transfer) instead of being fetched whole.
    pub fn keep(&self) -> Duration {
        self.ttl.saturating_add(
            self.stale_if_error
                .max(self.stale_while_revalidate)
                .max(self.ttl),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Within `ttl`: `ttl_left` to go.
    Fresh { age: Duration, ttl_left: Duration },
    /// `past` beyond `ttl`, within `stale_while_revalidate`: serve now, refresh behind.
    Revalidate { age: Duration, past: Duration },
    /// `past` beyond `ttl`, within `stale_if_error`: fetch, and serve this if that fails.
    IfError { age: Duration, past: Duration },
    /// Too old to serve.
    Expired,
}

pub fn assess(stored: UnixMillis, now: UnixMillis, w: &Windows) -> Freshness {
    let age = stored.age(now);
    if age < w.ttl {
        return Freshness::Fresh {
            age,
            ttl_left: w.ttl - age,
        };
    }
    let past = age - w.ttl;
    if past < w.stale_while_revalidate {
        Freshness::Revalidate { age, past }
    } else if past < w.stale_if_error {
        Freshness::IfError { age, past }
    } else {
        Freshness::Expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock;

    fn windows(ttl: u64, sie: u64, swr: u64) -> Windows {
        Windows {
            ttl: Duration::from_secs(ttl),
            stale_if_error: Duration::from_secs(sie),
            stale_while_revalidate: Duration::from_secs(swr),
        }
    }

    /// Every boundary, on paused time: an entry stored now is walked through its life.
    #[tokio::test(start_paused = true)]
    async fn an_entry_ages_through_each_window() {
        let w = windows(60, 300, 30);
        let stored = clock::now();
        let at = |secs: u64| async move {
            tokio::time::advance(Duration::from_secs(secs)).await;
            assess(stored, clock::now(), &w)
        };
        assert!(matches!(
            at(0).await,
            Freshness::Fresh { ttl_left, .. } if ttl_left == Duration::from_secs(60)
        ));
        assert!(matches!(
            at(59).await,
            Freshness::Fresh { ttl_left, .. } if ttl_left.as_secs() == 1
        ));
        assert!(matches!(
            at(1).await,
            Freshness::Revalidate { past, .. } if past.as_secs() == 0
        ));
        assert!(matches!(
            at(29).await,
            Freshness::Revalidate { past, .. } if past.as_secs() == 29
        ));
        assert!(matches!(
            at(1).await,
            Freshness::IfError { past, age } if past.as_secs() == 30 && age.as_secs() == 90
        ));
        assert!(matches!(at(269).await, Freshness::IfError { .. }));
        assert_eq!(at(1).await, Freshness::Expired);
    }

    #[tokio::test(start_paused = true)]
    async fn without_stale_windows_an_entry_expires_at_ttl() {
        let w = windows(10, 0, 0);
        let stored = clock::now();
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(matches!(
            assess(stored, clock::now(), &w),
            Freshness::Fresh { .. }
        ));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(assess(stored, clock::now(), &w), Freshness::Expired);
        // Kept another ttl for revalidation, or for the longer stale window.
        assert_eq!(w.keep(), Duration::from_secs(20));
        assert_eq!(windows(10, 5, 20).keep(), Duration::from_secs(30));
        assert_eq!(windows(10, 0, 3).keep(), Duration::from_secs(20));
    }

    #[test]
    fn a_store_time_in_the_future_counts_as_age_zero() {
        let w = windows(10, 0, 0);
        let now = UnixMillis(1_000_000);
        assert!(matches!(
            assess(UnixMillis(1_005_000), now, &w),
            Freshness::Fresh { age, .. } if age.is_zero()
        ));
    }
}
