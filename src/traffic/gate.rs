//! Whether a region may be sent to now: paused by an upstream `429` (until its
//! `Retry-After`), or its breaker open (too many failures in its last exchanges). After either,
//! exactly one exchange probes the region; its outcome reopens or closes it. A local state
//! machine; a shared pause (every replica) sits in front of it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::time::Instant;

use crate::config::Breaker;

/// The longest pause an upstream `Retry-After` may set.
pub const MAX_PAUSE: Duration = Duration::from_secs(60);
/// The pause when a `429` says nothing.
pub const DEFAULT_PAUSE: Duration = Duration::from_secs(1);

/// Why a region is not sent to now, and for how much longer (at least until the probe that is
/// on its way returns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Paused by a `429`.
    Paused(Duration),
    /// The breaker is open.
    Open(Duration),
}

/// How one exchange went, for the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// 5xx other than 501, a timeout, a connection error.
    Failure,
    /// A `429`, with its pause.
    RateLimited(Duration),
    /// Not an exchange after all (nothing sent): a probe leaves room for the next.
    NotSent,
}

pub struct Gate {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Mutex<Inner>,
    paused: IntGauge,
    open: IntGauge,
}

struct Inner {
    settings: Breaker,
    /// Paused by a 429 until then.
    paused_until: Option<Instant>,
    /// The breaker is open until then.
    open_until: Option<Instant>,
    /// A probe exchange is on its way.
    probing: bool,
    /// The last `window` exchanges while closed: true for a failure.
    recent: VecDeque<bool>,
    failures: usize,
}

/// Leave to send one exchange; report how it went with [`Ticket::report`]. A ticket dropped
/// unreported counts as [`Outcome::NotSent`].
pub struct Ticket {
    shared: Arc<Shared>,
    probe: bool,
    reported: bool,
}

impl Ticket {
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    pub fn report(mut self, outcome: Outcome) {
        self.reported = true;
        self.shared.report(self.probe, outcome);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.reported {
            self.shared.report(self.probe, Outcome::NotSent);
        }
    }
}

impl Gate {
    pub fn new(settings: Breaker, paused: IntGauge, open: IntGauge) -> Gate {
        paused.set(0);
        open.set(0);
        Gate {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    settings,
                    paused_until: None,
                    open_until: None,
                    probing: false,
                    recent: VecDeque::new(),
                    failures: 0,
                }),
                paused,
                open,
            }),
        }
    }

    pub fn configure(&self, settings: Breaker) {
        let mut inner = self.shared.lock();
        if inner.settings != settings {
            inner.settings = settings;
            inner.recent.clear();
            inner.failures = 0;
        }
    }

    /// Leave to send, or why not. Once a pause or an opening has run out, the first caller
    /// gets the probe and the others wait for its outcome (told so for one more second).
    pub fn admit(&self) -> Result<Ticket, Closed> {
        let now = Instant::now();
        let mut inner = self.shared.lock();
        let waiting = |until: Instant| until.saturating_duration_since(now);
        if let Some(until) = inner.paused_until {
            if until > now {
                return Err(Closed::Paused(waiting(until)));
            }
            if inner.probing {
                return Err(Closed::Paused(DEFAULT_PAUSE));
            }
        }
        if let Some(until) = inner.open_until {
            if until > now {
                return Err(Closed::Open(waiting(until)));
            }
            if inner.probing {
                return Err(Closed::Open(DEFAULT_PAUSE));
            }
        }
        let probe = inner.paused_until.is_some() || inner.open_until.is_some();
        if probe {
            inner.probing = true;
        }
        Ok(Ticket {
            shared: self.shared.clone(),
            probe,
            reported: false,
        })
    }

    /// Pauses the region as another replica's `429` did (no probe is owed by this one).
    pub fn pause_from_peer(&self, pause: Duration) {
        self.shared.report(false, Outcome::RateLimited(pause));
    }

    /// Whether the region is closed now, without taking the probe: a request that finds it
    /// closed is refused before it queues for a slot.
    pub fn peek(&self) -> Result<(), Closed> {
        let now = Instant::now();
        let inner = self.shared.lock();
        let waiting = |until: Instant| until.saturating_duration_since(now);
        match (inner.paused_until, inner.open_until) {
            (Some(until), _) if until > now => Err(Closed::Paused(waiting(until))),
            (Some(_), _) if inner.probing => Err(Closed::Paused(DEFAULT_PAUSE)),
            (_, Some(until)) if until > now => Err(Closed::Open(waiting(until))),
            (_, Some(_)) if inner.probing => Err(Closed::Open(DEFAULT_PAUSE)),
            _ => Ok(()),
        }
    }

    /// Paused or open now: (paused, open).
    pub fn state(&self) -> (bool, bool) {
        let inner = self.shared.lock();
        (inner.paused_until.is_some(), inner.open_until.is_some())
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn report(self: &Arc<Self>, probe: bool, outcome: Outcome) {
        let now = Instant::now();
        let mut inner = self.lock();
        if probe {
            inner.probing = false;
        }
        match outcome {
            Outcome::NotSent => {}
            Outcome::RateLimited(pause) => {
                let pause = pause.clamp(Duration::from_millis(1), MAX_PAUSE);
                let until = now + pause;
                if inner.paused_until.is_none_or(|u| u < until) {
                    inner.paused_until = Some(until);
                }
                self.paused.set(1);
                let until = inner.paused_until.unwrap_or(until);
                self.clear_gauge_at(until);
                // A 429 says nothing of the region's health: the breaker's probe, if this
                // was one, is still owed.
            }
            Outcome::Success | Outcome::Failure => {
                let failed = outcome == Outcome::Failure;
                if probe {
                    if inner.paused_until.is_some_and(|u| u <= now) {
                        inner.paused_until = None;
                        self.paused.set(0);
                    }
                    if inner.open_until.is_some() {
                        if failed {
                            let until = now + inner.settings.open_for;
                            inner.open_until = Some(until);
                            self.open.set(1);
                            self.clear_gauge_at(until);
                        } else {
                            inner.open_until = None;
                            self.open.set(0);
                        }
                        return;
                    }
                }
                if inner.open_until.is_some() {
                    // An exchange let through before the opening.
                    return;
                }
                inner.recent.push_back(failed);
                if failed {
                    inner.failures += 1;
                }
                while inner.recent.len() > inner.settings.window {
                    if inner.recent.pop_front() == Some(true) {
                        inner.failures -= 1;
                    }
                }
                let seen = inner.recent.len();
                if seen >= inner.settings.min_exchanges
                    && inner.failures as f64 >= inner.settings.failure_ratio * seen as f64
                {
                    let until = now + inner.settings.open_for;
                    inner.open_until = Some(until);
                    inner.recent.clear();
                    inner.failures = 0;
                    self.open.set(1);
                    self.clear_gauge_at(until);
                    tracing::warn!(
                        open_for = ?inner.settings.open_for,
                        "upstream breaker opened: too many failed exchanges"
                    );
                }
            }
        }
    }

    /// The gauges say "paused" while nothing may be sent: they drop back when the time is up
    /// (the probe then decides), even if no request comes to look.
    fn clear_gauge_at(self: &Arc<Self>, at: Instant) {
        let shared = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let now = Instant::now();
            let inner = shared.lock();
            if inner.paused_until.is_none_or(|u| u <= now) {
                shared.paused.set(0);
            }
            if inner.open_until.is_none_or(|u| u <= now) {
                shared.open.set(0);
            }
        });
    }
}

#[cfg(test)]
mod tests;
