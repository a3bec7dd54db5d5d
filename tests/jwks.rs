#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `jwks_url` keys and the verified-token cache (issue 5), per CONTRACT.md (`[[auth.keys]]`
//! `jwks_url` / `refresh` / `max_stale`, `/readyz`, the JWKS metrics): a loopback HTTPS JWKS
//! server with a test CA, whose document, failures, delay and request count the tests control,
//! stands in for the identity provider. Each test asserts what the caller got and what the
//! JWKS server saw.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

// ---------------------------------------------------------------------------------------------
// The JWKS server
// ---------------------------------------------------------------------------------------------

/// How the JWKS server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// 200 with the current document.
    Serve,
    /// 500 with a small body.
    Error500,
    /// Drops the exchange without an answer (HTTP/1.1: the connection is closed; h2: the
    /// stream is reset).
    Close,
}

struct JwksState {
    doc: Mutex<String>,
    mode: Mutex<Mode>,
    delay: Mutex<Duration>,
    requests: AtomicUsize,
    paths: Mutex<Vec<String>>,
}

/// A loopback HTTPS JWKS server with a `localhost` certificate signed by its own test CA.
struct JwksServer {
    port: u16,
    state: Arc<JwksState>,
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(doc: &Value) -> JwksServer {
        let (ca_pem, cert_pem, key_pem) = test_pki();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("test-ca.pem");
        std::fs::write(&ca_file, &ca_pem).unwrap();

        let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .unwrap()
            .unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(JwksState {
            doc: Mutex::new(doc.to_string()),
            mode: Mutex::new(Mode::Serve),
            delay: Mutex::new(Duration::ZERO),
            requests: AtomicUsize::new(0),
            paths: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(serve_jwks(listener, acceptor, state.clone()));
        JwksServer {
            port,
            state,
            ca_file,
            _dir: dir,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}/jwks.json", self.port)
    }

    /// A gateway config whose only key source is this server, trusting its CA.
    fn config(&self, refresh: &str, max_stale: &str) -> TestConfig {
        TestConfig {
            keys: format!(
                "[[auth.keys]]\njwks_url = \"{}\"\nrefresh = \"{refresh}\"\nmax_stale = \"{max_stale}\"\n",
                self.url()
            ),
            upstream: self.upstream(),
            ..TestConfig::default()
        }
    }

    /// `[upstream]` lines making the gateway trust this server's CA.
    fn upstream(&self) -> String {
        format!("ca_file = \"{}\"\n", self.ca_file.display())
    }

    fn set_doc(&self, doc: &Value) {
        *self.state.doc.lock().unwrap() = doc.to_string();
    }

    fn set_raw(&self, body: &str) {
        *self.state.doc.lock().unwrap() = body.to_string();
    }

    fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    /// Requests received so far (counted on arrival, before any delay).
    fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    fn paths(&self) -> Vec<String> {
        self.state.paths.lock().unwrap().clone()
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_jwks(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<JwksState>,
) {
    convocore_gateway::testing::mock::serve_http(
        listener,
        Some(acceptor),
        move |req| answer_jwks(state.clone(), req),
        || {},
        None,
        || None,
    )
    .await
}

async fn answer_jwks(
    state: Arc<JwksState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    state
        .paths
        .lock()
        .unwrap()
        .push(req.uri().path().to_string());
    let delay = *state.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mode = *state.mode.lock().unwrap();
    match mode {
        Mode::Close => Err(std::io::Error::other("the test closes this exchange")),
        Mode::Error500 => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"idp down")));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            Ok(r)
        }
        Mode::Serve if req.uri().path() != "/jwks.json" => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"not found")));
            *r.status_mut() = StatusCode::NOT_FOUND;
            Ok(r)
        }
        Mode::Serve => {
            let doc = state.doc.lock().unwrap().clone();
            let mut r = Response::new(Full::new(Bytes::from(doc)));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/jwk-set+json"),
            );
            Ok(r)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Documents, tokens, probes
// ---------------------------------------------------------------------------------------------

/// The fixture JWKS: rsa-1 RS256, ec-1 ES256, ec384-1 ES384, ed-1 EdDSA.
fn fixture_jwks() -> Value {
    serde_json::from_slice(&fixture_bytes("jwks.json")).unwrap()
}

/// The fixture JWK named `kid`.
fn fixture_jwk(kid: &str) -> Value {
    fixture_jwks()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .unwrap_or_else(|| panic!("no fixture JWK {kid}"))
        .clone()
}

/// A JWKS document holding `keys`.
fn jwks_of(keys: &[Value]) -> Value {
    json!({ "keys": keys })
}

/// The fixture JWKS restricted to `kids`.
fn jwks_with(kids: &[&str]) -> Value {
    jwks_of(&kids.iter().map(|k| fixture_jwk(k)).collect::<Vec<_>>())
}

fn rsa2_private() -> EncodingKey {
    EncodingKey::from_rsa_pem(&fixture_bytes("rsa2_private.pem")).unwrap()
}

/// The public JWK of `rsa2_private.pem` (a key the fixture JWKS does not hold), kid `rsa-2`.
fn rsa2_jwk() -> Value {
    let mut jwk = Jwk::from_encoding_key(&rsa2_private(), Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("rsa-2".to_string());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    let value = serde_json::to_value(&jwk).unwrap();
    // The JWK carries the public half only, and it is the key in rsa2_public.pem.
    assert!(value.get("d").is_none(), "{value}");
    let from_jwk = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
    let from_pem =
        jsonwebtoken::DecodingKey::from_rsa_pem(&fixture_bytes("rsa2_public.pem")).unwrap();
    let probe = sign_with(
        Algorithm::RS256,
        Some("rsa-2"),
        &rsa2_private(),
        &fresh("x"),
    );
    let mut validation = jsonwebtoken::Validation::new(Algorithm::RS256);
    validation.set_audience(&[AUDIENCE]);
    for key in [&from_jwk, &from_pem] {
        jsonwebtoken::decode::<Value>(&probe, key, &validation).unwrap();
    }
    value
}

/// Valid claims for `team` with a fresh `jti`, so the token string is new (never a
/// verified-token cache hit).
fn fresh(team: &str) -> Value {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut c = claims(team);
    c["jti"] = json!(format!(
        "jti-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    c
}

fn sign_with(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// A fresh RS256 token signed with the fixture rsa-1 key.
fn rsa1_token() -> String {
    mint(Algorithm::RS256, Some("rsa-1"), &fresh("billing"))
}

/// A fresh RS256 token signed with the rsa-2 key, kid `rsa-2`.
fn rsa2_token() -> String {
    sign_with(
        Algorithm::RS256,
        Some("rsa-2"),
        &rsa2_private(),
        &fresh("billing"),
    )
}

async fn ready(gw: &Gateway) -> bool {
    gw.admin(Method::GET, "/readyz", &[]).await.status == StatusCode::OK
}

async fn wait_ready(gw: &Gateway) {
    assert!(
        eventually(Duration::from_secs(10), || ready(gw)).await,
        "the gateway never became ready"
    );
}

const FETCH_OK: &str = "convocore_gateway_jwks_fetches_total{result=\"ok\"}";
const FETCH_ERROR: &str = "convocore_gateway_jwks_fetches_total{result=\"error\"}";
const LAST_SUCCESS: &str = "convocore_gateway_jwks_last_success_timestamp_seconds";

fn auth_failures(reason: &str) -> String {
    format!("convocore_gateway_auth_failures_total{{reason=\"{reason}\"}}")
}

/// A gateway-made 401 with the contract's shape and `WWW-Authenticate: Bearer`.
/// A token whose keys are past `max_stale`: `503 SERVICE_UNAVAILABLE` with `Retry-After`.
fn assert_stale_503(r: &Resp, what: &str) {
    r.assert_error(503, "SERVICE_UNAVAILABLE");
    let retry: u64 = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("{what}: no Retry-After: {:?}", r.headers))
        .parse()
        .unwrap();
    assert!(retry >= 1, "{what}: Retry-After {retry}");
    assert!(r.header("www-authenticate").is_none(), "{what}: not a 401");
}

fn assert_401(r: &Resp, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.text());
    r.assert_error(401, "UNAUTHORIZED");
    assert!(
        r.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")),
        "{what}: {:?}",
        r.headers
    );
}

fn assert_200(r: &Resp, what: &str) {
    assert_eq!(r.status, 200, "{what}: {}", r.text());
}

/// The process's resident set size in bytes (Linux).
fn vm_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/self/status");
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

/// Atomically replaces `path` (write a sibling, then rename over it).
fn replace_file(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// 1. The first fetch, before ready
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn first_fetch_completes_before_ready() {
    let idp = JwksServer::start(&fixture_jwks()).await;
    idp.set_delay(Duration::from_millis(1500));
    let gw = Gateway::start_with(idp.config("1h", "1h")).await;

    // The listeners are bound, the first fetch is under way (the IdP answers after ~1.5 s).
    let r = gw.admin(Method::GET, "/readyz", &[]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    r.assert_error(503, "SERVICE_UNAVAILABLE");
    let text = metrics_text(&gw).await;
    assert_eq!(metric(&text, FETCH_OK), 0.0, "{text}");
    assert_eq!(metric(&text, LAST_SUCCESS), 0.0, "{text}");

    // A token sent while that fetch is in flight joins it rather than starting another one:
    // it is answered once the keys are there.
    assert!(eventually(Duration::from_secs(5), || async { idp.requests() >= 1 }).await);
    let t = rsa1_token();
    let r = gw.get(EXPORT_EU, &t).await;
    assert_200(&r, "a token sent during the first fetch");

    wait_ready(&gw).await;
    assert_200(&gw.get(EXPORT_EU, &t).await, "the same token once ready");
    assert_200(
        &gw.get(EXPORT_EU, &rsa1_token()).await,
        "a new token once ready",
    );
    // One fetch in all: the startup fetch (refresh is 1h).
    assert_eq!(idp.requests(), 1, "{:?}", idp.paths());
    assert_eq!(idp.paths(), vec!["/jwks.json".to_string()]);

    let text = metrics_text(&gw).await;
    assert!(metric(&text, FETCH_OK) >= 1.0, "{text}");
    assert_eq!(metric(&text, FETCH_ERROR), 0.0, "{text}");
    let last = metric(&text, LAST_SUCCESS);
    assert!(last > 0.0, "{text}");
    assert!(
        (last - now() as f64).abs() < 120.0,
        "last success {last} is not about now ({})",
        now()
    );
}

#[tokio::test]
async fn until_the_first_fetch_succeeds_tokens_are_401_and_the_gateway_is_not_ready() {
    let idp = JwksServer::start(&fixture_jwks()).await;
    idp.set_mode(Mode::Error500);
    let gw = Gateway::start_with(idp.config("1h", "1h")).await;

    // The first fetch failed: no keys, not ready, every token refused.
    assert!(eventually(Duration::from_secs(5), || async { idp.requests() >= 1 }).await);
    assert!(!ready(&gw).await);
    let t = rsa1_token();
    assert_401(&gw.get(EXPORT_EU, &t).await, "keys not loaded yet");
    assert_401(
        &gw.get(
            EXPORT_EU,
            &mint(Algorithm::ES256, Some("ec-1"), &fresh("billing")),
        )
        .await,
        "keys not loaded yet (ES256)",
    );
    assert_eq!(gw.upstream_count(), 0);
    assert!(!ready(&gw).await);
    let text = metrics_text(&gw).await;
    assert!(metric(&text, FETCH_ERROR) >= 1.0, "{text}");
    assert_eq!(metric(&text, FETCH_OK), 0.0, "{text}");
    assert_eq!(metric(&text, LAST_SUCCESS), 0.0, "{text}");

    // The IdP recovers: the background retries fetch the keys, the gateway turns ready, and
    // the very token refused before now verifies.
    idp.set_mode(Mode::Serve);
    wait_ready(&gw).await;
    assert_200(
        &gw.get(EXPORT_EU, &t).await,
        "the same token after recovery",
    );
    let text = metrics_text(&gw).await;
    assert!(metric(&text, FETCH_OK) >= 1.0, "{text}");
    assert!(metric(&text, LAST_SUCCESS) > 0.0, "{text}");
}

#[tokio::test]
async fn an_untrusted_jwks_certificate_never_loads_keys() {
    // Without upstream.ca_file the test CA is not trusted: the TLS handshake fails, so the
    // server never sees a request, and the gateway stays unready.
    let idp = JwksServer::start(&fixture_jwks()).await;
    let config = TestConfig {
        upstream: String::new(),
        ..idp.config("1h", "1h")
    };
    let gw = Gateway::start_with(config).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric(&metrics_text(&gw).await, FETCH_ERROR) >= 1.0
        })
        .await
    );
    assert!(!ready(&gw).await);
    assert_401(
        &gw.get(EXPORT_EU, &rsa1_token()).await,
        "keys from an untrusted server",
    );
    assert_eq!(idp.requests(), 0);
    assert_eq!(metric(&metrics_text(&gw).await, FETCH_OK), 0.0);
}

// ---------------------------------------------------------------------------------------------
// 2. Key types
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rsa_ec_and_ed25519_jwks_keys_verify() {
    // The fixture keys, plus keys that must be skipped with a warning rather than fail the set.
    let mut keys: Vec<Value> = fixture_jwks()["keys"].as_array().unwrap().clone();
    // An unknown key type.
    keys.push(json!({ "kty": "XYZ", "kid": "weird", "alg": "RS256", "crv": "nope" }));
    // An encryption key (use = enc) with rsa-1's material.
    let mut enc = fixture_jwk("rsa-1");
    enc["kid"] = json!("rsa-enc");
    enc["use"] = json!("enc");
    keys.push(enc);
    // A key without alg (and no algorithm in the config): it has no single algorithm.
    let mut no_alg = fixture_jwk("ec-1");
    no_alg["kid"] = json!("ec-noalg");
    no_alg.as_object_mut().unwrap().remove("alg");
    keys.push(no_alg);
    // An HMAC key shorter than its hash (RFC 8725).
    keys.push(json!({
        "kty": "oct", "kid": "hs-short", "alg": "HS256", "use": "sig",
        "k": URL_SAFE_NO_PAD.encode(b"short-secret"),
    }));
    let idp = JwksServer::start(&jwks_of(&keys)).await;
    let gw = Gateway::start_with(idp.config("1h", "1h")).await;
    wait_ready(&gw).await;

    for (alg, kid) in [
        (Algorithm::RS256, "rsa-1"),
        (Algorithm::ES256, "ec-1"),
        (Algorithm::ES384, "ec384-1"),
        (Algorithm::EdDSA, "ed-1"),
    ] {
        let t = mint(alg, Some(kid), &fresh("billing"));
        let r = gw.get(EXPORT_EU, &t).await;
        assert_200(&r, &format!("{alg:?} {kid}"));
        assert_eq!(r.header("x-convocore-region"), Some("eu"));
        // And once more (a verified-token cache hit).
        assert_200(
            &gw.get(EXPORT_EU, &t).await,
            &format!("{alg:?} {kid} again"),
        );
    }
    // A kid-less token is tried against every key of its alg.
    assert_200(
        &gw.get(EXPORT_EU, &mint(Algorithm::ES384, None, &fresh("billing")))
            .await,
        "ES384 without kid",
    );

    // A key's alg is honoured: rsa-1 is RS256, so a PS256 token naming it is refused, and so
    // is an ES256 token naming the ES384 key.
    assert_401(
        &gw.get(
            EXPORT_EU,
            &mint(Algorithm::PS256, Some("rsa-1"), &fresh("billing")),
        )
        .await,
        "PS256 with the RS256 key",
    );
    assert_401(
        &gw.get(
            EXPORT_EU,
            &mint(Algorithm::ES256, Some("ec384-1"), &fresh("billing")),
        )
        .await,
        "ES256 naming the ES384 key",
    );
    // Its use too: the enc key does not verify, though it is rsa-1's material.
    assert_401(
        &gw.get(
            EXPORT_EU,
            &mint(Algorithm::RS256, Some("rsa-enc"), &fresh("billing")),
        )
        .await,
        "use = enc",
    );
    assert_401(
        &gw.get(
            EXPORT_EU,
            &mint(Algorithm::ES256, Some("ec-noalg"), &fresh("billing")),
        )
        .await,
        "a JWK without alg",
    );
    let short = sign_with(
        Algorithm::HS256,
        Some("hs-short"),
        &EncodingKey::from_secret(b"short-secret"),
        &fresh("billing"),
    );
    assert_401(&gw.get(EXPORT_EU, &short).await, "a short HMAC JWK");

    assert_eq!(gw.eu.request_count(), 9);
    assert!(ready(&gw).await);
    // Every request the gateway made went to the configured path; the unknown kids above
    // caused one early refetch at most.
    assert!(idp.requests() <= 2, "{:?}", idp.paths());
    assert!(idp.paths().iter().all(|p| p == "/jwks.json"));
}

#[tokio::test]
async fn a_configured_algorithm_pins_every_jwks_key() {
    let idp = JwksServer::start(&fixture_jwks()).await;
    let mut config = idp.config("1h", "1h");
    config.keys.push_str("algorithm = \"ES256\"\n");
    let gw = Gateway::start_with(config).await;
    wait_ready(&gw).await;
    assert_200(
        &gw.get(
            EXPORT_EU,
            &mint(Algorithm::ES256, Some("ec-1"), &fresh("billing")),
        )
        .await,
        "ES256",
    );
    for (alg, kid) in [
        (Algorithm::RS256, "rsa-1"),
        (Algorithm::ES384, "ec384-1"),
        (Algorithm::EdDSA, "ed-1"),
    ] {
        assert_401(
            &gw.get(EXPORT_EU, &mint(alg, Some(kid), &fresh("billing")))
                .await,
            &format!("{alg:?} when ES256 is pinned"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Rotation
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_unknown_kid_refetches_at_once_and_picks_up_a_rotated_in_key() {
    let idp = JwksServer::start(&jwks_with(&["rsa-1"])).await;
    let gw = Gateway::start_with(idp.config("1h", "24h")).await;
    wait_ready(&gw).await;
    assert_eq!(idp.requests(), 1);
    assert_200(&gw.get(EXPORT_EU, &rsa1_token()).await, "rsa-1");
    assert_eq!(idp.requests(), 1, "a known kid fetches nothing");

    // The IdP rotates rsa-2 in; the first token naming it makes the gateway refetch at once,
    // and that very request verifies.
    idp.set_doc(&jwks_of(&[fixture_jwk("rsa-1"), rsa2_jwk()]));
    let r = gw.get(EXPORT_EU, &rsa2_token()).await;
    assert_200(&r, "the first rsa-2 token");
    assert_eq!(idp.requests(), 2, "exactly one early refetch");

    // From now on rsa-2 is known: no more fetches; rsa-1 still works.
    assert_200(
        &gw.get(EXPORT_EU, &rsa2_token()).await,
        "another rsa-2 token",
    );
    assert_200(
        &gw.get(EXPORT_EU, &rsa1_token()).await,
        "rsa-1 after rotation",
    );
    assert_eq!(idp.requests(), 2);

    // Another unknown kid within 30 s: refused without another fetch.
    let rsa3 = sign_with(
        Algorithm::RS256,
        Some("rsa-3"),
        &rsa2_private(),
        &fresh("billing"),
    );
    assert_401(&gw.get(EXPORT_EU, &rsa3).await, "rsa-3");
    assert_eq!(idp.requests(), 2, "the early refetch is rate-limited");

    let text = metrics_text(&gw).await;
    assert_eq!(metric(&text, FETCH_OK), 2.0, "{text}");
    assert_eq!(metric(&text, FETCH_ERROR), 0.0, "{text}");
}

#[tokio::test]
async fn a_removed_key_stops_verifying_even_tokens_it_verified_before() {
    let idp = JwksServer::start(&jwks_with(&["rsa-1", "ec-1"])).await;
    let gw = Gateway::start_with(idp.config("500ms", "1h")).await;
    wait_ready(&gw).await;

    // One token string per key, verified (and so cached) before the removal.
    let rsa = rsa1_token();
    let ec = mint(Algorithm::ES256, Some("ec-1"), &fresh("billing"));
    for _ in 0..2 {
        assert_200(&gw.get(EXPORT_EU, &rsa).await, "rsa-1 before removal");
        assert_200(&gw.get(EXPORT_EU, &ec).await, "ec-1 before removal");
    }

    // The IdP drops rsa-1; the next refresh picks that up.
    idp.set_doc(&jwks_with(&["ec-1"]));
    let before = idp.requests();
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.get(EXPORT_EU, &rsa).await.status == 401
        })
        .await,
        "the cached rsa-1 token still verifies after rsa-1 was removed"
    );
    assert!(idp.requests() > before);
    let r = gw.get(EXPORT_EU, &rsa).await;
    assert_401(&r, "the cached rsa-1 token after removal");
    assert_401(
        &gw.get(EXPORT_EU, &rsa1_token()).await,
        "a new rsa-1 token after removal",
    );
    // The key that stayed keeps working, for the token seen before and for new ones.
    assert_200(&gw.get(EXPORT_EU, &ec).await, "ec-1 after removal");
    assert_200(
        &gw.get(
            EXPORT_EU,
            &mint(Algorithm::ES256, Some("ec-1"), &fresh("billing")),
        )
        .await,
        "a new ec-1 token after removal",
    );
    assert!(ready(&gw).await);
}

// ---------------------------------------------------------------------------------------------
// 4. A flood of unknown kids
// ---------------------------------------------------------------------------------------------

/// Sends `n` tokens with random unknown kids at once; returns their statuses.
async fn unknown_kid_flood(gw: &Arc<Gateway>, n: usize) -> Vec<u16> {
    let mut set = JoinSet::new();
    for _ in 0..n {
        let gw = gw.clone();
        set.spawn(async move {
            let mut random = [0u8; 12];
            aws_lc_rs::rand::fill(&mut random).unwrap();
            let kid = format!("kid-{}", URL_SAFE_NO_PAD.encode(random));
            let t = mint(Algorithm::RS256, Some(&kid), &fresh("billing"));
            let r = gw.get(EXPORT_EU, &t).await;
            if r.status != 401 {
                panic!("unknown kid {kid}: {} {}", r.status, r.text());
            }
            r.assert_error(401, "UNAUTHORIZED");
            r.status.as_u16()
        });
    }
    let mut statuses = Vec::new();
    while let Some(s) = set.join_next().await {
        statuses.push(s.unwrap());
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_unknown_kids_costs_the_idp_one_fetch() {
    let idp = JwksServer::start(&fixture_jwks()).await;
    let gw = Arc::new(Gateway::start_with(idp.config("1h", "24h")).await);
    wait_ready(&gw).await;
    assert_eq!(idp.requests(), 1);
    // A slow IdP, so the flood's requests pile up while the one early refetch is in flight.
    idp.set_delay(Duration::from_millis(300));

    let statuses = unknown_kid_flood(&gw, 50).await;
    assert_eq!(statuses.len(), 50);
    assert!(statuses.iter().all(|s| *s == 401));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        idp.requests(),
        2,
        "50 unknown kids must cause exactly one early refetch"
    );

    // A second flood right after: rate-limited, nothing reaches the IdP.
    let statuses = unknown_kid_flood(&gw, 50).await;
    assert!(statuses.iter().all(|s| *s == 401));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(idp.requests(), 2, "the second flood reached the IdP");

    // Known keys were never affected, and nothing reached upstream for the flood.
    assert_eq!(gw.upstream_count(), 0);
    assert_200(
        &gw.get(EXPORT_EU, &rsa1_token()).await,
        "rsa-1 after the floods",
    );
    let text = metrics_text(&gw).await;
    assert_eq!(
        metric(&text, &auth_failures("unknown_key")),
        100.0,
        "{text}"
    );
    assert_eq!(metric(&text, FETCH_OK), 2.0, "{text}");
    assert!(ready(&gw).await);
}

// ---------------------------------------------------------------------------------------------
// 5 and 6. IdP outages
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_outage_shorter_than_max_stale_keeps_tokens_working() {
    let idp = JwksServer::start(&fixture_jwks()).await;
    let gw = Gateway::start_with(idp.config("300ms", "4s")).await;
    wait_ready(&gw).await;
    let cached = rsa1_token();
    assert_200(&gw.get(EXPORT_EU, &cached).await, "before the outage");

    // ~1.2 s of outage: first 500s, then dropped connections.
    let before = idp.requests();
    for (i, mode) in std::iter::repeat_n(Mode::Error500, 6)
        .chain(std::iter::repeat_n(Mode::Close, 6))
        .enumerate()
    {
        idp.set_mode(mode);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_200(
            &gw.get(EXPORT_EU, &rsa1_token()).await,
            &format!("a new token during the outage ({i}, {mode:?})"),
        );
        assert_200(
            &gw.get(
                EXPORT_EU,
                &mint(Algorithm::EdDSA, Some("ed-1"), &fresh("billing")),
            )
            .await,
            &format!("a new EdDSA token during the outage ({i}, {mode:?})"),
        );
        assert_200(
            &gw.get(EXPORT_EU, &cached).await,
            "the token verified before the outage",
        );
        assert!(ready(&gw).await, "not ready {i} steps into the outage");
    }
    // The gateway kept trying, and counted the failures.
    assert!(idp.requests() > before, "no fetch during the outage");
    let text = metrics_text(&gw).await;
    assert!(metric(&text, FETCH_ERROR) >= 1.0, "{text}");

    idp.set_mode(Mode::Serve);
    assert!(ready(&gw).await);
}

/// Outage past `max_stale`, then recovery, with the IdP failing in `mode`.
async fn outage_longer_than_max_stale(mode: Mode) {
    let idp = JwksServer::start(&fixture_jwks()).await;
    let gw = Gateway::start_with(idp.config("300ms", "1500ms")).await;
    wait_ready(&gw).await;
    let cached = rsa1_token();
    assert_200(&gw.get(EXPORT_EU, &cached).await, "before the outage");
    assert_200(
        &gw.get(EXPORT_EU, &cached).await,
        "before the outage, again",
    );
    let ok_before = metric(&metrics_text(&gw).await, LAST_SUCCESS);
    assert!(ok_before > 0.0);

    idp.set_mode(mode);
    assert!(
        eventually(Duration::from_secs(6), || async { !ready(&gw).await }).await,
        "{mode:?}: still ready after max_stale"
    );
    // Past max_stale the stale keys stop verifying: new tokens, and the token verified before.
    // The caller is not at fault: 503 with Retry-After, as the contract says, not 401.
    assert_stale_503(
        &gw.get(EXPORT_EU, &rsa1_token()).await,
        "a new token past max_stale",
    );
    assert_stale_503(
        &gw.get(EXPORT_EU, &cached).await,
        "the cached token past max_stale",
    );
    assert_stale_503(
        &gw.get(
            EXPORT_EU,
            &mint(Algorithm::ES256, Some("ec-1"), &fresh("billing")),
        )
        .await,
        "an ES256 token past max_stale",
    );
    // A kid the key set never had is still the caller's fault.
    assert_401(
        &gw.get(EXPORT_EU, &rsa2_token()).await,
        "an unknown kid past max_stale",
    );
    assert_eq!(gw.eu.request_count(), 2);
    let text = metrics_text(&gw).await;
    assert!(metric(&text, FETCH_ERROR) >= 1.0, "{text}");
    // The last success is the last success: the failures do not move it.
    assert_eq!(metric(&text, LAST_SUCCESS), ok_before, "{text}");

    // The IdP recovers: the retries pick it up, and everything works again.
    idp.set_mode(Mode::Serve);
    wait_ready(&gw).await;
    assert_200(
        &gw.get(EXPORT_EU, &cached).await,
        "the old token after recovery",
    );
    assert_200(
        &gw.get(EXPORT_EU, &rsa1_token()).await,
        "a new token after recovery",
    );
    let text = metrics_text(&gw).await;
    assert!(metric(&text, LAST_SUCCESS) >= ok_before, "{text}");
}

#[tokio::test]
async fn an_outage_longer_than_max_stale_fails_tokens_and_readiness_until_recovery() {
    outage_longer_than_max_stale(Mode::Error500).await;
}

#[tokio::test]
async fn an_outage_of_dropped_connections_longer_than_max_stale_fails_tokens_until_recovery() {
    outage_longer_than_max_stale(Mode::Close).await;
}

#[tokio::test]
async fn a_bad_jwks_document_is_a_failed_fetch_and_keeps_the_last_good_set() {
    let idp = JwksServer::start(&fixture_jwks()).await;
    let gw = Gateway::start_with(idp.config("300ms", "1h")).await;
    wait_ready(&gw).await;
    let cached = rsa1_token();
    assert_200(&gw.get(EXPORT_EU, &cached).await, "before");

    let huge = json!({
        "keys": fixture_jwks()["keys"].clone(),
        "padding": "x".repeat(1_100_000),
    })
    .to_string();
    let unsupported_only = json!({ "keys": [{ "kty": "XYZ", "kid": "weird" }] }).to_string();
    for (what, body) in [
        ("not JSON", "<html>maintenance</html>"),
        ("no keys member", "{}"),
        ("an empty key set", r#"{"keys":[]}"#),
        ("only unsupported keys", unsupported_only.as_str()),
        ("a document over 1 MiB", huge.as_str()),
    ] {
        let errors = metric(&metrics_text(&gw).await, FETCH_ERROR);
        idp.set_raw(body);
        assert!(
            eventually(Duration::from_secs(5), || async {
                metric(&metrics_text(&gw).await, FETCH_ERROR) > errors
            })
            .await,
            "{what}: not counted as a failed fetch"
        );
        // The last good set stays: every fixture key still verifies, the gateway stays ready.
        assert_200(&gw.get(EXPORT_EU, &cached).await, what);
        assert_200(&gw.get(EXPORT_EU, &rsa1_token()).await, what);
        assert_200(
            &gw.get(
                EXPORT_EU,
                &mint(Algorithm::ES384, Some("ec384-1"), &fresh("billing")),
            )
            .await,
            what,
        );
        assert!(ready(&gw).await, "{what}: not ready");
    }
}

#[tokio::test]
async fn max_stale_shorter_than_refresh_never_drops_keys_while_the_idp_is_up() {
    let idp = JwksServer::start(&fixture_jwks()).await;
    let config = idp.config("4s", "1s");
    // Rejecting the combination at start-up would be as good as honouring it.
    let text = config.render(
        "https://eu.example.internal/v3",
        "https://na.example.internal/v3",
        Path::new("/nonexistent/convocore-token"),
    );
    if let Err(e) = convocore_gateway::Config::parse(&text, Path::new("t.toml")) {
        assert!(e.key.starts_with("auth.keys[0]"), "{e}");
        return;
    }
    let gw = Gateway::start_with(config).await;
    wait_ready(&gw).await;
    assert_eq!(idp.requests(), 1);
    // The IdP is up and nothing failed; 2 s after the fetch (past max_stale, before the next
    // refresh), the keys must still verify and the gateway must still be ready.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(ready(&gw).await, "not ready although no fetch failed");
    assert_200(&gw.get(EXPORT_EU, &rsa1_token()).await, "a token");
    let text = metrics_text(&gw).await;
    assert_eq!(metric(&text, FETCH_ERROR), 0.0, "{text}");
}

// ---------------------------------------------------------------------------------------------
// RFC 8725: a token's own URLs are never fetched
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_tokens_jku_x5u_and_kid_are_never_fetched() {
    let idp = JwksServer::start(&jwks_with(&["rsa-1"])).await;
    // The attacker's server serves the attacker's key.
    let evil = JwksServer::start(&jwks_of(&[rsa2_jwk()])).await;
    let config = TestConfig {
        // Trust the attacker's CA too, so only the gateway's policy stands in the way.
        upstream: format!("ca_file = \"{}\"\n", write_bundle(&idp, &evil).display()),
        ..idp.config("1h", "24h")
    };
    let gw = Gateway::start_with(config).await;
    wait_ready(&gw).await;

    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-2".into());
    header.jku = Some(evil.url());
    header.x5u = Some(evil.url());
    let t = jsonwebtoken::encode(&header, &fresh("billing"), &rsa2_private()).unwrap();
    assert_401(&gw.get(EXPORT_EU, &t).await, "jku/x5u");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(evil.url());
    let t = jsonwebtoken::encode(&header, &fresh("billing"), &rsa2_private()).unwrap();
    assert_401(&gw.get(EXPORT_EU, &t).await, "a URL as kid");

    assert_eq!(evil.requests(), 0, "the gateway fetched a URL from a token");
    // The unknown kid made one early refetch, of the configured URL only.
    assert_eq!(idp.requests(), 2);
    assert!(idp.paths().iter().all(|p| p == "/jwks.json"));
}

/// Both servers' CAs in one PEM bundle (in the first server's temp dir).
fn write_bundle(a: &JwksServer, b: &JwksServer) -> PathBuf {
    let mut pem = std::fs::read(&a.ca_file).unwrap();
    pem.extend(std::fs::read(&b.ca_file).unwrap());
    let path = a.ca_file.with_file_name("bundle.pem");
    std::fs::write(&path, pem).unwrap();
    path
}

// ---------------------------------------------------------------------------------------------
// 7, 8, 9. The verified-token cache
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_cached_token_is_refused_once_its_exp_passes() {
    // leeway 0, so exp itself is the limit.
    let gw = Gateway::start_with(TestConfig {
        auth: "leeway = \"0s\"".into(),
        ..Default::default()
    })
    .await;
    let mut c = fresh("billing");
    let exp = now() + 3;
    c["exp"] = json!(exp);
    let t = mint(Algorithm::RS256, Some("rsa-1"), &c);
    assert_200(&gw.get(EXPORT_EU, &t).await, "before exp");
    assert_200(&gw.get(EXPORT_EU, &t).await, "before exp, again (cached)");

    // Wait until exp has passed (at most ~4 s), then the cached token is refused.
    while now() <= exp {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = gw.get(EXPORT_EU, &t).await;
    assert_401(&r, "after exp");
    assert_eq!(r.json()["message"], "token expired", "{}", r.text());
}

#[tokio::test]
async fn a_cached_token_is_refused_once_exp_plus_leeway_passes() {
    // The harness's leeway is 30 s: a token whose exp was 27 s ago is still accepted, for
    // about 3 more seconds.
    let gw = Gateway::start().await;
    let mut c = fresh("billing");
    let exp = now() - 27;
    c["exp"] = json!(exp);
    let t = mint(Algorithm::RS256, Some("rsa-1"), &c);
    assert_200(&gw.get(EXPORT_EU, &t).await, "within the leeway");
    assert_200(&gw.get(EXPORT_EU, &t).await, "within the leeway, again");
    while now() <= exp + 30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = gw.get(EXPORT_EU, &t).await;
    assert_401(&r, "past exp + leeway");
    assert_eq!(r.json()["message"], "token expired", "{}", r.text());
    assert_eq!(gw.eu.request_count(), 2);
    let text = metrics_text(&gw).await;
    assert_eq!(metric(&text, &auth_failures("expired")), 1.0, "{text}");
}

#[tokio::test]
async fn a_rotated_out_public_key_stops_verifying_cached_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("idp.pem");
    std::fs::write(&pem, fixture_bytes("rsa_public.pem")).unwrap();
    let gw = Gateway::start_with(TestConfig {
        keys: format!(
            "[[auth.keys]]\nkid = \"rsa-1\"\nalgorithm = \"RS256\"\npublic_key_file = \"{}\"\n",
            pem.display()
        ),
        ..TestConfig::default()
    })
    .await;
    wait_ready(&gw).await;
    let old = rsa1_token();
    assert_200(&gw.get(EXPORT_EU, &old).await, "old key");
    assert_200(&gw.get(EXPORT_EU, &old).await, "old key, cached");

    // The operator swaps in the new key under the same kid.
    replace_file(&pem, &fixture_bytes("rsa2_public.pem"));
    let new = sign_with(
        Algorithm::RS256,
        Some("rsa-1"),
        &rsa2_private(),
        &fresh("billing"),
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.get(EXPORT_EU, &new).await.status == 200
        })
        .await,
        "the new key was never picked up"
    );
    // The same token string that verified (and was cached) before is now refused.
    let r = gw.get(EXPORT_EU, &old).await;
    assert_401(&r, "the cached token after rotation");
    assert_eq!(
        r.json()["message"],
        "invalid token signature",
        "{}",
        r.text()
    );
    assert_401(
        &gw.get(EXPORT_EU, &rsa1_token()).await,
        "a new token signed with the old key",
    );
}

/// A JWT with a valid-looking header and claims, padded to ~14 KB (under the gateway's 16 KiB
/// limit, so that keeping the tokens themselves would show in the RSS), and a random 256-byte
/// signature.
fn forged_token() -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT","kid":"rsa-1"}"#);
    let mut claims = fresh("billing");
    claims["pad"] = json!("p".repeat(10_000));
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut signature = [0u8; 256];
    aws_lc_rs::rand::fill(&mut signature).unwrap();
    let token = format!("{header}.{claims}.{}", URL_SAFE_NO_PAD.encode(signature));
    assert!(
        token.len() > 13_000 && token.len() < 16 * 1024,
        "{}",
        token.len()
    );
    token
}

/// Sends `n` distinct forged tokens, `workers` at a time; returns how many were not 401.
async fn forged_flood(gw: &Arc<Gateway>, n: usize, workers: usize) -> usize {
    let mut set = JoinSet::new();
    for w in 0..workers {
        let gw = gw.clone();
        let count = n / workers + usize::from(w < n % workers);
        set.spawn(async move {
            let mut wrong = 0;
            for _ in 0..count {
                if gw.get(EXPORT_EU, &forged_token()).await.status != 401 {
                    wrong += 1;
                }
            }
            wrong
        });
    }
    let mut wrong = 0;
    while let Some(w) = set.join_next().await {
        wrong += w.unwrap();
    }
    wrong
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_distinct_invalid_tokens_keeps_memory_bounded() {
    let gw = Arc::new(Gateway::start().await);
    let good = rsa1_token();
    assert_200(&gw.get(EXPORT_EU, &good).await, "before the flood");

    // Warm up (connections, allocator), then measure.
    assert_eq!(forged_flood(&gw, 200, 8).await, 0);
    let rss_before = vm_rss();
    assert_eq!(
        forged_flood(&gw, 2_000, 8).await,
        0,
        "a forged token was not 401"
    );
    let rss_after = vm_rss();
    let growth = rss_after.saturating_sub(rss_before);
    eprintln!(
        "RSS {} -> {} KiB over 2,000 forged tokens (~28 MB of token bytes)",
        rss_before / 1024,
        rss_after / 1024
    );
    assert!(
        growth < 20 * 1024 * 1024,
        "RSS grew by {} KiB over 2,000 invalid tokens ({} -> {} KiB)",
        growth / 1024,
        rss_before / 1024,
        rss_after / 1024
    );

    // Every one was refused as a bad signature, nothing reached upstream, and the gateway
    // still serves valid tokens, cached or new.
    let text = metrics_text(&gw).await;
    assert_eq!(
        metric(&text, &auth_failures("bad_signature")),
        2_200.0,
        "{text}"
    );
    assert_eq!(gw.upstream_count(), 1);
    assert_200(&gw.get(EXPORT_EU, &good).await, "the token verified before");
    assert_200(&gw.get(EXPORT_EU, &rsa1_token()).await, "a new token");
    assert!(ready(&gw).await);
    let h = gw.admin(Method::GET, "/healthz", &[]).await;
    assert_eq!(h.status, 200);
}

// ---------------------------------------------------------------------------------------------
// 10. Config
// ---------------------------------------------------------------------------------------------

fn parse_keys(keys: &str) -> Result<convocore_gateway::Config, convocore_gateway::ConfigError> {
    let text = TestConfig {
        keys: keys.to_string(),
        ..TestConfig::default()
    }
    .render(
        "https://eu.example.internal/v3",
        "https://na.example.internal/v3",
        Path::new("/nonexistent/convocore-token"),
    );
    convocore_gateway::Config::parse(&text, Path::new("t.toml"))
}

#[test]
fn jwks_url_config_is_validated() {
    for (keys, key) in [
        (
            "[[auth.keys]]\njwks_url = \"http://example.com/jwks\"\n",
            "auth.keys[0].jwks_url",
        ),
        (
            "[[auth.keys]]\njwks_url = \"ftp://idp.example/jwks\"\n",
            "auth.keys[0].jwks_url",
        ),
        ("[[auth.keys]]\njwks_url = \"jwks.json\"\n", "auth.keys[0].jwks_url"),
        (
            "[[auth.keys]]\njwks_url = \"https://idp.example/jwks\"\nrefresh = \"0s\"\n",
            "auth.keys[0].refresh",
        ),
        (
            "[[auth.keys]]\njwks_url = \"https://idp.example/jwks\"\nmax_stale = \"0s\"\n",
            "auth.keys[0].max_stale",
        ),
        (
            "[[auth.keys]]\njwks_url = \"https://idp.example/jwks\"\nkid = \"idp-1\"\n",
            "auth.keys[0].kid",
        ),
        (
            "[[auth.keys]]\nkid = \"rsa-1\"\nalgorithm = \"RS256\"\npublic_key_file = \"k.pem\"\nrefresh = \"5m\"\n",
            "auth.keys[0].refresh",
        ),
        (
            "[[auth.keys]]\nkid = \"rsa-1\"\nalgorithm = \"RS256\"\npublic_key_file = \"k.pem\"\n\n\
             [[auth.keys]]\njwks_url = \"http://idp.example.internal/jwks\"\n",
            "auth.keys[1].jwks_url",
        ),
    ] {
        let e = parse_keys(keys).expect_err(keys);
        assert_eq!(e.key, key, "{keys}: {e}");
        assert_eq!(e.file, "t.toml", "{keys}: {e}");
        let shown = e.to_string();
        assert!(shown.contains(key), "{keys}: {shown}");
        assert!(shown.contains("t.toml"), "{keys}: {shown}");
    }

    // Accepted: HTTPS anywhere, plain HTTP on loopback, durations as strings.
    for keys in [
        "[[auth.keys]]\njwks_url = \"https://idp.example/.well-known/jwks.json\"\nrefresh = \"5m\"\nmax_stale = \"24h\"\n",
        "[[auth.keys]]\njwks_url = \"https://idp.example/jwks\"\n",
        "[[auth.keys]]\njwks_url = \"http://127.0.0.1:8081/jwks\"\n",
        "[[auth.keys]]\njwks_url = \"http://localhost:8081/jwks\"\nalgorithm = \"ES256\"\n",
    ] {
        let config = parse_keys(keys).unwrap_or_else(|e| panic!("{keys}: {e}"));
        assert_eq!(config.auth.keys.len(), 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Reloads
// ---------------------------------------------------------------------------------------------

/// A reload that adds a `jwks_url` puts the new configuration in force only once its keys are
/// fetched, so `/readyz` never blinks; a reload that keeps the URL keeps its fetcher (no new
/// fetch, its keys verify at once).
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_warms_a_new_jwks_url_and_keeps_a_known_one() {
    let idp = JwksServer::start(&fixture_jwks()).await;
    idp.set_delay(Duration::from_millis(600));
    let mut config = TestConfig {
        keys: "[[auth.keys]]\nkid = \"ec-1\"\nalgorithm = \"ES256\"\npublic_key_file = \"{fixtures}/ec256_public.pem\"\n".into(),
        upstream: idp.upstream(),
        ..TestConfig::default()
    };
    let gw = Arc::new(Gateway::start_with(config.clone()).await);
    gw.get(EXPORT_EU, &rsa1_token())
        .await
        .assert_error(401, "UNAUTHORIZED");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probes = {
        let (gw, done) = (gw.clone(), done.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !done.load(Ordering::Relaxed) {
                let r = gw.admin(Method::GET, "/readyz", &[]).await;
                assert_eq!(r.status, 200, "/readyz blinked: {}", r.text());
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            n
        })
    };

    config.keys = idp.config("1h", "1h").keys;
    gw.replace_config(&gw.render(&config));
    gw.reload().await.unwrap();
    assert_eq!(idp.requests(), 1, "the new URL was fetched before the swap");
    assert_200(
        &gw.get(EXPORT_EU, &rsa1_token()).await,
        "a JWKS key after the reload",
    );

    // The same URL again (another setting changes): the fetcher and its keys are kept.
    config.teams = "[teams]\nbilling = { agents = [\"*\"] }\n".into();
    gw.replace_config(&gw.render(&config));
    gw.reload().await.unwrap();
    assert_200(&gw.get(EXPORT_EU, &rsa1_token()).await, "the kept keys");
    assert_eq!(idp.requests(), 1, "no new fetch for a URL already followed");

    done.store(true, Ordering::Relaxed);
    assert!(probes.await.unwrap() > 10);
}

/// An IdP whose RSA keys carry no `alg` (common) serves RS256 and PS256 through two
/// `[[auth.keys]]` entries on one `jwks_url`: both share one fetcher, so the IdP sees one
/// fetch at start and one early refetch for a flood of unknown kids, not one per entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_entries_on_one_url_share_one_fetcher() {
    let mut rsa = fixture_jwk("rsa-1");
    rsa.as_object_mut().unwrap().remove("alg");
    let idp = JwksServer::start(&jwks_of(&[rsa])).await;
    let url = idp.url();
    let gw = Arc::new(
        Gateway::start_with(TestConfig {
            keys: format!(
                "[[auth.keys]]\njwks_url = \"{url}\"\nalgorithm = \"RS256\"\nrefresh = \"1h\"\n\
                 [[auth.keys]]\njwks_url = \"{url}\"\nalgorithm = \"PS256\"\nrefresh = \"1h\"\n"
            ),
            upstream: idp.upstream(),
            ..TestConfig::default()
        })
        .await,
    );
    wait_ready(&gw).await;
    for alg in [Algorithm::RS256, Algorithm::PS256] {
        let t = mint(alg, Some("rsa-1"), &fresh("billing"));
        assert_200(&gw.get(EXPORT_EU, &t).await, &format!("{alg:?}"));
    }
    assert_eq!(idp.requests(), 1, "one fetch at start for both entries");

    idp.set_delay(Duration::from_millis(300));
    let statuses = unknown_kid_flood(&gw, 30).await;
    assert!(statuses.iter().all(|s| *s == 401));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        idp.requests(),
        2,
        "one early refetch for the URL, not one per entry"
    );
}

/// `check-config` reports a `jwks_url` as not fetched yet; `check-config --fetch` fetches it
/// and names its keys (the real binary).
#[tokio::test(flavor = "multi_thread")]
async fn check_config_fetch_reports_the_jwks_keys() {
    use common::process::{check_config_cmd, run_to_end};
    let idp = JwksServer::start(&fixture_jwks()).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, UPSTREAM_TOKEN).unwrap();
    let text = idp.config("1h", "1h").render(
        "http://127.0.0.1:9/v3",
        "http://127.0.0.1:9/v3",
        &token_file,
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();

    let plain = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || run_to_end(&mut check_config_cmd(&path)))
    }
    .await
    .unwrap();
    assert_eq!(plain.code, Some(0), "{}", plain.all());
    assert!(plain.stdout.contains("(0 keys loaded)"), "{}", plain.stdout);

    let fetched =
        tokio::task::spawn_blocking(move || run_to_end(check_config_cmd(&path).arg("--fetch")))
            .await
            .unwrap();
    assert_eq!(fetched.code, Some(0), "{}", fetched.all());
    assert!(
        fetched
            .stdout
            .contains("(4 keys loaded: rsa-1, ec-1, ec384-1, ed-1)"),
        "{}",
        fetched.stdout
    );
    assert!(idp.requests() >= 1);
}
