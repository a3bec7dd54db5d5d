//! Traffic control (the contract's "Traffic control: one token, shared fairly"), end to end
//! against the mock regions: team buckets, the fair queue, an upstream 429's pause, the
//! breaker, retries and their budget. The state machines' timing is tested on paused time in
//! `src/traffic/*`; these tests assert what reached the mock and what came back, with short
//! real pauses and no timing assertion.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use convocore_gateway::testing::mock::Faults;

/// Requests waiting for an EU slot now.
async fn queue_depth(gw: &Gateway) -> f64 {
    metric(
        &metrics_text(gw).await,
        "convocore_gateway_upstream_queue_depth{region=\"eu\"}",
    )
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ------------------------------------------------------------------------------- team rate

#[tokio::test]
async fn a_team_over_its_bucket_gets_429_with_ratelimit_fields_and_nothing_goes_upstream() {
    let gw = Gateway::start_with(TestConfig {
        cache: "enabled = true\n".into(),
        extra: "[limits]\nteam_rate = \"1/m\"\nteam_burst = 2\n".into(),
        ..TestConfig::default()
    })
    .await;
    let t = token("billing");
    // A miss and a hit both take from the bucket.
    let first = gw.get(EXPORT_EU, &t).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-cache"), Some("MISS"));
    let second = gw.get(EXPORT_EU, &t).await;
    assert_eq!(second.header("x-cache"), Some("HIT"));
    assert_eq!(gw.upstream_count(), 1);

    let limited = gw.get(EXPORT_NA, &t).await;
    limited.assert_error(429, "TOO_MANY_REQUESTS");
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(
        limited.header("ratelimit-policy"),
        Some("\"team\";q=2;w=120"),
        "a bucket of 2, refilled in 2 minutes"
    );
    let ratelimit = limited.header("ratelimit").unwrap();
    assert!(ratelimit.starts_with("\"team\";r=0;t="), "{ratelimit}");
    assert!(limited.header("x-request-id").is_some());
    assert_eq!(gw.upstream_count(), 1, "nothing reached Convocore");

    // Another team has its own bucket.
    assert_eq!(gw.get(EXPORT_NA, &token("support")).await.status, 200);
    let text = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &text,
            "convocore_gateway_rate_limited_total{team=\"other\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn a_teams_own_rate_wins_over_limits() {
    let gw = Gateway::start_with(TestConfig {
        teams: "[teams]\nbilling = { agents = [\"*\"], rate = \"1/m\", burst = 1 }\n\
                reports = { agents = [\"*\"] }\n"
            .into(),
        extra: "[limits]\nteam_rate = \"100/s\"\nteam_burst = 100\n".into(),
        ..TestConfig::default()
    })
    .await;
    assert_eq!(gw.get(EXPORT_EU, &token("billing")).await.status, 200);
    gw.get(EXPORT_EU, &token("billing"))
        .await
        .assert_error(429, "TOO_MANY_REQUESTS");
    for _ in 0..5 {
        assert_eq!(gw.get(EXPORT_EU, &token("reports")).await.status, 200);
    }
    let text = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &text,
            "convocore_gateway_rate_limited_total{team=\"billing\"}"
        ),
        1.0
    );
    assert_eq!(gw.eu.request_count(), 6);
}

// ------------------------------------------------------------------------------- fair queue

/// `n` distinct conversations the EU mock knows, for misses that cannot coalesce.
fn convos(gw: &Gateway, prefix: &str, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let mut known: Vec<&str> = ids.iter().map(String::as_str).collect();
    known.extend(["c1", "c2", "c3"]);
    gw.eu.add_agent("agent-eu", &known);
    ids
}

#[tokio::test]
async fn a_backlogged_team_does_not_hold_back_another_teams_request() {
    let gw = Arc::new(
        Gateway::start_with(TestConfig {
            upstream: "max_concurrency = 2\n".into(),
            ..TestConfig::default()
        })
        .await,
    );
    gw.eu.set_faults(Faults {
        delay: ms(150),
        ..Default::default()
    });
    let ids = convos(&gw, "bulk", 40);
    let done_a = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for id in ids {
        let (gw, done_a) = (gw.clone(), done_a.clone());
        tasks.push(tokio::spawn(async move {
            let r = gw
                .get(
                    &format!("/v3/agents/agent-eu/convos/{id}/export"),
                    &token("bulk"),
                )
                .await;
            assert_eq!(r.status, 200);
            done_a.fetch_add(1, Ordering::SeqCst);
        }));
    }
    // Team A's backlog is queued behind the two slots.
    assert!(
        eventually(Duration::from_secs(5), || async {
            queue_depth(&gw).await >= 30.0
        })
        .await
    );
    let r = gw.get(EXPORT_EU, &token("quiet")).await;
    assert_eq!(r.status, 200);
    let a_before_b = done_a.load(Ordering::SeqCst);
    // One round of slots: B waited for a slot or two to free, not for A's backlog.
    assert!(
        a_before_b <= 6,
        "{a_before_b} of A's 40 finished before B's one"
    );
    for t in tasks {
        t.await.unwrap();
    }
    let text = metrics_text(&gw).await;
    assert!(
        metric(
            &text,
            "convocore_gateway_upstream_queue_wait_seconds_count{region=\"eu\"}"
        ) >= 41.0
    );
    assert_eq!(
        metric(
            &text,
            "convocore_gateway_upstream_queue_depth{region=\"eu\"}"
        ),
        0.0
    );
}

#[tokio::test]
async fn a_full_queue_and_a_queue_timeout_answer_503_with_retry_after() {
    let gw = Arc::new(
        Gateway::start_with(TestConfig {
            upstream: "max_concurrency = 1\nmax_queue = 1\nqueue_timeout = \"300ms\"\n".into(),
            ..TestConfig::default()
        })
        .await,
    );
    gw.eu.set_faults(Faults {
        delay: ms(1500),
        ..Default::default()
    });
    let holder = {
        let gw = gw.clone();
        tokio::spawn(async move {
            gw.get("/v3/agents/agent-eu/convos/c1/export", &token("a"))
                .await
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.eu.request_count() == 1
        })
        .await
    );
    let waiter = {
        let gw = gw.clone();
        tokio::spawn(async move {
            gw.get("/v3/agents/agent-eu/convos/c2/export", &token("a"))
                .await
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            queue_depth(&gw).await == 1.0
        })
        .await
    );
    let full = gw
        .get("/v3/agents/agent-eu/convos/c3/export", &token("b"))
        .await;
    full.assert_error(503, "SERVICE_UNAVAILABLE");
    assert_eq!(full.header("retry-after"), Some("1"));
    let timed_out = waiter.await.unwrap();
    timed_out.assert_error(503, "SERVICE_UNAVAILABLE");
    assert!(timed_out.header("retry-after").is_some());
    assert_eq!(holder.await.unwrap().status, 200);
    assert_eq!(gw.eu.request_count(), 1, "only the holder went upstream");
}

// ---------------------------------------------------------------------------- upstream 429

#[tokio::test]
async fn an_upstream_429_pauses_the_region_until_its_retry_after_then_one_probe() {
    let gw = Gateway::start_with(TestConfig {
        cache: "enabled = true\nttl = \"1s\"\nstale_if_error = \"1h\"\n".into(),
        ..TestConfig::default()
    })
    .await;
    let t = token("billing");
    // c2 is cached (and then expires); c1 is not.
    assert_eq!(
        gw.get("/v3/agents/agent-eu/convos/c2/export", &t)
            .await
            .status,
        200
    );
    tokio::time::sleep(ms(1100)).await;
    gw.eu.set_faults(Faults {
        status: Some(429),
        headers: vec![("retry-after".into(), "2".into())],
        ..Default::default()
    });
    let r = gw.get(EXPORT_EU, &t).await;
    assert_eq!(r.status, 429, "Convocore's own 429 passes through");
    assert_eq!(gw.eu.request_count(), 2);
    let text = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &text,
            "convocore_gateway_upstream_paused{reason=\"rate_limited\",region=\"eu\"}"
        ),
        1.0
    );

    // Paused: nothing is sent. No entry: the gateway's own 429 with the pause left.
    gw.eu.set_faults(Faults::default());
    let own = gw.get(EXPORT_EU, &t).await;
    own.assert_error(429, "TOO_MANY_REQUESTS");
    let left: u64 = own.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&left), "Retry-After {left}");
    // A stale entry: served, saying the region's 429.
    let stale = gw.get("/v3/agents/agent-eu/convos/c2/export", &t).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.header("x-cache"), Some("STALE"));
    let cs = stale.header("cache-status").unwrap();
    assert!(
        cs.contains("fwd=stale") && cs.contains("fwd-status=429"),
        "{cs}"
    );
    // Other regions are not paused.
    assert_eq!(gw.get(EXPORT_NA, &t).await.status, 200);
    assert_eq!(
        gw.eu.request_count(),
        2,
        "nothing reached the paused region"
    );

    // After the pause, one probe; its success reopens the region.
    tokio::time::sleep(ms(2100)).await;
    assert_eq!(gw.get(EXPORT_EU, &t).await.status, 200);
    assert_eq!(gw.eu.request_count(), 3);
    assert_eq!(
        gw.get("/v3/agents/agent-eu/convos/c3/export", &t)
            .await
            .status,
        200
    );
    assert_eq!(gw.eu.request_count(), 4);
    let text = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &text,
            "convocore_gateway_upstream_paused{reason=\"rate_limited\",region=\"eu\"}"
        ),
        0.0
    );
}

// -------------------------------------------------------------------------------- breaker

#[tokio::test]
async fn the_breaker_opens_on_failures_answers_fast_then_a_probe_closes_it() {
    let gw = Gateway::start_with(TestConfig {
        upstream: "retries = 0\n".into(),
        extra: "[upstream.breaker]\nfailure_ratio = 0.5\nwindow = 4\nmin_exchanges = 4\n\
                open_for = \"1s\"\n"
            .into(),
        ..TestConfig::default()
    })
    .await;
    let t = token("billing");
    gw.eu.set_faults(Faults {
        status: Some(500),
        ..Default::default()
    });
    for _ in 0..4 {
        assert_eq!(gw.get(EXPORT_EU, &t).await.status, 500);
    }
    assert_eq!(gw.eu.request_count(), 4);
    let open = gw.get(EXPORT_EU, &t).await;
    open.assert_error(503, "SERVICE_UNAVAILABLE");
    assert_eq!(open.header("retry-after"), Some("1"));
    assert_eq!(gw.eu.request_count(), 4, "an open breaker sends nothing");
    let text = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &text,
            "convocore_gateway_upstream_paused{reason=\"breaker\",region=\"eu\"}"
        ),
        1.0
    );
    // The NA region is unaffected.
    assert_eq!(gw.get(EXPORT_NA, &t).await.status, 200);

    gw.eu.set_faults(Faults::default());
    tokio::time::sleep(ms(1100)).await;
    assert_eq!(gw.get(EXPORT_EU, &t).await.status, 200, "the probe");
    assert_eq!(gw.get(EXPORT_EU, &t).await.status, 200, "closed");
    assert_eq!(gw.eu.request_count(), 6);
}

// -------------------------------------------------------------------------------- retries

#[tokio::test]
async fn retries_happen_where_they_should_and_not_where_they_should_not() {
    let gw = Gateway::start_with(TestConfig {
        upstream: "retries = 1\n".into(),
        ..TestConfig::default()
    })
    .await;
    let t = token("billing");
    let cases: [(u16, Option<&str>, usize); 6] = [
        (503, None, 2),
        (502, None, 2),
        (504, None, 2),
        (503, Some("5"), 1),
        (500, None, 1),
        (429, None, 1),
    ];
    for (status, retry_after, expected) in cases {
        gw.eu.set_faults(Faults {
            status: Some(status),
            headers: retry_after
                .map(|v| vec![("retry-after".to_string(), v.to_string())])
                .unwrap_or_default(),
            ..Default::default()
        });
        let before = gw.eu.request_count();
        let r = gw.get(EXPORT_EU, &t).await;
        assert_eq!(r.status.as_u16(), status);
        assert_eq!(
            gw.eu.request_count() - before,
            expected,
            "{status} (Retry-After {retry_after:?})"
        );
    }
    let text = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &text,
            "convocore_gateway_upstream_retries_total{region=\"eu\"}"
        ),
        3.0
    );
    // A retried 503 that then succeeds: the caller sees the success.
    tokio::time::sleep(ms(1100)).await; // the 429's pause
    gw.eu.set_faults(Faults::default());
    assert_eq!(gw.get(EXPORT_EU, &t).await.status, 200);
}

#[tokio::test]
async fn a_failing_region_sees_at_most_a_fifth_more_requests_than_callers_made() {
    let gw = Gateway::start_with(TestConfig {
        upstream: "retries = 3\n".into(),
        // A breaker that never opens, so every request reaches the region.
        extra: "[upstream.breaker]\nfailure_ratio = 1.0\nwindow = 10000\nmin_exchanges = 10000\n"
            .into(),
        ..TestConfig::default()
    })
    .await;
    gw.eu.set_faults(Faults {
        status: Some(503),
        ..Default::default()
    });
    let t = token("billing");
    let callers = 60;
    for _ in 0..callers {
        assert_eq!(gw.get(EXPORT_EU, &t).await.status, 503);
    }
    let seen = gw.eu.request_count();
    assert!(
        seen as f64 <= callers as f64 * 1.2 + 1.0,
        "{seen} exchanges for {callers} requests"
    );
    assert!(seen > callers, "some were retried");
}

#[tokio::test]
async fn an_unreachable_region_is_retried_and_answers_502() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let gw = Gateway::start_with(TestConfig {
        upstream: "retries = 2\n".into(),
        region_urls: Some((
            format!("http://127.0.0.1:{port}/v3"),
            "http://127.0.0.1:1/v3".into(),
        )),
        ..TestConfig::default()
    })
    .await;
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    r.assert_error(502, "BAD_GATEWAY");
    let text = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &text,
            "convocore_gateway_upstream_retries_total{region=\"eu\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            "convocore_gateway_upstream_requests_total{region=\"eu\",status=\"error\"}"
        ),
        3.0
    );
}

// ------------------------------------------------------------- hits, and stale for refusals

#[tokio::test]
async fn hits_never_queue_and_stale_entries_cover_a_queue_timeout_and_an_open_breaker() {
    let gw = Arc::new(
        Gateway::start_with(TestConfig {
            cache: "enabled = true\nttl = \"1s\"\nstale_if_error = \"1h\"\n".into(),
            upstream: "max_concurrency = 1\nqueue_timeout = \"200ms\"\nretries = 0\n".into(),
            extra: "[upstream.breaker]\nwindow = 2\nmin_exchanges = 2\nopen_for = \"30s\"\n".into(),
            ..TestConfig::default()
        })
        .await,
    );
    let t = token("billing");
    let c2 = "/v3/agents/agent-eu/convos/c2/export";
    let c3 = "/v3/agents/agent-eu/convos/c3/export";
    // c2 cached and left to expire (stale); c3 cached and kept fresh below.
    assert_eq!(gw.get(c2, &t).await.status, 200);
    tokio::time::sleep(ms(1100)).await;
    assert_eq!(gw.get(c3, &t).await.status, 200);

    // The one slot is held by a slow exchange.
    gw.eu.set_faults(Faults {
        delay: ms(1500),
        ..Default::default()
    });
    let holder = {
        let (gw, t) = (gw.clone(), t.clone());
        tokio::spawn(async move { gw.get(EXPORT_EU, &t).await })
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.eu.request_count() == 3
        })
        .await
    );
    // A hit does not wait for the slot.
    let hit = gw.get(c3, &t).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    // An expired entry whose refresh cannot get a slot in time is served stale.
    let stale = gw.get(c2, &t).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.header("x-cache"), Some("STALE"));
    assert_eq!(holder.await.unwrap().status, 200);
    assert_eq!(gw.eu.request_count(), 3, "the refresh never went upstream");

    // Two failures open the breaker: the stale entry again, nothing sent.
    gw.eu.set_faults(Faults {
        status: Some(500),
        ..Default::default()
    });
    for convo in ["c1", "c3"] {
        tokio::time::sleep(ms(1100)).await; // c3's entry expires too
        let path = format!("/v3/agents/agent-eu/convos/{convo}/export");
        let _ = gw.get(&path, &t).await;
    }
    let sent = gw.eu.request_count();
    let stale = gw.get(c2, &t).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.header("x-cache"), Some("STALE"));
    assert_eq!(gw.eu.request_count(), sent, "an open breaker sends nothing");
}

#[tokio::test]
async fn no_retry_starts_past_request_timeout() {
    let gw = Gateway::start_with(TestConfig {
        upstream: "retries = 3\nrequest_timeout = \"300ms\"\n".into(),
        ..TestConfig::default()
    })
    .await;
    // Each attempt takes 280 ms of the 300: a retry after 25-100 ms could not finish in time.
    gw.eu.set_faults(Faults {
        status: Some(503),
        delay: ms(280),
        ..Default::default()
    });
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert!(r.status == 503 || r.status == 504, "{}", r.status);
    assert_eq!(gw.eu.request_count(), 1);
}

/// A timeout far past anything the clock can add (centuries) neither fails the config nor
/// panics a request: the fuzz tests found the deadline arithmetic overflowing.
#[tokio::test]
async fn a_timeout_of_centuries_is_a_long_timeout_not_a_panic() {
    let gw = Gateway::start_with(TestConfig {
        upstream: "request_timeout = \"500000years\"\nqueue_timeout = \"1h\"\n".into(),
        ..TestConfig::default()
    })
    .await;
    assert_eq!(gw.get(EXPORT_EU, &token("billing")).await.status, 200);
}
