//! What a cached entry really costs against what the cache counts for it (`cache_bytes`), so
//! that `max_bytes` bounds memory for small exports as it does for large ones (issue 12, item
//! 8). The live heap is read from jemalloc's own statistics, so the figure does not depend on
//! the machine's load; this file holds one test so that nothing else allocates alongside it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

/// The binary's own allocator, as in `src/main.rs`, so the figures are those of production.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Bytes the application holds (jemalloc's `stats.allocated`, in its size classes).
fn live() -> i64 {
    tikv_jemalloc_ctl::epoch::advance().unwrap();
    tikv_jemalloc_ctl::stats::allocated::read().unwrap() as i64
}

/// `cache_bytes` and `cache_entries` from `/metrics` (the scrape also runs moka's pending work).
async fn usage(gw: &Gateway) -> (i64, i64) {
    let text = gw.admin(http::Method::GET, "/metrics", &[]).await.text();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap() as i64
    };
    (
        value("convocore_gateway_cache_bytes"),
        value("convocore_gateway_cache_entries"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_small_export_costs_no_more_than_it_weighs() {
    const N: usize = 3000;
    let gw = Gateway::start_with(TestConfig {
        cache: "enabled = true\nmax_bytes = \"256MiB\"\n".into(),
        ..TestConfig::default()
    })
    .await;
    let convos: Vec<String> = (0..2 * N).map(|i| format!("small-{i}")).collect();
    let refs: Vec<&str> = convos.iter().map(String::as_str).collect();
    gw.eu.add_agent("agent-eu", &refs);
    let token = token("billing");
    let fill = |range: std::ops::Range<usize>| {
        let (gw, token, convos) = (&gw, &token, &convos);
        async move {
            for convo in &convos[range] {
                let path = format!("/v3/agents/agent-eu/convos/{convo}/export?format=csv");
                let r = gw.get(&path, token).await;
                assert_eq!(r.status, 200, "{}", r.text());
                assert_eq!(r.header("x-cache"), Some("MISS"));
            }
        }
    };
    // Warm-up: every buffer, pool and table that does not grow per entry reaches its size,
    // and the mock's request log its capacity.
    fill(0..N).await;
    gw.eu.clear_requests();
    let (bytes_before, entries_before) = usage(&gw).await;
    let live_before = live();

    fill(N..2 * N).await;
    gw.eu.clear_requests();
    let (bytes_after, entries_after) = usage(&gw).await;
    let live_after = live();

    assert_eq!(entries_after - entries_before, N as i64);
    let weight = (bytes_after - bytes_before) / N as i64;
    let cost = (live_after - live_before) / N as i64;
    eprintln!("per cached entry: {cost} bytes on the heap, weight {weight} bytes");
    // The weight may round up, but it must not undercount what an entry holds (5 % for what
    // jemalloc's thread caches hold at either reading).
    assert!(
        cost <= weight + weight / 20,
        "an entry holds {cost} bytes but weighs {weight}"
    );
    assert!(
        weight <= cost * 3 / 2,
        "an entry weighs {weight} bytes but holds only {cost}"
    );
}
