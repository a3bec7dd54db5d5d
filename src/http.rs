//! The export route, in the order of its phases: parse, authenticate, authorize, route to a
//! region, fetch, answer; then one access-log line.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AGE};
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use tokio::time::Instant;
use tracing::Instrument;

use crate::app::App;
use crate::auth::Caller;
use crate::cache::{Answer, CacheStatus, Failed, Mode};
use crate::error::ApiError;
use crate::metrics::InFlight;
use crate::route::{self, Export};
use crate::routing::Route;
use crate::upstream::{Fetched, UpstreamError, X_REQUEST_ID};

pub static X_CONVOCORE_REGION: HeaderName = HeaderName::from_static("x-convocore-region");
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// What one request did, for its access-log line and metrics.
#[derive(Default)]
struct Record {
    caller: Option<Arc<Caller>>,
    region: Option<usize>,
    cache: Option<CacheStatus>,
    upstream_ms: f64,
    error: Option<String>,
}

/// The API listener's service: never fails, every error becomes a response.
pub async fn handle<B>(
    app: Arc<App>,
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let _inflight = InFlight::start(&app.metrics.inflight);
    let mut pending = Pending {
        app: &app,
        started: Instant::now(),
        request_id: app.request_id(req.headers().get(&X_REQUEST_ID)),
        export: None,
        record: Record::default(),
        done: false,
    };
    let result = match route::parse(req.method(), req.uri()) {
        Ok(export) => {
            let export = pending.export.insert(export);
            serve(&app, &req, export, &pending.request_id, &mut pending.record).await
        }
        Err(e) => Err(e),
    };
    let mut response = match result {
        Ok(r) => r,
        Err(e) => {
            if let ApiError::Unauthorized(failure) = &e {
                app.metrics.auth_failure(failure.reason());
            } else if let ApiError::Forbidden(_) = &e {
                app.metrics.auth_failure("forbidden");
            }
            pending.record.error = Some(error_chain(&e));
            e.into_response()
        }
    };
    response
        .headers_mut()
        .insert(&X_REQUEST_ID, pending.request_id.clone());
    pending.finish(response.status());
    Ok(response)
}

/// nginx's status for a request whose client went away before the response: logged and
/// counted, never sent.
const CLIENT_CLOSED: u16 = 499;

/// A request until its access line is written: by [`handle`] with the response's status, or,
/// when the client goes away first and hyper drops the request's future, by `drop` with 499.
/// Either way each request writes exactly one line and is counted once.
struct Pending<'a> {
    app: &'a App,
    started: Instant,
    request_id: HeaderValue,
    export: Option<Export>,
    record: Record,
    done: bool,
}

impl Pending<'_> {
    fn finish(&mut self, status: http::StatusCode) {
        self.done = true;
        finish(
            self.app,
            self.export.as_ref(),
            &self.record,
            &self.request_id,
            status,
            self.started,
        );
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.record
            .error
            .get_or_insert_with(|| "the client closed the connection before the response".into());
        let status =
            http::StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(http::StatusCode::BAD_REQUEST);
        self.finish(status);
    }
}

/// The phases after parsing: authenticate (401), authorize (403, before any cache lookup),
/// then the cache, which goes upstream when it must.
async fn serve<B>(
    app: &Arc<App>,
    req: &Request<B>,
    export: &Export,
    request_id: &HeaderValue,
    record: &mut Record,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let caller = app
        .auth
        .verify(req.headers())
        .await
        .map_err(ApiError::Unauthorized)?;
    let allowed = app.auth.authorize(&caller, &export.agent);
    record.caller = Some(caller);
    allowed?;

    let mode = Mode::from_headers(req.headers());
    // Called only when the cache must go upstream (it may run in a flight task of its own).
    let fetch = || {
        let app = app.clone();
        let export = export.clone();
        let request_id = request_id.clone();
        async move { fetch_routed(&app, &export, &request_id).await }
    };
    let answer = app.cache.get(export, mode, fetch).await.map_err(|failed| {
        record.region = Some(failed.region);
        // The cache was consulted and could not answer.
        record.cache = Some(match mode {
            Mode::Bypass => CacheStatus::Bypass,
            _ => CacheStatus::Miss,
        });
        ApiError::Upstream(failed.error)
    })?;
    record.region = Some(answer.response.region);
    record.cache = Some(answer.status);
    if answer.coalesced {
        app.metrics.coalesced.inc();
    }
    if answer.went_upstream {
        record.upstream_ms = ms(answer.response.elapsed);
    }
    Ok(respond(app, answer))
}

/// Fetches from the agent's region; an agent of unknown region is discovered.
async fn fetch_routed(
    app: &App,
    export: &Export,
    request_id: &HeaderValue,
) -> Result<Fetched, Failed> {
    match app.router.route(&export.agent).await {
        Route::Region(i) => fetch_from(app, i, export, request_id).await,
        Route::Discover => {
            // The one fetch path that logs: its lines carry the request id through this span
            // (a span costs ~1 µs, too much for every miss). Boxed: rare, and it would make
            // every request's future larger.
            let span =
                tracing::info_span!("request", request_id = request_id.to_str().unwrap_or("-"));
            Box::pin(discover(app, export, request_id).instrument(span)).await
        }
    }
}

/// One exchange with one region, counted in the upstream metrics.
async fn fetch_from(
    app: &App,
    region: usize,
    export: &Export,
    request_id: &HeaderValue,
) -> Result<Fetched, Failed> {
    let started = Instant::now();
    let result = app.upstream.fetch(region, export, request_id).await;
    let status = match &result {
        Ok(f) => Ok(f.status),
        Err(e) => Err(e.label()),
    };
    app.metrics
        .record_upstream(region, status, started.elapsed());
    result.map_err(|error| Failed { region, error })
}

/// Asks the default region and on its 404 the others in turn, and remembers the region that
/// had the agent.
async fn discover(app: &App, export: &Export, request_id: &HeaderValue) -> Result<Fetched, Failed> {
    let mut first_404: Option<Fetched> = None;
    let mut elapsed = std::time::Duration::ZERO;
    for &i in app.router.discovery_order() {
        let mut fetched = fetch_from(app, i, export, request_id).await?;
        elapsed += fetched.elapsed;
        fetched.elapsed = elapsed;
        if fetched.status == http::StatusCode::NOT_FOUND {
            first_404.get_or_insert(fetched);
            continue;
        }
        if fetched.status.is_success() {
            tracing::info!(agent = %export.agent, region = app.region_name(i), "discovered the agent's region");
            app.router.learn(&export.agent, i).await;
        }
        return Ok(fetched);
    }
    // No region knows the agent: answer with the default region's 404.
    let mut fetched = first_404.ok_or(Failed {
        region: app.router.default_region(),
        error: UpstreamError::Protocol(Arc::new(std::io::Error::other("no regions"))),
    })?;
    fetched.elapsed = elapsed;
    Ok(fetched)
}

fn respond(app: &App, answer: Answer) -> Response<Full<Bytes>> {
    let fetched = &answer.response;
    let mut response = Response::new(Full::new(fetched.body.clone()));
    *response.status_mut() = fetched.status;
    // Room for the passed headers, ours, X-Request-Id and the server's Date/Content-Length.
    let mut headers = HeaderMap::with_capacity(16);
    for (name, value) in &fetched.headers {
        headers.insert(name, value.clone());
    }
    if let Some(region) = app.upstream.regions.get(fetched.region) {
        headers.insert(&X_CONVOCORE_REGION, region.header.clone());
    }
    headers.insert(&X_CACHE, answer.status.header());
    if let Some(age) = answer.age {
        headers.insert(AGE, app.cache.age_header(age));
    }
    headers.insert(&CACHE_STATUS, answer.cache_status);
    *response.headers_mut() = headers;
    response
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// An error and its sources on one line, for the log (never sent to the caller).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The end of every request: its metrics and its one access-log line.
fn finish(
    app: &App,
    export: Option<&Export>,
    r: &Record,
    request_id: &HeaderValue,
    status: http::StatusCode,
    started: Instant,
) {
    let elapsed = started.elapsed();
    let region = r.region.map(|i| app.region_name(i)).unwrap_or("none");
    let cache = r.cache.map(CacheStatus::label).unwrap_or("none");
    let team = r.caller.as_ref().map(|c| c.team.as_str());
    app.metrics.record_request(
        r.region,
        status,
        r.cache,
        elapsed,
        team.map(|t| app.auth.team_label(t)),
    );
    tracing::info!(
        target: "access",
        request_id = request_id.to_str().unwrap_or("-"),
        team = team.unwrap_or("-"),
        agent = export.map(|e| e.agent.as_str()).unwrap_or("-"),
        convo = export.map(|e| e.convo.as_str()).unwrap_or("-"),
        format = export.map(|e| e.format.as_str()).unwrap_or("-"),
        region,
        status = status.as_u16(),
        cache,
        duration_ms = ms(elapsed),
        upstream_ms = r.upstream_ms,
        error = r.error.as_deref().unwrap_or(""),
        "request"
    );
}
