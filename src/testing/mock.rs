//! An embedded mock of one Convocore region, for `demo` and the integration tests: real HTTP
//! (or HTTPS) on a loopback port, sample conversations in JSON and CSV shaped like the API's
//! documented example, a recorder of every request it saw, and fault switches.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use super::samples;
pub use super::samples::{sample_csv, sample_json};
pub use super::serve::serve_http;
use super::serve::serve_http_with;

/// The most requests a mock remembers; older ones are dropped.
const MAX_RECORDED: usize = 10_000;

/// One request as the mock saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub version: http::Version,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
}

/// What the mock answers, besides its normal behaviour.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Answer every request with this status and a tRPC error body.
    pub status: Option<u16>,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Answer 200 with a body of this many bytes: (bytes, chunked without Content-Length).
    pub oversize: Option<(usize, bool)>,
    /// Extra response headers, e.g. `Cache-Control: no-store`; each replaces the mock's own.
    pub headers: Vec<(String, String)>,
    /// Shut each connection down gracefully (HTTP/2: GOAWAY) once it has taken this many
    /// requests, as load balancers do when they rotate connections.
    pub goaway_every: Option<usize>,
    /// Enforce a per-token quota as Convocore does: a token bucket of (per second, burst);
    /// an export request over it gets `429` with `Retry-After: 1`.
    pub quota: Option<(u32, u32)>,
}

struct State {
    region: String,
    token: Mutex<String>,
    agents: Mutex<BTreeMap<String, Vec<String>>>,
    recorded: Mutex<Vec<Recorded>>,
    /// The quota's bucket: tokens left and when it was last refilled.
    bucket: Mutex<Option<(f64, tokio::time::Instant)>>,
    /// Requests answered 429 by the quota.
    throttled: AtomicU64,
    faults: Mutex<Faults>,
    /// Bumped by [`MockConvocore::bump_version`]; part of every body, so a refetch shows.
    version: AtomicU64,
    /// Extra turns in every export ([`MockConvocore::set_turns`]), to make bodies larger.
    turns: std::sync::atomic::AtomicUsize,
    /// Conditional requests answered `304 Not Modified`.
    not_modified: AtomicU64,
    /// Connections accepted so far.
    accepted: AtomicU64,
    /// Bumped by [`MockConvocore::drop_connections`]: every open connection closes.
    drops: tokio::sync::watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a TLS mock speaks, besides [`MockConvocore::start_tls`]'s defaults (h2 and http/1.1 by
/// ALPN, hyper's HTTP/2 settings).
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsOptions {
    /// Offer only http/1.1 by ALPN.
    pub http1_only: bool,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS (hyper's default: 200); a stream a client opens
    /// beyond it (before it has read the setting) is refused with REFUSED_STREAM.
    pub max_concurrent_streams: Option<u32>,
}

/// A running mock region; stops when dropped.
pub struct MockConvocore {
    addr: SocketAddr,
    tls: bool,
    state: Arc<State>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for MockConvocore {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl MockConvocore {
    /// Starts a plain-HTTP mock on `127.0.0.1:0` that expects `Bearer {token}` and knows
    /// `agents` (agent id -> conversation ids).
    pub async fn start(
        region: &str,
        token: &str,
        agents: &[(&str, &[&str])],
    ) -> std::io::Result<Self> {
        Self::start_on(region, token, agents, None).await
    }

    /// The same over HTTPS with the given certificate chain and key (PEM).
    pub async fn start_tls(
        region: &str,
        token: &str,
        agents: &[(&str, &[&str])],
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> std::io::Result<Self> {
        Self::start_tls_with(
            region,
            token,
            agents,
            cert_pem,
            key_pem,
            TlsOptions::default(),
        )
        .await
    }

    /// [`MockConvocore::start_tls`] with `options`.
    pub async fn start_tls_with(
        region: &str,
        token: &str,
        agents: &[(&str, &[&str])],
        cert_pem: &[u8],
        key_pem: &[u8],
        options: TlsOptions,
    ) -> std::io::Result<Self> {
        let certs = rustls_pemfile::certs(&mut &cert_pem[..]).collect::<Result<Vec<_>, _>>()?;
        let key = rustls_pemfile::private_key(&mut &key_pem[..])?
            .ok_or_else(|| std::io::Error::other("no private key"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(std::io::Error::other)?;
        config.alpn_protocols = if options.http1_only {
            vec![b"http/1.1".to_vec()]
        } else {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::start_on(region, token, agents, Some((acceptor, options))).await
    }

    async fn start_on(
        region: &str,
        token: &str,
        agents: &[(&str, &[&str])],
        tls: Option<(tokio_rustls::TlsAcceptor, TlsOptions)>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            region: region.to_string(),
            token: Mutex::new(token.to_string()),
            agents: Mutex::new(
                agents
                    .iter()
                    .map(|(a, cs)| (a.to_string(), cs.iter().map(|c| c.to_string()).collect()))
                    .collect(),
            ),
            recorded: Mutex::new(Vec::new()),
            bucket: Mutex::new(None),
            throttled: AtomicU64::new(0),
            faults: Mutex::new(Faults::default()),
            version: AtomicU64::new(1),
            turns: Default::default(),
            not_modified: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            drops: tokio::sync::watch::Sender::new(0),
        });
        let is_tls = tls.is_some();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        let max_streams = tls.as_ref().and_then(|(_, o)| o.max_concurrent_streams);
        if let Some(max) = max_streams {
            builder.http2().max_concurrent_streams(max);
        }
        let tls = tls.map(|(acceptor, _)| acceptor);
        let task = tokio::spawn(serve(listener, state.clone(), tls, builder));
        Ok(MockConvocore {
            addr,
            tls: is_tls,
            state,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v3` (or `https://localhost:PORT/v3` over TLS).
    pub fn base_url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}/v3", self.addr.port())
        } else {
            format!("http://{}/v3", self.addr)
        }
    }

    /// Every request seen so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state.recorded).clone()
    }

    /// Requests the quota answered with 429.
    pub fn throttled(&self) -> u64 {
        self.state.throttled.load(Ordering::Relaxed)
    }

    pub fn request_count(&self) -> usize {
        lock(&self.state.recorded).len()
    }

    pub fn clear_requests(&self) {
        lock(&self.state.recorded).clear();
    }

    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.state.faults) = faults;
    }

    pub fn set_token(&self, token: &str) {
        *lock(&self.state.token) = token.to_string();
    }

    pub fn add_agent(&self, agent: &str, convos: &[&str]) {
        lock(&self.state.agents).insert(
            agent.to_string(),
            convos.iter().map(|c| c.to_string()).collect(),
        );
    }

    /// Changes every body (and its `ETag` and `Last-Modified`) from now on, as a conversation
    /// that got new turns.
    pub fn bump_version(&self) -> u64 {
        self.state.version.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Adds `turns` generated turns to every export from now on (about 250 bytes of JSON each),
    /// for bodies of a chosen size.
    pub fn set_turns(&self, turns: usize) {
        self.state.turns.store(turns, Ordering::Relaxed);
    }

    /// Conditional requests answered `304 Not Modified` so far.
    pub fn not_modified(&self) -> u64 {
        self.state.not_modified.load(Ordering::Relaxed)
    }

    /// Connections accepted so far (TCP, before any TLS handshake).
    pub fn connections(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Closes every open connection without a word, as a server dropping idle keep-alive
    /// connections does; the listener keeps accepting.
    pub fn drop_connections(&self) {
        self.state.drops.send_modify(|n| *n += 1);
    }

    /// Stops accepting and closes every connection: later requests are refused.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    builder: auto::Builder<TokioExecutor>,
) {
    let counted = state.clone();
    let rotation = state.clone();
    let drops = Some(state.drops.subscribe());
    serve_http_with(
        builder,
        listener,
        tls,
        move |req| answer(state.clone(), req),
        move || {
            counted.accepted.fetch_add(1, Ordering::SeqCst);
        },
        drops,
        move || lock(&rotation.faults).goaway_every,
    )
    .await
}

type MockBody = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<MockBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r
}

fn trpc_error(status: StatusCode, code: &str, message: &str) -> Response<MockBody> {
    let body = serde_json::json!({ "message": message, "code": code }).to_string();
    full(status, "application/json", body)
}

async fn answer<B>(state: Arc<State>, req: Request<B>) -> Result<Response<MockBody>, Infallible> {
    {
        let mut recorded = lock(&state.recorded);
        if recorded.len() >= MAX_RECORDED {
            recorded.remove(0);
        }
        recorded.push(Recorded {
            version: req.version(),
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            query: req.uri().query().map(str::to_string),
            headers: req.headers().clone(),
        });
    }
    let faults = lock(&state.faults).clone();
    if let Some((per_second, burst)) = faults.quota {
        if !take_quota(&state, per_second, burst) {
            state.throttled.fetch_add(1, Ordering::Relaxed);
            let mut r = trpc_error(
                StatusCode::TOO_MANY_REQUESTS,
                "TOO_MANY_REQUESTS",
                "Rate limit exceeded",
            );
            r.headers_mut()
                .insert("retry-after", http::HeaderValue::from_static("1"));
            return Ok(r);
        }
    }
    if !faults.delay.is_zero() {
        tokio::time::sleep(faults.delay).await;
    }
    let mut response = export(&state, &req, &faults);
    let headers = response.headers_mut();
    // Headers a real server sends that the gateway must not pass on.
    headers.insert(
        "set-cookie",
        http::HeaderValue::from_static("session=upstream-secret"),
    );
    headers.insert(
        "x-powered-by",
        http::HeaderValue::from_static("convocore-mock"),
    );
    headers.insert("server", http::HeaderValue::from_static("convocore-mock"));
    for (name, value) in &faults.headers {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            // Replacing the mock's own (an `ETag` a test wants changed, on 304s too).
            headers.insert(n, v);
        }
    }
    Ok(response)
}

/// One token from the quota's bucket, if it has one.
fn take_quota(state: &State, per_second: u32, burst: u32) -> bool {
    let now = tokio::time::Instant::now();
    let mut bucket = lock(&state.bucket);
    let (tokens, last) = bucket.get_or_insert((f64::from(burst), now));
    let refill = now.duration_since(*last).as_secs_f64() * f64::from(per_second);
    *tokens = (*tokens + refill).min(f64::from(burst));
    *last = now;
    if *tokens >= 1.0 {
        *tokens -= 1.0;
        true
    } else {
        false
    }
}

fn export<B>(state: &State, req: &Request<B>, faults: &Faults) -> Response<MockBody> {
    let expected = format!("Bearer {}", lock(&state.token));
    if req.headers().get(AUTHORIZATION).map(|v| v.as_bytes()) != Some(expected.as_bytes()) {
        return trpc_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "Invalid API key");
    }
    if let Some(status) = faults.status {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return trpc_error(status, crate::error::code_for(status), "mock fault");
    }
    let path = req.uri().path();
    let Some((agent, convo)) = path
        .strip_prefix("/v3/agents/")
        .and_then(|p| p.strip_suffix("/export"))
        .and_then(|p| p.split_once("/convos/"))
    else {
        return trpc_error(StatusCode::NOT_FOUND, "NOT_FOUND", "No such route");
    };
    let format = match req.uri().query() {
        None | Some("format=json") => "json",
        Some("format=csv") => "csv",
        Some(_) => return trpc_error(StatusCode::BAD_REQUEST, "BAD_REQUEST", "Invalid format"),
    };
    {
        let agents = lock(&state.agents);
        let Some(convos) = agents.get(agent) else {
            return trpc_error(StatusCode::NOT_FOUND, "NOT_FOUND", "Agent not found");
        };
        if !convos.iter().any(|c| c == convo) {
            return trpc_error(StatusCode::NOT_FOUND, "NOT_FOUND", "Conversation not found");
        }
    }
    if let Some((size, chunked)) = faults.oversize {
        let body = Chunks {
            remaining: size,
            chunk: Bytes::from(vec![b'x'; 16 * 1024]),
        };
        let mut r = Response::new(body.boxed());
        if !chunked {
            if let Ok(v) = size.to_string().parse() {
                r.headers_mut().insert(http::header::CONTENT_LENGTH, v);
            }
        }
        r.headers_mut().insert(
            CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        return r;
    }
    let version = state.version.load(Ordering::Relaxed);
    let turns = state.turns.load(Ordering::Relaxed);
    let etag = format!("\"{}-{agent}-{convo}-{format}-v{version}\"", state.region);
    let last_modified = samples::last_modified(version);
    // Conditional requests, as a real origin honours them: If-None-Match first.
    let unchanged = match req.headers().get(http::header::IF_NONE_MATCH) {
        Some(inm) => inm.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().trim_start_matches("W/") == etag)
        }),
        None => req
            .headers()
            .get(http::header::IF_MODIFIED_SINCE)
            .and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok())
            .is_some_and(|since| since >= last_modified),
    };
    let mut r = if unchanged {
        state.not_modified.fetch_add(1, Ordering::Relaxed);
        let mut r = Response::new(Full::new(Bytes::new()).boxed());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else if format == "csv" {
        let mut r = full(
            StatusCode::OK,
            "text/csv; charset=utf-8",
            samples::csv(agent, convo, version, turns),
        );
        if let Ok(v) = format!("attachment; filename=\"{convo}.csv\"").parse() {
            r.headers_mut().insert(http::header::CONTENT_DISPOSITION, v);
        }
        r
    } else {
        full(
            StatusCode::OK,
            "application/json; charset=utf-8",
            samples::json(&state.region, agent, convo, version, turns),
        )
    };
    if let Ok(v) = etag.parse() {
        r.headers_mut().insert(http::header::ETAG, v);
    }
    if let Ok(v) = httpdate::fmt_http_date(last_modified).parse() {
        r.headers_mut().insert(http::header::LAST_MODIFIED, v);
    }
    r
}

/// A body of `remaining` bytes sent in chunks, without a declared length.
struct Chunks {
    remaining: usize,
    chunk: Bytes,
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len());
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }
}
