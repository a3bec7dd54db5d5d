//! Criterion micro-benchmarks of the hot path's parts: route parsing, JWT verification (cold
//! and from the verified-token cache), the cache lookup, a whole cache-hit request through the
//! handler, metrics recording and the access-log line.
//!
//! `cargo bench --bench hot_path`. On this noisy 2-core machine, compare instruction counts too:
//! `valgrind --tool=callgrind target/release/deps/hot_path-* --bench --profile-time 5 <filter>`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::fixture;

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use convocore_gateway::cache::Mode;
use convocore_gateway::domain::{Export, Format};
use convocore_gateway::http::route;
use convocore_gateway::testing::mock::MockConvocore;
use convocore_gateway::upstream::RegionId;
use convocore_gateway::{Config, State};
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use http_body_util::Empty;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const TOKEN: &str = "bench-upstream-token";

fn rs256_token() -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = serde_json::json!({
        "iss": "https://idp.example.internal",
        "aud": "convocore-gateway",
        "sub": "bench-user",
        "team": "bench",
        "iat": now,
        "exp": now + 24 * 3600,
    });
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let key =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

/// The gateway with its shipped defaults (cache on), one RS256 key, in front of a mock EU.
async fn app(mock: &MockConvocore, dir: &Path, extra: &str) -> Arc<State> {
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstream]
token_file = "token"
[regions.eu]
base_url = "{eu}"
[regions.na]
base_url = "{eu}"
[routing.agents]
"agent-eu" = "eu"
{auth}{extra}
"#,
        eu = mock.base_url(),
        auth = common::auth_toml(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    State::build(Config::load(&path).unwrap()).unwrap()
}

async fn app_limited(mock: &MockConvocore, dir: &Path) -> Arc<State> {
    app(
        mock,
        dir,
        "[limits]\nteam_rate = \"1000000/s\"\nteam_burst = 1000000\n",
    )
    .await
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let limited_dir = tempfile::tempdir().unwrap();
    let (mock, app, limited) = rt.block_on(async {
        let mock = MockConvocore::start("eu", TOKEN, &[("agent-eu", &["c1"])])
            .await
            .unwrap();
        let app = app(&mock, dir.path(), "").await;
        // The same with a team bucket every request takes from (never empty here).
        let limited = app_limited(&mock, limited_dir.path()).await;
        (mock, app, limited)
    });
    let token = rs256_token();
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    let uri: Uri = "/v3/agents/agent-eu/convos/c1/export?format=json"
        .parse()
        .unwrap();

    c.bench_function("route_parse", |b| {
        b.iter(|| route::parse(black_box(&Method::GET), black_box(&uri)).unwrap())
    });

    let policy = app.policy();
    c.bench_function("jwt_rs256_verify_cold", |b| {
        b.iter(|| policy.auth.verify_uncached(black_box(&headers)).unwrap())
    });
    c.bench_function("jwt_rs256_verify_cached", |b| {
        b.to_async(&rt)
            .iter(|| async { policy.auth.verify(black_box(&headers)).await.unwrap() })
    });

    let export = Export {
        agent: "agent-eu".into(),
        convo: "c1".into(),
        format: Format::Json,
    };
    let no_fetch = |_, _| async { unreachable!("a hit never fetches") };
    rt.block_on(async {
        // Prime the cache through one real request.
        let req = request(&uri, &headers);
        let resp = convocore_gateway::http::handle(app.clone(), req)
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-cache"], "MISS");
    });
    c.bench_function("cache_lookup_hit", |b| {
        b.to_async(&rt).iter(|| async {
            let answer = app
                .cache
                .get(
                    &policy.cache,
                    black_box(&export),
                    Mode::Normal,
                    no_fetch,
                    &std::sync::OnceLock::new(),
                )
                .await;
            answer.ok().unwrap()
        })
    });

    c.bench_function("handle_cache_hit", |b| {
        b.to_async(&rt).iter(|| async {
            let resp = convocore_gateway::http::handle(app.clone(), request(&uri, &headers))
                .await
                .unwrap();
            debug_assert_eq!(resp.headers()["x-cache"], "HIT");
            resp
        })
    });

    rt.block_on(async {
        let resp = convocore_gateway::http::handle(limited.clone(), request(&uri, &headers))
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-cache"], "MISS");
    });
    c.bench_function("handle_cache_hit_team_bucket", |b| {
        b.to_async(&rt).iter(|| async {
            let resp = convocore_gateway::http::handle(limited.clone(), request(&uri, &headers))
                .await
                .unwrap();
            debug_assert_eq!(resp.headers()["x-cache"], "HIT");
            resp
        })
    });
    let limit = convocore_gateway::traffic::bucket::Limit {
        rate: convocore_gateway::config::Rate::parse("1000000/s").unwrap(),
        burst: 1_000_000,
    };
    c.bench_function("team_bucket_take", |b| {
        b.iter(|| limited.traffic().take(black_box("bench"), false, limit))
    });

    // The same with the gateway's JSON logging installed (lines go to a sink).
    let logged = convocore_gateway::log::json_subscriber(
        convocore_gateway::log::env_filter("info"),
        std::io::sink,
    );
    let dispatch = tracing::Dispatch::new(logged);
    c.bench_function("handle_cache_hit_logged", |b| {
        b.to_async(&rt).iter(|| {
            let fut = convocore_gateway::http::handle(app.clone(), request(&uri, &headers));
            let dispatch = dispatch.clone();
            async move {
                let _guard = tracing::dispatcher::set_default(&dispatch);
                fut.await.unwrap()
            }
        })
    });

    c.bench_function("metrics_record_request", |b| {
        b.iter(|| {
            policy.metrics.record_request(
                black_box(Some(RegionId::new(0))),
                black_box(http::StatusCode::OK),
                black_box(Some(convocore_gateway::cache::CacheStatus::Hit)),
                black_box(std::time::Duration::from_micros(40)),
                black_box(Some("other")),
            )
        })
    });

    // The access-log line: the gateway's own formatter, and tracing-subscriber's JSON formatter
    // it replaced, both into a sink.
    let ours = {
        use tracing_subscriber::layer::SubscriberExt;
        tracing_subscriber::registry().with(convocore_gateway::log::AccessJson {
            writer: std::io::sink,
        })
    };
    tracing::subscriber::with_default(ours, || {
        c.bench_function("access_log_line", |b| b.iter(access_line));
    });
    let stock = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(std::io::sink)
        .finish();
    tracing::subscriber::with_default(stock, || {
        c.bench_function("access_log_line_stock_json", |b| b.iter(access_line));
    });
    drop(mock);
}

fn access_line() {
    tracing::info!(
        target: "access",
        request_id = black_box("0123456789abcdef0123456789abcdef"),
        team = "bench",
        agent = "agent-eu",
        convo = "c1",
        format = "json",
        region = "eu",
        status = 200u16,
        cache = "hit",
        duration_ms = black_box(0.041),
        upstream_ms = 0.0,
        error = "",
        "request"
    );
}

fn request(uri: &Uri, headers: &HeaderMap) -> Request<Empty<Bytes>> {
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = uri.clone();
    *req.headers_mut() = headers.clone();
    req
}

criterion_group!(hot_path, benches);
criterion_main!(hot_path);
