#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Revalidation (the contract's "Conditional requests, revalidation, compression", second
//! sentence): an expired entry with validators is refreshed by a conditional upstream request,
//! and an upstream `304` renews it without a body transfer (`X-Cache: REVALIDATED`), through
//! single flight, stale-while-revalidate and stale-if-error. Time moves by pausing tokio's
//! clock, advancing it and resuming: nothing sleeps through a ttl.

mod common;
use common::*;

use std::sync::Arc;
use std::time::Duration;

use convocore_gateway::testing::mock::{Faults, Recorded};

const REVALIDATED: &str = "convocore-gateway; fwd=stale; fwd-status=304";

fn with_cache(cache: &str) -> TestConfig {
    TestConfig {
        cache: cache.into(),
        upstream: "retries = 0\n".into(),
        ..Default::default()
    }
}

/// Moves tokio's clock (and with it the cache's) forward by `d`, at once. Idle keep-alive
/// connections time out in the jump; a moment of real time lets their closes arrive, so that
/// no client reuses one.
async fn skip(d: Duration) {
    tokio::time::pause();
    tokio::time::advance(d).await;
    tokio::time::resume();
    tokio::time::sleep(Duration::from_millis(20)).await;
}

fn names(r: &Recorded) -> Vec<String> {
    let mut v: Vec<String> = r.headers.keys().map(|k| k.as_str().to_string()).collect();
    v.sort();
    v
}

fn last(gw: &Gateway) -> Recorded {
    gw.eu
        .requests()
        .pop()
        .expect("a request reached the EU mock")
}

/// A gateway with `ttl = "60s"` and `more` cache settings, whose EU entry was filled and has
/// just expired (61 s later); with the first answer.
async fn expired(more: &str) -> (Gateway, Resp) {
    let gw = Gateway::start_with(with_cache(&format!(
        "enabled = true\nttl = \"60s\"\n{more}"
    )))
    .await;
    let first = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-cache"), Some("MISS"));
    skip(Duration::from_secs(61)).await;
    (gw, first)
}

#[tokio::test]
async fn an_upstream_304_renews_the_expired_entry_without_a_body() {
    let (gw, first) = expired("").await;
    let plain = last(&gw);
    assert!(plain.headers.get("if-none-match").is_none());
    assert!(plain.headers.get("if-modified-since").is_none());

    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-cache"), Some("REVALIDATED"));
    assert_eq!(r.header("cache-status"), Some(REVALIDATED));
    assert_eq!(r.header("age"), Some("0"), "a new store time");
    assert_eq!(r.body, first.body);
    for name in [
        "etag",
        "last-modified",
        "content-type",
        "x-convocore-region",
    ] {
        assert_eq!(r.header(name), first.header(name), "{name}");
    }
    // The conditional request: the stored validators, and no other header than a plain one's.
    let conditional = last(&gw);
    assert_eq!(
        conditional.headers.get("if-none-match").unwrap(),
        first.header("etag").unwrap()
    );
    assert_eq!(
        conditional.headers.get("if-modified-since").unwrap(),
        first.header("last-modified").unwrap()
    );
    let mut expected = names(&plain);
    expected.extend(["if-modified-since".to_string(), "if-none-match".to_string()]);
    expected.sort();
    assert_eq!(names(&conditional), expected);
    assert_eq!(gw.eu.not_modified(), 1);

    // Fresh again for a whole ttl: hits, nothing upstream.
    skip(Duration::from_secs(30)).await;
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.header("x-cache"), Some("HIT"));
    assert_eq!(r.header("age"), Some("30"));
    assert_eq!(r.body, first.body);
    assert_eq!(gw.upstream_count(), 2);

    let text = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &text,
            r#"convocore_gateway_requests_total{cache="revalidated",region="eu",status="200"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"convocore_gateway_upstream_requests_total{region="eu",status="304"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn an_upstream_200_replaces_the_entry() {
    let (gw, first) = expired("").await;
    gw.eu.bump_version();
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-cache"), Some("MISS"));
    assert_eq!(
        r.header("cache-status"),
        Some("convocore-gateway; fwd=stale; stored")
    );
    assert_ne!(r.body, first.body);
    assert_ne!(r.header("etag"), first.header("etag"));
    assert_ne!(r.header("last-modified"), first.header("last-modified"));
    assert!(last(&gw).headers.get("if-none-match").is_some());
    assert_eq!(gw.eu.not_modified(), 0);
    let hit = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(hit.body, r.body);
    assert_eq!(hit.header("etag"), r.header("etag"));
}

#[tokio::test]
async fn an_upstream_failure_while_revalidating_serves_stale_if_error() {
    let (gw, first) = expired("stale_if_error = \"1h\"\n").await;
    gw.eu.set_faults(Faults {
        status: Some(503),
        ..Default::default()
    });
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-cache"), Some("STALE"));
    let status = r.header("cache-status").unwrap();
    assert!(status.contains("fwd-status=503"), "{status}");
    assert_eq!(r.body, first.body);
    assert!(last(&gw).headers.get("if-none-match").is_some());

    // Recovered: the same conditional refresh now renews it.
    gw.eu.set_faults(Faults::default());
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.header("x-cache"), Some("REVALIDATED"));
    assert_eq!(r.body, first.body);
}

#[tokio::test]
async fn past_every_stale_window_an_entry_is_still_revalidated_but_never_served_stale() {
    let (gw, first) = expired("stale_if_error = \"0s\"\nstale_while_revalidate = \"0s\"\n").await;
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.header("x-cache"), Some("REVALIDATED"));
    assert_eq!(r.body, first.body);

    // Expired again; the upstream fails: no stale window, so its error passes through.
    skip(Duration::from_secs(61)).await;
    gw.eu.set_faults(Faults {
        status: Some(500),
        ..Default::default()
    });
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.header("x-cache"), Some("MISS"));

    // Kept for revalidation no longer than another ttl: then fetched whole.
    gw.eu.set_faults(Faults::default());
    skip(Duration::from_secs(120)).await;
    gw.state.cache.maintain().await;
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.header("x-cache"), Some("MISS"));
    assert!(last(&gw).headers.get("if-none-match").is_none());
}

#[tokio::test]
async fn the_304s_own_validators_replace_the_stored_ones() {
    let (gw, first) = expired("").await;
    let renamed = "\"renamed-by-304\"";
    let modified = "Mon, 02 Dec 2024 08:00:00 GMT";
    gw.eu.set_faults(Faults {
        headers: vec![
            ("etag".into(), renamed.into()),
            ("last-modified".into(), modified.into()),
        ],
        ..Default::default()
    });
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.header("x-cache"), Some("REVALIDATED"));
    assert_eq!(r.header("etag"), Some(renamed));
    assert_eq!(r.header("last-modified"), Some(modified));
    assert_eq!(r.header("content-type"), first.header("content-type"));
    assert_eq!(r.body, first.body);
    gw.eu.set_faults(Faults::default());

    // Kept: the next hit has them, and a caller holding the new tag gets a 304.
    let hit = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(hit.header("etag"), Some(renamed));
    let r = gw
        .billing_export(http::Method::GET, &[("if-none-match", renamed)])
        .await;
    assert_eq!(r.status, 304);
    assert_eq!(gw.upstream_count(), 2);
}

#[tokio::test]
async fn a_caller_holding_the_entry_gets_304_from_a_revalidation() {
    let (gw, first) = expired("").await;
    let etag = first.header("etag").unwrap();
    let r = gw
        .billing_export(http::Method::GET, &[("if-none-match", etag)])
        .await;
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(r.header("x-cache"), Some("REVALIDATED"));
    assert_eq!(r.header("cache-status"), Some(REVALIDATED));
    assert_eq!(r.header("age"), Some("0"));
    // The caller's own condition never reached Convocore: the gateway's did.
    let sent = last(&gw);
    assert_eq!(sent.headers.get_all("if-none-match").iter().count(), 1);
}

#[tokio::test]
async fn concurrent_callers_share_one_conditional_request() {
    let (gw, first) = expired("").await;
    let gw = Arc::new(gw);
    gw.eu.set_faults(Faults {
        delay: Duration::from_millis(200),
        ..Default::default()
    });
    let before = gw.eu.request_count();
    let answers = concurrent(&gw, 6, EXPORT_EU, &token("billing")).await;
    assert_eq!(gw.eu.request_count() - before, 1, "one conditional request");
    assert_eq!(gw.eu.not_modified(), 1);
    let mut collapsed = 0;
    for r in &answers {
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-cache"), Some("REVALIDATED"));
        assert_eq!(r.body, first.body);
        let status = r.header("cache-status").unwrap();
        assert!(status.starts_with(REVALIDATED), "{status}");
        if status.ends_with("; collapsed") {
            collapsed += 1;
        }
    }
    assert_eq!(collapsed, 5, "one leader, five collapsed");
}

#[tokio::test]
async fn stale_while_revalidate_renews_the_entry_in_the_background() {
    let (gw, first) = expired("stale_while_revalidate = \"30s\"\n").await;
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.header("x-cache"), Some("STALE"));
    assert_eq!(r.body, first.body);
    // The background refresh is conditional, and its 304 renews the entry.
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.eu.not_modified() == 1
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.get(EXPORT_EU, &token("billing")).await.header("x-cache") == Some("HIT")
        })
        .await
    );
    let hit = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(hit.body, first.body);
    assert_eq!(hit.header("age"), Some("0"));
    assert_eq!(gw.upstream_count(), 2);
}
