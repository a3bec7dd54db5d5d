//! `jwks_url` keys: fetched with the upstream's TLS configuration (so `upstream.ca_file` is trusted
//! too), refreshed in the background, refetched early for an unknown `kid` (at most once per
//! [`UNKNOWN_KID_INTERVAL`], concurrent triggers sharing one fetch), and kept through fetch
//! failures for `max_stale`, after which they stop verifying and the gateway is not ready.
//!
//! What the anchors got wrong and this avoids: answering 401 to everyone after one failed fetch
//! (the last good set is kept), evicting keys during an IdP outage (kept for `max_stale`),
//! never refetching for a new `kid` (refetched), and refetching for every unknown `kid`
//! (rate-limited, so a flood of made-up kids costs the IdP one request per interval).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::header::ACCEPT;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use jsonwebtoken::Algorithm;
use tokio::time::Instant;

use super::keys::{parse_jwks, Key};
use crate::metrics::JwksMetrics;
use crate::upstream::pool::Origin;
use crate::upstream::Wanted;
use crate::watch::Watched;

/// An unknown `kid` triggers at most one early refetch per URL in this long.
pub const UNKNOWN_KID_INTERVAL: Duration = Duration::from_secs(30);
/// One JWKS fetch, body included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// After a failed fetch, retry after 1 s, 2 s, 4 s ... up to this (or `refresh` if sooner).
const MAX_RETRY: Duration = Duration::from_secs(60);
/// Repeated fetch failures are logged at most once in this long.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The `jwks_url` fetchers, by URL and pinned algorithm: a reload that keeps a URL keeps its
/// fetcher, its keys and its readiness (a new fetcher would not be ready until its first
/// fetch); `refresh`, `max_stale` and the pool follow the new configuration. Held weakly, so
/// a fetcher no configuration names stops with the last policy that did.
pub struct Fetchers {
    metrics: JwksMetrics,
    map: Mutex<HashMap<FetcherKey, Weak<RemoteJwks>>>,
}

/// A fetcher's identity: its URL. Entries that pin its keys to different algorithms (RSA keys
/// without `alg` serve RS256 and PS256) share it, so the IdP sees one fetch per URL.
type FetcherKey = String;

impl Fetchers {
    pub fn new(metrics: JwksMetrics) -> Fetchers {
        Fetchers {
            metrics,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The running fetcher for `url`, reconfigured, or a new one (its first fetch starts now),
    /// with the document's keys pinned to `pinned`.
    pub fn get_or_start(
        &self,
        url: Uri,
        pinned: Option<Algorithm>,
        origin: Arc<Origin>,
        refresh: Duration,
        max_stale: Duration,
    ) -> (Arc<RemoteJwks>, Arc<Watched<Vec<Key>>>) {
        let key = url.to_string();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(jwks) = map.get(&key).and_then(Weak::upgrade) {
            *jwks.settings() = Settings {
                origin,
                refresh,
                max_stale,
            };
            let keys = jwks.keys_for(pinned);
            return (jwks, keys);
        }
        let jwks = RemoteJwks::new(url, origin, refresh, max_stale, self.metrics.clone());
        // The view exists before the first fetch, which fills it.
        let keys = jwks.keys_for(pinned);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(follow(Arc::downgrade(&jwks)));
        }
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(key, Arc::downgrade(&jwks));
        (jwks, keys)
    }
}

/// What a reload may change of a running fetcher.
struct Settings {
    origin: Arc<Origin>,
    refresh: Duration,
    max_stale: Duration,
}

type Keys = Arc<Watched<Vec<Key>>>;

/// The keys of one document as one `[[auth.keys]]` entry sees them: pinned to its algorithm.
struct View {
    pinned: Option<Algorithm>,
    /// The last good key set (empty until the first fetch succeeds).
    keys: Weak<Watched<Vec<Key>>>,
}

pub struct RemoteJwks {
    url: Uri,
    views: Mutex<Vec<View>>,
    settings: Mutex<Settings>,
    metrics: JwksMetrics,
    state: Mutex<State>,
    /// Held while fetching: concurrent triggers wait for the fetch under way.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    last_success: Option<Instant>,
    /// The first failed fetch since the last success: `max_stale` counts from here, so keys
    /// are never dropped while the IdP answers, whatever `refresh` is.
    failing_since: Option<Instant>,
    /// The last document that loaded: an unchanged one does not replace the keys (which would
    /// drop every cached verification made with them).
    last_document: Option<Bytes>,
    last_unknown_kid_fetch: Option<Instant>,
    last_failure_log: Option<Instant>,
    failures_unlogged: u64,
    /// Whether the keys were logged as past `max_stale` (and not yet as usable again).
    expired: bool,
}

impl RemoteJwks {
    fn new(
        url: Uri,
        origin: Arc<Origin>,
        refresh: Duration,
        max_stale: Duration,
        metrics: JwksMetrics,
    ) -> Arc<RemoteJwks> {
        Arc::new(RemoteJwks {
            url,
            views: Mutex::new(Vec::new()),
            settings: Mutex::new(Settings {
                origin,
                refresh,
                max_stale,
            }),
            metrics,
            state: Mutex::new(State::default()),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    pub fn url(&self) -> &Uri {
        &self.url
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The document's keys pinned to `pinned`: kept up to date by every fetch, and made at
    /// once from the last good document when this fetcher has one.
    pub fn keys_for(&self, pinned: Option<Algorithm>) -> Arc<Watched<Vec<Key>>> {
        let mut views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        views.retain(|v| v.keys.strong_count() > 0);
        if let Some(keys) = views
            .iter()
            .find(|v| v.pinned == pinned)
            .and_then(|v| v.keys.upgrade())
        {
            return keys;
        }
        let document = self.state().last_document.clone();
        let initial = document
            .and_then(|doc| parse_jwks(&doc, pinned, &self.url.to_string()).ok())
            .unwrap_or_default();
        let keys = Watched::fixed(initial);
        views.push(View {
            pinned,
            keys: Arc::downgrade(&keys),
        });
        keys
    }

    fn settings(&self) -> std::sync::MutexGuard<'_, Settings> {
        self.settings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the keys may verify: fetched once, and not failing for longer than `max_stale`.
    pub fn usable(&self) -> bool {
        let max_stale = self.settings().max_stale;
        let state = self.state();
        state.last_success.is_some() && state.failing_since.is_none_or(|t| t.elapsed() <= max_stale)
    }

    /// A token named a `kid` no key has: refetch now unless one was made for that reason in the
    /// last [`UNKNOWN_KID_INTERVAL`]. Returns whether a fetch completed meanwhile (so the
    /// caller should look again). Concurrent callers share one fetch.
    pub async fn refetch_for_unknown_kid(&self) -> bool {
        let guard = match self.fetching.try_lock() {
            Ok(g) => g,
            Err(_) => {
                // A fetch is under way: wait for it (bounded by FETCH_TIMEOUT) and look again.
                let _done = self.fetching.lock().await;
                return true;
            }
        };
        {
            let mut state = self.state();
            if state
                .last_unknown_kid_fetch
                .is_some_and(|t| t.elapsed() < UNKNOWN_KID_INTERVAL)
            {
                return false;
            }
            state.last_unknown_kid_fetch = Some(Instant::now());
        }
        self.fetch_once().await;
        drop(guard);
        true
    }

    /// One fetch; on success the key set is replaced, on failure the last good one stays.
    async fn fetch_once(&self) -> bool {
        let body = self.download().await;
        if let Ok(body) = &body {
            let mut state = self.state();
            if state.last_document.as_ref() == Some(body) {
                state.last_success = Some(Instant::now());
                state.failing_since = None;
                drop(state);
                self.succeeded();
                return true;
            }
        }
        let result = body.and_then(|body| self.store_views(&body).map(|()| body));
        match result {
            Ok(body) => {
                {
                    let mut state = self.state();
                    state.last_success = Some(Instant::now());
                    state.failing_since = None;
                    state.failures_unlogged = 0;
                    state.last_document = Some(body);
                }
                self.succeeded();
                true
            }
            Err(error) => {
                self.metrics.fetches.with_label_values(&["error"]).inc();
                let max_stale = self.settings().max_stale;
                let mut state = self.state();
                let since = *state.failing_since.get_or_insert_with(Instant::now);
                if state.last_success.is_some() && !state.expired && since.elapsed() > max_stale {
                    state.expired = true;
                    tracing::error!(
                        url = %self.url,
                        %error,
                        failing_for = since.elapsed().as_secs(),
                        "JWKS keys are past max_stale: tokens they verify get 503 and the gateway is not ready until a fetch succeeds"
                    );
                }
                let due = state
                    .last_failure_log
                    .is_none_or(|t| t.elapsed() >= FAILURE_LOG_INTERVAL);
                if due {
                    let suppressed = state.failures_unlogged;
                    state.last_failure_log = Some(Instant::now());
                    state.failures_unlogged = 0;
                    let failing_for = state.failing_since.map(|t| t.elapsed().as_secs());
                    drop(state);
                    tracing::warn!(url = %self.url, %error, suppressed, ?failing_for, "JWKS fetch failed; keeping the last good key set");
                } else {
                    state.failures_unlogged += 1;
                }
                false
            }
        }
    }

    /// Parses `document` for every view; any view it does not load for keeps its keys and
    /// fails the fetch (nothing is half-replaced: all views are parsed before any is stored).
    fn store_views(&self, document: &Bytes) -> Result<(), String> {
        let views: Vec<(Option<Algorithm>, Keys)> = {
            let mut views = self.views.lock().unwrap_or_else(|p| p.into_inner());
            views.retain(|v| v.keys.strong_count() > 0);
            views
                .iter()
                .filter_map(|v| v.keys.upgrade().map(|k| (v.pinned, k)))
                .collect()
        };
        let url = self.url.to_string();
        let mut parsed = Vec::with_capacity(views.len());
        for (pinned, keys) in &views {
            parsed.push((parse_jwks(document, *pinned, &url)?, keys));
        }
        let first = self.state().last_success.is_none();
        for (new_keys, keys) in parsed {
            let old: BTreeSet<String> = kids(&keys.load());
            let new: BTreeSet<String> = kids(&new_keys);
            if first || old != new {
                let added: Vec<&String> = new.difference(&old).collect();
                let removed: Vec<&String> = old.difference(&new).collect();
                tracing::info!(url = %self.url, keys = new_keys.len(), ?added, ?removed, "JWKS key set changed");
            }
            keys.store(new_keys);
        }
        Ok(())
    }

    fn succeeded(&self) {
        let was_expired = std::mem::take(&mut self.state().expired);
        if was_expired {
            tracing::info!(url = %self.url, "JWKS fetched again: its keys verify tokens again");
        }
        self.metrics.fetches.with_label_values(&["ok"]).inc();
        self.metrics.last_success.set(crate::metrics::unix_now());
    }

    async fn download(&self) -> Result<Bytes, String> {
        let path = self.url.path_and_query().map_or("/", |p| p.as_str());
        let request = Request::get(path)
            .header(ACCEPT, "application/json, application/jwk-set+json")
            .header(
                http::header::USER_AGENT,
                concat!("convocore-gateway/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let origin = self.settings().origin.clone();
        let exchange = async move {
            let (response, conn) = origin.send(request, &Wanted::always()).await.map_err(|e| {
                let mut s = e.to_string();
                if let Some(source) = std::error::Error::source(&e) {
                    s.push_str(": ");
                    s.push_str(&source.to_string());
                }
                s
            })?;
            if response.status() != StatusCode::OK {
                return Err(format!("HTTP {}", response.status()));
            }
            let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?;
            origin.release(conn);
            Ok(body.to_bytes())
        };
        tokio::time::timeout(FETCH_TIMEOUT, exchange)
            .await
            .map_err(|_| "timed out".to_string())?
    }
}

fn kids(keys: &[Key]) -> BTreeSet<String> {
    keys.iter()
        .map(|k| k.kid().unwrap_or("(no kid)").to_string())
        .collect()
}

/// The background loop: fetch now, then every `refresh`; after a failure retry sooner, backing
/// off. Ends when the gateway drops the source.
async fn follow(jwks: Weak<RemoteJwks>) {
    let mut delay = Duration::ZERO;
    let mut failures: u32 = 0;
    loop {
        tokio::time::sleep(delay).await;
        let Some(jwks) = jwks.upgrade() else { return };
        let ok = {
            let _fetching = jwks.fetching.lock().await;
            jwks.fetch_once().await
        };
        let refresh = jwks.settings().refresh;
        delay = if ok {
            failures = 0;
            refresh
        } else {
            failures = failures.saturating_add(1);
            let backoff = Duration::from_secs(1u64 << failures.min(6).saturating_sub(1));
            backoff.min(MAX_RETRY).min(refresh)
        };
    }
}
