//! The end of every request: its metrics and its one access-log line, written exactly once:
//! by [`Access::finish`] with the response's status, or, when the client goes away first and
//! hyper drops the request's future, by `drop` with nginx's 499.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Response, StatusCode};
use http_body_util::Full;
use tokio::time::Instant;

use crate::auth::Caller;
use crate::cache::CacheStatus;
use crate::domain::Export;
use crate::error::ApiError;
use crate::metrics::{AuthReason, InFlight};
use crate::state::{Policy, State};
use crate::upstream::{RegionId, Sent, X_REQUEST_ID};

/// nginx's status for a request whose client went away before the response: logged and
/// counted, never sent.
const CLIENT_CLOSED: u16 = 499;

/// What one request did, for its access-log line and metrics, until it is written.
pub struct Access<'a> {
    state: &'a State,
    policy: &'a Policy,
    _inflight: InFlight<'a>,
    started: Instant,
    pub request_id: HeaderValue,
    pub export: Option<Export>,
    pub caller: Option<Arc<Caller>>,
    pub region: Option<RegionId>,
    pub cache: Option<CacheStatus>,
    /// Time spent upstream by this request's own fetch.
    pub upstream: Option<Duration>,
    /// When the fetch this request waits on went upstream, if it did: what a request whose
    /// client leaves records (the fetch goes on for the others, or for the cache).
    pub sent: OnceLock<Sent>,
    error: Option<String>,
    done: bool,
}

impl<'a> Access<'a> {
    pub fn start(state: &'a State, policy: &'a Policy, request_id: HeaderValue) -> Access<'a> {
        Access {
            _inflight: InFlight::start(&state.metrics.inflight),
            state,
            policy,
            started: Instant::now(),
            request_id,
            export: None,
            caller: None,
            region: None,
            cache: None,
            upstream: None,
            sent: OnceLock::new(),
            error: None,
            done: false,
        }
    }

    /// Turns the result into the response (an error in the contract's shape), then counts and
    /// logs the request.
    pub fn finish(
        mut self,
        result: Result<Response<Full<Bytes>>, ApiError>,
    ) -> Response<Full<Bytes>> {
        let mut response = match result {
            Ok(r) => r,
            Err(e) => {
                if let ApiError::Unauthorized(failure) = &e {
                    self.state.metrics.auth_failure(failure.reason());
                } else if let ApiError::Forbidden(_) = &e {
                    self.state.metrics.auth_failure(AuthReason::Forbidden);
                }
                self.error = Some(error_chain(&e));
                e.into_response()
            }
        };
        response
            .headers_mut()
            .insert(&X_REQUEST_ID, self.request_id.clone());
        self.write(response.status());
        response
    }

    fn write(&mut self, status: StatusCode) {
        self.done = true;
        let elapsed = self.started.elapsed();
        let regions = &self.policy.upstream.regions;
        let team = self.caller.as_ref().map(|c| c.team.as_str());
        self.policy.metrics.record_request(
            self.region,
            status,
            self.cache,
            elapsed,
            team.map(|t| self.policy.auth.team_label(t)),
        );
        let export = self.export.as_ref();
        tracing::info!(
            target: "access",
            request_id = self.request_id.to_str().unwrap_or("-"),
            team = team.unwrap_or("-"),
            agent = export.map(|e| e.agent.as_str()).unwrap_or("-"),
            convo = export.map(|e| e.convo.as_str()).unwrap_or("-"),
            format = export.map(|e| e.format.as_str()).unwrap_or("-"),
            region = regions.name(self.region),
            status = status.as_u16(),
            cache = self.cache.map(CacheStatus::label).unwrap_or("none"),
            duration_ms = ms(elapsed),
            upstream_ms = self.upstream.map(ms).unwrap_or(0.0),
            queue_ms = self.sent.get().and_then(Sent::queue_wait).map(ms).unwrap_or(0.0),
            error = self.error.as_deref().unwrap_or(""),
            "request"
        );
    }
}

impl Drop for Access<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.error
            .get_or_insert_with(|| "the client closed the connection before the response".into());
        // Its export went upstream meanwhile: upstream_ms says for how long so far.
        if let Some(at) = self.sent.get().and_then(Sent::at) {
            self.upstream.get_or_insert(at.age(crate::clock::now()));
        }
        let status = StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST);
        self.write(status);
    }
}

fn ms(d: Duration) -> f64 {
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
