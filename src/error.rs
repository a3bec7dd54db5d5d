//! Errors the gateway itself answers with, in the upstream API's (tRPC-style) shape:
//! `{"message": "...", "code": "...", "issues": [{"message": "..."}]}`.
//!
//! Every request-path failure becomes an [`ApiError`]; [`ApiError::into_response`] is the one
//! place that turns one into a status, headers and body. Messages are written for callers and
//! never contain a token, secret or key; internal detail stays in `source` for the log.

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::metrics::AuthReason;
use crate::upstream::UpstreamError;

/// Why a caller's JWT was refused; the names are the `reason` label of
/// `convocore_gateway_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Malformed(&'static str),
    BadSignature,
    Expired,
    NotYetValid,
    Issuer,
    Audience,
    UnknownKey,
}

impl AuthFailure {
    /// The metric label.
    pub fn reason(self) -> AuthReason {
        match self {
            AuthFailure::Missing => AuthReason::Missing,
            AuthFailure::Malformed(_) => AuthReason::Malformed,
            AuthFailure::BadSignature => AuthReason::BadSignature,
            AuthFailure::Expired => AuthReason::Expired,
            AuthFailure::NotYetValid => AuthReason::NotYetValid,
            AuthFailure::Issuer => AuthReason::Issuer,
            AuthFailure::Audience => AuthReason::Audience,
            AuthFailure::UnknownKey => AuthReason::UnknownKey,
        }
    }

    fn message(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing bearer token",
            AuthFailure::Malformed(_) => "malformed token",
            AuthFailure::BadSignature => "invalid token signature",
            AuthFailure::Expired => "token expired",
            AuthFailure::NotYetValid => "token not yet valid",
            AuthFailure::Issuer => "token issuer not accepted",
            AuthFailure::Audience => "token audience not accepted",
            AuthFailure::UnknownKey => "unknown signing key",
        }
    }

    fn issue(self) -> &'static str {
        match self {
            AuthFailure::Missing => "send Authorization: Bearer <team JWT>",
            AuthFailure::Malformed(detail) => detail,
            AuthFailure::BadSignature => "the signature does not verify with the configured key",
            AuthFailure::Expired => "exp is in the past",
            AuthFailure::NotYetValid => "nbf is in the future",
            AuthFailure::Issuer => "iss is not an accepted issuer",
            AuthFailure::Audience => "aud does not name an accepted audience",
            AuthFailure::UnknownKey => "no configured key matches the token's alg and kid",
        }
    }
}

/// Why a token did not verify: the caller's fault (401), or keys known to match it have gone
/// past `max_stale` because the identity provider is unreachable (503: not the caller's fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyError {
    Refused(AuthFailure),
    KeysStale,
}

impl From<AuthFailure> for VerifyError {
    fn from(f: AuthFailure) -> Self {
        VerifyError::Refused(f)
    }
}

impl From<VerifyError> for ApiError {
    fn from(e: VerifyError) -> Self {
        match e {
            VerifyError::Refused(f) => ApiError::Unauthorized(f),
            VerifyError::KeysStale => ApiError::Unavailable {
                issue: "the keys for this token are past max_stale (the identity provider is unreachable); try again later",
                retry_after: 30,
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("not found")]
    NotFound,
    /// The request target is over 8 KiB.
    #[error("request target too long")]
    UriTooLong,
    /// The method is not allowed on this path; the value is the `Allow` header.
    #[error("method not supported")]
    MethodNotSupported(&'static str),
    #[error("unauthorized: {}", .0.reason().label())]
    Unauthorized(AuthFailure),
    #[error("forbidden")]
    Forbidden(String),
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamError),
    /// The gateway cannot answer now, through no fault of the caller: 503 with `Retry-After`.
    #[error("unavailable: {issue}")]
    Unavailable {
        issue: &'static str,
        retry_after: u64,
    },
    /// The caller's team is over its rate: 429 with `Retry-After` and the IETF
    /// `RateLimit-Policy` / `RateLimit` fields.
    #[error("team over its rate")]
    RateLimited(RateLimited),
    /// The gateway's own fault (never Convocore's): 500.
    #[error("internal: {0}")]
    Internal(&'static str),
}

/// A team bucket's refusal, as the response says it.
#[derive(Debug, Clone, Copy)]
pub struct RateLimited {
    /// Whole seconds until the next request is allowed (at least 1).
    pub retry_after: u64,
    /// The bucket's size and the seconds it takes to refill.
    pub quota: u32,
    pub window: u64,
    /// Whole seconds until the bucket is full again.
    pub reset: u64,
}

/// Whole seconds, rounded up, at least 1: what a `Retry-After` says.
pub fn whole_seconds(d: std::time::Duration) -> u64 {
    d.as_secs()
        .saturating_add(u64::from(d.subsec_nanos() > 0))
        .max(1)
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::UriTooLong => StatusCode::URI_TOO_LONG,
            ApiError::MethodNotSupported(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Upstream(UpstreamError::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Upstream(
                UpstreamError::Unreachable(_)
                | UpstreamError::TooLarge
                | UpstreamError::Protocol(_),
            ) => StatusCode::BAD_GATEWAY,
            ApiError::Upstream(UpstreamError::Closed(_)) => StatusCode::BAD_GATEWAY,
            ApiError::Upstream(UpstreamError::Paused(_)) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Upstream(
                UpstreamError::Abandoned
                | UpstreamError::BreakerOpen(_)
                | UpstreamError::QueueFull
                | UpstreamError::QueueTimeout,
            ) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn message_and_issue(&self) -> (&str, Option<&str>) {
        match self {
            ApiError::BadRequest(issue) => ("invalid request", Some(issue)),
            ApiError::UriTooLong => (
                "request target too long",
                Some("the path and query may be at most 8 KiB"),
            ),
            ApiError::NotFound => (
                "no such route",
                Some("the API serves GET /v3/agents/{agentId}/convos/{convoId}/export"),
            ),
            ApiError::MethodNotSupported(_) => (
                "method not supported",
                Some("see the Allow header for the methods this path takes"),
            ),
            ApiError::Unauthorized(f) => (f.message(), Some(f.issue())),
            ApiError::Forbidden(issue) => ("forbidden", Some(issue)),
            ApiError::Upstream(UpstreamError::Timeout) => (
                "upstream timed out",
                Some("Convocore did not answer within upstream.request_timeout"),
            ),
            ApiError::Upstream(UpstreamError::Unreachable(_)) => (
                "upstream unreachable",
                Some("could not connect to the Convocore region"),
            ),
            ApiError::Upstream(UpstreamError::TooLarge) => (
                "upstream response too large",
                Some("the export exceeds upstream.max_response_bytes"),
            ),
            ApiError::Upstream(UpstreamError::Abandoned) => (
                "try again",
                Some("a shared fetch was dropped as its other callers went away"),
            ),
            ApiError::Upstream(UpstreamError::Protocol(_)) => (
                "bad upstream response",
                Some("the Convocore region sent an invalid response"),
            ),
            ApiError::Upstream(UpstreamError::Closed(_)) => (
                "bad upstream response",
                Some("the Convocore region closed the connection before answering"),
            ),
            ApiError::Upstream(UpstreamError::Paused(_)) => (
                "upstream rate limited",
                Some("Convocore asked the gateway to slow down; this region is paused, try again after Retry-After"),
            ),
            ApiError::Upstream(UpstreamError::BreakerOpen(_)) => (
                "service unavailable",
                Some("the Convocore region is failing; requests to it are paused, try again after Retry-After"),
            ),
            ApiError::Upstream(UpstreamError::QueueFull) => (
                "service unavailable",
                Some("too many requests are waiting for this Convocore region"),
            ),
            ApiError::Upstream(UpstreamError::QueueTimeout) => (
                "service unavailable",
                Some("no upstream slot for this Convocore region came free within queue_timeout"),
            ),
            ApiError::RateLimited(_) => (
                "rate limit exceeded",
                Some("your team is over its request rate at the gateway; try again after Retry-After"),
            ),
            ApiError::Unavailable { issue, .. } => ("service unavailable", Some(issue)),
            ApiError::Internal(_) => ("internal error", None),
        }
    }

    /// The one place where a failure becomes a response.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let (message, issue) = self.message_and_issue();
        let mut resp = error_response(self.status(), message, issue);
        match &self {
            ApiError::MethodNotSupported(allow) => {
                resp.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::Unauthorized(failure) => {
                resp.headers_mut()
                    .insert(WWW_AUTHENTICATE, www_authenticate(*failure));
            }
            ApiError::Unavailable { retry_after, .. } => {
                resp.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            ApiError::Upstream(UpstreamError::Paused(left) | UpstreamError::BreakerOpen(left)) => {
                resp.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(whole_seconds(*left)));
            }
            ApiError::Upstream(UpstreamError::QueueFull | UpstreamError::QueueTimeout) => {
                resp.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::RateLimited(r) => {
                let headers = resp.headers_mut();
                headers.insert(RETRY_AFTER, HeaderValue::from(r.retry_after));
                // draft-ietf-httpapi-ratelimit-headers: the policy (quota q per window w
                // seconds) and what is left of it (r remaining, t seconds to reset).
                if let Ok(v) =
                    HeaderValue::from_str(&format!("\"team\";q={};w={}", r.quota, r.window))
                {
                    headers.insert(RATELIMIT_POLICY.clone(), v);
                }
                if let Ok(v) = HeaderValue::from_str(&format!("\"team\";r=0;t={}", r.reset)) {
                    headers.insert(RATELIMIT.clone(), v);
                }
            }
            _ => {}
        }
        resp
    }
}

pub static RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
pub static RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

/// RFC 6750 §3: no error attribute when no credentials were sent at all.
fn www_authenticate(failure: AuthFailure) -> HeaderValue {
    match failure {
        AuthFailure::Missing => HeaderValue::from_static("Bearer realm=\"convocore-gateway\""),
        f => {
            let value = format!(
                "Bearer realm=\"convocore-gateway\", error=\"invalid_token\", error_description=\"{}\"",
                f.message()
            );
            HeaderValue::from_str(&value)
                .unwrap_or_else(|_| HeaderValue::from_static("Bearer realm=\"convocore-gateway\""))
        }
    }
}

/// The tRPC code for a status the gateway answers with.
pub fn code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "BAD_REQUEST",
        401 => "UNAUTHORIZED",
        403 => "FORBIDDEN",
        404 => "NOT_FOUND",
        405 => "METHOD_NOT_SUPPORTED",
        413 => "PAYLOAD_TOO_LARGE",
        // The contract's codes have none for these; the caller sent something it must not.
        414 | 431 => "BAD_REQUEST",
        429 => "TOO_MANY_REQUESTS",
        502 => "BAD_GATEWAY",
        503 => "SERVICE_UNAVAILABLE",
        504 => "GATEWAY_TIMEOUT",
        _ => "INTERNAL_SERVER_ERROR",
    }
}

/// A JSON error body in the contract's shape.
pub fn error_response(
    status: StatusCode,
    message: &str,
    issue: Option<&str>,
) -> Response<Full<Bytes>> {
    let mut body = serde_json::json!({ "message": message, "code": code_for(status) });
    if let Some(issue) = issue {
        body["issues"] = serde_json::json!([{ "message": issue }]);
    }
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(resp: Response<Full<Bytes>>) -> serde_json::Value {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn shape_and_codes() {
        let resp = ApiError::Unauthorized(AuthFailure::Expired).into_response();
        assert_eq!(resp.status(), 401);
        assert!(resp.headers()[WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        let v = body(resp).await;
        assert_eq!(v["code"], "UNAUTHORIZED");
        assert_eq!(v["message"], "token expired");
        assert_eq!(v["issues"][0]["message"], "exp is in the past");

        let resp = ApiError::MethodNotSupported("GET").into_response();
        assert_eq!(resp.status(), 405);
        assert_eq!(resp.headers()[ALLOW], "GET");
        assert_eq!(body(resp).await["code"], "METHOD_NOT_SUPPORTED");

        let resp = ApiError::Upstream(UpstreamError::Timeout).into_response();
        assert_eq!(resp.status(), 504);
        assert_eq!(body(resp).await["code"], "GATEWAY_TIMEOUT");

        // The gateway's own faults are 500s that say nothing of their cause.
        let resp = ApiError::Internal("the fetch task ended without an answer").into_response();
        assert_eq!(resp.status(), 500);
        let v = body(resp).await;
        assert_eq!(v["code"], "INTERNAL_SERVER_ERROR");
        assert!(!v.to_string().contains("fetch task"), "{v}");
    }

    #[test]
    fn every_contract_code() {
        for (status, code) in [
            (400, "BAD_REQUEST"),
            (401, "UNAUTHORIZED"),
            (403, "FORBIDDEN"),
            (404, "NOT_FOUND"),
            (405, "METHOD_NOT_SUPPORTED"),
            (413, "PAYLOAD_TOO_LARGE"),
            (429, "TOO_MANY_REQUESTS"),
            (500, "INTERNAL_SERVER_ERROR"),
            (502, "BAD_GATEWAY"),
            (503, "SERVICE_UNAVAILABLE"),
            (504, "GATEWAY_TIMEOUT"),
        ] {
            assert_eq!(code_for(StatusCode::from_u16(status).unwrap()), code);
        }
    }
}
