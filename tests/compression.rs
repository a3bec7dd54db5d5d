#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Compression (the contract's "Conditional requests, revalidation, compression", third
//! sentence): `Accept-Encoding` with q-values selects one of `[cache] compress` for bodies of
//! 1 KiB or more; `Content-Encoding`, a weak `ETag`, and `Vary: Accept-Encoding` on every `200`
//! and `304`; each encoding made once, kept with the entry and counted in the cache's bytes;
//! never a `406`, and nothing of it reaches Convocore.

mod common;
use common::*;

use std::io::Read;

use http::Method;

/// Generated turns that make the mock's JSON export about 10 KiB.
const TURNS: usize = 40;

async fn gateway(compress: Option<&str>) -> Gateway {
    let mut cache = "enabled = true\n".to_string();
    if let Some(list) = compress {
        cache.push_str(&format!("compress = {list}\n"));
    }
    let gw = Gateway::start_with(TestConfig {
        cache,
        ..TestConfig::default()
    })
    .await;
    gw.eu.set_turns(TURNS);
    gw
}

async fn accepting(gw: &Gateway, accept_encoding: &str) -> Resp {
    gw.billing_export(Method::GET, &[("accept-encoding", accept_encoding)])
        .await
}

fn decode(coding: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        "zstd" => out = zstd::decode_all(data).unwrap(),
        "br" => {
            brotli::Decompressor::new(data, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        "gzip" => {
            flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap();
        }
        other => panic!("unexpected encoding {other}"),
    }
    out
}

fn cache_bytes(text: &str) -> f64 {
    metric(text, "convocore_gateway_cache_bytes")
}

#[tokio::test]
async fn each_encoding_decodes_to_the_identity_body_byte_for_byte() {
    let gw = gateway(None).await;
    let identity = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(identity.status, 200);
    assert!(identity.body.len() >= 8 * 1024, "{}", identity.body.len());
    assert!(identity.header("content-encoding").is_none());
    assert_eq!(identity.header("vary"), Some("accept-encoding"));
    let strong = identity.header("etag").unwrap().to_string();
    assert!(strong.starts_with('"'));

    for coding in ["zstd", "br", "gzip"] {
        let r = accepting(&gw, coding).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), Some(coding));
        assert_eq!(r.header("vary"), Some("accept-encoding"));
        assert_eq!(r.header("etag"), Some(format!("W/{strong}").as_str()));
        assert_eq!(
            r.header("content-length"),
            Some(r.body.len().to_string().as_str())
        );
        assert!(
            r.body.len() < identity.body.len() / 3,
            "{coding}: {}",
            r.body.len()
        );
        assert_eq!(decode(coding, &r.body), identity.body, "{coding}");
        // The same headers otherwise.
        for name in ["content-type", "last-modified", "x-convocore-region"] {
            assert_eq!(r.header(name), identity.header(name), "{name}");
        }
        assert_eq!(r.header("x-cache"), Some("HIT"));
    }
    // Convocore saw one plain request: no Accept-Encoding of the callers', nothing else.
    let seen = gw.eu.requests();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].headers.get("accept-encoding").is_none());
}

#[tokio::test]
async fn q_values_choose_and_ties_go_to_the_configured_order() {
    let gw = gateway(None).await; // zstd, br, gzip
    for (accept, want) in [
        ("gzip", Some("gzip")),
        ("gzip, br", Some("br")),
        ("gzip, br, zstd", Some("zstd")),
        ("gzip;q=1.0, br;q=0.5, zstd;q=0.1", Some("gzip")),
        ("br;q=0.8, gzip;q=0.8", Some("br")),
        ("*", Some("zstd")),
        ("*;q=0.3, gzip;q=0.5", Some("gzip")),
        ("*, zstd;q=0", Some("br")),
        ("x-gzip", Some("gzip")),
        ("GZIP;Q=0.5", Some("gzip")),
        // Identity preferred by a higher q, or nothing offered acceptable: the identity body,
        // never a 406.
        ("gzip;q=0.5, identity", None),
        ("deflate, compress", None),
        ("*;q=0", None),
        ("identity;q=0", None),
        ("gzip;q=0, identity;q=0", None),
        ("br;q=7", None),
        ("", None),
    ] {
        let r = accepting(&gw, accept).await;
        assert_eq!(r.status, 200, "{accept:?}");
        assert_eq!(r.header("content-encoding"), want, "{accept:?}");
        assert_eq!(r.header("vary"), Some("accept-encoding"), "{accept:?}");
    }

    let gw = gateway(Some(r#"["gzip", "zstd"]"#)).await;
    assert_eq!(
        accepting(&gw, "zstd, gzip")
            .await
            .header("content-encoding"),
        Some("gzip")
    );
    assert_eq!(
        accepting(&gw, "br").await.header("content-encoding"),
        None,
        "not offered"
    );
}

#[tokio::test]
async fn compress_empty_offers_nothing_and_says_no_vary() {
    let gw = gateway(Some("[]")).await;
    let r = accepting(&gw, "gzip, br, zstd").await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-encoding").is_none());
    assert!(r.header("vary").is_none());
    assert!(r.header("etag").unwrap().starts_with('"'));
    assert!(r.body.starts_with(b"{"));
}

#[tokio::test]
async fn small_bodies_are_sent_as_they_are() {
    let gw = gateway(None).await;
    gw.eu.set_turns(0);
    let r = accepting(&gw, "gzip").await;
    assert_eq!(r.status, 200);
    assert!(r.body.len() < 1024, "{}", r.body.len());
    assert!(r.header("content-encoding").is_none());
    assert_eq!(r.header("vary"), Some("accept-encoding"));
    assert!(r.header("etag").unwrap().starts_with('"'));
}

#[tokio::test]
async fn each_encoding_is_made_once_and_counted_in_the_cache_bytes() {
    let gw = gateway(None).await;
    let identity = gw.get(EXPORT_EU, &token("billing")).await;
    let before = cache_bytes(&metrics_text(&gw).await);
    let gzip = accepting(&gw, "gzip").await;
    let with_gzip = cache_bytes(&metrics_text(&gw).await);
    let grown = with_gzip - before;
    // The encoded body (as the allocator rounds it) and the slots it lives in.
    assert!(
        grown >= gzip.body.len() as f64 && grown <= gzip.body.len() as f64 + 1024.0,
        "grew {grown} for {} encoded bytes",
        gzip.body.len()
    );
    // Hits of that encoding compress nothing again: the same bytes, the same weight.
    for _ in 0..3 {
        let again = accepting(&gw, "gzip").await;
        assert_eq!(again.body, gzip.body);
        assert_eq!(again.header("x-cache"), Some("HIT"));
    }
    assert_eq!(cache_bytes(&metrics_text(&gw).await), with_gzip);
    // A second encoding adds its own bytes.
    let br = accepting(&gw, "br").await;
    let with_both = cache_bytes(&metrics_text(&gw).await);
    assert!(with_both - with_gzip >= br.body.len() as f64);
    assert_eq!(gw.eu.request_count(), 1);
    assert_eq!(decode("br", &br.body), identity.body);
}

#[tokio::test]
async fn conditional_requests_and_head_see_the_encoded_representation() {
    let gw = gateway(None).await;
    let gzip = accepting(&gw, "gzip").await;
    let weak = gzip.header("etag").unwrap().to_string();
    assert!(weak.starts_with("W/"));

    // The weak tag (or the strong one: the comparison is weak) gets a 304 that varies.
    for tag in [weak.clone(), weak.trim_start_matches("W/").to_string()] {
        let r = gw
            .billing_export(
                Method::GET,
                &[("accept-encoding", "gzip"), ("if-none-match", &tag)],
            )
            .await;
        assert_eq!(r.status, 304, "{tag}");
        assert!(r.body.is_empty());
        assert_eq!(r.header("etag"), Some(weak.as_str()));
        assert_eq!(r.header("vary"), Some("accept-encoding"));
        assert!(r.header("content-encoding").is_none());
    }
    // Without the encoding, the identity's strong tag.
    let r = gw
        .billing_export(Method::GET, &[("if-none-match", &weak)])
        .await;
    assert_eq!(r.status, 304);
    assert_eq!(r.header("etag"), Some(weak.trim_start_matches("W/")));

    // HEAD: the encoded GET's headers, its length, no body.
    let head = gw
        .billing_export(Method::HEAD, &[("accept-encoding", "gzip")])
        .await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-encoding"), Some("gzip"));
    assert_eq!(
        head.header("content-length"),
        Some(gzip.body.len().to_string().as_str())
    );
    assert_eq!(head.header("etag"), Some(weak.as_str()));
    assert_eq!(head.header("vary"), Some("accept-encoding"));
    assert_eq!(gw.eu.request_count(), 1);
}

#[tokio::test]
async fn uncached_answers_are_compressed_too() {
    // The cache off: every 200 is fetched, and still negotiated.
    let gw = Gateway::start().await;
    gw.eu.set_turns(TURNS);
    let identity = gw.get(EXPORT_EU, &token("billing")).await;
    let r = accepting(&gw, "zstd").await;
    assert_eq!(r.header("content-encoding"), Some("zstd"));
    assert_eq!(decode("zstd", &r.body), identity.body);
    // Errors are passed through as they came: no encoding, no Vary.
    let missing = {
        let bearer = format!("Bearer {}", token("billing"));
        gw.request(
            Method::GET,
            "/v3/agents/agent-eu/convos/nope/export",
            &[("authorization", &bearer), ("accept-encoding", "gzip")],
        )
        .await
    };
    assert_eq!(missing.status, 404);
    assert!(missing.header("content-encoding").is_none());
    assert!(missing.header("vary").is_none());
}

/// The same negotiation over HTTP/2 (h2c with prior knowledge): the encoded body and its
/// length arrive whole.
#[tokio::test]
async fn encoded_answers_over_http2() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    let gw = gateway(None).await;
    let identity = gw.get(EXPORT_EU, &token("billing")).await;
    let h2: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    for (method, coding) in [(Method::GET, "br"), (Method::HEAD, "zstd")] {
        let req = http::Request::builder()
            .method(method.clone())
            .uri(gw.url(EXPORT_EU))
            .header("authorization", format!("Bearer {}", token("billing")))
            .header("accept-encoding", coding)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = h2.request(req).await.unwrap();
        assert_eq!(r.version(), http::Version::HTTP_2);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-encoding"], coding);
        assert_eq!(r.headers()["vary"], "accept-encoding");
        let length: usize = r.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body = r.into_body().collect().await.unwrap().to_bytes();
        if method == Method::HEAD {
            assert!(body.is_empty());
            assert!(length > 0 && length < identity.body.len());
        } else {
            assert_eq!(body.len(), length);
            assert_eq!(decode(coding, &body), identity.body);
        }
    }
}
