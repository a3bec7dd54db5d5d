#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use convocore_gateway::testing::mock::{sample_csv, Faults, MockConvocore};
use http::{Method, Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// Asserts a gateway-made 400 and that nothing reached either mock.
async fn assert_bad_request(gw: &Gateway, path: &str) {
    let before = gw.upstream_count();
    let r = gw.get(path, &token("billing")).await;
    assert_eq!(r.status, 400, "{path}: {}", r.text());
    r.assert_error(400, "BAD_REQUEST");
    assert!(r.header("x-request-id").is_some(), "{path}");
    assert_eq!(gw.upstream_count(), before, "{path} reached upstream");
}

/// The exact body the mock sends for an error status (same serializer, same bytes).
fn mock_error_body(code: &str, message: &str) -> String {
    serde_json::json!({ "message": message, "code": code }).to_string()
}

/// A rustls client config trusting only `ca_pem`, with the given ALPN protocols.
fn client_tls(ca_pem: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth()
}

/// The certificate and key files a TLS gateway serves (in a folder removed on drop).
struct TlsFiles {
    _dir: tempfile::TempDir,
    /// Both in the folder, so a renewal can be written beside them and renamed over them.
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

/// A gateway whose API listener serves TLS with `cert_pem` and `key_pem`, written to files
/// that the test may replace.
async fn start_tls_gateway(cert_pem: &str, key_pem: &str) -> (Gateway, TlsFiles) {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    let gw = Gateway::start_with(TestConfig {
        server: format!(
            "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
        ..Default::default()
    })
    .await;
    (
        gw,
        TlsFiles {
            _dir: dir,
            cert,
            key,
        },
    )
}

fn auth(token: &str) -> String {
    format!("Bearer {token}")
}

// ---------------------------------------------------------------------------------------------
// 1. 400 BAD_REQUEST, nothing sent upstream
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_ids_are_400_and_never_reach_upstream() {
    let gw = Gateway::start().await;
    let long129 = "a".repeat(129);
    for path in [
        // dots
        "/v3/agents/a.b/convos/c1/export".to_string(),
        "/v3/agents/agent-eu/convos/c.1/export".to_string(),
        // an escaped slash
        "/v3/agents/a%2Fb/convos/c1/export".to_string(),
        "/v3/agents/agent-eu/convos/c1%2F/export".to_string(),
        // `..` as a segment
        "/v3/agents/../convos/c1/export".to_string(),
        "/v3/agents/agent-eu/convos/../export".to_string(),
        // a slash inside an id (an extra segment)
        "/v3/agents/a/b/convos/c1/export".to_string(),
        // empty ids
        "/v3/agents//convos/c1/export".to_string(),
        "/v3/agents/agent-eu/convos//export".to_string(),
        // 129 characters
        format!("/v3/agents/{long129}/convos/c1/export"),
        format!("/v3/agents/agent-eu/convos/{long129}/export"),
        // percent-encoded unicode, and an escaped plain letter
        "/v3/agents/agent-eu/convos/c%C3%A9/export".to_string(),
        "/v3/agents/caf%C3%A9/convos/c1/export".to_string(),
        "/v3/agents/agent%2Deu/convos/c1/export".to_string(),
        // other punctuation
        "/v3/agents/agent-eu/convos/c1~/export".to_string(),
        "/v3/agents/agent+eu/convos/c1/export".to_string(),
    ] {
        assert_bad_request(&gw, &path).await;
    }
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn ids_of_128_characters_reach_upstream() {
    let gw = Gateway::start().await;
    let long128 = "a".repeat(128);

    // A 128-character convo id of a statically routed agent: one request, to the EU mock.
    let path = format!("/v3/agents/agent-eu/convos/{long128}/export");
    let r = gw.get(&path, &token("billing")).await;
    assert_eq!(r.status, 404, "{}", r.text()); // the mock does not know that conversation
    let seen = gw.eu.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, path);
    assert_eq!(seen[0].query.as_deref(), Some("format=json"));

    // A 128-character agent id (unmapped, so discovered): it reaches upstream too.
    let path = format!("/v3/agents/{long128}/convos/c1/export");
    let r = gw.get(&path, &token("billing")).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(gw.eu.requests().iter().any(|q| q.path == path));
}

#[tokio::test]
async fn bad_queries_are_400_and_never_reach_upstream() {
    let gw = Gateway::start().await;
    for query in [
        "format=xml",
        "format=JSON",
        "format=Csv",
        "format=",
        "format",
        "format=json&format=json",
        "format=json&format=csv",
        "format=json&x=1",
        "x=1&format=json",
        "x=1",
        "foo=bar",
        "format=%6Ason",
        "format=json&",
        "&format=json",
    ] {
        let path = format!("{EXPORT_EU}?{query}");
        assert_bad_request(&gw, &path).await;
    }
    assert_eq!(gw.upstream_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// 2. 404 for other paths; 3. 405 on the route
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn other_paths_are_404() {
    let gw = Gateway::start().await;
    for path in [
        "/",
        "/v3",
        "/v3/agents/agent-eu/convos/c1",
        "/v3/agents/agent-eu/convos/c1/export/",
        "/v3/agents/agent-eu/export",
        "/v2/agents/agent-eu/convos/c1/export",
        "/v3/agents/agent-eu/convos/c1/exports",
        "/metrics",
        "/healthz",
    ] {
        let r = gw.get(path, &token("billing")).await;
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        r.assert_error(404, "NOT_FOUND");
        assert!(r.header("x-request-id").is_some(), "{path}");
    }
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn other_methods_on_the_route_are_405_with_allow_get_head() {
    let gw = Gateway::start().await;
    let bearer = auth(&token("billing"));
    for method in [
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
    ] {
        let r = gw
            .request(method.clone(), EXPORT_EU, &[("authorization", &bearer)])
            .await;
        assert_eq!(r.status, 405, "{method}: {}", r.text());
        r.assert_error(405, "METHOD_NOT_SUPPORTED");
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method}");
    }
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn head_is_answered_as_get_without_the_body() {
    let gw = Gateway::start_with(TestConfig {
        cache: "enabled = true\n".into(),
        ..TestConfig::default()
    })
    .await;
    let bearer = auth(&token("billing"));
    // A HEAD miss fills the cache like a GET.
    let head = gw
        .request(Method::HEAD, EXPORT_EU, &[("authorization", &bearer)])
        .await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("x-cache"), Some("MISS"));
    let get = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(get.header("x-cache"), Some("HIT"));
    assert_eq!(gw.upstream_count(), 1, "the HEAD's fetch filled the entry");
    assert_eq!(
        head.header("content-length").map(str::to_string),
        Some(get.body.len().to_string())
    );
    let head = gw
        .request(Method::HEAD, EXPORT_EU, &[("authorization", &bearer)])
        .await;
    assert_eq!(head.header("x-cache"), Some("HIT"));
    for name in [
        "content-type",
        "etag",
        "last-modified",
        "x-convocore-region",
        "content-length",
    ] {
        assert_eq!(head.header(name), get.header(name), "{name}");
    }
    assert!(head.header("age").is_some() && head.header("cache-status").is_some());
    // Without a token: the same 401 as a GET (no body either).
    let r = gw.request(Method::HEAD, EXPORT_EU, &[]).await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").is_some());
    // The upstream was asked with GET.
    assert!(gw.eu.requests().iter().all(|r| r.method == "GET"));
}

// ---------------------------------------------------------------------------------------------
// 4. format
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn format_defaults_to_json_and_csv_passes_through_byte_for_byte() {
    let gw = Gateway::start().await;
    let tok = token("billing");

    let r = gw.get(EXPORT_EU, &tok).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    let r = gw.get(&format!("{EXPORT_EU}?format=json"), &tok).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = gw.eu.requests();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.path, "/v3/agents/agent-eu/convos/c1/export");
        assert_eq!(s.query.as_deref(), Some("format=json"));
    }

    let r = gw.get(&format!("{EXPORT_EU}?format=csv"), &tok).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, Bytes::from(sample_csv("agent-eu", "c1", 1)));
    assert_eq!(r.header("content-type"), Some("text/csv; charset=utf-8"));
    assert_eq!(
        r.header("content-disposition"),
        Some("attachment; filename=\"c1.csv\"")
    );
    let seen = gw.eu.requests();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[2].query.as_deref(), Some("format=csv"));
    assert!(seen[2].headers["accept"]
        .to_str()
        .unwrap()
        .contains("text/csv"));
    assert_eq!(gw.na.request_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// 5. request headers sent upstream; 6. response headers passed back
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn only_the_contract_headers_go_upstream() {
    let gw = Gateway::start().await;
    let jwt = token("billing");
    let bearer = auth(&jwt);
    let r = gw
        .request(
            Method::GET,
            EXPORT_EU,
            &[
                ("authorization", &bearer),
                ("cookie", "session=caller-secret"),
                ("x-forwarded-for", "203.0.113.7"),
                ("forwarded", "for=203.0.113.7;proto=https"),
                ("x-real-ip", "203.0.113.7"),
                ("accept-encoding", "gzip, br"),
                ("x-team-secret", "team-secret-value"),
                ("x-request-id", "hdr-test-1"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    let seen = gw.eu.requests();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    assert_eq!(
        h["authorization"],
        format!("Bearer {UPSTREAM_TOKEN}").as_str()
    );
    assert_eq!(
        h["user-agent"],
        concat!("convocore-gateway/", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(h["accept"], "application/json");
    assert_eq!(h["x-request-id"], "hdr-test-1");
    assert_eq!(h["host"], gw.eu.addr().to_string().as_str());
    assert_eq!(h.get_all("authorization").iter().count(), 1);

    let names: BTreeSet<&str> = h.keys().map(|k| k.as_str()).collect();
    let expected: BTreeSet<&str> = [
        "accept",
        "authorization",
        "host",
        "user-agent",
        "x-request-id",
    ]
    .into_iter()
    .collect();
    assert_eq!(names, expected, "headers sent upstream: {h:?}");

    for name in [
        "cookie",
        "x-forwarded-for",
        "forwarded",
        "x-real-ip",
        "accept-encoding",
        "x-team-secret",
    ] {
        assert!(h.get(name).is_none(), "{name} was forwarded");
    }
    for (name, value) in h {
        let v = String::from_utf8_lossy(value.as_bytes());
        assert!(!v.contains(&jwt), "caller JWT in upstream header {name}");
        assert!(!v.contains("caller-secret"), "cookie in upstream {name}");
        assert!(
            !v.contains("team-secret-value"),
            "secret in upstream {name}"
        );
        assert!(
            !v.contains("203.0.113.7"),
            "client address in upstream {name}"
        );
    }
}

#[tokio::test]
async fn only_the_contract_headers_come_back() {
    let gw = Gateway::start().await;
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.status, 200, "{}", r.text());

    for name in ["set-cookie", "x-powered-by"] {
        assert!(r.header(name).is_none(), "{name} passed to the caller");
    }
    assert_ne!(r.header("server"), Some("convocore-mock"));
    assert!(!r.text().contains("upstream-secret"));

    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(r.header("etag"), Some("\"eu-agent-eu-c1-json-v1\""));
    assert_eq!(
        r.header("last-modified"),
        Some("Sun, 01 Dec 2024 10:30:02 GMT")
    );
    assert!(!r.header("x-request-id").unwrap_or("").is_empty());
    assert_eq!(r.header("x-convocore-region"), Some("eu"));
    let x_cache = r.header("x-cache").expect("x-cache");
    assert!(
        ["HIT", "MISS", "STALE", "BYPASS", "REVALIDATED"].contains(&x_cache),
        "{x_cache}"
    );
    let cache_status = r.header("cache-status").expect("cache-status");
    assert!(
        cache_status.starts_with("convocore-gateway;"),
        "{cache_status}"
    );
    assert_eq!(r.header("vary"), Some("accept-encoding"));

    // Nothing else, beyond what the HTTP layer itself adds.
    let allowed: BTreeSet<&str> = [
        "content-type",
        "content-disposition",
        "etag",
        "last-modified",
        "x-request-id",
        "x-convocore-region",
        "x-cache",
        "cache-status",
        "age",
        "content-length",
        "date",
        // [cache] compress offers encodings by default: every 200 says it varies.
        "vary",
        "content-encoding",
    ]
    .into_iter()
    .collect();
    for name in r.headers.keys() {
        assert!(
            allowed.contains(name.as_str()),
            "unexpected response header {name}: {:?}",
            r.headers
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 7. X-Request-Id
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn request_id_is_echoed_replaced_or_generated_and_sent_upstream() {
    let gw = Gateway::start().await;
    let bearer = auth(&token("billing"));

    // A valid caller id: echoed and forwarded.
    let r = gw
        .request(
            Method::GET,
            EXPORT_EU,
            &[("authorization", &bearer), ("x-request-id", "abc-123")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-request-id"), Some("abc-123"));
    assert_eq!(
        gw.eu.requests().last().unwrap().headers["x-request-id"],
        "abc-123"
    );

    // 128 visible characters is still valid.
    let max = "Z".repeat(128);
    let r = gw
        .request(
            Method::GET,
            EXPORT_EU,
            &[("authorization", &bearer), ("x-request-id", &max)],
        )
        .await;
    assert_eq!(r.header("x-request-id"), Some(max.as_str()));
    assert_eq!(
        gw.eu.requests().last().unwrap().headers["x-request-id"],
        max.as_str()
    );

    // Invalid ids are replaced, and the replacement is what goes upstream.
    let long = "a".repeat(129);
    for bad in [long.as_str(), "abc 123", "id-é"] {
        let before = gw.eu.request_count();
        let r = gw
            .request(
                Method::GET,
                EXPORT_EU,
                &[("authorization", &bearer), ("x-request-id", bad)],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let id = r.header("x-request-id").expect("x-request-id").to_string();
        assert_ne!(id, bad);
        assert!(!id.is_empty() && id.len() <= 128, "{id:?}");
        assert!(id.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{id:?}");
        let seen = gw.eu.requests();
        assert_eq!(seen.len(), before + 1);
        assert_eq!(seen.last().unwrap().headers["x-request-id"], id.as_str());
    }

    // Absent: generated, unique per request, and forwarded.
    let a = gw.get(EXPORT_EU, &token("billing")).await;
    let id_a = a.header("x-request-id").expect("x-request-id").to_string();
    assert_eq!(
        gw.eu.requests().last().unwrap().headers["x-request-id"],
        id_a.as_str()
    );
    let b = gw.get(EXPORT_EU, &token("billing")).await;
    let id_b = b.header("x-request-id").expect("x-request-id").to_string();
    assert_eq!(
        gw.eu.requests().last().unwrap().headers["x-request-id"],
        id_b.as_str()
    );
    assert!(!id_a.is_empty() && id_a.len() <= 128);
    assert_ne!(id_a, id_b);

    // Gateway-made errors carry one too.
    let r = gw.get("/nope", &token("billing")).await;
    assert!(!r.header("x-request-id").unwrap_or("").is_empty());
}

// ---------------------------------------------------------------------------------------------
// 8. routing
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn static_map_routes_to_its_region_only() {
    let gw = Gateway::start().await;
    let r = gw.get(EXPORT_NA, &token("billing")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-convocore-region"), Some("na"));
    assert_eq!(r.json()["data"]["metadata"]["convo"]["agentId"], "agent-na");
    assert_eq!(gw.eu.request_count(), 0);
    let seen = gw.na.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v3/agents/agent-na/convos/c1/export");

    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-convocore-region"), Some("eu"));
    assert_eq!(gw.eu.request_count(), 1);
    assert_eq!(gw.na.request_count(), 1);
}

#[tokio::test]
async fn without_discovery_an_unmapped_agent_goes_to_the_default_region_only() {
    let gw = Gateway::start_with(TestConfig {
        routing: "default_region = \"eu\"\ndiscover = false\n".into(),
        ..Default::default()
    })
    .await;
    let path = "/v3/agents/agent-na-unmapped/convos/c1/export";
    for _ in 0..2 {
        let r = gw.get(path, &token("billing")).await;
        assert_eq!(r.status, 404, "{}", r.text());
        assert_eq!(r.text(), mock_error_body("NOT_FOUND", "Agent not found"));
        assert_eq!(r.header("x-convocore-region"), Some("eu"));
    }
    assert_eq!(gw.eu.request_count(), 2);
    assert_eq!(gw.na.request_count(), 0);
}

#[tokio::test]
async fn discovery_asks_the_default_region_then_the_others_and_remembers() {
    let gw = Gateway::start().await;
    let path = "/v3/agents/agent-na-unmapped/convos/c1/export";
    let r = gw.get(path, &token("billing")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-convocore-region"), Some("na"));
    assert_eq!(
        r.json()["data"]["metadata"]["convo"]["agentId"],
        "agent-na-unmapped"
    );
    let eu = gw.eu.requests();
    assert_eq!(eu.len(), 1);
    assert_eq!(eu[0].path, path);
    let na = gw.na.requests();
    assert_eq!(na.len(), 1);
    assert_eq!(na[0].path, path);
    // Both exchanges carry the same request id.
    assert_eq!(eu[0].headers["x-request-id"], na[0].headers["x-request-id"]);

    // Remembered: straight to NA, EU not asked again (another convo of the same agent, too).
    let r = gw.get(path, &token("billing")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-convocore-region"), Some("na"));
    let r = gw
        .get(
            "/v3/agents/agent-na-unmapped/convos/c2/export",
            &token("billing"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(gw.eu.request_count(), 1);
    assert_eq!(gw.na.request_count(), 3);

    // An unmapped agent the default region has: one request, to EU.
    let r = gw
        .get(
            "/v3/agents/agent-eu-unmapped/convos/c1/export",
            &token("billing"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-convocore-region"), Some("eu"));
    assert_eq!(gw.eu.request_count(), 2);
    assert_eq!(gw.na.request_count(), 3);
}

#[tokio::test]
async fn discovery_of_an_agent_no_region_knows_passes_the_404_through() {
    let gw = Gateway::start().await;
    let path = "/v3/agents/agent-nowhere/convos/c1/export";
    let r = gw.get(path, &token("billing")).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.text(), mock_error_body("NOT_FOUND", "Agent not found"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(gw.eu.request_count(), 1);
    assert_eq!(gw.na.request_count(), 1);

    // Not remembered: the next request asks both again.
    let r = gw.get(path, &token("billing")).await;
    assert_eq!(r.status, 404);
    assert_eq!(gw.eu.request_count(), 2);
    assert_eq!(gw.na.request_count(), 2);
}

// ---------------------------------------------------------------------------------------------
// 9. upstream errors pass through
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    // One exchange per request (retries of 503: tests/traffic.rs); the 429 last, as it pauses
    // the region.
    let gw = Gateway::start_with(TestConfig {
        upstream: "retries = 0\n".into(),
        ..TestConfig::default()
    })
    .await;
    for (status, code) in [
        (500u16, "INTERNAL_SERVER_ERROR"),
        (403, "FORBIDDEN"),
        (503, "SERVICE_UNAVAILABLE"),
        (429, "TOO_MANY_REQUESTS"),
    ] {
        gw.eu.set_faults(Faults {
            status: Some(status),
            ..Default::default()
        });
        let before = gw.eu.request_count();
        let r = gw.get(EXPORT_EU, &token("billing")).await;
        assert_eq!(r.status.as_u16(), status, "{}", r.text());
        assert_eq!(r.text(), mock_error_body(code, "mock fault"), "{status}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("x-convocore-region"), Some("eu"));
        assert!(r.header("set-cookie").is_none());
        assert_eq!(gw.eu.request_count(), before + 1);
    }
    assert_eq!(gw.na.request_count(), 0);

    // An upstream 401 (its token refused) is the upstream's, not a gateway auth error.
    gw.eu.set_faults(Faults::default());
    tokio::time::sleep(Duration::from_millis(1100)).await; // the 429's pause
    gw.eu.set_token("something-else");
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.text(), mock_error_body("UNAUTHORIZED", "Invalid API key"));
    assert!(!r.text().contains(UPSTREAM_TOKEN));
}

// ---------------------------------------------------------------------------------------------
// 10. timeout; 11. refused; 12. oversize
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_timeout_is_504() {
    let gw = Gateway::start_with(TestConfig {
        upstream: "request_timeout = \"300ms\"\n".into(),
        ..Default::default()
    })
    .await;
    gw.eu.set_faults(Faults {
        delay: Duration::from_secs(3),
        ..Default::default()
    });
    let started = std::time::Instant::now();
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    let took = started.elapsed();
    r.assert_error(504, "GATEWAY_TIMEOUT");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(took >= Duration::from_millis(250), "took {took:?}");
    assert_eq!(gw.eu.request_count(), 1);
    assert_eq!(gw.na.request_count(), 0);
}

#[tokio::test]
async fn refused_connection_is_502() {
    let mut gw = Gateway::start().await;
    gw.eu.stop();
    // The mock's accept loop is aborted asynchronously; let it close.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    r.assert_error(502, "BAD_GATEWAY");
    assert!(!r.text().contains(UPSTREAM_TOKEN));
    assert_eq!(gw.eu.request_count(), 0);
    // The other region is unaffected.
    let r = gw.get(EXPORT_NA, &token("billing")).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn sequential_exports_reuse_one_upstream_connection() {
    let gw = Gateway::start().await;
    for i in 0..5 {
        let r = gw.get(EXPORT_EU, &token("billing")).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    assert_eq!(gw.eu.request_count(), 5);
    assert_eq!(gw.eu.connections(), 1, "keep-alive to the upstream");
    // Every request on it was complete: the right path and the shared token each time.
    for seen in gw.eu.requests() {
        assert_eq!(seen.path, "/v3/agents/agent-eu/convos/c1/export");
        assert_eq!(seen.version, Version::HTTP_11);
        assert_eq!(
            seen.headers["authorization"],
            format!("Bearer {UPSTREAM_TOKEN}").as_str()
        );
        assert!(seen.headers.contains_key("host"));
    }
}

#[tokio::test]
async fn concurrent_exports_open_connections_that_are_then_reused() {
    let gw = Arc::new(Gateway::start().await);
    for r in concurrent(&gw, 16, EXPORT_EU, &token("billing")).await {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let opened = gw.eu.connections();
    assert!(
        (1..=16).contains(&opened),
        "{opened} connections for 16 requests"
    );
    for _ in 0..10 {
        let r = gw.get(EXPORT_EU, &token("billing")).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(gw.eu.request_count(), 26);
    assert_eq!(gw.eu.connections(), opened, "idle connections are reused");
}

#[tokio::test]
async fn connections_the_upstream_closed_while_idle_are_replaced() {
    let gw = Gateway::start().await;
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(gw.eu.connections(), 1);
    for round in 0..5 {
        // The upstream drops its idle keep-alive connections without a word, and the very
        // next export must still succeed (on a new connection, or once the gateway notices,
        // by retrying the unsent request there).
        gw.eu.drop_connections();
        if round % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let r = gw.get(EXPORT_EU, &token("billing")).await;
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
    }
    assert_eq!(
        gw.eu.request_count(),
        6,
        "each export reached the upstream once"
    );
    assert_eq!(gw.eu.connections(), 6);
}

#[tokio::test]
async fn oversize_bodies_are_502_never_truncated() {
    let gw = Gateway::start_with(TestConfig {
        upstream: "max_response_bytes = \"64KiB\"\n".into(),
        ..Default::default()
    })
    .await;
    for (size, chunked) in [
        (200_000, false),
        (200_000, true),
        (65_537, false),
        (65_537, true),
    ] {
        gw.eu.set_faults(Faults {
            oversize: Some((size, chunked)),
            ..Default::default()
        });
        let before = gw.eu.request_count();
        let r = gw.get(EXPORT_EU, &token("billing")).await;
        assert_eq!(r.status, 502, "{size} chunked={chunked}");
        r.assert_error(502, "BAD_GATEWAY");
        assert!(r.body.len() < 1024, "a partial body came through");
        assert_eq!(gw.eu.request_count(), before + 1);
    }
    // At and under the limit: whole.
    for (size, chunked) in [(65_536, false), (65_536, true), (60_000, true)] {
        gw.eu.set_faults(Faults {
            oversize: Some((size, chunked)),
            ..Default::default()
        });
        let r = gw.get(EXPORT_EU, &token("billing")).await;
        assert_eq!(r.status, 200, "{size} chunked={chunked}: {}", r.text());
        assert_eq!(r.body.len(), size);
        assert!(r.body.iter().all(|b| *b == b'x'));
    }
}

// ---------------------------------------------------------------------------------------------
// 13. token file rotation
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_token_file_is_followed() {
    let gw = Gateway::start().await;
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let tmp = gw.dir.path().join("convocore-token.new");
    std::fs::write(&tmp, "new-token\n").unwrap();
    std::fs::rename(&tmp, gw.token_file()).unwrap();
    gw.eu.set_token("new-token");

    let jwt = token("billing");
    let ok = eventually(Duration::from_secs(5), || {
        let gw = &gw;
        let jwt = jwt.clone();
        async move { gw.get(EXPORT_EU, &jwt).await.status == 200 }
    })
    .await;
    assert!(ok, "the new token was not picked up within 5s");
    assert_eq!(
        gw.eu.requests().last().unwrap().headers["authorization"],
        "Bearer new-token"
    );
    // And it sticks.
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        gw.eu.requests().last().unwrap().headers["authorization"],
        "Bearer new-token"
    );
}

// ---------------------------------------------------------------------------------------------
// 14. upstream over TLS with a private CA
// ---------------------------------------------------------------------------------------------

/// A gateway whose EU region is an HTTPS mock (h2 and http/1.1 by ALPN) signed by a test CA
/// the gateway trusts through `ca_file`; NA is plain HTTP. `eu_faults` are set before start.
async fn gateway_with_tls_eu(eu_faults: Faults) -> (Arc<Gateway>, tempfile::TempDir) {
    let (ca_pem, cert_pem, key_pem) = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca_pem).unwrap();
    let eu = MockConvocore::start_tls(
        "eu",
        UPSTREAM_TOKEN,
        EU_AGENTS,
        cert_pem.as_bytes(),
        key_pem.as_bytes(),
    )
    .await
    .unwrap();
    assert!(eu.base_url().starts_with("https://localhost:"));
    eu.set_faults(eu_faults);
    let na = MockConvocore::start("na", UPSTREAM_TOKEN, NA_AGENTS)
        .await
        .unwrap();
    let gw = Gateway::start_with_mocks(
        TestConfig {
            upstream: format!("ca_file = \"{}\"\n", ca_path.display()),
            ..Default::default()
        },
        eu,
        na,
    )
    .await;
    (Arc::new(gw), dir)
}

#[tokio::test]
async fn upstream_over_tls_with_ca_file() {
    let (gw, _dir) = gateway_with_tls_eu(Faults::default()).await;
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-convocore-region"), Some("eu"));
    let seen = gw.eu.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v3/agents/agent-eu/convos/c1/export");
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {UPSTREAM_TOKEN}").as_str()
    );
    // The TLS mock offers h2 and http/1.1 by ALPN: the gateway's client speaks HTTP/2.
    assert_eq!(seen[0].version, Version::HTTP_2);
    // Later exports share that HTTP/2 connection, concurrent ones included.
    for r in concurrent(&gw, 8, EXPORT_EU, &token("billing")).await {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(gw.eu.request_count(), 9);
    assert_eq!(
        gw.eu.connections(),
        1,
        "one HTTP/2 connection for every export"
    );
    // Plain-HTTP regions still work next to the TLS one.
    let r = gw.get(EXPORT_NA, &token("billing")).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn upstream_over_tls_without_ca_file_is_502() {
    let (_ca_pem, cert_pem, key_pem) = test_pki();
    let eu = MockConvocore::start_tls(
        "eu",
        UPSTREAM_TOKEN,
        EU_AGENTS,
        cert_pem.as_bytes(),
        key_pem.as_bytes(),
    )
    .await
    .unwrap();
    let na = MockConvocore::start("na", UPSTREAM_TOKEN, NA_AGENTS)
        .await
        .unwrap();
    let gw = Gateway::start_with_mocks(TestConfig::default(), eu, na).await;
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    r.assert_error(502, "BAD_GATEWAY");
    assert_eq!(gw.eu.request_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// 15. h2c; 16. [server.tls] with ALPN
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn api_listener_speaks_h2c_with_prior_knowledge() {
    let gw = Gateway::start().await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    for _ in 0..2 {
        let req = Request::get(gw.url(EXPORT_EU))
            .header("authorization", auth(&token("billing")))
            .header("x-request-id", "h2c-1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.version(), Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-convocore-region"], "eu");
        assert_eq!(resp.headers()["x-request-id"], "h2c-1");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["data"]["metadata"]["convo"]["id"], "c1");
    }
    assert_eq!(gw.eu.request_count(), 2);
    // HEAD over HTTP/2: the headers with the GET's Content-Length, no DATA.
    let req = Request::head(gw.url(EXPORT_EU))
        .header("authorization", auth(&token("billing")))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let length: usize = resp.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(length > 100, "{length}");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty());
}

#[tokio::test]
async fn api_listener_serves_tls_with_h2_and_http11_by_alpn() {
    let (ca_pem, cert_pem, key_pem) = test_pki();
    let (gw, _files) = start_tls_gateway(&cert_pem, &key_pem).await;
    let url = format!("https://localhost:{}{EXPORT_EU}", gw.addr.port());

    // h2 by ALPN.
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls(&ca_pem))
        .https_only()
        .enable_all_versions()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let req = Request::get(&url)
        .header("authorization", auth(&token("billing")))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.headers()["x-convocore-region"], "eu");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["data"]["metadata"]["convo"]["id"], "c1");

    // HTTP/1.1 when the client offers only that.
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls(&ca_pem))
        .https_only()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let req = Request::get(&url)
        .header("authorization", auth(&token("billing")))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), Version::HTTP_11);
    assert_eq!(gw.eu.request_count(), 2);

    // Plain HTTP on the TLS listener gets no HTTP answer.
    let plain: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::get(gw.url(EXPORT_EU))
        .header("authorization", auth(&token("billing")))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(15), plain.request(req)).await;
    assert!(
        matches!(r, Ok(Err(_)) | Err(_)),
        "plain HTTP was answered on the TLS listener"
    );
    assert_eq!(gw.eu.request_count(), 2);
}

// ---------------------------------------------------------------------------------------------
// Per-region token, certificate rotation
// ---------------------------------------------------------------------------------------------

/// A region's own `token_file` overrides the shared token for that region only, and is
/// followed like the shared one.
#[tokio::test]
async fn a_region_may_override_the_shared_token() {
    let dir = tempfile::tempdir().unwrap();
    let na_token = dir.path().join("na-token");
    std::fs::write(&na_token, "na-only-token-0123456789\n").unwrap();
    let eu = MockConvocore::start("eu", UPSTREAM_TOKEN, EU_AGENTS)
        .await
        .unwrap();
    let na = MockConvocore::start("na", "na-only-token-0123456789", NA_AGENTS)
        .await
        .unwrap();
    let gw = Gateway::start_with_mocks(
        TestConfig {
            na_region: format!("token_file = \"{}\"", na_token.display()),
            ..Default::default()
        },
        eu,
        na,
    )
    .await;
    let t = token("billing");
    assert_eq!(gw.get(EXPORT_EU, &t).await.status, 200);
    assert_eq!(gw.get(EXPORT_NA, &t).await.status, 200);
    assert_eq!(
        gw.eu.requests()[0].headers["authorization"],
        format!("Bearer {UPSTREAM_TOKEN}").as_str()
    );
    assert_eq!(
        gw.na.requests()[0].headers["authorization"],
        "Bearer na-only-token-0123456789"
    );

    // Rotate the NA token only.
    let tmp = dir.path().join("na-token.new");
    std::fs::write(&tmp, "na-rotated-token-9876543210").unwrap();
    std::fs::rename(&tmp, &na_token).unwrap();
    gw.na.set_token("na-rotated-token-9876543210");
    let (g, t2) = (&gw, &t);
    assert!(
        eventually(Duration::from_secs(5), || async move {
            g.get(EXPORT_NA, t2).await.status == 200
        })
        .await
    );
    let last = gw.na.requests().pop().unwrap();
    assert_eq!(
        last.headers["authorization"],
        "Bearer na-rotated-token-9876543210"
    );
    assert_eq!(gw.get(EXPORT_EU, &t).await.status, 200);
}

/// `[server.tls]` files are followed: a renewed certificate and key are served to new
/// connections without a restart.
#[tokio::test]
async fn renewed_server_certificates_are_picked_up() {
    let (ca_a, cert_a, key_a) = test_pki();
    let (ca_b, cert_b, key_b) = test_pki();
    let (gw, files) = start_tls_gateway(&cert_a, &key_a).await;
    let url = format!("https://localhost:{}{EXPORT_EU}", gw.addr.port());
    let t = token("billing");
    let get = |ca: String| {
        let url = url.clone();
        let t = t.clone();
        async move {
            // A new client each time: a new connection, a new handshake.
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(client_tls(&ca))
                .https_only()
                .enable_http1()
                .build();
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
            let req = Request::get(&url)
                .header("authorization", auth(&t))
                .body(Full::new(Bytes::new()))
                .unwrap();
            client.request(req).await.map(|r| r.status().as_u16()).ok()
        }
    };
    assert_eq!(get(ca_a.clone()).await, Some(200));
    assert_eq!(
        get(ca_b.clone()).await,
        None,
        "CA B must not be trusted yet"
    );

    // Renew: the certificate first, then the key (the mismatched pair in between is ignored;
    // the key's change must reload the pair).
    for (path, pem) in [(&files.cert, &cert_b), (&files.key, &key_b)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, path).unwrap();
        // Long enough for the watcher to see the mismatched pair on its own.
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let ca = ca_b.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let ca = ca.clone();
            let get = &get;
            async move { get(ca).await == Some(200) }
        })
        .await,
        "the renewed certificate was not served"
    );
    assert_eq!(get(ca_a).await, None, "the old certificate is still served");
}

/// The admin listener speaks HTTP/1.1 only: an h2c client with prior knowledge gets no answer.
#[tokio::test]
async fn admin_listener_is_http1_only() {
    let gw = Gateway::start().await;
    let r = gw.admin(Method::GET, "/healthz", &[]).await;
    assert_eq!(r.status, 200);
    let h2: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = Request::get(format!("http://{}/healthz", gw.admin))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), h2.request(req)).await;
    assert!(
        matches!(r, Ok(Err(_))),
        "the admin listener answered HTTP/2: {r:?}"
    );
}

/// The slowloris guard and the keep-alive idle limit: a client has the header timeout (10 s;
/// `T` here, where the harness shortens it so the test takes a second) from connecting to
/// send a whole request head, and as long after each response for the next; then the gateway
/// closes the connection. A request waiting on a slow upstream is not cut, and nothing of a
/// half-sent request reaches Convocore. Every duration below is the 10 s one scaled by T/10 s.
#[tokio::test(flavor = "multi_thread")]
async fn request_heads_have_10s_and_idle_keep_alive_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const T: Duration = Duration::from_secs(1);
    let scaled = |d: Duration| d.mul_f64(T.as_secs_f64() / 10.0);
    let gw = Gateway::start_with(TestConfig {
        upstream: "request_timeout = \"30s\"\n".into(),
        limits: Some(convocore_gateway::Limits {
            header_timeout: T,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    gw.na.set_faults(Faults {
        delay: scaled(Duration::from_secs(12)),
        ..Default::default()
    });
    let auth = auth(&token("billing"));
    let whole =
        |path: &str| format!("GET {path} HTTP/1.1\r\nhost: gw\r\nauthorization: {auth}\r\n\r\n");
    let connect = || tokio::net::TcpStream::connect(gw.addr);
    let started = std::time::Instant::now();

    // A connection that sends nothing at all.
    let mut silent = connect().await.unwrap();
    // One that sends a whole request, then the start of a second one trickled byte by byte.
    let mut slow = connect().await.unwrap();
    slow.write_all(whole(EXPORT_EU).as_bytes()).await.unwrap();
    // One that sends a whole request and then stays idle.
    let mut idle = connect().await.unwrap();
    idle.write_all(whole(EXPORT_EU).as_bytes()).await.unwrap();
    // One whose request waits 12 s on the upstream.
    let mut waiting = connect().await.unwrap();
    waiting
        .write_all(whole(EXPORT_NA).as_bytes())
        .await
        .unwrap();

    // And an HTTP/2 (h2c) connection: after its first request it is not subject to the idle
    // limit (HTTP/2 keeps itself alive with pings).
    let (mut h2, h2_conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(connect().await.unwrap()),
    )
    .await
    .unwrap();
    tokio::spawn(h2_conn);
    let h2_get = |h2: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>| {
        let req = Request::get(gw.url(EXPORT_EU))
            .header("authorization", auth.as_str())
            .body(Full::new(Bytes::new()))
            .unwrap();
        h2.send_request(req)
    };
    assert_eq!(h2_get(&mut h2).await.unwrap().status(), 200);

    let mut buf = vec![0u8; 64 * 1024];
    for conn in [&mut slow, &mut idle] {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    let answered = std::time::Instant::now();
    slow.write_all(format!("GET {EXPORT_EU} HTTP/1.1\r\nhost: gw\r\n").as_bytes())
        .await
        .unwrap();
    let trickle = async {
        for i in 0..30 {
            tokio::time::sleep(scaled(Duration::from_millis(500))).await;
            if slow
                .write_all(format!("x-slow-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(scaled(Duration::from_secs(16)), trickle).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the trickling connection is still open");
    let took = answered.elapsed();
    assert!(
        took >= scaled(Duration::from_secs(9)),
        "the trickling connection closed after {took:?}"
    );

    // By now (over 10 s after their last response or their accept) both are closed.
    let mut small = [0u8; 16];
    for (name, conn) in [("silent", &mut silent), ("idle", &mut idle)] {
        let end = tokio::time::timeout(Duration::from_secs(3), conn.read(&mut small)).await;
        assert!(
            matches!(end, Ok(Ok(0)) | Ok(Err(_))),
            "the {name} connection is still open after {:?}: {end:?}",
            started.elapsed()
        );
    }
    // The request waiting on the upstream was answered, past 10 s.
    let n = tokio::time::timeout(Duration::from_secs(10), waiting.read(&mut buf))
        .await
        .expect("the slow upstream's answer")
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert!(started.elapsed() >= scaled(Duration::from_secs(12)));
    // The HTTP/2 connection, idle for over 10 s, still serves.
    assert_eq!(h2_get(&mut h2).await.unwrap().status(), 200);
    assert_eq!(
        gw.eu.request_count(),
        4,
        "only whole requests went upstream"
    );
    assert_eq!(gw.na.request_count(), 1);
}

/// A cold burst to an HTTP/2 origin makes one connection: the first connect is awaited by the
/// others (TLS origins are assumed to speak h2 until ALPN says otherwise).
#[tokio::test(flavor = "multi_thread")]
async fn a_cold_burst_to_an_h2_upstream_opens_one_connection() {
    let (gw, _dir) = gateway_with_tls_eu(Faults::default()).await;
    for r in concurrent(&gw, 40, EXPORT_EU, &token("billing")).await {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(gw.eu.connections(), 1);
}

/// Convocore's load balancers rotate HTTP/2 connections with a graceful GOAWAY (here every 20
/// requests, 600 requests 30 at a time). Requests the
/// server did not process (above the GOAWAY's last stream, or refused) are sent again on a new
/// connection, so no caller sees a 502; and a rotation makes one new connection, not one per
/// waiting request.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_goaway_rotations_cost_no_request() {
    let (gw, _dir) = gateway_with_tls_eu(Faults {
        goaway_every: Some(20),
        ..Default::default()
    })
    .await;
    let token = token("billing");
    let mut failed = Vec::new();
    for _ in 0..20 {
        for r in concurrent(&gw, 30, EXPORT_EU, &token).await {
            if r.status != 200 {
                failed.push(format!("{} {}", r.status, r.text()));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 600 failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let connections = gw.eu.connections();
    assert!(
        connections <= 60,
        "{connections} connections for 600 requests rotated every 20"
    );
}
