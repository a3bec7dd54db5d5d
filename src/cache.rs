//! The export cache: a byte-bounded moka store keyed by (agent, convo, format), single-flight
//! fetches, `no-cache` / `no-store`, stale-if-error and stale-while-revalidate.
//!
//! Freshness is decided here from `stored_at` on tokio's clock (which tests can pause), not by
//! moka's own expiry; moka only drops entries once they are too old to serve even stale.
//! moka's `try_get_with` coalesces loads of absent keys only, and refreshing a present-but-
//! expired entry must coalesce too, so in-flight fetches live in their own map.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, CACHE_CONTROL};
use http::{HeaderMap, StatusCode};
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;

use crate::config;
use crate::route::{Export, Format};
use crate::upstream::{Fetched, UpstreamError};

/// Per-entry memory beyond the body: the entry, key strings, headers and moka's bookkeeping,
/// rounded up, so that `max_bytes` bounds real memory rather than body bytes alone.
const ENTRY_OVERHEAD: usize = 512;

/// `X-Cache`, and the `cache` label of the request metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    Stale,
    Bypass,
}

impl CacheStatus {
    pub fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Stale => "STALE",
            CacheStatus::Bypass => "BYPASS",
        })
    }

    pub fn label(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Stale => "stale",
            CacheStatus::Bypass => "bypass",
        }
    }
}

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
        for value in headers.get_all(CACHE_CONTROL) {
            let Ok(value) = value.to_str() else { continue };
            for directive in value.split(',') {
                let directive = directive.trim();
                if directive.eq_ignore_ascii_case("no-store") {
                    return Mode::Bypass;
                }
                if directive.eq_ignore_ascii_case("no-cache")
                    || directive.eq_ignore_ascii_case("max-age=0")
                {
                    mode = Mode::Refresh;
                }
            }
        }
        mode
    }
}

/// An upstream failure, with the region it happened in.
#[derive(Debug, Clone)]
pub struct Failed {
    pub region: usize,
    pub error: UpstreamError,
}

/// What the cache answers with: the response to send and how it was obtained.
pub struct Answer {
    pub response: Arc<Fetched>,
    pub status: CacheStatus,
    /// The RFC 9211 `Cache-Status` value.
    pub cache_status: HeaderValue,
    /// `Age` in seconds, on HIT and STALE.
    pub age: Option<u64>,
    /// Whether this request itself went upstream (false for hits and for coalesced waiters).
    pub went_upstream: bool,
    /// Whether this request waited for another request's fetch.
    pub coalesced: bool,
}

/// The store. foldhash (randomly seeded per process) instead of SipHash: keys are hashed on
/// every lookup, and a seeded hash keeps chosen ids from colliding on purpose.
type Store = moka::future::Cache<Export, Arc<Fetched>, foldhash::fast::RandomState>;

/// A flight's outcome: the response and whether it was stored.
type FlightResult = Result<(Arc<Fetched>, bool), Failed>;

enum Joined {
    /// Wait on this flight; `true` when this caller started it.
    Flight(watch::Receiver<Option<FlightResult>>, bool),
    /// A fresh entry appeared meanwhile.
    Fresh(Arc<Fetched>, Duration),
}

pub struct Cache {
    store: Option<Store>,
    /// Fetches in flight. An async mutex: a caller that finds no flight re-reads the store
    /// while holding it, so a flight that completes in between is never started twice.
    flights: Arc<Mutex<HashMap<Export, watch::Receiver<Option<FlightResult>>>>>,
    /// Bumped by every purge; a fetch that overlaps a purge does not keep what it stored.
    purges: Arc<AtomicU64>,
    ttl: Duration,
    stale_if_error: Duration,
    stale_while_revalidate: Duration,
    max_entry_bytes: usize,
    /// `Cache-Status` of a hit by whole seconds of freshness left, and `Age` values, made once
    /// so that a hit formats nothing (up to [`PRECOMPUTED_SECONDS`]).
    hit_status: Vec<HeaderValue>,
    ages: Vec<HeaderValue>,
}

/// How many seconds of `Age` and hit `Cache-Status` values are made ahead.
const PRECOMPUTED_SECONDS: u64 = 3600;

impl Cache {
    pub fn new(c: &config::Cache) -> Cache {
        let keep = c.ttl + c.stale_if_error.max(c.stale_while_revalidate);
        let store = c.enabled.then(|| {
            moka::future::Cache::builder()
                // LRU, as nginx's proxy_cache: a fresh export is always kept (TinyLFU, moka's
                // default, turns away new keys while the cache is full of older ones).
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .max_capacity(c.max_bytes)
                .weigher(|key: &Export, entry: &Arc<Fetched>| {
                    u32::try_from(weight(key, entry)).unwrap_or(u32::MAX)
                })
                .time_to_live(keep)
                .build_with_hasher(foldhash::fast::RandomState::default())
        });
        Cache {
            store,
            flights: Arc::new(Mutex::new(HashMap::new())),
            purges: Arc::new(AtomicU64::new(0)),
            ttl: c.ttl,
            stale_if_error: c.stale_if_error,
            stale_while_revalidate: c.stale_while_revalidate,
            max_entry_bytes: usize::try_from(c.max_bytes / 8).unwrap_or(usize::MAX),
            hit_status: (0..=c.ttl.as_secs().min(PRECOMPUTED_SECONDS))
                .map(|ttl| header(format!("convocore-gateway; hit; ttl={ttl}")))
                .collect(),
            ages: (0..=c.ttl.as_secs().min(PRECOMPUTED_SECONDS))
                .map(HeaderValue::from)
                .collect(),
        }
    }

    /// Answers `key` from the cache or through `fetch`, as `mode` and the entry's age allow.
    /// `fetch` runs in its own task, so a caller that goes away does not cancel it for others.
    pub async fn get<F, Fut>(&self, key: &Export, mode: Mode, fetch: F) -> Result<Answer, Failed>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched, Failed>> + Send + 'static,
    {
        let mut entry = None;
        if let (Some(store), Mode::Normal) = (&self.store, mode) {
            if let Some(found) = store.get(key).await {
                let age = Instant::now().saturating_duration_since(found.received);
                if age < self.ttl {
                    return Ok(self.hit(found, age));
                }
                entry = Some(found);
            }
        }
        // Boxed: everything but a fresh hit, so a hit's future stays small (the fetch and the
        // flight bookkeeping are kilobytes).
        Box::pin(self.get_slow(key, mode, fetch, entry)).await
    }

    /// [`Cache::get`] past a fresh hit: stale, missing, refreshed or bypassed. `entry` is what
    /// the store held for `key` (looked up in `Normal` mode only).
    async fn get_slow<F, Fut>(
        &self,
        key: &Export,
        mode: Mode,
        fetch: F,
        entry: Option<Arc<Fetched>>,
    ) -> Result<Answer, Failed>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched, Failed>> + Send + 'static,
    {
        if self.store.is_none() {
            let fetched = fetch().await?;
            return Ok(miss(Arc::new(fetched), "convocore-gateway; fwd=miss", true));
        }
        if mode == Mode::Bypass {
            let fetched = fetch().await?;
            return Ok(Answer {
                response: Arc::new(fetched),
                status: CacheStatus::Bypass,
                cache_status: HeaderValue::from_static("convocore-gateway; fwd=bypass"),
                age: None,
                went_upstream: true,
                coalesced: false,
            });
        }

        let mut stale = None;
        if mode == Mode::Normal {
            if let Some(entry) = entry {
                let age = Instant::now().saturating_duration_since(entry.received);
                let past = age - self.ttl;
                if past < self.stale_while_revalidate {
                    // Serve at once; one background refresh per key replaces the entry.
                    let _ = self.join_or_start(key, fetch, true).await;
                    return Ok(Answer {
                        cache_status: header(format!(
                            "convocore-gateway; hit; ttl=-{}; detail=stale-while-revalidate",
                            past.as_secs()
                        )),
                        response: entry,
                        status: CacheStatus::Stale,
                        age: Some(age.as_secs()),
                        went_upstream: false,
                        coalesced: false,
                    });
                }
                if past < self.stale_if_error {
                    stale = Some((entry, age));
                }
            }
        }

        let (mut rx, leader) = match self.join_or_start(key, fetch, mode == Mode::Normal).await {
            Joined::Flight(rx, leader) => (rx, leader),
            Joined::Fresh(entry, age) => return Ok(self.hit(entry, age)),
        };
        let result = match rx.wait_for(Option::is_some).await {
            Ok(r) => r.clone().unwrap_or_else(|| Err(lost())),
            Err(_) => Err(lost()),
        };
        let fwd = if mode == Mode::Refresh {
            "request"
        } else if stale.is_some() {
            "stale"
        } else {
            "miss"
        };
        match result {
            Ok((fetched, stored)) if !is_failure(fetched.status) => {
                let status = if !leader {
                    format!("convocore-gateway; fwd={fwd}; collapsed")
                } else if stored {
                    format!("convocore-gateway; fwd={fwd}; stored")
                } else {
                    format!(
                        "convocore-gateway; fwd={fwd}; fwd-status={}",
                        fetched.status.as_u16()
                    )
                };
                Ok(miss(fetched, &status, leader))
            }
            Ok((fetched, _)) => match stale {
                Some((entry, age)) => Ok(stale_answer(
                    entry,
                    age,
                    self.ttl,
                    Some(fetched.status),
                    leader,
                )),
                None => {
                    let status = format!(
                        "convocore-gateway; fwd={fwd}; fwd-status={}{}",
                        fetched.status.as_u16(),
                        if leader { "" } else { "; collapsed" }
                    );
                    Ok(miss(fetched, &status, leader))
                }
            },
            Err(failed) => match stale {
                Some((entry, age)) => Ok(stale_answer(entry, age, self.ttl, None, leader)),
                None => Err(failed),
            },
        }
    }

    /// The `Age` header for `secs`.
    pub fn age_header(&self, secs: u64) -> HeaderValue {
        usize::try_from(secs)
            .ok()
            .and_then(|i| self.ages.get(i))
            .cloned()
            .unwrap_or_else(|| HeaderValue::from(secs))
    }

    fn hit(&self, entry: Arc<Fetched>, age: Duration) -> Answer {
        let ttl = self.ttl.saturating_sub(age).as_secs();
        let cache_status = usize::try_from(ttl)
            .ok()
            .and_then(|i| self.hit_status.get(i))
            .cloned()
            .unwrap_or_else(|| header(format!("convocore-gateway; hit; ttl={ttl}")));
        Answer {
            cache_status,
            response: entry,
            status: CacheStatus::Hit,
            age: Some(age.as_secs()),
            went_upstream: false,
            coalesced: false,
        }
    }

    /// Joins the fetch in flight for `key`, or starts one (then this caller leads). With
    /// `recheck`, a fresh entry stored since the caller looked is returned instead.
    async fn join_or_start<F, Fut>(&self, key: &Export, fetch: F, recheck: bool) -> Joined
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched, Failed>> + Send + 'static,
    {
        let mut flights = self.flights.lock().await;
        if let Some(rx) = flights.get(key) {
            // A flight whose task ended without answering (it cannot, short of a panic) must
            // not answer for the key forever: start a new one instead.
            let abandoned = rx.has_changed().is_err() && rx.borrow().is_none();
            if !abandoned {
                return Joined::Flight(rx.clone(), false);
            }
        }
        if let (true, Some(store)) = (recheck, &self.store) {
            // A flight removes itself only after storing, so under this lock the store is
            // current: what a just-finished flight stored is seen here.
            if let Some(entry) = store.get(key).await {
                let age = Instant::now().saturating_duration_since(entry.received);
                if age < self.ttl {
                    return Joined::Fresh(entry, age);
                }
            }
        }
        let (tx, rx) = watch::channel(None);
        flights.insert(key.clone(), rx.clone());
        drop(flights);

        let future = fetch();
        let store = self.store.clone();
        let flights = self.flights.clone();
        let purges = self.purges.clone();
        let epoch = purges.load(Ordering::SeqCst);
        let key = key.clone();
        let max_entry_bytes = self.max_entry_bytes;
        // `fetch` instruments its future with the leading request's span.
        let task = async move {
            let result = future.await;
            let result = match result {
                Ok(fetched) => {
                    let fetched = Arc::new(fetched);
                    let mut stored = false;
                    if let Some(store) = &store {
                        if fetched.status == StatusCode::OK
                            && fetched.storable
                            && fetched.body.len() <= max_entry_bytes
                        {
                            store.insert(key.clone(), fetched.clone()).await;
                            stored = true;
                            // A purge since this fetch began must win over what it fetched.
                            if purges.load(Ordering::SeqCst) != epoch {
                                store.invalidate(&key).await;
                                stored = false;
                            }
                        }
                    }
                    Ok((fetched, stored))
                }
                Err(failed) => Err(failed),
            };
            flights.lock().await.remove(&key);
            let _ = tx.send(Some(result));
        };
        tokio::spawn(task);
        Joined::Flight(rx, true)
    }

    /// Drops every format of one conversation; returns how many entries there were.
    pub async fn purge(&self, agent: &str, convo: &str) -> usize {
        let Some(store) = &self.store else { return 0 };
        self.purges.fetch_add(1, Ordering::SeqCst);
        let mut purged = 0;
        for format in [Format::Json, Format::Csv] {
            let key = Export {
                agent: agent.to_string(),
                convo: convo.to_string(),
                format,
            };
            if store.remove(&key).await.is_some() {
                purged += 1;
            }
        }
        purged
    }

    pub fn enabled(&self) -> bool {
        self.store.is_some()
    }

    /// Entries and weighted bytes, after moka's pending housekeeping.
    pub async fn usage(&self) -> (u64, u64) {
        match &self.store {
            Some(store) => {
                store.run_pending_tasks().await;
                (store.entry_count(), store.weighted_size())
            }
            None => (0, 0),
        }
    }

    /// Entries and weighted bytes as moka last counted them (cheap; for gauges).
    pub fn usage_now(&self) -> (u64, u64) {
        match &self.store {
            Some(store) => (store.entry_count(), store.weighted_size()),
            None => (0, 0),
        }
    }
}

/// What one entry costs: its body plus the bounded overhead of everything around it.
fn weight(key: &Export, entry: &Fetched) -> usize {
    let headers: usize = entry
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum();
    entry.body.len() + key.agent.len() + key.convo.len() + headers + ENTRY_OVERHEAD
}

/// 5xx and 429 are failures that stale-if-error may cover.
fn is_failure(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

fn lost() -> Failed {
    Failed {
        region: 0,
        error: UpstreamError::Protocol(Arc::new(std::io::Error::other(
            "the fetch task ended without an answer",
        ))),
    }
}

fn header(s: String) -> HeaderValue {
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("convocore-gateway"))
}

fn miss(response: Arc<Fetched>, cache_status: &str, went_upstream: bool) -> Answer {
    Answer {
        response,
        status: CacheStatus::Miss,
        cache_status: header(cache_status.to_string()),
        age: None,
        went_upstream,
        coalesced: !went_upstream,
    }
}

fn stale_answer(
    entry: Arc<Fetched>,
    age: Duration,
    ttl: Duration,
    upstream_status: Option<StatusCode>,
    went_upstream: bool,
) -> Answer {
    let past = age.saturating_sub(ttl).as_secs();
    let fwd_status = upstream_status
        .map(|s| format!("; fwd-status={}", s.as_u16()))
        .unwrap_or_default();
    Answer {
        cache_status: header(format!(
            "convocore-gateway; fwd=stale{fwd_status}; ttl=-{past}; detail=stale-if-error"
        )),
        response: entry,
        status: CacheStatus::Stale,
        age: Some(age.as_secs()),
        went_upstream,
        coalesced: !went_upstream,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn modes() {
        assert_eq!(Mode::from_headers(&HeaderMap::new()), Mode::Normal);
        assert_eq!(Mode::from_headers(&cc("no-cache")), Mode::Refresh);
        assert_eq!(Mode::from_headers(&cc("No-Store")), Mode::Bypass);
        assert_eq!(Mode::from_headers(&cc("no-cache, no-store")), Mode::Bypass);
        assert_eq!(Mode::from_headers(&cc("max-age=0")), Mode::Refresh);
        assert_eq!(Mode::from_headers(&cc("max-age=60")), Mode::Normal);
    }

    fn fetched(body: &'static str) -> Fetched {
        Fetched {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: bytes::Bytes::from_static(body.as_bytes()),
            storable: true,
            elapsed: Duration::ZERO,
            received: Instant::now(),
            region: 0,
        }
    }

    #[tokio::test]
    async fn a_fetch_that_dies_does_not_answer_for_its_key_forever() {
        let cache = Cache::new(&config::Cache::default());
        let key = Export {
            agent: "a".into(),
            convo: "c".into(),
            format: Format::Json,
        };
        let dead = cache
            .get(&key, Mode::Normal, || async {
                if key_is_cursed() {
                    panic!("the fetch task dies");
                }
                Ok(fetched("never"))
            })
            .await;
        assert!(dead.is_err());
        let answer = cache
            .get(&key, Mode::Normal, || async { Ok(fetched("ok")) })
            .await
            .ok()
            .unwrap();
        assert_eq!(answer.response.body, "ok");
        assert_eq!(answer.status, CacheStatus::Miss);
        let answer = cache
            .get(&key, Mode::Normal, || async { Ok(fetched("again")) })
            .await
            .ok()
            .unwrap();
        assert_eq!(answer.status, CacheStatus::Hit);
        assert_eq!(answer.response.body, "ok");
    }

    fn key_is_cursed() -> bool {
        true
    }

    #[test]
    fn failures() {
        assert!(is_failure(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(is_failure(StatusCode::TOO_MANY_REQUESTS));
        assert!(!is_failure(StatusCode::NOT_FOUND));
        assert!(!is_failure(StatusCode::OK));
    }
}
