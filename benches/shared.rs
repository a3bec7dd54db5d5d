//! The second level against the first (issue 14): a hit from memory, and a hit from the
//! shared Redis (GET, open the sealed value, decode) for a 2 KiB and a 1 MiB export, on a
//! private `redis-server` on loopback (Debian's package), started and killed by this bench.
//!
//! `cargo bench --bench shared`
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use convocore_gateway::cache::Mode;
use convocore_gateway::clock;
use convocore_gateway::domain::{Export, Format};
use convocore_gateway::upstream::{Fetched, Passed};
use convocore_gateway::{Config, State};
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, StatusCode};

fn entry(bytes: usize) -> Fetched {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(http::header::ETAG, HeaderValue::from_static("\"bench-v1\""));
    Fetched {
        status: StatusCode::OK,
        headers: Passed::copy_from(&headers),
        body: Bytes::from(vec![b'x'; bytes]),
        storable: true,
        elapsed: Duration::ZERO,
        received: clock::now(),
        region: HeaderValue::from_static("eu"),
        retry_after: None,
        from_shared: false,
        encoded: Default::default(),
    }
}

fn benches(c: &mut Criterion) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let Ok(mut server) = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
    else {
        eprintln!("shared bench: no redis-server (sudo apt-get install -y redis-server); skipped");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    std::fs::write(dir.path().join("token"), "t").unwrap();
    std::fs::write(
        dir.path().join("cache-key"),
        base64::engine::general_purpose::STANDARD.encode([9u8; 32]),
    )
    .unwrap();
    let text = format!(
        r#"
[upstream]
token_file = "token"
{auth}[shared]
url = "redis://127.0.0.1:{port}/0"
encryption_key_file = "cache-key"
timeout = "1s"
"#,
        auth = common::auth_toml(),
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let state = rt.block_on(async {
        let state = State::build(Config::load(&path).unwrap()).unwrap();
        let redis = state.policy().shared.clone().unwrap();
        for _ in 0..200 {
            if redis.is_up() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        for (convo, bytes) in [("small", 2048), ("large", 1 << 20)] {
            let key = Export {
                agent: "agent-eu".into(),
                convo: convo.into(),
                format: Format::Json,
            };
            redis.put_entry(
                &key,
                Arc::new(entry(bytes)),
                Duration::from_secs(600),
                0,
                None,
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        state
    });
    let policy = state.policy();
    let redis = policy.shared.clone().unwrap();
    let key = |convo: &str| Export {
        agent: "agent-eu".into(),
        convo: convo.into(),
        format: Format::Json,
    };
    // The first level: the memory store's hit (the entry is filled by a second-level hit).
    let small = key("small");
    rt.block_on(async {
        let no_fetch = |_, _| async { unreachable!("a hit never fetches") };
        let answer = state
            .cache
            .get(
                &policy.cache,
                &small,
                Mode::Normal,
                no_fetch,
                &Default::default(),
            )
            .await;
        assert!(answer.is_ok());
    });
    c.bench_function("l1_hit_2k", |b| {
        b.to_async(&rt).iter(|| async {
            let no_fetch = |_, _| async { unreachable!("a hit never fetches") };
            state
                .cache
                .get(
                    &policy.cache,
                    black_box(&small),
                    Mode::Normal,
                    no_fetch,
                    &Default::default(),
                )
                .await
                .ok()
                .unwrap()
        })
    });
    for (name, convo) in [("l2_hit_2k", "small"), ("l2_hit_1m", "large")] {
        let k = key(convo);
        rt.block_on(async { assert!(redis.get_entry(&k).await.is_some(), "{name}") });
        c.bench_function(name, |b| {
            b.to_async(&rt)
                .iter(|| async { redis.get_entry(black_box(&k)).await.unwrap() })
        });
    }
    // Ours, by its PID.
    let _ = server.kill();
    let _ = server.wait();
}

criterion_group!(shared, benches);
criterion_main!(shared);
