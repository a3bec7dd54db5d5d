//! The encoding of an export's `200` (`[cache] compress`): chosen for the caller's
//! `Accept-Encoding`, with the headers that depend on it, and the encoded body taken from the
//! entry (made once, then kept and weighed with it; see [`crate::compress`]).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_ENCODING, ETAG, VARY};
use http::Response;
use http_body_util::Full;

use crate::compress::{self, Coding};
use crate::domain::Export;
use crate::state::State;
use crate::upstream::Fetched;

/// Chooses the encoding of a `200` for the caller's `Accept-Encoding` among `offered` (none for
/// a body under [`compress::MIN_BYTES`]) and sets the headers that depend on it: `Vary`
/// whenever anything is offered, and for an encoded body `Content-Encoding` and a weak `ETag`
/// (the bytes differ from the identity's).
pub fn negotiate(
    request: &http::HeaderMap,
    offered: &[Coding],
    entry: &Fetched,
    response: &mut Response<Full<Bytes>>,
) -> Option<Coding> {
    if offered.is_empty() {
        return None;
    }
    let headers = response.headers_mut();
    headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
    if entry.body.len() < compress::MIN_BYTES {
        return None;
    }
    let coding = compress::negotiate(request, offered)?;
    headers.insert(CONTENT_ENCODING, coding.header());
    if let Some(etag) = headers.get(ETAG) {
        let weak = entry.encoded.weak_etag(etag);
        headers.insert(ETAG, weak);
    }
    Some(coding)
}

/// Puts the `coding` body of `entry` in `response`: kept, or made now (the first to ask waits
/// for it) and weighed into the cache's bytes under `key`. If the encoder fails, the identity
/// body stays, under its own headers.
pub async fn encode(
    state: &State,
    key: Option<&Export>,
    entry: &Arc<Fetched>,
    coding: Coding,
    response: &mut Response<Full<Bytes>>,
) {
    match entry.encoded.get_or_make(coding, &entry.body).await {
        Some((body, made)) => {
            if let (true, Some(key)) = (made, key) {
                state.cache.reweigh(key, entry).await;
            }
            *response.body_mut() = Full::new(body);
        }
        None => {
            let headers = response.headers_mut();
            headers.remove(CONTENT_ENCODING);
            if let Some(etag) = entry.headers.get(&ETAG) {
                headers.insert(ETAG, etag.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(len: usize) -> Fetched {
        let mut headers = http::HeaderMap::new();
        headers.insert(ETAG, HeaderValue::from_static("\"t\""));
        Fetched {
            status: http::StatusCode::OK,
            headers: crate::upstream::Passed::copy_from(&headers),
            body: Bytes::from(vec![b'a'; len]),
            storable: true,
            elapsed: std::time::Duration::ZERO,
            received: crate::clock::UnixMillis(0),
            region: HeaderValue::from_static("eu"),
            retry_after: None,
            from_shared: false,
            encoded: Default::default(),
        }
    }

    fn negotiated(len: usize, offered: &[Coding]) -> (Option<Coding>, http::HeaderMap) {
        let mut request = http::HeaderMap::new();
        request.insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip"),
        );
        let entry = entry(len);
        let mut response = Response::new(Full::new(entry.body.clone()));
        response
            .headers_mut()
            .insert(ETAG, HeaderValue::from_static("\"t\""));
        let coding = negotiate(&request, offered, &entry, &mut response);
        (coding, response.headers().clone())
    }

    /// The contract's "bodies of 1 KiB or more", at the boundary.
    #[test]
    fn bodies_from_one_kib_are_encoded() {
        let (coding, headers) = negotiated(1023, &[Coding::Gzip]);
        assert_eq!(coding, None);
        assert_eq!(headers.get(VARY).unwrap(), "accept-encoding");
        assert!(headers.get(CONTENT_ENCODING).is_none());
        assert_eq!(headers.get(ETAG).unwrap(), "\"t\"");

        let (coding, headers) = negotiated(1024, &[Coding::Gzip]);
        assert_eq!(coding, Some(Coding::Gzip));
        assert_eq!(headers.get(CONTENT_ENCODING).unwrap(), "gzip");
        assert_eq!(headers.get(ETAG).unwrap(), "W/\"t\"");

        let (coding, headers) = negotiated(4096, &[]);
        assert_eq!(coding, None);
        assert!(headers.get(VARY).is_none());
    }
}
