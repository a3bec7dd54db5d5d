//! Whether anyone still wants an upstream exchange, and what a caller that leaves may still
//! learn of it: the waiters of a shared fetch (none left: nothing is sent, and a queued
//! exchange leaves its queue), when its first request went out and how long it queued.

use std::sync::Arc;
use std::time::Duration;

/// Whether anyone still waits for an exchange's answer: the callers of a shared fetch (none
/// left: nothing is sent), or always (a background refresh, a JWKS fetch, a caller's own
/// uncached request, whose future ends with the caller). It also notes when the fetch's first
/// request went out, for the access line of a caller that leaves meanwhile.
#[derive(Clone, Debug, Default)]
pub struct Wanted {
    waiters: Option<Arc<Waiters>>,
    pub sent: Sent,
}

/// How many callers wait for a fetch; the last to leave wakes whoever watches for it.
#[derive(Debug, Default)]
pub struct Waiters {
    count: std::sync::atomic::AtomicUsize,
    none_left: tokio::sync::Notify,
}

impl Waiters {
    pub fn enter(&self) {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn leave(&self) {
        if self.count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.none_left.notify_waiters();
        }
    }

    fn any(&self) -> bool {
        self.count.load(std::sync::atomic::Ordering::Acquire) > 0
    }
}

/// When a fetch's first request was sent upstream, and how long it waited for a slot first.
#[derive(Clone, Debug, Default)]
pub struct Sent(Arc<SentAt>);

#[derive(Debug, Default)]
struct SentAt {
    /// Wall-clock ms; 0: not yet.
    at: std::sync::atomic::AtomicU64,
    /// Microseconds in the region's queue, plus one (0: it never queued).
    queued_us: std::sync::atomic::AtomicU64,
}

impl Sent {
    /// When it was sent, if it was.
    pub fn at(&self) -> Option<crate::clock::UnixMillis> {
        match self.0.at.load(std::sync::atomic::Ordering::Acquire) {
            0 => None,
            ms => Some(crate::clock::UnixMillis(ms)),
        }
    }

    pub(super) fn mark(&self) {
        let now = crate::clock::now().0.max(1);
        let _ = self.0.at.compare_exchange(
            0,
            now,
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
        );
    }

    /// Records the time the fetch waited for an upstream slot (the first wait counts).
    pub fn queued(&self, waited: Duration) {
        let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX - 1) + 1;
        let _ = self.0.queued_us.compare_exchange(
            0,
            us,
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
        );
    }

    /// The time the fetch waited for an upstream slot, if it queued.
    pub fn queue_wait(&self) -> Option<Duration> {
        match self.0.queued_us.load(std::sync::atomic::Ordering::Acquire) {
            0 => None,
            us => Some(Duration::from_micros(us - 1)),
        }
    }
}

impl Wanted {
    pub fn always() -> Wanted {
        Wanted::default()
    }

    /// Wanted while any of `waiters` waits.
    pub fn while_waited(waiters: Arc<Waiters>) -> Wanted {
        Wanted {
            waiters: Some(waiters),
            sent: Sent::default(),
        }
    }

    pub fn still(&self) -> bool {
        self.waiters.as_ref().is_none_or(|w| w.any())
    }

    /// Resolves once every caller has gone (never, for a fetch wanted whoever waits).
    pub async fn gone(&self) {
        let Some(waiters) = &self.waiters else {
            return std::future::pending().await;
        };
        loop {
            let notified = waiters.none_left.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !waiters.any() {
                return;
            }
            notified.await;
        }
    }
}
