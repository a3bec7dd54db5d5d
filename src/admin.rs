//! The admin listener: a plain match on method and path.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::domain::valid_id;
use crate::error::{error_response, ApiError};
use crate::state::State;

/// The scope a team JWT needs to purge cache entries.
pub const PURGE_SCOPE: &str = "convocore-gateway:purge";
const PURGE_PREFIX: &str = "/admin/cache/agents/";

pub async fn handle<B>(
    state: Arc<State>,
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if crate::http::target_len(req.uri()) > crate::http::MAX_TARGET {
        return Ok(ApiError::UriTooLong.into_response());
    }
    let path = req.uri().path();
    if let Some(ids) = path.strip_prefix(PURGE_PREFIX) {
        if let Some((agent, convo)) = ids.split_once("/convos/") {
            let response = purge(&state, &req, agent, convo).await;
            return Ok(response.unwrap_or_else(ApiError::into_response));
        }
    }
    let response = match (req.method(), path) {
        (&Method::GET, "/metrics") => {
            let (entries, bytes) = state.cache.usage().await;
            state
                .metrics
                .cache_entries
                .set(i64::try_from(entries).unwrap_or(i64::MAX));
            state
                .metrics
                .cache_bytes
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            let mut r = Response::new(Full::new(Bytes::from(state.metrics.render())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (&Method::GET, "/healthz") => json(StatusCode::OK, r#"{"status":"ok"}"#),
        (&Method::GET, "/readyz") => match state.not_ready_because() {
            None => json(StatusCode::OK, r#"{"status":"ready"}"#),
            Some(why) => error_response(StatusCode::SERVICE_UNAVAILABLE, "not ready", Some(why)),
        },
        (_, "/healthz" | "/readyz" | "/metrics") => {
            ApiError::MethodNotSupported("GET").into_response()
        }
        _ => error_response(StatusCode::NOT_FOUND, "no such admin route", None),
    };
    Ok(response)
}

/// `DELETE /admin/cache/agents/{agentId}/convos/{convoId}`: a team JWT with the purge scope
/// drops every format of that conversation.
async fn purge<B>(
    state: &State,
    req: &Request<B>,
    agent: &str,
    convo: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    if req.method() != Method::DELETE {
        return Err(ApiError::MethodNotSupported("DELETE"));
    }
    if !valid_id(agent) || !valid_id(convo) {
        return Err(ApiError::BadRequest(
            "agentId and convoId must be 1 to 128 characters of A-Z a-z 0-9 _ -",
        ));
    }
    let policy = state.policy();
    let caller = policy
        .auth
        .verify(req.headers())
        .await
        .map_err(ApiError::from)?;
    if !caller.has_scope(PURGE_SCOPE) {
        return Err(ApiError::Forbidden(format!(
            "the token's scope does not hold {PURGE_SCOPE}"
        )));
    }
    // A team may purge only what it may export.
    policy.auth.authorize(&caller, agent)?;
    let mut purged = state.cache.purge(agent, convo).await;
    // With [shared]: out of Redis, and every other replica told (it drops its own entries).
    let mut everywhere = true;
    if let Some(redis) = &policy.shared {
        match redis.purge(agent, convo).await {
            Some(n) => purged = purged.max(n),
            None => everywhere = false,
        }
    }
    tracing::info!(team = %caller.team, agent, convo, purged, everywhere, "cache purge");
    let body = serde_json::json!({
        "success": true,
        "message": format!("purged {purged} cache entries"),
        "data": { "purged": purged },
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(r)
}

fn json(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
