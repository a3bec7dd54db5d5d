//! Conditional requests from callers (the contract's "Conditional requests, revalidation,
//! compression", first sentence): `304 Not Modified` on a hit and after a fetch, and nothing
//! of the caller's conditions reaches Convocore.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use http::Method;

async fn conditional(gw: &Gateway, method: Method, headers: &[(&str, &str)]) -> Resp {
    gw.billing_export(method, headers).await
}

fn assert_304(r: &Resp, etag: &str) {
    assert_eq!(r.status, 304, "{}", r.text());
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some(etag));
    assert!(r.header("last-modified").is_some());
    assert!(r.header("x-request-id").is_some());
    assert_eq!(r.header("x-convocore-region"), Some("eu"));
    assert!(r.header("x-cache").is_some());
    assert!(r.header("cache-status").is_some());
    // [cache] compress offers encodings by default: the 304 varies as the 200 does.
    assert_eq!(r.header("vary"), Some("accept-encoding"));
    assert!(r.header("content-type").is_none());
    assert!(r.header("content-encoding").is_none());
}

#[tokio::test]
async fn a_matching_condition_on_a_hit_is_304_and_nothing_goes_upstream() {
    let gw = Gateway::start_with(TestConfig {
        cache: "enabled = true\n".into(),
        ..TestConfig::default()
    })
    .await;
    let first = gw.get(EXPORT_EU, &token("billing")).await;
    let etag = first.header("etag").unwrap().to_string();
    let last_modified = first.header("last-modified").unwrap().to_string();
    let weak = format!("W/{etag}");
    let list = format!("\"other\", {etag}");
    for inm in [etag.as_str(), weak.as_str(), list.as_str(), "*"] {
        let r = conditional(&gw, Method::GET, &[("if-none-match", inm)]).await;
        assert_304(&r, &etag);
        assert_eq!(r.header("x-cache"), Some("HIT"));
        assert!(r.header("age").is_some());
    }
    let r = conditional(&gw, Method::GET, &[("if-modified-since", &last_modified)]).await;
    assert_304(&r, &etag);
    // HEAD too.
    let r = conditional(&gw, Method::HEAD, &[("if-none-match", &etag)]).await;
    assert_304(&r, &etag);
    // No match, an earlier date, If-None-Match winning over If-Modified-Since, malformed
    // conditions: the whole 200.
    for headers in [
        vec![("if-none-match", "\"other\"")],
        vec![("if-modified-since", "Sat, 01 Jan 2000 00:00:00 GMT")],
        vec![
            ("if-none-match", "\"other\""),
            ("if-modified-since", last_modified.as_str()),
        ],
        vec![("if-none-match", "not-a-tag")],
        vec![("if-modified-since", "last tuesday")],
    ] {
        let r = conditional(&gw, Method::GET, &headers).await;
        assert_eq!(r.status, 200, "{headers:?}");
        assert_eq!(r.body, first.body, "{headers:?}");
    }
    assert_eq!(gw.upstream_count(), 1);
}

#[tokio::test]
async fn a_matching_condition_after_a_fetch_is_304_and_convocore_never_sees_it() {
    let gw = Gateway::start().await; // cache off: every request is fetched
    let first = gw.get(EXPORT_EU, &token("billing")).await;
    let etag = first.header("etag").unwrap().to_string();
    let r = conditional(
        &gw,
        Method::GET,
        &[
            ("if-none-match", &etag),
            ("if-modified-since", "Mon, 02 Dec 2024 00:00:00 GMT"),
        ],
    )
    .await;
    assert_304(&r, &etag);
    assert_eq!(gw.upstream_count(), 2);
    for seen in gw.eu.requests() {
        assert!(seen.headers.get("if-none-match").is_none());
        assert!(seen.headers.get("if-modified-since").is_none());
    }
}
