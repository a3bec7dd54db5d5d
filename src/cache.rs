//! The export cache: a byte-bounded memory store keyed by (agent, convo, format), single-flight
//! fetches, `no-cache` / `no-store`, stale-if-error and stale-while-revalidate, purge.
//!
//! [`Cache`] is the durable part (the store, the fetches in flight, the purge epoch) and
//! outlives reloads; [`Settings`] is one configuration's. Freshness is decided by
//! [`freshness`] from each entry's wall-clock store time, not by moka's expiry. moka's
//! `try_get_with` coalesces loads of absent keys only, and refreshing a present-but-expired
//! entry must coalesce too, so fetches in flight live in their own map ([`flight`]).
//! The cache says what happened ([`Answer`]); the response, `Cache-Status` included, is built
//! by `http::respond`.

pub mod flight;
pub mod freshness;
pub mod purge;
pub mod store;

use std::future::Future;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwapOption;
use http::header::CACHE_CONTROL;
use http::{HeaderMap, StatusCode};

use self::flight::{Flights, Joined, Levels};
use self::freshness::{assess, Freshness, Windows};
use self::purge::Epochs;
use self::store::Memory;
use crate::clock;
use crate::config;
pub use crate::domain::CacheStatus;
use crate::domain::Export;
use crate::upstream::{Failed, Fault, Fetched, Sent, Validators, Wanted};

/// What the caller's `Cache-Control` asks of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// `no-cache`: fetch afresh and replace the entry.
    Refresh,
    /// `no-store`: fetch without storing.
    Bypass,
}

impl Mode {
    pub fn from_headers(headers: &HeaderMap) -> Mode {
        let mut mode = Mode::Normal;
        // As bytes: a value with a non-ASCII byte elsewhere still says what it says.
        for value in headers.get_all(CACHE_CONTROL) {
            for directive in value.as_bytes().split(|b| *b == b',') {
                let directive = directive.trim_ascii();
                if directive.eq_ignore_ascii_case(b"no-store") {
                    return Mode::Bypass;
                }
                if directive.eq_ignore_ascii_case(b"no-cache")
                    || directive.eq_ignore_ascii_case(b"max-age=0")
                {
                    mode = Mode::Refresh;
                }
            }
        }
        mode
    }
}

/// Why the response went upstream, as RFC 9211's `fwd` parameter says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fwd {
    Miss,
    /// The caller asked for a fresh copy (`no-cache`).
    Request,
    /// The entry was stale.
    Stale,
}

/// How the answer was obtained, in the terms of RFC 9211 `Cache-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// A fresh entry, `ttl` whole seconds of freshness left.
    Hit { ttl: u64 },
    /// A fresh entry another replica stored, read from the shared Redis.
    SharedHit { ttl: u64 },
    /// The cache is disabled: every request goes upstream.
    Disabled,
    /// `no-store`: fetched without storing.
    Bypass,
    /// An expired entry served at once, `past` seconds beyond ttl, while a refresh runs.
    StaleWhileRevalidate { past: u64 },
    /// Fetched (or waited for another request's fetch, `collapsed`), and `stored` or not;
    /// `fwd_status` when the upstream's status is worth telling (not stored, or a failure).
    Forward {
        fwd: Fwd,
        fwd_status: Option<u16>,
        stored: bool,
        collapsed: bool,
    },
    /// The upstream answered the conditional request of a refresh with `304`: the expired
    /// entry was renewed (`collapsed`: by another request's fetch).
    Revalidated { collapsed: bool },
    /// The upstream failed (with `fwd_status`, or without any response) and an expired entry,
    /// `past` seconds beyond ttl, was served instead.
    StaleIfError { fwd_status: Option<u16>, past: u64 },
}

/// What the cache answers with: the response to send and how it was obtained.
pub struct Answer {
    pub response: Arc<Fetched>,
    pub status: CacheStatus,
    pub detail: Detail,
    /// `Age` in seconds, on HIT, STALE and REVALIDATED.
    pub age: Option<u64>,
    /// Whether this request itself went upstream (false for hits and for coalesced waiters).
    pub went_upstream: bool,
    /// Whether this request waited for another request's fetch.
    pub coalesced: bool,
}

/// One configuration's cache settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub enabled: bool,
    pub max_bytes: u64,
    pub windows: Windows,
    /// The second level, with `[shared]`.
    pub shared: Option<Arc<crate::shared::Redis>>,
    /// How long a fleet fetch lease lives, and how long others wait on it.
    pub lease: crate::shared::lease::Lease,
    /// The encodings offered by `Accept-Encoding`, in preference order.
    pub compress: Vec<crate::compress::Coding>,
}

impl Settings {
    pub fn from_config(c: &config::Cache) -> Settings {
        Settings {
            enabled: c.enabled,
            max_bytes: c.max_bytes,
            windows: Windows {
                ttl: c.ttl,
                stale_if_error: c.stale_if_error,
                stale_while_revalidate: c.stale_while_revalidate,
            },
            shared: None,
            lease: crate::shared::lease::Lease {
                hold: std::time::Duration::from_secs(40),
                wait: std::time::Duration::from_secs(30),
            },
            compress: c.compress.clone(),
        }
    }
}

/// The durable cache: what every configuration's requests share.
pub struct Cache {
    /// `None` while the cache is disabled. Swapped whole when a reload changes its size.
    store: Arc<ArcSwapOption<Memory>>,
    flights: Arc<Flights>,
    /// Bumped by a purge of a conversation; a fetch that overlaps it does not keep what it
    /// fetched.
    purges: Arc<Epochs>,
}

impl Cache {
    pub fn new(settings: &Settings) -> Cache {
        let store = settings
            .enabled
            .then(|| Arc::new(Memory::new(settings.max_bytes, settings.windows.keep())));
        Cache {
            store: Arc::new(ArcSwapOption::new(store)),
            flights: Arc::new(Flights::default()),
            purges: Arc::new(Epochs::default()),
        }
    }

    /// Applies a reloaded configuration: the store is kept, resized (keeping as many of the
    /// newest entries as fit), dropped when disabled, or made when enabled; entries that
    /// `keep` refuses (of a removed region) are dropped.
    pub async fn configure(&self, settings: &Settings, keep: impl Fn(&Fetched) -> bool) {
        if !settings.enabled {
            self.store.store(None);
            return;
        }
        let keep_for = settings.windows.keep();
        let current = self.store.load_full();
        let next = match current {
            Some(store) if store.fits(settings.max_bytes, keep_for) => {
                store.retain(keep).await;
                return;
            }
            Some(store) => store.rebuilt(settings.max_bytes, keep_for, keep).await,
            None => Memory::new(settings.max_bytes, keep_for),
        };
        self.store.store(Some(Arc::new(next)));
    }

    /// Answers `key` from the cache or through `fetch`, as `mode` and the entry's age allow.
    /// `fetch` runs in its own task, so a caller that goes away does not cancel it for others.
    /// `sent` is given the fetch's [`Sent`] as soon as this caller waits on one, so a caller
    /// that goes away can still tell whether its export went upstream.
    pub async fn get<F, Fut>(
        &self,
        settings: &Settings,
        key: &Export,
        mode: Mode,
        fetch: F,
        sent: &OnceLock<Sent>,
    ) -> Result<Answer, Failed>
    where
        F: FnOnce(Wanted, Option<Validators>) -> Fut,
        Fut: Future<Output = Result<Fetched, Failed>> + Send + 'static,
    {
        let mut entry = None;
        if mode == Mode::Normal && settings.enabled {
            if let Some(store) = &*self.store.load() {
                if let Some(found) = store.get(key).await {
                    let freshness = assess(found.received, clock::now(), &settings.windows);
                    if let Freshness::Fresh { age, ttl_left } = freshness {
                        return Ok(hit(found, age, ttl_left));
                    }
                    entry = Some((found, freshness));
                }
            }
        }
        // Boxed: everything but a fresh hit, so a hit's future stays small (the fetch and the
        // flight bookkeeping are kilobytes).
        Box::pin(self.get_slow(settings, key, mode, fetch, entry, sent)).await
    }

    /// [`Cache::get`] past a fresh hit: stale, missing, refreshed or bypassed. `entry` is what
    /// the store held for `key` and how fresh it was (looked up in `Normal` mode only).
    async fn get_slow<F, Fut>(
        &self,
        settings: &Settings,
        key: &Export,
        mode: Mode,
        fetch: F,
        entry: Option<(Arc<Fetched>, Freshness)>,
        sent: &OnceLock<Sent>,
    ) -> Result<Answer, Failed>
    where
        F: FnOnce(Wanted, Option<Validators>) -> Fut,
        Fut: Future<Output = Result<Fetched, Failed>> + Send + 'static,
    {
        if !settings.enabled || self.store.load().is_none() {
            // The caller's own future: it ends with the caller.
            let wanted = Wanted::always();
            let _ = sent.set(wanted.sent.clone());
            let fetched = fetch(wanted, None).await?;
            return Ok(forwarded(Arc::new(fetched), Detail::Disabled, true));
        }
        if mode == Mode::Bypass {
            let wanted = Wanted::always();
            let _ = sent.set(wanted.sent.clone());
            let fetched = fetch(wanted, None).await?;
            return Ok(Answer {
                response: Arc::new(fetched),
                status: CacheStatus::Bypass,
                detail: Detail::Bypass,
                age: None,
                went_upstream: true,
                coalesced: false,
            });
        }

        // A memory miss, or an expired memory entry, looks in the shared second level (another
        // replica may have refreshed it); what it finds, if newer, fills memory with its
        // original store time, then counts as if memory had held it.
        let mut entry = entry;
        if mode == Mode::Normal {
            if let (Some(shared), Some(store)) = (&settings.shared, self.store.load_full()) {
                let held = entry.as_ref().map(|(e, _)| e.received);
                let newer = |found: &Fetched| held.is_none_or(|t| found.received > t);
                if let Some(found) = shared.get_entry(key).await.filter(newer) {
                    let found = Arc::new(found);
                    let freshness = assess(found.received, clock::now(), &settings.windows);
                    if !matches!(freshness, Freshness::Expired) {
                        store.insert(key.clone(), found.clone()).await;
                        if let Freshness::Fresh { age, ttl_left } = freshness {
                            return Ok(Answer {
                                detail: Detail::SharedHit {
                                    ttl: ttl_left.as_secs(),
                                },
                                ..hit(found, age, ttl_left)
                            });
                        }
                        entry = Some((found, freshness));
                    }
                }
            }
        }

        let mut stale = None;
        // The entry a refresh revalidates (when it has validators): an upstream 304 renews it.
        let mut revalidate = None;
        match entry {
            Some((entry, Freshness::Revalidate { age, past })) => {
                // Serve at once; one background refresh per key replaces (or renews) the entry.
                let _ = self
                    .join_or_start(settings, key, fetch, true, true, Some(entry.clone()))
                    .await;
                return Ok(Answer {
                    response: entry,
                    status: CacheStatus::Stale,
                    detail: Detail::StaleWhileRevalidate {
                        past: past.as_secs(),
                    },
                    age: Some(age.as_secs()),
                    went_upstream: false,
                    coalesced: false,
                });
            }
            Some((entry, Freshness::IfError { age, past })) => {
                revalidate = Some(entry.clone());
                stale = Some((entry, age, past));
            }
            // Too old to serve even if the upstream fails, but still worth a conditional request
            // while it is kept (moka drops it then, on a clock of its own).
            Some((entry, _)) if entry.received.age(clock::now()) < settings.windows.keep() => {
                revalidate = Some(entry)
            }
            _ => {}
        }

        let recheck = mode == Mode::Normal;
        let (mut rx, leader, _waiting) = match self
            .join_or_start(settings, key, fetch, recheck, false, revalidate)
            .await
        {
            Joined::Flight(rx, leader, waiting, flight_sent) => {
                let _ = sent.set(flight_sent);
                (rx, leader, waiting)
            }
            Joined::Fresh(entry, age, ttl_left) => return Ok(hit(entry, age, ttl_left)),
        };
        let result = match rx.wait_for(Option::is_some).await {
            Ok(r) => r.clone().unwrap_or_else(|| Err(lost())),
            Err(_) => Err(lost()),
        };
        let fwd = if mode == Mode::Refresh {
            Fwd::Request
        } else if stale.is_some() {
            Fwd::Stale
        } else {
            Fwd::Miss
        };
        match result {
            // Another replica held the fleet's lease and fetched: its entry, as a shared hit.
            Ok((fetched, _)) if fetched.from_shared => {
                let age = fetched.received.age(clock::now());
                let ttl_left = settings.windows.ttl.saturating_sub(age);
                Ok(Answer {
                    detail: Detail::SharedHit {
                        ttl: ttl_left.as_secs(),
                    },
                    coalesced: !leader,
                    ..hit(fetched, age, ttl_left)
                })
            }
            // The upstream said 304: the stale entry, renewed, counts as fresh from now.
            Ok((renewed, kept)) if kept.revalidated => {
                let age = renewed.received.age(clock::now());
                Ok(Answer {
                    response: renewed,
                    status: CacheStatus::Revalidated,
                    detail: Detail::Revalidated { collapsed: !leader },
                    age: Some(age.as_secs()),
                    went_upstream: leader,
                    coalesced: !leader,
                })
            }
            Ok((fetched, kept)) if !is_failure(fetched.status) => {
                let stored = kept.stored;
                let fwd_status = (leader && !stored).then(|| fetched.status.as_u16());
                let detail = Detail::Forward {
                    fwd,
                    fwd_status,
                    stored: leader && stored,
                    collapsed: !leader,
                };
                Ok(forwarded(fetched, detail, leader))
            }
            Ok((fetched, _)) => match stale {
                Some((entry, age, past)) => Ok(stale_answer(
                    entry,
                    age,
                    past,
                    Some(fetched.status.as_u16()),
                    leader,
                )),
                None => {
                    let detail = Detail::Forward {
                        fwd,
                        fwd_status: Some(fetched.status.as_u16()),
                        stored: false,
                        collapsed: !leader,
                    };
                    Ok(forwarded(fetched, detail, leader))
                }
            },
            Err(failed) => match stale {
                Some((entry, age, past)) => {
                    let fwd_status = match &failed.fault {
                        Fault::Upstream(e) => e.fwd_status(),
                        Fault::Internal(_) => None,
                    };
                    Ok(stale_answer(entry, age, past, fwd_status, leader))
                }
                None => Err(failed),
            },
        }
    }

    /// Joins the fetch in flight for `key`, or starts one (then this caller leads).
    async fn join_or_start<F, Fut>(
        &self,
        settings: &Settings,
        key: &Export,
        fetch: F,
        recheck: bool,
        background: bool,
        stale: Option<Arc<Fetched>>,
    ) -> Joined
    where
        F: FnOnce(Wanted, Option<Validators>) -> Fut,
        Fut: Future<Output = Result<Fetched, Failed>> + Send + 'static,
    {
        self.flights
            .join_or_start(
                key,
                fetch,
                recheck.then_some(&settings.windows),
                background,
                stale,
                Levels {
                    store: &self.store,
                    purges: &self.purges,
                    shared: settings
                        .shared
                        .as_ref()
                        .map(|redis| (redis.clone(), settings.windows.keep(), settings.lease)),
                },
            )
            .await
    }

    /// Weighs the stored entry for `key` again after an encoding was added to `entry` (when it
    /// is still the one stored), so that `max_bytes` counts it.
    pub async fn reweigh(&self, key: &Export, entry: &Arc<Fetched>) {
        if let Some(store) = self.store.load_full() {
            store.reweigh(key, entry).await;
        }
    }

    /// Drops every format of one conversation; returns how many entries there were.
    pub async fn purge(&self, agent: &str, convo: &str) -> usize {
        let Some(store) = self.store.load_full() else {
            return 0;
        };
        self.purges.bump(agent, convo);
        store.purge(agent, convo).await
    }

    /// Whether a store exists (the cache is enabled).
    pub fn enabled(&self) -> bool {
        self.store.load().is_some()
    }

    /// moka's pending housekeeping (evictions, expirations): run on a timer, so that evicted
    /// bodies are freed soon after they are replaced, not at the next `/metrics` scrape.
    pub async fn maintain(&self) {
        if let Some(store) = self.store.load_full() {
            store.maintain().await;
        }
    }

    /// Entries and weighted bytes, after moka's pending housekeeping.
    pub async fn usage(&self) -> (u64, u64) {
        match self.store.load_full() {
            Some(store) => store.usage().await,
            None => (0, 0),
        }
    }
}

/// 5xx and 429 are failures that stale-if-error may cover.
fn is_failure(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

/// The flight ended without a word: the gateway's fault, not the upstream's.
fn lost() -> Failed {
    Failed {
        region: None,
        fault: Fault::Internal("the fetch task ended without an answer"),
    }
}

fn hit(entry: Arc<Fetched>, age: std::time::Duration, ttl_left: std::time::Duration) -> Answer {
    Answer {
        response: entry,
        status: CacheStatus::Hit,
        detail: Detail::Hit {
            ttl: ttl_left.as_secs(),
        },
        age: Some(age.as_secs()),
        went_upstream: false,
        coalesced: false,
    }
}

fn forwarded(response: Arc<Fetched>, detail: Detail, went_upstream: bool) -> Answer {
    Answer {
        response,
        status: CacheStatus::Miss,
        detail,
        age: None,
        went_upstream,
        coalesced: !went_upstream,
    }
}

fn stale_answer(
    entry: Arc<Fetched>,
    age: std::time::Duration,
    past: std::time::Duration,
    fwd_status: Option<u16>,
    went_upstream: bool,
) -> Answer {
    Answer {
        response: entry,
        status: CacheStatus::Stale,
        detail: Detail::StaleIfError {
            fwd_status,
            past: past.as_secs(),
        },
        age: Some(age.as_secs()),
        went_upstream,
        coalesced: !went_upstream,
    }
}

#[cfg(test)]
mod tests;
