//! Connection-level limits of both listeners ("The API listener" in the contract): request
//! heads at most 64 KiB (`431`), targets at most 8 KiB (`414`), over HTTP/1.1 and HTTP/2, and
//! nothing of a refused request reaches Convocore.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use convocore_gateway::Limits;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends one raw HTTP/1.1 request and reads until the server closes or 64 KiB arrive.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer before the whole of an oversized head is written.
    let _ = conn.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 8192];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if out.len() > 65536 || out.windows(4).any(|w| w == b"\r\n\r\n") {
                        // The head is in; a body may follow, which these tests do not need.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if let Ok(n) = conn.try_read(&mut buf) {
                            out.extend_from_slice(&buf[..n]);
                        }
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

fn get_with(path: &str, token: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {token}\r\n{extra}\r\n")
        .into_bytes()
}

/// A header line of `n` bytes in all.
fn padding(n: usize) -> String {
    format!("x-padding: {}\r\n", "a".repeat(n - 13))
}

#[tokio::test]
async fn heads_up_to_64_kib_pass_and_larger_ones_get_431() {
    let gw = Gateway::start().await;
    let token = token("billing");
    for listener in [gw.admin, gw.addr] {
        let path = if listener == gw.addr {
            EXPORT_EU
        } else {
            "/healthz"
        };
        // Exactly 64 KiB passes; one byte more, or much more, is 431.
        let base = get_with(path, &token, "").len();
        let exact = get_with(path, &token, &padding(64 * 1024 - base));
        assert_eq!(exact.len(), 64 * 1024);
        let ok = raw(listener, &exact).await;
        assert!(
            ok.starts_with("HTTP/1.1 200"),
            "a 64 KiB head: {}",
            &ok[..ok.len().min(200)]
        );
        for size in [64 * 1024 + 1, 70 * 1024, 200 * 1024] {
            let big = raw(listener, &get_with(path, &token, &padding(size - base))).await;
            assert!(
                big.starts_with("HTTP/1.1 431"),
                "a {size}-byte head: {}",
                &big[..big.len().min(200)]
            );
        }
    }
    assert_eq!(
        gw.eu.request_count(),
        1,
        "only the head within the limit went upstream"
    );
}

#[tokio::test]
async fn targets_over_8_kib_get_414_in_the_error_shape() {
    let gw = Gateway::start().await;
    let token = token("billing");
    let long_query = format!("{EXPORT_EU}?format=json&{}", "x".repeat(8 * 1024));
    let r = gw.get(&long_query, &token).await;
    r.assert_error(414, "BAD_REQUEST");
    // Just within 8 KiB the target is judged as usual (an unknown query parameter: 400).
    let within = format!(
        "{EXPORT_EU}?x={}",
        "y".repeat(8 * 1024 - EXPORT_EU.len() - 3)
    );
    assert_eq!(within.len(), 8 * 1024);
    gw.get(&within, &token)
        .await
        .assert_error(400, "BAD_REQUEST");
    // The admin listener too.
    let r = gw
        .admin(
            http::Method::GET,
            &format!("/healthz?{}", "z".repeat(9000)),
            &[],
        )
        .await;
    r.assert_error(414, "BAD_REQUEST");
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn http2_header_lists_over_64_kib_are_refused() {
    let gw = Gateway::start().await;
    let token = token("billing");
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = |pad: usize| {
        Request::get(gw.url(EXPORT_EU))
            .header("authorization", format!("Bearer {token}"))
            .header("x-padding", "a".repeat(pad))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let r = h2.send_request(request(60 * 1024)).await.unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.into_body().collect().await;
    match h2.send_request(request(70 * 1024)).await {
        Ok(r) => assert_eq!(r.status(), 431),
        Err(e) => assert!(!e.to_string().is_empty(), "refused: {e}"),
    }
    assert_eq!(gw.eu.request_count(), 1);
}

fn capped(max_connections: usize, max_admin_connections: usize) -> TestConfig {
    TestConfig {
        limits: Some(convocore_gateway::Limits {
            // Long, so that only the cap closes the idle connections here.
            header_timeout: Duration::from_secs(30),
            admin_header_timeout: Duration::from_secs(30),
            max_connections,
            max_admin_connections,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Opens `n` connections that send nothing.
async fn idle_flood(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Let the gateway accept them all.
    tokio::time::sleep(Duration::from_millis(200)).await;
    conns
}

/// Idle connections past a listener's cap do not lock out health checks or callers: at the
/// cap the longest-idle connection is closed to make room for the new one.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_flood_does_not_lock_out_probes_or_callers() {
    let gw = Gateway::start_with(capped(30, 20)).await;
    let _admin_flood = idle_flood(gw.admin, 40).await;
    let _api_flood = idle_flood(gw.addr, 50).await;
    for i in 0..10 {
        let r = gw.admin(http::Method::GET, "/healthz", &[]).await;
        assert_eq!(r.status, 200, "probe {i}: {}", r.text());
        let r = gw.admin(http::Method::GET, "/readyz", &[]).await;
        assert_eq!(r.status, 200, "probe {i}: {}", r.text());
    }
    let token = token("billing");
    for i in 0..5 {
        let r = raw(
            gw.addr,
            &get_with(EXPORT_EU, &token, "connection: close\r\n"),
        )
        .await;
        assert!(
            r.starts_with("HTTP/1.1 200"),
            "caller {i}: {}",
            &r[..r.len().min(200)]
        );
    }
}

/// The oldest idle connection is the one closed; busy connections are never closed to make
/// room, and when every connection is busy the newcomer is refused.
#[tokio::test(flavor = "multi_thread")]
async fn busy_connections_are_never_evicted() {
    let gw = std::sync::Arc::new(Gateway::start_with(capped(3, 3)).await);
    gw.eu.set_faults(convocore_gateway::testing::mock::Faults {
        delay: Duration::from_millis(1500),
        ..Default::default()
    });
    let token = token("billing");
    let mut busy = Vec::new();
    for _ in 0..3 {
        let addr = gw.addr;
        let request = get_with(EXPORT_EU, &token, "connection: close\r\n");
        busy.push(tokio::spawn(async move { raw(addr, &request).await }));
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.eu.request_count() == 3
        })
        .await,
        "three requests in progress"
    );
    // A fourth connection finds every slot busy: it is closed without an answer.
    let refused = raw(gw.addr, &get_with(EXPORT_EU, &token, "")).await;
    assert_eq!(refused, "", "the newcomer was served: {refused}");
    for b in busy {
        let r = b.await.unwrap();
        assert!(
            r.starts_with("HTTP/1.1 200"),
            "a busy connection was cut: {r}"
        );
    }
    assert_eq!(gw.eu.request_count(), 3);

    // Now an idle one (connected first) and a newer idle one: at the cap the older goes.
    let mut older = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut newer = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _third = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.eu.set_faults(Default::default());
    let r = raw(
        gw.addr,
        &get_with(EXPORT_EU, &token, "connection: close\r\n"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{}", &r[..r.len().min(200)]);
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(2), older.read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the longest-idle connection stayed: {closed:?}"
    );
    let open = tokio::time::timeout(Duration::from_millis(300), newer.read(&mut byte)).await;
    assert!(
        open.is_err(),
        "a newer idle connection was closed first: {open:?}"
    );
}

/// The admin listener closes idle connections quickly (2 s by default; shortened here).
#[tokio::test]
async fn the_admin_listener_has_a_short_idle_timeout() {
    let gw = Gateway::start_with(TestConfig {
        limits: Some(convocore_gateway::Limits {
            admin_header_timeout: Duration::from_millis(400),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let started = std::time::Instant::now();
    let mut conn = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let end = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the idle admin connection was not closed");
    assert!(started.elapsed() >= Duration::from_millis(350));
    assert_eq!(
        Limits::default().admin_header_timeout,
        Duration::from_secs(2)
    );
}

/// A response that makes no write progress for the send timeout (60 s; 1 s here) has its
/// connection closed: a reader that stops reading cannot pin an export's memory.
#[tokio::test(flavor = "multi_thread")]
async fn a_reader_that_stops_reading_is_cut_off_after_the_send_timeout() {
    const BODY: usize = 24 << 20;
    let gw = Gateway::start_with(TestConfig {
        limits: Some(Limits {
            send_timeout: Duration::from_secs(1),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    gw.eu.set_faults(convocore_gateway::testing::mock::Faults {
        oversize: Some((BODY, false)),
        ..Default::default()
    });
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(&get_with(EXPORT_EU, &token("billing"), ""))
        .await
        .unwrap();
    // Read nothing while the gateway fills the socket buffers, then stalls.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = std::time::Instant::now();
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the stalled connection was never closed");
    assert!(
        total < BODY,
        "the whole body arrived ({total} bytes): nothing was cut"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(Limits::default().send_timeout, Duration::from_secs(60));
    // A reader that keeps reading gets everything.
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), BODY);
}

/// Callers that are gone cost Convocore nothing: HTTP/2 streams reset while their fetches
/// wait for an upstream connection (the pool holds at most 128 per origin) send nothing.
#[tokio::test(flavor = "multi_thread")]
async fn streams_reset_before_their_fetch_starts_cause_no_upstream_request() {
    const STREAMS: usize = 200;
    let gw = Gateway::start_with(TestConfig {
        cache: "enabled = true\nttl = \"5m\"\n".into(),
        ..Default::default()
    })
    .await;
    let ids: Vec<String> = (0..STREAMS).map(|i| format!("r{i}")).collect();
    let mut refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    refs.push("c1");
    gw.eu.add_agent("agent-eu", &refs);
    gw.eu.set_faults(convocore_gateway::testing::mock::Faults {
        delay: Duration::from_millis(1500),
        ..Default::default()
    });
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let token = token("billing");
    let mut streams = Vec::new();
    for id in &ids {
        let mut h2 = h2.clone();
        let request = Request::get(gw.url(&format!("/v3/agents/agent-eu/convos/{id}/export")))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        streams.push(tokio::spawn(async move { h2.send_request(request).await }));
    }
    // Every fetch has started or is waiting for a connection; then every caller goes away.
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.eu.request_count() >= 100
        })
        .await,
        "the fetches did not start"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    for s in &streams {
        s.abort();
    }
    // The upstream answers the ones it has; the waiting ones then find nobody to answer.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = gw.eu.request_count();
    assert!(
        sent <= 128,
        "{sent} upstream requests for {STREAMS} reset streams"
    );
    assert!(
        gw.eu.connections() <= 128,
        "{} upstream connections from one client connection",
        gw.eu.connections()
    );
    // The pool is fine afterwards.
    gw.eu.set_faults(Default::default());
    assert_eq!(gw.get(EXPORT_EU, &token).await.status, 200);
}

/// Unfinished request heads across a listener's connections are held within a budget (32 MiB;
/// 256 KiB here): past it, the connection with the oldest unfinished head is closed, so many
/// connections trickling heads cannot exhaust memory.
#[tokio::test(flavor = "multi_thread")]
async fn unfinished_heads_are_held_within_a_budget_shedding_the_oldest() {
    let gw = Gateway::start_with(TestConfig {
        limits: Some(Limits {
            header_timeout: Duration::from_secs(30),
            head_budget: 256 * 1024,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let token = token("billing");
    let partial = {
        let mut head = get_with(EXPORT_EU, &token, &padding(60 * 1024));
        head.truncate(head.len() - 4); // no end of head: it never completes
        head
    };
    let mut conns = Vec::new();
    for _ in 0..12 {
        let mut c = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        c.write_all(&partial).await.unwrap();
        conns.push(c);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut closed = Vec::new();
    for (i, c) in conns.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_millis(100), c.read(&mut byte)).await;
        if matches!(r, Ok(Ok(0)) | Ok(Err(_))) {
            closed.push(i);
        }
    }
    // 12 x 60 KiB against 256 KiB: at most 4 may be held, and the shed ones are the oldest.
    assert!(closed.len() >= 8, "closed {closed:?}");
    assert_eq!(
        closed,
        (0..closed.len()).collect::<Vec<_>>(),
        "not the oldest first"
    );
    assert!(!closed.contains(&11), "the newest head was shed");
    // A whole request still passes.
    let r = raw(
        gw.addr,
        &get_with(EXPORT_EU, &token, "connection: close\r\n"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{}", &r[..r.len().min(200)]);
    assert_eq!(Limits::default().head_budget, 32 << 20);
}
