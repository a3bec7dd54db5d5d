//! Single flight: one upstream fetch per key at a time, whoever asks. The fetch runs in a task
//! of its own (a caller that goes away does not cancel it for the others), stores what it got
//! in the store current when it finishes, and answers every waiter through a watch channel.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::StatusCode;
use tokio::sync::{watch, Mutex};

use super::freshness::{assess, Freshness, Windows};
use super::purge::Epochs;
use super::store::Memory;
use crate::clock;
use crate::domain::Export;
use crate::upstream::{Failed, Fetched, Sent, Validators, Waiters, Wanted};

/// A flight's outcome: the response and what became of it.
pub type FlightResult = Result<(Arc<Fetched>, Kept), Failed>;

/// What a flight did with its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    pub stored: bool,
    /// The upstream answered `304` to the flight's conditional request: the response is the
    /// stale entry, renewed.
    pub revalidated: bool,
}

pub enum Joined {
    /// Wait on this flight; `true` when this caller started it. The caller counts as waiting
    /// for as long as it holds the [`Waiting`].
    Flight(watch::Receiver<Option<FlightResult>>, bool, Waiting, Sent),
    /// A fresh entry appeared meanwhile: it, its age and its freshness left.
    Fresh(Arc<Fetched>, Duration, Duration),
}

/// One caller waiting on a flight, counted until dropped (answered, or gone): a flight whose
/// every caller has gone sends nothing upstream (see [`Wanted`]).
pub struct Waiting(Arc<Waiters>);

impl Waiting {
    fn enter(waiters: &Arc<Waiters>) -> Waiting {
        waiters.enter();
        Waiting(waiters.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// A flight: its outcome to come, how many callers wait for it, and when it went upstream.
type Flight = (watch::Receiver<Option<FlightResult>>, Arc<Waiters>, Sent);

/// Fetches in flight. An async mutex: a caller that finds no flight re-reads the store while
/// holding it, so a flight that completes in between is never started twice.
#[derive(Default)]
pub struct Flights(Arc<Mutex<HashMap<Export, Flight>>>);

impl Flights {
    /// Joins the fetch in flight for `key`, or starts one (then this caller leads). With
    /// `recheck`, a fresh entry stored since the caller looked is returned instead. A
    /// `background` fetch (a stale-while-revalidate refresh) is wanted whoever waits. A
    /// `stale` entry with validators is revalidated: the request is conditional, and an
    /// upstream `304` renews that entry instead of replacing it.
    pub async fn join_or_start<F, Fut>(
        &self,
        key: &Export,
        fetch: F,
        recheck: Option<&Windows>,
        background: bool,
        stale: Option<Arc<Fetched>>,
        levels: Levels<'_>,
    ) -> Joined
    where
        F: FnOnce(Wanted, Option<Validators>) -> Fut,
        Fut: Future<Output = Result<Fetched, Failed>> + Send + 'static,
    {
        let Levels {
            store,
            purges,
            shared,
        } = levels;
        let mut flights = self.0.lock().await;
        if let Some((rx, waiters, sent)) = flights.get(key) {
            // A flight whose task ended without answering (it cannot, short of a panic) must
            // not answer for the key forever: start a new one instead.
            let abandoned = rx.has_changed().is_err() && rx.borrow().is_none();
            if !abandoned {
                return Joined::Flight(rx.clone(), false, Waiting::enter(waiters), sent.clone());
            }
        }
        if let (Some(windows), Some(current)) = (recheck, store.load_full()) {
            // A flight removes itself only after storing, so under this lock the store is
            // current: what a just-finished flight stored is seen here.
            if let Some(entry) = current.get(key).await {
                if let Freshness::Fresh { age, ttl_left } =
                    assess(entry.received, clock::now(), windows)
                {
                    return Joined::Fresh(entry, age, ttl_left);
                }
            }
        }
        let (tx, rx) = watch::channel(None);
        let waiters = Arc::new(Waiters::default());
        let waiting = Waiting::enter(&waiters);
        let wanted = if background {
            Wanted::always()
        } else {
            Wanted::while_waited(waiters.clone())
        };
        let sent = wanted.sent.clone();
        flights.insert(key.clone(), (rx.clone(), waiters, sent.clone()));
        drop(flights);

        let validators = stale.as_deref().and_then(Validators::of);
        let stale = stale.filter(|_| validators.is_some());
        let future = fetch(wanted, validators);
        let store = store.clone();
        let flights = self.0.clone();
        let purges = purges.clone();
        let epoch = purges.epoch(&key.agent, &key.convo);
        let key = key.clone();
        let task = async move {
            // The fleet's purge epoch, read as the fetch starts: a purge anywhere after this
            // keeps the result out of Redis.
            let shared_epoch = async {
                match &shared {
                    Some((redis, _, _)) => redis.epoch(&key.agent, &key.convo).await,
                    None => None,
                }
            };
            // One fetch for the fleet: the lease holder fetches, the others wait for its entry
            // (one newer than the stale entry this replica holds).
            let fetched = async {
                match &shared {
                    Some((redis, _, lease)) => {
                        let newer_than = stale.as_ref().map(|e| e.received);
                        redis.one_fetch(&key, *lease, newer_than, future).await
                    }
                    None => (future.await, None),
                }
            };
            let (shared_epoch, (result, lease)) = tokio::join!(shared_epoch, fetched);
            let result = match result {
                Ok(fetched) => {
                    // An upstream 304 to the conditional request: the stale entry, renewed.
                    let (fetched, revalidated) = match &stale {
                        Some(stale) if fetched.status == StatusCode::NOT_MODIFIED => {
                            (Arc::new(stale.renewed(&fetched)), true)
                        }
                        _ => (Arc::new(fetched), false),
                    };
                    let stored = keep(&store, &key, &fetched, &purges, epoch).await;
                    // What this replica stored, the others find in the second level (not
                    // when the epoch could not be read: then nothing is known of purges).
                    match (&shared, shared_epoch) {
                        (Some((redis, keep_for, _)), Some(shared_epoch))
                            if stored && !fetched.from_shared =>
                        {
                            redis.put_entry(&key, fetched.clone(), *keep_for, shared_epoch, lease);
                        }
                        _ => {
                            if let Some(lease) = lease {
                                lease.release();
                            }
                        }
                    }
                    Ok((
                        fetched,
                        Kept {
                            stored,
                            revalidated,
                        },
                    ))
                }
                Err(failed) => {
                    if let Some(lease) = lease {
                        lease.release();
                    }
                    Err(failed)
                }
            };
            flights.lock().await.remove(&key);
            let _ = tx.send(Some(result));
        };
        tokio::spawn(task);
        Joined::Flight(rx, true, waiting, sent)
    }
}

/// Where a flight keeps what it fetched: the memory store in use when it ends, the purge
/// epochs it must respect, and the shared second level (with how long entries stay there).
pub struct Levels<'a> {
    pub store: &'a Arc<ArcSwapOption<Memory>>,
    pub purges: &'a Arc<Epochs>,
    pub shared: Option<(
        Arc<crate::shared::Redis>,
        Duration,
        crate::shared::lease::Lease,
    )>,
}

/// Stores a fetched `200` in the store in use now (a reload may have replaced the one the
/// fetch began with), unless it may not be stored or a purge came since the fetch began.
async fn keep(
    store: &ArcSwapOption<Memory>,
    key: &Export,
    fetched: &Arc<Fetched>,
    purges: &Epochs,
    epoch: u64,
) -> bool {
    let Some(store) = store.load_full() else {
        return false;
    };
    if fetched.status != StatusCode::OK
        || !fetched.storable
        || fetched.body.len() > store.max_entry_bytes()
    {
        return false;
    }
    store.insert(key.clone(), fetched.clone()).await;
    // A purge of this conversation since this fetch began must win over what it fetched.
    if purges.epoch(&key.agent, &key.convo) != epoch {
        store.remove(key).await;
        return false;
    }
    true
}
