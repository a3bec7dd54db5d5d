//! The export route, in the order of its phases: route → verify → authorize → cache →
//! upstream → respond (encoding, conditions, `HEAD`); then the one access line ([`access`]).

pub mod access;
pub mod conditional;
pub mod encoding;
pub mod respond;
pub mod route;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Body as _;

use self::access::Access;
use crate::cache::{CacheStatus, Mode};
use crate::domain::Export;
use crate::error::{whole_seconds, ApiError, RateLimited};
use crate::state::{Policy, State};
use crate::traffic::bucket::Verdict;
use crate::upstream::{Ask, Fault, X_REQUEST_ID};

/// The longest request target (path and query) accepted: `414` past it.
pub const MAX_TARGET: usize = 8 * 1024;

/// The API listener's service: never fails, every error becomes a response.
pub async fn handle<B>(
    state: Arc<State>,
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // One configuration for the whole request, however long it takes.
    let policy = state.policy();
    let request_id = state.request_id(req.headers().get(&X_REQUEST_ID));
    let mut access = Access::start(&state, &policy, request_id);
    let result = export(&state, &policy, &req, &mut access).await;
    Ok(access.finish(result))
}

/// The phases: parse (400/404/405), authenticate (401), authorize (403, before any cache
/// lookup), then the cache, which goes upstream when it must.
async fn export<B>(
    state: &State,
    policy: &Arc<Policy>,
    req: &Request<B>,
    access: &mut Access<'_>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    if target_len(req.uri()) > MAX_TARGET {
        return Err(ApiError::UriTooLong);
    }
    let export = route::parse(req.method(), req.uri())?;
    let export = access.export.insert(export);
    let caller = policy
        .auth
        .verify(req.headers())
        .await
        .map_err(ApiError::from)?;
    let allowed = policy.auth.authorize(&caller, &export.agent);
    // The caller outlives this function in a fetch that may run in a task of its own.
    let payer = caller.clone();
    let team = payer.team.as_str();
    access.caller = Some(caller);
    allowed?;
    // The team's rate, hits included, before the cache.
    if let Some((limit, listed)) = policy.teams.limit(team) {
        // Fleet-wide with [shared]; without Redis, this replica's share of the limit.
        let verdict = match &policy.shared {
            Some(redis) => match redis.take(team, limit).await {
                Some(verdict) => verdict,
                None => state
                    .traffic()
                    .take(team, listed, limit.share(redis.replicas())),
            },
            None => state.traffic().take(team, listed, limit),
        };
        if let Verdict::Limited {
            retry_after,
            full_in,
        } = verdict
        {
            policy.metrics.rate_limited(policy.auth.team_label(team));
            return Err(ApiError::RateLimited(RateLimited {
                retry_after: whole_seconds(retry_after),
                quota: limit.burst,
                window: whole_seconds(limit.window()),
                reset: whole_seconds(full_in),
            }));
        }
    }
    let weight = policy.teams.weight(team);

    let mode = Mode::from_headers(req.headers());
    // Called only when the cache must go upstream (it may run in a flight task of its own).
    let fetch = |wanted, validators: Option<crate::upstream::Validators>| {
        let policy = policy.clone();
        let export: Export = export.clone();
        let request_id = access.request_id.clone();
        let payer = payer.clone();
        async move {
            let ask = Ask {
                metrics: &policy.metrics,
                export: &export,
                request_id: &request_id,
                wanted: &wanted,
                team: &payer.team,
                weight,
                shared: policy.shared.as_ref(),
                validators: validators.as_ref(),
            };
            policy.upstream.fetch(&ask).await
        }
    };
    let answer = state
        .cache
        .get(&policy.cache, export, mode, fetch, &access.sent)
        .await
        .map_err(|failed| {
            access.region = failed
                .region
                .and_then(|r| policy.upstream.regions.by_name(r.as_bytes()));
            // The cache was consulted and could not answer.
            access.cache = Some(match mode {
                Mode::Bypass => CacheStatus::Bypass,
                _ => CacheStatus::Miss,
            });
            match failed.fault {
                Fault::Upstream(e) => ApiError::Upstream(e),
                Fault::Internal(why) => ApiError::Internal(why),
            }
        })?;
    access.region = policy
        .upstream
        .regions
        .by_name(answer.response.region.as_bytes());
    access.cache = Some(answer.status);
    if answer.coalesced {
        state.metrics.coalesced.inc();
    }
    if answer.went_upstream {
        access.upstream = Some(answer.response.elapsed);
    }
    let entry = answer.response.clone();
    let mut response = respond::export(answer);
    if response.status() != http::StatusCode::OK {
        return Ok(head_or_get(req.method(), response));
    }
    // The encoding for this caller, while [cache] compress offers any (Vary on every 200/304).
    let coding = encoding::negotiate(req.headers(), &policy.cache.compress, &entry, &mut response);
    // The caller already has it: 304, on a hit or after a fetch alike.
    if conditional::not_modified(req.headers(), response.headers()) {
        return Ok(conditional::into_not_modified(response));
    }
    if let Some(coding) = coding {
        encoding::encode(state, access.export.as_ref(), &entry, coding, &mut response).await;
    }
    Ok(head_or_get(req.method(), response))
}

/// A `HEAD` gets the GET's headers, `Content-Length` included, and no body.
fn head_or_get(
    method: &http::Method,
    mut response: Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    if method == http::Method::HEAD {
        let length = response.body().size_hint().exact().unwrap_or(0);
        response
            .headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
        *response.body_mut() = Full::new(Bytes::new());
    }
    response
}

/// The length of a request's target (path and query), as the client sent it.
pub fn target_len(uri: &http::Uri) -> usize {
    uri.path_and_query().map_or(0, |p| p.as_str().len())
}
