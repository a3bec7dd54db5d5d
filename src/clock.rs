//! Wall-clock time for cache entries: when an export was stored means the same on every
//! replica (and can be written to a shared store), unlike a process's monotonic clock.
//!
//! It is read through tokio's clock, so that tests which pause and advance tokio's time move
//! it too: the wall time is read once, and from then on advanced by tokio's monotonic clock
//! (which NTP slews but never steps, so ages never jump).

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// How long ago `self` was, as of `now` (zero for a time in the future).
    pub fn age(self, now: UnixMillis) -> Duration {
        Duration::from_millis(now.0.saturating_sub(self.0))
    }
}

/// Now, on the wall clock as tokio's clock sees it.
/// `after` from now on tokio's clock; a duration too long for the clock (a configured timeout of
/// centuries) is a year, which no request outlives.
pub fn deadline(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

pub fn now() -> UnixMillis {
    // The wall time (in ns since the epoch) at one instant of the monotonic clock.
    static BASE: OnceLock<(i128, std::time::Instant)> = OnceLock::new();
    let (wall, at) = *BASE.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        (wall, std::time::Instant::now())
    });
    let now = tokio::time::Instant::now().into_std();
    let since = match now.checked_duration_since(at) {
        Some(after) => after.as_nanos() as i128,
        None => -(at.duration_since(now).as_nanos() as i128),
    };
    UnixMillis(u64::try_from((wall + since) / 1_000_000).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_paused_time() {
        let a = now();
        tokio::time::advance(Duration::from_secs(90)).await;
        let b = now();
        let moved = a.age(b);
        assert!(
            moved >= Duration::from_secs(90) && moved < Duration::from_secs(91),
            "{moved:?}"
        );
    }

    #[tokio::test]
    async fn is_the_wall_clock_when_not_paused() {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(now().0.abs_diff(wall) < 1000);
    }
}
