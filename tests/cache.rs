#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The export cache through the real gateway: MISS/HIT and their headers, keys per format,
//! single flight for cold and expired keys, what is never stored, the caller's `no-cache` /
//! `no-store`, stale-if-error (5xx, 429, timeout, refused), stale-while-revalidate, the admin
//! purge route, authorization before the cache, the memory bound, and `enabled = false`.

mod common;
use common::*;

use std::sync::Arc;
use std::time::Duration;

use convocore_gateway::testing::mock::Faults;
use http::Method;
use jsonwebtoken::Algorithm;
use tokio::task::JoinSet;

const EXPORT_EU_CSV: &str = "/v3/agents/agent-eu/convos/c1/export?format=csv";
const PURGE_EU_C1: &str = "/admin/cache/agents/agent-eu/convos/c1";

fn with_cache(cache: &str) -> TestConfig {
    TestConfig {
        cache: cache.into(),
        ..Default::default()
    }
}

fn x_cache(r: &Resp) -> &str {
    r.header("x-cache").expect("x-cache header")
}

fn cache_status(r: &Resp) -> &str {
    r.header("cache-status").expect("cache-status header")
}

/// `Age`: present, and a non-negative integer number of seconds.
fn age(r: &Resp) -> u64 {
    let v = r.header("age").expect("age header");
    v.parse::<u64>()
        .unwrap_or_else(|e| panic!("Age {v:?} is not integer seconds: {e}"))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The `notes` field of a JSON export, which carries the mock's revision.
fn revision(r: &Resp) -> String {
    r.json()["data"]["metadata"]["convo"]["notes"]
        .as_str()
        .unwrap()
        .to_string()
}

fn purge_token(team: &str) -> String {
    let mut c = claims(team);
    c["scope"] = "openid convocore-gateway:purge".into();
    mint(Algorithm::RS256, Some("rsa-1"), &c)
}

// ---------------------------------------------------------------------------------------------
// MISS, HIT, keys
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn first_request_is_a_stored_miss_then_a_hit() {
    let gw = Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await;
    let t = token("billing");

    let first = gw
        .request(
            Method::GET,
            EXPORT_EU,
            &[
                ("authorization", &format!("Bearer {t}")),
                ("x-request-id", "req-first"),
            ],
        )
        .await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(x_cache(&first), "MISS");
    assert_eq!(cache_status(&first), "convocore-gateway; fwd=miss; stored");
    assert_eq!(first.header("age"), None, "no Age on a MISS");

    let second = gw
        .request(
            Method::GET,
            EXPORT_EU,
            &[
                ("authorization", &format!("Bearer {t}")),
                ("x-request-id", "req-second"),
            ],
        )
        .await;
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(x_cache(&second), "HIT");
    let a = age(&second);
    assert!(a < 300, "Age {a}");
    assert!(
        cache_status(&second).starts_with("convocore-gateway; hit; ttl="),
        "{}",
        cache_status(&second)
    );
    let ttl: u64 = cache_status(&second)
        .rsplit("ttl=")
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ttl <= 300, "ttl={ttl}");
    assert_eq!(second.body, first.body, "a HIT is byte-identical");
    // The stored upstream headers come along, and the per-request ones are this request's.
    for h in [
        "content-type",
        "etag",
        "last-modified",
        "x-convocore-region",
    ] {
        assert_eq!(second.header(h), first.header(h), "{h}");
    }
    assert_eq!(second.header("x-request-id"), Some("req-second"));
    assert_eq!(
        gw.upstream_count(),
        1,
        "one upstream request for two answers"
    );
}

#[tokio::test]
async fn json_and_csv_are_separate_entries_and_absent_format_is_json() {
    let gw = Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await;
    let t = token("billing");

    let json = gw.get(EXPORT_EU, &t).await;
    assert_eq!(json.status, 200);
    assert_eq!(x_cache(&json), "MISS");
    let csv = gw.get(EXPORT_EU_CSV, &t).await;
    assert_eq!(csv.status, 200);
    assert_eq!(
        x_cache(&csv),
        "MISS",
        "csv is not served from the json entry"
    );
    assert_ne!(json.body, csv.body);
    assert_eq!(gw.upstream_count(), 2);

    let json2 = gw
        .get("/v3/agents/agent-eu/convos/c1/export?format=json", &t)
        .await;
    assert_eq!(
        x_cache(&json2),
        "HIT",
        "format=json and no format share a key"
    );
    assert_eq!(json2.body, json.body);
    let csv2 = gw.get(EXPORT_EU_CSV, &t).await;
    assert_eq!(x_cache(&csv2), "HIT");
    assert_eq!(csv2.body, csv.body);
    assert_eq!(csv2.header("content-type"), csv.header("content-type"));
    assert_eq!(
        csv2.header("content-disposition"),
        csv.header("content-disposition")
    );

    // Another conversation of the same agent is yet another key.
    let c2 = gw.get("/v3/agents/agent-eu/convos/c2/export", &t).await;
    assert_eq!(x_cache(&c2), "MISS");
    assert_eq!(gw.upstream_count(), 3);
}

#[tokio::test]
async fn age_counts_up_and_ttl_counts_down_on_hits() {
    let gw = Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await;
    let t = token("billing");
    gw.get(EXPORT_EU, &t).await;
    tokio::time::sleep(ms(1200)).await;
    let r = gw.get(EXPORT_EU, &t).await;
    assert_eq!(x_cache(&r), "HIT");
    let a = age(&r);
    assert!((1..300).contains(&a), "Age {a}");
    let ttl: u64 = cache_status(&r)
        .rsplit("ttl=")
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ttl < 300, "ttl={ttl} after {a}s");
    assert!(ttl + a <= 300, "ttl={ttl} + Age {a} over the configured 5m");
    assert_eq!(gw.upstream_count(), 1);
}

// ---------------------------------------------------------------------------------------------
// Single flight
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_one_key_make_one_upstream_request() {
    let gw = Arc::new(Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await);
    gw.eu.set_faults(Faults {
        delay: ms(500),
        ..Default::default()
    });
    let t = token("billing");

    let all = concurrent(&gw, 50, EXPORT_EU, &t).await;
    assert_eq!(all.len(), 50);
    assert_eq!(gw.upstream_count(), 1, "exactly one upstream request");
    let body = all[0].body.clone();
    let mut stored = 0;
    let mut collapsed = 0;
    for r in &all {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.body, body, "every caller gets the same body");
        assert_eq!(x_cache(r), "MISS", "{}", cache_status(r));
        let cs = cache_status(r);
        if cs.contains("collapsed") {
            collapsed += 1;
        } else {
            assert_eq!(cs, "convocore-gateway; fwd=miss; stored");
            stored += 1;
        }
    }
    assert_eq!(stored, 1, "one leader");
    assert_eq!(collapsed, 49, "the others waited for the leader's fetch");

    let after = gw.get(EXPORT_EU, &t).await;
    assert_eq!(x_cache(&after), "HIT");
    assert_eq!(gw.upstream_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refresh_of_an_expired_key_makes_one_upstream_request() {
    let gw = Arc::new(
        Gateway::start_with(with_cache(
            "enabled = true\nttl = \"1s\"\nstale_if_error = \"30s\"\n",
        ))
        .await,
    );
    let t = token("billing");
    let old = gw.get(EXPORT_EU, &t).await;
    assert_eq!(x_cache(&old), "MISS");
    assert_eq!(gw.upstream_count(), 1);

    tokio::time::sleep(ms(1300)).await;
    gw.eu.bump_version();
    gw.eu.set_faults(Faults {
        delay: ms(500),
        ..Default::default()
    });

    let all = concurrent(&gw, 20, EXPORT_EU, &t).await;
    assert_eq!(gw.upstream_count(), 2, "exactly one refresh for 20 callers");
    for r in &all {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(x_cache(r), "MISS", "{}", cache_status(r));
        assert_ne!(r.body, old.body, "the refreshed (new version) body");
        assert!(revision(r).contains("revision 2"), "{}", revision(r));
    }
    let leaders = all
        .iter()
        .filter(|r| !cache_status(r).contains("collapsed"))
        .count();
    assert_eq!(leaders, 1);

    gw.eu.set_faults(Faults::default());
    let after = gw.get(EXPORT_EU, &t).await;
    assert_eq!(x_cache(&after), "HIT", "the refresh replaced the entry");
    assert_eq!(after.body, all[0].body);
    assert_eq!(gw.upstream_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_goes_away_does_not_cancel_the_fetch() {
    let gw = Arc::new(Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await);
    gw.eu.set_faults(Faults {
        delay: ms(800),
        ..Default::default()
    });
    let t = token("billing");
    let task = {
        let gw = gw.clone();
        let t = t.clone();
        tokio::spawn(async move { gw.get(EXPORT_EU, &t).await })
    };
    let gwr = &gw;
    assert!(eventually(ms(3000), || async move { gwr.upstream_count() == 1 }).await);
    // The caller hangs up while the upstream is still answering.
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());

    // The fetch finishes on its own and is stored for the next caller.
    assert!(
        eventually(
            ms(5000),
            || async move { gwr.state.cache.usage().await.0 == 1 }
        )
        .await,
        "the abandoned fetch was not stored"
    );
    gw.eu.set_faults(Faults::default());
    let r = gw.get(EXPORT_EU, &t).await;
    assert_eq!(r.status, 200);
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(gw.upstream_count(), 1);
}

// ---------------------------------------------------------------------------------------------
// What is never stored
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_404_is_not_stored() {
    let gw = Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await;
    let t = token("billing");
    let path = "/v3/agents/agent-eu/convos/nope/export";
    for n in 1..=2 {
        let r = gw.get(path, &t).await;
        assert_eq!(r.status, 404, "{}", r.text());
        assert_eq!(x_cache(&r), "MISS");
        assert!(!cache_status(&r).contains("stored"), "{}", cache_status(&r));
        assert_eq!(gw.upstream_count(), n);
    }
}

#[tokio::test]
async fn upstream_500_is_not_stored() {
    let gw = Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await;
    gw.eu.set_faults(Faults {
        status: Some(500),
        ..Default::default()
    });
    let t = token("billing");
    for n in 1..=2 {
        let r = gw.get(EXPORT_EU, &t).await;
        assert_eq!(r.status, 500, "{}", r.text());
        assert_eq!(x_cache(&r), "MISS");
        assert!(!cache_status(&r).contains("stored"), "{}", cache_status(&r));
        assert_eq!(gw.upstream_count(), n);
    }
    // Once the upstream recovers, the 200 is fetched (not a cached 500) and stored.
    gw.eu.set_faults(Faults::default());
    let r = gw.get(EXPORT_EU, &t).await;
    assert_eq!(r.status, 200);
    assert_eq!(x_cache(&r), "MISS");
    assert_eq!(gw.upstream_count(), 3);
    assert_eq!(x_cache(&gw.get(EXPORT_EU, &t).await), "HIT");
    assert_eq!(gw.upstream_count(), 3);
}

#[tokio::test]
async fn a_2xx_other_than_200_is_not_stored() {
    let gw = Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await;
    gw.eu.set_faults(Faults {
        status: Some(203),
        ..Default::default()
    });
    let t = token("billing");
    for n in 1..=2 {
        let r = gw.get(EXPORT_EU, &t).await;
        assert_eq!(r.status, 203, "{}", r.text());
        assert_eq!(x_cache(&r), "MISS");
        assert_eq!(gw.upstream_count(), n);
    }
}

async fn assert_upstream_cache_control_not_stored(value: &str) {
    let gw = Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await;
    gw.eu.set_faults(Faults {
        headers: vec![("cache-control".into(), value.into())],
        ..Default::default()
    });
    let t = token("billing");
    let first = gw.get(EXPORT_EU, &t).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(x_cache(&first), "MISS");
    assert!(
        !cache_status(&first).contains("stored"),
        "{value}: {}",
        cache_status(&first)
    );
    let second = gw.get(EXPORT_EU, &t).await;
    assert_eq!(second.status, 200);
    assert_eq!(
        x_cache(&second),
        "MISS",
        "{value}: not served from the cache"
    );
    assert_eq!(second.body, first.body);
    assert_eq!(gw.upstream_count(), 2, "{value}: both went upstream");
    assert_eq!(gw.state.cache.usage().await.0, 0, "{value}: nothing stored");
}

#[tokio::test]
async fn upstream_cache_control_no_store_is_not_stored() {
    assert_upstream_cache_control_not_stored("no-store").await;
}

#[tokio::test]
async fn upstream_cache_control_private_is_not_stored() {
    assert_upstream_cache_control_not_stored("private").await;
    assert_upstream_cache_control_not_stored("max-age=60, private").await;
    assert_upstream_cache_control_not_stored("No-Store").await;
}

// ---------------------------------------------------------------------------------------------
// The caller's Cache-Control
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn caller_no_cache_refetches_and_replaces_the_entry() {
    let gw = Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await;
    let t = token("billing");
    let auth = format!("Bearer {t}");
    let old = gw.get(EXPORT_EU, &t).await;
    assert_eq!(x_cache(&old), "MISS");
    assert_eq!(x_cache(&gw.get(EXPORT_EU, &t).await), "HIT");
    assert_eq!(gw.upstream_count(), 1);

    gw.eu.bump_version();
    let fresh = gw
        .request(
            Method::GET,
            EXPORT_EU,
            &[("authorization", &auth), ("cache-control", "no-cache")],
        )
        .await;
    assert_eq!(fresh.status, 200, "{}", fresh.text());
    assert_eq!(x_cache(&fresh), "MISS");
    assert_eq!(fresh.header("age"), None);
    assert!(
        cache_status(&fresh).contains("stored"),
        "{}",
        cache_status(&fresh)
    );
    assert_eq!(gw.upstream_count(), 2, "no-cache went upstream");
    assert_ne!(fresh.body, old.body);
    assert!(revision(&fresh).contains("revision 2"));

    let next = gw.get(EXPORT_EU, &t).await;
    assert_eq!(x_cache(&next), "HIT");
    assert_eq!(next.body, fresh.body, "the entry was replaced");
    assert_eq!(gw.upstream_count(), 2);
}

#[tokio::test]
async fn caller_no_store_bypasses_and_keeps_the_entry() {
    let gw = Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await;
    let t = token("billing");
    let auth = format!("Bearer {t}");
    let old = gw.get(EXPORT_EU, &t).await;
    assert_eq!(x_cache(&old), "MISS");
    assert_eq!(gw.upstream_count(), 1);

    gw.eu.bump_version();
    let bypass = gw
        .request(
            Method::GET,
            EXPORT_EU,
            &[("authorization", &auth), ("cache-control", "no-store")],
        )
        .await;
    assert_eq!(bypass.status, 200, "{}", bypass.text());
    assert_eq!(x_cache(&bypass), "BYPASS");
    assert!(
        cache_status(&bypass).contains("fwd=bypass"),
        "{}",
        cache_status(&bypass)
    );
    assert_eq!(gw.upstream_count(), 2, "no-store went upstream");
    assert!(
        revision(&bypass).contains("revision 2"),
        "fetched afresh, not served from the cache"
    );

    let next = gw.get(EXPORT_EU, &t).await;
    assert_eq!(x_cache(&next), "HIT");
    assert_eq!(next.body, old.body, "no-store did not replace the entry");
    assert_eq!(gw.upstream_count(), 2);
}

#[tokio::test]
async fn caller_no_store_on_a_cold_key_stores_nothing() {
    let gw = Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await;
    let t = token("billing");
    let auth = format!("Bearer {t}");
    let bypass = gw
        .request(
            Method::GET,
            EXPORT_EU,
            &[("authorization", &auth), ("cache-control", "no-store")],
        )
        .await;
    assert_eq!(bypass.status, 200);
    assert_eq!(x_cache(&bypass), "BYPASS");
    assert_eq!(gw.upstream_count(), 1);

    let next = gw.get(EXPORT_EU, &t).await;
    assert_eq!(x_cache(&next), "MISS", "nothing was stored by no-store");
    assert_eq!(gw.upstream_count(), 2);
}

// ---------------------------------------------------------------------------------------------
// Stale-if-error
// ---------------------------------------------------------------------------------------------

const SIE: &str = "enabled = true\nttl = \"1s\"\nstale_if_error = \"30s\"\n";

/// Fills the cache, lets the entry expire, and returns the cached response.
async fn fill_and_expire(gw: &Gateway, t: &str) -> Resp {
    let first = gw.get(EXPORT_EU, t).await;
    assert_eq!(first.status, 200);
    assert_eq!(x_cache(&first), "MISS");
    tokio::time::sleep(ms(1300)).await;
    first
}

fn assert_stale_if_error(r: &Resp, cached: &Resp) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(x_cache(r), "STALE", "{}", cache_status(r));
    assert!(age(r) >= 1, "Age {}", age(r));
    assert!(cache_status(r).contains("fwd=stale"), "{}", cache_status(r));
    assert_eq!(r.body, cached.body, "the cached body");
    assert_eq!(r.header("content-type"), cached.header("content-type"));
    assert_eq!(r.header("x-convocore-region"), Some("eu"));
}

async fn stale_on_status(status: u16) {
    // Without retries, so that each request makes one exchange (retries: tests/traffic.rs).
    let gw = Gateway::start_with(TestConfig {
        upstream: "retries = 0\n".into(),
        ..with_cache(SIE)
    })
    .await;
    let t = token("billing");
    let cached = fill_and_expire(&gw, &t).await;
    gw.eu.set_faults(Faults {
        status: Some(status),
        ..Default::default()
    });
    let r = gw.get(EXPORT_EU, &t).await;
    assert_stale_if_error(&r, &cached);
    assert!(
        cache_status(&r).contains(&format!("fwd-status={status}")),
        "{}",
        cache_status(&r)
    );
    assert_eq!(gw.upstream_count(), 2, "the upstream was asked");

    // Still failing: still stale. A 429 paused the region (1 s without Retry-After): the
    // stale entry is served without asking, and says so.
    let r = gw.get(EXPORT_EU, &t).await;
    assert_stale_if_error(&r, &cached);
    if status == 429 {
        assert!(
            cache_status(&r).contains("fwd-status=429"),
            "{}",
            cache_status(&r)
        );
        assert_eq!(gw.upstream_count(), 2, "nothing is sent to a paused region");
        tokio::time::sleep(ms(1100)).await;
        assert_stale_if_error(&gw.get(EXPORT_EU, &t).await, &cached);
    }
    assert_eq!(gw.upstream_count(), 3);
    gw.eu.set_faults(Faults::default());
    if status == 429 {
        tokio::time::sleep(ms(1100)).await;
    }
    // Recovered, and the export unchanged: the conditional refresh renews the entry.
    let r = gw.get(EXPORT_EU, &t).await;
    assert_eq!(r.status, 200);
    assert_eq!(x_cache(&r), "REVALIDATED");
    assert_eq!(r.body, cached.body);
    assert_eq!(x_cache(&gw.get(EXPORT_EU, &t).await), "HIT");
    assert_eq!(gw.upstream_count(), 4);
    assert_eq!(gw.eu.not_modified(), 1);
}

#[tokio::test]
async fn stale_if_error_on_upstream_500() {
    stale_on_status(500).await;
}

#[tokio::test]
async fn stale_if_error_on_upstream_429() {
    stale_on_status(429).await;
}

#[tokio::test]
async fn stale_if_error_on_upstream_503() {
    stale_on_status(503).await;
}

#[tokio::test]
async fn stale_if_error_on_upstream_timeout() {
    let gw = Gateway::start_with(TestConfig {
        upstream: "request_timeout = \"300ms\"".into(),
        ..with_cache(SIE)
    })
    .await;
    let t = token("billing");
    let cached = fill_and_expire(&gw, &t).await;
    gw.eu.set_faults(Faults {
        delay: ms(1000),
        ..Default::default()
    });
    let r = gw.get(EXPORT_EU, &t).await;
    assert_stale_if_error(&r, &cached);
    assert_eq!(gw.upstream_count(), 2);
}

#[tokio::test]
async fn stale_if_error_when_upstream_refuses_connections() {
    let mut gw = Gateway::start_with(with_cache(SIE)).await;
    let t = token("billing");
    let cached = fill_and_expire(&gw, &t).await;
    gw.eu.stop();
    let r = gw.get(EXPORT_EU, &t).await;
    assert_stale_if_error(&r, &cached);
    // A key never cached has nothing to fall back on: 502.
    let r = gw.get("/v3/agents/agent-eu/convos/c2/export", &t).await;
    r.assert_error(502, "BAD_GATEWAY");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_answers_every_collapsed_caller() {
    let gw = Arc::new(Gateway::start_with(with_cache(SIE)).await);
    let t = token("billing");
    let cached = fill_and_expire(&gw, &t).await;
    gw.eu.set_faults(Faults {
        status: Some(500),
        delay: ms(500),
        ..Default::default()
    });
    let all = concurrent(&gw, 10, EXPORT_EU, &t).await;
    assert_eq!(
        gw.upstream_count(),
        2,
        "one failing refresh for ten callers"
    );
    for r in &all {
        assert_stale_if_error(r, &cached);
    }
}

#[tokio::test]
async fn no_stale_after_stale_if_error_has_passed() {
    let gw = Gateway::start_with(with_cache(
        "enabled = true\nttl = \"1s\"\nstale_if_error = \"1s\"\n",
    ))
    .await;
    let t = token("billing");
    let first = gw.get(EXPORT_EU, &t).await;
    assert_eq!(x_cache(&first), "MISS");
    tokio::time::sleep(ms(2300)).await;
    gw.eu.set_faults(Faults {
        status: Some(500),
        ..Default::default()
    });
    let r = gw.get(EXPORT_EU, &t).await;
    assert_eq!(r.status, 500, "the upstream's 500 passes through");
    assert_eq!(x_cache(&r), "MISS");
    assert_eq!(r.json()["code"], "INTERNAL_SERVER_ERROR");
    assert_eq!(gw.upstream_count(), 2);
}

#[tokio::test]
async fn upstream_404_is_not_covered_by_stale_if_error() {
    // 404 is an answer, not a failure: it passes through even with a stale entry at hand.
    let gw = Gateway::start_with(with_cache(SIE)).await;
    let t = token("billing");
    fill_and_expire(&gw, &t).await;
    gw.eu.set_faults(Faults {
        status: Some(404),
        ..Default::default()
    });
    let r = gw.get(EXPORT_EU, &t).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(x_cache(&r), "MISS");
}

// ---------------------------------------------------------------------------------------------
// Stale-while-revalidate
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    let gw = Gateway::start_with(with_cache(
        "enabled = true\nttl = \"1s\"\nstale_while_revalidate = \"30s\"\n",
    ))
    .await;
    let t = token("billing");
    let old = gw.get(EXPORT_EU, &t).await;
    assert_eq!(x_cache(&old), "MISS");
    tokio::time::sleep(ms(1300)).await;
    gw.eu.bump_version();
    gw.eu.set_faults(Faults {
        delay: ms(2000),
        ..Default::default()
    });

    let r = gw.get(EXPORT_EU, &t).await;
    assert_eq!(r.status, 200);
    assert_eq!(x_cache(&r), "STALE", "{}", cache_status(&r));
    assert!(
        cache_status(&r).contains("stale-while-revalidate"),
        "{}",
        cache_status(&r)
    );
    assert!(age(&r) >= 1);
    assert_eq!(r.body, old.body, "the old body, at once");

    // The refresh is in flight (the mock holds it for 2s): more callers still get STALE, and
    // none of them starts another refresh.
    for _ in 0..5 {
        let r = gw.get(EXPORT_EU, &t).await;
        assert_eq!(x_cache(&r), "STALE", "{}", cache_status(&r));
        assert_eq!(r.body, old.body);
    }
    let gwr = &gw;
    assert!(
        eventually(ms(3000), || async move { gwr.upstream_count() == 2 }).await,
        "one background refresh: {}",
        gw.upstream_count()
    );

    // Once the refresh lands, the entry is fresh again, with the new body.
    let tr = &t;
    assert!(
        eventually(ms(5000), || async move {
            gwr.get(EXPORT_EU, tr).await.header("x-cache") == Some("HIT")
        })
        .await,
        "the refresh never replaced the entry"
    );
    let hit = gw.get(EXPORT_EU, &t).await;
    assert_eq!(x_cache(&hit), "HIT");
    assert_ne!(hit.body, old.body);
    assert!(revision(&hit).contains("revision 2"), "{}", revision(&hit));
    assert_eq!(gw.upstream_count(), 2, "exactly one refresh in total");
}

// ---------------------------------------------------------------------------------------------
// Purge
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn purge_drops_every_format_of_a_conversation() {
    let gw = Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await;
    let t = token("billing");
    gw.get(EXPORT_EU, &t).await;
    gw.get(EXPORT_EU_CSV, &t).await;
    gw.get("/v3/agents/agent-eu/convos/c2/export", &t).await;
    assert_eq!(x_cache(&gw.get(EXPORT_EU, &t).await), "HIT");
    assert_eq!(x_cache(&gw.get(EXPORT_EU_CSV, &t).await), "HIT");
    assert_eq!(gw.upstream_count(), 3);

    let auth = format!("Bearer {}", purge_token("ops"));
    let r = gw
        .admin(Method::DELETE, PURGE_EU_C1, &[("authorization", &auth)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let v = r.json();
    assert_eq!(v["success"], true, "{v}");
    assert!(v["message"].is_string(), "{v}");
    assert_eq!(v["data"]["purged"], 2, "{v}");

    assert_eq!(x_cache(&gw.get(EXPORT_EU, &t).await), "MISS");
    assert_eq!(x_cache(&gw.get(EXPORT_EU_CSV, &t).await), "MISS");
    assert_eq!(gw.upstream_count(), 5);
    // Another conversation is untouched.
    assert_eq!(
        x_cache(&gw.get("/v3/agents/agent-eu/convos/c2/export", &t).await),
        "HIT"
    );

    // Purging what is not cached answers 0.
    let r = gw
        .admin(
            Method::DELETE,
            "/admin/cache/agents/agent-eu/convos/c3",
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"]["purged"], 0);
}

#[tokio::test]
async fn purge_scope_may_be_one_of_several() {
    let gw = Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await;
    let t = token("billing");
    gw.get(EXPORT_EU, &t).await;
    let mut c = claims("ops");
    c["scope"] = "read convocore-gateway:purge write".into();
    let auth = format!("Bearer {}", mint(Algorithm::RS256, Some("rsa-1"), &c));
    let r = gw
        .admin(Method::DELETE, PURGE_EU_C1, &[("authorization", &auth)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"]["purged"], 1);
}

#[tokio::test]
async fn purge_without_the_scope_is_forbidden_and_keeps_the_entry() {
    let gw = Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await;
    let t = token("billing");
    gw.get(EXPORT_EU, &t).await;

    // No scope claim at all, and a scope that merely resembles the purge scope.
    let mut other = claims("ops");
    other["scope"] = "convocore-gateway:read convocore-gateway:purge-all".into();
    for tok in [token("ops"), mint(Algorithm::RS256, Some("rsa-1"), &other)] {
        let auth = format!("Bearer {tok}");
        let r = gw
            .admin(Method::DELETE, PURGE_EU_C1, &[("authorization", &auth)])
            .await;
        r.assert_error(403, "FORBIDDEN");
    }
    let r = gw.get(EXPORT_EU, &t).await;
    assert_eq!(x_cache(&r), "HIT", "the entry stays");
    assert_eq!(gw.upstream_count(), 1);
}

#[tokio::test]
async fn purge_without_a_token_is_unauthorized() {
    let gw = Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await;
    let t = token("billing");
    gw.get(EXPORT_EU, &t).await;

    let r = gw.admin(Method::DELETE, PURGE_EU_C1, &[]).await;
    r.assert_error(401, "UNAUTHORIZED");
    let www = r.header("www-authenticate").expect("WWW-Authenticate");
    assert!(www.starts_with("Bearer"), "{www}");

    // A token that does not verify is no better.
    let mut bad = purge_token("ops");
    bad.push('x');
    let r = gw
        .admin(
            Method::DELETE,
            PURGE_EU_C1,
            &[("authorization", &format!("Bearer {bad}"))],
        )
        .await;
    r.assert_error(401, "UNAUTHORIZED");
    assert!(r.header("www-authenticate").is_some());

    assert_eq!(x_cache(&gw.get(EXPORT_EU, &t).await), "HIT");
}

#[tokio::test]
async fn purge_route_only_takes_delete() {
    let gw = Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await;
    let t = token("billing");
    gw.get(EXPORT_EU, &t).await;
    let auth = format!("Bearer {}", purge_token("ops"));
    for method in [Method::GET, Method::POST] {
        let r = gw
            .admin(method.clone(), PURGE_EU_C1, &[("authorization", &auth)])
            .await;
        r.assert_error(405, "METHOD_NOT_SUPPORTED");
        let allow = r.header("allow").expect("Allow");
        assert!(allow.contains("DELETE"), "{method}: Allow {allow}");
    }
    assert_eq!(x_cache(&gw.get(EXPORT_EU, &t).await), "HIT");
}

#[tokio::test]
async fn purge_with_bad_ids_purges_nothing() {
    let gw = Gateway::start_with(with_cache("enabled = true\nttl = \"5m\"\n")).await;
    let t = token("billing");
    gw.get(EXPORT_EU, &t).await;
    let auth = format!("Bearer {}", purge_token("ops"));
    for path in [
        "/admin/cache/agents/agent.eu/convos/c1",
        "/admin/cache/agents/agent-eu/convos/c1/export",
        "/admin/cache/agents/agent-eu/convos/",
        "/admin/cache/agents/agent%2Deu/convos/c1",
    ] {
        let r = gw
            .admin(Method::DELETE, path, &[("authorization", &auth)])
            .await;
        assert!(
            r.status == 400 || r.status == 404,
            "{path}: {} {}",
            r.status,
            r.text()
        );
        assert_eq!(r.header("content-type"), Some("application/json"), "{path}");
    }
    assert_eq!(x_cache(&gw.get(EXPORT_EU, &t).await), "HIT");
}

// ---------------------------------------------------------------------------------------------
// Authorization before the cache
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_forbidden_team_never_gets_a_cached_export() {
    let gw = Gateway::start_with(TestConfig {
        teams: "[teams]\nbilling = { agents = [\"*\"] }\nsupport = { agents = [\"agent-na\"] }\n"
            .into(),
        ..with_cache("enabled = true\nttl = \"5m\"\n")
    })
    .await;
    let billing = token("billing");
    let support = token("support");
    assert_eq!(x_cache(&gw.get(EXPORT_EU, &billing).await), "MISS");
    assert_eq!(x_cache(&gw.get(EXPORT_EU, &billing).await), "HIT");
    assert_eq!(gw.upstream_count(), 1);

    let r = gw.get(EXPORT_EU, &support).await;
    r.assert_error(403, "FORBIDDEN");
    assert_eq!(r.header("x-cache"), None);
    assert!(!r.text().contains("John Doe"), "no export data in a 403");
    // Nor with no-cache / no-store.
    for cc in ["no-cache", "no-store"] {
        let r = gw
            .request(
                Method::GET,
                EXPORT_EU,
                &[
                    ("authorization", &format!("Bearer {support}")),
                    ("cache-control", cc),
                ],
            )
            .await;
        r.assert_error(403, "FORBIDDEN");
    }
    // An unlisted team is refused too.
    gw.get(EXPORT_EU, &token("marketing"))
        .await
        .assert_error(403, "FORBIDDEN");
    assert_eq!(
        gw.upstream_count(),
        1,
        "no upstream request for a refused team"
    );

    // support's own agent works and is cached.
    assert_eq!(x_cache(&gw.get(EXPORT_NA, &support).await), "MISS");
    assert_eq!(x_cache(&gw.get(EXPORT_NA, &support).await), "HIT");
}

// ---------------------------------------------------------------------------------------------
// Memory bound
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_stays_within_max_bytes() {
    const N: usize = 2000;
    let gw = Arc::new(
        Gateway::start_with(with_cache(
            "enabled = true\nttl = \"5m\"\nmax_bytes = \"1MiB\"\n",
        ))
        .await,
    );
    let ids: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    gw.eu.add_agent("agent-eu", &refs);

    // ~700 bytes of body per JSON export (plus per-entry overhead): 2000 of them hold more
    // body bytes than max_bytes allows.
    let t = token("billing");
    let mut total_body = 0usize;
    for chunk in ids.chunks(25) {
        let mut set = JoinSet::new();
        for id in chunk {
            let gw = gw.clone();
            let t = t.clone();
            let path = format!("/v3/agents/agent-eu/convos/{id}/export");
            set.spawn(async move { gw.get(&path, &t).await });
        }
        while let Some(r) = set.join_next().await {
            let r = r.unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(x_cache(&r), "MISS");
            total_body += r.body.len();
        }
    }
    assert_eq!(gw.upstream_count(), N);
    assert!(
        total_body > 1 << 20,
        "the test must overfill the cache: {total_body}"
    );

    let (entries, bytes) = gw.state.cache.usage().await;
    assert!(bytes <= 1 << 20, "weighted bytes {bytes} over max_bytes");
    assert!(entries > 0, "something is cached");
    assert!(
        (entries as usize) < N,
        "{entries} entries: nothing was evicted"
    );
}

#[tokio::test]
async fn an_export_over_an_eighth_of_max_bytes_is_served_but_not_stored() {
    let gw = Gateway::start_with(TestConfig {
        upstream: "max_response_bytes = \"1MiB\"".into(),
        ..with_cache("enabled = true\nttl = \"5m\"\nmax_bytes = \"1MiB\"\n")
    })
    .await;
    gw.eu.set_faults(Faults {
        oversize: Some((200_000, false)),
        ..Default::default()
    });
    let t = token("billing");
    for n in 1..=2 {
        let r = gw.get(EXPORT_EU, &t).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.body.len(), 200_000, "the full body");
        assert!(r.body.iter().all(|&b| b == b'x'));
        assert_eq!(x_cache(&r), "MISS");
        assert!(!cache_status(&r).contains("stored"), "{}", cache_status(&r));
        assert_eq!(gw.upstream_count(), n);
    }
    assert_eq!(gw.state.cache.usage().await.0, 0);

    // A small export under the same settings is still cached.
    gw.eu.set_faults(Faults::default());
    let path = "/v3/agents/agent-eu/convos/c2/export";
    assert_eq!(x_cache(&gw.get(path, &t).await), "MISS");
    assert_eq!(x_cache(&gw.get(path, &t).await), "HIT");
}

// ---------------------------------------------------------------------------------------------
// Disabled
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn disabled_cache_sends_every_request_upstream() {
    let gw = Gateway::start_with(with_cache("enabled = false\n")).await;
    assert!(!gw.state.cache.enabled());
    let t = token("billing");
    for n in 1..=2 {
        let r = gw.get(EXPORT_EU, &t).await;
        assert_eq!(r.status, 200);
        assert_ne!(x_cache(&r), "HIT");
        assert_eq!(x_cache(&r), "MISS");
        assert_eq!(r.header("age"), None);
        assert!(!cache_status(&r).contains("stored"), "{}", cache_status(&r));
        assert_eq!(gw.upstream_count(), n);
    }
    assert_eq!(gw.state.cache.usage().await, (0, 0));
}

/// A team holding the purge scope may purge only agents that `[teams]` lets it export.
#[tokio::test]
async fn purge_follows_the_teams_rules() {
    let gw = Gateway::start_with(TestConfig {
        teams: "[teams]\nops = { agents = [\"agent-na\"] }\nbilling = { agents = [\"*\"] }\n"
            .into(),
        ..with_cache("enabled = true\nttl = \"5m\"\n")
    })
    .await;
    let t = token("billing");
    assert_eq!(x_cache(&gw.get(EXPORT_EU, &t).await), "MISS");
    let purge = |team: &str| format!("Bearer {}", purge_token(team));
    for (team, why) in [
        ("ops", "not allowed agent-eu"),
        ("marketing", "not in [teams]"),
    ] {
        let r = gw
            .admin(
                Method::DELETE,
                "/admin/cache/agents/agent-eu/convos/c1",
                &[("authorization", &purge(team))],
            )
            .await;
        r.assert_error(403, "FORBIDDEN");
        assert_eq!(x_cache(&gw.get(EXPORT_EU, &t).await), "HIT", "{why}: kept");
    }
    let r = gw
        .admin(
            Method::DELETE,
            "/admin/cache/agents/agent-eu/convos/c1",
            &[("authorization", &purge("billing"))],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"]["purged"], 1);
    assert_eq!(x_cache(&gw.get(EXPORT_EU, &t).await), "MISS");
}
