//! The admin listener: a plain match on method and path.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::app::App;
use crate::error::{error_response, ApiError};

pub async fn handle<B>(
    app: Arc<App>,
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => json(StatusCode::OK, r#"{"status":"ok"}"#),
        (&Method::GET, "/readyz") => {
            if app.is_ready() {
                json(StatusCode::OK, r#"{"status":"ready"}"#)
            } else {
                error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready",
                    Some("the gateway is shutting down"),
                )
            }
        }
        (_, "/healthz" | "/readyz") => {
            let mut r = ApiError::MethodNotSupported.into_response();
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET"));
            r
        }
        _ => error_response(StatusCode::NOT_FOUND, "no such admin route", None),
    };
    Ok(response)
}

fn json(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
