//! The cache's decisions, on paused tokio time where time matters: modes, freshness windows,
//! stale-if-error, stale-while-revalidate, resizing on reload, and purges in flight.
use super::*;
use std::sync::OnceLock;
use std::time::Duration;

use crate::upstream::UpstreamError;
use http::HeaderValue;

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
    // A non-ASCII byte elsewhere in the value does not hide a directive.
    let mut h = HeaderMap::new();
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_bytes(b"no-store, x=\"\xe9\"").unwrap(),
    );
    assert_eq!(Mode::from_headers(&h), Mode::Bypass);
}

#[test]
fn failures() {
    assert!(is_failure(StatusCode::INTERNAL_SERVER_ERROR));
    assert!(is_failure(StatusCode::TOO_MANY_REQUESTS));
    assert!(!is_failure(StatusCode::NOT_FOUND));
    assert!(!is_failure(StatusCode::OK));
}

fn fetched_in(region: &'static str, status: StatusCode, body: &'static str) -> Fetched {
    Fetched {
        status,
        headers: crate::upstream::Passed::default(),
        body: bytes::Bytes::from_static(body.as_bytes()),
        storable: true,
        elapsed: Duration::ZERO,
        received: clock::now(),
        region: HeaderValue::from_static(region),
        retry_after: None,
        from_shared: false,
        encoded: Default::default(),
    }
}

fn fetched(body: &'static str) -> Fetched {
    fetched_in("eu", StatusCode::OK, body)
}

fn key(convo: &str) -> Export {
    Export {
        agent: "a".into(),
        convo: convo.into(),
        format: crate::domain::Format::Json,
    }
}

fn settings(ttl: u64, sie: u64, swr: u64) -> Settings {
    Settings {
        enabled: true,
        max_bytes: 1 << 20,
        windows: Windows {
            ttl: Duration::from_secs(ttl),
            stale_if_error: Duration::from_secs(sie),
            stale_while_revalidate: Duration::from_secs(swr),
        },
        shared: None,
        lease: crate::shared::lease::Lease {
            hold: Duration::from_secs(40),
            wait: Duration::from_secs(30),
        },
        compress: Vec::new(),
    }
}

fn unreachable() -> Failed {
    Failed {
        region: Some(HeaderValue::from_static("eu")),
        fault: Fault::Upstream(UpstreamError::Timeout),
    }
}

async fn get(cache: &Cache, s: &Settings, k: &Export, body: &'static str) -> Answer {
    cache
        .get(
            s,
            k,
            Mode::Normal,
            |_, _| async move { Ok(fetched(body)) },
            &OnceLock::new(),
        )
        .await
        .ok()
        .unwrap()
}

#[tokio::test]
async fn a_fetch_that_dies_does_not_answer_for_its_key_forever() {
    let s = Settings::from_config(&config::Cache::default());
    let cache = Cache::new(&s);
    let key = key("c");
    let dead = cache
        .get(
            &s,
            &key,
            Mode::Normal,
            |_, _| async {
                if key_is_cursed() {
                    panic!("the fetch task dies");
                }
                Ok(fetched("never"))
            },
            &OnceLock::new(),
        )
        .await;
    // The gateway's own fault, not the upstream's.
    assert!(matches!(
        dead,
        Err(Failed {
            fault: Fault::Internal(_),
            ..
        })
    ));
    let answer = get(&cache, &s, &key, "ok").await;
    assert_eq!(answer.response.body, "ok");
    assert_eq!(answer.status, CacheStatus::Miss);
    let answer = get(&cache, &s, &key, "again").await;
    assert_eq!(answer.status, CacheStatus::Hit);
    assert_eq!(answer.response.body, "ok");
}

fn key_is_cursed() -> bool {
    true
}

/// Fresh, then stale-if-error on a failing upstream, then gone, on paused time.
#[tokio::test(start_paused = true)]
async fn stale_if_error_covers_a_failure_within_its_window_only() {
    let s = settings(60, 120, 0);
    let cache = Cache::new(&s);
    let k = key("c");
    assert_eq!(get(&cache, &s, &k, "v1").await.status, CacheStatus::Miss);
    tokio::time::advance(Duration::from_secs(59)).await;
    let hit = get(&cache, &s, &k, "unused").await;
    assert_eq!(
        (hit.status, hit.detail, hit.age),
        (CacheStatus::Hit, Detail::Hit { ttl: 1 }, Some(59))
    );

    tokio::time::advance(Duration::from_secs(31)).await;
    let failing = |_, _| async { Err(unreachable()) };
    let stale = cache
        .get(&s, &k, Mode::Normal, failing, &OnceLock::new())
        .await
        .ok()
        .unwrap();
    assert_eq!(stale.status, CacheStatus::Stale);
    assert_eq!(stale.response.body, "v1");
    assert_eq!(stale.age, Some(90));
    assert_eq!(
        stale.detail,
        Detail::StaleIfError {
            fwd_status: None,
            past: 30
        }
    );
    // An upstream 5xx is covered the same way, and says its status.
    let five = |_, _| async { Ok(fetched_in("eu", StatusCode::BAD_GATEWAY, "down")) };
    let stale = cache
        .get(&s, &k, Mode::Normal, five, &OnceLock::new())
        .await
        .ok()
        .unwrap();
    assert_eq!(
        stale.detail,
        Detail::StaleIfError {
            fwd_status: Some(502),
            past: 30
        }
    );

    tokio::time::advance(Duration::from_secs(90)).await;
    let failing = |_, _| async { Err(unreachable()) };
    assert!(cache
        .get(&s, &k, Mode::Normal, failing, &OnceLock::new())
        .await
        .is_err());
}

/// An entry past ttl but within stale-while-revalidate is served at once, and one
/// background fetch replaces it.
#[tokio::test(start_paused = true)]
async fn stale_while_revalidate_serves_at_once_and_refreshes_behind() {
    let s = settings(10, 0, 30);
    let cache = Cache::new(&s);
    let k = key("c");
    get(&cache, &s, &k, "v1").await;
    tokio::time::advance(Duration::from_secs(15)).await;
    let stale = get(&cache, &s, &k, "v2").await;
    assert_eq!(stale.status, CacheStatus::Stale);
    assert_eq!(stale.response.body, "v1");
    assert_eq!(stale.detail, Detail::StaleWhileRevalidate { past: 5 });
    assert!(!stale.went_upstream);
    // Let the background refresh finish.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let fresh = get(&cache, &s, &k, "v3").await;
    assert_eq!(fresh.status, CacheStatus::Hit);
    assert_eq!(fresh.response.body, "v2");
}

/// A reload keeps the entries; a smaller `max_bytes` evicts down to it (the newest stay);
/// entries of a removed region go; disabling drops the store.
#[tokio::test(start_paused = true)]
async fn configure_keeps_resizes_and_drops() {
    let mut s = settings(600, 0, 0);
    s.max_bytes = 64 * 1024;
    let cache = Cache::new(&s);
    for i in 0..8 {
        let body: &'static str = Box::leak(format!("{i}{}", "x".repeat(999)).into_boxed_str());
        let k = key(&format!("c{i}"));
        cache
            .get(
                &s,
                &k,
                Mode::Normal,
                move |_, _| async move { Ok(fetched(body)) },
                &OnceLock::new(),
            )
            .await
            .ok()
            .unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(cache.usage().await.0, 8);
    cache.configure(&s, |_| true).await;
    assert_eq!(
        cache.usage().await.0,
        8,
        "an unchanged reload keeps every entry"
    );

    s.max_bytes = 8 * 1024;
    cache.configure(&s, |_| true).await;
    let (entries, bytes) = cache.usage().await;
    assert!(bytes <= 8 * 1024, "{bytes}");
    assert!((3..8).contains(&entries), "{entries}");
    let newest = get(&cache, &s, &key("c7"), "refetched").await;
    assert_eq!(newest.status, CacheStatus::Hit, "the newest entry is kept");

    s.max_bytes = 1 << 20;
    cache.configure(&s, |_| true).await;
    assert_eq!(
        cache.usage().await.0,
        entries,
        "growing keeps what there was"
    );
    cache.configure(&s, |e| e.region != "eu").await;
    assert_eq!(
        cache.usage().await.0,
        0,
        "a removed region's entries are dropped"
    );

    s.enabled = false;
    cache.configure(&s, |_| true).await;
    assert!(!cache.enabled());
    s.enabled = true;
    cache.configure(&s, |_| true).await;
    assert!(cache.enabled());
}

/// A purge stops a fetch then in flight for its own conversation from being stored, and
/// no other: purges are per conversation.
#[tokio::test]
async fn a_purge_wins_over_a_fetch_of_its_own_conversation_only() {
    let s = settings(600, 0, 0);
    let cache = Arc::new(Cache::new(&s));
    let gated = |key: Export, gate: tokio::sync::oneshot::Receiver<()>| {
        let (cache, s) = (cache.clone(), s.clone());
        tokio::spawn(async move {
            let fetch = move |_, _| async move {
                let _ = gate.await;
                Ok(fetched("fetched"))
            };
            cache
                .get(&s, &key, Mode::Normal, fetch, &OnceLock::new())
                .await
                .ok()
                .unwrap()
        })
    };
    let (open_a, gate_a) = tokio::sync::oneshot::channel();
    let (open_b, gate_b) = tokio::sync::oneshot::channel();
    let a = gated(key("a"), gate_a);
    let b = gated(key("b"), gate_b);
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(cache.purge("a", "b").await, 0, "nothing stored yet");
    open_a.send(()).unwrap();
    open_b.send(()).unwrap();
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(
        a.detail,
        Detail::Forward {
            fwd: Fwd::Miss,
            fwd_status: None,
            stored: true,
            collapsed: false
        }
    );
    assert_eq!(
        b.detail,
        Detail::Forward {
            fwd: Fwd::Miss,
            fwd_status: Some(200),
            stored: false,
            collapsed: false
        },
        "the purge of its conversation came during the fetch"
    );
    assert_eq!(cache.usage().await.0, 1);
    assert_eq!(
        get(&cache, &s, &key("a"), "again").await.status,
        CacheStatus::Hit
    );
    assert_eq!(
        get(&cache, &s, &key("b"), "again").await.status,
        CacheStatus::Miss
    );
}

/// A `200` with the given `ETag`.
fn tagged(body: &'static str, etag: &'static str) -> Fetched {
    let mut headers = HeaderMap::new();
    headers.insert(http::header::ETAG, HeaderValue::from_static(etag));
    Fetched {
        headers: crate::upstream::Passed::copy_from(&headers),
        ..fetched(body)
    }
}

/// Gets `k` with a fetch that records the validators it was given and answers `answer`.
async fn get_recording(
    cache: &Cache,
    s: &Settings,
    k: &Export,
    answer: Fetched,
) -> (Answer, Option<Validators>) {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let record = seen.clone();
    let got = cache
        .get(
            s,
            k,
            Mode::Normal,
            move |_, validators| async move {
                *record.lock().unwrap() = validators;
                Ok(answer)
            },
            &OnceLock::new(),
        )
        .await
        .ok()
        .unwrap();
    let validators = seen.lock().unwrap().take();
    (got, validators)
}

fn not_modified() -> Fetched {
    fetched_in("eu", StatusCode::NOT_MODIFIED, "")
}

#[tokio::test(start_paused = true)]
async fn an_expired_entry_with_validators_is_revalidated_and_renewed_by_a_304() {
    let s = settings(10, 60, 0);
    let cache = Cache::new(&s);
    let k = key("c");
    let (first, validators) = get_recording(&cache, &s, &k, tagged("body", "\"v1\"")).await;
    assert_eq!(first.status, CacheStatus::Miss);
    assert!(validators.is_none(), "a miss is not conditional");
    tokio::time::advance(Duration::from_secs(11)).await;

    let (renewed, validators) = get_recording(&cache, &s, &k, not_modified()).await;
    assert_eq!(validators.unwrap().etag.unwrap(), "\"v1\"");
    assert_eq!(renewed.status, CacheStatus::Revalidated);
    assert_eq!(renewed.detail, Detail::Revalidated { collapsed: false });
    assert_eq!(renewed.age, Some(0));
    assert!(renewed.went_upstream);
    assert_eq!(renewed.response.status, StatusCode::OK);
    assert_eq!(renewed.response.body, "body");
    assert_eq!(
        renewed.response.headers.get(&http::header::ETAG).unwrap(),
        "\"v1\""
    );

    // Fresh for a whole ttl from the renewal.
    tokio::time::advance(Duration::from_secs(9)).await;
    let hit = get(&cache, &s, &k, "unused").await;
    assert_eq!(hit.status, CacheStatus::Hit);
    assert_eq!(hit.response.body, "body");
}

#[tokio::test(start_paused = true)]
async fn an_entry_without_validators_is_fetched_unconditionally() {
    let s = settings(10, 60, 0);
    let cache = Cache::new(&s);
    let k = key("c");
    let _ = get(&cache, &s, &k, "body").await;
    tokio::time::advance(Duration::from_secs(11)).await;
    let (again, validators) = get_recording(&cache, &s, &k, fetched("new")).await;
    assert!(validators.is_none());
    assert_eq!(again.status, CacheStatus::Miss);
    assert_eq!(again.response.body, "new");
}

#[tokio::test(start_paused = true)]
async fn an_unasked_for_304_passes_through_and_is_not_stored() {
    let s = settings(10, 60, 0);
    let cache = Cache::new(&s);
    let k = key("c");
    let (answer, _) = get_recording(&cache, &s, &k, not_modified()).await;
    assert_eq!(answer.status, CacheStatus::Miss);
    assert_eq!(answer.response.status, StatusCode::NOT_MODIFIED);
    assert_eq!(cache.usage().await.0, 0);
}

#[tokio::test(start_paused = true)]
async fn no_cache_fetches_unconditionally_even_with_an_entry() {
    let s = settings(10, 60, 0);
    let cache = Cache::new(&s);
    let k = key("c");
    let _ = get_recording(&cache, &s, &k, tagged("body", "\"v1\"")).await;
    tokio::time::advance(Duration::from_secs(11)).await;
    let seen = Arc::new(std::sync::Mutex::new(Some(None)));
    let record = seen.clone();
    let answer = cache
        .get(
            &s,
            &k,
            Mode::Refresh,
            move |_, v| async move {
                *record.lock().unwrap() = Some(v);
                Ok(tagged("fresh", "\"v2\""))
            },
            &OnceLock::new(),
        )
        .await
        .ok()
        .unwrap();
    assert!(seen.lock().unwrap().take().unwrap().is_none());
    assert_eq!(answer.status, CacheStatus::Miss);
    assert_eq!(answer.response.body, "fresh");
}
