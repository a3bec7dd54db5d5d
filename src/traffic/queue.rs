//! A region's upstream slots and its fair queue. At most `max_concurrency` exchanges are in
//! flight (and with a `rate`, starts are spaced by its interval); requests beyond wait, per
//! team, and slots are handed out by deficit round robin over the teams that wait: each
//! team in turn gets up to `weight` slots, FIFO within the team. A team with a backlog of
//! thousands thus delays another team's first request by one round, not by its backlog.
//!
//! A waiter that gives up (timeout, or every caller gone) leaves the queue at once, and a
//! slot handed to a waiter that is no longer there goes to the next one. A full queue refuses
//! the newest waiter of the team holding most of it rather than a newcomer of a smaller team.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::{Histogram, IntGauge};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::Rate;

/// A region's slot settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub max_concurrency: usize,
    pub max_queue: usize,
    pub queue_timeout: Duration,
    pub rate: Option<Rate>,
}

/// Why no slot was had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `max_queue` requests were waiting already.
    Full,
    /// Waited `queue_timeout`.
    Timeout,
}

pub struct Queue {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Mutex<Inner>,
    depth: IntGauge,
    wait: Histogram,
}

struct Inner {
    settings: Settings,
    in_flight: usize,
    queued: usize,
    next_id: u64,
    flows: HashMap<String, Flow, foldhash::fast::RandomState>,
    /// Teams with waiters, in round-robin order; the front one is being served.
    round: VecDeque<String>,
    /// The earliest time the next exchange may start (`rate`).
    next_start: Option<Instant>,
    /// A task is sleeping until `next_start` to hand out the next slot.
    timer: bool,
}

struct Flow {
    weight: u32,
    /// Slots this team may still take in its current turn.
    deficit: u32,
    waiters: VecDeque<Waiter>,
}

struct Waiter {
    id: u64,
    grant: oneshot::Sender<Permit>,
}

/// A slot: held for the exchange (retries included), given back when dropped.
pub struct Permit {
    shared: Option<Arc<Shared>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            let mut inner = shared.lock();
            inner.in_flight = inner.in_flight.saturating_sub(1);
            shared.dispatch(&mut inner);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether an exchange may start now under `rate`; if so, the start is taken.
    fn pace(inner: &mut Inner, now: Instant) -> bool {
        let Some(rate) = inner.settings.rate else {
            return true;
        };
        match inner.next_start {
            Some(at) if at > now => false,
            _ => {
                inner.next_start = Some(now + rate.interval());
                true
            }
        }
    }

    /// Hands free slots to waiters, teams in turn. Called with the lock held.
    fn dispatch(self: &Arc<Self>, inner: &mut Inner) {
        while inner.in_flight < inner.settings.max_concurrency && inner.queued > 0 {
            let before = inner.next_start;
            if !Self::pace(inner, Instant::now()) {
                self.arm_timer(inner);
                break;
            }
            let Some(waiter) = Self::next_waiter(inner) else {
                inner.next_start = before;
                break;
            };
            inner.in_flight += 1;
            let permit = Permit {
                shared: Some(self.clone()),
            };
            if let Err(mut permit) = waiter.grant.send(permit) {
                // The waiter left between its last look and now: the slot and the start it
                // took go to the next one.
                permit.shared = None;
                inner.in_flight -= 1;
                inner.next_start = before;
            }
        }
        self.depth.set(inner.queued as i64);
    }

    /// The next waiter by deficit round robin.
    fn next_waiter(inner: &mut Inner) -> Option<Waiter> {
        loop {
            let team = inner.round.front()?.clone();
            let Some(flow) = inner.flows.get_mut(&team) else {
                inner.round.pop_front();
                continue;
            };
            if flow.deficit == 0 {
                flow.deficit = flow.weight.max(1);
            }
            let waiter = flow.waiters.pop_front();
            flow.deficit = flow.deficit.saturating_sub(1);
            if flow.waiters.is_empty() {
                inner.flows.remove(&team);
                inner.round.pop_front();
            } else if flow.deficit == 0 {
                inner.round.rotate_left(1);
            }
            if let Some(waiter) = waiter {
                inner.queued = inner.queued.saturating_sub(1);
                return Some(waiter);
            }
        }
    }

    /// A full queue makes room for `team` when another team holds more of it: the newest
    /// waiter of the team with the most waiting is refused instead (as fq_codel drops from the
    /// fattest flow), so one team's backlog cannot lock the others out of the queue.
    fn push_out(inner: &mut Inner, team: &str) -> bool {
        let mine = inner.flows.get(team).map_or(0, |f| f.waiters.len());
        let Some((fattest, len)) = inner
            .flows
            .iter()
            .map(|(t, f)| (t, f.waiters.len()))
            .max_by_key(|(_, len)| *len)
        else {
            return false;
        };
        if len <= mine + 1 {
            return false;
        }
        let fattest = fattest.clone();
        if let Some(flow) = inner.flows.get_mut(&fattest) {
            // Dropping its sender tells the waiter it was refused.
            flow.waiters.pop_back();
        }
        inner.queued = inner.queued.saturating_sub(1);
        true
    }

    /// Wakes the queue when `rate` allows the next start.
    fn arm_timer(self: &Arc<Self>, inner: &mut Inner) {
        let (Some(at), false) = (inner.next_start, inner.timer) else {
            return;
        };
        inner.timer = true;
        let shared = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let mut inner = shared.lock();
            inner.timer = false;
            shared.dispatch(&mut inner);
        });
    }

    /// Takes a waiter out of the queue (it gave up); false when it was already granted.
    fn leave(&self, team: &str, id: u64) -> bool {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(flow) = inner.flows.get_mut(team) else {
            return false;
        };
        let Some(at) = flow.waiters.iter().position(|w| w.id == id) else {
            return false;
        };
        flow.waiters.remove(at);
        if flow.waiters.is_empty() {
            inner.flows.remove(team);
            inner.round.retain(|t| t != team);
        }
        inner.queued = inner.queued.saturating_sub(1);
        self.depth.set(inner.queued as i64);
        true
    }
}

impl Queue {
    pub fn new(settings: Settings, depth: IntGauge, wait: Histogram) -> Queue {
        depth.set(0);
        Queue {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    settings,
                    in_flight: 0,
                    queued: 0,
                    next_id: 0,
                    flows: HashMap::default(),
                    round: VecDeque::new(),
                    next_start: None,
                    timer: false,
                }),
                depth,
                wait,
            }),
        }
    }

    /// New settings (a reload): a higher limit lets waiters in at once.
    pub fn configure(&self, settings: Settings) {
        let mut inner = self.shared.lock();
        if inner.settings != settings {
            inner.settings = settings;
            self.shared.dispatch(&mut inner);
        }
    }

    pub fn settings(&self) -> Settings {
        self.shared.lock().settings
    }

    /// Waits until `rate` allows one more start, and takes it: a retry within a held slot.
    pub async fn pace(&self) {
        let Some(rate) = self.shared.lock().settings.rate else {
            return;
        };
        self.pace_at(rate.interval()).await;
    }

    /// Waits for the next start and takes it, spaced `interval` from the one after (a
    /// replica's share of a fleet rate while the fleet's count is out of reach).
    pub async fn pace_at(&self, interval: Duration) {
        let interval = interval.min(Duration::from_secs(3600));
        let at = {
            let mut inner = self.shared.lock();
            let now = Instant::now();
            let at = inner.next_start.unwrap_or(now).max(now);
            inner.next_start = Some(at + interval);
            at
        };
        tokio::time::sleep_until(at).await;
    }

    /// (in flight, queued), for tests and diagnostics.
    pub fn load(&self) -> (usize, usize) {
        let inner = self.shared.lock();
        (inner.in_flight, inner.queued)
    }

    /// A slot for `team`, waiting in its queue for at most `queue_timeout`; `gone` resolves
    /// when nobody wants the exchange any more (the request then leaves the queue and the
    /// caller gets `None` back). Returns the slot and the time waited.
    pub async fn acquire(
        &self,
        team: &str,
        weight: u32,
        gone: impl std::future::Future<Output = ()>,
    ) -> Result<Option<(Permit, Duration)>, Refused> {
        let started = Instant::now();
        let (rx, id, timeout) = {
            let mut inner = self.shared.lock();
            let inner = &mut *inner;
            if inner.in_flight < inner.settings.max_concurrency
                && inner.queued == 0
                && Shared::pace(inner, started)
            {
                inner.in_flight += 1;
                self.shared.wait.observe(0.0);
                return Ok(Some((
                    Permit {
                        shared: Some(self.shared.clone()),
                    },
                    Duration::ZERO,
                )));
            }
            if inner.queued >= inner.settings.max_queue && !Shared::push_out(inner, team) {
                return Err(Refused::Full);
            }
            let (tx, rx) = oneshot::channel();
            let id = inner.next_id;
            inner.next_id += 1;
            let flow = inner.flows.entry(team.to_string()).or_insert_with(|| {
                inner.round.push_back(team.to_string());
                Flow {
                    weight,
                    deficit: 0,
                    waiters: VecDeque::new(),
                }
            });
            flow.weight = weight;
            flow.waiters.push_back(Waiter { id, grant: tx });
            inner.queued += 1;
            // A slot may be free while `rate` holds the start back.
            self.shared.dispatch(inner);
            (rx, id, inner.settings.queue_timeout)
        };
        let mut leaving = Leaving {
            shared: &self.shared,
            team,
            id,
            armed: true,
        };
        enum Outcome {
            Granted(Permit),
            PushedOut,
            TimedOut,
            Gone,
        }
        let outcome = tokio::select! {
            biased;
            granted = rx => match granted {
                Ok(permit) => Outcome::Granted(permit),
                // Its sender was dropped: a waiter of a smaller team took its place.
                Err(_) => Outcome::PushedOut,
            },
            _ = tokio::time::sleep(timeout) => Outcome::TimedOut,
            _ = gone => Outcome::Gone,
        };
        let waited = started.elapsed();
        match outcome {
            Outcome::Granted(permit) => {
                leaving.armed = false;
                self.shared.wait.observe(waited.as_secs_f64());
                Ok(Some((permit, waited)))
            }
            // Gone: `leaving` takes the request out of the queue (or frees a slot granted
            // meanwhile, as the dropped receiver drops its permit).
            Outcome::Gone => Ok(None),
            Outcome::PushedOut => {
                leaving.armed = false;
                Err(Refused::Full)
            }
            Outcome::TimedOut => {
                self.shared.wait.observe(waited.as_secs_f64());
                Err(Refused::Timeout)
            }
        }
    }
}

/// Takes a waiter that gave up out of its queue.
struct Leaving<'a> {
    shared: &'a Arc<Shared>,
    team: &'a str,
    id: u64,
    armed: bool,
}

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.leave(self.team, self.id);
        }
    }
}

#[cfg(test)]
mod tests;
