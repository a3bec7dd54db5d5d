//! One exchange with one region: `GET {base}/agents/{a}/convos/{c}/export?format=…` with the
//! region's token, bounded by `request_timeout` body included, the body capped at
//! `max_response_bytes` while it streams.
//!
//! The request is built from the parsed [`Export`], never by forwarding the caller's request,
//! so no caller header can reach Convocore by accident.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    HeaderValue, ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, RETRY_AFTER, USER_AGENT,
};
use http::Request;
use http_body_util::{BodyExt, Empty};
use tokio::time::Instant;

use super::pool::PoolError;
use super::region::Region;
use super::{Ask, Fetched, Passed, UpstreamError, X_REQUEST_ID};
use crate::clock;
use crate::domain::Format;

/// The exchange's limits, from `[upstream]`.
pub struct Limits {
    pub request_timeout: Duration,
    pub max_response_bytes: u64,
    /// Extra attempts for an exchange Convocore cannot have acted on.
    pub retries: u32,
}

static USER_AGENT_VALUE: HeaderValue =
    HeaderValue::from_static(concat!("convocore-gateway/", env!("CARGO_PKG_VERSION")));

/// One exchange, to be done by `deadline` (the fetch's `request_timeout`, retries included).
pub async fn exchange(
    limits: &Limits,
    region: &Region,
    ask: &Ask<'_>,
    deadline: Instant,
) -> Result<Fetched, UpstreamError> {
    let (export, request_id) = (ask.export, ask.request_id);
    let uri = format!(
        "{}/agents/{}/convos/{}/export?format={}",
        region.path,
        export.agent,
        export.convo,
        export.format.as_str()
    );
    let accept = match export.format {
        Format::Json => HeaderValue::from_static("application/json"),
        Format::Csv => HeaderValue::from_static("text/csv, application/json;q=0.5"),
    };
    let mut request = Request::get(uri)
        .header(AUTHORIZATION, region.authorization.get().as_ref().clone())
        .header(ACCEPT, accept)
        .header(&X_REQUEST_ID, request_id.clone())
        .header(USER_AGENT, USER_AGENT_VALUE.clone());
    // Revalidating a stored entry: its validators are the only headers added.
    if let Some(validators) = ask.validators {
        if let Some(etag) = &validators.etag {
            request = request.header(IF_NONE_MATCH, etag.clone());
        }
        if let Some(modified) = &validators.last_modified {
            request = request.header(IF_MODIFIED_SINCE, modified.clone());
        }
    }
    let request = request
        .body(Empty::new())
        .map_err(|e| UpstreamError::Protocol(Arc::new(e)))?;

    let started = Instant::now();
    let max = limits.max_response_bytes;
    let origin = &region.origin;
    let exchange = async move {
        let (response, conn) = origin
            .send(request, ask.wanted)
            .await
            .map_err(|e| match e {
                PoolError::Abandoned => UpstreamError::Abandoned,
                PoolError::Connect(e) => UpstreamError::Unreachable(e),
                // Closed before a response: Convocore did not answer it (retry-safe for a GET).
                PoolError::Http(e)
                    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() =>
                {
                    UpstreamError::Closed(Arc::new(e))
                }
                PoolError::Http(e) => UpstreamError::Protocol(Arc::new(e)),
            })?;
        let (parts, body) = response.into_parts();
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(UpstreamError::TooLarge);
        }
        let limit = usize::try_from(max).unwrap_or(usize::MAX);
        let body = read_body(body, limit, declared).await?;
        origin.release(conn);
        Ok((parts, body))
    };
    let (parts, body) = tokio::time::timeout_at(deadline, exchange)
        .await
        .map_err(|_| UpstreamError::Timeout)??;

    let storable = !parts.headers.get_all(CACHE_CONTROL).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|d| {
                let d = d.trim();
                d.eq_ignore_ascii_case("no-store")
                    || d.eq_ignore_ascii_case("private")
                    || d.to_ascii_lowercase().starts_with("private=")
            })
        })
    });
    Ok(Fetched {
        status: parts.status,
        headers: Passed::copy_from(&parts.headers),
        body,
        storable,
        elapsed: started.elapsed(),
        received: clock::now(),
        region: region.header.clone(),
        retry_after: parts
            .headers
            .get(RETRY_AFTER)
            .and_then(|v| retry_after(v.as_bytes(), std::time::SystemTime::now())),
        from_shared: false,
        encoded: Default::default(),
    })
}

/// A `Retry-After` value (delay-seconds or an HTTP-date) as a delay from `now`; `None` when
/// it is neither.
pub fn retry_after(value: &[u8], now: std::time::SystemTime) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(text.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Reads a whole body of at most `limit` bytes into one buffer of its own. With a declared
/// length the buffer is allocated once at its final size, so a large export costs one
/// allocation and one copy (collecting chunks and joining them would hold it twice), and a
/// cached body never pins the connection's read buffer it arrived in.
async fn read_body(
    mut body: hyper::body::Incoming,
    limit: usize,
    declared: Option<u64>,
) -> Result<Bytes, UpstreamError> {
    let capacity = declared
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0)
        .min(limit);
    let mut buf = bytes::BytesMut::with_capacity(capacity);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| UpstreamError::Protocol(Arc::new(e)))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if buf.len() + data.len() > limit {
            return Err(UpstreamError::TooLarge);
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(retry_after(b"2", now), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(b" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            retry_after(later.as_bytes(), now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(retry_after(past.as_bytes(), now), Some(Duration::ZERO));
        for bad in [&b""[..], b"-1", b"1.5", b"soon", b"\xff"] {
            assert_eq!(retry_after(bad, now), None, "{bad:?}");
        }
    }
}
