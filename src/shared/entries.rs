//! Cache entries in Redis: the second level. A value is one sealed blob: the entry's status,
//! store time (so `Age` is the fleet's), region, passed headers and body, under the key
//! `{prefix}e:{agent}:{convo}:{format}`, expiring when no replica could serve it even stale.
//! Writes run after the answer, at most [`MAX_WRITES`] at a time (a write that finds none
//! free is skipped: the entry is only missing from the second level).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};

use super::{Op, Redis};
use crate::clock::UnixMillis;
use crate::domain::Export;
use crate::upstream::{Fetched, Passed, PASSED_HEADERS};

/// Concurrent writes to Redis per process.
pub const MAX_WRITES: usize = 16;
const VERSION: u8 = 1;

pub fn redis_key(redis: &Redis, key: &Export) -> String {
    redis.key(&format!(
        "e:{}:{}:{}",
        key.agent,
        key.convo,
        key.format.as_str()
    ))
}

/// The entry as bytes (before sealing).
pub fn encode(f: &Fetched) -> Vec<u8> {
    let mut out = Vec::with_capacity(f.body.len() + 256);
    out.push(VERSION);
    out.extend_from_slice(&f.status.as_u16().to_be_bytes());
    out.extend_from_slice(&f.received.0.to_be_bytes());
    let region = f.region.as_bytes();
    out.push(u8::try_from(region.len()).unwrap_or(0));
    out.extend_from_slice(&region[..usize::from(u8::try_from(region.len()).unwrap_or(0))]);
    for name in &PASSED_HEADERS {
        match f.headers.get(name) {
            Some(v) => {
                out.extend_from_slice(&u32::try_from(v.len()).unwrap_or(0).to_be_bytes());
                out.extend_from_slice(v.as_bytes());
            }
            None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
        }
    }
    out.extend_from_slice(&f.body);
    out
}

/// The entry from bytes; `None` for anything malformed.
pub fn decode(bytes: &[u8]) -> Option<Fetched> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = bytes.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    if take(1)? != [VERSION] {
        return None;
    }
    let status = StatusCode::from_u16(u16::from_be_bytes(take(2)?.try_into().ok()?)).ok()?;
    let received = u64::from_be_bytes(take(8)?.try_into().ok()?);
    let region_len = usize::from(take(1)?[0]);
    let region = HeaderValue::from_bytes(take(region_len)?).ok()?;
    let mut headers = HeaderMap::new();
    for name in &PASSED_HEADERS {
        let len = u32::from_be_bytes(take(4)?.try_into().ok()?);
        if len != u32::MAX {
            let value = HeaderValue::from_bytes(take(usize::try_from(len).ok()?)?).ok()?;
            headers.insert(name.clone(), value);
        }
    }
    let body = Bytes::copy_from_slice(bytes.get(at..)?);
    Some(Fetched {
        status,
        headers: Passed::copy_from(&headers),
        body,
        storable: true,
        elapsed: Duration::ZERO,
        received: UnixMillis(received),
        region,
        retry_after: None,
        from_shared: false,
        encoded: Default::default(),
    })
}

impl Redis {
    /// The entry another replica stored for `key`, if Redis has one that opens.
    pub async fn get_entry(self: &Arc<Self>, key: &Export) -> Option<Fetched> {
        let rkey = redis_key(self, key);
        let sealed: Option<Vec<u8>> = self
            .run(Op::Get, redis::cmd("GET").arg(&rkey))
            .await
            .flatten();
        let sealed = sealed?;
        let keys = self.keys.get();
        match keys
            .open(rkey.as_bytes(), &sealed)
            .and_then(|plain| decode(&plain))
        {
            Some(entry) => Some(entry),
            None => {
                self.rejected(Op::Get);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv"),
        );
        headers.insert(http::header::ETAG, HeaderValue::from_static("\"v1\""));
        let f = Fetched {
            status: StatusCode::OK,
            headers: Passed::copy_from(&headers),
            body: Bytes::from_static(b"a,b\n1,2\n"),
            storable: true,
            elapsed: Duration::from_millis(5),
            received: UnixMillis(1_700_000_000_123),
            region: HeaderValue::from_static("eu"),
            retry_after: None,
            from_shared: false,
            encoded: Default::default(),
        };
        let back = decode(&encode(&f)).unwrap();
        assert_eq!(back.status, f.status);
        assert_eq!(back.body, f.body);
        assert_eq!(back.received, f.received);
        assert_eq!(back.region, f.region);
        assert_eq!(back.headers.get(&http::header::ETAG).unwrap(), "\"v1\"");
        assert_eq!(
            back.headers.get(&http::header::CONTENT_TYPE).unwrap(),
            "text/csv"
        );
        assert!(back.headers.get(&http::header::LAST_MODIFIED).is_none());
        let bytes = encode(&f);
        for cut in 0..bytes.len() - f.body.len() {
            assert!(decode(&bytes[..cut]).is_none(), "cut at {cut}");
        }
    }
}
